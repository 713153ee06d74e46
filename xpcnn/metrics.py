"""The metrics ``compile`` takes, by name or as objects, as Keras 3 users write them.

``metrics=["accuracy"]`` (or ``"acc"``): the share of samples whose first largest score is at
the target's class. ``"sparse_top_k_categorical_accuracy"`` and ``"top_k_categorical_accuracy"``
(k = 5, Keras' default), or :class:`SparseTopKCategoricalAccuracy` and
:class:`TopKCategoricalAccuracy` objects for another ``k`` or name: the share of samples whose
target's score is among the ``k`` largest. Each is logged under its name (``val_<name>`` for
the validation data), in the order given.

These are settings, not Keras' stateful objects: the model counts on the device, next to the
loss and correct count (:mod:`xpcnn.totals`), and the host reads every count with one transfer.
This module names and configures the metrics (:func:`get_metrics`; :func:`metric_from_config`
for files); :func:`xpcnn.ops.softmax.top_k_counts` counts.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

from .checks import defined_by, refuse_keyed
from .errors import InputError, keras_names

#: The names compile takes for the accuracy (argmax at the target's class): Keras' too, whose
#: "accuracy" means one of the last two, as the labels are.
ACCURACY_NAMES = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy")
#: Names the logs (and callbacks' logs, files and templates) use for other values: no metric
#: may take them, nor a name starting with "val_" (the validation's).
RESERVED_NAMES = ("loss", "seconds", "learning_rate", "epoch", "batch")


class Metric:
    """A metric compile takes: its ``name`` (the logs' key) and its settings
    (:meth:`get_config`). Every xpcnn metric is a share of samples, maximised."""

    name: str

    def get_config(self) -> Any:
        """What a model file keeps: the name where it says everything, else a dict."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash(repr(self.get_config()))

    def __repr__(self) -> str:
        config = self.get_config()
        return repr(config) if isinstance(config, str) else \
            f"{config['class']}(k={config['k']}, name={config['name']!r})"


class _Accuracy(Metric):
    """``"accuracy"`` / ``"acc"``: the first largest score at the target's class. The scores
    are the logits (before a final softmax): Keras' argmax of the probabilities, except where
    softmax rounds two different logits to one probability (a tie there, not here)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_config(self) -> Any:
        return self.name


class _TopK(Metric):
    """A sample counts where its target class's score is among the ``k`` largest of its row:
    where fewer than ``k`` classes score strictly higher (ties at the boundary count as in, as
    TensorFlow's ``in_top_k``), and its target's score is finite (a NaN or infinite one never
    counts; a NaN elsewhere in the row is higher than nothing, an infinity higher than every
    finite score: Keras' rule on its JAX backend, where TensorFlow's counts no row with a score
    that is not finite). ``k`` at least the number of classes gives 1.0, as in Keras.

    Targets may be integer labels (N,) or one-hot rows (N, classes) (the target is then the
    row's first largest entry) for both classes: a deliberate superset of Keras, whose two
    names differ only in the labels they take, as xpcnn's one loss takes both. The scores
    ranked are the logits (before a final softmax, as the accuracy's argmax): the same order as
    Keras' probabilities, except where softmax rounds two different logits to one probability
    (a tie there, not here)."""

    default_name = ""

    def __init__(self, k: int = 5, name: str | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise InputError(f"{type(self).__name__} k must be a positive int (how many of the "
                             f"largest scores count), got {k!r}")
        name = self.default_name if name is None else name
        if not isinstance(name, str) or not name:
            raise InputError(f"{type(self).__name__} name must be a non-empty string, got "
                             f"{name!r}")
        self.k, self.name = int(k), name

    def get_config(self) -> Any:
        # (the string where it is what the string means: a file written with the name and one
        # written with the default object are the same compile)
        if self.k == 5 and self.name == self.default_name:
            return self.name
        # (a user's subclass as xpcnn's class it is one of: the counting is xpcnn's, k and the
        # name are all there is to keep, and its file loads where the subclass is not defined)
        cls = next(c for c in type(self).__mro__ if c in CLASSES.values())
        return {"class": cls.__name__, "k": self.k, "name": self.name}


class SparseTopKCategoricalAccuracy(_TopK):
    """Keras' ``SparseTopKCategoricalAccuracy(k=5, name="sparse_top_k_categorical_accuracy")``:
    the share of samples whose target's score is among the ``k`` largest. Takes integer
    labels, and one-hot rows too (see :class:`TopKCategoricalAccuracy`)."""

    default_name = "sparse_top_k_categorical_accuracy"

    def __init__(self, k: int = 5, name: str = "sparse_top_k_categorical_accuracy") -> None:
        super().__init__(k, name)


class TopKCategoricalAccuracy(_TopK):
    """Keras' ``TopKCategoricalAccuracy(k=5, name="top_k_categorical_accuracy")``: the share of
    samples whose target class's score is among the ``k`` largest (fewer than ``k`` classes
    score strictly higher: ties at the boundary count as in; a non-finite target score never
    does). Takes one-hot rows (the target is the row's first largest entry), and integer labels
    too: unlike Keras, whose sparse and dense classes differ only in the labels they take, both
    take both, as xpcnn's loss does. The scores ranked are the logits before a final softmax."""

    default_name = "top_k_categorical_accuracy"

    def __init__(self, k: int = 5, name: str = "top_k_categorical_accuracy") -> None:
        super().__init__(k, name)


#: The classes a file may name, and the names compile takes as strings.
CLASSES: dict[str, type[_TopK]] = {c.__name__: c for c in (SparseTopKCategoricalAccuracy,
                                                          TopKCategoricalAccuracy)}
NAMES = (*ACCURACY_NAMES, SparseTopKCategoricalAccuracy.default_name,
         TopKCategoricalAccuracy.default_name)


#: Keras' hooks of a stateful metric, which xpcnn never calls (it counts on the device).
KERAS_HOOKS = ("update_state", "result", "reset_state", "reset_states", "merge_state",
               "__call__")


def _not_counted(metric: Metric, why: str) -> InputError:
    """The refusal of a metric xpcnn does not count, named by its name where it has one (a
    Keras-style subclass gives its name to Keras' Metric.__init__, which xpcnn's lacks)."""
    name = getattr(metric, "name", None)
    named = f"{name!r} ({type(metric).__name__})" if isinstance(name, str) else \
        type(metric).__name__
    return InputError(f"metric {named} is not one xpcnn counts{why}: the model counts its "
                      "metrics on the device, the accuracy and the top-k accuracies "
                      "(SparseTopKCategoricalAccuracy, TopKCategoricalAccuracy, or a subclass "
                      "of them giving k and name); compute another from predict, in a "
                      "callback")


def get_metric(metric: str | Metric) -> Metric:
    """The metric a name (or an object) stands for; InputError for an unknown one, a user's
    own Metric class, or a top-k subclass that defines Keras' hooks (:data:`KERAS_HOOKS`),
    which would be logged as the top-k accuracy under its name."""
    if isinstance(metric, _TopK):
        hooks = [f"{h}()" for h in KERAS_HOOKS if defined_by(metric, h) is not None]
        if hooks:
            raise _not_counted(metric, f" as it is written: it defines {', '.join(hooks)} "
                                       "(Keras' hooks of a metric), which xpcnn never calls, "
                                       "and would log the top-k accuracy under its name")
        if not all(hasattr(metric, a) for a in ("k", "name")):
            raise InputError(f"metric {type(metric).__name__} has no k or name: its "
                             "__init__ must call super().__init__(k, name)")
    if isinstance(metric, _Accuracy | _TopK):
        return metric
    if isinstance(metric, Metric):  # (a user's Metric was logged with the accuracy's value)
        raise _not_counted(metric, "")
    if isinstance(metric, str):
        if metric in ACCURACY_NAMES:
            return _Accuracy(metric)
        for cls in CLASSES.values():
            if metric == cls.default_name:
                return cls()
    raise InputError(f"unknown metrics [{metric!r}]; xpcnn supports 'accuracy' (or 'acc', "
                     "'sparse_categorical_accuracy', 'categorical_accuracy'), "
                     "'sparse_top_k_categorical_accuracy' and 'top_k_categorical_accuracy' "
                     "(or xpcnn.metrics.SparseTopKCategoricalAccuracy(k, name) and "
                     "TopKCategoricalAccuracy(k, name))")


def get_metrics(metrics: Any) -> tuple[Metric, ...]:
    """compile's ``metrics``: a name, a metric, a list or tuple of them, or None / [] (none),
    resolved in order. The same metric given twice is kept once; two metrics of one name
    (a top-k one with another ``k``, say) are refused, as are the loss's names."""
    if isinstance(metrics, str | Metric):
        metrics = [metrics]
    # (Keras' metrics keyed by output name: refused as the labels and weights so keyed are)
    refuse_keyed(metrics, "metrics", "metrics are one list (['accuracy'], say)")
    given = metrics
    if isinstance(metrics, list | tuple) and len(metrics) == 1 and \
            isinstance(metrics[0], list | tuple):
        metrics = metrics[0]  # (Keras' list of each output's metrics, [['accuracy']]: the one)
    if isinstance(metrics, list | tuple) and any(isinstance(m, list | tuple) for m in metrics):
        raise InputError(f"metrics {given!r} holds lists, Keras' form of a model with several "
                         "outputs' metrics: an xpcnn model has one output, whose metrics are "
                         "one list, metrics=['accuracy'] (or [['accuracy']], as Keras takes)")
    if not isinstance(metrics, list | tuple | None):
        raise InputError(f"metrics must be a list of names such as ['accuracy'], got "
                         f"{metrics!r}: a list or tuple of names and xpcnn.metrics objects "
                         "(or one of them, or None)")
    unknown = [m for m in metrics or () if not isinstance(m, Metric) and m not in NAMES]
    if unknown:  # (all of them named at once)
        raise InputError(f"unknown metrics {unknown}; xpcnn supports 'accuracy' (or 'acc', "
                         "'sparse_categorical_accuracy', 'categorical_accuracy'), "
                         "'sparse_top_k_categorical_accuracy' and 'top_k_categorical_accuracy' "
                         "(or xpcnn.metrics.SparseTopKCategoricalAccuracy(k, name) and "
                         "TopKCategoricalAccuracy(k, name))")
    resolved: dict[str, Metric] = {}
    for metric in map(get_metric, metrics or ()):
        if metric.name in RESERVED_NAMES or metric.name.startswith("val_"):
            raise InputError(f"a metric may not be named {metric.name!r}: the logs use that "
                             "name (and names starting with 'val_') for other values; give it "
                             "another name")
        kept = resolved.setdefault(metric.name, metric)
        if kept != metric:
            raise InputError(f"two metrics are named {metric.name!r} ({kept!r} and {metric!r}): "
                             "each is logged under its name, so names must differ; pass "
                             "name=... to one of them")
    return tuple(resolved.values())


def metric_from_config(config: Any) -> Metric:
    """The metric a model file's compile settings describe (a name, or a dict of a class, k and
    name); InputError for anything else."""
    if isinstance(config, str):
        return get_metric(config)
    if isinstance(config, dict) and config.get("class") in CLASSES and set(config) == {
            "class", "k", "name"}:
        return CLASSES[config["class"]](config["k"], config["name"])
    raise InputError(f"unknown metric {config!r}: expected a name such as 'accuracy' or "
                     "{'class': 'SparseTopKCategoricalAccuracy', 'k': 5, 'name': ...}")


def top_k_of(metrics: tuple[Metric, ...]) -> tuple[int, ...]:
    """The distinct ``k`` of the top-k metrics, in order: one device count each."""
    return tuple(dict.fromkeys(m.k for m in metrics if isinstance(m, _TopK)))


def slots(metrics: tuple[Metric, ...]) -> tuple[int, ...]:
    """Where each metric's sum is among [loss, correct, top-k counts in ``top_k_of`` order]."""
    ks = top_k_of(metrics)
    return tuple(2 + ks.index(m.k) if isinstance(m, _TopK) else 1 for m in metrics)


_ACCURACY = ("xpcnn's accuracy is a name, not a class: compile(metrics=['accuracy']) (or 'acc', "
             "'sparse_categorical_accuracy', 'categorical_accuracy', logged under the name "
             "given), for integer labels and one-hot rows alike")
_OFFERED = ("xpcnn counts the accuracy (compile(metrics=['accuracy'])) and the top-k "
            "accuracies (SparseTopKCategoricalAccuracy, TopKCategoricalAccuracy); compute "
            "another from predict, in a callback")

#: Keras 3's metric names that xpcnn lacks: (the xpcnn names the advice gives, which exist,
#: the advice). Not aliases: each metric has one name, and this says which.
KERAS_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "SparseCategoricalAccuracy": ((), _ACCURACY),
    "CategoricalAccuracy": ((), _ACCURACY),
    **{name: (("SparseTopKCategoricalAccuracy", "TopKCategoricalAccuracy"), _OFFERED)
       for name in ("Precision", "Recall", "AUC", "F1Score", "BinaryAccuracy")},
}



if not TYPE_CHECKING:  # (hidden from type checkers, which then still flag a typo)
    __getattr__ = keras_names(__name__, KERAS_NAMES, "Keras' name")
