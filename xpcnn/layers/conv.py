"""Conv2D: 2-D convolution over (N, H, W, C) inputs as im2col followed by one matmul."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..ops import conv as ops
from .base import Layer, Shape, check_padding, pair, require_rank
from .initializers import check_initializer, initialize


class Conv2D(Layer):
    """``filters`` kernels of ``kernel_size`` over every input channel, plus a bias.

    Kernel layout is Keras': (kh, kw, C_in, C_out).
    """

    weight_names = ("kernel", "bias")

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int] = 3,
        strides: int | tuple[int, int] = 1,
        padding: str | int = "valid",
        use_bias: bool = True,
        kernel_initializer: str = "glorot_uniform",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.filters = pair(filters, "filters")[0]
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.strides = pair(strides, "strides")
        self.padding = check_padding(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = check_initializer(kernel_initializer)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "use_bias": self.use_bias, "kernel_initializer": self.kernel_initializer}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        h, w, c = input_shape
        kh, kw = self.kernel_size
        self.pads = ops.resolve_padding(self.padding, (h, w), self.kernel_size, self.strides)
        self.out_hw = ops.output_size((h, w), self.kernel_size, self.strides, self.pads)
        if min(self.out_hw) < 1:
            raise InputError(
                f"layer {self.name!r}: a {kh}x{kw} kernel with padding {self.padding!r} does not "
                f"fit an input of {h}x{w}"
            )
        fan_in, fan_out = kh * kw * c, kh * kw * self.filters
        self._param("kernel", initialize(self.kernel_initializer, (kh, kw, c, self.filters),
                                         fan_in, fan_out, rng))
        if self.use_bias:
            self._param("bias", np.zeros(self.filters))
        return (*self.out_hw, self.filters)

    def forward(self, x: Any, training: bool = False) -> Any:
        xp = self.xp
        n = x.shape[0]
        self._cache_x_dtype = x.dtype
        x = xp.astype(x, self.compute_dtype, copy=False)
        xpad = ops.pad(xp, x, self.pads)
        cols = ops.im2col(xp, xpad, self.kernel_size, self.strides, self.out_hw)
        w2 = xp.reshape(xp.astype(self.params["kernel"], self.compute_dtype, copy=False),
                        (-1, self.filters))
        y = cols @ w2
        if self.use_bias:
            y = y + xp.astype(self.params["bias"], self.compute_dtype, copy=False)
        if training:
            self._cache_cols, self._cache_shape = cols, xpad.shape
        return xp.reshape(y, (n, *self.out_hw, self.filters))

    def backward(self, dy: Any) -> Any:
        xp = self.xp
        cols = self._cache_cols
        dy2 = xp.reshape(xp.astype(dy, self.compute_dtype, copy=False), (-1, self.filters))
        dw = xp.matrix_transpose(cols) @ dy2
        self.grads["kernel"] = xp.astype(xp.reshape(dw, self.params["kernel"].shape), self.dtype,
                                         copy=False)
        if self.use_bias:
            self.grads["bias"] = xp.astype(xp.sum(dy2, axis=0), self.dtype, copy=False)
        self._cache_cols = None
        if not self.need_input_grad:
            return None
        # W^T built by permute + reshape comes out contiguous; a matmul against a transposed
        # view is several times slower on OpenBLAS.
        kernel = xp.astype(self.params["kernel"], self.compute_dtype, copy=False)
        w2t = xp.reshape(xp.permute_dims(kernel, (3, 0, 1, 2)), (self.filters, -1))
        dcols = dy2 @ w2t
        n = self._cache_shape[0]
        dcols = xp.reshape(dcols, (n, *self.out_hw, dcols.shape[-1]))
        dxpad = ops.col2im(xp, dcols, self._cache_shape, self.kernel_size, self.strides,
                           self.out_hw)
        dx = ops.unpad(dxpad, self.pads)
        return xp.astype(dx, self._cache_x_dtype, copy=False)
