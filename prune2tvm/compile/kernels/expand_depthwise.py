"""A 1x1 BSR conv and the depthwise conv that reads it, in one kernel (MobileNet V2's
"expand" and "depthwise" layers).

Apart, the 1x1 conv writes its expanded output (6x the block's input channels) to memory and
the depthwise conv reads it back: at 112x112 that is 4.8 MB each way, and both kernels were
bound by it. Here each task computes, for R expanded channels (one block row of the sparse
weight) and a band of output rows, the expanded rows that band reads, into a buffer of its
own, already zero-padded for the depthwise conv; then the depthwise rows from that buffer.
The expanded tensor is never stored. The expanded rows under two bands' seams are computed
by both (KH - 1 rows per band).

Both layers keep their epilogues: the 1x1 conv's bias and clamp (BN folded, ReLU6) before
the buffer, the depthwise conv's after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue, clamp
from prune2tvm.compile.kernels.depthwise_conv2d import DepthwiseShape, whole_load

# output rows per task: a stride-1 band reads ROWS + 2 expanded rows (for 3x3), so longer
# bands recompute less; a stride-2 band reads 2 * ROWS + 1 and keeps its buffer in L1
BAND_ROWS = {1: 16, 2: 8}


@dataclass(frozen=True)
class ExpandDepthwiseShape:
    depthwise: DepthwiseShape  # channels = the 1x1 conv's output channels
    in_channels: int  # of the 1x1 conv
    block: tuple[int, int]  # of the 1x1 conv's weight [C, CI]: R output channels x CB inputs
    nnzb: int

    def band(self) -> tuple[int, int]:
        """(output rows per task, expanded rows they read)."""
        s = self.depthwise
        rows = min(BAND_ROWS.get(s.stride[0], 8), s.out[0])
        return rows, (rows - 1) * s.stride[0] + (s.kernel[0] - 1) * s.dilation[0] + 1


def expand_depthwise_cpu(s: ExpandDepthwiseShape, lanes: int = 16, expand: Epilogue = NO_EPILOGUE,
                         epilogue: Epilogue = NO_EPILOGUE):
    """Arguments: x [N, CI*H*W] (the 1x1 conv's input, flattened), data [nnzb, R, CB], offsets
    [nnzb*CB] (each stored column's input channel * H*W, ``bsr_conv2d.column_offsets``), indptr
    [C/R + 1], residual (one unused element), bias of the 1x1 conv [C], depthwise weight
    [C, KH*KW], depthwise bias [C], out [N, C, OH, OW]: the 1x1 conv kernel's arguments, then
    the depthwise kernel's but its input."""
    d = s.depthwise
    N, C, (H, W), (OH, OW), (KH, KW) = d.batch, d.channels, d.size, d.out, d.kernel
    (SH, SW), (DH, DW), dtype = d.stride, d.dilation, d.dtype
    TOP, LEFT = d.pads[0], d.pads[1]
    CI, (R, CB), NNZB = s.in_channels, s.block, max(s.nnzb, 1)
    NB = C // R
    RT, E = s.band()
    BANDS = (OH + RT - 1) // RT
    # the buffer's rows: LEFT zeros, the W expanded columns, zeros up to the last tap
    WP = max(LEFT + W, (OW - 1) * SW + (KW - 1) * DW + 1)
    # expanded row: V1-column vectors, the last overlapping the one before; CH of them at a time
    V1 = min(lanes, W)
    U1 = (W + V1 - 1) // V1
    PASSES = (U1 + max(1, 24 // R) - 1) // max(1, 24 // R)  # up to 24 accumulators at a time
    CH = (U1 + PASSES - 1) // PASSES
    # depthwise rows: U2 vectors of V2 columns. A row narrower than a vector (14, 7) takes the
    # next power of two (``whole_load``: LLVM splits a 14-lane load into 8 + 4 + 2 lanes and
    # two inserts, two shuffles per multiply-add). Lanes past the row read the buffer's next row or its SLACK
    # and are never stored; the store is of OW lanes.
    V2 = min(lanes, whole_load(OW))
    U2 = (OW + V2 - 1) // V2
    SPREAD = whole_load((V2 - 1) * SW + 1)  # buffer columns under one vector of a tap
    EVERY = [SW * i for i in range(V2)]
    SLACK = SPREAD + (KW - 1) * DW
    NARROW = OW < V2
    LO1, HI1, LO2, HI2 = expand.low, expand.high, epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def expand_depthwise(x: T.Buffer((N, CI * H * W), dtype), data: T.Buffer((NNZB, R, CB), dtype),
                         offsets: T.Buffer((NNZB * CB,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                         residual: T.Buffer((1,), dtype), bias1: T.Buffer((C,), dtype),
                         weight: T.Buffer((C, KH * KW), dtype),
                         bias: T.Buffer((C,), dtype), out: T.Buffer((N, C, OH, OW), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(N * BANDS * NB):
            exs = T.alloc_buffer((R * E * WP + SLACK,), dtype)
            ex = T.decl_buffer((R, E, WP), dtype, data=exs.data)
            acc = T.alloc_buffer((R, CH, V1), dtype)
            acc2 = T.alloc_buffer((U2, V2), dtype)
            # 1. the expanded rows of R channels that this band reads, padded with zeros
            for e in range(E):
                if 0 <= (task // NB % BANDS) * RT * SH - TOP + e and (task // NB % BANDS) * RT * SH - TOP + e < H:
                    for p in range(PASSES):
                        for r in T.unroll(R):
                            for u in T.unroll(CH):
                                for v in T.vectorized(V1):
                                    acc[r, u, v] = T.cast(0, dtype)
                        for b in range(indptr[task % NB], indptr[task % NB + 1]):
                            for cc in T.unroll(CB):
                                for r in T.unroll(R):
                                    for u in T.unroll(CH):
                                        for v in T.vectorized(V1):
                                            acc[r, u, v] = acc[r, u, v] + data[b, r, cc] * x[
                                                task // (NB * BANDS), offsets[b * CB + cc]
                                                + ((task // NB % BANDS) * RT * SH - TOP + e) * W
                                                + T.min(T.min(p * CH + u, U1 - 1) * V1, W - V1) + v]
                        for r in T.unroll(R):
                            for u in T.unroll(CH):
                                for v in T.vectorized(V1):
                                    ex[r, e, LEFT + T.min(T.min(p * CH + u, U1 - 1) * V1, W - V1) + v] = clamp(
                                        acc[r, u, v] + bias1[(task % NB) * R + r], LO1, HI1, dtype)
                    for r in T.unroll(R):
                        for q in range(LEFT):
                            ex[r, e, q] = T.cast(0, dtype)
                        for q in range(WP - LEFT - W):
                            ex[r, e, LEFT + W + q] = T.cast(0, dtype)
                else:
                    for r in T.unroll(R):
                        for q in T.vectorized(WP):
                            ex[r, e, q] = T.cast(0, dtype)
            # 2. the depthwise rows from the buffer: every column a vector, nothing checked
            for r in range(R):
                for row in range(RT):
                    if (task // NB % BANDS) * RT + row < OH:
                        for u in T.unroll(U2):
                            for v in T.vectorized(V2):
                                acc2[u, v] = T.cast(0, dtype)
                        for kh in T.unroll(KH):
                            for kw in T.unroll(KW):
                                for u in T.unroll(U2):
                                    if SW > 1 and V2 > 1:
                                        acc2[u, T.Ramp(0, 1, V2)] = acc2[u, T.Ramp(0, 1, V2)] + T.Broadcast(
                                            weight[(task % NB) * R + r, kh * KW + kw], V2) * T.Shuffle([exs[T.Ramp(
                                                (r * E + row * SH + kh * DH) * WP
                                                + T.max(T.min(u * V2, OW - V2), 0) * SW + kw * DW, 1, SPREAD)]], EVERY)
                                    else:
                                        for v in T.vectorized(V2):
                                            acc2[u, v] = acc2[u, v] + weight[(task % NB) * R + r, kh * KW + kw] * exs[
                                                (r * E + row * SH + kh * DH) * WP
                                                + (T.max(T.min(u * V2, OW - V2), 0) + v) * SW + kw * DW]
                        for u in T.unroll(U2):
                            for v in T.vectorized(OW if NARROW else V2):
                                out[task // (NB * BANDS), (task % NB) * R + r, (task // NB % BANDS) * RT + row,
                                    T.max(T.min(u * V2, OW - V2), 0) + v] = clamp(
                                        acc2[u, v] + bias[(task % NB) * R + r], LO2, HI2, dtype)

    return expand_depthwise
