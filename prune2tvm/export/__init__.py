"""torch -> ONNX, checked against onnxruntime."""

from prune2tvm.export.onnx_export import OnnxModel, export_onnx

__all__ = ["OnnxModel", "export_onnx"]
