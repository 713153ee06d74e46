"""Callbacks: the protocol (order of hooks, stopping, lazy batch logs) and each built-in one."""

from __future__ import annotations

import csv
import functools
import math
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import ckpt_train
import numpy as np
import pytest
from test_checkpoint import Interrupt, as_dict, assert_same_run

import xpcnn
from xpcnn.callbacks import (
    HOOKS,
    BackupAndRestore,
    Callback,
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TerminateOnNaN,
)
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import Dense, Flatten, Rescaling, Softmax
from xpcnn.saving import load_checkpoint, save_checkpoint
from xpcnn.saving.checkpoint import Progress

N, BATCH = 40, 10  # 4 steps an epoch


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 4, 4, 2), dtype=np.uint8), rng.integers(0, 3, N)


def small_model(lr=0.1):
    model = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(lr, momentum=0.9))
    return model


class Scripted(Callback):
    """Puts a scripted metric ``score`` (per epoch) into the epoch logs, for the callbacks after
    it, and keeps each epoch's weights."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.weights = scores, []

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.scores[epoch]
        self.weights.append(self.model.get_weights())


def same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


# -- the protocol --------------------------------------------------------------------------------


def test_hooks_run_in_keras_order_with_epoch_logs(data):
    calls = []

    class Recorder(Callback):
        def __getattribute__(self, name):
            if name.startswith("on_"):
                return lambda *args: calls.append((name, *args[:1]) if name.startswith(
                    "on_epoch") or "_batch_" in name else (name,))
            return super().__getattribute__(name)

    model = small_model()
    history = model.fit(*data, epochs=2, batch_size=20, verbose=0, callbacks=[Recorder()],
                        validation_data=data)
    per_epoch = lambda e: [("on_epoch_begin", e), ("on_train_batch_begin", 0),  # noqa: E731
                           ("on_train_batch_end", 0), ("on_train_batch_begin", 1),
                           ("on_train_batch_end", 1), ("on_test_begin",),
                           ("on_test_batch_begin", 0), ("on_test_batch_end", 0), ("on_test_end",),
                           ("on_epoch_end", e)]
    assert calls == [("on_train_begin",), *per_epoch(0), *per_epoch(1), ("on_train_end",)]
    assert history is model.history and history.epoch == [0, 1]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"}


def test_each_hook_gets_the_logs_keras_gives_it(data):
    got = {}
    spy = LambdaCallback(**{hook: lambda *args, hook=hook: got.setdefault(hook, []).append(
        dict(args[-1])) for hook in HOOKS})
    model = small_model()
    history = model.fit(*data, epochs=2, batch_size=20, verbose=0, validation_data=data,
                        callbacks=[spy]).history
    last = {k: v[-1] for k, v in history.items()}
    assert all(logs == {} for hook in got if hook.endswith("_begin") for logs in got[hook])
    assert got["on_train_batch_end"][-1] == {"loss": last["loss"], "accuracy": last["accuracy"]}
    validation = {"loss": last["val_loss"], "accuracy": last["val_accuracy"]}
    assert got["on_test_batch_end"][-1] == pytest.approx(validation)  # (one batch)
    assert got["on_test_end"][-1] == validation
    assert got["on_epoch_end"][-1] == last and got["on_train_end"] == [last]
    probabilities = model.predict(data[0], batch_size=16, callbacks=[spy])
    outputs = [logs["outputs"] for logs in got["on_predict_batch_end"]]
    assert [len(o) for o in outputs] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate(outputs), probabilities)
    assert got["on_predict_end"] == [{}]
    assert spy.params == {"verbose": 0, "epochs": 1, "steps": 3}  # (Keras 3's, as evaluate's)


def test_a_callback_stops_training_from_on_train_batch_end_and_the_history_is_kept(data):
    def stop(batch, logs):
        if model._position == (1, 2):  # after the second batch of the second epoch
            model.stop_training = True

    model = small_model()
    history = model.fit(*data, epochs=5, batch_size=BATCH, verbose=0,
                        callbacks=[LambdaCallback(on_train_batch_end=stop)])
    assert model.optimizer.iterations == 4 + 2
    assert history.epoch == [0, 1]  # the cut epoch's logs cover its two batches
    full = small_model()
    full.fit(*data, epochs=1, batch_size=BATCH, verbose=0, shuffle=True)
    assert history.history["loss"][0] == full.history.history["loss"][0]


def test_batch_logs_are_read_from_the_device_only_when_looked_at(data, monkeypatch):
    reads = []
    real = xpcnn.Backend.to_numpy
    monkeypatch.setattr(xpcnn.Backend, "to_numpy",
                        lambda self, x: reads.append(1) or real(self, x))
    seen = []

    class Quiet(Callback):
        async_safe = True  # (Keras 3's promise: lazy logs; a LambdaCallback's are dicts)

        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[Quiet()])
    assert seen == [0, 1, 2, 3] and len(reads) == 1  # the end of the epoch only
    reads.clear()
    losses = []
    looking = LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(logs["loss"]))
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[looking])
    assert len(reads) == 4 + 1 and losses[-1] == model.history.history["loss"][0]


def test_batch_logs_a_callback_keeps_hold_that_batchs_values(data):
    """Logs stored by a callback (``self.logs.append(logs)``) and read after fit or evaluate
    hold their own batch's running values (read before the next step changes the sums), as
    Keras' dicts do; they take writes, seen by the callbacks after; logs no callback keeps
    cost no read."""
    kept, copied = [], []

    def keep(batch, logs):
        logs["batch"] = batch  # (writable, as Keras' dict)
        kept.append(logs)

    small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
        LambdaCallback(on_train_batch_end=keep),
        LambdaCallback(on_train_batch_end=lambda batch, logs: copied.append(dict(logs)))])
    assert [dict(logs) for logs in kept] == copied and len(copied) == 8
    assert [logs["batch"] for logs in copied] == [0, 1, 2, 3] * 2
    assert len({logs["loss"] for logs in copied}) == 8
    model, kept, copied = small_model(), [], []
    model.evaluate(*data, batch_size=BATCH, callbacks=[
        LambdaCallback(on_test_batch_end=lambda batch, logs: kept.append(logs)),
        LambdaCallback(on_test_batch_end=lambda batch, logs: copied.append(dict(logs)))])
    assert [dict(logs) for logs in kept] == copied and len({d["loss"] for d in copied}) == 4


def test_train_on_batch_from_a_callback_counts_in_the_epochs_logs(data):
    """A callback's train_on_batch inside fit is a step of the epoch, as in Keras: the epoch's
    loss and accuracy are the means over every step's samples (an accuracy above 1 before)."""
    steps = []

    class Recorded(xpcnn.Sequential):
        def train_step(self, xb, yb):
            loss, correct = super().train_step(xb, yb)
            steps.append((float(loss) * xb.shape[0], float(correct), xb.shape[0]))
            return loss, correct

    model = Recorded([Rescaling(1 / 255), Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
    extra = LambdaCallback(on_train_batch_end=lambda batch, logs: [
        model.train_on_batch(data[0][:7], data[1][:7]) for _ in range(3)])
    history = model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[extra])
    assert len(steps) == 4 * 4
    loss, correct, seen = (sum(column) for column in zip(*steps, strict=True))
    assert history.history["loss"][0] == pytest.approx(loss / seen, rel=1e-12)
    assert history.history["accuracy"][0] == pytest.approx(correct / seen, rel=1e-12)


@pytest.mark.parametrize("stop_at, position", [(7, (1, 2)), (5, (1, 0))],
                         ids=["inside an epoch", "at an epoch's start"])
def test_a_resumed_run_applies_its_schedule_once(data, tmp_path, stop_at, position):
    """Resumed inside an epoch, the checkpoint's learning rate is the one that epoch's
    on_epoch_begin set: a schedule of the current rate (Keras' ``lr * 0.5`` example) is not
    applied to it again; resumed at an epoch's start, it is applied, as in a run that never
    stopped. Either way the run ends as the uninterrupted one, bit for bit."""
    path = tmp_path / "backup.npz"
    halve = lambda epoch, lr: lr * 0.5  # noqa: E731
    reference = small_model()
    expected = reference.fit(*data, epochs=3, batch_size=BATCH, verbose=0,
                             callbacks=[LearningRateScheduler(halve)])
    model = small_model()

    def kill(batch, logs):  # (backups every 3 steps and at each epoch's end)
        if model.optimizer.iterations == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
            LearningRateScheduler(halve), LambdaCallback(on_train_batch_end=kill),
            BackupAndRestore(path, save_freq=3)])
    assert (load_checkpoint(path).epoch, load_checkpoint(path).step) == position
    resumed = small_model()
    history = resumed.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
        LearningRateScheduler(halve), BackupAndRestore(path, save_freq=3)])
    assert history.history["learning_rate"] == expected.history["learning_rate"]
    assert same_weights(resumed.get_weights(), reference.get_weights())


def test_backup_and_restore_deletes_its_file_when_training_ends(data, tmp_path):
    """As in Keras (delete_checkpoint=True): the script run again trains afresh; a fit that
    is interrupted keeps the file, and fit(checkpoint=PATH) keeps it (its finished run,
    resumed, trains nothing)."""
    path = tmp_path / "backup.npz"
    for _ in range(2):  # (the script run twice)
        model = small_model()
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                  callbacks=[BackupAndRestore(path)])
        assert model.optimizer.iterations == 8 and not path.exists()
    link, target = tmp_path / "link.npz", tmp_path / "kept" / "backup.npz"
    link.symlink_to(target)  # (its target deleted, the link kept: was the link deleted, and
    # the whole file left behind)
    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                      callbacks=[BackupAndRestore(link)])
    assert link.is_symlink() and not target.exists() and (tmp_path / "kept").is_dir()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
              callbacks=[BackupAndRestore(path, delete_checkpoint=False)])
    assert path.exists()
    path.unlink()
    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, checkpoint=path)
    assert load_checkpoint(path).epoch == 1
    path.unlink()  # a run that TerminateOnNaN stops keeps its file: the last good state
    model = small_model()

    def overflow(batch, logs):  # (finite weights whose logits overflow at the next step)
        if model.optimizer.iterations == 2:
            model.layers[2].params["kernel"][...] = 3e38

    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
        TerminateOnNaN(), LambdaCallback(on_train_batch_end=overflow),
        BackupAndRestore(path, save_freq=1)])
    assert load_checkpoint(path).model.optimizer.iterations == 2


def test_the_older_batch_hook_names_are_called_as_in_keras(data):
    """A callback written for ``on_batch_begin`` / ``on_batch_end`` (Keras' older names of the
    training batch hooks) is called at each training batch."""
    calls = []

    class Old(Callback):
        def on_batch_begin(self, batch, logs=None):
            calls.append(("begin", batch))

        def on_batch_end(self, batch, logs=None):
            calls.append(("end", batch, logs["loss"] > 0))

    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[
        Old(), LambdaCallback(on_batch_end=lambda batch, logs: calls.append(("lambda", batch)))])
    assert calls == [c for b in range(4) for c in (("begin", b), ("end", b, True),
                                                   ("lambda", b))]


def test_a_log_that_is_no_number_is_shown_not_recorded(data, capsys):
    """A callback's epoch log that is text or an array: the progress line shows it, the
    History leaves it out with a warning; the epoch's training is not lost to a crash."""
    tag = LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(note="warm", v=[1, 2]))
    model = small_model()
    with pytest.warns(RuntimeWarning, match="is not one and is left out") as warned:
        history = model.fit(*data, epochs=2, batch_size=BATCH, verbose=2, callbacks=[tag])
    said = " ".join(str(w.message) for w in warned)
    assert "the log 'note' = 'warm'" in said and "the log 'v' = [1, 2]" in said
    assert history.epoch == [0, 1] and not {"note", "v"} & history.history.keys()
    assert "- note: warm - v: [1, 2]" in capsys.readouterr().out


def test_validation_split_holds_out_what_keras_does(data):
    """Keras' split point, floor(n * (1 - split)): the last 10 of 40 at 0.25, 3 of 10 (2
    rounded), 1 of 3 at 0.1 (none rounded): the run of the arrays split so by hand."""
    def logs(model):
        return {k: v for k, v in model.history.history.items() if k != "seconds"}

    for n, split, held in ((40, 0.25, 10), (10, 0.25, 3), (3, 0.1, 1)):
        x, y = data[0][:n], data[1][:n]
        by_hand, split_model = small_model(), small_model()
        by_hand.fit(x[:n - held], y[:n - held], batch_size=64, verbose=0,
                    validation_data=(x[n - held:], y[n - held:]))
        split_model.fit(x, y, batch_size=64, verbose=0, validation_split=split)
        assert logs(split_model) == logs(by_hand)


def test_fit_called_again_shuffles_on_as_one_longer_fit(data, tmp_path):
    """fit(epochs=1) three times trains as fit(epochs=3), bit for bit: each call's epochs are
    numbered on from the model's earlier ones, so each shuffles anew (each call shuffled as
    epoch 0 before); fit(epochs=3, initial_epoch=1) after one epoch goes on the same way; a
    checkpoint of a later call resumes with its numbering in a fresh process."""
    def fitted(*calls, **kwargs):
        model = small_model()
        for epochs, first in calls:
            model.fit(*data, epochs=epochs, initial_epoch=first, batch_size=BATCH, verbose=0,
                      **kwargs)
        return model.get_weights()

    reference = fitted((3, 0))
    assert same_weights(fitted((1, 0), (1, 0), (1, 0)), reference)
    assert same_weights(fitted((1, 0), (3, 1)), reference)
    assert not same_weights(fitted((1, 0)), fitted((1, 0), (1, 0)))
    path = tmp_path / "backup.npz"
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0)

    def kill(batch, logs):
        if model.optimizer.iterations == 10:  # (the second call's epoch 1, step 2)
            raise Interrupt

    with pytest.raises(Interrupt):
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, checkpoint=path,
                  checkpoint_every=1, callbacks=[LambdaCallback(on_train_batch_end=kill)])
    fresh = small_model()  # (its first call not run again: the checkpoint's numbering)
    fresh.fit(*data, epochs=2, batch_size=BATCH, verbose=0, checkpoint=path, resume=True)
    assert same_weights(fresh.get_weights(), reference)
    model = small_model()  # a checkpoint written outside fit keeps the numbering too
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0)
    save_checkpoint(model, path)
    again = load_checkpoint(path).model
    again.fit(*data, epochs=1, batch_size=BATCH, verbose=0)
    assert same_weights(again.get_weights(), reference)


def test_callbacks_and_hooks_are_checked():
    with pytest.raises(InputError, match="LambdaCallback got unknown hooks \\['on_step_end'\\]"):
        LambdaCallback(on_step_end=print)
    model = small_model()
    with pytest.raises(InputError, match="callbacks must be xpcnn.callbacks.Callback instances, "
                                         "got builtin_function_or_method"):
        model.fit(np.zeros((4, 4, 4, 2)), np.zeros(4, int), verbose=0, callbacks=[print])
    with pytest.raises(InputError, match="EarlyStopping monitors 'val_loss', which the epoch logs "
                                         "lack .* pass validation_data"):
        model.fit(np.zeros((4, 4, 4, 2)), np.zeros(4, int), verbose=0,
                  callbacks=[EarlyStopping()])


def test_the_progress_bar_shows_the_running_metrics(data, monkeypatch, capsys):
    import xpcnn.callbacks

    real = xpcnn.callbacks.tqdm  # (TQDM_DISABLE=1 in the tests' environment)
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", lambda *a, **k: real(*a, **k, disable=False))
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=1)
    err = capsys.readouterr().err
    assert "Epoch 1/1" in err and "4/4" in err
    assert f"loss={model.history.history['loss'][0]:.4f}" in err


def test_the_progress_bar_of_a_model_without_metrics_shows_the_loss_alone(data, monkeypatch,
                                                                           capsys):
    import xpcnn.callbacks

    real = xpcnn.callbacks.tqdm
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", lambda *a, **k: real(*a, **k, disable=False))
    # (every batch's running logs shown, not one each refresh=0.5 seconds)
    monkeypatch.setattr(xpcnn.callbacks.ProgbarLogger.__init__, "__defaults__", (0.0, 1))
    model = small_model()
    model.compile(optimizer=xpcnn.optim.SGD(0.1), metrics=[])
    seen = []
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=1, callbacks=[LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(logs["loss"]))])
    err = capsys.readouterr().err
    assert "4/4" in err and "acc" not in err
    assert all(f"loss={loss:.4f}" in err for loss in seen)


def test_verbose_2_prints_a_line_an_epoch_as_keras_3_does(data, monkeypatch, capsys):
    """fit(verbose=2): ``Epoch k/N``, then ``steps/steps - Ns - Nms/step - name: value ...``
    with the epoch's logs; evaluate and predict one such line each; no progress bar."""
    import xpcnn.callbacks

    real = xpcnn.callbacks.tqdm  # (a bar, were one made, would show: TQDM_DISABLE=1 here)
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", lambda *a, **k: real(*a, **k, disable=False))
    model = small_model()
    history = model.fit(*data, epochs=2, batch_size=BATCH, verbose=2, validation_data=data)
    loss, accuracy = model.evaluate(*data, verbose=2)
    model.predict(data[0], batch_size=BATCH, verbose=2)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and len(lines) == 6
    h = history.history
    for epoch in range(2):
        assert lines[2 * epoch] == f"Epoch {epoch + 1}/2"
        steps, seconds, pace, *values = lines[2 * epoch + 1].split(" - ")
        assert (steps, seconds[-1], pace[-6:]) == ("4/4", "s", "s/step")
        assert values == [f"{k}: {h[k][epoch]:.4f}" for k in
                          ("loss", "accuracy", "val_loss", "val_accuracy")]
    assert lines[4].startswith("1/1 - ") and lines[4].endswith(
        f" - loss: {loss:.4f} - accuracy: {accuracy:.4f}")
    assert lines[5].startswith("4/4 - ") and lines[5].endswith("s/step")


def test_summary_line_formats_as_keras_3():
    assert xpcnn.callbacks.summary_line(10, 25.0, {"loss": 0.5, "seconds": 25.0}) == \
        "10/10 - 25s - 2s/step - loss: 0.5000"
    assert xpcnn.callbacks.summary_line(1875, 5.4, {"loss": 0.0001}) == \
        "1875/1875 - 5s - 3ms/step - loss: 1.0000e-04"
    assert xpcnn.callbacks.summary_line(1000, 0.05) == "1000/1000 - 0s - 50us/step"
    assert xpcnn.callbacks.summary_line(3, 0.0, target=8) == "3/8 - 0s - 0s/step"


def test_verbose_2_of_one_epoch_and_of_an_epoch_stopped_early(data, capsys):
    """One epoch: no ``Epoch 1/1`` line (as Keras); an epoch a callback stops after its
    second batch: ``2/4``."""
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=2, callbacks=[LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch == 1 and setattr(
            model, "stop_training", True))])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("2/4 - ")


# -- EarlyStopping ---------------------------------------------------------------------------------


def test_early_stopping_restores_the_best_weights(data, capsys):
    script = Scripted([3.0, 1.0, 2.0, 2.5, 0.5, 0.1])
    stop = EarlyStopping("score", mode="min", patience=2, restore_best_weights=True, verbose=1)
    model = small_model()
    history = model.fit(*data, epochs=6, batch_size=BATCH, verbose=0, callbacks=[script, stop])
    # best at epoch 1; epochs 2 and 3 do not improve: patience 2 is used up at epoch 3
    assert history.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3 and stop.best_epoch == 1
    # (verbose: the stop and the restore said, epochs 1-based as Keras prints them)
    assert capsys.readouterr().out.splitlines() == [
        "early stopping at epoch 4: score has not improved since epoch 2",
        "restoring the weights of the best epoch, 2 (score 1)"]
    assert same_weights(model.get_weights(), script.weights[1])
    assert not same_weights(script.weights[3], script.weights[1])


def test_early_stopping_min_delta_mode_and_baseline(data):
    script = Scripted([0.50, 0.55, 0.56, 0.9])
    stop = EarlyStopping("score", mode="max", min_delta=0.02, patience=0)
    small_model().fit(*data, epochs=4, batch_size=BATCH, verbose=0, callbacks=[script, stop])
    assert stop.stopped_epoch == 2  # +0.05 counts, +0.01 does not
    assert EarlyStopping("val_accuracy").mode == "max" and EarlyStopping().mode == "min"
    # a name compile's strings do not give is decided from the model's metrics as training
    # begins (a metric object's own name; Keras 3's rule), and refused there where it is none
    model = small_model()
    with pytest.raises(InputError, match="EarlyStopping cannot tell whether 'score' should go "
                                         "down or up: pass mode='min' or mode='max'"):
        model.fit(*data, verbose=0, callbacks=[EarlyStopping("score")])
    assert ModelCheckpoint("m.npz", monitor="score").mode == "auto"  # (not watched)
    with pytest.raises(InputError, match="ModelCheckpoint cannot tell whether 'val_f1'"):
        model.fit(*data, verbose=0, validation_data=data, callbacks=[
            ModelCheckpoint("m.npz", monitor="val_f1", save_best_only=True)])
    assert model.optimizer.iterations == 0  # (refused before the first step)


# -- Keras' decisions, epoch by epoch -------------------------------------------------------------
# Each row is derived by hand from Keras 3's rules (keras/src/callbacks/early_stopping.py,
# reduce_lr_on_plateau.py, model_checkpoint.py, monitor_callback.py); the rows marked "xpcnn"
# are its documented differences (a NaN never improves). scripts/keras_callbacks_check.py
# compares the callbacks with Keras itself where Keras is installed.

nan, inf = math.nan, math.inf


class TokenModel:
    """What the monitoring callbacks read; its weights are a token: the epoch they are from."""

    metrics_names = ("loss", "accuracy")
    layers, loss = (), None  # (what a checkpoint's check before training reads)

    def __init__(self):
        self.stop_training, self.epoch, self.restored, self.saved = False, None, None, []
        self.optimizer = SimpleNamespace(lr=0.1)

    def get_config(self):
        return {}

    def get_weights(self):
        return [self.epoch]

    def set_weights(self, weights):
        self.restored = weights[0]

    def save_weights(self, path):
        self.saved.append(self.epoch)


def drive(callback, scores, monitor="score", model=None, validation_freq=1):
    """Call ``callback`` as fit does over epochs whose logs hold ``monitor``: ``scores`` (None:
    an epoch whose logs lack it, one that ``validation_freq`` does not validate). Returns the
    model, the number of epochs run, the logs of each after the callback."""
    model, seen = model or TokenModel(), []
    callback.set_model(model)
    callback.set_params({"epochs": len(scores), "validation": True,
                         "validation_freq": validation_freq})
    callback.on_train_begin({})
    for epoch, score in enumerate(scores):
        model.epoch = epoch
        callback.on_epoch_begin(epoch, {})
        seen.append({} if score is None else {monitor: score})
        callback.on_epoch_end(epoch, seen[-1])
        if model.stop_training:
            break
    callback.on_train_end(seen[-1])
    return model, len(seen), seen


MONITORS = [lambda **k: EarlyStopping(mode="min", **k),
            lambda **k: ReduceLROnPlateau(mode="min", **k),
            lambda **k: ModelCheckpoint("m.npz", save_best_only=True, mode="min", **k)]


@pytest.mark.parametrize("make", MONITORS)
@pytest.mark.parametrize("monitor", [None, 3, ["loss"], ""])
def test_a_monitor_that_is_no_name_is_refused_when_made(make, monitor):
    """(hunt H2: was taken, then a bare AttributeError ('removeprefix') when training began,
    naming neither the callback nor its argument; a list got mode='auto''s advice to pass a
    mode, which led to the same error)"""
    with pytest.raises(InputError, match=r"(EarlyStopping|ReduceLROnPlateau|ModelCheckpoint) "
                                         r"monitor must be the name of a log, a str such as "
                                         rf"'val_loss', got {re.escape(repr(monitor))}$"):
        make(monitor=monitor)


@pytest.mark.parametrize("make", MONITORS)
@pytest.mark.parametrize("value", [None, "abc", "0.5", np.array([1.0, 2.0])])
def test_a_monitored_log_that_is_no_number_is_named(make, value):
    """A monitored log that a callback set to no number is an InputError naming the callback,
    the monitor and the value (hunt H2: was a bare TypeError or ValueError from float(), and a
    text that parses, "0.5", was taken as the number); numbers of any kind are taken."""
    callback = make(monitor="score")
    with pytest.raises(InputError, match=r"monitors 'score', whose value in the epoch logs is "
                                         rf"{re.escape(repr(value))}: expected a number"):
        callback.current({"score": value})
    for number in (np.float32(0.5), np.array(0.25), 1, math.nan):
        assert callback.current({"score": number}) == float(number) or math.isnan(number)
    if not isinstance(make(), ModelCheckpoint):  # (as fit calls it: the epoch's end)
        with pytest.raises(InputError, match="whose value in the epoch logs is 'abc'"):
            drive(make(monitor="score"), [1.0, "abc"])


EARLY_STOPPING = [  # (settings (mode "min"), scores, epochs run, epoch restored)
    (dict(patience=2), [3.0, 1.0, 2.0, 2.5, 0.5], 4, 1),  # no gain at 2 and 3: stop at 3
    (dict(patience=0), [1.0, 1.0], 2, 0),  # a tie is no improvement
    (dict(patience=1, min_delta=0.15), [1.0, 0.9, 0.8], 2, 0),  # -0.1 is less than min_delta
    # compared in float32 after the shift by min_delta: exactly min_delta, or less than float32
    # resolves, is no improvement (float64 alone would call 0.8 -> 0.7 one: 0.7 + 0.1 < 0.8)
    (dict(patience=0, min_delta=0.1), [0.8, 0.7, 0.6], 2, 0),
    (dict(patience=0), [0.30000001, 0.3, 0.2], 2, 0),
    (dict(patience=5), [0.3, 0.1, 0.2], 3, 1),  # no early stop: the best epoch still comes back
    (dict(patience=1, start_from_epoch=2), [1.0, 2.0, 3.0, 4.0, 0.5], 4, 2),  # 0, 1 not watched
    # baseline: only an epoch beating it and the best resets the wait; an epoch improving on
    # the best never stops training; the best epoch comes back even below the baseline
    (dict(patience=1, baseline=0.1), [0.5, 0.4, 0.3, 0.2], 4, 3),
    (dict(patience=2, baseline=0.35), [0.5, 0.4, 0.45, 0.3], 3, 1),
    (dict(patience=1, baseline=0.35), [0.5, 0.3, 0.32, 0.2], 3, 1),
    (dict(patience=0), [inf, 1.0, 1.0], 3, 1),  # the first value is the first best, even inf
    (dict(patience=1), [0.5, nan, 0.4], 2, 0),  # NaN is no improvement
    (dict(patience=1), [nan, 0.5, 0.6, 0.4], 3, 1),  # xpcnn: Keras makes NaN the best (2, 0)
]


@pytest.mark.parametrize("settings, scores, epochs_run, restored", EARLY_STOPPING)
def test_early_stopping_stops_and_restores_on_keras_epochs(settings, scores, epochs_run,
                                                          restored):
    stop = EarlyStopping("score", mode="min", restore_best_weights=True, **settings)
    model, ran, _ = drive(stop, scores)
    assert (ran, model.restored) == (epochs_run, restored)
    assert stop.stopped_epoch == (ran - 1 if model.stop_training else 0)  # (0: no stop)
    flipped = EarlyStopping("score", mode="max", restore_best_weights=True, **{
        k: -v if k == "baseline" else v for k, v in settings.items()})
    model, ran, _ = drive(flipped, [-s for s in scores])
    assert (ran, model.restored) == (epochs_run, restored)


REDUCE_LR = [  # (settings (mode "min", factor 0.5), scores, rate after each epoch)
    (dict(patience=1, cooldown=2, min_lr=0.03), [1.0] * 7, [.1, .05, .05, .03, .03, .03, .03]),
    (dict(patience=0), [1.0, 0.9, 0.9, 0.8], [.1, .1, .05, .05]),
    (dict(patience=1), [1.0, 0.99995, 0.9], [.1, .05, .05]),  # min_delta 1e-4 by default
    (dict(patience=1), [inf, 5.0, 5.0], [.1, .1, .05]),  # the first value is the first best
    (dict(patience=1), [nan, 1.0, 1.0], [.05, .05, .025]),  # xpcnn: Keras has [.1, .05, .025]
]


@pytest.mark.parametrize("settings, scores, rates", REDUCE_LR)
def test_reduce_lr_on_plateau_lowers_the_rate_on_keras_epochs_and_logs_it(settings, scores,
                                                                         rates):
    reduce = ReduceLROnPlateau("score", mode="min", factor=0.5, **settings)
    model, _, seen = drive(reduce, scores)
    assert model.optimizer.lr == pytest.approx(rates[-1])
    logged = [logs["learning_rate"] for logs in seen]  # the epoch's rate, before a reduction
    assert logged == pytest.approx([0.1, *rates[:-1]])


def _gapped(scores, gap=1):
    """``scores`` as a fit with ``validation_freq=gap + 1`` logs them: ``gap`` epochs without
    the validation metric before each one that has it."""
    return [s for score in scores for s in [*[None] * gap, score]]


def _epochs_in(gapped_epochs, gap=1):
    """The epochs of the ungapped run that gapped run's epochs are (None: a gap)."""
    return [None if (e + 1) % (gap + 1) else (e + 1) // (gap + 1) - 1 for e in gapped_epochs]


@pytest.mark.parametrize("settings, scores, epochs_run, restored",
                         [case for case in EARLY_STOPPING if not math.isnan(case[1][0])])
def test_early_stopping_skips_epochs_without_validation(settings, scores, epochs_run, restored):
    """fit(validation_freq=2): the monitoring callbacks skip the epochs whose logs have no
    val_loss (as Keras does) and decide on the others as on a run that validates every
    epoch. (Not a first value that is NaN: as in Keras, only epoch 0 never stops training,
    and the first validated epoch is 1 here.)"""
    settings = {k: 2 * v if k == "start_from_epoch" else v for k, v in settings.items()}
    stop = EarlyStopping("val_loss", mode="min", restore_best_weights=True, **settings)
    model, ran, _ = drive(stop, _gapped(scores), "val_loss", validation_freq=2)
    assert (ran, _epochs_in([model.restored])[0]) == (2 * epochs_run, restored)


@pytest.mark.parametrize("settings, scores, rates", REDUCE_LR)
def test_reduce_lr_on_plateau_skips_epochs_without_validation(settings, scores, rates):
    reduce = ReduceLROnPlateau("val_loss", mode="min", factor=0.5, **settings)
    model, _, seen = drive(reduce, _gapped(scores, gap=2), "val_loss", validation_freq=3)
    assert model.optimizer.lr == pytest.approx(rates[-1])
    logged = [logs["learning_rate"] for logs in seen]  # logged every epoch, validated or not
    assert logged[2::3] == pytest.approx([0.1, *rates[:-1]])
    assert logged[::3] == logged[1::3] == logged[2::3]  # (changed only where validated)


def test_model_checkpoint_best_only_skips_epochs_without_validation(tmp_path):
    save = ModelCheckpoint(tmp_path / "m.npz", "val_loss", save_best_only=True,
                           save_weights_only=True)
    assert _epochs_in(drive(save, _gapped([inf, 1.0, 1.0, 0.5]), "val_loss",
                            validation_freq=2)[0].saved) == [0, 1, 3]


def test_only_validation_freq_excuses_a_missing_validation_metric():
    """The epochs that validation_freq skips, and nothing else: a missing val_loss with
    validation every epoch, or a missing other name, is still an error."""
    for monitor, freq in (("val_loss", 1), ("score", 2), ("val_score", 2)):
        stop = EarlyStopping(monitor, mode="min")
        with pytest.raises(InputError, match=f"monitors '{monitor}', which the epoch logs"):
            drive(stop, [None], monitor, validation_freq=freq)


def test_reduce_lr_on_plateau_stops_at_min_lr_though_the_rate_reads_back_above_it(capsys):
    model = TokenModel()
    model.optimizer = xpcnn.optim.SGD(0.07)  # (1e-5 set reads back 1.0000000000000003e-05)
    reduce = ReduceLROnPlateau("score", mode="min", factor=0.1, patience=0, min_lr=1e-5,
                               verbose=1)
    drive(reduce, [1.0] * 7, model=model)
    assert capsys.readouterr().out.count("learning rate reduced") == 4  # epochs 2 to 5
    assert model.optimizer.lr == pytest.approx(1e-5)


def test_learning_rate_scheduler_logs_each_epochs_rate():
    _, _, seen = drive(LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1)), [1.0] * 3)
    assert [logs["learning_rate"] for logs in seen] == pytest.approx([0.1, 0.05, 0.1 / 3])


@pytest.mark.parametrize("mode, scores, saved", [
    ("min", [inf, 1.0, 1.0, 0.5], [0, 1, 3]),  # the first value is the first best
    ("max", [0.5, 0.4, 0.6, 0.6], [0, 2]),
    ("min", [nan, 1.0, 2.0, 0.5], [1, 3]),  # xpcnn: Keras saves the NaN epoch, then none
])
def test_model_checkpoint_saves_the_best_on_keras_epochs(tmp_path, mode, scores, saved):
    save = ModelCheckpoint(tmp_path / "m.npz", "score", save_best_only=True,
                           save_weights_only=True, mode=mode)
    assert drive(save, scores)[0].saved == saved
    above = ModelCheckpoint(tmp_path / "m.npz", "score", save_best_only=True, mode=mode,
                            save_weights_only=True, initial_value_threshold=scores[-1])
    assert drive(above, scores)[0].saved == []  # nothing beats the last, the best


def test_model_checkpoint_save_freq_counts_batches_across_epochs(data, tmp_path):
    model = small_model()
    saves = ModelCheckpoint(tmp_path / "m-{epoch}-{batch}.npz", save_freq=3)  # 4 batches/epoch
    model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[saves])
    # Keras' count: after 3, 6, 9 and 12 batches (batch 1-based within its epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-1-3.npz", "m-2-2.npz", "m-3-1.npz", "m-3-4.npz"]
    inside = load_checkpoint(tmp_path / "m-2-2.npz")  # the state after step 6, to resume there
    assert inside.model.optimizer.iterations == 6 and inside.history.epoch == [0]
    best = ModelCheckpoint(tmp_path / "best.npz", "loss", save_best_only=True, save_freq=1,
                           save_weights_only=True)
    losses, saved = [], []  # (the running loss after each batch; the batches saved after)
    model.save_weights = lambda path: saved.append(model._position[1])
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
        LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(logs["loss"])),
        best])
    assert saved == [i % 4 + 1 for i, loss in enumerate(losses) if loss < min(losses[:i] + [inf])]
    assert 1 < len(saved) < 8 and best.best == min(losses)
    for wrong, message in [(dict(save_freq=0), "save_freq must be 'epoch' or a positive"),
                           (dict(save_freq=2, save_best_only=True),
                            "batch logs, which hold the loss and the compiled metrics only: "
                            "monitor one of them, not 'val_loss'")]:
        with pytest.raises(InputError, match=message):
            ModelCheckpoint(tmp_path / "m.npz", **wrong)
    model = small_model()
    with pytest.raises(InputError, match="could not be filled from epoch and the logs"):
        model.fit(*data, verbose=0, callbacks=[ModelCheckpoint(tmp_path / "{batch}.npz")])
    assert model.optimizer.iterations == 0  # (refused before the first step)


def test_history_holds_the_logs_callbacks_add_and_on_train_end_gets_the_last(data, tmp_path):
    ended = []
    model = small_model()
    history = model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
        Scripted([1.0, 1.0, 1.0]), ReduceLROnPlateau("score", mode="min", patience=0),
        ModelCheckpoint(tmp_path / "last.npz"),
        LambdaCallback(on_train_end=lambda logs: ended.append(dict(logs)))])
    assert set(history.history) == {"loss", "accuracy", "seconds", "score", "learning_rate"}
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.01])  # (before)
    assert ended == [{k: v[-1] for k, v in history.history.items()}]
    assert load_checkpoint(tmp_path / "last.npz").history.epoch == [0, 1, 2]


# -- ModelCheckpoint -------------------------------------------------------------------------------


def test_model_checkpoint_fills_the_path_template_each_epoch(data, tmp_path):
    model = small_model()
    template = str(tmp_path / "ckpt-{epoch:02d}-{loss:.3f}.npz")
    history = model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                        callbacks=[ModelCheckpoint(template)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"ckpt-{e + 1:02d}-{loss:.3f}.npz"
                     for e, loss in enumerate(history.history["loss"])]
    ckpt = load_checkpoint(tmp_path / names[1])  # a whole training state
    assert ckpt.model.optimizer.iterations == 8 and ckpt.epoch == 2
    assert same_weights(ckpt.model.get_weights(), model.get_weights())


def test_model_checkpoint_best_only_and_weights_only(data, tmp_path):
    script = Scripted([2.0, 1.0, 1.5, 0.5])
    path = tmp_path / "best.npz"
    model = small_model()
    saves = []
    save = ModelCheckpoint(path, monitor="score", mode="min", save_best_only=True,
                           save_weights_only=True)
    watch = LambdaCallback(on_epoch_end=lambda e, logs: saves.append(
        path.exists() and path.stat().st_mtime_ns))
    model.fit(*data, epochs=4, batch_size=BATCH, verbose=0, callbacks=[script, save, watch])
    assert saves[1] != saves[0] and saves[2] == saves[1] and saves[3] != saves[2]
    best = xpcnn.load_model(str(path))  # a model file
    assert same_weights(best.get_weights(), script.weights[3])
    with pytest.raises(InputError, match="could not be filled from epoch and the logs"):
        small_model().fit(*data, verbose=0,
                          callbacks=[ModelCheckpoint(tmp_path / "{val_loss}.npz")])


@pytest.mark.parametrize("writers, names", [
    (lambda p: {"checkpoint": p, "callbacks": [Scripted([1.0, 0.0]), ModelCheckpoint(
        p, monitor="score", mode="min", save_best_only=True)]},
     r"the ModelCheckpoint and fit\(checkpoint=\.\.\.\) would both write .*the best model"),
    (lambda p: {"checkpoint": p, "callbacks": [CSVLogger(p)]},
     r"the CSVLogger and fit\(checkpoint=\.\.\.\) would both write .*the CSV log"),
    (lambda p: {"callbacks": [BackupAndRestore(p), ModelCheckpoint(p, save_weights_only=True)]},
     "the ModelCheckpoint and the BackupAndRestore would both write"),
    (lambda p: {"checkpoint": p, "callbacks": [ModelCheckpoint(os.path.relpath(p))]},
     r"the ModelCheckpoint and fit\(checkpoint=\.\.\.\) would both write '/.*/run002\.npz'"),
    (lambda p: {"callbacks": [CSVLogger(p), CSVLogger(os.path.relpath(p))]},
     r"the CSVLogger and another CSVLogger would both write '/.*/run002\.npz'"),
    (lambda p: {"callbacks": [ModelCheckpoint(p), ModelCheckpoint(
        p, monitor="loss", save_best_only=True)]},
     "the ModelCheckpoint and another ModelCheckpoint would both write .*the best model"),
    (lambda p: {"callbacks": [CSVLogger(p.replace("002", "{002}")),
                              ModelCheckpoint(p.replace("002", "{{002}}"))]},
     r"the CSVLogger and the ModelCheckpoint would both write '/.*/run\{002\}\.npz'"),
    (lambda p: {"callbacks": [ModelCheckpoint("run{epoch:03}.npz"), ModelCheckpoint(
        os.path.join(os.path.dirname(p), "run{epoch:03}.npz"))]},
     r"the ModelCheckpoint and another ModelCheckpoint would both write "
     r"'/.*/run\{epoch:03\}\.npz'"),
])
def test_two_writers_of_one_file_are_refused_before_any_write(data, tmp_path, monkeypatch,
                                                              writers, names):
    """fit(checkpoint=p) with ModelCheckpoint(p, save_best_only=True) ended with the last
    epoch's checkpoint in p, the best model lost; with CSVLogger(p) the log was lost: refused,
    as the command line refuses two outputs on one file, before anything is written. So is
    one template given twice (its braces in a fixed path are escaped: {{ is a brace)."""
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "run002.npz")
    model = small_model()
    with pytest.raises(InputError, match=names + ".*give each a file of its own"):
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, **writers(path))
    assert model.optimizer.iterations == 0 and os.listdir(tmp_path) == []


def test_two_writers_of_one_file_are_refused_before_a_resume_reads_it(data, tmp_path):
    """An unbuilt model with a plain Normalization() resuming from checkpoint=p reads its
    statistics from p before training begins: a CSVLogger's log there was read as a checkpoint
    (a DataFormatError about the file) before the two writers were refused."""
    path = tmp_path / "run.npz"
    path.write_text("epoch,loss\n0,1.0\n")
    model = xpcnn.Sequential([xpcnn.layers.Normalization(), Flatten(), Dense(3)], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match="the CSVLogger and fit.* would both write"):
        model.fit(*data, verbose=0, checkpoint=path, resume=True, callbacks=[CSVLogger(path)])
    assert path.read_text() == "epoch,loss\n0,1.0\n" and not model.built


@pytest.mark.parametrize("save, history", [({}, [0, 1]), ({"save_weights_only": True}, [0])])
def test_a_template_filled_to_another_writers_file_is_refused_before_that_save(
        data, tmp_path, monkeypatch, save, history):
    """A template that fills to the checkpoint's file at epoch 2 is refused as it fills it,
    before its save (or the checkpoint's of that epoch): the checkpoint of epoch 1 is intact
    and resumes; the History holds the epochs its hook saw (a weights file is saved in the
    ModelCheckpoint's own on_epoch_end, before the History's)."""
    monkeypatch.chdir(tmp_path)
    model = small_model()
    with pytest.raises(InputError, match=r"the ModelCheckpoint and fit\(checkpoint=\.\.\.\) "
                       r"would both write '/.*/run002\.npz' \(its path 'run\{epoch:03\}\.npz' "
                       r"filled at epoch 2; not written\)"):
        model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, checkpoint="run002.npz",
                  callbacks=[ModelCheckpoint("run{epoch:03}.npz", **save)])
    assert sorted(os.listdir()) == ["run001.npz", "run002.npz"]
    assert load_checkpoint("run002.npz").epoch == 1 and model.history.epoch == history
    resumed = small_model()
    resumed.fit(*data, epochs=3, batch_size=BATCH, verbose=0, checkpoint="run002.npz",
                resume=True, callbacks=[ModelCheckpoint("ckpt{epoch}.npz", **save)])
    assert resumed.optimizer.iterations == 12 and resumed.history.epoch == [0, 1, 2]


def test_two_templates_filling_to_one_file_are_refused_before_the_second_writes_it(
        data, tmp_path, monkeypatch):
    """Two templates that differ as text fill to one file: one's save replaced the other's
    (was: not caught); refused before it writes, the other's file intact (the weights file,
    saved at once, before the whole checkpoint put off until the epoch's hooks have run)."""
    monkeypatch.chdir(tmp_path)
    model = small_model()
    with pytest.raises(InputError, match=r"the ModelCheckpoint and another ModelCheckpoint "
                       r"would both write '/.*/w_1\.npz' \(its path 'w_\{epoch\}\.npz' "
                       r"filled at epoch 1; not written\)"):
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
            ModelCheckpoint("w_{epoch}.npz"),
            ModelCheckpoint("w_{epoch:d}.npz", save_weights_only=True)])
    assert os.listdir() == ["w_1.npz"] and xpcnn.load_model("w_1.npz").optimizer is None


def test_a_checkpoint_given_to_another_fit_is_refused_only_for_that_fits_writers(
        data, tmp_path, monkeypatch):
    """A ModelCheckpoint kept the files of an earlier fit's writers: its path set to the
    CSVLogger's of that fit, the next fit, without the CSVLogger, was refused."""
    monkeypatch.chdir(tmp_path)
    model = small_model()
    save = ModelCheckpoint("ck_{epoch}.npz", save_weights_only=True)
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[save, CSVLogger("log.csv")])
    save.filepath = "log.csv"
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[save])
    assert sorted(os.listdir()) == ["ck_1.npz", "log.csv"]
    xpcnn.load_model("log.csv")  # (the weights file saved over the log)


def test_writers_of_other_files_are_taken(data, tmp_path, monkeypatch):
    """Not refused: templates that fill to none of the others' files (though a number's text
    could: inf, 1e5, -1, a hex digit), a device that many write (nothing replaces it), and
    files of their own (a link to another folder's file: the file itself is compared)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    model = small_model()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, checkpoint=tmp_path / "ckpt-last.npz",
              callbacks=[ModelCheckpoint(tmp_path / "ckpt-{epoch}.npz"),
                         CSVLogger(tmp_path / "link" / "log.csv"),
                         ModelCheckpoint(tmp_path / "sub" / "best.npz", monitor="loss",
                                         save_best_only=True)])
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1.npz", "ckpt-2.npz", "ckpt-last.npz", "link",
                                            "sub"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["best.npz", "log.csv"]
    with pytest.raises(InputError, match="the CSVLogger and the ModelCheckpoint would both "
                                         "write '.*/sub/best.npz'"):
        small_model().fit(*data, verbose=0, callbacks=[
            CSVLogger(tmp_path / "link" / "best.npz"),
            ModelCheckpoint(tmp_path / "sub" / "best.npz")])
    monkeypatch.chdir(tmp_path / "sub")
    small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, checkpoint="model-inf.npz",
                      callbacks=[ModelCheckpoint("model-{epoch}.npz"),
                                 ModelCheckpoint("run{epoch}.npz"), CSVLogger("run1e5.npz"),
                                 ModelCheckpoint("m{epoch}.npz"), CSVLogger("m-1.npz"),
                                 ModelCheckpoint("n{epoch:x}.npz"), CSVLogger("nlast.npz"),
                                 CSVLogger(os.devnull), CSVLogger(os.devnull)])
    assert sorted(os.listdir()) == sorted([
        "best.npz", "log.csv", "model-inf.npz", "run1e5.npz", "m-1.npz", "nlast.npz",
        *(f"{name}{epoch}.npz" for name in ("model-", "run", "m", "n") for epoch in (1, 2))])


def test_a_model_checkpoint_written_at_an_error_keeps_the_file_that_resumes(data, tmp_path,
                                                                         capsys):
    """A callback raising in epoch 2's on_epoch_end, before an EarlyStopping: the save put off
    is written at the error, but that file cannot resume (EarlyStopping's state of the epoch
    is unknown), so it does not replace epoch 1's, which resumes (was: replaced, and the point
    to resume from lost); a templated path, which replaces nothing, still gets its file."""
    path, template = tmp_path / "fixed.npz", str(tmp_path / "t-{epoch}.npz")

    def fail(epoch, logs):
        if epoch == 1:
            raise RuntimeError("planted")

    def callbacks(fixed=path, failing=True):
        return [ModelCheckpoint(fixed, verbose=1), ModelCheckpoint(template),
                *([LambdaCallback(on_epoch_end=fail)] if failing else []),
                EarlyStopping(monitor="loss", patience=5)]

    with pytest.raises(RuntimeError, match="planted"):
        small_model().fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=callbacks())
    assert f"epoch 2: kept {path}, which may resume" in capsys.readouterr().out
    assert load_checkpoint(path).epoch == 1 and load_checkpoint(tmp_path / "t-2.npz").epoch == 2
    resumed = small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the callbacks' states taken back, none refused)
        resumed.fit(*data, epochs=3, batch_size=BATCH, verbose=0,
                    callbacks=callbacks(tmp_path / "again.npz", failing=False),
                    checkpoint=path, resume=True)
    assert resumed.history.epoch == [0, 1, 2]
    reference = small_model()
    reference.fit(*data, epochs=3, batch_size=BATCH, verbose=0)
    assert same_weights(resumed.get_weights(), reference.get_weights())


# -- BackupAndRestore ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    model, history = ckpt_train.train()
    return model.get_weights(), history


@pytest.mark.parametrize("seed", [1, 2])
def test_backup_and_restore_resumes_bit_for_bit_after_a_kill_at_a_random_step(tmp_path,
                                                                               reference, seed):
    path = tmp_path / "backup.npz"
    x, y = ckpt_train.data()
    steps = ckpt_train.EPOCHS * 8
    stop_at = random.Random(seed).randrange(4, steps)  # (after the first backup, at step 3)
    model = ckpt_train.make_model()

    def kill(batch, logs):
        if model.optimizer.iterations == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        model.fit(x, y, epochs=ckpt_train.EPOCHS, batch_size=ckpt_train.BATCH, verbose=0,
                  callbacks=[LambdaCallback(on_train_batch_end=kill),
                             BackupAndRestore(path, save_freq=3)])
    done = load_checkpoint(path).model.optimizer.iterations
    assert 0 < done < stop_at
    resumed, ran = ckpt_train.make_model(), []
    history = resumed.fit(x, y, epochs=ckpt_train.EPOCHS, batch_size=ckpt_train.BATCH, verbose=0,
                          callbacks=[BackupAndRestore(path, save_freq=3), LambdaCallback(
                              on_train_batch_end=lambda batch, logs: ran.append(batch))])
    assert len(ran) == steps - done  # (from the backup, not afresh)
    assert_same_run(resumed.get_weights(), as_dict(history), reference)


def test_backup_and_restore_refuses_a_generator(data, tmp_path):
    x, y = data
    batches = ((x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10))
    with pytest.raises(InputError, match="BackupAndRestore needs data whose batches can be "
                                         "replayed"):
        small_model().fit(batches, steps_per_epoch=4, verbose=0,
                          callbacks=[BackupAndRestore(tmp_path / "b.npz")])


# -- learning rate ---------------------------------------------------------------------------------


def test_reduce_lr_on_plateau_with_cooldown_and_floor(data, tmp_path):
    script = Scripted([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    rates = []
    reduce = ReduceLROnPlateau("score", mode="min", factor=0.5, patience=1, cooldown=2,
                               min_lr=0.03)
    model = small_model(lr=0.1)
    record = LambdaCallback(on_epoch_end=lambda e, logs: rates.append(model.optimizer.lr))
    model.fit(*data, epochs=7, batch_size=BATCH, verbose=0, callbacks=[script, reduce, record])
    # (Keras' counting) epoch 0 sets the best; 1: reduce; 2: cooling down; 3: the cooldown has
    # run out, reduce (to the floor)
    assert rates == pytest.approx([0.1, 0.05, 0.05, 0.03, 0.03, 0.03, 0.03])
    save_checkpoint(model, tmp_path / "c.npz", Progress(7))  # the reduced rate is kept
    assert load_checkpoint(tmp_path / "c.npz").model.optimizer.lr == pytest.approx(0.03)


def test_learning_rate_scheduler_sets_each_epochs_rate(data):
    used = []
    model = small_model(lr=0.1)
    schedule = LearningRateScheduler(lambda epoch, lr: 0.2 * 0.5**epoch)
    record = LambdaCallback(on_train_batch_begin=lambda b, logs: used.append(model.optimizer.lr))
    model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[schedule, record])
    assert used == pytest.approx([0.2] * 4 + [0.1] * 4 + [0.05] * 4)
    # the same updates as an SGD whose schedule gives those rates
    twin = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(3), Softmax()], seed=0)
    twin.compile(optimizer=xpcnn.optim.SGD(xpcnn.optim.StepDecay(0.2, 4, 0.5), momentum=0.9))
    twin.fit(*data, epochs=3, batch_size=BATCH, verbose=0)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# -- CSVLogger and TerminateOnNaN ----------------------------------------------------------------


def test_csv_logger_writes_a_row_per_epoch_and_appends(data, tmp_path):
    path = tmp_path / "log.csv"
    model = small_model()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, validation_data=data,
              callbacks=[CSVLogger(path)])
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, validation_data=data,
              callbacks=[CSVLogger(path, append=True)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "0"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert float(rows[2]["val_loss"]) == model.history.history["val_loss"][0]
    logger = CSVLogger(path)  # the columns are the first epoch's; a missing log is NA (Keras)
    logger.on_train_begin()
    logger.on_epoch_end(0, {"loss": 1.0, "learning_rate": 0.1})
    with pytest.warns(RuntimeWarning, match=r"has no columns for the logs \['score'\]"):
        logger.on_epoch_end(1, {"loss": 0.5, "score": 3.0})
    logger.on_train_end()
    assert path.read_text().splitlines() == ["epoch,learning_rate,loss", "0,0.1,1.0", "1,NA,0.5"]


def _opened_here(path):
    """The file descriptors of this process open on ``path`` (Linux's /proc)."""
    fds = Path("/proc/self/fd")
    return [fd for fd in fds.iterdir() if fd.exists() and fd.resolve() == Path(path).resolve()]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_csv_logger_reused_after_a_failed_fit_starts_its_file_afresh(data, tmp_path):
    """A fit that raised in its second epoch (on_train_end does not run on an error, as in
    Keras) holds no handle on the logger's file once it has raised (was: open until the logger
    was used again or collected), whose rows are all there; the next fit with that logger
    writes its own file, one header and its rows (was: a second header and rows under the
    first)."""
    path = tmp_path / "log.csv"
    logger, model = CSVLogger(path), small_model()

    def fail(epoch, logs):
        if epoch == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        model.fit(*data, epochs=3, batch_size=BATCH, verbose=0,
                  callbacks=[logger, LambdaCallback(on_epoch_end=fail)])
    assert _opened_here(path) == []
    assert [r.split(",")[0] for r in path.read_text().splitlines()] == ["epoch", "0", "1"]
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[logger])
    assert _opened_here(path) == []
    lines = path.read_text().splitlines()
    assert lines[0].startswith("epoch,") and [r.split(",")[0] for r in lines[1:]] == ["0", "1"]


def test_a_csv_logger_subclass_hears_of_the_end_once_at_the_end(data, tmp_path):
    """A Keras-style subclass summing up its log in on_train_end hears of it once, at the
    end, with the last epoch's logs and the file written (was: also at the fit's beginning,
    with logs=None, which failed the fit)."""
    heard = []

    class Summing(CSVLogger):
        def on_train_end(self, logs=None):
            super().on_train_end(logs)
            heard.append((logs["loss"], len(Path(self.filename).read_text().splitlines())))

    model = small_model()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
              callbacks=[Summing(tmp_path / "log.csv")])
    assert heard == [(model.history.history["loss"][-1], 3)]


def test_a_model_its_checkpoints_cannot_hold_is_refused_before_training(data, tmp_path):
    """A user's layer taking a setting without a get_config: ModelCheckpoint and fit's
    checkpoint refuse it before the first step (was: at the first save, an epoch of training
    lost to the error)."""
    from xpcnn.layers import Layer

    class Gain(Layer):
        def __init__(self, g=2.0, name=None):
            super().__init__(name)
            self.g = g

        def forward(self, x, training=False, options=None):
            return x * self.g

        def backward(self, dy, options=None):
            return dy * self.g

    for given in ({"callbacks": [ModelCheckpoint(tmp_path / "m.npz")]},
                  {"checkpoint": tmp_path / "ck.npz"}):
        model = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Gain(0.5), Dense(3),
                                  Softmax()], seed=0)
        model.compile(optimizer="sgd")
        with pytest.raises(InputError, match=r"layer class Gain takes \['g'\] but defines no"):
            model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, **given)
        assert model.optimizer.iterations == 0


def test_fit_and_to_from_a_callback_of_fit_are_refused(data):
    """fit inside fit took over the outer one's History and class weights (its epochs 2-3
    trained unweighted, and it returned the inner History); to() moved the model under fit's
    batches (a bare AttributeError at the next step). Both are refused, by name."""
    model, inner = small_model(), []

    def nested(epoch, logs):
        try:
            model.fit(*data, epochs=1, verbose=0)
        except InputError as e:
            inner.append(str(e))
        try:
            model.to("cpu")
        except InputError as e:
            inner.append(str(e))

    history = model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                        callbacks=[LambdaCallback(on_epoch_end=nested)])
    assert history.epoch == [0, 1] and len(inner) == 4
    assert inner[0].startswith("fit was called while this model's fit runs")
    assert inner[1].startswith("to() was called while this model's fit runs")
    model.fit(*data, epochs=1, verbose=0)  # (after it, as ever)
    model.to("cpu")


def test_csv_logger_of_a_fit_validating_every_few_epochs(data, tmp_path):
    """validation_freq=2: the val_* columns from the first row on (NA where an epoch was not
    validated), the columns of a fit that validates every epoch."""
    logs = {}
    for freq in (1, 2):
        model = small_model()
        model.fit(*data, epochs=3, batch_size=BATCH, verbose=0, validation_data=data,
                  validation_freq=freq, callbacks=[CSVLogger(tmp_path / f"{freq}.csv")])
        with open(tmp_path / f"{freq}.csv", newline="") as f:
            logs[freq] = list(csv.DictReader(f))
    assert list(logs[2][0]) == list(logs[1][0])
    assert [r["val_loss"] for r in logs[2]][::2] == ["NA", "NA"]
    assert float(logs[2][1]["val_loss"]) == float(logs[1][1]["val_loss"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_terminate_on_nan_ends_training_cleanly_before_the_bad_step(data, monkeypatch, capsys):
    model = small_model()
    dense = model.layers[2]
    real, calls = dense.backward, [0]

    def backward_after(dy, options):
        out = real(dy, options)
        calls[0] += 1
        if calls[0] == 6:  # the 2nd step of epoch 2 (1-based): a NaN gradient
            dense.grads["kernel"][0, 0] = np.nan
        return out

    monkeypatch.setattr(dense, "backward", backward_after)
    history = model.fit(*data, epochs=3, batch_size=BATCH, verbose=0,
                        callbacks=[TerminateOnNaN()])
    assert history.epoch == [0]  # epoch 2 failed, epoch 3 never ran
    assert model.optimizer.iterations == 5
    assert "TerminateOnNaN: non-finite gradient at step 6" in capsys.readouterr().out
    monkeypatch.undo()
    reference = small_model()  # the same 5 steps without the failure
    stop = LambdaCallback(on_train_batch_end=lambda b, logs: setattr(
        reference, "stop_training", reference.optimizer.iterations == 5))
    reference.fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[stop])
    assert same_weights(model.get_weights(), reference.get_weights())


def one_pass(x, y, batch=BATCH):
    """A generator of one pass over (x, y): a validation iterator that runs out."""
    for i in range(0, len(x), batch):
        yield x[i:i + batch], y[i:i + batch]


@pytest.mark.parametrize("make", [
    lambda p: EarlyStopping(patience=5, restore_best_weights=True),
    lambda p: ReduceLROnPlateau(),
    lambda p: ModelCheckpoint(p / "best.npz", save_best_only=True),
    lambda p: ModelCheckpoint(p / "m-{epoch}-{val_loss:.3f}.npz")])
def test_an_epoch_whose_validation_iterator_ran_out_is_one_without_validation(data, tmp_path,
                                                                               make):
    """Monitors skip it (as an epoch validation_freq skips) and a ModelCheckpoint whose path
    or monitor needs val_* logs does not save in it: fit ends cleanly after it (was: an
    InputError from the callback, no on_train_end, no History)."""
    x, y = data
    cb = make(tmp_path)
    model = small_model()
    with pytest.warns(RuntimeWarning, match="this epoch has no val_\\* logs"):
        history = model.fit(x, y, epochs=3, batch_size=BATCH, verbose=0, callbacks=[cb],
                            validation_data=one_pass(x, y), validation_steps=N // BATCH)
    assert history.epoch == [0, 1] and history.epochs_of("val_loss") == [0]
    if isinstance(cb, ModelCheckpoint):
        assert len(list(tmp_path.iterdir())) == 1


class KeepsNumpy(Callback):
    def on_train_begin(self, logs=None):
        self.losses, self.got = [], None

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(np.float32(logs["loss"]))

    def get_state(self):
        if not self.losses:  # (a resumed run's, asked before its first epoch)
            return self.got
        return {"best_epoch": np.argmin(self.losses), "best": np.min(self.losses),
                "zero_d": np.asarray(2.5, np.float16), "flag": np.bool_(True),
                "big": np.uint64(2**64 - 1), "name": np.str_("adam"),
                "long": np.longdouble(1) / 3,
                "nested": {"k": [np.int32(3), 1.5, (np.float32(0.1), None)]},
                "plain": [1, 2.5, True, "x"]}

    def set_state(self, state):
        self.got = state


def test_a_callback_state_may_hold_numpy_scalars(data, tmp_path):
    """np.argmin's int64, a float32, a 0-d float16 array, a bool, a uint64 beyond int64, in
    lists and dicts too: they come back of their dtype, bit for bit (was: as Python numbers,
    so a float32 state went on in float64; before that, an InputError after an epoch, blaming
    the layers' get_config); a NumPy string as the str it is; the JSON entry holds the
    numbers, as files before did."""
    path = tmp_path / "c.npz"
    written = KeepsNumpy()
    small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[written],
                      checkpoint=path)
    resumed = KeepsNumpy()
    small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[resumed],
                      checkpoint=path, resume=True)
    got, want = resumed.got, written.get_state()
    for key in ("best_epoch", "best", "flag", "big", "long"):  # (a longdouble's JSON stand-in
        # is a float: its item() is a longdouble, which JSON refused, blaming the layers)
        assert type(got[key]) is type(want[key]) and got[key] == want[key], key
    assert type(got["zero_d"]) is np.ndarray and got["zero_d"].dtype == np.float16
    assert got["zero_d"].shape == () and got["zero_d"] == 2.5
    assert got["name"] == "adam" and got["plain"] == [1, 2.5, True, "x"]
    k = got["nested"]["k"]
    assert type(k[0]) is np.int32 and k[0] == 3 and k[1] == 1.5
    assert type(k[2][0]) is np.float32 and k[2][0] == np.float32(0.1) and k[2][1] is None
    from xpcnn.saving.npz import NpzArchive

    with NpzArchive(path) as npz:
        (entry,) = npz.read_config()["callbacks"]
    assert entry["state"]["best"] == float(want["best"]) and entry["state"]["big"] == 2**64 - 1


@pytest.mark.parametrize("value, what", [
    (np.datetime64("2026-01-01"), r"datetime64\[D\]"),
    (np.datetime64(10**18, "ns"), r"datetime64\[ns\]"),  # (.item() would give an int)
    (np.timedelta64(3, "s"), r"timedelta64\[s\]"),
    (np.complex64(1 + 2j), "complex64"),
    (np.bytes_(b"ab"), "bytes"),
    (np.asarray(1j), "complex128"),
], ids=["datetime64", "datetime64-ns", "timedelta64", "complex64", "bytes", "0-d complex"])
@pytest.mark.parametrize("nested", [False, True])
def test_a_numpy_scalar_a_checkpoint_cannot_hold_is_refused_by_callback_and_key(
        data, tmp_path, value, what, nested):
    """A NumPy scalar that neither JSON nor a checkpoint's arrays hold (a datetime64, a
    complex number) is refused naming the callback and the key (was: an error after the epoch
    blaming the layers' or optimiser's settings, or a datetime64 of nanoseconds silently an
    int); so is a list of arrays of such a dtype (was: written, and the file then refused at
    resume)."""

    class LastImproved(Callback):
        def get_state(self):
            return {"when": {"at": [value]} if nested else value}

    path = tmp_path / "c.npz"
    with pytest.raises(InputError, match=rf"^the state of callback LastImproved \(its "
                                         rf"get_state\(\)\) cannot be written to the "
                                         rf"checkpoint: 'when' holds a NumPy {what}"):
        small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                          callbacks=[LastImproved()], checkpoint=path)
    assert not path.exists()


def test_a_callback_state_of_arrays_a_checkpoint_cannot_hold_is_refused_by_callback_and_key(
        data, tmp_path):
    class Spectra(Callback):
        def get_state(self):
            return {"spectra": [np.ones(3, np.float32), np.ones(3, np.complex64)]}

    with pytest.raises(InputError, match=r"callback Spectra .*'spectra' holds an array of dtype "
                                         r"complex64, and a checkpoint holds arrays of booleans"):
        small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[Spectra()],
                          checkpoint=tmp_path / "c.npz")


def test_a_callback_state_json_cannot_hold_is_refused_by_callback_and_key(data, tmp_path):
    class KeepsASet(Callback):
        def get_state(self):
            return {"seen": {1, 2}}

    with pytest.raises(InputError, match="callback KeepsASet .*'seen' holds set"):
        small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                          callbacks=[KeepsASet()], checkpoint=tmp_path / "c.npz")

    class KeysNotStrings(Callback):
        def get_state(self):
            return {"per_class": {(0, 1): 2.0}}

    with pytest.raises(InputError, match=r"callback KeysNotStrings .*'per_class' holds a dict "
                                         r"whose key \(0, 1\) is not a string"):
        small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                          callbacks=[KeysNotStrings()], checkpoint=tmp_path / "c.npz")


def test_stop_evaluating_and_stop_predicting_end_after_the_current_batch(data):
    """As in Keras 3: reset by each call; the means are those of the batches seen; fit's
    validation is cut short alike."""
    x, y = data
    model = small_model()
    seen = []

    class Stop(Callback):
        def on_test_batch_end(self, batch, logs=None):
            seen.append(batch)
            self.model.stop_evaluating = batch == 1

        def on_predict_batch_end(self, batch, logs=None):
            self.model.stop_predicting = True

    loss, _ = model.evaluate(x, y, batch_size=BATCH, callbacks=[Stop()])
    assert seen == [0, 1]
    assert loss == pytest.approx(model.evaluate(x[:2 * BATCH], y[:2 * BATCH])[0])
    assert model.predict(x, batch_size=BATCH, callbacks=[Stop()]).shape[0] == BATCH
    assert len(model.predict(x, batch_size=BATCH)) == N  # (reset by the next call)
    seen.clear()
    history = model.fit(x, y, epochs=2, batch_size=BATCH, verbose=0, callbacks=[Stop()],
                        validation_data=(x, y), validation_batch_size=BATCH)
    assert seen == [0, 1, 0, 1] and len(history.history["val_loss"]) == 2


def test_a_users_progbar_and_history_are_fits_own(data, capsys):
    """As Keras 3: not doubled; the bar takes fit's verbose; fit returns the user's History."""
    from xpcnn.callbacks import History, ProgbarLogger

    mine = History()
    returned = small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=2,
                                 callbacks=[ProgbarLogger(verbose=1), mine])
    out = capsys.readouterr().out
    assert returned is mine and mine.epoch == [0, 1]
    assert out.count("Epoch 1/2") == 1 and out.count("4/4 - ") == 2
    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                      callbacks=[ProgbarLogger(verbose=2)])
    assert capsys.readouterr().out == ""
    with pytest.raises(InputError, match="2 History callbacks"):
        small_model().fit(*data, verbose=0, callbacks=[History(), History()])


def test_the_top_level_history_is_the_callback_fit_takes(data):
    """``fit(callbacks=[xpcnn.History()])``, as Keras users write it (was refused: the
    top-level name was the plain record), is fit's own History: it holds the epochs."""
    mine = xpcnn.History()
    model = small_model()
    returned = model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[mine])
    assert returned is mine and model.history is mine
    assert mine.epoch == [0, 1] and len(mine.history["loss"]) == 2
    assert "TrainingInterrupted" in xpcnn.__all__
    assert xpcnn.TrainingInterrupted is xpcnn.errors.TrainingInterrupted


def test_the_progress_bar_shows_small_values_as_keras_does(data, monkeypatch, capsys):
    import xpcnn.callbacks

    real = xpcnn.callbacks.tqdm
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", lambda *a, **k: real(*a, **k, disable=False))
    model = small_model(lr=1e-5)
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=1,
              callbacks=[LearningRateScheduler(lambda e, lr: lr)])
    assert "learning_rate=1.0000e-05" in capsys.readouterr().err
    assert xpcnn.callbacks.summary_line(1, 0.0, {"lr": 1e-5, "loss": 0.5}).endswith(
        "lr: 1.0000e-05 - loss: 0.5000")


def test_evaluates_bar_shows_the_loss_and_metrics(data, monkeypatch, capsys):
    real = xpcnn.callbacks.tqdm  # (evaluate's bar is a ProgbarLogger's, as fit's)
    monkeypatch.setattr(xpcnn.callbacks, "tqdm",
                        lambda *a, **k: real(*a, **{**k, "disable": False}))
    # (every batch's running means)
    monkeypatch.setattr(xpcnn.callbacks.ProgbarLogger.__init__, "__defaults__", (0.0, 1))
    model = small_model()
    loss, accuracy = model.evaluate(*data, batch_size=BATCH, verbose=1)
    err = capsys.readouterr().err
    assert f"loss={loss:.4f}, accuracy={accuracy:.4f}" in err.replace("\r", "\n").splitlines()[-1]
    first = model.evaluate(data[0][:BATCH], data[1][:BATCH])[0]
    assert f"loss={first:.4f}" in err  # (the first batch's running mean, shown on its way)


class _KeptBars(xpcnn.callbacks.ProgbarLogger):
    """A user's ProgbarLogger that records each bar it shows as it ends: (desc, n, total)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown = []

    def close(self):
        if self.bar is not None:
            self.shown.append((self.bar.desc, self.bar.n, self.bar.total))
        super().close()


def _shown_bars(monkeypatch):
    """Every tqdm bar the callbacks make, shown (the tests' TQDM_DISABLE hides them): its
    arguments, in order."""
    real, made = xpcnn.callbacks.tqdm, []

    def tqdm(*a, **k):
        made.append(k)
        return real(*a, **{**k, "disable": False})
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", tqdm)
    return made


def test_evaluate_and_predict_show_their_bar_through_a_users_progbar_logger(data, monkeypatch,
                                                                           capsys):
    """As in Keras 3, evaluate's and predict's bar is a ProgbarLogger's (its on_test_* and
    on_predict_* hooks), a user's one in ``callbacks`` taken as theirs, at their ``verbose``
    (was: they drove a tqdm bar of their own, and a user's ProgbarLogger showed nothing)."""
    made = _shown_bars(monkeypatch)
    model, mine = small_model(), _KeptBars(verbose=2)
    loss, accuracy = model.evaluate(*data, batch_size=BATCH, verbose=1, callbacks=[mine])
    model.predict(data[0], batch_size=BATCH, verbose=1, callbacks=[mine])
    assert mine.shown == [("evaluate", 4, 4), ("predict", 4, 4)] and mine.verbose == 1
    assert [k["desc"] for k in made] == ["evaluate", "predict"]  # (one bar each: the user's)
    err = capsys.readouterr().err
    assert f"loss={loss:.4f}, accuracy={accuracy:.4f}" in err
    model.evaluate(*data, batch_size=BATCH, verbose=0, callbacks=[mine])  # (Keras 3: silent)
    model.predict(data[0], batch_size=BATCH, verbose=0, callbacks=[mine])
    assert len(mine.shown) == 2 and mine.verbose == 0 and len(made) == 2
    assert capsys.readouterr() == ("", "")
    model.evaluate(*data, batch_size=BATCH, verbose=2, callbacks=[mine])
    model.predict(data[0], batch_size=BATCH, verbose=2, callbacks=[mine])
    lines = capsys.readouterr().out.splitlines()  # (Keras 3's one line each)
    assert len(lines) == 2 and all(line.startswith("4/4 - ") for line in lines)
    assert lines[0].endswith(f" - loss: {loss:.4f} - accuracy: {accuracy:.4f}")
    with pytest.raises(InputError, match="2 ProgbarLogger callbacks: evaluate takes one"):
        model.evaluate(*data, callbacks=[mine, xpcnn.callbacks.ProgbarLogger()])


def test_fits_validation_shows_no_bar_and_a_users_bar_shows_evaluate_after_fit(data,
                                                                               monkeypatch):
    """fit's validation runs its ProgbarLogger's on_test_* hooks without a bar (as Keras 3):
    one bar an epoch; the same ProgbarLogger then shows evaluate's bar, a fit that raised
    before it too."""
    made = _shown_bars(monkeypatch)
    model, mine = small_model(), _KeptBars()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=1, validation_data=data,
              callbacks=[mine])
    assert [k["desc"] for k in made] == ["Epoch 1/2", "Epoch 2/2"]
    assert [desc for desc, *_ in mine.shown] == ["Epoch 1/2", "Epoch 2/2"]
    with pytest.raises(RuntimeError, match="the user's error"):
        model.fit(*data, epochs=1, batch_size=BATCH, verbose=1, validation_data=data,
                  callbacks=[mine, _Raises("on_train_batch_end")])
    model.evaluate(*data, batch_size=BATCH, verbose=1, callbacks=[mine])
    assert mine.shown[-1] == ("evaluate", 4, 4)


def test_whether_a_bar_is_fits_comes_from_its_params(data, monkeypatch):
    """A ProgbarLogger knows fit from its params (fit's alone say whether it validates), as it
    takes its verbose from them: a subclass whose on_train_begin does not call super() shows
    no bar for fit's validation either (was: one each epoch, its on_train_begin being what
    told it that it was in fit)."""
    made = _shown_bars(monkeypatch)

    class Mine(_KeptBars):
        def on_train_begin(self, logs=None):
            self.began = True

    model, mine = small_model(), Mine(verbose=2)
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=1, validation_data=data,
              callbacks=[mine])
    assert [k["desc"] for k in made] == ["Epoch 1/2", "Epoch 2/2"]
    assert mine.began and mine.verbose == 1
    model.evaluate(*data, batch_size=BATCH, verbose=1, callbacks=[mine])
    assert [desc for desc, *_ in mine.shown] == ["Epoch 1/2", "Epoch 2/2", "evaluate"]


@pytest.mark.parametrize("call", ["evaluate", "predict"])
def test_evaluate_and_predict_close_their_bar_when_a_callback_raises(data, call, monkeypatch):
    """An error in a callback of evaluate or predict closes its bar (left open, every later
    bar was drawn a line lower), as fit's bar is closed."""
    tqdm = xpcnn.callbacks.tqdm  # (its open bars: a class attribute made with the first bar)
    _shown_bars(monkeypatch)
    hook = "on_test_batch_end" if call == "evaluate" else "on_predict_batch_end"
    model = small_model()
    args = data if call == "evaluate" else data[:1]
    with pytest.raises(RuntimeError, match="the user's error"):
        getattr(model, call)(*args, batch_size=BATCH, verbose=1, callbacks=[_Raises(hook)])
    assert not list(getattr(tqdm, "_instances", ()))


def test_backup_and_restore_save_freq_is_named_as_its_own():
    for bad in (0, False, "batch"):
        with pytest.raises(InputError, match="BackupAndRestore save_freq must be"):
            BackupAndRestore("c.npz", save_freq=bad)


class _Raises(Callback):
    def __init__(self, hook):
        super().__init__()
        setattr(self, hook, self.fail)

    def fail(self, index, logs=None):
        if index == 1:
            raise RuntimeError("the user's error")


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_epoch_end"])
def test_a_fit_that_raises_closes_its_progress_bar(data, hook, monkeypatch):
    """fit raising in a user's callback (the epoch's on_epoch_end not run, or run before the
    bar's) closes the epoch's tqdm bar (was: left open, so that every later bar was drawn a
    line lower, and the stale ones printed again at exit)."""
    tqdm = xpcnn.callbacks.tqdm  # (shown, as the tests' TQDM_DISABLE hides it: conftest)
    monkeypatch.setattr(xpcnn.callbacks, "tqdm", functools.partial(tqdm, disable=False))

    def bars():  # (tqdm's open bars, a class attribute made with the first bar)
        return list(getattr(tqdm, "_instances", ()))

    model = small_model()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the user's error"):
            model.fit(*data, epochs=3, batch_size=BATCH, verbose=1, callbacks=[_Raises(hook)])
        assert not bars()
    seen = []
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=1, callbacks=[LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.extend(bar.pos for bar in bars()))])
    assert seen == [0] and not bars()  # (the next bar on the first line)


def test_a_refused_fit_keeps_the_record_of_the_history_passed_in_again(data):
    """A fit refused as its callbacks begin (EarlyStopping of val_loss, no validation data),
    given the History an earlier fit returned: the History keeps that fit's record (was:
    emptied, though a refused fit leaves the model as it was)."""
    model, record = small_model(), xpcnn.callbacks.History()
    assert model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[record]) is record
    before = (list(record.epoch), {k: list(v) for k, v in record.history.items()})
    with pytest.raises(InputError, match="EarlyStopping monitors 'val_loss'"):
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                  callbacks=[record, EarlyStopping()])
    assert model.history is record
    assert (record.epoch, record.history) == before and record.epoch == [0, 1]


class _KeepsASet(Callback):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def get_state(self):
        return {"value": self.value}

    def set_state(self, state):
        self.value = state["value"]


@pytest.mark.parametrize("value, says", [
    ({0, 1}, r"'value' holds set \{0, 1\}"),
    (np.datetime64("2026-12-06"), "'value' holds a NumPy datetime64"),
    ({1: 2.0}, "'value' holds a dict whose key 1 is not a string"),
])
@pytest.mark.parametrize("saver", ["checkpoint", "model_checkpoint"])
def test_a_callback_state_a_checkpoint_cannot_hold_is_refused_before_training(
        data, tmp_path, value, says, saver):
    """A user's callback whose get_state() a checkpoint cannot hold: fit is refused before its
    first step, naming the callback and key (was: after a whole epoch, at the first save)."""
    model, path = small_model(), tmp_path / "c.npz"
    kwargs = {"checkpoint": path} if saver == "checkpoint" else \
        {"callbacks": [ModelCheckpoint(path, monitor="loss")]}
    kwargs["callbacks"] = [_KeepsASet(value), *kwargs.get("callbacks", [])]
    with pytest.raises(InputError, match=r"the state of callback _KeepsASet \(its get_state\(\)"
                                         r"\) cannot be written to the checkpoint: " + says):
        model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, **kwargs)
    assert model.optimizer.iterations == 0 and not path.exists()


def test_a_callback_state_is_not_checked_where_no_checkpoint_is_written(data, tmp_path):
    """(weights alone, or no checkpoint: the state is never written, and fit trains)"""
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[
        _KeepsASet({0}), ModelCheckpoint(tmp_path / "w.weights.npz", monitor="loss",
                                         save_weights_only=True)])
    assert model.optimizer.iterations == 4 and (tmp_path / "w.weights.npz").exists()


class _LastLoss(Callback):
    """Keeps a state its first on_epoch_end sets: get_state() fails before that."""

    def on_epoch_end(self, epoch, logs=None):
        self.last = float(logs["loss"])

    def get_state(self):
        return {"last": self.last}

    def set_state(self, state):
        self.last = self.restored = state["last"]


def test_a_callback_state_set_in_its_first_epoch_does_not_refuse_the_fit(data, tmp_path):
    """A get_state() that fails before the first epoch ends (an attribute set there) is not
    the early check's to refuse: fit trains, saves the state and resumes it (was: a bare
    AttributeError before the first step; and at the resume, which keeps each callback as
    it was to put it back if refused: it is put back by its attributes)."""
    class Unreadable(Callback):  # (its saved state refused at the resume, after _LastLoss's)
        trained = 0

        def on_epoch_end(self, epoch, logs=None):
            self.trained = 1

        def get_state(self):
            return {"trained": self.trained}

        def set_state(self, state):
            if state["trained"]:
                raise ValueError("not this one")

    path, refusing = tmp_path / "c.npz", tmp_path / "r.npz"
    first = _LastLoss()
    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[first],
                      checkpoint=path)
    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0,
                      callbacks=[_LastLoss(), Unreadable()], checkpoint=refusing)
    refused = _LastLoss()
    with pytest.raises(DataFormatError, match="not this one"):  # (put back: as it was)
        small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                          callbacks=[refused, Unreadable()], checkpoint=refusing, resume=True)
    assert not hasattr(refused, "last") and not hasattr(refused, "restored")
    resumed = _LastLoss()
    model = small_model()
    model.fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[resumed],
              checkpoint=path, resume=True)
    assert model.optimizer.iterations == 8 and load_checkpoint(path).epoch == 2
    assert resumed.restored == first.last != resumed.last


# -- Keras' positional order ----------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda p: EarlyStopping("val_loss", 0, 3, 1),  # (Keras: verbose fourth)
    lambda p: ReduceLROnPlateau("val_loss", 0.2, 5, 1),  # (Keras: verbose fourth)
    lambda p: ModelCheckpoint(p, "val_loss", 1, True),  # (Keras: verbose third)
    lambda p: BackupAndRestore(p, "epoch", False),  # (Keras: double_checkpoint third)
])
def test_keras_positional_slips_are_type_errors(make, tmp_path):
    with pytest.raises(TypeError, match="positional argument"):
        make(tmp_path / "m.npz")


def test_keras_positional_prefix_means_what_it_does_in_keras(tmp_path):
    stop = EarlyStopping("loss", 0.5, 3)
    assert (stop.monitor, stop.min_delta, stop.patience) == ("loss", 0.5, 3)
    lr = ReduceLROnPlateau("loss", 0.2, 5)
    assert (lr.monitor, lr.factor, lr.patience) == ("loss", 0.2, 5)
    assert ModelCheckpoint(tmp_path / "m.npz", "loss").monitor == "loss"
    assert BackupAndRestore(tmp_path / "b.npz", 3).save_freq == 3


EARLIER_LOG = "epoch,accuracy,loss,seconds\n0,0.5,1.5,0.1\n1,0.5,1.4,0.1\n2,0.6,1.3,0.1\n"


def _fail_at_end_of(stop):
    """A callback that raises at epoch ``stop``'s end, after the CSVLogger before it wrote the
    epoch's row and before fit's BackupAndRestore (last) backed the epoch up."""
    def fail(epoch, logs):
        if epoch == stop:
            raise RuntimeError("stop")
    return LambdaCallback(on_epoch_end=fail)


def _fit_logged(data, log, backup, *extra, save_freq="epoch"):
    return small_model().fit(*data, epochs=4, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(backup, save_freq), CSVLogger(log, append=True), *extra])


def _logged(log):
    with open(log, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("save_freq, stop", [("epoch", 2), (2, 0), (2, 2)])
@pytest.mark.parametrize("earlier", [None, EARLIER_LOG], ids=["new", "earlier"])
def test_a_resumed_csv_logger_appending_drops_the_rows_written_after_the_backup(
        data, tmp_path, save_freq, stop, earlier):
    """A run stopped after CSVLogger(append=True) wrote epoch ``stop``'s row but before its
    backup (at each epoch's end, or every 2 steps) resumes at that epoch: the checkpoint
    records the file's size and CRC-32, and the resumed run drops what was written after it
    (the row; the header too, where the file was not there at the backup) and writes each
    epoch once, with no warning (was: the epoch's row twice, and a warning). An earlier run's
    rows (``earlier``: the file appended to) all stay, even those of the same epochs."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    if earlier:
        log.write_text(earlier)
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, _fail_at_end_of(stop), save_freq=save_freq)
    kept = 3 if earlier else 0
    assert [r["epoch"] for r in _logged(log)][kept:] == [str(e) for e in range(stop + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = _fit_logged(data, log, backup, save_freq=save_freq)
    rows = _logged(log)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] * bool(earlier) + ["0", "1", "2", "3"]
    assert [float(r["loss"]) for r in rows[kept:]] == history.history["loss"]
    if earlier:
        assert log.read_text().startswith(earlier)


def test_a_resumed_csv_logger_cuts_its_file_in_place(data, tmp_path):
    """The rows a resumed run drops are cut from the user's file itself: its mode, its hard
    links and a reader following it (``tail -f``) see the resumed rows (a replaced file was
    a new one, readable by everyone, the links and the reader left with the old rows)."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, _fail_at_end_of(2))
    log.chmod(0o600)
    os.link(log, tmp_path / "hard.csv")
    inode = log.stat().st_ino
    _fit_logged(data, log, backup)
    assert (log.stat().st_ino, log.stat().st_mode & 0o777) == (inode, 0o600)
    assert [r["epoch"] for r in _logged(tmp_path / "hard.csv")] == ["0", "1", "2", "3"]


def test_a_resumed_csv_logger_whose_file_cannot_be_cut_appends_and_warns(
        data, tmp_path, monkeypatch):
    """Where the file cannot be cut back (an append-only file: EPERM), the resumed run appends,
    as for a checkpoint without the record, with a warning (was: the bare "Operation not
    permitted" ended the resumed fit at its first epoch's end, before its backup)."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, _fail_at_end_of(2))
    stopped = log.read_text()

    def refused(path, size):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "truncate", refused)
    with pytest.warns(RuntimeWarning, match=r"cannot cut its file .* \(PermissionError: "
                                            r"Operation not permitted\): it appends, and the "
                                            r"epochs from 2 on may have two rows"):
        history = _fit_logged(data, log, backup)
    assert log.read_text().startswith(stopped)
    rows = _logged(log)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "2", "3"]
    assert [float(r["loss"]) for r in rows[3:]] == history.history["loss"][2:]


def test_resuming_an_earlier_checkpoint_of_a_finished_run_keeps_its_rows(data, tmp_path):
    """A copy of a finished run's checkpoint of epoch 2, resumed: the finished run's rows of
    epochs 2 and 3 after the recorded bytes are not what a stop leaves (one row at most), so
    they stay, and the resumed rows are appended with a warning (they were dropped)."""
    log, backup, copy = tmp_path / "log.csv", tmp_path / "b.npz", tmp_path / "b2.npz"
    keep = LambdaCallback(on_epoch_begin=lambda e, _: shutil.copy(backup, copy) if e == 2
                          else None)
    small_model().fit(*data, epochs=4, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(backup, delete_checkpoint=False), CSVLogger(log, append=True), keep])
    finished = log.read_text()
    with pytest.warns(RuntimeWarning, match="may have two rows"):
        _fit_logged(data, log, copy)
    assert log.read_text().startswith(finished)
    assert [r["epoch"] for r in _logged(log)] == ["0", "1", "2", "3", "2", "3"]


def test_a_resumed_run_stopped_again_before_its_first_row_keeps_the_record_it_resumed_from(
        data, tmp_path):
    """A resumed run's backups before its first row (every 2 steps here) record the file as
    the checkpoint it resumed from had it, not as it is (the stopped run's row of epoch 2 is
    still there, to be dropped): a run resumed from them drops that row too."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, _fail_at_end_of(2))
    steps = []

    def fail(batch, logs):
        steps.append(batch)
        if len(steps) == 3:  # (epoch 2's third step, after its backup at the second)
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, LambdaCallback(on_train_batch_end=fail), save_freq=2)
    assert [r["epoch"] for r in _logged(log)] == ["0", "1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = _fit_logged(data, log, backup, save_freq=2)
    rows = _logged(log)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == history.history["loss"]


def test_a_resumed_csv_logger_appends_to_a_file_changed_since_the_backup_and_warns(
        data, tmp_path):
    """Where the file does not begin with what the checkpoint recorded (an earlier row edited,
    the file replaced), or what follows is not the stopped run's rows of the epochs resumed
    (another run appended after it), nothing is dropped: the resumed run appends, as it did
    before the record, and warns where the file's last row is of an epoch it writes again."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"

    def stopped():
        backup.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        with pytest.raises(RuntimeError, match="stop"):
            _fit_logged(data, log, backup, _fail_at_end_of(2))
        return log.read_text()

    repeats = "ends with a row of epoch 2, and this resumed run appends rows from epoch 2"
    for change in (lambda text: text.replace("\n0,", "\n0,0", 1),  # (row 0 edited)
                   lambda text: EARLIER_LOG):  # (the file replaced)
        edited = change(stopped())
        log.write_text(edited)
        with pytest.warns(RuntimeWarning, match=repeats):
            _fit_logged(data, log, backup)
        assert log.read_text().startswith(edited)
        assert [r["epoch"] for r in _logged(log)] == ["0", "1", "2", "2", "3"]
    # another run's rows after the stopped run's: all kept
    text = stopped()
    other = "".join(f"{e},0.5,1.5,0.1\n" for e in range(2))
    log.write_text(text + other)
    _fit_logged(data, log, backup)
    assert log.read_text().startswith(text + other)
    assert [r["epoch"] for r in _logged(log)] == ["0", "1", "2", "0", "1", "2", "3"]


def test_a_checkpoint_without_csv_logs_resumes_as_before(data, tmp_path):
    """A checkpoint of the code before the record (no ``csv_logs``: the same file but for that
    key, which is apart from the callbacks' states) resumes as it did: every stateful
    callback's state goes on from it (none starts afresh), and the CSVLogger appends, the
    stopped run's row of epoch 2 then the resumed run's, with the warning."""
    from test_checkpoint import _rewrite

    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    stop = EarlyStopping("loss", patience=10, restore_best_weights=True)
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, log, backup, stop, _fail_at_end_of(2))
    _rewrite(backup, lambda config: config.pop("csv_logs", None))
    resumed = EarlyStopping("loss", patience=10, restore_best_weights=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_logged(data, log, backup, resumed)
    said = [str(w.message) for w in caught]
    assert any("ends with a row of epoch 2, and this resumed run appends rows from epoch 2" in s
               for s in said)
    assert not any("afresh" in s for s in said), said
    assert [r["epoch"] for r in _logged(log)] == ["0", "1", "2", "2", "3"]


def test_checkpoints_record_the_files_of_appending_csv_loggers_only(data, tmp_path):
    """Only a CSVLogger that appends has its file recorded (a new file's resumed run writes it
    afresh): a run without one writes the checkpoint as before, with no ``csv_logs``; a bad
    entry is refused by name, before anything is resumed."""
    from test_checkpoint import _rewrite

    backup, log = tmp_path / "backup.npz", tmp_path / "log.csv"
    for logger in (CSVLogger(tmp_path / "new.csv"), CSVLogger(log, append=True)):
        backup.unlink(missing_ok=True)
        small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
            BackupAndRestore(backup, delete_checkpoint=False), logger])
    assert _config(backup)["csv_logs"] == [{"path": str(log), "size": len(log.read_bytes()),
                                            "crc32": zlib.crc32(log.read_bytes())}]
    _rewrite(backup, lambda config: config.pop("csv_logs"))
    written_before = _config(backup)
    backup.unlink()
    small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(backup, delete_checkpoint=False), CSVLogger(tmp_path / "new.csv")])
    assert _config(backup).keys() == written_before.keys()
    for bad in (-1, 2.5, None):
        _rewrite(backup, lambda config, bad=bad: config.update(
            csv_logs=[{"path": str(log), "size": bad, "crc32": 0}]))
        with pytest.raises(DataFormatError, match="bad csv_logs entry"):
            small_model().fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
                BackupAndRestore(backup), CSVLogger(log, append=True)])


def _counting_reads(monkeypatch, log):
    """How many times the callbacks open ``log`` to read its bytes (a backup's hash)."""
    reads = []

    def counting(file, mode="r", *args, **kwargs):
        if mode == "rb" and os.path.abspath(file) == str(log):
            reads.append(file)
        return open(file, mode, *args, **kwargs)
    monkeypatch.setattr(xpcnn.callbacks, "open", counting, raising=False)
    return reads


def test_a_backup_with_no_row_written_since_the_last_does_not_read_the_log(data, tmp_path,
                                                                           monkeypatch):
    """A CSVLogger(append=True)'s file is read (for its CRC-32) by a backup only where it
    changed since the last one read it: a backup every step reads it once an epoch, after
    the epoch's row (was: at every backup, the whole log each time); a change by anyone
    else (another run's row, mid-epoch) is read at the next backup, which records it."""
    log, backup = tmp_path / "log.csv", tmp_path / "backup.npz"
    reads = _counting_reads(monkeypatch, log)
    small_model().fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(backup, 1, delete_checkpoint=False), CSVLogger(log, append=True)])
    assert len(reads) == 3  # (12 backups: none before the first row, one after each row)
    assert _config(backup)["csv_logs"] == [{"path": str(log), "size": len(log.read_bytes()),
                                            "crc32": zlib.crc32(log.read_bytes())}]
    reads.clear()

    def another_row(batch, logs):
        if batch == 1:
            with open(log, "a") as f:
                f.write("9,0.5,1.5,0.1\n")

    small_model().fit(*data, epochs=1, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(tmp_path / "b2.npz", 1, delete_checkpoint=False),
        LambdaCallback(on_train_batch_end=another_row), CSVLogger(log, append=True)])
    assert len(reads) == 3  # (after steps 1 and 2, the other row between, and the epoch's)
    assert _config(tmp_path / "b2.npz")["csv_logs"][0]["crc32"] == zlib.crc32(log.read_bytes())


def test_a_csv_logger_writes_the_file_its_fit_began_with(data, tmp_path, monkeypatch):
    """A relative filename names the file in the working folder as fit begins (where Keras
    3's CSVLogger opens it), which its checkpoints record: a chdir during fit moves no row
    (was: the later rows went to a file of the new folder, recorded there)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    backup = tmp_path / "backup.npz"
    move = LambdaCallback(on_epoch_end=lambda epoch, logs: os.chdir(tmp_path / "b"))
    history = small_model().fit(*data, epochs=3, batch_size=BATCH, verbose=0, callbacks=[
        BackupAndRestore(backup, delete_checkpoint=False), CSVLogger("log.csv", append=True),
        move])
    log = tmp_path / "a" / "log.csv"
    assert [float(r["loss"]) for r in _logged(log)] == history.history["loss"]
    assert not (tmp_path / "b" / "log.csv").exists()
    assert _config(backup)["csv_logs"][0]["path"] == str(log)


def test_a_csv_logger_in_a_deleted_working_folder(data, tmp_path, monkeypatch):
    """An absolute filename needs no working folder; a relative one in a deleted folder is
    refused by name (was: os.getcwd()'s bare FileNotFoundError for both, from the change that
    resolves relative names as fit begins)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    log = tmp_path / "log.csv"
    history = small_model().fit(*data, epochs=2, batch_size=BATCH, verbose=0,
                                callbacks=[CSVLogger(str(log))])
    assert [float(r["loss"]) for r in _logged(log)] == history.history["loss"]
    with pytest.raises(InputError, match=r"^cannot write the CSVLogger file 'rel.csv': a "
                                         r"relative name, and the working folder is gone"):
        small_model().fit(*data, epochs=1, verbose=0, callbacks=[CSVLogger("rel.csv")])


def test_a_run_resumed_in_another_folder_writes_that_folders_file(data, tmp_path, monkeypatch):
    """A relative filename resumed from another working folder names another file, as in
    Keras 3, which the checkpoint has no record of: it gets the whole run's rows (the
    restored epochs first, as a new file does), and the stopped run's file is left as it
    is (not cut: the record is of that file, found by its absolute path)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    backup = tmp_path / "backup.npz"
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(RuntimeError, match="stop"):
        _fit_logged(data, "log.csv", backup, _fail_at_end_of(2))
    stopped = (tmp_path / "a" / "log.csv").read_text()
    monkeypatch.chdir(tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = _fit_logged(data, "log.csv", backup)
    assert (tmp_path / "a" / "log.csv").read_text() == stopped
    rows = _logged(tmp_path / "b" / "log.csv")
    assert [float(r["loss"]) for r in rows] == history.history["loss"]


def _config(checkpoint):
    from xpcnn.saving.npz import CONFIG_KEY, decode_json

    with np.load(checkpoint) as f:
        return decode_json(f[CONFIG_KEY], str(checkpoint))


def test_the_keras_comparison_script_drives_xpcnn_callbacks_without_crashing(monkeypatch,
                                                                             tmp_path):
    """scripts/keras_callbacks_check.py (README's comparison with Keras) drives xpcnn's
    callbacks through its cases on a real model (was: an AttributeError on its fake model,
    metrics_names then layers, before comparing anything). Keras itself stands in as a stub
    here: its side of the comparison runs where Keras is installed."""
    import importlib.util
    import sys

    stub = SimpleNamespace(metrics=SimpleNamespace(Accuracy=lambda name: None))
    compile_utils = SimpleNamespace(MetricsList=list)
    for name, module in (("keras", stub), ("keras.src", SimpleNamespace()),
                         ("keras.src.trainers", SimpleNamespace()),
                         ("keras.src.trainers.compile_utils", compile_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    path = Path(__file__).parent.parent / "scripts" / "keras_callbacks_check.py"
    spec = importlib.util.spec_from_file_location("keras_callbacks_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng, kinds = random.Random(0), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(40):
            kind, kw, seq, monitor = script.case(rng)
            if kind == "ModelCheckpoint":
                kw.update(filepath=str(tmp_path / "m.npz"), save_weights_only=True)
            result = script.run(getattr(script.xc, kind), kw, seq, monitor, 2,
                                script.xpcnn_model())
            if result != "error":
                kinds.add(kind)
                assert result["epochs run"] >= 1
    assert kinds == {"EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint",
                     "LearningRateScheduler"}


def test_evaluate_and_predict_bars_honour_tqdm_disable_as_fits_do(data, capsys):
    """TQDM_DISABLE=1 (set for the tests by conftest.py) hides evaluate's and predict's bars
    as it hides fit's: tqdm's environment variables set the defaults of its arguments, which
    the bars no longer override (they passed disable=False, and drew where fit's did not)."""
    model = small_model()
    model.fit(*data, epochs=1, batch_size=BATCH, verbose=1)
    model.evaluate(*data, batch_size=BATCH, verbose=1)
    model.predict(data[0], batch_size=BATCH, verbose=1)
    assert capsys.readouterr().err == ""
