"""Arrays as xpcnn takes them, and the checks every source's data goes through.

* moving arrays between libraries: :func:`is_device_array`, :func:`of_library`,
  :func:`adopt_foreign` (another library's array read without a copy), :func:`owned` (a copy
  of its own), :func:`to_device`;
* what kind of source ``x`` is: :func:`is_stream`, :func:`is_map_dataset`,
  :func:`is_keras_dataset`, :func:`is_iterable_dataset`, :func:`counted_batches`;
* device and image checks: :func:`check_on_device`, :func:`check_device_images`,
  :func:`input_limit`, :func:`check_real_images`;
* argument checks: :func:`check_source` (the arguments that name a source, before one is
  made), :func:`split_item`, :func:`check_arrays`, :func:`build_for`,
  :func:`check_sample_weights`, :class:`BatchChecks` (each batch of a stream or dataset).

The bottom of the package, with :mod:`~xpcnn.data.registry` and :mod:`~xpcnn.data.replay`,
which import none of its modules either: the others (background, sources, streams) use these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import array_api_compat
import numpy as np

from .. import checks
from ..errors import InputError
from ..structure import check_classifier

# -- moving arrays between libraries ----------------------------------------------------------


def is_device_array(x: Any) -> bool:
    """True for an array of another library than NumPy (CuPy, PyTorch, array_api_strict).
    A NumPy scalar (``np.int64(3)``, a dataset's label) is a host value, as NumPy arrays are."""
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, np.ndarray | np.generic)


def of_library(x: Any, backend: Any) -> bool:
    """True for a device array of the backend's own library (on any of its devices)."""
    return is_device_array(x) and array_api_compat.array_namespace(x).__name__ == \
        backend.xp.__name__


def adopt_foreign(x: Any, backend: Any) -> Any:
    """An array of another library than the model's, read without a copy (DLPack): one on the
    CPU (a PyTorch DataLoader's tensors) as a NumPy array, as Keras takes them; one on a device
    (a PyTorch CUDA tensor, for a model on CuPy) as an array of the model's library there.
    One on the CPU that NumPy cannot read (a PyTorch tensor that requires grad, a dtype NumPy
    lacks) is refused with DLPack's reason; anything else is returned as it is: one on a device
    the model's library cannot read is refused by name where it is checked, and one on another
    GPU than the model's too."""
    if not is_device_array(x) or of_library(x, backend):  # (a NumPy scalar is no device array)
        return x
    try:
        on_cpu = x.__dlpack_device__()[0] == _DLPACK_CPU
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return x
    try:
        return np.from_dlpack(x) if on_cpu else backend.xp.from_dlpack(x)
    except (AttributeError, BufferError, TypeError, ValueError, RuntimeError) as e:
        if not on_cpu:
            return x
        library = array_api_compat.array_namespace(x).__name__
        raise InputError(f"an array of {library} on the CPU (dtype {x.dtype}) that NumPy cannot "
                         f"read ({type(e).__name__}: {e}): pass one that needs no gradient "
                         "(PyTorch: .detach()) in a dtype NumPy has (float32, uint8, ...), or a "
                         "NumPy array") from e


_DLPACK_CPU = 1  # (DLPack's device type kDLCPU; kDLCUDA is 2)


def owned(part: Any, backend: Any) -> Any:
    """An array in memory of its own, whatever its library (a source may refill the buffer it
    gave, as a loop allows): a NumPy array copied (C-ordered); another library's on the CPU (a
    PyTorch tensor) read through DLPack and copied (once: the read is a view); one of the
    model's library (CuPy, ``array_api_strict``) copied where it is. Anything else (a number;
    an array the model cannot read, refused by name where it is checked) as it is."""
    if isinstance(part, np.ndarray):
        return part.copy()
    # (a sample's label is most often a NumPy scalar or a number: is_device_array's namespace
    # lookup cost more than the rest of the sample's work)
    if isinstance(part, np.generic | int | float) or not is_device_array(part):
        return part
    part = adopt_foreign(part, backend)
    if isinstance(part, np.ndarray):
        return part.copy()
    if of_library(part, backend):
        return backend.xp.asarray(part, copy=True)
    return part


def to_device(backend: Any, a: Any) -> Any:
    """A host array copied to the backend's device; a device array (or None) as it is."""
    return a if a is None or is_device_array(a) else backend.asarray(a)


# -- what kind of source x is -----------------------------------------------------------------


def is_stream(x: Any) -> bool:
    """A dataset or an iterable of batches, as opposed to arrays (lists and tuples are arrays)."""
    if array_api_compat.is_array_api_obj(x) or isinstance(x, list | tuple | str | bytes):
        return False
    return isinstance(x, Iterable) or is_map_dataset(x) or is_keras_dataset(x)


def is_map_dataset(x: Any) -> bool:
    """``__len__`` and ``__getitem__``: batched and shuffled by xpcnn (not an iterator, nor a
    PyTorch ``IterableDataset``, nor a Keras ``PyDataset``, whose items are batches)."""
    return hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, Iterator) \
        and not is_iterable_dataset(x) and not is_keras_dataset(x)


#: The libraries whose ``PyDataset`` or ``Sequence`` is a dataset of batches (Keras 3's
#: ``keras.utils.PyDataset``, also its ``Sequence``; Keras 2's and tf.keras' ``Sequence``).
_KERAS_LIBRARIES = ("keras", "tf_keras", "tensorflow")


def is_keras_dataset(x: Any) -> bool:
    """A Keras ``PyDataset`` (or ``Sequence``): ``len()`` counts its batches and ``[i]`` is
    the i-th batch, read by :class:`~xpcnn.data.streams.KerasDatasetPasses`. Told by its
    class's name and library, Keras not imported (a user's subclass of it, whatever its name)."""
    return any(c.__name__ in ("PyDataset", "Sequence")
               and c.__module__.partition(".")[0] in _KERAS_LIBRARIES for c in type(x).__mro__)


def is_iterable_dataset(x: Any) -> bool:
    """A PyTorch ``IterableDataset``: an iterable of batches, even where it defines ``__len__``
    (it inherits a ``__getitem__`` that raises). PyTorch is not imported for it: an instance
    means it is loaded."""
    torch_data = sys.modules.get("torch.utils.data")
    return torch_data is not None and isinstance(x, torch_data.IterableDataset)


def counted_batches(data: Any) -> int | None:
    """The batches a pass of ``data`` gives where its ``len()`` counts them, as Keras 3 takes
    it: a PyTorch ``DataLoader`` over a map-style dataset (its sampler's batches), a Keras
    ``PyDataset``'s passes (:class:`~xpcnn.data.streams.KerasDatasetPasses`). None for
    any other iterable: a ``DataLoader`` over an ``IterableDataset`` (whose ``len()`` PyTorch
    itself warns may be wrong), or a user's class (whose ``len()`` may count samples): a pass
    shorter than the steps would stop training (``Trainer._fit_epoch``)."""
    if getattr(data, "counts_batches", False):  # (a Keras PyDataset's passes)
        return len(data)
    torch_data = sys.modules.get("torch.utils.data")  # (an instance means it is loaded)
    if torch_data is None or not isinstance(data, torch_data.DataLoader) or \
            is_iterable_dataset(data.dataset):
        return None
    try:
        n = len(data)
    except (TypeError, ValueError, NotImplementedError):  # (a sampler without one)
        return None
    return n if n >= 1 else None


# -- device and image checks ------------------------------------------------------------------


def check_on_device(x: Any, backend: Any, what: str = "x", instead: str = "a NumPy array, or "
                    ) -> None:
    """``x`` is an array of the backend's namespace on its device (``instead``: what else the
    caller takes, for the error)."""
    xp = backend.xp
    try:
        library = array_api_compat.array_namespace(x).__name__
        where = f"an array of {library} on {array_api_compat.device(x)}"
    except TypeError:
        library, where = "", f"a {type(x).__name__}"
    if library != xp.__name__ or array_api_compat.device(x) != backend.device:
        raise InputError(f"{what} is {where}, but the model is on {backend.label} "
                         f"({xp.__name__}): pass {instead}an array of the model's own library "
                         "on its device")


def check_device_images(x: Any, backend: Any, what: str = "x",
                        limit: tuple[str, float] | None = None) -> Any:
    """A device array of the model's namespace and device with a batch axis, real values
    (finite, and within ``limit`` where given: see :func:`checks.check_finite`); booleans
    (0/1 masks) are returned as uint8, as :func:`checks.as_images` takes host ones."""
    xp = backend.xp
    check_on_device(x, backend, what)
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(f"{what} must have a batch axis and per-sample axes, e.g. (N, H, W, C), "
                         f"and at least one sample; got shape {tuple(x.shape)}")
    if x.dtype == xp.bool:
        with backend.on_device():
            x = xp.astype(x, xp.uint8)
    check_real_images(x, xp, what)
    floating = checks.real_floating(xp, x.dtype)
    largest = checks.largest_value(xp, x.dtype)
    if floating or limit is not None and largest > limit[1]:  # (uint16 under float16, say)
        largest = largest if limit is None else min(largest, limit[1])
        # (bounds of x's own kind, within its range: a standard comparison takes no other)
        high = float(largest) if floating else int(largest)
        low = -high if floating or xp.iinfo(x.dtype).min < 0 else 0
        with backend.on_device():  # (called outside the compute scope, or on the prefetch thread)
            # (two reductions, no temporary as large as x: NaN propagates through both, and
            # compares False; infinity is beyond the largest finite value)
            good = bool(xp.logical_and(xp.min(x) >= low, xp.max(x) <= high))
        if not good:
            checks.check_finite(backend.to_numpy(x), what, limit=limit)  # names the sample
    return x


def input_limit(model: Any) -> tuple[str, float]:
    """The narrowest dtype the model's batch is computed in, and its largest value: the
    parameters' dtype (the model casts the batch to it, or the layers reading it do), and
    under mixed precision the compute dtype (float16) where the batch's values first meet it
    (:attr:`~xpcnn.layers.base.Layer.input_values`): in a layer reading the batch, or reading
    it through layers passing its values on (ReLU, pooling, Dropout, augmentations); a layer
    normalising them in the parameters' dtype (BatchNorm2D, Rescaling...) ends that path."""
    names = {model.dtype_name}
    reached = {0}  # (slot 0 is the batch, slot k + 1 layer k's output)
    for k, (la, ins) in enumerate(zip(model.layers, model._inbound(), strict=True)):
        if not reached.intersection(ins):
            continue
        # (a subclass with a forward of its own computes in the compute dtype, for all we know)
        values = la.input_values if checks.same_author(la, "input_values", "forward") else \
            "computes"
        if values == "passes":
            reached.add(k + 1)
        elif values != "normalises":
            names.add(model._compute_dtype_name)
            break
    backend = model.backend
    return min(((name, float(backend.xp.finfo(backend.dtype(name)).max)) for name in names),
               key=lambda limit: limit[1])


def check_real_images(x: Any, xp: Any, what: str = "x") -> None:
    """``x`` holds real numbers (uint8 or float images), not booleans or complex numbers."""
    if not checks.real_numbers(xp, x.dtype):
        raise InputError(f"{what} must hold real numbers (uint8 or float images), got dtype "
                         f"{x.dtype}")


# -- argument checks --------------------------------------------------------------------------


def check_source(x: Any, y: Any, steps: int | None, what: str = "x", targets: bool = True,
                 steps_name: str = "steps_per_epoch") -> int | None:
    """The arguments that name a batch source (``x`` and ``y``, ``steps`` batches an epoch,
    the argument the caller calls ``steps_name``), checked before any source is made: a refused
    call draws no batch from an iterator. An iterator needs ``steps`` for fit (its
    ``steps_per_epoch`` and ``validation_steps``), not for evaluate and predict (``steps``),
    which read it to its end. Returns ``steps``, checked."""
    if isinstance(x, Mapping):
        raise InputError(f"{what} is a dict (keys {list(x)[:4]}): an xpcnn model has one "
                         "input; pass its images as one array (N, H, W, C), or a dataset "
                         "whose items are (x, y) pairs")
    if is_stream(x):
        if y is not None:
            raise InputError(f"y must be None when {what} is a dataset or an iterable of "
                             "batches (they hold the targets)")
        if is_map_dataset(x):
            if steps is not None:  # (it was ignored: every sample, each epoch)
                raise InputError(f"{steps_name} is for generators; a dataset gives "
                                 "ceil(len(dataset) / batch_size) batches")
            return None
        # (fit draws steps_per_epoch (validation_steps) batches an epoch from an iterator that
        # goes on from epoch to epoch; evaluate and predict make one pass, to its end without
        # steps, as Keras 3's do)
        if isinstance(x, Iterator) and steps is None and steps_name != "steps":
            raise InputError(f"{what} is an iterator (a generator): pass {steps_name}, the "
                             "number of batches to draw from it")
        return None if steps is None else checks.positive_int(steps, steps_name)
    if steps is not None:
        raise InputError(f"{steps_name} is for generators; arrays give ceil(N / batch_size) "
                         f"batches{_fewer_samples(steps, steps_name)}")
    if targets and y is None:
        pairs = isinstance(x, list | tuple) and bool(x) and isinstance(
            x[0], list | tuple) and len(x[0]) == 2
        raise InputError(f"y (the labels of {what}) is missing" + (
            f"; {what} is a list of pairs: a list is read as one array, so pass the (x, y) "
            f"batches as an iterator, iter({what}), with steps_per_epoch" if pairs else ""))
    return None


def _fewer_samples(steps: Any, steps_name: str) -> str:
    """How a call given arrays and ``steps`` batches (a Keras port) takes that many: their
    samples, sliced. (Not said for validation_steps, whose refusal stays as it was.)"""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        return ""
    part = f"[:{steps} * batch_size]"
    if steps_name == "steps_per_epoch":
        # (Keras' steps_per_epoch goes on through the arrays from one epoch to the next)
        return (f": to train on {steps} batches an epoch, pass their samples, fit(x{part}, "
                f"y{part}, ...): the same samples each epoch, where Keras goes on through the "
                "arrays from one epoch to the next")
    if steps_name == "steps":  # (evaluate's or predict's: Keras' first batches, exactly)
        return f": to use the first {steps} batches, pass their samples, x{part} (and y{part})"
    return ""


def split_item(item: Any, with_targets: bool, expected: str,
               inner: tuple[int, ...] | None = None) -> tuple[Any, Any, Any]:
    """(x, y, w) of a batch or a sample: a pair (x, y) or a triple (x, y, sample weight), as a
    tuple or a list (w None for a pair, or given as None); without targets (``predict``), a
    pair's y is ignored, a tuple or list of one is (x,) (but where its one element has the
    shape ``inner``: a batch of one sample of a built model, or a sample of one row, is x
    itself), and anything else is x itself (a list of samples or of rows is an array, not a
    pair); else ``expected``, the error."""
    if isinstance(item, Mapping):
        raise InputError(f"{expected}, got a dict with keys {list(item)[:4]}")
    if isinstance(item, tuple | list) and item and isinstance(item[0], Mapping):
        raise InputError(f"{expected}, got one whose x is a dict with keys {list(item[0])[:4]}"
                         ": an xpcnn model has one input, its images as one array")
    size = len(item) if isinstance(item, tuple | list) else 0
    if not with_targets:  # (a list of three is three samples; a tuple of three, a triple)
        # (one of one is (x,), as Keras 3's unpack_x_y_sample_weight reads it: PyTorch's
        # DataLoader(TensorDataset(x)) yields [xb], and TensorDataset(x)[i] is (x_i,))
        split = size == 2 or size == 3 and isinstance(item, tuple) or size == 1 and (
            inner is None or tuple(np.shape(item[0])) != tuple(inner))
        return (item[0] if split else item), None, None
    if size == 1:
        raise InputError(f"{expected}, got a {type(item).__name__} of length 1, (x,): it holds "
                         "no targets y, which training and evaluation need (predict takes "
                         "(x,) items)")
    if size not in (2, 3):
        length = f" of length {size}" if isinstance(item, tuple | list) else ""
        raise InputError(f"{expected}, got {type(item).__name__}{length}")
    if item[1] is None:  # (it was taken for no labels, and failed inside the loss)
        raise InputError(f"{expected}, got a pair whose y is None")
    return item[0], item[1], item[2] if size == 3 else None


def one_input(model: Any, x: Any, what: str = "x") -> Any:
    """``x`` as the model's one input: a list or tuple of one array (NumPy, the model's
    library, a torch tensor...) of the model's whole input rank, (N, *input_shape), is that
    array, as Keras 3 takes ``[x]`` or ``(x,)`` for a one-input model; several such arrays
    are refused (an xpcnn model has one input). Anything else is as it was: a list of
    samples (arrays of one rank less, or nested lists of numbers) is one array, as NumPy
    reads it. Unbuilt, the model's input rank is not known: an array of images (N, H, W, C) is
    the input, one of lower rank where the model builds for its samples, and not for it as
    one sample."""
    if not isinstance(x, list | tuple) or not x or not all(
            array_api_compat.is_array_api_obj(a) and len(a.shape) >= 2 for a in x):
        return x
    if model.built:
        inputs = [_is_input_batch(model, a) for a in x]
    else:
        inputs = [_is_input_batch(model, x[0])] * len(x)
    if not any(inputs):
        return x
    if len(x) > 1:
        shown = ", ".join(str(tuple(a.shape)) for a in x[:4]) + ", ..." * (len(x) > 4)
        expected = f"(N, {', '.join(map(str, model._input_shape))})" if model.built else \
            "(N, H, W, C)"
        raise InputError(f"{what} is a {type(x).__name__} of {len(x)} arrays (shapes {shown}), "
                         f"but model {model.name!r} has one input, {expected}: pass its "
                         f"images as one array (or [x], a list of that one array)")
    return x[0]


def _is_input_batch(model: Any, a: Any) -> bool:
    """Whether array ``a`` has the rank of the model's input batch, (N, *input shape) (or
    (N, H, W) for (H, W, 1)). Unbuilt, (N, H, W, C) images are the input; an array of lower
    rank is where the model builds for its samples and not for it as one sample."""
    if not array_api_compat.is_array_api_obj(a) or len(a.shape) < 2:
        return False
    if model.built:
        shape = tuple(model._input_shape)
        greyscale = len(shape) >= 2 and shape[-1] == 1  # (N, H, W) for (H, W, 1)
        return len(a.shape) == len(shape) + 1 or greyscale and tuple(a.shape[1:]) == shape[:-1]
    first = tuple(int(d) for d in a.shape)
    return len(first) >= 4 or _builds_for(model, first[1:]) and not _builds_for(model, first)


def unpack_x_y(model: Any, x: Any, y: Any, sample_weight: Any, targets: bool = True,
               call: str = "fit") -> tuple[Any, Any, Any]:
    """``x``, ``y`` and ``sample_weight`` of fit, evaluate or predict (``targets`` False: its
    ``y`` and weights are None; ``call``: which, for errors), where ``x`` may be an ``(x, y)``
    pair or an ``(x, y, sample_weight)`` triple of arrays, its first of the model's input
    rank and its second no image batch, as Keras 3 reads one (its
    ``unpack_x_y_sample_weight``; predict ignores y; labels of a wrong shape, such as masks,
    are then refused by the labels' check, naming their shapes). Refused where ``y`` (or the
    weights) are given too, or where both are (N, F) of one shape (labels, or two inputs?).
    Anything else is returned as it was: where the second is a batch of images too, or of
    the first's per-sample shape (two inputs?), refused by :func:`one_input`, naming the one
    input."""
    if not isinstance(x, list | tuple) or len(x) not in (2, 3) or not all(
            array_api_compat.is_array_api_obj(a) for a in x[:2]) or not (
            len(x) == 2 or x[2] is None or array_api_compat.is_array_api_obj(x[2])) or \
            not _is_input_batch(model, x[0]):
        return x, y, sample_weight
    shapes = ", ".join(str(tuple(a.shape)) if a is not None else "None" for a in x)
    pair = f"{type(x).__name__} ({'x, y, sample_weight' if len(x) == 3 else 'x, y'})"
    first, second = tuple(x[0].shape), tuple(x[1].shape)
    alone = y is None and (len(x) == 2 or sample_weight is None)
    if len(first) == len(second) == 2 and first == second and (alone or not targets):
        # (a flat model whose features equal its classes: one-hot labels, or two inputs?)
        call = call if targets else "predict"
        apart = f"x and y apart, {call}(x, y)" if targets else "x alone, predict(x)"
        raise InputError(f"{call}: x is a {type(x).__name__} of arrays of shapes {shapes}, "
                         f"which is ambiguous for model {model.name!r}, of input (N, "
                         f"{first[1]}): (x, y) with one-hot labels, or two batches of its one "
                         f"input? Pass {apart}")
    if len(second) >= 3 and _is_input_batch(model, x[1]) or second[1:] == first[1:]:
        one_input(model, x)  # (two inputs? refused here, naming the one, before a missing y)
        return x, y, sample_weight
    if targets and (y is not None or len(x) == 3 and sample_weight is not None):
        given = "y" if y is not None else "sample_weight"
        raise InputError(f"x is a {pair} of arrays of shapes {shapes}, and {given} is given "
                         f"too: pass the {pair} alone, or x and {given} apart")
    if not targets:
        return x[0], None, None
    return x[0], x[1], x[2] if len(x) == 3 else sample_weight


def check_arrays(model: Any, x: Any, y: Any = None, what: str = "x", index: Any = None
                 ) -> tuple[Any, Any]:
    """Checked images (host NumPy, a memory map, arrays of another library on the CPU, or
    device arrays of the model's library) and targets (integer labels or one-hot rows),
    returned on the host; builds the model if needed. Device targets are read to the host to
    be checked (a label out of range would otherwise silently match no class). A streamed
    batch is checked on the background thread (:func:`~xpcnn.data.background.prefetch`),
    beside the training loop rather than in it; ``index``: the dataset samples that a streamed
    batch holds, which errors name."""
    x = one_input(model, x, what)  # ([x] or (x,), as Keras 3 takes it)
    x, y = adopt_foreign(x, model.backend), adopt_foreign(y, model.backend)
    limit = input_limit(model)
    if is_device_array(x):
        x = check_device_images(x, model.backend, what, limit)
    elif isinstance(x, np.memmap):
        checks.as_images(x, what)  # (checked; the memory map stays one, read batch by batch)
        if x.dtype == np.bool_:  # (0/1 masks read as uint8, as as_images takes them)
            x = x.view(np.uint8)
    else:
        x = checks.as_images(x, what)
    if not model.built:
        build_for(model, tuple(x.shape[1:]), what)
    x = with_channel_axis(x, model)
    checks.check_sample_shape(x, model._input_shape, what, model._keeps_weights_for)
    if isinstance(x, np.ndarray):
        checks.check_finite(x, what, index, limit)
    if y is not None or model._fused_softmax():
        # (labels, or a final Softmax, need class scores; predict returns any other model's
        # output as it is: an inner layer's features, say)
        check_classifier(model.layers, [la.output_shape for la in model.layers])
    if y is None:
        return x, y
    y_what = "y" if what == "x" else what.replace("x", "y")
    n = int(x.shape[0])
    targets, _ = checks.as_labels(_on_host(_one_target(y, n), model.backend, y_what), n,
                                  model.num_classes, y_what, index)
    return x, targets


def _one_target(y: Any, n: int) -> Any:
    """``y`` as the one output's targets: ``[y]`` or ``(y,)`` of one array of the ``n``
    samples' labels (n,) or one-hot rows (n, K) is that array, as Keras 3 takes it for a
    one-output model (as one array it would be a batch of one sample). Any other ``y`` as it
    is: ``[label]`` of one sample, or a list of labels."""
    if not isinstance(y, list | tuple) or len(y) != 1:
        return y
    a = y[0]
    if not array_api_compat.is_array_api_obj(a) or len(a.shape) not in (1, 2) \
            or int(a.shape[0]) != n or (n == 1 and len(a.shape) == 1):
        return y  # ((1,) for one sample: as a list, one one-hot row, as it was)
    return a


def with_channel_axis(x: Any, model: Any) -> Any:
    """Greyscale images without their channel axis, (N, H, W), for a model built for
    (H, W, 1), as (N, H, W, 1) (a view: no copy), as Keras 3's functional models take them
    (``keras.datasets.mnist`` gives that layout); any other ``x`` as it is."""
    shape, expected = tuple(x.shape[1:]), tuple(model._input_shape)
    if len(expected) < 2 or expected[-1] != 1 or shape != expected[:-1]:
        return x
    if isinstance(x, np.ndarray):
        return x[..., np.newaxis]  # (a memory map stays one)
    with model.backend.on_device():  # (called on the prefetch thread too)
        return model.backend.xp.expand_dims(x, axis=-1)


def build_for(model: Any, sample: tuple[int, ...], what: str = "x", fix: str | None = None
              ) -> None:
    """Build ``model`` for the per-sample shape of its first data; where a layer refuses a
    sample (H, W) that (H, W, 1) would build, the error says to add the channel axis (``fix``:
    how, for a dataset's samples)."""
    sample = tuple(int(d) for d in sample)
    try:
        shape = checks.shape_to_build(sample, what)
        with checks.warned_shape():
            model.build((None, *shape))
    except InputError as e:
        if len(sample) != 2 or not _builds_for(model, (*sample, 1)):
            raise
        raise InputError(f"{e}; are {what} greyscale images without their channel axis "
                         f"(per-sample shape {sample}, (H, W))? "
                         f"{fix or f'pass {what}[..., None], of shape (N, H, W, 1)'}") from e


class _Built(Exception):
    """Raised to undo a trial build (:func:`_builds_for`)."""


def _builds_for(model: Any, shape: tuple[int, ...]) -> bool:
    """Whether the unbuilt ``model`` builds for ``shape``; it is left unbuilt."""
    try:
        with model._unbuilt_if_refused():
            model.build((None, *shape))
            raise _Built
    except _Built:
        return True
    except InputError:
        return False


def check_sample_weights(model: Any, w: Any, n: int, what: str = "sample_weight",
                         index: Any = None) -> np.ndarray:
    """Sample weights for ``n`` samples (host or device arrays, as targets are; read to the
    host to be checked), returned on the host in the model's parameter dtype; ``index``: the
    dataset samples they weigh, which errors name. ``[w]`` or ``(w,)`` of one array of the
    ``n`` weights is that array, as Keras 3 takes it for a one-output model."""
    if isinstance(w, list | tuple) and len(w) == 1 and array_api_compat.is_array_api_obj(
            w[0]) and tuple(int(d) for d in w[0].shape) == (n,):
        w = w[0]
    return checks.as_sample_weights(_on_host(adopt_foreign(w, model.backend), model.backend,
                                             what), n, what, model.dtype_name, index)


def _on_host(a: Any, backend: Any, what: str) -> Any:
    """Targets or weights read to the host to be checked (a device array of the model's
    library; one of another, which ``adopt_foreign`` could not read, refused by name)."""
    if not is_device_array(a):
        return a
    if not of_library(a, backend):
        check_on_device(a, backend, what)  # refused, naming its library
    return backend.to_numpy(a)


class BatchChecks:
    """The one sequence of checks of each batch that a stream or a map-style dataset gives:
    the batch itself, checked as whole arrays are and made contiguous on the host (its arrays
    are its own already: :func:`owned`, or stacked afresh); whether it carries sample weights
    as every batch before it did (fixed by the first: a batch weighted and the next not would
    train the second at weight 1 unnoticed; ``mixed`` is the refusal's text); then those
    weights (named ``weights_what`` in errors), and their products with fit's class weights
    where it sets :attr:`class_weights` (its host table: training data only)."""

    def __init__(self, model: Any, what: str, mixed: str, weights_what: str) -> None:
        self.model, self.what = model, what
        self.mixed, self.weights_what = mixed, weights_what
        self.weighted: bool | None = None
        self.class_weights: np.ndarray | None = None

    def __call__(self, x: Any, y: Any, flags: list[bool], weights: Callable[[], Any],
                 index: Any = None) -> tuple[Any, ...]:
        """(x, y), or (x, y, sample weights) where the batch carries them; ``flags``: whether
        each of its items has a weight, ``weights()`` the batch's weights (called only where
        it has them), ``index``: the dataset samples it holds, which errors name."""
        x, y = check_arrays(self.model, x, y, self.what, index)
        # (a device batch's labels are on the host: check_arrays brought them there)
        x = x if is_device_array(x) else np.asarray(x, order="C")
        y = None if y is None else np.asarray(y)
        if self.weighted is None:
            self.weighted = flags[0]
        if any(flag != self.weighted for flag in flags):
            where = "" if index is None else f" (samples {[int(i) for i in index[:8]]}...)"
            raise InputError(f"{self.mixed}{where}: give every sample a weight, or none")
        if not self.weighted:
            return x, y
        w = check_sample_weights(self.model, weights(), int(x.shape[0]), self.weights_what,
                                 index)
        if self.class_weights is not None and y is not None:
            checks.check_weighted_classes(w, y, self.class_weights, self.weights_what, index)
        return x, y, w
