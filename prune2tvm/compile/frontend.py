"""ONNX -> Relax IRModule, with every input's shape made static."""

from __future__ import annotations

import os

import tvm
from tvm.relax.frontend import onnx as relax_onnx
from tvm.relax.frontend.onnx import onnx_frontend

from prune2tvm.errors import InputError, UnsupportedError


def import_onnx(path: str | os.PathLike, input_shapes: dict[str, list[int]]) -> "tvm.IRModule":
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    unsupported = unsupported_ops(model)
    if unsupported:
        raise UnsupportedError(f"{path}: the TVM ONNX importer does not support these ops: {', '.join(unsupported)}")
    try:
        return relax_onnx.from_onnx(model, shape_dict=input_shapes, keep_params_in_input=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"{path}: TVM cannot import the model: {first}") from None


def unsupported_ops(model) -> list[str]:
    """Every op type of the graph (subgraphs included) that the importer has no converter for."""
    # A private table of the importer; without it, import errors still name the first bad op.
    get_map = getattr(onnx_frontend, "_get_convert_map", None)
    if get_map is None:
        return []
    table = get_map()
    seen: set[str] = set()

    def walk(graph):
        for node in graph.node:
            seen.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return sorted(op for op in seen if op not in table)
