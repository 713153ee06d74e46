"""The one small contract every layer follows.

A layer is built once for a per-sample input shape (no batch axis), then runs
``forward(x, training, options)`` and ``backward(dy, options)`` on batches; a ``backward``
follows one ``forward(x, training=True)`` with the same :class:`Options`, which keeps what the
gradient needs (only in training). A model's plan passes options to hand work between
neighbours; a layer called by itself gets the defaults. A merge layer (``multi_input``) takes a
list of batches and returns a list of gradients. Called on a symbolic tensor (the functional
API), a layer records a :class:`~xpcnn.layers.symbolic.Node` and returns the output's
:class:`~xpcnn.layers.symbolic.SymbolicTensor`.

Trainable arrays live in ``params`` (their gradients in ``grads`` after ``backward``, unless the
layer is frozen: ``trainable = False``); non-trainable arrays that are part of the model
(BatchNorm's running statistics) live in ``state``. Everything is an array of
``self.backend``; weights cross to the host only through ``get_weights`` / ``set_weights`` and
the :class:`~xpcnn.layers.weight.Weight` handles of ``weights``, in Keras layouts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import json
import math
import re
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import array_api_compat
import numpy as np

from ..backend import Backend, dtype_name, get_backend
from ..checks import (
    defining_class,
    flag,
    is_float32,
    is_one_of,
    largest_value,
    named_parameters,
    real_floating,
    real_numbers,
    register,
    takes_keywords,
    unbindable_override,
    untaken_settings,
)
from ..errors import InputError, of_xpcnn, warn
from ..passes import exclusive_if
from .arguments import (
    _ANY_LAYER,
    _KERAS_COMMON,
    _TORCH_COMMON,
    Shape,
    building_for,
    on_host,
    per_sample,
    rebuilding,
    refuse_foreign_keywords,
)
from .symbolic import Node, SymbolicTensor, is_symbolic, refuse_training_in_graph
from .weight import Weight

# (a keyword argument not given, where None is a value)
_UNSET: Any = object()

# name -> class, filled by Layer.__init_subclass__, used to rebuild models from files: the
# concrete layers (those with a forward pass), not their base classes.
LAYER_TYPES: dict[str, type[Layer]] = {}

# The models that hold each layer (weakly; a model registers itself, see held_by): a layer
# renamed is checked against the other layers' names in each of them.
_HOLDERS: weakref.WeakKeyDictionary[Layer, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


# (guards additions to _HOLDERS and the copies read of it: a thread iterating a WeakSet that
# another adds to got "Set changed size during iteration")
_HOLDERS_LOCK = threading.Lock()


def held_by(layer: Layer, model: Any) -> None:
    """Note that ``model`` holds ``layer``: renaming the layer asks the model's
    ``_layer_renamed(layer)``, which may refuse the name (the layer keeps its old one)."""
    # (a user's layer that defines __eq__ but no __hash__ is not hashable: not checked)
    with contextlib.suppress(TypeError), _HOLDERS_LOCK:
        _HOLDERS.setdefault(layer, weakref.WeakSet()).add(model)


def holders_of(layer: Layer) -> list[Any]:
    """The models that hold ``layer`` (see :func:`held_by`), a copy taken under the lock."""
    with contextlib.suppress(TypeError), _HOLDERS_LOCK:  # (see held_by)
        return list(_HOLDERS.get(layer, ()))
    return []


@dataclass(frozen=True)
class Options:
    """How a model's plan asks a layer to run (``forward(x, training, options)`` and
    ``backward(dy, options)``, the same options for both). The defaults are a layer doing all
    its own work, as it does when called by itself; the plan (:mod:`xpcnn.graph`) changes them
    only to hand work between neighbouring layers, one pass over memory fewer each time, and
    to leave out work no pass reads (``need_input_grad``, ``keep_for_backward``)."""

    #: this layer (``can_fuse_relu``) applies the plain ReLU() that follows it, to each chunk of
    #: its output while it is in cache, and its gradient; the plan skips that ReLU layer.
    fused_relu: bool = False
    #: the next layer applies this layer's ReLU gradient (``apply_input_relu_grad``).
    skip_relu_grad: bool = False
    #: backward returns dx * (input > 0): the ReLU before it skipped its own pass
    #: (``can_apply_input_relu_grad``).
    apply_input_relu_grad: bool = False
    #: backward's ``dy`` is the list of the gradients that the layers reading this layer's
    #: output sent back, in the order they came, which it sums in its own pass
    #: (``can_sum_output_grads``) instead of the model summing them first.
    sum_output_grads: bool = False
    #: False where nothing upstream needs a gradient: backward computes only the parameters'
    #: gradients and returns None.
    need_input_grad: bool = True
    #: the input is the model's batch as given (e.g. uint8 images): forward casts it in its own
    #: pass (``casts_input``; to the layer's dtype, or to its compute dtype where that holds the
    #: values exactly) instead of the model casting it first.
    cast_input: bool = False
    #: this layer's softmax activation (the model's last layer) is left to the loss, as a
    #: final Softmax layer is: forward returns the logits, backward takes their gradient.
    logits: bool = False
    #: False where the plan never runs this layer's backward (a frozen or parameterless layer
    #: before every trained one): a training forward pass keeps nothing for it (drops what an
    #: earlier pass kept), and is otherwise the same (Dropout draws, BatchNorm2D's statistics).
    #: Fixed per plan, so a step captured in a CUDA graph replays it as captured.
    keep_for_backward: bool = True


#: A layer called by itself: it does all its own work.
DEFAULT = Options()


class CheckedFlag:
    """A True/False attribute checked where it is set (a truthy stand-in such as "no" is
    refused) and read as a plain attribute: a training step reads ``trainable`` dozens of
    times. (A descriptor without ``__get__``: the instance's own value is found first.) A
    change counts in :attr:`Layer.rebuilds`: a model lists the layers it trains again then."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __set__(self, layer: Layer, value: bool) -> None:
        value = flag(value, f"layer {layer.name!r} {self.name}")
        if vars(layer).get(self.name) is not value:
            Layer.rebuilds += 1
        vars(layer)[self.name] = value


class Setting:
    """A host value that a layer's passes read (ReLU's ``max_value``, BatchNorm2D's
    ``momentum``), read as a plain attribute (a descriptor without ``__get__``, as
    :class:`CheckedFlag`). A change of a built layer's value counts in
    :attr:`Layer.settings_changes`: a training step captured in a CUDA graph baked the old
    value in, and is captured again (the constructor's value, before any build, does not
    count; nor does a value set again unchanged).

    ``check``: the constructor's own check of the value (it returns the value to keep, or
    raises InputError), run on every assignment, the constructor's and a later one alike: one
    message each way, and a refused value leaves the old one, counting nothing (a momentum of
    5 after build made BatchNorm2D's running variance negative in the next fit).
    ``architecture``: the value is part of what the model computes, not a training
    hyper-parameter (a layer's activation: a softmax one is the model's output), so a
    checkpoint's resume and ``load_weights`` still compare it (see :func:`setting_names`).
    ``on_set``: run as ``on_set(layer)`` once the value is stored, for what depends on the
    layer (Dropout's rate: checked against the built layer's dtypes, its drawn rates worked
    out again); an InputError from it refuses the value as ``check``'s does (the old value is
    put back and ``on_set`` run again for it)."""

    def __init__(self, check: Callable[[Any], Any] | None = None, architecture: bool = False,
                 on_set: Callable[[Layer], None] | None = None) -> None:
        self.check, self.architecture, self.on_set = check, architecture, on_set

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __set__(self, layer: Layer, value: Any) -> None:
        if self.check is not None:
            value = self.check(value)
        old = vars(layer).get(self.name, _UNSET)
        vars(layer)[self.name] = value
        if self.on_set is not None:
            try:
                self.on_set(layer)
            except InputError:
                if old is _UNSET:
                    del vars(layer)[self.name]
                else:
                    vars(layer)[self.name] = old
                    self.on_set(layer)
                raise
        _count_change(layer, old, value)


def setting_names(cls: type) -> tuple[str, ...]:
    """The settings of layer class ``cls`` that may change while it trains (by a callback,
    say): its :class:`Setting` attributes but architecture ones. A checkpoint's resume and
    ``load_weights`` compare a layer's configuration without them (the resume takes the
    file's values)."""
    return tuple(dict.fromkeys(
        name for klass in reversed(cls.__mro__) for name, value in vars(klass).items()
        if isinstance(value, Setting) and not value.architecture))


def _count_change(layer: Layer, old: Any, new: Any) -> None:
    """Count in :attr:`Layer.settings_changes` a setting of built ``layer`` changed from
    ``old`` to ``new`` (see :class:`Setting`)."""
    if not vars(layer).get("built"):
        return
    try:
        same = type(old) is type(new) and bool(old == new)
    except (TypeError, ValueError):  # (an array: equal elementwise, no one bool)
        same = old is new
    if not same:
        Layer.settings_changes += 1


# The n-th layer built outside a model (called on a batch, or layer.build(shape) with no rng)
# draws from _standalone_rng(n): each its own weights and random stream, as Keras' global seed
# generator gives them, and the same in every fresh process.
_STANDALONE_BUILDS = itertools.count()


def _standalone_rng(n: int) -> np.random.Generator:
    """The generator of the n-th standalone build: SeedSequence(0, spawn_key=(n,)), the words
    [0, 0, 0, 0, n]. A model's layer k draws from [seed, k], the words of seed then of k: the
    same only for seed 0 and k = n * 2**96, so no model's layer, whatever the seed, repeats a
    standalone layer's weights or stream (was [0, n]: layer n of a model of the default seed;
    [0, n, 1] would be layer 1 of seed n * 2**32)."""
    return np.random.default_rng(np.random.SeedSequence(0, spawn_key=(n,)))


# Held while a layer called on a batch builds itself at its first call: threads calling an
# unbuilt layer at once build it once (each built its own weights, and counted a standalone
# build). One for all layers (a lock in a layer would stop copying an unbuilt one); re-entrant:
# a user's _build may call another layer.
_BUILD_LOCK = threading.RLock()



def _torch_layout(keras: tuple[int, ...], given: tuple[int, ...]) -> str:
    """The hint where ``given`` is the Keras-layout shape ``keras`` in PyTorch's layout (a
    state_dict's weights; a square nn.Linear weight cannot be told from its transpose)."""
    if len(keras) == 2 and given == keras[::-1]:
        return (": PyTorch's nn.Linear layout, (out_features, in_features)? Keras' (and "
                "xpcnn's) is (in, out): pass weight.T")
    if len(keras) == 4 and given == (keras[3], keras[2], keras[0], keras[1]):
        return (": PyTorch's nn.Conv2d layout, (out, in, kh, kw)? Keras' (and xpcnn's) is "
                "(kh, kw, in, out): pass weight.permute(2, 3, 1, 0)")
    return ""


def _unconverted_torch_weight(w: Any, keras: tuple[int, ...]) -> str | None:
    """The warning for a torch tensor given as a weight whose Keras and PyTorch layouts have
    the same shape (a square nn.Linear weight, an n x n kernel of n filters over n channels),
    where it is still as PyTorch keeps it: contiguous, or a Conv2d weight of a channels_last
    model (the same (out, in, kh, kw) tensor, laid out otherwise), where the conversion
    (``.T``, ``.permute(2, 3, 1, 0)``) gives a view that is neither. None otherwise."""
    if not array_api_compat.is_torch_array(w):
        return None
    square = len(keras) in (2, 4) and len(set(keras)) == 1 and keras[0] > 1
    if not square:
        return None
    import torch  # (w is a torch tensor: torch is imported already)

    if w.is_contiguous():
        order = "contiguous"
    elif len(keras) == 4 and w.is_contiguous(memory_format=torch.channels_last):
        order = "channels_last"
    else:
        return None
    conversion = "weight.T" if len(keras) == 2 else "weight.permute(2, 3, 1, 0)"
    return (f"a {order} torch tensor of shape {keras}, the same in PyTorch's layout as in "
            f"Keras': taken in Keras' layout, as given. A PyTorch layer's weight needs "
            f"{conversion} (a view, which this warning knows); pass a NumPy array to silence it")


def not_a_weight_list(weights: Any) -> str:
    """What a set_weights refusal of ``weights``, no list or tuple, adds for PyTorch's ways of
    holding weights: a state_dict, the module itself, ``parameters()`` (an iterator) or
    ``state_dict().values()``."""
    convert = ("each Conv2d weight .permute(2, 3, 1, 0) and each Linear weight .T (Keras' "
               "layouts)")
    if isinstance(weights, Mapping):
        return f": from a PyTorch state_dict, pass list(state_dict.values()), with {convert}"
    if callable(getattr(weights, "state_dict", None)):
        return (": from a PyTorch module, pass list(module.state_dict().values()), with "
                f"{convert}")
    if isinstance(weights, Iterator | ValuesView):
        return (": pass list(...) of it; from a PyTorch module, list(module.state_dict()."
                "values()) (parameters() leaves out BatchNorm's running statistics), with "
                f"{convert}")
    return ""


def _integer_scalar(w: Any) -> bool:
    """Whether ``w`` is a 0-d integer array (a torch tensor too): PyTorch BatchNorm's
    ``num_batches_tracked``, never an xpcnn weight."""
    if getattr(w, "ndim", None) != 0:
        return False
    try:
        return bool(np.asarray(on_host(w, "a weight")).dtype.kind in "iu")
    except InputError:
        return False


def without_num_batches_tracked(names: list[str], weights: Any) -> list[int]:
    """The indices of ``weights`` (given for weights ``names``, in order) that are weights:
    a 0-d integer array right after a ``moving_variance`` is PyTorch BatchNorm's
    ``num_batches_tracked`` (its state_dict's next value), dropped, but where the list has
    the count as given (a user layer's scalar weight there is kept). A count that fits
    neither way keeps the drops, for :func:`weight_count_hint`."""
    if len(weights) == len(names):
        return list(range(len(weights)))
    return _skipping_after_moving_variance(names, weights, _integer_scalar)[0]


def _skipping_after_moving_variance(names: list[str], weights: Any, skip: Callable[[Any], bool]
                                    ) -> tuple[list[int], list[int]]:
    """``weights`` read along ``names``, skipping a value for which ``skip`` holds right after
    each ``moving_variance``: the indices kept (any beyond ``names`` too), and those skipped."""
    kept, skipped, j = [], [], 0
    for name in names:
        if j >= len(weights):
            break
        kept.append(j)
        j += 1
        if name == "moving_variance" and j < len(weights) and skip(weights[j]):
            skipped.append(j)
            j += 1
    return kept + list(range(j, len(weights))), skipped


def weight_count_hint(names: list[str], weights: Any, kept: list[int]) -> str:
    """What a set_weights count error adds: the num_batches_tracked dropped, or, where one
    integer scalar elsewhere is the whole surplus, that it is one not in its place, or, where
    0-d values right after moving_variances are the whole surplus, that they are
    num_batches_tracked cast to float (a state_dict's values cast as a whole)."""
    dropped = len(weights) - len(kept)
    said = f" ({dropped} num_batches_tracked dropped)" if dropped else ""
    scalars = [i for i in kept if _integer_scalar(weights[i])]
    if len(kept) == len(names) + 1 and len(scalars) == 1:
        said += (f"; array {scalars[0]} is a 0-d integer, as PyTorch BatchNorm's "
                 "num_batches_tracked: it is dropped only right after a BatchNorm2D's "
                 "moving_variance, remove it")
    fits, skipped = _skipping_after_moving_variance(
        names, weights, lambda w: getattr(w, "ndim", None) == 0)
    cast = [str(i) for i in skipped if not _integer_scalar(weights[i])]
    if cast and len(fits) == len(names):
        which, it = (f"array {cast[0]} is", "it") if len(cast) == 1 else \
            (f"arrays {', '.join(cast)} are", "them")
        said += (f"; {which} 0-d, right after a BatchNorm2D's moving_variance, as PyTorch "
                 "BatchNorm's num_batches_tracked cast to float (a state_dict's values cast as "
                 f"a whole): it is dropped only as a 0-d integer, remove {it}")
    return said


#: A keyword of a user's Keras 2 layer, beyond those every layer refuses (``_KERAS_COMMON``,
#: Keras 2's ``input_dim`` and ``batch_input_shape`` among them): what to do instead.
_KERAS2_COMMON = {
    "dynamic": "a user's layer's forward is plain Python already (no graph is traced)",
}


def _refuse_base_keywords(cls: type, given: dict[str, Any]) -> bool:
    """Refuse the keywords a user's layer (Keras' ``__init__(self, ..., **kwargs)``) passed on
    to :class:`Layer`'s constructor that it does not take: a Keras or PyTorch one (Keras'
    ``input_shape=``, Keras 2's ``input_dim=``) naming what to pass instead, as a built-in
    layer refuses it (its value where that is what xpcnn does, ``dtype=None``, is taken);
    another as Python refuses a keyword (a TypeError: ``from_config`` names the configuration
    then). Returns whether ``dtype`` is Keras' default float32, taken as Input takes it: the
    layer's build then refuses a model of another dtype or precision."""
    name = cls.__name__
    float32 = False
    for key, value in given.items():
        if key in _ANY_LAYER and is_one_of(value, _ANY_LAYER[key]):
            continue
        if key == "dtype" and is_float32(value):
            float32 = True
            continue
        if key == "dynamic" and value is False:  # (Keras' default: what xpcnn does)
            continue
        via = (f"{name} passes it on to xpcnn's Layer.__init__, which takes name and trainable"
               if defining_class(cls, "__init__") is not Layer else
               f"{name}'s constructor is xpcnn's Layer.__init__, which takes name and trainable")
        why = _KERAS_COMMON.get(key) or _KERAS2_COMMON.get(key)
        if key == "dtype":
            why = (f"{why} (dtype is taken only as None, or 'float32', Keras' default, in a "
                   "float32 model)")
        if why is not None:
            raise InputError(f"{name}({key}={value!r}): Keras' keyword, which xpcnn's layers do "
                             f"not take ({via}): {why}")
        torch_why = _TORCH_COMMON.get(key)
        if isinstance(torch_why, str):
            raise InputError(f"{name}({key}={value!r}): PyTorch's keyword, which xpcnn's layers "
                             f"do not take ({via}): {torch_why}")
        raise TypeError(f"{name}(..., {key}={value!r}): an unexpected keyword argument ({via} "
                        "only)")
    return float32


def _refuse_keras_build(cls: type) -> None:
    """Refuse a layer class overriding ``build`` with a signature that cannot take what a
    model passes (``build(input_shape, backend, dtype, compute_dtype, rng)``): Keras'
    ``build(self, input_shape)`` hook, which ended in a bare TypeError from inside xpcnn at
    the model's first build."""
    # (self, input_shape, backend, dtype, compute_dtype, rng)
    signature = unbindable_override(cls, "build", *[None] * 6)
    if signature is not None:
        raise InputError(
            f"layer class {cls.__name__} overrides build{signature}, Keras' hook: xpcnn's "
            "build(input_shape, backend, dtype, compute_dtype, rng) is the model's, which calls "
            "the layer's _build(self, input_shape, rng): define that instead, making the "
            "weights with self._param(name, value) (value a NumPy array, e.g. "
            "np.ones(input_shape[-1])), naming them in weight_names, and returning the "
            "per-sample output shape (input_shape has no batch axis)")


class Layer:
    """Base class: subclasses define ``_build``, ``forward``, ``backward`` and ``get_config``,
    name the arrays they make in :attr:`weight_names`, and update the arrays in ``state`` in
    place (``a[...] = new``: a step skipped on the device puts back the arrays it snapshot).
    A model checks a user's layer (a class not xpcnn's own) in its training steps: a state
    array replaced rather than updated, or a ``backward`` returning a gradient not shaped as
    the input, is refused by name (:mod:`xpcnn.graph`).

    A layer keeps what its ``backward`` needs only in a training pass (``if training: self._x
    = x``), as xpcnn's own do: another thread may predict with the model while it trains,
    between a training forward and its backward. A user's layer that keeps in every pass is
    covered where it binds attributes or fills containers: from a training forward to its
    backward, another thread's inference pass runs its ``forward`` on a throwaway copy of its
    attributes and slots (``self._x = x`` there binds the copy's), whose dicts, lists and sets
    are copied one level (``self.cache["x"] = x``, ``self.seen.append(x)`` fill the copy's),
    and a training forward waits for the inference passes running on the layer itself. Not
    covered: an array written in place (``self._x[...] = x``, or into an array held in a
    container), an object held in an attribute and changed (its own attributes), and storage
    kept outside the instance (a dict keyed by ``self``): those are shared by both passes, so
    keep them in training only. What an inference pass records on the copy (a counter, an
    attention map) is dropped with it; so is, in an inference pass that started before the
    training pass, what a ``super().forward`` call binds after the training pass has begun.
    One layer in two models training in two threads at once is not covered."""

    #: Keras-layout order of ``get_weights``: names in ``params`` then ``state``, every one a
    #: layer makes (a file is checked against them before any layer is built).
    weight_names: ClassVar[tuple[str, ...]] = ()
    #: True where backward can multiply its input gradient by ``input > 0`` inside its own
    #: passes (see :attr:`Options.apply_input_relu_grad`).
    can_apply_input_relu_grad: ClassVar[bool] = False
    #: True where the layer can apply a plain ReLU to its output as it computes it (see
    #: :attr:`Options.fused_relu`).
    can_fuse_relu: ClassVar[bool] = False
    #: False where the training pass never changes ``state`` (adapted statistics, fixed):
    #: a skipped step need not put it back, nor several ranks average it.
    updates_state: ClassVar[bool] = True
    #: True where a training step of this class may be captured in a CUDA graph and replayed
    #: (:func:`xpcnn.cuda_graphs.layer_blockers`): every per-step value lives in its device
    #: arrays. xpcnn's own layers are; a user's class is not until it says so.
    capturable: ClassVar[bool] = False
    # (a user's layer's training pass until its backward: the marking thread's id, see
    # _user_passes; read as a class attribute by every layer's backward, with no call)
    _pending_backward: int = 0
    #: True where backward can take its output's gradient as the parts its readers sent back
    #: and sum them in its own pass (see :attr:`Options.sum_output_grads`).
    can_sum_output_grads: ClassVar[bool] = False
    #: True for a layer whose input is a list of batches (a merge layer): ``forward`` takes a
    #: list and ``backward`` returns one gradient per input, in the same order.
    multi_input: ClassVar[bool] = False
    #: True where forward can take the model's batch as given and cast it itself (see
    #: :attr:`Options.cast_input`).
    casts_input: ClassVar[bool] = False
    #: Where the input's values meet the compute dtype, for the check of data beyond float16
    #: (:func:`xpcnn.data.arrays.input_limit`): "computes" (read in it), "normalises" (in the
    #: parameters' dtype: its output is small), "passes" (values as they came, to the layers
    #: reading its output). Heeded only from the class defining ``forward`` too.
    input_values: ClassVar[str] = "computes"
    #: True for a layer whose forward pass reads its parameters in ``compute_dtype`` through
    #: :meth:`compute_weight` (under mixed precision the model casts all of them in one call).
    casts_weights: ClassVar[bool] = False
    #: False for a layer with no gradient, whose backward cannot pass one to its input (an
    #: augmentation: RandomFlip, RandomCrop): a model refuses it where a layer it trains comes
    #: before it (:func:`xpcnn.graph.compile_plan`), before any pass runs.
    has_gradient: ClassVar[bool] = True
    #: The mode of a direct call on a batch, ``layer(x)`` with no ``training``: inference,
    #: as Keras (Dropout drops nothing); True for the random augmentations, which augment
    #: when called so, as Keras 3's random image layers do. Models pass it explicitly.
    training_when_called: ClassVar[bool] = False
    #: False freezes the layer (as in Keras): no gradients for its parameters, which the
    #: optimiser leaves alone; a BatchNorm2D also runs in inference mode.
    trainable = CheckedFlag()
    #: Builds, moves, compute-dtype and ``trainable`` changes of every layer so far, counted on
    #: this class (``Layer.rebuilds += 1``, never on a subclass): a model looks again whether
    #: its layers are built as it needs them (``Model._rebuild_if_shared``), and which of them
    #: it trains (``Model._trained``), only after this count moved.
    rebuilds: ClassVar[int] = 0
    #: Changes of the host values that built layers' passes read (:class:`Setting`: Dropout's
    #: rate, ReLU's max_value...), counted on this class: a step captured in a CUDA graph
    #: replays the values of its capture, so the step is captured again after this moved.
    settings_changes: ClassVar[int] = 0
    #: Built alone for its data's shape by ``adapt()`` (Normalization, as Keras builds it
    #: there: its weights at once), its statistics kept in float64: a model's build, or a call
    #: on a batch of another shape, builds it again from them, as an unbuilt layer.
    provisional = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_keras_build(cls)  # (before it is registered: the class statement fails whole)
        # Only a layer with a forward pass of its own or inherited can be named in a file: a
        # base class (RandomLayer) would load, then fail at the first batch.
        if cls.forward is not Layer.forward:
            register(LAYER_TYPES, cls, "layer")
        # Every layer keeps what its gradient needs only in a training forward pass, and
        # backward consumes it: a backward without one gets a clear error, not a missing
        # attribute from deep inside.
        if "forward" in cls.__dict__:
            cls.forward = _marks_training_pass(cls.__dict__["forward"],
                                               users=not of_xpcnn(cls.__module__))
        if "backward" in cls.__dict__:
            cls.backward = _needs_training_pass(cls.__dict__["backward"])
        # Every layer takes trainable= and its get_config() says where it is frozen, as in
        # Keras 3 (whose layers pass it on to the base class in **kwargs): done here for each
        # class, so that a layer's own constructor and get_config need not.
        init = cls.__dict__.get("__init__")
        if init is not None and "trainable" not in named_parameters(init) and \
                not getattr(init, "_takes_trainable", False):
            cls.__init__ = _takes_trainable(init)
        if "get_config" in cls.__dict__ and \
                not getattr(cls.__dict__["get_config"], "_writes_trainable", False):
            cls.get_config = _writes_trainable(cls.__dict__["get_config"])

    def __init__(self, name: str | None = None, trainable: bool = True, **keras: Any) -> None:
        if keras and _refuse_base_keywords(type(self), keras):  # (Keras' input_shape= or
            self._keras_dtype = "float32"  # dtype=, passed on by a user's **kwargs)
        self.name = name
        self.params: dict[str, Any] = {}
        # (each in the parameter's dtype or, under mixed precision, as computed (float16
        # products, float32 sums): the model casts them back in one call, see
        # Trainer._loss_and_grads, and so do data parallelism's buckets)
        self.grads: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.built = False
        self.input_shape: Shape | None = None
        self.output_shape: Shape | None = None
        self.trainable = trainable
        # Its calls on symbolic tensors (Keras' inbound nodes): the user's in a functional
        # graph, a built Sequential's own; ``output`` and ``input`` are those of the one call.
        self.inbound_nodes: list[Node] = []
        # (the model called on a tensor that called it last, without a node of its own: an
        # error about its missing output names that model)
        self.called_through: str | None = None
        # (the model's casts of the weights for one forward pass, by thread: see _cache_weights)
        self._cache_weights_by_thread: dict[int, dict[str, Any]] | None = {}

    @property
    def name(self) -> str:
        """The layer's name, unique in a model. A name the user gives (to the constructor, or
        by setting it) is theirs (``name_given``): no model changes it. None gives the type's
        name (``conv2d``), which a model makes unique (``conv2d_1``, see :meth:`give_way`), as
        it does a name read from a file."""
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"layer name must be a non-empty string or None, got {value!r}")
        before = vars(self).get("_name"), vars(self).get("name_given")
        self._name = value or type(self).__name__.lower()
        self.name_given = value is not None
        for model in holders_of(self):
            try:  # (two names alike in a model: its weights' paths, get_layer, its files)
                model._layer_renamed(self)
            except InputError:
                self._name, self.name_given = before
                raise

    def give_way(self, taken: set[str]) -> None:
        """Where this layer's name (not ``name_given``) is in ``taken``, take the first of
        ``conv2d``, ``conv2d_1``, ``conv2d_2``... that is not (its type's, for a name made
        from it; else ``name_1``, ``name_2``...)."""
        if self._name in taken:
            kind = type(self).__name__.lower()
            base = kind if re.fullmatch(rf"{re.escape(kind)}(_[0-9]+)?", self._name) \
                else self._name
            names = (f"{base}_{k}" if k else base for k in itertools.count())
            self._name = next(n for n in names if n not in taken)

    @property
    def relu_output(self) -> bool:
        """True where the output is a plain ReLU's, max(z, 0), whose gradient passes exactly
        where the output is > 0 (see :attr:`Options.skip_relu_grad`)."""
        return False

    @property
    def softmax_output(self) -> bool:
        """True where the output is a softmax of the layer's own logits that it leaves out
        under :attr:`Options.logits` (``Dense(activation="softmax")``): a model ending in it
        hands those logits to the loss, as it does a final Softmax layer's input."""
        return False

    # -- building ------------------------------------------------------------------------
    def build(
        self,
        input_shape: Shape,
        backend: Backend | Any = "cpu",
        dtype: str = "float32",
        compute_dtype: str | None = None,
        rng: np.random.Generator | None = None,
    ) -> Shape:
        """Create the parameters for a per-sample ``input_shape``; returns the output shape.

        ``dtype`` is the parameters' dtype, ``compute_dtype`` the dtype of the heavy matmuls
        (lower for mixed precision). Initial values come from ``rng`` on the host, so one seed
        gives the same weights on every device. A built layer's build waits for the passes
        running through it in other threads, as a model's build does (:mod:`xpcnn.passes`).
        """
        with exclusive_if(self.built, f"building layer {self.name!r}"):
            return self._build_now(input_shape, backend, dtype, compute_dtype, rng)

    def _build_now(self, input_shape: Shape, backend: Backend | Any, dtype: str,
                   compute_dtype: str | None, rng: np.random.Generator | None) -> Shape:
        # A refused rebuild of a built layer changes nothing (an adapted Normalization called
        # on other channels stayed built for them): its attributes, dicts copied, put back.
        # (the dicts themselves put back too, params, state and grads: the same objects)
        saved = dict(vars(self)) if self.built else None
        contents = {k: dict(v) for k, v in vars(self).items() if type(v) is dict} \
            if self.built else {}
        try:
            return self._build_unchecked(input_shape, backend, dtype, compute_dtype, rng)
        except BaseException:
            if saved is not None:
                Layer.rebuilds += 1  # (built again as it was)
                vars(self).clear()
                vars(self).update(saved)
                for k, items in contents.items():
                    saved[k].clear()
                    saved[k].update(items)
            raise

    def _build_unchecked(self, input_shape: Shape, backend: Backend | Any, dtype: str,
                         compute_dtype: str | None, rng: np.random.Generator | None) -> Shape:
        names = {dtype_name(each) for each in (dtype, compute_dtype or dtype)}  # (float
        # dtypes: int8 weights were taken, all zeros, silently)
        if "_keras_dtype" in vars(self) and names != {"float32"}:
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) was made with "
                             "dtype='float32', Keras' default, which xpcnn takes where the "
                             "model computes in float32; its model's weights are "
                             f"{dtype_name(dtype)}, computed in "
                             f"{dtype_name(compute_dtype or dtype)}: a layer's dtype is its "
                             "model's (Sequential(dtype=...), compile(precision=...)): leave "
                             "dtype out")
        Layer.rebuilds += 1
        self.provisional = False
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.dtype = self.backend.dtype(dtype)
        self.compute_dtype = self.backend.dtype(compute_dtype or dtype)
        self.input_shape = _shape(input_shape, self)
        self._clear_cache()  # (a convolution's engine was for the old shape, say)
        if rng is None:  # (a model hands each of its layers its own: see _STANDALONE_BUILDS)
            rng = _standalone_rng(next(_STANDALONE_BUILDS))
        self.output_shape = _output_shape(self, self._build(self.input_shape, rng))
        held = _held_layers(self)
        if held:  # (their weights would never be trained, counted or saved: lost work)
            raise InputError(f"layer class {type(self).__name__} holds built layers with "
                             f"weights of their own in {', '.join(held)}: xpcnn does not track "
                             "a layer's sub-layers, so fit would never train them, nor "
                             "count_params count them, nor save keep their weights. Make the "
                             "arrays the layer's own (self._param(name, value) in _build, named "
                             "in weight_names, read as self.params[name] in forward and "
                             "backward), or compose the layers in a model (Sequential, or a "
                             "functional xpcnn.Model) instead of this layer: a model's layers "
                             "join another model where it is added to a Sequential or called "
                             "on a functional model's tensor, not where a layer holds it")
        unnamed = [k for k in self._arrays() if k not in self.weight_names]
        if unnamed:  # (a user's layer: its weights would be trained, and never saved)
            raise InputError(f"layer class {type(self).__name__} makes the arrays {unnamed} "
                             "but does not name them in weight_names: set the class "
                             f"attribute weight_names = {tuple(self._arrays())!r} (params, "
                             "then state), so that get_weights, save and checkpoints hold them")
        self._check_arrays()
        self.built = True
        return self.output_shape

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        if self.multi_input:  # (the tuple of its inputs' shapes is no output shape)
            raise InputError(f"layer class {type(self).__name__} is a merge layer (multi_input "
                             "= True) and defines no _build: it must define _build(self, "
                             "input_shape, rng), input_shape the tuple of its inputs' "
                             "per-sample shapes, returning its output's per-sample shape, a "
                             "tuple of positive ints such as (8, 8, 16)")
        return input_shape

    def _param(self, name: str, value: np.ndarray, trainable: bool = True) -> None:
        target = self.params if trainable else self.state
        target[name] = self.backend.asarray(value, dtype=self.dtype)

    def add_weight(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: Keras' way to make a weight, which xpcnn's layers make with
        :meth:`_param` in ``_build`` (an attribute holding Keras' returned variable would not
        be the array the optimiser updates, saves and loads)."""
        raise InputError(f"layer {self.name!r} ({type(self).__name__}) called add_weight(), "
                         "Keras' way to make a weight: in xpcnn, _build(self, input_shape, rng) "
                         "makes it with self._param(name, value) (value a NumPy array, e.g. "
                         "rng.normal(size=shape) or np.ones(shape); trainable=False for state), "
                         "names it in the class's weight_names, and forward reads it as "
                         "self.params[name]")

    # -- computing -----------------------------------------------------------------------
    def forward(self, x: Any, training: bool = False, options: Options = DEFAULT) -> Any:
        keras = (" (Keras' call(x, training) is xpcnn's forward: rename it)"
                 if callable(getattr(self, "call", None)) else "")
        raise InputError(f"layer {self.name!r} ({type(self).__name__}) defines no "
                         "forward(x, training=False, options=DEFAULT): a layer must define it, "
                         f"returning its output{keras}")

    def backward(self, dy: Any, options: Options = DEFAULT) -> Any:
        raise InputError(f"layer {self.name!r} ({type(self).__name__}) defines no backward(dy, "
                         "options): a layer that gradients pass through (one after a trainable "
                         "layer, or trainable itself) must define it, returning the gradient "
                         "of its input and filling grads[name] for each of its params")

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        """On a batch: ``forward(x, training)``, an integer or bool batch (uint8 images), or
        one of another float dtype (float64; not the compute dtype's), cast to the layer's
        dtype first, as a model casts its batches (and Keras a layer's inputs);
        ``training=None`` is :attr:`training_when_called` (inference, but for the random
        augmentations, as in Keras 3). On a symbolic tensor (or, for a merge layer,
        a list of them): records the call in a graph and returns the output's symbolic
        tensor, for ``xpcnn.Model(inputs, outputs)``."""
        if is_symbolic(x):
            refuse_training_in_graph(f"layer {self.name!r} ({type(self).__name__})", training)
            return self._call_symbolic(x)
        if isinstance(x, list | tuple) and any(isinstance(t, SymbolicTensor) for t in x):
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) got a list of "
                             "symbolic tensors and arrays "
                             f"({', '.join(type(t).__name__ for t in x)}): in a functional "
                             "model every input is a symbolic tensor (xpcnn.Input or a layer's "
                             "output)")
        _check_batch(self, x)
        if not self.built or self.provisional and _other_shape(self, x):
            with _BUILD_LOCK:  # (double-checked: a built layer takes no lock)
                if not self.built or self.provisional and _other_shape(self, x):
                    self._build_for(x)
            _check_batch(self, x)  # (built by another thread meanwhile, perhaps for another shape)
        if self.built:
            # (in its own dtype uint8 200 + 200 wrapped to 144, a "same" max pool padded int8
            # with 0, and average pools and Dropout failed deep inside)
            x = [self._as_float(a) for a in x] if self.multi_input else self._as_float(x)
        if training is None:  # (a direct call: the class's mode, see training_when_called)
            training = self.training_when_called
        return self.forward(x, bool(training))

    def _build_for(self, x: Any) -> None:
        """Build an unbuilt layer called on a batch, as Keras does at a layer's first call:
        for its per-sample shape, in float32 (Keras' default), on the batch's namespace and
        device (NumPy's CPU for a NumPy array). What is no array is refused here, by what it is
        (forward's wrapper would ask for a build, which the layer cannot do from it)."""
        batches = list(x) if self.multi_input else [x]
        try:
            xp = array_api_compat.array_namespace(*batches)
            device = array_api_compat.device(batches[0])
        except TypeError:  # (a list of numbers, say)
            want = "a list of batches" if self.multi_input else "a batch"
            got = ", ".join(type(a).__name__ for a in batches)
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) takes {want}: arrays "
                             "(N, *per-sample shape) of one array library (NumPy, CuPy, "
                             f"PyTorch...), got {got}") from None
        shapes = [tuple(int(d) for d in a.shape[1:]) for a in batches]
        try:
            self.build(shapes if self.multi_input else shapes[0], (xp, device))
        except InputError as e:  # (one image is taken as a batch of its rows)
            if self.multi_input or not _one_axis_short(self, x):
                raise
            raise InputError(f"{e}; one sample? add the batch axis, x[None]") from None

    def _as_float(self, a: Any) -> Any:
        # A float batch of another dtype is cast to the layer's, as Keras casts a layer's
        # inputs (pools, ReLU, Flatten and merges gave float64 from a float64 batch, computing
        # layers float32); one in the compute dtype (a mixed-precision model's activations)
        # is what the model hands the layer: kept.
        if a.dtype == self.dtype or a.dtype == self.compute_dtype:
            return a
        # (real_floating first: NumPy's isdtype refuses ml_dtypes' bfloat16)
        if real_floating(self.xp, a.dtype):
            return self.xp.astype(a, self.dtype)
        if self.xp.isdtype(a.dtype, ("bool", "integral")):
            return self.xp.astype(a, self.dtype)
        # (complex: was cast with NumPy's ComplexWarning alone, or passed through by ReLU)
        raise InputError(f"layer {self.name!r} ({type(self).__name__}) takes batches of real "
                         f"numbers (floats, integers or bools), got dtype {a.dtype}")

    def _call_symbolic(self, x: SymbolicTensor | list[SymbolicTensor], record: bool = True
                       ) -> SymbolicTensor:
        """The call's output tensor; ``record``: the call is one of :attr:`inbound_nodes` (not
        where a model called on a tensor calls its layers, as in Keras)."""
        multi = isinstance(x, list | tuple)
        if multi != self.multi_input or (multi and len(x) < 2):
            want = "a list of two or more tensors" if self.multi_input else "one tensor"
            got = f"a list of {len(x)}" if multi else "one tensor"
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) takes {want}, got "
                             f"{got}")
        inputs = tuple(x) if multi else (x,)
        shapes = [t.sample_shape for t in inputs]
        shape = shapes if multi else shapes[0]
        # The output shape from a trial build of a copy: this layer's own weights (perhaps
        # trained) stay as they are; the model builds the layer on its device.
        probe = self.unbuilt_copy()
        with building_for(shapes[0] if not multi and inputs[0].node is None else ()):
            node = Node(self, inputs, multi, probe.build(shape, "cpu", "float32"))
        if self.built and not self.provisional:
            # (refused at the call, as Keras refuses it, not at the Model(...) built from it;
            # a provisional layer is built again by its model)
            refuse_other_weight_shapes(self, probe, shape)
        if record:
            self.inbound_nodes.append(node)
        return node.output

    @property
    def output(self) -> SymbolicTensor:
        """The symbolic tensor this layer computes in the graph it is called in, as in Keras
        (``xpcnn.Model(model.input, model.get_layer("conv2d").output)``: a feature
        extractor sharing this layer)."""
        return self._only_node("output").output

    @property
    def input(self) -> SymbolicTensor | list[SymbolicTensor]:
        """The symbolic tensor this layer reads in the graph it is called in (a list for a
        merge layer), as in Keras."""
        node = self._only_node("input")
        return list(node.inputs) if node.multi else node.inputs[0]

    def _only_node(self, what: str) -> Node:
        if not self.inbound_nodes and self.called_through is not None:
            model = self.called_through
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) has no symbolic "
                             f"{what}: it was called only through model {model!r} called on a "
                             f"tensor, whose layers' {what}s are in that model's own graph (as "
                             f"in Keras), and {model!r} is not built, so it has none: build it "
                             "(m.build(input_shape), m that model, keeps the weights) and use "
                             "xpcnn.Model(m.input, layer.output) for a model sharing these "
                             "weights")
        if not self.inbound_nodes:
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) has no symbolic "
                             f"{what}: it is in no functional graph and no built Sequential "
                             "(build(input_shape) or Sequential(..., input_shape=...) makes "
                             "one; a model called on a tensor keeps its layers' own)")
        if len(self.inbound_nodes) > 1:
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) is called at "
                             f"{len(self.inbound_nodes)} places (shared by several graphs or "
                             f"models), so its {what} is ill-defined: Keras asks for "
                             f"get_{what}_at(node_index) here, which xpcnn does not have: "
                             "use the tensor the layer's call returned in the graph you mean, "
                             "or give each model a layer of its own")
        return self.inbound_nodes[0]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # (copy.copy, copy.deepcopy and pickle all come here: a built layer holds its device's
        # array library and kernels, which cannot be copied; an unbuilt one copies as any
        # object)
        if "backend" in vars(self) or vars(self).get("built"):
            raise InputError(
                f"layer {self.name!r} ({type(self).__name__}) is built and cannot be copied or "
                "pickled (it holds its device's array library and kernels): make a new one "
                f"with {type(self).__name__}.from_config(layer.get_config()) and, once built, "
                "new.set_weights(layer.get_weights())")
        return super().__reduce_ex__(protocol)

    # -- weights and configuration ---------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this layer (JSON-serialisable). A subclass whose
        constructor takes more than ``name`` must give them: its file would load with their
        defaults otherwise (:meth:`check_config`, at save). ``"trainable": False`` is added to
        every layer's where it is frozen (by :meth:`__init_subclass__`: a subclass's own
        get_config need not), as Keras 3 gives it: ``from_config`` and :meth:`unbuilt_copy`
        make a frozen copy; a trainable layer's stays without it."""
        return _with_trainable(self, {"name": self.name})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Layer:
        """A new layer of the settings :meth:`get_config` gave (Keras' way of copying one: its
        weights new, made at its build); settings the constructor does not take are refused by
        name."""
        if not isinstance(config, dict):
            raise InputError(f"{cls.__name__}.from_config takes the dict a layer's get_config() "
                             f"returns, got {type(config).__name__}")
        try:
            with rebuilding():
                return cls(**config)
        except TypeError as e:
            raise InputError(f"{cls.__name__}.from_config: the configuration {config} does not "
                             f"fit {cls.__name__}'s constructor ({e})") from None

    def check_config(self) -> None:
        """Refuse to save a layer whose class takes settings (named parameters) that the class
        defining its ``get_config`` does not take: that get_config cannot give them (a
        subclass of Dense with a setting of its own inherits Dense's)."""
        cls = type(self)
        definer = defining_class(cls, "get_config")
        if not issubclass(definer, Layer):  # (a mixin's get_config: its constructor says nothing)
            return
        known = named_parameters(definer.__init__)
        taken = [p for p in named_parameters(cls.__init__) if p not in known]
        if taken:
            why = "defines no get_config()" if definer is Layer else \
                f"the get_config() it inherits from {definer.__name__} does not give them"
            raise InputError(f"layer class {cls.__name__} takes {taken} but {why}: define "
                             "get_config() returning them (with super().get_config()), so that "
                             "a saved model rebuilds it")
        if not of_xpcnn(cls.__module__):
            self._check_rebuilds()

    def _check_rebuilds(self) -> None:
        """Refuse a user's layer whose file would not load, or would load under another name:
        its get_config() gives what its constructor does not take, or no "name" where the
        constructor takes one (Keras' ``**kwargs`` included)."""
        cls = type(self)
        config = self.get_config()
        own = defining_class(cls, "from_config") is not Layer  # (Keras' hook, overridden)
        fix = ("define get_config() and from_config() so that from_config(get_config()), "
               "its values as JSON gives them back, rebuilds it" if own else
               "define get_config() returning the constructor's arguments (with "
               "super().get_config()), so that a saved model rebuilds it")
        if not isinstance(config, dict):
            raise InputError(f"layer class {cls.__name__}'s get_config() returns a "
                             f"{type(config).__name__}, expected a dict: {fix}")
        # (as a file holds it: "trainable" is the layer spec's, and JSON makes tuples lists)
        settings = {k: v for k, v in config.items() if k != "trainable"}
        # (a from_config of the class's own may take what the constructor does not: the
        # round trip below decides)
        untaken = [] if own else untaken_settings(self, settings)
        if untaken:
            raise InputError(f"layer class {cls.__name__}'s get_config() gives {untaken}, which "
                             f"its constructor does not take: {fix}")
        init = cls.__init__
        if "name" not in settings and ("name" in named_parameters(init) or takes_keywords(init)):
            raise InputError(f"layer class {cls.__name__}'s get_config() does not give 'name', "
                             f"which its constructor takes (layer {self.name!r} would load "
                             f"under its default name): {fix}")
        try:
            settings = json.loads(json.dumps(settings))
        except (TypeError, ValueError):  # (refused, with the part named, as the file is written)
            return
        try:
            with rebuilding():
                again = json.loads(json.dumps(cls.from_config(settings).get_config()))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise InputError(f"layer class {cls.__name__} cannot be rebuilt from its "
                             f"get_config() {settings} ({type(e).__name__}: {e}): {fix}") from e
        again.pop("trainable", None)  # (the layer spec's: see settings)
        if again != settings:  # (a from_config dropping a setting: the file loaded other values)
            raise InputError(f"layer class {cls.__name__}'s get_config() {settings} rebuilds a "
                             f"layer whose get_config() is {again}, so that a saved model "
                             f"would load another layer: {fix}")

    def unbuilt_copy(self) -> Layer:
        """A new layer made from :meth:`get_config` (to build aside, leaving this one as it
        is); a subclass whose constructor takes other arguments gets a clear error."""
        config = self.get_config()
        try:
            with rebuilding():
                return type(self).from_config(config)
        except (TypeError, InputError) as e:  # (a user's from_config's bare one; Layer's names it)
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) cannot be made again "
                             f"from its get_config() {config!r} ({type(e).__name__}: {e}): a "
                             "layer's get_config() returns its constructor's arguments, name "
                             "included (a graph builds a copy to learn the output shape)"
                             ) from None

    def _arrays(self) -> dict[str, Any]:
        return {**self.params, **self.state}

    def _check_arrays(self) -> None:
        """Every array ``_build`` made is one of the backend's, in the layer's dtype (as
        :meth:`_param` makes them): a float64 one in a float32 model trained in float64 and
        was saved as float32; a NumPy one on another backend failed at its first use."""
        kind = type(self.backend.asarray(np.zeros(0), dtype=self.dtype))
        for k, a in self._arrays().items():
            if isinstance(a, kind) and a.dtype == self.dtype:
                continue
            dtype = str(getattr(a, "dtype", None)).rsplit(".", 1)[-1]  # (strict's "...float64")
            raise InputError(f"layer {self.name!r} ({type(self).__name__})'s _build made its "
                             f"array {k!r} a {type(a).__module__}.{type(a).__name__} of dtype "
                             f"{dtype}, expected an array of the model's backend "
                             f"({kind.__module__}.{kind.__name__}) in the layer's dtype "
                             f"{dtype_name(self.dtype)}: make it with self._param({k!r}, "
                             "host_value) (trainable=False for a state array), which converts "
                             "it to the model's backend and dtype")

    def present_weight_names(self) -> list[str]:
        """The names of :attr:`weight_names` this layer holds (one built without a bias has no
        ``bias``), in the order of :meth:`get_weights`."""
        arrays = self._arrays()
        return [n for n in self.weight_names if n in arrays]

    def get_weights(self) -> list[np.ndarray]:
        """Weights as host arrays in Keras order and layout."""
        return [self.host_weight(n) for n in self.present_weight_names()]

    def host_weight(self, name: str) -> np.ndarray:
        """Weight ``name`` as a host copy in Keras' layout."""
        return self.to_keras_layout(name, self.backend.to_numpy(self._arrays()[name])).copy()

    @property
    def moves_state(self) -> bool:
        """Whether a training pass may change ``state`` (a skipped step puts it back, several
        ranks average it): where it ``updates_state`` and trains, or is a user's class, frozen
        too, as every layer gets ``training=True`` in a training pass and a user's may move
        its own statistics then (xpcnn's own frozen ones, BatchNorm2D, run in inference mode
        and never do)."""
        return bool(self.state) and self.updates_state and (
            self.trainable or not of_xpcnn(type(self).__module__))

    @property
    def weights(self) -> list[Weight]:
        """Every weight as a :class:`~xpcnn.layers.weight.Weight`, in :meth:`get_weights`'
        order; none before the layer is built, as in Keras."""
        return [Weight(self, n) for n in self.present_weight_names()] if self.built else []

    @property
    def trainable_weights(self) -> list[Weight]:
        """The weights the optimiser updates: the parameters, unless the layer is frozen."""
        return [w for w in self.weights if w.trainable]

    @property
    def non_trainable_weights(self) -> list[Weight]:
        """The other weights: state (BatchNorm's moving statistics), and a frozen layer's
        parameters."""
        return [w for w in self.weights if not w.trainable]

    # (a user's layer that kept its own arrays under these names: told why, not a bare
    # "property has no setter")
    @weights.setter
    def weights(self, value: Any) -> None:
        _weights_are_read_only(self, "weights")

    @trainable_weights.setter
    def trainable_weights(self, value: Any) -> None:
        _weights_are_read_only(self, "trainable_weights")

    @non_trainable_weights.setter
    def non_trainable_weights(self, value: Any) -> None:
        _weights_are_read_only(self, "non_trainable_weights")

    def to_keras_layout(self, name: str, a: np.ndarray) -> np.ndarray:
        """A host array shaped like weight ``name`` as stored (its optimiser slots too), in
        Keras' layout, as files hold it: the layout a layer keeps inside may change between
        versions, what files hold does not (Conv2D's kernel differs)."""
        return a

    def from_keras_layout(self, name: str, a: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_keras_layout`."""
        return a

    def set_weights(self, weights: list[Any]) -> None:
        """Replace the weights; shapes must match :meth:`get_weights` (all are checked before
        any is replaced)."""
        self.assign_weights(self.checked_weights(weights))

    def checked_weights(self, weights: list[Any]) -> list[tuple[str, np.ndarray]]:
        """``weights`` as :meth:`get_weights` gives them, checked, as (name, host array in the
        layer's own layout) pairs for :meth:`assign_weights`."""
        self._require_built("set_weights")
        names = self.present_weight_names()
        if not isinstance(weights, list | tuple):
            # (one array was read as a list of its rows, None or a generator failed in len())
            raise InputError(f"layer {self.name!r} set_weights expects a list of arrays (as "
                             f"get_weights returns: {', '.join(names) or 'none'}), got "
                             f"{type(weights).__name__}{not_a_weight_list(weights)}")
        kept = without_num_batches_tracked(names, weights)
        if len(kept) != len(names):
            raise InputError(
                f"layer {self.name!r} expects {len(names)} weight arrays ({', '.join(names)}), "
                f"got {len(weights)}{weight_count_hint(names, weights, kept)}"
            )
        return [(n, self.checked_weight(n, weights[i])) for n, i in zip(names, kept, strict=True)]

    def checked_weight(self, name: str, w: Any) -> np.ndarray:
        """Weight ``name``'s new value ``w``, in Keras' layout, checked (its shape, a real
        dtype, no finite values the layer's dtype would turn into infinity), as a host array in
        the layer's own layout."""
        unconverted = _unconverted_torch_weight(w, self.keras_shape(name))
        if unconverted:
            warn(f"layer {self.name!r} weight {name!r}: {unconverted}", UserWarning)
        w = on_host(w, f"layer {self.name!r} weight {name!r}")  # (a torch Parameter detached)
        try:
            w = np.asarray(w)
        except (ValueError, TypeError) as e:  # (a ragged nested list: NumPy's bare error)
            raise InputError(f"layer {self.name!r} weight {name!r} must be an array of shape "
                             f"{self.keras_shape(name)}, got a {type(w).__name__} that is no "
                             f"array ({e})") from None
        shape = self.keras_shape(name)
        if tuple(w.shape) != shape:
            raise InputError(f"layer {self.name!r} weight {name!r} must have shape {shape}, "
                             f"got {tuple(w.shape)}{_torch_layout(shape, tuple(w.shape))}")
        if not real_numbers(np, w.dtype):
            raise InputError(f"layer {self.name!r} weight {name!r} must be real, got {w.dtype}")
        # Finite values the cast would turn into infinity are refused, as a model's build
        # refuses to round float64 weights (NaN and infinity given stay, as in Keras);
        # looked for only where w's dtype can hold them (no pass over float32 weights).
        largest = float(self.xp.finfo(self.dtype).max)
        wide = float(largest_value(np, w.dtype))
        flat = w.reshape(-1)  # (a user's scalar weight: a 0-d array takes no w[:0])
        finite = flat[np.isfinite(flat)] if wide > largest else flat[:0]
        peak = max(float(finite.max()), -float(finite.min())) if finite.size else 0.0
        if peak > largest:
            dtype = dtype_name(self.dtype)
            raise InputError(f"layer {self.name!r} weight {name!r} holds values beyond the "
                             f"range of {dtype}, the layer's dtype (up to {peak:.3g}; "
                             f"{dtype} ends at {largest:.3g}), which would become infinity")
        wrong = self.weight_problem(name, w)
        if wrong:
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) weight {name!r} "
                             f"{wrong}")
        return self.from_keras_layout(name, w)

    def weight_problem(self, name: str, w: np.ndarray) -> str | None:
        """What makes ``w`` (Keras' layout, on the host) no value for weight ``name`` beyond its
        shape and dtype, for a layer whose weights have a range (BatchNorm's variances); None
        where nothing does. Checked by ``set_weights`` and ``assign``, so by a file's load."""
        return None

    def assign_weights(self, checked: list[tuple[str, np.ndarray]]) -> None:
        """Replace the weights by :meth:`checked_weights`' pairs."""
        for n, w in checked:
            target = self.params if n in self.params else self.state
            target[n] = self.backend.asarray(w, dtype=self.dtype)

    def keras_shape(self, name: str) -> tuple[int, ...]:
        """The shape of weight ``name`` in Keras' layout."""
        stored = tuple(int(d) for d in self._arrays()[name].shape)
        return self.to_keras_layout(name, np.empty(stored, np.int8)).shape

    def count_params(self) -> int:
        """How many weights: parameters and state (BatchNorm's statistics), as Keras counts;
        refused before the layer is built (it has no weights yet: 0 would be wrong), as in
        Keras."""
        self._require_built("count_params")
        return int(sum(int(np.prod(a.shape)) for a in self._arrays().values()))

    def count_state(self) -> int:
        """How many of those weights are state, never trained (refused before a build)."""
        self._require_built("count_state")
        return int(sum(int(np.prod(a.shape)) for a in self.state.values()))

    def to(self, backend: Backend) -> None:
        """Move parameters and state to another backend (used by ``Model.to``)."""
        Layer.rebuilds += 1
        for store in (self.params, self.state):
            for n, a in store.items():
                store[n] = backend.asarray(self.backend.to_numpy(a))
        self.backend, self.xp = backend, backend.xp
        self.dtype = backend.dtype(dtype_name(self.dtype))
        self.compute_dtype = backend.dtype(dtype_name(self.compute_dtype))
        self.grads = {}
        self._clear_cache()

    def check_compute_dtype(self, xp: Any, dtype: Any) -> None:
        """Refuse computing in ``dtype`` (of namespace ``xp``), before a model compiled in
        another precision changes anything: here nothing is refused (Dropout refuses a rate
        the dtype rounds to 1)."""

    def set_compute_dtype(self, dtype: Any) -> None:
        """Run in ``dtype`` from now on (a model of these layers compiled in another
        precision), counted in :attr:`rebuilds` where that changes anything."""
        if self.compute_dtype != dtype:
            self.compute_dtype = dtype
            Layer.rebuilds += 1

    @property
    def _cache_weights(self) -> dict[str, Any] | None:
        """The model's casts of the weights for the forward pass running in this thread
        (see :meth:`compute_weight`), or None. Per thread: a model predicting in one thread
        while it trains in another casts its weights for each pass, and one pass's casts
        (made before an optimiser step, say) are no other's."""
        by_thread = vars(self).get("_cache_weights_by_thread")
        return by_thread.get(threading.get_ident()) if by_thread else None

    @_cache_weights.setter
    def _cache_weights(self, casts: dict[str, Any] | None) -> None:
        by_thread = vars(self).get("_cache_weights_by_thread")
        if by_thread is None:
            by_thread = self._cache_weights_by_thread = {}
        if casts is None:
            by_thread.pop(threading.get_ident(), None)
        else:
            by_thread[threading.get_ident()] = casts

    def compute_weight(self, name: str) -> Any:
        """Parameter ``name`` in ``compute_dtype`` (the parameter itself where that is its
        dtype): the model's cast of it for this forward pass where it made one (``_logits``
        casts every :attr:`casts_weights` layer's weights in one call), else one made here."""
        weight = self.params[name]
        if weight.dtype == self.compute_dtype:  # (no cast, and no per-thread lookup for it)
            return weight
        cast = self._cache_weights
        if cast is not None and name in cast:
            return cast[name]
        return self.xp.astype(weight, self.compute_dtype)

    def _clear_cache(self) -> None:
        """Drop what the last forward pass kept (arrays on the old device, a convolution's
        engine for the old geometry)."""
        for k in list(vars(self)):
            if k.startswith("_cache"):
                setattr(self, k, None)

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise InputError(f"layer {self.name!r} ({type(self).__name__}) must be built before "
                             f"{what}: its weights are made for its input shape; "
                             "layer.build(input_shape), per sample (e.g. (32, 32, 3)), or a "
                             "model built with it, builds it")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


# (help() and the checks of constructors (checks.untaken_settings) see Layer.__init__ as taking
# name and trainable alone: its **keras is there only to refuse Keras' keywords by name)
Layer.__init__.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
      for n, d, a in (("name", None, "str | None"), ("trainable", True, "bool")))],
    return_annotation=None)


class RandomLayer(Layer):
    """A layer that draws random numbers on the device.

    Its whole random state is ``random_state``, a device array [seed, draws so far] (see
    :mod:`xpcnn.ops.random`): the seed is drawn at build from the model's generator, and each
    training batch's draw reads the state and counts itself there, on the device. No host
    value changes from one step to the next, so a step can be captured in a CUDA graph and
    replayed; a checkpoint saves the two numbers (:attr:`seed`, :attr:`calls`) and resumes the
    exact same stream.

    Axis 0 of what it draws is the batch. In data-parallel training (:mod:`xpcnn.distributed`)
    ``batch_slice`` is ``(start, total)``: the batch is samples ``start:start + n`` of a global
    batch of ``total``, and the layer draws those samples' numbers of the global batch's draw,
    so that every sample gets the numbers it gets in one process.
    """

    def _build(self, input_shape: Shape, rng: np.random.Generator) -> Shape:
        self.random_state = self.backend.asarray(np.array([rng.integers(2**31), 0], np.int64))
        self.batch_slice: tuple[int, int] | None = None
        return input_shape

    @property
    def seed(self) -> int:
        return int(self.backend.to_numpy(self.random_state)[0])

    @property
    def calls(self) -> int:
        """How many batches drawn (read from the device: the host waits for it)."""
        return int(self.backend.to_numpy(self.random_state)[1])

    def set_random_state(self, seed: int, calls: int) -> None:
        """Resume the stream of ``seed`` after ``calls`` draws (written in place: a captured
        step goes on reading it)."""
        self.random_state[...] = self.backend.asarray(np.array([seed, calls], np.int64))

    def skip_draw(self) -> None:
        """Count a draw without drawing (a data-parallel rank with no sample in a batch)."""
        self.random_state[1:2] += 1

    def draws_in_training(self) -> bool:
        """Whether a training pass draws (and counts a draw) now: a data-parallel rank with no
        sample in a batch skips a draw only where it does (Dropout at rate 0 draws none)."""
        return True

    def _first(self, shape: tuple[int, ...]) -> int:
        """The draw's first element for a batch of ``shape`` (see ``batch_slice``)."""
        start = self.batch_slice[0] if self.batch_slice else 0
        return start * math.prod(shape[1:])

    def to(self, backend: Any) -> None:
        state = self.backend.to_numpy(self.random_state)
        super().to(backend)
        self.random_state = backend.asarray(state)


def _takes_trainable(init: Callable[..., Any]) -> Callable[..., Any]:
    """A layer class's ``__init__`` that takes ``trainable=`` too (keyword only), set once
    the constructor has run: a frozen layer from the start, as Keras' ``Dense(3,
    trainable=False)``."""
    @functools.wraps(init)
    def init_taking_trainable(self: Layer, *args: Any, trainable: Any = _UNSET, **kwargs: Any
                              ) -> None:
        if kwargs:  # (a Keras port's epsilon=, data_format=...: a clear error)
            kwargs = refuse_foreign_keywords(type(self), init, kwargs)
        init(self, *args, **kwargs)
        if "_name" not in vars(self):  # (else an AttributeError at the layer's first use)
            raise InputError(f"{type(self).__name__}.__init__ must call super().__init__() "
                             "(with name=..., as the layer's other settings allow), which "
                             "sets up the layer's name, params, grads and state")
        if trainable is not _UNSET:
            self.trainable = trainable  # (checked: a bool)

    init_taking_trainable._takes_trainable = True  # type: ignore[attr-defined]
    # (help() and named_parameters show it: keyword-only, before a **kwargs)
    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    at = next((k for k, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("trainable", inspect.Parameter.KEYWORD_ONLY,
                                        default=True, annotation="bool"))
    init_taking_trainable.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=params)
    return init_taking_trainable


def _writes_trainable(get_config: Callable[..., Any]) -> Callable[..., Any]:
    """A layer class's ``get_config`` that says ``"trainable": False`` where the layer is
    frozen."""
    @functools.wraps(get_config)
    def get_config_with_trainable(self: Layer) -> Any:
        return _with_trainable(self, get_config(self))

    get_config_with_trainable._writes_trainable = True  # type: ignore[attr-defined]
    return get_config_with_trainable


def _with_trainable(layer: Layer, config: Any) -> Any:
    # (only where False: the configurations of trainable layers, and so files, stay as they were)
    if isinstance(config, dict) and not vars(layer).get("trainable", True):
        return {**config, "trainable": False}
    return config


def _weights_are_read_only(layer: Layer, name: str) -> NoReturn:
    raise InputError(f"layer {layer.name!r} ({type(layer).__name__}): {name} is the list of its "
                     "weights that xpcnn makes from params and state, read-only as in Keras; "
                     "keep arrays of your own under another name (the trained ones in "
                     "self.params, named in weight_names)")


def _shape(shape: Any, layer: Layer) -> Shape | tuple[Shape, ...]:
    """A per-sample shape as a tuple of positive ints; a merge layer's, a tuple of those. A
    leading None (the batch axis, Keras' ``layer.build((None, 4))``) is dropped, as
    ``Model.build`` drops it."""
    given = shape
    if layer.multi_input and isinstance(shape, list | tuple) and \
            all(isinstance(s, list | tuple) for s in shape):
        shape = type(shape)(per_sample(s) for s in shape)
    elif not layer.multi_input:
        shape = per_sample(shape)
    shapes = shape if layer.multi_input and isinstance(shape, list | tuple) else [shape]
    for s in shapes:
        if not (isinstance(s, list | tuple) and s and all(
                isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in s)):
            what = "a list of per-sample shapes" if layer.multi_input else "a per-sample shape"
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) input_shape must be "
                             f"{what} of positive sizes such as (32, 32, 3), or (None, 32, 32, "
                             f"3) with the batch axis, got {given!r}")
    if layer.multi_input:
        return tuple(tuple(int(d) for d in s) for s in shape)
    return tuple(int(d) for d in shape)


def _output_shape(layer: Layer, shape: Any) -> Shape:
    """What ``layer``'s ``_build`` returned, checked: the output's per-sample shape (a bare
    TypeError from deep inside otherwise, a forgotten ``return`` the commonest)."""
    if isinstance(shape, list | tuple) and shape and all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in shape):
        return tuple(int(d) for d in shape)
    batch = (" (leave out the batch axis: its None is no per-sample size)"
             if isinstance(shape, list | tuple) and shape and shape[0] is None else "")
    raise InputError(f"layer class {type(layer).__name__}'s _build returned {shape!r}{batch}: "
                     "it must return the output's per-sample shape, a tuple of positive ints "
                     "such as (8, 8, 16) (input_shape itself where the shape is unchanged)")


def _held_layers(layer: Layer) -> list[str]:
    """The attributes of ``layer`` (or the items of lists, tuples and dicts in them, or the
    layers of a model in them) holding a built layer with arrays that are not ``layer``'s own
    params or state, by name; not one that a model holding ``layer`` holds too (a layer of
    the model read by another, as tied weights, which that model trains and saves)."""
    own = {id(a) for a in layer._arrays().values()}
    models = {id(m) for m in holders_of(layer)}
    seen: set[int] = set()  # (an attribute may hold itself: a tree's parent links)
    found: list[str] = []

    def look(value: Any, where: str) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        # (a model, told by its list of layers, this module below the model's: its layers are
        # not this layer's, as if held one by one)
        layers = getattr(value, "layers", None) if not isinstance(value, Layer) else None
        if isinstance(layers, list) and all(isinstance(la, Layer) for la in layers):
            for k, inner in enumerate(layers):
                look(inner, f"{where}.layers[{k}]")
        elif isinstance(value, Layer):
            if value is not layer and vars(value).get("built") and any(
                    id(a) not in own for a in value._arrays().values()) and \
                    not models & {id(m) for m in holders_of(value)}:
                found.append(where)
        elif isinstance(value, list | tuple):
            for k, item in enumerate(value):
                look(item, f"{where}[{k}]")
        elif isinstance(value, dict):
            for k, item in value.items():
                look(item, f"{where}[{k!r}]")

    for name, value in vars(layer).items():
        if name not in ("params", "grads", "state"):
            look(value, f"self.{name}")
    return found


def _one_axis_short(layer: Layer, x: Any) -> bool:
    """Whether batch ``x`` would build ``layer`` with one more axis in front (one sample)."""
    try:
        layer.unbuilt_copy().build(tuple(int(d) for d in x.shape), "cpu")
    except Exception:  # (a user's layer may refuse it otherwise: then no hint)
        return False
    return True


def _check_batch(layer: Layer, x: Any) -> None:
    """``layer(x)`` on a batch: for a merge layer, a list of two or more batches (built or
    not); for a built layer, arrays of the per-sample shape it is built for, and for a merge
    layer all of one batch size (a wrong one failed deep inside its kernels, or in NumPy)."""
    name = f"layer {layer.name!r} ({type(layer).__name__})"
    if layer.multi_input and not (isinstance(x, list | tuple) and len(x) >= 2):
        got = f"a list of {len(x)}" if isinstance(x, list | tuple) else f"one {type(x).__name__}"
        raise InputError(f"{name} merges a list of two or more batches (or of symbolic "
                         f"tensors, in a functional model), got {got}")
    if not layer.built or layer.provisional:
        return  # (forward asks for a build; a provisional layer's is for its batch)
    batch = list(x) if layer.multi_input else [x]
    expected = list(layer.input_shape) if layer.multi_input else [layer.input_shape]
    if [tuple(a.shape[1:]) if hasattr(a, "shape") else None for a in batch] != expected:
        got = ", ".join(f"shape {tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
                        for a in batch)
        raise InputError(f"{name} is built for batches (N, *per-sample shape) of per-sample "
                         f"shape {', '.join(map(str, expected))}, got {got}")
    sizes = [int(a.shape[0]) for a in batch]
    if len(set(sizes)) > 1:
        raise InputError(f"{name} merges batches of sizes {sizes}: its inputs are batches of "
                         "the same samples, of one size N each")


def refuse_other_weight_shapes(layer: Layer, probe: Layer, shape: Any) -> None:
    """Refuse inputs of per-sample ``shape`` for built ``layer`` where ``probe``, its unbuilt
    copy built for them, has weights of other shapes (a Dense given other features): a layer
    keeps its weights, so neither a model's build nor a call on a symbolic tensor takes them."""
    wanted = [probe.keras_shape(n) for n in probe.present_weight_names()]
    has = [layer.keras_shape(n) for n in layer.present_weight_names()]
    if wanted != has:
        raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) holds weights for "
                         f"inputs of shape {layer.input_shape}, and inputs of shape "
                         f"{tuple(shape)} need weights of other shapes ({wanted}, it has "
                         f"{has}): a layer keeps its weights; use a new "
                         f"{type(layer).__name__}(...) for these inputs")


def _other_shape(layer: Layer, x: Any) -> bool:
    """Whether batch ``x`` has another per-sample shape than ``layer`` is built for."""
    return tuple(getattr(x, "shape", (None,))[1:]) != layer.input_shape


# Guards the passes of users' layers in several threads (see _user_passes): notified as an
# inference pass leaves a layer. One for all layers: its holds are a few instructions.
_PASSES_OF_USERS_LAYERS = threading.Condition()

#: how long a waiting training pass sleeps before it looks again (a Ctrl-C lands between waits)
_POLL = 0.05

# (how many training passes of users' layers wait for inference passes: see waiting_passes)
_waiting = 0


def waiting_passes() -> int:
    """How many training passes of users' layers wait for another thread's inference pass
    running on the layer (for tests, as :meth:`xpcnn.passes.PassLock.waiting`)."""
    return _waiting


def _marks_training_pass(forward: Callable[..., Any], users: bool = False
                         ) -> Callable[..., Any]:
    """``forward`` checked for a built layer and marking a training pass for its backward;
    for a user's class (``users``) also keeping what that pass binds for its backward from
    another thread's inference pass (see :func:`_user_passes`). xpcnn's own classes get the
    plain wrapper: they pay no call for that protection."""
    if users:
        @functools.wraps(forward)
        def users_checked(self: Layer, x: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.built:
                _unbuilt(self)
            return _user_passes(forward, self, x, kwargs.get("training", args[0] if args
                                                             else False), args, kwargs)

        return users_checked

    @functools.wraps(forward)
    def checked(self: Layer, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.built:
            _unbuilt(self)
        # An inference pass leaves the training pass's flag (and its caches: each layer's
        # forward keeps them only in training) alone: another thread may predict with the
        # model while it trains, between a training pass and its backward.
        if not kwargs.get("training", args[0] if args else False):
            return forward(self, x, *args, **kwargs)
        self._backward_ready = False
        y = forward(self, x, *args, **kwargs)
        # (a pass told to keep nothing for backward, Options.keep_for_backward, has none)
        options = kwargs.get("options", args[1] if len(args) > 1 else None)
        self._backward_ready = getattr(options, "keep_for_backward", True)
        return y

    return checked


def _unbuilt(layer: Layer) -> NoReturn:
    raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) must be built before "
                     "it runs on a batch: layer.build(input_shape), per sample (e.g. "
                     "(32, 32, 3)), or use it in a model, which builds it")


def _training_pass(forward: Callable[..., Any], layer: Layer, x: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    """``forward`` in training, ``_backward_ready`` for one backward once it returns."""
    layer._backward_ready = False
    y = forward(layer, x, *args, **kwargs)
    # (a pass told to keep nothing for backward, Options.keep_for_backward, has none)
    options = kwargs.get("options", args[1] if len(args) > 1 else None)
    layer._backward_ready = getattr(options, "keep_for_backward", True)
    return y


# The users' layers whose training pass waits for its backward (``_pending_backward``, the
# marking thread's id): a step that stops before the backward clears the marks its thread set
# (end_training_passes). Weak: a layer dropped while marked is not kept.
_MARKED: weakref.WeakSet[Layer] = weakref.WeakSet()


def _slot_names(cls: type) -> list[str]:
    """The slots (``__slots__``, as stored: private names mangled) of ``cls`` and its bases."""
    return [name for c in cls.__mro__ for name, v in vars(c).items()
            if isinstance(v, types.MemberDescriptorType) and v.__objclass__ is c
            and name not in ("__dict__", "__weakref__")]


def _own(value: Any) -> Any:
    """``value`` for an inference pass's copy of a layer: a dict, list or set copied (one
    level: its items are shared), so that the pass's ``self.cache["x"] = x`` or
    ``self.seen.append(x)`` is the copy's; anything else as it is."""
    return copy.copy(value) if isinstance(value, dict | list | set) else value


def _inference_copy(layer: Layer) -> Layer:
    """A throwaway copy of ``layer`` for an inference pass: its attributes and slots (not
    through ``copy.copy``, which runs a user's ``__copy__`` or ``__reduce_ex__``), containers
    copied one level (:func:`_own`)."""
    view = object.__new__(type(layer))
    vars(view).update({k: _own(v) for k, v in vars(layer).items()})
    for name in _slot_names(type(layer)):
        try:
            value = getattr(layer, name)
        except AttributeError:  # (a slot never set)
            continue
        setattr(view, name, _own(value))
    return view


def _user_passes(forward: Callable[..., Any], layer: Layer, x: Any, training: Any,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A user's layer's ``forward``, which may keep what its backward needs in every pass
    (``self._x = x``): from a training pass to its backward (``_pending_backward``), an
    inference pass (another thread's predict) runs on a copy of the layer
    (:func:`_inference_copy`), so that what it binds is the copy's, not what the backward
    reads; a training pass first waits for the inference passes of other threads running on
    the layer itself."""
    global _waiting
    me = threading.get_ident()
    state = vars(layer)
    if not training:
        with _PASSES_OF_USERS_LAYERS:
            pending = layer._pending_backward
            if not pending:
                running = state.setdefault("_inference_passes", {})
                running[me] = running.get(me, 0) + 1
        if pending:
            return forward(_inference_copy(layer), x, *args, **kwargs)
        try:
            return forward(layer, x, *args, **kwargs)
        finally:
            with _PASSES_OF_USERS_LAYERS:
                running[me] -= 1
                if not running[me]:
                    del running[me]
                _PASSES_OF_USERS_LAYERS.notify_all()
    with _PASSES_OF_USERS_LAYERS:
        # (first: the inference passes starting from now run on copies, so that a server's
        # threads, one in the layer at all times, cannot keep the training pass waiting)
        layer._pending_backward = me
        _MARKED.add(layer)
        while any(t != me for t in state.get("_inference_passes", ())):
            _waiting += 1
            try:
                _PASSES_OF_USERS_LAYERS.wait(_POLL)
            finally:
                _waiting -= 1
    try:
        return _training_pass(forward, layer, x, args, kwargs)
    finally:
        if not layer._backward_ready:  # (refused, or told to keep nothing: no backward comes)
            _backward_done(layer)


def _backward_done(layer: Layer) -> None:
    """The training pass of a user's layer is over: inference passes run on it again."""
    with _PASSES_OF_USERS_LAYERS:
        layer._pending_backward = 0
        _MARKED.discard(layer)


def end_training_passes() -> None:
    """A training step of this thread stopped before its backward had run for every user's
    layer its forward ran (an error, Ctrl-C): their inference passes run on them again, not on
    copies (where what a pass records, for a figure say, was lost)."""
    me = threading.get_ident()
    with _PASSES_OF_USERS_LAYERS:
        for layer in [la for la in _MARKED if la._pending_backward == me]:
            layer._pending_backward = 0
            _MARKED.discard(layer)


def _needs_training_pass(backward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(backward)
    def checked(self: Layer, dy: Any, *args: Any, **kwargs: Any) -> Any:
        ran = vars(self).get("_backward_ran")  # (the passes run in this backward, outermost)
        if ran is not None and backward not in ran:  # (a subclass's backward calling its base
            ran.add(backward)  # class's: each class's pass once for one forward)
            return backward(self, dy, *args, **kwargs)
        if not getattr(self, "_backward_ready", False):
            raise InputError(
                f"layer {self.name!r}: backward() needs a forward(x, training=True) before it "
                "(a layer keeps what its gradient needs only in training, for one backward, "
                "and not where its options say keep_for_backward=False; a subclass's "
                "backward calls super().backward once)"
            )
        self._backward_ready = False
        self._backward_ran = {backward}
        try:
            return backward(self, dy, *args, **kwargs)
        finally:
            del self._backward_ran
            if self._pending_backward:  # (a user's layer's; an attribute read for xpcnn's own)
                _backward_done(self)

    return checked
