"""Autotuning with meta_schedule: one persistent database per target, reused across runs.

Tasks are the fused TIR functions of the (already BSR-rewritten) module, prepared exactly as
the build prepares them, so a record found here applies at build time. prune2tvm's BSR
kernels are hand-scheduled: meta_schedule cannot search kernels with data-dependent loops,
so they are not tuning tasks here. A task that already has records in the database is not
tuned again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

import prune2tvm
from prune2tvm import interrupt
from prune2tvm.compile.cpu_schedules import cpu_schedules
from prune2tvm.compile.remote import RpcDevice
from prune2tvm.compile.target import device, resolved_target_dict, tvm_target
from prune2tvm.config import TargetConfig
from prune2tvm.errors import InputError, UnsupportedError
from prune2tvm.fsutil import ensure_writable_dir, removed_if_interrupted, write_json
from prune2tvm.progress import say

DB_FORMAT_VERSION = 1
META_NAME = "meta.json"
FINISHED_NAME = "finished.json"  # tasks whose tuning ran to the end (others are resumed)


def _task_hash(mod: tvm.IRModule) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):x}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRUNE2TVM_CACHE", Path.home() / ".cache" / "prune2tvm"))


def database_dir(target: TargetConfig, override: str | os.PathLike | None = None) -> Path:
    """``override``, or the cache's directory for this target (named and hashed by its dict)."""
    if override:
        return Path(override)
    spec = json.dumps(resolved_target_dict(target), sort_keys=True)
    return default_cache_dir() / "tuning" / f"{target.name}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def open_database(target: TargetConfig, db_dir: str | os.PathLike | None, create: bool):
    """The tuning database to use: ``db_dir``, else the target's default one if it exists
    (or is to be created)."""
    path = database_dir(target, db_dir)
    if not create and not (path / META_NAME).exists():
        if db_dir:
            raise InputError(f"--db {db_dir}: no tuning database there (run 'prune2tvm tune ... --db {db_dir}' first)")
        return None
    return TuningDatabase(path, target, create=create)


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
                    made = f"was made for {key.replace('_', ' ')} {meta[key]!r}" if key in meta else f"has no {key} recorded"
                    raise UnsupportedError(f"tuning database {self.path} {made}, not {expected[key]!r}; "
                                           "use another --db directory")
        elif create:
            ensure_writable_dir(self.path)
            write_json(self.path / FINISHED_NAME, [])
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


    def _finished(self) -> set[str] | None:
        """Structural hashes of the tasks whose tuning ran to the end; None for a database
        made before this was kept (where any record means finished)."""
        path = self.path / FINISHED_NAME
        if not path.exists():
            return None
        try:
            return set(json.loads(path.read_text()))
        except ValueError:
            return set()  # unreadable: tasks are resumed, nothing is lost

    def is_finished(self, mod: tvm.IRModule) -> bool:
        finished = self._finished()
        return finished is None or _task_hash(mod) in finished

    def mark_finished(self, mods: list[tvm.IRModule]) -> None:
        finished = self._finished() or set()
        write_json(self.path / FINISHED_NAME, sorted(finished | {_task_hash(m) for m in mods}))

    def keep_untuned(self, mod: tvm.IRModule, target: tvm.target.Target, seconds: float) -> None:
        """Record TVM's default (untuned) schedule of ``mod`` with its measured time, so that
        a build applies it rather than a tuned record that measured slower."""
        from tvm.s_tir import Schedule

        schedule = Schedule(mod)
        # a record whose trace has no instruction is never returned by the database's queries (so
        # the build took the best tuned record, slower than this one): one that changes nothing
        schedule.get_sblock("root", func_name="main")
        self.ms.commit_tuning_record(ms.database.TuningRecord(
            trace=schedule.trace, workload=self.ms.commit_workload(mod), run_secs=[seconds], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


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


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None) -> tvm.runtime.Module:
    """meta_schedule's default build, less its ``import tvm.s_tir.tensor_intrin``.

    The builder starts fresh worker processes for every round of candidates, and that import
    (it parses every tensor intrinsic of every backend as TVMScript, CUDA's alone 18 s) cost
    about 26 s per round on the 2-core machines, nearly all of a round's time. The candidates
    arrive already scheduled (a tensorized block holds the intrinsic's body), so building them
    does not need the intrinsics registered. Used on CPU targets.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


@dataclass
class TaskReport:
    name: str
    weight: int
    status: str  # "tuned", "untuned kept (faster)", "already tuned", "hand-scheduled", "not reached (budget spent)"
    trials: int
    before_us: float | None
    after_us: float | None

    def to_json(self) -> dict:
        return asdict(self)


def tune_module(mod: tvm.IRModule, target: TargetConfig, db: TuningDatabase, trials: int,
                trials_per_task: int | None = None, trials_per_round: int = 8, time_limit_s: float | None = None,
                rpc: RpcDevice | None = None, extra_modules: list[tvm.IRModule] = ()) -> list[TaskReport]:
    """Tune every task of ``mod`` (and of ``extra_modules``: e.g. the dense layers that
    ``--sparsity auto`` compares BSR with) not yet in ``db``, within ``trials`` measurements in all and,
    if given, ``time_limit_s`` seconds (the round in flight when it runs out is finished and
    kept). With ``rpc``, candidates are built here and measured on the devices under the
    tracker's key, as many in parallel as there are devices."""
    if trials < 1 or (trials_per_task is not None and trials_per_task < 1):
        raise InputError("--trials and --trials-per-task must be positive")
    if time_limit_s is not None and time_limit_s <= 0:
        raise InputError(f"--time-limit {time_limit_s} must be positive (seconds)")
    check_can_measure(target, rpc)
    devices = rpc.wait_for_devices() if rpc is not None else 1
    tgt = tvm_target(target)
    tasks = _tasks([mod, *extra_modules], tgt)
    reports, todo = [], []
    for task in tasks:
        if _hand_scheduled(task):
            reports.append(TaskReport(task.task_name, task.weight, "hand-scheduled", 0, None, None))
            continue
        best = db.best_seconds(task.dispatched[0], tgt)
        if best is not None and db.is_finished(task.dispatched[0]):
            reports.append(TaskReport(task.task_name, task.weight, "already tuned", 0, None, best * 1e6))
            continue
        # a task with records but not finished was interrupted (Ctrl-C, a kill, a time limit):
        # it is tuned on, its search seeded from the records it has
        earlier = _trial_count(db, task.dispatched[0])
        todo.append((task, TaskReport(task.task_name, task.weight, f"resumed after {earlier}" if earlier else "tuned",
                                      0, _untuned_us(task.dispatched[0], target, rpc), None), earlier))
    if todo:
        budget = trials if trials_per_task is None else min(trials, trials_per_task * len(todo))
        where = f" on {devices} device(s) under key {rpc.key!r} at {rpc.address}" if rpc is not None else ""
        limit = f", at most {time_limit_s:.0f} s" if time_limit_s is not None else ""
        say(f"  tuning {len(todo)} task(s) with {budget} trials ({trials_per_round} per round{limit}){where}; "
            f"{len(reports)} task(s) need none")
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        # a previous tuning in this process left its handlers (files in a deleted work dir, some
        # unnamed, which meta_schedule's logging config then fails on): start clean
        for handler in list(ms_logger.handlers):
            ms_logger.removeHandler(handler)
            handler.close()
        if not os.environ.get("PRUNE2TVM_TUNE_VERBOSE"):  # meta_schedule logs every step to the console
            ms_logger.setLevel(logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="prune2tvm-tune-") as work_dir:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [t for t, _, _ in todo], work_dir, num_threads="physical")
            start = time.perf_counter()
            progress = _progress_callback([t.task_name for t, _, _ in todo], budget, start, time_limit_s)
            callbacks = ms.measure_callback.MeasureCallback.create("default") + [progress]
            # builder and runner inside: they start worker processes, which must inherit its signal mask
            with _ctrl_c_stops_at_once(db.path, work_dir):
                runner = "local"
                # CUDA keeps meta_schedule's own build (unmeasured on a GPU here)
                builder = "local" if target.kind == "cuda" else ms.builder.LocalBuilder(f_build=build_candidate)
                if rpc is not None:
                    runner = ms.runner.RPCRunner(rpc_config=rpc.ms_config(), max_workers=devices,
                                                 evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                                            min_repeat_ms=40))
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=budget,
                              max_trials_per_task=trials_per_task, num_trials_per_iter=trials_per_round,
                              database=db.ms, measure_callbacks=callbacks, builder=builder, runner=runner)
            say(f"  tuned in {time.perf_counter() - start:.0f} s")
        for task_id, (task, report, _) in enumerate(todo):
            best = db.best_seconds(task.dispatched[0], tgt)
            report.after_us = None if best is None else best * 1e6
            report.trials = progress.trials.get(task_id, 0)
            if report.trials == 0:
                # the budget was spent before this task's turn: left unfinished, the next run tunes it
                report.status = "not reached (budget spent)"
            elif target.kind != "cuda" and report.before_us is not None and (
                    report.after_us is None or report.after_us > report.before_us):
                # on CPU the untuned function is a valid schedule: keep it when no candidate beat it
                db.keep_untuned(task.dispatched[0], tgt, report.before_us * 1e-6)
                report.status = "untuned kept (faster)"
                report.after_us = report.before_us
            reports.append(report)
        if not progress.stopped:  # a task stopped by the time limit is resumed by the next run
            db.mark_finished([task.dispatched[0] for task, report, _ in todo if report.trials > 0])
    return reports


def tune_prepared(prepared, prepare_again, target: TargetConfig, db: TuningDatabase, trials: int,
                  rpc: RpcDevice | None = None, **options):
    """``tune_module`` for a ``prepare_module`` result: under ``--sparsity auto`` also the dense
    forms its measured layers were compared with, after which the model is prepared again
    (``prepare_again()``) so the decisions use the tuned times. Then, on CPUs, the parameter
    search of its BSR and packed dense kernels, and prepared again with what it found.
    Returns (prepared, task reports, BSR kernel reports)."""
    reports = tune_module(prepared.mod, target, db, trials, extra_modules=prepared.dense_probes, rpc=rpc, **options)
    if prepared.dense_probes:
        prepared = prepare_again()
    bsr_reports = []
    if prepared.bsr_kernels and target.kind != "cuda":
        from prune2tvm.compile.bsr_tune import BsrRecords, tune_bsr_kernels

        bsr_reports = tune_bsr_kernels(prepared.bsr_kernels, target, BsrRecords.open(db.path), rpc)
        if any(r.status == "tuned" for r in bsr_reports):  # rebuild the kernels with what was found
            prepared = prepare_again()
    return prepared, reports, bsr_reports


def _tasks(mods: list[tvm.IRModule], tgt) -> list:
    """meta_schedule's tasks of ``mods``, prepared as the build prepares them; a workload that
    several modules share is one task."""
    tasks, seen = [], set()
    for mod in mods:
        with tgt:
            prepared = tvm.transform.Sequential(prepare_passes(tgt))(mod)
        for task in ms.relax_integration.extract_tasks(prepared, tgt):
            key = _task_hash(task.dispatched[0])
            if key not in seen:
                seen.add(key)
                tasks.append(task)
    return tasks


def workload_key(mod: tvm.IRModule, target: TargetConfig) -> tuple[str, ...]:
    """The tasks ``mod`` compiles to, by hash: equal for modules whose kernels are the same,
    whatever the values of their constants (which the kernels take as arguments)."""
    return tuple(sorted(_task_hash(task.dispatched[0]) for task in _tasks([mod], tvm_target(target))))


def has_tuned_schedules(mod: tvm.IRModule, target: TargetConfig, db: TuningDatabase) -> bool:
    """Whether ``db`` has a schedule for every task of ``mod`` (the BSR kernels, hand-scheduled,
    need none)."""
    tgt = tvm_target(target)
    return all(_hand_scheduled(task) or db.best_seconds(task.dispatched[0], tgt) is not None
               for task in _tasks([mod], tgt))


def _hand_scheduled(task) -> bool:
    """prune2tvm's own kernels (BSR, depthwise) come scheduled: meta_schedule has nothing to tune."""
    func = task.dispatched[0]["main"]
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def check_can_measure(target: TargetConfig, rpc: RpcDevice | None) -> None:
    """Tuning measures candidates on the device: here, or through an RPC tracker (which must
    answer now, before anything is written)."""
    if rpc is not None:
        rpc.summary()
        return
    ok, why = target.runs_here()
    if ok:
        return
    if target.kind == "cuda":
        raise UnsupportedError(f"tuning for {target.name} measures on an NVIDIA GPU and this machine has none; "
                               "on the GPU machine run python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY, "
                               "then tune here with --rpc-tracker HOST:PORT --rpc-key KEY (make tune TARGET=cuda "
                               "RPC_TRACKER=HOST:PORT RPC_KEY=KEY)")
    raise UnsupportedError(f"tuning for {target.name} measures on the device, which is not this machine ({why}); "
                           "run python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY on the device, then "
                           "tune here with --rpc-tracker HOST:PORT --rpc-key KEY")


@contextlib.contextmanager
def _ctrl_c_stops_at_once(db_path: Path, work_dir: str):
    """Ctrl-C while meta_schedule runs: stop the process at once, as a kill would.

    A KeyboardInterrupt unwinding through TVM's C++ task scheduler can crash the process
    (seen: a segfault mid-round). The database is safe against a kill (records are appended
    one line at a time, and a line cut short is set aside on the next open), so the stop ends
    the builder and runner workers, removes the scratch directory, says where the records are
    and exits with 130. It acts from a watcher thread (``interrupt.on_sigint``): the main thread
    can spend many seconds in TVM's C++ search, where no Python handler runs (CI once waited
    more than 10 s).

    The worker processes, which a terminal's Ctrl-C reaches too, are started with SIGINT
    blocked (a thread's signal mask passes to the threads it starts and the processes they
    spawn), so none of them prints a KeyboardInterrupt traceback: the stop kills them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_):
        interrupt.stop_now(f"interrupted: the records measured so far are kept in {db_path}; run the same command "
                           "to resume")

    old_handler = signal.signal(signal.SIGINT, stop)
    try:
        with removed_if_interrupted(Path(work_dir)), interrupt.on_sigint(stop):  # its watcher starts before the mask below, so SIGINT reaches it
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                yield
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    finally:
        signal.signal(signal.SIGINT, old_handler)


def _progress_callback(names: list[str], total: int, start: float, time_limit_s: float | None):
    """Prints a line per batch of measurements: trials so far and the best latency of the task;
    ends tuning (every task) once ``time_limit_s`` has passed."""
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.stopped = False
            self.trials: dict[int, int] = {}  # candidates measured, per task
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(runner_results)
            self.trials[task_id] = self.trials.get(task_id, 0) + len(runner_results)
            times = [float(np.mean([float(t) for t in r.run_secs])) for r in runner_results
                     if r.error_msg is None and r.run_secs]
            if times:
                self.best[task_id] = min(times + ([self.best[task_id]] if task_id in self.best else []))
            best = f"best {self.best[task_id] * 1e6:.1f} us" if task_id in self.best else "no valid candidate yet"
            say(f"  trials {self.done}/{total}: {names[task_id]} {best}")
            if time_limit_s is not None and time.perf_counter() - start >= time_limit_s and not self.stopped:
                self.stopped = True
                say(f"  time limit of {time_limit_s:.0f} s reached after {self.done} trials: stopping")
                for i in range(len(names)):
                    task_scheduler.terminate_task(i)

    return Progress()


def _trial_count(db: TuningDatabase, mod: tvm.IRModule) -> int:
    if not db.ms.has_workload(mod):
        return 0
    return len(db.ms.get_top_k(db.ms.commit_workload(mod), 10**6))


def load_where_measured(lib, target: TargetConfig, session=None):
    """(module, device) of a built kernel: here, or, given an RPC ``session``, on the remote
    device (exported as object files, linked by the RPC server there)."""
    if session is None:
        return lib.jit(), device(target)
    with tempfile.TemporaryDirectory(prefix="prune2tvm-kernel-") as tmp:
        path = Path(tmp) / "kernel.tar"
        lib.mod.export_library(str(path))
        session.upload(str(path))
    return session.load_module("kernel.tar"), session.device(device(target).dlpack_device_type(), 0)


def _untuned_us(mod: tvm.IRModule, target: TargetConfig, rpc: RpcDevice | None = None) -> float | None:
    """The task's latency as TVM builds it without tuning (random inputs), here or on the
    RPC device."""
    try:
        lib = tvm.compile(mod, tvm_target(target))
        rng = np.random.default_rng(0)
        values = [rng.random([int(d) for d in info.shape]).astype(str(info.dtype))
                  for info in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
        module, dev = load_where_measured(lib, target, rpc.session() if rpc is not None else None)
        args = [tvm.runtime.tensor(v, dev) for v in values]
        timer = module.time_evaluator("main", dev, number=1, repeat=3, min_repeat_ms=20)
        return float(np.median(timer(*args).results) * 1e6)
    except Exception:  # a task that cannot be run on its own: report no "before" figure
        return None


def format_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_task_table(reports: list[TaskReport]) -> str:
    lines = ["| task | weight | status | trials | untuned us | tuned us |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.weight} | {r.status} | {r.trials} | {format_us(r.before_us)} | {format_us(r.after_us)} |"
              for r in reports]
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
        else:  # what the database has no record for, as the untuned build schedules it
            module = cpu_schedules()(module)
        return tvm.transform.Sequential(lower)(module)

    with tgt, db.ms, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, tgt, relax_pipeline=pipeline)
