"""Tuned vs untuned, for the dense and the BSR kernels of the benchmark layers (issue #5).

For each layer of `bsr_layers.py` at 90 % sparsity in 4x1 blocks (Linear 768->3072 and
3072->768 at 1 and 128 rows, conv 1x1 256->256 and 3x3 64->64 at 56x56), four TVM builds of
the same ONNX:
- dense, untuned: TVM's default schedules;
- dense, tuned: meta_schedule, --trials measurements for the layer, in a fresh database;
- BSR with the kernels' default parameters;
- BSR tuned: the BSR parameter search (`prune2tvm tune` does the same), records in the same
  database;
and onnxruntime dense. The tuned builds, the default BSR build and onnxruntime are timed in
alternating rounds in one process; the untuned dense build (50-1000x slower) is timed alone,
a few calls, right after them.

Usage: python benchmarks/tuning.py [--trials N] [--repeat N] [--only TEXT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bsr_layers import conv_onnx, matmul_onnx  # noqa: E402

SPARSITY, BLOCK = 0.9, (4, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="meta_schedule trials per dense layer")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--only", default="", help="only layers whose label contains this")
    args = parser.parse_args()

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.bsr_tune import BsrRecords, tune_bsr_kernels
    from prune2tvm.compile.build import SparsifyOptions, prepare_module
    from prune2tvm.compile.tune import TuningDatabase, tune_module
    from prune2tvm.config import load_target
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import session

    target = load_target(args.target)
    layers = []  # (label, input shape, writer)
    for k, n in [(768, 3072), (3072, 768)]:
        for rows in (1, 128):
            layers.append((f"Linear {k}->{n}, {rows} row{'s' if rows > 1 else ''}", [rows, k],
                           lambda p, rows=rows, k=k, n=n: matmul_onnx(p, rows, k, n, BLOCK, SPARSITY, seed=90)))
    for c, o, k, size in [(256, 256, 1, 56), (64, 64, 3, 56)]:
        layers.append((f"Conv {k}x{k} {c}->{o} {size}x{size}", [1, c, size, size],
                       lambda p, c=c, o=o, k=k, size=size: conv_onnx(p, c, o, k, size, BLOCK, SPARSITY, seed=90)))
    layers = [layer for layer in layers if args.only in layer[0]]
    sparse = SparsifyOptions(BLOCK, 0.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape, write in layers:
            path, db_dir = Path(tmp) / "layer.onnx", Path(tmp) / f"db-{len(rows)}"
            write(path)
            shapes = {"input": shape}
            database = TuningDatabase(db_dir, target)
            start = time.perf_counter()
            tune_module(prepare_module(path, target, shapes).mod, target, database, args.trials)
            dense_tune_s = time.perf_counter() - start
            reports = tune_bsr_kernels(prepare_module(path, target, shapes, sparse).bsr_kernels, target,
                                       BsrRecords.open(db_dir))
            builds = {
                "dense_tuned": compile_onnx(path, target, shapes, database=database),
                "bsr_default": compile_onnx(path, target, shapes, sparsify=sparse),
                "bsr_tuned": compile_onnx(path, target, shapes, sparsify=sparse, database=database),
            }
            ort = session(path, threads=target.threads)
            feeds = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            calls = {name: build.bind(feeds) for name, build in builds.items()}
            calls["ort"] = lambda: ort.run(None, feeds)
            stats = measure_interleaved(calls, warmup=10, repeat=args.repeat, rounds=3)
            untuned = compile_onnx(path, target, shapes).bind(feeds)
            untuned()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                untuned()
                times.append(time.perf_counter() - t0)
            params = ", ".join(f"{r.params}" for r in reports)
            rows.append((label, float(np.median(times)) * 1e3, stats, dense_tune_s, params))
            st = stats
            print(f"{label}: dense {rows[-1][1]:.3f} -> {st['dense_tuned'].median:.3f} ms; BSR "
                  f"{st['bsr_default'].median:.3f} -> {st['bsr_tuned'].median:.3f} ms ({params}); "
                  f"ORT {st['ort'].median:.3f} ms", flush=True)

    print("\n| layer | dense untuned ms | dense tuned ms | tuned / untuned | BSR default ms | BSR tuned ms "
          "| BSR default / tuned | BSR parameters kept | ORT dense ms | dense tuned vs ORT | BSR tuned vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for label, untuned_ms, st, _, params in rows:
        dense, bd, bt, ort = (st[k].median for k in ("dense_tuned", "bsr_default", "bsr_tuned", "ort"))
        print(f"| {label} | {untuned_ms:.3f} | {dense:.3f} | {untuned_ms / dense:.1f}x faster | {bd:.3f} | {bt:.3f} "
              f"| {bd / bt:.2f}x | {params} | {ort:.3f} | {ort / dense:.2f}x | {ort / bt:.2f}x |")


if __name__ == "__main__":
    main()
