"""Filter rearrangement for 1xN block pruning (Lin et al.), done to the weights themselves.

1xN pruning removes blocks of N consecutive output channels at one input position. Which
filters share a block matters: if a block holds one important filter and three weak ones, it
stays (and keeps the weak ones) or goes (and takes the important one). Rearrangement orders
each layer's filters by L1 norm first, so filters of similar importance share blocks.

The 1xN reference code permuted only the mask, so the exported weights still had the
original order and its kept blocks were not contiguous. Here the permutation is applied to
the model: the layer's output channels (weight rows and bias), the BatchNorm after it, and
the input channels of the layer that consumes them (a conv's weight columns, or a linear
layer's columns behind a flatten, each channel's H x W block of them). The model computes
the same function, and the pruned blocks are real contiguous 1xN blocks in the ONNX export.

Layers coupled by a residual add share one order: Torch-Pruning's dependency graph gives the
group of everything that reads or writes those channels (every producer of the added tensor,
their BatchNorms, every consumer, depthwise convs in between, flattens), the group's
producers are ranked together by their summed filter norms, and all members are permuted
alike. Through a concatenation only the requested producer's part of the channels moves.
The layer whose output channels are the model's outputs is never rearranged, nor a group
holding a module prune2tvm cannot permute (normalisations other than BatchNorm, attention).

``trace_chains`` (torch.fx) describes the simple case, a layer feeding exactly one conv or
linear layer through per-channel ops; it also finds the output layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

# modules and functions that map each channel to itself (in place, no mixing)
_CHANNELWISE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
                        nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNELWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.sigmoid, torch.tanh,
                          torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.hardtanh,
                          torch.nn.functional.dropout, torch.nn.functional.adaptive_avg_pool2d,
                          torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


OUTPUT_LAYER = "its output channels are the model's outputs"


@dataclass
class Chain:
    """A layer, the BatchNorms that follow it, and the layer that consumes its channels."""

    producer: str
    norms: list[str]
    consumer: str
    flatten: bool  # a flatten between them (the consumer sees H*W columns per channel)


def trace_chains(model: nn.Module) -> tuple[dict[str, Chain], dict[str, str]]:
    """Chains of every conv / linear layer that can be rearranged, and why the others cannot."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow, etc.
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return {}, {"*": f"the model cannot be traced with torch.fx ({first})"}
    modules = dict(model.named_modules())
    chains, refused = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        layer = modules[node.target]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            refused[node.target] = f"grouped conv (groups={layer.groups})"
            continue
        chain, why = _follow(node, modules)
        if chain is None:
            refused[node.target] = why
        else:
            chains[node.target] = chain
    return chains, refused


def _follow(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Chain | None, str]:
    norms, flatten, current = [], False, node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return (None, "its output is used more than once (e.g. a residual branch)") if users else \
                (None, "its output is unused")
        user = users[0]
        if user.op == "output":
            return None, OUTPUT_LAYER
        if user.op == "call_module":
            mod = modules[user.target]
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                    return None, f"its output feeds a grouped conv ({user.target})"
                if user.args[0] is not current:
                    return None, f"its output reaches {user.target} other than as its input"
                return Chain(node.target, norms, user.target, flatten), ""
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                norms.append(user.target)
            elif isinstance(mod, nn.Flatten):
                flatten = True
            elif not isinstance(mod, _CHANNELWISE_MODULES):
                return None, f"its output goes through {type(mod).__name__} ({user.target})"
        elif user.op == "call_function" and user.target in (torch.flatten,):
            flatten = True
        elif user.op == "call_method" and user.target == "flatten":
            flatten = True  # checked against the consumer's width when applied
        elif not ((user.op == "call_function" and user.target in _CHANNELWISE_FUNCTIONS)
                  or (user.op == "call_method" and user.target in _CHANNELWISE_METHODS)):
            what = getattr(user.target, "__name__", str(user.target))
            return None, f"its output meets {what} (channels coupled with other layers)"
        if user.args[0] is not current:
            return None, "its output is not the first operand of what follows"
        current = user


def output_layers(model: nn.Module) -> list[str]:
    """The conv / linear layers whose output channels are the model's outputs (by torch.fx;
    for a model fx cannot trace, the last conv / linear layer)."""
    _, refused = trace_chains(model)
    outputs = [n for n, why in refused.items() if why == OUTPUT_LAYER]
    if not outputs:
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        outputs = layers[-1:]
    return outputs


_PERMUTABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def _group(model: nn.Module, graph, name: str, order: list[int]):
    """The dependency group of ``name``'s output channels, indices mapped from ``order``: a
    list of (module name, "out" | "in", indices), or a string saying why it cannot be permuted."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    layer = modules[name]
    handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    members = []
    for dep, idxs in graph.get_pruning_group(layer, handler, idxs=list(order)):
        module = dep.target.module
        if id(module) not in names:  # an add, a concat, a flatten: no weights of its own
            continue
        if not isinstance(module, _PERMUTABLE):
            return f"its channels reach {type(module).__name__} ({names[id(module)]}), which is not permuted here"
        side = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
        members.append((names[id(module)], side, [int(i) for i in idxs]))
    return members


@torch.no_grad()
def _permute_group(model: nn.Module, members) -> None:
    modules = dict(model.named_modules())
    done = set()
    for name, side, idxs in members:
        module = modules[name]
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.out_channels == module.in_channels
        dim = 0 if side == "out" or isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) or depthwise else 1
        if (name, dim) in done:
            continue
        done.add((name, dim))
        index = torch.tensor(idxs)
        tensors = ("weight", "bias", "running_mean", "running_var") if dim == 0 else ("weight",)
        for attr in tensors:
            tensor = getattr(module, attr, None)
            if tensor is None:
                continue
            if dim == 1 and isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(f"{name}: a grouped conv's input channels cannot be permuted")
            # only the indexed part moves (through a concat, the other producers keep theirs)
            tensor.index_copy_(dim, torch.tensor(sorted(idxs)), tensor.index_select(dim, index))


def rearrange_filters(model: nn.Module, names: list[str], example: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Order the output channels of the layers ``names`` by L1 norm, physically, with every
    layer coupled to them (see the module's docstring). Returns each rearranged layer's order
    (layers that share a group with an earlier one are rearranged with it and not listed),
    and why the others were not rearranged."""
    import torch_pruning as tp

    outputs = set(output_layers(model))
    modules = dict(model.named_modules())
    with torch.enable_grad():  # the dependency graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    orders, skipped, done = {}, {}, set()
    for name in names:
        if name in done:
            continue
        layer = modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            skipped[name] = f"grouped conv (groups={layer.groups})"
            continue
        members = _group(model, graph, name, list(range(layer.weight.shape[0])))
        if isinstance(members, str):
            skipped[name] = members
            continue
        producers = sorted({n for n, side, _ in members if side == "out" and isinstance(modules[n], (nn.Conv2d, nn.Linear))})
        if outputs & set(producers):
            skipped[name] = OUTPUT_LAYER if name in outputs else f"coupled with the output layer {sorted(outputs & set(producers))[0]}"
            continue
        norms = sum(modules[n].weight.detach().abs().reshape(modules[n].weight.shape[0], -1).sum(1) for n in producers)
        order = torch.argsort(norms, descending=True, stable=True)
        apply_order(model, graph, name, order)
        orders[name] = order
        done.update(producers)
        for other in producers:
            if other != name and other in names:
                skipped[other] = f"rearranged with {name} (coupled by a residual add)"
    return orders, skipped


def apply_order(model: nn.Module, graph, name: str, order: torch.Tensor) -> None:
    """Put ``name``'s output channels (and its whole dependency group's) in ``order``."""
    members = _group(model, graph, name, [int(i) for i in order])
    if isinstance(members, str):
        raise ValueError(f"{name}: {members}")
    _permute_group(model, members)
