"""A Ctrl-C during fit, evaluate or predict is never lost.

Python raises its KeyboardInterrupt in whatever Python code the main thread runs next, a
weak reference's callback or a ``__del__`` included; raised there, it is reported as
"Exception ignored in ..." (``sys.unraisablehook``) and dropped, and training went on as if
the key had not been pressed (a WeakKeyDictionary's entry removed in the first step did it
about once in fifteen presses). Inside :func:`remembered`, that report is held back and the
KeyboardInterrupt raised again: by the loop after the step or batch (:func:`raise_if_dropped`),
or on leaving, where it was dropped after the last one. A KeyboardInterrupt that code catches
on purpose is not dropped: it is left alone.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_dropped = False  # Python dropped a KeyboardInterrupt inside remembered()
_report: Callable[[Any], None] = sys.unraisablehook  # (the hook ours stands in front of)


def _hold_back_a_dropped_ctrl_c(unraisable: Any) -> None:
    global _dropped
    if (isinstance(unraisable.exc_value, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()):  # (SIGINT's thread)
        _dropped = True
    else:
        _report(unraisable)


def python_handles_it() -> bool:
    """Ctrl-C has Python's own meaning here: in the main thread, with Python's handler
    (KeyboardInterrupt); a program's own handler, or SIGINT ignored, is left alone."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Inside, a Ctrl-C Python drops is raised again (see the module's text)."""
    global _dropped, _report
    if not python_handles_it() or sys.unraisablehook is _hold_back_a_dropped_ctrl_c:
        yield  # (another thread's loop, or one inside fit's: its hook is in place)
        return
    _dropped, _report = False, sys.unraisablehook
    sys.unraisablehook = _hold_back_a_dropped_ctrl_c
    try:
        yield
    finally:
        sys.unraisablehook = _report
        dropped, _dropped = _dropped, False
    if dropped:  # (after the last step's check: in a callback, validation)
        raise KeyboardInterrupt


def raise_if_dropped() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that Python dropped (see the module's text)."""
    global _dropped
    if _dropped and threading.current_thread() is threading.main_thread():
        _dropped = False
        raise KeyboardInterrupt
