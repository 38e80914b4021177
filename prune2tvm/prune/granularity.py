"""What one pruning decision removes: an element, an R x C block, a filter or a channel.

A weight is viewed as a matrix [out, in] (a conv's [O, C, KH, KW] as [O, C*KH*KW]). Units:
- element: one weight;
- block (R, C): R consecutive outputs by C consecutive inputs; (N, 1) is the 1xN pattern of
  Lin et al.: N output channels at one input position, what ``--bsr N`` compiles;
- filter: one output channel (a row of the matrix);
- channel: one input channel (for a conv, its KH x KW columns together).

Units are ranked by L1 norm. Masks are per layer at one rate, or global: one threshold on
the norm per weight of the unit, over every layer, each layer keeping at least one unit.

Why not ``torch.ao.pruning``'s WeightNormSparsifier: it masks through a parametrization, so
the stored weights (and the optimizer's state) keep their values under the mask until
``squash_mask``; prune2tvm needs the stored weights exactly zero after every step (what is
exported and what BSR compiles) and ranks filters, channels and global scopes, which the
sparsifier does not. Masks here are plain tensors that ``MaskHolder`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prune2tvm.errors import ConfigError
from prune2tvm.prune.masks import magnitude_mask

KINDS = ("element", "block", "filter", "channel")


@dataclass(frozen=True)
class Granularity:
    kind: str = "element"
    block: tuple[int, int] = (1, 1)  # (R, C), for kind "block"
    pad: bool = False  # blocks: a matrix that does not divide is padded (edge blocks are partial), not skipped

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"granularity {self.kind!r} is not valid; valid choices: {', '.join(KINDS)}")
        if len(self.block) != 2 or any(not isinstance(b, int) or b < 1 for b in self.block):
            raise ConfigError(f"block {list(self.block)} is not valid; valid: [R, C], two positive integers")

    def __str__(self) -> str:
        return f"{self.block[0]}x{self.block[1]} blocks" if self.kind == "block" else f"{self.kind}s"

    def unfit(self, layer: nn.Module) -> str | None:
        """Why ``layer`` cannot be pruned at this granularity, or None if it can."""
        if self.kind == "element":
            return None
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
        if self.kind == "block" and not self.pad:
            n, k = layer.weight.shape[0], layer.weight[0].numel()
            if n % self.block[0] or k % self.block[1]:
                return (f"[{n}, {k}] does not divide into {self.block[0]}x{self.block[1]} blocks "
                        "(prune.indivisible: pad prunes it with partial edge blocks)")
        return None

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """L1 norm of each unit, shaped as the grid of units."""
        w = weight.detach().abs()
        if self.kind == "element":
            return w
        if self.kind == "filter":
            return w.reshape(w.shape[0], -1).sum(1)
        if self.kind == "channel":
            return w.transpose(0, 1).reshape(w.shape[1], -1).sum(1)
        rows, cols = self.block
        matrix = self._padded(w.reshape(w.shape[0], -1))
        n, k = matrix.shape
        sums = matrix.reshape(n // rows, rows, k // cols, cols).sum((1, 3))
        if self.pad:  # a partial edge block ranks by its weights' mean, as a whole block would
            real = self._padded(torch.ones_like(w.reshape(w.shape[0], -1))).reshape(n // rows, rows, k // cols, cols)
            sums = sums * (rows * cols) / real.sum((1, 3))
        return sums

    def _padded(self, matrix: torch.Tensor) -> torch.Tensor:
        rows, cols = self.block
        n, k = matrix.shape
        if not self.pad or (n % rows == 0 and k % cols == 0):
            return matrix
        return torch.nn.functional.pad(matrix, (0, -k % cols, 0, -n % rows))

    def unit_size(self, weight: torch.Tensor) -> float:
        """Weights per unit (on average, when edge blocks are partial)."""
        return weight.numel() / self.scores(weight).numel()

    def expand(self, unit_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A mask over the units as a 0/1 mask of ``weight``'s shape."""
        if self.kind == "element":
            return unit_mask.reshape_as(weight)
        if self.kind == "filter":
            return unit_mask.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()
        if self.kind == "channel":
            return unit_mask.reshape(1, -1, *([1] * (weight.dim() - 2))).expand_as(weight).clone()
        rows, cols = self.block
        full = unit_mask.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        n, k = weight.shape[0], weight[0].numel()
        return full[:n, :k].reshape_as(weight).contiguous()


def layer_masks(layers: dict[str, nn.Module], granularity: Granularity, sparsity: float,
                scope: str = "layer") -> dict[str, torch.Tensor]:
    """0/1 masks (weight-shaped) removing ``sparsity`` of each layer's units (scope "layer"),
    or of all the layers' units together ranked by norm per weight (scope "global").

    Zero units rank lowest, so masks from a rising schedule only ever grow."""
    scores = {n: granularity.scores(m.weight) for n, m in layers.items()}
    if scope == "layer":
        units = {n: magnitude_mask(s, sparsity) for n, s in scores.items()}
    elif scope == "global":
        units = _global_units(layers, granularity, scores, sparsity)
    else:
        raise ConfigError(f"scope {scope!r} is not valid; valid choices: layer, global")
    return {n: granularity.expand(units[n], layers[n].weight) for n in layers}


def _global_units(layers, granularity, scores, sparsity) -> dict[str, torch.Tensor]:
    """Units with the lowest norm per weight, over all layers, until ``sparsity`` of all the
    weights are removed (units differ in size between layers: the count is in weights)."""
    per_weight = torch.cat([(s / granularity.unit_size(layers[n].weight)).flatten() for n, s in scores.items()])
    sizes = torch.cat([torch.full((s.numel(),), granularity.unit_size(layers[n].weight), dtype=torch.float64)
                       for n, s in scores.items()])
    order = torch.argsort(per_weight, stable=True)
    midpoints = torch.cumsum(sizes[order], 0) - sizes[order] / 2  # a unit goes if most of it is within the rate
    count = int((midpoints < sparsity * float(sizes.sum())).sum())
    removed = torch.zeros(per_weight.numel(), dtype=torch.bool)
    removed[order[:count]] = True
    units, offset = {}, 0
    for n, s in scores.items():
        gone = removed[offset:offset + s.numel()].reshape(s.shape)
        offset += s.numel()
        if bool(gone.all()):  # a layer with no unit left would cut the network: keep its best
            gone = gone.clone()
            gone.view(-1)[int(torch.argmax(s.flatten()))] = False
        units[n] = (~gone).to(layers[n].weight.dtype)
    return units
