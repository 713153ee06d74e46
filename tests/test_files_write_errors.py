"""A write that fails (a full disk) names the file it was writing; the old file stays."""

from __future__ import annotations

import csv
import errno
import os
import re
import select
import stat
import threading

import numpy as np
import numpy.lib.format
import pytest

import xpcnn
from xpcnn.callbacks import CSVLogger
from xpcnn.cli import main
from xpcnn.errors import InputError
from xpcnn.files import atomic_file


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EFBIG])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, code):
    """(was: "[Errno 28] No space left on device", naming no file)"""
    path = tmp_path / "model.npz"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as caught, atomic_file(path) as f:
        f.write(b"new, part")
        raise OSError(code, os.strerror(code))
    error = caught.value
    assert type(error) is OSError and error.errno == code
    assert str(error) == (f"[Errno {code}] could not write {os.path.realpath(path)!r} "
                          f"({os.strerror(code)}); a file there before is left as it was")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.npz"]


@pytest.mark.parametrize("error", [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),  # (a download's)
    FileNotFoundError(errno.ENOENT, "No such file or directory", "other.bin"),  # (names one)
    OSError("no errno"),
])
def test_other_errors_in_the_block_go_on_as_they_were(tmp_path, error):
    with pytest.raises(OSError) as caught, atomic_file(tmp_path / "x.bin"):
        raise error
    assert caught.value is error and os.listdir(tmp_path) == []


def test_the_cli_names_the_file_a_full_disk_kept_it_from_writing(tmp_path, monkeypatch,
                                                                   capsys):
    """xpcnn train --save on a full disk: exit status 1, and the line names --save's file
    (was: "xpcnn train: error: [Errno 28] No space left on device")."""
    path = tmp_path / "model.npz"
    monkeypatch.setattr(numpy.lib.format, "write_array", _full_disk)
    assert main(["train", "--limit", "32", "--batch-size", "16", "--epochs", "1", "--quiet",
                 "--save", str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"xpcnn train: error: [Errno 28] could not write {os.path.realpath(path)!r} (No space "
        "left on device); a file there before is left as it was")
    assert os.listdir(tmp_path) == []


class _FullDiskWriter:
    """A csv.writer whose rows find the disk full."""

    def __init__(self, *args, **kwargs):
        pass

    def writerows(self, rows):
        _full_disk()


def test_a_resumed_runs_log_that_cannot_be_written_is_kept_and_named(tmp_path, monkeypatch,
                                                                     capsys):
    """--log of a resumed run (rewritten from the checkpoint's epochs on) on a full disk: the
    old log stays as it was and the line names it (was: the log emptied, "[Errno 28] No space
    left on device")."""
    log, checkpoint = tmp_path / "log.csv", tmp_path / "c.npz"
    run = ["train", "--limit", "32", "--batch-size", "16", "--quiet", "--schedule", "constant",
           "--checkpoint", str(checkpoint), "--log", str(log)]
    assert main([*run, "--epochs", "1"]) == 0
    before = log.read_bytes()
    assert len(before.splitlines()) == 2
    capsys.readouterr()
    monkeypatch.setattr(csv, "writer", _FullDiskWriter)
    assert main([*run, "--epochs", "2", "--resume"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"xpcnn train: error: [Errno 28] could not write {os.path.realpath(log)!r} (No space "
        "left on device); a file there before is left as it was")
    assert log.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.npz", "log.csv"]


def test_a_log_row_appended_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """(a later row is appended: the error names the file, and does not say it was kept)"""
    log = tmp_path / "log.csv"
    logger = CSVLogger(log)
    model = xpcnn.Sequential([xpcnn.layers.Flatten(), xpcnn.layers.Dense(2)],
                             input_shape=(2, 2, 1))
    model.compile()
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.array([0, 1, 0, 1])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    assert len(log.read_bytes().splitlines()) == 2
    logger.on_train_begin()
    logger.mode = "a"  # (as after this run's first row)
    monkeypatch.setattr(csv, "writer", _FullDiskWriter)
    with pytest.raises(OSError) as caught:
        logger.on_epoch_end(1, {"loss": 1.0})
    assert str(caught.value) == (f"[Errno 28] could not write {str(log)!r} (No space left on "
                                 "device)")


def test_a_figure_that_cannot_be_written_is_named_and_the_old_one_kept(tmp_path, monkeypatch):
    """(--plots and the viz functions: was written in place, a full disk leaving half a PNG)"""
    figure = pytest.importorskip("matplotlib.figure")
    from xpcnn import viz
    path = tmp_path / "h.png"
    path.write_bytes(b"old")
    real = figure.Figure.savefig

    def half_then_full(self, fname, **kwargs):
        real(self, fname, **kwargs)
        _full_disk()
    monkeypatch.setattr(figure.Figure, "savefig", half_then_full)
    with pytest.raises(OSError, match=r"could not write .*h\.png.*left as it was"):
        viz.plot_history({"loss": [1.0, 0.5]}, path, dpi=30)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["h.png"]


def _drain(fifo, got: list[bytes], stop: threading.Event) -> None:
    """A FIFO's reader, holding it open throughout (read and write, as Linux allows: no end
    of file between two writers, CSVLogger opening it for each row, so no reopening between
    them to race with), reading what they write until ``stop`` and nothing is left."""
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        while True:
            if select.select([fd], [], [], 0.05)[0]:
                got.append(os.read(fd, 1 << 16))
            elif stop.is_set():
                return
    finally:
        os.close(fd)


def test_a_pipe_or_a_device_is_written_in_place_and_never_replaced(tmp_path):
    """A CSVLogger (like tee, Keras' CSVLogger and torch.save) writes into a FIFO, a pipe named
    by /dev/fd/N (which realpath makes '/proc/<pid>/fd/pipe:[n]', no path: it was refused as
    "cannot write in '/proc/<pid>/fd'", and so was /dev/stdout where the output is a pipe) and
    /dev/null, in place; a model file, written anew and renamed over the old one, is refused
    such a path for what it is, and the pipe or device stays."""
    model = xpcnn.Sequential([xpcnn.layers.Dense(2)], input_shape=(3,), seed=0)
    model.compile(optimizer="sgd")
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    stop = threading.Event()
    reader = threading.Thread(target=_drain, args=(fifo, got, stop), daemon=True)
    reader.start()
    r, w = os.pipe()
    try:
        for path in (f"/dev/fd/{w}", str(fifo), os.devnull):
            model.fit(x, y, epochs=2, verbose=0, callbacks=[CSVLogger(path)])
            with pytest.raises(InputError, match=re.escape(
                    f"the model file {path!r} exists and is not a regular file (a device or a "
                    "pipe)")):
                model.save(path)
            with pytest.raises(FileExistsError, match="is not a regular file: not replaced"), \
                    atomic_file(path):
                pass
        os.close(w)
        with os.fdopen(r, "rb") as f:
            piped = f.read()
    finally:
        stop.set()
        reader.join(timeout=30)
    for text in (piped.decode(), b"".join(got).decode()):
        rows = list(csv.reader(text.splitlines()))
        assert rows[0] == ["epoch", "accuracy", "loss", "seconds"], text
        assert [row[0] for row in rows[1:]] == ["0", "1"], text
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]  # (no temporary left beside it)
