"""Input validation at the public boundary: every bad argument is a clear xpcnn error, raised
before any work starts, that says what was expected and what was given; non-finite values in data,
weights, gradients or the learning rate stop training with NonFiniteError naming where."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from nets import every_layer_net, four_class_data, four_class_model, four_class_net

import xpcnn
from xpcnn import optim
from xpcnn.errors import DataFormatError, DeviceError, InputError, NonFiniteError
from xpcnn.layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    MaxPool2D,
    Normalization,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.layers.base import Options
from xpcnn.losses import SoftmaxCrossEntropy

X, Y = four_class_data()


@pytest.fixture
def model():
    return four_class_model()


def nan_at(x, index):
    x = x.astype(np.float32)
    x[index] = np.nan
    return x


# -- fit / evaluate / predict: data -------------------------------------------------------------

DATA_CASES = {
    "rank too low": (lambda m: m.fit(X[:, :, :, 0], Y, verbose=0),
                     InputError, r"per-sample shape \(6, 6\) but the model expects \(6, 6, 3\)"),
    "1-d x": (lambda m: m.fit(X.reshape(-1), Y, verbose=0),
              InputError, r"must have a batch axis .* got shape \(2160,\)"),
    "wrong size": (lambda m: m.fit(X[:, :5], Y, verbose=0),
                   InputError, r"per-sample shape \(5, 6, 3\) but the model expects \(6, 6, 3\)"),
    "string dtype": (lambda m: m.fit(X.astype(str), Y, verbose=0),
                     InputError, "x must hold real numbers .* got dtype <U3"),
    "object dtype": (lambda m: m.fit(X.astype(object), Y, verbose=0),
                     InputError, "x must hold real numbers .* got dtype object"),
    "complex dtype": (lambda m: m.fit(X.astype(complex), Y, verbose=0),
                      InputError, "got dtype complex128"),
    "ragged list": (lambda m: m.fit([[1, 2], [3]], Y, verbose=0),
                    InputError, "x must be an array of numbers"),
    "empty": (lambda m: m.fit(X[:0], Y[:0], verbose=0), InputError, r"x is empty: shape \(0, 6"),
    "label too big": (lambda m: m.fit(X, Y + 1, verbose=0),
                      InputError, r"labels in y must be in \[0, 3\] .* from 1 to 4"),
    "negative label": (lambda m: m.fit(X, Y - 1, verbose=0),
                       InputError, r"must be in \[0, 3\] .* from -1 to 2"),
    "fractional labels": (lambda m: m.fit(X, Y + 0.5, verbose=0),
                          InputError, "y must be integer class labels, got dtype float64"),
    "string labels": (lambda m: m.fit(X, Y.astype(str), verbose=0),
                      InputError, "y must be integer class labels, got dtype <U"),
    "one-hot of the wrong width": (
        lambda m: m.fit(X, np.eye(5)[Y % 5], verbose=0),
        InputError, r"one-hot rows of shape \(20, 4\); got shape \(20, 5\)"),
    "one-hot with NaN": (lambda m: m.fit(X, nan_at(np.eye(4)[Y], (3, 1)), verbose=0),
                         InputError, "one-hot y holds NaN"),
    "fewer labels": (lambda m: m.fit(X, Y[:-2], verbose=0),
                     InputError, "y has 18 labels but x has 20 samples"),
    "scalar labels": (lambda m: m.fit(X, 3, verbose=0), InputError,
                      "y must be an array of labels, one for each of the 20 samples, got a "
                      "single value"),
    "batch size 0": (lambda m: m.fit(X, Y, batch_size=0, verbose=0),
                     InputError, "batch_size must be a positive integer, got 0"),
    "batch size float": (lambda m: m.fit(X, Y, batch_size=8.0, verbose=0),
                         InputError, "batch_size must be a positive integer, got 8.0"),
    "batch size bool": (lambda m: m.fit(X, Y, batch_size=True, verbose=0),
                        InputError, "batch_size must be a positive integer, got True"),
    "negative epochs": (lambda m: m.fit(X, Y, epochs=-1, verbose=0),
                        InputError, "epochs must be a non-negative integer, got -1"),
    "negative seed": (lambda m: m.fit(X, Y, seed=-3, verbose=0),
                      InputError, "seed must be a non-negative integer, got -3"),
    "validation_split 1": (lambda m: m.fit(X, Y, validation_split=1.0, verbose=0),
                           InputError, r"validation_split must be a number in \[0, 1\), got 1.0"),
    "validation_split str": (lambda m: m.fit(X, Y, validation_split="0.1", verbose=0),
                             InputError, r"validation_split must be a number .* got '0.1'"),
    "validation_split leaves nothing": (  # (Keras' split: the first floor(2 * 0.4) train)
        lambda m: m.fit(X[:2], Y[:2], validation_split=0.6, verbose=0),
        InputError, "leaves no training or no validation samples out of 2"),
    "validation_split and validation_data": (  # (was: validation_data ignored, silently)
        lambda m: m.fit(X, Y, validation_split=0.25, validation_data=(X[:4], Y[:4]), verbose=0),
        InputError, r"pass validation_data or validation_split, not both: got "
                    r"validation_split=0.25 and validation_data"),
    "validation_data an array": (lambda m: m.fit(X, Y, validation_data=X[:2], verbose=0),
                                 InputError, "validation_data must be a pair .* got ndarray"),
    "validation_data wrong shape": (lambda m: m.fit(X, Y, validation_data=(X[:, :4], Y),
                                                    verbose=0),
                                    InputError, r"x_val has per-sample shape \(4, 6, 3\)"),
    "validation labels out of range": (lambda m: m.fit(X, Y, validation_data=(X, Y + 9),
                                                       verbose=0),
                                       InputError, r"labels in y_val must be in \[0, 3\]"),
    "evaluate labels": (lambda m: m.evaluate(X, Y[:5]), InputError, "y has 5 labels but x has 20"),
    "evaluate batch size": (lambda m: m.evaluate(X, Y, batch_size=-1),
                            InputError, "batch_size must be a positive integer, got -1"),
    "predict shape": (lambda m: m.predict(X[..., :2]),
                      InputError, r"per-sample shape \(6, 6, 2\) but the model expects"),
    "predict empty": (lambda m: m.predict(X[:0]), InputError, "x is empty"),
    "predict batch size": (lambda m: m.predict(X, batch_size=0),
                           InputError, "batch_size must be a positive integer, got 0"),
    "layer_outputs shape": (lambda m: m.layer_outputs(X[:, :3]), InputError,
                            r"per-sample shape \(3, 6, 3\)"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_and_arguments(model, case):
    call, error, message = DATA_CASES[case]
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(error, match=message):
        call(model)
    # Raised before any work: nothing trained, the optimiser never stepped.
    assert model.optimizer.iterations == 0
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)


NON_FINITE_DATA = {
    "NaN in x": (lambda m: m.fit(nan_at(X, (7, 2, 3, 1)), Y, verbose=0),
                 r"x holds NaN or infinite values: sample 7, the first such sample, has 1 "
                 r"\(the first is nan at \(2, 3, 1\)\)"),
    "inf in x": (lambda m: m.fit(np.where(np.arange(20)[:, None, None, None] == 4, np.inf,
                                          X.astype(np.float64)), Y, verbose=0),
                 r"sample 4, the first such sample, has 108 \(the first is inf at \(0, 0, 0\)\)"),
    "NaN in x_val": (lambda m: m.fit(X, Y, validation_data=(nan_at(X, (1, 0, 0, 0)), Y),
                                     verbose=0),
                     "x_val holds NaN or infinite values: sample 1"),
    "NaN in evaluate": (lambda m: m.evaluate(nan_at(X, (19, 5, 5, 2)), Y), "sample 19"),
    "NaN in predict": (lambda m: m.predict(nan_at(X, (0, 0, 0, 0))), "sample 0"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_DATA))
def test_non_finite_data_is_refused_before_any_work(model, case):
    call, message = NON_FINITE_DATA[case]
    with pytest.raises(NonFiniteError, match=message):
        call(model)
    assert model.optimizer.iterations == 0


def test_uint8_images_need_no_finiteness_scan_and_float_ones_pass(model):
    model.fit(X.astype(np.float32), Y, epochs=1, batch_size=10, verbose=0)
    assert model.optimizer.iterations == 2


# -- non-finite values during training ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_a_weight_names_the_layer_and_the_step(model):
    model.fit(X, Y, epochs=1, batch_size=10, verbose=0)
    w = model.get_weights()
    w[2][1, 2] = np.nan  # the Dense kernel (Conv2D kernel, bias, then Dense kernel)
    model.set_weights(w)
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the loss is nan; the "
                                             r"first non-finite values appear in the weights "
                                             r"of layer 'dense'"):
        model.fit(X, Y, epochs=1, batch_size=10, verbose=0)
    assert model.optimizer.iterations == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_update_that_overflows_the_weights_is_named_as_such(optimizer):
    """Finite loss, gradients and rate, but an update that overflows the weights: applied (no
    copy of the weights is kept to undo it), and the next step's error says so, naming the
    layer and that the model holds that update (was: "the loss is nan ... in the weights of
    layer 'dense'", as if the model were as before the step, as the README said)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((24, 6)).astype(np.float32) * 1e3, rng.integers(0, 3, 24)
    model = xpcnn.Sequential([Dense(3), Softmax()], input_shape=(6,))
    opt = xpcnn.optim.SGD(1e38) if optimizer == "sgd" else xpcnn.optim.Adam(1e38)
    model.compile(optimizer=opt)
    with pytest.raises(NonFiniteError, match=r"^training stopped at step 2: the loss is nan; the "
                       r"first non-finite values appear in the weights of layer 'dense', not "
                       r"finite before that step: the update of step 1 itself overflowed them "
                       r"\(its loss and gradients were finite.*optimizer.iterations 1\). "
                       r"Restore a checkpoint"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.optimizer.iterations == 1
    assert not np.isfinite(model.get_weights()[0]).all()  # (as the error says)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_an_input_batch_names_the_input(model):
    xb = model._to_device(nan_at(X[:4], (2, 0, 0, 0)))  # (fit would refuse it up front)
    model.train_step(xb, model.backend.asarray(Y[:4]))  # recorded on the device, no error yet
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan; the first non-finite "
                                             "values appear in the input batch"):
        model._read_totals()
    assert model.optimizer.iterations == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_inside_a_layer_names_that_layer(model):
    w = model.get_weights()
    w[0][...] = 1e38  # finite weights whose products overflow to infinity in the convolution
    model.set_weights(w)
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan; the first non-finite "
                                             "values appear in the output of layer 'conv2d'"):
        model.fit(X, Y, epochs=1, verbose=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_non_finite_gradient_names_the_layer_where_backpropagation_met_it(model, monkeypatch):
    flatten = model.layers[3]
    real = flatten.backward

    def backward(dy, options):
        dx = real(dy, options)
        return dx * np.inf  # the gradient turns infinite inside Flatten's backward pass

    monkeypatch.setattr(flatten, "backward", backward)
    with np.errstate(all="ignore"), pytest.raises(
            NonFiniteError, match=r"non-finite gradient at step 1: it first appears \(in "
                                  r"backpropagation order\) in layer 'conv2d'"):
        model.fit(X, Y, epochs=1, verbose=0)
    assert model.optimizer.iterations == 0


def test_finite_gradients_whose_sum_overflows_are_not_an_error(model, monkeypatch):
    dense = model.layers[4]
    real = dense.backward

    def backward(dy, options):
        dx = real(dy, options)
        dense.grads["kernel"] = np.full(dense.grads["kernel"].shape, 3e38, np.float32)
        return dx

    monkeypatch.setattr(dense, "backward", backward)
    with np.errstate(over="ignore"):
        model.fit(X, Y, epochs=1, batch_size=20, verbose=0)  # the sum of 36 * 3e38 is inf
    assert model.optimizer.iterations == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_learning_rate_that_overflows_stops_training(model):
    # lr 1e-300, then 1.0, then 1e-300 * 1e600 = inf
    model.compile(optimizer=optim.SGD(optim.StepDecay(1e-300, step_size=1, gamma=1e300)))
    with pytest.raises(NonFiniteError, match="the learning rate for step 3 is inf; nothing was "
                                             "updated"):
        model.fit(X, Y, epochs=3, batch_size=10, verbose=0)
    assert model.optimizer.iterations == 2


def _bn_dropout_model(optimizer, precision="float32"):
    model = xpcnn.Sequential([Conv2D(4, 3), BatchNorm2D(), ReLU(), Flatten(), Dropout(0.2),
                              Dense(4), Softmax()], seed=0)
    model.compile(optimizer=optimizer, precision=precision)
    model.build((6, 6, 3))
    return model


def _everything(model):
    """Weights (BatchNorm's moving statistics included), Dropout's draws, the loss scale and
    its count of good steps, the step count."""
    return (model.get_weights(), model.layers[4].calls, model.loss_scale, model._good_steps,
            model.optimizer.iterations)


def _assert_same(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[1:] == b[1:]


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_a_step_refused_before_it_runs_moves_nothing(precision):
    """A learning rate that overflowed, and an earlier step's deferred error found because a
    layer was frozen since: both refused before the step's forward pass, which would move
    BatchNorm's statistics, Dropout's draws and the loss scale's count (was: moved, though the
    errors said nothing was updated, and the model was to be as before)."""
    model = _bn_dropout_model(optim.SGD(optim.StepDecay(1e-300, step_size=1, gamma=1e300)),
                              precision)
    for i in range(2):
        model.train_on_batch(X[5 * i:5 * i + 5], Y[5 * i:5 * i + 5])
    before = _everything(model)
    with pytest.raises(NonFiniteError, match="the learning rate for step 3 is inf"):
        model.train_on_batch(X[10:15], Y[10:15])
    _assert_same(_everything(model), before)

    model = _bn_dropout_model(optim.Adam(0.01), precision)
    model.train_step(model._to_device(X[:5]), model.backend.asarray(Y[:5]))
    model.train_step(model._to_device(nan_at(X[5:10], (0, 0, 0, 0))),
                     model.backend.asarray(Y[5:10]))  # (not read yet)
    before = _everything(model)
    model.layers[0].trainable = False
    with pytest.raises(NonFiniteError, match="step 2"):
        model.train_step(model._to_device(X[10:15]), model.backend.asarray(Y[10:15]))
    after = _everything(model)
    assert after[4] == 1  # (the bad step undone)
    _assert_same(after[:4], before[:4])
    # (Adam's moments of the step before, not dropped for the frozen layer's step: the
    # error came first)
    assert [m.shape for m in model.optimizer.slots["m"]] == [
        p.shape for la in model.layers for p in la.params.values()]


def test_the_loss_scale_after_an_error_is_the_one_before_that_step():
    """Training stops at a step whose float16 loss is NaN: the loss scale and its count of
    good steps are those before it, not moved by it or by the steps run behind it before the
    host read the error (was: the count reset by it, then counting the later, undone steps)."""
    x, y = np.concatenate([X] * 3).astype(np.float32)[:50], np.concatenate([Y] * 3)[:50]
    x[20:30] = 6e4  # (the third batch of five: finite in float16, its convolution's sums not)
    model = _bn_dropout_model(optim.SGD(0.01), "mixed_float16")
    reference = _bn_dropout_model(optim.SGD(0.01), "mixed_float16")
    for i in range(2):
        reference.train_on_batch(x[10 * i:10 * i + 10], y[10 * i:10 * i + 10])
    with pytest.raises(NonFiniteError, match="step 3"), np.errstate(over="ignore"):
        model.fit(x, y, epochs=1, batch_size=10, shuffle=False, verbose=0)  # (read at its end)
    assert (model.loss_scale, model._good_steps, model.optimizer.iterations) == (
        reference.loss_scale, reference._good_steps, 2) == (2.0**15, 2, 2)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", every_layer_net(), ids=lambda la: type(la).__name__)
def test_backward_needs_a_training_forward_before_it(layer, rng):
    """Every layer keeps what its gradient needs only in a training pass, for one backward."""
    layer.build((8, 8, 3) if not isinstance(layer, Dense) else (5,), "cpu")
    x = rng.standard_normal((2, *layer.input_shape)).astype(np.float32)
    dy = np.ones((2, *layer.output_shape), np.float32)
    with pytest.raises(InputError, match="backward\\(\\) needs a forward\\(x, training=True\\)"):
        layer.backward(dy)
    layer.forward(x, training=False)
    with pytest.raises(InputError, match=f"layer {layer.name!r}"):
        layer.backward(dy)
    layer.forward(x, training=True)
    if isinstance(layer, (RandomFlip, RandomCrop)):  # augmentation: no gradient at all
        with pytest.raises(InputError, match="it has no gradient"):
            layer.backward(dy)
        return
    layer.backward(dy)
    with pytest.raises(InputError, match="for one backward"):
        layer.backward(dy)  # a second time
    # (a pass keeping nothing for backward, as a model's plan runs a frozen trunk, has none)
    layer.forward(x, True, Options(keep_for_backward=False))
    with pytest.raises(InputError, match="keep_for_backward=False"):
        layer.backward(dy)


@pytest.mark.parametrize("augment", [RandomFlip, lambda: RandomCrop(1)],
                         ids=["RandomFlip", "RandomCrop"])
def test_an_augmentation_after_a_trained_layer_is_refused_before_any_pass(augment):
    """An augmentation has no gradient (Layer.has_gradient): after a trained layer it was
    taken at build, then failed in the first backward, after the forward pass had moved
    BatchNorm's statistics, with an error naming neither the layer nor its place. Refused
    by a training pass before it moves anything (predict and evaluate run); after frozen
    layers only it trains, and unfrozen again it is refused again (the plan is compiled
    again)."""
    layers = [Conv2D(4, 3), BatchNorm2D(), augment(), Flatten(), Dense(4), Softmax()]
    model = xpcnn.Sequential(layers, input_shape=(6, 6, 3), seed=0)
    model.compile(optimizer=optim.SGD(0.1))
    name = type(layers[2]).__name__
    refusal = (rf"layer '{name.lower()}' \({name}, 3 of 6\) has no gradient, and the trained "
               r"layer 'batchnorm2d' \(BatchNorm2D\) before it needs one to pass through it: "
               rf"put the {name} before every trained layer \(at the model's start, where "
               r"augmentations go\), or freeze the layers before it")
    weights = model.get_weights()
    assert model.predict(X, verbose=0).shape == (len(X), 4)  # (inference passes no gradient)
    model.evaluate(X, Y, verbose=0)
    with pytest.raises(InputError, match=refusal):
        model.fit(X, Y, epochs=1, batch_size=10, verbose=0)
    assert model.optimizer.iterations == 0
    for a, b in zip(model.get_weights(), weights, strict=True):  # (statistics included)
        np.testing.assert_array_equal(a, b)
    layers[0].trainable = layers[1].trainable = False
    model.fit(X, Y, epochs=1, batch_size=10, verbose=0)  # (no gradient needed through it)
    assert model.optimizer.iterations > 0
    layers[1].trainable = True
    with pytest.raises(InputError, match=refusal):
        model.fit(X, Y, epochs=1, batch_size=10, verbose=0)


def test_a_users_layer_keeps_its_own_forward_arguments_and_gets_the_same_check():
    from xpcnn.layers.base import Layer

    class Scale(Layer):
        def forward(self, x, training=False, factor=2.0):
            self._factor = factor
            return x * factor

        def backward(self, dy):
            return dy * self._factor

    layer = Scale()
    layer.build((3,))
    x = np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(layer.forward(x, training=True, factor=3.0), 3 * x)
    np.testing.assert_array_equal(layer.backward(x), 3 * x)
    with pytest.raises(InputError, match="layer 'scale': backward\\(\\) needs a forward"):
        layer.backward(x)


def test_set_weights_checks_everything(model):
    w = model.get_weights()
    with pytest.raises(InputError, match="set_weights expects 4 arrays .* got 3"):
        model.set_weights(w[:3])
    with pytest.raises(InputError, match="set_weights expects a list of arrays .* got ndarray"):
        model.set_weights(w[0])
    bad = [*w[:2], np.zeros((27, 4)), *w[3:]]
    with pytest.raises(InputError, match=r"layer 'dense' weight 'kernel' must have shape "
                                         r"\(48, 4\), got \(27, 4\)"):
        model.set_weights(bad)
    bad = [*w[:2], w[2].astype(str), *w[3:]]
    with pytest.raises(InputError, match="layer 'dense' weight 'kernel' must be real, got <U"):
        model.set_weights(bad)
    unbuilt = xpcnn.Sequential(four_class_net())
    with pytest.raises(InputError, match="must be built before set_weights"):
        unbuilt.set_weights(w)


def test_set_weights_refuses_values_its_dtype_would_turn_into_infinity(model):
    """A float64 1e39 became infinity in a float32 model (a NumPy warning alone); values up
    to the dtype's largest, NaN and infinity as given are taken."""
    w = model.get_weights()
    kernel = w[2].astype(np.float64)
    kernel[0, 0] = -1e39
    with pytest.raises(InputError, match=r"^layer 'dense' weight 'kernel' holds values beyond "
                                         r"the range of float32, the layer's dtype \(up to "
                                         r"1e\+39; float32 ends at 3.4e\+38\), which would "
                                         r"become infinity"):
        model.set_weights([*w[:2], kernel, *w[3:]])
    np.testing.assert_array_equal(model.get_weights()[2], w[2])
    kernel[0, 0], kernel[0, 1], kernel[0, 2] = 3.4e38, np.nan, -np.inf
    model.set_weights([*w[:2], kernel, *w[3:]])
    np.testing.assert_array_equal(model.get_weights()[2][0, :3],
                                  np.array([3.4e38, np.nan, -np.inf], np.float32))
    half = Dense(2)
    half.build((3,), dtype="float16")
    with pytest.raises(InputError, match=r"beyond the range of float16, .*\(up to 7e\+04; "
                                         r"float16 ends at 6.55e\+04\)"):
        half.set_weights([np.full((3, 2), 7e4, np.float32), np.zeros(2)])


def test_load_weights_refuses_another_architecture(model, tmp_path):
    other = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(5, 3), ReLU(), Flatten(), Dense(4),
                              Softmax()], input_shape=(6, 6, 3))
    other.save(str(tmp_path / "other.npz"))
    with pytest.raises(DataFormatError, match=r"another architecture: its layer 1 is "
                                              r"Conv2D\(filters=5, .*this model's is "
                                              r"Conv2D\(filters=3"):
        model.load_weights(tmp_path / "other.npz")
    bigger = xpcnn.Sequential(four_class_net(), input_shape=(8, 8, 3))
    bigger.save(str(tmp_path / "bigger.npz"))
    with pytest.raises(DataFormatError, match=r"inputs of shape \(8, 8, 3\); this model takes "
                                              r"\(6, 6, 3\)"):
        model.load_weights(tmp_path / "bigger.npz")
    with pytest.raises(DataFormatError, match="no such file"):
        model.load_weights(tmp_path / "missing.npz")
    unbuilt = xpcnn.Sequential(four_class_net())  # the layers are compared before a build
    with pytest.raises(DataFormatError, match=r"another architecture: its layer 1 is "
                                              r"Conv2D\(filters=5, .*this model's is "
                                              r"Conv2D\(filters=3"):
        unbuilt.load_weights(tmp_path / "other.npz")  # (was: 'layer 1 (Conv2D) needs 84 weight
    assert not unbuilt.built  # values for inputs of shape (6, 6, 3), but the file holds 140')
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataFormatError, match="not a readable xpcnn .npz file"):
        model.load_weights(tmp_path / "junk.npz")
    # The same architecture loads, into a built or an unbuilt model.
    same = xpcnn.Sequential(four_class_net(), seed=7, input_shape=(6, 6, 3))
    same.save(str(tmp_path / "same.npz"))
    fresh = xpcnn.Sequential(four_class_net())
    for target in (model, fresh):
        target.load_weights(tmp_path / "same.npz")
        for a, b in zip(target.get_weights(), same.get_weights(), strict=True):
            assert np.array_equal(a, b)


def test_truncated_model_file(model, tmp_path):
    model.save(str(tmp_path / "m.npz"))
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="cut.npz: not a readable xpcnn .npz file"):
        xpcnn.load_model(str(tmp_path / "cut.npz"))


# -- model construction, compile ------------------------------------------------------------------

CONSTRUCTION = {
    "layers not a list": (lambda: xpcnn.Sequential(Dense(3)),
                          "layers must be a list of xpcnn layers, got Dense"),
    "not a layer": (lambda: xpcnn.Sequential(["conv"]),
                    "add\\(\\) expects an xpcnn layer, got str"),
    "dtype": (lambda: xpcnn.Sequential(dtype="float16"),
              "model dtype must be 'float32' or 'float64', got 'float16'"),
    "seed": (lambda: xpcnn.Sequential(seed=-1), "seed must be a non-negative integer, got -1"),
    "seed float": (lambda: xpcnn.Sequential(seed=1.5), "seed must be a non-negative integer"),
    "name": (lambda: xpcnn.Sequential(name=""), "model name must be a non-empty string, got ''"),
    "input_shape floats": (lambda: xpcnn.Sequential(four_class_net(), input_shape=(6.5, 6, 3)),
                           r"input_shape must be positive sizes .* got \(6.5, 6, 3\)"),
    "input_shape strings": (lambda: xpcnn.Sequential(four_class_net(), input_shape=("6", 6, 3)),
                            r"input_shape must be positive sizes .* got \('6', 6, 3\)"),
    "input_shape zero": (lambda: xpcnn.Sequential(four_class_net(), input_shape=(0, 6, 3)),
                         r"input_shape must be positive sizes"),
    "input_shape int": (lambda: xpcnn.Sequential(four_class_net(), input_shape=6),
                        "input_shape must be positive sizes"),
    "no layers": (lambda: xpcnn.Sequential().build((6, 6, 3)), "the model has no layers"),
    "rank for Conv2D": (lambda: xpcnn.Sequential(four_class_net(), input_shape=(6, 6)),
                        r"layer 'conv2d' \(Conv2D\) expects per-sample inputs of shape "
                        r"\(H, W, C\), got \(6, 6\)"),
    "Dense after images": (lambda: xpcnn.Sequential([Dense(3)], input_shape=(4, 4, 1)),
                           "add a Flatten"),
    "RandomFlip after Flatten": (  # (was: an AxisError from its first training batch)
        lambda: xpcnn.Sequential([Flatten(), RandomFlip(), Dense(4)], input_shape=(4, 4, 1)),
        r"layer 'randomflip' \(RandomFlip\) expects per-sample inputs of shape \(H, W, C\), "
        r"got \(16,\)"),
    "kernel too big": (lambda: xpcnn.Sequential([Conv2D(2, 7)], input_shape=(4, 4, 1)),
                       "a 7x7 kernel with padding 'valid' does not fit an input of 4x4"),
    # (were: windows of padding alone, -inf maxima and 0/0 means)
    "pool padding alone": (lambda: xpcnn.Sequential([MaxPool2D(1, padding=1)],
                                                    input_shape=(4, 4, 1)),
                           "layer 'maxpool2d': padding 1 is not less than the 1x1 pool"),
    "avg pool padding alone": (
        lambda: xpcnn.Sequential([AvgPool2D((3, 2), 2, padding=2)], input_shape=(4, 4, 1)),
        "layer 'avgpool2d': padding 2 is not less than the 3x2 pool"),
    "summary unbuilt": (lambda: xpcnn.Sequential(four_class_net()).summary(),
                        "must be built before summary"),
    "fit uncompiled": (lambda: xpcnn.Sequential(four_class_net()).fit(X, Y),
                       r"call compile\(loss=..., optimizer=...\) before fit"),
    "unknown loss": (lambda: xpcnn.Sequential(four_class_net()).compile(loss="mse"),
                     "unknown loss 'mse'"),
    "unknown optimizer": (lambda: xpcnn.Sequential(four_class_net()).compile(optimizer="adagrad"),
                          "unknown optimizer 'adagrad'"),
    "unknown metric": (lambda: xpcnn.Sequential(four_class_net()).compile(metrics="f1"),
                       r"unknown metrics \['f1'\]"),
    "precision": (lambda: xpcnn.Sequential(four_class_net()).compile(precision="int8"),
                  "precision must be one of float32, mixed_float16, mixed_bfloat16, got 'int8'"),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTION))
def test_model_construction_and_compile(case):
    call, message = CONSTRUCTION[case]
    with pytest.raises(InputError, match=message):
        call()


def test_a_device_the_array_library_lacks_is_refused_when_the_model_is_made():
    """(was: accepted, then a ValueError from array_api_strict when the model was built)"""
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(DeviceError, match=r"^array_api_strict has no device 'gpu0' "
                                          r"\(ValueError: .*\); its default one is "):
        xpcnn.Sequential(four_class_net(), device=(xs, "gpu0"))
    model = xpcnn.Sequential(four_class_net(), device=(xs, xs.Device("device1")))
    assert model.predict(X).shape == (20, 4)


def test_a_single_metric_name_is_accepted():
    m = xpcnn.Sequential(four_class_net())
    m.compile(metrics="accuracy")  # (as Keras takes it, not only ["accuracy"])
    history = m.fit(X, Y, epochs=1, verbose=0)
    assert 0.0 <= history.history["accuracy"][0] <= 1.0


LAYERS = {
    "Conv2D filters 0": (lambda: Conv2D(0), "filters must be a positive int .* got 0"),
    "Conv2D filters float": (lambda: Conv2D(3.5), "filters must be a positive int .* got 3.5"),
    "Conv2D filters bool": (lambda: Conv2D(True), "filters must be a positive int .* got True"),
    "Conv2D filters None": (lambda: Conv2D(None), "filters must be a positive int .* got None"),
    "Conv2D kernel triple": (lambda: Conv2D(2, (3, 3, 3)),
                             r"kernel_size must be a positive int or a pair .* got \(3, 3, 3\)"),
    "Conv2D kernel huge": (lambda: Conv2D(2, 2**40), "kernel_size must be a positive int"),
    "Conv2D strides": (lambda: Conv2D(2, 3, strides=0), "strides must be a positive int"),
    "Conv2D padding": (lambda: Conv2D(2, 3, padding="full"),
                       "padding must be 'valid', 'same' or a non-negative int, got 'full'"),
    "Conv2D padding negative": (lambda: Conv2D(2, 3, padding=-1), "padding must be 'valid'"),
    "Conv2D initializer": (lambda: Conv2D(2, kernel_initializer="ones"),
                           "unknown initializer 'ones'"),
    "Dense units": (lambda: Dense(-2), "units must be a positive int .* got -2"),
    "Dense units str": (lambda: Dense("10"), "units must be a positive int .* got '10'"),
    "Dropout 1": (lambda: Dropout(1.0), r"Dropout rate must be a number in \[0, 1\), got 1.0"),
    "Dropout str": (lambda: Dropout("0.5"), r"Dropout rate must be a number in \[0, 1\), got"),
    "Dropout NaN": (lambda: Dropout(math.nan), "Dropout rate must be a number"),
    "ReLU max -1": (lambda: ReLU(-1), "ReLU max_value must be >= 0 or None, got -1"),
    "ReLU max str": (lambda: ReLU("6"), "ReLU max_value must be >= 0 or None, got '6'"),
    "ReLU max inf": (lambda: ReLU(math.inf), "ReLU max_value must be >= 0 or None, got inf"),
    "Rescaling NaN": (lambda: Rescaling(math.nan), "Rescaling scale must be a finite number"),
    "Rescaling str": (lambda: Rescaling("1/255"), "Rescaling scale must be a finite number, got"),
    "Rescaling offset": (lambda: Rescaling(1.0, math.inf), "Rescaling offset must be a finite"),
    "Normalization std -1": (lambda: Normalization(0.0, -1.0),
                             "Normalization std must be a number >= 0, got -1.0"),
    "Normalization lengths": (lambda: Normalization([0.0, 1.0], [1.0, 1.0, 1.0]),
                              "mean and std of equal length"),
    "Normalization str": (lambda: Normalization("a", 1.0), "Normalization mean must be a finite"),
    "MaxPool size": (lambda: MaxPool2D(0), "pool_size must be a positive int"),
    "AvgPool strides": (lambda: AvgPool2D(2, strides=(1, 0)), "strides must be a positive int"),
    "BatchNorm momentum": (lambda: BatchNorm2D(1.5), r"momentum must be in \[0, 1\], got 1.5"),
    "BatchNorm momentum str": (lambda: BatchNorm2D("0.1"), "momentum must be in"),
    "BatchNorm eps": (lambda: BatchNorm2D(eps=0), "eps must be a positive number, got 0"),
    "FeatureNorm eps": (lambda: FeatureNorm(eps=math.inf), "eps must be a positive number"),
    "RandomCrop padding": (lambda: RandomCrop(0), "RandomCrop padding must be a positive int"),
    "RandomCrop padding bool": (lambda: RandomCrop(True), "RandomCrop padding must be"),
    "layer name": (lambda: Dense(3, name=""), "layer name must be a non-empty string or None"),
    "layer name int": (lambda: ReLU(name=5), "layer name must be a non-empty string or None"),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_layer_constructors(case):
    call, message = LAYERS[case]
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize("dtype, rate, highest", [
    ("float16", 0.99999, "1 - 2**-11 = 0.99951171875"),
    ("float16", 1 - 2**-12, "1 - 2**-11 = 0.99951171875"),  # (a tie, rounded to even: 1)
    ("bfloat16", 0.999, "1 - 2**-8 = 0.99609375"),
    ("float32", 1 - 2**-26, "1 - 2**-24 = 0.9999999403953552")])
def test_a_dropout_rate_that_its_dtype_rounds_to_1_is_refused_at_build(dtype, rate, highest):
    """Its draw would keep nothing (1 / (1 - rate) is inf in float16 above 1 - 1/65504: the
    outputs were NaN; all zeros elsewhere). Refused naming the dtype, on a layer built in it
    and on a model compiled to compute in it; a rate it draws is built."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    message = (rf"layer 'dropout' \(Dropout\): rate {rate!r} cannot be drawn in {dtype}: .* "
               rf"The highest rate {dtype} draws is {re.escape(highest)}: give at most that")
    with pytest.raises(InputError, match=message):
        Dropout(rate).build((8,), "cpu", dtype=dtype)
    Dropout(rate).build((8,), "cpu", dtype="float64")
    if dtype != "float32":  # (a float32 model's own dtype)
        model = xpcnn.Sequential([Dense(4), Dropout(rate), Dense(2)], input_shape=(8,))
        model.compile()
        with pytest.raises(InputError, match=message):
            model.compile(precision=f"mixed_{dtype}")
        # (refused before anything changed: was left half in the new precision, every call
        # then refused)
        assert model.precision == "float32"
        model.fit(np.ones((8, 8), np.float32), Y[:8] % 2, verbose=0)


OPTIMIZERS = {
    "lr inf": (lambda: optim.SGD(math.inf), "learning rate must be a positive number"),
    "lr NaN": (lambda: optim.Adam(math.nan), "learning rate must be a positive number"),
    "lr str": (lambda: optim.Adam("1e-3"), "learning rate must be a positive number"),
    "lr negative": (lambda: optim.AdamW(-1e-3), "learning rate must be a positive number"),
    "weight decay inf": (lambda: optim.SGD(0.1, weight_decay=math.inf),
                         "weight_decay must be >= 0 and finite, got inf"),
    "momentum str": (lambda: optim.SGD(0.1, momentum="0.9"), "momentum must be in"),
    "beta NaN": (lambda: optim.Adam(beta_2=math.nan), "beta_2=nan"),
    "epsilon 0": (lambda: optim.Adam(epsilon=0.0), "epsilon=0.0"),
    "schedule lr inf": (lambda: optim.CosineDecay(math.inf, 10),
                        "CosineDecay lr must be a finite number >= 0, got inf"),
    "schedule steps float": (lambda: optim.StepDecay(0.1, 2.5),
                             "StepDecay step_size must be a whole number of steps, got 2.5"),
    "schedule gamma": (lambda: optim.StepDecay(0.1, 2, gamma=-1.0),
                       "StepDecay gamma must be a finite number >= 0"),
    "min_lr": (lambda: optim.CosineDecay(0.1, 10, min_lr=-1.0),
               "CosineDecay min_lr must be a finite number >= 0"),
    "warmup": (lambda: optim.LinearWarmup(0.1, 0), "warmup_steps must be >= 1, got 0"),
    "warmup lr": (lambda: optim.LinearWarmup(math.inf, 5), "learning rate must be a finite"),
    "label smoothing": (lambda: SoftmaxCrossEntropy("0.1"),
                        r"label_smoothing must be in \[0, 1\), got '0.1'"),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_optimizer_schedule_and_loss_arguments(case):
    call, message = OPTIMIZERS[case]
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_mixed_float16_gives_up_lowering_the_loss_scale_at_its_floor(model, monkeypatch):
    """A gradient that stays non-finite whatever the scale is reported, not skipped forever:
    at the scale's floor, float32's smallest normal number (it halves below 1, as PyTorch's
    GradScaler does), the error says float16 cannot hold these gradients."""
    floor = float(np.finfo(np.float32).smallest_normal)
    model.compile(optimizer=optim.SGD(0.01), precision="mixed_float16")
    model.loss_scale = 4 * floor
    flatten = model.layers[3]
    real = flatten.backward
    monkeypatch.setattr(flatten, "backward", lambda dy, options: real(dy, options) * np.nan)
    # Steps 1 and 2 halve the scale (their updates skipped on the device), step 3 fails there.
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 3: .* layer 'conv2d'; "
                       r"the float16 loss scale reached its floor, 1\.175e-38 \(float32's "
                       r"smallest normal number\), and still float16 cannot hold these "
                       r"gradients: train with precision='float32' or 'mixed_bfloat16'"):
        model.fit(X, Y, epochs=1, batch_size=5, verbose=0)
    assert model.loss_scale == floor and model.optimizer.iterations == 2


@pytest.mark.parametrize("images", [(2, 28, 28, 1), (2, 1, 28, 28)])
def test_images_given_to_a_model_of_flat_inputs_get_the_shape_refusal(images):
    # (the channels-first hint read the expected shape's third axis: a bare IndexError for a
    # model of (784,) inputs)
    flat = xpcnn.Sequential([xpcnn.Input((784,)), Dense(3)])
    with pytest.raises(InputError, match=r"per-sample shape .* but the model expects \(784,\)"):
        flat.predict(np.zeros(images, np.float32))
