"""Shared convolution helpers: output sizes, padding, im2col and col2im on (N, H, W, C) arrays.

Channels-last lets im2col be a single concatenation along the last axis, whose column order
(kernel row, kernel column, channel) is exactly the row order of a Keras kernel (kh, kw, C, K)
reshaped to (kh*kw*C, K): the convolution is then one matmul with no transposes.
"""

from __future__ import annotations

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


def window(x: Any, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> Any:
    """The strided slice that kernel offset (i, j) sees for every output position."""
    sh, sw = strides
    return x[:, i : i + sh * (out_hw[0] - 1) + 1 : sh, j : j + sw * (out_hw[1] - 1) + 1 : sw, :]


def im2col(
    xp: Any, x: Any, kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int]
) -> Any:
    """(N, H, W, C) padded input -> (N*Ho*Wo, kh*kw*C) patches."""
    kh, kw = kernel
    n, c = x.shape[0], x.shape[3]
    if kh == kw == 1 and strides == (1, 1):
        return xp.reshape(x, (n * out_hw[0] * out_hw[1], c))
    cols = xp.concat(
        [window(x, i, j, out_hw, strides) for i in range(kh) for j in range(kw)], axis=3
    )
    return xp.reshape(cols, (n * out_hw[0] * out_hw[1], kh * kw * c))


def col2im(
    xp: Any,
    cols: Any,
    padded_shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    out_hw: tuple[int, int],
) -> Any:
    """Adjoint of :func:`im2col`: (N, Ho, Wo, kh*kw*C) patch gradients summed into the input."""
    kh, kw = kernel
    c = padded_shape[3]
    out = xp.zeros(padded_shape, dtype=cols.dtype, device=cols.device)
    sh, sw = strides
    ho, wo = out_hw
    for i in range(kh):
        for j in range(kw):
            k = (i * kw + j) * c
            rows = slice(i, i + sh * (ho - 1) + 1, sh)
            colsl = slice(j, j + sw * (wo - 1) + 1, sw)
            out[:, rows, colsl, :] = out[:, rows, colsl, :] + cols[..., k : k + c]
    return out
