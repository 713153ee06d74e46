"""Weight initialisers, drawn on the host from a seeded NumPy generator.

Drawing on the host makes one seed give bit-identical initial weights on every device.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal",
                "zeros")


def initialize(
    name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator
) -> np.ndarray:
    """Keras' initialisers by name (float64 on the host; the layer casts)."""
    if name == "zeros":
        return np.zeros(shape)
    if name == "glorot_uniform":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if name == "glorot_normal":
        return _truncated_normal(rng, shape, np.sqrt(2.0 / (fan_in + fan_out)))
    if name == "he_uniform":
        limit = np.sqrt(6.0 / fan_in)
        return rng.uniform(-limit, limit, shape)
    if name == "he_normal":
        return _truncated_normal(rng, shape, np.sqrt(2.0 / fan_in))
    if name == "lecun_normal":
        return _truncated_normal(rng, shape, np.sqrt(1.0 / fan_in))
    raise InputError(f"unknown initializer {name!r}; expected one of {', '.join(INITIALIZERS)}")


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    # Keras' truncated normal: redraw beyond 2 std, scaled so the result has the wanted std.
    std = std / 0.87962566103423978
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * std


def check_initializer(name: str) -> str:
    if name not in INITIALIZERS:
        raise InputError(f"unknown initializer {name!r}; expected one of {', '.join(INITIALIZERS)}")
    return name
