"""An iterable of batches as a source (:class:`IterableBatches`: a generator, a list, a
PyTorch ``DataLoader``), and what xpcnn keeps for a user's iterator between calls: its stream
(:class:`_Stream`: batches drawn and not trained on yet, a reader thread left inside
``next()``, an error read ahead), in a registry (``_STREAMS``, ``_HELD_STREAMS``) that loses
no batch and keeps no dropped iterator alive. Apart from :mod:`xpcnn.data.sources` for that
state, which outlives a call.

Not the :class:`~xpcnn.data.registry.ByIdentity` of the other sources: that one holds an
object that takes no weak reference until its users release it, and a stream has no user to
do so (an iterator's batches wait in it from one call to the next, until the caller drops the
iterator, which no callback tells). So a stream of an iterator held by id
(``_HELD_STREAMS``: zip, map, ``iter(list)``) goes when only the registry still references it
(:func:`prune_streams`), which a count of references tells.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import InputError, add_note
from .arrays import (
    BatchChecks,
    check_arrays,
    counted_batches,
    owned,
    split_item,
)
from .background import left_reader, prefetch, stop_wait_seconds, upload, wait_for_reader
from .sources import Batches, epoch_order


class KerasDatasetPasses:
    """A Keras ``PyDataset`` (or ``Sequence``) as a re-iterable of its batches, read as Keras 3
    reads it: each pass (an epoch) calls its ``on_epoch_begin``, gives ``dataset[i]`` for i in
    range(len(dataset)), in a shuffled order where ``shuffle`` (fit's: Keras shuffles the
    batches' order, not their samples; here reproducibly, by fit's seed and the pass's number
    in this fit), and calls its ``on_epoch_end``. ``steps`` (fit's ``steps_per_epoch``) fewer
    than its batches cut each pass there, so that ``on_epoch_end`` still ends it. Its
    ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are not used: xpcnn reads it on
    its background thread, as any source."""

    counts_batches = True  # (its len(), the batches of a pass: counted_batches)

    def __init__(self, dataset: Any, shuffle: bool = False, seed: int = 0,
                 steps: int | None = None) -> None:
        try:
            batches = len(dataset)
        except Exception as e:  # (a PyDataset of no length: Keras' endless one)
            raise InputError(f"a Keras PyDataset without a len() (num_batches None, endless) is "
                             f"not taken: give it __len__, or pass iter(dataset[i] for i in "
                             f"itertools.count()) with steps_per_epoch ({e!r})") from None
        self.dataset, self.shuffle, self.seed, self.passes = dataset, shuffle, seed, 0
        self.batches = batches if steps is None else min(batches, steps)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        order = epoch_order(self.shuffle, self.seed, self.passes, len(self.dataset))
        self.passes += 1
        return self._pass(range(self.batches) if order is None else order[:self.batches])

    def _pass(self, order: Iterable[int]) -> Iterator[Any]:
        self._hook("on_epoch_begin")
        for i in order:
            yield self.dataset[int(i)]
        # (the last batch read and copied by the reader by now: a hook that shuffles the
        # dataset's arrays in place changes no batch read)
        self._hook("on_epoch_end")

    def _hook(self, name: str) -> None:
        hook = getattr(self.dataset, name, None)
        if callable(hook):
            hook()


class IterableBatches(Batches):
    """An iterable of ``(x, y)`` batches (or ``x`` batches for ``predict``). An iterator (a
    generator) gives ``steps`` batches an epoch, continuing where the last epoch stopped (to
    its end without ``steps``: evaluate's and predict's one pass); a re-iterable that is not an
    array (a DataLoader; a list or tuple is read as one array) is iterated afresh each epoch,
    ``steps`` batches or to its end, its sampler told the epoch first where it has a
    ``set_epoch`` (a ``DistributedSampler``: :func:`_begin_sampler_epoch`). Without ``steps``,
    a PyTorch DataLoader's ``len()`` (:func:`counted_batches`) is :attr:`steps`, as in Keras 3,
    for the callbacks' ``params`` and the progress bar: it does not cut a longer pass. Batches
    are checked on a background thread; the first one, checked here too, builds the model.

    No batch an iterator gave is lost to it: this source holds none. What it draws outside an
    epoch (the first batch, to build the model; :meth:`has_batch`'s, on a thread of its own)
    waits in the iterator's stream (:class:`_Stream`), which every epoch reads first; an epoch
    closed early (a callback's ``stop_training``, an error, a Ctrl-C) puts back there the batch
    whose step did not run (:func:`step_ran`) and what its reader drew ahead, in order, and an
    error of the iterator drawn after them, so a call refused or stopped before its epoch, or
    after, leaves them to the next call on that iterator. A batch the checks refuse is dropped
    (named by the error), the first one too. An iterator that a running call reads is refused
    to a second call (from one of the first one's callbacks, say). A re-iterable's first batch
    waits in :attr:`_first` with the pass that drew it, which the first epoch goes on with (a
    second pass would draw again from a shuffling DataLoader's random numbers, and start its
    workers again); a later call starts a pass of its own."""

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
        self._checks = BatchChecks(model, what, f"{what} yields sample weights with some "
                                   "batches and not with others",
                                   f"the sample weights that {what} yields")
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
            wait_for_reader(data, what)
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
            if first is not None and _sampler_epochs(self.data):  # (that pass was drawn
                first = None  # before its sampler was told this epoch: drawn again)
            if first is None:  # (a pass of its own: the reader a stopped call left ends first)
                wait_for_reader(self.data, self.what)
                _begin_sampler_epoch(self.data, epoch)
            source = iter(self.data) if first is None else \
                itertools.chain([first[0]], first[1])
            if self._cut:
                source = itertools.islice(source, self.steps)
            checked = (self._checked(item) for item in self._owned(source, None))
            return upload(backend, prefetch(checked, backend, left_reader(self.data)),
                          owned=True)  # (copied)
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
        refused if it is still there after :data:`~xpcnn.data.background.STOP_WAIT_SECONDS`."""
        stream = stream_of(self.iterator)  # type: ignore[arg-type]
        if stream.reading:
            raise InputError(f"{self.what} is the iterator that a running fit, evaluate or "
                             "predict reads now (this call comes from one of its callbacks, "
                             "say): its background thread is inside the iterator, and two "
                             "calls cannot read one; pass this call another iterator, or "
                             "arrays")
        if stream.reader is not None:
            # (interrupted: stays recorded)
            if not stream.reader.wait(stop_wait_seconds()):
                raise InputError(f"{self.what} is an iterator still inside next() for the call "
                                 f"stopped before this one (it has not returned for "
                                 f"{stop_wait_seconds():.0f} s more): call again when it "
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
        inner = tuple(self.model._input_shape) if self.model.built else None
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
        return self._checks(x, y, [w is not None], lambda: w)


_NONE = object()


def _sampler_epochs(data: Any) -> list[Callable[[int], Any]]:
    """The ``set_epoch`` of each sampler of ``data`` (a PyTorch DataLoader's, or its batch
    sampler's: a ``DistributedSampler``), once each."""
    batch_sampler = getattr(data, "batch_sampler", None)
    found: dict[int, Callable[[int], Any]] = {}
    for sampler in (getattr(data, "sampler", None), batch_sampler,
                    getattr(batch_sampler, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            found.setdefault(id(sampler), set_epoch)
    return list(found.values())


def _begin_sampler_epoch(data: Any, epoch: int) -> None:
    """Tell the samplers of ``data`` (:func:`_sampler_epochs`: a ``DistributedSampler``, the
    DDP habit) that epoch ``epoch`` begins (fit's epochs numbered on across its calls, as their
    shuffling orders are; 0 for evaluate), as DDP loops, Lightning and Accelerate do, before
    the pass draws its order: it shuffles by its seed plus that number, and without it every
    epoch had the first one's order, silently."""
    for set_epoch in _sampler_epochs(data):
        set_epoch(epoch)


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
        add_note(error, _READ_AHEAD)
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
        add_note(error, "raised at:\n" + "".join(traceback.format_tb(error.__traceback__))
                 .rstrip())
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
    background thread drew and this loop has not taken yet, ``taken`` the batch (as drawn) it
    took last until its step runs (:func:`step_ran`) or the loop takes the next. Closed, it
    stops the thread (waits for it), then puts ``taken`` and ``drawn`` back in front of the
    stream's pending batches (those the thread had not drawn yet), in order."""

    def __init__(self, batches: Iterator[tuple[Any, ...]], drawn: collections.deque[Any],
                 iterator: Iterator[Any]) -> None:
        self.batches, self.drawn, self.iterator = batches, drawn, iterator
        self.taken: Any = _NONE
        self.closed = False

    def __next__(self) -> tuple[Any, ...]:
        self.taken = _NONE  # (the loop is done with the last one)
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
        self.taken = self.drawn.popleft()
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
            if self.taken is not _NONE:  # (its step did not run: a Ctrl-C, an error)
                self.drawn.appendleft(self.taken)
                self.taken = _NONE
            # (the deque itself becomes the pending one: a reader left inside next() adds its
            # batch to it, after those drawn before it)
            self.drawn.extend(stream.pending)
            stream.pending = self.drawn
            if stream.failure is not None:  # (kept for the next call, not taken by this loop)
                _detached(stream.failure)
            _forget_if_idle(self.iterator)


def step_ran(batches: Iterator[Any]) -> None:
    """The step of the batch that an epoch's loop took last from ``batches`` ran (fit's
    update was applied, or skipped on the device as non-finite; evaluate's sums or predict's
    outputs have it): an iterator's epoch closed now does not give that batch back (it would
    train twice). Nothing for other sources' batches."""
    if isinstance(batches, _GivingBack):
        batches.taken = _NONE


# -- the iterator registry --------------------------------------------------------------------


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
