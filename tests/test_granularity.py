"""Pruning granularities (element, RxC blocks, filters, channels; per layer or global), 1xN
filter rearrangement applied to the weights, and pruning plans re-applied to fresh models."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from prune2tvm.errors import InputError
from prune2tvm.prune.granularity import Granularity, layer_masks
from prune2tvm.prune.masks import MaskHolder, prunable_layers
from prune2tvm.prune.plan import PruningPlan
from prune2tvm.prune.rearrange import rearrange_filters, trace_chains


class Net(nn.Module):
    """conv-bn-relu -> conv-bn-relu6 -> a residual conv pair -> flatten -> two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.res = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = nn.functional.relu6(self.bn2(self.conv2(y)))
        y = y + self.res(y)
        y = self.pool(y).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


def trained_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for bn in (net.bn1, net.bn2):  # statistics other than the defaults, so a wrong permutation shows
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("granularity", [Granularity("element"), Granularity("block", (4, 1)),
                                         Granularity("block", (2, 3)), Granularity("filter"), Granularity("channel")])
def test_masks_remove_whole_units_at_the_rate_per_layer(granularity):
    torch.manual_seed(1)
    layers = {"conv": nn.Conv2d(6, 8, 3), "fc": nn.Linear(24, 16)}
    masks = layer_masks(layers, granularity, 0.5)
    for name, layer in layers.items():
        mask = masks[name]
        assert mask.shape == layer.weight.shape and float(mask.mean()) == pytest.approx(0.5)
        units = granularity.scores(mask)
        unit = granularity.unit_size(layer.weight)
        assert set(units.flatten().tolist()) <= {0.0, float(unit)}  # all of a unit or none of it
        # what was removed is never stronger than what was kept
        norms = granularity.scores(layer.weight)
        assert float(norms[units == 0].max()) <= float(norms[units > 0].min())


def test_global_scope_ranks_across_layers_by_norm_per_weight():
    torch.manual_seed(2)
    layers = {"weak": nn.Linear(32, 16), "strong": nn.Linear(32, 16)}
    with torch.no_grad():
        layers["strong"].weight.mul_(10)
    masks = layer_masks(layers, Granularity("block", (4, 1)), 0.5, scope="global")
    total = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert total == pytest.approx(0.5, abs=4 / 1024)
    assert float(masks["weak"].mean()) < 0.05 and float(masks["strong"].mean()) > 0.95
    # even at 99 %, every layer keeps a unit
    masks = layer_masks(layers, Granularity("filter"), 0.99, scope="global")
    assert all(float(m.sum()) > 0 for m in masks.values())


def test_rising_masks_only_grow():
    torch.manual_seed(3)
    layer = {"fc": nn.Linear(64, 32)}
    holder = MaskHolder(layer)
    before = None
    for rate in (0.2, 0.5, 0.8):
        holder.set_sparsity(rate, Granularity("block", (4, 1)))
        now = holder.masks["fc"] == 0
        if before is not None:
            assert bool(now[before].all())
        before = now


def test_rearrangement_keeps_the_function_and_makes_the_exported_blocks_contiguous(tmp_path):
    net = trained_net()
    x = torch.randn(4, 3, 8, 8)
    reference = net(x)
    chains, refused = trace_chains(net)
    assert set(chains) == {"conv1", "fc1"}  # conv2 and res feed the residual add; fc2 gives the logits
    assert refused["fc2"] == "its output channels are the model's outputs"
    assert "used more than once" in refused["conv2"] and "add" in refused["res"]
    assert chains["conv1"].norms == ["bn1"] and chains["conv1"].consumer == "conv2"
    orders, skipped = rearrange_filters(net, ["conv1", "conv2", "res", "fc1", "fc2"], x[:1])
    # conv2 and res share the residual's channels: one order for both, ranked by their summed norms
    assert set(orders) == {"conv1", "conv2", "fc1"}
    assert skipped == {"res": "rearranged with conv2 (coupled by a residual add)",
                       "fc2": "its output channels are the model's outputs"}
    assert float((net(x) - reference).detach().abs().max()) <= 1e-5  # same function
    norms = net.conv1.weight.detach().abs().reshape(16, -1).sum(1)
    assert torch.equal(norms, norms.sort(descending=True).values)  # strongest filters first
    pair = sum(m.weight.detach().abs().reshape(16, -1).sum(1) for m in (net.conv2, net.res))
    assert torch.equal(pair, pair.sort(descending=True).values)
    assert not torch.equal(orders["conv1"], torch.arange(16)) and not torch.equal(orders["conv2"], torch.arange(16))

    # 1xN after rearrangement: the exported ONNX weight holds the zero 4x1 blocks in place
    layers = prunable_layers(net, ["conv1", "fc1"])
    holder = MaskHolder(layers)
    holder.set_sparsity(0.75, Granularity("block", (4, 1)))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, x[:1], str(path), dynamo=False, opset_version=17)
    exported = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    conv1 = next(v for k, v in exported.items() if v.shape == (16, 3, 3, 3))
    blocks = np.abs(conv1.reshape(4, 4, 27)).sum(1)  # [16/4 block rows, 27 columns]
    assert (blocks == 0).mean() == pytest.approx(0.75, abs=0.01)
    assert np.array_equal(conv1 == 0, (holder.masks["conv1"] == 0).numpy())


def test_a_plan_reproduces_the_pruned_model_on_a_fresh_one(tmp_path):
    net = trained_net()
    orders, _ = rearrange_filters(net, ["conv1", "conv2", "fc1"], torch.zeros(1, 3, 8, 8))
    holder = MaskHolder(prunable_layers(net, ["conv1", "conv2", "fc1"]))
    holder.set_sparsity(0.5, Granularity("block", (4, 1)), scope="global")
    plan = PruningPlan.from_model(net, holder.masks, Granularity("block", (4, 1)), "1xN", orders, [3, 8, 8])
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "fc1"]
    assert data["layers"][0]["order"] == orders["conv1"].tolist() and data["layers"][1]["order"] == orders["conv2"].tolist()
    assert sum(layer["removed"] for layer in data["layers"]) > 0

    fresh = trained_net()  # the same dense weights, built anew
    masks = PruningPlan.load(tmp_path / "plan.json").apply(fresh)
    for name, param in net.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], param, rtol=0, atol=0, msg=name)
    assert all(torch.equal(masks[n], holder.masks[n]) for n in masks)


def test_a_plan_for_another_model_is_refused_before_anything_changes(tmp_path):
    net = trained_net()
    holder = MaskHolder(prunable_layers(net, ["conv1", "fc1"]))
    holder.set_sparsity(0.5, Granularity("filter"))
    PruningPlan.from_model(net, holder.masks, Granularity("filter"), "filter").save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    data["layers"][0]["shape"] = [32, 3, 3, 3]
    data["layers"][1]["name"] = "fc9"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    fresh = trained_net()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(InputError, match=r"conv1 is \[16, 3, 3, 3\], the plan's \[32, 3, 3, 3\]; no layer fc9"):
        PruningPlan.load(tmp_path / "bad.json").apply(fresh)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    (tmp_path / "trunc.json").write_text((tmp_path / "plan.json").read_text()[:50])
    with pytest.raises(InputError, match="not a pruning plan"):
        PruningPlan.load(tmp_path / "trunc.json")


def test_indivisible_layers_are_skipped_or_padded_as_configured(tmp_path):
    torch.manual_seed(4)
    layer = nn.Linear(30, 10)  # 10 outputs: not a multiple of 4
    skip, pad = Granularity("block", (4, 1)), Granularity("block", (4, 1), pad=True)
    assert "[10, 30] does not divide into 4x1 blocks" in skip.unfit(layer) and pad.unfit(layer) is None
    mask = layer_masks({"fc": layer}, pad, 0.5)["fc"]
    assert mask.shape == (10, 30)
    assert int((pad.scores(mask) == 0).sum()) == 45  # half of the 3 x 30 blocks, the last one 2 rows tall
    for start, end in ((0, 4), (4, 8), (8, 10)):  # each block's rows are all kept or all gone
        rows = mask[start:end]
        assert bool(((rows == 0).all(0) | (rows == 1).all(0)).all())
    plan = PruningPlan.from_model(nn.Sequential(layer), {"0": mask}, pad, "agp")
    plan.save(tmp_path / "plan.json")
    fresh = nn.Sequential(nn.Linear(30, 10))
    masks = PruningPlan.load(tmp_path / "plan.json").apply(fresh)
    assert torch.equal(masks["0"], mask) and bool((fresh[0].weight[mask == 0] == 0).all())


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_rearranging_every_layer_of_residual_zoo_models_keeps_their_function(name):
    """Residual stages share one order per group; MobileNet V2's depthwise convs move with
    the expansion conv before them; the classifier keeps its order."""
    from conftest import zoo_model_with_trained_statistics

    model = zoo_model_with_trained_statistics(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and not (isinstance(m, nn.Conv2d) and m.groups != 1)]
    orders, skipped = rearrange_filters(model, layers, x[:1])
    coupled = [n for n, why in skipped.items() if why.startswith("rearranged with")]
    assert len(orders) >= len(layers) // 2 and coupled  # residual partners rearranged as one
    assert sum(not torch.equal(o, torch.arange(len(o))) for o in orders.values()) >= len(orders) // 2
    with torch.no_grad():
        assert float((model(x) - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
