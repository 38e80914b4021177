"""What ``prune2tvm env`` reports: toolchain versions, CPU, compilers."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata

from prune2tvm.runtime import host_arch
from prune2tvm.runtime import host_cpu_flags as host_cpu_features

_DISTRIBUTIONS = [("prune2tvm", "prune2tvm"), ("torch", "torch"), ("tvm", "apache-tvm"),
                  ("tvm-ffi", "apache-tvm-ffi"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                  ("numpy", "numpy")]
_INTERESTING_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                         "avx512_bf16", "amx_tile", "neon", "asimd", "sve")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(tool: str, flag: str = "--version") -> str:
    path = shutil.which(tool)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{path} (version unknown)"
    lines = [line for line in out.splitlines() if line.strip()]
    return f"{path} ({lines[-1].strip() if lines else 'version unknown'})"


def collect() -> dict[str, str]:
    info = {"python": platform.python_version()}
    info.update({name: _version(dist) for name, dist in _DISTRIBUTIONS})
    info["machine"] = f"{host_arch()}, {platform.system()} {platform.release()}"
    try:
        from prune2tvm.compile.target import host_cpu_name

        info["llvm host cpu"] = host_cpu_name()
    except ImportError:
        info["llvm host cpu"] = "unknown (tvm not importable)"
    features = host_cpu_features()
    info["cpu features"] = " ".join(f for f in _INTERESTING_FEATURES if f in features) or "none detected"
    import os

    info["cpu cores"] = str(os.cpu_count())
    info["nvcc"] = _tool_version("nvcc")
    info["nvidia gpu"] = "present" if shutil.which("nvidia-smi") and _gpu_present() else "none"
    info["aarch64 cross gcc"] = _tool_version("aarch64-linux-gnu-gcc")
    return info


def _gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
