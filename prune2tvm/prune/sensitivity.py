"""Sensitivity analysis (Distiller's): how much each layer alone can lose.

For every prunable layer alone, the trained model is pruned one shot at each of a sweep of
sparsity levels (at a granularity) and evaluated on the validation split; the other layers
stay dense. The result is a CSV (layer, sparsity, accuracy) and a plot of accuracy against
sparsity with one line per layer.

A pipeline uses the CSV to prune each layer as far as it tolerates: for a tolerance (an
accuracy drop), each layer's target is the highest swept level whose accuracy, and that of
every level below it, stays within the tolerance of the dense accuracy. Two modes:
- ``target``: AGP drives each layer to its own target (the cubic schedule scaled per layer);
- ``threshold``: Distiller's SensitivityPruner, element-wise: weights below
  ``sensitivity * std(w)`` are pruned at each pruning step, each layer's sensitivity set
  once from the dense weights so that the dense layer would lose its target fraction.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune2tvm.errors import InputError
from prune2tvm.prune.granularity import Granularity, layer_masks


@dataclass(frozen=True)
class SensitivityPoint:
    layer: str
    sparsity: float
    accuracy: float


@torch.no_grad()
def sweep(model: nn.Module, layers: dict[str, nn.Module], evaluate, levels: list[float],
          granularity: Granularity = Granularity()) -> list[SensitivityPoint]:
    """``evaluate(model) -> accuracy`` for each layer pruned alone at each level; level 0 (the
    dense model) is measured once and listed for every layer."""
    if any(not 0.0 < s < 1.0 for s in levels):
        raise InputError(f"sensitivity levels {levels}: each must be in (0, 1)")
    dense = evaluate(model)
    points = []
    for name, layer in layers.items():
        points.append(SensitivityPoint(name, 0.0, dense))
        saved = layer.weight.detach().clone()
        for level in sorted(levels):
            layer.weight.mul_(layer_masks({name: layer}, granularity, level)[name])
            points.append(SensitivityPoint(name, level, evaluate(model)))
            layer.weight.copy_(saved)
    return points


def write_csv(points: list[SensitivityPoint], path: str | os.PathLike) -> None:
    from prune2tvm.fsutil import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "sparsity", "accuracy"])
        for p in points:
            writer.writerow([p.layer, f"{p.sparsity:.4f}", f"{p.accuracy:.6f}"])


def read_csv(path: str | os.PathLike) -> list[SensitivityPoint]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such sensitivity file (write one with prune2tvm sensitivity)")
    points = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ["layer", "sparsity", "accuracy"]:
                raise InputError(f"{path}: not a sensitivity file; its header must be layer,sparsity,accuracy "
                                 f"(got {','.join(reader.fieldnames or [])})")
            for line, row in enumerate(reader, start=2):
                try:
                    point = SensitivityPoint(row["layer"], float(row["sparsity"]), float(row["accuracy"]))
                except (TypeError, ValueError):
                    raise InputError(f"{path}: line {line}: sparsity and accuracy must be numbers") from None
                if not (0.0 <= point.sparsity < 1.0 and 0.0 <= point.accuracy <= 1.0):
                    raise InputError(f"{path}: line {line}: sparsity must be in [0, 1) and accuracy in [0, 1]")
                points.append(point)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    if not points:
        raise InputError(f"{path}: no rows")
    return points


def layer_targets(points: list[SensitivityPoint], tolerance: float) -> dict[str, float]:
    """Per layer, the highest level whose accuracy (and every lower level's) is within
    ``tolerance`` of the layer's dense (level 0) accuracy; 0 if even the first drops more."""
    by_layer: dict[str, list[SensitivityPoint]] = {}
    for p in points:
        by_layer.setdefault(p.layer, []).append(p)
    targets = {}
    for layer, rows in by_layer.items():
        rows.sort(key=lambda p: p.sparsity)
        dense = next((p.accuracy for p in rows if p.sparsity == 0.0), None)
        if dense is None:
            raise InputError(f"sensitivity of {layer}: no dense (sparsity 0) row")
        target = 0.0
        for p in rows:
            if p.accuracy < dense - tolerance:
                break
            target = p.sparsity
        targets[layer] = target
    return targets


def sensitivities_for(layers: dict[str, nn.Module], targets: dict[str, float]) -> dict[str, float]:
    """Distiller's sensitivity per layer: threshold / std(w) where pruning the weights below the
    threshold would remove the layer's target fraction of its (dense) weights."""
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach().abs().flatten()
        target = targets.get(name, 0.0)
        threshold = float(torch.quantile(w, target)) if target > 0 else 0.0
        out[name] = threshold / float(layer.weight.detach().std())
    return out


def threshold_masks(layers: dict[str, nn.Module], sensitivities: dict[str, float], scale: float = 1.0
                    ) -> dict[str, torch.Tensor]:
    """Keep |w| > scale * sensitivity * std(w) (Distiller's SensitivityPruner; zeros stay zero)."""
    masks = {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        threshold = scale * sensitivities.get(name, 0.0) * float(w.std())
        masks[name] = ((w.abs() > threshold) & (w != 0)).to(w.dtype)
    return masks


def plot(points: list[SensitivityPoint], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune2tvm.fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = list(dict.fromkeys(p.layer for p in points))
    for layer in layers:
        rows = sorted((p.sparsity, p.accuracy) for p in points if p.layer == layer)
        ax.plot([100 * s for s, _ in rows], [100 * a for _, a in rows], marker="o", label=layer)
    dense = np.mean([p.accuracy for p in points if p.sparsity == 0.0])
    ax.axhline(100 * dense, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the layer alone (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
