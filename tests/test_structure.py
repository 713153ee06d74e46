"""A malformed model is refused when it is built (or, for its output, before it trains or
predicts), with what is wrong and where, instead of failing deep inside the ops."""

from __future__ import annotations

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Softmax
from xpcnn.structure import check_classifier, check_structure


def test_the_same_layer_added_twice():
    dense = Dense(4)
    model = xpcnn.Sequential([Flatten(), dense])
    with pytest.raises(InputError, match=r"layer 'dense' \(Dense\) is already in the model: the "
                                         r"same layer instance cannot be added twice; create "
                                         r"another Dense\(\.\.\.\)"):
        model.add(dense)
    assert dense.name == "dense" and len(model.layers) == 2  # nothing renamed or added
    with pytest.raises(InputError, match="already in the model"):
        xpcnn.Sequential([Flatten(), dense, dense])


def test_a_layer_list_holding_one_instance_twice():
    """For models that hold their layers otherwise (a graph): the check takes the list."""
    conv = Conv2D(3, 3)
    with pytest.raises(InputError, match=r"layer 'conv2d' \(Conv2D, 3 of 4\) is also the "
                                         r"model's layer 1: the same layer instance is used "
                                         r"twice"):
        check_structure([conv, ReLU(), conv, Flatten()])
    model = xpcnn.Sequential([conv, ReLU(), Flatten(), Dense(3)])
    list.append(model.layers, conv)  # behind add()'s and the list's backs
    with pytest.raises(InputError, match="used twice"):
        model.build((8, 8, 1))


def test_a_softmax_in_the_middle():
    with pytest.raises(InputError, match=r"layer 'softmax' \(Softmax, 3 of 5\) is not the last "
                                         r"layer: a Softmax turns the output scores into "
                                         "probabilities and belongs only at the end"):
        xpcnn.Sequential([Flatten(), Dense(8), Softmax(), Dense(3), Softmax()],
                         input_shape=(4, 4, 1))


@pytest.mark.parametrize("use", ["fit", "evaluate"])
def test_a_model_ending_in_conv2d(use, rng):
    model = xpcnn.Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2)])
    model.compile()
    x, y = rng.random((4, 8, 8, 1)).astype(np.float32), np.array([0, 1, 2, 3])
    call = {"fit": lambda: model.fit(x, y, verbose=0),
            "evaluate": lambda: model.evaluate(x, y)}[use]
    with pytest.raises(InputError, match=r"the model's output has per-sample shape \(3, 3, 4\), "
                                         r"from layer 'maxpool2d' \(MaxPool2D, 3 of 3\): a "
                                         r"classifier ends in one vector of class scores, "
                                         r"\(classes,\): add Flatten\(\) or GlobalAvgPool2D\(\), "
                                         r"then Dense\(classes\), after it"):
        call()
    assert model.optimizer.iterations == 0 and not model.built  # (a refused call builds nothing)
    # Such a model still transforms images, for inspection: predict returns its output, as in
    # Keras (a feature extractor).
    features = model.predict(x)
    assert features.shape == (4, 3, 3, 4)
    np.testing.assert_array_equal(features, np.asarray(model.layer_outputs(x)[-1]))


def test_a_single_class_output(rng):
    model = xpcnn.Sequential([Flatten(), Dense(1), Softmax()])
    with pytest.raises(InputError, match="has 1 class score per sample, from layer 'softmax' "
                                         r"\(Softmax, 3 of 3\): a classifier needs at least 2"):
        model.predict(rng.random((2, 3, 3, 1)))


def test_well_formed_models_pass(rng):
    layers = [Conv2D(4, 3), ReLU(), Flatten(), Dense(3), Softmax()]
    check_structure(layers)
    check_classifier(layers, [(6, 6, 4), (6, 6, 4), (144,), (3,), (3,)])
    model = xpcnn.Sequential([Conv2D(4, 3), ReLU(), Flatten(), Dense(3)])
    assert model.predict(rng.random((2, 8, 8, 1))).shape == (2, 3)
