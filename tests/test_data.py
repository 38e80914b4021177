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
