"""1xN block pruning (one shot): exact counts, the block structure, and what is skipped."""

import pytest
import torch
from torch import nn

from prune2tvm.prune.blocks import block_mask, prune_blocks_one_shot
from prune2tvm.sparse import block_sparsity


@pytest.mark.parametrize("shape, block, sparsity", [((64, 32), (4, 1), 0.75), ((32, 16, 3, 3), (8, 1), 0.5),
                                                    ((48, 40), (2, 4), 0.9), ((16, 8), (1, 1), 0.3)])
def test_block_mask_zeroes_exactly_the_weakest_blocks(shape, block, sparsity):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    mask = block_mask(weight, block, sparsity)
    matrix = (weight * mask).reshape(shape[0], -1).numpy()
    blocks = (shape[0] // block[0]) * (matrix.shape[1] // block[1])
    assert block_sparsity(matrix, block) == pytest.approx(round(sparsity * blocks) / blocks)
    # every block is all kept or all zero, and a kept block outweighs every zeroed one (L1)
    m = mask.reshape(shape[0], -1).reshape(shape[0] // block[0], block[0], -1, block[1])
    assert torch.all((m.amin((1, 3)) == m.amax((1, 3))))
    norms = weight.abs().reshape(shape[0] // block[0], block[0], -1, block[1]).sum((1, 3))
    kept = m.amax((1, 3)).bool()
    assert norms[kept].min() >= norms[~kept].max()


def test_one_shot_pruning_skips_what_cannot_be_blocked_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 10, 1),
                          nn.Flatten(), nn.Linear(10, 8))
    skipped = prune_blocks_one_shot(model, (4, 1), 0.5, skip=("4",))
    assert skipped == {"1": "grouped conv (groups=16)", "2": "[10, 16] does not divide into 4x1 blocks",
                       "4": "skipped by request"}
    assert block_sparsity(model[0].weight.detach().reshape(16, -1).numpy(), (4, 1)) == pytest.approx(0.5)
    assert bool((model[1].weight != 0).all())
