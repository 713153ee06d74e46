"""The error types xpcnn raises on purpose, and its one way to warn.

Every error a user can provoke with bad input is one of these, with a message that names what was
wrong and what was expected. Each also derives from the matching built-in type so that code written
against ``ValueError`` or ``OSError`` keeps working: a file to load that is not there is a
:class:`MissingFileError`, both a :class:`DataFormatError` and a ``FileNotFoundError``.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn ``xpcnn: message``, pointed at the user's call: the first frame outside xpcnn (a
    count of frames goes wrong whenever a call is wrapped, or made from another path)."""
    frame, level = sys._getframe(1), 2  # (1: the warnings.warn below; 2: its caller)
    while frame is not None and of_xpcnn(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"xpcnn: {message}", category, stacklevel=level)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11), also on Python 3.10, which has no such method: the
    note goes into ``__notes__`` there too, where code and 3.11's tracebacks read it."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # (Python 3.10)
        error.__notes__ = [*getattr(error, "__notes__", ()), note]


def of_xpcnn(module: str) -> bool:
    """Whether the module named ``module`` is xpcnn's own (a user's ``xpcnn_helpers`` is not)."""
    return module == "xpcnn" or module.startswith("xpcnn.")


class XpcnnError(Exception):
    """Base class of every error raised by xpcnn on purpose."""


class InputError(XpcnnError, ValueError):
    """An argument, array shape, dtype or label that is not what the API expects."""


class DeviceError(XpcnnError, RuntimeError):
    """A device that does not exist here, or a backend that is not installed."""


class DataFormatError(XpcnnError, ValueError):
    """A file (dataset, model, checkpoint) that is corrupt, truncated or of another kind."""


class MissingFileError(DataFormatError, FileNotFoundError):
    """A file to load (a model file, weights file or checkpoint) that does not exist: caught by
    ``except FileNotFoundError`` (or ``OSError``), as Keras' ``load_weights`` and
    ``torch.load`` raise it, and by ``except DataFormatError``. ``filename`` is the path."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno.ENOENT, os.strerror(errno.ENOENT), path

    def __str__(self) -> str:  # (the message, not OSError's "[Errno 2] ...: path")
        return str(self.args[0])

    def __reduce__(self) -> tuple[type[MissingFileError], tuple[str, str]]:
        # (OSError's would pass (errno, strerror, filename) to this __init__)
        return type(self), (self.args[0], self.filename)


class DownloadError(XpcnnError, OSError):
    """A dataset file that could not be fetched or failed its checksum."""


class NonFiniteError(XpcnnError, FloatingPointError):
    """A NaN or infinity: in the loss or a gradient during training, or in the data that
    ``fit``, ``evaluate``, ``predict`` or a ``*_on_batch`` call is given (refused before any
    of it runs). Not a ValueError: code catching bad input should catch this too."""


class ForeignNameError(InputError, AttributeError):
    """A name of Keras' or PyTorch's that xpcnn does not have (``xpcnn.layers.MaxPooling2D``,
    a model's ``train()``): an AttributeError (``hasattr`` is False) whose message names
    xpcnn's way."""



def keras_names(module: str, names: dict[str, tuple[tuple[str, ...], str]], kind: str
                ) -> Callable[[str], NoReturn]:
    """A module's ``__getattr__`` (PEP 562: run only for names it lacks) raising a
    :class:`ForeignNameError` with the advice of ``names`` (``{name: (the xpcnn names the
    advice gives, the advice)}``: not aliases, each thing has one name) for Keras' names,
    else Python's AttributeError."""
    def __getattr__(name: str) -> NoReturn:
        if name in names:
            raise ForeignNameError(f"{module} has no {name} ({kind}): {names[name][1]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


class MissingDependencyError(XpcnnError, ImportError):
    """An optional extra that is not installed (matplotlib for ``xpcnn[viz]``, CuPy for CUDA)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit(..., checkpoint=PATH)``: the step in progress finished and the
    training state was written to ``checkpoint``, from which ``resume=True`` continues."""

    def __init__(self, where: str, checkpoint: str) -> None:
        super().__init__(f"interrupted at {where}; the checkpoint {checkpoint} holds the "
                         "training state at that step, and fit(..., resume=True) continues "
                         "from it")
        self.where, self.checkpoint = where, checkpoint
