"""Model: a graph of layers that trains, evaluates and predicts; Sequential: a stack of layers.

``Model(inputs, outputs)`` is the functional model of Keras, traced from symbolic tensors
(:func:`xpcnn.Input`); ``Sequential`` is the chain of its layers. Both run through the same
executor (:mod:`xpcnn.graph`) and the same training loop.

Data enters as arrays in (N, H, W, C) (or datasets, see :mod:`xpcnn.data`); each batch crosses
to the device once (a training set that fits :data:`xpcnn.data.DEVICE_BUDGET_BYTES` crosses once
in all), is cast there and runs forward and backward through the layers; the loss and correct
count stay on the device until the host reads them (:mod:`xpcnn.totals`). With a cross-entropy
loss and a final Softmax layer, training feeds the Softmax's input (the logits) to the fused,
stable softmax cross-entropy; ``predict`` still returns probabilities.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import checks, distributed, graph
from .backend import Backend, DeviceLike, get_backend
from .callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    History,
    LazyLogs,
    ProgbarLogger,
    callback_list,
)
from .cuda_graphs import StepGraphs
from .cuda_graphs import blockers as graph_blockers
from .data import (
    ArrayBatches,
    Batches,
    DatasetBatches,
    IterableBatches,
    check_arrays,
    is_map_dataset,
    is_stream,
    to_device,
)
from .errors import InputError, NonFiniteError
from .layers.activation import Softmax
from .layers.base import Layer, SymbolicTensor, refuse_training_in_graph
from .layers.dropout import RandomLayer
from .losses import SoftmaxCrossEntropy, get_loss
from .ops.kernels import kernels_for
from .ops.softmax import softmax
from .optim import Optimizer, get_optimizer
from .saving import load_weights, register_model, save_model
from .structure import check_structure
from .totals import (
    BAD_GRADS,
    BAD_LOSS,
    BAD_STEP,
    CORRECT,
    LOSS_SUM,
    READ_EVERY,
    RunningTotals,
    loss_scaling,
)

PRECISIONS = {"float32": None, "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@register_model
class Model:
    """A network of layers from one input to one output, as Keras' functional API has it::

        inputs = xpcnn.Input((32, 32, 3))
        x = Conv2D(16, 3, padding="same", use_bias=False)(inputs)
        y = Conv2D(16, 3, padding="same")(ReLU()(BatchNorm2D()(x)))
        outputs = Softmax()(Dense(10)(GlobalAvgPool2D()(Add()([x, y]))))
        model = xpcnn.Model(inputs, outputs, device="cpu", seed=0)

    It owns compile, fit, evaluate, predict, train_step, the non-finite checks, weights,
    save/load_weights, to(device) and summary; :class:`Sequential` is the chain of layers.

    ``device`` picks the array library and device (see :func:`xpcnn.backend.get_backend`),
    ``seed`` the initial weights (the same on every device), ``dtype`` the parameters' dtype.
    Building gives layer ``k`` fresh weights from the seed ``[seed, k]``, unless it is already
    built: then it keeps its weights (a trained model used inside another, as in Keras), on
    this device and in this dtype, and for inputs of another size where its weights keep their
    shapes (a convolution); a layer whose weights would need other shapes is refused. A model
    whose shared layers another model built since for its own inputs builds them again for
    its own before it runs (fit, evaluate, predict, train_on_batch, forward).

    :attr:`layers` (and :meth:`get_weights`, layer by layer) come in the order the layers were
    called on symbolic tensors, a topological order. A tensor read by several layers receives
    the sum of their gradients. A layer may appear once in a graph: shared layers (one layer
    called twice) are refused with an error, since a layer keeps one forward pass for its
    backward. A model called on a symbolic tensor adds its layers to the graph being traced
    (a Sequential block inside a Model: the layers are shared by both).

    The training loop reaches the network through the executor's methods below (``build``,
    ``_logits``, ``_backward``, ``_layer_outputs``), all here: a subclass only says which
    tensors each layer reads (:class:`Sequential` overrides ``_inbound``: a chain).
    """

    def __init__(self, inputs: SymbolicTensor | None = None,
                 outputs: SymbolicTensor | None = None, *, device: DeviceLike = "cpu",
                 seed: int = 0, dtype: str = "float32", name: str = "model") -> None:
        self.backend: Backend = get_backend(distributed.device_for_rank(device))
        if dtype not in ("float32", "float64"):
            raise InputError(f"model dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype_name = dtype
        self.seed = checks.non_negative_int(seed, "seed")
        self.name = checks.name(name, "model name")
        self.layers: list[Layer] = []
        self.input_shape: tuple[int, ...] | None = None
        self.loss: SoftmaxCrossEntropy | None = None
        self.optimizer: Optimizer | None = None
        self.precision = "float32"
        self.built = False
        self.history = History()
        self.stop_training = False
        self._scaling: Any = None  # float16 loss scaling on the device (see xpcnn.totals)
        self._totals: RunningTotals | None = None
        self._parallel: distributed.DataParallel | None = None  # set by fit on several ranks
        self._resume_at: Any = None  # where BackupAndRestore restarts a run
        self._position = (0, 0)  # (epoch, batches done in it) during fit
        self.cuda_graphs: bool | None = None
        #: Why training steps run without CUDA graphs ("" while they are captured, or will be).
        self.cuda_graphs_reason = ""
        self._graphs: StepGraphs | None = None
        self._graph: list[graph.Inbound] = []
        self._plan_cache: tuple[tuple[bool, ...], graph.Plan] | None = None
        if inputs is not None or outputs is not None:
            self._set_graph(*graph.trace(inputs, outputs))
            self.build(graph.input_shape_of(inputs))

    def _set_graph(self, layers: list[Layer], inbound: list[graph.Inbound]) -> None:
        graph.check_graph(layers, inbound)
        # Built layers may be held by other models, which show their names: they keep them
        # (the first of two alike does), and new layers are renamed where a name is taken.
        taken: set[str] = set()
        for layer in sorted(layers, key=lambda la: not la.built):
            _give_unique_name(layer, taken)
            taken.add(layer.name)
        self.layers = list(layers)
        self._graph = list(inbound)

    def _inbound(self) -> list[graph.Inbound]:
        """What each layer reads (see :mod:`xpcnn.graph`)."""
        return self._graph

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        """On a symbolic tensor: calls every layer of this model on it, so that the model
        becomes part of a functional :class:`Model` (its layers are shared: training that
        model trains them). ``training`` is refused (see
        :func:`~xpcnn.layers.base.refuse_training_in_graph`)."""
        if not isinstance(x, SymbolicTensor):
            raise InputError(f"a model is called on a symbolic tensor (to use it in a functional "
                             f"Model), got {type(x).__name__}; predict(x) runs it on a batch")
        refuse_training_in_graph(f"model {self.name!r}", training)
        values = [x]
        for layer, ins in zip(self.layers, self._inbound(), strict=True):
            values.append(layer(graph.read_by(layer, ins, values)))
        return values[-1]

    # -- the graph and its executor ------------------------------------------------------------
    def build(self, input_shape: tuple[int, ...]) -> None:
        """Create every layer's weights for per-sample ``input_shape``, e.g. (32, 32, 3)."""
        if not self.layers:
            raise InputError("the model has no layers: add() some before building it")
        ok = isinstance(input_shape, tuple | list) and all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) for d in input_shape)
        shape = tuple(int(d) for d in input_shape) if ok else ()
        if not shape or any(d < 1 for d in shape):
            raise InputError(f"input_shape must be positive sizes such as (H, W, C), got "
                             f"{input_shape!r}")
        graph.check_graph(self.layers, self._inbound())
        check_structure(self.layers)
        self.input_shape = shape
        self._build_layers()
        if self.optimizer is not None:
            self.optimizer.slots = {}

    def _build_layers(self) -> None:
        graph.build(self.layers, self._inbound(), self.input_shape, self.backend,
                    self.dtype_name, self._compute_dtype_name, self.seed)
        self._plan_cache = None
        # (its own, whatever a layer it shares with another model is built for since)
        self._output_shape: tuple[int, ...] = self.layers[-1].output_shape
        self.built = True

    @property
    def _compute_dtype_name(self) -> str:
        return PRECISIONS[self.precision] or self.dtype_name

    def _rebuild_if_shared(self) -> None:
        """Build again where a layer shared with another model was built since for that
        model's inputs or precision (it keeps its weights): each model runs its layers as
        built for it. The optimiser's state stays, as the weights it follows do."""
        if self.built and not graph.built_as(self.layers, self._inbound(), self.input_shape,
                                             self.backend, self.dtype_name,
                                             self._compute_dtype_name):
            self._build_layers()

    @property
    def output_shape(self) -> tuple[int, ...]:
        self._require_built("output_shape")
        return self._output_shape

    def _fused_softmax(self) -> bool:
        """True when the network ends in a Softmax that is left to the loss (the plan stops
        at the logits)."""
        return isinstance(self.layers[-1], Softmax)

    def _plan(self) -> graph.Plan:
        """The compiled plan of the graph (see :mod:`xpcnn.graph`), compiled again when a
        layer is frozen or unfrozen: which layers need gradients changes, and so do the
        optimiser's parameters (its state starts afresh, as after a compile in Keras)."""
        key = tuple(la.trainable for la in self.layers)
        if self._plan_cache is None or self._plan_cache[0] != key:
            if self._plan_cache is not None and self.optimizer is not None:
                self.optimizer.slots = {}
            self._plan_cache = (key, graph.compile_plan(self.layers, self._inbound(),
                                                        self._fused_softmax()))
        return self._plan_cache[1]

    def _logits(self, x: Any, training: bool) -> Any:
        """Forward pass up to the logits, by the plan, of a device batch (cast to the
        parameters' dtype first)."""
        with self.backend.compute_scope():
            x = self.backend.xp.astype(x, self._param_dtype, copy=False)
            return graph.forward(self._plan(), x, training)

    def _backward(self, dz: Any, on_layer: Callable[[Layer], None] | None = None) -> None:
        """Backward pass from the logits' gradient, after ``_logits(x, training=True)``: fills
        every trainable layer's ``grads``, calling ``on_layer(layer)`` after each layer's
        backward."""
        graph.backward(self._plan(), dz, on_layer)

    def _layer_outputs(self, x: Any, training: bool) -> list[Any]:
        """Every layer's own output (no plan: each does its own work)."""
        return graph.each_output(self.layers, self._inbound(), x, training)

    # -- configuration -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The architecture as JSON-ready data, enough with the weights to rebuild the model:
        its class, name, seed, dtype, input shape, and each layer's class and constructor
        arguments, with the tensors it reads (``inbound``, see :mod:`xpcnn.graph`) unless it
        reads the layer before it, and ``trainable: false`` if frozen."""
        layers = []
        for k, (la, ins) in enumerate(zip(self.layers, self._inbound(), strict=True)):
            spec: dict[str, Any] = {"class": type(la).__name__, "config": la.get_config()}
            if ins != (k,):
                spec["inbound"] = list(ins)
            if not la.trainable:
                spec["trainable"] = False
            layers.append(spec)
        return {"class": type(self).__name__, "name": self.name, "seed": self.seed,
                "dtype": self.dtype_name, "input_shape": list(self.input_shape or []),
                "layers": layers}

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: list[Layer],
                    device: DeviceLike = "cpu") -> Model:
        """The unbuilt model that :meth:`get_config` describes, from its ``layers`` (made from
        the configuration's, see :mod:`xpcnn.saving.model_file`)."""
        model = cls(device=device, seed=int(config["seed"]), dtype=config["dtype"],
                    name=str(config["name"]))
        model._set_graph(layers, graph.inbound_of(config["layers"]))
        return model

    @property
    def num_classes(self) -> int:
        return int(self.output_shape[-1])

    @property
    def _param_dtype(self) -> Any:
        """The parameters' (master) dtype on this backend: losses and outputs are in it."""
        return self.backend.dtype(self.dtype_name)

    @property
    def loss_scale(self) -> float:
        """The dynamic float16 loss scale (1.0 unless ``mixed_float16``); reading it waits for
        the device."""
        return 1.0 if self._scaling is None else float(self.backend.to_numpy(self._scaling)[0])

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        if self._scaling is not None:
            value = checks.number(value, "loss_scale", 0.0, low_open=True)
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

    def compile(self, loss: str | SoftmaxCrossEntropy = "cross_entropy",
                optimizer: str | Optimizer = "adam",
                metrics: str | list[str] | tuple[str, ...] | None = ("accuracy",),
                precision: str = "float32", cuda_graphs: bool | None = None) -> None:
        """Choose the loss, the optimiser, the metrics (only ``"accuracy"``) and the precision.

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
        if not isinstance(metrics, str | list | tuple | None):
            raise InputError(f"metrics must be a list of names such as ['accuracy'], got "
                             f"{metrics!r}")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])  # None: Keras'
        unknown = [m for m in metrics if m not in ("accuracy", "acc")]
        if unknown:
            raise InputError(f"unknown metrics {unknown}; xpcnn supports 'accuracy'")
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")
        if PRECISIONS[precision] is not None:
            self.backend.dtype(PRECISIONS[precision])  # a clear error where the backend lacks it
        self.loss, self.optimizer = loss, self._own(optimizer)
        self.cuda_graphs, self._graphs, self.cuda_graphs_reason = cuda_graphs, None, ""
        self.precision = precision
        self._scaling = loss_scaling(self.backend, 2.0**15) if precision == "mixed_float16" \
            else None
        if self.built:
            compute = self.backend.dtype(self._compute_dtype_name)
            for layer in self.layers:
                layer.compute_dtype = compute

    def _own(self, optimizer: Optimizer) -> Optimizer:
        """``optimizer``, bound to this model: its slots and step count are one model's, and
        another model's steps would silently mix into them (or fail deep inside)."""
        owner = getattr(optimizer, "_model", lambda: None)()
        if owner is not None and owner is not self:
            raise InputError(f"this {type(optimizer).__name__} optimizer is already compiled into "
                             f"model {owner.name!r}: an optimizer holds one model's state (its "
                             "slots and step count), so each model needs one of its own; pass "
                             "a new one")
        optimizer._model = weakref.ref(self)
        return optimizer

    def _to_device(self, x: np.ndarray) -> Any:
        """One host -> device copy of a batch, then the cast on the device."""
        xb = self.backend.asarray(np.ascontiguousarray(x))
        return self.backend.xp.astype(xb, self._param_dtype)

    # -- one training step ---------------------------------------------------------------------
    def train_step(self, xb: Any, yb: Any) -> tuple[Any, Any]:
        """One forward, backward and update on a device batch (uint8 or float: it is cast on
        the device), queued without waiting for the device.

        Returns the batch's mean loss and correct count as 0-d device arrays. A non-finite loss
        or gradient is recorded on the device and its update (and every later one) skipped;
        :class:`NonFiniteError` names that step when the host next reads the running totals:
        ``fit`` reads them regularly (see :mod:`xpcnn.totals`), :meth:`train_on_batch` at once.
        """
        with self.backend.compute_scope():
            # (a data-parallel step runs uncaptured: its allreduces are outside any graph)
            graphs = None if self._parallel is not None else self._step_graphs()
            step = self.optimizer.iterations + 1  # type: ignore[union-attr]
            stats = None if graphs is None else graphs.run(xb, yb)
            if stats is None:
                stats = self._device_step(xb, yb, step)
            else:  # (a replay rewrites the graph's outputs: the caller gets copies)
                stats = self.backend.xp.asarray(stats, copy=True)
            totals = self._running_totals()
            totals.pending.append((step, xb))
            if len(totals.pending) >= READ_EVERY:
                self._read_totals()
            return stats[0], stats[1]

    def _device_step(self, xb: Any, yb: Any, step: Any, scalars: dict[str, Any] | None = None
                     ) -> Any:
        """Training step ``step`` on the device, with no host read: forward, loss, backward,
        the running totals and the update (skipped on the device where the step is not
        finite). With ``scalars`` (a step captured in a CUDA graph), ``step`` and the
        optimiser's per-step numbers are device scalars, and every array that outlives the
        step is updated in place. Returns the batch's [loss, correct count]."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        opt = self.optimizer
        assert opt is not None and self.loss is not None
        stats, grads = self._loss_and_grads(xb, yb, kernels)
        params = [p for la in self.trainable_layers for p in la.params.values()]
        if self._scaling is not None:
            inverse = 1.0 / self._scaling[0]
            grads = [g * inverse for g in grads]
        n = int(xb.shape[0]) if self._parallel is None else self._parallel.total
        apply, scaling = self._running_totals().add(stats, grads, n, step, self._scaling,
                                                    opt.keeps_squares)
        if scaling is not None:
            self._scaling[...] = scaling
        opt.step(xp, params, grads, kernels, apply=apply, scalars=scalars)
        return stats

    def _loss_and_grads(self, xb: Any, yb: Any, kernels: Any) -> tuple[Any, list[Any]]:
        """[loss, correct count] of a batch and the gradients of its (scaled) loss, in parameter
        order. On several ranks (``fit`` sets ``_parallel``), the batch is this rank's slice of
        the global batch: the stats come back for the global batch, and the gradients averaged
        over it."""
        xp, dp = self.backend.xp, self._parallel
        assert self.loss is not None
        if dp is not None and xb.shape[0] == 0:  # no sample of a short last batch here
            return dp.empty_step(xp.zeros((2,), dtype=self._param_dtype))
        logits = self._logits(xb, training=True)
        stats, dz = self.loss.forward_with_accuracy(xp, logits, yb, self._param_dtype, kernels)
        if dp is not None and dp.weight != 1.0:
            # weighted by this slice's share of the global batch, here, once: backward is
            # linear in dz, and the buckets then only copy and sum
            dz = dz * dp.weight
        if self._scaling is not None:
            dz = dz * self._scaling[0]
        if dp is None:
            self._backward(dz)
            return stats, [la.grads[k] for la in self.trainable_layers for k in la.params]
        dp.buckets.begin(dp.weight, stats)
        self._backward(dz, dp.buckets.layer_done)
        grads, stats = dp.buckets.finish()
        return stats, grads

    # -- CUDA graphs (xpcnn.cuda_graphs) ------------------------------------------------------
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
                warnings.warn(f"xpcnn: training steps run without CUDA graphs: {reasons[0]}",
                              RuntimeWarning, stacklevel=3)
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
        self._graphs = StepGraphs(
            lambda xb, yb, s: self._device_step(xb, yb, s["iteration"], s), self._graph_arrays,
            scalars, advance, self.backend, capturable, exact=("iteration",),
            capture_tables=getattr(kernels, "capture_tables", None))
        return self._graphs

    def _graph_arrays(self) -> list[tuple[str, Any]]:
        """Every array that outlives a training step, parameters first (see StepGraphs)."""
        params = [(f"param {la.name}.{k}", a) for la in self.layers for k, a in la.params.items()]
        state = [(f"state {la.name}.{k}", a) for la in self.layers for k, a in la.state.items()]
        slots = [(f"optimizer slot {k}.{i}", a)
                 for k, v in self.optimizer.slots.items()  # type: ignore[union-attr]
                 for i, a in enumerate(v)]
        randoms = [(f"random state {la.name}", la.random_state) for la in self.layers
                   if isinstance(la, RandomLayer)]
        totals = [("the running totals", self._running_totals().state)]
        scaling = [] if self._scaling is None else [("the loss scale", self._scaling)]
        return params + state + slots + randoms + totals + scaling

    def train_on_batch(self, x: Any, y: Any) -> dict[str, float]:
        """One training step on one batch of host or device arrays, checked at once (the host
        waits for the device): its ``loss`` and ``accuracy``, or :class:`NonFiniteError`."""
        self._require_compiled()
        self._rebuild_if_shared()
        x, targets = check_arrays(self, x, y)
        with self.backend.compute_scope():
            loss, correct = self.train_step(to_device(self.backend, x),
                                            to_device(self.backend, targets))
        self._read_totals()
        return {"loss": float(loss), "accuracy": float(correct) / int(x.shape[0])}

    def _running_totals(self) -> RunningTotals:
        n_grads = sum(len(la.params) for la in self.trainable_layers)
        if self._totals is None or self._totals.n_grads != n_grads or \
                self._totals.backend != self.backend:
            self._totals = RunningTotals(self.backend, n_grads)
        return self._totals

    def _read_totals(self) -> tuple[float, float]:
        """Wait for the device and read the running loss sum and correct count; raise
        :class:`NonFiniteError` for the first non-finite step since the last read."""
        if self._totals is None:
            return 0.0, 0.0
        host, pending = self._totals.read()
        if host[BAD_STEP] >= 0:
            self._raise_deferred(host, dict(pending))
        return float(host[LOSS_SUM]), float(host[CORRECT])

    def _raise_deferred(self, host: np.ndarray, batches: dict[int, Any]) -> None:
        step = int(host[BAD_STEP])
        # Every update from that step on was skipped: the model is as after the step before.
        self.optimizer.iterations = step - 1  # type: ignore[union-attr]
        loss = float(host[BAD_LOSS])
        if not math.isfinite(loss):
            self._raise_non_finite(f"the loss is {loss}", batches[step], step)
        owners = [(la, k) for la in self.trainable_layers for k in la.params]
        flags = list(zip(owners, host[BAD_GRADS:], strict=True))
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
        raise NonFiniteError(f"training stopped at step {step}: {what}; the first non-finite "
                             f"values appear in {where}")

    # -- data ------------------------------------------------------------------------------------
    def _batches(self, x: Any, y: Any, batch_size: int, steps: int | None, what: str = "x", *,
                 shuffle: bool = False, seed: int = 0, targets: bool = True,
                 checked: bool = False) -> Batches:
        """The batch source for ``x`` (and ``y``): arrays, a map-style dataset or an iterable
        of batches (see :mod:`xpcnn.data`). On several ranks, arrays and datasets give each
        rank its slice of every global batch (of ``ranks * batch_size``), except for
        ``predict`` (no targets), where every rank predicts everything; an iterable is each
        rank's own. ``checked`` arrays are parts of arrays (targets and all) that
        :func:`check_arrays` passed: they are not checked again."""
        if isinstance(x, Mapping):
            raise InputError(f"{what} is a dict (keys {list(x)[:4]}): an xpcnn model has one "
                             "input; pass its images as one array (N, H, W, C), or a dataset "
                             "whose items are (x, y) pairs")
        here = distributed.world()
        shard = (here.rank, here.size) if targets else (0, 1)
        if is_stream(x):
            if y is not None:
                raise InputError(f"y must be None when {what} is a dataset or an iterable of "
                                 "batches (they hold the targets)")
            if is_map_dataset(x):
                if steps is not None:  # (it was ignored: every sample, each epoch)
                    raise InputError("steps_per_epoch / steps are for generators; a dataset "
                                     "gives ceil(len(dataset) / batch_size) batches")
                return DatasetBatches(self, x, batch_size, shuffle, seed, targets, what, shard)
            return IterableBatches(self, x, steps, targets, what)
        if steps is not None:
            raise InputError("steps_per_epoch / steps are for generators; arrays give "
                             "ceil(N / batch_size) batches")
        if targets and y is None:
            pairs = isinstance(x, list | tuple) and bool(x) and isinstance(
                x[0], list | tuple) and len(x[0]) == 2
            raise InputError(f"y (the labels of {what}) is missing" + (
                f"; {what} is a list of pairs: a list is read as one array, so pass the (x, y) "
                f"batches as an iterator, iter({what}), with steps_per_epoch" if pairs else ""))
        x, t = (x, y) if checked else check_arrays(self, x, y, what)
        return ArrayBatches(self.backend, x, t, batch_size, shuffle, seed, shard)

    # -- fit / evaluate / predict ----------------------------------------------------------
    def fit(self, x: Any, y: Any = None, epochs: int = 1, batch_size: int = 32,
            validation_data: Any = None, validation_split: float = 0.0, shuffle: bool = True,
            seed: int | None = None, verbose: int | str = 1,
            callbacks: list[Callback] | None = None,
            steps_per_epoch: int | None = None, validation_steps: int | None = None,
            checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int | str = "epoch",
            resume: bool = False) -> History:
        """Train for ``epochs`` passes over the data; returns the :class:`History`.

        ``x`` is images (N, H, W, C) (uint8 or float; NumPy, a memory map, or arrays of the
        model's library on its device) with ``y`` integer labels (N,) or one-hot rows (N, K);
        or a map-style dataset, or an iterable of ``(x, y)`` batches with ``steps_per_epoch``
        (:mod:`xpcnn.data`). ``validation_data`` is a pair of arrays or such a source
        (``validation_steps`` batches). ``seed`` fixes the shuffling order (default: the
        model's seed). ``verbose=0`` silences the progress bar. ``callbacks``: see
        :mod:`xpcnn.callbacks`.

        Launched on several processes (``mpiexec -n N``, :mod:`xpcnn.distributed`), each step
        takes a global batch of ``N * batch_size`` samples, the very batch one process would take
        at that size, and each rank computes on its own slice; only rank 0 prints and writes.

        ``checkpoint=PATH`` is short for ``callbacks=[BackupAndRestore(PATH, checkpoint_every,
        resume)]``: the whole training state at the end of every epoch (and every
        ``checkpoint_every`` steps when that is an int); with ``resume=True`` a run continues
        from that file, exactly, and returns the history of every epoch.
        """
        self._require_compiled()
        self._rebuild_if_shared()
        epochs = checks.non_negative_int(epochs, "epochs")
        batch_size = checks.positive_int(batch_size, "batch_size")
        seed = self.seed if seed is None else checks.non_negative_int(seed, "seed")
        shuffle = checks.flag(shuffle, "shuffle")
        verbose = checks.verbosity(verbose)
        if not distributed.is_root():
            verbose = 0
        data, validation = self._fit_data(x, y, batch_size, validation_data, validation_split,
                                          shuffle, seed, steps_per_epoch, validation_steps)
        extra = []
        if checkpoint is not None:
            extra.append(BackupAndRestore(checkpoint, checkpoint_every, resume))
        elif resume:
            raise InputError("resume=True needs checkpoint=PATH, the file to resume from")
        elif not (isinstance(checkpoint_every, str) and checkpoint_every == "epoch"):
            raise InputError(f"checkpoint_every={checkpoint_every!r} needs checkpoint=PATH, the "
                             "file to write: without it no checkpoint would be written")
        self.history = History()
        # Keras' order: the History and the progress bar after the user's callbacks, so they
        # see the logs those add (learning_rate, a user's metric); BackupAndRestore last, so
        # that its checkpoint holds the History of the epoch just done.
        callbacks = [*callback_list(callbacks), *extra]
        backups = [cb for cb in callbacks if isinstance(cb, BackupAndRestore)]
        cbs = CallbackList([*(cb for cb in callbacks if cb not in backups), self.history,
                            *([ProgbarLogger()] if verbose else []), *backups], self,
                           {"epochs": epochs, "steps": data.steps, "verbose": verbose,
                            "data": data, "validation": validation is not None})
        self.stop_training, self._resume_at = False, None
        self._parallel = distributed.data_parallel(self)
        if self._parallel is not None:
            self._parallel.broadcast_weights()
        cbs.on_train_begin()
        start = self._resume_at
        logs: dict[str, float] = {}  # (the last epoch's, for on_train_end, as in Keras)
        try:
            with cbs.interruptible():
                for epoch in range(start.epoch if start else 0, epochs):
                    logs = self._fit_epoch(epoch, data, cbs, start if start and
                                           start.epoch == epoch else None)
                    if self._parallel is not None:
                        self._parallel.average_state()
                    if validation is not None:
                        val = self._evaluate(validation, cbs, epoch=epoch)
                        logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                    logs["seconds"] = time.perf_counter() - self._epoch_t0
                    cbs.on_epoch_end(epoch, logs)
                    if self.stop_training:
                        break
        except NonFiniteError as error:
            if not cbs.on_non_finite(error):
                raise
        finally:
            if self._parallel is not None:
                self._parallel.end_fit()
                self._parallel = None
        cbs.on_train_end(logs)
        return self.history

    def _fit_epoch(self, epoch: int, data: Batches, cbs: CallbackList, start: Any
                   ) -> dict[str, float]:
        """One pass of training steps (from ``start``, a checkpoint's position, when resuming
        inside this epoch); returns the epoch's loss and accuracy."""
        step = start.step if start else 0
        self._position = (epoch, step)
        self._epoch_t0 = time.perf_counter() - (start.seconds if start else 0.0)
        self._seen = start.seen if start else 0.0
        self._running_totals().reset(*((start.loss_sum, start.correct) if start else ()))
        cbs.on_epoch_begin(epoch)
        with contextlib.closing(data.epoch(epoch, step)) as batches:  # type: ignore[type-var]
            for xb, yb in batches:
                cbs.on_train_batch_begin(step)
                if self._parallel is not None:  # this rank's place in the global batch
                    place = data.place(step)
                    if place is None:  # (asked of the other ranks: a host allreduce)
                        self._parallel.set_batch(int(xb.shape[0]))
                    else:
                        self._parallel.use_slice(*place)
                self.train_step(xb, yb)
                self._seen += int(xb.shape[0]) if self._parallel is None else \
                    self._parallel.total
                step += 1
                self._position = (epoch, step)
                cbs.on_train_batch_end(step - 1, LazyLogs(self._batch_logs))
                if self.stop_training:
                    break
        if not self._seen:
            raise InputError(f"the training data gave no batches in epoch {epoch + 1}: an "
                             "iterator needs steps_per_epoch batches for every epoch")
        return self._batch_logs()

    def _batch_logs(self) -> dict[str, float]:
        """The epoch's running loss and accuracy (waits for the device)."""
        loss_sum, correct = self._read_totals()
        return {"loss": loss_sum / self._seen, "accuracy": correct / self._seen}

    def _epoch_sums(self) -> tuple[float, float, float, float]:
        """(loss sum, correct count, samples seen, start time) of the epoch in progress, as a
        checkpoint stores them (waits for the device)."""
        return (*self._read_totals(), self._seen, self._epoch_t0)

    def _fit_data(self, x: Any, y: Any, batch_size: int, validation_data: Any,
                  validation_split: float, shuffle: bool, seed: int, steps: int | None,
                  validation_steps: int | None) -> tuple[Batches, Batches | None]:
        checks.number(validation_split, "validation_split", 0.0, 1.0, high_open=True)
        split = bool(validation_split)  # x and y checked as a whole, then split in two
        if split:
            if is_stream(x):
                raise InputError("validation_split needs arrays; pass validation_data with a "
                                 "dataset or generator")
            x, targets = check_arrays(self, x, y)
            n_val = int(round(int(x.shape[0]) * validation_split))
            if n_val < 1 or n_val >= x.shape[0]:
                raise InputError(f"validation_split={validation_split} leaves no training or no "
                                 f"validation samples out of {x.shape[0]}")
            validation_data = (x[-n_val:, ...], targets[-n_val:])
            x, y = x[:-n_val, ...], targets[:-n_val]
        data = self._batches(x, y, batch_size, steps, shuffle=shuffle, seed=seed, checked=split)
        if validation_data is None:
            return data, None
        if is_stream(validation_data):
            return data, self._batches(validation_data, None, max(batch_size, 256),
                                       validation_steps, "x_val")
        if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
            raise InputError("validation_data must be a pair (x_val, y_val), a dataset or an "
                             f"iterable of batches, got {type(validation_data).__name__}")
        return data, self._batches(*validation_data, max(batch_size, 256), validation_steps,
                                   "x_val", checked=split)

    def evaluate(self, x: Any, y: Any = None, batch_size: int = 256, verbose: int | str = 0,
                 steps: int | None = None, callbacks: list[Callback] | None = None
                 ) -> dict[str, float]:
        """Mean loss and accuracy on (x, y) (or a dataset or iterable of batches), in inference
        mode."""
        batch_size = checks.positive_int(batch_size, "batch_size")
        verbose = checks.verbosity(verbose)
        if self.loss is None:  # (an uncompiled model is evaluated with the default loss)
            self.loss = get_loss("cross_entropy")
        self._rebuild_if_shared()
        data = self._batches(x, y, batch_size, steps)
        cbs = CallbackList(callback_list(callbacks), self, {"verbose": verbose})
        return self._evaluate(data, cbs, verbose)

    def _evaluate(self, data: Batches, cbs: CallbackList, verbose: int = 0,
                  epoch: int | None = None) -> dict[str, float]:
        """Mean loss and accuracy of ``data``; ``epoch``: fit's, when it is the validation data."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        totals, seen = RunningTotals(self.backend, 0), 0
        cbs.on_test_begin()
        with self.backend.compute_scope(), contextlib.closing(
                data.epoch(0)) as batches:  # type: ignore[type-var]
            for step, (xb, yb) in enumerate(_progress(batches, data, verbose, "evaluate")):
                if not xb.shape[0]:  # this rank's empty part of a short batch
                    continue
                cbs.on_test_batch_begin(step)
                logits = self._logits(xb, False)
                stats, _ = self.loss.forward_with_accuracy(  # type: ignore[union-attr]
                    xp, logits, yb, self._param_dtype, kernels)
                totals.add_stats(stats, int(xb.shape[0]))
                seen += int(xb.shape[0])
                cbs.on_test_batch_end(step, LazyLogs(lambda seen=seen: self._running_logs(
                    totals, seen)))  # (this rank's running means, as Keras' batch logs)
        host, _ = totals.read()
        # on several ranks, each evaluated its slices: the sums are added up over the ranks
        loss_sum, correct, seen = distributed.host_sum(
            distributed.world(), [host[LOSS_SUM], host[CORRECT], seen], "evaluate")
        if not seen:
            raise InputError("the evaluation data gave no batches" if epoch is None else
                             f"the validation data gave no batches in epoch {epoch + 1}: an "
                             "iterator needs validation_steps batches for every epoch")
        logs = {"loss": loss_sum / seen, "accuracy": correct / seen}
        cbs.on_test_end(logs)
        return logs

    def _running_logs(self, totals: RunningTotals, seen: int) -> dict[str, float]:
        """The running loss and accuracy of ``seen`` samples in ``totals`` (waits for the
        device)."""
        host = self.backend.to_numpy(totals.state)
        return {"loss": float(host[LOSS_SUM]) / seen, "accuracy": float(host[CORRECT]) / seen}

    def predict(self, x: Any, batch_size: int = 256, verbose: int | str = 0,
                steps: int | None = None, callbacks: list[Callback] | None = None) -> np.ndarray:
        """Class probabilities, (N, classes), as a host NumPy array; ``x`` as for
        :meth:`evaluate` (targets, if any, are ignored); ``verbose=1`` shows a progress bar
        (Keras' ``predict(x, verbose=0)`` works as it is)."""
        batch_size = checks.positive_int(batch_size, "batch_size")
        verbose = checks.verbosity(verbose)
        self._rebuild_if_shared()
        data = self._batches(x, None, batch_size, steps, targets=False)
        cbs = CallbackList(callback_list(callbacks), self, {"verbose": verbose})
        xp = self.backend.xp
        out = []
        cbs.on_predict_begin()
        with self.backend.compute_scope(), contextlib.closing(
                data.epoch(0)) as batches:  # type: ignore[type-var]
            for step, (xb, _) in enumerate(_progress(batches, data, verbose, "predict")):
                cbs.on_predict_batch_begin(step)
                z = self._logits(xb, training=False)
                out.append(softmax(xp, xp.astype(z, self._param_dtype)))
                cbs.on_predict_batch_end(step, {"outputs": out[-1]})  # (on the device)
            probabilities = self.backend.to_numpy(xp.concat(out))
        cbs.on_predict_end()
        return probabilities

    def forward(self, x: Any, training: bool = False) -> list[Any]:
        """Every layer's output for a host batch, as device arrays (for inspection)."""
        self._require_built("forward")
        self._rebuild_if_shared()
        x = checks.as_images(x)
        checks.check_sample_shape(x, self.input_shape)  # type: ignore[arg-type]
        with self.backend.compute_scope():
            return self._layer_outputs(self._to_device(x), training)

    # -- inspection and weights --------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], None] | None = None) -> None:
        """Print each layer's name, type, output shape and weight count (and, in a graph, the
        layers it reads), then the trainable and non-trainable counts, as Keras does; each
        line goes to ``print_fn`` (``print`` when None)."""
        self._require_built("summary")
        self._rebuild_if_shared()
        print_fn = print if print_fn is None else print_fn
        inbound = self._inbound()
        names = ["input", *(la.name for la in self.layers)]
        chain = all(ins == (k,) for k, ins in enumerate(inbound))
        heads = ("Layer (type)", "Output shape", "Params") + (() if chain else ("Inputs",))
        rows = [(f"{la.name} ({type(la).__name__}){'' if la.trainable else ' frozen'}",
                 str((None, *la.output_shape)), f"{la.count_params():,}")
                + (() if chain else (", ".join(names[i] for i in ins),))
                for la, ins in zip(self.layers, inbound, strict=True)]
        widths = [max(len(r[i]) for r in [heads, *rows]) + 2 for i in range(len(heads))]
        line = "-" * sum(widths)
        fmt = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
        print_fn(f'Model "{self.name}" on {self.backend.label}, input {self.input_shape}')
        print_fn(line)
        print_fn(fmt(heads))
        print_fn(line)
        for r in rows:
            print_fn(fmt(r))
        print_fn(line)
        trainable = sum(la.count_params() - la.count_state() for la in self.trainable_layers)
        print_fn(f"Total params: {self.count_params():,}")
        print_fn(f"Trainable params: {trainable:,}")
        print_fn(f"Non-trainable params: {self.count_params() - trainable:,}")

    def count_params(self) -> int:
        """Every weight, trainable or not (BatchNorm's statistics, frozen layers'), as Keras."""
        return sum(la.count_params() for la in self.layers)

    @property
    def trainable(self) -> bool:
        """False when every layer is frozen. Setting it freezes (or unfreezes) every layer, as
        Keras does: ``base.trainable = False`` on a model used inside another fine-tunes the
        rest."""
        return any(la.trainable for la in self.layers)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        value = checks.flag(value, "trainable")
        for la in self.layers:
            la.trainable = value

    @property
    def trainable_layers(self) -> list[Layer]:
        """The layers the optimiser updates: those with parameters not frozen
        (``layer.trainable = False``), in weight order."""
        return [la for la in self.layers if la.trainable and la.params]

    def get_weights(self) -> list[np.ndarray]:
        """All layers' weights, in order, as host arrays in Keras layouts."""
        self._require_built("get_weights")
        return [w for la in self.layers for w in la.get_weights()]

    def set_weights(self, weights: list[Any]) -> None:
        """Replace all weights; the list must match :meth:`get_weights` in length and shapes."""
        self._require_built("set_weights")
        if not isinstance(weights, list | tuple):
            raise InputError(f"set_weights expects a list of arrays (as get_weights returns), got "
                             f"{type(weights).__name__}")
        counts = [len(la.get_weights()) for la in self.layers]
        if len(weights) != sum(counts):
            raise InputError(f"set_weights expects {sum(counts)} arrays (as get_weights returns), "
                             f"got {len(weights)}")
        start = 0
        for la, k in zip(self.layers, counts, strict=True):
            la.set_weights(list(weights[start:start + k]))
            start += k

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load the weights of a model file or checkpoint written for this same architecture
        (``DataFormatError`` names the first difference otherwise)."""
        load_weights(self, path)

    def to(self, device: DeviceLike) -> Model:
        """Move the model (weights, optimiser state) to another device; returns self."""
        backend = get_backend(distributed.device_for_rank(device))
        for la in self.layers:
            if la.built:
                la.to(backend)
        if self.optimizer is not None and self.optimizer.slots:
            self.optimizer.slots = {
                k: [backend.asarray(self.backend.to_numpy(a)) for a in v]
                for k, v in self.optimizer.slots.items()
            }
        if self._scaling is not None:
            self._scaling = backend.asarray(self.backend.to_numpy(self._scaling))
        self.backend = backend  # (the running totals are made afresh there)
        self._graphs, self.cuda_graphs_reason = None, ""
        return self

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write architecture and weights to ``path`` (an .npz that loads without pickle)."""
        save_model(self, path)

    def export(self, path: str | os.PathLike[str], input_dtype: str = "float32") -> None:
        """Write the model as ONNX to ``path``: (N, H, W, C) images of ``input_dtype``
        ("float32" or "uint8") in, ``predict``'s probabilities out (:mod:`xpcnn.onnx_export`;
        needs ``pip install "xpcnn[onnx]"``)."""
        from .onnx_export import export_model

        if distributed.is_root():  # one writer on several ranks (all hold the same model)
            self._rebuild_if_shared()
            export_model(self, path, input_dtype)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # (copy.copy, copy.deepcopy and pickle all come here: a model holds its device's array
        # library and kernels, which cannot be copied)
        raise InputError("a model cannot be copied or pickled (it holds its device's array "
                         "library and kernels): keep its weights with get_weights() "
                         "(set_weights() puts them back), or save(path) and load_model(path) "
                         "for a second model")

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise InputError(f"the model must be built before {what}: call build(input_shape) "
                             "or fit/predict on data first")

    def _require_compiled(self) -> None:
        if self.loss is None or self.optimizer is None:
            raise InputError("call compile(loss=..., optimizer=...) before fit()")


@register_model
class Sequential(Model):
    """A linear stack of layers trained by backpropagation (see :class:`Model` for the rest)."""

    def __init__(self, layers: list[Layer] | None = None, *, input_shape: tuple[int, ...] | None
                 = None, device: DeviceLike = "cpu", seed: int = 0, dtype: str = "float32",
                 name: str = "sequential") -> None:
        super().__init__(device=device, seed=seed, dtype=dtype, name=name)
        if layers is not None and not isinstance(layers, list | tuple):
            raise InputError(f"layers must be a list of xpcnn layers, got {type(layers).__name__}")
        for layer in layers or []:
            self.add(layer)
        if input_shape is not None:
            self.build(input_shape)

    # -- construction ------------------------------------------------------------------------
    def add(self, layer: Layer) -> None:
        """Append a layer (the model is rebuilt on its next use)."""
        if not isinstance(layer, Layer):
            raise InputError(f"add() expects an xpcnn layer, got {type(layer).__name__}")
        if any(layer is la for la in self.layers):
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) is already in the "
                             "model: the same layer instance cannot be added twice; create "
                             f"another {type(layer).__name__}(...)")
        clash = next((la for la in self.layers if la.name == layer.name), None)
        if clash is not None:
            # A built layer may be held by other models, which show its name: it keeps it, and
            # this model's new layer gives way (as a functional Model renames).
            give_way = clash if layer.built and not clash.built else layer
            _give_unique_name(give_way, {la.name for la in self.layers})
        self.layers.append(layer)
        self.built = False

    def _inbound(self) -> list[graph.Inbound]:
        """A chain: each layer reads the one before it."""
        return [(k,) for k in range(len(self.layers))]

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: list[Layer],
                    device: DeviceLike = "cpu") -> Sequential:
        return cls(layers, device=device, seed=int(config["seed"]), dtype=config["dtype"],
                   name=str(config["name"]))


def _progress(batches: Any, data: Batches, verbose: int, desc: str) -> Any:
    """``batches`` behind a progress bar where ``verbose`` asks for one (on rank 0 only)."""
    return tqdm(batches, total=data.steps, disable=verbose == 0 or not distributed.is_root(),
                desc=desc, unit="batch")


def _give_unique_name(layer: Layer, taken: set[str]) -> None:
    """Rename ``layer`` to ``name_1``, ``name_2``... where its name is taken."""
    if layer.name in taken:
        base, k = layer.name, 1
        while f"{base}_{k}" in taken:
            k += 1
        layer.name = f"{base}_{k}"
