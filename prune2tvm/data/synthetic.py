"""Random inputs for latency studies of models at real size without their data.

Labels are placeholders: the pipeline relabels every split with the dense model's own
predictions, so a variant's "accuracy" is its top-1 agreement with the unpruned model.
"""

from __future__ import annotations

import numpy as np

from prune2tvm.data import DATASETS
from prune2tvm.data.splits import DatasetSplits, Split
from prune2tvm.errors import ConfigError


@DATASETS.register("synthetic")
def load_synthetic(split: list[float], seed: int, path: str | None = None, image_size=None, shape=None,
                   num_classes: int | None = None, samples: int = 100) -> DatasetSplits:
    if path is not None or image_size is not None:
        raise ConfigError("data.path/image_size: synthetic data is generated from data.shape; remove the keys")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *shape)).astype(np.float32)
    counts = np.floor(np.asarray(split) * samples).astype(int)
    counts = np.maximum(counts, 1)
    counts[0] = samples - counts[1:].sum()
    bounds = np.cumsum(counts)[:-1]
    parts = np.split(np.arange(samples), bounds)
    splits = [Split(np.ascontiguousarray(x[i]), np.zeros(len(i), np.int64), i) for i in parts]
    return DatasetSplits("synthetic", *splits, num_classes=num_classes)


def relabel(data: DatasetSplits, predict) -> DatasetSplits:
    """Every split labelled with ``predict(x)`` (the dense model's classes)."""
    import dataclasses

    splits = [dataclasses.replace(s, y=np.asarray(predict(s.x), np.int64)) for s in (data.train, data.val, data.test)]
    return dataclasses.replace(data, train=splits[0], val=splits[1], test=splits[2])
