"""BSR linear layers through the whole compile path vs onnxruntime dense, side by side.

Each case is an ONNX MatMul with a block-sparse [K, N] weight, compiled with
`compile_onnx(..., sparsify=SparsifyOptions(block, 0))` (import -> BSR rewrite -> build ->
check against onnxruntime), then timed against onnxruntime on the same ONNX in alternating
rounds in one process. `ideal` is the FLOP-proportional 1 / (1 - sparsity).

Usage: python benchmarks/bsr_layers.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

LAYERS = [(768, 3072), (3072, 768)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 90 %% sparsity, 1x1, 4x1 and 16x1 blocks")
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--target", default="x86")
    args = parser.parse_args()
    sparsities = [0.9] if args.quick else SPARSITIES
    blocks = [(1, 1), (4, 1), (16, 1)] if args.quick else BLOCKS

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions
    from prune2tvm.config import load_target
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import session

    target = load_target(args.target)
    print("| layer | rows | block | sparsity | BSR ms | ORT dense ms | speed-up | ideal | of ideal |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in LAYERS:
            for rows in ROWS:
                for block in blocks:
                    for sparsity in sparsities:
                        path = Path(tmp) / "layer.onnx"
                        matmul_onnx(path, rows, k, n, block, sparsity, seed=len(str(block)) + int(100 * sparsity))
                        compiled = compile_onnx(path, target, {"input": [rows, k]},
                                                sparsify=SparsifyOptions(block, 0.0))
                        ort = session(path, threads=target.threads)
                        feeds = {"input": np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)}
                        stats = measure_interleaved({"bsr": compiled.bind(feeds), "ort": lambda: ort.run(None, feeds)},
                                                    warmup=10, repeat=args.repeat, rounds=3)
                        speedup = stats["ort"].median / stats["bsr"].median
                        ideal = 1.0 / (1.0 - sparsity)
                        print(f"| Linear {k}->{n} | {rows} | {block[0]}x{block[1]} | {sparsity:.2f} | "
                              f"{stats['bsr'].median:.3f} | {stats['ort'].median:.3f} | {speedup:.2f}x | "
                              f"{ideal:.1f}x | {100 * speedup / ideal:.0f} % |", flush=True)


if __name__ == "__main__":
    main()
