"""scikit-learn's bundled digits: 1797 grey 8x8 images of 10 classes, shipped with the
package, so the default pipeline needs no download."""

from __future__ import annotations

import numpy as np

from prune2tvm.data import DATASETS
from prune2tvm.data.splits import DatasetSplits, stratified_split
from prune2tvm.errors import ConfigError


@DATASETS.register("digits")
def load_digits(split: list[float], seed: int, path: str | None = None, image_size=None) -> DatasetSplits:
    if path is not None:
        raise ConfigError("data.path: the digits dataset is embedded and takes no path; remove the key")
    if image_size is not None:
        raise ConfigError("data.image_size: the digits are 8x8 and are not resized; remove the key")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = stratified_split(x, y, split, seed)
    return DatasetSplits("digits", train, val, test, num_classes=10)
