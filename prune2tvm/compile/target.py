"""TargetConfig -> tvm.target.Target, with ``mcpu: auto`` resolved to the host CPU."""

from __future__ import annotations

import copy
import shutil

import tvm

from prune2tvm.config import TargetConfig
from prune2tvm.errors import UnsupportedError
from prune2tvm.runtime import physical_cores


def host_cpu_name() -> str:
    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def resolved_target_dict(target: TargetConfig) -> dict:
    """The dict given to ``tvm.target.Target``: ``auto`` values replaced by what they mean here."""
    spec = copy.deepcopy(target.tvm)
    if spec.get("mcpu") == "auto":
        spec["mcpu"] = host_cpu_name()
    if spec["kind"] == "llvm" and spec.get("num-cores", "auto") == "auto":
        # meta_schedule needs it; the build uses it as the thread count
        spec["num-cores"] = target.threads or physical_cores()
    return spec


def tvm_target(target: TargetConfig) -> "tvm.target.Target":
    spec = resolved_target_dict(target)
    if target.host is not None:
        return tvm.target.Target(spec, host=copy.deepcopy(target.host))
    return tvm.target.Target(spec)


def build_untuned(mod: tvm.IRModule, target: TargetConfig):
    """``tvm.compile`` without a tuning database. On CPUs with TVM's CPU pipeline
    (``relax.get_default_pipeline``: legalize, fold constants, fuse), which tvm.compile's
    "default" skips there (GPUs get theirs): without it every TVM op was its own kernel and a
    Gemm's weight was transposed on every call (digits CNN, packed: 21.8 -> 20.8 us; with TVM's
    ops: 1.34 -> 1.07 ms). The tuned build (``tune.prepare_passes``) runs the same passes;
    both add ``cpu_schedules``."""
    tgt = tvm_target(target)
    pipeline = "default" if target.kind == "cuda" else cpu_pipeline(tgt)
    return tvm.compile(mod, tgt, relax_pipeline=pipeline)


def cpu_schedules():
    """A pass scheduling, with dlight's CPU rule for reductions, what neither a tuning record
    nor a prune2tvm kernel schedules: softmax, layer norm and the like run in parallel over
    rows and vectorised, where TVM's default is a scalar loop nest on one core (a torch
    ``TransformerEncoder``, 64 tokens, width 256, 90 % 4x1: 0.38 -> 0.32 ms). A function the
    rule does not fit, or fails on, keeps TVM's default; the build is checked against
    onnxruntime either way."""
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="Prune2TVMCpuSchedules")
    def apply(mod, _ctx):
        target, rule = tvm.target.Target.current(allow_none=False), dl.cpu.Reduction()
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
                continue
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 - TVM's rule on a pattern it did not foresee
                continue
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if updated:
            mod = mod.clone()  # not the caller's module
            for gvar, func in updated.items():
                mod[gvar] = func
        return mod

    return apply


def cpu_pipeline(tgt):
    """TVM's CPU pipeline (``relax.get_default_pipeline``) with ``cpu_schedules`` after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="Prune2TVMCpuPipeline")
    def pipeline(mod, _ctx):
        with tgt:
            return tvm.transform.Sequential([*cpu.library_dispatch_passes(tgt), *cpu.legalize_passes(tgt),
                                             cpu_schedules(), *cpu.dataflow_lower_passes(tgt),
                                             *cpu.finalize_passes(tgt)])(mod)

    return pipeline


def export_compiler(target: TargetConfig):
    """The ``fcompile`` for ``export_library``: the host's default or the cross compiler."""
    if not target.cross_compiler:
        return None
    if shutil.which(target.cross_compiler) is None:
        package = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}.get(target.cross_compiler, "its cross toolchain")
        raise UnsupportedError(f"target {target.name} needs the cross compiler {target.cross_compiler}, which is not "
                               f"installed; install Debian's {package}")
    from tvm.support import cc

    return cc.cross_compiler(target.cross_compiler)


def device(target: TargetConfig):
    return tvm.cuda(0) if target.kind == "cuda" else tvm.cpu(0)
