"""End to end: `prune2tvm run` on the embedded digits, and what its report promises."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prune2tvm.cli import cli
from prune2tvm.compile import load_compiled
from prune2tvm.data import load_dataset
from prune2tvm.onnxrt import session

pytestmark = pytest.mark.slow


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    result = run_cli("run", "pipelines/digits.yaml", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


def test_digits_run_writes_the_three_report_files(digits_run):
    out, report = digits_run
    for name in ("report.md", "report.json", "accuracy_vs_latency.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "accuracy_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial directories
    assert report["pipeline"] == "digits" and report["target"]["name"] == "x86"
    assert report["tvm_version"] == "0.27.0.post1" and report["batch_size"] == 1
    assert [v["name"] for v in report["variants"]] == ["dense", "agp-50", "agp-80"]
    md = (out / "report.md").read_text()
    for v in report["variants"]:
        assert f"| {v['name']} |" in md


def test_digits_accuracy_sparsity_and_agreement(digits_run):
    _, report = digits_run
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["dense"]["accuracy"]["torch"] >= 0.95
    assert by_name["agp-80"]["accuracy"]["torch"] >= 0.93
    for v in report["variants"]:
        assert v["sparsity"] == pytest.approx(v["target_sparsity"], abs=1e-3)
        for backend in ("onnxruntime", "tvm"):
            assert v["agreement"][backend] >= 0.995, (v["name"], backend)
            stats = v["latency_ms"][backend]
            assert 0 < stats["median"] <= stats["p90"]
        assert set(v["accuracy"]) == {"torch", "onnxruntime", "tvm"}


def test_reported_accuracies_are_reproduced_by_the_saved_files(digits_run):
    out, report = digits_run
    test = load_dataset("digits", [0.6, 0.2, 0.2], seed=0).test
    variant = report["variants"][-1]
    files = {k: out / p for k, p in variant["files"].items()}

    state = torch.load(files["checkpoint"], weights_only=True)
    weights = [t for k, t in state.items() if k.endswith("weight") and t.dim() >= 2]
    assert sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights) == pytest.approx(0.8, abs=1e-3)

    ort_pred = session(files["onnx"]).run(None, {"input": test.x})[0].argmax(1)
    assert float((ort_pred == test.y).mean()) == variant["accuracy"]["onnxruntime"]

    compiled = load_compiled(files["tvm"])
    tvm_pred = np.array([compiled.run({"input": test.x[i:i + 1]})[0].argmax(1)[0] for i in range(len(test.y))])
    assert float((tvm_pred == test.y).mean()) == variant["accuracy"]["tvm"]


def test_existing_results_are_kept_without_force(digits_run):
    out, _ = digits_run
    before = (out / "report.json").read_bytes()
    result = run_cli("run", "pipelines/digits.yaml", "-o", str(out))
    assert result.exit_code == 2
    assert "already exist" in result.output and "--force" in result.output
    assert (out / "report.json").read_bytes() == before


def test_report_verb_regenerates_from_report_json(digits_run):
    out, _ = digits_run
    md_before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "accuracy_vs_latency.png").unlink()
    result = run_cli("report", str(out))
    assert result.exit_code == 0
    assert (out / "report.md").read_text() == md_before
    assert (out / "accuracy_vs_latency.png").exists()


def test_same_pipeline_and_seed_give_the_same_weights_and_onnx(tiny_pipeline, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_cli("run", str(tiny_pipeline), "-o", str(out)).exit_code == 0
    reports = [json.loads((o / "report.json").read_text()) for o in outs]
    for va, vb in zip(*(r["variants"] for r in reports)):
        assert va["accuracy"] == vb["accuracy"] and va["sparsity"] == vb["sparsity"]
        sa = torch.load(outs[0] / va["files"]["checkpoint"], weights_only=True)
        sb = torch.load(outs[1] / vb["files"]["checkpoint"], weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert (outs[0] / va["files"]["onnx"]).read_bytes() == (outs[1] / vb["files"]["onnx"]).read_bytes()


def test_a_failed_forced_run_keeps_the_old_results(tiny_pipeline, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_cli("run", str(tiny_pipeline), "-o", str(out)).exit_code == 0
    before = (out / "report.json").read_bytes()

    from prune2tvm.compile import build
    from prune2tvm.errors import BuildError

    def broken(*args, **kwargs):
        raise BuildError("simulated failure in the middle of a run")

    monkeypatch.setattr(build.tvm, "compile", broken)
    result = run_cli("run", str(tiny_pipeline), "-o", str(out), "--force")
    assert result.exit_code == 2 and "simulated failure" in result.output
    assert (out / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]
