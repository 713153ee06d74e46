"""Checkpoints: all the state a training run needs to continue exactly where it stopped.

``model.fit(x, y, ..., checkpoint="run.ckpt.npz")`` writes one at the end of every epoch (and
every ``checkpoint_every`` steps when that is an int); ``fit(..., checkpoint=PATH, resume=True)``
run again after an interruption (a crash, a kill, a pre-empted machine) continues from it, and ends
with the same weights, bit for bit, and the same history as a run that was never interrupted. The
same command line can be rerun as it is: without the file, ``resume=True`` starts afresh.

A checkpoint is an ``.npz`` of plain arrays, read without pickle
(:class:`~xpcnn.saving.npz.NpzArchive`), so loading one never runs code. It holds:

* the weights, as a model file does (``layer{i}.{j}``), so :func:`xpcnn.load_model` reads it too;
* the optimiser's slots (``slot.{name}.{k}``: momentum, Adam moments), one per trainable
  parameter, in the weights' (Keras') layout, as the next step will use them (none where a layer
  was frozen or unfrozen since the last step: that step starts them afresh);
* a JSON entry with everything else: the architecture (which layers are frozen too: restored,
  since a callback may freeze some mid-run) and compile settings (optimiser, schedule and
  loss configuration), the optimiser's step count (which drives the schedule and Adam's bias
  correction), the loss-scaling state, each random layer's ``seed`` and ``calls`` counter, the
  position (epoch, and batches done in it: the shuffling order is a function of the seed and the
  epoch's number, which the fit's ``epoch_offset`` continues from earlier fits), the running
  sums of the epoch in progress, the history of the epochs done, a fingerprint of the
  training data and ``fit`` arguments, which a resumed run must match, whether a callback
  stopped the run (``stopped``: resumed, it trains no more), and the state of the run's
  callbacks that keep one (``callbacks``: class name and ``get_state()`` of each, in order; the
  lists of NumPy arrays in a state, such as ``EarlyStopping``'s best weights, are the entries
  ``callback.{i}.{name}.{k}``, and its NumPy scalars of numbers, kept of their dtype, the 0-d
  entries ``callback.{i}.0scalar.{n}``); where the run has a CSVLogger that appends, its
  file's path, size and CRC-32 (``csv_logs``, a key of its own), so that a resumed run drops
  the rows written after the checkpoint (a file without it: appended to, as it is).

Files are written atomically (temporary file, fsync, rename), so the path always holds the last
complete checkpoint, whatever moment the process dies. Before writing, every weight and slot is
checked to be finite: a run that diverges stops with :class:`~xpcnn.errors.NonFiniteError` and
leaves the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import checks, ctrl_c, distributed
from ..backend import PRECISIONS, DeviceLike
from ..errors import DataFormatError, InputError, NonFiniteError, TrainingInterrupted, warn
from ..files import written_file
from ..history import EpochRecord
from ..layers.base import RandomLayer, setting_names
from .model_file import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSIONS,
    bad_values,
    build_for_file,
    check_checkpoint_version,
    check_file_entries,
    check_layers,
    compile_settings,
    config_entry,
    loss_scale_problem,
    model_config,
    model_from_file,
    normal,
    set_weights_from_file,
    weight_arrays,
)
from .npz import CONFIG_KEY, NpzArchive, array_bytes, encode_json, write_npz_atomic


@dataclass
class Progress:
    """Where a run stands: ``step`` batches of epoch ``epoch`` (0-based) are done.

    ``loss_sum``, ``correct`` and ``seen`` are the running sums of that epoch's metrics and
    ``seconds`` the time spent in it so far, so a resumed epoch reports the same loss and
    accuracy as an uninterrupted one; ``top_k``, the top-k metrics' counts (one a distinct
    k, in compile's order; none for zeros, and in files written before there were any).
    """

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    top_k: list[float] = field(default_factory=list)

    def entry(self) -> dict[str, Any]:
        """As a checkpoint holds it: ``top_k`` only where there are some (files of runs
        without top-k metrics stay as they were)."""
        return {k: v for k, v in vars(self).items() if k != "top_k" or v}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model with all its training state, and the run's position."""

    model: Any
    progress: Progress
    history: EpochRecord
    run: dict[str, Any] = field(default_factory=dict)  # data fingerprint and fit arguments
    path: str = ""

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def step(self) -> int:
        return self.progress.step


# -- writing ----------------------------------------------------------------------------------


def save_checkpoint(model: Any, path: str | os.PathLike[str],
                    progress: Progress | None = None, history: EpochRecord | None = None,
                    run: dict[str, Any] | None = None,
                    callbacks: list[tuple[str, dict[str, Any] | None]] | None = None,
                    stopped: bool = False, replace: bool = True,
                    csv_logs: list[dict[str, Any]] | None = None) -> bool:
    """Write ``model``'s whole training state to ``path``, atomically; ``callbacks``, the
    class name and state of each callback that keeps one (:func:`callback_states`), and
    ``stopped``, whether a callback ended the run, where ``fit`` writes it; ``csv_logs``, the
    files that the run's CSVLoggers append to as they are now
    (:meth:`~xpcnn.callbacks.CSVLogger.backup_record`). ``replace=False``
    leaves a file already at ``path`` as it is; returns whether it wrote. On several ranks,
    rank 0 writes; another rank that calls it too returns once rank 0 has (or raises where
    it failed), and rank 0 alone may call it (see :func:`xpcnn.distributed.write_on_root`).

    Raises :class:`NonFiniteError`, and leaves ``path`` untouched, when a weight or an optimiser
    slot holds NaN or infinity.
    """
    path = checks.file_path(path, "the checkpoint")
    model._require_built("save_checkpoint")
    # one writer, rank 0 (all ranks hold the same state); the others calling wait for it
    return distributed.write_on_root(lambda: _write_checkpoint(
        model, path, progress, history, run, callbacks, stopped, replace, csv_logs), path)


def _write_checkpoint(model: Any, path: str, progress: Progress | None,
                      history: EpochRecord | None, run: dict[str, Any] | None,
                      callbacks: list[tuple[str, dict[str, Any] | None]] | None,
                      stopped: bool, replace: bool,
                      csv_logs: list[dict[str, Any]] | None = None) -> bool:
    target = written_file(checks.output_file(path, "the checkpoint"))
    if not replace and os.path.lexists(target):
        return False
    if model.loss is None or model.optimizer is None:
        raise InputError("save_checkpoint needs a compiled model (compile(...) first)")
    opt = model.optimizer
    progress = progress or Progress()
    history = history or EpochRecord()
    # The slots as the next step sees them: none where a layer was frozen or unfrozen since the
    # last step (that step starts them afresh; until then they are the other layers').
    slots = {} if model._slots_outdated() else opt.slots
    config = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSIONS[-1],
        "model": model_config(model),
        # (the epochs' shuffling numbers: the fit's offset, and the numbers used so far)
        "epoch_offset": int(model._epoch_offset), "epochs_begun": int(model._epochs_begun),
        "optimizer": {"iterations": int(opt.iterations), "lr_factor": float(opt.lr_factor),
                      # (the updates its slots have had, where it counts them: Adam's t)
                      "applied": int(model.backend.to_numpy(opt.applied))
                      if slots and opt.applied is not None else 0,
                      "slots": {k: len(v) for k, v in slots.items()}},
        "loss_scale": float(model.loss_scale), "good_steps": int(model._good_steps),
        "random_layers": [{"index": i, "seed": int(la.seed), "calls": int(la.calls)}
                          for i, la in enumerate(model.layers) if isinstance(la, RandomLayer)],
        "progress": progress.entry(),
        "history": {"epoch": list(history.epoch), "history": history.history,
                    "sparse": history.sparse},
        "run": run or {},
        "stopped": bool(stopped),
    }
    states, state_arrays = states_entry(callbacks or [])
    if callbacks is not None:
        config["callbacks"] = states
    if csv_logs:  # (a key of its own: the callback states, matched by place, stay as they were)
        config["csv_logs"] = csv_logs
    # Each weight and slot is checked on the host copy that is written (one transfer each).
    stopped = f"training stopped after step {opt.iterations}"
    kept = f"the checkpoint {path} was not overwritten"

    def refusal(layer: Any, weight: str) -> str:
        return (f"{stopped}: the weights of layer {layer.name!r} ({weight}) hold NaN or "
                f"infinity; {kept} and still holds the last good state")

    arrays = {CONFIG_KEY: config_entry(config, f"the checkpoint {path} was not written"),
              **weight_arrays(model, refusal), **state_arrays}
    owners = _slot_owners(model)
    for name, slot in slots.items():
        for k, (a, (layer, weight)) in enumerate(zip(slot, owners, strict=True)):
            host = layer.to_keras_layout(weight, model.backend.to_numpy(a))
            if not np.all(np.isfinite(host)):
                raise NonFiniteError(f"{stopped}: the optimiser's {name!r} state holds NaN or "
                                     f"infinity; {kept}")
            arrays[f"slot.{name}.{k}"] = host
    write_npz_atomic(target, arrays)
    return True


def callback_states(callbacks: list[Any], unknown: Collection[Any] = ()
                    ) -> list[tuple[str, dict[str, Any] | None]]:
    """(class name, ``get_state()``) of each of ``callbacks`` (those that keep a state, in
    order), for :func:`save_checkpoint`; None for those in ``unknown``, whose state at this
    point is not known yet (a file that holds such a None is not resumed)."""
    return [(type(cb).__name__, None if cb in unknown else cb.get_state()) for cb in callbacks]


#: The NumPy dtype kinds that a checkpoint's arrays hold (:class:`NpzArchive` reads those
#: only): bool, signed and unsigned integers, floats.
_ARRAY_KINDS = "biuf"


def _storable(a: np.ndarray) -> bool:
    return a.dtype.kind in _ARRAY_KINDS and not a.dtype.hasobject and a.dtype.fields is None


def states_entry(states: list[tuple[str, dict[str, Any] | None]]
                  ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The JSON entry of callback ``states`` and their arrays: a value that is a list of NumPy
    arrays goes to the entries ``callback.{i}.{name}.{k}``, its length to ``arrays``; a NumPy
    scalar or 0-d array of numbers, anywhere in a state, to the 0-d entry
    ``callback.{i}.0scalar.{n}`` (a name no key's arrays take, a key being an identifier;
    so that it comes back of its dtype, as it was: a
    float32 goes on in float32, bit for bit), its place and kind to ``scalars`` (the JSON
    value there is the Python number it holds, as files before kept it)."""
    entry, arrays = [], {}
    for i, (name, state) in enumerate(states):
        plain, counts, scalars = {}, {}, []
        for key, value in (state or {}).items():
            if not isinstance(key, str):
                raise InputError(f"the state of callback {name} (its get_state()) cannot be "
                                 f"written to the checkpoint: its key {key!r} is not a string")
            if isinstance(value, list | tuple) and value and all(
                    isinstance(a, np.ndarray) for a in value):
                if not key.isidentifier():  # (part of the entries' names)
                    raise InputError(f"the state of callback {name} holds arrays under "
                                     f"{key!r}: name them with letters, digits and '_'")
                bad = next((a for a in value if not _storable(a)), None)
                if bad is not None:  # (written, the file would not load: refused now)
                    raise InputError(f"the state of callback {name} (its get_state()) cannot "
                                     f"be written to the checkpoint: {key!r} holds an array of "
                                     f"dtype {bad.dtype}, and a checkpoint holds arrays of "
                                     "booleans, integers and real floats only")
                counts[key] = len(value)
                arrays.update({f"callback.{i}.{key}.{k}": a for k, a in enumerate(value)})
            else:
                found: list[tuple[list[Any], Any]] = []
                plain[key] = _json_value(value, name, key, [key], found)
                for path, scalar in found:
                    arrays[f"callback.{i}.0scalar.{len(scalars)}"] = np.asarray(scalar)
                    scalars.append([path, "array" if isinstance(scalar, np.ndarray)
                                    else "scalar"])
        entry.append({"class": name, "state": None if state is None else plain,
                      "arrays": counts, **({"scalars": scalars} if scalars else {})})
    return entry, arrays


def _json_value(value: Any, name: str, key: str, path: list[Any],
                found: list[tuple[list[Any], Any]]) -> Any:
    """``value``, the state of callback ``name`` under ``key`` (at ``path`` in it), as JSON: a
    NumPy scalar or 0-d array of numbers (``np.argmin(...)``, a float32 loss) as the Python
    number it holds, added to ``found`` with its path (its entry gives it back as it was), in
    lists and dicts too; InputError, naming the callback and the key, for what JSON cannot
    hold (was: a JSON error blaming the layers' settings, after an epoch), another NumPy
    scalar among them (a datetime64, a complex number: neither JSON nor a checkpoint's
    arrays hold it, and .item() would turn a datetime64 of nanoseconds into an int)."""
    if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
        if _storable(np.asarray(value)):
            found.append((path, value))
            # (the JSON number stands in, the entry keeps the value; a longdouble's item() is
            # a longdouble, which JSON refused, blaming the layers' settings)
            kind = np.asarray(value).dtype.kind
            return bool(value) if kind == "b" else float(value) if kind == "f" else int(value)
        if np.asarray(value).dtype.kind != "U":  # (a NumPy string: the str it is)
            dtype = np.asarray(value).dtype
            kind = "bytes" if dtype.kind == "S" else dtype  # (|S2 says little)
            raise InputError(
                f"the state of callback {name} (its get_state()) cannot be written to the "
                f"checkpoint: {key!r} holds a NumPy {kind} value {value!r:.80}, which neither "
                "JSON nor a checkpoint's arrays hold (booleans, integers and real floats "
                "only): keep it as a number or a string (str(value), or its real and "
                "imaginary parts), and make it again in set_state")
        value = value.item()
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):  # (JSON would make a string of it, or fail)
                raise InputError(f"the state of callback {name} (its get_state()) cannot be "
                                 f"written to the checkpoint: {key!r} holds a dict whose key "
                                 f"{k!r} is not a string")
        return {k: _json_value(v, name, key, [*path, k], found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v, name, key, [*path, k], found) for k, v in enumerate(value)]
    try:
        encode_json(value)
    except (TypeError, ValueError) as e:
        array = isinstance(value, np.ndarray)
        raise InputError(
            f"the state of callback {name} (its get_state()) cannot be written to the "
            f"checkpoint: {key!r} holds {'an array' if array else type(value).__name__} "
            f"{value!r:.80}, which JSON cannot hold ({e}); a state holds numbers, strings, None, "
            "lists and dicts of them, and lists of NumPy arrays"
            + (f" (return [{key}_array], a list, or .tolist())" if array else "")) from e
    return value


def _slot_owners(model: Any) -> list[tuple[Any, str]]:
    """(layer, weight name) of each optimiser slot, in slot order: the parameters of the
    layers the model trains (``trainable_layers``), in the optimiser's order."""
    return [(la, k) for la in model.trainable_layers for k in la.params]


# -- reading ----------------------------------------------------------------------------------


def checkpoint_config(npz: NpzArchive) -> dict[str, Any]:
    """The config of the checkpoint open in ``npz``, checked to be an xpcnn checkpoint of a
    version this one reads (DataFormatError, naming the file, where not)."""
    config = npz.read_config()
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        kind = config.get("format") if isinstance(config, dict) else None
        hint = " (a model file: load it with xpcnn.load_model)" if kind == "xpcnn-model" else ""
        raise DataFormatError(f"{npz.path}: not an xpcnn checkpoint{hint}")
    check_checkpoint_version(config, npz.path)
    return config


def load_checkpoint(path: str | os.PathLike[str], device: DeviceLike = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint on ``device``, with every bit of its training state.

    ``ckpt.model`` is compiled, holds the weights, optimiser slots and step count, loss scale and
    random-layer counters; ``ckpt.progress`` says where the run stood and ``ckpt.history`` holds
    its finished epochs. A corrupt, truncated or foreign file raises ``DataFormatError``.
    """
    with NpzArchive(path, "the checkpoint") as npz:
        config = checkpoint_config(npz)
        model = model_from_file(config.get("model"), npz, device, with_slots=True)
        if model.optimizer is None:
            raise DataFormatError(f"{npz.path}: the checkpoint's model has no compile settings")
        return _restore(model, config, npz)


def restore_checkpoint(model: Any, path: str | os.PathLike[str]) -> Checkpoint:
    """Put the training state of the checkpoint at ``path`` into ``model`` (which of its
    layers are frozen too).

    ``model`` must be compiled and have the checkpoint's architecture and compile settings
    (optimiser, schedule, loss, precision); otherwise ``InputError`` says what differs, and a
    model that was not built is left unbuilt.
    """
    with NpzArchive(path, "the checkpoint") as npz, model._unbuilt_if_refused():
        config = checkpoint_config(npz)
        _check_architecture(model, config, npz)
        _check_compile(model, config, npz.path)
        return _restore(model, config, npz)


def _check_architecture(model: Any, config: dict[str, Any], npz: NpzArchive) -> None:
    """Refuse a checkpoint of another architecture than ``model``'s, which must be of the very
    model to resume (input shape, dtype and layers; ``load_weights`` compares weight shapes
    alone), or an uncompiled ``model``; ``model`` built for the file's input shape if it was
    not built yet: the caller undoes that."""
    path = npz.path
    if model.loss is None or model.optimizer is None:
        raise InputError("restoring a checkpoint needs a compiled model (compile(...) first)")
    mconf = config.get("model")
    if not isinstance(mconf, dict):
        raise DataFormatError(f"{path}: the checkpoint has no model configuration")
    check_file_entries(npz, mconf, checkpoint=True)
    build_for_file(model, mconf, npz)
    mine = normal(model_config(model, compiled=False, checked=False))
    try:
        shape, dtype = mconf["input_shape"], mconf["dtype"]
    except (KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    if shape != mine["input_shape"]:
        raise DataFormatError(f"{path} holds a model for inputs of shape {tuple(shape)}; this "
                              f"model takes {tuple(mine['input_shape'])}")
    if dtype != mine["dtype"]:
        raise DataFormatError(f"{path} holds a {dtype} model; this model is {mine['dtype']}")
    check_layers(model, mconf, path)


def _check_compile(model: Any, config: dict[str, Any], path: str,
                   take_precision: bool = False) -> str | None:
    """Refuse a checkpoint of other compile settings (its architecture checked already). With
    ``take_precision`` (fit's resume), one that differs in precision alone is not refused: its
    precision is returned, for the caller to compile the model in (None: the same)."""
    mconf = config["model"]
    mine = normal(model_config(model, checked=False).get("compile"))
    theirs = compile_settings(mconf.get("compile"))
    if isinstance(theirs, dict) and theirs.get("precision") == "float32" and \
            model.dtype_name == "float64":  # (an older file's name for a float64 model's)
        theirs = {**theirs, "precision": "float64"}
    if _acc_logged_as_accuracy(model, theirs):
        theirs = {**theirs, "metrics": ["acc"]}
    if mine != theirs and take_precision and isinstance(theirs, dict) and \
            isinstance(mine, dict) and isinstance(theirs.get("precision"), str) and \
            theirs["precision"] in PRECISIONS and \
            {**theirs, "precision": mine.get("precision")} == mine:
        return str(theirs["precision"])
    if mine != theirs:
        diff = "; ".join(f"{k} is {a!r} there and {b!r} here"
                         for k, a, b in _differences(theirs, mine)[:4])
        raise InputError(f"{path} was written by a model compiled otherwise ({diff}): "
                         f"{_ADVICE.get().compile} to resume (a schedule spans the whole run: "
                         "its length counts the steps of all its epochs)")
    return None


@dataclass(frozen=True)
class ResumeAdvice:
    """What a refused resume tells its caller to keep the same (``run``: the data and fit's
    arguments; ``compile``: the compile settings) and how to start afresh instead: a Python
    caller's by default; the command line names its flags (:func:`resume_advised`)."""

    run: str = "the same data, batch_size, seed, shuffle and class_weight"
    compile: str = "compile it the same way"
    fresh: str = "resume=False"
    #: fit's resume of a file of another precision alone resumes in it (a callback compiled
    #: the run so); the command line has no such callback: there the flag changed, refused
    takes_precision: bool = True


#: A Python caller's.
PYTHON_ADVICE = ResumeAdvice()
_ADVICE = contextvars.ContextVar("xpcnn_resume_advice", default=PYTHON_ADVICE)


@contextlib.contextmanager
def resume_advised(advice: ResumeAdvice) -> Iterator[None]:
    """Within it, a refused resume gives ``advice`` (the command line's flags)."""
    token = _ADVICE.set(advice)
    try:
        yield
    finally:
        _ADVICE.reset(token)


def _acc_logged_as_accuracy(model: Any, theirs: Any) -> bool:
    """Whether the file may be one that xpcnn wrote before it logged ``metrics=["acc"]`` under
    that name (it logged and saved "accuracy" then), for a model compiled with it: the same run,
    to resume (its history's keys renamed)."""
    return list(model.metrics) == ["acc"] and isinstance(theirs, dict) and theirs.get(
        "metrics") == ["accuracy"]


def _differences(a: Any, b: Any, where: str = "compile") -> list[tuple[str, Any, Any]]:
    """Dotted paths at which two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [(where, a, b)]


def _slots_as_stored(config: dict[str, Any], ostate: dict[str, Any],
                     owners: list[tuple[Any, str]], found: dict[str, list[np.ndarray | None]],
                     path: str) -> bool:
    """Whether a checkpoint's optimizer slots are in the layout the layers store their weights
    in now, not in Keras' (the weights' in every file). Version 2 files: Keras'. Version 1
    files hold them as the layers stored them when written: those with an lr_factor (written
    after Conv2D's kernel became (filters, kh, kw, channels)), as now; the others, from before
    that change or the two commits after it, record no layout (their kernels are in Keras'
    layout either way), so the slots' shapes decide, one layout for the whole file; a file
    whose every such slot has one shape in both layouts is refused, naming them."""
    if config.get("version") != 1:
        return False
    if "lr_factor" in ostate:
        return True
    votes, ambiguous = set(), []
    for name, arrays in found.items():
        for k, ((layer, weight), a) in enumerate(zip(owners, arrays, strict=True)):
            stored = tuple(int(d) for d in layer.params[weight].shape)
            keras = tuple(layer.keras_shape(weight))
            if stored != keras:
                if a is not None and tuple(a.shape) in (stored, keras):
                    votes.add(tuple(a.shape) == stored)
                continue
            probe = np.arange(math.prod(stored)).reshape(stored)
            if not np.array_equal(layer.to_keras_layout(weight, probe), probe):
                ambiguous.append(f"slot.{name}.{k} (the {weight} of layer {layer.name!r}, "
                                 f"shape {stored})")
    if len(votes) > 1:
        raise DataFormatError(f"{path}: invalid checkpoint: its version-1 optimizer slots are "
                              "in two layouts (some as the layers store their weights, some "
                              "in Keras' layout); one writer wrote them all in one")
    if votes:
        return votes.pop()
    if ambiguous:
        raise DataFormatError(
            f"{path}: this version-1 checkpoint (no lr_factor) records no layout for its "
            f"optimizer slots, and {', '.join(ambiguous)} has the same shape in both layouts "
            "it may hold (Keras' (kh, kw, channels, filters), or the (filters, kh, kw, "
            "channels) that Conv2D stored its kernel in from then on), with no other slot to "
            "tell which: its run cannot be resumed exactly. Load its weights alone "
            "(xpcnn.load_model or model.load_weights) and train on with a fresh optimizer")
    return False


def _restore(model: Any, config: dict[str, Any], npz: NpzArchive) -> Checkpoint:
    """Check every field of a checkpoint, then put it into ``model`` (all or nothing)."""
    path = npz.path
    # Every check first, so that a bad file leaves the model as it was (in this order: the
    # error a file with several faults gets).
    ostate = config.get("optimizer")
    if not isinstance(ostate, dict):
        raise _invalid(path, "no optimizer state")
    iterations, applied, lr_factor = _optimizer_counts(ostate, path)
    # Which layers the run trained then (a callback may freeze or unfreeze some mid-run): they
    # come back first, with the slots, which are theirs, so that the run goes on as it would
    # have; put back with the settings where the file is refused.
    undo = _take_flags(model, config["model"])
    try:
        slots = _read_slots(model, config, ostate, npz, _slot_owners(model))
        loss_scale, good_steps = _loss_scale(model, config, path)
        counters = _random_counters(model, config, path)
        progress = read_progress(config.get("progress"), path)
        offset = _int(config.get("epoch_offset", 0), "epoch_offset", path)  # (0: older files')
        # (older files: the epochs up to the one in progress, begun where it is inside one)
        begun = _int(config.get("epochs_begun", offset + progress.epoch + (progress.step > 0)),
                     "epochs_begun", path)
        history = _history(config.get("history"), path)
        if _acc_logged_as_accuracy(model, compile_settings(config["model"].get("compile"))):
            _rename_accuracy(history)
        run = config.get("run")
        if not isinstance(run, dict):
            raise _invalid(path, "no run description")
        # The settings a callback may have changed mid-run (Dropout's rate...), which the
        # check of the architecture left out: the file's, as the run had them when written.
        undo += _take_settings(model, config["model"]["layers"], path)
        set_weights_from_file(model, npz)  # checks shapes before replacing anything
    except BaseException:
        _put_back(undo)
        raise
    finally:
        model._trained_at = None  # (listed again: Layer.rebuilds misses the model's own flag)
    model._restore_training_state(
        iterations=iterations, lr_factor=lr_factor, slots=slots, applied=applied,
        loss_scale=loss_scale, good_steps=good_steps, epoch_offset=offset,
        epochs_begun=begun)
    for i, (seed, calls) in counters.items():
        model.layers[i].set_random_state(seed, calls)  # type: ignore[attr-defined]
    return Checkpoint(model, progress, history, run, path)


def _invalid(path: str, what: str) -> DataFormatError:
    return DataFormatError(f"{path}: invalid checkpoint: {what}")


def _optimizer_counts(ostate: dict[str, Any], path: str) -> tuple[int, int, float]:
    """The optimiser's step count, its updates applied (Adam's t) and its rate factor, of a
    checkpoint's ``optimizer`` entry ``ostate``, checked."""
    iterations = _int(ostate.get("iterations"), "optimizer iterations", path)
    if "applied" in ostate:
        applied = _int(ostate["applied"], "optimizer applied", path)
    else:  # (older files: the steps since the slots were made, skipped ones included)
        applied = iterations - _int(ostate.get("slots_from", 0), "optimizer slots_from", path)
    if not 0 <= applied <= iterations:
        raise _invalid(path, f"optimizer applied {applied}, expected 0 to its iterations "
                             f"{iterations}")
    return iterations, applied, _float(ostate.get("lr_factor", 1.0), "optimizer lr_factor", path)


def _read_slots(model: Any, config: dict[str, Any], ostate: dict[str, Any], npz: NpzArchive,
                owners: list[tuple[Any, str]]) -> dict[str, list[np.ndarray]]:
    """The optimiser slots of the checkpoint open in ``npz`` (``ostate``, its ``optimizer``
    entry), one per parameter of ``owners`` (:func:`_slot_owners`), checked and in the
    layout the layers store their weights in (none where the file holds none)."""
    path = npz.path
    slot_counts = ostate.get("slots")
    if not isinstance(slot_counts, dict):
        raise _invalid(path, "no optimizer slots")
    names = model.optimizer.slot_names
    found: dict[str, list[np.ndarray | None]] = {}
    if slot_counts:
        if set(slot_counts) != set(names):
            raise _invalid(path, f"optimizer slots {sorted(slot_counts)}, expected {list(names)}")
        for name in names:
            if type(slot_counts[name]) is not int or slot_counts[name] != len(owners):
                raise _invalid(path, f"optimizer slots {name!r} is {slot_counts[name]!r}, "
                                     f"expected {len(owners)}, one for each trainable parameter")
            found[name] = []
            for k, (layer, weight) in enumerate(owners):
                key = f"slot.{name}.{k}"  # (read first: a version-1 file's shapes say its layout)
                size = array_bytes(math.prod(layer.params[weight].shape))
                found[name].append(npz.read(key, size) if key in npz.entries else None)
    stored_layout = _slots_as_stored(config, ostate, owners, found, path)
    slots: dict[str, list[np.ndarray]] = {}
    for name, arrays in found.items():
        slots[name] = []
        for k, ((layer, weight), a) in enumerate(zip(owners, arrays, strict=True)):
            key = f"slot.{name}.{k}"
            shape = tuple(layer.params[weight].shape) if stored_layout \
                else layer.keras_shape(weight)
            if a is None or tuple(a.shape) != shape or a.dtype.kind != "f":
                raise _invalid(path, f"optimizer slot {name}.{k} is missing or not a float "
                                     f"array of shape {shape}")
            wrong = bad_values(a, model.dtype_name)  # (the dtype the slots are held in)
            if wrong:
                raise _invalid(path, f"array {key!r} (the optimizer's {name!r} state) {wrong}")
            slots[name].append(a if stored_layout else layer.from_keras_layout(weight, a))
    return slots


def _loss_scale(model: Any, config: dict[str, Any], path: str) -> tuple[float, int]:
    """The float16 loss scale of a checkpoint's config and its count of good steps, checked."""
    loss_scale = config.get("loss_scale")
    problem = loss_scale_problem(loss_scale)
    if problem:
        raise _invalid(path, f"loss_scale {loss_scale!r}, {problem}")
    if model.precision != "mixed_float16" and loss_scale != 1:  # (checked before any restore)
        raise _invalid(path, f"loss_scale {loss_scale!r} in a checkpoint of a model without "
                             "float16 loss scaling (its precision is not mixed_float16): "
                             "expected 1")
    return float(loss_scale), _int(config.get("good_steps"), "good_steps", path)


def _random_counters(model: Any, config: dict[str, Any], path: str
                     ) -> dict[int, tuple[int, int]]:
    """(seed, calls) of each random layer of ``model``, by its index, from a checkpoint's
    config, checked: one for each, none for another layer."""
    randoms = config.get("random_layers")
    if not isinstance(randoms, list):
        raise _invalid(path, "no random_layers list")
    counters = {}
    for r in randoms:
        if not isinstance(r, dict):
            raise _invalid(path, "random layer entry")
        i = _int(r.get("index"), "random layer index", path)
        if i >= len(model.layers) or not isinstance(model.layers[i], RandomLayer):
            raise _invalid(path, f"layer {i} is not a random layer")
        counters[i] = (_int(r.get("seed"), f"random layer {i}'s seed", path),
                       _int(r.get("calls"), f"random layer {i}'s calls", path))
        if max(counters[i]) >= 2**63:  # (held in an int64 device array)
            raise _invalid(path, f"random state of layer {i} beyond 2**63")
    missing = [la.name for i, la in enumerate(model.layers)
               if isinstance(la, RandomLayer) and i not in counters]
    if missing:
        raise _invalid(path, f"no random state for layers {missing}")
    return counters


def _rename_accuracy(history: EpochRecord) -> None:
    """A file's history logged under "accuracy" for ``metrics=["acc"]``
    (:func:`_acc_logged_as_accuracy`), under the names the model logs now."""
    for old, new in (("accuracy", "acc"), ("val_accuracy", "val_acc")):
        if old in history.history:
            history.history[new] = history.history.pop(old)
        if old in history.sparse:
            history.sparse[new] = history.sparse.pop(old)


def _take_settings(model: Any, specs: list[Any], path: str) -> list[tuple[Any, str, Any]]:
    """Give each layer of ``model`` the values that the file's layer ``specs`` hold for its
    :func:`~xpcnn.layers.base.setting_names` (each checked as an assignment checks it);
    returns what :func:`_put_back` undoes. A value refused: every one put back, and a
    ``DataFormatError``."""
    undo: list[tuple[Any, str, Any]] = []
    for i, (layer, spec) in enumerate(zip(model.layers, specs, strict=False)):
        settings = spec.get("config") if isinstance(spec, dict) else None
        for name in setting_names(type(layer)) if isinstance(settings, dict) else ():
            if name not in settings:
                continue
            old, value = getattr(layer, name), settings[name]
            if type(old) is type(value) and old == value:
                continue
            try:
                setattr(layer, name, value)
            except InputError as e:
                _put_back(undo)
                raise DataFormatError(f"{path}: invalid checkpoint: layer {i} "
                                      f"({type(layer).__name__}) has {name} {value!r}: {e}"
                                      ) from e
            undo.append((layer, name, old))
    return undo


def _take_flags(model: Any, mconf: dict[str, Any]) -> list[tuple[Any, str, Any]]:
    """Give ``model`` and its layers the ``trainable`` flags of the file's model ``mconf``
    (checked with its configuration: bools, where written); returns what :func:`_put_back`
    undoes."""
    undo: list[tuple[Any, str, Any]] = [(model, "_trainable", model._trainable)]
    model._trainable = mconf.get("trainable", True)
    for layer, spec in zip(model.layers, mconf["layers"], strict=True):
        undo.append((layer, "trainable", layer.trainable))
        layer.trainable = spec.get("trainable", True)
    return undo


def _put_back(undo: list[tuple[Any, str, Any]]) -> None:
    for layer, name, old in reversed(undo):
        setattr(layer, name, old)


def _int(v: Any, what: str, path: str) -> int:
    if type(v) is not int or v < 0:
        raise DataFormatError(f"{path}: invalid checkpoint: {what} is {v!r}, expected an int "
                              ">= 0")
    return v


def _float(v: Any, what: str, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise DataFormatError(f"{path}: invalid checkpoint: {what} is {v!r}, expected a finite "
                              "number >= 0")
    return float(v)


def read_progress(p: Any, path: str) -> Progress:
    """The :class:`Progress` of a checkpoint's ``progress`` entry ``p`` (the config's), checked
    (DataFormatError naming ``path`` where it is malformed)."""
    if not isinstance(p, dict):
        raise DataFormatError(f"{path}: invalid checkpoint: no progress entry")
    top_k = p.get("top_k", [])
    if not isinstance(top_k, list):
        raise DataFormatError(f"{path}: invalid checkpoint: progress top_k is {top_k!r}, "
                              "expected a list of counts")
    return Progress(epoch=_int(p.get("epoch"), "epoch", path),
                    step=_int(p.get("step"), "step", path),
                    **{k: _float(p.get(k), k, path)
                       for k in ("loss_sum", "correct", "seen", "seconds")},
                    top_k=[_float(v, "a top_k count", path) for v in top_k])


def progress_within(model: Any, epoch: int, step: int) -> Progress:
    """Where ``epoch`` stands after its batch ``step``, with its running sums (read from the
    device), so that a run resumed from it continues there."""
    loss_sum, correct, seen, t0, top_k = model._epoch_sums()
    return Progress(epoch, step, loss_sum, correct, seen, time.perf_counter() - t0, top_k)


class _compiled_in:
    """Compile ``model`` in ``precision``, its loss, optimiser (slots and step count kept),
    metrics and CUDA graphs setting as they are, as a callback's
    ``compile(optimizer=model.optimizer, precision=...)`` does; called, puts back the
    precision it had (``was``) and its loss scale."""

    def __init__(self, model: Any, precision: str) -> None:
        self.model, self.was, self.scaling = model, model.precision, model._scaling
        self._compile(precision)

    def _compile(self, precision: str) -> None:
        m = self.model
        m.compile(loss=m.loss, optimizer=m.optimizer, metrics=list(m._metric_objects),
                  precision=precision, cuda_graphs=m.cuda_graphs)

    def __call__(self) -> None:
        self._compile(self.was)
        self.model._scaling = self.scaling


def _as_it_is(callback: Any) -> Callable[[], None]:
    """A call that puts ``callback`` back as it is now: by its ``get_state()`` and
    ``set_state``, or, where its state is not there yet (a user's ``get_state`` reading what
    its first ``on_epoch_end`` sets, say), by its attributes as they are."""
    try:
        state = callback.get_state()
    except Exception:  # (its state is checked where a checkpoint is written)
        attributes = dict(vars(callback))
        return lambda: (vars(callback).clear(), vars(callback).update(attributes))
    return lambda: callback.set_state(state)


def _callback_states(config: dict[str, Any], npz: NpzArchive, model: Any
                     ) -> list[tuple[str, dict[str, Any] | None]] | None:
    """The callback states of a checkpoint (None: a file written before they were kept), their
    arrays read back into them (each at most as large as the model's weights together)."""
    entry = config.get("callbacks")
    if entry is None:
        return None
    bad = DataFormatError(f"{npz.path}: invalid checkpoint: bad callbacks entry")
    if not isinstance(entry, list):
        raise bad
    limit = array_bytes(model.count_params())
    states: list[tuple[str, dict[str, Any] | None]] = []
    for i, e in enumerate(entry):
        if not (isinstance(e, dict) and isinstance(e.get("class"), str)
                and isinstance(e.get("state"), dict | None) and isinstance(e.get("arrays"), dict)
                and all(type(n) is int and n >= 0 for n in e["arrays"].values())):
            raise bad
        state = None if e["state"] is None else dict(e["state"])
        for key, n in e["arrays"].items():
            names = [f"callback.{i}.{key}.{k}" for k in range(n)]
            if state is None or any(name not in npz.entries for name in names):
                raise DataFormatError(f"{npz.path}: invalid checkpoint: the arrays {key!r} of "
                                      f"callback {e['class']} are missing")
            state[key] = [npz.read(name, limit) for name in names]
        scalars = e.get("scalars", [])  # (none in files before NumPy scalars were kept)
        if not isinstance(scalars, list) or scalars and state is None:
            raise bad
        for n, place in enumerate(scalars):
            entry_name = f"callback.{i}.0scalar.{n}"
            if not (isinstance(place, list) and len(place) == 2
                    and place[1] in ("scalar", "array") and entry_name in npz.entries):
                raise bad
            a = npz.read(entry_name, limit)
            if a.ndim:
                raise bad
            _put(state, place[0], a[()] if place[1] == "scalar" else a.copy(), bad)
        states.append((e["class"], state))
    return states


def _csv_logs(entry: Any, path: str) -> dict[str, dict[str, Any]]:
    """A checkpoint's ``csv_logs`` entry (:meth:`FitCheckpoints._csv_logs`), checked, by the
    files' absolute paths."""
    if not isinstance(entry, list) or not all(
            isinstance(e, dict) and set(e) == {"path", "size", "crc32"}
            and isinstance(e["path"], str) and type(e["size"]) is int and e["size"] >= 0
            and type(e["crc32"]) is int and 0 <= e["crc32"] < 2**32 for e in entry):
        raise DataFormatError(f"{path}: invalid checkpoint: bad csv_logs entry (expected a "
                              "list of the CSVLogger files' path, size and crc32)")
    return {e["path"]: e for e in entry}


def _put(state: dict[str, Any], path: Any, value: Any, bad: Exception) -> None:
    """Put ``value`` at ``path`` (keys and indices) in ``state``, where the JSON value it
    stands for is; ``bad`` raised where there is none."""
    if not (isinstance(path, list) and path and isinstance(path[0], str)):
        raise bad
    where: Any = state
    for step in path[:-1]:
        where = _step(where, step, bad)
    last = path[-1]
    _step(where, last, bad)  # (there, and a number)
    if isinstance(where[last], bool | int | float):
        where[last] = value
    else:
        raise bad


def _step(where: Any, step: Any, bad: Exception) -> Any:
    if isinstance(where, dict) and isinstance(step, str) and step in where:
        return where[step]
    if isinstance(where, list) and type(step) is int and 0 <= step < len(where):
        return where[step]
    raise bad


def _history(h: Any, path: str) -> EpochRecord:
    sparse = h.get("sparse", {}) if isinstance(h, dict) else None  # (none in older files)
    # Epoch numbers, the history's and those of the logs missing from some (bool is no int:
    # {True} == {1}, and 1.0 == 1, would pass the comparisons below).
    numbers = [("epoch", h.get("epoch"))] if isinstance(h, dict) else []
    if isinstance(sparse, dict):
        numbers += [(f"the epochs of {k!r}", e) for k, e in sparse.items()]
    for what, epochs in numbers:
        if isinstance(epochs, list) and not all(type(e) is int and e >= 0 for e in epochs):
            raise DataFormatError(f"{path}: invalid checkpoint: bad history entry: {what} is "
                                  f"{epochs!r}, expected epoch numbers, ints >= 0")
    ok = (isinstance(h, dict) and isinstance(h.get("epoch"), list)
          and isinstance(h.get("history"), dict) and isinstance(sparse, dict)
          and all(isinstance(k, str) and isinstance(v, list)
                  and all(isinstance(f, int | float) and not isinstance(f, bool) for f in v)
                  for k, v in h["history"].items())
          # a log missing from some epochs (val_* under validation_freq, a callback's) names
          # the epochs it has; any other has one value an epoch
          and all(k in h["history"] and isinstance(e, list) and len(e) == len(h["history"][k])
                  and e == sorted(set(e)) and set(e) <= set(h["epoch"])
                  for k, e in sparse.items())
          and all(len(v) == len(h["epoch"]) for k, v in h["history"].items()
                  if k not in sparse))
    if not ok:
        raise DataFormatError(f"{path}: invalid checkpoint: bad history entry")
    history = EpochRecord()
    history.epoch = list(h["epoch"])
    history.history = {k: [float(f) for f in v] for k, v in h["history"].items()}
    history.sparse = {k: list(e) for k, e in sparse.items()}
    return history


# -- what BackupAndRestore (xpcnn.callbacks) runs during fit -----------------------------------


def _check_run(path: str, theirs: Any, ours: dict[str, Any]) -> None:
    """Refuse to resume the checkpoint at ``path``, whose run description is ``theirs``, in a
    run described by ``ours`` (:func:`xpcnn.data.sources.fingerprint`, ``class_weight``;
    :func:`normal`), naming what differs."""
    if theirs == ours:
        return
    if not theirs:
        raise InputError(f"{path} holds no description of the data and fit arguments of its run "
                         "(written by save_checkpoint, or by a ModelCheckpoint of an earlier "
                         "version), so resuming it cannot be checked: resume from a file of "
                         "fit(checkpoint=...), BackupAndRestore or ModelCheckpoint, or start "
                         f"afresh with {_ADVICE.get().fresh}")
    keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    values = "; ".join(f"{k} is {theirs.get(k)!r} there and {ours.get(k)!r} here"
                       for k in keys[:4])
    raise InputError(f"{path} was written by a run with other data or fit arguments (they differ "
                     f"in {', '.join(keys)}): {values}; resume with {_ADVICE.get().run}, or "
                     f"start afresh with {_ADVICE.get().fresh}")


class FitCheckpoints:
    """The checkpoints of one ``fit`` (run by :class:`~xpcnn.callbacks.BackupAndRestore`, which
    checked the arguments): restores at the start, writes after every ``every`` steps (an int)
    and at the end of every epoch. ``callbacks``: those of the run that keep a state
    (``get_state``/``set_state``), saved with it and restored into the resumed run's;
    ``loggers``, its CSVLoggers, whose files as they are at each checkpoint it records
    (``csv_logs``) and hands back to the resumed run's (their ``backup``), so that they drop
    the rows written after it."""

    def __init__(self, model: Any, path: str | os.PathLike[str], every: int | str,
                 resume: bool, run: dict[str, Any], steps_per_epoch: int, verbose: int,
                 callbacks: list[Any] | None = None, loggers: list[Any] | None = None) -> None:
        self.model, self.path, self.every = model, os.fspath(path), every
        self.resume, self.run, self.steps = resume, run, steps_per_epoch
        self.verbose, self.callbacks = verbose, list(callbacks or [])
        self.loggers = list(loggers or [])
        self.stopped = False  # the checkpoint resumed from was of a run a callback stopped
        self.interrupted = False  # a Ctrl-C reached this process
        self.stopping = False  # one reached this process or another rank: checkpoint, stop

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a Ctrl-C (SIGINT) lets the step in progress finish, writes a checkpoint at
        that step and raises :class:`~xpcnn.errors.TrainingInterrupted` (on several ranks, all
        of them at the first step to end after any rank got it); a second Ctrl-C
        interrupts at once (the last checkpoint written stays). Only where Ctrl-C has Python's
        own meaning (KeyboardInterrupt, in the main thread): a SIGINT handler of the
        program's own, or SIGINT ignored, is left alone."""
        if not ctrl_c.python_handles_it():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def start(self) -> tuple[EpochRecord, Progress | None]:
        """The history so far and where to start (None: from the beginning)."""
        if not (self.resume and os.path.exists(self.path)):
            if self.resume and self.verbose:
                print(f"no checkpoint at {self.path} yet: starting from the beginning")
            return EpochRecord(), None
        with NpzArchive(self.path) as npz:
            return self._resume(npz)

    def _resume(self, npz: NpzArchive) -> tuple[EpochRecord, Progress | None]:
        config = checkpoint_config(npz)
        run, mine = config.get("run"), normal(self.run)
        if not isinstance(run, dict):
            raise DataFormatError(f"{self.path}: invalid checkpoint: no run description")
        # (first: what the rank count changes, such as a schedule's length in steps, would
        # otherwise be blamed instead)
        theirs, ours = run.get("ranks", 1), mine.get("ranks", 1)
        if theirs != ours:
            raise InputError(f"{self.path} was written by a run on {theirs} process(es) and this "
                             f"run has {ours}: resume it on {theirs} (mpiexec -n {theirs} ...), "
                             "since the global batch, and so every later step, depends on the "
                             "number of processes")
        # (the data and fit arguments before the compile settings: they change a schedule's
        # length, which those would otherwise be blamed for; all before the model is touched)
        _check_architecture(self.model, config, npz)
        _check_run(self.path, run, mine)
        # (a file of another precision alone: a callback compiled the run in it, which the
        # rerun call would do again at the same point; resumed in it, as that run went on)
        precision = _check_compile(self.model, config, self.path,
                                   take_precision=_ADVICE.get().takes_precision)
        progress = read_progress(config.get("progress"), self.path)
        # (no sample seen inside an epoch, but sums: corrupt; none of either is a train_step
        # of the user's that records nothing)
        if progress.step > self.steps or (progress.step and not progress.seen
                                          and (progress.loss_sum or progress.correct)):
            raise DataFormatError(f"{self.path}: invalid checkpoint: step {progress.step} of an "
                                  f"epoch of {self.steps} steps, {progress.seen} samples seen")
        top_k = len(self.model._top_ks)  # (its compile, checked above, has as many)
        if progress.top_k and len(progress.top_k) != top_k:
            raise DataFormatError(f"{self.path}: invalid checkpoint: {len(progress.top_k)} "
                                  f"top-k counts in its progress, for {top_k} top-k metrics")
        states, kept = self._checked_states(_callback_states(config, npz, self.model))
        csv_logs = _csv_logs(config.get("csv_logs", []), self.path)  # (none in older files)
        stopped = config.get("stopped", False)
        if not isinstance(stopped, bool):
            raise DataFormatError(f"{self.path}: invalid checkpoint: stopped is {stopped!r}, "
                                  "expected true or false")
        before = [_as_it_is(cb) for cb in self.callbacks]
        switched = None
        try:  # (a refused resume leaves the callbacks, and the precision, as they were too)
            if precision is not None:
                switched = _compiled_in(self.model, precision)
                before.insert(0, switched)  # (first: a callback's put-back may raise)
            # (states None: they start afresh, as they are)
            for cb, state in zip(self.callbacks, states or (), strict=states is not None):
                try:
                    cb.set_state(state)
                except (TypeError, ValueError, KeyError) as e:
                    raise DataFormatError(f"{self.path}: invalid checkpoint: the state of "
                                          f"callback {type(cb).__name__}: {e}") from e
            ckpt = _restore(self.model, config, npz)
        except BaseException:
            for put_back in before:
                put_back()
            raise
        if switched is not None:
            warn(f"{self.path} was written by the model compiled with precision {precision!r} "
                 f"(by a callback, say), and this one has {switched.was!r}: resumed in "
                 f"{precision!r}, as the file says")
        for logger in self.loggers:  # (each finds its own file's, by its absolute path, as
            # resolved when fit began: CSVLogger.on_train_begin, which runs before this)
            logger.backup = csv_logs.get(os.path.abspath(logger.path))
        # (a run its callbacks stopped trains no more, but where they start afresh: they
        # decide anew)
        self.stopped = stopped and kept
        if self.verbose:
            print(f"resuming from {self.path}: epoch {ckpt.epoch + 1}, {ckpt.step}/"
                  f"{self.steps} steps done" + (": a callback stopped that run, which trains "
                                                "no more" if self.stopped else ""))
        return ckpt.history, ckpt.progress

    def _checked_states(self, states: list[tuple[str, dict[str, Any] | None]] | None
                        ) -> tuple[list[dict[str, Any] | None] | None, bool]:
        """The file's callback states, for this run's callbacks, and whether every one goes on
        from the file. None where they all start afresh, with a one-line warning: a file
        written before states were kept, or one of a run whose callbacks that keep a state
        differ from this run's (class and order); a callback whose state was kept under other
        settings (another monitor) starts afresh alone, also with a warning. Refused where
        one's state is unknown (a ModelCheckpoint's file written before it ran, or before a
        callback's error stopped it)."""
        ours = [type(cb).__name__ for cb in self.callbacks]
        theirs = None if states is None else [name for name, _ in states]
        if states is None or theirs != ours:
            if ours or theirs:
                held = "no callback states (an earlier version's file)" if theirs is None else \
                    f"the states of the callbacks {theirs}"
                warn(f"{self.path} holds {held}, and this run's callbacks that keep one are "
                      f"{ours}: they start afresh (the same callbacks, in the same order, go on "
                      "from the file)")
            return None, not (ours or theirs)
        fits = [state is None or cb.state_fits(state)
                for cb, (_, state) in zip(self.callbacks, states, strict=True)]
        if not all(fits):
            other = [name for (name, _), fit in zip(states, fits, strict=True) if not fit]
            warn(f"{self.path} holds the states of the callbacks {theirs}, kept under other "
                  f"settings for {other} (another monitor or mode): "
                  f"{'it starts' if len(other) == 1 else 'they start'} afresh, the others go on "
                  "from the file")
        unknown = [name for (name, state), fit in zip(states, fits, strict=True)
                   if state is None and fit]
        if unknown:
            raise InputError(f"{self.path} was written by a ModelCheckpoint before "
                             f"{', '.join(unknown)} (after it in callbacks) had run for that "
                             "point (a subclass's own on_epoch_end saves before them, and a "
                             "callback's error there stops them), so their state is not in the "
                             "file and the run cannot go on exactly: resume from "
                             "fit(checkpoint=...)'s or BackupAndRestore's file, or list the "
                             "ModelCheckpoint after them")
        return [state if fit else cb.get_state() for cb, (_, state), fit
                in zip(self.callbacks, states, fits, strict=True)], all(fits)

    def due(self, epoch: int, step: int) -> bool:
        """Whether batch ``step`` (1-based) of ``epoch`` ends with a checkpoint: every
        ``every`` steps, or at once after a Ctrl-C. (Not at an epoch's last step: the
        end-of-epoch checkpoint follows at once.)"""
        stopping = self._stopping()  # (asked at every step: on several ranks, a collective)
        return step != self.steps and (stopping or self.every != "epoch" and not (
            epoch * self.steps + step) % self.every)  # type: ignore

    def after_step(self, epoch: int, step: int, history: EpochRecord) -> None:
        """The checkpoint after batch ``step`` of ``epoch`` where :meth:`due`."""
        if self.model._parallel is not None:  # every rank saves the same BatchNorm statistics
            self.model._parallel.average_state()
        save_checkpoint(self.model, self.path, progress_within(self.model, epoch, step),
                        history, self.run, callback_states(self.callbacks),
                        csv_logs=self._csv_logs())
        self._stop_if_interrupted(epoch, step)

    def after_epoch(self, epoch: int, history: EpochRecord) -> None:
        self._stopping()  # (a Ctrl-C since the last step, during validation say)
        save_checkpoint(self.model, self.path, Progress(epoch + 1), history, self.run,
                        callback_states(self.callbacks), self.model.stop_training,
                        csv_logs=self._csv_logs())
        self._stop_if_interrupted(epoch, self.steps)

    def _csv_logs(self) -> list[dict[str, Any]]:
        """The files the CSVLoggers append to, as they are now (read on rank 0, the writer;
        the other ranks' loggers write none)."""
        return [r for r in (logger.backup_record() for logger in self.loggers) if r is not None]

    def _stopping(self) -> bool:
        """Whether to checkpoint and stop after this step: a Ctrl-C reached this process or,
        on several ranks, any rank. The signal reaches each rank at its own point of the loop,
        and the checkpoint is collective (the BatchNorm average), so the ranks agree on it
        first, in fit's agreement on ``stop_training`` (one tagged host sum a step:
        :meth:`~xpcnn.distributed.DataParallel.agree_to_stop`), which this callback, fit's
        last, makes for the step: the checkpoint then records the stop that every rank
        makes."""
        parallel = self.model._parallel
        if not self.stopping:
            self.stopping = self.interrupted if parallel is None else \
                parallel.agree_to_stop(self.interrupted)[1]
        return self.stopping

    def _stop_if_interrupted(self, epoch: int, step: int) -> None:
        if self.stopping:  # (on several ranks, rank 0 has written: save_checkpoint waited)
            raise TrainingInterrupted(f"epoch {epoch + 1}, step {step}/{self.steps}", self.path)

