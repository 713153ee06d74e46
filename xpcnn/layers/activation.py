"""Elementwise activations and the softmax output layer."""

from __future__ import annotations

import numbers
from typing import Any

from ..errors import InputError
from ..ops.kernels import kernels_for
from ..ops.softmax import softmax, softmax_backward
from .arguments import keras_positional
from .base import DEFAULT, Layer, Options, Setting


def _check_max_value(max_value: Any) -> float | None:
    if max_value is not None and (isinstance(max_value, bool) or not isinstance(
            max_value, numbers.Real) or not 0 <= max_value < float("inf")):
        raise InputError(f"ReLU max_value must be >= 0 or None, got {max_value!r}")
    # (+ 0.0: a ceiling of -0.0 is 0.0, so that no output is -0.0)
    return None if max_value is None else float(max_value) + 0.0


class ReLU(Layer):
    """max(x, 0), optionally capped at ``max_value`` (a neuron's firing limit, e.g. ReLU6).
    A ceiling of 0, as Keras takes it, gives zeros and a zero gradient (0 is a ceiling, None
    none)."""

    # (a change after build captures a CUDA-graph step again, checked as the constructor's:
    # see Setting)
    max_value = Setting(_check_max_value)
    input_values = "passes"  # (in the input's dtype)

    @keras_positional  # (Keras' ReLU(max_value, negative_slope, threshold))
    def __init__(self, max_value: float | None = None, *, name: str | None = None) -> None:
        super().__init__(name)
        self.max_value = max_value

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "max_value": self.max_value}

    @property
    def relu_output(self) -> bool:
        return self.max_value is None

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        kern = kernels_for(self.backend)
        if not training:  # (a training pass's mask left alone: see Layer, threads)
            return kern.relu(x, self.max_value)
        # (the next layer applies the gradient, or no backward runs: keep_for_backward)
        if options.skip_relu_grad or not options.keep_for_backward:
            self._cache_mask = None
            return kern.relu(x, self.max_value)
        # The gradient passes where the output is strictly inside (0, max_value). Kept as a
        # boolean mask (a quarter of the memory of a float one); backward multiplies by it,
        # several times faster than xp.where.
        y, self._cache_mask = kern.relu_with_mask(x, self.max_value)
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        mask, self._cache_mask = self._cache_mask, None
        return dy if options.skip_relu_grad else kernels_for(self.backend).mask_multiply(dy, mask)


class Softmax(Layer):
    """Probabilities over the last axis. With cross-entropy the model fuses it into the loss."""

    @keras_positional  # (Keras' Softmax(axis))
    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        xp = self.xp
        y = softmax(xp, xp.astype(x, self.dtype, copy=False))
        if training:  # (nothing kept where no backward runs: keep_for_backward)
            self._cache_y = y if options.keep_for_backward else None
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return softmax_backward(self.xp, self._cache_y, dy)
