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

A layer is rearranged only when its output reaches exactly one conv or linear layer through
ops that act on each channel alone (BatchNorm, activations, pooling, dropout, flatten). A
layer whose output meets another's (a residual add, a concatenation) or is used twice is
left in its order and reported: permuting it would need every coupled layer permuted alike.
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


def filter_order(weight: torch.Tensor) -> torch.Tensor:
    """Output channels by descending L1 norm (stable): similar filters become neighbours."""
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    return torch.argsort(norms, descending=True, stable=True)


@torch.no_grad()
def permute_chain(model: nn.Module, chain: Chain, order: torch.Tensor) -> None:
    """Put ``chain.producer``'s output channels in ``order``, and everything that reads them
    alike, so the model computes the same function."""
    modules = dict(model.named_modules())
    producer = modules[chain.producer]
    _take(producer, "weight", order, 0)
    _take(producer, "bias", order, 0)
    for name in chain.norms:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _take(modules[name], attr, order, 0)
    consumer = modules[chain.consumer]
    columns = consumer.weight.shape[1]
    channels = order.numel()
    if columns == channels:
        _take(consumer, "weight", order, 1)
    elif chain.flatten and columns % channels == 0:  # flatten(C, H, W): channel c is columns c*HW .. c*HW+HW-1
        per = columns // channels
        _take(consumer, "weight", (order[:, None] * per + torch.arange(per)[None, :]).reshape(-1), 1)
    else:
        raise ValueError(f"{chain.consumer} reads {columns} columns from {channels} channels of {chain.producer}")


def _take(module: nn.Module, attr: str, order: torch.Tensor, dim: int) -> None:
    tensor = getattr(module, attr, None)
    if tensor is None:
        return
    tensor.copy_(tensor.index_select(dim, order))


def rearrange_filters(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Order the output channels of the layers ``names`` by L1 norm, physically (see the
    module's docstring). Returns each rearranged layer's order, and why others were not."""
    chains, refused = trace_chains(model)
    modules = dict(model.named_modules())
    orders, skipped = {}, {}
    for name in names:
        if name not in chains:
            skipped[name] = refused.get(name, refused.get("*", "not a conv or linear layer of the traced model"))
            continue
        order = filter_order(modules[name].weight)
        permute_chain(model, chains[name], order)
        orders[name] = order
    return orders, skipped
