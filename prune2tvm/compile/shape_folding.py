"""Shape computations of an ONNX graph folded into constants, once its input shapes are static.

Exports with dynamic axes compute shapes at run time: ``Shape``, ``Gather``, ``Range``,
``Expand``, ``ConstantOfShape`` chains, e.g. the position ids of a transformer
(``torch.arange(seq).expand(batch, seq)``). TVM's importer leaves some of these symbolic even
when the inputs are static, and then fails on them (its ``Expand`` converter: "Cannot use and /
or / not operator to Expr"). With the shapes fixed, every such value is a small constant.

``fold_shapes`` evaluates each node whose inputs are all known small constants (or the shape of
a tensor whose shape inference found static), with onnx's reference evaluator at the model's
opset, and replaces it with an initializer. Weights (large initializers) are never touched, so
layers keep their initializers and names. ``import_onnx`` uses this only when the importer
fails on the model as it is; the build is still checked against onnxruntime on the original.
"""

from __future__ import annotations

import numpy as np

SMALL = 4096  # elements: shape values, index tables, masks; weights are larger and stay as they are
NEVER = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
         "If", "Loop", "Scan"}  # not deterministic, or with subgraphs


def fold_shapes(model, input_shapes: dict[str, list[int]]):
    """A copy of ``model`` with ``input_shapes`` set and its small constant computations folded
    (see the module), and how many nodes were folded."""
    import onnx
    from onnx import numpy_helper, shape_inference

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # (not through bytes: a model over 2 GB cannot be serialised)
    model = copy
    graph = model.graph
    for value in graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor.shape.dim]
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer if _size(i.dims) <= SMALL}
    opsets = list(model.opset_import)
    outputs = {o.name for o in graph.output}
    kept, folded = [], {}
    for node in graph.node:
        values = _evaluate(node, known, shapes, opsets) if not set(node.output) & outputs else None
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            known[name] = folded[name] = value
    if not folded:
        return model, 0
    used = {name for node in kept for name in node.input}
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n) for n, v in folded.items() if n in used)
    del graph.value_info[:]  # inferred for the old graph
    model.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    return model, len(folded)


def _size(dims) -> int:
    return int(np.prod(list(dims), dtype=np.int64)) if len(dims) else 1


def _evaluate(node, known: dict, shapes: dict, opsets) -> list | None:
    """The node's outputs as small arrays, or None when it cannot or should not be folded."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.domain not in ("", "ai.onnx") or node.op_type in NEVER:
        return None
    if node.op_type == "Shape" and node.input[0] in shapes:
        shape = shapes[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}  # negative start / end count from the end, as slices do
        return [np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)]
    if node.op_type == "Size" and node.input[0] in shapes:
        return [np.array(_size(shapes[node.input[0]]), np.int64)]
    names = [name for name in node.input if name]
    if not all(name in known for name in names):
        return None
    if node.op_type != "Constant" and not names:
        return None
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(known[n].dtype), None) for n in names]
    outputs = [helper.make_tensor_value_info(n, 0, None) for n in node.output if n]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    try:
        evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets))
        results = evaluator.run(None, {n: known[n] for n in names})
    except Exception:  # an op the reference evaluator lacks: leave it to the importer
        return None
    if any(np.asarray(r).size > SMALL for r in results):
        return None
    return [np.asarray(r) for r in results]
