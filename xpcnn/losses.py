"""Softmax cross-entropy, fused with the softmax for stability and a simple gradient."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import InputError
from .ops.softmax import log_softmax


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
        if y.ndim == 1:
            y = xp.astype(xp.reshape(y, (-1, 1)) == xp.arange(classes, device=y.device), dtype)
        else:
            y = xp.astype(y, dtype, copy=False)
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        return y

    def forward(self, xp: Any, logits: Any, y: Any, dtype: Any) -> tuple[Any, Any]:
        """Returns (loss as a 0-d array, gradient with respect to ``logits``), both computed in
        ``dtype`` (float32 under mixed precision)."""
        z = xp.astype(logits, dtype, copy=False)
        n, classes = z.shape
        t = self.targets(xp, y, classes, z.dtype)
        logp = log_softmax(xp, z)
        loss = -xp.sum(t * logp) / n
        grad = (xp.exp(logp) - t) / n
        return loss, grad


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
