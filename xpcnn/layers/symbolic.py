"""The functional API's placeholders: a :class:`SymbolicTensor` stands for a batch, and each
call of a layer on symbolic tensors is a :class:`Node` that makes one (Keras' inbound nodes).
:func:`xpcnn.graph.trace` reads a model's graph from them."""

from __future__ import annotations

import itertools
from typing import Any

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

    @property
    def shape(self) -> tuple[int | None, ...]:
        """The batch's shape, as in Keras: ``(None, *sample_shape)``."""
        return (None, *self.sample_shape)

    def __repr__(self) -> str:
        return f"<SymbolicTensor {self.name!r} shape={self.shape}>"


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
