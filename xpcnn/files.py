"""Files written atomically: a temporary file next to the destination, fsynced and renamed over
it, so the destination is always either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import secrets


def new_temporary(folder: str | os.PathLike[str], name: str, suffix: str = ".tmp"
                  ) -> tuple[int, str]:
    """A new, empty file ``.<name>.<random><suffix>`` in ``folder``, open for writing: its file
    descriptor and path. It is created as ``open`` creates files, mode 0666 less the umask, so
    the file renamed from it can be shared where the umask allows; a killed writer's leftover
    is recognisable by its name."""
    while True:
        path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{suffix}")
        with contextlib.suppress(FileExistsError):
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


def fsync_folder(folder: str | os.PathLike[str]) -> None:
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
