"""Whole models from the zoo at real size, random weights pruned one shot with 4x1 blocks:
TVM with BSR kernels vs TVM dense vs onnxruntime dense, measured side by side.

The TVM dense build uses TVM's default schedules. With --tune-trials N, what the BSR rewrite
leaves dense in the BSR build (depthwise convs, attention's activation products, pooling,
elementwise ops) is tuned with meta_schedule, N trials per model, in a database kept in
benchmarks/.tuning-db/; without it those parts are untuned too: read the BSR/ORT ratio with
that in mind. --skip-tvm-dense leaves out the (slow) dense TVM build.

Usage: python benchmarks/bsr_models.py [--models bert_base,mobilenet_v2,resnet50] [--repeat N]
       [--tune-trials N] [--skip-tvm-dense] [--fast-math]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {  # name: (sample shape, classes, sparsity, what is pruned)
    "bert_base": ((128, 768), 2, 0.9, "linear layers of the encoder"),
    "mobilenet_v2": ((3, 224, 224), 1000, 0.7, "every conv and linear layer but the depthwise ones"),
    "resnet50": ((3, 224, 224), 1000, 0.7, "every conv and linear layer"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--tune-trials", type=int, default=0, help="tune the BSR build's dense parts, N trials")
    parser.add_argument("--skip-tvm-dense", action="store_true", help="do not build or measure TVM dense")
    parser.add_argument("--fast-math", action="store_true", help="TVM's fast erf/exp/tanh/softmax in the BSR build")
    args = parser.parse_args()

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions
    from prune2tvm.config import load_target
    from prune2tvm.export import export_onnx
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.models import build_model
    from prune2tvm.onnxrt import session
    from prune2tvm.prune.blocks import prune_blocks_one_shot

    target = load_target(args.target)
    rows = []
    for name in args.models.split(","):
        shape, classes, sparsity, pruned = MODELS[name]
        torch.manual_seed(0)
        model = build_model(name, shape, classes).eval()
        skip = ("classifier",) if name == "bert_base" else ()
        skipped = prune_blocks_one_shot(model, (4, 1), sparsity, skip=skip)
        with tempfile.TemporaryDirectory() as tmp:
            check = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
            onnx_model = export_onnx(model, shape, Path(tmp) / f"{name}.onnx", 17, check)
            shapes, sparsify = {"input": [1, *shape]}, SparsifyOptions((4, 1), 0.5)
            database = prepared = None
            if args.tune_trials:
                from prune2tvm.compile.build import prepare_module
                from prune2tvm.compile.tune import TuningDatabase, tune_module

                database = TuningDatabase(Path(__file__).parent / ".tuning-db", target)
                prepared = prepare_module(onnx_model.path, target, shapes, sparsify, fast_math=args.fast_math)
                tune_module(prepared.mod, target, database, args.tune_trials)
            start = time.perf_counter()
            bsr = compile_onnx(onnx_model.path, target, shapes, sparsify=sparsify, database=database, prepared=prepared,
                               fast_math=args.fast_math)
            bsr_build_s = time.perf_counter() - start
            ort = session(onnx_model.path, threads=target.threads)
            feeds = {"input": check}
            calls = {"bsr": bsr.bind(feeds), "ort": lambda: ort.run(None, feeds)}
            if not args.skip_tvm_dense:
                calls["tvm_dense"] = compile_onnx(onnx_model.path, target, shapes).bind(feeds)
            stats = measure_interleaved(calls, warmup=2, repeat=args.repeat, rounds=2)
        n_bsr = sum(d["kind"] == "bsr" for d in bsr.info.layers)
        rows.append((name, sparsity, pruned, n_bsr, len(bsr.info.layers), len(skipped), bsr_build_s, stats))
        print(f"{name}: BSR {stats['bsr'].median:.2f} ms, ORT {stats['ort'].median:.2f} ms", flush=True)

    print("\n| model | pruned (4x1 blocks) | BSR layers | TVM BSR ms | TVM dense ms | ORT dense ms "
          "| BSR vs TVM dense | BSR vs ORT |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, sparsity, pruned, n_bsr, n_layers, n_skipped, build_s, st in rows:
        bsr_ms, dense = st["bsr"].median, st.get("tvm_dense")
        dense_ms = f"{dense.median:.2f}" if dense else "-"
        vs_dense = f"{dense.median / bsr_ms:.2f}x" if dense else "-"
        print(f"| {name} | {100 * sparsity:.0f} % of {pruned} | {n_bsr} of {n_layers} | {bsr_ms:.2f} "
              f"| {dense_ms} | {st['ort'].median:.2f} | {vs_dense} | {st['ort'].median / bsr_ms:.2f}x |")


if __name__ == "__main__":
    main()
