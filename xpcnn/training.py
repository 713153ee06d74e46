"""Trainer: compile, fit, evaluate, predict and the training step, for :class:`xpcnn.Model`.

As in Keras 3 (``class Model(Trainer, Layer)``), the training machinery is a base class of the
model: :class:`Trainer` holds what training adds to a network (the loss, the optimiser, the
precision, the running totals, the captured CUDA graphs) and reaches the network only through
the hooks that :class:`~xpcnn.model.Model` defines (listed in :class:`Trainer`'s docstring).

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
import inspect
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import checks, distributed
from . import metrics as metric_settings
from .backend import Backend
from .callbacks import (
    BackupAndRestore,
    BatchLogs,
    Callback,
    CallbackList,
    History,
    ProgbarLogger,
    bar_postfix,
    callback_list,
    is_save_freq,
    say_on_root,
    stateful,
    summary_line,
    validates,
)
from .cuda_graphs import StepGraphs
from .cuda_graphs import blockers as graph_blockers
from .data import (
    ArrayBatches,
    Batches,
    DatasetBatches,
    IterableBatches,
    check_arrays,
    check_on_device,
    check_real_images,
    check_sample_weights,
    check_source,
    is_map_dataset,
    is_stream,
    prune_streams,
    to_device,
    unpack,
)
from .errors import InputError, NonFiniteError, warn
from .layers.base import Layer, RandomLayer
from .losses import SoftmaxCrossEntropy, get_loss
from .ops.kernels import kernels_for
from .ops.softmax import softmax, target_rows, top_k_counts
from .ops.step_record import BAD_GRADS, BAD_LOSS, BAD_STEP
from .optim import Optimizer, get_optimizer
from .structure import where
from .totals import READ_EVERY, SCALE_RANGE, RunningTotals, loss_scaling

#: compile's precisions and the dtype of their heavy matmuls (None: the parameters' dtype).
PRECISIONS = {"float32": None, "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


#: Guards every model's check-and-set of what it runs (see Trainer._running_alone): held only
#: for that.
_RUNNING = threading.Lock()


def _one_fit_at_a_time(fit: Callable[..., Any]) -> Callable[..., Any]:
    """``fit``, refused where it is called while the model's fit (or move) runs, from one of
    its callbacks or from another thread: the second fit would replace the first one's
    History, position and class weights, and end its data-parallel mode (Keras does not
    support it either)."""
    @functools.wraps(fit)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._running_alone("fit"):
            return fit(self, *args, **kwargs)
    return guarded


def _prunes_streams(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` (fit, evaluate, predict), after which the iterators' registry drops the
    streams of held iterators (zip, map: no weak reference) that their caller dropped, and
    those that keep nothing (:func:`xpcnn.data.prune_streams`): one left with batches by an
    epoch closed early was otherwise kept alive, with what it wraps (a DataLoader's workers),
    until another such iterator was used."""
    @functools.wraps(call)
    def pruning(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(self, *args, **kwargs)
        finally:
            prune_streams()
    return pruning


class Trainer:
    """Training, evaluation and prediction of a network: the base class of
    :class:`xpcnn.Model`, which supplies the network through these hooks:

    * ``backend``, ``name``, ``seed``, ``dtype_name`` (the parameters' dtype) and
      ``_param_dtype`` (that dtype on the backend);
    * ``layers`` and ``trainable_layers`` (those the optimiser updates; ``_trained()``, the
      same as a tuple, kept between steps), ``built``,
      ``input_shape``, ``num_classes``, ``build(input_shape)``, ``_require_built(what)``,
      ``_rebuild_if_shared()`` (layers another model shares are built as this one needs) and
      ``_unbuilt_if_refused()`` (a context: a call refused inside it leaves an unbuilt model
      unbuilt);
    * ``_fused_softmax()``, whether the network ends in a softmax (which the loss applies);
    * ``_logits(x, training, in_scope)``, the forward pass to the logits (a final Softmax is
      left to the loss; ``in_scope``: inside the backend's ``compute_scope`` already),
      ``_backward(dz, on_layer)``, which fills each trainable layer's ``grads``, and
      ``_layer_outputs(x, training)``, every layer's output (to name where a value stopped
      being finite);
    * ``_plan()``, the network's plan (:class:`xpcnn.graph.Plan`: which layers train), and
      ``_slots_outdated()``, whether the optimiser's state is for other layers than the next
      step trains.

    Nothing here knows how the layers are connected. The file reads in the order of a run:
    compile; one training step (checked, on the device, captured in a CUDA graph where it can
    be), and the running totals the host reads behind it; the batch sources; fit, evaluate and
    predict. A refused call changes nothing (``_undone_if_refused``).
    """

    backend: Backend
    name: str
    seed: int
    dtype_name: str
    layers: list[Layer]
    built: bool
    input_shape: tuple[int, ...] | None

    def __init__(self) -> None:
        self.loss: SoftmaxCrossEntropy | None = None
        self.optimizer: Optimizer | None = None
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
        # (Keras 3's: a callback sets one to end evaluate or predict after the current batch;
        # each call resets its own)
        self.stop_evaluating = False
        self.stop_predicting = False
        self._scaling: Any = None  # float16 loss scaling on the device (see xpcnn.totals)
        self._totals: RunningTotals | None = None
        self._owners: list[tuple[Layer, str]] = []  # (the parameters the totals' flags follow)
        self._totals_for: tuple[Layer, ...] = ()  # (the trainable layers they were made for)
        self._parallel: distributed.DataParallel | None = None  # set by fit on several ranks
        self._resume_at: Any = None  # where BackupAndRestore restarts a run
        self._position = (0, 0)  # (epoch, batches done in it) during fit
        # (whether fit's epoch ending now has val_* logs; None outside fit: see callbacks)
        self._epoch_validated: bool | None = None
        # (the thread and what it runs, "fit" or "to()": nothing else may start another, nor
        # move the model, meanwhile; see _running_alone)
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

    @contextlib.contextmanager
    def _running_alone(self, what: str) -> Iterator[None]:
        """Inside, this model runs ``what`` ("fit" or "to()") in this thread; refused where it
        runs either already, from this thread (a callback of its fit) or another one. (The
        check and the mark are one step: two threads cannot both pass.)"""
        here = threading.get_ident()
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
                             "thread: a model runs one fit or move at a time (each changes its "
                             "weights, optimiser state, History and device); wait for that "
                             "call to return (thread.join()), or use a second model")
        if what == "fit":
            raise InputError("fit was called while this model's fit runs (from one of its "
                             "callbacks): a fit inside a fit would take over the outer one's "
                             "History, position and class weights; train_on_batch trains a "
                             "batch there, or fit again once the outer fit has returned")
        raise InputError(f"{what} was called while this model's fit runs (from one of its "
                         "callbacks): fit's batches and steps are on the device it started "
                         "on; move the model before fit, or after it returns")

    # -- compile: the loss, the optimiser and the precision -------------------------------------
    def compile(self, loss: str | SoftmaxCrossEntropy = "cross_entropy",
                optimizer: str | Optimizer = "adam",
                metrics: str | metric_settings.Metric | list[str | metric_settings.Metric]
                | tuple[str | metric_settings.Metric, ...] | None = ("accuracy",),
                precision: str = "float32", cuda_graphs: bool | None = None) -> None:
        """Choose the loss, the optimiser, the metrics and the precision.

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
        and dynamic loss scaling for float16.

        ``cuda_graphs``: capture the training step in a CUDA graph and replay it
        (:mod:`xpcnn.cuda_graphs`); None (the default) does so on CuPy wherever the model
        allows it, True also warns once where it does not, False never does.
        ``cuda_graphs_reason`` says why steps run without.
        """
        # Every argument is checked before anything changes: a failed compile leaves the
        # model (and the optimizer, which it would bind) as they were.
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise InputError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        loss, optimizer = get_loss(loss), get_optimizer(optimizer)
        # (each once, as given: the logs' keys; None is Keras' none)
        resolved = metric_settings.get_metrics(metrics)
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")
        if PRECISIONS[precision] is not None:
            compute = self.backend.dtype(PRECISIONS[precision])  # (refused where it lacks it)
            for layer in self.layers:
                layer.check_compute_dtype(self.backend.xp, compute)
        if self.built:
            self._check_loss_outputs(loss)
        self.loss, self.optimizer = loss, self._own(optimizer)
        self.cuda_graphs, self._graphs, self.cuda_graphs_reason = cuda_graphs, None, ""
        self.precision, self.metrics = precision, tuple(m.name for m in resolved)
        self._metric_objects, self._top_ks = resolved, metric_settings.top_k_of(resolved)
        self._metric_slots = metric_settings.slots(resolved)
        self._scaling = loss_scaling(self.backend, 2.0**15) if precision == "mixed_float16" \
            else None
        self._rebuild_if_shared()  # (built layers compute in the new precision's dtype)

    def _own(self, optimizer: Optimizer) -> Optimizer:
        """``optimizer``, bound to this model: its slots and step count are one model's, and
        another model's steps would silently mix into them (or fail deep inside). One new to
        this model starts with none (one that another model released held that model's; one
        never stepped keeps the learning rate set on it, as in Keras)."""
        owner = getattr(optimizer, "_model", lambda: None)()
        if owner is not None and owner is not self:
            raise InputError(f"this {type(optimizer).__name__} optimizer is already compiled into "
                             f"model {owner.name!r}: an optimizer holds one model's state (its "
                             "slots and step count), so each model needs one of its own; pass "
                             "a new one")
        previous = self.optimizer
        if previous is not None and previous is not optimizer:
            del previous._model  # (replaced: free to be compiled into another model)
        if owner is None and (optimizer.iterations or optimizer.slots):
            # (another model's state; one never stepped keeps the rate its user set)
            optimizer.slots, optimizer.iterations, optimizer.lr_factor = {}, 0, 1.0
            optimizer.applied = None
        optimizer._model = weakref.ref(self)
        return optimizer

    @property
    def _compute_dtype_name(self) -> str:
        """The dtype the layers compute their matmuls in, as the precision says."""
        return PRECISIONS[self.precision] or self.dtype_name

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

    def _require_compiled(self, what: str) -> None:
        if self.loss is None or self.optimizer is None:
            raise InputError(f"call compile(loss=..., optimizer=...) before {what}")

    def _check_loss_outputs(self, loss: SoftmaxCrossEntropy) -> None:
        """Refuse, on a built model, a loss whose ``from_logits`` says its outputs are what they
        are not (:meth:`SoftmaxCrossEntropy.check_outputs`)."""
        # (only where they disagree: the layer is named then, not at each step)
        if loss.from_logits is not None and loss.from_logits == self._fused_softmax():
            last = len(self.layers) - 1
            loss.check_outputs(self._fused_softmax(),
                               where(self.layers[last], last, self.layers))

    # -- one training step ----------------------------------------------------------------------
    def train_step(self, xb: Any, yb: Any, sample_weight: Any = None) -> tuple[Any, Any]:
        """One forward, backward and update on a batch of device arrays, queued without waiting
        for the device: ``xb`` images (uint8 or float: cast on the device), ``yb`` integer
        labels (N,) or one-hot rows (N, classes), ``sample_weight`` None or each sample's
        weight in the loss (N,) (inside ``fit``, its ``class_weight`` weighs the loss too).
        ``fit`` runs each of its steps through a
        ``train_step`` that a subclass or the model itself overrides, as Keras does; else it
        runs the same step without these checks, which its batches passed when it made them.

        Returns the batch's mean loss and correct count as 0-d device arrays. A non-finite loss
        or gradient is recorded on the device and its update (and every later one) skipped;
        :class:`NonFiniteError` names that step when the host next reads the running totals:
        ``fit`` reads them regularly, and every :data:`~xpcnn.totals.READ_EVERY` steps a loop of
        train_step calls does too; :meth:`train_on_batch` reads them at once.

        The batch is checked without waiting for the device: shapes, dtypes and devices here
        (:class:`InputError`); the labels' values on the device, where a label that is no class
        (or a one-hot row that is no probabilities) makes the step's loss NaN: its update and
        every later one are skipped, and :class:`InputError` names the labels when the host
        next reads the totals. No step ever trains on labels that match no class.
        """
        self._check_step_batch(xb, yb)
        if sample_weight is not None:
            self._check_step_weights(xb, sample_weight)
        with self.backend.compute_scope():
            stats = self._train_step(xb, yb, keep=True, weights=sample_weight)
        return stats[0], stats[1]

    def _train_step(self, xb: Any, yb: Any, keep: bool, weights: Any = None) -> Any:
        """:meth:`train_step` on a batch that passed its checks (or fit's, made and checked
        by fit), inside the backend's ``compute_scope``: the step, captured or replayed where
        it can be, and its record in the running totals. Returns the batch's [loss, correct
        count, top-k counts...]; after a replay they are the graph's own outputs, which the
        next replay rewrites, unless ``keep`` asks for copies. ``weights``: the samples'
        weights (N,) or None."""
        # (first: an earlier step's deferred error, read here where a layer was frozen since,
        # is raised before anything of this step changes the model, its optimiser's slots too)
        totals = self._running_totals()
        self._rebuild_if_shared()  # (another model may have built shared layers since)
        opt = self.optimizer
        if opt.slots and self._slots_outdated():  # type: ignore[union-attr]
            # (dropped before the step is captured: a capture would record their making)
            opt.slots = {}  # type: ignore[union-attr]
        # (a data-parallel step runs uncaptured: its allreduces are outside any graph)
        graphs = None if self._parallel is not None else self._step_graphs()
        step = self.optimizer.iterations + 1  # type: ignore[union-attr]
        stats = None if graphs is None else graphs.run(xb, yb, weights)
        if stats is None:
            stats = self._device_step(xb, yb, step, weights=weights)
        elif keep:
            stats = self.backend.xp.asarray(stats, copy=True)
        totals.pending.append((step, (xb, yb)))
        totals.seen += self._global_batch(xb)
        self._last_stats = stats
        if len(totals.pending) >= READ_EVERY:
            self._read_totals()
        return stats

    @property
    def metrics_names(self) -> tuple[str, ...]:
        """What :meth:`evaluate` and :meth:`train_on_batch` return, in order (as in Keras):
        ``("loss", "accuracy")`` (``("loss", "acc")`` for ``metrics=["acc"]``), or
        ``("loss",)`` for a model compiled without metrics."""
        return ("loss", *self.metrics)

    def _logs(self, sums: list[float], seen: float) -> dict[str, float]:
        """The logs of ``sums`` [loss sum, correct count, top-k counts...] of ``seen``
        samples: the mean loss, and each metric's share under its name."""
        return self._logs_of([s / seen for s in sums])

    def _logs_of(self, means: list[float]) -> dict[str, float]:
        """The logs of ``means`` [loss, accuracy, top-k shares...]: the loss, and each metric's
        value under its name."""
        return {"loss": means[0], **{name: means[slot] for name, slot in zip(
            self.metrics, self._metric_slots, strict=True)}}

    def _returned(self, logs: dict[str, float], return_dict: bool
                  ) -> float | list[float] | dict[str, float]:
        """``logs`` as evaluate and train_on_batch return them (Keras' rule): the dict, the
        loss alone where it has no metrics, or the values in the order of ``metrics_names``."""
        if return_dict:
            return logs
        return logs["loss"] if len(logs) == 1 else list(logs.values())

    def train_on_batch(self, x: Any, y: Any, sample_weight: Any = None,
                       class_weight: Mapping[int, float] | None = None,
                       return_dict: bool = False) -> float | list[float] | dict[str, float]:
        """One training step on one batch of host or device arrays, checked at once (the host
        waits for the device): its ``[loss, accuracy]`` (the loss alone without metrics, a dict
        with ``return_dict``, as in Keras), or :class:`NonFiniteError`. ``sample_weight`` and
        ``class_weight`` weigh the loss as :meth:`fit`'s do."""
        return_dict = checks.flag(return_dict, "return_dict")
        self._require_compiled("train_on_batch")
        if self._parallel is not None:
            # (inside a fit on several ranks, from a callback: the step took the share and the
            # global size of fit's last batch, and returned an accuracy summed over the ranks)
            raise InputError(
                f"train_on_batch was called from a callback of fit on one of "
                f"{distributed.world().size} ranks: its step would be weighted as fit's last "
                "batch, not as this one, on every rank; fit's own steps are what train on "
                "several ranks (pass the batch to fit, or run train_on_batch in a job of one "
                "process)")
        if distributed.world().size > 1:
            # (each rank stepped on its own batch, no gradient averaged: their weights drifted
            # apart, silently, and rank 0's alone was saved)
            raise InputError(
                f"train_on_batch runs on one process, and this is one of "
                f"{distributed.world().size} ranks: fit is what trains on several (every rank "
                "passes the whole arrays; each takes its slice of every batch, and the "
                "gradients are averaged); or run train_on_batch in a job of one process")
        checks.check_class_weight_type(class_weight)
        self._rebuild_if_shared()
        with self._unbuilt_if_refused():
            x, targets = check_arrays(self, x, y)
            self._check_loss_outputs(self.loss)  # type: ignore[arg-type]
            weights = None if sample_weight is None else check_sample_weights(
                self, sample_weight, int(x.shape[0]))
            table = None if class_weight is None else checks.as_class_weights(
                class_weight, self.num_classes)
        # (inside a fit, from a callback: fit's class weights are put back after the step)
        previous = self._use_class_weights(table)
        self._last_stats = None
        try:
            with self.backend.compute_scope():
                xb, yb, wb = (to_device(self.backend, a) for a in (x, targets, weights))
                out = self._call_train_step(xb, yb, wb)
                try:  # (a pair, or any two numbers that unpack: an array of 2, say)
                    if isinstance(out, Mapping | str):  # (Keras' dict of logs: its keys)
                        raise TypeError
                    loss, correct = out
                except (TypeError, ValueError):
                    raise InputError("train_on_batch needs train_step to return (loss, correct "
                                     f"count), as Model.train_step does; this model's returned "
                                     f"{type(out).__name__} {out!r:.80}") from None
        finally:
            self._class_weights = previous
        self._read_totals()
        n = int(x.shape[0])
        # (the top-k counts of the step, where super().train_step ran it: 0 where a
        # subclass's own step recorded none)
        tops = [0.0] * len(self._top_ks) if not self._top_ks or self._last_stats is None \
            else [float(v) for v in self.backend.to_numpy(self._last_stats)[2:]]
        return self._returned(self._logs_of([float(loss), float(correct) / n,
                                              *(t / n for t in tops)]), return_dict)

    def test_on_batch(self, x: Any, y: Any, sample_weight: Any = None,
                      return_dict: bool = False) -> float | list[float] | dict[str, float]:
        """:meth:`evaluate` of one batch of arrays, as Keras' ``test_on_batch``."""
        return self.evaluate(x, y, batch_size=_batch_length(x), sample_weight=sample_weight,
                             return_dict=return_dict)

    def predict_on_batch(self, x: Any) -> np.ndarray:
        """:meth:`predict` of one batch of arrays, as Keras' ``predict_on_batch``."""
        return self.predict(x, batch_size=_batch_length(x))

    def _check_step_batch(self, xb: Any, yb: Any) -> None:
        """What :meth:`train_step` checks on the host, from the arrays' shapes and dtypes
        alone: the model compiled and built, both arrays on its device, at least one image (on
        one process) of its sample shape, labels of the batch's length (integers only: fit
        turns whole-number floats into them on the host)."""
        self._require_compiled("train_step")
        self._require_built("train_step")
        self._check_loss_outputs(self.loss)  # type: ignore[arg-type]
        check_on_device(xb, self.backend, "x", instead="")
        check_on_device(yb, self.backend, "y", instead="")
        checks.check_sample_shape(xb, self.input_shape)  # type: ignore[arg-type]
        if not xb.shape[0] and self._parallel is None:  # (a rank's part may be empty, not a batch)
            raise InputError(f"x is empty: a training step needs at least one sample; got "
                             f"x.shape = {tuple(xb.shape)}")
        xp = self.backend.xp
        check_real_images(xb, xp)
        checks.check_label_layout(tuple(yb.shape), xp.isdtype(yb.dtype, "integral"),
                                  yb.ndim == 2 and xp.isdtype(yb.dtype, "real floating"),
                                  yb.dtype, int(xb.shape[0]), self.num_classes)

    def _check_step_weights(self, xb: Any, weights: Any) -> None:
        """:meth:`train_step`'s ``sample_weight``, from its shape and dtype: floats on the
        model's device, one a sample (their values are fit's and train_on_batch's to check)."""
        check_on_device(weights, self.backend, "sample_weight", instead="")
        if tuple(weights.shape) != (xb.shape[0],) or not self.backend.xp.isdtype(
                weights.dtype, "real floating"):
            raise InputError(f"sample_weight must be a floating-point array of one weight a "
                             f"sample, shape ({xb.shape[0]},); got shape "
                             f"{tuple(weights.shape)} and dtype {weights.dtype}")

    def _device_step(self, xb: Any, yb: Any, step: Any, scalars: dict[str, Any] | None = None,
                     weights: Any = None) -> Any:
        """Training step ``step`` on the device, with no host read: forward, loss, backward,
        the running totals and the update (skipped on the device where the step is not
        finite, normalisation statistics included). With ``scalars`` (a step captured in a
        CUDA graph), ``step`` and the optimiser's per-step numbers are device scalars, and
        every array that outlives the step is updated in place. ``weights``: the samples'
        weights (N,) or None. Returns the batch's [loss, correct count, top-k counts...]."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        opt = self.optimizer
        assert opt is not None and self.loss is not None
        totals = self._totals  # (made current by _train_step, whose step this is)
        assert totals is not None
        eager = scalars is None
        if eager:  # (taken before this step moves anything: a rate that overflowed raises here)
            scalars = opt.step_scalars()
        # (normalisation statistics move in the forward pass: a skipped step puts them back)
        moving = [a for la in self.layers if la.trainable and la.updates_state
                  for a in la.state.values()]
        before = kernels.snapshot_state(moving) if moving else None
        trained = self._trained()
        stats, grads = self._loss_and_grads(xb, yb, kernels, trained, weights)
        params = [p for la in trained for p in la.params.values()]
        n = self._global_batch(xb)
        # (with float16 loss scaling, this divides the gradients by the scale, in place)
        # (squares of clipped gradients cannot overflow an optimiser's state)
        apply = totals.add(stats, grads, n, step, self._scaling,
                           opt.keeps_squares and not opt.clipping)
        if moving:
            kernels.restore_state(moving, before, apply)
        opt.step(xp, params, grads, kernels, apply=apply, scalars=scalars)
        if eager:
            opt.iterations += 1
        return stats

    def _global_batch(self, xb: Any) -> int:
        """The samples of a step on ``xb``: its own, or on several ranks the global batch's."""
        return int(xb.shape[0]) if self._parallel is None else self._parallel.total

    def _loss_and_grads(self, xb: Any, yb: Any, kernels: Any, trained: tuple[Layer, ...],
                        weights: Any = None) -> tuple[Any, list[Any]]:
        """[loss, correct count, top-k counts...] of a batch and the gradients of its (scaled)
        loss, in the order of the parameters of ``trained`` (the trainable layers); the loss
        weighted by
        ``weights`` (N,) and fit's ``class_weight`` where given. On several ranks
        (``fit`` sets ``_parallel``), the batch is this rank's slice of the global batch: the
        stats come back for the global batch, and the gradients averaged over it."""
        xp, dp = self.backend.xp, self._parallel
        assert self.loss is not None
        if dp is not None and xb.shape[0] == 0:  # no sample of a short last batch here
            # (the plan the other ranks' forward passes make: after a freeze or an unfreeze,
            # the next step must not find the optimiser's slots outdated here alone)
            untrainable = self._plan().untrainable  # (refused here too, as by the others)
            if untrainable is not None:
                raise InputError(untrainable)
            return dp.empty_step(xp.zeros((2 + len(self._top_ks),), dtype=self._param_dtype),
                                 trained)
        logits = self._logits(xb, training=True, in_scope=True)
        # (a label that is no class makes the loss NaN: the step is skipped as a non-finite one
        # and the host names the labels, _raise_deferred)
        # (the float16 loss scale applied by the loss, in its kernel on a GPU: before the
        # weighting below, which for a power-of-two scale gives the same values as after)
        stats, dz = self.loss.forward_with_accuracy(
            xp, logits, yb, self._param_dtype, kernels, self._scaling,
            self._loss_weights(yb, weights))
        if self._top_ks:  # (a step without top-k metrics makes no call more: host time)
            stats = self._with_top_k(stats, logits, yb)
        if dp is not None and dp.weight != 1.0:
            # weighted by this slice's share of the global batch, here, once: backward is
            # linear in dz, and the buckets then only copy and sum
            dz = dz * dp.weight
        if dp is None:
            self._backward(dz)
            try:
                grads = [la.grads[k] for la in trained for k in la.params]
            except KeyError as e:  # (a user's layer whose backward filled no gradient)
                layer = next(la for la in trained if e.args[0] in la.params
                             and e.args[0] not in la.grads)
                raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward "
                                 f"gave no gradient for its parameter {e.args[0]!r}: backward "
                                 "must fill grads[name] for every one of its params") from None
            # (a mixed-precision step's float16 gradients back to float32 in one call)
            return stats, kernels.cast_all(grads, self._param_dtype)
        buckets = dp.buckets_for(trained)  # (new ones where a layer was frozen since)
        buckets.begin(dp.weight, stats)
        self._backward(dz, buckets.layer_done)
        grads, stats = buckets.finish()
        return stats, grads

    def _with_top_k(self, stats: Any, logits: Any, yb: Any) -> Any:
        """[loss, correct count] ``stats`` followed by the top-k metrics' counts, on the device
        (standard operations, only where such metrics are compiled: no other model's step
        does more work)."""
        if not self._top_ks:
            return stats
        xp = self.backend.xp
        return xp.concat([stats, top_k_counts(xp, logits, yb, self._top_ks, stats.dtype)])

    def _loss_weights(self, yb: Any, weights: Any) -> Any:
        """Each sample's weight in the loss: ``weights`` (N,) times its class's weight in
        fit's ``class_weight``; None where neither is given."""
        table = self._class_weights
        if table is None:
            return weights
        xp = self.backend.xp
        labels = yb if yb.ndim == 1 else xp.argmax(yb, axis=1)
        # the class's weight as the sum of its one-hot row times the table: elementwise
        # kernels and a sum, which a CUDA graph captures (array_api_compat's clip, which a
        # lookup with take would need to stay in the table, makes boolean-mask copies: a host
        # read each step on CuPy); a label that is no class weighs 0, and the loss makes that
        # step NaN (its error names the labels)
        rows = target_rows(xp, labels, table.shape[0], table.dtype)
        per_class = xp.sum(rows * table, axis=1)
        return per_class if weights is None else \
            per_class * xp.astype(weights, table.dtype, copy=False)

    def _use_class_weights(self, table: np.ndarray | None) -> Any:
        """Training steps weigh each class as ``table`` (classes,) says (None: they do not);
        returns the class weights in use before, for the caller to put back. The device table
        is kept and written in place by the next call that finds none in use: a CUDA graph
        captured with it reads the new weights (a new array would make every graph capture
        again). One in use (a fit's, when its callback runs train_on_batch) is left as it is."""
        previous, kept = self._class_weights, self._class_table
        if table is None:
            self._class_weights = None
        elif previous is None and kept is not None and kept.shape[0] == table.shape[0]:
            kept[...] = self.backend.asarray(table, dtype=self._param_dtype)
            self._class_weights = kept
        else:
            self._class_weights = self.backend.asarray(table, dtype=self._param_dtype)
            if previous is None:
                self._class_table = self._class_weights
        return previous

    def _call_train_step(self, xb: Any, yb: Any, wb: Any) -> tuple[Any, Any]:
        """``train_step`` on a batch, given its sample weights ``wb`` (if any) as
        ``sample_weight=``; a subclass's that cannot take them is refused by name, not left to
        fail inside, or to lose them."""
        if wb is None:
            return self.train_step(xb, yb)
        if self._train_step_overridden():
            _check_takes_sample_weight(self.train_step)
        return self.train_step(xb, yb, sample_weight=wb)

    # -- the step captured in a CUDA graph (xpcnn.cuda_graphs) ----------------------------------
    def _step_graphs(self) -> StepGraphs | None:
        """The captured-step runner where this model's steps can be captured, else None (with
        the reason in ``cuda_graphs_reason``)."""
        if self.cuda_graphs is False or self.cuda_graphs_reason:
            return None
        if self._graphs is not None and self._graphs.backend is self.backend:
            if self._graphs.reason:  # (found while warming up or capturing)
                self.cuda_graphs_reason = self._graphs.reason
                return None
            return self._graphs
        reasons = graph_blockers(self.backend)
        if reasons:
            self.cuda_graphs_reason = reasons[0]
            if self.cuda_graphs:
                warn(f"training steps run without CUDA graphs: {reasons[0]}")
            return None
        opt = self.optimizer
        assert opt is not None

        def scalars() -> dict[str, float]:
            values = opt.step_scalars()
            assert "iteration" not in values, "an optimiser's scalar shadows the step count"
            return {**values, "iteration": float(opt.iterations + 1)}

        def advance() -> None:
            opt.iterations += 1

        # (on CuPy the kernels make matmuls capturable: see xpcnn.cuda_graphs.blockers)
        kernels = kernels_for(self.backend)
        capturable = getattr(kernels, "capturable", contextlib.nullcontext)
        self._running_totals()  # (made before the warm-up: its state is captured)
        kernel_switches = getattr(kernels, "graph_switches", None)
        self._graphs = StepGraphs(
            lambda xb, yb, wb, s: self._device_step(xb, yb, s["iteration"], s, wb),
            self._graph_arrays,
            scalars, advance, self.backend, capturable,
            exact=("iteration", *opt.exact_scalars),
            capture_tables=getattr(kernels, "capture_tables", None),
            # (a layer's setting changed, as cuDNN's switches, chooses other captured work)
            switches=lambda: (Layer.settings_changes,
                              kernel_switches() if kernel_switches is not None else None))
        return self._graphs

    def _graph_arrays(self, named: bool = True) -> list[Any]:
        """Every array that outlives a training step, parameters first (see StepGraphs), as
        (name, array) pairs; the arrays alone, in the same order, where not ``named`` (what a
        replay checks: no names formatted for it)."""
        layers, opt = self.layers, self.optimizer
        assert opt is not None
        randoms = [la for la in layers if isinstance(la, RandomLayer)]
        scaling = [] if self._scaling is None else [("the loss scale", self._scaling)]
        classes = [] if self._class_weights is None else [("the class weights",
                                                            self._class_weights)]
        counted = [] if opt.applied is None else [("optimizer applied updates", opt.applied)]
        totals = [("the running totals", self._running_totals().state), *scaling, *classes]
        if not named:  # (list comprehensions: generators cost a call per item)
            return ([a for la in layers for a in la.params.values()]
                    + [a for la in layers for a in la.state.values()]
                    + [a for v in opt.slots.values() for a in v] + [a for _, a in counted]
                    + [la.random_state for la in randoms] + [a for _, a in totals])
        return ([(f"param {la.name}.{k}", a) for la in layers for k, a in la.params.items()]
                + [(f"state {la.name}.{k}", a) for la in layers for k, a in la.state.items()]
                + [(f"optimizer slot {k}.{i}", a) for k, v in opt.slots.items()
                   for i, a in enumerate(v)] + counted
                + [(f"random state {la.name}", la.random_state) for la in randoms] + totals)

    # -- the running totals the host reads behind the steps; deferred errors --------------------
    def _running_totals(self) -> RunningTotals:
        old, trained, top_k = self._totals, self._trained(), len(self._top_ks)
        if old is None or self._totals_for != trained or old.backend is not self.backend or \
                old.top_k != top_k:
            # (a layer frozen or unfrozen, the model moved, compiled with other top-k metrics:
            # the steps not read yet are read first, so that a skipped one is named, not lost,
            # and the epoch's sums go on; the top-k ones where they are the same metrics')
            sums = self._read_totals() if old is not None else [0.0, 0.0]
            owners = [(la, k) for la in trained for k in la.params]
            self._totals = RunningTotals(self.backend, len(owners), top_k)
            self._owners, self._totals_for = owners, trained
            self._totals.reset(sums[0], sums[1], old.seen if old is not None else 0.0,
                               sums[2:] if old is not None and old.top_k == top_k else ())
        return self._totals

    def _read_totals(self) -> list[float]:
        """Wait for the device and read the running [loss sum, correct count, top-k
        counts...]; raise :class:`NonFiniteError` for the first non-finite step since the
        last read (:class:`InputError` where its labels were no classes)."""
        if self._totals is None:
            return [0.0, 0.0, *[0.0] * len(self._top_ks)]
        host, pending = self._totals.read()
        if host[BAD_STEP] >= 0:
            self._raise_deferred(host, dict(pending))
        return self._totals.sums(host)

    def _raise_deferred(self, host: np.ndarray, batches: dict[int, Any]) -> None:
        step = int(host[BAD_STEP])
        # Every update from that step on was skipped: the model is as after the step before.
        opt = self.optimizer
        opt.iterations = step - 1  # type: ignore[union-attr]
        loss = float(host[BAD_LOSS])
        if not math.isfinite(loss):
            xb, yb = batches[step]
            self._raise_for_labels(yb, step)
            self._raise_non_finite(f"the loss is {loss}", xb, step)
        flags = list(zip(self._owners, host[BAD_GRADS:BAD_GRADS + len(self._owners)],
                         strict=True))
        bad = [la for (la, _), flag in flags if flag == 1]
        if bad:
            # Backpropagation runs from the last layer: the last one with a non-finite
            # gradient is where it appeared.
            raise NonFiniteError(f"non-finite gradient at step {step}: it first appears (in "
                                 f"backpropagation order) in layer {bad[-1].name!r}")
        layer, name = [owner for owner, flag in flags if flag == 2][-1]
        raise NonFiniteError(f"training stopped at step {step}: the gradient of layer "
                             f"{layer.name!r} ({name}) is so large that its squares overflow, "
                             "and the optimiser's state would become infinite; nothing was "
                             "updated from that step on (are the inputs scaled? a Rescaling or "
                             "Normalization layer brings them to a small range)")

    def _raise_for_labels(self, yb: Any, step: int) -> None:
        """Raise :class:`InputError` where the labels of step ``step`` are not all classes (the
        loss made that step's loss NaN for them,
        :meth:`SoftmaxCrossEntropy.forward_with_accuracy`), named as ``fit`` names them."""
        if yb.shape[0]:  # (not this rank's empty part of a short batch)
            try:
                checks.as_labels(self.backend.to_numpy(yb), int(yb.shape[0]), self.num_classes)
            except InputError as e:
                raise InputError(f"training stopped at step {step}: {e}; nothing was updated "
                                 "from that step on") from None

    def _raise_non_finite(self, what: str, xb: Any, step: int) -> None:
        """Name the step and the first layer whose output is not finite, then raise."""
        xp = self.backend.xp
        where = "the loss"
        finite = lambda a: bool(xp.all(xp.isfinite(a)))  # noqa: E731
        weights = next((la for la in self.layers if not all(map(finite, la._arrays().values()))),
                       None)
        if not finite(xb):
            where = "the input batch"
        elif weights is not None:
            where = f"the weights of layer {weights.name!r}"
        else:
            with self.backend.compute_scope():
                outputs = self._layer_outputs(
                    xp.astype(xb, self._param_dtype, copy=False), False)
            layer = next((la for la, out in zip(self.layers, outputs, strict=True)
                          if not finite(out)), None)
            if layer is not None:
                where = f"the output of layer {layer.name!r}"
            elif self._parallel is not None:
                where = ("the loss summed over the ranks: this rank's batch and outputs are "
                         "finite, another rank's made it (that rank's error names where)")
        raise NonFiniteError(f"training stopped at step {step}: {what}; the first non-finite "
                             f"values appear in {where}")

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
            return IterableBatches(self, x, steps, targets, what)
        x, t = (x, y) if checked else check_arrays(self, x, y, what)
        if weights is not None and not checked:
            weights = check_sample_weights(self, weights, int(x.shape[0]),
                                           _weights_name(what))
        return ArrayBatches(self.backend, x, t, batch_size, shuffle, seed, shard, weights)

    @contextlib.contextmanager
    def _undone_if_refused(self) -> Iterator[None]:
        """Around a call's set-up, up to its first step: where the call is refused (data that
        does not fit the model, a callback's refusal when training begins), the model is as
        it was (unbuilt if it was, see ``_unbuilt_if_refused``; its history). (A batch drawn
        from an iterator to build the model waits in the iterator's stream, for the next
        call: :class:`xpcnn.data.IterableBatches`.)"""
        history = self.history
        with self._unbuilt_if_refused():
            try:
                yield
            except BaseException:
                self.history = history
                raise

    # -- fit, evaluate, predict -----------------------------------------------------------------
    @_prunes_streams
    @_one_fit_at_a_time
    def fit(self, x: Any, y: Any = None, epochs: int = 1, batch_size: int | None = 32,
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

        ``x`` is images (N, H, W, C) (uint8 or float; NumPy, a memory map, or arrays of the
        model's library on its device) with ``y`` integer labels (N,) or one-hot rows (N, K);
        or a map-style dataset, or an iterable of ``(x, y)`` batches with ``steps_per_epoch``
        (:mod:`xpcnn.data`). ``validation_data`` is a pair of arrays or such a source
        (``validation_steps`` batches), or a triple (x_val, y_val, sample weights).
        ``sample_weight`` (N,) (with arrays; a dataset or an iterable gives (x, y, w) items
        instead) and ``class_weight`` ({class index: weight}; a class left out weighs 1) weigh
        each sample's term of the training loss, which stays divided by the batch's size
        (Keras' "sum over batch size"); given both, a sample weighs their product, as in
        tf.keras 2. Accuracy is not weighted, and the validation loss only by the validation
        data's own weights. ``seed`` fixes the shuffling order (default: the model's seed);
        epochs are numbered on from the model's earlier fit calls, so that ``fit(epochs=1)``
        called three times shuffles (and trains) as ``fit(epochs=3)``, not in one order thrice.
        ``batch_size`` None is the default, 32 (as in Keras; evaluate's and predict's, 256).
        ``verbose=0`` silences the progress bar; ``verbose=2`` prints a line an epoch instead.
        ``callbacks``: see :mod:`xpcnn.callbacks`.
        ``initial_epoch`` (as in Keras): the epoch to start at, numbered from 0, so that
        ``fit(epochs=5, initial_epoch=2)`` runs epochs 2, 3 and 4, each shuffled as it is in
        a run from 0 (a checkpoint resumed by ``resume=True`` starts where it stopped
        instead). ``validation_batch_size``: the validation data's batch size (default: the
        larger of ``batch_size`` and 256; inference needs no small batches).
        ``validation_freq`` (as in Keras 3): k validates only after every k-th epoch (epochs
        k, 2k, ... counted from 1), a collection such as ``[1, 5, 10]`` after those epochs; the
        other epochs' logs have no ``val_*`` metrics (their History lists are shorter:
        ``History.epochs_of``), and callbacks that monitor one skip those epochs.

        Launched on several processes (``mpiexec -n N``, :mod:`xpcnn.distributed`), each step
        takes a global batch of ``N * batch_size`` samples, the very batch one process would take
        at that size, and each rank computes on its own slice; only rank 0 prints and writes.

        ``checkpoint=PATH`` is short for ``callbacks=[BackupAndRestore(PATH, checkpoint_every,
        resume, delete_checkpoint=False)]``: the whole training state at the end of every epoch
        (and every ``checkpoint_every`` steps when that is an int), kept when training ends;
        with ``resume=True`` a run continues from that file, exactly, and returns the history
        of every epoch.

        A refused fit leaves the model as it was, and loses no batch of an iterator: the
        arguments are checked before any batch is drawn, and where the model is built from
        the first batch and then refused (validation data that does not fit it, a callback's
        refusal), the next call on that iterator starts with that batch.
        """
        self._require_compiled("fit")
        epochs = checks.non_negative_int(epochs, "epochs")
        initial_epoch = checks.non_negative_int(initial_epoch, "initial_epoch")
        # (None, as Keras takes it: the default)
        batch_size = checks.positive_int(32 if batch_size is None else batch_size, "batch_size")
        validation_batch_size = max(batch_size, 256) if validation_batch_size is None else \
            checks.positive_int(validation_batch_size, "validation_batch_size")
        validation_freq = _validation_freq(validation_freq)
        seed = self.seed if seed is None else checks.non_negative_int(seed, "seed")
        shuffle = checks.flag(shuffle, "shuffle")
        verbose = checks.verbosity(verbose)
        if not distributed.is_root():
            verbose = 0
        # Keras' order: the History and the progress bar after the user's callbacks, so they
        # see the logs those add (learning_rate, a user's metric); BackupAndRestore last, so
        # that its checkpoint holds the History of the epoch just done.
        callbacks = [*callback_list(callbacks),
                     *_checkpoint_callback(checkpoint, checkpoint_every, resume)]
        backups = [cb for cb in callbacks if isinstance(cb, BackupAndRestore)]
        if len(backups) > 1:  # (refused before any restores its file into the model)
            raise InputError(f"fit takes one BackupAndRestore (checkpoint=PATH counts as one), "
                             f"got {len(backups)}: for "
                             f"{', '.join(repr(os.fspath(cb.path)) for cb in backups)}")
        # (a History or ProgbarLogger among the user's is fit's own, as in Keras 3: one record
        # and one bar, the bar at fit's verbose; run where fit's own would, after the others)
        users = [cb for cb in callbacks if cb not in backups]
        history = _one_of(users, History) or History()
        bar = _one_of(users, ProgbarLogger) or (ProgbarLogger(verbose=verbose) if verbose
                                                else None)
        callbacks = [*(cb for cb in users if cb is not history and cb is not bar), history,
                     *([bar] if bar is not None else []), *backups]
        _check_fit_data(x, y, validation_data, validation_split, steps_per_epoch,
                        validation_steps, class_weight, sample_weight)
        if self._train_step_overridden():  # (before training: see _call_train_step)
            _check_takes_a_batch(self.train_step)
            if sample_weight is not None:
                _check_takes_sample_weight(self.train_step)
        self._rebuild_if_shared()
        with self._undone_if_refused():
            x, y, sample_weight, validation_data, split = self._split_validation(
                x, y, sample_weight, validation_data, validation_split)
            data = self._batches(x, y, batch_size, steps_per_epoch, shuffle=shuffle, seed=seed,
                                 checked=split, weights=sample_weight)
            self._check_loss_outputs(self.loss)  # type: ignore[arg-type]  # (built by now)
            x_val, y_val, w_val = (None, None, None) if validation_data is None else \
                _triple(validation_data)
            validation = None if validation_data is None else self._batches(
                x_val, y_val, validation_batch_size, validation_steps, "x_val",
                checked=split, steps_name="validation_steps", weights=w_val)
            class_weights = None if class_weight is None else checks.as_class_weights(
                class_weight, self.num_classes)
            self.history = history
            # (a user's History records this fit alone, as fit's own one; their bar is silent
            # where fit is)
            history.epoch, history.history, history.sparse = [], {}, {}
            if bar is not None:
                bar.verbose = verbose
            # (shared by the callbacks, which keep it: the source and the stateful callbacks
            # are taken out when fit ends, so that model.history does not keep the user's
            # iterator (and its pending batches, a DataLoader's workers) alive, as Keras'
            # History.params holds no data)
            params = {"epochs": epochs, "initial_epoch": initial_epoch, "steps": data.steps,
                      "verbose": verbose, "data": data, "validation": validation is not None,
                      "validation_freq": validation_freq, "class_weight": class_weights,
                      "stateful": stateful(callbacks)}  # (whose states checkpoints keep)
            cbs = CallbackList(callbacks, self, params)
            self.stop_training, self._resume_at = False, None
            # (a checkpoint resumed by on_train_begin puts back its run's offset instead)
            self._epoch_offset = max(0, self._epochs_begun - initial_epoch)
            self._parallel = distributed.data_parallel(self)
            self._use_class_weights(class_weights)
            try:
                if self._parallel is not None:
                    self._parallel.check_same_layers()
                    self._parallel.check_same_data(data, validation, class_weights)
                    self._parallel.broadcast_weights()
                if initial_epoch < epochs:
                    self._refuse_empty(data, initial_epoch)
                self._callbacks_begin(cbs)
            except BaseException:
                self._end_fit()
                _drop_sources(params)
                raise
        try:
            return self._fit_epochs(data, validation, cbs, params, epochs, initial_epoch)
        finally:
            _drop_sources(params)

    def _fit_epochs(self, data: Batches, validation: Batches | None, cbs: CallbackList,
                    params: dict[str, Any], epochs: int, initial_epoch: int) -> History:
        """fit's epochs, once its callbacks began, then ``on_train_end``."""
        start = self._resume_at
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
                    if self.stop_training:
                        break
        except NonFiniteError as error:
            if not cbs.on_non_finite(error):
                raise
        finally:
            self._end_fit()
        cbs.on_train_end(logs)
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
        self._position = (epoch, step)
        self._epoch_t0 = time.perf_counter() - (start.seconds if start else 0.0)
        self._running_totals().reset(*((start.loss_sum, start.correct, start.seen, start.top_k)
                                       if start else ()))
        factor = self.optimizer.lr_factor  # type: ignore[union-attr]
        cbs.on_epoch_begin(epoch)
        if step:  # (resumed inside this epoch: the checkpoint's learning rate is the one this
            # epoch's on_epoch_begin set; a schedule of the rate must not apply it twice)
            self.optimizer.lr_factor = factor  # type: ignore[union-attr]
        logs = BatchLogs(cbs.lazy_train)
        number = self._epoch_offset + epoch  # (its shuffling order's)
        # (one compute scope for the epoch's loop, its callbacks inside, as evaluate's are)
        with self.backend.compute_scope(), contextlib.closing(
                data.epoch(number, step)) as batches:  # type: ignore[type-var]
            for batch in batches:
                logs.settle()  # (last batch's logs, if a callback kept them: before this step)
                xb, yb, wb = unpack(batch)
                cbs.on_train_batch_begin(step)
                if self._parallel is not None:  # this rank's place in the global batch
                    place = data.place(step)
                    if place is None:  # (asked of the other ranks: a host allreduce)
                        self._parallel.set_batch(int(xb.shape[0]))
                    else:
                        self._parallel.use_slice(*place)
                if self._train_step_overridden():
                    self._call_train_step(xb, yb, wb)
                else:  # (fit made and checked this batch: train_step's checks would repeat)
                    self._train_step(xb, yb, keep=False, weights=wb)
                step += 1
                self._position = (epoch, step)
                self._epochs_begun = number + 1  # (one that trained no step, refused, is not)
                cbs.on_train_batch_end(step - 1, logs.make(self._batch_logs))
                if self.stop_training:
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
            if _iterator(data):  # (ran out inside the epoch: the next would give none)
                warn(f"the training data ran out after {step} of its {data.steps} batches "
                     f"(steps_per_epoch) in epoch {epoch + 1}: training stops here; an "
                     "iterator needs steps_per_epoch batches for every epoch")
                self.stop_training = True
            else:  # (a DataLoader, say: the next epoch is a new pass over it, as in Keras 3)
                warn(f"the training data gave {step} of its {data.steps} batches "
                     f"(steps_per_epoch) in epoch {epoch + 1}: the epoch ends there, and the "
                     "next starts a new pass over it")
        return self._batch_logs()

    def _refuse_empty(self, data: Batches, epoch: int) -> None:
        """Refuse an iterator that has no batch for fit's first epoch, ``epoch``, before any
        callback runs (an epoch begun and never ended set a schedule's rate, and lost the
        last fit's History): its first batch, drawn here, waits for the epoch. On several
        ranks, all learn where one has none (or its iterator failed)."""
        if not (isinstance(data, IterableBatches) and data.iterator is not None):
            return
        error: BaseException | None = None
        try:
            if not data.has_batch():
                error = InputError(f"the training data gave no batches in epoch {epoch + 1}: "
                                   "an iterator needs steps_per_epoch batches for every epoch")
        except Exception as e:  # (the iterator's own error: raised after the others learn it)
            error = e
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

    def _train_step_overridden(self) -> bool:
        """True where ``train_step`` is a subclass's or set on the model itself: fit calls it
        for each step, as Keras does."""
        return type(self).train_step is not Trainer.train_step or "train_step" in vars(self)

    def _batch_logs(self) -> dict[str, float]:
        """The epoch's running loss and metrics (waits for the device): over every training
        step since the epoch began, those of a callback's ``train_on_batch`` too, as in Keras
        (0 where a ``train_step`` of a subclass recorded none)."""
        sums = self._read_totals()
        return self._logs(sums, self._running_totals().seen or 1.0)

    def _epoch_sums(self) -> tuple[float, float, float, float, list[float]]:
        """(loss sum, correct count, samples seen, start time, top-k counts) of the epoch in
        progress, as a checkpoint stores them (waits for the device)."""
        loss_sum, correct, *top_k = self._read_totals()
        return loss_sum, correct, self._running_totals().seen, self._epoch_t0, top_k

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
    def evaluate(self, x: Any, y: Any = None, batch_size: int | None = 256,
                 verbose: int | str = 0,
                 steps: int | None = None, callbacks: list[Callback] | None = None,
                 return_dict: bool = False, sample_weight: Any = None
                 ) -> float | list[float] | dict[str, float]:
        """``[loss, accuracy]``, their means on (x, y) (or a dataset or iterable of batches), in
        inference mode (as in Keras: ``loss, acc = model.evaluate(x, y)``; the loss alone for a
        model compiled without metrics, a dict with ``return_dict``); an uncompiled model is
        evaluated with the default loss and metrics (and stays uncompiled).
        ``sample_weight`` (N,) (with arrays; a dataset or an iterable gives (x, y, w) items
        instead) weighs each sample's term of the loss (the sum still divided by N), not the
        accuracy, as fit's does."""
        batch_size = checks.positive_int(256 if batch_size is None else batch_size,
                                         "batch_size")
        return_dict = checks.flag(return_dict, "return_dict")
        verbose = checks.verbosity(verbose)
        callbacks = callback_list(callbacks)
        loss = self.loss if self.loss is not None else get_loss("cross_entropy")
        self._rebuild_if_shared()
        _refuse_stream_weights(x, sample_weight)
        with self._undone_if_refused():
            data = self._batches(x, y, batch_size, steps, steps_name="steps",
                                 weights=sample_weight)
            here = distributed.world()
            if here.size > 1:  # (each rank evaluates its slice of the same data)
                distributed.check_same_data(here, [("evaluation", data)], "evaluate")
            cbs = CallbackList(callbacks, self, _inference_params(verbose, data))
            self._check_loss_outputs(loss)
            return self._returned(self._evaluate(data, cbs, loss, verbose), return_dict)

    def _evaluate(self, data: Batches, cbs: CallbackList, loss: SoftmaxCrossEntropy | None,
                  verbose: int = 0, epoch: int | None = None) -> dict[str, float]:
        """Mean ``loss`` and metrics of ``data``; ``epoch``: fit's, when it is the validation
        data. A callback's ``model.stop_evaluating = True`` ends it after the current batch,
        as in Keras 3: the means are those of the batches seen."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        totals, steps = RunningTotals(self.backend, 0, len(self._top_ks)), 0
        t0 = time.perf_counter()
        logs = BatchLogs(cbs.lazy_test)
        self.stop_evaluating = False
        cbs.on_test_begin()
        with _bar(data, verbose, "evaluate") as bar:
            shown = time.monotonic()
            with self.backend.compute_scope(), contextlib.closing(
                    data.epoch(0)) as batches:  # type: ignore[type-var]
                for step, batch in enumerate(batches):
                    logs.settle()  # (last batch's logs, if a callback kept them: before this)
                    steps = step + 1
                    xb, yb, wb = unpack(batch)
                    if xb.shape[0]:  # (not this rank's empty part of a short batch)
                        cbs.on_test_batch_begin(step)
                        logits = self._logits(xb, False, in_scope=True)
                        stats, _ = loss.forward_with_accuracy(  # type: ignore[union-attr]
                            xp, logits, yb, self._param_dtype, kernels, weights=wb)
                        totals.add_stats(self._with_top_k(stats, logits, yb), int(xb.shape[0]))
                        # (this rank's running means, as Keras' batch logs)
                        cbs.on_test_batch_end(step, logs.make(
                            lambda seen=totals.seen: self._running_logs(totals, seen)))
                    bar.update(1)
                    # (the running means on the bar, read as fit's bar reads them: at most
                    # every BAR_REFRESH seconds)
                    if not bar.disable and totals.seen and \
                            time.monotonic() - shown >= BAR_REFRESH:
                        shown = time.monotonic()
                        bar.set_postfix(bar_postfix(self._running_logs(totals, totals.seen)))
                    if self.stop_evaluating:
                        break
                logs.settle()
            host, _ = totals.read()
            # on several ranks, each evaluated its slices: the sums are added up over the
            # ranks, and with them whether each ran out, after how many batches, so that all
            # decide alike (one alone stopping training left the others waiting)
            here = distributed.world()
            short, counts = [0.0] * here.size, [0.0] * here.size
            short[here.rank] = float(bool(data.steps) and steps < data.steps
                                     and not self.stop_evaluating)
            counts[here.rank] = float(steps)
            got = distributed.host_sum(
                here, [*totals.sums(host), totals.seen, *short, *counts], "evaluate")
            k = len(got) - 2 * here.size - 1
            sums, seen = got[:k], got[k]
            ran_out = [r for r in range(here.size) if got[k + 1 + r]]
            counts = got[k + 1 + here.size:]
            # (none at all, from anything but fit's validation iterator: refused below)
            if ran_out and (seen or epoch is not None and _iterator(data)):
                _ran_out(data, int(min(counts[r] for r in ran_out)), epoch, bool(seen),
                         ran_out if here.size > 1 else None)
                if epoch is not None and _iterator(data):  # (the next epoch's would get none)
                    self.stop_training = True
            if not seen:
                if epoch is not None and _iterator(data):  # (the epoch keeps its training logs)
                    cbs.on_test_end({})
                    return {}
                raise InputError("the evaluation data gave no batches" if epoch is None else
                                 f"the validation data gave no batches in epoch {epoch + 1}")
            result = self._logs(sums, seen)
            bar.set_postfix(bar_postfix(result))
        _summarise(verbose, steps, t0, result)
        cbs.on_test_end(result)
        return result

    def _running_logs(self, totals: RunningTotals, seen: float) -> dict[str, float]:
        """The running loss and metrics of ``seen`` samples in ``totals`` (waits for the
        device)."""
        return self._logs(totals.sums(self.backend.to_numpy(totals.state)), seen)

    @_prunes_streams
    def predict(self, x: Any, batch_size: int | None = 256, verbose: int | str = 0,
                steps: int | None = None, callbacks: list[Callback] | None = None) -> np.ndarray:
        """The model's output for ``x`` as a host NumPy array, as in Keras: class
        probabilities (N, classes) for a model that ends in a Softmax or a softmax activation
        (applied to the logits the plan stops at), any other model's output as it is
        (logits, an inner layer's features); ``x`` as for :meth:`evaluate` (targets, if any,
        are ignored); ``verbose=1`` shows a progress bar (Keras' ``predict(x, verbose=0)``
        works as it is)."""
        batch_size = checks.positive_int(256 if batch_size is None else batch_size,
                                         "batch_size")
        verbose = checks.verbosity(verbose)
        callbacks = callback_list(callbacks)
        self._rebuild_if_shared()
        xp = self.backend.xp
        out = []
        with self._undone_if_refused():
            data = self._batches(x, None, batch_size, steps, targets=False, steps_name="steps")
            cbs = CallbackList(callbacks, self, _inference_params(verbose, data))
            self.stop_predicting = False
            cbs.on_predict_begin()
            t0 = time.perf_counter()
            with _bar(data, verbose, "predict") as bar, self.backend.compute_scope(), \
                    contextlib.closing(data.epoch(0)) as batches:  # type: ignore[type-var]
                for step, (xb, _) in enumerate(batches):
                    cbs.on_predict_batch_begin(step)
                    out.append(self._outputs(xb))
                    cbs.on_predict_batch_end(step, {"outputs": out[-1]})  # (on the device)
                    bar.update(1)
                    if self.stop_predicting:  # (a callback's, as in Keras 3: the rows so far)
                        break
                if not out:  # (as evaluate says)
                    raise InputError("the prediction data gave no batches")
                outputs = self.backend.to_numpy(xp.concat(out))
        _summarise(verbose, len(out), t0)
        cbs.on_predict_end()
        return outputs

    def _outputs(self, xb: Any) -> Any:
        """The model's outputs for a device batch, as :meth:`predict` gives them, on the
        device (inside the caller's compute scope)."""
        xp = self.backend.xp
        z = xp.astype(self._logits(xb, training=False, in_scope=True), self._param_dtype)
        return softmax(xp, z) if self._fused_softmax() else z

    def _outputs_of_batch(self, x: Any) -> Any:
        """``model(x)`` on one batch of arrays: :meth:`predict_on_batch`'s outputs, left on the
        model's device in its namespace (as Keras' ``model(x)`` gives a backend tensor and
        PyTorch's a tensor): checked, cast and moved as predict's batches are."""
        if is_stream(x):
            raise InputError(f"model(x) runs the model on one batch of arrays, got "
                             f"{type(x).__name__}; predict(x) reads datasets and iterables")
        self._rebuild_if_shared()
        with self._undone_if_refused():
            data = self._batches(x, None, _batch_length(x), None, targets=False,
                                 steps_name="steps")
            with self.backend.compute_scope(), contextlib.closing(data.epoch(0)) as batches:
                out = [self._outputs(xb) for xb, _ in batches]
        return out[0] if len(out) == 1 else self.backend.xp.concat(out)


def _batch_length(x: Any) -> int:
    """The number of samples in ``x``, one batch of arrays (the ``*_on_batch`` methods): at
    least 1, so that an empty one reaches the checks that name it."""
    if is_stream(x):
        raise InputError("a *_on_batch method takes one batch of arrays, not a dataset or an "
                         "iterable of batches (fit, evaluate and predict take those)")
    shape = getattr(x, "shape", None)
    if shape is None:  # (a list of samples)
        try:
            return max(1, len(x))
        except TypeError:  # (a number: refused by the checks, by name)
            return 1
    # (shape, not len(): the standard has no len() of an array, array_api_strict none at all)
    return max(1, int(shape[0])) if len(shape) else 1


def _one_of(callbacks: list[Callback], kind: type[Callback]) -> Any:
    """The one ``kind`` callback (History, ProgbarLogger) among the user's ``callbacks``, None
    where there is none; refused where there are several (fit keeps one record, shows one
    bar)."""
    found = [cb for cb in callbacks if isinstance(cb, kind)]
    if len(found) > 1:
        raise InputError(f"callbacks holds {len(found)} {kind.__name__} callbacks: fit takes one "
                         f"(its own {kind.__name__}, which it adds where callbacks has none)")
    return found[0] if found else None


def _validation_freq(value: Any) -> int | frozenset[int]:
    """fit's ``validation_freq``, as Keras 3 takes it: k (validate after every k-th epoch) or
    a collection of the 1-based epochs to validate after."""
    def epoch_number(e: Any) -> bool:
        return isinstance(e, int | np.integer) and not isinstance(e, bool) and e >= 1

    many = isinstance(value, list | tuple | set | frozenset | range)
    if not (all(map(epoch_number, value)) and len(value) > 0 if many else epoch_number(value)):
        raise InputError(f"validation_freq must be a positive integer k (validate after every "
                         f"k-th epoch) or a collection of epoch numbers from 1, got {value!r}")
    return frozenset(int(e) for e in value) if many else int(value)


def _inference_params(verbose: int, data: Batches) -> dict[str, Any]:
    """The ``params`` of evaluate's and predict's callbacks, as Keras 3 sets them: one epoch
    of ``steps`` batches (None where unknown before the data ends)."""
    return {"verbose": verbose, "epochs": 1, "steps": data.steps}


#: Seconds between two reads of evaluate's running means for its bar (as ProgbarLogger's).
BAR_REFRESH = 0.5


def _bar(data: Batches, verbose: int, desc: str) -> Any:
    """evaluate's or predict's progress bar over ``data`` where ``verbose`` is 1 (on rank 0
    only; else a disabled one); a context that closes it."""
    return tqdm(total=data.steps, disable=verbose != 1 or not distributed.is_root(),
                desc=desc, unit="batch")


def _drop_sources(params: dict[str, Any]) -> None:
    """Take the batch source and the stateful callbacks out of fit's ``params`` once fit has
    ended: its callbacks (model.history among them) keep the dict."""
    params.pop("data", None)
    params.pop("stateful", None)


def _iterator(data: Batches) -> bool:
    """Whether ``data`` reads a user's iterator (a generator): one pass, shared by the
    epochs, not a new pass each epoch."""
    return getattr(data, "iterator", None) is not None


def _ran_out(data: Batches, steps: int, epoch: int | None, seen: bool = True,
             ranks: list[int] | None = None) -> None:
    """Warn that evaluation (``epoch`` None) or fit's validation data gave ``steps`` of its
    ``data.steps`` batches, as Keras 3 warns (its means are those of the batches it gave);
    ``seen``: whether any rank gave a sample (else the epoch has no val_* logs); ``ranks``: on
    several ranks, those whose data ran out (``steps``: the fewest they gave)."""
    what = "evaluation data" if epoch is None else "validation data"
    setting = "steps" if epoch is None else "validation_steps"
    then = ("" if epoch is None or not _iterator(data) else
            ": training stops after this epoch (an iterator needs validation_steps batches "
            "for every epoch)" + ("; this epoch has no val_* logs" if not seen else ""))
    warn(f"the {what} ran out after {steps} of its {data.steps} batches ({setting})"
         + ("" if ranks is None else f" on rank(s) {ranks}")
         + ("" if epoch is None else f" in epoch {epoch + 1}") + then)


def _summarise(verbose: int, steps: int, t0: float, logs: dict[str, float] | None = None
               ) -> None:
    """At ``verbose=2``, the one line Keras 3 prints after evaluate or predict (rank 0)."""
    if verbose == 2:
        say_on_root(summary_line(steps, time.perf_counter() - t0, logs))


def _checkpoint_callback(checkpoint: str | os.PathLike[str] | None, every: int | str,
                         resume: bool) -> list[Callback]:
    """fit's ``checkpoint=PATH``, as the :class:`BackupAndRestore` it is short for."""
    if checkpoint is not None:
        if not is_save_freq(every):  # (named as fit's argument, not as the callback's)
            raise InputError(f"checkpoint_every must be a positive number of steps or 'epoch', "
                             f"got {every!r}")
        return [BackupAndRestore(checkpoint, every, resume, delete_checkpoint=False)]
    if resume:
        raise InputError("resume=True needs checkpoint=PATH, the file to resume from")
    if not (isinstance(every, str) and every == "epoch"):
        raise InputError(f"checkpoint_every={every!r} needs checkpoint=PATH, the file to "
                         "write: without it no checkpoint would be written")
    return []


def _check_fit_data(x: Any, y: Any, validation_data: Any, validation_split: float,
                    steps: int | None, validation_steps: int | None,
                    class_weight: Any = None, sample_weight: Any = None) -> None:
    """fit's data arguments, checked before any batch source is made (none draws a batch)."""
    checks.number(validation_split, "validation_split", 0.0, 1.0, high_open=True)
    checks.check_class_weight_type(class_weight)
    _refuse_stream_weights(x, sample_weight)
    if validation_split and validation_data is not None:  # (one would be ignored, silently)
        raise InputError(f"pass validation_data or validation_split, not both: got "
                         f"validation_split={validation_split!r} and validation_data")
    if validation_split and is_stream(x):
        raise InputError("validation_split needs arrays; pass validation_data with a "
                         "dataset or generator")
    check_source(x, y, steps)
    if validation_data is not None:
        check_source(*_triple(validation_data)[:2], validation_steps, "x_val",
                     steps_name="validation_steps")


def _triple(validation_data: Any) -> tuple[Any, Any, Any]:
    """``validation_data`` as (x_val, y_val, sample weights or None); a dataset or an iterable
    of batches holds its targets (y_val None)."""
    if is_stream(validation_data):
        return validation_data, None, None
    if not isinstance(validation_data, tuple | list) or len(validation_data) not in (2, 3):
        raise InputError("validation_data must be a pair (x_val, y_val), a triple (x_val, "
                         "y_val, sample weights), a dataset or an iterable of batches, got "
                         f"{type(validation_data).__name__}")
    x, y, *w = validation_data
    _refuse_stream_weights(x, w[0] if w else None)
    return x, y, w[0] if w else None


def _refuse_stream_weights(x: Any, weights: Any) -> None:
    """Sample weights given beside a dataset or an iterable of batches: refused (they give
    their own)."""
    if weights is not None and is_stream(x):
        raise InputError("sample_weight= needs arrays x and y; a dataset or an iterable of "
                         "batches gives its sample weights itself, as (x, y, sample_weight) "
                         "batches or (x_i, y_i, w_i) samples")


def _weights_name(what: str) -> str:
    """How the sample weights of the data called ``what`` are named in errors."""
    return "sample_weight" if what == "x" else f"the sample weights of {what}"


def _check_takes_sample_weight(train_step: Callable[..., Any]) -> None:
    """A ``train_step`` that a subclass overrides gets fit's sample weights as
    ``sample_weight=``: refused before training where it cannot take them (they would be
    lost)."""
    # (a method's function, whose signature is read once, not at every weighted step)
    if not _takes_sample_weight(getattr(train_step, "__func__", train_step)):
        raise InputError("this model's train_step(xb, yb) takes no sample_weight: give it a "
                         "sample_weight=None parameter (and pass it on to "
                         "super().train_step) to train with sample weights")


def _check_takes_a_batch(train_step: Callable[..., Any]) -> None:
    """A ``train_step`` that a subclass overrides is called as ``train_step(xb, yb)``: refused
    before training where it takes one argument, as Keras 3's ``train_step(self, data)``
    does (was: a bare TypeError from the first step)."""
    try:
        params = inspect.signature(train_step).parameters.values()
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise InputError(
            f"this model's train_step takes {len(positional)} argument(s) "
            f"({', '.join(p.name for p in positional) or 'none'}); fit calls it as "
            "train_step(xb, yb), and with sample weights train_step(xb, yb, sample_weight=wb) "
            "(Keras' train_step(self, data) gets data = (xb, yb) instead): define "
            "train_step(self, xb, yb, sample_weight=None) and return super().train_step(xb, "
            "yb, sample_weight=sample_weight) or your own (loss, correct count)")


@functools.lru_cache(maxsize=16)
def _takes_sample_weight(train_step: Callable[..., Any]) -> bool:
    """Whether ``train_step`` has a ``sample_weight`` parameter (or takes any keyword); True
    where no signature can be read (it is called, and may fail)."""
    try:
        params = inspect.signature(train_step).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "sample_weight" or p.kind is p.VAR_KEYWORD for p in params)
