"""``prune2tvm run PIPELINE``: every stage, one after the other, for each variant.

  1. data      load and split the dataset (seeded)
  2. train     train the dense model (seeded, deterministic)
  3. prune     one AGP fine-tuning per final sparsity, masks held
  4. export    each variant to ONNX, checked against torch with onnxruntime
  5. compile   each ONNX with TVM for the target, checked against onnxruntime
  6. evaluate  test accuracy with torch, onnxruntime and TVM, each really run
  7. measure   TVM and onnxruntime latency, side by side
  8. report    report.json, report.md, accuracy_vs_latency.png

The run directory is built under a temporary name and swapped into place when complete.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

import prune2tvm
from prune2tvm.config import PipelineConfig, TargetConfig, load_target
from prune2tvm.errors import OutputExistsError, UnsupportedError
from prune2tvm.fsutil import ensure_writable_dir, staged_dir
from prune2tvm.progress import phase, say

CHECK_BATCH = 64  # real samples used to check export and compile numerics
TEST_SPLIT_X = "data/test_x.npy"  # the test split, as the runtime takes it
TEST_SPLIT_Y = "data/test_y.npy"


@dataclass
class RunOptions:
    target: str | None = None  # overrides compile.target
    output: str | None = None  # overrides the pipeline's output directory
    force: bool = False
    data_path: str | None = None  # overrides data.path
    checkpoint: str | None = None  # overrides model.checkpoint


def resolve(cfg: PipelineConfig, options: RunOptions) -> tuple[TargetConfig, Path]:
    target = load_target(options.target or cfg.compile.target)
    out_dir = Path(options.output) if options.output else cfg.output_dir
    return target, out_dir


def describe(cfg: PipelineConfig, target: TargetConfig, out_dir: Path, source: str) -> str:
    """The resolved configuration, shown before any expensive work."""
    shown = {"pipeline": source, "output": str(out_dir), "target": {k: v for k, v in target.to_dict().items()
                                                                    if v not in (None, [], "")}}
    shown.update({k: v for k, v in cfg.to_dict().items() if k not in ("output",)})
    return yaml.safe_dump(shown, sort_keys=False, default_flow_style=None).rstrip()


def with_overrides(cfg: PipelineConfig, data_path: str | None, checkpoint: str | None) -> PipelineConfig:
    """``--data-path`` and ``--checkpoint`` over the pipeline's data.path and model.checkpoint."""
    import dataclasses

    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    if checkpoint is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=checkpoint))
    return cfg


def run_pipeline(cfg: PipelineConfig, options: RunOptions, source: str = "") -> Path:
    cfg = with_overrides(cfg, options.data_path, options.checkpoint)
    check_starting_point(cfg)
    target, out_dir = resolve(cfg, options)
    from prune2tvm.distributed import init_from_env, world

    if init_from_env() and world()[0] != 0:  # under torchrun: train alongside rank 0, write nothing
        train_and_prune(cfg)
        return out_dir
    runs, why = target.runs_here()
    if not runs:
        raise UnsupportedError(f"target {target.name} cannot be evaluated on this machine ({why}); "
                               "'run' measures accuracy and latency, so it needs a target that runs here "
                               "(see 'prune2tvm targets list')")
    ensure_writable_dir(out_dir.parent)
    if out_dir.exists() and not options.force:
        raise OutputExistsError(f"results already exist at {out_dir}; pass --force to replace them")
    if cfg.prune.sensitivity is not None:  # a bad file stops the run before training, not after
        from prune2tvm.prune.sensitivity import read_csv

        read_csv(cfg.prune.sensitivity.file)
    say("Resolved configuration:\n" + describe(cfg, target, out_dir, source))
    from prune2tvm.resume import ModelStore

    store = ModelStore.beside(out_dir, cfg)
    with store.locked(f"another run is writing {out_dir}; wait for it or pass -o DIR"):
        for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # a killed run's; ours is locked
            shutil.rmtree(stale, ignore_errors=True)
        try:
            with staged_dir(out_dir, force=options.force) as stage:
                # under torchrun every process must train the same models: no resuming there
                _run_stages(cfg, target, stage, source, store if world()[1] == 1 else None)
        except BaseException:
            kept = store.kept()
            if kept:
                say(f"the models trained so far ({', '.join(kept)}) are kept in {store.root}; "
                    "the same run starts from them")
            raise
        store.remove()  # complete: nothing left to resume
    say(f"Report: {out_dir / 'report.md'}")
    return out_dir


def check_starting_point(cfg: PipelineConfig) -> None:
    """The dense model must come from somewhere: training, a checkpoint, or (synthetic data,
    latency only) random weights."""
    from prune2tvm.errors import ConfigError, InputError

    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).is_file():
        raise InputError(f"model.checkpoint: {cfg.model.checkpoint} is not a file")
    from prune2tvm.data.files import EXPECTED, check_directory

    if cfg.data.dataset in EXPECTED:
        check_directory(cfg.data.dataset, cfg.data.path)
    if cfg.train.epochs == 0 and cfg.model.checkpoint is None and not cfg.data.synthetic:
        raise ConfigError("train.epochs: 0 trains nothing and there is no model.checkpoint to start from; "
                          "valid: epochs >= 1, or give model.checkpoint (or --checkpoint)")


def load_data(cfg: PipelineConfig):
    from prune2tvm.data import load_configured

    with phase("data", f"{cfg.data.dataset}, split {cfg.data.split}, seed {cfg.seed}"):
        data = load_configured(cfg.data, cfg.seed)
        say(f"  train {len(data.train)}, val {len(data.val)}, test {len(data.test)} samples of shape {data.input_shape}")
    return data


def random_init(cfg: PipelineConfig) -> str | None:
    """How a random-weight dense model (synthetic data, no checkpoint, no training) is made
    beyond its seed, for the keys of cached models; None for any other model."""
    if cfg.data.synthetic and not cfg.model.checkpoint and cfg.train.epochs == 0:
        return "batchnorm-calibrated"
    return None


def train_dense(cfg: PipelineConfig, data=None):
    """The pipeline's data (loaded unless given) and its dense model (from model.checkpoint if
    given, then trained for train.epochs), in eval mode; also what ``prune2tvm sensitivity``
    analyses."""
    from prune2tvm.models import build_model
    from prune2tvm.train import calibrate_batchnorm, make_optimizer, seed_everything, train_epochs

    if data is None:
        data = load_data(cfg)
    start = f" from {cfg.model.checkpoint}" if cfg.model.checkpoint else ""
    with phase("train", f"dense {cfg.model.name}{start} for {cfg.train.epochs} epochs"):
        seed_everything(cfg.seed)
        dense = build_model(cfg.model.name, data.input_shape, data.num_classes)
        if cfg.model.checkpoint:
            from prune2tvm.checkpoint import load_state_dict

            load_state_dict(dense, cfg.model.checkpoint)
        history = train_epochs(dense, data.train, data.val, cfg.train, cfg.train.epochs, cfg.seed,
                               make_optimizer(dense, cfg.train), desc="train dense")
        if history:
            say(f"  loss {history[-1].loss:.4f}, val accuracy {history[-1].val_accuracy:.4f}")
        if random_init(cfg):
            calibrated = calibrate_batchnorm(dense, data.train.x)
            if calibrated:
                say(f"  random weights: {calibrated} batch-norm layers calibrated on the synthetic train split, "
                    "so the output depends on the input")
        dense.eval()
    return labelled(cfg, data, dense), dense, history


def labelled(cfg: PipelineConfig, data, dense):
    """``data`` as evaluated: synthetic inputs have no labels, so the dense model's classes
    stand in for them."""
    if not cfg.data.synthetic:
        return data
    from prune2tvm.data.synthetic import relabel
    from prune2tvm.train import predict_torch

    say("  synthetic data: labels are the dense model's predictions, so accuracy is agreement with it")
    return relabel(data, lambda x: predict_torch(dense, x))


def train_and_prune(cfg: PipelineConfig, store=None):
    """Data, the dense model, and every pruned variant: the stages that train. Under torchrun
    every process runs these (DistributedDataParallel keeps them identical); only rank 0 goes
    on to export, compile, measure and report. With a ``ModelStore``, each model is kept as
    soon as it is trained and models an interrupted run kept are taken instead of training."""
    from prune2tvm.prune.agp_prune import PruneResult
    from prune2tvm.prune.masks import layer_sparsity

    data = load_data(cfg)
    kept = store.dense(cfg, data.input_shape, data.num_classes) if store else None
    if kept is not None:
        dense, history = kept
        data = labelled(cfg, data, dense)
    else:
        data, dense, history = train_dense(cfg, data)
        if store:
            store.save_dense(dense, history)
    variants = [PruneResult("dense", dense, 0.0, layer_sparsity(dense, cfg.prune.layers), history)]
    for final in cfg.prune.sparsities:
        name = f"{cfg.prune.method}-{round(100 * final)}"
        result = store.variant(name, cfg, data.input_shape, data.num_classes) if store else None
        if result is None:  # each variant is pruned from the dense model under its own seed
            result = prune_variant(cfg.prune, cfg.train, cfg.seed, dense, data, final, name)
            if store:
                store.save_variant(result)
        variants.append(result)

    if cfg.prune.sensitivity is not None:
        variants += _sensitivity_variants(cfg, dense, data)

    return data, variants


def prune_variant(prune, train, seed: int, dense, data, final: float, name: str):
    """One pruned variant of ``dense`` by ``prune.method`` to ``final`` sparsity."""
    from prune2tvm.prune.agp_prune import agp_prune, oneshot_prune
    from prune2tvm.prune.filters import filter_prune
    from prune2tvm.prune.gsm import gsm_prune
    from prune2tvm.train import seed_everything

    gsm = prune.method == "gsm"
    what = (f"{'GSM' if gsm else 'AGP'} on {prune.granularity_spec()}, {'global' if gsm else prune.scope} "
            f"scope{', filters rearranged' if prune.does_rearrange else ''}, to {final}, "
            f"{prune.fine_tune_epochs} fine-tuning epochs")
    if prune.method == "filter":
        what = f"{final} of the filters by {prune.criterion} ({prune.scope} scope) thinned, " \
               f"{prune.fine_tune_epochs} fine-tuning epochs"
    if prune.method == "oneshot":
        what = f"one shot by magnitude on {prune.granularity_spec()}, {prune.scope} scope, to {final}, no fine-tuning"
    with phase("prune", f"{name}: {what}"):
        seed_everything(seed)
        method = {"gsm": gsm_prune, "filter": filter_prune, "oneshot": oneshot_prune}.get(prune.method, agp_prune)
        result = method(dense, data, prune, train, final, seed, name)
        for layer, why in result.skipped.items():
            say(f"  {layer}: {why}")
        tail = f", val accuracy {result.history[-1].val_accuracy:.4f}" if result.history else ""
        say(f"  measured sparsity {result.sparsity:.4f}{tail}")
    return result


def sparsify_options(block: list[int] | tuple[int, int], threshold, dense_kernel: str = "packed"):
    """BSR rewrite options for a block and a threshold (a number, or "auto": measure each layer)."""
    from prune2tvm.compile.build import SparsifyOptions

    auto = threshold == "auto"
    return SparsifyOptions(tuple(block), 0.0 if auto else threshold, auto=auto, dense_kernel=dense_kernel)


def compile_options(compile_cfg, target):
    """The pipeline's ``compile:`` section as the build's SparsifyOptions (None: TVM's ops only)."""
    from prune2tvm.compile.build import dense_options

    bsr = compile_cfg.bsr
    if bsr is None:
        return dense_options(compile_cfg.dense_kernel, target)
    return sparsify_options(bsr.block, bsr.threshold, compile_cfg.dense_kernel)


def save_test_split(directory: Path, data) -> None:
    """The test split, as ``python -m prune2tvm.runtime`` takes it, to reproduce the accuracy."""
    import numpy as np

    from prune2tvm.fsutil import atomic_path

    for rel, array in ((TEST_SPLIT_X, data.test.x), (TEST_SPLIT_Y, data.test.y)):
        with atomic_path(directory / rel) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)


def build_variant(vdir: Path, name: str, model, plan, data, cfg: PipelineConfig, target: TargetConfig,
                  sparsify, database=None, tune_trials: int = 0):
    """A variant's files in ``vdir``: model.pt, plan.json, model.onnx (checked against torch)
    and tvm/ (the artifact, checked against onnxruntime). Returns (onnx model, compiled model).
    With ``tune_trials``, the tasks of what stays dense that ``database`` lacks are tuned first."""
    import numpy as np

    from prune2tvm.compile import compile_onnx
    from prune2tvm.export import export_onnx

    check_x = data.test.x[:CHECK_BATCH]
    batch = cfg.measure.batch_size
    _save_checkpoint(model, vdir / "model.pt")
    if plan is not None:  # which units were removed, re-applicable to a fresh model
        plan.save(vdir / "plan.json")
    with phase("export", f"{name} -> ONNX opset {cfg.export.opset}"):
        onnx_model = export_onnx(model, data.input_shape, vdir / "model.onnx", cfg.export.opset, check_x)
    shapes = {onnx_model.input_name: [batch, *data.input_shape]}
    prepared = None
    if tune_trials and database is not None:
        from prune2tvm.compile.build import prepare_module
        from prune2tvm.compile.tune import tune_prepared

        def prepare():
            return prepare_module(onnx_model.path, target, shapes, sparsify, database, cfg.compile.fast_math)

        prepared = prepare()
        with phase("tune", f"{name}: the dense kernels' new tasks, {tune_trials} trials at most, then the BSR "
                           f"kernels' parameters; records in {database.path}"):
            prepared = tune_prepared(prepared, prepare, target, database, tune_trials)[0]
    compiled = compile_onnx(onnx_model.path, target, shapes,
                            real_feeds={onnx_model.input_name: np.resize(check_x, (batch, *check_x.shape[1:]))},
                            seed=cfg.seed, sparsify=sparsify, fast_math=cfg.compile.fast_math, database=database,
                            prepared=prepared)
    compiled.save(vdir / "tvm")
    return onnx_model, compiled


def record_variant_measurements(tvm_dir: Path, accuracy: float, samples: int, stats: dict, batch: int,
                                threads: int, target: TargetConfig) -> None:
    """What was measured on the artifact, in its manifest."""
    from prune2tvm.artifact import record_measurements

    record_measurements(tvm_dir, {
        "accuracy": accuracy, "accuracy_on": f"{TEST_SPLIT_X} ({samples} samples, labels in {TEST_SPLIT_Y})",
        "latency_ms": {"median": stats["tvm"].median, "p90": stats["tvm"].p90},
        "onnxruntime_latency_ms": {"median": stats["onnxruntime"].median, "p90": stats["onnxruntime"].p90},
        "batch_size": batch, "threads": threads, "target": target.name})


def _run_stages(cfg: PipelineConfig, target: TargetConfig, stage: Path, source: str, store=None) -> None:
    import numpy as np
    import onnxruntime
    import torch

    from prune2tvm.measure.accuracy import agreement, predict_batched
    from prune2tvm.measure.latency import measure_interleaved
    from prune2tvm.onnxrt import session
    from prune2tvm.prune.summary import sparsity_summary
    from prune2tvm.report import Report, Variant, write_report
    from prune2tvm.train import accuracy, predict_torch

    threads = target.threads or os.cpu_count() or 1
    sparsify = compile_options(cfg.compile, target)
    data, variants = train_and_prune(cfg, store)

    x_test, y_test = data.test.x, data.test.y
    batch = cfg.measure.batch_size
    bench_x = np.ascontiguousarray(np.resize(x_test, (batch, *x_test.shape[1:])))
    save_test_split(stage, data)
    report_variants = []
    for result in variants:
        vdir = stage / "variants" / result.name
        vdir.mkdir(parents=True)
        onnx_model, compiled = build_variant(vdir, result.name, result.model, result.plan, data, cfg, target, sparsify)
        ort = session(onnx_model.path, threads=threads)
        with phase("evaluate", f"{result.name}: test accuracy with torch, onnxruntime and TVM"):
            preds = {
                "torch": predict_torch(result.model, x_test),
                "onnxruntime": ort.run(None, {onnx_model.input_name: x_test})[0].argmax(1),
                "tvm": predict_batched(lambda xb: compiled.run({onnx_model.input_name: xb})[0], x_test, batch),
            }
            acc = {k: accuracy(p, y_test) for k, p in preds.items()}
            agree = {k: agreement(p, preds["torch"]) for k, p in preds.items() if k != "torch"}
            say("  " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
        with phase("measure", f"{result.name}: batch {batch}, {cfg.measure.repeat} calls each"):
            feeds = {onnx_model.input_name: bench_x}
            stats = measure_interleaved({"tvm": compiled.bind(feeds),
                                         "onnxruntime": lambda: ort.run(None, feeds)},
                                        cfg.measure.warmup, cfg.measure.repeat, cfg.measure.rounds,
                                        desc=f"latency {result.name}")
            say("  " + ", ".join(f"{k} {s.median:.3f} ms (p90 {s.p90:.3f})" for k, s in stats.items()))
        record_variant_measurements(vdir / "tvm", acc["tvm"], len(y_test), stats, batch, threads, target)
        report_variants.append(Variant(
            name=result.name,
            method="dense" if result.name == "dense" else cfg.prune.method,
            target_sparsity=result.target_sparsity,
            sparsity=result.sparsity,
            accuracy=acc,
            agreement=agree,
            latency_ms={k: s.to_json() for k, s in stats.items()},
            layers=[layer.to_json() for layer in result.layers],
            summary=sparsity_summary(result.model, data.input_shape, tuple(cfg.prune.block)),
            files={"checkpoint": f"variants/{result.name}/model.pt", "onnx": f"variants/{result.name}/model.onnx",
                   "tvm": f"variants/{result.name}/tvm"},
            checks={"export_max_abs_diff": onnx_model.max_abs_diff,
                    "compile": [vars(c) for c in compiled.info.checks]},
            compiled_layers=compiled.info.layers,
        ))

    report = Report(
        pipeline=cfg.name,
        target={"name": target.name, "tvm": compiled.info.tvm_target, "threads": threads},
        tvm_version=compiled.info.tvm_version,
        batch_size=batch,
        variants=report_variants,
        pipeline_file=source,
        prune2tvm_version=prune2tvm.__version__,
        torch_version=torch.__version__,
        onnxruntime_version=onnxruntime.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        notes=[_build_note(cfg.compile.bsr, sparsify)],
        config=cfg.to_dict(),
    )
    with phase("report", "report.json, report.md, accuracy_vs_latency.png"):
        write_report(report, stage)


def _build_note(bsr, sparsify) -> str:
    untuned = "TVM's default (untuned) schedules; autotuning is not applied in this run"
    packed = sparsify is not None and sparsify.dense_kernel == "packed"
    dense = (f"prune2tvm's packed dense kernel (TVM's ops, with {untuned}, where no panel fits and for "
             "everything else)" if packed else f"TVM's ops with {untuned}")
    if bsr is None:
        return f"TVM builds run their linear and conv layers with {dense}."
    rule = ("is faster as BSR when measured on the target" if bsr.threshold == "auto"
            else f"has at least {bsr.threshold:g} of its {bsr.block[0]}x{bsr.block[1]} blocks all zero")
    return (f"TVM builds run each linear and conv layer that {rule} as prune2tvm's BSR kernels; "
            f"other layers with {dense}.")


def _sensitivity_variants(cfg: PipelineConfig, dense, data) -> list:
    """One AGP variant per tolerance, each layer to the target its sensitivity allows."""
    from prune2tvm.errors import ConfigError
    from prune2tvm.prune.agp_prune import agp_prune, pruning_layers
    from prune2tvm.prune.sensitivity import layer_targets, read_csv
    from prune2tvm.train import seed_everything

    sens = cfg.prune.sensitivity
    points = read_csv(sens.file)
    layers, _ = pruning_layers(dense, cfg.prune, cfg.prune.granularity_spec())
    unknown = sorted({p.layer for p in points} - set(layers))
    if unknown:
        raise ConfigError(f"{sens.file}: layers {', '.join(unknown)} are not prunable layers of {cfg.model.name}; "
                          f"valid: {', '.join(layers)}")
    results = []
    for tolerance in sens.tolerances:
        targets = layer_targets(points, tolerance)
        name = f"agp-sens{100 * tolerance:g}"
        listed = ", ".join(f"{n} {t:.2f}" for n, t in targets.items())
        with phase("prune", f"{name}: AGP to per-layer targets within {100 * tolerance:g} % accuracy "
                            f"({sens.mode} mode): {listed}"):
            seed_everything(cfg.seed)
            result = agp_prune(dense, data, cfg.prune, cfg.train, 0.0, cfg.seed, name, targets=targets)
            say(f"  measured sparsity {result.sparsity:.4f}, val accuracy {result.history[-1].val_accuracy:.4f}")
        results.append(result)
    return results


def _save_checkpoint(model, path: Path) -> None:
    """A plain state dict (loadable with ``torch.load(..., weights_only=True)``)."""
    import torch

    from prune2tvm.fsutil import atomic_path

    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
