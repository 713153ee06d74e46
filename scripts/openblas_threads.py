#!/usr/bin/env python
"""How OpenBLAS's single-threaded products behave on this machine, for the NumPy fast path's
threading (it holds OpenBLAS to one thread and runs products on its own threads, see
xpcnn/ops/fast_numpy.py): one product on one thread, two at once on two threads, before and
after OpenBLAS's own thread server has run once in the process, against OpenBLAS's two threads
and the fast path's row split. Each state in a fresh process (the thread server, once started,
stays). Median ms of ``--repeat`` calls.

    python scripts/openblas_threads.py                       # (128, 6272) @ (6272, 128)
    python scripts/openblas_threads.py --shape 288,6272,32   # M,K,N (a kernel gradient's)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from xpcnn.backend import get_backend
from xpcnn.ops.fast_numpy import KERNELS as FAST
from xpcnn.ops.kernels import compute_scope
m, k, n, repeat, warm, idle = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
a = rng.standard_normal((m, k), dtype=np.float32)
b = rng.standard_normal((k, n), dtype=np.float32)
outs = [np.empty((m, n), np.float32) for _ in range(2)]

def ms(f):
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))

if warm:  # OpenBLAS's thread server run once, then left to go idle
    FAST._blas.set(FAST._cores)
    a @ b
    time.sleep(idle)
FAST._blas.set(1)
pool = ThreadPoolExecutor(2)
two = lambda: [f.result() for f in [pool.submit(np.matmul, a, b, out=o) for o in outs]]
result = {"one product, one thread": ms(lambda: np.matmul(a, b, out=outs[0])),
          "two products at once, two threads": ms(two)}
FAST._blas.set(FAST._cores)  # (as a process starts: the fast path pins it in a step)
with compute_scope(get_backend("cpu")):
    result["the fast path's product (rows split over its threads)"] = ms(
        lambda: FAST.matmul(a, b))
result[f"OpenBLAS's own {FAST._cores} threads"] = ms(lambda: np.matmul(a, b, out=outs[0]))
print(json.dumps(result))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--shape", default="128,6272,128", help="M,K,N of (M, K) @ (K, N)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--idle", type=float, default=1.5, metavar="SECONDS",
                   help="how long OpenBLAS's thread server is left to go idle after its run "
                   "(default 1.5; a dry run may take 0)")
    args = p.parse_args(argv)
    m, k, n = (int(v) for v in args.shape.split(","))
    from xpcnn.ops.fast_numpy import KERNELS

    if KERNELS._blas.set is None:
        print("OpenBLAS's thread control was not found in this NumPy: nothing to measure",
              file=sys.stderr)
        return 2
    print(f"float32 ({m}, {k}) @ ({k}, {n}), median ms of {args.repeat} calls "
          f"({2 * m * k * n / 1e9:.2f} GFLOP a product)")
    for warm in (False, True):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([m, k, n, args.repeat,
                                                                       warm, args.idle])],
                             capture_output=True, text=True, check=True)
        state = ("after OpenBLAS's thread server ran once" if warm
                 else "before OpenBLAS's thread server ever ran")
        print(f"{state} ({time.perf_counter() - start:.0f} s):")
        for what, value in json.loads(out.stdout).items():
            print(f"  {what:<55}{value:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
