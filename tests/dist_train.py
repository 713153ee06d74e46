"""A small training run for tests/test_distributed.py, in one process or under ``mpiexec``.

    mpiexec -n 3 python tests/dist_train.py OUT [--batch 4] [--samples 50] [--dtype float64]
        [--optimizer sgd|adam] [--batchnorm] [--dataset]
        [--checkpoint PATH --every N [--resume]]
        [--fail-rank R --fail-step S --fail-how kill|raise|hang] [--freeze A B]
        [--interrupt S] [--save-freq N] [--sources arrays dataset weighted]

trains one epoch (``--epochs``) with ``--batch`` samples per rank and writes, from every rank,
its final weights and history to ``OUT.rank<R>.npz`` (with plain ``np.savez``: each rank its own
file, to compare them). ``--fail-rank`` makes rank R die (SIGKILL), raise or hang at its S-th step.
``--freeze A B``: a callback freezes the convolution before step A and unfreezes it before step B.
``--interrupt S``: rank R sends itself a Ctrl-C (SIGINT) before its step S + R; checkpoints take
a moment to write.
``--save-freq N``: a ModelCheckpoint of the model every N steps, to ``OUT.b<batch>.npz``.
``--sources``: one run after another in the job, each writing ``OUT.<source>.rank<R>.npz``, from
arrays, a map-style dataset (``--dataset``) or weighted arrays (``--weighted``).
In one process (no mpiexec), :func:`train` is the reference run.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import numpy as np
from nets import random_layers_net, tiny_images

import xpcnn
from xpcnn import distributed
from xpcnn.saving import checkpoint as checkpoint_file

data = tiny_images


class Samples:
    """A map-style dataset over the arrays: ``samples[i] -> (x_i, y_i)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], int(self.y[i])


def make_model(dtype: str = "float64", optimizer: str = "sgd", batchnorm: bool = False
               ) -> xpcnn.Sequential:
    """Random layers of both kinds (augmentation on the input, dropout inside); BatchNorm only
    on request, since it normalises each rank's slice by itself."""
    model = xpcnn.Sequential(random_layers_net(batchnorm), seed=3, dtype=dtype)
    opt = (xpcnn.optim.SGD(0.05, momentum=0.9) if optimizer == "sgd"
           else xpcnn.optim.Adam(1e-2))
    model.compile(optimizer=opt)
    return model


def train(out: str | None = None, batch: int = 4, samples: int = 50, epochs: int = 1,
          dtype: str = "float64", optimizer: str = "sgd", checkpoint: str | None = None,
          every: int = 2, resume: bool = False, fail_rank: int = -1, fail_step: int = 0,
          fail_how: str = "kill", batchnorm: bool = False, dataset: bool = False,
          weighted: bool = False, freeze: tuple[int, int] | None = None, interrupt: int = 0,
          save_freq: int = 0) -> tuple[list[np.ndarray], dict[str, list[float]]]:
    """Train; returns the final weights and history (and writes them, and how many steps this
    process ran, to ``out.rank<R>.npz``). ``weighted``: with sample weights (the validation
    data's too) and class weights. ``freeze``: the 1-based steps before which the convolution
    is frozen, then unfrozen. ``interrupt``: rank R gets a Ctrl-C before its step
    ``interrupt + R`` (as mpiexec's forwarded SIGINT reaches the ranks at different points of
    their loops), checkpoints take a moment to write, and where it says it was interrupted goes
    to ``out.rank<R>.npz`` too, before its TrainingInterrupted ends the job."""
    here = distributed.world()
    x, y = data(samples)
    model = make_model(dtype, optimizer, batchnorm)
    if here.rank == fail_rank:
        step = model.train_step

        def failing_step(xb, yb):
            if model.optimizer.iterations + 1 == fail_step:
                if fail_how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fail_how == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"a failure planted at step {fail_step}")
            return step(xb, yb)

        model.train_step = failing_step
    source = (Samples(x, y), None) if dataset else (x, y)
    every_step = {} if checkpoint is None else {"checkpoint_every": every}
    w = np.linspace(0.2, 2.0, samples)
    weights = {"sample_weight": w, "class_weight": {1: 3.0, 4: 0.5}} if weighted else {}
    validation = (x[:20], y[:20], *((w[:20],) if weighted else ()))
    steps_run: list[int] = []  # (a resumed run: only the steps after its checkpoint)
    callbacks = [xpcnn.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: steps_run.append(b))]
    if freeze is not None:
        def toggle(batch: int, logs: dict) -> None:
            step = model.optimizer.iterations + 1
            if step in freeze:
                model.layers[3].trainable = step == freeze[1]  # (the convolution)

        callbacks.append(xpcnn.callbacks.LambdaCallback(on_train_batch_begin=toggle))
    if interrupt:
        def ctrl_c(batch: int, logs: dict) -> None:
            if model.optimizer.iterations + 1 == interrupt + here.rank:
                os.kill(os.getpid(), signal.SIGINT)

        callbacks.append(xpcnn.callbacks.LambdaCallback(on_train_batch_begin=ctrl_c))
        write = checkpoint_file.save_checkpoint

        def slow_write(*args, **kwargs):
            if here.is_root:  # (the writer: longer than a failing rank's grace before abort,
                time.sleep(2 * distributed.ABORT_GRACE_SECONDS)  # twice it)
            write(*args, **kwargs)

        checkpoint_file.save_checkpoint = slow_write
    if save_freq:
        callbacks.append(xpcnn.callbacks.ModelCheckpoint(
            f"{out}.b{{batch}}.npz", save_weights_only=True, save_freq=save_freq))
    stopped = None
    try:
        model.fit(*source, epochs=epochs, batch_size=batch, verbose=0, checkpoint=checkpoint,
                  resume=resume, validation_data=validation, callbacks=callbacks,
                  **every_step, **weights)
    except xpcnn.errors.TrainingInterrupted as e:
        stopped = e
    weights = model.get_weights()
    logs = {k: v for k, v in model.history.history.items() if k != "seconds"}
    if out is not None:
        arrays = {f"w{i}": w for i, w in enumerate(weights)}
        arrays.update({f"h_{k}": np.array(v) for k, v in logs.items()})
        arrays["steps_run"] = np.array(len(steps_run))
        arrays["interrupted"] = np.array("" if stopped is None else stopped.where)
        np.savez(f"{out}.rank{here.rank}.npz", **arrays)
    if stopped is not None:  # (uncaught, as in a script: the first rank to raise ends the job)
        raise stopped
    return weights, logs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=0)
    p.add_argument("--fail-how", default="kill")
    p.add_argument("--batchnorm", action="store_true")
    p.add_argument("--dataset", action="store_true", help="a map-style dataset, not arrays")
    p.add_argument("--weighted", action="store_true", help="sample and class weights")
    p.add_argument("--freeze", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="freeze the convolution before step A, unfreeze it before step B")
    p.add_argument("--interrupt", type=int, default=0, help="rank R's Ctrl-C before step S + R")
    p.add_argument("--save-freq", type=int, default=0, help="a ModelCheckpoint every N steps")
    p.add_argument("--sources", nargs="+", choices=["arrays", "dataset", "weighted"],
                   help="several runs in one job (a job takes ~1 s to start)")
    args = vars(p.parse_args())
    sources = args.pop("sources")
    for source in sources or [None]:
        train(**{**args, **({} if source is None else {
            "out": f"{args['out']}.{source}", "dataset": source == "dataset",
            "weighted": source == "weighted"})})


if __name__ == "__main__":
    main()
