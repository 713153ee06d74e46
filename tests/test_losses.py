"""The loss as Keras and PyTorch users write it: ``from_logits`` checked against the model's last
layer, the metrics logged under the names compile was given, and a SoftmaxCrossEntropy
subclass's own ``forward`` trained on (xpcnn's own class keeping its fused kernels)."""

import re
import warnings

import numpy as np
import pytest

import xpcnn
from xpcnn import SoftmaxCrossEntropy
from xpcnn.callbacks import EarlyStopping, ModelCheckpoint
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import Dense, Flatten, Softmax
from xpcnn.ops.kernels import kernels_for
from xpcnn.saving import load_checkpoint, save_checkpoint
from xpcnn.saving.checkpoint import Progress
from xpcnn.saving.npz import CONFIG_KEY, decode_json

RNG = np.random.default_rng(7)
X = RNG.integers(0, 256, (12, 2, 2, 1)).astype(np.float32) / 255
Y = np.arange(12) % 3


def net(last: str, input_shape=(2, 2, 1), **kwargs) -> xpcnn.Sequential:
    """A tiny classifier ending in a Softmax layer ("layer"), a Dense softmax activation
    ("activation") or logits ("logits"); built where ``input_shape`` is given."""
    layers = {"layer": [Flatten(), Dense(3), Softmax()],
              "activation": [Flatten(), Dense(3, activation="softmax")],
              "logits": [Flatten(), Dense(3)]}[last]
    return xpcnn.Sequential(layers, input_shape=input_shape, seed=0, **kwargs)


# -- from_logits ----------------------------------------------------------------------------------

TWICE = (r"SoftmaxCrossEntropy\(from_logits=True\) takes the model's outputs as logits, but its "
         r"last layer '{name}' \({cls}, {n} of {n}\) turns them into probabilities \(Keras would "
         r"apply the softmax twice\): remove that softmax \(predict then returns logits\), or pass "
         r"from_logits=False \(or None\)")
LOG_OF_LOGITS = (r"SoftmaxCrossEntropy\(from_logits=False\) takes the model's outputs as "
                 r"probabilities, but its last layer 'dense' \(Dense, 2 of 2\) gives logits, with "
                 r"no softmax after it \(Keras would take the log of logits\): end the model in "
                 r"Softmax\(\) \(or a softmax activation\), or pass from_logits=True \(or None\)")


def refusal(last: str, from_logits: bool) -> str:
    if not from_logits:
        return LOG_OF_LOGITS
    return TWICE.format(**({"name": "softmax", "cls": "Softmax", "n": 3} if last == "layer"
                           else {"name": "dense", "cls": "Dense", "n": 2}))


MISMATCHES = [("layer", True), ("activation", True), ("logits", False)]


@pytest.mark.parametrize(("last", "from_logits"), MISMATCHES)
def test_from_logits_that_contradicts_a_built_model_is_refused_at_compile(last, from_logits):
    model = net(last)
    with pytest.raises(InputError, match=refusal(last, from_logits)):
        model.compile(loss=SoftmaxCrossEntropy(from_logits=from_logits), optimizer="sgd")
    assert model.loss is None and model.optimizer is None  # (a refused compile changes nothing)


@pytest.mark.parametrize(("last", "from_logits"), MISMATCHES)
def test_from_logits_that_contradicts_an_unbuilt_model_is_refused_when_a_call_builds_it(
        last, from_logits):
    """Compiled before it is built: fit, evaluate and train_on_batch refuse it once they have
    built it from the data, and leave it unbuilt."""
    model = net(last, input_shape=None)
    model.compile(loss=SoftmaxCrossEntropy(from_logits=from_logits), optimizer=xpcnn.optim.SGD(0.1))
    for call in (lambda: model.fit(X, Y, epochs=1, verbose=0),
                 lambda: model.evaluate(X, Y),
                 lambda: model.train_on_batch(X, Y)):
        with pytest.raises(InputError, match=refusal(last, from_logits)):
            call()
        assert not model.built and model.optimizer.iterations == 0


def test_a_train_step_on_a_model_changed_since_compile_is_refused():
    model = net("logits")
    model.compile(loss=SoftmaxCrossEntropy(from_logits=True), optimizer=xpcnn.optim.SGD(0.1))
    model.add(Softmax())
    model.build((2, 2, 1))  # (its new end not seen by compile)
    xb, yb = model.backend.asarray(X), model.backend.asarray(Y)
    with pytest.raises(InputError, match=TWICE.format(name="softmax", cls="Softmax", n=3)):
        model.train_step(xb, yb)
    assert model.optimizer.iterations == 0


@pytest.mark.parametrize(("last", "from_logits"), [("layer", False), ("activation", False),
                                                   ("logits", True)])
def test_from_logits_that_fits_the_model_trains_as_the_default(last, from_logits):
    """The loss is the same fused one whatever from_logits says: bit for bit the default's."""
    runs = []
    for setting in (None, from_logits):
        model = net(last, input_shape=None)
        model.compile(loss=SoftmaxCrossEntropy(from_logits=setting), optimizer=xpcnn.optim.SGD(0.1))
        history = model.fit(X, Y, epochs=2, batch_size=4, verbose=0)
        runs.append((model.get_weights(), history.history["loss"], model.evaluate(X, Y)))
    (w0, h0, e0), (w1, h1, e1) = runs
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    assert h0 == h1 and e0 == e1


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_from_logits_must_be_a_bool_or_none(value):
    with pytest.raises(InputError, match=rf"from_logits must be True, False or None, got "
                                         rf"{value!r}"):
        SoftmaxCrossEntropy(from_logits=value)


def test_keras_loss_keywords_take_their_defaults_and_refuse_others_by_name(tmp_path):
    """Keras' reduction=, axis= and ignore_class= were a bare TypeError: their defaults
    (what xpcnn's loss does) are taken, left out of the configuration; other values refused
    naming what xpcnn does. 'binary_crossentropy' points to Dense(2) + softmax cross-entropy."""
    loss = SoftmaxCrossEntropy(0.1, reduction="sum_over_batch_size", axis=-1, ignore_class=None)
    assert loss.get_config() == SoftmaxCrossEntropy(0.1).get_config() == {"label_smoothing": 0.1}
    assert SoftmaxCrossEntropy(axis=1).get_config() == {"label_smoothing": 0.0}
    for key, value, said in [("reduction", "sum", r"the mean over the batch"),
                             ("reduction", None, r"sum_over_batch_size"),
                             ("axis", 0, r"the last axis of scores"),
                             ("ignore_class", 2, r"sample_weight 0")]:
        with pytest.raises(InputError, match=rf"^SoftmaxCrossEntropy\({key}={value!r}\): "
                                             rf"Keras' keyword, .*{said}"):
            SoftmaxCrossEntropy(**{key: value})
    model = xpcnn.Sequential([Flatten(), Dense(2)], input_shape=(3,))
    model.compile(loss=loss)
    model.save(tmp_path / "m.npz")  # (the saved loss rebuilds)
    assert xpcnn.load_model(tmp_path / "m.npz").loss.get_config() == loss.get_config()
    with pytest.raises(InputError, match=r"unknown loss 'binary_crossentropy'.*no sigmoid "
                                         r"\(binary\) loss; .*Dense\(2\).*"
                                         r"'sparse_categorical_crossentropy' with labels 0"):
        model.compile(loss="binary_crossentropy")


def test_keras_mean_reduction_is_taken_and_a_users_own_axis_must_be_saved(tmp_path):
    """Keras 3's reduction="mean" is its "sum_over_batch_size": taken. Keras' keywords are
    left out of the saved settings, but a user's subclass keeping axis= for itself must give
    it in get_config (was: not asked, the file rebuilt it without); one passing Keras'
    keywords on to xpcnn's constructor saves as it did (review RD: refused for a while)."""
    assert SoftmaxCrossEntropy(0.1, reduction="mean").get_config() == {"label_smoothing": 0.1}

    class OwnAxis(SoftmaxCrossEntropy):
        def __init__(self, label_smoothing=0.0, axis=-1):
            super().__init__(label_smoothing)
            self.own_axis = axis

    class Inherits(SoftmaxCrossEntropy):
        pass

    class PassesOn(SoftmaxCrossEntropy):
        def __init__(self, label_smoothing=0.0, reduction="sum_over_batch_size"):
            super().__init__(label_smoothing, reduction=reduction)

    model = xpcnn.Sequential([Flatten(), Dense(2)], input_shape=(3,))
    model.compile(loss=OwnAxis(0.1, axis=1))
    with pytest.raises(InputError, match=r"loss class OwnAxis's get_config\(\) does not return "
                                         r"\['axis'\], which its constructor takes, and the "
                                         r"loss rebuilt without them differs"):
        model.save(tmp_path / "m.npz")
    model.compile(loss=PassesOn(0.1, reduction="mean"))
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").loss.get_config() == {
        "class": "PassesOn", "label_smoothing": 0.1}
    model.compile(loss=Inherits(0.1, reduction="mean", axis=1))
    model.save(tmp_path / "m.npz")  # (xpcnn's constructor's: nothing to save)
    assert xpcnn.load_model(tmp_path / "m.npz").loss.get_config() == {
        "class": "Inherits", "label_smoothing": 0.1}


def test_from_logits_round_trips_through_get_config_model_files_and_checkpoints(tmp_path):
    assert SoftmaxCrossEntropy(0.1, from_logits=True).get_config() == {
        "label_smoothing": 0.1, "from_logits": True}
    for setting, last in ((True, "logits"), (False, "layer"), (None, "layer")):
        config = SoftmaxCrossEntropy(from_logits=setting).get_config()
        assert SoftmaxCrossEntropy(**config).from_logits is setting
        model = net(last)
        model.compile(loss=SoftmaxCrossEntropy(from_logits=setting), optimizer=xpcnn.optim.SGD(0.1))
        model.fit(X, Y, epochs=1, batch_size=4, verbose=0)
        model.save(tmp_path / "m.npz")
        save_checkpoint(model, tmp_path / "c.npz", Progress(1), model.history)
        assert xpcnn.load_model(tmp_path / "m.npz").loss.from_logits is setting
        assert load_checkpoint(tmp_path / "c.npz").model.loss.from_logits is setting
    # (the default writes the loss as files did before from_logits: they load as None)
    with np.load(tmp_path / "m.npz") as f:
        assert decode_json(f[CONFIG_KEY], "m.npz")["compile"]["loss"] == {
            "label_smoothing": 0.0}


def test_a_checkpoint_resumes_only_under_its_from_logits(tmp_path):
    model = net("logits")
    model.compile(loss=SoftmaxCrossEntropy(from_logits=True), optimizer=xpcnn.optim.SGD(0.1))
    model.fit(X, Y, epochs=1, batch_size=4, verbose=0, checkpoint=tmp_path / "c.npz")
    other = net("logits")
    other.compile(loss=SoftmaxCrossEntropy(), optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"compile\.loss\.from_logits is True there and None "
                                         "here"):
        other.fit(X, Y, epochs=2, batch_size=4, verbose=0, checkpoint=tmp_path / "c.npz",
                  resume=True)


# -- the metrics' names ---------------------------------------------------------------------------

def trained(metrics, callbacks=None):
    model = net("layer", input_shape=None)
    model.compile(optimizer=xpcnn.optim.SGD(0.1), metrics=metrics)
    history = model.fit(X, Y, epochs=2, batch_size=4, verbose=0, validation_data=(X, Y),
                        callbacks=callbacks)
    return model, history


def test_acc_is_logged_as_acc_as_in_keras_3(tmp_path):
    """compile(metrics=["acc"]) names the metric "acc" wherever it shows (Keras 3), with the
    values "accuracy" has; "accuracy" stays the default."""
    reference, ref_history = trained(["accuracy"])
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=5)
    keep = ModelCheckpoint(str(tmp_path / "m-{epoch}-{val_acc:.3f}.npz"), monitor="val_acc",
                           mode="max", save_best_only=True)
    model, history = trained(["acc"], callbacks=[stop, keep])
    assert model.metrics_names == ("loss", "acc")
    assert set(history.history) == {"loss", "acc", "val_loss", "val_acc", "seconds"}
    for key in ("loss", "acc", "val_loss", "val_acc"):
        assert history.history[key] == ref_history.history[key.replace("acc", "accuracy")]
    assert model.evaluate(X, Y, return_dict=True) == {
        "loss": ref_history.history["val_loss"][-1], "acc": ref_history.history["val_accuracy"][-1]}
    assert set(model.train_on_batch(X, Y, return_dict=True)) == {"loss", "acc"}
    assert stop.best == max(history.history["val_acc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"m-1-{history.history['val_acc'][0]:.3f}.npz"]
    assert xpcnn.Sequential([Flatten(), Dense(3), Softmax()]).metrics_names == (
        "loss", "accuracy")


def test_both_names_log_the_accuracy_under_each_once():
    model, history = trained(["acc", "accuracy", "acc"])
    assert model.metrics_names == ("loss", "acc", "accuracy")
    assert history.history["acc"] == history.history["accuracy"]
    loss, acc, accuracy = model.evaluate(X, Y)
    assert acc == accuracy


def test_metric_names_round_trip_through_model_files_and_checkpoints(tmp_path):
    model, _ = trained(["acc"])
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").metrics_names == ("loss", "acc")
    again = net("layer", input_shape=None)
    again.compile(optimizer=xpcnn.optim.SGD(0.1), metrics=["acc"])
    again.fit(X, Y, epochs=1, batch_size=4, verbose=0, validation_data=(X, Y),
              checkpoint=tmp_path / "c.npz")
    ckpt = load_checkpoint(tmp_path / "c.npz")
    assert ckpt.model.metrics_names == ("loss", "acc")
    assert set(ckpt.history.history) == {"loss", "acc", "val_loss", "val_acc", "seconds"}
    resumed = again.fit(X, Y, epochs=2, batch_size=4, verbose=0, validation_data=(X, Y),
                        checkpoint=tmp_path / "c.npz", resume=True)
    assert len(resumed.history["val_acc"]) == 2


def test_a_checkpoint_of_accuracy_resumes_under_acc_with_its_history_renamed(tmp_path):
    """Files written before the names were kept hold "accuracy" (what "acc" logged then): they
    load as that, and a model compiled with "acc" resumes them as the run it was (was:
    refused, so that an unchanged script could not resume its own run), its History's keys
    renamed, as a run never interrupted logs them. A file of "acc" is not resumed under
    "accuracy" (no older xpcnn wrote one)."""
    def run(metrics, path, epochs, resume):
        model = net("layer", input_shape=None)
        model.compile(optimizer=xpcnn.optim.SGD(0.1), metrics=metrics)
        history = model.fit(X, Y, epochs=epochs, batch_size=4, verbose=0, checkpoint=path,
                            resume=resume, validation_data=(X, Y))
        return model, history

    run(["accuracy"], tmp_path / "c.npz", 1, False)
    assert load_checkpoint(tmp_path / "c.npz").model.metrics_names == ("loss", "accuracy")
    resumed, history = run(["acc"], tmp_path / "c.npz", 2, True)
    whole, expected = run(["acc"], tmp_path / "w.npz", 2, False)
    assert {"acc", "val_acc"} <= set(history.history) and "accuracy" not in history.history
    for key in ("loss", "acc", "val_loss", "val_acc"):
        assert history.history[key] == expected.history[key]
    assert history.epoch == [0, 1] and set(history.history) == set(expected.history)
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"compile\.metrics is \['acc'\] there and "
                                         r"\['accuracy'\] here"):
        run(["accuracy"], tmp_path / "w.npz", 3, True)


def test_an_unknown_metric_names_both_names_xpcnn_knows():
    with pytest.raises(InputError, match=r"unknown metrics \['f1'\]; xpcnn supports 'accuracy' "
                                         r"\(or 'acc', 'sparse_categorical_accuracy', "
                                         r"'categorical_accuracy'\)"):
        net("layer").compile(metrics=["acc", "f1"])


# -- a subclass's forward -------------------------------------------------------------------------

class Doubled(SoftmaxCrossEntropy):
    """Twice the cross-entropy (a PyTorch user's ``forward`` override)."""

    def forward(self, xp, logits, y, dtype, weights=None):
        loss, grad = super().forward(xp, logits, y, dtype, weights)
        return 2 * loss, 2 * grad


class Named(SoftmaxCrossEntropy):
    """A subclass that changes nothing the loss computes."""

    def get_config(self):
        return super().get_config()


def sgd_reference(x, y, kernel, bias, factor, lr=0.1):
    """One SGD step of ``factor`` times the mean cross-entropy of softmax(x @ kernel + bias),
    by hand in float64: (loss, kernel, bias) after it."""
    x = x.reshape(len(x), -1)
    z = x @ kernel + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(kernel.shape[1])[y]
    loss = -factor * np.mean(np.sum(onehot * np.log(p), axis=1))
    dz = factor * (p - onehot) / len(x)
    return loss, kernel - lr * x.T @ dz, bias - lr * dz.sum(axis=0)


@pytest.fixture
def spied(monkeypatch):
    """Counts the calls of the fused softmax cross-entropy kernel of the NumPy backend."""
    calls = []
    kernels = type(kernels_for(net("layer").backend))
    real = kernels.softmax_cross_entropy

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kernels, "softmax_cross_entropy", counted)
    return calls


@pytest.mark.parametrize(("loss", "factor", "fused"), [
    (SoftmaxCrossEntropy(), 1.0, True), (Named(), 1.0, True), (Doubled(), 2.0, False)],
    ids=["own class", "subclass keeping forward", "subclass doubling forward"])
@pytest.mark.parametrize("how", ["train_on_batch", "fit"])
def test_a_subclass_forward_is_what_training_and_evaluation_compute(spied, loss, factor, fused,
                                                                    how):
    """Integer labels take the fused kernel with xpcnn's own forward only: a subclass's
    forward (twice the loss) trains as a hand-computed float64 SGD step of twice the loss,
    and evaluate reports it (was: bypassed, trained as the plain cross-entropy)."""
    model = net("layer", dtype="float64")
    model.compile(loss=loss, optimizer=xpcnn.optim.SGD(0.1))
    x, y = X.astype(np.float64), Y
    kernel, bias = model.get_weights()
    before, kernel_after, bias_after = sgd_reference(x, y, kernel, bias, factor)
    if how == "fit":
        model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    else:
        assert model.train_on_batch(x, y, return_dict=True)["loss"] == pytest.approx(
            before, rel=1e-12)
    got_kernel, got_bias = model.get_weights()
    np.testing.assert_allclose(got_kernel, kernel_after, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_bias, bias_after, rtol=1e-12, atol=1e-15)
    after, _, _ = sgd_reference(x, y, kernel_after, bias_after, factor)
    assert model.evaluate(x, y)[0] == pytest.approx(after, rel=1e-12)
    assert len(spied) == (2 if fused else 0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("targets", ["labels", "one-hot", "soft"])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_targets_and_sample_weights_take_the_fused_kernels(spied, smoothing, targets,
                                                                   weighted):
    """One-hot or probability target rows and sample weights go to the kernels' fused loss
    (on a GPU one launch; they took the ~33 launches of the standard path), with the numbers
    of a hand-computed float64 reference: the weighted sum divided by N, the count not
    weighted, the gradient (softmax - target) x weight / N, and NaN for a row that names no
    class (weighted 0 too)."""
    rng = np.random.default_rng(3)
    n, classes = 9, 5
    z = rng.standard_normal((n, classes)) * 3
    labels = rng.integers(0, classes, n)
    t = (np.eye(classes)[labels] if targets != "soft"
         else rng.dirichlet(np.ones(classes), n))
    y = labels if targets == "labels" else t
    w = rng.uniform(0.0, 2.0, n) if weighted else None
    kernels = kernels_for(net("layer").backend)
    stats, grad = SoftmaxCrossEntropy(smoothing).forward_with_accuracy(
        np, z, y, np.float64, kernels, weights=w)
    assert len(spied) == 1
    smooth = t * (1 - smoothing) + smoothing / classes
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    ws = np.ones(n) if w is None else w
    loss = -np.sum(ws[:, None] * smooth * logp) / n
    assert float(stats[0]) == pytest.approx(loss, rel=1e-12)
    assert float(stats[1]) == np.sum(z.argmax(axis=1) == t.argmax(axis=1))
    np.testing.assert_allclose(grad, ws[:, None] * (np.exp(logp) - smooth) / n, rtol=1e-12,
                               atol=1e-15)
    wrong = y.copy()
    if targets == "labels":
        wrong[4] = classes
    else:
        wrong[4] *= 0.9  # (a row that sums to 0.9)
    zero = None if w is None else np.where(np.arange(n) == 4, 0.0, w)
    stats, _ = SoftmaxCrossEntropy(smoothing).forward_with_accuracy(
        np, z, wrong, np.float64, kernels, weights=zero)
    assert np.isnan(stats[0]) and len(spied) == 2


def test_a_forward_set_on_the_instance_takes_effect_too(spied):
    loss = SoftmaxCrossEntropy()
    loss.forward = lambda *args, **kwargs: tuple(2 * a for a in SoftmaxCrossEntropy.forward(
        loss, *args, **kwargs))
    model = net("layer", dtype="float64")
    model.compile(loss=loss, optimizer=xpcnn.optim.SGD(0.1))
    x = X.astype(np.float64)
    kernel, bias = model.get_weights()
    want, _, _ = sgd_reference(x, Y, kernel, bias, 2.0)
    assert model.evaluate(x, Y)[0] == pytest.approx(want, rel=1e-12)
    assert not spied


def test_a_subclass_targets_takes_effect_too(spied):
    """A subclass's ``targets`` (which ``forward`` reads) is not bypassed either: targets
    smoothed by 0.5 there give the loss of label_smoothing=0.5 (by the fused kernel)."""
    class Smoothed(SoftmaxCrossEntropy):
        def targets(self, xp, y, classes, dtype):
            return super().targets(xp, y, classes, dtype) * 0.5 + 0.5 / classes

    x = X.astype(np.float64)
    losses = []
    for loss in (Smoothed(), SoftmaxCrossEntropy(label_smoothing=0.5)):
        model = net("layer", dtype="float64")
        model.compile(loss=loss, optimizer=xpcnn.optim.SGD(0.1))
        losses.append(model.evaluate(x, Y)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert len(spied) == 1  # (the second model's)


def test_a_subclass_forward_that_returns_other_shapes_is_refused_by_name():
    class PerSample(SoftmaxCrossEntropy):
        def forward(self, xp, logits, y, dtype, weights=None):
            _, grad = super().forward(xp, logits, y, dtype, weights)
            return xp.sum(grad, axis=1), grad

    model = net("layer")
    model.compile(loss=PerSample(), optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"PerSample\.forward must return \(the loss as a 0-d "
                                         r"array, its gradient shaped as the logits \(12, 3\)\); "
                                         r"it returned arrays of shapes \(12,\) and \(12, 3\)"):
        model.train_on_batch(X, Y)
    assert model.optimizer.iterations == 0


class KerasCall(SoftmaxCrossEntropy):
    """Twice the cross-entropy as Keras' guide writes a loss: call(y_true, y_pred)."""

    def call(self, y_true, y_pred):
        return 2.0 * SoftmaxCrossEntropy(from_logits=False)(y_true, y_pred)


class DunderCall(SoftmaxCrossEntropy):
    def __call__(self, y_true, y_pred, sample_weight=None):
        return 2.0 * super().__call__(y_true, y_pred, sample_weight)


class BothCalls(KerasCall, DunderCall):
    pass


@pytest.mark.parametrize(("cls", "written"), [
    (KerasCall, r"defines call\(\), Keras' hook of a loss, without overriding forward\(\): fit "
                r"never calls it"),
    (DunderCall, r"overrides __call__\(\) without overriding forward\(\): fit never calls it"),
    (BothCalls, r"defines call\(\), Keras' hook of a loss, and overrides __call__\(\) without "
                r"overriding forward\(\): fit never calls them")], ids=["call", "__call__", "both"])
def test_a_keras_call_or_a_dunder_call_without_forward_is_refused_at_compile(cls, written):
    """Such a subclass compiled, and fit trained and logged the plain cross-entropy, never
    calling it (and loss(y, p) disagreed with evaluate): refused at compile, naming forward,
    the model left compiled as it was. With forward overridden too, fit trains by forward."""
    model = net("layer", dtype="float64")
    model.compile(loss=SoftmaxCrossEntropy(), optimizer=xpcnn.optim.SGD(0.1))
    kept = model.loss
    with pytest.raises(InputError, match=rf"loss class {cls.__name__} {written}, and would "
                       r"train and log xpcnn's cross-entropy instead\. fit trains by "
                       r"forward\(self, xp, logits, y, dtype, weights=None\), returning \(the "
                       r"loss as a 0-d array, its gradient with respect to the logits"):
        model.compile(loss=cls(from_logits=False), optimizer=xpcnn.optim.SGD(0.1))
    assert model.loss is kept

    class WithForward(cls, Doubled):
        pass

    model.compile(loss=WithForward(from_logits=False), optimizer=xpcnn.optim.SGD(0.1))
    x = X.astype(np.float64)
    kernel, bias = model.get_weights()
    assert model.evaluate(x, Y, verbose=0)[0] == pytest.approx(
        sgd_reference(x, Y, kernel, bias, 2.0)[0], rel=1e-12)


def test_a_forward_that_cannot_take_the_hooks_arguments_is_refused_at_compile():
    """PyTorch's forward(input, target) compiled and failed at the first step with a bare
    TypeError from inside the loss; refused at compile, naming the hook's arguments."""
    class TorchStyle(SoftmaxCrossEntropy):
        def forward(self, input, target):
            return super().forward(np, input, target, np.float32)

    model = net("layer")
    with pytest.raises(InputError, match=r"TorchStyle\.forward\(input, target\) cannot take the "
                                         r"arguments fit calls it with, \(xp, logits, y, dtype, "
                                         r"weights\): a loss's forward is forward\(self, xp, "
                                         r"logits, y, dtype, weights=None\)"):
        model.compile(loss=TorchStyle(), optimizer="sgd")
    assert model.loss is None


@pytest.mark.parametrize("weighted", [False, True])
def test_a_subclass_forward_is_what_the_loss_object_gives_on_probabilities(weighted):
    """Called on probabilities (from_logits=False), a subclass's loss object gave the plain
    cross-entropy while evaluate gave its forward's loss (twice it): now forward's, on
    log(p), equal to evaluate's and to a hand-computed float64 reference."""
    model = net("layer", dtype="float64")
    loss = Doubled(from_logits=False)
    model.compile(loss=loss, optimizer=xpcnn.optim.SGD(0.1), metrics=[])
    x = X.astype(np.float64)
    w = np.linspace(0.5, 2.0, len(Y)) if weighted else None
    kernel, bias = model.get_weights()
    z = x.reshape(len(x), -1) @ kernel + bias
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    want = -2.0 * np.mean((1.0 if w is None else w) * logp[np.arange(len(Y)), Y])
    got = float(loss(Y, model.predict(x, verbose=0), sample_weight=w))
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(model.evaluate(x, Y, sample_weight=w, verbose=0), rel=1e-12)


def test_a_loss_subclass_is_saved_by_its_class_and_loads_as_it(tmp_path, monkeypatch):
    """A model file names a subclass's class, so load_model rebuilds it and trains with its
    forward (was: loaded as SoftmaxCrossEntropy, its forward silently lost); xpcnn's own loss
    is written as before (no class). A subclass whose get_config misses a setting of its
    constructor is refused at save; a file naming a class not defined is refused by name."""
    from xpcnn.losses import LOSS_CLASSES

    model = net("layer")
    model.compile(loss=Doubled(label_smoothing=0.1), optimizer=xpcnn.optim.SGD(0.1))
    model.save(tmp_path / "d.npz")
    loaded = xpcnn.load_model(tmp_path / "d.npz")
    assert type(loaded.loss) is Doubled and loaded.loss.label_smoothing == 0.1
    assert loaded.loss.get_config() == {"class": "Doubled", "label_smoothing": 0.1}
    assert loaded.evaluate(X, Y, verbose=0)[0] == model.evaluate(X, Y, verbose=0)[0]
    own = net("layer")
    own.compile()
    assert own.loss.get_config() == {"label_smoothing": 0.0}

    class Weighted(SoftmaxCrossEntropy):
        def __init__(self, factor: float = 2.0) -> None:
            super().__init__()
            self.factor = factor

    model.compile(loss=Weighted(3.0))
    with pytest.raises(InputError, match=r"loss class Weighted's get_config\(\) does not return "
                                         r"\['factor'\], which its constructor takes"):
        model.save(tmp_path / "w.npz")
    assert not (tmp_path / "w.npz").exists()
    monkeypatch.delitem(LOSS_CLASSES, "Doubled")
    with pytest.raises(DataFormatError, match=r"unknown loss class 'Doubled': define \(or "
                                              r"import\) a user's loss class before loading"):
        xpcnn.load_model(tmp_path / "d.npz")


class SetsItsOwn(SoftmaxCrossEntropy):
    """A subclass that sets the base class's settings itself and takes none."""

    def __init__(self):
        super().__init__(label_smoothing=0.1)


def test_a_loss_subclass_that_sets_the_settings_itself_saves_and_loads(tmp_path):
    """Its config holds the settings its constructor takes, none here (was refused at save:
    "gives ['label_smoothing'], which its constructor does not take"), and it loads as itself,
    with the settings it sets."""
    model = net("layer")
    model.compile(loss=SetsItsOwn(), optimizer=xpcnn.optim.SGD(0.1))
    assert model.loss.get_config() == {"class": "SetsItsOwn"}
    model.save(tmp_path / "s.npz")
    loaded = xpcnn.load_model(tmp_path / "s.npz")
    assert type(loaded.loss) is SetsItsOwn and loaded.loss.label_smoothing == 0.1


class FromLogits(SoftmaxCrossEntropy):
    def __init__(self, label_smoothing=0.0):
        super().__init__(label_smoothing, from_logits=True)


class PassesOn(FromLogits):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


def test_a_loss_subclass_its_config_cannot_rebuild_is_refused_at_save(tmp_path):
    """A constructor taking **kwargs passes from_logits on to one that does not take it: the
    file saved, then load_model failed (TypeError); refused at save, nothing written. Its
    parent, which sets from_logits itself, saves and loads."""
    model = net("logits")
    model.compile(loss=PassesOn(label_smoothing=0.1), optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"loss class PassesOn cannot be rebuilt from its "
                                         r"get_config\(\) \{'label_smoothing': 0.1, "
                                         r"'from_logits': True\} \(.*unexpected keyword"):
        model.save(tmp_path / "p.npz")
    assert not (tmp_path / "p.npz").exists()
    model.compile(loss=FromLogits(0.1), optimizer=xpcnn.optim.SGD(0.1))
    model.save(tmp_path / "f.npz")
    loaded = xpcnn.load_model(tmp_path / "f.npz").loss
    assert type(loaded) is FromLogits and loaded.get_config() == model.loss.get_config()


# -- calling a loss object, as Keras' quickstart and PyTorch do -----------------------------------

def _torch_loss(logits, y, smoothing=0.0, weights=None):
    """PyTorch's cross-entropy (float64), weighted as Keras' sum_over_batch_size."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    z = torch.as_tensor(np.asarray(logits, np.float64))
    t = torch.as_tensor(y) if np.asarray(y).ndim == 2 else torch.as_tensor(y, dtype=torch.int64)
    per = f.cross_entropy(z, t, reduction="none", label_smoothing=smoothing)
    w = torch.ones(len(per), dtype=torch.float64) if weights is None else torch.as_tensor(
        np.asarray(weights, np.float64))
    return float((w * per).sum() / len(per))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_object_called_matches_pytorch(smoothing, one_hot, weighted):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(7, 4)) * 3
    labels = rng.integers(0, 4, 7)
    y = np.eye(4)[labels] * 0.7 + 0.075 if one_hot else labels  # (soft rows too)
    w = rng.random(7) * 2 if weighted else None
    expected = _torch_loss(logits, y, smoothing, w)
    for from_logits, scores in ((True, logits), (False, np.exp(logits) /
                                                 np.exp(logits).sum(axis=1, keepdims=True))):
        got = SoftmaxCrossEntropy(smoothing, from_logits=from_logits)(y, scores, sample_weight=w)
        assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == np.float64
        assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    got32 = SoftmaxCrossEntropy(smoothing, from_logits=True)(y, logits.astype(np.float32), w)
    assert got32.dtype == np.float32 and float(got32) == pytest.approx(expected, rel=1e-5)


def test_loss_object_called_on_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    logits = np.random.default_rng(0).normal(size=(5, 3))
    got = SoftmaxCrossEntropy(from_logits=True)(np.arange(5) % 3, xps.asarray(logits))
    assert array_api_namespace(got) is xps and got.shape == ()
    assert float(got) == pytest.approx(_torch_loss(logits, np.arange(5) % 3), rel=1e-12)


def _keras_on_probabilities(probs, y, smoothing=0.0, weights=None):
    """Keras 3's categorical_crossentropy(from_logits=False) (its NumPy backend's formula: each
    row divided by its sum, clipped to [1e-7, 1 - 1e-7], then its log), with
    CategoricalCrossentropy's label smoothing and sum_over_batch_size weighting, in float64."""
    p = np.asarray(probs, np.float64)
    p = np.clip(p / p.sum(axis=-1, keepdims=True), 1e-7, 1.0 - 1e-7)
    t = np.eye(p.shape[1])[y] if np.asarray(y).ndim == 1 else np.asarray(y, np.float64)
    t = t * (1.0 - smoothing) + smoothing / p.shape[1]
    per = -(t * np.log(p)).sum(axis=1)
    return float(((1.0 if weights is None else weights) * per).sum() / len(per))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_object_on_probabilities_clips_as_keras(dtype, smoothing):
    """(was: a probability of 0, underflowed from a confident softmax, gave inf and a
    divide-by-zero RuntimeWarning.) Called on probabilities, the loss is Keras': each row
    normalised and clipped to [1e-7, 1 - 1e-7] before its log, finite, with no warning; fit and
    evaluate still train on the logits before the softmax, unclipped."""
    model = net("layer", input_shape=(2,), dtype=dtype)
    model.set_weights([np.array([[400.0, -400.0, 0.0], [-400.0, 400.0, 0.0]], dtype),
                       np.zeros(3, dtype)])
    model.compile(loss=SoftmaxCrossEntropy(smoothing, from_logits=False), metrics=[],
                  optimizer=xpcnn.optim.SGD(0.0))
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.01, 0.0]], dtype)
    y = np.array([1, 1, 2, 0])
    probs = model.predict(x, verbose=0)
    assert (probs == 0).any() and (probs == 1).any()  # (underflowed, as the report's model)
    w = np.array([1.0, 0.5, 2.0, 1.5])
    loss = SoftmaxCrossEntropy(smoothing, from_logits=False)
    rel = 1e-6 if dtype == "float32" else 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for weights in (None, w):
            got = loss(y, probs, sample_weight=weights)
            assert got.dtype == np.dtype(dtype) and np.isfinite(got)
            assert float(got) == pytest.approx(
                _keras_on_probabilities(probs, y, smoothing, weights), rel=rel)
        # (float16 probabilities over many classes, some 0, computed in float32)
        many = np.zeros((2, 10000), np.float16)
        many[:, :4] = 0.25
        got = loss(np.array([0, 9999]), many)
        assert got.dtype == np.float32
        assert float(got) == pytest.approx(_keras_on_probabilities(many, [0, 9999], smoothing),
                                           rel=1e-6)
    # (training is unchanged: on the logits, so the confident mistake costs its logit gap)
    z = x @ model.get_weights()[0]
    logp = z - z.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    t = np.eye(3)[y] * (1.0 - smoothing) + smoothing / 3
    assert model.evaluate(x, y, verbose=0) == pytest.approx(-(t * logp).sum(axis=1).mean(),
                                                            rel=rel)
    assert model.evaluate(x, y, verbose=0) > 150.0  # (800 / 4 from row 0 alone: not clipped)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_loss_object_takes_torch_tensors(dtype):
    """(was: a torch tensor went through np.asarray, so the loss came back a NumPy array, and a
    bfloat16 one was refused as "not an array of numbers".) The loss of torch tensors is a 0-d
    torch tensor, computed in float64, else float32 (bfloat16 and float16 too), equal to
    PyTorch's cross_entropy of the same values; probabilities give the same tensor type."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    f = torch.nn.functional
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(size=(6, 4)) * 3).to(getattr(torch, dtype))
    labels = torch.tensor(rng.integers(0, 4, 6))
    w = torch.tensor(rng.random(6), dtype=torch.float64)
    want_dtype = torch.float64 if dtype == "float64" else torch.float32
    z = logits.to(want_dtype)  # (the values given, computed at least in float32)
    rel = 1e-12 if dtype == "float64" else 1e-6
    for smoothing in (0.0, 0.2):
        got = SoftmaxCrossEntropy(smoothing, from_logits=True)(labels, logits, sample_weight=w)
        per = f.cross_entropy(z.double(), labels, reduction="none", label_smoothing=smoothing)
        assert isinstance(got, torch.Tensor) and got.shape == () and got.dtype == want_dtype
        assert float(got) == pytest.approx(float((w * per).sum() / 6), rel=rel)
        probs = torch.softmax(z.double(), dim=1).to(getattr(torch, dtype))
        got = SoftmaxCrossEntropy(smoothing, from_logits=False)(labels, probs)
        assert isinstance(got, torch.Tensor) and got.dtype == want_dtype
        assert float(got) == pytest.approx(
            _keras_on_probabilities(probs.double().numpy(), labels.numpy(), smoothing),
            rel=rel)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("one_hot", [False, True])
def test_loss_object_takes_minus_inf_logits_as_pytorch(smoothing, one_hot):
    """(was: refused as "NaN or infinite values".) A logit of -inf, PyTorch's way to mask a
    class out, is a class of probability 0: the loss is PyTorch's of the labels, finite where
    no target weight falls on a masked class (inf where one does, as in PyTorch), with no
    warning; one-hot rows give the labels' loss (PyTorch's probability targets give NaN, as
    0 * -inf). +inf, NaN and a row with every class masked (PyTorch's NaN) are refused."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 4))
    logits[[0, 1, 3], [1, 3, 0]] = -np.inf
    labels = np.array([0, 2, 3, 1, 2])
    y = np.eye(4)[labels] if one_hot else labels
    loss = SoftmaxCrossEntropy(smoothing, from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (np.float64, np.float32):
            got = float(loss(y, logits.astype(dtype)))
            want = _torch_loss(logits, labels, smoothing)
            assert got == pytest.approx(want, rel=1e-12 if dtype == np.float64 else 1e-6)
            assert np.isfinite(got) == (smoothing == 0.0)  # (smoothing weighs masked classes)
        masked_target = logits.copy()
        masked_target[2, 3] = -np.inf
        assert float(loss(y, masked_target)) == _torch_loss(masked_target, labels,
                                                             smoothing) == np.inf
    for bad, message in ((np.inf, r"y_pred holds NaN or \+inf values; logits must be finite, "
                                  r"or -inf for a class of probability 0"),
                         (np.nan, r"y_pred holds NaN or \+inf values")):
        z = logits.copy()
        z[4, 2] = bad
        with pytest.raises(InputError, match=message):
            loss(y, z)
    z = logits.copy()
    z[3] = -np.inf
    assert np.isnan(float(torch.nn.functional.cross_entropy(torch.tensor(z[3:4]),
                                                            torch.tensor(labels[3:4]))))
    with pytest.raises(InputError, match=r"y_pred's row 3 is all -inf \(1 such rows\): a row "
                                         r"of logits needs one finite value"):
        loss(y, z)


def test_a_zero_loss_is_positive_zero():
    """(was: -0.0, where evaluate gives 0.0.) All-zero sample weights, or a target of
    probability 1, give a loss of +0.0, on logits and on a subclass's or xpcnn's path."""
    z = np.array([[0.0, -800.0, -800.0], [-900.0, 0.0, -900.0]])
    for loss, scores, w in ((SoftmaxCrossEntropy(from_logits=True), z, None),
                            (SoftmaxCrossEntropy(from_logits=True), z, np.zeros(2)),
                            (SoftmaxCrossEntropy(from_logits=True), np.zeros((2, 3)),
                             np.zeros(2)),
                            (SoftmaxCrossEntropy(from_logits=False), np.eye(3)[:2],
                             np.zeros(2))):
        got = loss(np.array([0, 1]), scores, sample_weight=w)
        assert float(got) == 0.0 and not np.signbit(got), (scores, w)


def array_api_namespace(a):
    import array_api_compat
    return array_api_compat.array_namespace(a)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("bad", [None, "nan", "row"])
def test_loss_object_checks_y_pred_where_it_is(monkeypatch, from_logits, bad):
    """(was: y_pred, a GPU's array, copied whole to the host to be checked.) Its checks run
    with its namespace on its device, only counts read back: no host copy of y_pred, nor of
    anything of its size; the same errors."""
    import xpcnn.losses as losses
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(1)
    scores = rng.random((6, 3)) + 0.1
    scores /= scores.sum(axis=1, keepdims=True)
    if bad == "nan":
        scores[4, 1] = np.nan
    elif bad == "row":
        scores[3] = [0.5, 0.7, -0.1]
    y_pred = xps.asarray(scores)
    read = []
    to_host = losses.to_host
    monkeypatch.setattr(losses, "to_host", lambda a: read.append(a) or to_host(a))
    loss = SoftmaxCrossEntropy(from_logits=from_logits)
    if bad == "nan":
        with pytest.raises(InputError, match=r"^y_pred holds NaN or \+inf values; logits must "
                           r"be finite, or -inf for a class of probability 0$" if from_logits
                           else r"^y_pred holds NaN or infinite values$"):
            loss(Y[:6], y_pred, sample_weight=np.ones(6))
    elif bad == "row" and not from_logits:
        with pytest.raises(InputError, match=r"from_logits=False\) takes y_pred as "
                           r"probabilities, each row >= 0 and summing to 1; row 3 sums to 1\.1 "
                           r"with a least value of -0\.1 \(1 such rows\)"):
            loss(Y[:6], y_pred, sample_weight=np.ones(6))
    else:
        got = loss(Y[:6], y_pred, sample_weight=np.ones(6))
        assert float(got) == pytest.approx(
            _torch_loss(scores if from_logits else np.log(scores), Y[:6]), rel=1e-12)
    assert read and all(np.size(a) < scores.size for a in read if hasattr(a, "shape")), \
        [getattr(a, "shape", a) for a in read]


@pytest.mark.parametrize("last", ["logits", "layer"])
def test_loss_object_called_matches_evaluate(last):
    model = net(last)
    model.compile(loss=SoftmaxCrossEntropy(0.1), optimizer="sgd", metrics=[])
    w = np.linspace(0.5, 2.0, len(Y))
    loss = SoftmaxCrossEntropy(0.1, from_logits=last == "logits")
    got = loss(Y, model(X), sample_weight=w)
    assert float(got) == pytest.approx(model.evaluate(X, Y, sample_weight=w, batch_size=12,
                                                      verbose=0), rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: SoftmaxCrossEntropy()(Y[:2], np.zeros((2, 3))),
     r"from_logits=None\) cannot tell whether y_pred holds logits or probabilities"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(Y[:3], np.zeros((2, 3))),
     r"y_true has 3 labels but y_pred has 2 rows"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(np.array([0, 5]), np.zeros((2, 3))),
     r"labels in y_true must be in \[0, 2\]"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(Y[:2], np.zeros(3)),
     r"y_pred must be a batch of scores, shape \(N, classes\)"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(Y[:2], np.zeros((2, 3), int)),
     r"y_pred must hold real floating-point scores, got dtype int64"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(Y[:2], np.full((2, 3), np.nan)),
     r"y_pred holds NaN or \+inf values"),
    (lambda: SoftmaxCrossEntropy(from_logits=False)(Y[:2], np.ones((2, 3))),
     r"from_logits=False\) takes y_pred as probabilities, each row >= 0 and summing to 1; row 0 "
     r"sums to 3"),
    (lambda: SoftmaxCrossEntropy(from_logits=True)(Y[:2], np.zeros((2, 3)), [1.0, -1.0]),
     r"sample_weight must be finite .* and >= 0; sample 1"),
])
def test_loss_object_called_refuses_bad_input(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize("loss", [["sparse_categorical_crossentropy"],
                                  ("cross_entropy",), [SoftmaxCrossEntropy(0.1)]])
def test_compile_takes_a_list_of_one_loss(loss):
    model = net("logits")
    model.compile(loss=loss, optimizer="sgd")
    assert type(model.loss) is SoftmaxCrossEntropy


@pytest.mark.parametrize("loss", [{"dense": "sparse_categorical_crossentropy"},
                                  ["cross_entropy", "cross_entropy"], []])
def test_compile_refuses_a_loss_per_output(loss):
    with pytest.raises(InputError, match=r"compile's loss must be one loss, got a (dict|list).*an "
                                         r"xpcnn model has one output, so pass its loss itself"):
        net("logits").compile(loss=loss, optimizer="sgd")


def test_the_swap_hint_covers_labels_cast_to_float():
    """Float labels passed as y_pred in PyTorch's order, ``loss(probs, labels.astype(
    "float32"))``, are told "arguments swapped?" as integer ones are (was: no hint); not a
    correct-order call with one-hot y_true, nor 1-D scores that are no labels, and the hint
    never fails on what it cannot read (a torch bfloat16 y_true, a ragged one)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 4).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    swapped = r"got shape \(4,\): arguments swapped\? SoftmaxCrossEntropy is called as Keras'"
    for from_logits in (True, False):
        loss = SoftmaxCrossEntropy(from_logits=from_logits)
        for y in (labels.astype(np.float32), labels.astype(np.float64),
                  torch.tensor(labels, dtype=torch.float32)):
            with pytest.raises(InputError, match=swapped):
                loss(probs, y)
        with pytest.raises(InputError, match=swapped):
            loss(torch.tensor(probs, dtype=torch.bfloat16), labels.astype(np.float32))
        for y_true, y_pred in [
                (np.eye(3, dtype=np.float32)[labels], labels.astype(np.float32)),  # (one-hot)
                (probs, np.array([0.5, 2, 1, 2], np.float32)),  # (not whole numbers)
                (probs, np.array([0, 3, 1, 2], np.float32)),  # (no class of 3)
                (probs, labels[:3].astype(np.float32)),  # (not one per row)
                ([[1.0, 2.0], [3.0], [1.0], [2.0]], labels.astype(np.float32))]:  # (ragged)
            with pytest.raises(InputError, match=r"got shape \(\d,\)$"):
                loss(y_true, y_pred)


def test_a_plain_function_as_the_loss_is_told_how_to_write_one():
    def my_loss(y_true, y_pred):
        return y_pred

    with pytest.raises(InputError, match=r"^unknown loss <function .*my_loss.*: a loss of "
                                         r"one's own \(a function, Keras' way\) is a subclass "
                                         r"of SoftmaxCrossEntropy overriding forward\(self, xp, "
                                         r"logits, y, dtype, weights=None\), returning .*no "
                                         r"automatic differentiation"):
        net("logits").compile(loss=my_loss)
    with pytest.raises(InputError, match=r": pass an instance, SoftmaxCrossEntropy\(\), not "
                                         r"the class$"):
        net("logits").compile(loss=SoftmaxCrossEntropy)


class Unnamed(SoftmaxCrossEntropy):
    def get_config(self):  # (no "class": a file would load xpcnn's cross-entropy instead)
        return {"label_smoothing": self.label_smoothing}


def test_a_loss_subclass_config_not_naming_its_class_is_refused_at_save(tmp_path):
    model = net("logits")
    model.compile(loss=Unnamed(0.1), optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"^loss class Unnamed's get_config\(\) gives no "
                                         r"'class': it must return a dict with 'class': "
                                         r"'Unnamed' and the constructor's arguments"):
        model.save(tmp_path / "u.npz")
    assert not (tmp_path / "u.npz").exists()


def test_a_loss_set_after_construction_is_checked_as_the_constructor_checks_it():
    """``loss.label_smoothing = 5`` trained on targets of weight -4 (nothing refused it), and
    ``model.loss = "mse"`` failed at the next step with an AttributeError from deep inside:
    both are refused where they are set, the old value kept."""
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer="sgd")
    loss = model.loss
    for bad, message in ((5, "label_smoothing must be in [0, 1), got 5"),
                         (True, "label_smoothing must be in [0, 1), got True")):
        with pytest.raises(InputError, match=re.escape(message)):
            loss.label_smoothing = bad
    with pytest.raises(InputError, match="from_logits must be True, False or None, got 1"):
        loss.from_logits = 1
    assert (loss.label_smoothing, loss.from_logits) == (0.0, None)
    loss.label_smoothing = 0.25
    assert loss.label_smoothing == 0.25
    with pytest.raises(InputError, match="unknown loss 'mse'; expected one of"):
        model.loss = "mse"
    with pytest.raises(InputError, match="model.loss = None: a compiled model trains by a loss"):
        model.loss = None
    assert model.loss is loss
    model.build((4, 4, 1))
    with pytest.raises(InputError, match=r"from_logits=True\) takes the model's outputs as "
                                         "logits, but its last layer 'softmax'"):
        model.loss = SoftmaxCrossEntropy(from_logits=True)
    model.loss = "categorical_crossentropy"
    assert type(model.loss) is SoftmaxCrossEntropy and model.loss is not loss
    x, y = np.random.default_rng(0).random((8, 4, 4, 1), np.float32), np.arange(8) % 3
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])


def test_only_a_losses_settings_count_as_changes_that_recapture_a_step():
    """A change of a loss's setting (its constructor's) counts, for the CUDA graphs that baked
    it in; an attribute a subclass writes at every step does not (each write counted made
    every step a change: its steps were never captured, silently)."""

    class Focal(SoftmaxCrossEntropy):
        def __init__(self, gamma=2.0, label_smoothing=0.0):
            super().__init__(label_smoothing)
            self.gamma = gamma

    loss, before = Focal(), SoftmaxCrossEntropy.settings_changes
    for _ in range(3):
        loss.last_batch = np.zeros(3)  # (a per-step record of its own)
    loss.gamma = 2.0  # (set again unchanged)
    assert SoftmaxCrossEntropy.settings_changes == before
    loss.gamma, loss.label_smoothing = 3.0, 0.1
    assert SoftmaxCrossEntropy.settings_changes == before + 2
