"""Files written atomically: a temporary file next to the destination, fsynced and renamed over
it, so the destination is always either the old file or the complete new one. Model files,
checkpoints, ONNX exports and downloads are all written through :func:`atomic_file`; a symbolic
link's target is written, as ``open(path, "w")`` writes it, and the link kept."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[IO[bytes]]:
    """A new file to write that becomes ``path`` only once the block succeeds: ``path`` is
    always either the old file or the complete new one.

    The file is created on entry (an unwritable path fails before the block runs), as ``open``
    creates files (mode 0666 less the umask), so it can be shared where the umask allows. If
    the block raises (Ctrl-C included), the temporary file is removed.
    """
    if names_a_folder(path):
        raise IsADirectoryError(f"{os.fspath(path)!r} names a folder: not written")
    path = written_file(path)  # (its trailing separator dropped: checked above)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        # (the rename would put a file in the place of a device such as /dev/null, or a pipe)
        raise FileExistsError(f"{path!r} exists and is not a regular file: not replaced")
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_temporary(folder, base, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def names_a_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` ends in a separator, which names a folder (and realpath drops)."""
    return os.fspath(path).endswith(tuple(filter(None, (os.sep, os.altsep))))


def written_file(path: str | os.PathLike[str]) -> str:
    """The file that writing ``path`` replaces, as an absolute path: a symbolic link's target
    (a dangling link's too), as ``open(path, "w")`` writes it, so that the atomic rename, made
    in the target's folder, replaces the target and leaves the link. OSError where the links
    loop (:func:`xpcnn.checks.output_file` says so before any work)."""
    try:
        return os.path.realpath(path, strict=True)
    except (FileNotFoundError, NotADirectoryError):  # (a new file, or a link to one: its
        return os.path.realpath(path)  # path, links followed; the writer says what is wrong)


def try_writing_in(folder: str | os.PathLike[str]) -> None:
    """Create and remove a file in ``folder``: OSError where that fails (``os.access`` is not
    enough: root, read-only file systems), so that a command can refuse before any work."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _new_temporary(folder: str, name: str, suffix: str) -> tuple[int, str]:
    """A new, empty file ``.<name>.<random><suffix>`` in ``folder``, open for writing: its file
    descriptor and path. Mode 0666 less the umask, as ``open`` creates files; a killed writer's
    leftover is recognisable by its name."""
    while True:
        path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{suffix}")
        with contextlib.suppress(FileExistsError):
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


def remove_leftovers(path: str | os.PathLike[str], suffix: str = ".tmp") -> None:
    """Delete the temporary files that killed writers of ``path`` left behind (named as
    :func:`_new_temporary` names them)."""
    folder, base = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*{suffix}")):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable; not possible (nor needed) on every platform, so
    best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
