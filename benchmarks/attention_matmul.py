"""Products of two activations (attention's Q @ K.T and softmax @ V) vs onnxruntime, side by side.

Each case is an ONNX MatMul of two inputs, compiled with `compile_onnx` (import -> rewrite ->
build -> check against onnxruntime) twice: as `prune2tvm compile` builds it on a CPU (the
packed default: prune2tvm's batched matmul kernel) and with TVM's own op, untuned (what an
untuned build ran before the kernel, and what `--dense-kernel tvm` runs), then timed
against onnxruntime on the same inputs in alternating rounds in one process.

Usage: python benchmarks/attention_matmul.py [--repeat N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, save

# (label, left shape, right shape)
CASES = [
    ("BERT-base Q @ K.T, 128 tokens", [1, 12, 128, 64], [1, 12, 64, 128]),
    ("BERT-base P @ V, 128 tokens", [1, 12, 128, 128], [1, 12, 128, 64]),
    ("4 heads of 64, 64 tokens: Q @ K.T", [1, 4, 64, 64], [1, 4, 64, 64]),
    ("BERT-base Q @ K.T, one token against 128", [1, 12, 1, 64], [1, 12, 64, 128]),
]


def matmul_onnx(path: Path, left: list[int], right: list[int]) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["output"])], "activation_matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, left),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, right)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [*left[:-1], right[-1]])])
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import SparsifyOptions
    from prune2tvm.config import load_target
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import session

    target = load_target("x86")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, left, right in CASES:
            path = Path(tmp) / "matmul.onnx"
            matmul_onnx(path, left, right)
            shapes = {"a": left, "b": right}
            kernel = compile_onnx(path, target, shapes, sparsify=SparsifyOptions(bsr=False))
            tvm_op = compile_onnx(path, target, shapes, sparsify=None)
            rng = np.random.default_rng(0)
            feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            ort = session(path)
            stats = measure_interleaved({"kernel": kernel.bind(feeds), "tvm": tvm_op.bind(feeds),
                                         "ort": lambda: ort.run(None, feeds)}, warmup=10, repeat=args.repeat, rounds=4)
            flops = 2 * np.prod(left) * right[-1]
            k, t, o = (stats[name].median for name in ("kernel", "tvm", "ort"))
            rows.append(f"| {label} | {'x'.join(map(str, left))} @ {'x'.join(map(str, right))} | {k:.4f} | "
                        f"{flops / k / 1e6:.0f} | {t:.4f} | {o:.4f} | {o / k:.2f}x | {t / k:.1f}x |")
            print(rows[-1], flush=True)
    print()
    print("| product | shapes | kernel ms | kernel GFLOP/s | TVM op (untuned) ms | ORT ms | kernel vs ORT "
          "| kernel vs TVM op |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
