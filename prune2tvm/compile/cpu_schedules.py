"""Schedules on CPUs for the TIR functions that neither a tuning record nor a prune2tvm kernel
schedules: what TVM's ops would otherwise run with TVM's default, a scalar loop nest on one
core.

* Row reductions (softmax, layer norm, mean): dlight's CPU rule (``dl.cpu.Reduction``),
  parallel over rows, vectorised.
* Elementwise functions (GELU, residual adds, the transposes of attention's heads): every
  producer inlined into the last block, the innermost axis in vectors where it holds whole
  ones, the rest fused and cut into parallel chunks (``injective``).

A function neither fits, or a rule fails on, keeps TVM's default; the build is checked against
onnxruntime either way. Untuned BERT-base at 90 % 4x1 (``benchmarks/bsr_models.py``): see
RESULTS.
"""

from __future__ import annotations

import math

import tvm

from prune2tvm.compile.target import vector_lanes

PARALLEL_MIN_ELEMENTS = 16384  # smaller functions stay serial (a chosen threshold, not a measured one)
CHUNK_VECTORS = 64  # vectors per parallel chunk


def injective(func: "tvm.tirx.PrimFunc", lanes: int):
    """A schedule for an elementwise function (every block spatial), or None."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not all(info.is_injective() for info in infos):
        return None
    infos = try_inline(sch, infos)
    if len(infos) != 1:
        return None
    loops = sch.get_loops(infos[0].block_rv)
    extents = [sch.get(loop).extent for loop in loops]
    if not loops or not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
        return None
    total = math.prod(int(e) for e in extents)
    if total < PARALLEL_MIN_ELEMENTS:
        return None
    if int(extents[-1]) % lanes == 0:  # whole vectors along the innermost axis: contiguous loads
        outer, vector = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(vector)
        loops = [*loops[:-1], outer]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    chunk = CHUNK_VECTORS if int(extents[-1]) % lanes == 0 else CHUNK_VECTORS * lanes
    parallel, _ = sch.split(fused, factors=[None, chunk])
    sch.parallel(parallel)
    return sch


def cpu_schedules():
    """The pass: each unscheduled PrimFunc of the module scheduled by the first rule that fits
    (under the current target), and marked scheduled."""
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="Prune2TVMCpuSchedules")
    def apply(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        lanes = vector_lanes(target)
        rules = [lambda f: dl.cpu.Reduction().apply(f, target, False), lambda f: injective(f, lanes)]
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
                continue
            for rule in rules:
                try:
                    sch = rule(func)
                except Exception:  # noqa: BLE001 - a rule on a pattern it did not foresee
                    sch = None
                if isinstance(sch, list):
                    sch = sch[0] if sch else None
                if sch is not None:
                    updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    break
        if updated:
            mod = mod.clone()  # not the caller's module
            for gvar, func in updated.items():
                mod[gvar] = func
        return mod

    return apply
