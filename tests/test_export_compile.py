"""Export and compile equivalence: torch == onnxruntime == the TVM build, and saved builds."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from prune2tvm.compile import compile_onnx, load_compiled
from prune2tvm.config import load_target
from prune2tvm.errors import InputError, NumericalMismatchError, UnsupportedError
from prune2tvm.export import export_onnx
from prune2tvm.models import build_model
from prune2tvm.onnxrt import session
from prune2tvm.prune.masks import MaskHolder, prunable_layers

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def pruned_cnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("cnn", SHAPE, 10).eval()
    MaskHolder(prunable_layers(model)).set_sparsity(0.8)
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    check = np.random.default_rng(1).standard_normal((16, *SHAPE)).astype(np.float32)
    result = export_onnx(model, SHAPE, path, 17, check)
    return model, result


def test_export_matches_torch_and_keeps_zeros_and_a_dynamic_batch(pruned_cnn_onnx):
    model, result = pruned_cnn_onnx
    x = np.random.default_rng(2).standard_normal((5, *SHAPE)).astype(np.float32)
    ort_out = session(result.path).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(ort_out, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    graph = onnx.load(result.path).graph
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.dims and len(i.dims) >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)  # sparsity survives export (BN folded into conv)
    assert len(result.sha256) == 64 and result.max_abs_diff < 1e-4
    assert not list(Path(result.path).parent.glob(".*.tmp"))  # no temporary file left behind


def test_compile_matches_onnxruntime_and_saved_build_runs_again(pruned_cnn_onnx, tmp_path):
    _, result = pruned_cnn_onnx
    target = load_target("x86")
    compiled = compile_onnx(result.path, target, {"input": [4, *SHAPE]})
    assert compiled.info.verified
    assert compiled.info.checks and all(c.max_abs_diff <= c.tolerance for c in compiled.info.checks)
    x = np.random.default_rng(3).standard_normal((4, *SHAPE)).astype(np.float32)
    expected = session(result.path).run(None, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-5)

    compiled.save(tmp_path / "build")
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["manifest.json", "model.so"]
    again = load_compiled(tmp_path / "build")
    np.testing.assert_allclose(again.run({"input": x})[0], expected, rtol=1e-4, atol=1e-5)
    assert again.info.inputs[0].shape == [4, 1, 8, 8]
    assert [(o.name, o.shape, o.dtype) for o in again.info.outputs] == [("logits", [4, 10], "float32")]

    with pytest.raises(InputError, match=r"input 'input' is float32\[1, 1, 8, 8\]; the build takes float32\[4, 1, 8, 8\]"):
        again.run({"input": x[:1]})
    with pytest.raises(InputError, match="missing input 'input'"):
        again.run({"x": x})


def test_compile_needs_static_shapes_and_known_input_names(pruned_cnn_onnx):
    _, result = pruned_cnn_onnx
    target = load_target("x86")
    with pytest.raises(InputError, match="dynamic shape"):
        compile_onnx(result.path, target, {})
    with pytest.raises(InputError, match="no input named images; its inputs: input"):
        compile_onnx(result.path, target, {"images": [1, 1, 8, 8]})
    with pytest.raises(InputError, match=r"has shape \[None, 1, 8, 8\] in the model; cannot build it for \[1, 3, 8, 8\]"):
        compile_onnx(result.path, target, {"input": [1, 3, 8, 8]})


def test_a_build_that_disagrees_with_onnxruntime_is_refused(pruned_cnn_onnx, monkeypatch):
    _, result = pruned_cnn_onnx
    from prune2tvm.compile import build

    original = build.CompiledModel.run
    monkeypatch.setattr(build.CompiledModel, "run", lambda self, feeds: [o + 0.5 for o in original(self, feeds)])
    with pytest.raises(NumericalMismatchError, match="disagrees with onnxruntime on random inputs"):
        compile_onnx(result.path, load_target("x86"), {"input": [1, *SHAPE]})


def test_every_unsupported_op_is_listed_at_once(tmp_path):
    node_a = helper.make_node("FrobnicateA", ["x"], ["y"])
    node_b = helper.make_node("FrobnicateB", ["y"], ["z"])
    graph = helper.make_graph([node_a, node_b], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(UnsupportedError, match="does not support these ops: FrobnicateA, FrobnicateB"):
        compile_onnx(path, load_target("x86"), {"x": [1, 4]})


def test_a_cross_target_build_is_not_claimed_verified(pruned_cnn_onnx, tmp_path):
    _, result = pruned_cnn_onnx
    compiled = compile_onnx(result.path, load_target("cuda"), {"input": [1, *SHAPE]})
    assert not compiled.info.verified
    assert "GPU" in compiled.info.not_verified_reason
    with pytest.raises(UnsupportedError, match="cannot run a cuda build here"):
        compiled.run({"input": np.zeros((1, *SHAPE), np.float32)})


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed, so CUDA kernels cannot be compiled here")
def test_cuda_build_compiles_its_kernels_with_nvcc(pruned_cnn_onnx, tmp_path):
    _, result = pruned_cnn_onnx
    compiled = compile_onnx(result.path, load_target("cuda"), {"input": [1, *SHAPE]})
    assert compiled.info.device_code == "generated CUDA source compiled with nvcc for sm_80"
    compiled.save(tmp_path / "cuda")
    assert (tmp_path / "cuda" / "model.so").stat().st_size > 0


def test_fast_math_replaces_erf_and_softmax_and_still_matches_onnxruntime(tmp_path):
    """A GELU (erf) and a softmax, as in a transformer block: with fast_math they become TVM's
    fast approximations, and the build is still within tolerance of onnxruntime."""
    from tvm import relax

    from prune2tvm.compile.build import prepare_module

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return torch.softmax(self.down(torch.nn.functional.gelu(self.up(x))), dim=-1)

    torch.manual_seed(0)
    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), torch.randn(1, 8, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    target, shapes = load_target("x86"), {"input": [1, 8, 16]}

    def ops(mod):
        names = []
        relax.analysis.post_order_visit(mod["main"].body, lambda e: names.append(e.op.name) if isinstance(
            e, relax.Call) and hasattr(e.op, "name") else None)
        return names

    plain, fast = prepare_module(path, target, shapes), prepare_module(path, target, shapes, fast_math=True)
    assert "relax.erf" in ops(plain.mod) and "relax.nn.softmax" in ops(plain.mod)
    assert "relax.erf" not in ops(fast.mod) and "relax.nn.softmax" not in ops(fast.mod)
    compiled = compile_onnx(path, target, shapes, fast_math=True)
    assert compiled.info.verified and compiled.info.fast_math
