"""Model files and checkpoints under hostile edits: entries the format has no place for are refused
before they are inflated, every entry inflates under the cap its weight implies, NaN or infinite
weights are refused, and files are created as the umask says.

The property test builds files from a valid one by adding, removing, resizing and recompressing
entries: each either raises DataFormatError or loads the very model that was saved, and never
takes more memory (tracemalloc's peak) than a small multiple of that model's size.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import stat
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xpcnn
from xpcnn.errors import DataFormatError, InputError, NonFiniteError
from xpcnn.layers import (
    Add,
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    Normalization,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.layers.base import LAYER_TYPES
from xpcnn.saving import load_checkpoint, save_checkpoint
from xpcnn.saving.model_file import MAX_SAMPLE_VALUES, model_config
from xpcnn.saving.npz import CONFIG_KEY, MAX_CONFIG_BYTES, decode_json, encode_json


def small_model() -> xpcnn.Sequential:
    """About 0.5 MB of weights, so that memory bounds are a multiple of the model, not of
    Python's own overhead."""
    model = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(),
                              Dense(2000, activation="relu"), Dense(5), Softmax()],
                             input_shape=(10, 10, 3), seed=1)
    model.compile(optimizer="adam")
    return model


class Saved(tuple):
    """(model, its file's bytes), with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return "<saved model>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    model = small_model()
    model.save(folder / "model.npz")
    return Saved((model, (folder / "model.npz").read_bytes()))


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def pack(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """A valid zip of (content, compression method) entries."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, (blob, method) in entries.items():
            zf.writestr(name, blob, compress_type=method)
    return out.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def measured_load(path) -> tuple[object, int]:
    """(the loaded model, or the DataFormatError raised), and the peak of traced memory."""
    tracemalloc.start()
    try:
        result = xpcnn.load_model(path)
    except DataFormatError as e:
        result = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, peak


def weights_bytes(model) -> int:
    return sum(w.nbytes for w in model.get_weights())


# -- the cases, one by one -------------------------------------------------------------


def test_an_extra_deflated_entry_is_refused_before_it_is_inflated(saved, tmp_path):
    """The issue's case: a small file with one extra deflated entry took 1.6 GB to load."""
    model, data = saved
    entries = {k: (v, zipfile.ZIP_DEFLATED) for k, v in members(data).items()}
    entries["extra.npy"] = (npy(np.zeros(2**26, np.uint8)), zipfile.ZIP_DEFLATED)  # 64 MiB
    path = tmp_path / "bomb.npz"
    path.write_bytes(pack(entries))
    assert path.stat().st_size < 2**20
    result, peak = measured_load(path)
    assert isinstance(result, DataFormatError)
    assert "unexpected entry 'extra'" in str(result) and "nothing was read" in str(result)
    assert peak < 4 * weights_bytes(model) + 2**20


@pytest.mark.parametrize("name", ["layer1.2", "layer9.0", "slot.m.0", "layer1.0.x", "__cfg__"])
def test_entries_the_architecture_has_no_place_for(saved, tmp_path, name):
    _, data = saved
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in members(data).items()}
    entries[f"{name}.npy"] = (npy(np.zeros(3, np.float32)), zipfile.ZIP_STORED)
    (tmp_path / "m.npz").write_bytes(pack(entries))
    with pytest.raises(DataFormatError, match=f"unexpected entry '{name}'"):
        xpcnn.load_model(tmp_path / "m.npz")


def test_an_expected_entry_inflates_only_as_far_as_its_weight(saved, tmp_path):
    """The right name and header, but data that inflates far past the weight it stands for:
    refused from the zip directory's claim, and, where the directory lies, by the stream's cap."""
    model, data = saved
    kernel = model.layers[1].get_weights()[0]
    header = npy(kernel)[:-kernel.nbytes]
    big = header + kernel.tobytes() + bytes(2**25)
    entries = {k: (v, zipfile.ZIP_DEFLATED) for k, v in members(data).items()}
    entries["layer1.0.npy"] = (big, zipfile.ZIP_DEFLATED)
    honest = pack(entries)
    path = tmp_path / "m.npz"
    path.write_bytes(honest)
    result, peak = measured_load(path)
    assert isinstance(result, DataFormatError)
    assert "entry 'layer1.0' claims 33554" in str(result) and "its place in the file" in str(result)
    assert peak < 4 * weights_bytes(model) + 2**20
    # Now the directory claims the right size: the stream stops at the cap anyway.
    lying = bytearray(honest)
    pos = lying.find(b"PK\x01\x02")  # each central directory record
    while pos != -1:
        if lying[pos + 46:pos + 58] == b"layer1.0.npy":
            lying[pos + 24:pos + 28] = struct.pack("<I", len(npy(kernel)))
        pos = lying.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(lying))
    result, peak = measured_load(path)
    assert isinstance(result, DataFormatError)
    assert peak < 4 * weights_bytes(model) + 2**20


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weights_holding_nan_or_infinity_are_refused(saved, tmp_path, bad):
    model, data = saved
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in members(data).items()}
    dense_bias = model.layers[6].get_weights()[1]
    dense_bias[2] = bad
    entries["layer6.1.npy"] = (npy(dense_bias), zipfile.ZIP_STORED)
    (tmp_path / "m.npz").write_bytes(pack(entries))
    message = r"array 'layer6.1' \(bias of layer 'dense_1'\) holds NaN or infinite values"
    with pytest.raises(DataFormatError, match=message):
        xpcnn.load_model(tmp_path / "m.npz")
    fresh = small_model()
    with pytest.raises(DataFormatError, match=message):
        fresh.load_weights(tmp_path / "m.npz")
    assert np.all(np.isfinite(fresh.layers[6].get_weights()[1]))


def test_non_finite_weights_are_not_saved(tmp_path):
    model = small_model()
    weights = model.get_weights()
    weights[0][0, 0, 0, 0] = np.nan
    model.set_weights(weights)
    with pytest.raises(NonFiniteError, match=r"layer 'conv2d' \(kernel\) hold NaN or infinity: "
                                             r".*m.npz was not written"):
        model.save(tmp_path / "m.npz")
    assert not list(tmp_path.iterdir())


def test_a_layer_without_a_bias_saves_and_loads_only_its_kernel(tmp_path):
    model = xpcnn.Sequential([Flatten(), Dense(3, use_bias=False), Softmax()],
                             input_shape=(2, 2, 1), seed=1)
    assert model.layers[1].present_weight_names() == ["kernel"]
    model.save(tmp_path / "m.npz")
    assert sorted(members((tmp_path / "m.npz").read_bytes())) == ["__config__.npy",
                                                                  "layer1.0.npy"]
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.layers[1].get_weights()[0],
                                  model.layers[1].get_weights()[0])


def test_a_checkpoint_is_not_written_from_non_finite_optimizer_state(tmp_path):
    model = small_model()
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (4, 10, 10, 3), np.uint8), np.arange(4), verbose=0)
    save_checkpoint(model, tmp_path / "c.npz")
    good = (tmp_path / "c.npz").read_bytes()
    slot = model.optimizer.slots["v"][1]
    slot[(0,) * slot.ndim] = np.inf
    with pytest.raises(NonFiniteError, match=r"training stopped after step 1: the optimiser's "
                                             r"'v' state holds NaN or infinity; the checkpoint "
                                             r".*c.npz was not overwritten"):
        save_checkpoint(model, tmp_path / "c.npz")
    assert (tmp_path / "c.npz").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


def _checkpoint_with_slot_value(tmp_path, value, dtype=None):
    """tmp_path / "c.npz", a trained model's checkpoint whose first 'v' slot's first value is
    ``value`` (the slot in ``dtype`` where given)."""
    model = small_model()
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (4, 10, 10, 3), np.uint8), np.arange(4), verbose=0)
    save_checkpoint(model, tmp_path / "c.npz")
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in members((tmp_path / "c.npz").read_bytes()
                                                               ).items()}
    with np.load(tmp_path / "c.npz") as f:
        v = f["slot.v.0"].astype(dtype or f["slot.v.0"].dtype)
    v.flat[0] = value
    entries["slot.v.0.npy"] = (npy(v), zipfile.ZIP_STORED)
    (tmp_path / "c.npz").write_bytes(pack(entries))


def test_a_checkpoint_with_non_finite_optimizer_state_is_refused(tmp_path):
    _checkpoint_with_slot_value(tmp_path, np.inf)
    with pytest.raises(DataFormatError, match=r"array 'slot.v.0' \(the optimizer's 'v' state\) "
                                              "holds NaN or infinite values"):
        load_checkpoint(tmp_path / "c.npz")


def test_finite_values_beyond_the_models_float_range_are_refused(saved, tmp_path):
    """A float64 1e300 is finite, but infinity once cast to the float32 model: as a weight or an
    optimiser slot it is refused (was: checked in the file's dtype, loaded as inf)."""
    model, data = saved
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in members(data).items()}
    entries["layer6.1.npy"] = (npy(np.full(5, 1e300)), zipfile.ZIP_STORED)
    (tmp_path / "m.npz").write_bytes(pack(entries))
    with pytest.raises(DataFormatError, match=r"array 'layer6.1' \(bias of layer 'dense_1'\) "
                                              r"holds values beyond the range of float32 "
                                              r"\(up to 1e\+300\)"):
        xpcnn.load_model(tmp_path / "m.npz")
    _checkpoint_with_slot_value(tmp_path, -1e300, np.float64)
    with pytest.raises(DataFormatError, match=r"array 'slot.v.0' \(the optimizer's 'v' state\) "
                                              "holds values beyond the range of float32"):
        load_checkpoint(tmp_path / "c.npz")


def test_a_configuration_too_big_to_load_is_not_written(tmp_path):
    """A Normalization over 120k features holds 4.8 MB of settings, more JSON than loading a
    file accepts (MAX_CONFIG_BYTES): save and save_checkpoint refuse it before writing (was: a
    file that load_model then refused) and keep the file there. Writers and reader draw the
    line at the same byte."""
    n = 120_000
    rng = np.random.default_rng(0)
    model = xpcnn.Sequential([Normalization(rng.random(n), rng.random(n) + 0.5), Dense(2)],
                             input_shape=(n,))
    model.compile()
    (tmp_path / "m.npz").write_bytes(b"old")
    refused = r"its configuration takes \d+ bytes as JSON, more than the 4194304 that loading " \
              r"a file accepts; the largest part is layer 0 \(Normalization\)'s settings"
    with pytest.raises(InputError, match=r"m.npz was not written: " + refused):
        model.save(tmp_path / "m.npz")
    with pytest.raises(InputError, match=r"the checkpoint .*c.npz was not written: " + refused):
        save_checkpoint(model, tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    assert (tmp_path / "m.npz").read_bytes() == b"old"
    # A configuration of exactly MAX_CONFIG_BYTES loads; a byte more is not written.
    small = xpcnn.Sequential([Flatten(), Dense(2)], input_shape=(3,), name="m")
    pad = MAX_CONFIG_BYTES - encode_json(model_config(small)).size
    small.name = "m" * (1 + pad)
    small.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        assert f[CONFIG_KEY].size == MAX_CONFIG_BYTES
        assert decode_json(f[CONFIG_KEY], "m.npz")["name"] == small.name
    assert xpcnn.load_model(tmp_path / "m.npz").name == small.name
    small.name += "m"
    with pytest.raises(InputError, match="4194305 bytes as JSON"):
        small.save(tmp_path / "m.npz")


def test_an_unbuilt_functional_model_loads_the_weights_of_its_own_file(tmp_path):
    """load_weights checks an unbuilt model's weight counts along its graph before building it
    (was: along a chain, which gave the second branch the first one's output and refused the
    model's own file)."""
    inputs = xpcnn.Input((6, 6, 3))
    branches = [Conv2D(4, 3, padding="same")(inputs), Conv2D(4, 1)(inputs)]
    model = xpcnn.Model(inputs, Dense(3)(Flatten()(Add()(branches))))
    model.save(tmp_path / "m.npz")
    config = model.get_config()
    unbuilt = xpcnn.Model.from_config(config, [LAYER_TYPES[spec["class"]](**spec["config"])
                                               for spec in config["layers"]])
    assert not unbuilt.built
    unbuilt.load_weights(tmp_path / "m.npz")
    for a, b in zip(unbuilt.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_size_cap_applies_to_the_outputs_of_merge_layers(saved, tmp_path):
    """A chain of Concatenates at the end of a graph doubles the output at each: the per-sample
    cap refuses the first one past it (was: merge layers were skipped, and the file loaded a
    model of 3e9 values per sample)."""
    _, data = saved
    entries = members(data)
    config = decode_json(np.load(io.BytesIO(entries["__config__.npy"])), "m.npz")
    config["layers"] = [{"class": "Flatten", "config": {"name": "f"}}] + [
        {"class": "Concatenate", "config": {"name": f"c{k}", "axis": -1}, "inbound": [k + 1, k + 1]}
        for k in range(30)]
    config.pop("compile")
    blob = pack({"__config__.npy": (npy(encode_json(config)), zipfile.ZIP_STORED)})
    (tmp_path / "m.npz").write_bytes(blob)
    k = next(k for k in range(30) if 300 * 2 ** (k + 1) > MAX_SAMPLE_VALUES)
    with pytest.raises(DataFormatError, match=rf"layer {k + 1} \(Concatenate\) would give "
                                              rf"outputs of shape \({300 * 2 ** (k + 1)},\)"):
        xpcnn.load_model(tmp_path / "m.npz")


@pytest.mark.parametrize("shape, first", [
    ((1024, 1024, 3), Conv2D(128, 3, padding="same")),  # 134 M values a sample
    ((4096, 4096, 4), Conv2D(8, 3, strides=4)),  # "valid": no padding charged
    ((46340, 46340, 1), Conv2D(1, 3)),  # just under the cap, unpadded
], ids=["same", "valid strided", "valid at the cap"])
def test_a_model_with_a_large_activation_saves_and_loads(tmp_path, shape, first):
    """Whatever save writes loads (was: a cap of 2**26 values per sample on reading alone, a
    "valid" layer charged padding: the file of a 1024x1024 model could never be loaded)."""
    model = xpcnn.Sequential([first, MaxPool2D(4), GlobalAvgPool2D(), Dense(2)],
                             input_shape=shape, seed=3)  # (built: the weights are tiny)
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert loaded.input_shape[1:] == shape
    twin = xpcnn.Sequential([type(la).from_config(la.get_config()) for la in model.layers])
    twin.load_weights(tmp_path / "m.npz")
    assert twin.input_shape[1:] == shape
    for a, b, c in zip(loaded.get_weights(), twin.get_weights(), model.get_weights(),
                       strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_saving_refuses_what_loading_would_refuse(tmp_path):
    """A layer taking (with its own padding) or giving more than MAX_SAMPLE_VALUES values per
    sample: save, save_weights and save_checkpoint refuse before writing, naming the layer; a
    file that says so anyway is refused on loading (was: saved, then never loadable)."""
    assert MAX_SAMPLE_VALUES == 2**31
    side = 46340  # 46340**2 < 2**31 < 46342**2: the "same" padding of a 3x3 kernel tips it
    padded = xpcnn.Sequential([Conv2D(1, 3, padding="same"), GlobalAvgPool2D(), Dense(2)],
                              input_shape=(side, side, 1))
    padded.compile(optimizer="sgd")
    wide = xpcnn.Sequential([Conv2D(32, 1), GlobalAvgPool2D(), Dense(2)],
                            input_shape=(16384, 16384, 4))
    for model, message in (
            (padded, rf"layer 0 \('conv2d', Conv2D\) would take inputs of shape \({side}, "
                     rf"{side}, 1\), more than {2**31} values per sample with its padding"),
            (wide, rf"layer 0 \('conv2d', Conv2D\) would give outputs of shape \(16384, "
                   rf"16384, 32\), more than {2**31} values per sample")):
        for save in (model.save, model.save_weights):
            with pytest.raises(InputError, match=rf"model 'sequential' cannot be saved: its "
                                                 rf"{message}, the most a model file may hold"):
                save(tmp_path / "m.npz")
            assert not (tmp_path / "m.npz").exists()
    with pytest.raises(InputError, match="cannot be saved: its layer 0"):
        save_checkpoint(padded, tmp_path / "c.npz")
    assert sorted(os.listdir(tmp_path)) == []
    # The same model with "valid" padding saves; its file edited to say "same" does not load.
    valid = xpcnn.Sequential([Conv2D(1, 3), GlobalAvgPool2D(), Dense(2)],
                             input_shape=(side, side, 1))
    valid.save(tmp_path / "m.npz")
    entries = {k: (v, zipfile.ZIP_STORED)
               for k, v in members((tmp_path / "m.npz").read_bytes()).items()}
    config = decode_json(np.load(io.BytesIO(entries["__config__.npy"][0])), "m.npz")
    config["layers"][0]["config"]["padding"] = "same"
    entries["__config__.npy"] = (npy(encode_json(config)), zipfile.ZIP_STORED)
    (tmp_path / "same.npz").write_bytes(pack(entries))
    with pytest.raises(DataFormatError, match=rf"layer 0 \(Conv2D\) would take inputs of shape "
                                              rf"\({side}, {side}, 1\), more than {2**31}"):
        xpcnn.load_model(tmp_path / "same.npz")


def test_a_model_subclass_loads_by_its_class_name(tmp_path):
    """A Sequential or Model subclass (Keras' way to override train_step) is found by its class
    name where it is defined, as a user's layers are (was: saved, then 'unknown model class'
    from load_model and load_checkpoint); it may not take the name of one of xpcnn's models."""
    from xpcnn.saving import MODEL_TYPES, register_model

    class StepCounting(xpcnn.Sequential):
        def train_step(self, *args, **kwargs):
            self.steps = getattr(self, "steps", 0) + 1
            return super().train_step(*args, **kwargs)

    class GraphModel(xpcnn.Model):
        pass

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4, 4, 2)).astype(np.float32), np.arange(16) % 3
    chain = StepCounting([Flatten(), Dense(3)], input_shape=(4, 4, 2))
    chain.compile(loss="cross_entropy", optimizer="sgd")
    chain.fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "run.npz")
    assert chain.steps == 2
    inputs = xpcnn.Input((4, 4, 2))
    graph = GraphModel(inputs, Dense(3)(Flatten()(inputs)))
    for model, name in ((chain, "chain"), (graph, "graph")):
        model.save(tmp_path / f"{name}.npz")
        loaded = xpcnn.load_model(tmp_path / f"{name}.npz")
        assert type(loaded) is type(model)
        for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    resumed = load_checkpoint(tmp_path / "run.npz").model
    assert type(resumed) is StepCounting
    resumed.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert resumed.steps == 2  # (its own train_step)
    assert MODEL_TYPES["Sequential"] is xpcnn.Sequential and MODEL_TYPES["Model"] is xpcnn.Model
    with pytest.raises(InputError, match="a model class named 'Sequential' exists already"):
        type("Sequential", (xpcnn.Sequential,), {})
    assert MODEL_TYPES["Sequential"] is xpcnn.Sequential

    @register_model  # (still works, the decorator of earlier versions)
    class Decorated(xpcnn.Sequential):
        pass

    assert MODEL_TYPES["Decorated"] is Decorated


def test_a_model_subclass_its_from_config_cannot_rebuild_is_refused_at_save(tmp_path):
    """A subclass whose constructor takes its own parameters (Classifier(classes)) saved, then
    load_model failed with "units must be a positive int ..., got [Flatten(), Dense(...)]":
    the layers went into ``classes``. Save refuses it, naming the class and its parameters,
    unless it defines get_config and from_config (as Keras asks); a class that cannot take
    what from_config passes is refused too; a file of such a class (written before) names the
    class at load."""
    from xpcnn.saving import model_file

    class Classifier(xpcnn.Sequential):
        def __init__(self, classes, **kwargs):
            super().__init__(**kwargs)
            self.add(Flatten())
            self.add(Dense(classes))

    class Stacked(xpcnn.Sequential):  # (no parameter of its own, but no layers either)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.add(Flatten())

    class Wide(xpcnn.Model):
        def __init__(self, inputs=None, outputs=None, width=4, **kwargs):
            super().__init__(inputs, outputs, **kwargs)
            self.width = width

    class Configured(Classifier):
        def get_config(self):
            return {**super().get_config(), "classes": self.layers[-1].units}

        @classmethod
        def from_config(cls, config, layers=None, device="cpu"):
            model = cls(config["classes"], device=device, seed=config["seed"],
                        dtype=config["dtype"], name=config["name"])
            return model

    classifier, stacked = Classifier(3), Stacked()
    classifier.build((4, 4, 1))
    stacked.build((2, 2))
    classifier.compile(loss="cross_entropy", optimizer="sgd")
    for model, what in ((classifier, r"takes \['classes'\], which Sequential's does not"),
                        (stacked, r"cannot take what Sequential\.from_config"
                                  r" passes \(the layers, then device"),
                        (Wide(*io_pair()), r"takes \['width'\], which Model's does not")):
        for save in (model.save, model.save_weights):
            with pytest.raises(InputError, match=rf"model class {type(model).__name__} cannot be "
                                                 rf"saved: its constructor {what}.*define "
                                                 r"get_config\(\).*from_config"):
                save(tmp_path / "m.npz")
        assert not (tmp_path / "m.npz").exists()
    configured = Configured(3)
    configured.build((4, 4, 1))
    configured.save(tmp_path / "c.npz")
    loaded = xpcnn.load_model(tmp_path / "c.npz")
    assert type(loaded) is Configured and len(loaded.layers) == 2
    np.testing.assert_array_equal(loaded.get_weights()[0], configured.get_weights()[0])
    # a file written without the check (as before) names the class at load
    check = model_file.check_model_class
    model_file.check_model_class = lambda cls, model=None: None
    try:
        classifier.save(tmp_path / "old.npz")
    finally:
        model_file.check_model_class = check
    with pytest.raises(InputError, match=r"model class Classifier cannot be rebuilt from the "
                                         r"file: its constructor does not take what "
                                         r"Classifier\.from_config passes"):
        xpcnn.load_model(tmp_path / "old.npz")


def io_pair():
    inputs = xpcnn.Input((3,))
    return inputs, Dense(2)(inputs)


def test_only_concrete_layers_can_be_named_in_a_file(saved, tmp_path):
    """A base class such as RandomLayer (no forward pass) is no layer type a file may name (was:
    it loaded, then failed at the first batch with a bare NotImplementedError)."""
    assert "RandomLayer" not in LAYER_TYPES and "Dropout" in LAYER_TYPES
    _, data = saved
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in members(data).items()}
    config = decode_json(np.load(io.BytesIO(entries["__config__.npy"][0])), "m.npz")
    config["layers"][2] = {"class": "RandomLayer", "config": {"name": "r"}}  # (the ReLU)
    entries["__config__.npy"] = (npy(encode_json(config)), zipfile.ZIP_STORED)
    (tmp_path / "m.npz").write_bytes(pack(entries))
    with pytest.raises(DataFormatError, match="unknown layer type 'RandomLayer'"):
        xpcnn.load_model(tmp_path / "m.npz")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_as_the_umask_says(tmp_path, umask):
    model = small_model()
    old = os.umask(umask)
    try:
        model.save(tmp_path / "m.npz")
        save_checkpoint(model, tmp_path / "c.npz")
        model.save(tmp_path / "m.npz")  # replacing a file: the same
    finally:
        os.umask(old)
    for name in ("m.npz", "c.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.npz"]  # no leftovers


def tiny_model() -> xpcnn.Sequential:
    model = xpcnn.Sequential([Flatten(), Dense(2)], input_shape=(2, 2, 1), seed=0)
    model.compile(optimizer="sgd")
    return model


@pytest.mark.parametrize("write", [xpcnn.Model.save, xpcnn.Model.save_weights, save_checkpoint],
                         ids=["model file", "weights file", "checkpoint"])
def test_a_file_saved_over_keeps_its_permissions(tmp_path, write):
    """A model file set to 0600 was 0644 after the next save (umask 022): the temporary file
    renamed over it takes the old file's mode; a new file's is as the umask says."""
    path = tmp_path / "m.npz"
    write(tiny_model(), path)
    for mode in (0o600, 0o640, 0o444):
        path.chmod(mode)
        write(tiny_model(), path)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    old = os.umask(0o022)
    try:
        write(tiny_model(), tmp_path / "new.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.npz").stat().st_mode) == 0o644


@pytest.mark.parametrize("write", [xpcnn.Model.save, xpcnn.Model.save_weights],
                         ids=["model file", "weights file"])
def test_a_model_file_write_removes_the_leftovers_of_killed_writers(tmp_path, write):
    """A writer killed mid-save leaves its hidden temporary (a full copy of the model): only
    checkpoints removed them; a model or weights file's write does too, and only those (the
    names files.remove_leftovers matches)."""
    from xpcnn import files

    fd, leftover = files._new_temporary(str(tmp_path), "m.npz", ".tmp")  # (a killed writer's)
    os.close(fd)
    users = [".m.npz.backup.tmp", ".m.npz.0123.tmp", ".m.npz.0123456789AB.tmp",
             ".n.npz.0123456789ab.tmp", "m.npz.0123456789ab.tmp", ".m.npz.0123456789ab.part"]
    for name in users:
        (tmp_path / name).write_bytes(b"mine")
    write(tiny_model(), tmp_path / "m.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.npz", *users])
    assert not os.path.exists(leftover)


def _zip(path, names) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, b"{}")


@pytest.mark.parametrize("make, kind", [
    (lambda p: _zip(p, ["metadata.json", "config.json", "model.weights.h5"]),
     "a Keras .keras file"),
    (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200)),
     r"an HDF5 file \(Keras' \.h5 / \.weights\.h5\)"),
    (lambda p: _zip(p, ["model/data.pkl", "model/.format_version", "model/byteorder",
                        "model/data/0", "model/version"]), "a PyTorch torch.save file"),
    (lambda p: p.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03."),
     "a PyTorch torch.save file"),  # (PyTorch's format before 1.6: pickles, no zip)
])
def test_another_librarys_file_is_named_as_such(tmp_path, make, kind):
    """A Keras .keras file said "entry 'metadata.json' is not an array (.npy)", an .h5 file
    "BadZipFile", a torch.save file "entry 'model/data.pkl' is not an array": each loader says
    what the file is and that xpcnn reads its own .npz files."""
    path = tmp_path / "other.keras"
    make(path)
    said = (rf"other\.keras: {kind}; xpcnn reads only its own \.npz files .*: to port the "
            r"weights, .*set_weights of an xpcnn model of the same layers")
    for load in (xpcnn.load_model, tiny_model().load_weights, load_checkpoint):
        with pytest.raises(DataFormatError, match=said):
            load(path)


def test_a_file_of_no_known_kind_is_still_said_to_be_unreadable(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DataFormatError, match=r"not a readable xpcnn \.npz file \(BadZipFile"):
        xpcnn.load_model(path)
    _zip(path, ["notes.txt"])  # (a zip of no other library's)
    with pytest.raises(DataFormatError, match=r"entry 'notes.txt' is not an array \(\.npy\)"):
        xpcnn.load_model(path)


def test_a_missing_file_is_a_file_not_found_error_too(tmp_path):
    """A missing file was a DataFormatError alone, which ``except FileNotFoundError`` (Keras'
    load_weights' and torch.load's error) and ``except OSError`` missed."""
    path = tmp_path / "absent.npz"
    for load in (xpcnn.load_model, tiny_model().load_weights, load_checkpoint):
        with pytest.raises(FileNotFoundError, match=r"absent\.npz: no such file$") as caught:
            load(path)
        assert isinstance(caught.value, DataFormatError) and caught.value.filename == str(path)
        assert caught.value.errno == errno.ENOENT and str(caught.value) == f"{path}: no such file"
    copy = pickle.loads(pickle.dumps(caught.value))  # (as a worker process hands it back)
    assert (type(copy), str(copy), copy.filename) == (type(caught.value), str(caught.value),
                                                      str(path))
    (tmp_path / "folder.npz").mkdir()  # (there, but not a file: not a FileNotFoundError)
    with pytest.raises(DataFormatError, match="is a folder") as caught:
        xpcnn.load_model(tmp_path / "folder.npz")
    assert not isinstance(caught.value, OSError)


@pytest.mark.parametrize("write", [xpcnn.Model.save, save_checkpoint],
                         ids=["model file", "checkpoint"])
def test_saving_to_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, monkeypatch, write):
    """As ``open(path, "w")`` does: the link's target is written (made where the link dangles),
    atomically, with the temporary file in the target's folder; the link stays a link (was:
    the rename replaced it with a regular file). A loop of links is refused by name."""
    from xpcnn import files

    model = small_model()
    links, real = tmp_path / "links", tmp_path / "real"
    links.mkdir()
    real.mkdir()
    link, target = links / "m.npz", real / "m.npz"
    link.symlink_to(os.path.join("..", "real", "m.npz"))  # (relative, dangling at first)
    folders = []
    temporary = files._new_temporary
    monkeypatch.setattr(files, "_new_temporary",
                        lambda folder, *rest: folders.append(folder) or temporary(folder, *rest))
    for _ in range(2):  # made, then replaced
        write(model, link)
        assert link.is_symlink() and os.readlink(link) == os.path.join("..", "real", "m.npz")
        assert target.is_file() and not target.is_symlink()
        for a, b in zip(xpcnn.load_model(link).get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    # (every temporary in the target's folder: the writes', and any probe of the folder before)
    assert len(folders) >= 2 and set(folders) == {os.path.realpath(real)}
    assert [p.name for p in links.iterdir()] == ["m.npz"]
    assert [p.name for p in real.iterdir()] == ["m.npz"]  # no leftovers
    (links / "a.npz").symlink_to("b.npz")
    (links / "b.npz").symlink_to("a.npz")
    with pytest.raises(InputError, match=r"cannot write the (model file|checkpoint) .*a\.npz': "
                                         "Too many levels of symbolic links"):
        write(model, links / "a.npz")
    assert (links / "a.npz").is_symlink()


def test_every_atomic_writer_and_the_check_before_it_follow_a_symlink(tmp_path):
    """files.atomic_file (ONNX exports and downloads too) writes a link's target and keeps the
    link; checks.output_file, run before any work, checks the target's folder (was: the
    link's, so that a run failed at its first save)."""
    from xpcnn import checks, files

    link, target = tmp_path / "out.onnx", tmp_path / "real" / "out.onnx"
    (tmp_path / "real").mkdir()
    link.symlink_to(target)
    with files.atomic_file(link) as f:
        f.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    (tmp_path / "plain").write_text("a file, not a folder")
    (tmp_path / "bad.onnx").symlink_to(tmp_path / "plain" / "sub" / "out.onnx")
    with pytest.raises(InputError, match=r"cannot write the export .*bad\.onnx' in "
                                         r".*plain'.*not a folder"):
        checks.output_file(tmp_path / "bad.onnx", "the export")


# -- the property ------------------------------------------------------------------------------

SIZES = st.sampled_from([0, 1, 7, 100, 5000, 2**21])
METHODS = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])


@st.composite
def edited_files(draw, data: bytes) -> tuple[bytes, bool]:
    """A file built from ``data`` by adding, removing, resizing and recompressing entries, and
    whether only the compression changed (then it must load as it was)."""
    entries = {k: (v, zipfile.ZIP_DEFLATED) for k, v in members(data).items()}
    names = sorted(entries)
    only_compression = True
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["add", "remove", "resize", "recompress"]))
        name = draw(st.sampled_from(names))
        if op == "recompress" or name not in entries:
            if name in entries:
                entries[name] = (entries[name][0], draw(METHODS))
            continue
        only_compression = False
        if op == "remove":
            del entries[name]
        elif op == "add":
            new = draw(st.sampled_from(["layer1.0", "layer6.1", "layer1.9", "layer12.0",
                                        "slot.m.0", "junk", "__config__"]))
            dtype = draw(st.sampled_from([np.float32, np.float64, np.uint8]))
            entries[f"{new}_{len(entries)}.npy" if new == "junk" else f"{new}.npy"] = (
                npy(np.zeros(draw(SIZES), dtype)), draw(METHODS))
        else:  # resize: the same entry, another number of values
            arr = np.load(io.BytesIO(entries[name][0]))
            size = draw(SIZES)
            entries[name] = (npy(np.resize(arr.reshape(-1), size)), draw(METHODS))
    return pack(entries), only_compression


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_model_files_load_correctly_or_are_refused_within_memory(saved, tmp_path, data):
    model, original = saved
    blob, only_compression = data.draw(edited_files(original))
    path = tmp_path / "edited.npz"
    path.write_bytes(blob)
    result, peak = measured_load(path)
    # The configuration entry is capped on its own (MAX_CONFIG_BYTES, read and copied).
    limit = 8 * weights_bytes(model) + 2 * MAX_CONFIG_BYTES + 2**20
    assert peak < limit, f"{peak} bytes to load a {len(blob)}-byte file"
    if only_compression:
        assert not isinstance(result, DataFormatError), result
    if not isinstance(result, DataFormatError):
        for a, b in zip(model.get_weights(), result.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert [type(la) for la in result.layers] == [type(la) for la in model.layers]


def test_a_device_or_a_pipe_is_never_replaced_by_a_file(tmp_path):
    """Model files, weights, exports and checkpoints are written by an atomic rename, which put
    a regular file in the place of a FIFO (or, run as root, of /dev/null): refused by name
    before any work, the pipe left as it was; a figure, written in place, may go there."""
    import stat

    from xpcnn.files import atomic_file

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    model = xpcnn.Sequential([Dense(2)], input_shape=(3,), seed=0)
    model.compile()
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    writes = {"save": lambda: model.save(pipe), "save_weights": lambda: model.save_weights(pipe),
              "checkpoint": lambda: model.fit(x, y, epochs=1, verbose=0, checkpoint=pipe)}
    for name, write in writes.items():
        with pytest.raises(InputError, match=r"exists and is not a regular file \(a device or "
                                             r"a pipe\)"):
            write()
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode), name
    with pytest.raises(FileExistsError, match="is not a regular file: not replaced"), \
            atomic_file(pipe):
        pass
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and model.optimizer.iterations == 0


def test_a_path_ending_in_a_separator_names_a_folder_and_writes_no_file(tmp_path):
    """``save("runs/")`` wrote a file named ``runs``, and ``export("notes.txt/")`` replaced that
    file (the trailing "/" dropped by realpath): refused, as open() refuses it, nothing
    written or replaced."""
    from xpcnn.files import atomic_file

    model = xpcnn.Sequential([Dense(2)], input_shape=(3,), seed=0)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    for path in (f"{tmp_path}/runs/", f"{notes}/"):
        for write in (model.save, model.save_weights):
            with pytest.raises(InputError, match=r"ends in '/', so it names a folder"):
                write(path)
        with pytest.raises(IsADirectoryError, match="names a folder: not written"), \
                atomic_file(path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert notes.read_text() == "keep"


def test_a_file_claiming_huge_images_for_an_average_pool_loads_without_allocating_them(
        tmp_path):
    """Files may claim up to MAX_SAMPLE_VALUES values a sample (2**31: a model that large
    saves, so it loads); the size check builds the layers on trial, and an AvgPool2D's table
    of window counts, (1, H, W, 1) in float64, would have taken 16 GiB at the claim's top
    before the check refused or passed it. Now that table is made at the layer's first pass."""
    model = xpcnn.Sequential([AvgPool2D(2), Flatten(), Dense(2)], seed=0)
    model.build((4, 4, 1))
    path = tmp_path / "pool.npz"
    model.save(path)
    data = dict(np.load(path))
    config = decode_json(data[CONFIG_KEY], "pool.npz")
    config["input_shape"] = [8_000, 8_000, 1]  # (Dense's kernel then disagrees: refused; its
    # count table would take 512 MiB, a test that fails rather than takes the machine down)
    data[CONFIG_KEY] = encode_json(config)
    np.savez(path, **data)
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="needs 32000002 weight values"):
            xpcnn.load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated while checking the file"
    pool = AvgPool2D(3, strides=2, padding="same")
    pool.build((7, 5, 2))
    x = np.arange(70.0).reshape(1, 7, 5, 2)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    real = np.pad(np.ones_like(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.array([[[(padded[0, i:i + 3, j:j + 3].sum((0, 1)) / real[0, i:i + 3, j:j + 3]
                        .sum((0, 1))) for j in range(0, 5, 2)] for i in range(0, 7, 2)]])
    np.testing.assert_allclose(pool(x.astype(np.float32)), want, rtol=1e-6)


def test_batch_norm_momentum_advice_is_given_where_written_not_at_each_load(tmp_path):
    """BatchNorm2D(momentum > 0.5) warns (Keras' convention ported as it is) where the user's
    code sets it; a file, a configuration or a copy that holds the setting does not warn again,
    as the Conv2D argument-order and channels-first warnings do not."""
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.warns(RuntimeWarning, match="momentum 0.9"):
        bn = BatchNorm2D(momentum=0.9)
    model = xpcnn.Sequential([xpcnn.Input((4, 4, 2)), bn, Flatten(), Dense(3)], seed=0)
    model.compile()
    file, checkpoint = tmp_path / "m.npz", tmp_path / "c.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=1, verbose=0, checkpoint=checkpoint)
        model.save(file)
        loaded = xpcnn.load_model(file)
        load_checkpoint(checkpoint)
        xpcnn.Sequential.from_config(model.get_config())
        BatchNorm2D.from_config(bn.get_config())
        bn.unbuilt_copy()
        loaded.load_weights(file)
    assert loaded.layers[0].momentum == 0.9
    with pytest.warns(RuntimeWarning, match="momentum 0.95"):  # (the user's code again)
        loaded.layers[0].momentum = 0.95


def _gate_class(module: str, factor: float) -> type:
    """A user's layer class ``Gate`` (multiplying by ``factor``) as ``module`` defines it: two
    modules may each define one."""
    from xpcnn.layers import Layer

    class Gate(Layer):
        def forward(self, x, training=False, options=None):
            return x * factor

        def backward(self, dy, options=None):
            return dy * factor

    Gate.__module__, Gate.__qualname__ = module, "Gate"
    return Gate


def test_user_layer_classes_of_one_name_each_load_as_themselves(tmp_path):
    """Two user layer classes of one name from two modules (blocks.Gate, heads.Gate): a file
    records each one's module and qualified name, so each loads as itself (was: both loaded as
    the one defined last, silently predicting something else). load_weights into a model whose
    two are swapped is refused; and a file whose class is not defined here loads as the class
    of its name only where the file holds no other class of that name (with a warning)."""
    blocks_gate, heads_gate = _gate_class("blocks", 0.5), _gate_class("heads", 3.0)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    model = xpcnn.Sequential([Dense(5), blocks_gate(), Dense(4), heads_gate(), Softmax()], seed=0)
    model.compile(optimizer="sgd")
    model.build((6,))
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert [type(la) for la in loaded.layers][1::2] == [blocks_gate, heads_gate]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    save_checkpoint(model, tmp_path / "c.npz")  # (a checkpoint's model too)
    assert [type(la) for la in load_checkpoint(tmp_path / "c.npz").model.layers][1:4:2] == [
        blocks_gate, heads_gate]
    swapped = xpcnn.Sequential([Dense(5), heads_gate(), Dense(4), blocks_gate(), Softmax()])
    with pytest.raises(DataFormatError, match=r"another architecture: its layer 1 is a "
                                              r"blocks\.Gate, this model's is a heads\.Gate"):
        swapped.load_weights(tmp_path / "m.npz")
    # a file of blocks.Gate alone, loaded where blocks.Gate is not defined: heads.Gate, warned
    lone = xpcnn.Sequential([Dense(5), blocks_gate(), Dense(4), Softmax()], seed=0)
    lone.build((6,))
    lone.save(tmp_path / "lone.npz")
    config = decode_json(np.load(tmp_path / "lone.npz")[CONFIG_KEY], "lone.npz")
    assert config["layers"][1]["module"] == "blocks" and "module" not in config["layers"][0]
    for name in ("lone.npz", "m.npz"):
        entries = {k: (v, zipfile.ZIP_STORED) for k, v in
                   members((tmp_path / name).read_bytes()).items()}
        config = decode_json(np.load(io.BytesIO(entries["__config__.npy"][0])), name)
        config["layers"][1]["module"] = "gone"
        entries["__config__.npy"] = (npy(encode_json(config)), zipfile.ZIP_STORED)
        (tmp_path / f"gone_{name}").write_bytes(pack(entries))
    with pytest.warns(UserWarning, match=r"layer 1 was saved as a gone\.Gate, which is not "
                                         r"defined here; it loads as a heads\.Gate"):
        assert type(xpcnn.load_model(tmp_path / "gone_lone.npz").layers[1]) is heads_gate
    with pytest.raises(DataFormatError, match=r"layer 1 is of class gone\.Gate, which is not "
                                              r"defined here, and the file holds other classes "
                                              r"named 'Gate' too \(heads\.Gate\).*import\) "
                                              r"gone\.Gate"):
        xpcnn.load_model(tmp_path / "gone_m.npz")


def test_two_distinct_user_classes_no_file_can_tell_apart_are_refused_at_save(tmp_path):
    """Two distinct classes of the same module and qualified name (one function making a class
    twice) cannot be told apart by a file: save refuses them, naming both layers, and writes
    nothing."""
    model = xpcnn.Sequential([Dense(5), _gate_class("twice", 0.5)(), Dense(4),
                              _gate_class("twice", 3.0)(), Softmax()])
    model.build((6,))
    with pytest.raises(InputError, match=r"layers 1 and 3 are of two distinct classes, both "
                                         r"twice\.Gate"):
        model.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_a_user_layer_class_named_with_an_underscore_loads(tmp_path):
    """A user's layer class named "_Scale" (a private helper's style) loads from its file and
    checkpoint (was: saved, then refused at every load as an unknown type)."""
    from xpcnn.layers import Layer

    class _Scale(Layer):
        def forward(self, x, training=False, options=None):
            return x * 2.0

        def backward(self, dy, options=None):
            return dy * 2.0

    model = xpcnn.Sequential([Dense(5), _Scale(), Dense(4), Softmax()], seed=0)
    model.compile(optimizer="sgd")
    model.build((6,))
    model.save(tmp_path / "m.npz")
    save_checkpoint(model, tmp_path / "c.npz")
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    for name in ("m.npz", "c.npz"):
        loaded = xpcnn.load_model(tmp_path / name)
        assert type(loaded.layers[1]) is _Scale
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_an_undefined_user_class_at_load_says_to_define_or_import_it(tmp_path):
    """A file naming a user's layer or model class that is not defined where it loads says
    to define (or import) it first, where it was saved from, and the classes known, as a user's
    loss or optimiser does (was: a bare "unknown layer type 'Scale'")."""
    model = xpcnn.Sequential([Dense(4), _gate_class("mylib.blocks", 2.0)(), Softmax()])
    model.build((6,))
    model.save(tmp_path / "m.npz")
    entries = {k: (v, zipfile.ZIP_STORED) for k, v in
               members((tmp_path / "m.npz").read_bytes()).items()}
    config = decode_json(np.load(io.BytesIO(entries["__config__.npy"][0])), "m.npz")
    for i, edit in enumerate(({"layers": [config["layers"][0], {
            **config["layers"][1], "class": "NeverDefinedGate", "qualname": "NeverDefinedGate"},
            config["layers"][2]]}, {"class": "NeverDefinedNet"})):
        entries["__config__.npy"] = (npy(encode_json({**config, **edit})), zipfile.ZIP_STORED)
        (tmp_path / f"e{i}.npz").write_bytes(pack(entries))
    with pytest.raises(DataFormatError, match=r"unknown layer type 'NeverDefinedGate' \(mylib"
                                              r"\.blocks\.NeverDefinedGate where it was saved\): "
                                              r"define \(or import\) a user's layer class before "
                                              r"loading a file that names it; known: \[.*'Dense'"):
        xpcnn.load_model(tmp_path / "e0.npz")
    with pytest.raises(DataFormatError, match=r"unknown model class 'NeverDefinedNet': define "
                                              r"\(or import\) a user's model class before "
                                              r"loading a file that names it; known: \[.*"
                                              r"'Sequential'"):
        xpcnn.load_model(tmp_path / "e1.npz")


def test_a_model_subclass_with_get_config_alone_is_refused_for_its_from_config(tmp_path):
    """A model subclass whose get_config() gives its own setting but that inherits
    Sequential.from_config is refused at save for what is missing, from_config (was: told its
    get_config() "does not give" the setting it gives)."""

    class Tempered(xpcnn.Sequential):
        def __init__(self, layers=None, temperature=1.0, **kwargs):
            super().__init__(layers, **kwargs)
            self.temperature = temperature

        def get_config(self):
            return {**super().get_config(), "temperature": self.temperature}

    model = Tempered([Dense(4), Softmax()], temperature=2.0)
    model.build((6,))
    with pytest.raises(InputError) as refused:
        model.save(tmp_path / "m.npz")
    message = str(refused.value)
    assert "its get_config() gives them, but the from_config it inherits from Sequential " \
           "passes only the layers, device, seed, dtype and name on" in message
    assert "does not give" not in message and "define get_config()" not in message
    assert "define a classmethod from_config(config, layers, device)" in message
    assert not (tmp_path / "m.npz").exists()


def test_from_config_of_get_config_keeps_user_layer_classes_of_one_name_apart():
    """``type(model).from_config(model.get_config())``, Keras' in-memory copy (which the
    refusal to pickle a model recommends), made two user layer classes of one name
    (blocks.Gate, heads.Gate) both the one defined last, silently predicting something else.
    Now get_config records each one's module and qualified name, as files do, and from_config
    makes each as itself (Sequential's and Model's from_config alike)."""
    blocks_gate, heads_gate = _gate_class("blocks", 0.5), _gate_class("heads", 3.0)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    model = xpcnn.Sequential([Dense(5), blocks_gate(), Dense(4), heads_gate(), Softmax()], seed=0)
    model.build((6,))
    config = model.get_config()
    assert [(s.get("module"), s.get("qualname")) for s in config["layers"]] == [
        (None, None), ("blocks", "Gate"), (None, None), ("heads", "Gate"), (None, None)]
    for copied in (type(model).from_config(config), xpcnn.Model.from_config(config)):
        assert [type(la) for la in copied.layers][1::2] == [blocks_gate, heads_gate]
        copied.set_weights(model.get_weights())
        np.testing.assert_array_equal(copied.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_user_layer_setting_changed_in_code_gets_no_setting_hint_at_load_weights(tmp_path):
    """load_weights of a model file whose user's layer has another value of a plain attribute
    of its own (set in code: another model) is refused without the checkpoint's advice to
    declare it a ``Setting``: following it would make load_weights take files of other
    configurations without a word. (A checkpoint, a run's file where a callback may have
    changed it, still gives it: test_resume.)"""
    from xpcnn.layers import Layer

    class Gain(Layer):
        def __init__(self, k=2.0, name=None):
            super().__init__(name)
            self.k = k

        def get_config(self):
            return {**super().get_config(), "k": self.k}

        def forward(self, x, training=False, options=None):
            return x * self.k

        def backward(self, dy, options=None):
            return dy * self.k

    def make(k):
        model = xpcnn.Sequential([Dense(4), Gain(k), Dense(3), Softmax()], input_shape=(5,),
                                 seed=0)
        model.compile(optimizer="sgd")
        return model

    make(2.0).save(tmp_path / "m.npz")
    with pytest.raises(DataFormatError, match=r"another architecture: its layer 1 is "
                                              r"Gain\(k=2\.0\), this model's is Gain\(k=3\.0\)$"):
        make(3.0).load_weights(tmp_path / "m.npz")


_GATE_SOURCE = '''
import numpy as np
from xpcnn.layers import Layer


class Gate(Layer):
    weight_names = ("w",)

    def _build(self, input_shape, rng):
        self._param("w", np.linspace(0.5, 1.5, input_shape[-1]))
        return input_shape

    def forward(self, x, training=False, options=None):
        if training:
            self._x = x
        return x * self.params["w"]

    def backward(self, dy, options=None):
        self.grads["w"] = self.xp.sum(dy * self._x, axis=0)
        return dy * self.params["w"]
'''

_MODEL_SOURCE = '''
import sys
import warnings

import numpy as np

import xpcnn
from xpcnn.layers import Dense, Softmax

warnings.simplefilter("error")  # (a warning that the file's class loads as another fails)
x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
y = np.arange(8) % 3


def make(gate):
    model = xpcnn.Sequential([Dense(4), gate, Dense(3), Softmax()], input_shape=(6,), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    return model
'''


def test_a_class_saved_from_a_scripts_main_loads_as_the_class_a_module_defines(tmp_path):
    """A script defining its layer class (``__main__.Gate``) saves a model, a checkpoint and
    a run's checkpoint; another script imports that class from a module (``gates.Gate``):
    the files load as it, without a warning (one class, the script's code moved to a module),
    with the same predictions, load_weights and a resumed fit taking them too."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "gates.py").write_text(_GATE_SOURCE)
    (tmp_path / "save_main.py").write_text(_GATE_SOURCE + _MODEL_SOURCE + '''
model = make(Gate())
model.fit(x, y, epochs=1, batch_size=4, verbose=0, checkpoint="run.npz")
model.save("m.npz")
np.save("predicted.npy", model.predict(x, verbose=0))
''')
    (tmp_path / "load_import.py").write_text(_MODEL_SOURCE + '''
from gates import Gate

loaded = xpcnn.load_model("m.npz")
assert type(loaded.layers[1]) is Gate, type(loaded.layers[1])
np.testing.assert_array_equal(loaded.predict(x, verbose=0), np.load("predicted.npy"))
into = make(Gate())
into.load_weights("m.npz")
np.testing.assert_array_equal(into.predict(x, verbose=0), np.load("predicted.npy"))
resumed = make(Gate())
resumed.fit(x, y, epochs=1, batch_size=4, verbose=0, checkpoint="run.npz", resume=True)
np.testing.assert_array_equal(resumed.predict(x, verbose=0), np.load("predicted.npy"))
print("loaded as", type(loaded.layers[1]).__module__)
''')
    # (the xpcnn under test, wherever it is imported from)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(xpcnn.__file__).resolve().parents[1]), str(tmp_path)])}
    for script in ("save_main.py", "load_import.py"):
        done = subprocess.run([sys.executable, script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    config = decode_json(np.load(tmp_path / "m.npz")[CONFIG_KEY], "m.npz")
    assert (config["layers"][1].get("module"), config["layers"][1].get("qualname")) == (
        "__main__", "Gate")
    assert done.stdout.strip() == "loaded as gates"


# -- the optimiser's rate and step count ---------------------------------------------------------


def _rate_model(optimizer) -> xpcnn.Sequential:
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], dtype="float64", seed=0)
    model.compile(loss="cross_entropy", optimizer=optimizer)
    return model


_RATE_DATA = (np.random.default_rng(1).standard_normal((24, 2, 2, 1)),
              np.random.default_rng(2).integers(0, 3, 24))


def test_a_model_file_loads_the_rate_set_on_a_schedule_and_the_schedule_goes_on(tmp_path):
    """A rate set with optimizer.lr on a schedule is the loaded optimiser's rate, and the
    schedule goes on from its place: the file keeps the step count with the factor, as a
    checkpoint does and as Keras' file keeps the optimiser's iterations (was: the factor alone,
    applied at step 0: 0.8 loaded where 0.2 was set, the factor times the schedule's first
    rate); the next steps' rates are those the saved model would have used."""
    from xpcnn import optim

    model = _rate_model(optim.Adam(optim.StepDecay(0.1, 3, 0.5)))
    model.fit(*_RATE_DATA, epochs=2, batch_size=8, verbose=0)  # (6 steps: 0.025 now)
    model.optimizer.lr = 0.2
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    opt, again = model.optimizer, loaded.optimizer
    assert (again.lr, again.iterations, again.lr_factor) == (0.2, 6, opt.lr_factor)
    assert again.get_config() == opt.get_config() and not again.slots  # (its state afresh)
    rates = []
    for o in (opt, again):
        rates.append([])
        for _ in range(5):
            rates[-1].append(o.lr)
            o.iterations += 1
    assert rates[0] == rates[1] and rates[0][3] == 0.1  # (the schedule's next halving)


def test_a_model_file_keeps_the_rate_reduce_lr_on_plateau_left_on_a_decayed_schedule(tmp_path):
    """(was: the loaded rate was 39 times the trained one, the cosine's start scaled)"""
    from xpcnn import optim
    from xpcnn.callbacks import ReduceLROnPlateau

    model = _rate_model(optim.SGD(optim.CosineDecay(0.1, 30, min_lr=1e-4)))
    model.fit(*_RATE_DATA, epochs=9, batch_size=8, verbose=0,
              callbacks=[ReduceLROnPlateau("loss", 0.5, 0, min_delta=10.0)])
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").optimizer.lr == model.optimizer.lr < 1e-4
    save_checkpoint(model, tmp_path / "c.npz")  # (load_model of a checkpoint: the same)
    from_checkpoint = xpcnn.load_model(tmp_path / "c.npz").optimizer
    assert (from_checkpoint.lr, from_checkpoint.iterations) == (model.optimizer.lr, 27)


def test_a_model_file_with_a_bad_step_count_is_refused(tmp_path):
    """compile's iterations is checked as lr_factor is: a whole number >= 0, else the file is
    named as corrupt; a file without it (written before it was kept) loads at step 0."""
    from xpcnn import optim
    from xpcnn.saving.npz import decode_json, write_npz_atomic

    model = _rate_model(optim.SGD(optim.StepDecay(0.1, 3, 0.5)))
    model.fit(*_RATE_DATA, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    config = decode_json(arrays[CONFIG_KEY], str(path))
    assert config["compile"]["iterations"] == 3 and "lr_factor" not in config["compile"]
    for bad in (-1, 2.0, True, "3", None):
        config["compile"]["iterations"] = bad
        write_npz_atomic(path, {**arrays, CONFIG_KEY: encode_json(config)})
        with pytest.raises(DataFormatError, match=rf"invalid model configuration: compile "
                                                  rf"iterations is {bad!r}, expected a whole "
                                                  "number >= 0"):
            xpcnn.load_model(path)
    del config["compile"]["iterations"]
    write_npz_atomic(path, {**arrays, CONFIG_KEY: encode_json(config)})
    assert xpcnn.load_model(path).optimizer.iterations == 0


def test_a_loaded_models_optimiser_takes_new_settings_and_refuses_a_schedule_by_its_step(
        tmp_path):
    """A loaded model's optimiser has its step count and no slots: its settings (momentum,
    nesterov) may change before it trains, as before the file kept the step count (was:
    refused, "its state and a captured step are made for it", neither of which it had), and
    train as a new optimiser's would; once it has trained they are fixed. A schedule set on it
    would start at the step loaded, not 0: refused, naming that and a new compile."""
    from xpcnn import optim

    model = _rate_model(optim.SGD(0.1, momentum=0.9))
    model.fit(*_RATE_DATA, epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    opt = loaded.optimizer
    assert (opt.iterations, opt.slots) == (3, {})
    opt.momentum, opt.nesterov = 0.5, True
    twin = xpcnn.load_model(tmp_path / "m.npz")
    twin.compile(loss="cross_entropy", optimizer=optim.SGD(0.1, momentum=0.5, nesterov=True))
    for m in (loaded, twin):
        m.fit(*_RATE_DATA, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"^SGD's momentum cannot change once it has trained"):
        opt.momentum = 0.7
    fresh = xpcnn.load_model(tmp_path / "m.npz").optimizer
    for set_it in (lambda s: setattr(fresh, "lr", s), lambda s: setattr(fresh, "schedule", s)):
        with pytest.raises(InputError, match=r"^cannot set the learning rate to a schedule "
                                             r"\(CosineDecay\) on this SGD, which is at step 3 "
                                             r"\(a loaded model's optimiser goes on from the "
                                             r"step its file kept\): the new schedule would "
                                             r"start at its step 3, not 0. Compile with a new "
                                             r"optimiser .* set a number"):
            set_it(optim.CosineDecay(0.05, 100))
    fresh.lr = 0.05
    assert fresh.lr == 0.05 and isinstance(fresh.schedule, optim.Constant)


# -- Keras' file names and saving keywords ---------------------------------------------------


@pytest.mark.parametrize("name", ["m.keras", "w.weights.h5", "m.h5", "m.hdf5", "M.KERAS"])
def test_xpcnns_writers_refuse_keras_file_names_before_any_work(tmp_path, name):
    """``model.save("m.keras")``, ``save_weights("w.weights.h5")`` and
    ``ModelCheckpoint("save_at_{epoch}.keras")`` wrote xpcnn's .npz under Keras' names, which
    Keras then failed to read (H17's f1_save_suffix.py); refused, saying so and what to give."""
    model = tiny_model()
    path = tmp_path / name
    stem, suffix = name.rsplit(".", 1)
    said = (rf" {str(path)!r} ends in '\.{suffix}', as Keras' files are named: xpcnn writes "
            r"its own \.npz files, which Keras does not read; give a name ending in \.npz "
            rf"\({str(tmp_path / stem) + '.npz'!r}, say\) or any other name$")
    for write, what in ((model.save, "the model file"), (model.save_weights, "the weights file")):
        with pytest.raises(InputError, match=f"^{what}" + said):
            write(path)
    template = str(tmp_path / ("save_at_{epoch}." + suffix))
    with pytest.raises(InputError, match=r"^ModelCheckpoint filepath .* ends in"):
        xpcnn.callbacks.ModelCheckpoint(template)
    with pytest.raises(InputError, match=r"^ModelCheckpoint filepath .* ends in"):
        xpcnn.callbacks.ModelCheckpoint(template, save_weights_only=True)
    with pytest.raises(InputError, match="^checkpoint" + said):
        xpcnn.callbacks.BackupAndRestore(path)
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, int)
    with pytest.raises(InputError, match="^checkpoint" + said):
        model.fit(x, y, checkpoint=path, verbose=0)
    assert os.listdir(tmp_path) == [] and model.optimizer.iterations == 0
    for other in ("m.npz", "no_suffix", "m.keras.npz", "m.h5x"):  # (any other name: written)
        model.save(tmp_path / other)
        model.save_weights(tmp_path / ("w" + other))
    assert len(os.listdir(tmp_path)) == 8


def test_a_keras_named_file_is_refused_by_the_command_line_before_training_and_an_old_one_resumes(
        tmp_path, capsys):
    """``xpcnn train --save model.h5`` trained the whole run, then its save was refused and the
    model lost (review R5): refused as the flags are checked, before any data is read. A
    checkpoint written under such a name before the refusal existed (an old run's) resumes."""
    from xpcnn.cli import main

    assert main(["train", "--save", str(tmp_path / "model.h5"), "--epochs", "1"]) == 2
    assert ("argument --save: " + repr(str(tmp_path / "model.h5")) + " ends in '.h5', as "
            "Keras' files are named") in capsys.readouterr().err
    model = tiny_model()
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, int)
    model.fit(x, y, checkpoint=tmp_path / "old.npz", epochs=1, verbose=0)
    os.rename(tmp_path / "old.npz", tmp_path / "old.h5")
    resumed = tiny_model()
    resumed.fit(x, y, checkpoint=tmp_path / "old.h5", resume=True, epochs=2, verbose=0)
    assert resumed.optimizer.iterations == 2  # (1 from the file, 1 more)


def test_keras_saving_keywords_at_their_defaults_are_taken(tmp_path):
    """Keras 3's ``save(path, overwrite=True)``, ``save_weights(path, overwrite=True)``,
    ``load_weights(path, skip_mismatch=False)`` and ``load_model(path, custom_objects=None,
    compile=True, safe_mode=True)`` were a bare TypeError (H17's f3_saving_kwargs.py)."""
    model = tiny_model()
    path = tmp_path / "m.npz"
    model.save(path, overwrite=True)
    model.save(path, True, None)  # (Keras' positional order: filepath, overwrite, zipped)
    model.save(path, zipped=True)
    model.save_weights(tmp_path / "w.npz", overwrite=True, max_shard_size=None)
    model.load_weights(tmp_path / "w.npz", skip_mismatch=False)
    for kept in (None, {}, {"Dense": Dense}, {"SGD": xpcnn.optim.SGD}):  # (the classes it
        xpcnn.load_model(path, custom_objects=kept, compile=True, safe_mode=True)  # finds)
    assert xpcnn.load_model(path, compile=False, safe_mode=True).optimizer is None


def test_other_values_of_keras_saving_keywords_are_refused_naming_xpcnns_way(tmp_path):
    model = tiny_model()
    path = tmp_path / "m.npz"
    with pytest.raises(InputError, match=r"^save's overwrite must be True or False, got 'no'"):
        model.save(path, overwrite="no")
    with pytest.raises(InputError, match=r"^save\(zipped=False\): Keras' folder form; xpcnn "
                                         r"writes one \.npz file"):
        model.save(path, zipped=False)
    with pytest.raises(InputError, match=r"^save_weights\(max_shard_size=5\): xpcnn writes "
                                         r"the weights as one file, never sharded"):
        model.save_weights(path, max_shard_size=5)
    assert os.listdir(tmp_path) == []
    model.save(path, overwrite=False)  # (no file there: written, as Keras does; review R5)
    model.save_weights(tmp_path / "w.npz", overwrite=False)
    with pytest.raises(InputError, match=r"^save\(overwrite=False\): Keras then asks before "
                                         r"replacing a file; xpcnn's save always replaces it, "
                                         r"atomically .*: to keep a file, check "
                                         r"os\.path\.exists\(path\) first"):
        model.save(path, overwrite=False)
    with pytest.raises(InputError, match=r"^save_weights\(overwrite=False\): "):
        model.save_weights(tmp_path / "w.npz", overwrite=False)
    with pytest.raises(InputError, match=r"^load_model\(custom_objects=\{'Gate': 1\}\): xpcnn "
                                         r"finds the classes a file names by their names, "
                                         r"each registered where it is defined .*: define or "
                                         r"import them before load_model and leave "
                                         r"custom_objects out"):
        xpcnn.load_model(path, custom_objects={"Gate": 1})
    with pytest.raises(InputError, match=r"^load_model\(safe_mode=False\): .*xpcnn's files "
                                         r"hold none, and load without pickle"):
        xpcnn.load_model(path, safe_mode=False)
    before = model.get_weights()
    with pytest.raises(InputError, match=r"^load_weights\(skip_mismatch=True\): xpcnn's "
                                         r"load_weights loads every layer or none, .*: "
                                         r"model\.get_layer\(name\)\.set_weights\(xpcnn\."
                                         r"load_model\(path\)\.get_layer\(name\)\."
                                         r"get_weights\(\)\)$"):
        model.load_weights(path, skip_mismatch=True)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # (the way named, run: a model with a layer more takes tiny_model's "dense")
    wider = xpcnn.Sequential([Flatten(name="flatten"), Dense(2, name="dense"), Dense(3)],
                             input_shape=(2, 2, 1), seed=5)
    wider.get_layer("dense").set_weights(xpcnn.load_model(path).get_layer("dense").get_weights())
    for a, b in zip(wider.get_layer("dense").get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def _mlp(dropout: bool, extra: bool = False) -> xpcnn.Model:
    """Keras' guide's three-layer MLP (keras.io's "Save, serialize and export" guide), with a
    Dropout or a Dense more."""
    inputs = xpcnn.Input((12,))
    x = Dense(8, activation="relu", name="dense_1")(inputs)
    x = Dense(8, activation="relu", name="dense_2")(x)
    if dropout:
        x = xpcnn.layers.Dropout(0.5)(x)
    if extra:
        x = Dense(8, name="dense_3")(x)
    return xpcnn.Model(inputs, Dense(4, name="predictions")(x), seed=int(dropout))


def test_load_weights_of_another_architecture_names_set_weights_where_it_works(tmp_path):
    """A file of the model with a Dropout more was refused by load_weights with no way forward
    (H17's s5c_guide.py); still refused, naming the way that loads the weights, which works."""
    path = tmp_path / "drop.npz"
    _mlp(dropout=True).save_weights(path)
    plain = _mlp(dropout=False)
    before = plain.get_weights()
    with pytest.raises(DataFormatError, match=(
            r"holds a model of another architecture: its layer 2 is Dropout\(.*\); its layers "
            r"with weights are this model's, with weights of the same shapes \(it has layers "
            r"without weights more or fewer\): model\.set_weights\(xpcnn\.load_model\("
            + repr(str(path)).replace(".", r"\.") + r"\)\.get_weights\(\)\) loads them$")):
        plain.load_weights(path)
    for a, b in zip(before, plain.get_weights(), strict=True):  # (refused: nothing loaded)
        np.testing.assert_array_equal(a, b)
    plain.set_weights(xpcnn.load_model(path).get_weights())
    for a, b in zip(_mlp(dropout=True).get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = tmp_path / "extra.npz"  # (weights of other shapes or count: no such advice)
    _mlp(dropout=False, extra=True).save_weights(other)
    with pytest.raises(DataFormatError, match="another architecture") as refused:
        plain.load_weights(other)
    assert "set_weights" not in str(refused.value)
    inputs = xpcnn.Input((12,))  # (weights of the same shapes, a layer of other settings: none)
    x = Dense(8, name="dense_1")(inputs)  # (no ReLU fused: another model)
    x = xpcnn.layers.Dropout(0.5)(Dense(8, activation="relu", name="dense_2")(x))
    xpcnn.Model(inputs, Dense(4, name="predictions")(x)).save_weights(other)
    with pytest.raises(DataFormatError, match="another architecture") as refused:
        plain.load_weights(other)
    assert "set_weights" not in str(refused.value)
