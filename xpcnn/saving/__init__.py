"""Saving: model files and checkpoints, as .npz files of plain arrays read without pickle.

- :mod:`.npz`: bounded reading (nothing inflated that the format has no place for, nothing
  beyond the size it implies) and writing (atomically, through :mod:`xpcnn.files`);
- :mod:`.model_file`: ``save_model`` / ``load_model`` / ``load_weights``, rebuilding models
  through the layer and model registries (nothing here imports :mod:`xpcnn.model`);
- :mod:`.checkpoint`: the whole training state, for an exact resume.
"""

from .checkpoint import Checkpoint, load_checkpoint, restore_checkpoint, save_checkpoint
from .model_file import MODEL_TYPES, load_model, load_weights, register_model, save_model

__all__ = [
    "MODEL_TYPES", "Checkpoint", "load_checkpoint", "load_model", "load_weights", "register_model",
    "restore_checkpoint", "save_checkpoint", "save_model",
]
