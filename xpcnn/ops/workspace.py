"""Scratch arrays kept across steps, per thread: a :class:`Workspace` holds each thread's own,
and a thread pool's workers use the scratch of the thread they work for (:func:`working_for`).

Fresh large arrays every step cost page faults, so the convolutions' chunk loops
(:mod:`xpcnn.ops.im2col`) keep their patch and padding buffers here; the NumPy kernels' pool
threads (:mod:`xpcnn.ops.fast_numpy`) run inside :func:`working_for` their caller.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

# The thread a chunk loop's pool thread works for (see :func:`working_for`); otherwise a thread
# works for itself.
_OWNER = threading.local()


@contextlib.contextmanager
def working_for(thread: threading.Thread) -> Iterator[None]:
    """Inside, this (pool) thread's scratch is ``thread``'s: a chunk loop's workers use the
    scratch of the thread that runs the loop."""
    _OWNER.thread = thread
    try:
        yield
    finally:
        _OWNER.thread = None


def owner() -> threading.Thread:
    """The thread whose scratch this thread uses."""
    return getattr(_OWNER, "thread", None) or threading.current_thread()


_NEW_THREAD = threading.Lock()


class Workspace:
    """Scratch arrays kept across steps, one per key, reallocated when the shape grows (with
    ``keep`` False, fresh arrays every time: see :attr:`Backend.keeps_scratch`). Each thread
    that runs a layer has its own (two threads predicting with one model wrote into each
    other's), dropped when the thread has ended and another thread comes (or its Thread
    object goes); a chunk loop's pool threads use their caller's."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self._by_thread: weakref.WeakKeyDictionary[threading.Thread, tuple[dict, dict]] = (
            weakref.WeakKeyDictionary())

    def _mine(self) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
        thread = owner()
        mine = self._by_thread.get(thread)
        if mine is None:
            with _NEW_THREAD:  # (two threads new at once: one at a time)
                mine = self._by_thread.get(thread)  # (pool workers of one new owner)
                if mine is None:
                    # (a pool shut down, or a finished Thread still referenced, keeps its
                    # object)
                    for ended in [t for t in list(self._by_thread) if not t.is_alive()]:
                        self._by_thread.pop(ended, None)
                    mine = self._by_thread[thread] = ({}, {})
        return mine

    @property
    def _arrays(self) -> dict[str, Any]:
        return self._mine()[0]

    @property
    def plans(self) -> dict[str, tuple[Any, ...]]:
        """Per key: (signature, views...), see :func:`xpcnn.ops.im2col._plan`."""
        return self._mine()[1]

    def get(self, xp: Any, key: str, shape: tuple[int, ...], dtype: Any, device: Any,
            fill: float | None = None) -> Any:
        """An array of ``shape`` (the leading rows of a larger cached one if the batch shrank).

        With ``fill``, a new array starts filled with it, and callers only ever write the same
        interior region, so the border keeps it.
        """
        a = self._arrays.get(key)
        if (a is None or a.dtype != dtype or tuple(a.shape[1:]) != tuple(shape[1:])
                or a.shape[0] < shape[0]):
            if fill is None:
                a = xp.empty(shape, dtype=dtype, device=device)
            else:
                a = xp.full(shape, fill, dtype=dtype, device=device)
            if self.keep:
                self._arrays[key] = a
        return a if a.shape[0] == shape[0] else a[: shape[0], ...]
