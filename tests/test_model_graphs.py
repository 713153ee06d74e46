"""Models sharing layers: whose symbolic graph a layer's ``output`` is in (nesting, feature
extractors, models collected), a block built at its call, and shared layers run from threads."""

import gc
import threading

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Flatten, GlobalAvgPool2D, ReLU, Softmax


@pytest.fixture
def images():
    return np.random.default_rng(0).standard_normal((6, 8, 8, 3)).astype(np.float32)


def base_net(name="base"):
    return xpcnn.Sequential([Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D()],
                            input_shape=(8, 8, 3), name=name)


def test_a_base_nested_in_a_sequential_keeps_its_feature_extraction(images):
    """(was: "layer 'conv2d' is called at 2 places", for the base and the new model, and for
    the base even after the new model was deleted)"""
    base = base_net()
    model = xpcnn.Sequential([base, Dense(4), Softmax()])  # (the transfer-learning pattern)
    conv = base.get_layer("conv2d")
    assert model.get_layer("conv2d") is conv and conv.output.node.inputs == (base.input,)
    np.testing.assert_array_equal(xpcnn.Model(base.input, conv.output).predict(images),
                                  np.asarray(base.layer_outputs(images)[0]))
    # the outer model's own layers are in its graph; nested ones are reached through base
    dense = model.get_layer("dense")
    extractor = xpcnn.Model(model.input, dense.output)
    np.testing.assert_array_equal(extractor.predict(images),
                                  np.asarray(model.layer_outputs(images)[3]))
    with pytest.raises(InputError, match=r"the input of model 'base', .* use "
                                         r"xpcnn.Model\(m.input, layer.output\), m that model"):
        xpcnn.Model(model.input, conv.output)
    del model, extractor
    gc.collect()
    # (a collected model's calls leave its layers: no dead model's tensor)
    assert conv.output.node.inputs == (base.input,)
    with pytest.raises(InputError, match="layer 'dense' .* has no symbolic output"):
        _ = dense.output


def test_an_unbuilt_sequential_called_on_a_tensor_is_built_at_the_call(images, tmp_path):
    """(was: base.built False and base.weights [] after the outer model trained its layers)"""
    base = xpcnn.Sequential([Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D()],
                            name="base", seed=3)
    inputs = xpcnn.Input((8, 8, 3))
    features = base(inputs)
    assert base.built and base.input_shape[-3:] == (8, 8, 3)
    outer = xpcnn.Model(inputs, Softmax()(Dense(4)(features)), seed=5)
    # (seeded: base's weights are its own seed's, whatever the outer model's)
    again = xpcnn.Sequential([Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D()],
                             input_shape=(8, 8, 3), seed=3)
    for a, b in zip(base.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    outer.compile(loss="cross_entropy", optimizer="adam")
    outer.fit(images, np.arange(6) % 4, epochs=1, verbose=0)
    assert [w.name for w in base.weights] and base.count_params() == 112
    lines = []
    base.summary(print_fn=lines.append)
    assert any("conv2d" in line for line in lines)
    base.save_weights(tmp_path / "base.npz")
    np.testing.assert_array_equal(base.get_weights()[0], outer.get_weights()[0])


def test_rebuilding_an_extractor_leaves_its_source_models_graph(images):
    """(was: ex.build() took m's calls from the layers: m.get_layer('relu').output gave ex's
    12x12 tensor, and a second extractor of m was refused as disconnected)"""
    m = xpcnn.Sequential([Conv2D(4, 3, padding="same"), ReLU(), Conv2D(4, 3), GlobalAvgPool2D(),
                          Dense(4), Softmax()], input_shape=(8, 8, 3), name="m")
    relu = m.get_layer("relu")
    ex = xpcnn.Model(m.input, relu.output, name="ex")
    ex.build((12, 12, 3))
    assert ex.input.shape == (None, 12, 12, 3) and ex.output.shape == (None, 12, 12, 4)
    assert relu.output.shape == (None, 8, 8, 4) and relu.output.node.inputs[0].node.inputs == (
        m.input,)
    second = xpcnn.Model(m.input, relu.output)
    np.testing.assert_array_equal(second.predict(images), np.asarray(m.layer_outputs(images)[1]))
    big = np.random.default_rng(1).standard_normal((2, 12, 12, 3)).astype(np.float32)
    assert ex.predict(big).shape == (2, 12, 12, 4)


def shared_pair(precision=None):
    """A base for 12x12 images and a model on its layers for 20x20 ones (or, with
    ``precision``, its convolutions under a head compiled in that precision)."""
    base = xpcnn.Sequential([Conv2D(8, 3), ReLU(), Conv2D(8, 3), GlobalAvgPool2D(), Dense(4),
                             Softmax()], input_shape=(12, 12, 3), seed=0)
    base.compile(optimizer="sgd")
    if precision is None:
        inputs = xpcnn.Input((20, 20, 3))
        return base, xpcnn.Model(inputs, base(inputs)), 20
    other = xpcnn.Sequential(base.layers[:3] + [GlobalAvgPool2D(), Dense(4), Softmax()],
                             seed=5)
    other.compile(optimizer="sgd", precision=precision)
    other.build((12, 12, 3))
    return base, other, 12


def run_together(*work):
    errors = []

    def guarded(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001  (reported by the test)
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(f,)) for f in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("precision", [None, "mixed_float16"])
def test_models_sharing_layers_built_otherwise_predict_from_two_threads_as_alone(precision):
    """(was: a bare ValueError from deep inside im2col, or a float32 model computing partly in
    float16, where each thread rebuilt the shared layers under the other's pass)"""
    rng = np.random.default_rng(0)
    one, two, side = shared_pair(precision)
    x1 = rng.random((32, 12, 12, 3), dtype=np.float32)
    x2 = rng.random((32, side, side, 3), dtype=np.float32)
    alone = [one.predict(x1, batch_size=8), two.predict(x2, batch_size=8)]
    got: list[list[np.ndarray]] = [[], []]

    def serve(i, model, x):
        for _ in range(25):
            got[i].append(model.predict(x, batch_size=8))
    run_together(lambda: serve(0, one, x1), lambda: serve(1, two, x2))
    for i in range(2):
        for out in got[i]:
            np.testing.assert_array_equal(out, alone[i])


def test_a_fit_and_a_predict_of_models_sharing_layers_in_two_threads_run_as_alone():
    """A training step holds the lock across its forward, backward and update."""
    rng = np.random.default_rng(1)
    x = rng.random((64, 12, 12, 3), dtype=np.float32)
    y = rng.integers(0, 4, 64)
    big = rng.random((16, 20, 20, 3), dtype=np.float32)
    reference, _, _ = shared_pair()
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    one, two, _ = shared_pair()
    run_together(lambda: one.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0),
                 lambda: [two.predict(big, batch_size=4) for _ in range(30)])
    for a, b in zip(one.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_sharing_layers_built_alike_or_nothing_run_their_passes_side_by_side():
    """Only passes that rebuild layers (models sharing layers built otherwise) hold the pass
    lock exclusive."""
    base = base_net()
    alike = xpcnn.Sequential(list(base.layers), input_shape=(8, 8, 3))
    alone = base_net("alone")
    big = xpcnn.Model(inputs := xpcnn.Input((12, 12, 3)), base(inputs))
    assert big._pass_rebuilds()
    del big
    gc.collect()
    base.predict(np.zeros((1, 8, 8, 3), np.float32), verbose=0)  # (built for it again)
    for model in (base, alike, alone):
        assert not model._pass_rebuilds()


def test_a_models_input_and_output_shapes_have_the_batch_axis_as_in_keras():
    """(was: (28, 28, 1) and (10,), so Keras' model.input_shape[1:3] gave (28, 1) silently)"""
    model = xpcnn.Sequential([Conv2D(2, 3), GlobalAvgPool2D(), Dense(10)], input_shape=(28, 28, 1))
    assert model.input_shape == (None, 28, 28, 1) == model.input.shape
    assert model.output_shape == (None, 10) == model.output.shape
    assert model.input_shape[1:3] == (28, 28) and model.num_classes == 10
    # (a layer's own shapes stay per sample, as its build takes them)
    assert model.layers[0].input_shape == (28, 28, 1)
    unbuilt = xpcnn.Sequential([Conv2D(2, 3), GlobalAvgPool2D(), Dense(10)])
    assert unbuilt.input_shape is None
    unbuilt.build((None, 12, 12, 1))  # (Keras' build takes the batch's shape)
    assert unbuilt.input_shape == (None, 12, 12, 1)
    with pytest.raises(InputError, match=r"input_shape must be positive sizes such as \(H, W, "
                                         r"C\), got \(None, 8, 8, 3\)"):
        xpcnn.Sequential([Dense(2)], input_shape=(None, 8, 8, 3))  # (per sample, as Keras')


def test_a_fitted_model_dropped_frees_its_layers_in_one_collection():
    """``del model; gc.collect()`` frees a fitted model's layers (and so their arrays, GPU
    memory on CuPy) in that one collection. Its recorded calls' finalizer held them strongly,
    so they outlived the collection that freed the model (fit puts the model in a cycle, its
    history's), until the next one."""
    import gc
    import weakref

    from xpcnn.layers import Conv2D, Dense, Flatten

    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 3), dtype=np.float32)
    y = rng.integers(0, 4, 16)
    model = xpcnn.Sequential([Conv2D(4, 3, activation="relu"), Flatten(), Dense(4)],
                             device="cpu", seed=0)
    model.compile(loss="cross_entropy", optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    refs = [weakref.ref(model), *(weakref.ref(la) for la in model.layers)]
    was = gc.isenabled()
    gc.disable()  # (no collection of its own in between)
    try:
        del model
        gc.collect()
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        if was:
            gc.enable()


def test_a_layer_shared_with_a_dropped_model_forgets_its_calls():
    """A layer that outlives a model holding it no longer lists that model's call among its
    inbound nodes (the model's weakly held record of its calls still reaches a live layer's)."""
    import gc

    from xpcnn.layers import Dense, Flatten

    shared = Dense(3)
    keep = xpcnn.Sequential([Flatten(), shared], device="cpu", seed=0)
    keep.build((None, 2, 2, 1))
    held = len(shared.inbound_nodes)
    other = xpcnn.Sequential([Flatten(), shared], device="cpu", seed=0)
    other.build((None, 2, 2, 1))
    assert len(shared.inbound_nodes) == held + 1
    del other
    gc.collect()
    assert len(shared.inbound_nodes) == held


def test_a_built_layer_called_on_a_tensor_its_weights_do_not_fit_is_refused_at_the_call():
    """As Keras refuses it (was: a tensor returned, refused only at the xpcnn.Model(...) built
    from it); a built layer whose weights fit (a convolution on other images, a layer
    without weights) is taken."""
    dense = Dense(4, name="dd")
    xpcnn.Model(first := xpcnn.Input((3,)), dense(first))
    weights = dense.get_weights()
    with pytest.raises(InputError, match=r"layer 'dd' \(Dense\) holds weights for inputs of "
                                         r"shape \(3,\), and inputs of shape \(5,\) need weights "
                                         r"of other shapes \(\[\(5, 4\), \(4,\)\], it has "
                                         r"\[\(3, 4\), \(4,\)\]\): a layer keeps its weights; "
                                         r"use a new Dense\(...\) for these inputs"):
        dense(xpcnn.Input((5,)))
    assert len(dense.inbound_nodes) == 1 and dense.input_shape == (3,)
    for a, b in zip(dense.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    base = base_net()
    conv, pool = base.layers[0], base.layers[2]
    with pytest.raises(InputError, match=r"layer 'conv2d' \(Conv2D\) holds weights for inputs "
                                         r"of shape \(8, 8, 3\), and inputs of shape \(8, 8, 2\)"):
        conv(xpcnn.Input((8, 8, 2)))
    bigger = xpcnn.Input((12, 12, 3))
    assert pool(ReLU()(conv(bigger))).shape == (None, 4)
    assert base(xpcnn.Input((10, 10, 3))).shape == (None, 4)  # (a model of them too)
    flat = xpcnn.Sequential([Flatten(), Dense(2, name="head")], input_shape=(2, 2, 1))
    with pytest.raises(InputError, match=r"layer 'head' \(Dense\) holds weights for inputs of "
                                         r"shape \(4,\), and inputs of shape \(9,\)"):
        flat(xpcnn.Input((3, 3, 1)))  # (a model called on a tensor: at that call too)
