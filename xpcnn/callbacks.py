"""Callbacks: code that ``fit`` calls at fixed points of training (Keras' protocol).

``model.fit(x, y, validation_split=0.1, callbacks=[EarlyStopping(patience=3),
CSVLogger("log.csv")])`` (EarlyStopping watches ``val_loss``: a fit without validation data refuses
it). A callback subclasses :class:`Callback` and overrides the hooks it needs; ``self.model`` is
the model being trained and ``self.params`` holds ``epochs``, ``initial_epoch``, ``steps`` (per
epoch, None when unknown), ``verbose``, ``data`` (the batch source), ``validation`` (whether the
fit has validation data), ``validation_freq`` (see :func:`validates`) and ``class_weight`` (the
table, or None).
Setting ``model.stop_training = True`` in any hook ends training after the current batch (or
epoch): ``on_epoch_end`` and ``on_train_end`` still run and ``fit`` returns the
:class:`History`; on several ranks, set on any rank (a signal handler's, say), every rank stops
at the same step. ``model.stop_evaluating`` / ``model.stop_predicting`` (Keras 3's, reset by
each call; each thread's own) end evaluate (fit's validation too) / predict after the current
batch: its means are those of the batches seen, predict returns the rows so far. On several
ranks each rank stops where its own callbacks set the flag (evaluation has no exchange between
ranks per batch, and its batch logs are each rank's own): set it alike on every rank (from the batch
index, say). A :class:`History` or :class:`ProgbarLogger` in ``callbacks`` is fit's own (it
adds none, runs it where it runs its own, after the others, and the bar takes fit's
``verbose``), as in Keras 3; two of one are refused. A :class:`ProgbarLogger` in
evaluate's or predict's ``callbacks`` is likewise their progress bar, at their ``verbose``.

The ``logs`` of each hook, as in Keras: empty for the ``*_begin`` hooks; the epoch's running
``loss`` and ``accuracy`` for ``on_train_batch_end`` (of the evaluation for
``on_test_batch_end``, and its result for ``on_test_end``); for ``on_epoch_end``, plain floats
(``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, and, unlike Keras, ``seconds``), to which
a callback may add names (:class:`ReduceLROnPlateau` adds ``learning_rate``) that the callbacks
after it and the History see (``fit`` runs the History and the progress bar after the user's
callbacks, as Keras does); the last epoch's for ``on_train_end``; ``{"outputs": ...}`` (the
batch's part of what predict returns, on the device) for ``on_predict_batch_end``. A model
compiled without metrics (``metrics=[]``) logs no ``accuracy`` and no ``val_accuracy``.

Batch logs are read lazily where every callback allows it (Keras 3's rule): a callback that sets
``async_safe = True`` or overrides none of the hooks ``on_train_batch_end``, ``on_batch_end``
(``on_test_batch_end`` for the evaluation's logs), as xpcnn's own callbacks do. The loss and
correct count of the steps then stay on the device, and the host waits for the device only when
a callback actually reads a value from the batch ``logs`` (a mapping, read once looked at; one
kept past its hook is read before the next step); the progress bar reads at most every
``refresh`` seconds. Where a callback is not async-safe (a :class:`LambdaCallback` given a batch
hook), each batch's ``logs`` are a plain dict of Python floats, which waits for the device every
step.

Resuming a run (:class:`BackupAndRestore`, ``fit(checkpoint=..., resume=True)``) restores the
state of the callbacks that keep one: :class:`EarlyStopping`, :class:`ReduceLROnPlateau` and
:class:`ModelCheckpoint`, and a user's callback that defines :meth:`Callback.get_state` and
:meth:`Callback.set_state`.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import inspect
import io
import locale
import math
import numbers
import os
import re
import string
import time
import weakref
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import checks, ctrl_c, distributed, history, metrics
from .errors import InputError, NonFiniteError, add_note, warn
from .files import atomic_file, naming_the_file, replaceable, written_file
from .saving import save_checkpoint
from .saving.checkpoint import (
    FitCheckpoints,
    Progress,
    callback_states,
    progress_within,
    states_entry,
)
from .saving.model_file import config_entry, model_config, refuse_foreign_suffix


class Callback:
    """Base class: every hook does nothing. ``logs`` is a mapping of metric names to floats.

    ``async_safe = True`` (Keras 3's flag) gives the batch hooks lazy logs, read from the device
    only when looked at (one kept past its hook is read before the next step): set it where
    those hooks take ``logs`` as a read-only mapping (``logs["loss"]``, ``dict(logs)``; a
    ``json.dumps`` or ``|`` needs ``dict(logs)``). A callback with batch hooks of its own
    without it gets a plain dict of floats each batch, as in Keras 3."""

    async_safe: bool = False

    def __init__(self) -> None:
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def get_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of this callback, so that a resumed run goes on exactly:
        a subclass that keeps a state across epochs returns a dict of JSON values (numbers,
        strings, None, lists, dicts) and lists of NumPy arrays, which :meth:`set_state` gets
        back in the resumed run after its ``on_train_begin`` (a NumPy scalar or 0-d array of
        numbers as it was, of its dtype: a float32 goes on in float32; other NumPy scalars,
        datetime64 or complex, are refused by name). The base class keeps none."""
        return None

    def set_state(self, state: dict[str, Any] | None) -> None:
        """Take back what :meth:`get_state` returned (raising ValueError for a state it cannot
        take: the checkpoint is then refused)."""

    def state_fits(self, state: dict[str, Any] | None) -> bool:
        """Whether a state of this callback's class is this callback's to go on from: False
        where it was kept under other settings (another monitor: it then starts afresh, with
        a warning)."""
        return True

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_train_end(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None: ...
    def on_train_batch_begin(self, batch: int, logs: Mapping[str, float] | None = None
                             ) -> None:
        self.on_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        self.on_batch_end(batch, logs)

    # Keras' older names for the two above, which call them unless overridden, as in Keras
    def on_batch_begin(self, batch: int, logs: Mapping[str, float] | None = None) -> None: ...
    def on_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None: ...
    def on_test_begin(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_test_end(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_test_batch_begin(self, batch: int, logs: Mapping[str, float] | None = None
                            ) -> None: ...
    def on_test_batch_end(self, batch: int, logs: Mapping[str, float] | None = None
                          ) -> None: ...
    def on_predict_begin(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_predict_end(self, logs: Mapping[str, float] | None = None) -> None: ...
    def on_predict_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None
                               ) -> None: ...
    def on_predict_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None
                             ) -> None: ...


#: The hooks' names, in the order :class:`Callback` declares them.
HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


def callback_list(callbacks: Any) -> list[Callback]:
    """A user's ``callbacks`` argument, None or a list of callbacks, as a list, checked."""
    if not isinstance(callbacks, list | tuple | None):
        raise InputError(f"callbacks must be a list of xpcnn.callbacks.Callback instances, got "
                         f"{type(callbacks).__name__}")
    for cb in callbacks or []:
        if not isinstance(cb, Callback):
            raise InputError(f"callbacks must be xpcnn.callbacks.Callback instances, got "
                             f"{type(cb).__name__}")
    return list(callbacks or [])


def _overrides(cb: Callback, hook: str) -> bool:
    """Whether ``cb`` has a ``hook`` of its own (its class's, or set on it)."""
    mine = getattr(cb, hook)
    return getattr(mine, "__func__", mine) is not getattr(Callback, hook)


def _async_safe(cb: Callback, hooks: tuple[str, ...]) -> bool:
    return cb.async_safe or not any(_overrides(cb, hook) for hook in hooks)


def stateful(callbacks: Iterable[Callback]) -> list[Callback]:
    """Those of ``callbacks`` that keep a state a checkpoint saves (they define
    ``get_state``), in order."""
    return [cb for cb in callbacks if type(cb).get_state is not Callback.get_state]


def run_description(params: Mapping[str, Any]) -> dict[str, Any]:
    """What a run resumed from a checkpoint must share with the run that wrote it: its data's
    fingerprint and the ``fit`` arguments that change what each step trains (``class_weight``
    too)."""
    weights = params.get("class_weight")
    return {**params["data"].fingerprint(),
            **({} if weights is None else {"class_weight": [float(w) for w in weights]})}


def _indexed(hook: str) -> bool:
    """Whether ``hook`` takes an epoch or batch index before its logs (every hook gets its
    logs, as in Keras: empty where there are none yet)."""
    return hook.startswith("on_epoch") or "_batch_" in hook


class CallbackList:
    """Calls a hook on every callback in order: ``callbacks.on_epoch_end(epoch, logs)``."""

    def __init__(self, callbacks: Iterable[Callback], model: Any, params: dict[str, Any]) -> None:
        self.callbacks = list(callbacks)  # (checked by callback_list)
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)
        # (whether the training and the evaluation batch logs may stay lazy: Keras 3's rule)
        self.lazy_train = all(_async_safe(cb, ("on_train_batch_end", "on_batch_end"))
                              for cb in self.callbacks)
        self.lazy_test = all(_async_safe(cb, ("on_test_batch_end",)) for cb in self.callbacks)

    def __getattr__(self, hook: str) -> Callable[..., None]:
        if hook not in HOOKS:
            raise AttributeError(hook)

        indexed = _indexed(hook)

        def call(*args: Any) -> None:
            args = args + ({},) * (1 + indexed - len(args))
            for cb in self.callbacks:
                getattr(cb, hook)(*args)

        setattr(self, hook, call)  # (found there from now on: fit calls two hooks a step)
        return call

    def on_train_begin(self, logs: MutableMapping[str, Any] | None = None) -> None:
        """Every callback's ``on_train_begin``, in order; where a checkpoint is to be written
        (a :class:`BackupAndRestore`, a whole-model :class:`ModelCheckpoint`), the states of
        the callbacks that keep one are then converted as its writer converts them, so that one
        a checkpoint cannot hold (a set, a date) is refused now, not at the first save after an
        epoch of training; before a :class:`BackupAndRestore` (last in fit) begins, so that a
        refused fit has resumed nothing."""
        logs = {} if logs is None else logs
        backup = next((k for k, cb in enumerate(self.callbacks)
                       if isinstance(cb, BackupAndRestore)), len(self.callbacks))
        for cb in self.callbacks[:backup]:
            cb.on_train_begin(logs)
        self._check_states()
        for cb in self.callbacks[backup:]:
            cb.on_train_begin(logs)

    def _check_states(self) -> None:
        if not any(isinstance(cb, BackupAndRestore) or isinstance(cb, ModelCheckpoint)
                   and not cb.save_weights_only for cb in self.callbacks):
            return
        states = []
        for cb in stateful(self.callbacks):
            try:
                states.append((type(cb).__name__, cb.get_state()))
            except Exception:  # (a state set in a first on_epoch_end: checked at the save)
                continue
        states_entry(states)  # (its InputError, a state no checkpoint holds, refuses the fit)
        for cb in stateful(self.callbacks):
            if type(cb).set_state is Callback.set_state:  # (its state kept, never given back)
                raise InputError(f"callback {type(cb).__name__} defines get_state() but not "
                                 "set_state(state): a checkpoint keeps the state it returns, "
                                 "and a resumed run would silently start it afresh; define "
                                 "set_state(self, state), taking that state back (or no "
                                 "get_state(), for a callback that keeps none)")

    def on_epoch_end(self, epoch: int, logs: MutableMapping[str, Any] | None = None) -> None:
        """Every callback's ``on_epoch_end``, in order; a :class:`ModelCheckpoint`'s save of
        the epoch is put off until the others' have run (before a :class:`BackupAndRestore`'s,
        which keeps what it decided), so that its file holds the epoch's every log and
        callback state, as a run resumed from it needs (its History, its CSVLogger rows).
        Not that of a subclass with an ``on_epoch_end`` of its own, which may use the file
        right after ``super().on_epoch_end()`` (to upload it, say): it saves at once. Where a
        callback raises (KeyboardInterrupt too), the saves put off are written before the
        error goes on, as Keras writes them in ModelCheckpoint's own hook, with the states of
        the callbacks from that one on as unknown (a resume of such a file is refused)."""
        logs = {} if logs is None else logs
        saves = [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)
                 and getattr(cb.on_epoch_end, "__func__", None) is ModelCheckpoint.on_epoch_end]
        for cb in saves:
            cb._pending = []
        at = 0  # (the callback running, or len(callbacks) once all have run)
        try:
            for cb in self.callbacks:
                if isinstance(cb, BackupAndRestore):
                    _save_pending(saves)
                cb.on_epoch_end(epoch, logs)
                at += 1
            _save_pending(saves)
        except BaseException as error:
            try:  # (the file Keras would have written: not lost to a later callback's error;
                # written by rank 0 without waiting on the others, which may not be saving)
                with distributed.on_the_way_out():
                    _save_pending(saves, self.callbacks[at:])
            except Exception as failed:  # (the first error is the one to see)
                add_note(error, f"the ModelCheckpoint save of epoch {epoch + 1} put off "
                         f"until after this error failed too: {type(failed).__name__}: "
                         f"{failed}")
            raise
        finally:
            for cb in saves:
                cb._pending = None

    def interruptible(self) -> contextlib.ExitStack:
        """A context around the training loop in which each :class:`BackupAndRestore` turns a
        Ctrl-C into a checkpoint and a clean stop (see :meth:`FitCheckpoints.interruptible`),
        and which closes the progress bar of an epoch that did not end (an error, a Ctrl-C:
        left open, it would push every later bar a line down), however the loop ends; inside,
        a Ctrl-C whose KeyboardInterrupt Python dropped is raised again (:mod:`xpcnn.ctrl_c`)."""
        scope = contextlib.ExitStack()
        scope.enter_context(ctrl_c.remembered())
        for cb in self.callbacks:
            if isinstance(cb, BackupAndRestore):
                scope.enter_context(cb.saver.interruptible())
        # (the bars closed first, before a checkpoint's line is printed)
        scope.enter_context(self.closing_bars())
        return scope

    def count_on_bars(self) -> None:
        """A batch of evaluate with no sample on this rank (its empty part of a short last
        batch on several ranks): no hook runs, but each ProgbarLogger counts it, so that rank
        0's bar and verbose=2 line end at n/n, as the other ranks' count."""
        for cb in self.callbacks:
            if isinstance(cb, ProgbarLogger) and not cb._in_fit:
                cb._advance(None)

    def closing_bars(self) -> contextlib.ExitStack:
        """A context that closes each :class:`ProgbarLogger`'s open bar however it ends (an
        error, a Ctrl-C: left open, a bar would push every later one a line down)."""
        scope = contextlib.ExitStack()
        for cb in self.callbacks:
            if isinstance(cb, ProgbarLogger):
                scope.callback(cb.close)
        return scope

    def on_non_finite(self, error: NonFiniteError) -> bool:
        """Hand a deferred :class:`NonFiniteError` to a :class:`TerminateOnNaN`, if there is
        one (True: training ends cleanly), else False (``fit`` raises it); a
        :class:`BackupAndRestore` learns of it too (it keeps its file, the last good state)."""
        handler = next((cb for cb in self.callbacks if isinstance(cb, TerminateOnNaN)), None)
        if handler is not None:
            for cb in (handler, *(cb for cb in self.callbacks
                                  if isinstance(cb, BackupAndRestore))):
                cb.on_non_finite(error)
        return handler is not None


def given_file(cb: Callback) -> str | None:
    """The path that ``cb`` writes in fit, as given (a BackupAndRestore's, or
    ``fit(checkpoint=...)``'s, a ModelCheckpoint's template, a CSVLogger's); None for a
    callback that writes none."""
    return cb.path if isinstance(cb, BackupAndRestore) else \
        cb.filepath if isinstance(cb, ModelCheckpoint) else \
        cb.filename if isinstance(cb, CSVLogger) else None


def _own_file(cb: Callback) -> str | tuple[str, str] | None:
    """The file ``cb`` writes in fit, as :func:`~xpcnn.files.written_file` names it (links
    followed), or for a ModelCheckpoint path with fields, its folder so named and its file
    name as given (two alike write the same files); None where ``cb`` writes no file that a
    write replaces (none at all, a device such as /dev/null, a pipe), or its path is one that
    its own ``on_train_begin`` refuses, naming it (a template that does not parse, a loop)."""
    path = given_file(cb)  # (braces are text but in a ModelCheckpoint's)
    try:
        if isinstance(cb, ModelCheckpoint):
            parts = list(string.Formatter().parse(cb.filepath))
            if any(field is not None for _, field, _, _ in parts):
                folder, name = os.path.split(cb.filepath)
                return written_file(folder or os.curdir), name
            path = "".join(literal for literal, *_ in parts)  # (braces unescaped, as filled)
        return written_file(path) if path is not None and replaceable(path) else None
    except (ValueError, OSError):
        return None


def check_own_files(callbacks: Collection[Callback]) -> None:
    """Refuse two of fit's writers (:class:`BackupAndRestore` or ``fit(checkpoint=...)``,
    :class:`ModelCheckpoint`, :class:`CSVLogger`) that would write one file: each write would
    replace the other's (the best model of ``save_best_only``, the log), as the command line
    refuses two outputs on one file. A ModelCheckpoint path with fields (``{epoch}``) is
    refused here where another ModelCheckpoint has the same one; where it fills to another's
    file, as it saves (:meth:`ModelCheckpoint._save`): every ModelCheckpoint is handed here
    one record of this fit's files, the fixed ones' and those its ModelCheckpoints write."""
    files: dict[str | tuple[str, str], Callback] = {}
    for cb in callbacks:
        if (file := _own_file(cb)) is None:
            continue
        if file in files:
            shown = file if isinstance(file, str) else os.path.join(*file)
            raise InputError(_same_file(files[file], cb, repr(shown)))
        files[file] = cb
    # (one record shared by the fit's ModelCheckpoints, every one handed it: none keeps an
    # earlier fit's)
    written = {f: cb for f, cb in files.items() if isinstance(f, str)}
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb._others = written


def _same_file(a: Callback, b: Callback, shown: str) -> str:
    """The refusal of ``a`` and ``b``, which would both write the file ``shown``."""
    what_a = getattr(a, "what", f"the {type(a).__name__}")
    what_b = getattr(b, "what", f"the {type(b).__name__}")
    if what_b == what_a:
        what_b = f"another {type(b).__name__}"
    lost = " (the best model that save_best_only keeps would be lost)" if any(
        isinstance(cb, ModelCheckpoint) and cb.save_best_only for cb in (a, b)) else \
        " (the CSV log would be lost)" if any(isinstance(cb, CSVLogger) for cb in (a, b)) else ""
    return f"{what_a} and {what_b} would both write {shown}: each would replace the other's " \
        f"file as training goes{lost}; give each a file of its own"


def _save_pending(saves: list[ModelCheckpoint], not_run: Collection[Callback] = ()) -> None:
    """The saves of ``saves`` put off, now, ``not_run`` being the callbacks that have not (all)
    run their ``on_epoch_end`` (their state unknown)."""
    for cb in saves:
        while cb._pending:
            cb._pending.pop(0)(not_run)


class LazyLogs(MutableMapping[str, float]):
    """A batch's logs for async-safe callbacks, read from the device only when a callback first
    looks at them (or writes to them). One that a callback keeps past its hook is read before
    the next step changes the sums it reads (:class:`BatchLogs`); a copy is a dict of the
    values."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read
        self._values: dict[str, float] | None = None

    def _get(self) -> dict[str, float]:
        if self._values is None:
            self._values = self._read()
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._get()[key]

    def __setitem__(self, key: str, value: float) -> None:
        self._get()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __copy__(self) -> dict[str, float]:
        return dict(self._get())

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, float]:
        return dict(self._get())  # (floats)


class BatchLogs:
    """Makes each batch's logs: where ``lazy`` (every callback async-safe, see
    :class:`CallbackList`), a :class:`LazyLogs`, the last one kept weakly, which
    :meth:`settle`, called before the next step changes the device sums they read, reads where
    a callback still holds them (where none does, they are gone, and nothing waits for the
    device); otherwise a dict, read at once."""

    def __init__(self, lazy: bool = True) -> None:
        self.lazy = lazy
        self._last: Callable[[], LazyLogs | None] = lambda: None

    def make(self, read: Callable[[], dict[str, float]]) -> MutableMapping[str, float]:
        if not self.lazy:
            return read()
        logs = LazyLogs(read)
        self._last = weakref.ref(logs)
        return logs

    def settle(self) -> None:
        logs, self._last = self._last(), lambda: None
        if logs is not None:
            logs._get()


def say_on_root(message: str) -> None:
    """A message of training (a callback's, a ``verbose=2`` line): printed on rank 0 only when
    several processes train together (:mod:`xpcnn.distributed`; they all hold the same
    logs)."""
    if distributed.is_root():
        print(message)


class LambdaCallback(Callback):
    """A callback from functions: ``LambdaCallback(on_epoch_end=lambda epoch, logs: ...)``."""

    def __init__(self, **hooks: Callable[..., None]) -> None:
        super().__init__()
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise InputError(f"LambdaCallback got unknown hooks {unknown}; expected some of "
                             f"{', '.join(HOOKS)}")
        for name, fn in hooks.items():
            if not callable(fn):
                raise InputError(f"LambdaCallback {name} must be a function, got {fn!r}")
            if not _binds(fn, *((0,) if _indexed(name) else ()), {}):  # (not after an epoch)
                index = "epoch, " if name.startswith("on_epoch") else \
                    "batch, " if _indexed(name) else ""
                raise InputError(f"LambdaCallback {name} is called as {name}({index}logs), "
                                 f"which {fn!r} cannot take")
            setattr(self, name, fn)


class History(Callback, history.EpochRecord):
    """Per-epoch metrics of a ``fit`` call: ``history.history["loss"]``, ``["val_accuracy"]``
    (an :class:`xpcnn.history.EpochRecord` kept by a callback; ``xpcnn.History``)."""

    def __init__(self) -> None:
        Callback.__init__(self)
        history.EpochRecord.__init__(self)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.append(epoch, dict(logs or {}))


def summary_line(steps: int, seconds: float, logs: Mapping[str, float] | None = None,
                 target: int | None = None) -> str:
    """Keras 3's line for a pass at ``verbose=2``: ``"1875/1875 - 5s - 3ms/step - loss: 0.2784
    - accuracy: 0.9191"`` (``steps`` of ``target``, where a pass stopped early; a value under
    1e-3 in exponent form, as there)."""
    per_step = seconds / max(steps, 1)
    pace = (f"{per_step:.0f}s" if per_step >= 1 or per_step == 0 else
            f"{per_step * 1e3:.0f}ms" if per_step >= 1e-3 else f"{per_step * 1e6:.0f}us")
    values = "".join(f" - {k}: {_shown(v)}" for k, v in (logs or {}).items()
                     if k != "seconds")
    return f"{steps}/{target or steps} - {seconds:.0f}s - {pace}/step{values}"


def _shown(value: Any) -> str:
    """A log's value on a progress line or bar, as Keras 3's Progbar shows it: 4 decimals, in
    exponent form at 1e-3 and under (a learning rate of 1e-5 is no 0.0000; 0 is 0.0000e+00,
    as there); a callback's log that is no number, as it is."""
    if not isinstance(value, numbers.Real):  # (NumPy's floats and ints are, its bool is not)
        return str(value)
    return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"


def bar_postfix(logs: Mapping[str, Any]) -> dict[str, str]:
    """The logs a progress bar shows after its count (``seconds`` is the bar's own)."""
    return {k: _shown(v) for k, v in logs.items() if k != "seconds"}


class ProgbarLogger(Callback):
    """``verbose=1``: a tqdm progress bar per epoch of fit, and one for each evaluate and
    predict (shown through the ``on_test_*`` and ``on_predict_*`` hooks, as in Keras 3; fit's
    validation shows none); the running loss and metrics shown are read from the device at most
    every ``refresh`` seconds (each read waits for the device). ``verbose=2`` (for log files,
    as in Keras 3): ``Epoch k/N`` as an epoch begins (where there are several) and
    :func:`summary_line` as it ends, nothing in between (evaluate and predict: that line alone,
    as they end). ``verbose=0``: nothing. One passed in the ``callbacks`` of fit, evaluate or
    predict is that call's progress bar (it adds none of its own) and takes the call's
    ``verbose``, as in Keras 3."""

    async_safe = True

    def __init__(self, refresh: float = 0.5, verbose: int = 1) -> None:
        super().__init__()
        self.refresh, self.verbose = refresh, verbose  # (verbose: until a call's params)
        self.bar: Any = None
        self.last = 0.0
        self.steps = 0
        self.t0 = 0.0  # (when evaluate or predict began: its verbose=2 line's time)

    def set_params(self, params: dict[str, Any]) -> None:
        """Each call's ``params`` (fit's, evaluate's, predict's) give the bar its ``verbose``,
        as in Keras 3."""
        super().set_params(params)
        self.verbose = params.get("verbose", self.verbose)

    @property
    def _in_fit(self) -> bool:
        """Whether the call is fit (its params alone say whether it has validation data),
        whose validation runs the on_test_* hooks without a bar, as in Keras 3."""
        return "validation" in self.params

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        steps, start = self.params.get("steps"), self.model._position[1]  # (resumed inside)
        self.steps, self.bar = start, None
        if not self.verbose:
            return
        if self.verbose == 2:
            if self.params["epochs"] > 1:
                say_on_root(f"Epoch {epoch + 1}/{self.params['epochs']}")
            return
        self.bar = tqdm(total=steps, initial=start, desc=f"Epoch {epoch + 1}/"
                        f"{self.params['epochs']}", unit="batch", leave=True, dynamic_ncols=True)
        self.last = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        self._advance(logs)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self._end_pass(logs, (logs or {}).get("seconds", 0.0), self.params["steps"])

    def on_test_begin(self, logs: Mapping[str, float] | None = None) -> None:
        if not self._in_fit:
            self._begin_pass("evaluate")

    def on_test_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        if not self._in_fit:
            self._advance(logs)

    def on_test_end(self, logs: Mapping[str, float] | None = None) -> None:
        if not self._in_fit:
            self._end_pass(logs)

    def on_predict_begin(self, logs: Mapping[str, float] | None = None) -> None:
        self._begin_pass("predict")

    def on_predict_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._advance(None)  # (its logs are the batch's outputs: not shown)

    def on_predict_end(self, logs: Mapping[str, float] | None = None) -> None:
        self._end_pass(None)

    def _begin_pass(self, desc: str) -> None:
        """evaluate's or predict's bar (``desc``), on rank 0 only."""
        self.steps, self.bar, self.t0 = 0, None, time.perf_counter()
        if self.verbose == 1 and distributed.is_root():
            self.bar = tqdm(total=self.params.get("steps"), desc=desc, unit="batch")
            self.last = time.monotonic()

    def _advance(self, logs: Mapping[str, float] | None) -> None:
        """One batch more on the bar; its running ``logs`` shown at most every ``refresh``
        seconds (read from the device only then)."""
        self.steps += 1
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if logs is not None and now - self.last >= self.refresh:
            self.last = now
            self.bar.set_postfix(bar_postfix(logs))

    def _end_pass(self, logs: Mapping[str, float] | None, seconds: float | None = None,
                  target: int | None = None) -> None:
        """The end of an epoch of fit (``seconds``: its logs', ``target``: its steps) or of
        evaluate or predict (timed from their begin): its bar closed, showing ``logs``; at
        ``verbose=2``, its one line."""
        if self.bar is not None:
            if logs:
                self.bar.set_postfix(bar_postfix(logs))
            self.close()
        elif self.verbose == 2:
            say_on_root(summary_line(self.steps, time.perf_counter() - self.t0
                                     if seconds is None else seconds, logs, target))

    def close(self) -> None:
        """Close the open bar, if any (fit's training loop and evaluate and predict do, however
        they end: :meth:`CallbackList.closing_bars`)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def validates(params: Mapping[str, Any], epoch: int) -> bool:
    """Whether the fit of ``params`` validates after ``epoch`` (0-based): it has validation
    data, and its ``validation_freq`` (k: every k-th epoch; a set: those epochs, 1-based, as
    in Keras) names the epoch."""
    if not params.get("validation"):
        return False
    freq = params.get("validation_freq", 1)
    return (epoch + 1) % freq == 0 if isinstance(freq, int) else epoch + 1 in freq


def _validates_some_epochs(params: Mapping[str, Any]) -> bool:
    """A fit with validation data that validates after some of its epochs but not all."""
    epochs = range(params.get("initial_epoch", 0), params.get("epochs", 0))
    return bool(params.get("validation")) and not all(validates(params, e) for e in epochs)


def _freq(params: Mapping[str, Any]) -> Any:
    """``validation_freq`` as the user wrote it (a collection as a sorted list)."""
    freq = params["validation_freq"]
    return freq if isinstance(freq, int) else sorted(freq)


def _validation_names(model: Any) -> list[str]:
    """The ``val_*`` logs of a validated epoch."""
    return [f"val_{name}" for name in model.metrics_names]


#: The direction of the metrics ``fit`` logs (``val_`` ones alike), for ``mode="auto"``: the
#: loss, and the names compile takes for metrics (a name given to a metric object is known
#: too: :func:`auto_mode`).
AUTO_MODES = {"loss": "min", **dict.fromkeys(metrics.NAMES, "max")}

#: The names fit's own logs can have (the batch logs and an epoch's, without ``val_``): the loss
#: and the names compile takes for metrics; a model logs the loss and its
#: ``metrics_names``, ``val_`` ones for its validation data.
FIT_LOGS = tuple(AUTO_MODES)


def auto_mode(monitor: str, model: Any = None) -> str:
    """``mode="auto"``'s direction for ``monitor`` ("auto" where unknown): the loss is
    minimised, xpcnn's metrics maximised: by compile's names, and with ``model`` by the names
    it logs its metrics under (a name given to a metric object), as Keras 3 reads the model's
    metrics."""
    name = str(monitor).removeprefix("val_")
    known = AUTO_MODES.get(name, "auto")
    if known == "auto" and model is not None and name in model.metrics_names[1:]:
        return "max"
    return known


def _log(logs: Mapping[str, float] | None, name: str, value: float) -> None:
    """Add ``name`` to the epoch logs, for the callbacks after this one and the History."""
    if isinstance(logs, MutableMapping):
        logs[name] = value


def _counts(state: Mapping[str, Any], *keys: str) -> list[int]:
    """The ints >= 0 of a checkpoint's callback ``state`` under ``keys`` (ValueError else; a
    NumPy integer, which a subclass's state may hold and the checkpoint keeps, as the int)."""
    values = [state.get(k) for k in keys]
    for k, v in zip(keys, values, strict=True):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{k} is {v!r}, expected an int >= 0")
    return [int(v) for v in values]  # type: ignore[arg-type]


def _best(state: Mapping[str, Any]) -> float | None:
    """The best value of a checkpoint's callback ``state``: a number or None."""
    best = state.get("best")
    if best is not None and (isinstance(best, bool | np.bool_)
                             or not isinstance(best, numbers.Real)):
        raise ValueError(f"best is {best!r}, expected a number or null")
    return None if best is None else float(best)


class _Monitor(Callback):
    """Shared by the callbacks that watch one metric for improvement, with Keras' rules: the
    first value is the first best; a later one improves on ``best`` when it is lower (mode
    "min") or higher ("max") by more than ``min_delta`` (in float32, as Keras compares: a change
    of exactly ``min_delta`` is decided by rounding, as there); ``mode="auto"`` is "min" for
    ``loss`` and ``val_loss``, "max" for the metrics (``accuracy``, ``acc``, the top-k ones, a
    name given to a metric object: :mod:`xpcnn.metrics`) and their ``val_`` ones; a name
    compile's strings do not give is decided when training begins, from the model's metrics.

    Deliberate differences from Keras: a name whose direction is unknown with ``mode="auto"``
    is refused when training begins, where the monitor decides something (``watched``: a
    ModelCheckpoint's only with ``save_best_only``), where Keras raises at the end of the first
    epoch; a monitor
    missing from the logs is an error (Keras warns and skips the epoch, so a typo silently
    disables the callback), but for a validation metric in an epoch that
    ``fit(validation_freq=...)`` does not validate, which is skipped, as there; a NaN value
    never improves, not even as the first one (in Keras a NaN first value becomes the best,
    which nothing can then beat: training stops after ``patience`` epochs and restores the
    NaN epoch's weights).
    """

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0,
                 watched: bool = True) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise InputError(f"{type(self).__name__} monitor must be the name of a log, a str "
                             f"such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise InputError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        # (a name compile's strings do not give stays "auto" until the model is known: a
        # metric object's own name, Keras 3's rule; check_monitor decides or refuses it)
        self.monitor, self.mode = monitor, auto_mode(monitor) if mode == "auto" else mode
        self._watched = watched
        self.min_delta = abs(checks.number(min_delta, f"{type(self).__name__} min_delta"))

    def get_state(self) -> dict[str, Any]:
        """What it watches, which its best value is of (:meth:`state_fits`)."""
        return {"monitor": self.monitor, "mode": self.mode}

    def state_fits(self, state: dict[str, Any] | None) -> bool:
        # (a state without them: kept before they were, of the same callbacks)
        return isinstance(state, dict) and (state.get("monitor", self.monitor),
                                            state.get("mode", self.mode)) == (self.monitor,
                                                                              self.mode)

    def current(self, logs: Mapping[str, float] | None) -> float | None:
        """The monitored value of an epoch's logs; None for a validation metric in an epoch
        that fit did not validate (``fit(validation_freq=...)`` skips it, or its validation
        iterator gave no batch): the epoch is then skipped, as in Keras; any other missing
        name is an error."""
        if logs and self.monitor in logs:
            value = logs[self.monitor]
            if not isinstance(value, str | bytes | bool) and value is not None:
                with contextlib.suppress(TypeError, ValueError):
                    return float(value)
            raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, whose value in "
                             f"the epoch logs is {value!r}: expected a number (a callback "
                             "adding it to the logs gives a float)")
        if self._validation_metric() and not self._epoch_validated():
            return None
        raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, which the epoch "
                         f"logs lack (they have {sorted(logs or {})}); pass "
                         "validation_data for 'val_*' metrics")

    def _epoch_validated(self) -> bool:
        """Whether the epoch ending now has ``val_*`` logs: fit says so (the model's
        ``_epoch_validated``, set for each epoch); outside fit (a callback driven by hand), by
        its ``params``' ``validation_freq``."""
        validated = getattr(self.model, "_epoch_validated", None)
        return not _validates_some_epochs(self.params) if validated is None else validated

    def _validation_metric(self) -> bool:
        """Whether the monitor is one of the ``val_*`` logs of the model's validation."""
        return self.monitor in _validation_names(self.model)

    def check_monitor(self) -> None:
        """Refuse fit's own metrics that its logs will lack now, not at the end of the first
        epoch: a metric the model was not compiled with (or under another name: ``acc`` for
        ``accuracy``), or a validation metric in a fit without validation data (``fit`` says in
        ``params`` whether it has some). Other names may come from a user's callback, which can
        add them to the logs."""
        self.decide_mode()
        metric = self.monitor.removeprefix("val_")
        names = self.model.metrics_names
        if metric in FIT_LOGS and metric not in names:
            # (another name of the accuracy is suggested for the accuracy alone)
            logged = [n for n in names if n in metrics.ACCURACY_NAMES] \
                if metric in metrics.ACCURACY_NAMES else []
            how = f"it logs the accuracy as {logged[0]!r}: monitor " \
                f"{self.monitor.replace(metric, logged[0])!r}, or compile it with " \
                f"metrics=[{metric!r}]" if logged else \
                f"compile it with metrics=[{metric!r}], or monitor 'loss'"
            raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, but the model "
                             f"was compiled without the {metric!r} metric: {how}")
        if self._validation_metric() and self.params.get("validation") is False:
            raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, which the epoch "
                             "logs lack in a fit without validation data: pass validation_data "
                             "(or validation_split), or monitor 'loss'")
        first, epochs = self.params.get("initial_epoch", 0), self.params.get("epochs", 0)
        if self._validation_metric() and _validates_some_epochs(self.params) and not any(
                validates(self.params, e) for e in range(first, epochs)):
            raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, but "
                             f"validation_freq={_freq(self.params)!r} validates "
                             f"after none of epochs {first + 1} to {epochs}: it would never "
                             "decide anything")

    def decide_mode(self) -> None:
        """``mode="auto"`` for a name only the model knows: "max" for one of its metrics
        (:func:`auto_mode`); refused where the monitor decides something and it is not."""
        if self.mode != "auto" or not self._watched or self.model is None:
            return
        self.mode = auto_mode(self.monitor, self.model)
        if self.mode == "auto":
            raise InputError(f"{type(self).__name__} cannot tell whether {self.monitor!r} should "
                             "go down or up: pass mode='min' or mode='max' (mode='auto' knows "
                             "loss and the model's metrics, and their val_ names: a metric, "
                             "the accuracy too, is logged under the name compile's metrics "
                             f"gave it; this model logs {', '.join(self.model.metrics_names)})")

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (None: nothing yet) by more than ``min_delta``."""
        self.decide_mode()  # (a callback driven by hand, outside fit's on_train_begin)
        if math.isnan(value):
            return False
        if best is None:
            return True
        # (as Keras: shifted by min_delta, then both sides rounded to float32, so that a change
        # of exactly min_delta, or one below float32's resolution, is decided as in Keras)
        with np.errstate(over="ignore"):
            if self.mode == "min":
                return bool(np.float32(value + self.min_delta) < np.float32(best))
            return bool(np.float32(value - self.min_delta) > np.float32(best))


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs (Keras' rules, see :class:`_Monitor`); epochs before ``start_from_epoch`` (0-based)
    are not watched at all. ``stopped_epoch`` is the 0-based epoch that stopped training (0:
    it did not stop; as in Keras, the first epoch never stops it).

    ``baseline``: the patience runs from the last epoch that beat both the best value so far
    and ``baseline``: training stops ``patience`` epochs after that (after the start without
    one) at an epoch that does not improve on the best value; an epoch that improves on it
    without reaching the baseline neither stops training nor resets the count (Keras' rule).

    ``restore_best_weights``: end with the weights of the best epoch (``best_epoch``), also
    when training ends without an early stop, and also when no epoch reached the baseline (the
    best of those watched). A checkpoint then holds the best weights too, by design, so it
    holds the weights twice: a run resumed from it after its best epoch ends with them.
    """

    # (positional as far as Keras' order is the same, keyword-only after: a Keras positional
    # call that would land on another parameter is a TypeError)
    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 *, mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, verbose: int = 0,
                 start_from_epoch: int = 0) -> None:
        super().__init__(monitor, mode, min_delta)
        self.patience = checks.non_negative_int(patience, "EarlyStopping patience")
        self.baseline = None if baseline is None else checks.number(baseline, "baseline")
        self.restore_best_weights = checks.flag(restore_best_weights, "restore_best_weights")
        self.start_from_epoch = checks.non_negative_int(start_from_epoch, "start_from_epoch")
        self.verbose = verbose

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        self.check_monitor()
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best: float | None = None
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        value = self.current(logs)
        if value is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:  # (until one is better)
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
        self.wait += 1
        if self.improves(value, self.best):
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self.improves(value, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, float] | None = None) -> None:
        if self.stopped_epoch and self.verbose:
            say_on_root(f"early stopping at epoch {self.stopped_epoch + 1}: {self.monitor} has not "
                 f"improved since epoch {self.best_epoch + 1}")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                best = "" if self.best is None else f" ({self.monitor} {self.best:.6g})"
                say_on_root(f"restoring the weights of the best epoch, {self.best_epoch + 1}{best}")
            self.model.set_weights(self.best_weights)

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "best": self.best, "wait": self.wait,
                "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
                "best_weights": self.best_weights}

    def set_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        wait, best_epoch, stopped_epoch = _counts(state, "wait", "best_epoch", "stopped_epoch")
        best, weights = _best(state), state.get("best_weights")
        if weights is not None:
            # (those the model would take back at the end, checked now: their shapes and dtypes)
            expected = [(w.shape, w.dtype) for w in self.model.get_weights()]
            if not isinstance(weights, list) or [(getattr(w, "shape", None), getattr(
                    w, "dtype", None)) for w in weights] != expected:
                raise ValueError("best_weights do not match the model's weights")
        self.best, self.wait, self.best_epoch, self.stopped_epoch = (best, wait, best_epoch,
                                                                    stopped_epoch)
        self.best_weights = weights


def is_save_freq(value: Any) -> bool:
    """Keras' ``save_freq``: "epoch", or a positive number of batches."""
    if isinstance(value, str):
        return value == "epoch"
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class _TrialLogs(dict):  # type: ignore[type-arg]
    """The logs of a trial fill of a path template: 0 for a name that a user's callback may
    add to the logs, and no value for fit's own metrics that its logs will lack (validation
    ones without validation, accuracy without that metric), nor for ``batch`` where the saves
    are at the ends of epochs."""

    def __missing__(self, key: str) -> float:
        if key.removeprefix("val_") in FIT_LOGS or key == "batch":
            raise KeyError(key)
        return 0.0


class ModelCheckpoint(_Monitor):
    """Save the model at the end of each epoch to ``filepath``, a template filled with the
    1-based ``epoch`` and the epoch logs: ``"ckpt-{epoch:02d}-{val_loss:.3f}.npz"`` (a
    ``val_*`` log where every epoch it saves in validates: with ``fit(validation_freq=k)``,
    only with ``save_best_only`` on a ``val_*`` monitor; refused before training otherwise).
    Under ``mpiexec`` every rank must have it (rank 0 writes): saving averages the ranks'
    BatchNorm statistics, a collective. A file of another of fit's writers is refused
    (:func:`check_own_files`); one the template fills to, or that another ModelCheckpoint
    wrote in this fit, before that save: fit stops there (exact for every format, where a
    check before training would guess).

    ``save_best_only``: only when ``monitor`` improved (the path may then be fixed); the first
    value saves unless ``initial_value_threshold`` is given: then only a value beating it.
    The best value is kept across ``fit`` calls, as in Keras. ``save_weights_only``: the
    weights (:meth:`Model.save_weights`) instead of a whole training checkpoint (optimiser
    state too, :func:`xpcnn.load_checkpoint`). Both load with :meth:`Model.load_weights` and
    :func:`xpcnn.load_model` (a weights file's model uncompiled). A whole checkpoint also
    describes its run and holds the callbacks' states, as :class:`BackupAndRestore`'s does, so
    that ``fit(checkpoint=that_file, resume=True)`` goes on from it (from its batch, with
    ``save_freq=N``), exactly. In fit, the whole checkpoint of an epoch's end is written (and
    ``save_best_only`` decided) once every callback's ``on_epoch_end`` has run, so that it holds
    the logs (``learning_rate``, a user's metric) and states of the callbacks after this one;
    a callback after it sees the file in its next hook, not in this ``on_epoch_end`` (a weights
    file is written at once, as in Keras; so is the whole checkpoint of a subclass with an
    ``on_epoch_end`` of its own, which may use the file right after
    ``super().on_epoch_end()``). Where a callback raises in its ``on_epoch_end`` (a
    KeyboardInterrupt too), the file put off is written before the error goes on, as Keras
    would have written it, except where it could not be resumed (below) and a file is at its
    path already: that one, which may resume, is kept. With ``save_freq=N``, where a callback
    that keeps a state and has a batch hook of its own comes after this one, its state at that
    point is not known yet, and resuming the file is refused; so it is for a file of an
    epoch's end written before a callback that keeps a state and has an ``on_epoch_end`` of
    its own ran it (after a subclass's own save, or the one that raised). An epoch without
    ``val_*`` logs (not validated, or whose validation iterator gave no batch) saves nothing
    where the path or the ``save_best_only`` monitor needs them.

    ``save_freq=N`` (Keras' batch-level saving): instead of at the end of each epoch, save
    after every ``N`` batches, counted across epochs; the template may use the 1-based
    ``batch`` in its epoch, and the logs are the batch logs (the epoch's running ``loss`` and
    accuracy, named as compile's metrics name it), which ``save_best_only`` then compares.
    Unlike Keras, which then saves anyway with a warning, a monitor the batch logs lack is
    refused.
    """

    async_safe = True

    # (positional as far as Keras' order is the same, keyword-only after: a Keras positional
    # call that would land on another parameter is a TypeError)
    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "val_loss",
                 *, save_best_only: bool = False, save_weights_only: bool = False,
                 mode: str = "auto", verbose: int = 0, save_freq: int | str = "epoch",
                 initial_value_threshold: float | None = None) -> None:
        super().__init__(monitor, mode, watched=save_best_only is True)
        self.filepath = checks.file_path(filepath, "ModelCheckpoint filepath")
        refuse_foreign_suffix(self.filepath, "ModelCheckpoint filepath")  # (before any epoch)
        self.save_best_only = checks.flag(save_best_only, "save_best_only")
        self.save_weights_only = checks.flag(save_weights_only, "save_weights_only")
        if not is_save_freq(save_freq):
            raise InputError(f"ModelCheckpoint save_freq must be 'epoch' or a positive number "
                             f"of batches, got {save_freq!r}")
        if save_freq != "epoch" and save_best_only and (
                str(monitor).startswith("val_") or monitor == "seconds"):
            self._refuse_batch_monitor(save_freq, monitor)
        self.save_freq, self.verbose = save_freq, verbose
        self.best = None if initial_value_threshold is None else checks.number(
            initial_value_threshold, "initial_value_threshold")
        self.batches = 0  # since the last save, with save_freq=N (kept across fits, as in Keras)
        self.run: dict[str, Any] = {}
        # (the epoch's save, put off by fit's CallbackList until every on_epoch_end has run)
        self._pending: list[Callable[[], None]] | None = None
        # (fit's files, by file: its fixed writers' and those its ModelCheckpoints wrote, one
        # record for them all, see check_own_files)
        self._others: dict[str, Callback] = {}

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "best": self.best, "batches": self.batches}

    def state_fits(self, state: dict[str, Any] | None) -> bool:
        # (its monitor matters only where it saves the best: its best is None otherwise)
        return not self.save_best_only or super().state_fits(state)

    def set_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        (batches,) = _counts(state, "batches")
        self.best, self.batches = _best(state), batches

    @staticmethod
    def _refuse_batch_monitor(save_freq: int | str, monitor: str) -> None:
        raise InputError(f"ModelCheckpoint with save_freq={save_freq} compares the batch logs, "
                         "which hold the loss and the compiled metrics only: monitor one of "
                         f"them, not {monitor!r} (a metric by the name compile's metrics gave "
                         "it: 'accuracy' or 'acc' for the accuracy)")

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        if self.save_best_only:
            self.check_monitor()
            if self.save_freq != "epoch" and self.monitor not in self.model.metrics_names:
                self._refuse_batch_monitor(self.save_freq, self.monitor)
        # (the template filled now, so that it fails before the first epoch rather than after)
        names = list(self.model.metrics_names)
        if self.save_freq == "epoch":
            names.append("seconds")
            # (the val_* logs in every epoch it saves in: a fit that validates every epoch, or
            # one that saves only at a better val_* value)
            if self.params.get("validation") is not False and (
                    not _validates_some_epochs(self.params)
                    or self.save_best_only and self._validation_metric()):
                names += _validation_names(self.model)
        fields = _TrialLogs(dict.fromkeys(names, 0.0), epoch=1)
        if self.save_freq != "epoch":
            fields["batch"] = 1
        path = self._fill(fields)
        if distributed.is_root():  # (the one writer)
            checks.output_file(path, "the ModelCheckpoint file")
        _check_savable(self.model, "the ModelCheckpoint file")
        data = self.params.get("data")  # (none where a user drives it by hand)
        if not self.save_weights_only:  # (a generator's run cannot be resumed: none)
            self.run = run_description(self.params) if data and data.resumable else {}

    def _fill(self, fields: Mapping[str, Any]) -> str:
        try:
            return self.filepath.format_map(fields)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            logs = sorted(k for k in fields if k not in ("epoch", "batch"))
            where = "epoch" if self.save_freq == "epoch" else "epoch, batch"
            raise InputError(f"ModelCheckpoint path {self.filepath!r} could not be filled from "
                             f"{where} and the logs {logs}: {e}") from e

    def _names_validation(self) -> bool:
        """Whether the path template names a ``val_*`` log."""
        roots = {re.split(r"[.\[]", field)[0] for _, field, _, _ in
                 string.Formatter().parse(self.filepath) if field}
        return bool(roots & set(_validation_names(self.model)))

    def on_train_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        if self.save_freq == "epoch":
            return
        self.batches += 1
        if self.batches >= self.save_freq:
            self.batches = 0
            self._save(self.model._position[0], dict(logs or {}), batch)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        if self.save_freq != "epoch":
            return
        if self._pending is None or self.save_weights_only:
            # (weights alone, a callback after this one may look at at once, as in Keras; or
            # driven by hand, or inside another callback's hook, or a subclass's own hook)
            self._save(epoch, dict(logs or {}))
        else:  # (a whole checkpoint, in fit: once every callback's on_epoch_end has run, so
            # that it holds their logs and states, as resuming it needs; see CallbackList)
            self._pending.append(lambda not_run: self._save(epoch, dict(logs or {}),
                                                            not_run=not_run))

    def _save(self, epoch: int, logs: dict[str, float], batch: int | None = None,
              not_run: Collection[Callback] | None = None) -> None:
        """Save after ``batch`` (0-based) of ``epoch``, or at its end (None); ``not_run``:
        the callbacks that have not run their hook for this point (their state unknown),
        None for those after this one in fit's."""
        if batch is None and not self._epoch_validated() and self._names_validation():
            return  # (an epoch without validation: its path needs the val_* logs it lacks)
        if self.save_best_only:
            value = self.current(logs)
            if value is None or not self.improves(value, self.best):
                return
            self.best = value
        fields = {**logs, "epoch": epoch + 1, **({} if batch is None else {"batch": batch + 1})}
        path = self._fill(fields)
        at = f"epoch {epoch + 1}" + ("" if batch is None else f", batch {batch + 1}")
        other = self._others.setdefault(file := written_file(path), self)
        if other is not self:
            raise InputError(_same_file(self, other, f"{file!r} (its path {self.filepath!r} "
                                        f"filled at {at}; not written)"))
        # (every rank saves alike, from the same count and logs; the ranks' BatchNorm
        # statistics, averaged by fit at the end of each epoch, are averaged here inside one)
        if batch is not None and self.model._parallel is not None:
            self.model._parallel.average_state()
        wrote = True
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            # (fit's stateful callbacks, none where a user drives this one by hand; those after
            # this one that have a hook of their own for this point have not run it yet, and
            # none has where this one runs inside another's hook, as a wrapper's)
            hooks = ("on_epoch_end",) if batch is None else ("on_train_batch_end",
                                                             "on_batch_end")
            stateful = self.params.get("stateful", [])
            at_error = bool(not_run)  # (the save put off, written as a later callback raised)
            if not_run is None:
                not_run = stateful[stateful.index(self) + 1:] if self in stateful else []
            states = callback_states(stateful, [cb for cb in stateful if cb in not_run and any(
                _overrides(cb, h) for h in hooks)])
            if batch is None:
                # (a file that cannot be resumed, written at an error, does not replace the
                # last one, which may be: the point to resume from is kept)
                wrote = save_checkpoint(self.model, path, Progress(epoch + 1),
                                        _history_through(self.model.history, epoch, logs),
                                        self.run, states, self.model.stop_training,
                                        replace=not at_error or all(
                                            state is not None for _, state in states))
            else:  # (inside the epoch: where it stands, so that it resumes there)
                wrote = save_checkpoint(self.model, path,
                                        progress_within(self.model, epoch, batch + 1),
                                        self.model.history, self.run, states)
        if self.verbose:
            say_on_root(at + (f": saved {path}" if wrote else f": kept {path}, which may resume "
                              "(this epoch's file could not: a callback raised before all had "
                              "run)"))


def _check_savable(model: Any, file: str) -> None:
    """Refuse, before training, what the first save would refuse after an epoch of it: a
    user's layer, optimiser or schedule whose settings its file cannot hold."""
    config_entry(model_config(model), f"{file} could not be written")


def _history_through(done: history.EpochRecord, epoch: int, logs: dict[str, float]
                     ) -> history.EpochRecord:
    """``done`` with ``epoch``'s logs as they stand, for a checkpoint written at the end of the
    epoch before the History callback, which runs after the user's ones, records it."""
    if done.epoch[-1:] == [epoch]:
        return done
    record = history.EpochRecord()
    record.epoch, record.history = list(done.epoch), {k: list(v) for k, v in done.history.items()}
    record.sparse = {k: list(v) for k, v in done.sparse.items()}
    record.append(epoch, logs)
    return record


class BackupAndRestore(Callback):
    """Exact resumption of an interrupted ``fit``: the whole training state goes to ``path``
    at the end of every epoch (and every ``save_freq`` steps when that is an int); a run started
    again with the same callback, model, data and ``fit`` arguments continues from the file and
    ends with the same weights, bit for bit, and the same history as an uninterrupted run.
    ``resume=False`` ignores an existing file. While training, a Ctrl-C lets the step in
    progress finish, writes the checkpoint there and stops with
    :class:`~xpcnn.errors.TrainingInterrupted`. ``fit(checkpoint=PATH, resume=True)`` is short
    for this callback (:mod:`xpcnn.saving.checkpoint` describes the file); a ``fit`` takes one
    (``checkpoint=`` counts as one), whose file no other callback of the fit may write (a
    CSVLogger's, a ModelCheckpoint's: refused before training, or at the epoch a template fills
    to it, :func:`check_own_files`). The
    learning-rate factor that :class:`ReduceLROnPlateau` or
    :class:`LearningRateScheduler` set is optimiser state and comes back; so do, unlike in
    Keras, the states of the callbacks that keep one (:class:`EarlyStopping`'s best value,
    patience count and best weights, :class:`ReduceLROnPlateau`'s, :class:`ModelCheckpoint`'s
    best value, a user's callback's :meth:`Callback.get_state`): the resumed run must have the
    same such callbacks, of the same classes in the same order (their settings may differ),
    else it is refused (a file of an earlier version, which holds none, starts them afresh with
    a warning). A run that a callback stopped (early stopping) trains no more when resumed.
    What only decides when to validate (``validation_freq``,
    ``validation_batch_size``) may differ in the resumed run: the weights come out the same.
    ``delete_checkpoint`` (as in Keras): the file is deleted when ``fit`` ends without being
    interrupted (or stopped by :class:`TerminateOnNaN`: the file holds the last good state), so
    that the script run again trains afresh; False keeps it (a finished run
    resumed then trains nothing and returns its history), as ``fit(checkpoint=PATH)`` does."""

    async_safe = True

    # (positional as far as Keras' order is the same, keyword-only after: a Keras positional
    # call that would land on another parameter is a TypeError)
    def __init__(self, path: str | os.PathLike[str], save_freq: int | str = "epoch",
                 *, resume: bool = True, delete_checkpoint: bool = True) -> None:
        super().__init__()
        path = checks.file_path(path, "checkpoint")
        if not os.path.exists(path):  # (fit(checkpoint=...)'s too; a file there already,
            refuse_foreign_suffix(path, "checkpoint")  # an old run's, resumes)
        if not is_save_freq(save_freq):
            raise InputError(f"BackupAndRestore save_freq must be 'epoch' or a positive number "
                             f"of steps, got {save_freq!r}")
        self.path, self.save_freq = path, save_freq
        self.resume = checks.flag(resume, "resume")
        self.delete_checkpoint = checks.flag(delete_checkpoint, "delete_checkpoint")
        self.what = "the BackupAndRestore"  # (as errors name it; fit(checkpoint=) sets its own)

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        self.ended_non_finite = False
        data = self.params["data"]
        if not data.resumable:
            raise InputError("BackupAndRestore needs data whose batches can be replayed: arrays "
                             "or a map-style dataset, not a generator or another iterable of "
                             "batches (a DataLoader: its batches are its own to order)")
        if distributed.is_root():  # (the one writer)
            checks.output_file(self.path, "the checkpoint")
        _check_savable(self.model, "the checkpoint")
        # (run last, after the other callbacks' on_train_begin: their states go on from the file)
        self.saver = FitCheckpoints(self.model, self.path, self.save_freq, self.resume,
                                    run_description(self.params), self.params["steps"],
                                    self.params["verbose"], self.params["stateful"],
                                    self.params.get("csv_loggers", []))
        history, start = self.saver.start()
        if start is not None:
            record = self.model.history
            record.epoch, record.history, record.sparse = (history.epoch, history.history,
                                                           history.sparse)
            if self.saver.stopped:  # (a callback ended that run: it trains no more)
                start = dataclasses.replace(start, epoch=max(start.epoch, self.params["epochs"]))
            self.model._resume_at = start

    def on_train_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        epoch, step = self.model._position
        # (after a Ctrl-C the saver writes at the step in progress and stops training; the
        # running sums are read from the device only for a checkpoint)
        if self.saver.due(epoch, step):
            self.saver.after_step(epoch, step, self.model.history)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.saver.after_epoch(epoch, self.model.history)

    def on_non_finite(self, error: NonFiniteError) -> None:
        self.ended_non_finite = True  # (its file holds the last good state: kept)

    def on_train_end(self, logs: Mapping[str, float] | None = None) -> None:
        # (not called where fit was interrupted or failed: the file is kept to resume from)
        if self.delete_checkpoint and not self.ended_non_finite:
            def remove() -> None:
                with contextlib.suppress(FileNotFoundError):  # (a link's target: link kept)
                    os.remove(written_file(self.path))

            distributed.write_on_root(remove, self.path)  # (every rank returns once it is gone)


_ABSOLUTE = ("xpcnn's min_delta is absolute (an improvement is below best - min_delta, "
             "PyTorch's threshold_mode='abs'); PyTorch's default threshold is relative "
             "(threshold_mode='rel': below best * (1 - threshold)): min_delta=threshold * "
             "(a typical value of the monitor) for about the same")
#: PyTorch's ReduceLROnPlateau keywords that Keras' callback has not: what instead.
_TORCH_PLATEAU = {
    "threshold": _ABSOLUTE, "threshold_mode": _ABSOLUTE,
    "eps": ("not offered: the rate is reduced whenever it is above min_lr (PyTorch skips a "
            "reduction smaller than eps); leave eps out"),
}


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for
    ``patience`` epochs, then wait ``cooldown`` epochs; never below ``min_lr`` (Keras' rules, see
    :class:`_Monitor`). Adds the epoch's rate to the logs as ``learning_rate``, as Keras does,
    so the History of a ``fit`` records it. ``factor`` must lie in (0, 1) (Keras also takes 0 or
    less, which drops the rate to ``min_lr`` at once: say ``factor=1e-9`` for that)."""

    # (positional as far as Keras' order is the same, keyword-only after: a Keras positional
    # call that would land on another parameter is a TypeError)
    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 *, mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0, verbose: int = 0, **torch_keywords: Any) -> None:
        # PyTorch's scheduler, ported literally: ReduceLROnPlateau(optimizer, "min",
        # threshold=...), which read the optimiser as the monitor, or got a bare TypeError
        port = ("a Keras callback: fit(..., callbacks=[ReduceLROnPlateau(monitor='val_loss', "
                "factor=..., patience=...)]), which changes the compiled optimiser's rate; "
                "PyTorch's patience=p is patience=p + 1 here (PyTorch reduces after p + 1 "
                "epochs without improvement)")
        if any(k.__module__ == "xpcnn.optim" or str(k.__module__).startswith("torch.optim")
               for k in type(monitor).__mro__):  # (xpcnn's optimiser or torch's)
            raise InputError(f"ReduceLROnPlateau was given an optimizer ({type(monitor).__name__})"
                             " first, PyTorch's order, ReduceLROnPlateau(optimizer, mode): "
                             f"xpcnn's takes no optimizer, it is {port}")
        checks.take_foreign_keywords("ReduceLROnPlateau", torch_keywords, {
            key: ((), f"{instead}. xpcnn's is {port}") for key, instead in _TORCH_PLATEAU.items()},
            "PyTorch's")
        for key in torch_keywords:  # (none of PyTorch's: Python's own error)
            raise TypeError(f"ReduceLROnPlateau.__init__() got an unexpected keyword argument "
                            f"{key!r}")
        super().__init__(monitor, mode, min_delta)
        self.factor = checks.number(factor, "ReduceLROnPlateau factor", 0.0, 1.0, low_open=True,
                                    high_open=True)
        self.patience = checks.non_negative_int(patience, "ReduceLROnPlateau patience")
        self.cooldown = checks.non_negative_int(cooldown, "ReduceLROnPlateau cooldown")
        self.min_lr = checks.number(min_lr, "ReduceLROnPlateau min_lr", 0.0)
        self.verbose = verbose

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        self.check_monitor()
        self.best: float | None = None
        self.wait, self.cooling = 0, 0

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        value = self.current(logs)
        optimizer = self.model.optimizer
        _log(logs, "learning_rate", optimizer.lr)  # (the epoch's rate, as Keras logs it)
        if value is None:  # (an epoch without validation: nothing counts, as in Keras)
            return
        if self.cooling:
            self.cooling -= 1
            self.wait = 0
        if self.improves(value, self.best):
            self.best, self.wait = value, 0
            return
        if self.cooling:
            return
        self.wait += 1
        # (in float32, as Keras: a rate set to min_lr may read back a rounding above it)
        if self.wait >= self.patience and np.float32(optimizer.lr) > np.float32(self.min_lr):
            optimizer.lr = max(optimizer.lr * self.factor, self.min_lr)
            self.cooling, self.wait = self.cooldown, 0
            if self.verbose:
                say_on_root(f"epoch {epoch + 1}: learning rate reduced to {optimizer.lr:.3g}")

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "best": self.best, "wait": self.wait,
                "cooling": self.cooling}

    def set_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        wait, cooling = _counts(state, "wait", "cooling")
        self.best, self.wait, self.cooling = _best(state), wait, cooling


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of each epoch to ``schedule(epoch, lr)`` (0-based
    epoch, the current rate), or ``schedule(epoch)`` for a function of the epoch alone (both
    as in Keras). Adds the epoch's rate to the logs as ``learning_rate``, as Keras does. Unlike
    Keras, which calls ``schedule(epoch, lr)`` and retries ``schedule(epoch)`` on any TypeError,
    the signature decides, so a TypeError inside the schedule is not hidden."""

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        super().__init__()
        self.schedule, self.verbose = schedule, verbose
        self.takes_lr = _binds(schedule, 0, 0.1)
        if not callable(schedule) or not (self.takes_lr or _binds(schedule, 0)):
            raise InputError(f"LearningRateScheduler schedule must be a function of (epoch, lr) "
                             f"or of epoch, got {schedule!r}")

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        optimizer = self.model.optimizer
        optimizer.lr = self.schedule(epoch, optimizer.lr) if self.takes_lr else \
            self.schedule(epoch)
        if self.verbose:
            say_on_root(f"epoch {epoch + 1}: learning rate {optimizer.lr:.3g}")

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        _log(logs, "learning_rate", self.model.optimizer.lr)


def _binds(fn: Any, *args: Any) -> bool:
    """True where ``fn`` can be called with ``args`` (a callable without a signature, a
    builtin, is given the benefit of the doubt)."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        return False
    except ValueError:
        return callable(fn)
    return True


class CSVLogger(Callback):
    """One CSV row per epoch: ``epoch`` (0-based) and every log, to ``filename``
    (``append=True`` continues an existing file; a relative one is of the working folder as fit
    begins, where Keras 3 opens it). The columns are the first epoch's logs, sorted;
    a log missing in a later epoch is written ``NA``, as in Keras. Unlike Keras, ``append=True``
    keeps the existing file's columns (Keras writes the new run's columns under the old header).
    A fit that validates every few epochs (``validation_freq``) gets its ``val_*`` columns from
    the first epoch on, ``NA`` where an epoch was not validated, as in Keras; one without
    validation data gets none (Keras adds a ``val_`` column, all ``NA``, for every log). A new
    file (``append=False``) of a run resumed from a checkpoint starts with the epochs its
    History got back, so that it holds what an uninterrupted run's file holds. A resumed run
    appending goes on from the file as it was at the checkpoint, which records its size and
    CRC-32 (:meth:`backup_record`): the row that the run that stopped wrote after its last
    backup (of the epoch the resumed run goes on from: a stop leaves one at most) is dropped,
    the earlier ones (an earlier run's too) kept. Where the file does not begin with what was
    recorded (edited, replaced) or what follows is not that row (another run's), and for a
    checkpoint without the record (an earlier version's, ModelCheckpoint's), it appends: those
    epochs may have two rows, with a warning. A file cut back is cut in place (it stays the
    user's file); one that cannot be (append-only) is appended to, with a warning. A new
    file's first write (its header, those epochs, the first row) replaces the old file
    atomically: a write that fails (a full disk) names the file and leaves the old
    one as it was; later rows are appended."""

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",",
                 append: bool = False) -> None:
        super().__init__()
        self.filename = checks.file_path(filename, "CSVLogger filename")
        if not isinstance(separator, str) or len(separator) != 1:  # (csv takes one character)
            raise InputError(f"CSVLogger separator must be one character, such as ',' or "
                             f"'\\t', got {separator!r}")
        self.separator, self.append = separator, checks.flag(append, "CSVLogger append")
        self.mode: str | None = None  # how the next row opens the file; None: not yet in this fit
        self.writing = False
        self.path = self.filename  # (resolved as each fit begins)

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        # (checked now, written from the first epoch's end: a fit refused after this hook, by
        # a checkpoint that does not match, leaves the file as it was; a fit that failed, its
        # file ended: this one's starts afresh)
        self.mode = None
        # (the file this fit writes, its checkpoints record and a resume looks up: a relative
        # name is of the working folder now, as Keras 3 opens its file as fit begins; a later
        # chdir moves no row)
        try:  # (an absolute name needs no working folder)
            self.path = self.filename if os.path.isabs(self.filename) else os.path.join(
                os.getcwd(), self.filename)
        except OSError as e:  # (the working folder was deleted)
            raise InputError(f"cannot write the CSVLogger file {self.filename!r}: a relative "
                             f"name, and the working folder is gone ({e.strerror or e}): give "
                             "an absolute path") from None
        self.backup: dict[str, Any] | None = None  # the file at the checkpoint resumed from
        # (the record of the file as last read, and its stat: see backup_record)
        self._hashed: tuple[tuple[int, ...], dict[str, Any]] | None = None
        self.writing = distributed.is_root()  # one writer on several ranks (same logs on all)
        if not self.writing:
            return
        checks.output_file(self.filename, "the CSVLogger file", replaced=False)
        exists = self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self.keys: list[str] | None = self._columns() if exists else None
        self._left: set[str] = set()  # logs the appended file has no column for, warned of

    def _columns(self) -> list[str]:
        """The log columns of the CSVLogger file appended to, from its header (checked: rows
        under another file's header, or split by another separator, would lose the logs)."""
        try:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"CSVLogger cannot append to {self.filename!r}: its header cannot "
                             f"be read ({type(e).__name__}: {e})") from e
        if header[:1] != ["epoch"]:
            raise InputError(f"CSVLogger cannot append to {self.filename!r}: its first line "
                             f"{header} is not a CSVLogger header ('epoch', then the logs, "
                             f"separated by {self.separator!r}); append to a file that a "
                             "CSVLogger with this separator wrote, or pass append=False")
        return header[1:]

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        if not self.writing:
            return
        rows = []
        kept = None  # (the file's size that this write keeps, where it drops what follows)
        if self.mode is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.mode = "a" if self.append else "w"
            if self.keys is not None and getattr(self.model, "_resume_at", None) is not None:
                kept = self._kept_at_backup(epoch)
                if kept is None:
                    self._warn_of_repeats(epoch)
                elif kept == os.path.getsize(self.path):
                    kept = None  # (nothing written after the backup: appended to)
                elif not kept:  # (its header too was written after the backup)
                    self.keys = None
        logs = dict(logs or {})
        if self.keys is None:
            self.keys = sorted({*logs, *self._validation_columns()})
            rows = [["epoch", *self.keys], *self._restored_rows()]
        left = sorted(logs.keys() - {*self.keys, *self._left})
        if left:  # (once a log: the file's columns are its header's)
            self._left.update(left)
            warn(f"CSVLogger's file {self.filename!r} has no columns for the logs {left}, "
                 "which are not written: its columns are its header's (the first epoch's logs, "
                 "or those of the file appended to)")
        rows.append([epoch] + [logs.get(k, "NA") for k in self.keys])
        if self.mode == "w" and replaceable(self.path):
            # (a file written anew, a resumed run's too: the old one is kept until the header,
            # the restored rows and the first row are all written, and a failed write names it)
            with atomic_file(self.path) as f:
                text = io.StringIO(newline="")
                csv.writer(text, delimiter=self.separator).writerows(rows)
                f.write(text.getvalue().encode(locale.getpreferredencoding(False)))
        else:
            # (opened for each epoch's row and closed after it: a fit that raises, whose
            # on_train_end is not called, as in Keras, holds no handle on the file; one cut
            # back to its checkpoint's is cut in place, the user's file still (its mode, its
            # links, a `tail -f` on it): a stop after the cut leaves what the checkpoint
            # recorded, which the next resume appends to)
            if kept is not None:
                self._cut(kept, epoch)
            try:
                with open(self.path, self.mode, newline="") as f:
                    csv.writer(f, delimiter=self.separator).writerows(rows)
            except OSError as e:  # (a full disk: which file, not only "No space left")
                named = naming_the_file(e, self.path, kept=False)
                if named is e:
                    raise
                raise named from e
        self.mode = "a"

    def backup_record(self) -> dict[str, Any] | None:
        """What a checkpoint written now keeps of the file this logger appends to: its path,
        size and CRC-32 (an absent file's: 0 and 0), so that a run resumed from it drops the
        rows written after it (:meth:`_kept_at_backup`). None where there is nothing to keep:
        a new file (``append=False``: a resumed run writes it afresh), another rank's logger,
        one outside a fit, a file that is no regular file or cannot be read. A file whose
        stat (inode, size, times) is as at the last record is not read again: the backups
        inside an epoch, with no row written since, read nothing."""
        if not (self.append and self.writing):
            return None
        if self.mode is None and getattr(self.model, "_resume_at", None) is not None:
            # (a resumed run before its first row: the rows to drop are still there, so the
            # record goes on as the checkpoint resumed from had it, None where it had none)
            return self.backup
        path = os.path.abspath(self.path)
        if not os.path.exists(self.path):
            return {"path": path, "size": 0, "crc32": 0}
        if not os.path.isfile(self.path):  # (a pipe: nothing to read back, or cut)
            return None
        try:
            # (stat before the read: a write since, this logger's row or another's edit,
            # changes the size or the times, and the next backup reads the file again)
            st = os.stat(self.path)
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._hashed is None or self._hashed[0] != seen:
                size = crc = 0
                with open(self.path, "rb") as f:  # (by the MiB: a long log, no copy)
                    while chunk := f.read(2**20):
                        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
                self._hashed = seen, {"path": path, "size": size, "crc32": crc}
        except OSError:
            return None
        return self._hashed[1]

    def _cut(self, size: int, epoch: int) -> None:
        """Cut the file back to its first ``size`` bytes, in place; where it cannot be (an
        append-only file, EPERM), warn and append, as for a checkpoint without the record (the
        resumed fit goes on)."""
        try:
            os.truncate(self.path, size)
        except OSError as e:
            warn(f"CSVLogger cannot cut its file {self.filename!r} back to the rows the "
                 f"checkpoint recorded ({type(e).__name__}: {e.strerror or e}): it appends, and "
                 f"the epochs from {epoch} on may have two rows (the later row of an epoch is "
                 "this run's)")

    def _kept_at_backup(self, epoch: int) -> int | None:
        """The size of the file's first bytes, as the checkpoint resumed from recorded them
        (:attr:`backup`, set by :class:`BackupAndRestore`), where what follows them is what
        the run that stopped wrote after that backup: the row of ``epoch``, where this run
        goes on, if any (after its header where the file was empty then), of the file's
        columns. None where the file does not begin with what was recorded (edited, replaced),
        what follows is other rows (another run's), or there is no record (then the file is
        appended to, as it is)."""
        record = self.backup
        if record is None or not os.path.isfile(self.path):
            return None
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            kept, after = data[:record["size"]], data[record["size"]:]
            if len(kept) != record["size"] or zlib.crc32(kept) != record["crc32"]:
                return None
            text = after.decode(locale.getpreferredencoding(False))
            rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=self.separator))
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        if not kept and rows[:1] and rows[0][:1] == ["epoch"]:
            rows.pop(0)  # (the header, which the stopped run wrote after its backup)
        # (one row at most, of the epoch this run goes on from: a backup follows each epoch's
        # row, so a run that stopped left no more; more are another run's, such as the rest of
        # a finished run whose earlier checkpoint is resumed)
        if len(rows) > 1 or any(row[:1] != [str(epoch)] or len(row) != 1 + len(self.keys or ())
                                for row in rows):
            return None
        return len(kept)

    def _warn_of_repeats(self, epoch: int) -> None:
        """Warn where the appended file's last row is of ``epoch`` or later: a resumed run's
        rows of those epochs come again (the stopped run wrote them after its last backup; an
        earlier run's rows, which the file cannot tell from them, are never dropped)."""
        try:
            with open(self.path, newline="") as f:
                last = collections.deque(csv.reader(f, delimiter=self.separator), maxlen=1)
            repeated = bool(last) and int(last[0][0]) >= epoch
        except (OSError, UnicodeDecodeError, csv.Error, ValueError, IndexError):
            return  # (a row that is no epoch's: nothing to say)
        if repeated:
            warn(f"CSVLogger's file {self.filename!r} ends with a row of epoch "
                 f"{int(last[0][0])}, and this resumed run appends rows from epoch {epoch}: "
                 "those epochs may have two rows (the run that stopped wrote them after its "
                 "last backup); the later row of an epoch is this run's")

    def _restored_rows(self) -> list[list[Any]]:
        """The rows of the epochs a resumed run's History holds already (restored from its
        checkpoint: the model's History gets this fit's epochs after this callback), so that
        a new file holds what an uninterrupted run's holds; none in a run that did not
        resume."""
        done = getattr(self.model, "history", None)
        if not isinstance(done, history.EpochRecord):  # (a callback driven by hand)
            return []
        logged = {k: dict(zip(done.epochs_of(k) or (), done.history[k], strict=False))
                  for k in self.keys if k in done.history}
        return [[epoch] + [logged.get(k, {}).get(epoch, "NA") for k in self.keys]
                for epoch in done.epoch]

    def _validation_columns(self) -> list[str]:
        """The ``val_*`` logs of a fit that validates, whether or not its first epoch did."""
        return _validation_names(self.model) if self.params.get("validation") else []

    def on_train_end(self, logs: Mapping[str, float] | None = None) -> None:
        self.writing = False


class TerminateOnNaN(Callback):
    """End training cleanly, instead of raising :class:`NonFiniteError`, when a step's loss or
    gradient is not finite: ``fit`` returns the History of the epochs done, and the weights and
    optimiser state are those before the first non-finite step (found when the device's flag is
    next read, not by a wait for the device every step). On several ranks every rank stops at
    that step, and rank 0 prints the error of the rank whose slice of the batch made it (its
    layer, as in one process), named (:mod:`xpcnn.distributed`)."""

    def on_non_finite(self, error: NonFiniteError) -> None:
        say_on_root(f"TerminateOnNaN: {error}")
        self.model.stop_training = True
