"""Weight masks: which layers are prunable, magnitude masks, and holding masks in training.

``MaskHolder`` keeps pruned weights exactly zero through any optimizer: gradients of pruned
weights are zeroed before the step, the weights are re-masked after it, and optimizer state
(momentum, Adam moments) is masked too, so nothing can resurrect a pruned weight later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prune2tvm.errors import ConfigError

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def prunable_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """Conv and linear layers by module name; ``names`` selects some and must all exist."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if names is None:
        return layers
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ConfigError(f"prune.layers: {', '.join(unknown)} matches no conv or linear layer; "
                          f"valid names: {', '.join(layers)}")
    return {n: layers[n] for n in names}


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude weights; exactly round(sparsity * numel) become zero.

    Already-zero weights sort first, so masks from a rising schedule only ever grow.
    """
    count = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=weight.dtype)
    if count:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:count]] = 0
    return mask.view_as(weight)


@dataclass
class LayerSparsity:
    name: str
    shape: list[int]
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "shape": self.shape, "zeros": self.zeros, "numel": self.numel,
                "sparsity": self.sparsity}


def layer_sparsity(model: nn.Module, names: list[str] | None = None) -> list[LayerSparsity]:
    return [LayerSparsity(name, list(m.weight.shape), int((m.weight == 0).sum()), m.weight.numel())
            for name, m in prunable_layers(model, names).items()]


def overall_sparsity(stats: list[LayerSparsity]) -> float:
    total = sum(s.numel for s in stats)
    return sum(s.zeros for s in stats) / total if total else 0.0


class MaskHolder:
    """Masks for some layers' weights, applied to the weights, gradients and optimizer state."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.masks: dict[str, torch.Tensor] = {n: torch.ones_like(m.weight) for n, m in layers.items()}

    def set_sparsity(self, sparsity: float, granularity=None, scope: str = "layer") -> None:
        """Masks at ``sparsity`` (element-wise unless a ``Granularity`` is given; per layer, or
        one global ranking), applied at once."""
        from prune2tvm.prune.granularity import Granularity, layer_masks

        self.set_masks(layer_masks(self.layers, granularity or Granularity(), sparsity, scope))

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.masks[name] = mask.to(self.layers[name].weight.dtype)
        self.apply()

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        for name, layer in self.layers.items():
            mask = self.masks[name]
            layer.weight.mul_(mask)
            if optimizer is not None:
                state = optimizer.state.get(layer.weight, {})
                for key in _STATE_KEYS:
                    if key in state and state[key].shape == mask.shape:
                        state[key].mul_(mask)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(self.masks[name])
