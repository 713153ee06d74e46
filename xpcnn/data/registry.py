"""A registry of a value per object, by the object's identity (:class:`ByIdentity`), for any
object a user passes as a source: the lock of a map-style dataset
(:mod:`xpcnn.data.sources`), the reader a stopped call left inside a source
(:mod:`xpcnn.data.background`). Iterators keep theirs in a registry of their own
(:mod:`xpcnn.data.streams` says why).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any


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
