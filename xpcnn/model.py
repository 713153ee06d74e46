"""Model: a graph of layers that trains, evaluates and predicts; Sequential: a stack of layers.

``Model(inputs, outputs)`` is the functional model of Keras, traced from symbolic tensors
(:func:`xpcnn.Input`); ``Sequential`` is the chain of its layers. Both run through the same
executor (:mod:`xpcnn.graph`). This module is the network: its graph, building, weights,
configuration, devices and files; compile, fit, evaluate, predict and the training step come
from the base class :class:`xpcnn.training.Trainer`, as in Keras 3.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import array_api_compat
import numpy as np

from . import checks, distributed, graph
from .backend import PRECISIONS, DeviceLike, dtype_name, get_backend, precision_dtype
from .errors import DataFormatError, ForeignNameError, InputError, warn
from .layers.arguments import per_sample
from .layers.base import (
    Layer,
    held_by,
    holders_of,
    not_a_weight_list,
    weight_count_hint,
    without_num_batches_tracked,
)
from .layers.dense import Dense, Flatten
from .layers.symbolic import SymbolicTensor, refuse_training_in_graph
from .layers.weight import Weight
from .ops.kernels import compute_scope, kernels_for
from .passes import PASSES, exclusive_if
from .saving import load_weights, register_model, save_model
from .saving.model_file import (
    FORMAT,
    VERSION,
    check_save_keywords,
    check_skip_mismatch,
    layers_from_config,
    record_layer_classes,
)
from .structure import check_classifier, check_structure, final_softmax
from .training import Trainer


def _refuse_call(cls: type) -> None:
    """Refuse a user's model class defining Keras' ``call`` (layers made in ``__init__``, the
    pass in ``call()``): an xpcnn model is a graph of layers, which never runs it. So are
    Keras' ``test_step``, ``predict_step`` and ``compute_loss``: only ``train_step`` is run."""
    for hook in ("call", "test_step", "predict_step", "compute_loss"):
        owner = checks.defining_class(cls, hook)
        if owner is None or not issubclass(owner, Model):
            continue
        if hook == "call":
            raise InputError(
                f"{owner.__name__} defines call(), Keras' model subclassing, which xpcnn does "
                "not run: an xpcnn model is a graph of layers. Call the layers on xpcnn.Input "
                "and pass the graph to the model: inputs = xpcnn.Input(shape); outputs = "
                "Dense(4)(Dense(8)(inputs)); super().__init__(inputs, outputs) (or "
                "xpcnn.Model(inputs, outputs)), or use Sequential([layer, ...]); a subclass may "
                "override train_step")
        raise InputError(
            f"{owner.__name__} defines {hook}(), which xpcnn never runs: a subclass may "
            "override train_step(xb, yb, sample_weight=None) only (fit runs it, see the "
            "README); evaluate, fit's validation and predict are not customisable. Give "
            "compile() a loss or metric of your own, or compute on predict()'s output")



_NO_MODE = ("an xpcnn model has no mode to set: fit trains (Dropout on, BatchNorm2D's batch "
            "statistics); predict, evaluate and model(x) infer (Dropout off, the moving "
            "statistics); layer_outputs(x, training=True) shows training mode")
_WEIGHTS = ("model.trainable_weights (all: model.weights), each Weight with its name, "
            "'layer/kernel'; compile(optimizer=xpcnn.optim.SGD(lr)) binds them to the "
            "optimiser, which takes no parameters")
_LAYERS = ("model.layers (a flat list, in the order they run) and model.get_layer(name); "
           "a layer's sublayers are not modules of their own")
_DTYPE = ("the parameters' dtype is set at construction, Sequential(..., dtype='float64') or "
          "Model(inputs, outputs, dtype=...) ('float32' or 'float64'); half precision is "
          "compile(precision='mixed_float16' or 'mixed_bfloat16')")
#: PyTorch's ``nn.Module`` names a model lacks: what xpcnn does instead (advice, not aliases:
#: each thing has one way, README's "From PyTorch" table).
TORCH_MODULE_NAMES: dict[str, str] = {
    "train": _NO_MODE, "eval": _NO_MODE, "training": _NO_MODE,
    "parameters": _WEIGHTS, "named_parameters": _WEIGHTS,
    "zero_grad": ("none needed: an eager training step drops its gradients once applied (each "
                  "layer.grads is empty after it, as after zero_grad(set_to_none=True))"),
    "state_dict": ("get_weights(), NumPy arrays in Keras' layouts (a Dense kernel (in, out), a "
                   "Conv2D kernel (kh, kw, C_in, C_out)); save_weights(path) writes them to a "
                   "file"),
    "load_state_dict": ("set_weights(ws), in Keras' layouts: list(sd.values()) with a Linear's "
                        "weight.T and a Conv2d's weight.permute(2, 3, 1, 0) (see the README, "
                        "'From PyTorch'); load_weights(path) reads save_weights' file"),
    "cuda": "model.to('cuda') (or Sequential(..., device='cuda')); returns the model",
    "cpu": "model.to('cpu'); returns the model",
    "double": _DTYPE, "float": _DTYPE, "half": _DTYPE, "bfloat16": _DTYPE,
    "modules": _LAYERS, "children": _LAYERS, "named_modules": _LAYERS,
    "named_children": _LAYERS,
}


@register_model
class Model(Trainer):
    """A network of layers from one input to one output, as Keras' functional API has it::

        inputs = xpcnn.Input((32, 32, 3))
        x = Conv2D(16, 3, padding="same", use_bias=False)(inputs)
        y = Conv2D(16, 3, padding="same")(ReLU()(BatchNorm2D()(x)))
        outputs = Softmax()(Dense(10)(GlobalAvgPool2D()(Add()([x, y]))))
        model = xpcnn.Model(inputs, outputs, device="cpu", seed=0)

    It owns the graph, building, weights, save/load_weights, to(device) and summary; compile,
    fit, evaluate, predict and train_step come from :class:`~xpcnn.training.Trainer`, through
    the hooks of :class:`~xpcnn.training.step.NetworkHooks`. :class:`Sequential` is the chain
    of layers.

    ``device`` picks the array library and device (see :func:`xpcnn.backend.get_backend`),
    ``seed`` the initial weights (the same on every device), ``dtype`` the parameters' dtype;
    a graph of layers that are built already (``Model(model.input, layer.output)``, a feature
    extractor) takes by default their device and dtype, any other the CPU and float32.
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
    (a Sequential block inside a Model: the layers are shared by both; an unbuilt one is built
    there first, as Keras builds it at its first call). Models sharing layers that they built
    otherwise run one pass at a time from several threads (see :meth:`_shared_pass`).
    ``input_shape`` and ``output_shape`` have the batch axis, None, as in Keras.

    The executor's methods below (``build``, ``_logits``, ``_backward``, ``_layer_outputs``)
    serve every graph: a subclass only says which tensors each layer reads
    (:class:`Sequential` overrides ``_inbound``: a chain).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Files name the model class: a user's subclass (Keras' way to override train_step)
        # loads by its class name where it is defined, as user layers and optimisers do.
        register_model(cls)

    def __init__(self, inputs: SymbolicTensor | None = None,
                 outputs: SymbolicTensor | None = None, *, device: DeviceLike | None = None,
                 seed: int = 0, dtype: str | None = None, name: str | None = "model",
                 trainable: bool = True) -> None:
        _refuse_call(type(self))
        super().__init__()  # (the training state: build reads the optimiser and the precision)
        trainable = checks.flag(trainable, "trainable")  # (Keras' Model(..., trainable=False))
        traced = graph.trace(inputs, outputs) if inputs is not None or outputs is not None \
            else None
        # A graph of built layers (a feature extractor of a trained model) runs by default
        # where they are and in their dtype: on the same weight arrays.
        placed = (next((la for la in traced[0] if la.built and not la.provisional), None)
                  if traced else None)
        if device is None:
            device = placed.backend if placed else "cpu"
        if dtype is None:
            dtype = dtype_name(placed.dtype) if placed else "float32"
        self.backend = get_backend(distributed.device_for_rank(device))
        if dtype not in ("float32", "float64"):
            raise InputError(f"model dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype_name = dtype
        self.precision = dtype  # (what it computes in until compiled: its own dtype)
        self.seed = seed
        self.name = name
        self._trainable = True  # (the model's own flag, as Keras': see trainable)
        self._layers: list[Layer] = LayerList(self)
        self._input_shape: tuple[int, ...] | None = None  # (per sample: see input_shape)
        self.built = False
        self._graph: list[graph.Inbound] = []
        self._plan_cache: graph.Plan | None = None  # (dropped by a build)
        self._planned_settings = -1  # (Layer.settings_changes the plan was compiled at)
        self._planned_for: tuple[Layer, ...] | None = None  # (the layers the last plan trained)
        # (trainable_layers, and Layer.rebuilds when they were listed: see _trained)
        self._trained_list: tuple[Layer, ...] = ()
        self._trained_at: int | None = None
        self._builds = 0  # (how many times its layers were built: a captured step is redone)
        # (what each layer is built as for this model, and whether another model holding one
        # of them built it otherwise, at the count _MODEL_BUILDS[0]: see _pass_rebuilds)
        self._built_like: dict[int, tuple[Any, ...]] = {}
        self._shared_at: tuple[int, bool] = (-1, False)
        self._symbolic: graph.Symbolic | None = None
        # (the calls of its graph this model put in its layers' inbound nodes, and only those:
        # it takes back no others' (a traced extractor's graph is its source model's), and they
        # vanish with it, as Keras' weak references: see _use_symbolic)
        # (held weakly: a live layer's inbound nodes keep its own alive, and the finalizer
        # holding them strongly kept a dropped model's layers past the collection that freed
        # it)
        self._recorded: weakref.WeakSet[graph.Node] = weakref.WeakSet()
        # (a traced model's graph is the user's calls, recorded as they were made; those it
        # claims (see _claim) it takes out of their layers' inbound nodes while it is built for
        # another input, and puts back when built back, or when it is collected)
        self._traced: graph.Symbolic | None = None
        self._claimed: list[graph.Node] = []
        self._taken: weakref.WeakSet[graph.Node] = weakref.WeakSet()
        _forget_when_gone(self, self._recorded, self._taken)
        # (Input(name=...)'s: the summary, the configuration and a rebuilt symbolic graph keep it)
        self._input_name = traced[2].input.name if traced else "input"
        # (Layer.rebuilds and the compute dtype when the layers were last found built as
        # this model needs them)
        self._built_as_at: tuple[int, str] | None = None
        if traced is not None:
            layers, inbound, self._symbolic = traced
            self._traced = self._symbolic
            with _names_back_if_refused(layers):
                self._set_graph(layers, inbound)
                self.build((None, *graph.input_shape_of(inputs)))
            self._claimed = _claim(self._traced.nodes, self)
            if not trainable:
                self.trainable = False

    _default_name = "model"  # (name=None's, as layers and Keras take it from name=None)

    @property
    def name(self) -> str:
        """The model's name (files, summaries and errors show it). Set, it is checked as the
        constructor checks it (a name written unchecked made files that did not load); None
        gives the default name."""
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = checks.name(self._default_name if value is None else value, "model name")

    @property
    def seed(self) -> int:
        """The seed of the weights the next build gives new layers (layer ``k`` gets
        ``[seed, k]``); set, it is checked as the constructor checks it, a NumPy integer taken
        as an int. Built layers keep their weights."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = checks.non_negative_int(value, "seed")

    def _set_graph(self, layers: list[Layer], inbound: list[graph.Inbound]) -> None:
        graph.check_graph(layers, inbound)
        _name_apart(layers, self)
        self._layers = LayerList(self, layers)
        self._graph = list(inbound)

    @property
    def layers(self) -> list[Layer]:
        """The model's layers, in weight order (see the class's doc). A change of this list
        (``pop``, ``insert``, ``layers[:] = ...``) is refused for a functional model, whose
        layers are its graph's; a Sequential's is checked as the setter checks a list, and
        builds again at once where it was built: a change refused leaves it as it was."""
        return self._layers

    @layers.setter
    def layers(self, value: list[Layer]) -> None:
        # (Keras' layers has no setter; a plain list put here held two layers of one name in
        # a Sequential, and a functional model failed later deep inside: taken as the change
        # ``layers[:] = value`` is, checked first, and refused as a whole)
        self._changing_layers()
        if not isinstance(value, list | tuple) or not all(isinstance(la, Layer) for la in value):
            got = type(value).__name__ if not isinstance(value, list | tuple) else \
                "a list holding " + ", ".join(sorted({type(la).__name__ for la in value
                                                      if not isinstance(la, Layer)}))
            raise InputError(f"model {self.name!r}'s layers must be a list of xpcnn layers, got "
                             f"{got} (add() appends a model's layers)")
        value = list(value)
        if len({id(la) for la in value}) != len(value):
            twice = next(la for la in value if sum(la is other for other in value) > 1)
            raise InputError(f"layer {twice.name!r} ({type(twice).__name__}) is given twice for "
                             f"model {self.name!r}'s layers: a layer instance appears once in a "
                             f"model; create another {type(twice).__name__}(...)")
        old, built, shape = list(self._layers), self.built, self._input_shape
        frozen = self._frozen()
        with _names_back_if_refused([*old, *value]):
            list.__setitem__(self._layers, slice(None), value)
            try:
                self._layers_changed()  # (names made apart, built again at once)
            except BaseException:
                list.__setitem__(self._layers, slice(None), old)
                self.built = False
                if built and shape is not None:
                    self.build((None, *shape))  # (as it was: its layers keep their weights)
                raise
        if frozen:  # (a frozen model's new layers are frozen: see trainable)
            for la in value:
                if not any(la is other for other in old):
                    la.trainable = False

    def _inbound(self) -> list[graph.Inbound]:
        """What each layer reads (see :mod:`xpcnn.graph`)."""
        return self._graph

    def _layer_renamed(self, layer: Layer) -> None:
        """After ``layer.name = ...``: where this model still holds it, its names are made
        apart again (a name given twice refused, see :func:`_name_apart`)."""
        if any(la is layer for la in self.layers):
            _name_apart(list(self.layers), self)

    def _changing_layers(self) -> None:
        """Before ``layers`` changes: a functional model's are its graph's (a Sequential takes
        the change, then ``_layers_changed``)."""
        raise InputError(f"model {self.name!r}'s layers are its graph's, not to change: build "
                         "another xpcnn.Model(inputs, outputs) from the layers' outputs")

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        """On a batch of arrays: the model's outputs for it in inference mode, as
        :meth:`predict_on_batch` gives them but left on the model's device, in its namespace
        (as Keras' ``model(x)``). ``training=True`` is refused: ``fit``, ``train_on_batch``
        and ``train_step`` train; the error names :meth:`layer_outputs`, and for random
        augmentations the layers called in turn.

        On a symbolic tensor: calls every layer of this model on it, so that the model
        becomes part of a functional :class:`Model` (its layers are shared: training that
        model trains them). ``training`` is refused there (see
        :func:`~xpcnn.layers.symbolic.refuse_training_in_graph`). A list or tuple of one
        symbolic tensor is taken as that tensor (a model has one input, as Keras takes
        ``model([inp])`` for a one-input model)."""
        if isinstance(x, list | tuple) and any(isinstance(t, SymbolicTensor) for t in x):
            if len(x) != 1:
                raise InputError(f"model {self.name!r} takes one input tensor, got a "
                                 f"{type(x).__name__} of {len(x)} "
                                 f"({', '.join(type(t).__name__ for t in x)}): call it on one "
                                 "symbolic tensor (xpcnn.Input or a layer's output)")
            x = x[0]
        if not isinstance(x, SymbolicTensor):
            if training:
                # (Keras' data_augmentation(images, training=True): in a chain of random
                # augmentations, the layers called in turn draw anew at each call)
                augments = all(ins == (k,) for k, ins in enumerate(self._inbound())) and any(
                    la.training_when_called for la in self.layers)
                raise InputError(f"model {self.name!r} called with training={training!r}: a "
                                 "model call runs it for inference; fit, train_on_batch and "
                                 "train_step train it. A training pass's output is "
                                 "model.layer_outputs(x, training=True)[-1] (the model left "
                                 "as it was: the same draws at each call)" + (
                                     "; to augment images afresh at each call, call the "
                                     "layers in turn (a layer called on a batch augments): "
                                     "for layer in model.layers: x = layer(x)"
                                     if augments else ""))
            return self._outputs_of_batch(x)
        refuse_training_in_graph(f"model {self.name!r}", training)
        if not self.built and self.layers:
            # (built at its first call, as Keras builds a Sequential, symbolic calls too: its
            # weights from its own seed, and summary, weights and save_weights work on it)
            self.build((None, *x.sample_shape))
        values = [x]
        for layer, ins in zip(self.layers, self._inbound(), strict=True):
            # (not one of the layer's inbound nodes: its output stays this model's, as in Keras)
            values.append(layer._call_symbolic(graph.read_by(layer, ins, values), record=False))
            layer.called_through = self.name
        return values[-1]

    # -- building: every layer's weights for an input shape -------------------------------------
    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        """Create every layer's weights for per-sample ``input_shape``, e.g. (32, 32, 3), or
        the batch's, (None, 32, 32, 3), as Keras' ``build`` takes it (and
        :attr:`input_shape` gives it); None (``build()``): the input shape the model has, as
        built or declared (an Input, ``input_shape=``), as Keras builds for its input; a model
        with neither is refused. A batch size in front, (32, 32, 32, 3), is refused where the
        model's input or first layer shows it is one; a Flatten first takes any rank, so there
        a shape of 4 axes or more given without None in front warns that its first size is
        taken as part of each sample."""
        self._require_layers()
        if input_shape is None:
            input_shape = self._input_shape if self.built else getattr(
                self, "_declared_input", None)
            if input_shape is None:
                raise InputError(f"model {self.name!r}.build() has no input shape to build "
                                 "for: none was declared (xpcnn.Input, input_shape=); pass "
                                 "the per-sample shape, model.build((32, 32, 3)), or the "
                                 "batch's, model.build((None, 32, 32, 3))")
            input_shape = (None, *input_shape)  # (the model's own: no batch size in front)
        # (only a shape without None in front may hold a batch size: xpcnn's own builds, the
        # first data's, a declared input's, a file's, put None there)
        batch_first = not (isinstance(input_shape, list | tuple) and input_shape
                           and input_shape[0] is None)
        shape = _sample_shape(per_sample(input_shape))
        known = self._input_shape if self.built else getattr(self, "_declared_input", None)
        if batch_first and known is not None and shape[1:] == tuple(known):
            raise _batch_size_given(self, shape, f"its input is {known}")  # (Keras' (32, H, W, C))
        graph.check_graph(self.layers, self._inbound())
        check_structure(self.layers)
        built_for = self._input_shape if self.built else None
        with self._unbuilt_if_refused():
            self._input_shape = shape
            try:
                self._build_layers()
            except BaseException as e:
                # (a layer refused the new shape, the layers before it built for it: a built
                # model is built again for its own, with the weights it kept)
                if built_for is not None:
                    self._input_shape = built_for
                    self._build_layers()
                if batch_first and isinstance(e, InputError) and len(shape) == 4 and \
                        not _builds_for(self.layers[0], shape) and \
                        _builds_for(self.layers[0], shape[1:]):
                    # (a Conv2D first, which said only that it takes (H, W, C); images only:
                    # a Dense first given (6, 6) is told to flatten them)
                    raise _batch_size_given(self, shape, str(e)) from None
                raise
        if shape != getattr(self, "_shape_checked", None):  # (once: add() builds again)
            self._shape_checked = shape
            checks.declared_shape(shape, self.name)  # (Input((3, 32, 32)), PyTorch's layout)
            if batch_first and len(shape) >= 4 and isinstance(self.layers[0], Flatten) and \
                    not checks.shape_warned():
                # (Keras' build((8, 5, 5, 1)) is a batch of 8: a Flatten first takes any rank,
                # and per-sample shapes of 4 axes are rare beside images' 3)
                warn(f"model {self.name!r}.build({tuple(input_shape)!r}) builds it for samples "
                     f"of shape {shape}, whose first layer, a Flatten, takes any rank: if "
                     f"{shape[0]} is a batch size (Keras' build takes the batch's shape), "
                     f"build a new model for {shape[1:]} or {(None, *shape[1:])}; pass "
                     f"{(None, *shape)} to say that each sample is {shape}", UserWarning)
        # (the optimiser's state stays, as in Keras: built layers keep their weights and
        # their shapes, and the next step's plan starts it afresh only where the layers it
        # trains changed, see _plan)


    def _require_layers(self) -> None:
        if not self.layers:
            raise InputError("the model has no layers: " + (
                "add() some before building it" if isinstance(self, Sequential) else
                "an xpcnn.Model is the graph of the layers called from xpcnn.Input to its "
                "outputs, Model(inputs, outputs) (a subclass passes them to super().__init__); "
                "or use Sequential and add() layers"))

    def _build_layers(self) -> None:
        with _building(self.layers, f"building model {self.name!r}"):
            graph.build(self.layers, self._inbound(), self._input_shape, self.backend,
                        self.dtype_name, self._compute_dtype_name, self.seed)
            self._built_like = {id(la): _built_like(la) for la in self.layers}
            _MODEL_BUILDS[0] += 1
            self._plan_cache, self._trained_at = None, None
            self._builds += 1
            # (its own, whatever a layer it shares with another model is built for since)
            self._output_shape: tuple[int, ...] = self.layers[-1].output_shape
            self.built = True
            self._make_symbolic()

    def _make_symbolic(self) -> None:
        """The symbolic graph of the model as built (``input``, ``output``, each layer's
        ``output``): kept where it is for this input shape and these layers; a traced model
        built back for the input it was traced from takes that graph again (the user's own
        tensors); else a new graph replaces it, its calls dropped from the layers'."""
        old = self._symbolic
        if old is not None and old.input.sample_shape == self._input_shape and \
                [n.layer for n in old.nodes] == self.layers:
            return
        traced = self._traced
        if traced is not None and traced.input.sample_shape == self._input_shape:
            self._use_symbolic(traced)
            return
        new = graph.symbolic(self.layers, self._inbound(), self._input_shape, self._input_name)
        new.input.model = self.name
        new.input.rebuilt = old is not None and old.input.sample_shape != self._input_shape
        self._use_symbolic(new)

    def _use_symbolic(self, new: graph.Symbolic | None) -> None:
        """Make ``new`` this model's symbolic graph, and its calls those of this model's
        layers, as Keras' model and layer outputs are one graph: the calls of the old one that
        this model recorded leave its layers' inbound nodes, and the new one's join those of
        the layers it holds in its own right (each such layer's ``output`` is then in this
        graph, where no other holds the layer). Not those of a model nested in it
        (``Sequential([base, head])``: base's layers keep their output in base's graph, as in
        Keras, where nested layers are reached through the nested model). A traced model
        holds the layers whose traced calls it claimed (:func:`_claim`: none for an extractor
        traced from another model's graph, which it leaves as it was): built for another
        input, it takes those calls out, and puts them back with its traced graph."""
        _forget(self._recorded)
        _put_back(self._taken)
        if new is not None and new is not self._traced:
            if self._traced is None:
                nested = {id(la) for la in getattr(self, "_nested", ())}
                held = {id(la) for la in self.layers} - nested
            else:
                held = {id(node.layer) for node in self._claimed}
                for node in self._claimed:
                    if node in node.layer.inbound_nodes:
                        node.layer.inbound_nodes.remove(node)
                        self._taken.add(node)
            for node in new.nodes:
                if id(node.layer) in held and node not in node.layer.inbound_nodes:
                    node.layer.inbound_nodes.append(node)
                    node.owner = weakref.ref(self)
                    self._recorded.add(node)
        self._symbolic = new

    def _rebuild_if_shared(self) -> None:
        """Build again where a layer shared with another model was built since for that
        model's inputs or precision, or where this model was compiled since in another
        precision (a layer keeps its weights): each model runs its layers as built for it.
        The optimiser's state stays, as the weights it follows do. The layers are looked at
        only where a layer was built or moved since they were last (``Layer.rebuilds``), or
        the precision changed: a training step asks each time. The rebuild holds the pass
        lock exclusive, decided again under it (another thread may have rebuilt them)."""
        if self._built_as_needed():
            return
        with PASSES.exclusive(f"rebuilding model {self.name!r}'s layers"):
            if not self._built_as_needed():
                self._build_layers()
                self._built_as_at = (Layer.rebuilds, self._compute_dtype_name)

    def _built_as_needed(self) -> bool:
        """Whether its layers are built as this model needs them (see
        :meth:`_rebuild_if_shared`): final under the pass lock, where no build runs."""
        at = (Layer.rebuilds, self._compute_dtype_name)  # (read first: a build meanwhile)
        if not self.built or at == self._built_as_at:
            return True
        if not graph.built_as(self.layers, self._inbound(), self._input_shape, self.backend,
                              self.dtype_name, self._compute_dtype_name):
            return False
        self._built_as_at = at
        return True

    def _pass_rebuilds(self) -> bool:
        """Whether a pass of this model rebuilds layers first: where it was compiled in
        another precision, or another model holding one of its layers built it otherwise
        (other inputs, precision: each of their passes rebuilds them). Such a pass holds the
        pass lock exclusive throughout (:meth:`_shared_pass`)."""
        if self._shared_at[0] != _MODEL_BUILDS[0]:  # (looked at again after any model build)
            self._shared_at = (_MODEL_BUILDS[0], self._built_otherwise())
        return self._shared_at[1] or not self._built_as_needed()

    def _built_otherwise(self) -> bool:
        """Whether another model holding one of its layers built it otherwise than this one."""
        for layer in self.layers:
            mine = self._built_like.get(id(layer))
            for other in holders_of(layer):
                theirs = (getattr(other, "_built_like", {}).get(id(layer)) if other is not self
                          else None)
                if theirs is not None and theirs != mine:
                    return True
        return False

    @contextlib.contextmanager
    def _shared_pass(self) -> Iterator[None]:
        """Around a pass (a training step, an inference batch): the pass lock shared (passes
        of any models run side by side, and no build of another thread changes the layers
        under it), or exclusive where the pass rebuilds layers (:meth:`_pass_rebuilds`), its
        layers then built as it needs them under it. Decided again under the lock: a build
        in another thread meanwhile may change the answer. Without it, another thread built
        or rebuilt shared layers under a pass: a bare error deep inside a kernel, or float16
        in a float32 model, silently."""
        with PASSES.shared:
            if not self._pass_rebuilds():
                yield
                return
        with PASSES.exclusive(f"a pass of model {self.name!r} (which rebuilds layers it shares "
                              "with a model that built them otherwise)"):
            self._rebuild_if_shared()
            yield

    @contextlib.contextmanager
    def _unbuilt_if_refused(self) -> Iterator[None]:
        """Around a call that may build the model from its data and then refuse the call (labels
        that do not fit, a callback's refusal): a model that was not built is left unbuilt, its
        layers too, so that refused data does not fix its input shape. (Nothing is lost: a
        build gives the same weights from the seed again.) A built model is left as it is."""
        if self.built:
            yield
            return
        # (one built alone by adapt() too: a refused build leaves it as it was)
        unbuilt = _attributes([la for la in self.layers if not la.built or la.provisional])
        symbolic = self._symbolic
        try:
            yield
        except BaseException:
            _restore(unbuilt)
            self.built, self._input_shape, self._plan_cache = False, None, None
            if self._symbolic is not symbolic:
                self._use_symbolic(symbolic)
            raise

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """The shape of the model's input batch, as Keras gives it: ``(None, 28, 28, 1)``, the
        batch axis None (``model.input.shape``); None before the model is built. A Sequential's
        ``input_shape=`` argument (and ``Input(shape)``) is per sample, as in Keras."""
        return None if self._input_shape is None else (None, *self._input_shape)

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        """The shape of the model's output batch, as Keras gives it: ``(None, 10)``."""
        self._require_built("output_shape")
        return (None, *self._output_shape)

    @property
    def num_classes(self) -> int:
        return int(self.output_shape[-1])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]
                             ) -> tuple[int | None, ...]:
        """The shape of the output batch for an input batch of ``input_shape``, its batch
        axis first (None, or a size that the output keeps), as Keras 3's:
        ``model.compute_output_shape((None, 4))`` is ``(None, 2)``. The model is neither built
        nor changed: a shape it is not built for is worked out on copies of its layers, built
        one at a time, so that it costs, for a moment, the weights of its largest layer built
        for that shape (a Conv2D's or BatchNorm2D's grow with the channels; not a Dense's,
        whose copy is built for one feature); a layer refusing it raises as a build would."""
        if not (isinstance(input_shape, list | tuple) and len(input_shape) > 1 and (
                input_shape[0] is None or isinstance(input_shape[0], int | np.integer)
                and not isinstance(input_shape[0], bool) and input_shape[0] > 0)):
            raise InputError(f"compute_output_shape takes the input batch's shape, its batch "
                             f"axis first (None for any size), such as (None, 32, 32, 3), got "
                             f"{input_shape!r}")
        if not self.layers:
            self._require_built("compute_output_shape")  # (names what to do: add layers)
        sample = _sample_shape(input_shape[1:])
        batch = None if input_shape[0] is None else int(input_shape[0])
        if self.built and sample == self._input_shape:
            return (batch, *self._output_shape)
        return (batch, *graph.trial_build(self.layers, self._inbound(), sample))

    def _keeps_weights_for(self, sample: tuple[int, ...]) -> bool:
        """Whether building for per-sample ``sample`` would keep every layer's weights (a model
        of convolutions and global pooling on images of another size), worked out on copies
        of the layers up to the first whose weights would change, which is not built (no
        weights drawn for large images): the model stays as it is."""
        try:
            return graph.trial_build(self.layers, self._inbound(), sample, keeping=True) \
                is not None
        except Exception:  # (a layer refusing the shape, a user's in its own way: no)
            return False

    # -- the executor: forward and backward through the graph's plan ----------------------------
    def _fused_softmax(self) -> bool:
        """True when the network ends in a softmax that is left to the loss (predict applies
        it to the logits): a final Softmax layer, which the plan leaves out, or a final layer's
        softmax activation (``Dense(activation="softmax")``), which the plan has it leave
        out. Not a user's subclass overriding forward or backward, which runs as written
        (and is refused in training: :func:`~xpcnn.structure.check_classifier`)."""
        return final_softmax(self.layers) is not None

    def _ends_in_a_softmax_layer(self) -> bool:
        """A final Softmax layer: the plan (and an ONNX export's nodes) end before it."""
        return final_softmax(self.layers) == "layer"

    def _plan(self) -> graph.Plan:
        """The compiled plan of the graph (see :mod:`xpcnn.graph`), compiled again when a
        layer with parameters is frozen or unfrozen (which layers need gradients changes, and
        so do the optimiser's parameters: its state starts afresh, as after a compile in
        Keras) or a layer's setting changed (:attr:`Layer.settings_changes`)."""
        key = self._trained()
        if self._plan_cache is None or self._planned_for != key or \
                self._planned_settings != Layer.settings_changes:
            # (the key outlives the plan, which a rebuild drops: a layer may have been frozen
            # through another model meanwhile)
            if self._slots_outdated() and self.optimizer is not None:
                self.optimizer.slots = {}
            # (a setting changed may change the plan: a ReLU given a ceiling is no longer
            # fused into the layer before it; and the structure: a Dense's activation set to
            # "softmax" before the last layer is refused as build refuses it)
            if self._planned_settings != Layer.settings_changes:
                check_structure(self.layers)
            self._planned_for, self._planned_settings = key, Layer.settings_changes
            self._plan_cache = graph.compile_plan(self.layers, self._inbound(),
                                                  self._ends_in_a_softmax_layer(),
                                                  self._fused_softmax(), key)
        return self._plan_cache

    def _slots_outdated(self) -> bool:
        """Whether the optimiser's slots are those of other layers than the next step trains
        (one with parameters was frozen or unfrozen since the last step): that step starts them
        afresh, and a checkpoint written before it holds none."""
        return self._planned_for not in (None, self._trained())

    def _slots_restored(self) -> None:
        """The optimiser's slots were just set for the layers trained now (from a checkpoint):
        the next step keeps them, even where the last step trained other layers, and a layer
        frozen or unfrozen later starts them afresh."""
        key = self._trained()
        if self._planned_for != key:
            self._planned_for, self._plan_cache = key, None

    @property
    def _param_dtype(self) -> Any:
        """The parameters' (master) dtype on this backend: losses and outputs are in it."""
        return self.backend.dtype(self.dtype_name)

    def _to_device(self, x: np.ndarray) -> Any:
        """One host -> device copy of a batch, then the cast on the device."""
        xb = self.backend.asarray(np.ascontiguousarray(x))
        return self.backend.xp.astype(xb, self._param_dtype)

    def _logits(self, x: Any, training: bool, in_scope: bool = False) -> Any:
        """Forward pass up to the logits, by the plan, of a device batch (cast to the
        parameters' dtype first, by the model or by the layers reading it), inside the
        backend's compute scope: the caller's with ``in_scope`` (a training step, an
        evaluation or prediction loop), else one entered here."""
        if not in_scope:
            with compute_scope(self.backend):
                return self._logits(x, training, in_scope=True)
        if not training:  # (a training step holds it across its forward, backward and update)
            with self._shared_pass():
                return self._logits_by_plan(x, training)
        return self._logits_by_plan(x, training)

    def _logits_by_plan(self, x: Any, training: bool) -> Any:
        plan = self._plan()
        if not plan.cast_input:
            x = self.backend.xp.astype(x, self._param_dtype, copy=False)
        cast = self._cast_weights()
        try:
            return graph.forward(plan, x, training)
        finally:
            for la in cast:
                la._cache_weights = None

    def _cast_weights(self) -> list[Layer]:
        """Under mixed precision, the weights of every layer that reads them in its compute
        dtype (:attr:`~xpcnn.layers.base.Layer.casts_weights`) cast in one call for a forward
        pass (one launch on CuPy, where each weight took one), into each one's
        ``_cache_weights``; returns those layers, whose casts the caller drops after the pass."""
        layers = [la for la in self.layers
                  if la.casts_weights and la.params and la.compute_dtype != la.dtype]
        if not layers:
            return layers
        casts = iter(kernels_for(self.backend).cast_all(
            [p for la in layers for p in la.params.values()], layers[0].compute_dtype))
        for la in layers:
            la._cache_weights = {k: next(casts) for k in la.params}
        return layers

    def _backward(self, dz: Any, on_layer: Callable[[Layer], None] | None = None) -> None:
        """Backward pass from the logits' gradient, after ``_logits(x, training=True)``: fills
        every trainable layer's ``grads``, calling ``on_layer(layer)`` after each layer's
        backward."""
        graph.backward(self._plan(), dz, on_layer)

    def _layer_outputs(self, x: Any, training: bool) -> list[Any]:
        """Every layer's own output (no plan: each does its own work)."""
        with self._shared_pass():
            return graph.each_output(self.layers, self._inbound(), x, training)

    def forward(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: PyTorch's call of a module, which an xpcnn model is not."""
        raise InputError("model.forward(x) is PyTorch's way to call a module; an xpcnn model "
                         "is called as model(x) (device arrays or symbolic tensors), or "
                         "predict(x) for host batches; layer_outputs(x) gives every layer's "
                         "output")

    def layer_outputs(self, x: Any, training: bool | None = False) -> list[Any]:
        """Every layer's output for a host batch, as device arrays (for inspection; the
        model's own output is ``model(x)`` or ``predict``). ``training=True`` shows training
        mode (Dropout's draws, BatchNorm2D's batch statistics) and leaves the model as it was
        (its moving statistics, its next draws); as a training call, it is refused while
        another thread trains the model, and no pass of another thread (a ``predict``) runs
        meanwhile (every model's passes wait for it): they would read the statistics it puts
        back after. ``training`` None (Keras' default), False or 0 is inference, True or 1
        training; anything else is refused."""
        self._require_built("layer_outputs")
        self._rebuild_if_shared()
        if not (training is None or isinstance(training, bool | np.bool_ | int | np.integer)
                and training in (0, 1)):
            raise InputError(f"layer_outputs' training must be True, False or None, got "
                             f"{training!r}")
        x = checks.as_images(x)
        checks.check_sample_shape(x, self._input_shape,  # type: ignore[arg-type]
                                 "x", self._keeps_weights_for)
        if not training:
            with compute_scope(self.backend):
                return self._layer_outputs(self._to_device(x), False)
        what = "layer_outputs(training=True)"
        if PASSES.in_pass():  # (its exclusive hold would wait for the pass it runs in)
            raise InputError(f"{what} was called inside a pass through layers (a layer's "
                             "forward): it moves the model's statistics and puts them back, "
                             "so it runs when no pass may read them; call it outside the pass "
                             "(a callback, after predict returns)")
        with self._running_alone(what, nested=True), PASSES.exclusive(what), \
                self._put_back(), compute_scope(self.backend):
            return self._layer_outputs(self._to_device(x), True)

    # -- configuration -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The architecture as JSON-ready data, enough with the weights to rebuild the model:
        its class, name, seed, dtype, input shape, and each layer's class and constructor
        arguments, with the tensors it reads (``inbound``, see :mod:`xpcnn.graph`) unless it
        reads the layer before it, and ``trainable: false`` if frozen (a user's layer: its
        class's ``module`` and ``qualname`` too, which tell two classes of one name apart);
        ``input_name``, where ``Input(name=...)`` gave the input another name than "input";
        ``trainable: false`` where the model's own flag is False (see :attr:`trainable`)."""
        layers = []
        for k, (la, ins) in enumerate(zip(self.layers, self._inbound(), strict=True)):
            # (a frozen layer's "trainable": false is the layer spec's, as files have held it:
            # said once, not also in its config, where a reader would find two to reconcile)
            layer_config = la.get_config()
            if isinstance(layer_config, dict) and "trainable" in layer_config:
                layer_config = {key: v for key, v in layer_config.items() if key != "trainable"}
            spec: dict[str, Any] = {"class": type(la).__name__, "config": layer_config}
            if ins != (k,):
                spec["inbound"] = list(ins)
            if not la.trainable:
                spec["trainable"] = False
            layers.append(spec)
        config: dict[str, Any] = {
            "class": type(self).__name__, "name": self.name, "seed": self.seed,
            "dtype": self.dtype_name, "input_shape": list(self._input_shape or []),
            "layers": layers}
        if self._input_name != "input":  # (files of models with the default stay as they were)
            config["input_name"] = self._input_name
        if not self._trainable:  # (the model's own flag: its layers' may be True, see trainable)
            config["trainable"] = False
        # (a user's layer's class by module and qualified name too, as files record it: else
        # from_config(get_config()) made blocks.Gate and heads.Gate both the last Gate defined)
        record_layer_classes(config, self.layers, checked=False)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: list[Layer] | None = None,
                    device: DeviceLike = "cpu") -> Model:
        """The model that :meth:`get_config` describes: Keras' way of copying an architecture
        (``xpcnn.Model.from_config(model.get_config())``: new layers, their weights new, built
        where the configuration has its input shape). A model file's reader gives ``layers``,
        made from the configuration's (:mod:`xpcnn.saving.model_file`), and builds it itself."""
        if layers is None:
            return _from_config(cls, config, device)
        model = cls(device=device, **_settings(config))
        model._input_name = checks.name(config.get("input_name", "input"), "input name")
        model._set_graph(layers, graph.inbound_of(config["layers"]))
        _own_flag(model, config)
        return model

    # -- inspection -----------------------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], None] | None = None, *,
                line_length: int | None = None, expand_nested: bool = False,
                show_trainable: bool = False, **keras: Any) -> None:
        """Print each layer's name, type, output shape and weight count (and, in a graph, the
        layers it reads; "frozen" after a layer that fit leaves as it is: one the model does
        not train, but not a BatchNorm2D whose own flag is True in a frozen model, which moves
        its statistics there, as in Keras), then the trainable and non-trainable counts, as
        Keras does; each line goes to ``print_fn`` (``print`` when None). Keras'
        ``line_length`` widens the table to that many characters (its columns stay as wide as
        their contents need); ``show_trainable=True`` adds Keras' "Trainable" column (Y or N,
        as the "frozen" mark says); ``expand_nested`` is taken as True or False: a nested
        model's layers are listed one by one either way, as Keras' ``expand_nested=True``
        lists them. Keras' ``positions`` and ``layer_range`` are refused unless None, naming
        what to do instead."""
        if print_fn is not None and not callable(print_fn):
            raise InputError(f"summary print_fn must be a function of one line, such as print, "
                             f"or None, got {print_fn!r}")
        for key, value in keras.items():
            instead = _KERAS_SUMMARY.get(key)
            if instead is None:
                raise InputError(f"summary({key}={value!r}): summary takes print_fn, "
                                 "line_length, expand_nested, show_trainable, and Keras' "
                                 f"{' and '.join(_KERAS_SUMMARY)} as None")
            if value is not None:
                raise InputError(f"summary({key}={value!r}): Keras' keyword, which xpcnn's "
                                 f"summary takes only as None: {instead}")
        if line_length is not None:
            line_length = checks.positive_int(line_length, "summary line_length")
        checks.flag(expand_nested, "summary expand_nested")
        show_trainable = checks.flag(show_trainable, "summary show_trainable")
        self._require_built("summary")
        self._rebuild_if_shared()
        print_fn = print if print_fn is None else print_fn
        inbound = self._inbound()
        names = [self._input_name, *(la.name for la in self.layers)]
        chain = all(ins == (k,) for k, ins in enumerate(inbound))
        heads = ("Layer (type)", "Output shape", "Params") + (() if chain else ("Inputs",)) \
            + (("Trainable",) if show_trainable else ())
        # (a BatchNorm2D unfrozen itself moves its statistics in a frozen model too, as in
        # Keras: not shown frozen, though its parameters count as non-trainable)
        trained = [self._trains(la) or la.trainable and la.moves_state for la in self.layers]
        rows = [(f"{la.name} ({type(la).__name__}){'' if t else ' frozen'}",
                 str((None, *la.output_shape)), f"{la.count_params():,}")
                + (() if chain else (", ".join(names[i] for i in ins),))
                + (("Y" if t else "N",) if show_trainable else ())
                for la, ins, t in zip(self.layers, inbound, trained, strict=True)]
        widths = [max(len(r[i]) for r in [heads, *rows]) + 2 for i in range(len(heads))]
        if line_length is not None and line_length > sum(widths):
            widths[0] += line_length - sum(widths)  # (the names' column takes the rest)
        line = "-" * sum(widths)
        fmt = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
        named = "" if self._input_name == "input" else f'"{self._input_name}" '
        print_fn(f'Model "{self.name}" on {self.backend.label}, input {named}{self.input_shape}')
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

    @property
    def input(self) -> SymbolicTensor:
        """The model's symbolic input, as in Keras: with a layer's ``output``, the ends of a
        model that shares this one's layers, a feature extractor::

            extractor = xpcnn.Model(model.input, model.get_layer("conv2d_1").output)
            features = extractor.predict(images)  # that layer's output

        A model built for another input shape (``model.build((None, H, W, C))``) has its
        input and its layers' outputs in a new graph of that shape, one graph as in Keras (a
        functional model built back for the input it was traced from has the tensors it was
        traced from again); an extractor made before keeps its own."""
        return self._built_symbolic("input").input

    @property
    def output(self) -> SymbolicTensor:
        """The model's symbolic output, as in Keras (see :attr:`input`)."""
        return self._built_symbolic("output").output

    @property
    def inputs(self) -> list[SymbolicTensor]:
        """``[input]``: Keras' list of the inputs (an xpcnn model has one)."""
        return [self.input]

    @property
    def outputs(self) -> list[SymbolicTensor]:
        """``[output]``: Keras' list of the outputs (an xpcnn model has one)."""
        return [self.output]

    def _built_symbolic(self, what: str) -> graph.Symbolic:
        if not self.built or self._symbolic is None:
            raise InputError(f"model {self.name!r} has no symbolic {what} before it is built: "
                             "call build(input_shape), give Sequential(..., input_shape=...), "
                             "or fit/predict on data first")
        return self._symbolic

    def get_layer(self, name: str | None = None, index: int | None = None) -> Layer:
        """A layer by its ``name`` or its ``index`` in :attr:`layers` (one of the two), as in
        Keras: ``model.get_layer("conv2d_1").get_weights()``."""
        if (name is None) == (index is None):
            raise InputError("get_layer takes a layer's name or its index, one of the two")
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int | np.integer) or not (
                    -len(self.layers) <= index < len(self.layers)):
                raise InputError(f"get_layer index must be an int in [{-len(self.layers)}, "
                                 f"{len(self.layers)}) (the model has {len(self.layers)} "
                                 f"layers), got {index!r}")
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise InputError(f"no layer named {name!r}; the model's layers are "
                         f"{', '.join(repr(la.name) for la in self.layers) or 'none'}")

    def count_params(self) -> int:
        """Every weight, trainable or not (BatchNorm's statistics, frozen layers'), as Keras;
        refused before the model is built (its weights do not exist yet), as in Keras."""
        self._require_built("count_params")
        return sum(la.count_params() for la in self.layers)

    @property
    def trainable(self) -> bool:
        """The model's own flag, as Keras': while it is False the model trains none of its
        layers, whatever their own flags (``model.trainable = False`` then
        ``model.layers[-1].trainable = True`` trains nothing, and ``trainable_weights`` is
        empty): no trainable weight is updated; a BatchNorm2D unfrozen itself still moves its
        statistics, as in Keras. Setting it sets every layer's flag too, and that of a model
        added whole to this one (a Sequential's base), as Keras does: True unfreezes them
        all, and ``base.trainable = False`` on a model used inside another fine-tunes the
        rest. Inside that other model, only its own flag and the layers' count: a layer of
        the frozen base unfrozen since trains there, as in Keras. A frozen model (or one
        made with ``trainable=False``) freezes the layers added to it later (add(), a change
        of ``layers``). A model whose layers are all frozen one by one reads True, as in
        Keras, and trains none of them."""
        return self._trainable

    def _frozen(self) -> bool:
        """Whether a layer added now is frozen (see :attr:`trainable`)."""
        return not self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        value = checks.flag(value, "trainable")
        for la in self.layers:
            la.trainable = value
        # (a model held whole takes it too, added to a Sequential or called in a functional
        # model, as Keras' setter sets a nested model's: else outer.trainable = True left
        # base.trainable False, and base.fit trained nothing; one at any depth is found here,
        # its layers set above, so only its own flag: Sequential([base]) and base each hold
        # the other's layers)
        held = {id(m): m for la in self.layers for m in holders_of(la)}
        for model in {**held, id(self): self}.values():
            if model is self or _held_at(self.layers, model.layers) is not None:
                model._trainable = value
                # (listed again: no layer's flag may have changed, yet the layers trained have)
                model._trained_at = None

    def _trains(self, layer: Layer) -> bool:
        """Whether this model trains ``layer`` (its parameters, where it has some): the
        layer's own flag and the model's, which masks every layer's (see :attr:`trainable`);
        :attr:`trainable_layers`, and through it the optimiser, checkpoints' slots and
        ``trainable_weights``, and summary ask it."""
        return self._trainable and layer.trainable

    @property
    def trainable_layers(self) -> list[Layer]:
        """The layers the optimiser updates, in weight order: those with parameters not
        frozen (``layer.trainable = False``); none while the model's own flag is False (see
        :attr:`trainable`)."""
        return [la for la in self.layers if la.params and self._trains(la)]

    def _trained(self) -> tuple[Layer, ...]:
        """:attr:`trainable_layers`, listed again only after a layer was built, moved, frozen
        or unfrozen since (``Layer.rebuilds``), or this model built: a training step asks
        several times."""
        if self._trained_at != Layer.rebuilds:
            self._trained_list = tuple(self.trainable_layers)
            self._trained_at = Layer.rebuilds
        return self._trained_list

    # -- weights, devices and files -------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        """All layers' weights, in order, as host arrays in Keras layouts (as this model runs
        them: layers shared with another model are built for this one first, as for predict)."""
        self._require_built("get_weights")
        self._rebuild_if_shared()
        return [w for la in self.layers for w in la.get_weights()]

    @property
    def weights(self) -> list[Weight]:
        """Every layer's weights as :class:`~xpcnn.layers.weight.Weight` handles (``name``,
        ``shape``, ``dtype``, ``trainable``, ``numpy()``, ``assign(value)``), in
        :meth:`get_weights`' order; none before the model is built, as in Keras."""
        if not self.built:
            return []
        self._rebuild_if_shared()  # (as get_weights: the layers as this model runs them)
        return [w for la in self.layers for w in la.weights]

    @property
    def trainable_weights(self) -> list[Weight]:
        """The weights the optimiser updates: the parameters of :attr:`trainable_layers`; none
        while the model's own flag is False (see :attr:`trainable`), as in Keras."""
        return [w for w, trained in self._weights_trained() if trained]

    @property
    def non_trainable_weights(self) -> list[Weight]:
        """The other weights: frozen layers' parameters, and state (BatchNorm's moving
        statistics); every weight while the model's own flag is False, as in Keras."""
        return [w for w, trained in self._weights_trained() if not trained]

    def _weights_trained(self) -> list[tuple[Weight, bool]]:
        """Each of :attr:`weights` with whether the optimiser updates it (a parameter of one
        of :attr:`trainable_layers`)."""
        weights = self.weights  # (first: the layers as this model runs them)
        trained = {id(la) for la in self.trainable_layers}
        return [(w, id(w.layer) in trained and w.name in w.layer.params) for w in weights]

    def set_weights(self, weights: list[Any]) -> None:
        """Replace all weights; the list must match :meth:`get_weights` in length and shapes."""
        self._require_built("set_weights")
        if not isinstance(weights, list | tuple):
            raise InputError(f"set_weights expects a list of arrays (as get_weights returns), got "
                             f"{type(weights).__name__}{not_a_weight_list(weights)}")
        names = [la.present_weight_names() for la in self.layers]
        every = [n for ns in names for n in ns]
        kept = without_num_batches_tracked(every, weights)  # (PyTorch state_dict values)
        if len(kept) != len(every):
            raise InputError(f"set_weights expects {len(every)} arrays (as get_weights returns), "
                             f"got {len(weights)}{weight_count_hint(every, weights, kept)}")
        # every layer's checked before any is replaced: a refused call changes no weight
        starts = np.cumsum([0, *map(len, names)]).tolist()
        checked = [la.checked_weights([weights[i] for i in kept[a:b]])
                   for la, a, b in zip(self.layers, starts[:-1], starts[1:], strict=True)]
        for k, (la, a) in enumerate(zip(self.layers, starts[:-1], strict=True)):
            if isinstance(la, Dense) and array_api_compat.is_torch_array(
                    weights[kept[a]]):  # (its kernel)
                _warn_if_after_flatten(self, k)
        for la, pairs in zip(self.layers, checked, strict=True):
            la.assign_weights(pairs)

    def save_weights(self, path: str | os.PathLike[str], overwrite: bool = True,
                     max_shard_size: Any = None) -> None:
        """Write the weights alone to ``path`` (an .npz, as :meth:`save` writes, without the
        optimiser and compile settings), as this model runs them: :meth:`load_weights` reads
        them back, checking the architecture the file also holds (and
        :func:`~xpcnn.saving.load_model` rebuilds the model from it, uncompiled). A name
        ending in Keras' ``.keras``, ``.h5`` or ``.hdf5``, or PyTorch's ``.pt`` or ``.pth``, is
        refused (they would not read the file). Keras' ``overwrite=True`` and
        ``max_shard_size=None`` are taken (a file at ``path`` is replaced, atomically; one
        file); other values are refused."""
        check_save_keywords("save_weights", path, overwrite, max_shard_size=max_shard_size)
        self._rebuild_if_shared()
        save_model(self, path, weights_only=True)

    def load_weights(self, path: str | os.PathLike[str], skip_mismatch: bool = False) -> None:
        """Load the weights of a weights file, model file or checkpoint written for this same
        architecture (``DataFormatError`` names the first difference otherwise); an unbuilt
        model is built for the file's input shape. Keras' ``skip_mismatch=False`` is taken;
        True is refused, naming how to copy the layers that match."""
        check_skip_mismatch(skip_mismatch)
        with self._unbuilt_if_refused():
            load_weights(self, path)

    def to(self, device: DeviceLike) -> Model:
        """Move the model (weights, optimiser state) to another device; returns self. Not
        while its fit runs (from a callback, or another thread): fit's batches are on the
        device it started on."""
        # (under no pass of another thread: its layers' arrays move)
        with self._running_alone("to()"), PASSES.exclusive(f"moving model {self.name!r} (to())"):
            backend = get_backend(distributed.device_for_rank(device))
            if PRECISIONS.get(self.precision) is not None:
                # (refused before anything moves, naming the precision as the cause)
                precision_dtype(backend, self.precision, "compile it with precision='float32' "
                                f"before to({backend.name})")
            # A move that fails partway (out of device memory) leaves the model whole where it
            # was.
            layers = _attributes(self.layers)
            try:
                for la in self.layers:
                    if la.built:
                        la.to(backend)
                self._move_training_state(backend)  # (last: it changes nothing where it fails)
            except BaseException:
                _restore(layers)
                raise
            self.backend = backend
        return self

    def save(self, path: str | os.PathLike[str], overwrite: bool = True,
             zipped: bool | None = None) -> None:
        """Write architecture and weights to ``path`` (an .npz that loads without pickle), the
        weights as this model runs them (see :meth:`get_weights`). A name ending in Keras'
        ``.keras``, ``.h5`` or ``.hdf5``, or PyTorch's ``.pt`` or ``.pth``, is refused (they
        would not read the file). Keras'
        ``overwrite=True`` and ``zipped=None`` (or True) are taken (a file at ``path`` is
        replaced, atomically; the .npz is a zip archive); other values are refused."""
        check_save_keywords("save", path, overwrite, zipped)
        self._rebuild_if_shared()
        save_model(self, path)

    def export(self, path: str | os.PathLike[str], input_dtype: str = "float32", *,
               format: str = "onnx", verbose: bool | None = None,
               input_signature: Any = None, **kwargs: Any) -> None:
        """Write the model as ONNX to ``path``: (N, H, W, C) images of ``input_dtype``
        ("float32" or "uint8") in, what ``predict`` returns out (probabilities after a final
        Softmax or softmax activation, else the logits or features; :mod:`xpcnn.onnx_export`;
        needs ``pip install "xpcnn[onnx]"``). Keras' ``format="onnx"`` (its second positional
        argument too) and ``verbose`` (True: says where it wrote) are taken; its other formats,
        an ``input_signature`` and an opset are refused, naming what xpcnn writes."""
        from .onnx_export import OPSET, export_model

        if input_dtype == "onnx":  # (Keras' order: export(path, "onnx"))
            input_dtype = "float32"
        _check_export_keywords(format, input_signature, kwargs, OPSET)
        self._require_built("export")
        if self._fused_softmax():  # (predict refuses such a model: the file would not)
            check_classifier(self.layers, [la.output_shape for la in self.layers])

        def write() -> None:
            self._rebuild_if_shared()
            check_structure(self.layers)  # (a setting changed since the build, as a save)
            export_model(self, path, input_dtype)

        # one writer on several ranks (all hold the same model); the others calling wait for it
        distributed.write_on_root(write, str(path))
        if verbose and distributed.is_root():
            print(f"Saved ONNX model at '{os.fspath(path)}'.")

    def __reduce_ex__(self, protocol: Any) -> Any:
        # (copy.copy, copy.deepcopy and pickle all come here: a model holds its device's array
        # library and kernels, which cannot be copied)
        raise InputError("a model cannot be copied or pickled (it holds its device's array "
                         "library and kernels): keep its weights with get_weights() "
                         "(set_weights() puts them back); for a second model, "
                         "type(model).from_config(model.get_config()) then "
                         "set_weights(model.get_weights()), or save(path) and load_model(path) "
                         "(with its compile settings)")

    def _require_built(self, what: str) -> None:
        if self.built:
            return
        if not self.layers:  # (build refuses it too: a model of no layers is never built)
            declared = getattr(self, "_declared_input", None)
            raise InputError(f"model {self.name!r} has no layers yet: add() some before {what}"
                             + ("" if declared is None else f" (its input, of shape {declared}, "
                                "is declared: it is built as the first layer is added)"))
        raise InputError(f"the model must be built before {what}: call build(input_shape) "
                         "or fit/predict on data first")


class _ForeignName:
    """A name of PyTorch's ``nn.Module`` on a model's class (``model.train()``): reading it
    from a model raises a :class:`ForeignNameError` naming xpcnn's counterpart (hasattr is
    False). Not a ``__getattr__``: a class with one reads every attribute slower, and a
    property's own AttributeError ran it twice. A non-data descriptor, so an instance's
    attribute or a subclass's method of that name wins."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None:  # (the class's: inspection sees the descriptor)
            return self
        call = "" if self.name == "training" else "()"
        raise ForeignNameError(f"{type(model).__name__} has no {self.name}{call}, PyTorch's "
                               f"nn.Module {'attribute' if not call else 'method'}: "
                               f"{TORCH_MODULE_NAMES[self.name]}")


for _name in TORCH_MODULE_NAMES:
    setattr(Model, _name, _ForeignName(_name))
del _name


@register_model
class Sequential(Model):
    """A linear stack of layers trained by backpropagation (see :class:`Model` for the rest).

    ``layers``: the layers in order (a built model among them adds its layers, shared);
    ``input_shape`` (per sample, e.g. (32, 32, 3)), or an :func:`xpcnn.Input` first, declares
    the input: the model is built for it at once, or as its first layer is added; otherwise at
    its first batch or ``build``. ``trainable=False`` freezes the layers, and those added
    later."""

    _default_name = "sequential"

    def __init__(self, layers: list[Layer] | None = None, *, input_shape: tuple[int, ...] | None
                 = None, device: DeviceLike = "cpu", seed: int = 0, dtype: str = "float32",
                 name: str | None = "sequential", trainable: bool = True) -> None:
        super().__init__(device=device, seed=seed, dtype=dtype, name=name)
        trainable = checks.flag(trainable, "trainable")  # (Keras' Sequential(..., trainable=))
        # (the input an Input or a built base declared, as Keras builds for it: add() builds
        # the model for it as layers follow)
        self._declared_input: tuple[int, ...] | None = None
        # (the layers it holds through a model added to it, whose graph keeps their calls)
        self._nested: list[Layer] = []
        # (the models added, whose layers it holds: an unbuilt one is built as it builds)
        self._bases: list[Model] = []
        if layers is not None and not isinstance(layers, list | tuple):
            raise InputError(f"layers must be a list of xpcnn layers, got {type(layers).__name__}")
        if layers and isinstance(layers[0], SymbolicTensor) and layers[0].node is None:
            # Keras 3's Sequential([keras.Input(shape), ...]): the input's shape and name
            given, layers = layers[0], layers[1:]
            if input_shape is not None and tuple(input_shape) != given.sample_shape:
                raise InputError(f"Sequential was given Input(shape={given.sample_shape}) and "
                                 f"input_shape={tuple(input_shape)}: give one of them")
            input_shape, self._input_name = given.sample_shape, given.name
        with _names_back_if_refused(list(layers or [])):
            for layer in layers or []:
                self._add(layer)
            input_shape = input_shape if input_shape is not None else self._declared_input
            if input_shape is not None and self.layers:
                self.build((None, *_sample_shape(input_shape)))  # (per sample, as Keras')
            elif input_shape is not None:  # (no layers yet: declared, as add(Input) does)
                self._declared_input = _sample_shape(input_shape)
        if not trainable:  # (the layers given, and those added later: see trainable)
            self.trainable = False

    # -- construction ------------------------------------------------------------------------
    def add(self, layer: Layer | Model | SymbolicTensor) -> None:
        """Append a layer. A model whose layers are a chain (a Sequential, say a pretrained
        base) appends its layers, shared with it, as Keras' ``Sequential([base, head])`` nests
        it: training either trains both, and ``base.trainable = False`` freezes them. As in
        Keras, ``xpcnn.Input(shape)`` added first (or a built base) declares the input: the
        model is built for it as layers follow; a built model is built again at once for its
        input (its layers keep their weights), as Keras' add() rebuilds it. A layer that cannot
        be built there is refused, the model left as it was."""
        given = layer.layers if isinstance(layer, Model) else [layer]
        with _names_back_if_refused([*self.layers, *given]):
            self._add_built(layer)

    def _add_built(self, layer: Layer | Model | SymbolicTensor) -> None:
        """add(): the layer appended, the model built where it was or has its input."""
        held = len(self.layers)
        if isinstance(layer, SymbolicTensor) and not self.layers and layer.node is None:
            if self._declared_input is not None:  # (Keras refuses it too)
                raise InputError(
                    f"model {self.name!r} already has its input, of shape "
                    f"{self._declared_input}: it takes one xpcnn.Input (a Sequential made "
                    "anew takes another)")
            self._declared_input = _sample_shape(layer.sample_shape)
            self._input_name = layer.name
            return
        declared, built, frozen = self._declared_input, self.built, self._frozen()
        shape = self._input_shape if built else declared
        try:
            self._add(layer)
        except BaseException:  # (a base's layer refused: the list is as it was, so is the build)
            self.built, self._declared_input = built, declared
            raise
        if shape is None and self._declared_input is not None:  # (a built base's input)
            shape = self._declared_input
        if shape is not None:
            try:
                self.build((None, *shape))
            except BaseException:  # (refused as a whole: the model as it was)
                list.__delitem__(self.layers, slice(held, None))
                self.built, self._declared_input = False, declared
                if held:
                    self.build((None, *shape))
                raise
        if frozen:  # (a frozen model's new layers are frozen: see trainable)
            for la in self.layers[held:]:
                la.trainable = False

    def _add(self, layer: Layer | Model) -> None:
        if isinstance(layer, Model):
            self._add_layers_of(layer)
            return
        if isinstance(layer, SymbolicTensor):
            raise InputError("add() expects an xpcnn layer, got a symbolic tensor: an "
                             "xpcnn.Input(shape) is added first, or given as "
                             "Sequential([xpcnn.Input(shape), ...]), Sequential(..., "
                             "input_shape=shape), or model.build(shape)")
        if not isinstance(layer, Layer):
            raise InputError(f"add() expects an xpcnn layer, got {type(layer).__name__}")
        if any(layer is la for la in self.layers):
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) is already in the "
                             "model: the same layer instance cannot be added twice; create "
                             f"another {type(layer).__name__}(...)")
        _name_apart([*self.layers, layer], self)  # (as a functional Model names its layers)
        list.append(self.layers, layer)  # (built by add(), or the constructor, after)
        self.built = False

    def _add_layers_of(self, model: Model) -> None:
        if model is self:
            raise InputError(f"model {self.name!r} cannot be added to itself")
        if any(ins != (k,) for k, ins in enumerate(model._inbound())):
            raise InputError(f"model {model.name!r}'s layers branch (a layer reads another than "
                             "the one before it): a Sequential holds a chain; call the model on "
                             "a symbolic tensor in a functional model instead, x = "
                             f"{model.name}(xpcnn.Input(shape)), then xpcnn.Model(inputs, "
                             "outputs)")
        if not model.layers:
            raise InputError(f"model {model.name!r} has no layers to add")
        held = len(self.layers)
        with _names_back_if_refused(list(model.layers)):
            try:
                for inner in list(model.layers):
                    self._add(inner)
            except BaseException:
                list.__delitem__(self.layers, slice(held, None))
                raise
        if not held and model.built and self._declared_input is None:
            self._declared_input = model._input_shape  # (Keras: built for the base's input)
        for inner in model.layers:
            inner.called_through = model.name
        self._nested.extend(model.layers)
        self._bases.append(model)

    def pop(self) -> Layer:
        """Remove the last layer and return it, as Keras' ``Sequential.pop``: a built model is
        built again at once (its other layers keep their weights)."""
        if not self.layers:
            raise InputError(f"pop() on model {self.name!r}, which has no layers")
        return self.layers.pop()  # (built again at once: _layers_changed)

    def _changing_layers(self) -> None:
        pass  # (a chain: any list of layers is one)

    def _build_layers(self) -> None:
        """Build the layers; an unbuilt model added to this one is built first, for the shape
        that reaches it and from its own seed, as Keras builds it when it is called (its
        ``input`` and its layers' ``output`` then serve ``Model(base.input, layer.output)``).
        A base built so is unbuilt again where this build is refused."""
        built: list[tuple[Model, Any, list[tuple[Layer, dict[str, Any]]]]] = []
        try:
            for base in self._bases:
                at = None if base.built else _held_at(self.layers, base.layers)
                if at is None:
                    continue  # (built, or no longer held whole, in order: pop() or a change)
                if at:  # (the layers before it, as this build builds them: the same weights)
                    with _building(self.layers[:at], f"building model {self.name!r}"):
                        graph.build(self.layers[:at], self._inbound()[:at], self._input_shape,
                                    self.backend, self.dtype_name, self._compute_dtype_name,
                                    self.seed)
                shape = self.layers[at - 1].output_shape if at else self._input_shape
                built.append((base, base._symbolic, _attributes(list(base.layers))))
                base.build((None, *shape))
            super()._build_layers()
        except BaseException:
            for base, symbolic, attributes in reversed(built):
                _restore(attributes)
                base.built, base._input_shape, base._plan_cache = False, None, None
                base._use_symbolic(symbolic)
            raise

    def _layers_changed(self) -> None:
        # (built again at once where it was built, as pop() and Keras' Sequential: its input,
        # weights and summary are the new chain's; or for the input declared, as add() builds)
        shape = self._input_shape if self.built else self._declared_input
        self.built = False
        _name_apart(list(self.layers), self)  # (as add() names them)
        if shape is not None and self.layers:
            # (the optimiser's state kept: the next step's plan starts it afresh only where the
            # trained layers changed, as after a freeze)
            self.build((None, *shape))
        elif shape is not None:  # (emptied: its input kept, as Keras keeps its InputLayer, and
            self._declared_input = shape  # the next add() builds for it)

    def _inbound(self) -> list[graph.Inbound]:
        """A chain: each layer reads the one before it."""
        return [(k,) for k in range(len(self.layers))]

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: list[Layer] | None = None,
                    device: DeviceLike = "cpu") -> Sequential:
        if layers is None:
            specs = config.get("layers") if isinstance(config, dict) else None
            if isinstance(specs, list) and any(
                    isinstance(spec, dict) and "inbound" in spec for spec in specs):
                raise InputError(f"{cls.__name__}.from_config: the configuration is of a model "
                                 "whose layers branch (a layer reads another than the one "
                                 "before it): xpcnn.Model.from_config copies it")
            return _from_config(cls, config, device)
        model = cls(layers, device=device, **_settings(config))
        model._input_name = checks.name(config.get("input_name", "input"), "input name")
        _own_flag(model, config)
        return model


#: Keras 3's summary keywords that xpcnn's summary takes only as None: what to do instead
_KERAS_SUMMARY = {
    "positions": "its columns are as wide as their contents need; line_length= widens the "
                 "table",
    "layer_range": "the summary lists every layer; model.get_layer(name) gives one, with its "
                   "output_shape and count_params()",
}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor's arguments a model's configuration gives: one left out takes the
    constructor's default, as in Keras (a hand-written configuration; the layers it needs)."""
    return {key: config[key] for key in ("seed", "dtype", "name") if config.get(key) is not None}


def _own_flag(model: Model, config: dict[str, Any]) -> None:
    """The model's own ``trainable`` flag from its configuration (written only where False),
    its layers' flags left as the configuration gives them (see :attr:`Model.trainable`)."""
    model._trainable = checks.flag(config.get("trainable", True), "the model's trainable")
    model._trained_at = None


def _from_config(cls: type[Model], config: Any, device: DeviceLike) -> Any:
    """``cls.from_config(config)`` without layers: they are made from the configuration's,
    checked as a file's are (an error names "the configuration"), and the model is built for
    its input shape where it has one."""
    if not isinstance(config, dict):
        raise InputError(f"{cls.__name__}.from_config takes the dict a model's get_config() "
                         f"returns, got {type(config).__name__}")
    where = f"{cls.__name__}.from_config"
    shape = config.get("input_shape")  # ([] where the model was not built: built at its use)
    try:
        layers, input_shape = layers_from_config(
            {**config, "format": FORMAT, "version": VERSION, "input_shape": shape or [1]}, where)
    except DataFormatError as e:
        raise InputError(str(e).replace(f"{where}: ", f"{where}: the configuration: ", 1)
                         ) from None
    for layer in layers:  # (names as the configuration gives them: the user's, as in Keras)
        layer.name_given = True
    with checks.warned_shape():  # (a channels-first shape was warned of when declared)
        model = cls.from_config(config, layers, device)
        if shape:
            model.build((None, *input_shape))
    return model


class LayerList(list):  # type: ignore[type-arg]
    """A model's ``layers``: a list whose change (Keras 2's ``model.layers.pop()``, say) makes
    a built Sequential build again at once (it ran on with the layers it was built with, and
    saved the others), and is refused for a functional model."""

    def __init__(self, model: Model, layers: Any = ()) -> None:
        super().__init__(layers)
        self._model = weakref.ref(model)

    def __reduce_ex__(self, protocol: Any) -> Any:  # (copied or pickled: a plain list)
        return list, (list(self),)


def _changes(name: str) -> Callable[..., Any]:
    change = getattr(list, name)

    def changed(self: LayerList, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            return change(self, *args, **kwargs)
        model._changing_layers()
        # (made on a copy, then given to the layers setter: checked first, and refused as a
        # whole, the model as it was, where a layer is not one or cannot be built there)
        changed_list = list(self)
        result = change(changed_list, *args, **kwargs)
        if [id(la) for la in changed_list] != [id(la) for la in self]:
            model.layers = changed_list
        return self if name.startswith("__i") else result
    changed.__name__ = name
    return changed


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(LayerList, _name, _changes(_name))


def _warn_if_after_flatten(model: Model, k: int) -> None:
    """Warn where Dense ``model.layers[k]``, given a torch tensor as its kernel, reads a
    Flatten of a map with several positions and channels (through layers that keep each
    feature in its place: Dropout, ReLU, BatchNorm2D): PyTorch's nn.Flatten orders the
    features (C, H, W), xpcnn's (H, W, C), so a Linear's weight.T computes another function,
    with shapes that fit (a NumPy array given is taken as converted)."""
    dense, inbound, j = model.layers[k], model._inbound(), k
    while len(inbound[j]) == 1 and inbound[j][0] > 0:
        j = inbound[j][0] - 1
        source = model.layers[j]
        if isinstance(source, Flatten):
            break
        if isinstance(source, Dense) or source.output_shape != source.input_shape:
            return
    else:
        return
    if len(source.input_shape) != 3:
        return
    h, w, c = source.input_shape
    if h * w == 1 or c == 1:  # (one order then)
        return
    out = dense.output_shape[0]
    warn(f"layer {dense.name!r} weight 'kernel': a torch tensor for a Dense reading Flatten "
         f"{source.name!r} of a ({h}, {w}, {c}) map, whose features PyTorch's nn.Flatten orders "
         f"(C, H, W) and xpcnn's (H, W, C): a PyTorch Linear's weight needs its columns "
         f"reordered, weight.reshape({out}, {c}, {h}, {w}).permute(2, 3, 1, 0).reshape(-1, "
         f"{out}) in place of weight.T; pass a NumPy array (taken as converted, the reordered "
         "weight's .numpy()) to silence it", UserWarning)


def _sample_shape(input_shape: Any) -> tuple[int, ...]:
    """A per-sample input shape, checked: positive sizes, as ints."""
    ok = isinstance(input_shape, tuple | list) and all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) for d in input_shape)
    shape = tuple(int(d) for d in input_shape) if ok else ()
    if not shape or any(d < 1 for d in shape):
        raise InputError(f"input_shape must be positive sizes such as (H, W, C), got "
                         f"{input_shape!r}")
    return shape


def _batch_size_given(model: Model, input_shape: Any, why: str) -> InputError:
    """Model.build given one axis too many: Keras' build((32, H, W, C)), a batch of 32."""
    return InputError(f"model {model.name!r}.build({tuple(input_shape)!r}): one axis more than "
                      f"the model's input takes ({why}): build takes the per-sample shape, "
                      f"{tuple(input_shape[1:])!r}, or the batch's with None for its size, "
                      f"{(None, *input_shape[1:])!r}, not a batch size")


def _builds_for(layer: Layer, shape: tuple[int, ...]) -> bool:
    """Whether an unbuilt copy of ``layer`` builds for per-sample ``shape``."""
    try:
        layer.unbuilt_copy().build(shape, "cpu")
    except Exception:  # (a user's layer may refuse it otherwise: then no hint)
        return False
    return True


@contextlib.contextmanager
def _names_back_if_refused(layers: list[Layer]) -> Iterator[None]:
    """Around a model's construction: where it is refused, the layers get back the names it
    gave them (a built layer renamed for it is another model's, whose get_layer would fail)."""
    names = [(layer, layer.name) for layer in layers if isinstance(layer, Layer)]
    try:
        yield
    except BaseException:
        for layer, name in names:
            layer._name = name
        raise


#: the count of model builds, each of which records what its layers are built as
#: (``_built_like``), so may change whose passes rebuild (see _pass_rebuilds). Not
#: Layer.rebuilds, which counts changes of layers: a model built over layers already built as
#: it needs (a second model of a trained model's layers) changes none, yet holds them now.
_MODEL_BUILDS = [0]

#: (the lock of first builds: layers none has built, which no pass runs through)
_FIRST_BUILDS = threading.RLock()


def _building(layers: list[Layer], what: str) -> Any:
    """The lock a build of ``layers`` holds (:func:`~xpcnn.passes.exclusive_if`): the passes'
    exclusive where one of them is built; a lock of first builds alone where none is (a user
    layer's model made at its first call inside a pass included)."""
    return exclusive_if(any(la.built for la in layers), what, _FIRST_BUILDS)


def _built_like(layer: Layer) -> tuple[Any, ...]:
    """What a layer is built as: its inputs, device and dtypes (see
    :meth:`Model._pass_rebuilds`)."""
    return (layer.input_shape, id(layer.backend.xp), str(layer.backend.device), str(layer.dtype),
            str(layer.compute_dtype))


def _forget(nodes: weakref.WeakSet[graph.Node]) -> None:
    """Take ``nodes`` (the calls a model recorded) out of their layers' inbound nodes."""
    for node in list(nodes):
        if node in node.layer.inbound_nodes:
            node.layer.inbound_nodes.remove(node)
    nodes.clear()


def _check_export_keywords(format: Any, input_signature: Any, kwargs: dict[str, Any],
                           opset: int) -> None:
    """Refuse Keras' and PyTorch's export arguments that ask for what xpcnn's does not write
    (was: Python's "unexpected keyword argument", or format="onnx" read as the input dtype)."""
    if format != "onnx":
        raise InputError(f"export(format={format!r}): xpcnn's export writes ONNX only; "
                         "leave format out (or give format='onnx')")
    if input_signature is not None:
        raise InputError("export(input_signature=...): Keras' keyword, which xpcnn's export "
                         "does not take: the file takes (N, H, W, C) images of the model's "
                         "input shape, any N, of the dtype input_dtype= says")
    for key in ("opset", "opset_version", "target_opset"):
        if key in kwargs and kwargs.pop(key) != opset:  # (its own opset: taken)
            raise InputError(f"export({key}=...): xpcnn's export writes ONNX opset {opset}; "
                             f"leave {key} out")
    if kwargs:
        raise InputError(f"export() got an unexpected keyword argument {next(iter(kwargs))!r} "
                         "(it takes path, input_dtype, and Keras' format and verbose)")


def _put_back(nodes: weakref.WeakSet[graph.Node]) -> None:
    """Put ``nodes`` (a traced model's calls, taken out while it was built for another input)
    back in their layers' inbound nodes."""
    for node in list(nodes):
        if node not in node.layer.inbound_nodes:
            node.layer.inbound_nodes.append(node)
    nodes.clear()


def _forget_when_gone(model: Model, recorded: weakref.WeakSet[graph.Node],
                      taken: weakref.WeakSet[graph.Node]) -> None:
    """A model collected takes its recorded calls with it, and gives back the traced calls it
    took out (the finalizer holds the sets, not the model): its layers' ``output`` is no
    longer a dead model's tensor, nor ambiguous, and an extractor of its traced graph finds
    its layers' calls there again."""
    weakref.finalize(model, _forget_and_put_back, recorded, taken).atexit = False


def _forget_and_put_back(recorded: weakref.WeakSet[graph.Node],
                         taken: weakref.WeakSet[graph.Node]) -> None:
    _forget(recorded)
    _put_back(taken)


def _claim(nodes: tuple[graph.Node, ...], model: Model) -> list[graph.Node]:
    """The calls of ``model``'s traced graph that it holds (moves with its builds, see
    ``Model._use_symbolic``): those in their layers' inbound nodes (not a nested model's)
    that no live model holds yet. An extractor traced from another model's graph holds none
    of them, so building it for other inputs leaves that graph as it was."""
    claimed = []
    for node in nodes:
        held = node.owner is not None and node.owner() is not None
        if not held and node in node.layer.inbound_nodes:
            node.owner = weakref.ref(model)
            claimed.append(node)
    return claimed


def _held_at(layers: list[Layer], run: list[Layer]) -> int | None:
    """Where ``run`` (a base's layers) stands in ``layers`` whole and in order, or None."""
    for k in range(len(layers) - len(run) + 1):
        if run and all(a is b for a, b in zip(layers[k:k + len(run)], run, strict=True)):
            return k
    return None


def _attributes(layers: list[Layer]) -> list[tuple[Layer, dict[str, Any]]]:
    """Each layer's attributes, its dicts (of weights, gradients) copied: :func:`_restore`
    puts them back after a call that rebinds (never writes into) them has failed."""
    return [(la, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(la).items()})
            for la in layers]


def _restore(attributes: list[tuple[Layer, dict[str, Any]]]) -> None:
    Layer.rebuilds += 1  # (a restored layer is built as it was, or unbuilt)
    for layer, saved in attributes:
        vars(layer).clear()
        vars(layer).update(saved)


def _name_apart(layers: list[Layer], model: Model) -> None:
    """Make the names of a model's ``layers`` unique. A name the user gave in code is kept:
    two such alike are refused, as Keras refuses a name twice in a model. Other names (made
    automatically, or read from a file) give way to them and to those kept before them, built
    layers' kept first (other models may hold them and show their names: one is renamed only
    where another built one has its name too, as when two trained models are joined; Keras
    avoids that with names unique in the whole session, which xpcnn's per-model names are
    not). Each layer notes that ``model`` holds it: a name given to it later is checked so
    too."""
    given: dict[str, Layer] = {}
    for layer in layers:
        if layer.name_given and given.setdefault(layer.name, layer) is not layer:
            raise InputError(f"two layers of the model are named {layer.name!r}, a name given "
                             f"to both (a {type(given[layer.name]).__name__} and a "
                             f"{type(layer).__name__}); names in a model are unique, so give "
                             f"one of them another name (layer.name = '{layer.name}_2', say)")
    taken = set(given)
    for layer in sorted((la for la in layers if not la.name_given), key=lambda la: not la.built):
        layer.give_way(taken)
        taken.add(layer.name)
    for layer in layers:  # (a name given later is checked as these were)
        held_by(layer, model)
