"""The CUDA kernels behind ``xpcnn.ops.fast_cupy`` (``xpcnn.ops.cuda_elementwise``,
``cuda_reductions``, ``cuda_random``, ``cuda_updates``) and ``xpcnn.ops.cuda_conv``, compiled
for the CPU (tests/cuda_emulator.py), give the standard versions' results: their index
arithmetic, bounds and formulas are checked on every machine, not only where a GPU is lent
(tests/test_gpu.py checks them on the GPU, float16 included)."""

import contextlib
import sys

import array_api_compat.numpy as xpn
import ml_dtypes
import numpy as np
import pytest
from cuda_emulator import (
    ElementwiseKernel,
    RawKernel,
    load_emulated_fast_cupy,
    needs_compiler,
    needs_host_fma,
    restore,
)
from kernel_cases import (
    CLIPPED,
    CLIPPED_IDS,
    CONV_INPUT_GRAD,
    DIRECT_CONV,
    EVERY_MAX_POOL,
    GAP_NET_STEP_TABLES,
    IM2COL,
    MAX_POOL,
    OPTIMISERS,
    POOL_PADDED,
    RECORD_DTYPES,
    RECORD_SCALING,
    SOFTMAX_CROSS_ENTROPY,
    TILED_CONV,
    TOP_K,
    TOP_K_KS,
    UPDATE_SHAPES,
    assert_same,
    check_add_relu,
    check_max_pool_of_nonfinite_gradients,
    check_recorded_steps,
    device_scalars,
    gated_updates,
    record_checks,
    recorded_scales,
    recorded_steps,
    top_k_inputs,
    two_dtype_updates,
)
from nets import every_layer_net, gap_net

import xpcnn
from xpcnn.layers import BatchNorm2D, Conv2D, Dense, Flatten, ReLU, Softmax
from xpcnn.ops import im2col as ops
from xpcnn.ops import kernels as kernels_module
from xpcnn.ops import windows
from xpcnn.ops.convolution import ConvGeometry, KernelsConv
from xpcnn.ops.fast_numpy import NumpyKernels
from xpcnn.ops.kernels import StandardKernels
from xpcnn.ops.workspace import Workspace

pytestmark = needs_compiler

STD = StandardKernels(xpn)
DTYPES = [np.float32, np.float64]
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# (the elementwise kernels: CuPy's float16 and bfloat16 emulated too)
WITH_HALF = [np.float16, BFLOAT16, *DTYPES]


@pytest.fixture(scope="module")
def fast():
    module, saved = load_emulated_fast_cupy()
    yield module.KERNELS
    restore(saved)


def _poisoned(shape, dtype):
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -12345, dtype)


def test_tensor_core_kernels_that_do_not_compile_fall_back_with_a_warning(fast, monkeypatch,
                                                                         rng):
    """Where CUDA's headers or the GPU cannot build the tensor-core (TF32) kernels, float32
    convolutions run on the CUDA-core tiled kernels, with a warning, and give the same
    results; float16 ones go to the direct kernels."""
    conv = fast.conv_kernels
    module = sys.modules[type(conv).__module__]  # the emulated cuda_conv
    compile_error = module.cupy.cuda.compiler.CompileException

    class NoTensorCores(module.cupy.RawKernel):
        def compile(self):
            raise compile_error("mma.h(55): cannot open source file\nmore")

    monkeypatch.setattr(module.cupy, "RawKernel", NoTensorCores)
    monkeypatch.setattr(module, "_compute_capability", lambda: 90)
    monkeypatch.setattr(module, "_TILED", {})
    monkeypatch.setattr(conv, "tf32", True)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    w2 = rng.standard_normal((36, 5)).astype(np.float32)
    pads = (1, 1, 1, 1)
    with pytest.warns(RuntimeWarning, match="^xpcnn: the tensor-core convolution kernels did "
                      "not compile .*mma.h.* CUDA cores") as record:
        got = conv.conv2d(x, w2, None, (3, 3), (1, 1), pads, (6, 6), False)
    want = ops.conv_forward(xpn, STD, x, w2, None, (3, 3), (1, 1), pads, (6, 6),
                            Workspace(), "k", None, False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert record[0].filename == __file__  # (the caller's line: errors.warn)
    assert module._TILED[("xpcnn_conv_tiled", "float32", True)] is None
    assert module._TILED[("xpcnn_conv_tiled", "float32", False)] is not None
    with pytest.warns(RuntimeWarning, match="float16 convolutions run on the CUDA cores"):
        assert conv._tiled_for("xpcnn_conv_tiled", module._CONV_TILED_SOURCE,
                               np.float16) is None


@pytest.mark.parametrize("kernel, strides, shape, pads", IM2COL)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_im2col(fast, rng, kernel, strides, shape, pads, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    cols = (shape[0], *out_hw, kernel[0] * kernel[1] * shape[3])
    padded = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    want = STD.im2col_into(padded, _poisoned(cols, dtype), kernel, strides, out_hw)
    got = fast.im2col_into(x, _poisoned(cols, dtype), kernel, strides, out_hw, pads)
    assert_same(got, want)
    # into a block of a larger buffer (a chunk of the batch)
    big = _poisoned((2 * shape[0], *cols[1:]), dtype)
    fast.im2col_into(x, big[shape[0]:], kernel, strides, out_hw, pads)
    assert_same(big[shape[0]:], want)


@pytest.mark.parametrize("kernel, strides, shape", MAX_POOL)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_max_pool_and_its_gradient(fast, rng, kernel, strides, shape, dtype):
    x = rng.integers(0, 3, shape).astype(dtype)  # ties: the first maximum must win
    out_hw = windows.output_size(shape[1:3], kernel, strides, (0, 0, 0, 0))
    y = fast.max_pool(x, kernel, strides, out_hw)
    assert_same(y, STD.max_pool(x, kernel, strides, out_hw))
    dy = rng.standard_normal(y.shape).astype(dtype)
    for relu_grad in (False, True):  # True: the ReLU before the pool's gradient too
        assert_same(
            fast.max_pool_backward(x, y, dy, kernel, strides, out_hw, relu_grad),
            STD.max_pool_backward(x, y, dy, kernel, strides, out_hw, relu_grad))


@pytest.mark.parametrize("dtype", WITH_HALF)
def test_max_pool_of_negative_windows_and_nans(fast, rng, dtype):
    # (the kernel starts each maximum at the window's first element, as it reads it)
    x = -rng.integers(1, 4, (2, 6, 6, 3)).astype(dtype)
    x[0, 0, 0, 0] = x[0, 2, 3, 1] = x[1, 5, 5, 2] = np.nan  # first, inner and last of a window
    y = fast.max_pool(x, (2, 2), (2, 2), (3, 3))
    assert_same(y, STD.max_pool(x, (2, 2), (2, 2), (3, 3)))
    assert np.isnan(y).sum() == 3 and (y[~np.isnan(y)] < 0).all()


def _pool_launches(fast, monkeypatch):
    """The names of the pooling kernels launched from now on, in order."""
    module, launches = sys.modules[type(fast).__module__], []
    for name in ("MAX_POOL", "MAX_POOL_BACKWARD", "MAX_POOL_GATHER_BACKWARD", "AVG_POOL",
                 "AVG_POOL_BACKWARD", "GLOBAL_AVG_POOL", "GLOBAL_AVG_POOL_BACKWARD"):
        kernel = getattr(module, name)  # (as fast_cupy imported them: where it calls them)
        monkeypatch.setattr(module, name, lambda *a, kernel=kernel, **k:
                            launches.append(kernel.name) or kernel(*a, **k))
    return launches


@pytest.mark.parametrize("kernel, strides, shape, pads", POOL_PADDED)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_padded_and_overlapping_max_pools_take_one_launch_each_way(fast, monkeypatch, rng,
                                                                   kernel, strides, shape, pads,
                                                                   dtype):
    """The padding read as -inf in place (no padded copy), the gradient gathered per input
    element (windows overlapping, padded or not covering the input): the standard version's
    values on the padded input, bit for bit, each window's gradient to its first maximum,
    the padding's -inf included (a window whose real values are all -inf passes it to its
    padding, lost), summed in float32 where windows overlap."""
    launches = _pool_launches(fast, monkeypatch)
    x = rng.integers(-2, 3, shape).astype(dtype)  # ties: the first maximum must win
    x[0, :2, :2, 0] = -np.inf
    x[-1, -1, -1, -1] = np.nan
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    xpad = windows.pad(xpn, x, pads, -np.inf)
    y, routes = fast.max_pool_train(x, kernel, strides, out_hw, pads)
    assert_same(y, STD.max_pool(xpad, kernel, strides, out_hw))
    assert_same(fast.max_pool(x, kernel, strides, out_hw, pads), y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    for relu_grad in (False, True):
        got = fast.max_pool_backward(routes, y, dy, kernel, strides, out_hw, relu_grad, pads)
        want = STD.max_pool_backward(xpad, y, dy, kernel, strides, out_hw, relu_grad)
        assert got.shape == x.shape and got.flags.c_contiguous
        assert_same(got, windows.unpad(want, pads))
    assert launches == ["xpcnn_max_pool"] * 2 + ["xpcnn_max_pool_gather_backward"] * 2


@pytest.mark.parametrize("kernel, strides, shape, pads", EVERY_MAX_POOL)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_max_pool_routes_an_infinite_gradient_to_the_first_maximum_only(fast, rng, kernel,
                                                                        strides, shape, pads,
                                                                        dtype):
    """Both CUDA kernels (windows that tile the input, and gathered), the standard version and
    the NumPy fast path: inf and NaN output gradients where PyTorch puts them, no NaN spread
    over the window."""
    check_max_pool_of_nonfinite_gradients([STD, NumpyKernels(), fast], rng, kernel, strides,
                                          shape, pads, dtype)


@pytest.mark.parametrize("kernel, strides, shape, pads", POOL_PADDED)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_average_pools_take_one_launch_each_way(fast, monkeypatch, rng, kernel, strides, shape,
                                                pads, dtype):
    """AvgPool2D's mean over the real inputs (the padding read as 0 in place), summed in
    float32 and times the layer's inverse counts (float32 under mixed precision), and its
    gradient gathered per input element: the standard version's bits."""
    launches = _pool_launches(fast, monkeypatch)
    x = rng.standard_normal(shape).astype(dtype)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    ones = np.ones((1, *shape[1:3], 1))
    counts = STD.avg_pool(ones, kernel, strides, out_hw, pads, np.ones((1, *out_hw, 1)))
    inv = (1.0 / counts).astype(np.float64 if dtype == np.float64 else np.float32)
    y = fast.avg_pool(x, kernel, strides, out_hw, pads, inv)
    assert_same(y, STD.avg_pool(x, kernel, strides, out_hw, pads, inv))
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = fast.avg_pool_backward(dy, x.shape, kernel, strides, out_hw, pads, inv)
    assert got.shape == x.shape and got.flags.c_contiguous
    assert_same(got, STD.avg_pool_backward(dy, x.shape, kernel, strides, out_hw, pads, inv))
    assert launches == ["xpcnn_avg_pool", "xpcnn_avg_pool_backward"]


@needs_host_fma
@pytest.mark.parametrize("kernel, strides, shape, pads", POOL_PADDED)
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_average_pool_gradient_rounds_its_products_where_products_and_sums_fuse(
        fast, rng, monkeypatch, kernel, strides, shape, pads, dtype):
    """Built with NVRTC's default multiply-adds, AvgPool2D's gradient still rounds each
    g * inverse count before adding it to the sum of overlapping windows (xpcnn_mul_rn), as
    the standard version's separate operations do: its bits."""
    monkeypatch.setattr(ElementwiseKernel, "fused_multiply_add", True)
    shape = (8, *shape[1:])  # (more windows: more sums where a fused product would differ)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    ones = np.ones((1, *shape[1:3], 1))
    counts = STD.avg_pool(ones, kernel, strides, out_hw, pads, np.ones((1, *out_hw, 1)))
    inv = (1.0 / counts).astype(np.float64 if dtype == np.float64 else np.float32)
    dy = rng.standard_normal((shape[0], *out_hw, shape[3])).astype(dtype)
    assert_same(fast.avg_pool_backward(dy, shape, kernel, strides, out_hw, pads, inv),
                STD.avg_pool_backward(dy, shape, kernel, strides, out_hw, pads, inv))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 5, 33), (1, 1, 1, 2), (1, 256, 256, 1)])
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_global_average_pooling_gradient_is_written_whole(fast, monkeypatch, rng, shape,
                                                          dtype):
    """In one launch, C-contiguous (the layer before reads it with its own kernels, not a
    broadcast view's standard path): the standard version's shares, divided in float32 (a
    float16 65,536 would be inf, its gradient 0)."""
    launches = _pool_launches(fast, monkeypatch)
    dy = rng.standard_normal((shape[0], shape[3])).astype(dtype)
    got, want = fast.global_avg_pool_backward(dy, shape), STD.global_avg_pool_backward(dy, shape)
    assert got.shape == want.shape == shape and got.flags.c_contiguous
    assert_same(got, want)
    exact = dy.astype(np.float64)[:, None, None, :] / (shape[1] * shape[2])
    assert_same(got, np.broadcast_to(exact.astype(dtype), shape))  # (rounded once)
    assert launches == ["xpcnn_global_avg_pool_backward"]


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (3, 7, 5, 33), (1, 1, 1, 2)])
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_global_average_pooling(fast, rng, shape, dtype):
    """GlobalAvgPool2D's mean in one launch, summed in float32 (float64 for float64) and
    rounded once: float16 and bfloat16 means within one rounding of the exact mean (the
    standard version's too), float32 and float64 ones within their sums' rounding: 4,096 ones
    average to 1 in bfloat16, whose own sums stop at 256."""
    x = (rng.standard_normal(shape) + 1).astype(dtype)
    exact = x.astype(np.float64).mean(axis=(1, 2))
    got, want = fast.global_avg_pool(x), STD.global_avg_pool(x)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == exact.shape
    tol = {2: float(np.finfo(dtype).eps), 4: 1e-5, 8: 1e-12}[np.dtype(dtype).itemsize]
    for a in (got, want):
        np.testing.assert_allclose(a.astype(np.float64), exact, rtol=tol, atol=tol)
    ones = np.ones((1, 64, 64, 1), dtype)
    assert fast.global_avg_pool(ones)[0, 0] == STD.global_avg_pool(ones)[0, 0] == 1


@pytest.mark.parametrize("dtype", WITH_HALF)
def test_elementwise_kernels(fast, rng, dtype):
    x = rng.standard_normal((4, 5, 6, 7)).astype(dtype) * 4
    x[0, 0, 0, :3] = [0.0, 6.0, np.nan]
    for cap in (None, 6.0):
        assert_same(fast.relu(x, cap), STD.relu(x, cap))
        for got, want in zip(fast.relu_with_mask(x, cap), STD.relu_with_mask(x, cap),
                             strict=True):
            assert_same(got, want)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_same(fast.relu_backward(dy, x), STD.relu_backward(dy, x))
    mask = x > 0.5
    assert_same(fast.mask_multiply(dy, mask), STD.mask_multiply(dy, mask))
    assert_same(fast.mask_multiply(dy, mask[:1]),
                                  STD.mask_multiply(dy, mask[:1]))
    # a model's uint8 batch cast, scaled and shifted in one launch, and a batch already of the
    # dtype, given in the dtype or in another (a compute dtype)
    # (the source's cast to the dtype and the result's to ``out`` are apart in the kernel, each
    # a typedef of its own: each source and each ``out`` once, not crossed; was the 6 pairs)
    images = rng.integers(0, 256, x.shape).astype(np.uint8)
    pairs = [(images, dtype), (x, np.float16), (images, np.float64)]
    for source, out in pairs:
        for offset in (0.0, -0.75):
            got = fast.rescale(source, 1 / 255, offset, dtype, out)
            assert got.dtype == out
            assert_same(got, STD.rescale(source, 1 / 255, offset, dtype, out))
    # and normalised per channel in one launch (computed in the dtype, given in another)
    shift = rng.standard_normal(x.shape[-1]).astype(dtype) * 100
    scale = rng.random(x.shape[-1]).astype(dtype) * 3
    for source, out in pairs:  # (as the rescale's)
        got = fast.normalize(source, shift, scale, dtype, out)
        want = STD.normalize(source, shift, scale, dtype, out)
        assert got.dtype == want.dtype == out
        assert_same(got, want)
    assert_same(STD.normalize(images, shift, scale, dtype, dtype),
                                  (images.astype(dtype) - shift) * scale)
    # with the gradient of a ReLU before (a dropout's, apply_input_relu_grad), whose zeros are
    # not the dropout's (x > 0.5 as the mask would hide an ignored ReLU output): NaN * 0 is NaN
    keep = rng.random(x.shape) < 0.7
    relu_y = STD.relu(rng.standard_normal(x.shape).astype(dtype), None)
    dy[0, 0, 0, 0] = np.nan
    want = STD.mask_multiply(dy, keep, 1.5, relu_y)
    assert_same(fast.mask_multiply(dy, keep, 1.5, relu_y), want)
    ref = dy * keep * np.dtype(dtype).type(1.5) * (relu_y > 0)
    assert_same(want, ref)
    assert np.count_nonzero(want) < np.count_nonzero(dy * keep)
    a, b = rng.standard_normal((50, 7)).astype(dtype), rng.standard_normal((7, 6)).astype(dtype)
    for bias in (None, rng.standard_normal(6).astype(dtype)):
        for relu in (False, True):
            got, want = _poisoned((50, 6), dtype), _poisoned((50, 6), dtype)
            fast.matmul_into(a, b, got, bias, relu)
            STD.matmul_into(a, b, want, bias, relu)
            assert_same(got, want)


@pytest.mark.parametrize("dtype", WITH_HALF)
def test_add_relu_kernels(fast, rng, dtype):
    check_add_relu(fast, STD, rng, (4, 5, 6, 7), dtype)


def test_casting_many_arrays_in_one_launch(fast, rng):
    """A mixed-precision forward pass's weights: one launch per source dtype, rounding as
    NumPy's astype does (to nearest, ties to even), into views of one buffer; arrays of the
    target dtype already, empty and non-contiguous ones too."""
    arrays = [rng.standard_normal(s).astype(np.float32) * 10 for s in [(3, 3, 4, 8), (8,), (0,),
                                                                       (50, 10), (1,)]]
    arrays += [rng.standard_normal((7, 5)).T, np.float16([1.5, 2.5]),
               np.float32([65519.0, 65520.0, 1e-8, np.nan, -np.inf])]  # (ties, overflow...)
    for dtype in (np.float16, np.float32):
        with np.errstate(over="ignore"):  # (65520 rounds to float16's infinity)
            got, want = fast.cast_all(arrays, np.dtype(dtype)), STD.cast_all(arrays, dtype)
        for a, g, w in zip(arrays, got, want, strict=True):
            assert g.dtype == w.dtype == dtype and g.shape == w.shape == a.shape
            assert_same(g, w)
            assert (g is a) == (a.dtype == dtype)  # (as astype(copy=False) leaves it)
            if g is not a:  # each view starts 16 bytes on, as cuDNN wants its inputs
                assert (g.ctypes.data - got[0].ctypes.data) % 16 == 0


def test_the_emulators_bfloat16_rounds_as_cuda_and_ml_dtypes_do(fast, rng):
    """The emulator's bfloat16 (CuPy's class, as cuda_bf16.h's __float2bfloat16 rounds: to
    nearest, ties to even) against ml_dtypes' cast, through the cast kernel: every float32
    pattern of 200,000 random ones, each tie between two bfloat16 values, subnormals, the
    largest finite values and the infinities, bit for bit; NaN stays NaN (CUDA makes it 0x7fff,
    ml_dtypes keeps its sign and payload). And every bfloat16 pattern widens exactly."""
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = np.arange(2**16, dtype=np.uint32) << 16 | 0x8000  # (halfway between neighbours)
    edges = np.float32([0.0, -0.0, 1e-40, -1e-45, 3.3895e38, 3.4e38, np.inf, -np.inf, np.nan])
    x = np.concatenate([bits.view(np.float32), ties.view(np.float32), edges])
    with np.errstate(over="ignore", invalid="ignore"):
        got, want = fast.cast_all([x], BFLOAT16)[0], x.astype(BFLOAT16)
    nan = np.isnan(x)
    assert np.isnan(got.astype(np.float32)[nan]).all()
    assert_same(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    every = np.arange(2**16, dtype=np.uint16).view(BFLOAT16)
    widened = fast.cast_all([every], np.dtype(np.float32))[0]
    assert_same(widened.view(np.uint32), every.astype(np.float32).view(np.uint32))


def test_a_raw_kernel_is_made_once_for_its_name_and_types(fast, monkeypatch):
    """Found again for the same types, made anew for other types or another name, each with
    its own typedefs; a type given as a scalar type or as a dtype is the same kernel."""
    module = sys.modules[type(fast).__module__]
    made = []

    class Capture:
        def __init__(self, code: str, kernel_name: str) -> None:
            made.append((kernel_name, code))

    monkeypatch.setattr(module.cupy, "RawKernel", Capture)
    monkeypatch.setattr(module, "_RAW_KERNELS", {})
    single = module._raw_kernel("k", "", X=np.float32, A=np.float32)
    assert module._raw_kernel("k", "", X=np.float32, A=np.float32) is single and len(made) == 1
    half = module._raw_kernel("k", "", X=np.dtype("float16"), A=np.float32)
    other = module._raw_kernel("other", "", X=np.float32, A=np.float32)
    module._raw_kernel("k", "", X=np.dtype("float32"), A=np.dtype("float32"))
    assert len({id(single), id(half), id(other)}) == 3
    assert "typedef float X;" in made[0][1] and "typedef __half X;" in made[1][1]
    assert made[2][0] == "other" and made[-1] == made[0]


def _feature_norm_exact(x):
    """FeatureNorm's xhat, mean and 1 / sqrt(var + eps) in long double (64 bits of mantissa on
    x86-64, 53 elsewhere): the values the kernels round."""
    x = x.astype(np.longdouble)
    mean = x.mean(axis=(1, 2), keepdims=True)
    inv_std = 1 / np.sqrt(((x - mean) ** 2).mean(axis=(1, 2), keepdims=True) + 1e-5)
    return (x - mean) * inv_std, mean, inv_std


def _error(got, exact, scale):
    return float(np.max(np.abs(got.astype(np.longdouble) - exact)) / scale)


# (N, H, W, C): H*W = 1, 7, 900 and 4096 rows, C = 64 (two chunks of 32 channels), 1, 33 (one
# more than a chunk) and 3 (170 groups of 3 threads, 2 threads idle).
FEATURE_NORM_SHAPES = [(3, 1, 1, 64), (2, 7, 1, 1), (2, 30, 30, 33), (1, 64, 64, 3)]


@pytest.mark.parametrize("shape", FEATURE_NORM_SHAPES)
@pytest.mark.parametrize("dtype, compute", [(np.float16, np.float16), (np.float32, np.float32),
                                            (np.float64, np.float64), (np.float32, np.float16)])
def test_feature_norm_and_its_gradient(fast, monkeypatch, rng, shape, dtype, compute):
    """One launch each way (the ReLU gradient before it in the same launch), every output
    written: the output in the compute dtype, the statistics (for backward, with the input) in
    the accumulator's; the standard version's values to within a few roundings, at least as
    close as they are to the exact values (or within two units of the last place), and the
    same bits at a second call. Under mixed precision (``compute`` float16) it reads a float16
    input and gradient and writes its output and the input's gradient in float16 in the same
    launches, computing in float32."""
    kernels = sys.modules[type(fast).__module__]  # (the emulated xpcnn.ops.fast_cupy)
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    launches = _counting_launches(kernels, monkeypatch)
    eps = 2 * np.finfo(dtype).eps  # (relative to the largest value)
    acc = np.float64 if dtype == np.float64 else np.float32
    x = (rng.standard_normal(shape) * 3 + 1).astype(compute)
    x[0, 0, 0, 0] = 0  # (a ReLU's zero: its gradient stops there)
    got, want = (k.feature_norm(x, 1e-5, dtype, compute) for k in (fast, STD))
    assert launches == ["xpcnn_feature_norm"]
    for g, w, t, wt, exact in zip(got, want, (compute, acc, acc), (compute, dtype, dtype),
                                  _feature_norm_exact(x), strict=True):
        assert g.dtype == t and w.dtype == wt and w.shape == g.shape == exact.shape
        scale = max(1.0, float(np.max(np.abs(exact))))
        assert _error(g, exact, scale) <= max(_error(w, exact, scale), eps, np.finfo(t).eps)
    for g, again in zip(got, fast.feature_norm(x, 1e-5, dtype, compute), strict=True):
        assert_same(g, again)

    y, mean, inv_std = got
    dy = rng.standard_normal(shape).astype(compute)
    xhat, _, inv64 = _feature_norm_exact(x)
    g64 = dy.astype(np.longdouble)
    exact = inv64 * (g64 - g64.mean(axis=(1, 2), keepdims=True)
                     - xhat * (g64 * xhat).mean(axis=(1, 2), keepdims=True))
    scale = float(np.max(np.abs(inv64)) * np.max(np.abs(g64)))
    for relu in (False, True):
        launches.clear()
        g = fast.feature_norm_backward(dy, x, mean, inv_std, relu)
        assert launches == ["xpcnn_feature_norm_backward"]
        w = STD.feature_norm_backward(dy, x, *want[1:], relu)
        assert g.dtype == w.dtype == compute and g.shape == shape
        e = exact * (x > 0) if relu else exact
        assert _error(g, e, scale) <= max(_error(w, e, scale), eps, np.finfo(compute).eps)
        assert_same(g, fast.feature_norm_backward(dy, x, mean, inv_std, relu))
        if relu:
            assert (g[x <= 0] == 0).all()


def _batch_norm_exact(x, gamma, beta, moving_mean, moving_var, momentum, relu):
    """BatchNorm2D's training forward in long double: (y, mean, inv_std, the running mean and
    variance after it), and its z = xhat * gamma + beta and xhat."""
    x, gamma, beta, moving_mean, moving_var = (a.astype(np.longdouble) for a in (
        x, gamma, beta, moving_mean, moving_var))
    axes, count = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)
    inv_std = 1 / np.sqrt(var + 1e-5)
    xhat = (x - mean) * inv_std
    z = xhat * gamma + beta
    if count >= 2:  # (one value a channel leaves them: its unbiased variance is undefined)
        moving_mean = (1 - momentum) * moving_mean + momentum * mean
        moving_var = (1 - momentum) * moving_var + momentum * var * (count / (count - 1))
    return ((np.maximum(z, 0) if relu else z, mean, inv_std, moving_mean, moving_var),
            z, xhat)


def _batch_norm_backward_exact(dy, xhat, z, inv_std, gamma, relu):
    """The gradients of BatchNorm2D's training forward in long double: (dx, dgamma, dbeta)."""
    dz = dy.astype(np.longdouble) * (z > 0) if relu else dy.astype(np.longdouble)
    axes = tuple(range(dy.ndim - 1))
    return (gamma.astype(np.longdouble) * inv_std * (
                dz - dz.mean(axis=axes) - xhat * (dz * xhat).mean(axis=axes)),
            (dz * xhat).sum(axis=axes), dz.sum(axis=axes))


def _counting_launches(kernels, monkeypatch):
    """The names of the raw kernels and BatchNorm's elementwise ones launched from now on,
    in order."""
    launches = []
    raw_kernel = kernels._raw_kernel
    monkeypatch.setattr(kernels, "_raw_kernel",
                        lambda name, *a, **k: launches.append(name) or raw_kernel(name, *a, **k))
    for name in ("BATCH_NORM_APPLY", "BATCH_NORM_DX", "BATCH_NORM_RUNNING",
                 "BATCH_NORM_RUNNING_DX"):  # (as fast_cupy imported them: where it calls them)
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, kernel=kernel, **k:
                            launches.append(kernel.name) or kernel(*a, **k))
    return launches


# (shape, blocks along the rows at most, rows a block at least): one row; 7 rows of one channel;
# 2-D (N, features) input of 33 features over 5 blocks of 2 rows; 300 rows of 3 channels over 8
# blocks, the last one short; 64 channels (two chunks) over 3 blocks; and 128 x 30 x 30 rows as
# a batch of 128 gives them (113 blocks), float32 alone (a few seconds on the emulator).
BATCH_NORM_SHAPES = [((1, 1, 1, 64), 512, 1024), ((7, 1), 512, 1024), ((9, 33), 5, 2),
                     ((3, 10, 10, 3), 8, 16), ((2, 5, 7, 64), 3, 1)]
# (the input's and output's dtype, the parameters' and statistics': float16 with float32 is
# mixed precision)
BATCH_NORM_DTYPES = [(np.float16, np.float16), (np.float32, np.float32),
                     (np.float64, np.float64), (np.float16, np.float32)]


@pytest.mark.parametrize(("shape", "most", "fewest", "dtype", "compute", "relu"),
                         # (every dtype pair at every shape, the fused ReLU with half of
                         # them in turn: it masks values, not the reductions' layout or
                         # types; each dtype pair runs with and without it)
                         [(*case, *dtypes, (i + j) % 2 == 1)
                          for i, case in enumerate(BATCH_NORM_SHAPES)
                          for j, dtypes in enumerate(BATCH_NORM_DTYPES)]
                         + [((128, 30, 30, 3), 512, 1024, np.float32, np.float32, True)])
def test_batch_norm_in_two_launches_each_way(fast, monkeypatch, rng, shape, most, fewest, dtype,
                                             compute, relu):
    """Training forward and backward of BatchNorm2D, with the ReLU after it fused or not, two
    launches each way (one backward without the input's gradient), every output written: the
    output in the input's dtype (the compute dtype), the gradients in the input's and the
    parameters' dtypes, the values and running statistics at least as close to the exact
    ones as the standard version's (or within two units of the last place), the same bits at
    a second call (which a "last block" counter left at anything but 0 would break). Backward
    recomputes xhat and the ReLU's mask from the input: its fused ReLU gradient is, bit for
    bit, that of the gradient masked where forward's z is > 0 (z in the accumulator type,
    before the output's rounding to float16 could make a tiny positive z 0)."""
    from xpcnn.ops import cuda_reductions  # (the emulated one)

    kernels = sys.modules[type(fast).__module__]  # (the emulated xpcnn.ops.fast_cupy)
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_BLOCKS", most)
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_PER_BLOCK", fewest)
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    launches = _counting_launches(kernels, monkeypatch)
    eps = 2 * np.finfo(compute).eps  # (relative to the largest value)
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta, moving_mean = (rng.standard_normal(c).astype(compute) for _ in range(3))
    moving_var = (rng.random(c) + 0.5).astype(compute)
    running = [(moving_mean.copy(), moving_var.copy()) for _ in range(3)]
    got = fast.batch_norm_train(x, gamma, beta, *running[0], 0.1, 1e-5, dtype, relu)
    assert launches == ["xpcnn_batch_norm_stats", "xpcnn_batch_norm_apply"]
    want = STD.batch_norm_train(x, gamma, beta, *running[1], 0.1, 1e-5, dtype, relu)
    exact, z, xhat = _batch_norm_exact(x, gamma, beta, moving_mean, moving_var, 0.1, relu)
    acc = np.float64 if compute == np.float64 else np.float32
    for k, (g, w, e) in enumerate(zip([*got, *running[0]], [*want, *running[1]], exact,
                                      strict=True)):
        assert g.dtype == (dtype, acc, acc, compute, compute)[k]
        assert w.dtype == (dtype, compute, compute, compute, compute)[k]
        assert g.shape == w.shape == e.shape
        scale = max(1.0, float(np.max(np.abs(e))))
        assert _error(g, e, scale) <= max(_error(w, e, scale), eps, np.finfo(g.dtype).eps)
    if relu:
        assert (got[0] >= 0).all()
    again = fast.batch_norm_train(x, gamma, beta, *running[2], 0.1, 1e-5, dtype, relu)
    for g, a in zip([*got, *running[0]], [*again, *running[2]], strict=True):
        assert_same(g, a)

    launches.clear()
    y, mean, inv_std = got
    dy = rng.standard_normal(shape).astype(dtype)
    exact = _batch_norm_backward_exact(dy, xhat, z, exact[2], gamma, relu)
    got = fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True)
    assert launches == ["xpcnn_batch_norm_sums", "xpcnn_batch_norm_dx"]
    want = STD.batch_norm_backward(dy, x, want[1], want[2], gamma, beta, relu, True)
    for g, w, e, t in zip(got, want, exact, (dtype, compute, compute), strict=True):
        assert g.dtype == w.dtype == t and g.shape == w.shape == e.shape
        scale = max(1.0, float(np.max(np.abs(e))))
        assert _error(g, e, scale) <= max(_error(w, e, scale), eps, np.finfo(t).eps)
    without = fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, False)
    assert len(launches) == 3 and without[0] is None
    for g, a in zip(got, fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True),
                    strict=True):
        assert_same(g, a)
    for g, a in zip(got[1:], without[1:], strict=True):
        assert_same(g, a)
    if relu:
        z = fast.batch_norm_train(x, gamma, beta, moving_mean.copy(), moving_var.copy(), 0.1,
                                  1e-5, acc, False)[0]
        assert ((z > 0) == (y > 0)).all()  # (no z rounds to 0 here)
        masked = fast.batch_norm_backward(dy * (z > 0), x, mean, inv_std, gamma, beta, False,
                                          True)
        for g, a in zip(got, masked, strict=True):
            assert_same(g, a)
    assert not kernels._COUNTERS["cpu"].any()


@pytest.mark.parametrize(("dtype", "compute"), BATCH_NORM_DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_with_the_running_statistics_in_one_launch_each_way(
        fast, monkeypatch, rng, dtype, compute, relu):
    """Inference and a frozen layer's training step, with the ReLU after it fused or not: one
    launch each way, the output in the input's dtype (the compute dtype), the input's gradient
    in its own, at least as close to the exact values as the standard version's (or within
    two units of the last place), nothing moved in the running statistics."""
    kernels = sys.modules[type(fast).__module__]
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)
    launches = _counting_launches(kernels, monkeypatch)
    shape, c = (3, 5, 4, 37), 37
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta, mean = (rng.standard_normal(c).astype(compute) for _ in range(3))
    var = (rng.random(c) + 0.5).astype(compute)
    before = mean.copy(), var.copy()
    got = fast.batch_norm_running(x, gamma, beta, mean, var, 1e-5, dtype, relu)
    assert launches == ["xpcnn_batch_norm_running"]
    want = STD.batch_norm_running(x, gamma, beta, mean, var, 1e-5, dtype, relu)
    g64, b64, m64, v64 = (a.astype(np.longdouble) for a in (gamma, beta, mean, var))
    scale64 = g64 / np.sqrt(v64 + 1e-5)
    z = (x.astype(np.longdouble) - m64) * scale64 + b64
    dy = rng.standard_normal(shape).astype(dtype)
    dx = fast.batch_norm_running_backward(dy, x, gamma, beta, mean, var, 1e-5, relu)
    assert launches == ["xpcnn_batch_norm_running", "xpcnn_batch_norm_running_dx"]
    dx_want = STD.batch_norm_running_backward(dy, x, gamma, beta, mean, var, 1e-5, relu)
    exact_dx = dy.astype(np.longdouble) * scale64 * ((z > 0) if relu else 1)
    eps = 2 * np.finfo(compute).eps
    for g, w, e in [(got, want, np.maximum(z, 0) if relu else z), (dx, dx_want, exact_dx)]:
        assert g.dtype == w.dtype == dtype and g.shape == w.shape == shape
        scale = max(1.0, float(np.max(np.abs(e))))
        assert _error(g, e, scale) <= max(_error(w, e, scale), eps, np.finfo(dtype).eps)
    if relu:
        assert_same(
            dx, fast.batch_norm_running_backward(dy * (got > 0), x, gamma, beta, mean, var, 1e-5,
                                                 False))
    for a, b in zip((mean, var), before, strict=True):
        assert_same(a, b)


def test_batch_norm_of_a_broadcast_gradient_is_that_of_the_gradient_made_whole(
        fast, monkeypatch, rng):
    """GlobalAvgPool2D's gradient (a broadcast view) after a BatchNorm2D: made contiguous, the
    same bits as from the contiguous gradient, still through the kernels."""
    launches = _counting_launches(sys.modules[type(fast).__module__], monkeypatch)
    x = rng.standard_normal((4, 3, 3, 5)).astype(np.float32)
    gamma, beta = rng.standard_normal(5).astype(np.float32), np.zeros(5, np.float32)
    _, mean, inv_std = fast.batch_norm_train(x, gamma, beta, np.zeros(5, np.float32),
                                             np.ones(5, np.float32), 0.1, 1e-5, np.float32,
                                             True)
    dy = np.broadcast_to(rng.standard_normal((4, 1, 1, 5)).astype(np.float32), x.shape)
    for g, w in zip(fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True),
                    fast.batch_norm_backward(np.ascontiguousarray(dy), x, mean, inv_std, gamma,
                                             beta, True, True), strict=True):
        assert_same(g, w)
    assert launches == ["xpcnn_batch_norm_stats", "xpcnn_batch_norm_apply",
                        *["xpcnn_batch_norm_sums", "xpcnn_batch_norm_dx"] * 2]


def test_batch_norm_of_what_its_kernels_do_not_take_is_the_standard_one(fast, rng):
    """A non-contiguous input, parameters of another dtype than the statistics', or an input
    wider than them: the standard version, bit for bit."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    gamma, beta = rng.standard_normal(5).astype(np.float32), np.zeros(5, np.float32)
    cases = [(x.transpose(1, 0, 2), gamma, beta), (x, gamma.astype(np.float64), beta),
             (x.astype(np.float64), gamma, beta)]
    for data, g, b in cases:
        stats = [(np.zeros(5, np.float32), np.ones(5, np.float32)) for _ in range(2)]
        for relu in (False, True):
            got = fast.batch_norm_train(data, g, b, *stats[0], 0.1, 1e-5, np.float32, relu)
            want = STD.batch_norm_train(data, g, b, *stats[1], 0.1, 1e-5, np.float32, relu)
            for a, w in zip([*got, *stats[0]], [*want, *stats[1]], strict=True):
                assert_same(a, w)
            dy = np.ones(data.shape, np.float32)
            for a, w in zip(
                    fast.batch_norm_backward(dy, data, got[1], got[2], g, b, relu, True),
                    STD.batch_norm_backward(dy, data, got[1], got[2], g, b, relu, True),
                    strict=True):
                assert_same(a, w)
            assert_same(
                fast.batch_norm_running(data, g, b, *stats[0], 1e-5, np.float32, relu),
                STD.batch_norm_running(data, g, b, *stats[0], 1e-5, np.float32, relu))
            assert_same(
                fast.batch_norm_running_backward(dy, data, g, b, *stats[0], 1e-5, relu),
                STD.batch_norm_running_backward(dy, data, g, b, *stats[0], 1e-5, relu))


@needs_host_fma
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_rescale_rounds_its_product_where_products_and_sums_fuse(fast, rng, monkeypatch, dtype):
    """Built with NVRTC's default multiply-adds, a Rescaling with an offset still rounds the
    product before the sum, as the standard version's separate operations do."""
    monkeypatch.setattr(ElementwiseKernel, "fused_multiply_add", True)
    images = rng.integers(0, 256, (4, 6, 5, 3)).astype(np.uint8)
    for out in (dtype, np.float16):
        assert_same(fast.rescale(images, 1 / 255, -0.3, dtype, out),
                                      STD.rescale(images, 1 / 255, -0.3, dtype, out))


@pytest.mark.parametrize("dtype", WITH_HALF)
@pytest.mark.parametrize("mistake", ["two dtypes for T", "U from no array",
                                     "an integer mask", "size with a non-raw array"])
def test_the_emulator_refuses_the_calls_cupy_refuses(fast, dtype, mistake):
    """Its placeholders bound as CuPy 14's _decide_params_type_core binds them (arrays only,
    one dtype each, declared dtypes kept), its loop size as CuPy's _broadcast takes it: a call
    that would raise on a GPU raises here."""
    from xpcnn.ops import cuda_elementwise as kernels  # (the emulated one)

    x = np.ones((2, 3, 3, 4), dtype)
    stats = np.ones((2, 1, 1, 4), dtype)
    wide = np.float64 if dtype != np.float64 else np.float32
    one = np.dtype(dtype).type  # (a scalar of the dtype)
    call, error = {
        "two dtypes for T": (lambda: kernels.BIAS_RELU(stats.astype(wide), 4, False, x),
                             TypeError),
        "U from no array": (lambda: kernels.RESCALE(x.astype(np.uint8), x, one(2), one(0),
                                                     False), KeyError),  # (an output not given)
        "an integer mask": (lambda: kernels.MASK_MULTIPLY(x, x.astype(np.int32), one(2)),
                            TypeError),
        "size with a non-raw array": (lambda: kernels.RELU_BACKWARD(x, x, size=72),
                                      ValueError),
    }[mistake]
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("rows, cols, per", [(np.int64(5), np.int64(3), np.int64(5)),
                                             (5, 3, 5),
                                             (np.int32(5), np.int32(3), np.int64(5))])
def test_the_emulator_passes_raw_kernels_scalars_as_cupy_does(fast, rows, cols, per):
    """CuPy passes a raw kernel's scalar as its own bytes (a NumPy scalar's dtype, int64 for a
    Python int) and the driver reads as many as the parameter declares: an int64 for ``int``
    or an int32 for ``long long`` reads the wrong bytes on a GPU, so the emulator refuses it."""
    from xpcnn.ops.cuda_reductions import SUM_ROWS_LANES, SUM_ROWS_SOURCE

    kernels = sys.modules[type(fast).__module__]
    kernel = kernels._raw_kernel("xpcnn_sum_rows", SUM_ROWS_SOURCE, X=np.float32,
                                 Y=np.float32, A=np.float32)
    a = np.ones((5, 3), np.float32)
    out = np.empty(3, np.float32)
    with pytest.raises(TypeError, match="long long rows|int cols|long long per"):
        kernel((1, 1), (32, SUM_ROWS_LANES),
               (a, rows, cols, per, np.empty((1, 3), np.float32), kernels._counters(a), out))
    kernel((1, 1), (32, SUM_ROWS_LANES),
           (a, np.int64(5), np.int32(3), np.int64(5), np.empty((1, 3), np.float32),
            kernels._counters(a), out))
    assert_same(out, [5, 5, 5])


# Thread t writes s[t]; thread t then reads the value of its neighbour, the thread before it
# or after it, with or without a barrier between.
_NEIGHBOUR = r"""
__global__ void neighbour(float* out) {
    __shared__ float s[8];
    const unsigned t = threadIdx.x;
    s[t] = blockIdx.x * 8.0f + t + 1.0f;
    BARRIER
    out[blockIdx.x * 8 + t] = s[(t + SHIFT) % 8];
}
"""


@pytest.mark.parametrize("shift", [7, 1], ids=["the thread before", "the thread after"])
def test_the_emulator_finds_a_missing_barrier_whichever_thread_reads(shift):
    """The emulator runs a block's threads one after another between barriers, so in order
    alone it misses a thread reading what an earlier thread wrote without a barrier; every
    launch runs in reverse order too and the two must agree, which finds both cases."""
    from cuda_emulator import RawKernel

    def launch(barrier):
        code = _NEIGHBOUR.replace("BARRIER", barrier).replace("SHIFT", str(shift))
        out = np.zeros(16, np.float32)
        RawKernel(code, "neighbour")((2,), (8,), (out,))
        return out

    expected = np.arange(16, dtype=np.float32).reshape(2, 8)
    expected = (np.roll(expected, -shift, axis=1) + 1).reshape(-1)
    assert_same(launch("__syncthreads();"), expected)
    with pytest.raises(AssertionError, match="float\\* out differ when its threads and blocks "
                                             "run in reverse order"):
        launch("")


@pytest.mark.parametrize("rows", [131072, 1031, 1000, 513, 100])
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_blocked_products(fast, rng, rows, dtype):
    """Long a^T @ b products (a convolution's kernel gradient), over blocks of rows."""
    a = rng.standard_normal((rows, 24)).astype(dtype)
    b = rng.standard_normal((rows, 8)).astype(dtype)
    want = a.astype(np.float64).T @ b.astype(np.float64)
    got = fast.matmul_tn(a, b)
    assert got.dtype == dtype
    tol = {2: 1e-2, 4: 1e-5, 8: 1e-12}[np.dtype(dtype).itemsize]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# (rows, columns, blocks along the rows at most, rows a block at least): one block, one row,
# rows and columns that are no multiple of a block's (8 lanes of 32 columns), several column
# chunks, and grids of 2 to 64 blocks (the emulator runs them one after the other), in each
# dtype; and a grid of 512 blocks (a convolution's bias gradient at batch 128) in float32 alone
# (5 s a dtype on the emulator; the dtypes share the grid's logic).
COLUMN_SUMS = [(1, 5, 512, 256), (100, 24, 512, 256), (257, 33, 512, 256), (1031, 64, 4, 16),
               (1000, 10, 64, 1), (4099, 96, 3, 8)]


@pytest.mark.parametrize(("dtype", "rows", "cols", "most", "fewest"),
                         [(dtype, *case) for case in COLUMN_SUMS for dtype in WITH_HALF]
                         + [(np.float32, 131072, 24, 512, 256)])
def test_column_sums_in_one_launch(fast, monkeypatch, rng, rows, cols, most, fewest, dtype):
    """Bias gradients (float32 sums of float16 rows) in one launch, the last block summing the
    others' partial sums: the standard sum's dtype and values, close to a float64 sum of the
    same numbers, bit for bit the same at a second call that reuses the counters (which a
    counter left at anything but 0 would break: the "last" block would not be the last)."""
    from xpcnn.ops import cuda_reductions  # (the emulated one)

    kernels = sys.modules[type(fast).__module__]  # (the emulated xpcnn.ops.fast_cupy)
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_BLOCKS", most)
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_PER_BLOCK", fewest)
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    a = rng.standard_normal((rows, cols)).astype(dtype)
    got = fast.sum_rows(a)
    want = STD.sum_rows(a)
    assert got.dtype == want.dtype and got.shape == (cols,)
    exact = a.astype(np.float64).sum(axis=0)
    # (float32 sums: a few units in the last place of the sum of |a|, as the standard's)
    tol = (1e-13 if dtype == np.float64 else 1e-6) * np.abs(a.astype(np.float64)).sum(axis=0)
    assert np.all(np.abs(got - exact) <= tol)
    assert np.all(np.abs(want - exact) <= tol)
    assert_same(fast.sum_rows(a), got)
    assert not kernels._COUNTERS["cpu"].any()


@pytest.mark.parametrize(("dtype", "rows", "cols", "most", "fewest"),
                         [(dtype, *case) for case in COLUMN_SUMS[1:4] for dtype in WITH_HALF])
def test_a_relu_gradient_and_its_column_sums_in_one_launch(fast, monkeypatch, rng, rows, cols,
                                                            most, fewest, dtype):
    """A ReLU's gradient (dy times y > 0, NaN and infinities kept where y > 0 and made NaN
    where not, as the standard multiply does) and its bias gradient in one launch: the
    standard relu_backward bit for bit, and the standard sum of it to a float32 sum's
    rounding."""
    from xpcnn.ops import cuda_reductions  # (the emulated one)

    kernels = sys.modules[type(fast).__module__]
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_BLOCKS", most)
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_PER_BLOCK", fewest)
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)
    monkeypatch.setattr(kernels.cupy, "empty_like", lambda a: _poisoned(a.shape, a.dtype))
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    y = np.maximum(rng.standard_normal((rows, cols)), 0).astype(dtype)
    dy[0, 0], y[0, 0] = np.inf, 0  # (an infinity where the ReLU was off: NaN, as 0 * inf)
    if rows > 1:
        dy[1, 0], y[1, 0] = np.nan, 1  # (a NaN where it was on: kept)
    masked, sums = fast.relu_backward_sum_rows(dy, y)
    with np.errstate(invalid="ignore"):  # (0 * inf)
        want_masked, want_sums = STD.relu_backward_sum_rows(dy, y)
    assert_same(masked, want_masked)
    assert masked.dtype == dy.dtype and sums.dtype == want_sums.dtype
    assert_same(np.isnan(sums), np.isnan(want_sums))
    finite = want_masked[:, 1:].astype(np.float64)
    tol = (1e-13 if dtype == np.float64 else 1e-6) * np.abs(finite).sum(axis=0)
    assert np.all(np.abs(sums[1:] - finite.sum(axis=0)) <= tol)
    again = fast.relu_backward_sum_rows(dy, y)
    assert_same(again[1], sums)
    assert not kernels._COUNTERS["cpu"].any()


def test_a_relu_gradient_of_another_shape_or_layout_takes_the_standard_path(fast, rng):
    dy = rng.standard_normal((6, 4)).astype(np.float32)
    y = np.maximum(rng.standard_normal((6, 4)), 0).astype(np.float32)
    for other in (y.T.copy().T, y[:, :3], y.astype(np.int32)):
        if other.shape != dy.shape:
            with pytest.raises(ValueError):
                fast.relu_backward_sum_rows(dy, other)
            continue
        masked, sums = fast.relu_backward_sum_rows(dy, other)
        assert_same(masked, STD.relu_backward(dy, other))
        np.testing.assert_allclose(sums, STD.sum_rows(masked), rtol=1e-6)


def test_a_column_sum_is_wrong_where_its_last_block_is_not_the_last(fast, monkeypatch, rng):
    """The emulated launch finds a miscounted "last block": a counter that does not start at 0
    (as after a launch that failed to reset it) makes the third of four blocks sum the partials
    before the fourth has written its own (NaN here, as everything the launch must write)."""
    from xpcnn.ops import cuda_reductions  # (the emulated one)

    kernels = sys.modules[type(fast).__module__]
    monkeypatch.setattr(cuda_reductions, "_SUM_ROWS_PER_BLOCK", 16)
    monkeypatch.setattr(kernels.cupy, "empty", _poisoned)
    a = rng.standard_normal((64, 8)).astype(np.float32)  # 4 blocks
    fast.sum_rows(a)  # (makes the counters)
    counters = kernels._COUNTERS["cpu"]
    counters[0] = 1
    try:
        assert np.isnan(fast.sum_rows(a)).all()
        assert counters[0] == 1  # (wrapped to 0 by the third block, counted 1 by the fourth)
    finally:
        counters[0] = 0
    np.testing.assert_allclose(fast.sum_rows(a), a.astype(np.float64).sum(axis=0), rtol=1e-5)


def test_the_counters_come_from_the_default_memory_pool(fast, monkeypatch):
    """Made at a first use inside a CUDA graph's warm-up (its own memory pool, freed with the
    graph), the counters still come from CuPy's default pool: they outlive that graph."""
    kernels = sys.modules[type(fast).__module__]
    cupy = kernels.cupy
    monkeypatch.setattr(kernels, "_COUNTERS", {})
    allocators = []

    def zeros(*args, **kwargs):
        allocators.append(cupy.cuda.allocators[-1])
        return np.zeros(*args, **kwargs)

    monkeypatch.setattr(cupy, "zeros", zeros)
    with cupy.cuda.using_allocator(cupy.cuda.MemoryPool().malloc):
        fast.sum_rows(np.ones((3, 4), np.float32))
        fast.softmax_cross_entropy(np.ones((3, 4), np.float32), np.zeros(3, np.int64), 0.0)
    assert allocators == [cupy.get_default_memory_pool().malloc]


def test_columns_past_the_counters_take_the_standard_sum(fast, monkeypatch, rng):
    kernels = sys.modules[type(fast).__module__]
    monkeypatch.setattr(kernels, "_COUNTERS_PER_DEVICE", 1)
    a = rng.standard_normal((40, 33)).astype(np.float32)
    assert_same(fast.sum_rows(a), STD.sum_rows(a))


# The tiled kernels' emulation runs each CUDA thread in turn: cases past 10,000 output pixels
# are left to the GPU tests, which run every case.
EMULATED_TILED_CONV = [case for case in TILED_CONV if np.prod(case[2][:3]) <= 10_000]


@pytest.mark.parametrize("algorithm, kernel, strides, shape, filters, padding",
                         [("direct", *case) for case in DIRECT_CONV]
                         + [("tiled", *case) for case in EMULATED_TILED_CONV])
@pytest.mark.parametrize("dtype", DTYPES)
def test_convolution_kernels(fast, monkeypatch, rng, algorithm, kernel, strides, shape, filters,
                             padding, dtype):
    """The direct kernels (one element per thread) and the tiled ones (blocks of threads
    sharing memory, emulated with a real barrier): forward with and without bias and ReLU,
    kernel gradient with and without the bias's."""
    conv = fast.conv_kernels
    monkeypatch.setattr(conv, "tiled", algorithm == "tiled")
    x = rng.standard_normal(shape).astype(dtype)
    pads = windows.resolve_padding(padding, shape[1:3], kernel, strides)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    w2 = rng.standard_normal((kernel[0] * kernel[1] * shape[3], filters)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for bias, relu in ((rng.standard_normal(filters).astype(dtype), True), (None, False)):
        want = ops.conv_forward(xpn, STD, x, w2, bias, kernel, strides, pads, out_hw,
                                Workspace(), "k", None, relu)
        got = conv.conv2d(x, w2, bias, kernel, strides, pads, out_hw, relu)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)
    dy = rng.standard_normal((shape[0] * out_hw[0] * out_hw[1], filters)).astype(dtype)
    want, want_bias = ops.conv_weight_grad(xpn, STD, x, dy, kernel, strides, pads, out_hw,
                                           Workspace(), "k", None, with_bias=True)
    for with_bias in (False, True):
        got, got_bias = conv.conv2d_weight_grad(x, dy, kernel, strides, pads, out_hw,
                                                with_bias)
        assert got.dtype == want.dtype
        # (the (K, kh*kw*C) layout of the layer's kernel beneath: nobody copies it)
        assert got.T.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=tol * 10, atol=tol * np.abs(want).max())
        if with_bias:
            np.testing.assert_allclose(got_bias, want_bias, rtol=tol * 10, atol=tol * 10)
        else:
            assert got_bias is None


def _conv_launches(monkeypatch):
    """The names of the emulated kernels (elementwise and raw) launched from now on."""
    launches = []
    for cls in (ElementwiseKernel, RawKernel):
        call = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, call=call, **k:
                            launches.append(self.name) or call(self, *a, **k))
    return launches


def _kernel_reads(monkeypatch):
    """The launches from now on, as (name, the kernel array read: a raw kernel's second
    argument, an elementwise kernel's None)."""
    launches = []
    raw, elementwise = RawKernel.__call__, ElementwiseKernel.__call__
    monkeypatch.setattr(RawKernel, "__call__", lambda self, grid, block, args, *a, **k:
                        launches.append((self.name, args[1]))
                        or raw(self, grid, block, args, *a, **k))
    monkeypatch.setattr(ElementwiseKernel, "__call__", lambda self, *a, **k:
                        launches.append((self.name, None)) or elementwise(self, *a, **k))
    return launches


@pytest.mark.parametrize("kernel, strides, shape, filters, padding", EMULATED_TILED_CONV)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_tiled_convolution_reads_the_layers_kernel_in_place(
        fast, monkeypatch, rng, kernel, strides, shape, filters, padding, dtype):
    """HandWrittenConv's forward, and its input gradient where that is a stride-1
    convolution, on the tiled kernel: one launch, which reads the (K, kh, kw, C) kernel
    itself (a copy to the (kh*kw*C, K) matrix, or to the rotated one, was one more launch and
    buffer each), bit for bit the result of the kernel matrix copied row-major (the product's
    order is the same) and of the rotated copy, which the standard version's values match.
    A matrix of neither layout is copied first, to the same bits."""
    module = sys.modules[type(fast).__module__]
    conv = fast.conv_kernels
    for flag in ("runs_forward", "runs_weight_grad", "tiled"):
        monkeypatch.setattr(conv, flag, getattr(conv, flag))  # put back after the test
    conv.set_algorithm("tiled")
    pads = windows.resolve_padding(padding, shape[1:3], kernel, strides)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    geometry = ConvGeometry(shape[1:3], shape[3], filters, kernel, strides, pads, out_hw)
    engine = module.cuda_conv.HandWrittenConv(geometry, fast)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((filters, *kernel, shape[3])).astype(dtype)
    w2 = np.ascontiguousarray(np.reshape(w, (filters, -1)).T)
    wide = np.zeros((w2.shape[0], 2 * filters), dtype)
    wide[:, ::2] = w2  # (a view of it: neither row- nor column-major)
    for bias, relu in ((rng.standard_normal(filters).astype(dtype), True), (None, False)):
        with pytest.MonkeyPatch.context() as counted:
            launches = _kernel_reads(counted)
            got = engine.forward(x, w, bias, relu)
        assert [name for name, _ in launches] == ["xpcnn_conv_tiled"]
        assert np.shares_memory(launches[0][1], w)
        want = conv.conv2d(x, w2, bias, kernel, strides, pads, out_hw, relu)
        np.testing.assert_array_equal(np.reshape(got, want.shape), want)
        np.testing.assert_array_equal(
            conv.conv2d(x, wide[:, ::2], bias, kernel, strides, pads, out_hw, relu), want)
    if not ops.input_grad_as_conv(pads, kernel, strides):
        return  # (the gather: test_strided_and_over_padded_input_gradients_take_one_launch)
    dy = rng.standard_normal((shape[0], *out_hw, filters)).astype(dtype)
    with pytest.MonkeyPatch.context() as counted:
        launches = _kernel_reads(counted)
        got = engine.input_grad(dy, w)
    assert [name for name, _ in launches] == ["xpcnn_conv_tiled"]
    assert np.shares_memory(launches[0][1], w)
    assert got.shape == shape and got.dtype == dtype
    rotated = conv.conv2d(dy, ops.flipped_kernel_matrix(xpn, w), None, kernel, (1, 1),
                          ops.output_grad_pads(pads, kernel), shape[1:3], False)
    np.testing.assert_array_equal(np.reshape(got, rotated.shape), rotated)
    want = KernelsConv(geometry, STD).input_grad(dy.astype(np.float64), w.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# (a stride-1 "same" convolution: with the direct kernels chosen it takes the gather too)
@pytest.mark.parametrize("kernel, strides, shape, filters, pads",
                         [*CONV_INPUT_GRAD, ((3, 3), (1, 1), (2, 6, 7, 3), 5, (1, 1, 1, 1))])
@pytest.mark.parametrize("dtype", WITH_HALF)
def test_strided_and_over_padded_input_gradients_take_one_launch(
        fast, monkeypatch, rng, kernel, strides, shape, filters, pads, dtype):
    """HandWrittenConv.input_grad of a strided convolution, or one padded by a kernel's size or
    more: one launch of the gather kernel, which reads the (K, kh, kw, C) kernel in place (no
    im2col + matmul + col2im, once 22-102 launches and a whole batch's patch gradients), with
    the direct or the tiled kernels chosen; the standard col2im version's values (from the same
    rounded inputs, in float64), accumulated in float32 for float16 and bfloat16 and rounded
    once. With ``"im2col"`` chosen it keeps to im2col + matmul."""
    module = sys.modules[type(fast).__module__]
    conv = fast.conv_kernels
    for flag in ("runs_forward", "runs_weight_grad", "tiled"):
        monkeypatch.setattr(conv, flag, getattr(conv, flag))  # put back after the test
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    geometry = ConvGeometry(shape[1:3], shape[3], filters, kernel, strides, pads, out_hw)
    engine = module.cuda_conv.HandWrittenConv(geometry, fast)
    w = rng.standard_normal((filters, *kernel, shape[3])).astype(dtype)
    dy = rng.standard_normal((shape[0], *out_hw, filters)).astype(dtype)
    want = KernelsConv(geometry, STD).input_grad(dy.astype(np.float64), w.astype(np.float64))
    tol = {np.dtype(np.float16): 1e-3, BFLOAT16: 8e-3, np.dtype(np.float32): 1e-5,
           np.dtype(np.float64): 1e-12}[np.dtype(dtype)]
    strided = not ops.input_grad_as_conv(pads, kernel, strides)
    algorithms = ["direct", "tiled"] if strided else ["direct"]
    if dtype in DTYPES:  # (im2col + matmul on the emulator: float32 and float64 only)
        algorithms.append("im2col")
    for algorithm in algorithms:
        conv.set_algorithm(algorithm)
        with pytest.MonkeyPatch.context() as counted:
            launches = _conv_launches(counted)
            got = engine.input_grad(dy, w)
        assert got.shape == shape and got.dtype == dtype
        if algorithm == "im2col":
            assert "xpcnn_conv_input_grad" not in launches
        else:
            assert launches == ["xpcnn_conv_input_grad"]
            assert got.flags.c_contiguous
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                                   atol=tol * np.abs(want).max())


# (int64 labels at every shape with every logits' dtype; the labels' other dtypes change only
# how the kernel reads a label, ``(long long)labels[i]``, apart from the logits' typedef (Z, T,
# U, A), so each runs at one shape of each kernel (a row a thread, a row a warp) with one
# float32 or float64 logits' dtype, each kernel seeing both of these; was every (labels,
# logits) pair, whose half-precision logits' reads, roundings and scales the int64 cases run)
@pytest.mark.parametrize("rows, classes, smoothing, levels, labels_dtype, dtype", [
    *((*case, np.int64, dtype) for case in SOFTMAX_CROSS_ENTROPY for dtype in WITH_HALF),
    *((*case, labels, DTYPES[(i + j) % 2])
      for i, case in enumerate((SOFTMAX_CROSS_ENTROPY[1], SOFTMAX_CROSS_ENTROPY[7]))
      for j, labels in enumerate((np.int32, np.uint8)))])
def test_softmax_cross_entropy(fast, monkeypatch, rng, rows, classes, smoothing, levels,
                               labels_dtype, dtype):
    """The loss, its gradient and the rows' sums in one launch (its last block summing the
    others' partials: the same bits at a second call, the counter back at 0)."""
    module = sys.modules[type(fast).__module__]  # (the emulated xpcnn.ops.fast_cupy)
    monkeypatch.setattr(module.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    z = (rng.integers(0, levels, (rows, classes)) if levels
         else rng.standard_normal((rows, classes)) * 30).astype(dtype)
    labels = rng.integers(0, classes, rows).astype(labels_dtype)
    stats, grad = fast.softmax_cross_entropy(z, labels, smoothing)
    # (bfloat16 logits against the standard version in float32, as the kernel computes: the
    # standard version's own bfloat16 sums, as NumPy makes them, are far rougher)
    want_stats, want_grad = STD.softmax_cross_entropy(
        z.astype(np.float32) if dtype == BFLOAT16 else z, labels, smoothing)
    assert stats.dtype == want_stats.dtype and stats.shape == (2,) and grad.dtype == dtype
    for got, first in zip(fast.softmax_cross_entropy(z, labels, smoothing), (stats, grad),
                          strict=True):
        assert_same(got, first)
    assert not module._COUNTERS["cpu"].any()
    # (float16 logits: the kernel computes in float and rounds once, the standard version
    # rounds the logits' differences to float16 first; bfloat16's gradient is rounded once)
    tol = {np.float16: 2e-3, BFLOAT16: 4e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(stats[0], want_stats[0], rtol=tol, atol=tol)
    assert stats[1] == want_stats[1]
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol / rows)
    # the float16 loss scale (its float32 state on the device) applied to the gradient in the
    # same launch, as the standard version applies it after (float16 logits, whose gradient
    # it would compute in float32: the standard version), the gradient in the logits' dtype
    scaling = np.array([2.0**15, 7.0], np.float32)
    for kernels in (fast, STD):
        scaled_stats, scaled = kernels.softmax_cross_entropy(z, labels, smoothing, scaling)
        unscaled_stats, unscaled = (STD if np.dtype(dtype).itemsize == 2 else kernels
                                    ).softmax_cross_entropy(z, labels, smoothing)
        assert_same(scaled_stats, unscaled_stats)
        assert_same(scaled, (unscaled * scaling[0]).astype(dtype))
        assert scaled.dtype == dtype
    # logits of a narrower dtype (float16 under mixed precision) read as their cast gives them,
    # their gradient rounded to their dtype as its cast rounds it
    for wide in (np.float32, np.float64):
        if np.result_type(dtype, wide) == wide:
            for kernels in (fast, STD):
                got = kernels.softmax_cross_entropy(z, labels, smoothing, scaling, wide)
                want = kernels.softmax_cross_entropy(z.astype(wide), labels, smoothing, scaling)
                assert got[0].dtype == want[0].dtype and got[1].dtype == dtype
                assert_same(got[0], want[0])
                assert_same(got[1], want[1].astype(dtype))
    # a label that is no class makes the loss NaN, in both versions (those the labels' dtype
    # holds: uint8 none below 0, and none at all for 300 classes)
    info = np.iinfo(labels_dtype)
    for bad in [b for b in (classes, -1, 255)
                if info.min <= b <= info.max and not 0 <= b < classes]:
        wrong = labels.copy()
        wrong[rows // 2] = bad
        for kernels in (fast, STD):
            stats, grad = kernels.softmax_cross_entropy(z, wrong, smoothing)
            assert np.isnan(stats[0]) and np.isfinite(grad).all()
    z[-1, 0] = np.nan  # a non-finite logit makes the loss NaN, as in the standard version
    assert np.isnan(fast.softmax_cross_entropy(z, labels, smoothing)[0][0])


@pytest.mark.parametrize("rows, classes, smoothing, levels", SOFTMAX_CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (inf - inf)
def test_softmax(fast, monkeypatch, rng, rows, classes, smoothing, levels, dtype):
    """A model's probabilities at inference in one launch (a row a thread, a row a warp):
    the standard version's, within rounding, in the parameters' dtype, from logits of that
    dtype or float16/bfloat16 ones (mixed precision: read as their cast gives them); a row
    with a NaN or infinite logit NaN, as there."""
    module = sys.modules[type(fast).__module__]
    monkeypatch.setattr(module.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    z = (rng.integers(0, levels, (rows, classes)) if levels
         else rng.standard_normal((rows, classes)) * 30).astype(dtype)
    z[0, -1] = np.nan
    z[-1, 0] = np.inf
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for logits in (z, z.astype(np.float16), z.astype(BFLOAT16)):
        got, want = fast.softmax(logits, dtype), STD.softmax(logits, dtype)
        assert got.dtype == dtype and got.shape == z.shape
        np.testing.assert_allclose(got, want, rtol=tol * 10, atol=tol)
        assert np.isnan(got[0]).all() and np.isnan(got[-1]).all()
    # (several leading axes: rows of the last one; a wider dtype than asked: the standard's)
    assert_same(fast.softmax(z.reshape(1, rows, classes), dtype)[0], fast.softmax(z, dtype))
    if dtype == np.float32:
        assert_same(fast.softmax(z.astype(np.float64), dtype),
                    STD.softmax(z.astype(np.float64), dtype))


# (each target form at every shape in float32; the other dtypes change only the types the
# same steps run in, which test_softmax_cross_entropy crosses with every shape, so here they
# run at one shape of each kernel: a row a thread over 3 blocks, a row a warp past the last row,
# each (dtype, target form) pair, the kernel's instantiation, at one of the two: the slow warp
# shape with each dtype and each form once, the 3-block one with the 6 other pairs)
TARGET_FORMS = [("labels", True), ("one-hot", False), ("soft", True)]


@pytest.mark.parametrize("rows, classes, smoothing, levels, dtype, targets, weighted", [
    *((*case, np.float32, *form) for case in SOFTMAX_CROSS_ENTROPY for form in TARGET_FORMS),
    *((*SOFTMAX_CROSS_ENTROPY[5 if i != j else 7], dtype, *form)
      for i, dtype in enumerate((np.float16, BFLOAT16, np.float64))
      for j, form in enumerate(TARGET_FORMS))])
def test_softmax_cross_entropy_of_target_rows_and_weights(fast, monkeypatch, rng, rows,
                                                          classes, smoothing, levels, dtype,
                                                          targets, weighted):
    """One-hot or probability target rows, and sample weights, in the same one launch: the
    standard version's numbers (one-hot rows and weights of 1 give the integer labels' bits),
    a row that names no class NaN (its weight 0 too), the count not weighted."""
    module = sys.modules[type(fast).__module__]
    monkeypatch.setattr(module.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    z = (rng.integers(0, levels, (rows, classes)) if levels
         else rng.standard_normal((rows, classes)) * 30).astype(dtype)
    labels = rng.integers(0, classes, rows)
    y = np.eye(classes, dtype=np.float32)[labels] if targets != "soft" else \
        rng.dirichlet(np.ones(classes), rows).astype(np.float32)
    if targets == "labels":
        y = labels.astype(np.int32)
    w = rng.uniform(0.0, 3.0, rows).astype(np.float32) if weighted else None
    launches = []
    real = module._raw_kernel
    monkeypatch.setattr(module, "_raw_kernel", lambda *a, **k: launches.append(a[0]) or
                        real(*a, **k))
    stats, grad = fast.softmax_cross_entropy(z, y, smoothing, weights=w)
    assert len(launches) == 1 and grad.dtype == dtype  # (the fused kernel, not the standard)
    for got, first in zip(fast.softmax_cross_entropy(z, y, smoothing, weights=w),
                          (stats, grad), strict=True):
        assert_same(got, first)
    assert not module._COUNTERS["cpu"].any()
    want_stats, want_grad = STD.softmax_cross_entropy(
        z.astype(np.float32) if dtype == BFLOAT16 else z, y, smoothing, weights=w)
    tol = {np.float16: 2e-3, BFLOAT16: 4e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(stats[0], want_stats[0], rtol=tol, atol=tol)
    assert stats[1] == want_stats[1]
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * 3 / rows)
    if targets == "one-hot":  # (exactly the rows' labels' terms)
        for got, want in zip((stats, grad), fast.softmax_cross_entropy(z, labels, smoothing),
                             strict=True):
            assert_same(got, want)
        ones = np.ones(rows, np.float64)
        for got, want in zip(fast.softmax_cross_entropy(z, y, smoothing, weights=ones),
                             (stats, grad), strict=True):
            assert_same(got, want)
    # the targets, weights and loss scale read in other dtypes (a float16 loss scale; float64
    # targets of a float32 loss rounded to it first, as the standard version's cast)
    scaling = np.array([2.0**15, 7.0], np.float32)
    # (soft rows of float16 would not sum to 1 within 1e-3: no class, in both versions)
    # (with float32 logits alone, which run at every shape, both kernels: a target's and a
    # weight's read, ``xpcnn_as_t``, is of their typedef and T, here float64 whatever the
    # logits; the logits' own read and their gradient's rounding from a wider T are those of
    # test_softmax_cross_entropy's float16/bfloat16/float32 logits; was every logits' dtype)
    for target_dtype in {"one-hot": [np.float16, BFLOAT16, np.float64], "soft": [np.float64],
                         "labels": [np.uint8, np.int64]}[targets] if dtype == np.float32 else ():
        yd = y.astype(target_dtype)
        wd = None if w is None else w.astype(np.float64)
        got = fast.softmax_cross_entropy(z, yd, smoothing, scaling, np.float64, weights=wd)
        want = STD.softmax_cross_entropy(z.astype(np.float64), yd, smoothing, scaling,
                                         weights=wd)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[1].astype(np.float64),
                                   want[1].astype(dtype).astype(np.float64),
                                   rtol=tol, atol=tol * 3e4 / rows)
    # a target row that names no class (a value below 0, NaN, a sum that is not 1; a label out
    # of range) makes the loss NaN in both versions, whatever its weight
    for bad in (-0.5, np.nan, 0.9):
        wrong = y.copy()
        if targets == "labels":
            wrong[rows // 2] = classes if bad != 0.9 else -1
        elif bad == 0.9:
            wrong[rows // 2] *= bad
        else:
            wrong[rows // 2, 0] = bad
        zero = None if w is None else np.where(np.arange(rows) == rows // 2, 0, w
                                               ).astype(np.float32)
        for kernels in (fast, STD):
            got, g = kernels.softmax_cross_entropy(z, wrong, smoothing, weights=zero)
            assert np.isnan(got[0]) and not np.isnan(g[:rows // 2]).any()


# (the kernel (a row a thread or a warp), the dtype, the target form and the weights, each
# pair of them once: a covering array of 5 of their 16 combinations, as the code crosses them
# only in pairs (the table's and the weights' reads rounded to T, their product rounded to T,
# the label the table is looked up by of the target form); every shape runs, those of a row
# a thread each with the 2 combinations of that kernel, those of a row a warp (37 classes of
# float32 or float64, 300, 1000) 2 of its 3; was all 4 (form, weighted) at each shape, the
# dtype alternating: every combination)
_CLASS_WEIGHTED = {"thread": [(np.float32, "labels", False), (np.float64, "one-hot", True)],
                   "warp": [(np.float32, "one-hot", True), (np.float64, "labels", True),
                            (np.float64, "one-hot", False)]}


@pytest.mark.parametrize("rows, classes, smoothing, levels, dtype, targets, weighted", [
    *((*case, *combo) for case in SOFTMAX_CROSS_ENTROPY if case[1] < 37
      for combo in _CLASS_WEIGHTED["thread"]),
    *((*case, *_CLASS_WEIGHTED["warp"][(i + j) % 3])
      for i, case in enumerate(c for c in SOFTMAX_CROSS_ENTROPY if c[1] >= 37)
      for j in range(2))])
def test_softmax_cross_entropy_looks_up_class_weights(fast, monkeypatch, rng, rows, classes,
                                                      smoothing, levels, dtype, targets,
                                                      weighted):
    """fit's class_weight table indexed by each row's label (a one-hot row's first maximum)
    in the loss's one launch, times the sample weight: the standard version's numbers, and
    a table of ones the bits of none."""
    module = sys.modules[type(fast).__module__]
    monkeypatch.setattr(module.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    z = (rng.integers(0, levels, (rows, classes)) if levels
         else rng.standard_normal((rows, classes)) * 30).astype(dtype)
    labels = rng.integers(0, classes, rows)
    y = labels.astype(np.int32) if targets == "labels" else \
        np.eye(classes, dtype=np.float32)[labels]
    w = rng.uniform(0.0, 3.0, rows).astype(np.float32) if weighted else None
    table = rng.uniform(0.1, 3.0, classes).astype(dtype)
    launches = []
    real = module._raw_kernel
    monkeypatch.setattr(module, "_raw_kernel", lambda *a, **k: launches.append(a[0]) or
                        real(*a, **k))
    stats, grad = fast.softmax_cross_entropy(z, y, smoothing, None, None, w, table)
    assert len(launches) == 1  # (the fused kernel, not the standard version)
    want_stats, want_grad = STD.softmax_cross_entropy(z, y, smoothing, None, None, w, table)
    tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(stats[0], want_stats[0], rtol=tol, atol=tol)
    assert stats[1] == want_stats[1]
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * 3 / rows)
    ones = np.ones(classes, dtype)
    for got, want in zip(fast.softmax_cross_entropy(z, y, smoothing, None, None, w, ones),
                         fast.softmax_cross_entropy(z, y, smoothing, None, None, w),
                         strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("classes", [10, 300])  # (a row a thread; a row a warp)
@pytest.mark.parametrize("bad", ["too large", "negative", "NaN in a one-hot row"])
def test_a_target_that_is_no_class_makes_the_count_nan_too(fast, rng, classes, bad):
    """A label out of range, or a one-hot row with a NaN, makes the loss and the count of
    rows predicted right NaN in the kernel as in the standard version (a count that looks
    normal would be reported as the step's accuracy), with or without class weights."""
    z = rng.standard_normal((20, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 20)
    y = np.eye(classes, dtype=np.float32)[labels] if bad.startswith("NaN") else labels
    y[7] = {"too large": classes, "negative": -1}.get(bad, np.nan)
    for kernels in (fast, STD):
        for table in (None, np.ones(classes, np.float32)):
            with np.errstate(invalid="ignore"):
                stats, _ = kernels.softmax_cross_entropy(z, y, 0.0, class_weights=table)
            assert np.isnan(stats).all(), (kernels, table, stats)


def _loss_kernel(fast, monkeypatch):
    """The names of the loss kernels launched from now on."""
    module, launches = sys.modules[type(fast).__module__], []
    real = module._raw_kernel
    monkeypatch.setattr(module, "_raw_kernel", lambda *a, **k: launches.append(a[0]) or
                        real(*a, **k))
    return launches


@pytest.mark.parametrize("rows, classes", [(40, 4), (33, 37), (20, 300), (700, 10)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_tied_target_row_counts_its_first_maximum_as_its_label(fast, monkeypatch, rng, rows,
                                                                 classes, dtype):
    """A target row of two equal maxima ([0.5, 0.5, 0, ...]) is right where the logits' first
    maximum is the first of them, as argmax takes it (the standard version's): ties within a
    thread's walk of the row and, a row a warp, within a lane's classes and across lanes.
    (37 classes: a row a thread in float16, a row a warp in float32.)"""
    launches = _loss_kernel(fast, monkeypatch)
    pairs = [(0, 1), (classes - 2, classes - 1)]
    if classes > 33:
        pairs.append((1, 33))  # (lane 1's first and second class)
    y = rng.dirichlet(np.ones(classes), rows).astype(np.float32)
    z = rng.standard_normal((rows, classes)).astype(dtype)
    for r in range(rows // 2):  # half the rows tied, their logits' maximum at either
        a, b = pairs[r % len(pairs)]
        y[r] = 0
        y[r, [a, b]] = 0.5
        z[r, (a, b)[r // len(pairs) % 2]] = 9
    labels = np.argmax(y, axis=1)  # (the first maximum)
    right = int((np.argmax(z, axis=1) == labels).sum())
    assert 0 < right < rows
    stats, _ = fast.softmax_cross_entropy(z, y, 0.0)
    assert len(launches) == 1  # (the fused kernel, not the standard version)
    want = "xpcnn_softmax_cross_entropy" if classes * 256 * np.dtype(dtype).itemsize <= 32768 \
        else "xpcnn_softmax_cross_entropy_rows"
    assert launches[0] == want
    assert stats[1] == right == STD.softmax_cross_entropy(z, y, 0.0)[0][1]
    assert stats[1] == fast.softmax_cross_entropy(z, labels, 0.0)[0][1]


@pytest.mark.parametrize("classes", [10, 300])  # (a row a thread, a row a warp)
@pytest.mark.parametrize("targets", ["labels", "rows"])
@pytest.mark.parametrize("logits, loss, weights", [(np.float16, None, np.float32),
                                                   (np.float16, np.float32, np.float64),
                                                   (np.float32, None, np.float64)])
def test_sample_weights_are_rounded_to_the_loss_dtype(fast, monkeypatch, rng, classes, targets,
                                                      logits, loss, weights):
    """Weights wider than the loss's dtype (float32 ones of a float16 loss) are read as the
    standard version's cast rounds them: the bits of the weights rounded first."""
    launches = _loss_kernel(fast, monkeypatch)
    rows = 50
    z = rng.standard_normal((rows, classes)).astype(logits)
    y = rng.integers(0, classes, rows).astype(np.int32)
    if targets == "rows":
        y = np.eye(classes, dtype=np.float32)[y]
    w = rng.uniform(0.0, 3.0, rows).astype(weights)
    t = np.dtype(loss or logits)
    rounded = w.astype(t)
    assert (rounded != w).all()  # (every weight changed by rounding)
    got = fast.softmax_cross_entropy(z, y, 0.1, None, loss, weights=w)
    want = fast.softmax_cross_entropy(z, y, 0.1, None, loss, weights=rounded)
    assert launches == [launches[0]] * 2 and launches[0].startswith("xpcnn_softmax_cross")
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
    std = STD.softmax_cross_entropy(z.astype(t), y, 0.1, weights=w)
    tol = 2e-3 if t.itemsize == 2 else 1e-5
    np.testing.assert_allclose(got[0][0], std[0][0], rtol=tol, atol=tol)


@OPTIMISERS
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_optimiser_updates(fast, rng, make, dtype):
    params = [rng.standard_normal(s).astype(dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for _ in range(4):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        opt_fused.step(xpn, fused, grads, fast)
        opt_std.step(xpn, standard, grads)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for f, s in zip(fused, standard, strict=True):
        np.testing.assert_allclose(f, s, rtol=tol, atol=tol)


@pytest.mark.parametrize("make", [*OPTIMISERS.args[1], *CLIPPED],
                         ids=[*OPTIMISERS.kwargs["ids"], *CLIPPED_IDS])
def test_fused_updates_of_float16_parameters(fast, rng, make):
    """A user's optimiser on float16 parameters (fit keeps them in float32): the update
    kernels compile for CuPy's float16, which has no arithmetic of its own (SGD's and
    RMSprop's ``c ? float : float16`` did not), computed in float and each stored value
    rounded once, within about two float16 roundings of the standard version's, which rounds
    every operation (gradients of magnitude 0.5 to 2: no squares in float16's subnormals)."""
    params = [rng.standard_normal(s).astype(np.float16) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for _ in range(4):
        grads = [(rng.choice([-1.0, 1.0], p.shape) * rng.uniform(0.5, 2.0, p.shape)
                  ).astype(np.float16) for p in params]
        opt_fused.step(xpn, fused, grads, fast)
        opt_std.step(xpn, standard, grads)
    for name, slots in [("params", standard), *opt_std.slots.items()]:
        got = fused if name == "params" else opt_fused.slots[name]
        for a, b in zip(got, slots, strict=True):
            assert a.dtype == b.dtype == np.float16, name
            # (within rounding of the array's largest values: momentum sums cancel)
            b = b.astype(np.float32)
            np.testing.assert_allclose(a.astype(np.float32), b, rtol=3e-3,
                                       atol=2e-3 * max(1.0, float(np.abs(b).max())),
                                       err_msg=name)


@OPTIMISERS
def test_fused_updates_leave_an_infinite_weight_as_the_standard_ones_do(fast, rng, make):
    """Without weight decay the kernels add no decay term: 0 times an infinite weight would be
    NaN, where the standard formulas (which skip a zero decay) keep the weight infinite and the
    state finite."""
    params = [rng.standard_normal(s).astype(np.float32) for s in UPDATE_SHAPES]
    params[0][0] = np.inf
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    with np.errstate(invalid="ignore"):
        opt_fused.step(xpn, fused, grads, fast)
        opt_std.step(xpn, standard, grads)
    for f, s_ in zip([*fused, *(a for v in opt_fused.slots.values() for a in v)],
                     [*standard, *(a for v in opt_std.slots.values() for a in v)], strict=True):
        assert np.array_equal(np.isnan(f), np.isnan(s_)) and np.array_equal(np.isinf(f),
                                                                             np.isinf(s_))


@OPTIMISERS
def test_fused_updates_of_parameters_of_two_dtypes(fast, rng, make):
    """One step over float32 and float64 parameters: a launch per dtype, each right."""
    _, fused, _, standard = two_dtype_updates(xpn, fast, make, rng, (np.float32, np.float64))
    for f, s in zip(fused, standard, strict=True):
        assert f.dtype == s.dtype
        tol = 1e-5 if f.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(f, s, rtol=tol, atol=tol)


@OPTIMISERS
def test_a_gated_update_changes_nothing_where_the_flag_is_false(fast, rng, make):
    """The CUDA update kernels read ``apply`` from device memory: False leaves every element."""
    for f, s in zip(*gated_updates(xpn, fast, make, rng), strict=True):
        np.testing.assert_allclose(f, s, rtol=1e-5, atol=1e-5)


# (a gradient of several tiles of the sums of squares, and an empty one)
CLIP_SHAPES = [*UPDATE_SHAPES, (0,), (70, 300)]


@pytest.mark.parametrize("make", [*CLIPPED, lambda: xpcnn.optim.SGD(0.1, clipnorm=1e3)],
                         ids=[*CLIPPED_IDS, "sgd-clipnorm-not-reached"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_updates_clip_as_the_standard_way_with_at_most_one_more_launch(
        fast, monkeypatch, rng, make, dtype):
    """Clipping inside the CuPy updates, the gradients never copied: clipvalue as each is
    loaded (the standard clipping's bits), a norm from one launch of every gradient's sum of
    squares (in double: the standard values within rounding), per array or for all; a step
    whose ``apply`` is False changes nothing, and the NaN it holds is no norm of the next."""
    module = sys.modules[type(fast).__module__]
    launches = []

    def counted(name, kernel):
        def launch(*args, **kwargs):
            launches.append(name.removesuffix("_AT"))  # (Adam's numbers: device scalars)
            return kernel(*args, **kwargs)

        return launch

    for name in ("SGD", "ADAM", "ADAM_AT", "RMSPROP", "ADAM_SCALARS"):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    raw = module._raw_kernel
    monkeypatch.setattr(module, "_raw_kernel",
                        lambda name, *a, **k: counted(name, raw(name, *a, **k)))
    params = [rng.standard_normal(s).astype(dtype) for s in CLIP_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    norm = opt_std.clipnorm is not None or opt_std.global_clipnorm is not None
    for apply in GATED_STEPS:
        grads = [(3 * rng.standard_normal(p.shape)).astype(dtype) for p in params]
        if apply is False:
            grads[1][0] = np.nan
        kept = [g.copy() for g in grads]
        flag = None if apply is None else np.asarray(apply)
        launches.clear()
        opt_fused.step(xpn, fused, grads, fast, flag)
        opt_std.step(xpn, standard, grads, apply=flag)
        for g, before in zip(grads, kept, strict=True):
            assert_same(g, before)  # (clipped as loaded, never in place)
        assert launches == [*(["ADAM_SCALARS"] if opt_fused.counts_updates else []),
                            *(["xpcnn_sum_squares"] if norm else []),
                            {"SGD": "SGD", "Adam": "ADAM", "AdamW": "ADAM",
                             "RMSprop": "RMSPROP"}[type(opt_fused).__name__]]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for name, slots in [("params", standard), *opt_std.slots.items()]:
        got = fused if name == "params" else opt_fused.slots[name]
        for a, b in zip(got, slots, strict=True):
            if norm:
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
            else:
                assert_same(a, b)


def test_an_optimiser_without_a_fused_update_runs_its_own(fast):
    """A user's Optimizer subclass that defines only ``_update`` still works where the kernels
    offer fused updates, with the learning rate as a float or as a device scalar."""

    class HalfStep(xpcnn.optim.Optimizer):
        def _update(self, xp, i, p, g, scalars, apply):
            self._assign(xp, p, p - 0.5 * scalars["lr"] * g, apply)

    p = [np.ones(3, np.float32)]
    HalfStep(0.2).step(xpn, p, [np.ones(3, np.float32)], fast)
    np.testing.assert_allclose(p[0], 0.9)
    HalfStep(0.2).step(xpn, p, [np.ones(3, np.float32)], fast,
                       scalars={"lr": np.asarray(0.2, np.float32)})
    np.testing.assert_allclose(p[0], 0.8)


@pytest.mark.parametrize("kernels", ["cupy", "numpy"])
def test_a_users_clipping_runs_where_the_kernels_could_clip(fast, kernels):
    """A subclass overriding ``_clipped`` keeps its clipping: the fused kernels' own clipping
    is taken only where the clipping is xpcnn's."""

    class NoStep(xpcnn.optim.SGD):
        def _clipped(self, xp, grads):
            return [g * 0 for g in grads]

    p = [np.ones(5, np.float32)]
    NoStep(0.1, clipnorm=1.0).step(xpn, p, [np.full(5, 3.0, np.float32)],
                                   fast if kernels == "cupy" else NumpyKernels())
    assert_same(p[0], np.ones(5, np.float32))


@pytest.mark.parametrize("clip", [{"clipnorm": 1.0}, {"global_clipnorm": 1.0},
                                  {"clipvalue": 0.5}])
def test_a_declined_fused_update_clips_before_the_standard_one(fast, monkeypatch, clip):
    """Where xpcnn's fused update declines a step it was to clip, the gradients are clipped
    the standard way before ``_update`` runs."""
    monkeypatch.setattr(xpcnn.optim.SGD, "_fused_update", lambda self, *a, **k: False)
    grads = [np.full(5, 3.0, np.float32), np.full((2, 3), -2.0, np.float32)]
    got = [np.ones(5, np.float32), np.ones((2, 3), np.float32)]
    want = [a.copy() for a in got]
    xpcnn.optim.SGD(0.1, **clip).step(xpn, got, [g.copy() for g in grads], fast)
    xpcnn.optim.SGD(0.1, **clip).step(xpn, want, [g.copy() for g in grads])
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)


# (gap_net with every convolution algorithm; every_layer_net, whose other layers take the same
# kernels whatever the algorithm, with the two whose kernels run all three passes, the other two
# being theirs forward and im2col's, which the standard path runs, for the kernel's gradient)
@pytest.mark.parametrize("net, algorithm", [
    *((gap_net, algorithm) for algorithm in ["direct", "tiled", "direct-forward", "im2col"]),
    (every_layer_net, "direct"), (every_layer_net, "tiled")])
def test_training_with_the_cuda_kernels(fast, monkeypatch, net, algorithm):
    """Whole training runs with every CuPy kernel in place of the NumPy ones end with the
    standard path's weights."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 32)
    conv = fast.conv_kernels
    for flag in ("runs_forward", "runs_weight_grad", "tiled"):
        monkeypatch.setattr(conv, flag, getattr(conv, flag))  # put back after the test
    conv.set_algorithm(algorithm)

    def fit(kernels):
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        model = xpcnn.Sequential(net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return model.get_weights(), history.history["loss"]

    (w_fast, loss_fast), (w_std, loss_std) = fit(fast), fit(None)
    assert loss_fast == pytest.approx(loss_std, rel=1e-5)
    for a, b in zip(w_fast, w_std, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("net", [gap_net, every_layer_net])
def test_mixed_precision_training_with_the_cuda_kernels(fast, monkeypatch, net, precision):
    """Mixed precision on the CuPy kernels (CuPy's float16 and bfloat16 emulated; the direct
    convolution kernels, the tiled ones being the tensor cores' on a GPU): float16 or bfloat16
    layers, the float16 loss scaled and the gradients unscaled and checked by the step's
    record, the fused float32 updates. Close to the standard path, which rounds every
    half-precision operation where the kernels round once: the same loss scale (none for
    bfloat16), losses to 2e-4 in float16 and 8 times that in bfloat16 (its unit roundoff,
    2**-8 against 2**-11: its losses differ from float32's by ~1e-3), weights to 2% of the
    largest weight where dropout, flips and crops compound the roundings (0.1% without them:
    2% let the first kernel of gap_net pass untrained)."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 32)
    conv = fast.conv_kernels
    for flag in ("runs_forward", "runs_weight_grad", "tiled"):
        monkeypatch.setattr(conv, flag, getattr(conv, flag))  # put back after the test
    conv.set_algorithm("direct")

    def fit(kernels):
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        model = xpcnn.Sequential(net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), precision=precision)
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return model.get_weights(), history.history["loss"], model.loss_scale

    (w_fast, loss_fast, scale_fast), (w_std, loss_std, scale_std) = fit(fast), fit(None)
    assert scale_fast == scale_std == (2.0**15 if precision == "mixed_float16" else 1.0)
    assert loss_fast == pytest.approx(loss_std, rel=2e-4 if precision == "mixed_float16"
                                      else 1.6e-3)
    largest = max(float(np.abs(b).max()) for b in w_std)
    share = 0.02 if net is every_layer_net else 1e-3
    for a, b in zip(w_fast, w_std, strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=share * largest)


@pytest.mark.parametrize("precision", list(GAP_NET_STEP_TABLES))
def test_the_tables_a_captured_training_step_defers(fast, monkeypatch, precision):
    """Inside ``capture_tables`` every launch that finds its arrays through a table (the casts,
    the gradients' check, the update) takes one that is filled after the capture: as many as
    tests/test_gpu.py expects a captured gap_net step to hold. (Filled at once here, so that
    the emulated kernels can run: nothing is captured on the CPU.)"""
    from xpcnn.ops import cuda_updates  # (the emulated one)

    def filled_at_once(deferred, host_table):
        deferred.pending.append((host_table.copy(), host_table))
        return deferred.pending[-1][0]

    monkeypatch.setattr(cuda_updates.DeferredTables, "table", filled_at_once)
    monkeypatch.setattr(fast.conv_kernels, "tiled", False)  # (the direct kernels: faster here)
    monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: fast)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 16)
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), precision=precision)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # (built, the optimiser's slots made)
    with fast.capture_tables() as tables:
        model._device_step(x, y, model.optimizer.iterations + 1)
    assert len(tables) == GAP_NET_STEP_TABLES[precision]


# -- the updates with device scalars (a step captured in a CUDA graph, xpcnn.cuda_graphs) ---------


# per step, whether it applies (None: no flag); where it does not, its gradients hold a NaN
GATED_STEPS = [None, True, False, True]


@OPTIMISERS
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_updates_with_device_scalars_are_the_standard_ones_bit_for_bit(
        fast, monkeypatch, rng, make, dtype):
    """A step given device scalars, with the CuPy kernels (one launch, the numbers read from
    device arrays) against its standard formulas: the same parameters and slots, bit for bit,
    a step whose ``apply`` is False included."""
    module = sys.modules[type(fast).__module__]
    launches = []

    def counted(kernel):
        def launch(*args, **kwargs):
            launches.append(kernel.name)
            kernel(*args, **kwargs)

        return launch

    for name in ("SGD_AT", "ADAM_AT", "RMSPROP_AT"):  # (as fast_cupy imported them)
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    params = [rng.standard_normal(s).astype(dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for apply in GATED_STEPS:
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        if apply is False:
            grads[1][0] = np.nan
        flag = None if apply is None else np.asarray(apply)
        before = [a.copy() for a in fused] + [s.copy() for v in opt_fused.slots.values()
                                              for s in v]
        opt_fused.step(xpn, fused, grads, fast, flag, device_scalars(opt_fused, dtype))
        opt_std.step(xpn, standard, grads, apply=flag, scalars=device_scalars(opt_std, dtype))
        for opt in (opt_fused, opt_std):
            opt.iterations += 1
        if apply is False:
            after = fused + [s for v in opt_fused.slots.values() for s in v]
            for a, b in zip(after, before, strict=True):
                assert_same(a, b)
    assert len(launches) == len(GATED_STEPS)  # one launch per step
    for a, b in zip(fused, standard, strict=True):
        assert_same(a, b)
    for name, slots in opt_std.slots.items():
        for a, b in zip(opt_fused.slots[name], slots, strict=True):
            assert_same(a, b)


@OPTIMISERS
def test_fused_updates_with_device_scalars_over_two_dtypes(fast, rng, make):
    """Parameters of float32 and float64 with float32 step numbers (the first parameter's
    dtype, as a captured step has them): the standard values bit for bit (a float32 number
    meets float64 parameters exactly, in both)."""
    _, fused, _, standard = two_dtype_updates(xpn, fast, make, rng, (np.float32, np.float64),
                                              np.float32)
    for a, b in zip(fused, standard, strict=True):
        assert a.dtype == b.dtype
        assert_same(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_amsgrad_kernel_keeps_the_larger_moment_or_a_nan_of_either(fast, rng, dtype):
    """AMSGrad's largest second moment in the CUDA kernel is xp.maximum's, bit for bit: the
    larger of the two, and a NaN of either (a NaN gradient's v, a NaN kept from before)."""
    params = [rng.standard_normal(s).astype(dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = (xpcnn.optim.Adam(1e-2, beta_2=0.5, amsgrad=True) for _ in range(2))
    for step in range(3):
        grads = [rng.standard_normal(p.shape).astype(dtype) * (0.1 if step else 1.0)
                 for p in params]
        if step == 1:
            grads[0][0, 0, 0, 0] = np.nan
            for opt in (opt_fused, opt_std):
                opt.slots["vhat"][3][0, 0] = np.nan
        for opt, ps, kernels in ((opt_fused, fused, fast), (opt_std, standard, None)):
            opt.step(xpn, ps, grads, kernels, scalars=device_scalars(opt, dtype))
            opt.iterations += 1
    vhat, v = opt_fused.slots["vhat"], opt_fused.slots["v"]
    assert np.isnan(vhat[0][0, 0, 0, 0]) and np.isnan(vhat[3][0, 0])
    assert (vhat[1] > v[1]).any()  # (v below its largest: the maximum was taken)
    for a, b in zip(fused, standard, strict=True):
        assert_same(a, b)
    for name, slots in opt_std.slots.items():
        for a, b in zip(opt_fused.slots[name], slots, strict=True):
            assert_same(a, b)


class EmulatedCapture:
    """A stream capture of the emulated kernels, as CUDA makes one: while ``recording``, kernel
    launches are recorded, not run; a copy to the device fails (CuPy's capture refuses it) and
    new device memory holds garbage (-1); ``allocators`` notes the allocator each new array
    came from; a zeroed one is a recorded memset. ``replay`` runs the recorded launches on the
    arrays they were given, as a replayed graph does. ``module``: the emulated
    ``xpcnn.ops.cuda_updates``, whose ``_upload`` fills the tables."""

    def __init__(self, module, monkeypatch):
        self.module, self.monkeypatch, self.launches, self.allocators = (
            module, monkeypatch, [], [])

    def _garbage(self, shape, dtype):
        self.allocators.append((self.module.cupy.cuda.allocators or [None])[-1])
        return np.full(shape, -1).astype(dtype)  # (all ones bits in an unsigned type)

    def _memset(self, shape, dtype):
        a = self._garbage(shape, dtype)
        self.launches.append((lambda a, size=None: a.fill(0), (a,), None))
        return a

    @contextlib.contextmanager
    def recording(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a copy to the device inside the capture")

        with self.monkeypatch.context() as m:
            m.setattr(ElementwiseKernel, "__call__", lambda kernel, *args, size=None:
                      self.launches.append((kernel, args, size)))
            m.setattr(self.module.cupy, "asarray", refuse)
            m.setattr(self.module, "_upload", refuse)
            m.setattr(self.module.cupy, "empty", self._garbage)
            m.setattr(self.module.cupy, "zeros", self._memset)
            yield

    def replay(self):
        for kernel, args, size in self.launches:
            kernel(*args, size=size)


@OPTIMISERS
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_captured_fused_update_fills_its_table_after_the_capture_and_replays_right(
        fast, monkeypatch, rng, make, dtype):
    """An update captured in a graph: inside the capture its table is allocated (from the
    tables' own memory pool, which no temporary of the step shares), not copied to the
    device; it is filled when ``capture_tables`` ends (before any launch) with the addresses
    of the captured step's arrays; the replays, with new gradients, step numbers and flags in
    the same arrays, give the standard formulas' values bit for bit."""
    from xpcnn.ops import cuda_updates as module  # (the emulated one: the tables')

    params = [rng.standard_normal(s).astype(dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]  # the static buffers
    apply = np.asarray(True)
    scalars = device_scalars(opt_fused, dtype)
    for opt, ps, kernels in ((opt_fused, fused, fast), (opt_std, standard, None)):  # warm-up
        opt.step(xpn, ps, grads, kernels, apply, device_scalars(opt, dtype))
        opt.iterations += 1
    capture = EmulatedCapture(module, monkeypatch)
    with fast.capture_tables() as tables:
        with capture.recording():
            opt_fused.step(xpn, fused, grads, fast, apply, scalars)
        assert tables == []  # (filled on leaving)
    # (one launch, and Adam's numbers from its count of updates in one before it)
    updates = 2 if opt_fused.counts_updates else 1
    assert fast._deferred is None and len(capture.launches) == updates and len(tables) == 1
    # (the table from its own pool; Adam's three numbers, a temporary, from the default one)
    assert capture.allocators == [None] * (updates - 1) + [fast._table_pool.malloc]
    offsets = np.cumsum([0] + [p.size for p in fused])
    rows = [[a.ctypes.data for a in arrays]
            for arrays in zip(fused, grads, *opt_fused.slots.values(), strict=True)]
    assert_same(tables[0], np.concatenate([offsets, np.ravel(rows)]))
    for gate in GATED_STEPS[1:]:  # the replays
        for g in grads:
            g[...] = rng.standard_normal(g.shape)
        if gate is False:
            grads[1][0] = np.nan
        apply[...] = gate
        for k, v in opt_fused.step_scalars().items():
            scalars[k][...] = v
        capture.replay()
        opt_std.step(xpn, standard, grads, apply=apply, scalars=device_scalars(opt_std, dtype))
        for opt in (opt_fused, opt_std):
            opt.iterations += 1
    for a, b in zip(fused, standard, strict=True):
        assert_same(a, b)
    for name, slots in opt_std.slots.items():
        for a, b in zip(opt_fused.slots[name], slots, strict=True):
            assert_same(a, b)


def test_a_capture_that_fails_fills_no_table(fast, monkeypatch, rng):
    from xpcnn.ops import cuda_updates as module  # (the emulated one: the tables')

    filled = []
    monkeypatch.setattr(module, "_upload", lambda device, host: filled.append(device))
    p, g = [np.zeros(3, np.float32)], [np.ones(3, np.float32)]
    capture = EmulatedCapture(module, monkeypatch)
    with pytest.raises(RuntimeError, match="refused"), fast.capture_tables() as tables:
        with capture.recording():
            fast.sgd_update(p, g, None, np.asarray(0.5, np.float32), 0.0, 0.0, False)
        raise RuntimeError("the capture refused something")
    assert tables == filled == [] and fast._deferred is None


# -- a training step's normalisation statistics kept and put back (Trainer._device_step) --------


def _statistics(rng):
    """State arrays of every float dtype, of byte sizes that are no multiple of 4 or 8, a 0-d
    one, and bits that a conversion could change (NaN, -0.0, infinity)."""
    arrays = [rng.standard_normal(shape).astype(dtype) for shape, dtype in
              [((16,), np.float32), ((3,), np.float16), ((), np.float64), ((2, 7), np.float64),
               ((5,), np.float32), ((1,), np.float16)]]
    arrays[0][:3] = [np.nan, -0.0, np.inf]
    return arrays


def _bits(arrays):
    return [a.tobytes() for a in arrays]


def _launched(monkeypatch):
    """The names of the emulated kernels launched from now on."""
    names, call = [], ElementwiseKernel.__call__

    def counted(kernel, *args, size=None):
        names.append(kernel.name)
        return call(kernel, *args, size=size)

    monkeypatch.setattr(ElementwiseKernel, "__call__", counted)
    return names


@pytest.mark.parametrize("how", ["eager", "captured"])
def test_statistics_kept_and_put_back_in_one_launch_each(fast, monkeypatch, rng, how):
    """snapshot_state and restore_state in one launch each for arrays of every dtype together,
    step after step: the standard version's arrays bit for bit, put back where ``apply`` is
    False, as the "forward pass" between them left them where it is True. Captured: the one
    table (the arrays' byte offsets and addresses) filled after the capture, the recorded
    launches replayed with the forward pass between them and the flag in the same array."""
    from xpcnn.ops import cuda_updates as module  # (the emulated one: the tables')

    arrays = _statistics(rng)
    fast_arrays, std_arrays = [a.copy() for a in arrays], [a.copy() for a in arrays]
    apply = np.asarray(True)
    if how == "captured":
        capture = EmulatedCapture(module, monkeypatch)
        with fast.capture_tables() as tables:
            with capture.recording():
                fast.restore_state(fast_arrays, fast.snapshot_state(fast_arrays), apply)
            assert tables == []  # (filled on leaving)
        (snapshot, snapshot_args, size), (restore, restore_args, _) = capture.launches
        assert [snapshot.name, restore.name] == ["xpcnn_snapshot", "xpcnn_restore"]
        offsets = np.cumsum([0] + [a.nbytes for a in fast_arrays])
        assert_same(
            tables[0], np.concatenate([offsets, [a.ctypes.data for a in fast_arrays]]))
    launched = _launched(monkeypatch)
    for gate in [True, False, False, True, False]:
        if how == "eager":
            kept = fast.snapshot_state(fast_arrays)
        else:
            snapshot(*snapshot_args, size=size)
        std_kept = STD.snapshot_state(std_arrays)
        before = _bits(std_arrays)
        for f, s in zip(fast_arrays, std_arrays, strict=True):  # the forward pass
            f[...] = s[...] = rng.standard_normal(s.shape)
        moved = _bits(std_arrays)
        apply[...] = gate
        if how == "eager":
            fast.restore_state(fast_arrays, kept, apply)
        else:
            restore(*restore_args, size=size)
        STD.restore_state(std_arrays, std_kept, xpn.asarray(gate))
        assert _bits(fast_arrays) == _bits(std_arrays) == (moved if gate else before)
    assert launched == ["xpcnn_snapshot", "xpcnn_restore"] * 5


def test_statistics_that_the_kernels_do_not_take_are_kept_by_the_standard_version(fast,
                                                                                  monkeypatch):
    """No array: nothing launched. A non-contiguous one (the kernels find bytes by their
    flat index): the standard copies, with the same result."""
    launched = _launched(monkeypatch)
    fast.restore_state([], fast.snapshot_state([]), np.asarray(False))
    strided = np.arange(12.0, dtype=np.float32).reshape(3, 4)[:, ::2]
    kept = fast.snapshot_state([strided])
    strided[...] = -1.0
    fast.restore_state([strided], kept, np.asarray(False))
    assert_same(strided, [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]])
    assert launched == []


@pytest.mark.parametrize("precision", ["float32", "mixed_float16", "float64"])
def test_a_skipped_step_puts_the_statistics_back_with_the_cuda_kernels(fast, monkeypatch,
                                                                       precision):
    """Training on the emulated CuPy kernels: a step the device skips (a label that is no class)
    leaves every BatchNorm2D's statistics as they were, bit for bit, through one launch that
    keeps them and one that puts them back; an applied step leaves those its forward pass
    computed (the standard path's); a frozen BatchNorm2D's are never touched."""
    monkeypatch.setattr(fast.conv_kernels, "tiled", False)  # (the direct kernels: faster here)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, 8)

    def statistics(model):
        return [np.array(a, copy=True) for la in model.layers for a in la.state.values()]

    def two_steps(kernels):
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        frozen = BatchNorm2D()
        frozen.trainable = False
        model = xpcnn.Sequential(
            [Conv2D(4, 3), BatchNorm2D(), ReLU(), frozen, Conv2D(4, 3, padding="same"),
             BatchNorm2D(), Flatten(), Dense(4), Softmax()],
            seed=0, dtype="float64" if precision == "float64" else "float32")
        model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9),
                      precision="mixed_float16" if precision == "mixed_float16" else "float32")
        model.build((6, 6, 3))
        first = statistics(model)
        xb = model._to_device(x)
        model.train_step(xb, model.backend.asarray(y))
        applied = statistics(model)
        model.train_step(xb, model.backend.asarray(np.where(np.arange(8) == 5, 4, y)))
        return first, applied, statistics(model)

    launched = _launched(monkeypatch)
    first, applied, skipped = two_steps(fast)
    assert launched.count("xpcnn_snapshot") == launched.count("xpcnn_restore") == 2
    _, std_applied, std_skipped = two_steps(None)
    assert _bits(skipped) == _bits(applied) and _bits(std_skipped) == _bits(std_applied)
    assert _bits(applied[2:4]) == _bits(first[2:4])  # (the frozen layer's)
    tol = 1e-3 if precision == "mixed_float16" else 1e-5
    for k in (0, 1, 4, 5):
        assert not np.array_equal(applied[k], first[k])
        np.testing.assert_allclose(applied[k], std_applied[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("scaling, squares", RECORD_SCALING)
@pytest.mark.parametrize("dtypes", RECORD_DTYPES)
@pytest.mark.parametrize("how", ["eager", "step-on-device", "captured"])
def test_recording_a_step(fast, monkeypatch, dtypes, scaling, squares, how):
    """The kernels that record a step (its gradients unscaled and checked, then the sums,
    the first bad step, the loss scale and the flag "apply") leave what the standard
    version leaves, step by step: eager, with the step number on the device, and captured once (the
    table filled after the capture) and replayed for every step."""
    from xpcnn.ops import cuda_updates  # (the emulated one: the tables')

    record = fast.record_step
    if how == "captured":
        capture, captured = EmulatedCapture(cuda_updates, monkeypatch), []

        def record(*args):
            if not captured:
                with fast.capture_tables() as tables, capture.recording():
                    captured.append(fast.record_step(*args))
                checks = record_checks(dtypes)  # (and the record)
                assert len(tables) == checks and len(capture.launches) == 1 + checks
            capture.replay()
            return captured[0]

    want, want_grads = recorded_steps(np, STD.record_step, dtypes, scaling, squares,
                                      how != "eager")
    got, got_grads = recorded_steps(np, record, dtypes, scaling, squares, how != "eager")
    for g, g_want in zip(got_grads, want_grads, strict=True):
        assert_same(g, g_want)
    for step, ((state, scale, apply), (s_want, scale_want, apply_want)) in enumerate(
            zip(got, want, strict=True), 1):
        assert np.array_equal(state, s_want, equal_nan=True), (step, state, s_want)
        assert np.array_equal(scale, scale_want), (step, scale, scale_want)
        assert apply == apply_want, step
    check_recorded_steps(want, scaling, squares)


@pytest.mark.parametrize("stats_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("how", ["eager", "step-on-device"])
def test_recording_a_step_adds_its_top_k_counts(fast, monkeypatch, how, top_k, stats_dtype):
    """The record kernel adds a step's top-k counts (the stats after [loss, correct]) to the
    state's from top_k_start on, in its one launch, as the standard version adds them: the
    state's bits the same, from counts resumed from a checkpoint, and a NaN step's counts
    added as its loss and correct count are (as the add after the record did)."""
    from xpcnn.ops.step_record import BAD_GRADS, BAD_STEP, cleared, top_k_start

    module, launches = sys.modules[type(fast).__module__], []
    for name in ("CHECK_GRADIENTS", "RECORD_STEP", "RECORD_STEP_AT"):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, kernel=kernel, **k:
                            launches.append(kernel.name) or kernel(*a, **k))
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,)]]
    resumed = [7.0, 11.0, 13.0][:top_k]
    states = [np.array([2.5, 4.0, *cleared(2), *resumed]) for _ in range(2)]
    counts = np.array(resumed)
    for step, loss in enumerate([0.75, np.nan, 0.1 + 1 / 3], 1):
        stats = np.array([loss, 3.0, *rng.integers(0, 64, top_k)], stats_dtype)
        counts += stats[2:]
        number = np.asarray(float(step)) if how == "step-on-device" else step
        launches.clear()
        for kernels, state in zip((fast, STD), states, strict=True):
            kernels.record_step(state, stats, [g.copy() for g in grads], 64.0, number, None,
                                False)
        assert launches == ["xpcnn_check_gradients",
                            "xpcnn_record_step" + ("_at" if how != "eager" else "")]
        assert np.array_equal(states[0], states[1], equal_nan=True), (step, *states)
        assert list(states[0][top_k_start(2):]) == list(counts)
        assert states[0][BAD_STEP] == (-1.0 if step == 1 else 2.0)
    assert not states[0][BAD_GRADS + 2:top_k_start(2)].any()  # (the marks cleared)


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 37), (2, 4)])
@pytest.mark.parametrize(("dtype", "compute"), BATCH_NORM_DTYPES)
def test_batch_norm_of_one_value_a_channel_leaves_the_running_statistics(
        fast, monkeypatch, rng, shape, dtype, compute):
    """A training batch of one value a channel (its unbiased variance undefined): the same two
    launches, the output and statistics the standard version's, the running statistics left
    bit for bit (-0.0 too) as the standard version leaves them; two values move them as it
    moves them."""
    kernels = sys.modules[type(fast).__module__]
    launches = _counting_launches(kernels, monkeypatch)
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = (rng.standard_normal(c).astype(compute) for _ in range(2))
    mean0 = rng.standard_normal(c).astype(compute)
    mean0[0] = -0.0
    var0 = (rng.random(c) + 0.5).astype(compute)
    running = [(mean0.copy(), var0.copy()) for _ in range(2)]
    got = fast.batch_norm_train(x, gamma, beta, *running[0], 0.1, 1e-5, dtype, False)
    assert launches == ["xpcnn_batch_norm_stats", "xpcnn_batch_norm_apply"]
    want = STD.batch_norm_train(x, gamma, beta, *running[1], 0.1, 1e-5, dtype, False)
    if shape[0] == 1:
        assert running[0][0].tobytes() == mean0.tobytes()
        assert running[0][1].tobytes() == var0.tobytes()
    for g, w in zip(running[0], running[1], strict=True):
        tol = 2 * np.finfo(compute).eps
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    tol = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[np.dtype(dtype).type]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("classes", [3, 100], ids=["a row a thread", "a row a warp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_of_a_logit_of_probability_zero(fast, classes, dtype,
                                                             smoothing):
    """A non-target logit of -inf, or so far below the row's maximum that z - max overflows:
    its 0 * log(0) term 0, as the standard version (and PyTorch) give it, not NaN; a +inf or
    NaN logit still makes the loss NaN."""
    z = np.zeros((4, classes), dtype)
    z[0, :3] = [-np.inf, 0.0, 1.0]
    z[1, :3] = [np.finfo(dtype).max * 0.9, -np.finfo(dtype).max * 0.9, 0.0]
    z[2, 1:] = -np.inf
    z[3, :3] = [2.0, -np.inf, -np.inf]
    labels = np.array([2, 0, 0, 0])
    with np.errstate(over="ignore", invalid="ignore"):
        stats, grad = fast.softmax_cross_entropy(z, labels, smoothing)
        want_stats, want_grad = STD.softmax_cross_entropy(z, labels, smoothing)
    assert np.isfinite(want_stats[0]) == (smoothing == 0)
    np.testing.assert_allclose(stats, want_stats, rtol=1e-6)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
    for bad in (np.inf, np.nan):
        for where in (1, 2):
            wrong = z.copy()
            wrong[0, where] = bad
            with np.errstate(over="ignore", invalid="ignore"):
                assert np.isnan(fast.softmax_cross_entropy(wrong, labels, smoothing)[0][0])


@pytest.mark.parametrize("scale, want", [
    (1.0, [0.5, 0.25, 0.25]), (4 * 2.0**-126, [2 * 2.0**-126, 2.0**-126, 2.0**-126]),
    (1.5 * 2.0**-126, [2.0**-126, 2.0**-126, 2.0**-126])])
def test_the_recorded_loss_scale_halves_below_one_to_its_floor(fast, scale, want):
    """An overflow halves the scale below 1 too, down to float32's smallest normal number,
    where it is an error (the scale kept), as the standard version does."""
    overflows = [True, True, False] if scale == 1.0 else [True, True, True]
    got = recorded_scales(fast, np, scale, overflows)
    assert got == recorded_scales(STD, np, scale, overflows)
    assert got[0] == want
    assert got[2] == ([False] * 3 if scale == 1.0 else [False, True, True] if scale < 2**-125
                      else [False, False, True])


@pytest.mark.parametrize("scale", [2.0**127, 2.0**126, 3.0 * 2.0**126])
def test_the_recorded_loss_scale_never_doubles_to_infinity(fast, scale):
    """After GROWTH_INTERVAL good steps the scale doubles only where that is finite, as the
    standard version (and PyTorch's GradScaler) grows it, the good-step count reset anyway."""
    from xpcnn.ops.step_record import GROWTH_INTERVAL, cleared

    out = []
    for kernels in (fast, STD):
        scaling = np.array([scale, GROWTH_INTERVAL - 1], np.float32)
        state = np.array([0.0, 0.0, *cleared(1)])
        grad = np.array([1.0, 2.0], np.float32)
        apply = kernels.record_step(state, np.array([0.5, 1.0], np.float32), [grad], 4.0, 1,
                                    scaling, False)
        out.append((bool(np.asarray(apply)), scaling.copy(), state.copy()))
    assert out[0][0] and out[1][0]
    assert np.isfinite(out[0][1]).all()
    for g, w in zip(out[0][1:], out[1][1:], strict=True):
        assert_same(g, w)


# (every target form at each shape with float32 logits, and the logits' other dtypes at one
# shape each: the kernel's instantiation is of (Z, L, Y), its grid of the shape alone, and the
# logits' typedef is apart from the targets' (the logits compared with each other only, a
# target read as an index or as a row's first largest entry), so each dtype of each role runs
# at least once; was every (logits, targets) pair, each at one shape)
TOP_K_TARGETS = [np.int64, np.int32, np.uint8, "one-hot", "float16"]


@pytest.mark.parametrize("rows, classes, targets, dtype", [
    *((*shape, targets, np.float32) for shape in TOP_K for targets in TOP_K_TARGETS),
    (*TOP_K[1], np.int32, np.float16), (*TOP_K[2], "float16", BFLOAT16),
    (*TOP_K[3], "one-hot", np.float64), (*TOP_K[2], np.uint8, np.float64)])
def test_top_k_counts_in_one_launch(fast, monkeypatch, rng, rows, classes, targets, dtype):
    """The top-k metrics' counts for every k in one launch, as the standard version counts
    them: ties in, NaN scores greater than none, non-finite targets and labels of no class
    never counted, a one-hot row's first largest entry its target, k beyond the classes."""
    module = sys.modules[type(fast).__module__]  # (the emulated xpcnn.ops.fast_cupy)
    monkeypatch.setattr(module.cupy, "empty", _poisoned)  # (what is not written stays NaN)
    z, y = top_k_inputs(rng, rows, classes, dtype, targets)
    launches = []
    kernel = module._raw_kernel
    monkeypatch.setattr(module, "_raw_kernel", lambda *a, **k: (
        launches.append(a[0]) or kernel(*a, **k)))
    for out in (np.float32, np.float64):
        want = STD.top_k_counts(z, y, TOP_K_KS, out)
        got = fast.top_k_counts(z, y, TOP_K_KS, out)
        assert got.dtype == out and got.tolist() == want.tolist()
    assert launches == ["xpcnn_top_k_counts"] * 2


def _launch_grids(module, monkeypatch):
    """The (name, grid, block) of each raw kernel launch of the emulated ``module``."""
    grids = []
    raw = module._raw_kernel

    def recorded(name, *a, **k):
        kernel = raw(name, *a, **k)

        def launch(grid, block, args, **kw):
            grids.append((name, tuple(grid), tuple(block)))
            return kernel(grid, block, args, **kw)

        return launch

    monkeypatch.setattr(module, "_raw_kernel", recorded)
    return grids


# (more blocks than the last block's threads with int64 labels alone: the merge of the blocks'
# counts reads no target; one-hot rows are read a warp a row at 17 x 77, and by every shape of
# test_top_k_counts_in_one_launch)
@pytest.mark.parametrize("rows, classes, targets", [
    (2100, 3, np.int64), (17, 77, "one-hot"), (40, 33, np.int32)])
def test_top_k_counts_spread_a_warp_a_row_over_the_gpu(fast, monkeypatch, rng, rows, classes,
                                                        targets):
    """The top-k counts run a warp a row (lanes on consecutive classes), 8 rows a block, in
    as many blocks as the rows take; the blocks' counts are merged by the last block (more
    blocks than its threads, and rows of more classes than a warp's lanes, here)."""
    module = sys.modules[type(fast).__module__]
    monkeypatch.setattr(module.cupy, "empty", _poisoned)
    grids = _launch_grids(module, monkeypatch)
    z, y = top_k_inputs(rng, rows, classes, np.float32, targets)
    want = STD.top_k_counts(z, y, TOP_K_KS, np.float64)
    got = fast.top_k_counts(z, y, TOP_K_KS, np.float64)
    assert got.tolist() == want.tolist()
    assert grids == [("xpcnn_top_k_counts", (-(-rows // 8),), (256,))]
    assert module._counters(z)[0] == 0  # (ready for the next launch)


@pytest.mark.parametrize("targets", [np.int32, "one-hot"])
def test_top_k_counts_read_a_row_a_warp_coalesced(fast, rng, targets):
    """The scores (and one-hot rows) are read a row a warp, the lanes on consecutive classes:
    every request packed (a thread a row: a sector a thread, 8x the minimum in float32)."""
    from kernel_trace import tracing

    z = rng.standard_normal((512, 128)).astype(np.float32)
    labels = rng.integers(0, 128, 512)
    y = np.eye(128, dtype=np.float32)[labels] if targets == "one-hot" else labels.astype(targets)
    with tracing() as trace:
        got = fast.top_k_counts(z, y, (1, 5), np.float32)
    assert got.tolist() == STD.top_k_counts(z, y, (1, 5), np.float32).tolist()
    (launch,) = trace.launches
    assert launch.traffic.scatter < 1.05, launch.traffic


@pytest.mark.parametrize("targets", [np.int64, "one-hot"])
def test_top_k_counts_of_rows_of_no_class_are_the_standard_versions(fast, monkeypatch,
                                                                     targets):
    """Rows of 0 classes launch nothing (a one-hot row's first largest entry does not
    exist): the standard version's counts, or its error."""
    module = sys.modules[type(fast).__module__]
    grids = _launch_grids(module, monkeypatch)
    z = np.zeros((3, 0), np.float32)
    y = np.zeros((3, 0), np.float32) if targets == "one-hot" else np.zeros(3, targets)
    if targets == "one-hot":
        with pytest.raises(ValueError, match="empty"):
            STD.top_k_counts(z, y, (1,), np.float32)
        with pytest.raises(ValueError, match="empty"):
            fast.top_k_counts(z, y, (1,), np.float32)
    else:
        assert fast.top_k_counts(z, y, (1,), np.float32).tolist() == [0.0]
    assert grids == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_in_the_last_block_a_warp_an_array(fast, monkeypatch, rng, dtype):
    """xpcnn_sum_squares: each array's sum of squares (empty ones first, in the middle and
    last; several tiles; more arrays than the last block's warps), and the total, in double,
    the same bits at a second launch, the counter back at 0; the last block sums an array a
    warp with shuffles (no block-wide tree per array)."""
    module = sys.modules[type(fast).__module__]
    from xpcnn.ops import cuda_reductions
    source = module.SUM_SQUARES_SOURCE
    assert source is cuda_reductions.SUM_SQUARES_SOURCE
    last = source[source.index("xpcnn_last_block(counters"):]
    assert "xpcnn_warp_total(t)" in last and "xpcnn_threads_total" not in last
    sizes = [0, 5, 4096, 9000, 0, 1, *range(300, 360), 0]  # (the total: 67 sums, 3 a lane)
    grads = [(3 * rng.standard_normal(n)).astype(dtype) for n in sizes]
    want = [float(np.sum(g.astype(np.float64) ** 2)) for g in grads]
    first = fast._clipping([(grads, grads)], ("norm", 1.0))[2]
    again = fast._clipping([(grads, grads)], ("norm", 1.0))[2]
    assert_same(first, again)
    np.testing.assert_allclose(first, [*want, sum(want)], rtol=1e-13)
    assert module._counters(grads[0])[0] == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_norm_clipping_of_empty_gradients_launches_no_sum_of_squares(fast, monkeypatch,
                                                                     optimizer):
    """A direct fused update clipped by a norm whose gradients are all empty: zero sums and no
    launch (a grid of 0 blocks is an invalid launch on a GPU)."""
    module = sys.modules[type(fast).__module__]
    monkeypatch.setattr(module.cupy, "empty", _poisoned)
    grids = _launch_grids(module, monkeypatch)
    p, g = [np.zeros((0, 3), np.float32)], [np.zeros((0, 3), np.float32)]
    sums = fast._clipping([(p, g)], ("norm", 1.0))[2]
    assert sums.tolist() == [0.0, 0.0]
    if optimizer == "sgd":
        fast.sgd_update(p, g, None, 0.1, 0.0, 0.0, False, clip=("global", 1.0))
    else:
        fast.adam_update(p, g, [np.zeros_like(p[0])], [np.zeros_like(p[0])], 0.1, 1.0, 1.0,
                         0.0, False, 0.9, 0.999, 1e-7, clip=("norm", 1.0))
    assert all(0 not in grid for _, grid, _ in grids)
