"""What fit holds of its sources and how they are read: no input batch held for the steps not
read yet where the source can give it again (a memory-mapped training set whole in memory, was),
the deferred non-finite error still naming the layer on the step's own batch; a dataset or a
re-iterable read by one thread at a time after a stopped call; NumPy scalars as host values."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import tracemalloc
import weakref

import numpy as np
import pytest

import xpcnn
from xpcnn.callbacks import Callback
from xpcnn.data.sources import ArrayBatches, DatasetBatches
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import Dense, Flatten, ReLU, Softmax
from xpcnn.totals import Noted


def small(shape=(8, 8, 1), classes=3, layers=None):
    model = xpcnn.Sequential(layers or [Flatten(), Dense(classes), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    model.build(shape)
    return model


class StopAtFirstBatch(Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.model.stop_training = True


# -- what fit holds -----------------------------------------------------------------------------


def test_fit_on_a_memmap_holds_a_few_batches_not_the_steps_not_read_yet(tmp_path):
    """The steps between two reads of the running totals (up to READ_EVERY = 32) held their
    input batches for the deferred error: a memory map of 32 batches was read whole into
    memory. Now each is read again where an error needs it."""
    n, batch, shape = 32 * 200, 200, (16, 16, 3)
    path = tmp_path / "x.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape))
    mm[:] = 0.5
    mm.flush()
    del mm
    x = np.load(path, mmap_mode="r")
    y = np.arange(n) % 3
    one = x[:batch].nbytes
    model = small(shape)
    model.fit(x[:batch], y[:batch], batch_size=batch, verbose=0)  # (warm: lazy allocations)
    peaks = []
    for call in (lambda: model.evaluate(x, y, batch_size=batch, verbose=0),
                 lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)):
        tracemalloc.start()
        try:
            call()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # (evaluate's pipeline holds a few: the batches read ahead, the step's own arrays)
    assert peaks[1] < peaks[0] + 2 * one, [p / one for p in peaks]  # (was 32 and more)


def test_a_generator_s_batches_are_held_for_the_last_two_steps_only():
    """A generator cannot give a batch again: the steps hold the last KEPT_INPUTS of them."""
    model = small((32, 32, 3))
    b = 250
    one = b * 32 * 32 * 3 * 4

    def batches():
        for _ in range(24):
            yield np.full((b, 32, 32, 3), 0.5, np.float32), np.arange(b) % 3

    model.fit(batches(), steps_per_epoch=1, epochs=1, verbose=0)  # (warm)
    tracemalloc.start()
    try:
        model.fit(batches(), steps_per_epoch=23, epochs=1, verbose=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * one, f"{peak / one:.1f} batches"  # (was 23 and more)


# -- the deferred error still names the layer, on the step's own batch ---------------------------


def _overflowing(n=64, bad=45):
    """Images of which sample ``bad`` alone makes the Dense layer's output overflow."""
    x = np.full((n, 4, 4, 1), 0.5, np.float32)
    x[bad] = 3e38
    return x, np.arange(n) % 3


def _named(model, fit):
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError) as info:
        fit(model)
    return str(info.value)


def _where_bad(n, batch, bad, shuffle, seed=0, epoch=0):
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return int(np.flatnonzero(order == bad)[0]) // batch + 1  # (its step, 1-based)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_on_arrays_names_the_layer_on_the_step_s_batch_read_again(shuffle):
    x, y = _overflowing()
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    step = _where_bad(64, 8, 45, shuffle)
    message = _named(model, lambda m: m.fit(x, y, batch_size=8, verbose=0, shuffle=shuffle))
    assert f"training stopped at step {step}: the loss is" in message
    assert "the first non-finite values appear in the output of layer 'dense'" in message


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_on_a_memmap_names_the_layer_on_the_step_s_batch_read_again(tmp_path, shuffle):
    x, y = _overflowing()
    np.save(tmp_path / "x.npy", x)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    step = _where_bad(64, 8, 45, shuffle)
    message = _named(model, lambda m: m.fit(x, y, batch_size=8, verbose=0, shuffle=shuffle))
    assert f"training stopped at step {step}: the loss is" in message
    assert "appear in the output of layer 'dense'" in message


class Samples:
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_fit_on_a_dataset_names_the_layer_on_the_step_s_batch_read_again():
    x, y = _overflowing()
    ds = Samples(x, y)
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    step = _where_bad(64, 8, 45, True)
    message = _named(model, lambda m: m.fit(ds, batch_size=8, verbose=0, shuffle=True))
    assert f"training stopped at step {step}: the loss is" in message
    assert "appear in the output of layer 'dense'" in message


def test_fit_on_a_generator_names_the_layer_where_the_batch_is_still_held():
    x, y = _overflowing()
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    # (the bad batch is the epoch's last: read at the epoch's end, it is held still)
    gen = ((x[k:k + 8], y[k:k + 8]) for k in (0, 8, 16, 40))
    message = _named(model, lambda m: m.fit(gen, steps_per_epoch=4, verbose=0))
    assert "training stopped at step 4: the loss is" in message
    assert "appear in the output of layer 'dense'" in message


def test_fit_on_a_generator_says_the_batch_is_no_longer_held():
    """A generator's batch three steps before the read is not held (the last two are): the
    error names the step and says so (was: every batch since the last read held)."""
    x, y = _overflowing()
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    gen = ((x[k:k + 8], y[k:k + 8]) for k in (0, 40, 8, 16, 24))
    message = _named(model, lambda m: m.fit(gen, steps_per_epoch=5, verbose=0))
    assert "training stopped at step 2: the loss is" in message
    assert "its input batch is no longer held" in message
    assert model.optimizer.iterations == 1


def test_a_train_step_loop_names_the_layer_on_a_batch_it_held():
    x, y = _overflowing()
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    xp = model.backend
    with np.errstate(all="ignore"):
        model.train_step(xp.asarray(x[:8]), xp.asarray(y[:8]))
        model.train_step(xp.asarray(x[40:48]), xp.asarray(y[40:48]))
        with pytest.raises(NonFiniteError, match="step 2: .*output of layer 'dense'"):
            model._read_totals()


# -- one reader at a time ------------------------------------------------------------------------


class SharedFile:
    """Samples i read from one shared buffer position (seek, then read, as one file handle is):
    two readers at once mix them up. After :meth:`hang`, the first read of sample ``at`` sets
    ``entered`` and waits for the gate it returns."""

    def __init__(self, n=64):
        self.n, self.gate, self.at = n, None, None
        self.entered = threading.Event()
        self.inside = self.overlaps = self.reads = 0
        self.position = 0

    def hang(self, at):
        self.gate, self.at = threading.Event(), at
        return self.gate

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.inside += 1
        self.overlaps += self.inside > 1
        self.reads += 1
        try:
            self.position = i
            if self.gate is not None and i == self.at:
                gate, self.gate = self.gate, None
                self.entered.set()
                gate.wait(30)  # (set by the test; bounded only so that a failure ends)
            return np.full((8, 8, 1), self.position, np.float32), i % 3
        finally:
            self.inside -= 1


class StopWhenInside(Callback):
    """Stops fit after its first batch, once the reader is inside the read that hangs."""

    def __init__(self, entered):
        super().__init__()
        self.entered = entered

    def on_train_batch_end(self, batch, logs=None):
        assert self.entered.wait(30)
        self.model.stop_training = True


def _reader_ends(source):
    """Wait for the reader a stopped call left inside ``source`` to end (bounded only so that a
    failure ends)."""
    ended = xpcnn.data.background._LEFT.get(source)
    assert ended is None or ended.wait(30)


def test_a_stopped_fit_s_dataset_reader_stops_between_samples(monkeypatch):
    """Stopped after its first batch, fit's reader was left reading the next batch whole (the
    next call's reader met it inside dataset[i]); now it ends after the sample it is in."""
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)  # (left at once)
    ds = SharedFile()
    model = small()
    gate = ds.hang(at=33)  # (inside the second batch, which the background thread reads)
    try:
        model.fit(ds, batch_size=32, epochs=1, verbose=0, shuffle=False,
                  callbacks=[StopWhenInside(ds.entered)])
        reads = ds.reads
        assert ds.inside == 1
    finally:
        gate.set()
    _reader_ends(ds)
    assert ds.reads == reads and ds.inside == 0  # (no sample after the one it was in)
    got = model.predict(ds, batch_size=32)
    np.testing.assert_array_equal(got, model.predict(
        np.stack([np.full((8, 8, 1), i, np.float32) for i in range(64)]), batch_size=32))
    assert ds.overlaps == 0


def test_the_next_call_waits_for_a_dataset_reader_a_stopped_call_left(monkeypatch):
    """A reader left inside a dataset[i] that hangs: the next call on that dataset waits for it,
    and is refused by name where it does not return in time (was: a second reader inside
    dataset[i], samples silently mixed up)."""
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)
    ds = SharedFile()
    model = small()
    gate = ds.hang(at=32)  # (the reader is stopped inside a read of the second batch)
    try:
        model.fit(ds, batch_size=32, epochs=1, verbose=0, shuffle=False,
                  callbacks=[StopWhenInside(ds.entered)])
        assert ds.inside == 1
        with pytest.raises(InputError, match="x is still being read by the background thread"):
            model.predict(ds, batch_size=32)
    finally:
        gate.set()
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 30.0)
    got = model.predict(ds, batch_size=32)  # (waits for it)
    assert ds.overlaps == 0 and got.shape == (64, 3)


class Reiterable:
    """Batches from one shared position, re-iterable (a custom loader): after :meth:`hang`, the
    next pass's second batch sets ``entered`` and waits for the gate it returns (the first
    reaches the fit)."""

    def __init__(self):
        self.gate, self.inside, self.overlaps = None, 0, 0
        self.entered = threading.Event()

    def hang(self):
        self.gate = threading.Event()
        return self.gate

    def __iter__(self):
        gate, self.gate = self.gate, None
        for k in range(8):
            self.inside += 1
            self.overlaps += self.inside > 1
            try:
                if gate is not None and k == 1:
                    self.entered.set()
                    gate.wait(30)  # (set by the test)
                batch = np.full((4, 8, 8, 1), k, np.float32), np.arange(4) % 3
            finally:
                self.inside -= 1
            yield batch


def test_the_next_pass_over_a_re_iterable_waits_for_the_reader_a_stopped_call_left(
        monkeypatch):
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)
    data = Reiterable()
    model = small()
    gate = data.hang()  # (the reader is inside the second batch when the fit stops)
    try:
        model.fit(data, epochs=1, verbose=0, callbacks=[StopWhenInside(data.entered)])
        assert data.inside == 1
        with pytest.raises(InputError, match="still being read by the background thread"):
            model.fit(data, epochs=1, verbose=0)
    finally:
        gate.set()
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 30.0)
    model.fit(data, epochs=1, verbose=0)  # (waits for it)
    assert data.overlaps == 0


# -- datasets by identity: unhashable ones, ones with no weak reference --------------------------


@dataclasses.dataclass
class Images:
    """A dataclass dataset: its generated __eq__ sets __hash__ None."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Slotted:
    """A dataset that takes no weak reference."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 16

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((8, 8, 1), i, np.float32), i % 3


def test_a_dataclass_dataset_is_not_kept_alive_after_the_calls_on_it():
    """Was: every dataclass dataset given to fit stayed alive for good (held by the record of
    its reader, which closing it never cleared)."""
    model = small()
    refs = []
    for _ in range(3):
        ds = Images(np.zeros((16, 8, 8, 1), np.float32), np.arange(16) % 3)
        model.fit(ds, batch_size=8, epochs=1, verbose=0)
        model.evaluate(ds, batch_size=8, verbose=0)
        model.predict(ds, batch_size=8)
        refs.append(weakref.ref(ds))
        del ds
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    assert len(xpcnn.data.background._LEFT) == 0


@pytest.mark.parametrize("kind", ["dataclass", "no weak reference"])
def test_the_calls_on_one_dataset_share_its_lock(kind):
    """A callback's predict(ds) during fit(ds) reads ds one thread at a time: both calls' sources
    take one lock (was, for an unhashable dataset: a lock of each call's own, the two readers
    inside ds[i] at once). The lock of a dataset that takes no weak reference goes with its last
    source."""
    model = small()
    ds = Images(np.zeros((16, 8, 8, 1), np.float32), np.arange(16) % 3) \
        if kind == "dataclass" else Slotted()
    first = DatasetBatches(model, ds, 8)
    second = DatasetBatches(model, ds, 8, with_targets=False, what="x_val")
    assert first._reading is second._reading
    if kind != "dataclass":
        del first, second
        gc.collect()
        assert xpcnn.data.sources._LOCKS.get(ds) is None


@pytest.mark.parametrize("through", [False, True], ids=["itself", "through-another"])
def test_a_dataset_that_calls_xpcnn_on_itself_from_its_item_is_refused(through):
    """A dataset whose [i] calls predict on itself, directly or from the [j] of another dataset
    it predicts on (whose reader is another thread): the inner call's reader waited for ever
    for the [i] it was called from (its lock); now refused by name (a reader thread inherits
    the record of the datasets its call was made inside)."""

    class Calling:
        def __init__(self, target=None):
            self.model, self.target = small(), target

        def __len__(self):
            return 16

        def __getitem__(self, i):
            if i == 5:
                self.model.predict(self if self.target is None else self.target(), batch_size=8)
            return np.full((8, 8, 1), i, np.float32), i % 3

    outer = Calling()
    if through:  # (outer[5] predicts on middle, whose [5] predicts on outer)
        middle = Calling(target=lambda: outer)
        outer.target = lambda: middle
    outcome = []

    def run():
        try:
            small().fit(outer, batch_size=8, epochs=1, verbose=0)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 (looked at below)
            outcome.append(e)

    # (a thread: the old code's wait never ended; bounded only so that a failure ends)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "deadlocked"
    assert isinstance(outcome[0], InputError)
    assert "x[i] calls xpcnn on x itself" in str(outcome[0])


def test_reading_a_batch_again_is_refused_where_a_reader_holds_the_dataset(monkeypatch):
    """A step's batch read again while another reader is inside dataset[i] (left there by a
    stopped call): the read waits STOP_WAIT_SECONDS at most, then fails, and the step's error
    says so (was: a wait for ever)."""
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)
    ds = SharedFile(n=16)
    model = small()
    batches = DatasetBatches(model, ds, 8)
    gate, inside = threading.Event(), threading.Event()

    def hold():  # (a reader inside ds[i], holding its lock until the gate opens)
        with batches._reading:
            inside.set()
            gate.wait(10)  # (bounded only so that the old code's test fails, not hangs)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert inside.wait(30)
        with pytest.raises(InputError, match="x is still being read by another thread"):
            batches._input_batch(0, 1)
        from xpcnn.data.replay import Replay  # (of this round)

        noted = Noted(None, None, Replay(batches._input_batch, (0, 1), exact=False))
        with pytest.raises(NonFiniteError, match="step 2: the loss is nan; .*reading it again "
                           "failed: InputError: x is still being read by another thread"):
            noted.input_batch(2, "the loss is nan")
    finally:
        gate.set()
        thread.join(30)


class RandomBrightness:
    """A dataset with a random transform: the first read of sample ``bad`` draws a brightness
    that overflows the Dense layer; reading it again draws a finite one."""

    def __init__(self, bad):
        self.bad, self.drawn = bad, False

    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = np.full((4, 4, 1), 0.5, np.float32)
        if i == self.bad and not self.drawn:
            self.drawn = True
            x[...] = 3e38
        return x, i % 3


def test_a_dataset_s_last_batches_are_held_and_its_older_ones_read_again_truthfully():
    """A dataset's batch read again draws its random transforms anew: the last KEPT_INPUTS
    batches before a read are held (the layer named on the step's own batch), and an older one
    read again that gives finite outputs names no place (was: "the first non-finite values
    appear in the loss", on another batch)."""
    layers = [Flatten(), Dense(3), ReLU(), Dense(3), Softmax()]
    held = _named(small((4, 4, 1), layers=layers),
                  lambda m: m.fit(RandomBrightness(bad=60), batch_size=8, verbose=0,
                                  shuffle=False))  # (step 8, read at the epoch's end)
    assert "training stopped at step 8: the loss is" in held
    assert "appear in the output of layer 'dense'" in held
    layers = [Flatten(), Dense(3), ReLU(), Dense(3), Softmax()]
    anew = _named(small((4, 4, 1), layers=layers),
                  lambda m: m.fit(RandomBrightness(bad=45), batch_size=8, verbose=0,
                                  shuffle=False))  # (step 6, two steps before the read)
    assert "training stopped at step 6: the loss is" in anew
    assert "read again from the dataset (no longer held), gives finite outputs" in anew
    assert "appear in the loss" not in anew


class Interrupt(Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 5:
            raise RuntimeError("a callback's error")


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_a_fit_stopped_by_an_error_keeps_no_source_alive(source):
    """A fit that an error stopped before its totals were read: the steps' notes held their
    source (the user's arrays, their copy on a GPU, the dataset) until the next read; now they
    hold it weakly, and the deferred error of a non-finite step says the call that read it
    has ended."""
    x, y = _overflowing(n=64, bad=2)  # (step 1's batch)
    model = small((4, 4, 1), layers=[Flatten(), Dense(3), ReLU(), Dense(3), Softmax()])
    data = (x,) if source == "arrays" else (Samples(x, y),)
    ref = weakref.ref(data[0])
    try:
        with np.errstate(all="ignore"):
            model.fit(*data, *((y,) if source == "arrays" else ()), batch_size=4, verbose=0,
                      callbacks=[Interrupt()], shuffle=False)
    except RuntimeError:
        pass
    assert model._totals.pending  # (not read yet)
    del data, x
    gc.collect()
    assert ref() is None
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError, match=(
            "step 1: the loss is nan; its input batch is no longer held \\(the call that "
            "read it has ended")):
        model._read_totals()


def test_an_array_batch_is_read_again_on_the_model_s_device():
    """Arrays' batch read again on the model's GPU (cuda:1's, not the thread's current one), as
    a dataset's is."""
    entered = []

    class Recording:  # (the model's backend, recording where its GPU is made current)
        def __init__(self, backend):
            self.backend = backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def on_device(self):
            entered.append(True)
            return contextlib.nullcontext()

    x = np.zeros((16, 8, 8, 1), np.float32)
    batches = ArrayBatches(Recording(small().backend), x, np.arange(16) % 3, 8)
    entered.clear()
    assert batches._input_batch(0, 1).shape == (8, 8, 8, 1)
    assert entered


# -- NumPy scalars are host values ---------------------------------------------------------------


class MixedScalars:
    """Labels (and weights) NumPy scalars for some samples, Python numbers for others."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = np.full((8, 8, 1), i, np.float32)
        return x, (np.int64(i % 3) if i < 8 else 0), (np.float32(2.0) if i % 2 else 1.0)


def test_a_dataset_s_numpy_scalar_and_python_number_labels_stack():
    """Was refused: "arrays of array_api_compat.numpy on the device for some i and not for
    others" (a NumPy scalar counted as a device array on the NumPy backend)."""
    model = small()
    model.fit(MixedScalars(), batch_size=16, epochs=1, verbose=0)
    assert model.optimizer.iterations == 1
