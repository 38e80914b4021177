"""Latency of the digits models: TVM untuned (the default dense build, whose linear and conv
layers run prune2tvm's packed dense kernel, and `--dense-kernel tvm`, TVM's ops with their
default schedules) vs onnxruntime.

All three run side by side in this process, in alternating rounds; the figures to read are
the ratios. Usage: python benchmarks/digits_latency.py [--batch 1 --batch 64] [--repeat 300]
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
    from prune2tvm.compile.build import SparsifyOptions
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
                shapes = {"input": [batch, 1, 8, 8]}
                packed = compile_onnx(onnx_model.path, target, shapes, sparsify=SparsifyOptions(bsr=False))
                tvm_ops = compile_onnx(onnx_model.path, target, shapes)
                feeds = {"input": np.random.default_rng(1).standard_normal((batch, 1, 8, 8)).astype(np.float32)}
                stats = measure_interleaved({"packed": packed.bind(feeds), "tvm": tvm_ops.bind(feeds),
                                             "ort": lambda: ort.run(None, feeds)},
                                            warmup=30, repeat=args.repeat, rounds=6)
                rows.append((model_name, batch, stats["packed"].median, stats["tvm"].median, stats["ort"].median))
    print("| model | batch | TVM (packed) ms | TVM (--dense-kernel tvm) ms | onnxruntime ms | ORT / packed | ORT / tvm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batch, packed_ms, tvm_ms, ort_ms in rows:
        print(f"| {name} | {batch} | {packed_ms:.3f} | {tvm_ms:.3f} | {ort_ms:.3f} | {ort_ms / packed_ms:.3f}x "
              f"| {ort_ms / tvm_ms:.3f}x |")


if __name__ == "__main__":
    main()
