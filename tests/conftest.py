import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("PRUNE2TVM_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parent.parent

# A pipeline small enough for tests (an MLP, few epochs), still going through every stage.
TINY_PIPELINE = textwrap.dedent("""\
    version: 1
    name: tiny
    seed: 3
    model: {name: mlp}
    train: {epochs: 6, batch_size: 64, lr: 0.003}
    prune: {sparsities: [0.5, 0.8], start_epoch: 0, end_epoch: 2, frequency: 1, fine_tune_epochs: 4}
    measure: {batch_size: 4, warmup: 2, repeat: 10, rounds: 2}
""")


def run_kernel(func, *arrays, out_shape):
    """Build one PrimFunc for the host and run it on numpy arrays; its output as numpy."""
    import numpy as np
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm").jit()
    out = tvm.runtime.empty(out_shape, "float32")
    lib["main"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays), out)
    return out.numpy()


@pytest.fixture
def tiny_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PIPELINE)
    return path


def write_yaml(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def zoo_model_with_trained_statistics(name: str, shape=(3, 32, 32), classes: int = 10):
    """A zoo model in eval mode whose BatchNorms hold statistics and affine parameters other
    than the defaults, so a wrong permutation or thinning of them shows in the outputs."""
    import torch
    from torch import nn

    from prune2tvm.models import build_model

    torch.manual_seed(0)
    model = build_model(name, shape, classes).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
    return model
