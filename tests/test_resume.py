"""Killed at a random point, resumed: a run, a sweep and a tuning, three times each (two
SIGKILLs and a Ctrl-C). Whatever the moment, what was finished is kept and not recomputed, nothing
half-written is taken for a result, and the next run completes; a resumed sweep reaches the
same accuracies (a run: the same weights) as one that was never interrupted.

The kill time is drawn at random on each run and shown on failure;
``PRUNE2TVM_KILL_AT=SECONDS`` replays one.
"""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from prune2tvm.cli import cli
from conftest import REPO, TINY_PIPELINE, write_yaml
from test_sweep import SWEEP_PIPELINE
from test_tune import one_matmul

pytestmark = pytest.mark.slow

ROUNDS = [("SIGKILL", "kill-1"), ("SIGKILL", "kill-2"), ("SIGINT", "ctrl-c")]
SWEEP_ARGS = ["--sparsity", "0.5,0.9", "--bsr", "1"]
CTRL_C_GRACE_S = 10  # Ctrl-C must stop a run within this


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def kill_at(low: float, high: float) -> float:
    fixed = os.environ.get("PRUNE2TVM_KILL_AT")
    return float(fixed) if fixed else round(random.SystemRandom().uniform(low, high), 1)


def start_and_kill(argv: list[str], at: float, signal_name: str) -> tuple[int, str]:
    """Run ``prune2tvm ARGV`` in its own process group and send it the signal after ``at``
    seconds (unless it finished first); its exit status and output."""
    proc = subprocess.Popen([sys.executable, "-m", "prune2tvm", *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PRUNE2TVM_NO_PROGRESS": "1"})
    try:
        out, _ = proc.communicate(timeout=at)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        pass
    if signal_name == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=CTRL_C_GRACE_S)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the group: builders, runners, workers
    out, _ = proc.communicate()
    assert signal_name != "SIGINT", f"Ctrl-C did not stop the run within {CTRL_C_GRACE_S} s:\n{out[-2000:]}"
    return proc.returncode, out


def check_stopped(code: int, output: str, signal_name: str, context: str) -> None:
    if code == 0:
        return  # finished before the signal: the resume below must then compute nothing
    if signal_name == "SIGINT":
        assert code == 130 and "interrupted" in output, f"{context}: exit {code}\n{output[-2000:]}"
        assert "Traceback" not in output, f"{context}:\n{output[-2000:]}"
    else:
        assert code == -signal.SIGKILL, f"{context}: exit {code}"


# --------------------------------------------------------------------------- sweep


def stored(out) -> dict[str, int]:
    """Finished variants (name -> mtime of result.json); each must be complete JSON."""
    found = {}
    for path in (out / "variants").glob("*/result.json") if (out / "variants").exists() else []:
        if path.parent.name.startswith("."):
            continue
        json.loads(path.read_text())  # a finished result is never half-written
        found[path.parent.name] = path.stat().st_mtime_ns
    return found


def accuracies(out) -> dict[str, tuple]:
    report = json.loads((out / "report.json").read_text())
    return {v["name"]: (v["accuracy"], v["sparsity"]) for v in report["variants"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    pipeline = write_yaml(tmp, SWEEP_PIPELINE, "tinysweep.yaml")
    result = run_cli("sweep", pipeline, *SWEEP_ARGS, "-o", tmp / "out")
    assert result.exit_code == 0, result.output
    return accuracies(tmp / "out")


@pytest.mark.parametrize("signal_name", [r[0] for r in ROUNDS], ids=[r[1] for r in ROUNDS])
def test_a_sweep_stopped_at_a_random_point_resumes_to_the_same_results(uninterrupted, tmp_path, signal_name):
    pipeline = write_yaml(tmp_path, SWEEP_PIPELINE, "tinysweep.yaml")
    out = tmp_path / "out"
    at = kill_at(0.5, 9.0)  # a whole tiny sweep takes about 10 s on 2 cores
    context = f"sweep stopped with {signal_name} after {at} s (PRUNE2TVM_KILL_AT={at} replays it)"
    code, output = start_and_kill(["sweep", str(pipeline), *SWEEP_ARGS, "-o", str(out)], at, signal_name)
    check_stopped(code, output, signal_name, context)
    finished = stored(out)
    if (out / "report.json").exists():
        json.loads((out / "report.json").read_text())

    resumed = run_cli("sweep", pipeline, *SWEEP_ARGS, "-o", out)
    assert resumed.exit_code == 0, f"{context}\n{resumed.output}"
    assert "unusable" not in resumed.output, f"{context}\n{resumed.output}"
    after = stored(out)
    assert {name: after[name] for name in finished} == finished, context  # kept, not recomputed
    assert set(after) == set(uninterrupted), context
    assert accuracies(out) == uninterrupted, context
    assert not [p.name for p in (out / "variants").iterdir() if p.name.startswith(".")], context


# --------------------------------------------------------------------------- tuning


def complete_records(db) -> int:
    """Records in the database; only the last line may be cut short by a kill."""
    path = db / "records.json"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    for line in lines[:-1]:
        json.loads(line)
    try:
        json.loads(lines[-1]) if lines else None
        return len(lines)
    except ValueError:
        return len(lines) - 1


@pytest.mark.parametrize("signal_name", [r[0] for r in ROUNDS], ids=[r[1] for r in ROUNDS])
def test_tuning_stopped_at_a_random_point_keeps_its_records_and_resumes(tmp_path, signal_name):
    model = one_matmul(tmp_path / "m.onnx", 40, 24)
    db = tmp_path / "db"
    at = kill_at(2.0, 45.0)  # the first round of 8 ends after about 15 s, the next every 8 s
    context = f"tuning stopped with {signal_name} after {at} s (PRUNE2TVM_KILL_AT={at} replays it)"
    code, output = start_and_kill(["tune", str(model), "--dense-kernel", "tvm", "--trials", "64", "--db", str(db), "-o",
                                   str(tmp_path / "first")], at, signal_name)
    check_stopped(code, output, signal_name, context)
    kept = complete_records(db)
    if code != 0:
        assert not (tmp_path / "first").exists(), context  # no half-written artifact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], context

    resumed = run_cli("tune", model, "--dense-kernel", "tvm", "--trials", 64, "--time-limit", 1, "--db", db, "-o", tmp_path / "second")
    assert resumed.exit_code == 0, f"{context}\n{resumed.output}"
    assert complete_records(db) >= kept, context
    row = next(line for line in resumed.output.splitlines() if line.startswith("| matmul |"))
    status = row.split("|")[3].strip()
    if kept:
        assert status.startswith("resumed after ") or status in ("already tuned", "untuned kept (faster)"), \
            f"{context}: the records kept were not resumed from\n{row}"
    if status != "already tuned":
        assert "time limit of 1 s reached after 8 trials: stopping" in resumed.output, context
        assert 1 <= int(row.split("|")[4]) <= 8, context  # one round, not the 64 asked for
    assert json.loads((tmp_path / "second" / "manifest.json").read_text())["verified"], context


# --------------------------------------------------------------------------- run


def weights(out) -> dict[str, dict]:
    import torch

    report = json.loads((out / "report.json").read_text())
    return {v["name"]: torch.load(out / v["files"]["checkpoint"], weights_only=True) for v in report["variants"]}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in ((a[n], b[n]) for n in a))


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    pipeline = write_yaml(tmp, TINY_PIPELINE, "tiny.yaml")
    result = run_cli("run", pipeline, "-o", tmp / "out")
    assert result.exit_code == 0, result.output
    return accuracies(tmp / "out"), weights(tmp / "out")


def test_an_interrupted_run_keeps_each_finished_model_and_the_next_run_starts_from_them(
        uninterrupted_run, tmp_path, monkeypatch):
    """Ctrl-C while the second variant is pruned: the dense model and the first variant are
    kept, the next run trains only the second, and every weight is what an uninterrupted run
    gives; a finished run leaves nothing to resume."""
    from prune2tvm import pipeline as stages

    pipeline = write_yaml(tmp_path, TINY_PIPELINE, "tiny.yaml")
    real = stages.prune_variant
    pruned = []

    def interrupted_at_the_second(*args, **kwargs):
        pruned.append(args[-1])
        if len(pruned) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "prune_variant", interrupted_at_the_second)
    stopped = run_cli("run", pipeline, "-o", tmp_path / "out")
    assert stopped.exit_code == 130 and "interrupted" in stopped.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / ".out.resume").iterdir() if not p.name.startswith(".")) == \
        ["agp-50", "dense"]

    pruned.clear()
    monkeypatch.setattr(stages, "prune_variant", real)
    resumed = run_cli("run", pipeline, "-o", tmp_path / "out")
    assert resumed.exit_code == 0, resumed.output
    assert "dense model: kept by an interrupted run" in resumed.output
    assert "agp-50: kept by an interrupted run" in resumed.output and "[train] dense" not in resumed.output
    assert "[prune] agp-80" in resumed.output and "[prune] agp-50" not in resumed.output
    assert accuracies(tmp_path / "out") == uninterrupted_run[0]
    assert same_weights(weights(tmp_path / "out"), uninterrupted_run[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.yaml"]


@pytest.mark.parametrize("signal_name", [r[0] for r in ROUNDS], ids=[r[1] for r in ROUNDS])
def test_a_run_stopped_at_a_random_point_resumes_to_the_same_weights(uninterrupted_run, tmp_path, signal_name):
    pipeline = write_yaml(tmp_path, TINY_PIPELINE, "tiny.yaml")
    out = tmp_path / "out"
    at = kill_at(0.5, 5.0)  # the tiny run takes about 5 s
    context = f"run stopped with {signal_name} after {at} s (PRUNE2TVM_KILL_AT={at} replays it)"
    code, output = start_and_kill(["run", str(pipeline), "-o", str(out)], at, signal_name)
    check_stopped(code, output, signal_name, context)
    if code != 0:
        assert not out.exists(), context  # all or nothing
    resumed = run_cli("run", pipeline, "-o", out, *(["--force"] if code == 0 else []))
    assert resumed.exit_code == 0, f"{context}\n{resumed.output}"
    assert "not usable" not in resumed.output, f"{context}\n{resumed.output}"
    assert accuracies(out) == uninterrupted_run[0], context
    assert same_weights(weights(out), uninterrupted_run[1]), context
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.yaml"], context  # nothing left behind
