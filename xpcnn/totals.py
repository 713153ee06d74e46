"""What training steps leave on the device for the host to read later.

Each step records its loss, correct count and finiteness on the device
(:func:`xpcnn.ops.step_record.record_step`, the state's layout; one fused kernel on CuPy): the
host does not wait for the device inside a step. The first step whose values are not finite
is remembered (its number, its loss, which gradients were bad), and from it on every update is
skipped on the device, so the weights and optimiser state stay those before it. The host reads
all this in one transfer (:meth:`RunningTotals.read`) when a progress bar refreshes, a callback
reads a batch log, at the end of an epoch, and at least every :data:`READ_EVERY` steps. Each
unread step notes its labels and how to get its input batch again for the error message
(:class:`Noted`): the source reads it again (:mod:`xpcnn.data.replay`); the step holds it, for
the last :data:`KEPT_INPUTS` such steps only, from a source that cannot (an iterator) or that
reads it anew (a dataset: its random transforms draw anew; older ones are read again).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NonFiniteError
from .ops.kernels import kernels_for
from .ops.step_record import BAD_STEP, CORRECT, LOSS_SUM, batch_sums, cleared, top_k_start

if TYPE_CHECKING:  # (for the hints only: the README's import order puts data above totals)
    from .data.replay import Replay

# The most steps between two reads by the host.
READ_EVERY = 32

# The input batches that unread steps hold where their source cannot give them again as they
# were (as many as the prefetch keeps ready: not READ_EVERY, a memory-mapped training set
# whole).
KEPT_INPUTS = 2


class Noted:
    """What an unread step keeps for a deferred error: its labels ``yb`` (small; the check of
    their values), its sample weights ``wb`` where no host checked them (train_step's; else
    None), and its input batch ``xb`` where its source cannot read it again as it was
    (``replay`` None or not exact; dropped after :data:`KEPT_INPUTS` later such steps)."""

    __slots__ = ("replay", "wb", "xb", "yb")

    def __init__(self, xb: Any, yb: Any, replay: Replay | None, wb: Any = None) -> None:
        self.xb = None if replay is not None and replay.exact else xb
        self.yb, self.wb, self.replay = yb, wb, replay

    @property
    def read_anew(self) -> bool:
        """Whether :meth:`input_batch` reads the batch again with other values, possibly (a
        dataset's random transforms): its batch is no longer held."""
        return self.xb is None and self.replay is not None and not self.replay.exact

    def input_batch(self, step: int, what: str) -> Any:
        """The step's input batch, read again where its source can; :class:`NonFiniteError`
        naming step ``step`` and ``what`` went wrong where it is no longer held."""
        if self.xb is not None:
            return self.xb
        why = f"its source cannot give it again, and only the last {KEPT_INPUTS} are held"
        if self.replay is not None:
            try:
                return self.replay()
            except ReferenceError as e:  # (a Replay's source is gone)
                why = str(e)
            except Exception as e:  # noqa: BLE001 (the step's error is the one to raise)
                why = f"reading it again failed: {type(e).__name__}: {e}"
        raise NonFiniteError(f"training stopped at step {step}: {what}; its input batch is no "
                             f"longer held ({why}), so where the first non-finite values "
                             "appear is not named")


class RunningTotals:
    """Device-side sums of one epoch and the non-finite flag: ``state``, one float64 vector
    (float32 where the namespace lacks float64) laid out as :mod:`xpcnn.ops.step_record`
    says, with ``top_k`` more sums at its end (the top-k metrics' counts, one a distinct k:
    :func:`xpcnn.ops.step_record.top_k_start`), read with the rest in one transfer."""

    def __init__(self, backend: Any, n_grads: int, top_k: int = 0) -> None:
        xp = self.xp = backend.xp
        self.backend = backend
        self.dtype = getattr(xp, "float64", None) or xp.float32
        self.n_grads, self.top_k = n_grads, top_k
        self.tail = top_k_start(n_grads)  # (where the top-k counts start)
        self.state = self._vector([0.0, 0.0, *cleared(n_grads), *[0.0] * top_k])
        self.pending: list[tuple[int, Noted]] = []  # (step, what it noted) since the last read
        self._held: collections.deque[Noted] = collections.deque()  # (those holding an xb)
        self.seen = 0.0  # samples the sums are of (on the host: the steps' sizes are known there)
        self._nan: Any = None  # (see nan)

    @property
    def nan(self) -> Any:
        """What a step puts in place of a bad weight of train_step's: made on first use, once,
        not a launch a step (nor one for an evaluate, which never uses it); float32, so that a
        float32 or wider weight keeps its dtype (from a float32 host value: PyTorch's asarray
        refuses a float64 one cast on copy)."""
        if self._nan is None:
            self._nan = self.backend.asarray(np.float32(math.nan), dtype="float32")
        return self._nan

    def _vector(self, values: list[float]) -> Any:
        return self.backend.asarray(values, dtype=self.dtype)

    # ``state`` is always written in place: a training step captured in a CUDA graph
    # (xpcnn.cuda_graphs) reads and writes the array it was captured with.
    def reset(self, loss_sum: float = 0.0, correct: float = 0.0, seen: float = 0.0,
              top_k: Sequence[float] = ()) -> None:
        """Start an epoch's sums of ``seen`` samples (from a checkpoint's, when resuming
        inside one; ``top_k``: the top-k counts, none for zeros)."""
        if not self.top_k:
            self.state[...] = self.xp.concat([self._vector([loss_sum, correct]),
                                              self.state[BAD_STEP:]])
        else:
            counts = list(top_k) or [0.0] * self.top_k
            assert len(counts) == self.top_k, "top-k sums of another set of metrics"
            self.state[...] = self.xp.concat([self._vector([loss_sum, correct]),
                                              self.state[BAD_STEP:self.tail],
                                              self._vector(counts)])
        self.seen = seen

    def sums(self, host: Any) -> list[float]:
        """[loss sum, correct count, top-k counts...] of a host copy of the state."""
        return [float(host[LOSS_SUM]), float(host[CORRECT]),
                *(float(v) for v in host[self.tail:])]

    def add_stats(self, stats: Any, n: int) -> None:
        """Add a batch's [mean loss, correct count, top-k counts...] of ``n`` samples to the
        sums (evaluation)."""
        xp = self.xp
        batch = batch_sums(xp, xp.astype(stats, self.dtype), float(n))
        if not self.top_k:
            self.state[...] = xp.concat([self.state[:BAD_STEP] + batch,
                                         self.state[BAD_STEP:]])
        else:
            self.state[...] = xp.concat([self.state[:BAD_STEP] + batch[:BAD_STEP],
                                         self.state[BAD_STEP:self.tail],
                                         self.state[self.tail:] + batch[BAD_STEP:]])
        self.seen += n

    def add(self, stats: Any, grads: list[Any], n: int, step: Any,
            scaling: Any = None, squares: bool = False) -> Any:
        """Record training step ``step`` (1-based; an int, or a 0-d device array in a captured
        step) on a batch of ``n`` samples; ``stats`` is its [loss, correct count, top-k
        counts...] (the counts added whether or not the step is finite), ``scaling`` the
        float16 loss-scaling state (see :func:`loss_scaling`; moved in place; the
        gradients, of the scaled loss, are divided by its scale in place) or None. With
        ``squares`` (an optimiser that keeps squared gradients,
        :attr:`~xpcnn.optim.Optimizer.keeps_squares`), a gradient with an element whose square
        overflows its dtype is an error too. Returns the device flag "apply this step's
        update". The caller notes the step (:meth:`note`)."""
        # (the top-k counts are added by the record too: one launch on CuPy, in place)
        return kernels_for(self.backend).record_step(self.state, stats, grads, float(n), step,
                                                     scaling, squares)

    def note(self, step: int, xb: Any, yb: Any, replay: Replay | None, wb: Any = None) -> None:
        """Note step ``step`` (1-based) on input batch ``xb``, labels ``yb`` and unchecked
        sample weights ``wb`` (or None) for a deferred error: ``replay`` reads ``xb`` again
        (:func:`xpcnn.data.replay.replay_of`); where it is None or not exact, ``xb`` is held
        too, until :data:`KEPT_INPUTS` later steps hold theirs."""
        noted = Noted(xb, yb, replay, wb)
        self.pending.append((step, noted))
        if noted.xb is not None:
            self._held.append(noted)
            if len(self._held) > KEPT_INPUTS:
                self._held.popleft().xb = None

    def read(self) -> tuple[Any, list[tuple[int, Noted]]]:
        """The state on the host (one transfer: the host waits for the device here) and what
        the unread steps noted; clears the record of a non-finite step."""
        host = self.backend.to_numpy(self.state).copy()  # (NumPy's is the state itself)
        pending, self.pending = self.pending, []
        self._held.clear()
        if host[BAD_STEP] >= 0:
            self.state[...] = self.xp.concat([self.state[:BAD_STEP],
                                              self._vector(cleared(self.n_grads)),
                                              *([self.state[self.tail:]] if self.top_k
                                                else [])])
        return host, pending


#: The loss scales float32 holds (normal numbers): beyond, one would become infinity or 0.
#: The low end is the floor that overflows halve the scale to (step_record._move_scale).
SCALE_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)


#: A new float16 loss scale: Keras' LossScaleOptimizer's initial_scale (PyTorch's GradScaler
#: starts at 65536).
INITIAL_SCALE = 2.0**15


def loss_scaling(backend: Any, scale: float = INITIAL_SCALE, good_steps: int = 0) -> Any:
    """The float16 loss-scaling state on the device: [scale, good steps in a row], float32
    like the gradients it multiplies."""
    return backend.asarray([scale, good_steps], dtype="float32")
