"""prune2tvm's dense depthwise conv kernel: against numpy on the shapes that break naive
kernels (rows narrower than a vector, not a multiple of one, strides, dilation, padding on
one side), and in a model with its bias add and ReLU6 fused."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_kernel

from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions
from prune2tvm.compile.kernels.bsr_matmul import Epilogue
from prune2tvm.compile.kernels.depthwise_conv2d import DepthwiseShape, depthwise_conv2d_cpu, depthwise_reference
from prune2tvm.config import load_target
from prune2tvm.export import export_onnx
from prune2tvm.onnxrt import session


@pytest.mark.parametrize("n, c, h, w, k, stride, pads, dilation", [
    (1, 8, 15, 37, 3, 1, (1, 1, 1, 1), 1),   # 37 wide: vectors at 0, 16 and 21 (the last overlaps)
    (2, 4, 9, 20, 3, 2, (1, 1, 1, 1), 1),    # stride 2, batch 2
    (1, 3, 7, 7, 5, 1, (2, 2, 2, 2), 1),     # 5x5 on 7x7: a row narrower than a vector
    (1, 4, 12, 12, 3, 1, (2, 2, 2, 2), 2),   # dilation 2
    (1, 2, 6, 5, 3, 2, (0, 0, 1, 1), 1),     # padding on one side only (as TF-style "same")
    (1, 2, 17, 3, 3, 1, (0, 0, 0, 0), 1),    # no padding, one output column
    (1, 2, 4, 2, 3, 1, (1, 1, 1, 1), 1),     # 2 wide: no interior column, all border
    (1, 3, 112, 112, 3, 2, (0, 0, 1, 1), 1),  # MobileNet's stride-2 shape, as TF pads it
    (1, 2, 13, 11, 3, 3, (1, 1, 1, 1), 1),    # stride 3
    (1, 2, 15, 15, 3, 2, (2, 2, 2, 2), 2),    # stride 2, dilation 2: only even taps, one phase
    (1, 2, 4, 4, 3, 2, (1, 1, 1, 1), 1),      # stride 2, one interior column: a vector of one lane
])
def test_depthwise_kernel_matches_numpy(n, c, h, w, k, stride, pads, dilation):
    rng = np.random.default_rng(h * w + k)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    expected = depthwise_reference(x, weight, bias, (stride, stride), pads, (dilation, dilation))
    shape = DepthwiseShape(n, c, (h, w), pads, expected.shape[2:], (k, k), (stride, stride), (dilation, dilation))
    # 16 lanes (AVX-512), 4 (NEON): a strided tap is one load of (lanes - 1) * stride + 1 columns
    for lanes, epilogue, reference in ((16, Epilogue(), expected), (16, Epilogue(0.0, 6.0), np.clip(expected, 0, 6)),
                                       (4, Epilogue(), expected)):
        got = run_kernel(depthwise_conv2d_cpu(shape, lanes, epilogue), x, weight.reshape(c, -1), bias,
                         out_shape=expected.shape)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, ci, c, h, w, stride, dilation, block", [
    (1, 8, 16, 20, 37, 1, 1, (4, 1)),   # 37 wide: expanded vectors at 0, 16, 21; band of 16 rows + 4
    (2, 6, 8, 17, 30, 2, 1, (8, 1)),    # stride 2, batch 2, 8x1 blocks (the packed kernel's panels)
    (1, 8, 12, 14, 14, 1, 2, (4, 4)),   # dilation 2, blocks of 4 input channels
    (1, 4, 4, 40, 112, 2, 1, (4, 1)),   # MobileNet's 112 -> 56: seven vectors in two passes
    (1, 8, 8, 14, 14, 2, 1, (4, 1)),    # 14 -> 7: depthwise rows as 8-lane vectors, 7 stored
])
def test_expand_depthwise_kernel_matches_numpy(n, ci, c, h, w, stride, dilation, block):
    """The fused 1x1 conv + depthwise conv against the two layers in numpy, each with its
    bias and ReLU6, half of the 1x1 conv's blocks zero."""
    import scipy.sparse

    from prune2tvm.compile.kernels.bsr_conv2d import BsrConv2dShape, column_offsets
    from prune2tvm.compile.kernels.expand_depthwise import ExpandDepthwiseShape, expand_depthwise_cpu

    rng = np.random.default_rng(h * w)
    r, cb = block
    keep = rng.random((c // r, ci // cb)) >= 0.5
    w1 = rng.standard_normal((c, ci)).astype(np.float32) * np.repeat(np.repeat(keep, r, 0), cb, 1)
    b1, b2 = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    wd = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    pads = (dilation,) * 4
    expanded = np.clip(np.einsum("oc,nchw->nohw", w1, x) + b1[None, :, None, None], 0, 6)
    expected = np.clip(depthwise_reference(expanded, wd, b2, (stride, stride), pads, (dilation, dilation)), 0, 6)
    bsr = scipy.sparse.bsr_matrix(w1, blocksize=block)
    bsr.sort_indices()
    conv = BsrConv2dShape(n, ci, (h, w), c, (h, w), (1, 1), (1, 1), (1, 1), block, len(bsr.data))
    dw = DepthwiseShape(n, c, (h, w), pads, expected.shape[2:], (3, 3), (stride, stride), (dilation, dilation))
    kernel = expand_depthwise_cpu(ExpandDepthwiseShape(dw, ci, block, len(bsr.data)), 16, Epilogue(0.0, 6.0),
                                  Epilogue(0.0, 6.0))
    got = run_kernel(kernel, x.reshape(n, -1), bsr.data.astype(np.float32), column_offsets(conv, bsr.indices),
                     bsr.indptr.astype(np.int32), np.zeros(1, np.float32), b1, wd.reshape(c, -1), b2,
                     out_shape=expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class InvertedResidual(nn.Module):
    """MobileNet V2's block: expand 1x1, depthwise 3x3, ReLU6s, project 1x1."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, stride=stride, padding=1, groups=32), nn.BatchNorm2d(32),
                                nn.ReLU6())
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.project(self.dw(self.expand(x)))


@pytest.mark.parametrize("size, stride, fused", [((19, 23), 2, True), ((9, 40), 2, True), ((10, 30), 1, True),
                                                  ((9, 12), 2, False)])
def test_depthwise_convs_take_the_kernel_with_bias_and_relu6_fused(tmp_path, size, stride, fused):
    """The depthwise kernel reads its input as it is (no padded or phase-split copy), and the
    expand conv before it fuses into it where the rows are at least 14 wide: the expanded
    tensor is then never stored. Outputs 12, 20 and 30 wide: one vector, an overlapping one."""
    torch.manual_seed(0)
    model = InvertedResidual(stride).eval()
    for bn in (model.expand[1], model.dw[1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = np.random.default_rng(0).standard_normal((1, 8, *size)).astype(np.float32)
    onnx_model = export_onnx(model, (8, *size), tmp_path / "block.onnx", 17, x)
    compiled = compile_onnx(onnx_model.path, load_target("x86"), {"input": [1, 8, *size]},
                            sparsify=SparsifyOptions((4, 1), 0.5))
    from prune2tvm.compile.build import prepare_module

    prepared = prepare_module(onnx_model.path, load_target("x86"), {"input": [1, 8, *size]}, SparsifyOptions((4, 1), 0.5))
    kernels = [g.name_hint for g in prepared.mod.functions]
    # the tuner searches only kernels that run: not the expand conv where it is fused away
    tuned = sorted(s.layer.split(" 1x1")[0] for s in prepared.bsr_kernels)
    assert tuned == (["conv2d 32->16"] if fused else ["conv2d 32->16", "conv2d 8->32"])
    assert not any(k.startswith(("pad_phases", "pad_flat")) for k in kernels)
    assert any(k.startswith("expand_depthwise") for k in kernels) == fused
    assert any(k.startswith("depthwise_conv2d") for k in kernels) != fused
    assert compiled.info.verified
    dw = [d for d in compiled.info.layers if d["weight_shape"] == [32, 1, 3, 3]]
    expand = [d for d in compiled.info.layers if d["weight_shape"] == [32, 8, 1, 1]]
    assert len(dw) == 1 and dw[0]["kind"] == "dense"
    assert dw[0]["reason"] == ("depthwise conv (groups=32): dense, prune2tvm's depthwise kernel; bias fused; "
                               "clip[0, 6] fused" + ("; fused with the 1x1 conv before it" if fused else ""))
    assert expand[0]["reason"].endswith("clip[0, 6] fused" + ("; fused with the depthwise conv after it" if fused else ""))
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(onnx_model.path).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_a_dense_mobilenet_with_tvms_convs_builds_with_a_database(tmp_path):
    """MobileNet V2 with every conv dense and TVM's (a sweep's dense baseline: threshold 1,
    ``--dense-kernel tvm``), built with a tuning database: the ReLU6 of each dense expand conv
    feeds a depthwise kernel. When strided depthwise convs read a stride-phase copy, FuseOps
    fused that ReLU6 into the copy, a function FuseTIR refused ("Inconsistent buffers
    T_minimum and x mapped to the same relax var")."""
    from prune2tvm.compile.tune import TuningDatabase
    from prune2tvm.models import build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", (3, 64, 64), 10).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    onnx_model = export_onnx(model, (3, 64, 64), tmp_path / "dense.onnx", 17, x)
    target = load_target("x86")
    compiled = compile_onnx(onnx_model.path, target, {"input": [1, 3, 64, 64]}, sparsify=SparsifyOptions((1, 1), 1.0, dense_kernel="tvm"),
                            database=TuningDatabase(tmp_path / "db", target, create=True))
    assert compiled.info.verified
    assert {d["kind"] for d in compiled.info.layers} == {"dense"}
