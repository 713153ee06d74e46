"""The background thread: :func:`prefetch` computes host batches (reading files, stacking
samples, checking values) up to :data:`PREFETCH` ahead while the device computes, and
:func:`upload` hands each to the device on the caller's thread. Apart from the sources, which
all read through them (:mod:`xpcnn.data.sources`, :mod:`xpcnn.data.streams`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import InputError
from .arrays import to_device
from .registry import ByIdentity

# Batches kept ready by the background thread (which reads one more while they wait).
PREFETCH = 2


def upload(backend: Any, batches: Iterator[tuple[Any, ...]], owned: bool = False
           ) -> Iterator[tuple[Any, ...]]:
    """Host batches to the device, one copy each (device batches pass as they are), on the
    caller's thread: the device's current context and stream are the loop's. ``owned``: each
    batch is in arrays of its own already, which on NumPy (the host is the device) pass as
    they are."""
    as_they_are = owned and backend.name == "numpy"
    with contextlib.closing(batches):  # type: ignore[type-var]
        for batch in batches:
            yield batch if as_they_are else tuple(to_device(backend, a) for a in batch)


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


# How long a prefetch closed early waits for its thread: longer than a slow iterator takes for
# a batch (a thread left inside it would meet the next call's thread there: "generator already
# executing"), short beside a read that never returns.
STOP_WAIT_SECONDS = 10.0


def stop_wait_seconds() -> float:
    """:data:`STOP_WAIT_SECONDS` as set now (the other modules read it here, at each use)."""
    return STOP_WAIT_SECONDS


# The ids of the datasets whose [i] the current thread is inside, or a thread it waits for (a
# prefetch thread reading for a call made from inside one inherits its creator's): a call on one
# of them from there would wait for ever for that [i] (its lock held by the thread inside it).
_INSIDE = threading.local()


def inside() -> set[int]:
    """The current thread's record of the datasets it is inside (see :data:`_INSIDE`)."""
    ids = getattr(_INSIDE, "ids", None)
    if ids is None:
        ids = _INSIDE.ids = set()
    return ids


def prefetch(items: Iterator[Any], backend: Any,
             left: Callable[[threading.Event | None], None] | None = None,
             depth: int = PREFETCH, stop: threading.Event | None = None) -> Iterator[Any]:
    """``items`` computed on a background thread, up to ``depth`` ahead, on the device and
    stream current where this generator is first iterated (``backend.current_stream_scope``).
    An exception in the thread is raised here; closing this generator (a loop that ends early)
    stops the thread; one that does not stop within :data:`STOP_WAIT_SECONDS` (inside an
    iterator's ``next()``) is left. ``left`` is handed an Event that the thread sets as it
    ends, before it is waited for, and None once it has ended (by the thread too, as it ends).
    ``stop``: the Event that closing sets (made here where not given), which ``items`` may
    check between its own reads, so that a thread left inside a batch ends within one of them
    (:func:`stopped`)."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event() if stop is None else stop
    scope = backend.current_stream_scope()
    within = set(inside())  # (a call from inside a dataset's [i]: its reader is inside it too)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        inside().update(within)
        try:
            _work()
        finally:
            ended.set()
            if left is not None:  # (a reader left: its record goes as it ends)
                left(None)

    def _work() -> None:
        try:
            with scope:
                try:
                    for item in items:
                        if not put(item):
                            return
                finally:  # a generator's own clean-up: on the thread that iterated it, in scope
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(_Failure(e))

    # (waited for through an Event, not Thread.join: a join that a Ctrl-C interrupts marks
    # a running thread as stopped in Python 3.11)
    ended = threading.Event()
    thread = threading.Thread(target=work, name="xpcnn-prefetch", daemon=True)
    thread.start()
    done = False
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                done = True
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # (closed early, by an error or a Ctrl-C too: the thread ends at its next put, but one
        # blocked inside the caller's iterator cannot be interrupted; a daemon, it is left to
        # end with it rather than holding up the error. Handed to ``left`` before the wait,
        # which a second Ctrl-C may interrupt: it then stays there)
        if left is not None:
            left(ended)
        ended.wait(None if done else STOP_WAIT_SECONDS)
        if left is not None and ended.is_set():
            left(None)


class Stopped(Exception):
    """Raised by a producer that finds its prefetch closed (:func:`stopped`); the consumer has
    gone, and never sees it."""


def stopped(stop: threading.Event | None) -> None:
    """Raise :class:`Stopped` where ``stop`` (a prefetch's, :func:`prefetch`) is set."""
    if stop is not None and stop.is_set():
        raise Stopped


# -- readers left inside a source's own code --------------------------------------------------

# The Event of the reader thread a closed call left inside a map-style dataset's ``[i]`` or a
# re-iterable's iterator (set as it ends), by that source, which the next call on it waits for
# (a second reader there, a dataset reading one file handle, mixes up samples silently). The
# entry goes as the reader ends (the thread drops it itself) or as the source does. Iterators
# have theirs in their stream (:mod:`xpcnn.data.streams`).
_LEFT = ByIdentity()


def left_reader(source: Any) -> Callable[[threading.Event | None], None]:
    """A prefetch's ``left`` that records its reader for ``source`` (:func:`wait_for_reader`)
    until the reader ends."""
    mine: list[threading.Event] = []

    def note(ended: threading.Event | None) -> None:
        if ended is None:
            if mine:
                _LEFT.drop(source, mine[0])
            return
        mine[:] = [ended]
        _LEFT.put(source, ended)
        if ended.is_set():  # (ended meanwhile: it may have dropped its entry already)
            _LEFT.drop(source, ended)
    return note


def wait_for_reader(source: Any, what: str) -> None:
    """Wait for the reader that a stopped call left inside ``source`` (named ``what``), up to
    :data:`STOP_WAIT_SECONDS`; refuse the call where it is still there."""
    ended = _LEFT.get(source)
    if ended is None:
        return
    if not ended.wait(stop_wait_seconds()):
        raise InputError(f"{what} is still being read by the background thread of the call "
                         f"stopped before this one (inside its own code, which has not "
                         f"returned for {stop_wait_seconds():.0f} s more): two threads cannot "
                         "read it at once; call again when it returns")
    _LEFT.drop(source, ended)
