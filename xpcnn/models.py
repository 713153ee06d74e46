"""Named reference models, shared by the CLI, the recipes and the benchmarks.

Each builder returns the list of layers for a per-sample input shape and a class count; the
caller wraps them in :class:`~xpcnn.Sequential` with its device and seed. Inputs are uint8
images; every model starts by rescaling them to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InputError
from .layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    MaxPool2D,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)


def shapes_net(classes: int = 10) -> list[Layer]:
    """Small all-convolutional net for the built-in shapes dataset (the CLI default)."""
    def conv(k: int) -> Conv2D:
        return Conv2D(k, 3, padding="same", activation="relu", kernel_initializer="he_uniform")

    return [Rescaling(1 / 255), conv(16), MaxPool2D(2), conv(32), MaxPool2D(2), conv(64),
            GlobalAvgPool2D(), Dense(classes), Softmax()]


def notebook_net(classes: int = 10) -> list[Layer]:
    """The original notebook's network: two 3x3 convolutions of 32 filters with ReLU,
    per-feature-map normalisation, max pooling, Dense 128 with ReLU, Dense classes."""
    return [Rescaling(1 / 255), Conv2D(32, 3), ReLU(), Conv2D(32, 3), ReLU(), FeatureNorm(),
            MaxPool2D(2), Flatten(), Dense(128), ReLU(), Dense(classes), Softmax()]


def mnist_net(classes: int = 10) -> list[Layer]:
    """The MNIST recipe (PyTorch's MNIST example, a little larger than Keras' mnist_convnet):
    conv 3x3 32 and 64 (valid), max pool, dropout, Dense 128, dropout, Dense classes; ReLU
    fused into the conv and Dense layers."""
    return [Rescaling(1 / 255),
            Conv2D(32, 3, activation="relu", kernel_initializer="he_uniform"),
            Conv2D(64, 3, activation="relu", kernel_initializer="he_uniform"),
            MaxPool2D(2), Dropout(0.25), Flatten(),
            Dense(128, activation="relu", kernel_initializer="he_uniform"), Dropout(0.5),
            Dense(classes), Softmax()]


def mnist_bn_net(classes: int = 10) -> list[Layer]:
    """The MNIST recipe for 99.5%: random shifts of up to 2 pixels, a small VGG-like stack of
    3x3 convolutions with BatchNorm (32, 32, pool, 64, 64, pool, 128), global average pooling,
    dropout and Dense classes."""
    def conv_bn(k: int) -> list[Layer]:
        return [Conv2D(k, 3, padding="same", use_bias=False, kernel_initializer="he_uniform"),
                BatchNorm2D(), ReLU()]

    return [RandomCrop(2), Rescaling(1 / 255), *conv_bn(32), *conv_bn(32), MaxPool2D(2),
            *conv_bn(64), *conv_bn(64), MaxPool2D(2), *conv_bn(128), GlobalAvgPool2D(),
            Dropout(0.25), Dense(classes), Softmax()]


def cifar_net(classes: int = 10) -> list[Layer]:
    """The CIFAR-10 convnet of the benchmarks: conv 3x3 32, 32, pool, 64, 64, pool,
    Dense 128, Dense classes, "same" padding, ReLU (fused into the conv and Dense layers)."""
    def conv(k: int) -> Conv2D:
        return Conv2D(k, 3, padding="same", activation="relu", kernel_initializer="he_uniform")

    return [Rescaling(1 / 255), conv(32), conv(32), MaxPool2D(2), conv(64), conv(64),
            MaxPool2D(2), Flatten(), Dense(128, activation="relu", kernel_initializer="he_uniform"),
            Dense(classes), Softmax()]


def cifar_augmented_net(classes: int = 10) -> list[Layer]:
    """cifar_net with random crops and flips in training, and dropout before the classifier."""
    layers = cifar_net(classes)
    return [RandomFlip(), RandomCrop(4), *layers[:-2], Dropout(0.5), *layers[-2:]]


MODELS: dict[str, Callable[[int], list[Layer]]] = {
    "shapes": shapes_net,
    "notebook": notebook_net,
    "mnist": mnist_net,
    "mnist-bn": mnist_bn_net,
    "cifar": cifar_net,
    "cifar-augmented": cifar_augmented_net,
}


def build_layers(name: str, classes: int = 10) -> list[Layer]:
    """The layers of reference model ``name`` (see :data:`MODELS`)."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](classes)
