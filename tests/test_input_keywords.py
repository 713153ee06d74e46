"""``xpcnn.Input`` given Keras' keywords (``keras.Input(shape, batch_size, dtype, sparse,
batch_shape, name, tensor, optional)``): their defaults are taken, as a built-in layer takes
Keras' defaults spelled out; another value is refused by name, saying what to do instead (it
was Python's bare "unexpected keyword argument")."""

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Dense, Softmax


def _trained(inputs):
    model = xpcnn.Model(inputs, Softmax()(Dense(3)(inputs)), seed=0)
    model.compile(optimizer="sgd")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 6)).astype(np.float32), np.arange(8) % 3, epochs=1,
              verbose=0)
    return model


def test_keras_defaults_are_taken():
    plain = _trained(xpcnn.Input((6,)))
    for keras in ({"batch_size": None, "dtype": None, "name": None},
                  {"dtype": "float32", "sparse": False, "ragged": False, "optional": False},
                  {"dtype": np.float32, "sparse": None, "tensor": None, "batch_shape": None}):
        inputs = xpcnn.Input(shape=(6,), **keras)
        assert (inputs.sample_shape, inputs.name) == ((6,), "input")
        for a, b in zip(_trained(inputs).get_weights(), plain.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_batch_size_is_refused_as_fits():
    with pytest.raises(InputError, match=r"^Input\(batch_size=32\): the batch size is fit's.*"
                                         r"fit\(x, y, batch_size=\.\.\.\).*takes batches of any "
                                         r"size: leave batch_size out"):
        xpcnn.Input((6,), batch_size=32)


@pytest.mark.parametrize("dtype", ["float64", "uint8", "mixed_float16", np.float16])
def test_another_dtype_is_refused_naming_the_models_setting(dtype):
    with pytest.raises(InputError, match=r"^Input\(dtype=.*\): xpcnn's Input takes dtype only "
                                         r"as None or 'float32'.*casts its batches.*"
                                         r"Model\(inputs, outputs, dtype='float64'\).*"
                                         r"compile\(precision='mixed_float16'\)"):
        xpcnn.Input((6,), dtype=dtype)


@pytest.mark.parametrize("key, value, instead", [
    ("sparse", True, r"dense arrays"),
    ("ragged", True, r"dense arrays of one shape"),
    ("batch_shape", (None, 6), r"Input\(shape=batch_shape\[1:\]\): the batch size is fit's"),
    ("tensor", np.zeros((2, 6), np.float32), r"xpcnn.Input makes the symbolic tensor itself"),
    ("optional", True, r"always given"),
])
def test_other_keras_keywords_are_refused_by_name(key, value, instead):
    with pytest.raises(InputError, match=rf"(?s)^Input\({key}=.*\): Keras' keyword, which "
                                         rf"xpcnn's Input takes only as [^:]*: .*{instead}"):
        xpcnn.Input((6,), **{key: value})


def test_a_keyword_of_no_kind_is_named_with_what_input_takes():
    with pytest.raises(InputError, match=r"^Input\(units=4\): Input takes shape, name and "
                                         r"Keras' batch_size, dtype, sparse, .*optional"):
        xpcnn.Input((6,), units=4)


def test_a_second_positional_number_is_named_as_keras_batch_size():
    """``Input((6,), 32)``: Keras 3's second positional argument is ``batch_size``
    (``keras.Input(shape=None, batch_size=None, dtype=None, ...)``), xpcnn's is ``name``: the
    error said "input name must be a non-empty string, got 32". Now it names both orders and
    what to do; a name given by position still works."""
    with pytest.raises(InputError, match=r"^Input\(\(6,\), 32\): xpcnn's second positional "
                                         r"argument is the input's name, Input\(shape, name\); "
                                         r"Keras 3's is batch_size, .*fit\(x, y, batch_size="):
        xpcnn.Input((6,), 32)
    assert xpcnn.Input((6,), "pixels").name == "pixels"
