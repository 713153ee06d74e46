"""Layers and models used from several threads: a model predicting in one thread (a server's)
while it trains in another, and an unbuilt layer's first call made by several threads at once."""

import sys
import threading

import numpy as np
import pytest

import xpcnn
from xpcnn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    Softmax,
)
from xpcnn.layers import base as layer_base


def _data(n=96):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 3), dtype=np.float32), rng.integers(0, 4, n)


def _model(precision):
    """A plan with a fused ReLU, a ReLU of its own (after the pool: its mask kept), BatchNorm
    (moving statistics), Dropout (applying the Dense's ReLU gradient) and a Softmax."""
    model = xpcnn.Sequential([Conv2D(6, 3, name="conv"), ReLU(), MaxPool2D(2),
                              BatchNorm2D(name="bn"), ReLU(max_value=6.0), Flatten(),
                              Dense(12, activation="relu"), Dropout(0.25), Dense(4), Softmax()],
                             input_shape=(8, 8, 3), seed=1)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2), metrics=["accuracy"], precision=precision)
    return model


def _fit(model, x, y):
    history = model.fit(x, y, epochs=2, batch_size=8, validation_split=0.25, verbose=0)
    return model.get_weights(), {k: v for k, v in history.history.items() if k != "seconds"}


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_predicting_in_another_thread_leaves_a_fit_as_it_is_alone(precision):
    """predict, evaluate and model(x) (and a feature extractor's predict, which shares the
    layers) in a second thread while the model trains: the fit crashed ("backward() needs a
    forward(x, training=True)": an inference pass reset the layers' training flag and dropped
    their caches), training lost. Now it finishes with the weights and History of the same fit
    alone, and every concurrent prediction is finite and of its shape."""
    x, y = _data()
    alone = _fit(_model(precision), x, y)
    model = _model(precision)
    extractor = xpcnn.Model(model.inputs, model.get_layer("bn").output)
    # (in the model's precision: one of another precision builds the layers it shares for its
    # own, their compute dtype, between the training model's steps)
    extractor.compile(precision=precision)
    stop, ready = threading.Event(), threading.Event()
    seen, failures = [], []

    def serve():
        try:
            while not stop.is_set():
                seen.append(("predict", model.predict(x[:16], batch_size=8, verbose=0)))
                seen.append(("call", np.asarray(model(x[:5]))))
                seen.append(("extract", extractor.predict(x[:7], verbose=0)))
                seen.append(("evaluate", np.array(model.evaluate(x[:16], y[:16], verbose=0))))
                ready.set()
        except Exception as e:  # (reported by the test's thread)
            failures.append(e)
            ready.set()

    server = threading.Thread(target=serve)
    server.start()
    try:
        ready.wait(60)  # (a round of every kind of call before the fit starts)
        together = _fit(model, x, y)
    finally:
        stop.set()
        server.join()
    assert not failures, failures
    for a, b in zip(together[0], alone[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert together[1] == alone[1]
    shapes = {"predict": (16, 4), "call": (5, 4), "extract": (7, 3, 3, 6), "evaluate": (2,)}
    assert {kind for kind, _ in seen} == set(shapes)
    for kind, out in seen:
        assert out.shape == shapes[kind] and np.all(np.isfinite(out)), kind


@pytest.mark.parametrize("layer_type", [Conv2D, Dense])
def test_an_unbuilt_layers_first_call_from_several_threads_builds_it_once(layer_type):
    """Threads calling an unbuilt layer at once each built it (their outputs from weights the
    layer then dropped), and each build advanced the process-wide count of standalone builds
    (the weights of every later layer built by itself moved). Now one builds it, the others
    wait: every output is what the layer computes, and the count advanced once."""
    threads = 4
    x = np.random.default_rng(0).random((6, 5, 5, 3) if layer_type is Conv2D else (6, 7),
                                        dtype=np.float32)
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads taking turns often: inside the check at once)
    try:
        for _ in range(30):
            _first_calls_at_once(layer_type, x, threads)
    finally:
        sys.setswitchinterval(switching)


def _first_calls_at_once(layer_type, x, threads):
    """``threads`` threads call a new layer on ``x`` at once (released by a barrier)."""
    layer = layer_type(8)
    outputs = [None] * threads
    barrier = threading.Barrier(threads)

    def first_call(i):
        barrier.wait()
        outputs[i] = np.asarray(layer(x))

    before = next(layer_base._STANDALONE_BUILDS)
    workers = [threading.Thread(target=first_call, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert next(layer_base._STANDALONE_BUILDS) == before + 2  # (one build, then this next())
    final = np.asarray(layer(x))
    for out in outputs:
        np.testing.assert_array_equal(out, final)


def test_an_inference_pass_between_a_training_pass_and_its_backward_changes_nothing():
    """A layer's backward after forward(training=True) then forward(training=False) (another
    thread's prediction) is the backward of the training pass: the inference pass no longer
    drops its caches (ReLU's mask, Dropout's) nor its flag."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    for make in (ReLU, lambda: Dropout(0.5), lambda: Conv2D(2, 3), lambda: Dense(3),
                 BatchNorm2D, Flatten, MaxPool2D, Softmax):
        layer = make()
        layer.build((18,) if isinstance(layer, (Dense, Softmax)) else (6, 6, 3), "cpu")
        xb = x.reshape(4, 18, 6)[:, :, 0] if isinstance(layer, (Dense, Softmax)) else x
        dy = np.ones((4, *layer.output_shape), np.float32)
        twin = make()
        twin.build(layer.input_shape, "cpu")
        twin.set_weights(layer.get_weights())
        if isinstance(layer, Dropout):  # (the same draws)
            twin.set_random_state(layer.seed, layer.calls)
        layer.forward(xb, training=True)
        twin.forward(xb, training=True)
        twin.forward(xb[:1] * 7, training=False)
        np.testing.assert_array_equal(twin.backward(dy), layer.backward(dy),
                                      err_msg=type(layer).__name__)
