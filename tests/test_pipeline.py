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


def test_each_variant_leaves_an_artifact_that_reproduces_its_accuracy_with_the_runtime(digits_run, tmp_path):
    """`python -m prune2tvm.runtime` on the artifact and the saved test split (.npy), run as a
    user would: the accuracy equals the report's TVM accuracy, and the manifest records it."""
    import subprocess
    import sys

    out, report = digits_run
    labels = np.load(out / "data" / "test_y.npy")
    for variant in report["variants"]:
        artifact = out / variant["files"]["tvm"]
        result = subprocess.run([sys.executable, "-m", "prune2tvm.runtime", str(artifact), "--inputs",
                                 str(out / "data" / "test_x.npy"), "--outputs", str(tmp_path / f"{variant['name']}.npz")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        with np.load(tmp_path / f"{variant['name']}.npz") as logits:
            accuracy = float((logits["logits"].argmax(1) == labels).mean())
        assert accuracy == variant["accuracy"]["tvm"], variant["name"]
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["measured"]["accuracy"] == variant["accuracy"]["tvm"] and manifest["verified"]
        assert manifest["measured"]["latency_ms"]["median"] == variant["latency_ms"]["tvm"]["median"]


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


def test_same_pipeline_and_seed_give_the_same_weights_masks_onnx_and_accuracy(tiny_pipeline, tmp_path):
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
        plans = [o / "variants" / va["name"] / "plan.json" for o in outs]  # the masks' provenance
        assert plans[0].exists() == plans[1].exists()
        if plans[0].exists():
            assert plans[0].read_bytes() == plans[1].read_bytes()


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
    # the trained models are kept for the next run (test_resume.py), and nothing else is left
    assert "the models trained so far (agp-50, agp-80, dense) are kept in" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.resume", "run", "tiny.yaml"]


def test_1xn_pipeline_rearranges_prunes_blocks_and_saves_a_reapplicable_plan(tmp_path):
    """Method 1xN on the CNN: filters rearranged (the whole chain permuted, BN included), 4x1
    blocks pruned at 75 % per layer, the ONNX and BSR build see those blocks, and the plan
    puts the dense checkpoint into the pruned model's order and zero pattern."""
    from prune2tvm.models import build_model
    from prune2tvm.prune.plan import PruningPlan

    pipeline = tmp_path / "onexn.yaml"
    pipeline.write_text(TINY_1XN)
    out = tmp_path / "run"
    result = run_cli("run", str(pipeline), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "AGP on 4x1 blocks, layer scope, filters rearranged, to 0.75" in result.output
    assert "its filters are" not in result.output  # blocks: the classifier is pruned too
    report = json.loads((out / "report.json").read_text())
    variant = report["variants"][1]
    assert variant["name"] == "1xN-75" and variant["sparsity"] == pytest.approx(0.75, abs=0.01)
    vdir = out / "variants" / "1xN-75"
    plan = PruningPlan.load(vdir / "plan.json")
    # the classifier's 10 outputs do not divide into 4x1 blocks: three layers, all rearranged
    assert [(layer.name, layer.order is not None) for layer in plan.layers] == [("0", True), ("3", True), ("8", True)]

    data = load_dataset("digits", [0.6, 0.2, 0.2], 1)
    fresh = build_model("cnn", data.input_shape, data.num_classes)
    fresh.load_state_dict(torch.load(out / "variants" / "dense" / "model.pt", weights_only=True))
    masks = plan.apply(fresh)
    pruned = torch.load(vdir / "model.pt", weights_only=True)
    for name, mask in masks.items():
        assert torch.equal(pruned[f"{name}.weight"] == 0, mask == 0), name
    # the BN after the first conv was permuted with it: its statistics moved along
    first = plan.layers[0]
    assert torch.equal(fresh.state_dict()["1.running_mean"],
                       torch.load(out / "variants" / "dense" / "model.pt", weights_only=True)["1.running_mean"][first.order])
    layers = load_compiled(vdir / "tvm").info.layers
    assert [d["kind"] for d in layers] == ["bsr", "bsr", "bsr", "dense"]  # the 10 logits do not divide by 4
    assert all(d["block_sparsity"] == pytest.approx(0.75, abs=0.01) for d in layers[:3])


TINY_1XN = """\
version: 1
name: onexn
seed: 1
model: {name: cnn}
train: {epochs: 4, batch_size: 64, lr: 0.003}
prune: {method: 1xN, block: [4, 1], sparsities: [0.75], start_epoch: 0, end_epoch: 2,
        frequency: 1, fine_tune_epochs: 3}
compile: {bsr: {block: [4, 1], threshold: 0.5}}
measure: {batch_size: 1, warmup: 2, repeat: 10, rounds: 2}
"""


@pytest.mark.parametrize("method", ["filter", "gsm"])
def test_filter_and_gsm_pipelines(tmp_path, method):
    """Filter pruning thins the MLP (a smaller ONNX, a plan that thins a fresh model to take the
    checkpoint); GSM leaves exactly the global budget of nonzero weights; both still classify
    the digits and TVM agrees with torch."""
    from prune2tvm.models import build_model
    from prune2tvm.prune.plan import PruningPlan

    pipeline = tmp_path / "p.yaml"
    extra = "criterion: l2" if method == "filter" else "granularity: block, block: [4, 1]"
    pipeline.write_text(TINY_METHOD.format(method=method, extra=extra))
    out = tmp_path / "run"
    result = run_cli("run", str(pipeline), "-o", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["variants"]
    assert pruned["name"] == f"{method}-50"
    assert pruned["accuracy"]["torch"] > 0.8 and pruned["agreement"]["tvm"] == 1.0
    vdir = out / "variants" / pruned["name"]
    state = torch.load(vdir / "model.pt", weights_only=True)
    if method == "filter":  # half the filters: 1 - (1/2 + 1/4 + 1/2 of the three layers' weights) removed
        removed = 1 - (64 * 128 + 128 * 64 + 64 * 10) / (64 * 256 + 256 * 128 + 128 * 10)
        assert pruned["sparsity"] == pytest.approx(removed)
    else:
        assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    data = load_dataset("digits", [0.6, 0.2, 0.2], 2)
    fresh = build_model("mlp", data.input_shape, data.num_classes)
    PruningPlan.load(vdir / "plan.json").apply(fresh)
    if method == "filter":
        assert "0.5 of the filters by l2 (layer scope) thinned" in result.output
        assert state["1.weight"].shape[0] == 128 and state["3.weight"].shape == (64, 128)  # 256 -> 128, 128 -> 64
        sizes = [(out / v["files"]["onnx"]).stat().st_size for v in (dense, pruned)]
        assert sizes[1] < 0.6 * sizes[0]
        fresh.load_state_dict(state)  # the plan thinned the fresh model to the checkpoint's shapes
    else:
        assert "GSM on 4x1 blocks, global scope, to 0.5" in result.output
        assert "5: [10, 128] does not divide into 4x1 blocks" in result.output  # the classifier stays dense
        zeros = sum(int((state[f"{i}.weight"] == 0).sum()) for i in (1, 3))
        total = sum(state[f"{i}.weight"].numel() for i in (1, 3))
        assert zeros / total == pytest.approx(0.5, abs=0.01)  # one budget over both layers
        for i in (1, 3, 5):  # the plan's zeros are the checkpoint's
            assert torch.equal(fresh.state_dict()[f"{i}.weight"] == 0, state[f"{i}.weight"] == 0)


TINY_METHOD = """\
version: 1
name: m
seed: 2
model: {{name: mlp}}
train: {{epochs: 6, batch_size: 64, lr: 0.003}}
prune: {{method: {method}, {extra}, sparsities: [0.5], start_epoch: 0, end_epoch: 2, frequency: 1,
        fine_tune_epochs: 4}}
measure: {{batch_size: 4, warmup: 2, repeat: 10, rounds: 2}}
"""


# shipped pipeline, variant, the report's accuracy floor (issue #4), pruned layer -> (zero units, units)
METHOD_PIPELINES = {
    "digits-agp-fine": ("agp-90", 0.93, "element"),
    "digits-agp-blocks": ("agp-75", 0.92, "block"),
    "digits-1xn": ("1xN-75", 0.92, "block"),
    "digits-filter": ("filter-50", 0.90, "filter"),
    "digits-gsm": ("gsm-75", 0.92, "block"),
}


@pytest.mark.parametrize("name", sorted(METHOD_PIPELINES))
def test_shipped_method_pipelines_reach_their_sparsity_and_accuracy(tmp_path, name):
    variant_name, floor, kind = METHOD_PIPELINES[name]
    out = tmp_path / "run"
    result = run_cli("run", f"pipelines/{name}.yaml", "-o", str(out))
    assert result.exit_code == 0, result.output
    variant = next(v for v in json.loads((out / "report.json").read_text())["variants"] if v["name"] == variant_name)
    assert variant["accuracy"]["tvm"] >= floor and variant["agreement"]["tvm"] == 1.0
    state = torch.load(out / variant["files"]["checkpoint"], weights_only=True)
    dense = torch.load(out / "variants" / "dense" / "model.pt", weights_only=True)
    rate = variant["target_sparsity"]
    for layer in ("0", "3", "8"):  # the two convs and the hidden linear layer (the classifier: see below)
        w, d = state[f"{layer}.weight"], dense[f"{layer}.weight"]
        if kind == "element":  # exactly round(rate * n) zeros
            assert int((w == 0).sum()) == round(rate * w.numel()), layer
        elif kind == "block":  # exactly that many all-zero 4x1 blocks, every zero in one
            blocks = w.reshape(w.shape[0] // 4, 4, -1).abs().sum(1)
            if name == "digits-gsm":  # one global budget over the layers
                continue
            assert int((blocks == 0).sum()) == round(rate * blocks.numel()), layer
            assert int((w == 0).sum()) == 4 * int((blocks == 0).sum()), layer
        else:  # half the filters removed; the next layer's inputs follow
            assert w.shape[0] == d.shape[0] // 2, layer
    if kind == "block" and name == "digits-gsm":
        blocks = [state[f"{n}.weight"].reshape(state[f"{n}.weight"].shape[0] // 4, 4, -1).abs().sum(1) for n in "038"]
        zero = sum(int((b == 0).sum()) * 4 * 1 for b in blocks)
        weights = sum(state[f"{n}.weight"].numel() for n in "038")
        assert abs(zero / weights - rate) <= 4 / weights * 32  # within a few blocks of the global budget
    if kind == "filter":
        assert state["10.weight"].shape == (10, 64)  # the logits stay, reading the thinned features


def test_imagenet_pipeline_on_an_imagefolder_from_a_checkpoint(tmp_path):
    """The shipped ImageNet-shaped MobileNet V2 pipeline, made small (32x32 images, fewer
    calls): the user's ImageFolder and checkpoint come in through --data-path and
    --checkpoint, the checkpoint is the dense model (no training), and a checkpoint that does
    not fit the data's classes is refused in one line before anything is written."""
    import yaml
    from PIL import Image

    from prune2tvm.models import build_model

    root = tmp_path / "images"
    for c, colour in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (36, 36), tuple(max(0, v - 9 * i) for v in colour)).save(root / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_v2", (3, 32, 32), 3).state_dict(), tmp_path / "mbv2.pt")
    cfg = yaml.safe_load(open("pipelines/imagenet-mobilenet_v2.yaml"))
    cfg["data"]["image_size"] = [32, 32]
    cfg["data"]["split"] = [0.5, 0.25, 0.25]
    cfg["prune"].update(sparsities=[0.5], end_epoch=1, fine_tune_epochs=2)
    cfg["measure"].update(warmup=1, repeat=3, rounds=1)
    pipeline = tmp_path / "small.yaml"
    pipeline.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    result = run_cli("run", str(pipeline), "-o", str(out), "--data-path", str(root), "--checkpoint",
                     str(tmp_path / "mbv2.pt"))
    assert result.exit_code == 0, result.output
    assert f"dense mobilenet_v2 from {tmp_path / 'mbv2.pt'} for 0 epochs" in result.output
    dense = torch.load(out / "variants" / "dense" / "model.pt", weights_only=True)
    given = torch.load(tmp_path / "mbv2.pt", weights_only=True)
    assert all(torch.equal(dense[k], given[k]) for k in given)  # the checkpoint is the dense model
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["dense", "1xN-50"]
    assert all(v["agreement"]["tvm"] == 1.0 for v in report["variants"])

    torch.save(build_model("mobilenet_v2", (3, 32, 32), 5).state_dict(), tmp_path / "five.pt")
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "run2"), "--data-path", str(root),
                                      "--checkpoint", str(tmp_path / "five.pt")])
    assert result.exit_code == 2 and "checkpoint does not fit the model" in result.output
    assert "classifier.1.weight [5, 1280] != [3, 1280]" in result.output and not (tmp_path / "run2").exists()
