"""The ``prune2tvm`` command: one function per verb; each parses its options and calls the
library (heavy imports happen inside the verb, so ``--help`` is instant)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from prune2tvm import __version__, interrupt
from prune2tvm.errors import InputError, OutputExistsError, Prune2TVMError
from prune2tvm.onnx_input import parse_shape, require_file


class _Group(click.Group):
    """Turns a ``Prune2TVMError`` or a usage error into one line on stderr and exit status 2
    (a bug: 1); Ctrl-C into 130."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            _usage_line(exc)

    def invoke(self, ctx: click.Context):
        try:
            with _watch_ctrl_c():
                return super().invoke(ctx)
        except click.UsageError as exc:
            _usage_line(exc)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            _stop_interrupted(ctx)
        except Prune2TVMError as exc:
            if _CTRL_C["seen"]:
                _stop_interrupted(ctx)
            if _debug(ctx):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except Exception as exc:  # a bug in prune2tvm: still one line unless --debug
            if _CTRL_C["seen"]:
                _stop_interrupted(ctx)
            if _debug(ctx):
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


_CTRL_C = {"seen": False}
CTRL_C_GRACE_S = 3.0  # after Ctrl-C, the verb unwinds (its finally blocks) or is ended this much later


@contextlib.contextmanager
def _watch_ctrl_c():
    """Remember a Ctrl-C: TVM's C++ code turns the KeyboardInterrupt raised inside a callback
    into a RuntimeError, which must still read as an interruption.

    The KeyboardInterrupt is raised only once the main thread runs Python code again, which a
    long ``tvm.compile`` can delay by minutes; if the verb has not unwound ``CTRL_C_GRACE_S``
    after the Ctrl-C, it is ended from a watcher thread, as a kill would end it but removing
    what it was writing. A Ctrl-C that lands inside an import is raised just after the import
    (``_importing``)."""
    if threading.current_thread() is not threading.main_thread() or _CTRL_C.get("installed"):
        yield
        return

    def handler(signum, frame):
        _CTRL_C["seen"] = True
        if _importing(frame):
            _interrupt_after_import()
            return
        signal.default_int_handler(signum, frame)

    unwound = threading.Event()

    def end_if_stuck():
        if not unwound.wait(CTRL_C_GRACE_S):
            interrupt.stop_now("interrupted; finished results were kept, nothing half-written")

    old = signal.signal(signal.SIGINT, handler)
    _CTRL_C.update(seen=False, installed=True)
    try:
        with interrupt.on_sigint(end_if_stuck):
            try:
                yield
            finally:
                unwound.set()
    finally:
        signal.signal(signal.SIGINT, old)
        _CTRL_C["installed"] = False


_IMPORT_FRAMES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import. A KeyboardInterrupt raised there can end the
    process with SIGABRT instead of unwinding: a C extension whose initialisation calls Python
    code (onnx's builds Python enums) terminates when that code raises."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FRAMES:
            return True
        frame = frame.f_back
    return False


def _interrupt_after_import():
    """Deliver SIGINT to the main thread again as soon as it has left the import machinery (a
    watcher thread polls its stack every 10 ms); the handler then raises KeyboardInterrupt."""
    if _CTRL_C.get("deferred"):
        return
    _CTRL_C["deferred"] = True
    main = threading.main_thread()

    def redeliver():
        while main.is_alive() and _importing(sys._current_frames().get(main.ident)):
            time.sleep(0.01)
        _CTRL_C["deferred"] = False
        if main.is_alive() and _CTRL_C.get("installed"):  # else the verb has ended meanwhile
            signal.pthread_kill(main.ident, signal.SIGINT)

    threading.Thread(target=redeliver, name="prune2tvm-ctrl-c-after-import", daemon=True).start()


def _stop_interrupted(ctx: click.Context):
    click.echo("interrupted; finished results were kept, nothing half-written", err=True)
    ctx.exit(130)


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, Exception) and _CTRL_C["seen"])


def _usage_line(exc: click.UsageError):
    """click's usage errors print three lines (usage, hint, error); ours print one."""
    command = exc.ctx.command_path if exc.ctx else "prune2tvm"
    message = " ".join(exc.format_message().split())
    click.echo(f"error: {message} (see '{command} --help')", err=True)
    raise click.exceptions.Exit(2)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or bool(os.environ.get("PRUNE2TVM_DEBUG"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="prune2tvm")
def cli(debug: bool) -> None:
    """Prune PyTorch models, compile them with Apache TVM, and measure what sparsity buys.

    Start with `prune2tvm run pipelines/digits.yaml`.
    """


def main() -> None:
    try:
        cli(prog_name="prune2tvm")
        code = 0
    except KeyboardInterrupt:  # before a verb started (imports, parsing)
        click.echo("interrupted", err=True)
        code = 130
    except SystemExit as exc:
        code = exc.code
    if code != 130:
        # Done, or failed on its own: a Ctrl-C from here on, in interpreter shutdown, has nothing
        # left to stop (a sweep interrupted just after writing its report ended by SIGINT, status -2).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(code)
    # Interrupted: leave now. Without this, an exit after Ctrl-C during training was seen to end
    # by SIGINT (status -2) in interpreter shutdown instead of with status 130.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


# --------------------------------------------------------------------------- run


@cli.command()
@click.argument("pipeline")
@click.option("--target", "-t", help="Target name or YAML file; overrides the pipeline's compile.target.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Run directory (default: runs/<name>).")
@click.option("--data-path", default=None, help="Overrides data.path (the directory of a file dataset).")
@click.option("--checkpoint", default=None, help="Overrides model.checkpoint (a state dict to start from).")
@click.option("--force", is_flag=True, help="Replace an existing run directory (only once the new one is complete).")
def run(pipeline: str, target: str | None, output: str | None, data_path: str | None, checkpoint: str | None,
        force: bool) -> None:
    """Run a pipeline file (or a shipped pipeline's name): train, prune, export, compile,
    evaluate, measure and report."""
    from prune2tvm.config import load_pipeline, resolve_named_file, PIPELINES_DIR
    from prune2tvm.pipeline import RunOptions, run_pipeline

    cfg = load_pipeline(pipeline)
    source = str(resolve_named_file(pipeline, PIPELINES_DIR, "pipeline"))
    out = run_pipeline(cfg, RunOptions(target=target, output=output, force=force, data_path=data_path,
                                       checkpoint=checkpoint), source=source)
    click.echo(f"wrote {out}/report.md, {out}/report.json, {out}/accuracy_vs_latency.png")


@cli.command()
@click.argument("pipeline")
@click.option("--sparsity", "-s", "sparsities", required=True,
              help="Final sparsities, comma-separated, each in (0, 1), e.g. 0.5,0.8,0.9.")
@click.option("--bsr", "blocks", default="1,4", show_default=True,
              help="Block sizes R (R x 1 blocks for pruning and BSR kernels; 1: element-wise), comma-separated.")
@click.option("--method", type=click.Choice(["agp", "1xN", "gsm", "filter", "oneshot"]), default=None,
              help="Pruning method (default: the pipeline's prune.method).")
@click.option("--target", "-t", help="Target name or YAML file; overrides the pipeline's compile.target.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Sweep directory (default: runs/<name>-sweep-<target>); a re-run there resumes.")
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=float,
              help="The per-layer view shows the fastest Pareto variant within this much of dense accuracy.")
@click.option("--data-path", default=None, help="Overrides data.path (the directory of a file dataset).")
@click.option("--checkpoint", default=None, help="Overrides model.checkpoint (a state dict to start from).")
@click.option("--db", "db_dir", type=click.Path(file_okay=False),
              help="Tuning database for the dense kernels (default: the target's, where 'prune2tvm tune' put it).")
@click.option("--no-db", is_flag=True, help="Build with TVM's default schedules even where a tuning database exists.")
@click.option("--tune-trials", type=int, default=0, show_default=True,
              help="Tune each variant's dense kernels (tasks not yet in the database) with this many trials "
                   "first, so TVM dense and the dense parts of sparse builds are tuned; 0: no tuning.")
@click.option("--force", is_flag=True, help="Recompute every variant instead of reusing stored ones.")
def sweep(pipeline: str, sparsities: str, blocks: str, method: str | None, target: str | None, output: str | None,
          max_accuracy_drop: float, data_path: str | None, checkpoint: str | None, db_dir: str | None, no_db: bool,
          tune_trials: int, force: bool) -> None:
    """Accuracy against measured latency over sparsities x block sizes on one target: prune,
    export, compile, verify, evaluate and measure each variant; report the Pareto front and
    where the time goes. Resumable: finished variants are reused."""
    from prune2tvm.config import PIPELINES_DIR, load_pipeline, resolve_named_file
    from prune2tvm.pipeline import with_overrides
    from prune2tvm.sweep import SweepOptions, parse_list, run_sweep

    cfg = with_overrides(load_pipeline(pipeline), data_path, checkpoint)
    source = str(resolve_named_file(pipeline, PIPELINES_DIR, "pipeline"))
    options = SweepOptions(parse_list(sparsities, "--sparsity"), parse_list(blocks, "--bsr", int), method, target,
                           output, force, max_accuracy_drop, db_dir, no_db, tune_trials)
    out = run_sweep(cfg, options, source)
    click.echo(f"wrote {out}/report.md, {out}/report.json, {out}/accuracy_vs_latency.png")


# --------------------------------------------------------------------------- stages


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_name", required=True, help="Model name from the zoo (see 'pipelines show').")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False),
              help="A plan.json written by a run (variants/<name>/plan.json).")
@click.option("--input-shape", default="1,8,8", show_default=True, help="One sample's shape C,H,W.")
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="State dict to write.")
@click.option("--summary", "show_summary", is_flag=True,
              help="Print the per-layer sparsity summary (NNZ, element/block/filter/channel sparsity, MACs).")
@click.option("--block", default="4,1", show_default=True, help="Block R,C for the summary's block sparsity.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def prune(checkpoint: str, model_name: str, plan_path: str, input_shape: str, num_classes: int, output: str,
          show_summary: bool, block: str, force: bool) -> None:
    """Apply a pruning plan to a (dense) checkpoint: thin, rearrange and mask as the plan says,
    and write the pruned state dict (fine-tuning is the pipeline's job)."""
    import torch

    from prune2tvm.checkpoint import load_state_dict
    from prune2tvm.fsutil import atomic_path
    from prune2tvm.models import build_model
    from prune2tvm.prune.plan import PruningPlan

    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it")
    shape = tuple(parse_shape(input_shape, "--input-shape"))
    model = build_model(model_name, shape, num_classes)
    load_state_dict(model, checkpoint)
    plan = PruningPlan.load(plan_path)
    masks = plan.apply(model, where=plan_path)
    with atomic_path(output) as tmp:
        torch.save(model.state_dict(), tmp)
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    thinned = f", {len(plan.thinned)} filter group(s) thinned" if plan.thinned else ""
    click.echo(f"wrote {output}: plan {plan.method}, {len(masks)} layer(s) masked, "
               f"{zeros / total if total else 0:.3f} of their weights zero{thinned}")
    if show_summary:
        from prune2tvm.prune.summary import render_summary, sparsity_summary

        block_rc = parse_shape(block, "--block")
        if len(block_rc) != 2:
            raise InputError(f"--block {block!r}: give R,C (two positive integers)")
        click.echo(render_summary(sparsity_summary(model, shape, tuple(block_rc))))


@cli.command()
@click.argument("pipeline")
@click.option("--levels", default="0.2,0.4,0.6,0.8,0.9", show_default=True,
              help="Sparsity levels to try on each layer alone.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory for sensitivity.csv and sensitivity.png.")
@click.option("--force", is_flag=True, help="Replace existing results.")
def sensitivity(pipeline: str, levels: str, output: str, force: bool) -> None:
    """Sensitivity analysis: train the pipeline's dense model, then prune each layer alone at
    each level (the pipeline's granularity) and record validation accuracy. Use the CSV in a
    pipeline with prune.sensitivity: {file: .../sensitivity.csv, tolerances: [0.01]}."""
    from prune2tvm.config import load_pipeline
    from prune2tvm.fsutil import staged_dir
    from prune2tvm.pipeline import train_dense
    from prune2tvm.prune.agp_prune import pruning_layers
    from prune2tvm.prune.sensitivity import layer_targets, plot, sweep, write_csv
    from prune2tvm.train import accuracy, predict_torch

    try:
        values = [float(v) for v in levels.split(",")]
    except ValueError:
        raise InputError(f"--levels {levels!r}: not a comma-separated list of numbers in (0, 1)") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise InputError(f"--levels {levels!r}: each level must be in (0, 1), e.g. 0.2,0.5,0.8")
    cfg = load_pipeline(pipeline)
    with staged_dir(output, force=force, what="sensitivity results") as stage:
        data, model, _ = train_dense(cfg)
        granularity = cfg.prune.granularity_spec()
        layers, skipped = pruning_layers(model, cfg.prune, granularity)
        for name, why in skipped.items():
            click.echo(f"  {name}: not swept ({why})")
        points = sweep(model, layers, lambda m: accuracy(predict_torch(m, data.val.x), data.val.y), values, granularity)
        write_csv(points, stage / "sensitivity.csv")
        plot(points, stage / "sensitivity.png", f"{cfg.name}: {granularity} pruned one layer at a time")
    for tolerance in (0.01, 0.03):
        targets = layer_targets(points, tolerance)
        click.echo(f"within {100 * tolerance:g} % of dense accuracy: "
                   + ", ".join(f"{n} {t:.2f}" for n, t in targets.items()))
    click.echo(f"wrote {output}/sensitivity.csv, {output}/sensitivity.png")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_name", required=True, help="Model name from the zoo (see 'pipelines show').")
@click.option("--input-shape", default="1,8,8", show_default=True, help="One sample's shape C,H,W.")
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--force", is_flag=True, help="Replace an existing ONNX file.")
def export(checkpoint: str, model_name: str, input_shape: str, num_classes: int, opset: int, output: str,
           force: bool) -> None:
    """Export a state-dict checkpoint to ONNX, checked against torch with onnxruntime."""
    shape = parse_shape(input_shape, "--input-shape")
    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it")
    import numpy as np

    from prune2tvm.checkpoint import load_state_dict
    from prune2tvm.export import export_onnx
    from prune2tvm.models import build_model

    model = build_model(model_name, tuple(shape), num_classes)
    load_state_dict(model, checkpoint)
    check = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    result = export_onnx(model, tuple(shape), output, opset, check)
    click.echo(f"wrote {output} (max abs diff vs torch {result.max_abs_diff:.2e})")


# compile's and tune's --dense-kernel (the values of build.DENSE_KERNELS, not imported here: it loads TVM)
DENSE_KERNEL_OPTION = click.option(
    "--dense-kernel", type=click.Choice(["packed", "tvm"]), default=None,
    help="On CPUs, what computes constant-weight layers that stay dense, and products of two activations "
         "(attention): packed (prune2tvm's kernels, close to onnxruntime untuned; the default) or tvm (TVM's ops, "
         "as fast as 'prune2tvm tune' makes them).")


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default=None, help="Target name or YAML file (default: x86, the host CPU).")
@click.option("--batch-size", "-b", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size the build is specialised for (the ONNX batch dimension).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Static shape of an input (overrides --batch-size for that input); repeatable.")
@click.option("--bsr", "block_rows", type=int, default=None,
              help="Block rows R (output channels, the N of 1xN): rewrite block-sparse layers into BSR kernels.")
@click.option("--bsc", "block_cols", type=int, default=1, show_default=True, help="Block columns C (inputs).")
@click.option("--sparsity", "threshold", default=None, show_default="0.5",
              help="With --bsr: a layer whose fraction of all-zero blocks is at least this becomes BSR; the rest stay dense. "
                   "'auto': measure each layer dense and as BSR on the target and keep the faster.")
@DENSE_KERNEL_OPTION
@click.option("--db", "db_dir", type=click.Path(file_okay=False),
              help="Tuning database to apply (default: the target's database in the cache, if there is one).")
@click.option("--no-db", is_flag=True, help="Build with TVM's default schedules even if a tuning database exists.")
@click.option("--include-tuning", is_flag=True, help="Put the tuning records used into the artifact (tuning/).")
@click.option("--fast-math", is_flag=True,
              help="Use TVM's fast approximations of erf, exp, tanh and softmax (still checked against onnxruntime).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def compile_(model: str, target: str | None, batch_size: int, input_shapes: tuple[str, ...], block_rows: int | None,
             block_cols: int, threshold: str | None, dense_kernel: str | None, db_dir: str | None, no_db: bool, include_tuning: bool, fast_math: bool,
             output: str, force: bool) -> None:
    """Compile an ONNX model with TVM, rewriting block-sparse layers into BSR kernels (with
    --bsr), check it against onnxruntime, and write the deployment artifact (model.so and
    manifest.json; 'prune2tvm package' bundles it)."""
    from prune2tvm.config import DEFAULT_TARGET, load_target
    from prune2tvm.fsutil import staged_dir

    tgt = load_target(target or DEFAULT_TARGET)
    sparsify = _sparsify_options(block_rows, block_cols, threshold, dense_kernel, tgt)
    shapes = _checked_onnx(model, batch_size, input_shapes)
    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.tune import open_database

    database = None if no_db else open_database(tgt, db_dir, create=False)
    with staged_dir(output, force=force, what="a compiled model") as stage:
        compiled = compile_onnx(model, tgt, shapes, sparsify=sparsify, database=database, fast_math=fast_math)
        compiled.save(stage, include_tuning=include_tuning)
    if compiled.info.layers:
        from prune2tvm.report.write import render_layer_table

        click.echo(render_layer_table(compiled.info.layers))
    status = "verified against onnxruntime" if compiled.info.verified else compiled.info.not_verified_reason
    worst = max((c.max_abs_diff for c in compiled.info.checks), default=None)
    click.echo(f"wrote {output} ({status}" + (f", max abs diff {worst:.2e})" if worst is not None else ")"))


def _sparsify_options(block_rows: int | None, block_cols: int, threshold: str | None, dense_kernel: str | None, target):
    """--bsr/--bsc/--sparsity/--dense-kernel -> SparsifyOptions, or None for a build with
    TVM's ops only (--dense-kernel tvm without --bsr, or a GPU target without --bsr: the packed
    kernel is for CPUs)."""
    from prune2tvm.compile.build import SparsifyOptions, dense_options

    dense_kernel = dense_kernel or "packed"
    value = _threshold("0.5" if threshold is None else threshold)
    if block_rows is None:
        if block_cols != 1:
            raise InputError("--bsc needs --bsr (the block rows); e.g. --bsr 4 --bsc 1")
        if threshold is not None:
            # without --bsr nothing is rewritten, so a threshold would be silently ignored
            raise InputError(f"--sparsity {threshold} needs --bsr (the block rows); e.g. --bsr 4 --sparsity {threshold}")
        return dense_options(dense_kernel, target)
    for option, size in (("--bsr", block_rows), ("--bsc", block_cols)):
        if size < 1:
            raise InputError(f"{option} {size} is not a valid block size; valid: a positive integer")
    if value == "auto":
        return SparsifyOptions((block_rows, block_cols), auto=True, dense_kernel=dense_kernel)
    return SparsifyOptions((block_rows, block_cols), value, dense_kernel=dense_kernel)


def _threshold(threshold: str) -> float | str:
    """--sparsity's value: a number in [0, 1], or "auto"."""
    if threshold == "auto":
        return threshold
    try:
        value = float(threshold)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise InputError(f"--sparsity {threshold} is not valid; valid: a number in [0, 1] or auto")
    return value


def _checked_onnx(path: str, batch_size: int, input_shapes: tuple[str, ...]) -> dict[str, list[int]]:
    """Static input shapes of a model that passed every check, the importer's ops included,
    before anything is written."""
    from prune2tvm.onnx_input import check_onnx_file, static_shapes

    model = check_onnx_file(path)
    shapes = static_shapes(path, model, batch_size, input_shapes)
    from prune2tvm.compile.frontend import check_importable

    check_importable(path, model)
    return shapes


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default=None, help="Target name or YAML file (default: x86, the host CPU).")
@click.option("--trials", default=64, show_default=True, type=click.IntRange(min=1),
              help="Measurements in all (tasks already in the database take none).")
@click.option("--trials-per-task", type=click.IntRange(min=1), default=None, help="At most this many per task.")
@click.option("--db", "db_dir", type=click.Path(file_okay=False),
              help="Tuning database directory (default: one per target under ~/.cache/prune2tvm/tuning).")
@click.option("--batch-size", "-b", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...")
@click.option("--bsr", "block_rows", type=int, default=None, help="Rewrite block-sparse layers first, as compile does.")
@click.option("--bsc", "block_cols", type=int, default=1, show_default=True)
@click.option("--sparsity", "threshold", default=None, show_default="0.5", help="As compile --sparsity.")
@DENSE_KERNEL_OPTION
@click.option("--fast-math", is_flag=True, help="As compile --fast-math.")
@click.option("--time-limit", "time_limit", type=float, default=None,
              help="Stop tuning after this many seconds (the round in flight is finished and kept).")
@click.option("--rpc-tracker", "rpc_tracker", default=None, metavar="HOST:PORT",
              help="Measure on the devices registered with this TVM RPC tracker (builds stay here).")
@click.option("--rpc-key", "rpc_key", default=None, help="The devices' key at the tracker.")
@click.option("--rpc-wait", "rpc_wait", default=60.0, show_default=True, type=float,
              help="Seconds to wait for a free device under the key.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory for the tuned build.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def tune(model: str, target: str | None, trials: int, trials_per_task: int | None, db_dir: str | None,
         batch_size: int, input_shapes: tuple[str, ...], block_rows: int | None, block_cols: int, threshold: str | None,
         dense_kernel: str | None, fast_math: bool, time_limit: float | None, rpc_tracker: str | None, rpc_key: str | None, rpc_wait: float,
         output: str, force: bool) -> None:
    """Tune a model's dense operators with meta_schedule into a persistent database, then
    build, verify and save the tuned model. Tasks already tuned are not tuned again."""
    from prune2tvm.config import DEFAULT_TARGET, load_target
    from prune2tvm.fsutil import staged_dir

    tgt = load_target(target or DEFAULT_TARGET)
    sparsify = _sparsify_options(block_rows, block_cols, threshold, dense_kernel, tgt)
    from prune2tvm.compile.remote import RpcDevice
    from prune2tvm.compile.tune import check_can_measure, open_database

    if rpc_key and not rpc_tracker:
        raise InputError("--rpc-key needs --rpc-tracker HOST:PORT")
    rpc = RpcDevice.parse(rpc_tracker, rpc_key, rpc_wait) if rpc_tracker else None
    check_can_measure(tgt, rpc)
    if time_limit is not None and time_limit <= 0:
        raise InputError(f"--time-limit {time_limit} must be positive (seconds)")
    if Path(output).exists() and not force:
        raise OutputExistsError(f"a compiled model already exists at {output}; pass --force to replace it")
    shapes = _checked_onnx(model, batch_size, input_shapes)
    database = open_database(tgt, db_dir, create=True)
    click.echo(f"tuning database: {database.path}")
    from prune2tvm.compile import compile_onnx
    from prune2tvm.compile.build import prepare_module
    from prune2tvm.compile.tune import render_task_table, tune_prepared

    def prepare():
        return prepare_module(model, tgt, shapes, sparsify, database, fast_math)

    prepared = prepare()
    try:
        prepared, reports, bsr_reports = tune_prepared(prepared, prepare, tgt, database, trials, rpc=rpc,
                                                       trials_per_task=trials_per_task, time_limit_s=time_limit)
        if prepared.bsr_kernels and tgt.kind == "cuda":
            click.echo(f"BSR kernels: no parameter search for {tgt.name} (the CUDA kernel has none)")
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        click.echo(f"interrupted: the records measured so far are kept in {database.path}; run the same command to "
                   "resume", err=True)
        sys.exit(130)
    with staged_dir(output, force=force, what="a compiled model") as stage:
        compiled = compile_onnx(model, tgt, shapes, sparsify=sparsify, database=database, prepared=prepared,
                                fast_math=fast_math)
        compiled.save(stage)
    click.echo(render_task_table(reports))
    if bsr_reports:
        from prune2tvm.compile.bsr_tune import render_bsr_table

        click.echo(render_bsr_table(bsr_reports))
    new = sum(r.trials for r in reports if r.status not in ("already tuned", "hand-scheduled"))
    new += sum(r.candidates for r in bsr_reports)
    click.echo(f"wrote {output} ({'verified against onnxruntime' if compiled.info.verified else 'not verified'}); "
               f"{new} new trials")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False),
              help="The ONNX model the build came from; onnxruntime runs it as the baseline.")
@click.option("--repeat", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
def bench(directory: str, onnx_path: str, repeat: int, warmup: int, rounds: int, json_path: str | None,
          force: bool) -> None:
    """Measure a compiled model against onnxruntime, interleaved in one process."""
    import numpy as np

    from prune2tvm.compile import load_compiled
    from prune2tvm.fsutil import ensure_writable_dir, sha256_file, write_json
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import random_feeds, session

    require_file(onnx_path, "ONNX model")
    if rounds > repeat:
        raise InputError(f"--rounds {rounds} exceeds --repeat {repeat}; valid: 1 <= rounds <= repeat")
    compiled = load_compiled(directory)
    if sha256_file(onnx_path) != compiled.info.onnx_sha256:
        raise InputError(f"{onnx_path} is not the model {directory} was compiled from (sha256 differs)")
    if json_path:  # checked before measuring, not after
        if Path(json_path).exists() and not force:
            raise OutputExistsError(f"{json_path} already exists; pass --force to replace it")
        ensure_writable_dir(Path(json_path).parent)
    rng = np.random.default_rng(0)
    feeds = random_feeds(compiled.inputs, rng)
    ort = session(onnx_path, threads=compiled.target.threads or os.cpu_count())
    stats = measure_interleaved({"tvm": compiled.bind(feeds), "onnxruntime": lambda: ort.run(None, feeds)},
                                warmup, repeat, rounds)
    speedup = stats["onnxruntime"].median / stats["tvm"].median
    for name, s in stats.items():
        click.echo(f"{name:12s} median {s.median:.4f} ms  p90 {s.p90:.4f} ms  ({s.samples} calls)")
    click.echo(f"speed-up (onnxruntime median / tvm median): {speedup:.2f}x")
    figures = {name: {"median_ms": s.median, "p90_ms": s.p90, "samples": s.samples}
               for name, s in stats.items()} | {"speedup": speedup}
    from prune2tvm.artifact import record_measurements

    record_measurements(directory, compiled.info.measured | {"bench": figures})  # the artifact carries its latency
    if json_path:
        write_json(json_path, figures)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False),
              help="The ONNX model the artifact was compiled from (its sha256 is checked).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False),
              help="Real inputs too: .npz keyed by input name, or .npy for a one-input model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs.")
@click.option("--rtol", default=1e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--atol", default=1e-5, show_default=True, type=click.FloatRange(min=0))
def verify(artifact: str, onnx_path: str, inputs_path: str | None, seed: int, rtol: float, atol: float) -> None:
    """Run an artifact (directory or .tar.gz) and onnxruntime on the same random and real
    inputs; report the max abs and relative difference; exit 2 when it is over tolerance.
    A directory's manifest records the result (packaging needs it)."""
    from prune2tvm.artifact import verify_artifact
    from prune2tvm.errors import NumericalMismatchError
    from prune2tvm.runtime import check_finite, read_inputs

    require_file(onnx_path, "ONNX model")
    real = None
    if inputs_path:
        from prune2tvm.onnxrt import session

        specs = [{"name": i.name} for i in session(onnx_path).get_inputs()]
        real = read_inputs(inputs_path, specs)
        check_finite(real, inputs_path)  # onnxruntime and TVM need not agree on NaN: nothing to verify
    checks = verify_artifact(artifact, onnx_path, real, seed, rtol, atol)
    for c in checks:
        click.echo(f"{c.inputs:6s} inputs, output {c.output}: max abs diff {c.max_abs_diff:.3g}, "
                   f"max rel diff {c.max_rel_diff:.3g} (tolerance {c.tolerance:.3g}) {'ok' if c.ok else 'FAILED'}")
    bad = [c for c in checks if not c.ok]
    if bad:
        raise NumericalMismatchError(f"{artifact} disagrees with onnxruntime on {bad[0].inputs} inputs, output "
                                     f"{bad[0].output!r}: max abs diff {bad[0].max_abs_diff:.3g} > {bad[0].tolerance:.3g}")
    click.echo(f"{artifact} agrees with onnxruntime")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="NAME.tar.gz to write.")
@click.option("--force", is_flag=True, help="Replace an existing file; package an unverified artifact.")
def package(directory: str, output: str, force: bool) -> None:
    """Bundle an artifact directory as NAME.tar.gz, after checking every file against its
    manifest; refuses an artifact not verified against onnxruntime unless --force."""
    from prune2tvm.artifact import package as make_package

    path = make_package(directory, output, force)
    click.echo(f"wrote {path} ({path.stat().st_size} bytes); run it with: python -m prune2tvm.runtime {path} "
               f"--inputs IN.npz --outputs OUT.npz")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="With several run directories: where comparison.md and comparison.png go (default: runs/comparison).")
@click.option("--force", is_flag=True, help="Replace an existing comparison.")
def report(run_dirs: tuple[str, ...], output: str | None, force: bool) -> None:
    """Regenerate report.md and the plot of each run or sweep directory from its report.json;
    with several, also put them side by side (e.g. one sweep per target)."""
    from prune2tvm.errors import OutputExistsError
    from prune2tvm.report import load_report, write_report
    from prune2tvm.report.sweep import COMPARE_MD, write_comparison

    reports = [load_report(run_dir) for run_dir in run_dirs]  # all read before anything is written
    if len(reports) > 1:
        out = Path(output or "runs/comparison")
        if (out / COMPARE_MD).exists() and not force:
            raise OutputExistsError(f"a comparison already exists at {out}; pass --force to replace it, or -o DIR")
    elif output:
        raise click.UsageError("--output goes with several run directories (a comparison); "
                               "one run's report is regenerated in place")
    for run_dir, loaded in zip(run_dirs, reports):
        written = write_report(loaded, run_dir)
        click.echo("wrote " + ", ".join(str(p) for p in written))
    if len(reports) > 1:
        written = write_comparison(reports, list(run_dirs), out)
        click.echo("wrote " + ", ".join(str(p) for p in written))


# --------------------------------------------------------------------------- catalogues


@cli.group(cls=_Group)
def targets() -> None:
    """Hardware targets shipped in targets/ (or given as YAML files)."""


@targets.command(name="list")
def targets_list() -> None:
    """List the shipped targets, and whether each runs on this machine."""
    from prune2tvm.config import TARGETS_DIR, available, load_target

    for name in available(TARGETS_DIR):
        target = load_target(name)
        ok, why = target.runs_here()
        click.echo(f"{name:14s} {'runs here' if ok else 'build only':10s}  {target.description}"
                   + ("" if ok else f" ({why})"))


@targets.command(name="show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Show a target file and the TVM target it resolves to on this machine."""
    import yaml

    from prune2tvm.config import load_target

    target = load_target(name)
    click.echo(yaml.safe_dump({k: v for k, v in target.to_dict().items()}, sort_keys=False).rstrip())
    from prune2tvm.compile.target import resolved_target_dict

    click.echo(f"resolved tvm target: {json.dumps(resolved_target_dict(target))}")
    ok, why = target.runs_here()
    click.echo("runs on this machine: " + ("yes" if ok else f"no, {why}"))


@cli.group(cls=_Group)
def pipelines() -> None:
    """Pipeline files shipped in pipelines/ (or given as YAML files)."""


@pipelines.command(name="list")
def pipelines_list() -> None:
    """List the shipped pipelines."""
    from prune2tvm.config import PIPELINES_DIR, available, load_pipeline

    names = available(PIPELINES_DIR)
    width = max(map(len, names), default=0)
    for name in names:
        cfg = load_pipeline(name)
        click.echo(f"{name:{width}s}  {cfg.description}")


@pipelines.command(name="show")
@click.argument("name")
def pipelines_show(name: str) -> None:
    """Show a pipeline with every default filled in."""
    import yaml

    from prune2tvm.config import load_pipeline

    click.echo(yaml.safe_dump(load_pipeline(name).to_dict(), sort_keys=False, default_flow_style=None).rstrip())


@cli.command()
def env() -> None:
    """Versions of the toolchain, CPU features and CUDA compiler on this machine."""
    from prune2tvm.environment import collect

    for key, value in collect().items():
        click.echo(f"{key:18s} {value}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
