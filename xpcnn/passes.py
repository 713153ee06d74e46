"""The lock of passes through layers and of their builds (see :class:`PassLock`)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from .errors import InputError


class PassLock:
    """A readers-writer lock: every pass through a model's layers (an inference batch; a
    training step's forward, backward and update) holds it shared, and every build or rebuild
    of layers (a model's build, a rebuild for its inputs or precision, compile changing the
    precision) holds it exclusive, so that no build changes layers under a pass of another
    thread. Passes of any models run side by side; a pass that itself rebuilds layers (models
    sharing layers built otherwise) holds it exclusive throughout.

    Re-entrant per thread: a thread holding it shared may take it shared again (a user layer's
    forward predicting with another model), and one holding it exclusive may take it either
    way. A thread holding it shared only cannot take it exclusive (its own pass would be
    rebuilt under it): refused with an InputError naming what was asked. A waiting writer
    holds back new readers (a thread training in a loop cannot starve a build), but not those
    already holding it (re-entry cannot deadlock behind a writer).

    ``shared`` is a ``with`` block: this thread's own reader lock (a C-level ``RLock``, whose
    ``with`` a Ctrl-C cannot split, so a pass never leaves it held), taken once the writers'
    gate is free; a writer takes the gate, then every thread's reader lock (waiting for their
    passes; in the main thread a Ctrl-C ends that wait, whichever thread the signal reached).
    ``exclusive(what)`` is a ``with`` block too: on an exception in its enter or exit (a
    Ctrl-C landing in a wait, just after an acquire, or midway through giving back) it gives
    back every lock this thread owns, recorded or not. Only a Ctrl-C landing at the first
    instruction of its exit, or a second one during that clean-up, may still leave it held.
    (Deferring signals there took wrapping the process's signal handlers, which a user's
    handlers chaining to the previous one, or checking their own, did not survive.)"""

    def __init__(self) -> None:
        self._gate = threading.RLock()  # (a writer's, waiting or holding: new readers wait)
        self._mine = threading.local()  # (this thread's reader lock)
        self._readers: dict[int, Any] = {}  # (thread -> its reader lock; changed under the gate)
        self._writer: int | None = None  # (the thread holding it exclusive)
        self._writes = 0  # (how many times the writer holds it, either way)
        self._waiters: set[int] = set()  # (threads waiting to take it exclusive)

    @property
    def shared(self) -> Any:
        """This thread's reader lock, for ``with``: a pass's hold of the lock shared."""
        me = threading.get_ident()
        mine = getattr(self._mine, "lock", None)
        if mine is None:
            mine = self._mine.lock = threading.RLock()
            if self._writer == me:  # (the writer holds the gate: it registers it itself)
                self._readers[me] = mine
            else:
                with self._gate:  # (registered between writers: the next one's sweep has it)
                    self._readers[me] = mine
        elif self._writer != me and not mine._is_owned():  # (re-entry: not behind a writer)
            with self._gate:  # (a first hold waits for the writer at work or waiting)
                pass
        return mine

    def exclusive(self, what: str) -> _Exclusive:
        """The lock exclusive, for ``what`` (named in the error where this thread holds it
        shared only)."""
        return _Exclusive(self, what)

    def in_pass(self) -> bool:
        """Whether this thread holds it shared only (inside a pass through layers)."""
        mine = getattr(self._mine, "lock", None)
        return mine is not None and mine._is_owned() and self._writer != threading.get_ident()

    def waiting(self) -> int:
        """How many threads wait to take it exclusive (for tests)."""
        return len(self._waiters)

    def _take_exclusive(self, what: str) -> None:
        me = threading.get_ident()
        if self._writer == me:
            self._writes += 1
            return
        mine = getattr(self._mine, "lock", None)
        if mine is not None and mine._is_owned():
            raise InputError(
                f"{what} was asked inside a pass through layers in this thread (a layer's "
                "forward, a pass of another model): it builds layers, which would change "
                "them under that pass; build or compile outside the pass, or use a model "
                "whose layers are built as this one's")
        try:
            self._waiters.add(me)
            _wait_for(self._gate)
            alive = {t.ident for t in threading.enumerate()}
            for ident in [i for i in self._readers if i not in alive]:  # (threads gone)
                del self._readers[ident]
            for lock in list(self._readers.values()):
                _wait_for(lock)  # (waits for that thread's passes)
            self._writer, self._writes = me, 1
            self._waiters.discard(me)  # (in the try: a Ctrl-C after it gives all back)
        except BaseException:
            self._waiters.discard(me)
            if self._writer == me:
                self._writer, self._writes = None, 0
            self._release_owned()
            raise

    def _release_owned(self) -> None:
        """Give back every lock this thread owns, not only those recorded: a Ctrl-C raised
        just after an acquire returned, before it was recorded, leaves that one owned too (no
        pass of this thread holds any here: see ``_take_exclusive``)."""
        for lock in [*self._readers.values(), self._gate]:
            if lock._is_owned():
                lock.release()

    def _release_exclusive(self) -> None:
        self._writes -= 1
        if self._writes:
            return
        self._writer = None
        self._release_owned()  # (again, whole, if a Ctrl-C ends it midway: see _Exclusive)


class _Exclusive:
    __slots__ = ("_lock", "_what")

    def __init__(self, lock: PassLock, what: str) -> None:
        self._lock, self._what = lock, what

    def __enter__(self) -> None:
        lock = self._lock
        held = lock._writes if lock._writer == threading.get_ident() else 0
        try:
            lock._take_exclusive(self._what)
        except BaseException:  # (a Ctrl-C landing once taken, before the with has it: back)
            if lock._writer == threading.get_ident() and lock._writes > held:
                lock._release_exclusive()
            raise

    def __exit__(self, *exc: Any) -> None:
        lock = self._lock
        writes = lock._writes
        try:
            lock._release_exclusive()
        except BaseException:  # (a Ctrl-C landing before it gave the hold back, or midway)
            if lock._writer != threading.get_ident():
                if writes == 1:
                    lock._release_owned()
            elif lock._writes == writes:
                lock._release_exclusive()
            raise


#: how long the main thread waits for a lock before it looks for a Ctrl-C (seconds)
_POLL = 0.05


def _wait_for(lock: Any) -> None:
    """Acquire ``lock`` (the gate, a thread's reader lock), which may be held for a while (a
    pass running). In the main thread, in steps: a Ctrl-C that reached another thread (the
    kernel gives a process's signal to any of its threads) leaves a C-level wait waiting, and
    Python raises its KeyboardInterrupt only between steps (the caller gives back what it
    took)."""
    if threading.get_ident() != threading.main_thread().ident:
        lock.acquire()
        return
    while not lock.acquire(timeout=_POLL):
        pass


def exclusive_if(builds_built: bool, what: str, otherwise: Any = None) -> Any:
    """The lock a build holds: :data:`PASSES` exclusive where it changes built layers (which a
    pass of another thread may be running through: it waits for it; one inside a pass of this
    thread is refused), else ``otherwise`` (or nothing): a first build changes nothing a pass
    runs through."""
    if builds_built:
        return PASSES.exclusive(what)
    return contextlib.nullcontext() if otherwise is None else otherwise


#: the one lock of all models' passes and builds (one: no order of locks to keep)
PASSES = PassLock()
