"""Filter pruning with thinning: coupled layers thinned together, the thinned model smaller
and equal to the masked one, and the removal re-applicable to a fresh model."""

import pytest
import torch
from torch import nn

from prune2tvm.errors import InputError
from prune2tvm.prune.filters import CRITERIA, thin_filters
from prune2tvm.prune.plan import PruningPlan
from test_granularity import trained_net


class Branches(nn.Module):
    """Two conv branches concatenated, then a conv reading both: the concat couples them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 1)
        self.bn = nn.BatchNorm2d(20)
        self.mix = nn.Conv2d(20, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(torch.relu(self.mix(y)).mean((2, 3)))


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_thinned_model_is_smaller_and_equals_the_masked_one(criterion, scope):
    net = trained_net()
    x = torch.randn(3, 3, 8, 8)
    result = thin_filters(net, x[:1], 0.5, criterion, scope)
    assert result.params[1] < 0.6 * result.params[0] and result.macs[1] < 0.6 * result.macs[0]
    thinned = result.model
    assert thinned.conv2.out_channels == thinned.res.out_channels == thinned.bn2.num_features < 16  # the residual pair
    assert thinned.fc2.out_features == 8  # the logits stay
    assert thinned.fc1.in_features == 4 * thinned.res.out_channels  # behind the flatten
    with torch.no_grad():
        torch.testing.assert_close(thinned(x), result.masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(result.masked(x), net(x))  # something was removed


def test_concatenated_branches_are_thinned_consistently():
    torch.manual_seed(0)
    net = Branches().eval()
    x = torch.randn(2, 3, 6, 6)
    result = thin_filters(net, x[:1], 0.5)
    t = result.model
    assert t.a.out_channels + t.b.out_channels == t.bn.num_features == t.mix.in_channels < 20
    with torch.no_grad():
        torch.testing.assert_close(t(x), result.masked(x), rtol=1e-5, atol=1e-5)


def test_the_plan_thins_a_fresh_model_to_load_the_thinned_weights(tmp_path):
    net = trained_net()
    x = torch.randn(2, 3, 8, 8)
    result = thin_filters(net, x[:1], 0.5, "l2", "global")
    plan = PruningPlan("filter", [], input_shape=[3, 8, 8], thinned=[[n, i] for n, i in result.removed])
    plan.save(tmp_path / "plan.json")
    fresh = trained_net(seed=5)
    PruningPlan.load(tmp_path / "plan.json").apply(fresh)
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), result.model(x))
    other = PruningPlan("filter", [], input_shape=[3, 8, 8], thinned=[["conv1", [99]]])
    with pytest.raises(InputError, match="removes channel 99 of conv1, which has 16"):
        other.apply(trained_net())


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_zoo_models_thin_to_the_masked_function(name):
    """Residual stages (ResNet-20's shortcuts, MobileNet V2's inverted residuals) and depthwise
    convs: every coupled layer loses the same channels."""
    from conftest import zoo_model_with_trained_statistics

    model = zoo_model_with_trained_statistics(name)
    x = torch.randn(2, 3, 32, 32)
    result = thin_filters(model, x[:1], 0.4)
    assert result.params[1] < 0.8 * result.params[0] and result.macs[1] < 0.8 * result.macs[0]
    with torch.no_grad():
        thinned, masked, original = result.model(x), result.masked(x), model(x)
    assert float((thinned - masked).abs().max()) <= 1e-5
    assert float((masked - original).abs().max()) > 1e-3
