from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from prune2tvm.errors import InputError

REPORT_JSON = "report.json"
REPORT_FORMAT_VERSION = 1


@dataclass
class Variant:
    name: str
    method: str  # "dense" or the pruning method
    target_sparsity: float
    sparsity: float  # measured fraction of zero weights in the prunable layers
    accuracy: dict[str, float]  # backend -> test-split top-1
    agreement: dict[str, float]  # backend -> fraction of test predictions equal to torch's
    latency_ms: dict[str, dict]  # backend -> {"median", "p90", "mean", "min", "samples"}
    layers: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative to the run directory
    checks: dict = field(default_factory=dict)  # numerical checks: export and compile
    compiled_layers: list[dict] = field(default_factory=list)  # per weight layer: dense or BSR, and why
    summary: list[dict] = field(default_factory=list)  # Distiller-style per-layer sparsity and MACs
    # sweeps: latency_ms also has "tvm_dense" (the dense model's TVM build, measured alongside)
    block: list[int] | None = None  # the BSR block the variant was compiled with
    top5: dict[str, float] = field(default_factory=dict)  # backend -> top-5 (more than 5 classes)
    params: dict = field(default_factory=dict)  # {"total", "nonzero"} over the whole model
    macs: dict = field(default_factory=dict)  # {"dense", "effective"} over the prunable layers
    size_bytes: dict = field(default_factory=dict)  # {"onnx", "artifact"} on disk
    profile: dict | None = None  # measure.profile.Profile: each layer's kernel time
    reference_profile: dict | None = None  # dense variant: onnxruntime.profile_weight_layers of its ONNX
    ideal_ms: float | None = None  # FLOP-proportional ideal: ORT dense x (1 - the pruned share of its time)
    fidelity: float | None = None  # sweeps: mean cosine similarity of TVM's logits to the dense model's
    error: str | None = None  # the variant could not be made (reported, the sweep went on)
    key: str = ""  # the hash of the configuration it was computed from

    def speedup(self) -> float | None:
        """onnxruntime median / TVM median."""
        try:
            return self.latency_ms["onnxruntime"]["median"] / self.latency_ms["tvm"]["median"]
        except (KeyError, ZeroDivisionError):
            return None

    def over_dense(self) -> float | None:
        """TVM dense median / TVM (sparse) median, measured side by side (sweeps)."""
        try:
            return self.latency_ms["tvm_dense"]["median"] / self.latency_ms["tvm"]["median"]
        except (KeyError, ZeroDivisionError):
            return None

    @property
    def ok(self) -> bool:
        return self.error is None and "tvm" in self.latency_ms


@dataclass
class Report:
    pipeline: str
    target: dict  # {"name", "tvm": resolved dict, ...}
    tvm_version: str
    batch_size: int
    variants: list[Variant]
    pipeline_file: str = ""
    prune2tvm_version: str = ""
    torch_version: str = ""
    onnxruntime_version: str = ""
    created: str = ""
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    kind: str = "run"  # or "sweep"
    quality: str = "test accuracy"  # what the accuracy columns measure
    max_accuracy_drop: float = 0.01  # sweeps: the chosen variant is within this of dense
    format_version: int = REPORT_FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    def pareto(self, by_fidelity: bool | None = None) -> list[Variant]:
        """Variants no other beats on both quality (``quality_of``) and TVM latency, fastest first."""
        def q(v):
            return self.quality_of(v, by_fidelity)

        done = [v for v in self.variants if v.ok and q(v) is not None]
        ms = (lambda v: v.latency_ms["tvm"]["median"])
        front = [v for v in done if not any(
            q(o) >= q(v) and ms(o) <= ms(v) and (q(o) > q(v) or ms(o) < ms(v)) for o in done)]
        return sorted(front, key=ms)

    @property
    def latency_only(self) -> bool:
        """Synthetic inputs: accuracy is only agreement with the dense model."""
        return "synthetic" in self.quality

    @property
    def by_fidelity(self) -> bool:
        """Latency studies rank variants by fidelity (cosine similarity of the logits to the
        dense model's), where every variant has it; top-1 agreement with a random-weight
        model is nearly always 100 %."""
        done = [v for v in self.variants if v.ok]
        return self.latency_only and bool(done) and all(v.fidelity is not None for v in done)

    def quality_of(self, v: Variant, by_fidelity: bool | None = None) -> float | None:
        """The quality axis of the Pareto front: fidelity in a latency study (or as asked), else
        TVM top-1."""
        return v.fidelity if (self.by_fidelity if by_fidelity is None else by_fidelity) else v.accuracy.get("tvm")

    def chosen(self) -> Variant | None:
        """The fastest Pareto variant within ``max_accuracy_drop`` of the dense model's accuracy
        (latency only: the fastest variant, the per-layer view being about speed)."""
        if self.latency_only:
            done = [v for v in self.variants if v.ok]
            return min(done, key=lambda v: v.latency_ms["tvm"]["median"]) if done else None
        dense = next((v for v in self.variants if v.method == "dense" and v.ok), None)
        front = self.pareto()
        if dense is None or "tvm" not in dense.accuracy:
            return front[0] if front else None
        good = [v for v in front if v.accuracy["tvm"] >= dense.accuracy["tvm"] - self.max_accuracy_drop - 1e-9]
        return good[0] if good else dense

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        variant_fields = {f.name for f in fields(Variant)}
        data["variants"] = [Variant(**{k: x for k, x in v.items() if k in variant_fields}) for v in data["variants"]]
        return cls(**data)


def load_report(run_dir: str | os.PathLike) -> Report:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise InputError(f"{run_dir}: no {REPORT_JSON} here; give a run directory written by 'prune2tvm run'")
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != REPORT_FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, expected {REPORT_FORMAT_VERSION}")
        return Report.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"{path}: not a valid prune2tvm report ({type(exc).__name__}: {exc})") from None
