"""The primitives that have faster versions outside the Array API, in their standard versions.

Layers and the model call :func:`kernels_for` (never NumPy or CuPy directly): it returns
:func:`fast_kernels` (the NumPy kernels of :mod:`xpcnn.ops.fast_numpy`, the CuPy ones of
:mod:`xpcnn.ops.fast_cupy`) when the backend offers them, else :class:`StandardKernels`,
written against the Array API alone. A run of work (a training step, a prediction loop) is
wrapped in :func:`compute_scope`. All compute the same values; the NumPy ones write into
their outputs without temporaries (``out=``) and spread work over threads, the CuPy ones do in
one launch what takes the standard versions several.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import backend as backend_module
from .convolution import ConvEngine, ConvGeometry, KernelsConv
from .im2col import im2col_into
from .pool import max_pool, max_pool_backward, sum_pool, sum_pool_backward
from .random import numbers, take_draw
from .softmax import (
    cross_entropy,
    loss_and_correct,
    nan_unless_classes,
    softmax,
    target_rows,
    top_k_counts,
)
from .step_record import record_step
from .windows import Pads, accumulator, pad, unpad


def standardize_backward(xp: Any, dxhat: Any, xhat: Any, inv_std: Any,
                         axes: tuple[int, ...]) -> Any:
    """Gradient of xhat = (x - mean) / std through the mean and std of the same ``axes``."""
    return inv_std * (dxhat - xp.mean(dxhat, axis=axes, keepdims=True)
                      - xhat * xp.mean(dxhat * xhat, axis=axes, keepdims=True))


def class_weighted(xp: Any, y: Any, weights: Any, table: Any) -> Any:
    """Each sample's weight in the loss: ``weights`` (N,) times the weight in ``table``
    (classes,) (fit's ``class_weight``) of its label (a one-hot row's first maximum); a label
    that is no class weighs 0 (the loss makes that step NaN). ``weights`` where ``table`` is
    None."""
    if table is None:
        return weights
    labels = y if y.ndim == 1 else xp.argmax(y, axis=1)
    # the class's weight as the sum of its one-hot row times the table: elementwise
    # kernels and a sum, which a CUDA graph captures (array_api_compat's clip, which a
    # lookup with take would need to stay in the table, makes boolean-mask copies: a host
    # read each step on CuPy)
    per_class = xp.sum(target_rows(xp, labels, table.shape[0], table.dtype) * table, axis=1)
    return per_class if weights is None else \
        per_class * xp.astype(weights, table.dtype, copy=False)


class StandardKernels:
    """The Array API versions (any namespace, any device)."""

    # True where the kernels offer sgd_update / adam_update / rmsprop_update (CuPy: every
    # parameter of a step in one launch; NumPy: in place, without temporaries), which take the
    # per-step numbers as Python floats or 0-d device arrays (a step captured in a CUDA graph,
    # see xpcnn.cuda_graphs); Optimizer.step then uses them instead of the standard formulas.
    fused_updates = False
    # True where im2col_into takes ``pads`` and reads the input as if zero-padded (CuPy's):
    # convolutions then skip the padded copy of each chunk.
    pads_in_im2col = False
    # True where im2col_into writes only the patch columns of a wider ``out`` (the standard
    # and NumPy versions): convolutions with a bias then give each patch a last column of ones
    # and the kernel matrix a last row of biases, so the product adds the bias (no pass over
    # the output) and the kernel gradient's product yields the bias gradient (no pass over dy).
    bias_in_patches = True
    # True where max_pool, max_pool_train and max_pool_backward take ``pads`` and read the
    # input as if padded with -inf (CuPy's): MaxPool2D then skips the padded copy, and the
    # gradient comes back unpadded.
    pads_in_max_pool = False

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def conv_engine(self, geometry: ConvGeometry, backend: Any) -> ConvEngine:
        """The engine that runs a convolution layer of this ``geometry`` (see
        :mod:`xpcnn.ops.convolution`): here the chunked loops over these kernels."""
        return KernelsConv.for_backend(geometry, self, backend)

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """Held around a training step or prediction (see :func:`compute_scope`)."""
        return contextlib.nullcontext()

    def threads(self) -> int:
        """How many threads :meth:`for_chunks` spreads chunks over (here one)."""
        return 1

    def for_chunks(self, n: int, m: int, fn: Callable[[int, int, int], None]) -> None:
        """Call ``fn(worker, start, stop)`` for the chunks [start, stop) of m images of n
        (here in order, all as worker 0; fast kernels may spread them over threads)."""
        for n0 in range(0, n, m):
            fn(0, n0, min(n, n0 + m))

    def matmul_into(self, a: Any, b: Any, out: Any, bias: Any = None,
                    relu: bool = False) -> None:
        """``out[...] = a @ b (+ bias)``, then ReLU with ``relu``, for 2-D ``a``, ``b`` and a
        2-D slice ``out``."""
        out[...] = self.bias_relu(self.matmul(a, b), bias, relu)

    def matmul_bias_relu(self, a: Any, b: Any, bias: Any, relu: bool) -> Any:
        """``a @ b (+ bias)``, then ReLU with ``relu``: a Dense layer's forward."""
        return self.bias_relu(self.matmul(a, b), bias, relu)

    def bias_relu(self, y: Any, bias: Any, relu: bool) -> Any:
        """``y + bias`` (when there is one), then ReLU with ``relu`` (may reuse ``y``)."""
        if bias is not None:
            y = y + bias
        return self.relu(y, None) if relu else y

    def patch_dtype(self, dtype: Any) -> Any:
        """The dtype convolutions unfold an input of ``dtype`` into (here ``dtype`` itself;
        NumPy's kernels unfold half floats into float32, see ``NumpyKernels.patch_dtype``)."""
        return dtype

    def copy_into(self, dst: Any, src: Any) -> None:
        """``dst[...] = src``, cast to ``dst``'s dtype (a chunk into its patch dtype)."""
        dst[...] = src

    def im2col_into(self, x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int],
                    out_hw: tuple[int, int]) -> Any:
        """Patches of a padded (n, H, W, C) input into the first kh*kw*C columns of ``out``
        (n, Ho, Wo, kh*kw*C or more); any further columns are left as they are."""
        return im2col_into(x, out, kernel, strides, out_hw)

    def im2col_plan(self, x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int],
                    out_hw: tuple[int, int]) -> Callable[[], Any]:
        """A call that does :meth:`im2col_into` of ``x`` into ``out`` and returns the patches
        as a (rows, out.shape[-1]) matrix, for two buffers kept across calls whose contents
        change (whatever the call can prepare, it prepares once). Here the reshape comes
        after every write: the standard does not promise that it returns a view."""
        shape = (math.prod(out.shape[:-1]), out.shape[-1])
        return lambda: self.xp.reshape(self.im2col_into(x, out, kernel, strides, out_hw), shape)

    def matmul(self, a: Any, b: Any) -> Any:
        """``a @ b`` for 2-D ``a`` and ``b``."""
        return self._in_dtype_of(a @ b, a, b)

    def matmul_tn(self, a: Any, b: Any) -> Any:
        """``a^T @ b`` for 2-D ``a`` and ``b`` with the same number of rows."""
        return self._in_dtype_of(self.xp.matrix_transpose(a) @ b, a, b)

    def matmul_nt(self, a: Any, b: Any) -> Any:
        """``a @ b^T`` for 2-D ``a`` and ``b`` with the same number of columns."""
        return self._in_dtype_of(a @ self.xp.matrix_transpose(b), a, b)

    def _in_dtype_of(self, product: Any, a: Any, b: Any) -> Any:
        """A product of operands of one dtype in that dtype: NumPy gives ml_dtypes' bfloat16
        products in float32 (accumulated there), rounded here once, as a GPU's products are.
        (Operands of two dtypes keep the product's promoted one.)"""
        if product.dtype == a.dtype or a.dtype != b.dtype:
            return product
        return self.xp.astype(product, a.dtype)

    def max_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int]) -> Any:
        """Maximum of each window of a padded (N, H, W, C) input."""
        return max_pool(self.xp, x, kernel, strides, out_hw)

    def max_pool_train(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                       out_hw: tuple[int, int]) -> tuple[Any, Any]:
        """:meth:`max_pool` of padded ``x`` and the ``routes`` that :meth:`max_pool_backward`
        needs to send the gradient back: here ``x`` itself (a fast path may keep less)."""
        return self.max_pool(x, kernel, strides, out_hw), x

    def max_pool_backward(self, routes: Any, y: Any, dy: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int],
                          relu_grad: bool = False) -> Any:
        """Gradient of a max pool (``routes`` and ``y`` from :meth:`max_pool_train`; see
        :func:`xpcnn.ops.pool.max_pool_backward`): each window's gradient goes to its first
        maximum in row-major order. With ``relu_grad``, only where that maximum is > 0: the
        gradient of a ReLU before the pool (see ``Options.apply_input_relu_grad`` in
        :mod:`xpcnn.layers.base`)."""
        if relu_grad:
            dy = self.relu_backward(dy, y)
        return max_pool_backward(self.xp, routes, y, dy, kernel, strides, out_hw)

    def global_avg_pool(self, x: Any) -> Any:
        """The mean of (N, H, W, C) ``x`` over H and W, (N, C) in ``x``'s dtype: summed in
        float32 at least (NumPy sums ml_dtypes' bfloat16 in bfloat16: 4,096 ones make 256),
        then divided and rounded once."""
        xp = self.xp
        n, h, w, c = x.shape
        total = xp.sum(x, axis=(1, 2), dtype=accumulator(xp, x.dtype))
        return xp.astype(total / (h * w), x.dtype, copy=False)

    def global_avg_pool_backward(self, dy: Any, shape: tuple[int, ...]) -> Any:
        """Gradient of :meth:`global_avg_pool` of an input of ``shape`` (N, H, W, C): each
        position's share dy / (H * W), divided in float32 at least (float16 would round H * W,
        to inf from 65,520 on) and rounded once, here as a broadcast view (what the NumPy
        kernels read fastest; a fast path may write it whole)."""
        xp = self.xp
        n, h, w, c = shape
        g = xp.astype(xp.astype(dy, accumulator(xp, dy.dtype), copy=False) / (h * w), dy.dtype,
                      copy=False)
        return xp.broadcast_to(xp.reshape(g, (n, 1, 1, c)), (n, h, w, c))

    def avg_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int], pads: Pads, inv_counts: Any) -> Any:
        """Mean of each window of (N, H, W, C) ``x`` padded by ``pads`` zeros, as the sum of the
        window (in float32 at least) times its ``inv_counts`` ((1, Ho, Wo, 1): 1 / how many
        real inputs it covers), rounded once to ``x``'s dtype."""
        xp = self.xp
        s = sum_pool(xp, pad(xp, x, pads), kernel, strides, out_hw)
        return xp.astype(s * xp.astype(inv_counts, s.dtype, copy=False), x.dtype, copy=False)

    def avg_pool_backward(self, dy: Any, shape: tuple[int, ...], kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int], pads: Pads,
                          inv_counts: Any) -> Any:
        """Gradient of :meth:`avg_pool` of an input of ``shape``: each window's gradient times
        its inverse count, shared by its inputs, summed in float32 at least (as forward) and
        rounded once to ``dy``'s dtype."""
        xp = self.xp
        acc = accumulator(xp, dy.dtype)
        g = xp.astype(dy, acc, copy=False) * xp.astype(inv_counts, acc, copy=False)
        n, h, w, c = shape
        top, bottom, left, right = pads
        dx = sum_pool_backward(xp, g, (n, top + h + bottom, left + w + right, c), kernel,
                               strides, out_hw)
        return xp.astype(unpad(dx, pads), dy.dtype, copy=False)

    def sum_rows(self, a: Any) -> Any:
        """Sum over the first axis (a bias gradient), accumulated in float32 at least (a float16
        sum of a batch's rows would lose their low bits)."""
        xp = self.xp
        return xp.sum(a, axis=0, dtype=accumulator(xp, a.dtype))

    def uniform(self, state: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
        """Random numbers in [0, 1) from a device-held random state (see
        :mod:`xpcnn.ops.random`, the definition), the draw counted in ``state`` (in place: its
        draws so far plus one), the draw taken as one step across threads
        (:func:`~xpcnn.ops.random.take_draw`)."""
        return numbers(self.xp, take_draw(state), shape, dtype, first)

    def random_flip(self, state: Any, x: Any, out_dtype: Any, first: int = 0) -> Any:
        """Each image of ``x`` (N, H, W, C; any real dtype: a model's uint8 batch) mirrored
        left-right where its number of the draw that ``state`` names (:meth:`uniform` of
        shape (N, 1, 1, 1) in float32, elements ``first`` onwards) is below 1/2, the draw
        counted in ``state``; returned in ``out_dtype``."""
        xp = self.xp
        flip = self.uniform(state, (x.shape[0], 1, 1, 1), xp.float32, first) < 0.5
        return xp.astype(xp.where(flip, xp.flip(x, axis=2), x), out_dtype, copy=False)

    def random_crop(self, state: Any, x: Any, padding: int, out_dtype: Any,
                    first: int = 0) -> Any:
        """Each image of ``x`` (N, H, W, C; any real dtype) padded by ``padding`` zeros on every
        side and cut back to H x W at row and column offsets ``floor(u * (2 * padding + 1))``,
        ``u`` the (N, 2) numbers (rows then columns) of the draw that ``state`` names
        (:meth:`uniform` in float32, elements ``first`` onwards), the draw counted in
        ``state``; returned in ``out_dtype``."""
        u = self.uniform(state, (x.shape[0], 2), self.xp.float32, first)
        return self._crop(self.xp.astype(x, out_dtype, copy=False), u, padding)

    def _crop(self, x: Any, u: Any, padding: int) -> Any:
        """:meth:`random_crop` at the numbers ``u``. Standard-only: each offset among the 2p + 1
        candidates chosen per image with where(), no per-image indexing."""
        xp, p = self.xp, padding
        n, h, w, c = x.shape
        offsets = xp.floor(u * (2 * p + 1))
        dy, dx = (xp.reshape(offsets[:, k], (n, 1, 1, 1)) for k in (0, 1))
        xpad = xp.zeros((n, h + 2 * p, w + 2 * p, c), dtype=x.dtype, device=x.device)
        xpad[:, p:p + h, p:p + w, :] = x
        rows = xpad[:, 0:h, :, :]
        for k in range(1, 2 * p + 1):
            rows = xp.where(dy == k, xpad[:, k:k + h, :, :], rows)
        out = rows[:, :, 0:w, :]
        for k in range(1, 2 * p + 1):
            out = xp.where(dx == k, rows[:, :, k:k + w, :], out)
        return out

    def rescale(self, x: Any, scale: float, offset: float, dtype: Any, out_dtype: Any) -> Any:
        """``x`` (of any real dtype: a model's uint8 batch) cast to ``dtype``, times ``scale``,
        plus ``offset`` (Python numbers; no addition of 0), computed in ``dtype`` and returned
        in ``out_dtype``."""
        xp = self.xp
        y = xp.astype(x, dtype, copy=False) * scale
        return xp.astype(y + offset if offset else y, out_dtype, copy=False)

    def normalize(self, x: Any, shift: Any, scale: Any, dtype: Any, out_dtype: Any) -> Any:
        """``(x - shift) * scale`` per channel (``shift``, ``scale``: (C,) arrays of ``dtype``)
        of ``x`` (N, ..., C; any real dtype: a model's uint8 batch) cast to ``dtype``, computed
        in ``dtype`` and returned in ``out_dtype``."""
        xp = self.xp
        y = (xp.astype(x, dtype, copy=False) - shift) * scale
        return xp.astype(y, out_dtype, copy=False)

    def mask_multiply(self, x: Any, mask: Any, scale: float | None = None,
                      relu_y: Any = None) -> Any:
        """``x`` where the boolean ``mask`` holds, 0 elsewhere (as a product, not ``where``:
        several times faster), then times ``scale`` where one is given; then, with ``relu_y``
        (of ``x``'s shape), only where ``relu_y > 0``: the gradient of a ReLU whose output was
        ``relu_y`` (see ``Options.apply_input_relu_grad`` in :mod:`xpcnn.layers.base`)."""
        y = x * self.xp.astype(mask, x.dtype)
        if scale is not None:
            y *= scale
        return y if relu_y is None else self.relu_backward(y, relu_y)

    def dropout(self, state: Any, x: Any, rate: float, first: int = 0) -> tuple[Any, Any]:
        """Inverted dropout of ``x``: an element is kept where its number of the draw that
        ``state`` names (:meth:`uniform`, elements ``first`` onwards) is at least ``rate``,
        and scaled by 1 / (1 - rate); the draw is counted in ``state``, as :meth:`uniform`
        counts it. Returns the output and the boolean mask of what was kept (its gradient is
        :meth:`mask_multiply` with the same mask and scale)."""
        keep = self.uniform(state, tuple(x.shape), x.dtype, first) >= rate
        return self.mask_multiply(x, keep, 1.0 / (1.0 - rate)), keep

    def relu(self, x: Any, max_value: float | None) -> Any:
        """``min(max(x, 0), max_value)``; NaN stays NaN. Spelled with ``where``, not
        ``xp.clip``: array_api_compat's clip for CuPy assigns through boolean masks, which read
        the host (and which a CUDA graph's capture refuses). The bounds are 0-d arrays of
        ``x``'s dtype: the 2023.12 standard's ``where`` takes no Python scalar (2024.12's does),
        and NumPy's gives ml_dtypes' bfloat16 beside a Python float in float32."""
        xp = self.xp
        y = xp.where(x < 0, xp.zeros((), dtype=x.dtype, device=x.device), x)
        if max_value is not None:
            y = xp.where(y > max_value, xp.full((), max_value, dtype=x.dtype, device=x.device), y)
        return y

    def relu_backward(self, dy: Any, y: Any) -> Any:
        """Gradient through a ReLU (no ceiling) whose output was ``y``: ``dy`` where y > 0."""
        return self.mask_multiply(dy, y > 0)

    def add_relu(self, arrays: list[Any], relu: bool) -> Any:
        """The sum of ``arrays`` (two or more of one shape), added left to right, then
        max(sum, 0) with ``relu``: an ``Add`` layer's output, with the ReLU after it fused."""
        total = arrays[0] + arrays[1]
        for a in arrays[2:]:
            total = total + a
        return self.relu(total, None) if relu else total

    def add_relu_backward(self, dys: list[Any], relu_y: Any) -> Any:
        """The sum of ``dys`` (one or more gradients of one tensor, as its readers sent them
        back), added left to right as the model adds them; then, with ``relu_y`` (not None),
        :meth:`relu_backward` of it: the gradient of a fused ``Add`` and ReLU whose output was
        ``relu_y``."""
        total = dys[0]
        for d in dys[1:]:
            total = total + d
        return total if relu_y is None else self.relu_backward(total, relu_y)

    def relu_backward_sum_rows(self, dy: Any, y: Any) -> tuple[Any, Any]:
        """:meth:`relu_backward` of 2-D ``dy`` and the :meth:`sum_rows` of the result (the
        gradient a layer's ReLU passes to its bias): one pass over ``dy`` where a fast path
        fuses them."""
        dx = self.relu_backward(dy, y)
        return dx, self.sum_rows(dx)

    def feature_norm(self, x: Any, eps: float, dtype: Any, out_dtype: Any
                     ) -> tuple[Any, Any, Any]:
        """``x`` cast to ``dtype``, then xhat = (x - mean) * inv_std, inv_std = 1 / sqrt(var +
        eps), over each image's and channel's H x W positions: (xhat in ``out_dtype``, mean,
        inv_std), the last two (N, 1, 1, C) in ``dtype`` (in the fast versions' accumulator
        type there), which :meth:`feature_norm_backward` takes with ``x``."""
        xp = self.xp
        x = xp.astype(x, dtype, copy=False)
        mean = xp.mean(x, axis=(1, 2), keepdims=True)
        centred = x - mean
        inv_std = 1.0 / xp.sqrt(xp.mean(centred * centred, axis=(1, 2), keepdims=True) + eps)
        # (xhat as feature_norm_backward recomputes it: (x - mean) * inv_std, the same bits)
        xhat = centred * inv_std
        return xp.astype(xhat, out_dtype, copy=False), mean, inv_std

    def feature_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any,
                              relu: bool) -> Any:
        """Gradient of :meth:`feature_norm` through its mean and variance (``x`` its input,
        ``mean`` and ``inv_std`` its statistics; xhat recomputed from them as forward computed
        it), ``dy`` cast to the statistics' dtype, given in ``x``'s dtype; with ``relu``, only
        where ``x > 0``: the gradient of a ReLU before it too (see
        ``Options.apply_input_relu_grad`` in :mod:`xpcnn.layers.base`)."""
        xp = self.xp
        xhat = (xp.astype(x, mean.dtype, copy=False) - mean) * inv_std
        dy = xp.astype(dy, mean.dtype, copy=False)
        dx = standardize_backward(xp, dy, xhat, inv_std, (1, 2))
        dx = self.relu_backward(dx, x) if relu else dx
        return xp.astype(dx, x.dtype, copy=False)

    def batch_norm_train(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                         moving_var: Any, momentum: float, eps: float, out_dtype: Any,
                         relu: bool) -> tuple[Any, Any, Any]:
        """Batch normalisation of ``x`` with its batch's statistics over every axis but the
        last (channels), computed in the parameters' dtype (gamma's; float32 under mixed
        precision): z = xhat * gamma + beta, xhat = (x - mean) * inv_std, inv_std = 1 /
        sqrt(var + eps) (var biased), then max(z, 0) with ``relu``, given in ``out_dtype``;
        and the per-channel (mean, inv_std) that :meth:`batch_norm_backward` takes with ``x``
        (in gamma's dtype here, in the fast versions' accumulator type there). Updates the
        running statistics in place (``a[...] =``: a step replayed from a CUDA graph reads
        and writes the same arrays) as PyTorch does: running = (1 - momentum) * running +
        momentum * batch, the variance there unbiased (count / (count - 1)); not where a
        channel has fewer than 2 values (count = the product of every axis but the last):
        there the unbiased variance is undefined (PyTorch refuses the batch), and the running
        statistics are left as they were (decided on the host, from the shape)."""
        xp = self.xp
        x = xp.astype(x, gamma.dtype, copy=False)
        axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        if count:
            # (shifted by the first position's values: a mean over the outer axes is one
            # running sum, whose rounding is relative to the values summed: 1e4 + N(0, 1) in
            # float32 gave a variance of 56, not 1)
            shift = x[(0,) * len(axes) + (...,)]
            mean = shift + xp.mean(x - shift, axis=axes)
            centred = x - mean
            var = xp.mean(centred * centred, axis=axes)
        else:  # (an empty batch: no mean of nothing, whose NaN its backward would carry)
            mean = xp.zeros(x.shape[-1:], dtype=x.dtype, device=x.device)
            centred, var = x, mean
        self._update_running(moving_mean, moving_var, mean, var, momentum, count)
        inv_std = 1.0 / xp.sqrt(var + eps)
        # (xhat as batch_norm_backward recomputes it: (x - mean) * inv_std, the same bits)
        z = centred * inv_std * gamma + beta
        return self._relu_cast(z, relu, out_dtype), mean, inv_std

    @staticmethod
    def _update_running(moving_mean: Any, moving_var: Any, mean: Any, var: Any,
                        momentum: float, count: int) -> None:
        """:meth:`batch_norm_train`'s update of the running statistics (from the batch's
        ``mean`` and biased ``var`` over ``count`` values a channel), in place."""
        if count >= 2:
            m = momentum
            moving_mean[...] = (1 - m) * moving_mean + m * mean
            unbiased = var * (count / (count - 1))
            moving_var[...] = (1 - m) * moving_var + m * unbiased

    #: batch_norm_backward takes the ReLU's mask from ``relu_y`` where given (a layer keeps
    #: its output for it only where this is True: a kernel recomputing z needs none).
    batch_norm_reads_relu_y = True

    def batch_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                            beta: Any, relu: bool, input_grad: bool,
                            relu_y: Any = None, spare_y: bool = False, *,
                            eps: float | None = None) -> tuple[Any, Any, Any]:
        """Gradients of :meth:`batch_norm_train` through its batch's statistics (``x`` its
        input, ``mean`` and ``inv_std`` its statistics), ``dy`` cast to gamma's dtype; with
        ``relu``, through the ReLU too, where z > 0: where ``relu_y`` (forward's output, if
        given) > 0 where it is in gamma's dtype (the same mask: max(z, 0) > 0 exactly where
        z > 0, NaN in neither), else z recomputed as forward computed it (a float16 output
        rounds a tiny z to 0): (the input's in ``x``'s dtype, None without ``input_grad``;
        gamma's; beta's, in gamma's dtype). ``spare_y``: nothing else holds ``relu_y``, so
        a kernel may write the input's gradient into its memory (NumPy's does; here, with
        no ``out=`` in the standard, it is only read). ``eps``: forward's, which tells a
        kernel the batch's spread (NumPy's chooses its sums' form by it; unused here)."""
        xp = self.xp
        xhat = (xp.astype(x, mean.dtype, copy=False) - mean) * inv_std
        dy = xp.astype(dy, gamma.dtype, copy=False)
        if relu:
            from_y = relu_y is not None and relu_y.dtype == gamma.dtype
            dy = self.relu_backward(dy, relu_y if from_y else xhat * gamma + beta)
        axes = tuple(range(dy.ndim - 1))
        dgamma, dbeta = xp.sum(dy * xhat, axis=axes), xp.sum(dy, axis=axes)
        if not input_grad:
            return None, dgamma, dbeta
        dx = standardize_backward(xp, dy * gamma, xhat, inv_std, axes)
        return xp.astype(dx, x.dtype, copy=False), dgamma, dbeta

    def batch_norm_running(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                           moving_var: Any, eps: float, out_dtype: Any, relu: bool) -> Any:
        """Batch normalisation of ``x`` with the running statistics (inference, and a frozen
        layer in training), computed in gamma's dtype: z = (x - moving_mean) / sqrt(moving_var
        + eps) * gamma + beta, then max(z, 0) with ``relu``, given in ``out_dtype``."""
        return self._relu_cast(self._running_affine(x, gamma, beta, moving_mean, moving_var,
                                                    eps), relu, out_dtype)

    def batch_norm_running_backward(self, dy: Any, x: Any, gamma: Any, beta: Any,
                                    moving_mean: Any, moving_var: Any, eps: float,
                                    relu: bool) -> Any:
        """Input gradient of :meth:`batch_norm_running` (an affine map per channel; with
        ``relu``, only where z > 0, z recomputed from ``x``), in ``x``'s dtype."""
        xp = self.xp
        dy = xp.astype(dy, gamma.dtype, copy=False)
        if relu:
            dy = self.relu_backward(dy, self._running_affine(x, gamma, beta, moving_mean,
                                                             moving_var, eps))
        dx = dy * (gamma / xp.sqrt(moving_var + eps))
        return xp.astype(dx, x.dtype, copy=False)

    def _running_affine(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                        moving_var: Any, eps: float) -> Any:
        xp = self.xp
        inv_std = 1.0 / xp.sqrt(moving_var + eps)
        return (xp.astype(x, gamma.dtype, copy=False) - moving_mean) * inv_std * gamma + beta

    def _relu_cast(self, z: Any, relu: bool, out_dtype: Any) -> Any:
        """max(z, 0) with ``relu``, in ``out_dtype``."""
        return self.xp.astype(self.relu(z, None) if relu else z, out_dtype, copy=False)

    def softmax_cross_entropy(self, z: Any, labels: Any, smoothing: float, scale: Any = None,
                              dtype: Any = None, weights: Any = None,
                              class_weights: Any = None) -> tuple[Any, Any]:
        """Mean cross-entropy of softmax(z) against integer ``labels`` (N,) or one-hot (or
        probability) rows (N, classes) (targets mixed with the uniform distribution by
        ``smoothing``) and the count of rows whose first maximum is at the label (a row's
        first maximum), as one (2,) float32 (float64 for float64 ``z``) array, both NaN
        where a target is no class; each row's loss and gradient times ``weights`` (N,) where
        given (the sum still divided by N), and times its label's weight in ``class_weights``
        (classes,) where given (:func:`class_weighted`), the count not;
        and the gradient with respect to ``z``, times ``scale[0]`` where
        ``scale`` (the float16 loss-scaling state, on the device) is given. With ``dtype``, all
        of it computed from ``z`` cast to ``dtype`` (float32 under mixed precision), the
        gradient then given in ``z``'s dtype (float16 there: what the layer that made the
        logits reads)."""
        xp = self.xp
        given = z.dtype
        if dtype is not None:
            z = xp.astype(z, dtype, copy=False)
        loss, grad = cross_entropy(xp, z, target_rows(xp, labels, z.shape[1], z.dtype,
                                                      smoothing),
                                   class_weighted(xp, labels, weights, class_weights))
        stats = loss_and_correct(xp, loss, z, labels)
        grad = grad if scale is None else grad * scale[0]
        return (nan_unless_classes(xp, stats, labels, z.shape[1]),
                xp.astype(grad, given, copy=False))

    def softmax(self, z: Any, dtype: Any) -> Any:
        """softmax(z) over the last axis, of ``z`` cast to ``dtype`` (float32 for float16
        logits under mixed precision), in ``dtype``: a new array (a model's probabilities at
        inference)."""
        return softmax(self.xp, self.xp.astype(z, dtype, copy=False))

    def cast_all(self, arrays: list[Any], dtype: Any) -> list[Any]:
        """Each array in ``dtype`` (itself where it is of that dtype already)."""
        return [self.xp.astype(a, dtype, copy=False) for a in arrays]

    def snapshot_state(self, arrays: list[Any]) -> Any:
        """A copy of ``arrays`` (a training step's normalisation statistics, before its
        forward pass moves them), for :meth:`restore_state`."""
        return [self.xp.asarray(a, copy=True) for a in arrays]

    def restore_state(self, arrays: list[Any], snapshot: Any, apply: Any) -> None:
        """``arrays`` back to ``snapshot`` (:meth:`snapshot_state`'s, of the same arrays), in
        place, where the 0-d boolean ``apply`` is false (a step skipped on the device); left
        as they are where it is true."""
        for a, before in zip(arrays, snapshot, strict=True):
            a[...] = self.xp.where(apply, a, before)

    def record_step(self, state: Any, stats: Any, grads: list[Any], n: float, step: Any,
                    scaling: Any, squares: bool) -> Any:
        """Training step ``step``'s sums and finiteness into ``state`` (and the float16 loss
        scale into ``scaling``), in place; the 0-d boolean "apply its update" (see
        :func:`xpcnn.ops.step_record.record_step`)."""
        return record_step(self.xp, state, stats, grads, n, step, scaling, squares)

    def adam_scalars(self, applied: Any, lr: Any, apply: Any, weight_decay: float,
                     beta_1: float, beta_2: float, dtype: Any) -> tuple[Any, Any, Any]:
        """Count an Adam update in ``applied`` (a 0-d float64 device array, in place) where
        the 0-d boolean ``apply`` is true (None: always), and give that update's numbers as
        0-d device arrays of ``dtype``, at t = ``applied`` after it: the decoupled decay factor
        1 - lr * weight_decay, the step size lr / (1 - beta_1**t) and the second moment's
        correction 1 - beta_2**t, computed in float64 and rounded once (as the Python floats
        they once were). ``lr``: a Python float or a 0-d float64 device array. Where the
        update is skipped the numbers are unused (those of the count so far, of t = 1 before
        any update: never a division by zero)."""
        xp = self.xp
        applied[...] = applied + (1.0 if apply is None else xp.astype(apply, applied.dtype))
        t = xp.maximum(applied, xp.ones_like(applied))
        decay = 1.0 - lr * weight_decay
        if isinstance(decay, float):
            decay = xp.full_like(t, decay)
        return tuple(xp.astype(v, dtype) for v in (decay, lr / (1.0 - beta_1**t),
                                                    1.0 - beta_2**t))

    def top_k_counts(self, z: Any, y: Any, ks: tuple[int, ...], dtype: Any) -> Any:
        """For each ``k`` of ``ks``, how many rows of logits ``z`` have their target's score
        among the ``k`` largest, a (len(ks),) array of ``dtype``: see
        :func:`xpcnn.ops.softmax.top_k_counts` (ties, non-finite scores, targets)."""
        return top_k_counts(self.xp, z, y, ks, dtype)

    def relu_with_mask(self, x: Any, max_value: float | None) -> tuple[Any, Any]:
        """:meth:`relu` and the boolean mask of where its gradient passes: strictly inside
        (0, max_value)."""
        inside = x > 0 if max_value is None else (x > 0) & (x < max_value)
        return self.relu(x, max_value), inside


def alike(arrays: list[Any]) -> bool:
    """Whether ``arrays`` all have one shape and one dtype (what a fast elementwise kernel over
    them takes; the standard versions also broadcast and promote)."""
    return all(a.shape == arrays[0].shape and a.dtype == arrays[0].dtype for a in arrays)


# The module of each backend's fast kernels (fast_kernels), imported on first use: CuPy's
# imports CuPy.
_FAST_MODULES = {"numpy": f"{__package__}.fast_numpy", "cupy": f"{__package__}.fast_cupy"}


def fast_kernels(backend: Any) -> Any:
    """Backend-specific kernels: :mod:`xpcnn.ops.fast_numpy` on NumPy,
    :mod:`xpcnn.ops.fast_cupy` on CuPy; None elsewhere.

    The one place where code outside the Array API standard enters: ops ask for it (through
    :func:`kernels_for`) and fall back to their standard versions when it is None (every other
    backend, or after :func:`xpcnn.backend.set_fast_path` ``(False)`` / ``XPCNN_FAST_PATH=0``).
    """
    module = _FAST_MODULES.get(backend.name)
    if module is None or not backend_module._FAST_PATH["enabled"]:
        return None
    # (the module as imported now, found without an import statement's ~1 us: a training
    # step asks a dozen times; one that another thread is importing still has no KERNELS:
    # import_module waits for it)
    kernels = getattr(sys.modules.get(module), "KERNELS", None)
    return kernels if kernels is not None else importlib.import_module(module).KERNELS


def kernels_for(backend: Any) -> Any:
    """The backend's fast kernels if it has them, else the standard ones."""
    fast = fast_kernels(backend)
    return fast if fast is not None else StandardKernels(backend.xp)


@contextlib.contextmanager
def compute_scope(backend: Any) -> Iterator[None]:
    """Wrap a run of xpcnn work on ``backend`` (a training step, a prediction loop). On CuPy
    it makes the backend's GPU the current one, where CuPy allocates and launches (the CuPy
    kernels allocate their outputs there: a model on "cuda:1" would otherwise get them on GPU
    0). On the NumPy fast path it keeps OpenBLAS to one thread meanwhile, since xpcnn's kernels
    bring their own threads (see :meth:`xpcnn.ops.fast_numpy.NumpyKernels.pinned`).
    NumPy (and ``array_api_strict``, which computes with it) warns nothing of an overflow,
    or of the NaN an inf makes: a float16 step's scaled gradients overflow by design (the
    loss scaling looks for them, skips the step and lowers the scale), and xpcnn checks
    every step's loss and gradients itself (``NonFiniteError`` names the step and layer)."""
    fast = fast_kernels(backend)  # (not kernels_for: no StandardKernels made to do nothing)
    with (backend.on_device(), contextlib.nullcontext() if fast is None else fast.pinned(),
          np.errstate(over="ignore", invalid="ignore")):
        yield
