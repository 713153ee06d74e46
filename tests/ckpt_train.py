"""A small checkpointed training run for tests/test_checkpoint.py, in-process or as a script.

As a script (so that a test can kill it)::

    python tests/ckpt_train.py CHECKPOINT OUT.npz [--resume] [--step-delay S]
                               [--die-at-write N --die-how replace|savez]

trains, writing CHECKPOINT every ``EVERY`` steps and at each epoch end, and saves the final
weights, the history and the number of steps this process ran to OUT.npz. ``--step-delay``
sleeps after each step so that a kill lands mid-run on any machine; ``--die-at-write N`` ends the
process abruptly (``os._exit``) during the N-th checkpoint write, either after the temporary file
is complete but before the rename (``replace``) or halfway through writing it (``savez``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from nets import random_layers_net, tiny_images

import xpcnn

EPOCHS, BATCH, EVERY = 3, 8, 5  # 60 samples: 8 steps an epoch, the last one short


def data() -> tuple[np.ndarray, np.ndarray]:
    return tiny_images(60)


def make_model(precision: str = "float32") -> xpcnn.Sequential:
    """Every kind of state a checkpoint must carry: random layers (flip, crop, dropout),
    BatchNorm statistics, Adam moments and a schedule driven by the step count."""
    model = xpcnn.Sequential(random_layers_net(), seed=3)
    model.compile(optimizer=xpcnn.optim.Adam(xpcnn.optim.CosineDecay(1e-2, 24)),
                  precision=precision)
    return model


def train(checkpoint: str | None = None, resume: bool = False, every: int | str = EVERY,
          step_delay: float = 0.0, model: xpcnn.Sequential | None = None,
          steps_run: list[int] | None = None, callbacks: list | None = None
          ) -> tuple[xpcnn.Sequential, xpcnn.History]:
    """``steps_run``, where given, gets one element per step this call runs (a resumed run
    runs only the steps after its checkpoint); ``callbacks``: fit's, besides."""
    model = model or make_model()
    if step_delay:
        step = model.train_step

        def slow_step(xb, yb):
            out = step(xb, yb)
            time.sleep(step_delay)
            return out

        model.train_step = slow_step
    x, y = data()
    every = {} if checkpoint is None else {"checkpoint_every": every}
    counted = [] if steps_run is None else [xpcnn.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps_run.append(batch))]
    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, verbose=0, checkpoint=checkpoint,
                        resume=resume, callbacks=[*counted, *(callbacks or [])],
                        **every)
    return model, history


def _die_at_write(n: int, how: str) -> None:
    """Make the n-th checkpoint write end the process abruptly."""
    import xpcnn.saving.npz as npz_module

    count = [0]
    if how == "replace":
        real = os.replace

        def replace(src, dst):
            count[0] += 1
            if count[0] == n:
                os._exit(17)  # the temporary file is complete and fsynced; no rename
            real(src, dst)

        os.replace = replace
    else:
        real_savez = np.savez

        def savez(f, **arrays):
            count[0] += 1
            if count[0] == n:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os._exit(17)
            real_savez(f, **arrays)

        npz_module.np.savez = savez  # the writer looks it up through its module's numpy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--die-at-write", type=int, default=0)
    p.add_argument("--die-how", choices=("replace", "savez"), default="replace")
    args = p.parse_args()
    if args.die_at_write:
        _die_at_write(args.die_at_write, args.die_how)
    steps_run: list[int] = []
    model, history = train(args.checkpoint, args.resume, step_delay=args.step_delay,
                           steps_run=steps_run)
    weights = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    history_json = json.dumps({"epoch": history.epoch, "history": history.history})
    np.savez(args.out, history=np.array(history_json), steps_run=np.array(len(steps_run)),
             **weights)
    sys.exit(0)


if __name__ == "__main__":
    main()
