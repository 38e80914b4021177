"""Rewrite ``matmul(a, b)`` of two activations into prune2tvm's batched matmul kernel (CPUs).

Attention's products (Q @ K.T, softmax @ V) have no weight to prune, but an untuned build left
them to TVM's default schedule, a scalar loop nest on one core: it made a pruned transformer
slower than onnxruntime however sparse its linear layers were (``kernels/batch_matmul``).
Operands of any rank >= 2 with static float32 shapes are flattened to [batch, M, K] and
[batch, K, N] around the kernel; a batch of 1 (or none) on either side is broadcast. Products
with a constant operand belong to ``sparsify_dense``; the rest stay with TVM, and
``unsupported`` says why (the layer table shows it).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from prune2tvm.compile.kernels.batch_matmul import BatchMatmulShape, batch_matmul_cpu
from prune2tvm.compile.passes.decisions import rewrite_functions, static_shape

PRODUCT = "two activations (e.g. attention)"  # how the layer table's reason for a product begins
KERNEL = "prune2tvm's batched matmul kernel"
CONSTANT_OPERAND = "a constant operand"


def constant(expr: relax.Expr, values: dict) -> bool:
    """Whether ``expr`` is a constant, or an op on constants only (a weight's permute_dims),
    following variables to their bound ``values``."""
    while isinstance(expr, relax.Var) and expr in values:
        expr = values[expr]
    if isinstance(expr, tvm.ir.GenericConst):
        return True
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and len(expr.args) > 0
            and all(constant(arg, values) for arg in expr.args))


def unsupported(call: relax.Call, values: dict) -> str | None:
    """Why the kernel does not take this product of ``call``'s operands (None: it does);
    ``values``: the function's variable -> bound value map."""
    a, b = call.args
    if constant(a, values) or constant(b, values):
        return CONSTANT_OPERAND
    shapes = [static_shape(e) for e in (a, b, call)]
    if any(s is None for s in shapes):
        return "shapes are not static"
    dtypes = {str(e.ty.dtype) for e in (a, b, call)}
    if dtypes != {"float32"}:
        return f"dtype {', '.join(sorted(dtypes))} (the kernel is float32)"
    sa, sb, so = shapes
    if len(sa) < 2 or len(sb) < 2:
        return "a 1-D operand"
    batch = math.prod(so[:-2])
    if math.prod(sa[:-2]) not in (1, batch) or math.prod(sb[:-2]) not in (1, batch):
        return "batch dimensions broadcast against each other"
    return None


def rewrite_activation_matmuls(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every product of two activations that the kernel takes (``unsupported`` is None),
    rewritten into a call of it; one kernel per shape."""
    builder = relax.BlockBuilder(mod)
    kernels: dict[BatchMatmulShape, relax.GlobalVar] = {}

    def rewrite(call: relax.Call, _matches: dict, values: dict, _uses: dict) -> relax.Expr:
        if unsupported(call, values) is not None:
            return call
        a, b = call.args
        sa, sb, so = static_shape(a), static_shape(b), static_shape(call)
        m, k, n = sa[-2], sa[-1], sb[-1]
        shape = BatchMatmulShape(math.prod(so[:-2]), m, k, n, math.prod(sa[:-2]), math.prod(sb[:-2]))
        if shape not in kernels:
            kernels[shape] = builder.add_func(batch_matmul_cpu(shape, lanes), "batch_matmul")
        left = relax.op.reshape(a, [shape.left_batch, m, k]) if len(sa) != 3 else a
        right = relax.op.reshape(b, [shape.right_batch, k, n]) if len(sb) != 3 else b
        out = relax.call_tir(kernels[shape], [left, right], relax.TensorType([shape.batch, m, n], "float32"))
        return relax.op.reshape(out, so) if len(so) != 3 else out

    return rewrite_functions(mod, builder, is_op("relax.matmul")(wildcard(), wildcard()), rewrite, bindings=True)
