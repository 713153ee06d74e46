"""Trainer: compile, fit, evaluate and predict, for :class:`xpcnn.Model`; the training step
is its base class's (:class:`~xpcnn.training.step.TrainingStep`).

As in Keras 3 (``class Model(Trainer, Layer)``), the training machinery is a base class of the
model: :class:`Trainer` holds what training adds to a network (the loss, the optimiser, the
precision, the running totals, the captured CUDA graphs) and reaches the network only through
the hooks that :class:`~xpcnn.model.Model` defines (:class:`~xpcnn.training.step.NetworkHooks`).

Data enters as arrays in (N, H, W, C) (or datasets, see :mod:`xpcnn.data`); each batch
crosses to the device once (a training set that fits
:data:`xpcnn.data.sources.DEVICE_BUDGET_BYTES` crosses once per ``fit``), is cast there and runs
forward and backward through the layers; the loss and correct count stay on the device until
the host reads them (:mod:`xpcnn.totals`). With a cross-entropy
loss and a final Softmax layer (or a last layer's softmax activation), training feeds the
logits to the fused, stable softmax cross-entropy; ``predict`` still returns probabilities.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import numpy as np

from .. import checks, ctrl_c, distributed
from .. import metrics as metric_settings
from ..backend import PRECISIONS, Backend, precision_dtype
from ..callbacks import (
    BackupAndRestore,
    BatchLogs,
    Callback,
    CallbackList,
    CSVLogger,
    History,
    ProgbarLogger,
    callback_list,
    check_own_files,
    given_file,
    stateful,
    validates,
)
from ..cuda_graphs import StepGraphs
from ..data.arrays import (
    check_arrays,
    check_on_device,
    check_sample_weights,
    check_source,
    is_keras_dataset,
    is_map_dataset,
    is_stream,
    unpack_x_y,
)
from ..data.sources import ArrayBatches, Batches, DatasetBatches, unpack
from ..data.streams import IterableBatches, KerasDatasetPasses, prune_streams, step_ran
from ..errors import InputError, NonFiniteError, warn
from ..layers.base import Layer
from ..layers.preprocessing import Normalization
from ..losses import SoftmaxCrossEntropy, get_loss
from ..ops.kernels import compute_scope, kernels_for
from ..optim import Constant, Optimizer, get_optimizer
from ..passes import exclusive_if
from ..saving.checkpoint import checkpoint_config
from ..saving.model_file import adapt_to_file
from ..saving.npz import NpzArchive
from ..structure import check_final_softmax, where
from ..totals import SCALE_RANGE, RunningTotals, loss_scaling
from .arguments import (
    batch_length,
    check_fit_data,
    check_keras_compile,
    checkpoint_callback,
    drop_sources,
    inference_params,
    one_of,
    parse_validation_freq,
    reads_iterator,
    refuse_stream_weights,
    validation_triple,
    warn_ran_out,
    weights_name,
)
from .step import (
    TrainingStep,
    _check_takes_a_batch,
    _check_takes_sample_weight,
    _in_one_thread,
)

#: Guards every model's check-and-set of what it runs (see Trainer._running_alone): held only
#: for that.
_RUNNING = threading.Lock()


def _released() -> None:
    """An optimiser's ``_model`` once its model released it: no model, and its state is that
    model's (see Trainer._own)."""


def _prunes_streams(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` (fit, evaluate, predict), after which the iterators' registry drops the
    streams of held iterators (zip, map: no weak reference) that their caller dropped, and
    those that keep nothing (:func:`xpcnn.data.streams.prune_streams`): one left with batches by an
    epoch closed early was otherwise kept alive, with what it wraps (a DataLoader's workers),
    until another such iterator was used."""
    @functools.wraps(call)
    def pruning(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(self, *args, **kwargs)
        finally:
            prune_streams()
    return pruning


def _together(call: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``call`` (fit, evaluate) in :func:`xpcnn.distributed.together`: on several ranks, an
    error that ends it on one rank ends it on the others at once, with that rank's message."""
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def together(self: Any, *args: Any, **kwargs: Any) -> Any:
            with distributed.together(call):
                return method(self, *args, **kwargs)
        return together
    return wrap


def _warn_if_the_schedule_ends_in_an_epoch(optimizer: Optimizer | None, steps: int | None,
                                           epochs: int) -> None:
    """Warn where the learning-rate schedule falls below a tenth of its rate within the first
    epoch of a fit of several: a PyTorch scheduler ported literally (``StepLR(1,
    0.7)``, ``CosineAnnealingLR(T_max=epochs)``, stepped once an epoch there) counts optimiser
    steps here, and its rate reached 0 in the first epoch, the rest of the fit learning
    nothing, silently."""
    if optimizer is None or not steps or epochs < 2 or type(optimizer.schedule) is Constant:
        return
    start, schedule = optimizer.iterations, optimizer.schedule
    try:  # (a user's schedule that fails says so at its step, not here)
        # (at most 65 reads: a user's schedule may be slow; the epoch's last step, where a
        # drop at the next epoch's start, a per-epoch schedule ported right, is not yet)
        peak = max(float(schedule(start + k)) for k in range(0, steps, -(-steps // 64)))
        end = float(schedule(start + steps - 1))
    except Exception:  # noqa: BLE001
        return
    if math.isfinite(peak) and peak > 0 and end < peak / 10:
        warn(f"the learning-rate schedule {type(schedule).__name__} falls from {peak:.3g} to "
             f"{end:.3g} within the first epoch ({steps} steps) of this {epochs}-epoch fit: "
             "xpcnn's schedules count optimiser steps, not epochs (PyTorch's StepLR(step_size) "
             "and CosineAnnealingLR(T_max) stepped once an epoch are StepDecay(lr, step_size "
             "* steps_per_epoch) and CosineDecay(lr, T_max * steps_per_epoch); a rate an epoch "
             "is LearningRateScheduler(lambda epoch: ...))")


def _with_progress_bar(callbacks: list[Callback], verbose: int, call: str) -> list[Callback]:
    """The callbacks of ``call`` (evaluate or predict) in the order they run: the user's
    ``callbacks``, then its progress bar after them, as fit runs its own
    (:meth:`Trainer._fit_callbacks`): the user's ProgbarLogger (one at most), else one of the
    call's own where ``verbose`` is not 0 (none at 0)."""
    bar = _progress_bar(callbacks, verbose, call)
    return [*(cb for cb in callbacks if cb is not bar), *([bar] if bar is not None else [])]


#: The hooks of an evaluation's callbacks that may set ``model.stop_evaluating`` for it.
_TEST_HOOKS = ("on_test_begin", "on_test_batch_begin", "on_test_batch_end")


def _may_stop_evaluating(callbacks: list[Callback]) -> bool:
    """Whether one of ``callbacks`` has a test hook of its own (its class's, or set on it, as
    a LambdaCallback's), which may set ``model.stop_evaluating``: not a progress bar's."""
    return any(getattr(hook, "__func__", hook) not in (getattr(Callback, name),
                                                       getattr(ProgbarLogger, name))
               for cb in callbacks for name in _TEST_HOOKS
               for hook in (getattr(cb, name),))


def _written_files(callbacks: list[Callback]) -> list[str]:
    """The files that fit's ``callbacks`` write, as given (:func:`given_file`)."""
    return [os.fspath(path) for cb in callbacks if (path := given_file(cb)) is not None]


def _progress_bar(callbacks: list[Callback], verbose: int, call: str) -> ProgbarLogger | None:
    """The bar of ``call`` (fit, evaluate, predict): the user's ProgbarLogger among
    ``callbacks`` (one at most), else one of the call's own where ``verbose`` is not 0 (either
    takes the call's ``verbose`` from its params)."""
    return one_of(callbacks, ProgbarLogger, call) or (ProgbarLogger() if verbose else None)


class Trainer(TrainingStep):
    """Training, evaluation and prediction of a network: the base class of
    :class:`xpcnn.Model`, which supplies the network through the hooks of
    :class:`~xpcnn.training.step.NetworkHooks`.

    Nothing here knows how the layers are connected. One training step (checked, on the
    device, captured in a CUDA graph where it can be), and the running totals the host reads
    behind it, are the base class's (:class:`~xpcnn.training.step.TrainingStep`); this file
    reads in the order of a run: compile; the batch sources; fit, evaluate and predict. A
    refused call changes nothing (``_undone_if_refused``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # (Keras' "Customizing what happens in fit()" guide overrides the metrics property with
        # its trackers: here a bare "property 'metrics' has no setter" at construction)
        made = vars(cls).get("metrics")
        if made is not None and hasattr(type(made), "__get__"):
            raise InputError(
                f"{cls.__name__} defines metrics ({type(made).__name__}), as Keras' custom "
                "training loops do with their metric trackers: xpcnn's model.metrics is the "
                "tuple of metric names compile(metrics=[...]) sets, and custom metric trackers "
                "are not supported. Remove it: fit logs the loss and compile's metrics (a "
                "subclass may override train_step, which returns (loss, correct count))")

    def __init__(self) -> None:
        self._loss: SoftmaxCrossEntropy | None = None  # (see the loss property)
        self._optimizer: Optimizer | None = None  # (see the optimizer property)
        self.precision = "float32"
        self.metrics: tuple[str, ...] = ("accuracy",)  # (compile's default: evaluate's too)
        # (the metrics themselves, in that order; the distinct k of the top-k ones, each a
        # device count; where each metric's value is among [loss, correct, top-k counts])
        self._metric_objects = metric_settings.get_metrics(self.metrics)
        self._top_ks: tuple[int, ...] = ()
        self._metric_slots: tuple[int, ...] = (1,)
        self._last_stats: Any = None  # (the last train_step's stats: train_on_batch's top-k)
        self.history = History()
        self.stop_training = False
        # (Keras 3's stop_evaluating / stop_predicting: each thread's own, see below)
        self._stops = threading.local()
        self._scaling: Any = None  # float16 loss scaling on the device (see xpcnn.totals)
        self._totals: RunningTotals | None = None
        self._owners: list[tuple[Layer, str]] = []  # (the parameters the totals' flags follow)
        self._totals_for: tuple[Layer, ...] = ()  # (the trainable layers they were made for)
        self._totals_ks: tuple[int, ...] = ()  # (and the k of each top-k count they keep)
        # (the epoch's samples seen before those top-k counts began: a callback's compile
        # that changed the top-k metrics mid-epoch)
        self._top_k_from = 0.0
        self._parallel: distributed.DataParallel | None = None  # set by fit on several ranks
        self._resume_at: Any = None  # where BackupAndRestore restarts a run
        self._position = (0, 0)  # (epoch, batches done in it) during fit
        # (whether fit's epoch ending now has val_* logs; None outside fit: see callbacks)
        self._epoch_validated: bool | None = None
        # (the thread and what it runs, "fit", "to()", "compile", "train_on_batch" or
        # "train_step": no other thread may train or move the model meanwhile; see
        # _running_alone)
        self._running: tuple[int, str] | None = None
        # Epochs are numbered on across fit calls, for their shuffling orders: a fit's epoch e
        # shuffles as number e + _epoch_offset; _epochs_begun counts the numbers used so far
        # (by epochs that trained a step at least).
        self._epochs_begun, self._epoch_offset = 0, 0
        self.cuda_graphs: bool | None = None
        #: Why training steps run without CUDA graphs ("" while they are captured, or will be).
        self.cuda_graphs_reason = ""
        self._graphs: StepGraphs | None = None
        # the class weights training steps use now, a device table (classes,) in the
        # parameters' dtype (None: none; see _use_class_weights), and the table kept for reuse
        self._class_weights: Any = None
        self._class_table: Any = None

    @property
    def stop_evaluating(self) -> bool:
        """Keras 3's: a callback sets ``model.stop_evaluating = True`` to end the evaluate (or
        fit's validation) it runs in after the current batch. Each thread has its own (reset
        as its next evaluation begins): another thread's evaluate goes on."""
        return getattr(self._stops, "evaluating", False)

    @stop_evaluating.setter
    def stop_evaluating(self, value: bool) -> None:
        self._stops.evaluating = value

    @property
    def stop_predicting(self) -> bool:
        """Keras 3's: a callback sets ``model.stop_predicting = True`` to end the predict it
        runs in after the current batch (its rows so far are returned). Each thread has its
        own, as :attr:`stop_evaluating`."""
        return getattr(self._stops, "predicting", False)

    @stop_predicting.setter
    def stop_predicting(self, value: bool) -> None:
        self._stops.predicting = value

    @contextlib.contextmanager
    def _running_alone(self, what: str, nested: bool = False) -> Iterator[None]:
        """Inside, this model runs ``what`` ("fit", "to()", or with ``nested`` one of the calls
        that change its training state: "compile", "train_on_batch", "train_step") in this
        thread; refused where another thread runs one of them, and, unless ``nested``, where
        this thread does (a callback of its fit). (The check and the mark are one step: two
        threads cannot both pass.)"""
        here = threading.get_ident()
        running = self._running  # (only the thread it names sets it back to None)
        if nested and running is not None and running[0] == here:
            yield  # (a callback of this thread's fit, say: as documented; no lock to take)
            return
        with _RUNNING:
            running = self._running
            if running is None:
                self._running = (here, what)
        if running is None:
            try:
                yield
            finally:
                self._running = None
            return
        thread, doing = running
        if thread != here:
            raise InputError(f"{what} was called while this model's {doing} runs in another "
                             "thread: a model trains (fit, train_on_batch, train_step, compile) "
                             "or moves (to()) in one thread at a time (each changes its "
                             "weights, optimiser state, History or device; predict and "
                             "evaluate may run beside them); wait for that call to return "
                             "(thread.join()), or use a second model")
        if nested:  # (a callback of this thread's fit, say: as documented)
            yield
            return
        if what == "fit":
            raise InputError(f"fit was called while this model's {doing} runs (from one of its "
                             "callbacks): a fit inside a fit would take over the outer one's "
                             "History, position and class weights; train_on_batch trains a "
                             "batch there, or fit again once the outer fit has returned")
        raise InputError(f"{what} was called while this model's {doing} runs (from one of its "
                         "callbacks): fit's batches and steps are on the device it started "
                         "on; move the model before fit, or after it returns")

    # -- compile: the loss, the optimiser and the precision -------------------------------------
    @_in_one_thread("compile", nested=True)
    def compile(self, *, loss: str | SoftmaxCrossEntropy = "cross_entropy",
                optimizer: str | Optimizer = "adam",
                metrics: str | metric_settings.Metric | list[str | metric_settings.Metric]
                | tuple[str | metric_settings.Metric, ...] | None = ("accuracy",),
                precision: str = "float32", cuda_graphs: bool | None = None,
                loss_weights: Any = None, weighted_metrics: Any = None,
                run_eagerly: bool = False, steps_per_execution: int = 1,
                jit_compile: bool | str = "auto", auto_scale_loss: bool = True) -> None:
        """Choose the loss, the optimiser, the metrics and the precision.

        Every argument is keyword-only: Keras' ``compile(optimizer, loss)`` order differs,
        and a positional call gets a TypeError instead of another meaning. Keras 3's other
        keywords are taken at their defaults (``loss_weights=None``,
        ``weighted_metrics=None``, ``run_eagerly=False``, ``steps_per_execution=1``,
        ``jit_compile="auto"`` or False, ``auto_scale_loss=True``: xpcnn's behaviour) and
        refused otherwise, naming what to do instead
        (:data:`~xpcnn.training.arguments.KERAS_COMPILE`); where another value is xpcnn's
        behaviour too, it is taken: ``run_eagerly=True`` is ``cuda_graphs=False`` (every step
        runs its Python), ``auto_scale_loss=False`` a precision that scales no loss.

        ``metrics``: ``["accuracy"]`` (the default), ``["acc"]``,
        ``"sparse_top_k_categorical_accuracy"``, ``"top_k_categorical_accuracy"`` (k = 5),
        :class:`xpcnn.metrics.SparseTopKCategoricalAccuracy` and
        :class:`~xpcnn.metrics.TopKCategoricalAccuracy` objects (another ``k`` or name), in
        any order, or none (``[]`` or None): what ``fit`` logs and ``evaluate`` returns besides
        the loss, each named as given, as in Keras 3 (``"acc"`` logs ``acc`` and ``val_acc``).
        Two metrics of one name are refused. Without metrics, ``evaluate`` and
        ``train_on_batch`` return the loss alone, as in Keras.

        ``loss``'s ``from_logits`` (:class:`SoftmaxCrossEntropy`) is checked against the model's
        last layer here where the model is built, else when a call builds it.

        ``precision`` is ``"float32"``, ``"mixed_float16"`` or ``"mixed_bfloat16"``: matmuls in
        the low precision, float32 master weights, softmax, loss and normalisation statistics,
        and dynamic loss scaling for float16. A float64 model (``Sequential(dtype="float64")``)
        computes in float64 under ``"float32"`` or ``"float64"``; its ``precision`` says
        ``"float64"``. Compiled again with the optimiser it holds (``optimizer=model.optimizer``)
        and ``"mixed_float16"`` still, the loss scale and its count of good steps go on, as the
        optimiser's slots do (Keras' LossScaleOptimizer); otherwise the scale starts at 2**15.

        ``cuda_graphs``: capture the training step in a CUDA graph and replay it
        (:mod:`xpcnn.cuda_graphs`); None (the default) does so on CuPy wherever the model
        allows it, True also warns once where it does not, False never does.
        ``cuda_graphs_reason`` says why steps run without.
        """
        # Every argument is checked before anything changes: a failed compile leaves the
        # model (and the optimizer, which it would bind) as they were.
        # (False where no loss is scaled: what it asks, taken)
        unscaled = auto_scale_loss is False and precision != "mixed_float16"
        check_keras_compile({"loss_weights": loss_weights, "weighted_metrics": weighted_metrics,
                             "run_eagerly": run_eagerly,
                             "steps_per_execution": steps_per_execution,
                             "jit_compile": jit_compile,
                             "auto_scale_loss": True if unscaled else auto_scale_loss})
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise InputError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        if run_eagerly:  # (Keras' eager steps: each runs its Python, no graph replays it)
            if cuda_graphs:
                raise InputError("compile(run_eagerly=True, cuda_graphs=True): Keras' "
                                 "run_eagerly=True runs every step's Python, which a CUDA "
                                 "graph's replay does not; give one of them")
            cuda_graphs = False
        loss, optimizer = get_loss(loss), get_optimizer(optimizer)
        # (each once, as given: the logs' keys; None is Keras' none)
        resolved = metric_settings.get_metrics(metrics)
        # (a float64 model computes in float64: "float32", no mixed precision, is that too, and
        # its precision says so)
        full = self.dtype_name == "float64" and precision in ("float32", "float64")
        if not full and (not isinstance(precision, str) or precision not in PRECISIONS):
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}" + (
                                 f" (model {self.name!r} holds {self.dtype_name} parameters: "
                                 "'float64' is a float64 model's, whose dtype is set by "
                                 "Sequential(dtype='float64') or Model(..., dtype='float64'))"
                                 if precision == "float64" else ""))
        if not full and PRECISIONS[precision] is not None:
            # (refused where the backend lacks it)
            compute = precision_dtype(self.backend, precision, "compile with precision='float32' "
                                      "on it")
            for layer in self.layers:
                layer.check_compute_dtype(self.backend.xp, compute)
        if self.built:
            self._check_loss_outputs(loss)
        # (the loss scale goes on with the optimiser whose slots and step count go on: the one
        # bound already, as Keras' LossScaleOptimizer keeps its scale and PyTorch's GradScaler
        # is never reset; the same array, which captured graphs and ranks may hold)
        kept_scaling = self._scaling if optimizer is self._optimizer and \
            precision == self.precision == "mixed_float16" else None
        self.loss, self._optimizer = loss, self._own(optimizer)
        self.cuda_graphs, self._graphs, self.cuda_graphs_reason = cuda_graphs, None, ""
        self.metrics = tuple(m.name for m in resolved)
        self._metric_objects, self._top_ks = resolved, metric_settings.top_k_of(resolved)
        self._metric_slots = metric_settings.slots(resolved)
        self._scaling = kept_scaling if kept_scaling is not None else loss_scaling(
            self.backend) if precision == "mixed_float16" else None
        new = "float64" if full else precision
        # (another precision, and the rebuild for it, under no pass of another thread: a
        # predict's batch runs in one precision, see PassLock)
        with exclusive_if(new != self.precision and getattr(self, "built", False),
                          f"compile(precision={precision!r}) of model {self.name!r}"):
            self.precision = new
            self._rebuild_if_shared()  # (built layers compute in the new precision's dtype)

    @property
    def loss(self) -> SoftmaxCrossEntropy | None:
        """The loss this model trains by (None: not compiled). Assigning one (a
        :class:`~xpcnn.losses.SoftmaxCrossEntropy` or a name) is compile's ``loss=`` alone,
        checked as compile checks it, and taken by the next step."""
        return self._loss

    @loss.setter
    def loss(self, loss: str | SoftmaxCrossEntropy | None) -> None:
        if loss is None and self._optimizer is not None:
            raise InputError("model.loss = None: a compiled model trains by a loss; give one "
                             "('sparse_categorical_crossentropy' or a SoftmaxCrossEntropy)")
        loss = None if loss is None else get_loss(loss)  # (a bad name: an error here, not
        if loss is not None and self.built:  # an AttributeError at the next step)
            self._check_loss_outputs(loss)
        self._loss = loss  # (a step captured with another loss is captured again)

    @property
    def optimizer(self) -> Optimizer | None:
        """The optimiser that trains this model (None: not compiled). Assigning one (an
        :class:`~xpcnn.optim.Optimizer` or a name) is compile's ``optimizer=`` alone: bound to
        this model, refused where another model's (``compile`` keeps the other settings)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: str | Optimizer | None) -> None:
        if optimizer is None:  # (uncompiled again: fit asks for compile)
            self._release()
            self._optimizer = None
        else:
            owned = self._own(get_optimizer(optimizer))
            if owned is not self._optimizer and self._scaling is not None:
                # (the loss scale goes on with the optimiser whose slots go on, as in compile:
                # another one starts at Keras' initial scale)
                self._scaling = loss_scaling(self.backend)
            self._optimizer = owned
        # (a captured step holds the optimiser it was captured with, as after compile)
        self._graphs, self.cuda_graphs_reason = None, ""

    def _own(self, optimizer: Optimizer) -> Optimizer:
        """``optimizer``, bound to this model: its slots and step count are one model's, and
        another model's steps would silently mix into them (or fail deep inside). One that
        another model released, or that outlived its model, starts afresh here (it held that
        model's state; one never stepped keeps the learning rate set on it, as in Keras); a
        copy of one (``copy.deepcopy``, pickle: bound to none) keeps its state, checked
        against this model's trained parameters (:meth:`_check_adopted_state`)."""
        bound = vars(optimizer).get("_model")  # (absent: never compiled, or a copy)
        owner = None if bound is None else bound()
        if owner is not None and owner is not self:
            raise InputError(f"this {type(optimizer).__name__} optimizer is already compiled into "
                             f"model {owner.name!r}: an optimizer holds one model's state (its "
                             "slots and step count), so each model needs one of its own; pass "
                             "a new one")
        if bound is None and optimizer.slots:
            self._check_adopted_state(optimizer)  # (before anything changes)
        if self._optimizer is not optimizer:
            self._release()
        if owner is None and bound is not None and (optimizer.iterations or optimizer.slots):
            # (another model's state; one never stepped keeps the rate its user set)
            optimizer.slots, optimizer.iterations, optimizer.lr_factor = {}, 0, 1.0
            optimizer.applied = None
        vars(optimizer)["_model"] = weakref.ref(self)
        return optimizer

    def _release(self) -> None:
        """Free this model's optimiser to be compiled into another model (as a new one)."""
        if self._optimizer is not None:
            vars(self._optimizer)["_model"] = _released

    def _check_adopted_state(self, optimizer: Optimizer) -> None:
        """Refuse a copied optimiser's slots where they are not for this model's trained
        parameters (their number, shapes, dtypes and device): its first step would fail deep
        inside, or update one parameter with another's momentum."""
        name = type(optimizer).__name__
        fresh = f"or compile a new {name}(...) to start afresh"
        if not self.built:
            raise InputError(f"this {name} optimizer holds the state of another model (a copy: "
                             f"{optimizer.iterations} steps), which is checked against this "
                             f"model's parameters, but model {self.name!r} is not built: build "
                             f"it first (model.build(input_shape)), {fresh}")
        params = [p for la in self._trained() for p in la.params.values()]  # type: ignore[attr-defined]
        expected = [(tuple(p.shape), str(p.dtype), type(p).__module__) for p in params]
        for slot, arrays in optimizer.slots.items():
            held = [(tuple(a.shape), str(a.dtype), type(a).__module__) for a in arrays]
            if held != expected:
                raise InputError(
                    f"this {name} optimizer holds the state of another model (a copy: "
                    f"{optimizer.iterations} steps) whose {slot!r} slots do not fit model "
                    f"{self.name!r}'s trained parameters: they are {held}, the parameters "
                    f"{expected} (shape, dtype, array module); {fresh}")

    @property
    def _compute_dtype_name(self) -> str:
        """The dtype the layers compute their matmuls in, as the precision says."""
        return PRECISIONS.get(self.precision) or self.dtype_name

    @property
    def loss_scale(self) -> float:
        """The dynamic float16 loss scale (1.0 unless ``mixed_float16``); reading it waits for
        the device."""
        return 1.0 if self._scaling is None else float(self.backend.to_numpy(self._scaling)[0])

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        if self._scaling is not None:
            # (held in float32: 1e39 became infinity, and every step was skipped, silently)
            value = checks.number(value, "loss_scale", *SCALE_RANGE)
            self._scaling = loss_scaling(self.backend, value, self._good_steps)
        elif value != 1.0:
            raise InputError("a loss scale other than 1 needs precision='mixed_float16'")

    @property
    def _good_steps(self) -> int:
        """float16 steps in a row without overflow (the scale doubles after 2000)."""
        return 0 if self._scaling is None else int(self.backend.to_numpy(self._scaling)[1])

    @_good_steps.setter
    def _good_steps(self, value: int) -> None:
        if self._scaling is not None:
            self._scaling = loss_scaling(self.backend, self.loss_scale, value)

    def _move_training_state(self, backend: Backend) -> None:
        """The optimiser's state and the loss scale to ``backend`` (``Model.to``), all copied
        before any is replaced (a copy that fails changes nothing), after the running totals
        are read (a skipped step is named); they and the captured graphs are made afresh
        there."""
        def move(a: Any) -> Any:
            return backend.asarray(self.backend.to_numpy(a))

        self._read_totals()  # (a step skipped and not read yet is named here, not lost)
        optimizer = self.optimizer
        slots = {k: [move(a) for a in v] for k, v in optimizer.slots.items()} if optimizer else {}
        applied = None if optimizer is None or optimizer.applied is None \
            else move(optimizer.applied)
        scaling = None if self._scaling is None else move(self._scaling)
        if optimizer is not None:
            optimizer.slots, optimizer.applied = slots, applied
        self._scaling, self._graphs, self.cuda_graphs_reason = scaling, None, ""
        self._class_table = None  # (made again on the new device when next used)

    def _restore_training_state(self, *, iterations: int, lr_factor: float,
                                slots: Mapping[str, list[np.ndarray]], applied: int,
                                loss_scale: float, good_steps: int, epoch_offset: int,
                                epochs_begun: int) -> None:
        """Put back what a checkpoint restores of the training state, each value checked by
        its reader (:mod:`xpcnn.saving.checkpoint`): the optimiser's step count, learning-rate
        factor and slots (host arrays, for the layers trained now) with the updates they have
        had (``applied``, where the optimiser counts them), the float16 loss scale and its
        steps without overflow, and the epochs' shuffling numbers (see ``fit``)."""
        opt = self.optimizer
        assert opt is not None
        opt.iterations, opt.lr_factor = iterations, lr_factor
        # (in the parameters' dtype, whatever float type the file holds: the fused updates read a
        # parameter's slots as its own dtype)
        opt.slots = {name: [self.backend.asarray(a, dtype=self.dtype_name) for a in v]
                     for name, v in slots.items()}
        opt.applied = self.backend.asarray(np.float64(applied)) \
            if slots and opt.counts_updates else None
        self._slots_restored()
        self.loss_scale, self._good_steps = float(loss_scale), good_steps
        self._epoch_offset, self._epochs_begun = epoch_offset, epochs_begun

    def _require_compiled(self, what: str) -> None:
        if self.loss is None or self.optimizer is None:
            raise InputError(f"call compile(loss=..., optimizer=...) before {what}")

    def _check_loss_outputs(self, loss: SoftmaxCrossEntropy) -> None:
        """Refuse, on a built model, a loss whose ``from_logits`` says its outputs are what they
        are not (:meth:`SoftmaxCrossEntropy.check_outputs`)."""
        # (only where they disagree: the layer is named then, not at each step)
        if loss.from_logits is not None and loss.from_logits == self._fused_softmax():
            check_final_softmax(self.layers)  # (a user's softmax: named as such)
            last = len(self.layers) - 1
            loss.check_outputs(self._fused_softmax(),
                               where(self.layers[last], last, self.layers))

    # -- batch sources, and a refused call undone -----------------------------------------------
    def _batches(self, x: Any, y: Any, batch_size: int, steps: int | None, what: str = "x", *,
                 shuffle: bool = False, seed: int = 0, targets: bool = True,
                 checked: bool = False, steps_name: str = "steps_per_epoch",
                 weights: Any = None) -> Batches:
        """The batch source for ``x`` (and ``y``): arrays, a map-style dataset or an iterable
        of batches (see :mod:`xpcnn.data`). On several ranks, arrays and datasets give each
        rank its slice of every global batch (of ``ranks * batch_size``), except for
        ``predict`` (no targets), where every rank predicts everything; an iterable is each
        rank's own. ``checked`` arrays are parts of arrays (targets and all) that
        :func:`check_arrays` passed: they are not checked again. ``steps_name`` is what the
        caller calls ``steps``, for its errors. ``weights``: the arrays' sample weights (or
        None), checked unless ``checked``."""
        steps = check_source(x, y, steps, what, targets, steps_name)
        here = distributed.world()
        shard = (here.rank, here.size) if targets else (0, 1)
        if is_stream(x):
            if is_map_dataset(x):
                return DatasetBatches(self, x, batch_size, shuffle, seed, targets, what, shard)
            if is_keras_dataset(x):
                # (steps beyond its batches stay the source's, whose short pass stops fit)
                passes = KerasDatasetPasses(x, shuffle, seed, steps)
                x, steps = passes, None if steps is None or steps <= len(passes) else steps
            return IterableBatches(self, x, steps, targets, what)
        x, t = (x, y) if checked else check_arrays(self, x, y, what)
        if weights is not None and not checked:
            weights = check_sample_weights(self, weights, int(x.shape[0]),
                                           weights_name(what))
        return ArrayBatches(self.backend, x, t, batch_size, shuffle, seed, shard, weights)

    @contextlib.contextmanager
    def _undone_if_refused(self) -> Iterator[None]:
        """Around a call's set-up, up to its first step: where the call is refused (data that
        does not fit the model, a callback's refusal when training begins), the model is as
        it was (unbuilt if it was, see ``_unbuilt_if_refused``; its history). (A batch drawn
        from an iterator to build the model waits in the iterator's stream, for the next
        call: :class:`xpcnn.data.streams.IterableBatches`.)"""
        history = self.history
        with self._unbuilt_if_refused():
            try:
                yield
            except BaseException:
                self.history = history
                raise

    # -- fit, evaluate, predict -----------------------------------------------------------------
    @_prunes_streams
    @_in_one_thread("fit")  # (a second fit would replace the first one's History, position
    # and class weights, and end its data-parallel mode: Keras does not support it either)
    @_together("fit")
    def fit(self, x: Any, y: Any = None, *, epochs: int = 1, batch_size: int | None = 32,
            validation_data: Any = None, validation_split: float = 0.0, shuffle: bool = True,
            seed: int | None = None, verbose: int | str = 1,
            callbacks: list[Callback] | None = None,
            steps_per_epoch: int | None = None, validation_steps: int | None = None,
            checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int | str = "epoch",
            resume: bool = False, class_weight: Mapping[int, float] | None = None,
            sample_weight: Any = None, initial_epoch: int = 0,
            validation_batch_size: int | None = None,
            validation_freq: int | Collection[int] = 1) -> History:
        """Train for ``epochs`` passes over the data; returns the :class:`History`.

        The arguments after ``y`` are keyword-only: Keras' positional order (``batch_size``
        before ``epochs``) differs, and a positional call gets a TypeError, not another meaning
        (so are evaluate's after ``y`` and predict's after ``x``).

        ``x`` is images (N, H, W, C) (uint8 or float; NumPy, a memory map, or arrays of the model's
        library on its device) with ``y`` integer labels (N,) or one-hot rows (N, K); or a
        map-style dataset, or an iterable of ``(x, y)`` batches with ``steps_per_epoch``
        (:mod:`xpcnn.data`). ``validation_data`` is a pair of arrays or such a source
        (``validation_steps`` batches), or a triple (x_val, y_val, sample weights).
        ``validation_split`` (a fraction in (0, 1), with arrays only, not with
        ``validation_data``): the last part of the arrays, taken before shuffling, is the
        validation data, as in Keras. ``sample_weight`` (N,) (with arrays; a dataset or an iterable
        gives (x, y, w) items instead) and ``class_weight`` ({class index: weight}; a class left
        out weighs 1) weigh each sample's term of the training loss, which stays divided by the
        batch's size (Keras' "sum over batch size"); given both, a sample weighs their product, as
        in tf.keras 2. Accuracy is not weighted, and the validation loss only by the validation
        data's own weights. ``seed`` fixes the shuffling order (default: the model's seed); epochs
        are numbered on from the model's earlier fit calls, so that ``fit(epochs=1)`` called three
        times shuffles (and trains) as ``fit(epochs=3)``, not in one order thrice. ``batch_size``
        None is the default, 32 (as in Keras; evaluate's and predict's, 256). ``verbose=0``
        silences the progress bar; ``verbose=2`` prints a line an epoch instead. ``callbacks``: see
        :mod:`xpcnn.callbacks`. ``initial_epoch`` (as in Keras): the epoch to start at, numbered
        from 0, so that ``fit(epochs=5, initial_epoch=2)`` runs epochs 2, 3 and 4, each shuffled as
        it is in a run from 0 (a checkpoint resumed by ``resume=True`` starts where it stopped
        instead). ``validation_batch_size``: the validation data's batch size (default: the larger
        of ``batch_size`` and 256; inference needs no small batches). ``validation_freq`` (as in
        Keras 3): k validates only after every k-th epoch (epochs k, 2k, ... counted from 1), a
        collection such as ``[1, 5, 10]`` after those epochs; the other epochs' logs have no
        ``val_*`` metrics (their History lists are shorter: ``History.epochs_of``), and callbacks
        that monitor one skip those epochs.

        Launched on several processes (``mpiexec -n N``, :mod:`xpcnn.distributed`), each step
        takes a global batch of ``N * batch_size`` samples, the very batch one process would take
        at that size, and each rank computes on its own slice; only rank 0 prints and writes.

        ``checkpoint=PATH`` is short for ``callbacks=[BackupAndRestore(PATH, checkpoint_every,
        resume=resume, delete_checkpoint=False)]``: the whole training state at the end of every
        epoch (and every ``checkpoint_every`` steps when that is an int), kept when training ends;
        with ``resume=True`` a run continues from that file, exactly, and returns the history
        of every epoch. The layers' settings (Dropout's ``rate``, ReLU's ``max_value``...: see
        :func:`~xpcnn.layers.base.setting_names`) are then the file's, not those the code gives,
        so a callback's schedule of them resumes bit for bit (Keras' BackupAndRestore restores
        only the weights and the optimiser).

        A refused fit leaves the model as it was, and loses no batch of an iterator: the
        arguments are checked before any batch is drawn, and where the model is built from
        the first batch and then refused (validation data that does not fit it, a callback's
        refusal), the next call on that iterator starts with that batch.
        """
        self._require_compiled("fit")
        # (on several ranks, every check of fit's that may refuse on one rank alone, its
        # copy of the data say, is agreed on: the others otherwise waited for the timeout)
        with distributed.agreeing("fit's checks of its arguments",
                                  "fit (the checks of its arguments)"):
            # (an (x, y) pair as x)
            x, y, sample_weight = unpack_x_y(self, x, y, sample_weight)
            epochs = checks.non_negative_int(epochs, "epochs")
            initial_epoch = checks.non_negative_int(initial_epoch, "initial_epoch")
            # (None, as Keras takes it: the default)
            batch_size = checks.positive_int(32 if batch_size is None else batch_size,
                                             "batch_size")
            validation_batch_size = max(batch_size, 256) if validation_batch_size is None else \
                checks.positive_int(validation_batch_size, "validation_batch_size")
            validation_freq = parse_validation_freq(validation_freq)
            seed = self.seed if seed is None else checks.non_negative_int(seed, "seed")
            shuffle = checks.flag(shuffle, "shuffle")
            verbose = checks.verbosity(verbose)
            if not distributed.is_root():
                verbose = 0
            callbacks, backups, history, bar = self._fit_callbacks(
                callbacks, checkpoint, checkpoint_every, resume, verbose)
            check_fit_data(x, y, validation_data, validation_split, steps_per_epoch,
                           validation_steps, class_weight, sample_weight)
            if self._train_step_overridden():  # (before training: see _call_train_step)
                _check_takes_a_batch(self.train_step)
                if sample_weight is not None:
                    _check_takes_sample_weight(self.train_step)
        self._rebuild_if_shared()
        with self._undone_if_refused():
            with distributed.agreeing("fit's checks of its data",
                                      "fit (the checks of its data)"):
                # (before the data builds the model)
                self._statistics_from_checkpoint(backups)
                x, y, sample_weight, validation_data, split = self._split_validation(
                    x, y, sample_weight, validation_data, validation_split)
                data = self._batches(x, y, batch_size, steps_per_epoch, shuffle=shuffle,
                                     seed=seed, checked=split, weights=sample_weight)
                # (built by now)
                self._check_loss_outputs(self.loss)  # type: ignore[arg-type]
                x_val, y_val, w_val = (None, None, None) if validation_data is None else \
                    validation_triple(validation_data)
                validation = None if validation_data is None else self._batches(
                    x_val, y_val, validation_batch_size, validation_steps, "x_val",
                    checked=split, steps_name="validation_steps", weights=w_val)
                class_weights = None if class_weight is None else checks.as_class_weights(
                    class_weight, self.num_classes, self.dtype_name)
                if class_weights is not None:
                    self._check_class_products(data, class_weights)
            self.history = history
            # (shared by the callbacks, which keep it: the source and the stateful callbacks
            # are taken out when fit ends, so that model.history does not keep the user's
            # iterator (and its pending batches, a DataLoader's workers) alive, as Keras'
            # History.params holds no data)
            params = {"epochs": epochs, "initial_epoch": initial_epoch, "steps": data.steps,
                      "verbose": verbose, "data": data, "validation": validation is not None,
                      "validation_freq": validation_freq, "class_weight": class_weights,
                      "stateful": stateful(callbacks),  # (whose states checkpoints keep)
                      # (whose files checkpoints record: a resumed run drops later rows)
                      "csv_loggers": [cb for cb in callbacks if isinstance(cb, CSVLogger)]}
            cbs = CallbackList(callbacks, self, params)
            _warn_if_the_schedule_ends_in_an_epoch(self.optimizer, data.steps,
                                                   epochs - initial_epoch)
            self.stop_training, self._resume_at = False, None
            # (a checkpoint resumed by on_train_begin puts back its run's offset instead)
            self._epoch_offset = max(0, self._epochs_begun - initial_epoch)
            self._parallel = distributed.data_parallel(self)
            self._use_class_weights(class_weights)
            # (a user's History records this fit alone, as fit's own one; a refused fit gives
            # it back its record: an earlier fit's)
            record = history.epoch, history.history, history.sparse
            history.epoch, history.history, history.sparse = [], {}, {}
            try:
                if self._parallel is not None:
                    self._parallel.check_same_layers()
                    self._parallel.check_same_data(
                        data, validation, class_weights, distributed.fit_arguments(
                            epochs, initial_epoch, steps_per_epoch, validation_steps,
                            validation_freq, [cb for cb in callbacks
                                              if cb is not history and cb is not bar], seed,
                            _written_files(callbacks)))
                    self._parallel.broadcast_weights()
                if initial_epoch < epochs:
                    self._refuse_unready(data, initial_epoch, resuming=any(
                        cb.resume and os.path.exists(cb.path) for cb in backups))
                self._callbacks_begin(cbs)
            except BaseException:
                history.epoch, history.history, history.sparse = record
                self._end_fit()
                drop_sources(params)
                raise
        try:
            return self._fit_epochs(data, validation, cbs, params, epochs, initial_epoch)
        finally:
            drop_sources(params)

    @staticmethod
    def _fit_callbacks(callbacks: list[Callback] | None,
                       checkpoint: str | os.PathLike[str] | None, checkpoint_every: int | str,
                       resume: bool, verbose: int
                       ) -> tuple[list[Callback], list[BackupAndRestore], History,
                                  ProgbarLogger | None]:
        """fit's callbacks, in the order they run, with their BackupAndRestore (one at most:
        the user's or ``checkpoint=PATH``'s), History and ProgbarLogger (None at ``verbose``
        0 where the user gave none); the user's ``callbacks`` are left as they are."""
        # Keras' order: the History and the progress bar after the user's callbacks, so they
        # see the logs those add (learning_rate, a user's metric); BackupAndRestore last, so
        # that its checkpoint holds the History of the epoch just done.
        callbacks = [*callback_list(callbacks),
                     *checkpoint_callback(checkpoint, checkpoint_every, resume)]
        backups = [cb for cb in callbacks if isinstance(cb, BackupAndRestore)]
        if len(backups) > 1:  # (refused before any restores its file into the model)
            raise InputError(f"fit takes one BackupAndRestore (checkpoint=PATH counts as one), "
                             f"got {len(backups)}: for "
                             f"{', '.join(repr(os.fspath(cb.path)) for cb in backups)}")
        # (a History or ProgbarLogger among the user's is fit's own, as in Keras 3: one record
        # and one bar, the bar at fit's verbose; run where fit's own would, after the others)
        users = [cb for cb in callbacks if cb not in backups]
        history = one_of(users, History) or History()
        bar = _progress_bar(users, verbose, "fit")
        ordered = [*(cb for cb in users if cb is not history and cb is not bar), history,
                   *([bar] if bar is not None else []), *backups]
        check_own_files(ordered)  # (before fit reads a checkpoint's statistics: a CSV log?)
        return ordered, backups, history, bar

    def _statistics_from_checkpoint(self, backups: list[BackupAndRestore]) -> None:
        """Where fit resumes from a checkpoint into an unbuilt model, make adapted each plain
        ``Normalization()`` (neither adapted in this run nor given statistics) whose layer in
        the checkpoint is, as ``load_weights`` does (:func:`adapt_to_file`): the model is built
        from the data before the checkpoint is read, which such a layer would refuse, and the
        checkpoint then restores its statistics as it restores every weight (Keras'
        BackupAndRestore). A refused fit puts the layer back (``_undone_if_refused``)."""
        resumed = [cb for cb in backups if cb.resume and os.path.exists(cb.path)]
        if self.built or not resumed or not any(
                isinstance(la, Normalization) and not la.adapted and la.mean is None
                for la in self.layers):
            return
        with NpzArchive(resumed[0].path, "the checkpoint") as npz:
            adapt_to_file(self, checkpoint_config(npz).get("model"))

    def _fit_epochs(self, data: Batches, validation: Batches | None, cbs: CallbackList,
                    params: dict[str, Any], epochs: int, initial_epoch: int) -> History:
        """fit's epochs, once its callbacks began, then ``on_train_end``."""
        start, parallel = self._resume_at, self._parallel
        logs: dict[str, float] = {}  # (the last epoch's, for on_train_end, as in Keras)
        first_epoch = start.epoch if start else initial_epoch
        try:
            with cbs.interruptible():
                for epoch in range(first_epoch, epochs):
                    trained = self._fit_epoch(epoch, data, cbs, start if start and
                                              start.epoch == epoch else None,
                                              later=epoch > first_epoch)
                    if trained is None:  # (an iterator that ran out as the last epoch ended:
                        break  # this one has no logs, no History entry; warned)
                    logs = trained
                    if self._parallel is not None:
                        self._parallel.average_state()
                    # (an epoch whose validation gave nothing is, for the callbacks, one without
                    # validation, as validation_freq leaves some: _Monitor._epoch_validated)
                    self._epoch_validated = False
                    if validates(params, epoch):
                        val = self._evaluate(validation, cbs, self.loss, epoch=epoch)
                        logs.update({f"val_{name}": value for name, value in val.items()})
                        self._epoch_validated = bool(val)
                    logs["seconds"] = time.perf_counter() - self._epoch_t0
                    cbs.on_epoch_end(epoch, logs)
                    ctrl_c.raise_if_dropped()  # (one dropped in validation or a callback)
                    if self.stop_training if parallel is None else parallel.agreed_stop():
                        break
        except NonFiniteError as error:
            # (on several ranks, one raised on every rank alike (a step's, agreed) may end fit
            # quietly (TerminateOnNaN); a rank's own (a NaN in its data) is raised, which ends
            # fit on every rank at once: ended on that rank alone, the others waited for it in
            # their next step until the timeout)
            agreed = parallel is None or getattr(error, "on_every_rank", False)
            if not agreed or not cbs.on_non_finite(error):
                raise
            if parallel is not None:  # (ended inside an epoch, whose end averages them: the
                parallel.average_state()  # ranks kept their own BatchNorm statistics)
        finally:
            self._end_fit()
        self._callbacks_end(cbs, logs, parallel)
        return self.history

    def _callbacks_begin(self, cbs: CallbackList) -> None:
        """``on_train_begin``; on several ranks, each learns whether it failed on any (one
        refusing a path that only rank 0 checks then fails on all, at once)."""
        if self._parallel is None:
            cbs.on_train_begin()
            return
        error = None
        try:
            cbs.on_train_begin()
        except Exception as e:  # (raised again on this rank, after the others learn of it)
            error = e
        self._parallel.agree(error, "the callbacks' on_train_begin")
        # (a checkpoint that rank 0 alone finds, on a node-local disk: refused before a step)
        self._parallel.check_same_start(self._resume_at, [
            cb.path for cb in cbs.callbacks if isinstance(cb, BackupAndRestore)])

    def _callbacks_end(self, cbs: CallbackList, logs: dict[str, float],
                       parallel: distributed.DataParallel | None) -> None:
        """``on_train_end``; on several ranks (``parallel``), each learns whether it failed on
        any (failing on one alone, it left the others' fit returning, and their next exchange
        waiting for that rank until the timeout)."""
        if parallel is None:
            cbs.on_train_end(logs)
            return
        error = None
        try:
            cbs.on_train_end(logs)
        except Exception as e:  # (raised again on this rank, after the others learn of it)
            error = e
        parallel.agree(error, "the callbacks' on_train_end")

    def _end_fit(self) -> None:
        """What fit set up for its steps ends with it: its class weights (steps outside fit
        take none) and the data-parallel mode (:mod:`xpcnn.distributed`), if it is in it."""
        self._class_weights = None
        self._epoch_validated = None
        if self._parallel is not None:
            self._parallel.end_fit()
            self._parallel = None

    def _fit_epoch(self, epoch: int, data: Batches, cbs: CallbackList, start: Any,
                   later: bool = False) -> dict[str, float] | None:
        """One pass of training steps (from ``start``, a checkpoint's position, when resuming
        inside this epoch); returns the epoch's loss and metrics, or None where an iterator
        that trained in an earlier epoch of this fit (``later``) has no batch left: it ran out
        as that epoch ended, and training stops there (warned, as Keras 3 does), before this
        epoch's ``on_epoch_begin`` (an epoch begun ends: a schedule would set the rate of an
        epoch that never trains, the progress bar would stay open)."""
        if later and isinstance(data, IterableBatches) and data.iterator is not None and \
                not self._has_batch(data, epoch):
            warn(f"the training data ran out as epoch {epoch} ended (no batch in epoch "
                 f"{epoch + 1}, of its {data.steps} (steps_per_epoch)): training stops "
                 f"after epoch {epoch}; an iterator needs steps_per_epoch batches for every "
                 "epoch")
            self.stop_training = True
            return None
        step = first = start.step if start else 0
        parallel = self._parallel
        self._position = (epoch, step)
        self._epoch_t0 = time.perf_counter() - (start.seconds if start else 0.0)
        self._running_totals().reset(*((start.loss_sum, start.correct, start.seen, start.top_k)
                                       if start else ()))
        self._top_k_from = 0.0
        factor = self.optimizer.lr_factor  # type: ignore[union-attr]
        cbs.on_epoch_begin(epoch)
        if step:  # (resumed inside this epoch: the checkpoint's learning rate is the one this
            # epoch's on_epoch_begin set; a schedule of the rate must not apply it twice)
            self.optimizer.lr_factor = factor  # type: ignore[union-attr]
        logs = BatchLogs(cbs.lazy_train)
        number = self._epoch_offset + epoch  # (its shuffling order's)
        # (the batches drawn on the model's device; each step in the compute scope, the
        # callbacks outside it, as evaluate's and predict's: the user's code there keeps its
        # NumPy warnings and OpenBLAS threads, which the scope changes while xpcnn computes)
        with self.backend.on_device(), contextlib.closing(
                data.epoch(number, step)) as batches:  # type: ignore[type-var]
            for batch in batches:
                logs.settle()  # (last batch's logs, if a callback kept them: before this step)
                xb, yb, wb = unpack(batch)
                cbs.on_train_batch_begin(step)
                self._fit_step_of(batches, data, step, xb, yb, wb)
                step += 1
                self._position = (epoch, step)
                self._epochs_begun = number + 1  # (one that trained no step, refused, is not)
                ctrl_c.raise_if_dropped()
                if parallel is None:
                    cbs.on_train_batch_end(step - 1, logs.make(self._batch_logs))
                    if self.stop_training:
                        break
                    continue
                # (on several ranks, a non-finite step found by a read on this rank alone,
                # the progress bar's, or kept logs', is raised on every rank at the agreement,
                # every rank running every callback: one that saves on all too)
                batch_logs = logs.make(self._batch_logs)
                for cb in cbs.callbacks:
                    with parallel.holding_non_finite():
                        cb.on_train_batch_end(step - 1, batch_logs)
                with parallel.holding_non_finite():
                    logs.settle()
                # (stop_training, on several ranks set on any: every rank stops at this step)
                if parallel.agreed_stop():
                    break
            logs.settle()
        if self._parallel is not None and data.place(first) is None:
            # (an iterable on several ranks: each batch's sizes were exchanged; a rank whose
            # batches ended tells the others, which would wait for it until the timeout)
            self._parallel.end_batches(step - first, epoch)
        # (a checkpoint written after the epoch's last step, as ModelCheckpoint's save_freq
        # may write it, resumes at the epoch's end: no step is left)
        if step == first and not (first and first == data.steps):
            raise InputError(f"the training data gave no batches in epoch {epoch + 1}: an "
                             "iterator needs steps_per_epoch batches for every epoch")
        if data.steps and step < data.steps and not self.stop_training:
            if reads_iterator(data):  # (ran out inside the epoch: the next would give none)
                warn(f"the training data ran out after {step} of its {data.steps} batches "
                     f"(steps_per_epoch) in epoch {epoch + 1}: training stops here; an "
                     "iterator needs steps_per_epoch batches for every epoch")
                self.stop_training = True
            else:  # (a DataLoader, say: the next epoch is a new pass over it, as in Keras 3)
                warn(f"the training data gave {step} of its {data.steps} batches "
                     f"(steps_per_epoch) in epoch {epoch + 1}: the epoch ends there, and the "
                     "next starts a new pass over it")
        if parallel is None:
            return self._batch_logs()
        try:  # (every rank reads here: a non-finite step is named alike on all)
            return self._batch_logs()
        except (NonFiniteError, InputError) as error:
            parallel.agree_non_finite(error)

    def _fit_step_of(self, batches: Iterator[Any], data: Batches, step: int, xb: Any, yb: Any,
                     wb: Any) -> None:
        """:meth:`_fit_step` in the compute scope on the batch fit's loop took from
        ``batches``, which an iterator's epoch closed by an error (a Ctrl-C) gives back where
        the step raised before it ran on the device: no batch is lost, none trained twice."""
        opt = self.optimizer
        assert opt is not None
        count, seen = opt.iterations, self._seen()
        try:
            with compute_scope(self.backend):
                self._fit_step(data, step, xb, yb, wb)
        except BaseException:
            # (it ran where the optimiser counted its update, or the running totals its
            # samples: its update skipped as non-finite, a read of the totals then setting the
            # count back to the last good step's)
            if opt.iterations > count or self._seen() > seen:
                step_ran(batches)
            raise
        step_ran(batches)

    def _seen(self) -> float:
        """The samples of the training steps recorded in the running totals (0 before any)."""
        return 0.0 if self._totals is None else self._totals.seen

    def _fit_step(self, data: Batches, step: int, xb: Any, yb: Any, wb: Any) -> None:
        """fit's training step ``step`` of its epoch on the batch (xb, yb, weights wb), inside
        the backend's compute scope."""
        if self._parallel is not None:  # this rank's place in the global batch
            place = data.place(step)
            if place is None:  # (asked of the other ranks: a host allreduce)
                self._parallel.set_batch(int(xb.shape[0]))
            else:
                self._parallel.use_slice(*place)
        if self._train_step_overridden():
            seen = self._running_totals().seen
            out = self._call_train_step(xb, yb, wb)
            if self._running_totals().seen == seen:  # (it recorded no step itself)
                self._record_returned(out, xb)
        else:  # (fit made and checked this batch: train_step's checks would repeat)
            self._train_step(xb, yb, keep=False, weights=wb)

    def _refuse_unready(self, data: Batches, epoch: int, resuming: bool = False) -> None:
        """Refuse, before any callback runs (an epoch begun and never ended set a schedule's
        rate, and lost the last fit's History), an iterator that has no batch for fit's
        first epoch, ``epoch``, and a map-style dataset whose first batch of it the checks
        refuse: that batch, drawn or read here, waits for the epoch. Not a dataset's where
        the fit ``resuming`` from a checkpoint learns where it starts only as the callbacks
        begin (its batches are checked as they are read). On several ranks, all learn where
        one fails (the exchange made where this rank skips the read too: ``resuming`` is
        each rank's own finding of a file, which check_same_start compares)."""
        dataset = isinstance(data, DatasetBatches)
        if not (dataset or isinstance(data, IterableBatches) and data.iterator is not None):
            return
        error: BaseException | None = None
        try:
            if dataset:  # (the shuffling number of the epoch, as _fit_epoch counts it)
                if not resuming:
                    data.read_first(self._epoch_offset + epoch)  # type: ignore[union-attr]
            elif not data.has_batch():  # type: ignore[union-attr]
                error = InputError(f"the training data gave no batches in epoch {epoch + 1}: "
                                   "an iterator needs steps_per_epoch batches for every epoch")
        except Exception as e:  # (the data's own error, or the checks': raised after the
            error = e  # others learn it)
        if self._parallel is not None:
            self._parallel.agree(error, "drawing the training data's first batch")
        elif error is not None:
            raise error

    def _has_batch(self, data: IterableBatches, epoch: int) -> bool:
        """Whether the iterator ``data`` reads has a batch for ``epoch`` (drawn here, it waits
        for the epoch); on several ranks, where this one has none, the others learn it in the
        exchange of the batch sizes (``end_batches``: refused on all where some have more)."""
        if self._parallel is None:
            return data.has_batch()
        error, has = None, False
        try:  # (an error of one rank's iterator: every rank learns it, none waits for it)
            has = data.has_batch()
        except Exception as e:  # noqa: BLE001 (raised again on this rank, by agree)
            error = e
        self._parallel.agree(error, f"drawing the first batch of epoch {epoch + 1}")
        if not has:
            self._parallel.end_batches(0, epoch)
        return has

    def _record_returned(self, out: Any, xb: Any) -> None:
        """Add the (loss, correct count) that a subclass's ``train_step`` returned to the
        epoch's totals, where it recorded no step itself (no ``super().train_step``): fit
        logs what it returns, as Keras 3 does, never a 0 for no data."""
        what = "this model's train_step (which did not call super().train_step)"
        try:  # (a pair, or any two numbers that unpack, as train_on_batch takes)
            if isinstance(out, Mapping | str):  # (Keras' dict of logs: its keys)
                raise TypeError
            loss, correct = out
        except (TypeError, ValueError):
            raise InputError(f"fit logs what {what} returns: the batch's (loss, correct count) "
                             f"as numbers or 0-d arrays on the model's device; it returned "
                             f"{type(out).__name__} {out!r:.80}") from None
        if self._top_ks or self._parallel is not None:
            tops = [m.name for m in self._metric_objects if getattr(m, "k", None)]
            why = (f"the compiled top-k metrics {tops}" if self._top_ks else
                   "a data-parallel fit (the numbers of the global batch)")
            raise InputError(f"{what} returned its own (loss, correct count), which does not "
                             f"give {why}: return super().train_step(xb, yb, "
                             "sample_weight=sample_weight) from it")
        totals, xp = self._running_totals(), self.backend.xp
        parts = []
        for name, v in (("loss", loss), ("correct count", correct)):
            if isinstance(v, numbers.Real):
                parts.append(self.backend.asarray([float(v)], dtype=totals.dtype))
                continue
            check_on_device(v, self.backend, f"the {name} that {what} returned",
                            instead="a Python number or ")
            if math.prod(v.shape) != 1:
                raise InputError(f"the {name} that {what} returned has shape "
                                 f"{tuple(v.shape)}: expected one number (a 0-d array)")
            parts.append(xp.reshape(xp.astype(v, totals.dtype), (1,)))
        totals.add_stats(xp.concat(parts), int(xb.shape[0]))

    def _batch_logs(self) -> dict[str, float]:
        """The epoch's running loss and metrics (waits for the device): over every training
        step since the epoch began, those of a callback's ``train_on_batch`` too, as in Keras,
        and those a subclass's ``train_step`` returned where it recorded none
        (:meth:`_record_returned`); a top-k metric that a callback's compile added in the
        epoch, over the samples since then (its counts begin there)."""
        totals = self._running_totals()  # (first: the metrics compiled now)
        sums, seen = self._read_totals(), totals.seen or 1.0
        since = (totals.seen - self._top_k_from) or 1.0
        return self._logs_of([sums[0] / seen, sums[1] / seen, *(s / since for s in sums[2:])])

    def _epoch_sums(self) -> tuple[float, float, float, float, list[float]]:
        """(loss sum, correct count, samples seen, start time, top-k counts) of the epoch in
        progress, as a checkpoint stores them (waits for the device); a top-k metric's that
        compile added in the epoch, scaled to all the samples seen (its share so far: the
        resumed epoch counts it from the epoch's start)."""
        totals = self._running_totals()
        loss_sum, correct, *top_k = self._read_totals()
        scale = totals.seen / ((totals.seen - self._top_k_from) or 1.0)
        return loss_sum, correct, totals.seen, self._epoch_t0, [c * scale for c in top_k]

    def _split_validation(self, x: Any, y: Any, w: Any, validation_data: Any,
                          validation_split: float) -> tuple[Any, Any, Any, Any, bool]:
        """(x, y, sample weights, validation data, split): with a ``validation_split``, the
        arrays x and y (and weights w) are checked as a whole, then their last part is the
        validation data; else as given."""
        if not validation_split:
            return x, y, w, validation_data, False
        x, targets = check_arrays(self, x, y)
        n = int(x.shape[0])
        w = None if w is None else check_sample_weights(self, w, n)
        n_val = n - math.floor(n * (1.0 - validation_split))  # (Keras' split point)
        if n_val < 1 or n_val >= n:
            raise InputError(f"validation_split={validation_split} leaves no training or no "
                             f"validation samples out of {n}")
        head, tail = (None, None) if w is None else (w[:-n_val], w[-n_val:])
        return (x[:-n_val, ...], targets[:-n_val], head,
                (x[-n_val:, ...], targets[-n_val:], tail), True)

    @_prunes_streams
    @_together("evaluate")
    def evaluate(self, x: Any, y: Any = None, batch_size: int | None = 256,
                 verbose: int | str = 0, *,
                 steps: int | None = None, callbacks: list[Callback] | None = None,
                 return_dict: bool = False, sample_weight: Any = None
                 ) -> float | list[float] | dict[str, float]:
        """``[loss, accuracy]``, their means on (x, y) (or a dataset or iterable of batches), in
        inference mode (as in Keras: ``loss, acc = model.evaluate(x, y)``; the loss alone for a
        model compiled without metrics, a dict with ``return_dict``); an uncompiled model is
        evaluated with the default loss and metrics (and stays uncompiled).
        ``sample_weight`` (N,) (with arrays; a dataset or an iterable gives (x, y, w) items
        instead) weighs each sample's term of the loss (the sum still divided by N), not the
        accuracy, as fit's does. ``batch_size`` and ``verbose`` may be positional, in Keras'
        order; the rest are keyword-only (Keras' next is ``sample_weight``, xpcnn's ``steps``)."""
        x, y, sample_weight = unpack_x_y(self, x, y, sample_weight, call="evaluate")
        batch_size = checks.positive_int(256 if batch_size is None else batch_size,
                                         "batch_size")
        return_dict = checks.flag(return_dict, "return_dict")
        verbose = checks.verbosity(verbose)
        callbacks = _with_progress_bar(callback_list(callbacks), verbose, "evaluate")
        loss = self.loss if self.loss is not None else get_loss("cross_entropy")
        self._rebuild_if_shared()
        refuse_stream_weights(x, sample_weight)
        with self._undone_if_refused():
            with distributed.agreeing("evaluate's checks of its data",
                                      "evaluate (the checks of its data)"):
                data = self._batches(x, y, batch_size, steps, steps_name="steps",
                                     weights=sample_weight)
            here = distributed.world()
            if self._parallel is not None:  # (inside fit, from a callback: each rank's
                self._parallel.average_state()  # BatchNorm statistics of its own slices, as
                # at an epoch's end, every rank being here; linear, so the epoch ends alike)
            if here.size > 1:  # (each rank evaluates its slice of the same data)
                distributed.refuse_different_data(here, [("evaluation", data)], "evaluate",
                                                  model=self)  # (and the weights)
            # (a user's bar too takes evaluate's verbose from these params, as in Keras 3)
            cbs = CallbackList(callbacks, self, inference_params(verbose, data))
            self._check_loss_outputs(loss)
            with cbs.closing_bars():
                logs = self._evaluate(data, cbs, loss)
            if not math.isfinite(logs["loss"]) and self.precision == "mixed_float16":
                # (once a call, from the sums read at its end: no host read a batch, nor
                # which layer's output overflowed: any of them, the logits or one before)
                warn(f"evaluate's loss is {logs['loss']} under precision 'mixed_float16': "
                     "where the data and weights are finite, float16 outputs beyond float16's "
                     "largest value, 65504, overflowed somewhere in the model, in the logits or "
                     "any layer before them (predict warns of its NaN rows; fit's error names "
                     "the layer); compile with precision='mixed_bfloat16' (float32's range) or "
                     "'float32'")
            return self._returned(logs, return_dict)

    def _evaluate(self, data: Batches, cbs: CallbackList, loss: SoftmaxCrossEntropy | None,
                  epoch: int | None = None) -> dict[str, float]:
        """Mean ``loss`` and metrics of ``data``; ``epoch``: fit's, when it is the validation
        data (its progress bar, a ProgbarLogger among ``cbs``, shows none then). A callback's
        ``model.stop_evaluating = True`` ends it after the current batch, as in Keras 3: the
        means are those of the batches seen (on several ranks, set on any, it ends every
        rank's after the same batch)."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        totals, steps = RunningTotals(self.backend, 0, len(self._top_ks)), 0
        logs = BatchLogs(cbs.lazy_test)
        here = distributed.world()
        # (on several ranks, where a callback may set stop_evaluating on any rank, the ranks
        # agree on it after every batch: set on one alone, deciding on that rank's own
        # running means, its prefix of the batches was summed with the others' whole passes;
        # no exchange a batch where no callback has a test hook, a progress bar's aside)
        agreeing = here.size > 1 and distributed.any_rank(
            here, _may_stop_evaluating(cbs.callbacks),
            "evaluate (whether a callback may stop it)" if epoch is None else
            "fit (whether a callback may stop the validation)")
        agreement = "evaluate (the agreement to stop)" if epoch is None else \
            "fit (the validation's agreement to stop)"
        stopped = False  # (this rank's batches ended by a stop, not run out)
        self.stop_evaluating = False
        cbs.on_test_begin()
        # (each batch in the compute scope, the callbacks outside it: see _fit_epoch; a
        # Ctrl-C Python drops raised again, as in fit)
        with ctrl_c.remembered(), self.backend.on_device(), contextlib.closing(
                data.epoch(0)) as batches:  # type: ignore[type-var]
            for step, batch in enumerate(batches):
                logs.settle()  # (last batch's logs, if a callback kept them: before this)
                steps = step + 1
                xb, yb, wb = unpack(batch)
                if xb.shape[0]:  # (not this rank's empty part of a short batch)
                    cbs.on_test_batch_begin(step)
                    with compute_scope(self.backend):
                        logits = self._logits(xb, False, in_scope=True)
                        stats, _ = loss.forward_with_accuracy(  # type: ignore[union-attr]
                            xp, logits, yb, self._param_dtype, kernels, weights=wb)
                        totals.add_stats(self._with_top_k(stats, logits, yb),
                                         int(xb.shape[0]))
                    step_ran(batches)  # (counted: an iterator's epoch closed now keeps it)
                    # (this rank's running means, as Keras' batch logs)
                    cbs.on_test_batch_end(step, logs.make(
                        lambda seen=totals.seen: self._running_logs(totals, seen)))
                else:  # (no hook for this rank's empty part, but its bar counts the batch)
                    cbs.count_on_bars()
                ctrl_c.raise_if_dropped()
                if agreeing and distributed.agree_to_stop_evaluating(
                        here, self.stop_evaluating, False, agreement)[0]:
                    self.stop_evaluating = True
                if self.stop_evaluating:
                    stopped = True
                    break
            logs.settle()
        while agreeing and not stopped:  # (this rank's batches ran out: it agrees with
            # those whose iterables have more, after each of their batches, until they end
            # or stop)
            stop, ended = distributed.agree_to_stop_evaluating(here, False, True, agreement)
            if stop:
                self.stop_evaluating = True
            if stop or ended:
                break
        host, _ = totals.read()
        # on several ranks, each evaluated its slices: the sums are added up over the
        # ranks, and with them whether each ran out, after how many batches, so that all
        # decide alike (one alone stopping training left the others waiting)
        short, counts = [0.0] * here.size, [0.0] * here.size
        short[here.rank] = float(bool(data.steps) and steps < data.steps and not stopped)
        counts[here.rank] = float(steps)
        got = distributed.host_sum(
            here, [*totals.sums(host), totals.seen, *short, *counts],
            "evaluate (its sums)" if epoch is None else "fit (the validation's sums)",
            tagged=True)
        k = len(got) - 2 * here.size - 1
        sums, seen = got[:k], got[k]
        ran_out = [r for r in range(here.size) if got[k + 1 + r]]
        counts = got[k + 1 + here.size:]
        # (none at all, from anything but fit's validation iterator: refused below)
        if ran_out and (seen or epoch is not None and reads_iterator(data)):
            warn_ran_out(data, int(min(counts[r] for r in ran_out)), epoch, bool(seen),
                         ran_out if here.size > 1 else None)
            if epoch is not None and reads_iterator(data):  # (the next epoch's would get none)
                self.stop_training = True
        if not seen:
            # (the epoch keeps its training logs)
            if epoch is not None and reads_iterator(data):
                cbs.on_test_end({})
                return {}
            raise InputError("the evaluation data gave no batches" if epoch is None else
                             f"the validation data gave no batches in epoch {epoch + 1}")
        result = self._logs(sums, seen)
        cbs.on_test_end(result)
        return result

    def _running_logs(self, totals: RunningTotals, seen: float) -> dict[str, float]:
        """The running loss and metrics of ``seen`` samples in ``totals`` (waits for the
        device)."""
        return self._logs(totals.sums(self.backend.to_numpy(totals.state)), seen)

    def test_on_batch(self, x: Any, y: Any, sample_weight: Any = None,
                      return_dict: bool = False) -> float | list[float] | dict[str, float]:
        """:meth:`evaluate` of one batch of arrays, as Keras' ``test_on_batch``."""
        return self.evaluate(x, y, batch_size=batch_length(self, x), sample_weight=sample_weight,
                             return_dict=return_dict)

    def predict_on_batch(self, x: Any) -> np.ndarray:
        """:meth:`predict` of one batch of arrays, as Keras' ``predict_on_batch``."""
        return self.predict(x, batch_size=batch_length(self, x))

    @_prunes_streams
    def predict(self, x: Any, batch_size: int | None = 256, verbose: int | str = 0, *,
                steps: int | None = None, callbacks: list[Callback] | None = None) -> np.ndarray:
        """The model's output for ``x`` as a host NumPy array, as in Keras: class
        probabilities (N, classes) for a model that ends in a Softmax or a softmax activation
        (applied to the logits the plan stops at), any other model's output as it is
        (logits, an inner layer's features); ``x`` as for :meth:`evaluate` (targets, if any,
        are ignored); ``verbose=1`` shows a progress bar (Keras' ``predict(x, verbose=0)``
        works as it is); ``batch_size`` and ``verbose`` may be positional, as in Keras. As in
        PyTorch and Keras, a row's last bits may differ with ``batch_size`` (by a unit in the
        last place or so: the matrix products sum in another order for another shape)."""
        x, _, _ = unpack_x_y(self, x, None, None, targets=False)  # (an (x, y) pair: y ignored)
        batch_size = checks.positive_int(256 if batch_size is None else batch_size,
                                         "batch_size")
        verbose = checks.verbosity(verbose)
        callbacks = _with_progress_bar(callback_list(callbacks), verbose, "predict")
        self._rebuild_if_shared()
        xp = self.backend.xp
        out = []
        with self._undone_if_refused():
            data = self._batches(x, None, batch_size, steps, targets=False, steps_name="steps")
            cbs = CallbackList(callbacks, self, inference_params(verbose, data))
            self.stop_predicting = False
            # (the bar closed as the batches end, however they end)
            with cbs.closing_bars():
                cbs.on_predict_begin()
                # (each batch in the compute scope, the callbacks outside it: see _fit_epoch;
                # a Ctrl-C Python drops raised again, as in fit)
                with ctrl_c.remembered(), self.backend.on_device(), contextlib.closing(
                        data.epoch(0)) as batches:  # type: ignore[type-var]
                    for step, (xb, _) in enumerate(batches):
                        cbs.on_predict_batch_begin(step)
                        with compute_scope(self.backend):
                            out.append(self._outputs(xb))
                        step_ran(batches)  # (its rows made: an epoch closed now keeps it)
                        cbs.on_predict_batch_end(step, {"outputs": out[-1]})  # (on the device)
                        ctrl_c.raise_if_dropped()
                        if self.stop_predicting:  # (a callback's, as in Keras 3: the rows so far)
                            break
                    if not out:  # (as evaluate says)
                        raise InputError("the prediction data gave no batches")
                    with compute_scope(self.backend):  # (one batch: no copy to join it)
                        outputs = self.backend.to_numpy(out[0] if len(out) == 1 else
                                                        xp.concat(out))
        cbs.on_predict_end()
        if self.precision == "mixed_float16" and not np.isfinite(outputs).all():
            # (data checked finite before the pass: a float16 overflow inside, which gave NaN
            # rows silently; read on the host copy, which predict makes anyway)
            bad = np.flatnonzero(~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1))
            warn(f"predict's outputs hold NaN or infinity in {len(bad)} of {len(outputs)} "
                 f"rows (the first, row {bad[0]}) under precision 'mixed_float16': float16 "
                 "outputs beyond its largest value, 65504, overflowed somewhere in the model "
                 "(fit's error names the layer); compile with precision='mixed_bfloat16' "
                 "(float32's range) or 'float32'")
        return outputs

    def _outputs(self, xb: Any) -> Any:
        """The model's outputs for a device batch, as :meth:`predict` gives them, on the
        device (inside the caller's compute scope)."""
        z = self._logits(xb, training=False, in_scope=True)
        if self._fused_softmax():  # (one launch on CuPy, cast included: a new array)
            return kernels_for(self.backend).softmax(z, self._param_dtype)
        # (a copy even where the dtype is the same: a model of views alone, a Flatten, would
        # give the caller's own input back)
        return self.backend.xp.astype(z, self._param_dtype)

    def _outputs_of_batch(self, x: Any) -> Any:
        """``model(x)`` on one batch of arrays: :meth:`predict_on_batch`'s outputs, left on the
        model's device in its namespace (as Keras' ``model(x)`` gives a backend tensor and
        PyTorch's a tensor): checked, cast and moved as predict's batches are."""
        if is_stream(x):
            raise InputError(f"model(x) runs the model on one batch of arrays, got "
                             f"{type(x).__name__}; predict(x) reads datasets and iterables")
        self._rebuild_if_shared()
        with self._undone_if_refused():
            data = self._batches(x, None, batch_length(self, x), None, targets=False,
                                 steps_name="steps")
            with compute_scope(self.backend), contextlib.closing(data.epoch(0)) as batches:
                out = [self._outputs(xb) for xb, _ in batches]
        return out[0] if len(out) == 1 else self.backend.xp.concat(out)
