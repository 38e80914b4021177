"""Depthwise conv2d (NCHW, one filter per channel) as a hand-scheduled TVMScript kernel.

Depthwise convs stay dense (a 3x3 filter per channel has nothing to gain from blocks), but
TVM's default schedule leaves them naive and single-threaded, and meta_schedule needs many
trials per shape to do well: in MobileNet V2 they were a third of the BSR build's time. This
kernel runs in parallel over (image, channel, band of output rows); each output row is a few
vectors of accumulators, and each of the KH x KW weights is broadcast once per row. The input
comes zero-padded and flattened (``bsr_conv2d.pad_flat_cpu``), so no bounds are checked.
The bias add and clamp that follow (BN folded, ReLU6) fuse into its store like the BSR
kernels' (``passes/fuse_epilogue.py``: the bias is the last argument).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue

ROWS_PER_TASK = 8  # output rows per task: enough work per task, enough tasks for the threads


@dataclass(frozen=True)
class DepthwiseShape:
    batch: int
    channels: int
    padded: tuple[int, int]  # input height and width after padding
    out: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    dtype: str = "float32"


def depthwise_conv2d_cpu(s: DepthwiseShape, lanes: int = 16, epilogue: Epilogue = NO_EPILOGUE):
    """Arguments: the padded input flattened per image [N, C*HP*WP], weight [C, KH*KW],
    bias [C], out [N, C, OH, OW]. A row that is not a whole number of vectors ends with a
    vector overlapping the one before it (those outputs are computed twice, identically)."""
    N, C, (HP, WP), (OH, OW), (KH, KW) = s.batch, s.channels, s.padded, s.out, s.kernel
    (SH, SW), (DH, DW), dtype = s.stride, s.dilation, s.dtype
    V = min(lanes, OW)
    U = (OW + V - 1) // V  # vectors per output row
    RT = min(ROWS_PER_TASK, OH)
    BANDS = (OH + RT - 1) // RT
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def depthwise_conv2d(x: T.Buffer((N, C * HP * WP), dtype), weight: T.Buffer((C, KH * KW), dtype),
                         bias: T.Buffer((C,), dtype), out: T.Buffer((N, C, OH, OW), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(N * C * BANDS):
            acc = T.alloc_buffer((U, V), dtype)
            for row in range(RT):
                if (task % BANDS) * RT + row < OH:
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            acc[u, v] = T.cast(0, dtype)
                    for kh in range(KH):
                        for kw in T.unroll(KW):
                            for u in T.unroll(U):
                                for v in T.vectorized(V):
                                    acc[u, v] = acc[u, v] + weight[task // BANDS % C, kh * KW + kw] * x[
                                        task // (BANDS * C),
                                        (task // BANDS % C) * HP * WP
                                        + (((task % BANDS) * RT + row) * SH + kh * DH) * WP
                                        + (T.min(u * V, OW - V) + v) * SW + kw * DW]
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            out[task // (BANDS * C), task // BANDS % C, (task % BANDS) * RT + row,
                                T.min(u * V, OW - V) + v] = T.min(T.max(
                                    acc[u, v] + bias[task // BANDS % C], T.cast(LO, dtype)), T.cast(HI, dtype))

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
