"""Rewrite ``matmul(x, W)`` with a constant, block-sparse W into a BSR kernel call.

Matches what the ONNX importer emits for torch's ``nn.Linear``:
  * Gemm (2-D x, with or without bias):  matmul(x, permute_dims(W[N, K]))
  * MatMul (e.g. 3-D x [B, S, K]):       matmul(x, W[K, N])
x of any rank with static shape is flattened to [M, K] around the kernel. The bias add and
ReLU that follow are folded into the kernel afterwards (``fuse_epilogue``).

A layer becomes BSR when its block sparsity (the fraction of all-zero R x C blocks of
W[N, K]) is at least the threshold and its shape divides into blocks; every matched layer
gets a ``LayerDecision`` saying what was done and why. With ``pack``, a constant-weight layer
that stays dense runs the same kernel with every block stored (``pack_dense``), and a product
of two activations is said to run ``activation_matmul``'s kernel (that pass rewrites it).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue
from prune2tvm.compile.passes.activation_matmul import CONSTANT_OPERAND, KERNEL, PRODUCT, unsupported
from prune2tvm.compile.passes.decisions import (DecisionLog, LayerDecision, LayerNamer, Probe, Selector, const,
                                                decide_bsr, in_graph_order, pack_dense, rewrite_functions,
                                                selected, static_shape)
from prune2tvm.compile.passes.fuse_epilogue import FusableKernel, KernelRegistry, register
from prune2tvm.sparse import BsrMatrix


# Makes the kernel for one layer: (rows M, BsrMatrix, Epilogue) -> PrimFunc
KernelFactory = Callable[[int, BsrMatrix, Epilogue], tvm.tirx.PrimFunc]
# The arrays that kernel takes after x: (rows M, BsrMatrix) -> [data, indices, indptr] or another layout's three
KernelArrays = Callable[[int, BsrMatrix], list]


def sparsify_dense(mod: tvm.IRModule, block: tuple[int, int], threshold: float, kernel: KernelFactory,
                   names: LayerNamer | None = None, select: Selector | None = None,
                   kernels: KernelRegistry | None = None, pack: bool = False,
                   arrays: KernelArrays | None = None) -> tuple[tvm.IRModule, list[LayerDecision]]:
    """Return the rewritten module and one decision per constant-weight matmul, in graph order.
    Each kernel emitted is entered in ``kernels`` (for ``fuse_epilogues``). ``arrays`` gives a
    kernel's weight arrays (default: the BSR arrays)."""
    x, weight, other = wildcard(), is_const(), wildcard()
    transposed = is_op("relax.permute_dims")(weight)
    pattern = (is_op("relax.matmul")(x, transposed) | is_op("relax.matmul")(x, weight)
               | is_op("relax.matmul")(x, other))
    log = DecisionLog(names)
    builder = relax.BlockBuilder(mod)  # gives each added kernel a typed GlobalVar

    def rewrite(call: relax.Call, matches: dict, values: dict, _uses: dict) -> relax.Expr:
        if log.seen(call):
            return call
        if weight not in matches:  # e.g. attention's activation x activation products
            decision = log.add(call, "dense", None, static_shape(call) or [], block)
            if isinstance(call.args[0], tvm.ir.GenericConst):
                decision.reason = "the constant is the left operand (W @ x); only x @ W is rewritten; left dense"
            elif (why := unsupported(call, values)) == CONSTANT_OPERAND:
                decision.reason = "an operand computed from constants only (not a plain weight); left to TVM's op"
            elif not pack:
                decision.reason = f"{PRODUCT}: TVM's op"  # --dense-kernel tvm, or a GPU target
            else:  # rewritten by ``activation_matmul`` after this pass, or left to TVM
                decision.reason = f"{PRODUCT}: " + (KERNEL if why is None else f"{why}; left to TVM's op")
            return call
        w = matches[weight].value.numpy()
        axes = matches[transposed].attrs.axes if transposed in matches else None
        if w.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            decision = log.add(call, "dense", None, list(w.shape), block)
            decision.reason = f"weight of rank {w.ndim}, permuted" if w.ndim == 2 else f"weight of rank {w.ndim}"
            decision.reason += "; only 2-D weights (x @ W, x @ W.T) are rewritten; left dense"
            return call
        w_nk = w if transposed in matches else w.T  # a transposed one is stored [N, K]
        n, k = w_nk.shape
        x_expr = matches[x]
        decision = log.add(call, "dense", w_nk, [n, k], block)
        x_shape = static_shape(x_expr)
        dtype = x_expr.ty.dtype
        if x_shape is None:
            decision.reason = "activation shape is not static"
            return call
        if dtype != "float32" or w_nk.dtype != np.float32:
            decision.reason = f"dtype {dtype} (BSR kernels are float32)"
            return call
        bsr = decide_bsr(decision, w_nk, block, threshold, measured=select is not None)
        w_kn = np.ascontiguousarray(w_nk.T)
        probe = Probe(x_shape, lambda v: relax.op.matmul(v, relax.const(w_kn)))
        rows = math.prod(x_shape[:-1])
        if bsr is None or not selected(decision, probe, select):
            bsr = pack_dense(decision, w_nk, rows) if pack else None
            if bsr is None:
                return call
        gvar = builder.add_func(kernel(rows, bsr, NO_EPILOGUE), "bsr_matmul")
        data, indices, indptr = arrays(rows, bsr) if arrays is not None else bsr.kernel_arrays()
        weights = const(data)
        register(kernels, gvar, FusableKernel(lambda e, rows=rows, bsr=bsr: kernel(rows, bsr, e), 1, decision), weights)
        flat = relax.op.reshape(x_expr, [rows, k]) if len(x_shape) != 2 else x_expr
        out = relax.call_tir(gvar, [flat, weights, const(indices), const(indptr), const(np.zeros(n, np.float32))],
                             relax.TensorType([rows, n], dtype))
        return relax.op.reshape(out, [*x_shape[:-1], n]) if len(x_shape) != 2 else out

    return rewrite_functions(mod, builder, pattern, rewrite, bindings=True), in_graph_order(log.decisions())
