"""Numerically stable softmax, log-softmax and softmax cross-entropy over the last axis, and the
check, on the device, that every target names a class (the loss is NaN where one does not)."""

from __future__ import annotations

from typing import Any


def log_softmax(xp: Any, z: Any) -> Any:
    """log(softmax(z)) computed as z - max - log(sum(exp(z - max))): never overflows."""
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(xp: Any, z: Any) -> Any:
    """exp(z - max) normalised: never overflows."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def softmax_backward(xp: Any, y: Any, dy: Any) -> Any:
    """The gradient through a softmax whose output was ``y``: y * (dy - sum(dy * y))."""
    return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True))


def target_rows(xp: Any, y: Any, classes: int, dtype: Any, smoothing: float = 0.0) -> Any:
    """Integer labels (N,) or one-hot rows (N, classes) -> probability rows, mixed with the
    uniform distribution by ``smoothing``: target * (1 - smoothing) + smoothing / classes."""
    if y.ndim == 1:
        y = xp.astype(xp.reshape(y, (-1, 1)) == xp.arange(classes, device=y.device), dtype)
    else:
        y = xp.astype(y, dtype, copy=False)
    if smoothing:
        y = y * (1.0 - smoothing) + smoothing / classes
    return y


def targets_are_classes(xp: Any, y: Any, classes: int) -> Any:
    """Whether every target names a class, as a 0-d bool array computed on the device (no host
    wait): integer labels in [0, classes), one-hot rows >= 0 that sum to 1 (as
    :func:`xpcnn.checks.as_labels` asks of host labels). Any other target would match no class
    and give a wrong, finite loss: the losses below make it NaN instead."""
    if y.ndim == 2:
        sums = xp.sum(y, axis=1)
        return xp.logical_and(xp.all(y >= 0), xp.all(xp.abs(sums - 1) <= 1e-3))
    ok = y >= 0
    if xp.iinfo(y.dtype).max >= classes:  # (else every value of the dtype is a class)
        ok = xp.logical_and(ok, y < classes)
    return xp.all(ok)


def nan_unless_classes(xp: Any, stats: Any, y: Any, classes: int) -> Any:
    """``stats`` where every target of ``y`` names a class (:func:`targets_are_classes`), else
    NaN: the training step is then skipped as a non-finite one, and the host names the
    targets when it reads the step's totals."""
    nan = xp.full((), xp.nan, dtype=stats.dtype, device=stats.device)
    return xp.where(targets_are_classes(xp, y, classes), stats, nan)


def cross_entropy(xp: Any, z: Any, t: Any, weights: Any = None) -> tuple[Any, Any]:
    """(loss, gradient) of softmax(z) against probability rows ``t`` (N, classes): the mean
    cross-entropy, a 0-d array, and its gradient with respect to ``z``, (softmax(z) - t) / N.
    With ``weights`` (N,), row i's term is multiplied by weights[i], still divided by N (Keras'
    "sum over batch size")."""
    n = z.shape[0]
    logp = log_softmax(xp, z)
    if weights is None:
        return nll(xp, logp, t), (xp.exp(logp) - t) / n
    w = xp.astype(weights, z.dtype, copy=False)
    return nll(xp, logp, t, w), xp.reshape(w, (-1, 1)) * ((xp.exp(logp) - t) / n)


def nll(xp: Any, logp: Any, t: Any, weights: Any = None) -> Any:
    """Mean over the N rows of -sum(t * logp) (a 0-d array), the loss of :func:`cross_entropy`
    and of a loss object called on probabilities; with ``weights`` (N,), of ``logp``'s dtype,
    row i's term is multiplied by weights[i], still divided by N."""
    # A zero target contributes 0, not 0 * log(0) = NaN: a logit of -inf (or so far below the
    # row's maximum that z - max overflows) has probability 0 and a finite loss, as in
    # PyTorch. (A +inf or NaN logit still makes every log-probability of its row NaN.)
    terms = t * xp.where(t != 0, logp, xp.zeros_like(logp))  # (no 0 * -inf computed)
    if weights is not None:
        terms = xp.reshape(weights, (-1, 1)) * terms
    return (0.0 - xp.sum(terms)) / logp.shape[0]  # (0.0 - : a zero loss is 0.0, not -0.0)


def loss_and_correct(xp: Any, loss: Any, z: Any, y: Any) -> Any:
    """[loss, how many rows of ``z`` have their first maximum at the target's class (integer
    labels or one-hot rows)] as one (2,) array (float32, or float64 for float64 ``z``): the
    host reads both with one transfer."""
    labels = y if y.ndim == 1 else xp.argmax(y, axis=1)
    acc = xp.float64 if z.dtype == xp.float64 else xp.float32
    correct = xp.sum(xp.astype(xp.argmax(z, axis=1) == labels, acc))
    return xp.stack([xp.astype(loss, acc), correct])


def top_k_counts(xp: Any, z: Any, y: Any, ks: tuple[int, ...], dtype: Any) -> Any:
    """For each ``k`` of ``ks``, how many rows of ``z`` have their target's score among the
    ``k`` largest: fewer than ``k`` scores of the row strictly greater than the target's (ties
    at the boundary count as in, as TensorFlow's ``in_top_k``), and the target's finite (a NaN
    or infinite one never counts; a NaN elsewhere is greater than nothing, as Keras' rule on
    JAX, where TensorFlow's counts no row with a score that is not finite). The
    target is an integer label (N,) or a one-hot row's first largest entry (N, classes); one
    that names no class never counts. A (len(ks),) array of ``dtype``, standard operations
    only, with no host read (each ``k`` a Python int: nothing crosses to the device, which a
    captured CUDA graph could not record)."""
    labels = y if y.ndim == 1 else xp.argmax(y, axis=1)
    hit = xp.reshape(labels, (-1, 1)) == xp.arange(z.shape[1], device=z.device)
    # (where, not a product with the one-hot mask: an infinite score elsewhere times 0 is NaN)
    target = xp.sum(xp.where(hit, z, xp.zeros_like(z)), axis=1, keepdims=True)
    greater = xp.sum(xp.astype(z > target, xp.int32), axis=1)
    counted = xp.logical_and(xp.isfinite(target[:, 0]), xp.any(hit, axis=1))
    # (k beyond the classes means all of them: compared as such, it stays in int32's range)
    return xp.stack([xp.sum(xp.astype(xp.logical_and(counted, greater < min(k, z.shape[1])),
                                      dtype)) for k in ks])
