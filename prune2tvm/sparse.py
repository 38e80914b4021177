"""Block-Sparse-Row (BSR) matrices in numpy: conversion, block sparsity, the reference product.

A weight W of shape [N, K] (output channels x inputs, as torch stores a Linear) is cut into
R x C blocks: R consecutive output channels (the N of the 1xN pattern) by C consecutive
inputs. Only blocks with a nonzero are kept:

  data    [nnzb, R, C]   the kept blocks
  indices [nnzb]         each block's column (in blocks of C inputs)
  indptr  [N/R + 1]      block row i owns blocks indptr[i] .. indptr[i+1]-1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BsrMatrix:
    shape: tuple[int, int]  # [N, K]
    block: tuple[int, int]  # (R, C)
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def nnzb(self) -> int:
        return int(self.indices.size)

    @property
    def block_rows(self) -> int:
        return self.shape[0] // self.block[0]

    @property
    def block_sparsity(self) -> float:
        total = (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])
        return 1.0 - self.nnzb / total if total else 0.0

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, indices, indptr) for a kernel; a matrix with no nonzero block gets one zero
        block so that no buffer is empty (indptr still says every block row is empty)."""
        if self.nnzb:
            return self.data, self.indices, self.indptr
        return np.zeros((1, *self.block), self.data.dtype), np.zeros(1, np.int32), self.indptr

    @classmethod
    def from_dense(cls, weight: np.ndarray, block: tuple[int, int], keep_zero_blocks: bool = False) -> "BsrMatrix":
        """The nonzero R x C blocks of ``weight`` (every block with ``keep_zero_blocks``: the
        dense layout prune2tvm's packed kernel reads)."""
        rows, cols = block
        n, k = weight.shape
        if n % rows or k % cols:
            raise ValueError(f"weight {list(weight.shape)} is not divisible into {rows}x{cols} blocks")
        blocks = weight.reshape(n // rows, rows, k // cols, cols).transpose(0, 2, 1, 3)
        nonzero = np.ones(blocks.shape[:2], bool) if keep_zero_blocks else np.any(blocks != 0, axis=(2, 3))
        block_row, block_col = np.nonzero(nonzero)
        indptr = np.zeros(n // rows + 1, dtype=np.int32)
        np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
        data = np.ascontiguousarray(blocks[block_row, block_col], dtype=weight.dtype)
        return cls((n, k), (rows, cols), data.reshape(-1, rows, cols), block_col.astype(np.int32), indptr)

    def to_dense(self) -> np.ndarray:
        rows, cols = self.block
        out = np.zeros(self.shape, dtype=self.data.dtype)
        for i in range(self.block_rows):
            for b in range(self.indptr[i], self.indptr[i + 1]):
                j = self.indices[b]
                out[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = self.data[b]
        return out


def block_sparsity(weight: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of all-zero R x C blocks of an [N, K] weight (which must divide into them)."""
    rows, cols = block
    n, k = weight.shape
    blocks = weight.reshape(n // rows, rows, k // cols, cols)
    return float(1.0 - np.any(blocks != 0, axis=(1, 3)).mean())


def bsr_matmul_reference(x: np.ndarray, weight: BsrMatrix) -> np.ndarray:
    """x [M, K] @ W.T -> [M, N], computed block by block (the kernels' numpy reference)."""
    rows, cols = weight.block
    m = x.shape[0]
    out = np.zeros((m, weight.shape[0]), dtype=np.float64)
    for i in range(weight.block_rows):
        for b in range(weight.indptr[i], weight.indptr[i + 1]):
            j = weight.indices[b]
            out[:, i * rows:(i + 1) * rows] += x[:, j * cols:(j + 1) * cols].astype(np.float64) @ weight.data[b].T
    return out.astype(x.dtype)
