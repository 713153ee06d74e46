"""Batch sources as users write them: buffers refilled on the device, shuffling loaders,
PyTorch's IterableDataset, data beyond the model's dtype, and the errors of near misses."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import array_api_strict as xps
import numpy as np
import pytest
from nets import gap_net

import xpcnn
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import Conv2D, Dense, Flatten, ReLU, Rescaling

N, BATCH = 24, 8  # 3 steps an epoch


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, N)


def make(device="cpu", layers=None, **compile):
    model = xpcnn.Sequential(layers or gap_net(classes=4), seed=0, device=device)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2), **compile)
    return model


def assert_same_weights(a, b):
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def refilled(buffer_x, buffer_y, fill, x, y, epochs):
    """One pair of device buffers, refilled in place for each batch and yielded (a plain
    training loop may do it: each batch is used before the next is made)."""
    for _ in range(epochs):
        for a in range(0, N, BATCH):
            fill(buffer_x, x[a:a + BATCH])
            fill(buffer_y, y[a:a + BATCH])
            yield buffer_x, buffer_y


def strict_fill(buffer, values):
    buffer[...] = xps.asarray(values)


def torch_fill(buffer, values):
    import torch

    buffer.copy_(torch.from_numpy(values))


@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_a_generator_may_refill_device_arrays_it_yielded(data, library):
    """A batch read ahead is copied, on the device too: the queued batches were the refilled
    buffer, so every batch but the last of a prefetch window trained on the next one's data."""
    x, y = data
    if library == "torch":
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as device

        def buffers():
            return (torch.empty(x[:BATCH].shape, dtype=torch.uint8),
                    torch.empty(BATCH, dtype=torch.int64))
        fill = torch_fill
    else:
        device, fill = xps, strict_fill

        def buffers():
            return xps.zeros(x[:BATCH].shape, dtype=xps.uint8), xps.zeros(BATCH, dtype=xps.int64)

    def stream(epochs=2):
        return refilled(*buffers(), fill, x, y, epochs)

    expected = make(device)
    expected.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
                 validation_data=(x, y))
    model = make(device)
    history = model.fit(stream(), steps_per_epoch=3, epochs=2, verbose=0,
                        validation_data=stream(), validation_steps=3)
    assert_same_weights(model, expected)
    np.testing.assert_allclose(history.history["val_loss"], expected.history.history["val_loss"],
                               rtol=1e-6)
    np.testing.assert_array_equal(model.predict(stream(1), steps=3),
                                  model.predict(x, batch_size=BATCH))
    assert model.evaluate(stream(1), steps=3, verbose=0) == pytest.approx(
        model.evaluate(x, y, batch_size=BATCH, verbose=0), rel=1e-6)


class ShufflingLoader:
    """A re-iterable that shuffles each pass from a global random state, as a PyTorch
    DataLoader with shuffle=True does (torch's global RNG), counting its passes."""

    state = np.random.default_rng(0)

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        order = self.state.permutation(len(self.y))
        return ((self.x[order[a:a + BATCH]], self.y[order[a:a + BATCH]])
                for a in range(0, len(self.y), BATCH))


def test_building_from_a_reiterable_trains_on_the_pass_that_built_it(data):
    """The first batch, read to build the model, is the first epoch's: no pass drawn and
    thrown away (it drew from a shuffling DataLoader's random numbers and started its
    workers), so an unbuilt model trains as a built one does on the same draws."""
    x, y = data
    models = []
    for built in (False, True):
        ShufflingLoader.state = np.random.default_rng(7)
        loader = ShufflingLoader(x, y)
        model = make()
        if built:
            model.build(x.shape[1:])
        model.fit(loader, epochs=2, verbose=0)
        assert loader.passes == 2
        models.append(model)
    assert_same_weights(*models)


def test_an_unbuilt_model_trains_on_a_shuffling_dataloader_as_a_built_one(data):
    torch = pytest.importorskip("torch")
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)), batch_size=BATCH, shuffle=True)
    models = []
    for built in (False, True):
        torch.manual_seed(0)
        model = make()
        if built:
            model.build(x.shape[1:])
        model.fit(loader, epochs=2, verbose=0)
        models.append(model)
    assert_same_weights(*models)


def test_a_torch_iterable_dataset_with_a_len_is_an_iterable(data):
    """PyTorch lets an IterableDataset define __len__; it inherits Dataset's __getitem__,
    which raises NotImplementedError: it was read as a map-style dataset."""
    torch = pytest.importorskip("torch")
    x, y = data

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ((x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH))

        def __len__(self):
            return N // BATCH

    expected = make()
    expected.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    model = make()
    model.fit(Stream(), epochs=2, verbose=0)
    assert_same_weights(model, expected)
    np.testing.assert_array_equal(model.predict(Stream()), model.predict(x, batch_size=BATCH))


def test_telling_an_iterable_dataset_imports_no_torch():
    code = ("import sys, xpcnn.data.arrays\n"
            "class D:\n    def __len__(self): return 1\n    def __getitem__(self, i): return i\n"
            "assert xpcnn.data.arrays.is_map_dataset(D()) and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finite_data_beyond_the_models_dtype_is_refused_up_front(data):
    """1e39 is finite in float64 and infinite in float32: fit failed at its first step
    blaming layer 'rescaling', and predict and evaluate returned NaN."""
    x, y = data
    x = x.astype(np.float64)
    x[5, 1, 2, 0] = -1e39
    model = make()
    too_large = (r"x holds values too large for float32, the dtype the model computes in "
                 r"\(at most 3.4028e\+38\), where they would be infinite: sample 5, the first "
                 r"such sample, has 1 \(the first is -1e\+39 at \(1, 2, 0\)\)")
    for call in (lambda: model.fit(x, y, verbose=0), lambda: model.predict(x),
                 lambda: model.evaluate(x, y, verbose=0),
                 lambda: model.fit(iter([(x, y)]), steps_per_epoch=1, verbose=0)):
        with pytest.raises(NonFiniteError, match=too_large):
            call()
    device = make(xps)
    with pytest.raises(NonFiniteError, match=too_large):
        device.predict(xps.asarray(x))
    assert model.optimizer.iterations == device.optimizer.iterations == 0


def test_float32_data_beyond_float16_is_refused_where_the_first_layer_computes_in_it(data):
    """Under mixed_float16 a Conv2D reads the batch in float16 (65504 at most); a Rescaling
    first computes in float32, where the same data is fine."""
    x, y = data
    x = x.astype(np.float32)
    x[2, 0, 0, 1] = 1e5
    model = make(layers=[Conv2D(4, 3), ReLU(), Flatten(), Dense(4)], precision="mixed_float16")
    with pytest.raises(NonFiniteError, match=r"x holds values too large for float16, the dtype "
                                             r"the model computes in \(at most 65504\).*sample 2"):
        model.fit(x, y, verbose=0)
    rescaled = make(layers=[Rescaling(1e-5), Conv2D(4, 3), ReLU(), Flatten(), Dense(4)],
                    precision="mixed_float16")
    rescaled.fit(x, y, verbose=0)
    assert rescaled.optimizer.iterations == 1


def test_a_dataset_of_single_samples_shaped_as_batches_of_one_trains(data):
    """Samples (1, H, W, C) with labels (1,) are no batch to refuse (was, for a moment:
    "a batch of 1 samples")."""
    x, y = data

    class OneEach:
        def __len__(self):
            return N

        def __getitem__(self, i):
            return x[i:i + 1, :, :, :1], y[i:i + 1]

    model = xpcnn.Sequential([Flatten(), Dense(4)], seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    model.fit(OneEach(), epochs=1, batch_size=BATCH, verbose=0)
    assert model.optimizer.iterations == 3


class Reads:
    """A map-style dataset that records the indices it is asked for."""

    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def test_a_dataset_refused_by_its_first_batch_leaves_the_model_as_it_was(data):
    """Its labels were first checked inside epoch 1, after the callbacks began: the refused
    fit had set a schedule's rate, run on_train_begin and on_epoch_begin, and replaced the
    last fit's History (an iterator's or arrays' were refused before any of that)."""
    from xpcnn.callbacks import LambdaCallback, LearningRateScheduler

    x, y = data
    model = make()
    model.fit(x, y, epochs=2, batch_size=BATCH, verbose=0)
    history, rate, weights = dict(model.history.history), model.optimizer.lr, \
        model.get_weights()
    events = []
    hooks = [LearningRateScheduler(lambda epoch, lr: 0.5),
             LambdaCallback(on_train_begin=lambda logs: events.append("train"),
                            on_epoch_begin=lambda epoch, logs: events.append("epoch"))]
    with pytest.raises(InputError, match=r"labels in y must be in \[0, 3\]"):
        model.fit(Reads(x, y + 7), batch_size=BATCH, callbacks=hooks, verbose=0)
    assert events == [] and model.optimizer.lr == rate
    assert model.history.history == history
    for u, v in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(u, v)
    unbuilt = make()
    with pytest.raises(InputError, match=r"labels in y must be in \[0, 3\]"):
        unbuilt.fit(Reads(x, y + 7), batch_size=BATCH, verbose=0)
    assert not unbuilt.built
    unbuilt.fit(Reads(x, y), batch_size=BATCH, verbose=0)
    assert unbuilt.optimizer.iterations == 3


def test_a_dataset_of_whole_greyscale_batches_leaves_the_model_unbuilt(grey):
    """Batches (B, H, W) with labels (B,), a Keras Sequence's: read as samples of shape
    (B, H, W), their stacked labels refused, and the model stayed built for them (the right
    data was then refused); now named as whole batches. An image (H, W, C) with its one-hot
    row of H values is one sample still (its row in integers too, taken as
    one-hot)."""
    x, y = grey
    model = grey_model(built=False)
    with pytest.raises(InputError, match=r"^x\[0\] is a batch of 8 samples \(x of shape "
                                         r"\(8, 6, 6\)\), not one sample"):
        model.fit(BatchSequence(x, y), verbose=0)
    assert not model.built
    model.fit(x[..., None], y, batch_size=BATCH, verbose=0)
    assert model.input_shape == (None, 6, 6, 1)
    images, onehot = np.repeat(x[..., None], 2, axis=-1), np.eye(6, dtype=np.int64)[y]
    flat = xpcnn.Sequential([Flatten(), Dense(6)], seed=0)  # (K = 6 = H)
    flat.compile(optimizer=xpcnn.optim.Adam(1e-2))
    flat.fit(GreyDataset(images, onehot), batch_size=BATCH, verbose=0)  # (integer rows)
    assert flat.input_shape == (None, 6, 6, 2) and flat.optimizer.iterations == 3


@pytest.mark.parametrize("built", [True, False])
def test_a_datasets_first_batch_is_read_once_before_training(data, built):
    """The first batch, read and checked before the callbacks begin, is the first epoch's:
    each sample is read as often and in the same order as before (a dataset's own random
    transforms draw the same), and it trains as the arrays do."""
    x, y = data
    model, reference = make(), make()
    if built:
        model.build(x.shape[1:])
    dataset = Reads(x, y)
    model.fit(dataset, epochs=2, batch_size=BATCH, seed=3, verbose=0)
    reference.fit(x, y, epochs=2, batch_size=BATCH, seed=3, verbose=0)
    assert_same_weights(model, reference)
    orders = [np.random.default_rng([3, epoch]).permutation(N) for epoch in range(2)]
    assert dataset.read == [0] * (not built) + np.concatenate(orders).tolist()


def test_integer_images_beyond_float16_are_refused_where_it_reads_them(data):
    """uint16 images up to 65535 under mixed_float16 (was: not checked, NaN in predict); uint8
    images can never be; on the device as on the host."""
    x, y = data
    model = make(layers=[Conv2D(4, 3), ReLU(), Flatten(), Dense(4)], precision="mixed_float16")
    wide = x.astype(np.uint16)
    wide[3, 1, 1, 0] = 65535
    for images in (wide, xps.asarray(wide)):
        with pytest.raises(NonFiniteError, match=r"x holds values too large for float16, .* "
                                                 r"sample 3, .*the first is 65535"):
            xpcnn.data.arrays.check_arrays(model, images, None)
    model.fit(wide // 2, y, verbose=0)
    assert model.optimizer.iterations == 1


def test_data_narrower_than_the_model_is_checked_without_warnings(data):
    """float32 images for a float64 model: no "overflow encountered in cast" from comparing
    float32 data with float64's limit (an error under -W error)."""
    x, y = data
    model = xpcnn.Sequential(gap_net(classes=4), seed=0, dtype="float64")
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x.astype(np.float32), y, verbose=0)
        model.predict(x.astype(np.float16))


@pytest.mark.parametrize("labels", ["abc", 3])
def test_a_single_value_for_labels_is_not_called_zero_labels(data, labels):
    x, _ = data
    with pytest.raises(InputError, match=rf"y must be an array of labels, one for each of the "
                                         rf"{N} samples, got a single value \(shape \(\)"):
        make().fit(x, labels, verbose=0)


def test_nan_in_float_labels_is_named(data):
    x, y = data
    labels = y.astype(np.float64)
    labels[[4, 9]] = np.nan
    with pytest.raises(InputError, match=r"y must be integer class labels, got dtype float64 "
                                         r"holding NaN \(2 labels\): label 4 is nan"):
        make().fit(x, labels, verbose=0)


def test_dict_batches_are_named_as_dicts(data):
    x, y = data
    with pytest.raises(InputError, match=r"x must yield \(x, y\) or \(x, y, sample_weight\) "
                                         r"batches, got one whose x is a dict with keys "
                                         r"\['image'\]: an xpcnn model has one input"):
        make().fit(iter([({"image": x}, y)]), steps_per_epoch=1, verbose=0)
    with pytest.raises(InputError, match=r"batches, got a dict with keys \['image', 'label'\]"):
        make().fit(iter([{"image": x, "label": y}]), steps_per_epoch=1, verbose=0)


class BatchSequence:
    """A Keras Sequence or PyDataset: len() counts batches, [i] is a whole batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return N // BATCH

    def __getitem__(self, i):
        return self.x[i * BATCH:(i + 1) * BATCH], self.y[i * BATCH:(i + 1) * BATCH]


def test_a_dataset_of_whole_batches_is_named_with_the_way_to_pass_one(data):
    """It was read as a dataset of samples: the model was built for (8, 6, 6, 3) samples and
    the Conv2D refused them; a built model named a per-sample shape instead."""
    x, y = data
    batches = BatchSequence(x, y)
    hint = (r"x\[0\] is a batch of 8 samples \(x of shape \(8, 6, 6, 3\)\), not one sample: "
            r"xpcnn reads a map-style dataset \(len\(\) and \[i\]\) one sample an index")
    with pytest.raises(InputError, match=hint):
        make().fit(batches, verbose=0)
    built = make()
    built.build(x.shape[1:])
    with pytest.raises(InputError, match=hint):
        built.predict(batches)
    # (what the error says to pass instead)
    model = make()
    model.fit((batches[i % len(batches)] for i in itertools.count()),
              steps_per_epoch=len(batches), epochs=2, verbose=0)
    expected = make()
    expected.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    assert_same_weights(model, expected)


class PyDataset(BatchSequence):
    """Keras 3's keras.utils.PyDataset as xpcnn tells it, by its name and library (Keras is
    not needed): a subclass's len() counts batches, [i] is a whole batch. Records the calls."""

    def __init__(self, x, y=None, batch=BATCH):
        super().__init__(x, y)
        self.batch, self.calls = batch, []

    def __len__(self):
        return -(-len(self.x) // self.batch)

    def __getitem__(self, i):
        self.calls.append(i)
        part = slice(i * self.batch, (i + 1) * self.batch)
        if self.y is None:
            return self.x[part]
        return self.x[part], self.y[part]

    def on_epoch_begin(self):
        self.calls.append("begin")
        if hasattr(self, "kept"):
            self.x[...] = self.kept

    def on_epoch_end(self):
        # (the images changed in place until the next epoch begins: the pass's batches, its
        # last one too, must have been copied when they were read)
        self.calls.append("end")
        self.kept = self.x.copy()
        self.x[...] = 0


PyDataset.__module__ = "keras.src.trainers.data_adapters.py_dataset_adapter"


@pytest.mark.parametrize("batch", [BATCH, 1, N])
def test_a_keras_pydataset_is_read_as_batches_with_its_epoch_hooks(data, batch):
    """A Keras PyDataset (len() counts batches) was read as a dataset of samples: refused, and
    one of batches of 1 built the model for samples (1, H, W, C), silently. Read as Keras 3
    reads it: its batches in order (shuffle=False), trained on as the arrays, each epoch
    between its on_epoch_begin and on_epoch_end (after the pass's last batch was read: an
    in-place change there changes no batch)."""
    x, y = data
    model, expected = make(), make()
    dataset = PyDataset(x.copy(), y, batch)
    history = model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    reference = expected.fit(x, y, epochs=2, batch_size=batch, shuffle=False, verbose=0)
    assert model.input_shape == (None, *x.shape[1:])
    assert_same_weights(model, expected)
    assert history.history["loss"] == reference.history["loss"]
    passes = ["begin", *range(len(dataset)), "end"]
    assert dataset.calls == passes * 2


def test_a_keras_pydatasets_batch_order_is_shuffled_by_fits_seed(data):
    """fit's shuffle shuffles the batches' order each epoch (as Keras 3's PyDatasetAdapter;
    here by fit's seed: two fits of one seed read alike, another seed otherwise);
    steps_per_epoch fewer than its batches cuts each epoch, on_epoch_end still run; steps
    beyond them end the epoch short, as a DataLoader's; evaluate and predict read it in
    order; y beside it is refused."""
    x, y = data
    x, y = np.concatenate([x] * 3), np.concatenate([y] * 3)  # (9 batches)
    orders = []
    for seed in (0, 0, 1):
        dataset = PyDataset(x.copy(), y)
        make().fit(dataset, epochs=2, seed=seed, verbose=0)
        orders.append(dataset.calls)
    assert orders[0] == orders[1] != orders[2]
    first, second = orders[0][1:10], orders[0][12:21]
    assert sorted(first) == sorted(second) == list(range(9)) and first != second
    dataset = PyDataset(x.copy(), y)
    make().fit(dataset, epochs=2, steps_per_epoch=4, shuffle=False, verbose=0)
    assert dataset.calls == ["begin", 0, 1, 2, 3, "end"] * 2
    with pytest.warns(RuntimeWarning, match="gave 9 of its 11 batches"):
        make().fit(PyDataset(x.copy(), y), steps_per_epoch=11, verbose=0)
    model = make()
    np.testing.assert_array_equal(model.predict(PyDataset(x.copy())), model.predict(x))
    assert model.evaluate(PyDataset(x.copy(), y)) == model.evaluate(x, y, batch_size=BATCH)
    with pytest.raises(InputError, match="y must be None when x is a dataset"):
        make().fit(PyDataset(x, y), y, verbose=0)


# -- (x,) items, as PyTorch's TensorDataset(x) gives them -------------------------------------


def test_items_of_one_array_are_x_for_predict(data):
    """A tuple or list of one, (x,), is x, as Keras 3's unpack_x_y_sample_weight reads it:
    DataLoader(TensorDataset(x)) yields [xb], TensorDataset(x)[i] is (x_i,) (was: read as an
    array of one sample, a shape error on a built model; on an unbuilt one, a model built for
    whole batches and one row of output a batch, silently)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data
    images = TensorDataset(torch.from_numpy(x))
    for built in (True, False):
        model = make()
        if built:
            model.build(x.shape[1:])
        expected = make().predict(x, batch_size=BATCH)  # (the same seed, the same weights)
        np.testing.assert_array_equal(model.predict(DataLoader(images, batch_size=BATCH)),
                                      expected)
        assert model.input_shape[1:] == x.shape[1:]
        np.testing.assert_array_equal(model.predict(images, batch_size=BATCH), expected)
        np.testing.assert_array_equal(model.predict(
            ((x[a:a + BATCH],) for a in range(0, N, BATCH)), steps=3), expected)
        np.testing.assert_array_equal(model.predict(
            ([x[a:a + BATCH]] for a in range(0, N, BATCH)), steps=3), expected)


def test_items_of_one_array_are_named_as_holding_no_targets_where_they_are_needed(data):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data
    images = TensorDataset(torch.from_numpy(x))
    model = make()
    with pytest.raises(InputError, match=r"^x must yield \(x, y\) or \(x, y, sample_weight\) "
                                         r"batches, got a list of length 1, \(x,\): it holds no "
                                         r"targets y, which training and evaluation need "
                                         r"\(predict takes \(x,\) items\)$"):
        model.fit(DataLoader(images, batch_size=BATCH), verbose=0)
    with pytest.raises(InputError, match=r"^x\[i\] must return a pair \(x_i, y_i\) or a triple "
                                         r"\(x_i, y_i, w_i\), got a tuple of length 1, \(x,\): "
                                         r"it holds no targets y"):
        model.evaluate(images)
    with pytest.raises(InputError, match=r"got a tuple of length 1, \(x,\): it holds no "
                                         r"targets y"):
        model.fit(((x[a:a + BATCH],) for a in range(0, N, BATCH)), steps_per_epoch=3,
                  verbose=0)
    assert not model.built and model.optimizer.iterations == 0


# -- greyscale images without their channel axis (keras.datasets.mnist's layout) --------------


def grey_model(built=True, device="cpu", channels=1):
    layers = [Conv2D(4, 3), ReLU(), Flatten(), Dense(4)]
    model = xpcnn.Sequential([xpcnn.Input((6, 6, channels))] * built + layers, seed=0,
                             device=device)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    return model


@pytest.fixture
def grey(data):
    x, y = data
    return x[..., 0].astype(np.float32) / 255, y  # (N, 6, 6)


class GreyDataset:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_greyscale_images_without_a_channel_axis_are_read_as_one_channel(grey):
    """(N, H, W) for a model whose input is (H, W, 1): the axis added, as Keras 3's functional
    models add it, in fit, its validation data, evaluate, predict and train_on_batch, from
    arrays, generators and datasets (was: 'x has per-sample shape (6, 6) but the model
    expects (6, 6, 1)')."""
    x, y = grey
    x4 = x[..., None]
    expected = grey_model()
    want = expected.fit(x4, y, epochs=2, batch_size=BATCH, validation_data=(x4, y), verbose=0)
    model = grey_model()
    got = model.fit(x, y, epochs=2, batch_size=BATCH, validation_data=(x, y), verbose=0)
    assert_same_weights(model, expected)
    for name in ("loss", "val_loss", "val_accuracy"):
        assert got.history[name] == want.history[name]
    assert model.evaluate(x, y) == expected.evaluate(x4, y)
    np.testing.assert_array_equal(model.predict(x), expected.predict(x4))
    assert model.train_on_batch(x[:BATCH], y[:BATCH]) == \
        expected.train_on_batch(x4[:BATCH], y[:BATCH])
    assert_same_weights(model, expected)
    streamed = grey_model()
    streamed.fit(((x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, N, BATCH)),
                 steps_per_epoch=3, verbose=0)
    dataset = grey_model()
    dataset.fit(GreyDataset(x, y), batch_size=BATCH, shuffle=False, verbose=0)
    reference = grey_model()
    reference.fit(x4, y, batch_size=BATCH, shuffle=False, verbose=0)
    assert_same_weights(streamed, reference)
    assert_same_weights(dataset, reference)
    # (a view: no copy of the images, a memory map's too)
    checked, _ = xpcnn.data.arrays.check_arrays(model, x)
    assert checked.shape == x4.shape and np.shares_memory(checked, x)


def test_greyscale_images_on_the_device_get_their_channel_axis_there(grey):
    x, y = grey
    device = (xps, xps.Device("device1"))
    put = lambda a: xps.asarray(a, device=xps.Device("device1"))  # noqa: E731
    expected = grey_model(device=device)
    expected.fit(x[..., None], y, batch_size=BATCH, verbose=0)
    model = grey_model(device=device)
    model.fit(put(x), put(y), batch_size=BATCH, verbose=0)
    assert_same_weights(model, expected)
    np.testing.assert_array_equal(model.predict(put(x)), expected.predict(x[..., None]))


def test_the_channel_axis_is_added_only_where_the_model_takes_one_channel(grey):
    x, y = grey
    with pytest.raises(InputError, match=r"^x has per-sample shape \(6, 6\) but the model "
                                         r"expects \(6, 6, 3\)"):
        grey_model(channels=3).fit(x, y, verbose=0)
    # an unbuilt model is built for the first data it sees; where a layer refuses (H, W) and
    # (H, W, 1) would build, the error says so (was: the layer's error alone)
    model = grey_model(built=False)
    with pytest.raises(InputError, match=r"^layer 'conv2d' \(Conv2D\) expects per-sample inputs "
                                         r"of shape \(H, W, C\), got \(6, 6\); are x greyscale "
                                         r"images without their channel axis \(per-sample "
                                         r"shape \(6, 6\), \(H, W\)\)\? pass x\[\.\.\., None\], "
                                         r"of shape \(N, H, W, 1\)$"):
        model.fit(x, y, verbose=0)
    assert not model.built
    with pytest.raises(InputError, match=r"return x_i\[\.\.\., None\] from x\[i\]$"):
        model.fit(GreyDataset(x, y), verbose=0)
    assert not model.built
    model.fit(x[..., None], y, verbose=0)  # (the trial build left nothing behind)
    assert model.input_shape == (None, 6, 6, 1)
    dense = xpcnn.Sequential([Dense(4)], seed=0)  # ((6, 6, 1) would not build either)
    with pytest.raises(InputError, match=r"expects flat per-sample inputs \(features,\), got "
                                         r"\(6, 6\): add a Flatten or GlobalAvgPool2D layer "
                                         r"before it$"):
        dense.predict(x)


def test_datasets_and_iterators_check_each_batch_in_one_sequence(data):
    """A map-style dataset's batches (data/sources.py) and an iterator's (data/streams.py)
    run the same checks (one helper, BatchChecks): the batch, whether it carries sample
    weights as the earlier ones did, the weights, with the messages (and the samples they
    name) as they were when each had a copy of its own."""
    x, y = data

    class Dataset:
        def __init__(self, w, weighted=N):
            self.w, self.weighted = w, weighted

        def __len__(self):
            return N

        def __getitem__(self, i):
            return (x[i], y[i], self.w[i]) if i < self.weighted else (x[i], y[i])

    def batches(w, weighted=N):
        for lo in range(0, N, BATCH):
            part = (x[lo:lo + BATCH], y[lo:lo + BATCH])
            yield (*part, w[lo:lo + BATCH]) if lo < weighted else part

    fit = {"epochs": 1, "verbose": 0}
    good, bad = np.ones(N), np.where(np.arange(N) == 10, -1.0, 1.0)
    make().fit(Dataset(good), batch_size=BATCH, shuffle=False, **fit)
    make().fit(batches(good), steps_per_epoch=3, **fit)
    with pytest.raises(InputError, match=r"^x\[i\] returns a sample weight w_i for some i and "
                                         r"not for others \(samples \[16, 17, .*\]...\): give "
                                         "every sample a weight, or none$"):
        make().fit(Dataset(good, 16), batch_size=BATCH, shuffle=False, **fit)
    with pytest.raises(InputError, match=r"^x yields sample weights with some batches and "
                                         "not with others: give every sample a weight, or "
                                         "none$"):
        make().fit(batches(good, 16), steps_per_epoch=3, **fit)
    with pytest.raises(InputError, match=r"^the sample weights w_i of x must be finite .* "
                                         "sample 10 has weight -1.0"):
        make().fit(Dataset(bad), batch_size=BATCH, shuffle=False, **fit)
    with pytest.raises(InputError, match=r"^the sample weights that x yields must be finite "
                                         r".* sample 2 has weight -1.0"):
        make().fit(batches(bad), steps_per_epoch=3, **fit)
