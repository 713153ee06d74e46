"""Random numbers from a device-held state (xpcnn.ops.random) and the random layers that use
them: the definition against an independent SplitMix64 in Python integers, every fast path
against the definition bit for bit, the numbers' statistics, and the layers' state (counted on
the device, carried by ``to``, restored by checkpoints, sliced for data parallelism)."""

import importlib.util
import itertools
import math
import threading

import array_api_compat.numpy as xpn
import array_api_strict as xps
import numpy as np
import pytest
from cuda_emulator import load_emulated_fast_cupy, needs_compiler, restore

import xpcnn
from xpcnn.layers import Dropout, RandomCrop, RandomFlip
from xpcnn.ops import random
from xpcnn.ops.fast_numpy import KERNELS as NUMPY_KERNELS
from xpcnn.ops.kernels import StandardKernels

MASK = (1 << 64) - 1


def _splitmix_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _reference(seed, draw, count, bits, first=0):
    """Numbers ``first:first + count`` of draw ``draw`` of ``seed``, in Python integers."""
    gamma = 0x9E3779B97F4A7C15
    key = _splitmix_mix((_splitmix_mix(seed) + (draw + 1) * gamma) & MASK)
    return np.array([(_splitmix_mix((key + (first + i + 1) * gamma) & MASK) >> (64 - bits))
                     * 2.0**-bits for i in range(count)])


def _host(a):
    return np.asarray(a.cpu() if hasattr(a, "cpu") else a).astype(np.float64)


NAMESPACES = [("numpy", xpn), ("array_api_strict", xps)]
if importlib.util.find_spec("torch") is not None:  # the torch backend, where installed
    import array_api_compat.torch as xpt

    NAMESPACES.append(("torch", xpt))
CASES = [pytest.param(xp, dtype, bits, id=f"{name}-{dtype}") for name, xp in NAMESPACES
         for dtype, bits in (("float16", 11), ("float32", 24), ("float64", 53))
         if hasattr(xp, dtype)]  # (array_api_strict has no float16)


@pytest.mark.parametrize("xp, dtype, bits", CASES)
def test_the_definition_is_splitmix64(xp, dtype, bits):
    for seed, draw, first in ((0, 0, 0), (2**31 - 1, 12345, 7), (2**62 + 3, 2**40, 2**35)):
        state = xp.asarray([seed, draw], dtype=xp.int64)
        u = random.uniform(xp, state, (3, 4), getattr(xp, dtype), first)
        assert u.dtype == getattr(xp, dtype) and tuple(u.shape) == (3, 4)
        np.testing.assert_array_equal(_host(u).ravel(), _reference(seed, draw, 12, bits, first))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, first", [((5,), 0), ((70000,), 3), ((3, 40000, 2), 2**36)])
def test_the_numpy_kernel_is_the_definition(dtype, shape, first):
    """Chunks of 32,768 on the threads, every chunk's offset right (shapes span several); the
    draw counted."""
    state = np.array([987654321, 41], np.int64)
    want = random.uniform(xpn, state, shape, dtype, first)
    got = NUMPY_KERNELS.uniform(state, shape, dtype, first)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(state, [987654321, 42])


def _dropout_cases(kernels, dtype):
    """What ``kernels.dropout`` and the gradient's scaled ``mask_multiply`` give, and the
    standard versions' values, for a few shapes (an empty one too), offsets and rates, each
    drawing from its own copy of a state and counting its draw there: the states after."""
    std, rng = StandardKernels(xpn), np.random.default_rng(3)
    state = np.array([2**40 + 17, 123], np.int64)
    states = [state.copy(), state.copy()]
    for shape, first, rate in (((40, 37), 0, 0.25), ((3, 5, 7), 2**33 + 1, 0.5), ((6,), 4, 0.9),
                               ((0, 3), 0, 0.5)):
        x = rng.standard_normal(shape).astype(dtype)
        (y, keep), (y_want, keep_want) = (k.dropout(s, x, rate, first)
                                          for k, s in zip((kernels, std), states, strict=True))
        yield y, y_want
        yield keep, keep_want
        yield tuple(states)
        grads = (k.mask_multiply(x, keep_want, 1.0 / (1.0 - rate)) for k in (kernels, std))
        yield tuple(grads)
    keep = np.ones(1, bool)  # (a mask that broadcasts, as a ReLU's gradient has none)
    yield tuple(k.mask_multiply(x, keep, 1.5) for k in (kernels, std))
    np.testing.assert_array_equal(states[0], [2**40 + 17, 127])  # (one draw counted a call)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dropout_is_the_standard_dropout(dtype):
    """Bit for bit: the draw (the definition's numbers), the mask and the scaled output."""
    for got, want in _dropout_cases(NUMPY_KERNELS, dtype):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cuda_dropout_is_the_standard_dropout(dtype):
    """fast_cupy's dropout in one launch, the draw counted by the last of its blocks (and the
    gradient's scaled mask), compiled for the CPU (CuPy's float16 emulated), bit for bit."""
    module, saved = load_emulated_fast_cupy()
    try:
        for got, want in _dropout_cases(module.KERNELS, dtype):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert not any(c.any() for c in module._COUNTERS.values())  # (back to 0 for the next)
    finally:
        restore(saved)


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_cuda_kernel_is_the_definition(dtype):
    """fast_cupy's kernel, compiled for the CPU (tests/cuda_emulator.py), the draw counted by
    the last of its blocks (an empty draw: counted by the standard version)."""
    module, saved = load_emulated_fast_cupy()
    try:
        state = np.array([2**40 + 17, 123], np.int64)
        for shape, first in (((40, 37), 0), ((3, 5), 2**33 + 1), ((0, 2), 0)):
            want = random.uniform(xpn, state, shape, dtype, first)
            got = module.KERNELS.uniform(state, shape, dtype, first)
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(state, [2**40 + 17, 126])
        assert not any(c.any() for c in module._COUNTERS.values())
    finally:
        restore(saved)


def test_the_numbers_look_uniform_and_independent():
    std = StandardKernels(xpn)
    n = 1 << 20
    u = std.uniform(np.array([5, 0], np.int64), (n,), np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * (1 / 12 / n) ** 0.5  # five standard errors
    assert abs(u.var() - 1 / 12) < 1e-3
    counts = np.bincount((u * 256).astype(int), minlength=256)
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert chi2 < 255 + 6 * (2 * 255) ** 0.5  # 255 degrees of freedom, six sigma
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / n**0.5  # neighbours
    # other draws, other seeds: uncorrelated with this one
    for state in ([5, 1], [6, 0], [5, 2**32]):
        v = std.uniform(np.array(state, np.int64), (n,), np.float64)
        assert abs(np.corrcoef(u, v)[0, 1]) < 5 / n**0.5


def test_float16_numbers_stay_below_one():
    u = StandardKernels(xpn).uniform(np.array([1, 2], np.int64), (1 << 16,), np.float16)
    assert u.dtype == np.float16 and u.max() < 1.0 and len(np.unique(u)) == 2048


def test_a_slice_of_a_draw_is_those_elements_of_the_whole_draw():
    """What a data-parallel rank holding samples 3:7 of a batch of 10 draws."""
    std = StandardKernels(xpn)
    whole = std.uniform(np.array([77, 9], np.int64), (10, 4, 5), np.float32)
    np.testing.assert_array_equal(
        std.uniform(np.array([77, 9], np.int64), (4, 4, 5), np.float32, first=3 * 20),
        whole[3:7])


def _layers():
    return [RandomFlip(), RandomCrop(2), Dropout(0.5)]


def test_random_layers_count_their_draws_on_the_device():
    model = xpcnn.Sequential([*_layers(), xpcnn.layers.Flatten(), xpcnn.layers.Dense(3)],
                             seed=4, device=xps)
    model.compile(optimizer="sgd")
    model.build((6, 6, 2))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 6, 6, 2), dtype=np.uint8), rng.integers(0, 3, 20)
    randoms = model.layers[:3]
    states = [la.random_state for la in randoms]
    seeds = [la.seed for la in randoms]
    assert len(set(seeds)) == 3 and [la.calls for la in randoms] == [0, 0, 0]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)  # 3 batches an epoch
    assert [la.calls for la in randoms] == [6, 6, 6] and [la.seed for la in randoms] == seeds
    # counted in place: a captured step goes on reading the arrays it was captured with
    assert all(la.random_state is s for la, s in zip(randoms, states, strict=True))
    model.predict(x)  # inference draws nothing
    assert [la.calls for la in randoms] == [6, 6, 6]


@pytest.mark.parametrize("dtype, rate", [
    ("float16", 0.5), ("float16", 0.3), ("float16", 0.99), ("float16", 0.9995),
    ("float16", 1 - 2**-11), ("bfloat16", 0.5), ("bfloat16", 0.99), ("bfloat16", 0.9),
    ("float32", 0.5), ("float32", 0.2), ("float64", 0.2), ("float32", 0.45),
    ("float32", 0.9999)])
def test_dropout_scales_by_the_share_its_draw_keeps(dtype, rate):
    """Kept where the definition's number is at least the rate rounded up to the draw's step,
    2**-bits (the share dropped: never below the rate), times the inverse of the share of the
    draw's numbers that are (every multiple of 2**-bits below 1 is one): the expected output
    is the input, and at 1/2 the output is as before, bit for bit. Was times 1 / (1 - rate):
    at 0.9995 in float16, where the draw keeps 2**-11 of the elements, not 0.0005, a mean 0.98
    times the input; at 0.99 in bfloat16, which draws 0.9921875, 0.78 times. (The rate was
    rounded to the dtype before it was rounded up: at 0.9 and 0.99 bfloat16 dropped less than
    the rate, 0.8984375 and 0.98828125.)"""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    layer = Dropout(rate)
    layer.build((16, 32), "cpu", dtype=dtype, rng=np.random.default_rng(5))
    t = layer.dtype
    x = np.random.default_rng(0).standard_normal((128, 16, 32)).astype(t)
    state = np.array([layer.seed, 0], np.int64)
    bits = random.significant_bits(xpn, t)
    drawn = math.ceil(rate * 2**bits) / 2**bits  # (exact: a multiple of 2**-bits)
    share = 1 - drawn  # (the draw's 2**bits numbers at least drawn, counted)
    if bits >= 24 and abs(share - (1 - rate)) <= 2**-16 * (1 - rate):
        # (1 / (1 - rate), as PyTorch and Keras scale, and as before, but where the draw's
        # share kept differs by more than 2**-16 of it: at 0.9999 in float32, by 4.3e-4)
        drawn, share = rate, 1 - rate
    keep = random.uniform(xpn, state, x.shape, t) >= np.asarray(drawn, t)
    assert drawn >= rate
    scale = np.asarray(1 / share, t)
    y = layer.forward(x, training=True)
    dx = layer.backward(np.flip(x, 0))
    assert keep.any() and y.dtype == dx.dtype == t and np.isfinite(scale)
    np.testing.assert_array_equal(y, np.where(keep, x * scale, 0))
    np.testing.assert_array_equal(dx, np.where(keep, np.flip(x, 0) * scale, 0))


def test_a_draw_depends_on_the_state_alone():
    """Set back to the same (seed, calls), a layer draws the same mask; moved to another
    backend it keeps its state."""
    layer = Dropout(0.5)
    layer.build((8, 8, 3), "cpu", dtype="float32", rng=np.random.default_rng(1))
    x = np.ones((4, 8, 8, 3), np.float32)
    layer.forward(x, training=True)
    second = layer.forward(x, training=True)
    layer.set_random_state(layer.seed, 1)
    np.testing.assert_array_equal(layer.forward(x, training=True), second)
    assert layer.calls == 2
    seed = layer.seed
    layer.to(xpcnn.backend.get_backend(xps))
    assert (layer.seed, layer.calls) == (seed, 2)
    third = layer.forward(xps.asarray(x), training=True)
    layer.to(xpcnn.backend.get_backend("cpu"))
    layer.set_random_state(seed, 2)
    np.testing.assert_array_equal(layer.forward(x, training=True), np.asarray(third._array))


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float64])
def test_flips_and_crops_are_drawn_in_float32_whatever_the_images_dtype(dtype):
    """uint8 has no numbers in [0, 1): drawn in the images' dtype, every flip and offset would
    be the same. Both layers act on images as given to them, in their own dtype."""
    x = np.arange(64 * 6 * 6 * 1).reshape(64, 6, 6, 1).astype(dtype)
    flip, crop = RandomFlip(), RandomCrop(1)
    for layer in (flip, crop):
        layer.build((6, 6, 1), "cpu", dtype="float32", rng=np.random.default_rng(0))
    flipped = np.all(flip.forward(x, training=True) == x[:, :, ::-1, :], axis=(1, 2, 3))
    assert 16 < flipped.sum() < 48  # about half of them
    cropped = crop.forward(x, training=True)
    assert cropped.dtype == x.dtype
    same = np.all(cropped == x, axis=(1, 2, 3))
    assert 0 < same.sum() < 20  # the centre offset (1 of 9) for about a ninth of them


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding", [1, 4])
def test_the_crop_kernels_are_the_standard_crop(dtype, padding):
    """NumPy's (a slice copy per image) and CuPy's (one launch, the draw included, compiled for
    the CPU here) random crops against the standard where() version, each counting its draws on
    its own copy of a state, from images of the dtype and uint8 images cast as they are read,
    at an offset ``first`` (a data-parallel slice)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 7, 9, 3)).astype(dtype)
    images = (rng.random(x.shape) * 256).astype(np.uint8)  # (a model's batch)
    std = StandardKernels(xpn)
    module, saved = load_emulated_fast_cupy()
    try:
        states = [np.array([2**40 + 17, 123], np.int64) for _ in range(3)]
        for source, first in ((x, 0), (images, 2**33 + 1), (images[:0], 0)):
            want = std.random_crop(states[0], source, padding, dtype, first)
            assert want.shape == source.shape and want.dtype == dtype
            for kernels, state in zip((NUMPY_KERNELS, module.KERNELS), states[1:], strict=True):
                got = kernels.random_crop(state, source, padding, dtype, first)
                assert got.dtype == dtype
                np.testing.assert_array_equal(got, want)
        for state in states:  # (one draw counted a call)
            np.testing.assert_array_equal(state, [2**40 + 17, 126])
        assert not any(c.any() for c in module._COUNTERS.values())
    finally:
        restore(saved)


def test_the_standard_crop_is_the_drawn_crop():
    """Offsets floor(u * (2p + 1)) from the draw's float32 numbers (rows, then columns; the
    definition), each among all 2p + 1: image n shifted by p - offset, zeros coming in."""
    p, state = 2, np.array([5, 9], np.int64)
    x = (np.arange(300 * 6 * 7) % 251 + 1).reshape(300, 6, 7, 1).astype(np.uint8)
    u = random.uniform(xpn, state, (300, 2), np.float32, 4)
    offsets = np.floor(u * np.float32(2 * p + 1)).astype(int)
    got = StandardKernels(xpn).random_crop(state, x, p, np.float64, 4)
    assert got.dtype == np.float64 and {*offsets.ravel()} == set(range(2 * p + 1))
    xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    for n, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(got[n], xpad[n, dy:dy + 6, dx:dx + 7])
    np.testing.assert_array_equal(state, [5, 10])

def _flip_cases(kernels):
    """What ``kernels.random_flip`` and the standard version give, each counting its draws on
    its own copy of a state: uint8 images cast to float32 and float16, float64 ones kept, at
    offsets ``first`` (a data-parallel slice) and an empty batch."""
    std, rng = StandardKernels(xpn), np.random.default_rng(5)
    state = np.array([2**40 + 17, 123], np.int64)
    states = [state.copy(), state.copy()]
    for shape, first, source, out in (((64, 3, 5, 2), 0, np.uint8, np.float32),
                                      ((9, 4, 4, 3), 2**33 + 1, np.uint8, np.float16),
                                      ((7, 2, 6, 1), 3, np.float64, np.float64),
                                      ((0, 3, 3, 1), 0, np.uint8, np.float32)):
        x = (rng.random(shape) * 256).astype(source)
        got, want = (k.random_flip(s, x, out, first)
                     for k, s in zip((kernels, std), states, strict=True))
        yield got, want
        yield tuple(states)
    np.testing.assert_array_equal(states[0], [2**40 + 17, 127])  # (one draw counted a call)


def test_the_standard_flip_is_the_drawn_flip():
    """Image n mirrored where number first + n of the draw (float32, the definition) is below
    1/2: the flips a layer drew before it cast its input itself."""
    state = np.array([99, 7], np.int64)
    x = np.arange(40 * 2 * 3 * 1).reshape(40, 2, 3, 1).astype(np.uint8)
    flips = random.uniform(xpn, state, (40, 1, 1, 1), np.float32, 5) < 0.5
    got = StandardKernels(xpn).random_flip(state, x, np.float32, 5)
    assert got.dtype == np.float32 and 10 < flips.sum() < 30
    np.testing.assert_array_equal(got, np.where(flips, x[:, :, ::-1], x).astype(np.float32))
    np.testing.assert_array_equal(state, [99, 8])


@needs_compiler
def test_the_cuda_flip_is_the_standard_flip():
    """fast_cupy's flip in one launch (the draw, the flip and the cast), compiled for the CPU,
    bit for bit, the draw counted by the last of its blocks."""
    module, saved = load_emulated_fast_cupy()
    try:
        for got, want in _flip_cases(module.KERNELS):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert not any(c.any() for c in module._COUNTERS.values())
    finally:
        restore(saved)


@pytest.mark.parametrize("device, precision", [(xps, "float32"), ("cpu", "float32"),
                                               ("cpu", "mixed_float16")])
def test_augmented_models_cast_their_uint8_batch_in_the_random_layers(device, precision):
    """The flips and crops that fixed seeds give are those of the draws' definition applied to
    the batch cast first (what the model did before its random layers cast it as they read
    it); under mixed precision the uint8 images are given in float16 (exact), and the
    Rescaling after them computes in float32 and gives float16."""
    model = xpcnn.Sequential([RandomFlip(), RandomCrop(1), xpcnn.layers.Rescaling(1 / 255)],
                             seed=11, device=device)
    model.compile(optimizer="sgd", precision=precision)
    model.build((5, 6, 2))
    flip, crop, rescale = model.layers
    assert model._plan().cast_input
    x = np.random.default_rng(2).integers(0, 256, (16, 5, 6, 2), dtype=np.uint8)
    flip.set_random_state(flip.seed, 3)
    crop.set_random_state(crop.seed, 4)
    host = model.backend.to_numpy
    y = host(model._logits(model.backend.asarray(x), training=True))
    assert y.dtype == (np.float32 if precision == "float32" else np.float16)
    # the definition, by hand, on the batch cast to float32 first
    std = StandardKernels(xpn)
    flips = random.uniform(xpn, np.array([flip.seed, 3]), (16, 1, 1, 1), np.float32) < 0.5
    xf = x.astype(np.float32)
    want = std.random_crop(np.array([crop.seed, 4]), np.where(flips, xf[:, :, ::-1], xf), 1,
                           np.float32)
    want = (want * np.float32(1 / 255)).astype(y.dtype)
    np.testing.assert_array_equal(y, want)
    assert (flip.calls, crop.calls) == (4, 5)
    # inference: the batch cast, untouched
    y = host(model._logits(model.backend.asarray(x), training=False))
    np.testing.assert_array_equal(y, (xf * np.float32(1 / 255)).astype(want.dtype))


def test_layers_built_outside_a_model_each_draw_their_own_numbers():
    """A layer called on a batch or built by itself draws from its own generator, the n-th
    such build's of the process (as Keras' global seed generator): two alike get other
    weights and other masks (was: every one from default_rng(0), twins), and a model built
    from them keeps them apart; a fresh process gives the same numbers again."""
    from xpcnn.layers import Conv2D, Dense

    x = np.ones((4, 8), np.float32)
    a, b = Dense(8), Dense(8)
    b(a(x))
    assert not np.array_equal(a.get_weights()[0], b.get_weights()[0])
    c1, c2 = Conv2D(4, 3), Conv2D(4, 3)
    c1.build((6, 6, 2))
    c2.build((6, 6, 2))
    assert not np.array_equal(c1.get_weights()[0], c2.get_weights()[0])
    d1, d2 = Dropout(0.5), Dropout(0.5)
    assert not np.array_equal(d1(x, training=True) == 0, d2(x, training=True) == 0)
    assert d1.seed != d2.seed
    m = xpcnn.Sequential([xpcnn.Input((8,)), a, xpcnn.layers.ReLU(), b], seed=3)
    assert not np.array_equal(m.layers[0].get_weights()[0], m.layers[2].get_weights()[0])
    # a model's own builds are its seed's, whatever was built outside it before
    fresh = [xpcnn.Sequential([xpcnn.Input((8,)), Dense(8), Dropout(0.5)], seed=3)
             for _ in range(2)]
    np.testing.assert_array_equal(fresh[0].get_weights()[0], fresh[1].get_weights()[0])
    assert fresh[0].layers[1].seed == fresh[1].layers[1].seed
    # reproducible: the same numbers in two fresh processes
    import subprocess
    import sys

    code = ("import numpy as np; from xpcnn.layers import Dense, Dropout; "
            "a, b = Dense(3), Dense(3); a.build((4,)); b.build((4,)); d = Dropout(0.5); "
            "d.build((4,)); print(np.concatenate([a.get_weights()[0].ravel(), "
            "b.get_weights()[0].ravel()]).tolist(), d.seed)")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.parametrize("layer", [Dropout(0.5), RandomFlip(), RandomCrop(1)],
                         ids=["Dropout", "RandomFlip", "RandomCrop"])
def test_random_layers_take_a_big_endian_batch_as_a_native_one(layer):
    """A big-endian float32 batch (NumPy's ``>f4``, read from a file) is computed as the same
    native one, as Conv2D takes it (was: Dropout refused it, "unsupported dtype >f4;
    expected ... float32")."""
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    layer.build((4, 4, 3), "cpu")
    layer.set_random_state(7, 0)
    native = np.asarray(layer(x, training=True))
    layer.set_random_state(7, 0)
    swapped = np.asarray(layer(x.astype(">f4"), training=True))
    np.testing.assert_array_equal(swapped, native)
    assert layer.calls == 1


def test_a_random_layer_says_whether_a_training_pass_draws():
    """What a data-parallel rank with no sample skips (distributed.DataParallel.empty_step):
    a draw only where a training pass would count one; Dropout at rate 0 draws none."""
    x = np.ones((2, 4, 4, 3), np.float32)
    for layer in (Dropout(0.0), Dropout(0.3), RandomFlip(), RandomCrop(1)):
        layer.build((4, 4, 3), "cpu")
        layer(x, training=True)
        assert layer.draws_in_training() == (layer.calls == 1)
    assert not Dropout(0.0).draws_in_training()


def test_a_loaded_models_random_layers_draw_the_streams_of_its_seed(tmp_path):
    """A model file's size check built the layers on trial with one generator, and the model
    kept them: every random layer of a loaded model had the same seed (two Dropouts dropped the
    same elements), whatever the model's seed. Now each draws the stream a model of its seed
    gives it ([seed, k]), loaded by load_model or by load_weights into an unbuilt twin."""
    from xpcnn.layers import Dense, Flatten, Softmax

    def make(seed):
        return xpcnn.Sequential([RandomFlip(), RandomCrop(2), Flatten(), Dropout(0.5), Dense(8),
                                 Dropout(0.5), Dense(3), Softmax()], seed=seed)

    def seeds(model):
        return [la.seed for la in model.layers if hasattr(la, "random_state")]

    for seed in (0, 7):
        model = make(seed)
        model.build((8, 8, 1))
        model.save(tmp_path / "m.npz")
        assert len(set(seeds(model))) == 4
        assert seeds(xpcnn.load_model(tmp_path / "m.npz")) == seeds(model)
        twin = make(seed)
        twin.load_weights(tmp_path / "m.npz")
        assert seeds(twin) == seeds(model)


def test_settings_assigned_after_build_are_checked_as_the_constructor_checks_them():
    """Setting values assigned to a built layer were taken unchecked: BatchNorm2D.momentum = 5
    made the next fit's running variance negative, RandomCrop.padding = -2 a bare NumPy
    ValueError inside fit, ReLU.max_value = -1 was kept, BatchNorm2D.eps = -1 a NonFiniteError
    once training began. Each is refused with the constructor's own message; the old value
    stays and no change is counted (no CUDA-graph step captured again)."""
    from xpcnn.errors import InputError
    from xpcnn.layers import (
        BatchNorm2D,
        Conv2D,
        Dense,
        FeatureNorm,
        Flatten,
        Layer,
        ReLU,
        Rescaling,
    )

    rng = np.random.default_rng(0)
    x, y = rng.random((4, 6, 6, 1)).astype(np.float32), np.arange(4) % 2
    crop, bn, relu, norm, scale = (RandomCrop(1), BatchNorm2D(), ReLU(), FeatureNorm(),
                                   Rescaling(0.5))
    drop = Dropout(0.1)
    model = xpcnn.Sequential([scale, crop, Conv2D(2, 3), norm, bn, relu, drop, Flatten(),
                              Dense(2)], seed=0)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    model.fit(x, y, epochs=1, verbose=0)
    refused = [(crop, "padding", -2), (crop, "padding", 2.0), (crop, "padding", 2**15),
               (relu, "max_value", -1.0), (relu, "max_value", "6"), (bn, "momentum", 5.0),
               (bn, "momentum", math.nan), (bn, "eps", -1.0), (norm, "eps", 0.0),
               (scale, "scale", math.inf), (scale, "offset", None), (drop, "rate", 1.0)]
    for layer, name, value in refused:
        old, changes = getattr(layer, name), Layer.settings_changes
        with pytest.raises(InputError) as refusal:
            setattr(layer, name, value)
        with pytest.raises(InputError) as constructor:
            type(layer)(**{"scale": 1.0, name: value} if layer is scale else {name: value})
        assert str(refusal.value) == str(constructor.value)
        assert getattr(layer, name) == old and Layer.settings_changes == changes
    # a good value is taken as the constructor takes it (a float, an int) and counted once
    changes = Layer.settings_changes
    bn.momentum, crop.padding, relu.max_value = 0, np.int64(2), 6
    assert (bn.momentum, crop.padding, relu.max_value) == (0.0, 2, 6.0)
    assert type(bn.momentum) is float and type(crop.padding) is int
    assert Layer.settings_changes == changes + 3
    model.fit(x, y, epochs=1, verbose=0)
    assert np.all(bn.get_weights()[3] >= 0)


def test_dropout_rate_assigned_after_build_is_checked_for_the_layers_dtypes():
    """Under mixed_float16 a rate of 0.99999 (which float16 rounds to 1) assigned to a built
    Dropout was taken, and the next training step raised, with the bad rate kept. It is
    checked as build checks it (the layer's dtype and compute dtype): refused with build's
    message, the old rate kept, nothing counted."""
    from xpcnn.errors import InputError
    from xpcnn.layers import Conv2D, Dense, Flatten, Layer, ReLU

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, 16)
    drop = Dropout(0.5)
    model = xpcnn.Sequential([Conv2D(4, 3), ReLU(), Flatten(), drop, Dense(3)], seed=0)
    model.compile(loss="cross_entropy", optimizer="adam", precision="mixed_float16")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    changes = Layer.settings_changes
    with pytest.raises(InputError, match="cannot be drawn in float16"):
        drop.rate = 0.99999
    assert drop.rate == 0.5 and Layer.settings_changes == changes
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # (still trains, at 0.5)
    drop.rate = 0.999  # (float16 draws it)
    assert drop.rate == 0.999 and Layer.settings_changes == changes + 1
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)


def test_layers_built_outside_a_model_draw_no_models_streams(monkeypatch):
    """The n-th standalone build drew from [0, n], the generator of layer n of a model of the
    default seed 0: a RandomFlip called on a batch before such a model's first RandomFlip
    flipped every image twice or never (64 of 64 back to the original), and a Dense built
    alone got the weights of a model's Dense at its index. A standalone key is none of a
    model's [seed, k], whatever the seed (2**32 and k = 1: the words of [0, 1, 1])."""
    from xpcnn.layers import Dense, Flatten
    from xpcnn.layers import base as layer_base

    monkeypatch.setattr(layer_base, "_STANDALONE_BUILDS", itertools.count())  # (a fresh process)
    x = np.random.default_rng(0).random((64, 4, 4, 1)).astype(np.float32)
    augment = RandomFlip()
    xa = np.asarray(augment(x))  # (standalone build 0)
    dense = Dense(8)
    dense.build((8,))  # (standalone build 1)
    model = xpcnn.Sequential([RandomFlip(), Flatten(), Dense(2)], seed=0)
    model.build((4, 4, 1))
    y = np.asarray(model.layer_outputs(xa, training=True)[0])
    assert 16 < np.all(y == x, axis=(1, 2, 3)).sum() < 48  # (independent: about half)
    twin = xpcnn.Sequential([Dense(8), Dense(8)], seed=0)
    twin.build((8,))
    assert not np.array_equal(dense.get_weights()[0], twin.layers[1].get_weights()[0])
    alone = set()
    for _ in range(24):  # (standalone builds 2 to 25)
        layer = Dropout(0.5)
        layer.build((2,))
        alone.add(layer.seed)
    for seed in (0, 1, 2**32, 2**64 + 5):
        model = xpcnn.Sequential([Dropout(0.5) for _ in range(26)], seed=seed)
        model.build((2,))
        assert not alone & {la.seed for la in model.layers}, seed


def test_a_draw_is_read_and_counted_in_one_step(monkeypatch):
    """A thread between reading a draw and counting it holds back another thread's read (review
    R1: the test below passes on code that reads the draw, then counts it unlocked; here the
    second thread read the same draw in that window)."""
    state = np.array([12345, 7], np.int64)
    key = random.draw_key
    first_read, second_read = threading.Event(), threading.Event()

    def draw_key(s):
        k = key(s)
        if not first_read.is_set():
            first_read.set()
            second_read.wait(0.5)  # (the other thread reads here, unless it is held back)
        else:
            second_read.set()
        return k

    monkeypatch.setattr(random, "draw_key", draw_key)
    keys = [None, None]

    def take(i: int) -> None:
        keys[i] = np.asarray(random.take_draw(state)).copy()

    first = threading.Thread(target=take, args=(0,))
    first.start()
    assert first_read.wait(10)
    second = threading.Thread(target=take, args=(1,))
    second.start()
    first.join(10)
    second.join(10)
    assert keys[0].tobytes() != keys[1].tobytes()  # (draws 7 and 8)
    np.testing.assert_array_equal(state, [12345, 9])


@pytest.mark.parametrize("kernels", ["numpy", "array_api_strict"])
def test_two_threads_drawing_from_one_state_take_two_draws(kernels, monkeypatch):
    """A draw's number was read, its numbers computed (the GIL released), and only then
    counted: a thread reading the state in between drew the same numbers (two threads calling
    one Dropout got one mask, twice). Here each thread waits, while computing its numbers,
    until the other computes its own: they were one draw, counted twice; now two draws."""
    barrier = threading.Barrier(2, timeout=10)
    waited = threading.local()

    def wait_once() -> None:  # (a thread's first computation of numbers: its draw's)
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait()

    if kernels == "numpy":
        k, xp, state = NUMPY_KERNELS, np, np.array([12345, 7], np.int64)
        chunks = type(k).for_chunks  # (computes the numbers from the draw's key)

        def for_chunks(self, *args):
            wait_once()
            return chunks(self, *args)

        monkeypatch.setattr(type(k), "for_chunks", for_chunks)
    else:
        k, xp = StandardKernels(xps), xps
        state = xps.asarray([12345, 7], dtype=xps.int64)
        arange = xps.arange  # (the numbers' indices, made once the draw's key is)

        def waiting_arange(*args, **kwargs):
            wait_once()
            return arange(*args, **kwargs)

        monkeypatch.setattr(xps, "arange", waiting_arange)
    drawn = [None, None]

    def draw(i: int) -> None:
        drawn[i] = np.asarray(k.uniform(state, (1000,), xp.float64))

    workers = [threading.Thread(target=draw, args=(i,)) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not barrier.broken
    want = [np.asarray(random.uniform(xpn, np.array([12345, d]), (1000,), np.float64))
            for d in (7, 8)]
    assert {u.tobytes() for u in drawn} == {u.tobytes() for u in want}  # (draws 7 and 8)
    np.testing.assert_array_equal(np.asarray(state), [12345, 9])
