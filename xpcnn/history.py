"""The per-epoch record of a training run, shared by the training loop and checkpoints."""

from __future__ import annotations


class History:
    """Per-epoch metrics of a ``fit`` call: ``history["loss"]``, ``["val_accuracy"]``, ..."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"
