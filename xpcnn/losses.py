"""Softmax cross-entropy, fused with the softmax for stability and a simple gradient."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import InputError
from .ops.softmax import cross_entropy, loss_and_correct, nan_unless_classes, target_rows


class SoftmaxCrossEntropy:
    """Mean cross-entropy between softmax(logits) and integer or one-hot targets.

    Computed from log-softmax (log-sum-exp), so it never overflows; the gradient with respect to
    the logits is (softmax - target) / N. ``label_smoothing`` = e mixes the targets with the
    uniform distribution: target * (1 - e) + e / classes.
    """

    name = "cross_entropy"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
                or not 0.0 <= label_smoothing < 1.0):
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {"label_smoothing": self.label_smoothing}

    def targets(self, xp: Any, y: Any, classes: int, dtype: Any) -> Any:
        """Integer labels (N,) or one-hot rows (N, classes) -> smoothed probability rows."""
        return target_rows(xp, y, classes, dtype, self.label_smoothing)

    def forward(self, xp: Any, logits: Any, y: Any, dtype: Any, weights: Any = None
                ) -> tuple[Any, Any]:
        """Returns (loss as a 0-d array, gradient with respect to ``logits``), both computed in
        ``dtype`` (float32 under mixed precision). ``weights`` (N,): each sample's share of
        the loss, as Keras' ``sample_weight`` (the weighted sum divided by N)."""
        z = xp.astype(logits, dtype, copy=False)
        return cross_entropy(xp, z, self.targets(xp, y, z.shape[1], z.dtype), weights)

    def forward_with_accuracy(self, xp: Any, logits: Any, y: Any, dtype: Any,
                              kernels: Any, scale: Any = None, weights: Any = None
                              ) -> tuple[Any, Any]:
        """:meth:`forward` with the count of rows predicted right (first maximum at the target's
        class): ([loss, count] as one (2,) float32 or float64 array, gradient). Integer labels
        go to ``kernels`` (on a GPU one launch instead of ~20). A target that names no class
        (a label out of range, a one-hot row that is no probabilities) makes the loss NaN, on
        the device: the step is skipped as a non-finite one, never trained on a wrong loss.
        With ``scale`` (the float16 loss-scaling state, on the device), the gradient is of the
        loss times ``scale[0]`` (on a GPU in the same launch). The gradient is given in the
        logits' dtype (float16 under mixed precision, cast on a GPU in the same launch).
        ``weights`` (N,) weigh the loss (:meth:`forward`), not the count: accuracy stays the
        share of samples predicted right, as Keras' ``metrics`` (not ``weighted_metrics``)."""
        if y.ndim == 1 and weights is None:  # (the kernels cast the logits, on a GPU in the
            # same launch)
            return kernels.softmax_cross_entropy(logits, y, self.label_smoothing, scale, dtype)
        z = xp.astype(logits, dtype, copy=False)
        loss, grad = self.forward(xp, z, y, dtype, weights)
        stats = nan_unless_classes(xp, loss_and_correct(xp, loss, z, y), y, z.shape[1])
        grad = grad if scale is None else grad * scale[0]
        return stats, xp.astype(grad, logits.dtype, copy=False)


LOSSES = {"cross_entropy": SoftmaxCrossEntropy,
          "categorical_crossentropy": SoftmaxCrossEntropy,
          "sparse_categorical_crossentropy": SoftmaxCrossEntropy}


def get_loss(loss: str | SoftmaxCrossEntropy) -> SoftmaxCrossEntropy:
    if isinstance(loss, SoftmaxCrossEntropy):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]()
    raise InputError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)} "
                     "or a SoftmaxCrossEntropy instance")
