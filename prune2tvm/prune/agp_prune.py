"""AGP pruning of a trained model at any granularity, fine-tuning while the mask holds.

Layers that cannot be pruned at the granularity (a grouped conv for blocks, filters or
channels; a shape that does not divide into the block; the layer whose filters are the
model's outputs, for filter pruning) are left dense and listed with the reason. With filter
rearrangement (1xN), each rearrangeable layer's filters are put in L1 order once, before the
first mask, so its blocks group filters of similar strength (``prune.rearrange``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from prune2tvm.config import PruneConfig, TrainConfig
from prune2tvm.data import DatasetSplits
from prune2tvm.prune.agp import AGPSchedule
from prune2tvm.prune.granularity import Granularity
from prune2tvm.prune.masks import LayerSparsity, MaskHolder, layer_sparsity, overall_sparsity, prunable_layers
from prune2tvm.prune.plan import PruningPlan
from prune2tvm.train import EpochLog, make_optimizer, train_epochs


@dataclass
class PruneResult:
    name: str
    model: nn.Module
    target_sparsity: float
    layers: list[LayerSparsity]
    history: list[EpochLog] = field(default_factory=list)
    schedule: list[float] = field(default_factory=list)  # sparsity set at each fine-tuning epoch
    plan: PruningPlan | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left dense

    @property
    def sparsity(self) -> float:
        """Measured fraction of zero weights over the pruned layers."""
        return overall_sparsity(self.layers)


def pruning_layers(model: nn.Module, prune: PruneConfig, granularity: Granularity
                   ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to prune at ``granularity``, and the others with the reason."""
    candidates = prunable_layers(model, prune.layers)
    skipped = {name: why for name, layer in candidates.items() if (why := granularity.unfit(layer))}
    if granularity.kind == "filter":
        from prune2tvm.prune.rearrange import output_layers

        for name in output_layers(model):
            if name in candidates:
                skipped[name] = "its filters are the model's outputs"
    layers = {n: m for n, m in candidates.items() if n not in skipped}
    return layers, skipped


def agp_prune(dense: nn.Module, data: DatasetSplits, prune: PruneConfig, train: TrainConfig,
              final_sparsity: float, seed: int, name: str, targets: dict[str, float] | None = None) -> PruneResult:
    """AGP to ``final_sparsity``; with ``targets`` (per-layer final sparsities from a sensitivity
    analysis), each layer follows the cubic schedule scaled to its own target, or, in
    threshold mode, prunes |w| < sensitivity * std(w) with the threshold rising on the
    schedule (Distiller's SensitivityPruner)."""
    model = copy.deepcopy(dense)
    granularity = prune.granularity_spec()
    layers, skipped = pruning_layers(model, prune, granularity)
    orders: dict[str, torch.Tensor] = {}
    if prune.does_rearrange:
        from prune2tvm.prune.rearrange import rearrange_filters

        example = torch.from_numpy(data.train.x[:1])
        orders, not_rearranged = rearrange_filters(model, list(layers), example)
        skipped.update({n: why if why.startswith("rearranged with") else f"pruned in its own order: {why}"
                        for n, why in not_rearranged.items()})
    holder = MaskHolder(layers)
    if targets is not None:
        targets = {n: targets.get(n, 0.0) for n in layers}
        final_sparsity = max(targets.values(), default=0.0)
    schedule = AGPSchedule(min(prune.initial_sparsity, final_sparsity), final_sparsity, prune.start_epoch,
                           prune.end_epoch, prune.frequency)
    sensitivities = None
    if targets is not None and prune.sensitivity is not None and prune.sensitivity.mode == "threshold":
        from prune2tvm.prune.sensitivity import sensitivities_for

        sensitivities = sensitivities_for(layers, targets)
    optimizer = make_optimizer(model, train, lr=prune.lr)
    applied: list[float] = []  # the sparsity in force at the start of each epoch
    steps = {"done": 0}  # optimizer steps so far (the schedule's clock with prune.unit: step)
    if prune.unit == "step":
        total = prune.fine_tune_epochs * -(-len(data.train) // train.batch_size)
        if prune.end_epoch > total:
            from prune2tvm.errors import ConfigError

            raise ConfigError(f"prune.end_epoch: step {prune.end_epoch} is beyond the {total} steps of "
                              f"{prune.fine_tune_epochs} fine-tuning epochs; valid: <= {total}")

    def prune_at(t: int) -> None:
        if schedule.is_pruning_step(t):
            if targets is None:
                holder.set_sparsity(schedule.sparsity(t), granularity, prune.scope)
            else:
                fraction = schedule.sparsity(t) / final_sparsity if final_sparsity else 0.0
                holder.set_masks(_per_layer_masks(layers, granularity, targets, fraction, sensitivities))
            holder.apply(optimizer)

    def before_epoch(epoch: int) -> None:
        if prune.unit == "epoch":
            prune_at(epoch)
            applied.append(schedule.sparsity(epoch))
        else:
            applied.append(schedule.sparsity(steps["done"] - 1) if steps["done"] else 0.0)

    def before_step() -> None:  # after the backward pass: masks set here shape this step's update
        if prune.unit == "step":
            prune_at(steps["done"])
            steps["done"] += 1
        holder.mask_gradients()

    history = train_epochs(model, data.train, data.val, train, prune.fine_tune_epochs, seed, optimizer,
                           desc=f"fine-tune {name}", before_epoch=before_epoch,
                           before_step=before_step, after_step=lambda: holder.apply(optimizer))
    model.eval()
    plan = PruningPlan.from_model(model, holder.masks, granularity, prune.method, orders,
                                  input_shape=list(data.input_shape))
    return PruneResult(name, model, final_sparsity, layer_sparsity(model, list(layers)), history, applied, plan,
                       skipped)


def _per_layer_masks(layers, granularity, targets, fraction, sensitivities):
    from prune2tvm.prune.granularity import layer_masks
    from prune2tvm.prune.sensitivity import threshold_masks

    if sensitivities is not None:
        return threshold_masks(layers, sensitivities, scale=fraction)
    return {n: layer_masks({n: layer}, granularity, targets[n] * fraction)[n] for n, layer in layers.items()}


def oneshot_prune(dense: nn.Module, data: DatasetSplits, prune: PruneConfig, train: TrainConfig,
                  final_sparsity: float, seed: int, name: str) -> PruneResult:
    """Magnitude pruning to ``final_sparsity`` at once, at the configured granularity and
    scope, with no fine-tuning: the latency of a sparsity pattern, not a trained model."""
    model = copy.deepcopy(dense)
    granularity = prune.granularity_spec()
    layers, skipped = pruning_layers(model, prune, granularity)
    holder = MaskHolder(layers)
    holder.set_sparsity(final_sparsity, granularity, prune.scope)
    holder.apply()
    model.eval()
    plan = PruningPlan.from_model(model, holder.masks, granularity, prune.method, {},
                                  input_shape=list(data.input_shape))
    return PruneResult(name, model, final_sparsity, layer_sparsity(model, list(layers)), [], [final_sparsity], plan,
                       skipped)
