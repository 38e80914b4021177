"""Fuse the bias add and ReLU that follow a BSR kernel into the kernel's store.

TVM cannot fuse elementwise ops into a hand-scheduled (opaque) kernel, so after the sparsify
passes a Linear or Conv with bias and ReLU would cost two more passes over its output, each
an unscheduled loop. This pass folds them into the kernel: ``add(bsr(...), const)`` where the
constant varies only along the output channels becomes the kernel's bias argument, and a
``relu`` on top becomes the kernel's clamp. Also through the reshape the dense pass puts
around batched (3-D) activations.

A bias after an activation does not commute with it and is left alone, as is any constant
that is not per channel. Ops other than ReLU (GELU, ReLU6's clip) stay as TVM builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from prune2tvm.compile.kernels.bsr_matmul import FLT_MAX, NO_EPILOGUE, Epilogue
from prune2tvm.compile.passes.decisions import LayerDecision, const, rewrite_functions, static_shape


@dataclass
class FusableKernel:
    """A BSR kernel the sparsify passes emitted, and how to remake it with an epilogue."""

    make: Callable[[Epilogue], tvm.tirx.PrimFunc]
    channel_axis: int  # of the kernel's output
    decision: LayerDecision
    epilogue: Epilogue = NO_EPILOGUE


# kernel GlobalVar name -> FusableKernel
KernelRegistry = dict


def fuse_epilogues(mod: tvm.IRModule, kernels: KernelRegistry) -> tvm.IRModule:
    if not kernels:
        return mod
    kernel_call = is_op("relax.call_tir")(wildcard(), wildcard())
    reshape = is_op("relax.reshape")(kernel_call, wildcard())
    produced = kernel_call | reshape
    bias = is_const() | is_op("relax.reshape")(is_const(), wildcard())
    add = is_op("relax.add")(produced, bias) | is_op("relax.add")(bias, produced)
    relu = is_op("relax.nn.relu")(produced)
    builder = relax.BlockBuilder(mod)

    def rewrite(call: relax.Call, matches: dict) -> relax.Expr:
        kcall = matches[kernel_call]
        info = kernels.get(getattr(kcall.args[0], "name_hint", None))
        if info is None or info.epilogue.activation:  # not ours, or already clamped
            return call
        out_shape = static_shape(call)
        if out_shape is None or out_shape != static_shape(matches[produced]):
            return call  # the add broadcasts beyond the kernel's output
        axis = len(out_shape) - 1 if reshape in matches else info.channel_axis
        args = list(kcall.args[1].fields)
        gvar = kcall.args[0]
        if call.op.name == "relax.add":
            vector = _per_channel(_constant(matches[bias]), out_shape, axis)
            if vector is None:
                return call
            args[-1] = const(args[-1].value.numpy() + vector)
            info.decision.reason += "; bias fused"
        else:
            epilogue = Epilogue(low=0.0, high=FLT_MAX)
            gvar = builder.add_func(info.make(epilogue), gvar.name_hint)
            kernels[gvar.name_hint] = FusableKernel(info.make, info.channel_axis, info.decision, epilogue)
            info.decision.reason += "; relu fused"
        new = relax.call_tir(gvar, args, kcall.ty)
        if reshape in matches:
            new = relax.op.reshape(new, matches[reshape].args[1])
        return new

    # the kernels replaced by their ReLU variants are no longer called
    return relax.transform.DeadCodeElimination()(rewrite_functions(mod, builder, add | relu, rewrite))


def _constant(expr: relax.Expr) -> np.ndarray:
    if isinstance(expr, relax.Call):  # reshape(const, shape)
        return expr.args[0].value.numpy().reshape(static_shape(expr))
    return expr.value.numpy()


def _per_channel(value: np.ndarray, out_shape: list[int], axis: int) -> np.ndarray | None:
    """``value`` as one number per output channel, or None if it varies along another axis."""
    if value.dtype != np.float32 or value.ndim > len(out_shape):
        return None
    full = value.reshape((1,) * (len(out_shape) - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis) or full.shape[axis] not in (1, out_shape[axis]):
        return None
    return np.ascontiguousarray(np.broadcast_to(full.reshape(-1), (out_shape[axis],)), dtype=np.float32)
