"""A user's subclass of a built-in optimiser or layer trains as written: the fast paths that
stand in for a built-in's methods (an optimiser's fused update, the plan's fused ReLU and the
ReLU gradient handed to the next layer) are left out where a subclass overrides those
methods, on every backend."""

import contextlib

import array_api_compat.numpy as xpn
import array_api_strict as xs
import numpy as np
import pytest
from cuda_emulator import compiler

import xpcnn
from xpcnn import layers as L
from xpcnn import optim
from xpcnn.metrics import SparseTopKCategoricalAccuracy
from xpcnn.ops.fast_numpy import NumpyKernels

# -- optimisers -------------------------------------------------------------------------------

BUILT_INS = [(optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
             (optim.Adam, dict(lr=0.01, amsgrad=True)), (optim.AdamW, dict(lr=0.01)),
             (optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True))]


def _signed(cls):
    """``cls`` stepping on the sign of each gradient: a subclass overriding ``_update`` alone."""

    class Signed(cls):
        def _update(self, xp, i, p, g, scalars, apply):
            super()._update(xp, i, p, xp.sign(g), scalars, apply)

    Signed.__name__ = Signed.__qualname__ = f"Signed{cls.__name__}"
    return Signed


@contextlib.contextmanager
def _kernels(path):
    """The namespace and kernels of a path: array_api_strict's standard formulas, NumPy's
    fused updates, or CuPy's on the CUDA emulator."""
    if path != "emulated-cupy":
        yield (xs, None) if path == "strict" else (xpn, NumpyKernels())
        return
    if compiler() is None:
        pytest.skip("the CUDA emulator needs a C++ compiler")
    from cuda_emulator import load_emulated_fast_cupy, restore

    module, saved = load_emulated_fast_cupy()
    try:
        yield xpn, module.KERNELS
    finally:
        restore(saved)


def _run(opt, xp, kernels, params, grads_seq):
    mine = [xp.asarray(p.copy()) for p in params]
    for grads in grads_seq:
        opt.step(xp, mine, [xp.asarray(g) for g in grads], kernels)
    return [np.asarray(p) for p in mine]


@pytest.mark.parametrize("cls, settings", BUILT_INS, ids=[c.__name__ for c, _ in BUILT_INS])
@pytest.mark.parametrize("path", ["strict", "numpy", "emulated-cupy"])
def test_an_optimizer_subclass_overriding_update_trains_by_it(cls, settings, path, rng):
    """A subclass of a built-in overriding ``_update`` alone (here: the built-in's update on
    the gradients' signs) steps by its own ``_update`` where the kernels offer fused updates,
    as under array_api_strict (was: NumPy's and CuPy's fused update of the built-in ran, on
    the raw gradients, and the override was silently ignored). The same steps as the built-in
    given the signs."""
    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    grads_seq = [[rng.standard_normal(p.shape) for p in params] for _ in range(4)]
    with _kernels(path) as (xp, kernels):
        ours = _run(_signed(cls)(**settings), xp, kernels, params, grads_seq)
    want = _run(cls(**settings), xs, None, params, [[np.sign(g) for g in gs] for gs in grads_seq])
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


class _Counting(NumpyKernels):
    """NumPy's kernels, counting the fused SGD updates they run."""

    calls = 0

    def sgd_update(self, *args):
        type(self).calls += 1
        return super().sgd_update(*args)


def test_subclasses_that_keep_or_replace_both_updates_keep_the_fused_path(rng):
    """The fused update still runs for a subclass that overrides neither (a constructor of its
    own) and for one that overrides both ``_update`` and ``_fused_update`` (its own then)."""

    class NamedSGD(optim.SGD):
        def __init__(self, lr=0.1, momentum=0.9):
            super().__init__(lr, momentum)

    class BothSGD(optim.SGD):
        fused = 0

        def _update(self, xp, i, p, g, scalars, apply):
            raise AssertionError("the fused update is this class's own")

        def _fused_update(self, kernels, params, grads, scalars, apply):
            BothSGD.fused += 1
            return super()._fused_update(kernels, params, grads, scalars, apply)

    params = [rng.standard_normal((3, 4))]
    grads = [[rng.standard_normal((3, 4))] for _ in range(2)]
    _Counting.calls = 0
    _run(NamedSGD(), xpn, _Counting(), params, grads)
    assert _Counting.calls == 2
    _run(BothSGD(0.1), xpn, _Counting(), params, grads)
    assert BothSGD.fused == 2 and _Counting.calls == 4


def test_a_model_trains_by_the_subclass_on_every_path():
    """The hunter's case: a SignSGD(SGD) moves every kernel element by exactly lr in
    train_on_batch with the fast path on (was: plain SGD's steps there), as with it off."""

    class SignSGD(optim.SGD):
        def _update(self, xp, i, p, g, scalars, apply):
            self._assign(xp, p, p - scalars["lr"] * xp.sign(g), apply)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 2)), rng.integers(0, 4, 8)
    moved = []
    for fast in (True, False):
        xpcnn.backend.set_fast_path(fast)
        try:
            m = xpcnn.Sequential([L.Conv2D(3, 3), L.Flatten(), L.Dense(4)], input_shape=(6, 6, 2),
                                 seed=0)
            m.compile(optimizer=SignSGD(0.1))
            before = m.get_weights()[0]
            m.train_on_batch(x, y)
            moved.append(np.abs(m.get_weights()[0] - before))
        finally:
            xpcnn.backend.set_fast_path(True)
    for step in moved:
        np.testing.assert_allclose(step, 0.1, rtol=1e-6)


# -- layers: the plan's fusions ---------------------------------------------------------------


def _leaky_forward(self, x, training=False, options=None):
    self._x = x
    return self.xp.where(x > 0, x, 0.1 * x)


def _leaky_backward(self, dy, options=None):
    x, self._x = self._x, None
    return self.xp.where(x > 0, dy, 0.1 * dy)


class SubclassedLeakyReLU(L.ReLU):
    """A user's leaky ReLU written as a ReLU subclass (its forward and backward its own)."""

    forward = _leaky_forward
    backward = _leaky_backward


class StandaloneLeakyReLU(L.Layer):
    """The same on the base class: nothing the plan could fuse (the reference)."""

    forward = _leaky_forward
    backward = _leaky_backward


class ForgetfulBatchNorm2D(L.BatchNorm2D):
    """A typical override that calls the base class's passes without the plan's options."""

    def forward(self, x, training=False, options=None):
        return super().forward(x, training)

    def backward(self, dy, options=None):
        return super().backward(dy)


class ForgetfulMaxPool2D(L.MaxPool2D):
    def forward(self, x, training=False, options=None):
        return super().forward(x, training)

    def backward(self, dy, options=None):
        return super().backward(dy)


class ForgetfulDense(L.Dense):
    def forward(self, x, training=False, options=None):
        return super().forward(x, training)

    def backward(self, dy, options=None):
        return super().backward(dy)


CASES = {
    # (the user's ReLU after a Conv2D: was fused into it, a plain ReLU computed there)
    "relu-subclass-after-conv": (
        lambda: [L.Conv2D(3, 3), SubclassedLeakyReLU(), L.Flatten(), L.Dense(4)],
        lambda: [L.Conv2D(3, 3), StandaloneLeakyReLU(), L.Flatten(), L.Dense(4)]),
    # (before a max pool: was told to leave its gradient to the pool, which masked it as a
    # plain ReLU's)
    "relu-subclass-before-pool": (
        lambda: [L.Conv2D(3, 3), L.MaxPool2D(1), SubclassedLeakyReLU(), L.MaxPool2D(1),
                 L.Flatten(), L.Dense(4)],
        lambda: [L.Conv2D(3, 3), L.MaxPool2D(1), StandaloneLeakyReLU(), L.MaxPool2D(1),
                 L.Flatten(), L.Dense(4)]),
    # (a BatchNorm2D subclass: the ReLU after it was fused into it, then lost)
    "batchnorm-subclass-before-relu": (
        lambda: [L.Conv2D(3, 3), ForgetfulBatchNorm2D(), L.ReLU(), L.Flatten(), L.Dense(4)],
        lambda: [L.Conv2D(3, 3), L.BatchNorm2D(), L.ReLU(), L.Flatten(), L.Dense(4)]),
    "dense-subclass-before-relu": (
        lambda: [L.Flatten(), ForgetfulDense(5), L.ReLU(), L.Dense(4)],
        lambda: [L.Flatten(), L.Dense(5), L.ReLU(), L.Dense(4)]),
    # (a max pool subclass after a ReLU: the ReLU's gradient was left to it, and lost)
    "pool-subclass-after-relu": (
        lambda: [L.Conv2D(3, 3), L.ReLU(), ForgetfulMaxPool2D(2), L.Flatten(), L.Dense(4)],
        lambda: [L.Conv2D(3, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(4)]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_a_layer_subclass_overriding_its_passes_is_not_fused(case, device):
    """A user's subclass overriding forward or backward is neither fused away (a ReLU
    subclass) nor handed a neighbour's work (a ReLU to apply, a ReLU's gradient, to skip or to
    apply) that its own passes may not do: predict and three SGD steps equal those of the
    same layers written so that nothing could be fused (was: predict off by up to 2, and the
    user's forward and backward never ran)."""
    subclassed, reference = CASES[case]
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 6, 6, 2)), rng.integers(0, 4, 12)
    models = []
    for layers in (subclassed, reference):
        m = xpcnn.Sequential(layers(), input_shape=(6, 6, 2), seed=0, device=device,
                             dtype="float64")
        m.compile(optimizer=optim.SGD(0.1, momentum=0.9))
        models.append(m)
    ours, want = models
    outs = ours.layer_outputs(x)  # (every layer by itself: the user's layers as written)
    np.testing.assert_allclose(ours.predict(x), np.asarray(outs[-1]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ours.predict(x), want.predict(x), rtol=1e-12, atol=1e-14)
    for step in range(3):
        batch = slice(4 * step, 4 * step + 4)
        a, b = ours.train_on_batch(x[batch], y[batch]), want.train_on_batch(x[batch], y[batch])
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(ours.get_weights(), want.get_weights(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_plain_layers_and_subclasses_keeping_the_passes_still_fuse():
    """The rule leaves built-in layers fused, and a subclass that keeps the built-in's passes
    (a constructor or a setting of its own) too."""

    class NamedReLU(L.ReLU):
        def __init__(self, name="named_relu"):
            super().__init__(name=name)

    class NamedConv2D(L.Conv2D):
        pass

    m = xpcnn.Sequential([NamedConv2D(3, 3), NamedReLU(), L.Conv2D(3, 3), L.ReLU(),
                          L.MaxPool2D(1), L.Flatten(), L.Dense(4), L.ReLU(), L.Dense(4)],
                         input_shape=(6, 6, 2), seed=0)
    plan = m._plan()
    assert [type(s.layer).__name__ for s in plan.steps] == [
        "NamedConv2D", "Conv2D", "MaxPool2D", "Flatten", "Dense", "Dense"]
    fused = [s.layer.name for s in plan.steps if s.options.fused_relu]
    assert fused == [m.layers[0].name, m.layers[2].name, m.layers[6].name]
    assert plan.options(m.layers[4]).apply_input_relu_grad
    assert plan.options(m.layers[2]).skip_relu_grad
    sub = xpcnn.Sequential([L.Conv2D(3, 3), SubclassedLeakyReLU(), L.Flatten(), L.Dense(4)],
                           input_shape=(6, 6, 2), seed=0)
    assert not any(s.options != type(s.options)(need_input_grad=s.options.need_input_grad)
                   for s in sub._plan().steps)


def test_defining_class_names_the_class_whose_attribute_a_class_uses():
    """One helper answers "which class of the MRO defines this" (was: the loop written out in
    six modules): the nearest definer, a mixin's included, None where none does; and
    ``defined_by`` asks it of an instance's class unless the instance itself sets it."""
    from xpcnn.checks import defined_by, defining_class

    class Mixin:
        def get_config(self):
            return {}

    class Mine(Mixin, L.ReLU):
        pass

    class Leaky(L.ReLU):
        def forward(self, x, training=False, options=None):
            return super().forward(x, training)

    assert defining_class(Mine, "get_config") is Mixin
    assert defining_class(Mine, "forward") is L.ReLU
    assert defining_class(Leaky, "forward") is Leaky and defining_class(Leaky, "call") is None
    assert defining_class(optim.SGD, "_update") is optim.SGD
    relu = Leaky()
    assert defined_by(relu, "forward") is Leaky and defined_by(relu, "backward") is L.ReLU
    relu.backward = lambda dy, options=None: dy  # (set on the instance: the instance)
    assert defined_by(relu, "backward") is relu


# -- model subclasses: a train_step override under train_on_batch, as under fit ---------------

_TOB_X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
_TOB_Y = np.arange(16) % 4


def _four_class(cls=xpcnn.Sequential, metrics=None):
    model = cls([L.Dense(5), L.ReLU(), L.Dense(4), L.Softmax()], seed=0)
    metrics = ["accuracy", SparseTopKCategoricalAccuracy(2, "top2")] if metrics is None else \
        metrics
    model.compile(optimizer=optim.SGD(0.1), metrics=metrics)
    return model


class _KerasLogs(xpcnn.Sequential):
    """Keras' guide's train_step: super's step, and a dict of logs returned."""

    def train_step(self, xb, yb, sample_weight=None):
        loss, correct = super().train_step(xb, yb, sample_weight=sample_weight)
        return {"loss": loss, "accuracy": correct, "extra": 0.5}


class _Triple(xpcnn.Sequential):
    def train_step(self, xb, yb, sample_weight=None):
        loss, correct = super().train_step(xb, yb, sample_weight=sample_weight)
        return loss, correct, correct


@pytest.mark.parametrize("cls", [_KerasLogs, _Triple])
def test_train_on_batch_takes_what_fit_takes_from_a_train_step_calling_super(cls):
    """A train_step that calls super().train_step and returns something else (Keras' dict of
    logs, three numbers): fit logs super's record of the step, and so does train_on_batch,
    equal to a plain model's, its top-k metric too (was: refused by train_on_batch after the
    step had updated the weights, so that a retry trained twice)."""
    w = np.linspace(0.5, 1.5, 16).astype(np.float32)
    model, plain = _four_class(cls), _four_class()
    for _ in range(2):
        got = model.train_on_batch(_TOB_X, _TOB_Y, sample_weight=w, return_dict=True)
        want = plain.train_on_batch(_TOB_X, _TOB_Y, sample_weight=w, return_dict=True)
        assert got == want and set(got) == {"loss", "accuracy", "top2"}
    assert model.optimizer.iterations == plain.optimizer.iterations == 2
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    logs = [{k: v for k, v in m.fit(_TOB_X, _TOB_Y, epochs=1, batch_size=16, verbose=0,
                                   shuffle=False).history.items() if k != "seconds"}
            for m in (_four_class(cls), _four_class())]
    assert logs[0] == logs[1] and set(logs[0]) == {"loss", "accuracy", "top2"}


def _unchanged(model, before, iterations):
    assert model.optimizer.iterations == iterations
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_on_batch_refuses_a_keras_train_step_of_data_before_any_step():
    """Keras 3's ``train_step(self, data)``: train_on_batch refuses it with fit's message, the
    model as it was (was: a bare TypeError from inside the call)."""

    class KerasData(xpcnn.Sequential):
        def train_step(self, data):
            x, y = data
            return super().train_step(x, y)

    model = _four_class(KerasData, metrics=["accuracy"])
    model.build((6,))
    before = model.get_weights()
    for call in (lambda: model.train_on_batch(_TOB_X, _TOB_Y),
                 lambda: model.fit(_TOB_X, _TOB_Y, epochs=1, verbose=0)):
        with pytest.raises(xpcnn.errors.InputError,
                           match=r"^this model's train_step takes 1 argument\(s\) \(data\); "
                                 r"fit calls it as train_step\(xb, yb\) \(train_on_batch too\)"):
            call()
        _unchanged(model, before, 0)


def test_train_on_batch_refuses_a_train_step_of_its_own_returning_no_pair_as_fit_does():
    """A train_step that runs a step of its own (no super().train_step) is logged by what it
    returns, by fit and train_on_batch alike: a pair, else refused by both, naming what it
    returned (that step's update is its own: nothing xpcnn can know before it)."""

    class OwnStep(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            return self.returns

    model = _four_class(OwnStep, metrics=["accuracy"])
    model.returns = (2.0, 4)
    assert model.train_on_batch(_TOB_X, _TOB_Y) == [2.0, 0.25]
    before = model.get_weights()
    model.returns = {"loss": 2.0, "accuracy": 4}
    with pytest.raises(xpcnn.errors.InputError,
                       match=r"^train_on_batch, as fit, takes what this model's train_step "
                             r"\(which did not call super\(\).train_step\) returns as the "
                             r"batch's \(loss, correct count\); it returned dict"):
        model.train_on_batch(_TOB_X, _TOB_Y)
    with pytest.raises(xpcnn.errors.InputError, match=r"^fit logs what this model's train_step "
                                                      r"\(which did not call super"):
        model.fit(_TOB_X, _TOB_Y, epochs=1, verbose=0)
    _unchanged(model, before, 0)
