"""Block-sparse conv2d (NCHW) as hand-scheduled TVMScript: a direct "shifted" sparse product.

The weight [O, C, KH, KW] is viewed as a matrix [O, C*KH*KW] (column q = (c, kh, kw)) in
BSR form with R x CB blocks. Each stored weight multiplies the (already padded) input shifted
by its (kh, kw): no im2col is materialised. A 1x1 conv is the same kernel with a 1x1 window
(a sparse matrix times pixels).

In parallel over (image, output row, tile of output columns, block row); each task keeps
U x R vector accumulators of V output columns in registers, every nonzero weight broadcast.

A stride-1 conv whose rows are wider than a vector but not a whole number of vectors (56 or 28
columns with 16 lanes) runs over "wrapped rows" (``wrapped``): the input is padded in height
only, its rows laid end to end, and the image computed as one row of whole vectors; a tap that
falls off a row's edge reads the row beside it, and a per-lane mask (a masked FMA on AVX-512)
drops it. Row by row, the last vector of each such row would be computed twice in part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tvm.script import tirx as T

from prune2tvm.compile.kernels.bsr_matmul import NO_EPILOGUE, Epilogue, clamp

# Relax's op-pattern kind "opaque" for the layout copies: their loops look elementwise to
# AnnotateTIROpPattern, and FuseOps then fused a ReLU6 before them into one function that
# FuseTIR refused ("Inconsistent buffers T_minimum and x"), as soon as a dense conv fed one.
OPAQUE = 8


@dataclass(frozen=True)
class BsrConv2dShape:
    batch: int
    in_channels: int
    padded: tuple[int, int]  # input height and width after padding
    out_channels: int
    out: tuple[int, int]  # output height and width
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    block: tuple[int, int]  # (R output channels, CB columns of the [O, C*KH*KW] matrix)
    nnzb: int
    dtype: str = "float32"
    # (left, right) padding of a conv over wrapped rows (``wrapped``), whose input is padded
    # in height only (``padded`` = (H + top + bottom, W)); None: padded on all sides
    wrap: tuple[int, int] | None = None

    @property
    def image_size(self) -> int:
        """Elements per image of the kernel's flat input; wrapped rows have ``left`` elements
        before the first channel and ``right`` after the last, read only by masked lanes."""
        return self.in_channels * self.padded[0] * self.padded[1] + sum(self.wrap or (0, 0))


def _tiling(out_width: int, rows: int, lanes: int, vectors_per_task: int | None = None) -> tuple[int, int, int]:
    """(V output columns per vector, U vectors per task, UT tasks per output row)."""
    v = min(lanes, out_width)
    vectors = (out_width + v - 1) // v
    # by default up to 16 accumulators (of 32 AVX-512 registers) in flight
    u = vectors_per_task or max(1, min(vectors, 16 // rows))
    return v, u, (vectors + u - 1) // u


def computed_output(s: BsrConv2dShape, lanes: int = 16) -> tuple[int, int]:
    """The output's (height, width) as the kernel computes it.

    * A 1x1 conv with stride 1 and no padding is a sparse matrix times the image's pixels,
      computed over them as one row (H x W -> 1 x H*W), so a 7x7 or 14x14 image fills whole
      vectors (measured alone: 2.5x faster at 7x7, 1.45x at 14x14, 1.3x at 56x56).
    * Any other stride-1 conv narrower than a vector (3x3 at 7x7 or 14x14) is computed over
      "virtual rows": output (oh, ow) is pixel oh*WP + ow of one long row with the padded
      input's pitch WP, so every tap reads a whole vector; the WP - OW columns between rows
      are computed and never stored (``virtual_rows``).
    * A conv over wrapped rows (``wrapped``) is computed over its pixels as one row too.
    * Otherwise, row by row."""
    if s.wrap is not None:
        return 1, s.out[0] * s.out[1]
    if s.kernel == (1, 1) and s.stride == (1, 1) and s.dilation == (1, 1) and s.padded == s.out:
        return 1, s.out[0] * s.out[1]
    if virtual_rows(s, lanes):
        return 1, (s.out[0] - 1) * s.padded[1] + s.out[1]
    return s.out


def virtual_rows(s: BsrConv2dShape, lanes: int = 16) -> bool:
    return s.stride == (1, 1) and s.out[1] < lanes and s.out[0] > 1 and s.padded[1] != s.out[1]


# Narrower blocks keep more vectors per task (16 / R), and with them more masks than
# AVX-512's 7 mask registers: 1x1 blocks at 90 % ran 1.7x slower wrapped, 2x1 1.3x.
WRAP_MIN_ROWS = 4
# On AMD Zen 5, 4x1 blocks ran about 2x slower wrapped than row by row: a 3x3 conv 64->64 at
# 56x56 took 0.206 ms wrapped and 0.094 row by row at 90 %, 0.637 and 0.345 at 50 %
# (bsr_layers.py, 40 calls each). On the Intel Xeon (emeraldrapids) wrapped was 1.2x faster
# (the figures in ``wrapped``). On Zen 5, 8x1 and 16x1 blocks were within 6 % either way, and
# the packed dense conv was 1.1x faster wrapped.
WRAP_MIN_ROWS_ZEN = 8


def wrap_min_rows(mcpu: str) -> int:
    """The narrowest blocks (output channels) a conv runs over wrapped rows with, for LLVM's
    name of the target CPU."""
    return WRAP_MIN_ROWS_ZEN if mcpu.startswith("znver") else WRAP_MIN_ROWS


def wrapped(s: BsrConv2dShape, left: int, right: int, lanes: int = 16,
            min_rows: int = WRAP_MIN_ROWS) -> BsrConv2dShape | None:
    """``s`` (padded on all sides) over wrapped rows, or None where the kernel already computes
    the image as one row (``computed_output``), its rows are whole vectors, or the wrapped
    kernel cannot take it or does not pay. It takes stride-1 convs with blocks one column
    wide whose output is as wide as their input (``left + right`` is the window's width less
    one), in blocks of at least ``min_rows`` output channels (``wrap_min_rows``).

    Measured in one-conv models against onnxruntime's Conv, each in a process of its own:
    dense 3x3 at 56x56 (64 channels) 1.36-1.37x -> 1.23-1.24x of its time, at 28x28 (128)
    1.37x -> 1.22x; 4x1 blocks at 70 % 0.71x -> 0.58x at 56x56, 0.58-0.71x -> 0.50-0.61x at
    28x28; at 90 % the same (0.25x). At 14x14, virtual rows measured the same as wrapped rows alone (1.22x
    against 1.24x), so those stay as they are."""
    width = s.padded[1] - left - right
    if (computed_output(s, lanes)[0] == 1 or s.stride != (1, 1) or s.block[1] != 1 or s.out[1] != width
            or s.out[1] % lanes == 0 or s.block[0] < min_rows):
        return None
    return replace(s, padded=(s.padded[0], width), wrap=(left, right))


WRAP_MAX_VECTORS = 4  # per task: one mask each

# Input rows (channel, kernel row) one pass of a wrapped kernel reads before the next kernel
# column's pass (``wrap_columns``), at full density: 32 channels of a dense 3x3 conv, about
# 18 KB of a 56-wide image, stay in L1 through its three passes (in one conv alone at
# 56x56, channels per pass: all 64 1.19x of onnxruntime's time, 32 1.12x, 16 1.15x, 8 1.17x).
# A sparse conv touches fewer of the rows and takes proportionally more channels per pass
# (at 90 %, passes of 32 channels were 1.07-1.6x slower than one pass).
WRAP_PASS_ROWS = 96


def wrap_passes(s: BsrConv2dShape) -> tuple[int, int]:
    """(channels per pass, passes) of a conv over wrapped rows."""
    stored = s.nnzb * s.block[0] * s.block[1] / (s.out_channels * s.in_channels * s.kernel[0] * s.kernel[1])
    per_pass = max(1, int(WRAP_PASS_ROWS / (s.kernel[0] * max(stored, 1e-3))))
    return min(per_pass, s.in_channels), -(-s.in_channels // per_pass)


def wrap_columns(s: BsrConv2dShape, data, indices, indptr):
    """The kernel arrays of a conv over wrapped rows: (data, column offsets, run pointers).
    Each block row's stored columns are reordered into runs by (pass of channels, kernel
    column), so that every run needs one mask per vector; run (block row i, pass p, column kw)
    is blocks ``runs[(i * P + p) * KW + kw]`` up to the next pointer."""
    import numpy as np

    indptr = np.asarray(indptr, np.int64)
    indices = np.asarray(indices, np.int64)[:indptr[-1]]  # a matrix with no block has one unused
    (kh_size, kw_size), rows = s.kernel, len(indptr) - 1
    per_pass, passes = wrap_passes(s)
    block_row = np.repeat(np.arange(rows), np.diff(indptr))
    run = (block_row * passes + indices // (kh_size * kw_size) // per_pass) * kw_size + indices % kw_size
    order = np.argsort(run, kind="stable")
    runs = np.concatenate([[0], np.cumsum(np.bincount(run, minlength=rows * passes * kw_size))])
    return (np.ascontiguousarray(data[order]) if len(order) else data), column_offsets(s, indices[order]), \
        runs.astype(np.int32)


def conv_search_space(s: BsrConv2dShape, lanes: int = 16) -> list[dict]:
    """The parameter sets the conv kernel can be built with (the first is the default):
    vectors of output columns per task, within the stack's 1 KB for accumulators."""
    width = computed_output(s, lanes)[1]
    v, default, _ = _tiling(width, s.block[0], lanes)
    vectors = (width + v - 1) // v
    most = min(vectors, 255 // (s.block[0] * v), WRAP_MAX_VECTORS if s.wrap else vectors)
    return [{"vectors_per_task": default}] + [{"vectors_per_task": u} for u in (1, 2, 3, 4, 6, 8)
                                              if u <= most and u != default]


def column_offsets(s: BsrConv2dShape, indices):
    """For every stored column of every block, its offset into one padded image (flattened):
    c*HP*WP + kh*DH*WP + kw*DW. Computed once from the constant weight, so the kernel does no
    division to find (c, kh, kw)."""
    import numpy as np

    (kh_size, kw_size), (dh, dw), cb = s.kernel, s.dilation, s.block[1]
    hp, wp = s.padded
    q = (np.asarray(indices, dtype=np.int64)[:, None] * cb + np.arange(cb)[None, :]).reshape(-1)
    c, kh, kw = q // (kh_size * kw_size), q // kw_size % kh_size, q % kw_size
    offsets = c * hp * wp + kh * dh * wp + kw * dw
    return (offsets if offsets.size else np.zeros(cb, np.int64)).astype(np.int32)


def bsr_conv2d_cpu(s: BsrConv2dShape, lanes: int = 16, epilogue: Epilogue = NO_EPILOGUE,
                   vectors_per_task: int | None = None):
    """Kernel arguments: the padded input flattened per image [N, ``s.image_size``], data
    [nnzb, R, CB], ``column_offsets`` [nnzb*CB], indptr [O/R + 1], residual, bias [O], out;
    over wrapped rows, data, offsets and indptr as ``wrap_columns`` gives them. ``residual`` is
    the output's shape flattened [N*O*OH*OW] when ``epilogue.residual`` (added before the
    clamp), else one unused element.

    A row whose width is not a whole number of vectors ends with a vector that starts at
    OW - V, overlapping the one before it (those columns are computed twice, identically), so
    nothing is read past the row and the input needs no padding beyond the conv's own."""
    N, WP, O, (OH, OW) = s.batch, s.padded[1], s.out_channels, s.out
    (SH, SW) = s.stride
    OHC, OWC = computed_output(s, lanes)  # the output as the kernel computes it
    VIRTUAL = virtual_rows(s, lanes)  # pixel p is output (p // WP, p % WP), stored when p % WP < OW
    WRAP = s.wrap is not None  # pixel p is output (p // OW, p % OW); indptr points to runs
    R, CB = s.block
    NB, NNZB, dtype = O // R, max(s.nnzb, 1), s.dtype
    V, U, UT = _tiling(OWC, R, lanes, vectors_per_task)
    IMG = s.image_size
    (KW, DW), LEFT = (s.kernel[1], s.dilation[1]), (s.wrap or (0, 0))[0]
    PASSES = wrap_passes(s)[1] if WRAP else 1
    RUNS = NB * PASSES * KW if WRAP else NB
    LO, HI = epilogue.low, epilogue.high
    RES = epilogue.residual
    RS = N * O * OH * OW if RES else 1

    def column(task, u, v):
        """The computed output column of lane v of the task's vector u."""
        return T.min(((task // NB % UT) * U + u) * V, OWC - V) + v

    def on_row(task, u, v, kw):
        """Over wrapped rows: whether the tap at kernel column kw of that lane's pixel is on its row."""
        return T.And(0 <= column(task, u, v) % OW + kw * DW - LEFT, column(task, u, v) % OW + kw * DW - LEFT < OW)

    # Tasks run output row by output row, every block row of one output row together: they
    # read the same few input rows, which stay in cache.
    @T.prim_func(private=True)
    def bsr_conv2d(x: T.Buffer((N, IMG), dtype), data: T.Buffer((NNZB, R, CB), dtype),
                   offsets: T.Buffer((NNZB * CB,), "int32"), indptr: T.Buffer((RUNS + 1,), "int32"),
                   residual: T.Buffer((RS,), dtype), bias: T.Buffer((O,), dtype),
                   out: T.Buffer((N, O, OH, OW), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        outc = T.decl_buffer((N, O, OHC, OWC), dtype, data=out.data)
        for task in T.parallel(N * OHC * UT * NB):
            acc = T.alloc_buffer((U, R, V), dtype)
            for u in T.unroll(U):
                for r in T.unroll(R):
                    for v in T.vectorized(V):
                        acc[u, r, v] = T.cast(0, dtype)
            if WRAP:  # run by run: (pass of channels, kernel column kw), one mask per vector
                for p in range(PASSES):
                    for kw in T.unroll(KW):
                        for b in range(indptr[(task % NB * PASSES + p) * KW + kw],
                                       indptr[(task % NB * PASSES + p) * KW + kw + 1]):
                            for u in T.unroll(U):
                                for r in T.unroll(R):
                                    for v in T.vectorized(V):
                                        acc[u, r, v] = T.Select(
                                            on_row(task, u, v, kw),
                                            acc[u, r, v] + data[b, r, 0] * x[task // (UT * NB),
                                                                             offsets[b] + column(task, u, v)],
                                            acc[u, r, v])
            else:
                for b in range(indptr[task % NB], indptr[task % NB + 1]):
                    for cc in T.unroll(CB):
                        for u in T.unroll(U):
                            for r in T.unroll(R):
                                for v in T.vectorized(V):
                                    acc[u, r, v] = acc[u, r, v] + data[b, r, cc] * x[
                                        task // (OHC * UT * NB),
                                        offsets[b * CB + cc] + (task // (UT * NB) % OHC) * SH * WP
                                        + column(task, u, v) * SW]
            if VIRTUAL:
                for u in range(U):
                    for r in range(R):
                        for v in T.unroll(V):
                            if column(task, u, v) % WP < OW:
                                out[task // (OHC * UT * NB), (task % NB) * R + r,
                                    column(task, u, v) // WP,
                                    column(task, u, v) % WP] = clamp(
                                        acc[u, r, v] + bias[(task % NB) * R + r] + T.if_then_else(RES, residual[T.min(
                                            ((task // (OHC * UT * NB) * O + (task % NB) * R + r) * OH
                                             + column(task, u, v) // WP) * OW
                                            + column(task, u, v) % WP, RS - 1)],
                                            T.cast(0, dtype)),
                                        LO, HI, dtype)
            else:
                for u in range(U):
                    for r in range(R):
                        for v in T.vectorized(V):
                            if RES:
                                outc[task // (OHC * UT * NB), (task % NB) * R + r, task // (UT * NB) % OHC,
                                     column(task, u, v)] = clamp(
                                        acc[u, r, v] + bias[(task % NB) * R + r] + residual[
                                            ((task // (OHC * UT * NB) * O + (task % NB) * R + r) * OHC
                                             + task // (UT * NB) % OHC) * OWC
                                            + column(task, u, v)],
                                        LO, HI, dtype)
                            else:
                                outc[task // (OHC * UT * NB), (task % NB) * R + r, task // (UT * NB) % OHC,
                                     column(task, u, v)] = clamp(
                                        acc[u, r, v] + bias[(task % NB) * R + r], LO, HI, dtype)

    return bsr_conv2d


def pad_flat_cpu(batch: int, channels: int, height: int, width: int, pads: tuple[int, int, int, int],
                 dtype: str = "float32", guard: tuple[int, int] = (0, 0)):
    """The conv kernel's input: ``x`` [N, C, H, W] zero-padded by (top, left, bottom, right)
    and laid out flat [N, G0 + C * PH * PW + G1], in one parallel pass (a copy per row, zeros
    around); ``guard`` (G0, G1): zeros before the first channel and after the last (wrapped
    rows: ``BsrConv2dShape.image_size``).

    TVM's own nn.pad fused with that reshape is a per-element select with divisions, one
    thread: 0.78 ms for MobileNet V2's 3x224x224 stem input here, about 40x this kernel."""
    top, left, bottom, right = pads
    N, C, H, W = batch, channels, height, width
    PH, PW = H + top + bottom, W + left + right
    G0, G1 = guard
    IMG = G0 + C * PH * PW + G1

    # A root block, as TE-made functions have: Relax's RewriteDataflowReshape inspects every
    # single-input call_tir for a reshape pattern and requires one (the tirx parser's
    # well-formedness check does not know root blocks, hence check_well_formed=False).
    @T.prim_func(private=True, check_well_formed=False)
    def pad_flat(x: T.Buffer((N, C, H, W), dtype), out: T.Buffer((N, IMG), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for nc in T.parallel(N * C):
                if nc % C == 0:
                    for q in range(G0):
                        out[nc // C, q] = T.cast(0, dtype)
                if nc % C == C - 1:
                    for q in range(G1):
                        out[nc // C, IMG - G1 + q] = T.cast(0, dtype)
                for r in range(PH):
                    if r < top or r >= top + H:
                        for q in T.vectorized(PW):
                            out[nc // C, G0 + (nc % C) * PH * PW + r * PW + q] = T.cast(0, dtype)
                    else:
                        for q in range(left):
                            out[nc // C, G0 + (nc % C) * PH * PW + r * PW + q] = T.cast(0, dtype)
                        for q in T.vectorized(W):
                            out[nc // C, G0 + (nc % C) * PH * PW + r * PW + left + q] = x[nc // C, nc % C, r - top, q]
                        for q in range(right):
                            out[nc // C, G0 + (nc % C) * PH * PW + r * PW + left + W + q] = T.cast(0, dtype)

    return pad_flat


@dataclass(frozen=True)
class PhaseLayout:
    """A strided conv's input, zero-padded and split into its stride phases: plane (c, py, px)
    holds padded[c, py::SH, px::SW]. Tap (kh, kw) of output (oh, ow) is then element
    (oh + kh*DH // SH, ow + kw*DW // SW) of phase ((kh*DH) % SH, (kw*DW) % SW): a stride-1
    read, so the BSR kernel runs its stride-1 code, whole vectors, instead of gathering every
    SW-th element (measured: ResNet-50's stride-2 convs). Only phases some tap reads are made."""

    channels: int
    size: tuple[int, int]  # input height and width
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def phases(self) -> tuple[int, int]:
        """(rows, columns) of phases made: 0 .. the largest one a tap reads."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return max(k * dh % sh for k in range(kh)) + 1, max(k * dw % sw for k in range(kw)) + 1

    @property
    def plane(self) -> tuple[int, int]:
        (h, w), (top, left, bottom, right), (sh, sw) = self.size, self.pads, self.stride
        return -(-(h + top + bottom) // sh), -(-(w + left + right) // sw)

    @property
    def planes(self) -> int:
        return self.channels * self.phases[0] * self.phases[1]

    def offsets(self, indices, cb: int):
        """Each stored column's offset (as ``column_offsets``, for this layout)."""
        import numpy as np

        (kh_size, kw_size), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        (npy, npx), (ph, pw) = self.phases, self.plane
        q = (np.asarray(indices, dtype=np.int64)[:, None] * cb + np.arange(cb)[None, :]).reshape(-1)
        c, kh, kw = q // (kh_size * kw_size), q // kw_size % kh_size, q % kw_size
        plane = (c * npy + kh * dh % sh) * npx + kw * dw % sw
        offsets = plane * ph * pw + (kh * dh // sh) * pw + kw * dw // sw
        return (offsets if offsets.size else np.zeros(cb, np.int64)).astype(np.int32)


def pad_phases_cpu(batch: int, layout: PhaseLayout, dtype: str = "float32"):
    """``x`` [N, C, H, W] -> [N, planes * PH * PW]: padded and split into stride phases, in
    one parallel pass: a task per input row it reads (image, channel, phase row, row of the
    plane), which fills that row of every phase column; whether the row is padding is decided
    once per row, not per element (measured alone: 96 channels 112 -> 56, 0.32 -> 0.20 ms;
    144 channels 56 -> 28, 0.14 -> 0.05 ms)."""
    N, C, (H, W) = batch, layout.channels, layout.size
    TOP, LEFT = layout.pads[0], layout.pads[1]
    (SH, SW), (NPY, NPX), (PH, PW) = layout.stride, layout.phases, layout.plane

    @T.prim_func(private=True, check_well_formed=False)
    def pad_phases(x: T.Buffer((N, C, H, W), dtype), out: T.Buffer((N, C * NPY * NPX * PH * PW), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            # t: (image, channel, phase row, row of the plane); the input row it reads is
            # (t % PH) * SH + phase row - TOP
            for t in T.parallel(N * C * NPY * PH):
                for px in T.unroll(NPX):
                    if (t % PH) * SH + t // PH % NPY - TOP < 0 or (t % PH) * SH + t // PH % NPY - TOP >= H:
                        for j in T.vectorized(PW):
                            out[t // (C * NPY * PH), (t // PH % (C * NPY) * NPX + px) * PH * PW + t % PH * PW + j] = \
                                T.cast(0, dtype)
                    else:
                        for j in range(PW):
                            out[t // (C * NPY * PH), (t // PH % (C * NPY) * NPX + px) * PH * PW + t % PH * PW + j] = \
                                T.if_then_else(0 <= j * SW + px - LEFT and j * SW + px - LEFT < W, x[
                                    t // (C * NPY * PH), t // (NPY * PH) % C, (t % PH) * SH + t // PH % NPY - TOP,
                                    T.max(T.min(j * SW + px - LEFT, W - 1), 0)], T.cast(0, dtype))

    return pad_phases
