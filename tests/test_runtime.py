"""`python -m prune2tvm.runtime`: run a build with the TVM runtime alone, inputs by name."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions
from prune2tvm.config import load_target
from prune2tvm.export import export_onnx
from prune2tvm.models import build_model
from prune2tvm.onnxrt import session
from prune2tvm.prune.masks import MaskHolder, prunable_layers
from prune2tvm.runtime import load


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10).eval()
    MaskHolder(prunable_layers(model)).set_sparsity(0.8)
    check = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    onnx_model = export_onnx(model, (1, 8, 8), tmp / "mlp.onnx", 17, check)
    compiled = compile_onnx(onnx_model.path, load_target("x86"), {"input": [3, 1, 8, 8]},
                            sparsify=SparsifyOptions((1, 1), 0.5))
    compiled.save(tmp / "build")
    return tmp, onnx_model.path


def runtime(*args):
    return subprocess.run([sys.executable, "-m", "prune2tvm.runtime", *map(str, args)], capture_output=True, text=True)


def test_runtime_reproduces_onnxruntime_from_npz_and_npy(build):
    tmp, onnx_path = build
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = session(onnx_path).run(None, {"input": x})[0]
    np.savez(tmp / "in.npz", input=x)
    np.save(tmp / "in.npy", x)
    for inputs, outputs in (("in.npz", "out1.npz"), ("in.npy", "out2.npz")):
        result = runtime(tmp / "build", "--inputs", tmp / inputs, "--outputs", tmp / outputs)
        assert result.returncode == 0, result.stderr
        with np.load(tmp / outputs) as out:
            assert out.files == ["logits"]
            np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(load(tmp / "build")({"input": x})["logits"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_input, message", [
    (lambda p: np.savez(p, input=np.zeros((2, 1, 8, 8), np.float32)), "the build takes float32[3, 1, 8, 8]"),
    (lambda p: np.savez(p, input=np.zeros((3, 1, 8, 8), np.float64)), "is float64[3, 1, 8, 8]"),
    (lambda p: np.savez(p, images=np.zeros((3, 1, 8, 8), np.float32)), "missing input 'input'"),
    (lambda p: np.savez(p, input=np.zeros((3, 1, 8, 8), np.float32), extra=np.zeros(2)), "unknown input 'extra'"),
    (lambda p: np.savez(p, input=np.array([{"a": 1}], dtype=object)), "not a readable numpy file"),
    (lambda p: p.write_bytes(b"garbage"), "not a readable numpy file"),
])
def test_runtime_refuses_bad_inputs_in_one_line(build, make_input, message):
    tmp, _ = build
    path = tmp / "bad.npz"
    make_input(path)
    result = runtime(tmp / "build", "--inputs", path, "--outputs", tmp / "never.npz")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp / "never.npz").exists()


def test_runtime_keeps_existing_outputs_without_force_and_needs_a_build(build, tmp_path):
    tmp, _ = build
    np.savez(tmp_path / "in.npz", input=np.zeros((3, 1, 8, 8), np.float32))
    (tmp_path / "out.npz").write_bytes(b"keep me")
    result = runtime(tmp / "build", "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (tmp_path / "out.npz").read_bytes() == b"keep me"
    result = runtime(tmp_path, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz")
    assert result.returncode == 2 and "not a compiled model directory (compile.json is missing)" in result.stderr
