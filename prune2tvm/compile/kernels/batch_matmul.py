"""Products of two activations on CPUs: out[b, M, N] = a[b, M, K] @ bmat[b, K, N].

Attention computes two of these per head (Q @ K.T and softmax @ V), and TVM's default schedule
for them, which an untuned build gets, is a scalar loop nest on one core: in a small torch
``TransformerEncoder`` (64 tokens, width 256), 1.5 ms of the model's 2.3 ms, where onnxruntime
ran the whole model in 1.0 ms.

Parallel over tiles of MR rows x NV vectors of ``lanes`` columns (of every batch); each task
keeps MR x NV vector accumulators in registers and, for each k, loads NV vectors of row k of
the right operand and broadcasts one element of the left operand per row into them: the
register-blocked outer product of BLAS kernels, without packing (the operands of attention
are small enough to stay in L1/L2). A batch of 1 on either side is broadcast. Rows past M are
computed on the last row and not stored; the last vector of a row whose N is not a multiple
of ``lanes`` is loaded and stored lane by lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

# TVM keeps a scratch buffer on the stack (where LLVM promotes it to registers) only under
# 1024 bytes: one accumulator buffer per vector column, MR rows each.
MAX_ACCUMULATORS = {16: 24, 8: 12, 4: 24}  # vector registers for accumulators (AVX-512, AVX2, NEON)
MAX_VECTORS = 4  # vector columns per tile


@dataclass(frozen=True)
class BatchMatmulShape:
    batch: int  # output batches
    rows: int  # M
    inputs: int  # K
    outputs: int  # N
    left_batch: int  # batch or 1 (broadcast)
    right_batch: int  # batch or 1 (broadcast)


def tiling(shape: BatchMatmulShape, lanes: int) -> tuple[int, int]:
    """(MR, NV): rows and vector columns of a task's tile, as many accumulators as the
    registers allow; MR divides M where a divisor that large exists."""
    vectors = -(-shape.outputs // lanes)
    nv = min(vectors, MAX_VECTORS)
    nv = next(v for v in range(1, nv + 1) if -(-vectors // v) == -(-vectors // nv))  # as few tiles, less padding
    most = max(1, min(MAX_ACCUMULATORS.get(lanes, 12) // nv, 255 // lanes, shape.rows))
    dividing = [r for r in range(1, most + 1) if shape.rows % r == 0]
    mr = dividing[-1] if dividing[-1] * 3 >= most * 2 else most
    return mr, nv


def batch_matmul_cpu(shape: BatchMatmulShape, lanes: int = 16):
    """The kernel for ``shape``: ``batch_matmul(a[left_batch, M, K], b[right_batch, K, N], out[batch, M, N])``."""
    B, M, K, N, BA, BB = (shape.batch, shape.rows, shape.inputs, shape.outputs, shape.left_batch,
                          shape.right_batch)
    V = lanes
    MR, NV = tiling(shape, V)
    VT = -(-N // V)  # vectors per row
    NT = -(-VT // NV)  # column tiles
    MT = -(-M // MR)  # row tiles
    WHOLE = N % V == 0
    EXACT = VT % NV == 0  # no tile has vectors past N
    vec = f"float32x{V}"

    def step(a, bm, accs, ba, bb, m0, n0, k):
        """One k of the tile: NV vectors of bm's row k, times a[m0 + i, k] broadcast."""
        cols = []
        for j in range(NV):
            n = n0 + j * V
            if WHOLE and EXACT:
                cols.append(T.bind(bm.vload([bb, k, n], vec)))
            elif WHOLE:
                cols.append(T.bind(T.if_then_else(n < N, bm.vload([bb, k, T.min(n, N - V)], vec),
                                                  T.Broadcast(T.float32(0), V))))
            else:
                lane = T.Ramp(n, 1, V)
                cols.append(T.bind(T.Select(lane < T.Broadcast(N, V), bm[bb, k, T.min(lane, T.Broadcast(N - 1, V))],
                                            T.Broadcast(T.float32(0), V))))
        for i in range(MR):
            ai = T.bind(T.Broadcast(a[ba, T.min(m0 + i, M - 1), k], V))
            for j in range(NV):
                T.buffer_store(accs[j], accs[j].vload([i, 0], vec) + ai * cols[j], [i, T.Ramp(0, 1, V)])

    def start(accs):
        for j in range(NV):
            for i in range(MR):
                T.buffer_store(accs[j], T.Broadcast(T.float32(0), V), [i, T.Ramp(0, 1, V)])

    def store(out, accs, b, m0, n0):
        for i in range(MR):
            with T.If(m0 + i < M):
                with T.Then():
                    for j in range(NV):
                        n = n0 + j * V
                        if WHOLE and EXACT:
                            T.buffer_store(out, accs[j].vload([i, 0], vec), [b, m0 + i, T.Ramp(n, 1, V)])
                        elif WHOLE:
                            with T.If(n < N):
                                with T.Then():
                                    T.buffer_store(out, accs[j].vload([i, 0], vec), [b, m0 + i, T.Ramp(n, 1, V)])
                        else:
                            for v in range(V):
                                with T.If(n + v < N):
                                    with T.Then():
                                        T.buffer_store(out, accs[j][i, v], [b, m0 + i, n + v])

    @T.prim_func(private=True)
    def batch_matmul(a: T.Buffer((BA, M, K), "float32"), bm: T.Buffer((BB, K, N), "float32"),
                     out: T.Buffer((B, M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(B * MT * NT):
            acc0 = T.alloc_buffer((MR, V), "float32")
            acc1 = T.alloc_buffer((MR, V), "float32")
            acc2 = T.alloc_buffer((MR, V), "float32")
            acc3 = T.alloc_buffer((MR, V), "float32")
            start([acc0, acc1, acc2, acc3])
            for k in range(K):
                step(a, bm, [acc0, acc1, acc2, acc3], (t // (MT * NT)) % BA, (t // (MT * NT)) % BB,
                     (t // NT) % MT * MR, t % NT * NV * V, k)
            store(out, [acc0, acc1, acc2, acc3], t // (MT * NT), (t // NT) % MT * MR, t % NT * NV * V)

    return batch_matmul


def reference(a, bm):
    """numpy's result for the same operands ([BA, M, K] @ [BB, K, N], a batch of 1 broadcast)."""
    return np.matmul(a, bm)
