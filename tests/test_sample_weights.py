"""Keras' ``sample_weight`` and ``class_weight``: each sample's term of the loss weighted, the sum
still divided by the batch's size; accuracy unweighted. Checked against PyTorch (the weighted
loss's gradient against finite differences: tests/test_gradients.py) and against what weights
mean (a weight of 0 drops a sample, a class's weight is the weight of each of its samples),
through fit, evaluate, train_on_batch and train_step, on NumPy's fast path, under
array_api_strict and through captured steps."""

import re
import warnings

import array_api_strict as xs
import numpy as np
import pytest
from nets import gap_net

import xpcnn
from xpcnn import optim
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Flatten, GlobalAvgPool2D, ReLU, Rescaling, Softmax
from xpcnn.models import build_layers
from xpcnn.totals import READ_EVERY


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 40),
            rng.uniform(0.0, 3.0, 40))


def _net():
    """No layer that mixes the samples of a batch (BatchNorm would): a sample's weight is
    then all that decides its share of a step."""
    return [Rescaling(1 / 255), Conv2D(5, 3, padding="same"), ReLU(), GlobalAvgPool2D(),
            Dense(4), Softmax()]


def _model(device="cpu", dtype="float64", net=_net, lr=0.1):
    model = xpcnn.Sequential(net(), device=device, seed=2, dtype=dtype)
    model.compile(optimizer=optim.SGD(lr, momentum=0.9))
    return model


def _same(a, b, rtol=1e-12, atol=1e-14):
    for i, (u, v) in enumerate(zip(a.get_weights(), b.get_weights(), strict=True)):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=f"weight array {i}")


def test_weighted_steps_match_pytorch_in_float64():
    """train_step's sample_weight and train_on_batch's class_weight and sample_weight against
    PyTorch: the per-sample cross-entropy times the weights, summed, over N (PyTorch's own
    ``weight=`` divides by the weights' sum instead, so it is not the reference)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from torch_mirror import mirror, mirror_optimizer

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    w = rng.uniform(0.0, 2.0, 12)
    table = rng.uniform(0.5, 3.0, 10)
    model = xpcnn.Sequential(build_layers("mnist"), input_shape=(28, 28, 1),
                             seed=0, dtype="float64")
    opt = optim.SGD(0.02, momentum=0.9, nesterov=True, weight_decay=1e-3)
    model.compile(optimizer=opt)
    twin = mirror(model, torch.float64)
    topt = mirror_optimizer(opt, twin.parameters())
    for step in range(3):
        idx = slice(4 * step, 4 * step + 4)
        weights = w[idx] * (table[y[idx]] if step else 1.0)
        if step:  # class weights by train_on_batch, the step's weights their product
            ours = model.train_on_batch(x[idx], y[idx], sample_weight=w[idx],
                                        class_weight=dict(enumerate(table)))[0]
        else:
            ours, _ = model.train_step(model.backend.asarray(x[idx].astype(np.float64)),
                                       model.backend.asarray(y[idx]),
                                       sample_weight=model.backend.asarray(w[idx]))
        logits = twin(torch.from_numpy(x[idx].astype(np.float64)))
        each = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[idx]),
                                                 reduction="none")
        loss = (each * torch.from_numpy(weights)).sum() / 4
        topt.zero_grad()
        loss.backward()
        topt.step()
        assert float(ours) == pytest.approx(loss.item(), rel=1e-10), f"step {step}"
    first = next(m for m in twin if isinstance(m, torch.nn.Conv2d))
    np.testing.assert_allclose(model.get_weights()[0],
                               first.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-9,
                               atol=1e-12)
    assert model._class_weights is None  # (train_on_batch's class weights end with it)


def test_train_on_batch_checks_its_weights_once_on_the_host(data, monkeypatch):
    """train_on_batch checks its weights on the host, as fit does, and its step does not check
    them again on the device (was: the public train_step's device check too, two launches
    more a step on CuPy); train_step called directly checks them there, and both train alike."""
    from xpcnn.training import step as step_module

    checked = []
    device_check = step_module._nan_unless_weights

    def counted(*args):
        checked.append(1)
        return device_check(*args)

    monkeypatch.setattr(step_module, "_nan_unless_weights", counted)
    x, y, w = data
    models = []
    for call in ("train_on_batch", "train_step"):
        model = _model()
        model.build((8, 8, 3))
        if call == "train_on_batch":
            model.train_on_batch(x[:8], y[:8], sample_weight=w[:8])
            assert checked == []
        else:
            model.train_step(*(model.backend.asarray(a) for a in (x[:8], y[:8], w[:8])))
            assert checked == [1]
        models.append(model)
    _same(*models, rtol=0, atol=0)


def test_a_weight_of_zero_drops_a_sample(data):
    """A whole-batch SGD step weighing half the samples 0 and the rest 2 is the step on that
    rest alone (the sum over N of twice their losses is the mean of theirs)."""
    x, y, _ = data
    keep = np.arange(40) % 2 == 0
    weighted, alone = _model(), _model()
    weighted.fit(x, y, epochs=3, batch_size=40, verbose=0, shuffle=False,
                 sample_weight=np.where(keep, 2.0, 0.0))
    alone.fit(x[keep], y[keep], epochs=3, batch_size=20, verbose=0, shuffle=False)
    _same(weighted, alone, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_class_weight_is_the_sample_weight_of_each_of_its_samples(data, one_hot):
    """class_weight (classes left out weigh 1) trains as the sample weights it gives each
    label, shuffled alike, bit for bit; unit weights as none (the standard loss instead of the
    fused kernel: to rounding)."""
    x, y, _ = data
    targets = np.eye(4)[y] if one_hot else y
    table = np.array([2.0, 0.5, 1.0, 3.0])
    by_class, by_sample, unit, plain = (_model() for _ in range(4))
    h_class = by_class.fit(x, targets, epochs=2, batch_size=16, verbose=0,
                           class_weight={0: 2.0, 1: 0.5, 3: 3.0})
    h_sample = by_sample.fit(x, targets, epochs=2, batch_size=16, verbose=0,
                             sample_weight=table[y])
    assert h_class.history["loss"] == h_sample.history["loss"]
    _same(by_class, by_sample, rtol=0, atol=0)
    unit.fit(x, targets, epochs=2, batch_size=16, verbose=0, sample_weight=np.ones(40))
    plain.fit(x, targets, epochs=2, batch_size=16, verbose=0)
    _same(unit, plain)


def test_class_weight_and_sample_weight_multiply(data):
    x, y, w = data
    both, product = _model(), _model()
    both.fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
             class_weight={2: 4.0})
    product.fit(x, y, epochs=2, batch_size=16, verbose=0,
                sample_weight=w * np.where(y == 2, 4.0, 1.0))
    _same(both, product, rtol=1e-13, atol=1e-15)


def test_evaluate_weighs_the_loss_not_the_accuracy(data):
    """Against the model's own probabilities: sum(w * -log p[y]) / N, and the unweighted share
    of samples whose highest probability is their class."""
    x, y, w = data
    model = _model()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    p = model.predict(x)
    loss, accuracy = model.evaluate(x, y, sample_weight=w, batch_size=16)
    assert loss == pytest.approx(np.sum(w * -np.log(p[np.arange(40), y])) / 40, rel=1e-10)
    assert accuracy == pytest.approx(np.mean(np.argmax(p, axis=1) == y))
    assert model.evaluate(x, y)[1] == accuracy


def test_validation_data_and_validation_split_carry_their_weights(data):
    """A triple's weights weigh the validation loss; validation_split splits the weights as
    it splits x and y; fit's class_weight weighs training alone (as in Keras)."""
    x, y, w = data
    split = _model()
    history = split.fit(x, y, epochs=1, batch_size=16, verbose=0, sample_weight=w,
                        validation_split=0.25, class_weight={0: 5.0})
    assert history.history["val_loss"][0] == pytest.approx(
        split.evaluate(x[30:], y[30:], sample_weight=w[30:])[0], rel=1e-12)
    same = _model()
    same.fit(x[:30], y[:30], epochs=1, batch_size=16, verbose=0, sample_weight=w[:30],
             class_weight={0: 5.0})
    _same(split, same, rtol=0, atol=0)
    history = _model().fit(x, y, epochs=1, batch_size=16, verbose=0,
                           validation_data=(x[:8], y[:8], np.zeros(8)))
    assert history.history["val_loss"] == [0.0]


def test_under_array_api_strict_as_on_numpy(data):
    """The weighted loss and the class-weight lookup in the standard alone, on the model's
    device, against NumPy's fast path."""
    x, y, w = data
    runs = []
    for device in (xs, "cpu"):
        model = _model(device, net=gap_net, lr=0.05)
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
                            class_weight={1: 2.0}, validation_data=(x[:8], y[:8], w[:8]))
        runs.append((model, history))
    (strict, h_strict), (numpy, h_numpy) = runs
    assert h_strict.history["loss"] == pytest.approx(h_numpy.history["loss"], rel=1e-10)
    assert h_strict.history["val_loss"] == pytest.approx(h_numpy.history["val_loss"],
                                                         rel=1e-10)
    _same(strict, numpy, rtol=1e-9, atol=1e-12)


def test_sample_weights_on_the_device_and_a_train_step_that_takes_them(data):
    """Weights given as arrays of the model's library; a train_step override gets them as
    ``sample_weight=`` (one without that parameter is refused before training: its weights
    would be lost)."""
    x, y, w = data
    seen = []

    class Logged(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            seen.append(sample_weight.shape)
            return super().train_step(xb, yb, sample_weight=sample_weight)

    class Deaf(xpcnn.Sequential):
        def train_step(self, xb, yb):
            return super().train_step(xb, yb)

    logged = Logged(_net(), device=xs, seed=2, dtype="float64")
    logged.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    logged.fit(x, y, epochs=1, batch_size=16, verbose=0, sample_weight=xs.asarray(w))
    assert seen == [(16,), (16,), (8,)]
    reference = _model(xs)
    reference.fit(x, y, epochs=1, batch_size=16, verbose=0, sample_weight=w)
    _same(logged, reference, rtol=0, atol=0)
    deaf = Deaf(_net(), seed=2, dtype="float64")
    deaf.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    refused = r"train_step\(xb, yb\) takes no sample_weight"
    with pytest.raises(InputError, match=refused):
        deaf.fit(x, y, verbose=0, sample_weight=w)
    with pytest.raises(InputError, match=refused):  # (weights from a dataset: at its first)
        deaf.fit(_Samples(x, y, w), verbose=0)
    assert deaf.optimizer.iterations == 0
    # class weights are applied inside super().train_step, which this one calls
    deaf.fit(x, y, batch_size=16, verbose=0, class_weight={0: 2.0})
    reference = _model()
    reference.fit(x, y, batch_size=16, verbose=0, sample_weight=np.where(y == 0, 2.0, 1.0))
    _same(deaf, reference, rtol=0, atol=0)


@pytest.mark.parametrize("on", ["numpy", "array_api_strict", "mixed_float16"])
@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf, 1e39])
def test_train_step_never_trains_on_weights_that_fit_refuses(data, bad, on):
    """train_step's sample_weight, checked on the device with no host read, as its labels
    are: a weight below 0 or not finite (in the model's float32) makes the step's loss NaN,
    its update and every later one skipped (the float16 loss scale kept: no overflow to
    rescale), and the host names the weight when it next reads the totals. (was: a negative
    weight trained, a gradient ascent on that sample, with no error; a NaN or infinite one
    stopped training naming the loss)"""
    x, y, w = data
    model = xpcnn.Sequential(_net(), device=xs if on == "array_api_strict" else np, seed=2)
    model.compile(optimizer=optim.SGD(0.1, momentum=0.9),
                  precision="mixed_float16" if on == "mixed_float16" else "float32")
    model.build((8, 8, 3))
    xb, yb = model.backend.asarray(x[:8]), model.backend.asarray(y[:8])
    good = w[:8].copy()
    weights = good.copy()
    weights[[3, 6]] = bad
    before, scale = model.get_weights(), model.loss_scale
    loss, _ = model.train_step(xb, yb, sample_weight=model.backend.asarray(weights))
    assert not np.isfinite(float(loss))
    with pytest.raises(InputError, match=(
            r"training stopped at step 1: sample_weight must be finite \(in float32\) and >= "
            rf"0; sample 3 has weight {re.escape(repr(bad))} \(2 such samples\); nothing was "
            "updated from that step on")):
        for _ in range(READ_EVERY):  # the host reads the totals every READ_EVERY steps
            model.train_step(xb, yb, sample_weight=model.backend.asarray(good))
    assert model.optimizer.iterations == 0 and model.loss_scale == scale
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # the weights fit takes train the next steps, read without an error
    model.train_step(xb, yb, sample_weight=model.backend.asarray(good))
    assert model.train_on_batch(x[:8], y[:8], sample_weight=good)[0] > 0
    assert model.optimizer.iterations == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_weight": np.ones(39)}, r"one weight for each of the 40 samples, shape \(40,\); "
                                     r"got shape \(39,\)"),
    ({"sample_weight": np.ones((40, 2))}, r"shape \(40,\); got shape \(40, 2\)"),
    ({"sample_weight": np.r_[np.ones(39), -1.0]}, r"finite \(in float64\) and >= 0; sample "
                                                 r"39 has weight -1\.0"),
    ({"sample_weight": np.r_[np.nan, np.ones(39)]}, r"finite \(in float64\) and >= 0; "
                                                   r"sample 0 has weight"),
    ({"sample_weight": np.ones(40, bool)}, "must hold real numbers, one weight a sample"),
    ({"class_weight": [1.0, 2.0]}, "class_weight must be a dict mapping class indices"),
    ({"class_weight": {4: 1.0}}, r"keys must be class indices in \[0, 3\] for a model of 4 "
                                 r"classes \(its output's size\), got 4"),
    # (Keras' class weights keyed by output name: was "for a model with 4 outputs, got 'out'")
    ({"class_weight": {"out": {0: 1.0, 1: 2.0}}},
     r"class_weight is a dict \(keys \['out'\]\): an xpcnn model has one output, whose class "
     r"weights are one dict mapping class indices to weights, e\.g\. \{0: 1\.0, 1: 5\.0\}, "
     r"not keyed by output name; pass class_weight\['out'\] itself"),
    ({"class_weight": {True: 1.0}}, "keys must be class indices"),
    ({"class_weight": {0: -2.0}}, r"class_weight\[0\] must be a number >= 0, got -2\.0"),
    ({"class_weight": {0: float("inf")}}, r"class_weight\[0\] must be a number >= 0"),
])
def test_bad_weights_are_named_and_change_nothing(data, kwargs, message):
    x, y, _ = data
    model = _model()
    with pytest.raises(InputError, match=message):
        model.fit(x, y, verbose=0, **kwargs)
    assert not model.built and model.optimizer.iterations == 0 and model._class_weights is None


def test_weights_are_refused_with_streams_and_named_for_validation_data(data):
    x, y, w = data
    model = _model()
    batches = iter([(x[:8], y[:8])])
    with pytest.raises(InputError, match="sample_weight= needs arrays x and y"):
        model.fit(batches, steps_per_epoch=1, verbose=0, sample_weight=w)
    assert next(batches)[0] is not None  # (no batch was drawn)
    with pytest.raises(InputError, match="sample_weight= needs arrays x and y"):
        model.fit(x, y, verbose=0, validation_data=(iter([(x, y)]), None, w[:8]))
    with pytest.raises(InputError, match="sample_weight= needs arrays x and y"):
        model.evaluate(iter([(x, y)]), steps=1, sample_weight=w)
    with pytest.raises(InputError, match=r"the sample weights of x_val must have one weight "
                                         r"for each of the 8 samples"):
        model.fit(x, y, verbose=0, validation_data=(x[:8], y[:8], w[:7]))
    with pytest.raises(InputError, match=r"a triple \(x_val, y_val, sample weights\)"):
        model.fit(x, y, verbose=0, validation_data=(x, y, w, w))


def test_resuming_needs_the_same_sample_and_class_weights(data, tmp_path):
    x, y, w = data
    path = tmp_path / "run.npz"
    _model().fit(x, y, epochs=1, batch_size=16, verbose=0, sample_weight=w,
                 class_weight={1: 2.0}, checkpoint=path)
    with pytest.raises(InputError, match="they differ in sample_weight_crc32"):
        _model().fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w[::-1],
                     class_weight={1: 2.0}, checkpoint=path, resume=True)
    with pytest.raises(InputError, match="they differ in class_weight"):
        _model().fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
                     checkpoint=path, resume=True)
    resumed = _model()
    resumed.fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
                class_weight={1: 2.0}, checkpoint=path, resume=True)
    straight = _model()
    straight.fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
                 class_weight={1: 2.0})
    _same(resumed, straight, rtol=0, atol=0)


def test_a_dense_only_model_takes_weights_with_one_hot_targets(data):
    """No convolution: the weights reach the loss whatever the layers."""
    x, y, w = data
    model = xpcnn.Sequential([Rescaling(1 / 255), Flatten(), Dense(4)], seed=0,
                             dtype="float64")
    model.compile(optimizer=optim.SGD(0.01))
    before = model.evaluate(x, np.eye(4)[y], sample_weight=w)[0]
    model.fit(x, np.eye(4)[y], epochs=3, batch_size=8, verbose=0, sample_weight=w)
    assert model.evaluate(x, np.eye(4)[y], sample_weight=w)[0] < before


class _Samples:
    """A map-style dataset of (x_i, y_i, w_i) (w_i None for the samples ``unweighted`` names)."""

    def __init__(self, x, y, w, unweighted=()):
        self.x, self.y, self.w, self.unweighted = x, y, w, set(unweighted)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], None if i in self.unweighted else self.w[i]


def test_datasets_and_generators_give_their_weights_as_a_third_item(data):
    """(x, y, sample_weight) batches from a generator and (x_i, y_i, w_i) samples from a
    dataset (shuffled as arrays are) train as arrays given sample_weight, bit for bit; the
    validation data and evaluate take them too."""
    x, y, w = data
    arrays = _model()
    h_arrays = arrays.fit(x, y, epochs=2, batch_size=16, verbose=0, sample_weight=w,
                          validation_data=(x[:8], y[:8], w[:8]))
    dataset = _model()
    h_dataset = dataset.fit(_Samples(x, y, w), epochs=2, batch_size=16, verbose=0,
                            validation_data=_Samples(x[:8], y[:8], w[:8]))
    assert h_dataset.history == {**h_arrays.history, "seconds": h_dataset.history["seconds"]}
    _same(dataset, arrays, rtol=0, atol=0)
    unshuffled, generated = _model(), _model()
    unshuffled.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False, sample_weight=w)
    generated.fit(((x[i:i + 16], y[i:i + 16], w[i:i + 16]) for i in range(0, 40, 16)),
                  steps_per_epoch=3, verbose=0)
    _same(generated, unshuffled, rtol=0, atol=0)
    batches = [(x[i:i + 16], y[i:i + 16], w[i:i + 16]) for i in range(0, 40, 16)]
    assert generated.evaluate(iter(batches), steps=3) == \
        generated.evaluate(x, y, sample_weight=w)


def test_a_streams_bad_or_missing_weights_are_named(data):
    x, y, w = data
    with pytest.raises(InputError, match=r"x\[i\] returns a sample weight w_i for some i and "
                                         r"not for others"):
        _model().fit(_Samples(x, y, w, unweighted=[3]), batch_size=8, shuffle=False, verbose=0)
    with pytest.raises(InputError, match=r"the sample weights w_i of x must be finite \(in "
                                         r"float64\) and >= 0; sample 25 has weight -1\.0"):
        _model().fit(_Samples(x, y, np.where(np.arange(40) == 25, -1.0, w)), batch_size=8,
                     verbose=0)  # (shuffled: the dataset's index is named, not the batch's)
    with pytest.raises(InputError, match=r"sample_weight must be finite \(in float32\) and "
                                         r">= 0; sample 2 has weight 1e\+39"):
        _model(dtype="float32").fit(x, y, verbose=0, sample_weight=np.where(
            np.arange(40) == 2, 1e39, 1.0))  # (finite in float64, not in float32)
    later = _Samples(x, y, w, unweighted=range(16, 40))  # weighted first, then not
    with pytest.raises(InputError, match=r"x\[i\] returns a sample weight w_i for some i and "
                                         r"not for others \(samples \[16, "):
        _model().fit(later, batch_size=8, shuffle=False, verbose=0)
    batches = iter([(x[:8], y[:8], w[:8]), (x[8:16], y[8:16])])
    with pytest.raises(InputError, match="x yields sample weights with some batches and not "
                                         "with others: give every sample a weight, or none"):
        _model().fit(batches, steps_per_epoch=2, verbose=0)
    with pytest.raises(InputError, match=r"the sample weights that x yields must have one "
                                         r"weight for each of the 8 samples"):
        _model().fit(iter([(x[:8], y[:8], w[:3])]), steps_per_epoch=1, verbose=0)


def test_predict_takes_the_training_datasets_triples(data):
    """predict ignores y and the weights of (x, y, w) items, as Keras does."""
    x, y, w = data
    model = _model()
    model.fit(_Samples(x, y, w), batch_size=16, verbose=0)
    np.testing.assert_array_equal(model.predict(_Samples(x, y, w)), model.predict(x))
    batches = [(x[i:i + 16], y[i:i + 16], w[i:i + 16]) for i in range(0, 40, 16)]
    np.testing.assert_array_equal(model.predict(iter(batches), steps=3), model.predict(x))


def test_a_callbacks_train_on_batch_leaves_fits_class_weights(data):
    """train_on_batch from a callback during fit, with class weights of its own: its step is
    weighted by them, and every later step of the fit by the fit's again (as when the callback
    gives the same weights as sample weights)."""
    x, y, _ = data
    other = np.array([0.5, 3.0, 1.0, 2.0])
    runs, after = [], []
    for by_class in (True, False):
        model = _model()
        extra = {"class_weight": dict(enumerate(other))} if by_class else {
            "sample_weight": other[y[:8]]}

        def step(batch, logs, model=model, extra=extra):
            if batch == 0:
                model.train_on_batch(x[:8], y[:8], **extra)
                after.append(np.array(model._class_weights))  # (fit's, back in place)

        model.fit(x, y, epochs=2, batch_size=16, verbose=0, class_weight={2: 4.0},
                  callbacks=[xpcnn.callbacks.LambdaCallback(on_train_batch_end=step)])
        runs.append(model)
    _same(*runs, rtol=0, atol=0)
    np.testing.assert_array_equal(after, [[1.0, 1.0, 4.0, 1.0]] * 4)
    assert runs[0]._class_weights is None and runs[0].optimizer.iterations == 8


def test_class_weights_and_their_products_with_sample_weights_fit_the_models_dtype(data):
    """A class weight finite in float64 but not in the model's float32 (1e39) is refused
    before training, naming it, as such a sample weight is; so is a sample weight whose
    product with its class's weight overflows (1e20 x 1e20): both made every weight NaN and
    stopped training at step 1, blaming the loss. Arrays are checked before training, the
    batches of a generator or dataset as they come; validation data carry no class weight."""
    x, y, w = data
    first = int(np.flatnonzero(y == 1)[0])
    heavy = np.where(y == 1, 1e20, 1.0)
    product = (r"times class_weight must be finite in float32, the model's dtype \(at most "
               r"3\.40282e\+38\); sample {} has weight 1e\+20 and class 1, whose "
               r"class_weight\[1\] is 1e\+20: their product overflows \(\d+ such")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no RuntimeWarning from a cast deep inside)
        for kwargs, message in [
                ({"class_weight": {1: 1e39}}, r"class_weight\[1\] must be finite in float32, "
                                              r"the model's dtype, which weighs the loss \(at "
                                              r"most 3\.40282e\+38\), got 1e\+39"),
                ({"sample_weight": heavy, "class_weight": {1: 1e20}},
                 "sample_weight " + product.format(first)),
                ({"sample_weight": heavy, "class_weight": {1: 1e20}, "validation_split": 0.25},
                 "sample_weight " + product.format(first))]:
            model = _model(dtype="float32")
            with pytest.raises(InputError, match=message):
                model.fit(x, y, verbose=0, **kwargs)
            assert not model.built and model.optimizer.iterations == 0
            assert model._class_weights is None
        model = _model(dtype="float32")
        with pytest.raises(InputError, match="sample_weight " + product.format(first)):
            model.train_on_batch(x, y, sample_weight=heavy, class_weight={1: 1e20})
        with pytest.raises(InputError, match=r"class_weight\[2\] must be finite in float32"):
            model.train_on_batch(x, y, class_weight={2: 1e39})
        assert model.optimizer.iterations == 0
        with pytest.raises(InputError, match="the sample weights that x yields " +
                           product.format(first)):
            _model(dtype="float32").fit(iter([(x, y, heavy)]), steps_per_epoch=1,
                                        verbose=0, class_weight={1: 1e20})
        # (shuffled: the dataset's index of the sample is named)
        with pytest.raises(InputError, match="the sample weights w_i of x " +
                           product.format(r"\d+")):
            _model(dtype="float32").fit(_Samples(x, y, heavy), batch_size=8, verbose=0,
                                        class_weight={1: 1e20})
    # (in float64 all of them are finite; a heavy sample of another class, and heavy
    # validation weights, are no overflow; a tiny rate keeps the weights finite)
    _model(lr=1e-30).fit(x, y, epochs=1, verbose=0, sample_weight=heavy, class_weight={1: 1e20})
    model = _model(dtype="float32", lr=1e-30)
    model.fit(x, y, epochs=1, verbose=0, sample_weight=np.where(y == 0, 1e20, 1.0),
              class_weight={1: 1e20}, validation_data=(x[:8], y[:8], heavy[:8]))
    assert model.optimizer.iterations == 2


@pytest.mark.parametrize("weight", [2.0, np.array(2.0), np.float32(2.0)])
def test_one_number_as_sample_weight_is_refused_saying_what_to_pass(data, weight):
    """Keras 3 refuses ``sample_weight=2.0`` (a ValueError "Unrecognized data type") and a 0-d
    array (an IndexError); so does xpcnn, with what to pass instead (was: "got shape ()"), and
    that array weighs the loss as Keras' does: twice the unweighted loss (Keras 3.15's
    evaluate of a small Dense model: 0.8872 unweighted, 1.7745 with np.full(8, 2.0), the
    weighted losses summed over N, not over the weights' sum)."""
    x, y, _ = data
    model = _model()
    for call in (model.fit, model.evaluate):
        with pytest.raises(InputError, match=r"sample_weight is one number, 2\.0, where it takes "
                                             r"one weight for each of the 40 samples, shape "
                                             r"\(40,\): to weigh every sample 2\.0, pass "
                                             r"np\.full\(40, 2\.0\)"):
            call(x, y, sample_weight=weight, verbose=0)
    assert not model.built and model.optimizer.iterations == 0
    plain = model.evaluate(x, y, verbose=0)[0]
    np.testing.assert_allclose(model.evaluate(x, y, sample_weight=np.full(40, 2.0), verbose=0)[0],
                               2 * plain, rtol=1e-12)
