"""Training and evaluation loops for the classifiers (seeded, deterministic on one machine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from prune2tvm.config import TrainConfig
from prune2tvm.data import Split
from prune2tvm.progress import bar


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    val_accuracy: float


def train_epochs(model: nn.Module, train: Split, val: Split, cfg: TrainConfig, epochs: int, seed: int,
                 optimizer: torch.optim.Optimizer, desc: str,
                 before_epoch: Callable[[int], None] | None = None,
                 after_step: Callable[[], None] | None = None,
                 before_step: Callable[[], None] | None = None) -> list[EpochLog]:
    """Minibatch training with a seeded shuffle; hooks let pruning act around each step.

    Under torchrun (a process group), every process draws the same shuffle and takes every
    N-th sample of each batch; DDP averages the gradients, so all processes keep the same
    weights. A last batch smaller than the number of processes is dropped, by all alike."""
    from prune2tvm.distributed import sync_buffers, world, wrap

    rank, size = world()
    stepper = wrap(model)
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    logs = []
    for epoch in bar(range(epochs), desc=desc, total=epochs, unit="epoch"):
        if before_epoch is not None:
            before_epoch(epoch)
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if size > 1:
                if len(idx) < size:
                    continue
                idx = idx[rank::size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(stepper(x[idx]), y[idx])
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item() * len(idx)
        sync_buffers(model)
        logs.append(EpochLog(epoch, total / len(y), accuracy(predict_torch(model, val.x), val.y)))
    return logs


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: np.ndarray, batch_size: int = 16) -> int:
    """Set every batch-norm layer's running mean and variance to the statistics of ``x`` as it
    reaches that layer (a cumulative average over batches; weights untouched). A randomly
    initialised network with default statistics (mean 0, variance 1) loses its signal layer by
    layer: a random MobileNet V2's logits are its classifier's bias for every input, so no
    pruning changes them. Calibrated, each layer passes on unit-variance activations and the
    output depends on the input. Returns the number of layers calibrated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return 0
    model.eval()
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])))
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
    model.eval()
    return len(norms)


def predict_torch(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class predictions (argmax of the logits) for every row of ``x``."""
    model.eval()
    preds = [model(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(preds)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())
