"""Batch sources: arrays on the device, memory maps, generators, map-style datasets, prefetching.

Every source that gives the same batches must give the same weights, bit for bit."""

from __future__ import annotations

import contextlib
import itertools
import threading
import tracemalloc
import types
from collections.abc import Iterator
from typing import Any

import array_api_strict as xps
import numpy as np
import pytest
from nets import gap_net

import xpcnn
import xpcnn.data.arrays
import xpcnn.data.background
import xpcnn.data.sources
import xpcnn.data.streams
from xpcnn.callbacks import LambdaCallback
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import Dense, Flatten, Rescaling, Softmax
from xpcnn.training import trainer as trainer_module

N, BATCH, EPOCHS, SEED = 44, 8, 2, 5  # 6 steps an epoch, the last one short

# (a test that sends this process a signal: Python delivers it to the main thread alone)
on_the_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                        reason="signals reach the main thread only")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, N)


def make(device="cpu"):
    model = xpcnn.Sequential(gap_net(classes=4), seed=0, device=device)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    return model


def trained(x, y=None, device="cpu", epochs=EPOCHS, **fit):
    model = make(device)
    model.fit(x, y, epochs=epochs, batch_size=BATCH, seed=SEED, verbose=0, **fit)
    return model


def shuffled_batches(x, y, epochs=EPOCHS):
    """The batches fit makes of arrays, in its order (a pure function of seed and epoch)."""
    for epoch in range(epochs):
        order = np.random.default_rng([SEED, epoch]).permutation(len(x))
        for a in range(0, len(x), BATCH):
            yield x[order[a:a + BATCH]], y[order[a:a + BATCH]]


class Loader:
    """An iterable that is not an iterator (PyTorch's DataLoader): a new pass each time."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class MapDataset:
    """PyTorch's habit: len() and one (image, label) pair per index."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return int(self.y.shape[0])

    def __getitem__(self, i):
        return self.x[i, ...], self.y[i]


def assert_same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for i, (u, v) in enumerate(zip(wa, wb, strict=True)):
        assert np.array_equal(u, v), f"weight array {i} differs"


def test_the_data_and_saving_packages_export_their_user_api_only():
    """xpcnn.data exported 22 names (21 internal, none in the README) and the registry's dicts
    for the tests; xpcnn.saving its checkpoint internals. Internals come from their modules."""
    import xpcnn.saving

    assert xpcnn.data.__all__ == ["Batches"]
    for name in ("ArrayBatches", "owned", "rank_slices", "stream_of", "_STREAMS",
                 "_HELD_STREAMS", "PREFETCH"):
        assert not hasattr(xpcnn.data, name), name
    for name in ("FitCheckpoints", "Progress", "progress_within", "fingerprint"):
        assert name not in xpcnn.saving.__all__ and not hasattr(xpcnn.saving, name), name
    assert {"load_checkpoint", "restore_checkpoint", "load_model",
            "load_weights"} <= set(xpcnn.saving.__all__)


# -- one source, the same weights ----------------------------------------------------------------


def test_a_generator_gives_the_weights_of_the_arrays_on_the_same_batches(data):
    x, y = data
    reference = trained(x, y)
    fed = trained(shuffled_batches(x, y), steps_per_epoch=6)
    assert_same_weights(fed, reference)
    assert fed.history.history["loss"] == reference.history.history["loss"]
    # a re-iterable (a DataLoader, say) is gone through afresh every epoch
    plain = trained(x, y, shuffle=False)
    loader = Loader([(x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH)])
    assert_same_weights(trained(loader), plain)


def test_a_map_style_dataset_is_batched_and_shuffled_as_arrays_are(data):
    x, y = data
    assert_same_weights(trained(MapDataset(x, y)), trained(x, y))
    model = trained(x, y)
    assert model.evaluate(MapDataset(x, y), batch_size=16) == model.evaluate(x, y, batch_size=16)
    assert np.array_equal(model.predict(MapDataset(x, y)), model.predict(x))
    assert np.array_equal(model.predict(iter([x[:20], x[20:40], x[40:]]), steps=3),
                          model.predict(x, batch_size=20))


class RefilledDataset(MapDataset):
    """Decodes every sample into one buffer of its own, refilled at each [i] (a loop's habit)."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.image, self.label = np.empty_like(x[0]), np.empty((), y.dtype)

    def __getitem__(self, i):
        self.image[...], self.label[...] = self.x[i], self.y[i]
        return self.image, self.label


def test_a_dataset_refilling_one_buffer_trains_as_one_returning_new_arrays(data):
    """Each sample's arrays are copied as they are read (was: every sample of a batch was the
    batch's last, silently, as the stacking read them all after the loop)."""
    x, y = data
    assert_same_weights(trained(RefilledDataset(x, y)), trained(MapDataset(x, y)))
    model = trained(x, y)
    assert np.array_equal(model.predict(RefilledDataset(x, y)), model.predict(x))


@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
def test_a_dataset_refilling_one_buffer_of_another_library_trains_as_one_returning_new_arrays(
        data, library):
    """A PyTorch tensor on the CPU (read through DLPack, without a copy) or an array of the
    model's own library, refilled at every [i], is copied as it is read, as a NumPy buffer is
    (was: every sample of a batch was the batch's last, silently: in training, evaluate and
    predict)."""
    x, y = data
    if library == "torch":
        torch = pytest.importorskip("torch")
        device = "cpu"
        image, label = torch.empty(x[0].shape, dtype=torch.uint8), torch.empty((),
                                                                                dtype=torch.int64)

        def fill(i):
            image.copy_(torch.from_numpy(x[i]))
            label.fill_(int(y[i]))
            return image, label
    else:
        where = xps.Device("device1")
        device = (xps, where)
        image = xps.zeros(x[0].shape, dtype=xps.uint8, device=where)

        def fill(i):
            image[...] = xps.asarray(x[i], device=where)
            return image, y[i]

    class Refilled(MapDataset):
        def __getitem__(self, i):
            return fill(i)

    expected = trained(MapDataset(x, y), device=device)
    assert_same_weights(trained(Refilled(x, y), device=device), expected)
    np.testing.assert_array_equal(expected.predict(Refilled(x, y), batch_size=BATCH),
                                  expected.predict(x, batch_size=BATCH))
    assert expected.evaluate(Refilled(x, y), batch_size=BATCH) == \
        expected.evaluate(x, y, batch_size=BATCH)


def test_a_memory_map_is_read_batch_by_batch_never_whole(tmp_path):
    n, shape = 2000, (16, 16, 3)  # a 1.5 MB file, batches of 3 KB
    rng = np.random.default_rng(1)
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8,
                                  shape=(n, *shape))
    x[:] = rng.integers(0, 256, x.shape, dtype=np.uint8)
    x.flush()
    y = rng.integers(0, 4, n)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")

    def model():
        m = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(4), Softmax()], seed=0)
        m.compile(optimizer=xpcnn.optim.SGD(0.01))
        return m

    # (a first step imports the NumPy kernels, compiling their source where no bytecode is
    # cached, PYTHONDONTWRITEBYTECODE=1: megabytes traced that are no read of the file)
    model().fit(np.array(mapped[:8]), y[:8], epochs=1, batch_size=4, verbose=0)
    streamed = model()
    tracemalloc.start()
    streamed.fit(mapped, y, epochs=1, batch_size=4, seed=SEED, verbose=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < mapped.nbytes / 4, f"{peak} bytes traced for a {mapped.nbytes}-byte file"
    in_memory = model()
    in_memory.fit(np.array(mapped), y, epochs=1, batch_size=4, seed=SEED, verbose=0)
    assert_same_weights(streamed, in_memory)


# -- data on the device --------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_device_arrays_host_arrays_and_uploaded_arrays_give_the_same_weights(data, library,
                                                                             monkeypatch):
    if library == "torch":
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as namespace

        device, put = namespace, torch.from_numpy
    else:
        device = (xps, xps.Device("device1"))
        put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731
    x, y = data
    uploads = []
    real = xpcnn.Backend.asarray

    def asarray(self, a, dtype=None):
        if getattr(a, "shape", ())[1:] == x.shape[1:]:  # images (not weights)
            uploads.append(a.shape)
        return real(self, a, dtype)

    monkeypatch.setattr(xpcnn.Backend, "asarray", asarray)
    on_device = trained(put(x), put(y), device=device)
    assert uploads == []  # gathered where they are
    uploaded = trained(x, y, device=device)
    assert uploads == [x.shape]  # once, as given (uint8), then gathered on the device
    uploads.clear()
    monkeypatch.setattr(xpcnn.data.sources, "DEVICE_BUDGET_BYTES", 0)
    per_batch = trained(x, y, device=device)
    assert len(uploads) == EPOCHS * 6  # over the budget: one upload per batch
    assert_same_weights(on_device, per_batch)
    assert_same_weights(uploaded, per_batch)
    assert on_device.evaluate(put(x), put(y)) == per_batch.evaluate(x, y)
    np.testing.assert_array_equal(on_device.predict(put(x)), per_batch.predict(x))


@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_big_endian_images_train_on_a_device_as_native_ones_do(data, library, tmp_path,
                                                                monkeypatch):
    if library == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as device
    else:
        device = (xps, xps.Device("device1"))
    x, y = data
    native = x.astype(np.float32)
    big = x.astype(">f4")  # (as a file written on another machine holds them)
    np.save(tmp_path / "x.npy", big)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    # (one epoch: each source converts every batch of it; a second ran the same code again)
    expected = trained(native, y, device=device, epochs=1)
    # (each was "The array_api_strict namespace does not support the dtype '>f4'", or
    # torch's "byte order different from the native byte order")
    assert_same_weights(trained(big, y, device=device, epochs=1), expected)
    assert_same_weights(trained(mapped, y, device=device, epochs=1), expected)
    assert_same_weights(trained(shuffled_batches(big, y, 1), steps_per_epoch=6, shuffle=False,
                                device=device, epochs=1), expected)
    np.testing.assert_array_equal(expected.predict(big), expected.predict(native))
    monkeypatch.setattr(xpcnn.data.sources, "DEVICE_BUDGET_BYTES", 0)  # one upload per batch
    assert_same_weights(trained(big, y, device=device, epochs=1), expected)


def test_a_dataset_of_host_and_device_samples_mixed_is_refused(data):
    x, y = data
    put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731

    class Mixed(MapDataset):  # every other image already on the device
        def __getitem__(self, i):
            return (put(self.x[i]) if i % 2 == self.odd else self.x[i]), self.y[i]

    # (was a RuntimeError or a TypeError from inside array_api_strict, by the first sample)
    for odd in (0, 1):
        Mixed.odd = odd
        with pytest.raises(InputError, match=r"the x_i that x\[i\] returns are arrays of "
                                             r"array_api_strict on the device for some i and not "
                                             r"for others: a batch is stacked in one place, so "
                                             r"return one kind"):
            trained(Mixed(x, y), device=(xps, xps.Device("device1")))
    assert prefetch_threads() == []


def test_labels_of_shape_n_by_1_as_keras_datasets_gives_them(data):
    """keras.datasets.cifar10 gives labels (N, 1): taken as (N,), the same weights (was:
    'y must be integer labels of shape (N,) or one-hot rows of shape (N, 4)')."""
    x, y = data
    column = y[:, None].astype(np.uint8)
    model = trained(x, column)
    for a, b in zip(model.get_weights(), trained(x, y).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.evaluate(x, column) == model.evaluate(x, y)


def test_float_labels_as_a_column_are_taken_as_float_labels_are(data):
    """Labels (N, 1) of floats (read from a CSV file, a float32 label tensor) are labels, as
    (N,) floats and (N, 1) integers are, and as Keras 3's sparse cross-entropy takes them
    (was: 'y must be integer labels of shape (N,) or one-hot rows of shape (N, 4)'); whole
    numbers only, as for (N,) floats."""
    x, y = data
    expected = trained(x, y)
    for dtype in (np.float32, np.float64):
        column = y[:, None].astype(dtype)
        model = trained(x, column)
        assert_same_weights(model, expected)
        assert model.evaluate(x, column) == expected.evaluate(x, y)
        # (a dataset whose labels are float arrays of one value: stacked into a column)
        assert_same_weights(trained(MapDataset(x, column)), trained(MapDataset(x, y)))
    halves = y[:, None] + 0.5
    with pytest.raises(InputError, match=r"y must be integer class labels, got dtype float64: "
                                         r"label 0 is \d\.5, one of 44 that are not whole "
                                         r"numbers"):
        expected.evaluate(x, halves)


def test_arrays_of_another_library_on_the_cpu_train_as_numpy_arrays(data):
    """A PyTorch DataLoader's tensors (its default collate), or array_api_strict arrays on the
    CPU, given to a NumPy model: read on the host as Keras reads them, the same weights as the
    NumPy arrays give (was: 'x is an array of array_api_compat.torch on cpu, but the model is
    on cpu')."""
    x, y = data
    want = trained(x, y).get_weights()
    batches = [(xps.asarray(x[i:i + BATCH]), xps.asarray(y[i:i + BATCH]))
               for i in range(0, N, BATCH)]
    for a, b in zip(trained(xps.asarray(x), xps.asarray(y)).get_weights(), want, strict=True):
        np.testing.assert_array_equal(a, b)
    steps = len(batches)
    model = make()
    model.fit(iter(batches), epochs=1, steps_per_epoch=steps, verbose=0)
    reference = make()
    reference.fit(iter([(np.asarray(a), np.asarray(b)) for a, b in batches]), epochs=1,
                  steps_per_epoch=steps, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=BATCH)
    model = make()
    model.fit(loader, epochs=1, verbose=0)
    reference = make()
    reference.fit(iter([(a.numpy(), b.numpy()) for a, b in loader]), epochs=1,
                  steps_per_epoch=len(loader), verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(torch.from_numpy(x[:5])), model.predict(x[:5]))
    # (autograd, or a dtype NumPy lacks: no host view; was "on cpu, but the model is on cpu")
    bfloat16 = torch.from_numpy(x).to(torch.bfloat16)
    unread = [torch.from_numpy(x.astype(np.float32)).requires_grad_()]
    try:  # (NumPy 2.5 reads bfloat16 through DLPack, as ml_dtypes' dtype, once that is loaded)
        np.from_dlpack(bfloat16)
    except (BufferError, RuntimeError, TypeError):
        unread.append(bfloat16)
    else:
        for a, b in zip(trained(bfloat16, y).get_weights(),
                        trained(bfloat16.float().numpy(), y).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    for tensor in unread:
        with pytest.raises(InputError, match=r"an array of array_api_compat.torch on the CPU "
                                             r"\(dtype torch.\w+\) that NumPy cannot read "
                                             r"\((BufferError|RuntimeError): .*\): pass one that "
                                             r"needs no gradient \(PyTorch: .detach\(\)\)"):
            model.fit(tensor, y, verbose=0)


def test_arrays_that_numpy_cannot_read_are_refused_by_name(data):
    """Arrays that np.from_dlpack cannot read (a PyTorch tensor on its 'meta' device, as a CUDA
    tensor or a CuPy array would be for a NumPy model), images or labels, refused naming their
    library (was, for labels: 'BufferError: Cannot pack tensors on meta', and on a CuPy model
    "'Tensor' object has no attribute 'get'")."""
    torch = pytest.importorskip("torch")
    x, y = data
    model = make()
    elsewhere = torch.from_numpy(y).to("meta")
    for call in (lambda: model.fit(x, elsewhere, verbose=0),
                 lambda: model.evaluate(x, elsewhere, verbose=0),
                 lambda: model.train_on_batch(x[:BATCH], elsewhere[:BATCH]),
                 lambda: model.fit(iter([(x[:BATCH], elsewhere[:BATCH])]), steps_per_epoch=1,
                                   verbose=0)):
        with pytest.raises(InputError, match=r"y is an array of array_api_compat.torch on meta, "
                                             r"but the model is on cpu"):
            call()
    with pytest.raises(InputError, match=r"x is an array of array_api_compat.torch on meta"):
        model.predict(torch.from_numpy(x).to("meta"))


class _OnTheGpu:
    """An array of another library on a CUDA device as DLPack describes it (a PyTorch CUDA
    tensor): NumPy cannot read it."""

    device = "cuda:0"

    def __array_namespace__(self, api_version=None):
        return types.ModuleType("otherlib")

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, **kwargs):
        raise BufferError("Unsupported device in DLTensor")  # (NumPy's words for a CUDA one)


def test_arrays_of_another_library_on_the_gpu_are_read_by_the_models_library(data):
    """A GPU array of another library goes to the model's library's from_dlpack (CuPy's reads
    a PyTorch CUDA tensor where it is, no copy; tests/test_gpu.py), a CPU one to NumPy's;
    NumPy, for a model on the CPU, cannot read a GPU array, which is refused by name."""
    x, y = data
    read = []
    gpu_model = types.SimpleNamespace(backend=types.SimpleNamespace(xp=types.SimpleNamespace(
        __name__="gpulib", from_dlpack=lambda a: read.append(a) or "read by gpulib")))
    gpu = _OnTheGpu()
    assert xpcnn.data.arrays.adopt_foreign(gpu, gpu_model.backend) == "read by gpulib"
    assert read == [gpu]
    model = make()
    assert xpcnn.data.arrays.adopt_foreign(xps.asarray(x), model.backend).__class__ is np.ndarray
    with pytest.raises(InputError, match=r"x is an array of otherlib on cuda:0, but the model "
                                         r"is on cpu"):
        model.fit(gpu, y, verbose=0)


def test_arrays_of_another_library_or_device_are_refused(data):
    x, y = data
    model = make((xps, xps.Device("device1")))
    with pytest.raises(InputError, match="x is an array of array_api_strict on .*device2.* but "
                                         "the model is on array_api_strict:.*device1"):
        model.fit(xps.asarray(x, device=xps.Device("device2")), y, verbose=0)
    bad = xps.asarray(x.astype(np.float32), device=xps.Device("device1"))
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="x holds NaN or infinite values: sample 3"):
        model.fit(bad, y, verbose=0)


@pytest.mark.parametrize("bad, match", [
    (2.5, r"y must be integer class labels, got dtype float64: y\[13\] is 2\.5, one of 1 that "
          r"are not whole numbers"),
    (np.nan, r"y must be integer class labels, got dtype float64 holding NaN \(1 labels\): "
             r"y\[13\] is nan"),
    (7, r"labels in y must be in \[0, 3\] for a model of 4 classes; found values from 0 to "
        r"7: y\[13\] is 7, the first of 1 out of range"),
    (-1, r"found values from -1 to \d: y\[13\] is -1, the first of 1 out of range"),
    ("one-hot", r"one-hot y must hold probabilities, each row >= 0 and summing to 1; y\[13\] "
                r"sums to 2 "),
    ("one-hot inf", r"one-hot y holds NaN or infinite values: y\[13\] is the first of 1 such "
                    r"rows"),
], ids=["half", "nan", "too large", "negative", "one-hot", "one-hot inf"])
def test_a_datasets_bad_label_is_named_by_its_dataset_index(data, bad, match):
    """A map-style dataset's sample 13 with a bad label, in a shuffled batch: named y[13], as a
    bad image is x[13] (was: "label 1", its position in the batch, or no sample at all)."""
    x, y = data
    if isinstance(bad, str):
        y = np.eye(4)[y]
        y[13] = [1, 1, 0, 0] if bad == "one-hot" else [np.inf, 0, 0, 0]
    else:
        y = y.astype(np.float64 if isinstance(bad, float) else np.int64)
        y[13] = bad
    with pytest.raises(InputError, match=match):
        make().fit(MapDataset(x, y), batch_size=BATCH, seed=SEED, verbose=0)


def test_an_out_of_range_label_in_arrays_is_named_by_its_position(data):
    x, y = data
    y = y.copy()
    y[[9, 30]] = 4
    with pytest.raises(InputError, match=r"found values from 0 to 4: label 9 is 4, the first of "
                                         r"2 out of range$"):
        make().fit(x, y, verbose=0)


def test_streamed_device_labels_are_checked_like_host_labels(data):
    """A label out of range would silently match no class (the loss kernels compare labels
    with class numbers): streamed device labels are checked as host ones are."""
    x, y = data
    device = (xps, xps.Device("device1"))
    put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731
    model = make(device)
    wrong = y.copy()
    wrong[5] = 4  # a fifth class of a 4-class model
    for source in (iter([(put(x), put(wrong))]), MapDataset(put(x), put(wrong))):
        with pytest.raises(InputError, match=r"labels in y must be in \[0, 3\] for a model "
                                             "of 4 classes; found values from 0 to 4"):
            model.fit(source, steps_per_epoch=1 if isinstance(source, Iterator) else None,
                      verbose=0)
    with pytest.raises(InputError, match=r"y has 43 labels but x has 44"):
        model.evaluate(iter([(put(x), put(y[:-1]))]), steps=1)
    batches = list(shuffled_batches(x, y, 1))  # (one epoch: a second ran the same code again)
    on_device = make(device)
    on_device.fit(iter([(put(a), put(b)) for a, b in batches]), steps_per_epoch=len(batches),
                  verbose=0)
    on_host = make(device)
    on_host.fit(iter(batches), steps_per_epoch=len(batches), verbose=0)
    assert_same_weights(on_device, on_host)
    # a map-style dataset of device samples is batched on the device
    assert_same_weights(trained(MapDataset(put(x), put(y)), device=device, epochs=1),
                        trained(MapDataset(x, y), device=device, epochs=1))


def test_a_dataset_whose_samples_cannot_be_stacked_is_refused(data):
    x, y = data
    class Ragged(MapDataset):  # sample 3 is a row short
        def __getitem__(self, i):
            return self.x[i, :5 if i == 3 else 6], self.y[i]

    ragged = Ragged(x, y)
    with pytest.raises(InputError, match=r"the x_i that x\[i\] returns cannot be stacked into "
                                         r"a batch \(.*shape.*\): they must share one shape"):
        trained(ragged)


# -- the background thread -------------------------------------------------------------------------


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "xpcnn-prefetch"]


def test_an_error_in_the_data_reaches_the_caller(data):
    x, y = data

    def broken():
        yield x[:8], y[:8]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        make().fit(broken(), steps_per_epoch=3, verbose=0)
    wrong = iter([(x[:8, :5], y[:8])])
    model = make()
    model.build((6, 6, 3))
    with pytest.raises(InputError, match=r"x has per-sample shape \(5, 6, 3\) but the model "
                                         r"expects \(6, 6, 3\)"):
        model.fit(wrong, steps_per_epoch=1, verbose=0)
    assert prefetch_threads() == []


def test_stopping_early_stops_the_thread(data):
    x, y = data
    drawn = []

    def endless():
        while True:
            drawn.append(1)
            yield x[:8], y[:8]

    stop = LambdaCallback(on_train_batch_end=lambda b, logs: setattr(model, "stop_training",
                                                                     b == 1))
    model = make()
    model.fit(endless(), steps_per_epoch=100, epochs=3, verbose=0, callbacks=[stop])
    assert model.optimizer.iterations == 2 and prefetch_threads() == []
    # the thread drew at most PREFETCH batches ahead (and one more it was waiting to hand over)
    assert len(drawn) <= 2 + xpcnn.data.background.PREFETCH + 1


def _numbered(x, y, drawn=None, size=4):
    """An endless generator of batches of ``size``: batch k is samples k * size on (mod 40),
    its number added to ``drawn`` as it is drawn."""
    for k in itertools.count():
        if drawn is not None:
            drawn.append(k)
        a = k * size % 40
        yield x[a:a + size], y[a:a + size]


def _stops_at(batch, how="stop"):
    """A callback that stops training at the end of ``batch``: by ``stop_training``, or by
    raising."""
    def end(b, logs):
        if b == batch:
            if how == "stop":
                model_of[0].stop_training = True
            else:
                raise RuntimeError("stopped by the callback")

    model_of = [None]
    callback = LambdaCallback(on_train_batch_end=end,
                              on_train_begin=lambda logs: model_of.__setitem__(0, callback.model))
    return callback


@pytest.mark.parametrize("how", ["stop", "raise"])
def test_batches_drawn_ahead_are_given_back_when_an_epoch_stops_early(data, how):
    """fit stopped inside an epoch over an iterator (a callback's stop_training, an error)
    gives back the batches the background thread drew ahead and the loop did not take, in
    order: the next call on the iterator starts with them (was: dropped, the next fit began
    PREFETCH + 1 batches later). Training on batches 0, 1 then 2, 3, 4 in two calls gives the
    weights of batches 0 to 4 in one."""
    x, y = data
    drawn = []
    stream = _numbered(x, y, drawn)
    model = make()
    with pytest.raises(RuntimeError) if how == "raise" else contextlib.nullcontext():
        model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stops_at(1, how)])
    assert model.optimizer.iterations == 2 and prefetch_threads() == []
    first = len(drawn)
    # (the thread was ahead: the case at hand)
    assert 1 <= first - 2 <= xpcnn.data.background.PREFETCH + 1
    model.fit(stream, steps_per_epoch=3, verbose=0)
    assert len(drawn) == max(5, first)  # (what was drawn ahead first, then new batches)
    reference = make()
    reference.fit(_numbered(x, y), steps_per_epoch=5, verbose=0)
    assert_same_weights(model, reference)
    # the next call takes what is left, then goes on drawing: batches 5, 6
    predicted = model.predict(stream, steps=2, batch_size=4)
    np.testing.assert_array_equal(predicted, model.predict(x[20:28], batch_size=4))
    assert len(drawn) == 7 and not xpcnn.data.streams.stream_of(stream).pending


def test_batches_given_back_are_copies_of_a_refilled_buffer(data):
    """A generator that refills one buffer for every batch (a plain loop may): the batches
    given back are the ones it yielded, not the buffer's last fill."""
    x, y = data
    xb, yb = np.empty((4, *x.shape[1:]), x.dtype), np.empty(4, y.dtype)

    def refilled():
        for xs, ys in _numbered(x, y):
            xb[...], yb[...] = xs, ys
            yield xb, yb

    stream = refilled()
    model = make()
    model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stops_at(1)])
    model.fit(stream, steps_per_epoch=3, verbose=0)
    reference = make()
    reference.fit(_numbered(x, y), steps_per_epoch=5, verbose=0)
    assert_same_weights(model, reference)


def test_predict_stopped_by_an_error_gives_back_what_it_drew_ahead(data):
    x, y = data
    model = make()
    model.build(x.shape[1:])
    stream = _numbered(x, y)

    def fail(batch, logs):
        if batch == 0:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        model.predict(stream, steps=5, callbacks=[LambdaCallback(on_predict_batch_end=fail)])
    np.testing.assert_array_equal(model.predict(stream, steps=2, batch_size=4),
                                  model.predict(x[4:12], batch_size=4))


def test_a_batch_the_checks_refuse_is_not_given_back(data):
    """The batch an error names is dropped (given back, every retry would be refused at once
    by it); the next call on the iterator starts after it."""
    x, y = data
    batches = [(x[a:a + 4], y[a:a + 4]) for a in range(0, 40, 4)]
    wrong = (x[8:12, :5], y[8:12])
    stream = iter([*batches[:2], wrong, *batches[3:]])
    model = make()
    with pytest.raises(InputError, match=r"x has per-sample shape \(5, 6, 3\)"):
        model.fit(stream, steps_per_epoch=5, verbose=0)
    assert model.optimizer.iterations == 2 and prefetch_threads() == []
    model.fit(stream, steps_per_epoch=1, verbose=0)
    reference = make()
    reference.fit(iter([*batches[:2], batches[3]]), steps_per_epoch=3, verbose=0)
    assert_same_weights(model, reference)


def test_evaluate_and_predict_read_a_generator_to_its_end_without_steps(data):
    """As Keras 3 reads one with steps=None (was: 'x is an iterator (a generator): pass
    steps'); fit still needs steps_per_epoch, as it reads on from epoch to epoch."""
    x, y = data
    model = trained(x, y)

    def batches(targets=True):
        return ((x[a:a + BATCH], y[a:a + BATCH]) if targets else x[a:a + BATCH]
                for a in range(0, N, BATCH))

    expected = model.predict(x, batch_size=BATCH)
    np.testing.assert_array_equal(model.predict(batches(False)), expected)
    np.testing.assert_array_equal(model.predict(batches(), verbose=1), expected)  # (no total)
    params = []
    callback = LambdaCallback(on_test_begin=lambda logs: params.append(callback.params))
    loss, accuracy = model.evaluate(batches(), callbacks=[callback])
    assert params[0]["steps"] is None
    want_loss, want_accuracy = model.evaluate(x, y, batch_size=BATCH)
    assert loss == pytest.approx(want_loss, rel=1e-6) and accuracy == want_accuracy
    # (a NumPy reference: the mean cross-entropy of the probabilities predict gave)
    assert loss == pytest.approx(-np.mean(np.log(expected[np.arange(N), y])), rel=1e-5)
    with pytest.raises(InputError, match="the prediction data gave no batches"):
        model.predict(iter([]))
    with pytest.raises(InputError, match="the evaluation data gave no batches"):
        model.evaluate(iter([]))
    with pytest.raises(InputError, match="^x gave no batches$"):
        make().predict(iter([]))
    with pytest.raises(InputError, match=r"x is an iterator \(a generator\): pass "
                                         r"steps_per_epoch"):
        model.fit(batches(), verbose=0)


def test_a_dataloaders_len_is_the_steps_of_its_epochs(data):
    """Without steps, a PyTorch DataLoader's len() is params["steps"] and the progress bar's
    total, as Keras 3 takes it (was: None); it does not cut a pass longer than it says. Any
    other re-iterable's len() is not taken (a user's may count samples: a shorter pass would
    stop training), nor an IterableDataset's (an estimate, PyTorch says)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data
    pairs = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = DataLoader(pairs, batch_size=BATCH)
    steps = []
    record = LambdaCallback(on_train_begin=lambda logs: steps.append(record.params["steps"]),
                            on_test_begin=lambda logs: steps.append(record.params["steps"]),
                            on_predict_begin=lambda logs: steps.append(record.params["steps"]))
    model = make()
    model.fit(loader, epochs=2, verbose=0, callbacks=[record])
    model.evaluate(loader, callbacks=[record])
    assert steps == [6, 6] and len(loader) == 6
    model.predict(loader, callbacks=[record])
    assert steps == [6, 6, 6]
    assert model.optimizer.iterations == 12
    assert_same_weights(model, trained(x, y, shuffle=False))

    class Undercounted:  # (a batch sampler whose len() says 4 of its 6 batches)
        def __iter__(self):
            return (list(range(a, min(a + BATCH, N))) for a in range(0, N, BATCH))

        def __len__(self):
            return 4

    model = make()
    model.fit(DataLoader(pairs, batch_sampler=Undercounted()), epochs=2, verbose=0,
              callbacks=[record])
    assert steps[-1] == 4 and model.optimizer.iterations == 12  # (every batch of each pass)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ((x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH))

        def __len__(self):
            return N

    batches = [(x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH)]
    for source in (Stream(), DataLoader(Stream(), batch_size=None), Counted(batches, N)):
        model = make()
        model.fit(source, verbose=0, callbacks=[record])
        assert steps[-1] is None and model.optimizer.iterations == 6


class Counted(Loader):
    """A re-iterable of batches whose len() counts samples."""

    def __init__(self, batches, samples):
        super().__init__(batches)
        self.samples = samples

    def __len__(self):
        return self.samples


def test_streamed_inputs_are_checked(data):
    x, y = data
    model = make()
    with pytest.raises(InputError, match="is an iterator .*: pass steps_per_epoch,"):
        model.fit(iter([(x, y)]), verbose=0)
    with pytest.raises(InputError, match="y must be None when x is a dataset or an iterable"):
        model.fit(MapDataset(x, y), y, verbose=0)
    with pytest.raises(InputError, match="^steps_per_epoch is for generators; arrays give"):
        model.fit(x, y, steps_per_epoch=3, verbose=0)
    with pytest.raises(InputError, match=r"x must yield \(x, y\) or \(x, y, sample_weight\) "
                                         r"batches, got ndarray"):
        model.fit(Loader([x]), verbose=0)
    model.build((6, 6, 3))
    with pytest.raises(InputError, match="gave no batches in epoch 1"):
        model.fit(iter([]), steps_per_epoch=1, epochs=2, verbose=0)
    # (out as an epoch ends: a warning, the epochs trained, as in Keras 3; was: an InputError)
    with pytest.warns(RuntimeWarning, match="ran out as epoch 1 ended"):
        assert model.fit(iter([(x, y)]), steps_per_epoch=1, epochs=2, verbose=0).epoch == [0]
    # out inside an epoch: a warning, and training stops there, as in Keras (was: silent)
    with pytest.warns(RuntimeWarning, match=r"ran out after 2 of its 3 batches \(steps_per_"
                                            r"epoch\) in epoch 2: training stops here"):
        history = model.fit(iter([(x, y)] * 5), steps_per_epoch=3, epochs=4, verbose=0)
    assert history.epoch == [0, 1]
    nan = x.astype(np.float32)
    nan[2, 1, 1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="x holds NaN or infinite values: sample 2"):
        model.fit(iter([(nan, y)]), steps_per_epoch=1, verbose=0)
    with pytest.raises(InputError, match="validation_split needs arrays"):
        model.fit(MapDataset(x, y), validation_split=0.2, verbose=0)
    two_epochs = iter(list(shuffled_batches(x, y, 1))[:4])  # (was 'the evaluation data ...')
    with pytest.warns(RuntimeWarning, match=r"the validation data ran out after 0 of its 2 "
                                            r"batches \(validation_steps\) in epoch 3: training "
                                            r"stops after this epoch"):
        model.fit(x, y, epochs=4, validation_data=two_epochs, validation_steps=2, verbose=0)
    assert model.history.epoch == [0, 1, 2]  # (the epoch that ran out kept, without val_*)
    assert len(model.history.history["val_loss"]) == 2
    for call, what in ((model.evaluate, "evaluation"), (model.predict, "prediction")):
        with pytest.raises(InputError, match=f"^the {what} data gave no batches$"):  # (predict:
            call(iter([]), steps=2)  # a bare ValueError from concat)


def test_validation_split_and_validation_data_on_the_device(data):
    x, y = data
    device = (xps, xps.Device("device1"))
    put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731
    # (one epoch each: a second ran the same code again)
    on_device = trained(put(x), put(y), device=device, validation_split=0.25, epochs=1)
    on_host = trained(x, y, device=device, validation_split=0.25, epochs=1)
    assert_same_weights(on_device, on_host)
    assert on_device.history.history == {**on_host.history.history,
                                         "seconds": on_device.history.history["seconds"]}
    streamed = trained(x[:33], y[:33], device=device, epochs=1,
                       validation_data=MapDataset(x[33:], y[33:]))
    assert streamed.history.history["val_loss"] == on_host.history.history["val_loss"]


def test_validation_split_checks_the_arrays_once_as_a_whole(data, monkeypatch):
    """x and y are checked once, whole, then split: the weights and history of a fit on the
    first part with the rest as validation_data, whose two parts are checked each."""
    x, y = data
    calls = []
    check = trainer_module.check_arrays
    monkeypatch.setattr(trainer_module, "check_arrays",
                        lambda *args, **kwargs: calls.append(args) or check(*args, **kwargs))
    split = trained(x, y, validation_split=0.25)
    assert len(calls) == 1
    given = trained(x[:33], y[:33], validation_data=(x[33:], y[33:]))
    assert len(calls) == 3
    assert_same_weights(split, given)
    assert split.history.history == {**given.history.history,
                                     "seconds": split.history.history["seconds"]}


@pytest.mark.parametrize("samples, batch_size, ranks", [(50, 4, 3), (48, 4, 2), (7, 5, 4),
                                                        (13, 1, 1)])
def test_every_rank_knows_its_place_in_each_global_batch(samples, batch_size, ranks):
    """What the ranks would learn by telling each other their slices' sizes (the host
    allreduce an iterable needs each step), each rank computes from the shard alone."""
    x, y = np.zeros((samples, 2, 2, 1), np.uint8), np.zeros(samples, np.int64)
    backend = xpcnn.backend.get_backend("cpu")
    sources = [xpcnn.data.sources.ArrayBatches(backend, x, y, batch_size, shard=(r, ranks))
               for r in range(ranks)]
    slices = [list(xpcnn.data.sources.rank_slices(samples, batch_size, 0, (r, ranks)))
              for r in range(ranks)]
    for step in range(sources[0].steps):
        sizes = [hi - lo for lo, hi in (s[step] for s in slices)]
        for r, source in enumerate(sources):
            assert source.place(step) == (sum(sizes[:r]), sizes[r], sum(sizes))
    covered = sorted(i for s in slices for lo, hi in s for i in range(lo, hi))
    assert covered == list(range(samples))  # every sample once, in some rank's slice
    iterable = xpcnn.data.streams.IterableBatches(xpcnn.Sequential([Flatten(), Dense(2)]), [(x, y)],
                                          None)
    assert iterable.place(0) is None  # (only its batches tell: the ranks ask each other)


# -- what a dataset or a generator gives, read as the user meant it ------------------------------


def test_steps_with_a_dataset_is_refused_as_with_arrays(data):
    x, y = data
    model = make()
    refused = r"^{} is for generators; a dataset gives ceil\(len\(dataset\) / batch_size\) " \
              r"batches$"
    with pytest.raises(InputError, match=refused.format("steps_per_epoch")):  # (was ignored:
        model.fit(MapDataset(x, y), steps_per_epoch=2, verbose=0)  # every sample, each epoch)
    with pytest.raises(InputError, match=refused.format("steps")):
        model.evaluate(MapDataset(x, y), steps=100)
    assert model.optimizer.iterations == 0


def test_a_dataset_item_that_is_not_a_pair_is_named(data):
    x, y = data

    class Records(MapDataset):
        def __getitem__(self, i):
            return {"image": self.x[i], "label": self.y[i]}

    class Quadruples(MapDataset):
        def __getitem__(self, i):
            return self.x[i], self.y[i], 1.0, 0

    expected = r"x\[i\] must return a pair \(x_i, y_i\) or a triple \(x_i, y_i, w_i\), got "
    # (a dict built the model from shape (): 'input_shape must be positive sizes ... got ()')
    with pytest.raises(InputError, match=expected + r"a dict with keys \['image', 'label'\]$"):
        trained(Records(x, y))
    with pytest.raises(InputError, match=expected + "tuple of length 4$"):
        trained(Quadruples(x, y))


def test_a_dataset_whose_len_is_not_a_count_is_named(data):
    x, y = data
    for length, python_says in ((-3, r"__len__\(\) should return >= 0"),
                                (44.0, "'float' object cannot be interpreted as an integer")):
        class Odd(MapDataset):
            def __len__(self, length=length):
                return length

        with pytest.raises(InputError, match=rf"len\(x_val\) must be its number of samples, an "
                                             rf"int >= 1: {python_says}$"):  # (was Python's own)
            make().fit(x, y, validation_data=Odd(x, y), verbose=0)
    with pytest.raises(InputError, match=r"x is an empty dataset \(len\(\) is 0\)"):
        make().fit(MapDataset(x[:0], y[:0]), verbose=0)


def test_an_index_below_len_that_a_dataset_refuses_is_named(data):
    x, y = data

    class Overcounted(MapDataset):  # len() says 50, the arrays hold 44
        def __len__(self):
            return 50

    with pytest.raises(InputError, match=r"x\[4\d\] raised IndexError\('index 4\d is out of bounds "
                                         r".*'\), but len\(x\) is 50: a dataset must return a "
                                         r"sample for every index in range\(len\(x\)\)"):
        make().fit(Overcounted(x, y), batch_size=BATCH, shuffle=False, verbose=0)
    assert prefetch_threads() == []


def test_predict_reads_a_list_of_samples_as_a_batch_not_as_a_pair(data):
    x, y = data
    model = trained(x, y)
    expected = model.predict(x, batch_size=BATCH)
    # a generator of lists of images, a dataset of images as nested lists (their first image or
    # first row was taken for x: a shape error)
    batches = (list(x[a:a + BATCH]) for a in range(0, N, BATCH))
    assert np.array_equal(model.predict(batches, steps=6), expected)

    class NestedLists(MapDataset):
        def __getitem__(self, i):
            return self.x[i].tolist()

    assert np.array_equal(model.predict(NestedLists(x, y), batch_size=BATCH), expected)
    pairs = ((x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH))
    assert np.array_equal(model.predict(pairs, steps=6), expected)  # (a pair's y is ignored)
    # for a built model, a list of one sample (the last batch here) is a batch of it, not
    # (x,), x that sample (a list of one batch is (x,): test_data_sources.py)
    batches = (list(x[:41][a:a + BATCH]) for a in range(0, 41, BATCH))  # (the last: [x[40]])
    assert np.array_equal(model.predict(batches), expected[:41])


def test_a_checkpoint_needs_replayable_data_and_says_so_for_every_iterable(data, tmp_path):
    x, y = data
    refused = r"BackupAndRestore needs data whose batches can be replayed: arrays or a " \
              r"map-style dataset, not a generator or another iterable of batches \(a " \
              r"DataLoader: its batches are its own to order\)$"
    path = tmp_path / "ckpt.npz"
    for batches in (shuffled_batches(x, y), Loader(list(shuffled_batches(x, y, 1)))):
        model = make()
        with pytest.raises(InputError, match=refused):  # (a DataLoader was 'not a generator')
            model.fit(batches, steps_per_epoch=6, verbose=0, checkpoint=path, resume=True)
        assert model.optimizer.iterations == 0 and not path.exists()
    assert prefetch_threads() == []


def test_a_generator_may_refill_the_arrays_it_yielded(data):
    x, y = data

    def refilled(one_hot):  # one buffer, refilled for each batch, as a plain loop allows
        xb, yb = np.empty((BATCH, *x.shape[1:]), x.dtype), np.empty((BATCH, 4) if one_hot
                                                                     else BATCH)
        for xs, ys in shuffled_batches(x, y):
            n = len(xs)  # (the last batch is short)
            xb[:n], yb[:n] = xs, np.eye(4)[ys] if one_hot else ys
            yield xb[:n], yb[:n]

    # (the batches waiting in the queue were refilled under it: other weights, other outputs)
    expected = trained(x, y)
    for one_hot in (False, True):
        assert_same_weights(trained(refilled(one_hot), steps_per_epoch=6, shuffle=False),
                            expected)
    probabilities = expected.predict(refilled(False), steps=6)
    order = np.random.default_rng([SEED, 0]).permutation(N)
    np.testing.assert_array_equal(probabilities, expected.predict(x[order], batch_size=BATCH))


def test_device_work_on_the_arrays_a_call_is_given_runs_on_the_models_device(data, monkeypatch):
    """The range check of device images (on the caller's thread, before any compute
    scope) and the stacking of a dataset's device samples (on the prefetch thread) run with
    the model's device made the current one (``Backend.on_device``): CuPy launches on the
    current GPU, GPU 0 in a thread that chose none, and reads arrays on "cuda:1" from there
    only through peer access. Here on array_api_strict's second device, the scope recorded."""
    x, y = data
    local = threading.local()

    @contextlib.contextmanager
    def on_device(backend):
        local.inside = getattr(local, "inside", 0) + 1
        try:
            yield
        finally:
            local.inside -= 1

    calls = []

    def recorded(name, function):
        def call(*args, **kwargs):
            calls.append((name, getattr(local, "inside", 0)))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(xpcnn.backend.Backend, "on_device", on_device)
    for name in ("max", "stack"):
        monkeypatch.setattr(xps, name, recorded(name, getattr(xps, name)))
    model = make((xps, xps.Device("device1")))
    images = xps.asarray(x.astype(np.float32), device=xps.Device("device1"))
    xpcnn.data.arrays.check_device_images(images, model.backend)
    assert calls == [("max", 1)]
    samples = [(images[i, ...], int(y[i])) for i in range(N)]
    calls.clear()
    model.fit(SampleList(samples), epochs=1, batch_size=BATCH, verbose=0)
    stacks = [inside for name, inside in calls if name == "stack"]
    assert len(stacks) >= -(-N // BATCH) and all(stacks)


def test_the_prefetch_thread_works_on_the_callers_stream(data, monkeypatch):
    """A streamed batch of device arrays, stacked from a dataset's samples or yielded by a
    generator (perhaps adopted from another library), is made on the prefetch thread. The
    loop reads it on its own thread, whose stream another thread's default stream need not
    precede (a non-blocking stream, CuPy's per-thread default), and CuPy's pool gives freed
    memory back per stream. So the prefetch thread works inside the scope of the caller's
    device and stream (``Backend.current_stream_scope``, taken on the caller's thread): here
    the scope is recorded, and every stack and adoption on that thread runs inside it (the
    first batch is also checked on the caller's thread, to build the model)."""
    x, y = data
    local = threading.local()
    made, entered, calls = [], [], []

    def current_stream_scope(backend):
        made.append(threading.current_thread().name)

        @contextlib.contextmanager
        def scope():
            entered.append(threading.current_thread().name)
            local.inside = True
            try:
                yield
            finally:
                local.inside = False
        return scope()

    def recorded(name, function):
        def call(*args, **kwargs):
            calls.append((name, threading.current_thread().name,
                          getattr(local, "inside", False)))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(xpcnn.backend.Backend, "current_stream_scope", current_stream_scope)
    monkeypatch.setattr(xps, "stack", recorded("stack", xps.stack))
    adopt = recorded("adopt", xpcnn.data.arrays.adopt_foreign)
    for module in (xpcnn.data.arrays, xpcnn.data.sources):  # (each calls its own import)
        monkeypatch.setattr(module, "adopt_foreign", adopt)
    images = xps.asarray(x.astype(np.float32))
    batches = -(-N // BATCH)
    model = make(xps)
    model.fit(SampleList([(images[i, ...], int(y[i])) for i in range(N)]), epochs=1,
              batch_size=BATCH, verbose=0)
    model.fit(((images[i:min(i + BATCH, N), ...], y[i:i + BATCH]) for i in range(0, N, BATCH)),
              steps_per_epoch=batches, epochs=1, verbose=0)
    # (the caller's: this test's thread; the generator's first batch, drawn before fit's
    # callbacks run to see that it has one, on a thread of its own, in the scope too)
    assert made == [threading.current_thread().name] * 3
    assert entered == ["xpcnn-prefetch", "xpcnn-draw", "xpcnn-prefetch"]
    there = [(name, inside) for name, thread, inside in calls if thread == "xpcnn-prefetch"]
    assert {name for name, _ in there} == {"stack", "adopt"}
    assert all(inside for _, inside in there)


class SampleList:
    """A map-style dataset of (x_i, y_i) pairs, as users write them."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _reader_held_in_next(monkeypatch, release, message):
    """A built model; a generator whose third batch waits for ``release`` (a slow read, or one
    that never returns), then goes on; a callback raising ValueError(``message``) at the first
    batch of a predict, once the reader thread is inside that third next() (it is left there at
    once)."""
    from xpcnn.callbacks import LambdaCallback

    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)
    model = make()
    model.build((6, 6, 3))
    x = np.zeros((4, 6, 6, 3), np.uint8)
    inside = threading.Event()

    def batches():
        yield x
        yield x
        inside.set()
        release.wait(30)  # (released by the test, so that it leaves no thread behind)
        while True:
            yield x

    def stop(batch, logs):
        inside.wait(30)  # (bounds a failure only)
        raise ValueError(message)

    return model, batches(), LambdaCallback(on_predict_batch_end=stop)


def test_a_retry_on_a_generator_waits_for_the_reader_a_stopped_call_left(monkeypatch):
    """A call stopped while its reader thread was inside the generator's next() left the
    thread there; the next call on that generator waits for it (was: a bare "generator
    already executing" from xpcnn's thread), or, where it does not return in time, is refused
    by name."""
    release = threading.Event()
    model, source, stop = _reader_held_in_next(monkeypatch, release, "stopped")
    try:
        with pytest.raises(ValueError, match="stopped"):
            model.predict(source, steps=5, callbacks=[stop])
        with pytest.raises(InputError, match="still inside next"):
            model.predict(source, steps=2)
    finally:
        release.set()
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 30.0)
    assert model.predict(source, steps=2).shape[0] == 8  # (waits for the reader to leave)


def test_the_batch_a_left_reader_draws_is_given_back_after_those_drawn_before_it(data,
                                                                                 monkeypatch):
    """A call stopped while its reader was inside the generator's next(): the batch queued
    and the one that next() returns after the call ended are both given back, in order."""
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 0.0)  # (left at once)
    x, _ = data
    model = make()
    model.build((6, 6, 3))
    release, inside = threading.Event(), threading.Event()

    def batches():
        yield x[0:4]
        yield x[4:8]
        inside.set()
        release.wait(30)  # (the reader is here when the call stops)
        for k in itertools.count(2):
            yield x[4 * k:4 * k + 4]

    def stop(batch, logs):
        inside.wait(30)  # (bounds a failure only)
        raise ValueError("stopped")

    source = batches()
    try:
        with pytest.raises(ValueError, match="stopped"):
            model.predict(source, steps=5, batch_size=4,
                          callbacks=[LambdaCallback(on_predict_batch_end=stop)])
    finally:
        release.set()
    monkeypatch.setattr(xpcnn.data.background, "STOP_WAIT_SECONDS", 30.0)  # (waits for it)
    np.testing.assert_array_equal(model.predict(source, steps=3, batch_size=4),
                                  model.predict(x[4:16], batch_size=4))


def test_an_error_is_not_held_up_by_a_generator_blocked_in_next(monkeypatch):
    """A callback's error while the prefetch thread waits inside the caller's generator (a
    socket read that never returns): raised at once, the thread left to end with the
    generator (was: held until the generator moved, forever for a read that never returns)."""
    import time

    never = threading.Event()
    model, blocked, refuse = _reader_held_in_next(monkeypatch, never, "refused")
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="refused"):
            model.predict(blocked, steps=3, callbacks=[refuse])
        assert time.monotonic() - start < 10
    finally:
        never.set()


# -- batches held by a source: none lost (review of 38bcc02) -----------------------------------


def _recording():
    """A small model whose training steps record each batch's number (its first value), and
    the list they go to."""
    model = xpcnn.Sequential([Flatten(), Dense(3)], seed=0)
    model.compile(loss="cross_entropy", optimizer="sgd")
    steps = []
    step = model.train_step

    def recorded(xb, yb, sample_weight=None):
        steps.append(int(np.asarray(xb)[0, 0, 0, 0]))
        return step(xb, yb)

    model.train_step = recorded
    return model, steps


def _counting(n=100):
    """Batch i holds the value i."""
    for i in range(n):
        yield np.full((2, 4, 4, 1), float(i), np.float32), np.array([0, 1])


class _Raises(xpcnn.callbacks.Callback):
    def __init__(self, hook, error=KeyboardInterrupt):
        self.error = error
        setattr(self, hook, self._raise)

    def _raise(self, *args, **kwargs):
        raise self.error


def _stop_after(batch, flag="stop_training", hook="on_train_batch_end"):
    callback = xpcnn.callbacks.Callback()

    def end(b, logs=None):
        if b == batch:
            setattr(callback.model, flag, True)

    setattr(callback, hook, end)
    return callback


def test_batches_given_back_beyond_the_next_calls_steps_stay_given_back():
    """Batches given back to an iterator, more than the next call takes, wait for the call
    after it, in order (was: cut off with the steps, and lost: 0, 1, 2, 4, 5)."""
    model, steps = _recording()
    stream = _counting()
    model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stop_after(1)])
    assert steps == [0, 1]
    model.fit(stream, steps_per_epoch=1, epochs=3, verbose=0)
    assert steps == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(model.predict(stream, steps=2)[:, 0] * 0,
                                  np.zeros(4))  # (goes on: 5, 6)
    model.fit(stream, steps_per_epoch=1, verbose=0)
    assert steps[-1] == 7


@pytest.mark.parametrize("built", [False, True])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_batches_held_when_an_epoch_never_begins_are_given_back(built, error):
    """A fit interrupted (or failing) in on_epoch_begin, before its epoch drew anything: the
    batch drawn to build the model (``built`` False), or those given back by an epoch stopped
    early before (True), go to the next call (were: lost)."""
    model, steps = _recording()
    stream = _counting()
    if built:
        model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stop_after(1)])
        steps.clear()
    with pytest.raises(error):
        model.fit(stream, steps_per_epoch=3, verbose=0,
                  callbacks=[_Raises("on_epoch_begin", error)])
    assert steps == []
    model.fit(stream, steps_per_epoch=3, verbose=0)
    assert steps == ([2, 3, 4] if built else [0, 1, 2])


def test_a_validation_sources_batches_are_given_back_where_fit_is_refused_or_ends_first():
    """Batches given back to a generator (an evaluate stopped early), then taken by a fit's
    validation source: given back where that fit is refused (was: lost), or where it ends
    before validating (validation_freq beyond its epochs)."""
    model, steps = _recording()
    model.build((4, 4, 1))
    x, y = np.zeros((4, 4, 4, 1), np.float32), np.array([0, 1, 2, 0])
    stream = _counting()
    model.evaluate(stream, steps=10,
                   callbacks=[_stop_after(0, "stop_evaluating", "on_test_batch_end")])
    with pytest.raises(ValueError, match="refused"):
        model.fit(x, y, validation_data=stream, validation_steps=2, verbose=0,
                  callbacks=[_Raises("on_train_begin", ValueError("refused"))])
    model.fit(x, y, batch_size=1, validation_data=stream, validation_steps=2, verbose=0,
              validation_freq=2)  # (one epoch: never validated)
    steps.clear()
    model.fit(stream, steps_per_epoch=3, verbose=0)
    assert steps == [1, 2, 3]


def test_batches_given_back_to_two_iterators_are_kept_for_each():
    """An evaluate on a second generator that stops early keeps what a stopped fit gave back
    to the first (was: one slot for all iterators, the first's batches dropped)."""
    model, steps = _recording()
    train, val = _counting(), _counting()
    model.fit(train, steps_per_epoch=10, verbose=0, callbacks=[_stop_after(1)])
    model.evaluate(val, steps=10,
                   callbacks=[_stop_after(0, "stop_evaluating", "on_test_batch_end")])
    steps.clear()
    model.fit(train, steps_per_epoch=3, verbose=0)
    assert steps == [2, 3, 4]
    model.fit(val, steps_per_epoch=2, verbose=0)
    assert steps[-2:] == [1, 2]
    assert not xpcnn.data.streams.stream_of(train).pending  # (val's drawn ahead wait, in order)


def test_an_iterator_that_runs_out_as_an_epoch_ends_ends_fit_cleanly():
    """A training generator that runs out exactly at an epoch's end: a warning and a clean end
    (the History of the epochs trained, on_train_end), as Keras 3's "Your input ran out of
    data" (was: InputError "gave no batches in epoch 3", no History, no on_train_end). The
    empty epoch leaves no logs. One that gives nothing in its first epoch is refused."""
    ended = []
    ends = LambdaCallback(on_train_end=lambda logs: ended.append(logs))
    epochs = []
    ends.on_epoch_end = lambda epoch, logs: epochs.append(epoch)
    model, steps = _recording()
    with pytest.warns(RuntimeWarning, match=r"the training data ran out as epoch 2 ended \(no "
                                            r"batch in epoch 3, of its 5 \(steps_per_epoch\)\):"
                                            r" training stops after epoch 2"):
        history = model.fit(_counting(10), steps_per_epoch=5, epochs=4, verbose=0,
                            callbacks=[ends])
    assert history.epoch == [0, 1] and len(history.history["loss"]) == 2
    assert epochs == [0, 1] and len(ended) == 1 and set(ended[0]) >= {"loss"}
    assert steps == list(range(10))
    model.build((4, 4, 1))
    with pytest.raises(InputError, match="gave no batches in epoch 1"):
        model.fit(iter([]), steps_per_epoch=5, epochs=2, verbose=0)


def test_a_call_on_the_iterator_a_running_call_reads_is_refused():
    """predict or evaluate from a callback, on the generator that fit reads: refused by name
    (was: a bare "ValueError: generator already executing" from the background thread); once
    fit has returned, the generator goes on."""
    model, steps = _recording()
    stream = _counting()

    def peek(batch, logs=None):
        if batch == 1:
            model.predict(stream, steps=1)

    with pytest.raises(InputError, match=r"x is the iterator that a running fit, evaluate or "
                                         r"predict reads now .*pass this call another "
                                         "iterator"):
        model.fit(stream, steps_per_epoch=4, verbose=0,
                  callbacks=[LambdaCallback(on_train_batch_end=peek)])
    assert not any(s.reading for s in xpcnn.data.streams._STREAMS.values())
    assert prefetch_threads() == []
    model.fit(stream, steps_per_epoch=2, verbose=0)  # (the batches drawn ahead, in order)
    assert steps == [0, 1, 2, 3]


def test_batches_given_back_to_iterators_without_weak_references_are_kept_for_each():
    """Iterators that take no weak reference (iter(list), zip, map): each keeps the batches
    given back to it (was: one slot for them all, the first one's dropped when the second
    had batches given back); one the caller drops is not kept alive with its batches."""
    import gc

    model, steps = _recording()
    first = iter(list(_counting(10)))
    pairs = [(x + 100, y) for x, y in _counting(10)]
    second = zip([x for x, _ in pairs], [y for _, y in pairs], strict=True)
    for stream in (first, second):
        with pytest.raises(RuntimeError):
            model.fit(stream, steps_per_epoch=5, verbose=0,
                      callbacks=[_Raises("on_train_batch_end", RuntimeError)])
    assert steps == [0, 100]
    model.fit(first, steps_per_epoch=9, verbose=0)
    model.fit(second, steps_per_epoch=9, verbose=0)
    assert steps == [0, 100, *range(1, 10), *range(101, 110)]
    held = len(xpcnn.data.streams._HELD_STREAMS)  # (read to their ends: none kept)
    third = map(tuple, _counting(10))
    with pytest.raises(RuntimeError):
        model.fit(third, steps_per_epoch=5, verbose=0,
                  callbacks=[_Raises("on_train_batch_end", RuntimeError)])
    assert len(xpcnn.data.streams._HELD_STREAMS) == held + 1
    del third
    gc.collect()  # (a refused call's traceback holds its iterator in a cycle)
    model.predict(iter([np.zeros((2, 4, 4, 1), np.float32)]))  # (another held one: pruned)
    assert len(xpcnn.data.streams._HELD_STREAMS) == held


def test_model_history_does_not_keep_the_iterator_fit_read():
    """After fit, the callbacks' params (model.history.params) hold neither the batch source
    nor the callbacks (as Keras' History.params holds no data): a generator the caller drops
    goes, with the batches given back to it (was: kept alive by model.history)."""
    import gc
    import weakref

    model, steps = _recording()
    stream = _counting()
    gone = weakref.ref(stream)
    model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stop_after(1)])
    assert "data" not in model.history.params and "stateful" not in model.history.params
    assert model.history.params["steps"] == 10
    del stream
    gc.collect()
    assert gone() is None


@on_the_main_thread
def test_a_second_ctrl_c_while_fit_waits_for_its_reader_loses_nothing():
    """A second Ctrl-C while fit, stopped by a first, waits for its reader thread to leave a
    slow generator's next(): the reader stays recorded and the batches drawn ahead given
    back (were: neither; the next call on the generator failed with a bare "ValueError:
    generator already executing", the batches lost). The next call waits for the reader and
    goes on in order."""
    import os
    import signal

    release = threading.Event()

    def slow():
        for i in itertools.count():
            if i == 2:
                release.wait(30)  # (a read from disk or network)
            yield np.full((2, 4, 4, 1), float(i), np.float32), np.array([0, 1])

    def twice(batch, logs=None):  # (the user presses Ctrl-C, then again as fit seems stuck)
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        raise KeyboardInterrupt

    model, steps = _recording()
    stream = slow()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(stream, steps_per_epoch=50, verbose=0,
                      callbacks=[LambdaCallback(on_train_batch_end=twice)])
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    assert steps == [0]
    model.fit(stream, steps_per_epoch=3, verbose=0)
    assert steps == [0, 1, 2, 3]


def test_an_epoch_an_iterator_has_no_batch_for_is_not_begun():
    """A generator that runs out exactly as an epoch ends: fit ends there without beginning
    the next epoch (was: on_epoch_begin of an epoch that never ended, a schedule's rate set
    for it, its progress bar left open), as Keras 3 calls on_epoch_end after every
    on_epoch_begin."""
    events = []
    log = LambdaCallback(on_epoch_begin=lambda epoch, logs: events.append(f"begin {epoch}"),
                         on_epoch_end=lambda epoch, logs: events.append(f"end {epoch}"))
    schedule = xpcnn.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 * (epoch + 1))
    model, steps = _recording()
    with pytest.warns(RuntimeWarning, match="ran out as epoch 2 ended"):
        history = model.fit(_counting(4), steps_per_epoch=2, epochs=3, verbose=0,
                            callbacks=[log, schedule])
    assert events == ["begin 0", "end 0", "begin 1", "end 1"] and history.epoch == [0, 1]
    assert model.optimizer.lr == pytest.approx(0.2) and steps == [0, 1, 2, 3]


# -- the iterators' registry (review of bae96a8) ------------------------------------------------


@on_the_main_thread
@pytest.mark.parametrize("built", [True, False])
def test_a_ctrl_c_while_fit_draws_a_first_batch_leaves_the_generator_going(built):
    """A Ctrl-C while fit draws the next epoch's first batch (or, on an unbuilt model, the
    batch that builds it) from a slow generator: the draw runs on a thread of its own, so the
    KeyboardInterrupt reaches fit, not the generator; the next fit waits for that thread and
    goes on with its batch (was: raised inside the generator's frame, which it finished: every
    later batch lost, the next fit refused, "gave no batches")."""
    import os
    import signal

    release = threading.Event()
    slow_at = 2 if built else 0

    def slow():
        for i in itertools.count():
            if i == slow_at:  # (the user presses Ctrl-C during a slow read)
                os.kill(os.getpid(), signal.SIGINT)
                release.wait(30)
            yield np.full((2, 4, 4, 1), float(i), np.float32), np.array([0, 1])

    model, steps = _recording()
    if built:
        model.build((4, 4, 1))
    stream = slow()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(stream, steps_per_epoch=2, epochs=3, verbose=0)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    assert steps == ([0, 1] if built else [])
    assert stream.gi_frame is not None  # (not finished)
    model.fit(stream, steps_per_epoch=2, verbose=0)
    assert steps == ([0, 1, 2, 3] if built else [0, 1])


def test_a_dropped_map_iterator_goes_as_the_next_call_ends():
    """A map or zip iterator (no weak reference: held by the registry) left with batches by
    an epoch stopped early, then dropped by its caller, goes as the next fit, evaluate or
    predict of any kind ends, with what it wraps (a DataLoader's workers) (was: kept alive
    until another such iterator was used); a refused call leaves no empty entry."""
    import gc
    import weakref

    model, steps = _recording()
    inner = _counting()
    gone = weakref.ref(inner)
    stream = map(tuple, inner)
    del inner
    model.fit(stream, steps_per_epoch=10, verbose=0, callbacks=[_stop_after(0)])
    assert steps == [0] and xpcnn.data.streams.stream_of(stream).pending
    del stream
    gc.collect()
    model.fit(np.zeros((4, 4, 4, 1), np.float32), np.zeros(4, int), verbose=0)
    gc.collect()
    assert gone() is None
    held = len(xpcnn.data.streams._HELD_STREAMS)
    kept = map(tuple, _counting())
    with pytest.raises(InputError, match="x_val"):  # (refused after the source was made)
        model.fit(kept, steps_per_epoch=2, verbose=0,
                  validation_data=(np.zeros((2, 5, 5, 1), np.float32), np.zeros(2, int)))
    assert len(xpcnn.data.streams._HELD_STREAMS) == held
    model.fit(kept, steps_per_epoch=2, verbose=0)
    assert steps == [0, 0, 0, 1]  # (the arrays' step, then kept's)


def _stopped_before_an_error_drawn_ahead() -> tuple[Any, Iterator[Any], list[int]]:
    """A built model whose fit on a generator stopped after its first batch, while the reader
    had drawn the two batches after it and then the generator's error (kept for the next call
    on the generator): (model, the generator, the steps trained)."""
    raised = threading.Event()

    def failing():
        for i in range(3):
            yield np.full((2, 4, 4, 1), float(i), np.float32), np.array([0, 1])
        raised.set()
        raise OSError("shard-0004.npz: No such file or directory")

    def stop_first(batch, logs):
        assert raised.wait(30)  # (the reader drew ahead: batches 1 and 2, then the error)
        model.stop_training = True

    model, steps = _recording()
    model.build((4, 4, 1))
    stream = failing()
    model.fit(stream, steps_per_epoch=10, verbose=0,
              callbacks=[LambdaCallback(on_train_batch_end=stop_first)])
    return model, stream, steps


def test_an_error_the_reader_drew_ahead_of_an_early_stop_is_raised_by_the_next_call():
    """An error the generator raised while the reader drew ahead of an epoch that then stopped
    early: kept after the batches given back, and raised, the same error with a note, by the
    next call on the generator once it has used them (was: dropped; the generator, finished by
    it, looked like data that ran out, and the next call returned part of it silently).
    Raised once: the call after that finds the generator ended."""
    model, stream, steps = _stopped_before_an_error_drawn_ahead()
    assert steps == [0]
    with pytest.raises(OSError, match="shard-0004") as info:
        model.fit(stream, steps_per_epoch=10, verbose=0)
    assert steps == [0, 1, 2]
    assert any("read ahead" in note for note in info.value.__notes__)
    assert xpcnn.data.streams.stream_of(stream).failure is None
    with pytest.raises(InputError, match="gave no batches"):
        model.predict(stream, verbose=0)


def test_an_error_kept_for_the_next_call_does_not_keep_a_dropped_generator_alive():
    """The kept error's traceback held the generator's frames: a generator the caller dropped
    (a DataLoader's iterator, with its workers) stayed alive for good. Kept without them (the
    traceback in a note), the generator goes."""
    import gc
    import weakref

    _, stream, _ = _stopped_before_an_error_drawn_ahead()
    kept = xpcnn.data.streams.stream_of(stream).failure
    assert isinstance(kept, OSError) and kept.__traceback__ is None
    assert any("raised at:" in note and "failing" in note for note in kept.__notes__)
    gone = weakref.ref(stream)
    del stream, kept
    gc.collect()
    assert gone() is None


def test_a_first_batch_refused_while_building_the_model_is_dropped():
    """A generator's first batch that the checks refuse as it builds the model is dropped,
    as a built model's epoch drops it: the next call goes on with the batch after it (was:
    kept, and every later call refused by it again)."""
    def labelled():
        yield np.zeros((2, 4, 4, 1), np.float32), np.array([0.5, 1.0])  # (not whole numbers)
        for i in range(1, 100):
            yield np.full((2, 4, 4, 1), float(i), np.float32), np.array([0, 1])

    model, steps = _recording()
    stream = labelled()
    with pytest.raises(InputError, match="y must be integer class labels"):
        model.fit(stream, steps_per_epoch=2, verbose=0)
    assert not model.built
    model.fit(stream, steps_per_epoch=2, verbose=0)
    assert steps == [1, 2]


def test_an_iterator_with_no_batch_for_the_first_epoch_is_refused_before_any_callback():
    """A built model given an iterator that has no batch for fit's first epoch: refused before
    on_train_begin, the model's History and learning rate as they were (was: refused after
    on_train_begin and on_epoch_begin ran, a schedule's rate set, model.history emptied)."""
    model, steps = _recording()
    model.fit(np.zeros((4, 4, 4, 1), np.float32), np.zeros(4, int), epochs=2, verbose=0)
    before = model.history
    events = []
    log = LambdaCallback(on_train_begin=lambda logs: events.append("train_begin"),
                         on_epoch_begin=lambda epoch, logs: events.append("epoch_begin"))
    schedule = xpcnn.callbacks.LearningRateScheduler(lambda epoch, lr: 0.5)
    with pytest.raises(InputError, match="gave no batches in epoch 1"):
        model.fit(_counting(0), steps_per_epoch=2, verbose=0, callbacks=[log, schedule])
    assert events == [] and model.history is before and len(before.history["loss"]) == 2
    assert model.optimizer.lr_factor == 1.0


def test_owned_takes_numbers_as_they_are_without_a_namespace_lookup(monkeypatch):
    """A dataset's NumPy scalar labels skip is_device_array (whose namespace lookup was most
    of a map-style dataset's per-sample background work)."""
    def no_lookup(x):
        raise AssertionError("is_device_array called")

    monkeypatch.setattr(xpcnn.data.arrays, "is_device_array", no_lookup)
    backend = make().backend
    for label in (np.int64(3), np.float32(0.5), 3, 0.5, True):
        assert xpcnn.data.arrays.owned(label, backend) is label
    a = np.arange(3)
    assert xpcnn.data.arrays.owned(a, backend) is not a


def test_device_arrays_are_checked_for_the_same_data_without_a_host_copy(data, monkeypatch):
    """On several ranks, the check of the same data on every rank sums each sample on the
    device for arrays that live there (was: the whole arrays copied to the host at every
    fit); other samples give another mark, the same ones the same."""
    x, y = data
    device = (xps, xps.Device("device1"))
    model = xpcnn.Sequential(gap_net(classes=4), seed=0, device=device)
    backend = model.backend
    put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731
    read = []
    to_numpy = type(backend).to_numpy
    monkeypatch.setattr(type(backend), "to_numpy",
                        lambda self, a: read.append(tuple(a.shape)) or to_numpy(self, a))

    def mark(images):
        return xpcnn.data.sources.ArrayBatches(backend, put(images), y[:len(images)], 4,
                                       shard=(0, 2)).same_data_mark()

    whole = mark(x)
    assert read and all(shape == (N,) for shape in read)  # (each sample's sum, not x)
    assert mark(x) == whole and mark(x[::-1].copy()) != whole
    assert mark(x[:22]) != mark(np.ascontiguousarray(x[22:]))
    assert mark(x)["x_sums_crc32"] != mark(x + np.uint8(1))["x_sums_crc32"]


def test_subset_shards_of_one_dataset_have_other_marks_and_fingerprints_stay(data):
    """Per-rank Subsets (random_split) of one dataset, of equal lengths: their marks differ by
    the indices (at every level), their fingerprints, which checkpoints store, do not."""
    x, y = data
    torch_data = pytest.importorskip("torch.utils.data")
    whole = MapDataset(x, y)
    model = make()
    halves = [torch_data.Subset(whole, list(range(r, N, 2))) for r in (0, 1)]

    def source(ds):
        return xpcnn.data.sources.DatasetBatches(model, ds, 4, shard=(0, 2))

    a, b = source(halves[0]), source(halves[1])
    assert a.fingerprint() == b.fingerprint()
    assert a.same_data_mark() != b.same_data_mark()
    assert source(halves[0]).same_data_mark() == a.same_data_mark()
    nested = [torch_data.Subset(torch_data.Subset(whole, list(range(N))[::-1]), list(range(22)))
              for _ in range(2)]
    plain = torch_data.Subset(whole, list(range(22)))
    assert source(nested[0]).same_data_mark() == source(nested[1]).same_data_mark()
    assert source(nested[0]).same_data_mark() != source(plain).same_data_mark()
    assert xpcnn.data.sources.subset_indices_crc32(whole) is None


def test_predict_prunes_dropped_held_iterators_as_fit_and_evaluate_do():
    """predict, like fit and evaluate, drops as it ends the stream of a held iterator (a map,
    no weak reference) that its caller dropped: the training split left the pruning on
    test_on_batch instead, and predict on arrays kept the dropped iterator's batches."""
    import gc

    model, _ = _recording()
    dropped = map(tuple, _counting(10))
    with pytest.raises(RuntimeError):
        model.fit(dropped, steps_per_epoch=5, verbose=0,
                  callbacks=[_Raises("on_train_batch_end", RuntimeError)])
    held = len(xpcnn.data.streams._HELD_STREAMS)
    del dropped
    gc.collect()  # (a refused call's traceback holds its iterator in a cycle)
    model.predict(np.zeros((2, 4, 4, 1), np.float32))  # (arrays: no stream looked up)
    assert len(xpcnn.data.streams._HELD_STREAMS) == held - 1


def test_the_data_package_stands_below_saving_and_its_docstring_lists_its_modules():
    """sources.py imported xpcnn.saving.checkpoint for its fingerprint alone (so data sat above
    saving, and totals could not name data's Replay); the package's docstring left replay out
    of its modules "each importing only those above it"; ByIdentity, a registry, lived in the
    background thread's module. (The package as imported, so that an older copy is checked.)"""
    import importlib
    import re
    from pathlib import Path

    from test_imports import import_graph, reachable

    package = Path(xpcnn.__file__).resolve().parent
    graph = import_graph(package)
    data = sorted(m for m in graph if m.startswith("xpcnn.data."))
    for module in data:
        assert not [m for m in reachable(graph, module) if m.startswith("xpcnn.saving")], module
    listed = re.findall(r"^\* :mod:`~(xpcnn\.data\.\w+)`", xpcnn.data.__doc__, re.M)
    assert sorted(listed) == data
    for i, module in enumerate(listed):  # (each importing only those above it)
        assert graph[module] & set(data) <= set(listed[:i]), module
    registry = importlib.import_module("xpcnn.data.registry")
    assert registry.ByIdentity.__module__ == "xpcnn.data.registry"
    assert xpcnn.data.sources.fingerprint.__module__ == "xpcnn.data.sources"


def test_the_fingerprint_and_the_same_data_mark_keep_every_key_and_value():
    """A checkpoint stores the fingerprint of its arrays (a resume compares it) and the ranks
    hash the mark of theirs: both are what they were, key for key, however the code that
    builds them is shared."""
    import zlib

    x = np.arange(3 * 2 * 2 * 1, dtype=np.uint8).reshape(3, 2, 2, 1)
    y, w = np.array([0, 1, 1]), np.array([1.0, 0.5, 2.0], np.float32)
    crc = lambda a: zlib.crc32(np.ascontiguousarray(a).data)  # noqa: E731
    shared = {"samples": 3, "sample_shape": [2, 2, 1], "x_dtype": "uint8"}
    order = {"batch_size": 2, "seed": 7, "shuffle": True}
    got = xpcnn.data.sources.fingerprint(x, y, 2, 7, True, 2, w)
    assert list(got) == [*shared, "x_crc32", "y_crc32", *order, "ranks", "sample_weight_crc32"]
    assert got == {**shared, "x_crc32": crc(x), "y_crc32": crc(y), **order, "ranks": 2,
                   "sample_weight_crc32": crc(w)}
    one = xpcnn.data.sources.fingerprint(x, y, 2, 7, True)  # (one rank, no weights)
    assert one == {**shared, "x_crc32": crc(x), "y_crc32": crc(y), **order}
    backend = make().backend
    host = xpcnn.data.sources.ArrayBatches(backend, x, y, 2, True, 7, (0, 2), w)
    assert host.fingerprint() == host.same_data_mark() == got
    device = (xps, xps.Device("device1"))
    backend = xpcnn.Sequential(gap_net(classes=4), seed=0, device=device).backend
    on_device = xps.asarray(x, device=xps.Device("device1"))
    sums = x.reshape(3, -1).astype(np.float64).sum(axis=1)
    for targets, weights in ((y, w), (None, None)):
        mark = xpcnn.data.sources.ArrayBatches(backend, on_device, targets, 2, True, 7, (0, 1),
                                               weights).same_data_mark()
        assert mark == {**shared, "x_dtype": str(on_device.dtype), "x_sums_crc32": crc(sums),
                        "y_crc32": None if targets is None else crc(y),
                        "w_crc32": None if weights is None else crc(w), **order, "ranks": 1}
