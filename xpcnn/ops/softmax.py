"""Numerically stable softmax and log-softmax over the last axis."""

from __future__ import annotations

from typing import Any


def log_softmax(xp: Any, z: Any) -> Any:
    """log(softmax(z)) computed as z - max - log(sum(exp(z - max))): never overflows."""
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(xp: Any, z: Any) -> Any:
    """exp(z - max) normalised: never overflows."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)
