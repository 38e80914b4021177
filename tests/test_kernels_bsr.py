"""BSR kernels against their numpy reference, on shapes and sparsity patterns that break
naive kernels: empty block rows, no nonzero block at all, fully dense, batch sizes that are
not multiples of the vector width."""

import shutil

import numpy as np
import pytest
import tvm
from hypothesis import given, settings, strategies as st

from prune2tvm.compile.build import cuda_sources
from prune2tvm.compile.kernels.bsr_matmul import (FLT_MAX, GEMV_MAX_ROWS, NO_EPILOGUE, BsrMatmulShape, Epilogue,
                                                  STAGE_ROW_COLUMNS, bsr_matmul_cpu, bsr_matmul_cuda, default_groups,
                                                  default_stage,
                                                  search_space, staged_groups)
from prune2tvm.compile.kernels.windowed_gemv import window_layout, window_to_dense, windowed
from prune2tvm.sparse import BsrMatrix, block_sparsity, bsr_matmul_reference

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.get_global_func("target.llvm_get_system_cpu")()})


def block_sparse_weight(rng, n, k, block, sparsity, empty_rows=()):
    r, c = block
    keep = rng.random((n // r, k // c)) >= sparsity
    for row in empty_rows:
        keep[row] = False
    return (rng.standard_normal((n, k)) * np.repeat(np.repeat(keep, r, 0), c, 1)).astype(np.float32)


def run_cpu(x, bsr, lanes=16, bias=None, epilogue=NO_EPILOGUE, **params):
    m, k = x.shape
    func = bsr_matmul_cpu(BsrMatmulShape(m, k, bsr.shape[0], bsr.block, bsr.nnzb), lanes=lanes, epilogue=epilogue,
                          **params)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    bias = np.zeros(bsr.shape[0], np.float32) if bias is None else bias
    args = [tvm.runtime.tensor(a) for a in (x, *bsr.kernel_arrays(), bias)]
    out = tvm.runtime.empty((m, bsr.shape[0]), "float32")
    lib["main"](*args, out)
    return out.numpy()


def test_bsr_matrix_round_trip_and_block_sparsity():
    rng = np.random.default_rng(0)
    w = block_sparse_weight(rng, 16, 12, (4, 2), 0.6, empty_rows=[1])
    bsr = BsrMatrix.from_dense(w, (4, 2))
    assert np.array_equal(bsr.to_dense(), w)
    assert bsr.indptr[2] == bsr.indptr[1]  # block row 1 is empty
    assert bsr.block_sparsity == pytest.approx(block_sparsity(w, (4, 2)))
    assert bsr.block_sparsity == pytest.approx(1 - bsr.nnzb / (4 * 6))
    with pytest.raises(ValueError, match="not divisible"):
        BsrMatrix.from_dense(w, (5, 1))


@pytest.mark.parametrize("m, k, n, block, sparsity, lanes", [
    (1, 64, 32, (4, 1), 0.9, 16),   # batch 1 (GEMV path)
    (1, 48, 64, (16, 1), 0.5, 16),
    (3, 40, 24, (8, 2), 0.7, 8),
    (1, 64, 32, (1, 4), 0.9, 16),   # GEMV over blocks of 4 inputs: C-wide accumulators
    (2, 96, 48, (4, 4), 0.5, 16),
    (1, 40, 16, (1, 8), 0.0, 16),   # fully dense, 8-wide
    (GEMV_MAX_ROWS, 32, 32, (1, 1), 0.9, 16),
    (5, 64, 32, (4, 1), 0.8, 16),   # GEMM path, fewer rows than one vector
    (17, 64, 32, (4, 1), 0.8, 16),  # rows not a multiple of the vector width
    (33, 40, 24, (2, 4), 0.6, 8),
    (128, 96, 64, (16, 1), 0.9, 16),
    (40, 48, 256, (1, 1), 0.7, 16),   # staged through whole 16-column lines, a partial last panel
    (130, 32, 512, (2, 1), 0.5, 16),
    (37, 50, 64, (4, 1), 0.7, 16),    # 16 x 16 blocks of x packed by shuffles, the edges gathered
    (7, 32, 16, (1, 1), 0.0, 16),   # fully dense
    (1, 32, 16, (1, 1), 0.0, 16),
])
def test_cpu_kernels_match_numpy(m, k, n, block, sparsity, lanes):
    rng = np.random.default_rng(m * 1000 + k)
    w = block_sparse_weight(rng, n, k, block, sparsity)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bsr = BsrMatrix.from_dense(w, block)
    expected = bsr_matmul_reference(x, bsr)
    np.testing.assert_allclose(expected, x @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_cpu(x, bsr, lanes), expected, rtol=1e-4, atol=1e-4)


def test_narrow_blocks_at_many_rows_store_whole_lines_through_a_stage():
    """The shapes above that claim to test the staged kernel do reach it."""
    assert staged_groups(BsrMatmulShape(40, 48, 256, (1, 1), 1), 16) == 16
    assert staged_groups(BsrMatmulShape(130, 32, 512, (2, 1), 1), 16) == 8
    assert staged_groups(BsrMatmulShape(128, 96, 64, (16, 1), 1), 16) == 0  # 16 x 1 stores whole vectors
    assert staged_groups(BsrMatmulShape(128, 96, 40, (1, 1), 1), 16) == 0  # 40 outputs: no whole lines


@pytest.mark.parametrize("m, n, block, panels, stage", [
    (37, 1024, (4, 1), None, None),  # the default: a 4 KB row pitch; a partial last panel
    (128, 256, (8, 1), 3, STAGE_ROW_COLUMNS),  # panel tiles past the last panel
    (20, 128, (16, 1), 1, STAGE_ROW_COLUMNS),
    (40, 256, (16, 1), 2, STAGE_ROW_COLUMNS),  # two halves of each block row, two accumulator buffers
    (48, 1024, (4, 1), 2, 0),  # not staged where it would be by default
])
def test_many_rows_staged_row_by_row_match_numpy(m, n, block, panels, stage):
    """Tasks of several block rows that stage their outputs and store them row by row, with
    empty block rows, a bias and a ReLU."""
    rng = np.random.default_rng(n + m)
    w = block_sparse_weight(rng, n, 40, block, 0.7, empty_rows=[0, 5, n // block[0] - 1])
    x = rng.standard_normal((m, 40)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = run_cpu(x, BsrMatrix.from_dense(w, block), bias=bias, epilogue=Epilogue(0.0, FLT_MAX), panels=panels,
                  stage=stage)
    np.testing.assert_allclose(got, np.maximum(x @ w.T + bias, 0), rtol=1e-5, atol=1e-5)


def test_tasks_split_the_block_rows_only_where_tiles_are_too_few_for_the_cores():
    """Each many-rows task packs its tile of x: tiles alone where there are enough of them."""
    shape = BsrMatmulShape(128, 3072, 768, (16, 1), 1)  # 4 tiles of 32 rows
    assert default_groups(shape, 16, None, 0, None) == 1
    assert default_groups(shape, 16, None, 0, 2) == 1
    assert default_groups(shape, 16, None, 0, 16) == 4  # 16 tasks
    assert default_groups(shape, 16, None, 0, 3) == 3  # 12 tasks: 4 per core
    assert default_groups(BsrMatmulShape(20, 64, 128, (16, 1), 1), 16, None, STAGE_ROW_COLUMNS, 2) == 1  # 1 stage
    assert default_groups(BsrMatmulShape(20, 64, 256, (4, 1), 1), 16, 1, 0, 2) == 1  # 2 tiles of 16 rows
    assert default_groups(BsrMatmulShape(20, 64, 256, (4, 1), 1), 16, 2, 0, 2) == 2  # 1 tile of 32


@pytest.mark.parametrize("m, k, n, block, lanes, cores, stage", [
    (40, 48, 256, (16, 1), 16, 4, STAGE_ROW_COLUMNS),  # 2 tiles x 2 groups of one stage each
    (37, 50, 64, (4, 1), 16, 3, 0),  # 16 x 16 blocks of x and the edges, 3 groups of block rows
    (33, 40, 96, (8, 1), 8, 4, 0),  # 8 lanes: the tile gathered element by element
])
def test_many_rows_tasks_over_groups_of_block_rows_match_numpy(m, k, n, block, lanes, cores, stage):
    rng = np.random.default_rng(m + n)
    w = block_sparse_weight(rng, n, k, block, 0.6, empty_rows=[1])
    x = rng.standard_normal((m, k)).astype(np.float32)
    bsr = BsrMatrix.from_dense(w, block)
    assert default_groups(BsrMatmulShape(m, k, n, block, bsr.nnzb), lanes, None, stage, cores) > 1
    np.testing.assert_allclose(run_cpu(x, bsr, lanes, cores=cores, stage=stage), x @ w.T, rtol=1e-4, atol=1e-4)


def test_which_many_rows_kernels_stage_their_rows():
    """By default where the output's rows are a multiple of 4 KB apart; the search tries both."""
    assert default_stage(BsrMatmulShape(128, 768, 3072, (4, 1), 1), 16) == STAGE_ROW_COLUMNS
    assert default_stage(BsrMatmulShape(37, 40, 1024, (4, 1), 1), 16) == STAGE_ROW_COLUMNS
    assert default_stage(BsrMatmulShape(128, 3072, 768, (4, 1), 1), 16) == 0  # 3 KB apart
    assert default_stage(BsrMatmulShape(128, 768, 3072, (4, 1), 1), 8) == 0  # no 16-lane transpose
    assert default_stage(BsrMatmulShape(128, 768, 3072, (12, 1), 1), 16) == 0
    space = search_space(BsrMatmulShape(128, 768, 3072, (4, 1), 1), 16)
    assert space[0]["stage"] == STAGE_ROW_COLUMNS and {p["stage"] for p in space} == {0, STAGE_ROW_COLUMNS}
    assert "stage" not in search_space(BsrMatmulShape(128, 768, 3072, (1, 1), 1), 16)[0]
    with pytest.raises(ValueError, match="stage=128 is not possible"):
        bsr_matmul_cpu(BsrMatmulShape(128, 768, 3072, (12, 1), 1), 16, stage=STAGE_ROW_COLUMNS)


@pytest.mark.parametrize("m", [1, 9])
def test_cpu_kernels_with_empty_block_rows_and_no_blocks_at_all(m):
    rng = np.random.default_rng(5)
    w = block_sparse_weight(rng, 32, 16, (4, 1), 0.5, empty_rows=[0, 3, 7])
    x = rng.standard_normal((m, 16)).astype(np.float32)
    out = run_cpu(x, BsrMatrix.from_dense(w, (4, 1)))
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-4, atol=1e-4)
    assert not out[:, 0:4].any() and not out[:, 28:32].any()
    empty = BsrMatrix.from_dense(np.zeros((32, 16), np.float32), (4, 1))
    assert empty.nnzb == 0 and not run_cpu(x, empty).any()


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), kb=st.integers(1, 6), nb=st.integers(1, 6),
       block=st.sampled_from([(1, 1), (4, 1), (2, 2), (8, 1), (1, 4)]), sparsity=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_random_block_sparse_matrices_match_numpy(m, kb, nb, block, sparsity, seed):
    rng = np.random.default_rng(seed)
    n, k = nb * block[0], kb * block[1]
    w = block_sparse_weight(rng, n, k, block, sparsity)
    x = rng.standard_normal((m, k)).astype(np.float32)
    np.testing.assert_allclose(run_cpu(x, BsrMatrix.from_dense(w, block)), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed, so CUDA kernels cannot be compiled here")
def test_cuda_kernel_builds_and_compiles_with_nvcc():
    from tvm.support import nvcc

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    func = bsr_matmul_cuda(BsrMatmulShape(7, 64, 32, (4, 1), 20))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    (source,) = cuda_sources(lib)
    assert "blockIdx.x" in source and "threadIdx.x" in source
    with target:
        assert nvcc.compile_cuda(source, target_format="fatbin", arch="sm_80", compiler="nvcc")


@pytest.mark.parametrize("low, high", [(0.0, FLT_MAX), (-0.5, 1.0)])  # ReLU; a clip with both bounds
@pytest.mark.parametrize("m, n, block", [(1, 48, (4, 1)), (37, 48, (4, 1)),  # the GEMV and the GEMM path
                                          (37, 256, (1, 1)),  # GEMM, staged
                                          (1, 48, (2, 4))])  # the GEMV over blocks of 4 inputs
def test_fused_bias_and_clamp_match_numpy(m, n, block, low, high):
    rng = np.random.default_rng(m)
    w = block_sparse_weight(rng, n, 32, block, 0.7, empty_rows=[2])
    x = rng.standard_normal((m, 32)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = run_cpu(x, BsrMatrix.from_dense(w, block), bias=bias, epilogue=Epilogue(low, high))
    want = np.clip(x @ w.T + bias, low, high)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got == low).any() and (got > low).any()  # the clamp did something, not everything
    assert high == FLT_MAX or (got == np.float32(high)).any()


AVX512 = tvm.target.codegen.llvm_cpu_has_features("avx512f", HOST)


def run_windowed(x, bsr, bias=None, epilogue=NO_EPILOGUE, **params):
    """The windowed GEMV on ``bsr``'s windowed layout."""
    m, k = x.shape
    arrays = window_layout(bsr)
    shape = BsrMatmulShape(m, k, bsr.shape[0], bsr.block, bsr.nnzb, slots=len(arrays[0]))
    func = bsr_matmul_cpu(shape, 16, epilogue=epilogue, **params)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    bias = np.zeros(bsr.shape[0], np.float32) if bias is None else bias
    out = tvm.runtime.empty((m, bsr.shape[0]), "float32")
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *arrays, bias)], out)
    return out.numpy()


@pytest.mark.parametrize("n, k, r, sparsity, empty_rows", [
    (3072, 768, 1, 0.9, ()),  # 1x1 at 90 %: about 70 % of a slot's lanes used
    (64, 100, 2, 0.5, (0, 5)),  # K not a multiple of the window: the last windows start at K - 32
    (48, 32, 4, 0.0, ()),  # fully dense, K one window
    (32, 40, 1, 1.0, ()),  # no block at all: one zero slot
    (32, 64, 4, 0.8, tuple(range(4))),  # a whole group of 16 outputs empty
])
def test_windowed_layout_holds_exactly_the_matrix(n, k, r, sparsity, empty_rows):
    rng = np.random.default_rng(n + k)
    w = block_sparse_weight(rng, n, k, (r, 1), sparsity, empty_rows)
    bsr = BsrMatrix.from_dense(w, (r, 1))
    data, words, slots = window_layout(bsr)
    np.testing.assert_array_equal(window_to_dense((n, k), r, data, words, slots), w)
    assert len(slots) == n // 16 + 1 and data.shape[1] == 16
    assert len(data) % 2 == 0 and (slots % 2 == 0).all()  # slots come in pairs, one window each
    if bsr.nnzb:  # no pair wasted: the first slot of every pair holds a weight
        assert (data[::2] != 0).reshape(len(data) // 2, 16 // r, r).any(axis=(1, 2)).all()
    if sparsity == 0.9:  # greedy windows keep most lanes busy: about the bytes of the BSR arrays
        assert bsr.nnzb / data.size > 0.55 and data.nbytes + words.nbytes < 1.1 * (bsr.data.nbytes + bsr.indices.nbytes)
    bases = words[-(len(data) // 2):]  # windows start on whole 64-byte lines of x, or at K - 32
    assert ((bases % 16 == 0) | (bases == k - 32)).all()


@pytest.mark.skipif(not AVX512, reason="the windowed GEMV is an AVX-512 kernel")
@pytest.mark.parametrize("m, n, k, r, sparsity, accumulators", [
    (1, 3072, 768, 1, 0.9, 4),
    (4, 64, 100, 2, 0.5, 4),  # 4 rows; windows clamped at the end of x
    (3, 48, 32, 4, 0.0, 1),  # dense
    (2, 32, 40, 1, 1.0, 2),  # no block: the bias alone
    (1, 32, 70, 4, 0.7, 2),  # one pair a step
    (1, 64, 200, 1, 0.8, 8),  # pair counts not multiples of the 4 pairs a step takes
])
def test_windowed_gemv_matches_numpy(m, n, k, r, sparsity, accumulators):
    rng = np.random.default_rng(m * n + k)
    w = block_sparse_weight(rng, n, k, (r, 1), sparsity, empty_rows=[1])
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = run_windowed(x, BsrMatrix.from_dense(w, (r, 1)), bias, accumulators=accumulators)
    np.testing.assert_allclose(got, x @ w.T + bias, rtol=1e-4, atol=1e-4)
    relu = run_windowed(x, BsrMatrix.from_dense(w, (r, 1)), bias, Epilogue(0.0, FLT_MAX))
    np.testing.assert_allclose(relu, np.maximum(x @ w.T + bias, 0), rtol=1e-4, atol=1e-4)
    clipped = run_windowed(x, BsrMatrix.from_dense(w, (r, 1)), bias, Epilogue(-0.5, 1.0))
    np.testing.assert_allclose(clipped, np.clip(x @ w.T + bias, -0.5, 1.0), rtol=1e-4, atol=1e-4)


def test_which_layers_take_the_windowed_gemv():
    def takes(rows, n, k, block, lanes=16):
        return windowed(rows, BsrMatrix.from_dense(np.ones((n, k), np.float32), block), lanes)

    assert takes(1, 64, 32, (1, 1)) and takes(4, 64, 32, (2, 1)) and takes(1, 64, 32, (4, 1))
    assert not takes(5, 64, 32, (1, 1))  # many rows: the packed-panel kernel
    assert not takes(1, 64, 32, (8, 1)) and not takes(1, 64, 32, (1, 4))
    assert not takes(1, 72, 32, (1, 1)) and not takes(1, 64, 16, (1, 1))  # partial vectors; x narrower than a window
    assert not takes(1, 64, 32, (1, 1), lanes=8)  # no AVX-512
    assert search_space(BsrMatmulShape(1, 32, 64, (1, 1), 10, slots=6)) == [
        {"accumulators": 4}, {"accumulators": 2}, {"accumulators": 8}, {"accumulators": 1}]
