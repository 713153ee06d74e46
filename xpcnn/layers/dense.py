"""Dense (fully connected) and Flatten."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..checks import flag
from ..errors import InputError
from ..ops.kernels import kernels_for
from ..ops.softmax import softmax, softmax_backward
from .arguments import Shape, check_activation, count, in_dtype, keras_positional
from .base import DEFAULT, Layer, Options, Setting
from .initializers import check_initializer, initialize


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C) in (H, W, C) order, as Keras flattens."""

    input_values = "passes"  # (a reshape)

    @keras_positional  # (Keras' Flatten(data_format))
    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name)

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        return (math.prod(input_shape),)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        if training:  # (nothing kept where no backward runs: keep_for_backward)
            self._cache_shape = x.shape if options.keep_for_backward else None
        # (the size, not -1, which an empty batch leaves undetermined)
        return self.xp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        return self.xp.reshape(dy, self._cache_shape)


class Dense(Layer):
    """y = x @ kernel + bias, kernel of shape (in, out) as in Keras; ``activation="relu"``
    applies ReLU to y (as a ReLU layer after it would), ``"softmax"`` a softmax (as a Softmax
    layer after it would: at a model's end only, where the loss applies it to the logits).
    ``kernel_initializer`` as :class:`~xpcnn.layers.Conv2D`'s (Keras' names); the bias starts
    at zeros."""

    weight_names = ("kernel", "bias")
    can_fuse_relu = True
    casts_weights = True
    #: Checked and counted as the constructor's (see :class:`Setting`): a change after a step
    #: compiles the model's plan again (a fused ReLU hands its gradient on there).
    activation = Setting(lambda value: check_activation(value, ("relu", "softmax")),
                         architecture=True)

    @keras_positional  # (Keras' Dense(..., kernel_initializer, bias_initializer, ...))
    def __init__(self, units: int, activation: str | None = None, use_bias: bool = True,
                 kernel_initializer: str = "glorot_uniform", *, name: str | None = None) -> None:
        super().__init__(name)
        self.units = count(units, "units")
        if isinstance(activation, int | np.integer) and not isinstance(activation, bool):
            # (Dense(9216, 128), PyTorch's nn.Linear(in_features, out_features))
            raise InputError(f"Dense({units!r}, {activation!r}): a number where xpcnn takes an "
                             "activation's name: PyTorch's order, nn.Linear(in_features, "
                             "out_features)? xpcnn's is Dense(units, activation), as Keras', the "
                             f"input's features inferred: Dense({activation!r})")
        self.activation = activation
        self.use_bias = flag(use_bias, "use_bias")
        self.kernel_initializer = check_initializer(kernel_initializer)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "units": self.units, "activation": self.activation,
                "use_bias": self.use_bias,
                "kernel_initializer": self.kernel_initializer}

    @property
    def relu_output(self) -> bool:
        return self.activation == "relu"

    @property
    def softmax_output(self) -> bool:
        return self.activation == "softmax"

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        if len(input_shape) != 1:
            raise InputError(
                f"layer {self.name!r} (Dense) expects flat per-sample inputs (features,), got "
                f"{input_shape}: add a Flatten or GlobalAvgPool2D layer before it"
            )
        n_in = input_shape[0]
        self._param("kernel", initialize(self.kernel_initializer, (n_in, self.units), n_in,
                                         self.units, rng))
        if self.use_bias:
            self._param("bias", np.zeros(self.units))
        return (self.units,)

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        x_dtype, x = x.dtype, in_dtype(self.xp, x, self.compute_dtype)
        w = self.compute_weight("kernel")
        kern = kernels_for(self.backend)
        bias = self.compute_weight("bias") if self.use_bias else None
        relu = self.relu_output or options.fused_relu
        y = kern.matmul_bias_relu(x, w, bias, relu)
        probabilities = self.softmax_output and not options.logits
        if probabilities:  # (in the parameters' dtype, as a Softmax layer computes it)
            y = softmax(self.xp, self.xp.astype(y, self.dtype, copy=False))
        if training:
            keep = options.keep_for_backward  # (else no backward runs: nothing kept)
            self._cache_x, self._cache_w, self._cache_x_dtype = \
                (x, w, x_dtype) if keep else (None, None, None)
            # where y > 0 the ReLU's gradient passes (unless the next layer applies it)
            self._cache_y = y if keep and relu and not options.skip_relu_grad else None
            self._cache_probabilities = y if keep and probabilities else None
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        kern = kernels_for(self.backend)
        probabilities, self._cache_probabilities = self._cache_probabilities, None
        if probabilities is not None:
            dy = softmax_backward(self.xp, probabilities, dy)
        dy = in_dtype(self.xp, dy, self.compute_dtype)
        y, self._cache_y = self._cache_y, None
        bias_grad = None
        if y is not None:  # (kept by forward where this layer applies its ReLU's gradient)
            if self.trainable and self.use_bias:  # (the bias gradient in the same pass)
                dy, bias_grad = kern.relu_backward_sum_rows(dy, y)
            else:
                dy = kern.relu_backward(dy, y)
        if self.trainable:
            self.grads["kernel"] = kern.matmul_tn(self._cache_x, dy)  # (see Layer.grads)
            if self.use_bias:
                self.grads["bias"] = kern.sum_rows(dy) if bias_grad is None else bias_grad
        # (the weights too: under mixed precision a cast copy, held until the next step)
        self._cache_x, w, self._cache_w = None, self._cache_w, None
        if not options.need_input_grad:
            return None
        dx = kern.matmul_nt(dy, w)
        return in_dtype(self.xp, dx, self._cache_x_dtype)
