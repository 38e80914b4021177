"""The conv2d -> BSR rewrite: structure, decisions, and numerical equality with onnxruntime
on a model with 3x3, strided, dilated, 1x1 and depthwise convs and a residual add."""

import dataclasses
import os

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings, strategies as st
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tvm import relax

from conftest import run_kernel

from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions, sparsify_module
from prune2tvm.compile.frontend import import_onnx
from prune2tvm.config import load_target
from prune2tvm.onnxrt import session
from prune2tvm.prune.masks import magnitude_mask


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.odd = nn.Conv2d(32, 10, 1)  # 10 outputs: not divisible by 4

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.down(y))
        y = y + torch.relu(self.dilated(y))
        y = y + self.pw(torch.relu(self.dw(y)))
        return self.odd(y).mean((2, 3))


def prune_conv_blocks(conv: nn.Conv2d, block: int, sparsity: float) -> None:
    """1xN pruning of a conv: N consecutive output channels at one (c, kh, kw), by L1 norm."""
    o = conv.weight.shape[0]
    matrix = conv.weight.detach().reshape(o // block, block, -1)
    norms = matrix.abs().sum(1)  # [O/N, C*KH*KW]
    mask = magnitude_mask(norms, sparsity).repeat_interleave(block, 0)
    with torch.no_grad():
        conv.weight.mul_(mask.reshape_as(conv.weight))


def called(mod) -> list[str]:
    """Op names in main, and for each call_tir its kernel's name (without a numeric suffix)."""
    ops = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            ops.append(e.args[0].name_hint.rstrip("0123456789") if e.op.name == "relax.call_tir" else e.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return ops


@pytest.fixture(scope="module")
def convnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = ConvNet().eval()
    for conv, sparsity in ((model.stem, 0.5), (model.down, 0.7), (model.dilated, 0.8), (model.pw, 0.9),
                           (model.dw, 0.0)):
        if conv.groups == 1:
            prune_conv_blocks(conv, 4, sparsity)
    with torch.no_grad():
        model.dw.weight.mul_((torch.rand_like(model.dw.weight) > 0.8).float())
    path = tmp_path_factory.mktemp("convnet") / "convnet.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 15, 13), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}})
    return path


def test_conv_decisions_and_structure(convnet_onnx):
    mod = import_onnx(convnet_onnx, {"input": [2, 3, 15, 13]})
    new, decisions = sparsify_module(mod, convnet_onnx, load_target("x86"), SparsifyOptions((4, 1), 0.5))
    table = {d.name: d for d in decisions}
    assert [d.name for d in decisions] == ["stem.weight", "down.weight", "dilated.weight", "dw.weight", "pw.weight",
                                           "odd.weight"]
    assert [table[n].kind for n in ("stem.weight", "down.weight", "dilated.weight", "pw.weight")] == ["bsr"] * 4
    assert table["pw.weight"].block_sparsity == pytest.approx(0.9, abs=0.01)
    assert table["dw.weight"].kind == "dense" and table["dw.weight"].reason == \
        "depthwise conv (groups=32): dense, prune2tvm's depthwise kernel; bias fused; relu fused"
    assert table["odd.weight"].reason == "[10, 32] does not divide into 4x1 blocks; left dense"
    # y + pw(...): the shortcut is added in pw's store; y + relu(dilated(y)): after the ReLU, not fused
    assert table["pw.weight"].reason.endswith("; bias fused; residual add fused")
    assert table["dilated.weight"].reason.endswith("; relu fused")
    ops = called(new)
    assert ops.count("relax.nn.conv2d") == 1 and ops.count("bsr_conv2d") == 4  # "odd" stays TVM's conv
    assert ops.count("depthwise_conv2d") == 1
    assert ops.count("pad_flat") == 2  # the padded stride-1 BSR convs; 1x1 needs none, depthwise pads as it reads
    assert ops.count("pad_phases") == 1  # the stride-2 conv reads its input split into stride phases
    assert ops.count("relax.add") == 2  # the residual add after a ReLU, and the bias of the dense "odd" conv


@pytest.mark.parametrize("batch", [1, 2])
def test_conv_bsr_model_matches_onnxruntime(convnet_onnx, batch):
    compiled = compile_onnx(convnet_onnx, load_target("x86"), {"input": [batch, 3, 15, 13]},
                            sparsify=SparsifyOptions((4, 1), 0.5))
    assert compiled.info.verified
    assert sum(d["kind"] == "bsr" for d in compiled.info.layers) == 4
    x = np.random.default_rng(batch).standard_normal((batch, 3, 15, 13)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(convnet_onnx).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [(1, 1), (8, 1), (2, 3)])
def test_other_block_shapes_match_onnxruntime(convnet_onnx, block):
    compiled = compile_onnx(convnet_onnx, load_target("x86"), {"input": [1, 3, 15, 13]},
                            sparsify=SparsifyOptions(block, 0.0))
    assert compiled.info.verified
    assert any(d["kind"] == "bsr" and d["op"] == "conv2d" for d in compiled.info.layers)


def test_rows_wider_than_a_vector_and_not_a_multiple_of_it(convnet_onnx):
    """Width 37 with 16-lane vectors (stem: columns 0, 16 and 21; stride-2 convs: 19 wide): the
    last vector of a row overlaps the one before it rather than reading past the row, so
    the 1x1 convs take their input unpadded."""
    compiled = compile_onnx(convnet_onnx, load_target("x86"), {"input": [1, 3, 15, 37]},
                            sparsify=SparsifyOptions((4, 1), 0.5))
    assert compiled.info.verified and sum(d["kind"] == "bsr" for d in compiled.info.layers) == 4
    x = np.random.default_rng(7).standard_normal((1, 3, 15, 37)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(convnet_onnx).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)
    mod = import_onnx(convnet_onnx, {"input": [1, 3, 15, 37]})

    def padded_inputs(target):
        new, _ = sparsify_module(mod, convnet_onnx, target, SparsifyOptions((4, 1), 0.5))
        assert called(new).count("pad_flat") + called(new).count("pad_phases") == 3  # only the padded or strided convs
        flat = []
        relax.analysis.post_order_visit(new["main"].body, lambda e: flat.append([int(d) for d in e.ty.shape]) if (
            isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir"
            and e.args[0].name_hint.startswith("pad_flat")) else None)
        return flat

    # on an Intel CPU the two padded stride-1 convs (37 and 19 wide) run over wrapped rows:
    # padded in height only, with guards of one (stem) and two (dilated) elements on each side
    intel = load_target("x86-avx512")
    assert padded_inputs(intel) == [[1, 1 + 3 * 17 * 37 + 1], [1, 2 + 32 * 12 * 19 + 2]]
    # on AMD Zen, 4x1 blocks go row by row (2x faster there): padded on every side
    zen = dataclasses.replace(intel, tvm={"kind": "llvm", "mcpu": "znver5"})
    assert padded_inputs(zen) == [[1, 3 * 17 * 39], [1, 32 * 12 * 23]]


def test_conv_kernels_are_tunable_and_right_with_every_tiling(convnet_onnx, tmp_path):
    """Each BSR conv exposes its search space to the BSR tuner; the model stays equal to
    onnxruntime whichever candidate a record picks."""
    from types import SimpleNamespace

    import tvm_ffi

    from prune2tvm.compile.bsr_tune import BsrRecords, tune_bsr_kernels
    from prune2tvm.compile.build import prepare_module

    target, shapes, options = load_target("x86"), {"input": [1, 3, 15, 37]}, SparsifyOptions((4, 1), 0.5)
    specs = [s for s in prepare_module(convnet_onnx, target, shapes, options).bsr_kernels
             if s.layer.startswith("conv2d")]
    assert len(specs) == 4 and all(len(s.space) >= 2 for s in specs)
    records = BsrRecords.open(tmp_path)
    reports = tune_bsr_kernels(specs, target, records)
    assert [r.status for r in reports] == ["tuned"] * 4 and all(r.best_us <= r.default_us for r in reports)
    kernels = []
    for params in ({"vectors_per_task": 1}, {"vectors_per_task": 2}):
        for spec in specs:
            records.add(spec.key, {"params": params})
        prepared = prepare_module(convnet_onnx, target, shapes, options, database=SimpleNamespace(path=tmp_path))
        kernels.append({name.name_hint: tvm_ffi.structural_hash(f) for name, f in prepared.mod.functions.items()
                        if isinstance(f, tvm.tirx.PrimFunc) and name.name_hint.startswith("bsr_conv2d")})
        compiled = compile_onnx(convnet_onnx, target, shapes, sparsify=options, prepared=prepared)
        assert compiled.info.verified
    assert len(kernels[0]) == 4 and kernels[0] != kernels[1]  # the records were applied


class Clamped(nn.Module):
    """MobileNet V2's ReLU6 after a 1x1 conv, a ReLU then clamp(max=6) (two ops, one clamp),
    a Hardtanh, and a clamp by a tensor (not a scalar: stays an op)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 16)
        self.tail = nn.Conv2d(16, 16, 1)
        self.register_buffer("ceiling", torch.linspace(0.1, 2.0, 16).reshape(1, 16, 1, 1))

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = torch.clamp(torch.relu(self.project(y)), max=6.0)
        y = nn.functional.hardtanh(self.fc(y.permute(0, 2, 3, 1)), -0.5, 0.5).permute(0, 3, 1, 2)
        return torch.minimum(self.tail(y), self.ceiling)


def test_relu6_and_other_clamps_fuse_into_the_kernels(tmp_path):
    torch.manual_seed(0)
    model = Clamped().eval()
    for conv in (model.expand, model.project, model.tail):
        prune_conv_blocks(conv, 4, 0.75)
    with torch.no_grad():
        model.fc.weight.mul_(magnitude_mask(model.fc.weight.reshape(4, 4, 16).abs().sum(1), 0.75)
                             .repeat_interleave(4, 0))
    path = tmp_path / "clamped.onnx"
    torch.onnx.export(model, torch.randn(1, 8, 5, 6), str(path), dynamo=False, opset_version=17,
                      input_names=["input"])
    mod = import_onnx(path, {"input": [1, 8, 5, 6]})
    new, decisions = sparsify_module(mod, path, load_target("x86"), SparsifyOptions((4, 1), 0.5))
    # torch names the 4-D MatMul's weight onnx::MatMul_N
    reasons = {d.name if d.op == "conv2d" else "fc": d.reason.split("; ", 1)[1] for d in decisions}
    assert reasons == {"expand.weight": "bias fused; clip[0, 6] fused", "project.weight": "bias fused; clip[0, 6] fused",
                       "fc": "bias fused; clip[-0.5, 0.5] fused", "tail.weight": "bias fused"}
    ops = called(new)
    assert ops.count("bsr_conv2d") == 3 and ops.count("bsr_matmul") == 1
    # ONNX's Clip arrives as TE maximum and minimum kernels: none is left, nor the ReLU
    assert not {"maximum", "minimum", "relax.nn.relu"} & set(ops)
    assert ops.count("relax.min") == 1  # the clamp by a tensor stays
    compiled = compile_onnx(path, load_target("x86"), {"input": [1, 8, 5, 6]}, sparsify=SparsifyOptions((4, 1), 0.5))
    assert compiled.info.verified
    x = np.random.default_rng(3).standard_normal((1, 8, 5, 6)).astype(np.float32) * 4
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c, o, k, stride, pads, dilation, size", [
    (3, 8, 7, 2, (3, 3, 3, 3), 1, (23, 29)),   # a ResNet stem, odd sizes
    (16, 32, 1, 2, (0, 0, 0, 0), 1, (14, 14)),  # a projection shortcut: one phase, flattened pixels
    (8, 8, 3, 2, (1, 1, 1, 1), 2, (17, 19)),   # dilation 2 with stride 2: even taps only
    (4, 8, 3, 3, (1, 1, 1, 1), 1, (20, 22)),   # stride 3
    (4, 8, 3, 2, (0, 0, 1, 1), 1, (16, 16)),   # padding on one side only
])
def test_strided_convs_read_stride_phases_and_match_onnxruntime(tmp_path, c, o, k, stride, pads, dilation, size):
    rng = np.random.default_rng(k * 10 + stride)
    keep = rng.random((o // 4, c * k * k)) >= 0.5
    w = rng.standard_normal((o, c * k * k)).astype(np.float32) * np.repeat(keep, 4, 0)
    out = [(n + pads[i] + pads[i + 2] - dilation * (k - 1) - 1) // stride + 1 for i, n in enumerate(size)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], pads=list(pads), kernel_shape=[k, k],
                          strides=[stride, stride], dilations=[dilation, dilation])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, *size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, o, *out])],
        [numpy_helper.from_array(w.reshape(o, c, k, k), "w")])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = compile_onnx(path, load_target("x86"), {"input": [1, c, *size]}, sparsify=SparsifyOptions((4, 1), 0.3))
    assert compiled.info.verified and compiled.info.layers[0]["kind"] == "bsr"
    x = rng.standard_normal((1, c, *size)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-4)
    mod = import_onnx(path, {"input": [1, c, *size]})
    new, _ = sparsify_module(mod, path, load_target("x86"), SparsifyOptions((4, 1), 0.3))
    assert called(new).count("pad_phases") == 1 and "pad_flat" not in called(new)


class BasicBlock(nn.Module):
    """ResNet's residual block: two 3x3 convs, the second one's output plus the shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@pytest.mark.parametrize("size", [(7, 7), (14, 9), (5, 21)])
def test_narrow_images_use_virtual_rows_with_the_residual_fused(tmp_path, size):
    """Widths under a vector: 3x3 convs run over rows of the padded pitch (the columns
    between rows computed, never stored), the shortcut and ReLU in the second conv's store."""
    from prune2tvm.export import export_onnx

    torch.manual_seed(0)
    model = BasicBlock(8).eval()
    for conv in (model.conv1, model.conv2):
        prune_conv_blocks(conv, 4, 0.5)
    x = np.random.default_rng(1).standard_normal((1, 8, *size)).astype(np.float32)
    onnx_model = export_onnx(model, (8, *size), tmp_path / "block.onnx", 17, x)
    compiled = compile_onnx(onnx_model.path, load_target("x86"), {"input": [1, 8, *size]},
                            sparsify=SparsifyOptions((4, 1), 0.4))
    assert compiled.info.verified and [d["kind"] for d in compiled.info.layers] == ["bsr", "bsr"]
    assert compiled.info.layers[1]["reason"].endswith("; bias fused; residual add fused; relu fused")
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(onnx_model.path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


@settings(max_examples=int(os.environ.get("PRUNE2TVM_EXAMPLES", 8)), deadline=None)
@given(c=st.integers(1, 12), ob=st.integers(1, 4), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       pad=st.integers(0, 1), dilation=st.sampled_from([1, 2]), h=st.integers(3, 12), w=st.integers(3, 12),
       block=st.sampled_from([1, 2, 4, 8]), sparsity=st.floats(0.0, 1.0), batch=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_random_block_sparse_convs_match_onnxruntime(tmp_path_factory, c, ob, k, stride, pad, dilation, h, w, block,
                                                      sparsity, batch, seed):
    """A property over conv shapes, strides, paddings, dilations, blocks and sparsities
    (all-zero and dense included): the BSR build gives onnxruntime's result."""
    o = ob * block
    assume(h + 2 * pad >= dilation * (k - 1) + 1 and w + 2 * pad >= dilation * (k - 1) + 1)
    rng = np.random.default_rng(seed)
    keep = rng.random((ob, c * k * k)) >= sparsity
    weight = rng.standard_normal((o, c * k * k)).astype(np.float32) * np.repeat(keep, block, 0)
    out_hw = [(n + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for n in (h, w)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], pads=[pad] * 4, kernel_shape=[k, k],
                          strides=[stride, stride], dilations=[dilation, dilation])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, o, *out_hw])],
        [numpy_helper.from_array(weight.reshape(o, c, k, k), "w")])
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = compile_onnx(path, load_target("x86"), {"input": [batch, c, h, w]},
                            sparsify=SparsifyOptions((block, 1), 0.0))
    assert compiled.info.layers[0]["kind"] == "bsr", compiled.info.layers[0]
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-4)


class InvertedResidual(nn.Module):
    """MobileNet V2's ``x + conv(x)`` where x is itself a (linear) conv's output: both operands
    of the add are BSR convs, and the shortcut's conv has another reader."""

    def __init__(self):
        super().__init__()
        self.project_in = nn.Conv2d(8, 16, 1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        y = self.project_in(x)
        return y + self.project(torch.relu(self.expand(y)))


def test_a_shortcut_computed_by_a_bsr_conv_is_not_computed_twice(tmp_path):
    from prune2tvm.export import export_onnx

    torch.manual_seed(0)
    model = InvertedResidual().eval()
    for conv in (model.project_in, model.expand, model.project):
        prune_conv_blocks(conv, 4, 0.5)
    x = np.random.default_rng(0).standard_normal((1, 8, 14, 14)).astype(np.float32)
    path = export_onnx(model, (8, 14, 14), tmp_path / "inverted.onnx", 17, x).path
    mod = import_onnx(path, {"input": [1, 8, 14, 14]})
    new, decisions = sparsify_module(mod, path, load_target("x86"), SparsifyOptions((4, 1), 0.3))
    # three convs, three kernel calls: the add goes into the store of `project`, whose output
    # only the add reads, not into `project_in`'s, which `expand` reads too
    assert called(new).count("bsr_conv2d") == 3 and "relax.add" not in called(new)
    reasons = {d.name: d.reason for d in decisions}
    assert reasons["project.weight"].endswith("; bias fused; residual add fused")
    assert "residual" not in reasons["project_in.weight"]
    compiled = compile_onnx(path, load_target("x86"), {"input": [1, 8, 14, 14]}, sparsify=SparsifyOptions((4, 1), 0.3))
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n, c, o, h, w, k, pads, dilation, r, sparsity, lanes", [
    (1, 8, 16, 9, 37, (3, 3), (1, 1, 1, 1), 1, 4, 0.5, 16),   # 37 wide: vectors cross rows
    (2, 5, 16, 6, 20, (3, 3), (1, 1, 1, 1), 1, 8, 0.0, 16),   # batch 2, dense 8x1 panels
    (1, 4, 8, 11, 23, (3, 3), (2, 2, 2, 2), 2, 4, 0.6, 16),   # dilation 2: taps two columns off the edge
    (1, 3, 8, 6, 19, (5, 5), (2, 1, 2, 3), 1, 4, 0.3, 16),    # 5x5, one column left and three right
    (1, 70, 32, 5, 17, (3, 3), (1, 1, 1, 1), 1, 8, 0.0, 16),  # 70 channels in two passes (of 42 and 28)
    (1, 6, 8, 7, 7, (3, 3), (1, 1, 1, 1), 1, 4, 0.5, 4),      # 4 lanes (NEON): 7 wide
    (1, 4, 8, 5, 18, (1, 3), (0, 1, 0, 1), 1, 4, 1.0, 16),    # 1x3, no block stored at all
    (1, 4, 8, 2, 17, (3, 3), (1, 1, 1, 1), 1, 4, 0.0, 16),    # two rows: the last vector overlaps
])
def test_wrapped_rows_kernel_matches_numpy(n, c, o, h, w, k, pads, dilation, r, sparsity, lanes):
    """Rows wider than a vector and not a whole number of them, laid end to end: taps that
    fall off a row's edge are masked, whatever the window, dilation, padding on each side,
    channel passes and lanes; with an empty block row, no block at all, the residual and a
    clamp fused. The padding kernel makes the input, guards included."""
    from prune2tvm.compile.kernels.bsr_conv2d import (BsrConv2dShape, bsr_conv2d_cpu, pad_flat_cpu, wrap_columns,
                                                      wrap_passes, wrapped)
    from prune2tvm.compile.kernels.bsr_matmul import Epilogue
    from prune2tvm.sparse import BsrMatrix

    rng = np.random.default_rng(h * w + o)
    top, left, bottom, right = pads
    keep = rng.random((o // r, c * k[0] * k[1])) >= sparsity
    keep[-1] = False  # an empty block row (of two or more)
    assert o // r > 1 or sparsity == 1.0
    weight = rng.standard_normal((o, c * k[0] * k[1])).astype(np.float32) * np.repeat(keep, r, 0)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.from_numpy(x).double(), (left, right, top, bottom)),
        torch.from_numpy(weight.reshape(o, c, *k)).double(), torch.from_numpy(bias).double(),
        dilation=dilation).numpy()
    residual = rng.standard_normal(expected.shape).astype(np.float32)
    bsr = BsrMatrix.from_dense(weight, (r, 1))
    shape = wrapped(BsrConv2dShape(n, c, (h + top + bottom, w + left + right), o, expected.shape[2:], k, (1, 1),
                                   (dilation, dilation), (r, 1), bsr.nnzb), left, right, lanes)
    assert shape is not None and shape.padded == (h + top + bottom, w) and shape.wrap == (left, right)
    assert wrap_passes(shape) == ((42, 2) if c == 70 else (c, 1))
    data, offsets, runs = wrap_columns(shape, *bsr.kernel_arrays())
    flat = run_kernel(pad_flat_cpu(n, c, h, w, (top, 0, bottom, 0), guard=(left, right)), x,
                out_shape=(n, shape.image_size))
    clamped = np.clip(expected + residual, -1, 2)
    for epilogue, res, reference in ((Epilogue(), np.zeros(1, np.float32), expected),
                                     (Epilogue(-1.0, 2.0, residual=True), residual, clamped)):
        got = run_kernel(bsr_conv2d_cpu(shape, lanes, epilogue), flat, data, offsets, runs, res.reshape(-1), bias,
                   out_shape=expected.shape)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_which_convs_run_over_wrapped_rows():
    """Only where row by row would compute part of a vector twice and the kernel can mask the
    edges: stride 1, one-column blocks, output as wide as the input."""
    from prune2tvm.compile.kernels.bsr_conv2d import BsrConv2dShape, wrap_min_rows, wrapped

    def shape(w, k=3, pad=1, stride=1, block=(4, 1), h=20):
        out = [(n + 2 * pad - k) // stride + 1 for n in (h, w)]
        return BsrConv2dShape(1, 8, (h + 2 * pad, w + 2 * pad), 8, tuple(out), (k, k), (stride, stride), (1, 1),
                              block, 10)

    assert wrapped(shape(56), 1, 1) is not None and wrapped(shape(28), 1, 1) is not None
    assert wrapped(shape(56), 1, 1, lanes=8) is None  # 7 whole vectors of 8
    assert wrapped(shape(64), 1, 1) is None  # whole vectors
    assert wrapped(shape(14), 1, 1) is None  # virtual rows
    assert wrapped(shape(56, stride=2), 1, 1) is None  # stride phases
    assert wrapped(shape(56, block=(4, 4)), 1, 1) is None  # a block spans kernel columns
    assert wrapped(shape(56, pad=0), 0, 0) is None  # narrower output than input
    assert wrapped(shape(56, k=1, pad=0), 0, 0) is None  # a 1x1 conv: already one row of pixels
    assert wrapped(shape(56, block=(2, 1)), 1, 1) is None  # 8 vectors per task: more masks than registers
    # on AMD Zen, 4x1 blocks ran 2x slower wrapped: they go row by row there; 8x1 blocks still wrap
    zen = wrap_min_rows("znver5")
    assert wrap_min_rows("emeraldrapids") == 4 and wrapped(shape(56), 1, 1, min_rows=zen) is None
    assert wrapped(shape(56, block=(8, 1)), 1, 1, min_rows=zen) is not None
