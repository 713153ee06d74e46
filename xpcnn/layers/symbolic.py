"""The functional API's placeholders: a :class:`SymbolicTensor` stands for a batch, and each
call of a layer on symbolic tensors is a :class:`Node` that makes one (Keras' inbound nodes).
:func:`xpcnn.graph.trace` reads a model's graph from them."""

from __future__ import annotations

import itertools
import numbers
import weakref
from typing import Any, NoReturn

from ..errors import InputError
from .arguments import Shape


class SymbolicTensor:
    """A placeholder for a batch in the functional API: its ``sample_shape`` (``shape`` with
    the batch axis, None, as in Keras) and the :class:`Node` that makes it (None for an
    :func:`xpcnn.Input`)."""

    def __init__(self, shape: Shape, node: Node | None = None, name: str = "input") -> None:
        self.sample_shape = tuple(int(d) for d in shape)
        self.node = node
        self.name = name
        #: for the input of a built model's own graph (a Sequential's, a loaded model's), that
        #: model's name: an error names it where its layers' outputs meet another input
        self.model: str | None = None
        #: the input of a graph a model made when it was built again for another input shape
        #: (model.build): an error where its tensors meet another graph's says so
        self.rebuilt = False

    @property
    def shape(self) -> tuple[int | None, ...]:
        """The batch's shape, as in Keras: ``(None, *sample_shape)``."""
        return (None, *self.sample_shape)

    def __repr__(self) -> str:
        return f"<SymbolicTensor {self.name!r} shape={self.shape}>"

    # Keras 3's operators on symbolic tensors (its residual ``x = x + y``): a graph here is of
    # layers only, so each is refused naming the layer that does it (was a bare TypeError).
    def __add__(self, other: Any) -> NoReturn:
        _refuse_operator("+", other, "Add()([a, b])", "Rescaling(1.0, offset=c)(a)")

    def __radd__(self, other: Any) -> NoReturn:
        _refuse_operator("+", other, "Add()([b, a])", "Rescaling(1.0, offset=c)(a)", True)

    def __sub__(self, other: Any) -> NoReturn:
        _refuse_operator("-", other, "Add()([a, Rescaling(-1.0)(b)])",
                         "Rescaling(1.0, offset=-c)(a)")

    def __rsub__(self, other: Any) -> NoReturn:
        _refuse_operator("-", other, "Add()([b, Rescaling(-1.0)(a)])",
                         "Rescaling(-1.0, offset=c)(a)", True)

    def __mul__(self, other: Any) -> NoReturn:
        _refuse_operator("*", other, None, "Rescaling(c)(a)")

    def __rmul__(self, other: Any) -> NoReturn:
        _refuse_operator("*", other, None, "Rescaling(c)(a)", True)

    def __truediv__(self, other: Any) -> NoReturn:
        _refuse_operator("/", other, None, "Rescaling(1 / c)(a)")

    def __neg__(self) -> NoReturn:
        raise InputError(f"-a on a symbolic tensor (Keras 3's operator): {_LAYERS_ONLY}; write "
                         "Rescaling(-1.0)(a)")

    def __getitem__(self, index: Any) -> NoReturn:
        raise InputError(f"{self!r}[{index!r}] (Keras 3's slicing): {_LAYERS_ONLY}, and "
                         f"xpcnn has no layer that slices; {_OWN_LAYER}")

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        # (np.asarray made a 0-d object array of it, which failed far from here)
        raise InputError(f"{self!r} holds no values: it stands for a batch in a functional "
                         "model's graph; model.predict(x) gives a model's values, and "
                         "xpcnn.Model(model.input, layer.output).predict(x) a layer's")


class Node:
    """One call of a layer on symbolic tensors, and the ``output`` tensor it makes, of
    per-sample ``shape``. ``order`` is the order of the calls, a topological order of any graph
    they form (a node is made after its inputs)."""

    _counter = itertools.count()

    def __init__(self, layer: Any, inputs: tuple[SymbolicTensor, ...], multi: bool,
                 shape: Shape) -> None:
        self.layer = layer
        self.inputs = inputs
        self.multi = multi  # the layer takes a list (a merge layer)
        self.order = next(Node._counter)
        self.output = SymbolicTensor(shape, self, layer.name)
        #: the model whose graph this call is, in its layer's inbound nodes (the model that
        #: recorded it, or the first traced from it, see ``Model._use_symbolic``), held
        #: weakly; None: no model's. An extractor traced later from it shares it, and leaves
        #: it where it is when built for other inputs.
        self.owner: weakref.ref[Any] | None = None


_LAYERS_ONLY = "a functional model's tensors are transformed by layers only"
#: A computation no built-in layer does, in a graph.
_OWN_LAYER = ("write it as a layer of your own (a Layer subclass with build, forward and "
              "backward, as the README's layers contract says)")


def _refuse_operator(op: str, other: Any, tensors: str | None, number: str,
                     reflected: bool = False) -> NoReturn:
    """Keras 3's operator ``op`` on a symbolic tensor ``a`` and ``other``, a tensor ``b`` or a
    number ``c`` (on its left where ``reflected``): the layer that does it (``tensors`` or
    ``number``; None where none does)."""
    if isinstance(other, SymbolicTensor):
        name = "b"
        way = f"write {tensors}" if tensors else f"xpcnn has no layer for it: {_OWN_LAYER}"
    elif isinstance(other, numbers.Real):
        name, way = "c", f"write {number}, with c = {other!r}"
    else:
        name, way = "x", f"layers take symbolic tensors, not {type(other).__name__}"
    written = f"{name} {op} a" if reflected else f"a {op} {name}"
    raise InputError(f"{written} on a symbolic tensor (Keras 3's operator): {_LAYERS_ONLY}; "
                     f"{way}")


def is_symbolic(x: Any) -> bool:
    """True for a symbolic tensor or a non-empty list of them."""
    if isinstance(x, list | tuple):
        return bool(x) and all(isinstance(t, SymbolicTensor) for t in x)
    return isinstance(x, SymbolicTensor)


def refuse_training_in_graph(what: str, training: bool | None) -> None:
    """A layer or model called on a symbolic tensor takes no ``training=`` (Keras' way to fix
    a layer's mode): the mode is the pass's, so one given is refused rather than ignored."""
    if training is not None:
        raise InputError(f"{what} called on a symbolic tensor with training={training!r}: a "
                         "graph does not record it, fit runs every layer in training mode and "
                         "predict in inference mode (a frozen layer, layer.trainable = False, "
                         "keeps a BatchNorm2D in inference mode while training)")
