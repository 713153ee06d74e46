"""Resuming runs with callbacks: their states in the checkpoint, ModelCheckpoint's files, the
checks of a resumed run's data; batch logs as dicts or lazy (Keras 3's async-safe rule);
evaluate's and predict's callback params; accuracy logged as ``acc``."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import numpy as np
import pytest
from nets import random_layers_net, tiny_images

import xpcnn
from xpcnn.callbacks import (
    BackupAndRestore,
    Callback,
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
)
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import Dense, Flatten, Rescaling, Softmax
from xpcnn.saving.npz import NpzArchive

FIT = {"epochs": 8, "batch_size": 8, "verbose": 0}  # 60 samples: 8 steps an epoch


@pytest.fixture(scope="module")
def data():
    x, y = tiny_images(60)
    xv, yv = tiny_images(20)
    # (validation unlike the training data: its loss falls, then rises, and training stops)
    return x, y, (xv[::-1].copy(), (yv * 7 + 3) % 10)


def make_model():
    model = xpcnn.Sequential(random_layers_net(), seed=3)
    model.compile(optimizer=xpcnn.optim.Adam(3e-2))
    return model


def watchers():
    return [EarlyStopping(patience=2, restore_best_weights=True),
            ReduceLROnPlateau(factor=0.5, patience=1)]


class InterruptAfter(Callback):
    """Raises KeyboardInterrupt after ``steps`` training steps, as a crash would."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        self.steps -= 1
        if not self.steps:
            raise KeyboardInterrupt


def state(model, callbacks=()):
    """Everything a resumed run must end with as an uninterrupted one does."""
    opt = model.optimizer
    history = {k: v for k, v in model.history.history.items() if k != "seconds"}
    kept = [(type(cb).__name__, {k: v for k, v in vars(cb).items()
                                 if k in ("best", "wait", "cooling", "best_epoch",
                                          "stopped_epoch", "best_weights", "batches")})
            for cb in callbacks]
    return {"weights": model.get_weights(), "iterations": opt.iterations,
            "lr_factor": opt.lr_factor, "history": (model.history.epoch, history),
            "slots": {k: [model.backend.to_numpy(a) for a in v] for k, v in opt.slots.items()},
            "callbacks": kept}


def assert_same(a, b):
    """Equal, bit for bit, arrays included (at any depth)."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same(u, v)
    else:
        assert a == b


# -- 1. callbacks' states in the checkpoint ---------------------------------------------------


@pytest.mark.parametrize("steps", [36, 44], ids=["inside an epoch", "later, at another step"])
def test_early_stopping_and_reduce_lr_resume_bit_for_bit(data, tmp_path, steps):
    x, y, val = data
    reference_callbacks = watchers()
    reference = make_model()
    reference.fit(x, y, validation_data=val, callbacks=reference_callbacks, **FIT)
    assert reference_callbacks[0].stopped_epoch  # (it stops early, after an improvement)
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        make_model().fit(x, y, validation_data=val, checkpoint=path, checkpoint_every=3,
                         callbacks=[*watchers(), InterruptAfter(steps)], **FIT)
    callbacks = watchers()
    model = make_model()
    model.fit(x, y, validation_data=val, checkpoint=path, checkpoint_every=3, resume=True,
              callbacks=callbacks, **FIT)
    assert_same(state(model, callbacks), state(reference, reference_callbacks))


def test_a_finished_run_resumed_trains_nothing_and_ends_with_the_best_weights(data, tmp_path):
    x, y, val = data
    path, fits = tmp_path / "run.npz", []
    for _ in range(2):
        stopping = EarlyStopping(patience=10, restore_best_weights=True)
        model = make_model()
        model.fit(x, y, validation_data=val, checkpoint=path, resume=True,
                  callbacks=[stopping], **{**FIT, "epochs": 6})
        fits.append(state(model, [stopping]))
    assert fits[0]["callbacks"][0][1]["best_epoch"] < 5  # (the best weights are not the last)
    assert_same(fits[1], fits[0])


def test_a_run_that_stopped_early_trains_no_more_when_resumed(data, tmp_path):
    x, y, val = data
    path = tmp_path / "run.npz"
    first = make_model()
    first.fit(x, y, validation_data=val, checkpoint=path, callbacks=watchers(), **FIT)
    assert len(first.history.epoch) < FIT["epochs"]
    again = make_model()
    again.fit(x, y, validation_data=val, checkpoint=path, resume=True, callbacks=watchers(),
              **FIT)
    assert_same(state(again), state(first))
    # Without the callbacks that stopped it (they start afresh), the run goes on (was: it
    # trained nothing, while the warning said they started afresh).
    on = make_model()
    with pytest.warns(RuntimeWarning, match="start afresh"):
        on.fit(x, y, validation_data=val, checkpoint=path, resume=True, **FIT)
    assert len(on.history.epoch) == FIT["epochs"]
    assert on.optimizer.iterations > first.optimizer.iterations


def test_callbacks_kept_under_another_monitor_start_afresh_with_a_warning(data, tmp_path):
    """A state is restored only into a callback watching the same monitor in the same mode
    (was: EarlyStopping("val_accuracy") took the best val_loss as its best accuracy, which
    nothing then beat); that callback alone starts afresh, the others go on (a ModelCheckpoint
    that saves every epoch watches nothing: its monitor may differ)."""
    x, y, val = data
    path = tmp_path / "run.npz"
    first = [EarlyStopping("val_loss", patience=9), ReduceLROnPlateau(patience=9),
             ModelCheckpoint(tmp_path / "m.npz")]
    make_model().fit(x, y, validation_data=val, checkpoint=path, callbacks=first,
                     **{**FIT, "epochs": 2})
    accuracy, plateau = EarlyStopping("val_accuracy", patience=9), ReduceLROnPlateau(patience=9)
    restored = []
    with pytest.warns(RuntimeWarning, match=r"kept under other settings for \['EarlyStopping'\] "
                                            r"\(another monitor or mode\): it starts afresh, "
                                            "the others go on from the file") as warned:
        make_model().fit(x, y, validation_data=val, checkpoint=path, resume=True, callbacks=[
            accuracy, plateau, ModelCheckpoint(tmp_path / "n.npz", monitor="loss"),
            LambdaCallback(on_epoch_begin=lambda epoch, logs: restored.append(
                (plateau.best, plateau.wait)))], **{**FIT, "epochs": 3})
    assert accuracy.best is not None and 0 <= accuracy.best <= 1
    assert restored[0] == (first[1].best, first[1].wait)  # (went on from the file)
    assert len(warned) == 1 and warned[0].filename == __file__  # (the user's fit call)


def test_resumed_with_other_stateful_callbacks_they_start_afresh_with_a_warning(data, tmp_path):
    x, y, val = data
    path = tmp_path / "run.npz"
    make_model().fit(x, y, validation_data=val, checkpoint=path, callbacks=watchers(),
                     **{**FIT, "epochs": 2})
    stopping = EarlyStopping(patience=2)
    with pytest.warns(RuntimeWarning, match=r"\['EarlyStopping', 'ReduceLROnPlateau'\], and "
                      r"this run's callbacks that keep one are \['EarlyStopping'\]: they start "
                      "afresh"):
        make_model().fit(x, y, validation_data=val, checkpoint=path, resume=True,
                         callbacks=[stopping], **{**FIT, "epochs": 3})
    assert stopping.best_epoch == 2  # (its first epoch: afresh)


class Counter(Callback):
    """A user's callback that keeps a state (epochs seen, and an array) by the protocol."""

    def __init__(self):
        super().__init__()
        self.epochs, self.total = 0, [np.zeros(3)]

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1
        self.total = [self.total[0] + logs["loss"]]

    def get_state(self):
        return {"epochs": self.epochs, "total": self.total}

    def set_state(self, state):
        self.epochs, self.total = state["epochs"], state["total"]


def test_best_weights_and_a_users_state_are_arrays_of_the_npz(data, tmp_path):
    x, y, val = data
    path = tmp_path / "run.npz"
    model = make_model()
    model.fit(x, y, validation_data=val, checkpoint=path, callbacks=[
        EarlyStopping(patience=10, restore_best_weights=True), Counter()], **{**FIT, "epochs": 2})
    with NpzArchive(path) as npz:
        entries = set(npz.entries)
        config = npz.read_config()
    weights = len(model.get_weights())
    assert {f"callback.0.best_weights.{k}" for k in range(weights)} | {
        "callback.1.total.0"} <= entries
    assert config["callbacks"][1] == {"class": "Counter", "state": {"epochs": 2},
                                      "arrays": {"total": 1}}
    counter = Counter()
    make_model().fit(x, y, validation_data=val, checkpoint=path, resume=True, callbacks=[
        EarlyStopping(patience=10, restore_best_weights=True), counter], **{**FIT, "epochs": 3})
    assert counter.epochs == 3
    np.testing.assert_array_equal(counter.total[0], np.full(3, sum(model.history.history[
        "loss"]) + counter.model.history.history["loss"][2]))
    xpcnn.load_model(path)  # (model files' readers take the entries)
    make_model().load_weights(path)


def test_a_corrupt_callback_state_is_refused_and_leaves_the_model_as_it_was(data, tmp_path):
    x, y, val = data
    path = tmp_path / "run.npz"
    make_model().fit(x, y, validation_data=val, checkpoint=path, callbacks=watchers(),
                     **{**FIT, "epochs": 2})
    with NpzArchive(path) as npz:
        arrays = {k: npz.read(k, 1 << 20) for k in npz.entries if k != "__config__"}
        config = npz.read_config()
    config["callbacks"][0]["state"]["wait"] = -1
    from xpcnn.saving.npz import CONFIG_KEY, encode_json, write_npz_atomic
    write_npz_atomic(path, {CONFIG_KEY: encode_json(config), **arrays})
    model = make_model()
    model.fit(x, y, **{**FIT, "epochs": 1})
    before = state(model)
    with pytest.raises(xpcnn.errors.DataFormatError, match="state of callback EarlyStopping: "
                       "wait is -1"):
        model.fit(x, y, validation_data=val, checkpoint=path, resume=True,
                  callbacks=watchers(), **FIT)
    assert_same(state(model), before)


# -- 5. ModelCheckpoint's files resume -------------------------------------------------------


@pytest.mark.parametrize("save_freq, name", [("epoch", "e2.npz"), (5, "e2b7.npz"),
                                             (8, "e2b8.npz")],
                         ids=["at an epoch's end", "inside an epoch", "at its last batch"])
def test_a_model_checkpoint_file_resumes_exactly(data, tmp_path, save_freq, name):
    x, y, _ = data
    fit = {**FIT, "epochs": 3}
    reference = make_model()
    reference.fit(x, y, **fit)
    make_model().fit(x, y, callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.npz"
                                                      if save_freq == "epoch" else
                                                      tmp_path / "e{epoch}b{batch}.npz",
                                                      save_freq=save_freq)], **fit)
    model, steps = make_model(), []
    model.fit(x, y, checkpoint=tmp_path / name, resume=True, callbacks=[
        ModelCheckpoint(tmp_path / "again" / "m.npz", save_freq=save_freq),
        LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))], **fit)
    # (only those after the file; one saved after an epoch's last batch, before its end's
    # validation and callbacks, resumes there: was refused, "the training data gave no batches")
    assert len(steps) == (8 + 1 if save_freq == 5 else 8)
    assert_same(state(model), state(reference))


def test_a_model_checkpoint_file_inside_an_epoch_resumes_with_epoch_callbacks_after_it(
        data, tmp_path):
    """Callbacks after the ModelCheckpoint that change their state only at an epoch's end
    (EarlyStopping, ReduceLROnPlateau) are in a known state inside an epoch: its files
    resume, exactly (was refused, "written by a ModelCheckpoint before EarlyStopping")."""
    x, y, val = data
    fit = {**FIT, "validation_data": val}

    def callbacks(name):
        return [ModelCheckpoint(tmp_path / name, save_freq=5), *watchers()]

    reference_callbacks = callbacks("r{epoch}b{batch}.npz")
    reference = make_model()
    reference.fit(x, y, callbacks=reference_callbacks, **fit)
    assert reference_callbacks[1].stopped_epoch  # (EarlyStopping's state decides the run)
    assert (tmp_path / "r3b4.npz").exists()  # (after 20 steps: 4 into epoch 3)
    resumed_callbacks = callbacks("again.npz")
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no callback starts afresh)
        model.fit(x, y, checkpoint=tmp_path / "r3b4.npz", resume=True,
                  callbacks=resumed_callbacks, **fit)
    assert_same(state(model, resumed_callbacks[1:]), state(reference, reference_callbacks[1:]))


class AddsMetric(Callback):
    """A user's metric, added to the epoch logs in on_epoch_end, as Keras users add one."""

    def on_epoch_end(self, epoch, logs=None):
        logs["my_metric"] = float(epoch) / 3


def test_a_model_checkpoint_file_holds_what_the_callbacks_after_it_log_and_keep(data, tmp_path):
    """ModelCheckpoint's whole checkpoint at an epoch's end is written once every callback's
    on_epoch_end has run (was: part-way through, so the logs and states of those after it
    were lost, the History of a run resumed from it had gaps, and a stateful one after it
    had the file refused): resumed, the run ends as the uninterrupted one, bit for bit."""
    x, y, val = data
    fit = {**FIT, "epochs": 4}

    def callbacks(name):
        return [ModelCheckpoint(tmp_path / (name + "-{epoch}.npz")), *watchers(),
                LearningRateScheduler(lambda e, lr: lr * 0.9), AddsMetric(),
                CSVLogger(tmp_path / (name + ".csv"))]

    reference, reference_callbacks = make_model(), callbacks("a")
    reference.fit(x, y, validation_data=val, callbacks=reference_callbacks, **fit)
    model, resumed_callbacks = make_model(), callbacks("b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no callback starts afresh)
        model.fit(x, y, validation_data=val, checkpoint=tmp_path / "a-2.npz", resume=True,
                  callbacks=resumed_callbacks, **fit)
    assert {"learning_rate", "my_metric"} <= set(model.history.history)
    assert_same(state(model, resumed_callbacks[1:3]),
                state(reference, reference_callbacks[1:3]))
    rows = [r.split(",")[1:] for r in (tmp_path / "b.csv").read_text().splitlines()]
    assert not any("NA" in r for r in rows)  # (the restored epochs have every column)


class CountsBatches(Callback):
    """A stateful callback with a batch hook of its own."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def get_state(self):
        return {"batches": self.batches}

    def set_state(self, state):
        self.batches = state["batches"]


def test_a_batch_level_model_checkpoint_before_a_later_stateful_callback_is_refused(data,
                                                                                    tmp_path):
    """Inside an epoch (save_freq=N) the state of a stateful callback after the ModelCheckpoint
    that has a batch hook of its own is not known yet: resuming that file is refused."""
    x, y, val = data
    make_model().fit(x, y, validation_data=val, callbacks=[
        ModelCheckpoint(tmp_path / "m.npz", save_freq=3), CountsBatches()],
        **{**FIT, "epochs": 1})
    model = make_model()
    with pytest.raises(InputError, match="written by a ModelCheckpoint before CountsBatches"):
        model.fit(x, y, validation_data=val, checkpoint=tmp_path / "m.npz", resume=True,
                  callbacks=[ModelCheckpoint(tmp_path / "n.npz", save_freq=3),
                             CountsBatches()], **FIT)
    assert not model.built


class CountsEpochs(Callback):
    """A stateful callback with an on_epoch_end of its own."""

    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1

    def get_state(self):
        return {"epochs": self.epochs}

    def set_state(self, state):
        self.epochs = state["epochs"]


class FailsAtEpoch(Callback):
    def __init__(self, epoch, error):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise self.error("user callback failed")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_model_checkpoint_file_is_written_when_a_later_callback_raises(data, tmp_path, error):
    """A callback after the ModelCheckpoint that raises in on_epoch_end (a logger whose disk
    fails, a Ctrl-C) does not lose the epoch's file, which Keras writes in ModelCheckpoint's
    own hook (was: the save put off until every callback had run was dropped); those that
    ran before the error are in it, and a resume of it is refused where a stateful one from
    the failing one on had not run (its state unknown), taken where none had."""
    x, y, val = data
    fit = {**FIT, "epochs": 3, "validation_data": val}
    with pytest.raises(error, match="user callback failed"):
        make_model().fit(x, y, callbacks=[ModelCheckpoint(tmp_path / "m-{epoch}.npz"),
                                          *watchers(), FailsAtEpoch(1, error), CountsEpochs()],
                         **fit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.npz", "m-2.npz"]
    ckpt = xpcnn.load_checkpoint(tmp_path / "m-2.npz")
    assert ckpt.epoch == 2 and len(ckpt.history.history["loss"]) == 2
    model = make_model()
    with pytest.raises(InputError, match=r"written by a ModelCheckpoint before CountsEpochs "
                                         r"\(after"):
        model.fit(x, y, checkpoint=tmp_path / "m-2.npz", resume=True, callbacks=[
            ModelCheckpoint(tmp_path / "n.npz"), *watchers(), CountsEpochs()], **fit)
    assert not model.built
    # (EarlyStopping and ReduceLROnPlateau ran before the error: their states are in the file)
    counted = CountsEpochs()
    make_model().fit(x, y, checkpoint=tmp_path / "m-1.npz", resume=True, callbacks=[
        ModelCheckpoint(tmp_path / "n.npz"), *watchers(), counted], **fit)
    assert counted.epochs == 3
    reference_callbacks, resumed_callbacks = watchers(), watchers()
    reference = make_model()
    reference.fit(x, y, callbacks=[ModelCheckpoint(tmp_path / "r.npz"), *reference_callbacks],
                  **fit)
    with pytest.raises(error):
        make_model().fit(x, y, callbacks=[ModelCheckpoint(tmp_path / "s.npz"), *watchers(),
                                          FailsAtEpoch(1, error)], **fit)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no callback starts afresh)
        model.fit(x, y, checkpoint=tmp_path / "s.npz", resume=True,
                  callbacks=[ModelCheckpoint(tmp_path / "t.npz"), *resumed_callbacks], **fit)
    assert_same(state(model, resumed_callbacks), state(reference, reference_callbacks))


def test_a_model_checkpoint_save_that_fails_after_a_later_callbacks_error_keeps_that_error(
        data, tmp_path):
    """The save put off, written after a later callback's error, that fails in turn (its path
    names a log that callback would have added) leaves the first error the one raised, with
    the save's failure as a note."""
    x, y, _ = data

    class AddsLate(Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed") as e:
        make_model().fit(x, y, callbacks=[ModelCheckpoint(tmp_path / "m-{my_metric}.npz"),
                                          AddsLate()], **{**FIT, "epochs": 1})
    (note,) = e.value.__notes__
    assert note.startswith("the ModelCheckpoint save of epoch 1 put off until after this error "
                           "failed too: InputError: ModelCheckpoint path") and "my_metric" in note
    assert not list(tmp_path.iterdir())


class UploadingCheckpoint(ModelCheckpoint):
    """Uses its file right after super().on_epoch_end(), as W&B's WandbModelCheckpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.seen.append(xpcnn.load_checkpoint(self.filepath).epoch
                         if os.path.exists(self.filepath) else None)


def test_a_model_checkpoint_subclass_finds_the_epochs_file_right_after_super(data, tmp_path):
    """A subclass with an on_epoch_end of its own that uses the file right after
    super().on_epoch_end() finds that epoch's (was: none at the first epoch, then the
    previous epoch's, the save being put off until every callback had run); the file then
    resumes under the rule of one written before the callbacks after it ran: refused where a
    stateful one with an on_epoch_end of its own comes after it, exact where none does."""
    x, y, val = data
    fit = {**FIT, "epochs": 3, "validation_data": val}
    alone = UploadingCheckpoint(str(tmp_path / "alone.npz"))
    reference_callbacks = watchers()
    reference = make_model()
    reference.fit(x, y, callbacks=[*reference_callbacks, alone], **fit)
    assert alone.seen == [1, 2, 3]
    first = UploadingCheckpoint(str(tmp_path / "first.npz"))
    make_model().fit(x, y, callbacks=[first, *watchers()], **{**fit, "epochs": 2})
    assert first.seen == [1, 2]
    with pytest.raises(InputError, match="written by a ModelCheckpoint before EarlyStopping, "
                                         "ReduceLROnPlateau"):
        make_model().fit(x, y, checkpoint=tmp_path / "first.npz", resume=True,
                         callbacks=[UploadingCheckpoint(str(tmp_path / "n.npz")), *watchers()],
                         **fit)
    last = UploadingCheckpoint(str(tmp_path / "last.npz"))
    make_model().fit(x, y, callbacks=[*watchers(), last], **{**fit, "epochs": 2})
    resumed_callbacks = watchers()
    model, again = make_model(), UploadingCheckpoint(str(tmp_path / "again.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no callback starts afresh)
        model.fit(x, y, checkpoint=tmp_path / "last.npz", resume=True,
                  callbacks=[*resumed_callbacks, again], **fit)
    assert again.seen == [3]
    assert_same(state(model, resumed_callbacks), state(reference, reference_callbacks))


class SmoothedLoss(Callback):
    """An exponential average of the loss in float32 (its state), logged each epoch."""

    def __init__(self):
        super().__init__()
        self.ema = np.float32(0)

    def on_epoch_end(self, epoch, logs=None):
        self.ema = self.ema * 0.9 + 0.1 * logs["loss"]  # (float32 arithmetic)
        logs["ema"] = self.ema

    def get_state(self):
        return {"ema": self.ema, "seen": [np.float32(self.ema), {"n": np.int64(1)}]}

    def set_state(self, state):
        self.ema = state["ema"]


def test_a_float32_callback_state_resumes_bit_for_bit(data, tmp_path):
    """A NumPy float32 in a callback's state comes back a float32 (was: a Python float, so
    the resumed run computed in float64, and its logs differed from the uninterrupted
    run's); files written before, whose JSON holds the number alone, still load (as the
    Python number), and a corrupt place for one is refused."""
    from test_checkpoint import _rewrite

    x, y, _ = data
    fit = {**FIT, "epochs": 4}
    reference = make_model()
    reference.fit(x, y, callbacks=[SmoothedLoss()], **fit)
    path = tmp_path / "run.npz"

    class StopAt(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_model().fit(x, y, callbacks=[SmoothedLoss(), StopAt()], checkpoint=path, **fit)
    older, corrupt = tmp_path / "older.npz", tmp_path / "corrupt.npz"
    older.write_bytes(path.read_bytes())
    corrupt.write_bytes(path.read_bytes())
    resumed = SmoothedLoss()
    model = make_model()
    model.fit(x, y, callbacks=[resumed], checkpoint=path, resume=True, **fit)
    assert type(resumed.ema) is np.float32
    assert model.history.history["ema"] == reference.history.history["ema"]
    assert model.history.history["loss"] == reference.history.history["loss"]

    def without_scalars(config):
        (entry,) = config["callbacks"]
        assert [place for place, _ in entry.pop("scalars")] == [["ema"], ["seen", 0],
                                                                 ["seen", 1, "n"]]

    def drop_entries(arrays):
        for name in [k for k in arrays if ".0scalar." in k]:
            del arrays[name]

    _rewrite(older, without_scalars, drop_entries)
    resumed = SmoothedLoss()
    make_model().fit(x, y, callbacks=[resumed], checkpoint=older, resume=True, **fit)
    assert type(resumed.ema) is float  # (a Python float, as such files gave)
    for place in (["seen", 5], ["nowhere"], [], ["seen"], "ema"):
        _rewrite(corrupt, lambda config, place=place: config["callbacks"][0]["scalars"][0]
                 .__setitem__(0, place))
        with pytest.raises(xpcnn.errors.DataFormatError, match="bad callbacks entry"):
            make_model().fit(x, y, callbacks=[SmoothedLoss()], checkpoint=corrupt, resume=True,
                             **fit)


def test_a_resume_refusal_names_what_differs(tmp_path):
    """A schedule as long as the run (as ``xpcnn train`` makes it) changes with the batch size:
    the batch size is named, not the compile settings."""
    x, y = tiny_images(60)

    def model(batch_size):
        m = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(10), Softmax()], seed=0)
        m.compile(optimizer=xpcnn.optim.Adam(xpcnn.optim.CosineDecay(
            1e-2, 2 * -(-60 // batch_size))))
        return m

    model(8).fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    with pytest.raises(InputError, match="batch_size is 8 there and 16 here") as e:
        model(16).fit(x, y, epochs=2, batch_size=16, verbose=0, checkpoint=tmp_path / "c.npz",
                      resume=True)
    assert "--epochs" not in str(e.value)


# -- 6. one BackupAndRestore -------------------------------------------------------------------


def test_two_backup_and_restores_are_refused_before_either_restores(data, tmp_path):
    x, y, _ = data
    for name in ("a.npz", "b.npz"):
        make_model().fit(x, y, checkpoint=tmp_path / name, **{**FIT, "epochs": 1})
    model = make_model()
    model.fit(x, y, **{**FIT, "epochs": 2})
    before = state(model)
    with pytest.raises(InputError, match="fit takes one BackupAndRestore"):
        model.fit(x, y, checkpoint=tmp_path / "b.npz", resume=True,
                  callbacks=[BackupAndRestore(tmp_path / "a.npz")], **FIT)
    assert_same(state(model), before)


# -- 3. a map-style dataset's random transforms ---------------------------------------------


class Items:
    def __init__(self, x, y, w=None):
        self.x, self.y, self.w = x, y, w

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = self.x[i], self.y[i]
        return item if self.w is None else (*item, self.w[i])


class Flipped(Items):
    """A dataset that draws a random flip in ``[i]``, from NumPy's global random state, as
    torchvision-style transforms do."""

    reads = 0

    def __getitem__(self, i):
        Flipped.reads += 1
        x, y = self.x[i], self.y[i]
        return (x[:, ::-1] if np.random.random() < 0.5 else x), y


def test_a_dataset_with_random_transforms_resumes_and_is_not_read_for_its_fingerprint(
        data, tmp_path):
    """A checkpoint reads no item of a map-style dataset (a fingerprint of 16 items drew from
    its transforms' random state, so the run's draws changed and the resume was refused as
    "other data"): the items a run with a checkpoint reads are those of a run without one."""
    x, y, _ = data
    fit = {**FIT, "epochs": 2}
    np.random.seed(0)
    plain = make_model()
    plain.fit(Flipped(x, y), **fit)
    reads, Flipped.reads = Flipped.reads, 0
    np.random.seed(0)
    checkpointed = make_model()
    checkpointed.fit(Flipped(x, y), checkpoint=tmp_path / "c.npz", **fit)
    assert Flipped.reads == reads
    assert_same(state(checkpointed), state(plain))
    np.random.seed(0)
    first = make_model()
    first.fit(Flipped(x, y), checkpoint=tmp_path / "d.npz", **{**FIT, "epochs": 1})
    resumed = make_model()
    resumed.fit(Flipped(x, y), checkpoint=tmp_path / "d.npz", resume=True, **fit)
    assert resumed.optimizer.iterations == plain.optimizer.iterations


# -- 2. batch logs: a dict for callbacks that are not async-safe ----------------------------


def test_a_callback_with_a_batch_hook_gets_a_dict_of_floats_each_batch(data):
    x, y, _ = data
    kept, read = [], []

    def hook(batch, logs):
        assert isinstance(logs, dict) and json.loads(json.dumps(logs)) == logs
        assert logs | {"a": 1} == {**logs.copy(), "a": 1}
        kept.append((logs, copy.copy(logs), copy.deepcopy(logs)))
        read.append(logs["loss"])

    test_kept = []
    model = make_model()
    model.fit(x, y, validation_data=(x[:16], y[:16]), validation_batch_size=8, callbacks=[
        LambdaCallback(on_train_batch_end=hook,
                       on_test_batch_end=lambda batch, logs: test_kept.append(logs))],
              **{**FIT, "epochs": 1})
    assert [[logs["loss"] for logs in copies] for copies in kept] == [[v] * 3 for v in read]
    assert len(set(read)) == 8 and all(type(v) is float for v in read)
    assert all(isinstance(logs, dict) for logs in test_kept) and len(test_kept) == 2
    assert test_kept[0]["loss"] != test_kept[1]["loss"]


def test_xpcnns_own_callbacks_and_async_safe_ones_keep_batch_logs_lazy(data, tmp_path,
                                                                      monkeypatch):
    x, y, _ = data
    reads = []
    real = xpcnn.training.Trainer._read_totals
    monkeypatch.setattr(xpcnn.training.Trainer, "_read_totals",
                        lambda self: reads.append(1) or real(self))

    class Counting(Callback):
        async_safe = True

        def on_train_batch_end(self, batch, logs=None):
            self.batches = batch + 1  # (logs not kept: a kept one is read before the next step)

    make_model().fit(x, y, callbacks=[
        EarlyStopping("loss"), ReduceLROnPlateau("loss"), ModelCheckpoint(tmp_path / "m.npz"),
        BackupAndRestore(tmp_path / "b.npz"), Counting()], **{**FIT, "epochs": 2})
    assert len(reads) <= 2 * 2  # (each epoch's end, and its checkpoint's sums: none a step)
    reads.clear()
    make_model().fit(x, y, callbacks=[LambdaCallback(on_batch_end=lambda batch, logs: None)],
                     **{**FIT, "epochs": 2})
    assert len(reads) >= 2 * 8


# -- 4. evaluate's and predict's params ------------------------------------------------------


def test_evaluate_and_predict_give_callbacks_keras_params(data):
    x, y, _ = data
    seen = {}
    spy = LambdaCallback(on_test_begin=lambda logs: seen.setdefault("test", dict(spy.params)),
                         on_predict_begin=lambda logs: seen.setdefault("predict",
                                                                       dict(spy.params)))
    model = make_model()
    model.evaluate(x, y, batch_size=16, callbacks=[spy])
    model.predict(x, batch_size=32, verbose=0, callbacks=[spy])
    assert seen == {"test": {"verbose": 0, "epochs": 1, "steps": 4},
                    "predict": {"verbose": 0, "epochs": 1, "steps": 2}}


# -- 7. accuracy logged as "acc" ---------------------------------------------------------------


def acc_model(metrics=("acc",)):
    model = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(10), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1), metrics=list(metrics))
    return model


def test_auto_mode_knows_acc(data):
    assert EarlyStopping("val_acc").mode == "max" and ReduceLROnPlateau("acc").mode == "max"
    x, y, _ = data
    with pytest.raises(InputError, match="the accuracy too, is logged under the name compile's "
                       "metrics gave it; this model logs loss, acc") as e:
        acc_model().fit(x, y, validation_data=(x[:16], y[:16]),
                        callbacks=[EarlyStopping("val_top1")], **FIT)
    assert "logged as 'accuracy'" not in str(e.value)


def test_a_val_acc_monitor_skips_the_epochs_validation_freq_skips(data):
    x, y, _ = data
    stopping = EarlyStopping("val_acc", mode="max", patience=5)
    history = acc_model().fit(x, y, validation_data=(x[:16], y[:16]), validation_freq=2,
                              callbacks=[stopping], **{**FIT, "epochs": 4})
    assert history.epochs_of("val_acc") == [1, 3] and stopping.best is not None


@pytest.mark.parametrize("compiled, monitor, hint", [
    (["accuracy"], "val_acc", "monitor 'val_accuracy'"),
    (["acc"], "accuracy", "monitor 'acc'"),
    ([], "val_acc", "compile it with metrics=['acc']")])
def test_an_accuracy_monitor_under_a_name_not_logged_is_refused_before_training(
        data, compiled, monitor, hint):
    x, y, _ = data
    model = acc_model(compiled)
    with pytest.raises(InputError, match=re.escape(hint)):
        model.fit(x, y, validation_data=(x[:16], y[:16]),
                  callbacks=[EarlyStopping(monitor, mode="max")], **FIT)
    assert model.optimizer.iterations == 0


def test_a_batch_level_model_checkpoint_monitors_acc(data, tmp_path):
    x, y, _ = data
    saver = ModelCheckpoint(tmp_path / "e{epoch}b{batch}.npz", monitor="acc",
                            save_best_only=True, save_freq=2)
    acc_model().fit(x, y, callbacks=[saver], **{**FIT, "epochs": 1})
    assert saver.best is not None and list(tmp_path.glob("e1b*.npz"))


def test_a_resume_warning_points_at_a_library_named_like_xpcnn_that_calls_fit(
        data, tmp_path, monkeypatch):
    """The warning is pointed at the first frame outside the package xpcnn: a module of
    another library whose name only starts with "xpcnn" is not xpcnn's (was skipped too)."""
    x, y, val = data
    make_model().fit(x, y, validation_data=val, checkpoint=tmp_path / "run.npz",
                     callbacks=watchers(), **{**FIT, "epochs": 1})
    helper = tmp_path / "xpcnn_helpers.py"
    helper.write_text("def resume(model, *args, **kwargs):\n"
                      "    return model.fit(*args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import xpcnn_helpers

    with pytest.warns(RuntimeWarning, match="start afresh") as warned:
        xpcnn_helpers.resume(make_model(), x, y, validation_data=val,
                             checkpoint=tmp_path / "run.npz", resume=True,
                             **{**FIT, "epochs": 2})
    assert warned[0].filename == str(helper)


class Wrapper(Callback):
    """Passes fit's calls on to a callback of its own (a user's way to switch one on and off)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        self.inner.on_epoch_end(epoch, logs)


def test_a_model_checkpoint_driven_by_hand_or_inside_another_callback_saves(data, tmp_path):
    """A ModelCheckpoint outside fit's own list (inside a wrapper, or driven by hand as Keras
    allows) writes its full files, with fit's callbacks' states where there are some (was a
    KeyError or "is not in list" at its first save, after an epoch of training)."""
    x, y, val = data
    model = make_model()
    model.fit(x, y, validation_data=val, callbacks=[
        Wrapper(ModelCheckpoint(tmp_path / "w{epoch}.npz")), *watchers()],
        **{**FIT, "epochs": 2})
    assert (tmp_path / "w2.npz").exists()
    by_hand = ModelCheckpoint(tmp_path / "h.npz")
    by_hand.set_model(model)
    by_hand.set_params({"epochs": 1, "steps": 1, "verbose": 0})
    by_hand.on_train_begin()
    by_hand.on_epoch_end(0, {"loss": 0.5})
    assert xpcnn.load_checkpoint(tmp_path / "h.npz").epoch == 1


def test_a_new_csv_log_of_a_resumed_run_holds_the_uninterrupted_runs_rows(data, tmp_path):
    """CSVLogger(append=False) in a run resumed from a checkpoint starts with the epochs its
    History got back (was: the rows of the epochs before the interruption were lost), with
    validation_freq's NA where an epoch was not validated; the seconds aside, the file is the
    uninterrupted run's."""
    import csv

    x, y, val = data
    fit = {**FIT, "epochs": 4, "validation_data": val, "validation_freq": 2}

    def rows(path):
        with open(path, newline="") as f:
            table = list(csv.reader(f))
        keep = [i for i, name in enumerate(table[0]) if name != "seconds"]
        return [[row[i] for i in keep] for row in table]

    make_model().fit(x, y, callbacks=[CSVLogger(tmp_path / "whole.csv")], **fit)
    interrupted = CSVLogger(tmp_path / "log.csv")
    with pytest.raises(KeyboardInterrupt):
        make_model().fit(x, y, checkpoint=tmp_path / "run.npz", checkpoint_every=3,
                         callbacks=[interrupted, InterruptAfter(8 * 2 + 5)], **fit)
    interrupted.on_train_end()  # (an interrupted fit calls no on_train_end: its file stays open)
    make_model().fit(x, y, checkpoint=tmp_path / "run.npz", checkpoint_every=3, resume=True,
                     callbacks=[CSVLogger(tmp_path / "log.csv")], **fit)
    assert rows(tmp_path / "log.csv") == rows(tmp_path / "whole.csv")
    assert len(rows(tmp_path / "log.csv")) == 1 + 4


class SettingsSchedule(Callback):
    """Changes Dropout's rate and BatchNorm2D's momentum at given optimiser steps (counted by
    the optimiser, which a checkpoint restores)."""

    def on_train_batch_begin(self, batch, logs=None):
        from xpcnn.layers import BatchNorm2D, Dropout

        values = {10: (0.5, 0.4), 20: (0.1, 0.3)}.get(self.model.optimizer.iterations)
        for layer in self.model.layers if values else ():
            if isinstance(layer, Dropout):
                layer.rate = values[0]
            elif isinstance(layer, BatchNorm2D):
                layer.momentum = values[1]


def test_a_run_whose_callback_changed_settings_resumes_bit_for_bit(data, tmp_path):
    """A checkpoint written after a callback changed a layer's setting (Dropout's rate,
    BatchNorm2D's momentum) could not be resumed by the same script ("holds a model of another
    architecture: ... Dropout(rate=0.5), this model's is Dropout(rate=0.25)"): the work was
    lost. The settings are not compared; the file's are restored, and the run resumed inside
    an epoch ends as the uninterrupted one, bit for bit."""
    x, y, _ = data
    reference = make_model()
    reference.fit(x, y, callbacks=[SettingsSchedule()], **FIT)
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        make_model().fit(x, y, checkpoint=path, checkpoint_every=3,
                         callbacks=[SettingsSchedule(), InterruptAfter(14)], **FIT)
    model = make_model()
    model.fit(x, y, checkpoint=path, checkpoint_every=3, resume=True,
              callbacks=[SettingsSchedule()], **FIT)
    assert_same(state(model), state(reference))
    assert [la.get_config() for la in model.layers] == \
        [la.get_config() for la in reference.layers]


def running_class(as_setting: bool) -> type:
    """A user's layer keeping a running mean at its ``momentum``, a plain attribute, or a
    :class:`~xpcnn.layers.base.Setting` where ``as_setting`` (one class, its code edited)."""
    from xpcnn.layers import Layer, Setting

    class Running(Layer):
        weight_names = ("w", "mean")
        if as_setting:
            momentum = Setting()

        def __init__(self, momentum=0.1, name=None):
            super().__init__(name)
            self.momentum = momentum

        def get_config(self):
            return {**super().get_config(), "momentum": self.momentum}

        def _build(self, shape, rng):
            self._param("w", np.ones(shape[-1]))
            self._param("mean", np.zeros(shape[-1]), trainable=False)
            return shape

        def forward(self, x, training=False, options=None):
            if training:
                self.state["mean"][...] = ((1 - self.momentum) * self.state["mean"]
                                           + self.momentum * self.xp.mean(x, axis=0))
                self._x = x
            return (x - self.state["mean"]) * self.params["w"]

        def backward(self, dy, options=None):
            self.grads["w"] = self.xp.sum(dy * (self._x - self.state["mean"]), axis=0)
            return dy * self.params["w"]

    return Running


class MomentumSchedule(Callback):
    """Changes the user's layer's momentum at given optimiser steps."""

    def on_train_batch_begin(self, batch, logs=None):
        value = {10: 0.15, 20: 0.05}.get(self.model.optimizer.iterations)
        if value is not None:
            self.model.get_layer("run").momentum = value


def running_model(cls):
    model = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(6), cls(0.3, name="run"),
                              Dense(10), Softmax()], seed=3)
    model.compile(optimizer=xpcnn.optim.Adam(3e-2))
    return model


def test_a_users_layer_setting_a_callback_changed_resumes_once_declared_a_setting(data,
                                                                                  tmp_path):
    """A callback changing a user layer's plain attribute mid-run made its checkpoints "a model
    of another architecture" with no way out but editing the constructor's value to the file's.
    The refusal names the way: declaring the attribute a ``Setting``, as Dropout's rate is.
    Declared, the same checkpoint resumes and ends as the uninterrupted run, bit for bit."""
    x, y, _ = data
    plain, declared = running_class(False), running_class(True)
    reference = running_model(declared)
    reference.fit(x, y, callbacks=[MomentumSchedule()], **FIT)
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        running_model(plain).fit(x, y, checkpoint=path, checkpoint_every=3,
                                 callbacks=[MomentumSchedule(), InterruptAfter(14)], **FIT)
    for resume in (lambda m: m.fit(x, y, checkpoint=path, resume=True,
                                   callbacks=[MomentumSchedule()], **FIT),
                   lambda m: m.load_weights(path)):
        with pytest.raises(DataFormatError, match=r"layer 3 is Running\(momentum=0\.15\), this "
                                                  r"model's is Running\(momentum=0\.3\)\. If a "
                                                  r"callback changes \['momentum'\] while the "
                                                  r"model trains, declare it in Running's class "
                                                  r"body as a setting, `momentum = Setting\(\)`"):
            resume(running_model(plain))
    model = running_model(declared)
    model.fit(x, y, checkpoint=path, checkpoint_every=3, resume=True,
              callbacks=[MomentumSchedule()], **FIT)
    assert_same(state(model), state(reference))
    assert model.get_layer("run").momentum == 0.05
    kept = running_model(declared)
    kept.load_weights(path)  # (load_weights keeps the model's own value)
    assert kept.get_layer("run").momentum == 0.3


def test_fits_docstring_spells_checkpoint_as_a_call_that_works(tmp_path):
    """fit's docstring gives the BackupAndRestore that checkpoint=PATH is short for (it wrote
    resume positionally, a TypeError since resume became keyword-only)."""
    doc = " ".join(xpcnn.Sequential.fit.__doc__.split())
    call = re.search(r"``callbacks=\[(BackupAndRestore\(PATH, .*?\))\]``", doc).group(1)
    names = {"BackupAndRestore": BackupAndRestore, "PATH": str(tmp_path / "c.npz"),
             "checkpoint_every": 3, "resume": False}
    made = eval(call, names)
    assert (made.save_freq, made.resume, made.delete_checkpoint) == (3, False, False)


class PrecisionAfterOneEpoch(Callback):
    """Compiles the model in another precision after a warm-up epoch (its optimiser kept), a
    float16 loss scale that float16 gradients overflow at first."""

    def __init__(self, precision):
        super().__init__()
        self.precision = precision

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.model.compile(optimizer=self.model.optimizer, precision=self.precision)
            if self.precision == "mixed_float16":
                self.model.loss_scale = 2.0**17


def precision_model(precision):
    model = xpcnn.Sequential(random_layers_net(), seed=3)
    model.compile(optimizer=xpcnn.optim.Adam(3e-2), precision=precision)
    if precision == "mixed_float16":
        model.loss_scale = 2.0**17
    return model


@pytest.mark.parametrize("first, then", [("float32", "mixed_float16"),
                                         ("mixed_float16", "float32")])
@pytest.mark.parametrize("steps", [12, 19])
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_a_run_a_callback_compiled_in_another_precision_resumes_bit_for_bit(
        data, tmp_path, first, then, steps):
    """A float32 warm-up epoch, then a callback's compile(precision="mixed_float16"): the same
    call rerun with resume=True was refused ("compiled otherwise (compile.precision is
    'mixed_float16' there and 'float32' here)"), against resume's promise. It compiles the model
    in the file's precision, as that callback did, with a warning naming both, and ends as the
    uninterrupted run, bit for bit (loss scale and its good steps too)."""
    x, y, _ = data
    fit = {**FIT, "epochs": 3}
    reference = precision_model(first)
    with np.errstate(all="ignore"):
        reference.fit(x, y, callbacks=[PrecisionAfterOneEpoch(then)], **fit)
        path = tmp_path / "run.npz"
        with pytest.raises(KeyboardInterrupt):
            precision_model(first).fit(x, y, checkpoint=path, checkpoint_every=3, callbacks=[
                PrecisionAfterOneEpoch(then), InterruptAfter(steps)], **fit)
        model = precision_model(first)
        with pytest.warns(RuntimeWarning, match=f"compiled with precision '{then}' .*this one "
                                                f"has '{first}': resumed in '{then}'"):
            model.fit(x, y, checkpoint=path, checkpoint_every=3, resume=True,
                      callbacks=[PrecisionAfterOneEpoch(then)], **fit)
    assert model.precision == reference.precision == then
    assert_same(state(model), state(reference))
    assert (model.loss_scale, model._good_steps) == (reference.loss_scale,
                                                     reference._good_steps)


def test_a_file_of_another_precision_and_other_settings_is_refused_as_it_was(data, tmp_path):
    """Only a precision alone is taken from the file; a refusal after it was taken (a corrupt
    loss scale) leaves the model in its own precision."""
    x, y, _ = data
    path = tmp_path / "run.npz"
    precision_model("mixed_float16").fit(x, y, checkpoint=path, **{**FIT, "epochs": 1})
    model = xpcnn.Sequential(random_layers_net(), seed=3)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    with pytest.raises(InputError, match=r"compiled otherwise \(compile.optimizer.lr.lr is 0.03 "
                                         r"there and 0.01 here; compile.precision is "
                                         r"'mixed_float16' there and 'float32' here\)"):
        model.fit(x, y, checkpoint=path, resume=True, **FIT)
    with NpzArchive(path) as npz:
        arrays = {k: npz.read(k, 1 << 20) for k in npz.entries if k != "__config__"}
        config = npz.read_config()
    config["loss_scale"] = -1.0
    from xpcnn.saving.npz import CONFIG_KEY, encode_json, write_npz_atomic
    write_npz_atomic(path, {CONFIG_KEY: encode_json(config), **arrays})
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing said to be resumed)
        with pytest.raises(xpcnn.errors.DataFormatError, match="invalid checkpoint: loss_scale"):
            model.fit(x, y, checkpoint=path, resume=True, **FIT)
    assert model.precision == "float32" and model._scaling is None
    model.fit(x, y, **{**FIT, "epochs": 1})


def test_a_refused_resume_puts_the_precision_back_even_where_a_callbacks_put_back_raises(
        data, tmp_path):
    """A refused resume of a file of another precision puts the model's precision back first:
    a callback whose put-back raises too (set_state refusing even its own state) left the
    model in the file's precision, its loss scale lost (review RD)."""
    x, y, _ = data

    class Refuses(xpcnn.callbacks.Callback):
        def get_state(self):
            return {"n": 1}

        def set_state(self, state):
            if self.refuses:
                raise ValueError("corrupt")

    path = tmp_path / "run.npz"
    first = Refuses()
    first.refuses = False
    make_model().fit(x, y, checkpoint=path, callbacks=[first], **{**FIT, "epochs": 1})
    model = precision_model("mixed_float16")
    model.fit(x, y, **{**FIT, "epochs": 1})
    scaling = model._scaling
    again = Refuses()
    again.refuses = True
    with pytest.raises(ValueError, match="corrupt"):
        model.fit(x, y, checkpoint=path, resume=True, callbacks=[again], **FIT)
    assert model.precision == "mixed_float16" and model._scaling is scaling
