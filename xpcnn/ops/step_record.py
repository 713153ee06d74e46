"""One training step recorded on the device: its loss and correct count added to running sums,
its loss and gradients checked for values that are not finite, the float16 loss scale moved,
and the flag "apply this step's update" set, with no read by the host (see
:mod:`xpcnn.totals`, which owns the state and reads it).

The state is one vector (float64; float32 where the namespace lacks it): [loss sum, correct
count, number of the first non-finite step (-1: none), that step's loss, one entry per gradient
(1: it had an element that is not finite; 2: all finite, but one whose square overflows its
dtype, which would make an optimiser's squared-gradient state infinite), then two marks per
gradient, 0 between steps (a fast version's scratch within a step: CuPy's marks there each
gradient that has a non-finite element / an overflowing square, and clears them as it records
the step, so that no launch zeroes them first)], then, where top-k metrics are compiled, one
count per distinct k (from :func:`top_k_start` on; :func:`record_step` adds a step's, as it
adds its loss and correct count, whether or not the step is finite). A step that is not finite
is remembered only if it is the first; from it on no update applies.

The float16 loss-scaling state is [scale, good steps in a row] (float32): a step whose
gradients overflow while the scale is above its floor, float32's smallest normal number,
halves the scale (to the floor at least) and skips its update (not an error), as PyTorch's
GradScaler does with no floor, and :data:`GROWTH_INTERVAL` good steps in a row double it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

# Layout of the state vector.
LOSS_SUM, CORRECT, BAD_STEP, BAD_LOSS, BAD_GRADS = 0, 1, 2, 3, 4
GROWTH_INTERVAL = 2000  # good float16 steps before the loss scale doubles


def cleared(n_grads: int) -> list[float]:
    """The state from ``BAD_STEP`` on with no bad step recorded, for ``n_grads`` gradients."""
    return [-1.0, 0.0] + [0.0] * (3 * n_grads)


def top_k_start(n_grads: int) -> int:
    """Where the top-k counts start in the state of ``n_grads`` gradients: after the marks."""
    return BAD_GRADS + 3 * n_grads


def batch_sums(xp: Any, stats: Any, n: float) -> Any:
    """What a batch of ``n`` samples adds to [loss sum, correct count, top-k counts...]: its
    [mean loss, correct count, top-k counts...] ``stats`` with the loss times ``n``."""
    return xp.concat([stats[:1] * n, stats[1:]])


@functools.cache  # (asked at every training step)
def square_limit(xp: Any, dtype: Any) -> float:
    """The largest magnitude whose square ``dtype`` holds (about)."""
    return math.sqrt(float(xp.finfo(dtype).max))


def record_step(xp: Any, state: Any, stats: Any, grads: list[Any], n: float, step: Any,
                scaling: Any, squares: bool) -> Any:
    """Record training step ``step`` (1-based; a number, or a 0-d device array) on a batch of
    ``n`` samples into ``state``, in place; ``stats`` is its [mean loss, correct count, top-k
    counts...] (the counts added from :func:`top_k_start` on, one each), ``scaling`` the
    float16 loss-scaling state (moved in place) or None. With ``scaling``, the gradients are
    of the scaled loss: they are divided by the scale first, in place. With
    ``squares``, a gradient element whose square overflows is an error too. Returns the 0-d
    boolean "apply this step's update"."""
    f = state.dtype
    if scaling is not None:
        inverse = 1.0 / scaling[0]
        for g in grads:
            g *= inverse
    stats = xp.astype(stats, f)
    # Each gradient's largest magnitude, in the state's dtype: NaN where an element is (so is
    # a max), infinite where one is, above its own dtype's limit where a square overflows.
    peaks = xp.astype(xp.stack([_peak(xp, g) for g in grads]), f) if grads else \
        xp.zeros((0,), dtype=f, device=state.device)
    finite = xp.isfinite(peaks)
    flags = xp.astype(xp.logical_not(finite), f)
    if squares and grads:
        limits = [square_limit(xp, g.dtype) for g in grads]
        above = peaks > limits[0] if len(set(limits)) == 1 else \
            xp.stack([peaks[k] > limit for k, limit in enumerate(limits)])
        flags = flags + 2 * xp.astype(xp.logical_and(finite, above), f)
    bad_loss = xp.logical_not(xp.isfinite(stats[0]))
    any_bad = xp.logical_or(bad_loss, xp.any(flags > 0))
    # (a square overflow is of the unscaled gradient: a smaller scale cannot fix it)
    unfixable = xp.logical_or(bad_loss, xp.any(flags == 2))
    error = any_bad if scaling is None else _move_scale(xp, scaling, unfixable, any_bad,
                                                         state[BAD_STEP] < 0)
    fresh = xp.logical_and(error, state[BAD_STEP] < 0)
    first = xp.concat([state[BAD_STEP:BAD_LOSS] * 0 + step, stats[:1], flags])
    marks = BAD_GRADS + len(grads)
    # (no top-k metric, no counts: nothing to place, no call a step for where they start)
    tail = top_k_start(len(grads)) if stats.shape[0] > 2 else state.shape[0]
    sums = batch_sums(xp, stats, n)
    state[...] = xp.concat([state[:BAD_STEP] + sums[:BAD_STEP],
                            xp.where(fresh, first, state[BAD_STEP:marks]), state[marks:tail],
                            state[tail:] + sums[BAD_STEP:]])
    return xp.logical_and(xp.logical_not(any_bad), state[BAD_STEP] < 0)


def _peak(xp: Any, g: Any) -> Any:
    """The largest magnitude in ``g`` (0 for an empty ``g``)."""
    if not math.prod(g.shape):
        return xp.zeros((), dtype=g.dtype, device=g.device)
    return xp.max(xp.abs(g))


def _move_scale(xp: Any, scaling: Any, unfixable: Any, any_bad: Any, live: Any) -> Any:
    """Halve the scale on a gradient overflow that it can still fix (the update is skipped; not
    an error; ``unfixable``: a non-finite loss, or a gradient's square overflow), count good
    steps and double the scale after GROWTH_INTERVAL of them, in place;
    not on an error, nor while ``live`` is False (an error recorded already): training stops
    there and the model is left as before that step, its scale too. Returns the error flag."""
    scale, good = scaling[0], scaling[1]
    # Halved below 1 too, as PyTorch's and Keras' scalers do (a large weighted loss may need
    # it), down to float32's smallest normal: a scale of 0 would skip every step; only an
    # overflow there is an error.
    floor = float(xp.finfo(scaling.dtype).smallest_normal)
    rescued = xp.logical_and(xp.logical_and(any_bad, xp.logical_not(unfixable)), scale > floor)
    error = xp.logical_and(any_bad, xp.logical_not(rescued))
    half = scale / 2
    moved = xp.where(rescued, xp.where(half < floor, xp.zeros_like(half) + floor, half), scale)
    counted = xp.where(any_bad, good * 0, good + 1)
    grow = counted >= GROWTH_INTERVAL
    # Doubled only where that stays finite, as PyTorch's GradScaler: an infinite scale would
    # make every later gradient inf or NaN and skip every update. (moved * 2 is finite exactly
    # where moved <= max / 2; a factor of 2 or 1, so that no overflow is ever computed.)
    finite = moved <= float(xp.finfo(scaling.dtype).max) / 2
    doubled = moved * (xp.astype(finite, scaling.dtype) + 1)
    keep = xp.logical_or(error, xp.logical_not(live))
    scaling[...] = xp.stack([xp.where(keep, scale, xp.where(grow, doubled, moved)),
                             xp.where(keep, good, xp.where(grow, counted * 0, counted))])
    return error
