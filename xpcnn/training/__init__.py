"""Training, evaluation and prediction: :class:`Trainer`, the base class of :class:`xpcnn.Model`
(as in Keras 3), in three modules:

* :mod:`xpcnn.training.trainer`: :class:`Trainer`, with ``compile`` (and :data:`PRECISIONS`),
  the batch sources, ``fit``, ``evaluate`` and ``predict``;
* :mod:`xpcnn.training.step`: :class:`TrainingStep`, Trainer's base class: one training step
  on the device (checked, with the class weights, captured in a CUDA graph where it can be),
  the ``*_on_batch`` methods, the running totals the host reads behind the steps and the
  errors those steps deferred;
* :mod:`xpcnn.training.arguments`: the module-level helpers of fit's, evaluate's and predict's
  arguments and loops.

Imports run down this list: ``trainer`` imports ``step`` and ``arguments``, ``step`` imports
``arguments``.
"""

from .step import TrainingStep
from .trainer import PRECISIONS, Trainer

__all__ = ["PRECISIONS", "Trainer", "TrainingStep"]
