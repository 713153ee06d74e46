"""Input preprocessing and augmentation layers, run on the model's device.

Augmentation layers act only in training (``fit``); in ``evaluate`` and ``predict`` they pass
the input through unchanged. Called directly on a batch, ``RandomFlip()(images)``, they
augment (``training=False`` does not), as Keras 3's random image layers. Being layers, they
are saved with the model and need no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import array_api_compat
import numpy as np

from ..backend import get_backend
from ..checks import flag, number, positive_int, real_floating, real_numbers
from ..errors import InputError
from ..ops.kernels import kernels_for
from .arguments import Shape, keras_positional, on_host, require_rank
from .base import DEFAULT, Layer, Options, RandomLayer, Setting


class Rescaling(Layer):
    """y = x * scale + offset, e.g. ``Rescaling(1 / 255)`` for uint8 images; ``scale`` and
    ``offset`` a number, or one per channel (a list or 1-D array, over the last axis, as in
    Keras 3: ``Rescaling([1 / 0.229, 1 / 0.224, 1 / 0.225])``)."""

    # The model's uint8 batch cast and scaled in one pass (one launch on CuPy; per-channel
    # values in the namespace's own operations).
    casts_input = True
    input_values = "normalises"  # (in the parameters' dtype)

    def _factors_set(self) -> None:
        if vars(self).get("built"):  # (a built layer's arrays made again, checked against
            self._make_factors()  # its channels: refused, the old value kept)

    # (a change after build captures a CUDA-graph step again, checked as the constructor's:
    # see Setting)
    scale = Setting(lambda value: _factor(value, "Rescaling scale"), on_set=_factors_set)
    offset = Setting(lambda value: _factor(value, "Rescaling offset"), on_set=_factors_set)

    def __init__(self, scale: float | list[float], offset: float | list[float] = 0.0, *,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.scale = scale
        self.offset = offset

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "offset": self.offset}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self._make_factors(input_shape)
        return input_shape

    def _make_factors(self, input_shape: Shape | None = None) -> None:
        """The (C,) arrays of per-channel values, in the layer's dtype (None where both are
        numbers: the kernels take those as Python numbers), checked against the channels."""
        shape = self.input_shape if input_shape is None else input_shape
        factors = {"scale": self.scale, "offset": self.offset}
        for what, v in factors.items():
            if isinstance(v, list) and len(v) not in (1, shape[-1]):
                raise InputError(f"layer {self.name!r} (Rescaling): its {what} has {len(v)} "
                                 f"values, one per channel, but the input has {shape[-1]} "
                                 f"channels (its shape {tuple(shape)}): give {shape[-1]} "
                                 "values, or one number for all")
        self._factors = None if not any(isinstance(v, list) for v in factors.values()) else \
            tuple(self.backend.asarray(np.broadcast_to(np.asarray(v, np.float64), (shape[-1],)),
                                       dtype=self.dtype) for v in factors.values())

    def to(self, backend: Any) -> None:
        super().to(backend)
        self._make_factors()

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # Computed in the parameters' dtype (the model's batch cast as it is read) and stored
        # in the compute dtype (float16 under mixed precision, as a Keras mixed policy's layer
        # gives it), which the next layer would cast it to in a pass of its own.
        if self._factors is None:
            return kernels_for(self.backend).rescale(x, self.scale, self.offset, self.dtype,
                                                     self.compute_dtype)
        xp, (scale, offset) = self.xp, self._factors
        y = xp.astype(x, self.dtype, copy=False) * scale + offset
        return xp.astype(y, self.compute_dtype, copy=False)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        if self._factors is None:
            return dy * self.scale
        # (in dy's dtype, the compute dtype, as a number's product keeps it: float16 stays)
        return dy * self.xp.astype(self._factors[0], dy.dtype)


class Normalization(Layer):
    """Per-channel normalisation y = (x - mean) / std, over the last axis.

    ``mean`` and ``std`` (or, as Keras takes it, ``variance``) are given (a number, or a value
    per channel), or computed from the training data by :meth:`adapt` (Keras' ``norm =
    Normalization(); norm.adapt(x_train)``); until then the layer cannot be built. As in
    Keras 3, given statistics are settings (in :meth:`get_config`, no weights), and adapted
    ones are the layer's non-trainable weights ``mean`` and ``variance``, (C,) each: saved as
    arrays with the model's other weights (in checkpoints too, of any size), read and set by
    ``get_weights`` / ``set_weights``, counted by ``summary``. ``adapted=True`` (what the
    configuration of an adapted layer says) makes a layer whose statistics come as weights
    (from a model file, or ``set_weights``), mean 0 and variance 1 until then."""

    # The model's uint8 batch cast and normalised in one pass (one launch on CuPy).
    casts_input = True
    input_values = "normalises"  # (in the parameters' dtype)
    weight_names = ("mean", "variance")
    updates_state = False  # (adapted statistics are fixed in training, as in Keras)

    @keras_positional  # (Keras' Normalization(axis, mean, variance, invert))
    def __init__(self, mean: list[float] | float | None = None,
                 std: list[float] | float | None = None, *, name: str | None = None,
                 variance: list[float] | float | None = None, adapted: bool = False) -> None:
        super().__init__(name)
        self._mean: list[float] | None = None
        self._std: list[float] | None = None
        self.adapted = flag(adapted, "Normalization adapted")
        if std is not None and variance is not None:
            raise InputError("Normalization takes std or variance, not both; got "
                             f"std={std!r}, variance={variance!r}")
        spread, what = (std, "std") if variance is None else (variance, "variance")
        if (mean is None) != (spread is None):
            raise InputError(f"Normalization takes both mean and std, or neither (then "
                             f"adapt(data) computes them); got mean={mean!r}, {what}={spread!r}")
        if mean is None:
            return
        if self.adapted:
            raise InputError("Normalization(adapted=True) takes its statistics as weights "
                             "(set_weights, or a model file), not as mean and std: give one "
                             "or the other")
        self._mean = _statistic(mean, "mean")
        spreads = _statistic(spread, what)
        # (one of length 1 beside a per-channel one broadcasts, as in Keras; as a pair assigned
        # one at a time is taken: the file of such a layer loads through here)
        if 1 not in (len(self.mean), len(spreads)) and len(self.mean) != len(spreads):
            raise InputError(f"Normalization needs mean and {what} of equal length (or one of "
                             f"length 1), {what} positive; got mean={mean!r}, {what}={spread!r}")
        self._std = spreads if variance is None else np.sqrt(spreads).tolist()

    @property
    def mean(self) -> list[float] | None:
        """The per-channel mean (a list of floats; None until given or adapted)."""
        return self._mean

    @mean.setter
    def mean(self, value: Any) -> None:
        self._set_statistic("mean", value)

    @property
    def std(self) -> list[float] | None:
        """The per-channel std (a list of floats; None until given or adapted)."""
        return self._std

    @std.setter
    def std(self, value: Any) -> None:
        self._set_statistic("std", value)

    def _set_statistic(self, what: str, value: Any) -> None:
        # A built layer normalises with arrays made from them at build (a captured step reads
        # them by address): a new value assigned there was ignored by the running model and
        # written to its file. Before build, checked as the constructor checks it.
        if self.built:
            raise InputError(
                f"layer {self.name!r} (Normalization) is built: its {what} cannot be assigned "
                "(the running layer would not use it); call layer.adapt(data) for statistics "
                "of new data, set_weights for an adapted layer's, or make a new layer, "
                "Normalization(mean, std)")
        if value is not None:
            value = _statistic(value, what)
        vars(self)["_" + what] = value

    def get_config(self) -> dict[str, Any]:
        # Adapted statistics are weights (a file's arrays, of any size), not settings: the JSON
        # configuration of a model file is capped (MAX_CONFIG_BYTES).
        if self.adapted:
            return {"name": self.name, "adapted": True}
        return {"name": self.name, "mean": self.mean, "std": self.std}

    def _require_statistics(self) -> None:
        if self.mean is None and not self.adapted:
            raise InputError(f"layer {self.name!r} (Normalization) has no mean and std yet: "
                             "call layer.adapt(data) on the training images (N, H, W, C), or "
                             "give them, Normalization(mean, std), before it is built or called "
                             "(Normalization(adapted=True) builds for statistics that "
                             "load_weights or set_weights will give)")
        # (mean and std assigned one at a time before the build: checked as a pair here, as
        # the constructor checks them)
        if not self.adapted and (self.std is None or 1 not in (len(self.mean), len(self.std))
                                 and len(self.mean) != len(self.std)):
            raise InputError(f"Normalization needs both mean and std, of equal lengths (or one "
                             f"of length 1); got mean={self.mean!r}, std={self.std!r}")

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        self._require_statistics()  # (else a symbolic call's trial build, or "build it first")
        return super().__call__(x, training)

    def _statistics(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The (c,) shift and scale on the host: the mean, and 1 / std divided in float64
        (:func:`_inverse`)."""
        return np.broadcast_to(self.mean, (c,)), _inverse(np.broadcast_to(self.std, (c,)))

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self._require_statistics()
        c = input_shape[-1]
        if self.mean is not None and max(len(self.mean), len(self.std)) not in (1, c):
            raise InputError(f"Normalization has {max(len(self.mean), len(self.std))} channel "
                             f"statistics but the input has {c} channels")
        if self.adapted:
            if self.mean is None:  # (weights to come: Keras' initial mean 0 and variance 1)
                self._mean, self._std = [0.0] * c, [1.0] * c
            self._param("mean", np.broadcast_to(self.mean, (c,)), trainable=False)
            variance = np.square(np.broadcast_to(np.asarray(self.std, np.float64), (c,)))
            if not np.all(variance <= float(self.xp.finfo(self.dtype).max)):
                raise InputError(f"layer {self.name!r} (Normalization): its variance (up to "
                                 f"{float(np.max(variance)):.3g}) is beyond the range of "
                                 f"{self.dtype}, the dtype that holds it; adapt it on "
                                 "rescaled data")
            self._param("variance", variance, trainable=False)
            self._derive()
            return input_shape
        shift, scale = self._statistics(c)
        self._shift = self.backend.asarray(shift, dtype=self.dtype)
        self._scale = self.backend.asarray(scale, dtype=self.dtype)
        return input_shape

    def _derive(self) -> None:
        """An adapted layer's shift (its ``mean`` weight itself) and scale, 1 / sqrt of its
        ``variance`` weight as stored, in float64: the same from the layer's own adapt and from
        its file (a loaded model predicts bit for bit as the saved one)."""
        self._shift = self.state["mean"]
        variance = self.state["variance"]
        self._scale = self.backend.asarray(
            _inverse(np.sqrt(self.backend.to_numpy(variance).astype(np.float64))),
            dtype=self.dtype)
        self._scale_of = variance

    def _arrays_now(self) -> tuple[Any, Any]:
        """The shift and scale the kernels read; an adapted layer's made again where its
        weights were replaced behind its back (a model's moves, data parallelism's averages)."""
        if self.adapted and (self._shift is not self.state["mean"]
                             or self._scale_of is not self.state["variance"]):
            self._derive()
        return self._shift, self._scale

    def weight_problem(self, name: str, w: np.ndarray) -> str | None:
        # (a negative or NaN one is no variance: every prediction was NaN)
        if name == "variance" and not np.all((w >= 0) & np.isfinite(w)):
            return (f"holds variances that are negative or not finite "
                    f"({float(np.min(w)):.3g}), expected finite values >= 0: (x - mean) / "
                    "sqrt(variance) divides by their square roots")
        return None

    def assign_weights(self, checked: list[tuple[str, np.ndarray]]) -> None:
        super().assign_weights(checked)
        if not self.state:  # (given statistics: no weights)
            return
        given = dict(checked)
        if "mean" in given:
            self._mean = np.asarray(given["mean"], np.float64).tolist()
        if "variance" in given:
            self._std = np.sqrt(np.asarray(given["variance"], np.float64)).tolist()
        self._derive()

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # (computed and stored as Rescaling's output)
        shift, scale = self._arrays_now()
        return kernels_for(self.backend).normalize(x, shift, scale, self.dtype,
                                                   self.compute_dtype)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return dy * self._arrays_now()[1]

    def to(self, backend: Any) -> None:
        super().to(backend)  # (an adapted layer's weights moved with the others)
        if self.adapted:
            self._derive()
        else:
            self._build(self.input_shape, np.random.default_rng(0))

    def adapt(self, data: Any, batch_size: int | None = None) -> None:
        """Set ``mean`` and ``std`` to the per-channel mean and population std of ``data``
        (over every axis but the last, as Keras), computed afresh at each call.

        ``data``: images (N, H, W, C) (or any (N, ..., C)) of a real dtype, uint8 included, as
        a NumPy array or memory map, or an array of an Array API namespace (CuPy, the layer's
        backend), or an iterable of such batches (a list, a generator; images alone, no
        labels; a one-element ``(x,)`` or ``[x]`` is ``x``, as a PyTorch DataLoader over
        ``TensorDataset(x)`` gives it). The statistics are summed in float64, ``batch_size``
        samples at a time (None: at most 4 M values, 64 K a channel), less the first sample's
        values (data far from 0 keeps its precision), and the chunks combined (Chan et al.), so
        no float64 copy of the whole data is made. A built layer keeps its input's channel
        count, and ``predict`` (a model holding it, compiled or not) uses the new statistics at
        once. A constant channel (std 0) gives 0, as in Keras (a std below 1e-7 divides as
        1e-7). Refused: no values, NaN or infinity, a variance beyond the layer's dtype; a
        failed call leaves the statistics as they were."""
        rows = None if batch_size is None else positive_int(batch_size, "adapt batch_size")
        if isinstance(data, dict):  # (iterated, its keys were read as batches)
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) as an array or "
                             f"an iterable of such batches, not a dict (keys {list(data)}): "
                             "give it the images, adapt(data[key])")
        single = array_api_compat.is_array_api_obj(data)
        try:
            batches = iter([data] if single else data)
        except TypeError:
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) as an array or "
                             f"an iterable of such batches, got {type(data).__name__}") from None

        def checked() -> Iterator[tuple[Any, str]]:
            """The batches, each checked (an array of the channels of the others) as it
            comes, with how errors name it."""
            channels = self.input_shape[-1] if self.built and not self.provisional else None
            for i, batch in enumerate(batches):
                where = "the data" if single else f"batch {i}"
                if isinstance(batch, list | tuple) and len(batch) == 1:
                    batch = batch[0]  # ((x,) and [x] as x: a DataLoader over TensorDataset(x))
                channels = self._adapt_channels(batch, where, channels)
                if not first:  # (what an unbuilt layer is built for: the first batch's)
                    first.append(_built_on(batch))
                yield batch, where

        first: list[Any] = []

        count, mean, std = _moments(checked(), rows)
        if count == 0:
            raise InputError("Normalization.adapt got no values: the data is empty (no "
                             "samples, or an axis of size 0); give it the training images")
        channels = len(mean)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise InputError("Normalization.adapt: the data's mean or std overflows float64 "
                             f"(mean {mean.tolist()}, std {std.tolist()}); rescale the data")
        if not self.built or self.provisional:  # (checked in the layer's dtype when built)
            self._mean, self._std = mean.tolist(), std.tolist()
            self.adapted = True
            self.built, self.state = False, {}
            # Built for the data's per-sample shape, as Keras' adapt builds the layer: its
            # weights at once. Provisional: a model builds it again for its own input, dtype
            # and device from the float64 statistics (the layer as unbuilt, as before).
            try:
                self.build(*first[0])
                self.provisional = True
            except InputError:  # (a variance beyond float32: checked at a model's build,
                self.built, self.state = False, {}  # which may be float64's)
            return
        largest = float(self.xp.finfo(self.dtype).max)
        if not np.all(std * std <= largest):  # (checked before anything changes)
            raise InputError(f"Normalization.adapt: the data's variance (up to "
                             f"{float(np.max(std * std)):.3g}) is beyond the range of the "
                             f"layer's dtype, {self.dtype}, which holds it; rescale the data")
        self._mean, self._std = mean.tolist(), std.tolist()
        shift, scale = self._arrays_now()
        if not self.adapted:
            # Given statistics become weights, as an adapted layer's are: its mean weight is
            # the shift array itself (written below), its variance a new one.
            self.adapted = True
            self.state["mean"] = shift
            self.state["variance"] = self.backend.asarray(np.ones(channels), dtype=self.dtype)
            self._scale_of = self.state["variance"]
            Layer.rebuilds += 1  # (its model looks again at its layers' arrays)
        # Written in place: a training step captured in a CUDA graph reads these arrays by
        # address, so new arrays would leave it reading the old ones, freed. (The scale from
        # the variance as stored, as _derive makes it: a file gives the same.)
        self.state["variance"][...] = self.backend.asarray(std * std, dtype=self.dtype)
        variance = self.backend.to_numpy(self.state["variance"]).astype(np.float64)
        shift[...] = self.backend.asarray(mean, dtype=self.dtype)
        scale[...] = self.backend.asarray(_inverse(np.sqrt(variance)), dtype=self.dtype)

    def _adapt_channels(self, batch: Any, where: str, channels: int | None) -> int:
        """The channel count of one batch given to :meth:`adapt`, checked: an array (N, ..., C)
        of a real dtype, of ``channels`` channels where that is known (the built input's, or
        the first batch's)."""
        if not array_api_compat.is_array_api_obj(batch):
            hint = (": adapt takes images alone, no labels ((x for x, _ in batches) drops "
                    "them)" if isinstance(batch, list | tuple) and len(batch) >= 2 else "")
            raise InputError(f"Normalization.adapt takes images (N, H, W, C) as an array or an "
                             f"iterable of such batches; {where} is a "
                             f"{type(batch).__name__}{hint}")
        xp = array_api_compat.array_namespace(batch)
        if len(batch.shape) < 2 or not real_numbers(xp, batch.dtype):
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


def _built_on(batch: Any) -> tuple[Shape, Any]:
    """The per-sample shape and device an adapted layer is built for from its first batch: a
    CuPy batch's device, else the CPU (a torch tensor's too)."""
    shape = tuple(int(d) for d in batch.shape[1:])
    if type(batch).__module__.partition(".")[0] == "cupy":
        return shape, (array_api_compat.array_namespace(batch), array_api_compat.device(batch))
    return shape, "cpu"


def _statistic(value: Any, what: str) -> list[float]:
    """A Normalization statistic given (``what``: "mean", "std" or "variance"), a number or
    one per channel, as a list of floats, checked: finite, a spread >= 0 (at most 1e-7 is
    divided by as 1e-7, as Keras does)."""
    return _values(value, f"Normalization {what}", None if what == "mean" else 0.0)


def _values(value: Any, what: str, low: float | None = None) -> list[float]:
    """``value``, a number or one per channel (a list, a tuple or a 1-D array), as a list of
    floats, each finite (and at least ``low``)."""
    host = on_host(value, what)
    # (a list's items as given: NumPy would read [1, "a"] as two strings)
    values = np.asarray(host, dtype=object) if isinstance(host, list | tuple) else \
        np.asarray(host)
    if values.ndim > 1 or values.shape == (0,):
        got = "none" if values.shape == (0,) else f"an array of shape {values.shape}"
        kept = (f" (keepdims' shape? pass value.reshape(-1), its {values.shape[-1]} "
                "values)" if values.ndim > 1 and values.size ==
                values.shape[-1] else "")
        raise InputError(f"{what} must be a number or one per channel (a list or 1-D array "
                         f"of the channels' values, the last axis), got {got}{kept}")
    return [number(v, what, low) for v in np.atleast_1d(values).tolist()]


def _factor(value: Any, what: str) -> float | list[float]:
    """A Rescaling scale or offset: a number as a float, one per channel as a list."""
    values = _values(value, what)
    per_channel = isinstance(value, list | tuple) or getattr(value, "ndim", 0) == 1
    return values if per_channel else values[0]


#: The least std divided by, as Keras' backend.epsilon(): a constant channel gives 0.
_EPSILON = 1e-7


def _inverse(std: Any) -> np.ndarray:
    """1 / max(std, 1e-7) in float64 (Keras divides by maximum(sqrt(variance), epsilon))."""
    return 1.0 / np.maximum(np.asarray(std, np.float64), _EPSILON)


def _moments(batches: Iterable[tuple[Any, str]], rows: int | None
             ) -> tuple[int, np.ndarray, np.ndarray]:
    """The per-channel statistics of :meth:`Normalization.adapt`'s ``batches`` (each an array
    (N, ..., C), of one C, with how errors name it): the count of values per channel, their
    mean and population std, as (C,) float64 host arrays (count 0 and empty
    arrays where the batches hold no values). Summed in float64, ``rows`` samples at a time
    (None: at most 4 M values, 64 K a channel), less the first values, and the chunks
    combined by Chan et al.'s update."""
    count, mean, m2, shift = 0, np.zeros(0), np.zeros(0), None  # (of the values less shift)
    for batch, where in batches:
        if count == 0:
            c = int(batch.shape[-1])
            mean, m2 = np.zeros(c), np.zeros(c)
        # (at most 4 M values, and 64 K a channel: NumPy sums along the samples one after
        # another, its rounding error growing with their number)
        step = rows or max(1, min((1 << 22) // max(1, math.prod(batch.shape[1:])),
                                  (1 << 16) // max(1, math.prod(batch.shape[1:-1]))))
        n = batch.shape[0]
        for start in range(0, n, step):
            # (a stop within the axis: the standard leaves one beyond it unspecified)
            chunk = _chunk_moments(batch[start:min(start + step, n), ...], where, start, shift)
            if chunk is None:
                continue
            k, chunk_mean, chunk_m2, shift = chunk
            # Chan, Golub and LeVeque's pairwise update: exact in real arithmetic, and no
            # cancellation of large sums of squares.
            total = count + k
            delta = chunk_mean - mean
            mean = mean + delta * (k / total)
            m2 = m2 + chunk_m2 + delta * delta * (count / total * k)
            count = total
    if count == 0:
        return 0, mean, m2
    return count, mean + shift, np.sqrt(m2 / count)


def _chunk_moments(x: Any, where: str, first: int, shift: np.ndarray | None
                   ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """A part of a batch for :meth:`Normalization.adapt` (samples ``first`` onwards of
    ``where``), computed in float64 in its own namespace (on its device), less ``shift`` per
    channel (None: its first values, returned last): its count of values per channel, their
    mean and sum of squared deviations from it, as (C,) host arrays; None
    where it holds no values. (Shifted, data far from 0, 1e9 + noise, keeps its precision:
    the chunks' means are combined near 0.)"""
    xp = array_api_compat.array_namespace(x)
    c = int(x.shape[-1])
    if math.prod(x.shape) == 0:
        return None
    values = xp.reshape(xp.astype(x, xp.float64), (-1, c))
    host = get_backend((xp, array_api_compat.device(x))).to_numpy
    if real_floating(xp, x.dtype):  # (integers cannot hold NaN or infinity)
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
    return n, host(mean), host(xp.sum(deviations * deviations, axis=0)), shift


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
    input_values = "passes"  # (float values in their dtype; uint8 ones fit float16)
    has_gradient = False
    training_when_called = True  # (``layer(images)`` flips, as Keras 3's: see Layer)

    @keras_positional  # (Keras' RandomFlip(mode, seed, data_format))
    def __init__(self, mode: str = "horizontal", *, name: str | None = None) -> None:
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


def _check_padding(padding: Any) -> int:
    if not isinstance(padding, int | np.integer) or isinstance(padding, bool) or \
            not 1 <= padding < 2**15:
        raise InputError(f"RandomCrop padding must be a positive int (below 2**15), got "
                         f"{padding!r}")
    return int(padding)


class RandomCrop(RandomLayer):
    """Pad each training image by ``padding`` zeros and crop it back at a random offset, to
    the input's size (not Keras' ``RandomCrop(height, width, seed)``, which crops to a size, nor
    torchvision's ``RandomCrop(size, padding)``: their height, width, size and seed, positional
    or named, are refused with a clear error)."""

    # The model's uint8 batch cast as it is cropped (one launch on CuPy, the draw included).
    casts_input = True
    input_values = "passes"  # (float values in their dtype; uint8 ones fit float16)
    has_gradient = False
    training_when_called = True  # (``layer(images)`` crops, as Keras 3's: see Layer)
    # (a change after build captures a CUDA-graph step again, checked as the constructor's)
    padding = Setting(_check_padding)

    @keras_positional  # (Keras' RandomCrop(height, width, seed); torchvision's (size, padding))
    def __init__(self, padding: int = 4, *, name: str | None = None) -> None:
        super().__init__(name)
        self.padding = padding

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
