"""Automated Gradual Pruning (Zhu & Gupta, 2017): the cubic sparsity schedule.

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3,   t in {t_0, t_0 + dt, ..., t_0 + n dt}

Sparsity rises fast while the network has redundant weights and slowly near the end.
Between pruning steps the sparsity of the last step holds; before ``t_0`` nothing is pruned.

The formula is torch.ao.pruning's ``CubicSL.sparsity_compute_fn``. CubicSL itself is a
scheduler bound to a torch.ao sparsifier, whose parametrized masks leave the stored weights
nonzero. prune2tvm's masks zero the weights themselves (``MaskHolder``), so only the formula
is taken, evaluated at the last pruning step (the hold between steps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AGPSchedule:
    initial: float  # s_i
    final: float  # s_f
    start: int  # t_0
    end: int  # t_0 + n * dt
    frequency: int  # dt

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError(f"need 0 <= initial ({self.initial}) <= final ({self.final}) < 1")
        if self.frequency <= 0 or self.end <= self.start or (self.end - self.start) % self.frequency:
            raise ValueError(f"need start < end and frequency dividing end - start (got {self})")

    def is_pruning_step(self, t: int) -> bool:
        return self.start <= t <= self.end and (t - self.start) % self.frequency == 0

    def sparsity(self, t: int) -> float:
        if t < self.start:
            return 0.0
        if t >= self.end:
            return self.final
        from torch.ao.pruning import CubicSL

        last_step = self.start + ((t - self.start) // self.frequency) * self.frequency
        steps = (self.end - self.start) // self.frequency
        return float(CubicSL.sparsity_compute_fn(self.initial, self.final, last_step, self.start, self.frequency,
                                                 steps, initially_zero=True))
