"""Input batches that a source can read again: a training step's error found later (the host
reads the steps' records behind them, :mod:`xpcnn.totals`) locates the layer on the step's own
batch, which the steps would otherwise have to hold until then (up to
:data:`~xpcnn.totals.READ_EVERY` batches: a memory-mapped training set whole in memory).

A source whose epochs replay (arrays, memory maps, map-style datasets: the order is known from
the seed and the epoch) wraps its epoch in :func:`numbered`, which notes the batch it yields
last with a way to read it again; a step asks :func:`replay_of` for its input batch's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

# id(xb) -> (xb, its replay), for the batch each running epoch yielded last (held with it, so
# that its id is not reused while noted; the epoch holds it as long anyway)
_YIELDED: dict[int, tuple[Any, Callable[[], Any]]] = {}


def numbered(batches: Iterator[tuple[Any, ...]], replay: Callable[[int], Any], start: int = 0
             ) -> Iterator[tuple[Any, ...]]:
    """``batches`` (batches ``start``, ``start + 1``... of an epoch), each noted as it is
    yielded with ``replay(index)``, which reads its input batch (xb, on the device) again."""
    key = None
    with contextlib.closing(batches):  # type: ignore[type-var]
        try:
            for index, batch in enumerate(batches, start):
                key = id(batch[0])
                _YIELDED[key] = (batch[0], functools.partial(replay, index))
                yield batch
                _YIELDED.pop(key, None)
                key = None
        finally:
            if key is not None:
                _YIELDED.pop(key, None)


def replay_of(xb: Any) -> Callable[[], Any] | None:
    """How to read input batch ``xb`` again, where it is the batch that an epoch of a source
    that replays (:func:`numbered`) yielded last, as it is (not a copy, not a batch made from
    it); else None."""
    entry = _YIELDED.get(id(xb))
    return entry[1] if entry is not None and entry[0] is xb else None
