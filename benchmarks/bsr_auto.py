"""`--sparsity auto` against the dense TVM build, layer by layer, down to 30 % sparsity.

The contract: with auto, no layer is slower than its dense TVM build at any sparsity. Each
case is one ONNX MatMul or Conv (the writers of bsr_layers.py) with a block-sparse weight,
built twice: dense, and with `SparsifyOptions(block, auto=True)`, which measures the layer
dense and as BSR and keeps the faster. Both builds run in alternating rounds in one process;
`dense / auto` above 1 means auto is faster.

The dense build is what `--dense-kernel` says (as compile's option): `packed` (the default:
prune2tvm's packed dense kernel, `compile` without --bsr), or `tvm`:
TVM's op tuned with meta_schedule, N trials per layer shape in benchmarks/.tuning-db/
(already-tuned shapes are not tuned again), the same database applied to both builds.

Usage: python benchmarks/bsr_auto.py [--dense-kernel packed|tvm] [--tune-trials N] [--repeat N] [--only TEXT]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bsr_layers import CONVS, LAYERS, ROWS, conv_onnx, matmul_onnx

SPARSITIES = [0.3, 0.5, 0.7, 0.9]
BLOCKS = [(1, 1), (4, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune-trials", type=int, default=32, help="meta_schedule trials per dense layer shape")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--only", default="", help="only cases whose label contains this (e.g. Conv)")
    parser.add_argument("--dense-kernel", choices=["packed", "tvm"], default="packed")
    args = parser.parse_args()

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions, dense_options, prepare_module
    from prune2tvm.compile.tune import TuningDatabase, tune_module
    from prune2tvm.config import load_target
    from prune2tvm.measure.latency import measure_interleaved

    target = load_target(args.target)
    database = TuningDatabase(Path(__file__).parent / ".tuning-db", target)
    cases = []  # (label, writer, input shape)
    for k, n in LAYERS:
        for rows in ROWS:
            cases.append((f"Linear {k}->{n} x{rows}",
                          lambda p, b, s, rows=rows, k=k, n=n: matmul_onnx(p, rows, k, n, b, s, seed=int(100 * s)),
                          [rows, k]))
    for c, o, k, size in CONVS:
        cases.append((f"Conv {k}x{k} {c}->{o} {size}x{size}",
                      lambda p, b, s, c=c, o=o, k=k, size=size: conv_onnx(p, c, o, k, size, b, s, seed=int(100 * s)),
                      [1, c, size, size]))
    cases = [case for case in cases if args.only in case[0]]
    dense_build = dense_options(args.dense_kernel, target)  # as compile without --bsr
    print(f"| layer | block | sparsity | auto chose | dense ({args.dense_kernel}) ms | auto ms | dense / auto |")
    print("|---|---|---:|---|---:|---:|---:|")
    slower = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.onnx"
        for label, write, shape in cases:
            dense = None
            for block in BLOCKS:
                for sparsity in SPARSITIES:
                    write(path, block, sparsity)
                    if dense is None:  # dense time and schedule do not depend on the weights' values
                        if dense_build is None:
                            tune_module(prepare_module(path, target, {"input": shape}).mod, target, database,
                                        args.tune_trials)
                        dense = compile_onnx(path, target, {"input": shape}, database=database,
                                             sparsify=dense_build)
                    auto = compile_onnx(path, target, {"input": shape}, database=database,
                                        sparsify=SparsifyOptions(block, auto=True, dense_kernel=args.dense_kernel))
                    layer = auto.info.layers[0]
                    feeds = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
                    stats = measure_interleaved({"dense": dense.bind(feeds), "auto": auto.bind(feeds)},
                                                warmup=10, repeat=args.repeat, rounds=3)
                    ratio = stats["dense"].median / stats["auto"].median
                    chose = layer["kind"].upper() + (" (vs untuned)" if "untuned" in layer["reason"] else "")
                    if ratio < 0.95:
                        slower.append(f"{label} {block[0]}x{block[1]} {sparsity:.1f}")
                    print(f"| {label} | {block[0]}x{block[1]} | {sparsity:.1f} | {chose} | {stats['dense'].median:.3f} "
                          f"| {stats['auto'].median:.3f} | {ratio:.2f}x |", flush=True)
    print(f"\nauto more than 5 % slower than dense in {len(slower)} of {len(cases) * len(BLOCKS) * len(SPARSITIES)} "
          f"cases{': ' + ', '.join(slower) if slower else ''}")


if __name__ == "__main__":
    main()
