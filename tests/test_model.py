"""Sequential: the Keras-like API, model files, weights layouts, precision, errors."""

import functools
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest
from nets import every_layer_net, gap_net, plan_of

import xpcnn
import xpcnn.callbacks
from xpcnn.backend import PRECISIONS
from xpcnn.errors import DataFormatError, DeviceError, InputError, NonFiniteError
from xpcnn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.models import build_layers


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 48)


def trained(data, net=every_layer_net, **compile_kwargs):
    model = xpcnn.Sequential(net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), **compile_kwargs)
    model.fit(*data, epochs=1, batch_size=16, verbose=0)
    return model


def test_fit_returns_history_and_learns_a_separable_task():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 256)
    x = rng.normal(0, 20, (256, 6, 6, 1)) + 128
    x[y == 1, 1:4, 1:4, :] += 60  # a bright square marks class 1
    model = xpcnn.Sequential(gap_net(classes=2), seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    # Enough epochs for BatchNorm's running statistics (used in validation) to catch up.
    history = model.fit(x.astype(np.uint8), y, epochs=12, batch_size=32, verbose=0,
                        validation_split=0.25)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.epoch) == 12
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.9


def test_notebook_network_trains_with_add_compile_fit(data):
    model = xpcnn.Sequential(seed=0)
    for layer in build_layers("notebook"):
        model.add(layer)
    model.compile(loss="cross_entropy", optimizer="adam", metrics=["accuracy"])
    x, y = data
    h = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert h.history["accuracy"][-1] > h.history["accuracy"][0]


def test_predict_returns_probabilities_and_evaluate_matches(data):
    model = trained(data)
    x, y = data
    p = model.predict(x)
    assert p.shape == (48, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    result = model.evaluate(x, y, batch_size=7, return_dict=True)
    assert result["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert result["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(48), y])), rel=1e-4)
    assert model.evaluate(x, y, batch_size=7) == [result["loss"], result["accuracy"]]  # (Keras'
    assert list(result) == list(model.metrics_names)  # order: loss, acc = model.evaluate(...))


def test_calling_a_model_on_a_batch_gives_predicts_outputs_in_inference_mode(data):
    """Keras' ``model(x)``: the outputs predict gives (probabilities after a final softmax),
    in inference mode (Dropout off, BatchNorm's moving statistics, none of them moved); an
    unbuilt model builds for the batch; a dataset or training=True is refused by name."""
    model = trained(data)
    x = data[0][:7]
    state = [np.copy(w) for w in model.get_weights()]
    out = model(x)
    assert isinstance(out, np.ndarray) and out.shape == (7, 10) and out.dtype == np.float32
    np.testing.assert_array_equal(out, model.predict(x))
    np.testing.assert_array_equal(model(x, training=False), out)  # (the same twice: no Dropout)
    for before, after in zip(state, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    fresh = xpcnn.Sequential([Flatten(), Dense(4)], seed=0, dtype="float64")
    logits = fresh(x.astype(np.float64))
    kernel, bias = fresh.get_weights()
    np.testing.assert_allclose(logits, x.reshape(7, -1) @ kernel + bias, rtol=1e-12)
    with pytest.raises(InputError, match="^model 'sequential.*' called with training=True: a "
                                         "model call runs it for inference; fit, "
                                         r"train_on_batch and train_step train it\. A "
                                         r"training pass's output is model\.layer_outputs"):
        model(x, training=True)
    with pytest.raises(InputError, match="^model\\(x\\) runs the model on one batch of "
                                         "arrays, got generator; predict\\(x\\) reads"):
        model(b for b in [(x, data[1][:7])])
    with pytest.raises(InputError, match="per-sample shape \\(9, 8, 3\\) but the model "
                                         "expects \\(8, 8, 3\\)"):
        model(np.zeros((2, 9, 8, 3), np.float32))


def test_a_model_compiled_without_metrics_logs_and_returns_the_loss_alone(data, tmp_path):
    # Keras' rule: no metrics, no accuracy in the logs, and evaluate returns a number.
    x, y = data
    with_acc = trained(data)
    without = trained(data, metrics=[])
    assert with_acc.metrics_names == ("loss", "accuracy") and without.metrics_names == ("loss",)
    # (the same training: the metric changes only what is reported)
    for a, b in zip(with_acc.get_weights(), without.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    loss = without.evaluate(x, y, batch_size=7)
    assert isinstance(loss, float)
    assert loss == with_acc.evaluate(x, y, batch_size=7, return_dict=True)["loss"]
    assert without.evaluate(x, y, batch_size=7, return_dict=True) == {"loss": loss}
    assert isinstance(without.train_on_batch(x[:8], y[:8]), float)
    assert list(with_acc.train_on_batch(x[:8], y[:8], return_dict=True)) == ["loss", "accuracy"]
    seen = []
    h = without.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_split=0.25,
                    callbacks=[xpcnn.callbacks.LambdaCallback(
                        on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))])
    assert set(h.history) == {"loss", "val_loss", "seconds"}
    assert seen and all(list(logs) == ["loss"] for logs in seen)
    # A model file keeps the choice; compiling again changes it.
    without.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").metrics_names == ("loss",)
    without.compile(metrics="accuracy")
    assert len(without.evaluate(x, y)) == 2


@pytest.mark.parametrize("callback", [
    lambda: xpcnn.callbacks.EarlyStopping(monitor="val_accuracy"),
    lambda: xpcnn.callbacks.ReduceLROnPlateau(monitor="accuracy"),
    lambda: xpcnn.callbacks.ModelCheckpoint("best.npz", monitor="accuracy",
                                            save_best_only=True, save_freq=2),
    lambda: xpcnn.callbacks.ModelCheckpoint("m-{accuracy:.2f}.npz")],
    ids=["early stopping", "plateau", "best of batches", "path template"])
def test_callbacks_that_need_accuracy_are_refused_before_training_without_it(
        data, callback, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = trained(data, metrics=None)
    before = model.get_weights()
    with pytest.raises(InputError, match="accuracy"):
        model.fit(*data, epochs=2, batch_size=16, verbose=0, validation_split=0.25,
                  callbacks=[callback()])
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.iterdir())


def test_predict_returns_the_logits_of_a_model_without_a_final_softmax(data):
    # As in Keras: predict returns the model's output; only a final Softmax makes it
    # probabilities.
    x = data[0][:5].astype(np.float64) / 255
    model = xpcnn.Sequential([Flatten(), Dense(4)], seed=0, dtype="float64")
    logits = model.predict(x)
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(logits, x.reshape(5, -1) @ kernel + bias, rtol=1e-12)
    with_softmax = xpcnn.Sequential([Flatten(), Dense(4), Softmax()], seed=0, dtype="float64")
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(with_softmax.predict(x), e / e.sum(axis=1, keepdims=True),
                               rtol=1e-12)


def test_one_batch_outputs_are_never_the_callers_input():
    """predict's one batch is not copied to be joined, and the softmax gives a new array:
    still, a model of views alone (a Flatten) gives a copy, never the caller's images."""
    x = np.random.default_rng(0).standard_normal((5, 2, 2, 3)).astype(np.float32)
    for layers in ([Flatten()], [Flatten(), Softmax()]):
        model = xpcnn.Sequential(layers, input_shape=(2, 2, 3))
        for out in (model.predict(x), np.asarray(model(x)), model.predict_on_batch(x)):
            assert not np.shares_memory(out, x)
            assert out.shape == (5, 12)


def test_save_and_load_round_trip(data, tmp_path):
    model = trained(data)
    path = tmp_path / "m.npz"
    model.save(str(path))
    again = xpcnn.load_model(str(path))
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        assert np.array_equal(a, b)
    np.testing.assert_array_equal(model.predict(data[0]), again.predict(data[0]))
    assert [type(la).__name__ for la in again.layers] == [type(la).__name__
                                                         for la in model.layers]
    assert again.optimizer.get_config() == model.optimizer.get_config()
    again.fit(*data, epochs=1, batch_size=16, verbose=0)  # loaded compiled, ready to train
    # The file holds no pickled objects.
    with np.load(path, allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


def test_load_onto_another_device(data, tmp_path):
    import array_api_strict as xs

    model = trained(data)
    model.save(str(tmp_path / "m.npz"))
    strict = xpcnn.load_model(str(tmp_path / "m.npz"), device=xs)
    assert strict.backend.name == "array_api_strict"
    np.testing.assert_allclose(strict.predict(data[0]), model.predict(data[0]), rtol=1e-5)


def test_loading_a_file_that_is_not_a_model(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DataFormatError, match="not a readable xpcnn .npz"):
        xpcnn.load_model(str(bad))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataFormatError, match="not an xpcnn model file"):
        xpcnn.load_model(str(tmp_path / "other.npz"))
    with pytest.raises(DataFormatError, match="no such file"):
        xpcnn.load_model(str(tmp_path / "missing.npz"))


def test_weights_use_keras_layouts():
    model = xpcnn.Sequential([Conv2D(4, (3, 2)), ReLU(), Flatten(), Dense(5), Softmax()],
                             input_shape=(6, 5, 3), seed=0)
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(3, 2, 3, 4), (4,), (4 * 4 * 4, 5), (5,)]


def test_flatten_uses_hwc_order(rng):
    """Dense after Flatten sees x.reshape(N, H*W*C) of an NHWC array, as in Keras."""
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 3, 4), seed=0,
                             dtype="float64")
    w = rng.standard_normal((24, 3))
    model.set_weights([w, np.zeros(3)])
    x = rng.standard_normal((5, 2, 3, 4))
    out = model.layer_outputs(x)[-1]
    np.testing.assert_allclose(out, x.reshape(5, -1) @ w)
    np.testing.assert_allclose(out[:, 0], np.einsum("nhwc,hwc->n", x, w[:, 0].reshape(2, 3, 4)))


def test_layer_outputs_and_a_layer_on_its_own_show_each_layers_own_output(rng):
    """Training and predict run a Conv2D and the ReLU() after it as one (the plan);
    layer_outputs() still returns every layer's own output, the convolution's before its ReLU,
    and so does the convolution called on its own. The model has no forward(): PyTorch's
    returns the output, not a list of every layer's (was: Model.forward, this list)."""
    model = xpcnn.Sequential(build_layers("notebook"), input_shape=(12, 12, 3), seed=0)
    rescale, conv, relu = model.layers[:3]
    ran, fused, _ = plan_of(model)
    assert fused[0] == conv.name and relu.name not in ran
    x = rng.integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    outs = [np.asarray(o) for o in model.layer_outputs(x)]
    assert float(outs[1].min()) < 0  # the convolution's output, before the ReLU
    np.testing.assert_array_equal(outs[2], np.maximum(outs[1], 0))
    np.testing.assert_allclose(model.predict(x), outs[-1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(conv(outs[0]), outs[1])
    model.compile(optimizer="sgd")
    model.fit(x, np.arange(4) % 10, epochs=1, verbose=0)
    np.testing.assert_array_equal(conv(outs[0]), np.asarray(model.layer_outputs(x)[1]))
    assert float(np.asarray(conv(outs[0])).min()) < 0
    with pytest.raises(InputError, match=r"PyTorch's way .*model\(x\).*layer_outputs\(x\)"):
        model.forward(x)  # (PyTorch's forward gives the output, not this list: refused)


@pytest.mark.parametrize("training", [False, True])
def test_layer_outputs_keep_nothing_for_a_backward_pass(rng, training):
    """An inspection call keeps no layer's activations once its outputs are dropped, in
    training mode too (was: every layer's cache for backward, the outputs with it, held
    until the next step); training still works after it."""
    import gc
    import weakref

    model = xpcnn.Sequential(every_layer_net(), input_shape=(12, 12, 3), seed=0)
    model.compile(optimizer="sgd")
    x = rng.integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    model.train_on_batch(x, np.arange(4))  # (a step's leftovers first: left as they were)

    def caches() -> dict[tuple[str, str], int]:
        return {(la.name, k): id(v) for la in model.layers for k, v in vars(la).items()
                if k.startswith("_cache") and v is not None}

    before = caches()
    outs = model.layer_outputs(x, training=training)
    assert len(outs) == len(model.layers)
    refs = [weakref.ref(o) for o in outs]
    del outs
    gc.collect()
    assert [la.name for la, r in zip(model.layers, refs, strict=True) if r() is not None] == []
    assert not any(getattr(la, "_backward_ready", False) for la in model.layers)
    assert caches() == before  # (nothing the call made is held; the model's own as they were)
    assert np.isfinite(model.train_on_batch(x, np.arange(4))[0])


def test_the_logits_of_a_uint8_batch_are_those_of_the_batch_in_the_parameters_dtype(rng):
    """_logits casts a device batch to the parameters' dtype itself (fit, evaluate and
    predict hand it batches as stored): a uint8 batch's logits are, bit for bit, those of the
    same batch cast first, and in that dtype."""
    model = xpcnn.Sequential(gap_net(), input_shape=(8, 8, 3), seed=0)
    x = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for training in (False, True):
        got = model._logits(model.backend.asarray(x), training)
        want = model._logits(model.backend.asarray(x.astype(np.float32)), training)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_fit_or_to_from_another_thread_while_fit_runs_is_refused_naming_the_thread(data):
    """A second thread's fit was told it came "from one of its callbacks"; and the check and
    the mark of a running fit were two steps, which two threads could both pass. Refused,
    naming the other thread; once the first fit returns, both run."""
    import threading

    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    inside, release = threading.Event(), threading.Event()

    def hold(epoch, logs):
        inside.set()
        assert release.wait(60)

    first = threading.Thread(target=model.fit, args=data, kwargs=dict(
        epochs=1, batch_size=16, verbose=0,
        callbacks=[xpcnn.callbacks.LambdaCallback(on_epoch_end=hold)]))
    first.start()
    try:
        assert inside.wait(60)
        for call, what in ((lambda: model.fit(*data, epochs=1, verbose=0), "fit"),
                           (lambda: model.to("cpu"), r"to\(\)")):
            with pytest.raises(InputError, match=rf"^{what} was called while this model's fit "
                                                 r"runs in another thread: a model trains "
                                                 r"\(fit, train_on_batch, train_step, compile\) "
                                                 r"or moves \(to\(\)\) in one thread at a time"):
                call()
    finally:
        release.set()
        first.join()
    assert model.optimizer.iterations == 3  # (the first fit's steps alone)
    model.to("cpu")
    model.fit(*data, epochs=1, batch_size=16, verbose=0)
    assert model.optimizer.iterations == 6


def test_threads_predicting_with_one_model_get_their_own_results():
    """A server's threads calling predict on one model at once: each gets the single-threaded
    result (was: 3 to 22 of 40 wrong, the convolutions' kept scratch shared between them); a
    chunk loop's pool threads still use their caller's scratch."""
    import threading

    rng = np.random.default_rng(0)
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.build((16, 16, 3))
    xs = [rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
    expected = [model.predict(x, batch_size=16) for x in xs]
    wrong = [0, 0]

    def predicting(k):
        for _ in range(12):
            wrong[k] += not np.array_equal(model.predict(xs[k], batch_size=16), expected[k])

    threads = [threading.Thread(target=predicting, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]
    from xpcnn.ops.workspace import Workspace, owner, working_for

    ws, xp = Workspace(), model.backend.xp
    mine = ws.get(xp, "k", (2, 3), np.float32, "cpu")
    other = []
    thread = threading.Thread(target=lambda: other.append(ws.get(xp, "k", (2, 3), np.float32,
                                                                 "cpu")))
    thread.start()
    thread.join()
    on_behalf, caller = [], owner()

    def pool_worker():
        with working_for(caller):
            on_behalf.append(ws.get(xp, "k", (2, 3), np.float32, "cpu"))

    pool = threading.Thread(target=pool_worker)
    pool.start()
    pool.join()
    assert other[0] is not mine and on_behalf[0] is mine


def test_set_weights_checks_count_and_shapes(data):
    model = trained(data)
    weights = model.get_weights()
    with pytest.raises(InputError, match=r"expects \d+ arrays"):
        model.set_weights(weights[:-1])
    bad = list(weights)
    bad[0] = np.zeros((1, 2, 3, 4))
    with pytest.raises(InputError, match=r"must have shape \(3, 3, 3, 4\), got \(1, 2, 3, 4\)"):
        model.set_weights(bad)
    model.set_weights(weights)  # a correct list still works


def test_set_weights_copies_caller_arrays(data):
    model = trained(data)
    weights = model.get_weights()
    model.set_weights(weights)
    before = weights[0].copy()
    model.fit(*data, epochs=1, batch_size=16, verbose=0)
    assert np.array_equal(weights[0], before)  # training did not write into the caller's array


def test_summary_lists_layers_shapes_and_parameters(data):
    model = xpcnn.Sequential(build_layers("notebook"), input_shape=(32, 32, 3))
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "conv2d (Conv2D)" in text and "(None, 30, 30, 32)" in text
    assert "(None, 14, 14, 32)" in text and "(None, 6272)" in text
    total = 3 * 3 * 3 * 32 + 32 + 3 * 3 * 32 * 32 + 32 + 6272 * 128 + 128 + 128 * 10 + 10
    assert f"Total params: {total:,}" in text
    assert model.count_params() == total


def test_counting_the_weights_of_an_unbuilt_layer_or_model_is_refused_as_in_keras():
    """(was: 0, as if the layer or model had no weights, where they are not made yet)"""
    with pytest.raises(InputError, match=r"layer 'dense' \(Dense\) must be built before "
                                         r"count_params: .*layer.build\(input_shape\)"):
        Dense(3).count_params()
    with pytest.raises(InputError, match=r"layer 'batchnorm2d' \(BatchNorm2D\) must be built "
                                         r"before count_state"):
        BatchNorm2D().count_state()
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()])
    with pytest.raises(InputError, match=r"the model must be built before count_params: call "
                                         r"build\(input_shape\)"):
        model.count_params()
    with pytest.raises(InputError, match="must be built before summary"):
        model.summary(print_fn=print)
    model.build((2, 2))
    lines = []
    model.summary(print_fn=lines.append)  # (which counts every layer's, built now)
    assert model.count_params() == model.layers[1].count_params() == 4 * 3 + 3
    assert "Total params: 15" in lines and "Non-trainable params: 0" in lines


def test_get_layer_by_name_or_index():
    model = xpcnn.Sequential(build_layers("notebook"), input_shape=(32, 32, 3))
    conv = model.layers[3]
    assert conv.name == "conv2d_1"
    assert model.get_layer("conv2d_1") is conv and model.get_layer(index=3) is conv
    assert model.get_layer(index=-1) is model.layers[-1]
    with pytest.raises(InputError, match=r"no layer named 'conv'; the model's layers are "
                                         r"'rescaling', 'conv2d', 'relu', "):
        model.get_layer("conv")
    for index in (len(model.layers), 1.0, True):
        with pytest.raises(InputError, match="get_layer index must be an int in"):
            model.get_layer(index=index)
    for args in ({}, {"name": "conv2d", "index": 1}):
        with pytest.raises(InputError, match="a layer's name or its index, one of the two"):
            model.get_layer(**args)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: m.fit(x[:, :4], y, verbose=0), r"per-sample shape \(4, 8, 3\)"),
    (lambda m, x, y: m.fit(x[..., 0], y, verbose=0), r"expects \(8, 8, 3\)"),
    (lambda m, x, y: m.fit(x, y + 5, verbose=0), r"must be in \[0, 9\]"),
    (lambda m, x, y: m.fit(x, y[:-1], verbose=0), "47 labels but x has 48"),
    (lambda m, x, y: m.fit(x, y, batch_size=0, verbose=0), "batch_size must be a positive"),
    (lambda m, x, y: m.fit(x[:0], y[:0], verbose=0), "is empty"),
    (lambda m, x, y: m.fit(x.astype(str), y, verbose=0), "must hold real numbers"),
    (lambda m, x, y: m.predict(x[:, :, :, :2]), r"expects \(8, 8, 3\)"),
    (lambda m, x, y: m.evaluate(x, np.full(48, 10)), r"must be in \[0, 9\]"),
])
def test_bad_arguments_raise_clear_errors(data, call, message):
    model = trained(data)
    with pytest.raises(InputError, match=message):
        call(model, *data)


def test_fit_before_compile_and_bad_compile_arguments(data):
    model = xpcnn.Sequential(every_layer_net())
    with pytest.raises(InputError, match="call compile"):
        model.fit(*data)
    with pytest.raises(InputError, match="unknown loss 'mse'"):
        model.compile(loss="mse")
    with pytest.raises(InputError, match="precision must be one of"):
        model.compile(precision="float8")
    with pytest.raises(InputError, match="unknown metrics"):
        model.compile(metrics=["f1"])
    with pytest.raises(InputError, match="expects an xpcnn layer"):
        model.add("conv")


def test_layer_arguments_are_checked():
    with pytest.raises(InputError, match="padding must be 'valid', 'same'"):
        Conv2D(3, 3, padding="full")
    with pytest.raises(InputError, match="kernel_size must be a positive int"):
        Conv2D(3, 0)
    with pytest.raises(InputError, match="does not fit an input of 2x2"):
        xpcnn.Sequential([Conv2D(3, 5)], input_shape=(2, 2, 1))
    with pytest.raises(InputError, match="add a Flatten"):
        xpcnn.Sequential([Dense(3)], input_shape=(4, 4, 1))


def test_unknown_device_in_sequential():
    with pytest.raises(DeviceError, match="unknown device 'tpu:0'"):
        xpcnn.Sequential(device="tpu:0")


def test_mixed_float16_trains_with_float32_master_weights(data):
    model = trained(data, net=gap_net, precision="mixed_float16")
    assert all(w.dtype == np.float32 for w in model.get_weights())
    conv = model.layers[1]
    assert conv.compute_dtype == np.float16
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    ref = trained(data, net=gap_net)
    # float16 products differ from float32's by ~1e-4 here; one epoch moves every weight
    # array by more than 1.7e-2 (so a tolerance of 2e-2 let untrained weights pass)
    for a, b in zip(model.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_mixed_precision_casts_weights_and_gradients_in_one_call_each(data, monkeypatch):
    """One ``cast_all`` of every convolution's and Dense layer's weights to float16 before each
    forward pass, read by the layers and dropped after it, and one of a step's gradients back
    to float32 (each one launch on CuPy, where each array took one). The same weights as each
    layer casting its own; float32 casts nothing."""
    from xpcnn.layers.base import Layer
    from xpcnn.ops.kernels import StandardKernels

    calls = []
    cast_all = StandardKernels.cast_all

    def counted(self, arrays, dtype):
        calls.append((len(arrays), dtype, sum(a.dtype != dtype for a in arrays)))
        return cast_all(self, arrays, dtype)

    monkeypatch.setattr(StandardKernels, "cast_all", counted)
    model = trained(data, net=gap_net, precision="mixed_float16")  # (1 epoch, batches of 16)
    steps = -(-len(data[0]) // 16)
    weights = sum(len(la.params) for la in model.layers if la.casts_weights)  # (3 layers)
    grads = sum(len(la.params) for la in model.trainable_layers)  # (and a BatchNorm2D's)
    # (the gradients to cast: those of the kernels that come in float16, the Dense layer's
    # here; the biases' are float32 sums, BatchNorm's float32)
    assert (weights, grads) == (5, 7)
    assert calls == [(5, np.float16, 5), (7, np.float32, 1)] * steps
    assert all(getattr(la, "_cache_weights", None) is None for la in model.layers)
    assert not model.layers[2].grads  # (dropped once applied: the cast's dtype is checked above)
    model.predict(data[0][:4])
    assert calls[2 * steps:] == [(5, np.float16, 5)]
    monkeypatch.setattr(Layer, "compute_weight", lambda self, name: (
        self.xp.astype(self.params[name], self.compute_dtype)))  # (each layer its own cast)
    own = trained(data, net=gap_net, precision="mixed_float16")
    for a, b in zip(model.get_weights(), own.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    calls.clear()
    trained(data, net=gap_net)
    assert calls == [(7, np.float32, 0)] * steps


@pytest.mark.parametrize("fast", [True, False])
def test_loss_scaling_skips_an_overflowing_step_and_lowers_the_scale(data, fast, monkeypatch):
    """Silently, as PyTorch's GradScaler does: on NumPy, the overflow the scaling looks for
    warns nothing (on the fast path and on the standard Array API one)."""
    monkeypatch.setattr(xpcnn.backend, "_FAST_PATH", {"enabled": fast})
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01), precision="mixed_float16")
    model.build((8, 8, 3))
    model.loss_scale = 2.0**60  # certain float16 overflow in the backward pass
    def params():
        return [np.array(p) for la in model.layers for p in la.params.values()]

    before = params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(*data, epochs=1, batch_size=48, verbose=0)
    assert model.loss_scale == 2.0**59
    # The device skipped the update; the step still counts (the host never waited to know).
    assert model.optimizer.iterations == 1
    for a, b in zip(before, params(), strict=True):  # (BatchNorm statistics still update)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("scale", [1e39, 1e-46, 0.0, -1.0, float("inf"), float("nan")])
def test_a_loss_scale_float32_cannot_hold_is_refused(scale):
    """The scale is held in float32: 1e39 became infinity (every step skipped, the weights
    never moved, no error) and 1e-46 became 0 (the error then blamed a layer's gradient).
    Refused by name, as a checkpoint's is; the scale is left as it was."""
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01), precision="mixed_float16")
    model.build((8, 8, 3))
    with pytest.raises(InputError, match=r"loss_scale must be a number in \[1.17549e-38, "
                                         r"3.40282e\+38\]"):
        model.loss_scale = scale
    assert model.loss_scale == 2.0**15
    model.loss_scale = 3.4e38  # (the range's ends are taken)
    assert model.loss_scale == np.float32(3.4e38)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_mixed_bfloat16_trains_with_float32_master_weights(data, fast, monkeypatch):
    """bfloat16 on NumPy is ml_dtypes': the layers compute in it (the products in float32 on
    its values, rounded once, as a GPU's), the weights stay float32, no loss scale; close to
    float32 training, and to PyTorch's own bfloat16 (an independent one) where it is
    installed."""
    monkeypatch.setattr(xpcnn.backend, "_FAST_PATH", {"enabled": fast})
    model = trained(data, net=gap_net, precision="mixed_bfloat16")
    assert model.layers[1].compute_dtype == np.dtype(ml_dtypes.bfloat16)
    assert model.loss_scale == 1.0
    assert all(w.dtype == np.float32 and np.all(np.isfinite(w)) for w in model.get_weights())
    probs = model.predict(data[0][:5])
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # bfloat16 keeps 8 bits (float16 11): one epoch stays within 2% of the largest weight of
    # float32 training, and moves every weight array by more than that
    ref, start = trained(data, net=gap_net), xpcnn.Sequential(gap_net(), seed=0)
    start.build(data[0].shape[1:])
    for a, b, b0 in zip(model.get_weights(), ref.get_weights(), start.get_weights(),
                        strict=True):
        largest = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * largest)
        assert float(np.abs(b - b0).max()) > 0.02 * largest


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_mixed_bfloat16_averages_a_large_map_in_float32(fast, monkeypatch, rng):
    """A global average over 64 x 64 positions under mixed bfloat16 gives float32's logits to
    within bfloat16's roundings along the way (2% of the largest here; NumPy's own bfloat16
    mean, summed in bfloat16, gave them 58% off at 32 x 32)."""
    monkeypatch.setattr(xpcnn.backend, "_FAST_PATH", {"enabled": fast})
    x = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    logits = {}
    for precision in ("float32", "mixed_bfloat16"):
        model = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(4, 3, activation="relu"),
                                  GlobalAvgPool2D(), Dense(3)], input_shape=(64, 64, 3),
                                 seed=0)
        model.compile(optimizer="sgd", precision=precision)
        logits[precision] = model.predict(x, verbose=0).astype(np.float64)
    scale = float(np.abs(logits["float32"]).max())
    np.testing.assert_allclose(logits["mixed_bfloat16"], logits["float32"], rtol=0,
                               atol=0.05 * scale)


def test_mixed_bfloat16_on_numpy_matches_pytorch(data):
    """The same model in mixed bfloat16 on NumPy (ml_dtypes) and on PyTorch (its own bfloat16
    convolutions and products): the same weights to bfloat16's precision after an epoch."""
    pytest.importorskip("torch", reason="PyTorch is not installed")
    import array_api_compat.torch as xt

    def run(device):
        model = xpcnn.Sequential(gap_net(), device=device, seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), precision="mixed_bfloat16")
        history = model.fit(*data, epochs=1, batch_size=16, verbose=0)
        return model.get_weights(), history.history["loss"]

    (w_np, loss_np), (w_torch, loss_torch) = run("cpu"), run(xt)
    assert loss_np == pytest.approx(loss_torch, rel=1e-2)
    for a, b in zip(w_np, w_torch, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * float(np.abs(b).max()))


def test_bfloat16_is_a_clear_error_where_the_backend_lacks_it(monkeypatch):
    """array_api_strict has no bfloat16; NumPy has ml_dtypes' where that is installed."""
    import array_api_strict

    model = xpcnn.Sequential(gap_net(), device=array_api_strict)
    with pytest.raises(DeviceError, match="no dtype 'bfloat16'"):
        model.compile(precision="mixed_bfloat16")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # (its import fails)
    model = xpcnn.Sequential(gap_net())
    with pytest.raises(DeviceError, match=r"needs ml_dtypes \(pip install ml_dtypes"):
        model.compile(precision="mixed_bfloat16")
    assert model.precision == "float32"  # (the refused compile changed nothing)


def test_cupys_bfloat16_is_ml_dtypes_where_cupy_has_a_c_type_for_it(monkeypatch):
    """CuPy takes ml_dtypes' bfloat16 where its kernels have a C type for it (CuPy 14 with
    NumPy 2.1.2 or later): asked of CuPy's type table, no GPU asked."""
    import types

    from xpcnn.backend import _ml_dtypes_bfloat16

    names = {}

    def get_typename(dtype):
        return names[np.dtype(dtype)]  # (CuPy's lookup: KeyError for a type it lacks)

    scalar = types.ModuleType("cupy._core._scalar")
    scalar.get_typename = get_typename
    for name in ("cupy", "cupy._core"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "cupy._core._scalar", scalar)
    assert _ml_dtypes_bfloat16("cupy") is None  # (CuPy 13, or NumPy before 2.1.2)
    names[np.dtype(ml_dtypes.bfloat16)] = "bfloat16"
    assert _ml_dtypes_bfloat16("cupy") == np.dtype(ml_dtypes.bfloat16)
    monkeypatch.setitem(sys.modules, "cupy._core._scalar", None)  # (a CuPy without it)
    assert _ml_dtypes_bfloat16("cupy") is None
    monkeypatch.setitem(sys.modules, "cupy._core._scalar", scalar)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    assert _ml_dtypes_bfloat16("cupy") is None


def _gradients(model, x, y, planned=True):
    """Every parameter's gradient: by the model's plan, or with each layer as written (each
    ReLU() its own layer, each layer applying its own ReLU gradient)."""
    xp = model.backend.xp
    if planned:
        _, dz = model.loss.forward(xp, model._logits(x, True), y, xp.float64)
        model._backward(dz)
    else:
        layers = model.layers[:-1]  # (the softmax is fused into the loss)
        for layer in layers:
            x = layer.forward(x, training=True)
        _, dz = model.loss.forward(xp, x, y, xp.float64)
        first = next(i for i, la in enumerate(layers) if la.params)
        for layer in reversed(layers[first:]):
            dz = layer.backward(dz)
    return [np.array(la.grads[k]) for la in model.layers for k in la.params]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_a_relu_gradient_left_to_the_next_layer_changes_no_gradient(fast, rng):
    """The model's plan: ReLU() layers fused into the convolution or BatchNorm2D before them,
    and where a ReLU's output feeds a max pool or a FeatureNorm, that layer applying the
    ReLU's gradient (the ReLU layer or fused layer skipping its own pass): the same gradients,
    exactly, as the layers as written, each applying its own."""
    from xpcnn.backend import set_fast_path

    layers = [Conv2D(4, 3, padding="same", activation="relu"), MaxPool2D(2),
              Conv2D(5, 3, padding="same"), ReLU(), MaxPool2D(2, padding="same"),
              Conv2D(5, 1), BatchNorm2D(), ReLU(), FeatureNorm(),
              Conv2D(3, 3, activation="relu"), Conv2D(4, 1, activation="relu"),
              ReLU(max_value=1.0), MaxPool2D(1), Flatten(), Dense(3), Softmax()]
    model = xpcnn.Sequential(layers, input_shape=(14, 14, 2), dtype="float64", seed=1)
    model.compile(optimizer="sgd")
    _, fused, handed = plan_of(model)
    assert fused == ["conv2d_1", "batchnorm2d"]  # their ReLU() fused into them
    assert handed == [
        ("conv2d", "maxpool2d"), ("conv2d_1", "maxpool2d_1"), ("batchnorm2d", "featurenorm")
    ]  # not after a convolution nor after a capped ReLU
    # integer-valued inputs make ReLU zeros and tied maxima common
    x = rng.integers(-3, 4, (6, 14, 14, 2)).astype(np.float64)
    y = rng.integers(0, 3, 6)
    old = set_fast_path(fast)
    try:
        handed_over = _gradients(model, x, y)
        own = _gradients(model, x, y, planned=False)
    finally:
        set_fast_path(old)
    for a, b in zip(handed_over, own, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_a_first_rescaling_casts_the_models_batch_itself(fast, rng):
    """Where the layers reading the model's batch cast it (Rescaling, Normalization and the
    random layers), the model hands them the batch as given (uint8 images) and they cast it in
    their own pass (one launch on CuPy): the same values, exactly, as the batch cast to the
    parameters' dtype first. Elsewhere the model casts it."""
    from xpcnn.backend import set_fast_path

    def net(first):
        return xpcnn.Sequential([*first, Conv2D(3, 3), Flatten(), Dense(2), Softmax()],
                                input_shape=(6, 6, 3), seed=0)

    model = net([Rescaling(1 / 255)])
    plan, rescale = model._plan(), model.layers[0]
    assert plan.cast_input and plan.options(rescale).cast_input
    assert not plan.options(model.layers[1]).cast_input
    assert not net([])._plan().cast_input  # (a convolution first: the model casts)
    flipped = net([RandomFlip(), Rescaling(1 / 255)])._plan()  # (flips cast too: test_random)
    assert flipped.cast_input and not flipped.options(flipped.steps[1].layer).cast_input
    old = set_fast_path(fast)
    try:
        for x in (rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8),
                  rng.standard_normal((4, 6, 6, 3))):  # (float64 into a float32 model)
            got = rescale.forward(x, options=plan.options(rescale))
            want = rescale.forward(x.astype(np.float32))  # (as the model cast it before)
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(model._logits(x, False),
                                          model._logits(x.astype(np.float32), False))
    finally:
        set_fast_path(old)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_a_first_normalization_casts_the_models_batch_and_gives_the_compute_dtype(precision,
                                                                                  rng):
    """A Normalization reading the model's uint8 batch casts it itself and computes in float32,
    giving the compute dtype (float16 under mixed precision): exactly (x - mean) / std of the
    batch cast first, as the model and the next layer cast it before; after a layer, the same
    in float32."""
    mean, std = [120.0, 3.5], [60.0, 0.7]
    model = xpcnn.Sequential([xpcnn.layers.Normalization(mean, std), Conv2D(3, 3), Flatten()],
                             input_shape=(5, 5, 2), seed=0)
    model.compile(optimizer="sgd", precision=precision)
    norm = model.layers[0]
    assert model._plan().cast_input
    x = rng.integers(0, 256, (3, 5, 5, 2), dtype=np.uint8)
    want = (x.astype(np.float32) - np.float32(mean)) * (1 / np.array(std)).astype(np.float32)
    compute = np.float32 if precision == "float32" else np.float16
    for given in (x, x.astype(np.float32)):
        got = norm.forward(given, options=model._plan().options(norm))
        assert got.dtype == compute
        np.testing.assert_array_equal(got, want.astype(compute))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_layers_give_the_compute_dtype_with_the_values_of_their_casts(
        fast, precision, rng):
    """Under mixed float16 (and bfloat16 in its place) a Rescaling reading the model's batch
    and a FeatureNorm compute in float32 and give float16 (as a Keras mixed policy's layers
    do), the FeatureNorm's input gradient in its input's float16, the loss the logits'
    gradient in their float16: exactly the float32 results cast, as the next layer cast them
    before (one pass fewer each, on a GPU no pass of its own; tests/test_cuda_kernels_on_cpu.py
    holds CuPy's to these)."""
    from xpcnn.backend import set_fast_path
    from xpcnn.losses import SoftmaxCrossEntropy
    from xpcnn.ops.kernels import kernels_for

    model = xpcnn.Sequential([Rescaling(1 / 255, offset=-0.25), Conv2D(4, 3), ReLU(),
                              FeatureNorm(), Flatten(), Dense(3), Softmax()],
                             input_shape=(7, 7, 2), seed=0)
    model.compile(optimizer="sgd", precision=precision)
    xp = model.backend.xp
    half = model.backend.dtype(PRECISIONS[precision])
    rescale, norm = model.layers[0], model.layers[3]
    images = model.backend.asarray(rng.integers(0, 256, (5, 7, 7, 2), dtype=np.uint8))
    x16 = model.backend.asarray(rng.standard_normal((5, 5, 5, 4)).astype(half))
    dy16 = model.backend.asarray(rng.standard_normal((5, 5, 5, 4)).astype(half))
    z16 = model.backend.asarray(rng.standard_normal((5, 3)).astype(half))
    labels = model.backend.asarray(rng.integers(0, 3, 5))
    old = set_fast_path(fast)
    try:
        y = rescale.forward(images, options=model._plan().options(rescale))
        norm_y = norm.forward(x16, training=True)
        dx = norm.backward(dy16)
        norm_y32 = norm.forward(xp.astype(x16, xp.float32), training=True)  # (float32 in)
        dx32 = norm.backward(xp.astype(dy16, xp.float32))
        loss = SoftmaxCrossEntropy()
        kernels = kernels_for(model.backend)
        stats, dz = loss.forward_with_accuracy(xp, z16, labels, xp.float32, kernels)
        stats32, dz32 = loss.forward_with_accuracy(xp, xp.astype(z16, xp.float32), labels,
                                                   xp.float32, kernels)
    finally:
        set_fast_path(old)
    host = model.backend.to_numpy
    want = (host(images).astype(np.float32) * np.float32(1 / 255) + np.float32(-0.25))
    assert y.dtype == norm_y.dtype == dx.dtype == dz.dtype == half
    assert norm_y32.dtype == half and dx32.dtype == dz32.dtype == xp.float32
    np.testing.assert_array_equal(host(y), want.astype(half))
    np.testing.assert_array_equal(host(norm_y), host(norm_y32))  # (a half input: exact)
    np.testing.assert_array_equal(host(dx), host(dx32).astype(half))
    np.testing.assert_array_equal(host(stats), host(stats32))
    np.testing.assert_array_equal(host(dz), host(dz32).astype(half))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
@pytest.mark.parametrize("relu", [False, True], ids=["alone", "relu-fused"])
def test_mixed_precision_batchnorm_gives_the_compute_dtype(fast, relu, rng):
    """Under mixed float16 a BatchNorm2D (with the ReLU after it fused or not) computes in its
    parameters' float32 and gives float16, as a Keras mixed policy's layer does: exactly the
    float32 layer's output from the same input, cast; its input gradient in its input's
    float16 (the float32 layer's, cast), gamma's and beta's in float32 (the float32 layer's);
    the same running statistics; in inference too."""
    from xpcnn.backend import set_fast_path
    from xpcnn.layers.base import Options

    options = Options(fused_relu=relu)
    layers, beta = [], rng.standard_normal(5).astype(np.float32)  # (ReLU cuts some)
    for compute in ("float16", "float32"):
        layer = BatchNorm2D()
        layer.build((4, 3, 5), "cpu", dtype="float32", compute_dtype=compute)
        layer.params["beta"][...] = beta
        layers.append(layer)
    x16 = rng.standard_normal((6, 4, 3, 5)).astype(np.float16)
    dy16 = rng.standard_normal(x16.shape).astype(np.float16)
    old = set_fast_path(fast)
    try:
        results = []
        for layer in layers:
            x, dy = (x16, dy16) if layer.compute_dtype == np.float16 else (
                x16.astype(np.float32), dy16.astype(np.float32))
            y = layer.forward(x, training=True, options=options)
            dx = layer.backward(dy, options)
            results.append((y, dx, *layer.grads.values(), *layer.state.values(),
                            layer.forward(x, training=False, options=options)))
    finally:
        set_fast_path(old)
    (y, dx, *rest, inference), (y32, dx32, *rest32, inference32) = results
    assert y.dtype == dx.dtype == inference.dtype == np.float16
    assert all(a.dtype == np.float32 for a in rest) and len(rest) == 4
    np.testing.assert_array_equal(y, y32.astype(np.float16))
    assert (float(y.min()) == 0.0) == relu
    np.testing.assert_array_equal(dx, dx32.astype(np.float16))
    np.testing.assert_array_equal(inference, inference32.astype(np.float16))
    for a, b in zip(rest, rest32, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_a_batch_also_read_by_a_layer_that_cannot_cast_it_is_cast_by_the_model(fast, rng):
    """The model's batch read by a Rescaling and by a convolution (which cannot cast it): the
    model casts it, for both, and neither layer casts it again."""
    from xpcnn.backend import set_fast_path
    from xpcnn.layers import Add

    def net(device):
        inputs = xpcnn.Input((6, 6, 3))
        x = Add()([Conv2D(2, 3)(Rescaling(1 / 255)(inputs)), Conv2D(2, 3)(inputs)])
        return xpcnn.Model(inputs, Softmax()(Dense(2)(Flatten()(x))), seed=0, device=device)

    model = net("cpu")
    plan = model._plan()
    assert not plan.cast_input
    assert not any(plan.options(la).cast_input for la in model.layers)
    old = set_fast_path(fast)
    try:
        for x in (rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8),
                  rng.standard_normal((4, 6, 6, 3))):  # (float64 into a float32 model)
            logits = model._logits(x, False)
            assert logits.dtype == np.float32
            np.testing.assert_array_equal(logits, model._logits(x.astype(np.float32), False))
    finally:
        set_fast_path(old)
    # the same values under array_api_strict (no mixing of uint8 and float32 in a layer)
    import array_api_strict as xs

    images = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(net(xs).predict(images), model.predict(images), rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
def test_a_dropout_applies_the_gradient_of_the_relu_before_it(fast, rng):
    """A Dropout reading a ReLU's output (a ReLU() layer, a Dense layer's or one fused into
    it) applies that ReLU's gradient with its mask's (one launch on CuPy), also at rate 0:
    the same gradients, exactly, as each layer applying its own, on the same draws."""
    from xpcnn.backend import set_fast_path

    layers = [Conv2D(3, 1), Flatten(), ReLU(), Dropout(0.3), Dense(8, activation="relu"),
              Dropout(0.5), Dense(6), ReLU(), Dropout(0.0), Dense(3), Softmax()]
    model = xpcnn.Sequential(layers, input_shape=(4, 3, 2), dtype="float64", seed=3)
    model.compile(optimizer="sgd")
    assert plan_of(model)[2] == [("relu", "dropout"), ("dense", "dropout_1"),
                                 ("dense_1", "dropout_2")]
    x = rng.integers(-3, 4, (10, 4, 3, 2)).astype(np.float64)  # ReLU zeros are common
    y = rng.integers(0, 3, 10)
    drops = [la for la in model.layers if isinstance(la, Dropout)]
    start = [(d.seed, d.calls) for d in drops]
    old = set_fast_path(fast)
    try:
        handed_over = _gradients(model, x, y)
        for d, (seed, calls) in zip(drops, start, strict=True):
            d.set_random_state(seed, calls)  # (the same draws again)
        own = _gradients(model, x, y, planned=False)
    finally:
        set_fast_path(old)
    assert all(np.any(g != 0) for g in own)
    for a, b in zip(handed_over, own, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "standard"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_a_first_convolution_masks_its_relu_gradient_chunk_by_chunk(fast, use_bias, rng):
    """Without an input gradient to compute, a convolution's fused ReLU gradient is applied
    inside the kernel gradient's chunks: the same gradients as one pass over the whole."""
    from xpcnn.backend import set_fast_path

    conv = Conv2D(6, 3, padding="same", activation="relu", use_bias=use_bias)
    model = xpcnn.Sequential([conv, Conv2D(3, 3), Flatten(), Dense(2), Softmax()],
                             input_shape=(10, 10, 3), dtype="float64", seed=2)
    model.compile(optimizer="sgd")
    options = model._plan().options(conv)
    assert not options.need_input_grad and not options.skip_relu_grad
    x = rng.standard_normal((20, 10, 10, 3))
    y = rng.integers(0, 2, 20)
    old = set_fast_path(fast)
    try:
        chunked = _gradients(model, x, y)
        # each layer on its own: the first convolution masks the whole gradient first, and
        # makes dx
        whole = _gradients(model, x, y, planned=False)
    finally:
        set_fast_path(old)
    assert any(np.count_nonzero(g) for g in chunked)
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(a, b)


# -- no host synchronisation inside a step --------------------------------------------------------


def count_reads(monkeypatch):
    """Every device -> host copy (Backend.to_numpy) from now on."""
    reads = []
    real = xpcnn.Backend.to_numpy
    monkeypatch.setattr(xpcnn.Backend, "to_numpy", lambda self, x: reads.append(1) or real(self,
                                                                                            x))
    return reads


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_deferred_non_finite_gradient_names_its_step_and_layer(data, monkeypatch):
    """Step 5 of 6 has a NaN gradient: nothing waits for the device until the epoch ends, then
    the error names step 5 and the layer, and the model is as after step 4."""
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
    dense = model.layers[7]
    real, calls = dense.backward, [0]

    def backward(dy, options):
        out = real(dy, options)
        calls[0] += 1
        if calls[0] == 5:
            dense.grads["bias"][1] = np.inf
        return out

    monkeypatch.setattr(dense, "backward", backward)
    reads = count_reads(monkeypatch)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 5: it first appears "
                                             r"\(in backpropagation order\) in layer 'dense'"):
        model.fit(*data, epochs=1, batch_size=8, verbose=0)
    assert calls[0] == 6 and len(reads) == 1  # all six steps ran; one read, at the end
    assert model.optimizer.iterations == 4
    monkeypatch.undo()
    reference = xpcnn.Sequential(gap_net(), seed=0)
    reference.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
    stop = xpcnn.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: setattr(
        reference, "stop_training", b == 3))
    reference.fit(*data, epochs=1, batch_size=8, verbose=0, callbacks=[stop])
    params = lambda m: [p for la in m.layers for p in la.params.values()]  # noqa: E731
    for a, b in zip(params(model), params(reference), strict=True):  # (BatchNorm's running
        assert np.array_equal(a, b)  # statistics, not parameters, saw the later batches)


def _freeze_thaw_run(data, listed_afresh: bool) -> tuple[list[np.ndarray], list[tuple]]:
    """every_layer_net trained through freezes, a model-wide freeze, other batch sizes, a
    precision change, a layer added, a layer built and frozen by another model; returns its
    weights and, at each stage, (the layers a step trains, trainable_layers).
    ``listed_afresh``: the steps find the layers they train listed anew each time (no cache,
    see Model._trained)."""
    x, y = data
    model = xpcnn.Sequential(every_layer_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
    forget = xpcnn.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: setattr(model, "_trained_at", None))
    callbacks = [forget] if listed_afresh else []
    seen = []

    def fit(x, y, batch_size):
        model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, callbacks=callbacks)
        seen.append((model._trained(), tuple(model.trainable_layers)))

    fit(x, y, 16)
    conv = model.layers[3]
    conv.trainable = False
    frozen = conv.get_weights()
    fit(x, y, 20)  # (a smaller last batch)
    assert all(np.array_equal(a, b) for a, b in zip(frozen, conv.get_weights(), strict=True))
    conv.trainable = True
    model.layers[-3].trainable = False
    fit(x, y, 12)
    model.trainable = False
    model.trainable = True
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), precision="mixed_float16")
    fit(x, y, 16)
    extra = xpcnn.Sequential([Dense(10, name="extra")], seed=1)  # (two built 'dense' clash)
    extra.build((10,))  # (built elsewhere: it keeps its weights in this model)
    model.layers.pop()  # (the Softmax: added back after the new layer)
    model.add(extra.layers[0])
    model.add(Softmax())
    fit(x, y, 16)
    other = xpcnn.Sequential([model.layers[3]])  # (shared: built there in float32)
    other.build((8, 8, 3))
    other.trainable = False  # (frozen through the other model)
    fit(x, y, 16)
    return model.get_weights(), seen


def test_the_layers_a_step_trains_follow_freezes_additions_and_rebuilds(data):
    """The layers a training step trains are listed again only after a layer was built,
    moved, frozen or unfrozen, or the model built: at every stage they are trainable_layers,
    and the weights are bit for bit those of the same run listing them at every step."""
    weights, seen = _freeze_thaw_run(data, listed_afresh=False)
    for trained, expected in seen:
        assert list(trained) == list(expected)
    counts = [len(trained) for trained, _ in seen]
    assert counts[1] == counts[0] - 1 and counts[4] == counts[3] + 1 == counts[5] + 1
    reference, _ = _freeze_thaw_run(data, listed_afresh=True)
    for a, b in zip(weights, reference, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_changing_trainable_counts_as_a_rebuild_only_when_it_changes():
    layer = Dense(3)
    before = xpcnn.layers.Layer.rebuilds
    layer.trainable = True  # (as it was)
    assert xpcnn.layers.Layer.rebuilds == before
    layer.trainable = False
    assert xpcnn.layers.Layer.rebuilds == before + 1
    with pytest.raises(InputError, match="trainable must be True or False"):
        layer.trainable = "no"
    assert xpcnn.layers.Layer.rebuilds == before + 1 and layer.trainable is False


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_non_finite_gradient_names_its_layer_after_swapping_frozen_layers_alike(monkeypatch):
    """Two layers with as many parameters: one frozen, then the other instead. The running
    totals follow the layers trained, not their count: the error names the layer whose
    gradient was not finite."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 2, 2, 1), dtype=np.uint8), rng.integers(0, 4, 8)
    first, second = Dense(4, name="first"), Dense(4, name="second")
    model = xpcnn.Sequential([Flatten(), first, second, Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05))
    second.trainable = False
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    second.trainable, first.trainable = True, False
    real = second.backward

    def backward(dy, options):
        out = real(dy, options)
        second.grads["bias"][0] = np.nan
        return out

    monkeypatch.setattr(second, "backward", backward)
    with pytest.raises(NonFiniteError, match="in layer 'second'"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)


def test_the_host_reads_the_device_once_an_epoch_and_every_read_every_steps(monkeypatch):
    from xpcnn.totals import READ_EVERY

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (70, 2, 2, 1), dtype=np.uint8), rng.integers(0, 3, 70)
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    model.build((2, 2, 1))
    reads = count_reads(monkeypatch)
    history = model.fit(x, y, epochs=2, batch_size=1, verbose=0)
    assert len(reads) == 2 * (70 // READ_EVERY + 1)  # (never one per step)
    assert len(history.history["loss"]) == 2 and model.optimizer.iterations == 140


def test_train_on_batch_is_one_checked_step(data):
    def make():
        model = xpcnn.Sequential(gap_net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        return model

    x, y = data
    model, twin = make(), make()
    result = model.train_on_batch(x[:16], y[:16])
    history = twin.fit(x[:16], y[:16], batch_size=16, shuffle=False, verbose=0)
    assert result == [history.history["loss"][0], history.history["accuracy"][0]]
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_test_and_predict_on_batch_are_evaluate_and_predict_of_one_batch(data, monkeypatch):
    x, y = data
    model = trained(data, net=gap_net)
    big = np.concatenate([x] * 7)  # (336 images: more than evaluate's batch of 256)
    labels = np.concatenate([y] * 7)
    w = np.linspace(0.0, 1.0, len(big))
    forwards = []
    logits = type(model)._logits
    monkeypatch.setattr(type(model), "_logits",
                        lambda self, *a, **k: forwards.append(1) or logits(self, *a, **k))
    assert model.test_on_batch(big, labels, sample_weight=w, return_dict=True) == \
        model.evaluate(big, labels, sample_weight=w, return_dict=True, batch_size=len(big))
    assert np.array_equal(model.predict_on_batch(big), model.predict(big, batch_size=len(big)))
    assert len(forwards) == 4  # one forward pass each
    assert model.test_on_batch(x[:10], y[:10]) == model.evaluate(x[:10], y[:10])
    with pytest.raises(InputError, match="takes one batch of arrays, not a dataset or an "
                                         "iterable of batches"):
        model.test_on_batch(iter([(x, y)]), None)


def test_initial_epoch_continues_a_run_as_if_it_never_stopped(data):
    """fit(epochs=1) then fit(epochs=3, initial_epoch=1): the same weights, bit for bit, as
    fit(epochs=3) (each epoch shuffled by its number), and the later epochs' History."""
    x, y = data

    def make():
        model = xpcnn.Sequential(gap_net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        return model

    straight, split = make(), make()
    whole = straight.fit(x, y, epochs=3, batch_size=16, verbose=0)
    split.fit(x, y, epochs=1, batch_size=16, verbose=0)
    rest = split.fit(x, y, epochs=3, batch_size=16, verbose=0, initial_epoch=1)
    assert rest.epoch == [1, 2] and rest.history["loss"] == whole.history["loss"][1:]
    for a, b in zip(straight.get_weights(), split.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert split.fit(x, y, epochs=3, initial_epoch=3, verbose=0).epoch == []
    with pytest.raises(InputError, match="initial_epoch must be a non-negative integer, got -1"):
        split.fit(x, y, epochs=3, initial_epoch=-1, verbose=0)


def test_a_resumed_checkpoint_starts_where_it_stopped_whatever_initial_epoch_says(data,
                                                                                   tmp_path):
    x, y = data

    def make():
        model = xpcnn.Sequential(gap_net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        return model

    path = tmp_path / "run.npz"
    straight, resumed = make(), make()
    straight.fit(x, y, epochs=3, batch_size=16, verbose=0)
    make().fit(x, y, epochs=2, batch_size=16, verbose=0, checkpoint=path)
    history = resumed.fit(x, y, epochs=3, batch_size=16, verbose=0, checkpoint=path,
                          resume=True, initial_epoch=0)
    assert history.epoch == [0, 1, 2] and resumed.optimizer.iterations == 9
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        assert np.array_equal(a, b)
    fresh = make()  # (no file yet: initial_epoch counts)
    assert fresh.fit(x, y, epochs=3, batch_size=16, verbose=0, checkpoint=tmp_path / "new.npz",
                     resume=True, initial_epoch=2).epoch == [2]


def test_validation_batch_size_sets_the_validation_batches(data):
    x, y = data
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile()
    batches = []
    count = xpcnn.callbacks.LambdaCallback(on_test_batch_end=lambda b, logs: batches.append(b))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, validation_data=(x, y),
              validation_batch_size=5, callbacks=[count])
    assert len(batches) == -(-len(x) // 5)
    with pytest.raises(InputError, match="validation_batch_size must be"):
        model.fit(x, y, validation_data=(x, y), validation_batch_size=0, verbose=0)


@pytest.mark.parametrize("device", ["cpu", "strict"])
def test_a_dense_softmax_activation_trains_as_dense_then_softmax(data, device, tmp_path):
    """Keras' Dense(classes, activation="softmax") at the end of a Sequential or a functional
    Model: training (the softmax left to the loss, as a final Softmax layer's), evaluate and
    predict give, bit for bit, what Dense(classes) then Softmax() give; on NumPy's fast path
    and in the standard spelling; saved and loaded, it predicts the same."""
    import array_api_strict as xs

    x, y = data
    runs = []
    for softmax_last in (False, True):
        for functional in (False, True):
            head = [Dense(10, activation="softmax")] if softmax_last else [Dense(10), Softmax()]
            layers = [Conv2D(4, 3, activation="relu"), MaxPool2D(2), Flatten(), *head]
            dev = xs if device == "strict" else "cpu"
            if functional:
                t = inputs = xpcnn.Input((8, 8, 3))
                for layer in layers:
                    t = layer(t)
                model = xpcnn.Model(inputs, t, device=dev, seed=0)
            else:
                model = xpcnn.Sequential(layers, device=dev, seed=0)
            model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
            history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                                validation_data=(x[:8], y[:8]))
            runs.append((model, history.history, model.evaluate(x, y),
                         model.predict(x[:6])))
    def logs(history):
        return {k: v for k, v in history.items() if k != "seconds"}

    for model, history, evaluated, predicted in runs[1:]:
        assert logs(history) == logs(runs[0][1])
        assert evaluated == runs[0][2]
        np.testing.assert_array_equal(predicted, runs[0][3])
        for a, b in zip(model.get_weights(), runs[0][0].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    model, probabilities = runs[-1][0], runs[-1][3]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    if device == "cpu":
        model.save(tmp_path / "m.npz")
        again = xpcnn.load_model(tmp_path / "m.npz")
        assert again.layers[-1].activation == "softmax"
        np.testing.assert_array_equal(again.predict(x[:6]), probabilities)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_dense_softmax_activation_in_mixed_precision_and_frozen(data, frozen):
    """mixed_float16 (float16 logits to the loss), and the Dense frozen: still bit for bit
    as Dense then Softmax()."""
    x, y = data
    runs = []
    for head in ([Dense(10, activation="softmax")], [Dense(10), Softmax()]):
        model = xpcnn.Sequential([Conv2D(4, 3, activation="relu"), Flatten(), *head], seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9), precision="mixed_float16")
        model.build(x.shape[1:])
        model.layers[2].trainable = not frozen
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        runs.append((model.get_weights(), history.history["loss"], model.predict(x[:4])))
    for a, b in zip(*runs, strict=True):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b],
                        strict=True):
            np.testing.assert_array_equal(u, v)


def test_only_a_layer_that_says_so_has_its_softmax_left_to_the_loss(data):
    """A user's layer with an attribute ``activation = "softmax"`` that applies its own softmax
    is not taken for Dense(activation="softmax"): only ``softmax_output`` says so."""
    class Scaled(Dense):
        def __init__(self, units):
            super().__init__(units)
            self.activation = "softmax"  # (its own meaning: it softmaxes in forward below)

        @property
        def softmax_output(self):
            return False

        def forward(self, x, training=False, options=None):
            z = super().forward(x, training) if options is None else \
                super().forward(x, training, options)
            return xpcnn.ops.softmax.softmax(self.xp, z)

    model = xpcnn.Sequential([Flatten(), Scaled(5)], input_shape=(8, 8, 3), seed=0)
    assert not model._fused_softmax()
    out = model.predict(data[0][:3])
    np.testing.assert_allclose(out, model.layer_outputs(data[0][:3])[-1], rtol=1e-6)  # (once)


def test_a_softmax_activation_belongs_at_the_end_and_only_on_dense(data):
    with pytest.raises(InputError, match=r"layer 'hidden' \(Dense, 2 of 4\) is not the last "
                       "layer: its softmax activation turns the output scores into "
                       "probabilities"):
        xpcnn.Sequential([Flatten(), Dense(8, activation="softmax", name="hidden"), Dense(10),
                          Softmax()], input_shape=(8, 8, 3))
    with pytest.raises(InputError, match="activation must be None or 'relu', got 'softmax' "
                       r"\(use a ReLU layer for a ceiling, a Softmax layer or "
                       r"Dense\(activation='softmax'\) for probabilities\)"):
        Conv2D(4, 3, activation="softmax")
    with pytest.raises(InputError, match="activation must be None or 'relu' or 'softmax', got "
                       "'tanh'"):
        Dense(4, activation="tanh")


def test_validation_freq_validates_after_every_kth_epoch(data, tmp_path):
    """fit(validation_freq=2) (Keras 3): validation after epochs 2 and 4 of 5 (counted from 1),
    each the loss and accuracy that evaluate gives for that epoch's weights; training as with
    validation every epoch, bit for bit; and a run resumed from its checkpoint has the same
    history."""
    x, y = data
    xv, yv = x[:20], y[:20]

    def run(freq, callbacks=(), **kwargs):
        model = xpcnn.Sequential(gap_net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        seen = []
        keep = xpcnn.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
            (sorted(k for k in logs if k.startswith("val_")), model.get_weights())))
        history = model.fit(x, y, epochs=5, batch_size=16, verbose=0, validation_data=(xv, yv),
                            validation_freq=freq, callbacks=[keep, *callbacks], **kwargs)
        return model, history, seen

    every, h_every, seen_every = run(1)
    model, history, seen = run(2)
    assert [keys for keys, _ in seen] == [[], ["val_accuracy", "val_loss"]] * 2 + [[]]
    assert len(history.history["loss"]) == 5 and len(history.history["val_loss"]) == 2
    assert history.epochs_of("val_loss") == [1, 3] and history.epochs_of("loss") == list(range(5))
    probe = xpcnn.Sequential(gap_net(), seed=0)
    probe.compile()
    probe.build(x.shape[1:])
    for i, epoch in enumerate((1, 3)):
        probe.set_weights(seen[epoch][1])
        loss, accuracy = probe.evaluate(xv, yv, verbose=0)
        assert history.history["val_loss"][i] == pytest.approx(loss, rel=1e-6)
        assert history.history["val_accuracy"][i] == pytest.approx(accuracy)
        assert history.history["val_loss"][i] == h_every.history["val_loss"][epoch]
    for u, v in zip(model.get_weights(), every.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):  # stopped at the end of epoch 3, then resumed
        run(2, checkpoint=path, callbacks=[xpcnn.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch == 2 and _raise(KeyboardInterrupt))])
    _, resumed, _ = run(2, checkpoint=path, resume=True)
    del resumed.history["seconds"], history.history["seconds"]
    assert resumed.history == history.history and resumed.epoch == history.epoch
    assert resumed.epochs_of("val_accuracy") == [1, 3]
    # a collection of epochs (1-based), as Keras 3 takes it too
    _, listed, seen = run([1, 4])
    assert listed.epochs_of("val_loss") == [0, 3] and [bool(k) for k, _ in seen] == [
        True, False, False, True, False]


def _raise(error):
    raise error


@pytest.mark.parametrize("freq", [0, -1, True, 1.5, "2", [], [0, 2], [1, True], [1.0]])
def test_validation_freq_is_checked(data, freq):
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile()
    with pytest.raises(InputError, match="validation_freq must be a positive integer k "
                       r"\(validate after every k-th epoch\) or a collection of epoch numbers"):
        model.fit(*data, validation_data=data, validation_freq=freq, verbose=0)


def test_callbacks_refuse_what_validation_freq_makes_impossible(data, tmp_path):
    """Before any step: a val_* monitor in a fit that validates after none of its epochs (it
    would never decide anything), and a ModelCheckpoint path that names a val_* log in a fit
    whose saves include epochs without validation. A path that names it is fine where the
    saves are only at a better val_* value (validated epochs only)."""
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile()
    model.build(data[0].shape[1:])
    before = model.get_weights()
    fit = functools.partial(model.fit, *data, epochs=3, validation_data=data, verbose=0)
    with pytest.raises(InputError, match=r"EarlyStopping monitors 'val_loss', but "
                       r"validation_freq=5 validates after none of epochs 1 to 3"):
        fit(validation_freq=5, callbacks=[xpcnn.callbacks.EarlyStopping()])
    with pytest.raises(InputError, match="ModelCheckpoint path .* could not be filled"):
        fit(validation_freq=2, callbacks=[xpcnn.callbacks.ModelCheckpoint(
            tmp_path / "c-{epoch}-{val_loss:.3f}.npz", save_weights_only=True)])
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    fit(epochs=4, validation_freq=2, callbacks=[xpcnn.callbacks.ModelCheckpoint(
        tmp_path / "b-{epoch}-{val_loss:.3f}.npz", save_best_only=True, save_weights_only=True,
        initial_value_threshold=1e9)])
    fit(validation_freq=[1, 2, 3], callbacks=[xpcnn.callbacks.ModelCheckpoint(  # (every one)
        tmp_path / "e-{epoch}-{val_loss:.3f}.npz", save_weights_only=True)])
    assert len(list(tmp_path.glob("e-*.npz"))) == 3
    with pytest.raises(InputError, match=r"validation_freq=\[4, 7\] validates after none"):
        fit(validation_freq={7, 4}, callbacks=[xpcnn.callbacks.EarlyStopping()])
    saved = sorted(p.name.split("-")[1] for p in tmp_path.glob("b-*.npz"))
    assert saved[0] == "2" and set(saved) <= {"2", "4"}  # (4 only if it improved on 2)


def test_fit_calls_a_train_step_that_a_subclass_or_the_model_overrides(data, monkeypatch):
    """As in Keras, fit runs each step through an overridden train_step (a subclass's, or one
    set on the model); its own step otherwise, without train_step's checks of each batch,
    which fit's batches passed when it made them: the same weights either way."""
    class Counted(xpcnn.Sequential):
        calls = 0

        def train_step(self, xb, yb):
            Counted.calls += 1
            return super().train_step(xb, yb)

    def make(cls=xpcnn.Sequential):
        model = cls(gap_net(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        return model

    checked = []
    check = xpcnn.Sequential._check_step_batch
    monkeypatch.setattr(xpcnn.Sequential, "_check_step_batch",
                        lambda self, xb, yb: checked.append(self) or check(self, xb, yb))
    plain, subclassed, patched = make(), make(Counted), make()
    calls, step = [], patched.train_step
    patched.train_step = lambda xb, yb: calls.append(1) or step(xb, yb)
    for model in (plain, subclassed, patched):
        model.fit(*data, epochs=2, batch_size=16, verbose=0)
    assert Counted.calls == len(calls) == 6  # 2 epochs of 3 batches
    assert checked.count(plain) == 0 and checked.count(subclassed) == checked.count(patched) == 6
    for model in (subclassed, patched):
        for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
            assert np.array_equal(a, b)


def test_a_keras_style_train_step_of_one_argument_is_refused_before_training(data):
    """Keras 3's ``train_step(self, data)`` cannot take fit's ``(xb, yb)``: refused before
    any step, saying how xpcnn calls it (was: a bare TypeError from inside fit)."""
    class KerasStyle(xpcnn.Sequential):
        def train_step(self, data):
            return super().train_step(*data)

    model = KerasStyle(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05))
    with pytest.raises(InputError, match=r"train_step takes 1 argument\(s\) \(data\); fit calls "
                                         r"it as train_step\(xb, yb\)"):
        model.fit(*data, epochs=1, batch_size=16, verbose=0)
    assert model.optimizer.iterations == 0


def test_a_sequential_takes_keras_3s_input_first_and_keeps_its_name(tmp_path):
    """Sequential([xpcnn.Input(shape, name=...), ...]), Keras 3's way of giving the input:
    built for that shape, its name in the summary and the file (was: "add() expects an xpcnn
    layer, got SymbolicTensor"); add(Input(...)) after a layer says how to give the input
    instead (added first, it is Keras' way too: see test_functional)."""
    model = xpcnn.Sequential([xpcnn.Input((6, 6, 1), name="digits"), Flatten(), Dense(3)])
    assert model.built and model.input_shape == (None, 6, 6, 1)
    lines = []
    model.summary(print_fn=lines.append)
    assert '"digits" (None, 6, 6, 1)' in lines[0]
    model.save(tmp_path / "m.npz")
    back = xpcnn.load_model(tmp_path / "m.npz")
    assert back._input_name == "digits" and back.input_shape == (None, 6, 6, 1)
    with pytest.raises(InputError, match=r"and input_shape=\(5, 5, 1\): give one of them"):
        xpcnn.Sequential([xpcnn.Input((6, 6, 1)), Dense(3)], input_shape=(5, 5, 1))
    with pytest.raises(InputError, match=r"got a symbolic tensor: an xpcnn.Input\(shape\) is "
                                         r"added first, or given as "
                                         r"Sequential\(\[xpcnn.Input\(shape\), ...\]\)"):
        xpcnn.Sequential([Flatten()]).add(xpcnn.Input((6, 6, 1)))


def test_a_changed_layer_list_is_the_model_that_runs_and_saves(tmp_path):
    """model.layers.pop() (Keras 2's habit) left a model that predicted, trained and saved
    with different layers: predict and fit ran on the layers it was built with, get_weights
    and save had the others. Now a Sequential changed so builds again at once, as add() and
    Sequential.pop() (Keras') do, a change refused undone; a functional model's list is its
    graph's, refused."""
    x = np.random.default_rng(0).random((6, 4, 4, 2)).astype(np.float32)
    y = np.arange(6) % 3

    def trained():
        model = xpcnn.Sequential([Flatten(), Dense(8), ReLU(), Dense(3), Softmax()], seed=0)
        model.compile(optimizer="adam")
        model.fit(x, y, epochs=1, batch_size=3, verbose=0)
        return model

    model = trained()
    model.layers.pop()
    model.layers.pop()
    assert model.built and model.output_shape == (None, 8) and len(model.get_weights()) == 2
    features = xpcnn.Model(model.input, model.layers[-1].output).predict(x)
    np.testing.assert_array_equal(model.predict(x), features)
    assert features.shape == (6, 8)
    model.layers.sort(key=lambda la: 0)  # (a stable sort: keywords passed on)
    model.save(tmp_path / "m.npz")
    features = model.predict(x)
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(x), features)
    model = trained()
    last = model.pop()
    assert isinstance(last, Softmax) and model.built and model.output_shape == (None, 3)
    assert len(model.get_weights()) == 4
    assert len(model.optimizer.slots["m"]) == 4  # (the same layers trained: Adam's state kept)
    slots = {k: [np.array(a) for a in v] for k, v in model.optimizer.slots.items()}
    with pytest.raises(ValueError):
        model.layers.remove(Softmax())  # (a change that changes nothing: no build)
    assert model.optimizer.slots.keys() == slots.keys() and all(
        np.array_equal(a, b) for k in slots for a, b in zip(slots[k], model.optimizer.slots[k],
                                                            strict=True))
    with pytest.raises(InputError, match="expects per-sample inputs of shape"):
        model.layers.insert(1, Conv2D(2, 3))  # (after the Flatten: refused as a whole)
    assert len(model.layers) == 4 and model.built  # (was: left in, the model unbuilt)
    assert model.predict(x).shape == (6, 3) and model.built
    inputs = xpcnn.Input((4, 4, 2))
    graph_model = xpcnn.Model(inputs, Dense(3)(Flatten()(inputs)))
    with pytest.raises(InputError, match="layers are its graph's, not to change"):
        graph_model.layers.append(ReLU())
    assert len(graph_model.layers) == 2

@pytest.mark.parametrize("empty", ["pop", "clear", "assign"])
def test_an_emptied_sequential_keeps_its_input_for_the_next_add(empty):
    """A Sequential([Input, ...]) emptied by pop(), layers.clear() or layers = [] kept
    reporting its input but forgot it: the next add() took a layer that does not fit it (was:
    accepted unbuilt, refused only at the first batch). Now it is declared, as Keras keeps its
    InputLayer: add() builds for it, or refuses as a fresh Sequential([Input]) does."""
    model = xpcnn.Sequential([xpcnn.Input((8, 8, 3)), Conv2D(4, 3), Flatten(), Dense(3)])
    if empty == "pop":
        for _ in range(3):
            model.pop()
    elif empty == "clear":
        model.layers.clear()
    else:
        model.layers = []
    with pytest.raises(InputError, match=r"'dense.*' \(Dense\) expects flat per-sample inputs"):
        model.add(Dense(3))
    assert not model.layers
    model.add(Flatten())
    assert model.built and model.output_shape == (None, 192)
    with pytest.raises(InputError, match="already has its input, of shape"):
        model.pop(), model.add(xpcnn.Input((4, 4, 1)))


def test_an_emptied_sequential_built_by_its_data_keeps_that_input_as_keras():
    """One built by its first data, no input declared, keeps that input when emptied, as
    Keras 3's Sequential does (it inserts an InputLayer at any build): refilled, it is built
    for it, and data of another shape is refused (README, Sequential's row)."""
    rng = np.random.default_rng(2)
    model = xpcnn.Sequential([Flatten(), Dense(3)])
    model.predict(rng.random((2, 4, 4, 1)).astype(np.float32), verbose=0)
    model.pop(), model.pop()
    assert not model.built and model.input_shape == (None, 4, 4, 1)
    model.add(Flatten())
    model.add(Dense(2))
    assert model.built and model.output_shape == (None, 2) and model.input_shape == (None, 4, 4, 1)
    with pytest.raises(InputError, match=r"per-sample shape \(6, 6, 3\) but the model expects "
                                         r"\(4, 4, 1\)"):
        model.predict(rng.random((2, 6, 6, 3)).astype(np.float32), verbose=0)


def _small_dense_model():
    model = xpcnn.Sequential([Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    return model


class _Passes:
    """A re-iterable of (x, y) batches (a DataLoader's kind): a new pass at each iter()."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch

    def __iter__(self):
        return ((self.x[i:i + self.batch], self.y[i:i + self.batch])
                for i in range(0, len(self.x), self.batch))


def test_a_re_iterable_shorter_than_steps_per_epoch_ends_each_epoch_not_the_fit():
    """fit(loader, steps_per_epoch=5) of a 3-batch loader trained one epoch of 3 and stopped,
    warning about an iterator: a re-iterable gives a new pass each epoch, so each epoch ends
    where its pass does, with a warning, as in Keras 3 (an iterator still stops the fit)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((15, 4, 4, 1)), rng.integers(0, 3, 15)
    model = _small_dense_model()
    with pytest.warns(RuntimeWarning, match=r"the training data gave 3 of its 5 batches "
                                            r"\(steps_per_epoch\) in epoch \d: the epoch ends "
                                            r"there, and the next starts a new pass") as seen:
        history = model.fit(_Passes(x, y, 5), steps_per_epoch=5, epochs=3, verbose=0)
    assert history.epoch == [0, 1, 2] and model.optimizer.iterations == 9
    assert len([w for w in seen if "training data" in str(w.message)]) == 3
    assert {w.filename for w in seen} == {__file__}  # (pointed at the fit call)
    same = _small_dense_model()  # (the same steps as the arrays' unshuffled epochs)
    same.fit(x, y, batch_size=5, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), same.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    model = _small_dense_model()
    with pytest.warns(RuntimeWarning, match=r"training stops here; an iterator needs"):
        history = model.fit(iter(_Passes(x, y, 5)), steps_per_epoch=5, epochs=3, verbose=0)
    assert history.epoch == [0] and model.optimizer.iterations == 3


@pytest.mark.parametrize("batches", [3, 4])
def test_a_validation_iterator_that_runs_out_stops_the_fit_cleanly(batches):
    """validation_steps=2 of a generator of 3 batches: epoch 2 was validated on the one left
    without a word; of 4, epoch 3 got none: an InputError after it had trained, its
    on_epoch_end, on_train_end and History lost. Now a warning; the epoch keeps its logs
    (val_* of the batches there were, none where there were none), and training stops after
    it, cleanly, as where the training data runs out."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 4, 4, 1)), rng.integers(0, 3, 20)
    ends, trained = [], []
    watch = xpcnn.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: ends.append((epoch, sorted(logs))),
        on_train_end=lambda logs: trained.append(True))
    model = _small_dense_model()
    validation = iter(_Passes(x[:5 * batches], y[:5 * batches], 5))
    last = 1 if batches == 3 else 2  # (the epoch it runs out in, 0-based)
    with pytest.warns(RuntimeWarning, match=r"the validation data ran out after "
                                            f"{batches % 2} of its 2 batches \\(validation_steps"
                                            f"\\) in epoch {last + 1}: training stops after "
                                            r"this epoch") as seen:
        history = model.fit(x, y, batch_size=5, epochs=5, validation_data=validation,
                            validation_steps=2, callbacks=[watch], verbose=0)
    assert [w.filename for w in seen] == [__file__]  # (pointed at the fit call)
    assert history.epoch == list(range(last + 1)) and trained == [True]
    assert model.optimizer.iterations == 4 * (last + 1)
    keys = ["accuracy", "loss", "seconds", "val_accuracy", "val_loss"]
    assert ends == [(e, keys) for e in range(last)] + [(last, keys if batches == 3
                                                          else keys[:3])]
    if batches == 3:  # (the one batch left: its own loss)
        assert history.history["val_loss"][1] == pytest.approx(
            model.evaluate(x[10:15], y[10:15], verbose=0)[0], rel=0.2)
    with pytest.warns(RuntimeWarning, match=r"the evaluation data ran out after 1 of its 3 "
                                            r"batches \(steps\)$") as seen:
        model.evaluate(iter(_Passes(x[:5], y[:5], 5)), steps=3)
    assert [w.filename for w in seen] == [__file__]


def test_xpcnns_warnings_point_at_the_users_call(tmp_path):
    """Each warning names the user's line (the first frame outside xpcnn), not one inside
    xpcnn's wrappers (a count of frames pointed at training.py's fit guard, at the callback
    list, or at data.py): the channels-first hint, a History log that is no number, a
    CSVLogger column that is not there."""
    model = _small_dense_model()
    x, y = np.random.default_rng(0).standard_normal((8, 3, 6, 6)), np.arange(8) % 3
    with pytest.warns(UserWarning, match="looks like channels-first") as seen:
        model.fit(x, y, epochs=1, verbose=0)
    assert [w.filename for w in seen] == [__file__]
    late = xpcnn.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(
        note="text", **({"late": 1.0} if epoch else {})))
    log = xpcnn.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    with pytest.warns(RuntimeWarning) as seen:
        model.fit(x, y, epochs=2, verbose=0, callbacks=[late, log])
    messages = sorted(str(w.message).split(";")[0][:40] for w in seen)
    assert any("History records numbers" in m for m in messages), messages
    assert any("CSVLogger's file" in m for m in messages), messages
    assert {w.filename for w in seen} == {__file__}


# -- build again, layers assigned, a layer's trainable in its config, set_weights' argument ------
def _trained_chain():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    model = xpcnn.Sequential([Conv2D(4, 3), ReLU(), Flatten(), Dense(4)], input_shape=(8, 8, 3))
    model.compile(loss="cross_entropy", optimizer=xpcnn.optim.Adam(1e-2))
    model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    return model, x, y


def test_building_a_trained_model_again_keeps_its_optimizer_state(tmp_path):
    """model.build(shape) on a trained model dropped Adam's moments (Keras 3 leaves the
    optimizer's variables alone; README: the state starts afresh only where the trained layers
    change), and so did add() of a layer without parameters at the next use: train, build,
    train trained otherwise than train, train. A checkpoint written after such a build resumes
    exactly."""
    from xpcnn.saving import load_checkpoint, save_checkpoint

    plain, x, y = _trained_chain()
    plain.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    model, _, _ = _trained_chain()
    slots = {k: [np.array(a) for a in v] for k, v in model.optimizer.slots.items()}
    model.build((8, 8, 3))
    assert model.optimizer.slots.keys() == slots.keys() == {"m", "v"}
    for k in slots:
        for a, b in zip(slots[k], model.optimizer.slots[k], strict=True):
            np.testing.assert_array_equal(a, b)
    save_checkpoint(model, tmp_path / "c.npz")
    model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = load_checkpoint(tmp_path / "c.npz").model
    resumed.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    added, _, _ = _trained_chain()
    added.add(Softmax())  # (no parameters: the same layers trained)
    added.predict(x[:1], verbose=0)
    assert [len(v) for v in added.optimizer.slots.values()] == [4, 4]
    added.layers.insert(-1, Dense(4))  # (other layers trained: the state starts afresh)
    added.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert [len(v) for v in added.optimizer.slots.values()] == [6, 6]


def test_assigning_a_sequentials_layers_is_a_change_of_its_layers():
    """model.layers = [...] put a plain list in place: two layers named 'dense', get_layer
    finding the wrong one. Now it is taken as layers[:] = [...] is (names made apart, built
    again at once), checked first and refused as a whole."""
    model = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(8), ReLU(), Dense(4)],
                             input_shape=(8, 8, 3))
    x = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    new = Dense(3)
    model.layers = model.layers[:-2] + [new]
    assert isinstance(model.layers, xpcnn.model.LayerList) and model.built
    assert [la.name for la in model.layers] == ["conv2d", "flatten", "dense", "dense_1"]
    assert model.get_layer("dense_1") is new and model.output_shape == (None, 3)
    paths = [w.path for w in model.weights]
    assert len(set(paths)) == len(paths) == 6
    assert model.predict(x, verbose=0).shape == (4, 3)
    model.compile(optimizer="adam")
    model.fit(x, np.arange(4) % 3, epochs=1, verbose=0)
    layers, weights = list(model.layers), model.get_weights()
    slots = {k: len(v) for k, v in model.optimizer.slots.items()}
    refused = [
        (None, "layers must be a list of xpcnn layers, got NoneType"),
        ([Flatten(), 3], "got a list holding int"),
        ([layers[0], layers[0]], r"layer 'conv2d' \(Conv2D\) is given twice"),
        ([Flatten(), Conv2D(2, 3)], r"expects per-sample inputs of shape \(H, W, C\)"),
        ([*layers[:2], Dense(3, name="a"), Dense(3, name="a")], "two layers of the model are "
                                                               "named 'a'"),
    ]
    for value, message in refused:
        with pytest.raises(InputError, match=message):
            model.layers = value
        # (nothing changed: the layers, their names, the model built with its weights)
        assert list(model.layers) == layers and model.built and model.output_shape == (None, 3)
        assert [la.name for la in model.layers] == ["conv2d", "flatten", "dense", "dense_1"]
        for a, b in zip(weights, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert {k: len(v) for k, v in model.optimizer.slots.items()} == slots
    model.layers = ()
    assert list(model.layers) == [] and not model.built


def test_trainable_is_a_layers_setting_in_its_config_as_in_keras(tmp_path):
    """Dense(3, trainable=False) was a TypeError and a frozen layer's get_config() did not say
    so (Dense.from_config made a trainable copy). Every layer takes trainable= now, and its
    get_config() holds "trainable": False where frozen (a trainable layer's stays as it was);
    a model's configuration says it once, in the layer's spec, as files always have."""
    frozen = Dense(3, trainable=False)
    assert frozen.trainable is False
    assert frozen.get_config()["trainable"] is False
    assert "trainable" not in Dense(3).get_config()
    assert Dense.from_config(frozen.get_config()).trainable is False
    assert frozen.unbuilt_copy().trainable is False
    for layer in (Conv2D(2, 3, trainable=False), BatchNorm2D(trainable=False),
                  Dropout(0.5, trainable=False), ReLU(trainable=False), Flatten(trainable=False)):
        assert layer.trainable is False
        assert type(layer).from_config(layer.get_config()).trainable is False
    with pytest.raises(InputError, match="trainable must be True or False"):
        Dense(3, trainable="no")
    layer = Dense(3)
    layer.trainable = False  # (set later: the config follows it)
    assert layer.get_config()["trainable"] is False and "trainable=False" in repr(layer)
    model = xpcnn.Sequential([Flatten(), Dense(4, trainable=False), Dense(3)],
                             input_shape=(2, 2, 1))
    spec = model.get_config()["layers"][1]
    assert spec["trainable"] is False and "trainable" not in spec["config"]
    model.save(tmp_path / "m.npz")
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert [la.trainable for la in loaded.layers] == [True, False, True]
    assert xpcnn.Sequential.from_config(model.get_config()).layers[1].trainable is False


def test_a_layers_set_weights_refuses_what_is_no_list_of_arrays():
    """Layer.set_weights(None) or of a generator was a bare TypeError from len(), one array
    was read as a list of its rows, a ragged element failed in NumPy: each named now."""
    conv = Conv2D(4, 3)
    conv.build((8, 8, 3))
    weights = conv.get_weights()
    expected = r"layer 'conv2d' set_weights expects a list of arrays \(as get_weights " \
               r"returns: kernel, bias\), got "
    for value, got in [(None, "NoneType"), (weights[0], "ndarray"),
                       ((w for w in weights), "generator")]:
        with pytest.raises(InputError, match=expected + got):
            conv.set_weights(value)
    with pytest.raises(InputError, match=r"layer 'conv2d' weight 'kernel' must be an array of "
                                         r"shape \(3, 3, 3, 4\), got a list that is no array"):
        conv.set_weights([[1, [2]], np.zeros(4)])
    model = xpcnn.Sequential([conv], input_shape=(8, 8, 3))
    with pytest.raises(InputError, match="weight 'kernel' must be an array of shape"):
        model.set_weights([[1, [2]], np.zeros(4)])
    for a, b in zip(weights, conv.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    conv.set_weights(tuple(weights))  # (a tuple is a list here, as for a model)


def test_a_ceiling_given_to_a_fused_relu_after_its_first_pass_is_applied():
    """A plain ReLU() after a Dense is fused into it by the model's plan; given a ceiling after
    the plan was compiled (a callback's schedule, say), the plan kept the fused ReLU without
    one: predict and training ignored the ceiling. The plan is compiled again on a changed
    setting (the optimiser's state kept: the same layers train)."""
    def make(ceiling=None):
        model = xpcnn.Sequential([Flatten(), Dense(4), ReLU(ceiling), Dense(2)], seed=0,
                                 dtype="float64")
        model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
        return model

    model = make()
    x = np.random.default_rng(0).standard_normal((6, 3)) * 10
    y = np.array([0, 1, 0, 1, 0, 1])
    model.train_on_batch(x, y)
    slots = {k: list(v) for k, v in model.optimizer.slots.items()}
    model.layers[2].max_value = 0.1
    k1, b1, k2, b2 = model.get_weights()
    np.testing.assert_allclose(model.predict(x), np.clip(x @ k1 + b1, 0, 0.1) @ k2 + b2,
                               rtol=1e-12)
    # A training step as a model built with the ceiling takes it (momentum carried over).
    reference = make(0.1)
    reference.train_on_batch(x, y)
    reference.set_weights(model.get_weights())
    for k in slots:
        for mine, theirs in zip(slots[k], reference.optimizer.slots[k], strict=True):
            theirs[...] = mine
    model.train_on_batch(x, y)
    reference.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert all(a is b for k in slots for a, b in zip(slots[k], model.optimizer.slots[k],
                                                    strict=True))


def test_activation_changed_after_a_step_recompiles_the_plan():
    """Conv2D/Dense ``activation`` set to None after a training step: the plan compiled with
    the fused ReLU kept handing its gradient on, so every later step masked a linear layer's
    gradient (weights up to 5e-3 off). It is a counted setting now: the next step equals, bit
    for bit, a model built with activation=None from the same weights."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8, 8, 3)), rng.integers(0, 3, 16)

    def make(act):
        model = xpcnn.Sequential([Conv2D(4, 3, activation=act), MaxPool2D(2), Flatten(),
                                  Dense(8, activation=act), Dropout(0.0), Dense(3)], seed=0,
                                 input_shape=(8, 8, 3), dtype="float64")
        model.compile(loss="cross_entropy", optimizer="sgd")
        return model

    model = make("relu")
    model.train_on_batch(x, y)
    model.layers[0].activation = None
    model.layers[3].activation = None
    reference = make(None)
    reference.set_weights(model.get_weights())
    np.testing.assert_array_equal(model.predict(x, verbose=0), reference.predict(x, verbose=0))
    model.train_on_batch(x, y)
    reference.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_activation_assigned_after_build_is_checked_and_saved_as_it_runs(tmp_path):
    """``dense.activation = "ReLU"`` ran linear but saved as relu; "tanh" ran as the identity
    and saved a file that never loaded. Each is now the constructor's check: "ReLU" is taken
    as "relu" (and applied), "tanh" refused with the constructor's message, the old value
    kept; a softmax activation moved before the end is refused as build refuses it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)

    def make(act=None):
        return xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(8, activation=act), Dense(3)],
                                seed=0, input_shape=(8, 8, 3))

    model, reference = make(), make("relu")
    model.layers[2].activation = "ReLU"
    assert model.layers[2].activation == "relu"
    out = model.predict(x, verbose=0)
    np.testing.assert_array_equal(out, reference.predict(x, verbose=0))
    model.save(tmp_path / "a.npz")
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "a.npz").predict(x, verbose=0),
                                  out)
    for layer, value in ((model.layers[2], "tanh"), (model.layers[0], "softmax")):
        with pytest.raises(InputError) as refusal:
            layer.activation = value
        with pytest.raises(InputError) as constructor:
            type(layer)(3, activation=value)
        assert str(refusal.value) == str(constructor.value)
    assert model.layers[2].activation == "relu" and model.layers[0].activation is None
    model.layers[2].activation = "softmax"  # (a Dense's, before the last layer)
    with pytest.raises(InputError, match="softmax activation"):
        model.predict(x, verbose=0)
    model.layers[2].activation = None
    model.layers[3].activation = "softmax"  # (at the end: probabilities, as built with it)
    probabilities = model.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_built_layer_refuses_a_copy_by_name_an_unbuilt_one_copies(how):
    """copy.deepcopy / pickle of a built layer gave a bare "TypeError: cannot pickle 'module'
    object" from inside copy; it is refused as a model's copy is, naming what to do instead
    (from_config(get_config()), then set_weights(get_weights())). An unbuilt layer copies."""
    import copy
    import pickle

    call = {"deepcopy": copy.deepcopy, "copy": copy.copy,
            "pickle": lambda la: pickle.loads(pickle.dumps(la))}[how]
    layer = Dense(3, activation="relu", name="head")
    again = call(layer)
    assert again is not layer and again.get_config() == layer.get_config()
    assert Dropout(0.3).rate == call(Dropout(0.3)).rate
    layer.build((4,))
    with pytest.raises(InputError, match=r"layer 'head' \(Dense\) is built and cannot be copied "
                                         r"or pickled .*Dense.from_config\(layer.get_config\(\)\)"
                                         r" and, once built, new.set_weights"):
        call(layer)
    twin = Dense.from_config(layer.get_config())
    twin.build((4,))
    twin.set_weights(layer.get_weights())


def test_a_softmax_activation_moved_before_the_end_is_refused_by_save_and_export(tmp_path):
    """A hidden Dense given activation="softmax" after its build was refused by predict and
    fit, but save wrote a file load_model then refused, and export wrote the layer as linear."""
    model = xpcnn.Sequential([Flatten(), Dense(4, name="hidden"), Dense(3)], input_shape=(2, 2))
    model.layers[1].activation = "softmax"
    for write in (lambda: model.save(tmp_path / "m.npz"),
                  lambda: model.save_weights(tmp_path / "w.npz"),
                  lambda: model.export(tmp_path / "m.onnx")):
        with pytest.raises(InputError, match="layer 'hidden' .* is not the last layer: its "
                                             "softmax activation"):
            write()
    assert not list(tmp_path.iterdir())


def _small(built=True):
    model = xpcnn.Sequential([Conv2D(2, 3), Flatten(), Dense(3), Softmax()], seed=0,
                             input_shape=(6, 6, 3) if built else None)
    model.compile(optimizer="adam")
    return model


@pytest.mark.parametrize("built", [True, False])
@pytest.mark.parametrize("wrap", [list, tuple, "torch"])
def test_a_one_element_list_of_the_input_array_is_the_input_at_every_entry_point(wrap, built):
    """Keras 3 takes [x] or (x,) for a one-input model; xpcnn read the list as one array,
    (1, N, H, W, C), and refused it (or built an unbuilt model for N-channel samples). In
    model(...), predict, predict_on_batch, evaluate, test_on_batch, train_on_batch and fit
    (x, validation data too; y as [y] as well), it is x: the results bit for bit as x's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    if wrap == "torch":
        torch = pytest.importorskip("torch")
        box = [torch.from_numpy(x)]
    else:
        box = wrap([x])
    ys = [y] if wrap == "torch" else wrap([y])
    for call in (
            lambda m, a: np.asarray(m(a)),
            lambda m, a: m.predict(a, verbose=0),
            lambda m, a: m.predict_on_batch(a),
            lambda m, a: m.evaluate(a, y, verbose=0),
            lambda m, a: m.test_on_batch(a, y)):
        want, got = call(_small(built), x), call(_small(built), box)
        np.testing.assert_array_equal(got, want)
    plain, boxed = _small(built), _small(built)
    assert plain.train_on_batch(x, y) == boxed.train_on_batch(box, ys)
    plain.fit(x, y, epochs=2, batch_size=4, verbose=0, validation_data=(x, y))
    boxed.fit(box, ys, epochs=2, batch_size=4, verbose=0, validation_data=(box, ys))
    assert boxed.input_shape == (None, 6, 6, 3)
    for key, values in plain.history.history.items():
        assert key == "seconds" or boxed.history.history[key] == values
    for a, b in zip(plain.get_weights(), boxed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("built", [True, False])
def test_several_input_arrays_are_refused_naming_the_models_one_input(built):
    x = np.zeros((4, 6, 6, 3), np.float32)
    model = _small(built)
    one = r"\(N, 6, 6, 3\)" if built else r"\(N, H, W, C\)"
    for call in (model, model.predict, model.predict_on_batch,
                 functools.partial(model.fit, y=np.zeros(4, int), verbose=0),
                 functools.partial(model.train_on_batch, y=np.zeros(4, int))):
        with pytest.raises(InputError, match=rf"^x is a (list|tuple) of 2 arrays \(shapes "
                                             rf"\(4, 6, 6, 3\), \(4, 6, 6, 3\)\), but model "
                                             rf"'sequential' has one input, {one}"):
            call((x, x) if call is model.predict else [x, x])
    assert model.built == built


@pytest.mark.parametrize("built", [True, False])
def test_an_x_y_pair_given_as_x_is_unpacked_as_keras_does(built):
    """Keras 3 unpacks x = (x, y[, sample_weight]) (its unpack_x_y_sample_weight): predict
    ignores y, evaluate and fit take them (was: NumPy's "inhomogeneous shape" from predict,
    "y ... is missing" from evaluate). Given y or sample_weight too, it is refused naming the
    pair."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 6, 6, 3)).astype(np.float32)
    y, w = rng.integers(0, 3, 6), rng.random(6)
    model = _small(built)
    np.testing.assert_array_equal(model.predict((x, y)), model.predict(x))
    np.testing.assert_array_equal(model.predict((x, y, w)), model.predict(x))
    assert model.evaluate((x, y)) == model.evaluate(x, y)
    assert model.evaluate([x, y, w]) == model.evaluate(x, y, sample_weight=w)
    with pytest.raises(InputError, match=r"^x is a tuple \(x, y\) of arrays of shapes "
                                         r"\(6, 6, 6, 3\), \(6,\), and y is given too"):
        model.evaluate((x, y), y)
    with pytest.raises(InputError, match=r"\(x, y, sample_weight\) .*sample_weight is given "
                                         r"too: pass the tuple"):
        model.fit((x, y, w), sample_weight=w, verbose=0)
    twin = _small(built)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    twin.compile(optimizer=xpcnn.optim.SGD(0.1))
    model.fit((x, y, w), epochs=2, batch_size=4, verbose=0, shuffle=False)
    twin.fit(x, y, sample_weight=w, epochs=2, batch_size=4, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("built", [True, False])
def test_a_pair_whose_second_array_cannot_be_labels_is_two_inputs_refused(built):
    """x = (x, y) is unpacked only where its second array could be labels (rank 1 or 2): two
    batches of images, of other per-sample shapes, are refused as two inputs by fit, evaluate
    and predict alike (was: predict ignored the second, evaluate took it as labels)."""
    rng = np.random.default_rng(4)
    xa = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    xb = rng.normal(size=(4, 5, 5, 3)).astype(np.float32)
    model = _small(built)
    one = r"\(N, 6, 6, 3\)" if built else r"\(N, H, W, C\)"
    two = (rf"^x is a tuple of 2 arrays \(shapes \(4, 6, 6, 3\), \(4, 5, 5, 3\)\), but model "
           rf"'sequential' has one input, {one}")
    for call in (model.predict, model.evaluate, functools.partial(model.fit, epochs=1),
                 functools.partial(model.fit, y=np.zeros(4, int))):
        with pytest.raises(InputError, match=two):
            call((xa, xb), verbose=0)
    assert model.built == built


@pytest.mark.parametrize("built", [True, False])
def test_a_pair_with_labels_of_a_wrong_shape_gets_the_labels_refusal(built):
    """x = (images, masks): the masks are no batch of the model's images, so the pair is read
    as (x, y) and the labels' check names their shape (review RD: was called two inputs)."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    masks = rng.normal(size=(4, 6, 6)).astype(np.float32)
    model = _small(built)
    with pytest.raises(InputError, match=r"^y must be integer labels of shape \(4,\) or "
                                         r"one-hot rows of shape \(4, \d+\); got shape "
                                         r"\(4, 6, 6\)"):
        model.fit((x, masks), epochs=1, verbose=0)


def test_a_pair_of_one_flat_shape_is_refused_as_ambiguous():
    """A flat model whose features equal its classes: (x, one_hot) reads as (x, y) or as two
    inputs, refused naming both and how to pass them (was: "y ... is missing" from fit)."""
    rng = np.random.default_rng(5)
    model = xpcnn.Sequential([Dense(10), Softmax()], input_shape=(10,), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    x = rng.random((8, 10)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]
    ambiguous = (r"x is a tuple of arrays of shapes \(8, 10\), \(8, 10\).*, which is "
                 r"ambiguous for model 'sequential', of input \(N, 10\): \(x, y\) with one-hot "
                 r"labels, or two batches of its one input\? Pass ")
    for call, apart in ((model.fit, r"x and y apart, fit\(x, y\)$"),
                        (model.evaluate, r"x and y apart, evaluate\(x, y\)$"),
                        (model.predict, r"x alone, predict\(x\)$")):
        with pytest.raises(InputError, match=rf"^{call.__name__}: {ambiguous}{apart}"):
            call((x, y), verbose=0)
    with pytest.raises(InputError, match=rf"^fit: {ambiguous}"):
        model.fit((x, y, None), verbose=0)
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])  # (apart: taken)
    assert model.evaluate((x, y[:, :3].argmax(1))) == model.evaluate(x, y[:, :3].argmax(1))


def test_lists_of_samples_keep_their_meaning_beside_one_element_lists():
    """A list of samples (arrays of one rank less than the input, nested lists of numbers)
    is still one batch, as NumPy reads it; [label] of one sample is still its label, and a
    greyscale batch without its channel axis, [x] of (N, H, W), is the input too."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6, 6, 3)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    model = _small()
    want = model.predict(x)
    np.testing.assert_array_equal(model.predict(list(x)), want)
    np.testing.assert_array_equal(model.predict(x.tolist()), want)
    np.testing.assert_array_equal(model.predict([x[0]]), model.predict(x[:1]))
    np.testing.assert_array_equal(model([x[1]]), model(x[1:2]))
    assert model.evaluate(list(x), y.tolist()) == model.evaluate(x, y)
    assert _small().train_on_batch(x[:1], [int(y[0])]) == _small().train_on_batch(x[:1], y[:1])
    grey = xpcnn.Sequential([Conv2D(2, 3), Flatten(), Dense(3)], seed=0, input_shape=(6, 6, 1))
    np.testing.assert_array_equal(grey.predict([x[..., 0]]), grey.predict(x[..., :1]))


def test_one_element_lists_of_images_and_sample_weights_fit_an_unbuilt_flatten_model():
    """[x] of (N, H, W, C) images is the input of an unbuilt model whose layers would build
    for any rank (Flatten, Dense: the trial builds cannot tell one sample of rank 4 from N of
    rank 3), and [w] of the N sample weights is w, as in Keras 3: the same training as x, y,
    w (both were read as one sample before)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 4, 1)).astype(np.float32)
    y, w = rng.integers(0, 3, 6), rng.uniform(0.5, 2.0, 6)

    def make():
        model = xpcnn.Sequential([Flatten(), Dense(3)], seed=1)
        model.compile(optimizer="sgd")
        return model

    plain, wrapped = make(), make()
    plain.fit(x, y, sample_weight=w, epochs=2, batch_size=4, verbose=0)
    wrapped.fit([x], [y], sample_weight=[w], epochs=2, batch_size=4, verbose=0)
    for a, b in zip(plain.get_weights(), wrapped.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert wrapped.evaluate([x], (y,), sample_weight=(w,), verbose=0) == \
        plain.evaluate(x, y, sample_weight=w, verbose=0)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_layers_around_an_unbuilt_nested_base_are_built_once(precision):
    """Sequential([pre, base, mid, base2, head]) of unbuilt bases: the layers before a base
    are built for the shape that reaches it, then the whole chain, which finds them built (a
    second build would draw their weights again)."""
    built = []

    class Counted(Conv2D):
        def _build(self, input_shape, rng):
            built.append(self.name)
            return super()._build(input_shape, rng)

    base = xpcnn.Sequential([Counted(2, 1, name="b1")])
    base2 = xpcnn.Sequential([Counted(2, 1, name="c1")])
    model = xpcnn.Sequential([Counted(2, 1, name="pre"), base, Counted(2, 1, name="mid"), base2,
                              Flatten(), Dense(3)])
    model.compile(loss="cross_entropy", optimizer="sgd", precision=precision)
    model.build((4, 4, 1))
    assert built == ["pre", "b1", "mid", "c1"], built


def _bn_dropout_model() -> xpcnn.Sequential:
    model = xpcnn.Sequential([xpcnn.Input((6, 6, 2)), Conv2D(4, 3), BatchNorm2D(), ReLU(),
                              Dropout(0.5), Flatten(), Dense(3)], seed=0)
    model.compile(optimizer="sgd")
    return model


def test_layer_outputs_in_training_mode_leave_the_model_as_it_was(rng):
    """layer_outputs(x, training=True) shows training mode (Dropout drops, BatchNorm2D uses
    the batch's statistics) but changes nothing: the moving statistics, the next draws, so
    predict and the next fit are those of a model never inspected."""
    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    y = np.arange(8) % 3
    inspected, plain = _bn_dropout_model(), _bn_dropout_model()
    outs = [np.asarray(o) for o in inspected.layer_outputs(x, training=True)]
    kept = outs[2] != 0  # (Dropout in training mode: every value dropped or scaled)
    assert not np.any(outs[3][kept] == outs[2][kept])
    np.testing.assert_array_equal(inspected.predict(x), plain.predict(x))
    for model in (inspected, plain):
        model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    for a, b in zip(inspected.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layer_outputs_in_training_mode_are_refused_while_another_thread_trains(rng):
    """A training-mode pass is a training call: from another thread while fit runs, it is
    refused by name (it would race the step's own passes); from fit's own thread (a
    callback), it runs and the fit goes on as if it had not."""
    import threading

    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    y = np.arange(8) % 3
    errors: list[Exception] = []

    def from_another_thread(model: xpcnn.Sequential) -> None:
        try:
            model.layer_outputs(x, training=True)
        except InputError as e:
            errors.append(e)

    def at_batch_end(model: xpcnn.Sequential, cross: bool) -> None:
        if cross:
            t = threading.Thread(target=from_another_thread, args=(model,))
            t.start()
            t.join()
        else:
            model.layer_outputs(x, training=True)

    runs = []
    for cross in (True, False, None):
        model = _bn_dropout_model()
        cb = xpcnn.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs, m=model, c=cross: None if c is None
            else at_batch_end(m, c))
        model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[cb])
        runs.append(model.get_weights())
    assert len(errors) == 2  # (each batch's call from the other thread)
    assert all("layer_outputs(training=True) was called while this model's fit runs in "
               "another thread" in str(e) for e in errors)
    for a, b in zip(runs[1], runs[2], strict=True):  # (the callback's call changed nothing)
        np.testing.assert_array_equal(a, b)


def test_a_predict_beside_a_training_mode_inspection_reads_the_models_statistics(rng):
    """layer_outputs(training=True) moves BatchNorm2D's statistics and puts them back after:
    a predict in another thread meanwhile would read the inspection's (was: most of them
    did). No pass of another thread runs during it, so every predict is the model's."""
    import threading

    model = _bn_dropout_model()
    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    reference = model.predict(x)
    done, results = threading.Event(), []

    def predict_until_done() -> None:
        while not done.is_set():
            results.append(model.predict(x))

    thread = threading.Thread(target=predict_until_done)
    thread.start()
    try:
        for _ in range(100):
            model.layer_outputs(x * 5 + 3, training=True)
    finally:
        done.set()
        thread.join()
    assert results and all(np.array_equal(r, reference) for r in results)


@pytest.mark.parametrize("training", [None, False, 0])
def test_layer_outputs_take_keras_false_values_for_inference(training, rng):
    """``training=None`` (Keras' default), False or 0 is inference; a value other than those,
    True and 1 is refused rather than taken by its truth."""
    model = _bn_dropout_model()
    x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    inference = [np.asarray(o) for o in model.layer_outputs(x)]
    for a, b in zip(model.layer_outputs(x, training=training), inference, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    for wrong in ("yes", 2, 0.0, np.array([True, False])):
        with pytest.raises(InputError, match="training must be True, False or None, got"):
            model.layer_outputs(x, training=wrong)


def test_a_training_mode_inspection_inside_a_pass_is_refused_by_name(rng):
    """layer_outputs(training=True) from a layer's forward (a pass holding the pass lock) is
    refused with what it does and where to call it, not with a build's message, nor a wait
    for the pass it runs in."""
    from xpcnn.layers import Layer

    inspected = _bn_dropout_model()
    x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    errors: list[str] = []

    class Inspecting(Layer):
        def forward(self, x, training=False, options=None):
            try:
                inspected.layer_outputs(np.zeros((2, 6, 6, 2), np.float32), training=True)
            except InputError as e:
                errors.append(str(e))
            return x

    outer = xpcnn.Sequential([xpcnn.Input((6, 6, 2)), Inspecting(), Flatten(), Dense(3)], seed=0)
    outer.predict(x)
    assert errors and "layer_outputs(training=True) was called inside a pass" in errors[0]
    assert "call it outside the pass" in errors[0]
    assert len(inspected.layer_outputs(x, training=True)) == len(inspected.layers)  # (outside)
