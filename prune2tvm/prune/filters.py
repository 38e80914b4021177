"""Filter pruning with thinning: filters ranked, then removed from the model for real.

Removing a conv's filter changes everything that reads its channels: the BatchNorm after
it, the next conv or linear layer, and every layer coupled with it through a residual add
or a concatenation (all producers of an added tensor must lose the same channels). Torch-
Pruning's dependency graph (DepGraph, Fang et al. 2023) finds those groups; it is a
well-kept library for exactly this, so it is used rather than rewritten. A group is ranked
as one (its members' importances summed) and thinned as one.

Criteria: ``l1`` and ``l2`` (filter norms, Li et al.), ``bn_scale`` (the BatchNorm's gamma,
Network Slimming), ``fpgm`` (distance to the geometric median, He et al.).

Besides the thinned model, ``thin_filters`` returns the *masked* model: the original with
every removed channel's weights, biases and BatchNorm affine parameters zeroed, which
computes the same function (a zeroed channel contributes nothing) and lets a test, or a
user, check the thinning. The plan records each group's root layer and removed indices, so
a freshly built model can be thinned the same way and load the thinned state dict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from prune2tvm.errors import ConfigError
from prune2tvm.prune.rearrange import output_layers

CRITERIA = ("l1", "l2", "bn_scale", "fpgm")


def _importance(criterion: str):
    import torch_pruning as tp

    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    if criterion == "fpgm":
        return tp.importance.FPGMImportance()
    raise ConfigError(f"filter criterion {criterion!r} is not valid; valid choices: {', '.join(CRITERIA)}")


@dataclass
class ThinningResult:
    model: nn.Module  # thinned: fewer channels
    masked: nn.Module  # the original shape, removed channels zeroed: the same function
    removed: list[tuple[str, list[int]]] = field(default_factory=list)  # (root layer, output channels), in order
    params: tuple[int, int] = (0, 0)  # before, after
    macs: tuple[int, int] = (0, 0)


def thin_filters(model: nn.Module, example: torch.Tensor, sparsity: float, criterion: str = "l1",
                 scope: str = "layer", keep_outputs: bool = True) -> ThinningResult:
    """Remove ``sparsity`` of the filters of every conv and linear layer (per layer, or ranked
    over all layers with scope "global"), thinning everything coupled to them. The layer that
    produces the model's output is left whole unless ``keep_outputs`` is false."""
    import torch_pruning as tp

    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"filter sparsity {sparsity} is out of range; valid: 0 <= value < 1")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope {scope!r} is not valid; valid choices: layer, global")
    model = copy.deepcopy(model).eval()
    masked = copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in output_layers(model)] if keep_outputs else []
    macs_before, params_before = tp.utils.count_ops_and_params(model, example)
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(criterion), pruning_ratio=sparsity,
                                  global_pruning=scope == "global", ignored_layers=ignored)
    removed = []
    masked_modules = dict(masked.named_modules())
    alive: dict[str, list[int]] = {}  # per module, the original index of each channel still there
    for group in pruner.step(interactive=True):
        root, idxs = group[0][0].target.module, [int(i) for i in group[0][1]]
        removed.append((names[id(root)], sorted(idxs)))
        for dep, dep_idxs in group:
            module = dep.target.module
            if id(module) in names and (_is_out_channel_pruner(dep.handler)
                                        or isinstance(module, nn.modules.batchnorm._BatchNorm)):
                # a BatchNorm's channels are its inputs and its outputs: reached either way. The
                # indices are the module's as earlier groups left it: map them to the original
                name = names[id(module)]
                current = alive.setdefault(name, list(range(_channels(masked_modules[name]))))
                gone = {current[int(i)] for i in dep_idxs}
                _zero_outputs(masked_modules[name], sorted(gone))
                alive[name] = [c for c in current if c not in gone]
        group.prune()
    macs_after, params_after = tp.utils.count_ops_and_params(model, example)
    return ThinningResult(model, masked, removed, (int(params_before), int(params_after)),
                          (int(macs_before), int(macs_after)))


def apply_thinning(model: nn.Module, example: torch.Tensor, removed: list[tuple[str, list[int]]]) -> nn.Module:
    """Thin a freshly built ``model`` (in place) as a plan's ``removed`` says."""
    import torch_pruning as tp

    with torch.enable_grad():  # the dependency graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    for name, idxs in removed:
        layer = modules.get(name)
        if layer is None:
            raise ConfigError(f"the plan names layer {name}, which this model does not have")
        handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        if any(i >= layer.weight.shape[0] for i in idxs):
            raise ConfigError(f"the plan removes channel {max(idxs)} of {name}, which has {layer.weight.shape[0]}")
        group = graph.get_pruning_group(layer, handler, idxs=list(idxs))
        if not graph.check_pruning_group(group):
            raise ConfigError(f"the plan would remove every channel of a layer coupled with {name}")
        group.prune()
    return model


def _channels(module: nn.Module) -> int:
    return int(module.weight.shape[0]) if getattr(module, "weight", None) is not None else int(module.num_features)


def _is_out_channel_pruner(handler) -> bool:
    return getattr(handler, "__name__", "") == "prune_out_channels"


@torch.no_grad()
def _zero_outputs(module: nn.Module, idxs: list[int]) -> None:
    for attr in ("weight", "bias"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            tensor[idxs] = 0


def filter_prune(dense: nn.Module, data, prune, train, final_sparsity: float, seed: int, name: str):
    """Thin ``final_sparsity`` of the filters once, then fine-tune the smaller model for
    ``prune.fine_tune_epochs`` epochs. The result's layer table counts removed weights as
    zeros, against the dense layer's size."""
    from prune2tvm.prune.agp_prune import PruneResult
    from prune2tvm.prune.masks import LayerSparsity, prunable_layers
    from prune2tvm.prune.plan import PruningPlan
    from prune2tvm.train import make_optimizer, train_epochs

    example = torch.from_numpy(data.train.x[:1])
    result = thin_filters(dense, example, final_sparsity, prune.criterion, prune.scope)
    model = result.model
    optimizer = make_optimizer(model, train, lr=prune.lr)
    history = train_epochs(model, data.train, data.val, train, prune.fine_tune_epochs, seed, optimizer,
                           desc=f"fine-tune {name}")
    model.eval()
    thinned = prunable_layers(model)
    layers = [LayerSparsity(n, list(m.weight.shape), m.weight.numel() - thinned[n].weight.numel(), m.weight.numel())
              for n, m in prunable_layers(dense, prune.layers).items()]
    plan = PruningPlan("filter", [], input_shape=list(example.shape[1:]),
                       thinned=[[n, idxs] for n, idxs in result.removed])
    return PruneResult(name, model, final_sparsity, layers, history, [final_sparsity] * prune.fine_tune_epochs, plan,
                       {})
