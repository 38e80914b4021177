"""The only room that imports tvm (it renames modules between releases: keep it here).

ONNX -> Relax IRModule -> (BSR rewrite, issue #3) -> tvm.compile -> CompiledModel.
"""

from prune2tvm.compile import tvmscript

tvmscript.install()  # before any TVMScript is parsed: tuning starts 20 s sooner

from prune2tvm.compile.build import CompiledModel, InputSpec, compile_onnx, load_compiled  # noqa: E402

__all__ = ["CompiledModel", "InputSpec", "compile_onnx", "load_compiled"]
