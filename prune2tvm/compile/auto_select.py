"""``--sparsity auto``: measure each candidate layer on the target, dense and as BSR, and keep
whichever is faster, so no layer is slower than its dense TVM build.

Each layer is measured on its own: a one-op Relax function built from the layer's
``Probe`` (dense), and the same function after the BSR pass, both compiled exactly as the
model is and timed with ``time_evaluator`` on this machine. A dense layer's time depends on
its kernels, not on its weights' values, so layers of one shape (a transformer's 12 blocks)
share one dense measurement; the BSR time depends on where the nonzero blocks are, and each
layer is measured.

"Its dense TVM build" is the tuned one where the tuning database has the dense layer's
schedule: against TVM's untuned default (50-100x slower on CPU) nearly every layer would
choose BSR, also where the tuned dense layer is faster. ``prune2tvm tune --sparsity auto``
therefore tunes each measured layer's dense probe too (``LayerTimer.probes``), and decides
again with the tuned times. Under ``--dense-kernel packed`` (the default), a
layer that stays dense runs prune2tvm's packed dense kernel on CPUs, and that is what BSR is
measured against.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

from prune2tvm.compile.passes.decisions import LayerDecision, Probe
from prune2tvm.compile.target import build_untuned, device
from prune2tvm.compile.tune import build_with_database, has_tuned_schedules, workload_key
from prune2tvm.config import TargetConfig
from prune2tvm.errors import UnsupportedError
from prune2tvm.progress import say

# Layers with fewer all-zero blocks than this are not worth measuring: they stay dense.
AUTO_MIN_BLOCK_SPARSITY = 0.1


class LayerTimer:
    """A ``Selector`` that decides by measurement. ``to_bsr`` rewrites a module with every
    eligible layer as BSR (the same passes and kernels the model gets)."""

    def __init__(self, target: TargetConfig, to_bsr: Callable[[tvm.IRModule], tvm.IRModule], database=None,
                 min_repeat_ms: int = 30, repeat: int = 5,
                 to_dense: Callable[[tvm.IRModule], tvm.IRModule] | None = None):
        ok, why = target.runs_here()
        if not ok:
            raise UnsupportedError(f"--sparsity auto measures layers on the target, and {target.name} cannot run "
                                   f"here ({why}); give a threshold instead")
        self.target = target
        self.to_bsr = to_bsr
        self.to_dense = to_dense  # how a layer left dense is compiled (the packed kernel), or None: TVM's op
        self.database = database  # a TuningDatabase whose dense schedules apply, or None
        self.probes: list[tvm.IRModule] = []  # each measured layer's dense module, for the tuner
        self._dense: dict[tuple, tuple[float, str]] = {}  # (input shape, workload key): _dense_time
        self.min_repeat_ms = min_repeat_ms
        self.repeat = repeat

    def __call__(self, decision: LayerDecision, probe: Probe) -> bool:
        dense = single_op_module(probe)
        if self.to_dense is None:
            self.probes.append(dense)  # TVM's op, for the tuner
        else:
            dense = self.to_dense(dense)
        x = np.random.default_rng(0).standard_normal(probe.input_shape).astype(np.float32)
        key = (tuple(probe.input_shape), workload_key(dense, self.target))
        if key not in self._dense:
            self._dense[key] = self._dense_time(dense, x)
        decision.dense_ms, dense_kind = self._dense[key]
        decision.bsr_ms = self._time(self.to_bsr(single_op_module(probe)), x)
        faster = decision.bsr_ms < decision.dense_ms
        say(f"  auto {decision.name}: {dense_kind} {decision.dense_ms:.4f} ms, BSR {decision.bsr_ms:.4f} ms -> "
            f"{'BSR' if faster else 'dense'}")
        if faster:
            decision.reason = f"auto: BSR {decision.bsr_ms:.4f} ms < {dense_kind} {decision.dense_ms:.4f} ms"
        else:
            decision.reason = (f"auto: {dense_kind} {decision.dense_ms:.4f} ms <= BSR {decision.bsr_ms:.4f} ms; "
                               "left dense")
        return faster

    def _dense_time(self, dense: tvm.IRModule, x: np.ndarray) -> tuple[float, str]:
        """(ms, what was measured) for a layer's dense module."""
        if self.to_dense is not None:
            return self._time(dense, x), "packed dense"
        tuned = self.database is not None and has_tuned_schedules(dense, self.target, self.database)
        return self._time(dense, x, self.database if tuned else None), "tuned dense" if tuned else "untuned dense"

    def _time(self, mod: tvm.IRModule, x: np.ndarray, database=None) -> float:
        dev = device(self.target)
        if database is not None:
            executable = build_with_database(mod, self.target, database)
        else:
            executable = build_untuned(mod, self.target)
        vm = relax.VirtualMachine(executable, dev)
        timer = vm.time_evaluator("main", dev, number=1, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms)
        return float(np.median(timer(tvm.runtime.tensor(x, dev)).results) * 1e3)


def single_op_module(probe: Probe) -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType(probe.input_shape, "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(probe.make_dense(x))
        builder.emit_func_output(out)
    return builder.get()
