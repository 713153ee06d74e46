"""The structure a model must have, checked when it is built, whatever builds it (a chain of
layers or a graph): a malformed model is refused there with what is wrong and where, rather than
failing deep inside the ops or computing the wrong thing silently."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError
from .layers import Layer, Softmax
from .layers.base import Shape


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


def check_classifier(layers: Sequence[Layer], output_shapes: Sequence[Shape]) -> None:
    """Refuse, before training or evaluating (or predicting, where it ends in a Softmax), a
    model whose output (the last of the layers' per-sample ``output_shapes``) is not one vector
    of at least 2 class scores. (A model that only transforms images, a feature extractor, may
    end anywhere: ``predict`` and ``forward`` return its output.)"""
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
