"""The lock of passes through layers and of their builds (see :class:`PassLock`)."""

from __future__ import annotations

import contextlib
import signal
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
    passes). ``exclusive(what)`` is a ``with`` block too, whose enter and exit are Python code:
    in the main thread (the only one a signal's Python handler runs in) the signals that have
    a Python handler (Ctrl-C's KeyboardInterrupt, a user's own) are deferred while they run,
    and handled once the lock is taken (then given back: the Ctrl-C is raised before the
    block) or given back; a wait for the lock still ends at a Ctrl-C. So neither a pass nor a
    build leaves the lock held (see :func:`_deferring`)."""

    def __init__(self) -> None:
        self._gate = threading.Lock()  # (a writer's, waiting or holding: new readers wait)
        self._mine = threading.local()  # (this thread's reader lock)
        self._readers: dict[int, Any] = {}  # (thread -> its reader lock; changed under the gate)
        self._writer: int | None = None  # (the thread holding it exclusive)
        self._writes = 0  # (how many times the writer holds it, either way)
        self._taken: list[Any] = []  # (the reader locks the writer holds)
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
        self._waiters.add(me)
        taken: list[Any] = []
        gate = False
        try:
            _wait_for(self._gate)
            gate = True
            alive = {t.ident for t in threading.enumerate()}
            for ident in [i for i in self._readers if i not in alive]:  # (threads gone)
                del self._readers[ident]
            for lock in list(self._readers.values()):
                _wait_for(lock)  # (waits for that thread's passes)
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            if gate:
                self._gate.release()
            raise
        finally:
            self._waiters.discard(me)
        self._writer, self._writes, self._taken = me, 1, taken

    def _release_exclusive(self) -> None:
        self._writes -= 1
        if self._writes:
            return
        taken, self._taken, self._writer = self._taken, [], None
        try:
            while taken:
                taken.pop().release()
        finally:
            self._gate.release()


class _Exclusive:
    __slots__ = ("_lock", "_what")

    def __init__(self, lock: PassLock, what: str) -> None:
        self._lock, self._what = lock, what

    def __enter__(self) -> None:
        lock = self._lock
        if threading.get_ident() != threading.main_thread().ident:  # (no signal lands here)
            lock._take_exclusive(self._what)
            return
        taken = False
        try:
            _defer_signals()
            lock._take_exclusive(self._what)
            taken = True
            _holds[0] += 1
            if not _came:
                # (no call from the check on: a signal now is handled in the block, whose
                # exit gives the lock back)
                return
            _holds[0] -= 1  # (one came meanwhile: raised as before the block)
            taken = False
            lock._release_exclusive()
        except BaseException:
            if taken:
                _holds[0] -= 1
                lock._release_exclusive()
            _handle_signals()
            raise
        _handle_signals()

    def __exit__(self, *exc: Any) -> None:
        lock = self._lock
        if threading.get_ident() != threading.main_thread().ident:
            lock._release_exclusive()
            return
        try:
            _holds[0] -= 1
            lock._release_exclusive()
        finally:
            _handle_signals()


# Signals whose Python handler runs while the main thread takes or gives back the lock
# exclusive are deferred: a handler that raises (Ctrl-C's KeyboardInterrupt, a user's) between
# two steps of that bookkeeping left the lock held, and every later pass and build waited for
# ever. A handler runs only in the main thread, between bytecodes; here it is wrapped by
# _deferring from the enter's start to the exit's end (the block between: every signal is
# handled at once, by its own handler, as the wrapper passes it on).

#: the signals deferred where their handler is Python's: Ctrl-C's (first), and those that
#: Python code commonly handles by raising (SystemExit at SIGTERM, a timeout at SIGALRM...).
#: Not every signal: a look at each handler costs a microsecond or so, at every build.
_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGUSR1", "SIGUSR2", "SIGBREAK")
    if hasattr(signal, name))
#: each wrapped signal's own handler
_handlers: dict[int, Any] = {}
#: (handler, signum, frame) of the signals deferred, in the order they came
_came: list[tuple[Any, int, Any]] = []
#: how many exclusive holds of any PassLock the main thread has (its handlers wrapped)
_holds = [0]


def _deferring(signum: int, frame: Any) -> None:
    """The handler wrapping a signal's own: the signal waits where it interrupted the lock's
    enter or exit (or what they call), and is passed on at once anywhere else."""
    handler = _handlers.get(signum)
    if handler is None:  # (unwrapped meanwhile)
        return
    at = frame
    while at is not None:
        if at.f_code in _BOOKKEEPING:
            _came.append((handler, signum, frame))
            return
        at = at.f_back
    handler(signum, frame)


_BOOKKEEPING = frozenset({_Exclusive.__enter__.__code__, _Exclusive.__exit__.__code__})


def _defer_signals() -> None:
    """Wrap those signals' Python handlers (SIGINT's first: a Ctrl-C pending from before is
    raised here, where nothing is taken). Only in the main thread; once, not again inside."""
    if _holds[0]:
        return
    for signum in _SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler) and handler is not _deferring:
            _handlers[signum] = handler  # (first: the wrapper may run as soon as it is set)
            try:
                signal.signal(signum, _deferring)
            except (ValueError, OSError):  # (not the main interpreter; a signal it refuses)
                del _handlers[signum]


def _handle_signals() -> None:
    """The signals' own handlers back where the main thread holds no lock exclusive, then those
    deferred run (a Ctrl-C's KeyboardInterrupt raised here, with nothing held)."""
    try:
        if not _holds[0]:
            for signum, handler in list(_handlers.items()):
                if signal.getsignal(signum) is _deferring:  # (else the user's, set since)
                    signal.signal(signum, handler)
                del _handlers[signum]
    finally:
        try:
            while _came:
                handler, signum, frame = _came.pop(0)
                handler(signum, frame)
        finally:
            _came.clear()  # (one more, while the first raised: that one stands for both)


#: how long the main thread waits for a lock before it looks for a deferred Ctrl-C (seconds)
_POLL = 0.05


def _wait_for(lock: Any) -> None:
    """Acquire ``lock`` (the gate, a thread's reader lock), which may be held for a while (a
    pass running): in the main thread a Ctrl-C deferred meanwhile is raised here (the caller
    gives back what it took)."""
    if threading.get_ident() != threading.main_thread().ident:
        lock.acquire()
        return
    while not lock.acquire(timeout=_POLL):
        if _came:
            handler, signum, frame = _came.pop(0)
            handler(signum, frame)


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
