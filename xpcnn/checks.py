"""Validation of what users hand to the public API, done on the host before any work starts."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import inspect
import math
import numbers
import os
import reprlib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from .errors import InputError, NonFiniteError, of_xpcnn, warn
from .files import (
    STREAM_NAMES,
    check_name_length,
    names_a_folder,
    standard_stream,
    try_writing_in,
    written_file,
)


@functools.cache
def real_floating(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` (of namespace ``xp``) is a real floating dtype, ml_dtypes' bfloat16
    included: NumPy's ``isdtype`` refuses it with a bare TypeError, ``issubdtype`` says no."""
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:
        return getattr(dtype, "name", None) == "bfloat16"


def largest_value(xp: Any, dtype: Any) -> Any:
    """The largest finite value of real ``dtype`` (of namespace ``xp``), finfo's or iinfo's;
    for ml_dtypes' bfloat16, which has no NumPy finfo, float32's, which it ends just below."""
    if getattr(dtype, "name", None) == "bfloat16":
        return xp.finfo(xp.float32).max
    return (xp.finfo if real_floating(xp, dtype) else xp.iinfo)(dtype).max


def real_numbers(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` holds real numbers: integers (not booleans) or real floats."""
    try:
        return real_floating(xp, dtype) or bool(xp.isdtype(dtype, "integral"))
    except TypeError:  # (ml_dtypes' other dtypes, float8...)
        return False


def as_images(x: Any, what: str = "x") -> np.ndarray:
    """A real-valued host array with a leading batch axis and at least one sample; booleans
    (0/1 masks) are taken as the uint8 images 0 and 1 (a view, no copy), as Keras takes
    them."""
    if hasattr(x, "__array_namespace__") and not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a NumPy array on the host (xpcnn moves each batch to "
                         f"the model's device itself), got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{what} must be an array of numbers: {e}") from e
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if not real_numbers(np, arr.dtype):
        raise InputError(f"{what} must hold real numbers (uint8 or float images), got dtype "
                         f"{arr.dtype}")
    if arr.ndim < 2:
        raise InputError(f"{what} must have a batch axis and per-sample axes, e.g. (N, H, W, C); "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"{what} is empty: shape {arr.shape}")
    return arr


def check_sample_shape(x: np.ndarray, expected: tuple[int, ...], what: str = "x",
                       keeps_weights: Callable[[tuple[int, ...]], bool] | None = None) -> None:
    """``x`` has the per-sample shape ``expected``; where not, the error says what the shape
    suggests (a missing batch axis, channels first...), or, where ``keeps_weights(sample)``
    (the model's :meth:`~xpcnn.Model._keeps_weights_for`) says its layers keep their weights
    built for these samples (a model of convolutions and global pooling given images of
    another size), that ``model.build`` rebuilds it for them."""
    sample, expected = tuple(x.shape[1:]), tuple(expected)
    if sample != expected:
        hint = ""
        if tuple(x.shape) == expected:
            hint = f": one sample? add the batch axis, {what}[None]"
        elif len(sample) == len(expected) == 3 and sample == (expected[2], *expected[:2]):
            hint = (f": channels first (N, C, H, W), as PyTorch keeps images? pass "
                    f"{what}.transpose(0, 2, 3, 1)")
        elif expected[1:] == sample:  # (Keras' model.build((32, H, W, C)): a batch of 32)
            hint = (f": was the model built with a batch size first? build takes the "
                    f"per-sample shape {sample} or {(None, *sample)}; build a new model so")
        elif keeps_weights is not None and len(sample) == len(expected) and \
                keeps_weights(sample):
            hint = (f": model.build({(None, *sample)}) rebuilds it for these "
                    f"{'images' if len(sample) == 3 else 'samples'}, keeping its weights")
        raise InputError(f"{what} has per-sample shape {sample} but the model expects "
                         f"{expected} (inputs are (N, H, W, C)); got {what}.shape = "
                         f"{x.shape}{hint}")


def is_float32(dtype: Any) -> bool:
    """Whether ``dtype`` (a name, NumPy's type or dtype) is float32."""
    try:
        return np.dtype(dtype) == np.float32
    except (TypeError, ValueError):
        return False


def is_one_of(value: Any, accepted: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``accepted``, of the same type (True is no 1; a list is
    read as a tuple): a keyword of another library given the value that is xpcnn's behaviour
    (Keras' defaults for layers, PyTorch's for optimisers)."""
    value = tuple(value) if isinstance(value, list) else value
    return any(type(value) is type(a) and value == a for a in accepted)


def take_foreign_keywords(call: str, kwargs: dict[str, Any],
                          table: Mapping[str, tuple[tuple[Any, ...], str]], whose: str,
                          what: str = "") -> None:
    """Take out of ``kwargs`` another library's keywords (``whose``: "PyTorch's") that
    ``call`` does not take: one given that library's default (``table[key][0]``), which is
    xpcnn's behaviour, is dropped; another value is refused naming xpcnn's way
    (``table[key][1]``), where it was a bare TypeError. Keys not in ``table`` are left for
    Python's own TypeError."""
    for key in [k for k in kwargs if k in table]:
        defaults, instead = table[key]
        if is_one_of(kwargs[key], defaults):
            del kwargs[key]
            continue
        raise InputError(f"{call}({key}={reprlib.repr(kwargs[key])}): {whose} keyword, which "
                         f"xpcnn's{' ' + what if what else ''} does not take: {instead}")


def looks_channels_first(sample: tuple[int, ...]) -> bool:
    """Whether per-sample ``sample`` looks like images laid out (C, H, W), as PyTorch keeps
    them: 1 or 3 rows of more than 4 pixels' width and channels."""
    return len(sample) == 3 and sample[0] in (1, 3) and min(sample[1:]) > 4


def warn_channels_first(sample: tuple[int, ...], what: str, fix: str) -> None:
    """The warning of a model built for a per-sample ``sample`` that looks channels-first
    (it would train, meaninglessly, on 3-pixel-high images of 32 channels): one text and one
    class, whether the first data or a declared shape builds it, so one filter covers both."""
    if looks_channels_first(sample):
        warn(f"{what} has per-sample shape {sample}, which looks like channels-first images "
             f"(C, H, W), as PyTorch keeps them; xpcnn reads (H, W, C), so the model is built "
             f"for {sample[0]}x{sample[1]} images of {sample[2]} channels. {fix}", UserWarning)


# (set while a model is built for a shape already warned of, or never to be: see warned_shape)
_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("xpcnn_warned_shape",
                                                              default=False)


def shape_to_build(sample: tuple[int, ...], what: str = "x") -> tuple[int, ...]:
    """The per-sample shape of the first data a model sees, which it is built for; a warning
    where it looks like channels-first images (:func:`warn_channels_first`; the build follows
    under :func:`warned_shape`)."""
    sample = tuple(int(d) for d in sample)
    warn_channels_first(sample, what, f"Pass {what}.transpose(0, 2, 3, 1), or declare the "
                        "input shape (H, W, C) before")
    return sample


@contextlib.contextmanager
def warned_shape() -> Iterator[None]:
    """While a model is built for a shape it gives no declared-shape warning for: the first
    data's (:func:`shape_to_build` warned already), or a model file's or configuration's (it
    was warned of when first declared, not at every load)."""
    token = _WARNED.set(True)
    try:
        yield
    finally:
        _WARNED.reset(token)


def shape_warned() -> bool:
    """Whether a model is being built for a shape it gives no declared-shape warning for (see
    :func:`warned_shape`)."""
    return _WARNED.get()


def declared_shape(sample: tuple[int, ...], model_name: str) -> None:
    """Model.build's warning where the shape declared (Input(shape), input_shape=, build())
    looks channels-first (not while :func:`warned_shape`)."""
    if shape_warned():
        return
    h, w, c = sample if len(sample) == 3 else (0, 0, 0)
    warn_channels_first(sample, f"the input of model {model_name!r}",
                        f"Declare {(w, c, h)} and pass images as x.transpose(0, 2, 3, 1)")


def as_labels(y: Any, n: int, classes: int, what: str = "y", index: Any = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels (N,) or one-hot/probability rows (N, classes); labels (N, 1), as
    ``keras.datasets`` gives them (or a float column, read from a CSV file), are taken as (N,)
    (a classifier has at least 2 classes, so they cannot be one-hot rows); float labels must
    be whole numbers. Booleans are the integers 0 and 1, as Keras takes them; rows of
    integers (N, classes), as ``pd.get_dummies`` and ``np.eye(classes, dtype=int)[y]`` give
    them, are one-hot rows, taken as float32 (checked as probabilities: each a single 1).

    Returns (targets, float32 where integer rows were given, else as given; int64 class
    indices) after checking lengths and ranges. Errors
    name the first bad label: ``what[index[i]]`` where ``y`` is a batch of a dataset's samples
    ``index`` (a shuffled batch's position would not find it), its position in ``y`` otherwise.
    """
    # (Keras' targets keyed by output name: was "a single value")
    refuse_keyed(y, what, f"labels are one array, integer labels ({n},) or one-hot rows "
                          f"({n}, {classes})")
    try:
        arr = np.asarray(y)
    except Exception as e:
        raise InputError(f"{what} must be an array of labels: {e}") from e
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    integer, floating = np.issubdtype(arr.dtype, np.integer), real_floating(np, arr.dtype)
    if arr.ndim == 2 and arr.shape[1] == 1 and classes > 1 and (integer or floating):
        arr = arr[:, 0]
    elif arr.ndim == 2 and arr.shape[1] == classes and integer:
        # (the loss's targets are floats; 0 and 1 are exact in float32, and a row of other
        # integers is refused below as no probabilities)
        arr, integer, floating = arr.astype(np.float32), False, True
    check_label_layout(arr.shape, integer, floating, arr.dtype, n, classes, what)

    def named(i: int, kind: str) -> str:  # (the i-th of this batch, as the user finds it)
        return f"{kind} {i}" if index is None else f"{what}[{int(index[i])}]"

    if arr.ndim == 1:
        if floating and not np.all(arr == np.round(arr)):
            bad = np.flatnonzero(arr != np.round(arr))  # (NaN compares unequal)
            nans = int(np.isnan(arr[bad]).sum())
            holding = f" holding NaN ({nans} labels)" if nans else ""
            raise InputError(f"{what} must be integer class labels, got dtype {arr.dtype}"
                             f"{holding}: {named(int(bad[0]), 'label')} is {arr[bad[0]]}, one "
                             f"of {bad.size} that are not whole numbers")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= classes:
            bad = np.flatnonzero((arr < 0) | (arr >= classes))
            raise InputError(f"labels in {what} must be in [0, {classes - 1}] for a model of "
                             f"{classes} classes; found values from {lo} to {hi}: "
                             f"{named(int(bad[0]), 'label')} is {arr[bad[0]]}, the first of "
                             f"{bad.size} out of range")
        labels = arr.astype(np.int64)
        return labels, labels
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(f"one-hot {what} holds NaN or infinite values: "
                         f"{named(int(bad[0]), 'row')} is the first of {bad.size} such rows")
    # (the loss's gradient, softmax - target, holds for rows of probabilities only)
    sums = arr.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero((arr.min(axis=1) < 0) | (np.abs(sums - 1) > 1e-3))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"one-hot {what} must hold probabilities, each row >= 0 and summing "
                         f"to 1; {named(i, 'row')} sums to {sums[i]:.6g} with a least value "
                         f"of {arr[i].min():.6g} ({bad.size} such rows)")
    return arr, np.argmax(arr, axis=1).astype(np.int64)


def refuse_keyed(value: Any, what: str, whose: str, name: str | None = None) -> None:
    """Refuse ``value`` where it is a dict, Keras' labels or weights keyed by output name:
    ``whose`` says what the one output takes instead; ``name`` is the value in the hint."""
    if isinstance(value, Mapping):
        keys = list(value)
        name = name or what
        hint = "" if len(keys) != 1 else f"; pass {name}[{keys[0]!r}] itself" \
            if name.isidentifier() else f"; pass the array under {keys[0]!r} itself"
        raise InputError(f"{what} is a dict (keys {keys[:5]}): an xpcnn model has one output, "
                         f"whose {whose}, not keyed by output name{hint}")


def as_sample_weights(w: Any, n: int, what: str = "sample_weight", dtype: Any = np.float64,
                      index: Any = None) -> np.ndarray:
    """Per-sample weights of the loss: N finite numbers >= 0, shape (N,) or (N, 1) (Keras
    takes both), as a host array (N,) of ``dtype`` (checked after the cast: a weight too
    large for it is refused, not made infinite). ``index``: the samples' numbers in a dataset,
    which errors name (their positions in ``w`` otherwise)."""
    refuse_keyed(w, what, f"sample weights are one array ({n},)")  # (was: "dtype object")
    try:
        arr = np.asarray(w)
    except Exception as e:
        raise InputError(f"{what} must be an array of one weight a sample: {e}") from e
    if not real_numbers(np, arr.dtype):
        raise InputError(f"{what} must hold real numbers, one weight a sample, got dtype "
                         f"{arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 0:  # (refused, as Keras 3 refuses it: one way to weigh, an array)
        v = arr.item()
        fix = f"to weigh every sample {v!r}, pass np.full({n}, {v!r}) (which multiplies the " \
            "loss by it)" if math.isfinite(v) and v >= 0 else "weights must be finite and >= 0"
        raise InputError(f"{what} is one number, {v!r}, where it takes one weight for each of "
                         f"the {n} samples, shape ({n},): {fix}")
    if arr.shape != (n,):
        raise InputError(f"{what} must have one weight for each of the {n} samples, shape "
                         f"({n},); got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = arr.astype(dtype)
    bad = np.flatnonzero(~np.isfinite(cast) | (cast < 0))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{what} must be finite (in {np.dtype(dtype)}) and >= 0; sample "
                         f"{i if index is None else int(index[i])} has weight "
                         f"{arr[i].item()!r} ({bad.size} such samples)")
    return cast


def check_class_weight_type(class_weight: Any) -> None:
    """Keras' ``class_weight``: None or a dict (its keys and values are checked against the
    model once it is built, :func:`as_class_weights`)."""
    if class_weight is not None and not isinstance(class_weight, Mapping):
        raise InputError("class_weight must be a dict mapping class indices to weights, e.g. "
                         f"{{0: 1.0, 1: 5.0}}, got {type(class_weight).__name__}")
    if class_weight and any(isinstance(v, Mapping) for v in class_weight.values()):
        # (Keras' class weights keyed by output name, {"out": {0: 1.0, 1: 2.0}})
        refuse_keyed(class_weight, "class_weight", "class weights are one dict mapping class "
                     "indices to weights, e.g. {0: 1.0, 1: 5.0}")


def as_class_weights(class_weight: Any, classes: int, dtype: Any = np.float64) -> np.ndarray:
    """Keras' ``class_weight``, a dict {class index: weight}, as a float64 host table
    (classes,) of weights >= 0 and finite in ``dtype`` (the model's, which the steps weigh in:
    1e39 would become infinity in float32, and every weight NaN); a class it leaves out weighs
    1, as in Keras."""
    check_class_weight_type(class_weight)
    table = np.ones(classes, np.float64)
    for key, value in class_weight.items():
        if isinstance(key, bool | np.bool_) or not isinstance(key, numbers.Integral) or \
                not 0 <= int(key) < classes:
            raise InputError(f"class_weight's keys must be class indices in [0, {classes - 1}] "
                             f"for a model of {classes} classes (its output's size), got "
                             f"{key!r}")
        what = f"class_weight[{int(key)}]"
        table[int(key)] = number(value, what, 0.0)
        with np.errstate(over="ignore"):
            if not np.isfinite(np.asarray(table[int(key)]).astype(dtype)):
                raise InputError(f"{what} must be finite in {np.dtype(dtype)}, the model's "
                                 f"dtype, which weighs the loss (at most "
                                 f"{float(np.finfo(dtype).max):.6g}), got {value!r}")
    return table


def check_weighted_classes(weights: np.ndarray, targets: np.ndarray, table: np.ndarray,
                           what: str = "sample_weight", index: Any = None) -> None:
    """Refuse sample ``weights`` (N,) whose product with their samples' class weights
    (``table``, :func:`as_class_weights`; ``targets``: class labels (N,) or one-hot rows)
    overflows the weights' dtype, in which a step multiplies them (the loss would be NaN).
    ``index``: the samples' numbers in a dataset, which errors name (positions otherwise)."""
    dtype = weights.dtype
    labels = np.asarray(targets)
    labels = labels if labels.ndim == 1 else np.argmax(labels, axis=1)
    # (a label that is no class weighs 0, and is named by the labels' own check)
    known = (labels >= 0) & (labels < table.shape[0])
    per_class = np.where(known, table.astype(dtype)[np.where(known, labels, 0).astype(np.int64)],
                         0)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = np.flatnonzero(~np.isfinite(weights * per_class.astype(dtype)))
    if bad.size:
        i = int(bad[0])
        c = int(labels[i])
        raise InputError(f"{what} times class_weight must be finite in {dtype}, the model's "
                         f"dtype (at most {float(np.finfo(dtype).max):.6g}); sample "
                         f"{i if index is None else int(index[i])} has weight "
                         f"{weights[i].item():.7g} and class {c}, whose class_weight[{c}] is "
                         f"{table[c].item():.7g}: their product overflows ({bad.size} such "
                         "samples)")


def check_label_layout(shape: tuple[int, ...], integral: bool, floating: bool, dtype: Any,
                       n: int, classes: int, what: str = "y") -> None:
    """The shape and dtype of labels, before their values (which may wait on a device, see
    ``Trainer.train_step``): integer or float class labels (n,), or float rows (n, classes)."""
    if not shape:  # (a number, a string: not "0 labels")
        raise InputError(f"{what} must be an array of labels, one for each of the {n} "
                         f"samples, got a single value (shape (), dtype {dtype})")
    if shape[0] != n:
        images = "x" + what[1:] if what.startswith("y") else "x"  # (y_val's are x_val)
        raise InputError(f"{what} has {shape[0]} labels but {images} has {n} samples; they "
                         f"must match (got {what}.shape = {tuple(shape)})")
    if len(shape) == 1 and not (integral or floating):
        raise InputError(f"{what} must be integer class labels, got dtype {dtype}")
    if len(shape) == 2 and shape[1] == classes and not floating:
        raise InputError(f"one-hot {what} must be floats (probabilities), got dtype {dtype}: "
                         f"pass {what}.astype('float32'), or the class indices "
                         f"{what}.argmax(axis=1)")
    if len(shape) not in (1, 2) or len(shape) == 2 and shape[1] != classes:
        raise InputError(f"{what} must be integer labels of shape ({n},) or one-hot rows of "
                         f"shape ({n}, {classes}); got shape {tuple(shape)} and dtype {dtype}")


def positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def flag(value: Any, what: str) -> bool:
    """True or False itself: a truthy stand-in ("no", None, 1) would be taken silently."""
    if not isinstance(value, bool | np.bool_):
        raise InputError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def verbosity(value: Any) -> int:
    """Keras' ``verbose``: 0 (silent), 1 (a progress bar), 2 (a line an epoch, or one after
    evaluate or predict, for log files) or "auto" (1); False and True are 0 and 1, as Keras
    takes them."""
    if isinstance(value, str) and value == "auto":
        return 1
    if isinstance(value, bool | np.bool_):
        return int(value)
    if not isinstance(value, int | np.integer) or value not in (0, 1, 2):
        raise InputError(f"verbose must be 0 (silent), 1 (a progress bar), 2 (a line an epoch), "
                         f"'auto' or True/False, got {value!r}")
    return int(value)


def number(value: Any, what: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) within optional bounds, as a float.

    ``low_open`` / ``high_open`` exclude the bound itself, so (0, 1] is ``low=0, low_open=True,
    high=1``.
    """
    ok = (not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
          and math.isfinite(float(value)))
    if ok:
        v = float(value)
        ok = ((low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        if low is None and high is None:
            want = "a finite number"
        elif high is None:
            want = f"a number {'>' if low_open else '>='} {low:g}"
        elif low is None:
            want = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            want = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                    f"{')' if high_open else ']'}")
        raise InputError(f"{what} must be {want}, got {value!r}")
    return float(value)


def name(value: Any, what: str = "name") -> str:
    """A non-empty string naming a layer or model."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty string, got {value!r}")
    return value


def check_finite(x: np.ndarray, what: str = "x", index: Any = None,
                 limit: tuple[str, float] | None = None) -> None:
    """Refuse NaN or infinite values in float data, naming the first sample that holds one
    (``what[index[i]]`` where ``x`` is a batch of a dataset's samples ``index``); ``limit``:
    (a float dtype the model computes in, its largest value), beyond which finite values that
    it rounds to infinity are refused too: from that value plus half its last step on
    (65520 for float16, whose 65519 rounds down to 65504).

    Runs in chunks of samples, so it needs no temporary as large as ``x``.
    """
    dtype, largest = limit or (str(x.dtype), np.inf)
    floating = real_floating(np, x.dtype)
    # (in Python floats: a comparison in x's dtype would warn of its own overflow)
    if largest >= float(largest_value(np, x.dtype)):
        if not floating:
            return  # integer images cannot hold NaN or infinity, nor values beyond the limit
        within = np.isfinite
    else:  # (one test for both: NaN compares False; no abs(), which overflows int8's -128)
        bound = rounding_bound(largest, x.dtype if floating else None)

        def within(a: np.ndarray) -> np.ndarray:
            return (a > -bound) & (a < bound)
    rows = max(1, (1 << 22) // max(1, x[0].size))
    for start in range(0, len(x), rows):
        good = within(x[start:start + rows]).reshape(min(rows, len(x) - start), -1)
        bad = np.flatnonzero(~good.all(axis=1))
        if bad.size:
            i = start + int(bad[0])
            where = np.argwhere(~within(x[i]))
            first = tuple(int(k) for k in where[0])
            value = x[i][first]
            if np.isfinite(value):
                problem = (f"values too large for {dtype}, the dtype the model computes in (at "
                           f"most {largest:.5g}), where they would be infinite")
                fix = "rescale the data or remove those samples"
            else:
                problem, fix = "NaN or infinite values", "remove or repair those samples"
            sample = f"sample {i}" if index is None else f"{what}[{int(index[i])}]"
            raise NonFiniteError(f"{what} holds {problem}: {sample}, the first such sample, "
                                 f"has {len(where)} (the first is {value} at {first}); {fix}"
                                 + (" (nothing was run)" if index is None else ""))


def rounding_bound(largest: float, dtype: Any = None) -> Any:
    """The least magnitude a float dtype of largest value ``largest`` rounds to infinity:
    ``largest`` plus half its last step (round to nearest even: the tie goes up, its last bit
    being odd), the midpoint between ``largest`` and the next power of two. With ``dtype``
    (a float dtype of the values compared), as a scalar of it that ``< bound`` tells the same
    of its values: rounded up where it cannot hold the bound (bfloat16 data, 65536)."""
    bound = (2.0 ** math.frexp(largest)[1] + largest) / 2
    if dtype is None:
        return bound
    kind = np.dtype(dtype).type
    with np.errstate(over="ignore"):  # (beyond dtype's range: infinity, above all its values)
        held = kind(bound)
    return held if float(held) >= bound else np.nextafter(held, kind(np.inf))


def file_path(path: Any, what: str) -> str:
    """A non-empty str or path-like object, as a str."""
    if not isinstance(path, str | os.PathLike) or not isinstance(os.fspath(path), str) \
            or not os.fspath(path):
        raise InputError(f"{what} must be a file path, got {path!r}")
    return os.fspath(path)


#: Why a file that is the process's standard output or error is not written by name, and
#: what to do instead.
def stream_as_file(replaced: bool) -> str:
    """Why a path that is this process's output, redirected to a file, is refused, and what
    instead: a file written in place (a figure, a CSVLogger's) also goes into a pipe; one
    written anew and renamed over the old is refused a pipe too."""
    return ("written by name, it would overwrite what is printed there, or be overwritten by "
            "it; give a file of its own" + ("" if replaced else
                                            ", or pipe the output (| cat > file), which is "
                                            "then written in place"))


class PathProblem(NamedTuple):
    """Why a file cannot be written at a path (:func:`output_file_problem`), for its caller to
    word: ``kind`` "names a folder" (a last component ``.`` or ``..``, or a separator at the
    end), "is a folder", "not a regular file", "standard output" or "standard error" (the
    process's own, redirected to the regular file ``folder``), "no folder"
    (``folder``, where the file or its missing folders would go, is not an existing folder) or
    "cannot write" (in ``folder`` where it is known); ``error``, the OSError behind the last
    two."""

    kind: str
    folder: str = ""
    error: OSError | None = None


def output_file_problem(path: str, replaced: bool = True, new_folders: bool = True
                        ) -> PathProblem | None:
    """What keeps a file from being written at ``path`` (a non-empty str), or None. The
    checks of :func:`output_file` (which says what each is for) and of the command line's
    output flags (:func:`xpcnn.cli.output_file`), which word the problem each their own way.
    With ``new_folders`` (the writers make them) the file's folder may be missing, below an
    existing one; else it must exist."""
    if names_a_folder(path):
        return PathProblem("names a folder")
    try:
        target = written_file(path)  # (a link's target is what gets written)
    except OSError as e:  # (links in a loop; a ".." after something that is not a folder)
        return PathProblem("cannot write", error=e)
    if os.path.isdir(target):
        return PathProblem("is a folder")
    if os.path.exists(target) and not os.path.isfile(target):  # (a device, a pipe)
        if replaced:
            return PathProblem("not a regular file")
        if not os.access(target, os.W_OK):  # (opened in place: no temporary, no folder)
            return PathProblem("cannot write", error=PermissionError(
                errno.EACCES, os.strerror(errno.EACCES), target))
        return None
    if (fd := standard_stream(path)) is not None:  # (the kernel's link: a deleted file's too)
        # (written apart from the output, at its own offset, it overwrites what is printed
        # there or is overwritten by it; replaced, the shell's file is unlinked with the rest
        # of the output)
        return PathProblem(f"standard {STREAM_NAMES[fd]}", target)
    folder, base = os.path.split(target)
    missing = [base]  # (the names to be created: the file's, and those of missing folders)
    while new_folders and not os.path.exists(folder):  # (created when the file is written)
        folder, name = os.path.split(folder)
        missing.append(name)
    if not os.path.isdir(folder):  # (with new_folders, only something else in the way)
        error = (NotADirectoryError(f"{folder!r} is not a folder") if os.path.exists(folder)
                 else FileNotFoundError(f"{folder!r} does not exist"))
        return PathProblem("no folder", folder, error)
    try:
        for name in missing:
            check_name_length(folder, name)
        try_writing_in(folder, base)  # (the writers' temporary file, as they name it)
    except OSError as e:
        return PathProblem("cannot write", folder, e)
    return None


def output_file(path: Any, what: str, replaced: bool = True) -> str:
    """A path a file can be written at (a symbolic link's target, which is what gets written):
    not a folder (a last component ``.`` or ``..`` names one too), nor, where the file is
    ``replaced`` by an atomic rename (model files, checkpoints, exports), anything but a regular
    file (a device such as /dev/null, a pipe: the rename would put a file in its place; a
    file written in place may be one, ``/dev/stdout`` where the output is a pipe too); nor the
    process's own standard output or error redirected to a file (``/dev/stdout`` then); its
    ``..`` steps resolve as the OS resolves them (from folders that exist); its names fit the
    file system; and its nearest existing folder takes the temporary file the writers make
    (they create the missing folders below it). Checked before any work, so that a long run
    does not fail at its first save."""
    path = file_path(path, what)
    home, sep, _ = path.partition(os.sep)  # (a folder "~" would be made here; not a file's
    if sep and home.startswith("~") and not os.path.exists(home):  # name, "~log.csv")
        raise InputError(f"{what} {path!r} starts with {home!r}, which xpcnn does not expand "
                         "(no more than Python's open() does): a folder of that name would be "
                         f"made here; give os.path.expanduser({path!r}) for the home folder")
    problem = output_file_problem(path, replaced)
    if problem is None:
        return path
    kind, folder, error = problem
    if kind == "names a folder":
        end = os.path.basename(path) or path[-1]
        raise InputError(f"{what} {path!r} ends in {end!r}, so it names a folder; give the "
                         "path of a file (in it, say)")
    if kind == "is a folder":
        raise InputError(f"{what} {path!r} is a folder; give the path of a file (in it, say)")
    if kind == "not a regular file":
        raise InputError(f"{what} {path!r} exists and is not a regular file (a device or a "
                         "pipe): xpcnn writes a new file and renames it over the old one, so "
                         "give the path of a file")
    if kind.startswith("standard "):
        raise InputError(f"{what} {path!r} is this process's {kind}, redirected to the file "
                         f"{folder!r}: {stream_as_file(replaced)}")
    where = f" in {folder!r}" if folder else ""
    raise InputError(f"cannot write {what} {path!r}{where}: {error.strerror or error}"
                     ) from error


def named_parameters(init: Callable[..., Any]) -> list[str]:
    """The parameters of ``init`` given by name, beyond ``self`` (no ``*args`` or
    ``**kwargs``: a Keras-style ``__init__(**kwargs)`` passes them on)."""
    return [p.name for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def unbindable_override(cls: type, method: str, *args: Any, **kwargs: Any
                        ) -> inspect.Signature | None:
    """The signature of ``cls``'s own ``method`` where it cannot take the call xpcnn makes
    (``args`` and ``kwargs``, self among them): another library's hook of the same name
    (Keras' ``build(self, input_shape)``, PyTorch's ``step(self, closure=None)``). None where
    ``cls`` does not define it, where it takes that call, or where inspect cannot read it
    (left to its call)."""
    own = cls.__dict__.get(method)
    if own is None:
        return None
    try:
        signature = inspect.signature(own)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return signature
    return None


def takes_keywords(init: Callable[..., Any]) -> bool:
    """Whether ``init`` takes ``**kwargs``."""
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values())


def defining_class(cls: type, name: str) -> type | None:
    """The first class of ``cls``'s MRO with ``name`` in its own namespace (the class whose
    method or attribute ``cls`` uses), None where none has it."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def defined_by(obj: Any, name: str) -> Any:
    """What defines ``obj``'s attribute ``name``: ``obj`` itself where it is set on the
    instance, else :func:`defining_class` of its type."""
    if name in getattr(obj, "__dict__", {}):
        return obj
    # (defining_class's loop written out: a call less, and the loss asks this every step)
    return next((c for c in type(obj).__mro__ if name in vars(c)), None)


def same_author(obj: Any, name: str, *others: str) -> bool:
    """Whether what defines ``obj``'s ``name`` (a fast path, or a flag offering one) also
    defines each of ``others`` (the methods the fast path stands in for or relies on): not
    where a subclass overrode one of them alone, whose override the fast path would skip."""
    owner = defined_by(obj, name)
    return all(defined_by(obj, other) is owner for other in others)


def check_config_class(obj: Any, config: Any, kind: str, returns: str) -> None:
    """Refuse (at save) ``obj``'s get_config() ``config`` where it does not name ``obj``'s
    class under "class" (Keras' schedules leave it out): files name the class to rebuild, and
    one written from it would never load, or load xpcnn's in its place. ``kind``: "loss",
    "optimizer" or "schedule"; ``returns``: what else the dict holds."""
    name = type(obj).__name__
    if not isinstance(config, dict) or config.get("class") != name:
        got = (f"a {type(config).__name__}" if not isinstance(config, dict) else
               "no 'class'" if "class" not in config else f"'class': {config['class']!r}")
        raise InputError(f"{kind} class {name}'s get_config() gives {got}: it must return a "
                         f"dict with 'class': {name!r} and {returns}, so that a saved model "
                         "rebuilds it")


def unsaved_settings(obj: Any, config: dict[str, Any], unwritten: Collection[str] = ()
                     ) -> list[str]:
    """The settings that ``obj``'s constructor takes (by name) and ``config``, its
    ``get_config()``, does not give, but for those in ``unwritten``: a file written from it
    would load them with their defaults."""
    return [name for name in named_parameters(type(obj).__init__)
            if name not in config and name not in unwritten]


def untaken_settings(obj: Any, config: dict[str, Any]) -> list[str]:
    """The settings ``config``, ``obj``'s ``get_config()``, gives that its constructor does not
    take (but for "class"; none where it takes **kwargs): a file written from it would not
    load."""
    init = type(obj).__init__
    if takes_keywords(init):
        return []
    names = named_parameters(init)
    return [k for k in config if k != "class" and k not in names]


def registered(registry: dict[str, Any], name: Any, kind: str) -> Any:
    """The class a file names, or a clear error: a user's class is known once defined."""
    if not isinstance(name, str) or name not in registry:
        raise InputError(f"unknown {kind} class {name!r}: define (or import) a user's "
                         f"{kind} class before loading a file that names it; known: "
                         f"{sorted(registry)}")
    return registry[name]


def register(registry: dict[str, Any], cls: type, kind: str) -> None:
    """Name ``cls`` in ``registry`` by its ``__name__``, as files name classes. Refused where
    one of xpcnn's own classes has that name: a user's ``Dense`` would otherwise load in place
    of xpcnn's from every file. A user's class replaces a user's class of its name (a
    notebook cell run again defines it again)."""
    taken = registry.get(cls.__name__)
    if taken is not None and of_xpcnn(taken.__module__) and (
            taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise InputError(f"a {kind} class named {cls.__name__!r} exists already "
                         f"({taken.__module__}.{taken.__qualname__}): files name {kind}s by "
                         f"their class, so give {cls.__module__}.{cls.__qualname__} another "
                         "name")
    registry[cls.__name__] = cls
