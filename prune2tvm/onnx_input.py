"""ONNX files from users (often from the internet), checked before anything reads them further.

Every problem is one ``InputError`` naming the file and what would be valid: a missing,
empty, truncated or non-ONNX file; an opset outside what the importer handles; a graph that
``onnx.checker`` refuses; external data outside the model's directory; dynamic dimensions
with no static shape given. ``onnx`` is imported here only when a check runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from prune2tvm.errors import InputError

# The oldest opset whose ops the TVM Relax importer converts (its converters start at
# opset 1-13 depending on the op; older exports use semantics it does not implement).
MIN_OPSET = 11
REEXPORT = "re-export it, e.g. torch.onnx.export(..., opset_version=17)"


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file (expected {what})")
    if not p.is_file():
        raise InputError(f"{path}: not a file (expected {what})")
    if p.stat().st_size == 0:
        raise InputError(f"{path}: empty file (expected {what})")
    return p


def check_onnx_file(path: str | os.PathLike):
    """The parsed model (external data not loaded), or an ``InputError`` saying what is wrong."""
    import onnx
    from onnx import checker, defs

    p = require_file(path, "ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError has no public base class
        raise InputError(f"{path}: not a readable ONNX model (truncated, or not ONNX: {type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated, or not ONNX)")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    newest = defs.onnx_opset_version()
    opset = opsets.get("ai.onnx")
    if opset is None:
        raise InputError(f"{path}: declares no ai.onnx opset; valid: opset {MIN_OPSET} to {newest}")
    if opset < MIN_OPSET:
        raise InputError(f"{path}: opset {opset} is too old; valid: opset {MIN_OPSET} to {newest} ({REEXPORT})")
    if opset > newest:
        raise InputError(f"{path}: opset {opset} is newer than this onnx {onnx.__version__} knows; "
                         f"valid: opset {MIN_OPSET} to {newest} ({REEXPORT})")
    _check_external_data(p, model)
    try:
        checker.check_model(model)
    except Exception as exc:  # ValidationError, or the C++ checker's own errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: fails onnx.checker: {first}") from None
    return model


def _check_external_data(path: Path, model) -> None:
    """External tensors must be files beside the model (no absolute paths, no '..')."""
    from onnx.external_data_helper import uses_external_data

    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{path}: initializer {tensor.name!r} points outside the model's directory "
                             f"({location!r}); valid: a file name beside the model")
        if not (path.parent / rel).is_file():
            raise InputError(f"{path}: initializer {tensor.name!r} needs external data {location!r}, "
                             f"which is not beside the model")


def read_io(path: str | os.PathLike) -> tuple[list[tuple[str, list]], list[str]]:
    """``graph_io`` of an ONNX file."""
    import onnx

    return graph_io(onnx.load(str(path), load_external_data=False))


def graph_io(model) -> tuple[list[tuple[str, list]], list[str]]:
    """Input names with dims (None where symbolic) and output names; initializers excluded."""
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        inputs.append((value.name, dims))
    return inputs, [o.name for o in model.graph.output]


def input_types(model) -> dict[str, tuple[str, int | None]]:
    """Each graph input's numpy dtype and ``index_bound``: for an input that a ``Gather`` reads
    as indices into a constant table (token ids into an embedding), the rows of the smallest such
    table, else None. The runtime refuses indices outside it; random test inputs stay inside."""
    from onnx import helper

    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:  # (dims only: a Constant may hold a whole weight)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            dims = tables[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims and -len(dims) <= axis < len(dims):
                bounds[node.input[1]] = min(bounds.get(node.input[1], dims[axis]), dims[axis])
    types = {}
    for value in model.graph.input:
        if value.name in tables:
            continue
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        except (KeyError, ValueError):  # undefined, or a type numpy lacks: the importer will say
            dtype = "float32"
        types[value.name] = (dtype, bounds.get(value.name) if dtype.startswith(("int", "uint")) else None)
    return types


def parse_shape(text: str, option: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"{option}: {text!r} is not a shape; valid: positive integers separated by commas, e.g. 1,8,8")
    return dims


def static_shapes(path: str | os.PathLike, model, batch_size: int, overrides: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Every input's static shape: a symbolic first (batch) dimension takes ``batch_size``;
    ``NAME=D0,D1,...`` overrides set the others; any dimension still unknown is an error."""
    inputs, _ = graph_io(model)
    names = [name for name, _ in inputs]
    given: dict[str, list[int]] = {}
    for item in overrides:
        name, sep, dims = item.partition("=")
        if not sep:
            raise InputError(f"--input-shape: {item!r} is not NAME=D0,D1,...; inputs: {', '.join(names)}")
        if name not in names:
            raise InputError(f"--input-shape: {path} has no input {name!r}; its inputs: {', '.join(names)}")
        given[name] = parse_shape(dims, f"--input-shape {name}")
    shapes = {}
    for name, dims in inputs:
        shape = given.get(name)
        if shape is None:
            shape = [batch_size if (i == 0 and d is None) else d for i, d in enumerate(dims)]
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise InputError(f"--input-shape {name}: {shape} does not fit {path}'s {_show(dims)} "
                             f"(only its dynamic dimensions can be set)")
        unknown = [i for i, d in enumerate(shape) if d is None]
        if unknown:
            example = ",".join(str(d if d is not None else 128) for d in shape)
            where = f"dimension{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} (counting from 0)"
            raise InputError(f"{path}: input {name!r} {_show(dims)} has no size for {where}; "
                             f"give a static shape, e.g. --input-shape {name}={example}")
        shapes[name] = [int(d) for d in shape]
    return shapes


def _show(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
