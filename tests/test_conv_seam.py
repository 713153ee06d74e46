"""The convolution seam (xpcnn.ops.convolution): every engine that runs on a CPU gives the
standard Array API fallback's forward, input gradient and kernel gradient in float64 (the NumPy
kernels, the standard path under array_api_strict, and the hand-written CUDA kernels compiled
for the CPU by tests/cuda_emulator.py), and the fallback's gradients are the finite-difference
ones. The cuDNN engine has tests of its own (test_cudnn_conv.py, and test_gpu.py on a GPU)."""

import dataclasses
import sys

import array_api_compat.numpy as xpn
import array_api_strict as xs
import ml_dtypes
import numpy as np
import pytest
from cuda_emulator import load_emulated_fast_cupy, needs_compiler, restore
from gradcheck import assert_close, numeric_grad, sample_indices

import xpcnn
from xpcnn.backend import get_backend
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D
from xpcnn.ops.convolution import ConvGeometry, KernelsConv
from xpcnn.ops.fast_numpy import KERNELS as NUMPY_KERNELS
from xpcnn.ops.kernels import StandardKernels

# (per-sample input (H, W, C), filters, kernel, strides, padding)
GEOMETRIES = [
    ((7, 6, 3), 4, (3, 3), (1, 1), "same"),    # stride 1, same size: shared-patch gradients
    ((6, 6, 2), 5, (3, 3), (1, 1), "same"),    # more filters than channels
    ((8, 7, 3), 4, (3, 3), (2, 2), "same"),    # strided, asymmetric padding: col2im
    ((9, 8, 2), 3, (5, 3), (1, 2), "valid"),
    ((5, 5, 4), 3, (1, 1), (1, 1), "valid"),   # 1x1
    ((4, 5, 2), 3, (3, 3), (1, 1), 2),         # over-padded (pads >= kernel - 1)
    ((6, 6, 3), 2, (2, 2), (2, 2), "valid"),   # windows that do not overlap
    ((6, 5, 2), 3, (2, 2), (1, 1), "same"),    # pads (0, 1, 0, 1): more after than before
    ((7, 6, 2), 3, (5, 3), (1, 1), "same"),    # pads (2, 2, 1, 1): rows and columns differ
]
IDS = [f"{g[0]}-{g[1]}-{g[2]}-{g[3]}-{g[4]}" for g in GEOMETRIES]


def _geometry(case):
    shape, filters, kernel, strides, padding = case
    return ConvGeometry.of(shape, filters, kernel, strides, padding)


def conv_data(g, rng, n=3, dtype=np.float64):
    """Random x, w (K, kh, kw, C), bias and dy for ``n`` images of geometry ``g``."""
    x = rng.standard_normal((n, *g.in_hw, g.channels)).astype(dtype)
    w = rng.standard_normal((g.filters, *g.kernel, g.channels)).astype(dtype)
    bias = rng.standard_normal(g.filters).astype(dtype)
    dy = rng.standard_normal((n, *g.out_hw, g.filters)).astype(dtype)
    return x, w, bias, dy


def _standard(geometry, xp=xpn, budget=None):
    return KernelsConv(geometry, StandardKernels(xp), budget, min_chunks=1)


def _all_results(engine, x, w, bias, dy, to=np.asarray, xp_in=np.asarray):
    """Every output of the seam for one set of inputs, as host arrays."""
    x, w, bias, dy = (xp_in(a) for a in (x, w, bias, dy))
    y = engine.forward(x, w, bias, False)
    y_relu = engine.forward(x, w, bias, True)
    y_plain = engine.forward(x, w, None, False)
    dw, db = engine.weight_grad(x, dy, True)
    dw_masked, _ = engine.weight_grad(x, dy, False, relu_y=y_relu)
    dx = engine.input_grad(dy, w)
    both = engine.gradients(x, dy, w, True, True)
    both_masked = engine.gradients(x, dy, w, True, True, relu_y=y_relu)
    return [to(a) for a in (y, y_relu, y_plain, dw, db, dw_masked, dx, *both, *both_masked)]


def test_geometry_is_frozen_and_independent_of_the_batch():
    g = ConvGeometry.of((32, 32, 3), 16, (3, 3), (2, 2), "same")
    assert g == ConvGeometry((32, 32), 3, 16, (3, 3), (2, 2), (0, 1, 0, 1), (16, 16))
    assert g.taps == 27 and g.flops(4) == 2 * 4 * 16 * 16 * 16 * 27
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.filters = 8
    assert hash(g) == hash(ConvGeometry.of((32, 32, 3), 16, (3, 3), (2, 2), "same"))


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_standard_engine_gradients_match_finite_differences(case, rng):
    """The fallback's input and kernel gradients are those of sum(forward(x, w) * dy)."""
    g = _geometry(case)
    engine = _standard(g)
    x, w, bias, dy = conv_data(g, rng, n=2)

    def f():
        return float(np.sum(engine.forward(x, w, bias, False) * dy))

    dx = engine.input_grad(dy, w)
    dw, db = engine.weight_grad(x, dy, True)
    for idx in sample_indices(x.shape, 25, rng):
        assert_close(dx[idx], numeric_grad(f, x, idx), f"dx{idx}")
    for idx in sample_indices(w.shape, 25, rng):
        assert_close(dw[idx], numeric_grad(f, w, idx), f"dw{idx}")
    for idx in sample_indices(bias.shape, 5, rng):
        assert_close(db[idx], numeric_grad(f, bias, idx), f"db{idx}")


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_relu_is_applied_and_masks_the_kernel_gradient(case, rng):
    g = _geometry(case)
    engine = _standard(g)
    x, w, bias, dy = conv_data(g, rng)
    y = engine.forward(x, w, bias, False)
    np.testing.assert_array_equal(engine.forward(x, w, bias, True), np.maximum(y, 0))
    masked, _ = engine.weight_grad(x, dy, False, relu_y=np.maximum(y, 0))
    want, _ = engine.weight_grad(x, dy * (y > 0), False)
    np.testing.assert_allclose(masked, want, rtol=1e-12, atol=1e-12)
    # both gradients (and the bias's) read the masked output gradient
    got = engine.gradients(x, dy, w, True, True, relu_y=np.maximum(y, 0))
    for a, b in zip(got, engine.gradients(x, dy * (y > 0), w, True, True), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("budget", [None, 1], ids=["whole-batch", "one-image-chunks"])
def test_numpy_and_strict_engines_match_the_standard_one(case, budget, rng):
    g = _geometry(case)
    data = conv_data(g, rng)
    want = _all_results(_standard(g), *data)
    got_numpy = _all_results(KernelsConv(g, NUMPY_KERNELS, budget, min_chunks=1), *data)
    # (np.asarray: array_api_strict's __array__ raises from Python 3.12 on, its buffer reads)
    got_strict = _all_results(_standard(g, xs, budget), *data, xp_in=xs.asarray)
    for got in (got_numpy, got_strict):
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients_on_every_engine(case, rng):
    """(was: the standard engine, and so array_api_strict and PyTorch tensors, failed with a
    bare KeyError in its chunk sum, where the NumPy engine gave zeros)"""
    g = _geometry(case)
    data = conv_data(g, rng, n=0)
    engines = [(_standard(g), np.asarray, np.asarray),
               (KernelsConv(g, NUMPY_KERNELS, None, min_chunks=1), np.asarray, np.asarray),
               (_standard(g, xs), np.asarray, xs.asarray)]
    for engine, to, xp_in in engines:
        got = _all_results(engine, *data, to=to, xp_in=xp_in)
        y, _, _, dw, db, dw_masked, dx, *both = got
        assert y.shape == (0, *g.out_hw, g.filters) and dx.shape == (0, *g.in_hw, g.channels)
        assert dw.shape == (g.filters, *g.kernel, g.channels) and db.shape == (g.filters,)
        for grad in (dw, db, dw_masked, *both[:2], *both[3:5]):
            assert not np.any(grad)


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kernels", [StandardKernels(xpn), NUMPY_KERNELS],
                         ids=["standard", "numpy"])
def test_half_precision_outputs_and_input_gradients_keep_their_dtype(case, half, kernels, rng):
    """Under mixed precision a convolution's output and input gradient are in its half dtype
    (float16, or ml_dtypes' bfloat16, whose NumPy products come in float32), on every route:
    a strided input gradient's col2im product included; and close to float64's."""
    g = _geometry(case)
    data = conv_data(g, rng, dtype=half)
    engine = KernelsConv(g, kernels, None, min_chunks=1)
    x, w, bias, dy = data
    got = [engine.forward(x, w, bias, False), engine.input_grad(dy, w),
           engine.gradients(x, dy, w, True, True)[2]]  # (dw, db, dx)
    exact = _standard(g)
    x64, w64, bias64, dy64 = (a.astype(np.float64) for a in data)
    dx64 = exact.input_grad(dy64, w64)
    want = [exact.forward(x64, w64, bias64, False), dx64, dx64]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == np.dtype(half)
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a.astype(np.float64), b, rtol=0, atol=2e-2 * scale)


@pytest.fixture(scope="module")
def emulated_cupy_kernels():
    module, saved = load_emulated_fast_cupy()
    yield module.KERNELS
    restore(saved)


@needs_compiler
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("algorithm", ["tiled", "direct", "direct-forward", "im2col"])
def test_hand_written_cuda_engine_matches_the_standard_one(emulated_cupy_kernels, monkeypatch,
                                                           case, algorithm, rng):
    """The CuPy kernels' engine (tiled or one-element-per-thread CUDA kernels, run on the CPU
    by the emulator; with "direct-forward" the kernel gradient, with "im2col" all three, as
    im2col + matmul) in float64: all three operations."""
    fast = emulated_cupy_kernels
    conv = fast.conv_kernels
    for flag in ("runs_forward", "runs_weight_grad", "tiled"):
        monkeypatch.setattr(conv, flag, getattr(conv, flag))  # put back after the test
    conv.set_algorithm(algorithm)
    g = _geometry(case)
    data = conv_data(g, rng, n=2)
    want = _all_results(_standard(g), *data)
    engine = sys.modules[type(conv).__module__].HandWrittenConv(g, fast, None, min_chunks=1)
    got = _all_results(engine, *data)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_conv2d_keeps_keras_layout_outside_and_the_engines_layout_inside(rng):
    layer = Conv2D(5, (3, 2), padding="same")
    layer.build((6, 6, 3), "cpu", dtype="float64", rng=rng)
    assert layer.params["kernel"].shape == (5, 3, 2, 3)
    assert layer.params["kernel"].flags.c_contiguous
    kernel, bias = layer.get_weights()
    assert kernel.shape == (3, 2, 3, 5) and kernel.flags.c_contiguous
    new = rng.standard_normal(kernel.shape)
    layer.set_weights([new, bias])
    np.testing.assert_array_equal(layer.get_weights()[0], new)
    np.testing.assert_array_equal(layer.params["kernel"], np.transpose(new, (3, 0, 1, 2)))
    assert layer.params["kernel"].flags.c_contiguous
    with pytest.raises(InputError, match=r"must have shape \(3, 2, 3, 5\), got \(5, 3, 2, 3\)"):
        layer.set_weights([layer.params["kernel"], bias])
    # the same seed gives the same Keras-layout kernel as the initializer draws it
    again = Conv2D(5, (3, 2), padding="same")
    again.build((6, 6, 3), "cpu", dtype="float64", rng=np.random.default_rng(7))
    ref = xpcnn.layers.initializers.initialize("glorot_uniform", (3, 2, 3, 5), 18, 30,
                                               np.random.default_rng(7))
    np.testing.assert_array_equal(again.get_weights()[0], ref)


def test_each_backend_picks_its_engine():
    g = ConvGeometry.of((8, 8, 3), 4, (3, 3), (1, 1), "same")
    numpy_engine = NUMPY_KERNELS.conv_engine(g, get_backend("cpu"))
    assert isinstance(numpy_engine, KernelsConv) and numpy_engine.kern is NUMPY_KERNELS
    strict = get_backend(xs)
    std_engine = StandardKernels(xs).conv_engine(g, strict)
    assert isinstance(std_engine, KernelsConv) and std_engine.xp is xs
    assert std_engine.geometry is g
