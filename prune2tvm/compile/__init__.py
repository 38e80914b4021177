"""The only room that imports tvm (it renames modules between releases: keep it here).

ONNX -> Relax IRModule -> (BSR rewrite, issue #3) -> tvm.compile -> CompiledModel.
"""

from prune2tvm.compile.build import CompiledModel, InputSpec, compile_onnx, load_compiled

__all__ = ["CompiledModel", "InputSpec", "compile_onnx", "load_compiled"]
