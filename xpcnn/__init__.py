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

from typing import TYPE_CHECKING

from . import callbacks, data, layers, metrics, optim
from .backend import Backend, get_backend
from .callbacks import History
from .errors import (
    DataFormatError,
    DeviceError,
    DownloadError,
    ForeignNameError,
    InputError,
    MissingDependencyError,
    MissingFileError,
    NonFiniteError,
    TrainingInterrupted,
    XpcnnError,
    keras_names,
)
from .graph import Input
from .losses import SoftmaxCrossEntropy
from .model import Model, Sequential
from .saving import load_checkpoint, load_model

__version__ = "0.1.0"

__all__ = [
    "Backend", "DataFormatError", "DeviceError", "DownloadError", "ForeignNameError", "History",
    "Input", "InputError", "MissingDependencyError", "MissingFileError", "Model", "NonFiniteError",
    "Sequential", "SoftmaxCrossEntropy", "TrainingInterrupted", "XpcnnError", "callbacks",
    "data", "get_backend", "layers", "load_checkpoint", "load_model", "metrics", "optim",
]

#: Keras 3's modules that xpcnn lacks: (the xpcnn names the advice gives, which exist, the
#: advice). Not aliases: each thing has one name, and this says which.
KERAS_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "optimizers": (("optim", "optim.SGD", "optim.Adam", "optim.AdamW", "optim.RMSprop",
                    "optim.CosineDecay"), (
        "xpcnn's optimisers are xpcnn.optim's: optim.SGD, optim.Adam, optim.AdamW, "
        "optim.RMSprop, and its schedules, optim.CosineDecay...")),
    "utils": (("SoftmaxCrossEntropy", "Sequential"), (
        "xpcnn offers no utils: for to_categorical, give the integer labels (N,) as they are "
        "(SoftmaxCrossEntropy, compile(loss='sparse_categorical_crossentropy'), takes them, "
        "and one-hot rows, np.eye(C)[y], too); for set_random_seed, a model's seed, "
        "Sequential(seed=0)")),
    "regularizers": (("optim.SGD", "optim.Adam"), (
        "xpcnn offers no regularizers: weight_decay= on optim.SGD or optim.Adam decays every "
        "weight (Keras' regularizers.l2(l) is weight_decay=2 * l)")),
    "activations": (("layers.ReLU", "layers.Softmax"), (
        "xpcnn offers no activation functions: its activation layers are layers.ReLU and "
        "layers.Softmax, or activation='relu' on Conv2D and Dense ('softmax' on Dense)")),
    "applications": (("models.build_model",), (
        "xpcnn offers no pretrained networks: xpcnn.models.build_model(name) builds its own "
        "small ones, untrained (import xpcnn.models)")),
    "mixed_precision": (("Model.compile",), (
        "xpcnn's precision is a setting of Model.compile: compile(..., "
        "precision='mixed_float16' or 'mixed_bfloat16')")),
}



if not TYPE_CHECKING:  # (hidden from type checkers, which then still flag a typo)
    __getattr__ = keras_names(__name__, KERAS_NAMES, "Keras' module")
