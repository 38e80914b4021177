"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019), element-wise and in 1xN blocks.

At every step, over all the pruned layers together, the Q units with the largest first-order
Taylor score |w * dL/dw| (summed over the unit for blocks) are "active": they get gradient
and weight decay; every other unit gets only weight decay, so it shrinks geometrically
towards zero while the active ones learn to do without it. Q is a global budget
(``keep = 1 - sparsity`` of the weights), not a per-layer rate: layers keep what the loss
says they need. Both go through momentum:

    z <- beta * z + eta * w + active * dL/dw,     w <- w - lr * z

At the end the units outside the last active set are set exactly zero and held there
(``final_masks``), which, after the decay, changes the model's outputs very little.
Parameters other than the pruned weights (biases, BatchNorm) take plain momentum SGD.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from prune2tvm.config import PruneConfig, TrainConfig
from prune2tvm.data import DatasetSplits
from prune2tvm.prune.granularity import Granularity, layer_masks
from prune2tvm.prune.masks import MaskHolder, layer_sparsity
from prune2tvm.train import train_epochs


class GlobalSparseMomentum(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], granularity: Granularity, sparsity: float,
                 lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"GSM sparsity {sparsity} is out of range; valid: 0 <= value < 1")
        if granularity.kind not in ("element", "block"):
            raise ValueError(f"GSM prunes elements or blocks, not {granularity.kind}s")
        self.layers, self.granularity, self.sparsity = layers, granularity, sparsity
        pruned = {id(m.weight) for m in layers.values()}
        groups = [{"params": [m.weight for m in layers.values()], "gsm": True},
                  {"params": [p for p in model.parameters() if id(p) not in pruned], "gsm": False}]
        super().__init__([g for g in groups if g["params"]],
                         {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.active: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] | None = None  # once set: plain momentum SGD on these units

    @torch.no_grad()
    def _active_masks(self) -> dict[str, torch.Tensor]:
        """The top units by |w * grad| over all layers: weight-shaped 0/1 masks."""
        saliency = {}
        for name, layer in self.layers.items():
            grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
            saliency[name] = SimpleNamespace(weight=(layer.weight * grad).abs())  # what the masks rank by
        return layer_masks(saliency, self.granularity, self.sparsity, scope="global")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.active = self.fixed if self.fixed is not None else self._active_masks()
        active_by_param = {id(self.layers[n].weight): m for n, m in self.active.items()}
        for group in self.param_groups:
            lr, beta, eta = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if group["gsm"]:
                    grad = grad * active_by_param[id(p)]
                step = grad + eta * p
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = step.clone()
                else:
                    buf.mul_(beta).add_(step)
                p.add_(buf, alpha=-lr)
        return loss

    def final_masks(self) -> dict[str, torch.Tensor]:
        """Keep the active units of the last step (or, before any step, the largest)."""
        if self.active:
            return self.active
        return layer_masks(self.layers, self.granularity, self.sparsity, scope="global")


def gsm_prune(dense: nn.Module, data: DatasetSplits, prune: PruneConfig, train: TrainConfig,
              final_sparsity: float, seed: int, name: str):
    """GSM training for ``prune.fine_tune_epochs`` epochs, then the inactive units zeroed and
    held for the last ``prune.fine_tune_epochs - prune.end_epoch`` of them."""
    from prune2tvm.prune.agp_prune import PruneResult, pruning_layers
    from prune2tvm.prune.plan import PruningPlan

    model = copy.deepcopy(dense)
    granularity = prune.granularity_spec()
    layers, skipped = pruning_layers(model, prune, granularity)
    optimizer = GlobalSparseMomentum(model, layers, granularity, final_sparsity, lr=prune.lr or train.lr,
                                     momentum=train.momentum, weight_decay=max(train.weight_decay, 1e-4))
    holder = MaskHolder(layers)
    held = {"on": False}

    def before_epoch(epoch: int) -> None:
        if epoch == prune.end_epoch:  # GSM until here, then the mask is fixed and held
            holder.set_masks(optimizer.final_masks())
            optimizer.fixed = dict(holder.masks)
            held["on"] = True

    def before_step() -> None:
        if held["on"]:
            holder.mask_gradients()

    def after_step() -> None:
        if held["on"]:
            holder.apply(optimizer)

    history = train_epochs(model, data.train, data.val, train, prune.fine_tune_epochs, seed, optimizer,
                           desc=f"GSM {name}", before_epoch=before_epoch, before_step=before_step,
                           after_step=after_step)
    model.eval()
    schedule = [0.0 if e < prune.end_epoch else final_sparsity for e in range(prune.fine_tune_epochs)]
    plan = PruningPlan.from_model(model, holder.masks, granularity, "gsm")
    return PruneResult(name, model, final_sparsity, layer_sparsity(model, list(layers)), history, schedule, plan,
                       skipped)
