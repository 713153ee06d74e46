"""The background thread: :func:`prefetch` computes host batches (reading files, stacking
samples, checking values) up to :data:`PREFETCH` ahead while the device computes, and
:func:`upload` hands each to the device on the caller's thread. Apart from the sources, which
all read through them (:mod:`xpcnn.data.sources`, :mod:`xpcnn.data.streams`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import InputError
from .arrays import to_device

# Batches prepared ahead by the background thread.
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


# -- registries by identity, for any source ---------------------------------------------------


class ByIdentity:
    """Values by object identity, for any object: an unhashable one (a dataclass: eq=True sets
    ``__hash__`` None) and one that takes no weak reference (a dict, a ``__slots__`` class)
    alike. An entry lives until :meth:`drop` (its users are gone) or, for an object that takes
    a weak reference, until the object does (weakref.finalize; the entry does not keep it
    alive). An object that takes none is held by its entry, so that its id is not reused while
    the entry is there: only as long as its users, which hold it anyway."""

    def __init__(self) -> None:
        # id -> [value, the object (None where weakly referenced), users, its finalizer]
        self._entries: dict[int, list[Any]] = {}
        # (reentrant: a finalizer, _gone or a user's release, may run from a collection that
        # an allocation starts while this thread holds it)
        self._lock = threading.RLock()

    def get(self, obj: Any) -> Any:
        """``obj``'s value, None where it has none."""
        with self._lock:
            entry = self._entries.get(id(obj))
            return None if entry is None else entry[0]

    def put(self, obj: Any, value: Any) -> None:
        """Give ``obj`` ``value`` (replacing its value, if any)."""
        with self._lock:
            self._entry(obj)[0] = value

    def use(self, obj: Any, make: Callable[[], Any]) -> Any:
        """``obj``'s value (``make()``'s where it has none), counting one more user, which
        :meth:`release` counts off: the entry of an object that takes no weak reference goes
        with its last user."""
        with self._lock:
            entry = self._entry(obj)
            if entry[0] is None:
                entry[0] = make()
            entry[2] += 1
            return entry[0]

    def release(self, key: int) -> None:
        """One user of the object of id ``key`` is gone (:meth:`use`)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0 and entry[1] is not None:
                    del self._entries[key]

    def drop(self, obj: Any, value: Any = None) -> None:
        """Drop ``obj``'s entry (only where its value is ``value``, if given)."""
        with self._lock:
            entry = self._entries.get(id(obj))
            if entry is not None and (value is None or entry[0] is value):
                self._remove(id(obj))

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, obj: Any) -> list[Any]:
        key = id(obj)
        entry = self._entries.get(key)
        if entry is None:
            try:
                finalizer = weakref.finalize(obj, self._gone, key)
                finalizer.atexit = False
                entry = [None, None, 0, finalizer]
            except TypeError:  # (no weak reference to it: held while recorded)
                entry = [None, obj, 0, None]
            self._entries[key] = entry
        return entry

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        if entry[3] is not None:
            entry[3].detach()

    def _gone(self, key: int) -> None:
        with self._lock:
            self._entries.pop(key, None)


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
