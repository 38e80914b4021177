"""Whole models from the zoo at real size, random weights pruned one shot with 4x1 blocks:
TVM with BSR kernels vs TVM dense vs onnxruntime dense, measured side by side.

With --tune-trials N, both TVM builds are tuned as `prune2tvm tune` tunes, in a database
kept in benchmarks/.tuning-db/: meta_schedule, N trials each, for what stays TVM's ops
(attention's activation products, pooling, elementwise ops, and under --dense-kernel tvm
the dense layers and --auto's measured dense forms), then the parameter search of the BSR
and packed dense kernels. Without it both use TVM's
default schedules: read the ratios with that in mind. --skip-tvm-dense leaves out the dense
TVM build.

--sparsity S prunes every model at S instead of its default (90 % for the encoder, 70 % for
the CNNs); --auto compiles with --sparsity auto (each layer measured dense and BSR on this
machine) instead of the threshold 0.5. --dense-kernel (as compile's option) says what computes
the layers that stay dense, in both TVM builds: packed (the default: prune2tvm's packed dense
kernel; the dense build is `compile` without --bsr) or tvm (TVM's ops).

Usage: python benchmarks/bsr_models.py [--models bert_base,mobilenet_v2,resnet50] [--repeat N]
       [--tune-trials N] [--skip-tvm-dense] [--fast-math] [--sparsity S] [--auto] [--dense-kernel packed|tvm]
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
    parser.add_argument("--tune-trials", type=int, default=0, help="tune both TVM builds, N trials each")
    parser.add_argument("--skip-tvm-dense", action="store_true", help="do not build or measure TVM dense")
    parser.add_argument("--fast-math", action="store_true", help="TVM's fast erf/exp/tanh/softmax in both TVM builds")
    parser.add_argument("--sparsity", type=float, default=None, help="prune every model at this sparsity")
    parser.add_argument("--auto", action="store_true", help="compile with --sparsity auto instead of 0.5")
    parser.add_argument("--dense-kernel", choices=["packed", "tvm"], default="packed")
    args = parser.parse_args()

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions, dense_options, prepare_module
    from prune2tvm.config import load_target
    from prune2tvm.export import export_onnx
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.compile.tune import TuningDatabase, tune_prepared
    from prune2tvm.models import build_model
    from prune2tvm.onnxrt import session
    from prune2tvm.prune.blocks import prune_blocks_one_shot

    target = load_target(args.target)
    rows = []
    for name in args.models.split(","):
        shape, classes, sparsity, pruned = MODELS[name]
        sparsity = sparsity if args.sparsity is None else args.sparsity
        torch.manual_seed(0)
        model = build_model(name, shape, classes).eval()
        skip = ("classifier",) if name == "bert_base" else ()
        skipped = prune_blocks_one_shot(model, (4, 1), sparsity, skip=skip)
        with tempfile.TemporaryDirectory() as tmp:
            check = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
            onnx_model = export_onnx(model, shape, Path(tmp) / f"{name}.onnx", 17, check)
            shapes = {"input": [1, *shape]}
            sparsify = SparsifyOptions((4, 1), 0.5, auto=args.auto, dense_kernel=args.dense_kernel)
            dense_build = dense_options(args.dense_kernel, target)  # as compile without --bsr
            database = prepared = None

            def prepare(options):
                return prepare_module(onnx_model.path, target, shapes, options, database, args.fast_math)

            if args.tune_trials:
                database = TuningDatabase(Path(__file__).parent / ".tuning-db", target)
                prepared = tune_prepared(prepare(sparsify), lambda: prepare(sparsify), target, database,
                                         args.tune_trials)[0]
            start = time.perf_counter()
            bsr = compile_onnx(onnx_model.path, target, shapes, sparsify=sparsify, database=database, prepared=prepared,
                               fast_math=args.fast_math)
            bsr_build_s = time.perf_counter() - start
            ort = session(onnx_model.path, threads=target.threads)
            feeds = {"input": check}
            calls = {"bsr": bsr.bind(feeds), "ort": lambda: ort.run(None, feeds)}
            if not args.skip_tvm_dense:
                dense = prepare(dense_build)
                if database is not None:
                    dense = tune_prepared(dense, lambda: prepare(dense_build), target, database,
                                          args.tune_trials)[0]
                calls["tvm_dense"] = compile_onnx(onnx_model.path, target, shapes, database=database, prepared=dense,
                                                  fast_math=args.fast_math).bind(feeds)
            stats = measure_interleaved(calls, warmup=2, repeat=args.repeat, rounds=2)
        n_bsr = sum(d["kind"] == "bsr" for d in bsr.info.layers)
        rows.append((name, sparsity, pruned, n_bsr, len(bsr.info.layers), len(skipped), bsr_build_s, stats))
        dense_ms = f", TVM dense {stats['tvm_dense'].median:.2f} ms" if "tvm_dense" in stats else ""
        print(f"{name}: BSR {stats['bsr'].median:.2f} ms{dense_ms}, ORT {stats['ort'].median:.2f} ms", flush=True)

    mode = "--sparsity auto" if args.auto else "--sparsity 0.5"
    print(f"\nTVM BSR: compiled with --bsr 4 {mode} --dense-kernel {args.dense_kernel}; "
          f"TVM dense: --dense-kernel {args.dense_kernel}")
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
