"""Uniform random numbers computed on the device from a state held in device memory.

A random layer keeps its whole random state in one small device array, ``state`` = [seed,
draws so far] (int64). Its numbers are a hash of (seed, draw, element index): nothing is
read by the host, so a training step that draws them can be captured in a CUDA graph and
replayed (the graph reads the state where it was captured reading it, and the layer counts
its draws on the device), and a checkpoint restores the stream exactly by restoring the two
numbers.

The hash is SplitMix64's finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", 2014; the generator behind Java's SplittableRandom), applied twice: once to
(seed, draw) for the draw's key, once to (key, element) for each number. Element ``i`` of a
draw does not depend on how many elements are drawn, so a process that holds samples
``start:start + n`` of a data-parallel global batch draws exactly those samples' numbers.

Taking a draw (reading its number and counting it) is one step across threads
(:func:`take_draw`): a random layer shared by two models training side by side, or called from
data-loader threads, gives each call a draw of its own.

This module is the definition, in the Array API standard. The fast paths
(:mod:`xpcnn.ops.fast_numpy`, :mod:`xpcnn.ops.fast_cupy`) compute the same bits, and the tests
hold them to it.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any


def _signed(c: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return c - (1 << 64) if c >= 1 << 63 else c


#: SplitMix64's increment (the odd integer nearest 2**64 / golden ratio) and its multipliers,
#: as int64: the arithmetic is int64's, wrapping, whose bits are uint64's (several array
#: libraries cannot shift uint64), with logical right shifts spelled as shift-and-mask.
GAMMA = _signed(0x9E3779B97F4A7C15)
MIX_1 = _signed(0xBF58476D1CE4E5B9)
MIX_2 = _signed(0x94D049BB133111EB)


@functools.cache  # (asked at every draw)
def significant_bits(xp: Any, dtype: Any) -> int:
    """How many random bits make a number of float ``dtype`` in [0, 1): its significand's width
    (11 for float16, 24 for float32, 53 for float64), so that every value is exact and below 1."""
    return 1 - round(math.log2(float(xp.finfo(dtype).eps)))


def _shift_right(z: Any, s: int) -> Any:
    """Logical right shift of int64 ``z`` by ``s`` bits (``>>`` of int64 copies the sign)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix(z: Any) -> Any:
    """SplitMix64's finaliser of the 64 bits in int64 ``z`` (part of the definition: the fast
    paths derive a draw's key with it)."""
    z = (z ^ _shift_right(z, 30)) * MIX_1
    z = (z ^ _shift_right(z, 27)) * MIX_2
    return z ^ _shift_right(z, 31)


def draw_key(state: Any) -> Any:
    """The key of the draw that ``state`` ([seed, draw], an int64 device array) names: a
    1-element int64 device array (never a host scalar)."""
    seed, draw = state[0:1], state[1:2]
    return mix(mix(seed) + (draw + 1) * GAMMA)


# Held while a draw is taken: a draw's number read and counted by one thread between another's
# read and count was drawn twice (two threads calling one layer got one mask). One for all
# states: held for a few 1-element operations, never while the numbers are computed. Host-only:
# on CuPy, the read and the count queue on the stream in this order, and a CUDA graph's capture
# records them as it would without the lock.
_DRAW_LOCK = threading.Lock()


def take_draw(state: Any) -> Any:
    """The :func:`draw_key` of the draw that ``state`` names, the draw counted in ``state`` (in
    place) in the same step: no other thread takes the same draw."""
    with _DRAW_LOCK:
        taken = draw_key(state)  # (a new array: counting changes the state, not the key)
        state[1:2] += 1
    return taken


def numbers(xp: Any, key: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
    """Numbers in [0, 1) of ``shape`` and float ``dtype``: elements ``first`` onwards of the
    draw whose :func:`draw_key` is ``key``."""
    count = math.prod(shape)
    index = xp.arange(first + 1, first + count + 1, dtype=xp.int64, device=key.device)
    bits = significant_bits(xp, dtype)
    z = _shift_right(mix(key + index * GAMMA), 64 - bits)
    return xp.reshape(xp.astype(z, dtype) * 2.0**-bits, shape)


def uniform(xp: Any, state: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
    """Numbers in [0, 1) of ``shape`` and float ``dtype``: elements ``first`` onwards of the
    draw that ``state`` ([seed, draw], an int64 device array) names. The state is read, not
    advanced (a caller that counts its draws takes them with :func:`take_draw`)."""
    return numbers(xp, draw_key(state), shape, dtype, first)
