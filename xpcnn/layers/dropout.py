"""Dropout: zero a random fraction of activations in training (inverted: rescale the rest)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..checks import number
from ..ops.kernels import kernels_for
from .base import DEFAULT, Layer, Options, Shape


class RandomLayer(Layer):
    """A layer that draws random numbers on the device.

    Its whole random state is ``random_state``, a device array [seed, draws so far] (see
    :mod:`xpcnn.ops.random`): the seed is drawn at build from the model's generator, and each
    training batch's draw reads the state and counts itself there, on the device. No host
    value changes from one step to the next, so a step can be captured in a CUDA graph and
    replayed; a checkpoint saves the two numbers (:attr:`seed`, :attr:`calls`) and resumes the
    exact same stream.

    Axis 0 of what it draws is the batch. In data-parallel training (:mod:`xpcnn.distributed`)
    ``batch_slice`` is ``(start, total)``: the batch is samples ``start:start + n`` of a global
    batch of ``total``, and the layer draws those samples' numbers of the global batch's draw,
    so that every sample gets the numbers it gets in one process.
    """

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self.random_state = self.backend.asarray(np.array([rng.integers(2**31), 0], np.int64))
        self.batch_slice: tuple[int, int] | None = None
        return input_shape

    @property
    def seed(self) -> int:
        return int(self.backend.to_numpy(self.random_state)[0])

    @property
    def calls(self) -> int:
        """How many batches drawn (read from the device: the host waits for it)."""
        return int(self.backend.to_numpy(self.random_state)[1])

    def set_random_state(self, seed: int, calls: int) -> None:
        """Resume the stream of ``seed`` after ``calls`` draws (written in place: a captured
        step goes on reading it)."""
        self.random_state[...] = self.backend.asarray(np.array([seed, calls], np.int64))

    def skip_draw(self) -> None:
        """Count a draw without drawing (a data-parallel rank with no sample in a batch)."""
        self.random_state[1:2] += 1

    def _first(self, shape: tuple[int, ...]) -> int:
        """The draw's first element for a batch of ``shape`` (see ``batch_slice``)."""
        start = self.batch_slice[0] if self.batch_slice else 0
        return start * math.prod(shape[1:])

    def to(self, backend: Any) -> None:
        state = self.backend.to_numpy(self.random_state)
        super().to(backend)
        self.random_state = backend.asarray(state)


class Dropout(RandomLayer):
    # The gradient of a ReLU before it, in the same pass as the mask's (one launch on CuPy).
    can_apply_input_relu_grad = True

    def __init__(self, rate: float, name: str | None = None) -> None:
        super().__init__(name)
        self.rate = number(rate, "Dropout rate", 0.0, 1.0, high_open=True)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate}

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # (the output of that ReLU, where this layer applies its gradient)
        self._cache_relu_y = x if training and options.apply_input_relu_grad else None
        if not training or self.rate == 0.0:
            return x
        # (the mask kept as booleans: a quarter of a float mask's memory; the draw counted by
        # the kernels, on CuPy in the same launch)
        y, self._cache_keep = kernels_for(self.backend).dropout(
            self.random_state, x, self.rate, first=self._first(tuple(x.shape)))
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        relu_y, self._cache_relu_y = self._cache_relu_y, None
        kernels = kernels_for(self.backend)
        if self.rate == 0.0:
            return dy if relu_y is None else kernels.relu_backward(dy, relu_y)
        keep, self._cache_keep = self._cache_keep, None
        return kernels.mask_multiply(dy, keep, 1.0 / (1.0 - self.rate), relu_y)
