"""What a Keras or PyTorch user gets wrong through the Python API: each is a clear xpcnn error
naming what was wrong and what was expected, raised before any work (no bare traceback from
deep inside, no silent wrong result, no lost work)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xpcnn
from xpcnn import optim
from xpcnn.callbacks import BackupAndRestore, CSVLogger, ModelCheckpoint
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Flatten, ReLU, Rescaling, Softmax

X = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
Y = np.arange(20) % 4


def net():
    return [Rescaling(1 / 255), Conv2D(3, 3), ReLU(), Flatten(), Dense(4), Softmax()]


@pytest.fixture
def model():
    m = xpcnn.Sequential(net(), seed=0)
    m.compile(optimizer=optim.SGD(0.01))
    m.build((6, 6, 3))
    return m


# -- files written during or after training: checked before the first step ---------------------

def unwritable(folder):
    """A path whose folder cannot be made: a regular file stands where it would be."""
    with open(os.path.join(folder, "file"), "w"):
        pass
    return os.path.join(folder, "file", "m.npz")


WRITES = {
    "fit checkpoint a folder": (
        lambda m, d: m.fit(X, Y, checkpoint=d, verbose=0), "the checkpoint '{d}' is a folder"),
    "fit checkpoint unwritable": (
        lambda m, d: m.fit(X, Y, checkpoint=unwritable(d), verbose=0),
        "cannot write the checkpoint '{d}/file/m.npz' in '{d}/file': .*not a folder"),
    "BackupAndRestore a folder": (
        lambda m, d: m.fit(X, Y, callbacks=[BackupAndRestore(d, resume=True)], verbose=0),
        "the checkpoint '{d}' is a folder"),
    "ModelCheckpoint a folder": (
        lambda m, d: m.fit(X, Y, callbacks=[ModelCheckpoint(str(d))], verbose=0),
        "the ModelCheckpoint file '{d}' is a folder; give the path of a file"),
    "ModelCheckpoint unwritable": (
        lambda m, d: m.fit(X, Y, callbacks=[ModelCheckpoint(unwritable(d))], verbose=0),
        "cannot write the ModelCheckpoint file '{d}/file/m.npz'"),
    "ModelCheckpoint None": (lambda m, d: ModelCheckpoint(None),
                             "ModelCheckpoint filepath must be a file path, got None"),
    "CSVLogger a folder": (lambda m, d: m.fit(X, Y, callbacks=[CSVLogger(d)], verbose=0),
                           "the CSVLogger file '{d}' is a folder"),
    "save to a folder": (lambda m, d: m.save(d), "the model file '{d}' is a folder"),
    "save unwritable": (lambda m, d: m.save(unwritable(d)),
                        "cannot write the model file '{d}/file/m.npz'"),
    "save to None": (lambda m, d: m.save(None), "the model file must be a file path, got None"),
    "load_model None": (lambda m, d: xpcnn.load_model(None),
                        "the model file must be a file path, got None"),
    "load_weights an int": (lambda m, d: m.load_weights(3),
                            "the model file must be a file path, got 3"),
}


@pytest.mark.parametrize("case", sorted(WRITES))
def test_a_path_that_cannot_be_written_is_refused_before_training(model, tmp_path, case):
    call, message = WRITES[case]
    with pytest.raises(InputError, match=message.format(d=tmp_path)):
        call(model, str(tmp_path))
    assert model.optimizer.iterations == 0  # not a single step lost
    assert set(os.listdir(tmp_path)) <= {"file"}  # nothing written


def test_missing_folders_are_still_created(model, tmp_path):
    path = tmp_path / "runs" / "a" / "ckpt.npz"
    model.fit(X, Y, epochs=1, checkpoint=path, callbacks=[
        CSVLogger(tmp_path / "logs" / "log.csv")], verbose=0)
    model.save(tmp_path / "models" / "m.npz")
    assert path.is_file() and (tmp_path / "logs" / "log.csv").is_file()
    assert (tmp_path / "models" / "m.npz").is_file()
