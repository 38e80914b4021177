"""What the sparsify passes record for each weight layer, and helpers they share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import rewrite_call

from prune2tvm.sparse import BsrMatrix, block_sparsity

# Names a layer by its weight as a matrix [N, K]: (graph position, name), or None if unknown.
LayerNamer = Callable[[np.ndarray], "tuple[int, str] | None"]
UNKNOWN_POSITION = 10**9


@dataclass
class LayerDecision:
    name: str
    op: str  # "dense" (a matmul) or "conv2d"; "conv1d" and "conv3d" are only reported (left dense)
    weight_shape: list[int]  # [N, K] for dense (the weight as it is when not 2-D); [O, C, KH, KW] for conv2d
    block: list[int]  # [R, C] over the weight as a matrix [out, in*kh*kw]
    block_sparsity: float | None  # None when not computed (shape does not divide, not constant...)
    kind: str  # "bsr" or "dense"
    reason: str
    position: int = UNKNOWN_POSITION  # the layer's node index in the ONNX graph
    dense_ms: float | None = None  # measured by --sparsity auto
    bsr_ms: float | None = None
    density: float | None = None  # fraction of the weight's elements that are nonzero (None: not constant)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """The layer on its own, for measuring: its input shape, and a function that builds the
    dense op from an input expression."""

    input_shape: list[int]
    make_dense: Callable[[relax.Expr], relax.Expr]


# Says whether a layer that qualifies for BSR becomes BSR (may set decision.reason)
Selector = Callable[[LayerDecision, Probe], bool]


def selected(decision: LayerDecision, probe: Probe, select: Selector | None) -> bool:
    """Apply ``select`` to a layer ``decide_bsr`` chose; a layer it refuses is kept dense."""
    if select is None or select(decision, probe):
        return True
    decision.kind = "dense"
    return False


class DecisionLog:
    """One decision per call, however often ``rewrite_call`` revisits it.

    rewrite_call repeats until nothing changes, so a call left alone is seen again (as a new
    object): calls are keyed by structural hash.
    """

    def __init__(self, names: LayerNamer | None):
        self._names = names
        self._seen: dict[int, LayerDecision] = {}

    def seen(self, call: relax.Call) -> bool:
        return tvm_ffi.structural_hash(call) in self._seen

    def add(self, call: relax.Call, op: str, weight_matrix: np.ndarray | None, shape: list[int],
            block: tuple[int, int]) -> LayerDecision:
        found = self._names(weight_matrix) if (self._names and weight_matrix is not None) else None
        position, name = found if found else (UNKNOWN_POSITION, f"{op}{len(self._seen)}")
        decision = LayerDecision(name, op, shape, list(block), None, "dense", "", position)
        if weight_matrix is not None and weight_matrix.size:
            decision.density = float(np.count_nonzero(weight_matrix)) / weight_matrix.size
        self._seen[tvm_ffi.structural_hash(call)] = decision
        return decision

    def decisions(self) -> list[LayerDecision]:
        return list(self._seen.values())


def decide_bsr(decision: LayerDecision, matrix: np.ndarray, block: tuple[int, int],
               threshold: float, measured: bool = False) -> BsrMatrix | None:
    """The BSR form of a weight matrix [out, in] if it divides into blocks and its block
    sparsity reaches the threshold; else None, with the reason in ``decision``. ``measured``:
    the layers that reach it are measured next (``--sparsity auto``); a threshold of infinity
    is a dense build."""
    n, k = matrix.shape
    if n % block[0] or k % block[1]:
        decision.reason = f"[{n}, {k}] does not divide into {block[0]}x{block[1]} blocks; left dense"
        return None
    sparsity = block_sparsity(matrix, block)
    decision.block_sparsity = sparsity
    if sparsity < threshold:
        if math.isinf(threshold):
            decision.reason = "dense build (no --bsr)"
        elif measured:
            decision.reason = f"auto: block sparsity {sparsity:.3f} < {threshold:g}, not worth measuring; left dense"
        else:
            decision.reason = f"block sparsity {sparsity:.3f} < threshold {threshold:g}"
        return None
    decision.kind = "bsr"
    decision.reason = f"block sparsity {sparsity:.3f} >= threshold {threshold:g}"
    return BsrMatrix.from_dense(np.ascontiguousarray(matrix), block)


def packed_block(outputs: int, rows: int) -> tuple[int, int] | None:
    """The panel shape of prune2tvm's packed dense kernel (the BSR kernel with every block
    stored) for a layer of ``outputs`` outputs over ``rows`` activation rows: 16 outputs a
    panel for a few rows (GEMV-like: fewer, longer panels), 8 for many (8 accumulators of 16
    rows a panel); None if no panel height divides the outputs."""
    for height in ((16, 8, 4) if rows < 16 else (8, 16, 4)):
        if outputs % height == 0:
            return height, 1
    return None


PACKED = "runs prune2tvm's packed dense kernel"  # said in the reason of every packed layer


def pack_dense(decision: LayerDecision, matrix: np.ndarray, rows: int) -> BsrMatrix | None:
    """A layer that stays dense, as the packed kernel's panels of ``matrix`` [out, in] (said in
    ``decision``), or None where no panel shape fits: TVM's own dense op then computes it."""
    block = packed_block(matrix.shape[0], rows)
    if block is None:
        return None
    decision.reason += f"; {PACKED} ({block[0]}x{block[1]} panels)"
    return BsrMatrix.from_dense(np.ascontiguousarray(matrix), block, keep_zero_blocks=True)


def rewrite_functions(mod: tvm.IRModule, builder: relax.BlockBuilder, pattern, rewrite,
                      bindings: bool = False) -> tvm.IRModule:
    """Apply ``rewrite`` to every Relax function; kernels added to ``builder`` come along.
    With ``bindings``, ``rewrite(call, matches, values, uses)`` also gets the function's
    var -> bound value map and ``use_counts``."""
    rewritten = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        fn = rewrite
        if bindings:
            values, uses = relax.analysis.get_var2val(func), use_counts(func)

            def fn(call, matches, values=values, uses=uses):
                return rewrite(call, matches, values, uses)
        rewritten[gv] = rewrite_call(pattern, fn, func)
    new_mod = builder.get()
    for gv, func in rewritten.items():
        new_mod[gv] = func
    return new_mod


def use_counts(func: relax.Function) -> dict:
    """Var -> how many bindings (and the function's result) read it."""
    counts: dict = {}
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                counts[var] = counts.get(var, 0) + 1
    for var in relax.analysis.free_vars(body.body):
        counts[var] = counts.get(var, 0) + 1
    return counts


def is_call_tir(expr: relax.Expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir"


def static_shape(expr: relax.Expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def const(array: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(array))


def in_graph_order(decisions: list[LayerDecision]) -> list[LayerDecision]:
    return sorted(decisions, key=lambda d: d.position)  # stable: unknown ones keep their order
