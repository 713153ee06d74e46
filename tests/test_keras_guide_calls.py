"""Calls the Keras guides make, as Keras 3 runs them: augmentation layers called on a batch,
Keras' model hooks xpcnn never runs, a nested unbuilt base, and build shapes with a batch axis."""

import re

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import (
    Add,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    RandomCrop,
    RandomFlip,
    ReLU,
)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)


def _changed(out, images):
    return int((np.asarray(out) != images).any(axis=(1, 2, 3)).sum())


# -- 1. augmentation layers called directly augment, as Keras 3's random image layers ----------


def test_augmentation_layers_called_on_a_batch_augment_as_in_keras(images):
    """(was: the guide's data_augmentation(images) changed 0 of 16 images: training=None was
    taken as inference)"""
    for layer in (RandomFlip("horizontal"), RandomCrop(padding=2)):
        assert layer.training_when_called is True
        assert _changed(layer(images), images) > 0, layer
        np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    # (the guide's function, unchanged)
    layers = [RandomFlip("horizontal"), RandomCrop(padding=2)]
    out = images
    for layer in layers:
        out = layer(out)
    assert _changed(out, images) > 8


def test_other_layers_called_on_a_batch_stay_in_inference_mode(images):
    x = images.astype(np.float32)
    drop = Dropout(0.5)
    assert drop.training_when_called is False
    np.testing.assert_array_equal(np.asarray(drop(x)), x)  # (as Keras: no dropout)
    assert (np.asarray(drop(x, training=True)) == 0).any()


def test_a_model_with_augmentations_predicts_without_them(images):
    model = xpcnn.Sequential([RandomFlip(), Flatten(), Dense(3)], input_shape=(8, 8, 3))
    a, b = model.predict(images, verbose=0), model.predict(images, verbose=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(model(images)), a)


# -- 2. Keras' test_step, predict_step and compute_loss are refused, as call() is --------------


@pytest.mark.parametrize("hook", ["test_step", "predict_step", "compute_loss"])
def test_a_subclass_defining_a_keras_hook_xpcnn_never_runs_is_refused_when_made(hook):
    """(was: silently never run by evaluate, fit's validation or predict)"""
    body = {hook: lambda self, *args, **kwargs: None}
    for parent in (xpcnn.Sequential, xpcnn.Model):
        cls = type("Custom", (parent,), body)
        with pytest.raises(InputError, match=rf"^Custom defines {hook}\(\), which xpcnn never "
                                             r"runs: a subclass may override train_step.*"
                                             r"evaluate, fit's validation and predict are not "
                                             r"customisable"):
            cls([Dense(3)]) if parent is xpcnn.Sequential else cls()
        sub = type("Sub", (cls,), {})  # (inherited: refused by the class defining it)
        with pytest.raises(InputError, match=rf"^Custom defines {hook}\(\)"):
            sub()


def test_a_subclass_overriding_train_step_is_still_made():
    class Custom(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            return super().train_step(xb, yb, sample_weight)

    Custom([Dense(3)], input_shape=(4,))


# -- 3. an unbuilt base nested in a Sequential is built with it --------------------------------


def _nested(base_seed=1):
    base = xpcnn.Sequential([Conv2D(4, 3, name="c1"), ReLU(name="r1")], seed=base_seed)
    model = xpcnn.Sequential([base, GlobalAvgPool2D(), Dense(10)], input_shape=(8, 8, 3),
                             seed=2)
    return base, model


def test_an_unbuilt_nested_base_is_built_from_its_own_seed_with_the_outer_model(images):
    """(was: base.built stayed False, and base.input and its layers' output were refused)"""
    x = images.astype(np.float32)
    base, model = _nested()
    assert base.built and base.input_shape == (None, 8, 8, 3)
    r1 = base.get_layer("r1")
    assert r1.output.shape == (None, 6, 6, 4) and model.get_layer("r1") is r1
    features = xpcnn.Model(base.input, r1.output).predict(x, verbose=0)
    np.testing.assert_array_equal(features, np.asarray(model.layer_outputs(x)[1]))
    # (the base's own seed, as a base built by itself, or called on a symbolic tensor, has)
    alone = xpcnn.Sequential([Conv2D(4, 3), ReLU()], seed=1, input_shape=(8, 8, 3))
    for a, b in zip(base.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    again_base, again = _nested()
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_nested(base_seed=5)[0].get_weights()[0], base.get_weights()[0])


def test_an_unbuilt_base_after_other_layers_is_built_for_the_shape_reaching_it(images):
    base = xpcnn.Sequential([Conv2D(4, 3, name="c1"), ReLU(name="r1")], seed=1)
    model = xpcnn.Sequential([Conv2D(5, 1), base, GlobalAvgPool2D(), Dense(3)], seed=2)
    model.build((None, 8, 8, 3))
    assert base.built and base.input_shape == (None, 8, 8, 5)
    assert xpcnn.Model(base.input, base.get_layer("r1").output).output_shape == (None, 6, 6, 4)


def test_an_unbuilt_base_is_left_unbuilt_where_the_outer_build_is_refused():
    base = xpcnn.Sequential([Conv2D(4, 3), ReLU()], seed=1)
    model = xpcnn.Sequential([base, Flatten(), Conv2D(2, 3)])  # (refused after the base)
    with pytest.raises(InputError, match=r"'conv2d_1' \(Conv2D\) expects per-sample inputs"):
        model.build((8, 8, 3))
    assert not base.built and not any(la.built for la in base.layers)
    fine = xpcnn.Sequential([base, GlobalAvgPool2D(), Dense(3)], input_shape=(8, 8, 3))
    assert fine.built and base.built


# -- 4. build given a batch size first -----------------------------------------------------------


def test_build_given_a_batch_size_first_is_refused_where_the_model_shows_it():
    """(was: a Flatten/Dense model silently got 18,435 parameters; a Conv2D first said only
    that it takes (H, W, C))"""
    message = (r"build\(\(32, 8, 8, 3\)\): one axis more than the model's input takes .*"
               r"\(8, 8, 3\), or the batch's with None for its size, \(None, 8, 8, 3\), not a "
               r"batch size")
    conv = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(3)])
    with pytest.raises(InputError, match=message):
        conv.build((32, 8, 8, 3))
    assert not conv.built
    conv.build((None, 8, 8, 3))
    declared = xpcnn.Sequential([xpcnn.Input((8, 8, 3)), Flatten(), Dense(3)])
    with pytest.raises(InputError, match=message):
        declared.build((32, 8, 8, 3))
    assert declared.input_shape == (None, 8, 8, 3)


def test_fit_names_the_batch_axis_of_a_model_built_with_a_batch_size_first(images):
    model = xpcnn.Sequential([Flatten(), Dense(3)])
    # (a Flatten first takes any rank: not known to be wrong yet, only warned of)
    with pytest.warns(UserWarning, match=r"if 32 is a batch size \(Keras' build takes the "
                                         r"batch's shape\)"):
        model.build((32, 8, 8, 3))
    model.compile(optimizer="sgd")
    with pytest.raises(InputError, match=r"was the model built with a batch size first\? build "
                                         r"takes the per-sample shape \(8, 8, 3\) or \(None, 8, "
                                         r"8, 3\)"):
        model.fit(images, np.zeros(16, int), verbose=0)


# -- 5. layer.build takes the batch axis as None, as model.build does ---------------------------


def test_layer_build_takes_a_leading_none_as_keras():
    dense = Dense(3)
    assert dense.build((None, 4)) == (3,) and dense.input_shape == (4,)
    assert Add().build([(None, 4), (None, 4)]) == (4,)
    assert Conv2D(2, 3).build([None, 8, 8, 3]) == (6, 6, 2)
    for bad in [(None,), (None, None, 4), (0, 4)]:
        got = re.escape(repr(bad))
        with pytest.raises(InputError, match=r"input_shape must be a per-sample shape of "
                                             r"positive sizes such as \(32, 32, 3\), or \(None, "
                                             rf"32, 32, 3\) with the batch axis, got {got}"):
            Dense(3).build(bad)
