"""AGP element-wise pruning of a trained model, fine-tuning while the mask holds."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from prune2tvm.config import PruneConfig, TrainConfig
from prune2tvm.data import DatasetSplits
from prune2tvm.prune.agp import AGPSchedule
from prune2tvm.prune.masks import LayerSparsity, MaskHolder, layer_sparsity, overall_sparsity, prunable_layers
from prune2tvm.train import EpochLog, make_optimizer, train_epochs


@dataclass
class PruneResult:
    name: str
    model: nn.Module
    target_sparsity: float
    layers: list[LayerSparsity]
    history: list[EpochLog] = field(default_factory=list)
    schedule: list[float] = field(default_factory=list)  # sparsity set at each fine-tuning epoch

    @property
    def sparsity(self) -> float:
        """Measured fraction of zero weights over the pruned layers."""
        return overall_sparsity(self.layers)


def agp_prune(dense: nn.Module, data: DatasetSplits, prune: PruneConfig, train: TrainConfig,
              final_sparsity: float, seed: int, name: str) -> PruneResult:
    model = copy.deepcopy(dense)
    layers = prunable_layers(model, prune.layers)
    holder = MaskHolder(layers)
    schedule = AGPSchedule(prune.initial_sparsity, final_sparsity, prune.start_epoch, prune.end_epoch,
                           prune.frequency)
    optimizer = make_optimizer(model, train, lr=prune.lr)
    applied: list[float] = []

    def before_epoch(epoch: int) -> None:
        if schedule.is_pruning_step(epoch):
            holder.set_sparsity(schedule.sparsity(epoch))
            holder.apply(optimizer)
        applied.append(schedule.sparsity(epoch))

    history = train_epochs(model, data.train, data.val, train, prune.fine_tune_epochs, seed, optimizer,
                           desc=f"fine-tune {name}", before_epoch=before_epoch,
                           before_step=holder.mask_gradients, after_step=lambda: holder.apply(optimizer))
    model.eval()
    return PruneResult(name, model, final_sparsity, layer_sparsity(model, prune.layers), history, applied)
