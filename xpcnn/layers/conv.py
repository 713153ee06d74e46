"""Conv2D: 2-D convolution over (N, H, W, C) inputs, through the backend's convolution engine
(:mod:`xpcnn.ops.convolution`)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from .. import backend as backend_module
from ..checks import flag
from ..errors import warn
from ..ops.convolution import ConvEngine, ConvGeometry
from ..ops.kernels import kernels_for
from .arguments import (
    TORCH_CONV_ORDER,
    Shape,
    check_activation,
    check_padding,
    count,
    does_not_fit,
    in_dtype,
    keras_positional,
    pair,
    require_rank,
)
from .base import DEFAULT, Layer, Options, Setting
from .initializers import check_initializer, initialize

# Held while a Conv2D makes its engine (once: see _engine). Its own, not the layers' build
# lock: a pass holding the pass lock takes it, and a build holding the build lock may wait
# for that pass (no two locks taken in both orders).
_ENGINE_LOCK = threading.Lock()


def _warns_of_torch_order(init: Any) -> Any:
    """Conv2D's ``__init__``, warning of PyTorch's order where filters, kernel_size and
    strides all come positional (PyTorch's habit: ``strides=`` is Keras' name, and a loaded
    file, ``from_config`` and copies pass keywords: they never warn)."""
    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if len(args) >= 3:
            self._warn_of_torch_order()
    return wrapper


class Conv2D(Layer):
    """``filters`` kernels of ``kernel_size`` over every input channel, plus a bias.

    ``get_weights`` / ``set_weights`` give the kernel in Keras' layout, (kh, kw, C_in, C_out);
    ``params["kernel"]`` holds it as (C_out, kh, kw, C_in), the layout every engine reads
    (cuDNN's for channels-last images). ``activation="relu"`` applies ReLU as the output is
    computed (the same values as a ReLU layer after it, one pass over memory fewer).
    ``kernel_initializer``: one of Keras' names in :data:`xpcnn.layers.initializers.INITIALIZERS`
    ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "zeros");
    the bias starts at zeros.
    """

    weight_names = ("kernel", "bias")
    can_fuse_relu = True
    casts_weights = True
    #: Checked and counted as the constructor's (see :class:`Setting`): a change after a step
    #: compiles the model's plan again (a fused ReLU hands its gradient on there).
    activation = Setting(check_activation, architecture=True)

    @_warns_of_torch_order
    @keras_positional  # (Keras' Conv2D(..., padding, data_format, dilation_rate, ...))
    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int] = 3,
        strides: int | tuple[int, int] = 1,
        padding: str | int = "valid",
        *,
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer: str = "glorot_uniform",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.filters = count(filters, "filters")
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.strides = pair(strides, "strides")
        self.padding = check_padding(padding)
        self.activation = activation
        self.use_bias = flag(use_bias, "use_bias")
        self.kernel_initializer = check_initializer(kernel_initializer)

    def _warn_of_torch_order(self) -> None:
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        # Conv2D(3, 6, 5), PyTorch's nn.Conv2d(in=3, out=6, k=5), reads as 3 filters of 6x6
        # at stride 5 and builds. No common layer has as few filters as its (square) kernel is
        # wide, that kernel 6 or more and wider than its stride (ResNet's Conv2D(64, 7, 2),
        # AlexNet's (96, 11, 4), a ViT's patches (768, 16, 16) have not).
        if kh == kw and sh == sw and 1 < sh < kh and kh >= 6 and self.filters <= kh:
            warn(f"Conv2D({self.filters}, {kh}, {sh}) makes {self.filters} filters of {kh}x{kh} "
                 f"at stride {sh}: {TORCH_CONV_ORDER}. nn.Conv2d({self.filters}, {kh}, {sh}) "
                 f"is Conv2D({kh}, {sh})", UserWarning)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "activation": self.activation, "use_bias": self.use_bias,
                "kernel_initializer": self.kernel_initializer}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        h, w, c = input_shape
        kh, kw = self.kernel_size
        self.geometry = ConvGeometry.of((h, w, c), self.filters, self.kernel_size, self.strides,
                                        self.padding)
        if min(self.geometry.out_hw) < 1:
            raise does_not_fit(self, f"a {kh}x{kw} kernel with padding {self.padding!r}",
                               input_shape)
        fan_in, fan_out = kh * kw * c, kh * kw * self.filters
        keras = initialize(self.kernel_initializer, (kh, kw, c, self.filters), fan_in, fan_out,
                           rng)
        self._param("kernel", np.ascontiguousarray(np.transpose(keras, _TO_STORED)))
        if self.use_bias:
            self._param("bias", np.zeros(self.filters))
        return (*self.geometry.out_hw, self.filters)

    # -- the kernel in Keras' layout outside, (K, kh, kw, C) inside (see ops.convolution) ------
    def to_keras_layout(self, name: str, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(a, _TO_KERAS)) if name == "kernel" else a

    def from_keras_layout(self, name: str, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(a, _TO_STORED)) if name == "kernel" else a

    @property
    def relu_output(self) -> bool:
        return self.activation == "relu"

    def _engine(self) -> ConvEngine:
        """This layer's convolution engine, chosen by the backend's kernels for its geometry
        (and kept until the layer moves to another device, or the fast path is switched on or
        off: :func:`xpcnn.backend.set_fast_path` reaches a layer that has run too)."""
        engine = getattr(self, "_cache_engine", None)
        if engine is None or self._engine_switches != backend_module.fast_path_switches:
            with _ENGINE_LOCK:  # (made once: a training pass and its backward use one engine
                engine = getattr(self, "_cache_engine", None)  # whatever other threads run)
                if engine is None or self._engine_switches != backend_module.fast_path_switches:
                    engine = kernels_for(self.backend).conv_engine(self.geometry, self.backend)
                    self._cache_engine = engine
                    self._engine_switches = backend_module.fast_path_switches
        return engine

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        x_dtype, x = x.dtype, in_dtype(self.xp, x, self.compute_dtype)
        kernel = self.compute_weight("kernel")
        bias = self.compute_weight("bias") if self.use_bias else None
        relu = self.relu_output or options.fused_relu
        y = self._engine().forward(x, kernel, bias, relu)
        if training:  # (under mixed precision the cast kernel is a copy: backward reuses it)
            keep = options.keep_for_backward  # (else no backward runs: nothing kept)
            self._cache_x, self._cache_kernel, self._cache_x_dtype = \
                (x, kernel, x_dtype) if keep else (None, None, None)
            # where y > 0 the ReLU's gradient passes (unless the next layer applies it)
            self._cache_y = y if keep and relu and not options.skip_relu_grad else None
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        x, self._cache_x = self._cache_x, None
        dy = in_dtype(self.xp, dy, self.compute_dtype)
        relu_y = None
        need_dx = options.need_input_grad
        y, self._cache_y = self._cache_y, None
        if y is not None:  # (kept by forward where this layer applies its ReLU's gradient)
            if self.trainable:  # the engine masks dy (with the bias gradient where it pays)
                relu_y = y
            else:
                dy = kernels_for(self.backend).relu_backward(dy, y)
        kernel, self._cache_kernel = self._cache_kernel, None
        engine = self._engine()
        if not self.trainable:  # frozen: the input gradient alone
            dx = engine.input_grad(dy, kernel) if need_dx else None
        else:
            dw, db, dx = engine.gradients(x, dy, kernel, self.use_bias, need_dx, relu_y)
            self.grads["kernel"] = dw  # (as computed: see Layer.grads)
            if self.use_bias:
                self.grads["bias"] = db
        return None if dx is None else in_dtype(self.xp, dx, self._cache_x_dtype)


# Keras' kernel (kh, kw, C, K) <-> the stored (K, kh, kw, C)
_TO_STORED = (3, 0, 1, 2)
_TO_KERAS = (1, 2, 3, 0)
