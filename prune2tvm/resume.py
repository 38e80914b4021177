"""The models an interrupted run had finished, kept for the next run.

``prune2tvm run`` trains the dense model, then each pruned variant. Each is kept here as
soon as it is finished (its state dict, pruning plan, and what was logged while training),
in a directory beside the run's output, under a key of the configuration that trained it.
A run stopped by Ctrl-C or a kill leaves it behind; the next run of the same configuration
takes what is there instead of training again, and a run that completes removes it.
Training is seeded per model, so a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
from pathlib import Path

from prune2tvm import __version__
from prune2tvm.errors import InputError, Prune2TVMError
from prune2tvm.fsutil import staged_dir, write_json
from prune2tvm.progress import say

FORMAT = 1
INFO = "info.json"


def training_key(cfg) -> str:
    """What the trained models depend on: data, model, training, pruning, seed, the starting
    checkpoint's bytes and the prune2tvm version (not the target, export or measurement)."""
    from prune2tvm.fsutil import sha256_file

    config = cfg.to_dict()
    parts = {k: config[k] for k in ("data", "model", "train", "prune", "seed")}
    parts["checkpoint_sha256"] = sha256_file(cfg.model.checkpoint) if cfg.model.checkpoint else None
    parts["format"], parts["version"] = FORMAT, __version__
    from prune2tvm.pipeline import random_init

    init = random_init(cfg)
    if init:
        parts["random_init"] = init
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ModelStore:
    """Finished models under ``root``: ``dense/`` and ``<variant>/``, each with model.pt,
    info.json (the key, training log, measured layer sparsity) and plan.json for variants."""

    def __init__(self, root: str | Path, key: str):
        self.root, self.key = Path(root), key

    @classmethod
    def beside(cls, out_dir: Path, cfg) -> "ModelStore":
        return cls(out_dir.parent / f".{out_dir.name}.resume", training_key(cfg))

    @contextlib.contextmanager
    def locked(self, busy: str):
        """One run at a time per output; stale staging directories of killed runs go."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(busy) from None
            for stale in self.root.glob(".*.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                yield
            finally:
                if self.root.exists() and not [p for p in self.root.iterdir() if not p.name.startswith(".")]:
                    shutil.rmtree(self.root, ignore_errors=True)  # nothing kept: leave nothing behind

    # ------------------------------------------------------------------ reading

    def kept(self) -> list[str]:
        """Names of the models finished and kept here."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and self._info(p.name))

    def _info(self, name: str) -> dict | None:
        """A finished model's info, or None (absent, unreadable, or another configuration's)."""
        try:
            info = json.loads((self.root / name / INFO).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("key") == self.key else None

    def dense(self, cfg, input_shape, num_classes):
        """(model, history) of the dense model kept by an earlier run, or None."""
        from prune2tvm.checkpoint import load_state_dict
        from prune2tvm.models import build_model
        from prune2tvm.train import EpochLog

        info = self._info("dense")
        if info is None:
            return None
        try:
            model = build_model(cfg.model.name, input_shape, num_classes)
            load_state_dict(model, self.root / "dense" / "model.pt")
            history = [EpochLog(**h) for h in info["history"]]
        except (Prune2TVMError, KeyError, TypeError) as exc:
            say(f"  {self.root / 'dense'}: not usable ({exc}); training again")
            return None
        say(f"  dense model: kept by an interrupted run ({self.root / 'dense'})")
        return model.eval(), history

    def variant(self, name: str, cfg, input_shape, num_classes):
        """The ``PruneResult`` of a variant kept by an earlier run, or None."""
        from prune2tvm.checkpoint import load_state_dict
        from prune2tvm.models import build_model
        from prune2tvm.prune.agp_prune import PruneResult
        from prune2tvm.prune.masks import LayerSparsity
        from prune2tvm.prune.plan import PruningPlan
        from prune2tvm.train import EpochLog

        info = self._info(name)
        if info is None:
            return None
        vdir = self.root / name
        try:
            model = build_model(cfg.model.name, input_shape, num_classes)
            plan = PruningPlan.load(vdir / "plan.json") if (vdir / "plan.json").exists() else None
            if plan is not None and plan.thinned:  # the architecture the weights fit
                plan.apply(model, where=str(vdir / "plan.json"))
            load_state_dict(model, vdir / "model.pt")
            result = PruneResult(name, model.eval(), info["target_sparsity"],
                                 [LayerSparsity(**layer) for layer in info["layers"]],
                                 [EpochLog(**h) for h in info["history"]], info["schedule"], plan, info["skipped"])
        except (Prune2TVMError, KeyError, TypeError) as exc:
            say(f"  {vdir}: not usable ({exc}); pruning again")
            return None
        say(f"  {name}: kept by an interrupted run ({vdir})")
        return result

    # ------------------------------------------------------------------ writing

    def save_dense(self, model, history) -> None:
        self._save("dense", model, None, {"history": [dataclasses.asdict(h) for h in history]})

    def save_variant(self, result) -> None:
        self._save(result.name, result.model, result.plan, {
            "target_sparsity": result.target_sparsity, "layers": [dataclasses.asdict(s) for s in result.layers],
            "history": [dataclasses.asdict(h) for h in result.history], "schedule": list(result.schedule),
            "skipped": dict(result.skipped)})

    def _save(self, name: str, model, plan, info: dict) -> None:
        from prune2tvm.pipeline import _save_checkpoint

        self.root.mkdir(parents=True, exist_ok=True)
        with staged_dir(self.root / name, force=True, what="a finished model") as stage:
            _save_checkpoint(model, stage / "model.pt")
            if plan is not None:
                plan.save(stage / "plan.json")
            write_json(stage / INFO, {"key": self.key} | info)  # last: its presence marks the model finished

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
