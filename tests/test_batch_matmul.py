"""Products of two activations (attention) on CPUs: prune2tvm's batched matmul kernel against
numpy, the pass that rewrites them, and dlight's schedule for row reductions (softmax)."""

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax

from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions, sparsify_module
from prune2tvm.compile.frontend import import_onnx
from prune2tvm.compile.kernels.batch_matmul import BatchMatmulShape, batch_matmul_cpu, reference, tiling
from prune2tvm.compile.cpu_schedules import cpu_schedules
from prune2tvm.config import load_target
from prune2tvm.onnxrt import session

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.get_global_func("target.llvm_get_system_cpu")()})


@pytest.mark.parametrize("batch, rows, inputs, outputs, left, right, lanes", [
    (4, 64, 64, 64, 4, 4, 16),  # attention's shape: whole tiles
    (3, 7, 5, 20, 3, 1, 16),  # right operand broadcast; rows no tile divides; a last vector of 4 lanes
    (2, 1, 9, 3, 1, 2, 16),  # one row, left broadcast, fewer outputs than a vector
    (5, 33, 17, 80, 5, 5, 8),  # AVX2 vectors; 10 vectors in tiles of 4: the last tile half empty
    (1, 6, 4, 7, 1, 1, 4),  # NEON vectors, one batch
    (2, 13, 1, 48, 2, 2, 16),  # K = 1
])
def test_batch_matmul_kernel_matches_numpy(batch, rows, inputs, outputs, left, right, lanes):
    shape = BatchMatmulShape(batch, rows, inputs, outputs, left, right)
    lib = tvm.compile(tvm.IRModule({"main": batch_matmul_cpu(shape, lanes).with_attr("global_symbol", "main")}), HOST)
    rng = np.random.default_rng(rows * outputs)
    a = rng.standard_normal((left, rows, inputs)).astype(np.float32)
    b = rng.standard_normal((right, inputs, outputs)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((batch, rows, outputs), np.nan, np.float32))  # every element must be written
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_allclose(out.numpy(), reference(a, b), rtol=1e-5, atol=1e-5)


def test_tiles_fill_the_registers_and_divide_the_rows_where_they_can():
    assert tiling(BatchMatmulShape(12, 128, 64, 128, 12, 12), 16) == (4, 4)  # 16 accumulators, 128 = 32 x 4
    assert tiling(BatchMatmulShape(1, 30, 8, 16, 1, 1), 16) == (15, 1)  # one vector: up to 15 rows (stack limit)
    assert tiling(BatchMatmulShape(1, 5, 8, 40, 1, 1), 16) == (5, 3)  # 3 vectors cover 40 outputs in one tile
    assert tiling(BatchMatmulShape(1, 8, 8, 80, 1, 1), 16) == (8, 3)  # 5 vectors: 2 tiles of 3, not of 4


def attention_like(path):
    """Three products of two activations: 4-D heads; a 3-D one with a 2-D right operand
    (broadcast; 7 outputs); and one whose batches broadcast against each other."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, s) for n, s in (
        ("q", [1, 4, 16, 8]), ("kt", [1, 4, 8, 16]), ("e", [3, 5, 8]), ("w", [8, 7]), ("c", [2, 1, 5, 8]),
        ("d", [1, 3, 8, 6]))]
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["e", "w"], ["y"]), helper.make_node("MatMul", ["c", "d"], ["z"])]
    outputs = [helper.make_tensor_value_info(n, f, s) for n, s in (("p", [1, 4, 16, 16]), ("y", [3, 5, 7]),
                                                                    ("z", [2, 3, 5, 6]))]
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def kernels_called(func: relax.Function) -> list[str]:
    names = []
    relax.analysis.post_order_visit(func.body, lambda e: names.append(e.args[0].name_hint) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" else None)
    return names


def test_products_of_activations_run_the_kernel_and_match_onnxruntime(tmp_path):
    path = attention_like(tmp_path / "attention.onnx")
    shapes = {"q": [1, 4, 16, 8], "kt": [1, 4, 8, 16], "e": [3, 5, 8], "w": [8, 7], "c": [2, 1, 5, 8], "d": [1, 3, 8, 6]}
    target = load_target("x86")
    mod = import_onnx(path, shapes)
    rewritten, decisions = sparsify_module(mod, path, target, SparsifyOptions(bsr=False))
    assert sorted(kernels_called(rewritten["main"])) == ["batch_matmul", "batch_matmul1"]
    matmuls = []
    relax.analysis.post_order_visit(rewritten["main"].body, lambda e: matmuls.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.matmul" else None)
    assert len(matmuls) == 1  # c @ d: batches [2, 1] and [1, 3] broadcast into [2, 3]
    reasons = [d.reason for d in decisions]
    assert reasons.count("two activations (e.g. attention): prune2tvm's batched matmul kernel") == 2
    assert ("two activations (e.g. attention): batch dimensions broadcast against each other; left to TVM's op"
            in reasons)
    # TVM's op where told so: the products are left alone
    tvm_only, decisions = sparsify_module(mod, path, target, SparsifyOptions(bsr=False, dense_kernel="tvm"))
    assert kernels_called(tvm_only["main"]) == []
    assert [d.reason for d in decisions] == ["two activations (e.g. attention): TVM's op"] * 3

    compiled = compile_onnx(path, target, shapes, sparsify=SparsifyOptions(bsr=False))
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for got, expected in zip(compiled.run(feeds), session(path).run(None, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_softmax_gets_a_parallel_schedule_on_cpus():
    """TVM's default for an unscheduled softmax is a scalar loop nest on one core."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([64, 256], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(out)
    legalized = relax.transform.LegalizeOps()(bb.get())
    with tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}):
        scheduled = cpu_schedules()(legalized)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) == 1
    (func,) = funcs.values()
    assert func.attrs["tirx.is_scheduled"] and "T.parallel" in func.script()
    assert "T.parallel" not in [f for f in legalized.functions.values() if isinstance(f, tvm.tirx.PrimFunc)][0].script()


def test_elementwise_functions_run_in_parallel_in_whole_vectors():
    """GELU over 128 x 3072 (a BERT-base feed-forward): TVM's default is one scalar loop."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([128, 3072], "float32"))
    small = relax.Var("s", relax.TensorType([8, 8], "float32"))
    with bb.function("main", [x, small]):
        with bb.dataflow():
            gelu = bb.emit(relax.op.multiply(x, relax.op.add(relax.op.erf(x), relax.const(1.0, "float32"))))
            tiny = bb.emit(relax.op.add(small, small))  # too small to be worth a parallel launch
            out = bb.emit_output(relax.Tuple([gelu, tiny]))
        bb.emit_func_output(out)
    with tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}):
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
        scheduled = cpu_schedules()(mod)
    scripts = {gv.name_hint: f.script() for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    (gelu_name,) = [n for n in scripts if "erf" in n]
    assert "T.parallel" in scripts[gelu_name] and "T.vectorized(T.int64(16))" in scripts[gelu_name]
    (add_name,) = [n for n in scripts if "erf" not in n]
    assert "T.parallel" not in scripts[add_name]
    ex = tvm.compile(scheduled, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a = np.random.default_rng(0).standard_normal((128, 3072)).astype(np.float32)
    b = np.ones((8, 8), np.float32)
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b))
    from scipy.special import erf
    np.testing.assert_allclose(got[0].numpy(), a * (erf(a) + 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1].numpy(), 2 * b)
