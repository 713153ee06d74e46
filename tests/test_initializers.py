"""Weight initialisers: each one's distribution against Keras' and PyTorch's definitions, and
the one table that names them."""

import math

import numpy as np
import pytest

try:  # (a reference for the fans where installed: the suite runs without it)
    import torch
except ImportError:
    torch = None

from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, initializers

#: A conv kernel large enough (69,120 weights) that the sample's std is within ~0.3% of the
#: distribution's: the tolerances below are ten times that, so no seed could fail them.
KH, KW, C, K = 3, 5, 48, 96
#: (kind, scale, mode): Keras' VarianceScaling, std = sqrt(scale / fan), the fan fan_in
#: ("in") or (fan_in + fan_out) / 2 ("avg").
EXPECTED = {
    "glorot_uniform": ("uniform", 1.0, "avg"), "glorot_normal": ("truncated", 1.0, "avg"),
    "he_uniform": ("uniform", 2.0, "in"), "he_normal": ("truncated", 2.0, "in"),
    "lecun_normal": ("truncated", 1.0, "in"), "zeros": ("zeros", 0.0, "in"),
}


def test_every_initializer_is_checked_here():
    assert set(EXPECTED) == set(initializers.INITIALIZERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_conv_kernels_distribution_follows_the_formula(name):
    """Keras' variance scaling: std sqrt(scale / fan) (fan_in, or the mean of fan_in and fan_out
    for Glorot); a uniform on [-limit, limit] with limit = sqrt(3) std; a normal truncated at 2
    std before its rescaling. The fans of a (kh, kw, C, K) kernel are PyTorch's (its
    _calculate_fan_in_and_fan_out of the (K, C, kh, kw) weight): kh*kw*C and kh*kw*K."""
    layer = Conv2D(K, (KH, KW), kernel_initializer=name)
    layer.build((KH + 1, KW + 1, C), rng=np.random.default_rng(1234))
    kernel = layer.get_weights()[0].astype(np.float64)
    assert kernel.shape == (KH, KW, C, K)
    fan_in, fan_out = KH * KW * C, KH * KW * K
    if torch is not None:
        assert torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(K, C, KH, KW)) == (
            fan_in, fan_out)
    kind, scale, mode = EXPECTED[name]
    if kind == "zeros":
        assert not kernel.any()
        return
    std = math.sqrt(scale / (fan_in if mode == "in" else (fan_in + fan_out) / 2))
    n = kernel.size
    assert abs(kernel.mean()) < 5 * std / math.sqrt(n)
    assert kernel.std() == pytest.approx(std, rel=0.03)
    if kind == "uniform":
        limit = math.sqrt(3) * std
        assert np.abs(kernel).max() <= limit * (1 + 1e-6)  # (float32's rounding)
        assert np.abs(kernel).max() > 0.99 * limit  # (reaches its bounds: no narrower)
        # a uniform's quarter of the range holds a quarter of the values
        assert np.mean(np.abs(kernel) < limit / 2) == pytest.approx(0.5, abs=0.02)
    else:  # truncated: nothing beyond 2 std of the normal before its rescaling to std
        bound = 2 * std / 0.87962566103423978
        assert np.abs(kernel).max() <= bound * (1 + 1e-6)
        # (the share beyond std: of a standard normal cut at 2, the share beyond 0.8796...)
        cut = 0.87962566103423978
        share = (math.erf(2 / math.sqrt(2)) - math.erf(cut / math.sqrt(2))) / math.erf(
            2 / math.sqrt(2))
        assert np.mean(np.abs(kernel) > std) == pytest.approx(share, abs=0.02)


def test_one_table_names_the_initializers(monkeypatch):
    """Adding an initialiser is one entry of the table (was: the tuple, the if-chain of
    initialize and its message, and check_initializer's message): checked and drawn from it."""
    assert tuple(initializers._TABLE) == initializers.INITIALIZERS
    monkeypatch.setitem(initializers._TABLE, "ones",
                        lambda rng, shape, fan_in, fan_out: np.ones(shape))
    layer = Dense(3, kernel_initializer="ones")
    layer.build((4,))
    assert np.array_equal(layer.get_weights()[0], np.ones((4, 3)))
    for bad in ("uniform", ["zeros"], 3):
        with pytest.raises(InputError, match=r"unknown initializer .*; expected one of "
                                             r"glorot_uniform, glorot_normal, he_uniform"):
            Dense(3, kernel_initializer=bad)
