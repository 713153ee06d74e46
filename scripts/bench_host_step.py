#!/usr/bin/env python
"""xpcnn's own Python time in one eager training step on the CuPy path, measured on the CPU.

At small batches an eager CuPy step is bound by the host: the GPU waits while Python issues each
launch. Part of that host time is CuPy's own per call (the launches, counted by
tests/launch_counter.py), the rest is xpcnn's Python between the calls (the plan and its
executor, the layers' dispatch, the trainer, the optimiser, the kernels' wrappers). This
measures the second part without a GPU: the step runs as in tests/launch_counter.py (CuPy's
kernels and cuDNN graphs emulated on the CPU, every array a NumPy array standing for a CuPy
one), under cProfile, and only the frames of xpcnn's own files are summed:

- ``xpcnn us``: cProfile's self time (tottime) of the functions defined under xpcnn/, per step,
  with the C builtins they call (``isinstance``, ``len``, dict and list methods ...) in it
  (not timed apart: the profiler's own cost, about a microsecond per timed call, lands in the
  caller's self time); time inside the emulated kernels, NumPy, array-api-compat and the
  counter's wrappers is not in it (on a GPU those are CuPy's calls, counted by the launches);
- ``calls``: the calls of xpcnn's Python functions per step;
- ``launches``: the step's launches, as tests/launch_counter.py counts them.

The step is the one ``fit`` runs for each batch (``_train_step`` inside the backend's compute
scope; ``train_step`` adds its checks of the batch), SGD with momentum 0.9 as in
scripts/bench_gpu.py, uint8 images already on the device, ``cuda_graphs=False``. Each step after
the warm-up is profiled alone, with the cyclic garbage collector off and freed arrays kept in
the heap (as CuPy's pool keeps them), and the least of ``--repeat`` steps is reported: on a
busy machine a step that the scheduler interrupted counts the wait in whichever frame it was
in. With the profiler's cost per call, the figures are above the interpreter's time without
it; they compare revisions measured the same way.

    PYTHONPATH=$PWD python scripts/bench_host_step.py              # every model, both precisions
    PYTHONPATH=$PWD python scripts/bench_host_step.py --models cifar --top 25  # top functions

Needs a C++ compiler (the emulated kernels are compiled for the CPU), as
tests/test_launch_counts.py does.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # (the CuPy emulator and the launch counter)

from launch_counter import counted_model, counting, emulated, launch_count  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn.models import INPUT_SHAPES  # noqa: E402
from xpcnn.ops.fast_numpy import _keep_freed_arrays_in_the_heap  # noqa: E402
from xpcnn.ops.kernels import compute_scope  # noqa: E402
from xpcnn.totals import READ_EVERY  # noqa: E402

XPCNN = Path(xpcnn.__file__).resolve().parent

FunctionKey = tuple[str, int, str]  # (file, line, name), as pstats keys them


def ours(key: FunctionKey) -> bool:
    """A function defined in one of xpcnn's files."""
    return key[0].startswith(str(XPCNN))


def step_profile(model: Any, xb: Any, yb: Any) -> pstats.Stats:
    """cProfile's statistics of one training step as fit runs it (the cyclic garbage
    collector off meanwhile, as timeit has it)."""
    profile = cProfile.Profile(builtins=False)
    with compute_scope(model.backend):
        gc.disable()
        profile.enable()
        model._train_step(xb, yb, keep=False)
        profile.disable()
        gc.enable()
    if len(model._totals.pending) >= READ_EVERY - 1:
        model._read_totals()  # (as fit does regularly: never inside the profile)
    return pstats.Stats(profile)


def host_times(stats: pstats.Stats) -> tuple[float, float]:
    """(xpcnn self seconds, xpcnn calls) of a step."""
    own = calls = 0.0
    for key, (_, n, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if ours(key):
            own += tottime
            calls += n
    return own, calls


def top_functions(profiles: list[pstats.Stats], top: int) -> list[str]:
    """The ``top`` xpcnn functions by self time in a step (each one's least over the
    steps)."""
    least: dict[FunctionKey, tuple[float, int]] = {}
    for stats in profiles:
        for key, (_, n, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            if ours(key):
                least[key] = min(least.get(key, (tt, n)), (tt, n))
    rows = sorted(((tt, n, key) for key, (tt, n) in least.items()), reverse=True)[:top]
    return [f"    {tt * 1e6:7.1f} us {n:4d} calls  "
            f"{Path(key[0]).relative_to(XPCNN.parent)}:{key[1]} {key[2]}" for tt, n, key in rows]


def measure(name: str, precision: str, args: argparse.Namespace, fast_cupy: Any
            ) -> tuple[tuple[float, float], int, list[pstats.Stats]]:
    """The least host times of a step (:func:`host_times`) over ``args.repeat`` steps, the
    launches of a step, and the steps' profiles."""
    with counting(fast_cupy) as counter:
        model, xb, yb = counted_model(name, precision, args.batch)
        for _ in range(args.warmup):
            step_profile(model, xb, yb)
        counter.active = True
        with compute_scope(model.backend):
            model._train_step(xb, yb, keep=False)
        counter.active = False
        launches = launch_count(counter.launches)
        profiles = [step_profile(model, xb, yb) for _ in range(args.repeat)]
    return min(host_times(stats) for stats in profiles), launches, profiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(INPUT_SHAPES),
                   default=["notebook", "mnist", "cifar"])
    p.add_argument("--precisions", nargs="+", choices=("float32", "mixed_float16"),
                   default=["float32", "mixed_float16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeat", type=int, default=15, help="profiled steps (the least is kept)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=0, help="also list the top N xpcnn functions")
    args = p.parse_args(argv)
    print(f"batch {args.batch}, per step, the least of {args.repeat} steps")
    print(f"{'model':9s} {'precision':14s} {'xpcnn us':>9s} {'calls':>6s} {'launches':>9s}")
    # Freed arrays kept for reuse, as CuPy's memory pool keeps them (the NumPy fast path's
    # setting): else returning a large one to the system is counted in the frame that dropped it.
    _keep_freed_arrays_in_the_heap()
    with emulated() as fast_cupy, np.errstate(over="ignore"):  # (float16's first steps)
        for name in args.models:
            for precision in args.precisions:
                (own, calls), launches, profiles = measure(name, precision, args, fast_cupy)
                print(f"{name:9s} {precision:14s} {own * 1e6:9.1f} {calls:6.0f} {launches:9d}",
                      flush=True)
                if args.top:
                    print("\n".join(top_functions(profiles, args.top)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
