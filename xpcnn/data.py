"""Where batches come from: arrays (on the host or the device), generators and map-style datasets.

``fit``, ``evaluate`` and ``predict`` turn what they are given into a :class:`Batches` source,
which yields device batches ``(xb, yb)`` (``xb`` as stored, e.g. uint8: the model casts it on
the device), or ``(xb, yb, wb)`` where arrays come with sample weights:

* arrays of the model's own namespace on its device (CuPy, PyTorch, ``array_api_strict``) stay
  there; each batch is gathered on the device (``xp.take``);
* a NumPy training set of at most :data:`DEVICE_BUDGET_BYTES` (images and targets together) is
  uploaded to the device once, as given (uint8 stays uint8), and gathered there in the same
  shuffled order as host batches, so that seeds and checkpoints reproduce. On the CPU (NumPy)
  the host is the device: nothing is copied;
* larger NumPy arrays, and ``np.memmap`` arrays always, stay on the host and are read batch by
  batch (a memory-mapped file is never read whole), on a background thread;
* an iterable of ``(x, y)`` or ``(x, y, sample_weight)`` batches (``x`` or ``(x,)`` for
  ``predict``; a generator, a list, a PyTorch ``DataLoader`` or ``IterableDataset``): ``steps``
  batches an epoch (for an iterator: drawn from it, epoch after epoch), or when ``steps`` is
  None one pass an epoch over a re-iterable, and an iterator read to its end (``evaluate``
  and ``predict``; ``fit`` needs its ``steps``);
* a map-style dataset (``__len__`` and ``__getitem__(i) -> (x_i, y_i)`` or ``(x_i, y_i,
  w_i)``, PyTorch's habit; ``x_i`` or ``(x_i,)`` for ``predict``), batched and shuffled by
  xpcnn exactly as arrays are.

Host work (reading files, stacking samples, checking values) runs on a background thread that
keeps up to :data:`PREFETCH` batches ready while the device computes; an exception there is
raised in the caller, and the thread stops when the loop ends early.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import queue
import sys
import threading
import traceback
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import array_api_compat
import numpy as np

from . import checks
from .errors import InputError
from .saving import fingerprint
from .structure import check_classifier

# A NumPy training set up to this size (images + targets) is uploaded to a GPU once per fit.
DEVICE_BUDGET_BYTES = 2 << 30
# Batches prepared ahead by the background thread.
PREFETCH = 2


class Batches:
    """A source of device batches for one ``fit``/``evaluate``/``predict`` call.

    ``steps``: batches an epoch (None when unknown before the epoch ends); ``resumable``: an
    epoch can be started at any step and replays the same batches (what exact resumption
    needs, with :meth:`fingerprint`)."""

    steps: int | None = None
    resumable = False

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, ...]]:
        """The batches of ``epoch`` from batch ``start`` on: (xb, yb) on the device (yb None
        without targets), (xb, yb, wb) with sample weights (see :func:`unpack`)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the original (see :mod:`xpcnn.saving.checkpoint`)."""
        raise NotImplementedError

    def same_data_mark(self) -> dict[str, Any] | None:
        """What every rank's source must share on several ranks
        (:func:`xpcnn.distributed.check_same_data`): the :meth:`fingerprint`, and what else
        tells the content without reading it; None where nothing can (an iterable: each
        rank's own)."""
        try:
            return self.fingerprint()
        except NotImplementedError:
            return None

    def place(self, step: int) -> tuple[int, int, int] | None:
        """On several ranks, (start, local, total): this rank's batch of step ``step`` is
        samples ``start:start + local`` of a global batch of ``total``, where every rank can
        tell without asking the others; None where only the batches tell (an iterable: the
        ranks then exchange their batches' sizes each step)."""
        return None


def unpack(batch: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """(xb, yb, wb) of a batch that :meth:`Batches.epoch` yields; wb None without weights."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


# -- arrays -----------------------------------------------------------------------------------


def is_device_array(x: Any) -> bool:
    """True for an array of another library than NumPy (CuPy, PyTorch, array_api_strict)."""
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, np.ndarray)


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
    if isinstance(x, np.generic) or not is_device_array(x) or of_library(x, backend):
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


def is_stream(x: Any) -> bool:
    """A dataset or an iterable of batches, as opposed to arrays (lists and tuples are arrays)."""
    if array_api_compat.is_array_api_obj(x) or isinstance(x, list | tuple | str | bytes):
        return False
    return isinstance(x, Iterable) or is_map_dataset(x)


def is_map_dataset(x: Any) -> bool:
    """``__len__`` and ``__getitem__``: batched and shuffled by xpcnn (not an iterator, nor a
    PyTorch ``IterableDataset``)."""
    return hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, Iterator) \
        and not is_iterable_dataset(x)


def is_iterable_dataset(x: Any) -> bool:
    """A PyTorch ``IterableDataset``: an iterable of batches, even where it defines ``__len__``
    (it inherits a ``__getitem__`` that raises). PyTorch is not imported for it: an instance
    means it is loaded."""
    torch_data = sys.modules.get("torch.utils.data")
    return torch_data is not None and isinstance(x, torch_data.IterableDataset)


def counted_batches(data: Any) -> int | None:
    """The batches a pass of ``data`` gives where its ``len()`` counts them, as Keras 3 takes
    it: a PyTorch ``DataLoader`` over a map-style dataset (its sampler's batches). None for
    any other iterable: a ``DataLoader`` over an ``IterableDataset`` (whose ``len()`` PyTorch
    itself warns may be wrong), or a user's class (whose ``len()`` may count samples): a pass
    shorter than the steps would stop training (``Trainer._fit_epoch``)."""
    torch_data = sys.modules.get("torch.utils.data")  # (an instance means it is loaded)
    if torch_data is None or not isinstance(data, torch_data.DataLoader) or \
            is_iterable_dataset(data.dataset):
        return None
    try:
        n = len(data)
    except (TypeError, ValueError, NotImplementedError):  # (a sampler without one)
        return None
    return n if n >= 1 else None


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
    (finite, and within ``limit`` where given: see :func:`checks.check_finite`)."""
    xp = backend.xp
    check_on_device(x, backend, what)
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(f"{what} must have a batch axis and per-sample axes, e.g. (N, H, W, C), "
                         f"and at least one sample; got shape {tuple(x.shape)}")
    check_real_images(x, xp, what)
    floating = xp.isdtype(x.dtype, "real floating")
    largest = (xp.finfo if floating else xp.iinfo)(x.dtype).max
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
    parameters' dtype (the model casts the batch to it, and preprocessing layers that cast it
    themselves compute in it), and under mixed precision the compute dtype (float16) where
    another layer reads the batch: it casts the batch to that dtype."""
    readers = [la for la, ins in zip(model.layers, model._inbound(), strict=True) if 0 in ins]
    names = {model.dtype_name}
    if not all(la.casts_input for la in readers):
        names.add(model._compute_dtype_name)
    backend = model.backend
    return min(((name, float(backend.xp.finfo(backend.dtype(name)).max)) for name in names),
               key=lambda limit: limit[1])


def check_real_images(x: Any, xp: Any, what: str = "x") -> None:
    """``x`` holds real numbers (uint8 or float images), not booleans or complex numbers."""
    if not (xp.isdtype(x.dtype, "integral") or xp.isdtype(x.dtype, "real floating")) or \
            x.dtype == xp.bool:
        raise InputError(f"{what} must hold real numbers (uint8 or float images), got dtype "
                         f"{x.dtype}")


def epoch_order(shuffle: bool, seed: int, epoch: int, samples: int) -> np.ndarray | None:
    """The order of an epoch's samples when shuffled, ``np.random.default_rng([seed, epoch])``'s
    permutation (the same on every device and after a resume); None when not shuffled."""
    return np.random.default_rng([seed, epoch]).permutation(samples) if shuffle else None


def rank_slices(samples: int, batch_size: int, start: int, shard: tuple[int, int]
                ) -> Iterator[tuple[int, int]]:
    """[lo, hi) of this rank's part of each global batch from step ``start`` on. ``shard`` is
    (rank, ranks) (:mod:`xpcnn.distributed`): a global batch is ``ranks * batch_size``
    consecutive positions of the order, and the ranks take consecutive slices of it that
    differ in size by one at most (some empty in a short last batch); (0, 1): the batches."""
    size = batch_size * shard[1]
    for step in range(start, -(-samples // size)):
        first, local, _ = place_in_batch(samples, batch_size, step, shard)
        yield step * size + first, step * size + first + local


def place_in_batch(samples: int, batch_size: int, step: int, shard: tuple[int, int]
                   ) -> tuple[int, int, int]:
    """(start, local, total) of this rank's slice of global batch ``step`` (see
    :func:`rank_slices`): samples ``start:start + local`` of the ``total`` in that batch."""
    rank, ranks = shard
    total = min(batch_size * ranks, samples - step * batch_size * ranks)
    start = rank * total // ranks
    return start, (rank + 1) * total // ranks - start, total


class ShardedBatches(Batches):
    """Batches of ``samples`` indexed samples, ``batch_size`` a rank: every rank knows every
    rank's slice of each global batch."""

    samples: int
    batch_size: int
    shard: tuple[int, int]

    def place(self, step: int) -> tuple[int, int, int] | None:
        return place_in_batch(self.samples, self.batch_size, step, self.shard)


class ArrayBatches(ShardedBatches):
    """Batches of arrays ``x`` and ``targets`` (validated already), with ``weights`` (N,) (host,
    checked) where given, in :func:`epoch_order`; on several ranks, this rank's slices of the
    global batches (see :func:`rank_slices`)."""

    resumable = True

    def __init__(self, backend: Any, x: Any, targets: np.ndarray | None, batch_size: int,
                 shuffle: bool = False, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 weights: np.ndarray | None = None) -> None:
        self.backend, self.batch_size, self.shuffle, self.seed = backend, batch_size, shuffle, seed
        self.shard = shard
        self.samples = int(x.shape[0])
        self.steps = -(-self.samples // (batch_size * shard[1]))
        self.host_x = x if isinstance(x, np.ndarray) else None
        self.host_targets, self.host_weights = targets, weights
        # Memory-mapped files are read batch by batch; other arrays live on the device (on the
        # CPU they are there already) unless they are too large for the budget.
        self.on_device = self.host_x is None or not isinstance(x, np.memmap) and (
            backend.name == "numpy" or x.nbytes + (0 if targets is None else targets.nbytes)
            <= DEVICE_BUDGET_BYTES)
        if self.on_device and backend.name != "numpy":  # (on NumPy: there already)
            x, targets = to_device(backend, x), to_device(backend, targets)
            weights = to_device(backend, weights)
        self.x, self.targets, self.weights = x, targets, weights

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, ...]]:
        order = epoch_order(self.shuffle, self.seed, epoch, self.samples)
        bounds = rank_slices(self.samples, self.batch_size, start, self.shard)
        if self.on_device:
            return self._gather_on_device(order, bounds)
        host = (self._host_batch(order, lo, hi) for lo, hi in bounds)
        return upload(self.backend, prefetch(host, self.backend))

    def _gather_on_device(self, order: np.ndarray | None, bounds: Iterator[tuple[int, int]]
                          ) -> Iterator[tuple[Any, ...]]:
        xp = self.backend.xp
        dev_order = None if order is None else (order if self.backend.name == "numpy" else
                                                self.backend.asarray(order))
        x, t, w = self.x, self.targets, self.weights
        for lo, hi in bounds:  # (hi <= samples: slices past the end are not standard)
            if dev_order is None:
                batch = x[lo:hi, ...], None if t is None else t[lo:hi, ...]
                yield batch if w is None else (*batch, w[lo:hi])
                continue
            idx = dev_order[lo:hi]
            batch = xp.take(x, idx, axis=0), None if t is None else xp.take(t, idx, axis=0)
            yield batch if w is None else (*batch, xp.take(w, idx, axis=0))

    def _host_batch(self, order: np.ndarray | None, lo: int, hi: int) -> tuple[Any, ...]:
        idx = slice(lo, hi) if order is None else order[lo:hi]
        x = np.ascontiguousarray(self.host_x[idx])  # type: ignore[index]
        y = None if self.host_targets is None else self.host_targets[idx]
        return (x, y) if self.host_weights is None else (x, y, self.host_weights[idx])

    def fingerprint(self) -> dict[str, Any]:
        x = self.host_x if self.host_x is not None else self.backend.to_numpy(self.x)
        return fingerprint(x, self.host_targets, self.batch_size, self.seed, self.shuffle,
                           self.shard[1], self.host_weights)

    def same_data_mark(self) -> dict[str, Any] | None:
        """The fingerprint where the images are on the host (a CRC-32 of their bytes, a pass
        over them); for a user's device arrays, each sample's sum, computed on the device and
        read back (N numbers, not the arrays: :func:`device_sums_crc32`), with the rest of
        the fingerprint."""
        if self.host_x is not None:
            return self.fingerprint()
        t, w = self.host_targets, self.host_weights
        return {"samples": self.samples, "sample_shape": [int(d) for d in self.x.shape[1:]],
                "x_dtype": str(self.x.dtype), "x_sums_crc32": device_sums_crc32(self.backend,
                                                                                self.x),
                "y_crc32": None if t is None else zlib.crc32(np.ascontiguousarray(t).data),
                "w_crc32": None if w is None else zlib.crc32(np.ascontiguousarray(w).data),
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "ranks": self.shard[1]}


def device_sums_crc32(backend: Any, x: Any) -> int:
    """A CRC-32 of each sample's sum (float64) of device array ``x``, summed on the device in
    parts of about 16 MiB of float64 (no copy of ``x`` to the host, no temporary as large as
    it): other samples (a per-rank shard) give other sums; a sample's own pixels in another
    order do not (which no shard does)."""
    xp = backend.xp
    n = int(x.shape[0])
    per = max(1, math.prod(int(d) for d in x.shape[1:]))
    rows = max(1, (1 << 21) // per)
    crc = 0
    with backend.on_device():
        for lo in range(0, n, rows):
            part = xp.reshape(x[lo:min(n, lo + rows), ...], (-1, per))
            sums = xp.sum(xp.astype(part, xp.float64), axis=1)
            crc = zlib.crc32(np.ascontiguousarray(backend.to_numpy(sums)).data, crc)
    return crc


# -- map-style datasets and iterables ---------------------------------------------------------


class DatasetBatches(ShardedBatches):
    """A map-style dataset: ``dataset[i] -> (x_i, y_i)``, ``(x_i, y_i, w_i)`` with a sample
    weight (or ``x_i`` alone for ``predict``), batched and shuffled as arrays are; samples are
    read and stacked on a background thread."""

    resumable = True

    def __init__(self, model: Any, dataset: Any, batch_size: int, shuffle: bool = False,
                 seed: int = 0, with_targets: bool = True, what: str = "x",
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.model, self.dataset, self.batch_size = model, dataset, batch_size
        self.shuffle, self.seed, self.with_targets, self.what = shuffle, seed, with_targets, what
        self.shard = shard
        try:
            self.samples = len(dataset)
        except (TypeError, ValueError) as e:  # (a __len__ that is negative or not an int)
            raise InputError(f"len({what}) must be its number of samples, an int >= 1: {e}") from e
        self._expected = f"{what}[i] must return a pair (x_i, y_i) or a triple (x_i, y_i, w_i)"
        self._weighted = _Weighted(f"{what}[i] returns a sample weight w_i for some i and not "
                                   "for others")
        if self.samples < 1:
            raise InputError(f"{what} is an empty dataset (len() is {self.samples})")
        self.steps = -(-self.samples // (batch_size * shard[1]))
        if not model.built:  # the first sample tells the input shape
            x, y, _ = split_item(self._item(0), with_targets, self._expected)
            self._refuse_a_batch(0, x, y)
            build_for(model, np.shape(x), what, f"return x_i[..., None] from {what}[i]")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, ...]]:
        order = epoch_order(self.shuffle, self.seed, epoch, self.samples)
        if order is None:
            order = np.arange(self.samples)
        host = (self._batch(order[lo:hi])
                for lo, hi in rank_slices(self.samples, self.batch_size, start, self.shard))
        backend = self.model.backend
        return upload(backend, prefetch(host, backend), owned=True)  # (stacked afresh)

    def _batch(self, idx: np.ndarray) -> tuple[Any, ...]:
        if not len(idx):  # this rank's empty part of a short last batch (several ranks)
            return (np.zeros((0, *self.model.input_shape), np.float32),
                    np.zeros((0,), np.int64) if self.with_targets else None)
        # (each sample's arrays copied as read: a dataset may refill one buffer at every [i],
        # as a loop allows, and a batch is stacked once all its samples are read)
        # (a sample of one row, (1, ...), may come as a list of that row)
        shape = tuple(self.model.input_shape)
        inner = shape[1:] if shape[0] == 1 else None
        items = [tuple(owned(p, self.model.backend) for p in split_item(
            self._item(int(i)), self.with_targets, self._expected, inner)) for i in idx]
        self._refuse_a_batch(int(idx[0]), *items[0][:2])
        xs, ys, ws = zip(*items, strict=True)
        batch = check_batch(self.model, self._stack(xs, "x"),
                            self._stack(ys, "y") if self.with_targets else None, self.what, idx)
        weighted = self._weighted.same([w is not None for w in ws], idx)
        if not weighted:
            return batch
        return (*batch, check_sample_weights(self.model, self._stack(ws, "w"), len(idx),
                                             f"the sample weights w_i of {self.what}", idx))

    def _item(self, i: int) -> Any:
        """``dataset[i]``; an index below len() that the dataset refuses is named as such."""
        try:
            return self.dataset[i]
        except LookupError as e:  # (IndexError, KeyError: len() promised more than there is)
            raise InputError(f"{self.what}[{i}] raised {e!r}, but len("
                             f"{self.what}) is {self.samples}: a dataset must return a sample for "
                             f"every index in range(len({self.what}))") from e

    def _refuse_a_batch(self, i: int, x: Any, y: Any) -> None:
        """Refuse ``dataset[i]`` where it is a whole batch (a Keras Sequence's or PyDataset's
        habit, whose len() counts batches): its x is a batch of the model's samples, or before
        the model is built, a batch of images (H, W, C) with as many labels."""
        shape = tuple(np.shape(x))
        if self.model.built:
            batch = shape[1:] == tuple(self.model.input_shape)
        else:  # (of more than one sample: a sample may well be (1, H, W, C) with label (1,))
            batch = len(shape) == 4 and shape[0] > 1 and np.ndim(y) in (1, 2) and \
                np.shape(y)[0] == shape[0]
        if batch:
            raise InputError(
                f"{self.what}[{i}] is a batch of {shape[0]} samples (x of shape {shape}), not "
                f"one sample: xpcnn reads a map-style dataset (len() and [i]) one sample an "
                f"index, and batches it itself. Pass a source of whole batches (a Keras "
                f"Sequence or PyDataset) as an iterator of them, with steps_per_epoch="
                f"len(ds) (steps= for evaluate and predict): (ds[i % len(ds)] for i in "
                f"itertools.count())")

    def _stack(self, parts: Sequence[Any], which: str) -> Any:
        """Samples stacked into a batch: on the device where they are arrays of the model's
        library (they stay there), else on the host."""
        backend = self.model.backend
        xp = backend.xp
        parts = [adopt_foreign(p, backend) for p in parts]
        mine = [of_library(p, backend) for p in parts]
        if all(mine):  # (on the prefetch thread, on the caller's device and stream: prefetch)
            return xp.stack(parts)
        if any(mine):  # (NumPy or the device library would fail on the other kind)
            raise InputError(f"the {which}_i that {self.what}[i] returns are arrays of "
                             f"{xp.__name__} on the device for some i and not for others: "
                             "a batch is stacked in one place, so return one kind")
        try:
            return np.stack(parts)
        except (TypeError, ValueError) as e:
            raise InputError(f"the {which}_i that {self.what}[i] returns cannot be stacked "
                             f"into a batch ({e}): they must share one shape, as NumPy arrays "
                             f"or arrays of the model's library ({xp.__name__}) on its "
                             "device") from e

    def fingerprint(self) -> dict[str, Any]:
        """As arrays' (:func:`xpcnn.saving.fingerprint`) but for the content, which is not
        read: a dataset's ``[i]`` may draw random transforms (reading items here would change
        the draws of the run, and its resume's), and reading it all would take a pass over
        the data."""
        return {"samples": self.samples, "dataset": type(self.dataset).__name__,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                **({"ranks": self.shard[1]} if self.shard[1] > 1 else {})}

    def same_data_mark(self) -> dict[str, Any] | None:
        """The fingerprint and a CRC-32 of the indices of a PyTorch ``Subset`` (what
        ``random_split`` gives), at every level (a Subset of a Subset): per-rank shards of one
        dataset, of equal lengths, differ there. Not in :meth:`fingerprint`, which checkpoints
        store (an older one must still resume). A shard of another kind (a class of the
        user's that holds its own part) cannot be told without reading samples."""
        return {**self.fingerprint(), "subset_indices_crc32": subset_indices_crc32(
            self.dataset)}


def subset_indices_crc32(dataset: Any, depth: int = 8) -> int | None:
    """A CRC-32 of the ``indices`` of ``dataset`` and of the datasets it is a ``Subset`` of
    (an object with ``indices`` and ``dataset``), down to ``depth`` levels; None where it is
    none."""
    crc, found = 0, False
    for _ in range(depth):
        indices = getattr(dataset, "indices", None)
        inner = getattr(dataset, "dataset", None)
        if indices is None or inner is None:
            break
        try:
            values = np.asarray(indices, dtype=np.int64)  # (a list, a range, a tensor)
        except (TypeError, ValueError):
            break
        crc, found = zlib.crc32(np.ascontiguousarray(values).data, crc), True
        crc = zlib.crc32(len(values).to_bytes(8, "little"), crc)  # (the levels' bounds)
        dataset = inner
    return crc if found else None


class IterableBatches(Batches):
    """An iterable of ``(x, y)`` batches (or ``x`` batches for ``predict``). An iterator (a
    generator) gives ``steps`` batches an epoch, continuing where the last epoch stopped (to
    its end without ``steps``: evaluate's and predict's one pass); a re-iterable that is not an
    array (a DataLoader; a list or tuple is read as one array) is iterated afresh each epoch,
    ``steps`` batches or to its end. Without ``steps``, a PyTorch DataLoader's ``len()``
    (:func:`counted_batches`) is :attr:`steps`, as in Keras 3, for the callbacks' ``params``
    and the progress bar: it does not cut a longer pass. Batches are
    checked on a background thread; the first one, checked here too, builds the model.

    No batch an iterator gave is lost to it: this source holds none. What it draws outside an
    epoch (the first batch, to build the model; :meth:`has_batch`'s, on a thread of its own)
    waits in the iterator's stream (:class:`_Stream`), which every epoch reads first; an epoch
    closed early (a callback's ``stop_training``, an error, a Ctrl-C) puts what its reader drew
    ahead back there, in order, and an error of the iterator drawn after them, so a call
    refused or stopped before its epoch, or after, leaves them to the next call on that
    iterator. A batch the checks refuse is dropped (named by the error), the first one too.
    An iterator that a running call reads is refused to a second call (from one of the first
    one's callbacks, say). A re-iterable's first batch waits in :attr:`_first` with the pass
    that drew it, which the first epoch goes on with (a second pass would draw again from a
    shuffling DataLoader's random numbers, and start its workers again); a later call starts
    a pass of its own."""

    def __init__(self, model: Any, data: Iterable[Any], steps: int | None,
                 with_targets: bool = True, what: str = "x") -> None:
        self.model, self.with_targets, self.what = model, with_targets, what
        self.data = data
        self.iterator = data if isinstance(data, Iterator) else None
        # (steps is checked by check_source; a pass is cut at steps given, not at a len())
        self.steps = steps if steps is not None or self.iterator is not None else \
            counted_batches(data)
        self._cut = steps is not None
        self._expected = f"{what} must yield (x, y) or (x, y, sample_weight) batches"
        self._weighted = _Weighted(f"{what} yields sample weights with some batches and not "
                                   "with others")
        self._first: tuple[Any, Iterator[Any]] | None = None
        if self.iterator is not None:
            self._free_stream()
        if model.built:
            return
        # the first batch tells the input shape (checked whole: a call its labels refuse
        # leaves the model unbuilt; the batch waits in the stream for the next call, but one
        # that the checks refused, named by the error, is dropped, as a built model's epoch
        # drops it: kept, it refused every later call)
        if self.iterator is not None:
            if not self.has_batch():
                raise InputError(f"{what} gave no batches")
            first = stream_of(self.iterator).pending[0]
        else:
            source = iter(data)
            first = next(source, _NONE)
            if first is _NONE:
                raise InputError(f"{what} gave no batches")
            self._first = (first, source)
        try:
            check_arrays(model, *self._split(first)[:2], what)
        except Exception:
            if self.iterator is not None:
                pending = stream_of(self.iterator).pending
                if pending and pending[0] is first:
                    pending.popleft()
                _forget_if_idle(self.iterator)
            raise

    def has_batch(self) -> bool:
        """Whether the iterator has a batch left: one pending, or one drawn here, which then
        waits in the stream for the next epoch to start with. Drawn on a thread of its own
        (:func:`_draw`): a Ctrl-C is not raised inside the user's generator, which it would
        finish. An error the iterator raises is raised here, one a call before read ahead of
        where it stopped too (:func:`_raise_kept`)."""
        stream = self._free_stream()
        if stream.pending:
            return True
        _raise_kept(stream)
        if not _draw(stream, self.iterator,  # type: ignore[arg-type]
                     self.model.backend.current_stream_scope()):
            _forget_if_idle(self.iterator)  # type: ignore[arg-type]
            return False
        return True

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, ...]]:
        backend = self.model.backend
        if self.iterator is None:
            first, self._first = self._first, None
            source = iter(self.data) if first is None else \
                itertools.chain([first[0]], first[1])
            if self._cut:
                source = itertools.islice(source, self.steps)
            checked = (self._checked(item) for item in self._owned(source, None))
            return upload(backend, prefetch(checked, backend), owned=True)  # (copied)
        stream = self._free_stream()
        # (the pending batches first, popped as the reader draws them: those a cut at steps
        # leaves stay there; then an error read ahead by the call before; a chain, which never
        # closes the iterator. An error of the iterator is kept in the stream until the loop
        # takes it: an epoch closed first leaves it to the next call, after the batches)
        source = _kept_failure(itertools.chain(_popped(stream.pending), _raised_kept(stream),
                                               self.iterator), stream)
        if self._cut:
            source = itertools.islice(source, self.steps)
        drawn: collections.deque[Any] = collections.deque()  # (drawn, not taken by the loop)
        checked = (self._checked(item) for item in self._owned(source, drawn))
        batches = upload(backend, prefetch(checked, backend, self._reader), owned=True)
        stream.reading = True  # (until closed)
        return _GivingBack(batches, drawn, self.iterator)

    def _free_stream(self) -> _Stream:
        """The iterator's stream, once no call reads it: refused where a running call reads
        it now (its reader is inside it: a second got a bare "generator already executing");
        the reader a stopped call left inside its ``next()`` is waited for, and the call
        refused if it is still there after :data:`STOP_WAIT_SECONDS`."""
        stream = stream_of(self.iterator)  # type: ignore[arg-type]
        if stream.reading:
            raise InputError(f"{self.what} is the iterator that a running fit, evaluate or "
                             "predict reads now (this call comes from one of its callbacks, "
                             "say): its background thread is inside the iterator, and two "
                             "calls cannot read one; pass this call another iterator, or "
                             "arrays")
        if stream.reader is not None:
            if not stream.reader.wait(STOP_WAIT_SECONDS):  # (interrupted: stays recorded)
                raise InputError(f"{self.what} is an iterator still inside next() for the call "
                                 f"stopped before this one (it has not returned for "
                                 f"{STOP_WAIT_SECONDS:.0f} s more): call again when it "
                                 "returns, or pass a fresh iterator")
            stream.reader = None
        return stream

    def _reader(self, ended: threading.Event | None) -> None:
        """Record the reader that a closed epoch waits for (its Event, set as it ends; None
        once it has ended): one still inside the iterator's ``next()`` then is waited for by
        the next call."""
        stream_of(self.iterator).reader = ended  # type: ignore[arg-type]

    def _split(self, item: Any) -> tuple[Any, Any, Any]:
        """(x, y, sample weights) of one batch as given (y None without targets, the weights
        None without them)."""
        # (a list of one sample, a built model's, is a batch of it: the last of a generator
        # of lists of samples, say)
        inner = tuple(self.model.input_shape) if self.model.built else None
        return split_item(item, self.with_targets, self._expected, inner)

    def _owned(self, source: Iterator[Any], drawn: collections.deque[Any] | None
               ) -> Iterator[Any]:
        """``source``'s batches, each in arrays of its own as it is drawn (on the background
        thread: a generator may refill the arrays it yielded, as a plain loop allows, while
        the batch waits in the queue, or is given back), added to ``drawn`` where given."""
        backend = self.model.backend
        for item in source:
            if isinstance(item, tuple | list):  # (x, y, w), (x,), a list of samples
                parts = [owned(p, backend) for p in item]
                item = tuple(parts) if isinstance(item, tuple) else parts
            else:
                item = owned(item, backend)
            if drawn is not None:
                drawn.append(item)
            yield item

    def _checked(self, item: Any) -> tuple[Any, ...]:
        """One batch checked (on the background thread), ``item`` in arrays of its own
        (:meth:`_owned`): (x, y), or (x, y, sample weights)."""
        x, y, w = self._split(item)
        x, y = check_batch(self.model, x, y, self.what)
        if not self._weighted.same([w is not None]):
            return x, y
        return x, y, check_sample_weights(self.model, w, int(x.shape[0]),
                                          f"the sample weights that {self.what} yields")


_NONE = object()


def _popped(pending: collections.deque[Any]) -> Iterator[Any]:
    """``pending``'s batches, each taken out of it as it is drawn."""
    while pending:
        yield pending.popleft()


def _raise_kept(stream: _Stream) -> None:
    """Raise the error that ``stream``'s iterator raised in a call before this one, read ahead
    of where that call's epoch stopped (its batches before the error went to this call first):
    the same error, noted so (the iterator ended with it: it would otherwise look like data
    that ran out, and a call return results of part of it)."""
    error = stream.failure
    if error is None:
        return
    stream.failure = None
    if _READ_AHEAD not in getattr(error, "__notes__", ()):
        error.add_note(_READ_AHEAD)
    raise error


_READ_AHEAD = ("(xpcnn: the iterator raised this while a call before this one read ahead of "
               "where it stopped; the batches it gave before were used first)")


def _raised_kept(stream: _Stream) -> Iterator[Any]:
    """No items: raises the error a call before read ahead (:func:`_raise_kept`), if any."""
    _raise_kept(stream)
    yield from ()


def _detached(error: BaseException) -> BaseException:
    """``error``, kept in a stream for a later call, without its traceback and context: their
    frames hold the iterator (and what it holds: a DataLoader's workers) alive where the
    caller drops it. The traceback goes into a note."""
    if error.__traceback__ is not None:
        error.add_note("raised at:\n" + "".join(traceback.format_tb(error.__traceback__)).rstrip())
        error.__traceback__ = None
    error.__context__ = None
    return error


def _kept_failure(source: Iterator[Any], stream: _Stream) -> Iterator[Any]:
    """``source``'s items; an error it raises (the iterator's own) is kept in ``stream`` too,
    until the loop takes it (:class:`_GivingBack`)."""
    try:
        yield from source
    except Exception as error:  # (not GeneratorExit: a loop that closes it early)
        stream.failure = error
        raise


def _draw(stream: _Stream, iterator: Iterator[Any],
          scope: contextlib.AbstractContextManager[Any]) -> bool:
    """Draw one batch from ``iterator`` into ``stream``'s pending ones (False where it has
    none), on a thread of its own that this one waits for (its Event; a join that a Ctrl-C
    interrupts marks the thread stopped in Python 3.11): a Ctrl-C on the caller's thread would
    be raised inside the user's generator, and finish it. Where the wait is interrupted, the
    thread stays recorded as the stream's reader, for the next call to wait for; its batch,
    or its error, joins the stream as it returns."""
    ended, abandoned = threading.Event(), threading.Event()
    drawn: list[bool] = []

    def work() -> None:
        try:
            with scope:
                item = next(iterator, _NONE)
            if item is not _NONE:
                stream.pending.append(item)
                drawn.append(True)
        except BaseException as error:  # noqa: BLE001 (raised by the caller, or the next call)
            stream.failure = _detached(error) if abandoned.is_set() else error
        finally:
            ended.set()

    stream.reader = ended
    threading.Thread(target=work, name="xpcnn-draw", daemon=True).start()
    try:
        ended.wait()
    except BaseException:  # (a Ctrl-C: an error the thread keeps is for a later call)
        abandoned.set()
        if stream.failure is not None:
            _detached(stream.failure)
        raise
    stream.reader = None
    if stream.failure is not None:  # (this draw's: raised as it is)
        error, stream.failure = stream.failure, None
        raise error
    return bool(drawn)


class _GivingBack(Iterator[tuple[Any, ...]]):
    """The batches of an epoch over ``iterator``, ``batches``; ``drawn`` holds what the
    background thread drew and this loop has not taken yet. Closed, it stops the thread (waits
    for it), then puts ``drawn`` back in front of the stream's pending batches (those the
    thread had not drawn yet), in order."""

    def __init__(self, batches: Iterator[tuple[Any, ...]], drawn: collections.deque[Any],
                 iterator: Iterator[Any]) -> None:
        self.batches, self.drawn, self.iterator = batches, drawn, iterator
        self.closed = False

    def __next__(self) -> tuple[Any, ...]:
        try:
            batch = next(self.batches)
        except StopIteration:
            raise
        except Exception as error:
            stream = stream_of(self.iterator)
            if stream.failure is error:  # (the iterator's own, taken: no longer kept)
                stream.failure = None
            # (the error is the first batch not taken's, drawn: one the checks refused, named
            # by the error, is not given back to be refused again; nothing was drawn for an
            # error of the iterator itself. A Ctrl-C, no Exception, is no batch's)
            if self.drawn:
                self.drawn.popleft()
            raise
        self.drawn.popleft()
        return batch

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.batches, "close", None)
            if close is not None:
                close()  # (stops the thread first: nothing is drawn after, but by a reader
                # left inside next(), which had drawn every pending batch already)
        finally:  # (a second Ctrl-C while the thread is waited for loses nothing either)
            stream = stream_of(self.iterator)
            stream.reading = False
            # (the deque itself becomes the pending one: a reader left inside next() adds its
            # batch to it, after those drawn before it)
            self.drawn.extend(stream.pending)
            stream.pending = self.drawn
            if stream.failure is not None:  # (kept for the next call, not taken by this loop)
                _detached(stream.failure)
            _forget_if_idle(self.iterator)


class _Weighted:
    """Whether a stream's items carry sample weights, fixed by the first batch read: every
    later item must agree (a batch weighted and the next not would train the second at
    weight 1 unnoticed); ``error`` is the refusal's text."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.weighted: bool | None = None

    def same(self, flags: list[bool], index: Any = None) -> bool:
        """Whether the items of one batch (``flags``: each has a weight) carry weights, as
        every item before them did; ``index``: their numbers, which the error names."""
        if self.weighted is None:
            self.weighted = flags[0]
        if any(flag != self.weighted for flag in flags):
            where = "" if index is None else f" (samples {[int(i) for i in index[:8]]}...)"
            raise InputError(f"{self.error}{where}: give every sample a weight, or none")
        return self.weighted


class _Stream:
    """What xpcnn keeps for one user's iterator between calls (and during one).

    ``pending``: batches drawn from the iterator and not trained on yet, in order (drawn to
    build the model or to see that an epoch has a batch; given back by an epoch closed early:
    drawn ahead by its reader, or pending still); every epoch over the iterator reads them
    first. ``reader``: the Event (set as it ends) of the background thread an epoch left
    inside the iterator's ``next()`` (a second thread there raises "generator already
    executing"), which the next call waits for. ``reading``: an epoch reads the iterator
    now; a second call on it is refused. ``failure``: an error the iterator raised that no
    loop has taken yet (read ahead of an epoch closed early): the next call raises it, after
    the pending batches."""

    __slots__ = ("failure", "pending", "reader", "reading")

    def __init__(self) -> None:
        self.pending: collections.deque[Any] = collections.deque()
        self.reader: threading.Event | None = None  # (set as the thread ends)
        self.reading = False
        self.failure: BaseException | None = None

    def empty(self) -> bool:
        """Whether it keeps nothing (no batch, no reader, no error, no epoch reading)."""
        return not (self.pending or self.reader is not None or self.reading
                    or self.failure is not None)


#: Each iterator's stream, weakly keyed: an iterator the caller drops goes, with its batches.
_STREAMS: weakref.WeakKeyDictionary[Any, _Stream] = weakref.WeakKeyDictionary()
#: The same for iterators that take no weak reference (zip, map, iter(list), itertools'):
#: by id, with the iterator (held, so that its id is not reused while kept). Pruned
#: (:func:`prune_streams`) of those that only this registry still holds, as a weak key would
#: go: no callback tells when the caller drops one, so its count of references does.
_HELD_STREAMS: dict[int, tuple[Any, _Stream]] = {}


def _references(entry: tuple[Any, _Stream]) -> int:
    return sys.getrefcount(entry[0])


# (the count of an iterator that only its registry entry holds, measured rather than assumed:
# what getrefcount counts beside the entry differs between Python versions)
_ONLY_THE_REGISTRY = _references((iter(()), _Stream()))


def prune_streams() -> None:
    """Drop the streams of held iterators that nobody but the registry references any more,
    and those that keep nothing. Called as each fit, evaluate and predict ends (and as a held
    iterator's stream is looked up): an iterator dropped by its caller is not kept alive
    (a DataLoader's workers) until another is used."""
    for key, entry in list(_HELD_STREAMS.items()):
        if entry[1].empty() or _references(entry) <= _ONLY_THE_REGISTRY:
            del _HELD_STREAMS[key]


def stream_of(iterator: Iterator[Any]) -> _Stream:
    """``iterator``'s stream (made empty where it has none)."""
    try:
        stream = _STREAMS.get(iterator)
        if stream is None:
            stream = _STREAMS[iterator] = _Stream()
        return stream
    except TypeError:  # (no weak reference to it, or unhashable)
        pass
    prune_streams()
    entry = _HELD_STREAMS.get(id(iterator))
    if entry is None:
        entry = _HELD_STREAMS[id(iterator)] = (iterator, _Stream())
    return entry[1]


def _forget_if_idle(iterator: Iterator[Any]) -> None:
    """Drop ``iterator``'s stream where it keeps nothing (a held iterator is not kept alive
    for nothing)."""
    stream = stream_of(iterator)
    if not stream.empty():
        return
    try:
        _STREAMS.pop(iterator, None)
    except TypeError:
        _HELD_STREAMS.pop(id(iterator), None)


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
                         "batches")
    if targets and y is None:
        pairs = isinstance(x, list | tuple) and bool(x) and isinstance(
            x[0], list | tuple) and len(x[0]) == 2
        raise InputError(f"y (the labels of {what}) is missing" + (
            f"; {what} is a list of pairs: a list is read as one array, so pass the (x, y) "
            f"batches as an iterator, iter({what}), with steps_per_epoch" if pairs else ""))
    return None


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


def check_arrays(model: Any, x: Any, y: Any = None, what: str = "x", index: Any = None
                 ) -> tuple[Any, Any]:
    """Checked images (host NumPy, a memory map, arrays of another library on the CPU, or
    device arrays of the model's library) and targets (integer labels or one-hot rows),
    returned on the host; builds the model if needed. Device targets are read to the host to
    be checked (a label out of range would otherwise silently match no class). A streamed
    batch is checked on the background thread (:func:`prefetch`), beside the training loop
    rather than in it; ``index``: the dataset samples that a streamed batch holds, which
    errors name."""
    x, y = adopt_foreign(x, model.backend), adopt_foreign(y, model.backend)
    limit = input_limit(model)
    if is_device_array(x):
        x = check_device_images(x, model.backend, what, limit)
    elif isinstance(x, np.memmap):
        checks.as_images(x, what)  # (checked; the memory map stays one, read batch by batch)
    else:
        x = checks.as_images(x, what)
    if not model.built:
        build_for(model, tuple(x.shape[1:]), what)
    x = with_channel_axis(x, model)
    checks.check_sample_shape(x, model.input_shape, what)
    if isinstance(x, np.ndarray):
        checks.check_finite(x, what, index, limit)
    if y is not None or model._fused_softmax():
        # (labels, or a final Softmax, need class scores; predict returns any other model's
        # output as it is: an inner layer's features, say)
        check_classifier(model.layers, [la.output_shape for la in model.layers])
    if y is None:
        return x, y
    y_what = "y" if what == "x" else what.replace("x", "y")
    targets, _ = checks.as_labels(_on_host(y, model.backend, y_what), int(x.shape[0]),
                                  model.num_classes, y_what)
    return x, targets


def with_channel_axis(x: Any, model: Any) -> Any:
    """Greyscale images without their channel axis, (N, H, W), for a model built for
    (H, W, 1), as (N, H, W, 1) (a view: no copy), as Keras 3's functional models take them
    (``keras.datasets.mnist`` gives that layout); any other ``x`` as it is."""
    shape, expected = tuple(x.shape[1:]), tuple(model.input_shape)
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
        model.build(checks.shape_to_build(sample, what))
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
            model.build(shape)
            raise _Built
    except _Built:
        return True
    except InputError:
        return False


def check_sample_weights(model: Any, w: Any, n: int, what: str = "sample_weight",
                         index: Any = None) -> np.ndarray:
    """Sample weights for ``n`` samples (host or device arrays, as targets are; read to the
    host to be checked), returned on the host in the model's parameter dtype; ``index``: the
    dataset samples they weigh, which errors name."""
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


def check_batch(model: Any, x: Any, y: Any, what: str, index: Any = None) -> tuple[Any, Any]:
    """One streamed batch, checked as whole arrays are, contiguous on the host (its arrays are
    its own already: :func:`owned`, or stacked afresh)."""
    x, y = check_arrays(model, x, y, what, index)
    if is_device_array(x):  # (the labels are on the host: check_arrays brought them there)
        return x, None if y is None else np.asarray(y)
    return np.asarray(x, order="C"), None if y is None else np.asarray(y)


def upload(backend: Any, batches: Iterator[tuple[Any, ...]], owned: bool = False
           ) -> Iterator[tuple[Any, ...]]:
    """Host batches to the device, one copy each (device batches pass as they are), on the
    caller's thread: the device's current context and stream are the loop's. ``owned``: each
    batch is in arrays of its own already, which on NumPy (the host is the device) pass as
    they are."""
    as_they_are = owned and backend.name == "numpy"
    with contextlib.closing(batches):  # type: ignore[type-var]
        for batch in batches:
            yield batch if as_they_are else tuple(to_device(backend, a) for a in batch)


# -- the background thread --------------------------------------------------------------------


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


# How long a prefetch closed early waits for its thread: longer than a slow iterator takes for
# a batch (a thread left inside it would meet the next call's thread there: "generator already
# executing"), short beside a read that never returns.
STOP_WAIT_SECONDS = 10.0


def prefetch(items: Iterator[Any], backend: Any,
             left: Callable[[threading.Event | None], None] | None = None,
             depth: int = PREFETCH) -> Iterator[Any]:
    """``items`` computed on a background thread, up to ``depth`` ahead, on the device and
    stream current where this generator is first iterated (``backend.current_stream_scope``).
    An exception in the thread is raised here; closing this generator (a loop that ends early)
    stops the thread; one that does not stop within :data:`STOP_WAIT_SECONDS` (inside an
    iterator's ``next()``) is left. ``left`` is handed an Event that the thread sets as it
    ends, before it is waited for, and None once it has ended."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    scope = backend.current_stream_scope()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            _work()
        finally:
            ended.set()

    def _work() -> None:
        try:
            with scope:
                try:
                    for item in items:
                        if not put(item):
                            return
                finally:  # a generator's own clean-up: on the thread that iterated it, in scope
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(_Failure(e))

    # (waited for through an Event, not Thread.join: a join that a Ctrl-C interrupts marks
    # a running thread as stopped in Python 3.11)
    ended = threading.Event()
    thread = threading.Thread(target=work, name="xpcnn-prefetch", daemon=True)
    thread.start()
    done = False
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                done = True
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # (closed early, by an error or a Ctrl-C too: the thread ends at its next put, but one
        # blocked inside the caller's iterator cannot be interrupted; a daemon, it is left to
        # end with it rather than holding up the error. Handed to ``left`` before the wait,
        # which a second Ctrl-C may interrupt: it then stays there)
        if left is not None:
            left(ended)
        ended.wait(None if done else STOP_WAIT_SECONDS)
        if left is not None and ended.is_set():
            left(None)
