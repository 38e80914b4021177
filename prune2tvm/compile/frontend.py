"""ONNX -> Relax IRModule, with every input's shape made static and every gather bounded."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re

import numpy as np

import tvm
from tvm.relax.frontend import onnx as relax_onnx
from tvm.relax.frontend.onnx import onnx_frontend

from prune2tvm.compile.passes.bounded_gather import bound_gathers
from prune2tvm.compile.shape_folding import fold_shapes
from prune2tvm.errors import InputError, UnsupportedError
from prune2tvm.progress import say


def import_onnx(path: str | os.PathLike, input_shapes: dict[str, list[int]]) -> "tvm.IRModule":
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    check_importable(path, model)
    try:
        mod = _from_onnx(model, input_shapes)
    except Exception as exc:
        why = str(exc)
        # the importer leaves some shape computations symbolic even for static inputs, then fails
        # on them: once more with them folded into constants (``shape_folding``)
        folded, count = fold_shapes(model, input_shapes)
        if not count:
            raise UnsupportedError(f"{path}: TVM cannot import the model: {why}") from None
        try:
            mod = _from_onnx(folded, input_shapes)
        except Exception:
            raise UnsupportedError(f"{path}: TVM cannot import the model: {why}") from None
        say(f"  TVM's importer failed on the model as it is ({why}); imported it with {count} shape "
            f"computation(s) folded into constants")
    return bound_gathers(mod)


def _from_onnx(model, input_shapes: dict[str, list[int]]) -> "tvm.IRModule":
    """The importer, its error made one line that names the op it failed on (it prints that
    name on stdout, apart from the error)."""
    from prune2tvm.runtime import without_native_noise

    printed, failure = io.StringIO(), ""
    with contextlib.redirect_stdout(printed), without_native_noise():
        try:
            return relax_onnx.from_onnx(model, shape_dict=input_shapes, keep_params_in_input=False)
        except Exception as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            op = re.search(r"Error converting operator (\w+)", printed.getvalue())
            failure = f"{op.group(1)}: {last}" if op else last
        gc.collect()  # the failed import's BlockBuilder warns as it is destroyed
    raise RuntimeError(failure)


def check_importable(path: str | os.PathLike, model) -> None:
    """Every op the importer cannot convert, named at once (not just the first it meets)."""
    unsupported = unsupported_ops(model)
    if unsupported:
        raise UnsupportedError(f"{path}: the TVM ONNX importer does not support these ops: {', '.join(unsupported)}")


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


class WeightNames:
    """Names layers by their weights: the ONNX initializer (e.g. ``fc1.weight``) that holds the
    same values as a constant in the Relax module, with the layer's position in the graph.

    The importer keeps weights as anonymous constants; matching values gives users the names
    they know in the per-layer table. Weights are compared in [N, K] form (output channels
    first; a conv's [O, I, KH, KW] flattened to [O, I*KH*KW]).
    """

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}
        self._by_key: dict[str, list[tuple[int, str]]] = {}
        for position, node in enumerate(model.graph.node):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
                continue
            array = numpy_helper.to_array(inits[node.input[1]])
            if node.op_type == "MatMul" and array.ndim == 2:
                array = array.T
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                array = array if trans_b else array.T
            elif node.op_type == "Conv":
                array = array.reshape(array.shape[0], -1)
            self._by_key.setdefault(self.key(array), []).append((position, node.input[1]))

    @staticmethod
    def key(array: np.ndarray) -> str:
        import hashlib

        array = np.ascontiguousarray(array)
        return f"{array.shape}:{array.dtype}:{hashlib.sha1(array.tobytes()).hexdigest()}"

    def lookup(self, weight_nk: np.ndarray) -> tuple[int, str] | None:
        """(graph position, initializer name) of a weight; identical weights are named in turn."""
        found = self._by_key.get(self.key(weight_nk))
        return found.pop(0) if found else None
