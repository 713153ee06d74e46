"""Real data (slow): one epoch of the MNIST recipe on the full training set."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))


@pytest.mark.slow
def test_one_epoch_of_the_mnist_recipe_reaches_98_percent():
    from mnist_recipe import recipe

    from xpcnn.datasets import load_mnist

    (x, y), (x_test, y_test) = load_mnist(os.environ["XPCNN_DATA_DIR"], download=False)
    assert x.shape == (60000, 28, 28, 1)
    model = recipe(epochs=1, steps_per_epoch=math.ceil(len(x) / 128))
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test)
    assert accuracy >= 0.98, (loss, accuracy)
