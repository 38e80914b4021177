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


def fidelity(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity of each row of ``logits`` to the same row of ``reference`` (the
    dense model's): 1.0 when the outputs point the same way. A continuous measure of how much
    pruning changed the model, where top-1 agreement is too coarse (few samples, or a
    random-weight model that predicts one class for every input)."""
    a = np.asarray(logits, np.float64).reshape(len(logits), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = (a * b).sum(1) / np.where(norms > 0, norms, 1.0)
    # two all-zero rows are the same output; one all-zero row shares no direction with the other
    same = np.where(norms > 0, same, (np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0))
    return float(np.clip(same, -1.0, 1.0).mean())


def top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits."""
    best = np.argpartition(-logits, min(k, logits.shape[1]) - 1, axis=1)[:, :k]
    return float((best == labels[:, None]).any(1).mean())
