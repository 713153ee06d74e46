"""What training steps leave on the device for the host to read later.

A step adds its loss and correct count to running sums and checks its loss and every gradient
for NaN or infinity, all on the device: the host does not wait for the device inside a step.
The first step whose values are not finite is remembered (its number, its loss, which gradients
were bad), and from it on every update is skipped on the device (``apply`` is False), so the
weights and optimiser state stay those before it. The host reads all this in one transfer
(:meth:`RunningTotals.read`) when a progress bar refreshes, a callback reads a batch log, at the
end of an epoch, and at least every :data:`READ_EVERY` steps (each unread step holds a reference
to its input batch, for the error message).

Under ``mixed_float16`` the dynamic loss scale lives here too: a step whose gradients overflow
while the scale is above 1 halves the scale and skips its update (not an error), and 2000
good steps in a row double it.
"""

from __future__ import annotations

import math
from typing import Any

# The most steps between two reads by the host.
READ_EVERY = 32
GROWTH_INTERVAL = 2000  # good float16 steps before the loss scale doubles

# Layout of the state vector: the sums, then what the first non-finite step left.
LOSS_SUM, CORRECT, BAD_STEP, BAD_LOSS, BAD_GRADS = 0, 1, 2, 3, 4


class RunningTotals:
    """Device-side sums of one epoch and the non-finite flag.

    ``state`` is one float64 vector (float32 where the namespace lacks float64): [loss sum,
    correct count, number of the first non-finite step (-1: none), that step's loss, one entry
    per gradient (1: that gradient was not finite at that step; 2: finite, but its squares
    overflow)]."""

    def __init__(self, backend: Any, n_grads: int) -> None:
        xp = self.xp = backend.xp
        self.backend = backend
        self.dtype = getattr(xp, "float64", None) or xp.float32
        self.n_grads = n_grads
        self.state = self._vector([0.0, 0.0, -1.0, 0.0] + [0.0] * n_grads)
        self.pending: list[tuple[int, Any]] = []  # (step, input batch) since the last read
        self._weights: dict[int, Any] = {}

    def _vector(self, values: list[float]) -> Any:
        return self.backend.asarray(values, dtype=self.dtype)

    # ``state`` is always written in place: a training step captured in a CUDA graph
    # (xpcnn.cuda_graphs) reads and writes the array it was captured with.
    def reset(self, loss_sum: float = 0.0, correct: float = 0.0) -> None:
        """Start an epoch's sums (from a checkpoint's, when resuming inside one)."""
        self.state[...] = self.xp.concat([self._vector([loss_sum, correct]),
                                          self.state[BAD_STEP:]])

    def add_stats(self, stats: Any, n: int) -> None:
        """Add a batch's [mean loss, correct count] of ``n`` samples to the sums (evaluation)."""
        stats = self.xp.astype(stats, self.dtype)
        self.state[...] = self.xp.concat([self.state[:BAD_STEP] + stats * self._weight(n),
                                          self.state[BAD_STEP:]])

    def add(self, stats: Any, grads: list[Any], n: int, step: Any,
            scaling: Any = None, squares: bool = False) -> tuple[Any, Any]:
        """Record training step ``step`` (1-based; an int, or a 0-d device array in a captured
        step) on a batch of ``n`` samples; ``stats`` is its [loss, correct count], ``scaling``
        the float16 loss-scaling state (see :func:`loss_scaling`) or None. With ``squares`` (an
        optimiser that keeps squared gradients, :attr:`~xpcnn.optim.Optimizer.keeps_squares`),
        a gradient with an element whose square overflows its dtype is an error too (flagged 2:
        finite, but it would make that state infinite). Returns the device flag "apply this
        step's update" and the new scaling state. The caller notes the step's input batch in
        ``pending``."""
        xp, f = self.xp, self.dtype
        stats = xp.astype(stats, f)
        if squares and grads:
            # Each gradient's largest magnitude (in its own dtype; a max is NaN where an
            # element is): not finite where an element is not (flag 1), above the square root
            # of the dtype's largest value where an element's square overflows (flag 2). Two
            # passes over a gradient, where its sum and its sum of squares took three.
            peaks = xp.stack([xp.max(xp.abs(g)) for g in grads])
            limit = math.sqrt(min(xp.finfo(g.dtype).max for g in grads))
            finite = xp.isfinite(peaks)
            over = xp.logical_and(finite, peaks > limit)
            flags = xp.astype(xp.logical_not(finite), f) + 2 * xp.astype(over, f)
            bad = xp.concat([xp.logical_not(xp.isfinite(stats[:1])),
                             xp.logical_not(xp.logical_and(finite, xp.logical_not(over)))])
        else:
            sums = [xp.sum(g, dtype=f) for g in grads]  # float64: no overflow
            bad = xp.logical_not(xp.isfinite(xp.stack([stats[0], *sums])))
            flags = xp.astype(bad[1:], f)
        any_bad = xp.any(bad)
        error = any_bad
        if scaling is not None:
            scaling, error = _update_scale(xp, scaling, bad[0], any_bad)
        fresh = xp.logical_and(error, self.state[BAD_STEP] < 0)
        first = xp.concat([self.state[BAD_STEP:BAD_LOSS] * 0 + step, stats[:1], flags])
        self.state[...] = xp.concat([self.state[:BAD_STEP] + stats * self._weight(n),
                                     xp.where(fresh, first, self.state[BAD_STEP:])])
        return xp.logical_and(xp.logical_not(any_bad), self.state[BAD_STEP] < 0), scaling

    def _weight(self, n: int) -> Any:
        """[n, 1] on the device (a batch's mean loss times its size), made once per size."""
        if n not in self._weights:
            self._weights[n] = self._vector([float(n), 1.0])
        return self._weights[n]

    def read(self) -> tuple[Any, list[tuple[int, Any]]]:
        """The state on the host (one transfer: the host waits for the device here) and the
        unread steps' input batches; clears the record of a non-finite step."""
        host = self.backend.to_numpy(self.state).copy()  # (NumPy's is the state itself)
        pending, self.pending = self.pending, []
        if host[BAD_STEP] >= 0:
            self.state[...] = self.xp.concat([self.state[:BAD_STEP],
                                              self._vector([-1.0, 0.0] + [0.0] * self.n_grads)])
        return host, pending


def loss_scaling(backend: Any, scale: float, good_steps: int = 0) -> Any:
    """The float16 loss-scaling state on the device: [scale, good steps in a row], float32
    like the gradients it multiplies."""
    return backend.asarray([scale, good_steps], dtype="float32")


def _update_scale(xp: Any, scaling: Any, bad_loss: Any, any_bad: Any) -> tuple[Any, Any]:
    """Halve the scale on a gradient overflow that it can still fix (the update is skipped; not
    an error), count good steps and double the scale after GROWTH_INTERVAL of them. Returns the
    new state and the error flag."""
    scale, good = scaling[0], scaling[1]
    rescued = xp.logical_and(xp.logical_and(any_bad, xp.logical_not(bad_loss)), scale > 1)
    scale = xp.where(rescued, scale / 2, scale)
    good = xp.where(any_bad, good * 0, good + 1)
    grow = good >= GROWTH_INTERVAL
    scaling = xp.stack([xp.where(grow, scale * 2, scale), xp.where(grow, good * 0, good)])
    return scaling, xp.logical_and(any_bad, xp.logical_not(rescued))
