"""One training step: :class:`TrainingStep`, the base class of :class:`~xpcnn.training.Trainer`.

A step is one batch's forward pass, loss, backward pass and optimiser update, all queued on the
device with no host read (``_device_step``): the batch's loss and correct count are added to
running totals there (:mod:`xpcnn.totals`), and a step whose loss or gradients are not finite
is recorded there, its update (and every later one) skipped. The host reads the totals behind
the steps (every :data:`~xpcnn.totals.READ_EVERY` steps, in fit's logs, in ``train_on_batch``)
and only then raises what those steps deferred: :class:`~xpcnn.errors.NonFiniteError` naming
the step and the layer, :class:`~xpcnn.errors.InputError` for labels that are no class (or
``train_step``'s sample weights below 0 or not finite). On
CuPy the step is captured in a CUDA graph and replayed (:mod:`xpcnn.cuda_graphs`) where the
model allows it.

The file reads in the order of a step: ``train_step`` (checked) and ``_train_step`` (fit's,
on batches it checked), the logs of the totals and ``train_on_batch``, the checks of a
batch, the step on the device (``_device_step``, ``_loss_and_grads``, the class weights); its
capture in a CUDA graph; the running totals and the deferred errors.

:class:`TrainingStep` sets up no state of its own: :class:`~xpcnn.training.Trainer`'s
``__init__`` does (the loss, the optimiser, the metrics, the loss scale, the running totals,
the captured graphs, the class weights). It needs these hooks:

* from the model (:class:`~xpcnn.model.Model`): those of :class:`NetworkHooks`;
* from :class:`~xpcnn.training.Trainer`: compile's ``_require_compiled(what)`` and
  ``_check_loss_outputs(loss)``; ``_running_alone(what, nested)`` (one thread trains);
  ``fit`` sets ``_parallel`` (its data-parallel mode) and
  ``_class_weights`` for its steps.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .. import checks, distributed
from ..backend import dtype_name
from ..cuda_graphs import StepGraphs, layer_blockers
from ..cuda_graphs import blockers as graph_blockers
from ..data.arrays import (
    check_arrays,
    check_on_device,
    check_real_images,
    check_sample_weights,
    to_device,
)
from ..data.replay import replay_of
from ..data.sources import ArrayBatches, DatasetBatches
from ..data.streams import IterableBatches
from ..errors import InputError, NonFiniteError, warn
from ..layers.base import Layer, RandomLayer, end_training_passes
from ..losses import SoftmaxCrossEntropy
from ..ops.kernels import compute_scope, kernels_for
from ..ops.step_record import BAD_GRADS, BAD_LOSS, BAD_STEP
from ..totals import READ_EVERY, SCALE_RANGE, RunningTotals

if TYPE_CHECKING:
    from ..backend import Backend
    from ..graph import Plan


@runtime_checkable
class NetworkHooks(Protocol):
    """What training needs from the network, which :class:`~xpcnn.model.Model` supplies
    (:class:`TrainingStep` and :class:`~xpcnn.training.Trainer` know nothing of how its layers
    are connected)."""

    backend: Backend
    name: str
    seed: int
    dtype_name: str  # (the parameters' dtype)
    layers: list[Layer]
    built: bool
    _input_shape: tuple[int, ...] | None  # (per sample; input_shape has the batch axis)
    _builds: int  # (how many times its layers were built: a captured step is redone)

    @property
    def _param_dtype(self) -> Any:
        """The parameters' dtype on the backend."""

    @property
    def num_classes(self) -> int: ...

    def build(self, input_shape: tuple[int | None, ...]) -> None: ...

    def _require_built(self, what: str) -> None: ...

    def _trained(self) -> tuple[Layer, ...]:
        """The layers the optimiser updates, kept between steps."""

    def _rebuild_if_shared(self) -> None:
        """Build the layers another model shares as this one needs them."""

    def _unbuilt_if_refused(self) -> AbstractContextManager[None]:
        """A context: a call refused inside it leaves an unbuilt model unbuilt."""

    def _shared_pass(self) -> AbstractContextManager[None]:
        """A context around a pass: no other thread's build changes the layers under it."""

    def _fused_softmax(self) -> bool:
        """Whether the network ends in a softmax, which the loss applies."""

    def _logits(self, x: Any, training: bool, in_scope: bool = False) -> Any:
        """The forward pass to the logits (a final Softmax left to the loss; ``in_scope``:
        inside the backend's ``compute_scope`` already)."""

    def _backward(self, dz: Any, on_layer: Callable[[Layer], None] | None = None) -> None:
        """The backward pass: fills each trainable layer's ``grads``."""

    def _layer_outputs(self, x: Any, training: bool) -> list[Any]:
        """Every layer's output (to name where a value stopped being finite)."""

    def _plan(self) -> Plan:
        """The network's plan (which layers train)."""

    def _slots_outdated(self) -> bool:
        """Whether the optimiser's state is for other layers than the next step trains."""

    def _slots_restored(self) -> None:
        """The optimiser's slots were just set (from a checkpoint) for the layers trained
        now."""


def _in_one_thread(what: str, nested: bool = False) -> Callable[[Callable[..., Any]],
                                                               Callable[..., Any]]:
    """A call that changes the model's training state (``what``: fit, compile,
    train_on_batch, train_step), refused where another thread runs one of them (or moves
    the model): its steps would interleave with the other's on the same layers and fail deep
    inside, or corrupt them. ``nested``: allowed inside one of them from the same thread (a
    callback of fit), as fit itself is not (see ``Trainer._running_alone``)."""
    def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            with self._running_alone(what, nested):
                return call(self, *args, **kwargs)
        return guarded
    return wrap


if TYPE_CHECKING:  # (a type checker sees the model's hooks on self; at run time, the model's)
    _Network = NetworkHooks
else:
    _Network = object


class TrainingStep(_Network):
    """One training step, its capture in a CUDA graph and the running totals the host reads
    behind the steps: the base class of :class:`~xpcnn.training.Trainer` (see this module's
    docstring for the hooks it needs)."""

    # -- one training step ----------------------------------------------------------------------
    @_in_one_thread("train_step", nested=True)
    def train_step(self, xb: Any, yb: Any, sample_weight: Any = None) -> tuple[Any, Any]:
        """One forward, backward and update on a batch of device arrays, queued without waiting
        for the device: ``xb`` images (uint8 or float: cast on the device; booleans as 0/1),
        ``yb`` integer labels (N,) or one-hot rows (N, classes) (booleans as 0/1; rows of
        integers or booleans cast to floats on the device, as fit takes them),
        ``sample_weight`` None or each sample's weight in the loss (N,) (inside ``fit``, its
        ``class_weight`` weighs the loss too).
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
        next reads the totals. No step ever trains on labels that match no class. So with
        the weights: one below 0 or not finite makes the step's loss NaN (skipped), and
        :class:`InputError` names ``sample_weight``, as fit refuses it.
        """
        xb, yb = self._check_step_batch(xb, yb)
        if sample_weight is not None:
            self._check_step_weights(xb, sample_weight)
        with compute_scope(self.backend):
            stats = self._train_step(xb, yb, keep=True, weights=sample_weight, checked=False)
        return stats[0], stats[1]

    def _train_step(self, xb: Any, yb: Any, keep: bool, weights: Any = None,
                    checked: bool = True) -> Any:
        """:meth:`_one_step`, inside the model's ``_shared_pass()`` across the whole step (its
        forward, backward and update: no other thread builds or rebuilds its layers meanwhile)."""
        with self._shared_pass():
            try:
                return self._one_step(xb, yb, keep, weights, checked)
            except BaseException:
                # (stopped between a user's layer's forward and its backward, Ctrl-C or an
                # error: its inference passes run on it again, not on throwaway copies)
                end_training_passes()
                raise

    def _one_step(self, xb: Any, yb: Any, keep: bool, weights: Any = None,
                  checked: bool = True) -> Any:
        """:meth:`train_step` on a batch that passed its checks (or fit's, made and checked
        by fit), inside the backend's ``compute_scope``: the step, captured or replayed where
        it can be, and its record in the running totals. Returns the batch's [loss, correct
        count, top-k counts...]; after a replay they are the graph's own outputs, which the
        next replay rewrites, unless ``keep`` asks for copies. ``weights``: the samples'
        weights (N,) or None; ``checked``: their values were checked on the host (fit's,
        train_on_batch's), else (train_step's) on the device, :func:`_nan_unless_weights`."""
        # (first: an earlier step's deferred error, read here where a layer was frozen since,
        # is raised before anything of this step changes the model, its optimiser's slots too)
        totals = self._running_totals()  # (the layers are built as needed: _shared_pass)
        opt = self.optimizer
        if opt.slots and self._slots_outdated():  # type: ignore[union-attr]
            # (dropped before the step is captured: a capture would record their making)
            opt.slots = {}  # type: ignore[union-attr]
        # (a data-parallel step runs uncaptured: its allreduces are outside any graph)
        graphs = None if self._parallel is not None else self._step_graphs()
        step = self.optimizer.iterations + 1  # type: ignore[union-attr]
        # (outside the captured step, which fit's checked weights replay too)
        used = weights if checked or weights is None else _nan_unless_weights(
            self.backend.xp, weights, totals.nan)
        stats = None if graphs is None else graphs.run(xb, yb, used)
        if stats is None:
            stats = self._device_step(xb, yb, step, weights=used)
        elif keep:
            stats = self.backend.xp.asarray(stats, copy=True)
        # (its input batch is read again for a deferred error where the source can: not held;
        # unchecked weights are kept, as the labels are, to be checked and named then)
        totals.note(step, xb, yb, replay_of(xb), None if checked else weights)
        totals.seen += self._global_batch(xb)
        self._last_stats = stats
        if len(totals.pending) >= READ_EVERY:
            self._read_totals()
        return stats

    @property
    def metrics_names(self) -> tuple[str, ...]:
        """What :meth:`~xpcnn.training.Trainer.evaluate` and :meth:`train_on_batch` return, in
        order (as in Keras): ``("loss", "accuracy")`` (``("loss", "acc")`` for
        ``metrics=["acc"]``), or ``("loss",)`` for a model compiled without metrics."""
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

    @_in_one_thread("train_on_batch", nested=True)
    def train_on_batch(self, x: Any, y: Any, sample_weight: Any = None,
                       class_weight: Mapping[int, float] | None = None,
                       return_dict: bool = False) -> float | list[float] | dict[str, float]:
        """One training step on one batch of host or device arrays, checked at once (the host
        waits for the device): its ``[loss, accuracy]`` (the loss alone without metrics, a dict
        with ``return_dict``, as in Keras), or :class:`NonFiniteError`. ``sample_weight`` and
        ``class_weight`` weigh the loss as :meth:`~xpcnn.training.Trainer.fit`'s do. A
        ``train_step`` that a subclass overrides is called and logged as fit calls and logs it:
        super's record of the step where it called ``super().train_step``, else the (loss,
        correct count) it returns."""
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
        if self._train_step_overridden():  # (refused before any step, as fit refuses it)
            _check_takes_a_batch(self.train_step)
        self._rebuild_if_shared()
        with self._unbuilt_if_refused():
            x, targets = check_arrays(self, x, y)
            self._check_loss_outputs(self.loss)  # type: ignore[arg-type]
            weights = None if sample_weight is None else check_sample_weights(
                self, sample_weight, int(x.shape[0]))
            table = None if class_weight is None else checks.as_class_weights(
                class_weight, self.num_classes, self.dtype_name)
            if table is not None and weights is not None:
                checks.check_weighted_classes(weights, self.backend.to_numpy(targets), table)
        # (inside a fit, from a callback: fit's class weights are put back after the step)
        previous = self._use_class_weights(table)
        self._last_stats = None
        try:
            with compute_scope(self.backend):
                xb, yb, wb = (to_device(self.backend, a) for a in (x, targets, weights))
                if self._train_step_overridden():
                    out = self._call_train_step(xb, yb, wb)
                    if self._last_stats is None:  # (its own step, no super().train_step)
                        loss, correct = _returned_pair(out)
                else:  # (checked above, as fit's batches: train_step's checks would repeat,
                    # its weights' on the device too)
                    self._train_step(xb, yb, keep=True, weights=wb)
        finally:
            self._class_weights = previous
        self._read_totals()
        n = int(x.shape[0])
        if self._last_stats is not None:
            # (super().train_step ran: its record of the step, as fit logs it, whatever the
            # override returns, Keras' dict of logs included)
            loss, correct, *tops = (float(v) for v in self.backend.to_numpy(self._last_stats))
        else:  # (a subclass's own step counted no top-k metric)
            tops = [0.0] * len(self._top_ks)
        return self._returned(self._logs_of([float(loss), float(correct) / n,
                                              *(t / n for t in tops)]), return_dict)

    def _check_step_batch(self, xb: Any, yb: Any) -> tuple[Any, Any]:
        """What :meth:`train_step` checks on the host, from the arrays' shapes and dtypes
        alone: the model compiled and built, both arrays on its device, at least one image (on
        one process) of its sample shape, labels of the batch's length (integers only: fit
        turns whole-number floats into them on the host). Returns the two arrays as the step
        takes them: booleans as uint8, integer rows (N, classes) as floats, cast on the device
        (as fit casts them on the host)."""
        self._require_compiled("train_step")
        self._require_built("train_step")
        self._check_loss_outputs(self.loss)  # type: ignore[arg-type]
        check_on_device(xb, self.backend, "x", instead="")
        check_on_device(yb, self.backend, "y", instead="")
        checks.check_sample_shape(xb, self._input_shape)  # type: ignore[arg-type]
        if not xb.shape[0] and self._parallel is None:  # (a rank's part may be empty, not a batch)
            raise InputError(f"x is empty: a training step needs at least one sample; got "
                             f"x.shape = {tuple(xb.shape)}")
        xp = self.backend.xp
        with self.backend.on_device():
            xb, yb = (xp.astype(a, xp.uint8) if a.dtype == xp.bool else a for a in (xb, yb))
            if yb.ndim == 2 and tuple(yb.shape)[1] == self.num_classes and \
                    checks.real_numbers(xp, yb.dtype) and not checks.real_floating(xp, yb.dtype):
                yb = xp.astype(yb, self._param_dtype)  # (integers; bfloat16 is no NumPy dtype)
        check_real_images(xb, xp)
        floating = checks.real_floating(xp, yb.dtype)  # (bfloat16 included)
        checks.check_label_layout(tuple(yb.shape),
                                  not floating and checks.real_numbers(xp, yb.dtype),
                                  yb.ndim == 2 and floating, yb.dtype, int(xb.shape[0]),
                                  self.num_classes)
        return xb, yb

    def _check_step_weights(self, xb: Any, weights: Any) -> None:
        """:meth:`train_step`'s ``sample_weight``, from its shape and dtype: floats on the
        model's device, one a sample (their values are checked on the device, with no host
        read: :meth:`_one_step`)."""
        check_on_device(weights, self.backend, "sample_weight", instead="")
        if tuple(weights.shape) != (xb.shape[0],) or not checks.real_floating(
                self.backend.xp, weights.dtype):
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
        # (la.state first: no property call a step for the layers without state)
        moving = [a for la in self.layers if la.state and la.moves_state
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
            # (the gradients are dropped once applied, as PyTorch's zero_grad(set_to_none=True):
            # else the next step's peak holds them beside its own; a captured step keeps its
            # gradients, which live in the graphs' own memory pool all the same)
            del grads
            for la in trained:
                la.grads.clear()
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
        # weighting, which for a power-of-two scale gives the same values as after; the class
        # weights looked up by the loss, in its kernel on a GPU)
        stats, dz = self.loss.forward_with_accuracy(
            xp, logits, yb, self._param_dtype, kernels, self._scaling, weights,
            self._class_weights)
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
        # (the backend's kernel where it has one: one launch on CuPy for every k)
        counts = kernels_for(self.backend).top_k_counts(logits, yb, self._top_ks, stats.dtype)
        return self.backend.xp.concat([stats, counts])

    def _check_class_products(self, data: Any, table: np.ndarray) -> None:
        """Refuse, before training, arrays' sample weights whose products with fit's class
        weights ``table`` overflow the model's dtype; a stream's or dataset's batches are
        checked as they come (its ``_checks``, which also check their sample weights)."""
        if isinstance(data, DatasetBatches | IterableBatches):
            data._checks.class_weights = table
        elif isinstance(data, ArrayBatches) and data.host_weights is not None and \
                data.host_targets is not None:
            checks.check_weighted_classes(data.host_weights,
                                          self.backend.to_numpy(data.host_targets), table)

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

    def _train_step_overridden(self) -> bool:
        """True where ``train_step`` is a subclass's or set on the model itself: fit calls it
        for each step, as Keras does."""
        return type(self).train_step is not TrainingStep.train_step or \
            "train_step" in vars(self)

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
        reasons = graph_blockers(self.backend) + layer_blockers(self.layers)
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
            # (a layer's or a loss's setting changed, another loss, the layers built again (a
            # shared layer's arrays without weights, as AvgPool2D's table, are new), as cuDNN's
            # switches, choose other captured work)
            switches=lambda: (Layer.settings_changes, SoftmaxCrossEntropy.settings_changes,
                              self.loss, self._builds,
                              kernel_switches() if kernel_switches is not None else None),
            blockers=lambda: layer_blockers(self.layers))
        return self._graphs

    def _graph_arrays(self, named: bool = True) -> list[Any]:
        """Every array that outlives a training step, parameters first (see StepGraphs), as
        (name, array) pairs; the arrays alone, in the same order, where not ``named`` (what a
        replay checks: no names formatted for it)."""
        layers, opt = self.layers, self.optimizer
        assert opt is not None
        if not named:  # (every replay: plain lists, no record per array; the same order as the
            # records below, which tests/test_cuda_graphs.py checks; list comprehensions, as
            # generators cost a call per item)
            return ([a for la in layers for a in la.params.values()]
                    + [a for la in layers for a in la.state.values()]
                    + [a for v in opt.slots.values() for a in v]
                    + ([] if opt.applied is None else [opt.applied])
                    + [la.random_state for la in layers if isinstance(la, RandomLayer)]
                    + [self._running_totals().state]
                    + ([] if self._scaling is None else [self._scaling])
                    + ([] if self._class_weights is None else [self._class_weights]))
        # (one list of records: the name's template, the array, the name's parts)
        records = (
            [("param {}.{}", a, la.name, k) for la in layers for k, a in la.params.items()]
            + [("state {}.{}", a, la.name, k) for la in layers for k, a in la.state.items()]
            + [("optimizer slot {}.{}", a, k, i) for k, v in opt.slots.items()
               for i, a in enumerate(v)]
            + ([] if opt.applied is None else [("optimizer applied updates", opt.applied)])
            + [("random state {}", la.random_state, la.name) for la in layers
               if isinstance(la, RandomLayer)]
            + [("the running totals", self._running_totals().state)]
            + ([] if self._scaling is None else [("the loss scale", self._scaling)])
            + ([] if self._class_weights is None
               else [("the class weights", self._class_weights)]))
        return [(r[0].format(*r[2:]), r[1]) for r in records]

    # -- the running totals the host reads behind the steps; deferred errors --------------------
    def _running_totals(self) -> RunningTotals:
        old, trained, top_ks = self._totals, self._trained(), self._top_ks
        if old is None or self._totals_for != trained or old.backend is not self.backend or \
                self._totals_ks != top_ks:
            # (a layer frozen or unfrozen, the model moved, compiled with other top-k metrics:
            # the steps not read yet are read first, so that a skipped one is named, not lost,
            # and the epoch's sums go on; the top-k ones where they count the same k's, else
            # they count from here: _top_k_from)
            sums = self._read_totals() if old is not None else [0.0, 0.0]
            owners = [(la, k) for la in trained for k in la.params]
            self._totals = RunningTotals(self.backend, len(owners), len(top_ks))
            same = old is not None and self._totals_ks == top_ks
            if old is not None and not same:
                self._top_k_from = old.seen
            self._owners, self._totals_for, self._totals_ks = owners, trained, top_ks
            self._totals.reset(sums[0], sums[1], old.seen if old is not None else 0.0,
                               sums[2:] if same else ())
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
            noted = batches[step]
            self._raise_for_labels(noted.yb, step)
            self._raise_for_sample_weights(noted.wb, step)
            self._raise_for_weights(f"the loss is {loss}", step)  # (no batch needed)
            anew = noted.read_anew  # (before the read)
            self._raise_non_finite(f"the loss is {loss}",
                                   noted.input_batch(step, f"the loss is {loss}"), step, anew)
        flags = list(zip(self._owners, host[BAD_GRADS:BAD_GRADS + len(self._owners)],
                         strict=True))
        bad = [la for (la, _), flag in flags if flag == 1]
        squares = [owner for owner, flag in flags if flag == 2]
        if bad and (self._scaling is None or not squares):
            # (with float16 loss scaling, an overflow alone is an error only at the scale's
            # floor: the step kept the scale, and float16 cannot hold these gradients at any)
            floor = "" if self._scaling is None else (
                f"; the float16 loss scale reached its floor, {SCALE_RANGE[0]:.4g} (float32's "
                "smallest normal number), and still float16 cannot hold these gradients: "
                "train with precision='float32' or 'mixed_bfloat16'")
            # Backpropagation runs from the last layer: the last one with a non-finite
            # gradient is where it appeared.
            raise NonFiniteError(f"non-finite gradient at step {step}: it first appears (in "
                                 f"backpropagation order) in layer {bad[-1].name!r}{floor}")
        # (a square overflow is of the unscaled gradient: no loss scale fixes it)
        layer, name = squares[-1]
        # (the inputs' scale is a cause only where no layer brings them to a small range)
        scaled = any(la.input_values == "normalises" for la in self.layers)
        raise NonFiniteError(f"training stopped at step {step}: the gradient of layer "
                             f"{layer.name!r} ({name}) is so large that its squares overflow, "
                             "and the optimiser's state would become infinite; nothing was "
                             "updated from that step on (a learning rate too large for the "
                             "steps before it?" + ("" if scaled else " are the inputs scaled? "
                                                   "a Rescaling or Normalization layer brings "
                                                   "them to a small range") + ")")

    def _raise_for_labels(self, yb: Any, step: int) -> None:
        """Raise :class:`InputError` where the labels of step ``step`` are not all classes (the
        loss made that step's loss NaN for them,
        :meth:`SoftmaxCrossEntropy.forward_with_accuracy`), named as ``fit`` names them."""
        if yb.shape[0]:  # (not this rank's empty part of a short batch)
            with _stopped_at(step):
                checks.as_labels(self.backend.to_numpy(yb), int(yb.shape[0]), self.num_classes)

    def _raise_for_sample_weights(self, wb: Any, step: int) -> None:
        """Raise :class:`InputError` where train_step's ``sample_weight`` of step ``step``
        (None: none, or checked on the host) holds one below 0 or not finite (the step made
        its loss NaN for it, :func:`_nan_unless_weights`), named as ``fit`` names it."""
        if wb is not None and wb.shape[0]:  # (not this rank's empty part of a short batch)
            with _stopped_at(step):
                checks.as_sample_weights(self.backend.to_numpy(wb), int(wb.shape[0]),
                                         dtype=self.dtype_name)

    @contextlib.contextmanager
    def _put_back(self) -> Any:
        """Around the passes that only look (a training-mode one too, which updates BatchNorm's
        statistics and draws random numbers): every layer's attributes as they were
        (what backward would read, ``_backward_ready``, a user's layer's own), and its
        ``state`` (BatchNorm's moving statistics) and a random layer's ``random_state`` (its
        draws) written back in place (a captured step reads those arrays), so that the model
        is as the step before left it (an attribute's object changed in place excepted)."""
        xp = self.backend.xp
        kept = [(la, dict(vars(la)), dict(la.state),
                 {k: xp.asarray(a, copy=True) for k, a in la.state.items()})
                for la in self.layers]
        draws = [(la.random_state, xp.asarray(la.random_state, copy=True))
                 for la in self.layers if isinstance(la, RandomLayer) and la.built]
        try:
            yield
        finally:
            for la, attributes, state, values in kept:
                vars(la).clear()
                vars(la).update(attributes)
                la.state.clear()  # (the same dict: its entries as they were)
                la.state.update(state)
                for k, a in state.items():
                    a[...] = values[k]
            for array, value in draws:  # (the array itself is back with the attributes)
                array[...] = value

    def _raise_for_weights(self, what: str, step: int) -> None:
        """Raise :class:`NonFiniteError` where a layer's weights are not finite at step
        ``step``, whose loss is not (``what``): they were so before it, as the update of the
        step before left them (its loss and gradients finite, so it ran: an overflow of the
        update itself, which nothing undoes, as no copy of the weights is kept), or as they
        were set since. Checked only here, once training has stopped: a check of every
        weight at every step would cost a pass over them."""
        xp = self.backend.xp
        layer = next((la for la in self.layers if not all(
            bool(xp.all(xp.isfinite(a))) for a in la._arrays().values())), None)
        if layer is None:
            return
        cause = (f"the update of step {step - 1} itself overflowed them (its loss and "
                 "gradients were finite, the weights after it are not: a learning rate too "
                 "large?), or they were set so since (set_weights); the model holds them, "
                 f"that update included (optimizer.iterations {step - 1})" if step > 1 else
                 "they were set so before training (set_weights, a file); the model holds them")
        raise NonFiniteError(f"training stopped at step {step}: {what}; the first non-finite "
                             f"values appear in the weights of layer {layer.name!r}, not "
                             f"finite before that step: {cause}. Restore a checkpoint or the "
                             "weights you saved")

    def _raise_non_finite(self, what: str, xb: Any, step: int, anew: bool = False) -> None:
        """Name the step and the first layer whose output is not finite (the weights are, see
        :meth:`_raise_for_weights`), then raise. ``anew``: ``xb`` is the step's batch read
        again, whose values may differ (a dataset's random transforms): where it gives no
        non-finite output, no place is named."""
        xp = self.backend.xp
        where = "the loss"
        finite = lambda a: bool(xp.all(xp.isfinite(a)))  # noqa: E731
        if not finite(xb):
            where = "the input batch"
        else:
            x = xp.astype(xb, self._param_dtype, copy=False)
            with self._put_back(), compute_scope(self.backend):
                # (inference first; then training mode, for a layer's training-mode work alone:
                # batch statistics, a user's training-only scaling; the step ran in that mode)
                for training in (False, True):
                    layer, out = next(((la, out) for la, out in zip(
                        self.layers, self._layer_outputs(x, training), strict=True)
                        if not finite(out)), (None, None))
                    if layer is not None:
                        break
            if layer is not None:
                mode = " in training mode" if training else ""
                where = f"the output of layer {layer.name!r}{mode}"
                # (from finite inputs and weights: an overflow, most likely, which no loss
                # scale prevents in the forward pass; array_api_strict has no xp.float16)
                if dtype_name(out.dtype, float_only=False) == "float16":
                    where += (", computed in float16, which holds at most 65504: compile "
                              "with precision='mixed_bfloat16' (float32's range) or 'float32'")
            elif anew:
                ranks = ("; or another rank's batch made the loss summed over the ranks "
                         "non-finite (that rank's error names where)"
                         if self._parallel is not None else "")
                raise NonFiniteError(
                    f"training stopped at step {step}: {what}; its input batch, read again from "
                    "the dataset (no longer held), gives finite outputs in every layer (a "
                    "dataset's random transforms draw anew), so where the first non-finite "
                    f"values appear is not named{ranks}")
            elif self._parallel is not None:
                where = ("the loss summed over the ranks: this rank's batch and outputs are "
                         "finite, another rank's made it (that rank's error names where)")
        raise NonFiniteError(f"training stopped at step {step}: {what}; the first non-finite "
                             f"values appear in {where}")


@contextlib.contextmanager
def _stopped_at(step: int) -> Iterator[None]:
    """A deferred check's :class:`InputError`, told as what stopped training at ``step``."""
    try:
        yield
    except InputError as e:
        raise InputError(f"training stopped at step {step}: {e}; nothing was updated from "
                         "that step on") from None


def _nan_unless_weights(xp: Any, weights: Any, nan: Any) -> Any:
    """train_step's sample ``weights`` (N,) with ``nan`` (a 0-d NaN) in place of each one below
    0, on the device (two launches on a GPU, no host read): the weighted loss is then NaN, and
    the step skipped as a non-finite one, as a label that is no class skips it (a NaN or
    infinite weight makes the loss so as it is; a negative one would give a finite loss, and
    its gradient would train away from that sample's label)."""
    return xp.where(weights >= 0, weights, nan)


def _returned_pair(out: Any) -> tuple[Any, Any]:
    """The (loss, correct count) that a subclass's ``train_step`` which did not call
    ``super().train_step`` returned to train_on_batch (a pair, or any two numbers that unpack:
    an array of 2, say), else refused as fit refuses it."""
    try:
        if isinstance(out, Mapping | str):  # (Keras' dict of logs: its keys would unpack)
            raise TypeError
        loss, correct = out
    except (TypeError, ValueError):
        raise InputError("train_on_batch, as fit, takes what this model's train_step (which did "
                         "not call super().train_step) returns as the batch's (loss, correct "
                         f"count); it returned {type(out).__name__} {out!r:.80}") from None
    return loss, correct


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
    before training (fit) or its step (train_on_batch) where it takes one argument, as Keras
    3's ``train_step(self, data)`` does (was: a bare TypeError from the first step)."""
    try:
        params = inspect.signature(train_step).parameters.values()
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise InputError(
            f"this model's train_step takes {len(positional)} argument(s) "
            f"({', '.join(p.name for p in positional) or 'none'}); fit calls it as "
            "train_step(xb, yb) (train_on_batch too), and with sample weights "
            "train_step(xb, yb, sample_weight=wb) (Keras' train_step(self, data) gets data = "
            "(xb, yb) instead): define train_step(self, xb, yb, sample_weight=None) and "
            "return super().train_step(xb, yb, sample_weight=sample_weight) or your own (loss, "
            "correct count)")


@functools.lru_cache(maxsize=16)
def _takes_sample_weight(train_step: Callable[..., Any]) -> bool:
    """Whether ``train_step`` has a ``sample_weight`` parameter (or takes any keyword); True
    where no signature can be read (it is called, and may fail)."""
    try:
        params = inspect.signature(train_step).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "sample_weight" or p.kind is p.VAR_KEYWORD for p in params)
