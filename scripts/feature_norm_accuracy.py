"""How close CuPy's one-launch FeatureNorm (``CupyKernels.feature_norm`` and its gradient: a
block per image and 32 channels, its sums in a fixed order, float32 for float16 data) comes to
the exact values, against the standard version on NumPy (its pairwise sums). Runs on the CPU:
the kernels compiled for it by tests/cuda_emulator.py, whose additions come in the order the
GPU makes them (the kernels fix it), though the GPU may fuse a product and a sum into one
rounding where the emulator rounds twice, so its figures should be the GPU's to within that
(not checked on one). CuPy's own reductions (the standard path on a GPU) are not reproduced.

    PYTHONPATH=$PWD python scripts/feature_norm_accuracy.py

prints, per shape and dtypes (computed in, read and given in), the largest error of the output
xhat (in the dtype given in), of 1 / sqrt(var + eps) and of the input's gradient (backward
recomputing xhat from the input and forward's statistics), relative to the largest exact value
(long double, from the input and dy alone; for the gradient, relative to max |inv_std| *
max |dy|).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # (cuda_emulator)


def exact(x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """xhat, 1 / sqrt(var + eps) and the input's gradient in long double."""
    x, dy = (a.astype(np.longdouble) for a in (x, dy))
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    inv = 1 / np.sqrt((centred * centred).mean(axis=(1, 2), keepdims=True) + 1e-5)
    xh = centred * inv
    grad = inv * (dy - dy.mean(axis=(1, 2), keepdims=True)
                  - xh * (dy * xh).mean(axis=(1, 2), keepdims=True))
    return xh, inv, grad


def main() -> int:
    import array_api_compat.numpy as xpn
    from cuda_emulator import load_emulated_fast_cupy, restore

    from xpcnn.ops.kernels import StandardKernels

    module, saved = load_emulated_fast_cupy()
    try:
        rng = np.random.default_rng(0)
        for shape in [(128, 30, 30, 32), (4, 224, 224, 3)]:
            for dtype, io in [(np.float32, np.float32), (np.float32, np.float16)]:
                x = (rng.standard_normal(shape) * 3 + 1).astype(io)
                dy = rng.standard_normal(shape).astype(io)
                line = []
                for name, k in (("one launch", module.KERNELS), ("numpy", StandardKernels(xpn))):
                    xhat, mean, inv_std = k.feature_norm(x, 1e-5, dtype, io)
                    dx = k.feature_norm_backward(dy, x, mean, inv_std, False)
                    xhat_e, inv_e, dx_e = exact(x, dy)
                    grad_scale = np.abs(inv_e).max() * np.abs(dy).max()
                    errors = [np.abs(a - e).max() / s for a, e, s in
                              ((xhat, xhat_e, np.abs(xhat_e).max()),
                               (inv_std, inv_e, np.abs(inv_e).max()), (dx, dx_e, grad_scale))]
                    line.append(f"{name}: xhat {errors[0]:.1e} inv_std {errors[1]:.1e} "
                                f"dx {errors[2]:.1e}")
                print(f"{shape}, {np.dtype(dtype).name} from {np.dtype(io).name}:  "
                      + "   ".join(line))
    finally:
        restore(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
