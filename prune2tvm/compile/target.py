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


def vector_lanes(target: "tvm.target.Target") -> int:
    """float32 lanes of the target CPU's widest vectors (AVX-512: 16, AVX2: 8, NEON/SSE: 4)."""
    from tvm.target import codegen

    if codegen.llvm_cpu_has_features("avx512f", target):
        return 16
    if codegen.llvm_cpu_has_features("avx2", target) or codegen.llvm_cpu_has_features("avx", target):
        return 8
    return 4


def cpu_pipeline(tgt):
    """TVM's CPU pipeline (``relax.get_default_pipeline``) with ``cpu_schedules`` after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from prune2tvm.compile.cpu_schedules import cpu_schedules

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
