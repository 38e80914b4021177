"""Models as users export them, not only float32 images: token ids and masks (int64), float16,
shape computations of exports with dynamic axes, and weight layers the BSR rewrite cannot take,
each still compiled, checked and reported."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prune2tvm.cli import cli
from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions
from prune2tvm.config import load_target
from prune2tvm.onnxrt import session

VOCAB = 50


class Tagger(nn.Module):
    """Token ids through an embedding, masked by an int64 attention mask, then two linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 5)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1).to(torch.float32)
        return self.out(torch.relu(self.fc(h)))


@pytest.fixture(scope="module")
def tagger_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = Tagger().eval()
    with torch.no_grad():  # 4x1 blocks, 80 % of them zero
        keep = torch.rand(16, 32, generator=torch.Generator().manual_seed(1)) >= 0.8
        model.fc.weight.mul_(keep.repeat_interleave(4, 0))
    path = tmp_path_factory.mktemp("tagger") / "tagger.onnx"
    ids = torch.randint(0, VOCAB, (1, 12))
    torch.onnx.export(model, (ids, torch.ones(1, 12, dtype=torch.int64)), str(path), dynamo=False,
                      opset_version=17, input_names=["ids", "mask"], output_names=["tags"])
    return path


def run_runtime(directory, feeds: dict, tmp_path, name: str):
    from prune2tvm.runtime import main

    inputs, outputs = tmp_path / f"{name}.in.npz", tmp_path / f"{name}.out.npz"
    np.savez(inputs, **feeds)
    return main([str(directory), "--inputs", str(inputs), "--outputs", str(outputs)]), outputs


def test_token_ids_and_masks_compile_verify_and_bench(tagger_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", str(tagger_onnx), "--bsr", "4", "--sparsity", "0.5", "-o", str(out)])
    # the check against onnxruntime used to feed float32 noise to int64 inputs: an internal error
    assert result.exit_code == 0, result.output
    assert "verified against onnxruntime" in result.output
    assert "| BSR |" in result.output
    inputs = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["inputs"]}
    assert (inputs["ids"]["dtype"], inputs["ids"]["index_bound"]) == ("int64", VOCAB)
    assert inputs["mask"]["dtype"] == "int64" and "index_bound" not in inputs["mask"]
    bench = runner.invoke(cli, ["bench", str(out), "--onnx", str(tagger_onnx), "--repeat", "5", "--warmup", "1"])
    assert bench.exit_code == 0, bench.output
    assert "speed-up" in bench.output

    # every valid id, negative ones too (ONNX Gather counts them from the end), as onnxruntime
    ids = np.array([[0, 1, VOCAB - 1, -1, -VOCAB, 7, 8, 9, 10, 11, 12, 13]], np.int64)
    feeds = {"ids": ids, "mask": np.array([[1] * 9 + [0] * 3], np.int64)}
    code, written = run_runtime(out, feeds, tmp_path, "good")
    assert code == 0
    np.testing.assert_allclose(np.load(written)["tags"], session(tagger_onnx).run(None, feeds)[0], rtol=1e-4, atol=1e-5)

    # an id past the vocabulary read outside the table (garbage, or a segfault); now refused
    capsys.readouterr()
    for bad in (VOCAB, -VOCAB - 1, 10**9):
        feeds["ids"][0, 3] = bad
        code, written = run_runtime(out, feeds, tmp_path, f"bad{bad}")
        err = capsys.readouterr().err.strip()
        assert code == 2 and not written.exists()
        assert err == (f"error: input 'ids' holds index {bad}, outside the {VOCAB} rows of the table it indexes; "
                       f"valid: {-VOCAB} to {VOCAB - 1}")


def test_an_index_computed_in_the_model_never_reads_outside_its_table(tmp_path):
    """Indices the runtime cannot check (computed from an input) come out as NaN rows when they
    are out of range, where TVM's fast gather read any memory."""
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "one"], ["shifted"]), helper.make_node("Gather", ["table", "shifted"], ["rows"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(1, np.int64), "one")])
    path = tmp_path / "shifted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = compile_onnx(path, load_target("x86"), {"ids": [3]})
    assert compiled.info.verified
    rows = compiled.run({"ids": np.array([0, 8, -2], np.int64)})[0]
    np.testing.assert_array_equal(rows, table[[1, 9, 9]])
    rows = compiled.run({"ids": np.array([9, 2, 11], np.int64)})[0]  # (a far index crashed the process)
    assert np.isnan(rows[[0, 2]]).all()
    np.testing.assert_array_equal(rows[1], table[3])


def test_a_float16_model_is_verified_with_a_float16_tolerance(tmp_path):
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 64])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "--bsr", "4", "--sparsity", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "| w | dense | 64x32 | 4x1 | - | DENSE | dtype float16 (BSR kernels are float32) |" in result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "float16" and manifest["verified"]
    assert 0 < manifest["checks"][0]["max_abs_diff"] <= manifest["checks"][0]["tolerance"]


def test_weight_layers_the_rewrite_cannot_take_are_in_the_table_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    make = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1]),  # [1, 8, 10]
         helper.make_node("MatMul", ["c", "w3"], ["m"]),  # a weight of rank 3: [1, 8, 10] @ [1, 10, 6]
         helper.make_node("Reshape", ["m", "flat"], ["r"]),  # [8, 6]
         helper.make_node("MatMul", ["left", "r"], ["y"])],  # the constant on the left: [12, 8] @ [8, 6]
        "g", [make("x", TensorProto.FLOAT, [1, 4, 10])], [make("y", TensorProto.FLOAT, [12, 6])],
        [numpy_helper.from_array(rng.standard_normal((8, 4, 3)).astype(np.float32), "k"),
         numpy_helper.from_array(rng.standard_normal((1, 10, 6)).astype(np.float32), "w3"),
         numpy_helper.from_array(np.array([8, 6], np.int64), "flat"),
         numpy_helper.from_array(rng.standard_normal((12, 8)).astype(np.float32), "left")])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = compile_onnx(path, load_target("x86"), {"x": [1, 4, 10]}, sparsify=SparsifyOptions((4, 1), 0.5))
    assert compiled.info.verified
    reasons = {(d["op"], tuple(d["weight_shape"])): d["reason"] for d in compiled.info.layers}
    assert reasons == {
        ("conv1d", (8, 4, 3)): "1-D conv: only 2-D convs are rewritten; left dense",
        ("dense", (1, 10, 6)): "weight of rank 3; only 2-D weights (x @ W, x @ W.T) are rewritten; left dense",
        ("dense", (12, 6)): "the constant is the left operand (W @ x); only x @ W is rewritten; left dense",
    }


class Positions(nn.Module):
    """Position ids as transformers make them, ``arange(seq).expand(batch, seq)``: exported with
    dynamic axes, a Shape -> Gather -> Range -> Expand chain that TVM's importer fails on."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 32)
        self.positions = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 64)

    def forward(self, ids):
        batch, seq = ids.shape
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        return self.fc(self.tokens(ids) + self.positions(positions))


def test_shape_computations_the_importer_fails_on_are_folded_for_static_shapes(tmp_path):
    torch.manual_seed(0)
    model = Positions().eval()
    with torch.no_grad():
        model.fc.weight.mul_((torch.rand(16, 32) >= 0.8).repeat_interleave(4, 0))
    path = tmp_path / "positions.onnx"
    torch.onnx.export(model, (torch.randint(0, VOCAB, (2, 12)),), str(path), dynamo=False, opset_version=17,
                      input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    result = CliRunner().invoke(cli, ["compile", str(path), "--bsr", "4", "--sparsity", "0.5", "--input-shape", "ids=1,16",
                                      "-o", str(tmp_path / "out")])
    # before: "TVM cannot import the model: Cannot use and / or / not operator to Expr"
    assert result.exit_code == 0, result.output
    assert "TVM's importer failed on the model as it is (Expand: " in result.output
    assert "shape computation(s) folded into constants" in result.output
    assert "verified against onnxruntime" in result.output
    assert "| dense | 64x32 | 4x1 | 80.1 | BSR |" in result.output


def test_an_import_that_folding_cannot_help_names_the_op_it_failed_on(tmp_path):
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["values", "indices"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 3])])
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {path}: TVM cannot import the model: TopK: TopK k must be a constant"
    assert not (tmp_path / "out").exists()


def test_folding_evaluates_shape_chains_and_leaves_weights_and_inputs_alone(tmp_path):
    from prune2tvm.compile.shape_folding import fold_shapes

    w = np.random.default_rng(0).standard_normal((16, 300)).astype(np.float32)  # 4800 elements: a weight
    nodes = [helper.make_node("Shape", ["x"], ["last"], start=-1),  # [16]
             helper.make_node("ConstantOfShape", ["last"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("Add", ["x", "ones"], ["shifted"]),  # depends on the input: kept
             helper.make_node("MatMul", ["shifted", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 300])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, count = fold_shapes(model, {"x": [3, 16]})
    assert count == 2
    assert [n.op_type for n in folded.graph.node] == ["Add", "MatMul"]
    assert {i.name for i in folded.graph.initializer} == {"w", "ones"}
    assert [d.dim_value for d in folded.graph.input[0].type.tensor_type.shape.dim] == [3, 16]
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", ""]  # a copy
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(folded, tmp_path / "b.onnx")
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(session(tmp_path / "b.onnx").run(None, {"x": x})[0],
                               session(tmp_path / "a.onnx").run(None, {"x": x})[0], rtol=1e-6)


def test_random_check_inputs_are_valid_for_what_each_integer_input_is():
    from prune2tvm.onnxrt import random_input

    rng = np.random.default_rng(0)
    ids = random_input(rng, (4000,), "int64", index_bound=30)
    assert ids.dtype == np.int64 and ids.min() == 0 and ids.max() == 29
    mask = random_input(rng, (4000,), "int32")
    assert mask.dtype == np.int32 and set(np.unique(mask)) == {0, 1}
    image = random_input(rng, (4000,), "uint8")
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert random_input(rng, (100,), "bool").dtype == np.bool_
    assert random_input(rng, (3, 2), "float16").dtype == np.float16
