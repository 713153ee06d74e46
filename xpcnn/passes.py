"""The lock of passes through layers and of their builds (see :class:`PassLock`)."""

from __future__ import annotations

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

    ``shared`` is a ``with`` block (one object, made once: a few locked operations per pass),
    ``exclusive(what)`` too; each releases what it took on any exception, KeyboardInterrupt
    included."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # (thread -> how many times it holds it shared)
        self._writer: int | None = None  # (the thread holding it exclusive)
        self._writes = 0  # (how many times the writer holds it, either way)
        self._waiting = 0  # (writers waiting: new readers wait behind them)
        self.shared = _Shared(self)

    def exclusive(self, what: str) -> _Exclusive:
        """The lock exclusive, for ``what`` (named in the error where this thread holds it
        shared only)."""
        return _Exclusive(self, what)

    def waiting(self) -> int:
        """How many threads wait to take it exclusive (for tests)."""
        return self._waiting

    def _take_shared(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writes += 1
            elif me in self._readers:  # (re-entry: never behind a waiting writer)
                self._readers[me] += 1
            else:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers[me] = 1

    def _take_exclusive(self, what: str) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writes += 1
                return
            if me in self._readers:
                raise InputError(
                    f"{what} was asked inside a pass through layers in this thread (a layer's "
                    "forward, a pass of another model): it builds layers, which would change "
                    "them under that pass; build or compile outside the pass, or use a model "
                    "whose layers are built as this one's")
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            except BaseException:
                self._waiting -= 1
                self._cond.notify_all()  # (readers held back by this writer go on)
                raise
            self._waiting -= 1
            self._writer, self._writes = me, 1

    def _release(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writes -= 1
                if not self._writes:
                    self._writer = None
                    self._cond.notify_all()
                return
            held = self._readers[me] - 1
            if held:
                self._readers[me] = held
            else:
                del self._readers[me]
                if not self._readers:
                    self._cond.notify_all()


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock: PassLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._take_shared()

    def __exit__(self, *exc: Any) -> None:
        self._lock._release()


class _Exclusive:
    __slots__ = ("_lock", "_what")

    def __init__(self, lock: PassLock, what: str) -> None:
        self._lock, self._what = lock, what

    def __enter__(self) -> None:
        self._lock._take_exclusive(self._what)

    def __exit__(self, *exc: Any) -> None:
        self._lock._release()


#: the one lock of all models' passes and builds (one: no order of locks to keep)
PASSES = PassLock()
