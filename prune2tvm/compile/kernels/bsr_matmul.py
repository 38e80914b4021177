"""BSR matrix products as hand-scheduled TVMScript: y[M, N] = x[M, K] @ W.T, W in BSR form.

Two CPU kernels, chosen by the number of activation rows M:

* few rows (``M <= GEMV_MAX_ROWS``, batch-1 inference): parallel over block rows; for each
  row of x, the blocks of a block row are summed into A independent accumulators (one
  FMA chain is latency-bound), each vectorised across the R outputs of a block, or across
  its C inputs where C > 1 (``_bsr_gemv``). (One vector over A*R lanes with a gather
  of x was tried: 2.7x slower, LLVM does not vectorise the b // R indexing well.)
* many rows (e.g. 128 tokens): in parallel over tiles of U panels of LANES rows (and, where
  there are too few tiles for the cores, groups of block rows), each task packs its tile of x
  transposed, so that one input position of LANES rows is one vector; then every nonzero
  weight is broadcast and multiplied into R x U vector accumulators. The accumulators hold
  the output transposed (a vector is one output of 16 rows): blocks of 4 or 8 rows are
  transposed back with in-lane shuffles (``_store_transposed``); blocks of 1 or 2 rows, whose
  stores would be 4 or 8 bytes per row, go through a task-local stage and reach ``out`` as
  whole 64-byte lines (``_bsr_gemm_staged``).

On AVX-512, few rows with blocks of 1, 2 or 4 outputs take a third kernel instead,
``windowed_gemv`` (16 outputs per vector, x looked up in registers), on its own layout;
``BsrMatmulShape.slots`` says which.

The sparsity pattern is data (indices, indptr), not code: baking it into unrolled code was
measured slower and explodes compile time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm.script import tirx as T

GEMV_MAX_ROWS = 4
FLT_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Epilogue:
    """What a kernel does to each output before storing it: add ``bias[channel]`` (every
    kernel takes a bias; zeros when the layer has none), then clamp to [low, high]
    (ReLU: low 0). Fused here, the bias add and activation cost no pass over the output.
    Conv kernels can also add a residual input (ResNet's shortcut) before the clamp."""

    low: float = -FLT_MAX
    high: float = FLT_MAX
    residual: bool = False  # add a residual input (same shape as the output) before the clamp (conv kernels)

    @property
    def activation(self) -> str:
        if self.low == -FLT_MAX and self.high == FLT_MAX:
            return ""
        return "relu" if (self.low, self.high) == (0.0, FLT_MAX) else f"clip[{self.low:g}, {self.high:g}]"


NO_EPILOGUE = Epilogue()
# TVM puts a CPU scratch buffer on the stack only when it is smaller than 1024 bytes
# (kMaxStackAlloca); a larger one inside a parallel loop costs a workspace allocation per task.
STACK_FLOATS = 255


def _lanes(pattern):
    """A 16-lane shuffle index list: ``pattern(l)`` gives the 4 indices of 128-bit lane l."""
    return [i for lane in range(4) for i in pattern(lane)]


# the AVX-512 in-lane shuffles of a 4x4-block transpose, as Shuffle indices over (x, y)
UNPACK_LO = _lanes(lambda l: (4 * l, 16 + 4 * l, 4 * l + 1, 17 + 4 * l))
UNPACK_HI = _lanes(lambda l: (4 * l + 2, 18 + 4 * l, 4 * l + 3, 19 + 4 * l))
PAIR_LO = _lanes(lambda l: (4 * l, 4 * l + 1, 16 + 4 * l, 17 + 4 * l))
PAIR_HI = _lanes(lambda l: (4 * l + 2, 4 * l + 3, 18 + 4 * l, 19 + 4 * l))


def _row(rows, j, lane):
    """Row 4 * lane + j of the transpose: its rc outputs as one vector."""
    parts = [rows[h][j] for h in range(len(rows))]
    if len(parts) == 1:
        return T.Shuffle(parts, [4 * lane + i for i in range(4)])
    return T.Shuffle(parts, [16 * h + 4 * lane + i for h in range(len(parts)) for i in range(4)])


def _store_transposed(out, acc, u, rc, row, col):
    """acc[u, 0:rc, 0:16] -> out[row + v, col:col + rc], rc 4 or 8: 4x4-block transposes in
    in-lane shuffles, then 16 stores of rc lanes. Each shuffle is bound to a name once
    (``T.bind``): written as one expression per store, LLVM narrowed every copy differently and
    could no longer share them. (LLVM's lowering of the same gather written as a loop took about
    150 instructions per 4 x 16.)"""
    def a(r):
        return acc.vload([u, r, 0], "float32x16")

    rows = []
    for h in range(rc // 4):
        t = [T.bind(T.Shuffle([a(4 * h + p), a(4 * h + p + 1)], idx)) for p in (0, 2) for idx in (UNPACK_LO, UNPACK_HI)]
        # t: [lo(0,1), hi(0,1), lo(2,3), hi(2,3)]
        rows.append([T.bind(T.Shuffle([t[0], t[2]], PAIR_LO)), T.bind(T.Shuffle([t[0], t[2]], PAIR_HI)),
                     T.bind(T.Shuffle([t[1], t[3]], PAIR_LO)), T.bind(T.Shuffle([t[1], t[3]], PAIR_HI))])
    for lane in range(4):
        for j in range(4):
            T.buffer_store(out, _row(rows, j, lane), [row + 4 * lane + j, T.Ramp(col, 1, rc)])


def _lanes_of(a, b, la, lb):
    """128-bit lanes la[0], la[1] of a, then lb[0], lb[1] of b (one vshuff32x4)."""
    return T.Shuffle([a, b], [4 * lane + i for lane in la for i in range(4)] +
                     [16 + 4 * lane + i for lane in lb for i in range(4)])


def _transpose16(load, store):
    """A 16 x 16 transpose in registers: ``store(k, vector)`` gets column k of the 16 rows
    ``load(i)``. Four stages of 16 two-input shuffles (unpack ps, unpack pd, two of 128-bit
    lanes), each bound to a name once (``T.bind``): written as one expression per column,
    LLVM narrowed each copy differently and emitted about twice the shuffles, plus spills."""
    r = [T.bind(load(i)) for i in range(16)]
    t = []  # t[2m], t[2m + 1]: rows 2m, 2m + 1 interleaved, low and high halves of each 128-bit lane
    for m in range(8):
        t += [T.bind(T.Shuffle([r[2 * m], r[2 * m + 1]], UNPACK_LO)),
              T.bind(T.Shuffle([r[2 * m], r[2 * m + 1]], UNPACK_HI))]
    # s[q][j], lane l: rows 4q .. 4q + 3 at column 4l + j
    s = [[T.bind(T.Shuffle([t[4 * q + j // 2], t[4 * q + 2 + j // 2]], PAIR_HI if j % 2 else PAIR_LO))
          for j in range(4)] for q in range(4)]
    for j in range(4):
        # a[h], b[h]: lanes h and h + 2 of s[0][j], s[1][j] (of s[2][j], s[3][j])
        a = [T.bind(_lanes_of(s[0][j], s[1][j], (h, h + 2), (h, h + 2))) for h in range(2)]
        b = [T.bind(_lanes_of(s[2][j], s[3][j], (h, h + 2), (h, h + 2))) for h in range(2)]
        for lane in range(4):
            pick = (lane // 2, lane // 2 + 2)
            store(4 * lane + j, _lanes_of(a[lane % 2], b[lane % 2], pick, pick))


def _k_major(p, k, v):
    """Index of panels[p, k, v] in the k-major layout [K, panels, V]: a tile's panels for one
    input position are adjacent lines."""
    return [k, p, v]


@T.macro(hygienic=False)
def _pack_panels(x, panels, M, K, PP, V, dtype, at):
    """panels[p, k, v] = x[p * 16 + v, k] (zero past row M), V = 16, stored at ``at(p, k, v)``
    (``_k_major``), in parallel over blocks of 16 x 16: a whole block is
    loaded as 16 row vectors and transposed with shuffles (about 6 instructions per vector,
    where the column gather it replaces took about 32); blocks at the edges of x are gathered
    element by element."""
    for t in T.parallel(PP * ((K + 15) // 16)):
        _pack_block(x, panels, M, K, V, dtype, at, t // ((K + 15) // 16), t % ((K + 15) // 16) * 16)


@T.macro(hygienic=False)
def _pack_block(x, panels, M, K, V, dtype, at, p, k0):
    """Panel p, columns k0 .. k0 + 15 of x (see ``_pack_panels``)."""
    if T.And((p + 1) * 16 <= M, k0 + 16 <= K):
        _transpose16(lambda i: x.vload([p * 16 + i, k0], "float32x16"),
                     lambda k, column: T.buffer_store(panels, column, at(p, k0 + k, T.Ramp(0, 1, 16))))
    else:
        for kk in range(16):
            if k0 + kk < K:
                for v in T.vectorized(V):
                    T.buffer_store(panels, T.if_then_else(p * V + v < M, x[T.min(p * V + v, M - 1), k0 + kk],
                                                          T.cast(0, dtype)), at(p, k0 + kk, v))


@T.macro(hygienic=False)
def _accumulate(acc, acc2, UA, UB, RC, V, dtype, data, indices, start, end, rc, C, panel, bias, col):
    """Start the accumulators at the bias (acc[u, r, :] = bias[col + r]), then add every block
    b in [start, end) of the block row: acc holds panels 0 .. UA - 1 of the task, acc2 the UB
    after them; ``panel(u, k, v)`` reads the task's panel u at input position k. (Starting at
    the bias instead of adding it after: 128 x 768->3072 at 90 %, 16x1, 0.148 -> 0.144 ms.)"""
    for u in T.unroll(UA):
        for r in T.unroll(RC):
            for v in T.vectorized(V):
                acc[u, r, v] = bias[col + r]
    for u in T.unroll(UB):
        for r in T.unroll(RC):
            for v in T.vectorized(V):
                acc2[u, r, v] = bias[col + r]
    for b in range(start, end):
        for c in T.unroll(C):
            for u in T.unroll(UA):
                for r in T.unroll(RC):
                    for v in T.vectorized(V):
                        acc[u, r, v] = acc[u, r, v] + data[b, rc * RC + r, c] * panel(u, indices[b] * C + c, v)
            for u in T.unroll(UB):
                for r in T.unroll(RC):
                    for v in T.vectorized(V):
                        acc2[u, r, v] = acc2[u, r, v] + data[b, rc * RC + r, c] * panel(UA + u, indices[b] * C + c, v)


def clamp(value, low: float, high: float, dtype: str):
    """``value`` clamped to [low, high], each bound only where it is finite: min(v, FLT_MAX)
    is not a no-op to LLVM (it turns inf into FLT_MAX), so a layer without an activation would
    pay two instructions per output vector for nothing. Every kernel's epilogue (``Epilogue``)
    clamps through this."""
    if low != -FLT_MAX:
        value = T.max(value, T.cast(low, dtype))
    if high != FLT_MAX:
        value = T.min(value, T.cast(high, dtype))
    return value


@T.macro(hygienic=False)
def _clamp_accumulators(acc, acc2, UA, UB, RC, V, dtype, LO, HI):
    """The activation in place: acc[u, r, :] clamped to [LO, HI] (the bias is already in)."""
    if LO != -FLT_MAX or HI != FLT_MAX:
        for u in T.unroll(UA):
            for r in T.unroll(RC):
                for v in T.vectorized(V):
                    acc[u, r, v] = clamp(acc[u, r, v], LO, HI, dtype)
        for u in T.unroll(UB):
            for r in T.unroll(RC):
                for v in T.vectorized(V):
                    acc2[u, r, v] = clamp(acc2[u, r, v], LO, HI, dtype)


MAX_ACCUMULATORS = 16  # vector accumulators in flight (of 32 AVX-512 registers)


def accumulator_tiling(rows: int, vectors: int, lanes: int) -> tuple[int, int]:
    """(RC, U): R is handled in chunks of RC rows, each with U vectors of ``lanes`` per row.
    RC*U accumulators stay in registers (at most ``MAX_ACCUMULATORS``, as many as possible to
    hide FMA latency); U divides ``vectors`` when it can, so no task works on padding."""
    chunk = max(d for d in range(1, rows + 1) if rows % d == 0 and d <= min(MAX_ACCUMULATORS, STACK_FLOATS // lanes))
    most = max(1, min(vectors, MAX_ACCUMULATORS // chunk, most_panels(chunk, lanes)))
    dividing = [u for u in range(1, most + 1) if vectors % u == 0]
    return chunk, max(dividing) if dividing[-1] * 2 > most else most


def most_panels(chunk: int, lanes: int) -> int:
    """Two accumulator buffers, each under TVM's stack limit."""
    return 2 * max(1, STACK_FLOATS // (chunk * lanes))


def panel_tiling(rows: int, block_rows: int, lanes: int, panels: int | None = None) -> tuple[int, int, int]:
    """(RC, U, tiles) of the many-rows kernels: chunks of RC block rows' outputs, U panels of
    ``lanes`` activation rows per task (``panels`` if given), and how many tiles of U panels
    cover ``rows``."""
    vectors = (rows + lanes - 1) // lanes
    chunk, most = accumulator_tiling(block_rows, vectors, lanes)
    per_tile = panels or most
    return chunk, per_tile, (vectors + per_tile - 1) // per_tile


@dataclass(frozen=True)
class BsrMatmulShape:
    rows: int  # M, activation rows
    inputs: int  # K
    outputs: int  # N
    block: tuple[int, int]  # (R, C)
    nnzb: int
    dtype: str = "float32"
    # > 0: the windowed layout's slot count (``windowed_gemv``), else BSR arrays. Left out of the
    # repr, which tuning keys are made of: the kernel's kind says which layout (and the count
    # follows from the block pattern, which the key holds).
    slots: int = field(default=0, repr=False)

    @property
    def block_rows(self) -> int:
        return self.outputs // self.block[0]


def bsr_matmul_cpu(shape: BsrMatmulShape, lanes: int = 16, accumulators: int | None = None,
                   epilogue: Epilogue = NO_EPILOGUE,
                   panels: int | None = None, stage: int | None = None, cores: int | None = None):
    """The CPU kernel for ``shape``; ``lanes`` is the SIMD width in float32 elements.
    Arguments: x [M, K], data [nnzb, R, C], indices [nnzb], indptr [N/R + 1], bias [N], out [M, N].
    Tunable (``search_space``): ``accumulators`` for few rows; for many, ``panels`` (of ``lanes``
    rows per task) and ``stage`` (output columns a task stages and stores row by row; 0 = none,
    None = ``default_stage``). ``cores``: the target's, for how many tasks to make
    (``default_groups``). A shape with ``slots`` takes the windowed layout's kernel."""
    if shape.slots:
        from prune2tvm.compile.kernels.windowed_gemv import windowed_gemv

        return windowed_gemv(shape, accumulators or 4, epilogue)
    if shape.rows <= GEMV_MAX_ROWS:
        return _bsr_gemv(shape, accumulators or gemv_accumulators(shape), epilogue)
    if staged_groups(shape, lanes, panels):
        return _bsr_gemm_staged(shape, lanes, epilogue, panels)
    stage = default_stage(shape, lanes) if stage is None else stage
    if stage and (stage != STAGE_ROW_COLUMNS or not can_stage(shape, lanes)):
        raise ValueError(f"stage={stage} is not possible for {shape} with {lanes} lanes: valid are 0 and, for "
                         f"blocks of 4 to 16 rows with outputs in multiples of {STAGE_ROW_COLUMNS}, {STAGE_ROW_COLUMNS}")
    return _bsr_gemm(shape, lanes, epilogue, panels, stage, default_groups(shape, lanes, panels, stage, cores))


def search_space(shape: BsrMatmulShape, lanes: int = 16) -> list[dict]:
    """The parameter sets a BSR kernel can be built with (the first is the default)."""
    if shape.slots:
        return [{"accumulators": a} for a in (4, 2, 8, 1)]
    if shape.rows <= GEMV_MAX_ROWS:
        first = gemv_accumulators(shape)
        return [{"accumulators": a} for a in (first, *(a for a in (4, 1, 2, 8) if a != first))]
    rc, default = accumulator_tiling(shape.block[0], (shape.rows + lanes - 1) // lanes, lanes)
    most = min((shape.rows + lanes - 1) // lanes, most_panels(rc, lanes), 28 // rc)
    space = [{"panels": default}] + [{"panels": u} for u in (1, 2, 3, 4, 6, 8) if u <= most and u != default]
    if not can_stage(shape, lanes):
        return space
    stages = (STAGE_ROW_COLUMNS, 0) if default_stage(shape, lanes) else (0, STAGE_ROW_COLUMNS)
    return [dict(p, stage=stage) for stage in stages for p in space]


def gemv_accumulators(s: BsrMatmulShape) -> int:
    """The few-rows kernel's default A, chains per block row: 4; with blocks of C > 1 inputs
    (one chain per output of the block already), 2 from 8 weights a block and 1 from 8 outputs.
    1 row, 3072->768 at 90 %, A = 4 / 2 / 1: 4x4 6.8 / 6.5 / 8.1 us, 1x8 7.0 / 6.4 / 12.7,
    16x2 15.3 / 12.6 / 10.0, 16x4 11.5 / 6.9 / 6.4, 2x4 9.0 / 8.8 / 14.4."""
    R, C = s.block
    if C == 1:
        return 4
    return 1 if R >= 8 else 2 if R * C >= 8 else 4


@T.macro(hygienic=False)
def _over_block(R, C, each):
    """``each(r, c)`` for every weight of an R x C block: vectorised over the R outputs where
    C == 1, else over the C inputs (one vector load of x per block)."""
    if C == 1:
        for r in T.vectorized(R):
            each(r, 0)
    else:
        for r in T.unroll(R):
            for c in T.vectorized(C):
                each(r, c)


def _bsr_gemv(s: BsrMatmulShape, acc_count: int, epilogue: Epilogue):
    """Few rows: parallel over block rows, A chains of accumulators acc[a, r, c] per block row
    (``_over_block``), summed across chains and then across c at the end. Vectorised over r
    with x broadcast per input, the C multiply-adds of a wider block formed one dependent
    chain: 1 row, 3072->768 at 90 %, 1x4 25 -> 12 us, 4x4 21 -> 6.5 us, 1x8 25 -> 6.4 us."""
    M, K, N, NB, NNZB, dtype = s.rows, s.inputs, s.outputs, s.block_rows, max(s.nnzb, 1), s.dtype
    R, C = s.block
    A = acc_count
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def bsr_gemv(x: T.Buffer((M, K), dtype), data: T.Buffer((NNZB, R, C), dtype),
                 indices: T.Buffer((NNZB,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                 bias: T.Buffer((N,), dtype), out: T.Buffer((M, N), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for i in T.parallel(NB):
            acc = T.alloc_buffer((A, R, C), dtype)
            for m in range(M):
                for a in T.unroll(A):
                    _over_block(R, C, lambda r, c: T.buffer_store(acc, T.cast(0, dtype), [a, r, c]))
                # indptr is read inline: a name bound here (``start = indptr[i]``) becomes a
                # one-element buffer, i.e. a workspace allocation per block row.
                for q in range((indptr[i + 1] - indptr[i]) // A):
                    for a in T.unroll(A):
                        _over_block(R, C, lambda r, c: T.buffer_store(
                            acc, acc[a, r, c] + data[indptr[i] + q * A + a, r, c] *
                            x[m, indices[indptr[i] + q * A + a] * C + c], [a, r, c]))
                for t in range((indptr[i + 1] - indptr[i]) % A):
                    _over_block(R, C, lambda r, c: T.buffer_store(
                        acc, acc[0, r, c] + data[indptr[i + 1] - t - 1, r, c] *
                        x[m, indices[indptr[i + 1] - t - 1] * C + c], [0, r, c]))
                for a in range(1, A):
                    _over_block(R, C, lambda r, c: T.buffer_store(acc, acc[0, r, c] + acc[a, r, c], [0, r, c]))
                for r in T.unroll(R):
                    for c in range(1, C):
                        acc[0, r, 0] = acc[0, r, 0] + acc[0, r, c]
                _over_block(R, 1, lambda r, c: T.buffer_store(
                    out, clamp(acc[0, r, 0] + bias[i * R + r], LO, HI, dtype), [m, i * R + r]))

    return bsr_gemv


@T.macro(hygienic=False)
def _store_panels(out, acc, first, UX, M, V, RC, SHUFFLE, panel, col):
    """acc[u, 0:RC, 0:V] -> out[(panel + first + u) * V + v, col:col + RC] for u < UX:
    transposed with shuffles where the panel's V rows all exist, row by row otherwise."""
    for u in T.unroll(UX):
        if SHUFFLE and (panel + first + u + 1) * V <= M:
            _store_transposed(out, acc, u, RC, (panel + first + u) * V, col)
        else:
            for v in T.unroll(V):
                if (panel + first + u) * V + v < M:
                    for r in T.vectorized(RC):
                        out[(panel + first + u) * V + v, col + r] = acc[u, r, v]


STAGE_ROW_COLUMNS = 128  # output columns a task of the row-staged many-rows kernel writes (512 bytes of a row)


def can_stage(s: BsrMatmulShape, lanes: int) -> bool:
    """Whether ``_bsr_gemm`` can stage its outputs (``stage=STAGE_ROW_COLUMNS``): the
    in-register transpose (blocks of 4 to 16 rows, 16 lanes) and whole groups of block rows."""
    R = s.block[0]
    return (lanes == 16 and s.dtype == "float32" and R >= 4 and STAGE_ROW_COLUMNS % R == 0
            and s.outputs % STAGE_ROW_COLUMNS == 0 and accumulator_tiling(R, 1, lanes)[0] in (4, 8))


def default_stage(s: BsrMatmulShape, lanes: int) -> int:
    """Stage where the output's row pitch is a multiple of 4 KB (N a multiple of 1024): the 16
    rows a task stores then fall into one L1 set (12 ways on Zen 5), and storing 16-byte
    pieces of them ran at a third of the speed (a 128 x 3072 output: 60 us where one with
    3056 columns took 20 us, and 23 us written row by row)."""
    return STAGE_ROW_COLUMNS if can_stage(s, lanes) and (s.outputs * 4) % 4096 == 0 else 0


def default_groups(s: BsrMatmulShape, lanes: int, panels: int | None, stage: int, cores: int | None) -> int:
    """Tasks per panel tile of ``_bsr_gemm`` (groups of block rows): as few as give every core
    a task and the cores equal shares (or at least 4 tasks each), since each task packs its tile
    of x anew."""
    if not cores or cores <= 1:
        return 1
    units = s.block_rows // (stage // s.block[0] if stage else 1)  # what a group is made of
    tiles = panel_tiling(s.rows, s.block[0], lanes, panels)[2]
    for g in (d for d in range(1, units + 1) if units % d == 0):
        if tiles * g >= cores and (tiles * g % cores == 0 or tiles * g >= 4 * cores):
            return g
    return units


def _bsr_gemm(s: BsrMatmulShape, lanes: int, epilogue: Epilogue, panels: int | None = None, stage: int = 0,
              groups: int = 1):
    """Each task takes a tile of U panels of V rows and ``groups``-th of the block rows: it packs
    its tile of x (transposed, so that one input position of V rows is one vector) into a
    task-local buffer, then goes over its block rows. A block's R outputs are done RC at a time,
    with RC*U vector accumulators in flight (each nonzero weight broadcast once per panel). The
    accumulators are two buffers (panels [0, UA) and [UA, U)), each under TVM's
    stack-allocation limit, so U can reach 4 with RC = 4 (measured 10-15 % faster at 128 rows
    than 3 panels in one buffer).

    Packing per task instead of all of x up front, and the pack's shuffles written once each
    (``_transpose16``): 128 x 3072->768 at 90 % with 16x1 blocks, 0.159 -> 0.146 ms (the pack
    alone 21 -> 17 us; 768->3072, 0.156 -> 0.148).

    With ``stage`` (a multiple of R), the block rows go stage / R at a time: their results are
    transposed into a task-local stage [U*V rows, stage columns], then copied to ``out`` row by
    row (see ``default_stage``). 128 x 768->3072 at 90 %: 4x1 0.449 ms (0.261 with 2 panels)
    -> 0.172, 16x1 0.165 -> 0.161; where rows do not alias, within 2 %."""
    M, K, N, NB, NNZB, dtype = s.rows, s.inputs, s.outputs, s.block_rows, max(s.nnzb, 1), s.dtype
    R, C = s.block
    V = lanes
    RC, U, PT = panel_tiling(M, R, V, panels)  # PT tiles of U panels of V rows
    UA = (U + 1) // 2
    UB = U - UA
    UB1 = max(UB, 1)
    LO, HI = epilogue.low, epilogue.high
    SHUFFLE = RC in (4, 8) and V == 16 and dtype == "float32"
    WHOLE = V == 16 and dtype == "float32"  # the tile is packed 16 x 16 at a time in registers
    KB = (K + 15) // 16

    SG = stage // R if stage else 1  # block rows per stage
    if NB % (SG * groups):
        raise ValueError(f"groups={groups} does not divide the {NB // SG} {'stages' if stage else 'block rows'} of {s}")
    G = NB // groups  # block rows per task
    NG = groups
    ST = max(stage, 1)
    STAGED = stage > 0

    @T.prim_func(private=True)
    def bsr_gemm(x: T.Buffer((M, K), dtype), data: T.Buffer((NNZB, R, C), dtype),
                 indices: T.Buffer((NNZB,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                 bias: T.Buffer((N,), dtype), out: T.Buffer((M, N), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for it in T.parallel(NG * PT):
            panels = T.alloc_buffer((U, K, V), dtype)  # this task's tile of x, panel-major
            staged = T.alloc_buffer((U * V, ST), dtype)
            if WHOLE:
                for t in range(U * KB):
                    _pack_block(x, panels, M, K, V, dtype, lambda p, k, v: [p - (it // NG) * U, k, v],
                                (it // NG) * U + t // KB, t % KB * 16)
            else:
                for uk in range(U * K):
                    for v in T.vectorized(V):
                        panels[uk // K, uk % K, v] = T.if_then_else(
                            ((it // NG) * U + uk // K) * V + v < M,
                            x[T.min(((it // NG) * U + uk // K) * V + v, M - 1), uk % K], T.cast(0, dtype))
            for sg in range(G // SG):
                for g in range(SG):
                    for rc in range(R // RC):
                        acc = T.alloc_buffer((UA, RC, V), dtype)
                        acc2 = T.alloc_buffer((UB1, RC, V), dtype)
                        _accumulate(acc, acc2, UA, UB, RC, V, dtype, data, indices,
                                    indptr[(it % NG) * G + sg * SG + g], indptr[(it % NG) * G + sg * SG + g + 1], rc, C,
                                    lambda u, k, v: panels[u, k, v], bias, ((it % NG) * G + sg * SG + g) * R + rc * RC)
                        _clamp_accumulators(acc, acc2, UA, UB, RC, V, dtype, LO, HI)
                        # Unrolled, so the accumulators never leave registers (a loop here makes
                        # LLVM keep them in memory too, zeroed by a memset per task that cost more
                        # than the work at high sparsity).
                        if STAGED:
                            for u in T.unroll(UA):
                                _store_transposed(staged, acc, u, RC, u * V, g * R + rc * RC)
                            for u in T.unroll(UB):
                                _store_transposed(staged, acc2, u, RC, (UA + u) * V, g * R + rc * RC)
                        else:
                            _store_panels(out, acc, 0, UA, M, V, RC, SHUFFLE, (it // NG) * U,
                                          ((it % NG) * G + sg * SG + g) * R + rc * RC)
                            _store_panels(out, acc2, UA, UB, M, V, RC, SHUFFLE, (it // NG) * U,
                                          ((it % NG) * G + sg * SG + g) * R + rc * RC)
                if STAGED:
                    for row in range(U * V):
                        if (it // NG) * U * V + row < M:
                            for w in T.vectorized(ST):
                                out[(it // NG) * U * V + row, ((it % NG) * G + sg * SG) * R + w] = staged[row, w]

    return bsr_gemm


STAGE_COLUMNS = 16  # output columns a staged task writes: one 64-byte line per row


def staged_groups(s: BsrMatmulShape, lanes: int, panels: int | None = None) -> int:
    """Block rows per task of the staged many-rows kernel (0: not staged)."""
    R = s.block[0]
    # blocks of 4 rows or more store whole 16-byte pieces straight from the accumulators
    # (staged: no faster at 4x1, 0.85x at 16x1); 1 or 2 rows stored 4 or 8 bytes per row
    if R > 2 or lanes != 16 or s.dtype != "float32" or s.outputs % STAGE_COLUMNS:
        return 0
    tasks = (s.outputs // STAGE_COLUMNS) * panel_tiling(s.rows, R, lanes, panels)[2]
    return STAGE_COLUMNS // R if tasks >= 16 else 0


def _bsr_gemm_staged(s: BsrMatmulShape, lanes: int, epilogue: Epilogue, panels: int | None = None):
    """The many-rows kernel for layers whose outputs come in lines of 16: each task takes
    G = 16 / R consecutive block rows and U panels, and writes its results to ``out`` as whole
    64-byte lines (one vector per row). The accumulators go to a task-local stage as they are
    (a row of the stage per output column, whole vectors), and each panel's 16 x 16 of the
    stage is transposed back with shuffles (1x1 at 128 rows: 1.05-1.22x faster alone than
    storing the stage column by column).
    Stored straight from the accumulators, each row got R columns at a time: with a row pitch
    that is a multiple of 4 KB (3072 outputs) those rows share one L1 set, and the store alone
    took 0.37 ms of 0.64 for a 128 x 3072 output (one thread; whole lines: 0.09 ms)."""
    M, K, N, NB, NNZB, dtype = s.rows, s.inputs, s.outputs, s.block_rows, max(s.nnzb, 1), s.dtype
    R, C = s.block
    V = lanes
    RC, U, PT = panel_tiling(M, R, V, panels)
    UA = (U + 1) // 2
    UB = U - UA
    UB1 = max(UB, 1)
    PP = PT * U
    G = STAGE_COLUMNS // R
    NG = NB // G  # groups of block rows: column groups of 16 outputs
    W = STAGE_COLUMNS
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def bsr_gemm_staged(x: T.Buffer((M, K), dtype), data: T.Buffer((NNZB, R, C), dtype),
                        indices: T.Buffer((NNZB,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                        bias: T.Buffer((N,), dtype), out: T.Buffer((M, N), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        panels = T.alloc_buffer((K, PP, V), dtype)  # k-major: 1.07-1.08x at 1x1 (4x1, 16x1: 0.75-0.96x)
        _pack_panels(x, panels, M, K, PP, V, dtype, _k_major)
        for it in T.parallel(NG * PT):
            stage = T.alloc_buffer((W, U * V), dtype)
            for g in range(G):
                for rc in range(R // RC):
                    acc = T.alloc_buffer((UA, RC, V), dtype)
                    acc2 = T.alloc_buffer((UB1, RC, V), dtype)
                    _accumulate(acc, acc2, UA, UB, RC, V, dtype, data, indices, indptr[(it % NG) * G + g],
                                indptr[(it % NG) * G + g + 1], rc, C, lambda u, k, v: panels[k, (it // NG) * U + u, v],
                                bias, (it % NG) * W + g * R + rc * RC)
                    _clamp_accumulators(acc, acc2, UA, UB, RC, V, dtype, LO, HI)
                    for u in T.unroll(UA):
                        for r in T.unroll(RC):
                            for v in T.vectorized(V):
                                stage[g * R + rc * RC + r, u * V + v] = acc[u, r, v]
                    for u in T.unroll(UB):
                        for r in T.unroll(RC):
                            for v in T.vectorized(V):
                                stage[g * R + rc * RC + r, (UA + u) * V + v] = acc2[u, r, v]
            # stage holds the task's outputs transposed (a row per output column): each panel's
            # 16 x 16 is transposed back with shuffles into whole 64-byte lines of out
            for u in range(U):
                if ((it // NG) * U + u + 1) * V <= M:
                    _transpose16(lambda i: stage.vload([i, u * V], "float32x16"),
                                 lambda k, column: T.buffer_store(
                                     out, column, [((it // NG) * U + u) * V + k, T.Ramp((it % NG) * W, 1, W)]))
                else:
                    for v in range(V):
                        if ((it // NG) * U + u) * V + v < M:
                            for w in T.vectorized(W):
                                out[((it // NG) * U + u) * V + v, (it % NG) * W + w] = stage[w, u * V + v]

    return bsr_gemm_staged


def bsr_matmul_cuda(shape: BsrMatmulShape, threads: int = 256, epilogue: Epilogue = NO_EPILOGUE):
    """Thread-bound GPU kernel: one thread per output element, a thread block per
    (block row, tile of activation rows); each thread walks its block row's nonzero blocks."""
    M, K, N, NB, NNZB, dtype = shape.rows, shape.inputs, shape.outputs, shape.block_rows, max(shape.nnzb, 1), shape.dtype
    R, C = shape.block
    TM = max(1, min(M, threads // R))  # activation rows per thread block
    MB = (M + TM - 1) // TM
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def bsr_matmul_gpu(x: T.Buffer((M, K), dtype), data: T.Buffer((NNZB, R, C), dtype),
                       indices: T.Buffer((NNZB,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
                       bias: T.Buffer((N,), dtype), out: T.Buffer((M, N), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for i in T.thread_binding(NB, thread="blockIdx.x"):
            for mb in T.thread_binding(MB, thread="blockIdx.y"):
                for t in T.thread_binding(TM * R, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), dtype, scope="local")
                    acc[0] = T.cast(0, dtype)
                    for b in range(indptr[i], indptr[i + 1]):
                        for c in T.unroll(C):
                            acc[0] = acc[0] + data[b, t % R, c] * x[T.min(mb * TM + t // R, M - 1), indices[b] * C + c]
                    if mb * TM + t // R < M:
                        out[mb * TM + t // R, i * R + t % R] = clamp(acc[0] + bias[i * R + t % R], LO, HI, dtype)

    return bsr_matmul_gpu
