"""Keras' weights API: ``weights``, ``trainable_weights`` and ``non_trainable_weights`` on models
and layers (handles: name, shape, dtype, trainable, numpy(), assign()), ``save_weights`` /
``load_weights``, and ``load_model(..., compile=False)``."""

from __future__ import annotations

import json
import zipfile

import array_api_strict as xs
import numpy as np
import pytest
from nets import bn_relu_net

import xpcnn
from xpcnn import distributed
from xpcnn.backend import Backend
from xpcnn.callbacks import ModelCheckpoint
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import BatchNorm2D, Conv2D, Dense, Flatten, GlobalAvgPool2D, ReLU, Softmax
from xpcnn.saving.npz import CONFIG_KEY

SHAPE = (8, 8, 3)
BN_NAMES = ["conv2d/kernel", "batchnorm2d/gamma", "batchnorm2d/beta", "batchnorm2d/moving_mean",
            "batchnorm2d/moving_variance", "conv2d_1/kernel", "batchnorm2d_1/gamma",
            "batchnorm2d_1/beta", "batchnorm2d_1/moving_mean", "batchnorm2d_1/moving_variance",
            "dense/kernel", "dense/bias"]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, *SHAPE), dtype=np.uint8), rng.integers(0, 10, 24)


def bn_model(seed=0, device="cpu", dtype="float32"):
    return xpcnn.Sequential(bn_relu_net(), input_shape=SHAPE, seed=seed, device=device,
                            dtype=dtype)


def trained_bn_model(data, seed=0, **compile_args):
    model = bn_model(seed)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2), **compile_args)
    model.fit(*data, epochs=1, batch_size=8, verbose=0)  # (BatchNorm statistics moved)
    return model


def dense_model(device="cpu"):
    return xpcnn.Sequential([Flatten(), Dense(4), Softmax()], input_shape=(2, 2, 1), seed=0,
                            device=device, dtype="float64")


def file_config(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(f[CONFIG_KEY].tobytes()), sorted(f.files)


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


# -- weights, trainable_weights, non_trainable_weights ----------------------------------------


def test_model_and_layer_weights_are_get_weights_with_keras_names_and_split(data):
    model = trained_bn_model(data)
    weights, arrays = model.weights, model.get_weights()
    assert [w.path for w in weights] == BN_NAMES
    assert [w.name for w in weights] == [n.split("/")[1] for n in BN_NAMES]  # (Keras 3's)
    for w, a in zip(weights, arrays, strict=True):
        assert w.shape == a.shape and w.dtype == "float32"
        np.testing.assert_array_equal(w.numpy(), a)
        np.testing.assert_array_equal(np.asarray(w), a)
    assert np.asarray(weights[0], dtype=np.float64).dtype == np.float64
    assert [w.path for w in model.non_trainable_weights] == [
        n for n in BN_NAMES if "moving" in n]
    assert [w.path for w in model.trainable_weights] == [n for n in BN_NAMES if "moving" not in n]
    trainable = sum(la.count_params() - la.count_state() for la in model.trainable_layers)
    assert sum(np.prod(w.shape) for w in model.trainable_weights) == trainable
    assert sum(np.prod(w.shape) for w in model.weights) == model.count_params()
    # A layer's own are the model's, the same handles (equal, so ``in`` finds them).
    bn = model.get_layer("batchnorm2d")
    assert bn.weights == weights[1:5] and bn.trainable_weights == weights[1:3]
    assert bn.non_trainable_weights == weights[3:5]
    assert weights[3] in model.non_trainable_weights and weights[3] not in model.trainable_weights
    assert repr(weights[0]) == ("<Weight 'conv2d/kernel' shape=(3, 3, 3, 6) dtype=float32 "
                                "trainable=True>")


def test_unbuilt_models_and_layers_have_no_weights_as_in_keras():
    model = xpcnn.Sequential(bn_relu_net())
    layer = Dense(3)
    for each in (model, layer):
        assert each.weights == [] and each.trainable_weights == []
        assert each.non_trainable_weights == []
    layer.build((5,))
    assert [(w.path, w.shape) for w in layer.weights] == [("dense/kernel", (5, 3)),
                                                          ("dense/bias", (3,))]


def test_freezing_moves_a_layers_weights_to_non_trainable():
    model = bn_model()
    model.get_layer("conv2d").trainable = False
    model.get_layer("batchnorm2d").trainable = False
    frozen = BN_NAMES[:5]
    assert [w.path for w in model.weights] == BN_NAMES  # (the order stays get_weights')
    assert [w.path for w in model.non_trainable_weights] == [*frozen, *BN_NAMES[8:10]]
    assert [w.path for w in model.trainable_weights] == [
        n for n in BN_NAMES[5:] if "moving" not in n]
    model.trainable = False
    assert model.trainable_weights == [] and model.non_trainable_weights == model.weights


def test_reading_weights_copies_nothing_from_the_device(monkeypatch):
    model = bn_model()
    copies = []
    to_numpy = Backend.to_numpy
    monkeypatch.setattr(Backend, "to_numpy",
                        lambda self, x: copies.append(x) or to_numpy(self, x))
    listed = model.weights + model.trainable_weights + model.non_trainable_weights
    described = [(w.path, w.shape, w.dtype, w.trainable, repr(w)) for w in listed]
    assert len(described) == 24 and copies == []
    model.weights[0].numpy()
    assert len(copies) == 1


def test_mixed_precision_weights_are_named_in_their_float32(data):
    model = trained_bn_model(data, precision="mixed_float16")
    assert model.get_layer("conv2d").compute_dtype == model.backend.dtype("float16")
    assert {w.dtype for w in model.weights} == {"float32"}
    assert {w.numpy().dtype for w in model.weights} == {np.dtype(np.float32)}
    dense = model.get_layer("dense").weights[0]
    dense.assign(np.ones(dense.shape, np.float16))  # (taken into float32)
    assert model.get_layer("dense").params["kernel"].dtype == np.float32
    np.testing.assert_array_equal(dense.numpy(), 1.0)


# -- assign ----------------------------------------------------------------------------------


def test_assign_writes_into_the_live_model_and_keeps_the_optimiser_state(data):
    """As set_weights: the next step goes on from the optimiser's state, bit for bit."""
    x, y = data
    a, b = trained_bn_model(data), trained_bn_model(data)
    before = a.predict(x[:4])
    slots = {k: list(v) for k, v in a.optimizer.slots.items()}
    kernel = a.get_layer("dense").weights[0]
    new = np.linspace(-1, 1, np.prod(kernel.shape), dtype=np.float32).reshape(kernel.shape)
    kernel.assign(new)
    np.testing.assert_array_equal(a.get_weights()[10], new)
    assert not np.array_equal(a.predict(x[:4]), before)
    assert all(s is t for k, v in slots.items() for s, t in zip(v, a.optimizer.slots[k],
                                                                 strict=True))
    b.set_weights([*b.get_weights()[:10], new, b.get_weights()[11]])
    np.testing.assert_array_equal(a.predict(x[:4]), b.predict(x[:4]))
    a.train_on_batch(x[:8], y[:8])
    b.train_on_batch(x[:8], y[:8])
    assert_same(a.get_weights(), b.get_weights())


def test_assign_changes_what_predict_computes():
    model = dense_model()
    kernel, bias = model.weights
    kernel.assign(np.zeros(kernel.shape))
    bias.assign(np.array([0.0, np.log(3.0), 0.0, 0.0]))
    np.testing.assert_allclose(model.predict(np.ones((2, 2, 2, 1))),
                               [[1 / 6, 3 / 6, 1 / 6, 1 / 6]] * 2, rtol=1e-12)


@pytest.mark.parametrize("value, message", [
    (np.zeros((3, 3, 3, 5)), r"weight 'kernel' must have shape \(3, 3, 3, 6\), got \(3, 3, 3, 5\)"),
    (np.full((3, 3, 3, 6), "a"), "weight 'kernel' must be real, got <U1"),
    (np.zeros((3, 3, 3, 6), complex), "weight 'kernel' must be real, got complex128"),
    (np.full((3, 3, 3, 6), 1e300), "beyond the range of float32"),
], ids=["shape", "text", "complex", "beyond float32"])
def test_assign_refuses_a_wrong_value_and_leaves_the_model_unchanged(value, message):
    model = bn_model()
    before = model.get_weights()
    with pytest.raises(InputError, match=message):
        model.weights[0].assign(value)
    assert_same(model.get_weights(), before)


# -- functional models, shared layers, other backends ------------------------------------------


def test_a_functional_model_lists_the_layers_it_shares_once_and_assigns_into_them():
    base = xpcnn.Sequential([Conv2D(4, 3), BatchNorm2D(), ReLU(), GlobalAvgPool2D()],
                            input_shape=SHAPE, seed=0)
    inputs = xpcnn.Input(SHAPE)
    model = xpcnn.Model(inputs, Softmax()(Dense(3)(base(inputs))), seed=1)
    names = [w.path for w in model.weights]
    assert names == [w.path for w in base.weights] + ["dense/kernel", "dense/bias"]
    assert len(set(names)) == len(names) == len(model.get_weights())
    assert model.weights[:6] == base.weights  # (the same weights: the base's layers)
    x = np.random.default_rng(0).random((2, *SHAPE))
    before = base.predict(x)
    gamma = model.weights[2]
    assert gamma.path == "batchnorm2d/gamma"
    gamma.assign(np.zeros(4))  # the shared BatchNorm's
    np.testing.assert_array_equal(base.get_weights()[2], np.zeros(4))
    assert not np.array_equal(base.predict(x), before)
    base.trainable = False
    assert [w.path for w in model.trainable_weights] == ["dense/kernel", "dense/bias"]
    assert model.non_trainable_weights == base.weights


def test_weights_under_array_api_strict_stay_on_its_device():
    strict, ref = dense_model(device=(xs, xs.Device("device1"))), dense_model()
    assert strict.backend.name == "array_api_strict"
    assert_same([w.numpy() for w in strict.weights], ref.get_weights())
    value = np.arange(16.0).reshape(4, 4) / 16
    strict.weights[0].assign(value)
    ref.weights[0].assign(value)
    kernel = strict.get_layer("dense").params["kernel"]
    assert type(kernel) is type(xs.asarray(0.0)) and kernel.device == xs.Device("device1")
    x = np.random.default_rng(0).random((3, 2, 2, 1))
    np.testing.assert_allclose(strict.predict(x), ref.predict(x), rtol=1e-12)
    assert [w.dtype for w in strict.weights] == ["float64", "float64"]


# -- save_weights / load_weights -------------------------------------------------------------


def test_save_weights_round_trip_is_bit_for_bit_and_holds_no_training_state(data, tmp_path):
    model = trained_bn_model(data)
    path = tmp_path / "run.weights.npz"
    model.save_weights(path)
    config, entries = file_config(path)
    assert "compile" not in config and not any(e.startswith("slot.") for e in entries)
    for fresh in (bn_model(seed=5), xpcnn.Sequential(bn_relu_net(), seed=5)):  # built or not
        fresh.load_weights(path)
        assert_same(fresh.get_weights(), model.get_weights())
        np.testing.assert_array_equal(fresh.predict(data[0]), model.predict(data[0]))
        assert fresh.optimizer is None


def test_load_weights_refuses_another_architecture_naming_the_difference(data, tmp_path):
    bn_model().save_weights(tmp_path / "w.npz")
    other = xpcnn.Sequential([Conv2D(5, 3, padding="same", use_bias=False), *bn_relu_net()[2:]],
                             input_shape=SHAPE, seed=1)
    before = other.get_weights()
    with pytest.raises(DataFormatError, match=r"another architecture: its layer 0 is "
                       r"Rescaling\(scale=.*\), this model's is Conv2D\(filters=5"):
        other.load_weights(tmp_path / "w.npz")
    assert_same(other.get_weights(), before)


def test_save_weights_is_refused_before_a_build_and_written_by_rank_0_alone(tmp_path,
                                                                            monkeypatch):
    with pytest.raises(InputError, match="must be built before save_weights"):
        xpcnn.Sequential(bn_relu_net()).save_weights(tmp_path / "w.npz")
    model, path = bn_model(), tmp_path / "w.npz"
    # (rank 1 of 2: it writes nothing, and takes rank 0's report of its write of this path,
    # dropping one of another path, which rank 0 saved alone)
    told = [(str(tmp_path / "other.npz"), 1, False, "OSError: not this one"),
            (str(path), 0, True, "")]

    class Reports:
        def iprobe(self, source, tag):
            return bool(told)

        def recv(self, source, tag):
            return told.pop(0)

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(
        rank=1, size=2, reports=Reports()))
    model.save_weights(path)
    assert list(tmp_path.iterdir()) == [] and told == []


def test_save_weights_writes_a_symlinks_target_atomically(tmp_path):
    model = bn_model()
    target = tmp_path / "real.npz"
    link = tmp_path / "link.npz"
    link.symlink_to(target.name)
    for _ in range(2):  # made, then replaced
        model.save_weights(link)
        assert link.is_symlink() and target.is_file()
    fresh = bn_model(seed=3)
    fresh.load_weights(link)
    assert_same(fresh.get_weights(), model.get_weights())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "real.npz"]


def test_model_checkpoint_save_weights_only_writes_weights_files(data, tmp_path):
    model = bn_model()
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    template = str(tmp_path / "w-{epoch}.npz")
    model.fit(*data, epochs=2, batch_size=8, verbose=0,
              callbacks=[ModelCheckpoint(template, monitor="loss", save_weights_only=True)])
    config, entries = file_config(tmp_path / "w-2.npz")
    assert "compile" not in config and not any(e.startswith("slot.") for e in entries)
    fresh = bn_model(seed=4)
    fresh.load_weights(tmp_path / "w-2.npz")
    assert_same(fresh.get_weights(), model.get_weights())


# -- load_model: weights files, compile=False --------------------------------------------------


def test_load_model_of_a_weights_file_gives_the_model_uncompiled(data, tmp_path):
    model = trained_bn_model(data)
    model.save_weights(tmp_path / "w.npz")
    loaded = xpcnn.load_model(tmp_path / "w.npz")
    assert loaded.optimizer is None and loaded.loss is None
    assert_same(loaded.get_weights(), model.get_weights())
    with pytest.raises(InputError, match=r"call compile\(loss=..., optimizer=...\) before"):
        loaded.fit(*data, verbose=0)


def test_load_model_compile_false_reads_no_compile_settings(data, tmp_path):
    model = trained_bn_model(data)
    model.save(tmp_path / "m.npz")
    # A file whose optimiser this process cannot make: loads only uncompiled.
    with np.load(tmp_path / "m.npz", allow_pickle=False) as f:
        arrays = dict(f)
    config = json.loads(arrays[CONFIG_KEY].tobytes())
    config["compile"]["optimizer"]["class"] = "SomeoneElsesOptimizer"
    arrays[CONFIG_KEY] = np.frombuffer(json.dumps(config).encode(), np.uint8)
    np.savez(tmp_path / "foreign.npz", **arrays)
    with pytest.raises(DataFormatError, match="SomeoneElsesOptimizer"):
        xpcnn.load_model(tmp_path / "foreign.npz")
    x, y = data
    for name in ("m.npz", "foreign.npz"):
        loaded = xpcnn.load_model(tmp_path / name, device="cpu", compile=False)
        assert loaded.optimizer is None and loaded.loss is None
        assert_same(loaded.get_weights(), model.get_weights())
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
        assert loaded.evaluate(x, y) == pytest.approx(model.evaluate(x, y), rel=1e-6)
        assert loaded.optimizer is None  # (evaluated with the defaults, still uncompiled)
        with pytest.raises(InputError, match=r"call compile\(loss=..., optimizer=...\) before"):
            loaded.fit(x, y, verbose=0)
    assert xpcnn.load_model(tmp_path / "m.npz").optimizer is not None  # (compile=True)
    with pytest.raises(InputError, match="compile must be True or False"):
        xpcnn.load_model(tmp_path / "m.npz", compile="no")


def test_load_model_compile_false_of_a_checkpoint(data, tmp_path):
    model = bn_model()
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    model.fit(*data, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert any(n.startswith("slot.") for n in z.namelist())
    loaded = xpcnn.load_model(tmp_path / "c.npz", compile=False)
    assert loaded.optimizer is None
    assert_same(loaded.get_weights(), model.get_weights())
    assert xpcnn.load_model(tmp_path / "c.npz").optimizer is not None  # (compile=True)


def test_a_user_layer_keeping_arrays_under_the_weights_names_is_told_why():
    """weights, trainable_weights and non_trainable_weights are read-only lists, as in Keras: a
    user's layer that set one of its own gets an InputError saying so (was a bare
    AttributeError, "property 'weights' of 'Mix' object has no setter")."""
    from xpcnn.layers.base import Layer

    for name in ("weights", "trainable_weights", "non_trainable_weights"):
        class Mix(Layer):
            def __init__(self, kept=name):
                super().__init__()
                setattr(self, kept, [np.ones(3)])

        with pytest.raises(InputError, match=rf"^layer 'mix' \(Mix\): {name} is the list of its "
                                             r"weights that xpcnn makes from params and state, "
                                             r"read-only as in Keras"):
            Mix()


def test_load_weights_casts_the_dtype_and_takes_another_input_size(tmp_path):
    """As Keras' load_weights and PyTorch's load_state_dict: a file of the same layers in
    another dtype loads cast to the model's, and one built for inputs of another size loads
    where every weight keeps its shape, the model keeping its own input shape (was refused:
    'holds a float64 model', 'holds a model for inputs of shape (6, 6, 2)'). A layer whose
    weights would differ in shape is refused by name."""
    def make(dtype="float32", shape=(6, 6, 2), seed=1):
        return xpcnn.Sequential([Conv2D(3, 3), BatchNorm2D(), GlobalAvgPool2D(), Dense(3)],
                                input_shape=shape, dtype=dtype, seed=seed)

    ref = make("float64")
    ref.save_weights(tmp_path / "w64.npz")
    into32 = make("float32", seed=2)
    into32.load_weights(tmp_path / "w64.npz")
    for a, b in zip(into32.get_weights(), ref.get_weights(), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float32))
    into32.save(tmp_path / "w32.npz")
    into64 = make("float64", seed=3)
    into64.load_weights(tmp_path / "w32.npz")
    for a, b in zip(into64.get_weights(), into32.get_weights(), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)  # (exact: float32 values)
    big = make(shape=(12, 12, 2), seed=4)
    big.load_weights(tmp_path / "w32.npz")
    assert big.input_shape == (None, 12, 12, 2)
    for a, b in zip(big.get_weights(), into32.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 2)).astype(np.float32)
    assert big.predict(x, verbose=0).shape == (2, 3)
    unbuilt = xpcnn.Sequential([Conv2D(3, 3), BatchNorm2D(), GlobalAvgPool2D(), Dense(3)])
    unbuilt.load_weights(tmp_path / "w32.npz")
    assert unbuilt.input_shape == (None, 6, 6, 2)  # (built for the file's)
    flat = xpcnn.Sequential([Conv2D(3, 3), Flatten(), Dense(3)], input_shape=(6, 6, 2))
    flat.save_weights(tmp_path / "flat.npz")
    other = xpcnn.Sequential([Conv2D(3, 3), Flatten(), Dense(3)], input_shape=(8, 8, 2), seed=5)
    before = other.get_weights()
    with pytest.raises(DataFormatError, match=r"holds a model for inputs of shape \(6, 6, 2\); "
                                              r"this model takes \(8, 8, 2\), for which its "
                                              r"layer 'dense' \(Dense\) has kernel of shape "
                                              r"\(108, 3\), the file's is \(48, 3\)"):
        other.load_weights(tmp_path / "flat.npz")
    for a, b in zip(other.get_weights(), before, strict=True):  # (untouched)
        np.testing.assert_array_equal(a, b)


def test_load_weights_takes_the_files_weights_and_keeps_the_models_settings(tmp_path):
    """A file whose layers differ from the model's only in settings that may change while a
    model trains (Dropout's rate, BatchNorm2D's momentum, ReLU's max_value) was refused as
    "another architecture". As Keras' load_weights and PyTorch's load_state_dict: the file's
    weights are taken, the model's settings kept. Another setting (a Dense's use_bias, a
    layer's activation, part of what the model computes) is still refused."""
    from xpcnn.layers import Dropout

    def make(rate, momentum, ceiling, act, use_bias=True):
        return xpcnn.Sequential([Conv2D(4, 3, activation=act), BatchNorm2D(momentum=momentum),
                                 ReLU(max_value=ceiling), Flatten(), Dropout(rate),
                                 Dense(3, use_bias=use_bias)], input_shape=(6, 6, 2), seed=1)

    saved = make(0.5, 0.4, 6.0, "relu")
    saved.save(tmp_path / "m.npz")
    model = make(0.1, 0.3, None, "relu")
    configs = [la.get_config() for la in model.layers]
    model.load_weights(tmp_path / "m.npz")
    for a, b in zip(model.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [la.get_config() for la in model.layers] == configs
    with pytest.raises(DataFormatError, match="another architecture: its layer 5 is Dense"):
        make(0.5, 0.4, 6.0, "relu", use_bias=False).load_weights(tmp_path / "m.npz")
    with pytest.raises(DataFormatError, match="another architecture: its layer 0 is Conv2D"):
        make(0.5, 0.4, 6.0, None).load_weights(tmp_path / "m.npz")
