"""The embedded digits data: deterministic, stratified, disjoint splits."""

import numpy as np

from prune2tvm.data import load_dataset


def test_digits_splits_are_deterministic_by_seed():
    a = load_dataset("digits", [0.6, 0.2, 0.2], seed=0)
    b = load_dataset("digits", [0.6, 0.2, 0.2], seed=0)
    c = load_dataset("digits", [0.6, 0.2, 0.2], seed=1)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part).x, getattr(b, part).x)
        assert np.array_equal(getattr(a, part).y, getattr(b, part).y)
    assert not np.array_equal(a.test.index, c.test.index)


def test_digits_splits_are_disjoint_complete_and_class_balanced():
    d = load_dataset("digits", [0.6, 0.2, 0.2], seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (1078, 359, 360)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert d.train.x.dtype == np.float32 and 0.0 <= d.train.x.min() and d.train.x.max() <= 1.0
    indices = np.concatenate([d.train.index, d.val.index, d.test.index])
    assert np.array_equal(np.sort(indices), np.arange(1797))  # every sample in exactly one split
    labels = np.concatenate([d.train.y, d.val.y, d.test.y])
    all_share = np.bincount(labels) / len(labels)
    for part in (d.train, d.val, d.test):
        assert np.abs(np.bincount(part.y, minlength=10) / len(part) - all_share).max() < 0.01


# ---------------------------------------------------------------- the user's files, written here

import gzip  # noqa: E402

import pytest  # noqa: E402

from prune2tvm.errors import ConfigError, InputError  # noqa: E402


def write_cifar(root, records_per_file=20, files=("data_batch_1.bin", "test_batch.bin")):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    expected = []
    for name in files:
        labels = np.arange(records_per_file, dtype=np.uint8) % 10
        pixels = rng.integers(0, 256, (records_per_file, 3072), dtype=np.uint8)
        (root / name).write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())
        expected.append((labels, pixels))
    return expected


def test_cifar10_binary_files_are_read_record_by_record(tmp_path):
    expected = write_cifar(tmp_path / "cifar-10-batches-bin", records_per_file=40)
    d = load_dataset("cifar10", [0.5, 0.25, 0.25], seed=0, path=str(tmp_path / "cifar-10-batches-bin"))
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 80
    # sample 3 of the first file: its label, and its first pixel (red channel, top left) normalised
    labels, pixels = expected[0]
    for part in (d.train, d.val, d.test):
        hit = np.flatnonzero(part.index == 3)
        if hit.size:
            assert part.y[hit[0]] == labels[3]
            assert part.x[hit[0], 0, 0, 0] == pytest.approx((pixels[3, 0] / 255.0 - 0.5) / 0.25)


def test_cifar10_refuses_truncated_files_and_bad_labels(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    (root / "test_batch.bin").write_bytes((root / "test_batch.bin").read_bytes()[:-7])
    with pytest.raises(InputError, match="test_batch.bin: .* not a whole number of CIFAR-10 records"):
        load_dataset("cifar10", [0.5, 0.25, 0.25], 0, str(root))
    raw = bytearray((root / "data_batch_1.bin").read_bytes())
    raw[0] = 11
    (root / "data_batch_1.bin").write_bytes(bytes(raw))
    (root / "test_batch.bin").unlink()
    with pytest.raises(InputError, match="label 11 is out of range"):
        load_dataset("cifar10", [0.5, 0.25, 0.25], 0, str(root))
    with pytest.raises(ConfigError, match="data.path: the cifar10 dataset needs"):
        load_dataset("cifar10", [0.5, 0.25, 0.25], 0, None)


def write_idx(path, array, magic, compress=False):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_plain_or_gzipped(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 28, 28))
    labels = np.arange(100) % 10
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 2051, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 2049, compress)
    d = load_dataset("mnist", [0.6, 0.2, 0.2], seed=0, path=str(tmp_path))
    assert d.input_shape == (1, 28, 28) and len(d.train) + len(d.val) + len(d.test) == 100
    i = int(d.train.index[0])
    assert d.train.y[0] == labels[i]
    np.testing.assert_allclose(d.train.x[0, 0], (images[i] / 255.0 - 0.1307) / 0.3081, rtol=1e-5)


def test_mnist_refuses_wrong_magic_mismatched_counts_and_a_missing_half(tmp_path):
    images, labels = np.zeros((10, 28, 28)), np.arange(10) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte", images, 2049)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 2049)
    with pytest.raises(InputError, match="magic number 2049 is not 2051"):
        load_dataset("mnist", [0.6, 0.2, 0.2], 0, str(tmp_path))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28)), 2051)
    with pytest.raises(InputError, match="has 12 images but .* has 10 labels"):
        load_dataset("mnist", [0.6, 0.2, 0.2], 0, str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(InputError, match="train-labels-idx1-ubyte is missing"):
        load_dataset("mnist", [0.6, 0.2, 0.2], 0, str(tmp_path))


def test_imagefolder_reads_classes_resizes_and_refuses_broken_images(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "eel": (10, 10, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB" if i % 2 else "L", (40 + i, 30), colour if i % 2 else 128).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image, ignored")
    d = load_dataset("imagefolder", [0.5, 0.25, 0.25], seed=0, path=str(root), image_size=[16, 20])
    assert d.num_classes == 3 and d.input_shape == (3, 16, 20) and len(d.train) + len(d.val) + len(d.test) == 24
    from prune2tvm.data.files import IMAGENET_MEAN, IMAGENET_STD

    red = d.train.x[(d.train.y == 0) & (d.train.index % 2 == 1)]  # the cat's colour images (odd files)
    if len(red):
        assert red[0, 0, 0, 0] == pytest.approx((200 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=1e-5)
    with pytest.raises(InputError, match="cannot be split"):  # 8 per class: not enough for a 0.9 / 0.05 / 0.05 split
        load_dataset("imagefolder", [0.9, 0.05, 0.05], 0, str(root), [16, 20])
    (root / "dog" / "3.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match=r"dog/3.png: not a readable image"):
        load_dataset("imagefolder", [0.5, 0.25, 0.25], 0, str(root), [16, 20])
