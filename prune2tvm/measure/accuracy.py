"""Predictions of a fixed-batch backend over a whole split (the last batch padded)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def predict_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions of ``run`` (one batch of exactly ``batch_size`` rows -> logits)."""
    preds = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        rows = len(chunk)
        if rows < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
        preds.append(run(chunk)[:rows].argmax(1))
    return np.concatenate(preds)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two backends predict the same class."""
    return float((a == b).mean())
