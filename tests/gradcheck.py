"""Finite-difference gradient checking in float64, shared by the gradient tests."""

from __future__ import annotations

import numpy as np

from xpcnn.layers.base import DEFAULT


def numeric_grad(f, x: np.ndarray, index: tuple, eps: float = 1e-6) -> float:
    """Central difference of scalar f() with respect to x[index] (x is modified and restored)."""
    old = x[index]
    x[index] = old + eps
    plus = f()
    x[index] = old - eps
    minus = f()
    x[index] = old
    return (plus - minus) / (2 * eps)


def sample_indices(shape: tuple, count: int, rng: np.random.Generator) -> list[tuple]:
    """Up to ``count`` distinct positions of an array of ``shape`` (all of them if fewer)."""
    total = int(np.prod(shape))
    flat = rng.choice(total, size=min(count, total), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def assert_close(analytic: float, numeric: float, what: str, rtol: float = 1e-5,
                 atol: float = 1e-7) -> None:
    assert abs(analytic - numeric) <= atol + rtol * max(abs(analytic), abs(numeric)), (
        f"{what}: analytic {analytic!r} vs finite difference {numeric!r}"
    )


def check_layer(layer, input_shape, rng, batch=2, count=40, training=True, reset=None,
                x=None, options=DEFAULT):
    """Check dx and every parameter gradient of a float64 layer against finite differences.

    The scalar is sum(forward(x) * r) for a fixed random r, so backward(r) is its gradient.
    ``reset`` is called before every forward (e.g. to replay a dropout mask); ``options``
    are the plan's (e.g. a ReLU fused into the layer).
    """
    if not layer.built:
        layer.build(input_shape, "cpu", dtype="float64", rng=rng)
    if x is None:
        x = rng.standard_normal((batch, *input_shape))
    reset = reset or (lambda: None)
    reset()
    y = layer.forward(x, training=training, options=options)
    r = rng.standard_normal(y.shape)

    def f():
        reset()
        return float(np.sum(layer.forward(x, training=training, options=options) * r))

    reset()
    layer.forward(x, training=training, options=options)
    dx = layer.backward(r, options)
    grads = {k: np.array(v) for k, v in layer.grads.items()}
    for idx in sample_indices(x.shape, count, rng):
        assert_close(dx[idx], numeric_grad(f, x, idx), f"{layer!r} dx{idx}")
    for name, p in (layer.params if layer.trainable else {}).items():  # (frozen: no grads)
        for idx in sample_indices(p.shape, count, rng):
            assert_close(grads[name][idx], numeric_grad(f, p, idx), f"{layer!r} d{name}{idx}")
    return dx
