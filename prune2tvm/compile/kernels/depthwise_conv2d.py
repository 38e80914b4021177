"""Depthwise conv2d (NCHW, one filter per channel) as a hand-scheduled TVMScript kernel.

Depthwise convs stay dense (a 3x3 filter per channel has nothing to gain from blocks), but
TVM's default schedule leaves them naive and single-threaded, and meta_schedule needs many
trials per shape to do well: in MobileNet V2 they were a third of the BSR build's time. This
kernel runs in parallel over (image, channel, band of output rows); each output row is a few
vectors of accumulators, and each of the KH x KW weights is broadcast once per row.
The padding is handled inside (no padded copy of the input: 18 such copies were 0.8 ms of
MobileNet V2). The bias add and clamp that follow (BN folded, ReLU6) fuse into its store like
the BSR kernels' (``passes/fuse_epilogue.py``: the bias is the last argument).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue, clamp

ROWS_PER_TASK = 8  # output rows per task: enough work per task, enough tasks for the threads


@dataclass(frozen=True)
class DepthwiseShape:
    batch: int
    channels: int
    size: tuple[int, int]  # input height and width
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    out: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    dtype: str = "float32"

    def interior(self, beyond: int = 0) -> tuple[int, int]:
        """[first, last] output columns whose every tap lies inside the input row, with
        ``beyond`` more columns after the last tap's."""
        (_, w), (_, left, _, _), (_, kw), (_, sw), (_, dw) = self.size, self.pads, self.kernel, self.stride, self.dilation
        first = -(-left // sw)
        last = min(self.out[1] - 1, (w - 1 - beyond - (kw - 1) * dw + left) // sw)
        return first, last


def whole_load(columns: int) -> int:
    """The power of two at least ``columns`` wide that a strided tap loads: LLVM splits a load
    of 31 lanes into 16 + 8 + 4 + 2 + 1 and inserts, which take the multiply-adds' port
    (alone at 96 channels 112 -> 56: 0.23 ms with 31 columns, 0.14 ms with 32)."""
    return 1 << (columns - 1).bit_length()


def depthwise_conv2d_cpu(s: DepthwiseShape, lanes: int = 16, epilogue: Epilogue = NO_EPILOGUE):
    """Arguments: x, weight [C, KH*KW], bias [C], out [N, C, OH, OW].

    x is the unpadded input [N, C, H, W]: the padding is never materialised. A tap row outside
    the input is skipped, the output columns whose taps all lie inside the row are vectors
    without checks (a last vector overlapping the one before it rather than leaving the
    interior), and the few border columns are computed one by one with their taps checked.

    A strided conv reads each tap's (V - 1) * SW + 1 contiguous input columns in one load and
    keeps every SW-th lane (a shuffle in registers: ``vpermi2ps`` on AVX-512). Measured alone
    on MobileNet V2's four stride-2 shapes, 1.2-3x faster than reading the input split into
    stride phases (a padded copy, ``pad_phases``) or gathering every SW-th element."""
    N, C, (H, W), (OH, OW), (KH, KW) = s.batch, s.channels, s.size, s.out, s.kernel
    (SH, SW), (DH, DW), dtype = s.stride, s.dilation, s.dtype
    TOP, LEFT = s.pads[0], s.pads[1]
    FIRST, LAST = s.interior()
    if LAST < FIRST:  # no interior column at all: every column is a (left) border column
        FIRST, LAST = OW, OW - 1
    V = max(1, min(lanes, LAST - FIRST + 1))
    SPREAD = (V - 1) * SW + 1  # input columns under one vector of a tap
    # a strided tap reads ``whole_load`` columns where the interior can end so that the load
    # stays inside the row
    last = s.interior(beyond=whole_load(SPREAD) - SPREAD)[1]
    if SW > 1 and V > 1 and last - FIRST + 1 >= V:
        LAST, SPREAD = last, whole_load(SPREAD)
    IW = LAST - FIRST + 1  # interior output columns
    U = (IW + V - 1) // V if IW else 0  # interior vectors per output row
    U1 = max(U, 1)
    NBORDER = OW - IW  # columns 0 .. FIRST-1, then LAST+1 .. OW-1
    EVERY = [SW * i for i in range(V)]
    RT = min(ROWS_PER_TASK, OH)
    BANDS = (OH + RT - 1) // RT
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def depthwise_conv2d(x: T.Buffer((N, C, H, W), dtype), weight: T.Buffer((C, KH * KW), dtype),
                         bias: T.Buffer((C,), dtype), out: T.Buffer((N, C, OH, OW), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(N * C * BANDS):
            acc = T.alloc_buffer((U1, V), dtype)
            one = T.alloc_buffer((1,), dtype)
            for row in range(RT):
                if (task % BANDS) * RT + row < OH:
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            acc[u, v] = T.cast(0, dtype)
                    for kh in range(KH):
                        if 0 <= ((task % BANDS) * RT + row) * SH + kh * DH - TOP \
                                and ((task % BANDS) * RT + row) * SH + kh * DH - TOP < H:
                            for kw in T.unroll(KW):
                                for u in T.unroll(U):
                                    if SW > 1 and V > 1:
                                        acc[u, T.Ramp(0, 1, V)] = acc[u, T.Ramp(0, 1, V)] + T.Broadcast(
                                            weight[task // BANDS % C, kh * KW + kw], V) * T.Shuffle([x[
                                                task // (BANDS * C), task // BANDS % C,
                                                ((task % BANDS) * RT + row) * SH + kh * DH - TOP,
                                                T.Ramp((FIRST + T.min(u * V, IW - V)) * SW + kw * DW - LEFT, 1,
                                                       SPREAD)]], EVERY)
                                    else:
                                        for v in T.vectorized(V):
                                            acc[u, v] = acc[u, v] + weight[task // BANDS % C, kh * KW + kw] * x[
                                                task // (BANDS * C), task // BANDS % C,
                                                ((task % BANDS) * RT + row) * SH + kh * DH - TOP,
                                                (FIRST + T.min(u * V, IW - V) + v) * SW + kw * DW - LEFT]
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            out[task // (BANDS * C), task // BANDS % C, (task % BANDS) * RT + row,
                                FIRST + T.min(u * V, IW - V) + v] = clamp(
                                    acc[u, v] + bias[task // BANDS % C], LO, HI, dtype)
                    for e in range(NBORDER):
                        one[0] = T.cast(0, dtype)
                        for kh in range(KH):
                            for kw in range(KW):
                                if 0 <= ((task % BANDS) * RT + row) * SH + kh * DH - TOP \
                                        and ((task % BANDS) * RT + row) * SH + kh * DH - TOP < H \
                                        and 0 <= T.Select(e < FIRST, e, e - FIRST + LAST + 1) * SW + kw * DW - LEFT \
                                        and T.Select(e < FIRST, e, e - FIRST + LAST + 1) * SW + kw * DW - LEFT < W:
                                    one[0] = one[0] + weight[task // BANDS % C, kh * KW + kw] * x[
                                        task // (BANDS * C), task // BANDS % C,
                                        ((task % BANDS) * RT + row) * SH + kh * DH - TOP,
                                        T.Select(e < FIRST, e, e - FIRST + LAST + 1) * SW + kw * DW - LEFT]
                        out[task // (BANDS * C), task // BANDS % C, (task % BANDS) * RT + row,
                            T.Select(e < FIRST, e, e - FIRST + LAST + 1)] = clamp(
                                one[0] + bias[task // BANDS % C], LO, HI, dtype)

    return depthwise_conv2d


def depthwise_reference(x, weight, bias, stride, padding, dilation):
    """numpy reference: x [N, C, H, W], weight [C, 1, KH, KW], padding (top, left, bottom, right)."""
    import numpy as np

    top, left, bottom, right = padding
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, hp, wp = xp.shape
    kh_size, kw_size = weight.shape[2:]
    (sh, sw), (dh, dw) = stride, dilation
    oh = (hp - dh * (kh_size - 1) - 1) // sh + 1
    ow = (wp - dw * (kw_size - 1) - 1) // sw + 1
    out = np.zeros((n, c, oh, ow), np.float64)
    for kh in range(kh_size):
        for kw in range(kw_size):
            window = xp[:, :, kh * dh: kh * dh + sh * (oh - 1) + 1: sh, kw * dw: kw * dw + sw * (ow - 1) + 1: sw]
            out += window * weight[None, :, 0, kh, kw, None, None]
    return (out + bias[None, :, None, None]).astype(np.float32)
