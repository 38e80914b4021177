"""Datasets read from the user's files (nothing is ever downloaded): CIFAR-10 (binary
version), MNIST (idx files, optionally gzipped) and ImageFolder trees (``root/<class>/<image>``).

Each loader reads everything into memory and splits it with ``data.split`` (stratified,
deterministic by seed), as for digits: the split fractions apply to all the files together,
official test files included. Every malformed file is an ``InputError`` naming the file and
what was expected; nothing is unpickled (CIFAR-10's *Python* version is pickles, so only
the binary version is read).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from prune2tvm.data import DATASETS
from prune2tvm.data.splits import DatasetSplits, stratified_split
from prune2tvm.errors import ConfigError, InputError

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
MNIST_FILES = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


EXPECTED = {
    "cifar10": "data_batch_1.bin ... test_batch.bin (CIFAR-10 binary version)",
    "mnist": "train-images-idx3-ubyte and train-labels-idx1-ubyte (or their .gz)",
    "imagefolder": "one directory of images per class",
}


def check_directory(name: str, path: str | None) -> Path:
    """A file dataset's directory exists (checked before a run starts; its files when read)."""
    return _directory(path, name, EXPECTED[name])


def _directory(path: str | None, name: str, expect: str) -> Path:
    if path is None:
        raise ConfigError(f"data.path: the {name} dataset needs the directory holding {expect}")
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"data.path: {root} is not a directory (expected one holding {expect})")
    return root


@DATASETS.register("cifar10")
def load_cifar10(split: list[float], seed: int, path: str | None = None, image_size=None) -> DatasetSplits:
    """``path``: the ``cifar-10-batches-bin`` directory (data_batch_1..5.bin, test_batch.bin);
    files missing from it are skipped, at least one must be there."""
    root = check_directory("cifar10", path)
    xs, ys = [], []
    for name in CIFAR_FILES:
        file = root / name
        if not file.exists():
            continue
        raw = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise InputError(f"{file}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                             f"({CIFAR_RECORD} bytes each: a label byte and 32x32x3 pixels); truncated?")
        records = raw.reshape(-1, CIFAR_RECORD)
        labels = records[:, 0]
        if labels.max() > 9:
            raise InputError(f"{file}: label {int(labels.max())} is out of range; CIFAR-10 labels are 0-9")
        xs.append(records[:, 1:].reshape(-1, 3, 32, 32))
        ys.append(labels)
    if not xs:
        raise InputError(f"{root}: none of {', '.join(CIFAR_FILES)} is there")
    x = (np.concatenate(xs).astype(np.float32) / 255.0 - 0.5) / 0.25
    y = np.concatenate(ys).astype(np.int64)
    return DatasetSplits("cifar10", *stratified_split(x, y, split, seed), num_classes=10)


def _read_idx(file: Path, magic: int, dims: int) -> np.ndarray:
    data = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    if len(data) < 4 + 4 * dims:
        raise InputError(f"{file}: too short for an idx header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise InputError(f"{file}: magic number {found} is not {magic} (an idx file of {dims} dimension(s))")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise InputError(f"{file}: {body.size} bytes of data for shape {shape}; truncated?")
    return body.reshape(shape)


@DATASETS.register("mnist")
def load_mnist(split: list[float], seed: int, path: str | None = None, image_size=None) -> DatasetSplits:
    """``path``: a directory with MNIST's idx files (train-images-idx3-ubyte, ...; .gz or not);
    the train pair, the t10k pair, or both."""
    root = check_directory("mnist", path)
    xs, ys = [], []
    for images, labels in MNIST_FILES:
        found = [next((root / f"{n}{s}" for s in ("", ".gz") if (root / f"{n}{s}").exists()), None)
                 for n in (images, labels)]
        if found == [None, None]:
            continue
        if None in found:
            raise InputError(f"{root}: {images if found[0] is None else labels} is missing (the pair goes together)")
        x, y = _read_idx(found[0], 2051, 3), _read_idx(found[1], 2049, 1)
        if len(x) != len(y):
            raise InputError(f"{found[0]} has {len(x)} images but {found[1]} has {len(y)} labels")
        if y.max() > 9:
            raise InputError(f"{found[1]}: label {int(y.max())} is out of range; MNIST labels are 0-9")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise InputError(f"{root}: no MNIST idx files (train-images-idx3-ubyte, t10k-images-idx3-ubyte, ...)")
    x = ((np.concatenate(xs).astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    y = np.concatenate(ys).astype(np.int64)
    return DatasetSplits("mnist", *stratified_split(x, y, split, seed), num_classes=10)


@DATASETS.register("imagefolder")
def load_imagefolder(split: list[float], seed: int, path: str | None = None, image_size=None) -> DatasetSplits:
    """``path``: a root with one directory per class (sorted names are the class indices), each
    with images; every image is resized to ``data.image_size`` (default 224x224), converted to
    RGB and normalised with ImageNet's mean and std."""
    from PIL import Image, UnidentifiedImageError

    root = check_directory("imagefolder", path)
    height, width = image_size or (224, 224)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise InputError(f"{root}: {len(classes)} class directories; an ImageFolder tree needs at least 2")
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink())
        if not files:
            raise InputError(f"{root / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as image:
                    rgb = image.convert("RGB").resize((width, height), Image.BILINEAR)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise InputError(f"{file}: not a readable image ({type(exc).__name__}: {exc})") from None
            xs.append(((np.asarray(rgb, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
            ys.append(label)
    x, y = np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < 3:
        raise InputError(f"{root}: class {classes[int(counts.argmin())]!r} has {int(counts.min())} image(s); "
                         "each class needs at least 3 (one for each of train, val and test)")
    return DatasetSplits("imagefolder", *stratified_split(x, y, split, seed), num_classes=len(classes))
