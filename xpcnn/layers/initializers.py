"""Weight initialisers, drawn on the host from a seeded NumPy generator.

Drawing on the host makes one seed give bit-identical initial weights on every device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError

#: An initialiser: (rng, shape, fan_in, fan_out) -> float64 weights on the host.
Initializer = Callable[[np.random.Generator, tuple[int, ...], int, int], np.ndarray]


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], limit: float) -> np.ndarray:
    return rng.uniform(-limit, limit, shape)


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    # Keras' truncated normal: redraw beyond 2 std, scaled so the result has the wanted std.
    std = std / 0.87962566103423978
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * std


#: Keras' initialisers by name; adding one here is all it takes.
_TABLE: dict[str, Initializer] = {
    "glorot_uniform": lambda rng, shape, fan_in, fan_out: _uniform(
        rng, shape, np.sqrt(6.0 / (fan_in + fan_out))),
    "glorot_normal": lambda rng, shape, fan_in, fan_out: _truncated_normal(
        rng, shape, np.sqrt(2.0 / (fan_in + fan_out))),
    "he_uniform": lambda rng, shape, fan_in, fan_out: _uniform(rng, shape, np.sqrt(6.0 / fan_in)),
    "he_normal": lambda rng, shape, fan_in, fan_out: _truncated_normal(
        rng, shape, np.sqrt(2.0 / fan_in)),
    "lecun_normal": lambda rng, shape, fan_in, fan_out: _truncated_normal(
        rng, shape, np.sqrt(1.0 / fan_in)),
    "zeros": lambda rng, shape, fan_in, fan_out: np.zeros(shape),
}
INITIALIZERS = tuple(_TABLE)


def initialize(
    name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator
) -> np.ndarray:
    """Keras' initialisers by name (float64 on the host; the layer casts)."""
    return _TABLE[check_initializer(name)](rng, shape, fan_in, fan_out)


def check_initializer(name: str) -> str:
    """``name`` where it names an initialiser; an InputError naming them otherwise."""
    if not isinstance(name, str) or name not in _TABLE:
        raise InputError(f"unknown initializer {name!r}; expected one of {', '.join(INITIALIZERS)}")
    return name
