"""How close CuPy's one-launch bias gradient (``CupyKernels.sum_rows``, a float32 sum of
float16 or float32 rows) comes to the exact sum, against float32 sums in the two usual orders:
a pairwise tree over all the rows (about the best a reduction does) and one row after the other
(the worst). Runs on the CPU: the kernel compiled for it by tests/cuda_emulator.py, whose
additions come in the order the GPU makes them (the kernel fixes it; IEEE additions on both),
so its figures should be the GPU's (not checked on one). CuPy's own reductions (the standard
path) sum in an order between the two others, not reproduced here.

    PYTHONPATH=$PWD python scripts/column_sum_accuracy.py [--rows N ...]

prints, per row count and dtype, the largest error of each sum relative to the sum of the
magnitudes of its column, over 32 columns of a bias gradient's like values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # (cuda_emulator)


def pairwise(a: np.ndarray) -> np.ndarray:
    """Float32 sums of the columns of ``a`` as a balanced tree over the rows."""
    x = a.astype(np.float32)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = np.concatenate([x, np.zeros((1, x.shape[1]), x.dtype)])
        x = x[0::2] + x[1::2]
    return x[0]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--rows", type=int, nargs="+", default=[131072, 524288],
                   help="row counts (128 and 512 images of 32 x 32 pixels by default)")
    args = p.parse_args(argv)
    from cuda_emulator import load_emulated_fast_cupy, restore

    module, saved = load_emulated_fast_cupy()
    try:
        rng = np.random.default_rng(0)
        for rows in args.rows:
            for dtype in (np.float32, np.float16):
                a = (rng.standard_normal((rows, 32)) * 0.01 + 0.003).astype(dtype)
                exact = a.astype(np.float64).sum(axis=0)
                scale = np.abs(a.astype(np.float64)).sum(axis=0)
                sums = {"one launch": module.KERNELS.sum_rows(a), "pairwise": pairwise(a),
                        "row by row": a.sum(axis=0, dtype=np.float32)}
                errors = "  ".join(f"{name} {np.max(np.abs(s - exact) / scale):.1e}"
                                   for name, s in sums.items())
                print(f"{rows:>8} rows, {np.dtype(dtype).name:<8} {errors}")
    finally:
        restore(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
