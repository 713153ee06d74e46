"""Paths of the files xpcnn writes: long legal names (the hidden temporary file of an atomic
write must fit the file system's NAME_MAX too) and odd paths (a last ``.`` or ``..``, a ``..``
after a folder that does not exist), which are resolved as the OS resolves them, never as
text."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import xpcnn
from xpcnn import checks, files
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import Dense, Flatten


def tiny_model() -> xpcnn.Sequential:
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1), seed=0)
    model.compile(loss="cross_entropy", optimizer="sgd")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(32, 2, 2, 1)).astype(np.float32)
    return x, np.arange(32) % 3


def longest_name(folder: os.PathLike[str], ext: str = ".npz") -> str:
    """The longest legal file name in ``folder`` (NAME_MAX bytes)."""
    return "m" * (os.pathconf(folder, "PC_NAME_MAX") - len(ext)) + ext


def names_in(folder: os.PathLike[str]) -> list[str]:
    return sorted(p.name for p in os.scandir(folder))


# -- long file names ---------------------------------------------------------------------------


@pytest.mark.parametrize("spare", [0, 1, 17, 18])  # (17: the first that failed)
def test_a_long_legal_file_name_is_saved_exported_and_checkpointed(tmp_path, spare):
    """A name of 238-255 bytes could not be written: its temporary ``.<name>.<12 hex>.tmp`` is
    18 bytes longer than the name, past NAME_MAX (a bare OSError naming the temporary), and
    fit's checkpoint failed only after its first epoch."""
    pytest.importorskip("onnx")
    name = longest_name(tmp_path)[spare:]
    path = tmp_path / name
    model = tiny_model()
    x, y = data()
    model.save(path)
    for a, b in zip(xpcnn.load_model(path).get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.save_weights(path)
    model.load_weights(path)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, checkpoint=str(path))
    assert model.optimizer.iterations == 8
    model.export(tmp_path / (name[:-4] + "onnx"))
    assert names_in(tmp_path) == sorted([name, name[:-4] + "onnx"])  # (no temporary left)


@pytest.mark.parametrize("suffix", [".tmp", ".part"])
def test_every_legal_name_has_a_temporary_that_fits_and_is_recognisable(tmp_path, suffix):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for name in ["m.npz", "m" * (limit - 20) + ".npz", longest_name(tmp_path),
                 "é" * ((limit - 4) // 2) + ".npz", "ab€" * ((limit - 4) // 5) + ".npz"]:
        assert len(os.fsencode(name)) <= limit
        fd, tmp = files._new_temporary(str(tmp_path), name, suffix)
        os.close(fd)
        base = os.path.basename(tmp)
        assert os.path.dirname(tmp) == str(tmp_path) and len(os.fsencode(base)) <= limit
        match = re.fullmatch(r"\.(.*?)(~[0-9a-f]{8})?\.[0-9a-f]{12}" + re.escape(suffix), base)
        assert match and name.startswith(match[1])
        assert len(os.fsencode(match[1])) > min(len(os.fsencode(name)), limit) - 40
        assert bool(match[2]) == (name != match[1])  # (a hash only where shortened)
        files.remove_leftovers(tmp_path / name, suffix)
        assert names_in(tmp_path) == []


def test_leftovers_of_a_long_name_are_removed_and_nothing_else(tmp_path):
    """Only a killed writer's temporary of that very path goes: not a user's file that looks
    alike, nor the temporary of another long name that begins the same."""
    name = longest_name(tmp_path)
    other = name[:-5] + "n.npz"  # (the same beginning, another file)
    leftovers = []
    for target in (name, other):
        fd, tmp = files._new_temporary(str(tmp_path), target, ".tmp")
        os.close(fd)
        leftovers.append(os.path.basename(tmp))
    stem = leftovers[0][:-len(".0123456789ab.tmp")]
    users = [name, other, f"{stem}.backup.tmp", f"{stem[:-3]}.0123456789ab.tmp",
             f"{stem[:-1]}x.0123456789ab.tmp", f"{stem}.0123456789AB.tmp", ".m.npz.0123.tmp",
             f"{stem}.0123456789a.tmp"]
    for user in users:
        (tmp_path / user).write_bytes(b"mine")
    files.remove_leftovers(tmp_path / name)
    assert names_in(tmp_path) == sorted(users + leftovers[1:])
    files.remove_leftovers(tmp_path / other)
    assert names_in(tmp_path) == sorted(users)


def test_leftovers_are_removed_beside_a_links_target(tmp_path):
    """Written through a symbolic link, a file's temporaries are made beside its target (the
    rename must replace the target): the leftovers of killed writers are looked for there too
    (was: beside the link, so never found)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link.npz").symlink_to(tmp_path / "real" / "run.npz")
    fd, tmp = files._new_temporary(str(tmp_path / "real"), "run.npz", ".tmp")
    os.close(fd)
    files.remove_leftovers(tmp_path / "link.npz")
    assert not os.path.exists(tmp) and names_in(tmp_path / "real") == []


def test_a_name_longer_than_the_file_system_takes_is_refused_before_any_work(tmp_path):
    """Named as too long, by checks.output_file (fit's checkpoint: before the first step), by
    the writers before they write, never at the rename after the work."""
    name = "m" + longest_name(tmp_path)
    model = tiny_model()
    x, y = data()
    for path in (tmp_path / name, tmp_path / ("d" * 300) / "m.npz"):
        with pytest.raises(InputError, match=r"is \d+ bytes long; the file system of .* takes "
                                             r"names of at most \d+ bytes"):
            model.fit(x, y, epochs=1, verbose=0, checkpoint=str(path))
        assert model.optimizer.iterations == 0
        for write in (model.save, model.save_weights):
            with pytest.raises(InputError, match=r"at most \d+ bytes"):
                write(path)
    with pytest.raises(OSError, match=r"at most \d+ bytes"), files.atomic_file(tmp_path / name):
        pytest.fail("the block ran")
    assert names_in(tmp_path) == []


def test_output_file_tries_the_writers_own_temporary_first(tmp_path, monkeypatch):
    """The up-front check creates (and removes) the temporary file that the writer makes, as
    it names it, so that a name that cannot be written fails there, not after the work."""
    made = []
    temporary = files._create_temporary  # (the writers' _new_temporary makes its file there)
    monkeypatch.setattr(files, "_create_temporary",
                        lambda *args: made.append(args) or temporary(*args))
    name = longest_name(tmp_path)
    assert checks.output_file(str(tmp_path / "new" / name), "the file") \
        == str(tmp_path / "new" / name)
    assert made == [(str(tmp_path), name, ".tmp")] and names_in(tmp_path) == []

    def refused(folder: str, name: str, suffix: str) -> tuple[int, str]:
        raise OSError(36, "File name too long", os.path.join(folder, "." + name))

    monkeypatch.setattr(files, "_create_temporary", refused)
    model = tiny_model()
    x, y = data()
    with pytest.raises(InputError, match=r"cannot write the checkpoint .* File name too long"):
        model.fit(x, y, epochs=1, verbose=0, checkpoint=str(tmp_path / "run.npz"))
    assert model.optimizer.iterations == 0


# -- odd paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("end", [".", ".."])
def test_a_last_dot_or_dotdot_names_a_folder(tmp_path, monkeypatch, end):
    """``save("m.npz/.")``, which open() refuses, wrote m.npz (realpath drops the "."); and
    ``save("runs/..")`` wrote a file in the place of a folder's name: refused as a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.npz").write_bytes(b"keep")
    (tmp_path / "runs").mkdir()
    model = tiny_model()
    for path in (f"m.npz/{end}", f"runs/{end}", f"new.npz/{end}", end):
        assert files.names_a_folder(path)
        for write in (model.save, model.save_weights):
            with pytest.raises(InputError, match=rf"ends in '{re.escape(end)}', so it names a "
                                                 "folder"):
                write(path)
        with pytest.raises(IsADirectoryError, match="names a folder"), files.atomic_file(path):
            pytest.fail("the block ran")
    assert not files.names_a_folder("m.npz") and not files.names_a_folder("a..npz")
    assert names_in(tmp_path) == ["m.npz", "runs"] and not os.listdir(tmp_path / "runs")
    assert (tmp_path / "m.npz").read_bytes() == b"keep"


def test_dotdot_is_resolved_as_the_os_resolves_it(tmp_path, monkeypatch):
    """``save("missing/../n.npz")``, which open() refuses, wrote n.npz (realpath collapses
    ".." as text): a ".." after what is not an existing folder is refused, naming it; after a
    folder it goes to its parent, after a link to a folder to the link's target's parent."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.npz").write_bytes(b"keep")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    model = tiny_model()
    for path in ("missing/../n.npz", "missing/more/../../n.npz", "file.npz/../n.npz",
                 "sub/missing/../n.npz", "dangling/../n.npz"):
        if path.startswith("dangling"):
            (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        with pytest.raises(OSError), open(path, "wb"):  # (as the OS says)
            pass
        for write in (model.save, model.save_weights):
            with pytest.raises(InputError, match=r"cannot write .* is not an existing folder"):
                write(path)
        with pytest.raises(OSError, match="is not an existing folder"), files.atomic_file(path):
            pytest.fail("the block ran")
    assert names_in(tmp_path) == ["a", "dangling", "file.npz", "link", "sub"]
    assert not os.listdir(tmp_path / "sub")
    model.save("sub/../n.npz")
    model.save("link/../n.npz")  # (the link's target's parent, as open() goes)
    assert (tmp_path / "n.npz").is_file() and (tmp_path / "a" / "n.npz").is_file()
    xpcnn.load_model("sub/../n.npz")
    xpcnn.load_model("link/../n.npz")


def test_loading_a_folder_says_it_is_a_folder(tmp_path):
    """load_model(<an existing folder>) said "no such file"."""
    model = tiny_model()
    for load in (xpcnn.load_model, model.load_weights, xpcnn.saving.load_checkpoint):
        with pytest.raises(DataFormatError, match="is a folder, not a file"):
            load(tmp_path)
        with pytest.raises(DataFormatError, match="no such file"):
            load(tmp_path / "missing.npz")


def test_a_path_starting_with_a_tilde_is_refused_unless_that_folder_exists(tmp_path,
                                                                             monkeypatch):
    """``model.save("~/models/m.npz")`` made a folder named ``~`` in the working folder (the
    writers make missing folders; Python expands no ``~``): refused naming expanduser, before
    any work. A folder of that name that exists is the user's: written there."""
    from xpcnn.callbacks import CSVLogger

    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    x, y = data()
    message = (r"starts with '~', which xpcnn does not expand .*: a folder of that name would be "
               r"made here; give os.path.expanduser\('~/models/m")
    for write in (lambda: model.save("~/models/m.npz"),
                  lambda: model.fit(x, y, epochs=1, verbose=0, checkpoint="~/models/m.ckpt"),
                  lambda: model.fit(x, y, epochs=1, verbose=0,
                                    callbacks=[CSVLogger("~/models/m.csv")])):
        with pytest.raises(InputError, match=message):
            write()
    assert not os.listdir(tmp_path)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[CSVLogger("~log.csv")])  # (a file's name:
    model.save("~m.npz")  # review R4)
    assert sorted(os.listdir(tmp_path)) == ["~log.csv", "~m.npz"]
    os.mkdir("~")
    model.save("~/models/m.npz")
    assert os.path.isfile(tmp_path / "~" / "models" / "m.npz")
