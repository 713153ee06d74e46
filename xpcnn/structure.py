"""The structure a model must have, checked when it is built, whatever builds it (a chain of
layers or a graph): a malformed model is refused there with what is wrong and where, rather than
failing deep inside the ops or computing the wrong thing silently."""

from __future__ import annotations

from collections.abc import Sequence

from . import checks
from .errors import InputError
from .layers import Layer, Softmax
from .layers.arguments import Shape


def check_structure(layers: Sequence[Layer]) -> None:
    """Refuse, when a model is built, layers (in the order they run) that hold

    - a layer instance used twice (a layer holds one set of weights and keeps one forward pass
      for its backward);
    - a Softmax before the end (it turns the output scores into probabilities; the loss applies
      it in training, so it belongs only at the output), or a layer with a softmax activation
      there (``Dense(activation="softmax")``), for the same reason.
    """
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if id(layer) in seen:
            raise InputError(f"{where(layer, i, layers)} is also the model's layer "
                             f"{seen[id(layer)] + 1}: the same layer instance is used twice; "
                             f"create another {type(layer).__name__}(...) for the second place")
        seen[id(layer)] = i
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, Softmax) or layer.softmax_output:
            what = "a Softmax" if isinstance(layer, Softmax) else "its softmax activation"
            raise InputError(f"{where(layer, i, layers)} is not the last layer: {what} "
                             "turns the output scores into probabilities and belongs only at the "
                             "end of the model (training applies it inside the loss)")


def final_softmax(layers: Sequence[Layer]) -> str | None:
    """How the last of ``layers`` ends the model in a softmax left to the loss: "layer", a
    Softmax layer the plan leaves out; "activation", a softmax activation the plan has the
    layer leave out (``Options.logits``); None for any other last layer. Only xpcnn's own
    passes are taken over (the rule of the plan's fusion, :func:`xpcnn.graph.compile_plan`):
    a user's subclass overriding ``forward`` or ``backward`` runs as written. (By class: a
    test's probe wrapping an instance's own passes changes nothing.)"""
    last = layers[-1]
    cls = type(last)
    if isinstance(last, Softmax):
        own = all(checks.defining_class(cls, m) is Softmax for m in ("forward", "backward"))
        return "layer" if own else None
    activation = checks.defining_class(cls, "softmax_output")
    if last.softmax_output and all(checks.defining_class(cls, m) is activation
                                   for m in ("forward", "backward")):
        return "activation"
    return None


def check_final_softmax(layers: Sequence[Layer]) -> None:
    """Refuse, for the loss, a model whose last layer, a user's subclass, computes its softmax
    itself (see :func:`final_softmax`): the loss would take those probabilities as logits."""
    last = layers[-1]
    if not (isinstance(last, Softmax) or last.softmax_output) or final_softmax(layers):
        return
    base = next(c for c in type(last).__mro__ if checks.of_xpcnn(c.__module__))
    fix = ("a layer of yours giving the logits, z / T say, then a plain Softmax()"
           if isinstance(last, Softmax) else "activation=None, then a Softmax()")
    raise InputError(f"{where(last, len(layers) - 1, layers)} computes its softmax in "
                     f"its class's own forward or backward (overriding {base.__name__}'s): "
                     "the loss, softmax cross-entropy on the logits, cannot take it over, "
                     "and would take its probabilities as logits (a softmax applied twice)."
                     f" Train a model ending in logits ({fix}) and predict with this one")


def check_classifier(layers: Sequence[Layer], output_shapes: Sequence[Shape]) -> None:
    """Refuse, before training or evaluating (or predicting, where it ends in a Softmax), a
    model whose output (the last of the layers' per-sample ``output_shapes``) is not one vector
    of at least 2 class scores, or which :func:`check_final_softmax` refuses.
    (A model that only transforms images, a feature extractor, may end anywhere: ``predict``
    and ``forward`` return its output.)"""
    check_final_softmax(layers)
    last, shape = layers[-1], tuple(output_shapes[-1])
    if len(shape) != 1:
        raise InputError(f"the model's output has per-sample shape {shape}, from "
                         f"{where(last, len(layers) - 1, layers)}: a classifier ends in one "
                         "vector of class scores, (classes,): add Flatten() or "
                         "GlobalAvgPool2D(), then Dense(classes), after it")
    if shape[0] < 2:
        raise InputError(f"the model's output has {shape[0]} class score per sample, from "
                         f"{where(last, len(layers) - 1, layers)}: a classifier needs at least "
                         "2 classes (Dense(classes) with classes >= 2)")


def where(layer: Layer, i: int, layers: Sequence[Layer]) -> str:
    """How an error names ``layer``, the model's layer ``i`` of ``layers``: by its name, its
    class and its place."""
    return f"layer {layer.name!r} ({type(layer).__name__}, {i + 1} of {len(layers)})"
