"""No batch of a user's iterator is lost when a step is interrupted: the batch whose step did
not run (a Ctrl-C or an error in on_train_batch_begin, in the forward pass, in the step before
its update; in evaluate's or predict's batch before its outputs) is given back, in front of
those the background thread drew ahead, in order; one whose update was applied (an error in
on_train_batch_end, or after the update inside the step) is not, so none is trained twice.

Batch k of the iterators here holds the value k; a pass-through layer records the number of
each batch that reaches a forward pass, so the next call on the iterator tells what it reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xpcnn
from xpcnn.callbacks import Callback, TerminateOnNaN
from xpcnn.errors import InputError
from xpcnn.layers import Dense, Flatten


def numbered():
    """Batch k: two images filled with k, labels [0, 1] (an endless generator)."""
    for k in itertools.count():
        yield np.full((2, 4, 4, 1), float(k), np.float32), np.array([0, 1])


class Recorder(Flatten):
    """Flatten, recording each batch's number by mode (training or inference); raises
    ``error`` in the forward pass of batch ``fail_on`` in mode ``fail_training`` (once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[bool, list[int]] = {True: [], False: []}
        self.fail_on: int | None = None
        self.fail_training = True
        self.error: BaseException | type[BaseException] = KeyboardInterrupt

    def forward(self, x, training=False, *args, **kwargs):
        k = int(np.asarray(x)[0, 0, 0, 0])
        if training == self.fail_training and k == self.fail_on:
            self.fail_on = None
            raise self.error
        self.seen[bool(training)].append(k)
        return super().forward(x, training, *args, **kwargs)


class GradientLess(Dense):
    """Dense whose backward fills no gradient while ``broken``: fit's step names it in an
    InputError before the update."""

    broken = False

    def backward(self, dy, *args, **kwargs):
        dx = super().backward(dy, *args, **kwargs)
        if self.broken:
            self.grads.clear()
        return dx


def model_with(recorder: Recorder, dense: Dense | None = None) -> xpcnn.Sequential:
    model = xpcnn.Sequential([recorder, dense or Dense(2)], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    model.build((4, 4, 1))
    return model


class RaisesAt(Callback):
    """Raises ``error`` in ``hook`` for batch ``at``."""

    def __init__(self, hook: str, at: int, error: BaseException | type[BaseException]):
        self.at, self.error = at, error
        setattr(self, hook, self._hook)

    def _hook(self, batch, logs=None):
        if batch == self.at:
            raise self.error


def trained_next(model: xpcnn.Sequential, recorder: Recorder, stream, steps: int = 3) -> list:
    """The batches the next fit on ``stream`` trains on (``steps`` of them)."""
    recorder.seen[True].clear()
    model.fit(stream, steps_per_epoch=steps, verbose=0)
    return recorder.seen[True]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError("a callback's")])
def test_a_batch_whose_step_on_train_batch_begin_stops_is_given_back(error):
    """A Ctrl-C (or an error) in on_train_batch_begin(1): batch 1 never trained; the next fit
    starts with it, then those drawn ahead (was: 2, 3, 4: batch 1 lost)."""
    recorder = Recorder()
    model = model_with(recorder)
    stream = numbered()
    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        model.fit(stream, steps_per_epoch=10, verbose=0,
                  callbacks=[RaisesAt("on_train_batch_begin", 1, error)])
    assert recorder.seen[True] == [0]
    assert model.optimizer.iterations == 1
    assert trained_next(model, recorder, stream) == [1, 2, 3]
    assert model.optimizer.iterations == 4  # (each batch once)


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError("out of memory")])
def test_a_batch_whose_step_stops_in_the_forward_pass_is_given_back(error):
    """A Ctrl-C (or an error: a user's layer, out of memory) inside training step 2's forward
    pass, where the loop spends its time: batch 2 is given back, in front (was: lost)."""
    recorder = Recorder()
    recorder.fail_on, recorder.error = 2, error
    model = model_with(recorder)
    stream = numbered()
    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        model.fit(stream, steps_per_epoch=10, verbose=0)
    assert recorder.seen[True] == [0, 1]
    assert model.optimizer.iterations == 2
    assert trained_next(model, recorder, stream, 4) == [2, 3, 4, 5]


def test_a_batch_whose_update_was_applied_is_not_given_back():
    """An error in on_train_batch_end(1), or inside the step after its update (a subclass's
    train_step that raises after super's): that batch trained, and the next fit goes on after
    it (given back, it would train twice)."""
    recorder = Recorder()
    model = model_with(recorder)
    stream = numbered()
    with pytest.raises(KeyboardInterrupt):
        model.fit(stream, steps_per_epoch=10, verbose=0,
                  callbacks=[RaisesAt("on_train_batch_end", 1, KeyboardInterrupt)])
    assert recorder.seen[True] == [0, 1]
    assert model.optimizer.iterations == 2
    assert trained_next(model, recorder, stream) == [2, 3, 4]

    step = model.train_step

    def raises_after_update(xb, yb, sample_weight=None):
        out = step(xb, yb)
        if int(np.asarray(xb)[0, 0, 0, 0]) == 6:
            raise KeyboardInterrupt
        return out

    model.train_step = raises_after_update
    with pytest.raises(KeyboardInterrupt):
        trained_next(model, recorder, stream, 10)
    assert recorder.seen[True] == [5, 6]
    del model.train_step
    assert trained_next(model, recorder, stream) == [7, 8, 9]
    assert model.optimizer.iterations == 10  # (batches 0 to 9, each once)


def test_a_step_refused_by_name_before_its_update_gives_its_batch_back():
    """A step that raises a named InputError before its update (a user's layer whose backward
    fills no gradient: the code's fault, not the batch's) gives its batch back, as any error
    does: the next fit, the layer mended, trains on it. A batch that the checks refuse (named
    by the error: its own fault) is dropped, given back it would be refused again."""
    recorder, dense = Recorder(), GradientLess(2)
    model = model_with(recorder, dense)
    stream = numbered()
    model.fit(stream, steps_per_epoch=1, verbose=0)
    dense.broken = True
    with pytest.raises(InputError, match="gave no gradient"):
        trained_next(model, recorder, stream)
    assert model.optimizer.iterations == 1
    dense.broken = False
    assert trained_next(model, recorder, stream) == [1, 2, 3]

    def with_a_bad_batch():
        yield np.full((2, 4, 4, 1), 0.0, np.float32), np.array([0, 1])
        yield np.full((2, 5, 5, 1), 1.0, np.float32), np.array([0, 1])  # (not 4 x 4)
        yield from itertools.islice(numbered(), 2, None)

    bad = with_a_bad_batch()
    with pytest.raises(InputError):
        trained_next(model, recorder, bad)
    assert recorder.seen[True] == [0]
    assert trained_next(model, recorder, bad) == [2, 3, 4]


@pytest.mark.parametrize("found", ["at the epoch's end", "in its own step",
                                   "as the next step starts"])
def test_a_non_finite_step_and_the_later_ones_keep_their_batches(found, capsys):
    """A non-finite step and the later ones before the host reads its flag ran on the device
    (their updates skipped): they keep their batches, wherever the error is found, and the
    optimiser's count goes back to the last good step's; a step whose start raised it, before
    the step ran (a layer frozen since: its read comes first), gives its batch back."""
    recorder = Recorder()
    first, last = Dense(3), Dense(2)
    model = xpcnn.Sequential([recorder, first, last], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    stream = numbered()
    model.fit(stream, steps_per_epoch=1, verbose=0)
    bad, steps, next_batch = {"at the epoch's end": (1, 4, 5),
                              "in its own step": (31, 40, 33),  # (READ_EVERY = 32 steps)
                              "as the next step starts": (1, 6, 4)}[found]

    class Overflows(Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == bad:  # (its logits overflow: its update and the later ones skipped)
                last.params["kernel"][...] = np.float32(3e38)
            if batch == 3 and found == "as the next step starts":
                first.trainable = False

    model.fit(stream, steps_per_epoch=steps, verbose=0,
              callbacks=[Overflows(), TerminateOnNaN()])
    assert f"training stopped at step {bad + 2}" in capsys.readouterr().out
    assert model.optimizer.iterations == bad + 1
    last.params["kernel"][...] = 0.0
    first.trainable = True
    assert trained_next(model, recorder, stream, 1) == [next_batch]


def test_evaluate_and_predict_give_back_the_batch_they_did_not_finish():
    """A Ctrl-C inside evaluate's (or predict's) forward pass of batch 1, or in its
    on_predict_batch_begin: the next call reads that batch first (was: lost); one raised in
    on_test_batch_end, its batch counted, goes on after it."""
    recorder = Recorder()
    recorder.fail_training = False
    model = model_with(recorder)
    stream = numbered()
    inference = recorder.seen[False]
    recorder.fail_on = 1
    with pytest.raises(KeyboardInterrupt):
        model.evaluate(stream, steps=5)
    assert inference == [0]
    model.predict(stream, steps=2)
    assert inference == [0, 1, 2]
    with pytest.raises(KeyboardInterrupt):
        model.predict(stream, steps=5, callbacks=[
            RaisesAt("on_predict_batch_begin", 1, KeyboardInterrupt)])
    assert inference == [0, 1, 2, 3]
    recorder.fail_on = 5
    with pytest.raises(KeyboardInterrupt):
        model.predict(stream, steps=5)
    assert inference == [0, 1, 2, 3, 4]
    with pytest.raises(KeyboardInterrupt):
        model.evaluate(stream, steps=5,
                       callbacks=[RaisesAt("on_test_batch_end", 0, KeyboardInterrupt)])
    assert inference == [0, 1, 2, 3, 4, 5]
    assert trained_next(model, recorder, stream, 2) == [6, 7]
