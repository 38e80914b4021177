"""Pruning plans as data: what was removed from each layer, re-applicable to a fresh model.

A plan is JSON: per layer its weight shape, granularity, the output-channel order given by
filter rearrangement (if any), and the mask over its units (kept = 1) as packed bits in
base64, with the count of removed units so a reader sees the sparsity without decoding.
``PruningPlan.apply`` puts a freshly built model into the pruned one's form: channels
permuted, then masked; every layer name and shape is checked first, so a plan for another
model is refused before anything is changed.

A checkpoint of a pruned model is its state dict (loaded with ``weights_only=True``) plus
its plan beside it.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune2tvm.errors import InputError
from prune2tvm.prune.granularity import KINDS, Granularity

PLAN_FORMAT_VERSION = 1


@dataclass
class LayerPlan:
    name: str
    shape: list[int]  # the weight's
    granularity: str
    block: list[int]  # [R, C] for granularity "block", else [1, 1]
    units: int
    removed: int
    mask: str  # the unit mask (1 = kept), row-major, np.packbits, base64
    order: list[int] | None = None  # output channels after rearrangement (new i = old order[i])
    padded: bool = False  # blocks over a matrix padded to a multiple of the block (partial edge blocks)

    def unit_mask(self, grid: tuple[int, ...]) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(base64.b64decode(self.mask), dtype=np.uint8))[:self.units]
        return torch.from_numpy(bits.astype(np.float32)).reshape(grid)


@dataclass
class PruningPlan:
    method: str
    layers: list[LayerPlan] = field(default_factory=list)
    input_shape: list[int] | None = None  # one sample's, for tracing the model when thinning
    thinned: list[list] | None = None  # [root layer, removed output channels] per group, in order
    format_version: int = PLAN_FORMAT_VERSION

    @classmethod
    def from_model(cls, model: nn.Module, masks: dict[str, torch.Tensor], granularity: Granularity,
                   method: str, orders: dict[str, torch.Tensor] | None = None,
                   input_shape: list[int] | None = None) -> PruningPlan:
        """The plan of ``model``'s current masks (weight-shaped 0/1, as ``MaskHolder`` keeps them)."""
        modules = dict(model.named_modules())
        layers = []
        for name, mask in masks.items():
            weight = modules[name].weight
            # a unit is kept when any of its weights is kept (all or none, by construction)
            units = (granularity.scores(mask) > 0).flatten()
            order = (orders or {}).get(name)
            layers.append(LayerPlan(name, list(weight.shape), granularity.kind, list(granularity.block), units.numel(),
                                    int((~units).sum()), base64.b64encode(np.packbits(units.numpy())).decode(),
                                    None if order is None else [int(i) for i in order], granularity.pad))
        if orders and input_shape is None:
            raise ValueError("a plan with rearranged layers needs the model's input_shape")
        missing = sorted(set(orders or {}) - set(masks))
        if missing:
            raise ValueError(f"rearranged layers without a mask: {', '.join(missing)}")
        return cls(method, layers, input_shape=None if input_shape is None else list(input_shape))

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from prune2tvm.fsutil import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such pruning plan") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a pruning plan (unreadable JSON: {exc})") from None
        try:
            if data.get("format_version") != PLAN_FORMAT_VERSION:
                raise InputError(f"{path}: plan format {data.get('format_version')!r} is not supported; "
                                 f"valid: {PLAN_FORMAT_VERSION}")
            plan = cls(str(data["method"]), [LayerPlan(**layer) for layer in data["layers"]],
                       data.get("input_shape"), data.get("thinned"))
        except (AttributeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a pruning plan ({type(exc).__name__}: {exc})") from None
        for layer in plan.layers:
            if layer.granularity not in KINDS:
                raise InputError(f"{path}: layer {layer.name}: granularity {layer.granularity!r} is not valid; "
                                 f"valid: {', '.join(KINDS)}")
        return plan

    def masks_for(self, model: nn.Module, where: str = "plan") -> dict[str, torch.Tensor]:
        """Weight-shaped masks for ``model``; refuses a plan that does not fit it (names, shapes,
        sizes), naming every mismatch at once."""
        modules = dict(model.named_modules())
        problems, masks = [], {}
        for layer in self.layers:
            module = modules.get(layer.name)
            if module is None or not hasattr(module, "weight"):
                problems.append(f"no layer {layer.name}")
                continue
            if list(module.weight.shape) != layer.shape:
                problems.append(f"{layer.name} is {list(module.weight.shape)}, the plan's {layer.shape}")
                continue
            granularity = Granularity(layer.granularity, tuple(layer.block), bool(layer.padded))
            why = granularity.unfit(module)
            grid = tuple(granularity.scores(module.weight).shape) if why is None else None
            if grid is None or int(np.prod(grid)) != layer.units:
                problems.append(f"{layer.name}: {why or f'{layer.units} units do not fit {granularity}'}")
                continue
            try:
                masks[layer.name] = granularity.expand(layer.unit_mask(grid), module.weight)
            except (ValueError, RuntimeError) as exc:  # bad base64, too few bits
                problems.append(f"{layer.name}: unreadable mask ({exc})")
            if layer.order is not None and sorted(layer.order) != list(range(layer.shape[0])):
                problems.append(f"{layer.name}: order is not a permutation of its {layer.shape[0]} output channels")
        if problems:
            raise InputError(f"{where} does not fit the model: {'; '.join(problems)}")
        return masks

    @torch.no_grad()
    def apply(self, model: nn.Module, where: str = "plan") -> dict[str, torch.Tensor]:
        """Thin, rearrange and mask ``model`` as the plan says; returns the masks (for a MaskHolder)."""

        if self.thinned:
            from prune2tvm.errors import ConfigError
            from prune2tvm.prune.filters import apply_thinning

            try:
                apply_thinning(model, torch.zeros(1, *self.input_shape), [(n, list(i)) for n, i in self.thinned])
            except (ConfigError, TypeError, ValueError, RuntimeError) as exc:
                raise InputError(f"{where} does not fit the model: {exc}") from None

        masks = self.masks_for(model, where)
        ordered = [layer for layer in self.layers if layer.order is not None]
        if ordered:
            import torch_pruning as tp

            from prune2tvm.prune.rearrange import apply_order

            if not self.input_shape:
                raise InputError(f"{where}: rearranged layers but no input_shape to trace the model with")
            with torch.enable_grad():
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *self.input_shape))
            for layer in ordered:
                try:
                    apply_order(model, graph, layer.name, torch.tensor(layer.order))
                except (ValueError, RuntimeError, IndexError) as exc:
                    raise InputError(f"{where}: cannot rearrange {layer.name} in this model: {exc}") from None
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)
        return masks
