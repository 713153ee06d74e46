"""Top-k accuracy metrics (xpcnn.metrics), as Keras 3 users write them: values against
torch.topk on the same logits (ties at the boundary counting as in, as TensorFlow's in_top_k),
every path the counts take (training steps, evaluate, validation, train_on_batch,
array_api_strict), the names in the logs and callbacks, files, and the errors.

The CUDA-graph and emulated-CuPy paths are in tests/test_cuda_graphs.py, several ranks in
tests/test_distributed.py, a mid-epoch resume in tests/test_resume.py."""

import array_api_strict as xs
import numpy as np
import pytest

import xpcnn
from xpcnn import optim
from xpcnn.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import Dense, Flatten, ReLU
from xpcnn.metrics import SparseTopKCategoricalAccuracy, TopKCategoricalAccuracy
from xpcnn.ops.softmax import top_k_counts
from xpcnn.saving.npz import CONFIG_KEY, decode_json

CLASSES = 7


def reference_in_top_k(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: the target's score is at least the k-th largest (torch.topk: ties at the
    boundary count as in) and finite. (A test that calls it skips without PyTorch, the
    others run.)"""
    torch = pytest.importorskip("torch")
    t = torch.tensor(z, dtype=torch.float64)
    kth = torch.topk(t, min(k, t.shape[1]), dim=1).values[:, -1]
    target = t[torch.arange(t.shape[0]), torch.tensor(labels)]
    return ((target >= kth) & torch.isfinite(target)).numpy()


def tied_logits(rng, n=300, classes=CLASSES):
    """Scores of a few levels (many ties, at every boundary), some targets not finite."""
    z = rng.integers(-2, 3, (n, classes)).astype(np.float64)
    labels = rng.integers(0, classes, n)
    z[:5, :] = rng.normal(size=(5, classes))  # (and some rows without ties)
    z[5, labels[5]], z[6, labels[6]], z[7, labels[7]] = np.nan, np.inf, -np.inf
    z[8, (labels[8] + 1) % classes] = np.inf  # (an infinite score that is not the target's)
    return z, labels


@pytest.mark.parametrize("namespace", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("one_hot", [False, True])
def test_the_counts_are_torch_topks_with_ties_counting_as_in(namespace, dtype, one_hot):
    import array_api_compat.numpy as xpn

    xp = xpn if namespace == "numpy" else xs
    rng = np.random.default_rng(0)
    z, labels = tied_logits(rng)
    ks = tuple(range(1, CLASSES + 2))  # (k = classes and beyond: every finite target)
    y = np.eye(CLASSES)[labels] if one_hot else labels
    counts = top_k_counts(xp, xp.asarray(z.astype(dtype)), xp.asarray(y), ks,
                          xp.float64 if dtype == "float64" else xp.float32)
    expected = [reference_in_top_k(z.astype(dtype), labels, k).sum() for k in ks]
    np.testing.assert_array_equal(np.asarray(counts), expected)
    assert expected[0] < expected[2] < expected[-1] == 300 - 3  # (ties made a difference...)
    assert expected[CLASSES - 1] == expected[CLASSES]  # (...the non-finite targets never)


def test_a_hand_made_tie_case():
    import array_api_compat.numpy as xpn

    z = np.array([[1, 3, 3, 3, 0],     # target 1: nothing above it
                  [1, 3, 3, 3, 0],     # target 0: three above it, tied with each other
                  [1, 3, 3, 3, 0],     # target 4: four above it
                  [np.nan, 2, 1, 0, 0],  # target 2: one above it (a NaN is above nothing)
                  [0, 0, np.nan, 0, 0],  # target 2: NaN, never
                  [0, np.inf, 0, 0, 0],  # target 1: infinite, never
                  [-np.inf, 0, 0, 0, 0]])  # target 0: -inf, never
    labels = np.array([1, 0, 4, 2, 2, 1, 0])
    rows = [top_k_counts(xpn, z[i:i + 1], labels[i:i + 1], (1, 2, 3, 4, 5), xpn.float64)
            for i in range(len(labels))]
    assert np.asarray(rows).tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1],
                                         [0, 1, 1, 1, 1], [0] * 5, [0] * 5, [0] * 5]
    # one-hot rows: the target is the row's first largest entry
    one_hot = np.array([[0, 0.2, 0, 0.8, 0]])
    assert np.asarray(top_k_counts(xpn, z[:1], one_hot, (1, 2), xpn.float64)).tolist() == [1, 1]


# -- a model's metrics ------------------------------------------------------------------------

RNG = np.random.default_rng(3)
X = RNG.normal(size=(36, 2, 2, 3))
Y = RNG.integers(0, CLASSES, 36)
METRICS = ["sparse_top_k_categorical_accuracy", "acc",
           SparseTopKCategoricalAccuracy(k=2, name="top2"),
           TopKCategoricalAccuracy(k=1, name="top1"), "top_k_categorical_accuracy"]
NAMES = ("loss", "sparse_top_k_categorical_accuracy", "acc", "top2", "top1",
         "top_k_categorical_accuracy")


def logits_model(metrics=METRICS, lr=0.0, device="cpu"):
    """Logits out (predict returns them), float64; a rate of 0 keeps the weights, so that
    every training step's logits are predict's."""
    model = xpcnn.Sequential([Flatten(), Dense(8), ReLU(), Dense(CLASSES)], seed=0,
                             dtype="float64", device=device)
    model.compile(optimizer=optim.SGD(lr), metrics=metrics)
    return model


def expected_logs(model, x, y):
    z = model.predict(x)
    values = {"top2": 2, "top1": 1, "acc": 1}
    return {name: reference_in_top_k(z, y, values.get(name, 5)).mean() for name in NAMES[1:]}


def test_fit_evaluate_and_train_on_batch_log_each_metric_under_its_name_in_order():
    model = logits_model()
    assert model.metrics_names == NAMES
    history = model.fit(X, Y, epochs=2, batch_size=8, verbose=0, validation_data=(X[:20], Y[:20]))
    train, val = expected_logs(model, X, Y), expected_logs(model, X[:20], Y[:20])
    assert list(history.history) == [*NAMES, *(f"val_{n}" for n in NAMES), "seconds"]
    for name in NAMES[1:]:
        np.testing.assert_allclose(history.history[name], [train[name]] * 2, rtol=1e-15)
        np.testing.assert_allclose(history.history[f"val_{name}"], [val[name]] * 2, rtol=1e-15)
    logs = model.evaluate(X[:20], Y[:20], batch_size=6, return_dict=True)
    assert list(logs) == list(NAMES)
    assert {n: logs[n] for n in NAMES[1:]} == pytest.approx(val, rel=1e-15)
    values = model.evaluate(X, Y)
    assert values[1:] == pytest.approx([train[n] for n in NAMES[1:]], rel=1e-15)
    step = model.train_on_batch(X, Y, return_dict=True)
    assert list(step) == list(NAMES)
    assert {n: step[n] for n in NAMES[1:]} == pytest.approx(train, rel=1e-15)
    assert model.train_on_batch(X, Y)[1:] == pytest.approx([train[n] for n in NAMES[1:]])


def test_one_hot_targets_and_integer_labels_give_the_same_values_under_both_names():
    sparse = logits_model(["sparse_top_k_categorical_accuracy", "top_k_categorical_accuracy"])
    one_hot = np.eye(CLASSES)[Y]
    a = sparse.evaluate(X, Y, return_dict=True)
    b = sparse.evaluate(X, one_hot, return_dict=True)
    assert a == pytest.approx(b, rel=1e-15)
    assert a["sparse_top_k_categorical_accuracy"] == a["top_k_categorical_accuracy"] > 0
    history = logits_model(["top_k_categorical_accuracy"]).fit(X, one_hot, batch_size=8,
                                                                verbose=0)
    assert history.history["top_k_categorical_accuracy"] == [
        pytest.approx(expected_logs(sparse, X, Y)["top_k_categorical_accuracy"], rel=1e-15)]


def test_k_at_least_the_classes_gives_one_and_an_uncompiled_model_keeps_its_default():
    model = logits_model([SparseTopKCategoricalAccuracy(k=CLASSES, name="all"),
                          SparseTopKCategoricalAccuracy(k=100, name="more")])
    assert model.evaluate(X, Y, return_dict=True)["all"] == 1.0
    assert model.fit(X, Y, verbose=0).history["more"] == [1.0]
    assert xpcnn.Sequential([Flatten(), Dense(3)]).metrics_names == ("loss", "accuracy")


def test_a_training_step_under_array_api_strict():
    """The counts in standard operations: a strict namespace's steps, evaluate and fit."""
    model = logits_model(device=xs)
    reference = logits_model()
    for m in (model, reference):
        m.build((2, 2, 3))
    reference.set_weights(model.get_weights())
    loss, correct = model.train_step(model._to_device(X[:8]), model.backend.asarray(Y[:8]))
    assert model.train_on_batch(X, Y, return_dict=True) == pytest.approx(
        reference.train_on_batch(X, Y, return_dict=True), rel=1e-13)
    strict = model.fit(X, Y, batch_size=8, verbose=0, validation_data=(X, Y)).history
    plain = reference.fit(X, Y, batch_size=8, verbose=0, validation_data=(X, Y)).history
    for name in (*NAMES, *(f"val_{n}" for n in NAMES)):
        np.testing.assert_allclose(strict[name], plain[name], rtol=1e-13)


def test_the_metrics_without_top_k_run_no_top_k_work(monkeypatch):
    """A model compiled without top-k metrics counts nothing more (its device work is
    unchanged: tests/test_launch_counts.py); one with them counts once per step, for all its
    metrics of one k."""
    from xpcnn.ops.fast_numpy import NumpyKernels
    from xpcnn.ops.kernels import StandardKernels

    calls = []
    for kind in (StandardKernels, NumpyKernels):  # (the step calls its backend's kernels)
        monkeypatch.setattr(kind, "top_k_counts", lambda self, *a, _was=kind.top_k_counts: (
            calls.append(a[2]) or _was(self, *a)))
    logits_model(["accuracy"]).fit(X, Y, batch_size=12, verbose=0, validation_data=(X, Y))
    assert calls == []
    logits_model(["sparse_top_k_categorical_accuracy", "top_k_categorical_accuracy",
                  SparseTopKCategoricalAccuracy(2, "top2")]).fit(X, Y, batch_size=12,
                                                                 verbose=0)
    assert calls == [(5, 2)] * 3


# -- callbacks ----------------------------------------------------------------------------------

def test_monitors_know_the_metrics_are_maximised_and_file_names_and_csv_take_them(tmp_path):
    assert EarlyStopping("val_sparse_top_k_categorical_accuracy").mode == "max"
    assert ReduceLROnPlateau("top_k_categorical_accuracy").mode == "max"
    named = SparseTopKCategoricalAccuracy(k=3, name="top3_of_mine")
    model = logits_model(["accuracy", named], lr=0.05)
    stop = EarlyStopping("val_top3_of_mine", patience=5)
    assert stop.mode == "auto"  # (the model's metrics decide it: it is maximised)
    # (callbacks.auto_mode decides, from the names: no Metric attribute claims to; a dead
    # Metric.maximised that nothing read said it did)
    assert not hasattr(xpcnn.metrics.Metric, "maximised") and not hasattr(named, "maximised")
    keep = ModelCheckpoint(str(tmp_path / "m-{epoch}-{val_top3_of_mine:.3f}.npz"),
                           monitor="val_top3_of_mine", save_best_only=True)
    batches = ModelCheckpoint(str(tmp_path / "b-{batch}-{top3_of_mine:.2f}.npz"),
                              monitor="top3_of_mine", save_best_only=True, save_freq=2,
                              save_weights_only=True)
    history = model.fit(X, Y, epochs=3, batch_size=12, verbose=0, validation_data=(X, Y),
                        callbacks=[stop, keep, batches, CSVLogger(tmp_path / "log.csv")])
    assert stop.mode == keep.mode == batches.mode == "max"
    assert stop.best == max(history.history["val_top3_of_mine"])
    assert any(p.name == f"m-1-{history.history['val_top3_of_mine'][0]:.3f}.npz"
               for p in tmp_path.iterdir())
    assert any(p.name.startswith("b-2-") for p in tmp_path.iterdir())
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert {"top3_of_mine", "val_top3_of_mine", "accuracy"} <= set(header)
    with pytest.raises(InputError, match="compiled without the 'top_k_categorical_accuracy' "
                                         r"metric: compile it with metrics=\['top_k_categorical"):
        model.fit(X, Y, verbose=0, callbacks=[EarlyStopping("top_k_categorical_accuracy")])


# -- files ----------------------------------------------------------------------------------------

def _compile_entry(path):
    with np.load(path) as f:
        return decode_json(f[CONFIG_KEY], "m.npz")["compile"]


def test_model_files_keep_the_metrics_names_and_k(tmp_path):
    model = logits_model(lr=0.1)
    model.fit(X, Y, verbose=0)
    model.save(tmp_path / "m.npz")
    assert _compile_entry(tmp_path / "m.npz")["metrics"] == [
        "sparse_top_k_categorical_accuracy", "acc",
        {"class": "SparseTopKCategoricalAccuracy", "k": 2, "name": "top2"},
        {"class": "TopKCategoricalAccuracy", "k": 1, "name": "top1"},
        "top_k_categorical_accuracy"]
    loaded = xpcnn.load_model(tmp_path / "m.npz")
    assert loaded.metrics_names == NAMES
    assert loaded.evaluate(X, Y, return_dict=True) == model.evaluate(X, Y, return_dict=True)
    # (the default objects are written as their names: the same compile as the strings)
    default = logits_model([SparseTopKCategoricalAccuracy(), TopKCategoricalAccuracy()])
    default.build((2, 2, 3))
    default.save(tmp_path / "d.npz")
    assert _compile_entry(tmp_path / "d.npz")["metrics"] == [
        "sparse_top_k_categorical_accuracy", "top_k_categorical_accuracy"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"class": "SparseTopKCategoricalAccuracy", "k": 0, "name": "t"}, "k must be a positive"),
    ({"class": "F1Score", "k": 2, "name": "f"}, "unknown metric"),
    ({"class": "SparseTopKCategoricalAccuracy", "k": 2}, "unknown metric"),
    ("top5", "unknown metrics"),
])
def test_a_file_with_a_metric_it_cannot_describe_is_refused(tmp_path, entry, message):
    model = logits_model(["accuracy"])
    model.build((2, 2, 3))
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    config = decode_json(arrays[CONFIG_KEY], "m.npz")
    config["compile"]["metrics"] = [entry]
    from xpcnn.saving.npz import encode_json

    arrays[CONFIG_KEY] = encode_json(config)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=message):
        xpcnn.load_model(tmp_path / "bad.npz")


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -1, 2.0, True, "5", None, np.int64(0)])
def test_k_must_be_a_positive_int(k):
    for cls in (SparseTopKCategoricalAccuracy, TopKCategoricalAccuracy):
        with pytest.raises(InputError, match=rf"{cls.__name__} k must be a positive int \(how "
                                             rf"many of the largest scores count\), got"):
            cls(k=k)


def test_names_unknown_duplicate_or_the_logs_own_are_refused():
    model = logits_model(["accuracy"])
    with pytest.raises(InputError, match=r"unknown metrics \['top5', 3\]; xpcnn supports "
                                         r"'accuracy' \(or 'acc', 'sparse_categorical_accuracy', "
                                         r"'categorical_accuracy'\), "
                                         r"'sparse_top_k_categorical_accuracy' and "
                                         r"'top_k_categorical_accuracy'"):
        model.compile(metrics=["top5", "accuracy", 3])
    with pytest.raises(InputError, match=r"two metrics are named 'sparse_top_k_categorical_"
                                         r"accuracy' \('sparse_top_k_categorical_accuracy' and "
                                         r"SparseTopKCategoricalAccuracy\(k=3, name='sparse_"
                                         r"top_k_categorical_accuracy'\)\)"):
        model.compile(metrics=["sparse_top_k_categorical_accuracy",
                               SparseTopKCategoricalAccuracy(k=3)])
    with pytest.raises(InputError, match="two metrics are named 'top'"):
        model.compile(metrics=[SparseTopKCategoricalAccuracy(2, "top"),
                               TopKCategoricalAccuracy(2, "top")])
    with pytest.raises(InputError, match="a metric may not be named 'loss'"):
        model.compile(metrics=[TopKCategoricalAccuracy(2, "loss")])
    with pytest.raises(InputError, match="name must be a non-empty string"):
        TopKCategoricalAccuracy(2, "")
    assert model.metrics_names == ("loss", "accuracy")  # (a refused compile changes nothing)
    # the same metric twice is one metric, as the same name was before
    model.compile(metrics=["top_k_categorical_accuracy", TopKCategoricalAccuracy()])
    assert model.metrics_names == ("loss", "top_k_categorical_accuracy")


@pytest.mark.parametrize("name", ["val_loss", "val_accuracy", "learning_rate", "epoch", "batch",
                                  "seconds"])
def test_a_metric_named_as_another_log_is_refused(name):
    """Named "val_loss", its values were logged as "val_val_loss" and History's val_loss was
    the validation loss; "learning_rate" was overwritten by ReduceLROnPlateau's rate; "epoch"
    gave a CSV file two epoch columns."""
    model = logits_model(["accuracy"])
    with pytest.raises(InputError, match=rf"a metric may not be named '{name}': the logs use "
                                         r"that name \(and names starting with 'val_'\)"):
        model.compile(metrics=[SparseTopKCategoricalAccuracy(3, name)])
    assert model.metrics_names == ("loss", "accuracy")


def test_a_users_metric_class_is_refused_and_a_subclass_of_a_top_k_saves_as_it(tmp_path):
    """A Metric subclass of the user's was logged with the accuracy's value under its name,
    and its file did not load; a subclass of a top-k class counted right, but its files named
    the subclass and did not load. The first is refused; the second saves as the class it
    subclasses, and loads where it is not defined."""
    class MeanP(xpcnn.metrics.Metric):
        name = "mean_p"

        def get_config(self):
            return "mean_p"

    model = logits_model(["accuracy"])
    with pytest.raises(InputError, match=r"metric 'mean_p' \(MeanP\) is not one xpcnn counts"):
        model.compile(metrics=[MeanP()])

    class Top3(SparseTopKCategoricalAccuracy):
        def __init__(self):
            super().__init__(3, "top3")

    model.compile(metrics=[Top3()])
    x, y = np.random.default_rng(0).standard_normal((12, CLASSES)), np.arange(12) % CLASSES
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "top3.npz")
    loaded = xpcnn.load_model(tmp_path / "top3.npz")
    assert loaded.metrics_names == ("loss", "top3")
    assert loaded.evaluate(x, y, return_dict=True) == model.evaluate(x, y, return_dict=True)


@pytest.mark.parametrize("hook", ["update_state", "result", "reset_state", "reset_states",
                                  "merge_state", "__call__"])
def test_a_top_k_subclass_written_with_keras_hooks_is_refused(hook):
    """A subclass of a top-k class written as Keras' guide writes a metric (update_state,
    result, ...) compiled, and its name logged the top-k accuracy, its hooks never called:
    refused at compile, naming them, the model's metrics left as they were."""
    def never(self, *args, **kwargs):
        raise AssertionError("never called")

    cls = type("Confident", (SparseTopKCategoricalAccuracy,), {hook: never})
    model = logits_model(["accuracy"])
    with pytest.raises(InputError, match=rf"metric 'confident' \(Confident\) is not one xpcnn "
                                         rf"counts as it is written: it defines {hook}\(\) "
                                         r"\(Keras' hooks of a metric\), which xpcnn never calls, "
                                         r"and would log the top-k accuracy under its name"):
        model.compile(optimizer=optim.SGD(0.0), metrics=[cls(k=1, name="confident")])
    assert model.metrics_names == ("loss", "accuracy")


def test_a_users_metric_without_a_name_is_refused_naming_its_class():
    """Keras' Metric subclass passes its name to Metric.__init__, which xpcnn's lacks: the
    refusal read metric.name and crashed with a bare AttributeError."""
    class F1(xpcnn.metrics.Metric):
        def __init__(self, name="f1"):
            self.tp = 0.0

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.tp += 1.0

        def result(self):
            return self.tp

    model = logits_model(["accuracy"])
    with pytest.raises(InputError, match=r"^metric F1 is not one xpcnn counts: the model counts "
                                         r"its metrics on the device"):
        model.compile(optimizer=optim.SGD(0.0), metrics=["accuracy", F1()])
    assert model.metrics_names == ("loss", "accuracy")


def test_a_top_k_subclass_that_skips_super_init_is_refused_by_name():
    class Top3(SparseTopKCategoricalAccuracy):
        def __init__(self):
            self.top = 3

    with pytest.raises(InputError, match=r"metric Top3 has no k or name: its __init__ must call "
                                         r"super\(\)\.__init__\(k, name\)"):
        logits_model([Top3()])


def test_keras_names_of_the_accuracy_and_numpy_and_huge_k_are_taken():
    """Keras' "sparse_categorical_accuracy" and "categorical_accuracy" were refused; a NumPy
    integer k was refused; k = 2**63 failed deep inside (an int beyond int64) under
    array_api_strict, and gave 0 on PyTorch tensors."""
    z = np.random.default_rng(1).standard_normal((40, CLASSES))
    labels = np.arange(40) % CLASSES
    model = logits_model(["sparse_categorical_accuracy", "categorical_accuracy",
                          SparseTopKCategoricalAccuracy(np.int64(2), "top2"),
                          SparseTopKCategoricalAccuracy(2**63, "all")])
    logs = model.evaluate(z, labels, return_dict=True)
    p = model.predict(z)  # (the logits)
    accuracy = float(np.mean(np.argmax(p, 1) == labels))
    assert logs["sparse_categorical_accuracy"] == logs["categorical_accuracy"] == accuracy
    assert logs["top2"] == float(np.mean(reference_in_top_k(p, labels, 2)))
    assert logs["all"] == 1.0
    import array_api_compat.torch

    for xp in (xs, array_api_compat.torch):
        counts = top_k_counts(xp, xp.asarray(z), xp.asarray(labels), (2**63, 10**20), xp.float64)
        assert [float(c) for c in counts] == [40.0, 40.0]


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_counts_on_the_logits_the_model_computes(precision):
    """The counts of the low-precision logits (their ties counting as in), alike in training
    steps and evaluate."""
    model = xpcnn.Sequential([Flatten(), Dense(8), ReLU(), Dense(CLASSES)], seed=0)
    model.compile(optimizer=optim.SGD(0.0), precision=precision,
                  metrics=["sparse_top_k_categorical_accuracy", TopKCategoricalAccuracy(2, "t")])
    history = model.fit(X, Y, batch_size=12, verbose=0)
    logs = model.evaluate(X, Y, return_dict=True)
    for name in ("sparse_top_k_categorical_accuracy", "t"):
        assert history.history[name] == [logs[name]] and 0 < logs[name] < 1


@pytest.mark.parametrize("before", [["acc"], ["acc", SparseTopKCategoricalAccuracy(3, "top2")]],
                         ids=["none", "another_k"])
def test_a_top_k_metric_compiled_mid_epoch_counts_the_samples_since(before):
    """A callback's compile in mid-epoch that adds a top-k metric (or gives one another k):
    the epoch's log of it counted only the batches after compile but divided by every sample
    of the epoch (0.5 for a top-5 of 4 classes, which is 1 by definition), or kept the other
    k's counts. It is the metric's share of the samples since compile."""
    from xpcnn.callbacks import Callback

    model = logits_model(before)  # (a rate of 0: every step's logits are predict's)
    after = []

    class Recompile(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.compile(optimizer=self.model.optimizer, metrics=[
                    "acc", SparseTopKCategoricalAccuracy(k=2, name="top2")])
            elif batch == 3:
                after.append(logs["top2"])

    history = model.fit(X, Y, batch_size=6, shuffle=False, verbose=0, callbacks=[Recompile()])
    z = model.predict(X)
    in_top2 = reference_in_top_k(z, Y, 2)
    assert history.history["top2"] == pytest.approx([in_top2[18:].mean()], rel=1e-12)
    assert after == pytest.approx([in_top2[18:24].mean()], rel=1e-12)
    assert history.history["acc"] == pytest.approx([reference_in_top_k(z, Y, 1).mean()])


def test_keras_list_of_the_one_outputs_metrics_is_taken_and_a_dict_refused():
    """Keras 3.15 takes ``metrics=[["accuracy"]]`` (each output's list) for a one-output model
    as ``["accuracy"]`` (evaluate gave the same {'accuracy': 0.5, 'loss': 0.8872} both ways);
    xpcnn too (was: "unknown metrics"). Several lists, and a dict keyed by output name (which
    Keras takes, any key), are refused as the labels and weights so keyed are."""
    plain = logits_model(["accuracy", "top_k_categorical_accuracy"])
    nested = logits_model([["accuracy", "top_k_categorical_accuracy"]])
    assert nested.metrics_names == plain.metrics_names == ("loss", "accuracy",
                                                          "top_k_categorical_accuracy")
    assert nested.evaluate(X, Y, return_dict=True) == plain.evaluate(X, Y, return_dict=True)
    nested.compile(metrics=(("acc",),))
    assert nested.metrics_names == ("loss", "acc")
    with pytest.raises(InputError, match=r"metrics \[\['accuracy'\], \['accuracy'\]\] holds "
                                         r"lists, Keras' form of a model with several outputs' "
                                         r"metrics: an xpcnn model has one output, whose metrics "
                                         r"are one list, metrics=\['accuracy'\]"):
        nested.compile(metrics=[["accuracy"], ["accuracy"]])
    with pytest.raises(InputError, match=r"metrics is a dict \(keys \['dense_1'\]\): an xpcnn "
                                         r"model has one output, whose metrics are one list "
                                         r"\(\['accuracy'\], say\), not keyed by output name; "
                                         r"pass metrics\['dense_1'\] itself"):
        nested.compile(metrics={"dense_1": ["accuracy"]})
    assert nested.metrics_names == ("loss", "acc")  # (a refused compile changes nothing)


@pytest.mark.parametrize("rows, classes", [(1, 5), (37, 10), (300, 7), (9, 1000)])
@pytest.mark.parametrize("targets", [np.int64, np.int32, np.uint8, "one-hot", "float16"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpys_top_k_counts_are_the_standard_ones(rows, classes, targets, dtype):
    """NumPy's fast top-k counts (one comparison pass, no (rows, classes) masks) count as the
    standard version does: ties in, NaN scores greater than none, non-finite targets and
    labels of no class never counted, a one-hot row's first largest entry its target."""
    import array_api_compat.numpy as xpn
    from kernel_cases import TOP_K_KS, top_k_inputs

    from xpcnn.ops.fast_numpy import NumpyKernels
    from xpcnn.ops.kernels import StandardKernels

    z, y = top_k_inputs(np.random.default_rng(rows), rows, classes, dtype, targets)
    for out in (np.float32, np.float64):
        want = StandardKernels(xpn).top_k_counts(z, y, TOP_K_KS, out)
        got = NumpyKernels().top_k_counts(z, y, TOP_K_KS, out)
        assert got.dtype == out and got.tolist() == want.tolist()
    assert "top_k_counts" in vars(NumpyKernels)  # (its own, not the standard one inherited)
