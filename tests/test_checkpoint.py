"""Checkpoints: a run that is killed and resumed ends bit for bit where an uninterrupted one does.

The runs come from ``ckpt_train.py`` (random flips, crops and dropout, BatchNorm, Adam with a
cosine schedule): in-process with an exception standing in for the interruption, and as a
subprocess killed with SIGKILL at a random moment, or dying in the middle of a checkpoint write.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ckpt_train
import numpy as np
import pytest

import xpcnn
from xpcnn import files
from xpcnn.cli import main as cli_main
from xpcnn.errors import DataFormatError, InputError, NonFiniteError
from xpcnn.layers import Conv2D, Dense, Flatten, GlobalAvgPool2D, Softmax
from xpcnn.saving.checkpoint import (
    Progress,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)

SCRIPT = Path(__file__).with_name("ckpt_train.py")
STEPS = ckpt_train.EPOCHS * 8


class Interrupt(BaseException):
    """Stands in for a crash or Ctrl-C in the middle of training."""


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run: final weights and history."""
    model, history = ckpt_train.train()
    return model.get_weights(), history


def assert_same_run(weights, history, reference):
    ref_weights, ref_history = reference
    assert len(weights) == len(ref_weights)
    for i, (a, b) in enumerate(zip(weights, ref_weights, strict=True)):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"weight array {i} differs"
    assert history["epoch"] == ref_history.epoch == list(range(ckpt_train.EPOCHS))
    for key in ("loss", "accuracy"):
        assert history["history"][key] == ref_history.history[key], key
    assert all(s > 0 for s in history["history"]["seconds"])


def interrupted(path, after_steps, every=ckpt_train.EVERY, model=None):
    """Run until ``after_steps`` steps are done, then raise as a crash would."""
    model = model or ckpt_train.make_model()
    step, count = model.train_step, [0]

    def train_step(xb, yb):
        if count[0] == after_steps:
            raise Interrupt
        count[0] += 1
        return step(xb, yb)

    model.train_step = train_step
    with pytest.raises(Interrupt):
        ckpt_train.train(str(path), every=every, model=model)


def resumed(path, **kwargs):
    """``ckpt_train.train`` resuming from ``path``, and how many steps it ran itself: those
    after the checkpoint only (the same weights from a run that ignored the checkpoint and
    trained afresh would tell nothing)."""
    steps_run = []
    model, history = ckpt_train.train(str(path), resume=True, steps_run=steps_run, **kwargs)
    return model, history, len(steps_run)


def as_dict(history):
    return {"epoch": history.epoch, "history": history.history}


# -- in-process --------------------------------------------------------------------------------


@pytest.mark.parametrize("after_steps, every", [(3, 1), (8, 1), (13, 5), (21, "epoch"),
                                                (17, 4)])
def test_resumed_run_equals_uninterrupted_run(tmp_path, reference, after_steps, every):
    path = tmp_path / "run.ckpt.npz"
    interrupted(path, after_steps, every)
    ckpt = load_checkpoint(path)
    done = ckpt.epoch * 8 + ckpt.step
    # The last checkpoint is the last multiple of `every` (or epoch end) reached.
    period = 8 if every == "epoch" else every
    assert done == max(k for k in range(after_steps + 1) if k % period == 0 or k % 8 == 0)
    assert ckpt.model.optimizer.iterations == done
    model, history, ran = resumed(path, every=every)
    assert ran == STEPS - done
    assert_same_run(model.get_weights(), as_dict(history), reference)
    assert load_checkpoint(path).progress == Progress(ckpt_train.EPOCHS)


def test_resume_twice_and_after_the_end(tmp_path, reference):
    path = tmp_path / "run.npz"
    interrupted(path, 6)
    model = ckpt_train.make_model()
    step, count = model.train_step, [0]

    def train_step(xb, yb):
        if count[0] == 9:
            raise Interrupt
        count[0] += 1
        return step(xb, yb)

    model.train_step = train_step
    with pytest.raises(Interrupt):
        ckpt_train.train(str(path), resume=True, model=model)
    assert load_checkpoint(path).model.optimizer.iterations == 10  # 5 + 9 steps: last at 10
    model, history, ran = resumed(path)
    assert ran == STEPS - 10
    assert_same_run(model.get_weights(), as_dict(history), reference)
    # Resuming a finished run trains nothing more and returns its whole history.
    again, history, ran = resumed(path)
    assert ran == 0
    assert_same_run(again.get_weights(), as_dict(history), reference)


def test_resume_without_a_file_starts_afresh(tmp_path, reference):
    model, history = ckpt_train.train(str(tmp_path / "new.npz"), resume=True)
    assert_same_run(model.get_weights(), as_dict(history), reference)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_mixed_precision_loss_scale_is_restored(tmp_path):
    def run(path=None, resume=False, stop=None, steps_run=None):
        model = ckpt_train.make_model("mixed_float16")
        model.loss_scale = 2.0**24  # float16 overflows: the first steps lower the scale
        if stop is not None:
            step, count = model.train_step, [0]

            def train_step(xb, yb):
                if count[0] == stop:
                    raise Interrupt
                count[0] += 1
                return step(xb, yb)

            model.train_step = train_step
        with np.errstate(all="ignore"):
            ckpt_train.train(path, resume=resume, every=1, model=model, steps_run=steps_run)
        return model

    ref = run()
    assert ref.loss_scale < 2.0**24
    path = str(tmp_path / "mp.npz")
    with pytest.raises(Interrupt):
        run(path, stop=3)
    ckpt = load_checkpoint(path)
    assert ckpt.model.loss_scale < 2.0**24 and ckpt.model.optimizer.iterations == 3
    steps_run = []
    again = run(path, resume=True, steps_run=steps_run)
    assert len(steps_run) == STEPS - 3
    assert again.loss_scale == ref.loss_scale and again._good_steps == ref._good_steps
    for a, b in zip(again.get_weights(), ref.get_weights(), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_a_loss_scale_beyond_float32_is_refused(tmp_path, scale):
    """The loss scale is held in float32: a finite 1e300 would become infinity (every later
    step skipped, silently) and 1e-300 zero, so a checkpoint holding one is refused."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], input_shape=(4,), seed=0)
    model.compile(optimizer="adam", precision="mixed_float16")
    path = tmp_path / "ls.npz"
    save_checkpoint(model, path)
    _rewrite(path, lambda config: config.update(loss_scale=scale))
    with pytest.raises(DataFormatError, match=rf"invalid checkpoint: loss_scale "
                                              rf"{re.escape(repr(scale))}, expected a number "
                                              r"from 1.175e-38 to 3.403e\+38 \(it is held in "
                                              "float32"):
        load_checkpoint(path)


def test_a_loss_scale_in_a_float32_models_checkpoint_is_refused_before_restoring(tmp_path):
    """A float32 model has no loss scale: a checkpoint of one that says 8 is refused before
    anything is restored (the model's setter refused it after the weights were replaced)."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], input_shape=(4,), seed=0)
    model.compile(optimizer="adam")
    path = tmp_path / "ls.npz"
    save_checkpoint(model, path)
    _rewrite(path, lambda config: config.update(loss_scale=8.0))
    before = model.get_weights()
    model.set_weights([w + 1 for w in before])
    changed = model.get_weights()
    with pytest.raises(DataFormatError, match="loss_scale 8.0 in a checkpoint of a model "
                                              "without float16 loss scaling"):
        restore_checkpoint(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), changed, strict=True))


def test_a_mixed_bfloat16_run_resumes_bit_for_bit(tmp_path):
    """bfloat16 activations (ml_dtypes' on NumPy) and no loss scale: a run stopped after 3
    steps and resumed from its checkpoint ends with the weights of one that never stopped."""
    ref, _ = ckpt_train.train(model=ckpt_train.make_model("mixed_bfloat16"))
    assert ref.loss_scale == 1.0 and str(ref.layers[2].compute_dtype) == "bfloat16"
    path = tmp_path / "bf.npz"
    interrupted(path, 3, every=1, model=ckpt_train.make_model("mixed_bfloat16"))
    assert load_checkpoint(str(path)).model.precision == "mixed_bfloat16"
    again, _ = ckpt_train.train(str(path), resume=True, every=1,
                                model=ckpt_train.make_model("mixed_bfloat16"))
    for a, b in zip(again.get_weights(), ref.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_checkpoint_holds_every_piece_of_state(tmp_path):
    path = tmp_path / "c.npz"
    interrupted(path, 11, every=1)
    ckpt = load_checkpoint(path)
    model = ckpt.model
    assert (ckpt.epoch, ckpt.step) == (1, 3)
    assert model.optimizer.iterations == 11
    assert model.optimizer.lr == pytest.approx(xpcnn.optim.CosineDecay(1e-2, 24)(11))
    assert set(model.optimizer.slots) == {"m", "v"}
    flip, crop, dropout = model.layers[0], model.layers[1], model.layers[7]
    assert flip.calls == crop.calls == dropout.calls == 11
    assert len(ckpt.history.epoch) == 1 and ckpt.progress.seen == 24.0
    # A checkpoint is also a model file, and its weights load into the same architecture.
    same = xpcnn.load_model(str(path))
    fresh = ckpt_train.make_model()
    fresh.load_weights(path)
    for a, b, c in zip(model.get_weights(), same.get_weights(), fresh.get_weights(), strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_a_model_with_a_frozen_layer_resumes_bit_for_bit(tmp_path):
    """The optimiser has slots for the trainable parameters only; a checkpoint maps them back."""
    def make():
        model = ckpt_train.make_model()
        model.build((8, 8, 3))
        model.layers[3].trainable = False  # the convolution
        return model

    reference, _ = ckpt_train.train(model=make())
    path = tmp_path / "c.npz"
    model = make()
    interrupted(path, 13, every=1, model=model)
    ckpt = load_checkpoint(path)
    assert ckpt.model.layers[3].trainable is False
    assert len(ckpt.model.optimizer.slots["m"]) == len(model.optimizer.slots["m"]) == 4
    resumed, _ = ckpt_train.train(str(path), resume=True, model=ckpt.model)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_a_frozen_model_with_a_layer_unfrozen_checkpoints_and_restores_its_own_flag(tmp_path):
    """The model's own flag masks its layers' (Keras'): a model frozen whole, one layer then
    unfrozen, trains none, so Adam has no slots; its checkpoint was written as if that layer
    trained (a bare "zip() argument 2 is longer"), and restore_checkpoint into a model whose
    own flag is True left it True."""
    def make():
        model = ckpt_train.make_model()
        model.build((8, 8, 3))
        model.trainable = False
        model.layers[3].trainable = True
        return model

    path = tmp_path / "c.npz"
    model = make()
    interrupted(path, 13, every=1, model=model)
    assert model.optimizer.slots["m"] == [] and model.trainable_weights == []
    fresh = ckpt_train.make_model()  # (its own flag True)
    restore_checkpoint(fresh, path)
    for restored in (load_checkpoint(path).model, fresh):
        assert restored.trainable is False and restored.layers[3].trainable is True
        assert restored.trainable_weights == [] and restored.optimizer.slots["m"] == []
        assert all(np.array_equal(a, b) for a, b in zip(restored.get_weights(),
                                                        model.get_weights(), strict=True))


def test_a_malformed_model_flag_is_refused_by_every_reader_naming_it(tmp_path):
    """A hand-edited "trainable": "no" was read as True by restore_checkpoint, and refused by
    load_checkpoint and load_model as a vague "invalid model configuration (InputError:
    ...)". A checkpoint refused once its flags were taken puts them back."""
    def make(**kwargs):
        model = xpcnn.Sequential([xpcnn.Input((4,)), Dense(2)], **kwargs)
        model.compile(optimizer="sgd")
        return model

    path, model_path = tmp_path / "c.npz", tmp_path / "m.npz"
    save_checkpoint(make(trainable=False), path)
    make(trainable=False).save(model_path)
    _rewrite(path, lambda config: config["model"].update(trainable="no"))
    _rewrite(model_path, lambda config: config.update(trainable="no"))
    message = r"invalid model configuration: trainable is 'no', expected true or false$"
    fresh = make()
    for read in (lambda: restore_checkpoint(fresh, path), lambda: load_checkpoint(path),
                 lambda: xpcnn.load_model(model_path)):
        with pytest.raises(DataFormatError, match=message):
            read()
    assert fresh.trainable
    _rewrite(path, lambda config: config["model"].update(trainable=False) or config.update(
        run=None))
    with pytest.raises(DataFormatError, match="no run description"):
        restore_checkpoint(fresh, path)
    assert fresh.trainable and fresh.layers[0].trainable and len(fresh.trainable_weights) == 2


def test_loading_into_an_unbuilt_flatten_first_model_warns_of_no_batch_size(tmp_path):
    """load_weights and restore_checkpoint into an unbuilt Flatten-first model, from a file of
    (8, 5, 5, 1) samples, warned that model.build((8, 5, 5, 1)) might have been given a batch
    size: the build was the file's, not the user's."""
    source = xpcnn.Sequential([Flatten(), Dense(2)])
    source.build((None, 8, 5, 5, 1))
    source.compile(optimizer="sgd")
    source.save_weights(tmp_path / "w.npz")
    save_checkpoint(source, tmp_path / "c.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = xpcnn.Sequential([Flatten(), Dense(2)])
        loaded.load_weights(tmp_path / "w.npz")
        restored = xpcnn.Sequential([Flatten(), Dense(2)])
        restored.compile(optimizer="sgd")
        restore_checkpoint(restored, tmp_path / "c.npz")
    for model in (loaded, restored):
        assert model.input_shape == (None, 8, 5, 5, 1)
        for a, b in zip(model.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.warns(UserWarning, match=r"if 8 is a batch size"):  # (the user's build warns)
        xpcnn.Sequential([Flatten(), Dense(2)]).build((8, 5, 5, 1))


class FreezeAfterEpoch1(xpcnn.callbacks.Callback):
    """Fine-tuning: the first Dense layer is frozen at the end of epoch 1."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.model.layers[1].trainable = False


class StopAtBatch(xpcnn.callbacks.Callback):
    """A crash before the batch that follows ``at`` batches."""

    def __init__(self, at):
        super().__init__()
        self.at, self.done = at, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.done == self.at:
            raise Interrupt
        self.done += 1


@pytest.mark.parametrize("stop", [3, 5])  # at the end of epoch 1; two steps into epoch 2
def test_a_layer_frozen_mid_run_checkpoints_and_resumes_bit_for_bit(tmp_path, stop):
    """The checkpoint written after a callback froze a layer holds the slots the next step
    uses: none at the end of that epoch (the step starts them afresh; was: IndexError, the old
    slots paired with the new trainable parameters), the frozen layer's others later. The
    freeze comes back with it (a resumed run never calls the callback's epoch 1 again), and the
    resumed run ends bit for bit where the uninterrupted one does."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 6)).astype(np.float32), np.arange(24) % 3

    def run(callbacks=(), **kwargs):
        model = xpcnn.Sequential([Flatten(), Dense(8, activation="relu"), Dense(3), Softmax()],
                                 seed=0)
        model.compile(optimizer="adam")
        model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                  callbacks=[FreezeAfterEpoch1(), *callbacks], **kwargs)
        return model

    reference = run()
    path = tmp_path / "freeze.npz"
    with pytest.raises(Interrupt):
        run([StopAtBatch(stop)], checkpoint=path, checkpoint_every=1)
    ckpt = load_checkpoint(path)
    assert ckpt.model.optimizer.iterations == stop
    assert ckpt.model.layers[1].trainable is False
    assert len(ckpt.model.optimizer.slots.get("m", [])) == (0 if stop == 3 else 2)
    if stop == 5:  # (Adam's moments made at step 4: its bias correction counts from there)
        assert int(np.asarray(ckpt.model.optimizer.applied)) == 2
    resumed = run(checkpoint=path, resume=True)
    assert resumed.layers[1].trainable is False
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_slots_go_with_the_layers_they_belong_to_when_which_are_trained_changes(tmp_path):
    """Two Dense layers of one shape swap which is trained: until the next step the optimiser
    still holds the first one's moments, which a checkpoint wrote as the second one's. It holds
    none, as the next step sees them; and slots restored into a model whose last step trained
    other layers are kept (that step's plan dropped them)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype(np.float32), np.arange(16) % 4

    def make(frozen):
        model = xpcnn.Sequential([Dense(4, name="a"), Dense(4, name="b")], input_shape=(4,),
                                 seed=0)
        model.layers[frozen].trainable = False
        model.compile(optimizer="adam")
        return model

    def same(m1, m2):
        return all(np.array_equal(a, b)
                   for a, b in zip(m1.get_weights(), m2.get_weights(), strict=True))

    model = make(frozen=0)
    for _ in range(3):
        model.train_on_batch(x, y)
    model.layers[0].trainable, model.layers[1].trainable = True, False
    path = tmp_path / "swap.npz"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path).model
    assert loaded.optimizer.slots == {}
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    assert same(model, loaded)
    save_checkpoint(model, path)  # slots of "a" only
    other = make(frozen=0)
    other.train_on_batch(x, y)  # its slots are "b"'s
    other.layers[0].trainable = True
    restore_checkpoint(other, path)
    assert other.layers[1].trainable is False
    model.train_on_batch(x, y)
    other.train_on_batch(x, y)
    assert same(model, other)


def test_rmsprop_with_all_its_slots_resumes_bit_for_bit(tmp_path):
    """RMSprop's slots (mean square, mean gradient, momentum) and settings go into the
    checkpoint: a run stopped after epoch 2 and resumed ends with the weights, bit for bit, of
    the run never stopped."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 32)

    def run(callbacks=(), **kwargs):
        model = ckpt_train.make_model()  # (random layers, BatchNorm: every kind of state)
        model.compile(optimizer=xpcnn.optim.RMSprop(1e-3, momentum=0.9, centered=True,
                                                    weight_decay=1e-4))
        model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=list(callbacks), **kwargs)
        return model

    reference = run()
    path = tmp_path / "rms.ckpt"

    class Stop(xpcnn.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([Stop()], checkpoint=path)
    ckpt = load_checkpoint(path)
    assert set(ckpt.model.optimizer.slots) == {"v", "mean_grad", "momentum"}
    assert ckpt.model.optimizer.get_config() == reference.optimizer.get_config()
    resumed = run(checkpoint=path, resume=True)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_amsgrad_run_resumes_bit_for_bit_with_its_third_slot(tmp_path):
    """AdamW with amsgrad: the checkpoint holds the largest second moments with m and v, and
    the setting; a run stopped after epoch 1 and resumed ends bit for bit where the run never
    stopped does; a model compiled without amsgrad refuses the checkpoint, naming it."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 6)).astype(np.float32), np.arange(24) % 3

    def model(amsgrad=True):
        out = xpcnn.Sequential([Flatten(), Dense(8, activation="relu"), Dense(3), Softmax()],
                               seed=0)
        out.compile(optimizer=xpcnn.optim.AdamW(1e-2, beta_2=0.9, amsgrad=amsgrad))
        return out

    def run(callbacks=(), **kwargs):
        out = model()
        out.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=list(callbacks), **kwargs)
        return out

    class Stop(xpcnn.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # (the checkpoint of epoch 1 is not written yet: epoch 0's is)
                raise KeyboardInterrupt

    reference = run()
    path = tmp_path / "amsgrad.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run([Stop()], checkpoint=path)
    opt = load_checkpoint(path).model.optimizer
    assert opt.amsgrad is True and set(opt.slots) == {"m", "v", "vhat"}
    assert any((h > v).any() for h, v in zip(opt.slots["vhat"], opt.slots["v"], strict=True))
    resumed = run(checkpoint=path, resume=True)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"compile\.optimizer\.amsgrad is True there"):
        restore_checkpoint(model(amsgrad=False), path)


def _rewrite(path, edit_config, edit_arrays=lambda arrays: None):
    """Rewrite checkpoint ``path`` as an older xpcnn would have written it."""
    from xpcnn.saving.npz import CONFIG_KEY, decode_json, encode_json, write_npz_atomic

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    config = decode_json(arrays[CONFIG_KEY], str(path))
    edit_config(config)
    edit_arrays(arrays)
    arrays[CONFIG_KEY] = encode_json(config)
    write_npz_atomic(path, arrays)


def test_slots_stored_in_another_float_dtype_load_in_the_parameters(tmp_path):
    """A checkpoint whose optimizer slots are float64 (or float16) for a float32 model: they
    load as float32, the dtype the fused updates read them in, and the run resumes."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.RMSprop(0.01, momentum=0.9))
    x, y = np.random.default_rng(0).normal(size=(8, 4)), np.arange(8) % 3
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    for dtype in (np.float64, np.float16):
        path = tmp_path / f"s-{np.dtype(dtype).name}.npz"
        save_checkpoint(model, path, Progress(1), model.history)
        _rewrite(path, lambda config: None, lambda arrays, dtype=dtype: arrays.update(
            {k: a.astype(dtype) for k, a in arrays.items() if k.startswith("slot.")}))
        loaded = load_checkpoint(path).model
        assert {a.dtype for v in loaded.optimizer.slots.values() for a in v} == {
            np.dtype(np.float32)}
        loaded.fit(x, y, epochs=1, batch_size=4, verbose=0)
        assert all(np.all(np.isfinite(w)) for w in loaded.get_weights())


def test_a_history_with_logs_of_some_epochs_only_round_trips_and_is_checked(tmp_path):
    """A history whose val_* (and a callback's log) are missing from some epochs names their
    epochs in the checkpoint; a list shorter than the epochs without them, or epochs that do
    not match, is refused by name."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    model.build((4,))
    history = xpcnn.History()
    for epoch, logs in enumerate([{"loss": 1.0}, {"loss": 0.9, "val_loss": 1.2},
                                  {"loss": 0.8, "lr": 0.1}, {"loss": 0.7, "val_loss": 1.1}]):
        history.append(epoch, logs)
    path = tmp_path / "h.npz"
    save_checkpoint(model, path, Progress(4), history)
    loaded = load_checkpoint(path).history
    assert loaded.history == history.history and loaded.sparse == history.sparse
    assert loaded.epochs_of("val_loss") == [1, 3] and loaded.epochs_of("lr") == [2]
    for edit in (lambda h: h["history"]["loss"].pop(),  # one value short, no epochs named
                 lambda h: h["sparse"]["val_loss"].pop(),  # epochs and values disagree
                 lambda h: h["sparse"].update(val_loss=[3, 1]),  # out of order
                 lambda h: h["sparse"].update(val_loss=[1, 7])):  # an epoch not run
        save_checkpoint(model, path, Progress(4), history)
        _rewrite(path, lambda config, edit=edit: edit(config["history"]))
        with pytest.raises(DataFormatError, match="invalid checkpoint: bad history entry"):
            load_checkpoint(path)


def test_slots_are_written_in_the_weights_layout_and_older_files_still_load(tmp_path):
    """Version 2 holds the convolution kernel's slots in Keras' layout, as its weights. Version
    1 files load too: those of xpcnn before the kernel's layout change (no ``lr_factor``) in
    that same layout, those written after it in the layout stored inside."""
    path = tmp_path / "c.npz"
    interrupted(path, 11, every=1)
    ckpt = load_checkpoint(path)
    conv = ckpt.model.layers[3]
    k = 0  # the first trainable parameter: the convolution's kernel
    with np.load(path) as f:
        saved = f["slot.m.0"]
    assert saved.shape == conv.get_weights()[0].shape == (3, 3, 3, 4)  # kh, kw, C, K
    np.testing.assert_array_equal(saved, conv.to_keras_layout("kernel", np.asarray(
        ckpt.model.optimizer.slots["m"][k])))
    slots = {n: [np.asarray(a) for a in v] for n, v in ckpt.model.optimizer.slots.items()}

    def loads_the_same(p):
        again = load_checkpoint(p).model.optimizer.slots
        for n, v in slots.items():
            for a, b in zip(v, again[n], strict=True):
                np.testing.assert_array_equal(a, b)

    old = tmp_path / "v1-keras.npz"
    old.write_bytes(path.read_bytes())

    def before_lr_factor(config):
        config["version"] = 1
        del config["optimizer"]["lr_factor"]

    _rewrite(old, before_lr_factor)
    loads_the_same(old)

    stored = tmp_path / "v1-stored.npz"
    stored.write_bytes(path.read_bytes())

    def kernel_slots_as_stored(arrays):
        for n in slots:
            arrays[f"slot.{n}.0"] = conv.from_keras_layout("kernel", arrays[f"slot.{n}.0"])

    _rewrite(stored, lambda config: config.update(version=1), kernel_slots_as_stored)
    loads_the_same(stored)
    _rewrite(stored, lambda config: config.update(version=3))
    with pytest.raises(DataFormatError, match="version 3 is not supported"):
        load_checkpoint(stored)


def _v1_file(tmp_path, layers, layouts):
    """A checkpoint of a model of ``layers`` trained a little with SGD momentum, rewritten as a
    version-1 file without lr_factor whose i-th Conv2D's kernel slot is in ``layouts[i]``
    ("keras" or "stored"); returns (path, the slots as trained)."""
    model = xpcnn.Sequential(layers, input_shape=(8, 8, 3), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 8, 8, 3)), np.arange(8) % 2, epochs=1, batch_size=4,
              verbose=0)
    path = tmp_path / ("v1-" + "-".join(layouts) + ".npz")
    save_checkpoint(model, path, Progress(1), model.history)
    slots = [np.asarray(a) for a in model.optimizer.slots["momentum"]]
    from xpcnn.saving.checkpoint import _slot_owners
    kernels = [(k, la) for k, (la, w) in enumerate(_slot_owners(model))
               if isinstance(la, Conv2D) and w == "kernel"]

    def as_written(arrays):
        for (k, conv), layout in zip(kernels, layouts, strict=True):
            if layout == "stored":
                key = f"slot.momentum.{k}"
                arrays[key] = conv.from_keras_layout("kernel", arrays[key])

    def v1(config):
        config["version"] = 1
        del config["optimizer"]["lr_factor"]

    _rewrite(path, v1, as_written)
    return path, slots


def _loaded_slots(path):
    return [np.asarray(a) for a in load_checkpoint(path).model.optimizer.slots["momentum"]]


@pytest.mark.parametrize("layouts", [("keras", "keras"), ("stored", "stored")])
def test_v1_slots_without_lr_factor_take_the_layout_their_shapes_show(tmp_path, layouts):
    """A version-1 file without lr_factor was written before Conv2D's kernel was stored as
    (K, kh, kw, C) (slots in Keras' layout) or by the two commits after (slots as stored): a
    kernel slot whose shape differs between the two says which, for every slot of the file,
    a square kernel's (3, 3, 3, 3) included (was: stored ones refused, the square one read in
    Keras' layout whatever the file held)."""
    layers = [Conv2D(3, 3), Conv2D(4, 3), Flatten(), Dense(2)]  # (3, 3, 3, 3), (3, 3, 3, 4)
    path, slots = _v1_file(tmp_path, layers, layouts)
    for a, b in zip(slots, _loaded_slots(path), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layouts", [("keras",), ("stored",)])
def test_v1_slots_whose_layout_no_shape_shows_are_refused(tmp_path, layouts):
    """A version-1 file without lr_factor whose only convolution kernel is (3, 3, 3, 3) cannot
    say its slots' layout: refused, naming the file and the slot (was: read in Keras' layout,
    silently transposed where the file held them as stored)."""
    path, _ = _v1_file(tmp_path, [Conv2D(3, 3), Flatten(), Dense(2)], layouts)
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + r": this version-1 "
                       r"checkpoint \(no lr_factor\) records no layout for its optimizer slots, "
                       r"and slot\.momentum\.0 \(the kernel of layer 'conv2d(_\d+)?', shape "
                       r"\(3, 3, 3, 3\)\) has the same shape in both layouts"):
        load_checkpoint(path)


def test_v1_slots_in_two_layouts_are_refused(tmp_path):
    layers = [Conv2D(4, 3), Conv2D(5, 3), Flatten(), Dense(2)]
    path, _ = _v1_file(tmp_path, layers, ("stored", "keras"))
    with pytest.raises(DataFormatError, match="its version-1 optimizer slots are in two layouts"):
        load_checkpoint(path)


def test_checkpoints_written_before_metrics_were_a_choice_resume_with_accuracy(tmp_path):
    """Files written before ``compile(metrics=...)`` had a choice hold no metrics: they meant
    accuracy, so they resume in a model compiled as before, and one compiled without metrics
    is refused by name."""
    path, reference = tmp_path / "c.npz", tmp_path / "r.npz"
    interrupted(path, 5)
    reference.write_bytes(path.read_bytes())
    _rewrite(path, lambda config: config["model"]["compile"].pop("metrics"))
    assert load_checkpoint(path).model.metrics_names == ("loss", "accuracy")
    model, history, steps_run = resumed(path)
    again, history_again, _ = resumed(reference)
    assert steps_run == 24 - 5
    assert {k: v for k, v in history.history.items() if k != "seconds"} == {
        k: v for k, v in history_again.history.items() if k != "seconds"}
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x, y = ckpt_train.data()
    without = ckpt_train.make_model()
    without.compile(optimizer=without.optimizer, metrics=[])
    with pytest.raises(InputError, match=r"compile\.metrics is \['accuracy'\] there and \[\] "
                                         "here"):
        without.fit(x, y, epochs=3, batch_size=8, verbose=0, checkpoint=path, resume=True)


@pytest.mark.parametrize("stop", [3, 5])  # at the end of epoch 1; two steps into epoch 2
def test_top_k_metrics_resume_from_inside_an_epoch_bit_for_bit(tmp_path, stop):
    """The top-k counts of the epoch in progress go into the checkpoint's progress (only
    where there are such metrics: files of other runs stay as they were) and come back, so
    the resumed run logs what the uninterrupted one does; its compile keeps the metrics."""
    from xpcnn.metrics import SparseTopKCategoricalAccuracy

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 6)), np.arange(24) % 5
    metrics = ["sparse_top_k_categorical_accuracy", SparseTopKCategoricalAccuracy(2, "top2"),
               "acc"]

    def run(callbacks=(), **kwargs):
        model = xpcnn.Sequential([Flatten(), Dense(8, activation="relu"), Dense(5)], seed=0,
                                 dtype="float64")
        model.compile(optimizer="adam", metrics=metrics)
        history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[*callbacks],
                            validation_data=(x[:10], y[:10]), **kwargs)
        return model, history

    reference, expected = run()
    path = tmp_path / "top_k.npz"
    with pytest.raises(Interrupt):
        run([StopAtBatch(stop)], checkpoint=path, checkpoint_every=1)
    ckpt = load_checkpoint(path)
    assert ckpt.model.metrics_names == ("loss", "sparse_top_k_categorical_accuracy", "top2",
                                        "acc")
    assert len(ckpt.progress.top_k) == (2 if stop == 5 else 0)
    resumed, history = run(checkpoint=path, resume=True)
    for key in expected.history:
        if key != "seconds":
            assert history.history[key] == expected.history[key], key
    assert 0 < expected.history["top2"][0] < expected.history[
        "sparse_top_k_categorical_accuracy"][0]
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # a checkpoint of as many counts as the metrics need, or none, and no other
    _rewrite(path, lambda config: config["progress"].update(top_k=[1.0]))
    with pytest.raises(DataFormatError, match=r"1 top-k counts in its progress, for 2 top-k "
                                              "metrics"):
        run(checkpoint=path, resume=True)
    _rewrite(path, lambda config: config["progress"].update(top_k=[1.0, -2.0]))
    with pytest.raises(DataFormatError, match="a top_k count is -2.0, expected a finite"):
        run(checkpoint=path, resume=True)


def test_a_checkpoint_without_top_k_metrics_holds_no_top_k_entry(tmp_path):
    path = tmp_path / "c.npz"
    interrupted(path, 5)
    from xpcnn.saving.npz import CONFIG_KEY, decode_json

    with np.load(path) as f:
        progress = decode_json(f[CONFIG_KEY], str(path))["progress"]
    assert set(progress) == {"epoch", "step", "loss_sum", "correct", "seen", "seconds"}


# -- what resuming refuses -----------------------------------------------------------------------


def test_resume_refuses_other_data_arguments_or_models(tmp_path):
    path = tmp_path / "c.npz"
    interrupted(path, 5)
    x, y = ckpt_train.data()
    model = ckpt_train.make_model()
    model.build((8, 8, 3))
    before = model.get_weights()
    with pytest.raises(InputError, match=r"other data or fit arguments \(they differ in "
                                         r"x_crc32\)"):
        model.fit(x[::-1], y, epochs=3, batch_size=8, verbose=0, checkpoint=path, resume=True)
    # Refused before anything was restored into the model.
    assert model.optimizer.iterations == 0 and model.layers[0].calls == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    with pytest.raises(InputError, match="differ in batch_size"):
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, checkpoint=path, resume=True)
    other = ckpt_train.make_model()
    other.compile(optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"compiled otherwise \(compile\.optimizer\..* is "
                                         r".*compile it the same way to resume"):
        other.fit(x, y, epochs=3, batch_size=8, verbose=0, checkpoint=path, resume=True)
    longer = ckpt_train.make_model()  # a schedule over more steps: named, with both values
    longer.compile(optimizer=xpcnn.optim.Adam(xpcnn.optim.CosineDecay(1e-2, 48)))
    with pytest.raises(InputError, match=r"is 24 there and 48 here"):
        longer.fit(x, y, epochs=3, batch_size=8, verbose=0, checkpoint=path, resume=True)
    small = xpcnn.Sequential([Flatten(), Dense(10), Softmax()])
    small.compile()
    with pytest.raises(DataFormatError, match="another architecture: its layer 0 is "
                                              "RandomFlip"):
        small.fit(x, y, verbose=0, checkpoint=path, resume=True)
    assert not small.built  # (the refused fit leaves it as it was)
    with pytest.raises(DataFormatError, match=r"layer 1 \(Dense\) needs \d+ weight values"):
        restore_checkpoint(small, path)
    assert not small.built  # (was: built for the file's input shape)
    unbuilt = ckpt_train.make_model()  # the architecture, compiled otherwise
    unbuilt.compile(optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match="compiled otherwise"):
        restore_checkpoint(unbuilt, path)
    assert not unbuilt.built
    small.build((8, 8, 3))
    with pytest.raises(DataFormatError, match="another architecture"):
        small.load_weights(path)
    with pytest.raises(InputError, match="resume=True needs checkpoint=PATH"):
        model.fit(x, y, verbose=0, resume=True)
    with pytest.raises(InputError, match=r"checkpoint_every=5 needs checkpoint=PATH, the file to "
                                         "write: without it no checkpoint would be written"):
        model.fit(x, y, verbose=0, checkpoint_every=5)
    with pytest.raises(InputError, match="checkpoint_every must be a positive number of steps"):
        model.fit(x, y, verbose=0, checkpoint=path, checkpoint_every=0)
    # None of this touched the checkpoint.
    assert load_checkpoint(path).model.optimizer.iterations == 5


def test_a_model_file_is_not_a_checkpoint(tmp_path):
    model = ckpt_train.make_model()
    model.build((8, 8, 3))
    model.save(str(tmp_path / "m.npz"))
    with pytest.raises(DataFormatError, match="not an xpcnn checkpoint .a model file"):
        load_checkpoint(tmp_path / "m.npz")


# -- non-finite values never overwrite a good checkpoint ----------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["weight", "data"])
def test_non_finite_values_stop_training_and_keep_the_good_checkpoint(tmp_path, where):
    path = tmp_path / "c.npz"
    model = ckpt_train.make_model()
    step, count = model.train_step, [0]

    def train_step(xb, yb):
        count[0] += 1
        if count[0] == 7:  # step 7: poison, after the checkpoint of step 5
            if where == "weight":
                model.layers[9].params["kernel"][0, 0] = np.nan
            else:
                xb = xb.astype(np.float32)  # (fit hands the batch over as stored: uint8)
                xb[0, 3:5, 3:5, :] = np.inf  # (a corner pixel could be cropped away)
        return step(xb, yb)

    model.train_step = train_step
    layer = "dense" if where == "weight" else "the input batch"
    with pytest.raises(NonFiniteError, match=f"training stopped at step 7: the loss is nan; "
                                             f"the first non-finite values appear in .*{layer}"):
        ckpt_train.train(str(path), every=5, model=model)
    ckpt = load_checkpoint(path)
    assert ckpt.model.optimizer.iterations == 5
    assert all(np.isfinite(w).all() for w in ckpt.model.get_weights())


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    path = tmp_path / "c.npz"
    model = ckpt_train.make_model()
    step, count = model.train_step, [0]

    def train_step(xb, yb):
        out = step(xb, yb)
        count[0] += 1
        if count[0] == 10:  # an update that made a weight infinite, at a checkpoint step
            model.layers[3].params["bias"][1] = np.inf
        return out

    model.train_step = train_step
    with pytest.raises(NonFiniteError, match=r"after step 10: the weights of layer 'conv2d' "
                                             r"\(bias\) hold NaN or infinity; the checkpoint .* "
                                             r"was not overwritten"):
        ckpt_train.train(str(path), every=5, model=model)
    assert load_checkpoint(path).model.optimizer.iterations == 8  # the end of epoch 1


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_litter(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    interrupted(path, 5)

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        ckpt_train.train(str(path), resume=True)
    monkeypatch.undo()
    assert load_checkpoint(path).model.optimizer.iterations == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


# -- killed processes ---------------------------------------------------------------------------


def run_script(*args, wait=True):
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finished_run(out):
    """The weights and history a script run saved, and how many steps that process ran."""
    with np.load(out) as f:
        weights = [f[f"w{i}"] for i in range(len(f.files) - 2)]
        history = json.loads(str(f["history"]))
        return weights, history, int(f["steps_run"])


def test_sigkill_at_a_random_moment_then_resume(tmp_path, reference):
    """Kill the run twice with SIGKILL at seeded random moments (each after a checkpoint exists),
    resume each time; the weights at the end are those of the uninterrupted run."""
    choice = random.Random(20240611)
    path, out = tmp_path / "run.ckpt.npz", tmp_path / "out.npz"
    killed_at = []
    for _ in range(2):
        proc = run_script(path, out, "--resume", "--step-delay", 0.06, wait=False)
        try:
            before = path.stat().st_mtime_ns if path.exists() else None
            deadline = time.monotonic() + 60
            # Wait for a (new) checkpoint, then let the run go on for a random while.
            while (not path.exists() or path.stat().st_mtime_ns == before) and \
                    proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(choice.uniform(0.0, 0.15))  # (under 3 steps: the run cannot end)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        killed_at.append(load_checkpoint(path).model.optimizer.iterations)
    assert 0 < killed_at[0] <= killed_at[1] < STEPS
    done = run_script(path, out, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    weights, history, ran = finished_run(out)
    assert ran == STEPS - killed_at[1]
    assert_same_run(weights, history, reference)


def test_only_the_leftovers_of_writers_of_that_path_are_removed(tmp_path):
    fd, leftover = files._new_temporary(str(tmp_path), "run.npz", ".tmp")  # as a killed writer's
    os.close(fd)
    others = [".other.npz.0123.tmp", ".run.npz.0123.part", "run.npz.0123.tmp", "run.npz"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    files.remove_leftovers(tmp_path / "run.npz")
    assert not os.path.exists(leftover)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_a_checkpoint_written_through_a_symlink_removes_its_targets_leftovers(tmp_path):
    """A checkpoint path that is a link is written at its target, whose folder holds a killed
    writer's temporary file: that one is removed (was: those next to the link were looked
    for, and the link replaced by a regular file)."""
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "run.npz", tmp_path / "run.npz"
    link.symlink_to(target)
    fd, leftover = files._new_temporary(str(tmp_path / "real"), "run.npz", ".tmp")
    os.close(fd)
    ckpt_train.train(str(link), every=5)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert not os.path.exists(leftover)
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["run.npz"]
    assert load_checkpoint(target).model.optimizer.iterations == STEPS


@pytest.mark.parametrize("how", ["replace", "savez"])
def test_dying_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference,
                                                                           how):
    path, out = tmp_path / "run.npz", tmp_path / "out.npz"
    # Writes: step 5, end of epoch 1 (step 8), step 10, ... The third one dies.
    died = run_script(path, out, "--die-at-write", 3, "--die-how", how)
    assert died.returncode == 17, died.stderr[-2000:]
    ckpt = load_checkpoint(path)
    assert (ckpt.epoch, ckpt.step, ckpt.model.optimizer.iterations) == (1, 0, 8)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.npz.")
    # (the resume in this process: what is checked is the file the dead process left; a resume
    # in a fresh process is test_sigkill_at_a_random_moment_then_resume's, whose runs all are)
    steps_run = []
    model, history = ckpt_train.train(str(path), resume=True, steps_run=steps_run)
    assert len(steps_run) == STEPS - 8
    assert_same_run(model.get_weights(), {"epoch": history.epoch, "history": history.history},
                    reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]


# -- command line ----------------------------------------------------------------------------------


def test_cli_checkpoint_and_resume(tmp_path, capsys, monkeypatch):
    import xpcnn.datasets

    real = xpcnn.datasets.load_dataset  # (64 training images, --limit's, and 20 test ones:
    # generating the default sizes cost most of the runs)
    monkeypatch.setattr(xpcnn.datasets, "load_dataset", lambda name, *a, **kw: real(
        name, *a, **{"n_train": 64, "n_test": 20, **kw}))
    path = tmp_path / "cli.npz"
    args = ["train", "--limit", "64", "--val-split", "0.01", "--epochs", "2", "--batch-size",
            "16", "--quiet", "--json", "--checkpoint", str(path), "--checkpoint-every", "3"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = load_checkpoint(path)
    assert (ckpt.epoch, ckpt.step, ckpt.model.optimizer.iterations) == (2, 0, 8)
    # Resuming the finished run changes nothing (trains no step, so writes no checkpoint) and
    # reports the same.
    written = path.stat().st_mtime_ns
    assert cli_main([*args, "--resume"]) == 0
    assert path.stat().st_mtime_ns == written
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["history"]["loss"] == first["history"]["loss"]
    assert cli_main(["train", "--resume", "--limit", "10", "--quiet"]) == 2
    assert "argument --resume: needs --checkpoint" in capsys.readouterr().err


def test_save_checkpoint_needs_a_compiled_built_model(tmp_path):
    model = xpcnn.Sequential([Flatten(), Dense(2)])
    with pytest.raises(InputError, match="must be built before save_checkpoint"):
        save_checkpoint(model, tmp_path / "x.npz")
    model.build((3,))
    with pytest.raises(InputError, match="needs a compiled model"):
        save_checkpoint(model, tmp_path / "x.npz")


def test_a_train_step_that_records_nothing_still_resumes(tmp_path):
    """A subclass's train_step that trains without the base step records no sums (its
    epoch's logs are 0): a checkpoint inside an epoch holds 0 samples seen and 0 sums, and
    resumes (was refused as corrupt, 'step 2 ... 0.0 samples seen')."""
    class Idle(xpcnn.Sequential):
        calls = 0

        def train_step(self, xb, yb):
            Idle.calls += 1
            self.optimizer.iterations += 1  # (a step of its own, outside the running sums)
            return 0.0, 0.0

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), np.arange(32) % 3
    model = Idle([Flatten(), Dense(3), Softmax()], input_shape=(4,), seed=0)
    model.compile(optimizer="sgd")
    with pytest.raises(Interrupt):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz",
                  checkpoint_every=1, callbacks=[StopAtBatch(2)])
    Idle.calls = 0
    again = Idle([Flatten(), Dense(3), Softmax()], input_shape=(4,), seed=0)
    again.compile(optimizer="sgd")
    history = again.fit(x, y, epochs=2, batch_size=8, verbose=0,
                        checkpoint=tmp_path / "c.npz", resume=True)
    assert Idle.calls == 6 and again.optimizer.iterations == 8  # (from step 2 of 8)
    assert history.history["loss"] == [0.0, 0.0]


def test_load_weights_of_a_checkpoint_does_not_read_its_optimizer(tmp_path, monkeypatch):
    """load_weights takes a checkpoint's weights without building its optimiser, as Keras'
    does: the run's own schedule class need not be defined (was: 'invalid checkpoint: its
    optimizer configuration (... unknown schedule class ...)'); resuming still needs it."""
    class HalvingEvery10(xpcnn.optim.Schedule):
        def __init__(self, lr=0.1):
            self.lr = lr

        def __call__(self, step):
            return self.lr * 0.5 ** (step // 10)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 2, 2, 1)).astype(np.float32), np.arange(16) % 3
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1), seed=0)
    model.compile(loss="cross_entropy",
                  optimizer=xpcnn.optim.SGD(HalvingEvery10(0.1), momentum=0.9))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    monkeypatch.delitem(xpcnn.optim.SCHEDULES, "HalvingEvery10")  # (an inference script)
    for built in (True, False):
        again = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1) if built else None,
                                 seed=5)
        again.load_weights(tmp_path / "c.npz")
        for a, b in zip(again.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DataFormatError, match="unknown schedule class 'HalvingEvery10'"):
        load_checkpoint(tmp_path / "c.npz")


def test_resuming_stays_strict_about_dtype_and_input_shape(tmp_path):
    """load_weights casts and ignores the input size where the weights keep their shapes;
    resuming a run does not: the checkpoint must be of the very model."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 2, 2, 1)), np.arange(16) % 3

    def make(dtype):
        model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1), dtype=dtype)
        model.compile(optimizer="sgd")
        return model

    make("float64").fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    make("float32").load_weights(tmp_path / "c.npz")  # (cast)
    with pytest.raises(DataFormatError, match="holds a float64 model; this model is float32"):
        make("float32").fit(x, y, epochs=2, batch_size=8, verbose=0,
                            checkpoint=tmp_path / "c.npz", resume=True)

    def convolutional(side):
        model = xpcnn.Sequential([Conv2D(2, 3, padding="same"), GlobalAvgPool2D(), Dense(3)],
                                 input_shape=(side, side, 2), dtype="float64")
        model.compile(optimizer="sgd")
        return model

    path = tmp_path / "conv.npz"
    convolutional(6).fit(rng.normal(size=(16, 6, 6, 2)), y, epochs=1, batch_size=8, verbose=0,
                         checkpoint=path)
    convolutional(8).load_weights(path)  # (every weight fits)
    with pytest.raises(DataFormatError, match=r"holds a model for inputs of shape \(6, 6, 2\); "
                                              r"this model takes \(8, 8, 2\)"):
        convolutional(8).fit(rng.normal(size=(16, 8, 8, 2)), y, epochs=2, batch_size=8,
                             verbose=0, checkpoint=path, resume=True)


def test_restore_checkpoint_takes_the_files_settings_and_refuses_a_bad_one(tmp_path):
    """A checkpoint of a model whose Dropout rate and BatchNorm2D momentum a callback changed
    was refused by the same model ("another architecture"); restored, it takes the file's
    settings (the run goes on as it was). A setting the built layer refuses (a rate that
    float16 rounds to 1) is a corrupt file: DataFormatError, the model's settings and weights
    as they were."""
    from xpcnn.layers import BatchNorm2D, Dropout

    def make():
        model = xpcnn.Sequential([Conv2D(2, 3), BatchNorm2D(), Flatten(), Dropout(0.25),
                                  Dense(3), Softmax()], input_shape=(5, 5, 1), seed=0)
        model.compile(optimizer="adam", precision="mixed_float16")
        return model

    saved = make()
    saved.layers[1].momentum, saved.layers[3].rate = 0.3, 0.5
    path = tmp_path / "s.npz"
    save_checkpoint(saved, path)
    model = make()
    restore_checkpoint(model, path)
    assert (model.layers[1].momentum, model.layers[3].rate) == (0.3, 0.5)

    def bad(config):
        config["model"]["layers"][1]["config"]["momentum"] = 0.5
        config["model"]["layers"][3]["config"]["rate"] = 0.99999

    _rewrite(path, bad)
    model = make()
    before = model.get_weights()
    with pytest.raises(DataFormatError, match=r"invalid checkpoint: layer 3 \(Dropout\) has "
                                              "rate 0.99999: .* cannot be drawn in float16"):
        restore_checkpoint(model, path)
    assert (model.layers[1].momentum, model.layers[3].rate) == (BatchNorm2D().momentum, 0.25)
    for a, b in zip(model.get_weights(), before, strict=True):
        assert np.array_equal(a, b)


def test_a_file_with_several_faults_is_refused_for_the_first_one_checked(tmp_path):
    """A checkpoint is checked whole before any of it is applied, in one order: the
    optimiser's counts, its slots, the loss scale, the random layers' counters, the position,
    the history, the run. A file with a fault in each is refused for the first, and with that
    one mended for the next, and so on (kept when _restore was split into its checks)."""
    from xpcnn.layers import Dropout

    model = xpcnn.Sequential([Flatten(), Dropout(0.5), Dense(3), Softmax()], seed=0)
    model.compile(optimizer="adam")
    x, y = np.random.default_rng(0).normal(size=(8, 4)), np.arange(8) % 3
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    original = tmp_path / "good.npz"
    save_checkpoint(model, original, Progress(1), model.history)
    slot = sorted(model.optimizer.slot_names)[0]
    faults = [
        ("optimizer applied 9, expected 0 to its iterations 2",
         lambda c: c["optimizer"].update(applied=9)),
        ("optimizer lr_factor is -1.0", lambda c: c["optimizer"].update(lr_factor=-1.0)),
        (f"optimizer slots '{slot}' is 7, expected 2",
         lambda c: c["optimizer"]["slots"].update({slot: 7})),
        ("loss_scale 2 in a checkpoint of a model without float16 loss scaling",
         lambda c: c.update(loss_scale=2)),
        ("good_steps is -1", lambda c: c.update(good_steps=-1)),
        ("layer 0 is not a random layer",
         lambda c: c["random_layers"].append({"index": 0, "seed": 0, "calls": 0})),
        ("no progress entry", lambda c: c.pop("progress")),
        ("epoch_offset is -1", lambda c: c.update(epoch_offset=-1)),
        ("bad history entry", lambda c: c.update(history=None)),
        ("no run description", lambda c: c.update(run=None)),
    ]
    for i, (message, _) in enumerate(faults):
        path = tmp_path / f"faults-{i}.npz"
        path.write_bytes(original.read_bytes())

        def edit(config, left=faults[i:]):
            for _, fault in left:
                fault(config)

        _rewrite(path, edit)
        with pytest.raises(DataFormatError, match=re.escape(f"invalid checkpoint: {message}")):
            load_checkpoint(path)
    assert load_checkpoint(original).model.optimizer.iterations == 2


def test_the_checkpoint_constants_and_checks_have_one_name_each(tmp_path):
    """checkpoint.py re-aliased model_file's CHECKPOINT_FORMAT and CHECKPOINT_VERSIONS[-1] as
    FORMAT and VERSION, the names of the model file's own pair; model_file's
    check_architecture served checkpoint.py's _check_architecture alone (now one function
    there); fingerprint, which the data sources use, lived in checkpoint.py."""
    from xpcnn.saving import checkpoint, model_file
    from xpcnn.saving.npz import NpzArchive

    for name in ("FORMAT", "VERSION", "fingerprint"):
        assert not hasattr(checkpoint, name), name
    assert not hasattr(model_file, "check_architecture")
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile()
    model.fit(np.zeros((4, 2)), np.arange(4) % 3, epochs=1, verbose=0)
    save_checkpoint(model, tmp_path / "c.npz")
    with NpzArchive(tmp_path / "c.npz") as npz:
        config = npz.read_config()
    assert (config["format"], config["version"]) == ("xpcnn-checkpoint", 2)
    assert (model_file.FORMAT, model_file.VERSION) == ("xpcnn-model", 1)
