"""The training entry points: a call that changes a model's training state (fit, compile,
train_on_batch, train_step) from another thread while the model trains is refused clearly
(its own fit's callbacks may call them; inference may run beside them); batch callbacks run
outside xpcnn's compute scope; Keras' positional argument orders are refused, not taken with
another meaning; labels keyed by output name are refused clearly."""

import re
import threading

import numpy as np
import pytest
from nets import gap_net

import xpcnn
import xpcnn.callbacks
from xpcnn.errors import InputError

OTHER_THREAD = (r"^{what} was called while this model's {doing} runs in another thread: a "
                r"model trains \(fit, train_on_batch, train_step, compile\) or moves")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 48)


def compiled() -> xpcnn.Sequential:
    model = xpcnn.Sequential(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    return model


def in_thread(call):
    """What ``call()`` raised in another thread (None where it returned)."""
    got = []

    def run():
        try:
            call()
        except Exception as e:  # noqa: BLE001 (what the other thread got)
            got.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive()
    return got[0] if got else None


def test_training_calls_from_another_thread_while_fit_runs_are_refused(data):
    """train_on_batch from a second thread while fit ran was not refused: the two steps
    interleaved on the same layers and one died with an error from deep inside backward
    (or trained on the other's cached activations). train_on_batch, train_step, compile
    and fit from another thread are refused clearly, naming fit; the fit trains on, with its
    own steps alone; inference (predict, evaluate) from another thread still runs."""
    x, y = data
    model = compiled()
    device = model.backend
    xb, yb = device.asarray(x[:8]), device.asarray(y[:8])
    calls = {
        "train_on_batch": lambda: model.train_on_batch(x[:8], y[:8]),
        "train_step": lambda: model.train_step(xb, yb),
        "compile": lambda: model.compile(optimizer=xpcnn.optim.SGD(0.1)),
        "fit": lambda: model.fit(x, y, epochs=1, verbose=0),
    }
    got, inference = {}, []

    def from_other_threads(batch, logs):
        if batch == 0:
            got.update({what: in_thread(call) for what, call in calls.items()})
            inference.append(in_thread(lambda: model.predict(x[:4])))
            inference.append(in_thread(lambda: model.evaluate(x[:16], y[:16])))

    optimizer = model.optimizer
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[
        xpcnn.callbacks.LambdaCallback(on_train_batch_end=from_other_threads)])
    for what, error in got.items():
        assert isinstance(error, InputError), (what, error)
        assert re.match(OTHER_THREAD.format(what=what, doing="fit"), str(error)), str(error)
    assert inference == [None, None]
    assert model.optimizer is optimizer and optimizer.learning_rate == 0.01
    assert optimizer.iterations == 3  # (fit's steps alone)
    # once fit has returned, each runs from any thread
    for what, call in calls.items():
        assert in_thread(call) is None, what


def test_training_calls_from_fits_own_callbacks_stay_allowed(data):
    """A callback of fit (its own thread) may still train a batch, step and compile, as
    documented; a fit inside fit stays refused."""
    x, y = data
    model = compiled()
    xb, yb = model.backend.asarray(x[:8]), model.backend.asarray(y[:8])
    done = []

    def inside(batch, logs):
        if batch == 0:
            model.train_on_batch(x[:8], y[:8])
            model.train_step(xb, yb)
            model.compile(optimizer=model.optimizer, metrics=["accuracy"])
            done.append(True)
            with pytest.raises(InputError, match="^fit was called while this model's fit runs "
                                                 r"\(from one of its callbacks\)"):
                model.fit(x, y, verbose=0)

    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[
        xpcnn.callbacks.LambdaCallback(on_train_batch_end=inside)])
    assert done == [True]
    assert model.optimizer.iterations == 5


def test_fit_while_another_thread_trains_a_batch_is_refused(data):
    """The other way round: while a thread's train_on_batch runs (held in a subclass's
    train_step), fit and compile from this thread are refused, naming train_on_batch."""
    x, y = data
    inside, release = threading.Event(), threading.Event()

    class Held(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            inside.set()
            assert release.wait(20)
            return super().train_step(xb, yb, sample_weight=sample_weight)

    model = Held(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    other = threading.Thread(target=model.train_on_batch, args=(x[:8], y[:8]))
    other.start()
    try:
        assert inside.wait(60)
        for what, call in (("fit", lambda: model.fit(x, y, verbose=0)),
                           ("compile", lambda: model.compile(optimizer="adam"))):
            with pytest.raises(InputError, match=OTHER_THREAD.format(
                    what=what, doing="train_on_batch")):
                call()
    finally:
        release.set()
        other.join()
    assert model.optimizer.iterations == 1
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model.optimizer.iterations == 4


def test_batch_callbacks_run_outside_the_compute_scope(data):
    """The user's batch hooks (fit's, evaluate's, predict's) ran inside xpcnn's compute scope:
    their own NumPy overflow and invalid-value warnings were silenced and OpenBLAS held to
    one thread, which the README limits to while xpcnn computes. They run as the code around
    fit does; the steps themselves still compute in the scope."""
    from xpcnn.ops import fast_numpy

    blas = fast_numpy.KERNELS._blas.get
    outside = np.geterr(), blas() if blas is not None else None
    seen, in_step = {}, []

    def look(where):
        def hook(*args):
            seen.setdefault(where, (np.geterr(), blas() if blas is not None else None))
        return hook

    class Looking(xpcnn.Sequential):
        def train_step(self, xb, yb, sample_weight=None):
            out = super().train_step(xb, yb, sample_weight=sample_weight)
            in_step.append(np.geterr()["over"])
            return out

    model = Looking(gap_net(), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01))
    x, y = data
    hooks = xpcnn.callbacks.LambdaCallback(
        on_train_batch_begin=look("on_train_batch_begin"),
        on_train_batch_end=look("on_train_batch_end"),
        on_test_batch_begin=look("on_test_batch_begin"),
        on_test_batch_end=look("on_test_batch_end"))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, validation_data=(x, y),
              callbacks=[hooks])
    model.predict(x, callbacks=[xpcnn.callbacks.LambdaCallback(
        on_predict_batch_begin=look("on_predict_batch_begin"),
        on_predict_batch_end=look("on_predict_batch_end"))])
    assert set(seen) == {f"on_{w}_batch_{e}" for w in ("train", "test", "predict")
                         for e in ("begin", "end")}
    for where, state in seen.items():
        assert state == outside, where
    assert in_step and set(in_step) == {"ignore"}  # (the step still computes in the scope)
    assert np.geterr() == outside[0]


@pytest.mark.parametrize("call", [
    "fit(x, y, 16, 2)", "evaluate(x, y, 16, 0, None)", "predict(x, 16, 0, None)",
    "compile('adam', 'sparse_categorical_crossentropy')", "compile('cross_entropy')"])
def test_keras_positional_orders_are_a_type_error_not_another_meaning(data, call):
    """Keras' fit(x, y, batch_size, epochs) silently trained 16 epochs of batch 2 here (fit's
    order was epochs, batch_size), and compile(optimizer, loss) said "unknown loss 'adam'":
    every argument after the data (all of compile's) is keyword-only, and evaluate's and
    predict's after verbose (Keras' next is sample_weight, xpcnn's steps)."""
    x, y = data
    model = compiled()
    with pytest.raises(TypeError, match="positional argument"):
        eval(f"model.{call}", {"model": model, "x": x, "y": y})
    assert model.optimizer.iterations == 0


def test_keras_positional_evaluate_and_predict_mean_what_they_mean_in_keras(data, capsys,
                                                                           shown_bars):
    """evaluate(x, y, batch_size, verbose) and predict(x, batch_size, verbose), Keras' order
    (was: a TypeError, the arguments after the data being keyword-only)."""
    x, y = data
    model = compiled()
    batches = []
    count = xpcnn.callbacks.LambdaCallback(
        on_test_batch_end=lambda step, logs: batches.append("test"),
        on_predict_batch_end=lambda step, logs: batches.append("predict"))
    keyword = model.evaluate(x, y, batch_size=16, verbose=0)
    assert model.evaluate(x, y, 16) == keyword
    assert model.evaluate(x, y, 16, 0) == keyword
    np.testing.assert_array_equal(model.predict(x, 16, 0), model.predict(x, batch_size=16))
    for args in [(x, y, 16, 0), (x, y, 16)]:
        batches.clear()
        model.evaluate(*args, callbacks=[count])
        assert batches == ["test"] * 3  # (48 samples in batches of 16)
    batches.clear()
    model.predict(x, 16, 0, callbacks=[count])
    assert batches == ["predict"] * 3
    capsys.readouterr()
    model.evaluate(x, y, 16, 1)
    assert "3/3" in capsys.readouterr().err


def test_verbose_takes_true_and_false_as_keras_does(data, capsys, shown_bars):
    """Keras' fit(verbose=True/False) is 1/0 (was: refused)."""
    x, y = data
    model = compiled()
    model.fit(x, y, epochs=1, batch_size=16, verbose=False)
    model.evaluate(x, y, verbose=False)
    model.predict(x, verbose=False)
    assert capsys.readouterr().err == ""
    model.evaluate(x, y, verbose=True)
    assert "evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["fit", "validation", "train_on_batch", "evaluate"])
def test_labels_keyed_by_output_name_are_refused_clearly(data, where):
    """Keras' fit(x, {"probs": y}) was told y is "a single value (shape (), dtype object)":
    an xpcnn model has one output, whose labels are one array."""
    x, y = data
    model = compiled()
    keyed = {"probs": y}
    calls = {"fit": lambda: model.fit(x, keyed, verbose=0),
             "validation": lambda: model.fit(x, y, verbose=0, validation_data=(x, keyed)),
             "train_on_batch": lambda: model.train_on_batch(x, keyed),
             "evaluate": lambda: model.evaluate(x, keyed)}
    what = "y_val" if where == "validation" else "y"
    with pytest.raises(InputError, match=(
            rf"^{what} is a dict \(keys \['probs'\]\): an xpcnn model has one output, whose "
            rf"labels are one array, integer labels \(48,\) or one-hot rows \(48, 10\), not "
            rf"keyed by output name; pass {what}\['probs'\] itself$")):
        calls[where]()
    assert model.optimizer.iterations == 0


class _KeyedDataset:
    """A map-style dataset whose label (or weight) of each sample is keyed by output name."""

    def __init__(self, x, y, weighs):
        self.x, self.y, self.weighs = x, y, weighs

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.weighs:
            return self.x[i], self.y[i], {"probs": 1.0}
        return self.x[i], {"probs": self.y[i]}


@pytest.mark.parametrize("where", ["dataset y_i", "dataset w_i", "fit sample_weight",
                                   "evaluate sample_weight", "yielded weights"])
def test_labels_and_weights_keyed_by_output_name_are_refused_clearly_everywhere(data, where):
    """A dataset's (x_i, {"out": y_i}) and sample_weight={"out": w} were refused as "must be
    integer class labels, got dtype object" (or "must hold real numbers") after stacking."""
    x, y = data
    model = compiled()
    keyed = {"probs": np.ones(48)}
    calls = {
        "dataset y_i": lambda: model.fit(_KeyedDataset(x, y, False), verbose=0),
        "dataset w_i": lambda: model.evaluate(_KeyedDataset(x, y, True)),
        "fit sample_weight": lambda: model.fit(x, y, sample_weight=keyed, verbose=0),
        "evaluate sample_weight": lambda: model.evaluate(x, y, sample_weight=keyed),
        "yielded weights": lambda: model.fit(
            ((x[i:i + 8], y[i:i + 8], {"probs": np.ones(8)}) for i in range(0, 48, 8)),
            steps_per_epoch=6, verbose=0)}
    said = {
        "dataset y_i": r"the y_i that x\[\d+\] returns is a dict \(keys \['probs'\]\): an "
                       r"xpcnn model has one output, whose label y_i is one integer or one "
                       r"one-hot row, not keyed by output name; pass y_i\['probs'\] itself$",
        "dataset w_i": r"the w_i that x\[0\] returns is a dict \(keys \['probs'\]\): .* whose "
                       r"sample weight w_i is one number, .*; pass w_i\['probs'\] itself$",
        "fit sample_weight": r"^sample_weight is a dict \(keys \['probs'\]\): an xpcnn model "
                             r"has one output, whose sample weights are one array \(48,\), not "
                             r"keyed by output name; pass sample_weight\['probs'\] itself$",
        "yielded weights": r"is a dict \(keys \['probs'\]\): .* sample weights are one array "
                           r"\(8,\), .*; pass the array under 'probs' itself$"}
    said["evaluate sample_weight"] = said["fit sample_weight"]
    with pytest.raises(InputError, match=said[where]):
        calls[where]()
    assert model.optimizer.iterations == 0


def _calls(what, model, x, y, callbacks):
    """One evaluate or predict of ``x`` (batches of 8) with ``callbacks``: the batches it ran
    (predict: its rows / 8)."""
    if what == "predict":
        return len(model.predict(x, batch_size=8, callbacks=callbacks)) // 8
    ran = []
    model.evaluate(x, y, batch_size=8, callbacks=[*callbacks, xpcnn.callbacks.LambdaCallback(
        on_test_batch_end=lambda batch, logs=None: ran.append(batch))])
    return len(ran)


@pytest.mark.parametrize("what", ["evaluate", "predict"])
def test_a_stop_request_reaches_only_the_call_whose_callback_made_it(data, what):
    """The flag was the model's: thread B's callback setting model.stop_predicting = True
    truncated thread A's predict of the same model (2048 rows came back as 8), and each call's
    reset at its start cancelled another thread's request. Each call reads its own thread's."""
    x, y = data
    model = compiled()
    flag, hook = {"evaluate": ("stop_evaluating", "on_test_batch_end"),
                  "predict": ("stop_predicting", "on_predict_batch_end")}[what]
    paused, resumed = threading.Event(), threading.Event()

    def pause(stop):
        """A callback that, after the first batch, sets the flag to ``stop`` and waits for
        the other thread's call to end."""
        def end(batch, logs=None):
            if batch == 0:
                setattr(model, flag, stop)
                paused.set()
                assert resumed.wait(60)
        return xpcnn.callbacks.LambdaCallback(**{hook: end})

    def stop_at_once(batch, logs=None):
        setattr(model, flag, True)

    for stop, other, expected in [(False, [xpcnn.callbacks.LambdaCallback(
            **{hook: stop_at_once})], 6), (True, [], 1)]:
        paused.clear(), resumed.clear()
        got = []
        t = threading.Thread(target=lambda got=got, stop=stop: got.append(
            _calls(what, model, x, y, [pause(stop)])))
        t.start()
        assert paused.wait(60)
        # (meanwhile in this thread: a call stopped by its own callback, or one left to run)
        assert _calls(what, model, x, y, other) == (1 if other else 6)
        resumed.set()
        t.join(60)
        assert got == [expected]


def test_fits_callbacks_run_in_keras_order_with_its_own_history_bar_and_backup(tmp_path):
    """fit's set-up of its callbacks (fit's own step): the user's first, then the History and
    the bar (a user's one of each taken as fit's own), the BackupAndRestore last."""
    from xpcnn.callbacks import BackupAndRestore, Callback, History, ProgbarLogger

    mine, bar, other = History(), ProgbarLogger(), Callback()
    given = [bar, mine, other]
    ordered, backups, history, progbar = xpcnn.Sequential._fit_callbacks(
        given, tmp_path / "c.npz", "epoch", False, 1)
    assert ordered[:3] == [other, mine, bar] and backups == ordered[3:]
    assert len(backups) == 1 and isinstance(backups[0], BackupAndRestore)
    assert history is mine and progbar is bar and given == [bar, mine, other]
    ordered, backups, history, progbar = xpcnn.Sequential._fit_callbacks(
        None, None, "epoch", False, 0)
    assert ordered == [history] and isinstance(history, History) and not backups
    assert progbar is None
    with pytest.raises(InputError, match="fit takes one BackupAndRestore"):
        xpcnn.Sequential._fit_callbacks([BackupAndRestore(tmp_path / "b.npz")],
                                        tmp_path / "c.npz", "epoch", False, 0)


def test_models_supply_every_hook_that_training_needs(data):
    """NetworkHooks, the one list of what the trainer and its step need from the network:
    a Sequential and a functional Model define each (the trainer alone does not)."""
    from nets import add_relu_net

    from xpcnn.training.step import NetworkHooks, TrainingStep

    hooks = {*vars(NetworkHooks), *NetworkHooks.__annotations__}
    assert {"backend", "layers", "_logits", "_backward", "_plan", "_builds"} <= hooks
    chain, graph = compiled(), xpcnn.Model(*add_relu_net(), seed=0)
    for model in (chain, graph):
        model.build((None, 8, 8, 3))
        assert isinstance(model, NetworkHooks)  # (a runtime protocol: it has every member)
    assert not isinstance(TrainingStep(), NetworkHooks)
