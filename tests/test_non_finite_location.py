"""Where NonFiniteError says non-finite values first appear: a layer whose training-mode output
alone is non-finite is named, and the pass that finds it leaves the model as it was."""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import BatchNorm2D, Dense, Dropout, Flatten, Softmax
from xpcnn.layers.base import Layer, RandomLayer


class BatchStdScale(Layer):
    """A user's layer with training-only work: the batch divided by its standard deviation
    (infinite for a constant batch); the identity in inference."""

    def forward(self, x, training=False, options=None):
        if not training:
            return x
        self.calls = getattr(self, "calls", 0) + 1  # (a host-side counter of its own)
        self._scale = 1 / self.xp.std(x)
        return x * self._scale

    def backward(self, dy, options=None):
        return dy * self._scale


def _host_state(model):
    """Every layer's state arrays and random layer's draws, on the host, and its attributes
    (compared as objects: whether each is the one it was)."""
    def host(a):  # (a copy: NumPy's to_numpy gives the array itself)
        return np.array(model.backend.to_numpy(a), copy=True)

    arrays = {f"{la.name}.{k}": host(a) for la in model.layers for k, a in la.state.items()}
    arrays.update({f"{la.name}.random_state": host(la.random_state)
                   for la in model.layers if isinstance(la, RandomLayer)})
    attributes = {f"{la.name}.{k}": v for la in model.layers for k, v in vars(la).items()}
    return arrays, attributes


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_a_layer_non_finite_in_training_mode_alone_is_named(device, monkeypatch):
    """A constant batch: BatchNorm's training output is all zeros, which the user's layer
    scales by 1/0 in training only; its inference output is finite. The error names that
    layer (was: "the first non-finite values appear in the loss", from an inference-mode
    pass alone), and the training-mode pass that found it leaves BatchNorm's moving
    statistics, Dropout's draws and the layers' attributes as they were: their caches, their
    readiness for a backward (was: left ready, so a later backward got past its check) and a
    user's layer's own (was: its counter and its scale left as the pass set them)."""
    model = xpcnn.Sequential([BatchNorm2D(), Dropout(0.5), BatchStdScale(name="batch_std_scale"),
                              Flatten(), Dense(3), Softmax()], device=device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    x, y = np.ones((8, 4, 4, 1), np.float32), np.zeros(8, np.int64)
    seen = {}
    cls = type(model)
    real = cls._raise_non_finite

    def looked(self, *args, **kwargs):
        seen["before"] = _host_state(self)
        try:
            real(self, *args, **kwargs)
        finally:
            seen["after"] = _host_state(self)

    monkeypatch.setattr(cls, "_raise_non_finite", looked)
    with np.errstate(divide="ignore", invalid="ignore"), \
            pytest.raises(NonFiniteError, match=r"training stopped at step 1: the loss is nan; "
                          r"the first non-finite values appear in the output of layer "
                          r"'batch_std_scale' in training mode"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    (arrays, caches), (arrays_after, caches_after) = seen["before"], seen["after"]
    assert arrays.keys() == arrays_after.keys() and "dropout.random_state" in arrays
    for name, a in arrays.items():
        np.testing.assert_array_equal(arrays_after[name], a, err_msg=name)
    assert caches_after.keys() == caches.keys()
    # (the objects themselves: no batch kept for a backward that will not run, and no
    # attribute left as the pass set it)
    assert all(caches_after[k] is v for k, v in caches.items())
    assert any(k.endswith("._cache") and v is None for k, v in caches.items())
    assert caches["batch_std_scale.calls"] == 1 and "batch_std_scale._scale" in caches
    assert not any(v for k, v in caches.items() if k.endswith("._backward_ready"))
    with pytest.raises(InputError, match="needs a forward"):
        model.layers[0].backward(np.ones((8, 4, 4, 1), np.float32))
