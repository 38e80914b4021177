"""Rewrite ``nn.conv2d(x, W)`` with a constant, block-sparse W (NCHW / OIHW) into a BSR kernel.

The weight is viewed as a matrix [O, C*KH*KW] and cut into R x C blocks (R output channels,
the N of 1xN). The input is zero-padded by the conv's padding (if any) and flattened per
image; the kernel gets, instead of block column indices, each stored column's offset into
that padded image. Strided convs read stride phases (``PhaseLayout``); stride-1 convs whose
rows are not a whole number of vectors, wrapped rows (``kernels.bsr_conv2d.wrapped``).

Grouped and depthwise convs stay dense; given a ``depthwise`` factory, depthwise convs (one
filter per channel) become prune2tvm's dense depthwise kernel; with ``pack``, a conv that
stays dense but could be BSR runs the BSR kernel with every block stored (``pack_dense``).
The bias add and ReLU that follow are folded into the kernels afterwards (``fuse_epilogue``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from prune2tvm.compile.kernels.bsr_conv2d import (WRAP_MIN_ROWS, BsrConv2dShape, PhaseLayout, column_offsets,
                                                  pad_flat_cpu, pad_phases_cpu, wrap_columns, wrapped)
from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue
from prune2tvm.compile.kernels.depthwise_conv2d import DepthwiseShape
from prune2tvm.compile.passes.fuse_epilogue import FusableKernel, KernelRegistry, register
from prune2tvm.compile.passes.decisions import (DecisionLog, LayerDecision, LayerNamer, Probe, Selector, const,
                                                decide_bsr, in_graph_order, pack_dense, rewrite_functions,
                                                selected, static_shape)

# Makes the kernel for one conv: (shape, epilogue, data, indptr, column offsets) -> PrimFunc
ConvKernelFactory = Callable[[BsrConv2dShape, Epilogue, np.ndarray, np.ndarray, np.ndarray], tvm.tirx.PrimFunc]
DepthwiseKernelFactory = Callable[[DepthwiseShape, Epilogue], tvm.tirx.PrimFunc]


def sparsify_conv2d(mod: tvm.IRModule, block: tuple[int, int], threshold: float, kernel: ConvKernelFactory,
                    names: LayerNamer | None = None, select: Selector | None = None,
                    kernels: KernelRegistry | None = None,
                    depthwise: DepthwiseKernelFactory | None = None,
                    pack: bool = False, lanes: int = 16,
                    wrap_min_rows: int = WRAP_MIN_ROWS) -> tuple[tvm.IRModule, list[LayerDecision]]:
    """Return the rewritten module and one decision per conv2d, in graph order. Each kernel
    emitted is entered in ``kernels`` (for ``fuse_epilogues``). ``lanes``: the target's
    float32 vector width, and ``wrap_min_rows`` the narrowest blocks the target's CPU runs
    over wrapped rows (``wrap_min_rows``): together they decide where convs run over them."""
    x, weight, other = wildcard(), is_const(), wildcard()
    pattern = (is_op("relax.nn.conv2d")(x, weight) | is_op("relax.nn.conv2d")(x, other)
               | is_op("relax.nn.conv1d")(x, weight) | is_op("relax.nn.conv3d")(x, weight))
    log = DecisionLog(names)
    builder = relax.BlockBuilder(mod)

    def rewrite(call: relax.Call, matches: dict) -> relax.Expr:
        if log.seen(call):
            return call
        if call.op.name != "relax.nn.conv2d":  # in the table, so that no weight layer goes unmentioned
            w = matches[weight].value.numpy()
            op = call.op.name.rsplit(".", 1)[-1]
            decision = log.add(call, op, w.reshape(w.shape[0], -1), list(w.shape), block)
            decision.reason = f"{op[-2]}-D conv: only 2-D convs are rewritten; left dense"
            return call
        if weight not in matches:
            decision = log.add(call, "conv2d", None, [], block)
            decision.reason = "weight is not a constant; left dense"
            return call
        w = matches[weight].value.numpy()
        o, c, kh, kw = w.shape
        matrix = w.reshape(o, -1)
        decision = log.add(call, "conv2d", matrix, [o, c, kh, kw], block)
        attrs = call.attrs
        x_shape = static_shape(matches[x])
        why_dense = _unsupported(attrs, x_shape, w, matches[x])
        if why_dense:
            decision.reason = why_dense
            if depthwise is not None and why_dense.startswith("depthwise") and w.shape[1] == 1:
                return _depthwise(call, matches[x], x_shape, w, decision)
            return call
        bsr = decide_bsr(decision, matrix, block, threshold, measured=select is not None)
        strides, padding, dilation = ([int(v) for v in a] for a in (attrs.strides, attrs.padding, attrs.dilation))
        probe = Probe(x_shape, lambda v: relax.op.nn.conv2d(v, relax.const(w), strides=strides, padding=padding,
                                                           dilation=dilation))
        n, _, h, wd = x_shape
        pads = tuple(int(p) for p in attrs.padding)
        top, left, bottom, right = pads
        out_shape = [int(d) for d in call.ty.shape]
        if bsr is None or not selected(decision, probe, select):
            bsr = pack_dense(decision, matrix, out_shape[2] * out_shape[3]) if pack else None
            if bsr is None:
                return call
        panel = bsr.block  # the user's block, or the packed kernel's panels where it stays dense
        data, _, indptr = bsr.kernel_arrays()
        if strides != [1, 1]:  # split into stride phases: the kernel then reads with stride 1
            layout = PhaseLayout(c, (h, wd), pads, (kh, kw), tuple(strides), tuple(dilation))
            shape = BsrConv2dShape(n, layout.planes, layout.plane, o, (out_shape[2], out_shape[3]), (kh, kw),
                                   (1, 1), (1, 1), panel, bsr.nnzb)
            pad = builder.add_func(pad_phases_cpu(n, layout), "pad_phases")
            flat = relax.call_tir(pad, [matches[x]], relax.TensorType([n, layout.planes * layout.plane[0]
                                                                       * layout.plane[1]], "float32"))
            offsets = layout.offsets(bsr.indices, panel[1])
        else:
            shape = BsrConv2dShape(n, c, (h + top + bottom, wd + left + right), o, (out_shape[2], out_shape[3]),
                                   (kh, kw), (1, 1), tuple(dilation), panel, bsr.nnzb)
            wrap = wrapped(shape, left, right, lanes, wrap_min_rows)
            if wrap is not None:  # rows laid end to end, padded in height only
                shape, pads = wrap, (top, 0, bottom, 0)
                data, offsets, indptr = wrap_columns(shape, data, bsr.indices, indptr)
            else:
                offsets = column_offsets(shape, bsr.indices)
            flat_shape = [n, shape.image_size]
            if any(pads) or shape.wrap not in (None, (0, 0)):  # padded (and guarded) in one parallel pass
                pad = builder.add_func(pad_flat_cpu(n, c, h, wd, pads, guard=shape.wrap or (0, 0)), "pad_flat")
                flat = relax.call_tir(pad, [matches[x]], relax.TensorType(flat_shape, "float32"))
            else:  # a view
                flat = relax.op.reshape(matches[x], flat_shape)
        arrays = (data, indptr, offsets)
        gvar = builder.add_func(kernel(shape, NO_EPILOGUE, *arrays), "bsr_conv2d")
        weights = const(data)
        register(kernels, gvar, FusableKernel(lambda e, shape=shape, arrays=arrays: kernel(shape, e, *arrays),
                                              1, decision, takes_residual=True, shape=shape), weights)
        no_residual = const(np.zeros(1, np.float32))  # fuse_epilogues may put a residual input here
        return relax.call_tir(gvar, [flat, weights, const(offsets), const(indptr), no_residual,
                                     const(np.zeros(o, np.float32))], relax.TensorType(out_shape, "float32"))

    def _depthwise(call: relax.Call, data: relax.Expr, x_shape: list[int], w: np.ndarray,
                   decision: LayerDecision) -> relax.Expr:
        """A depthwise conv as prune2tvm's (dense) depthwise kernel: it pads as it reads."""
        attrs = call.attrs
        n, c, h, wd = x_shape
        out_shape = [int(d) for d in call.ty.shape]
        shape = DepthwiseShape(n, c, (h, wd), tuple(int(p) for p in attrs.padding), (out_shape[2], out_shape[3]),
                               (w.shape[2], w.shape[3]), tuple(int(v) for v in attrs.strides),
                               tuple(int(v) for v in attrs.dilation))
        gvar = builder.add_func(depthwise(shape, NO_EPILOGUE), "depthwise_conv2d")
        weights = const(np.ascontiguousarray(w.reshape(c, -1)))
        register(kernels, gvar, FusableKernel(lambda e, shape=shape: depthwise(shape, e), 1, decision, shape=shape),
                 weights)
        decision.reason = f"depthwise conv (groups={c}): dense, prune2tvm's depthwise kernel"
        return relax.call_tir(gvar, [data, weights, const(np.zeros(c, np.float32))],
                              relax.TensorType(out_shape, "float32"))

    return rewrite_functions(mod, builder, pattern, rewrite), in_graph_order(log.decisions())


def _unsupported(attrs, x_shape, w: np.ndarray, x: relax.Expr) -> str:
    """Why this conv stays dense, or "" when the BSR kernel can take it. Grouping is checked
    last: a depthwise conv that passes everything else can take the depthwise kernel."""
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return f"layout {attrs.data_layout}/{attrs.kernel_layout}; the BSR kernel takes NCHW/OIHW"
    if x_shape is None or len(x_shape) != 4:
        return "input shape is not static"
    if x.ty.dtype != "float32" or w.dtype != np.float32 or attrs.out_dtype not in (None, "", "float32"):
        return f"dtype {x.ty.dtype} (BSR kernels are float32)"
    if int(attrs.groups) != 1:
        kind = "depthwise" if int(attrs.groups) == w.shape[0] else "grouped"
        return f"{kind} conv (groups={int(attrs.groups)}); left dense"
    return ""
