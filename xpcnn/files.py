"""Files written atomically: a temporary file next to the destination, fsynced and renamed over
it, so the destination is always either the old file or the complete new one. Model files,
checkpoints, ONNX exports, downloads, figures and the first rows of a CSVLogger file that a run
writes anew are all written through :func:`atomic_file`; a symbolic
link's target is written, as ``open(path, "w")`` writes it, and the link kept; a file replaced
keeps its permissions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from typing import IO

from .errors import XpcnnError


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[IO[bytes]]:
    """A new file to write that becomes ``path`` only once the block succeeds: ``path`` is
    always either the old file or the complete new one.

    The file is created on entry (an unwritable path fails before the block runs), as ``open``
    creates files (mode 0666 less the umask), so it can be shared where the umask allows; where
    it replaces a file, it takes that file's permissions (one set to 0600 stays private). A
    hard link to the old file keeps the old contents (the rename makes a new file). If
    the block raises (Ctrl-C included), the temporary file is removed.
    """
    if names_a_folder(path):
        raise IsADirectoryError(f"{os.fspath(path)!r} names a folder: not written")
    if (fd := standard_stream(path)) is not None:  # (the rename would put a new file in the
        # place of the one a shell redirected the output to: all printed after it is lost)
        raise FileExistsError(f"{os.fspath(path)!r} is this process's standard "
                              f"{STREAM_NAMES[fd]}: not replaced")
    path = written_file(path)  # (its trailing separator dropped: checked above)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        # (the rename would put a file in the place of a device such as /dev/null, or a pipe)
        raise FileExistsError(f"{path!r} exists and is not a regular file: not replaced")
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    check_name_length(folder, base)  # (before the write, not at the rename after it)
    fd, tmp = _new_temporary(folder, base, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            # (before any byte is in it; best effort: a file system that takes no modes
            # still gets the file; a new one's mode is as open's, from the umask)
            with contextlib.suppress(OSError):
                os.chmod(tmp, os.stat(path).st_mode & 0o777)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            named = naming_the_file(e, path)
            if named is not e:
                raise named from e
        raise
    _fsync_folder(folder)


#: The errors of writing a file (not of the network a download reads): its write, flush or
#: fsync failed for the space, quota, size or medium, which name no file.
_WRITE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS") if hasattr(errno, name))


def naming_the_file(error: OSError, path: str, kept: bool = True) -> OSError:
    """``error``, a failed write of ``path`` (a full disk: "[Errno 28] No space left on
    device", which says neither which file nor, where ``kept`` (an atomic write), that the old
    one is kept), as the same kind of error naming them; ``error`` itself where it names a file
    already, is xpcnn's own, or is no write error (a download's network error, raised in the
    block)."""
    if error.filename is not None or isinstance(error, XpcnnError) or \
            error.errno not in _WRITE_ERRNOS:
        return error
    said = "; a file there before is left as it was" if kept else ""
    try:
        return type(error)(error.errno, f"could not write {path!r} ({error.strerror}){said}")
    except Exception:  # (a subclass that takes other arguments: as it was)
        return error


def replaceable(path: str | os.PathLike[str]) -> bool:
    """Whether a file at ``path`` can be written through :func:`atomic_file`: it is not there
    yet or is a regular file (a link's target counts), not a pipe or a device such as
    /dev/stdout, which a writer that takes those writes in place."""
    return not os.path.exists(path) or os.path.isfile(path)


#: The standard streams by file descriptor, as messages name them.
STREAM_NAMES = {1: "output", 2: "error"}


def standard_stream(path: str | os.PathLike[str]) -> int | None:
    """1 or 2 where ``path`` is this process's standard output or error (the same file as file
    descriptor 1 or 2: ``/dev/stdout``, ``/proc/self/fd/1``, or the file a shell redirected it
    to, reached by its own name), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    for fd in STREAM_NAMES:
        try:
            own = os.fstat(fd)
        except OSError:  # (closed)
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return fd
    return None


def names_a_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a folder whatever is there: it ends in a separator, or its last
    component is ``.`` or ``..`` (both of which realpath drops or collapses)."""
    path = os.fspath(path)
    return (path.endswith(tuple(filter(None, (os.sep, os.altsep))))
            or os.path.basename(path) in (os.curdir, os.pardir))


def written_file(path: str | os.PathLike[str]) -> str:
    """The file that writing ``path`` replaces, as an absolute path: a symbolic link's target
    (a dangling link's too), as ``open(path, "w")`` writes it, so that the atomic rename, made
    in the target's folder, replaces the target and leaves the link. OSError where the links
    loop, or where a ``..`` follows something that is not an existing folder (``missing/..``,
    which open() refuses and realpath would collapse as text); :func:`xpcnn.checks.output_file`
    says so before any work. A device or a pipe (``/dev/null``, a FIFO, ``/dev/stdout`` where
    the output is a pipe, which ``realpath`` makes ``/proc/<pid>/fd/pipe:[n]``, no path at all)
    is ``path`` itself, absolute: nothing is replaced there, and opening the path reaches it."""
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode) and not stat.S_ISDIR(mode):
            return os.path.abspath(path)
    except (OSError, ValueError):  # (absent, or a loop: as below)
        pass
    try:
        return os.path.realpath(path, strict=True)
    except OSError as e:  # (a new file, or a link to one: its path, links followed; the
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):  # writer says
            raise  # (links in a loop)                                 what else is wrong)
        _check_parent_steps(os.fspath(path))
        return os.path.realpath(path)


def _check_parent_steps(path: str) -> None:
    """OSError where the part of ``path`` up to a ``..`` is not a folder, as the OS
    resolves it (a ``..`` is only taken from a folder that exists). Windows collapses ``..``
    as text, as realpath does: nothing to check there."""
    if os.name == "nt":
        return
    parts = path.split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if part != os.pardir:
            continue
        prefix = os.sep.join(parts[:i + 1])
        try:
            os.stat(prefix)  # (the OS resolves it: links, then "..", from what exists)
        except OSError as e:
            before = os.sep.join(parts[:i]) or os.curdir
            raise type(e)(e.errno, f"{before!r} is not an existing folder, so {prefix!r} "
                                   f"does not resolve ({e.strerror})", path) from e


def try_writing_in(folder: str | os.PathLike[str], name: str = "xpcnn",
                   suffix: str = ".tmp") -> None:
    """Create and remove, in ``folder``, the temporary file that writing a file ``name`` there
    makes (:func:`atomic_file`): OSError where that fails (``os.access`` is not enough: root,
    read-only file systems), so that a command can refuse before any work."""
    fd, tmp = _create_temporary(os.fspath(folder), name, suffix)
    os.close(fd)
    os.unlink(tmp)


def name_max(folder: str | os.PathLike[str]) -> int:
    """The most bytes a file name may have in ``folder`` (an existing one): 255 where the
    platform does not say (Windows, whose limit is 255 characters)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # (no pathconf, or no limit told)
        return 255


def check_name_length(folder: str | os.PathLike[str], name: str) -> None:
    """OSError (ENAMETOOLONG) where the file name ``name`` is longer than ``folder`` (an
    existing one) takes."""
    limit, size = name_max(folder), len(os.fsencode(name))
    if size > limit:
        raise OSError(errno.ENAMETOOLONG, f"the file name is {size} bytes long; the file system "
                      f"of {os.fspath(folder)!r} takes names of at most {limit} bytes", name)


#: The random part of a temporary file's name: 12 hex digits.
_RANDOM_HEX = 12
#: Where a target's name is too long to be kept whole in its temporary's: "~" and 8 hex digits
#: of a hash of the whole name follow what is kept of it, so two long names sharing a beginning
#: do not share temporaries (nor remove each other's).
_HASH_HEX = 8


def _temporary_stem(folder: str, name: str, suffix: str) -> str:
    """``.<name>`` or, where the temporary's name would be longer than the folder's file names
    may be, ``.<the start of name>~<hash>``: the part of a temporary's name before its random
    hex, which fits the folder's NAME_MAX with ``.<random><suffix>`` after it."""
    room = name_max(folder) - 1 - (1 + _RANDOM_HEX + len(os.fsencode(suffix)))
    raw = os.fsencode(name)
    if len(raw) <= room:
        return "." + name
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_HEX]
    kept = max(0, room - 1 - _HASH_HEX)
    while kept and (raw[kept] & 0xC0) == 0x80:
        kept -= 1  # (not in the middle of a UTF-8 character)
    return "." + os.fsdecode(raw[:kept]) + "~" + digest


def _new_temporary(folder: str, name: str, suffix: str) -> tuple[int, str]:
    """A new, empty file ``.<name>.<random><suffix>`` in ``folder``, open for writing: its file
    descriptor and path (``name`` shortened where needed, see :func:`_temporary_stem`, so a
    target whose name is legal always has a temporary). Mode 0666 less the umask, as ``open``
    creates files; a killed writer's leftover is recognisable by its name."""
    return _create_temporary(folder, name, suffix)


def _create_temporary(folder: str, name: str, suffix: str) -> tuple[int, str]:
    """:func:`_new_temporary`'s file; the checks (:func:`try_writing_in`) make theirs here."""
    stem = _temporary_stem(folder, name, suffix)
    while True:
        path = os.path.join(folder, f"{stem}.{secrets.token_hex(_RANDOM_HEX // 2)}{suffix}")
        with contextlib.suppress(FileExistsError):
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


def remove_leftovers(path: str | os.PathLike[str], suffix: str = ".tmp") -> None:
    """Delete the temporary files that killed writers of ``path`` left behind: exactly the
    names :func:`_new_temporary` gives them (``.<name>.<12 hex><suffix>``), nothing else,
    beside the file written (a symbolic link's target, where :func:`atomic_file` makes them)."""
    try:
        folder, base = os.path.split(written_file(path))
        stem, names = _temporary_stem(folder, base, suffix), os.listdir(folder)
    except OSError:
        return
    hex_digits = rf"\.[0-9a-f]{{{_RANDOM_HEX}}}"
    leftover = re.compile(re.escape(stem) + hex_digits + re.escape(suffix))
    for tmp in names:
        if leftover.fullmatch(tmp):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, tmp))


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
