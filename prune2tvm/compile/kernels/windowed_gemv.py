"""A BSR product for few activation rows whose blocks are 1, 2 or 4 outputs tall, on AVX-512:
16 outputs per vector, x looked up in registers instead of loaded per weight.

The CSR-like GEMV (``bsr_matmul._bsr_gemv``) does one load of x per block: with 1x1 blocks,
one scalar multiply-add per weight, about one weight per cycle. Here the weights of 16
outputs (16 / R block rows of R outputs) are cut into *slots*, and slots come in *pairs*
that share a window of ``WINDOW`` (32) inputs starting at the pair's ``base``: each slot
holds, for each of its block rows, at most one block whose column lies in the window. The
kernel loads x[base : base + 32] as two vectors once per pair; for each slot it picks each
lane's input with one ``vpermi2ps`` (the lane's offset into the window is a byte) and
multiplies the slot's 16 weights into an accumulator vector: one vector multiply-add for up
to 16 weights. Pairs are filled greedily: each window starts at the line of x (16 inputs)
that holds the smallest column still to place, and each block row puts its next block in
the first slot and the one after it in the second, where they lie in the window; lanes with
nothing hold a zero weight. At 90 % sparsity about 59 % of the lanes of 1x1 slots hold a
weight (71 % for 4x1), and the layout takes about as many bytes as CSR does (4 bytes of
weight and 4 of index per weight).

Why pairs: the single-slot kernel was bound by its three vector loads per slot (weights and
two of x). A pair of slots needs 6 % more slots at 4x1 (19572 -> 20810 at 768->3072) and
one load of x per slot. Measured on Zen 5 at one row and 90 %, the call from Python
(onnxruntime's dense MatMul about 62 us), single -> paired slots: 4x1 768->3072 9.5 ->
8.7 us, 3072->768 9.5 -> 8.0 us; 2x1 10.3 -> 9.2 us; 1x1 11.1 -> 10.1 us (both shapes);
1x1 at 50 % 40 -> 38 us; 4 rows, 1x1 (2 accumulators) 21.5 -> 15.6 us.

Before that, CSR-like -> single slots, kernel alone: 768->3072 at 90 %, 1x1 blocks 37.3 ->
10.2 us, 2x1 18.3 -> 9.2 us, 4x1 9.6 -> 8.1 us; 4 rows, 1x1 140 -> 23 us.

Layout, ``window_layout``: ``data [S, 16]`` float32 (slot s, lane l: the weight of output
16 g + l, g the slot's group; S even); ``words [OW + S / 2]`` int32: first the slots' block
offsets into their windows as bytes, 16 / R per slot (OW words), then each pair's window
start; ``slots [N / 16 + 1]`` int32: group g owns slots slots[g] .. slots[g + 1] - 1 (pairs
slots[g] / 2 ..).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from prune2tvm.compile.kernels.bsr_matmul import GEMV_MAX_ROWS, BsrMatmulShape, Epilogue, clamp
from prune2tvm.sparse import BsrMatrix

LANES = 16
WINDOW = 32  # inputs a slot reaches: two vectors of x, indexed by vpermi2ps


def windowed(rows: int, bsr: BsrMatrix, lanes: int) -> bool:
    """Whether the kernel for ``rows`` activation rows times ``bsr`` is this one: AVX-512
    (``lanes`` 16), blocks of one input and 1, 2 or 4 outputs, outputs in whole vectors. (With
    8x1 blocks the CSR-like kernel, one 8-lane multiply-add per block, was faster: 5.4 us
    against 7.1 at 768->3072, 90 %.)"""
    (R, C), (n, k) = bsr.block, bsr.shape
    return (lanes == LANES and bsr.data.dtype == np.float32 and C == 1 and rows <= GEMV_MAX_ROWS
            and R in (1, 2, 4) and n % LANES == 0 and k >= WINDOW)


def cpu_layout(rows: int, bsr: BsrMatrix, lanes: int) -> tuple[BsrMatmulShape, list[np.ndarray]]:
    """The CPU matmul kernel's shape and weight arrays for ``rows`` rows times ``bsr``: the
    windowed layout where this kernel runs, else the BSR arrays."""
    shape = BsrMatmulShape(rows, bsr.shape[1], bsr.shape[0], bsr.block, bsr.nnzb)
    if not windowed(rows, bsr, lanes):
        return shape, list(bsr.kernel_arrays())
    arrays = window_layout(bsr)
    return dataclasses.replace(shape, slots=len(arrays[0])), list(arrays)


def offset_words(slots: int, block_rows: int) -> int:
    """int32 words holding ``block_rows`` offset bytes for each of ``slots`` slots."""
    return (slots * block_rows + 3) // 4


def window_layout(bsr: BsrMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, words, slots) of ``bsr`` (see the module docstring); a matrix with no block gets
    one pair of zero slots so that no buffer is empty. Groups are filled side by side: one
    numpy step places one pair of every group. The window starts at a multiple of 16 (whole
    64-byte lines of x: unaligned, its two loads each split across lines, and the kernel took
    9.4 us for 8.0 aligned, which need 10 % more slots), and never past K - 32, so that
    x[base : base + 32] stays inside x."""
    R = bsr.block[0]
    n, k = bsr.shape
    G, groups = LANES // R, n // LANES
    cols = bsr.indices.astype(np.int64)
    head = bsr.indptr[:-1].astype(np.int64).reshape(groups, G).copy()
    end = bsr.indptr[1:].astype(np.int64).reshape(groups, G)
    next_col = np.append(cols, k)  # indexed by head <= len(cols)
    count = np.zeros(groups, np.int64)
    placed = []  # per step: (group, pair within group, window start, blocks of its two slots or -1)

    def upcoming():  # (whether each block row has blocks left, the column of its next)
        live = head < end
        return live, np.where(live, next_col[head], k)

    live, nxt = upcoming()
    while live.any():
        active = live.any(1)
        base = np.minimum(nxt.min(1) // LANES * LANES, k - WINDOW)
        halves = []
        for _ in range(2):
            take = live & (nxt < (base + WINDOW)[:, None])
            halves.append(np.where(take, head, -1)[active])
            head += take
            live, nxt = upcoming()
        group = np.nonzero(active)[0]
        placed.append((group, count[group], base[group], *halves))
        count += active
    starts = np.zeros(groups + 1, np.int64)
    np.cumsum(count, out=starts[1:])
    pairs = max(int(starts[-1]), 1)
    total = 2 * pairs
    data = np.zeros((total, G, R), np.float32)
    offsets = np.zeros((total, G), np.uint8)
    bases = np.zeros(pairs, np.int32)
    for group, nth, base, *blocks in placed:
        pair = starts[group] + nth
        bases[pair] = base
        for half, block in enumerate(blocks):
            slot = 2 * pair + half
            has = block >= 0
            data[slot] = np.where(has[:, :, None], bsr.data[np.maximum(block, 0), :, 0], 0)
            offsets[slot] = np.where(has, cols[np.maximum(block, 0)] - base[:, None], 0)
    starts *= 2
    packed = np.zeros(offset_words(total, G) * 4, np.uint8)
    packed[:offsets.size] = offsets.reshape(-1)
    return data.reshape(total, LANES), np.concatenate([packed.view(np.int32), bases]), starts.astype(np.int32)


def window_to_dense(shape: tuple[int, int], block_rows: int, data: np.ndarray, words: np.ndarray,
                    slots: np.ndarray) -> np.ndarray:
    """The numpy reference: the [N, K] matrix a windowed layout holds (``block_rows`` = R)."""
    R, S = block_rows, data.shape[0]
    G, ow = LANES // R, offset_words(data.shape[0], LANES // block_rows)
    offsets = words[:ow].view(np.uint8)[:S * G].reshape(S, G).astype(np.int64)
    bases = np.repeat(words[ow:].astype(np.int64), 2)  # one window per pair of slots
    out = np.zeros(shape, np.float32)
    for g in range(len(slots) - 1):
        for s in range(slots[g], slots[g + 1]):
            for lane in range(LANES):
                out[g * LANES + lane, bases[s] + offsets[s, lane // R]] += data[s, lane]
    return out


def _window(x, m, words, offsets, OW, j, G, R):
    """x[m, base + offset] for each lane of slot j (base = words[OW + j // 2], shared by the
    slots of a pair): two vectors of x and one vpermi2ps."""
    offset = T.cast(offsets[T.Ramp(j * G, 1, G)], f"int32x{G}")
    if R > 1:  # each block row's offset to its R lanes
        offset = T.Shuffle([offset] * R, [lane // R for lane in range(LANES)])
    base = words[OW + j // 2]
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
                                   x[m, T.Ramp(base, 1, LANES)], offset, x[m, T.Ramp(base + LANES, 1, LANES)])


@T.macro(hygienic=False)
def _add_pair(acc, data, x, words, offsets, a, b, p, M, V, OW, G, R):
    """acc[m, a] += slot 2p's weights times x's window, acc[m, b] += slot 2p + 1's, for every row m.
    Both ``_window`` calls load the same two vectors of x; LLVM emits those loads once per pair
    (checked in the assembly: two loads of x, two vpermi2ps)."""
    for m in T.unroll(M):
        acc[m, a, T.Ramp(0, 1, V)] = acc[m, a, T.Ramp(0, 1, V)] + \
            data[2 * p, T.Ramp(0, 1, V)] * _window(x, m, words, offsets, OW, 2 * p, G, R)
        acc[m, b, T.Ramp(0, 1, V)] = acc[m, b, T.Ramp(0, 1, V)] + \
            data[2 * p + 1, T.Ramp(0, 1, V)] * _window(x, m, words, offsets, OW, 2 * p + 1, G, R)


def windowed_gemv(s: BsrMatmulShape, accumulators: int, epilogue: Epilogue):
    """The kernel: ``s.slots`` slots; arguments x [M, K], data [S, 16], words, slots, bias [N],
    out [M, N]. Parallel over groups of 16 outputs; ``accumulators`` vectors per row of x take
    turns over the slots (one multiply-add chain is latency-bound), a pair's two slots in two
    of them (in one, with a single accumulator)."""
    M, K, N, S, dtype = s.rows, s.inputs, s.outputs, s.slots, s.dtype
    R, A, V = s.block[0], accumulators, LANES
    P = max(A // 2, 1)  # pairs per step
    G, NG = V // R, s.outputs // V
    OW = offset_words(S, G)
    LO, HI = epilogue.low, epilogue.high

    @T.prim_func(private=True)
    def bsr_gemv_windowed(x: T.Buffer((M, K), dtype), data: T.Buffer((S, V), dtype),
                          words: T.Buffer((OW + S // 2,), "int32"), slots: T.Buffer((NG + 1,), "int32"),
                          bias: T.Buffer((N,), dtype), out: T.Buffer((M, N), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        offsets = T.decl_buffer((OW * 4,), "uint8", data=words.data)
        for g in T.parallel(NG):
            acc = T.alloc_buffer((M, A, V), dtype)
            for m in T.unroll(M):
                for a in T.unroll(A):
                    acc[m, a, T.Ramp(0, 1, V)] = T.Broadcast(T.cast(0, dtype), V)
            for q in range((slots[g + 1] - slots[g]) // (2 * P)):
                for a in T.unroll(P):
                    _add_pair(acc, data, x, words, offsets, (2 * a) % A, (2 * a + 1) % A,
                              slots[g] // 2 + q * P + a, M, V, OW, G, R)
            for t in range((slots[g + 1] - slots[g]) // 2 % P):
                _add_pair(acc, data, x, words, offsets, 0, 1 % A, slots[g + 1] // 2 - t - 1, M, V, OW, G, R)
            for m in T.unroll(M):
                for a in T.unroll(1, A):
                    acc[m, 0, T.Ramp(0, 1, V)] = acc[m, 0, T.Ramp(0, 1, V)] + acc[m, a, T.Ramp(0, 1, V)]
                out[m, T.Ramp(g * V, 1, V)] = clamp(acc[m, 0, T.Ramp(0, 1, V)] + bias[T.Ramp(g * V, 1, V)],
                                                    LO, HI, dtype)

    return bsr_gemv_windowed
