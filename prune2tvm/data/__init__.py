"""Datasets: name -> loader returning deterministic train/val/test splits."""

from prune2tvm.data.splits import DatasetSplits, Split
from prune2tvm.registry import Registry

DATASETS = Registry("dataset")

# Importing the module registers its loaders; each keeps heavy imports inside the loader.
from prune2tvm.data import digits, files, synthetic  # noqa: E402,F401

__all__ = ["DATASETS", "DatasetSplits", "Split", "load_dataset"]


def load_dataset(name: str, split: list[float], seed: int, path: str | None = None,
                 image_size: list[int] | None = None, **options) -> DatasetSplits:
    """``options``: what one dataset alone takes (synthetic: shape, num_classes, samples)."""
    return DATASETS.lookup(name)(split=split, seed=seed, path=path, image_size=image_size, **options)


def load_configured(data, seed: int) -> DatasetSplits:
    """The dataset a pipeline's ``data`` section describes."""
    options = {"shape": data.shape, "num_classes": data.num_classes, "samples": data.samples} if data.synthetic else {}
    return load_dataset(data.dataset, data.split, seed, data.path, data.image_size, **options)
