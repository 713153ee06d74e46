"""Training, evaluation and prediction: :class:`Trainer`, the base class of :class:`xpcnn.Model`
(as in Keras 3), in three modules:

* :mod:`xpcnn.training.trainer`: :class:`Trainer`, with ``compile`` (its precisions are
  :data:`xpcnn.backend.PRECISIONS`), the batch sources, ``fit``, ``evaluate``, ``predict`` and
  their one-batch forms ``test_on_batch`` and ``predict_on_batch``;
* :mod:`xpcnn.training.step`: ``TrainingStep``, Trainer's base class: one training step on the
  device (checked, with the class weights, captured in a CUDA graph where it can be),
  ``train_on_batch``, the running totals the host reads behind the steps and the errors those
  steps deferred;
* :mod:`xpcnn.training.arguments`: the module-level helpers of fit's, evaluate's and predict's
  arguments and loops.

Imports run down this list: ``trainer`` imports ``step`` and ``arguments``.
"""

from .trainer import Trainer

__all__ = ["Trainer"]
