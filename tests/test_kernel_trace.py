"""The global-memory tracer of the emulated kernels (tests/kernel_trace.py) on small kernels whose
sectors per request are known: 32 threads reading 32 consecutive float32 values touch 4
sectors of 32 bytes, a stride of 32 elements one sector per thread, one address one sector."""

import numpy as np
import pytest
from cuda_emulator import (
    ElementwiseKernel,
    RawKernel,
    load_emulated_fast_cupy,
    needs_compiler,
    restore,
)
from kernel_trace import tracing

pytestmark = needs_compiler

THREADS = 64  # (two warps a block)
BLOCKS = 2


def _raw(body: str, params: str = "const float* a, float* out, int n") -> RawKernel:
    return RawKernel('extern "C" __global__ void k(' + params + ") {\n"
                     "const int i = blockIdx.x * blockDim.x + threadIdx.x;\n" + body + "\n}",
                     "k")


def _launch(kernel: RawKernel, *args):
    with tracing() as trace:
        kernel((BLOCKS,), (THREADS,), args)
    (launch,) = trace.launches
    return launch.traffic


WARPS = BLOCKS * THREADS // 32


@pytest.mark.parametrize(("dtype", "ctype", "sectors"), [(np.float32, "float", 4),
                                                         (np.float64, "double", 8),
                                                         (np.float16, "__half", 2)])
def test_a_coalesced_copy_moves_each_sector_once(dtype, ctype, sectors):
    n = BLOCKS * THREADS
    a = np.arange(n).astype(dtype)
    out = np.zeros(n, dtype)
    kernel = _raw("out[i] = a[i];", f"const {ctype}* a, {ctype}* out, int n")
    t = _launch(kernel, a, out, np.int32(n))
    np.testing.assert_array_equal(out, a)
    assert (t.load_requests, t.store_requests) == (WARPS, WARPS)
    assert t.load_sectors_per_request == t.store_sectors_per_request == sectors
    assert t.excess == t.scatter == 1.0
    assert t.one_address_loads == 0
    assert t.bytes_requested == t.unique_bytes == 2 * a.nbytes


def test_a_stride_of_32_elements_moves_a_sector_per_thread():
    n = BLOCKS * THREADS
    a = np.arange(32 * n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    t = _launch(_raw("out[i] = a[32 * i];"), a, out, np.int32(n))
    np.testing.assert_array_equal(out, a[::32])
    assert t.load_sectors_per_request == 32
    assert t.store_sectors_per_request == 4
    assert t.scatter == (32 + 4) / (4 + 4)
    # (each sector loaded is used for 4 of its 32 bytes, but moved once)
    assert t.excess == 1.0


def test_a_broadcast_read_moves_one_sector():
    n = BLOCKS * THREADS
    a = np.array([3.0, 4.0], np.float32)
    out = np.zeros(n, np.float32)
    t = _launch(_raw("out[i] = a[0];"), a, out, np.int32(n))
    assert (out == 3).all()
    assert t.load_sectors_per_request == 1
    assert t.load_requests == t.one_address_loads == WARPS
    assert t.scatter == 1.0
    # every warp loads the same sector: BLOCKS * THREADS / 32 times the one needed
    assert t.excess == (WARPS + n * 4 // 32) / (1 + n * 4 // 32)


def test_a_second_read_of_the_same_data_counts_twice():
    n = BLOCKS * THREADS
    a = np.arange(n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    t = _launch(_raw("out[i] = a[i] + a[(i + 32) % n];"), a, out, np.int32(n))
    np.testing.assert_array_equal(out, a + np.roll(a, -32))
    assert t.load_requests == 2 * WARPS
    # a's sectors loaded twice, out's stored once: 3 moves for 2 needed
    assert t.excess == 1.5


def test_shared_memory_is_not_counted():
    n = BLOCKS * THREADS
    a = np.arange(n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    kernel = _raw(f"__shared__ float s[{THREADS}];\n"
                  "s[threadIdx.x] = a[i];\n__syncthreads();\n"
                  f"out[i] = s[{THREADS} - 1 - threadIdx.x] + s[threadIdx.x];")
    t = _launch(kernel, a, out, np.int32(n))
    np.testing.assert_array_equal(out, a.reshape(BLOCKS, THREADS)[:, ::-1].ravel() + a)
    assert (t.load_requests, t.store_requests) == (WARPS, WARPS)
    assert t.bytes_requested == 2 * a.nbytes


def test_atomics_still_add_under_tracing():
    n = BLOCKS * THREADS
    a = np.arange(n, dtype=np.float32)  # (integers: their float32 sum is exact in any order)
    total = np.zeros(1, np.float32)
    count = np.zeros(1, np.uint32)
    kernel = _raw("atomicAdd(&total[0], a[i]); atomicAdd(&count[0], 2u);",
                  "const float* a, float* total, unsigned int* count")
    kernel.check_schedules = False  # (the sum is the same whichever order; no reversed rerun)
    with tracing() as trace:
        kernel((BLOCKS,), (THREADS,), (a, total, count))
    assert total[0] == a.sum()
    assert count[0] == 2 * n
    t = trace.launches[0].traffic
    assert t.atomic_requests >= 2 * WARPS
    assert t.load_requests == WARPS


def test_an_elementwise_kernel_reads_a_broadcast_input_as_one_address():
    kernel = ElementwiseKernel("T x, T b", "T y", "y = x + b;", "add")
    x = np.arange(4 * 32, dtype=np.float32)
    b = np.array([2.0], np.float32)  # (the emulator copies it out to 128 elements)
    with tracing() as trace:
        y = kernel(x, b)
    np.testing.assert_array_equal(y, x + 2)
    (launch,) = trace.launches
    sites = sorted((s.kind, s.sectors / s.requests) for s in launch.sites)
    assert sites == [(0, 1.0), (0, 4.0), (1, 4.0)]  # (b, x loaded; y stored)


def test_tracing_is_off_outside_its_block():
    kernel = _raw("out[i] = a[i];")
    n = BLOCKS * THREADS
    a, out = np.ones(n, np.float32), np.zeros(n, np.float32)
    with tracing() as trace:
        pass
    kernel((BLOCKS,), (THREADS,), (a, out, np.int32(n)))
    assert trace.launches == []
    assert (out == 1).all()


def test_a_half_passed_by_value_is_a_load():
    n = BLOCKS * THREADS
    a = np.arange(n).astype(np.float16)
    out = np.zeros(n, np.float32)
    # (a function of its own, as fast_cupy's xpcnn_widen: the struct read into its argument)
    kernel = RawKernel("__device__ float widen(__half h) { return __half2float(h); }\n"
                       'extern "C" __global__ void k(const __half* a, float* out) {\n'
                       "out[blockIdx.x * blockDim.x + threadIdx.x] ="
                       " widen(a[blockIdx.x * blockDim.x + threadIdx.x]);\n}", "k")
    t = _launch(kernel, a, out)
    np.testing.assert_array_equal(out, a)
    assert (t.load_requests, t.load_sectors_per_request) == (WARPS, 2)


# -- xpcnn's kernels: what scripts/kernel_traffic.py found them reading twice, read once ------
@pytest.fixture(scope="module")
def fast():
    module, saved = load_emulated_fast_cupy()
    yield module.KERNELS
    restore(saved)


def _traced(call):
    with tracing() as trace:
        call()
    return [launch.traffic for launch in trace.launches]


def test_max_pool_and_its_gradient_read_each_element_once(fast, rng):
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
    (forward,) = _traced(lambda: fast.max_pool(x, (2, 2), (2, 2), (4, 4)))
    y = fast.max_pool(x, (2, 2), (2, 2), (4, 4))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (backward,) = _traced(lambda: fast.max_pool_backward(x, y, dy, (2, 2), (2, 2), (4, 4),
                                                         True))
    assert forward.excess == backward.excess == 1.0
    assert forward.load_requests == 4 * y.size // 32  # (each window's 4 elements, a warp's 32)


def test_an_sgd_update_reads_each_parameter_and_state_once(fast, rng):
    params = [rng.standard_normal(n).astype(np.float32) for n in (64, 320)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    bufs = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    (t,) = _traced(lambda: fast.sgd_update(params, grads, bufs, 0.1, 0.0, 0.9, True))
    warps = sum(p.size for p in params) // 32
    # (the table's entries, one address a warp, and the parameter, gradient and momentum)
    assert t.load_requests - t.one_address_loads == 3 * warps
    assert t.store_requests == 2 * warps


@pytest.mark.parametrize("decoupled", [False, True])
def test_an_adam_update_reads_each_parameter_and_state_once(fast, rng, decoupled):
    params = [rng.standard_normal(n).astype(np.float32) for n in (64, 320)]
    grads, ms = ([rng.standard_normal(p.shape).astype(np.float32) for p in params]
                 for _ in range(2))
    vs = [np.abs(rng.standard_normal(p.shape)).astype(np.float32) for p in params]
    (t,) = _traced(lambda: fast.adam_update(params, grads, ms, vs, 0.99, 1e-3, 0.5, 0.01,
                                            decoupled, 0.9, 0.999, 1e-7))
    warps = sum(p.size for p in params) // 32
    # (the table's entries, one address a warp, and the parameter, gradient and two moments)
    assert t.load_requests - t.one_address_loads == 4 * warps
    assert t.store_requests == 3 * warps


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_rmsprop_update_reads_each_parameter_and_state_once(fast, rng, centered, momentum):
    params = [rng.standard_normal(n).astype(np.float32) for n in (64, 320)]
    slots = 1 + centered + bool(momentum)
    grads, vs, means, bufs = ([rng.standard_normal(p.shape).astype(np.float32) for p in params]
                              for _ in range(4))
    vs = [np.abs(v) for v in vs]
    (t,) = _traced(lambda: fast.rmsprop_update(params, grads, vs, means if centered else None,
                                               bufs if momentum else None, 1e-3, 0.01, 0.9,
                                               momentum, 1e-7))
    warps = sum(p.size for p in params) // 32
    # (the table's entries, one address a warp, and the parameter, gradient and each slot)
    assert t.load_requests - t.one_address_loads == (2 + slots) * warps
    assert t.store_requests == (1 + slots) * warps


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_softmax_cross_entropy_moves_its_rows_coalesced_and_once(fast, rng, dtype, scaled):
    """Rows of 10 classes pass through shared memory: a warp's loads and stores of logits and
    gradient fall in consecutive sectors, each moved once (a thread per row reading its row in
    place: 31 sectors a request, 14x the minimum, float32); the loss scale read once a row."""
    z = rng.standard_normal((512, 10)).astype(dtype)
    labels = rng.integers(0, 10, 512).astype(np.int32)
    scale = np.array([8.0, 0.0], np.float32) if scaled else None
    (t,) = _traced(lambda: fast.softmax_cross_entropy(z, labels, 0.1, scale, np.float32))
    assert t.scatter == 1.0 and t.excess < 1.03
    # each logit loaded once and each gradient element stored once, 32 a request (besides: the
    # labels and the scale; the 2 blocks' partial sums, stored, then loaded by the last; the 2
    # statistics)
    assert t.load_requests == z.size // 32 + (2 if scaled else 1) * 512 // 32 + 2
    assert t.store_requests == z.size // 32 + 2 + 1


def test_softmax_cross_entropy_of_many_classes_reads_a_row_a_warp(fast, rng):
    """Rows whose block would not fit in shared memory (128 classes of float32) are a warp's
    each, the lanes on consecutive classes: every request packed (a thread a row: 24 sectors a
    request, 7.6x packed, at 100 classes)."""
    z = rng.standard_normal((512, 128)).astype(np.float32)
    labels = rng.integers(0, 128, 512).astype(np.int32)
    scale = np.array([8.0, 0.0], np.float32)
    (t,) = _traced(lambda: fast.softmax_cross_entropy(z, labels, 0.1, scale, np.float32))
    assert t.scatter < 1.01  # (NumPy aligns the rows to 16 bytes, not a sector's 32)
    # the row read three times (its maximum, its sum, its loss and gradient: L1's to absorb),
    # the gradient stored once; a warp's label and scale one address each; 64 blocks of 8 rows,
    # their partial sums stored, then read by the last block in 4 requests; the 2 statistics
    assert t.load_requests == 3 * z.size // 32 + 2 * 512 + 4
    assert t.store_requests == z.size // 32 + 64 + 1


def test_batch_norm_sums_read_the_per_channel_values_once_a_thread(fast, rng):
    x = rng.standard_normal((4, 8, 8, 32)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = rng.standard_normal(32).astype(np.float32), np.zeros(32, np.float32)
    mean, inv_std = np.zeros(32, np.float32), np.ones(32, np.float32)
    sums, dx = _traced(lambda: fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta,
                                                        True, True))
    rows = x.size // 32  # (a warp a row of 32 channels)
    # dy and x at every row; gamma, beta, mean, inv_std once a thread (8 lanes a block), and
    # the last block's sums
    assert 2 * rows < sums.load_requests < 2 * rows + 64


@pytest.mark.parametrize("channels", [32, 10])
def test_batch_norm_applies_its_channels_reading_their_values_once_a_thread(fast, rng,
                                                                            channels):
    x = rng.standard_normal((4, 8, 8, channels)).astype(np.float32)
    gamma = rng.standard_normal(channels).astype(np.float32)
    beta = np.zeros(channels, np.float32)
    running = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, apply = _traced(lambda: fast.batch_norm_train(x, gamma, beta, *running, 0.1, 1e-5,
                                                     np.float32, True))
    y, mean, inv_std = fast.batch_norm_train(x, gamma, beta, *running, 0.1, 1e-5, np.float32,
                                             True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, dx = _traced(lambda: fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, True,
                                                     True))
    # (x, and dy, coalesced at every row; the channel's values once a thread of 16 elements:
    # 1/8 more than x and y, 1/7 more than dy, x and dx; every element, 2x and 3x more)
    assert apply.scatter == dx.scatter == 1.0
    assert apply.excess < 1.2 and dx.excess < 1.2
