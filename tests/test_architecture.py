"""The rules that keep the house in order: a light import, tvm only in the compile room."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prune2tvm"


def test_importing_the_package_and_the_cli_stays_light():
    code = ("import sys, prune2tvm, prune2tvm.cli, prune2tvm.config; "
            "print(sorted(m for m in ('torch', 'tvm', 'onnxruntime', 'onnx', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_runtime_needs_only_tvm_and_numpy():
    code = ("import sys, prune2tvm.runtime; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'click', 'yaml', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_the_compile_room_and_the_runtime_import_tvm():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("compile", "runtime.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "tvm" or n.startswith("tvm.") or n.startswith("tvm_ffi") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
