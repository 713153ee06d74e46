"""Dropout: zero a random fraction of activations in training (inverted: rescale the rest)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import dtype_name
from ..checks import number
from ..errors import InputError
from ..ops import random
from ..ops.kernels import kernels_for
from .arguments import Shape, keras_positional
from .base import DEFAULT, Options, RandomLayer, Setting


class Dropout(RandomLayer):
    """Inverted dropout: in training, each element is dropped (zeroed) with probability
    ``rate`` and the others are scaled so that the expected output is the input.

    The numbers drawn in a dtype are the multiples of 2**-bits below 1 (bits: the dtype's
    significand's, 11 in float16: :mod:`xpcnn.ops.random`) and an element is kept where its
    number is at least the rate rounded up to a multiple of 2**-bits (:meth:`_drawn_rate`,
    exact in the dtype), the share dropped: never below the rate, within 2**-bits above it.
    The kept elements are scaled by the inverse of the share kept, so that the expected value
    is exact; in float32 and float64, by 1 / (1 - rate), as PyTorch and Keras scale (and kept
    at the rate as the dtype holds it), wherever the two differ by 2**-16 of the output at
    most (at every rate below about 1 - 2**-9). A
    rate that a dtype rounds up to 1 (above 1 - 2**-11 in float16) would keep nothing:
    building or computing the layer in that dtype is refused.
    """

    # The gradient of a ReLU before it, in the same pass as the mask's (one launch on CuPy).
    can_apply_input_relu_grad = True
    input_values = "passes"  # (in the input's dtype)

    @keras_positional  # (Keras' Dropout(rate, noise_shape, seed))
    def __init__(self, rate: float, *, name: str | None = None) -> None:
        super().__init__(name)
        self.rate = rate

    def _rate_set(self) -> None:
        # (_drawn_rate's, by dtype object: for this rate only)
        self._drawn_rates: dict[Any, float] = {}
        if vars(self).get("built"):  # (checked as build checks it: a rate 0.99999 in float16
            for dtype in (self.dtype, self.compute_dtype):  # would abort the next step)
                self._drawn_rate(dtype)

    # (a step captured in a CUDA graph holds the old rate, or no mask at all at 0: a change, by
    # a schedule's callback say, captures it again; see Setting)
    rate = Setting(lambda value: number(value, "Dropout rate", 0.0, 1.0, high_open=True),
                   on_set=_rate_set)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate}

    def draws_in_training(self) -> bool:
        """At rate 0 a training pass is the identity and draws nothing (nor counts a
        draw)."""
        return self.rate != 0.0

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        shape = super()._build(input_shape, rng)
        # (a model hands the layer either dtype: its first layer gets the batch in ``dtype``)
        for dtype in (self.dtype, self.compute_dtype):
            self._drawn_rate(dtype)
        return shape

    def set_compute_dtype(self, dtype: Any) -> None:
        self._drawn_rate(dtype)  # (a rate this dtype cannot draw: refused, nothing changed)
        super().set_compute_dtype(dtype)

    def check_compute_dtype(self, xp: Any, dtype: Any) -> None:
        self._drawn_rate(dtype, xp)

    def to(self, backend: Any) -> None:
        super().to(backend)
        self._drawn_rates = {}  # (keyed by the other library's dtype objects)

    def _drawn_rate(self, dtype: Any, xp: Any = None) -> float:
        """The share of elements dropped in ``dtype`` at :attr:`rate` (see the class): the
        rate rounded up to a multiple of 2**-bits, below 1; an :class:`InputError` where it
        rounds up to 1. Worked out on the host, once a dtype object (a dict lookup after
        that)."""
        drawn = self._drawn_rates.get(dtype)
        if drawn is None:
            bits = random.significant_bits(self.xp if xp is None else xp, dtype)
            name = dtype_name(dtype)
            # (up from the rate itself, all exact: rounded to the dtype first, bfloat16's 0.9
            # became 0.8984375, a share below the rate asked)
            drawn = math.ceil(self.rate * 2**bits) / 2**bits
            if drawn == 1.0:
                raise InputError(
                    f"layer {self.name!r} (Dropout): rate {self.rate!r} cannot be drawn in "
                    f"{name}: its random numbers there are multiples of 2**-{bits} and the "
                    "rate rounds up to 1, so every element would be dropped and none left to "
                    f"carry the expected value. The highest rate {name} draws is 1 - "
                    f"2**-{bits} = {1 - 2.0**-bits!r}: give at most that, or compute this "
                    "layer in a dtype of more bits (float32, float64)")
            if bits >= 24 and abs(drawn - self.rate) <= 2**-16 * (1 - self.rate):
                # (float32 and float64: the scale 1 / (1 - rate), as PyTorch's and Keras', but
                # where the draw's rounding of the rate would bias the expected output by more
                # than 2**-16 of it: at rates within about 2**-9 of 1 in float32)
                drawn = self.rate
            self._drawn_rates[dtype] = drawn
        return drawn

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        if not training:  # (a training pass's caches left alone: see Layer, threads)
            return x
        # (where no backward runs, keep_for_backward, the same draw and nothing kept)
        keep = options.keep_for_backward
        # (the output of that ReLU, where this layer applies its gradient)
        self._cache_relu_y = x if keep and options.apply_input_relu_grad else None
        self._cache_keep = self._cache_drawn = None
        if self.rate == 0.0:
            return x
        if not getattr(x.dtype, "isnative", True):  # (NumPy's big-endian floats: as the
            x = self.xp.astype(x, x.dtype.newbyteorder("="))  # other layers, native order)
        # The rate drawn, not the rate asked: the same mask (its threshold is exact in the
        # dtype), scaled by the inverse of the share kept (finite: the share is >= 2**-bits).
        drawn = self._drawn_rate(x.dtype)
        # (the mask kept as booleans: a quarter of a float mask's memory; the draw counted by
        # the kernels, on CuPy in the same launch)
        y, mask = kernels_for(self.backend).dropout(self.random_state, x, drawn,
                                                    first=self._first(tuple(x.shape)))
        if keep:
            self._cache_drawn, self._cache_keep = drawn, mask
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        relu_y, self._cache_relu_y = self._cache_relu_y, None
        kernels = kernels_for(self.backend)
        if self.rate == 0.0:
            return dy if relu_y is None else kernels.relu_backward(dy, relu_y)
        keep, self._cache_keep = self._cache_keep, None
        return kernels.mask_multiply(dy, keep, 1.0 / (1.0 - self._cache_drawn), relu_y)

