"""The NumPy fast path (``fast_kernels``) gives the results of the standard (Array API) path."""

import platform
import threading
import tracemalloc

import array_api_compat.numpy as xpn
import array_api_strict as xs
import ml_dtypes
import numpy as np
import pytest
from kernel_cases import (
    EVERY_MAX_POOL,
    EVERY_OPTIMISER,
    OPTIMISERS,
    UPDATE_SHAPES,
    assert_same,
    check_add_relu,
    check_max_pool_of_nonfinite_gradients,
    gated_updates,
    step_with,
    two_dtype_updates,
)
from nets import every_layer_net, gap_net, plan_of

import xpcnn
from xpcnn import backend as backend_module
from xpcnn.backend import get_backend, set_fast_path
from xpcnn.layers import Conv2D, Dense, FeatureNorm, MaxPool2D, ReLU
from xpcnn.layers.base import Options
from xpcnn.models import build_layers
from xpcnn.ops import im2col as ops
from xpcnn.ops import pool as pool_ops
from xpcnn.ops import windows
from xpcnn.ops.fast_numpy import KERNELS as FAST
from xpcnn.ops.kernels import StandardKernels, compute_scope, fast_kernels, kernels_for
from xpcnn.ops.workspace import Workspace

STD = StandardKernels(xpn)
needs_settable_openblas = pytest.mark.skipif(
    FAST._blas.get is None, reason="this NumPy's BLAS is not an OpenBLAS whose thread count can "
    "be set")
needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                 reason="malloc tuning applies to glibc only")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one image, so that chunked loops really spread over threads."""
    monkeypatch.setattr(backend_module, "CPU_CHUNK_BYTES", 1)


@pytest.fixture
def no_fast_path():
    old = set_fast_path(False)
    yield
    set_fast_path(old)


def test_the_seam_on_cpu_backends(no_fast_path):
    assert fast_kernels(get_backend("cpu")) is None  # switched off
    set_fast_path(True)
    assert fast_kernels(get_backend("cpu")) is FAST
    assert fast_kernels(get_backend(xs)) is None
    assert isinstance(kernels_for(get_backend(xs)), StandardKernels)
    assert kernels_for(get_backend("cpu")) is FAST


@pytest.mark.parametrize("kernel, strides, shape", [
    ((3, 3), (1, 1), (3, 8, 7, 3)), ((3, 3), (1, 1), (2, 6, 6, 1)), ((2, 3), (2, 1), (2, 7, 6, 4)),
    ((3, 3), (2, 2), (2, 9, 9, 2)), ((1, 1), (1, 1), (2, 3, 3, 5)),
])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_im2col(kernel, strides, shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    out_hw = windows.output_size(shape[1:3], kernel, strides, (0, 0, 0, 0))
    cols = (shape[0], *out_hw, kernel[0] * kernel[1] * shape[3])
    want = STD.im2col_into(x, np.empty(cols, dtype), kernel, strides, out_hw)
    got = FAST.im2col_into(x, np.empty(cols, dtype), kernel, strides, out_hw)
    np.testing.assert_array_equal(got, want)
    # a non-contiguous input (a strided view) takes the standard route, same values
    wide = np.zeros((shape[0], shape[1], shape[2], shape[3] * 2), dtype)
    wide[..., ::2] = x
    got = FAST.im2col_into(wide[..., ::2], np.empty(cols, dtype), kernel, strides, out_hw)
    np.testing.assert_array_equal(got, want)
    # channels-last rows of a taller array (not one block): the fast route, same values
    tall = np.zeros((shape[0], shape[1] + 2, shape[2], shape[3]), dtype)
    tall[:, 1:-1] = x
    got = FAST.im2col_into(tall[:, 1:-1], np.empty(cols, dtype), kernel, strides, out_hw)
    np.testing.assert_array_equal(got, want)
    # into a wider output (a bias column, see bias_in_patches): the patch columns are written,
    # the last one is left alone, by both versions
    for kern in (FAST, STD):
        wider = np.full((*cols[:3], cols[3] + 1), 7.0, dtype)
        kern.im2col_into(x, wider, kernel, strides, out_hw)
        np.testing.assert_array_equal(wider[..., :-1], want)
        assert np.all(wider[..., -1] == 7.0)


@pytest.mark.parametrize("kernel, strides, shape", [
    ((3, 3), (1, 1), (3, 8, 7, 3)), ((2, 3), (2, 1), (2, 7, 6, 4)), ((1, 1), (1, 1), (2, 3, 3, 5)),
])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_im2col_plan_follows_its_buffers(kernel, strides, shape, dtype, rng):
    """A plan is made once for two buffers kept across calls: each call unfolds what the input
    buffer holds then (the fast plan's views are made once), with the patch column beyond them
    (a bias column) left as it is; as the standard plan does."""
    out_hw = windows.output_size(shape[1:3], kernel, strides, (0, 0, 0, 0))
    kk = kernel[0] * kernel[1] * shape[3]
    results = []
    for kern in (FAST, STD):
        x = np.zeros(shape, dtype)
        out = np.full((shape[0], *out_hw, kk + 1), 7.0, dtype)
        unfold = kern.im2col_plan(x, out, kernel, strides, out_hw)
        runs = []
        for seed in (1, 2):
            x[...] = np.random.default_rng(seed).standard_normal(shape)
            runs.append(np.array(unfold()))
        results.append(runs)
        want = STD.im2col_into(x, np.empty((shape[0], *out_hw, kk), dtype), kernel, strides,
                               out_hw)
        np.testing.assert_array_equal(runs[1][:, :kk], want.reshape(-1, kk))
        assert np.all(runs[1][:, kk] == 7.0)
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(results[0][0], results[0][1])  # (the second call read anew)


@pytest.mark.parametrize("rows", [0, 1, 2, 37])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_sum_rows_in_every_dtype(rows, dtype, rng):
    """A bias gradient's sum over rows: the fast product with ones (half floats summed in
    float32, as the standard version sums them) and its standard fallback (fewer than 2 rows)
    give the standard version's sums and dtype."""
    a = rng.standard_normal((rows, 5)).astype(dtype)
    got, want = FAST.sum_rows(a), STD.sum_rows(a)
    assert got.dtype == want.dtype == (np.float64 if dtype is np.float64 else np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sum_rows_keeps_one_vector_of_ones_per_dtype(rng):
    """The ones the fast sums multiply by are one vector per dtype, sliced: a cache per row
    count grew with every batch size a process met (a server, a search over batch sizes)."""
    from xpcnn.ops.fast_numpy import NumpyKernels
    kernels = NumpyKernels()
    for rows in [*range(2, 300), 1000, 3]:
        a = rng.standard_normal((rows, 3)).astype(np.float32)
        np.testing.assert_allclose(kernels.sum_rows(a), STD.sum_rows(a), rtol=1e-5, atol=1e-5)
    assert len(kernels._ones_cache) == 1
    assert len(kernels._ones_cache["<f4"]) == 1000


@pytest.mark.parametrize("m, k, n", [(7, 5, 3), (300, 200, 150), (512, 9, 32)])
def test_matmuls(m, k, n, rng):
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    at = np.ascontiguousarray(a.T)
    bt = np.ascontiguousarray(b.T)
    np.testing.assert_allclose(FAST.matmul(a, b), STD.matmul(a, b), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(FAST.matmul_tn(at, b), STD.matmul_tn(at, b), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(FAST.matmul_nt(a, bt), STD.matmul_nt(a, bt), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(FAST.sum_rows(a), STD.sum_rows(a), rtol=1e-5, atol=1e-4)
    bias = rng.standard_normal(n).astype(np.float32)
    for bb in (None, bias):
        want, got = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        STD.matmul_into(a, b, want, bb)
        FAST.matmul_into(a, b, got, bb)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


MAX_POOLS = [
    ((2, 2), (2, 2), (2, 6, 6, 3)), ((2, 2), (2, 2), (2, 7, 5, 2)),  # odd: last row/col unused
    ((3, 3), (2, 2), (2, 7, 7, 2)), ((2, 3), (1, 1), (1, 4, 5, 1)),  # overlapping windows
    ((1, 3), (1, 2), (2, 5, 7, 3)), ((3, 1), (2, 1), (2, 7, 4, 2)),
    ((2, 2), (3, 3), (2, 8, 8, 3)),  # gaps between windows
    ((3, 3), (3, 3), (2, 10, 8, 2)), ((1, 1), (1, 1), (2, 3, 3, 2)),
    ((16, 16), (16, 16), (2, 16, 17, 2)),  # 256 taps: indices wider than a byte
    ((2, 2), (2, 2), (64, 16, 16, 16)),  # last: threads
]


@pytest.mark.parametrize("pool, strides, shape", MAX_POOLS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_max_pool_with_ties(pool, strides, shape, dtype, rng):
    # integers in a small range (and ReLU-style zeros) make many tied maxima
    x = np.maximum(rng.integers(-2, 3, shape), 0).astype(dtype)
    out_hw = windows.output_size(shape[1:3], pool, strides, (0, 0, 0, 0))
    y = STD.max_pool(x, pool, strides, out_hw)
    np.testing.assert_array_equal(FAST.max_pool(x, pool, strides, out_hw), y)
    y_fast, routes = FAST.max_pool_train(x, pool, strides, out_hw)
    np.testing.assert_array_equal(y_fast, y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    want = STD.max_pool_backward(x, y, dy, pool, strides, out_hw)
    got = FAST.max_pool_backward(routes, y, dy, pool, strides, out_hw)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == dtype
    # every window's gradient went to exactly one place (float16: overlapping windows' sums
    # rounded)
    np.testing.assert_allclose(got.sum(dtype=np.float64), dy.sum(dtype=np.float64),
                               rtol=1e-2 if dtype == np.float16 else 1e-5)
    # With the gradient of the ReLU before the pool: by definition, the pool's input gradient
    # where that input is > 0. Both versions must give exactly that.
    relu_too = want * (x > 0)
    for kern, saved in ((STD, x), (FAST, routes)):
        got = kern.max_pool_backward(saved, y, dy, pool, strides, out_hw, relu_grad=True)
        np.testing.assert_array_equal(got, relu_too)


def test_max_pool_first_maximum_nan_and_strided_input(rng):
    """The gradient goes to each window's first maximum in row-major order, a window with a
    NaN sends none (as the standard version: NaN equals nothing), and an input that is not
    contiguous gives what its contiguous copy gives."""
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :2, :2, 0] = [[1, 5], [5, 0]]  # tie across rows: (0, 1) comes first
    x[0, 2:, 2:, 0] = [[2, np.nan], [3, 3]]
    y, routes = FAST.max_pool_train(x, (2, 2), (2, 2), (2, 2))
    dx = FAST.max_pool_backward(routes, y, np.ones_like(y), (2, 2), (2, 2), (2, 2))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 1, 1, 0], [0, 0, 0, 0],
                                                   [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(dx, STD.max_pool_backward(x, y, np.ones_like(y), (2, 2),
                                                            (2, 2), (2, 2)))
    wide = np.maximum(rng.integers(-2, 3, (3, 7, 9, 10)), 0).astype(np.float32)
    x = wide[:, 1:, ::-2, 2:7]  # every axis strided
    y, routes = FAST.max_pool_train(x, (2, 2), (2, 2), (3, 2))
    np.testing.assert_array_equal(y, STD.max_pool(x, (2, 2), (2, 2), (3, 2)))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(FAST.max_pool_backward(routes, y, dy, (2, 2), (2, 2), (3, 2)),
                                  STD.max_pool_backward(x, y, dy, (2, 2), (2, 2), (3, 2)))


@pytest.mark.parametrize("kernel, strides, shape, pads", EVERY_MAX_POOL)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_max_pool_routes_an_infinite_gradient_to_the_first_maximum_only(kernel, strides, shape,
                                                                        pads, dtype, rng):
    """Inf and NaN output gradients where PyTorch puts them (the window's first maximum), no
    NaN spread over the window (inf * 0): the standard version and the NumPy fast path."""
    check_max_pool_of_nonfinite_gradients([STD, FAST], rng, kernel, strides, shape, pads, dtype)


@pytest.mark.parametrize("pool, strides, padding", [
    (2, None, "valid"), (2, None, "same"), (3, 2, "same"), ((2, 3), 1, 1), (3, 1, "same"),
])
@pytest.mark.parametrize("relu_grad", [False, True])
def test_max_pool_layer_fast_equals_standard(pool, strides, padding, relu_grad, rng):
    """The layer (padding included) on both paths, with and without the input ReLU's
    gradient applied by the pool."""
    x = np.maximum(rng.integers(-2, 3, (3, 7, 6, 4)), 0).astype(np.float64)
    dy = None
    out = []
    for fast in (True, False):
        old = set_fast_path(fast)
        try:
            layer = MaxPool2D(pool, strides, padding)
            layer.build(x.shape[1:], "cpu", dtype="float64")
            options = Options(apply_input_relu_grad=relu_grad)
            y = layer.forward(x, training=True, options=options)
            dy = rng.standard_normal(y.shape) if dy is None else dy
            out.append((y, layer.backward(dy, options)))
        finally:
            set_fast_path(old)
    for got, want in zip(out[0], out[1], strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(out[0][1].sum(), (dy * (out[0][0] > 0) if relu_grad else dy).sum())


@pytest.mark.parametrize("shape", [(64, 80, 60), (8, 7, 5), (3,), ()],
                         ids=["threads", "odd-size", "vector", "scalar"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_relu_and_masks(rng, shape, dtype):
    """Every dtype a ReLU runs in (mixed precision's float16 and bfloat16 activations too), with
    ceilings that the half floats do not hold exactly (0.1) and of 0."""
    x = np.asarray(rng.standard_normal(shape) * 3, dtype=dtype)
    if x.size > 3:
        x.reshape(-1)[:3] = [np.nan, 2.0, 0.0]  # NaN and the edges stay as the standard has them
    for cap in (None, 2.0, 0.1, 0.0):
        assert_same(FAST.relu(x, cap), STD.relu(x, cap))
        for got, want in zip(FAST.relu_with_mask(x, cap), STD.relu_with_mask(x, cap),
                             strict=True):
            assert_same(got, want)
    mask = x > 0
    assert_same(FAST.mask_multiply(x, mask), STD.mask_multiply(x, mask))
    dy = np.asarray(rng.standard_normal(shape), dtype=dtype)
    y = STD.relu(x, None)
    assert_same(FAST.relu_backward(dy, y), STD.relu_backward(dy, y))
    # a dropout's gradient with the ReLU's before it (apply_input_relu_grad): a dropout mask
    # drawn apart from the ReLU's zeros (a mask equal to y > 0 would hide an ignored relu_y)
    keep = rng.random(shape) < 0.7
    want = np.where(keep & (y > 0), dy * dtype(1.5), dtype(0))
    for kern in (FAST, STD):
        assert_same(kern.mask_multiply(dy, keep, 1.5, y), want)


@pytest.mark.parametrize("shape", [(64, 80, 60), (8, 7, 5)], ids=["threads", "odd-size"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_add_relu_and_its_gradient(rng, shape, dtype):
    check_add_relu(FAST, STD, rng, shape, dtype)


@pytest.mark.parametrize("n, m", [(1, 1), (7, 2), (128, 3), (5, 10)])
def test_for_chunks_visits_every_chunk_once(n, m):
    seen = []
    FAST.for_chunks(n, m, lambda w, a, b: seen.append((a, b)))
    assert sorted(seen) == [(a, min(n, a + m)) for a in range(0, n, m)]


def test_products_inside_a_chunk_loop_are_not_split_again():
    """A large product is split over the threads, but not inside a chunk loop (whose threads
    are busy already), on any thread, and the mark does not outlive the loop."""
    big = 1 << 30
    split_inside = []
    FAST.for_chunks(6, 1, lambda w, a, b: split_inside.append(FAST._split_rows(1000, big)))
    assert split_inside == [1000] * 6
    assert FAST._split_rows(1000, big) == (1000 if FAST.threads() == 1
                                           else -(-1000 // FAST.threads()))


def test_for_chunks_runs_every_chunk_under_the_callers_floating_point_errors(monkeypatch):
    """NumPy's error state is per thread: the pool's threads take the caller's (in a training
    step, compute_scope's, which lets the overflow loss scaling looks for pass silently)."""
    monkeypatch.setattr(FAST, "threads", lambda: 2)
    seen = []
    both = threading.Barrier(2, timeout=30)  # (each thread's first chunk waits for the other's)

    def chunk(worker, a, b):
        if worker not in {w for w, _, _ in seen}:
            both.wait()
        seen.append((worker, np.geterr()["over"], np.geterr()["invalid"]))

    with np.errstate(over="ignore", invalid="raise"):
        FAST.for_chunks(8, 1, chunk)
    assert {w for w, _, _ in seen} == {0, 1}
    assert {(over, invalid) for _, over, invalid in seen} == {("ignore", "raise")}


def test_for_chunks_propagates_errors_and_restores_blas_threads():
    before = FAST.threads()

    def boom(worker, a, b):
        if a == 4:
            raise ValueError("chunk 4")

    with pytest.raises(ValueError, match="chunk 4"):
        FAST.for_chunks(8, 1, boom)
    assert FAST.threads() == before


@needs_settable_openblas
def test_compute_scope_holds_openblas_to_one_thread_and_restores_it():
    before = FAST._blas.get()
    cpu = get_backend("cpu")
    with pytest.raises(RuntimeError, match="inside"), compute_scope(cpu):
        assert FAST._blas.get() == 1
        assert FAST.threads() == max(1, min(before, FAST._cores))  # loops still use all
        with compute_scope(cpu):  # re-entrant
            assert FAST._blas.get() == 1
        assert FAST._blas.get() == 1
        raise RuntimeError("inside")
    assert FAST._blas.get() == before


@needs_settable_openblas
def test_training_and_prediction_run_with_openblas_pinned(rng):
    """OpenBLAS's idle workers spin for a while after each threaded call and take cores from
    xpcnn's threads: every layer call of a step or a prediction must see one BLAS thread."""
    before = FAST._blas.get()
    model = xpcnn.Sequential(build_layers("shapes", 3))
    model.build((32, 32, 1))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    seen = []

    def probed(f):
        def probe(*a, **k):
            seen.append(FAST._blas.get())
            return f(*a, **k)
        return probe

    for layer in model.layers:
        layer.forward, layer.backward = probed(layer.forward), probed(layer.backward)
    x = rng.random((6, 32, 32, 1)).astype(np.float32)
    y = np.arange(6) % 3
    model.fit(x, y, epochs=1, batch_size=3, verbose=0)
    model.train_step(model.backend.asarray(x), model.backend.asarray(y))
    model.predict(x)
    model.evaluate(x, y)
    assert seen and set(seen) == {1}
    assert FAST._blas.get() == before


@needs_glibc
def test_a_repeated_prediction_reuses_heap_memory(rng):
    """On glibc the fast path keeps freed batch-sized arrays in malloc's heap: once warm, an
    identical prediction must not page-fault its intermediates in afresh (each of this net's
    conv and ReLU outputs is ~16 MiB; glibc's defaults cost ~1,500 faults a prediction)."""
    import resource

    model = xpcnn.Sequential([Conv2D(32, 3, padding="same"), ReLU(), Conv2D(32, 3), ReLU(),
                              MaxPool2D(2), xpcnn.layers.Flatten(), Dense(3)])
    model.build((32, 32, 3))
    x = rng.random((128, 32, 32, 3)).astype(np.float32)
    for _ in range(2):
        model.predict(x, batch_size=128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.predict(x, batch_size=128)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 200, f"{faults} page faults in a repeated prediction"


CONV_CASES = [
    dict(filters=4, kernel_size=3, padding="same"),
    dict(filters=3, kernel_size=3),
    dict(filters=3, kernel_size=3, strides=2, padding="same"),
    dict(filters=2, kernel_size=(2, 3), strides=(2, 1), padding=1),
    dict(filters=5, kernel_size=1),
]


@pytest.mark.parametrize("kwargs", CONV_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv2d_layer_fast_equals_standard(kwargs, dtype, small_chunks, rng):
    x = rng.standard_normal((6, 9, 8, 3)).astype(dtype)
    dy = None
    results = []
    for fast in (True, False):
        old = set_fast_path(fast)
        try:
            layer = Conv2D(**kwargs)
            layer.build((9, 8, 3), "cpu", dtype=dtype, rng=np.random.default_rng(0))
            y = layer.forward(x, training=True)
            dy = rng.standard_normal(y.shape).astype(dtype) if dy is None else dy
            dx = layer.backward(dy)
            results.append((y, dx, layer.grads["kernel"], layer.grads["bias"]))
        finally:
            set_fast_path(old)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for got, want in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("half, tol", [("float16", 4e-3), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("kwargs", [CONV_CASES[0], CONV_CASES[2]])
def test_mixed_precision_conv_and_dense_fast_equal_standard(kwargs, half, tol, small_chunks,
                                                            rng):
    """Half-precision compute: the fast path multiplies float16 (or ml_dtypes' bfloat16)
    inputs in float32 (NumPy has no half BLAS) and rounds once; NumPy's own float16 matmul, the
    standard path, also accumulates in float32 (bfloat16's gives float32, rounded after).
    Both must agree to the dtype's rounding, every output and gradient in it (a strided
    convolution's input gradient too)."""
    half = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(half)
    x = rng.standard_normal((6, 9, 8, 3)).astype(half)
    results = []
    for fast in (True, False):
        old = set_fast_path(fast)
        try:
            conv, dense = Conv2D(**kwargs), Dense(5)
            shape = conv.build((9, 8, 3), "cpu", dtype="float32", compute_dtype=half.name,
                               rng=np.random.default_rng(0))
            dense.build((int(np.prod(shape)),), "cpu", dtype="float32", compute_dtype=half.name,
                        rng=np.random.default_rng(1))
            y = conv.forward(x, training=True)
            z = dense.forward(np.reshape(y, (6, -1)), training=True)
            dy = np.reshape(dense.backward(np.ones_like(z)), y.shape)
            dx = conv.backward(dy)
            assert y.dtype == z.dtype == dx.dtype == half
            results.append((y, z, dx, conv.grads["kernel"], conv.grads["bias"],
                            dense.grads["kernel"], dense.grads["bias"]))
        finally:
            set_fast_path(old)
    for got, want in zip(results[0], results[1], strict=True):
        scale = float(np.max(np.abs(np.asarray(want, np.float64))))
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                   rtol=0, atol=tol * scale)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("chunk_bytes", [1, None])  # chunks of 1 image; of 3 (20 = 6*3 + 2)
@pytest.mark.parametrize("kwargs, channels", [
    (dict(filters=4, kernel_size=3, padding="same"), 3),  # padded; grads from dy's patches
    (dict(filters=3, kernel_size=3, padding="same", activation="relu"), 5),
    (dict(filters=6, kernel_size=5, use_bias=False), 1),  # unpadded: cast into a buffer
    (dict(filters=3, kernel_size=3, strides=2, padding="same"), 2),  # strided
    (dict(filters=2, kernel_size=(2, 3), strides=(2, 1), padding=1), 4),
    (dict(filters=3, kernel_size=(2, 4), padding="same"), 4),  # padded unevenly
    (dict(filters=3, kernel_size=1, strides=2), 3),
    (dict(filters=5, kernel_size=1), 3),  # a ones column for the bias: patches
    (dict(filters=5, kernel_size=1, use_bias=False), 3),  # the product reads the input
])
def test_mixed_precision_conv_unfolds_into_float32_with_the_same_bits(
        kwargs, channels, chunk_bytes, half, monkeypatch, rng):
    """NumPy has no half BLAS: the products of a half-float convolution run in float32. Its
    input is cast once per chunk, as it is copied into the (padded) buffer, and unfolded into
    float32 patches (half-float patches were cast to float32 for each product: kh*kw times
    every input). Output, input and kernel gradients keep every bit of half-float patches
    (each chunk's kernel-gradient part rounded to the half float before the float32 sum)."""
    half = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(half)
    if chunk_bytes is not None:
        monkeypatch.setattr(backend_module, "CPU_CHUNK_BYTES", chunk_bytes)
    x = (rng.standard_normal((20, 9, 8, channels)) * 2).astype(half)
    expected = {np.dtype(np.float32)}
    if kwargs["kernel_size"] == 1 and "strides" not in kwargs:
        # 1x1, stride 1: the products read the input and output gradient themselves (and
        # cast each element once), but for the patches a bias's ones column makes
        expected = {half, np.dtype(np.float32)} if kwargs.get("use_bias", True) else {half}
    elif kwargs["kernel_size"] == 1:  # the input gradient by stride phases: its 1x1 tap reads dy
        expected = {half, np.dtype(np.float32)}

    def run():
        conv = Conv2D(**kwargs)
        conv.build((9, 8, channels), "cpu", dtype="float32", compute_dtype=half.name,
                   rng=np.random.default_rng(0))
        y = conv.forward(x, training=True)
        dx = conv.backward(np.random.default_rng(1).standard_normal(y.shape).astype(half))
        assert y.dtype == dx.dtype == half
        return [y, dx, *conv.grads.values()]

    seen = []  # the dtype of each product's patches

    def spy(method):
        def product(a, *rest, **kw):
            seen.append(a.dtype)
            return method(a, *rest, **kw)
        return product

    for name in ("matmul_into", "matmul_tn"):
        monkeypatch.setattr(FAST, name, spy(getattr(FAST, name)), raising=False)
    got = run()
    assert set(seen) == expected
    monkeypatch.setattr(FAST, "patch_dtype", lambda dtype: dtype)  # half-float patches
    want = run()
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


HALF_FLOATS = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _every_half_float(dtype):
    """All 2**16 values of a 2-byte float dtype (NaNs of each sign and payload, +-inf, +-0,
    subnormals), as a (256, 16, 16) array."""
    return np.arange(1 << 16, dtype=np.uint16).view(dtype).reshape(256, 16, 16)


def _same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _half_cases(dtype, rng, wrap=lambda a: a):
    """(name, fast call, NumPy's own 2-byte float arithmetic as the fast path made it before)
    for the mixed precision elementwise and pooling kernels on every value of ``dtype``
    (the fast calls' inputs passed through ``wrap``)."""
    v = wrap(_every_half_float(dtype))
    zeros, six = np.zeros_like(v), np.full(v.shape, 6.0, dtype)
    relu = np.maximum(v, zeros)
    y = v[::-1].copy()  # (a ReLU's output: every value too, in another order)
    keep = rng.random(v.shape) >= 0.3
    scale = dtype.type(1 / 0.7)
    dropped = np.multiply(v, keep)
    dropped *= scale
    cases = [
        ("relu", lambda: FAST.relu(v, None), lambda: relu),
        ("relu6", lambda: FAST.relu(v, 6.0), lambda: np.minimum(relu, six)),
        ("relu mask", lambda: FAST.relu_with_mask(v, None)[1], lambda: v > 0),
        ("relu6 mask", lambda: FAST.relu_with_mask(v, 6.0)[1],
         lambda: np.logical_and(v > 0, v < dtype.type(6.0))),
        ("relu backward", lambda: FAST.relu_backward(v, y), lambda: np.multiply(v, y > 0)),
        ("dropout", lambda: FAST.mask_multiply(v, keep, 1 / 0.7), lambda: dropped),
        ("dropout after relu", lambda: FAST.mask_multiply(v, keep, 1 / 0.7, y),
         lambda: np.multiply(dropped, y > 0)),
        ("mask", lambda: FAST.mask_multiply(v, keep), lambda: np.multiply(v, keep)),
    ]
    # pools (bfloat16: ml_dtypes' maximum keeps the second of equals, see max_pool_train)
    x = wrap(rng.integers(0, 1 << 16, (6, 9, 9, 5)).astype(np.uint16).view(dtype))
    x[0, :4, :4] = 0  # ties, of +0.0 and -0.0 too
    x[0, 1::2, ::3] = -0.0
    x[1, :3, :3] = 1.5
    x[2, 2:5, 2:5] = np.inf
    x[3, :, :, 0] = 6e-8  # (a subnormal)
    for kernel, strides in (((2, 2), (2, 2)), ((3, 3), (2, 2)), ((3, 3), (1, 1))):
        hw = ((9 - kernel[0]) // strides[0] + 1,) * 2
        want = pool_ops.max_pool(xpn, x, kernel, strides, hw)
        dy = rng.standard_normal(want.shape).astype(dtype)
        cases += [
            (f"max pool {kernel}", lambda k=kernel, s=strides, hw=hw: FAST.max_pool_train(
                x, k, s, hw)[0], lambda w=want: w),
            (f"max pool inference {kernel}", lambda k=kernel, s=strides, hw=hw:
             FAST.max_pool(x, k, s, hw), lambda w=want: w),
            (f"max pool backward {kernel}", lambda k=kernel, s=strides, hw=hw, dy=dy:
             FAST.max_pool_backward(FAST.max_pool_train(x, k, s, hw)[1], FAST.max_pool(
                 x, k, s, hw), dy, k, s, hw, relu_grad=True),
             lambda k=kernel, s=strides, hw=hw, w=want, dy=dy: pool_ops.max_pool_backward(
                 xpn, x, w, np.multiply(dy, w > 0), k, s, hw)),
        ]
    return cases


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (inf * 0 and the like, in the wants)
@pytest.mark.parametrize("dtype", HALF_FLOATS)
def test_half_float_kernels_give_numpys_own_bits(dtype, rng):
    """Under mixed precision the fast path's ReLU (forward, mask, backward), Dropout and max
    pooling work on the bits (tables computed by NumPy itself, int16 keys for the pools):
    NumPy's float16 (ml_dtypes' bfloat16) arithmetic's bits for every value, NaN (either
    sign), +-inf, -0.0, subnormals and ties included."""
    for name, fast, want in _half_cases(dtype, rng):
        got, expected = fast(), want()
        if expected.dtype == bool:
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            _same_bits(got, expected.astype(got.dtype))


class _HalfFloatLoops:
    """NumPy whose ufuncs note each call that reads a 2-byte float array: NumPy's float16
    loops (and ml_dtypes' bfloat16 ones) convert every element, 13-43x float32's time."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._wrapped: dict[str, object] = {}

    def __getattr__(self, name):
        f = getattr(np, name)
        if not isinstance(f, np.ufunc):
            return f
        if name not in self._wrapped:  # (one wrapper a ufunc: ``fn is np.maximum`` holds)
            calls = self.calls

            def note(args, method=""):
                if any(isinstance(a, np.ndarray) and _half_float_dtype(a.dtype) for a in args):
                    calls.append(name + method)

            class Watched:
                __name__ = name

                def __call__(self, *args, **kwargs):
                    note(args)
                    return f(*args, **kwargs)

                def __getattr__(self, attr):
                    method = getattr(f, attr)
                    return lambda *args, **kwargs: (note(args, "." + attr),
                                                    method(*args, **kwargs))[1]

            self._wrapped[name] = Watched()
        return self._wrapped[name]


def _half_float_dtype(dtype):
    return dtype.itemsize == 2 and dtype.kind in "fV"


class _HalfFloatOperands(np.ndarray):
    """An array noting each ufunc that reads or writes a 2-byte float array through it, by
    operator or method too (``a > 0``, ``a *= f``), which a watch of the module's ``np.*``
    calls misses; its views and slices are watched as well."""

    calls: list[str] = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(a):
            return a.view(np.ndarray) if isinstance(a, _HalfFloatOperands) else a

        args = [plain(a) for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(plain(o) for o in kwargs["out"])
        if any(isinstance(a, np.ndarray) and _half_float_dtype(a.dtype)
               for a in (*args, *kwargs.get("out", ()))):
            _HalfFloatOperands.calls.append(ufunc.__name__)
        return getattr(ufunc, method)(*args, **kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", HALF_FLOATS)
def test_half_float_kernels_skip_numpys_half_float_loops(dtype, monkeypatch, rng):
    """Mixed precision's ReLU, Dropout and (float16) max pooling never run NumPy's 2-byte
    float loops (after the first call, which fills the tables): they were 13-43x their
    float32 time (the mnist model's mixed_float16 step: 2.7x its float32 step's)."""
    from xpcnn.ops import fast_numpy

    cases = _half_cases(dtype, rng)
    for _, fast, _ in cases:
        fast()  # (the tables, computed once by NumPy's own loops)
    watched = _HalfFloatLoops()
    monkeypatch.setattr(fast_numpy, "np", watched)
    for name, fast, _ in cases:
        del watched.calls[:]
        fast()
        assert watched.calls == [], name
    monkeypatch.undo()  # (and by operators on the inputs: a > 0, a * f)
    for name, fast, _ in _half_cases(dtype, rng, wrap=lambda a: a.view(_HalfFloatOperands)):
        del _HalfFloatOperands.calls[:]
        fast()
        assert _HalfFloatOperands.calls == [], name


def _float32_edge_bits(rng):
    """float32 bit patterns of every class a float16 cast meets: each top half-word (every
    exponent and sign, NaN and inf included) with low bits at each rounding position (ties,
    one off them), every float16 value, the midpoints between neighbours and one float32
    ulp either side, and two million random patterns."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = {0, 0xFFFF}
    for k in range(16):
        lows |= {1 << k, (1 << k) - 1, (1 << k) + 1, 3 << k}
    edges = (top[:, None] | np.array(sorted(lows), np.uint32)[None, :]).reshape(-1)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32).view(np.uint32)
    near = np.concatenate([mids - 1, mids, mids + 1, halves.astype(np.float32).view(np.uint32)])
    return np.concatenate([edges, near, rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint32)])


@pytest.mark.parametrize("offset", [0, 1])
def test_float16_casts_give_numpys_own_bits(offset, rng):
    """Mixed float16's casts of products to float16 (bit arithmetic in blocks) and of
    float16 inputs to float32 (a table) give NumPy's cast's bits for every input class:
    ties to even, subnormals, overflow to inf, NaN (payloads), -0.0; a strided destination
    too. NumPy's own casts branch on zeros and subnormals (5-60x slower there)."""
    from xpcnn.ops.fast_numpy import half_from_single, single_from_half

    x = _float32_edge_bits(rng)[offset:].view(np.float32)
    got = np.empty(x.shape, np.float16)
    half_from_single(x, got)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16)
    _same_bits(got, want)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)[offset:]
    back = np.empty(halves.shape, np.float32)
    single_from_half(halves, back)
    _same_bits(back, halves.astype(np.float32))
    chunk = rng.standard_normal((4, 30, 30, 8)).astype(np.float16)
    padded = np.zeros((4, 32, 32, 8), np.float32)
    FAST.copy_into(padded[:, 1:31, 1:31, :], chunk)  # (a convolution's padded buffer)
    _same_bits(padded[:, 1:31, 1:31, :], chunk.astype(np.float32))
    assert not padded[:, 0].any() and not padded[:, :, 31].any()


def test_the_float16_cast_takes_numpys_bits_into_an_out_sharing_xs_memory(rng):
    """An ``out`` over ``x``'s own bytes (the first half of them) gets NumPy's bits, a NaN in
    a later block included (was: the NaN pass read x after the blocks had overwritten it)."""
    from xpcnn.ops.fast_numpy import half_from_single

    x = rng.standard_normal(100_000).astype(np.float32)
    x[[5, 70_000]] = np.nan
    with np.errstate(all="ignore"):
        want = x.astype(np.float16)
    alias = x.view(np.float16)[:x.size]
    half_from_single(x, alias)
    _same_bits(alias, want)


def test_the_float16_cast_holds_no_mask_of_the_whole_array(rng):
    """The NaN check is a block's largest |x| bits, in cache: no n-byte np.isnan(x) beside
    the arrays (22-43% of the cast's gain in a mixed-precision step), NaN payloads still
    NumPy's."""
    from xpcnn.ops.fast_numpy import _CAST_BLOCK, half_from_single

    x = rng.standard_normal(1 << 22).astype(np.float32)  # (4 MiB of float32; a mask: 4 MiB)
    x[[3, 1 << 21]] = np.array([0x7F800001, 0xFFC00123], np.uint32).view(np.float32)
    out = np.empty(x.shape, np.float16)
    tracemalloc.start()
    try:
        half_from_single(x, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 4 * _CAST_BLOCK, peak  # (3 blocks of scratch, the NaN blocks' few)
    with np.errstate(all="ignore"):
        _same_bits(out, x.astype(np.float16))


@pytest.mark.parametrize("trainable", [True, False])
def test_mixed_float16_conv_backward_reuses_the_kernel_cast_in_forward(trainable, rng):
    """Under mixed precision the float16 kernel is a copy of the float32 one: backward
    (frozen too: the input gradient alone) hands the engine the copy forward made, and lets
    it go."""
    conv = Conv2D(4, 3, padding="same")
    conv.build((6, 5, 3), "cpu", dtype="float32", compute_dtype="float16", rng=rng)
    conv.trainable = trainable
    engine, kernels = conv._engine(), []

    class KernelSpy:  # the engine, noting each kernel it is given
        def forward(self, x, kernel, *rest):
            kernels.append(kernel)
            return engine.forward(x, kernel, *rest)

        def gradients(self, x, dy, kernel, *rest):
            kernels.append(kernel)
            return engine.gradients(x, dy, kernel, *rest)

        def input_grad(self, dy, kernel):
            kernels.append(kernel)
            return engine.input_grad(dy, kernel)

    conv._cache_engine = KernelSpy()
    y = conv.forward(rng.standard_normal((2, 6, 5, 3)).astype(np.float16), training=True)
    dx = conv.backward(np.ones_like(y))
    assert dx.dtype == np.float16 and len(kernels) == 2
    assert kernels[0].dtype == np.float16 and kernels[0] is not conv.params["kernel"]
    assert kernels[1] is kernels[0]
    assert conv._cache_kernel is None


@pytest.mark.parametrize("fast", [True, False])
def test_fused_relu_equals_a_relu_layer(fast, small_chunks, rng):
    """Conv2D and Dense with activation="relu", and the model's plan that fuses the ReLU()
    layers after them, give exactly what the layers give run one by one as written, on the
    fast path and on the standard one."""
    x = rng.standard_normal((5, 7, 6, 3))
    old = set_fast_path(fast)
    try:
        results, weights = [], None
        for how in ("activation", "layers", "plan"):
            act = {"activation": "relu"} if how == "activation" else {}
            def relu():
                return [] if how == "activation" else [ReLU()]  # noqa: B023

            layers = [Conv2D(4, 3, padding="same", **act), *relu(), xpcnn.layers.Flatten(),
                      Dense(6, **act), *relu()]
            model = xpcnn.Sequential(layers, input_shape=(7, 6, 3), seed=3, dtype="float64")
            model.compile(loss="cross_entropy", optimizer="sgd")
            weights = model.get_weights() if weights is None else weights
            model.set_weights(weights)
            y = model.backend.asarray(x)
            if how == "plan":
                ran, fused, _ = plan_of(model)
                assert ran == ["conv2d", "flatten", "dense"] and fused == ["conv2d", "dense"]
                y = model._logits(y, training=True)
                model._backward(np.cos(y))
            else:  # each layer on its own, as written
                for layer in model.layers:
                    y = layer.forward(y, training=True)
                dz = np.cos(y)
                for layer in reversed(model.layers):
                    dz = layer.backward(dz)
            grads = [g for la in model.layers for g in la.grads.values()]
            results.append((y, *grads))
    finally:
        set_fast_path(old)
    assert float(np.min(results[0][0])) == 0.0  # some outputs were cut
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, want)


def test_activation_names_are_checked():
    for make, names in ((lambda a: Conv2D(2, 3, activation=a), "None or 'relu'"),
                        (lambda a: Dense(2, activation=a), "None or 'relu' or 'softmax'")):
        with pytest.raises(xpcnn.errors.InputError, match=f"activation must be {names}, got "
                           r"'tanh' \(use a ReLU layer for a ceiling"):
            make("tanh")
        assert make("ReLU").activation == "relu" and make(None).activation is None
    assert Dense(2, activation="Softmax").activation == "softmax"


def test_pool_relu_dense_layers_fast_equals_standard(rng):
    x = np.maximum(rng.integers(-2, 3, (4, 6, 6, 3)), 0).astype(np.float32)
    for layer, shape, inp in [(MaxPool2D(2), (6, 6, 3), x), (ReLU(1.5), (6, 6, 3), x - 0.5),
                              (Dense(7), (300,), rng.standard_normal((64, 300)))]:
        out = []
        for fast in (True, False):
            old = set_fast_path(fast)
            try:
                layer.build(shape, "cpu", rng=np.random.default_rng(0))
                y = layer.forward(np.asarray(inp, np.float32), training=True)
                dx = layer.backward(np.ones_like(y))
                out.append((y, dx, *layer.grads.values()))
            finally:
                set_fast_path(old)
        for got, want in zip(out[0], out[1], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (64, 12, 10, 8)])  # the second on threads
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("relu_grad", [False, True])
def test_feature_norm_fast_equals_standard(shape, dtype, relu_grad, rng):
    """Both versions, and with an input ReLU's gradient applied (``apply_input_relu_grad``),
    equal to the gradient times ``input > 0``."""
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    if relu_grad:
        x = np.maximum(x, 0)  # a ReLU's output: zeros where its gradient stops
    dy = rng.standard_normal(shape).astype(dtype)
    out = []
    for fast in (True, False):
        old = set_fast_path(fast)
        try:
            layer = FeatureNorm()
            layer.build(shape[1:], "cpu", dtype=dtype)
            options = Options(apply_input_relu_grad=relu_grad)
            y = layer.forward(x, training=True, options=options)
            out.append((y, layer.backward(dy, options)))
            if relu_grad:
                layer.forward(x, training=True)
                np.testing.assert_array_equal(out[-1][1], layer.backward(dy) * (x > 0))
        finally:
            set_fast_path(old)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for got, want in zip(out[0], out[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (64, 12, 10, 8)])
def test_feature_norm_kernels_under_mixed_precision(shape, rng):
    """A float16 input computed in float32 (the fast path casting as it reads): the standard
    version's statistics (float32, N x C, for backward, which recomputes xhat from them and the
    input), its float16 output and input gradient, that gradient only where the input is > 0
    with the ReLU's."""
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float16)
    x[0, 0, 0, 0] = 0
    dy = rng.standard_normal(shape).astype(np.float16)
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    got, want = (k.feature_norm(x, 1e-5, f32, f16) for k in (FAST, STD))
    for g, w, t in zip(got, want, (f16, f32, f32), strict=True):
        assert g.dtype == w.dtype == t and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-3 if t == f16 else 1e-5, atol=1e-3)
    assert got[1].shape == (shape[0], 1, 1, shape[-1])
    for relu in (False, True):
        g, w = (k.feature_norm_backward(dy, x, *stats[1:], relu)
                for k, stats in ((FAST, got), (STD, want)))
        assert g.dtype == w.dtype == f16
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=2e-3)
        if relu:
            assert (g[x <= 0] == 0).all()
            np.testing.assert_array_equal(g, FAST.feature_norm_backward(dy, x, *got[1:], False)
                                          * (x > 0))



def test_feature_norm_under_mixed_precision_casts_a_block_at_a_time(rng):
    """A float16 batch far larger than a block (2 MB of float32 a block): forward and backward
    each hold a few float32 blocks per thread, never a whole float32 copy of the batch."""
    x = rng.standard_normal((1024, 16, 16, 32), dtype=np.float32).astype(np.float16)
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(np.float16)
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    whole = x.size * f32.itemsize  # 32 MiB
    bound = FAST.threads() * 4 * (2 << 20) + (1 << 20)
    assert bound < whole  # (else this test could not tell the two apart)
    tracemalloc.start()
    try:
        y, mean, inv_std = FAST.feature_norm(x, 1e-5, f32, f16)
        forward = tracemalloc.get_traced_memory()[1] - y.nbytes - mean.nbytes - inv_std.nbytes
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        dx = FAST.feature_norm_backward(dy, x, mean, inv_std, True)
        backward = tracemalloc.get_traced_memory()[1] - held - dx.nbytes
    finally:
        tracemalloc.stop()
    assert y.dtype == dx.dtype == f16
    assert forward < bound and backward < bound, (forward, backward, bound)


@pytest.mark.parametrize("positions, channels", [(729, 3), (729, 8), (225, 4), (784, 3),
                                                 (13, 3), (12, 64), (0, 3), (49, 300)])
def test_feature_norm_rows_widen_by_any_divisor(positions, channels):
    """Positions fold into rows of 256 values or more by any divisor of H*W, not only by
    powers of two (27 x 27 had rows of C values: 7.5x slower than 28 x 28); all of them
    where no divisor gives 256 (a 1 x 13 image)."""
    from xpcnn.ops.fast_numpy import NumpyKernels
    k = NumpyKernels._widen(positions, channels)
    assert positions % k == 0 if positions else k == 1
    if positions and k < positions:
        assert k * channels >= 256
        assert all(d * channels < 256 for d in range(1, k) if positions % d == 0)


@pytest.mark.parametrize("shape", [(5, 27, 27, 3), (4, 15, 15, 8), (3, 1, 13, 3)])
@pytest.mark.parametrize("relu", [False, True])
def test_feature_norm_odd_image_sizes_fast_equals_standard(shape, relu, rng):
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    f32 = np.dtype(np.float32)
    got, want = (k.feature_norm(x, 1e-5, f32, f32) for k in (FAST, STD))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(FAST.feature_norm_backward(dy, x, *want[1:], relu),
                               STD.feature_norm_backward(dy, x, *want[1:], relu),
                               rtol=1e-4, atol=1e-5)


BATCH_NORM_CASES = [  # (shape, input dtype, parameters' dtype)
    ((64, 28, 28, 3), np.float32, np.float32), ((4, 27, 27, 8), np.float32, np.float32),
    ((3, 5, 7, 2), np.float64, np.float64), ((17, 10), np.float32, np.float32),
    ((2, 3), np.float64, np.float64), ((64, 8, 8, 64), np.float32, np.float32),
    ((6, 9, 9, 5), np.float16, np.float32), ((6, 9, 9, 5), ml_dtypes.bfloat16, np.float32),
]


@pytest.mark.parametrize("shape, dtype, param_dtype", BATCH_NORM_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_kernels_fast_equal_standard(shape, dtype, param_dtype, relu, rng):
    """The fast per-channel sums (products with ones over widened rows): the standard
    version's outputs, statistics, running statistics, gradients and dtypes (float32
    statistics under mixed precision), with and without the fused ReLU. Backward gets the
    standard statistics in both: a mean a few ulps off flips a ReLU's mask where z is ~0."""
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = (rng.standard_normal(c).astype(param_dtype) for _ in range(2))
    out = []
    for kernels in (FAST, STD):
        moving = np.zeros(c, param_dtype), np.ones(c, param_dtype)
        y, mean, inv_std = kernels.batch_norm_train(x, gamma, beta, *moving, 0.1, 1e-5, dtype,
                                                    relu)
        out.append([y, mean, inv_std, *moving])
    stats = out[1][1:3]
    for kernels, o in zip((FAST, STD), out, strict=True):
        o.extend(kernels.batch_norm_backward(dy, x, *stats, gamma, beta, relu, True))
        none, *params = kernels.batch_norm_backward(dy, x, *stats, gamma, beta, relu, False)
        assert none is None
        o.extend(params)
    tol = {np.float64: 1e-10, np.float32: 1e-4}.get(dtype, 2e-2)
    for got, want in zip(*out, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol,
                                   atol=tol)


@pytest.mark.parametrize("shape, dtype, param_dtype", BATCH_NORM_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_inference_fast_is_the_standard_version_bit_for_bit(shape, dtype, param_dtype,
                                                                       relu, rng):
    """With the running statistics (inference, a frozen layer): the same passes in the same
    order over widened rows, so the same bits, in the input's dtype or float32 out."""
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    gamma, beta, mean = (rng.standard_normal(c).astype(param_dtype) for _ in range(3))
    var = rng.uniform(0.5, 2.0, c).astype(param_dtype)
    for out_dtype in (np.dtype(dtype), np.dtype(param_dtype)):
        got, want = (k.batch_norm_running(x, gamma, beta, mean, var, 1e-3, out_dtype, relu)
                     for k in (FAST, STD))
        assert got.dtype == want.dtype == out_dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape, dtype, param_dtype", BATCH_NORM_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_inference_backward_fast_is_the_standard_version_bit_for_bit(
        shape, dtype, param_dtype, relu, rng, monkeypatch):
    """A frozen layer's input gradient: the same operations in the same order over widened
    rows in blocks, the ReLU's mask from z as forward computes it, so the same bits, in the
    input's dtype (from a gradient in it, or in the parameters' dtype); not the standard
    version's passes over the whole batch (1.55x a trainable layer's step at 28x28x3)."""
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    gamma, beta, mean = (rng.standard_normal(c).astype(param_dtype) for _ in range(3))
    var = rng.uniform(0.5, 2.0, c).astype(param_dtype)
    for dy_dtype in (np.dtype(dtype), np.dtype(param_dtype)):
        dy = rng.standard_normal(shape).astype(dy_dtype)
        want = STD.batch_norm_running_backward(dy, x, gamma, beta, mean, var, 1e-3, relu)
        # (the fast path's own, never its parent's)
        monkeypatch.setattr(StandardKernels, "batch_norm_running_backward", None)
        got = FAST.batch_norm_running_backward(dy, x, gamma, beta, mean, var, 1e-3, relu)
        monkeypatch.undo()
        assert got.dtype == want.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_batch_norm_fast_statistics_are_accurate(rng):
    """float32 statistics of 131,072 values a channel far from 0: the fast path's blocks of
    sums added in float64 come within 1e-6 of the float64 ones (a running float32 sum over
    the outer axes, NumPy's reduction there, is ~1e-5 off)."""
    x = (rng.standard_normal((128, 32, 32, 4)) + 100).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    _, mean, inv_std = FAST.batch_norm_train(x, ones, zeros, zeros.copy(), ones.copy(), 0.1,
                                             1e-5, np.float32, False)
    x64 = x.astype(np.float64).reshape(-1, 4)
    var = 1 / inv_std.astype(np.float64) ** 2 - 1e-5
    assert mean.dtype == inv_std.dtype == np.float32
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(128, 8, 8, 64), (3, 7, 5, 2), (2, 1, 1, 4)])
def test_global_avg_pool_fast_is_a_product_with_ones(dtype, shape, monkeypatch, rng):
    """The fast path's own GlobalAvgPool2D forward (sums as products with ones; NumPy's sum
    over the middle axes was 2.8x PyTorch's time): the standard version's means, in x's
    dtype, summed in float32 (float64 for float64) too."""
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    want = STD.global_avg_pool(x)
    monkeypatch.setattr(StandardKernels, "global_avg_pool", None)  # (never its parent's)
    got = FAST.global_avg_pool(x)
    monkeypatch.undo()
    assert got.dtype == want.dtype == np.dtype(dtype) and got.shape == want.shape
    tol = {np.float64: 1e-12, np.float32: 1e-6}.get(dtype, 1e-2)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol,
                               atol=tol)


class _CountingNumpy:
    """NumPy, with the elements its elementwise ufuncs write counted (``passes`` over an
    array of ``size`` elements); matmul (the sums as products with ones) not counted."""

    def __init__(self, size: int) -> None:
        self.size, self.elements = size, 0

    @property
    def passes(self) -> float:
        return self.elements / self.size

    def __getattr__(self, name):
        f = getattr(np, name)
        if not isinstance(f, np.ufunc) or name == "matmul":
            return f

        def counted(*args, **kwargs):
            result = f(*args, **kwargs)
            self.elements += np.size(result)
            return result

        return counted


@pytest.mark.parametrize("relu, from_y, offset, most", [
    (False, False, 0.0, 5), (True, True, 0.0, 7), (True, False, 0.0, 11),
    (False, False, 50.0, 6), (True, True, 50.0, 9)])  # (x - mean: as many as before)
def test_batch_norm_backward_makes_the_passes_its_math_needs(relu, from_y, offset, most,
                                                            monkeypatch, rng):
    """Training backward sums dm and dm * x and makes dx = s * dm - c * x + v, keeping the
    masked dy from its sums' pass for its input gradient's, the ReLU's mask from forward's
    output y (y > 0: one comparison, into a float32 row multiplied by dy): 5 elementwise
    passes, 7 with the ReLU (11 where z is recomputed for its mask, without y); were 6, 9
    and 12 with x - mean made in both passes (1.5-3x PyTorch's BatchNorm2d backward). Where
    the mean is far from 0 against the spread x - mean is made (see the accuracy tests
    below), in no more passes than before: 6 (x - mean kept in dx's memory between the
    passes) and 9."""
    from xpcnn.ops import fast_numpy

    shape = (16, 14, 14, 32)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
    moving = np.zeros(32, np.float32), np.ones(32, np.float32)
    y, mean, inv_std = STD.batch_norm_train(x, gamma, beta, *moving, 0.1, 1e-5, np.float32,
                                            relu)
    given = {"relu_y": y} if from_y else {}
    counting = _CountingNumpy(x.size)
    monkeypatch.setattr(fast_numpy, "np", counting)
    got = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True, **given,
                                   eps=1e-5)
    monkeypatch.undo()
    assert counting.passes < most + 0.01  # (and the per-channel values' few)
    for g, w in zip(got, STD.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, offset))


@pytest.mark.parametrize("dtype, y_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                            (np.float16, np.float16), (np.float16, np.float32)])
@pytest.mark.parametrize("sums_on_x", [False, True])
def test_batch_norm_backward_relu_mask_from_y_is_the_recomputed_one(dtype, y_dtype, sums_on_x,
                                                                    rng, monkeypatch):
    """The ReLU's mask from forward's output (y > 0) is z > 0 recomputed, bit for bit, on both
    paths: NaN in x (a NaN channel), z of exactly 0 (beta 0 where x is the mean) and tiny z
    included; the fast one's sums on x - mean (here: a NaN and a near-constant channel) or,
    made to, on x. A y of another dtype than gamma's (float16 under mixed precision, where a
    tiny z rounds to 0) is not used: z is recomputed there."""
    shape, c = (4, 6, 6, 5), 5
    param = np.float64 if dtype == np.float64 else np.float32
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    x[1, 2, 3, 0] = np.nan
    x[:, :, :, 3] = 1.5  # (one value: xhat 0, z = beta = 0 there)
    x[0, 0, 0, 3] = 1.5 + 1e-3
    dy = rng.standard_normal(shape).astype(dtype)
    dy[0, 1, 1, 2] = np.inf
    gamma = rng.standard_normal(c).astype(param)
    beta = rng.standard_normal(c).astype(param)
    beta[3] = 0
    if sums_on_x:
        monkeypatch.setattr(type(FAST), "_BN_NEAR", np.inf)
    for kernels in (FAST, STD):
        moving = np.zeros(c, param), np.ones(c, param)
        y, mean, inv_std = kernels.batch_norm_train(x, gamma, beta, *moving, 0.1, 1e-5,
                                                    y_dtype, True)
        eps = {"eps": 1e-5} if kernels is FAST else {}  # (forward's: the spread known)
        with np.errstate(all="ignore"):
            want = kernels.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True,
                                               **eps)
            got = kernels.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True,
                                              relu_y=y, **eps)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def _batch_norm_case(rng, shape, offset=0.0, beta_per_gamma=0.0, zero_gamma=False,
                     relu=True):
    """(dy, x, float32 statistics and parameters, forward's y) for a backward: x ~ N(offset,
    4), beta about beta_per_gamma * gamma, eps 1e-5."""
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if zero_gamma:
        gamma[1] = 0
    beta = (rng.standard_normal(c) * 0.3 + beta_per_gamma * gamma).astype(np.float32)
    return _batch_norm_forward(x, dy, gamma, beta, relu, 1e-5)


def _batch_norm_forward(x, dy, gamma, beta, relu, eps):
    """(dy, x, forward's statistics, gamma, beta, forward's y) with the standard kernels."""
    c = x.shape[-1]
    moving = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, inv_std = STD.batch_norm_train(x, gamma, beta, *moving, 0.1, eps, np.float32, relu)
    return dy, x, mean, inv_std, gamma, beta, y


def _batch_norm_backward_errors(case, relu, eps):
    """The fast backward (given forward's eps, as the layer gives it) and the standard one in
    float64 from the same float32 values; and dgamma's error per channel over its condition
    scale sum |dm * xhat|, in float32's units of 2**-24: sums of dm * (x - mean) in float32
    come within about 0.2 of those here (inf where the scale is 0 and dgamma not exactly
    the reference's 0: a constant channel)."""
    dy, x, mean, inv_std, gamma, beta, y = case
    with np.errstate(under="ignore"):  # (a subnormal gamma's dx)
        got = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True,
                                       relu_y=y if relu else None, eps=eps)
    f64 = [a.astype(np.float64) for a in case]
    want = STD.batch_norm_backward(*f64[:6], relu, True, relu_y=f64[6] if relu else None)
    xhat = (f64[1] - f64[2]) * f64[3]
    dm = f64[0] * (f64[6] > 0) if relu else f64[0]
    scale = np.sum(np.abs(dm * xhat), axis=(0, 1, 2))
    err = np.abs(got[1] - want[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(scale > 0, err / scale, np.where(err == 0, 0.0, np.inf)) / 2.0**-24
    return got, want, cond


def _assert_float32_accuracy(got, want, cond, outputs=3):
    """dgamma within half of float32's 2**-24 of its condition scale (sums on x past the
    threshold reach 1-2 here), and the first ``outputs`` gradients each within 1e-6 of
    its largest value."""
    assert np.max(cond) < 0.5, cond
    for g, w in list(zip(got, want, strict=True))[:outputs]:
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.max(np.abs(w)))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("offset, beta_per_gamma, zero_gamma", [
    (0.0, 0.0, False),  # (sums over x)
    (0.0, 40.0, False),  # (beta far from 0 against gamma)
    (0.0, 0.0, True),  # (a gamma of 0)
    (50.0, 0.0, False), (1e3, 0.0, False)])  # (means far from 0 against the spread: x - mean)
def test_batch_norm_backward_keeps_float64s_accuracy_far_from_zero(
        offset, beta_per_gamma, zero_gamma, relu, rng):
    """Backward's sums of dm * x less the mean's share keep the float32 accuracy of sums of
    dm * (x - mean) (see _assert_float32_accuracy). Products of values far from 0 against
    their spread lose their low bits to that subtraction (2.5e-4 off at |mean| / std = 500,
    4e-6 at 15; sums of dy * y at |beta| / gamma = 15 too): x - mean stands for x where
    |mean| / std > _BN_NEAR."""
    case = _batch_norm_case(rng, (32, 16, 16, 8), offset, beta_per_gamma, zero_gamma, relu)
    _assert_float32_accuracy(*_batch_norm_backward_errors(case, relu, 1e-5))


@pytest.mark.parametrize("relu, beta_per_gamma", [
    (False, 0.3), (True, 0.3),
    (True, None)])  # (beta as far from 0 against gamma as the mean against the spread)
@pytest.mark.parametrize("factor", ["just under", 8.0, 15.0])
def test_batch_norm_backward_keeps_float32s_accuracy_just_under_its_threshold(
        relu, beta_per_gamma, factor, rng):
    """Sums on x where |mean| / std is just under the threshold past which x - mean stands
    for x (_BN_NEAR): float32's accuracy, within the bound of the sums of dm * (x - mean).
    So at 8 and 15 (x - mean there), where sums on x, or on the ReLU's y with |beta| / |gamma|
    that far from 0, came 2.6e-6 and 3.9e-6 off (over 1e-6 of the largest value, 1-1.7 of
    float32's 2**-24 of the condition scale): a threshold raised to 8 fails here."""
    near = type(FAST)._BN_NEAR
    ratio = 0.95 * near if factor == "just under" else factor
    c = 8
    x = rng.standard_normal((32, 16, 16, c)).astype(np.float32)
    x = ((x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
         + ratio).astype(np.float32)  # (mean / std: that, in float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = ((ratio if beta_per_gamma is None else beta_per_gamma) * gamma).astype(np.float32)
    case = _batch_norm_forward(x, dy, gamma, beta, relu, 1e-5)
    _assert_float32_accuracy(*_batch_norm_backward_errors(case, relu, 1e-5))


@pytest.mark.parametrize("relu, mean, beta_per_gamma, eps", [
    (False, 0.4, 0.0, 1e-3),  # (|mean| * inv_std 12.6, |mean| / std 400)
    (False, 0.04, 0.0, 1e-5),  # (12.1 and 40)
    (True, 0.0, 1.0, 1e-3),  # (|beta| / |gamma| 1, 32 against std * inv_std)
    (True, 0.4, 1.0, 1e-3)])  # (both)
def test_batch_norm_backward_keeps_float32s_accuracy_where_the_spread_is_below_eps(
        relu, mean, beta_per_gamma, eps, rng):
    """A channel of spread 1e-3 (variance far below eps: a nearly dead channel): what
    decides the sums is |mean| / std, not |mean| * inv_std (sums on x there came 1e-4 off,
    9e-4 of a channel's dgamma; on the ReLU's y, with |beta| / |gamma| 1, 4e-6: a factor
    |beta| / (|gamma| * std * inv_std) lost)."""
    c = 8
    x = (mean + 1e-3 * rng.standard_normal((64, 16, 16, c))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = (beta_per_gamma * gamma).astype(np.float32)
    case = _batch_norm_forward(x, dy, gamma, beta, relu, eps)
    _assert_float32_accuracy(*_batch_norm_backward_errors(case, relu, eps))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("value, eps", [(0.3, 1e-3), (-0.3, 1e-3), (0.01, 1e-3), (0.3, 1e-5)])
def test_batch_norm_backward_gives_a_constant_channel_its_dgamma(value, eps, relu, rng):
    """A channel of one value (variance 0: a convolution with dead inputs and a bias): its
    xhat is (x - mean) * inv_std, 0 where the mean is that value, so dgamma is exactly 0
    there, as the standard version's (sums on x gave 3.4e-4, on the ReLU's y 1.9e-6: Adam
    makes full steps of such noise); else within float32's rounding of the reference."""
    x = rng.standard_normal((64, 16, 16, 4)).astype(np.float32)
    x[..., 1] = value
    dy = rng.standard_normal(x.shape).astype(np.float32)
    case = _batch_norm_forward(x, dy, np.ones(4, np.float32), np.full(4, 0.1, np.float32), relu,
                               eps)
    got, want, cond = _batch_norm_backward_errors(case, relu, eps)
    if want[1][1] == 0:
        assert got[1][1] == 0
    _assert_float32_accuracy(got, want, cond)


@pytest.mark.parametrize("gamma", [1e-42, -1e-42, 1e-44])
def test_batch_norm_backward_keeps_dgammas_bits_with_a_subnormal_gamma(gamma, rng):
    """A gamma below float32's smallest normal makes a subnormal y of few bits: the sums
    take x, not y (sums of dy * y gave dgamma 1.2e-3 off at 1e-42, 0.26 at 1e-44). (dx, s *
    dm with s = inv_std * gamma subnormal, is as coarse on every path.)"""
    c = 4
    x = rng.standard_normal((32, 8, 8, c)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    case = _batch_norm_forward(x, dy, np.full(c, gamma, np.float32), np.zeros(c, np.float32),
                               True, 1e-5)
    got, want, cond = _batch_norm_backward_errors(case, True, 1e-5)
    _assert_float32_accuracy(got[1:], want[1:], cond, outputs=2)


def test_batch_norm_backward_with_a_gamma_and_beta_of_zero(rng):
    """A channel of gamma and beta 0 (y is 0 there: nothing to divide a sum(dy * y) by) and
    one of gamma 0 alone, the mean far from 0: finite gradients, the reference's (sums of
    dy * y over gamma gave NaN there)."""
    c = 4
    x = (rng.standard_normal((16, 8, 8, c)) + 20).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    case = _batch_norm_forward(x, dy, np.array([1, 0, 0, -0.7], np.float32),
                               np.array([0.1, 0, 0.5, 0.2], np.float32), True, 1e-5)
    got, want, cond = _batch_norm_backward_errors(case, True, 1e-5)
    assert all(np.isfinite(g).all() for g in got)
    _assert_float32_accuracy(got, want, cond)


def test_batch_norm_backward_gives_each_worker_its_own_blocks_whatever_the_thread_count(
        monkeypatch, rng):
    """The blocks' temporaries follow the worker indices for_chunks hands out: a thread count
    that grows within a call (set_threads from another thread, as xpcnn.distributed calls
    it) still gives the same bits (was: an IndexError from scratch sized by an earlier
    count)."""
    case = _batch_norm_case(rng, (64, 32, 32, 16))  # (4 MiB: 8 blocks)
    dy, x, mean, inv_std, gamma, beta, y = case
    want = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True,
                                    relu_y=y, eps=1e-5)
    counts = iter(range(1, 100))
    monkeypatch.setattr(type(FAST), "threads", lambda self: min(next(counts), 4))
    got = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True, relu_y=y,
                                   eps=1e-5)
    assert next(counts) > 2  # (both passes asked, and were told more than one)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("owning", [True, False])
def test_batch_norm_backward_writes_dx_into_a_spare_y_to_the_same_bits(owning, rng):
    """A y that nothing else holds (spare_y) becomes dx: each block's mask is read before its
    masked dy overwrites it, to a separate dx's bits (NaN and inf included) and the same
    parameter gradients. A y that is a view of other memory is only read."""
    shape, c = (8, 12, 12, 5), 5
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    x[1, 2, 3, 0] = np.nan
    dy = rng.standard_normal(shape).astype(np.float32)
    dy[0, 1, 1, 2] = np.inf
    gamma, beta = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    moving = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, inv_std = FAST.batch_norm_train(x, gamma, beta, *moving, 0.1, 1e-5, np.float32,
                                             True)
    assert y.flags.owndata  # (forward's y owns its memory: backward may take it)
    if not owning:
        y = np.ascontiguousarray(np.concatenate([y, y])[:shape[0]])
    kept = y.copy()
    with np.errstate(all="ignore"):
        want = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True,
                                        relu_y=kept.copy())
        got = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True, True,
                                       relu_y=y, spare_y=True)
    assert np.shares_memory(got[0], y) == owning
    if not owning:
        np.testing.assert_array_equal(y, kept)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


_TRACED_IMPORT = """
import sys
def tracer(frame, event, arg):
    frame.f_locals  # (as a debugger showing variables does)
    return tracer
sys.settrace(tracer)
import numpy as np
from xpcnn.layers import BatchNorm2D
from xpcnn.layers.base import Options
sys.settrace(None)
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 6, 6, 4)).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
bn = BatchNorm2D()
bn.build((6, 6, 4))
y = bn.forward(x, True, Options(fused_relu=True))
kept = y.copy()
bn.backward(dy, Options(fused_relu=True))
print(np.array_equal(y, kept))
"""


def test_a_batchnorm_output_its_caller_holds_is_not_overwritten_after_a_traced_import():
    """BatchNorm2D's backward writes dx into its output y only where nothing else holds y, by
    its reference count against a local's. That baseline was measured once, at import: under
    a tracer reading f_locals (a debugger; CPython before 3.13 copies the locals then), one
    too high, and a y the caller held was overwritten (review RC). Now measured in backward."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRACED_IMPORT], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "True"


def test_a_batchnorm_relus_kept_output_adds_nothing_to_its_backwards_peak(monkeypatch, rng):
    """BatchNorm2D + ReLU keeps its output y for the ReLU's mask; at its backward, where the
    next layer's cache has let y go, y's memory becomes dx (was: dx beside y, 4 bytes a value
    more at the step's peak, 58.8 -> 65.7 MiB for Conv2D(64) -> BN+ReLU -> Conv2D at batch 64).
    A y someone still holds is read, never written."""
    from xpcnn.layers import BatchNorm2D

    peaks = []
    plain = BatchNorm2D.backward

    def measured(self, dy, *options):
        at = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dx = plain(self, dy, *options)
        peaks.append(tracemalloc.get_traced_memory()[1] - at)
        return dx

    x = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 16)
    model = xpcnn.Sequential(seed=0)
    for layer in (Conv2D(64, 3, padding="same"), BatchNorm2D(), ReLU(),
                  Conv2D(4, 3, padding="same"), xpcnn.layers.GlobalAvgPool2D(), Dense(3)):
        model.add(layer)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    model.train_on_batch(x, labels)
    y_bytes = 16 * 32 * 32 * 64 * 4  # (4 MiB)
    monkeypatch.setattr(BatchNorm2D, "backward", measured)
    tracemalloc.start()
    try:
        model.train_on_batch(x, labels)
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    (peak,) = peaks
    # (the blocks' temporaries, 512 KB a thread; a separate dx: y_bytes more)
    assert peak < y_bytes / 2, peak
    # a y held elsewhere (here, a layer's output kept by hand) is left as it was
    bn = model.layers[1]
    h = model.layers[0](x)
    out = bn.forward(h, training=True, options=Options(fused_relu=True))
    kept = out.copy()
    dx = bn.backward(np.ones_like(out), Options(fused_relu=True))
    np.testing.assert_array_equal(out, kept)
    assert not np.shares_memory(dx, out)


@pytest.mark.parametrize("metrics", [["accuracy"], ["sparse_top_k_categorical_accuracy"]])
def test_a_step_without_top_k_metrics_asks_nothing_about_their_counts(metrics, monkeypatch,
                                                                     rng):
    """The standard step record (NumPy's) places top-k counts only where a top-k metric
    made some: without one, no top_k_start call a step (was one more Python call a step,
    bench_host_step's 301 -> 302); with one, the counts are still added."""
    from xpcnn.ops import step_record

    asked = []
    plain = step_record.top_k_start
    monkeypatch.setattr(step_record, "top_k_start", lambda n: (asked.append(n), plain(n))[1])
    x = rng.standard_normal((8, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 7, 8)
    model = xpcnn.Sequential([Conv2D(3, 3), xpcnn.layers.Flatten(), Dense(7)],
                             input_shape=(6, 6, 2), seed=0)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd", metrics=metrics)
    logits = model.predict(x, verbose=0)  # (the step's forward: no dropout, the same weights)
    asked.clear()
    logs = model.train_on_batch(x, labels, return_dict=True)
    top_k = metrics != ["accuracy"]
    assert bool(asked) == top_k
    if top_k:
        within = np.argsort(-logits, axis=1, kind="stable")[:, :5] == labels[:, None]
        assert logs["sparse_top_k_categorical_accuracy"] == pytest.approx(within.any(1).mean())


def test_batch_norm_backward_runs_in_blocks_that_stay_in_cache(monkeypatch, rng):
    """Training backward's passes run over blocks of at most 512 KB of float32 (2 MB ones
    before 256 KB ones), and a batch smaller than one block as one block: no second block
    (and thread handoff) for 2,352 values (3x PyTorch's time)."""
    seen = []
    plain = FAST.for_chunks
    monkeypatch.setattr(FAST, "for_chunks", lambda n, m, fn: (seen.append((n, m)),
                                                               plain(n, m, fn)))
    for shape in ((1, 28, 28, 3), (32, 28, 28, 16)):
        x = rng.standard_normal(shape).astype(np.float32)
        c = shape[-1]
        gamma, beta, mean = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
        inv_std = np.ones(c, np.float32)
        seen.clear()
        FAST.batch_norm_backward(x, x, mean, inv_std, gamma, beta, False, True)
        (n, m), again = seen
        assert again == (n, m)
        if x.nbytes <= 1 << 19:
            assert m == n
        else:
            assert m * x.nbytes // n <= 1 << 19 and -(-n // m) >= 2


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_batch_norm_backward_holds_no_whole_batch_float32_temporary_beside_dx(x_dtype, relu,
                                                                              rng):
    """What the two passes keep for the whole batch: x - mean in dx's own memory where dx is
    float32, made again a block at a time under mixed precision (float16 x and dx), and the
    ReLU's mask as a byte a value (was: a float32 x - mean beside a float16 dx, and a float32
    masked dy: 5x the input's bytes at the peak)."""
    import tracemalloc

    shape = (128, 56, 56, 16)  # (25 MiB in float32: the blocks' temporaries are far less)
    x = rng.standard_normal(shape).astype(x_dtype)
    dy = rng.standard_normal(shape).astype(x_dtype)
    gamma, beta = (rng.standard_normal(16).astype(np.float32) for _ in range(2))
    moving = np.zeros(16, np.float32), np.ones(16, np.float32)
    _, mean, inv_std = STD.batch_norm_train(x, gamma, beta, *moving, 0.1, 1e-5, np.float32,
                                            relu)
    FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True)  # (tables made)
    tracemalloc.start()
    got = FAST.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got[0].dtype == x_dtype
    held = x.nbytes + (x.size if relu else 0)  # (dx, the mask)
    assert peak - held < 20 * 2**20  # (2 MiB blocks' temporaries on the threads: 4-16 MiB)
    want = STD.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True)[0]
    np.testing.assert_allclose(got[0].astype(np.float32), want.astype(np.float32),
                               rtol=1e-2, atol=1e-2)  # (the sums: the other tests)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_products_with_an_inner_dimension_of_one_skip_numpys_matmul(dtype, monkeypatch, rng):
    """A Dense kernel's gradient at batch 1 (and any product with an inner dimension of 1) is
    an outer product, which NumPy's matmul runs off BLAS (~10x slower): the fast path
    multiplies the column by the row instead, to the standard product's bits."""
    a = rng.standard_normal((1, 300)).astype(dtype)
    b = rng.standard_normal((1, 200)).astype(dtype)
    col = np.ascontiguousarray(a.T)
    want = [STD.matmul_tn(a, b), STD.matmul(col, b), STD.matmul_nt(col, np.ascontiguousarray(
        b.T))]
    matmul, inner_one = np.matmul, []

    def spy(x, y, *args, **kwargs):
        if x.shape[-1] == 1:
            inner_one.append((x.shape, y.shape))
        return matmul(x, y, *args, **kwargs)

    monkeypatch.setattr(np, "matmul", spy)
    got = [FAST.matmul_tn(a, b), FAST.matmul(col, b),
           FAST.matmul_nt(col, np.ascontiguousarray(b.T))]
    assert not inner_one
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape == (300, 200)
        np.testing.assert_array_equal(g, w)

def _train(net, data, shape, fast):
    old = set_fast_path(fast)
    try:
        x, y = data
        model = xpcnn.Sequential(net, input_shape=shape, seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        return model.get_weights()
    finally:
        set_fast_path(old)


@pytest.mark.parametrize("net", [every_layer_net, gap_net])
def test_training_fast_equals_standard(net, small_chunks, rng):
    data = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 48)
    fast = _train(net(), data, (8, 8, 3), True)
    std = _train(net(), data, (8, 8, 3), False)
    for i, (a, b) in enumerate(zip(fast, std, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"weight {i}")


def test_threaded_training_is_bit_reproducible(small_chunks, rng):
    """Chunks go to whichever thread is free, yet the sums keep one order."""
    data = rng.integers(0, 256, (32, 12, 12, 1), dtype=np.uint8), rng.integers(0, 10, 32)
    runs = [_train(build_layers("mnist"), data, (12, 12, 1), True) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b)


def _assert_same_bits(opt_fused, fused, opt_std, standard):
    for f, s in zip(fused, standard, strict=True):
        assert f.dtype == s.dtype
        np.testing.assert_array_equal(f, s)
    for name, slots in opt_std.slots.items():
        for f, s in zip(opt_fused.slots[name], slots, strict=True):
            np.testing.assert_array_equal(f, s)


@EVERY_OPTIMISER
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("device_scalars", [False, True], ids=["floats", "device-scalars"])
def test_fused_optimiser_updates_give_the_standard_bits(rng, make, dtype, device_scalars):
    """The NumPy updates run the standard formulas' operations in place and in the same order:
    the same bits, on small parameters and on one large enough to be split over threads, with
    the step's numbers as Python floats or as 0-d arrays of the parameters' dtype."""
    assert FAST.fused_updates  # (else both would run the standard formulas)
    shapes = [*UPDATE_SHAPES, (600, 1000)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    scalar_dtype = dtype if device_scalars else None
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        grads[0] = np.asfortranarray(grads[0])  # a gradient that is not C-contiguous
        step_with(xpn, opt_fused, fused, grads, FAST, scalar_dtype)
        step_with(xpn, opt_std, standard, grads, None, scalar_dtype)
    _assert_same_bits(opt_fused, fused, opt_std, standard)


@OPTIMISERS
def test_fused_updates_of_wider_gradients_give_the_standard_bits(rng, make):
    """float64 gradients meeting float32 parameters (a step called by hand): the NumPy
    updates keep what the standard formulas compute in float64 in float64 (RMSprop's
    quotient first went into a float32 buffer), rounding to float32 where they store."""
    params = [rng.standard_normal(s).astype(np.float32) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) for p in params]
        step_with(xpn, opt_fused, fused, grads, FAST, None)
        step_with(xpn, opt_std, standard, grads, None, None)
    _assert_same_bits(opt_fused, fused, opt_std, standard)


@OPTIMISERS
def test_fused_updates_with_wider_device_scalars_give_the_standard_bits(rng, make):
    """float64 step numbers (a captured step's, in the first parameter's dtype) meeting
    float32 parameters too: the NumPy updates compute in float64 and round to float32 once,
    at the end, as the standard formulas do (AdamW's decay included)."""
    _assert_same_bits(*two_dtype_updates(xpn, FAST, make, rng, (np.float64, np.float32),
                                          np.float64))


@OPTIMISERS
def test_a_gated_update_changes_nothing_where_the_flag_is_false(rng, make):
    """``apply`` False (a non-finite step, decided on the device) leaves parameters and slots as
    they were, in the NumPy updates as in the standard formulas; the other steps agree bit for
    bit."""
    for f, s in zip(*gated_updates(xpn, FAST, make, rng), strict=True):
        np.testing.assert_array_equal(f, s)



@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_conv_grads_fast_equals_standard(dtype, rng):
    """ops.conv_grads on the NumPy kernels (chunks on threads, chunk plans, a partial last
    chunk, float16 products in float32) gives the standard kernels' gradients, twice over one
    workspace."""
    n, h, w, c, k = 7, 8, 6, 5, 4
    pads = (1, 1, 1, 1)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    dy = rng.standard_normal((n, h, w, k)).astype(dtype)
    kernel = (0.3 * rng.standard_normal((k, 3, 3, c))).astype(dtype)  # (K, kh, kw, C)
    budget = 3 * h * w * 9 * k * 4  # chunks of 3 images: 3, 3 and 1
    ws = Workspace()
    want = ops.conv_grads(xpn, STD, x, dy, kernel, pads, Workspace(), "d", None,
                          with_bias=True)
    tol = 1e-2 if dtype == np.float16 else 1e-5
    for _ in range(2):
        got = ops.conv_grads(xpn, FAST, x, dy, kernel, pads, ws, "d", budget, min_chunks=1,
                             with_bias=True)
        for g, ref in zip(got, want, strict=True):
            assert g.shape == ref.shape
            np.testing.assert_allclose(g.astype(np.float64), ref.astype(np.float64), rtol=tol,
                                       atol=tol)


def test_chunk_plans_follow_shapes_and_partial_chunks(rng):
    """A padded convolution keeps a plan per workspace key (views of its buffers, see
    ``ops.im2col._plan``). It must follow a change of input size or of chunk size, and a partial
    last chunk takes the general path: all as a fresh workspace on the standard kernels."""
    ws = Workspace()
    per_image = 27 * 4  # bytes of patches per output position (images_per_chunk's count)
    for shape, images in [((7, 8, 8, 3), 3), ((7, 6, 6, 3), 3), ((5, 8, 8, 3), 2),
                          ((7, 8, 8, 3), 3)]:
        x = rng.standard_normal(shape).astype(np.float32)
        w2 = rng.standard_normal((27, 4)).astype(np.float32)
        bias = rng.standard_normal(4).astype(np.float32)
        hw = shape[1:3]
        budget = images * hw[0] * hw[1] * per_image  # chunks of `images`, the last one partial
        args = ((3, 3), (1, 1), (1, 1, 1, 1), hw)
        got = ops.conv_forward(xpn, FAST, x, w2, bias, *args, ws, "c", budget, relu=True,
                               min_chunks=1)
        want = ops.conv_forward(xpn, STD, x, w2, bias, *args, Workspace(), "c", None,
                                relu=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        dy = rng.standard_normal(want.shape).astype(np.float32)
        got = ops.conv_weight_grad(xpn, FAST, x, dy, *args, ws, "c", budget, min_chunks=1,
                                   with_bias=True)
        want = ops.conv_weight_grad(xpn, STD, x, dy, *args, Workspace(), "c", None,
                                    with_bias=True)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_a_finished_threads_scratch_goes_when_another_thread_comes():
    """Each thread's kept scratch (Workspace) goes once that thread has ended and another
    comes, even while its Thread object is still referenced (a pool shut down, a thread kept
    in a variable: was kept until that object went)."""
    import threading

    ws = Workspace()

    def use():
        ws.get(xpn, "k", (64, 8), np.float32, None)

    first = threading.Thread(target=use)
    first.start()
    first.join()
    assert first in ws._by_thread  # (kept while nothing else comes)
    second = threading.Thread(target=use)
    second.start()
    second.join()
    assert list(ws._by_thread) == [second]


def test_threads_new_to_a_workspace_at_once_are_taken_one_at_a_time():
    """Threads reaching a Workspace for the first time together each dropped the ended
    threads' scratch from one dictionary: KeyError, or "dictionary changed size during
    iteration" (seen with a short switch interval, as a busy machine has)."""
    import sys
    import threading

    errors = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(60):
            ws = Workspace()
            ended = [threading.Thread(target=ws._mine) for _ in range(20)]
            for t in ended:
                t.start()
            for t in ended:
                t.join()
            meet = threading.Barrier(8)

            def new(ws=ws, meet=meet):
                meet.wait()
                try:
                    ws._mine()
                except Exception as e:  # noqa: BLE001 (collected, asserted below)
                    errors.append(e)

            threads = [threading.Thread(target=new) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_switching_the_fast_path_reaches_a_convolution_that_has_run(rng):
    """``set_fast_path`` (the switch that compares the two paths) reaches a Conv2D that has
    already run: its engine, kept between passes, is made again for the kernels of the moment
    (it kept the fast one, and the comparison compared the fast convolution with itself)."""
    x = rng.random((4, 8, 8, 3)).astype(np.float32)
    model = xpcnn.Sequential([Conv2D(2, 3), MaxPool2D(2)], seed=0)
    conv = model.layers[0]
    old = set_fast_path(True)
    try:
        fast = model.predict(x, verbose=0)
        assert type(conv._engine().kern) is type(FAST)
        set_fast_path(False)
        standard = model.predict(x, verbose=0)
        assert type(conv._engine().kern) is StandardKernels
        set_fast_path(True)
        assert type(conv._engine().kern) is type(FAST)
    finally:
        set_fast_path(old)
    np.testing.assert_allclose(standard, fast, rtol=1e-5, atol=1e-6)


def test_strided_conv_input_gradient_goes_by_phases_without_col2im(monkeypatch, rng):
    """A strided convolution's input gradient on the NumPy kernels (7x7/2 "same" on 3
    channels): the standard path's result, by stride phases in chunks: no col2im, and no
    temporary the size of the whole batch's patch gradients (N*Ho*Wo, kh*kw*C) that col2im
    scatters. Where phases do not pay (5x5 outputs of a 16x16 input), col2im still."""
    from xpcnn.ops.convolution import ConvGeometry, KernelsConv

    scatters = []
    col2im = ops.col2im
    monkeypatch.setattr(ops, "col2im", lambda *a: scatters.append(a[2]) or col2im(*a))
    n, budget = 16, backend_module.CPU_CHUNK_BYTES
    for (hw, c, k), padding, by_phases in [((32, 3, 8), "same", True),
                                           ((16, 64, 64), "valid", False)]:
        g = ConvGeometry.of((hw, hw, c), k, (7, 7), (2, 2), padding)
        assert ops.phase_input_grad_pays(g.kernel, g.strides, g.pads, g.in_hw, g.out_hw, c,
                                         k) is by_phases
        w = (0.3 * rng.standard_normal((k, 7, 7, c))).astype(np.float32)
        dy = rng.standard_normal((n, *g.out_hw, k)).astype(np.float32)
        want = KernelsConv(g, STD).input_grad(dy, w)
        fast = KernelsConv(g, FAST, budget)
        del scatters[:]
        for _ in range(2):  # (the second call reuses the workspace's buffers)
            tracemalloc.start()
            got = fast.input_grad(dy, w)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert len(scatters) == (0 if by_phases else 2)
        patch_grads = n * g.out_hw[0] * g.out_hw[1] * g.taps * 4
        if by_phases:
            assert peak < patch_grads / 2, (peak, patch_grads)


def test_a_batchnorm_with_its_relu_fused_hands_backward_its_output(monkeypatch, rng):
    """BatchNorm2D + ReLU before a convolution (which keeps that output as its input anyway)
    gives backward its output y for the ReLU's mask, not z to recompute (the gradients are
    the same: test_batch_norm_backward_relu_mask_from_y_is_the_recomputed_one), spare there
    (held by nothing else once the convolution's backward ran), with forward's eps."""
    from xpcnn.layers import BatchNorm2D

    seen = []
    plain = type(FAST).batch_norm_backward

    def spy(self, *args, relu_y=None, spare_y=False, eps=None):
        seen.append((args[6], relu_y, spare_y, eps))
        return plain(self, *args, relu_y=relu_y, spare_y=spare_y, eps=eps)

    monkeypatch.setattr(type(FAST), "batch_norm_backward", spy)
    x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 4)
    model = xpcnn.Sequential(seed=0)
    for layer in (Conv2D(4, 3, padding="same"), BatchNorm2D(), ReLU(),
                  Conv2D(4, 3, padding="same"), xpcnn.layers.Flatten(), Dense(3)):
        model.add(layer)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    model.train_on_batch(x, labels)
    (relu, y, spare, eps), = seen
    assert relu and y is not None and y.shape == x.shape[:3] + (4,)
    assert eps == 1e-5  # (forward's: the batch's spread, for the sums' accuracy)
    assert spare  # (the convolution let y go at its backward: y's memory becomes dx)
