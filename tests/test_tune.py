"""Tuning with meta_schedule: a persistent database per target, reused, applied by compile.

One tuning run (a single MatMul, 4 trials: about 20 s here) is shared by these tests."""

import contextlib
import json
import signal
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper, save

from prune2tvm.cli import cli


# These tests are about meta_schedule's tuning of TVM's ops: the layers keep TVM's dense op
# (by default, CPU builds run prune2tvm's packed kernel there, which meta_schedule does not tune).
TVM_DENSE = ("--dense-kernel", "tvm")


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_matmul(path, k, n, rows=8, seed=0, w=None):
    """An ONNX model of one MatMul by a constant [k, n] (random unless ``w`` is given)."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) if w is None else w
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], "one_layer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(w, "w")])
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    model = one_matmul(tmp / "one.onnx", 64, 32)
    with watching_workers() as workers:
        result = run_cli("tune", model, *TVM_DENSE, "--trials", 4, "--db", tmp / "db", "-o", tmp / "tuned")
    assert result.exit_code == 0, result.output
    return tmp, model, result.output, workers


@contextlib.contextmanager
def watching_workers():
    """Every worker process this process starts meanwhile: pid -> (command line, whether it has
    SIGINT blocked), sampled from /proc 20 times a second."""
    seen, done = {}, threading.Event()

    def watch():
        while not done.wait(0.05):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error, OSError, StopIteration):
                    status = Path(f"/proc/{child.pid}/status").read_text().splitlines()
                    blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
                    seen.setdefault(child.pid, (" ".join(child.cmdline()), bool(blocked & (1 << (signal.SIGINT - 1)))))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def test_tuning_fills_a_database_and_builds_a_verified_model(tuned):
    tmp, _, output, _ = tuned
    # a candidate may fail to build or run on a loaded machine: between 1 and 4 trials
    row = next(line for line in output.splitlines() if line.startswith("| matmul |"))
    status, trials, untuned, tuned = (cell.strip() for cell in row.split("|")[3:7])
    assert 1 <= int(trials) <= 4
    records = [json.loads(line) for line in (tmp / "db" / "records.json").read_text().strip().splitlines()]
    if status == "tuned":  # a candidate beat TVM's default schedule
        assert float(tuned) <= float(untuned) and 1 <= len(records) <= int(trials)
    else:  # none did (4 trials is few): the default schedule is recorded with its time, and wins
        assert status == "untuned kept (faster)" and tuned == untuned and 2 <= len(records) <= int(trials) + 1
        best = min(sum(r[1][1]) / len(r[1][1]) for r in records if r[1][1])
        assert best == pytest.approx(float(untuned) * 1e-6, abs=0.06e-6)  # the table rounds to 0.1 us
    meta = json.loads((tmp / "db" / "meta.json").read_text())
    assert meta["tvm_version"] == "0.27.0.post1" and meta["target"]["kind"] == "llvm"
    info = json.loads((tmp / "tuned" / "manifest.json").read_text())
    assert info["verified"] and info["tuning_database"] == str(tmp / "db")


def test_a_second_identical_run_does_no_new_trials(tuned):
    tmp, model, _, _ = tuned
    before = (tmp / "db" / "records.json").read_text()
    result = run_cli("tune", model, *TVM_DENSE, "--trials", 4, "--db", tmp / "db", "-o", tmp / "tuned", "--force")
    assert result.exit_code == 0, result.output
    assert "| matmul | 1 | already tuned | 0 |" in result.output and "0 new trials" in result.output
    assert (tmp / "db" / "records.json").read_text() == before


def test_compile_applies_a_database_and_refuses_a_foreign_one(tuned, tmp_path):
    tmp, model, _, _ = tuned
    result = run_cli("compile", model, *TVM_DENSE, "--db", tmp / "db", "-o", tmp_path / "build")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "build" / "manifest.json").read_text())
    assert info["verified"] and info["tuning_database"] == str(tmp / "db")
    assert list(info["files"]) == ["model.so"]
    # --include-tuning: the records it was built with travel in the artifact, checksummed
    result = run_cli("compile", model, *TVM_DENSE, "--db", tmp / "db", "--include-tuning", "-o", tmp_path / "with-records")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "with-records" / "manifest.json").read_text())
    assert "tuning/records.json" in info["files"] and "tuning/meta.json" in info["files"]
    assert (tmp_path / "with-records" / "tuning" / "records.json").read_text() == (tmp / "db" / "records.json").read_text()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    meta = json.loads((tmp / "db" / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "tvm_version": "0.19.0"}))
    result = run_cli("compile", model, "--db", foreign, "-o", tmp_path / "never")
    assert result.exit_code == 2
    assert "was made for tvm version '0.19.0', not '0.27.0.post1'" in result.output
    assert not (tmp_path / "never").exists()


def test_tuning_refuses_what_it_cannot_do(tuned, tmp_path):
    tmp, model, _, _ = tuned
    result = run_cli("tune", model, "--target", "cuda", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "this machine has none" in result.output and "--rpc-tracker" in result.output
    result = run_cli("compile", model, "--db", tmp_path / "nothing", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no tuning database there" in result.output
    result = run_cli("tune", model, "--trials", 0, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--trials" in result.output


def test_an_interrupted_write_is_set_aside_and_tuning_resumes(tuned, tmp_path):
    """A run killed while appending leaves a partial last line: the next run keeps every
    complete record (so a tuned task needs no new trials) and moves the broken line aside."""
    import shutil

    tmp, model, _, _ = tuned
    db = tmp_path / "db"
    shutil.copytree(tmp / "db", db)
    records = db / "records.json"
    complete = records.read_text()
    records.write_text(complete + complete.splitlines()[0][: len(complete.splitlines()[0]) // 2])
    result = run_cli("tune", model, *TVM_DENSE, "--trials", 4, "--db", db, "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    assert "0 new trials" in result.output
    assert records.read_text() == complete
    aside = list(db.glob("records.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().strip() == complete.splitlines()[0][: len(complete.splitlines()[0]) // 2]


def test_bsr_kernels_are_searched_keyed_by_their_block_pattern(tmp_path):
    """`tune --bsr` measures each BSR kernel's parameter sets on this machine, keeps the
    fastest in the database (keyed by shape and block pattern) and builds with it."""
    from prune2tvm.compile.bsr_tune import kernel_key
    from prune2tvm.compile.build import simd_lanes
    from prune2tvm.config import load_target
    from prune2tvm.compile.kernels.bsr_matmul import search_space
    from prune2tvm.compile.kernels.windowed_gemv import cpu_layout
    from prune2tvm.sparse import BsrMatrix

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)).astype(np.float32) * np.repeat(rng.random((64, 24)) >= 0.8, 4, 1)  # [K, N]
    model = one_matmul(tmp_path / "sparse.onnx", 64, 96, rows=1, w=w)
    args = ["tune", model, "--trials", 1, "--bsr", 4, "--db", tmp_path / "db", "-o", tmp_path / "tuned"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| matmul 1x64->96 4x1"))
    bsr = BsrMatrix.from_dense(np.ascontiguousarray(w.T), (4, 1))
    lanes = simd_lanes(load_target("x86"))
    shape, _ = cpu_layout(1, bsr, lanes)  # AVX-512: the windowed GEMV, 3 candidates; else the CSR-like one, 4
    assert row.split("|")[2].strip() == "tuned" and int(row.split("|")[3]) == len(search_space(shape)) > 1
    records = json.loads((tmp_path / "db" / "bsr.json").read_text())
    (key, record), = records.items()
    assert record["best_us"] == min(record["candidates"].values())
    assert json.loads((tmp_path / "tuned" / "manifest.json").read_text())["verified"]

    result = run_cli(*args, "--force")  # nothing new to measure
    assert result.exit_code == 0 and "| matmul 1x64->96 4x1" in result.output and "0 new trials" in result.output

    # one shape, two block patterns: two keys; the same pattern: the same key
    other = BsrMatrix.from_dense(np.ascontiguousarray(w.T[:, ::-1]), (4, 1))
    assert other.nnzb == bsr.nnzb
    kind = "matmul-windowed" if shape.slots else "matmul"
    assert key.startswith(kind + "-") and kernel_key(kind, shape, lanes, [bsr.indptr, bsr.indices]) == key
    assert kernel_key(kind, shape, lanes, [other.indptr, other.indices]) != key


def test_tuning_workers_leave_ctrl_c_to_the_tuner(tuned):
    """A terminal's Ctrl-C reaches every process of the group: the builder and runner workers
    must not react to it (a KeyboardInterrupt traceback each, CI saw one), the tuner ends them."""
    workers = {pid: blocked for pid, (command, blocked) in tuned[3].items() if "tvm.exec.popen_worker" in command}
    assert workers, "no meta_schedule worker process was seen"
    assert all(workers.values()), f"workers that a Ctrl-C would interrupt: {[p for p, b in workers.items() if not b]}"


def test_tvmscript_reads_the_same_stack_from_the_lazy_one():
    """prune2tvm gives TVMScript's parser a lazy ``inspect.stack()`` (tuning started 20 s
    late without it): what the parser reads of it must equal what ``inspect`` gives, and a
    function inside an ``@I.ir_module`` class (the parser tells that from the stack's source
    lines) must still parse."""
    import inspect

    import tvm
    import tvm.tirx.script.parser.entry as entry
    from tvm.script import ir as I
    from tvm.script import tirx as T

    assert entry.inspect is not inspect, "the lazy stack is not installed"
    real, lazy = inspect.stack(), entry.inspect.stack()  # one line: the same line numbers
    assert [f.frame for f in lazy] == [f.frame for f in real]
    assert [(f.filename, f.lineno, f.function, f.code_context, f.index) for f in lazy] == \
        [(f.filename, f.lineno, f.function, f.code_context, f.index) for f in real]

    @I.ir_module
    class Module:
        @T.prim_func
        def add_one(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = a[i] + T.float32(1)

    assert isinstance(Module, tvm.IRModule) and [g.name_hint for g in Module.functions] == ["add_one"]


def test_the_untuned_schedule_kept_as_faster_is_what_the_database_returns(tmp_path):
    """Where no candidate beats TVM's default schedule, the default is recorded with its time;
    the database must return it (a record with an empty trace was silently never returned, so
    builds applied the best tuned record, slower)."""
    from prune2tvm.compile.build import prepare_module
    from prune2tvm.compile.target import tvm_target
    from prune2tvm.compile.tune import TuningDatabase, _tasks
    from prune2tvm.config import load_target

    target = load_target("x86")
    task = _tasks([prepare_module(one_matmul(tmp_path / "m.onnx", 40, 24), target, {}).mod], tvm_target(target))[0]
    mod, tgt = task.dispatched[0], tvm_target(target)
    db = TuningDatabase(tmp_path / "db", target)
    db.keep_untuned(mod, tgt, 3e-6)
    assert db.best_seconds(mod, tgt) == pytest.approx(3e-6)
    reopened = TuningDatabase(tmp_path / "db", target)
    assert reopened.best_seconds(mod, tgt) == pytest.approx(3e-6)


def test_a_task_the_budget_did_not_reach_is_tuned_by_the_next_run(tmp_path):
    """8 trials for two tasks: the first round (8 candidates) goes to one task. The other was
    never measured: it must say so, and must not be taken for tuned by the next run."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["hidden"]), helper.make_node("MatMul", ["hidden", "w2"], ["output"])],
        "two_layers", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [8, 40])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [8, 16])],
        [numpy_helper.from_array(rng.standard_normal((40, 24)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((24, 16)).astype(np.float32), "w2")])
    model = tmp_path / "two.onnx"
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(model))

    def statuses(output):
        rows = [line.split("|") for line in output.splitlines() if line.startswith("| matmul")]
        return sorted((row[3].strip(), int(row[4])) for row in rows)

    first = run_cli("tune", model, *TVM_DENSE, "--trials", 8, "--db", tmp_path / "db", "-o", tmp_path / "first")
    assert first.exit_code == 0, first.output
    reached, unreached = sorted(statuses(first.output), key=lambda s: s[1], reverse=True)
    assert reached[0] in ("tuned", "untuned kept (faster)") and 1 <= reached[1] <= 8
    assert unreached == ("not reached (budget spent)", 0)
    second = run_cli("tune", model, *TVM_DENSE, "--trials", 8, "--db", tmp_path / "db", "-o", tmp_path / "second")
    assert second.exit_code == 0, second.output
    again = statuses(second.output)
    assert ("already tuned", 0) in again
    assert any(status in ("tuned", "untuned kept (faster)") and trials >= 1 for status, trials in again), again


def test_the_bsr_search_times_candidates_in_alternating_rounds(tmp_path, monkeypatch):
    """One vCPU of these machines intermittently runs at about 2/3 speed: a candidate timed
    once, during a slow spell, lost to a slower one. Each candidate is now timed in turn,
    round after round, and judged by its best round."""
    from types import SimpleNamespace

    from prune2tvm.compile import bsr_tune
    from prune2tvm.config import load_target

    order = []
    script = {1: [100.0, 100.0, 100.0], 2: [150.0, 60.0, 65.0]}  # candidate 2's first round in a slow spell

    def timer(spec, params, target, session=None):
        times = iter(script[params["u"]])
        return lambda: order.append(params["u"]) or next(times)

    monkeypatch.setattr(bsr_tune, "_kernel_timer", timer)
    records = bsr_tune.BsrRecords.open(tmp_path)
    spec = SimpleNamespace(key="k", layer="a kernel", space=[{"u": 1}, {"u": 2}])
    [report] = bsr_tune.tune_bsr_kernels([spec], load_target("x86"), records)
    assert order == [1, 2] * bsr_tune.SEARCH_ROUNDS
    assert records.params("k") == {"u": 2} and (report.default_us, report.best_us) == (100.0, 60.0)
