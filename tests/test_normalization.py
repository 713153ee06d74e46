"""Normalization.adapt: per-channel statistics computed from the data, as Keras' adapt."""

import tracemalloc

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import BatchNorm2D, Conv2D, Dense, Flatten, Normalization, Softmax


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


def test_a_constant_channel_is_refused_by_name(rng):
    """A channel of one value has std 0: refused, naming it, also in float data, whose float64
    mean of n equal values need not be that value (a std of 1e-17, not 0); the statistics
    from before stay."""
    x = images(rng, np.uint8)
    norm = Normalization()
    norm.adapt(x)
    before = (norm.mean, norm.std)
    constant = x.copy()
    constant[..., 1] = 7
    with pytest.raises(InputError, match=r"channel 1 \(every value 7\) of the data is constant, "
                                         r"std 0.*drop that channel.*Normalization\(mean, std\)"):
        norm.adapt(constant)
    floats = images(rng, np.float64)
    floats[..., 0] = floats[..., 2] = 0.1
    with pytest.raises(InputError, match=r"channels 0 \(every value 0.1\), 2 \(every value 0.1\)"
                                         " of the data are constant"):
        norm.adapt(floats)
    assert (norm.mean, norm.std) == before


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
    ([np.ones((4, 2, 2)), np.ones((3, 2, 2))], None),  # (constant: refused for its std)
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
], ids=["empty", "no-batches", "empty-batch", "nan", "constant", "inf-in-batch", "overflow",
        "bool", "rank-1", "labels", "number"])
def test_bad_data_is_refused(data, message):
    with pytest.raises(InputError, match=message or "constant"):
        Normalization().adapt(data)


def test_adapt_fit_predict_save_load_bit_for_bit(rng, tmp_path):
    """Adapted before the model is built, the statistics train, predict, save and load; adapted
    again on the built (compiled, trained) model, predict uses the new ones at once, written
    into the arrays the kernels (and a captured CUDA graph) read, and predicts bit for bit
    as a model given those statistics."""
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
    assert (loaded.layers[0].mean, loaded.layers[0].std) == (model.layers[0].mean,
                                                             model.layers[0].std)
    np.testing.assert_array_equal(loaded.predict(x), probs)

    norm = model.layers[0]
    shift, scale = norm._shift, norm._scale
    x2 = (x // 2 + 60).astype(np.uint8)
    norm.adapt(x2)
    assert norm._shift is shift and norm._scale is scale
    given = xpcnn.Sequential(net(Normalization(*reference(x2))), input_shape=(6, 6, 3))
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
