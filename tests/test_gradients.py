"""Every layer's input and parameter gradients against central finite differences in float64."""

import array_api_compat.numpy as xpn
import numpy as np
import pytest
from gradcheck import assert_close, check_layer, numeric_grad, sample_indices

from xpcnn import Sequential, SoftmaxCrossEntropy
from xpcnn.layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    Normalization,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.layers.base import Options
from xpcnn.ops import kernels


@pytest.mark.parametrize("kwargs, shape", [
    (dict(filters=4, kernel_size=3), (7, 6, 3)),
    (dict(filters=3, kernel_size=3, padding="same"), (5, 7, 2)),
    (dict(filters=3, kernel_size=3, strides=2, padding="same"), (7, 7, 2)),
    (dict(filters=2, kernel_size=(2, 3), strides=(2, 1), padding=1), (5, 6, 3)),
    (dict(filters=5, kernel_size=1), (4, 3, 3)),
    (dict(filters=2, kernel_size=5, strides=3, padding="valid", use_bias=False), (11, 9, 1)),
    (dict(filters=3, kernel_size=4, strides=2, padding="same"), (9, 8, 2)),
    (dict(filters=3, kernel_size=3, padding="same", activation="relu"), (5, 4, 2)),
    # "same", stride 1, at least as many input channels as filters: ops.conv_grads
    (dict(filters=2, kernel_size=3, padding="same"), (5, 6, 3)),
    (dict(filters=3, kernel_size=2, padding="same", use_bias=False), (4, 5, 3)),
    (dict(filters=2, kernel_size=(5, 3), padding="same", activation="relu"), (6, 5, 2)),
    (dict(filters=2, kernel_size=(2, 3), padding="same"), (4, 5, 3)),  # kh != kw, C != K
])
def test_conv2d(kwargs, shape, rng):
    check_layer(Conv2D(**kwargs), shape, rng)


@pytest.mark.parametrize("layer, shape", [
    (Dense(5), (7,)),
    (Dense(3, use_bias=False), (4,)),
    (Dense(6, activation="relu"), (5,)),
    (Dense(4, activation="softmax"), (5,)),  # (alone: probabilities, as Dense then Softmax)
    (Flatten(), (3, 2, 4)),
    (ReLU(), (4, 5, 3)),
    (ReLU(max_value=0.5), (4, 5, 3)),
    (Softmax(), (6,)),
    (FeatureNorm(), (5, 4, 3)),
    (FeatureNorm(eps=1e-3), (3, 3, 2)),
    (BatchNorm2D(), (4, 3, 2)),
    (BatchNorm2D(), (6,)),
    (GlobalAvgPool2D(), (3, 5, 4)),
    (Rescaling(0.5, 1.0), (3, 3, 2)),
    (Normalization([0.1, -0.2], [2.0, 0.5]), (3, 3, 2)),
])
def test_layer(layer, shape, rng):
    check_layer(layer, shape, rng, batch=3)


@pytest.mark.parametrize("cls, kwargs, shape", [
    (MaxPool2D, dict(pool_size=2), (6, 6, 3)),
    (MaxPool2D, dict(pool_size=2), (7, 5, 2)),  # odd sizes drop the last row/column
    (MaxPool2D, dict(pool_size=3, strides=2), (7, 7, 2)),  # overlapping windows
    (MaxPool2D, dict(pool_size=3, strides=2, padding="same"), (6, 5, 2)),
    (MaxPool2D, dict(pool_size=(2, 3), strides=1, padding=1), (4, 5, 1)),
    (AvgPool2D, dict(pool_size=2), (5, 6, 3)),
    (AvgPool2D, dict(pool_size=3, strides=2, padding="same"), (7, 6, 2)),
    (AvgPool2D, dict(pool_size=3, strides=1, padding=1), (4, 4, 1)),
])
def test_pooling(cls, kwargs, shape, rng):
    check_layer(cls(**kwargs), shape, rng, batch=2)


def test_relu_ceiling_blocks_gradient_above_max(rng):
    layer = ReLU(max_value=1.0)
    layer.build((4,), "cpu", dtype="float64")
    x = np.array([[-1.0, 0.5, 1.5, 0.9]])
    assert np.array_equal(layer.forward(x, training=True), [[0.0, 0.5, 1.0, 0.9]])
    assert np.array_equal(layer.backward(np.ones((1, 4))), [[0.0, 1.0, 0.0, 1.0]])


def test_maxpool_ties_send_gradient_to_first_maximum():
    layer = MaxPool2D(2)
    layer.build((2, 2, 1), "cpu", dtype="float64")
    x = np.ones((1, 2, 2, 1))
    layer.forward(x, training=True)
    dx = layer.backward(np.full((1, 1, 1, 1), 3.0))
    assert dx[0, :, :, 0].tolist() == [[3.0, 0.0], [0.0, 0.0]]


def test_dropout_gradient_replays_mask(rng):
    layer = Dropout(0.4)
    layer.build((5, 4, 3), "cpu", dtype="float64", rng=rng)
    seed = layer.seed
    dx = check_layer(layer, (5, 4, 3), rng, reset=lambda: layer.set_random_state(seed, 0))
    assert np.mean(dx == 0) > 0.2  # some units really were dropped


def test_batchnorm_eval_uses_running_statistics(rng):
    layer = BatchNorm2D(momentum=0.5)
    layer.build((2, 2, 3), "cpu", dtype="float64")
    x = rng.standard_normal((8, 2, 2, 3)) * 3 + 2
    layer.forward(x, training=True)
    mean = x.reshape(-1, 3).mean(0)
    var = x.reshape(-1, 3).var(0, ddof=1)
    np.testing.assert_allclose(layer.state["moving_mean"], 0.5 * mean)
    np.testing.assert_allclose(layer.state["moving_variance"], 0.5 + 0.5 * var)
    y = layer.forward(x, training=False)
    expected = (x - 0.5 * mean) / np.sqrt(0.5 + 0.5 * var + 1e-5)
    np.testing.assert_allclose(y, expected)


@pytest.mark.parametrize("shape", [(4, 3, 2), (6,)])
@pytest.mark.parametrize("trainable", [True, False], ids=["batch-statistics", "frozen"])
@pytest.mark.parametrize("relu", [False, True], ids=["alone", "relu-fused"])
def test_batchnorm_with_and_without_its_relu_fused(shape, trainable, relu, rng):
    """BatchNorm2D's gradients with its batch's statistics and frozen (the running ones, as in
    Keras), alone and with the ReLU() after it fused (the plan's fused_relu: backward
    recomputes where the ReLU passed from the input): against finite differences."""
    layer = BatchNorm2D()
    layer.build(shape, "cpu", dtype="float64", rng=rng)
    c = shape[-1]
    layer.params["beta"][...] = rng.standard_normal(c)  # (ReLU cuts some, not all)
    layer.state["moving_mean"][...] = rng.standard_normal(c)
    layer.state["moving_variance"][...] = rng.random(c) + 0.5
    layer.trainable = trainable
    check_layer(layer, shape, rng, batch=5, options=Options(fused_relu=relu))
    y = layer.forward(rng.standard_normal((5, *shape)), training=False,
                      options=Options(fused_relu=relu))
    assert (np.min(y) == 0.0) == relu  # (the ReLU cut some outputs: some gradients too)


def test_batchnorm_first_in_a_model_computes_only_its_parameter_gradients(rng, monkeypatch):
    """Nothing before it needs a gradient (the plan says need_input_grad=False): backward
    returns None without computing the input gradient, and gives gamma and beta the
    gradients it gives when it computes one."""
    model = Sequential([BatchNorm2D(), Conv2D(3, 2), Flatten(), Dense(4), Softmax()],
                       input_shape=(5, 4, 2), dtype="float64", seed=3)
    model.compile(optimizer="sgd")
    bn = model.layers[0]
    options = model._plan().options(bn)
    assert not options.need_input_grad
    x = rng.standard_normal((6, 5, 4, 2))
    dy = rng.standard_normal(x.shape)
    bn.forward(x, training=True)
    assert bn.backward(dy).shape == x.shape  # (by itself: the input gradient too)
    want = {k: np.array(g) for k, g in bn.grads.items()}
    calls = []
    monkeypatch.setattr(kernels, "standardize_backward", lambda *a: calls.append(a))
    bn.forward(x, training=True, options=options)
    assert bn.backward(dy, options) is None and not calls
    assert set(bn.grads) == set(want) == {"gamma", "beta"}
    for k, g in want.items():
        np.testing.assert_array_equal(bn.grads[k], g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample-weights"])
def test_softmax_cross_entropy(smoothing, one_hot, weighted, rng):
    """The mean cross-entropy, or with sample weights sum(w_i * l_i) / N (Keras' sum over
    batch size), and its gradient against finite differences, in float64."""
    loss = SoftmaxCrossEntropy(label_smoothing=smoothing)
    n = 6 if weighted else 5
    z = rng.standard_normal((n, 4)) * 3
    labels = rng.integers(0, 4, n)
    y = np.eye(4)[labels] if one_hot else labels
    w = rng.uniform(0.0, 2.0, n) if weighted else None
    value, grad = loss.forward(xpn, z, y, np.float64, w)

    t = np.eye(4)[labels] * (1 - smoothing) + smoothing / 4
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    rows = 1.0 if w is None else w[:, None]
    assert float(value) == pytest.approx(-(rows * t * logp).sum() / n, rel=1e-12)

    def f():
        return float(loss.forward(xpn, z, y, np.float64, w)[0])

    for idx in sample_indices(z.shape, 24 if weighted else 20, rng):
        assert_close(grad[idx], numeric_grad(f, z, idx), f"dloss/dz{idx}")


def test_cross_entropy_is_stable_for_huge_logits():
    loss = SoftmaxCrossEntropy()
    z = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]])
    value, grad = loss.forward(xpn, z, np.array([0, 0]), np.float64)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert float(value) == pytest.approx(1e5 / 2)


def _small_net():
    return [Conv2D(3, 3, strides=2, padding="same"), ReLU(max_value=2.0), FeatureNorm(),
            Conv2D(4, 2), BatchNorm2D(), ReLU(), MaxPool2D(2), Flatten(), Dense(6), ReLU(),
            Dense(3), Softmax()]


def test_whole_model_gradients_match_finite_differences(rng):
    """The fused softmax + cross-entropy and the chain of every layer, end to end."""
    model = Sequential(_small_net(), input_shape=(9, 8, 2), dtype="float64", seed=3)
    model.compile(optimizer="sgd")
    x = rng.standard_normal((4, 9, 8, 2))
    y = np.array([0, 2, 1, 2])
    xp = model.backend.xp

    def loss_value():
        return float(model.loss.forward(xp, model._logits(x, True), y, xp.float64)[0])

    logits = model._logits(x, True)
    _, dz = model.loss.forward(xp, logits, y, xp.float64)
    model._backward(dz)
    for layer in model.layers:
        for name, p in layer.params.items():
            g = np.array(layer.grads[name])
            for idx in sample_indices(p.shape, 6, rng):
                assert_close(g[idx], numeric_grad(loss_value, p, idx), f"{layer.name}.{name}")
