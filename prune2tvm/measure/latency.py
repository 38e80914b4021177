"""Latency of several callables measured side by side in one process.

The machines are shared and noisy, so backends are measured in alternating rounds (A, B,
A, B, ...) rather than one after the other: a slow spell hits both.

Each round starts with unrecorded calls of the backend about to be timed, for at least
``settle_ms``. Both TVM's and onnxruntime's thread pools keep spinning after their last call;
on a 2-core machine the spinning threads of the backend just timed take a core from the next
one (TVM's 2-thread BSR GEMM then ran at its 1-thread speed). TVM 0.27's workers yield 300000
times before they sleep: 130 ms of a core when nothing else runs, longer beside the next
backend's threads. With 100 ms of settling, onnxruntime's 1 x 768->3072 MatMul took 100-111
us instead of 54-63 after about one TVM round in three. With 300 ms (the default) a script
saw it in none of 8 cases, the layer benchmark still in 2 of 25: rarer, not gone. Sleeping
instead of settling was measured worse: an idle VM's cores come back slow.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from prune2tvm.progress import bar


@dataclass
class LatencyStats:
    median: float  # milliseconds
    p90: float
    mean: float
    min: float
    samples: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 90)), float(a.mean()), float(a.min()), int(a.size))


def measure_interleaved(calls: dict[str, Callable[[], None]], warmup: int, repeat: int,
                        rounds: int, desc: str = "latency", settle_ms: float = 300.0) -> dict[str, LatencyStats]:
    """Warm each call up, then time ``repeat`` calls of each, split over ``rounds`` rounds."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    per_round = [repeat // rounds + (1 if r < repeat % rounds else 0) for r in range(rounds)]
    settle = min(5, max(1, warmup // 4)) if warmup else 0
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for count in bar(per_round, desc=desc, total=rounds, unit="round"):
        for name, fn in calls.items():
            start = time.perf_counter()
            for done in itertools.count():
                if done >= settle and (not settle or (time.perf_counter() - start) * 1e3 >= settle_ms):
                    break
                fn()
            for _ in range(count):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: LatencyStats.from_samples(s) for name, s in samples.items()}
