"""Dropout: zero a random fraction of activations in training (inverted: rescale the rest)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import number
from ..ops.kernels import kernels_for
from .base import DEFAULT, Layer, Options, Shape


class RandomLayer(Layer):
    """A layer that draws random numbers on the device.

    Its randomness is a pure function of (seed, calls): the seed is drawn at build from the
    model's generator and ``calls`` counts training batches, so a checkpoint that saves
    ``calls`` resumes the exact same random stream.

    Axis 0 of what it draws is the batch. In data-parallel training (:mod:`xpcnn.distributed`)
    ``batch_slice`` is ``(start, total)``: the batch is samples ``start:start + n`` of a global
    batch of ``total``, and the layer draws the numbers of the whole global batch and keeps that
    slice, so that every sample gets the numbers it gets in one process.
    """

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self.seed = int(rng.integers(2**31))
        self.calls = 0
        self.batch_slice: tuple[int, int] | None = None
        return input_shape

    def _uniform(self, shape: tuple[int, ...], dtype: Any) -> Any:
        start, total = self.batch_slice or (0, shape[0])
        u = self.backend.uniform((self.seed, self.calls), (total, *shape[1:]), dtype)
        self.calls += 1
        return u if total == shape[0] else u[start:start + shape[0], ...]


class Dropout(RandomLayer):
    def __init__(self, rate: float, name: str | None = None) -> None:
        super().__init__(name)
        self.rate = number(rate, "Dropout rate", 0.0, 1.0, high_open=True)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate}

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        if not training or self.rate == 0.0:
            return x
        # the mask kept as booleans (a quarter of a float mask's memory), applied as a product
        self._cache_keep = self._uniform(tuple(x.shape), x.dtype) >= self.rate
        return self._apply(x, self._cache_keep)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        if self.rate == 0.0:
            return dy
        keep, self._cache_keep = self._cache_keep, None
        return self._apply(dy, keep)

    def _apply(self, a: Any, keep: Any) -> Any:
        """``a`` where ``keep``, scaled by 1 / (1 - rate), in the product's own new array."""
        out = kernels_for(self.backend).mask_multiply(a, keep)
        out *= 1.0 / (1.0 - self.rate)
        return out
