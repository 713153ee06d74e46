"""Input preprocessing and augmentation layers, run on the model's device.

Augmentation layers act only in training (``fit``); in ``evaluate`` and ``predict`` they pass
the input through unchanged. Being layers, they are saved with the model and need no gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import number
from ..errors import InputError
from ..ops.kernels import kernels_for
from .base import DEFAULT, Layer, Options, Shape, require_rank
from .dropout import RandomLayer


class Rescaling(Layer):
    """y = x * scale + offset, e.g. ``Rescaling(1 / 255)`` for uint8 images."""

    # The model's uint8 batch cast and scaled in one pass (one launch on CuPy).
    casts_input = True

    def __init__(self, scale: float, offset: float = 0.0, name: str | None = None) -> None:
        super().__init__(name)
        self.scale = number(scale, "Rescaling scale")
        self.offset = number(offset, "Rescaling offset")

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "offset": self.offset}

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # Computed in the parameters' dtype (the model's batch cast as it is read) and stored
        # in the compute dtype (float16 under mixed precision, as a Keras mixed policy's layer
        # gives it), which the next layer would cast it to in a pass of its own.
        return kernels_for(self.backend).rescale(x, self.scale, self.offset, self.dtype,
                                                 self.compute_dtype)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return dy * self.scale


class Normalization(Layer):
    """Per-channel normalisation y = (x - mean) / std with fixed ``mean`` and ``std``."""

    # The model's uint8 batch cast and normalised in one pass (one launch on CuPy).
    casts_input = True

    def __init__(self, mean: list[float] | float, std: list[float] | float,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.mean = [number(v, "Normalization mean") for v in np.atleast_1d(mean).tolist()]
        self.std = [number(v, "Normalization std", 0.0, low_open=True)
                    for v in np.atleast_1d(std).tolist()]
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise InputError("Normalization needs mean and std of equal length, std positive; "
                             f"got mean={mean!r}, std={std!r}")

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "mean": self.mean, "std": self.std}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        c = input_shape[-1]
        if len(self.mean) not in (1, c):
            raise InputError(f"Normalization has {len(self.mean)} channel statistics but the "
                             f"input has {c} channels")
        self._shift = self.backend.asarray(np.broadcast_to(self.mean, (c,)), dtype=self.dtype)
        self._scale = self.backend.asarray(1.0 / np.broadcast_to(self.std, (c,)),
                                           dtype=self.dtype)
        return input_shape

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # (computed and stored as Rescaling's output)
        return kernels_for(self.backend).normalize(x, self._shift, self._scale, self.dtype,
                                                   self.compute_dtype)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return dy * self._scale

    def to(self, backend: Any) -> None:
        super().to(backend)
        self._build(self.input_shape, np.random.default_rng(0))


def _images_dtype(layer: Layer, x: Any, options: Options) -> Any:
    """The dtype a random layer gives its images in: their own, or for the model's batch
    (``Options.cast_input``) the layer's compute dtype where that holds each of its values
    (uint8 images in float16 under mixed precision: half float32's bytes), else its dtype."""
    if not options.cast_input:
        return x.dtype
    xp = layer.xp
    return layer.compute_dtype if x.dtype in (xp.uint8, xp.int8) else layer.dtype


def _no_gradient(layer: Layer) -> None:
    """An augmentation's backward, called by itself (a model never calls it: see
    :attr:`Layer.has_gradient`)."""
    raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) runs no backward: it "
                     "has no gradient, and goes where none passes through it, before every "
                     "layer that is trained (at the model's start), as augmentations do")


class RandomFlip(RandomLayer):
    """Mirror each training image left-right with probability 1/2 (Keras' ``"horizontal"``
    mode, the only one)."""

    # The model's uint8 batch cast as it is flipped (one launch on CuPy, the draw included).
    casts_input = True
    has_gradient = False

    def __init__(self, mode: str = "horizontal", name: str | None = None) -> None:
        super().__init__(name)
        # (Keras' first argument: not taken for a name)
        if not (isinstance(mode, str) and mode == "horizontal"):
            raise InputError(f"RandomFlip flips left-right only (mode 'horizontal'), got mode "
                             f"{mode!r}")

    def get_config(self) -> dict[str, Any]:
        return super().get_config()  # (its mode is its only one, the default: not written)

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)  # (it flips axis W: a vector failed in training)
        return super()._build(input_shape, rng)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        dtype = _images_dtype(self, x, options)
        if not training:
            return self.xp.astype(x, dtype, copy=False)
        # (decisions drawn in float32 whatever the images' dtype: uint8 has no [0, 1); the draw
        # counted by the kernels, on CuPy in the flip's launch)
        first = self._first((x.shape[0], 1, 1, 1))
        return kernels_for(self.backend).random_flip(self.random_state, x, dtype, first)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        _no_gradient(self)


class RandomCrop(RandomLayer):
    """Pad each training image by ``padding`` zeros and crop it back at a random offset."""

    # The model's uint8 batch cast as it is cropped (one launch on CuPy, the draw included).
    casts_input = True
    has_gradient = False

    def __init__(self, padding: int = 4, name: str | None = None) -> None:
        super().__init__(name)
        if not isinstance(padding, int | np.integer) or isinstance(padding, bool) or \
                not 1 <= padding < 2**15:
            raise InputError(f"RandomCrop padding must be a positive int, got {padding!r}")
        self.padding = int(padding)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "padding": self.padding}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        return super()._build(input_shape, rng)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        dtype = _images_dtype(self, x, options)
        if not training:
            return self.xp.astype(x, dtype, copy=False)
        # (offsets drawn in float32 whatever the images' dtype, as flips; the draw counted by
        # the kernels, on CuPy in the crop's launch)
        first = self._first((x.shape[0], 2))
        return kernels_for(self.backend).random_crop(self.random_state, x, self.padding, dtype,
                                                     first)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        _no_gradient(self)
