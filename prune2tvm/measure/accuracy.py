"""Predictions of a fixed-batch backend over a whole split (the last batch padded)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def predict_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions of ``run`` (one batch of exactly ``batch_size`` rows -> logits)."""
    return logits_batched(run, x, batch_size).argmax(1)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two backends predict the same class."""
    return float((a == b).mean())


def logits_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """The logits of ``run`` (one batch of exactly ``batch_size`` rows) for every row of ``x``."""
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        rows = len(chunk)
        if rows < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(run(chunk))[:rows])
    return np.concatenate(out)


def top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits."""
    best = np.argpartition(-logits, min(k, logits.shape[1]) - 1, axis=1)[:, :k]
    return float((best == labels[:, None]).any(1).mean())
