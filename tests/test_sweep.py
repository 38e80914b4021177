"""`prune2tvm sweep`: the grid, the report (Pareto front, per-layer view, ideal), resuming,
stored results that are unusable, variants a method cannot make, and `report` across runs."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from prune2tvm.cli import cli
from prune2tvm.measure.accuracy import fidelity
from prune2tvm.measure.profile import attribute
from prune2tvm.report import Variant
from prune2tvm.runtime import Model
from prune2tvm.sweep import ideal_latency
from tests.conftest import write_yaml

pytestmark = pytest.mark.slow

SWEEP_PIPELINE = """\
    version: 1
    name: tinysweep
    seed: 1
    model: {name: mlp}
    train: {epochs: 5, batch_size: 64, lr: 0.003}
    prune: {start_epoch: 0, end_epoch: 2, frequency: 1, fine_tune_epochs: 3}
    compile: {bsr: {block: [4, 1], threshold: 0.5}}
    measure: {batch_size: 1, warmup: 2, repeat: 12, rounds: 2}
"""


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def synthetic_pipeline(tmp_path, name: str, model: str, samples: int, rounds: int):
    """A latency study: random inputs of shape [1, 8, 8], 10 classes, random weights pruned one shot."""
    return write_yaml(tmp_path, f"""\
        version: 1
        name: {name}
        data: {{dataset: synthetic, shape: [1, 8, 8], num_classes: 10, samples: {samples}}}
        model: {{name: {model}}}
        train: {{epochs: 0}}
        prune: {{method: oneshot}}
        measure: {{batch_size: 1, warmup: 1, repeat: 4, rounds: {rounds}}}
    """)


def results(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "variants").glob("*/result.json")
            if not p.parent.name.startswith(".")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    pipeline = write_yaml(tmp, SWEEP_PIPELINE, "tinysweep.yaml")
    out = tmp / "out"
    result = run_cli("sweep", pipeline, "--sparsity", "0.5,0.9", "--bsr", "1,4", "-o", out)
    assert result.exit_code == 0, result.output
    return pipeline, out, json.loads((out / "report.json").read_text()), result.output


def test_sweep_measures_every_variant_against_both_dense_baselines(sweep):
    _, out, report, _ = sweep
    names = [v["name"] for v in report["variants"]]
    assert names == ["dense", "agp-50-1x1", "agp-90-1x1", "agp-50-4x1", "agp-90-4x1"]
    assert report["kind"] == "sweep" and report["target"]["name"] == "x86"
    for v in report["variants"]:
        assert v["error"] is None
        assert set(v["latency_ms"]) == {"tvm", "tvm_dense", "onnxruntime"}, v["name"]
        for stats in v["latency_ms"].values():
            assert 0 < stats["median"] <= stats["p90"]
        assert set(v["accuracy"]) == set(v["top5"]) == {"torch", "onnxruntime", "tvm"}  # 10 classes: top-5 too
        assert v["top5"]["tvm"] >= v["accuracy"]["tvm"]
        assert v["size_bytes"]["artifact"] > 0 and v["size_bytes"]["onnx"] > 0
    by = {v["name"]: v for v in report["variants"]}
    assert by["agp-90-1x1"]["params"]["nonzero"] < by["agp-50-1x1"]["params"]["nonzero"] < by["dense"]["params"]["nonzero"]
    assert by["agp-90-4x1"]["macs"]["effective"] < 0.2 * by["agp-90-4x1"]["macs"]["dense"]
    assert by["agp-90-4x1"]["block"] == [4, 1]
    bsr = [layer for layer in by["agp-90-4x1"]["compiled_layers"] if layer["kind"] == "bsr"]
    assert bsr and all(layer["block"] == [4, 1] for layer in bsr)  # compiled with its own block size
    assert all(layer["kind"] == "dense" for layer in by["dense"]["compiled_layers"])


def test_sweep_report_has_the_pareto_front_the_chosen_variants_layers_and_the_ideal(sweep):
    _, out, report, _ = sweep
    from prune2tvm.report import load_report

    loaded = load_report(out)
    front = loaded.pareto()
    assert front
    for v in loaded.variants:  # nothing off the front beats a front variant on both axes
        for f in front:
            if v.name != f.name:
                assert not (v.accuracy["tvm"] >= f.accuracy["tvm"] and v.latency_ms["tvm"]["median"] <
                            f.latency_ms["tvm"]["median"] and v.accuracy["tvm"] > f.accuracy["tvm"])
    chosen = loaded.chosen()
    md = (out / "report.md").read_text()
    assert f"## Where the time goes: {chosen.name}" in md and "Pareto front" in md
    assert chosen.profile and len(chosen.profile["layers"]) == len(chosen.compiled_layers)
    timed = [layer for layer in chosen.profile["layers"] if layer["ms"] is not None]
    assert len(timed) == len(chosen.compiled_layers)  # every weight layer's kernel found
    assert 0 < sum(layer["share"] for layer in timed) <= 1.0
    for v in loaded.variants:
        assert v.ideal_ms is not None and v.ideal_ms > 0
    left = {v.name: v.ideal_ms / v.latency_ms["onnxruntime"]["median"] for v in loaded.variants}  # noise-free
    assert left["agp-90-1x1"] < left["agp-50-1x1"] < left["dense"] == pytest.approx(1.0)
    png = (out / "accuracy_vs_latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_are_the_ones_the_artifacts_reproduce(sweep):
    _, out, report, _ = sweep
    x = np.load(out / "data/test_x.npy")
    y = np.load(out / "data/test_y.npy")
    dense_logits = None
    for v in report["variants"][::2]:
        model = Model(out / v["files"]["tvm"])
        try:
            logits = model({model.inputs[0]["name"]: x})[model.outputs[0]]
        finally:
            model.close()
        dense_logits = logits if dense_logits is None else dense_logits  # the dense variant comes first
        assert float((logits.argmax(1) == y).mean()) == pytest.approx(v["accuracy"]["tvm"], abs=1e-9), v["name"]
        # fidelity is against the dense model's logits (torch's; its TVM build's agree to 1e-5)
        assert fidelity(logits, dense_logits) == pytest.approx(v["fidelity"], abs=1e-4), v["name"]
        manifest = json.loads((out / v["files"]["tvm"] / "manifest.json").read_text())
        assert manifest["measured"]["latency_ms"]["median"] == pytest.approx(v["latency_ms"]["tvm"]["median"])


def test_a_rerun_with_one_more_level_computes_only_the_new_variants(sweep):
    pipeline, out, _, _ = sweep
    before = results(out)
    result = run_cli("sweep", pipeline, "--sparsity", "0.5,0.7,0.9", "--bsr", "1,4", "-o", out)
    assert result.exit_code == 0, result.output
    after = results(out)
    assert {k: after[k] for k in before} == before  # untouched
    assert set(after) - set(before) == {"agp-70-1x1", "agp-70-4x1"}
    assert "dense model: reused" in result.output and "[train]" not in result.output
    names = [v["name"] for v in json.loads((out / "report.json").read_text())["variants"]]
    assert names == ["dense", "agp-50-1x1", "agp-70-1x1", "agp-90-1x1", "agp-50-4x1", "agp-70-4x1", "agp-90-4x1"]


def test_a_corrupt_stored_result_is_reported_and_recomputed(sweep):
    pipeline, out, _, _ = sweep
    (out / "variants/agp-50-4x1/result.json").write_text('{"key": "x", "variant": ')
    library = out / "variants/agp-90-1x1/tvm/model.so"  # replaced, not written in place: this process maps it
    (library.parent / "tampered").write_bytes(b"tampered")
    os.replace(library.parent / "tampered", library)
    before = results(out)
    result = run_cli("sweep", pipeline, "--sparsity", "0.5,0.9", "--bsr", "1,4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "agp-50-4x1: stored result unusable (result.json is not valid JSON); recomputing" in result.output
    assert "agp-90-1x1: stored result unusable" in result.output and "sha256" in result.output
    after = results(out)
    assert {k for k in before if after[k] != before[k]} == {"agp-50-4x1", "agp-90-1x1"}
    Model(out / "variants/agp-90-1x1/tvm").close()  # sound again


def test_another_configuration_in_the_same_directory_is_refused(sweep, tmp_path):
    pipeline, out, _, _ = sweep
    changed = write_yaml(tmp_path, SWEEP_PIPELINE.replace("epochs: 5", "epochs: 4"), "changed.yaml")
    before = results(out)
    result = run_cli("sweep", changed, "--sparsity", "0.5", "--bsr", "1", "-o", out)
    assert result.exit_code == 2
    assert "another configuration (changed: config.train.epochs)" in result.output and "--force" in result.output
    assert results(out) == before


def test_report_puts_runs_side_by_side(sweep, tmp_path):
    _, out, _, _ = sweep
    result = run_cli("report", out, out, "-o", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "cmp/comparison.md").read_text()
    assert md.count("x86 (") == 2 and "| agp-90-4x1 |" in md
    assert (tmp_path / "cmp/comparison.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli("report", out, out, "-o", tmp_path / "cmp")
    assert again.exit_code == 2 and "--force" in again.output


def test_variants_a_method_cannot_make_are_reported_and_the_sweep_goes_on(tmp_path):
    """1xN needs blocks of 2 to 32 rows: --bsr 1 cannot be made, --bsr 4 can. Synthetic data
    and one-shot pruning: random weights, no training."""
    pipeline = synthetic_pipeline(tmp_path, "synth", "cnn", samples=40, rounds=2)
    out = tmp_path / "out"
    result = run_cli("sweep", pipeline, "--sparsity", "0.6", "--bsr", "1,4", "--method", "1xN", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    by = {v["name"]: v for v in report["variants"]}
    assert "1xN-60-1x1: method 1xN cannot make 1x1 blocks" in result.output
    assert "not a 1xN block" in by["1xN-60-1x1"]["error"]
    assert by["1xN-60-4x1"]["error"] is None and by["1xN-60-4x1"]["latency_ms"]["tvm"]["median"] > 0
    assert by["dense"]["accuracy"]["torch"] == 1.0  # synthetic labels are the dense model's own classes
    # a latency study: variants are ranked by how close their logits stay to the dense model's
    assert by["dense"]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= by["1xN-60-4x1"]["fidelity"] < 0.9999 and by["1xN-60-1x1"]["fidelity"] is None
    md = (out / "report.md").read_text()
    assert "could not be made" in md and "agreement with the dense model" in md
    assert "the Pareto front ranks variants by it" in md and "both fidelity and TVM latency" in md

    oneshot = run_cli("sweep", pipeline, "--sparsity", "0.6", "--bsr", "4", "-o", tmp_path / "one")
    assert oneshot.exit_code == 0, oneshot.output
    v = json.loads((tmp_path / "one/report.json").read_text())["variants"][1]
    assert v["name"] == "oneshot-60-4x1" and v["sparsity"] == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.5,1.5"], "--sparsity: 1.5 is out of range"),
    (["--sparsity", "0.5,half"], "--sparsity: '0.5,half' is not a comma-separated list"),
    (["--sparsity", "0.5", "--bsr", "4,0"], "--bsr: 0 is not a block size"),
    (["--sparsity", "0.5,0.5"], "repeats a value"),
    (["--sparsity", "0.5", "--max-accuracy-drop", "2"], "--max-accuracy-drop: 2.0 is out of range"),
    (["--sparsity", "0.5", "--tune-trials", "-1"], "--tune-trials: -1 is out of range"),
    (["--sparsity", "0.5", "--tune-trials", "8", "--no-db"], "--tune-trials needs a tuning database"),
])
def test_bad_sweep_options_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("sweep", "pipelines/digits.yaml", *args, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_kernel_calls_are_attributed_to_layers_in_graph_order():
    layers = [{"name": "c1", "weight_shape": [8, 3, 3, 3]}, {"name": "c2", "weight_shape": [16, 8, 3, 3]},
              {"name": "fc", "weight_shape": [10, 64]}]
    calls = [("pad_flat", [(1, 3, 10, 10)]), ("bsr_conv2d", [(1, 3, 100)]), ("max_pool2d", [(1, 8, 8, 8)]),
             ("fused_conv2d_add_relu", [(1, 8, 4, 4), (16, 8, 3, 3), (16,)]), ("vm.builtin.reshape", [(1, 64)]),
             ("matmul", [(1, 64), (64, 10)])]
    owner = attribute(calls, layers)
    assert owner == [0, 0, None, 1, None, 2]
    assert attribute([("matmul", [(1, 64), (64, 64)])], layers[2:]) == [None]  # an activation product: no layer
    # prune2tvm's kernel for one is the table's entry of that product, not the next layer that fits its shapes
    product = {"name": "dense1", "weight_shape": [1, 4, 10, 64], "reason": "two activations (e.g. attention): ..."}
    assert attribute([("batch_matmul", [(4, 10, 64), (4, 64, 64), (4, 10, 64)]), ("bsr_matmul", [(10, 64)])],
                     [product, {"name": "fc", "weight_shape": [64, 64]}]) == [0, 1]
    assert attribute([("batch_matmul", [(1, 64), (64, 10), (1, 10)])], layers[2:]) == [None]
    # a fused 1x1 conv + depthwise conv kernel computes two layers: the next call is the third's
    assert attribute([("expand_depthwise", [(1, 300)]), ("bsr_matmul", [(1, 64)])], layers) == [0, 2]


def test_fidelity_is_the_mean_cosine_similarity_of_the_logits():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert fidelity(a, a) == pytest.approx(1.0)
    assert fidelity(a, 3 * a) == pytest.approx(1.0)  # scale does not matter
    assert fidelity(a, -a) == pytest.approx(-1 / 3)  # two rows opposite, the all-zero rows the same
    assert fidelity(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])) == pytest.approx(np.sqrt(0.5))
    assert fidelity(np.array([[0.0, 0.0]]), np.array([[1.0, 1.0]])) == 0.0


def test_a_latency_study_ranks_variants_by_fidelity_where_agreement_cannot_tell_them_apart():
    from prune2tvm.report import Report

    def variant(name, ms, same):
        return Variant(name=name, method="oneshot", target_sparsity=0.5, sparsity=0.5, accuracy={"tvm": 1.0},
                       agreement={}, latency_ms={"tvm": {"median": ms}}, fidelity=same)

    variants = [variant("dense", 3.0, 1.0), variant("a", 2.0, 0.95), variant("b", 1.0, 0.60), variant("c", 1.5, 0.5)]
    study = Report("zoo", {"name": "x86"}, "0.27", 1, variants, kind="sweep",
                   quality="top-1 agreement with the dense model on synthetic inputs")
    assert [v.name for v in study.pareto()] == ["b", "a", "dense"]  # c: slower than b and less faithful
    real = Report("zoo", {"name": "x86"}, "0.27", 1, variants, kind="sweep")  # test accuracy: all 100 %
    assert [v.name for v in real.pareto()] == ["b"]
    variants[1].fidelity = None  # a variant stored before fidelity was measured: agreement for all
    assert not study.by_fidelity and [v.name for v in study.pareto()] == ["b"]


def test_ideal_latency_scales_each_layer_share_by_what_pruning_left():
    def variant(name, densities, ort_ms):
        layers = [{"name": n, "weight_shape": [4, 4], "density": d} for n, d in zip(("a", "b"), densities)]
        return Variant(name=name, method="agp", target_sparsity=0, sparsity=0, accuracy={"tvm": 1.0}, agreement={},
                       latency_ms={"tvm": {"median": 1.0}, "onnxruntime": {"median": ort_ms}}, compiled_layers=layers)

    dense = variant("dense", [1.0, 1.0], 10.0)
    dense.reference_profile = {"total_ms": 5.0, "layers": {"a": 2.0, "b": 1.0}}  # 40 % and 20 %; 40 % other
    half = variant("v", [0.5, 0.0], 12.0)  # measured beside its own baseline: 12 ms
    assert ideal_latency(half, dense) == pytest.approx(12.0 * (1 - 0.4 * 0.5 - 0.2 * 1.0))
    assert ideal_latency(dense, dense) == pytest.approx(10.0)


def test_tune_trials_tunes_what_stays_dense_once_and_the_report_says_so(tmp_path):
    """--tune-trials: the dense variant's tasks are tuned into the database before it is built
    (its hidden layers run the packed dense kernel, which needs none; its 10-class output
    layer, which no panel height divides, is TVM's op); the 90 % 4x1 variant tunes only what
    the dense variant did not have; a re-run reuses everything."""
    pipeline = synthetic_pipeline(tmp_path, "synthtune", "mlp", samples=30, rounds=1)
    out, db = tmp_path / "out", tmp_path / "db"
    args = ("sweep", pipeline, "--sparsity", "0.9", "--bsr", "4", "--tune-trials", "8", "--db", db, "-o", out)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    tunings = result.output.split("[tune] ")[1:]
    assert [t.split(":")[0] for t in tunings[::2]] == ["dense", "oneshot-90-4x1"]
    assert "tuning 2 task(s)" in tunings[0] and "2 task(s) need none" in tunings[0]
    assert "tuning 1 task(s)" in tunings[2]
    assert "3 task(s) need none" in tunings[2]  # the dense variant's, already in the database
    records = [json.loads(line) for line in (db / "records.json").read_text().splitlines() if line.strip()]
    assert records  # the dense model's kernels measured into the database
    # then the parameter search of its packed dense kernels (2), and of the variant's BSR kernels (2)
    assert [t.count("searching 2 BSR kernel(s)") for t in tunings[:3:2]] == [1, 1]
    assert len(json.loads((db / "bsr.json").read_text())) == 4
    md = (out / "report.md").read_text()
    assert f"tuning records in {db}, each variant's new tasks tuned first with a budget of 8 trials" in md
    before = results(out)
    again = run_cli(*args)
    assert again.exit_code == 0 and "[tune]" not in again.output and results(out) == before
