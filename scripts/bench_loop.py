#!/usr/bin/env python
"""Host time that fit's loop spends per step outside the layers: getting a batch to the device,
the device-side bookkeeping of a step (xpcnn.totals: running sums, the non-finite flag), and the
rest of fit's loop around the step (callbacks, the step's dispatch, the checks it needs).

On the CPU that is time the step takes; on a GPU it is time the host spends issuing work (the
device runs behind it), which bounds the steps per second when the layers' kernels are short.
The best of many repeats is reported, which a busy machine moves little. The last two rows,
"fit loop", are ``fit`` itself on unshuffled batches (slices: no gather) with the step's device
work (``Trainer._device_step``) replaced by a constant, from fits of two lengths (the difference
per step: a fit's set-up is not counted): eager steps, and steps replayed from a CUDA graph (on
the GPU a real capture of that stub step; elsewhere a stand-in that captures and launches
nothing, as tests/test_cuda_graphs.py's does), which is how a GPU runs fit's full batches.

    python scripts/bench_loop.py                      # cifar, batch 128, on the CPU
    python scripts/bench_loop.py --device cuda --model mnist --optimizer adam
"""

from __future__ import annotations

import argparse
import contextlib
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np

import xpcnn
from xpcnn.data.sources import ArrayBatches
from xpcnn.models import INPUT_SHAPES, build_layers
from xpcnn.ops.kernels import compute_scope
from xpcnn.totals import READ_EVERY, RunningTotals
from xpcnn.training import step as training_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("cifar", "mnist", "notebook"), default="cifar")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=10_000, help="uint8 training images")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="adam adds the check of the gradients' squares")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    shape = INPUT_SHAPES[args.model]
    model = xpcnn.Sequential(build_layers(args.model, 10), input_shape=shape, seed=0,
                             device=args.device)
    model.compile(optimizer=args.optimizer)
    backend, xp = model.backend, model.backend.xp
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.samples, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, args.samples)
    resident = ArrayBatches(backend, x, y, args.batch_size, shuffle=True)
    batches = iter(resident.epoch(0))
    idx = rng.permutation(args.samples)[:args.batch_size]
    params = [p for la in model.layers for p in la.params.values()]
    grads = [xp.ones_like(p) for p in params]
    stats = backend.asarray([2.3, 10.0], dtype="float32")
    totals, step = RunningTotals(backend, len(grads)), [0]

    def upload() -> None:  # a host batch, copied and cast (the loop before the data stayed)
        model._to_device(x[idx])

    def gather() -> None:  # the next batch of a training set on the device, cast there
        nonlocal batches
        try:
            xb, _ = next(batches)
        except StopIteration:
            batches = iter(resident.epoch(0))
            xb, _ = next(batches)
        xp.astype(xb, xp.float32, copy=False)

    def bookkeeping() -> None:  # one step's totals, and the host's read every READ_EVERY steps
        step[0] += 1
        totals.add(stats, grads, args.batch_size, step[0], squares=model.optimizer.keeps_squares)
        totals.pending.append((step[0], (None, None)))  # (as train_step records each step)
        if len(totals.pending) >= READ_EVERY:
            totals.read()

    print(f"{args.model}, batch {args.batch_size}, {backend.label}, {len(params)} parameter "
          f"arrays, {args.optimizer}: best of {args.repeat} x 20 calls")
    with compute_scope(backend):
        for name, fn in (("host batch -> device", upload), ("batch gathered on device", gather),
                         ("step bookkeeping", bookkeeping)):
            best = min(timeit.repeat(fn, number=20, repeat=args.repeat)) / 20
            print(f"  {name:26s} {best * 1e3:8.3f} ms per step")
    model.fit(x[:args.batch_size], y[:args.batch_size], verbose=0)  # (the optimiser's slots)
    stats = backend.asarray([2.3, 10.0], dtype="float32")
    # (an instance attribute)
    model._device_step = lambda xb, yb, step, scalars=None, weights=None: stats
    for graphs in (False, True):
        model.compile(optimizer=model.optimizer, cuda_graphs=graphs)
        if graphs and backend.name != "cupy":
            with mock.patch.object(training_step, "graph_blockers", lambda backend: []):
                model._step_graphs().capture = NoCapture()
        name = "fit loop, replayed steps" if graphs else "fit loop, eager steps"
        print(f"  {name:26s} {fit_loop_seconds(model, x, y, args) * 1e6:8.1f} us per step")
        if graphs and model.cuda_graphs_reason:
            print(f"    (not replayed: {model.cuda_graphs_reason})")


class NoCapture:
    """A stand-in for CuPy's stream capture that records and launches nothing."""

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        yield

    def capture(self, step: Callable[[], Any]) -> tuple[str, Any]:
        return "graph", step()

    def launch(self, graph: str) -> None:
        pass


def fit_loop_seconds(model: xpcnn.Model, x: np.ndarray, y: np.ndarray,
                     args: argparse.Namespace) -> float:
    """Host seconds per step of ``fit``'s loop: the best time of a long fit less that of a
    short one, over their difference in steps."""
    steps = -(-args.samples // args.batch_size)
    short = max(1, steps // 4)

    def best(n_steps: int) -> float:
        n = min(args.samples, n_steps * args.batch_size)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            model.fit(x[:n], y[:n], batch_size=args.batch_size, shuffle=False, verbose=0)
            times.append(time.perf_counter() - start)
        return min(times)

    best(short)  # (a first fit outside the timed ones: warm-up and capture)
    return (best(steps) - best(short)) / max(1, steps - short)

if __name__ == "__main__":
    main()
