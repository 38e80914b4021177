"""Fuse the bias add and the clamp (ReLU, ReLU6) that follow a BSR kernel into its store.

TVM cannot fuse elementwise ops into a hand-scheduled (opaque) kernel, so after the sparsify
passes a Linear or Conv with bias and ReLU would cost two more passes over its output, each
an unscheduled loop. This pass folds them into the kernel: ``add(bsr(...), const)`` where the
constant varies only along the output channels becomes the kernel's bias argument, and a
clamp on top becomes the kernel's [low, high] clamp: ``relu``, ``clip``, and ``maximum`` /
``minimum`` with a scalar constant (how ONNX's Clip, i.e. torch's ReLU6, is imported). Also
through the reshape the dense pass puts around batched (3-D) activations.

A BSR conv also takes the residual add that follows it (``add(conv, shortcut)``, ResNet's
shortcut) as an input of its store, before the clamp, so ``relu(conv + bias + shortcut)`` is
one pass. Only a conv whose output nothing else reads takes the add: where both operands are
BSR convs (MobileNet V2's ``x + conv(x)``, x itself a conv's output), the shortcut's conv
must stay as it is, or it would be computed twice (once for its other readers, once with the
add). A bias or residual after an activation does not commute with it and is left
alone, as is any constant that is not per channel. Other activations (GELU, sigmoid) stay as TVM builds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple, wildcard

from prune2tvm.compile.kernels.bsr_matmul import FLT_MAX, NO_EPILOGUE, Epilogue
from prune2tvm.compile.passes.decisions import LayerDecision, const, is_call_tir, rewrite_functions, static_shape


@dataclass
class FusableKernel:
    """A BSR kernel the sparsify passes emitted, and how to remake it with an epilogue."""

    make: Callable[[Epilogue], tvm.tirx.PrimFunc]
    channel_axis: int  # of the kernel's output
    decision: LayerDecision
    epilogue: Epilogue = NO_EPILOGUE
    takes_residual: bool = False  # its second-to-last argument can be a residual input (BSR convs)
    shape: object = None  # the kernel's shape (BsrConv2dShape, DepthwiseShape) where a later pass needs it
    # Layers of one shape share one kernel (the block builder keeps one copy of identical
    # functions): each layer's decision, found by the weight constant its call passes.
    layers: list = dataclasses.field(default_factory=list)

    def decision_for(self, call: relax.Call) -> LayerDecision:
        weight = call.args[1].fields[1]
        return next((d for c, d in self.layers if c.same_as(weight)), self.decision)


def register(kernels: KernelRegistry | None, gvar: relax.GlobalVar, kernel: FusableKernel, weight: relax.Expr) -> None:
    """Enter a kernel call's layer (``weight``: the constant passed as its second argument)."""
    if kernels is None:
        return
    entry = kernels.setdefault(gvar.name_hint, kernel)
    entry.layers.append((weight, kernel.decision))


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
    scalar = is_const()
    # ONNX's Clip arrives as TE maximum / minimum kernels whose bound is where(isnan(c), inf, c)
    checked, bound = is_const(), is_const()
    onnx_bound = is_op("relax.where")(is_op("relax.isnan")(checked), is_const(), bound)
    clamp = (is_op("relax.nn.relu")(produced) | is_op("relax.clip")(produced, wildcard(), wildcard())
             | is_op("relax.maximum")(produced, scalar) | is_op("relax.maximum")(scalar, produced)
             | is_op("relax.minimum")(produced, scalar) | is_op("relax.minimum")(scalar, produced)
             | is_op("relax.call_tir")(wildcard(), is_tuple([produced, scalar | onnx_bound])))
    builder = relax.BlockBuilder(mod)

    def rewrite(call: relax.Call, matches: dict) -> relax.Expr:
        kcall = matches[kernel_call]
        info = kernels.get(getattr(kcall.args[0], "name_hint", None))
        if info is None or (call.op.name == "relax.add" and info.epilogue.activation):
            return call  # not ours, or a bias after the activation (they do not commute)
        out_shape = static_shape(call)
        if out_shape is None or out_shape != static_shape(matches[produced] if produced in matches else kcall):
            return call  # the add broadcasts beyond the kernel's output
        axis = len(out_shape) - 1 if reshape in matches else info.channel_axis
        args = list(kcall.args[1].fields)
        gvar = kcall.args[0]
        decision = info.decision_for(kcall)
        if call.op.name == "relax.add":
            vector = _per_channel(_constant(matches[bias]), out_shape, axis)
            if vector is None:
                return call
            args[-1] = const(args[-1].value.numpy() + vector)
            decision.reason += "; bias fused"
        else:
            epilogue = _clamped(info.epilogue, *_clamp_of(call, matches.get(scalar), mod,
                                                                  matches.get(checked), matches.get(bound)))
            if epilogue is None:
                return call
            gvar = builder.add_func(info.make(epilogue), gvar.name_hint)
            kernels[gvar.name_hint] = dataclasses.replace(info, epilogue=epilogue)
            before = info.epilogue.activation
            fused = epilogue.activation
            decision.reason = (decision.reason.replace(f"; {before} fused", "") if before
                               else decision.reason) + f"; {fused} fused"
        new = relax.call_tir(gvar, args, kcall.ty)
        if reshape in matches:
            new = relax.op.reshape(new, matches[reshape].args[1])
        return new

    # bias and clamp; then residual adds (their operands' uses counted on the result); then a
    # clamp after a residual add. The kernels replaced by their variants are no longer called.
    mod = rewrite_functions(mod, builder, add | clamp, rewrite)
    mod = _fuse_residuals(mod, kernels, builder)
    return relax.transform.DeadCodeElimination()(rewrite_functions(mod, builder, add | clamp, rewrite))


def _fuse_residuals(mod: tvm.IRModule, kernels: KernelRegistry, builder: relax.BlockBuilder) -> tvm.IRModule:
    """``add(a, b)`` -> a's kernel with b added in its store, where a is a BSR conv's output
    that only this add reads (else b's, the same way round)."""
    pattern = is_op("relax.add")(wildcard(), wildcard())

    def rewrite(call: relax.Call, matches: dict, values: dict, uses: dict) -> relax.Expr:
        out_shape = static_shape(call)
        for mine, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            kcall = values.get(mine) if isinstance(mine, relax.Var) else None
            if kcall is None or uses.get(mine) != 1 or mine.same_as(other) or not is_call_tir(kcall):
                continue
            info = kernels.get(getattr(kcall.args[0], "name_hint", None))
            if info is None or not info.takes_residual or info.epilogue.residual or info.epilogue.activation \
                    or isinstance(other, tvm.ir.GenericConst) or out_shape is None \
                    or static_shape(kcall) != out_shape or static_shape(other) != out_shape \
                    or other.ty.dtype != "float32":
                continue
            epilogue = dataclasses.replace(info.epilogue, residual=True)
            gvar = builder.add_func(info.make(epilogue), kcall.args[0].name_hint)
            kernels[gvar.name_hint] = dataclasses.replace(info, epilogue=epilogue)
            args = list(kcall.args[1].fields)
            args[-2] = relax.op.reshape(other, [int(np.prod(out_shape))])
            info.decision_for(kcall).reason += "; residual add fused"
            return relax.call_tir(gvar, args, kcall.ty)
        return call

    return rewrite_functions(mod, builder, pattern, rewrite, bindings=True)


def _clamp_of(call: relax.Call, scalar: relax.Constant | None, mod: tvm.IRModule,
              checked: relax.Constant | None = None, bound: relax.Constant | None = None,
              ) -> tuple[float, float] | tuple[None, None]:
    """The [low, high] that ``call`` clamps to: relu, clip, or maximum / minimum with a scalar
    (a Relax op, or a TE kernel called on the output and a scalar bound as the ONNX importer
    emits for Clip); (None, None) when it is none of those."""
    name = call.op.name
    if name == "relax.nn.relu":
        return 0.0, FLT_MAX
    if name == "relax.clip":
        bounds = [getattr(a, "value", None) for a in call.args[1:]]
        if not all(isinstance(b, (tvm.tirx.FloatImm, tvm.tirx.IntImm)) for b in bounds):
            return None, None
        return float(bounds[0].value), float(bounds[1].value)
    if name == "relax.call_tir":
        name = _te_elementwise(call, mod)
        if bound is not None:  # where(isnan(c), +-inf, c): c, when c is a number
            same = np.array_equal(checked.value.numpy(), bound.value.numpy())
            scalar = bound if same and not np.isnan(bound.value.numpy()).any() else None
    value = scalar.value.numpy() if scalar is not None else None
    if value is None or value.size != 1 or value.dtype != np.float32:
        return None, None
    value = float(value.reshape(()))
    if name in ("relax.maximum", "maximum"):
        return value, FLT_MAX
    if name in ("relax.minimum", "minimum"):
        return -FLT_MAX, value
    return None, None


def _te_elementwise(call: relax.Call, mod: tvm.IRModule) -> str:
    """"maximum" / "minimum" for a call of the importer's TE kernels of those names on an
    output and a 0-d bound, the result shaped like the output; else ""."""
    gvar = call.args[0]
    base = getattr(gvar, "name_hint", "").rstrip("0123456789")
    if base not in ("maximum", "minimum") or gvar not in mod.functions:
        return ""
    shapes = [static_shape(a) for a in call.args[1].fields]
    if len(shapes) != 2 or shapes[1] != [] or shapes[0] is None or shapes[0] != static_shape(call):
        return ""
    return base


def _clamped(current: Epilogue, low: float | None, high: float | None) -> Epilogue | None:
    """The kernel's clamp once [low, high] is applied after it, or None if it cannot be one."""
    if low is None:
        return None
    # clamp(clamp(x, a, b), low, high) is clamp(x, max(a, low), min(b, high)) while the two
    # ranges overlap; otherwise the result is a constant, left to TVM
    low, high = max(current.low, low), min(current.high, high)
    return dataclasses.replace(current, low=low, high=high) if low <= high else None


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
