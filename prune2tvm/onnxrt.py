"""onnxruntime sessions, the reference every exported and compiled model is checked against."""

from __future__ import annotations

import os

import numpy as np

from prune2tvm.errors import InputError


def session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: onnxruntime cannot load the model: {first}") from None


def compare(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[float, float, bool]:
    """Max abs difference, the tolerance scaled to the output's magnitude, and whether it holds."""
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
    tolerance = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
    return diff, tolerance, diff <= tolerance
