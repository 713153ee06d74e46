"""Forward numerics against independent references: naive loops, and PyTorch where installed."""

import array_api_compat.numpy as xpn
import numpy as np
import pytest
from kernel_cases import recorded_scales

from xpcnn import SoftmaxCrossEntropy
from xpcnn.backend import set_fast_path
from xpcnn.layers import AvgPool2D, BatchNorm2D, Conv2D, FeatureNorm, GlobalAvgPool2D, MaxPool2D
from xpcnn.ops.kernels import StandardKernels


def naive_conv(x, k, b, stride, pads):
    """Direct definition: y[n,i,j,o] = b[o] + sum_{a,c,ch} xpad[n, i*s+a, j*s+c, ch] k[a,c,ch,o]."""
    top, bottom, left, right = pads
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, co = k.shape
    ho = (x.shape[1] - kh) // stride[0] + 1
    wo = (x.shape[2] - kw) // stride[1] + 1
    y = np.zeros((x.shape[0], ho, wo, co))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw, :]
            y[:, i, j, :] = np.tensordot(patch, k, axes=([1, 2, 3], [0, 1, 2])) + b
    return y


@pytest.mark.parametrize("kwargs, shape, pads", [
    (dict(filters=4, kernel_size=3), (7, 6, 3), (0, 0, 0, 0)),
    (dict(filters=2, kernel_size=3, padding="same"), (5, 5, 2), (1, 1, 1, 1)),
    # TensorFlow's "same" with stride 2 on an even size pads more at the bottom/right.
    (dict(filters=2, kernel_size=3, strides=2, padding="same"), (6, 6, 2), (0, 1, 0, 1)),
    (dict(filters=3, kernel_size=(2, 3), strides=(1, 2), padding=2), (4, 7, 1), (2, 2, 2, 2)),
])
def test_conv2d_matches_direct_definition(kwargs, shape, pads, rng):
    layer = Conv2D(**kwargs)
    layer.build(shape, "cpu", dtype="float64", rng=rng)
    layer.set_weights([rng.standard_normal(w.shape) for w in layer.get_weights()])
    x = rng.standard_normal((2, *shape))
    kernel, bias = layer.get_weights()
    expected = naive_conv(x, kernel, bias, layer.strides, pads)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)


def _half(name):
    """NumPy's float16, or ml_dtypes' bfloat16 (skipped without ml_dtypes)."""
    if name == "float16":
        return np.dtype(np.float16)
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


def _ulps(got, want):
    """|got - want| in units in the last place of ``got``'s dtype at ``want`` (subnormals' unit
    below the smallest normal number)."""
    info = (np.finfo if got.dtype == np.float16 else _bfloat16_info)(got.dtype)
    _, e = np.frexp(np.abs(want))
    exponent = np.maximum(e - 1, np.log2(float(info.smallest_normal)))
    return np.abs(got.astype(np.float64) - want) / np.ldexp(1.0, exponent.astype(int) - info.nmant)


def _bfloat16_info(dtype):
    return pytest.importorskip("ml_dtypes").finfo(dtype)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("size, stride, pad", [(2, 2, 0), (3, 2, "same"), (3, 1, 1)])
def test_avg_pool_in_half_precision_rounds_once(half, size, stride, pad, rng):
    """Mixed precision's float16 (or bfloat16) windows are summed and divided in float32, then
    rounded once: within half a unit in the last place of the exact mean (and float32's
    rounding, 2**-13 of a float16 unit at most), forward and backward (overlapping windows'
    shares too). Summed in the half type, values of mixed magnitudes (positive: a ReLU's
    output) were up to 5 units off."""
    dtype = _half(half)
    layer, exact = AvgPool2D(size, stride, padding=pad), AvgPool2D(size, stride, padding=pad)
    layer.build((9, 8, 3), "cpu", dtype="float32")
    exact.build((9, 8, 3), "cpu", dtype="float64")
    x = (np.abs(rng.standard_normal((4, 9, 8, 3))) * 10.0 ** rng.uniform(-2, 2, (4, 9, 8, 3))
         ).astype(dtype)
    y = layer.forward(x, training=True)
    want = exact.forward(x.astype(np.float64), training=True)
    assert y.dtype == dtype
    assert _ulps(y, want).max() <= 0.501
    dy = (np.abs(rng.standard_normal(y.shape)) * 10.0 ** rng.uniform(-2, 2, y.shape)
          ).astype(dtype)
    dx, want = layer.backward(dy), exact.backward(dy.astype(np.float64))
    assert dx.dtype == dtype
    assert _ulps(dx, want).max() <= 0.501


@pytest.fixture(params=[False, True], ids=["standard", "numpy"])
def fast(request):
    """The standard path, then the NumPy fast path (for layers built after the switch)."""
    old = set_fast_path(request.param)
    yield request.param
    set_fast_path(old)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("make", [
    lambda: MaxPool2D(3, 1, padding="same"), lambda: MaxPool2D((2, 3), (1, 2)),
    lambda: Conv2D(4, 3, 2, padding="same"), lambda: Conv2D(4, (3, 2), (1, 2), padding=2),
], ids=["maxpool_3_1_same", "maxpool_2x3_1x2", "conv_3_2_same", "conv_3x2_1x2_pad2"])
def test_overlapping_input_gradients_in_half_precision_round_once(half, make, fast, rng):
    """Mixed precision's input gradient where windows overlap: a max pool's shares of each
    input, a strided convolution's taps (their products too) summed in float32, then rounded
    once: within half a unit in the last place of the exact gradient of the same float16 (or
    bfloat16) inputs and weights (positive values: float32's rounding stays far below that
    unit). Summed in the half type (the taps' products rounded to it first), up to 1.7 units
    off here (hundreds with values of both signs)."""
    dtype = _half(half)
    layer, exact = make(), make()
    layer.build((9, 8, 3), "cpu", dtype="float32", compute_dtype=half, rng=rng)
    exact.build((9, 8, 3), "cpu", dtype="float64", rng=rng)
    weights = [np.abs(w).astype(dtype).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    exact.set_weights(weights)
    x = (np.abs(rng.standard_normal((4, 9, 8, 3))) * 10.0 ** rng.uniform(-2, 2, (4, 9, 8, 3))
         ).astype(dtype)
    y = layer.forward(x, training=True)
    exact.forward(x.astype(np.float64), training=True)
    dy = (np.abs(rng.standard_normal(y.shape)) * 10.0 ** rng.uniform(-2, 2, y.shape)
          ).astype(dtype)
    dx, want = layer.backward(dy), exact.backward(dy.astype(np.float64))
    assert dx.dtype == dtype
    assert _ulps(dx, want).max() <= 0.501


def test_big_endian_float64_is_pooled_in_float64(fast, rng):
    """A big-endian float64 batch pools as its native copy does: averaged in float64 (its
    dtype is not equal to float64: the accumulator was float32, 3e-8 off), a max pool's
    gradient in native bytes (the fast path's was allocated big-endian, then written with a
    copy of native bytes: values like 6e285)."""
    x = rng.standard_normal((2, 4, 4, 3))
    big = x.astype(">f8")
    for layer in (MaxPool2D(2), MaxPool2D(3, 1, "same"), AvgPool2D(2), GlobalAvgPool2D()):
        layer.build((4, 4, 3), "cpu", dtype="float64")
        y = layer.forward(x, training=True)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
        np.testing.assert_array_equal(layer.forward(big, training=True), y)
        np.testing.assert_array_equal(layer.backward(dy.astype(">f8")), dx)


try:  # (the tests above run without it; those below skip)
    import torch
except ImportError:
    torch = None
F = None if torch is None else torch.nn.functional
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@needs_torch
@pytest.mark.parametrize("stride, padding, torch_padding", [
    (1, "same", 1), (1, "valid", 0), (2, 1, 1), (3, 2, 2)])
def test_conv2d_matches_pytorch(stride, padding, torch_padding, rng):
    layer = Conv2D(5, 3, strides=stride, padding=padding)
    layer.build((9, 9, 3), "cpu", dtype="float64", rng=rng)
    kernel, bias = layer.get_weights()
    bias = rng.standard_normal(bias.shape)
    layer.set_weights([kernel, bias])
    x = rng.standard_normal((2, 9, 9, 3))
    ref = F.conv2d(nchw(x), torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1)).copy()),
                   torch.from_numpy(bias), stride=stride, padding=torch_padding)
    np.testing.assert_allclose(layer.forward(x), nhwc(ref), rtol=1e-10, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("size, stride, pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_pooling_matches_pytorch(size, stride, pad, rng):
    x = rng.standard_normal((2, 7, 6, 3))
    maxp = MaxPool2D(size, stride, padding=pad)
    maxp.build((7, 6, 3), "cpu", dtype="float64")
    ref = F.max_pool2d(nchw(x), size, stride, padding=pad)
    np.testing.assert_allclose(maxp.forward(x), nhwc(ref))
    avgp = AvgPool2D(size, stride, padding=pad)
    avgp.build((7, 6, 3), "cpu", dtype="float64")
    ref = F.avg_pool2d(nchw(x), size, stride, padding=pad, count_include_pad=False)
    np.testing.assert_allclose(avgp.forward(x), nhwc(ref), rtol=1e-12)


@needs_torch
def test_maxpool_gradient_routing_matches_pytorch_on_ties(rng):
    x = rng.integers(0, 3, (2, 6, 6, 2)).astype(np.float64)  # many ties
    layer = MaxPool2D(3, 2)
    layer.build((6, 6, 2), "cpu", dtype="float64")
    layer.forward(x, training=True)
    dy = rng.standard_normal((2, 2, 2, 2))
    t = nchw(x).requires_grad_()
    F.max_pool2d(t, 3, 2).backward(nchw(dy))
    np.testing.assert_allclose(layer.backward(dy), nhwc(t.grad))


@needs_torch
def test_normalisations_match_pytorch(rng):
    x = rng.standard_normal((4, 5, 6, 3)) * 2 + 1
    fn = FeatureNorm(eps=1e-5)
    fn.build((5, 6, 3), "cpu", dtype="float64")
    ref = F.instance_norm(nchw(x), eps=1e-5)
    np.testing.assert_allclose(fn.forward(x), nhwc(ref), rtol=1e-10, atol=1e-12)

    bn = BatchNorm2D(momentum=0.1)
    bn.build((5, 6, 3), "cpu", dtype="float64")
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    bn.set_weights([gamma, beta, np.zeros(3), np.ones(3)])
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ref = F.batch_norm(nchw(x), rm, rv, torch.from_numpy(gamma), torch.from_numpy(beta),
                       training=True, momentum=0.1, eps=1e-5)
    np.testing.assert_allclose(bn.forward(x, training=True), nhwc(ref), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.state["moving_mean"], rm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.state["moving_variance"], rv.numpy(), rtol=1e-12)


@needs_torch
def test_cross_entropy_matches_pytorch(rng):
    z = rng.standard_normal((6, 5)) * 4
    y = rng.integers(0, 5, 6)
    for smoothing in (0.0, 0.2):
        value, grad = SoftmaxCrossEntropy(smoothing).forward(xpn, z, y, np.float64)
        t = torch.from_numpy(z).requires_grad_()
        ref = F.cross_entropy(t, torch.from_numpy(y), label_smoothing=smoothing)
        ref.backward()
        assert float(value) == pytest.approx(ref.item(), rel=1e-12)
        np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("one_hot", [False, True])
def test_cross_entropy_with_the_correct_count(rng, one_hot):
    """[loss, correct count] and the gradient against PyTorch and a count by hand; ties go to
    the first maximum, as argmax does."""
    z = rng.integers(0, 3, (40, 4)).astype(np.float64)  # many tied maxima
    y = rng.integers(0, 4, 40)
    first_max = np.array([next(c for c in range(4) if row[c] == row.max()) for row in z])
    targets = np.eye(4)[y] if one_hot else y
    for smoothing in (0.0, 0.1):
        loss = SoftmaxCrossEntropy(smoothing)
        stats, grad = loss.forward_with_accuracy(xpn, z, targets, np.float64, StandardKernels(xpn))
        t = torch.from_numpy(z).requires_grad_()
        ref = F.cross_entropy(t, torch.from_numpy(y), label_smoothing=smoothing)
        ref.backward()
        assert stats.shape == (2,) and stats.dtype == np.float64
        assert stats[0] == pytest.approx(ref.item(), rel=1e-12)
        assert stats[1] == np.sum(first_max == y)
        np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("fast", [False, True], ids=["standard", "numpy"])
def test_float16_logits_and_labels_give_a_float32_loss_and_scaled_gradient(rng, fast):
    """Under mixed_float16 the logits come in float16, and the loss and its gradient are
    computed from them cast to float32 (the kernels cast them: on a GPU in the same launch),
    the gradient times the loss scale: PyTorch's float32 cross-entropy of the same logits, the
    gradient then given in the logits' float16 (to its rounding)."""
    from xpcnn.ops.fast_numpy import NumpyKernels

    kernels = NumpyKernels() if fast else StandardKernels(xpn)
    z = (rng.standard_normal((12, 5)) * 4).astype(np.float16)
    y = rng.integers(0, 5, 12)
    scale = np.array([2.0**10, 3.0], np.float32)  # (the loss-scaling state: scale first)
    for smoothing in (0.0, 0.1):
        stats, grad = SoftmaxCrossEntropy(smoothing).forward_with_accuracy(
            xpn, z, y, np.float32, kernels, scale)
        assert stats.dtype == np.float32 and grad.dtype == np.float16
        t = torch.from_numpy(z.astype(np.float32)).requires_grad_()
        ref = F.cross_entropy(t, torch.from_numpy(y), label_smoothing=smoothing)
        ref.backward()
        assert stats[0] == pytest.approx(ref.item(), rel=1e-6)
        assert stats[1] == np.sum(np.argmax(z, axis=1) == y)
        np.testing.assert_allclose(grad, t.grad.numpy() * scale[0], rtol=2**-11 + 1e-5,
                                   atol=1e-5)


# Softmax cross-entropy where a non-target logit is -inf, or so far below the row's maximum that
# z - max overflows float32: its probability is 0 and its 0 * log(0) term 0, as in PyTorch (it
# was NaN); a +inf or NaN logit still makes the loss non-finite (the step is then skipped).
FAR_LOGITS = [(np.array([[-np.inf, 0.0, 1.0], [0.5, -np.inf, -np.inf]]), [2, 0], np.float64),
              (np.array([[3e38, -3e38, 0.0], [-3e38, 1.0, 3e38]], np.float32), [0, 2],
               np.float32)]


@needs_torch
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("z, y, dtype", FAR_LOGITS, ids=["-inf", "overflowing"])
@pytest.mark.parametrize("fast", [False, True], ids=["standard", "numpy"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["labels", "one-hot"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_of_a_logit_of_probability_zero_is_finite(z, y, dtype, fast, one_hot,
                                                                smoothing):
    from xpcnn.ops.fast_numpy import NumpyKernels

    kernels = NumpyKernels() if fast else StandardKernels(xpn)
    y = np.array(y)
    t = torch.from_numpy(z).requires_grad_()
    ref = F.cross_entropy(t, torch.from_numpy(y), label_smoothing=smoothing)
    ref.backward()
    targets = np.eye(3)[y] if one_hot else y
    stats, grad = SoftmaxCrossEntropy(smoothing).forward_with_accuracy(xpn, z, targets, dtype,
                                                                       kernels)
    if not smoothing:  # (smoothing puts a share of the target on the -inf logit: +inf)
        assert np.isfinite(stats[0]) and np.isfinite(ref.item())
    assert float(stats[0]) == pytest.approx(ref.item(), rel=1e-6, abs=1e-12)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-6, atol=1e-12)
    # the loss without the count (weighted too) is the same
    for weights in (None, np.ones(2)):
        value, g = SoftmaxCrossEntropy(smoothing).forward(xpn, z, targets, dtype, weights)
        assert float(value) == pytest.approx(ref.item(), rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 2], ids=["non-target", "target"])
def test_cross_entropy_of_a_positive_infinite_or_nan_logit_is_not_finite(bad, where):
    z = np.array([[1.0, -np.inf, 0.0]])
    z[0, where] = bad
    for kernels in (StandardKernels(xpn), None):
        loss = SoftmaxCrossEntropy()
        stats = (loss.forward_with_accuracy(xpn, z, np.array([2]), np.float64, kernels)[0][0]
                 if kernels else loss.forward(xpn, z, np.eye(3)[[2]], np.float64)[0])
        assert not np.isfinite(stats)


# (the backward of an empty batch takes means over nothing, of which nothing is kept)
@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 4), (0, 4), (0, 6, 6, 4)])
@pytest.mark.parametrize("kind", ["standard", "strict", "numpy"])
def test_batch_norm_of_fewer_than_two_values_a_channel_leaves_the_running_statistics(shape,
                                                                                    kind):
    """The unbiased variance of one value is undefined (PyTorch refuses such a training batch;
    an empty one leaves its running statistics): normalised with the batch's statistics, the
    running ones left bit for bit (-0.0 too), the gradients finite."""
    import array_api_strict as xs

    from xpcnn.ops.fast_numpy import NumpyKernels

    xp = xs if kind == "strict" else xpn
    kernels = NumpyKernels() if kind == "numpy" else StandardKernels(xp)
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    gamma, beta = (xp.asarray(rng.standard_normal(4).astype(np.float32)) for _ in range(2))
    mean0 = np.array([-0.0, 0.5, -2.0, 3.0], np.float32)
    var0 = np.array([1.0, 0.25, 4.0, 0.0], np.float32)
    moving_mean, moving_var = xp.asarray(mean0.copy()), xp.asarray(var0.copy())
    y, mean, inv_std = kernels.batch_norm_train(x, gamma, beta, moving_mean, moving_var, 0.1,
                                                1e-5, np.float32 if xp is xpn else xs.float32,
                                                False)
    assert np.asarray(moving_mean).tobytes() == mean0.tobytes()
    assert np.asarray(moving_var).tobytes() == var0.tobytes()
    assert y.shape == shape and np.isfinite(np.asarray(mean)).all()
    if shape[0]:  # (one value a channel: it is the mean, and z is beta)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), np.asarray(beta)[None])
    dx, dgamma, dbeta = kernels.batch_norm_backward(xp.ones_like(x), x, mean, inv_std, gamma,
                                                    beta, False, True)
    assert dx.shape == shape and dgamma.shape == dbeta.shape == (4,)
    for a in (dx, dgamma, dbeta):
        assert np.isfinite(np.asarray(a)).all()


@needs_torch
def test_batch_norm_of_two_values_a_channel_moves_the_running_statistics_as_pytorch():
    x = np.array([[1.0, -3.0], [2.0, 5.0]])
    moving_mean, moving_var = np.zeros(2), np.ones(2)
    StandardKernels(xpn).batch_norm_train(x, np.ones(2), np.zeros(2), moving_mean, moving_var,
                                          0.1, 1e-5, np.float64, False)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    F.batch_norm(torch.from_numpy(x), rm, rv, training=True, momentum=0.1, eps=1e-5)
    np.testing.assert_allclose(moving_mean, rm.numpy(), rtol=1e-15)
    np.testing.assert_allclose(moving_var, rv.numpy(), rtol=1e-15)


def test_a_fits_last_batch_of_one_sample_leaves_batch_norms_running_statistics():
    """65 samples at batch_size 64 (a last batch of one, after a Dense layer) move the running
    statistics as the first 64 alone do (they shrank every variance by 10%)."""
    import xpcnn
    from xpcnn.layers import Dense, ReLU

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((65, 8)) * 3).astype(np.float32)
    y = rng.integers(0, 3, 65)
    got = []
    for n in (64, 65):
        m = xpcnn.Sequential([Dense(4), BatchNorm2D(), ReLU(), Dense(3)], input_shape=(8,),
                             seed=0)
        m.compile(optimizer=xpcnn.optim.SGD(0.0), metrics=[])  # (only the statistics move)
        m.fit(x[:n], y[:n], epochs=1, batch_size=64, verbose=0, shuffle=False)
        got.append(m.layers[1].get_weights()[2:])
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0][1], np.ones(4))  # (the first batch moved them)


@pytest.mark.parametrize("shape", [(0, 6, 6, 2), (0, 3)])
def test_flatten_of_an_empty_batch(shape):
    """As PyTorch's flatten(1): (0, 6, 6, 2) -> (0, 72) (NumPy refused its reshape to (0, -1))."""
    from xpcnn.layers import Flatten

    f = Flatten()
    f.build(shape[1:], "cpu")
    x = np.zeros(shape, np.float32)
    y = f.forward(x, training=True)
    assert y.shape == (shape[0], int(np.prod(shape[1:])))
    assert f.backward(np.zeros(y.shape, np.float32)).shape == shape


def test_the_loss_scale_never_doubles_to_infinity():
    """At the largest float32 power of two, GROWTH_INTERVAL good steps leave the scale there
    (doubled it was inf, and every later step's gradients inf or NaN: no update ever again),
    as PyTorch's GradScaler; the good-step count starts again all the same. Below, it doubles."""
    from xpcnn.ops.step_record import GROWTH_INTERVAL, cleared

    kernels = StandardKernels(xpn)
    for scale, want in [(2.0**127, 2.0**127), (2.0**126, 2.0**127), (3.0 * 2.0**126, None)]:
        scaling = np.array([scale, GROWTH_INTERVAL - 1], np.float32)
        state = np.array([0.0, 0.0, *cleared(1)])
        grad = np.array([1.0, 2.0], np.float32)
        apply = kernels.record_step(state, np.array([0.5, 1.0], np.float32), [grad], 4.0, 1,
                                    scaling, False)
        assert bool(apply) and np.isfinite(scaling).all()
        assert scaling[0] == (scale if want is None else want) and scaling[1] == 0
    grad[0] = np.inf  # an overflow there still halves it
    assert not bool(kernels.record_step(state, np.array([0.5, 1.0], np.float32), [grad], 4.0,
                                        2, scaling, False))
    assert scaling[0] == np.float32(1.5 * 2.0**126)


@pytest.mark.parametrize("strict", [False, True])
def test_the_loss_scale_halves_below_one_as_pytorchs_grad_scaler(strict):
    """An overflow halves the scale below 1 too (a step skipped, no error), as PyTorch's
    GradScaler (backoff 0.5) and Keras 3's LossScaleOptimizer do: heavy sample weights can make
    float16 gradients overflow at a scale of 1 (it stopped there, an error, before)."""
    torch = pytest.importorskip("torch")
    import array_api_strict

    xp = array_api_strict if strict else xpn
    overflows = [True, True, False, True, True, False, False, True]
    scales, applied, errors = recorded_scales(StandardKernels(xp), xp, 1.0, overflows)
    param = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, backoff_factor=0.5,
                                  growth_interval=2000)
    want = []
    for bad in overflows:
        opt.zero_grad()
        scaler.scale(param.sum()).backward()
        if bad:
            param.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        want.append(scaler.get_scale())
    assert scales == want == [0.5, 0.25, 0.25, 0.125, 0.0625, 0.0625, 0.0625, 0.03125]
    assert applied == [not bad for bad in overflows] and not any(errors)


@pytest.mark.parametrize("strict", [False, True])
def test_the_loss_scale_halves_down_to_float32s_smallest_normal_then_errs(strict):
    """The floor is float32's smallest normal number, the loss_scale setter's and a
    checkpoint's lower end (a scale of 0 would skip every step; PyTorch's has no floor and
    reaches 0): a scale that halves below it is set to it, and an overflow at the floor is
    an error that keeps the scale."""
    import array_api_strict

    from xpcnn.totals import SCALE_RANGE

    xp = array_api_strict if strict else xpn
    floor = float(np.finfo(np.float32).smallest_normal)
    assert floor == SCALE_RANGE[0]
    kernels = StandardKernels(xp)
    scales, applied, errors = recorded_scales(kernels, xp, 4 * floor, [True, True, True])
    assert scales == [2 * floor, floor, floor]
    assert applied == [False, False, False] and errors == [False, False, True]
    scales, _, errors = recorded_scales(kernels, xp, 1.5 * floor, [True, True])
    assert scales == [floor, floor] and errors == [False, True]


def test_heavy_sample_weights_train_in_mixed_float16_below_a_scale_of_one():
    """Sample weights of 1e6 make the float16 gradients overflow at a scale of 1 (float32
    trains on them): the steps that overflow are skipped, the scale halves to 1/8, and
    training goes on, to the same weights on NumPy's fast path and the standard one."""
    import xpcnn
    from xpcnn import layers as L

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 2)).astype(np.float32), np.arange(8) % 4
    runs = []
    for fast in (True, False):
        old = set_fast_path(fast)
        try:
            model = xpcnn.Sequential([L.Conv2D(8, 3), L.ReLU(), L.Flatten(), L.Dense(4)],
                                     input_shape=(6, 6, 2), seed=0)
            model.compile(optimizer=xpcnn.optim.Adam(1e-3), precision="mixed_float16")
            before = model.get_weights()
            model.loss_scale = 1.0
            history = model.fit(x, y, sample_weight=np.full(8, 1e6), batch_size=4, epochs=3,
                                verbose=0, shuffle=False)
        finally:
            set_fast_path(old)
        # (steps 1-3 overflow and are skipped; the loss falls once steps apply)
        assert model.loss_scale == 0.125 and model.optimizer.iterations == 6
        assert history.history["loss"][-1] < history.history["loss"][0]
        assert not any(np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                              strict=True))
        runs.append(model.get_weights())
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fast", [True, False])
def test_global_average_pooling_gradient_of_a_large_float16_map(fast):
    """dy / (H * W) divided in float32 and rounded once: float16's 256 * 256 is inf, which
    made every share of the gradient 0."""
    set_fast_path(fast)
    try:
        layer = GlobalAvgPool2D()
        layer.build((256, 256, 1))
        layer.forward(np.ones((1, 256, 256, 1), np.float16), training=True)
        dx = layer.backward(np.full((1, 1), 3, np.float16))
    finally:
        set_fast_path(True)
    assert dx.dtype == np.float16 and dx.shape == (1, 256, 256, 1)
    np.testing.assert_array_equal(dx, np.float16(3 / 65536))


@pytest.mark.parametrize("shape", [(128, 28, 28, 4), (100_000, 2)])
def test_standard_batch_norm_statistics_of_data_far_from_zero(shape):
    """float32 data 1e4 + N(0, 1): the standard path's mean over the outer axes was one running
    float32 sum (a variance of 56 where it is 1; the mean off by 7 standard deviations); shifted
    by the first position's values, both are within float32's reach of float64's."""
    import array_api_strict as xs

    x = (np.random.default_rng(0).standard_normal(shape) + 1e4).astype(np.float32)
    c = shape[-1]
    x64 = x.astype(np.float64).reshape(-1, c)
    for xp, to in ((xpn, np.asarray), (xs, np.asarray)):
        ones, zeros = xp.ones(c, dtype=xp.float32), xp.zeros(c, dtype=xp.float32)
        _, mean, inv_std = StandardKernels(xp).batch_norm_train(
            xp.asarray(x), ones, zeros, xp.zeros(c, dtype=xp.float32),
            xp.ones(c, dtype=xp.float32), 0.1, 1e-5, xp.float32, False)
        var = 1 / to(inv_std).astype(np.float64) ** 2 - 1e-5
        np.testing.assert_allclose(to(mean), x64.mean(axis=0), rtol=1e-7)
        np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-3)
