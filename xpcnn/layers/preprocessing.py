"""Input preprocessing and augmentation layers, run on the model's device.

Augmentation layers act only in training (``fit``); in ``evaluate`` and ``predict`` they pass
the input through unchanged. Being layers, they are saved with the model and need no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from ..backend import get_backend
from ..checks import number, positive_int
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
    """Per-channel normalisation y = (x - mean) / std, over the last axis.

    ``mean`` and ``std`` are given (a number, or a value per channel), or computed from the
    training data by :meth:`adapt` (Keras' ``norm = Normalization(); norm.adapt(x_train)``);
    until then the layer cannot be built. Model files keep them either way."""

    # The model's uint8 batch cast and normalised in one pass (one launch on CuPy).
    casts_input = True

    def __init__(self, mean: list[float] | float | None = None,
                 std: list[float] | float | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        if (mean is None) != (std is None):
            raise InputError("Normalization takes both mean and std, or neither (then "
                             f"adapt(data) computes them); got mean={mean!r}, std={std!r}")
        if mean is None:
            return
        self.mean = [number(v, "Normalization mean") for v in np.atleast_1d(mean).tolist()]
        self.std = [number(v, "Normalization std", 0.0, low_open=True)
                    for v in np.atleast_1d(std).tolist()]
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise InputError("Normalization needs mean and std of equal length, std positive; "
                             f"got mean={mean!r}, std={std!r}")

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "mean": self.mean, "std": self.std}

    def _require_statistics(self) -> None:
        if self.mean is None:
            raise InputError(f"layer {self.name!r} (Normalization) has no mean and std yet: "
                             "call layer.adapt(data) on the training images (N, H, W, C), or "
                             "give them, Normalization(mean, std), before it is built or called")

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        self._require_statistics()  # (else a symbolic call's trial build, or "build it first")
        return super().__call__(x, training)

    def _statistics(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The (c,) shift and scale on the host: the mean, and 1 / std divided in float64."""
        return np.broadcast_to(self.mean, (c,)), 1.0 / np.broadcast_to(self.std, (c,))

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self._require_statistics()
        c = input_shape[-1]
        if len(self.mean) not in (1, c):
            raise InputError(f"Normalization has {len(self.mean)} channel statistics but the "
                             f"input has {c} channels")
        shift, scale = self._statistics(c)
        self._shift = self.backend.asarray(shift, dtype=self.dtype)
        self._scale = self.backend.asarray(scale, dtype=self.dtype)
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

    def adapt(self, data: Any, batch_size: int | None = None) -> None:
        """Set ``mean`` and ``std`` to the per-channel mean and population std of ``data``
        (over every axis but the last, as Keras), computed afresh at each call.

        ``data``: images (N, H, W, C) (or any (N, ..., C)) of a real dtype, uint8 included, as
        a NumPy array or memory map, or an array of an Array API namespace (CuPy, the layer's
        backend), or an iterable of such batches (a list, a generator; images alone, no
        labels). The statistics are summed in float64, ``batch_size`` samples at a time
        (None: at most 4 M values, 64 K a channel), less the first sample's values (data far
        from 0 keeps its precision), and the chunks combined (Chan et al.), so no float64 copy
        of the whole data is made. A built layer keeps its input's
        channel count, and ``predict`` (a model holding it, compiled or not) uses the new
        statistics at once. Refused: no values, NaN or infinity, a constant channel (std 0); a
        failed call leaves the statistics as they were."""
        rows = None if batch_size is None else positive_int(batch_size, "adapt batch_size")
        single = array_api_compat.is_array_api_obj(data)
        try:
            batches = iter([data] if single else data)
        except TypeError:
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) as an array or "
                             f"an iterable of such batches, got {type(data).__name__}") from None
        count, mean, m2 = 0, np.zeros(0), np.zeros(0)
        lo, hi, shift = np.zeros(0), np.zeros(0), None  # (of the values less shift)
        channels = self.input_shape[-1] if self.built else None
        for i, batch in enumerate(batches):
            where = "the data" if single else f"batch {i}"
            c = channels = self._adapt_channels(batch, where, channels)
            if count == 0:
                mean, m2 = np.zeros(c), np.zeros(c)
                lo, hi = np.full(c, np.inf), np.full(c, -np.inf)
            # (at most 4 M values, and 64 K a channel: NumPy sums along the samples one
            # after another, its rounding error growing with their number)
            step = rows or max(1, min((1 << 22) // max(1, math.prod(batch.shape[1:])),
                                      (1 << 16) // max(1, math.prod(batch.shape[1:-1]))))
            n = batch.shape[0]
            for start in range(0, n, step):
                # (a stop within the axis: the standard leaves one beyond it unspecified)
                chunk = _chunk_moments(batch[start:min(start + step, n), ...], where, start,
                                       shift)
                if chunk is None:
                    continue
                k, chunk_mean, chunk_m2, chunk_lo, chunk_hi, shift = chunk
                # Chan, Golub and LeVeque's pairwise update: exact in real arithmetic, and
                # no cancellation of large sums of squares.
                total = count + k
                delta = chunk_mean - mean
                mean = mean + delta * (k / total)
                m2 = m2 + chunk_m2 + delta * delta * (count / total * k)
                lo, hi = np.minimum(lo, chunk_lo), np.maximum(hi, chunk_hi)
                count = total
        if count == 0:
            raise InputError("Normalization.adapt got no values: the data is empty (no "
                             "samples, or an axis of size 0); give it the training images")
        mean, lo, hi = mean + shift, lo + shift, hi + shift
        std = np.sqrt(m2 / count)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise InputError("Normalization.adapt: the data's mean or std overflows float64 "
                             f"(mean {mean.tolist()}, std {std.tolist()}); rescale the data")
        constant = np.flatnonzero((lo == hi) | (std == 0))
        if constant.size:
            which = ", ".join(f"{int(j)} (every value {float(lo[j]):g})" for j in constant)
            raise InputError(f"Normalization.adapt: channel{'s' * (constant.size > 1)} "
                             f"{which} of the data {'is' if constant.size == 1 else 'are'} "
                             "constant, std 0, which (x - mean) / std cannot divide by: drop "
                             "that channel from the data, or give mean and std yourself, "
                             "Normalization(mean, std) with a std > 0 for it")
        self.mean, self.std = mean.tolist(), std.tolist()
        if self.built:
            # Written in place: a training step captured in a CUDA graph reads these arrays
            # by address (they are in no model's list of arrays it checks), so new arrays
            # would leave it reading the old ones, freed.
            shift, scale = self._statistics(channels)
            self._shift[...] = self.backend.asarray(shift, dtype=self.dtype)
            self._scale[...] = self.backend.asarray(scale, dtype=self.dtype)

    def _adapt_channels(self, batch: Any, where: str, channels: int | None) -> int:
        """The channel count of one batch given to :meth:`adapt`, checked: an array (N, ..., C)
        of a real dtype, of ``channels`` channels where that is known (the built input's, or
        the first batch's)."""
        if not array_api_compat.is_array_api_obj(batch):
            hint = (": adapt takes images alone, no labels ((x for x, _ in batches) drops "
                    "them)" if isinstance(batch, tuple) else "")
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) as an array or an "
                             f"iterable of such batches; {where} is a "
                             f"{type(batch).__name__}{hint}")
        xp = array_api_compat.array_namespace(batch)
        if len(batch.shape) < 2 or not xp.isdtype(batch.dtype, ("integral", "real floating")):
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) (or any "
                             f"(N, ..., C)) of a real dtype; {where} has shape "
                             f"{tuple(batch.shape)} and dtype {batch.dtype}")
        c = int(batch.shape[-1])
        if channels is not None and c != channels:
            known = (f"layer {self.name!r} (Normalization) is built for inputs of {channels} "
                     "channels" if self.built else
                     f"Normalization.adapt: the first batch has {channels} channels")
            raise InputError(f"{known}, but {where} has {c} (shape {tuple(batch.shape)}): the "
                             "statistics are per channel, the last axis")
        return c


def _chunk_moments(x: Any, where: str, first: int, shift: np.ndarray | None
                   ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                              np.ndarray] | None:
    """A part of a batch for :meth:`Normalization.adapt` (samples ``first`` onwards of
    ``where``), computed in float64 in its own namespace (on its device), less ``shift`` per
    channel (None: its first values, returned last): its count of values per channel, their
    mean, sum of squared deviations from it, least and largest, as (C,) host arrays; None
    where it holds no values. (Shifted, data far from 0, 1e9 + noise, keeps its precision:
    the chunks' means are combined near 0.)"""
    xp = array_api_compat.array_namespace(x)
    c = int(x.shape[-1])
    if math.prod(x.shape) == 0:
        return None
    values = xp.reshape(xp.astype(x, xp.float64), (-1, c))
    host = get_backend((xp, array_api_compat.device(x))).to_numpy
    if xp.isdtype(x.dtype, "real floating"):  # (integers cannot hold NaN or infinity)
        finite = xp.all(xp.isfinite(values), axis=1)
        if not bool(xp.all(finite)):
            per_sample = values.shape[0] // x.shape[0]
            bad = int(xp.argmax(xp.astype(~finite, xp.int8))) // per_sample
            raise InputError(f"Normalization.adapt: {where} holds NaN or infinite values "
                             f"(sample {first + bad} is the first); remove or repair those "
                             "samples")
    if shift is None:
        shift = host(values[0, :])
    values = values - xp.asarray(shift, device=array_api_compat.device(x))
    n = values.shape[0]
    mean = xp.sum(values, axis=0) / n
    deviations = values - mean
    return (n, host(mean), host(xp.sum(deviations * deviations, axis=0)),
            host(xp.min(values, axis=0)), host(xp.max(values, axis=0)), shift)


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
