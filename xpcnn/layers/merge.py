"""Merge layers: several batches in, one out (the functional API's skip connections and
branches). ``forward`` takes a list of batches; ``backward`` returns one gradient per input,
in the same order."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..ops.kernels import kernels_for
from .arguments import Shape
from .base import DEFAULT, Layer, Options


class Add(Layer):
    """The elementwise sum of two or more batches of one shape (a residual connection). A
    model's plan fuses a plain ``ReLU()`` after it (``can_fuse_relu``), and where the output
    is read by several layers and the ReLU fused, lets backward sum their gradients in the
    pass that applies the ReLU's (``can_sum_output_grads``)."""

    multi_input = True
    can_fuse_relu = True
    can_sum_output_grads = True

    def __init__(self, *, name: str | None = None) -> None:  # (Keras' keywords refused by name)
        super().__init__(name)

    def _build(self, input_shape: tuple[Shape, ...], rng: np.random.Generator) -> Shape:
        _require_inputs(self, input_shape)
        if any(s != input_shape[0] for s in input_shape):
            raise InputError(f"layer {self.name!r} (Add) adds inputs of one shape, got "
                             f"{', '.join(map(str, input_shape))}")
        return input_shape[0]

    def forward(self, x: list[Any], training: bool = False, options: Options = DEFAULT) -> Any:
        relu = options.fused_relu
        y = kernels_for(self.backend).add_relu(list(x), relu)
        if training:
            keep = options.keep_for_backward  # (else no backward runs: nothing kept)
            self._cache_count = len(x) if keep else None
            # where y > 0 the ReLU's gradient passes (unless the next layer applies it)
            self._cache_y = y if keep and relu and not options.skip_relu_grad else None
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> list[Any]:
        y, self._cache_y = self._cache_y, None
        parts = dy if options.sum_output_grads else [dy]
        if y is not None or len(parts) > 1:
            dy = kernels_for(self.backend).add_relu_backward(parts, y)
        # every input gets the same gradient (the model sums what reaches one tensor twice)
        return [dy] * self._cache_count


class Concatenate(Layer):
    """Two or more batches side by side along ``axis`` (as in Keras: -1, the channel axis, by
    default; axis 0 is the batch); every other axis must match. (N, H, W, C1) and
    (N, H, W, C2) give (N, H, W, C1 + C2)."""

    multi_input = True

    def __init__(self, axis: int = -1, *, name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or axis == 0:
            raise InputError(f"Concatenate axis must be a non-zero int (axis 0 is the batch), "
                             f"got {axis!r}")
        self.axis = int(axis)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}

    def _build(self, input_shape: tuple[Shape, ...], rng: np.random.Generator) -> Shape:
        _require_inputs(self, input_shape)
        first = input_shape[0]
        rank = len(first) + 1  # with the batch axis
        if not -rank < self.axis < rank:
            raise InputError(f"layer {self.name!r} (Concatenate) has axis {self.axis}, but its "
                             f"inputs have {rank} axes with the batch: expected 1..{rank - 1} "
                             f"or -{rank - 1}..-1")
        self.batch_axis = self.axis % rank  # the axis joined, counted with the batch's
        a = self.batch_axis - 1  # in the per-sample shape
        if any(len(s) != len(first) or s[:a] + s[a + 1:] != first[:a] + first[a + 1:]
               for s in input_shape):
            raise InputError(f"layer {self.name!r} (Concatenate) joins inputs along axis "
                             f"{self.axis}, so every other axis must match; got "
                             f"{', '.join(map(str, input_shape))}")
        self.splits = [s[a] for s in input_shape]
        return (*first[:a], sum(self.splits), *first[a + 1:])

    def forward(self, x: list[Any], training: bool = False, options: Options = DEFAULT) -> Any:
        return self.xp.concat(list(x), axis=self.batch_axis)

    def backward(self, dy: Any, options: Options = DEFAULT) -> list[Any]:
        grads, start, lead = [], 0, (slice(None),) * self.batch_axis
        for size in self.splits:
            grads.append(dy[(*lead, slice(start, start + size), ...)])
            start += size
        return grads


def _require_inputs(layer: Layer, input_shape: tuple[Shape, ...]) -> None:
    if len(input_shape) < 2:
        raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) merges two or more "
                         f"inputs, got {len(input_shape)}")
