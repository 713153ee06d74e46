"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 from their standard files, and built-in shapes.

Every loader returns ``(x_train, y_train), (x_test, y_test)``: uint8 images in NHWC layout and
int64 labels. ``load_cifar10`` returns ``None`` for the test pair when the files hold no test
batch. Files are found in the data folder (``data_dir``, else ``$XPCNN_DATA_DIR``, else
``default_data_dir()``) and, where missing, downloaded and checksummed; files from outside are
parsed as untrusted input, so a bad one raises ``DataFormatError`` and never runs code.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import InputError
from .cifar import CIFAR10_CLASSES, load_cifar10
from .download import default_data_dir
from .idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_fashion_mnist, load_mnist
from .shapes import SHAPES_CLASSES, load_shapes

DATASETS: tuple[str, ...] = ("shapes", "mnist", "fashion-mnist", "cifar10")

_CLASSES: dict[str, tuple[str, ...]] = {
    "shapes": SHAPES_CLASSES,
    "mnist": MNIST_CLASSES,
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}

#: The shape (H, W, C) of the images load_dataset returns: fixed (the loaders check the files').
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "shapes": (32, 32, 3),
    "mnist": (28, 28, 1),
    "fashion-mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}

Split = tuple[np.ndarray, np.ndarray]


def _canonical(name: str) -> str:
    """Accept the obvious spellings: ``Fashion_MNIST``, ``cifar-10``, ``CIFAR10``."""
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}.get(key, key)
    if key not in _CLASSES:
        raise InputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def class_names(name: str) -> tuple[str, ...]:
    """The class names of dataset ``name``, indexed by label."""
    return _CLASSES[_canonical(name)]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    **kwargs: Any,
) -> tuple[Split, Split | None]:
    """Load ``"shapes"``, ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` by name.

    ``data_dir`` and ``download`` are ignored for shapes, which is generated. Extra keyword
    arguments go to the loader (``seed=``, ``n_train=`` for shapes; ``base_url=`` for the others).
    """
    key = _canonical(name)
    if key == "shapes":
        return load_shapes(**kwargs)
    loader = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
    return loader[key](data_dir, download, **kwargs)


__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SHAPES",
    "MNIST_CLASSES",
    "SHAPES_CLASSES",
    "class_names",
    "default_data_dir",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_shapes",
]
