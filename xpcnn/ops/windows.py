"""Sliding-window geometry on (N, H, W, C) arrays, shared by convolution, pooling and the ONNX
export: padding amounts (``"valid"``, ``"same"`` or an int), output sizes, padding and unpadding
the spatial axes, the strided slice one kernel offset sees, whether windows overlap, and the
dtype sums are taken in.

Apart from :mod:`xpcnn.ops.im2col` (the convolution's patches and chunk loops), so that pooling
and the ONNX export import only the geometry they need.
"""

from __future__ import annotations

import functools
import math
from typing import Any

Pads = tuple[int, int, int, int]  # top, bottom, left, right


def resolve_padding(
    padding: str | int, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int]
) -> Pads:
    """Padding amounts for ``"valid"``, ``"same"`` (TensorFlow's rule) or an int on every side."""
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    if padding == "valid":
        return (0, 0, 0, 0)
    pads = []
    for n, k, s in zip(size, kernel, strides, strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)  # type: ignore[return-value]


def output_size(
    size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int], pads: Pads
) -> tuple[int, int]:
    """Spatial output size of a sliding window."""
    h = (size[0] + pads[0] + pads[1] - kernel[0]) // strides[0] + 1
    w = (size[1] + pads[2] + pads[3] - kernel[1]) // strides[1] + 1
    return h, w


def pad(xp: Any, x: Any, pads: Pads, value: float = 0.0) -> Any:
    """Pad the two spatial axes of (N, H, W, C); returns ``x`` itself when nothing to pad."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    n, h, w, c = x.shape
    out = xp.full(
        (n, h + top + bottom, w + left + right, c), value, dtype=x.dtype, device=x.device
    )
    out[:, top : top + h, left : left + w, :] = x
    return out


def unpad(x: Any, pads: Pads) -> Any:
    """Inverse of :func:`pad` (a view of the interior)."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    return x[:, top : x.shape[1] - bottom, left : x.shape[2] - right, :]


@functools.cache  # (a CuPy step asks a few times; finfo costs microseconds each)
def accumulator(xp: Any, dtype: Any) -> Any:
    """The dtype sums of ``dtype`` values are taken in: float64 for float64, else float32 (a
    float16 or bfloat16 sum of a few values loses their low bits). Told by the bits, not by
    ``dtype == xp.float64``: NumPy's big-endian float64 is not equal to its native one."""
    return xp.float64 if xp.finfo(dtype).bits == 64 else xp.float32


def overlapping(kernel: tuple[int, int], strides: tuple[int, int]) -> bool:
    """Whether windows of ``kernel`` at ``strides`` overlap: an input then receives several
    shares of a gradient, summed (in :func:`accumulator`'s dtype)."""
    return strides[0] < kernel[0] or strides[1] < kernel[1]


def window_slices(i: int, j: int, out_hw: tuple[int, int],
                  strides: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, cols): the slices of the spatial axes that kernel offset (i, j) sees, one row and
    column per output position (Ho rows from ``i`` at stride sh, Wo columns from ``j`` at sw)."""
    (sh, sw), (ho, wo) = strides, out_hw
    return slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw)


def window(x: Any, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> Any:
    """The strided slice of (N, H, W, C) ``x`` that kernel offset (i, j) sees for every output
    position (see :func:`window_slices`)."""
    rows, cols = window_slices(i, j, out_hw, strides)
    return x[:, rows, cols, :]
