"""Where NonFiniteError says non-finite values first appear: a layer whose training-mode output
alone is non-finite is named, and the pass that finds it leaves the model as it was."""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import BatchNorm2D, Dense, Dropout, Flatten, Softmax
from xpcnn.layers.base import Layer, RandomLayer


class BatchStdScale(Layer):
    """A user's layer with training-only work: the batch divided by its standard deviation
    (infinite for a constant batch); the identity in inference."""

    def forward(self, x, training=False, options=None):
        if not training:
            return x
        self.calls = getattr(self, "calls", 0) + 1  # (a host-side counter of its own)
        self._scale = 1 / self.xp.std(x)
        return x * self._scale

    def backward(self, dy, options=None):
        return dy * self._scale


def _host_state(model):
    """Every layer's state arrays and random layer's draws, on the host, and its attributes
    (compared as objects: whether each is the one it was)."""
    def host(a):  # (a copy: NumPy's to_numpy gives the array itself)
        return np.array(model.backend.to_numpy(a), copy=True)

    arrays = {f"{la.name}.{k}": host(a) for la in model.layers for k, a in la.state.items()}
    arrays.update({f"{la.name}.random_state": host(la.random_state)
                   for la in model.layers if isinstance(la, RandomLayer)})
    attributes = {f"{la.name}.{k}": v for la in model.layers for k, v in vars(la).items()}
    return arrays, attributes


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_a_layer_non_finite_in_training_mode_alone_is_named(device, monkeypatch):
    """A constant batch: BatchNorm's training output is all zeros, which the user's layer
    scales by 1/0 in training only; its inference output is finite. The error names that
    layer (was: "the first non-finite values appear in the loss", from an inference-mode
    pass alone), and the training-mode pass that found it leaves BatchNorm's moving
    statistics, Dropout's draws and the layers' attributes as they were: their caches, their
    readiness for a backward (was: left ready, so a later backward got past its check) and a
    user's layer's own (was: its counter and its scale left as the pass set them)."""
    model = xpcnn.Sequential([BatchNorm2D(), Dropout(0.5), BatchStdScale(name="batch_std_scale"),
                              Flatten(), Dense(3), Softmax()], device=device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    x, y = np.ones((8, 4, 4, 1), np.float32), np.zeros(8, np.int64)
    seen = {}
    cls = type(model)
    real = cls._raise_non_finite

    def looked(self, *args, **kwargs):
        seen["before"] = _host_state(self)
        try:
            real(self, *args, **kwargs)
        finally:
            seen["after"] = _host_state(self)

    monkeypatch.setattr(cls, "_raise_non_finite", looked)
    with np.errstate(divide="ignore", invalid="ignore"), \
            pytest.raises(NonFiniteError, match=r"training stopped at step 1: the loss is nan; "
                          r"the first non-finite values appear in the output of layer "
                          r"'batch_std_scale' in training mode"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    (arrays, caches), (arrays_after, caches_after) = seen["before"], seen["after"]
    assert arrays.keys() == arrays_after.keys() and "dropout.random_state" in arrays
    for name, a in arrays.items():
        np.testing.assert_array_equal(arrays_after[name], a, err_msg=name)
    assert caches_after.keys() == caches.keys()
    # (the objects themselves: no batch kept for a backward that will not run, and no
    # attribute left as the pass set it)
    assert all(caches_after[k] is v for k, v in caches.items())
    assert any(k.endswith("._cache") and v is None for k, v in caches.items())
    assert caches["batch_std_scale.calls"] == 1 and "batch_std_scale._scale" in caches
    assert not any(v for k, v in caches.items() if k.endswith("._backward_ready"))
    with pytest.raises(InputError, match="needs a forward"):
        model.layers[0].backward(np.ones((8, 4, 4, 1), np.float32))


class RunningCentre(Layer):
    """A user's layer with statistics of its own: the input less a running mean of it, which
    every training pass moves in place (frozen too: it is given ``training=True``, as every
    layer in a training pass is), times a trained scale."""

    weight_names = ("w", "mean")

    def _build(self, input_shape, rng):
        self._param("w", np.ones(input_shape[-1]))
        self._param("mean", np.zeros(input_shape[-1]), trainable=False)
        return input_shape

    def forward(self, x, training=False, options=None):
        xp = self.xp
        if training:
            batch_mean = xp.astype(xp.mean(x, axis=0), self.dtype)
            self.state["mean"][...] = 0.5 * self.state["mean"] + 0.5 * batch_mean
            self._centred = x - xp.astype(self.state["mean"], x.dtype)
        else:
            self._centred = x - xp.astype(self.state["mean"], x.dtype)
        return self._centred * xp.astype(self.params["w"], x.dtype)

    def backward(self, dy, options=None):
        self.grads["w"] = self.xp.sum(dy * self._centred, axis=0)
        return dy * self.xp.astype(self.params["w"], dy.dtype)


@pytest.mark.parametrize("trainable", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("skipped", ["float16 overflow", "non-finite loss"])
def test_a_skipped_step_puts_a_user_layers_own_statistics_back_frozen_too(skipped, trainable):
    """A step the device skips (a float16 overflow, or a non-finite loss: NonFiniteError)
    leaves the state of a user's layer as it was, a frozen one's too (was: only trainable
    layers' state was put back, so a frozen one kept the skipped batch's update, infinite
    after a non-finite step, in every later prediction and checkpoint). The next good step
    moves it as usual: the layer does move its state in training while frozen."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 1.0, (8, 6)).astype(np.float32), np.arange(8) % 4
    model = xpcnn.Sequential([Dense(5), RunningCentre(name="centre", trainable=trainable),
                              Dense(4), Softmax()], seed=0)
    precision = "mixed_float16" if skipped == "float16 overflow" else "float32"
    model.compile(optimizer=xpcnn.optim.SGD(0.1), precision=precision)
    model.build((6,))
    centre = model.get_layer("centre")
    before = np.array(centre.state["mean"], copy=True)
    if skipped == "float16 overflow":
        model.loss_scale = 3e38  # (every scaled gradient overflows float16: the step is skipped)
        weights = model.get_weights()
        model.train_on_batch(x, y)
        assert model.loss_scale < 3e38  # (halved: the step was skipped, the weights kept)
        for a, b in zip(model.get_weights()[:2], weights[:2], strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        with np.errstate(over="ignore", invalid="ignore"), \
                pytest.raises(NonFiniteError, match="training stopped at step 1"):
            model.train_on_batch(np.full((8, 6), 3e37, np.float32), y)
    np.testing.assert_array_equal(centre.state["mean"], before)
    model.loss_scale = 1.0  # (a finite step, its float16 gradients held)
    model.train_on_batch(x, y)
    assert np.all(np.isfinite(centre.state["mean"])) and \
        not np.array_equal(centre.state["mean"], before)


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_train_steps_weights_are_named_only_where_they_made_the_loss_non_finite(device):
    """train_step's sample weights are checked when the host reads a step whose loss is not
    finite: a bad one is named (tests/test_sample_weights.py), good ones are not blamed for a
    NaN image, which is named as before."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], device=device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    model.build((4, 4, 1))
    x = np.ones((8, 4, 4, 1), np.float32)
    x[5, 1, 2, 0] = np.nan
    yb, wb = model.backend.asarray(np.zeros(8, np.int64)), model.backend.asarray(np.ones(8))
    model.train_step(model.backend.asarray(x), yb, sample_weight=wb)
    with pytest.raises(NonFiniteError, match=r"training stopped at step 1: the loss is nan; the "
                                             r"first non-finite values appear in the input "
                                             r"batch"):
        model._read_totals()
    wb = model.backend.asarray(np.r_[np.ones(7), -2.0])
    model.train_step(model.backend.asarray(np.ones_like(x)), yb, sample_weight=wb)
    with pytest.raises(InputError, match=r"training stopped at step 1: sample_weight must be "
                                         r"finite \(in float32\) and >= 0; sample 7 has weight "
                                         r"-2\.0 \(1 such samples\)"):
        model._read_totals()
    assert model.optimizer.iterations == 0
