"""The model zoo: every model builds and runs; the ImageNet models have their reference sizes."""

import pytest
import torch

from prune2tvm.models import MODELS, build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "resnet18": (3, 32, 32), "resnet50": (3, 32, 32),
          "mobilenet_v2": (3, 32, 32), "bert_tiny": (16, 32), "bert_base": (8, 768), "lenet_300_100": (1, 28, 28),
          "lenet5": (1, 28, 28), "resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "mobilenet_v1": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_builds_and_runs(name):
    model = build_model(name, SHAPES[name], 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *SHAPES[name]))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, params", [("resnet50", 25_557_032), ("resnet18", 11_689_512),
                                          ("mobilenet_v2", 3_504_872)])
def test_imagenet_models_have_the_reference_parameter_counts(name, params):
    model = build_model(name, (3, 224, 224), 1000)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name, shape, params", [
    ("lenet_300_100", (1, 28, 28), 266_610),  # 784*300+300 + 300*100+100 + 100*10+10
    ("lenet5", (1, 28, 28), 431_080),  # Caffe's LeNet-5
    ("resnet20", (3, 32, 32), 269_722 + 2_752),  # option A's count plus two projection shortcuts (conv + BN)
    ("mobilenet_v1", (3, 224, 224), 4_231_976),
])
def test_classic_models_have_their_reference_sizes(name, shape, params):
    model = build_model(name, shape, 10 if name != "mobilenet_v1" else 1000)
    assert sum(p.numel() for p in model.parameters()) == params


def test_bert_base_has_bert_dimensions():
    model = build_model("bert_base", (128, 768), 2)
    layers = model.layers
    assert len(layers) == 12
    assert layers[0].query.weight.shape == (768, 768) and layers[0].intermediate.weight.shape == (3072, 768)


def test_batchnorm_calibration_lets_a_random_network_see_its_input():
    """A random MobileNet V2 with default batch-norm statistics gives the same logits for every
    input (its classifier's bias), so a latency study could not tell a pruned model from the
    dense one. Calibrated on sample inputs, its output depends on the input."""
    import copy

    from prune2tvm.train import calibrate_batchnorm

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", (3, 64, 64), 100).eval()
    x = torch.randn(12, 3, 64, 64)

    def spread(m):  # how much the logits vary across inputs, relative to their mean
        with torch.no_grad():
            y = m(x)
        return float((y - y.mean(0)).norm(dim=1).mean() / y.mean(0).norm())

    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = spread(model)
    calibrated = copy.deepcopy(model)
    assert calibrate_batchnorm(calibrated, x.numpy(), batch_size=4) == 52
    assert before < 1e-4 and spread(calibrated) > 0.05
    assert not calibrated.training and all(m.momentum == 0.1 for m in calibrated.modules()
                                           if isinstance(m, torch.nn.BatchNorm2d))
    state = calibrated.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # only the statistics moved
