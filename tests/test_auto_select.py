"""--sparsity auto: every layer kept as BSR measured faster than dense, and the rest dense."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune2tvm.cli import cli
from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions
from prune2tvm.config import load_pipeline, load_target
from prune2tvm.errors import ConfigError, UnsupportedError
from prune2tvm.onnxrt import session
from prune2tvm.pipeline import compile_options
from conftest import write_yaml


@pytest.fixture(scope="module")
def layered_onnx(tmp_path_factory):
    """A large 90 % block-sparse layer (BSR should win), a tiny one (dense should win), and a
    dense one (not worth measuring)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8), nn.ReLU(), nn.Linear(8, 16)).eval()
    with torch.no_grad():
        big = model[0].weight
        big.mul_((torch.rand(1024 // 4, 512) >= 0.9).repeat_interleave(4, 0))
        model[2].weight.mul_((torch.rand(2, 1024) >= 0.5).repeat_interleave(4, 0))
    path = tmp_path_factory.mktemp("auto") / "layers.onnx"
    torch.onnx.export(model, torch.randn(1, 512), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return path


def test_auto_keeps_only_layers_that_measure_faster_as_bsr(layered_onnx):
    compiled = compile_onnx(layered_onnx, load_target("x86"), {"input": [1, 512]},
                            sparsify=SparsifyOptions((4, 1), auto=True))
    assert compiled.info.verified
    layers = compiled.info.layers
    assert len(layers) == 3
    for layer in layers:
        if layer["dense_ms"] is None:
            assert layer["kind"] == "dense" and "not worth measuring" in layer["reason"]
            continue
        assert layer["reason"].startswith("auto: ")
        if layer["kind"] == "bsr":
            assert layer["bsr_ms"] < layer["dense_ms"]
        else:
            assert layer["dense_ms"] <= layer["bsr_ms"]
    assert layers[0]["kind"] == "bsr"  # 90 % of 4x1 blocks zero in a 1024x512 layer: BSR wins
    assert layers[2]["kind"] == "dense" and "not worth measuring" in layers[2]["reason"]
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], session(layered_onnx).run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_layers_of_one_shape_share_one_dense_measurement(tmp_path, monkeypatch):
    """A transformer's 12 blocks have 4 layer shapes: the dense form of each shape is measured
    once (its time does not depend on the weights' values); BSR, which does, per layer."""
    from prune2tvm.compile.auto_select import LayerTimer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 512)).eval()
    with torch.no_grad():
        for layer in model[::2]:
            out, inp = layer.weight.shape
            layer.weight.mul_((torch.rand(out // 4, inp) >= 0.6).repeat_interleave(4, 0))
    path = tmp_path / "same.onnx"
    torch.onnx.export(model, torch.randn(1, 256), str(path), dynamo=False, opset_version=17, input_names=["input"])
    timed = []
    original = LayerTimer._time
    monkeypatch.setattr(LayerTimer, "_time", lambda self, mod, x, db=None: timed.append(mod) or original(self, mod, x, db))
    layers = compile_onnx(path, load_target("x86"), {"input": [1, 256]},
                          sparsify=SparsifyOptions((4, 1), auto=True)).info.layers
    assert len(timed) == 3 + 2  # BSR for each layer, dense for each of the two shapes
    assert layers[0]["dense_ms"] == layers[1]["dense_ms"] != layers[2]["dense_ms"]
    assert len({layer["bsr_ms"] for layer in layers}) == 3


def test_auto_needs_a_target_that_runs_here(layered_onnx):
    with pytest.raises(UnsupportedError, match="--sparsity auto measures layers on the target, and cuda cannot run here"):
        compile_onnx(layered_onnx, load_target("cuda"), {"input": [1, 512]}, sparsify=SparsifyOptions((4, 1), auto=True))


def test_auto_from_the_cli_and_from_pipeline_files(layered_onnx, tmp_path):
    result = CliRunner().invoke(cli, ["compile", str(layered_onnx), "--bsr", "4", "--sparsity", "auto",
                                      "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "auto: BSR" in result.output
    cfg = load_pipeline(write_yaml(tmp_path, "name: x\ncompile: {bsr: {block: [4, 1], threshold: auto}}\n"))
    assert cfg.compile.bsr.threshold == "auto"
    with pytest.raises(ConfigError, match="compile.bsr.threshold: 'fast' is not valid"):
        load_pipeline(write_yaml(tmp_path, "name: x\ncompile: {bsr: {threshold: fast}}\n", "bad.yaml"))
    x86, cuda = load_target("x86"), load_target("cuda")
    assert cfg.compile.dense_kernel == "packed"  # the default, as compile's --dense-kernel
    assert compile_options(cfg.compile, x86).dense_kernel == "packed"
    cfg = load_pipeline(write_yaml(tmp_path, "name: x\ncompile: {bsr: {block: [4, 1]}, dense_kernel: tvm}\n", "tvm.yaml"))
    assert compile_options(cfg.compile, x86).dense_kernel == "tvm"
    # without bsr: a dense build, packed on CPUs; TVM's ops only when told, and on GPUs
    dense = load_pipeline(write_yaml(tmp_path, "name: x\n", "dense.yaml"))
    assert compile_options(dense.compile, x86) == SparsifyOptions(bsr=False)
    assert compile_options(dense.compile, cuda) is None
    dense = load_pipeline(write_yaml(tmp_path, "name: x\ncompile: {dense_kernel: tvm}\n", "dense-tvm.yaml"))
    assert compile_options(dense.compile, x86) is None
    with pytest.raises(ConfigError, match="compile.dense_kernel: 'fast' is not valid; valid choices: packed, tvm"):
        load_pipeline(write_yaml(tmp_path, "name: x\ncompile: {dense_kernel: fast}\n", "bad2.yaml"))


def test_tune_with_auto_tunes_the_dense_layers_it_compares_with(layered_onnx, tmp_path):
    """With --dense-kernel tvm, against TVM's untuned dense (50-100x slower than tuned on CPU)
    nearly every layer picks BSR; `tune --sparsity auto` tunes each measured layer's dense form
    too, decides again against the tuned times, and the compiled model's table says which it
    compared with."""
    import json

    db = tmp_path / "db"
    # three tasks (the dense output layer, the two measured layers' dense forms), a round of 8 each
    result = CliRunner().invoke(cli, ["tune", str(layered_onnx), "--bsr", "4", "--sparsity", "auto", "--dense-kernel", "tvm",
                                      "--trials", "24",
                                      "--db", str(db), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  auto 0.weight:")]
    assert lines[0].startswith("  auto 0.weight: untuned dense") and lines[-1].startswith("  auto 0.weight: tuned dense")
    tuned = [r for r in result.output.splitlines() if r.startswith("| matmul |")]
    assert tuned, "the dense layers measured by auto were not tuning tasks"
    layers = json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"]
    measured = [layer for layer in layers if layer["dense_ms"] is not None]
    assert measured and all("tuned dense" in layer["reason"] and "untuned" not in layer["reason"] for layer in measured)
    for layer in measured:
        assert (layer["kind"] == "bsr") == (layer["bsr_ms"] < layer["dense_ms"])
