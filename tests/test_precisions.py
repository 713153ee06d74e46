"""Precisions beside the everyday float32: where data beyond float16 is refused under
mixed_float16, ml_dtypes' bfloat16 arrays as input and weights, a mixed-precision model on a
backend without its dtype, and a float64 model's precision."""

from __future__ import annotations

import re
import warnings

import array_api_strict
import ml_dtypes
import numpy as np
import pytest

import xpcnn
from xpcnn.errors import DeviceError, InputError, NonFiniteError
from xpcnn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    MaxPool2D,
    Normalization,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
)
from xpcnn.saving import restore_checkpoint, save_checkpoint

BF16 = ml_dtypes.bfloat16


def _model(layers, precision="mixed_float16", dtype="float32"):
    m = xpcnn.Sequential(device="cpu", seed=0, dtype=dtype)
    for la in layers:
        m.add(la)
    m.compile(optimizer="sgd", precision=precision)
    m.build((8, 8, 3))
    return m


def _frames(n=8):
    """16-bit frames that float16 rounds to infinity (from 65520 on, its largest value 65504
    plus half its last step), all of them."""
    rng = np.random.default_rng(0)
    return rng.integers(65520, 65536, (n, 8, 8, 3)).astype(np.uint16), rng.integers(0, 4, n)


# -- mixed_float16: data beyond float16 refused where its values first meet float16 ----------


@pytest.mark.parametrize("first", [
    lambda: [FeatureNorm()], lambda: [Rescaling(1 / 65535)],
    lambda: [Normalization(30000.0, 20000.0)], lambda: [ReLU(), MaxPool2D(1), FeatureNorm()]],
    ids=["featurenorm", "rescaling", "normalization", "relu-pool-featurenorm"])
def test_data_beyond_float16_trains_where_a_float32_normalisation_reads_it_first(first):
    """FeatureNorm normalises in float32, in training and inference alike (was: refused as
    too large for float16, though its output fits), as Rescaling and Normalization do,
    reached directly or through layers passing values on; predict too, before any fit."""
    x, y = _frames()
    m = _model([*first(), Conv2D(4, 3), Flatten(), Dense(4)])
    assert np.isfinite(m.predict(x, verbose=0)).all()
    history = m.fit(x, y, verbose=0).history["loss"]
    assert np.isfinite(history).all() and m.optimizer.iterations == 1
    assert np.isfinite(m.predict(x, verbose=0)).all()


@pytest.mark.parametrize("first", [
    lambda: [RandomFlip()], lambda: [RandomCrop(1)], lambda: [RandomFlip(), Dropout(0.1)],
    lambda: [ReLU(), MaxPool2D(1)], lambda: [BatchNorm2D(momentum=0.5)]],
    ids=["flip", "crop", "flip-dropout", "relu-pool", "batchnorm"])
def test_data_beyond_float16_is_refused_where_it_reaches_a_float16_layer_through_others(first):
    """Augmentations, Dropout, ReLU and pooling pass float32 values on to the Conv2D, which
    reads them in float16 (was: not refused; predict gave inf/NaN, fit failed at step 1); so
    does a BatchNorm2D in inference, whose fresh moving statistics (mean 0, variance 1) hand
    the values on about as they came (predict before any fit gave NaN)."""
    x, y = _frames()
    m = _model([*first(), Conv2D(4, 3), Flatten(), Dense(4)])
    too_large = r"x holds values too large for float16, .*\(nothing was run\)"
    with pytest.raises(NonFiniteError, match=too_large):
        m.fit(x, y, verbose=0)
    with pytest.raises(NonFiniteError, match=too_large):
        m.predict(x, verbose=0)
    assert m.optimizer.iterations == 0


def test_a_functional_batch_read_by_a_normalisation_and_a_conv_is_refused():
    """One path to float16 is enough: the batch read by BatchNorm2D and, through ReLU, by a
    Conv2D."""
    inputs = xpcnn.Input((8, 8, 3))
    a = Conv2D(4, 3)(BatchNorm2D()(inputs))
    b = Conv2D(4, 3)(ReLU()(inputs))
    outputs = Dense(4)(Flatten()(xpcnn.layers.Add()([a, b])))
    m = xpcnn.Model(inputs, outputs, device="cpu")
    m.compile(optimizer="sgd", precision="mixed_float16")
    with pytest.raises(NonFiniteError, match="too large for float16"):
        m.predict(_frames()[0], verbose=0)


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_data_that_float16_rounds_to_its_largest_value_is_taken(device):
    """float16 rounds 65519 (and -65519) to its largest value, 65504: only from 65520 on is a
    value infinite there (was: anything beyond 65504 refused as "would be infinite"); on the
    host and on the device, float and integer data alike. The message still says 65504."""
    if device == "torch":  # (a device array: checked on the device first)
        pytest.importorskip("torch")
        device = pytest.importorskip("array_api_compat.torch")
    m = xpcnn.Sequential([xpcnn.Input((4, 4, 1)), Conv2D(2, 1), Flatten(), Dense(2)],
                         device=device, seed=0)
    m.compile(optimizer="sgd", precision="mixed_float16")
    put = m.backend.asarray if device != "cpu" else np.asarray
    # (int32 on PyTorch, whose min and max take no uint16)
    for dtype in (np.float32, np.uint16 if device == "cpu" else np.int32):
        x = np.zeros((2, 4, 4, 1), dtype)
        x[1, 0, 0, 0] = 65519
        if dtype == np.float32:
            x[0, 1, 1, 0] = -65519.99
        assert np.isfinite(m.predict(put(x), verbose=0)).all()
        x[1, 2, 3, 0] = 65520
        with pytest.raises(NonFiniteError, match=r"x holds values too large for float16, the "
                                                 r"dtype the model computes in \(at most "
                                                 r"65504\), .*sample 1, .*the first is 65520"):
            m.predict(put(x), verbose=0)
    x = np.zeros((2, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = -65520
    with pytest.raises(NonFiniteError, match="sample 0, .*the first is -65520"):
        m.predict(put(x), verbose=0)


def test_data_that_bfloat16_rounds_to_its_largest_value_is_taken():
    """The same half step above bfloat16's largest value (3.3895e38): float32 data below
    3.3962e38 becomes that value, not infinity; from it on, refused."""
    from xpcnn.data.arrays import check_arrays

    largest = float(ml_dtypes.finfo(BF16).max)
    bound = largest + 2.0**119  # (half of its last step, 2**120)
    below = np.nextafter(np.float32(bound), np.float32(0))
    assert np.asarray(below, BF16) == largest and np.isinf(np.asarray(np.float32(bound), BF16))
    m = _model([Conv2D(4, 3), Flatten(), Dense(4)], precision="mixed_bfloat16")
    x = np.zeros((2, 8, 8, 3), np.float32)
    x[1, 0, 0, 0], x[1, 0, 0, 1] = below, -below
    check_arrays(m, x)
    x[1, 0, 0, 2] = bound
    with pytest.raises(NonFiniteError, match=r"too large for bfloat16, .*\(at most 3.3895e\+38"
                                             r"\).*sample 1, .*has 1 "):
        check_arrays(m, x)


# -- ml_dtypes' bfloat16 arrays -----------------------------------------------------------------


def test_bfloat16_arrays_are_taken_as_other_floats():
    """predict, fit, evaluate, set_weights, train_step, a layer called on a batch and
    Normalization.adapt take bfloat16 NumPy arrays (were: refused as not real, or a bare
    NumPy TypeError from isdtype), cast as other floats are."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    xb = x.astype(BF16)
    m = _model([Conv2D(4, 3), Flatten(), Dense(4)], precision="mixed_bfloat16")
    np.testing.assert_array_equal(m.predict(xb, verbose=0),
                                  m.predict(xb.astype(np.float32), verbose=0))
    weights = [w.astype(BF16) for w in m.get_weights()]
    m.set_weights(weights)
    for got, given in zip(m.get_weights(), weights, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, given.astype(np.float32))
    m.fit(xb, y, verbose=0)
    assert np.isfinite(m.evaluate(xb, y, verbose=0)[0])
    loss, _ = m.train_step(m.backend.asarray(xb), m.backend.asarray(y))
    assert np.isfinite(float(loss))
    np.testing.assert_array_equal(np.asarray(ReLU()(xb), np.float32),
                                  np.maximum(xb.astype(np.float32), 0))
    norm = Normalization()
    norm.adapt(xb)
    np.testing.assert_allclose(norm.mean, xb.astype(np.float64).mean(axis=(0, 1, 2)),
                               rtol=1e-6, atol=1e-9)


def test_bfloat16_labels_and_weights_are_taken_as_other_floats():
    """One-hot bfloat16 labels and bfloat16 sample weights, at fit and at the raw
    train_step, and a bfloat16 device batch's check (were: "one-hot y must be floats, got
    dtype bfloat16", or a bare NumPy TypeError from isdtype)."""
    from xpcnn.data.arrays import check_device_images

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    one_hot, weights = np.eye(4, dtype=BF16)[y], np.ones(8, BF16)
    m, plain = (_model([Conv2D(4, 3), Flatten(), Dense(4)]) for _ in range(2))
    m.fit(x, one_hot, sample_weight=weights, verbose=0)
    plain.fit(x, y, verbose=0)
    for a, b in zip(m.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    loss, _ = m.train_step(x, one_hot, sample_weight=weights)
    assert np.isfinite(float(loss))
    assert check_device_images(x.astype(BF16), m.backend) is not None


def test_bfloat16_data_is_checked_as_other_floats():
    """NaN in bfloat16 data is refused, and values beyond float16 under mixed_float16."""
    x = np.full((4, 8, 8, 3), 70000.0, np.float32).astype(BF16)
    m = _model([Conv2D(4, 3), Flatten(), Dense(4)])
    with pytest.raises(NonFiniteError, match="too large for float16"):
        m.predict(x, verbose=0)
    x = np.zeros((4, 8, 8, 3), BF16)
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="NaN or infinite values: sample 2"):
        m.predict(x, verbose=0)
    with pytest.raises(InputError, match="must hold real numbers"):
        m.predict(np.zeros((4, 8, 8, 3), ml_dtypes.float8_e4m3fn), verbose=0)


# -- a mixed precision on a backend without its dtype ---------------------------------------


def test_a_mixed_float16_model_moved_or_loaded_where_float16_is_missing_names_the_way_out(
        tmp_path):
    """array_api_strict has no float16: the error names the precision and the way out (was:
    "the array_api_strict backend has no dtype 'float16'; choose one it supports")."""
    m = _model([Conv2D(4, 3), Flatten(), Dense(4)])
    with pytest.raises(DeviceError, match=r"precision='mixed_float16' computes in float16, .*"
                                          r"compile it with precision='float32' before to\("):
        m.to(array_api_strict)
    assert m.backend.name == "numpy"
    path = tmp_path / "m.npz"
    m.save(path)
    with pytest.raises(DeviceError, match=r"precision='mixed_float16' .*compile=False\) loads "
                                          r"it uncompiled"):
        xpcnn.load_model(path, device=array_api_strict)
    loaded = xpcnn.load_model(path, device=array_api_strict, compile=False)
    loaded.compile(optimizer="sgd")
    assert loaded.precision == "float32"


# -- a float64 model's precision ----------------------------------------------------------------


def test_a_float64_model_says_it_computes_in_float64(tmp_path):
    """compile() and compile(precision="float64") on a float64 model: precision 'float64'
    (was: 'float32', and "float64" refused), in its file too, and before any compile."""
    assert xpcnn.Sequential(dtype="float64").precision == "float64"
    assert xpcnn.Sequential().precision == "float32"
    m = _model([Flatten(), Dense(3)], precision="float32", dtype="float64")
    assert m.precision == "float64" and m._compute_dtype_name == "float64"
    m.compile(precision="float64")
    assert m.precision == "float64"
    assert m.predict(np.ones((2, 8, 8, 3)), verbose=0).dtype == np.float64
    path = tmp_path / "m.npz"
    m.save(path)
    assert xpcnn.load_model(path).precision == "float64"


def test_float64_is_refused_on_a_float32_model_naming_the_models_dtype():
    m = _model([Flatten(), Dense(3)], precision="float32")
    with pytest.raises(InputError, match=r"got 'float64' \(model 'sequential' holds float32 "
                                         r"parameters: .*set by Sequential\(dtype='float64'\)"):
        m.compile(precision="float64")
    assert m.precision == "float32"


def test_older_float64_files_saying_float32_still_load_and_resume(tmp_path):
    """Files written before a float64 model's precision said float64 say 'float32'."""
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3))
    y = np.arange(4) % 3
    m = _model([Flatten(), Dense(3)], precision="float32", dtype="float64")
    m.precision = "float32"  # (as an older xpcnn wrote it)
    m.save(tmp_path / "m.npz")
    save_checkpoint(m, tmp_path / "c.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert loaded.precision == "float64" and loaded.dtype_name == "float64"
    again = _model([Flatten(), Dense(3)], precision="float32", dtype="float64")
    restore_checkpoint(again, tmp_path / "c.npz")
    again.fit(x, y, verbose=0)


# -- mixed_float16's loss scale across compile ---------------------------------------------------


def _scaled_model(optimizer):
    m = xpcnn.Sequential(device="cpu", seed=0)
    for la in [Conv2D(2, 3), BatchNorm2D(), Flatten(), Dense(4)]:
        m.add(la)
    m.compile(optimizer=optimizer, precision="mixed_float16")
    m.build((8, 8, 3))
    m.loss_scale = 2.0**17  # (float16 gradients overflow: the first step lowers the scale)
    return m


def test_compiling_again_with_the_optimizer_it_holds_keeps_the_loss_scale():
    """compile(optimizer=model.optimizer, ..., precision="mixed_float16") again (for other
    metrics, say) kept the optimiser's slots and step count but put the loss scale back to
    2**15 and its good steps to 0, silently: Keras 3's LossScaleOptimizer keeps its scale and
    PyTorch's GradScaler is never reset. The run goes on as one never compiled again does, bit
    for bit; another optimiser, or another precision in between, starts a scale afresh."""
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.integers(0, 4, 4))
               for _ in range(6)]
    reference = _scaled_model(xpcnn.optim.Adam(1e-2))
    with np.errstate(all="ignore"):
        for xb, yb in batches:
            reference.train_on_batch(xb, yb)
        model = _scaled_model(xpcnn.optim.Adam(1e-2))
        for xb, yb in batches[:3]:
            model.train_on_batch(xb, yb)
        opt, scaling = model.optimizer, model._scaling
        scale, good = model.loss_scale, model._good_steps
        assert scale < 2.0**17 and good > 0
        model.compile(optimizer=opt, metrics=["accuracy", "sparse_top_k_categorical_accuracy"],
                      precision="mixed_float16")
        # (the same array: a captured step or another rank may hold it)
        assert model._scaling is scaling and (model.loss_scale, model._good_steps) == (scale,
                                                                                      good)
        assert opt.iterations == 3 and opt.slots
        for xb, yb in batches[3:]:
            model.train_on_batch(xb, yb)
    assert (model.loss_scale, model._good_steps) == (reference.loss_scale,
                                                     reference._good_steps)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        assert np.array_equal(a, b)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2), precision="mixed_float16")  # (a new one)
    assert (model.loss_scale, model._good_steps) == (2.0**15, 0)
    model.loss_scale = 256.0
    model.compile(optimizer=model.optimizer, precision="float32")
    assert model.loss_scale == 1.0
    model.compile(optimizer=model.optimizer, precision="mixed_float16")
    assert (model.loss_scale, model._good_steps) == (2.0**15, 0)
    # (an optimiser assigned, model.optimizer = ..., is another one as in compile: its slots
    # are fresh, and so is its scale; review RD: it kept the last one's, then compile did)
    model.loss_scale = 256.0
    model.optimizer = xpcnn.optim.Adam(1e-2)
    assert (model.loss_scale, model._good_steps) == (2.0**15, 0)
    model.loss_scale = 256.0
    model.compile(optimizer=model.optimizer, precision="mixed_float16")
    assert model.loss_scale == 256.0


_OVERFLOWED = (
    "xpcnn: evaluate's loss is nan under precision 'mixed_float16': where the data and weights "
    "are finite, float16 outputs beyond float16's largest value, 65504, overflowed somewhere in "
    "the model, in the logits or any layer before them (predict warns of its NaN rows; fit's "
    "error names the layer); compile with precision='mixed_bfloat16' (float32's range) or "
    "'float32'")


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16", "float32"])
def test_evaluate_warns_once_where_float16_logits_overflow(precision):
    """Logits near 1e5: beyond float16's 65504, so under mixed_float16 evaluate's loss is NaN
    (as Keras' is) with one warning a call, naming the precision and the way out, from the
    sums it reads at its end (was: no word); bfloat16 and float32 hold them, and do not warn.
    The warning does not say the logits: it cannot tell which layer overflowed."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(16, 8)).astype(np.float32), rng.integers(0, 4, 16)
    model = xpcnn.Sequential([xpcnn.Input((8,)), Dense(4)], seed=0)
    model.compile(optimizer="sgd", precision=precision)
    w, b = model.get_weights()
    model.set_weights([w * 1e5, b])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = model.evaluate(x, y, batch_size=4)  # (4 batches, one warning)
        model.test_on_batch(x, y)
    said = [str(c.message) for c in caught if str(c.message).startswith("xpcnn:")]
    if precision != "mixed_float16":
        assert np.isfinite(loss) and not said
        return
    assert np.isnan(loss) and len(said) == 2
    assert said == [_OVERFLOWED] * 2
    with pytest.warns(RuntimeWarning, match=r"^xpcnn: predict's outputs hold NaN or infinity in "
                                            r"16 of 16 rows \(the first, row 0\) under "
                                            r"precision 'mixed_float16': float16 outputs beyond"):
        out = model.predict(x, verbose=0)  # (was: non-finite rows, silently)
    assert not np.isfinite(out).all(axis=1).any()
    model.set_weights([w, b])  # (in range: no word)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(model.evaluate(x, y)[0])


def test_evaluate_does_not_blame_the_logits_where_an_inner_layer_overflows():
    """A Conv2D's output beyond float16's range, the logits after it NaN: the warning says an
    output somewhere in the model overflowed (was: "float16 logits ... overflowed")."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4, 4, 1)).astype(np.float32), np.arange(8) % 2
    m = xpcnn.Sequential([xpcnn.Input((4, 4, 1)), Conv2D(2, 1), Flatten(), Dense(2)], seed=0)
    m.compile(optimizer="sgd", precision="mixed_float16")
    w = m.get_weights()
    w[0][0, 0, 0, 0] = 1e5
    m.set_weights(w)
    x[0, 0, 0, 0] = 1e3
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        assert np.isnan(m.evaluate(x, y, verbose=0)[0])
    assert [str(c.message) for c in caught if str(c.message).startswith("xpcnn:")] == [
        _OVERFLOWED]


# -- mixed_float16's loss scale in a model file ----------------------------------------------------


def test_a_model_file_keeps_the_float16_loss_scale_and_refuses_a_bad_one(tmp_path):
    """model.save / load_model keep the dynamic loss scale and its good steps, as Keras' file
    keeps its LossScaleOptimizer's (was: 2**15 and 0 again, the next steps overflowing until
    it came back down); load_model of a checkpoint too. A fresh scale is not written, and a
    file without one (written before) loads a fresh one; a bad one is a corrupt file."""
    from xpcnn.errors import DataFormatError
    from xpcnn.saving.npz import CONFIG_KEY, decode_json, encode_json, write_npz_atomic

    m = xpcnn.Sequential([xpcnn.Input((6,)), Dense(3)], seed=0)
    m.compile(optimizer="adam", precision="mixed_float16")
    path = tmp_path / "m.npz"
    m.save(path)
    with np.load(path) as f:
        config = decode_json(f[CONFIG_KEY], str(path))
    assert "loss_scale" not in config["compile"] and "good_steps" not in config["compile"]
    m.train_on_batch(np.ones((2, 6), np.float32), np.zeros(2, int))
    m.save(path)
    loaded = xpcnn.load_model(path)
    assert (loaded.loss_scale, loaded._good_steps) == (2.0**15, 1)  # (one good step)
    m.loss_scale, m._good_steps = 1024.0, 7
    m.save(path)
    save_checkpoint(m, tmp_path / "c.npz")
    for file in (path, tmp_path / "c.npz"):
        loaded = xpcnn.load_model(file)
        assert (loaded.loss_scale, loaded._good_steps, loaded.optimizer.iterations) == (
            1024.0, 7, 1)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    config = decode_json(arrays[CONFIG_KEY], str(path))
    assert (config["compile"]["loss_scale"], config["compile"]["good_steps"]) == (1024.0, 7)

    def load(**fields):
        compiled = {**config["compile"], **fields}
        write_npz_atomic(path, {**arrays, CONFIG_KEY: encode_json({**config,
                                                                   "compile": compiled})})
        return xpcnn.load_model(path)

    for bad in (0, -1.0, 1e39, True, "1024", None):
        with pytest.raises(DataFormatError, match=rf"invalid model configuration: compile "
                                                  rf"loss_scale is {re.escape(repr(bad))}, "
                                                  "expected a number "
                                                  "from 1.175e-38 to 3.403e"):
            load(loss_scale=bad)
    for bad in (-1, 2.0, True, None):
        with pytest.raises(DataFormatError, match=rf"invalid model configuration: compile "
                                                  rf"good_steps is {bad!r}, expected a whole "
                                                  "number >= 0"):
            load(good_steps=bad)
    with pytest.raises(DataFormatError, match=r"compile loss_scale 1024.0 \(good_steps 7\) in a "
                                              r"model without float16 loss scaling \(its "
                                              r"precision is 'mixed_bfloat16'"):
        load(precision="mixed_bfloat16")
    assert load(precision="float32", loss_scale=1, good_steps=0).loss_scale == 1.0
    del config["compile"]["loss_scale"], config["compile"]["good_steps"]
    loaded = load()
    assert (loaded.loss_scale, loaded._good_steps) == (2.0**15, 0)


# -- a float16 overflow inside the model --------------------------------------------------------


@pytest.mark.parametrize("precision", ["mixed_float16", "float32"])
def test_fit_names_float16s_range_where_a_layers_output_overflows(precision):
    """A weight of 1e5 in the first Conv2D: under mixed_float16 its output overflows float16,
    and fit's error names the layer, float16's largest value and the way out (was: the layer
    alone); in float32 (overflowing at 1e38) the layer alone, float16 not in it."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4, 4, 1)).astype(np.float32), np.arange(8) % 2
    m = xpcnn.Sequential([xpcnn.Input((4, 4, 1)), Conv2D(2, 1), Flatten(), Dense(2)], seed=0)
    m.compile(optimizer="sgd", precision=precision)
    w = m.get_weights()
    w[0][0, 0, 0, 0] = 1e5 if precision == "mixed_float16" else 3e38
    m.set_weights(w)
    x[0, 0, 0, 0] = 1e3  # (beyond float16 at 1e5 times)
    with pytest.raises(NonFiniteError) as caught, np.errstate(all="ignore"):
        m.fit(x, y, verbose=0)
    said = str(caught.value)
    assert said.startswith("training stopped at step 1: the loss is nan; the first non-finite "
                           "values appear in the output of layer 'conv2d'")
    if precision == "float32":
        assert said.endswith("'conv2d'")
        return
    assert said.endswith("'conv2d', computed in float16, which holds at most 65504: compile "
                         "with precision='mixed_bfloat16' (float32's range) or 'float32'")
    m.compile(optimizer="sgd", precision="mixed_bfloat16")  # (the way out named)
    m.fit(x, y, verbose=0)
    assert m.optimizer.iterations == 1


# -- Dropout's rate in a 2-byte dtype --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dropout_drops_at_least_the_rate_asked_within_a_step(dtype):
    """The share dropped is the rate rounded up to a multiple of 2**-bits, as the README says
    (was: rounded to the dtype first, to nearest, then up: at 0.9 in bfloat16 it dropped
    0.8984375, below the rate asked); the elements dropped are exactly those whose number is
    below the rate. A rate that rounds up to 1 (above 1 - 2**-bits) is refused."""
    bits = {"float16": 11, "bfloat16": 8}[dtype]
    for rate in [*np.linspace(0.001, 1 - 2.0**-bits, 157).tolist(), 0.3, 0.7, 0.9, 0.99]:
        layer = Dropout(rate)
        layer.build((4, 2**bits), "cpu", dtype=dtype)
        drawn = layer._drawn_rate(layer.dtype)
        assert rate <= drawn < rate + 2.0**-bits and (drawn * 2**bits).is_integer(), rate
    from xpcnn.ops import random

    layer = Dropout(0.9)
    layer.build((64, 256), "cpu", dtype=dtype, rng=np.random.default_rng(3))
    t = layer.dtype
    numbers = random.uniform(layer.xp, np.array([layer.seed, 0], np.int64), (16, 64, 256), t)
    y = layer.forward(np.ones((16, 64, 256), t), training=True)
    np.testing.assert_array_equal(y == 0, np.asarray(numbers, np.float64) < 0.9)
    assert (y == 0).mean() > 0.9
    with pytest.raises(InputError, match=rf"cannot be drawn in {dtype}: .*rounds up to 1"):
        Dropout(1 - 2.0**-(bits + 2)).build((8,), "cpu", dtype=dtype)
