#!/usr/bin/env python
"""Two revisions of xpcnn timed against each other in one process, alternating.

Whole-step speed on a small shared machine moves by 10-30% between runs, more than most single
changes are worth. This script loads an older checkout of xpcnn (``--old``: a directory holding an
``xpcnn`` package, e.g. made with ``git worktree add``) under another name beside the working
tree's, builds the same reference model in both, and times them in alternating blocks of steps.
Each round gives one ratio (old time / new time); the medians and the range over the rounds are
reported, with the number of rounds the new revision won, and the ratio of each revision's
fastest tenth of steps (the 10th percentile: the speed each reaches when the machine lets it,
less moved by other tenants' bursts than a median).

    git worktree add /tmp/xpcnn-old HEAD~3
    python scripts/compare_revisions.py --old /tmp/xpcnn-old
    python scripts/compare_revisions.py --old /tmp/xpcnn-old --specs cifar:train --rounds 16
    python scripts/compare_revisions.py --old /tmp/xpcnn-old --specs resnet20:train,mnist-bn:train
    python scripts/compare_revisions.py --old .   # the tree against itself: the noise floor
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"notebook": (32, 32, 3), "mnist": (28, 28, 1), "cifar": (32, 32, 3),
          "mnist-bn": (28, 28, 1), "resnet20": (32, 32, 3)}


def load_old(path: Path) -> Any:
    """The ``xpcnn`` package under ``path``, imported as ``xpcnn_old`` (its imports within the
    package are relative, so it keeps to its own modules)."""
    init = path / "xpcnn" / "__init__.py"
    if not init.is_file():
        sys.exit(f"--old {path}: no xpcnn/__init__.py there (expected a checkout of xpcnn)")
    spec = importlib.util.spec_from_file_location(
        "xpcnn_old", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["xpcnn_old"] = module
    spec.loader.exec_module(module)
    return module


def step_function(lib: Any, name: str, mode: str, batch: int) -> Any:
    """One training step or one inference batch of reference model ``name`` in ``lib``; or
    (``fit``) one ``fit`` epoch of four shuffled batches of host uint8 images, as users call
    it: the loop around the steps too."""
    models = importlib.import_module(f"{lib.__name__}.models")
    model = models.resnet20(10, seed=0) if name == "resnet20" else lib.Sequential(
        models.build_layers(name, 10), input_shape=INPUTS[name], seed=0)
    model.compile(loss="cross_entropy", optimizer=lib.optim.SGD(0.01, momentum=0.9))
    rng = np.random.default_rng(1)
    if mode == "fit":
        xs = rng.integers(0, 256, (4 * batch, *INPUTS[name]), dtype=np.uint8)
        ys = rng.integers(0, 10, 4 * batch)
        return lambda: model.fit(xs, ys, batch_size=batch, verbose=0)
    x = model._to_device(rng.integers(0, 256, (batch, *INPUTS[name]), dtype=np.uint8))
    y = model.backend.asarray(rng.integers(0, 10, batch))
    if mode == "train":
        return lambda: model.train_step(x, y)
    xp = model.backend.xp
    return lambda: float(xp.sum(model._logits(x, training=False)))


def compare(fns: dict[str, Any], rounds: int, block: int) -> dict[str, Any]:
    for fn in fns.values():  # warm-up: buffers, threads, heap
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    ratios = []
    for r in range(rounds):
        medians = {}
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            fns[k]()  # untimed: the other revision's threads and cache state settle
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                fns[k]()
                ts.append(time.perf_counter() - t0)
            medians[k] = statistics.median(ts)
            times[k] += ts
        ratios.append(medians["old"] / medians["new"])
    return {"old_ms": 1e3 * statistics.median(times["old"]),
            "new_ms": 1e3 * statistics.median(times["new"]),
            "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "new_won": sum(q > 1 for q in ratios), "rounds": rounds,
            "fastest_tenth": _tenth(times["old"]) / _tenth(times["new"])}


def _tenth(ts: list[float]) -> float:
    """The 10th percentile of step times (the fastest one with fewer than 10 steps)."""
    return statistics.quantiles(ts, n=10)[0] if len(ts) >= 10 else min(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True,
                   help="directory holding the older revision's xpcnn package")
    p.add_argument("--specs", default="notebook:train,mnist:train,cifar:train,"
                   "notebook:infer,mnist:infer,cifar:infer",
                   help="comma-separated model:mode pairs (mode: train, infer, or fit: one "
                   "fit epoch of 4 batches)")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds (default 8)")
    p.add_argument("--block", type=int, default=4, help="timed steps per block (default 4)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    old = load_old(args.old.resolve())
    sys.path.insert(0, str(ROOT))
    import xpcnn as new

    print(f"old: {Path(old.__file__).parent}\nnew: {Path(new.__file__).parent}")
    print(f"{'model:mode':16s} {'old ms':>8s} {'new ms':>8s}  speed-up (range over rounds, "
          "rounds new won), fastest tenth's speed-up")
    for spec in args.specs.split(","):
        name, mode = spec.split(":")
        if name not in INPUTS or mode not in ("train", "infer", "fit"):
            sys.exit(f"--specs: {spec!r} is not model:mode with a model of {list(INPUTS)} "
                     "and mode train, infer or fit")
        fns = {"old": step_function(old, name, mode, args.batch_size),
               "new": step_function(new, name, mode, args.batch_size)}
        r = compare(fns, args.rounds, args.block)
        print(f"{spec:16s} {r['old_ms']:8.1f} {r['new_ms']:8.1f}  {r['speedup']:.3f}x "
              f"({r['min']:.2f}-{r['max']:.2f}, {r['new_won']}/{r['rounds']}), "
              f"{r['fastest_tenth']:.3f}x")


if __name__ == "__main__":
    main()
