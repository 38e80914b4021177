"""Fuse a 1x1 conv kernel into the depthwise conv kernel that alone reads its output
(MobileNet V2's "expand" and "depthwise" layers) as one kernel, ``kernels/expand_depthwise.py``:
the expanded tensor, 6x the block's input, is then never written to memory and read back.

Runs after ``fuse_epilogues``, so both kernels' bias adds and clamps are known and kept. The
1x1 conv must be prune2tvm's (BSR, or packed where it stays dense) with stride 1, no padding
and no residual add; its output must be read by nothing else. Rows narrower than
``FUSE_MIN_WIDTH`` stay apart: there the 1x1 kernel computes the image as one row of whole
vectors, and the pair was faster than the fused kernel (measured alone at 7x7: 0.86x; at
14x14 and wider the fused kernel was 1.3-1.8x faster than the pair).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from prune2tvm.compile.kernels.bsr_conv2d import BsrConv2dShape
from prune2tvm.compile.kernels.depthwise_conv2d import DepthwiseShape
from prune2tvm.compile.kernels.expand_depthwise import ExpandDepthwiseShape, expand_depthwise_cpu
from prune2tvm.compile.passes.decisions import is_call_tir, rewrite_functions
from prune2tvm.compile.passes.fuse_epilogue import FusableKernel, KernelRegistry

FUSE_MIN_WIDTH = 14  # columns of the expanded image


def fusable(conv: FusableKernel, depthwise: FusableKernel) -> bool:
    c, d = conv.shape, depthwise.shape
    return (isinstance(c, BsrConv2dShape) and isinstance(d, DepthwiseShape)
            and c.kernel == (1, 1) and c.stride == (1, 1) and c.dilation == (1, 1) and c.padded == c.out
            and c.wrap is None
            and not conv.epilogue.residual
            and (d.batch, d.channels, d.size) == (c.batch, c.out_channels, c.out)
            and d.size[1] >= FUSE_MIN_WIDTH)


def fuse_expand_depthwise(mod: tvm.IRModule, kernels: KernelRegistry, lanes: int) -> tvm.IRModule:
    if not kernels:
        return mod
    pattern = is_op("relax.call_tir")(wildcard(), wildcard())
    builder = relax.BlockBuilder(mod)

    def rewrite(call: relax.Call, matches: dict, values: dict, uses: dict) -> relax.Expr:
        depthwise = kernels.get(getattr(call.args[0], "name_hint", None))
        if depthwise is None or not isinstance(depthwise.shape, DepthwiseShape):
            return call
        expanded = call.args[1].fields[0]
        ccall = values.get(expanded) if isinstance(expanded, relax.Var) else None
        if ccall is None or uses.get(expanded) != 1 or not is_call_tir(ccall):
            return call
        conv = kernels.get(getattr(ccall.args[0], "name_hint", None))
        if conv is None or not fusable(conv, depthwise):
            return call
        c = conv.shape
        shape = ExpandDepthwiseShape(depthwise.shape, c.in_channels, c.block, c.nnzb)
        gvar = builder.add_func(expand_depthwise_cpu(shape, lanes, conv.epilogue, depthwise.epilogue),
                                "expand_depthwise")
        conv.decision_for(ccall).reason += "; fused with the depthwise conv after it"
        depthwise.decision_for(call).reason += "; fused with the 1x1 conv before it"
        return relax.call_tir(gvar, list(ccall.args[1].fields) + list(call.args[1].fields[1:]), call.ty)

    return relax.transform.DeadCodeElimination()(rewrite_functions(mod, builder, pattern, rewrite, bindings=True))
