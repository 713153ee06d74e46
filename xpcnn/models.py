"""Named reference models, shared by the CLI, the recipes and the benchmarks.

Two kinds: a *stack* builder (:data:`MODELS`) returns the list of layers for a class count, to
wrap in :class:`~xpcnn.Sequential`; a *network* builder (:data:`NETWORKS`) returns a built graph
:class:`~xpcnn.Model` (residual networks). :func:`build_model` gives either kind as a model.
Inputs are uint8 images; every model starts by rescaling or normalising them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError
from .graph import Input
from .layers import (
    Add,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    MaxPool2D,
    Normalization,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from .layers.symbolic import SymbolicTensor
from .model import Model, Sequential


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
    """The layers of reference stack ``name`` (see :data:`MODELS`)."""
    if name in NETWORKS:
        raise InputError(f"model {name!r} is a graph network, not a stack of layers: "
                         f"build_model({name!r}) builds it; build_layers takes one of "
                         f"{', '.join(MODELS)}")
    if name not in MODELS:
        raise InputError(_unknown(name))
    return MODELS[name](classes)


def _unknown(name: Any) -> str:
    return f"unknown model {name!r}; expected one of {', '.join(NAMES)}"


# -- residual networks (graph models) ---------------------------------------------------------

#: CIFAR-10's per-channel mean and standard deviation, on the 0-255 scale of uint8 images.
CIFAR_MEAN, CIFAR_STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]


def _augmented_input(input_shape: tuple[int, ...]) -> tuple[SymbolicTensor, SymbolicTensor]:
    """The input, then (in training only) a random flip and a crop of 4-pixel padding, then the
    per-channel normalisation."""
    input_shape = _image_shape(input_shape, (32, 32, 3))
    if input_shape[-1] != 3:  # (a 1-channel image failed in a layer, Normalization)
        raise InputError(f"the residual networks normalise RGB images by CIFAR-10's channel "
                         f"statistics: their input_shape is (H, W, 3), got {input_shape!r}")
    inputs = Input(input_shape)
    x = RandomCrop(4)(RandomFlip()(inputs))
    return inputs, Normalization(CIFAR_MEAN, CIFAR_STD)(x)


def _conv_bn(x: SymbolicTensor, filters: int, strides: int = 1, relu: bool = True,
             kernel_size: int = 3) -> SymbolicTensor:
    """Convolution (no bias: the BatchNorm's beta is one), BatchNorm, then ReLU if ``relu``.
    Padding (kernel_size - 1) / 2 on every side, as PyTorch's ResNets (at stride 2 too)."""
    x = Conv2D(filters, kernel_size, strides=strides, padding=(kernel_size - 1) // 2,
               use_bias=False, kernel_initializer="he_uniform")(x)
    x = BatchNorm2D()(x)
    return ReLU()(x) if relu else x


def _basic_block(x: SymbolicTensor, filters: int, strides: int) -> SymbolicTensor:
    """He et al.'s basic block: relu(x' + bn(conv(relu(bn(conv(x)))))), where the shortcut x' is
    x itself, or a projection (1x1 convolution and BatchNorm, their option B) where the block
    changes the size or the channel count."""
    y = _conv_bn(_conv_bn(x, filters, strides), filters, relu=False)
    if strides != 1 or x.shape[-1] != filters:
        x = _conv_bn(x, filters, strides, relu=False, kernel_size=1)
    return ReLU()(Add()([x, y]))


def _classifier(x: SymbolicTensor, classes: int) -> SymbolicTensor:
    return Softmax()(Dense(classes)(GlobalAvgPool2D()(x)))


def resnet20(classes: int = 10, input_shape: tuple[int, ...] = (32, 32, 3),
             **model_options: Any) -> Model:
    """ResNet-20 of He et al. (2016) for CIFAR: a 3x3 convolution of 16 filters, then 3 stages
    of 3 basic blocks with 16, 32 and 64 filters (the 2nd and 3rd stages start at stride 2),
    BatchNorm, global average pooling and Dense classes; projection shortcuts where the shape
    changes (~0.27 M parameters). Random flips and crops in training."""
    inputs, x = _augmented_input(input_shape)
    x = _conv_bn(x, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            x = _basic_block(x, filters, 2 if stage > 0 and block == 0 else 1)
    return Model(inputs, _classifier(x, classes), **{"name": "resnet20", **model_options})


def fast_resnet(classes: int = 10, input_shape: tuple[int, ...] = (32, 32, 3),
                width: int = 32, **model_options: Any) -> Model:
    """The DAWNBench "ResNet-9" of Myrtle.ai (Page, 2018), its widths halved by default
    (``width=64`` is the original, 6.5 M parameters; 32 has 1.6 M and a quarter of the work):
    conv-BN-ReLU blocks of width w, 2w with a max pool and a residual pair, 4w with a max pool,
    8w with a max pool and a residual pair, a global max pool, Dense classes with the logits
    scaled by 1/8. Random flips and crops in training."""
    def residual(x: SymbolicTensor, filters: int) -> SymbolicTensor:
        return Add()([x, _conv_bn(_conv_bn(x, filters), filters)])

    inputs, x = _augmented_input(input_shape)
    x = _conv_bn(x, width)
    x = residual(MaxPool2D(2)(_conv_bn(x, 2 * width)), 2 * width)
    x = MaxPool2D(2)(_conv_bn(x, 4 * width))
    x = residual(MaxPool2D(2)(_conv_bn(x, 8 * width)), 8 * width)
    x = Flatten()(MaxPool2D(x.shape[1])(x))  # global max pool (4x4 for 32x32 images)
    logits = Rescaling(1 / 8)(Dense(classes, use_bias=False)(x))
    return Model(inputs, Softmax()(logits), **{"name": "fast-resnet", **model_options})


NETWORKS: dict[str, Callable[..., Model]] = {
    "resnet20": resnet20,
    "fast-resnet": fast_resnet,
}

#: Every reference model's name.
NAMES = (*MODELS, *NETWORKS)

#: The images each reference model is made for: MNIST's for the MNIST stacks, CIFAR-10's for the
#: others (the shapes dataset's images are 32 x 32 RGB as well).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "shapes": (32, 32, 3),
    "notebook": (32, 32, 3),
    "mnist": (28, 28, 1),
    "mnist-bn": (28, 28, 1),
    "cifar": (32, 32, 3),
    "cifar-augmented": (32, 32, 3),
    "resnet20": (32, 32, 3),
    "fast-resnet": (32, 32, 3),
}


def build_model(name: str, classes: int = 10, input_shape: tuple[int, ...] | None = None,
                **model_options: Any) -> Model:
    """Reference model ``name`` as a model: a :class:`~xpcnn.Sequential` of a stack's layers
    (built when ``input_shape`` is given, else on first use), or a network's built graph
    :class:`~xpcnn.Model` (``input_shape`` defaults to CIFAR's (32, 32, 3), its
    :data:`INPUT_SHAPES`). ``model_options`` go to the model: ``device``, ``seed``, ``dtype``,
    ``name``."""
    if name not in NAMES:
        raise InputError(_unknown(name))
    if input_shape is not None:
        input_shape = _image_shape(input_shape, INPUT_SHAPES[name])
    options = {"name": name, **model_options}
    if name in NETWORKS:
        return NETWORKS[name](classes, input_shape or INPUT_SHAPES[name], **options)
    return Sequential(build_layers(name, classes), input_shape=input_shape, **options)


def _image_shape(shape: Any, made_for: tuple[int, int, int]) -> tuple[int, int, int]:
    """``shape`` as the per-sample shape (H, W, C) of images, which every reference model
    takes (the model is ``made_for`` one)."""
    ok = isinstance(shape, tuple | list) and len(shape) == 3 and all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in shape)
    if not ok:
        raise InputError(f"input_shape must be the per-sample shape (H, W, C) of images, three "
                         f"positive ints (the model is made for {made_for}), got {shape!r}")
    return tuple(int(d) for d in shape)  # type: ignore[return-value]
