"""Where a compiled model's time goes: every kernel call timed through the Relax VM's
instrument hook, and attributed to the weight layers of the compile table.

The VM calls kernels in graph order, and the compile table lists the weight layers in graph
order, so calls are matched to layers in turn:

- prune2tvm's own kernels (``bsr_matmul``, ``bsr_conv2d``, ``depthwise_conv2d``) each compute
  one weight layer; ``expand_depthwise`` computes two (a 1x1 conv and the depthwise conv
  after it), and its time is the first's (the second keeps ``ms = None``, its kernel named);
- a dense TVM kernel (``conv2d``, ``matmul`` or ``dense`` in its name, fused with its epilogue)
  is the layer whose weight it takes (an argument of the weight's shape, or its transpose);
- the layout copies made for a layer's kernel (``pad_flat``, ``pad_phases``) count for the
  layer that reads them;
- prune2tvm's ``batch_matmul`` is the table's next product of two activations of its output's
  shape (attention's Q @ K.T and softmax @ V).

Everything else (pooling, reshapes, adds not fused, products left to TVM's op) is "other". A
layer no call could be matched to keeps ``ms = None``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

LAYER_KERNELS = ("bsr_matmul", "bsr_conv2d", "depthwise_conv2d", "expand_depthwise")
TWO_LAYER_KERNELS = ("expand_depthwise",)
INPUT_PREP = ("pad_flat", "pad_phases")
PRODUCT_KERNELS = ("batch_matmul",)  # a product of two activations (the table lists it)
PRODUCT = "two activations"  # how the table's reason for one begins (``passes.activation_matmul.PRODUCT``)
DENSE_OPS = ("conv2d", "matmul", "dense")


@dataclass
class LayerTime:
    name: str
    op: str
    kind: str  # "bsr" or "dense"
    weight_shape: list[int]
    block_sparsity: float | None
    density: float | None
    ms: float | None  # per model call; None when no kernel call was matched to it
    share: float | None  # of the total kernel time
    kernels: list[str] = field(default_factory=list)


@dataclass
class Profile:
    total_ms: float  # all kernel calls of one model call, instrumented
    layers: list[LayerTime]
    other_ms: float
    other: dict[str, float]  # kernel name -> ms, what no layer accounts for
    runs: int

    def to_json(self) -> dict:
        return asdict(self)


def _base(name: str) -> str:
    return "VM builtins" if name.startswith("vm.builtin.") else name.rstrip("0123456789_")


def _takes_weight(shapes: list[tuple[int, ...]], weight_shape: list[int]) -> bool:
    w = tuple(weight_shape)
    return any(s == w or (len(w) == 2 and s == w[::-1]) for s in shapes)


def attribute(calls: list[tuple[str, list[tuple[int, ...]]]], layers: list[dict]) -> list[int | None]:
    """For each call (kernel name, argument shapes): the index of the layer it computes (or
    prepares the input of), or None for "other"."""
    owner: list[int | None] = [None] * len(calls)
    pending: list[int] = []
    nxt = 0
    for i, (name, shapes) in enumerate(calls):
        if nxt >= len(layers):
            break
        if name.startswith(INPUT_PREP):
            pending.append(i)
            continue
        ours = name.startswith(LAYER_KERNELS)
        found = None
        if ours:
            found = nxt
        elif name.startswith(PRODUCT_KERNELS):  # the table's entry of the product: its shape is the output's
            out = shapes[-1] if shapes else ()
            found = next((j for j in range(nxt, min(nxt + 4, len(layers)))
                          if layers[j].get("reason", "").startswith(PRODUCT)
                          and math.prod(layers[j]["weight_shape"]) == math.prod(out)
                          and tuple(layers[j]["weight_shape"][-2:]) == tuple(out[-2:])), None)
        elif any(op in name for op in DENSE_OPS):
            found = next((j for j in range(nxt, min(nxt + 4, len(layers)))
                          if _takes_weight(shapes, layers[j]["weight_shape"])), None)
        if found is None:
            continue
        for j in pending + [i]:
            owner[j] = found
        pending = []
        nxt = found + (2 if name.startswith(TWO_LAYER_KERNELS) else 1)
    return owner


def profile_layers(machine, args: list, layers: list[dict], repeat: int = 10, warmup: int = 3) -> Profile:
    """Time each kernel call of ``machine["main"](*args)`` over ``repeat`` calls (after
    ``warmup`` plain ones) and attribute them to ``layers`` (the compile table)."""
    fn = machine["main"]
    for _ in range(warmup):
        fn(*args)
    sequence: list[tuple[str, list[tuple[int, ...]]]] = []
    elapsed: list[float] = []
    state = {"index": 0, "start": 0.0, "record": True}

    def instrument(func, name, before_run, ret, *call_args):
        if before_run:
            state["start"] = time.perf_counter()
            return 0
        took = (time.perf_counter() - state["start"]) * 1e3
        if state["record"]:
            sequence.append((str(name), [tuple(int(d) for d in a.shape) for a in call_args if hasattr(a, "shape")]))
            elapsed.append(took)
        else:
            elapsed[state["index"]] += took
            state["index"] += 1
        return 0

    machine.set_instrument(instrument)
    try:
        fn(*args)
        state["record"] = False
        for _ in range(repeat - 1):
            state["index"] = 0
            fn(*args)
    finally:
        machine.set_instrument(lambda *a: 0)
    per_call = [t / repeat for t in elapsed]
    owner = attribute(sequence, layers)
    layer_ms: dict[int, float] = defaultdict(float)
    layer_kernels: dict[int, list[str]] = defaultdict(list)
    other: dict[str, float] = defaultdict(float)
    for (name, _), ms, who in zip(sequence, per_call, owner):
        if who is None:
            other[_base(name)] += ms
        else:
            layer_ms[who] += ms
            layer_kernels[who].append(name)
            if name.startswith(TWO_LAYER_KERNELS):
                layer_kernels[who + 1].append(name)
    total = sum(per_call)
    rows = [LayerTime(layer["name"], layer["op"], layer["kind"], list(layer["weight_shape"]), layer.get("block_sparsity"),
                      layer.get("density"), layer_ms.get(j), layer_ms[j] / total if j in layer_ms and total else None,
                      layer_kernels.get(j, []))
            for j, layer in enumerate(layers)]
    return Profile(total, rows, sum(other.values()), dict(sorted(other.items(), key=lambda kv: -kv[1])), repeat)
