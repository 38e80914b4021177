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
    """Max abs difference, the tolerance scaled to the output's magnitude, and whether it holds.
    Outputs of a float type narrower than float32 (float16) get at least 10 of its units in the
    last place as ``rtol``: two correct float16 builds differ by that much (summation order)."""
    if np.issubdtype(expected.dtype, np.floating) and np.finfo(expected.dtype).eps > np.finfo(np.float32).eps:
        rtol = max(rtol, 10 * float(np.finfo(expected.dtype).eps))
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
    tolerance = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
    return diff, tolerance, diff <= tolerance


def random_input(rng: np.random.Generator, shape, dtype: str, index_bound: int | None = None) -> np.ndarray:
    """A random test input of ``dtype``: floats standard normal; integers that index a table
    (token ids) in [0, index_bound); other 8-bit integers (images, quantized data) over their
    whole range; other integers (masks, type ids) 0 or 1; booleans either way."""
    kind = np.dtype(dtype)
    if kind == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(kind, np.integer):
        if index_bound:
            return rng.integers(0, index_bound, size=shape).astype(kind)
        if kind.itemsize == 1:
            return rng.integers(np.iinfo(kind).min, np.iinfo(kind).max, size=shape, endpoint=True).astype(kind)
        return rng.integers(0, 2, size=shape).astype(kind)
    return rng.standard_normal(shape).astype(kind)


def random_feeds(specs, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``random_input`` for each of a model's inputs (``InputSpec``s or their manifest dicts)."""
    feeds = {}
    for spec in specs:
        s = spec if isinstance(spec, dict) else vars(spec)
        feeds[s["name"]] = random_input(rng, s["shape"], s["dtype"], s.get("index_bound"))
    return feeds


WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def profile_weight_layers(path: str | os.PathLike, feeds: dict[str, np.ndarray], runs: int = 20,
                          threads: int | None = None) -> dict:
    """onnxruntime's own per-node profile of the model: ``total_ms`` (every node's kernel time
    per call) and ``layers`` (ms per call of each Conv / MatMul / Gemm, keyed by its weight
    initializer). Basic graph optimizations only, so nodes keep their names."""
    import json
    import tempfile

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    weight_of = {n.name: n.input[1] for n in model.graph.node
                 if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in initializers}
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    total, layers = 0.0, {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        ms = event.get("dur", 0) / 1e3 / runs
        total += ms
        node = name[: -len("_kernel_time")]
        if node in weight_of:
            layers[weight_of[node]] = layers.get(weight_of[node], 0.0) + ms
    return {"total_ms": total, "layers": layers, "runs": runs}
