"""Where batches come from: arrays (on the host or the device), generators and map-style datasets.

``fit``, ``evaluate`` and ``predict`` turn what they are given into a :class:`Batches` source,
which yields device batches ``(xb, yb)`` (``xb`` as stored, e.g. uint8: the model casts it on
the device), or ``(xb, yb, wb)`` where arrays come with sample weights:

* arrays of the model's own namespace on its device (CuPy, PyTorch, ``array_api_strict``) stay
  there; each batch is gathered on the device (``xp.take``);
* a NumPy training set of at most :data:`~xpcnn.data.sources.DEVICE_BUDGET_BYTES` (images and
  targets together) is uploaded to the device once, as given (uint8 stays uint8), and gathered
  there in the same shuffled order as host batches, so that seeds and checkpoints reproduce.
  On the CPU (NumPy) the host is the device: nothing is copied;
* larger NumPy arrays, and ``np.memmap`` arrays always, stay on the host and are read batch by
  batch (a memory-mapped file is never read whole), on a background thread;
* an iterable of ``(x, y)`` or ``(x, y, sample_weight)`` batches (``x`` or ``(x,)`` for
  ``predict``; a generator, a list, a PyTorch ``DataLoader`` or ``IterableDataset``): ``steps``
  batches an epoch (for an iterator: drawn from it, epoch after epoch), or when ``steps`` is
  None one pass an epoch over a re-iterable, and an iterator read to its end (``evaluate``
  and ``predict``; ``fit`` needs its ``steps``);
* a map-style dataset (``__len__`` and ``__getitem__(i) -> (x_i, y_i)`` or ``(x_i, y_i,
  w_i)``, PyTorch's habit; ``x_i`` or ``(x_i,)`` for ``predict``), batched and shuffled by
  xpcnn exactly as arrays are.

Host work (reading files, stacking samples, checking values) runs on a background thread that
keeps up to :data:`~xpcnn.data.background.PREFETCH` batches ready while the device computes;
an exception there is raised in the caller, and the thread stops when the loop ends early.

The modules, each importing only those above it:

* :mod:`~xpcnn.data.arrays`: moving arrays between libraries, what kind of source ``x`` is,
  device and image checks, and the argument checks every source's data goes through;
* :mod:`~xpcnn.data.registry`: :class:`~xpcnn.data.registry.ByIdentity`, a value per object
  by identity (a dataset's lock, the reader a stopped call left inside a source);
* :mod:`~xpcnn.data.replay`: the input batches that a source can read again, for a training
  step's error found later (:mod:`xpcnn.totals`);
* :mod:`~xpcnn.data.background`: the prefetch thread
  (:func:`~xpcnn.data.background.prefetch`) and :func:`~xpcnn.data.background.upload`;
* :mod:`~xpcnn.data.sources`: the :class:`Batches` protocol, each rank's share of an epoch,
  :class:`ArrayBatches` and :class:`DatasetBatches`;
* :mod:`~xpcnn.data.streams`: :class:`IterableBatches` and the registry of what xpcnn keeps
  for each iterator between calls.

Only the :class:`Batches` protocol is exported here; the rest of xpcnn (and its tests) imports
each name from the module that defines it. The settings are read, at each use, in that module
and are set there: ``xpcnn.data.sources.DEVICE_BUDGET_BYTES``,
``xpcnn.data.background.STOP_WAIT_SECONDS``.
"""

from __future__ import annotations

from .sources import Batches

__all__ = ["Batches"]
