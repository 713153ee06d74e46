"""Checks of layers' constructor arguments and input shapes, and their dtypes' names: what
every layer family's constructor and ``_build`` share."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

#: A per-sample shape (no batch axis), as layers are built for it.
Shape = tuple[int, ...]


def per_sample(shape: Any) -> Any:
    """``shape`` without a leading None, the batch axis of Keras' ``build((None, 28, 28, 1))``
    (a tuple then; anything else as it is, for the caller's checks)."""
    if isinstance(shape, list | tuple) and len(shape) > 1 and shape[0] is None:
        return tuple(shape[1:])
    return shape


def in_dtype(xp: Any, a: Any, dtype: Any) -> Any:
    """``a`` in ``dtype``: ``a`` itself where it is in it already (the usual case: no call, a
    training step asks a dozen times), else its cast."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def pair(v: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of positive ints."""
    t = (v, v) if isinstance(v, int | np.integer) else tuple(v) if isinstance(
        v, tuple | list) else ()
    if len(t) != 2 or not all(isinstance(a, int | np.integer) and not isinstance(a, bool)
                              and 0 < a < 2**31 for a in t):
        raise InputError(f"{what} must be a positive int or a pair of positive ints, got {v!r}")
    return int(t[0]), int(t[1])


def count(v: int, what: str) -> int:
    """A positive int: a number of units or filters (a pair would be silently cut to one)."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 < v < 2**31:
        raise InputError(f"{what} must be a positive int (a count, below 2**31), got {v!r}")
    return int(v)


def check_padding(padding: str | int) -> str | int:
    if isinstance(padding, str) and padding.lower() in ("valid", "same"):
        return padding.lower()
    if isinstance(padding, int | np.integer) and not isinstance(padding, bool) and \
            0 <= padding < 2**31:
        return int(padding)  # (a NumPy int too, as kernel_size takes it)
    raise InputError(f"padding must be 'valid', 'same' or a non-negative int, got {padding!r}")


def check_activation(activation: str | None, allowed: tuple[str, ...] = ("relu",)
                     ) -> str | None:
    """A layer's fused activation: None or one of ``allowed`` ("relu": applied while the output
    is in cache; "softmax", a Dense layer's: probabilities, left to the loss at a model's end).
    Keras' "linear" (its name for no activation) is taken as None."""
    if activation is None or (isinstance(activation, str) and activation.lower() == "linear"):
        return None
    if isinstance(activation, str) and activation.lower() in allowed:
        return activation.lower()
    names = " or ".join(repr(a) for a in (None, *allowed))
    raise InputError(f"activation must be {names}, got {activation!r} (use a ReLU layer for a "
                     "ceiling" + ("" if "softmax" in allowed else
                                  ", a Softmax layer or Dense(activation='softmax') for "
                                  "probabilities") + ")")


def require_rank(layer: Any, input_shape: Shape, rank: int) -> None:
    """Per-sample ``input_shape`` must have ``rank`` axes (3 means (H, W, C))."""
    if len(input_shape) != rank:
        layout = {3: "(H, W, C)", 1: "(features,)"}.get(rank, f"{rank} axes")
        raise InputError(
            f"layer {layer.name!r} ({type(layer).__name__}) expects per-sample inputs of shape "
            f"{layout}, got {input_shape}"
        )
