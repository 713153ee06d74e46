"""Elementwise activations and the softmax output layer."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..ops.softmax import softmax
from .base import Layer


class ReLU(Layer):
    """max(x, 0), optionally capped at ``max_value`` (a neuron's firing limit, e.g. ReLU6)."""

    def __init__(self, max_value: float | None = None, name: str | None = None) -> None:
        super().__init__(name)
        if max_value is not None and not max_value > 0:
            raise InputError(f"ReLU max_value must be positive or None, got {max_value!r}")
        self.max_value = None if max_value is None else float(max_value)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "max_value": self.max_value}

    def forward(self, x: Any, training: bool = False) -> Any:
        xp = self.xp
        y = xp.clip(x, min=0.0, max=self.max_value)
        if training:
            # The gradient passes where the output is strictly inside (0, max_value).
            inside = x > 0 if self.max_value is None else (x > 0) & (x < self.max_value)
            # Multiplying by a float mask is several times faster than xp.where.
            self._cache_mask = xp.astype(inside, x.dtype)
        return y

    def backward(self, dy: Any) -> Any:
        return dy * self.xp.astype(self._cache_mask, dy.dtype, copy=False)


class Softmax(Layer):
    """Probabilities over the last axis. With cross-entropy the model fuses it into the loss."""

    def forward(self, x: Any, training: bool = False) -> Any:
        xp = self.xp
        y = softmax(xp, xp.astype(x, self.dtype, copy=False))
        if training:
            self._cache_y = y
        return y

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        y = self._cache_y
        return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True))
