"""Model: the base class that trains, evaluates and predicts; Sequential: a stack of layers.

Data enters as host NumPy arrays in (N, H, W, C); each batch crosses to the device once, is cast
there, runs forward and backward through the layers, and only scalars (loss, correct count) come
back. With a cross-entropy loss and a final Softmax layer, training feeds the Softmax's input
(the logits) to the fused, stable softmax cross-entropy; ``predict`` still returns probabilities.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import checks
from .backend import Backend, DeviceLike, get_backend
from .cuda_graphs import StepGraphs
from .cuda_graphs import blockers as graph_blockers
from .errors import InputError, NonFiniteError
from .history import History
from .layers.activation import ReLU, Softmax
from .layers.base import Layer
from .losses import SoftmaxCrossEntropy, get_loss
from .ops.kernels import kernels_for
from .ops.softmax import softmax
from .optim import Optimizer, get_optimizer
from .saving import FitCheckpoints, fingerprint, load_weights, register_model, save_model

PRECISIONS = {"float32": None, "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


class Model:
    """What every xpcnn network shares: compile, fit, evaluate, predict, train_step, the
    non-finite checks, weights, save/load_weights, to(device) and summary (Keras' design).

    ``device`` picks the array library and device (see :func:`xpcnn.backend.get_backend`),
    ``seed`` the initial weights (the same on every device), ``dtype`` the parameters' dtype.

    A subclass defines the network. This class reaches it only through these hooks:

    * ``build(input_shape)``: create every layer's weights for per-sample ``input_shape``, set
      ``input_shape`` and ``built``;
    * ``built``, ``input_shape`` (per sample, e.g. (32, 32, 3); None before building);
    * ``layers``: every layer once, in weight order (``get_weights`` concatenates theirs);
    * ``_logits(xb, training)``: the forward pass of a device batch up to the logits;
    * ``_backward(dlogits)``: the backward pass after ``_logits(xb, training=True)``, filling
      every layer's ``grads``;
    * ``_fused_softmax()``: True when the network ends in a Softmax that is left to the loss;
    * ``output_shape`` (per sample; ``num_classes`` is its last axis);
    * ``_layer_outputs(xb, training)``: every layer's output, in ``layers`` order (for
      :meth:`forward` and to find where non-finite values first appear).
    """

    def __init__(self, *, device: DeviceLike = "cpu", seed: int = 0, dtype: str = "float32",
                 name: str = "model") -> None:
        self.backend: Backend = get_backend(device)
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
        self.loss_scale = 1.0
        self._good_steps = 0
        self.built = False
        self.cuda_graphs: bool | None = None
        #: Why training steps run without CUDA graphs ("" while they are captured, or will be).
        self.cuda_graphs_reason = ""
        self._graphs: StepGraphs | None = None

    @property
    def num_classes(self) -> int:
        return int(self.output_shape[-1])  # type: ignore[attr-defined]

    @property
    def _param_dtype(self) -> Any:
        """The parameters' (master) dtype on this backend: losses and outputs are in it."""
        return self.backend.dtype(self.dtype_name)

    def compile(self, loss: str | SoftmaxCrossEntropy = "cross_entropy",
                optimizer: str | Optimizer = "adam", metrics: tuple[str, ...] | list[str] = (
                    "accuracy",), precision: str = "float32",
                cuda_graphs: bool | None = None) -> None:
        """Choose the loss, the optimiser, the metrics (only ``"accuracy"``) and the precision.

        ``precision`` is ``"float32"``, ``"mixed_float16"`` or ``"mixed_bfloat16"``: matmuls in
        the low precision, float32 master weights, softmax, loss and normalisation statistics,
        and dynamic loss scaling for float16.

        ``cuda_graphs``: capture the training step in a CUDA graph and replay it
        (:mod:`xpcnn.cuda_graphs`); None (the default) does so on CuPy wherever the model
        allows it, True also warns once where it does not, False never does.
        ``cuda_graphs_reason`` says why steps run without.
        """
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise InputError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        self.cuda_graphs, self._graphs, self.cuda_graphs_reason = cuda_graphs, None, ""
        self.loss = get_loss(loss)
        self.optimizer = get_optimizer(optimizer)
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in metrics if m not in ("accuracy", "acc")]
        if unknown:
            raise InputError(f"unknown metrics {unknown}; xpcnn supports 'accuracy'")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")
        low = PRECISIONS[precision]
        if low is not None:
            self.backend.dtype(low)  # a clear error where the backend lacks the dtype
        self.precision = precision
        self.loss_scale = 2.0**15 if precision == "mixed_float16" else 1.0
        self._good_steps = 0
        if self.built:
            compute = self.backend.dtype(low or self.dtype_name)
            for layer in self.layers:
                layer.compute_dtype = compute

    def _to_device(self, x: np.ndarray) -> Any:
        """One host -> device copy of a batch, then the cast on the device."""
        xb = self.backend.asarray(np.ascontiguousarray(x))
        return self.backend.xp.astype(xb, self._param_dtype)

    def train_step(self, xb: Any, yb: Any) -> tuple[float, float]:
        """One forward, backward and update on a device batch; returns (loss, correct count)."""
        with self.backend.compute_scope():
            graphs = self._step_graphs()
            step = self.optimizer.iterations + 1  # type: ignore[union-attr]
            stats = None if graphs is None else graphs.run(xb, yb)
            if stats is None:
                return self._train_step(xb, yb)
            return self._check_graph_step(stats, step, xb)

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
        reasons = self._graph_blockers()
        if reasons:
            self.cuda_graphs_reason = reasons[0]
            if self.cuda_graphs:
                warnings.warn(f"xpcnn: training steps run without CUDA graphs: {reasons[0]}",
                              RuntimeWarning, stacklevel=3)
            return None
        opt = self.optimizer
        assert opt is not None

        def advance() -> None:
            opt.iterations += 1

        self._graphs = StepGraphs(self._graph_step, self._graph_arrays, opt.step_scalars,
                                  advance, self.backend, kernels_for(self.backend).capturable)
        return self._graphs

    def _graph_blockers(self) -> list[str]:
        extra = []
        if self.precision == "mixed_float16":
            extra.append("mixed_float16's loss scale is decided on the host each step")
        if self.backend.name == "cupy":
            from .ops import cudnn_conv

            if not hasattr(kernels_for(self.backend), "capturable"):
                extra.append("the CuPy fast path is off (XPCNN_FAST_PATH=0): the standard "
                             "matrix products go to cuBLAS, which CuPy cannot capture")
            elif cudnn_conv.load() is None:
                extra.append("cuDNN could not be loaded: the matrix products would go to "
                             "cuBLAS, which CuPy cannot capture")
        return graph_blockers(self.layers, self.optimizer, self.backend.name, tuple(extra))

    def _graph_arrays(self) -> list[tuple[str, Any]]:
        """Every array that outlives a training step, parameters first (see StepGraphs)."""
        params = [(f"param {la.name}.{k}", a) for la in self.layers for k, a in la.params.items()]
        state = [(f"state {la.name}.{k}", a) for la in self.layers for k, a in la.state.items()]
        slots = [(f"optimizer slot {k}.{i}", a)
                 for k, v in self.optimizer.slots.items()  # type: ignore[union-attr]
                 for i, a in enumerate(v)]
        return params + state + slots

    def _graph_step(self, xb: Any, yb: Any, scalars: dict[str, Any]) -> Any:
        """The training step as a CUDA graph captures it: no host reads; the update is
        skipped on the device where the loss or a gradient sum is not finite. Returns [loss,
        correct count, sum of all gradients] on the device."""
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        logits = self._logits(xb, training=True)
        stats, dz = self.loss.forward_with_accuracy(  # type: ignore[union-attr]
            xp, logits, yb, self._param_dtype, kernels)
        self._backward(dz)
        params = [p for la in self.layers for p in la.params.values()]
        grads = [la.grads[k] for la in self.layers for k in la.params]
        total = xp.sum(xp.concat([xp.reshape(g, (-1,)) for g in grads]), dtype=stats.dtype)
        stats = xp.concat([stats, xp.reshape(total, (1,))])
        self.optimizer.scalar_step(xp, params, grads, scalars,  # type: ignore[union-attr]
                                   apply=xp.all(xp.isfinite(stats)))
        return stats

    def _check_graph_step(self, stats: Any, step: int, xb: Any) -> tuple[float, float]:
        """Read a graph step's [loss, correct, gradient sum]; raise NonFiniteError as the eager
        step does (the device skipped the update, so the step does not count)."""
        host = self.backend.to_numpy(stats)
        if np.all(np.isfinite(host)):
            return float(host[0]), float(host[1])
        self.optimizer.iterations = step - 1  # type: ignore[union-attr]
        if not math.isfinite(host[0]):
            self._raise_non_finite(f"the loss is {host[0]}", xb)
        xp = self.backend.xp
        bad = [la for la in self.layers
               if not all(bool(xp.all(xp.isfinite(la.grads[k]))) for k in la.params)]
        if bad:
            raise NonFiniteError(f"non-finite gradient at step {step}: it first appears (in "
                                 f"backpropagation order) in layer {bad[-1].name!r}")
        return float(host[0]), float(host[1])  # (only the sum overflowed; the update skipped)

    def _train_step(self, xb: Any, yb: Any) -> tuple[float, float]:
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        logits = self._logits(xb, training=True)
        stats, dz = self.loss.forward_with_accuracy(  # type: ignore[union-attr]
            xp, logits, yb, self._param_dtype, kernels)
        if self.loss_scale != 1.0:
            dz = dz * self.loss_scale
        self._backward(dz)
        params, grads, owners = [], [], []
        for layer in self.layers:
            for k, p in layer.params.items():
                params.append(p)
                grads.append(layer.grads[k])
                owners.append(layer)
        if self.loss_scale != 1.0:
            grads = [g * (1.0 / self.loss_scale) for g in grads]
        # The loss, the correct count and the sum of every gradient (finite if they all are,
        # short of overflow) come to the host in one transfer: one wait for the device per
        # step, and three launches on a GPU rather than one per array.
        if grads:
            total = xp.sum(xp.concat([xp.reshape(g, (-1,)) for g in grads]), dtype=stats.dtype)
            stats = xp.concat([stats, xp.reshape(total, (1,))])
        host = self.backend.to_numpy(stats)
        loss_value, correct = float(host[0]), float(host[1])
        if not math.isfinite(loss_value):
            self._raise_non_finite(f"the loss is {loss_value}", xb)
        if not np.all(np.isfinite(host[2:])):
            if self.precision == "mixed_float16" and self.loss_scale > 1.0:
                # Overflow in float16: skip this update and try a smaller scale (down to 1: past
                # that the non-finite gradient is not the scaling's doing, and is reported).
                self.loss_scale /= 2.0
                self._good_steps = 0
                return loss_value, correct
            bad = [o for o, g in zip(owners, grads, strict=True)
                   if not bool(xp.all(xp.isfinite(g)))]
            if bad:  # (else only a sum overflowed: every gradient is finite)
                # Backpropagation runs from the last layer: the last one with a non-finite
                # gradient is where it appeared.
                raise NonFiniteError(f"non-finite gradient at step "
                                     f"{self.optimizer.iterations + 1}: it first appears (in "
                                     f"backpropagation order) in layer {bad[-1].name!r}")
        self.optimizer.step(xp, params, grads, kernels)  # type: ignore[union-attr]
        if self.precision == "mixed_float16":
            self._good_steps += 1
            if self._good_steps >= 2000:
                self.loss_scale *= 2.0
                self._good_steps = 0
        return loss_value, correct

    def _raise_non_finite(self, what: str, xb: Any) -> None:
        """Name the step and the first layer whose output is not finite, then raise."""
        xp = self.backend.xp
        step = self.optimizer.iterations + 1  # type: ignore[union-attr]
        where = "the loss"
        finite = lambda a: bool(xp.all(xp.isfinite(a)))  # noqa: E731
        weights = next((la for la in self.layers if not all(map(finite, la._arrays().values()))),
                       None)
        if not finite(xb):
            where = "the input batch"
        elif weights is not None:
            where = f"the weights of layer {weights.name!r}"
        else:
            outputs = self._layer_outputs(xb, False)  # type: ignore[attr-defined]
            layer = next((la for la, out in zip(self.layers, outputs, strict=True)
                          if not finite(out)), None)
            if layer is not None:
                where = f"the output of layer {layer.name!r}"
        raise NonFiniteError(f"training stopped at step {step}: {what}; the first non-finite "
                             f"values appear in {where}")

    # -- fit / evaluate / predict ----------------------------------------------------------
    def _prepare(self, x: Any, y: Any | None = None, what: str = "x"
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        x = checks.as_images(x, what)
        if not self.built:
            self.build(x.shape[1:])
        checks.check_sample_shape(x, self.input_shape, what)  # type: ignore[arg-type]
        checks.check_finite(x, what)
        if y is None:
            return x, None, None
        ywhat = "y" if what == "x" else what.replace("x", "y")
        targets, labels = checks.as_labels(y, x.shape[0], self.num_classes, ywhat)
        return x, targets, labels

    def _batches(self, n: int, batch_size: int, order: np.ndarray | None = None
                 ) -> Iterator[np.ndarray]:
        idx = np.arange(n) if order is None else order
        for start in range(0, n, batch_size):
            yield idx[start:start + batch_size]

    def fit(self, x: Any, y: Any, epochs: int = 1, batch_size: int = 32,
            validation_data: tuple[Any, Any] | None = None, validation_split: float = 0.0,
            shuffle: bool = True, seed: int | None = None, verbose: int = 1,
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
            checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int | str = "epoch",
            resume: bool = False) -> History:
        """Train for ``epochs`` passes over (x, y); returns a :class:`History`.

        ``x`` is (N, H, W, C) (uint8 or float), ``y`` integer labels (N,) or one-hot (N, K).
        ``seed`` fixes the shuffling order (default: the model's seed). ``verbose=0`` silences
        the progress bar.

        ``checkpoint`` names a file that receives the whole training state at the end of every
        epoch, and also every ``checkpoint_every`` steps when that is an int. With
        ``resume=True``, a run continues from that file if it exists, exactly where it stopped:
        it ends with the same weights, bit for bit, as an uninterrupted run, and returns the
        history of every epoch, the ones before the interruption included
        (:mod:`xpcnn.saving.checkpoint`).
        """
        self._require_compiled()
        epochs = checks.non_negative_int(epochs, "epochs")
        batch_size = checks.positive_int(batch_size, "batch_size")
        checks.number(validation_split, "validation_split", 0.0, 1.0, high_open=True)
        x, targets, labels = self._prepare(x, y)
        if validation_split:
            n_val = int(round(len(x) * validation_split))
            if n_val < 1 or n_val >= len(x):
                raise InputError(f"validation_split={validation_split} leaves no training or no "
                                 f"validation samples out of {len(x)}")
            validation_data = (x[-n_val:], targets[-n_val:])
            x, targets, labels = x[:-n_val], targets[:-n_val], labels[:-n_val]
        if validation_data is not None:
            if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
                raise InputError("validation_data must be a pair (x_val, y_val), got "
                                 f"{type(validation_data).__name__}")
            vx, vt, _ = self._prepare(validation_data[0], validation_data[1], "x_val")
        seed = self.seed if seed is None else checks.non_negative_int(seed, "seed")
        history = History()
        n = len(x)
        steps = math.ceil(n / batch_size)
        saver = start = None
        if checkpoint is not None:
            saver = FitCheckpoints(self, checkpoint, checkpoint_every, resume,
                                   fingerprint(x, targets, batch_size, seed, shuffle), steps,
                                   verbose)
            history, start = saver.start()
        elif resume:
            raise InputError("resume=True needs checkpoint=PATH, the file to resume from")
        # With a checkpoint, Ctrl-C stops after the step in progress and writes one there.
        with saver.interruptible() if saver is not None else contextlib.nullcontext():
            for epoch in range(start.epoch if start else 0, epochs):
                order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else None
                t0 = time.perf_counter()
                loss_sum = correct = seen = 0.0
                step = 0
                if start is not None and epoch == start.epoch:  # resuming inside this epoch
                    step, loss_sum = start.step, start.loss_sum
                    correct, seen = start.correct, start.seen
                    t0 -= start.seconds
                bar = tqdm(total=steps, initial=step, desc=f"Epoch {epoch + 1}/{epochs}",
                           unit="batch", disable=verbose == 0, leave=True, dynamic_ncols=True)
                for idx in itertools.islice(self._batches(n, batch_size, order), step, None):
                    xb = self._to_device(x[idx])
                    yb = self.backend.asarray(targets[idx])
                    loss, right = self.train_step(xb, yb)
                    loss_sum += loss * len(idx)
                    correct += right
                    seen += len(idx)
                    step += 1
                    if saver is not None:
                        saver.after_step(epoch, step, loss_sum, correct, seen, t0, history)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                                    refresh=False)
                logs = {"loss": loss_sum / seen, "accuracy": correct / seen}
                if validation_data is not None:
                    val = self.evaluate(vx, vt, batch_size=max(batch_size, 256), verbose=0)
                    logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                logs["seconds"] = time.perf_counter() - t0
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "seconds"})
                bar.close()
                history.append(epoch, logs)
                if saver is not None:
                    saver.after_epoch(epoch, history)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, logs)
        return history

    def evaluate(self, x: Any, y: Any, batch_size: int = 256, verbose: int = 0
                 ) -> dict[str, float]:
        """Mean loss and accuracy on (x, y), in inference mode."""
        if self.loss is None:
            self.loss = get_loss("cross_entropy")
        batch_size = checks.positive_int(batch_size, "batch_size")
        x, targets, _ = self._prepare(x, y)
        xp = self.backend.xp
        kernels = kernels_for(self.backend)
        loss_sum = correct = 0.0
        with self.backend.compute_scope():
            for idx in tqdm(list(self._batches(len(x), batch_size)), disable=verbose == 0,
                            desc="evaluate", unit="batch"):
                yb = self.backend.asarray(targets[idx])
                logits = self._logits(self._to_device(x[idx]), training=False)
                stats, _ = self.loss.forward_with_accuracy(xp, logits, yb, self._param_dtype,
                                                           kernels)
                host = self.backend.to_numpy(stats)
                loss_sum += float(host[0]) * len(idx)
                correct += float(host[1])
        return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}

    def predict(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, (N, classes), as a host NumPy array."""
        batch_size = checks.positive_int(batch_size, "batch_size")
        x, _, _ = self._prepare(x)
        xp = self.backend.xp
        out = []
        with self.backend.compute_scope():
            for idx in self._batches(len(x), batch_size):
                z = self._logits(self._to_device(x[idx]), training=False)
                out.append(self.backend.to_numpy(softmax(xp, xp.astype(z, self._param_dtype))))
        return np.concatenate(out)

    def forward(self, x: Any, training: bool = False) -> list[Any]:
        """Every layer's output for a host batch, as device arrays (for inspection)."""
        self._require_built("forward")
        x = checks.as_images(x)
        checks.check_sample_shape(x, self.input_shape)  # type: ignore[arg-type]
        with self.backend.compute_scope():
            return self._layer_outputs(self._to_device(x), training)  # type: ignore[attr-defined]

    # -- inspection and weights --------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], None] = print) -> None:
        """Print layer, output shape and parameter count, as Keras does."""
        self._require_built("summary")
        rows = [(f"{la.name} ({type(la).__name__})", str((None, *la.output_shape)),
                 f"{la.count_params():,}") for la in self.layers]
        heads = ("Layer (type)", "Output shape", "Params")
        widths = [max(len(r[i]) for r in [heads, *rows]) + 2 for i in range(3)]
        line = "-" * sum(widths)
        fmt = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
        print_fn(f'Model "{self.name}" on {self.backend.label}, input {self.input_shape}')
        print_fn(line)
        print_fn(fmt(heads))
        print_fn(line)
        for r in rows:
            print_fn(fmt(r))
        print_fn(line)
        print_fn(f"Total params: {self.count_params():,}")

    def count_params(self) -> int:
        return sum(la.count_params() for la in self.layers)

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
        backend = get_backend(device)
        for la in self.layers:
            if la.built:
                la.to(backend)
        if self.optimizer is not None and self.optimizer.slots:
            self.optimizer.slots = {
                k: [backend.asarray(self.backend.to_numpy(a)) for a in v]
                for k, v in self.optimizer.slots.items()
            }
        self.backend = backend
        self._graphs, self.cuda_graphs_reason = None, ""
        return self

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write architecture and weights to ``path`` (an .npz that loads without pickle)."""
        save_model(self, path)

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
        taken = {la.name for la in self.layers}
        if layer.name in taken:
            base, k = layer.name, 1
            while f"{base}_{k}" in taken:
                k += 1
            layer.name = f"{base}_{k}"
        self.layers.append(layer)
        self.built = False

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
        self.input_shape = shape
        compute = PRECISIONS[self.precision] or self.dtype_name
        for i, layer in enumerate(self.layers):
            rng = np.random.default_rng([self.seed, i])
            shape = layer.build(shape, self.backend, self.dtype_name, compute, rng)
        # Layers up to the first one with parameters need no input gradient.
        first = next((i for i, la in enumerate(self.layers) if la.params), len(self.layers))
        for i, layer in enumerate(self.layers):
            layer.need_input_grad = i > first
            layer.skip_relu_grad = layer.apply_input_relu_grad = layer.fused_relu = False
        # The hot path (training, evaluate, predict) runs a plan of the layers (see
        # _as_planned): a plain ReLU() right after a Conv2D or Dense is applied by that layer,
        # to each chunk of its output while it is in cache (Layer.fused_relu), and the ReLU
        # layer is skipped: one pass over the batch fewer each way.
        plan: list[Layer] = []
        fused: list[Layer] = []
        for layer in self.layers:
            if (isinstance(layer, ReLU) and layer.max_value is None and plan
                    and plan[-1].can_fuse_relu):
                if plan[-1] not in fused:  # (a second ReLU() changes nothing)
                    fused.append(plan[-1])
                continue
            plan.append(layer)
        # A ReLU's gradient is applied by the layer after it where that one can do it in its
        # own passes: one pass over a whole batch's gradient fewer (see Layer.skip_relu_grad).
        handed = [(before, after) for before, after in zip(plan[:-1], plan[1:], strict=True)
                  if (before.relu_output or before in fused)
                  and after.can_apply_input_relu_grad and after.need_input_grad]
        self._plan, self._fused, self._handed = plan, fused, handed
        self._first_trainable = next((i for i, la in enumerate(plan) if la.params), len(plan))
        self._planned_depth = 0
        self.built = True
        if self.optimizer is not None:
            self.optimizer.slots = {}

    @property
    def output_shape(self) -> tuple[int, ...]:
        self._require_built("output_shape")
        return self.layers[-1].output_shape  # type: ignore[return-value]

    # -- the hot path ------------------------------------------------------------------------
    def _fused_softmax(self) -> bool:
        return isinstance(self.layers[-1], Softmax)

    def _hot_layers(self) -> list[Layer]:
        """The plan's layers up to the logits (the last Softmax is left to the loss)."""
        return self._plan[:-1] if self._fused_softmax() else self._plan

    def _logits(self, x: Any, training: bool) -> Any:
        """Forward pass up to the logits, by the plan (see :meth:`build`)."""
        with self.backend.compute_scope(), self._as_planned():
            for layer in self._hot_layers():
                x = layer.forward(x, training)
        return x

    def _backward(self, dz: Any) -> None:
        """Backward pass from the logits' gradient, after ``_logits(x, training=True)``: fills
        every layer's ``grads``."""
        with self._as_planned():
            for layer in reversed(self._hot_layers()[self._first_trainable:]):
                dz = layer.backward(dz)

    @contextlib.contextmanager
    def _as_planned(self) -> Iterator[None]:
        """Inside, the layers run as the plan has them (see :meth:`build`): the fused ReLUs
        and the ReLU gradients handed to the next layer are switched on. Outside, every layer
        does its own work, so that one called on its own gives its own output and gradient."""
        self._planned_depth += 1
        if self._planned_depth == 1:
            self._set_plan_flags(True)
        try:
            yield
        finally:
            self._planned_depth -= 1
            if self._planned_depth == 0:
                self._set_plan_flags(False)

    def _set_plan_flags(self, on: bool) -> None:
        for layer in self._fused:
            layer.fused_relu = on
        for before, after in self._handed:
            before.skip_relu_grad = after.apply_input_relu_grad = on

    def _layer_outputs(self, x: Any, training: bool) -> list[Any]:
        """Every layer's own output, one after the other (no plan: each does its own work)."""
        outs = []
        for layer in self.layers:
            x = layer.forward(x, training)
            outs.append(x)
        return outs
