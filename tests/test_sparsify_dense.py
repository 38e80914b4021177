"""The dense -> BSR rewrite: structure of the rewritten module, decisions, and numerical
equality with onnxruntime."""

import json
import shutil

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner
from torch import nn
from tvm import relax

from prune2tvm.cli import cli
from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions, simd_lanes, sparsify_module
from prune2tvm.compile.frontend import import_onnx
from prune2tvm.config import load_target
from prune2tvm.onnxrt import session


class Mixed(nn.Module):
    """3x3 conv, depthwise conv, 1x1 conv with a residual add, then two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y + self.pw(torch.relu(self.dw(y)))
        y = torch.relu(self.fc1(y.flatten(1)))
        return self.head(torch.relu(self.fc2(y)))


def prune_blocks(layer: nn.Linear, block: int, sparsity: float, seed: int) -> None:
    n, k = layer.weight.shape
    keep = torch.rand(n // block, k, generator=torch.Generator().manual_seed(seed)) >= sparsity
    with torch.no_grad():
        layer.weight.mul_(keep.repeat_interleave(block, 0))


@pytest.fixture(scope="module")
def mixed_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = Mixed().eval()
    prune_blocks(model.fc1, 4, 0.8, 1)
    prune_blocks(model.fc2, 4, 0.6, 2)
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    torch.onnx.export(model, torch.randn(2, 4, 4, 4), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def ops_in(func: relax.Function) -> list[str]:
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(func.body, visit)
    return names


def test_rewrite_replaces_sparse_matmuls_with_bsr_kernel_calls(mixed_onnx):
    target = load_target("x86")
    mod = import_onnx(mixed_onnx, {"input": [2, 4, 4, 4]})
    assert ops_in(mod["main"]).count("relax.matmul") == 3
    new, decisions = sparsify_module(mod, mixed_onnx, target, SparsifyOptions((4, 1), 0.5, dense_kernel="tvm"))
    assert [(d.name, d.kind) for d in decisions if d.op == "conv2d"] == [
        ("conv.weight", "dense"), ("dw.weight", "dense"), ("pw.weight", "dense")]  # not pruned in this model
    decisions = [d for d in decisions if d.op == "dense"]
    assert [(d.name, d.kind) for d in decisions] == [("fc1.weight", "bsr"), ("fc2.weight", "bsr"), ("head.weight", "dense")]
    assert decisions[0].block_sparsity == pytest.approx(0.8, abs=0.05)
    assert decisions[2].reason == "[10, 12] does not divide into 4x1 blocks; left dense"
    ops, before = ops_in(new["main"]), ops_in(mod["main"])
    assert ops.count("relax.matmul") == 1 and ops.count("relax.call_tir") == 3  # fc1, fc2 and the depthwise conv
    # fc1's and fc2's bias adds and ReLUs are folded into their kernels
    assert [d.reason.split("; ", 1)[1] for d in decisions[:2]] == ["bias fused; relu fused"] * 2
    # (and the depthwise conv's: three of each gone)
    assert before.count("relax.add") - ops.count("relax.add") == 3
    assert before.count("relax.nn.relu") - ops.count("relax.nn.relu") == 3
    assert ops.count("relax.nn.conv2d") == 2  # unpruned convs stay TVM's; the depthwise one is prune2tvm's kernel
    kernels = [f for f in new.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 3 and all(f.attrs["tirx.is_scheduled"] for f in kernels)
    calls = []
    relax.analysis.post_order_visit(new["main"].body, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" else None)
    calls = [call for call in calls if "bsr_matmul" in call.args[0].name_hint]
    arg_shapes = [[[int(d) for d in a.ty.shape] for a in call.args[1].fields] for call in calls]
    assert [shapes[0] for shapes in arg_shapes] == [[2, 128], [2, 64]]  # activations
    assert arg_shapes[1][1][1:] == [4, 1] and arg_shapes[1][3] == [12 // 4 + 1]  # fc2: the kept 4x1 blocks, indptr
    if simd_lanes(target) == 16:  # fc1, 2 rows of 4x1 blocks on AVX-512: the windowed layout, 16 outputs a slot
        assert arg_shapes[0][1][1:] == [16]  # (fc2's 12 outputs are not whole vectors of 16)
        assert arg_shapes[0][3] == [64 // 16 + 1]  # slot pointers: one entry per group of 16 outputs, plus one
    else:
        assert arg_shapes[0][1][1:] == [4, 1] and arg_shapes[0][3] == [64 // 4 + 1]
    assert arg_shapes[0][4] == [64]  # the fused bias


def test_nothing_sparse_enough_leaves_the_module_as_it_was(mixed_onnx):
    mod = import_onnx(mixed_onnx, {"input": [2, 4, 4, 4]})
    new, decisions = sparsify_module(mod, mixed_onnx, load_target("x86"),
                                     SparsifyOptions((4, 1), 0.95, dense_kernel="tvm"))
    decisions = [d for d in decisions if d.op == "dense"]
    # no BSR kernel: every matmul is still there (only the depthwise conv became prune2tvm's kernel)
    kernels = [g.name_hint for g, f in new.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and kernels[0].startswith("depthwise_conv2d")
    assert ops_in(new["main"]).count("relax.matmul") == ops_in(mod["main"]).count("relax.matmul") == 3
    assert all(d.kind == "dense" for d in decisions)
    assert decisions[0].reason.startswith("block sparsity 0.") and "< threshold 0.95" in decisions[0].reason


@pytest.mark.parametrize("batch, block", [(1, (4, 1)), (2, (4, 1)), (9, (4, 1)),  # AVX-512: fc1 windowed up to 4 rows
                                          (1, (1, 1))])
def test_rewritten_model_matches_onnxruntime(mixed_onnx, batch, block):
    compiled = compile_onnx(mixed_onnx, load_target("x86"), {"input": [batch, 4, 4, 4]},
                            sparsify=SparsifyOptions(block, 0.5))
    dense_layers = [d["kind"] for d in compiled.info.layers if d["op"] == "dense"]
    assert compiled.info.verified and dense_layers == ["bsr", "bsr", "dense"]
    x = np.random.default_rng(batch).standard_normal((batch, 4, 4, 4)).astype(np.float32)
    expected = session(mixed_onnx).run(None, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-5)


class Tokens(nn.Module):
    """A transformer-like block: 3-D activations, and an activation x activation product."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return h @ h.transpose(1, 2)


def test_batched_3d_activations_and_non_constant_weights(tmp_path):
    torch.manual_seed(0)
    model = Tokens().eval()
    prune_blocks(model.up, 8, 0.9, 3)
    prune_blocks(model.down, 8, 0.7, 4)
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(model, torch.randn(1, 16, 32), str(path), dynamo=False, opset_version=17, input_names=["input"])
    compiled = compile_onnx(path, load_target("x86"), {"input": [1, 16, 32]}, sparsify=SparsifyOptions((8, 1), 0.5))
    kinds = [(d["kind"], d["reason"].split(";")[0]) for d in compiled.info.layers]
    assert kinds[:2] == [("bsr", kinds[0][1]), ("bsr", kinds[1][1])]
    assert kinds[2] == ("dense", "two activations (e.g. attention): prune2tvm's batched matmul kernel")
    x = np.random.default_rng(0).standard_normal((1, 16, 32)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed, so CUDA kernels cannot be compiled here")
def test_cuda_build_of_a_bsr_model(mixed_onnx, tmp_path):
    compiled = compile_onnx(mixed_onnx, load_target("cuda"), {"input": [1, 4, 4, 4]}, sparsify=SparsifyOptions((4, 1), 0.5))
    assert [d["kind"] for d in compiled.info.layers if d["op"] == "dense"] == ["bsr", "bsr", "dense"]
    assert compiled.info.device_code == "generated CUDA source compiled with nvcc for sm_80"
    compiled.save(tmp_path / "cuda")
    assert (tmp_path / "cuda" / "model.so").stat().st_size > 0


def test_compile_cli_prints_the_layer_table(mixed_onnx, tmp_path):
    result = CliRunner().invoke(cli, ["compile", str(mixed_onnx), "--bsr", "4", "--sparsity", "0.5",
                                      "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| fc") or line.startswith("| head")]
    assert len(rows) == 3
    assert "| BSR |" in rows[0] and "| BSR |" in rows[1] and "| DENSE |" in rows[2]
    assert "verified against onnxruntime" in result.output


@pytest.mark.parametrize("args, message", [
    (["--bsr", "0"], "--bsr 0 is not a valid block size"),
    (["--bsr", "4", "--bsc", "-1"], "--bsc -1 is not a valid block size"),
    (["--bsc", "2"], "--bsc needs --bsr"),
    (["--bsr", "4", "--sparsity", "1.5"], "--sparsity 1.5 is not valid; valid: a number in [0, 1] or auto"),
    (["--bsr", "4", "--sparsity", "lots"], "--sparsity lots is not valid"),
    # without --bsr a threshold would be ignored: the user meant a sparse build
    (["--sparsity", "0.7"], "--sparsity 0.7 needs --bsr (the block rows); e.g. --bsr 4 --sparsity 0.7"),
    (["--sparsity", "1.5"], "--sparsity 1.5 is not valid"),
])
def test_compile_cli_refuses_bad_block_options(mixed_onnx, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["compile", str(mixed_onnx), *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_bert_style_encoder_with_bsr_linear_layers_matches_onnxruntime(tmp_path):
    from prune2tvm.models import build_model
    from prune2tvm.prune.blocks import prune_blocks_one_shot

    torch.manual_seed(0)
    model = build_model("bert_tiny", (16, 32), 3).eval()
    prune_blocks_one_shot(model, (4, 1), 0.8)
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, torch.randn(1, 16, 32), str(path), dynamo=False, opset_version=17, input_names=["input"])
    compiled = compile_onnx(path, load_target("x86"), {"input": [1, 16, 32]}, sparsify=SparsifyOptions((4, 1), 0.5))
    decisions = [(d["kind"], d["reason"]) for d in compiled.info.layers]
    assert [k for k, _ in decisions].count("bsr") == 12  # 6 projections per layer x 2 layers
    assert sum("batched matmul kernel" in r for _, r in decisions) == 4  # q @ k^T and scores @ v, per layer
    assert ("dense", "[3, 32] does not divide into 4x1 blocks; left dense") in decisions  # the classifier
    x = np.random.default_rng(0).standard_normal((1, 16, 32)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_layers_left_dense_run_the_packed_kernel_unless_told_tvm(mixed_onnx, tmp_path):
    """On CPUs, a constant-weight layer that stays dense runs prune2tvm's packed kernel (every
    block stored): untuned, it is within about 1.3x of onnxruntime, TVM's own op 50-100x
    slower. Layers no panel shape divides, and ``--dense-kernel tvm``, keep TVM's op."""
    mod = import_onnx(mixed_onnx, {"input": [2, 4, 4, 4]})
    target = load_target("x86")
    packed, decisions = sparsify_module(mod, mixed_onnx, target, SparsifyOptions((4, 1), 0.95))
    assert [(d.name, d.kind) for d in decisions] == [(name, "dense") for name in (
        "conv.weight", "dw.weight", "pw.weight", "fc1.weight", "fc2.weight", "head.weight")]
    packed_layers = [d.name for d in decisions if "runs prune2tvm's packed dense kernel" in d.reason]
    assert packed_layers == ["conv.weight", "pw.weight", "fc1.weight", "fc2.weight"]
    assert decisions[3].reason.startswith("block sparsity 0.79") and "(16x1 panels)" in decisions[3].reason  # 2 rows
    assert "(8x1 panels)" in decisions[0].reason  # a conv: many rows (pixels)
    ops = ops_in(packed["main"])
    assert ops.count("relax.matmul") == 1 and ops.count("relax.nn.conv2d") == 0  # only head [10, 12] is TVM's
    stored = [call.args[1].fields[1] for call in _call_tirs(packed["main"]) if "bsr_matmul" in call.args[0].name_hint]
    assert [int(s.ty.shape[0]) for s in stored] == [64 // 16 * 128, 12 // 4 * 64]  # every block, zero ones included
    tvm_only, _ = sparsify_module(mod, mixed_onnx, target, SparsifyOptions((4, 1), 0.95, dense_kernel="tvm"))
    assert ops_in(tvm_only["main"]).count("relax.matmul") == 3

    # the dense build (no --bsr) packs too, by default, and matches onnxruntime
    result = CliRunner().invoke(cli, ["compile", str(mixed_onnx), "-b", "3", "-o", str(tmp_path / "packed")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dense build (no --bsr); runs prune2tvm's packed dense kernel" in result.output
    result = CliRunner().invoke(cli, ["compile", str(mixed_onnx), "--dense-kernel", "tvm", "-o", str(tmp_path / "tvm")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "packed" not in result.output and not json.loads((tmp_path / "tvm" / "manifest.json").read_text())["layers"]
    x = np.random.default_rng(0).standard_normal((3, 4, 4, 4)).astype(np.float32)
    compiled = compile_onnx(mixed_onnx, target, {"input": [3, 4, 4, 4]}, sparsify=SparsifyOptions(bsr=False))
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(mixed_onnx).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)
    result = CliRunner().invoke(cli, ["compile", str(mixed_onnx), "--sparsity", "auto", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--sparsity auto needs --bsr" in result.output
    assert not (tmp_path / "x").exists()


def _call_tirs(func: relax.Function) -> list[relax.Call]:
    calls = []
    relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" else None)
    return calls
