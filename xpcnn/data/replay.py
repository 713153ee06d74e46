"""Input batches that a source can read again: a training step's error found later (the host
reads the steps' records behind them, :mod:`xpcnn.totals`) locates the layer on the step's own
batch, which the steps would otherwise have to hold until then (up to
:data:`~xpcnn.totals.READ_EVERY` batches: a memory-mapped training set whole in memory).

A source whose epochs replay (arrays, memory maps, map-style datasets: the order is known from
the seed and the epoch) wraps its epoch in :func:`numbered`, which notes the batch it yields
last with a way to read it again (:class:`Replay`); a step asks :func:`replay_of` for its
input batch's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any


class Replay:
    """How to read an input batch again: ``method(*args)``, a method of its source held
    weakly (a step's note may outlive the call that read the source: a fit stopped by an
    error keeps its notes until the next read, which must not keep the user's arrays, their
    copy on the device, a dataset alive). ``exact``: it reads the same values (arrays, memory
    maps); not so a dataset's, whose random transforms draw anew. Calling it raises
    ReferenceError where the source is gone."""

    __slots__ = ("args", "exact", "method")

    def __init__(self, method: Callable[..., Any], args: tuple[Any, ...], exact: bool) -> None:
        self.method = weakref.WeakMethod(method)  # type: ignore[arg-type]
        self.args, self.exact = args, exact

    def __call__(self) -> Any:
        method = self.method()
        if method is None:
            raise ReferenceError("the call that read it has ended, and its batches are read "
                                 "again only while it runs")
        return method(*self.args)


# id(xb) -> (xb, its replay), for the batch each running epoch yielded last (held with it, so
# that its id is not reused while noted; the epoch holds it as long anyway)
_YIELDED: dict[int, tuple[Any, Replay]] = {}


def numbered(batches: Iterator[tuple[Any, ...]], replay: Callable[..., Any], epoch: int,
             start: int = 0, exact: bool = True) -> Iterator[tuple[Any, ...]]:
    """``batches`` (batches ``start``, ``start + 1``... of ``epoch``), each noted as it is
    yielded with a :class:`Replay` of ``replay(epoch, index)`` (a method of the source), which
    reads its input batch (xb, on the device) again; ``exact``: as it was."""
    key = None
    with contextlib.closing(batches):  # type: ignore[type-var]
        try:
            for index, batch in enumerate(batches, start):
                key = id(batch[0])
                _YIELDED[key] = (batch[0], Replay(replay, (epoch, index), exact))
                yield batch
                _YIELDED.pop(key, None)
                key = None
        finally:
            if key is not None:
                _YIELDED.pop(key, None)


def replay_of(xb: Any) -> Replay | None:
    """How to read input batch ``xb`` again, where it is the batch that an epoch of a source
    that replays (:func:`numbered`) yielded last, as it is (not a copy, not a batch made from
    it); else None."""
    entry = _YIELDED.get(id(xb))
    return entry[1] if entry is not None and entry[0] is xb else None
