"""Gathers that cannot read outside their table.

TVM's ONNX importer turns ``Gather`` into ``take`` in its "fast" mode, which reads whatever an
out-of-range index points at: a token id past the vocabulary gave garbage outputs or a
segmentation fault, where onnxruntime refuses the input. After the importer's own
normalisation of negative indices, every valid index is in range, so this pass changes only
what an invalid one does: a float table yields NaN (visibly wrong, never a crash), any other
table the nearest row ("clip"; take has no NaN for integers). This is for indices computed
inside the model: an input that indexes a table directly is checked by the runtime before the
call (``InputSpec.index_bound``) and refused with the table's size in the message.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

TAKE = tvm.ir.Op.get("relax.take")


@mutator
class _BoundTakes(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != TAKE or call.attrs.mode != "fast":
            return call
        data, indices = call.args
        floating = str(data.ty.dtype).startswith(("float", "bfloat"))
        return relax.op.take(data, indices, call.attrs.axis, mode="nan" if floating else "clip")


def bound_gathers(mod: tvm.IRModule) -> tvm.IRModule:
    """Every fast-mode ``take`` of ``mod``'s Relax functions made bounded (see the module)."""
    mutator_ = _BoundTakes(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator_.builder_.update_func(gvar, mutator_.visit_expr(func))
    return mutator_.builder_.get()
