"""Conv2D: 2-D convolution over (N, H, W, C) inputs as chunked im2col and matmuls."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..ops import conv as ops
from ..ops.kernels import kernels_for
from .base import (
    DEFAULT,
    Layer,
    Options,
    Shape,
    check_activation,
    check_padding,
    pair,
    require_rank,
)
from .initializers import check_initializer, initialize


class Conv2D(Layer):
    """``filters`` kernels of ``kernel_size`` over every input channel, plus a bias.

    Kernel layout is Keras': (kh, kw, C_in, C_out). ``activation="relu"`` applies ReLU to each
    chunk of output while it is still in cache (the same values as a ReLU layer after it, one
    pass over memory fewer).
    """

    weight_names = ("kernel", "bias")
    can_fuse_relu = True

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int] = 3,
        strides: int | tuple[int, int] = 1,
        padding: str | int = "valid",
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer: str = "glorot_uniform",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.filters = pair(filters, "filters")[0]
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.strides = pair(strides, "strides")
        self.padding = check_padding(padding)
        self.activation = check_activation(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = check_initializer(kernel_initializer)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "activation": self.activation, "use_bias": self.use_bias,
                "kernel_initializer": self.kernel_initializer}

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

    @property
    def relu_output(self) -> bool:
        return self.activation == "relu"

    def _workspace(self) -> ops.Workspace:
        ws = getattr(self, "_cache_ws", None)
        if ws is None:
            ws = self._cache_ws = ops.Workspace(keep=self.backend.keeps_scratch)
        return ws

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        xp = self.xp
        n = x.shape[0]
        self._cache_x_dtype = x.dtype
        x = xp.astype(x, self.compute_dtype, copy=False)
        w2 = xp.reshape(xp.astype(self.params["kernel"], self.compute_dtype, copy=False),
                        (-1, self.filters))
        bias = (xp.astype(self.params["bias"], self.compute_dtype, copy=False)
                if self.use_bias else None)
        # Each chunk of images is padded and unfolded in a small buffer (no whole-batch copy);
        # backward unfolds again rather than keeping the patches (see backward).
        relu = self.relu_output or options.fused_relu
        y = ops.conv_forward(xp, kernels_for(self.backend), x, w2, bias, self.kernel_size,
                             self.strides, self.pads, self.out_hw, self._workspace(), "cols",
                             self.backend.chunk_bytes, relu=relu,
                             min_chunks=self.backend.min_chunks)
        y = xp.reshape(y, (n, *self.out_hw, self.filters))
        if training:
            self._cache_x = x
            # where y > 0 the ReLU's gradient passes (unless the next layer applies it)
            self._cache_y = y if relu and not options.skip_relu_grad else None
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        xp = self.xp
        kern = kernels_for(self.backend)
        ws = self._workspace()
        budget, min_chunks = self.backend.chunk_bytes, self.backend.min_chunks
        x, self._cache_x = self._cache_x, None
        dy = xp.astype(dy, self.compute_dtype, copy=False)
        relu_y = None
        need_dx = options.need_input_grad
        if (self.relu_output or options.fused_relu) and not options.skip_relu_grad:
            if need_dx or not self.trainable:
                dy = kern.relu_backward(dy, self._cache_y)
            else:  # only the kernel gradient reads it: masked a chunk at a time, in cache
                relu_y = xp.reshape(self._cache_y, (-1, self.filters))
        self._cache_y = None
        h, w = self.input_shape[0], self.input_shape[1]
        kernel = xp.astype(self.params["kernel"], self.compute_dtype, copy=False)
        if not self.trainable:  # frozen: the input gradient alone
            return self._input_grad(x, dy, kernel) if need_dx else None
        # Both gradients from the output gradient's patches alone where that pays; else the
        # kernel gradient from the input's patches, then the input gradient.
        if (need_dx and not kern.direct_conv
                and ops.grads_share_patches(self.pads, self.kernel_size, self.strides, (h, w),
                                            self.out_hw, x.shape[3], self.filters)):
            dw, db, dx = ops.conv_grads(xp, kern, x, dy, kernel, self.pads, ws, "dcols",
                                        budget, min_chunks, with_bias=self.use_bias)
            self._store_grads(dw, db)
            return xp.astype(dx, self._cache_x_dtype, copy=False)
        dw, db = ops.conv_weight_grad(xp, kern, x, xp.reshape(dy, (-1, self.filters)),
                                      self.kernel_size, self.strides, self.pads, self.out_hw, ws,
                                      "cols", budget, min_chunks, with_bias=self.use_bias,
                                      relu_y=relu_y)
        self._store_grads(dw, db)
        return self._input_grad(x, dy, kernel) if need_dx else None

    def _input_grad(self, x: Any, dy: Any, kernel: Any) -> Any:
        xp = self.xp
        kern = kernels_for(self.backend)
        budget, min_chunks = self.backend.chunk_bytes, self.backend.min_chunks
        h, w = self.input_shape[0], self.input_shape[1]
        if ops.input_grad_as_conv(self.pads, self.kernel_size, self.strides):
            dx = ops.conv_input_grad(xp, kern, xp.reshape(dy, (-1, *self.out_hw, self.filters)),
                                     ops.flipped_kernel_matrix(xp, kernel), self.kernel_size,
                                     self.pads, (h, w), self._workspace(), "dcols", budget,
                                     min_chunks)
        else:
            # Strided (or over-padded) convolutions: patch gradients scattered back (col2im).
            # W^T built by permute + reshape comes out contiguous; a matmul against a
            # transposed view is several times slower on OpenBLAS.
            w2t = xp.reshape(xp.permute_dims(kernel, (3, 0, 1, 2)), (self.filters, -1))
            dcols = xp.reshape(xp.reshape(dy, (-1, self.filters)) @ w2t,
                               (x.shape[0], *self.out_hw, w2t.shape[-1]))
            pt, pb, pl, pr = self.pads
            padded = (x.shape[0], h + pt + pb, w + pl + pr, x.shape[3])
            dxpad = ops.col2im(xp, dcols, padded, self.kernel_size, self.strides, self.out_hw)
            dx = ops.unpad(dxpad, self.pads)
        return xp.astype(dx, self._cache_x_dtype, copy=False)

    def _store_grads(self, dw: Any, db: Any) -> None:
        """Keep the kernel (and bias) gradient in the parameters' dtype."""
        xp = self.xp
        self.grads["kernel"] = xp.astype(xp.reshape(dw, self.params["kernel"].shape), self.dtype,
                                         copy=False)
        if self.use_bias:
            self.grads["bias"] = xp.astype(db, self.dtype, copy=False)
