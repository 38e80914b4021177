"""1xN (and R x C) block pruning, one shot: blocks ranked by L1 norm, exactly the requested
fraction of each layer's blocks removed.

A weight is viewed as a matrix [out, in] (a conv's [O, C, KH, KW] as [O, C*KH*KW]); a block
is R consecutive outputs by C consecutive inputs, so the 1xN pattern of Lin et al. is N
output channels at one input position: block (N, 1).
"""

from __future__ import annotations

import torch
from torch import nn

from prune2tvm.prune.masks import magnitude_mask, prunable_layers


def block_mask(weight: torch.Tensor, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """A 0/1 mask of ``weight``'s shape with round(sparsity * blocks) lowest-L1 blocks zero."""
    rows, cols = block
    matrix = weight.detach().reshape(weight.shape[0], -1)
    n, k = matrix.shape
    if n % rows or k % cols:
        raise ValueError(f"weight {list(matrix.shape)} does not divide into {rows}x{cols} blocks")
    norms = matrix.abs().reshape(n // rows, rows, k // cols, cols).sum((1, 3))
    keep = magnitude_mask(norms, sparsity)
    return keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1).reshape_as(weight)


@torch.no_grad()
def prune_blocks_one_shot(model: nn.Module, block: tuple[int, int], sparsity: float,
                          skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Prune every conv/linear layer that divides into blocks; returns the skipped layers
    with the reason (grouped convs, shapes that do not divide, names in ``skip``)."""
    skipped = {}
    for name, layer in prunable_layers(model).items():
        matrix_shape = (layer.weight.shape[0], layer.weight[0].numel())
        if name in skip:
            skipped[name] = "skipped by request"
        elif isinstance(layer, nn.Conv2d) and layer.groups != 1:
            skipped[name] = f"grouped conv (groups={layer.groups})"
        elif matrix_shape[0] % block[0] or matrix_shape[1] % block[1]:
            skipped[name] = f"{list(matrix_shape)} does not divide into {block[0]}x{block[1]} blocks"
        else:
            layer.weight.mul_(block_mask(layer.weight, block, sparsity))
    return skipped
