"""The per-epoch record of a training run, shared by the training loop and checkpoints."""

from __future__ import annotations

from typing import Any

from .errors import warn


class EpochRecord:
    """The logs of a ``fit`` call's epochs: ``history["loss"]``, ``["val_accuracy"]``, ...,
    one value for each epoch that logged it. As in Keras, a list may be shorter than
    ``epoch``: ``val_*`` with ``fit(validation_freq=k)``, a callback's log in some epochs;
    :meth:`epochs_of` says which epochs its values are from."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        #: the epochs of the keys logged in only some of them (others: every one in ``epoch``)
        self.sparse: dict[str, list[int]] = {}

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        numbers = {k: _number(k, v) for k, v in logs.items()}
        logs = {k: v for k, v in numbers.items() if v is not None}
        for k in self.history.keys() - logs.keys():  # (a key this epoch lacks, had by all before)
            if k not in self.sparse and len(self.history[k]) == len(self.epoch):
                self.sparse[k] = list(self.epoch)
        for k, v in logs.items():
            if k not in self.history and self.epoch:  # (a key earlier epochs lacked)
                self.sparse[k] = []
            self.history.setdefault(k, []).append(v)
            if k in self.sparse:
                self.sparse[k].append(epoch)
        self.epoch.append(epoch)

    def epochs_of(self, key: str) -> list[int] | None:
        """The epochs (0-based, as in ``epoch``) that ``history[key]``'s values are from; None
        where that is not known (a History filled by hand with a shorter list)."""
        if key in self.sparse:
            return list(self.sparse[key])
        return list(self.epoch) if len(self.history.get(key, ())) == len(self.epoch) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epochs={len(self.epoch)}, keys={list(self.history)})"


def _number(key: str, value: Any) -> float | None:
    """``value`` as a float; None, with a warning, for a log that is no number (a callback's
    text or array): the record holds numbers, and a checkpoint stores it."""
    try:
        return float(value)
    except (TypeError, ValueError):
        warn(f"the History records numbers; the log {key!r} = {value!r:.60} is not one and is "
             "left out")
        return None
