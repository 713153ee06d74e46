"""Sources of indexed samples: the :class:`Batches` protocol that every source follows, an
epoch's order and each rank's share of it (:func:`epoch_order`, :func:`rank_slices`), and the
sources that any step of an epoch can start from: arrays (:class:`ArrayBatches`) and map-style
datasets (:class:`DatasetBatches`). Iterables of batches, with the state an iterator keeps
between calls, are in :mod:`xpcnn.data.streams`.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .. import checks
from ..errors import InputError
from .arrays import (
    BatchChecks,
    adopt_foreign,
    build_for,
    of_library,
    owned,
    split_item,
    to_device,
)
from .background import (
    inside,
    left_reader,
    prefetch,
    stop_wait_seconds,
    stopped,
    upload,
    wait_for_reader,
)
from .registry import ByIdentity
from .replay import numbered

# A NumPy training set up to this size (images + targets) is uploaded to a GPU once per fit.
DEVICE_BUDGET_BYTES = 2 << 30


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
        (:func:`xpcnn.distributed.refuse_different_data`): the :meth:`fingerprint`, and what else
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


# -- an epoch's order, and each rank's share --------------------------------------------------


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


# -- arrays -----------------------------------------------------------------------------------


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
            return numbered(self._gather_on_device(order, bounds), self._input_batch, epoch,
                            start)
        host = (self._host_batch(order, lo, hi) for lo, hi in bounds)
        return numbered(upload(self.backend, prefetch(host, self.backend)), self._input_batch,
                        epoch, start)

    def _input_batch(self, epoch: int, index: int) -> Any:
        """The input batch (xb, on the device) of batch ``index`` of ``epoch``, read again
        (:mod:`xpcnn.data.replay`)."""
        order = epoch_order(self.shuffle, self.seed, epoch, self.samples)
        bounds = rank_slices(self.samples, self.batch_size, index, self.shard)
        with self.backend.on_device():  # (the model's device: cuda:1's, not the current one)
            if self.on_device:
                return next(self._gather_on_device(order, bounds))[0]
            lo, hi = next(bounds)
            return to_device(self.backend, self._host_batch(order, lo, hi)[0])

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
        # (other names than the fingerprint's: another checksum of x, and a mark that is
        # hashed among the ranks of one run, never stored, so it keeps every key always)
        return {**_arrays_entry(self.samples, self.x.shape[1:], self.x.dtype, "x_sums_crc32",
                                device_sums_crc32(self.backend, self.x),
                                _crc32_or_none(self.host_targets), self.batch_size,
                                self.seed, self.shuffle),
                "w_crc32": _crc32_or_none(self.host_weights), "ranks": self.shard[1]}


def fingerprint(x: np.ndarray, targets: np.ndarray, batch_size: int, seed: int,
                shuffle: bool, ranks: int = 1, weights: np.ndarray | None = None
                ) -> dict[str, Any]:
    """What a resumed run must share with the original (:mod:`xpcnn.saving.checkpoint` stores
    it): the data (sizes and CRC-32 checksums; the sample weights' where there are some), the
    ``fit`` arguments that fix the order of the batches, and the number of processes
    (:mod:`xpcnn.distributed`; recorded only when there are several, as older files lack it)."""
    crc = 0
    rows = max(1, (1 << 24) // max(1, x[0].nbytes))
    for start in range(0, len(x), rows):
        crc = zlib.crc32(np.ascontiguousarray(x[start:start + rows]).data, crc)
    return {**_arrays_entry(int(len(x)), x.shape[1:], x.dtype, "x_crc32", crc,
                            zlib.crc32(np.ascontiguousarray(targets).data), int(batch_size),
                            int(seed), bool(shuffle)),
            **({"ranks": int(ranks)} if ranks > 1 else {}),
            **({} if weights is None else {"sample_weight_crc32": _crc32_or_none(weights)})}


def _arrays_entry(samples: int, sample_shape: Sequence[int], x_dtype: Any, x_key: str,
                  x_crc32: int, y_crc32: int | None, batch_size: int, seed: int,
                  shuffle: bool) -> dict[str, Any]:
    """The keys that :func:`fingerprint` and :meth:`ArrayBatches.same_data_mark` share, in
    the fingerprint's order (a checkpoint stores it as JSON); ``x_key`` names the checksum of
    ``x`` (of its bytes, or of each sample's sum)."""
    return {"samples": samples, "sample_shape": [int(d) for d in sample_shape],
            "x_dtype": str(x_dtype), x_key: x_crc32, "y_crc32": y_crc32,
            "batch_size": batch_size, "seed": seed, "shuffle": shuffle}


def _crc32_or_none(a: np.ndarray | None) -> int | None:
    return None if a is None else zlib.crc32(np.ascontiguousarray(a).data)


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


# -- map-style datasets -----------------------------------------------------------------------


class DatasetBatches(ShardedBatches):
    """A map-style dataset: ``dataset[i] -> (x_i, y_i)``, ``(x_i, y_i, w_i)`` with a sample
    weight (or ``x_i`` alone for ``predict``), batched and shuffled as arrays are; samples are
    read and stacked on a background thread, but for the first batch of ``fit``, which is
    read and checked before its callbacks begin (:meth:`read_first`)."""

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
        self._checks = BatchChecks(model, what, f"{what}[i] returns a sample weight w_i for "
                                   "some i and not for others",
                                   f"the sample weights w_i of {what}")
        if self.samples < 1:
            raise InputError(f"{what} is an empty dataset (len() is {self.samples})")
        self.steps = -(-self.samples // (batch_size * shard[1]))
        self._first: tuple[int, tuple[Any, ...]] | None = None  # (read_first's)
        if id(dataset) in inside():
            raise InputError(f"{what}[i] calls xpcnn on {what} itself (fit, evaluate or predict "
                             f"from inside its own __getitem__, or from another dataset's that "
                             f"it reads): its samples are read one at a time, and this call "
                             f"would wait for ever for the [i] it is in; give the inner call "
                             f"other data (a copy of {what}, its arrays)")
        self._reading = _LOCKS.use(dataset, threading.RLock)
        weakref.finalize(self, _LOCKS.release, id(dataset))
        wait_for_reader(dataset, what)  # (a stopped call's reader, left inside dataset[i])
        if not model.built:  # the first sample tells the input shape
            x, y, w = split_item(self._item(0), with_targets, self._expected)
            self._refuse_keyed(0, y, w)
            self._refuse_a_batch(0, x, y)
            build_for(model, np.shape(x), what, f"return x_i[..., None] from {what}[i]")

    def read_first(self, epoch: int) -> None:
        """Read and check this rank's first batch of ``epoch`` (its shuffling number) now,
        through the checks every batch passes: fit refuses bad data so before any callback
        runs. The batch waits for that epoch, which starts with it instead of reading it
        again (the dataset is read as often and in the same order, so a dataset's own random
        transforms draw the same); an epoch that starts elsewhere (a checkpoint's) drops it."""
        lo, hi = next(rank_slices(self.samples, self.batch_size, 0, self.shard))
        wait_for_reader(self.dataset, self.what)
        with self.model.backend.on_device():  # (stacked where the epoch's loop reads it)
            self._first = (epoch, self._batch(self._order(epoch)[lo:hi]))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, ...]]:
        wait_for_reader(self.dataset, self.what)
        order = self._order(epoch)
        first, self._first = self._first, None
        slices = rank_slices(self.samples, self.batch_size, start, self.shard)
        read = [] if first is None or first[0] != epoch or start else [first[1]]
        if read:
            next(slices)  # (read by read_first)
        # (the reader checks ``stop`` between samples: one that a closed epoch leaves inside
        # dataset[i] ends after it; recorded for the dataset until then, for the next call)
        stop = threading.Event()
        host = itertools.chain(read, (self._batch(order[lo:hi], stop) for lo, hi in slices))
        backend = self.model.backend
        batches = upload(backend, prefetch(host, backend, left_reader(self.dataset), stop=stop),
                         owned=True)  # (stacked afresh)
        # (not exact: the dataset's random transforms draw anew; the steps hold the last
        # batches, as an iterator's, xpcnn.totals)
        return numbered(batches, self._input_batch, epoch, start, exact=False)

    def _input_batch(self, epoch: int, index: int) -> Any:
        """The input batch (xb, on the device) of batch ``index`` of ``epoch``, read again
        (:mod:`xpcnn.data.replay`: a dataset's random transforms draw anew)."""
        lo, hi = next(rank_slices(self.samples, self.batch_size, index, self.shard))
        # (bounded: a reader left hanging inside dataset[i] holds its lock)
        if not self._reading.acquire(timeout=stop_wait_seconds()):
            raise InputError(f"{self.what} is still being read by another thread (inside its "
                             f"own code, which has not returned for {stop_wait_seconds():.0f} "
                             "s)")
        try:
            with self.model.backend.on_device():
                return to_device(self.model.backend, self._batch(self._order(epoch)[lo:hi])[0])
        finally:
            self._reading.release()

    def _order(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.shuffle, self.seed, epoch, self.samples)
        return np.arange(self.samples) if order is None else order

    def _batch(self, idx: np.ndarray, stop: threading.Event | None = None) -> tuple[Any, ...]:
        if not len(idx):  # this rank's empty part of a short last batch (several ranks)
            return (np.zeros((0, *self.model._input_shape), np.float32),
                    np.zeros((0,), np.int64) if self.with_targets else None)
        # (each sample's arrays copied as read: a dataset may refill one buffer at every [i],
        # as a loop allows, and a batch is stacked once all its samples are read)
        # (a sample of one row, (1, ...), may come as a list of that row)
        shape = tuple(self.model._input_shape)
        inner = shape[1:] if shape[0] == 1 else None
        items = [tuple(owned(p, self.model.backend) for p in split_item(
            self._item(int(i), stop), self.with_targets, self._expected, inner)) for i in idx]
        self._refuse_keyed(int(idx[0]), *items[0][1:])
        self._refuse_a_batch(int(idx[0]), *items[0][:2])
        xs, ys, ws = zip(*items, strict=True)
        return self._checks(self._stack(xs, "x"),
                            self._stack(ys, "y") if self.with_targets else None,
                            [w is not None for w in ws], lambda: self._stack(ws, "w"), idx)

    def _item(self, i: int, stop: threading.Event | None = None) -> Any:
        """``dataset[i]``, one reader at a time (a step's error reads a batch again while the
        epoch's reader goes on), none once ``stop`` is set; an index below len() that the
        dataset refuses is named as such."""
        within = inside()
        key = id(self.dataset)
        outer = key in within  # (the dataset's [i] may read its own [j] through us: no)
        try:
            stopped(stop)
            with self._reading:
                within.add(key)
                try:
                    return self.dataset[i]
                finally:
                    if not outer:
                        within.discard(key)
        except LookupError as e:  # (IndexError, KeyError: len() promised more than there is)
            raise InputError(f"{self.what}[{i}] raised {e!r}, but len("
                             f"{self.what}) is {self.samples}: a dataset must return a sample for "
                             f"every index in range(len({self.what}))") from e

    def _refuse_keyed(self, i: int, y: Any, w: Any) -> None:
        """Refuse ``dataset[i]``'s label or weight keyed by output name (Keras'): stacked, it
        was refused as "dtype object", which said nothing."""
        checks.refuse_keyed(y, f"the y_i that {self.what}[{i}] returns", "label y_i is one "
                            "integer or one one-hot row", "y_i")
        checks.refuse_keyed(w, f"the w_i that {self.what}[{i}] returns", "sample weight w_i is "
                            "one number", "w_i")

    def _refuse_a_batch(self, i: int, x: Any, y: Any) -> None:
        """Refuse ``dataset[i]`` where it is a whole batch (a dataset made like a Keras
        PyDataset, whose len() counts batches, but no subclass of it: those are read as
        batches, :func:`~xpcnn.data.arrays.is_keras_dataset`): its x is a batch of the model's
        samples, or before the model is built, a batch of images (H, W, C) with as many labels,
        or of greyscale images (H, W) with as many integer labels."""
        shape = tuple(np.shape(x))
        if self.model.built:
            batch = shape[1:] == tuple(self.model._input_shape)
        elif len(shape) == 3:  # (not one image's one-hot row (K,), which may be integer too)
            batch = shape[0] > 1 and _integer_labels(y, shape[0])
        else:  # (of more than one sample: a sample may well be (1, H, W, C) with label (1,))
            batch = len(shape) == 4 and shape[0] > 1 and np.ndim(y) in (1, 2) and \
                np.shape(y)[0] == shape[0]
        if batch:
            raise InputError(
                f"{self.what}[{i}] is a batch of {shape[0]} samples (x of shape {shape}), not "
                f"one sample: xpcnn reads a map-style dataset (len() and [i]) one sample an "
                f"index, and batches it itself (a subclass of Keras' PyDataset is read as "
                f"batches). Pass a source of whole batches as an iterator of them, with "
                f"steps_per_epoch=len(ds) (steps= for evaluate and predict): (ds[i % len(ds)] "
                f"for i in itertools.count())")

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
        """As arrays' (:func:`fingerprint`) but for the content, which is not read: a
        dataset's ``[i]`` may draw random transforms (reading items here would change the
        draws of the run, and its resume's), and reading it all would take a pass over the
        data."""
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


# One lock a dataset, by identity (an unhashable one too; one that takes no weak reference is
# held while a source reads it): its [i] is entered by one thread at a time, whatever the calls
# that read it.
_LOCKS = ByIdentity()

def _integer_labels(y: Any, n: int) -> bool:
    """Whether ``y`` is a vector of ``n`` integer labels and no one-hot row (a single 1)."""
    try:
        y = np.asarray(y)
    except (TypeError, ValueError, RuntimeError):  # (a device array: not told here)
        return False
    return y.shape == (n,) and np.issubdtype(y.dtype, np.integer) and not (
        np.count_nonzero(y) == 1 and int(y.max()) == 1 and int(y.min()) == 0)


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
