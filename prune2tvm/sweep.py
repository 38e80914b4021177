"""``prune2tvm sweep PIPELINE``: accuracy against measured latency over a grid of final
sparsities and block sizes, all on one target, in one resumable run.

For each sparsity S and block size R of the grid, the variant is the pipeline's dense model
pruned by the method to S (R = 1: element-wise; R > 1: R x 1 blocks, the 1xN pattern),
exported to ONNX, compiled with R x 1 BSR kernels, checked against onnxruntime, evaluated
(top-1, and top-5 with more than 5 classes, with torch, onnxruntime and TVM) and measured:
TVM sparse, TVM dense (the dense model's TVM build) and onnxruntime dense in alternating
rounds in one process, then each layer's kernel time.

The run directory caches everything by configuration:

  <dir>/sweep.json           the configuration every stored result belongs to
  <dir>/dense-model/         the trained dense model (model.pt, history.json)
  <dir>/variants/<name>/     one finished variant: model.pt, model.onnx, tvm/, result.json
  <dir>/report.json, report.md, accuracy_vs_latency.png

A variant's directory is built under a temporary name and renamed when complete, so an
interrupted sweep keeps every finished variant, and the next run computes only what is
missing: the variants of a new grid point, and any stored one that fails its checks
(unreadable result, another configuration, an artifact whose files do not match their
checksums), which is said and recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import prune2tvm
from prune2tvm.config import PipelineConfig, PruneConfig, TargetConfig, load_target
from prune2tvm.errors import ConfigError, InputError, OutputExistsError, Prune2TVMError, UnsupportedError
from prune2tvm.fsutil import ensure_writable_dir, staged_dir, write_json
from prune2tvm.progress import phase, say

SWEEP_JSON = "sweep.json"
SWEEP_FORMAT = 1
RESULT_JSON = "result.json"
METHODS = ("agp", "1xN", "gsm", "filter", "oneshot")
DEFAULT_THRESHOLD = 0.5  # compile threshold when the pipeline has no compile.bsr


@dataclass
class SweepOptions:
    sparsities: list[float]
    blocks: list[int]  # R of the R x 1 blocks; 1: element-wise
    method: str | None = None  # default: the pipeline's prune.method
    target: str | None = None
    output: str | None = None
    force: bool = False  # recompute every variant
    max_accuracy_drop: float = 0.01
    db_dir: str | None = None  # tuning database (default: the target's, if it exists)
    no_db: bool = False
    tune_trials: int = 0  # tune each variant's dense kernels (meta_schedule) with this budget first


@dataclass
class VariantSpec:
    name: str
    sparsity: float
    block: int
    prune: PruneConfig | None  # None: the dense model
    error: str | None = None  # the method cannot make this variant


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def parse_list(text: str, option: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of "
                          f"{'numbers' if kind is float else 'integers'}; e.g. {'0.5,0.8,0.9' if kind is float else '1,4'}") from None
    if not values:
        raise ConfigError(f"{option}: empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{option}: {text!r} repeats a value")
    return values


def check_options(options: SweepOptions) -> None:
    for s in options.sparsities:
        if not 0.0 < s < 1.0:
            raise ConfigError(f"--sparsity: {s} is out of range; valid: 0 < S < 1 (the dense model is always measured)")
    for b in options.blocks:
        if b < 1:
            raise ConfigError(f"--bsr: {b} is not a block size; valid: positive integers (1: element-wise)")
    if options.method is not None and options.method not in METHODS:
        raise ConfigError(f"--method: {options.method!r} is not a method; valid: {', '.join(METHODS)}")
    if not 0.0 <= options.max_accuracy_drop <= 1.0:
        raise ConfigError(f"--max-accuracy-drop: {options.max_accuracy_drop} is out of range; valid: 0 to 1")
    if options.tune_trials < 0:
        raise ConfigError(f"--tune-trials: {options.tune_trials} is out of range; valid: 0 (no tuning) or more")
    if options.tune_trials and options.no_db:
        raise ConfigError("--tune-trials needs a tuning database to keep its records; drop --no-db")


def plan_variants(cfg: PipelineConfig, options: SweepOptions) -> list[VariantSpec]:
    """The dense variant, then one per (sparsity, block), with the method's prune config or
    the reason it cannot make that variant."""
    method = options.method or cfg.prune.method
    specs = [VariantSpec("dense", 0.0, 1, None)]
    for block in options.blocks:
        for s in options.sparsities:
            name = f"{method}-{round(100 * s)}-{block}x1"
            changes = {"method": method, "sparsities": [s], "sensitivity": None, "block": [block, 1]}
            if method in ("agp", "gsm", "oneshot"):
                changes["granularity"] = "element" if block == 1 else "block"
            elif method == "1xN":
                changes["granularity"] = "block"
            prune = dataclasses.replace(cfg.prune, **changes)
            error = None
            try:
                prune.check("prune.")
            except ConfigError as exc:
                error = f"method {method} cannot make {block}x1 blocks at {s}: {exc}"
            specs.append(VariantSpec(name, s, block, prune, error))
    return specs


class Sweep:
    def __init__(self, cfg: PipelineConfig, options: SweepOptions, source: str = ""):
        from prune2tvm.pipeline import check_starting_point

        check_options(options)
        check_starting_point(cfg)
        self.cfg, self.options, self.source = cfg, options, source
        self.target: TargetConfig = load_target(options.target or cfg.compile.target)
        runs, why = self.target.runs_here()
        if not runs:
            raise UnsupportedError(f"target {self.target.name} cannot be measured on this machine ({why}); a sweep "
                                   "measures accuracy and latency, so it needs a target that runs here")
        self.out = Path(options.output) if options.output else Path("runs") / f"{cfg.name}-sweep-{self.target.name}"
        self.specs = plan_variants(cfg, options)
        bsr = cfg.compile.bsr
        self.threshold = bsr.threshold if bsr is not None else DEFAULT_THRESHOLD
        base = {k: v for k, v in cfg.to_dict().items() if k not in ("prune", "name", "description", "output")}
        base["model_checkpoint_sha256"] = _file_digest(cfg.model.checkpoint)
        from prune2tvm.pipeline import random_init

        init = random_init(cfg)
        if init:
            base["random_init"] = init
        self.dense_key = _hash({"format": SWEEP_FORMAT, "data": base["data"], "model": base["model"],
                                "train": base["train"], "seed": cfg.seed, "ckpt": base["model_checkpoint_sha256"],
                                **({"init": init} if init else {})})
        from prune2tvm.compile.tune import open_database

        self.database = None if options.no_db else open_database(self.target, options.db_dir,
                                                                 create=options.tune_trials > 0)
        self.base = {"format": SWEEP_FORMAT, "config": base, "threshold": self.threshold,
                     "database": None if self.database is None else str(self.database.path),
                     **({"tune_trials": options.tune_trials} if options.tune_trials else {}),
                     "target": self.target.to_dict() | {"path": ""}, "prune2tvm": prune2tvm.__version__}
        self.base_key = _hash(self.base)

    # ------------------------------------------------------------------ keys and the cache

    def key(self, spec: VariantSpec) -> str:
        prune = None if spec.prune is None else dataclasses.asdict(spec.prune)
        return _hash({"base": self.base_key, "prune": prune, "block": spec.block})

    def stored(self, spec: VariantSpec):
        """The stored result of ``spec`` if it is complete and sound; None if absent; says why
        and returns None if it is unusable."""
        from prune2tvm.report import Variant
        from prune2tvm.runtime import check_files, read_manifest

        vdir = self.out / "variants" / spec.name
        if not vdir.exists():
            return None
        try:
            try:
                data = json.loads((vdir / RESULT_JSON).read_text())
            except ValueError:
                raise ValueError(f"{RESULT_JSON} is not valid JSON") from None
            if not isinstance(data, dict):
                raise ValueError(f"{RESULT_JSON} is not a result")
            if data.get("key") != self.key(spec):
                raise ValueError("computed from another configuration")
            variant = Variant(**data["variant"])
            if variant.error is None:
                check_files(vdir / "tvm", read_manifest(vdir / "tvm"), str(vdir / "tvm"))
                for f in ("model.onnx", "model.pt"):
                    if not (vdir / f).is_file():
                        raise ValueError(f"{f} is missing")
            return variant
        except (OSError, ValueError, TypeError, KeyError, Prune2TVMError) as exc:
            say(f"  {vdir}: stored result unusable ({str(exc).splitlines()[0] or type(exc).__name__}); recomputing")
            return None

    @contextlib.contextmanager
    def _locked(self):
        ensure_writable_dir(self.out)
        with open(self.out / ".sweep.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"another sweep is running in {self.out}; wait for it or pass -o DIR") from None
            yield

    def _check_directory(self) -> None:
        path = self.out / SWEEP_JSON
        if not path.exists():
            if (self.out / "variants").exists() and not self.options.force:
                raise OutputExistsError(f"{self.out} holds results but no {SWEEP_JSON}; pass --force to replace them")
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            say(f"  {path}: unreadable; stored variants are checked one by one")
            return
        if old.get("base_key") != self.base_key and not self.options.force:
            changed = _changed(old.get("base", {}), self.base)
            raise OutputExistsError(f"{self.out} holds a sweep of another configuration (changed: {changed}); "
                                    "pass --force to recompute its variants, or -o DIR for a new sweep")

    # ------------------------------------------------------------------ the run

    def run(self) -> Path:
        from prune2tvm.pipeline import describe

        with self._locked():
            self._check_directory()
            for stale in (self.out / "variants").glob(".*.partial-*") if (self.out / "variants").exists() else []:
                shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted sweep
            write_json(self.out / SWEEP_JSON, {"base_key": self.base_key, "base": self.base,
                                               "variants": [s.name for s in self.specs]})
            say("Resolved configuration:\n" + describe(self.cfg, self.target, self.out, self.source))
            grid = ", ".join(s.name for s in self.specs)
            say(f"Sweep: {len(self.specs)} variants on {self.target.name}: {grid}")
            return self._run()

    def _run(self) -> Path:
        results = {}
        todo = []
        for spec in self.specs:
            found = None if self.options.force else self.stored(spec)
            if found is not None:
                results[spec.name] = found
            else:
                todo.append(spec)
        if results:
            say(f"  reused from {self.out / 'variants'}: {', '.join(results)}")
        if todo:
            say(f"  to compute: {', '.join(s.name for s in todo)}")
            self._compute(todo, results)
        self._write_report([results[s.name] for s in self.specs])
        return self.out

    def _dense_model(self, data):
        """The data as evaluated and the trained dense model, from the cache if it was trained
        with this configuration."""
        from prune2tvm.checkpoint import load_state_dict
        from prune2tvm.models import build_model
        from prune2tvm.pipeline import _save_checkpoint, labelled, train_dense

        cache = self.out / "dense-model"
        try:
            if json.loads((cache / "key.json").read_text())["key"] == self.dense_key:
                model = build_model(self.cfg.model.name, data.input_shape, data.num_classes)
                load_state_dict(model, cache / "model.pt")
                say(f"  dense model: reused {cache / 'model.pt'}")
                return labelled(self.cfg, data, model.eval()), model
        except (OSError, ValueError, KeyError, Prune2TVMError):
            pass
        data, dense, history = train_dense(self.cfg, data)
        with staged_dir(cache, force=True, what="dense model") as stage:
            _save_checkpoint(dense, stage / "model.pt")
            write_json(stage / "history.json", [dataclasses.asdict(h) for h in history])
            write_json(stage / "key.json", {"key": self.dense_key})
        return data, dense

    def _compute(self, todo: list[VariantSpec], results: dict) -> None:
        from prune2tvm.pipeline import load_data, save_test_split

        data, dense = self._dense_model(load_data(self.cfg))
        save_test_split(self.out, data)
        dense_logits = self._logits(dense, data.test.x)  # what each variant's fidelity compares with
        if todo[0].prune is None:  # the dense variant: every other one is measured beside it
            results["dense"] = self._variant(todo.pop(0), dense, data, None, dense_logits)
        baseline = self._baseline() if todo else None
        for spec in todo:
            if spec.error is not None:
                say(f"  {spec.name}: {spec.error}")
                results[spec.name] = self._failed(spec, spec.error)
                continue
            try:
                results[spec.name] = self._variant(spec, dense, data, baseline, dense_logits)
            except (Prune2TVMError, ValueError, RuntimeError) as exc:  # this variant cannot be made; the sweep goes on
                message = str(exc).splitlines()[0]
                say(f"  {spec.name}: failed: {message}")
                results[spec.name] = self._failed(spec, message)

    @staticmethod
    def _logits(model, x):
        import torch

        from prune2tvm.measure.accuracy import logits_batched

        with torch.no_grad():
            return logits_batched(lambda xb: model(torch.from_numpy(xb)).numpy(), x, 256)

    def _baseline(self):
        """The dense variant's TVM build and onnxruntime session, measured beside every variant."""
        from prune2tvm.compile.build import load_compiled
        from prune2tvm.onnxrt import session

        vdir = self.out / "variants" / "dense"
        return load_compiled(vdir / "tvm", self.target), session(vdir / "model.onnx", threads=self._threads())

    def _threads(self) -> int:
        return self.target.threads or os.cpu_count() or 1

    def _failed(self, spec: VariantSpec, message: str):
        from prune2tvm.report import Variant

        variant = Variant(name=spec.name, method=spec.prune.method if spec.prune else "dense", target_sparsity=spec.sparsity,
                          sparsity=0.0, accuracy={}, agreement={}, latency_ms={}, block=[spec.block, 1],
                          error=message, key=self.key(spec))
        with staged_dir(self.out / "variants" / spec.name, force=True, what="variant") as stage:
            write_json(stage / RESULT_JSON, {"key": variant.key, "variant": dataclasses.asdict(variant)})
        return variant

    def _variant(self, spec: VariantSpec, dense, data, baseline, dense_logits):
        import numpy as np
        import torch

        from prune2tvm.measure.accuracy import agreement, fidelity, logits_batched, top_k
        from prune2tvm.measure.latency import measure_interleaved
        from prune2tvm.measure.profile import profile_layers
        from prune2tvm.onnxrt import session
        from prune2tvm.pipeline import build_variant, prune_variant, record_variant_measurements, sparsify_options
        from prune2tvm.prune.masks import layer_sparsity, overall_sparsity
        from prune2tvm.prune.summary import sparsity_summary
        from prune2tvm.report import Variant

        cfg = self.cfg
        if spec.prune is None:
            model, layers, plan = dense, layer_sparsity(dense, cfg.prune.layers), None
        else:
            result = prune_variant(spec.prune, cfg.train, cfg.seed, dense, data, spec.sparsity, spec.name)
            model, layers, plan = result.model, result.layers, result.plan
        x_test, y_test = data.test.x, data.test.y
        batch = cfg.measure.batch_size
        # the dense variant: every layer stays dense, still in the layer table
        block, threshold = ((1, 1), 1.0) if spec.prune is None else ((spec.block, 1), self.threshold)
        sparsify = sparsify_options(block, threshold, cfg.compile.dense_kernel)
        with staged_dir(self.out / "variants" / spec.name, force=True, what="variant") as stage:
            onnx_model, compiled = build_variant(stage, spec.name, model, plan, data, cfg, self.target, sparsify,
                                                 self.database, self.options.tune_trials)
            name = onnx_model.input_name
            ort = session(onnx_model.path, threads=self._threads())
            with phase("evaluate", f"{spec.name}: {cfg.data.dataset} test split with torch, onnxruntime and TVM"):
                with torch.no_grad():
                    logits = {"torch": self._logits(model, x_test),
                              "onnxruntime": logits_batched(lambda xb: ort.run(None, {name: xb})[0], x_test, len(x_test)),
                              "tvm": logits_batched(lambda xb: compiled.run({name: xb})[0], x_test, batch)}
                acc = {k: top_k(v, y_test, 1) for k, v in logits.items()}
                top5 = {k: top_k(v, y_test, 5) for k, v in logits.items()} if data.num_classes > 5 else {}
                preds = {k: v.argmax(1) for k, v in logits.items()}
                agree = {k: agreement(p, preds["torch"]) for k, p in preds.items() if k != "torch"}
                same = fidelity(logits["tvm"], dense_logits)
                say("  top-1 " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()) + f"; fidelity {same:.4f}")
            feeds = {name: np.ascontiguousarray(np.resize(x_test, (batch, *x_test.shape[1:])))}
            calls = {"tvm": compiled.bind(feeds)}
            if baseline is not None:
                dense_tvm, dense_ort = baseline
                calls["tvm_dense"] = dense_tvm.bind(feeds)
                calls["onnxruntime"] = lambda: dense_ort.run(None, feeds)
            else:
                calls["onnxruntime"] = lambda: ort.run(None, feeds)
            with phase("measure", f"{spec.name}: batch {batch}, {cfg.measure.repeat} calls of each of "
                                  f"{', '.join(calls)}"):
                stats = measure_interleaved(calls, cfg.measure.warmup, cfg.measure.repeat, cfg.measure.rounds,
                                            desc=f"latency {spec.name}")
                if baseline is None:
                    stats["tvm_dense"] = stats["tvm"]
                say("  " + ", ".join(f"{k} {s.median:.3f} ms (p90 {s.p90:.3f})" for k, s in stats.items()))
                layers_info = compiled.info.layers
                runs = max(3, min(20, cfg.measure.repeat // 10))
                profile = profile_layers(compiled._machine(), compiled._tensors(feeds), layers_info, repeat=runs)
                reference = None
                if spec.prune is None:
                    from prune2tvm.onnxrt import profile_weight_layers

                    reference = profile_weight_layers(onnx_model.path, feeds, runs=runs, threads=self._threads())
            summary = sparsity_summary(model, data.input_shape, (spec.block, 1))
            total = sum(p.numel() for p in model.parameters())
            nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
            sizes = {"onnx": (stage / "model.onnx").stat().st_size,
                     "artifact": sum(p.stat().st_size for p in (stage / "tvm").rglob("*") if p.is_file())}
            record_variant_measurements(stage / "tvm", acc["tvm"], len(y_test), stats, batch, self._threads(),
                                        self.target)
            variant = Variant(
                name=spec.name, method=spec.prune.method if spec.prune else "dense", target_sparsity=spec.sparsity,
                sparsity=overall_sparsity(layers), accuracy=acc, agreement=agree,
                latency_ms={k: s.to_json() for k, s in stats.items()},
                layers=[layer.to_json() for layer in layers], summary=summary,
                files={"checkpoint": f"variants/{spec.name}/model.pt", "onnx": f"variants/{spec.name}/model.onnx",
                       "tvm": f"variants/{spec.name}/tvm"},
                checks={"export_max_abs_diff": onnx_model.max_abs_diff, "compile": [vars(c) for c in compiled.info.checks]},
                compiled_layers=layers_info, block=[spec.block, 1] if spec.prune else None, top5=top5,
                params={"total": total, "nonzero": nonzero},
                macs={"dense": sum(r["macs_dense"] for r in summary), "effective": sum(r["macs_effective"] for r in summary)},
                size_bytes=sizes, fidelity=same, profile=profile.to_json(), reference_profile=reference, key=self.key(spec))
            write_json(stage / RESULT_JSON, {"key": variant.key, "variant": dataclasses.asdict(variant)})
        return variant

    # ------------------------------------------------------------------ the report

    def _write_report(self, variants: list) -> None:
        import onnxruntime
        import torch

        from prune2tvm.report import Report, write_report
        from prune2tvm.runtime import tvm_version

        dense = next((v for v in variants if v.method == "dense"), None)
        for v in variants:
            v.ideal_ms = ideal_latency(v, dense)
        synthetic = self.cfg.data.synthetic
        report = Report(
            pipeline=self.cfg.name,
            target={"name": self.target.name, "tvm": self.target.tvm, "threads": self._threads()},
            tvm_version=tvm_version(), batch_size=self.cfg.measure.batch_size, variants=variants,
            pipeline_file=self.source, prune2tvm_version=prune2tvm.__version__, torch_version=torch.__version__,
            onnxruntime_version=onnxruntime.__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            notes=[f"Each variant's TVM build runs every layer whose R x 1 block sparsity reaches "
                   f"{self.threshold} as BSR kernels, R being its block size; TVM dense is the dense model's TVM "
                   "build; TVM sparse, TVM dense and onnxruntime dense were measured in alternating rounds in one "
                   "process, per variant. " + (f"Dense kernels use the tuning records in {self.database.path}"
                                               + (f", each variant's new tasks tuned first with a budget of "
                                                  f"{self.options.tune_trials} trials (meta_schedule)."
                                                  if self.options.tune_trials else ".")
                                               if self.database is not None else
                                               "Dense kernels use TVM's default (untuned) schedules: run "
                                               "'prune2tvm tune' on the dense model.onnx to tune them."),
                   "ideal: onnxruntime dense latency with each weight layer's share of it (onnxruntime's per-node "
                   "profile of the dense model, basic graph optimizations) scaled by the fraction of the layer's "
                   "multiply-adds left (nonzero weights / dense weights); of ideal = ideal / TVM sparse latency."],
            config=self.cfg.to_dict(), kind="sweep",
            quality="top-1 agreement with the dense model on synthetic inputs" if synthetic else "test accuracy",
            max_accuracy_drop=self.options.max_accuracy_drop,
        )
        with phase("report", f"{self.out}/report.md, report.json, accuracy_vs_latency.png"):
            write_report(report, self.out)


def ideal_latency(variant, dense) -> float | None:
    """The FLOP-proportional ideal: onnxruntime dense latency (measured beside ``variant``)
    less, for each weight layer, its share of onnxruntime's time (its own profile of the
    dense model) times the fraction of the layer's multiply-adds pruned away (dense and
    variant layers matched in graph order, with their nonzero counts)."""
    if not variant.ok or dense is None or not dense.ok or not dense.reference_profile:
        return None
    base = variant.latency_ms.get("onnxruntime", {}).get("median")
    ours, theirs = variant.compiled_layers, dense.compiled_layers
    shares, total = dense.reference_profile["layers"], dense.reference_profile["total_ms"]
    if base is None or len(ours) != len(theirs) or not total:
        return None
    removed = 0.0
    for mine, full in zip(ours, theirs):
        if full["name"] not in shares or mine.get("density") is None or full.get("density") is None:
            continue
        kept = (_numel(mine) * mine["density"]) / max(_numel(full) * full["density"], 1e-12)
        removed += shares[full["name"]] / total * max(0.0, 1.0 - kept)
    return base * (1.0 - removed)


def _numel(layer: dict) -> int:
    return math.prod(int(d) for d in layer["weight_shape"])


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    from prune2tvm.fsutil import sha256_file

    return sha256_file(path)


def _changed(old: dict, new: dict, prefix: str = "") -> str:
    """The first few keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _changed(a, b, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{k}")
    return ", ".join(out[:4]) if prefix else (", ".join(out[:4]) or "the sweep format")


def run_sweep(cfg: PipelineConfig, options: SweepOptions, source: str = "") -> Path:
    out = Sweep(cfg, options, source).run()
    say(f"Report: {out / 'report.md'}")
    return out
