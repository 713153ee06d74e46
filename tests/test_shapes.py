"""The built-in shapes dataset: deterministic per seed, balanced, train and test apart."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from xpcnn.datasets import SHAPES_CLASSES, load_dataset, load_shapes, shapes
from xpcnn.datasets.shapes import DEFAULT_N_TEST, DEFAULT_N_TRAIN
from xpcnn.errors import InputError


def test_shapes_dtypes_and_shapes():
    (x, y), (xt, yt) = load_shapes(n_train=230, n_test=70, seed=0)
    assert x.shape == (230, 32, 32, 3) and x.dtype == np.uint8
    assert xt.shape == (70, 32, 32, 3) and xt.dtype == np.uint8
    assert y.shape == (230,) and y.dtype == np.int64
    assert yt.shape == (70,) and yt.dtype == np.int64
    assert set(np.unique(y)) == set(range(len(SHAPES_CLASSES))) == set(range(10))


def test_defaults():
    # Not generated here (10,000 images would slow the suite); the sizes are what is documented.
    params = inspect.signature(load_shapes).parameters
    assert params["n_train"].default == DEFAULT_N_TRAIN >= 5000
    assert params["n_test"].default == DEFAULT_N_TEST >= 1000
    assert params["seed"].default == 0 and params["image_size"].default == 32


def test_same_seed_is_bit_identical():
    # More than one rendering chunk, so the chunking is covered too.
    a = load_shapes(n_train=1200, n_test=300, seed=7)
    b = load_shapes(n_train=1200, n_test=300, seed=7)
    for u, v in zip((*a[0], *a[1]), (*b[0], *b[1]), strict=True):
        np.testing.assert_array_equal(u, v)


def test_different_seed_differs():
    (x0, y0), (xt0, _) = load_shapes(n_train=200, n_test=50, seed=0)
    (x1, y1), (xt1, _) = load_shapes(n_train=200, n_test=50, seed=1)
    assert not np.array_equal(x0, x1) and not np.array_equal(y0, y1)
    assert not np.array_equal(xt0, xt1)


@pytest.mark.parametrize("n", [1000, 1003, 7])
def test_balanced(n):
    (_, y), (_, yt) = load_shapes(n_train=n, n_test=n, seed=2)
    for labels in (y, yt):
        counts = np.bincount(labels, minlength=10)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_labels_shuffled():
    (_, y), _ = load_shapes(n_train=100, n_test=0, seed=0)
    assert not np.array_equal(y, np.arange(100) % 10)


def test_train_and_test_do_not_overlap():
    (x, _), (xt, _) = load_shapes(n_train=2000, n_test=500, seed=0)
    train = {img.tobytes() for img in x}
    assert not any(img.tobytes() in train for img in xt)
    assert len(train) == len(x)  # no duplicates within the training set either


def test_test_set_independent_of_n_train():
    # Separate streams: asking for more training data does not shift the test set.
    _, (xt_a, yt_a) = load_shapes(n_train=100, n_test=40, seed=3)
    _, (xt_b, yt_b) = load_shapes(n_train=900, n_test=40, seed=3)
    np.testing.assert_array_equal(xt_a, xt_b)
    np.testing.assert_array_equal(yt_a, yt_b)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("k", range(10))
def test_every_shape_is_visible_at_its_smallest(size, k):
    # Smallest radius and thinnest line at many sub-pixel offsets: pixels must be drawn.
    scale = size / 32
    rng = np.random.default_rng(k)
    grid = np.arange(size, dtype=np.float32) + 0.5
    c = (size / 2 + rng.uniform(-1, 1, (200, 2))).astype(np.float32)
    dx = grid[None, None, :] - c[:, 0, None, None]
    dy = grid[None, :, None] - c[:, 1, None, None]
    r = np.float32(shapes._RADIUS[0] * scale)
    t = np.float32(max(shapes._THICK[0] * scale, 1.0))
    drawn = shapes._draw(k, dx, dy, r, t).sum(axis=(1, 2))
    assert drawn.min() >= 3


def test_image_size():
    (x, _), (xt, _) = load_shapes(n_train=20, n_test=10, seed=0, image_size=48)
    assert x.shape == (20, 48, 48, 3) and xt.shape == (10, 48, 48, 3)


def test_empty():
    (x, y), (xt, yt) = load_shapes(n_train=0, n_test=0)
    assert x.shape == (0, 32, 32, 3) and y.shape == (0,) and xt.shape == (0, 32, 32, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": -1},
        {"n_test": 2.5},
        {"seed": -3},
        {"n_train": True},
        {"image_size": 8},
        {"image_size": 1000},
        {"image_size": "32"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        load_shapes(**kwargs)


def test_load_dataset_shapes():
    (x, y), (xt, yt) = load_dataset("shapes", n_train=30, n_test=10, seed=5)
    (x2, _), _ = load_shapes(n_train=30, n_test=10, seed=5)
    np.testing.assert_array_equal(x, x2)
