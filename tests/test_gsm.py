"""Global Sparse Momentum: only the globally top units by |w * grad| learn, all decay, and at
the end the rest can be cut with little change to the model."""

import pytest
import torch
from torch import nn

from prune2tvm.prune.granularity import Granularity
from prune2tvm.prune.gsm import GlobalSparseMomentum


def toy(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(256, 16)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        y = teacher(x)
    return model, x, y


def layers_of(model):
    return {"0": model[0], "2": model[2]}


@pytest.mark.parametrize("granularity", [Granularity("element"), Granularity("block", (4, 1))])
def test_one_step_moves_only_active_units_by_their_gradient_and_decays_all(granularity):
    model, x, y = toy()
    layers = layers_of(model)
    opt = GlobalSparseMomentum(model, layers, granularity, sparsity=0.75, lr=0.1, momentum=0.0, weight_decay=0.01)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    nn.functional.mse_loss(model(x), y).backward()
    grads = {n: m.weight.grad.clone() for n, m in layers.items()}
    opt.step()
    kept = sum(float(m.sum()) for m in opt.active.values())
    total = sum(m.numel() for m in opt.active.values())
    assert kept / total == pytest.approx(0.25, abs=4 / total)  # one global budget
    for name, layer in layers.items():
        active = opt.active[name]
        assert set(granularity.scores(active).flatten().tolist()) <= {0.0, float(granularity.unit_size(active))}
        expected = before[name] - 0.1 * (0.01 * before[name] + active * grads[name])
        torch.testing.assert_close(layer.weight.detach(), expected)
    # the active units are the top |w * grad| units over both layers
    scores = {n: granularity.scores((before[n] * grads[n]).abs()) / granularity.unit_size(before[n]) for n in layers}
    active_scores = torch.cat([scores[n][granularity.scores(opt.active[n]) > 0] for n in layers])
    inactive_scores = torch.cat([scores[n][granularity.scores(opt.active[n]) == 0] for n in layers])
    assert float(active_scores.min()) >= float(inactive_scores.max()) - 1e-7


def test_training_with_gsm_leaves_a_model_that_survives_the_cut():
    model, x, y = toy(1)
    layers = layers_of(model)
    opt = GlobalSparseMomentum(model, layers, Granularity("element"), sparsity=0.8, lr=0.05, momentum=0.9,
                               weight_decay=0.02)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss_before = float(nn.functional.mse_loss(model(x), y))
        masks = opt.final_masks()
        inactive = torch.cat([layers[n].weight[masks[n] == 0].abs() for n in layers])
        active = torch.cat([layers[n].weight[masks[n] > 0].abs() for n in layers])
        assert float(inactive.mean()) < 0.05 * float(active.mean())  # decayed towards zero
        for n, layer in layers.items():
            layer.weight.mul_(masks[n])
        loss_after = float(nn.functional.mse_loss(model(x), y))
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    assert zeros / sum(layer.weight.numel() for layer in layers.values()) == pytest.approx(0.8, abs=0.01)
    assert loss_after < 1.1 * loss_before + 1e-4


def test_gsm_refuses_what_it_cannot_do():
    model, _, _ = toy()
    with pytest.raises(ValueError, match="not filters"):
        GlobalSparseMomentum(model, layers_of(model), Granularity("filter"), 0.5, lr=0.1)
    with pytest.raises(ValueError, match="out of range"):
        GlobalSparseMomentum(model, layers_of(model), Granularity("element"), 1.0, lr=0.1)
