"""Latency of the digits models: TVM (default schedules, no tuning) vs onnxruntime.

Both run side by side in this process, in alternating rounds; the figures to read are the
ratios. Usage: python benchmarks/digits_latency.py [--batch 1 --batch 64] [--repeat 300]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 64)")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--target", default="x86")
    args = parser.parse_args()
    batches = args.batch or [1, 64]

    from prune2tvm.compile import compile_onnx
    from prune2tvm.config import load_target
    from prune2tvm.export import export_onnx
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.models import build_model
    from prune2tvm.onnxrt import session

    target = load_target(args.target)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in ("mlp", "cnn"):
            torch.manual_seed(0)
            model = build_model(model_name, (1, 8, 8), 10).eval()
            check = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
            onnx_model = export_onnx(model, (1, 8, 8), Path(tmp) / f"{model_name}.onnx", 17, check)
            ort = session(onnx_model.path, threads=target.threads)
            for batch in batches:
                compiled = compile_onnx(onnx_model.path, target, {"input": [batch, 1, 8, 8]})
                feeds = {"input": np.random.default_rng(1).standard_normal((batch, 1, 8, 8)).astype(np.float32)}
                stats = measure_interleaved({"tvm": compiled.bind(feeds), "ort": lambda: ort.run(None, feeds)},
                                            warmup=30, repeat=args.repeat, rounds=6)
                rows.append((model_name, batch, stats["tvm"].median, stats["ort"].median,
                             stats["ort"].median / stats["tvm"].median))
    print("| model | batch | TVM median ms | onnxruntime median ms | ORT / TVM |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, tvm_ms, ort_ms, ratio in rows:
        print(f"| {name} | {batch} | {tvm_ms:.3f} | {ort_ms:.3f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
