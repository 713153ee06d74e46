"""A handle on one weight of a built layer, as Keras shows its variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import dtype_name


@dataclass(frozen=True, repr=False)
class Weight:
    """One weight of a built layer, as Keras shows its variables (``model.weights``,
    ``layer.trainable_weights``): a handle on the layer's array, read when asked (nothing
    leaves the device before :meth:`numpy`), equal to any other handle on the same weight."""

    layer: Any  # (the built xpcnn.layers.Layer holding it; base.py imports this module)
    name: str  # (the layer's own name for it, as Keras 3 names a variable: "kernel")

    @property
    def path(self) -> str:
        """Unique in a model, as Keras 3's: the layer's name and the weight's,
        ``"conv2d/kernel"``."""
        return f"{self.layer.name}/{self.name}"

    @property
    def shape(self) -> tuple[int, ...]:
        """In Keras' layout, as :meth:`numpy` gives it."""
        return self.layer.keras_shape(self.name)

    @property
    def dtype(self) -> str:
        """The name of the dtype it is held in (float32 under mixed precision too)."""
        return dtype_name(self.layer.dtype)

    @property
    def trainable(self) -> bool:
        """As in Keras: a parameter of a layer that is not frozen (state never is)."""
        return self.layer.trainable and self.name in self.layer.params

    def numpy(self) -> np.ndarray:
        """A host copy in Keras' layout, as :meth:`Layer.get_weights` gives it."""
        return self.layer.host_weight(self.name)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:  # (NumPy 2's protocol: a copy is all there is)
            raise ValueError(f"weight {self.path!r} is read as a NumPy array only by copying "
                             "it to the host")
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def assign(self, value: Any) -> None:
        """Replace the weight by ``value`` (a host array in Keras' layout), checked as
        :meth:`Layer.set_weights` checks it, in the layer on its device: the optimiser's state
        stays, as after ``set_weights``."""
        self.layer._require_built("assign")
        self.layer.assign_weights([(self.name, self.layer.checked_weight(self.name, value))])

    def __repr__(self) -> str:
        return (f"<Weight {self.path!r} shape={self.shape} dtype={self.dtype} "
                f"trainable={self.trainable}>")
