"""Tuning prune2tvm's own BSR kernels: a search over each kernel's parameters, measured on
the device.

meta_schedule cannot search kernels whose loops depend on data (the block pattern), so each
BSR kernel exposes its parameters (``kernels.bsr_matmul.search_space``: accumulators for few
rows, panels per task for many; ``kernels.bsr_conv2d.conv_search_space``: vectors of output
columns per task) and every candidate is built and timed with the layer's real
block pattern. Records live beside the meta_schedule records of the target's database, in
``bsr.json``, keyed by the kernel's shape *and* a hash of its block pattern (indptr and
indices): two layers of one shape with different patterns never share a record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tvm

from prune2tvm.compile.target import tvm_target
from prune2tvm.config import TargetConfig
from prune2tvm.fsutil import write_json
from prune2tvm.progress import say

RECORDS_NAME = "bsr.json"


def kernel_key(kind: str, shape, lanes: int, arrays: list[np.ndarray]) -> str:
    """The record key: kind, shape, SIMD width and the block pattern's bytes."""
    digest = hashlib.sha1(f"{kind}|{shape!r}|{lanes}".encode())
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return f"{kind}-{digest.hexdigest()[:20]}"


@dataclass
class BsrKernelSpec:
    """One BSR kernel of a module, as the tuner needs it."""

    key: str
    layer: str
    make: Callable[[dict], "tvm.tirx.PrimFunc"]  # params -> kernel (without epilogue)
    space: list[dict]  # candidate params; the first is the default
    arrays: list[np.ndarray]  # data, indices (conv: column offsets), indptr: the real block pattern
    input_shape: list[int]
    output_shape: list[int]
    channels: int  # the bias' length
    residual_slot: bool = False  # the kernel takes a residual argument before the bias (conv kernels)


@dataclass
class BsrRecords:
    """``bsr.json`` in a tuning database directory: key -> best params and times."""

    path: Path
    records: dict = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | Path) -> "BsrRecords":
        path = Path(directory) / RECORDS_NAME
        try:
            records = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            say(f"  {path}: unreadable, ignored (the BSR kernels will be searched again)")
            records = {}
        return cls(path, records if isinstance(records, dict) else {})

    def params(self, key: str) -> dict | None:
        record = self.records.get(key)
        return dict(record["params"]) if isinstance(record, dict) and "params" in record else None

    def add(self, key: str, record: dict) -> None:
        self.records[key] = record
        write_json(self.path, self.records)  # atomic: a killed run leaves the previous file


@dataclass
class BsrTaskReport:
    layer: str
    status: str
    candidates: int
    default_us: float | None
    best_us: float | None
    params: dict


def tune_bsr_kernels(specs: list[BsrKernelSpec], target: TargetConfig, records: BsrRecords,
                     rpc=None) -> list[BsrTaskReport]:
    """Measure every candidate of every kernel not yet in ``records``; keep the fastest. With
    ``rpc`` (an ``RpcDevice``), candidates are built here and timed on one device under its key."""
    reports, todo = [], []
    for spec in specs:
        params = records.params(spec.key)
        if params is None:
            todo.append(spec)
        else:
            record = records.records[spec.key]
            reports.append(BsrTaskReport(spec.layer, "already tuned", 0, record.get("default_us"),
                                         record.get("best_us"), params))
    if todo:
        where = f" on a device under key {rpc.key!r}" if rpc is not None else ""
        say(f"  searching {len(todo)} BSR kernel(s): {sum(len(s.space) for s in todo)} candidates{where}")
    session = rpc.session() if rpc is not None and todo else None
    for spec in todo:
        timers = [_kernel_timer(spec, params, target, session) for params in spec.space]
        samples = [[] for _ in timers]
        for _ in range(SEARCH_ROUNDS):  # alternating rounds: a slow spell of the machine hits every candidate
            for timer, times in zip(timers, samples):
                times.append(timer())
        times = [min(t) for t in samples]  # a candidate's best round: slow spells only add time
        best = int(np.argmin(times))
        record = {"layer": spec.layer, "params": spec.space[best], "default_us": times[0], "best_us": times[best],
                  "candidates": {json.dumps(p, sort_keys=True): t for p, t in zip(spec.space, times)}}
        records.add(spec.key, record)
        say(f"  {spec.layer}: default {times[0]:.1f} us, best {times[best]:.1f} us with {spec.space[best]}")
        reports.append(BsrTaskReport(spec.layer, "tuned", len(times), times[0], times[best], spec.space[best]))
    return reports


# Each candidate is timed in this many alternating rounds. On these shared 2-core machines one
# vCPU intermittently runs at about 2/3 speed: timed once each, in turn, the same candidate
# measured up to 1.6x apart, and the search kept whichever a calm moment happened to favour.
SEARCH_ROUNDS = 3


def _kernel_timer(spec: BsrKernelSpec, params: dict, target: TargetConfig, session=None) -> Callable[[], float]:
    """The candidate built and loaded where it is measured: a call times it once (us, the
    median of its repeats)."""
    from prune2tvm.compile.tune import load_where_measured

    func = spec.make(params).with_attr("global_symbol", "main")
    lib, dev = load_where_measured(tvm.compile(tvm.IRModule({"main": func}), tvm_target(target)), target, session)
    rng = np.random.default_rng(0)
    data, indices, indptr = spec.arrays
    args = [tvm.runtime.tensor(rng.standard_normal(spec.input_shape).astype(np.float32), dev),
            *(tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (data, indices, indptr)),
            *([tvm.runtime.tensor(np.zeros(1, np.float32), dev)] if spec.residual_slot else []),
            tvm.runtime.tensor(np.zeros(spec.channels, np.float32), dev),
            tvm.runtime.empty(spec.output_shape, "float32", dev)]
    timer = lib.time_evaluator("main", dev, number=10, repeat=3, min_repeat_ms=20)
    return lambda: float(np.median(timer(*args).results) * 1e6)


def render_bsr_table(reports: list[BsrTaskReport]) -> str:
    from prune2tvm.compile.tune import format_us

    lines = ["| BSR kernel | status | candidates | default us | best us | params |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.layer} | {r.status} | {r.candidates} | {format_us(r.default_us)} | {format_us(r.best_us)} "
              f"| {r.params} |" for r in reports]
    return "\n".join(lines)
