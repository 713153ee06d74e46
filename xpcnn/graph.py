"""The layer graph of a model, its plan, and the one executor that runs every model.

A model's graph is its layers in a topological order, each with the tensors it reads
(``inbound[k]``: 0 is the model's input, ``j + 1`` the output of layer ``j``); the output of the
last layer is the model's output. A ``Sequential`` is the chain where layer ``k`` reads ``k``; a
functional ``Model`` is traced from symbolic tensors (:func:`Input`, :func:`trace`).

:func:`compile_plan` turns a graph into immutable :class:`Step` records (a layer, the slots it
reads and writes, the :class:`~xpcnn.layers.base.Options` it is called with), and
:func:`forward` and :func:`backward` run a plan: the only copy of the forward and backward code.
The plan fuses a plain ``ReLU()`` into the ``Conv2D``, ``Dense``, ``BatchNorm2D`` or ``Add``
before it when that layer's output has no other consumer, hands a ReLU's gradient to a max
pool, FeatureNorm or Dropout reading it alone, and lets an ``Add`` with its ReLU fused sum the
gradients of an output read twice as it applies the ReLU's (one pass over a batch fewer each
time). Only passes that read the options take part: a user's subclass overriding ``forward``
or ``backward`` (a leaky ``ReLU``, a ``BatchNorm2D`` calling ``super().forward(x, training)``)
is neither fused away nor handed another layer's work (:func:`_takes`). A layer whose backward
never runs (a frozen trunk's, before every trained layer) keeps nothing for it in a training
pass (``Options.keep_for_backward``: a frozen backbone holds no activations, as in PyTorch).
Nothing is set on the layers or switched on and off around a pass: a layer called by itself
always gets the default options and does all its own work.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import checks
from .backend import Backend, dtype_name
from .errors import InputError
from .layers import BatchNorm2D, Conv2D, Dense, Normalization
from .layers.activation import ReLU
from .layers.arguments import Shape, building_for
from .layers.base import DEFAULT, Layer, Options, RandomLayer, refuse_other_weight_shapes
from .layers.symbolic import Node, SymbolicTensor
from .structure import where

Inbound = tuple[int, ...]


#: Keras 3's other keywords of ``keras.Input``: the values xpcnn does (taken), and what to do
#: instead of another.
_INPUT_KEYWORDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "sparse": ((None, False), "xpcnn's inputs are dense arrays (sparse=False only)"),
    "ragged": ((None, False), "xpcnn's inputs are dense arrays of one shape (ragged=False only)"),
    "batch_shape": ((None,), "give the per-sample shape, Input(shape=batch_shape[1:]): the batch "
                             "size is fit's"),
    "tensor": ((None,), "xpcnn.Input makes the symbolic tensor itself; a model's input data "
                        "are given to fit and predict"),
    "optional": ((False,), "an xpcnn model's one input is always given (optional=False only)"),
}


#: Why Input takes no batch size (Keras' keyword, and its second positional argument).
_BATCH_SIZE_IS_FITS = ("the batch size is fit's, evaluate's and predict's (fit(x, y, "
                       "batch_size=...)), not the model's, which takes batches of any size: "
                       "leave batch_size out")


def Input(shape: tuple[int, ...] | list[int] | None = None, name: str | None = "input", *,  # noqa: N802
          batch_size: int | None = None, dtype: Any = None, **keras: Any) -> SymbolicTensor:
    """The symbolic input of a functional model: per-sample ``shape``, e.g. (32, 32, 3).
    Keras' ``batch_size`` and ``dtype`` are taken at the values xpcnn does (None; None or
    float32: the model casts its batches to its own dtype), and so are Keras' other keywords
    (``sparse=False``...); another value is refused, naming what to do instead."""
    if isinstance(name, int | np.integer) and not isinstance(name, bool):
        raise InputError(f"Input({shape!r}, {name!r}): xpcnn's second positional argument is "
                         "the input's name, Input(shape, name); Keras 3's is batch_size, "
                         f"Input(shape=None, batch_size=None, dtype=None, ...), which xpcnn "
                         f"takes only as None: {_BATCH_SIZE_IS_FITS}")
    if batch_size is not None:
        raise InputError(f"Input(batch_size={batch_size!r}): {_BATCH_SIZE_IS_FITS}")
    if dtype is not None and not checks.is_float32(dtype):
        raise InputError(f"Input(dtype={dtype!r}): xpcnn's Input takes dtype only as None or "
                         "'float32' (Keras' default): a model casts its batches (uint8 images "
                         "too) to its own dtype, set by Model(inputs, outputs, dtype='float64') "
                         "or Sequential(dtype=...); for mixed precision, "
                         "compile(precision='mixed_float16')")
    for key, value in keras.items():
        taken, instead = _INPUT_KEYWORDS.get(key, ((), ""))
        if not instead:
            raise InputError(f"Input({key}={value!r}): Input takes shape, name and Keras' "
                             f"batch_size, dtype, {', '.join(_INPUT_KEYWORDS)} (at xpcnn's "
                             "values)")
        if not checks.is_one_of(value, taken):
            raise InputError(f"Input({key}={value!r}): Keras' keyword, which xpcnn's Input takes "
                             f"only as {' or '.join(map(repr, taken))}: {instead}")
    ok = isinstance(shape, tuple | list) and all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in shape)
    if not ok or not shape:
        # (Keras' Input((None, None, 3)), images of any size)
        anysize = isinstance(shape, tuple | list) and any(d is None for d in shape)
        raise InputError(f"Input shape must be positive sizes such as (H, W, C) (no batch "
                         f"axis), got {shape!r}" + (
                             ": xpcnn's inputs have fixed sizes, where Keras' None takes any; "
                             "declare the size of the first data, and build the model again "
                             "for another (model.build((None, H, W, C)), which keeps the "
                             "weights of a model of convolutions and global pooling)"
                             if anysize else ""))
    return SymbolicTensor(tuple(int(d) for d in shape), None,
                          checks.name("input" if name is None else name, "input name"))


def _one(t: Any, what: str) -> SymbolicTensor:
    if isinstance(t, list | tuple) and len(t) == 1:
        t = t[0]
    if isinstance(t, list | tuple | dict) and len(t) > 1:
        every = " (model.layer_outputs(x) returns every layer's output)" if what == "outputs" \
            else ""
        raise InputError(f"Model {what} must be one symbolic tensor, got {len(t)}: an xpcnn "
                         f"model has one input and one output{every}")
    if not isinstance(t, SymbolicTensor):
        raise InputError(f"Model {what} must be one symbolic tensor (from xpcnn.Input or a "
                         f"layer called on one), got {type(t).__name__}")
    return t


def input_shape_of(inputs: Any) -> Shape:
    return _one(inputs, "inputs").sample_shape


def inbound_of(layer_specs: list[dict[str, Any]]) -> list[Inbound]:
    """What each layer of a configuration (``Model.get_config()["layers"]``) reads: its
    ``inbound`` list, or the layer before it where it has none."""
    inbound = []
    for k, spec in enumerate(layer_specs):
        ins = spec.get("inbound", [k])
        if not isinstance(ins, list) or not all(type(i) is int for i in ins):
            raise InputError(f"layer {k}: inbound must be a list of layer numbers, got {ins!r}")
        inbound.append(tuple(ins))
    return inbound


@dataclass(frozen=True)
class Symbolic:
    """A model's symbolic graph (Keras' ``model.input`` and ``model.output``): its input, its
    output, and each layer's call in it, in the order of the model's layers."""

    input: SymbolicTensor
    output: SymbolicTensor
    nodes: tuple[Node, ...]


def trace(inputs: Any, outputs: Any) -> tuple[list[Layer], list[Inbound], Symbolic]:
    """The graph from ``inputs`` (an :func:`Input`) to ``outputs``: layers in the order they
    were called, what each reads, and the symbolic graph it was traced from."""
    inputs, outputs = _one(inputs, "inputs"), _one(outputs, "outputs")
    if inputs.node is not None:
        raise InputError(f"Model inputs must be the tensor xpcnn.Input(shape) returns; "
                         f"{inputs.name!r} is the output of a layer")
    tensors: dict[int, SymbolicTensor] = {}
    stack = [outputs]
    while stack:
        t = stack.pop()
        if t.node is None and t is not inputs:
            _refuse_other_input(t, inputs)
        if t.node is not None and id(t) not in tensors:
            tensors[id(t)] = t
            stack.extend(t.node.inputs)
    if not tensors:
        raise InputError("the model has no layers: its outputs are its inputs")
    order = sorted(tensors.values(), key=lambda t: t.node.order)  # type: ignore[union-attr]
    seen: dict[int, Layer] = {}
    for t in order:
        layer = t.node.layer  # type: ignore[union-attr]
        if id(layer) in seen:
            raise InputError(f"layer {layer.name!r} is called twice in this graph: an xpcnn "
                             "layer keeps one forward pass for its backward, so shared layers "
                             "(a layer, or a model, called twice) are not supported; use a "
                             "second layer or model (set_weights copies weights)")
        seen[id(layer)] = layer
    index = {id(inputs): 0, **{id(t): k + 1 for k, t in enumerate(order)}}
    nodes = tuple(t.node for t in order)
    return ([n.layer for n in nodes],  # type: ignore[union-attr]
            [tuple(index[id(i)] for i in n.inputs) for n in nodes],  # type: ignore[union-attr]
            Symbolic(inputs, outputs, nodes))  # type: ignore[arg-type]


def _refuse_other_input(t: SymbolicTensor, inputs: SymbolicTensor) -> None:
    """Refuse outputs computed from input ``t``, not the model's ``inputs``; where ``t`` is a
    built model's own input (its layers' ``output`` are in that graph, also where the model is
    called on a tensor inside another), or either is the input of a model built again for
    another input shape, the error names that model and says what to do instead."""
    same = " (another tensor of the same name)" if t.name == inputs.name else ""
    rebuilt = t if t.rebuilt else inputs if inputs.rebuilt else None
    if rebuilt is not None:
        # (a model built for other images moves its input and its layers' outputs to a new
        # graph: ends taken before and after that build do not meet)
        which = f"input {t.name!r}" if rebuilt is t else "this model's input"
        raise InputError(f"the outputs are computed from input {t.name!r} of shape {t.shape}, "
                         f"which is not this model's input, of shape {inputs.shape}{same}: "
                         f"{which} is that of the graph model {rebuilt.model!r} made when "
                         f"built again for inputs of shape {rebuilt.shape} (model.build), and a "
                         "model built for another input shape has its input and its layers' "
                         "outputs in a new graph (but for layers whose calls a model traced "
                         "before it holds, which stay in that model's graph): take both ends "
                         "from one model as it is built now, xpcnn.Model(m.input, "
                         "layer.output), m that model; a model made from them before keeps "
                         "its own, ex.input and ex.output")
    if t.model is None:
        raise InputError(f"the outputs are computed from input {t.name!r} of shape {t.shape}, "
                         f"which is not this model's input{same}: the graph from the model's "
                         "input to its outputs is disconnected (xpcnn models have one input)")
    raise InputError(f"the outputs are computed from input {t.name!r} of shape {t.shape}, the "
                     f"input of model {t.model!r}, which is not this model's input{same}: the "
                     "layers of a built model have their output in its own graph, from its own "
                     "input, also where the model is called on a tensor inside another (as in "
                     "Keras); use xpcnn.Model(m.input, layer.output), m that model, for a model "
                     "sharing its weights, or the tensors your own layer calls returned")


def symbolic(layers: list[Layer], inbound: list[Inbound], input_shape: Shape,
             input_name: str = "input") -> Symbolic:
    """The symbolic graph of built ``layers`` (a Sequential's, a loaded model's), from an
    input named ``input_name``."""
    tensors, nodes = [Input(input_shape, input_name)], []
    for layer, ins in zip(layers, inbound, strict=True):
        nodes.append(Node(layer, tuple(tensors[i] for i in ins), layer.multi_input,
                          layer.output_shape))  # type: ignore[arg-type]
        tensors.append(nodes[-1].output)
    return Symbolic(tensors[0], tensors[-1], tuple(nodes))


def read_by(layer: Layer, ins: Inbound, values: list[Any]) -> Any:
    """What ``layer`` reads from ``values`` (tensors, shapes) at slots ``ins``: a list for a
    merge layer, else its one input."""
    return [values[i] for i in ins] if layer.multi_input else values[ins[0]]


def check_graph(layers: list[Layer], inbound: list[Inbound]) -> None:
    """Each layer reads tensors made before it, as many as it takes (one; two or more for a
    merge layer), and every layer leads to the output."""
    if len(inbound) != len(layers):
        raise InputError(f"{len(layers)} layers but {len(inbound)} inbound lists")
    used = {len(layers)}
    for k, (layer, ins) in enumerate(zip(layers, inbound, strict=True)):
        if not all(isinstance(i, int) and 0 <= i <= k for i in ins):
            raise InputError(f"layer {k} ({layer.name!r}) reads {list(ins)}: each input must be "
                             f"0 (the model's input) or an earlier layer's output (1..{k})")
        if (len(ins) >= 2) != layer.multi_input or not ins:
            want = "two or more inputs" if layer.multi_input else "one input"
            raise InputError(f"layer {k} ({layer.name!r}, {type(layer).__name__}) takes {want}, "
                             f"got {len(ins)}")
        used.update(ins)
    dead = [layers[k].name for k in range(len(layers)) if k + 1 not in used]
    if dead:
        raise InputError(f"layers {dead} do not lead to the model's output")


def build(layers: list[Layer], inbound: list[Inbound], input_shape: Shape, backend: Backend,
          dtype: str, compute_dtype: str, seed: int) -> None:
    """Build every layer for its inputs' shapes; layer ``k``'s weights come from the seed
    ``[seed, k]``, the same on every device. A layer already built keeps its weights (as in
    Keras: a trained model used inside another) and a random layer its stream, on another
    device, in another dtype and for inputs of another size where its weights keep their shapes
    (a convolution on larger images); where they would not, it is refused with its weights
    untouched. Weights of float64 that float32 cannot hold exactly are never rounded to it
    (the model that trained them would run on the rounded weights too): that build is refused
    before any layer changes."""
    if dtype != "float64":
        for layer in layers:
            if layer.built and dtype_name(layer.dtype) == "float64" and not all(
                    np.array_equal(w, w.astype(np.float32), equal_nan=True)
                    for w in layer.get_weights()):
                raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) holds float64 "
                                 f"weights, trained or set in another model: a {dtype} model "
                                 "would round them, in that model too; give this model "
                                 "dtype='float64' (a functional model of built layers takes "
                                 "their dtype by default), or set_weights() into new layers")
    shapes: list[Any] = [input_shape]
    for k, (layer, ins) in enumerate(zip(layers, inbound, strict=True)):
        shape = read_by(layer, ins, shapes)
        if _built_for(layer, shape, backend, dtype) and not layer.provisional:
            layer.set_compute_dtype(backend.dtype(compute_dtype))
            shapes.append(layer.output_shape)
            continue
        # (a layer built alone by adapt() is built from its float64 statistics, as unbuilt)
        kept = _weights_that_fit(layer, shape) if layer.built and not layer.provisional else []
        stream = ((layer.seed, layer.calls) if layer.built and isinstance(layer, RandomLayer)
                  else None)
        rng = np.random.default_rng([seed, k])
        with building_for(input_shape):  # (a window's error tells the input from a map)
            shapes.append(layer.build(shape, backend, dtype, compute_dtype, rng))
        if kept:
            layer.set_weights(kept)
        if stream is not None:
            layer.set_random_state(*stream)


def weight_count(layer: Layer, shape: Any) -> int | None:
    """How many weight values ``layer`` creates for per-sample ``shape``, worked out without
    building it (None: not known here, a user's layer say; a wrong rank is left for the
    layer's own build to report)."""
    if isinstance(layer, Dense):
        return shape[0] * layer.units + layer.units * layer.use_bias if len(shape) == 1 else None
    if isinstance(layer, Conv2D):
        if len(shape) != 3:
            return None
        kh, kw = layer.kernel_size
        return kh * kw * shape[2] * layer.filters + layer.filters * layer.use_bias
    if isinstance(layer, BatchNorm2D):
        return 4 * shape[-1]
    if isinstance(layer, Normalization):  # (adapted: its mean and variance, (C,) each)
        return 2 * shape[-1] if layer.adapted else 0
    return 0 if not layer.weight_names else None


def trial_build(layers: list[Layer], inbound: list[Inbound], input_shape: Shape,
                keeping: bool = False) -> Shape | None:
    """The graph's per-sample output shape for per-sample ``input_shape``, worked out on
    unbuilt copies of its layers built on the CPU one at a time (the layers stay as they
    are): each copy draws the weights its layer would have there, then is dropped, so it
    costs what building the largest layer for that shape does (a Dense's copy is built for
    one feature: its output does not depend on them). A layer refusing its input raises as
    its build does.

    ``keeping``: None instead at the first built layer whose weights would change shape
    there (so that :func:`build` for it would refuse it), found before its copy is built
    where :func:`weight_count` knows them: no weights of the new sizes are drawn."""
    shapes: list[Any] = [input_shape]
    for layer, ins in zip(layers, inbound, strict=True):
        shape = read_by(layer, ins, shapes)
        held = keeping and layer.built and not layer.provisional
        if held and weight_count(layer, shape) not in (None, layer.count_params()):
            return None
        if not held and len(shape) == 1 and checks.defined_by(layer, "_build") is Dense:
            # (its output is (units,) for any features: its copy built for one draws no
            # kernel for a Flatten of large images)
            shape = (1,)
        probe = layer.unbuilt_copy()
        with building_for(input_shape):
            # (a fixed rng: a standalone build would draw from the stream of such builds)
            shapes.append(probe.build(shape, "cpu", "float32", None, np.random.default_rng(0)))
        if held and [probe.keras_shape(n) for n in probe.present_weight_names()] \
                != [layer.keras_shape(n) for n in layer.present_weight_names()]:
            return None
    return shapes[-1]


def built_as(layers: list[Layer], inbound: list[Inbound], input_shape: Shape, backend: Backend,
             dtype: str, compute_dtype: str) -> bool:
    """True where every layer is still built as :func:`build` built it for ``input_shape`` (a
    layer shared with another model may since have been built for that model's inputs, or
    precision)."""
    shapes: list[Any] = [input_shape]
    compute = backend.dtype(compute_dtype)
    for layer, ins in zip(layers, inbound, strict=True):
        shape = read_by(layer, ins, shapes)
        if not _built_for(layer, shape, backend, dtype) or layer.compute_dtype != compute:
            return False
        shapes.append(layer.output_shape)
    return True


def _weights_that_fit(layer: Layer, shape: Any) -> list[np.ndarray]:
    """The weights of built ``layer`` (host copies), after checking that the layer built for
    inputs of ``shape`` has weights of the same shapes."""
    weights = layer.get_weights()
    if not weights:
        return []
    probe = layer.unbuilt_copy()  # (built aside: the layer stays as it is)
    probe.build(shape, "cpu", "float32")
    refuse_other_weight_shapes(layer, probe, shape)
    return weights


def _built_for(layer: Layer, shape: Any, backend: Backend, dtype: str) -> bool:
    if not layer.built:
        return False
    same_shape = layer.input_shape == (tuple(map(tuple, shape)) if layer.multi_input
                                       else tuple(shape))
    return (same_shape and layer.backend.xp is backend.xp
            and layer.backend.device == backend.device and layer.dtype == backend.dtype(dtype))


@dataclass(frozen=True)
class Step:
    """One layer call of a plan: read ``inputs`` (slots), write ``output``, with ``options``;
    ``backward`` says whether the backward pass calls it; ``release`` lists the slots nothing
    reads after this step (freed in the forward pass)."""

    layer: Layer
    inputs: Inbound
    output: int
    options: Options
    backward: bool
    release: tuple[int, ...]
    #: the layer's class is a user's, not xpcnn's own: the executor checks that its training
    #: passes keep its state arrays and that its backward returns gradients shaped as its
    #: inputs (xpcnn's own layers are tested for both, and pay nothing for the checks)
    checked: bool = False


@dataclass(frozen=True)
class Plan:
    """A compiled graph: its steps in order, the slot of the result (the logits), and the
    slots whose gradient some layer needs."""

    steps: tuple[Step, ...]
    output: int
    slots: int
    needs_grad: frozenset[int]
    #: the slots whose writer sums their gradients itself (see Options.sum_output_grads)
    gathered: frozenset[int] = frozenset()
    #: the layers reading the model's batch cast it themselves (see Options.cast_input)
    cast_input: bool = False
    #: why the plan cannot train (a layer with no gradient where one is needed), refused by a
    #: training forward pass before it moves anything; inference runs
    untrainable: str | None = None

    def options(self, layer: Layer) -> Options:
        """The options the plan calls ``layer`` with (the defaults for one it skips)."""
        return next((s.options for s in self.steps if s.layer is layer), DEFAULT)


def compile_plan(layers: list[Layer], inbound: list[Inbound], drop_last: bool, logits: bool,
                 trained: Collection[Layer]) -> Plan:
    """The plan of a graph; ``drop_last`` leaves out the final layer (a Softmax left to the
    loss): the plan's result is then that layer's input; else ``logits`` has the final layer
    leave out its softmax activation (``Options.logits``). ``trained``: the layers the
    optimiser updates, whose backward runs (the model's ``trainable_layers``: none where the
    model itself is frozen, whatever its layers' own flags)."""
    trains = {id(la) for la in trained}
    count = len(layers) - 1 if drop_last else len(layers)
    result = inbound[-1][0] if drop_last else len(layers)
    uses = Counter(i for ins in inbound[:count] for i in ins)
    uses[result] += 1
    # A plain ReLU() reading alone the output of a layer that can apply it is fused into it:
    # the ReLU's output is then that layer's output slot. (Only ReLU's own passes are
    # fused away, and only into a layer that _takes(...) the work: see there.)
    alias: dict[int, int] = {}
    producer: dict[int, int] = {}  # slot -> index (into kept) of the step writing it
    fused: set[int] = set()
    kept: list[tuple[Layer, Inbound, int]] = []
    for k in range(count):
        layer, ins = layers[k], tuple(alias.get(i, i) for i in inbound[k])
        before = producer.get(ins[0])
        if (_plain_relu(layer) and before is not None
                and _takes(kept[before][0], "can_fuse_relu") and uses[inbound[k][0]] == 1):
            fused.add(before)
            alias[k + 1] = ins[0]
            continue
        producer[k + 1] = len(kept)
        kept.append((layer, ins, k + 1))
    result = alias.get(result, result)
    # Which slots need a gradient: those computed from a trainable parameter.
    needs: set[int] = set()
    need_dx = []
    untrainable = None
    for layer, ins, out in kept:
        need_dx.append(any(i in needs for i in ins))
        if need_dx[-1] and not layer.has_gradient and untrainable is None:
            untrainable = _no_gradient(layers, kept, producer, len(need_dx) - 1, trains)
        if need_dx[-1] or id(layer) in trains:
            needs.add(out)
    # A ReLU's gradient is applied by the one layer reading its output where that layer can
    # do it in its own passes (see Options.apply_input_relu_grad).
    readers = Counter(i for _, ins, _ in kept for i in ins)
    readers[result] += 1
    skip: set[int] = set()
    apply: set[int] = set()
    for j, (layer, ins, _) in enumerate(kept):
        before = producer.get(ins[0])
        if (len(ins) == 1 and before is not None and readers[ins[0]] == 1 and need_dx[j]
                and _takes(layer, "can_apply_input_relu_grad")
                and (_takes(kept[before][0], "relu_output") or before in fused)):
            skip.add(before)
            apply.add(j)
    # A layer applying its fused ReLU's gradient to an output read by several layers sums
    # their gradients in that pass where it can (Options.sum_output_grads): the model keeps
    # them as they come instead of adding them (one pass over a batch fewer).
    gathered = frozenset(out for j, (layer, _, out) in enumerate(kept)
                         if _takes(layer, "can_sum_output_grads") and j in fused
                         and readers[out] > 1
                         and out in needs)
    # The model's batch is cast by the layers reading it where every one can (Options.cast_input).
    input_readers = [layer for layer, ins, _ in kept if 0 in ins]
    cast_input = result != 0 and bool(input_readers) and all(_takes(la, "casts_input")
                                                              for la in input_readers)
    last_read = {i: j for j, (_, ins, _) in enumerate(kept) for i in ins}
    steps = []
    for j, (layer, ins, out) in enumerate(kept):
        checked = not checks.of_xpcnn(type(layer).__module__)
        if checked:
            _check_pass_signatures(layer)
        # (a step whose backward never runs, before every trained layer, keeps nothing for it)
        backward = need_dx[j] or id(layer) in trains
        options = Options(fused_relu=j in fused, skip_relu_grad=j in skip,
                          apply_input_relu_grad=j in apply, sum_output_grads=out in gathered,
                          need_input_grad=need_dx[j], cast_input=cast_input and 0 in ins,
                          logits=logits and not drop_last and out == result,
                          keep_for_backward=backward)
        release = tuple(sorted({i for i in ins if last_read[i] == j and i != result}))
        steps.append(Step(layer, ins, out, options, backward, release, checked))
    return Plan(tuple(steps), result, len(layers) + 1, frozenset(needs), gathered, cast_input,
                untrainable)


def _check_pass_signatures(layer: Layer) -> None:
    """Refuse a user's layer whose ``forward`` or ``backward`` cannot take what the plan
    passes (``forward(x, training, options)``, ``backward(dy, options)``, by position):
    PyTorch's ``forward(self, x)`` failed at the first batch with "takes 2 positional arguments
    but 4 were given". (``*args`` and extra defaulted ones are fine; called by itself, a layer
    may take arguments of its own.)"""
    for method, args, want in (("forward", 3, "forward(self, x, training=False, options=None)"),
                               ("backward", 2, "backward(self, dy, options=None)")):
        try:
            signature = inspect.signature(getattr(layer, method))
        except (TypeError, ValueError):  # (a callable inspect cannot read: left to its call)
            continue
        try:
            signature.bind(*[None] * args)  # (the bound method: self is given)
        except TypeError:
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s {method}"
                             f"{signature} cannot take the arguments a model passes it: define "
                             f"{want} (options: the plan's xpcnn.layers.base.Options; pass it "
                             f"on where it calls a built-in layer's {method})") from None


def _plain_relu(layer: Layer) -> bool:
    """A ReLU the plan may fuse away: uncapped, with ReLU's own forward and backward (a
    user's subclass overriding them, a leaky ReLU say, runs as written)."""
    return (isinstance(layer, ReLU) and layer.max_value is None
            and checks.defined_by(layer, "forward") is ReLU
            and checks.defined_by(layer, "backward") is ReLU)


def _takes(layer: Layer, capability: str) -> bool:
    """Whether the plan may hand ``layer`` the work that ``capability`` (``can_fuse_relu``,
    ``relu_output``...) offers: it is true, and the class that declares it also defines the
    forward and backward in use, which read the options. A user's subclass overriding them
    (calling ``super().forward(x, training)`` without the options, say) does all its own work,
    as it does called by itself: fused, the work handed to it was lost."""
    return bool(getattr(layer, capability)) and checks.same_author(layer, capability,
                                                                   "forward", "backward")


def _no_gradient(layers: list[Layer], kept: list[tuple[Layer, Inbound, int]],
                 producer: dict[int, int], j: int, trains: set[int]) -> str:
    """Why step ``j`` of ``kept``, a layer with no gradient (``Layer.has_gradient``) that a
    layer trained before it needs one from, cannot train: found when the plan is compiled,
    refused before a training forward pass moves any statistic (its backward failed only
    after one, in the first step)."""
    layer, ins, out = kept[j]
    stack = list(ins)
    while True:  # (a trained layer is upstream: that is why the gradient is needed)
        slot = stack.pop()
        if slot not in producer:  # (the model's input)
            continue
        trained, reads, _ = kept[producer[slot]]
        if id(trained) in trains:
            break
        stack.extend(reads)
    return (f"{where(layer, out - 1, layers)} has no gradient, and the trained layer "
            f"{trained.name!r} ({type(trained).__name__}) before it needs one to pass through "
            f"it: put the {type(layer).__name__} before every trained layer (at the model's "
            "start, where augmentations go), or freeze the layers before it "
            "(layer.trainable = False)")


def forward(plan: Plan, x: Any, training: bool) -> Any:
    """Run the plan's steps on batch ``x``; returns the plan's result."""
    if training and plan.untrainable is not None:
        raise InputError(plan.untrainable)
    values: list[Any] = [None] * plan.slots
    values[0] = x
    for step in plan.steps:
        ins = step.inputs  # (what read_by reads, without a call per step)
        a = [values[i] for i in ins] if step.layer.multi_input else values[ins[0]]
        if step.checked:
            held = tuple(step.layer.state.items()) if training else ()
            values[step.output] = y = step.layer.forward(a, training, step.options)
            if training:
                _check_state_kept(step.layer, held, "forward")
            _check_output(step.layer, y, x)
        else:
            values[step.output] = step.layer.forward(a, training, step.options)
        for i in step.release:
            values[i] = None
    return values[plan.output]


def backward(plan: Plan, dz: Any, on_layer: Callable[[Layer], None] | None = None) -> None:
    """Backward pass from the result's gradient ``dz``, after ``forward(plan, x, True)``:
    fills every trainable layer's ``grads``, calling ``on_layer(layer)`` after each layer's
    backward (data parallelism starts the allreduce of its gradients then). A tensor read by
    several layers receives the sum of their gradients, added in the order they come (by the
    layer that made it, where it is one of the plan's ``gathered`` slots)."""
    grads = {plan.output: dz}
    for step in reversed(plan.steps):
        if not step.backward:
            continue
        if step.checked:
            held = tuple(step.layer.state.items())
            for k in step.layer.params:  # (one it does not fill this step is named, not an
                step.layer.grads.pop(k, None)  # earlier step's trained on again)
            dx = step.layer.backward(grads.pop(step.output), step.options)
            _check_state_kept(step.layer, held, "backward")
            _check_param_grads(step.layer, dz)
            if step.options.need_input_grad:
                _check_input_grads(step.layer, dx, dz, [i in plan.needs_grad for i in step.inputs])
        else:
            dx = step.layer.backward(grads.pop(step.output), step.options)
        if on_layer is not None:
            on_layer(step.layer)
        if not step.options.need_input_grad:
            continue
        for i, g in zip(step.inputs, dx if step.layer.multi_input else (dx,), strict=True):
            if i in plan.gathered:
                grads.setdefault(i, []).append(g)
            elif i in plan.needs_grad:
                grads[i] = grads[i] + g if i in grads else g


def _check_state_kept(layer: Layer, held: tuple[tuple[str, Any], ...], what: str) -> None:
    """A user's layer's training pass left the arrays of its ``state`` (``held`` before it)
    the same objects, updated in place: a step skipped on the device puts back the arrays it
    snapshot before the step, and a CUDA graph writes the arrays it was captured with, so a
    new array put in their place would keep a skipped step's statistics (NaN, say) while the
    error says nothing was updated. Refused by name, with the arrays put back."""
    state = layer.state
    if len(state) == len(held) and all(state.get(k) is a for k, a in held):
        return
    kept = dict(held)
    replaced = next((k for k in kept if k in state and state[k] is not kept[k]), None)
    changed = sorted(state.keys() ^ kept.keys())
    state.clear()
    state.update(kept)
    name = f"layer {layer.name!r} ({type(layer).__name__})"
    if replaced is None:
        raise InputError(f"{name}'s {what} pass added or removed the state arrays {changed}: "
                         "a layer makes each of its state arrays in _build (self._param(name, "
                         "value, trainable=False)) and then updates it in place")
    raise InputError(f"{name}'s {what} pass replaced its state array {replaced!r} with a new "
                     f"one instead of updating it in place: write self.state[{replaced!r}][...] "
                     "= new_value (a step skipped for a non-finite loss puts back the arrays "
                     "it snapshot, and a CUDA graph writes the arrays it was captured with: "
                     "a new one is neither)")


def _array_type(a: Any) -> str:
    """The type of array ``a`` by its library, as a user knows it: ``numpy.ndarray``,
    ``array_api_strict.Array``, ``cupy.ndarray``."""
    return f"{type(a).__module__.partition('.')[0]}.{type(a).__qualname__}"


def _foreign(g: Any, model_array: Any) -> str | None:
    """Where ``g``, an array a user's backward gave, is another library's than the model's
    (``model_array`` is one of its arrays; NumPy's scalars, a sum without ``axis=``, are
    NumPy's): its type, as :func:`_array_type` names it. None where it is the model's, or no
    array at all (named by the shape checks)."""
    if isinstance(g, type(model_array)) or not hasattr(g, "shape") or not hasattr(g, "dtype"):
        return None
    if isinstance(g, np.generic) and isinstance(model_array, np.ndarray):
        return None
    return _array_type(g)


def _use_xp(model_array: Any) -> str:
    """What the error of another library's gradient adds (see :func:`_foreign`)."""
    return (f", where the model's arrays are {_array_type(model_array)}: compute it with "
            "self.xp, the layer's array namespace (self.xp.sum, self.xp.where...), not "
            "another library's")


def _check_input_grads(layer: Layer, dx: Any, dz: Any, needed: list[bool]) -> None:
    """A user's layer's backward returned one gradient for each of its inputs (a list for a
    merge layer), each that is ``needed`` a float array of the model's library (that of the
    model's gradient ``dz``) shaped as that input, (batch, *its per-sample shape): a wrong one
    failed deep inside the next layer's backward or the sum of two gradients (one not needed,
    None say, is not read)."""
    batch = int(dz.shape[0])
    shapes = layer.input_shape if layer.multi_input else (layer.input_shape,)
    if layer.multi_input and (not isinstance(dx, list | tuple) or len(dx) != len(shapes)):
        got = f"a list of {len(dx)}" if isinstance(dx, list | tuple) else f"one {type(dx).__name__}"
        raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward returned "
                         f"{got}: a merge layer returns a list of the gradients of its "
                         f"{len(shapes)} inputs, in their order")
    for k, (g, shape, need) in enumerate(zip(dx if layer.multi_input else (dx,), shapes, needed,
                                             strict=True)):
        if not need:
            continue
        input_ = f"its input {k}" if layer.multi_input else "its input"
        foreign = _foreign(g, dz)
        if foreign is not None:  # (first: a dtype of another library is no dtype of the model's)
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward "
                             f"returned a {foreign} for {input_}{_use_xp(dz)}")
        got_shape = tuple(g.shape) if hasattr(g, "shape") and hasattr(g, "dtype") else None
        if got_shape is None or got_shape[0] != batch or got_shape[1:] != shape \
                or not checks.real_floating(layer.xp, g.dtype):
            want = (batch, *shape)
            got = ("None" if g is None else f"a {type(g).__name__}" if got_shape is None
                   else f"a gradient of shape {got_shape} and dtype {g.dtype}")
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward "
                             f"returned {got} for {input_}, of shape {want}: backward returns "
                             "the gradient of the loss with respect to the input, a float "
                             "array of the input's shape")


def _check_output(layer: Layer, y: Any, x: Any) -> None:
    """A user's layer's forward returned one array of the model's namespace (the type of its
    batch ``x``), shaped (batch, *the output shape its _build declared), of a float dtype: a
    list, or another shape, failed deep inside the next layer."""
    shape = getattr(y, "shape", None)
    if isinstance(y, type(x)) and shape is not None and shape[0] == x.shape[0] \
            and tuple(shape[1:]) == layer.output_shape and checks.real_floating(layer.xp, y.dtype):
        return
    want = (int(x.shape[0]), *layer.output_shape)
    got = (f"a {type(y).__name__}" if shape is None or not isinstance(y, type(x))
           else f"an array of shape {tuple(shape)} and dtype "
                f"{dtype_name(y.dtype, float_only=False)}")
    raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s forward returned {got}: "
                     f"forward returns one float array ({type(x).__name__}, as its input) of "
                     f"shape {want}, the batch then the per-sample output shape that _build "
                     "returned")


def _check_param_grads(layer: Layer, dz: Any) -> None:
    """Each gradient a user's trained layer's backward put in ``grads`` is a float array of
    the model's library (that of its gradient ``dz``) and of its parameter's shape: a scalar
    (a sum without ``axis=``) was broadcast by the optimiser, every element moved alike,
    silently; a per-sample one failed deep inside its update."""
    if not layer.trainable:
        return
    for k, g in layer.grads.items():
        p = layer.params.get(k)
        if p is None:
            continue
        foreign = _foreign(g, dz)
        if foreign is not None:
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward put "
                             f"a {foreign} in grads[{k!r}]{_use_xp(dz)}")
        shape = getattr(g, "shape", None)
        if shape is not None and tuple(shape) == tuple(p.shape) \
                and checks.real_floating(layer.xp, g.dtype):
            continue
        got = (f"a {type(g).__name__}" if shape is None
               else f"a gradient of shape {tuple(shape)} and dtype "
                    f"{dtype_name(g.dtype, float_only=False)}")
        raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward put {got} "
                         f"in grads[{k!r}], expected shape {tuple(p.shape)}: the gradient of "
                         "the loss with respect to the parameter, a float array of its shape "
                         "(summed over the batch)")


def each_output(layers: list[Layer], inbound: list[Inbound], x: Any, training: bool = False
                ) -> list[Any]:
    """Every layer's output, each layer doing all its own work (for inspection), keeping
    nothing for a backward pass in training mode either (no layer holds its activations after
    it: ``Options.keep_for_backward``)."""
    values = [x]
    for layer, ins in zip(layers, inbound, strict=True):
        if not checks.of_xpcnn(type(layer).__module__):  # (as a plan refuses it)
            _check_pass_signatures(layer)
        values.append(layer.forward(read_by(layer, ins, values), training, _INSPECTION))
    return values[1:]


_INSPECTION = Options(keep_for_backward=False)
