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

    def speedup(self) -> float | None:
        """onnxruntime median / TVM median."""
        try:
            return self.latency_ms["onnxruntime"]["median"] / self.latency_ms["tvm"]["median"]
        except (KeyError, ZeroDivisionError):
            return None


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
    format_version: int = REPORT_FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["variants"] = [Variant(**v) for v in data["variants"]]
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
