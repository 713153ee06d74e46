"""FeatureNorm (the notebook's per-feature-map normalisation) and BatchNorm2D.

Statistics are always computed in the parameter dtype (float32 under mixed precision); both give
their output in the compute dtype (float16 there, as a Keras mixed policy's layers do).
"""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from typing import Any

import numpy as np

from ..errors import InputError, warn
from ..ops.kernels import kernels_for
from .arguments import Shape, advises, keras_positional, require_rank
from .base import DEFAULT, Layer, Options, Setting


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise InputError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _check_momentum(momentum: float) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not (
            0.0 <= momentum <= 1.0):
        # (Keras' BatchNormalization(-1, ...): its first argument is the axis)
        keras = ("; BatchNorm2D(-1, ...) is Keras' order, whose first argument is the axis: "
                 "xpcnn's BatchNorm2D normalises the last axis, its first argument is PyTorch's "
                 "momentum (Keras' momentum=0.99 is xpcnn's 0.01)"
                 if isinstance(momentum, int | np.integer) and momentum < 0 else "")
        raise InputError(f"BatchNorm2D momentum must be in [0, 1], got {momentum!r}{keras}")
    # (Keras' 0.99 ported as it is: statistics of the last batches only; said where the user
    # writes it, not at each load of a file that holds it)
    if momentum > 0.5 and advises():
        # (an int 1: BatchNorm2D(1), PyTorch's one-channel nn.BatchNorm2d(1), as BatchNorm2D(64)
        # is refused)
        torch = ("; BatchNorm2D(1): PyTorch's nn.BatchNorm2d(num_features) of one channel? "
                 "xpcnn infers the number of features from the input: BatchNorm2D()"
                 if isinstance(momentum, int | np.integer) else "")
        warn(f"BatchNorm2D momentum {momentum!r} is the weight of each batch's statistics in "
             "the moving ones (moving = (1 - momentum) * moving + momentum * batch, PyTorch's "
             "convention), not of the moving statistics as in Keras: Keras' momentum=0.99 is "
             f"xpcnn's 0.01 (the default is 0.1){torch}")
    return float(momentum)


class FeatureNorm(Layer):
    """Each feature map of each image scaled to mean 0 and std 1 over its H x W positions.

    y = (x - mean_hw) / sqrt(var_hw + eps). No parameters; the same in training and inference.
    """

    # The gradient of a ReLU before it is applied in backward's own passes, a block of images
    # at a time while it is in cache.
    can_apply_input_relu_grad = True
    input_values = "normalises"  # (in float32 under mixed precision)
    # (a change after build captures a CUDA-graph step again, checked as the constructor's:
    # see Setting)
    eps = Setting(_check_eps)

    def __init__(self, eps: float = 1e-5, *, name: str | None = None) -> None:
        super().__init__(name)
        self.eps = eps

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        require_rank(self, input_shape, 3)
        return input_shape

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        # Computed in the parameters' dtype (float32 under mixed precision, as Keras computes
        # its normalisation layers), given in the compute dtype; the kernels cast as they read
        # and write (on CuPy no pass of its own).
        y, mean, inv_std = kernels_for(self.backend).feature_norm(x, self.eps, self.dtype,
                                                                  self.compute_dtype)
        if training:
            # Backward recomputes xhat from the input and the per-map statistics, as
            # BatchNorm2D does: the input as given (float16 under mixed precision), not a
            # float32 xhat; the ReLU's mask, where backward applies it, comes from it too.
            # (Nothing kept where no backward runs: keep_for_backward.)
            self._cache = ((x, mean, inv_std, options.apply_input_relu_grad)
                           if options.keep_for_backward else None)
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        x, mean, inv_std, relu = self._cache
        self._cache = None
        # (the input's gradient in the input's dtype, as Conv2D and Dense give theirs)
        return kernels_for(self.backend).feature_norm_backward(dy, x, mean, inv_std, relu)


class BatchNorm2D(Layer):
    """Batch normalisation over every axis but the last (channels).

    Training uses the batch's statistics and updates running ones
    (running = (1 - momentum) * running + momentum * batch, unbiased variance, as PyTorch:
    Keras' momentum is the other share, so its 0.99 is xpcnn's 0.01; a momentum above 0.5
    is warned about);
    a training batch with fewer than 2 values per channel (one sample after a Dense layer,
    say fit's last batch, or an empty one) is normalised with its own statistics but leaves
    the running ones as they were: its unbiased variance is undefined (PyTorch refuses such a
    batch, which would stop a fit; on several ranks, each rank's slice counts);
    inference uses the running statistics, and so does a frozen layer (``trainable = False``)
    in training, as in Keras. Works on (N, H, W, C) and on (N, features). A model's plan fuses
    a plain ``ReLU()`` after it (``can_fuse_relu``).
    """

    weight_names = ("gamma", "beta", "moving_mean", "moving_variance")
    can_fuse_relu = True
    # (input_values stays "computes": in inference a fresh layer's moving statistics, mean 0
    # and variance 1, hand the values on about as they came, into float16)
    # (a change after build captures a CUDA-graph step again, checked as the constructor's:
    # see Setting)
    momentum = Setting(_check_momentum)
    eps = Setting(_check_eps)

    @keras_positional  # (Keras' BatchNormalization(axis, momentum, epsilon, ...))
    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, *,
                 name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(momentum, int | np.integer) and not isinstance(momentum, bool) and \
                momentum > 1:  # (BatchNorm2D(64), PyTorch's nn.BatchNorm2d(num_features))
            # (nn.BatchNorm2d(64, 1e-3)'s eps kept in the way out)
            kept = f"eps={eps!r}" if isinstance(eps, numbers.Real) and eps != 1e-5 else ""
            raise InputError(f"BatchNorm2D({momentum!r}): PyTorch's nn.BatchNorm2d(num_features)"
                             "? xpcnn infers the number of features from the input: its first "
                             "argument is momentum (PyTorch's, 0.1 by default): "
                             f"BatchNorm2D({kept})")
        self.momentum = momentum
        self.eps = eps

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "momentum": self.momentum, "eps": self.eps}

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        c = input_shape[-1]
        self._param("gamma", np.ones(c))
        self._param("beta", np.zeros(c))
        self._param("moving_mean", np.zeros(c), trainable=False)
        self._param("moving_variance", np.ones(c), trainable=False)
        return input_shape

    def weight_problem(self, name: str, w: np.ndarray) -> str | None:
        # (a negative variance made every prediction NaN, with no word: a lying file, or a
        # wrong set_weights)
        if name == "moving_variance" and not np.all(w >= 0):  # (a NaN is no variance either)
            return (f"holds negative or NaN variances ({float(np.min(w)):.3g}), expected "
                    "values >= 0")
        return None

    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        kernels = kernels_for(self.backend)
        gamma, beta = self.params["gamma"], self.params["beta"]
        moving_mean, moving_var = self.state["moving_mean"], self.state["moving_variance"]
        # Computed in the parameters' dtype (float32 under mixed precision), given in the
        # compute dtype (float16 there, as a Keras mixed policy's layer gives it), with the
        # ReLU after it where the plan fuses it (options.fused_relu).
        relu = options.fused_relu
        # A frozen BatchNorm (trainable=False) runs in inference mode in training too, as in
        # Keras: running statistics, left as they are.
        if training and self.trainable:
            y, mean, inv_std = kernels.batch_norm_train(x, gamma, beta, moving_mean, moving_var,
                                                        self.momentum, self.eps,
                                                        self.compute_dtype, relu)
        else:
            y = kernels.batch_norm_running(x, gamma, beta, moving_mean, moving_var, self.eps,
                                           self.compute_dtype, relu)
            mean = inv_std = None
        if training:
            # Backward recomputes xhat from the input, as cuDNN's does: an input the size of
            # the output's, not a float32 xhat beside it; with the NumPy or standard kernels
            # the ReLU's mask comes from the output y (4 fewer passes than recomputing z),
            # kept as PyTorch's ReLU keeps its output. A convolution or Dense after it keeps
            # y anyway until its own backward; a layer that keeps no input (a pool, Add,
            # Concatenate, or none: the last layer) leaves y held here alone from forward to
            # backward, 4 bytes a value more meanwhile. At backward a y nothing else holds
            # becomes dx (NumPy's kernels): no dx beside it, so a step's peak there is lower
            # than with z recomputed (49.7 against 64.8 MiB, Conv2D(64) -> BN+ReLU ->
            # Conv2D or GlobalAvgPool2D at batch 64 on 32x32). Not kept where the kernels
            # recompute z (CuPy's), nor a float16 y (mixed precision: a tiny z rounds to 0).
            # (The ReLU's gradient is left to the next layer where it takes it:
            # skip_relu_grad. Nothing is kept where no backward runs, keep_for_backward.)
            relu_grad = relu and not options.skip_relu_grad
            keep_y = (relu_grad and mean is not None and kernels.batch_norm_reads_relu_y
                      and y.dtype == gamma.dtype)
            # (forward's eps beside its statistics: the NumPy kernels' backward reads the
            # batch's spread from the two)
            self._cache = ((x, mean, inv_std, relu_grad, y if keep_y else None, self.eps)
                           if options.keep_for_backward else None)
        return y

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        x, mean, inv_std, relu, y, eps = self._cache
        self._cache = None
        # y held by this frame alone (no next layer's cache, no user's reference, no view of
        # it: a view holds its base), the count NumPy's temporary elision relies on: its
        # buffer may become dx, so keeping y adds nothing to the backward's peak.
        # (the count of an object this frame's local alone holds, measured here: a tracer
        # reading f_locals adds one to both, on CPython before 3.13; review RC)
        probe = object()
        spare = (y is not None and sys.getrefcount(y) <= sys.getrefcount(probe)
                 and not weakref.getweakrefcount(y))
        kernels = kernels_for(self.backend)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if mean is not None:  # (the dtypes: see forward, and x's for the input's gradient)
            # (forward's eps: NumPy's sums need the batch's spread, the others ignore it)
            dx, self.grads["gamma"], self.grads["beta"] = kernels.batch_norm_backward(
                dy, x, mean, inv_std, gamma, beta, relu, options.need_input_grad, relu_y=y,
                spare_y=spare, eps=eps)
            return dx
        if not options.need_input_grad:  # (frozen: no parameter gradients)
            return None
        return kernels.batch_norm_running_backward(dy, x, gamma, beta, self.state["moving_mean"],
                                                   self.state["moving_variance"], self.eps,
                                                   relu)
