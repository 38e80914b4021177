"""The AGP schedule, magnitude masks, and masks holding through fine-tuning."""

import pytest
import torch
from torch import nn

from prune2tvm.prune.agp import AGPSchedule
from prune2tvm.prune.masks import MaskHolder, layer_sparsity, magnitude_mask, overall_sparsity, prunable_layers
from prune2tvm.errors import ConfigError


def test_agp_schedule_follows_the_cubic_formula():
    s = AGPSchedule(initial=0.0, final=0.8, start=0, end=6, frequency=1)
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
    assert s.sparsity(0) == 0.0
    assert s.sparsity(3) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7
    assert s.sparsity(1) == pytest.approx(0.8 * (1 - (5 / 6) ** 3))
    assert s.sparsity(6) == pytest.approx(0.8)
    assert s.sparsity(50) == pytest.approx(0.8)
    values = [s.sparsity(t) for t in range(7)]
    assert values == sorted(values)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps == sorted(steps, reverse=True)  # fast at first, slow near the end


def test_agp_schedule_holds_between_pruning_steps_and_before_start():
    s = AGPSchedule(initial=0.1, final=0.9, start=2, end=10, frequency=4)
    assert s.sparsity(0) == 0.0 and s.sparsity(1) == 0.0
    assert s.sparsity(2) == pytest.approx(0.1)
    assert s.sparsity(5) == pytest.approx(0.1)  # the last pruning step was t=2
    assert s.sparsity(6) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert [t for t in range(12) if s.is_pruning_step(t)] == [2, 6, 10]


def test_agp_schedule_refuses_impossible_settings():
    with pytest.raises(ValueError):
        AGPSchedule(initial=0.0, final=1.0, start=0, end=4, frequency=1)
    with pytest.raises(ValueError):
        AGPSchedule(initial=0.0, final=0.5, start=0, end=5, frequency=2)


def test_magnitude_mask_prunes_exactly_the_smallest():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.05, 1.0]])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    assert int((magnitude_mask(torch.randn(37, 11), 0.8) == 0).sum()) == round(0.8 * 37 * 11)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
])
def test_pruned_weights_stay_exactly_zero_through_many_steps(make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(5):  # build up momentum / moments before pruning
        opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    holder = MaskHolder(prunable_layers(model))
    holder.set_sparsity(0.7)
    holder.apply(opt)
    zero_before = {n: (m.weight == 0).clone() for n, m in holder.layers.items()}
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        holder.mask_gradients()
        opt.step()
        holder.apply(opt)
    for name, layer in holder.layers.items():
        assert torch.equal(layer.weight == 0, zero_before[name]) or bool((layer.weight[zero_before[name]] == 0).all())
        assert bool((layer.weight[zero_before[name]] == 0).all())
        state = opt.state[layer.weight]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:
                assert bool((state[key][zero_before[name]] == 0).all()), key
    stats = layer_sparsity(model)
    assert overall_sparsity(stats) == pytest.approx(0.7, abs=1e-3)


def test_layer_selection_names_the_valid_layers():
    with pytest.raises(ConfigError, match="prune.layers: fc9 matches no conv or linear layer; valid names: 0, 3"):
        prunable_layers(_model(), ["fc9"])


def test_agp_in_optimizer_steps_prunes_mid_epoch_on_schedule():
    """prune.unit: step: masks recomputed every `frequency` optimizer steps; the final
    sparsity holds from step `end_epoch` on, inside the first epoch here."""
    from prune2tvm.config import PruneConfig, TrainConfig
    from prune2tvm.data import load_dataset
    from prune2tvm.errors import ConfigError
    from prune2tvm.models import build_model
    from prune2tvm.prune import agp_prune as module

    data = load_dataset("digits", [0.6, 0.2, 0.2], 0)
    torch.manual_seed(0)
    dense = build_model("mlp", data.input_shape, data.num_classes)
    train = TrainConfig(epochs=1, batch_size=64, lr=0.003)  # 1078 samples: 17 steps an epoch
    prune = PruneConfig(unit="step", sparsities=[0.8], start_epoch=0, end_epoch=12, frequency=4, fine_tune_epochs=2)
    seen = []
    original = MaskHolder.set_sparsity

    def spy(self, sparsity, *args, **kwargs):
        seen.append(round(sparsity, 4))
        return original(self, sparsity, *args, **kwargs)

    MaskHolder.set_sparsity = spy
    try:
        result = module.agp_prune(dense, data, prune, train, 0.8, 0, "step")
    finally:
        MaskHolder.set_sparsity = original
    schedule = AGPSchedule(0.0, 0.8, 0, 12, 4)
    assert seen == [round(schedule.sparsity(t), 4) for t in (0, 4, 8, 12)]  # steps 0, 4, 8 and 12
    assert result.sparsity == pytest.approx(0.8, abs=1e-3) and result.schedule == [0.0, 0.8]
    with pytest.raises(ConfigError, match="step 40 is beyond the 34 steps"):
        module.agp_prune(dense, data, PruneConfig(unit="step", sparsities=[0.8], end_epoch=40, frequency=4,
                                                  fine_tune_epochs=2), train, 0.8, 0, "x")
