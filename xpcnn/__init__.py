"""xpcnn: convolutional networks written once against the Python Array API.

The same layers train on NumPy (``device="cpu"``) or CuPy (``device="cuda"``)::

    import xpcnn
    from xpcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Rescaling, Softmax

    model = xpcnn.Sequential(device="cpu", seed=0)
    model.add(Rescaling(1 / 255))
    model.add(Conv2D(32, 3, padding="same"))
    ...
    model.compile(loss="cross_entropy", optimizer=xpcnn.optim.Adam(1e-3))
    model.fit(x, y, epochs=3, batch_size=64)
"""

from . import callbacks, data, layers, metrics, optim
from .backend import Backend, get_backend
from .callbacks import History
from .errors import (
    DataFormatError,
    DeviceError,
    DownloadError,
    InputError,
    MissingDependencyError,
    MissingFileError,
    NonFiniteError,
    TrainingInterrupted,
    XpcnnError,
)
from .graph import Input
from .losses import SoftmaxCrossEntropy
from .model import Model, Sequential
from .saving import load_checkpoint, load_model

__version__ = "0.1.0"

__all__ = [
    "Backend", "DataFormatError", "DeviceError", "DownloadError", "History", "Input",
    "InputError", "MissingDependencyError", "MissingFileError", "Model", "NonFiniteError",
    "Sequential", "SoftmaxCrossEntropy", "TrainingInterrupted", "XpcnnError", "callbacks",
    "data", "get_backend", "layers", "load_checkpoint", "load_model", "metrics", "optim",
]
