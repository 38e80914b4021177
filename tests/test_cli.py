"""The CLI through click's CliRunner: every verb answers --help; the catalogues and stages work
(bad input across the verbs: test_faults.py)."""

import json

import pytest
from click.testing import CliRunner

from prune2tvm.cli import cli

VERBS = ["run", "sweep", "prune", "sensitivity", "export", "compile", "tune", "bench", "verify", "package", "report", "targets", "targets list",
         "targets show", "pipelines", "pipelines list", "pipelines show", "env"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, *parts, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    result = invoke(*verb.split(), "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_prune_applies_a_plan_to_a_dense_checkpoint_and_refuses_one_that_does_not_fit(tmp_path):
    import torch

    from prune2tvm.models import build_model
    from prune2tvm.prune.granularity import Granularity
    from prune2tvm.prune.masks import MaskHolder, prunable_layers
    from prune2tvm.prune.plan import PruningPlan

    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    holder = MaskHolder(prunable_layers(model, ["1", "3"]))
    holder.set_sparsity(0.75, Granularity("block", (4, 1)))
    PruningPlan.from_model(model, holder.masks, Granularity("block", (4, 1)), "agp").save(tmp_path / "plan.json")
    result = invoke("prune", str(tmp_path / "dense.pt"), "-m", "mlp", "--plan", str(tmp_path / "plan.json"),
                    "-o", str(tmp_path / "pruned.pt"), "--summary")
    assert result.exit_code == 0, result.output
    assert "2 layer(s) masked, 0.750 of their weights zero" in result.output
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.output.splitlines() if line.startswith("| ")}
    # layer 1: 256x64, 75 % of 4x1 blocks gone; 64*256 MACs per sample; the classifier untouched
    assert rows["1"] == ["256x64", "16384", "4096", "75.0", "75.0", "0.0", "0.0", "16384", "4096"]
    assert rows["5"][4] == "-" and rows["5"][2] == rows["5"][1]  # 10 outputs: no 4x1 blocks; dense
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert torch.equal(pruned["1.weight"], model.state_dict()["1.weight"])  # the masked model itself
    # the plan on a model for another input size: refused, nothing written
    torch.save(build_model("mlp", (1, 4, 4), 10).state_dict(), tmp_path / "small.pt")
    result = invoke("prune", str(tmp_path / "small.pt"), "-m", "mlp", "--input-shape", "1,4,4",
                    "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "other.pt"))
    assert_one_line_error(result, "plan.json does not fit the model: 1 is [256, 16], the plan's [256, 64]")
    assert not (tmp_path / "other.pt").exists()


def test_targets_list_and_show():
    result = invoke("targets", "list")
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert set(rows) == {"aarch64", "cuda", "x86", "x86-avx512"}
    assert "runs here" in rows["x86"] and "build only" in rows["cuda"]
    show = invoke("targets", "show", "x86")
    assert show.exit_code == 0
    resolved = json.loads(show.output.split("resolved tvm target: ")[1].splitlines()[0])
    assert resolved["kind"] == "llvm" and resolved["mcpu"] not in ("auto", "")
    assert_one_line_error(invoke("targets", "show", "nope"), "unknown target 'nope'")


def test_pipelines_list_and_show():
    result = invoke("pipelines", "list")
    assert result.exit_code == 0 and result.output.startswith("digits")
    show = invoke("pipelines", "show", "digits")
    assert show.exit_code == 0 and "sparsities: [0.5, 0.8]" in show.output and "lr: 0.002" in show.output


def test_env_reports_versions_and_tools():
    result = invoke("env")
    assert result.exit_code == 0
    fields = {line[:18].strip(): line[18:].strip() for line in result.output.splitlines()}
    assert fields["tvm"] == "0.27.0.post1" and fields["torch"].startswith("2.13.0")
    for key in ("python", "onnx", "onnxruntime", "cpu features", "nvcc", "llvm host cpu"):
        assert fields.get(key), key
