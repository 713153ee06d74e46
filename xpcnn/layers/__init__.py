"""Layers: one family a file, all following the contract in :mod:`xpcnn.layers.base`."""

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
