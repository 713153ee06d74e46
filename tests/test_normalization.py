"""Normalization.adapt: per-channel statistics computed from the data, as Keras' adapt."""

import shutil
import tracemalloc

import array_api_strict as xs
import numpy as np
import pytest
from test_resume import InterruptAfter

import xpcnn
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import BatchNorm2D, Conv2D, Dense, Flatten, Normalization, Softmax
from xpcnn.saving import restore_checkpoint
from xpcnn.saving.npz import CONFIG_KEY, decode_json, encode_json


def reference(x):
    """Keras' statistics in NumPy float64 on the whole array: mean and population std over
    every axis but the last (each channel's values contiguous: NumPy sums them pairwise)."""
    values = np.ascontiguousarray(np.asarray(x, np.float64).reshape(-1, x.shape[-1]).T)
    return values.mean(axis=1), values.std(axis=1)


def images(rng, dtype, shape=(30, 5, 4, 3)):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    # (an offset far from 0: a one-pass sum of squares would lose the std to cancellation)
    return (1e3 + rng.standard_normal(shape) * [0.5, 2.0, 7.0]).astype(dtype)


def adapted(data, **kwargs):
    norm = Normalization()
    norm.adapt(data, **kwargs)
    return np.array(norm.mean), np.array(norm.std)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_adapt_gives_numpys_float64_statistics(rng, dtype):
    x = images(rng, dtype)
    mean, std = adapted(x)
    want_mean, want_std = reference(x)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-13)
    np.testing.assert_allclose(std, want_std, rtol=1e-12)


def test_chunks_and_iterables_give_the_whole_arrays_statistics(rng):
    """Chan's combination of chunks: a batch_size that does not divide N, a list of batches
    of uneven sizes (one empty), a generator, against the whole array in one chunk."""
    x = images(rng, np.float64, (61, 3, 2, 3))
    whole = adapted(x)
    parts = [x[:1], x[1:20], x[20:20], x[20:61]]
    for got in (adapted(x, batch_size=7), adapted(parts), adapted(p for p in parts),
                adapted(parts, batch_size=4)):
        for a, b in zip(got, whole, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(whole[1], reference(x)[1], rtol=1e-12)


@pytest.mark.parametrize("batch_size", [None, 7, 1])
def test_data_far_from_zero_keeps_its_precision_in_small_chunks(rng, batch_size):
    """1e9 + N(0, 1): the chunks' means, near 1e9 each, were subtracted in the combination,
    so the std lost ~1e-9 of itself in chunks of 7 samples; shifted by the first sample's
    values, it is as exact as the whole array's. (x - 1e9 is exact: the reference.)"""
    x = 1e9 + rng.standard_normal((300, 8, 8, 2))
    layer = Normalization()
    layer.adapt(x, batch_size=batch_size)
    near = (x - 1e9).reshape(-1, 2)
    np.testing.assert_allclose(np.array(layer.mean) - 1e9, near.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(layer.std, near.std(axis=0), rtol=1e-13)


def test_a_large_uint8_dataset_gets_no_float64_copy(rng):
    """The float64 work is bounded by a chunk: peak allocations stay far below the 12 MB
    that a float64 copy of the 1.5 M values would take."""
    x = rng.integers(0, 256, (2000, 16, 16, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        mean, std = adapted(x, batch_size=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20, peak
    np.testing.assert_allclose(std, reference(x)[1], rtol=1e-12)


def test_adapt_again_starts_afresh(rng):
    norm = Normalization()
    norm.adapt(images(rng, np.uint8))
    y = images(rng, np.float32)
    norm.adapt(y)
    np.testing.assert_allclose(norm.mean, reference(y)[0], rtol=1e-13)
    np.testing.assert_allclose(norm.std, reference(y)[1], rtol=1e-12)


def test_adapt_builds_the_layer_for_the_datas_shape_as_keras(rng):
    """Keras 3's adapt builds the layer: get_weights and set_weights work at once (was: [] and
    "must be built"). A model built for another input, dtype or channel count builds it again
    from the float64 statistics, as an unbuilt layer (not its float32 weights); adapting again
    to other channels, or a call on another shape, starts afresh as before."""
    x = images(rng, np.float32)
    mean, std = reference(x)
    norm = Normalization()
    norm.adapt([x[:10], x[10:]])
    assert norm.built and norm.input_shape == (5, 4, 3)
    got = norm.get_weights()
    np.testing.assert_array_equal(got[0], mean.astype(np.float32))
    np.testing.assert_array_equal(got[1], (std * std).astype(np.float32))
    assert [w.name for w in norm.weights] == ["mean", "variance"]

    model = xpcnn.Sequential([norm, Flatten(), Dense(2)], input_shape=(8, 6, 3), dtype="float64")
    np.testing.assert_allclose(model.get_weights()[0], mean, rtol=1e-15)  # (not float32's)
    assert norm.input_shape == (8, 6, 3)
    other = Normalization()
    other.adapt(x)
    with pytest.raises(InputError, match="3 channel statistics but the input has 5 channels"):
        xpcnn.Sequential([other], input_shape=(5, 4, 5))

    other.adapt(x[..., :2])  # (built alone: other channels taken)
    assert other.input_shape == (5, 4, 2) and other.get_weights()[0].shape == (2,)
    assert other(x[:2, :3, :3, :2]).shape == (2, 3, 3, 2)  # (a call on another shape)
    other.set_weights([np.zeros(2, np.float32), np.full(2, 4.0, np.float32)])
    np.testing.assert_allclose(other(x[:1, :3, :3, :2]), x[:1, :3, :3, :2] / 2, rtol=1e-6)


def test_a_refused_call_leaves_an_adapted_layer_as_it_was(rng):
    """A call on other channels is refused and changes nothing: the layer stays provisional,
    built for the adapted shape, and takes that shape after (was: built for the refused
    shape, no longer provisional, so a call on the adapted data was refused)."""
    x = images(rng, np.float32)
    norm = Normalization()
    norm.adapt(x)
    before, state = norm.get_weights(), norm.state
    with pytest.raises(InputError, match="3 channel statistics but the input has 2 channels"):
        norm(x[:2, :3, :3, :2])
    with pytest.raises(InputError, match="3 channel statistics but the input has 2 channels"):
        norm.build((3, 3, 2))
    assert norm.built and norm.provisional and norm.input_shape == (5, 4, 3)
    assert norm.state is state  # (the same dict, put back: review RD)
    for got, want in zip(norm.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    mean, std = reference(x)
    np.testing.assert_allclose(norm(x), (x - mean) / std, atol=1e-3)  # (float32 of ~1e3)
    model = xpcnn.Sequential([norm], input_shape=(6, 6, 3))  # (still rebuilt by a model)
    assert norm.input_shape == (6, 6, 3) and not norm.provisional
    assert model.predict(x[:2, :1, :1].repeat(6, 1).repeat(6, 2), verbose=0).shape == (2, 6, 6, 3)


def test_an_unadapted_layer_is_refused_where_it_is_built_or_called(rng):
    adapt_first = r"has no mean and std yet: call layer.adapt\(data\).*Normalization\(mean, std\)"
    with pytest.raises(InputError, match=adapt_first):
        Normalization().build((4, 4, 3))
    with pytest.raises(InputError, match=adapt_first):
        Normalization()(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match=adapt_first):
        Normalization()(xpcnn.Input((4, 4, 3)))
    with pytest.raises(InputError, match=adapt_first):
        xpcnn.Sequential([Normalization(), Flatten(), Dense(2)], input_shape=(4, 4, 3))
    with pytest.raises(InputError, match="takes both mean and std, or neither"):
        Normalization(mean=[0.5, 0.5])


def test_a_constant_channel_gives_zero_as_in_keras(rng, tmp_path):
    """Keras divides by maximum(sqrt(variance), 1e-7): an RGBA image's alpha channel, always
    255, gives 0 where adapt refused it; the layer saves and loads (variance 0 a weight)."""
    x = images(rng, np.uint8, (30, 5, 4, 4))
    x[..., -1] = 255
    norm = Normalization()
    norm.adapt(x)
    assert norm.std[-1] == 0.0 and norm.mean[-1] == 255.0
    model = xpcnn.Sequential([norm, Flatten()], input_shape=x.shape[1:], dtype="float64")
    mean, std = reference(x)
    want = (x - mean) / np.maximum(std, 1e-7)
    np.testing.assert_allclose(model.predict(x).reshape(x.shape), want, rtol=1e-12, atol=1e-12)
    assert not model.predict(x).reshape(x.shape)[..., -1].any()
    model.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(x),
                                  model.predict(x))


def test_a_built_layer_keeps_its_channel_count(rng):
    model = xpcnn.Sequential([Normalization(0.0, 1.0), Flatten(), Dense(2)],
                             input_shape=(4, 4, 3))
    norm = model.layers[0]
    with pytest.raises(InputError, match=r"'normalization' \(Normalization\) is built for inputs "
                                         r"of 3 channels, but the data has 1 \(shape \(5, 4, 4, "
                                         r"1\)\)"):
        norm.adapt(np.ones((5, 4, 4, 1), np.uint8))
    assert (norm.mean, norm.std) == ([0.0], [1.0])
    with pytest.raises(InputError, match="the first batch has 3 channels, but batch 1 has 2"):
        Normalization().adapt([images(rng, np.uint8), np.ones((2, 4, 2), np.uint8)])


@pytest.mark.parametrize("data, message", [
    (np.zeros((0, 4, 4, 3), np.uint8), "got no values: the data is empty"),
    ([], "got no values"),
    ([np.zeros((0, 2, 3))], "got no values"),
    (np.full((3, 2, 2, 2), np.nan), r"the data holds NaN or infinite values \(sample 0 is"),
    ({"a": np.ones((2, 3))}, r"not a dict \(keys \['a'\]\): give it the images, "
                             r"adapt\(data\[key\]\)"),
    ([np.arange(12.0).reshape(4, 3), np.array([[1.0, 2.0, 3.0], [1.0, np.inf, 3.0]])],
     r"batch 1 holds NaN or infinite values \(sample 1 is the first\)"),
    pytest.param(np.full((3, 2), 1e308) * [[1], [-1], [1]], "mean or std overflows float64",
                 marks=pytest.mark.filterwarnings("ignore:overflow", "ignore:invalid")),
    (np.ones((5, 2, 2, 3), bool), r"of a real dtype; the data has shape \(5, 2, 2, 3\) and "
                                  "dtype bool"),
    (np.arange(5.0), r"the data has shape \(5,\)"),
    ([(np.ones((2, 3)), np.zeros(2))], "batch 0 is a tuple: adapt takes images alone, no "
                                       "labels"),
    (3.0, "as an array or an iterable of such batches, got float"),
], ids=["empty", "no-batches", "empty-batch", "nan", "dict", "inf-in-batch", "overflow",
        "bool", "rank-1", "labels", "number"])
def test_bad_data_is_refused(data, message):
    with pytest.raises(InputError, match=message):
        Normalization().adapt(data)


def test_adapt_fit_predict_save_load_bit_for_bit(rng, tmp_path):
    """Adapted before the model is built, the statistics train, predict, save and load (as
    weights, the loaded model bit for bit); adapted again on the built (compiled, trained)
    model, predict uses the new ones at once, written into the arrays the kernels (and a
    captured CUDA graph) read, and predicts bit for bit as a model adapted on that data."""
    x = rng.integers(0, 256, (24, 6, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 24)

    def net(norm):
        return [norm, Conv2D(4, 3), Flatten(), Dense(4), Softmax()]

    model = xpcnn.Sequential(net(Normalization()), seed=0)
    model.layers[0].adapt(x)
    model.compile(optimizer="sgd")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    probs = model.predict(x)
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    for a, b in zip(loaded.layers[0].get_weights(), model.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x), probs)

    norm = model.layers[0]
    shift, scale, variance = norm._shift, norm._scale, norm.state["variance"]
    x2 = (x // 2 + 60).astype(np.uint8)
    norm.adapt(x2)
    assert norm._shift is shift and norm._scale is scale and norm.state["variance"] is variance
    again_adapted = Normalization()
    again_adapted.adapt(x2)
    given = xpcnn.Sequential(net(again_adapted), input_shape=(6, 6, 3))
    given.set_weights(model.get_weights())
    again = model.predict(x)
    np.testing.assert_array_equal(again, given.predict(x))
    assert not np.array_equal(again, probs)
    model.save(tmp_path / "m2.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m2.npz").predict(x), again)


def test_a_strict_backend_model_adapts_from_its_own_arrays(rng):
    """Under array_api_strict (on its second device): the statistics from its arrays (and a
    list of them) are NumPy's, and a built model's layer takes them in place and predicts
    as the NumPy model does."""
    device = xs.Device("device1")
    x = rng.integers(0, 256, (20, 5, 5, 3), dtype=np.uint8)
    model = xpcnn.Sequential([Normalization(0.0, 1.0), Conv2D(2, 3), Flatten(), Dense(3),
                              Softmax()], device=(xs, device), input_shape=(5, 5, 3), seed=0)
    cpu = xpcnn.Sequential([Normalization(), Conv2D(2, 3), Flatten(), Dense(3), Softmax()],
                           seed=0)
    cpu.layers[0].adapt(x)
    cpu.build((5, 5, 3))
    on_device = xs.asarray(x, device=device)
    with xs.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        model.layers[0].adapt(on_device, batch_size=6)
        as_list = Normalization()
        as_list.adapt([on_device[:7, ...], on_device[7:, ...]])
        probs = model.predict(x)
    for norm in (model.layers[0], as_list):
        np.testing.assert_allclose(norm.mean, cpu.layers[0].mean, rtol=1e-13)
        np.testing.assert_allclose(norm.std, cpu.layers[0].std, rtol=1e-12)
    assert model.layers[0]._shift.device == device
    np.testing.assert_allclose(probs, cpu.predict(x), rtol=1e-5, atol=1e-7)


def test_a_negative_moving_variance_is_refused_by_name(tmp_path):
    """A BatchNorm2D moving_variance below 0 (a wrong set_weights, a lying file) was taken,
    saved and loaded, and every prediction was NaN. Refused by set_weights, assign and a
    file's load, naming the layer and the weight; 0 is a variance (eps keeps it usable)."""
    inputs = xpcnn.Input((5, 5, 3))
    model = xpcnn.Model(inputs, Dense(3)(Flatten()(BatchNorm2D(name="bn")(Conv2D(2, 3)(inputs)))),
                        seed=0)
    weights = model.get_weights()
    model.save(tmp_path / "good.npz")
    wrong = [w.copy() for w in weights]
    wrong[5][1] = -0.5  # (bn/moving_variance)
    named = (r"layer 'bn' \(BatchNorm2D\) weight 'moving_variance' holds negative or NaN "
             r"variances \(-0.5\), expected values >= 0")
    with pytest.raises(InputError, match=named):
        model.set_weights(wrong)
    with pytest.raises(InputError, match=named):
        model.get_layer("bn").set_weights(wrong[2:6])
    with pytest.raises(InputError, match=named):
        model.get_layer("bn").weights[3].assign(wrong[5])
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(tmp_path / "good.npz") as f:
        entries = dict(f)
    bn = next(i for i, la in enumerate(model.layers) if la.name == "bn")
    entries[f"layer{bn}.3"] = wrong[5]  # (its weights in order: the variance 4th)
    np.savez(tmp_path / "lying.npz", **entries)
    with pytest.raises(DataFormatError, match=r"lying.npz: .*" + named):
        xpcnn.load_model(tmp_path / "lying.npz")
    nan = [w.copy() for w in weights]
    nan[5][0] = np.nan  # (NaN and infinite weights stay as in Keras, but not as a variance)
    with pytest.raises(InputError, match=r"moving_variance' holds negative or NaN variances "
                                         r"\(nan\)"):
        model.set_weights(nan)
    zero = [w.copy() for w in weights]
    zero[5][:] = 0.0
    model.set_weights(zero)
    assert np.isfinite(model.predict(np.ones((2, 5, 5, 3)))).all()


def wide(rng, features=120_000):
    x = rng.normal(size=(8, features)).astype(np.float32) * 3 + 5
    norm = Normalization()
    norm.adapt(x)
    model = xpcnn.Sequential([norm, Dense(3)], input_shape=(features,), seed=0)
    model.compile(loss="cross_entropy", optimizer="sgd")
    return model, x, np.arange(8) % 3


def test_adapted_statistics_are_non_trainable_weights_saved_at_any_size(rng, tmp_path):
    """An adapted Normalization over 120k features could not be saved, weights-saved or
    checkpointed: its mean and std went into the JSON configuration, capped at 4 MiB. As in
    Keras 3 they are now its non-trainable weights mean and variance, (C,) each: files hold
    them as arrays, the configuration says only that they are adapted, get_weights,
    set_weights and the counts are Keras'; the loaded model predicts bit for bit."""
    model, x, y = wide(rng)
    norm = model.layers[0]
    assert norm.get_config() == {"name": "normalization", "adapted": True}
    assert [w.path for w in model.non_trainable_weights] == ["normalization/mean",
                                                             "normalization/variance"]
    assert not norm.trainable_weights
    assert norm.count_params() == norm.count_state() == 2 * 120_000
    mean, variance = norm.get_weights()
    np.testing.assert_allclose(mean, np.mean(x, axis=0, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(variance, np.var(x, axis=0, dtype=np.float64), rtol=1e-6)
    assert mean.dtype == variance.dtype == np.float32
    probs = model.predict(x)
    model.save(tmp_path / "m.npz")
    model.save_weights(tmp_path / "w.npz")
    model.fit(x, y, epochs=1, verbose=0, checkpoint=tmp_path / "c.npz")
    trained = model.predict(x)
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(x), probs)
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "c.npz").predict(x), trained)
    # into a model whose layer is made for weights to come (as a file's configuration says)
    other = xpcnn.Sequential([Normalization(adapted=True), Dense(3)],
                             input_shape=(120_000,), seed=0)
    np.testing.assert_array_equal(other.layers[0].get_weights()[1], np.ones(120_000))
    other.load_weights(tmp_path / "w.npz")
    np.testing.assert_array_equal(other.predict(x), probs)
    np.testing.assert_allclose(other.layers[0].mean, mean)
    resumed, _, _ = wide(np.random.default_rng(1))  # (other statistics: the file's win)
    resumed.fit(x, y, epochs=1, verbose=0, checkpoint=tmp_path / "c.npz", resume=True)
    np.testing.assert_array_equal(resumed.predict(x), trained)


def test_files_with_the_statistics_in_their_configuration_still_load(rng, tmp_path):
    """Files written before, which held an adapted layer's mean and std in the JSON
    configuration and no arrays for it, load as a layer given those statistics."""
    x = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
    norm = Normalization()
    norm.adapt(x)
    model = xpcnn.Sequential([norm, Conv2D(2, 3), Flatten(), Dense(3), Softmax()],
                             input_shape=(5, 5, 3), seed=0)
    model.compile(optimizer="sgd")
    model.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as f:
        entries = dict(f)
    config = decode_json(entries.pop(CONFIG_KEY), "new.npz")
    config["layers"][0]["config"] = {"name": "normalization", "mean": norm.mean,
                                     "std": norm.std}
    old = {CONFIG_KEY: encode_json(config)}
    for key, a in entries.items():  # (the first layer had no arrays)
        if not key.startswith("layer0."):
            old[key] = a
    np.savez(tmp_path / "old.npz", **old)
    loaded = xpcnn.load_model(tmp_path / "old.npz")
    assert loaded.layers[0].get_config()["mean"] == norm.mean
    assert loaded.layers[0].get_weights() == []
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), rtol=1e-5, atol=1e-7)


def test_given_statistics_are_settings_and_variance_is_taken_as_in_keras(rng):
    """Given to the constructor (mean and std, or Keras' mean and variance), the statistics
    are settings, as Keras 3 keeps them: no weights, in the configuration."""
    model = xpcnn.Sequential([Normalization(mean=[1.0, 2.0], variance=[4.0, 0.25]), Flatten()],
                             input_shape=(3, 2))
    norm = model.layers[0]
    assert norm.std == [2.0, 0.5] and norm.get_weights() == [] and model.count_params() == 0
    assert norm.get_config() == {"name": "normalization", "mean": [1.0, 2.0], "std": [2.0, 0.5]}
    x = rng.normal(size=(4, 3, 2))
    np.testing.assert_allclose(model.predict(x), ((x - [1, 2]) / [2, 0.5]).reshape(4, 6),
                               rtol=1e-6)
    with pytest.raises(InputError, match="takes std or variance, not both"):
        Normalization(0.0, 1.0, variance=1.0)
    with pytest.raises(InputError, match=r"Normalization variance must be a number >= 0, got "
                                         "-1.0"):
        Normalization([0.0, 1.0], variance=[1.0, -1.0])
    with pytest.raises(InputError, match=r"adapted=True\) takes its statistics as weights"):
        Normalization(0.0, 1.0, adapted=True)


def test_adapting_a_built_layer_of_given_statistics_makes_them_weights_in_place(rng, tmp_path):
    """adapt on a built layer given its statistics: they become its weights, its mean weight
    the very array the kernels read (a captured CUDA step reads it by address), and the model
    saves and loads them."""
    model = xpcnn.Sequential([Normalization(0.0, 1.0), Flatten(), Dense(2)],
                             input_shape=(4, 4, 3), seed=0)
    norm = model.layers[0]
    shift, scale = norm._shift, norm._scale
    assert len(model.get_weights()) == 2
    x = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    norm.adapt(x)
    assert norm._shift is shift and norm._scale is scale and norm.state["mean"] is shift
    assert len(model.get_weights()) == 4 and norm.get_config()["adapted"]
    want = reference(x)
    np.testing.assert_allclose(norm.get_weights()[1], want[1] ** 2, rtol=1e-6)
    probs = model.predict(x)
    np.testing.assert_allclose(probs, Dense.forward(model.layers[2], ((x - want[0]) / want[1])
                                                    .reshape(6, -1).astype(np.float32)),
                               rtol=1e-5)
    model.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(x), probs)


def test_set_weights_sets_the_statistics_and_refuses_a_variance_that_cannot_divide(rng):
    norm = Normalization(adapted=True, name="norm")
    model = xpcnn.Sequential([norm, Flatten()], input_shape=(2, 3))
    x = rng.normal(size=(5, 2, 3))
    np.testing.assert_array_equal(model.predict(x), x.reshape(5, 6).astype(np.float32))
    model.set_weights([np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.25])])
    assert norm.mean == [1.0, 2.0, 3.0] and norm.std == [2.0, 1.0, 0.5]
    want = ((x - [1, 2, 3]) / [2, 1, 0.5]).reshape(5, 6)
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-6)
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(InputError, match=r"layer 'norm' \(Normalization\) weight 'variance' "
                                             "holds variances that are negative or not "
                                             "finite"):
            norm.weights[1].assign(np.array([1.0, bad, 1.0]))
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-6)


def test_training_neither_snapshots_nor_averages_adapted_statistics(rng, monkeypatch):
    """Adapted statistics are fixed in training (Keras), though they are state arrays: as
    moving state each step would copy them (to put them back after a step skipped on the
    device) and several ranks would average them at each epoch's end (float64: an ulp of
    drift). Layer.updates_state = False keeps both to a BatchNorm's moving statistics."""
    from xpcnn import distributed
    from xpcnn.ops.kernels import kernels_for

    x = rng.normal(3.0, 2.0, (8, 5, 5, 2))
    norm = Normalization()
    norm.adapt(x)
    model = xpcnn.Sequential([norm, Conv2D(2, 3), BatchNorm2D(), Flatten(), Dense(3),
                              Softmax()], input_shape=(5, 5, 2), seed=0)
    model.compile(optimizer="sgd")
    kernels = type(kernels_for(model.backend))
    taken = []
    snapshot = kernels.snapshot_state
    monkeypatch.setattr(kernels, "snapshot_state",
                        lambda self, arrays: taken.append(list(arrays)) or snapshot(self, arrays))
    model.fit(x, np.arange(8) % 3, epochs=1, batch_size=4, verbose=0)
    bn = model.layers[2].state
    assert len(taken) == 2 and all(len(t) == 2 for t in taken)
    assert all(a is b for t in taken for a, b in zip(t, bn.values(), strict=True))

    class Recorder:  # (the world's communicator: any allreduce of the state is recorded)
        calls = []

        def Iallreduce(self, *args, **kwargs):  # noqa: N802 (mpi4py's name)
            self.calls.append(args)
            raise AssertionError("no allreduce expected")

    only_norm = xpcnn.Sequential([norm, Flatten(), Dense(3)], input_shape=(5, 5, 2), seed=0)
    arrays = dict(norm.state)
    here = distributed.World(0, 2, comm=Recorder())
    dp = distributed.DataParallel(only_norm, here, comm=object())
    dp.average_state()
    assert not Recorder.calls
    assert all(norm.state[k] is a for k, a in arrays.items())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_std_below_1e_7_divides_as_1e_7_as_in_keras(rng, dtype):
    """Keras 3 divides by maximum(sqrt(variance), 1e-7): a std of 1e-8 gave outputs 10 times
    Keras' (and one of 1e-39 was refused). Given, adapted, and set as weights, checked against
    Keras' formula in float64 NumPy."""
    x = np.zeros((4, 3, 2))
    x[:, :, 0] = rng.normal(size=(4, 3))
    x[:, 0, 1] = [1e-8, -1e-8, 2e-8, 0.0]
    x[:, 1:, 1] = 3e-8

    def keras(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
        return (x - mean) / np.maximum(np.sqrt(variance), 1e-7)

    tol = {"rtol": 1e-6 if dtype == "float32" else 1e-12, "atol": 1e-6}
    given = Normalization(mean=[0.0, 1e-8], variance=[1.0, 1e-18])
    model = xpcnn.Sequential([given, Flatten()], input_shape=(3, 2), dtype=dtype)
    np.testing.assert_allclose(model.predict(x).reshape(x.shape),
                               keras(np.array([0.0, 1e-8]), np.array([1.0, 1e-18])), **tol)
    tiny = Normalization(0.0, 1e-320)  # (was refused: 1 / std overflows)
    np.testing.assert_allclose(tiny(x), x / 1e-7, rtol=1e-6)
    norm = Normalization()
    norm.adapt(x)
    model = xpcnn.Sequential([norm, Flatten()], input_shape=(3, 2), dtype=dtype)
    mean, std = reference(x)
    np.testing.assert_allclose(model.predict(x).reshape(x.shape), keras(mean, std ** 2), **tol)
    model.set_weights([np.zeros(2), np.array([1.0, 1e-78])])  # (was refused in float32)
    np.testing.assert_allclose(model.predict(x).reshape(x.shape),
                               keras(np.zeros(2), np.array([1.0, 1e-78])), **tol)


def test_adapt_takes_a_pytorch_dataloaders_one_element_lists_and_hints_at_labels():
    """A DataLoader over TensorDataset(x) yields [x] lists, refused as "batch 0 is a list"
    though the README takes (x,) and [x] as x; over TensorDataset(x, y) it yields [x, y],
    refused without the hint a tuple (x, y) gets."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x = np.random.default_rng(0).integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
    norm = Normalization()
    norm.adapt(DataLoader(TensorDataset(torch.from_numpy(x)), 16))
    want = reference(x)
    np.testing.assert_allclose(norm.mean, want[0], rtol=1e-13)
    np.testing.assert_allclose(norm.std, want[1], rtol=1e-12)
    tuples = Normalization()
    tuples.adapt([(x[:30],), (x[30:],)])
    np.testing.assert_allclose(tuples.std, want[1], rtol=1e-12)
    labels = DataLoader(TensorDataset(torch.from_numpy(x), torch.arange(64)), 16)
    with pytest.raises(InputError, match=r"batch 0 is a list: adapt takes images alone, no "
                                         r"labels \(\(x for x, _ in batches\) drops them\)"):
        Normalization().adapt(labels)


def old_format(path, old_path, layer, statistics):
    """The model file or checkpoint at ``path`` as the code before adapted statistics were
    weights wrote it: layer ``layer`` a Normalization given ``statistics`` (mean and std) in
    its configuration, with no arrays."""
    with np.load(path) as f:
        entries = dict(f)
    config = decode_json(entries.pop(CONFIG_KEY), "file")
    model = config.get("model", config)
    name = model["layers"][layer]["config"]["name"]
    model["layers"][layer]["config"] = {"name": name, **statistics}
    old = {CONFIG_KEY: encode_json(config)}
    old.update((k, a) for k, a in entries.items() if not k.startswith(f"layer{layer}."))
    np.savez(old_path, **old)


def test_an_older_checkpoint_resumes_into_the_script_that_adapts_again(rng, tmp_path):
    """A checkpoint written before adapted statistics were weights (Normalization{mean, std}
    in its configuration) was refused as "another architecture" by the same script, which
    rebuilds and adapts its layer again: fit(checkpoint=old, resume=True) and
    load_weights(old). Both take it now, the layer's statistics set from the file's numbers."""
    x = rng.normal(5.0, 3.0, (16, 5, 5, 3))
    y = rng.integers(0, 3, 16)

    def script(data):
        norm = Normalization()
        norm.adapt(data)
        model = xpcnn.Sequential([norm, Conv2D(2, 3), Flatten(), Dense(3), Softmax()],
                                 input_shape=(5, 5, 3), seed=0)
        model.compile(optimizer="adam")
        return model

    first = script(x)
    first.fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    statistics = {"mean": first.layers[0].mean, "std": first.layers[0].std}
    old_format(tmp_path / "c.npz", tmp_path / "old.npz", 0, statistics)
    for path in ("c.npz", "old.npz"):
        resumed = script(x * 2.0)  # (other statistics: the file's win)
        shutil.copy(tmp_path / path, tmp_path / "resumed.npz")  # (which fit writes again)
        resumed.fit(x, y, epochs=2, batch_size=8, verbose=0, checkpoint=tmp_path / "resumed.npz",
                    resume=True)
        np.testing.assert_allclose(resumed.layers[0].mean, statistics["mean"], rtol=1e-6)
        np.testing.assert_allclose(resumed.layers[0].std, statistics["std"], rtol=1e-6)
        if path == "c.npz":
            want = resumed.predict(x)
        else:
            np.testing.assert_allclose(resumed.predict(x), want, rtol=1e-4, atol=1e-6)
    loaded = script(x * 2.0)
    loaded.load_weights(tmp_path / "old.npz")
    np.testing.assert_allclose(loaded.predict(x), first.predict(x), rtol=1e-5, atol=1e-7)
    unbuilt = Normalization()
    unbuilt.adapt(x)
    fresh = xpcnn.Sequential([unbuilt, Conv2D(2, 3), Flatten(), Dense(3), Softmax()], seed=1)
    fresh.load_weights(tmp_path / "old.npz")  # (built for the file's input shape)
    np.testing.assert_allclose(fresh.predict(x), first.predict(x), rtol=1e-5, atol=1e-7)
    # other settings than the statistics are still another architecture
    other = xpcnn.Sequential([unbuilt, Conv2D(3, 3), Flatten(), Dense(3), Softmax()],
                             input_shape=(5, 5, 3))
    with pytest.raises(DataFormatError, match="another architecture"):
        other.load_weights(tmp_path / "old.npz")
    # wrong statistics in the older file are named
    old_format(tmp_path / "c.npz", tmp_path / "bad.npz", 0, {"mean": [0.0, 1.0], "std": [1.0, 1.0]})
    with pytest.raises(DataFormatError, match=r"statistics of layer 'normalization' "
                                              r"\(Normalization\) in its configuration are "
                                              r"invalid: 2 channel statistics"):
        script(x).load_weights(tmp_path / "bad.npz")


def test_an_adapted_layers_entries_are_counted_before_it_is_built(rng, tmp_path):
    """A file whose adapted Normalization's entries hold more values than its input's
    channels give is refused by their headers, before any layer is built."""
    x = rng.normal(size=(4, 5, 5, 3))
    norm = Normalization()
    norm.adapt(x)
    model = xpcnn.Sequential([norm, Flatten(), Dense(2)], input_shape=(5, 5, 3), seed=0)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        entries = dict(f)
    entries["layer0.0"] = np.zeros(1000)
    entries["layer0.1"] = np.ones(1000)
    np.savez(tmp_path / "big.npz", **entries)
    with pytest.raises(DataFormatError, match=r"layer 0 \(Normalization\) needs 6 weight values "
                                              r"for inputs of shape \(5, 5, 3\), but the file "
                                              r"holds 2000"):
        xpcnn.load_model(tmp_path / "big.npz")


def _normalised_model(x, adapted, conv=2):
    """A script's model behind a plain Normalization(), adapted to x in a fresh run."""
    norm = Normalization()
    if adapted:
        norm.adapt(x)
    model = xpcnn.Sequential([norm, Conv2D(conv, 3), Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer="adam")
    return model


def test_a_plain_normalization_takes_the_files_adapted_statistics(rng, tmp_path):
    """Keras 3's way to restore an adapted Normalization: the architecture rebuilt in code with
    a plain Normalization(), then load_weights (or a resumed fit, in a script that adapts only
    on a fresh run). It was refused as "another architecture" (Normalization(adapted=True) in
    the file); the layer becomes adapted and takes the file's statistics. A refused load
    leaves it as it was."""
    x = rng.normal(5.0, 3.0, (16, 5, 5, 3))
    y = rng.integers(0, 3, 16)

    def script(fresh, conv=2):
        return _normalised_model(x, fresh, conv)

    first = script(True)
    first.fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    first.save_weights(tmp_path / "w.npz")
    plain = script(False)
    plain.load_weights(tmp_path / "w.npz")  # (built for the file's input shape)
    assert plain.layers[0].adapted
    np.testing.assert_array_equal(plain.predict(x, verbose=0), first.predict(x, verbose=0))
    np.testing.assert_allclose(plain.layers[0].mean, first.layers[0].mean, rtol=1e-6)
    # a checkpoint restored into the same script, not adapted again (a resumed fit: below)
    restored = script(False)
    restore_checkpoint(restored, tmp_path / "c.npz")
    assert restored.layers[0].adapted
    np.testing.assert_array_equal(restored.predict(x, verbose=0), first.predict(x, verbose=0))
    # an older file (statistics in its configuration) too
    old_format(tmp_path / "w.npz", tmp_path / "old.npz", 0,
               {"mean": first.layers[0].mean, "std": first.layers[0].std})
    older = script(False)
    older.load_weights(tmp_path / "old.npz")
    np.testing.assert_allclose(older.layers[0].mean, first.layers[0].mean, rtol=1e-6)
    # refused for another layer: the Normalization is left plain, the model unbuilt
    other = script(False, conv=3)
    with pytest.raises(DataFormatError, match="another architecture"):
        other.load_weights(tmp_path / "w.npz")
    assert not other.built and not other.layers[0].adapted and other.layers[0].mean is None


@pytest.mark.parametrize("how", ["checkpoint", "BackupAndRestore"])
@pytest.mark.parametrize("again", ["plain", "adapted again", "adapted on other data"])
def test_a_resumed_fit_takes_a_plain_normalizations_statistics_from_the_checkpoint(
        rng, tmp_path, how, again):
    """A script that adapts its Normalization() on a fresh run only, interrupted and run
    again with resume=True: fit built the model from its data before it read the checkpoint,
    and the plain layer refused to build ("no mean and std yet"). As Keras' BackupAndRestore,
    the checkpoint's statistics (weights) are restored, and the run ends bit for bit as the
    uninterrupted one; where the script adapts again (on other data too), the file's win."""
    x = rng.normal(5.0, 3.0, (24, 5, 5, 3))
    y = rng.integers(0, 3, 24)

    def script(data, callbacks=(), path=tmp_path / "c.npz", **kwargs):
        norm = Normalization()
        if data is not None:
            norm.adapt(data)
        model = xpcnn.Sequential([norm, Conv2D(2, 3), Flatten(), Dense(3), Softmax()],
                                 seed=0)
        model.compile(optimizer="adam")
        saving = {"checkpoint": path, "checkpoint_every": 2} if how == "checkpoint" else \
            {"callbacks": [xpcnn.callbacks.BackupAndRestore(path, 2, delete_checkpoint=False)]}
        extra = saving.pop("callbacks", [])
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[*callbacks, *extra],
                  **saving, **kwargs)
        return model

    whole = script(x, path=tmp_path / "whole.npz")
    with pytest.raises(KeyboardInterrupt):
        script(x, [InterruptAfter(5)])  # (in the second epoch; the last checkpoint at 4)
    data = {"plain": None, "adapted again": x, "adapted on other data": x * 2.0 + 1.0}[again]
    resumed = script(data, **({"resume": True} if how == "checkpoint" else {}))
    assert resumed.layers[0].adapted
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history.history["loss"] == whole.history.history["loss"]
    np.testing.assert_array_equal(resumed.predict(x, verbose=0), whole.predict(x, verbose=0))


def test_a_refused_resume_leaves_a_plain_normalization_as_it_was(rng, tmp_path):
    """A resumed fit whose checkpoint is refused (another architecture) leaves the plain
    Normalization() plain and the model unbuilt, as a refused load_weights does."""
    x = rng.normal(5.0, 3.0, (16, 5, 5, 3))
    y = rng.integers(0, 3, 16)

    def script(conv, fresh):
        return _normalised_model(x, fresh, conv)

    script(2, True).fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz")
    other = script(3, False)
    with pytest.raises(DataFormatError, match="another architecture"):
        other.fit(x, y, epochs=1, batch_size=8, verbose=0, checkpoint=tmp_path / "c.npz",
                  resume=True)
    assert not other.built and not other.layers[0].adapted and other.layers[0].mean is None


def test_given_statistics_assigned_after_build_are_refused_before_checked(tmp_path):
    """A built Normalization's mean/std assigned were ignored by the running layer but written
    to its file (the loaded model predicted otherwise), and "abc" was taken, saved, and the
    file never loaded. After build: refused, pointing to adapt / set_weights / a new layer,
    the model unchanged; before build: checked as the constructor checks them."""
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    norm = Normalization([0, 0, 0], [1, 1, 1])
    model = xpcnn.Sequential([norm, Flatten(), Dense(3)], input_shape=(8, 8, 3), seed=0)
    for name, value in (("mean", [5.0, 5.0, 5.0]), ("std", [2.0] * 3), ("mean", "abc")):
        with pytest.raises(InputError, match=rf"is built: its {name} cannot be assigned .*adapt"
                                             r".*set_weights.*Normalization\(mean, std\)"):
            setattr(norm, name, value)
    assert norm.mean == [0.0] * 3 and norm.std == [1.0] * 3
    p = model.predict(x, verbose=0)
    model.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(x, verbose=0), p)
    fresh = Normalization(0.0, 1.0)
    for name, value in (("mean", "abc"), ("std", -0.5), ("std", [1.0, -1.0])):
        with pytest.raises(InputError, match=f"Normalization {name}"):
            setattr(fresh, name, value)
    fresh.mean, fresh.std = [1.0, 2.0, 3.0], 2
    assert (fresh.mean, fresh.std) == ([1.0, 2.0, 3.0], [2.0])
    np.testing.assert_allclose(fresh(x), (x - [1.0, 2.0, 3.0]) / 2, rtol=1e-6)
    # Assigned one at a time, they are checked as a pair where the layer is built (were: a bare
    # TypeError of None, a NumPy broadcast error).
    for std in (None, [0.25, 0.25]):
        pair = Normalization(0.5, 1.0)
        pair.mean, pair.std = [0.5] * 3, std
        with pytest.raises(InputError, match="Normalization needs both mean and std, of equal "
                                             "lengths"):
            pair(x)


@pytest.mark.parametrize("mean, std", [(0.5, [1.0, 2.0, 4.0]), ([0.1, 0.2, 0.3], 2.0)])
@pytest.mark.parametrize("given", ["constructor", "attributes"])
def test_one_statistic_beside_per_channel_ones_broadcasts_and_its_files_load(
        rng, tmp_path, mean, std, given):
    """A length-1 mean or std beside a per-channel other broadcasts, as in Keras (an assigned
    pair was taken, trained and saved, but its model file and checkpoint never loaded: the
    constructor, which loading goes through, demanded equal lengths)."""
    x = rng.normal(size=(8, 4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 2, 8)

    def make():
        if given == "constructor":
            norm = Normalization(mean, std)
        else:
            norm = Normalization()
            norm.mean, norm.std = mean, std
        model = xpcnn.Sequential([norm, Conv2D(2, 1), Flatten(), Dense(2)],
                                 input_shape=(4, 4, 3), seed=3)
        model.compile(optimizer="sgd")
        return model

    model = make()
    normalised = xpcnn.Model(model.input, model.layers[0].output).predict(x)
    np.testing.assert_allclose(normalised, (x - np.asarray(mean)) / np.asarray(std), rtol=1e-6)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, checkpoint=tmp_path / "run.ckpt.npz")
    model.save(tmp_path / "model.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "model.npz").predict(x),
                                  model.predict(x))
    resumed = make()
    resumed.fit(x, y, epochs=1, batch_size=4, verbose=0, checkpoint=tmp_path / "run.ckpt.npz",
                resume=True)
    for a, b in zip(resumed.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_streaming_moments_are_a_function_of_the_batches_alone(rng):
    """adapt's streaming loop, as a function of its own: per-channel count, mean, population
    std of the batches, whatever the chunking; none for no values."""
    from xpcnn.layers.preprocessing import _moments

    x = rng.normal(1e3, 2.0, (23, 3, 2, 4))
    parts = [(x[:5], "batch 0"), (x[5:5], "batch 1"), (x[5:], "batch 2")]
    count, mean, std = _moments(iter(parts), 3)
    assert count == 23 * 6
    values = x.reshape(-1, 4)
    np.testing.assert_allclose(mean, values.mean(0), rtol=1e-14)
    np.testing.assert_allclose(std, values.std(0), rtol=1e-11)
    layer = Normalization()
    layer.adapt([x[:5], x[5:5], x[5:]], batch_size=3)  # (the numbers adapt keeps, bit for bit)
    assert (layer._mean, layer._std) == (mean.tolist(), std.tolist())
    assert _moments(iter([(x[:0], "the data")]), None)[0] == 0


def test_batchnorm_backward_keeps_float32s_accuracy_on_a_channel_of_spread_below_eps(
        rng, monkeypatch):
    """A BatchNorm2D's backward on the NumPy kernels gets the eps its forward used: the
    kernels tell the batch's spread from it (variance = 1 / inv_std**2 - eps), which decides
    whether their sums may run on x itself. A channel of spread 1e-3 at eps 1e-3 (|mean| *
    inv_std 12.6, |mean| / std 400) keeps float32's accuracy there, an eps changed between
    forward and backward changing nothing (was: dgamma 1e-4 off its largest value)."""
    import array_api_compat.numpy as xpn

    from xpcnn.layers.base import Options
    from xpcnn.ops.fast_numpy import KERNELS as FAST
    from xpcnn.ops.kernels import StandardKernels

    x = (0.4 + 1e-3 * rng.standard_normal((64, 16, 16, 8))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = BatchNorm2D(eps=1e-3)
    bn.build(x.shape[1:], backend="cpu", rng=rng)
    gamma, beta = bn.params["gamma"], bn.params["beta"]
    gamma[...] = rng.uniform(0.5, 1.5, 8)
    given = []
    plain = type(FAST).batch_norm_backward

    def spy(self, *args, **kwargs):
        given.append(kwargs.get("eps"))
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(type(FAST), "batch_norm_backward", spy)
    y = bn.forward(x, training=True, options=Options())
    bn.eps = 0.5
    bn.backward(dy, Options())
    assert given == [1e-3]
    c = x.shape[-1]
    _, mean, inv_std = FAST.batch_norm_train(x, gamma, beta, np.zeros(c, np.float32),
                                             np.ones(c, np.float32), 0.1, 1e-3, np.float32,
                                             False)
    want = StandardKernels(xpn).batch_norm_backward(
        *(a.astype(np.float64) for a in (dy, x, mean, inv_std, gamma, beta)), False, True)
    xhat = (x.astype(np.float64) - mean) * inv_std.astype(np.float64)
    condition = np.sum(np.abs(dy * xhat), axis=(0, 1, 2))  # (sum |dm * xhat|)
    assert y.dtype == bn.grads["gamma"].dtype == np.float32
    assert np.all(np.abs(bn.grads["gamma"] - want[1]) < 2.0**-25 * condition)
    np.testing.assert_allclose(bn.grads["gamma"], want[1], rtol=0,
                               atol=1e-6 * np.max(np.abs(want[1])))
    np.testing.assert_allclose(bn.grads["beta"], want[2], rtol=0,
                               atol=1e-6 * np.max(np.abs(want[2])))


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_a_per_channel_rescalings_gradient_keeps_the_compute_dtype(precision):
    """Under mixed precision, a per-channel Rescaling's backward gives the compute dtype, as
    its scalar path and every other layer do (was: float32, the factors' dtype, review R1)."""
    import xpcnn
    from xpcnn.layers import Dense, Flatten, Rescaling, Softmax

    model = xpcnn.Sequential([Rescaling([1.0, 2.0, 3.0], offset=[0.0, 1.0, 2.0]), Flatten(),
                              Dense(3), Softmax()], input_shape=(4, 4, 3), seed=0)
    model.compile(precision=precision)
    layer = model.layers[0]
    x = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    layer.forward(model.backend.asarray(x), training=True)
    dy = np.ones((2, 4, 4, 3), dtype=np.float32)
    dx = layer.backward(model.backend.asarray(dy).astype(layer.compute_dtype))
    assert dx.dtype == layer.compute_dtype
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.broadcast_to([1, 2, 3], dy.shape))


def test_rescaling_takes_per_channel_scale_and_offset_as_keras(rng, tmp_path):
    """Keras 3's Rescaling([1, 2, 3], offset=[0, 10, 20]) scales each channel (ones give
    [1, 12, 23]); xpcnn refused it as "scale must be a finite number". Broadcast over the last
    axis, in predict and its gradient, kept through the configuration, model files, checkpoints
    and ONNX export; a count of values other than the channels' refused at build."""
    from xpcnn.layers import Rescaling

    scale, offset = [1.0, 2.0, -0.5], [0.0, 10.0, 20.0]
    np.testing.assert_array_equal(Rescaling(scale, offset=offset)(np.ones((1, 1, 1, 3))),
                                  [[[[1.0, 12.0, 19.5]]]])
    x = rng.integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    y = np.arange(6) % 2

    def make() -> xpcnn.Sequential:
        return xpcnn.Sequential([Rescaling(np.array(scale), offset=offset), Flatten(), Dense(2),
                                 Softmax()], input_shape=(4, 4, 3), dtype="float64", seed=0)

    model = make()
    layer = model.layers[0]
    assert layer.get_config() == {"name": "rescaling", "scale": scale, "offset": offset}
    got = xpcnn.Model(model.input, layer.output).predict(x)
    np.testing.assert_array_equal(got, x.astype(np.float64) * scale + offset)
    dy = rng.normal(size=(6, 4, 4, 3))
    layer.forward(layer.backend.asarray(x.astype(np.float64)), training=True)
    np.testing.assert_array_equal(layer.backward(dy), dy * scale)
    model.compile(optimizer="sgd")
    model.fit(x, y, epochs=1, batch_size=3, verbose=0, checkpoint=tmp_path / "run.ckpt.npz")
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert loaded.layers[0].get_config() == layer.get_config()
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    resumed = make()
    resumed.compile(optimizer="sgd")
    resumed.fit(x, y, epochs=1, batch_size=3, verbose=0, checkpoint=tmp_path / "run.ckpt.npz",
                resume=True)
    np.testing.assert_array_equal(resumed.predict(x), model.predict(x))
    with pytest.raises(InputError, match=r"layer 'rescaling' \(Rescaling\): its offset has 2 "
                                         r"values, one per channel, but the input has 3 "
                                         r"channels"):
        Rescaling(2.0, offset=[1.0, 2.0])(x)
    with pytest.raises(InputError, match=r"its scale has 4 values"):
        layer.scale = [1.0] * 4  # (a built layer: refused, the old value kept)
    assert layer.scale == scale
    layer.scale = 3.0  # (back to a number: the kernels' own path)
    np.testing.assert_allclose(xpcnn.Model(model.input, layer.output).predict(x),
                               x * 3.0 + offset)
    with pytest.raises(InputError, match=r"Rescaling scale must be a number or one per channel "
                                         r".*got an array of shape \(1, 3\)"):
        Rescaling([[1.0, 2.0, 3.0]])
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from xpcnn.onnx_export import export_model

    export_model(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    np.testing.assert_allclose(out, model.predict(x), rtol=1e-5, atol=1e-6)


def test_normalization_statistics_of_keepdims_shape_name_the_shape():
    """Keras-style statistics kept with their axes, (1, 1, 1, C), were refused as "mean must
    be a finite number, got [[[...]]]"."""
    m = np.full((1, 1, 1, 3), 0.5)
    with pytest.raises(InputError, match=r"Normalization mean must be a number or one per "
                                         r"channel .*got an array of shape \(1, 1, 1, 3\) "
                                         r"\(keepdims' shape\? pass value.reshape\(-1\), its 3 "
                                         "values\\)"):
        Normalization(mean=m, variance=m)
    assert Normalization(mean=m.reshape(-1), variance=m.reshape(-1)).mean == [0.5] * 3
