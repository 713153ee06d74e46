"""Layers: one family a file, all following the contract in :mod:`xpcnn.layers.base`."""

from typing import TYPE_CHECKING

from ..errors import keras_names
from .activation import ReLU, Softmax
from .base import LAYER_TYPES, Layer, Setting
from .conv import Conv2D
from .dense import Dense, Flatten
from .dropout import Dropout
from .merge import Add, Concatenate
from .normalization import BatchNorm2D, FeatureNorm
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .preprocessing import Normalization, RandomCrop, RandomFlip, Rescaling

__all__ = [
    "LAYER_TYPES", "Add", "AvgPool2D", "BatchNorm2D", "Concatenate", "Conv2D", "Dense",
    "Dropout", "FeatureNorm", "Flatten", "GlobalAvgPool2D", "Layer", "MaxPool2D",
    "Normalization", "RandomCrop", "RandomFlip", "ReLU", "Rescaling", "Setting", "Softmax",
]

_AUGMENTATIONS = ("xpcnn's image augmentations are RandomFlip (left-right) and RandomCrop "
                  "(zero padding, then a random crop back to the size: a shift)")
_UPSAMPLING = ("xpcnn offers no upsampling (no Conv2DTranspose, no UpSampling2D): its layers "
               "keep or shrink the feature maps")
_SEPARABLE = ("xpcnn offers no depthwise or separable convolution: its convolution is Conv2D, "
              "over every input channel")
_GLOBAL_MAX = ("xpcnn offers no global max pool: MaxPool2D((H, W)) over the whole H x W "
               "feature map, then Flatten(), gives each channel's maximum; GlobalAvgPool2D() "
               "gives its mean")
_INPUT = ("xpcnn's is xpcnn.Input(shape), at the package's top as keras.Input: "
          "Sequential([xpcnn.Input((28, 28, 1)), ...]) or xpcnn.Model(inputs, outputs)")
_MERGE = "xpcnn's merge layers are Add and Concatenate"

#: Keras 3's names that xpcnn.layers lacks: (the xpcnn names the advice gives, which exist,
#: the advice). Not aliases: there is one name for each layer, and this says which.
KERAS_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "MaxPooling2D": (("MaxPool2D",), "xpcnn's is MaxPool2D, with the same arguments"),
    "AveragePooling2D": (("AvgPool2D",), "xpcnn's is AvgPool2D, with the same arguments"),
    "GlobalAveragePooling2D": (("GlobalAvgPool2D",), "xpcnn's is GlobalAvgPool2D"),
    "GlobalMaxPooling2D": (("MaxPool2D", "Flatten", "GlobalAvgPool2D"), _GLOBAL_MAX),
    "GlobalMaxPool2D": (("MaxPool2D", "Flatten", "GlobalAvgPool2D"), _GLOBAL_MAX),
    "BatchNormalization": (("BatchNorm2D",), (
        "xpcnn's is BatchNorm2D (over the last axis, of images or features), whose momentum "
        "is PyTorch's, each batch's weight: Keras' momentum=0.99, epsilon=1e-3 are "
        "BatchNorm2D(momentum=0.01, eps=1e-3)")),
    "LayerNormalization": (("BatchNorm2D", "FeatureNorm"), (
        "xpcnn offers no layer normalisation: BatchNorm2D normalises each channel over the "
        "batch, FeatureNorm each feature map of each image over its H x W positions")),
    "Activation": (("ReLU", "Softmax"), (
        "xpcnn's activation layers are ReLU() (Activation('relu')) and Softmax() "
        "(Activation('softmax')), or activation='relu' on Conv2D and Dense ('softmax' on Dense); "
        "it offers no other activation")),
    "LeakyReLU": (("ReLU",), "xpcnn's one activation with a kink is ReLU (no negative slope; "
                             "max_value= caps it)"),
    "PReLU": (("ReLU",), "xpcnn's one activation with a kink is ReLU (no negative slope)"),
    "ELU": (("ReLU",), "xpcnn's one activation with a kink is ReLU"),
    "add": (("Add",), "xpcnn's is the layer Add: Add()([a, b])"),
    "concatenate": (("Concatenate",), "xpcnn's is the layer Concatenate: Concatenate()([a, b]), "
                                      "along the channels"),
    "Multiply": (("Add", "Concatenate"), _MERGE + "; no product"),
    "multiply": (("Add", "Concatenate"), _MERGE + "; no product"),
    "SeparableConv2D": (("Conv2D",), _SEPARABLE),
    "DepthwiseConv2D": (("Conv2D",), _SEPARABLE),
    "Conv2DTranspose": ((), _UPSAMPLING),
    "UpSampling2D": ((), _UPSAMPLING),
    "ZeroPadding2D": (("Conv2D", "MaxPool2D", "AvgPool2D"), (
        "xpcnn offers no padding layer: Conv2D, MaxPool2D and AvgPool2D pad their own inputs "
        "(padding='same', or the pools' integer padding=)")),
    "Input": (("xpcnn.Input",), _INPUT),
    "InputLayer": (("xpcnn.Input",), _INPUT),
    "RandomRotation": (("RandomFlip", "RandomCrop"), _AUGMENTATIONS + "; no rotation"),
    "RandomZoom": (("RandomFlip", "RandomCrop"), _AUGMENTATIONS + "; no zoom"),
    "RandomContrast": (("RandomFlip", "RandomCrop"), _AUGMENTATIONS + "; no contrast change"),
    "RandomBrightness": (("RandomFlip", "RandomCrop"), _AUGMENTATIONS
                         + "; no brightness change"),
    "RandomTranslation": (("RandomCrop",), (
        "the nearest is RandomCrop(padding=p): the image shifted by up to p pixels each way "
        "(a number of pixels, not Keras' fraction of the size), the border filled with zeros "
        "(Keras' fill_mode='constant')")),
    "Reshape": (("Flatten",), "xpcnn offers no Reshape: Flatten() makes (N, H, W, C) (N, "
                              "H * W * C), which Dense takes"),
    "Lambda": (("Layer",), (
        "xpcnn offers no Lambda layer, as it has no automatic differentiation to take a "
        "function's gradient: subclass Layer, with forward and backward")),
}



if not TYPE_CHECKING:  # (hidden from type checkers, which then still flag a typo)
    __getattr__ = keras_names(__name__, KERAS_NAMES, "Keras' name")
