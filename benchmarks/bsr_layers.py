"""BSR linear and conv layers through the whole compile path vs onnxruntime dense, side by side.

Each case is an ONNX MatMul (or Conv) with a block-sparse weight, compiled with
`compile_onnx(..., sparsify=SparsifyOptions(block, 0))` (import -> BSR rewrite -> build ->
check against onnxruntime), then timed against onnxruntime on the same ONNX in alternating
rounds in one process. `ideal` is the FLOP-proportional 1 / (1 - sparsity).

TVM dense is measured beside them: the packed dense build (`compile` without --bsr, the default,
prune2tvm's kernel with every block stored; `packed / ORT` is its time over onnxruntime's)
and, with --tune-trials N, TVM's own dense op tuned with meta_schedule (N trials per layer
shape, in a database kept in benchmarks/.tuning-db/).

Usage: python benchmarks/bsr_layers.py [--quick] [--repeat N] [--tune-trials N] [--only TEXT] [--rows N]
       [--blocks RxC,...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

LAYERS = [(768, 3072), (3072, 768)]
CONVS = [(256, 256, 1, 56), (64, 64, 3, 56)]  # (in channels, out channels, kernel, image size), batch 1
ROWS = [1, 128]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
BLOCKS = [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1)]  # (R output channels, C inputs)


def matmul_onnx(path: Path, rows: int, k: int, n: int, block: tuple[int, int], sparsity: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    r, c = block
    keep = rng.random((n // r, k // c)) >= sparsity
    w_nk = rng.standard_normal((n, k)).astype(np.float32) * np.repeat(np.repeat(keep, r, 0), c, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])], "bsr_layer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w_nk.T), "w")])
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def conv_onnx(path: Path, c: int, o: int, k: int, size: int, block: tuple[int, int], sparsity: float,
              seed: int) -> None:
    rng = np.random.default_rng(seed)
    r, cb = block
    keep = rng.random((o // r, c * k * k // cb)) >= sparsity
    w = rng.standard_normal((o, c * k * k)).astype(np.float32) * np.repeat(np.repeat(keep, r, 0), cb, 1)
    pad = k // 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], pads=[pad] * 4, kernel_shape=[k, k])], "bsr_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, o, size, size])],
        [numpy_helper.from_array(w.reshape(o, c, k, k), "w")])
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 90 %% sparsity, 1x1, 4x1 and 16x1 blocks")
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--tune-trials", type=int, default=0, help="tune TVM dense with this many trials per shape")
    parser.add_argument("--only", default="", help="only cases whose label contains this (e.g. Conv)")
    parser.add_argument("--rows", type=int, default=0, help="only linear layers with this many activation rows")
    parser.add_argument("--blocks", default="", help="only these blocks, e.g. 1x4,4x1")
    args = parser.parse_args()
    sparsities = [0.9] if args.quick else SPARSITIES
    blocks = [(1, 1), (4, 1), (16, 1)] if args.quick else BLOCKS
    if args.blocks:
        blocks = [tuple(int(d) for d in b.split("x")) for b in args.blocks.split(",")]

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions
    from prune2tvm.config import load_target
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import session

    target = load_target(args.target)
    cases = []  # (label, rows or image, block, sparsity, writer, input shape)
    for k, n in LAYERS:
        for rows in ROWS:
            cases += [(f"Linear {k}->{n}", rows, block, sparsity,
                       lambda p, b, s, rows=rows, k=k, n=n: matmul_onnx(p, rows, k, n, b, s, seed=int(100 * s)),
                       [rows, k]) for block in blocks for sparsity in sparsities]
    for c, o, k, size in CONVS:
        cases += [(f"Conv {k}x{k} {c}->{o} {size}x{size}", 1, block, sparsity,
                   lambda p, b, s, c=c, o=o, k=k, size=size: conv_onnx(p, c, o, k, size, b, s, seed=int(100 * s)),
                   [1, c, size, size]) for block in blocks for sparsity in sparsities]
    cases = [c for c in cases if args.only in c[0] and (not args.rows or (c[0].startswith("Linear") and c[1] == args.rows))]
    database = None
    if args.tune_trials:
        from prune2tvm.compile.build import prepare_module
        from prune2tvm.compile.tune import TuningDatabase, tune_module

        database = TuningDatabase(Path(__file__).parent / ".tuning-db", target)
    tvm_dense, packed = {}, {}  # (label, rows) -> compiled tuned / packed dense build
    print("| layer | rows | block | sparsity | BSR ms | TVM dense (packed) ms | TVM dense (tuned) ms | ORT dense ms "
          "| vs TVM packed | vs ORT | ideal | of ideal (ORT) | packed / ORT |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows, block, sparsity, write, shape in cases:
            path = Path(tmp) / "layer.onnx"
            write(path, block, sparsity)
            compiled = compile_onnx(path, target, {"input": shape}, sparsify=SparsifyOptions(block, 0.0))
            ort = session(path, threads=target.threads)
            feeds = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            if (label, rows) not in packed:  # the dense kernel's time does not depend on the weights' values
                packed[(label, rows)] = compile_onnx(path, target, {"input": shape},
                                                     sparsify=SparsifyOptions(bsr=False))
            calls = {"bsr": compiled.bind(feeds), "ort": lambda: ort.run(None, feeds),
                     "packed": packed[(label, rows)].bind(feeds)}
            if database is not None:
                if (label, rows) not in tvm_dense:  # schedules do not depend on the weights' values
                    tune_module(prepare_module(path, target, {"input": shape}).mod, target, database, args.tune_trials)
                    tvm_dense[(label, rows)] = compile_onnx(path, target, {"input": shape}, database=database)
                calls["tvm"] = tvm_dense[(label, rows)].bind(feeds)
            stats = measure_interleaved(calls, warmup=10, repeat=args.repeat, rounds=3)
            speedup = stats["ort"].median / stats["bsr"].median
            ideal = 1.0 / (1.0 - sparsity)
            tvm_ms = f"{stats['tvm'].median:.3f}" if "tvm" in stats else "-"
            bsr_ms, packed_ms, ort_ms = stats["bsr"].median, stats["packed"].median, stats["ort"].median
            print(f"| {label} | {rows} | {block[0]}x{block[1]} | {sparsity:.2f} | {bsr_ms:.3f} | {packed_ms:.3f} | "
                  f"{tvm_ms} | {ort_ms:.3f} | {packed_ms / bsr_ms:.2f}x | {speedup:.2f}x | {ideal:.1f}x | "
                  f"{100 * speedup / ideal:.0f} % | {packed_ms / ort_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
