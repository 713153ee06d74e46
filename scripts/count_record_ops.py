"""Device operations of one training step's record in the standard Array API version, counted
under ``array_api_strict`` (each is at least one kernel launch on CuPy, where the record itself
is three launches: ``xpcnn.ops.fast_cupy``), for a reference model's gradients.

Counts calls of the namespace's functions and of the arrays' operators, in a steady step (the
second of two: anything made once is not counted), leaving out indexing (a view) and the
functions that only read dtypes on the host (``finfo``, ``iinfo``, ``isdtype``). With
``--tree`` another checkout's xpcnn (e.g. ``git archive REV | tar -x -C DIR``) is counted, to
compare revisions; a tree whose training step unscaled float16 gradients itself has that
unscaling counted too.

    python scripts/count_record_ops.py --model mnist [--tree DIR]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HOST_ONLY = {"finfo", "iinfo", "isdtype", "__getitem__"}
OPERATORS = ["__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
             "__imul__", "__truediv__", "__rtruediv__", "__lt__", "__le__", "__gt__", "__ge__",
             "__eq__", "__ne__", "__and__", "__or__", "__invert__", "__neg__", "__abs__",
             "__setitem__", "__getitem__"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", default="mnist")
    p.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    import array_api_strict as xs

    from xpcnn.backend import get_backend
    from xpcnn.models import INPUT_SHAPES, build_layers
    from xpcnn.totals import RunningTotals

    counts: collections.Counter[str] = collections.Counter()

    def counted(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def call(*a: Any, **k: Any) -> Any:
            counts[name] += 1
            return f(*a, **k)
        return call

    layers = build_layers(args.model)
    shape = INPUT_SHAPES[args.model]
    for la in layers:  # (the parameters' shapes, from a build on NumPy)
        shape = la.build(shape, get_backend("cpu"))
    grads_np = [np.ones(p.shape, np.float32) for la in layers for p in la.params.values()]

    class StrictBackend:  # (what RunningTotals uses of a backend, on array_api_strict)
        xp, name = xs, "array_api_strict"  # (name: for ops.kernels.fast_kernels, no kernels)
        fast = None  # (what the kernels were found by in trees before fast_kernels)

        def asarray(self, values: Any, dtype: Any = None) -> Any:
            return xs.asarray(values, dtype=getattr(xs, dtype) if isinstance(dtype, str)
                              else dtype)

        def to_numpy(self, a: Any) -> Any:
            return np.asarray(a)

    backend = StrictBackend()
    array = type(xs.asarray(1.0))
    functions = {n: getattr(xs, n) for n in dir(xs)
                 if not n.startswith("_") and not n[0].isupper() and callable(getattr(xs, n))}
    trainer = Path(args.tree) / "xpcnn" / "training.py"  # (a tree from before xpcnn/training/)
    old_unscale = trainer.is_file() and "g * inverse" in trainer.read_text()
    print(f"{args.model}: {len(grads_np)} gradients; device operations of one step's record "
          f"(standard version, {args.tree})")
    for label, squares, scaled in (("SGD", False, False), ("Adam", True, False),
                                   ("SGD, float16 loss scaling", False, True)):
        grads = [xs.asarray(g) for g in grads_np]
        totals = RunningTotals(backend, len(grads))
        scaling = xs.asarray([2.0**15, 0.0], dtype=xs.float32) if scaled else None
        stats = xs.asarray([0.5, 3.0], dtype=xs.float32)
        for step in (1, 2):
            counts.clear()
            for n in OPERATORS:
                if hasattr(array, n):
                    setattr(array, n, counted(n, getattr(array, n)))
            for n, f in functions.items():
                setattr(xs, n, counted(n, f))
            try:
                gs = grads
                if scaled and old_unscale:  # (the training step's own unscaling, before)
                    inverse = 1.0 / scaling[0]
                    gs = [g * inverse for g in grads]
                totals.add(stats, gs, 128, step, scaling, squares)
            finally:
                for n, f in functions.items():
                    setattr(xs, n, f)
                for n in OPERATORS:
                    if hasattr(array, n):
                        setattr(array, n, getattr(array, n).__wrapped__)
        ops = sum(v for k, v in counts.items() if k not in HOST_ONLY)
        print(f"  {label:<28}{ops:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
