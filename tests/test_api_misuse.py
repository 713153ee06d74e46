"""What a Keras or PyTorch user gets wrong through the Python API: each is a clear xpcnn error
naming what was wrong and what was expected, raised before any work (no bare traceback from
deep inside, no silent wrong result, no lost work)."""

from __future__ import annotations

import copy
import os
import pickle
import re

import array_api_strict as xs
import numpy as np
import pytest
from nets import four_class_data, four_class_model, four_class_net

import xpcnn
import xpcnn.datasets
import xpcnn.viz
from xpcnn import optim
from xpcnn.callbacks import BackupAndRestore, CSVLogger, EarlyStopping, ModelCheckpoint
from xpcnn.errors import DataFormatError, InputError, NonFiniteError
from xpcnn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.totals import READ_EVERY

X, Y = four_class_data()


@pytest.fixture
def model():
    return four_class_model()


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


# -- files written during or after training: checked before the first step ---------------------

def unwritable(folder):
    """A path whose folder cannot be made: a regular file stands where it would be."""
    with open(os.path.join(folder, "file"), "w"):
        pass
    return os.path.join(folder, "file", "m.npz")


WRITES = {
    "fit checkpoint a folder": (
        lambda m, d: m.fit(X, Y, checkpoint=d, verbose=0), "the checkpoint '{d}' is a folder"),
    "fit checkpoint unwritable": (
        lambda m, d: m.fit(X, Y, checkpoint=unwritable(d), verbose=0),
        "cannot write the checkpoint '{d}/file/m.npz' in '{d}/file': .*not a folder"),
    "BackupAndRestore a folder": (
        lambda m, d: m.fit(X, Y, callbacks=[BackupAndRestore(d, resume=True)], verbose=0),
        "the checkpoint '{d}' is a folder"),
    "ModelCheckpoint a folder": (
        lambda m, d: m.fit(X, Y, callbacks=[ModelCheckpoint(str(d))], verbose=0),
        "the ModelCheckpoint file '{d}' is a folder; give the path of a file"),
    "ModelCheckpoint unwritable": (
        lambda m, d: m.fit(X, Y, callbacks=[ModelCheckpoint(unwritable(d))], verbose=0),
        "cannot write the ModelCheckpoint file '{d}/file/m.npz'"),
    "ModelCheckpoint None": (lambda m, d: ModelCheckpoint(None),
                             "ModelCheckpoint filepath must be a file path, got None"),
    "CSVLogger a folder": (lambda m, d: m.fit(X, Y, callbacks=[CSVLogger(d)], verbose=0),
                           "the CSVLogger file '{d}' is a folder"),
    "save to a folder": (lambda m, d: m.save(d), "the model file '{d}' is a folder"),
    "save unwritable": (lambda m, d: m.save(unwritable(d)),
                        "cannot write the model file '{d}/file/m.npz'"),
    "save to None": (lambda m, d: m.save(None), "the model file must be a file path, got None"),
    "load_model None": (lambda m, d: xpcnn.load_model(None),
                        "the model file must be a file path, got None"),
    "load_weights an int": (lambda m, d: m.load_weights(3),
                            "the model file must be a file path, got 3"),
    "load_checkpoint None": (lambda m, d: xpcnn.load_checkpoint(None),
                             "the checkpoint must be a file path, got None"),
}


@pytest.mark.parametrize("case", sorted(WRITES))
def test_a_path_that_cannot_be_written_is_refused_before_training(model, tmp_path, case):
    call, message = WRITES[case]
    with pytest.raises(InputError, match=message.format(d=tmp_path)):
        call(model, str(tmp_path))
    assert model.optimizer.iterations == 0  # not a single step lost
    assert set(os.listdir(tmp_path)) <= {"file"}  # nothing written


@pytest.mark.parametrize("content, message", [
    (b"epoch;loss\n0;1.5\n", r"its first line \['epoch;loss'\] is not a CSVLogger header "
                              r"\('epoch', then the logs, separated by ','\)"),
    (b"a,b\n1,2\n", r"its first line \['a', 'b'\] is not a CSVLogger header"),
    (bytes(range(256)), "its header cannot be read \\(UnicodeDecodeError"),
], ids=["another separator", "another file", "binary"])
def test_a_csv_logger_appends_only_under_a_csv_loggers_header(model, tmp_path, content,
                                                             message):
    """(was: the rows went under that header with no log in them, as the header named none
    of the logs, silently; or a UnicodeDecodeError)"""
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"CSVLogger cannot append to '{path}': {message}"):
        model.fit(X, Y, callbacks=[CSVLogger(path, append=True)], verbose=0)
    assert path.read_bytes() == content and model.optimizer.iterations == 0
    if content.startswith(b"epoch;"):  # with its own separator, it appends under its columns
        with pytest.warns(RuntimeWarning, match=r"no columns for the logs \['accuracy', "
                                                r"'seconds'\], which are not written"):
            model.fit(X, Y, callbacks=[CSVLogger(path, separator=";", append=True)], verbose=0)
        assert path.read_text().splitlines()[2].startswith("0;") and model.optimizer.iterations


def test_missing_folders_are_still_created(model, tmp_path):
    path = tmp_path / "runs" / "a" / "ckpt.npz"
    model.fit(X, Y, epochs=1, checkpoint=path, callbacks=[
        CSVLogger(tmp_path / "logs" / "log.csv")], verbose=0)
    model.save(tmp_path / "models" / "m.npz")
    assert path.is_file() and (tmp_path / "logs" / "log.csv").is_file()
    assert (tmp_path / "models" / "m.npz").is_file()


# -- arguments that were taken silently, or failed deep inside ---------------------------------

ARGUMENTS = {
    "Dense units a pair": (lambda m: Dense((10, 20)),
                           r"units must be a positive int \(a count, below 2\*\*31\), got "
                           r"\(10, 20\)"),
    "Conv2D filters a pair": (lambda m: Conv2D((8, 16), 3),
                              r"filters must be a positive int .* got \(8, 16\)"),
    "use_bias a string": (lambda m: Dense(3, use_bias="False"),
                          "use_bias must be True or False, got 'False'"),
    "Conv2D use_bias None": (lambda m: Conv2D(3, use_bias=None),
                             "use_bias must be True or False, got None"),
    "nesterov a string": (lambda m: optim.SGD(0.1, momentum=0.9, nesterov="no"),
                          "SGD nesterov must be True or False, got 'no'"),
    "save_best_only a string": (lambda m: ModelCheckpoint("m.npz", save_best_only="no"),
                                "save_best_only must be True or False, got 'no'"),
    "restore_best_weights None": (
        lambda m: xpcnn.callbacks.EarlyStopping(restore_best_weights=None),
        "restore_best_weights must be True or False, got None"),
    "BackupAndRestore resume a string": (lambda m: BackupAndRestore("b.npz", resume="no"),
                                         "resume must be True or False, got 'no'"),
    "CSVLogger append a string": (lambda m: CSVLogger("log.csv", append="yes"),
                                  "CSVLogger append must be True or False, got 'yes'"),
    "CSVLogger separator of two characters": (  # (was: a TypeError from csv after epoch 1)
        lambda m: CSVLogger("log.csv", separator=", "),
        r"CSVLogger separator must be one character, such as ',' or '\\t', got ', '"),
    "CSVLogger separator None": (lambda m: CSVLogger("log.csv", separator=None),
                                 "CSVLogger separator must be one character"),
    "shuffle a string": (lambda m: m.fit(X, Y, shuffle="no", verbose=0),
                         "shuffle must be True or False, got 'no'"),
    "precision a list": (lambda m: m.compile(precision=["float32"]),
                         r"precision must be one of .* got \['float32'\]"),
    "metrics a number": (lambda m: m.compile(metrics=3),
                         r"metrics must be a list of names such as \['accuracy'\], got 3"),
    "callbacks not a list": (lambda m: m.fit(X, Y, callbacks=xpcnn.callbacks.History(),
                                             verbose=0),
                             "callbacks must be a list of xpcnn.callbacks.Callback instances, "
                             "got History"),
    "evaluate callbacks not a list": (lambda m: m.evaluate(X, Y, callbacks=CSVLogger("log")),
                                      "callbacks must be a list .* got CSVLogger"),
    "x a dict": (lambda m: m.fit({"images": X}, verbose=0),
                 r"x is a dict \(keys \['images'\]\): an xpcnn model has one input"),
    "validation_data a dict": (lambda m: m.fit(X, Y, validation_data={"x": X, "y": Y},
                                               verbose=0),
                               r"x_val is a dict \(keys \['x', 'y'\]\)"),
    "a generator's batch without labels": (  # (was: AttributeError: 'NoneType' object has
        lambda m: m.fit(iter([(X, None)]), steps_per_epoch=1, verbose=0),  # no attribute 'ndim')
        r"x must yield \(x, y\) or \(x, y, sample_weight\) batches, got a pair whose y is "
        r"None"),
    "a validation batch without labels": (
        lambda m: m.evaluate(iter([(X, None)]), steps=1), "got a pair whose y is None"),
    "predict on a dict": (lambda m: m.predict({"x": X}), "x is a dict"),
    "one-hot rows not summing to 1": (
        lambda m: m.fit(X, 3 * np.eye(4)[Y], verbose=0),
        r"one-hot y must hold probabilities, each row >= 0 and summing to 1; row 0 sums to 3 "
        r"with a least value of 0 \(20 such rows\)"),
    "one-hot rows with a negative value": (
        lambda m: m.fit(X, np.eye(4)[Y] * 1.5 - 0.125, verbose=0),
        "row 0 sums to 1 with a least value of -0.125"),
    "rows of ints that are not one-hot": (
        lambda m: m.fit(X, 2 * np.eye(4, dtype=np.int64)[Y], verbose=0),
        r"one-hot y must hold probabilities, each row >= 0 and summing to 1; row 0 sums to 2"),
    "validation one-hot rows": (
        lambda m: m.fit(X, Y, validation_data=(X, np.eye(4)[Y] * 2), verbose=0),
        "one-hot y_val must hold probabilities"),
    "loss_scale NaN": (lambda m: (m.compile(precision="mixed_float16"),
                                  setattr(m, "loss_scale", float("nan"))),
                       r"loss_scale must be a number in \[1.17549e-38, 3.40282e\+38\], got nan"),
    "loss_scale negative": (lambda m: (m.compile(precision="mixed_float16"),
                                       setattr(m, "loss_scale", -4)),
                            r"loss_scale must be a number in \[1.17549e-38, 3.40282e\+38\], "
                            r"got -4"),
    "EarlyStopping patience": (lambda m: xpcnn.callbacks.EarlyStopping(patience=-1),
                               "EarlyStopping patience must be a non-negative integer, got -1"),
    "ReduceLROnPlateau cooldown": (lambda m: xpcnn.callbacks.ReduceLROnPlateau(cooldown=1.5),
                                   "ReduceLROnPlateau cooldown must be a non-negative integer"),
    "ReduceLROnPlateau factor a string": (
        lambda m: xpcnn.callbacks.ReduceLROnPlateau(factor="0.5"),
        r"ReduceLROnPlateau factor must be a number in \(0, 1\), got '0.5'"),
    "ReduceLROnPlateau factor 1": (lambda m: xpcnn.callbacks.ReduceLROnPlateau(factor=1),
                                   r"factor must be a number in \(0, 1\), got 1"),
    "ReduceLROnPlateau min_lr negative": (
        lambda m: xpcnn.callbacks.ReduceLROnPlateau(min_lr=-1e-3),
        "ReduceLROnPlateau min_lr must be a number >= 0, got -0.001"),
    "EarlyStopping min_delta a string": (
        lambda m: xpcnn.callbacks.EarlyStopping("loss", min_delta="1e-3"),
        "EarlyStopping min_delta must be a finite number, got '1e-3'"),
    "LearningRateScheduler a number": (lambda m: xpcnn.callbacks.LearningRateScheduler(0.1),
                                       r"schedule must be a function of \(epoch, lr\) or of "
                                       "epoch, got 0.1"),
    "LearningRateScheduler of three": (
        lambda m: xpcnn.callbacks.LearningRateScheduler(lambda epoch, lr, extra: lr),
        "schedule must be a function of"),
    "LambdaCallback a number": (lambda m: xpcnn.callbacks.LambdaCallback(on_epoch_end=3),
                                "LambdaCallback on_epoch_end must be a function, got 3"),
    "LambdaCallback of too few arguments": (  # (was: a TypeError after the first epoch)
        lambda m: xpcnn.callbacks.LambdaCallback(on_epoch_end=lambda logs: None),
        r"LambdaCallback on_epoch_end is called as on_epoch_end\(epoch, logs\), which "
        r"<function .*> cannot take"),
    "LambdaCallback of too many arguments": (
        lambda m: xpcnn.callbacks.LambdaCallback(on_train_begin=lambda epoch, logs: None),
        r"on_train_begin is called as on_train_begin\(logs\)"),
    "an unbuilt layer called on a list of numbers": (  # (an array builds it, as in Keras;
        lambda m: Dense(3)([[1.0, 2.0, 3.0, 4.0]]),  # was: "must be built before it runs")
        r"layer 'dense' \(Dense\) takes a batch: arrays \(N, \*per-sample shape\) of one "
        r"array library \(NumPy, CuPy, PyTorch...\), got list$"),
    "an unbuilt merge layer called on lists": (
        lambda m: xpcnn.layers.Add()([[1.0], [2.0]]),
        r"layer 'add' \(Add\) takes a list of batches: .* got list, list$"),
    "an unbuilt layer called on one image": (  # (was: the rank error alone)
        lambda m: Conv2D(3)(X[0].astype(np.float32)),
        r"expects per-sample inputs of shape \(H, W, C\), got \(6, 3\); one sample\? add the "
        r"batch axis, x\[None\]$"),
    "a layer called on a batch of another shape": (  # (was: a ValueError from matmul)
        lambda m: built(Dense(3), (4,))(np.ones((2, 5), np.float32)),
        r"layer 'dense' \(Dense\) is built for batches \(N, \*per-sample shape\) of "
        r"per-sample shape \(4,\), got shape \(2, 5\)"),
    "a layer called on one sample": (lambda m: built(Conv2D(3), (6, 6, 3))(X[0]),
                                     r"per-sample shape \(6, 6, 3\), got shape \(6, 6, 3\)"),
    "a layer called on a list": (  # (was: AttributeError: 'list' object has no attribute)
        lambda m: built(Dense(3), (4,))([[1.0, 2.0, 3.0, 4.0]]), "got list"),
    "a merge layer called on batches of other shapes": (
        lambda m: built(xpcnn.layers.Add(), [(4,), (4,)])([np.ones((2, 4)), np.ones((2, 5))]),
        r"per-sample shape \(4,\), \(4,\), got shape \(2, 4\), shape \(2, 5\)"),
    # (were: NumPy's "operands could not be broadcast together", or its concatenate's error)
    "a merge layer called on batches of other sizes": (
        lambda m: built(xpcnn.layers.Add(), [(4,), (4,)])([np.ones((4, 4)), np.ones((2, 4))]),
        r"layer 'add' \(Add\) merges batches of sizes \[4, 2\]: its inputs are batches of "
        r"the same samples, of one size N each"),
    "a Concatenate called on batches of other sizes": (
        lambda m: built(xpcnn.layers.Concatenate(), [(4,), (3,)])(
            [np.ones((4, 4)), np.ones((2, 3))]),
        r"layer 'concatenate' \(Concatenate\) merges batches of sizes \[4, 2\]"),
    # (were: "must be built before it runs on a batch", built or not, for any list)
    "a merge layer called on no batch": (
        lambda m: xpcnn.layers.Add()([]),
        r"layer 'add' \(Add\) merges a list of two or more batches \(or of symbolic tensors, "
        r"in a functional model\), got a list of 0"),
    "a merge layer called on one batch": (lambda m: xpcnn.layers.Add()(np.ones((2, 4))),
                                          r"merges a list of two or more batches .* got one "
                                          r"ndarray"),
    "a layer built for a number": (lambda m: Dense(3).build(10),  # (was: TypeError)
                                   r"layer 'dense' \(Dense\) input_shape must be a per-sample "
                                   r"shape of positive sizes such as \(32, 32, 3\), or \(None, "
                                   r"32, 32, 3\) with the batch axis, got 10"),
    "a layer built for a negative size": (  # (was: ValueError: negative dimensions)
        lambda m: Conv2D(3).build((8, 8, -1)), r"input_shape must be .* got \(8, 8, -1\)"),
    "a layer built for no size": (lambda m: Dense(3).build((0,)), r"got \(0,\)"),  # (was taken)
    "a layer built in int8": (lambda m: Dense(3).build((4,), "cpu", "int8"),  # (was: int8
                              "unsupported dtype 'int8'; expected float16, bfloat16, float32 "
                              "or float64"),  # weights, all zeros, silently)
    "an unbuilt layer's forward": (lambda m: Conv2D(3).forward(X.astype(np.float32)),
                                   r"layer 'conv2d' \(Conv2D\) must be built before it runs"),
    "verbose a word": (lambda m: m.fit(X, Y, verbose="quiet"),
                       r"verbose must be 0 \(silent\), 1 \(a progress bar\), 2 \(a line an "
                       r"epoch\), 'auto' or True/False, got 'quiet'"),
    "evaluate verbose 3": (lambda m: m.evaluate(X, Y, verbose=3), "verbose must be 0"),
    "predict verbose None": (lambda m: m.predict(X, verbose=None), "got None"),
    "verbose an array": (lambda m: m.predict(X, verbose=np.array([0, 1])),
                         r"verbose must be 0 .* got array\(\[0, 1\]\)"),
    "summary print_fn a string": (lambda m: m.summary(print_fn="print"),  # (was: TypeError:
                                  "summary print_fn must be a function of one line, such as "
                                  "print, or None, got 'print'"),  # 'str' object is not callable)
    "data_dir a number": (lambda m: xpcnn.datasets.load_mnist(3, download=False),  # (was:
                          r"data_dir must be a folder path \(a str or a pathlib.Path\) or None, "
                          "got 3"),  # TypeError from pathlib)
    "base_url a number": (  # (was: AttributeError: 'int' object has no attribute 'endswith')
        lambda m: xpcnn.datasets.load_cifar10(os.path.dirname(__file__), base_url=3),
        "base_url must be a URL"),
    "confusion_matrix of class names": (  # (was: UFuncTypeError from numpy's minimum)
        lambda m: xpcnn.viz.confusion_matrix(["cat", "dog"], ["dog", "dog"], ["cat", "dog"]),
        r"^y_true must hold integer labels in \[0, 1\]; got dtype <U3$"),
    "confusion_matrix classes a str": (  # (was: one class, named '3')
        lambda m: xpcnn.viz.confusion_matrix([0, 1], [1, 2], "3"),
        "classes must be the number of classes or a sequence of class names, got '3'"),
    "trainable a string": (lambda m: setattr(m, "trainable", "no"),
                           "trainable must be True or False, got 'no'"),
    "a layer's trainable a string": (  # (was: taken, truthy: the layer went on training)
        lambda m: setattr(m.layers[1], "trainable", "False"),
        "layer 'conv2d' trainable must be True or False, got 'False'"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENTS))
def test_a_bad_argument_is_a_clear_error_before_any_work(model, case):
    call, message = ARGUMENTS[case]
    before = model.get_weights()
    with pytest.raises(InputError, match=message):
        call(model)
    assert model.optimizer.iterations == 0
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_keras_spellings_that_mean_the_same_are_accepted(model):
    model.compile(optimizer=optim.SGD(0.01), metrics=None)  # Keras' default
    seen = []
    model.fit(X, Y, epochs=2, verbose=0, callbacks=[  # Keras' one-argument schedule
        xpcnn.callbacks.LearningRateScheduler(lambda epoch: seen.append(epoch) or 0.5)])
    assert seen == [0, 1] and model.optimizer.lr == 0.5
    soft = np.full((20, 4), 0.1, np.float32)  # smoothed labels: probabilities
    soft[np.arange(20), Y] = 0.7
    model.fit(X, soft, verbose=0)
    assert Dense(3, use_bias=np.bool_(False)).use_bias is False
    # NumPy ints, as kernel_size takes them (was: 'padding must be ... a non-negative int, got
    # np.int64(1)')
    assert Conv2D(3, padding=np.int64(1)).get_config()["padding"] == 1
    assert type(MaxPool2D(2, padding=np.int32(1)).padding) is int
    assert type(RandomCrop(np.int64(2)).padding) is int
    # Keras' everyday predict(x, verbose=0) (it was TypeError: unexpected keyword 'verbose')
    np.testing.assert_array_equal(model.predict(X, verbose=0), model.predict(X))
    assert model.evaluate(X, Y, verbose="auto") == model.evaluate(X, Y)
    lines = []
    model.summary(print_fn=lines.append)
    model.summary(print_fn=None)  # Keras' default: print
    assert lines and lines[-1].startswith("Non-trainable params")


# -- a layer in two models --------------------------------------------------------------------

def conv_net():
    return [Rescaling(1 / 255), Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D(),
            Dense(4), Softmax()]


def test_layers_shared_with_a_model_on_larger_images_keep_their_trained_weights():
    layers = conv_net()
    small = xpcnn.Sequential(layers, input_shape=(6, 6, 3))
    small.compile(optimizer=optim.SGD(0.1))
    small.fit(X, Y, epochs=2, verbose=0)
    trained, before = small.get_weights(), small.evaluate(X, Y)
    large = xpcnn.Sequential(layers, input_shape=(8, 8, 3), dtype="float64")
    for a, b in zip(trained, large.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # kept (they were re-initialised), cast to float64
    assert large.predict(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 4)
    # The first model runs its layers as built for it again, with the same weights.
    assert small.evaluate(X, Y) == before


def test_a_layer_whose_weights_cannot_fit_another_models_inputs_is_refused_untouched():
    layers = four_class_net()
    first = xpcnn.Sequential(layers, input_shape=(6, 6, 3))
    weights, probabilities = first.get_weights(), first.predict(X)
    with pytest.raises(InputError, match=r"layer 'dense' \(Dense\) holds weights for inputs of "
                                         r"shape \(48,\), and inputs of shape \(75,\) need "
                                         r"weights of other shapes \(\[\(75, 4\), \(4,\)\], it "
                                         r"has \[\(48, 4\), \(4,\)\]\): a layer keeps its "
                                         r"weights; use a new Dense\(...\) for these inputs"):
        xpcnn.Sequential(layers, input_shape=(7, 7, 3))
    for a, b in zip(weights, first.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.predict(X), probabilities)


def test_random_flip_takes_keras_mode_first_and_has_only_the_horizontal_one():
    with pytest.raises(InputError, match="RandomFlip flips left-right only \\(mode "
                                         "'horizontal'\\), got mode 'vertical'"):
        RandomFlip("vertical")  # was a layer named 'vertical' that flipped left-right
    assert RandomFlip("horizontal", name="flip").name == "flip"


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_copying_a_model_says_how_to_keep_its_weights(model, how):
    call = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps}[how]
    with pytest.raises(InputError, match=r"a model cannot be copied or pickled .* keep its "
                                         r"weights with get_weights\(\)"):
        call(model)  # was TypeError: cannot pickle 'module' object, from inside copy


def test_figures_and_onnx_files_name_a_path_that_cannot_be_written(model, tmp_path):
    pytest.importorskip("matplotlib")
    from xpcnn import viz

    with pytest.raises(InputError, match=f"the figure '{tmp_path}' is a folder"):
        viz.plot_stage_tour(model, X[0], tmp_path)  # was IsADirectoryError from inside PIL
    with pytest.raises(InputError, match="the figure must be a file path, got None"):
        viz.plot_filters(model, None)
    pytest.importorskip("onnx")
    with pytest.raises(InputError, match="the ONNX file must be a file path, got None"):
        model.export(None)


def test_one_optimizer_cannot_train_two_models(model):
    same = xpcnn.Sequential(four_class_net(), seed=1)
    with pytest.raises(InputError, match="this SGD optimizer is already compiled into model "
                                         "'sequential': an optimizer holds one model's state"):
        same.compile(optimizer=model.optimizer)  # was: one model's momentum in the other's
    model.compile(optimizer=model.optimizer)  # compiling its own model again is fine
    model.fit(X, Y, verbose=0)
    assert model.optimizer.iterations == 1
    replaced = model.optimizer
    model.compile(optimizer=optim.SGD(0.1))
    same.compile(optimizer=replaced)  # (was: 'already compiled into model 'sequential'', which
    assert same.optimizer is replaced  # had compiled another one since)


@pytest.mark.parametrize("make", [lambda: optim.SGD(0.1, momentum=0.9),
                                  lambda: optim.Adam(0.01)], ids=["sgd_momentum", "adam"])
def test_a_released_optimizer_trains_its_next_model_as_a_new_one_would(make):
    """(was: it brought the state of the model that released it: that model's momentum and
    step count, silently, or a ValueError from deep inside where the weights' shapes differ)"""
    first = xpcnn.Sequential(four_class_net(), seed=0)
    optimizer = make()
    first.compile(optimizer=optimizer)
    first.fit(X, Y, epochs=2, verbose=0)
    first.compile(optimizer=make())  # releases it
    reused, fresh = (xpcnn.Sequential(four_class_net(), seed=1) for _ in range(2))
    reused.compile(optimizer=optimizer)
    fresh.compile(optimizer=make())
    for model in (reused, fresh):
        model.fit(X, Y, epochs=2, shuffle=False, verbose=0)
    assert optimizer.iterations == 2
    for a, b in zip(reused.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    reused.compile(optimizer=make())
    wider = xpcnn.Sequential([Flatten(), Dense(7), Dense(4), Softmax()])
    wider.compile(optimizer=optimizer)
    wider.fit(X, Y, verbose=0)  # (was: operands could not be broadcast together)
    assert optimizer.iterations == 1


def test_a_failed_compile_leaves_the_model_and_the_optimizer_as_they_were(model):
    optimizer, other = optim.Adam(1e-3), xpcnn.Sequential(four_class_net(), seed=1)
    for wrong in (dict(metrics=["mse"]), dict(precision="float8"), dict(cuda_graphs="yes")):
        with pytest.raises(InputError):
            other.compile(optimizer=optimizer, **wrong)
    assert other.optimizer is None and other.loss is None
    model.compile(optimizer=optimizer)  # (was: 'already compiled into model sequential_1')
    model.fit(X, Y, verbose=0)
    assert optimizer.iterations == 1


@pytest.mark.parametrize("key, value, message", [
    ("weighted_metrics", ["accuracy"], r"None or \[\]: xpcnn's metrics are never weighted .* "
                                       r"compute a weighted accuracy from predict"),
    ("loss_weights", [2.0], "one output and one loss"),
    ("loss_weights", {"out": 1.0}, "one output and one loss"),
    ("run_eagerly", "yes", r"False or True: .*True is compile\(cuda_graphs=False\), which "
                           "never does"),
    ("steps_per_execution", 8, r"xpcnn runs one step a call; compile\(cuda_graphs=None\)"),
    ("steps_per_execution", True, "runs one step a call"),  # (True is no 1)
    ("jit_compile", True, r"xpcnn compiles no XLA .* CUDA graph"),
    ("auto_scale_loss", False, r"precision='mixed_float16'\) always scales the loss"),  # (there)
])
def test_keras_compile_keywords_are_taken_at_their_defaults_and_refused_otherwise(
        model, key, value, message):
    """Keras 3's compile keywords: taken at their defaults (xpcnn's behaviour), refused
    otherwise, naming what to do instead (was: TypeError: compile() got an unexpected keyword
    argument), and a refused one leaves the model uncompiled."""
    other = xpcnn.Sequential(four_class_net(), seed=1)
    # (auto_scale_loss=False is refused where a loss is scaled: mixed_float16)
    scaled = {"precision": "mixed_float16"} if key == "auto_scale_loss" else {}
    with pytest.raises(InputError, match=rf"^compile\({key}={re.escape(repr(value))}\): Keras' "
                                         rf"keyword, which xpcnn's compile takes only as .*"
                                         rf"{message}"):
        other.compile(optimizer=optim.SGD(0.1), **{key: value}, **scaled)
    assert other.optimizer is None and other.loss is None
    model.compile(optimizer=optim.SGD(0.1), loss_weights=None, weighted_metrics=None,
                  run_eagerly=False, steps_per_execution=1, jit_compile="auto",
                  auto_scale_loss=True)
    model.compile(optimizer=optim.SGD(0.1), weighted_metrics=[], jit_compile=False,
                  loss_weights=[1.0])  # (one loss weighed 1: the loss as it is)
    assert model.metrics_names == ("loss", "accuracy")
    model.fit(X, Y, verbose=0)
    assert model.optimizer.iterations == 1


def test_keras_compile_values_that_are_xpcnns_behaviour_are_taken(model):
    """Keras' run_eagerly=True is cuda_graphs=False (every step runs its Python), and
    auto_scale_loss=False is taken where no loss is scaled (was: both refused, though xpcnn
    does what they ask); run_eagerly=True beside cuda_graphs=True asks opposite things."""
    model.compile(optimizer=optim.SGD(0.1), run_eagerly=True)
    assert model.cuda_graphs is False
    model.fit(X, Y, verbose=0)
    for precision in ("float32", "mixed_bfloat16"):
        model.compile(optimizer=optim.SGD(0.1), precision=precision, auto_scale_loss=False)
        assert model.precision == precision
    other = xpcnn.Sequential(four_class_net(), seed=1)
    with pytest.raises(InputError, match=r"^compile\(run_eagerly=True, cuda_graphs=True\): "
                                         r"Keras' run_eagerly=True runs every step's Python, "
                                         r"which a CUDA graph's replay does not; give one of "
                                         r"them$"):
        other.compile(optimizer=optim.SGD(0.1), run_eagerly=True, cuda_graphs=True)
    assert other.optimizer is None and other.loss is None


def test_validation_steps_with_validation_arrays_is_refused_as_steps_is(model):
    with pytest.raises(InputError, match=r"^validation_steps is for generators; arrays give "
                                         r"ceil\(N / batch_size\) batches$"):
        model.fit(X, Y, validation_data=(X, Y), validation_steps=2, verbose=0)  # was ignored
    assert model.optimizer.iterations == 0


def test_errors_about_validation_steps_name_validation_steps(model):
    """(was: 'steps_per_epoch must be a positive integer, got 0' for validation_steps=0, and
    'pass steps_per_epoch' for a validation generator, in a fit that had its steps_per_epoch)"""
    with pytest.raises(InputError, match="^validation_steps must be a positive integer, got 0$"):
        model.fit(X, Y, validation_data=_generator(), validation_steps=0, verbose=0)
    with pytest.raises(InputError, match=r"^x_val is an iterator \(a generator\): pass "
                                         r"validation_steps, the number of batches to draw "
                                         r"from it$"):
        model.fit(_generator(), steps_per_epoch=4, validation_data=_generator(), verbose=0)
    with pytest.raises(InputError, match="^steps must be a positive integer, got 0$"):
        model.evaluate(_generator(), steps=0)
    assert model.optimizer.iterations == 0


# -- images laid out as PyTorch has them -----------------------------------------------------

def test_channels_first_images_are_named_as_such():
    nchw = np.ascontiguousarray(X.transpose(0, 3, 1, 2))  # (20, 3, 6, 6)
    unbuilt = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(4, 3, padding="same"),
                                GlobalAvgPool2D(), Dense(4), Softmax()])
    unbuilt.compile()
    # (it would train, silently, on 3x6 images of 6 channels)
    with pytest.warns(UserWarning, match=r"x has per-sample shape \(3, 6, 6\), which looks like "
                                         r"channels-first images \(C, H, W\), as PyTorch keeps "
                                         r"them; .* Pass x.transpose\(0, 2, 3, 1\)"):
        unbuilt.fit(nchw, Y, verbose=0)
    built = xpcnn.Sequential(four_class_net(), input_shape=(6, 6, 3))
    with pytest.raises(InputError, match=r"got x.shape = \(20, 3, 6, 6\): channels first \(N, C, "
                                         r"H, W\), as PyTorch keeps images\? pass "
                                         r"x.transpose\(0, 2, 3, 1\)"):
        built.predict(nchw)
    with pytest.raises(InputError, match=r"got x.shape = \(6, 6, 3\): one sample\? add the batch "
                                         r"axis, x\[None\]"):
        built.predict(X[0])
    assert built.predict(X[0][None]).shape == (1, 4)


def test_images_in_keras_layout_build_without_a_warning(recwarn):
    xpcnn.Sequential(four_class_net()).predict(X)
    gray = xpcnn.Sequential([Flatten(), Dense(4), Softmax()])
    gray.predict(np.zeros((2, 28, 28, 1), np.uint8))
    assert not [w for w in recwarn if "channels-first" in str(w.message)]


def test_a_non_finite_sample_of_a_dataset_is_named_by_its_index_in_the_dataset(model):
    class Samples:
        def __len__(self):
            return 20

        def __getitem__(self, i):
            x = X[i].astype(np.float32)
            x[1, 2, 0] = np.nan if i == 13 else x[1, 2, 0]
            return x, Y[i]

    # (it said "sample 3", its place in a shuffled batch, and "nothing was run")
    with pytest.raises(NonFiniteError, match=r"x holds NaN or infinite values: x\[13\], the "
                                             r"first such sample, has 1 \(the first is nan at "
                                             r"\(1, 2, 0\)\); remove or repair those samples$"):
        model.fit(Samples(), batch_size=5, verbose=0)


@pytest.mark.parametrize("callback", [
    lambda: xpcnn.callbacks.EarlyStopping(),
    lambda: xpcnn.callbacks.ReduceLROnPlateau(),
    lambda: ModelCheckpoint("best.npz", save_best_only=True),
], ids=["EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint"])
def test_a_validation_metric_without_validation_data_is_refused_before_the_first_epoch(
        model, callback, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cb = callback()
    with pytest.raises(InputError, match=f"{type(cb).__name__} monitors 'val_loss', which the "
                                         "epoch logs lack in a fit without validation data: pass "
                                         r"validation_data \(or validation_split\)"):
        model.fit(X, Y, epochs=3, callbacks=[cb], verbose=0)
    assert model.optimizer.iterations == 0  # (it was raised after the first epoch's training)
    model.fit(X, Y, epochs=1, callbacks=[callback()], validation_split=0.2, verbose=0)


@pytest.mark.parametrize("template, message", [
    ("m-{epoch:02d}-{val_loss:.3f}.npz", "'val_loss'"),
    ("m-{epoch:s}.npz", "Unknown format code 's'"),
    ("m-{0}.npz", "positional fields"),
    ("m-{epoch.days}.npz", "'int' object has no attribute 'days'"),  # (was: AttributeError)
    ("m-{loss[0]}.npz", "'float' object is not subscriptable"),  # (was: TypeError)
])
def test_a_model_checkpoint_template_that_cannot_be_filled_fails_before_the_first_epoch(
        model, tmp_path, template, message):
    with pytest.raises(InputError, match=f"ModelCheckpoint path .* could not be filled from "
                                         f"epoch and the logs .*{message}"):
        model.fit(X, Y, epochs=2, callbacks=[ModelCheckpoint(tmp_path / template)], verbose=0)
    assert model.optimizer.iterations == 0 and not os.listdir(tmp_path)
    model.fit(X, Y, epochs=2, validation_data=(X, Y), verbose=0, callbacks=[
        ModelCheckpoint(tmp_path / "m-{epoch:02d}-{val_loss:.3f}-{accuracy:.2f}.npz")])
    assert len(os.listdir(tmp_path)) == 2


def test_logs_that_a_users_callback_adds_can_be_monitored_and_named(model, tmp_path):
    class HoldoutScore(xpcnn.callbacks.Callback):  # a Keras pattern: a metric of one's own
        def on_epoch_end(self, epoch, logs=None):
            logs["val_f1"] = 0.5 + epoch

    model.fit(X, Y, epochs=2, verbose=0, callbacks=[
        HoldoutScore(), xpcnn.callbacks.EarlyStopping(monitor="val_f1", mode="max"),
        ModelCheckpoint(tmp_path / "m-{epoch}-{val_f1:.1f}.npz", monitor="val_f1",
                        save_best_only=True, mode="max")])
    assert sorted(os.listdir(tmp_path)) == ["m-1-0.5.npz", "m-2-1.5.npz"]


def test_a_list_of_batches_is_told_how_to_be_passed(model):
    batches = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    with pytest.raises(InputError, match=r"y \(the labels of x\) is missing; x is a list of "
                                         r"pairs: .* iter\(x\), with steps_per_epoch"):
        model.fit(batches, verbose=0)
    model.fit(iter(batches), steps_per_epoch=2, verbose=0)
    assert model.optimizer.iterations == 2


# -- train_step, the raw step: its labels are checked without a host wait --------------------

def _strict_model():
    """:func:`four_class_model` on array_api_strict, whose arrays are not NumPy's: what a
    CuPy model's device labels are."""
    m = xpcnn.Sequential(four_class_net(), seed=0, device=xs)
    m.compile(optimizer=optim.SGD(0.01))
    m.build((6, 6, 3))
    return m


@pytest.mark.parametrize("on", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 4], [0, -1, 2, 3], np.array([3, 0, 7, 1], np.uint8)])
def test_train_step_never_trains_on_labels_that_are_no_class(labels, on):
    """(was: such a label matched no class, and the step trained on a wrong loss, silently)"""
    model = four_class_model() if on == "numpy" else _strict_model()
    before = model.get_weights()
    xb, bad = model._to_device(X[:4]), model.backend.asarray(np.array(labels))
    good = model.backend.asarray(Y[4:8])
    loss, _ = model.train_step(xb, bad)  # queued: the host does not wait for the device
    assert not np.isfinite(float(loss))
    with pytest.raises(InputError, match=r"training stopped at step 1: labels in y must be in "
                                         r"\[0, 3\] for a model of 4 classes"):
        for _ in range(READ_EVERY):  # the host reads the totals every READ_EVERY steps
            model.train_step(xb, good)
    assert model.optimizer.iterations == 0  # no update from that step on
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("on", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("bad", ["label", "nan image"])
def test_a_skipped_step_moves_no_normalisation_statistics(bad, on):
    """A step skipped on the device (a label that is no class, a NaN image) and the steps
    after it until the host reads the totals change nothing, BatchNorm's moving statistics
    included (was: they moved on every skipped step, and a NaN image made them NaN, so that
    predict returned NaN ever after the error had said nothing was updated)."""
    model = xpcnn.Sequential([Conv2D(3, 3), BatchNorm2D(), ReLU(), Flatten(), Dense(4),
                              Softmax()], seed=0, device=np if on == "numpy" else xs)
    model.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    model.build((6, 6, 3))
    xb, yb = model._to_device(X[:4]), model.backend.asarray(Y[:4])
    model.train_step(xb, yb)
    before, predicted = model.get_weights(), model.predict(X[:4])
    if bad == "label":
        model.train_step(xb, model.backend.asarray(np.array([0, 1, 4, 3])))
    else:
        x = np.array(X[:4], np.float32)
        x[1, 2, 3, 0] = np.nan
        model.train_step(model._to_device(x), yb)
    with pytest.raises(InputError if bad == "label" else NonFiniteError, match="step 2"):
        for _ in range(READ_EVERY):
            model.train_step(xb, yb)
    assert model.optimizer.iterations == 1
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(X[:4]), predicted)


def test_a_skipped_step_is_named_even_where_a_layer_is_frozen_before_the_totals_are_read(
        model):
    """(was: freezing a layer made the running totals afresh, and the record of the skipped
    step with them: it and the steps after it were lost without a word, and counted)"""
    xb, yb = model._to_device(X[:4]), model.backend.asarray(Y[:4])
    model.train_step(xb, model.backend.asarray(np.array([0, 1, 9, 3])))
    model.train_step(xb, yb)
    model.layers[1].trainable = False
    with pytest.raises(InputError, match="training stopped at step 1: labels in y must be in"):
        model.train_step(xb, yb)
    assert model.optimizer.iterations == 0


def test_a_skipped_step_not_read_yet_is_named_by_a_move_to_another_device(model):
    """(was: the move made the running totals afresh there, and the record of the skipped
    step with them: the step and those after it were lost without a word)"""
    xb = model._to_device(X[:4])
    model.train_step(xb, model.backend.asarray(np.array([0, 1, 9, 3])))
    with pytest.raises(InputError, match="training stopped at step 1: labels in y must be in"):
        model.to(xs)
    assert model.backend.xp.__name__ == "array_api_compat.numpy"  # (left where it was)
    model.to(xs)
    model.train_step(model._to_device(X[:4]), model.backend.asarray(Y[:4]))
    assert model.optimizer.iterations == 1


def test_an_epochs_loss_counts_every_batch_where_a_callback_freezes_a_layer_in_it():
    """(was: the freeze made the running totals afresh mid-epoch, so the epoch's loss and
    accuracy summed only the batches after it, divided by all of them)"""
    class FreezeAtBatch2(xpcnn.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.layers[1].trainable = False

    logs = []
    for callbacks in ([], [FreezeAtBatch2()]):
        model = xpcnn.Sequential(four_class_net(), seed=0, dtype="float64")
        model.compile(optimizer=optim.SGD(1e-300))  # (the same model for every batch)
        history = model.fit(X, Y, batch_size=5, shuffle=False, verbose=0, callbacks=callbacks)
        logs.append(history.history["loss"][0])
    assert logs[1] == pytest.approx(logs[0], rel=1e-12)
    assert logs[0] == pytest.approx(model.evaluate(X, Y)[0], rel=1e-12)


def test_train_step_never_trains_on_one_hot_rows_that_are_no_probabilities(model):
    xb, rows = model._to_device(X[:4]), np.eye(4)[Y[:4]]
    rows[2] *= 3.0
    model.train_step(xb, model.backend.asarray(rows))
    with pytest.raises(InputError, match="step 1: one-hot y must hold probabilities, each row "
                                         ">= 0 and summing to 1; row 2 sums to 3"):
        model.train_on_batch(X[:4], Y[:4])  # (reads the totals at once)
    assert model.optimizer.iterations == 0


@pytest.mark.parametrize("labels, message", [
    (Y[:1], r"y has 1 labels but x has 4 samples"),  # (was: broadcast to every sample)
    (Y[:4].reshape(4, 1), r"y must be integer labels of shape \(4,\) or one-hot rows of shape "
                          r"\(4, 4\); got shape \(4, 1\)"),  # (was: broadcast, silently)
    (np.eye(5)[Y[:4]], r"got shape \(4, 5\)"),
    (Y[:4] * 1j, r"y must be integer class labels, got dtype complex128"),
    (Y[:4] * 1.0, r"y must be integer class labels, got dtype float64"),
])
def test_train_step_refuses_labels_of_the_wrong_shape_or_dtype_at_once(model, labels, message):
    with pytest.raises(InputError, match=message):
        model.train_step(model._to_device(X[:4]), model.backend.asarray(labels))
    assert model.optimizer.iterations == 0


def test_train_step_refuses_what_it_cannot_run_on(model):
    with pytest.raises(InputError, match=r"x has per-sample shape \(5, 5, 3\) but the model "
                                         r"expects \(6, 6, 3\)"):
        model.train_step(model._to_device(X[:4, :5, :5]), Y[:4])
    strict = model.backend.asarray(X[:4]), xs.asarray(Y[:4])
    with pytest.raises(InputError, match="y is an array of array_api_strict"):
        model.train_step(*strict)
    uncompiled = xpcnn.Sequential(four_class_net(), input_shape=(6, 6, 3))
    with pytest.raises(InputError, match=r"call compile\(loss=..., optimizer=...\) before "
                                         r"train_step"):
        uncompiled.train_step(model._to_device(X[:4]), Y[:4])


@pytest.mark.parametrize("on", ["numpy", "array_api_strict"])
def test_train_step_refuses_an_empty_batch_by_name(on):
    """(was: a ValueError from a reshape deep inside the first Dense layer)"""
    model = four_class_model() if on == "numpy" else _strict_model()
    xb, yb = model._to_device(X[:4]), model.backend.asarray(Y[:4])
    with pytest.raises(InputError, match=r"x is empty: a training step needs at least one "
                                         r"sample; got x.shape = \(0, 6, 6, 3\)"):
        model.train_step(xb[:0, ...], yb[:0])
    assert model.optimizer.iterations == 0
    model.train_step(xb, yb)
    assert model.optimizer.iterations == 1


# -- a refused call changes nothing: no batch drawn, no weight replaced -------------------------

def _generator():
    for start in range(0, 20, 5):
        yield X[start:start + 5], Y[start:start + 5]


@pytest.mark.parametrize("wrong", [
    dict(resume=True), dict(checkpoint_every=2), dict(validation_data=[X]),
    dict(validation_data=(X, Y), validation_steps=2), dict(callbacks=[print]),
], ids=["resume", "checkpoint_every", "validation_data", "validation_steps", "callbacks"])
def test_a_refused_fit_draws_no_batch_from_a_generator(wrong):
    """(was: refused after the first batch was drawn to build the model, and that batch lost)"""
    unbuilt = xpcnn.Sequential(four_class_net(), seed=0)
    unbuilt.compile(optimizer=optim.SGD(0.01))
    batches = _generator()
    with pytest.raises(InputError):
        unbuilt.fit(batches, steps_per_epoch=4, verbose=0, **wrong)
    assert not unbuilt.built
    first = next(batches)
    np.testing.assert_array_equal(first[0], X[:5])


def test_a_refused_set_weights_replaces_no_weight(model):
    weights = model.get_weights()
    wrong = [w + 1 for w in weights]
    wrong[-1] = np.zeros(5)  # the last layer's bias, of the wrong size
    with pytest.raises(InputError, match=r"weight 'bias' must have shape \(4,\), got \(5,\)"):
        model.set_weights(wrong)  # (was: every layer before the last one replaced)
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)


INTEGER_BATCHES = {  # (layer, input shape, batch, what a float batch of it gives)
    "AvgPool2D on uint8": (xpcnn.layers.AvgPool2D(2), (4, 4, 1),  # (was: AttributeError)
                           np.full((1, 4, 4, 1), 200, np.uint8), np.full((1, 2, 2, 1), 200.0)),
    "GlobalAvgPool2D on uint8": (GlobalAvgPool2D(), (4, 4, 1),
                                 np.full((1, 4, 4, 1), 200, np.uint8), np.full((1, 1), 200.0)),
    "AvgPool2D on bool": (xpcnn.layers.AvgPool2D(2), (2, 2, 1), np.ones((1, 2, 2, 1), bool),
                          np.ones((1, 1, 1, 1))),
    "Add on uint8": (xpcnn.layers.Add(), [(2,), (2,)],  # (was: 144, wrapped around)
                     [np.full((1, 2), 200, np.uint8)] * 2, np.full((1, 2), 400.0)),
    "a same MaxPool2D on int8": (MaxPool2D(2, padding="same"), (3, 3, 1),  # (was: 0, padding)
                                 np.full((1, 3, 3, 1), -5, np.int8), np.full((1, 2, 2, 1), -5.0)),
}


@pytest.mark.parametrize("case", sorted(INTEGER_BATCHES))
def test_a_layer_called_on_an_integer_or_bool_batch_runs_in_its_float_dtype(case):
    layer, shape, batch, expected = INTEGER_BATCHES[case]
    y = built(layer, shape)(batch)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("layer", [xpcnn.layers.Normalization(0.5, 2.0), xpcnn.layers.ReLU(),
                                   xpcnn.layers.Conv2D(2, 3), MaxPool2D(2)],
                         ids=lambda la: type(la).__name__)
def test_a_layer_called_on_a_complex_batch_refuses_it(layer):
    """As a model refuses complex images: a layer called on a complex batch (was: Conv2D and
    Normalization cast it, dropping the imaginary part with NumPy's ComplexWarning alone;
    ReLU gave a complex batch back)."""
    with pytest.raises(InputError, match=rf"layer '\w+' \({type(layer).__name__}\) takes "
                       r"batches of real numbers \(floats, integers or bools\), got dtype "
                       r"complex128"):
        layer(np.full((1, 4, 4, 1), 1 + 1j))


def test_dropout_on_an_integer_batch_drops_and_scales_as_on_floats():
    y = built(xpcnn.layers.Dropout(0.5), (64,))(np.ones((4, 64), np.int64), training=True)
    assert y.dtype == np.float32 and set(np.unique(y)) == {0.0, 2.0}  # (was: ValueError)


def test_a_refused_evaluate_leaves_an_uncompiled_model_uncompiled():
    unbuilt = xpcnn.Sequential(four_class_net(), seed=0)
    with pytest.raises(InputError):
        unbuilt.evaluate(X, Y[:3])
    assert unbuilt.loss is None  # (was: the default loss, as if compiled)
    assert unbuilt.evaluate(X, Y)[0] > 0 and unbuilt.loss is None


def _unbuilt():
    unbuilt = xpcnn.Sequential(four_class_net(), seed=0)
    unbuilt.compile(optimizer=optim.SGD(0.01))
    return unbuilt


@pytest.mark.parametrize("refused", [
    dict(checkpoint="ck.npz"),  # BackupAndRestore needs batches it can replay
    dict(callbacks=[EarlyStopping()]),  # val_loss, in a fit without validation data
    dict(validation_data=(X[:4, :5], Y[:4])),  # images of another size than x's
    dict(first_labels=Y[:5] + 4),  # labels out of range in the batch that builds the model
], ids=["checkpoint", "early stopping", "validation images", "first labels"])
def test_a_batch_drawn_to_build_the_model_is_given_back_when_fit_is_refused(
        refused, tmp_path, monkeypatch):
    """Refused after the first batch was drawn (to build the model from it), fit gives that
    batch back: the next fit on the generator trains on every batch, as on a fresh one (was:
    the batch was lost, and the model built for the refused call)."""
    monkeypatch.chdir(tmp_path)
    model, batches = _unbuilt(), _generator()
    wrong = refused.pop("first_labels", None)
    with pytest.raises(InputError):
        model.fit(batches if wrong is None else iter([(X[:5], wrong)]), steps_per_epoch=4,
                  verbose=0, **refused)
    assert not model.built  # (was: built, for the labels' refusal came at the first step)
    model.fit(batches, steps_per_epoch=4, verbose=0)
    fresh = _unbuilt()
    fresh.fit(_generator(), steps_per_epoch=4, verbose=0)
    assert model.optimizer.iterations == 4
    for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_the_last_refused_calls_batch_is_kept(tmp_path, monkeypatch):
    """A given-back batch waits for a retry of the refused call; refused calls on other
    generators do not pile theirs up (each holds a generator and a batch)."""
    from xpcnn.data import streams

    monkeypatch.chdir(tmp_path)
    for _ in range(3):
        with pytest.raises(InputError):
            _unbuilt().fit(_generator(), steps_per_epoch=4, verbose=0,
                           callbacks=[EarlyStopping()])
    import gc

    gc.collect()  # (a refused call's traceback holds its generator in a cycle)
    assert len(streams._STREAMS) == 0  # (each went with its generator)
    # (the generator is held weakly: dropped by the caller, it goes, with what it holds open;
    # was: kept alive until another refused call)
    import weakref

    batches = _generator()
    with pytest.raises(InputError):
        _unbuilt().fit(batches, steps_per_epoch=4, verbose=0, callbacks=[EarlyStopping()])
    gone = weakref.ref(batches)
    del batches
    gc.collect()
    assert gone() is None
    assert len(streams._STREAMS) == 0  # (its batch with it: was kept until another refused
    # call)


def test_a_refused_call_leaves_an_unbuilt_model_unbuilt():
    """(was: built for the refused data, whose shape then refused the right data)"""
    nchw = np.ascontiguousarray(X.transpose(0, 3, 1, 2))
    for call in (lambda m: m.fit(nchw, Y[:3], verbose=0),
                 lambda m: m.train_on_batch(nchw, Y[:3]),
                 lambda m: m.evaluate(nchw, Y[:3])):
        model = _unbuilt()
        with pytest.warns(UserWarning, match="channels-first"), pytest.raises(InputError):
            call(model)
        assert not model.built and all(not la.built and not la.params for la in model.layers)
        model.fit(X, Y, verbose=0)  # (was: 'x has per-sample shape (6, 6, 3) but the model
        assert model.input_shape == (None, 6, 6, 3)  # expects (3, 6, 6)')


def test_a_refused_fit_keeps_the_history_of_the_last_one(tmp_path):
    model = four_class_model()
    history = model.fit(X, Y, epochs=2, verbose=0)
    with pytest.raises(InputError, match="EarlyStopping monitors 'val_loss'"):
        model.fit(X, Y, callbacks=[EarlyStopping()], verbose=0)
    assert model.history is history and len(history.history["loss"]) == 2


def test_a_refused_load_weights_leaves_an_unbuilt_model_unbuilt(tmp_path):
    other = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(3, 3), ReLU(), Flatten(),
                              Dense(4, use_bias=False), Softmax()], input_shape=(6, 6, 3))
    other.save(tmp_path / "other.npz")  # (an activation, a setting, would load: use_bias)
    model = _unbuilt()
    with pytest.raises(DataFormatError, match="another architecture"):
        model.load_weights(tmp_path / "other.npz")
    assert not model.built  # (was: built for the file's inputs)


def test_a_refused_build_leaves_a_built_model_as_it_was(model):
    model.fit(X, Y, verbose=0)
    before = model.predict(X)
    with pytest.raises(InputError, match=r"layer 'dense' \(Dense\) holds weights for inputs of "
                                         r"shape \(48,\)"):
        model.build((5, 5, 3))  # the convolution takes it, the Dense layer after it cannot
    # (was: (5, 5, 3), with the convolution built for it
    assert model.input_shape == (None, 6, 6, 3)
    np.testing.assert_array_equal(model.predict(X), before)  # and predict failing deep inside)
    model.fit(X, Y, verbose=0)


def test_batch_size_none_is_the_default_as_in_keras():
    """Keras code passes ``batch_size=None`` (its default, 32; required with generators): the
    same run as the default (was: refused); evaluate's and predict's default is 256."""
    x, y = four_class_data()

    def fitted(**kwargs):
        model = four_class_model()
        model.fit(x, y, epochs=2, verbose=0, **kwargs)
        return model

    for a, b in zip(fitted(batch_size=None).get_weights(), fitted().get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model = fitted()
    assert model.evaluate(x, y, batch_size=None) == model.evaluate(x, y)
    np.testing.assert_array_equal(model.predict(x, batch_size=None), model.predict(x))


def test_the_on_batch_methods_take_a_strict_array_as_one_batch(monkeypatch):
    """``len()`` is no standard function: a batch of array_api_strict arrays is one batch of
    its first axis' length (was: len() failed, and the fallback ran one sample a batch)."""
    import array_api_strict as xs

    from xpcnn.training import Trainer

    model = xpcnn.Sequential(four_class_net(), seed=0, device=xs)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    model.build((6, 6, 3))
    sizes = []
    for method in ("evaluate", "predict"):
        inner = getattr(Trainer, method)
        monkeypatch.setattr(Trainer, method, lambda self, *a, inner=inner, **k: (
            sizes.append(k.get("batch_size")), inner(self, *a, **k))[1])
    x, y = xs.asarray(X), xs.asarray(Y)
    model.test_on_batch(x, y)
    model.predict_on_batch(x)
    assert sizes == [20, 20]


# -- a user's own classes ------------------------------------------------------------------------


def test_a_users_optimizer_and_schedule_load_back_from_their_files(tmp_path):
    """A user's Optimizer subclass (only ``_update``, as documented) and Schedule subclass,
    defined before loading: a checkpoint of them loads and resumes (was: every file naming
    them failed, "KeyError: 'MySGD'"); one not defined is named as such."""
    from xpcnn import load_checkpoint, load_model
    from xpcnn.optim import Optimizer, Schedule

    class Halving(Schedule):
        def __init__(self, lr):
            self.lr = lr

        def __call__(self, step):
            return self.lr / 2 ** step

    class MySGD(Optimizer):
        slot_names = ("buf",)

        def _update(self, xp, i, p, g, scalars, apply):
            buf = self.slots["buf"][i]
            self._assign(xp, buf, 0.9 * buf + g, apply)
            self._assign(xp, p, p - scalars["lr"] * buf, apply)

    model = four_class_model()
    model.compile(optimizer=MySGD(Halving(0.1)))
    model.fit(X, Y, epochs=1, batch_size=5, verbose=0, checkpoint=tmp_path / "c.npz")
    ckpt = load_checkpoint(tmp_path / "c.npz")
    assert type(ckpt.model.optimizer) is MySGD and ckpt.model.optimizer.schedule(1) == 0.05
    model.save(tmp_path / "m.npz")
    assert type(load_model(tmp_path / "m.npz").optimizer.schedule) is Halving
    from xpcnn import optim

    del optim.OPTIMIZER_CLASSES["MySGD"]  # (as in a process that never defined it)
    with pytest.raises(DataFormatError, match=r"unknown optimizer class 'MySGD': define \(or "
                                              r"import\) a user's optimizer class"):
        load_model(tmp_path / "m.npz")


def test_a_users_layer_must_name_its_weights_and_its_settings(tmp_path):
    """A user's layer that makes arrays without naming them in weight_names (they trained, and
    were never saved: a loaded model predicted with the initial weights), or takes settings
    without a get_config (a loaded one had the defaults), or has no backward where gradients
    pass, or fills no gradient: each is refused by name, not lost or left to a bare error."""
    from xpcnn.layers import Layer

    class Scale(Layer):
        def _build(self, input_shape, rng):
            self.params["w"] = self.backend.asarray(np.ones(input_shape[-1]), dtype=self.dtype)
            return input_shape

        def forward(self, x, training=False, options=None):
            return x * self.params["w"]

    with pytest.raises(InputError, match=r"layer class Scale makes the arrays \['w'\] but "
                                         r"does not name them in weight_names"):
        Scale().build((4,))

    class Leaky(Layer):
        def __init__(self, alpha=0.01, name=None):
            super().__init__(name)
            self.alpha = alpha

        def forward(self, x, training=False, options=None):
            return x

    leaky = xpcnn.Sequential([Leaky(0.9), Dense(2)], input_shape=(4,))
    assert "Leaky" in repr(leaky.layers[0])  # (only saving needs the settings)
    with pytest.raises(InputError, match=r"layer class Leaky takes \['alpha'\] but defines no "
                                         r"get_config\(\)"):
        leaky.save(tmp_path / "leaky.npz")

    class Keyworded(Layer):  # (the Keras way: every setting passed on, none of its own)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

        def forward(self, x, training=False, options=None):
            return x

    xpcnn.Sequential([Keyworded(), Dense(2)], input_shape=(4,)).save(tmp_path / "kw.npz")

    class Named(Scale):
        weight_names = ("w",)

    model = xpcnn.Sequential([Dense(4), Leaky(), Flatten(), Dense(4), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    with pytest.raises(InputError, match=r"layer 'leaky' \(Leaky\) defines no backward"):
        model.fit(np.ones((4, 3)), np.arange(4), verbose=0)
    model = xpcnn.Sequential([Named(), Dense(4), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    Named.backward = lambda self, dy, options=None: dy  # (fills no gradient)
    with pytest.raises(InputError, match=r"layer 'named' \(Named\)'s backward gave no gradient "
                                         r"for its parameter 'w'"):
        model.fit(np.ones((4, 3)), np.arange(4), verbose=0)


def test_a_subclass_of_a_built_in_layer_with_a_setting_of_its_own_is_refused_at_save(tmp_path):
    """A subclass of Dense with a setting inherits Dense's get_config, which does not give it:
    it was saved without a word and loaded with the default (predicting otherwise). Refused
    by name; with a get_config of its own it saves and loads with its setting."""
    class ScaledDense(Dense):
        def __init__(self, units, scale=1.0, **kwargs):
            super().__init__(units, **kwargs)
            self.scale = scale

    model = xpcnn.Sequential([Flatten(), ScaledDense(3, scale=100.0), Softmax()],
                             input_shape=(4, 4, 3))
    with pytest.raises(InputError, match=r"layer class ScaledDense takes \['scale'\] but the "
                                         r"get_config\(\) it inherits from Dense does not give "
                                         r"them: define get_config\(\)"):
        model.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    repr(model.layers[1])  # (get_config itself refuses nothing: repr calls it)
    with pytest.MonkeyPatch.context() as mp:  # (a file an earlier version wrote)
        mp.setattr(ScaledDense, "check_config", lambda self: None)
        model.save(tmp_path / "old.npz")
    model.load_weights(tmp_path / "old.npz")  # (loading is no save: nothing refused)

    class GivenScaleDense(ScaledDense):
        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    model = xpcnn.Sequential([Flatten(), GivenScaleDense(3, scale=100.0), Softmax()],
                             input_shape=(4, 4, 3))
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").layers[1].scale == 100.0

    class ScaleConfig:  # (a mixin's get_config: taken at its word)
        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    class MixedScaleDense(ScaleConfig, ScaledDense):
        pass

    model = xpcnn.Sequential([Flatten(), MixedScaleDense(3, scale=100.0), Softmax()],
                             input_shape=(4, 4, 3))
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").layers[1].scale == 100.0

    class PlainDense(Dense):  # (no setting of its own: Dense's get_config gives all)
        pass

    xpcnn.Sequential([Flatten(), PlainDense(3)], input_shape=(4, 4, 3)).save(tmp_path / "p.npz")


# one of each built-in layer, made with its settings given
BUILT_IN = {"Add": lambda: xpcnn.layers.Add(), "AvgPool2D": lambda: xpcnn.layers.AvgPool2D(2),
            "BatchNorm2D": BatchNorm2D, "Concatenate": lambda: xpcnn.layers.Concatenate(),
            "Conv2D": lambda: Conv2D(2, 3), "Dense": lambda: Dense(2),
            "Dropout": lambda: xpcnn.layers.Dropout(0.5),
            "FeatureNorm": lambda: xpcnn.layers.FeatureNorm(), "Flatten": Flatten,
            "GlobalAvgPool2D": GlobalAvgPool2D, "MaxPool2D": lambda: MaxPool2D(2),
            "Normalization": lambda: xpcnn.layers.Normalization(1.0, 2.0),
            "RandomCrop": lambda: RandomCrop(2), "RandomFlip": RandomFlip, "ReLU": ReLU,
            "Rescaling": lambda: Rescaling(0.5), "Softmax": Softmax}


def test_no_built_in_layer_is_refused_at_save_for_its_settings():
    from xpcnn.layers.base import LAYER_TYPES

    built_in = {n for n, cls in LAYER_TYPES.items() if cls.__module__.startswith("xpcnn.")}
    assert built_in == set(BUILT_IN)  # (a new layer joins the list)
    for make in BUILT_IN.values():
        make().check_config()


def _through(backward):
    """A user's layer, between two Dense layers, that passes its input on and whose backward
    is ``backward(self, dy)``."""
    from xpcnn.layers import Layer

    class Through(Layer):
        def forward(self, x, training=False, options=None):
            return x

    Through.backward = lambda self, dy, options=None: backward(self, dy)
    model = xpcnn.Sequential([Flatten(), Dense(5), Through(), Dense(4), Softmax()], seed=0)
    model.compile(optimizer=optim.SGD(0.01))
    model.build((6, 6, 3))
    return model


@pytest.mark.parametrize("backward, got", [
    (lambda self, dy: dy[:, :2], r"a gradient of shape \(5, 2\) and dtype float32"),
    (lambda self, dy: dy > 0, r"a gradient of shape \(5, 5\) and dtype bool"),
    (lambda self, dy: None, "None"),
], ids=["shape", "dtype", "none"])
def test_a_users_layer_whose_backward_returns_a_wrong_gradient_is_named(backward, got):
    """(was: a bare "operands could not be broadcast together" from deep inside the next
    layer's backward, or a bool gradient taken silently)"""
    model = _through(backward)
    before = model.get_weights()
    with pytest.raises(InputError, match=r"layer 'through' \(Through\)'s backward returned "
                                         rf"{got} for its input, of shape \(5, 5\): backward "
                                         r"returns the gradient of the loss with respect to "
                                         r"the input"):
        model.train_on_batch(X[:5], Y[:5])
    assert model.optimizer.iterations == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    good = _through(lambda self, dy: dy)  # (the right gradient trains as before)
    good.train_on_batch(X[:5], Y[:5])
    assert good.optimizer.iterations == 1


def test_a_users_layers_right_gradients_train_in_bfloat16_and_an_unneeded_one_is_not_read():
    """The check of a user's layer's gradients takes bfloat16 (NumPy's isdtype refuses
    ml_dtypes' bfloat16: mixed_bfloat16 training failed with a bare TypeError) and reads only
    the gradients the graph needs (a merge layer's None for the model's input was refused)."""
    from xpcnn.layers import Layer

    good = _through(lambda self, dy: dy)
    good.compile(optimizer=optim.SGD(0.01), precision="mixed_bfloat16")
    good.train_on_batch(X[:5], Y[:5])

    class Gate(Layer):
        multi_input = True

        def _build(self, input_shape, rng):
            return input_shape[1]

        def forward(self, x, training=False, options=None):
            self._gate = x[0]
            return x[0] * x[1]

        def backward(self, dy, options=None):
            return [None, dy * self._gate]  # (the input's gradient: not needed)

    inputs = xpcnn.Input((6, 6, 3))
    flat = Flatten()(inputs)
    model = xpcnn.Model(inputs, Softmax()(Dense(4)(Gate()([flat, Dense(108)(flat)]))))
    model.compile(optimizer=optim.SGD(0.01))
    model.train_on_batch(X[:5], Y[:5])
    assert good.optimizer.iterations == model.optimizer.iterations == 1


@pytest.mark.parametrize("returned, got", [("one", "one ndarray"), ("short", "a list of 1")])
def test_a_users_merge_layer_whose_backward_returns_no_gradient_per_input_is_named(returned,
                                                                                    got):
    """(was: a bare "zip() argument 2 is longer than argument 1")"""
    from xpcnn.layers import Layer

    class Sum(Layer):
        multi_input = True

        def _build(self, input_shape, rng):
            return input_shape[0]

        def forward(self, x, training=False, options=None):
            return x[0] + x[1]

        def backward(self, dy, options=None):
            return dy if returned == "one" else [dy]

    inputs = xpcnn.Input((4,))
    model = xpcnn.Model(inputs, Softmax()(Dense(2)(Sum()([Dense(3)(inputs), Dense(3)(inputs)]))))
    model.compile(optimizer=optim.SGD(0.01))
    with pytest.raises(InputError, match=rf"layer 'sum' \(Sum\)'s backward returned {got}: a "
                                         r"merge layer returns a list of the gradients of its "
                                         r"2 inputs, in their order"):
        model.train_on_batch(np.ones((5, 4), np.float32), Y[:5] % 2)


@pytest.mark.parametrize("on", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("update", ["replaced", "added", "in place"])
def test_a_users_layer_must_update_its_state_arrays_in_place(update, on):
    """A user's running statistic replaced by a new array in forward (against the Layer
    contract) is refused by name, its arrays put back (was: a step skipped for a NaN image put
    back the array the layer no longer held: the statistic stayed NaN, and predict returned
    NaN, while the error said nothing was updated). Updated in place, a skipped step leaves
    it as it was."""
    from xpcnn.layers import Layer

    class RunningMean(Layer):
        weight_names = ("mean",)

        def _build(self, input_shape, rng):
            self._param("mean", np.zeros(input_shape[-1]), trainable=False)
            return input_shape

        def forward(self, x, training=False, options=None):
            if training:
                new = 0.9 * self.state["mean"] + 0.1 * self.xp.mean(x, axis=(0, 1, 2))
                if update == "replaced":
                    self.state["mean"] = new
                elif update == "added":
                    self.state["count"] = self.xp.ones(1, dtype=self.dtype)
                else:
                    self.state["mean"][...] = new
            return x - self.state["mean"]

        def backward(self, dy, options=None):
            return dy

    model = xpcnn.Sequential([Conv2D(3, 3), RunningMean(), Flatten(), Dense(4), Softmax()],
                             seed=0, device=np if on == "numpy" else xs)
    model.compile(optimizer=optim.SGD(0.1))
    model.build((6, 6, 3))
    xb, yb = model._to_device(X[:4]), model.backend.asarray(Y[:4])
    held = model.layers[1].state["mean"]
    if update != "in place":
        message = (r"layer 'runningmean' \(RunningMean\)'s forward pass replaced its state "
                   r"array 'mean' with a new one instead of updating it in place: write "
                   r"self.state\['mean'\]\[...\] = new_value" if update == "replaced" else
                   r"layer 'runningmean' \(RunningMean\)'s forward pass added or removed the "
                   r"state arrays \['count'\]")
        with pytest.raises(InputError, match=message):
            model.train_step(xb, yb)
        state = model.layers[1].state  # (as it was: the arrays are put back)
        assert list(state) == ["mean"] and state["mean"] is held
        assert model.optimizer.iterations == 0
        return
    model.train_step(xb, yb)
    before, predicted = model.get_weights(), model.predict(X[:4])
    x = np.array(X[:4], np.float32)
    x[1, 2, 3, 0] = np.nan
    model.train_step(model._to_device(x), yb)
    with pytest.raises(NonFiniteError, match="step 2"):
        for _ in range(READ_EVERY):
            model.train_step(xb, yb)
    assert model.layers[1].state["mean"] is held
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(X[:4]), predicted)


def test_a_users_layer_class_may_not_take_a_built_in_name():
    """A user's ``class Dense(xpcnn.layers.Dense)`` took the name files load layers by: every
    file then loaded the user's class in place of xpcnn's, silently. Refused; a user's class
    defined again (a notebook cell run twice) is not."""
    with pytest.raises(InputError, match=r"a layer class named 'Dense' exists already "
                                         r"\(xpcnn.layers.dense.Dense\)"):
        class Dense(xpcnn.layers.Dense):  # noqa: F811 (the point)
            pass

    for _ in range(2):
        class Mine(xpcnn.layers.Dense):
            pass
    from xpcnn.layers.base import LAYER_TYPES

    assert LAYER_TYPES["Mine"] is Mine and LAYER_TYPES["Dense"] is xpcnn.layers.Dense


def test_train_on_batch_names_an_own_train_step_that_returns_no_pair():
    """A train_step that runs its own step (no super) must return (loss, correct count), as
    fit needs; one that calls super is logged by super's record (test_subclasses.py)."""
    class OwnStep(xpcnn.Sequential):
        def train_step(self, xb, yb):
            return {"loss": 0.0, "accuracy": 0.5}  # (two keys would unpack as names)

    model = OwnStep(four_class_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    with pytest.raises(InputError, match=r"^train_on_batch, as fit, takes what this model's "
                                         r"train_step \(which did not call "
                                         r"super\(\)\.train_step\) returns"):
        model.train_on_batch(X[:5], Y[:5])


@pytest.mark.parametrize("on", ["numpy", "array_api_strict"])
def test_train_on_batch_takes_a_train_step_returning_its_two_numbers_as_one_array(on):
    """(taken before 90883f9, which asked for a tuple or list); three numbers after super's
    step give super's record, as fit logs it (they were refused after the update)"""
    class Stacked(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            loss, correct = super().train_step(xb, yb)
            return self.backend.xp.stack([loss, correct, correct][:self.returns])

    device = np if on == "numpy" else xs
    model, reference = (Stacked(four_class_net(), seed=0, device=device),
                        xpcnn.Sequential(four_class_net(), seed=0, device=device))
    for m in (model, reference):
        m.compile(optimizer=xpcnn.optim.SGD(0.01))
    model.returns = 2
    assert model.train_on_batch(X[:5], Y[:5]) == reference.train_on_batch(X[:5], Y[:5])
    model.returns = 3
    assert model.train_on_batch(X[:5], Y[:5]) == reference.train_on_batch(X[:5], Y[:5])


def test_a_users_schedule_holding_an_array_is_refused_at_save_by_name(tmp_path):
    """(was: a bare "TypeError: Object of type ndarray is not JSON serializable")"""
    from xpcnn.optim import Schedule

    class Table(Schedule):
        def __init__(self, rates):
            self.rates = np.asarray(rates)

        def __call__(self, step):
            return float(self.rates[min(step, len(self.rates) - 1)])

    model = four_class_model()
    model.compile(optimizer=xpcnn.optim.SGD(Table([0.1, 0.05])))
    with pytest.raises(InputError, match=r"the optimizer's settings \(SGD\) cannot be written "
                                         r"as JSON \(.*ndarray.*\): the settings of a user's "
                                         r"layer"):
        model.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    from xpcnn.layers import Layer

    class Gain(Layer):
        def __init__(self, g=2.0, name=None):
            super().__init__(name)
            self.g = g

        def get_config(self):
            return {**super().get_config(), "g": self.g}

        def forward(self, x, training=False, options=None):
            return x * self.g

    model = xpcnn.Sequential([Gain(1.0), Gain(np.float32(2.0)), Dense(3)], input_shape=(4,))
    with pytest.raises(InputError, match=r"layer 1 \(Gain\)'s settings cannot be written as "
                                         r"JSON \(.*float32.*\).*float\(x\) for a NumPy one"):
        model.save(tmp_path / "m.npz")


@pytest.mark.parametrize("parallel", [False, True])
def test_a_users_layer_filling_its_gradient_on_some_steps_only_is_named(parallel):
    """A user's layer whose backward fills grads["w"] on its first step only: the next step
    trained on that first gradient again, silently. Named at the step that gives none, on one
    process and on several ranks (where each rank's buckets read the layer's grads)."""
    from xpcnn.layers import Layer

    class Sometimes(Layer):
        weight_names = ("w",)

        def _build(self, input_shape, rng):
            self.params["w"] = self.backend.asarray(np.ones(input_shape[-1]), dtype=self.dtype)
            self.calls = 0
            return input_shape

        def forward(self, x, training=False, options=None):
            self._x = x
            return x * self.params["w"]

        def backward(self, dy, options=None):
            self.calls += 1
            if self.calls == 1:
                self.grads["w"] = self.xp.sum(dy * self._x, axis=0)
            return dy * self.params["w"]

    model = xpcnn.Sequential([Dense(4), Sometimes(), Dense(3), Softmax()], seed=0,
                             dtype="float64")
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    x, y = np.ones((4, 3)), np.arange(4) % 3
    if not parallel:
        model.train_on_batch(x, y)
        with pytest.raises(InputError, match=r"layer 'sometimes' \(Sometimes\)'s backward gave "
                                             r"no gradient for its parameter 'w'"):
            model.train_on_batch(x, y)
        return
    from test_distributed import ThreadSum, run_ranks

    from xpcnn import distributed

    comm = ThreadSum(1)
    model.build((3,))

    def step(rank, model):
        dp = distributed.DataParallel(model, distributed.World(0, 1), comm.for_rank(0))
        model._parallel = dp
        dp.use_slice(0, 4, 4)
        model.train_step(model._to_device(x), model.backend.asarray(y))
        with pytest.raises(InputError, match=r"layer 'sometimes' \(Sometimes\)'s backward gave "
                                             r"no gradient for its parameter 'w'"):
            model.train_step(model._to_device(x), model.backend.asarray(y))

    run_ranks([model], step)


def test_a_regularizer_refusal_gives_keras_l2_strength_and_activity_has_no_equivalent():
    """Keras' l2(l) adds l * sum(w**2), whose gradient is 2*l*w: the refusal says
    weight_decay=2*l, and that weight decay reaches every parameter (was: weight_decay=1e-4
    for what a port writes as l2(1e-4), half the decay); an activity regularizer penalises
    outputs, and its refusal says xpcnn has no equivalent (was: the same weight-decay advice,
    which penalises no output)."""
    for make, key in ((lambda: Dense(3, kernel_regularizer="l2"), "kernel_regularizer"),
                      (lambda: Conv2D(3, 3, bias_regularizer="l2"), "bias_regularizer"),
                      (lambda: BatchNorm2D(gamma_regularizer="l2"), "gamma_regularizer")):
        with pytest.raises(InputError, match=rf"\({key}='l2'\): Keras' keyword, .* take no "
                                             r"regularizer: give the optimizer a weight_decay, "
                                             r"which decays every parameter \(biases and "
                                             r"normalisation weights too\): Keras' l2\(l\) is "
                                             r"weight_decay=2\*l on optim.SGD or optim.Adam "
                                             r"\(l2\(1e-4\): optim.SGD\(0.01, "
                                             r"weight_decay=2e-4\)\); l1 has no equivalent$"):
            make()
    for make in (lambda: Dense(3, activity_regularizer="l1"),
                 lambda: Conv2D(3, 3, activity_regularizer="l2")):
        with pytest.raises(InputError, match=r"\(activity_regularizer='l\d'\): Keras' keyword, "
                                             r".*: xpcnn has no equivalent: an activity "
                                             r"regularizer penalises the layer's outputs, not "
                                             r"its weights, so an optimizer's weight_decay is "
                                             r"no substitute$"):
            make()


def test_integer_and_boolean_one_hot_labels_and_boolean_data_are_taken_as_keras_takes_them(
        model):
    """Rows of integers or booleans (N, classes), pd.get_dummies' and np.eye(C, dtype=int)'s,
    are one-hot labels; boolean labels are 0 and 1; boolean images are 0/1 masks, as uint8
    (all were refused: "one-hot y must be floats", "y must be integer class labels, got dtype
    bool", "x must hold real numbers"). Each gives the loss its float or uint8 form gives; a
    column (N, 1) of integers stays class labels."""
    floats = model.evaluate(X, np.eye(4, dtype=np.float32)[Y], verbose=0)
    for rows in (np.eye(4, dtype=np.int64)[Y], np.eye(4, dtype=np.uint8)[Y],
                 np.eye(4, dtype=bool)[Y]):
        assert model.evaluate(X, rows, verbose=0) == floats
    assert model.evaluate(X, Y[:, None], verbose=0) == model.evaluate(X, Y, verbose=0)
    two = Y % 2
    assert model.evaluate(X, two.astype(bool), verbose=0) == model.evaluate(X, two, verbose=0)
    masks = X > 127
    np.testing.assert_array_equal(model.predict(masks, verbose=0),
                                  model.predict(masks.astype(np.uint8), verbose=0))
    model.fit(masks, np.eye(4, dtype=bool)[Y], epochs=1, verbose=0)
    assert model.optimizer.iterations == 1
    # (train_step, on the model's own arrays, takes them as fit does: cast on the device)
    stepped, reference = (xpcnn.Sequential(four_class_net(), seed=1) for _ in range(2))
    for m in (stepped, reference):
        m.compile(optimizer=optim.SGD(0.1))
        m.build(X.shape[1:])
    stepped.train_step(masks, np.eye(4, dtype=np.int64)[Y])
    stepped.train_step(masks, np.eye(4, dtype=bool)[Y])
    reference.train_step(masks.astype(np.uint8), np.eye(4, dtype=np.float32)[Y])
    reference.train_step(masks.astype(np.uint8), np.eye(4, dtype=np.float32)[Y])
    for a, b in zip(stepped.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    two_class = xpcnn.Sequential([*four_class_net()[:-2], Dense(2), Softmax()], seed=1)
    two_class.compile(optimizer=optim.SGD(0.1))
    two_class.build(X.shape[1:])
    loss, correct = two_class.train_step(X, two.astype(bool))  # (boolean labels: 0 and 1)
    assert np.isfinite(float(loss))
    # (device masks, array_api_strict's standing for CuPy's: cast on the device)
    strict = xpcnn.Sequential(four_class_net(), seed=1, device=xs)
    host = xpcnn.Sequential(four_class_net(), seed=1)
    np.testing.assert_allclose(np.asarray(strict.predict(xs.asarray(masks), verbose=0)),
                               host.predict(masks.astype(np.uint8), verbose=0), rtol=1e-6)
