"""Rewrite ``matmul(x, W)`` with a constant, block-sparse W into a BSR kernel call.

Matches what the ONNX importer emits for torch's ``nn.Linear``:
  * Gemm (2-D x, with or without bias):  matmul(x, permute_dims(W[N, K]))
  * MatMul (e.g. 3-D x [B, S, K]):       matmul(x, W[K, N])
x of any rank with static shape is flattened to [M, K] around the kernel. The bias add and
activation that follow stay as they are.

A layer becomes BSR when its block sparsity (the fraction of all-zero R x C blocks of
W[N, K]) is at least the threshold and its shape divides into blocks; every matched layer
gets a ``LayerDecision`` saying what was done and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from prune2tvm.sparse import BsrMatrix, block_sparsity


@dataclass
class LayerDecision:
    name: str
    op: str  # "dense" (a matmul) or "conv2d"
    weight_shape: list[int]  # [N, K] for dense
    block: list[int]  # [R, C]
    block_sparsity: float | None  # None when the shape does not divide into blocks
    kind: str  # "bsr" or "dense"
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


# Makes the kernel for one layer: (rows M, BsrMatrix) -> PrimFunc
KernelFactory = Callable[[int, BsrMatrix], tvm.tirx.PrimFunc]


# Names a layer by its [N, K] weight: (graph position, name), or None when unknown
LayerNamer = Callable[[np.ndarray], "tuple[int, str] | None"]


def sparsify_dense(mod: tvm.IRModule, block: tuple[int, int], threshold: float, kernel: KernelFactory,
                   names: LayerNamer | None = None) -> tuple[tvm.IRModule, list[LayerDecision]]:
    """Return the rewritten module and one decision per constant-weight matmul, in graph order."""
    x, weight, other = wildcard(), is_const(), wildcard()
    transposed = is_op("relax.permute_dims")(weight)
    pattern = (is_op("relax.matmul")(x, transposed) | is_op("relax.matmul")(x, weight)
               | is_op("relax.matmul")(x, other))
    # rewrite_call repeats until nothing changes, so a call left dense is seen again (as a new
    # object): calls are keyed by structural hash.
    seen: dict[int, tuple[tuple[int, int], LayerDecision]] = {}
    builder = relax.BlockBuilder(mod)  # gives each added kernel a typed GlobalVar

    def rewrite(call: relax.Call, matches: dict) -> relax.Expr:
        key = tvm_ffi.structural_hash(call)
        if key in seen:
            return call
        if weight not in matches:  # e.g. attention's activation x activation products
            shape = [int(d) for d in call.ty.shape] if _static(call) else []
            seen[key] = ((10**9 + len(seen), len(seen)), LayerDecision(
                f"matmul{len(seen)}", "dense", shape, list(block), None, "dense",
                "weight is not a constant (an activation); left dense"))
            return call
        w = matches[weight].value.numpy()
        if transposed in matches:
            axes = matches[transposed].attrs.axes
            if w.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
                return call
            w_nk = w  # stored [N, K], transposed for the matmul
        else:
            if w.ndim != 2:
                return call
            w_nk = w.T
        n, k = w_nk.shape
        x_expr = matches[x]
        found = names(w_nk) if names else None
        order, name = found if found else (10**9 + len(seen), f"matmul{len(seen)}")
        decision = LayerDecision(name, "dense", [n, k], list(block), None, "dense", "")
        seen[key] = ((order, len(seen)), decision)
        x_shape = [int(d) for d in x_expr.ty.shape] if _static(x_expr) else None
        dtype = x_expr.ty.dtype
        if x_shape is None:
            decision.reason = "activation shape is not static"
            return call
        if dtype != "float32" or w_nk.dtype != np.float32:
            decision.reason = f"dtype {dtype} (BSR kernels are float32)"
            return call
        if n % block[0] or k % block[1]:
            decision.reason = f"[{n}, {k}] does not divide into {block[0]}x{block[1]} blocks; left dense"
            return call
        sparsity = block_sparsity(w_nk, block)
        decision.block_sparsity = sparsity
        if sparsity < threshold:
            decision.reason = f"block sparsity {sparsity:.3f} < threshold {threshold:g}"
            return call
        bsr = BsrMatrix.from_dense(np.ascontiguousarray(w_nk), block)
        rows = math.prod(x_shape[:-1])
        gvar = builder.add_func(kernel(rows, bsr), "bsr_matmul")
        flat = relax.op.reshape(x_expr, [rows, k]) if len(x_shape) != 2 else x_expr
        out = relax.call_tir(gvar, [flat, *(_const(a) for a in bsr.kernel_arrays())],
                             relax.TensorType([rows, n], dtype))
        decision.kind = "bsr"
        decision.reason = f"block sparsity {sparsity:.3f} >= threshold {threshold:g}"
        return relax.op.reshape(out, [*x_shape[:-1], n]) if len(x_shape) != 2 else out

    rewritten = {gv: rewrite_call(pattern, rewrite, func) for gv, func in mod.functions.items()
                 if isinstance(func, relax.Function)}
    new_mod = builder.get()
    for gv, func in rewritten.items():
        new_mod[gv] = func
    return new_mod, [decision for _, decision in sorted(seen.values(), key=lambda item: item[0])]


def _static(expr: relax.Expr) -> bool:
    shape = getattr(expr.ty, "shape", None)
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape)


def _const(array: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(array))
