"""The standard (Array API) convolution ops: chunked, with reused buffers, against references."""

import array_api_compat.numpy as xpn
import array_api_strict as xs
import numpy as np
import pytest

from xpcnn.ops import im2col as ops
from xpcnn.ops import random, windows, workspace
from xpcnn.ops.kernels import StandardKernels
from xpcnn.ops.workspace import Workspace


def reference_im2col(x, kernel, strides, out_hw):
    """The tests' im2col: padded (N, H, W, C) NumPy input -> (N*Ho*Wo, kh*kw*C) patches, one
    output position at a time, columns in (kernel row, kernel column, channel) order."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, out_hw
    n, c = x.shape[0], x.shape[3]
    cols = np.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    for a in range(ho):
        for b in range(wo):
            cols[:, a, b] = x[:, a * sh : a * sh + kh, b * sw : b * sw + kw, :]
    return cols.reshape(n * ho * wo, kh * kw * c)


def reference_conv(x, w, strides, pads):
    """Direct convolution in float64 NumPy: (N, H, W, C) x (kh, kw, C, K)."""
    xpad = np.pad(x, ((0, 0), (pads[0], pads[1]), (pads[2], pads[3]), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xpad.shape[1] - kh) // strides[0] + 1
    wo = (xpad.shape[2] - kw) // strides[1] + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            win = xpad[:, i : i + strides[0] * (ho - 1) + 1 : strides[0],
                       j : j + strides[1] * (wo - 1) + 1 : strides[1], :]
            y += np.einsum("nhwc,ck->nhwk", win, w[i, j])
    return y


CASES = [  # (N, H, W, C, K, kernel, strides, padding)
    (5, 7, 6, 3, 4, (3, 3), (1, 1), "same"),
    (4, 6, 5, 2, 3, (3, 3), (1, 1), "valid"),
    (3, 7, 7, 2, 3, (3, 3), (2, 2), "same"),
    (3, 5, 6, 3, 2, (2, 3), (2, 1), 1),
    (6, 4, 3, 3, 5, (1, 1), (1, 1), "valid"),
    (3, 9, 8, 1, 2, (5, 5), (1, 1), "same"),
]


@pytest.mark.parametrize("xp", [xpn, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("budget", [None, 1, 10**9], ids=["whole", "one-image", "big"])
def test_conv_forward_matches_direct_convolution(xp, case, budget, rng):
    n, h, w, c, k, kernel, strides, padding = case
    pads = windows.resolve_padding(padding, (h, w), kernel, strides)
    out_hw = windows.output_size((h, w), kernel, strides, pads)
    x = rng.standard_normal((n, h, w, c))
    wt = rng.standard_normal((*kernel, c, k))
    bias = rng.standard_normal(k)
    ws = Workspace()
    kern = StandardKernels(xp)
    for _ in range(2):  # the second call reuses the workspace buffers
        y = ops.conv_forward(xp, kern, xp.asarray(x), xp.reshape(xp.asarray(wt), (-1, k)),
                             xp.asarray(bias), kernel, strides, pads, out_hw, ws, "cols",
                             budget)
        got = np.asarray(xp.reshape(y, (n, *out_hw, k)))
        np.testing.assert_allclose(got, reference_conv(x, wt, strides, pads) + bias, rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("xp", [xpn, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("case", [c for c in CASES if c[6] == (1, 1)])
@pytest.mark.parametrize("budget", [None, 1])
def test_input_gradient_as_convolution_matches_col2im(xp, case, budget, rng):
    n, h, w, c, k, kernel, strides, padding = case
    pads = windows.resolve_padding(padding, (h, w), kernel, strides)
    out_hw = windows.output_size((h, w), kernel, strides, pads)
    assert ops.input_grad_as_conv(pads, kernel, strides)
    wt = rng.standard_normal((*kernel, c, k))
    dy = rng.standard_normal((n, *out_hw, k))
    # reference: patch gradients scattered back by col2im
    w2t = np.transpose(wt, (3, 0, 1, 2)).reshape(k, -1)
    dcols = (dy.reshape(-1, k) @ w2t).reshape(n, *out_hw, -1)
    padded = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c)
    ref = windows.unpad(ops.col2im(xpn, dcols, padded, kernel, strides, out_hw), pads)
    ws = Workspace()
    for _ in range(2):
        stored = xp.asarray(np.transpose(wt, (3, 0, 1, 2)))  # (K, kh, kw, C)
        dx = ops.conv_input_grad(xp, StandardKernels(xp), xp.asarray(dy),
                                 ops.flipped_kernel_matrix(xp, stored), kernel, pads,
                                 (h, w), ws, "dcols", budget)
        np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-10, atol=1e-10)


PHASE_CASES = [  # (N, H, W, C, K, kernel, strides, padding): strided, odd, over-padded
    (3, 7, 7, 2, 3, (3, 3), (2, 2), "same"),
    (2, 9, 8, 3, 4, (7, 7), (2, 2), "same"),
    (2, 9, 10, 2, 3, (5, 4), (3, 2), "valid"),
    (3, 8, 9, 2, 2, (3, 3), (4, 3), "same"),  # kernel < stride: phases without taps
    (2, 6, 5, 3, 2, (1, 1), (2, 2), "valid"),
    (2, 5, 6, 2, 3, (2, 3), (2, 1), 3),  # padded beyond the kernel
    (2, 4, 4, 2, 2, (3, 3), (1, 1), 3),  # stride 1, over-padded: one phase
    (2, 2, 3, 2, 2, (5, 5), (4, 4), "same"),  # fewer inputs than strides
]


@pytest.mark.parametrize("xp", [xpn, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("case", PHASE_CASES)
@pytest.mark.parametrize("budget", [None, 1])
def test_phase_input_gradient_matches_col2im(xp, case, budget, rng):
    """The input gradient by stride phases (one window over dy, a kernel matrix with zeros
    where a phase lacks a tap) is col2im's scatter of the patch gradients, twice over one
    workspace, in chunks of one image or all at once."""
    n, h, w, c, k, kernel, strides, padding = case
    pads = windows.resolve_padding(padding, (h, w), kernel, strides)
    out_hw = windows.output_size((h, w), kernel, strides, pads)
    wt = rng.standard_normal((k, *kernel, c))  # (K, kh, kw, C)
    dy = rng.standard_normal((n, *out_hw, k))
    dcols = (dy.reshape(-1, k) @ wt.reshape(k, -1)).reshape(n, *out_hw, -1)
    padded = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c)
    ref = windows.unpad(ops.col2im(xpn, dcols, padded, kernel, strides, out_hw), pads)
    ws = Workspace()
    for _ in range(2):
        dx = ops.phase_input_grad(xp, StandardKernels(xp), xp.asarray(dy), xp.asarray(wt),
                                  kernel, strides, pads, (h, w), ws, "dphase", budget)
        np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-10, atol=1e-10)


def test_phase_input_gradient_of_inputs_no_output_reads(rng):
    """A 1x1 kernel, stride 3, 2 zeros each side of a 2x2 input: three of its four phases have
    no tap, and their inputs get a zero gradient (dx starts empty: each phase writes its own);
    the fourth input gets its one tap's."""
    pads, kernel, strides = (2, 2, 2, 2), (1, 1), (3, 3)
    out_hw = windows.output_size((2, 2), kernel, strides, pads)
    wt = rng.standard_normal((3, 1, 1, 2))
    dy = rng.standard_normal((2, *out_hw, 3))
    dx = ops.phase_input_grad(xpn, StandardKernels(xpn), dy, wt, kernel, strides, pads,
                              (2, 2), Workspace(), "d", None)
    want = np.zeros((2, 2, 2, 2))
    want[:, 1, 1, :] = dy[:, 1, 1, :] @ wt[:, 0, 0, :]  # padded input (3, 3) is output (1, 1)
    np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budget", [None, 1])
def test_weight_gradient_matches_patches_transpose_product(budget, rng):
    n, h, w, c, k = 5, 6, 5, 3, 4
    kernel, strides, pads = (3, 3), (1, 1), (1, 1, 1, 1)
    x = rng.standard_normal((n, h, w, c))
    dy = rng.standard_normal((n, h, w, k))
    cols = reference_im2col(windows.pad(xpn, x, pads), kernel, strides, (h, w))
    ref = cols.T @ dy.reshape(-1, k)
    got, bias = ops.conv_weight_grad(xpn, StandardKernels(xpn), x, dy.reshape(-1, k), kernel,
                                     strides, pads, (h, w), Workspace(), "cols", budget,
                                     with_bias=True)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(bias, dy.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_patch_chunk_loop_visits_every_image_once(rng):
    """The convolutions' one chunk loop: chunks of images in order, each with its patches
    (and ones column) and its output rows; the images per chunk returned."""
    n, h, w, c = 5, 6, 5, 3
    kernel, strides, pads = (3, 2), (2, 1), (1, 1, 0, 1)
    out_hw = windows.output_size((h, w), kernel, strides, pads)
    x = rng.standard_normal((n, h, w, c))
    want = reference_im2col(windows.pad(xpn, x, pads), kernel, strides, out_hw)
    rows = out_hw[0] * out_hw[1]
    budget = 2 * rows * want.shape[1] * 4  # two images a chunk
    seen = []

    def work(cols, n0, n1, r0, r1):
        assert (r0, r1) == (n0 * rows, n1 * rows)
        np.testing.assert_array_equal(cols[:, :-1], want[r0:r1])
        np.testing.assert_array_equal(cols[:, -1], 1.0)
        seen.append((n0, n1))

    m = ops._for_patch_chunks(xpn, StandardKernels(xpn), x, kernel, strides, pads, out_hw,
                              Workspace(), "cols", budget, 1, True, work)
    assert m == 2 and seen == [(0, 2), (2, 4), (4, 5)]


SHARED_PATCH_CASES = [  # (N, H, W, C, K, kernel, padding): stride 1, output as large as input
    (5, 6, 5, 3, 3, (3, 3), "same"),
    (4, 5, 7, 4, 2, (2, 2), "same"),  # asymmetric padding: (0, 1, 0, 1)
    (3, 7, 6, 2, 2, (5, 3), "same"),
    (2, 5, 6, 5, 3, (2, 3), "same"),  # kh != kw and C != K together: P^T @ x's layout
    (3, 5, 5, 3, 1, (3, 3), 1),
]


@pytest.mark.parametrize("xp", [xpn, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("case", SHARED_PATCH_CASES)
@pytest.mark.parametrize("budget", [None, 1, 700], ids=["whole", "one-image", "partial"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_from_the_output_gradient_patches(xp, case, budget, with_bias, rng):
    """conv_grads: kernel, bias and input gradients against the patches-transpose product, the
    sum of dy and col2im (chunks of one image, and of two with a partial last one)."""
    n, h, w, c, k, kernel, padding = case
    pads = windows.resolve_padding(padding, (h, w), kernel, (1, 1))
    assert ops.grads_share_patches(pads, kernel, (1, 1), (h, w), (h, w), c, k)
    x = rng.standard_normal((n, h, w, c))
    wt = rng.standard_normal((*kernel, c, k))
    dy = rng.standard_normal((n, h, w, k))
    cols = reference_im2col(windows.pad(xpn, x, pads), kernel, (1, 1), (h, w))
    want_dw = np.transpose((cols.T @ dy.reshape(-1, k)).reshape(wt.shape), (3, 0, 1, 2))
    w2t = np.transpose(wt, (3, 0, 1, 2)).reshape(k, -1)
    dcols = (dy.reshape(-1, k) @ w2t).reshape(n, h, w, -1)
    padded = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c)
    want_dx = windows.unpad(ops.col2im(xpn, dcols, padded, kernel, (1, 1), (h, w)), pads)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the workspace buffers
        dw, db, dx = ops.conv_grads(xp, StandardKernels(xp), xp.asarray(x), xp.asarray(dy),
                                    xp.asarray(np.transpose(wt, (3, 0, 1, 2))), pads, ws,
                                    "dcols", budget,
                                    with_bias=with_bias)
        np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-10, atol=1e-10)
        if with_bias:
            np.testing.assert_allclose(np.asarray(db), dy.sum(axis=(0, 1, 2)), rtol=1e-10)
        else:
            assert db is None


@pytest.mark.parametrize("pads, kernel, strides, in_hw, out_hw, c, k, expected", [
    ((1, 1, 1, 1), (3, 3), (1, 1), (8, 8), (8, 8), 32, 32, True),
    ((1, 1, 1, 1), (3, 3), (1, 1), (8, 8), (8, 8), 32, 64, False),  # wider dy patches
    ((0, 0, 0, 0), (3, 3), (1, 1), (8, 8), (6, 6), 32, 32, False),  # "valid"
    ((1, 1, 1, 1), (3, 3), (2, 2), (8, 8), (4, 4), 32, 32, False),  # strided
])
def test_grads_share_patches_only_where_it_pays(pads, kernel, strides, in_hw, out_hw, c, k,
                                                expected):
    assert ops.grads_share_patches(pads, kernel, strides, in_hw, out_hw, c, k) is expected


def test_workspace_reuses_and_regrows():
    ws = Workspace()
    a = ws.get(xpn, "k", (4, 3), xpn.float32, "cpu", fill=0.0)
    assert a.shape == (4, 3) and not a.any()
    assert ws.get(xpn, "k", (4, 3), xpn.float32, "cpu") is a
    part = ws.get(xpn, "k", (2, 3), xpn.float32, "cpu")  # a smaller batch: leading rows
    assert part.shape == (2, 3) and np.shares_memory(part, a)
    bigger = ws.get(xpn, "k", (6, 3), xpn.float32, "cpu")
    assert bigger.shape == (6, 3) and not np.shares_memory(bigger, a)
    other = ws.get(xpn, "k", (6, 3), xpn.float64, "cpu")
    assert other.dtype == xpn.float64


@pytest.mark.parametrize("n, per_image, budget, expected", [
    (128, 100, None, 128), (128, 100, 1000, 10), (128, 10**9, 1000, 1), (128, 1, 10**9, 16),
    (5, 1, 10**9, 1), (1, 1, 10**9, 1),
])
def test_images_per_chunk(n, per_image, budget, expected):
    assert ops.images_per_chunk(n, per_image, budget) == expected


@pytest.mark.parametrize("n, largest, workers, expected", [
    (128, 10, 2, 8),    # 13 chunks of 10 (the last run alone): 68 images; of 9: 65; of 8: 64
    (128, 5, 2, 4),     # 26 chunks of 5 and one of 3: 65; of 4: 64
    (128, 3, 2, 3),     # 2 would share out better, but is below three quarters of 3
    (128, 16, 2, 16),   # already even
    (128, 10, 1, 10),   # one worker: nothing to share
    (7, 3, 2, 3),       # 3, 3, 1 (a partial last chunk stays: 2 is below three quarters)
    (8, 4, 3, 3),       # 4, 4 leave a worker idle (4 images); 3, 3, 2 end at 3
    (100, 7, 3, 7),     # 15 chunks in 5 rounds of 3: already even
    (60, 8, 2, 6),      # 8 chunks of 8 (and 4): 32 images on the busier worker; of 6: 30
])
def test_chunks_share_out_evenly_among_workers(n, largest, workers, expected):
    budget = largest * 10
    assert ops.images_per_chunk(n, 10, budget, min_chunks=1, workers=workers) == expected


def test_im2col_into_matches_the_reference_im2col(rng):
    x = rng.standard_normal((2, 6, 7, 3))
    for kernel, strides in [((3, 3), (1, 1)), ((2, 3), (2, 1)), ((3, 2), (2, 2)), ((1, 1), (1, 1))]:
        out_hw = windows.output_size((6, 7), kernel, strides, (0, 0, 0, 0))
        out = np.empty((2, *out_hw, kernel[0] * kernel[1] * 3))
        got = ops.im2col_into(x, out, kernel, strides, out_hw).reshape(-1, out.shape[-1])
        np.testing.assert_array_equal(got, reference_im2col(x, kernel, strides, out_hw))


def test_the_im2col_module_holds_only_what_the_package_uses():
    """The whole-batch ``im2col`` was the tests' reference only (now ``reference_im2col``), and
    the thread scratch is :mod:`xpcnn.ops.workspace`'s, not im2col's to define."""
    assert not hasattr(ops, "im2col")
    for name in ("Workspace", "owner", "working_for"):
        assert getattr(workspace, name).__module__ == "xpcnn.ops.workspace"
    assert not hasattr(ops, "working_for") and not hasattr(ops, "owner")


@pytest.mark.parametrize("xp", [xpn, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("strides, out_hw", [((1, 1), (4, 5)), ((2, 3), (3, 2)), ((3, 1), (1, 1))])
def test_window_slices_are_the_window_of_each_kernel_offset(xp, strides, out_hw, rng):
    """window_slices(i, j) picks the rows and columns i + sh*a, j + sw*b of output position
    (a, b), ending right after the last one; window() is ``x`` at those slices."""
    x = rng.standard_normal((2, 9, 10, 3))
    for i, j in [(0, 0), (1, 2), (2, 0)]:
        rows, cols = windows.window_slices(i, j, out_hw, strides)
        assert (rows.start, rows.step, cols.start, cols.step) == (i, strides[0], j, strides[1])
        assert rows.stop == i + strides[0] * (out_hw[0] - 1) + 1
        assert cols.stop == j + strides[1] * (out_hw[1] - 1) + 1
        want = np.stack([np.stack([x[:, i + strides[0] * a, j + strides[1] * b]
                                   for b in range(out_hw[1])], axis=1)
                         for a in range(out_hw[0])], axis=1)
        np.testing.assert_array_equal(x[:, rows, cols, :], want)
        np.testing.assert_array_equal(
            np.asarray(windows.window(xp.asarray(x), i, j, out_hw, strides)), want)


def test_mix_is_splitmix64s_finaliser():
    """``random.mix`` (public: the fast paths derive a draw's key with it) against SplitMix64's
    finaliser on Python ints (Steele, Lea and Flood 2014)."""
    mask = (1 << 64) - 1

    def finaliser(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, 12345, (1 << 63) - 1, 1 << 63, mask, 0x9E3779B97F4A7C15]
    z = np.array(values, dtype=np.uint64).view(np.int64)
    with np.errstate(over="ignore"):
        got = random.mix(z).view(np.uint64)
    assert [int(v) for v in got] == [finaliser(v) for v in values]
