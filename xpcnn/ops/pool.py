"""Pooling windows as maxima and sums of strided slices (one pass per kernel offset).

Taking the maximum of kh*kw strided slices is an order of magnitude faster than reshaping into
windows and reducing, and works for any stride, overlap and padding.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from .windows import accumulator, overlapping, window, window_slices


def _fold_windows(x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                  out_hw: tuple[int, int], combine: Callable[[Any, Any], Any]) -> Any:
    """The kh*kw windows of ``x`` (one per kernel offset, row-major) folded by ``combine``."""
    out = None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            w = window(x, i, j, out_hw, strides)
            out = w if out is None else combine(out, w)
    return out


def max_pool(xp: Any, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int]) -> Any:
    """Max over each window of a padded (N, H, W, C) input."""
    return _fold_windows(x, kernel, strides, out_hw, xp.maximum)


def max_pool_backward(xp: Any, x: Any, y: Any, dy: Any, kernel: tuple[int, int],
                      strides: tuple[int, int], out_hw: tuple[int, int]) -> Any:
    """Route each output gradient to one input per window: the first maximum in row-major order,
    as PyTorch does, so that ties never duplicate gradient. Where windows overlap, an input's
    shares are summed in :func:`accumulator`'s dtype and rounded once."""
    overlap = overlapping(kernel, strides)
    acc = accumulator(xp, dy.dtype) if overlap else dy.dtype
    d = xp.astype(dy, acc, copy=False)
    dx = xp.zeros(x.shape, dtype=acc, device=dy.device)
    taken = None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            hit = window(x, i, j, out_hw, strides) == y
            if taken is None:
                taken = hit
            else:
                hit = xp.logical_and(hit, xp.logical_not(taken))
                taken = xp.logical_or(taken, hit)
            # (routed, not multiplied by the hit: an infinite gradient's inf * 0 was NaN)
            g = xp.where(hit, d, xp.zeros((), dtype=acc, device=dy.device))
            rows, cols = window_slices(i, j, out_hw, strides)
            if overlap:
                dx[:, rows, cols, :] = dx[:, rows, cols, :] + g
            else:
                dx[:, rows, cols, :] = g
    return xp.astype(dx, dy.dtype, copy=False)


def sum_pool(xp: Any, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int]) -> Any:
    """Sum over each window of a padded (N, H, W, C) input, in :func:`accumulator`'s dtype."""
    x = xp.astype(x, accumulator(xp, x.dtype), copy=False)  # (once, not window by window)
    return _fold_windows(x, kernel, strides, out_hw, operator.add)


def sum_pool_backward(xp: Any, dy: Any, padded_shape: tuple[int, ...], kernel: tuple[int, int],
                      strides: tuple[int, int], out_hw: tuple[int, int]) -> Any:
    """Adjoint of :func:`sum_pool`: every input of a window receives the window's gradient."""
    dx = xp.zeros(padded_shape, dtype=dy.dtype, device=dy.device)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows, cols = window_slices(i, j, out_hw, strides)
            dx[:, rows, cols, :] = dx[:, rows, cols, :] + dy
    return dx
