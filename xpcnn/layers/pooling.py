"""Max, average and global-average pooling over (N, H, W, C)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError
from ..ops import pool, windows
from ..ops.kernels import kernels_for
from .arguments import (
    Shape,
    check_padding,
    does_not_fit,
    keras_positional,
    pair,
    require_rank,
)
from .base import DEFAULT, Layer, Options


class _Pool2D(Layer):
    @keras_positional  # (Keras' MaxPooling2D(pool_size, strides, padding, data_format, name))
    def __init__(self, pool_size: int | tuple[int, int] = 2,
                 strides: int | tuple[int, int] | None = None, padding: str | int = "valid", *,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.pool_size = pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else pair(strides, "strides")
        self.padding = check_padding(padding)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "pool_size": list(self.pool_size),
                "strides": list(self.strides), "padding": self.padding}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        h, w, c = input_shape
        self.pads = windows.resolve_padding(self.padding, (h, w), self.pool_size, self.strides)
        (ph, pw), (top, bottom, left, right) = self.pool_size, self.pads
        # A side's padding as wide as the pool makes windows of padding alone: no maximum
        # (-inf), no mean (0/0). "same" pads pool_size - 1 in all at most.
        if max(top, bottom) >= ph or max(left, right) >= pw:
            raise InputError(
                f"layer {self.name!r}: padding {self.padding!r} is not less than the {ph}x{pw} "
                "pool: windows made only of padding would have no value"
            )
        self.out_hw = windows.output_size((h, w), self.pool_size, self.strides, self.pads)
        if min(self.out_hw) < 1:
            raise does_not_fit(self, f"a {self.pool_size} pool", input_shape)
        return (*self.out_hw, c)


class MaxPool2D(_Pool2D):
    """Maximum of each window; the gradient goes to the first maximum of the window."""

    # An input ReLU's gradient passes at a window's first maximum exactly where the window's
    # maximum is > 0: applied to the pooled gradient, before routing, at a quarter the size.
    can_apply_input_relu_grad = True
    input_values = "passes"  # (in the input's dtype)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        kernels = kernels_for(self.backend)
        if kernels.pads_in_max_pool:  # (the kernels read the padding as -inf: no padded copy)
            args = (x, self.pool_size, self.strides, self.out_hw, self.pads)
        else:
            args = (windows.pad(self.xp, x, self.pads, value=-math.inf), self.pool_size,
                    self.strides, self.out_hw)
        if not training:
            return kernels.max_pool(*args)
        if not options.keep_for_backward:  # (no backward runs: no routes kept)
            self._cache_routes = None
            return kernels.max_pool(*args)
        y, routes = kernels.max_pool_train(*args)
        self._cache_routes = (kernels, routes, y)  # the kernels that can read these routes
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        kernels, routes, y = self._cache_routes
        self._cache_routes = None
        relu_grad = options.apply_input_relu_grad
        if kernels.pads_in_max_pool:
            return kernels.max_pool_backward(routes, y, dy, self.pool_size, self.strides,
                                             self.out_hw, relu_grad, self.pads)
        dx = kernels.max_pool_backward(routes, y, dy, self.pool_size, self.strides, self.out_hw,
                                       relu_grad)
        return windows.unpad(dx, self.pads)


class AvgPool2D(_Pool2D):
    """Mean of each window; with padding ("same" or an int), the mean is over the real
    (unpadded) inputs only, as Keras' "same": PyTorch's ``count_include_pad=False``, not its
    default, so PyTorch's ``AvgPool2d(3, 1, padding=1)`` is ``AvgPool2d(3, 1, 1,
    count_include_pad=False)`` here (its border means differ otherwise)."""

    input_values = "passes"  # (in the input's dtype)

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        out = super()._build(input_shape, rng)
        self._inv_counts: Any = None  # (made at the first pass: a build allocates nothing the
        # size of an image, as a model file's size check builds layers on trial)
        return out

    def _inverse_counts(self) -> Any:
        """1 / how many real inputs each output's window covers (k*k but at padded borders),
        (1, Ho, Wo, 1): rows' counts times columns' counts, each window a rectangle."""
        if self._inv_counts is None:
            h, w, _ = self.input_shape
            (top, bottom, left, right), (kh, kw), (sh, sw) = self.pads, self.pool_size, \
                self.strides
            rows = np.zeros((1, top + h + bottom, 1, 1))
            rows[:, top:top + h] = 1
            cols = np.zeros((1, 1, left + w + right, 1))
            cols[:, :, left:left + w] = 1
            counts = (pool.sum_pool(np, rows, (kh, 1), (sh, 1), (self.out_hw[0], 1))
                      * pool.sum_pool(np, cols, (1, kw), (1, sw), (1, self.out_hw[1])))
            self._inv_counts = self.backend.asarray(1.0 / counts, dtype=self.dtype)
        return self._inv_counts

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        if training:  # (nothing kept where no backward runs: keep_for_backward)
            self._cache_shape = x.shape if options.keep_for_backward else None
        # (float16 and bfloat16 windows summed, and divided, in float32: rounded once)
        return kernels_for(self.backend).avg_pool(x, self.pool_size, self.strides, self.out_hw,
                                                  self.pads, self._inverse_counts())

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return kernels_for(self.backend).avg_pool_backward(
            dy, self._cache_shape, self.pool_size, self.strides, self.out_hw, self.pads,
            self._inverse_counts())

    def to(self, backend: Any) -> None:
        super().to(backend)
        self._inv_counts = None  # (made again, on the new backend, at the next pass)


class GlobalAvgPool2D(Layer):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""

    input_values = "passes"  # (in the input's dtype)

    @keras_positional  # (Keras' GlobalAveragePooling2D(data_format, keepdims))
    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name)

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        return (input_shape[2],)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        if training:  # (nothing kept where no backward runs: keep_for_backward)
            self._cache_shape = x.shape if options.keep_for_backward else None
        return kernels_for(self.backend).global_avg_pool(x)

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        # (a broadcast view on NumPy, cheapest for the layer before; written whole on CuPy,
        # whose kernels read C-contiguous gradients)
        return kernels_for(self.backend).global_avg_pool_backward(dy, self._cache_shape)
