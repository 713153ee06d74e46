"""Softmax cross-entropy, fused with the softmax for stability and a simple gradient."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import array_api_compat
import numpy as np

from .backend import dtype_name, to_host
from .checks import (
    as_labels,
    as_sample_weights,
    check_config_class,
    defined_by,
    is_one_of,
    named_parameters,
    real_floating,
    register,
    registered,
    take_foreign_keywords,
    takes_keywords,
    unsaved_settings,
    untaken_settings,
)
from .errors import InputError, keras_names
from .ops.kernels import class_weighted
from .ops.softmax import (
    cross_entropy,
    loss_and_correct,
    nan_unless_classes,
    nll,
    target_rows,
)

#: Loss classes by name, as files name them: xpcnn's and a user's subclasses (registered when
#: defined).
LOSS_CLASSES: dict[str, type[SoftmaxCrossEntropy]] = {}


def _float_matrix(y: Any) -> bool:
    """Whether ``y`` is 2-D floating-point scores, read without converting it where it is an
    array (a torch bfloat16 tensor); anything NumPy cannot read (a ragged list) is not."""
    if not (hasattr(y, "ndim") and hasattr(y, "dtype")):
        try:
            y = np.asarray(y)
        except Exception:  # (the error, if any, is y_pred's shape: no hint)
            return False
    return y.ndim == 2 and "float" in str(y.dtype)


def _host_floats(y: Any) -> np.ndarray | None:
    """``y``'s values as a float64 host array, or None where they cannot be read (a ragged
    list, a torch bfloat16 tensor NumPy has no dtype for: read through float64 here)."""
    try:
        if array_api_compat.is_torch_array(y):
            y = y.detach().cpu().double()
        return np.asarray(to_host(y), dtype=np.float64)
    except Exception:  # (the hint reads what it can; the error is y_pred's shape)
        return None


def _labels_as_scores(y_true: Any, y_pred: Any) -> bool:
    """Whether a float 1-D ``y_pred`` holds class labels cast to float (whole numbers in
    [0, classes)) and ``y_true`` the scores (N, classes) of a model, not targets (a row that
    is not one-hot): PyTorch's order with float labels, as ``loss(probs, labels.astype(
    "float32"))``. Never where ``y_true`` is one-hot rows (that call is in Keras' order, with
    a y_pred of the wrong shape), nor where a value cannot be read."""
    if not _float_matrix(y_true):
        return False
    labels, scores = _host_floats(y_pred), _host_floats(y_true)
    if labels is None or scores is None or labels.ndim != 1 or scores.ndim != 2 or \
            labels.shape[0] != scores.shape[0] or labels.size == 0 or scores.shape[1] < 2:
        return False
    whole = np.all((labels == np.floor(labels)) & (labels >= 0) & (labels < scores.shape[1]))
    return bool(whole) and not bool(np.all((scores == 0) | (scores == 1)))


def _same_value(a: Any, b: Any) -> bool:
    """a == b, by identity where == gives no single truth value (an array's)."""
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return a is b


@functools.cache
def _settings_of(cls: type) -> frozenset[str]:
    """The settings of loss class ``cls``: its constructor's parameters and the base's."""
    return frozenset(("label_smoothing", "from_logits", *named_parameters(cls.__init__)))


def _same_settings(a: Any, b: Any) -> bool:
    """Whether two losses hold the same attributes."""
    return vars(a).keys() == vars(b).keys() and all(
        _same_value(value, vars(b)[key]) for key, value in vars(a).items())


#: Keras' loss keywords that mean what xpcnn's loss does with these values, and what it does.
_KERAS_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "reduction": ("sum_over_batch_size", "mean"), "axis": (-1, 1), "ignore_class": (None,)}
_KERAS_ONLY = {
    "reduction": ("'sum_over_batch_size' (or 'mean', the same in Keras 3), Keras' default: "
                  "the mean over the batch (with sample weights, their weighted sum divided "
                  "by N); with SGD, a sum's steps are the mean's at the learning rate times "
                  "the batch size"),
    "axis": ("-1 (or 1), Keras' default: the classes are the last axis of scores "
             "(N, classes)"),
    "ignore_class": ("None, Keras' default: to leave samples of a class out, give them "
                     "sample_weight 0"),
}


#: How fit trains by a loss (a subclass's override), said where a loss is written otherwise.
_HOOK = ("forward(self, xp, logits, y, dtype, weights=None), returning (the loss as a 0-d "
         "array, its gradient with respect to the logits, of their shape)")


_CLASS_WEIGHT = ("fit(..., class_weight=dict(enumerate(w))) (or train_on_batch's), whose mean "
                 "divides by the batch size, as Keras' does (PyTorch's by the sum of the "
                 "samples' weights: the losses differ by that ratio)")
#: CrossEntropyLoss's keywords that xpcnn's loss does not take (PyTorch's default, which is
#: what xpcnn does, taken; any other value refused naming xpcnn's way).
_TORCH_KEYWORDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "weight": ((None,), _CLASS_WEIGHT),
    "ignore_index": ((-100,), "give the samples to ignore sample_weight 0 (fit's sample_weight=, "
                              "or the loss's call, loss(y_true, y_pred, sample_weight=...)), with "
                              "any valid class as their label"),
}


def _refusing_torch_keywords(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` refusing PyTorch's keywords (:data:`_TORCH_KEYWORDS`) naming xpcnn's way (was: a
    bare TypeError); its signature, which ``inspect`` reads through the wrapper, is
    unchanged (the settings files keep)."""
    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        take_foreign_keywords(type(self).__name__, kwargs, _TORCH_KEYWORDS,
                              "PyTorch's", "loss")
        init(self, *args, **kwargs)

    return wrapper


class SoftmaxCrossEntropy:
    """Mean cross-entropy between softmax(logits) and integer or one-hot targets.

    Computed from log-softmax (log-sum-exp), so it never overflows; the gradient with respect to
    the logits is (softmax - target) / N. ``label_smoothing`` = e mixes the targets with the
    uniform distribution: target * (1 - e) + e / classes.

    ``from_logits`` says, in Keras' words, what the model's outputs are, and is checked (the
    loss is the same fused one either way: on the logits before a model's final softmax, else
    on its outputs): True, logits (a model that ends in a softmax is refused, as Keras would
    apply the softmax twice); False, probabilities (a model that does not end in a softmax
    is refused, as Keras would take the log of logits); None (the default), either.

    A subclass that overrides :meth:`forward` (or :meth:`targets`) is trained by it: its
    steps take the standard path, not the fused kernels. Keras' hook, ``call(y_true,
    y_pred)``, or an override of ``__call__``, without :meth:`forward` is refused at compile
    (:meth:`check_hooks`): fit needs the gradient that forward returns with the loss.
    """

    name = "cross_entropy"
    #: Changes of any loss's settings once set (its label_smoothing, those a subclass's
    #: constructor takes), as :attr:`Layer.settings_changes` counts a layer's: a training step
    #: captured in a CUDA graph baked the old value in, and is captured again (not any other
    #: attribute: one a subclass writes at every step would capture every step again).
    settings_changes = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(LOSS_CLASSES, cls, "loss")

    @_refusing_torch_keywords
    def __init__(self, label_smoothing: float = 0.0, from_logits: bool | None = None, *,
                 reduction: str = "sum_over_batch_size", axis: int = -1,
                 ignore_class: int | None = None) -> None:
        # (Keras' keywords, taken where given what xpcnn does, else refused naming it: a port's
        # CategoricalCrossentropy(axis=-1) got a bare "unexpected keyword argument")
        for key, value in (("reduction", reduction), ("axis", axis),
                           ("ignore_class", ignore_class)):
            if not is_one_of(value, _KERAS_DEFAULTS[key]):
                raise InputError(f"{type(self).__name__}({key}={value!r}): Keras' keyword, "
                                 f"which xpcnn's loss takes only as {_KERAS_ONLY[key]}")
        self.label_smoothing = label_smoothing
        self.from_logits = from_logits

    def __setattr__(self, name: str, value: Any) -> None:
        # (checked as the constructor checks them: a label_smoothing of 5 set later gave
        # losses of nothing; and a change counts, as a layer's Setting does)
        if name == "label_smoothing":
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0.0 <= value < 1.0):
                raise InputError(f"label_smoothing must be in [0, 1), got {value!r}")
            value = float(value)
        elif name == "from_logits" and value is not None and not isinstance(value, bool):
            raise InputError(f"from_logits must be True, False or None, got {value!r}")
        had, old = name in vars(self), vars(self).get(name)
        super().__setattr__(name, value)
        if had and name in _settings_of(type(self)) and not _same_value(old, value):
            SoftmaxCrossEntropy.settings_changes += 1

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, by name, with a subclass's class name (a subclass whose
        constructor takes more must give them too: :meth:`check_config`)."""
        # (from_logits only where set, the class only for a subclass: files and checkpoints of
        # the default stay as they were, and one written before resumes under the same compile)
        config = {"label_smoothing": self.label_smoothing,
                  **({} if self.from_logits is None else {"from_logits": self.from_logits})}
        if type(self) is SoftmaxCrossEntropy:
            return config
        init = type(self).__init__  # (a subclass's: those of the settings it takes, as it
        if not takes_keywords(init):  # sets the others itself, super().__init__(0.1))
            config = {k: v for k, v in config.items() if k in named_parameters(init)}
        return {"class": type(self).__name__, **config}

    def check_config(self) -> None:
        """Refuse to save a subclass whose constructor takes settings that its ``get_config()``
        does not give, or that gives settings the constructor does not take (run at save)."""
        config = self.get_config()
        if type(self) is not SoftmaxCrossEntropy:  # (xpcnn's own: its files name no class)
            check_config_class(self, config, "loss", "the constructor's arguments "
                               "({**super().get_config(), ...}: the class and the base's "
                               "settings)")
        # (Keras' keywords are not saved: xpcnn's constructor takes them only as what it does
        # anyway; a subclass that takes one itself is checked below, by its rebuilt copy)
        missing = unsaved_settings(self, config, (*_KERAS_DEFAULTS, *(
            () if self.from_logits is not None else ("from_logits",))))
        untaken = untaken_settings(self, config)
        if missing or untaken:
            raise InputError(
                f"loss class {type(self).__name__}'s get_config() " + (
                    f"does not return {missing}, which its constructor takes" if missing else
                    f"gives {untaken}, which its constructor does not take") +
                ": define get_config() returning the constructor's arguments (with "
                "super().get_config()), so that a saved model rebuilds it")
        settings = {k: v for k, v in config.items() if k != "class"}
        try:  # (as a file rebuilds it: a constructor that passes **kwargs on may refuse them)
            rebuilt = type(self)(**settings)
        except (TypeError, ValueError) as e:
            raise InputError(f"loss class {type(self).__name__} cannot be rebuilt from its "
                             f"get_config() {settings} ({e}): define get_config() returning "
                             "the constructor's arguments, so that a saved model rebuilds "
                             "it") from e
        # A subclass's Keras keyword passed on to this constructor changes nothing (taken only
        # as what it does); one the subclass keeps for itself (axis=1 meaning its own axis)
        # would load as its default: refused where the rebuilt loss differs from this one.
        unsaved = [k for k in _KERAS_DEFAULTS
                   if k not in config and k in named_parameters(type(self).__init__)]
        if unsaved and not _same_settings(rebuilt, self):
            raise InputError(
                f"loss class {type(self).__name__}'s get_config() does not return {unsaved}, "
                "which its constructor takes, and the loss rebuilt without them differs from "
                "this one: define get_config() returning the constructor's arguments (with "
                "super().get_config()), so that a saved model rebuilds it")

    def check_outputs(self, ends_in_softmax: bool, last: str) -> None:
        """Refuse a model whose outputs are not what ``from_logits`` says they are:
        ``ends_in_softmax``, whether the model ends in a softmax; ``last``, its last layer as
        an error names it."""
        if self.from_logits is True and ends_in_softmax:
            raise InputError(
                f"{type(self).__name__}(from_logits=True) takes the model's outputs as logits, "
                f"but its last {last} turns them into probabilities (Keras would apply the "
                "softmax twice): remove that softmax (predict then returns logits), or pass "
                "from_logits=False (or None) to train on the logits before it")
        if self.from_logits is False and not ends_in_softmax:
            raise InputError(
                f"{type(self).__name__}(from_logits=False) takes the model's outputs as "
                f"probabilities, but its last {last} gives logits, with no softmax after it "
                "(Keras would take the log of logits): end the model in Softmax() (or a "
                "softmax activation), or pass from_logits=True (or None)")

    def check_hooks(self) -> None:
        """Refuse (at compile) a subclass whose loss fit would not be the one it trains: one
        that writes its loss as Keras' ``call(y_true, y_pred)`` or overrides ``__call__``
        without overriding :meth:`forward` (xpcnn computes gradients without automatic
        differentiation, so fit trains by forward, which returns the gradient too), or a
        forward that cannot take ``(xp, logits, y, dtype, weights)`` (PyTorch's
        ``forward(input, target)``), which would fail deep inside the first step."""
        name = type(self).__name__
        if not self._replaced("forward"):
            written = [what for m, what in (("call", "defines call(), Keras' hook of a loss,"),
                                            ("__call__", "overrides __call__()"))
                       if defined_by(self, m) not in (None, SoftmaxCrossEntropy)]
            if written:
                raise InputError(
                    f"loss class {name} {' and '.join(written)} without overriding forward(): "
                    f"fit never calls {'them' if len(written) > 1 else 'it'}, and would "
                    "train and log xpcnn's cross-entropy instead. fit trains by " + _HOOK +
                    ", as xpcnn has no automatic differentiation to take the gradient of a "
                    "loss written as a function of y_pred; calling the loss object, "
                    "loss(y_true, y_pred), runs forward too. "
                    "Override forward instead (super().forward(xp, logits, y, dtype, "
                    "weights) gives the cross-entropy and its gradient)")
            return
        try:
            inspect.signature(self.forward).bind("xp", "logits", "y", "dtype", "weights")
        except TypeError:
            raise InputError(
                f"{name}.forward{inspect.signature(self.forward)} cannot take the arguments "
                "fit calls it with, (xp, logits, y, dtype, weights): a loss's forward is " +
                _HOOK + " (PyTorch's forward(input, target) is not this hook)") from None
        except ValueError:  # (no signature to read, a builtin's: the step's call says)
            pass

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """The mean loss of a batch, as Keras' and PyTorch's loss objects give it, called in
        Keras' order, ``loss(y_true, y_pred)`` (PyTorch's, ``loss(input, target)``, is the
        reverse): a 0-d array
        of ``y_pred``'s namespace and device (a torch tensor's too; ``float()`` reads it).
        ``y_pred`` (N, classes) are logits (``from_logits=True``, through :meth:`forward`, a
        subclass's own included; -inf gives a class probability 0, as PyTorch's
        ``cross_entropy`` takes it to mask classes, while +inf and NaN are refused) or
        probabilities (``False``; each row divided by its sum and clipped to [1e-7, 1 - 1e-7]
        before its log, as Keras does, so a probability that underflowed to 0 gives a finite
        loss; a subclass's :meth:`forward` is given that log, the logits a final softmax took
        up to a shift of each row, which the softmax ignores); ``None`` is refused, as it
        cannot say which. ``y_true``:
        integer labels (N,) or one-hot/probability rows, checked as ``fit`` checks them;
        ``sample_weight`` (N,): each sample's share, the weighted sum still divided by N (Keras'
        "sum_over_batch_size"). Computed in float32 or float64 (``y_pred``'s; float32 for a
        lower precision)."""
        if self.from_logits is None:
            raise InputError(
                f"{type(self).__name__}(from_logits=None) cannot tell whether y_pred holds "
                "logits or probabilities: construct it with from_logits=True (logits, as "
                "PyTorch's cross_entropy takes) or from_logits=False (probabilities, the "
                "outputs of a softmax) to call it")
        if array_api_compat.is_array_api_obj(y_pred):  # (torch's tensors have no
            xp = array_api_compat.array_namespace(y_pred)  # __array_namespace__)
        else:
            try:
                y_pred = np.asarray(y_pred)
            except Exception as e:  # (ragged lists and the like)
                raise InputError(f"y_pred must be an array of numbers: {e}") from e
            xp = array_api_compat.array_namespace(y_pred)
        if y_pred.ndim != 2 or y_pred.shape[0] == 0 or y_pred.shape[1] < 2:
            swapped = ""
            # (PyTorch's order, loss(input, target), is the reverse of Keras': its targets
            # are integers, int64 (or labels cast to float), and its inputs float scores)
            if y_pred.ndim == 1 and (xp.isdtype(y_pred.dtype, "integral") and _float_matrix(
                    y_true) or _labels_as_scores(y_true, y_pred)):
                swapped = (f": arguments swapped? {type(self).__name__} is called as Keras' "
                           "losses are, loss(y_true, y_pred); PyTorch's order, loss(input, "
                           "target), is the reverse")
            raise InputError(f"y_pred must be a batch of scores, shape (N, classes) with N >= 1 "
                             f"and at least 2 classes; got shape {tuple(y_pred.shape)}{swapped}")
        if not real_floating(xp, y_pred.dtype):
            raise InputError(f"y_pred must hold real floating-point scores, got dtype "
                             f"{y_pred.dtype}")
        n, classes = y_pred.shape
        dtype = xp.float64 if y_pred.dtype == xp.float64 else xp.float32
        z = xp.astype(y_pred, dtype, copy=False)
        device = array_api_compat.device(z)
        # (checked where it is, a device array on its device: one read of two counts, no copy)
        if self.from_logits:  # (a logit of -inf is a class of probability 0, as in PyTorch)
            flags = [xp.any(xp.isnan(z) | (z == xp.inf)),
                     xp.max(z, axis=1) == -xp.inf]  # (a row of no class: PyTorch's NaN)
        else:  # (a log of logits would be a wrong, finite loss)
            flags = [xp.logical_not(xp.all(xp.isfinite(z)))]
            sums = xp.sum(z, axis=1, dtype=xp.float64)
            # (bfloat16 keeps 8 significant bits: its softmax's rows sum to 1 within ~2^-8)
            tol = 1e-2 if dtype_name(y_pred.dtype) == "bfloat16" else 1e-3
            bad = (xp.min(z, axis=1) < 0) | (xp.abs(sums - 1) > tol)
            flags.append(bad)
        counts = to_host(xp.stack([xp.sum(xp.astype(f, xp.int64)) for f in flags]))
        if counts[0]:
            raise InputError("y_pred holds NaN or +inf values; logits must be finite, or -inf "
                             "for a class of probability 0" if self.from_logits else
                             "y_pred holds NaN or infinite values")
        if self.from_logits and counts[1]:
            i = int(xp.argmax(xp.astype(flags[1], xp.int8)))
            raise InputError(f"y_pred's row {i} is all -inf ({int(counts[1])} such rows): a "
                             "row of logits needs one finite value, a class of probability > 0")
        if not self.from_logits and counts[1]:
            i = int(xp.argmax(xp.astype(bad, xp.int8)))  # (the first such row)
            raise InputError(
                f"{type(self).__name__}(from_logits=False) takes y_pred as probabilities, "
                f"each row >= 0 and summing to 1; row {i} sums to {float(sums[i]):.6g} with a "
                f"least value of {float(xp.min(z[i, :])):.6g} ({int(counts[1])} such rows): "
                "pass logits to a loss with from_logits=True")
        y_true = to_host(y_true)
        try:
            length = np.shape(y_true)[:1]
        except ValueError:  # (ragged lists: as_labels says so)
            length = ()
        if length and length[0] != n:  # (as_labels would name x: here it is y_pred)
            raise InputError(f"y_true has {length[0]} labels but y_pred has {n} rows; they must "
                             f"match (got y_true.shape = {np.shape(y_true)})")
        targets, _ = as_labels(y_true, n, classes, "y_true")
        t = xp.asarray(targets, device=device)
        if t.ndim == 2:
            t = xp.astype(t, dtype)
        w = None
        if sample_weight is not None:
            w = xp.asarray(as_sample_weights(to_host(sample_weight), n, dtype=np.dtype(
                np.float64 if dtype == xp.float64 else np.float32)), device=device)
        if self.from_logits:  # (asarray: NumPy's sums are scalars, not 0-d arrays)
            return xp.asarray(self.forward(xp, z, t, dtype, w)[0])
        # (Keras' log of probabilities: normalised, then clipped, so a probability that
        # underflowed to 0 gives a large finite loss, not inf and a divide-by-zero warning)
        logp = xp.log(xp.clip(z / xp.sum(z, axis=1, keepdims=True), 1e-7, 1.0 - 1e-7))
        if self._replaced("forward"):  # (the subclass's loss, as evaluate computes it: a
            # softmax of log(p) is p; was the plain cross-entropy, not the loss fit trains)
            return xp.asarray(self.forward(xp, logp, t, dtype, w)[0])
        # (probabilities: the cross-entropy of log(p), no softmax; no gradient wanted here)
        return xp.asarray(nll(xp, logp, self.targets(xp, t, classes, dtype), w))

    def _replaced(self, method: str) -> bool:
        """Whether a subclass (or the instance) replaces ``method``."""
        return defined_by(self, method) is not SoftmaxCrossEntropy

    def _fused(self) -> bool:
        """Whether a step may take the fused kernels: not where :meth:`forward` or
        :meth:`targets` is replaced, which those would bypass."""
        return not (self._replaced("forward") or self._replaced("targets"))

    def targets(self, xp: Any, y: Any, classes: int, dtype: Any) -> Any:
        """Integer labels (N,) or one-hot rows (N, classes) -> smoothed probability rows."""
        return target_rows(xp, y, classes, dtype, self.label_smoothing)

    def forward(self, xp: Any, logits: Any, y: Any, dtype: Any, weights: Any = None
                ) -> tuple[Any, Any]:
        """Returns (loss as a 0-d array, gradient with respect to ``logits``), both computed in
        ``dtype`` (float32 under mixed precision). ``weights`` (N,): each sample's share of
        the loss, as Keras' ``sample_weight`` (the weighted sum divided by N)."""
        z = xp.astype(logits, dtype, copy=False)
        return cross_entropy(xp, z, self.targets(xp, y, z.shape[1], z.dtype), weights)

    def forward_with_accuracy(self, xp: Any, logits: Any, y: Any, dtype: Any,
                              kernels: Any, scale: Any = None, weights: Any = None,
                              class_weights: Any = None) -> tuple[Any, Any]:
        """:meth:`forward` with the count of rows predicted right (first maximum at the target's
        class): ([loss, count] as one (2,) float32 or float64 array, gradient). The targets
        (integer labels or one-hot rows), ``weights`` and ``class_weights`` (classes,) (fit's
        ``class_weight``: each sample's weight times its class's) go to ``kernels`` (on a GPU
        one launch instead of ~20, or ~33 for one-hot rows or weights). A target that names no
        class (a label out of range, a one-hot row that is no probabilities) makes the loss and
        the count NaN, on the device: the step is skipped as a non-finite one, never trained on
        a wrong loss.
        With ``scale`` (the float16 loss-scaling state, on the device), the gradient is of the
        loss times ``scale[0]`` (on a GPU in the same launch). The gradient is given in the
        logits' dtype (float16 under mixed precision, cast on a GPU in the same launch).
        ``weights`` (N,) weigh the loss (:meth:`forward`), not the count: accuracy stays the
        share of samples predicted right, as Keras' ``metrics`` (not ``weighted_metrics``).
        A subclass's own :meth:`forward` computes the loss and gradient on every path."""
        if self._fused():  # (the kernels cast the logits, on a GPU in the same launch)
            return kernels.softmax_cross_entropy(logits, y, self.label_smoothing, scale, dtype,
                                                 weights, class_weights)
        weights = class_weighted(xp, y, weights, class_weights)
        z = xp.astype(logits, dtype, copy=False)
        loss, grad = self.forward(xp, z, y, dtype, weights)
        shapes = [getattr(a, "shape", None) for a in (loss, grad)] if self._replaced(
            "forward") else []
        if shapes and shapes != [(), z.shape]:  # (a subclass's forward: refused here, not
            # deep inside)
            raise InputError(f"{type(self).__name__}.forward must return (the loss as a 0-d "
                             f"array, its gradient shaped as the logits {tuple(z.shape)}); it "
                             f"returned arrays of shapes {shapes[0]} and {shapes[1]}")
        stats = nan_unless_classes(xp, loss_and_correct(xp, loss, z, y), y, z.shape[1])
        grad = grad if scale is None else grad * scale[0]
        return stats, xp.astype(grad, logits.dtype, copy=False)


LOSS_CLASSES["SoftmaxCrossEntropy"] = SoftmaxCrossEntropy


def loss_from_config(config: dict[str, Any]) -> SoftmaxCrossEntropy:
    """The loss a file's compile settings describe: xpcnn's, or a user's subclass, known once
    defined (a clear error otherwise)."""
    config = dict(config)
    cls = registered(LOSS_CLASSES, config.pop("class", "SoftmaxCrossEntropy"), "loss")
    return cls(**config)


LOSSES = {"cross_entropy": SoftmaxCrossEntropy,
          "categorical_crossentropy": SoftmaxCrossEntropy,
          "sparse_categorical_crossentropy": SoftmaxCrossEntropy}


_TORCH_LOSS = (
    "xpcnn's loss is SoftmaxCrossEntropy, its softmax fused in: PyTorch's CrossEntropyLoss on "
    "logits is compile(loss='sparse_categorical_crossentropy') (or 'cross_entropy') after a "
    "last Dense(classes) with no softmax, and log_softmax + nll_loss the same (leave the "
    "log_softmax out); CrossEntropyLoss(weight=w) is " + _CLASS_WEIGHT)
#: PyTorch's names of the cross-entropy, lower case and without "_": as a string, or as a
#: torch class's or function's name.
_TORCH_LOSS_NAMES = frozenset(("crossentropyloss", "nllloss", "nll", "nllloss2d",
                               "crossentropy", "logsoftmax"))


def _torch_loss(loss: Any) -> str | None:
    """What PyTorch names ``loss``, where it is PyTorch's cross-entropy (its name, its class,
    an instance, or a function of torch.nn.functional), else None."""
    if isinstance(loss, str):
        return loss if loss.lower().replace("_", "") in _TORCH_LOSS_NAMES else None
    named = loss if isinstance(loss, type) or callable(loss) and hasattr(loss, "__name__") \
        else type(loss)
    module = getattr(named, "__module__", None) or ""
    name = getattr(named, "__name__", "")
    if module.startswith("torch") and name.lower().replace("_", "") in _TORCH_LOSS_NAMES:
        return name
    return None


def get_loss(loss: str | SoftmaxCrossEntropy) -> SoftmaxCrossEntropy:
    if isinstance(loss, SoftmaxCrossEntropy):
        loss.check_hooks()
        return loss
    # Keras' per-output forms: a model has one output, so [loss] is loss (as [y] is y)
    if isinstance(loss, list | tuple) and len(loss) == 1:
        return get_loss(loss[0])
    if isinstance(loss, list | tuple | dict):
        raise InputError(
            f"compile's loss must be one loss, got a {type(loss).__name__} ({loss!r}): an xpcnn "
            "model has one output, so pass its loss itself (a name such as "
            f"'sparse_categorical_crossentropy' or a SoftmaxCrossEntropy), not one per output")
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]()
    torch = _torch_loss(loss)
    if torch is not None:  # (was: Keras' advice on a function of one's own, for torch's)
        raise InputError(f"unknown loss {loss!r}, PyTorch's {torch}: " + _TORCH_LOSS)
    binary = isinstance(loss, str) and "binary" in loss.lower()
    raise InputError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)} "
                     "or a SoftmaxCrossEntropy instance" + (
                         ": xpcnn has no sigmoid (binary) loss; for two classes, end the "
                         "model in Dense(2) (no activation, or a softmax) and use "
                         "'sparse_categorical_crossentropy' with labels 0 and 1, the same "
                         "model as Keras' Dense(1, activation='sigmoid') with "
                         "binary_crossentropy" if binary else
                         f": pass an instance, {loss.__name__}(), not the class" if isinstance(
                             loss, type) and issubclass(loss, SoftmaxCrossEntropy) else
                         f": a loss of one's own (a function, Keras' way) is a subclass of "
                         f"SoftmaxCrossEntropy overriding {_HOOK}, as xpcnn has no automatic "
                         "differentiation to take the gradient of a loss written as a "
                         "function of y_pred (super().forward(xp, logits, y, dtype, weights) "
                         "gives the cross-entropy and its gradient)" if callable(loss) else ""))


_CROSS_ENTROPY = (
    "xpcnn's loss is SoftmaxCrossEntropy, for integer labels and one-hot rows alike: "
    "{cls}(from_logits=True) is SoftmaxCrossEntropy(from_logits=True), and compile(loss="
    "'{function}') takes the name")
_FUNCTION = (
    "xpcnn's is the loss object's call, SoftmaxCrossEntropy(from_logits=...)(y_true, y_pred): "
    "the batch's mean (Keras' function gives each sample's loss); compile(loss='{function}') "
    "takes the name")
_BINARY = ("xpcnn has no sigmoid (binary) loss: for two classes, end the model in Dense(2) and "
           "use SoftmaxCrossEntropy (compile(loss='sparse_categorical_crossentropy')) with "
           "labels 0 and 1")
_CLASSIFIER = "xpcnn trains classifiers: its one loss is SoftmaxCrossEntropy"

#: Keras 3's loss names that xpcnn lacks: (the xpcnn names the advice gives, which exist, the
#: advice). Not aliases: xpcnn has one loss.
KERAS_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    **{cls: (("SoftmaxCrossEntropy",), _CROSS_ENTROPY.format(cls=cls, function=function))
       for cls, function in (("SparseCategoricalCrossentropy", "sparse_categorical_crossentropy"),
                             ("CategoricalCrossentropy", "categorical_crossentropy"))},
    **{function: (("SoftmaxCrossEntropy",), _FUNCTION.format(function=function))
       for function in ("sparse_categorical_crossentropy", "categorical_crossentropy")},
    "BinaryCrossentropy": (("SoftmaxCrossEntropy",), _BINARY),
    "binary_crossentropy": (("SoftmaxCrossEntropy",), _BINARY),
    **{name: (("SoftmaxCrossEntropy",), _CLASSIFIER)
       for name in ("MeanSquaredError", "mean_squared_error", "MeanAbsoluteError", "Huber")},
    "Loss": (("SoftmaxCrossEntropy",), (
        "a loss of one's own subclasses SoftmaxCrossEntropy, overriding " + _HOOK
        + ", as xpcnn has no automatic differentiation")),
}



if not TYPE_CHECKING:  # (hidden from type checkers, which then still flag a typo)
    __getattr__ = keras_names(__name__, KERAS_NAMES, "Keras' name")
