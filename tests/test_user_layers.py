"""A user's layer that breaks the layer contract (README, "writing a layer") is refused by a
clear InputError naming its class and what xpcnn expects, not a bare error from deep inside or
a silently wrong model; and a user's subclass of a softmax layer runs as written (the loss
never stands in for a forward it would skip)."""

import warnings

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn import layers as L
from xpcnn.errors import InputError
from xpcnn.layers import Layer
from xpcnn.models import build_layers

DEVICES = pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])

rng = np.random.default_rng(0)
X = rng.normal(size=(8, 6)).astype(np.float32)
Y = np.arange(8) % 4


class Scale(Layer):
    """A right user's layer: one parameter, scaling each feature; what its backward needs
    kept only in a training pass, as xpcnn's own layers keep it (README)."""

    weight_names = ("w",)

    def _build(self, input_shape, rng):
        self._param("w", np.ones(input_shape[-1]))
        return input_shape

    def forward(self, x, training=False, options=None):
        if training:
            self._x = x
        return x * self.params["w"]

    def backward(self, dy, options=None):
        self.grads["w"] = self.xp.sum(dy * self._x, axis=0)
        return dy * self.params["w"]


def _model(layer, device="cpu", last=None):
    m = xpcnn.Sequential([L.Dense(5), layer, L.Dense(4), last or L.Softmax()], seed=0,
                         device=device)
    m.compile(optimizer=xpcnn.optim.SGD(0.1))
    return m


# -- 1: a parameter's gradient of the wrong shape ---------------------------------------------

class ScalarGrad(Scale):
    def backward(self, dy, options=None):
        self.grads["w"] = self.xp.sum(dy * self._x)  # (no axis=: a scalar)
        return dy * self.params["w"]


class PerSampleGrad(Scale):
    def backward(self, dy, options=None):
        self.grads["w"] = dy * self._x  # (not summed over the batch)
        return dy * self.params["w"]


@DEVICES
@pytest.mark.parametrize("cls, got", [(ScalarGrad, r"shape \(\)"),
                                      (PerSampleGrad, r"shape \(8, 5\)")])
def test_a_parameter_gradient_of_another_shape_is_named(device, cls, got):
    """A scalar was broadcast by the optimiser (every element moved alike, silently); a
    per-sample one failed with a bare ValueError inside the update. Nothing is updated."""
    m = _model(cls(), device)
    m.build((6,))
    before = m.get_weights()
    with pytest.raises(InputError, match=rf"layer '(scalargrad|persamplegrad)'.*"
                                         rf"put a gradient of {got}.* in grads\['w'\], "
                                         r"expected shape \(5,\)"):
        m.train_on_batch(X, Y)
    for a, b in zip(before, m.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_right_users_layer_trains_and_a_frozen_ones_gradients_are_not_read():
    m = _model(Scale())
    m.train_on_batch(X, Y)
    m = _model(ScalarGrad(trainable=False))
    m.train_on_batch(X, Y)  # (frozen: its grads are not the optimiser's)


@DEVICES
def test_a_users_layer_whose_backward_never_runs_keeps_what_its_forward_keeps(device):
    """Before every trained layer, a user's layer reading no options (its own, and a subclass
    calling Dense's forward without them) keeps what its forward keeps, as by itself
    (Options.keep_for_backward is for xpcnn's own layers), and the model trains as with
    xpcnn's Dense there, which keeps nothing."""
    own, sub, dense = Scale(trainable=False), MyDense(6, trainable=False), L.Dense(6)
    dense.trainable = False
    models = [xpcnn.Sequential([first, middle, L.Dense(4), L.Softmax()], seed=0, device=device)
              for first, middle in ((own, sub), (Scale(trainable=False), dense))]
    for m in models:
        m.compile(optimizer=xpcnn.optim.SGD(0.1))
        m.fit(X, Y, epochs=2, batch_size=4, verbose=0)
    assert own._x is not None and sub._cache_x is not None and dense._cache_x is None
    for a, b in zip(*(m.get_weights() for m in models), strict=True):
        np.testing.assert_array_equal(a, b)


# -- 2, 3: a user's softmax at the end runs as written ----------------------------------------

class TempSoftmax(L.Softmax):
    def forward(self, x, training=False, options=None):
        return super().forward(x / 100.0, training)

    def backward(self, dy, options=None):
        return super().backward(dy) / 100.0


class MyDense(L.Dense):
    def forward(self, x, training=False, options=None):
        return super().forward(x, training)


class NamedSoftmax(L.Softmax):  # (forward and backward are Softmax's: left to the loss)
    pass


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("last, scale", [(TempSoftmax, 100.0), (MyDense, 1.0)],
                         ids=["Softmax", "Dense"])
def test_a_users_final_softmax_runs_and_is_refused_for_the_loss(last, scale):
    """A Softmax subclass's forward was skipped (predict gave softmax(z), not softmax(z / T));
    a Dense subclass dropping the options applied its softmax twice. Predict runs the layer as
    written; the loss, which takes logits, refuses it by name rather than train on
    probabilities."""
    layers = ([L.Dense(4), TempSoftmax()] if last is TempSoftmax
              else [MyDense(4, activation="softmax")])
    m = xpcnn.Sequential(layers, seed=0)
    m.compile(optimizer=xpcnn.optim.SGD(0.1))
    m.build((6,))
    kernel, bias = m.layers[0].get_weights()
    want = _softmax((X @ kernel + bias) / scale)
    np.testing.assert_allclose(m.predict(X, verbose=0), want, rtol=1e-5, atol=1e-6)
    name = last.__name__
    for call in (lambda: m.fit(X, Y, epochs=1, verbose=0), lambda: m.evaluate(X, Y, verbose=0),
                 lambda: m.train_on_batch(X, Y)):
        with pytest.raises(InputError, match=rf"\({name}, .* computes its softmax in its class's "
                                             r"own forward .* logits"):
            call()
    with pytest.raises(InputError, match=rf"\({name}, .* computes its softmax"):
        m.compile(loss=xpcnn.losses.SoftmaxCrossEntropy(from_logits=False))


def test_a_softmax_subclass_with_softmaxs_passes_is_still_left_to_the_loss():
    m = xpcnn.Sequential([L.Dense(4), NamedSoftmax()], seed=0)
    m.compile(optimizer=xpcnn.optim.SGD(0.1))
    m.fit(X, Y, epochs=1, verbose=0)
    assert m._ends_in_a_softmax_layer() and len(m._plan().steps) == 1


# -- 4: the arrays _build makes ----------------------------------------------------------------

class Float64Param(Scale):
    def _build(self, input_shape, rng):
        self.params["w"] = self.xp.ones(input_shape[-1], dtype=self.xp.float64)
        return input_shape


class NumpyState(Scale):
    weight_names = ("w", "count")

    def _build(self, input_shape, rng):
        self._param("w", np.ones(input_shape[-1]))
        self.state["count"] = np.zeros(1, np.float32)
        return input_shape


@DEVICES
def test_an_array_build_makes_of_another_dtype_or_namespace_is_named(device):
    """A float64 parameter trained in float64 in a float32 model and was saved as float32
    (a resume not bit for bit); a NumPy array under array_api_strict failed at first use."""
    with pytest.raises(InputError, match=r"layer 'float64param' \(Float64Param\)'s _build made "
                                         r"its array 'w' .* of dtype float64, expected .* "
                                         r"float32: make it with self._param\('w'"):
        _model(Float64Param(), device).build((6,))
    m = _model(NumpyState(), device)
    if device == "cpu":
        m.build((6,))  # (a NumPy float32 array is the NumPy backend's own)
    else:
        with pytest.raises(InputError, match=r"'numpystate' \(NumpyState\)'s _build made its "
                                             r"array 'count' a numpy.ndarray"):
            m.build((6,))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_built_in_layers_pass_the_array_check(dtype):
    for name, shape in (("shapes", (32, 32, 1)), ("cifar", (32, 32, 3))):
        m = xpcnn.Sequential(build_layers(name, 3), seed=0, dtype=dtype, device=xs)
        m.build(shape)
        assert all(a.dtype == getattr(xs, dtype) for la in m.layers
                   for a in la._arrays().values())


# -- 5: forward's output ----------------------------------------------------------------------

class ListOut(Layer):
    def forward(self, x, training=False, options=None):
        return [x]

    def backward(self, dy, options=None):
        return dy


class Cropped(Layer):
    def forward(self, x, training=False, options=None):
        return x[:, :3]

    def backward(self, dy, options=None):
        return dy


class IntOut(Layer):
    def forward(self, x, training=False, options=None):
        return self.xp.astype(x, self.xp.int32)

    def backward(self, dy, options=None):
        return dy


@DEVICES
@pytest.mark.parametrize("cls, got", [(ListOut, "a list"),
                                      (Cropped, r"an array of shape \(8, 3\)"),
                                      (IntOut, r"an array of shape \(8, 5\) and dtype int32")])
@pytest.mark.parametrize("call", ["predict", "fit"])
def test_a_forward_returning_no_array_of_its_output_shape_is_named(device, cls, got, call):
    """The next layer failed deep inside (AttributeError on a list, a matmul mismatch)."""
    m = _model(cls(), device)
    with pytest.raises(InputError, match=rf"\({cls.__name__}\)'s forward returned {got}.*: "
                                         r"forward returns one float .* of shape \(8, 5\)"):
        if call == "predict":
            m.predict(X, verbose=0)
        else:
            m.fit(X, Y, epochs=1, verbose=0)


# -- 6: Keras' and PyTorch's habits ------------------------------------------------------------

class KerasCall(Layer):
    def call(self, x, training=None):
        return x


class NoSuperInit(Layer):
    def __init__(self, k=1):
        self.k = k

    def get_config(self):
        return {"k": self.k}


class TorchForward(Layer):
    def forward(self, x):
        return x

    def backward(self, dy, options=None):
        return dy


class TorchBackward(Layer):
    def forward(self, x, training=False, options=None):
        return x

    def backward(self, dy):
        return dy


class Flexible(Layer):  # (*args and extra defaulted parameters take what a model passes)
    def forward(self, x, *args, scale=1.0, **kwargs):
        return x * scale

    def backward(self, dy, options=None, extra=None):
        return dy


def test_keras_and_pytorch_habits_are_named():
    with pytest.raises(InputError, match=r"layer 'kerascall' \(KerasCall\) defines no "
                                         r"forward\(x, training=False, options=DEFAULT\).*Keras' "
                                         r"call\(x, training\) is xpcnn's forward"):
        _model(KerasCall()).fit(X, Y, epochs=1, verbose=0)
    with pytest.raises(InputError, match=r"NoSuperInit.__init__ must call super\(\).__init__\(\)"):
        NoSuperInit()
    with pytest.raises(InputError, match=r"\(TorchForward\)'s forward\(x\) cannot take the "
                                         r"arguments a model passes it: define forward\(self, x, "
                                         r"training=False, options=None\)"):
        _model(TorchForward()).predict(X, verbose=0)
    with pytest.raises(InputError, match=r"\(TorchBackward\)'s backward\(dy\) cannot take .* "
                                         r"define backward\(self, dy, options=None\)"):
        _model(TorchBackward()).fit(X, Y, epochs=1, verbose=0)
    _model(Flexible()).fit(X, Y, epochs=1, verbose=0)


def test_keras_build_and_add_weight_are_named():
    """Keras' build(self, input_shape) override ended in a bare TypeError from inside xpcnn
    at the model's first build ("takes 2 positional arguments but 6 were given"), and
    add_weight in a bare AttributeError; both now name xpcnn's _build and _param. A build
    override that takes what a model passes is a layer's own business, and runs."""
    with pytest.raises(InputError, match=r"layer class Keras overrides build\(self, "
                                         r"input_shape\), Keras' hook: .*_build\(self, "
                                         r"input_shape, rng\).*self\._param\(name, value\)"):
        class Keras(Layer):
            weight_names = ("w",)

            def build(self, input_shape):
                self._param("w", np.ones(input_shape[-1]))

    class AddWeight(Scale):
        def _build(self, input_shape, rng):
            self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")
            return input_shape

    with pytest.raises(InputError, match=r"layer 'addweight' \(AddWeight\) called "
                                         r"add_weight\(\), Keras' way .*self\._param\(name, "
                                         r"value\).*weight_names"):
        _model(AddWeight()).fit(X, Y, epochs=1, verbose=0)

    built = []

    class Counting(Scale):
        def build(self, input_shape, *args, **kwargs):
            built.append(input_shape)
            return super().build(input_shape, *args, **kwargs)

    _model(Counting()).fit(X, Y, epochs=1, verbose=0)
    assert built == [(5,)]


class KerasKwargs(Layer):
    """Keras' style: its own setting, the rest passed on to the base class."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}

    def forward(self, x, training=False, options=None):
        return x * self.factor

    def backward(self, dy, options=None):
        return dy * self.factor


@pytest.mark.parametrize("given, kind, why", [
    ({"input_shape": (6,)}, "Keras'", r"give the model the input shape: "
                                     r"Sequential\(\[\.\.\.\], input_shape="),
    ({"dtype": "mixed_float16"}, "Keras'", r"a layer's dtype is its model's: Sequential\(dtype=.*"
                                          r"compile\(precision='mixed_float16'\)"),
    ({"device": "cuda"}, "PyTorch's", r"a layer's device is its model's"),
    ({"input_dim": 6}, "Keras'", r"give the model the input shape: "
                                 r"Sequential\(\[\.\.\.\], input_shape="),
    ({"batch_input_shape": (None, 6)}, "Keras'", r"give the model the per-sample input "
                                                 r"shape, batch_input_shape\[1:\]"),
    ({"dynamic": True}, "Keras'", r"a user's layer's forward is plain Python"),
])
def test_keras_keywords_passed_on_to_the_base_class_are_named(given, kind, why):
    """Keras' input_shape= and dtype= given to a user's layer passing **kwargs on to
    super().__init__ ended in Python's bare "Layer.__init__() got an unexpected keyword
    argument": refused now as Dense refuses them, naming the user's class and what to pass
    instead."""
    key = next(iter(given))
    with pytest.raises(InputError, match=rf"^KerasKwargs\({key}=.*\): {kind} keyword, which "
                                         r"xpcnn's layers do not take \(KerasKwargs passes it on "
                                         r"to xpcnn's Layer.__init__, which takes name and "
                                         rf"trainable\): {why}"):
        KerasKwargs(2.0, **given)


def test_the_base_class_takes_keras_float32_dtype_as_input_does_in_a_float32_model():
    """Keras' default ``dtype='float32'`` (and ``dynamic=False``), passed on to the base
    class, was refused where ``xpcnn.Input(dtype='float32')`` took it: taken now, as the
    model's own dtype where the model computes in float32; a model of another dtype or
    precision refuses the layer at its build, naming it (it would not compute in float32)."""
    def model(precision="float32", dtype="float32"):
        m = xpcnn.Sequential([L.Dense(4), KerasKwargs(2.0, dtype="float32", dynamic=False,
                                                      name="k"), L.Dense(3), L.Softmax()],
                             dtype=dtype, seed=0)
        m.compile(optimizer="sgd", precision=precision)
        return m

    taken, plain = model(), xpcnn.Sequential([L.Dense(4), KerasKwargs(2.0), L.Dense(3),
                                              L.Softmax()], seed=0)
    plain.compile(optimizer="sgd")
    for m in (taken, plain):
        m.fit(X, Y % 3, epochs=1, verbose=0)
    for a, b in zip(taken.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for precision, dtype, said in (("float32", "float64", "float64, computed in float64"),
                                   ("mixed_float16", "float32", "float32, computed in float16")):
        with pytest.raises(InputError, match=r"layer 'k' \(KerasKwargs\) was made with "
                                             r"dtype='float32'.*its model's weights are "
                                             rf"{said}: .*leave dtype out"):
            model(precision, dtype).build((6,))


def test_the_base_class_takes_keras_defaults_and_names_an_unknown_keyword():
    layer = KerasKwargs(3.0, dtype=None, name="k", trainable=False)  # (Keras' default: taken)
    assert (layer.name, layer.trainable, layer.factor) == ("k", False, 3.0)
    with pytest.raises(TypeError, match=r"KerasKwargs\(\.\.\., units=4\): an unexpected "
                                        r"keyword argument \(KerasKwargs passes it on to xpcnn's "
                                        r"Layer.__init__, which takes name and trainable only\)"):
        KerasKwargs(units=4)
    with pytest.raises(InputError, match=r"KerasKwargs.from_config: the configuration .* "
                                         r"does not fit"):
        KerasKwargs.from_config({"factor": 2.0, "units": 4})


class NumpyLeaky(Layer):
    def forward(self, x, training=False, options=None):
        if training:
            self._x = x
        return self.xp.where(x > 0, x, 0.1 * x)

    def backward(self, dy, options=None):
        return np.where(np.asarray(self._x) > 0, np.asarray(dy), 0.1 * np.asarray(dy))


class NumpyGrad(Scale):
    def backward(self, dy, options=None):
        self.grads["w"] = np.sum(np.asarray(dy) * np.asarray(self._x), axis=0)
        return dy * self.params["w"]


@pytest.mark.parametrize("cls, where", [(NumpyLeaky, "returned a numpy.ndarray for its input"),
                                        (NumpyGrad, r"put a numpy.ndarray in grads\['w'\]")])
def test_a_gradient_of_another_library_is_named_by_its_type(cls, where):
    """A NumPy call in a user's backward on array_api_strict (CuPy alike) was refused by a
    message naming the expected shape and dtype as the wrong ones (they were right), and
    strict warned of comparing dtypes across libraries on the way: the array's type and the
    model's are named now, with self.xp, before any dtype is compared."""
    m = _model(cls(), xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (strict's warning of a dtype of another library)
        with pytest.raises(InputError, match=rf"\({cls.__name__}\)'s backward {where}, where "
                                             r"the model's arrays are array_api_strict.Array: "
                                             r"compute it with self.xp"):
            m.fit(X, Y, epochs=1, verbose=0)


def test_each_classs_backward_runs_once_for_one_forward():
    """A subclass's backward calling super().backward, over two levels of subclasses, trains
    as the base class does; one calling it twice for one forward is refused by name (the
    second call was let through unchecked, failing deep inside)."""
    class Outer(L.Dense):
        def backward(self, dy, options=None):
            return super().backward(dy)

    class Outermost(Outer):
        def backward(self, dy, options=None):
            return super().backward(dy, options)

    class Twice(L.Dense):
        def backward(self, dy, options=None):
            super().backward(dy)
            return super().backward(dy)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8)

    def trained(cls):
        model = xpcnn.Sequential([L.Flatten(), cls(4), L.Dense(3)], input_shape=(2, 2, 1), seed=0)
        model.compile(optimizer="sgd")
        model.fit(x, y, epochs=2, batch_size=4, verbose=0)
        return model.get_weights()

    for a, b in zip(trained(Outermost), trained(L.Dense), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"layer 'twice': backward\(\) needs a forward.*calls "
                                         r"super\(\)\.backward once"):
        trained(Twice)


def _base_functions_called(model):
    """The functions of xpcnn/layers/base.py that one training step of ``model`` calls, by
    name, with their call counts."""
    import cProfile
    import pstats
    from pathlib import Path

    from xpcnn.layers import base

    model.train_on_batch(X, Y)  # (the plan made, the optimiser's slots too)
    profile = cProfile.Profile(builtins=False)
    profile.enable()
    model.train_on_batch(X, Y)
    profile.disable()
    called: dict[str, int] = {}
    for (path, _, name), (_, n, *_) in pstats.Stats(profile).stats.items():
        if Path(path) == Path(base.__file__):
            called[name] = called.get(name, 0) + n
    return called


#: base.py's functions keeping a user's layer's training pass from other threads' inference
#: passes (a copy of the layer, the pending mark and its clearing).
_PROTECTION = {"_user_passes", "_training_pass", "_inference_copy", "_backward_done",
               "end_training_passes"}


def test_a_model_of_xpcnn_layers_calls_nothing_of_the_user_layer_protection_per_step():
    """The protection of a user's layer's training pass from other threads' inference passes
    costs a model of xpcnn's own layers no call a step (was: two more for each layer, 16 in a
    step of 8 layers): its layers' forward and backward wrappers (``checked``) are the plain
    ones. A model with a user's layer calls it (the names are the protection's)."""
    builtin = xpcnn.Sequential([L.Dense(8), L.ReLU(), L.Dense(4), L.Softmax()],
                               input_shape=(6,), seed=0)
    builtin.compile(optimizer="sgd")
    called = _base_functions_called(builtin)
    assert not _PROTECTION & set(called) and called.get("checked"), called
    users = xpcnn.Sequential([L.Dense(8), Scale(), L.Dense(4), L.Softmax()], input_shape=(6,),
                             seed=0)
    users.compile(optimizer="sgd")
    assert {"_user_passes", "_backward_done"} <= set(_base_functions_called(users))


# -- a layer made of sub-layers; what _build returns; from_config; a direct call's dtype ------

class Block(Layer):
    """Keras' and PyTorch's habit: sub-layers built and run by the layer, which xpcnn does not
    track (their weights were silently never trained, nor saved)."""

    def __init__(self, name=None):
        super().__init__(name)
        self.parts = {"act": L.ReLU(), "dense": [L.Dense(4)]}

    def _build(self, input_shape, rng):
        shape = self.parts["dense"][0].build(input_shape, self.backend, self.dtype,
                                             self.compute_dtype, rng)
        return self.parts["act"].build(shape, self.backend, self.dtype, self.compute_dtype, rng)

    def forward(self, x, training=False, options=None):
        return self.parts["act"].forward(self.parts["dense"][0].forward(x, training), training)


class Activation(Layer):  # (a sub-layer without weights: nothing lost)
    def __init__(self, name=None):
        super().__init__(name)
        self.inner = L.ReLU()

    def _build(self, input_shape, rng):
        return self.inner.build(input_shape, self.backend, self.dtype, self.compute_dtype, rng)

    def forward(self, x, training=False, options=None):
        return self.inner.forward(x, training)

    def backward(self, dy, options=None):
        return self.inner.backward(dy)


def test_a_layer_holding_a_built_layer_with_weights_is_refused_where_it_is_built():
    with pytest.raises(InputError, match=r"^layer class Block holds built layers with weights "
                                         r"of their own in self.parts\['dense'\]\[0\]: xpcnn "
                                         r"does not track a layer's sub-layers.*self._param.*"
                                         r"compose the layers in a model \(Sequential"):
        _model(Block()).build((6,))
    _model(Activation()).fit(X, Y, epochs=1, verbose=0)
    first = L.Dense(5)
    reads = Activation()
    reads.first = first  # (a layer of the model: the model trains and saves it)
    xpcnn.Sequential([first, reads, L.Dense(4)], seed=0).build((6,))


class HoldsModel(Layer):
    """A model held in an attribute: its layers are the layer's sub-layers all the same."""

    def _build(self, input_shape, rng):
        self.inner = xpcnn.Sequential([L.Dense(4)], input_shape=input_shape)
        return (4,)

    def forward(self, x, training=False, options=None):
        return self.inner(x)


def test_a_layer_holding_a_model_is_refused_as_holding_its_layers():
    with pytest.raises(InputError, match=r"^layer class HoldsModel holds built layers with "
                                         r"weights of their own in self.inner.layers\[0\]:.*"
                                         r"not where a layer holds it$"):
        _model(HoldsModel()).build((6,))  # (was taken: the Dense inside never trained nor saved)


def test_a_layer_held_by_another_model_alone_is_refused():
    other = xpcnn.Sequential([L.Dense(5)], input_shape=(6,))
    reads = Activation()
    reads.first = other.layers[0]  # (another model's: this one neither trains nor saves it)
    with pytest.raises(InputError, match=r"^layer class Activation holds built layers with "
                                         r"weights of their own in self.first:"):
        xpcnn.Sequential([reads, L.Dense(4)], seed=0).build((6,))  # (was taken, count 0)


class Tied(Layer):
    """A decoder reading its encoder's kernel, transposed: one model holds both."""

    def __init__(self, encoder, name=None):
        super().__init__(name)
        self.encoder = encoder

    def _build(self, input_shape, rng):
        return self.encoder.input_shape

    def forward(self, x, training=False, options=None):
        return x @ self.encoder.params["kernel"].T


def test_a_tied_layer_builds_in_the_model_holding_its_encoder():
    encoder = L.Dense(4)
    m = xpcnn.Sequential([encoder, Tied(encoder)], input_shape=(6,))
    assert m.count_params() == 6 * 4 + 4
    kernel, bias = encoder.params["kernel"], encoder.params["bias"]
    np.testing.assert_allclose(m.predict(X, verbose=0), (X @ kernel + bias) @ kernel.T,
                               rtol=1e-5)


class Tree(Layer):
    def __init__(self, name=None):
        super().__init__(name)
        self.node = {"children": []}
        self.node["children"].append({"parent": self.node})  # (a cycle)

    def forward(self, x, training=False, options=None):
        return x


def test_an_attribute_holding_itself_is_looked_through_once():
    np.testing.assert_array_equal(Tree()(X), X)  # (was a RecursionError at build)


class NoReturn(Layer):
    def _build(self, input_shape, rng):
        self.factor = 2.0  # (and no return: the commonest slip)

    def forward(self, x, training=False, options=None):
        return x * self.factor


class ReturnsShape(NoReturn):
    shape = None

    def _build(self, input_shape, rng):
        return self.shape


class Product(Layer):  # (a merge layer needs a _build: Layer's returns its inputs' shapes)
    multi_input = True

    def forward(self, x, training=False, options=None):
        return x[0] * x[1]


@pytest.mark.parametrize("shape, got", [(None, "None"), (7, "7"), ((None, 6), r"\(None, 6\)"),
                                        ((6, 0), r"\(6, 0\)"), ((), r"\(\)")])
def test_what_build_returns_is_checked_by_name(shape, got):
    layer = NoReturn() if shape is None else type("Shaped", (ReturnsShape,), {"shape": shape})()
    name = "NoReturn" if shape is None else "Shaped"
    with pytest.raises(InputError, match=rf"^layer class {name}'s _build returned {got}"
                                         r"( \(leave out the batch axis.*\))?: it must return "
                                         r"the output's per-sample shape, a tuple of positive "
                                         "ints"):
        layer(X)


def test_a_merge_layer_without_build_is_told_to_define_one():
    inputs = xpcnn.Input((6,))
    with pytest.raises(InputError, match=r"^layer class Product is a merge layer \(multi_input "
                                         r"= True\) and defines no _build: it must define "
                                         r"_build\(self, input_shape, rng\)"):
        Product()([inputs, inputs])


class Poly(Layer):
    """Keras' pattern: from_config turns what JSON gives back (a list) into what the
    constructor takes (a tuple)."""

    def __init__(self, coeffs=(0.0, 1.0), name=None):
        super().__init__(name)
        if not isinstance(coeffs, tuple):
            raise TypeError("coeffs must be a tuple")
        self.coeffs = coeffs

    def get_config(self):
        return {**super().get_config(), "coeffs": self.coeffs}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "coeffs": tuple(config["coeffs"])})

    def forward(self, x, training=False, options=None):
        return sum(c * x**k for k, c in enumerate(self.coeffs))


class Wrapped(Activation):
    """Its inner layer (weightless) saved as a configuration, made again by from_config."""

    def __init__(self, inner=None, name=None):
        super().__init__(name)
        self.inner = inner or L.ReLU()

    def get_config(self):
        return {**super().get_config(), "inner": self.inner.get_config()}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "inner": L.ReLU.from_config(config["inner"])})


def test_a_users_from_config_rebuilds_it_wherever_a_layer_is_rebuilt(tmp_path):
    m = xpcnn.Sequential([xpcnn.Input((6,)), L.Dense(5), Poly((0.0, 1.0, 0.5)),
                          Wrapped(L.ReLU(max_value=2.0)), L.Dense(4)], seed=0)
    m.compile()
    m.save(tmp_path / "m.npz")  # (was refused: Poly "cannot be rebuilt from its get_config()")
    for again in (xpcnn.load_model(tmp_path / "m.npz"), xpcnn.Sequential.from_config(
            m.get_config())):
        assert again.layers[1].coeffs == (0.0, 1.0, 0.5)  # (was: a dict's AttributeError)
        assert again.layers[2].inner.get_config() == m.layers[2].inner.get_config()
    np.testing.assert_array_equal(xpcnn.load_model(tmp_path / "m.npz").predict(X, verbose=0),
                                  m.predict(X, verbose=0))
    inputs = xpcnn.Input((6,))  # (a graph's trial build makes a copy: by from_config too)
    assert xpcnn.Model(inputs, Poly((1.0, 2.0))(inputs)).layers[0].coeffs == (1.0, 2.0)


class PolyRebuildsWrong(Poly):
    @classmethod
    def from_config(cls, config):
        return cls(**config)  # (the JSON list stays a list: refused by the constructor)


def test_the_save_check_makes_the_from_config_round_trip(tmp_path):
    m = xpcnn.Sequential([xpcnn.Input((6,)), PolyRebuildsWrong((0.0, 1.0)), L.Dense(4)])
    with pytest.raises(InputError, match=r"^layer class PolyRebuildsWrong cannot be rebuilt "
                                         r"from its get_config\(\) .*coeffs must be a tuple.*: "
                                         r"define get_config\(\) and from_config\(\) so that "
                                         r"from_config\(get_config\(\)\)"):
        m.save(tmp_path / "m.npz")


class PolyForgets(Poly):
    @classmethod
    def from_config(cls, config):
        return cls(name=config["name"])  # (coeffs forgotten: the default's would load)


def test_the_save_check_compares_what_the_users_from_config_rebuilds(tmp_path):
    m = xpcnn.Sequential([xpcnn.Input((6,)), PolyForgets((1.0, 2.0, 3.0)), L.Dense(4)])
    with pytest.raises(InputError, match=r"^layer class PolyForgets's get_config\(\) \{'name': "
                                         r"'polyforgets', 'coeffs': \[1.0, 2.0, 3.0\]\} "
                                         r"rebuilds a layer whose get_config\(\) is \{'name': "
                                         r"'polyforgets', 'coeffs': \[0.0, 1.0\]\}, so that a "
                                         r"saved model would load another layer: define "
                                         r"get_config\(\) and from_config\(\)"):
        m.save(tmp_path / "m.npz")  # (was saved, loading coeffs (0.0, 1.0))
    assert not (tmp_path / "m.npz").exists()
    m.layers[0].trainable = False  # (the spec's "trainable", not the settings compared)
    m.layers[0].coeffs = (0.0, 1.0)
    m.save(tmp_path / "m.npz")


@pytest.mark.parametrize("layer, x", [
    (L.ReLU(), np.ones((2, 4, 4, 2))), (L.MaxPool2D(2), np.ones((2, 4, 4, 2))),
    (L.Flatten(), np.ones((2, 4, 4, 2))),
    (L.Add(), [np.ones((2, 3), np.float32), np.ones((2, 3))])])
def test_a_float64_batch_is_cast_to_the_layers_float32_as_keras_casts_it(layer, x):
    assert layer(x).dtype == np.float32  # (was float64 for the layers passing values on)


@pytest.mark.parametrize("make, shape", [(L.ReLU, (4, 4, 2)), (lambda: L.MaxPool2D(2), (4, 4, 2)),
                                         (L.Flatten, (4, 4, 2)), (L.Add, [(3,), (3,)])])
@pytest.mark.parametrize("dtype, compute, given, got", [
    ("float64", None, np.float64, np.float64),  # (a float64 model's layer: not float32)
    ("float64", None, np.float32, np.float64),  # (cast up to the layer's, as down)
    ("float32", "float16", np.float16, np.float16),  # (mixed precision's activations: kept)
    ("float32", "float16", np.float64, np.float32)])
def test_a_batch_of_another_float_dtype_is_cast_to_the_layers_own(make, shape, dtype, compute,
                                                                  given, got):
    layer = make()
    layer.build(shape, "cpu", dtype, compute)
    x = ([np.ones((2, *s), given) for s in shape] if layer.multi_input else
         np.ones((2, *shape), given))
    assert layer(x).dtype == got
