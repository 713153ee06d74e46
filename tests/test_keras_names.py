"""Keras names a port writes, where xpcnn has another way: each says xpcnn's.

``xpcnn.layers.MaxPooling2D``, ``xpcnn.optimizers``, ``xpcnn.losses.SparseCategoricalCrossentropy``
and the like were a bare AttributeError; each is now an AttributeError (``hasattr`` stays False)
that is also an InputError, naming xpcnn's equivalent (checked to exist here) or saying that xpcnn
offers none and what it offers. No alias is made: each thing keeps its one name. Also the
refusals of ``model(x, training=True)`` and ``fit(x, y, steps_per_epoch=...)``, which name the
way that works (run here).
"""

from __future__ import annotations

import importlib
import pickle

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Dense, Flatten, MaxPool2D, RandomCrop, RandomFlip

MODULES = ("xpcnn", "xpcnn.layers", "xpcnn.losses", "xpcnn.metrics")


def _table(module: str) -> dict[str, tuple[tuple[str, ...], str]]:
    return importlib.import_module(module).KERAS_NAMES


def _resolve(module: str, dotted: str) -> object:
    """An xpcnn name the advice gives: in ``module``, or from the package's top where it starts
    with "xpcnn." ("xpcnn.Input"; the package's own table's: "optim.SGD", "Model.compile")."""
    if dotted.startswith("xpcnn."):
        module, dotted = "xpcnn", dotted.removeprefix("xpcnn.")
    if module == "xpcnn" and dotted.startswith("models."):  # (not imported by the package)
        importlib.import_module("xpcnn.models")
    obj: object = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


CASES = [(m, name) for m in MODULES  # (collected from an older package too, without tables)
         for name in getattr(importlib.import_module(m), "KERAS_NAMES", {})]


@pytest.mark.parametrize("module, name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_a_keras_name_says_xpcnns_way(module, name):
    """Was: AttributeError "module 'xpcnn.layers' has no attribute 'MaxPooling2D'"."""
    mod = importlib.import_module(module)
    names, advice = _table(module)[name]
    with pytest.raises(AttributeError) as raised:
        getattr(mod, name)
    error = raised.value
    assert isinstance(error, InputError)
    kind = "module" if module == "xpcnn" else "name"
    assert str(error) == f"{module} has no {name} (Keras' {kind}): {advice}"
    assert not hasattr(mod, name)
    assert name not in vars(mod) and name not in getattr(mod, "__all__", ())  # (no alias)
    for xpcnn_name in names:  # (checked against what xpcnn exports, and named in the advice)
        _resolve(module, xpcnn_name)
        assert xpcnn_name.removeprefix("xpcnn.") in advice, (name, xpcnn_name)


@pytest.mark.parametrize("module, name, said", [
    ("xpcnn.layers", "MaxPooling2D", "xpcnn's is MaxPool2D, with the same arguments"),
    ("xpcnn.layers", "AveragePooling2D", "xpcnn's is AvgPool2D"),
    ("xpcnn.layers", "GlobalAveragePooling2D", "xpcnn's is GlobalAvgPool2D"),
    ("xpcnn.layers", "GlobalMaxPooling2D", "xpcnn offers no global max pool: MaxPool2D((H, W))"),
    ("xpcnn.layers", "BatchNormalization", "BatchNorm2D(momentum=0.01, eps=1e-3)"),
    ("xpcnn.layers", "Activation", "ReLU() (Activation('relu')) and Softmax()"),
    ("xpcnn.layers", "add", "Add()([a, b])"),
    ("xpcnn.layers", "concatenate", "Concatenate()([a, b])"),
    ("xpcnn.layers", "SeparableConv2D", "no depthwise or separable convolution"),
    ("xpcnn.layers", "DepthwiseConv2D", "no depthwise or separable convolution"),
    ("xpcnn.layers", "RandomRotation", "RandomFlip (left-right) and RandomCrop"),
    ("xpcnn.layers", "RandomZoom", "no zoom"),
    ("xpcnn.layers", "RandomTranslation", "RandomCrop(padding=p)"),
    ("xpcnn.layers", "RandomContrast", "no contrast change"),
    ("xpcnn.layers", "Conv2DTranspose", "no upsampling"),
    ("xpcnn.layers", "UpSampling2D", "no upsampling"),
    ("xpcnn.layers", "ZeroPadding2D", "no padding layer"),
    ("xpcnn.layers", "LayerNormalization", "no layer normalisation"),
    ("xpcnn.layers", "Input", "xpcnn.Input(shape)"),
    ("xpcnn.layers", "InputLayer", "xpcnn.Input(shape)"),
    ("xpcnn.layers", "LeakyReLU", "ReLU (no negative slope"),
    ("xpcnn", "optimizers", "xpcnn.optim's: optim.SGD, optim.Adam"),
    ("xpcnn", "utils", "np.eye(C)[y]"),
    ("xpcnn.losses", "SparseCategoricalCrossentropy",
     "SparseCategoricalCrossentropy(from_logits=True) is SoftmaxCrossEntropy(from_logits=True)"),
    ("xpcnn.losses", "CategoricalCrossentropy", "compile(loss='categorical_crossentropy')"),
    ("xpcnn.losses", "BinaryCrossentropy", "end the model in Dense(2)"),
    ("xpcnn.metrics", "SparseCategoricalAccuracy", "compile(metrics=['accuracy'])"),
    ("xpcnn.metrics", "CategoricalAccuracy", "compile(metrics=['accuracy'])"),
])
def test_the_names_the_port_met_are_in_the_tables(module, name, said):
    """The names H17's ports of keras.io examples met (s2_probe.py), each with its advice."""
    with pytest.raises(AttributeError, match=f"^{module} has no {name} "):
        getattr(importlib.import_module(module), name)
    assert said in _table(module)[name][1]


def test_the_advice_runs():
    """What the messages tell a port to write, written: it runs, and means what they say."""
    x = np.random.default_rng(0).random((2, 6, 5, 3)).astype(np.float32)
    global_max = xpcnn.Sequential([xpcnn.Input((6, 5, 3)), MaxPool2D((6, 5)), Flatten()])
    np.testing.assert_array_equal(global_max(x), x.max(axis=(1, 2)))  # (GlobalMaxPooling2D)
    xpcnn.layers.BatchNorm2D(momentum=0.01, eps=1e-3)  # (BatchNormalization's defaults)
    RandomCrop(padding=2)  # (RandomTranslation's nearest)
    labels = np.array([0, 2, 1])
    logits = np.eye(3, dtype=np.float32)[labels] * 4
    loss = xpcnn.SoftmaxCrossEntropy(from_logits=True)
    assert float(loss(labels, logits)) == pytest.approx(float(loss(np.eye(3)[labels], logits)))
    model = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3)], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1), loss="sparse_categorical_crossentropy",
                  metrics=["acc"])  # (SparseCategoricalAccuracy(name="acc"))
    history = model.fit(np.ones((6, 4), np.float32), np.arange(6) % 3, verbose=0)
    assert "acc" in history.history


def test_other_missing_names_stay_plain_attribute_errors():
    for module in MODULES:
        mod = importlib.import_module(module)
        for name in ("NoSuchThing", "__wrapped__", "_private"):
            with pytest.raises(AttributeError) as raised:
                getattr(mod, name)
            assert type(raised.value) is AttributeError
            assert str(raised.value) == f"module {module!r} has no attribute {name!r}"
            assert not hasattr(mod, name)


def test_star_imports_pickling_and_inspection_keep_working():
    namespace: dict[str, object] = {}
    exec("from xpcnn.layers import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(xpcnn.layers.__all__)
    exec("from xpcnn import *", namespace)
    assert "MaxPooling2D" not in namespace and "optimizers" not in namespace
    assert pickle.loads(pickle.dumps(xpcnn.layers.MaxPool2D)) is xpcnn.layers.MaxPool2D
    for module in MODULES:
        mod = importlib.import_module(module)
        with pytest.raises(AttributeError) as raised:
            getattr(mod, next(iter(mod.KERAS_NAMES)))
        copy = pickle.loads(pickle.dumps(raised.value))
        assert type(copy) is type(raised.value) and str(copy) == str(raised.value)
        assert not set(mod.KERAS_NAMES) & set(dir(mod))
    from xpcnn.layers import MaxPool2D as found  # (real names import as before)
    assert found is MaxPool2D


# -- model(x, training=True) -----------------------------------------------------------------


def _images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 6, 6, 3)).astype(np.uint8)


def test_a_training_call_names_layer_outputs_and_the_layers_in_turn():
    """Was: "... called with training=True: a model call runs it for inference; fit,
    train_on_batch and train_step train it", no way to see Keras'
    ``data_augmentation(images, training=True)`` (keras.io's transfer-learning guide)."""
    images = _images()
    augment = xpcnn.Sequential([RandomFlip("horizontal"), RandomCrop(2)], seed=0)
    augment.build((None, 6, 6, 3))
    with pytest.raises(InputError) as refused:
        augment(images, training=True)
    said = str(refused.value)
    assert "A training pass's output is model.layer_outputs(x, training=True)[-1]" in said
    assert "call the layers in turn (a layer called on a batch augments): for layer in " \
           "model.layers: x = layer(x)" in said
    # (the two ways run: a training pass, the same each call; the layers in turn, anew)
    once = np.asarray(augment.layer_outputs(images, training=True)[-1])
    assert (once != images).any(axis=(1, 2, 3)).sum() > 0
    np.testing.assert_array_equal(np.asarray(augment.layer_outputs(images, training=True)[-1]),
                                  once)
    drawn = []
    for _ in range(2):
        x = images
        for layer in augment.layers:
            x = layer(x)
        drawn.append(np.asarray(x))
    assert (drawn[0] != images).any() and (drawn[0] != drawn[1]).any()


def test_a_training_call_of_a_model_without_augmentations_names_layer_outputs_alone():
    model = xpcnn.Sequential([Flatten(), xpcnn.layers.Dropout(0.5), Dense(2)], seed=0)
    model.build((None, 6, 6, 3))
    with pytest.raises(InputError, match=r"A training pass's output is model\.layer_outputs"
                                         r"\(x, training=True\)\[-1\] \(the model left as it "
                                         r"was: the same draws at each call\)$"):
        model(_images(), training=True)
    outputs = model.layer_outputs(_images(), training=True)
    assert np.asarray(outputs[-1]).shape == (8, 2)


# -- fit(arrays, steps_per_epoch=...) --------------------------------------------------------


def test_steps_with_arrays_names_the_samples_to_pass():
    """Was: "steps_per_epoch is for generators; arrays give ceil(N / batch_size) batches",
    without the port."""
    model = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3)], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    x, y = np.ones((40, 4), np.float32), np.arange(40) % 3
    with pytest.raises(InputError, match=r"^steps_per_epoch is for generators; arrays give "
                                         r"ceil\(N / batch_size\) batches: to train on 2 "
                                         r"batches an epoch, pass their samples, fit\(x\[:2 \* "
                                         r"batch_size\], y\[:2 \* batch_size\], \.\.\.\)"):
        model.fit(x, y, steps_per_epoch=2, verbose=0)
    for refused in (lambda: model.evaluate(x, y, steps=3, verbose=0),
                    lambda: model.predict(x, steps=3, verbose=0)):
        with pytest.raises(InputError, match=r"^steps is for generators; arrays give "
                                             r"ceil\(N / batch_size\) batches: to use the "
                                             r"first 3 batches, pass their samples, "
                                             r"x\[:3 \* batch_size\] \(and y\[:3 \* "
                                             r"batch_size\]\)$"):
            refused()
    batch_size = 8  # (the port, run: 2 steps an epoch)
    model.fit(x[:2 * batch_size], y[:2 * batch_size], batch_size=batch_size, epochs=2,
              verbose=0)
    assert model.optimizer.iterations == 4
