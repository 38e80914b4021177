"""Autotuning with meta_schedule: one persistent database per target, reused across runs.

Tasks are the fused TIR functions of the (already BSR-rewritten) module, prepared exactly as
the build prepares them, so a record found here applies at build time. prune2tvm's BSR
kernels are hand-scheduled: meta_schedule cannot search kernels with data-dependent loops,
so they are not tuning tasks here. A task that already has records in the database is not
tuned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

import prune2tvm
from prune2tvm.compile.target import device, resolved_target_dict, tvm_target
from prune2tvm.config import TargetConfig
from prune2tvm.errors import InputError, UnsupportedError
from prune2tvm.fsutil import ensure_writable_dir, write_json
from prune2tvm.progress import say

DB_FORMAT_VERSION = 1
META_NAME = "meta.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRUNE2TVM_CACHE", Path.home() / ".cache" / "prune2tvm"))


def database_dir(target: TargetConfig, override: str | os.PathLike | None = None) -> Path:
    """``override``, or the cache's directory for this target (named and hashed by its dict)."""
    if override:
        return Path(override)
    spec = json.dumps(resolved_target_dict(target), sort_keys=True)
    return default_cache_dir() / "tuning" / f"{target.name}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


class TuningDatabase:
    """A meta_schedule JSON database in a directory, with what it was made for in meta.json.

    A database made for another target, TVM or prune2tvm version is refused, never mixed.
    """

    def __init__(self, path: str | os.PathLike, target: TargetConfig, create: bool = True):
        self.path = Path(path)
        self.target_dict = resolved_target_dict(target)
        meta_path = self.path / META_NAME
        expected = {"format_version": DB_FORMAT_VERSION, "target": self.target_dict, "tvm_version": tvm.__version__,
                    "prune2tvm_version": prune2tvm.__version__}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                raise InputError(f"{meta_path}: unreadable tuning database metadata; remove the directory to start over") from None
            for key in ("format_version", "target", "tvm_version", "prune2tvm_version"):
                if meta.get(key) != expected[key]:
                    raise UnsupportedError(f"tuning database {self.path} was made for {key.replace('_', ' ')} "
                                           f"{meta.get(key)!r}, not {expected[key]!r}; use another --db directory")
        elif create:
            ensure_writable_dir(self.path)
            write_json(meta_path, expected)
        else:
            raise InputError(f"{self.path}: no tuning database here ({META_NAME} is missing)")
        for name in ("workloads.json", "records.json"):
            _set_aside_broken_lines(self.path / name)
        self.ms = ms.database.JSONDatabase(path_workload=str(self.path / "workloads.json"),
                                           path_tuning_record=str(self.path / "records.json"),
                                           allow_missing=True)

    def best_seconds(self, mod: tvm.IRModule, target: tvm.target.Target) -> float | None:
        if not self.ms.has_workload(mod):
            return None
        records = self.ms.get_top_k(self.ms.commit_workload(mod), 1)
        if not records or not records[0].run_secs:
            return None
        return float(np.mean([float(s) for s in records[0].run_secs]))


def _set_aside_broken_lines(path: Path) -> None:
    """A tuning run killed while appending leaves a partial last line: keep every complete
    line, move the broken ones to ``<name>.corrupt-<time>`` beside it, and say so."""
    if not path.exists():
        return
    good, bad = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except ValueError:
            bad.append(line)
    if not bad:
        return
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.write_text("\n".join(bad) + "\n")
    from prune2tvm.fsutil import write_text

    write_text(path, "".join(line + "\n" for line in good))
    say(f"  {path}: {len(bad)} unreadable line(s) (an interrupted run?) moved to {aside.name}; "
        f"{len(good)} complete record(s) kept")


def prepare_passes(target: tvm.target.Target) -> list:
    """Legalize and fuse, as both tuning and the tuned build do (so records match)."""
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = relax_pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    return [*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


@dataclass
class TaskReport:
    name: str
    weight: int
    status: str  # "tuned", "already tuned", "hand-scheduled"
    trials: int
    before_us: float | None
    after_us: float | None

    def to_json(self) -> dict:
        return asdict(self)


def tune_module(mod: tvm.IRModule, target: TargetConfig, db: TuningDatabase, trials: int,
                trials_per_task: int | None = None, trials_per_round: int = 8) -> list[TaskReport]:
    """Tune every task of ``mod`` not yet in ``db``, within ``trials`` measurements in all."""
    ok, why = target.runs_here()
    if not ok:
        raise UnsupportedError(f"tuning measures candidates on the device, and {target.name} cannot run here ({why}); "
                               "tuning on a remote device through TVM RPC (--rpc-tracker) is not available yet")
    if trials < 1 or (trials_per_task is not None and trials_per_task < 1):
        raise InputError("--trials and --trials-per-task must be positive")
    tgt = tvm_target(target)
    with tgt:
        prepared = tvm.transform.Sequential(prepare_passes(tgt))(mod)
    tasks = ms.relax_integration.extract_tasks(prepared, tgt)
    reports, todo = [], []
    for task in tasks:
        func = task.dispatched[0]["main"]
        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            reports.append(TaskReport(task.task_name, task.weight, "hand-scheduled", 0, None, None))
            continue
        best = db.best_seconds(task.dispatched[0], tgt)
        if best is not None:
            reports.append(TaskReport(task.task_name, task.weight, "already tuned", 0, None, best * 1e6))
            continue
        todo.append((task, TaskReport(task.task_name, task.weight, "tuned", 0,
                                      _untuned_us(task.dispatched[0], target), None)))
    if todo:
        budget = trials if trials_per_task is None else min(trials, trials_per_task * len(todo))
        say(f"  tuning {len(todo)} task(s) with {budget} trials ({trials_per_round} per round); "
            f"{len(reports)} task(s) need none")
        if not os.environ.get("PRUNE2TVM_TUNE_VERBOSE"):  # meta_schedule logs every step to the console
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="prune2tvm-tune-") as work_dir:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [t for t, _ in todo], work_dir, num_threads="physical")
            callbacks = ms.measure_callback.MeasureCallback.create("default") + [
                _progress_callback([t.task_name for t, _ in todo], budget)]
            start = time.perf_counter()
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=budget,
                          max_trials_per_task=trials_per_task, num_trials_per_iter=trials_per_round,
                          database=db.ms, measure_callbacks=callbacks)
            say(f"  tuned in {time.perf_counter() - start:.0f} s")
        for task, report in todo:
            best = db.best_seconds(task.dispatched[0], tgt)
            report.after_us = None if best is None else best * 1e6
            report.trials = _trial_count(db, task.dispatched[0])
            reports.append(report)
    return reports


def _progress_callback(names: list[str], total: int):
    """Prints a line per batch of measurements: trials so far and the best latency of the task."""
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(runner_results)
            times = [float(np.mean([float(t) for t in r.run_secs])) for r in runner_results
                     if r.error_msg is None and r.run_secs]
            if times:
                self.best[task_id] = min(times + ([self.best[task_id]] if task_id in self.best else []))
            best = f"best {self.best[task_id] * 1e6:.1f} us" if task_id in self.best else "no valid candidate yet"
            say(f"  trials {self.done}/{total}: {names[task_id]} {best}")

    return Progress()


def _trial_count(db: TuningDatabase, mod: tvm.IRModule) -> int:
    if not db.ms.has_workload(mod):
        return 0
    return len(db.ms.get_top_k(db.ms.commit_workload(mod), 10**6))


def _untuned_us(mod: tvm.IRModule, target: TargetConfig) -> float | None:
    """The task's latency as TVM builds it without tuning (random inputs)."""
    try:
        lib = tvm.compile(mod, tvm_target(target))
        dev = device(target)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.random([int(d) for d in info.shape]).astype(str(info.dtype)), dev)
                for info in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
        timer = lib.jit().time_evaluator("main", dev, number=1, repeat=3, min_repeat_ms=20)
        return float(np.median(timer(*args).results) * 1e6)
    except Exception:  # a task that cannot be run on its own: report no "before" figure
        return None


def render_task_table(reports: list[TaskReport]) -> str:
    lines = ["| task | weight | status | trials | untuned us | tuned us |", "|---|---:|---|---:|---:|---:|"]
    for r in reports:
        before = "-" if r.before_us is None else f"{r.before_us:.1f}"
        after = "-" if r.after_us is None else f"{r.after_us:.1f}"
        lines.append(f"| {r.name} | {r.weight} | {r.status} | {r.trials} | {before} | {after} |")
    return "\n".join(lines)


def build_with_database(mod: tvm.IRModule, target: TargetConfig, db: TuningDatabase):
    """tvm.compile with the database's best schedules applied to the fused functions."""
    from tvm.relax import pipeline as relax_pipeline
    from tvm.relax.transform import MetaScheduleApplyDatabase

    tgt = tvm_target(target)
    try:
        lower = relax_pipeline.dataflow_lower_passes(tgt) + relax_pipeline.finalize_passes(tgt)
    except (ValueError, AttributeError):  # 0.27's CPU backend lacks the first; TVM's compile_relax does the same
        lower = [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
                 relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
                 relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(),
                 relax.transform.KillAfterLastUse(), relax.transform.LowerRuntimeBuiltin(),
                 relax.transform.ComputePrimValue(), relax.transform.VMShapeLower(),
                 relax.transform.AttachGlobalSymbol()]

    @tvm.transform.module_pass(opt_level=3, name="Prune2TVMTunedPipeline")
    def pipeline(module, _ctx):
        module = tvm.transform.Sequential(prepare_passes(tgt))(module)
        module = MetaScheduleApplyDatabase(enable_warning=False)(module)
        if target.kind == "cuda":
            from tvm.s_tir import dlight as dl

            module = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                             dl.gpu.GeneralReduction(), dl.gpu.Fallback())(module)
        return tvm.transform.Sequential(lower)(module)

    with tgt, db.ms, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, tgt, relax_pipeline=pipeline)
