"""What users write on top of xpcnn: their layers' get_config, their optimisers' _update, their
train_step overrides and model subclasses, each held to its contract with a clear error."""

import os

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Dense, Flatten, Layer, Softmax
from xpcnn.optim import SGD, Optimizer

STRICT = (xs, xs.Device("device1"))


def _data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), np.arange(n) % 4


# -- a user's layer's get_config: what its file is rebuilt from ---------------------------------


class Extra(Layer):
    def __init__(self, factor=2.0, name=None):
        super().__init__(name)
        self.factor = factor

    def get_config(self):  # a key its constructor does not take
        return {**super().get_config(), "factor": self.factor, "input_dim": 6}

    def forward(self, x, training=False, options=None):
        return x * self.factor

    def backward(self, dy, options=None):
        return dy * self.factor


class Nameless(Layer):
    def __init__(self, k=3, name=None):
        super().__init__(name)
        self.k = k

    def get_config(self):  # no "name", which its constructor takes
        return {"k": self.k}

    def forward(self, x, training=False, options=None):
        return x

    def backward(self, dy, options=None):
        return dy


class TupleOnly(Layer):
    def __init__(self, pair=(1, 2), name=None):
        if not isinstance(pair, tuple):  # a file gives a list: it would not load
            raise TypeError(f"pair must be a tuple, got {type(pair).__name__}")
        super().__init__(name)
        self.pair = pair

    def get_config(self):
        return {**super().get_config(), "pair": self.pair}

    def forward(self, x, training=False, options=None):
        return x

    def backward(self, dy, options=None):
        return dy


class KerasStyle(Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}

    def forward(self, x, training=False, options=None):
        return x * self.factor

    def backward(self, dy, options=None):
        return dy * self.factor


@pytest.mark.parametrize("layer, message", [
    (Extra(), r"^layer class Extra's get_config\(\) gives \['input_dim'\], which its "
              r"constructor does not take"),
    (Nameless(5, name="feat"), r"^layer class Nameless's get_config\(\) does not give 'name', "
                               r"which its constructor takes \(layer 'feat' would load under"),
    (TupleOnly(), r"^layer class TupleOnly cannot be rebuilt from its get_config\(\) "
                  r"\{'name': 'tupleonly', 'pair': \[1, 2\]\} \(InputError: TupleOnly."
                  r"from_config: .*pair must be a tuple"),
], ids=["untaken-key", "no-name", "not-rebuilt"])
def test_user_layer_config_that_cannot_rebuild_it_is_refused_before_any_write(
        tmp_path, layer, message):
    x, y = _data()
    model = xpcnn.Sequential([layer, Dense(4), Softmax()], seed=0)
    model.compile(optimizer=SGD(0.1))
    ck = tmp_path / "run.ckpt.npz"
    # fit refuses before training: no checkpoint it could never resume from, no lost epochs
    with pytest.raises(InputError, match=message):
        model.fit(x, y, epochs=2, verbose=0, checkpoint=str(ck))
    assert not ck.exists() and model.optimizer.iterations == 0
    model.build((6,))
    for write in (model.save, model.save_weights):
        target = tmp_path / "m.npz"
        with pytest.raises(InputError, match=message):
            write(str(target))
        assert not target.exists()


def test_user_layers_whose_config_rebuilds_them_save_and_load(tmp_path):
    x, _ = _data()
    model = xpcnn.Sequential([KerasStyle(3.0, name="scale"), Dense(4), Softmax()], seed=0)
    model.build((6,))
    path = os.path.join(tmp_path, "m.npz")
    model.save(path)
    loaded = xpcnn.load_model(path)
    assert [la.name for la in loaded.layers] == ["scale", "dense", "softmax"]
    assert loaded.layers[0].factor == 3.0
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# -- a user's optimiser: a step the device skips changes nothing ---------------------------------


class NaiveSGD(Optimizer):
    def _update(self, xp, i, p, g, scalars, apply):
        p[...] = p - scalars["lr"] * g  # apply ignored


def _naive_slots():
    class SlotWriter(Optimizer):  # the parameter through _assign, its slot not
        slot_names = ("buf",)

        def _update(self, xp, i, p, g, scalars, apply):
            buf = self.slots["buf"][i]
            buf[...] = 0.9 * buf + g
            self._assign(xp, p, p - scalars["lr"] * buf, apply)

    return SlotWriter


@pytest.mark.parametrize("device", ["cpu", STRICT], ids=["numpy", "strict"])
@pytest.mark.parametrize("kind", ["param", "slot"])
def test_user_optimizer_updating_on_skipped_steps_is_refused_by_name(device, kind):
    cls = NaiveSGD if kind == "param" else _naive_slots()
    x, y = _data()
    model = xpcnn.Sequential([Dense(4), Softmax()], device=device, seed=0)
    model.compile(optimizer=cls(0.1))
    model.build((6,))
    before = model.get_weights()
    with pytest.raises(InputError, match=rf"^{cls.__name__}\._update changed a parameter \(or "
                                         r"its slots\) with apply False.*self\._assign\(xp, "
                                         r"array, new, apply\)"):
        model.train_on_batch(x, y)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing trained
    # (and again: the class is never taken)
    with pytest.raises(InputError, match=cls.__name__):
        model.train_on_batch(x, y)


@pytest.mark.parametrize("device", ["cpu", STRICT], ids=["numpy", "strict"])
def test_user_optimizer_through_assign_keeps_skipped_steps(device):
    class GoodSGD(Optimizer):
        slot_names = ("buf",)

        def _update(self, xp, i, p, g, scalars, apply):
            buf = self.slots["buf"][i]
            self._assign(xp, buf, 0.9 * buf + g, apply)
            self._assign(xp, p, p - scalars["lr"] * buf, apply)

    x, y = _data()
    model = xpcnn.Sequential([Dense(4), Softmax()], device=device, seed=0)
    model.compile(optimizer=GoodSGD(0.1))
    model.train_on_batch(x, y)
    before = model.get_weights()
    bad = y.copy()
    bad[0] = 9  # no class: the step is skipped on the device
    model.train_step(model.backend.asarray(x), model.backend.asarray(bad))
    with pytest.raises(InputError, match="labels in y"):
        model.train_on_batch(x, y)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- a train_step override: fit logs what it returns ---------------------------------------------


@pytest.mark.parametrize("device", ["cpu", STRICT], ids=["numpy", "strict"])
@pytest.mark.parametrize("as_arrays", [True, False], ids=["arrays", "numbers"])
def test_fit_logs_what_an_own_train_step_returns(device, as_arrays):
    class Own(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            if not as_arrays:
                return 1.25, 3
            xp = self.backend.xp
            return (xp.asarray(1.25, device=xb.device),
                    xp.asarray(3, dtype=xp.int64, device=xb.device))

    x, y = _data()
    model = Own([Dense(4), Softmax()], device=device)
    model.compile(optimizer=SGD(0.1))
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert history.history["loss"] == [1.25, 1.25]
    assert history.history["accuracy"] == [0.375, 0.375]


def test_fit_refuses_what_an_own_train_step_returns_where_it_is_not_its_logs():
    x, y = _data()

    def model_of(step, metrics=("accuracy",)):
        cls = type("Own", (xpcnn.Sequential,), {"train_step": step})
        model = cls([Dense(4), Softmax()])
        model.compile(optimizer=SGD(0.1), metrics=list(metrics))
        return model

    with pytest.raises(InputError, match=r"^fit logs what this model's train_step \(which did "
                                         r"not call super\(\).train_step\) returns.*NoneType"):
        model_of(lambda self, xb, yb, sample_weight=None: None).fit(x, y, verbose=0)
    with pytest.raises(InputError, match=r"the loss that this model's train_step .* has shape "
                                         r"\(8,\): expected one number"):
        model_of(lambda self, xb, yb, sample_weight=None: (xb[:, 0], 3)).fit(x, y, verbose=0)
    with pytest.raises(InputError, match=r"does not give the compiled top-k metrics .*return "
                                         r"super\(\).train_step"):
        model_of(lambda self, xb, yb, sample_weight=None: (1.0, 2),
                 ("accuracy", "sparse_top_k_categorical_accuracy")).fit(x, y, verbose=0)


def test_fit_logs_super_train_step_over_what_an_override_returns():
    class Calls(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            super().train_step(xb, yb, sample_weight=sample_weight)
            return 99.0, 0  # super's record is the step's

    x, y = _data()
    ref = xpcnn.Sequential([Dense(4), Softmax()], seed=0)
    model = Calls([Dense(4), Softmax()], seed=0)
    for m in (ref, model):
        m.compile(optimizer=SGD(0.1))
    assert model.fit(x, y, epochs=2, verbose=0).history["loss"] == \
        ref.fit(x, y, epochs=2, verbose=0).history["loss"]


# -- model subclasses --------------------------------------------------------------------------


def test_keras_style_model_subclass_with_call_is_refused_when_made():
    class MyModel(xpcnn.Model):
        def __init__(self):
            super().__init__()
            self.d1 = Dense(8)

        def call(self, x, training=None):
            return self.d1(x)

    class Scaled(xpcnn.Model):  # a graph given, and a call() that would never run
        def __init__(self):
            inp = xpcnn.Input((6,))
            super().__init__(inp, Softmax()(Dense(4)(inp)))

        def call(self, x, training=None):
            return x

    for cls in (MyModel, Scaled):
        with pytest.raises(InputError, match=rf"^{cls.__name__} defines call\(\), Keras' model "
                                             r"subclassing, which xpcnn does not run: an xpcnn "
                                             r"model is a graph of layers.*Sequential"):
            cls()


@pytest.mark.parametrize("base", [xpcnn.Sequential, xpcnn.Model])
def test_keras_metrics_property_of_a_model_subclass_is_refused_when_defined(base):
    """Keras' "Customizing what happens in fit()" guide lists its metric trackers in a
    ``metrics`` property: its subclass failed with a bare "property 'metrics' ... has no
    setter" when constructed."""
    said = (r"^Custom defines metrics \({kind}\), as Keras' custom training loops do with "
            r"their metric trackers: xpcnn's model.metrics is the tuple of metric names "
            r"compile\(metrics=\[...\]\) sets, and custom metric trackers are not supported")
    with pytest.raises(InputError, match=said.format(kind="property")):
        class Custom(base):
            @property
            def metrics(self):
                return []
    with pytest.raises(InputError, match=said.format(kind="function")):
        class Custom(base):  # noqa: F811 (a method as the property)
            def metrics(self):
                return []

    class Stepping(base):  # (train_step alone, as the guide's first model: made as before)
        def train_step(self, xb, yb, sample_weight=None):
            return super().train_step(xb, yb, sample_weight=sample_weight)

    assert Stepping().metrics == ("accuracy",)


def test_model_without_layers_is_not_told_to_add_them():
    with pytest.raises(InputError, match=r"^the model has no layers: an xpcnn.Model is the "
                                         r"graph") as caught:
        xpcnn.Model().build((6,))
    assert "add()" not in str(caught.value).split(";")[0]
    with pytest.raises(InputError, match=r"^the model has no layers: add\(\) some"):
        xpcnn.Sequential().build((6,))


def test_model_name_none_is_the_default_name():
    assert xpcnn.Model(name=None).name == "model"
    assert xpcnn.Sequential(name=None).name == "sequential"

    class Passing(xpcnn.Sequential):  # Keras' name=None, **kwargs pass-through
        def __init__(self, layers=None, name=None, **kwargs):
            super().__init__(layers, name=name, **kwargs)

    assert Passing([Dense(4), Softmax()]).name == "sequential"
    inp = xpcnn.Input((6,))
    assert xpcnn.Model(inp, Softmax()(Dense(4)(inp)), name=None).name == "model"


def test_the_skip_check_leaves_a_user_optimizers_own_attributes_as_they_were():
    """The one-time check of a user's _update (run with apply False on scratch arrays) runs
    on a copy of the optimiser: a count of its own that _update keeps moves once a step (it
    moved twice on the first)."""
    class Counting(Optimizer):
        def __init__(self, lr=0.1):
            super().__init__(lr)
            self.calls = 0

        def _update(self, xp, i, p, g, scalars, apply):
            if i == 0:
                self.calls += 1
            self._assign(xp, p, p - scalars["lr"] * g, apply)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4, 4, 1)).astype(np.float32), np.arange(8) % 4
    model = xpcnn.Sequential([Flatten(), Dense(4)], input_shape=(4, 4, 1))
    optimizer = Counting()
    model.compile(optimizer=optimizer)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert optimizer.iterations == optimizer.calls == 2


# -- a user's callback keeping a state -----------------------------------------------------


def test_a_callback_with_get_state_but_no_set_state_is_refused_before_a_checkpointed_fit(
        tmp_path):
    from xpcnn.callbacks import Callback

    class Counts(Callback):  # (a resumed run would silently start it at 0 again)
        n = 0

        def on_epoch_end(self, epoch, logs=None):
            self.n += 1

        def get_state(self):
            return {"n": self.n}

    x, y = _data()
    model = xpcnn.Sequential([Dense(4), Softmax()], input_shape=(6,), seed=0)
    model.compile(optimizer=SGD(0.1))
    with pytest.raises(InputError, match=r"^callback Counts defines get_state\(\) but not "
                                         r"set_state\(state\): .*define set_state\(self, "
                                         r"state\)"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[Counts()],
                  checkpoint=str(tmp_path / "c.npz"))
    assert model.optimizer.iterations == 0
    model.fit(x, y, epochs=1, verbose=0, callbacks=[Counts()])  # (no checkpoint: taken)
