from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, [N, C, H, W]
    y: np.ndarray  # int64, [N]
    index: np.ndarray  # each sample's position in the whole dataset

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(self.train.x.shape[1:])


def stratified_split(x: np.ndarray, y: np.ndarray, fractions: list[float], seed: int):
    """Split deterministically by ``seed``, keeping class proportions in each part."""
    from sklearn.model_selection import train_test_split

    from prune2tvm.errors import InputError

    train_frac, val_frac, test_frac = fractions
    everything = np.arange(len(y))
    try:
        train, rest = train_test_split(everything, train_size=train_frac, random_state=seed, stratify=y)
        val, test = train_test_split(rest, train_size=val_frac / (val_frac + test_frac), random_state=seed,
                                     stratify=y[rest])
    except ValueError as exc:  # too few samples of a class for three stratified parts
        counts = np.bincount(y)
        raise InputError(f"{len(y)} samples cannot be split {fractions} keeping every class in each part "
                         f"(the smallest class has {int(counts[counts > 0].min())}): {str(exc).splitlines()[0]}") from None
    return tuple(Split(np.ascontiguousarray(x[i]), y[i], i) for i in (train, val, test))
