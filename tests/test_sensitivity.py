"""Sensitivity analysis: the sweep, its CSV and plot, per-layer targets, and a pipeline that
prunes each layer to its own target."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prune2tvm.cli import cli
from prune2tvm.errors import InputError
from prune2tvm.prune.sensitivity import (SensitivityPoint, layer_targets, read_csv, sensitivities_for, sweep,
                                         threshold_masks, write_csv)


def test_sweep_prunes_one_layer_at_a_time_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m):  # records how many zeros each layer had when evaluated
        seen.append(tuple(int((m[i].weight == 0).sum()) for i in (0, 1)))
        return 1.0 - 0.1 * len(seen)

    points = sweep(model, {"0": model[0], "1": model[1]}, evaluate, [0.5, 0.25])
    assert seen == [(0, 0), (16, 0), (32, 0), (0, 8), (0, 16)]  # dense once, then each layer alone, rising
    assert [(p.layer, p.sparsity) for p in points] == [("0", 0.0), ("0", 0.25), ("0", 0.5), ("1", 0.0), ("1", 0.25),
                                                       ("1", 0.5)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targets_stop_at_the_first_level_beyond_the_tolerance(tmp_path):
    rows = [("a", 0.0, 0.90), ("a", 0.5, 0.90), ("a", 0.7, 0.86), ("a", 0.9, 0.89),  # 0.9 recovers: too late
            ("b", 0.0, 0.90), ("b", 0.5, 0.895), ("b", 0.7, 0.89), ("b", 0.9, 0.80)]
    points = [SensitivityPoint(*r) for r in rows]
    write_csv(points, tmp_path / "s.csv")
    back = read_csv(tmp_path / "s.csv")
    assert layer_targets(back, 0.01) == {"a": 0.5, "b": 0.7}
    assert layer_targets(back, 0.05) == {"a": 0.9, "b": 0.7}
    (tmp_path / "bad.csv").write_text("layer,sparsity,accuracy\na,half,0.9\n")
    with pytest.raises(InputError, match="line 2: sparsity and accuracy must be numbers"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "other.csv").write_text("name,value\n")
    with pytest.raises(InputError, match="not a sensitivity file"):
        read_csv(tmp_path / "other.csv")


def test_distiller_threshold_removes_the_target_fraction_of_the_dense_layer():
    torch.manual_seed(1)
    layers = {"fc": nn.Linear(64, 32)}
    sens = sensitivities_for(layers, {"fc": 0.6})
    mask = threshold_masks(layers, sens)["fc"]
    assert float(1 - mask.mean()) == pytest.approx(0.6, abs=0.01)
    # threshold = sensitivity * std(w)
    threshold = sens["fc"] * float(layers["fc"].weight.detach().std())
    assert bool((layers["fc"].weight.abs()[mask == 0] <= threshold).all())


@pytest.mark.parametrize("mode", ["target", "threshold"])
def test_sensitivity_verb_then_a_pipeline_with_per_layer_targets(tmp_path, mode):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE.format(file=tmp_path / "sens" / "sensitivity.csv", mode=mode))
    runner = CliRunner()
    result = runner.invoke(cli, ["sensitivity", str(pipeline), "--levels", "0.3,0.6,0.9", "-o", str(tmp_path / "sens")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    points = read_csv(tmp_path / "sens" / "sensitivity.csv")
    assert sorted({p.layer for p in points}) == ["1", "3", "5"] and len(points) == 3 * 4
    assert (tmp_path / "sens" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "within 1 % of dense accuracy:" in result.output
    targets = layer_targets(points, 0.05)

    result = runner.invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["dense", "agp-sens5"]
    layers = {layer["name"]: layer["sparsity"] for layer in report["variants"][1]["layers"]}
    if mode == "target":
        assert layers == pytest.approx(targets, abs=0.01)  # each layer at its own target
    else:  # |w| < sensitivity * std(w), set from the dense weights: near the target after fine-tuning
        assert layers == pytest.approx(targets, abs=0.1) and any(v > 0 for v in layers.values())
    # the file is checked before any training
    (tmp_path / "sens" / "sensitivity.csv").write_text("garbage")
    result = runner.invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "not a sensitivity file" in result.output and "train" not in result.output


PIPELINE = """\
version: 1
name: sens
seed: 4
model: {{name: mlp}}
train: {{epochs: 6, batch_size: 64, lr: 0.003}}
prune: {{sparsities: [], start_epoch: 0, end_epoch: 2, frequency: 1, fine_tune_epochs: 4,
        sensitivity: {{file: "{file}", tolerances: [0.05], mode: {mode}}}}}
measure: {{batch_size: 4, warmup: 2, repeat: 10, rounds: 2}}
"""
