#!/usr/bin/env python
"""How xpcnn's own CUDA kernels use global memory in one training step, measured on the CPU.

On a GPU the kernels of xpcnn.ops.fast_cupy (and cuda_conv's, where cuDNN does not load) are
bound by memory traffic. This runs one eager training step (forward, loss, backward, SGD with
momentum 0.9 update, uint8 images already on the device, ``cuda_graphs=False``) of each
reference model as tests/launch_counter.py runs it (the kernels compiled for the CPU by
tests/cuda_emulator.py, convolutions and matrix products on the stand-in cuDNN and NumPy),
with every launch of xpcnn's kernels traced by tests/kernel_trace.py, and prints per kernel:

- ``launches`` of it in the step;
- ``ld req`` / ``st req``: its load and store requests (a warp executing one access site once);
- ``ld s/r`` / ``st s/r``: 32-byte sectors per request: 4 for float32 data a warp uses in
  full (2 for float16, 1 for bool or a value every thread of the warp reads), up to 32 where
  each thread's element lies in a sector of its own;
- ``1 adr``: the share of load requests whose threads all read one address (a table, a
  per-channel vector, a scalar: on a GPU mostly served by L1 after the first);
- ``MB``: the sectors transferred, in MB (10**6 bytes);
- ``scat``: sectors transferred / those the bytes of each request would fill, packed (1.00:
  every request coalesced; 8 for float32 read with a stride of 32 elements);
- ``x min``: sectors transferred / the minimum, each sector the launch loads and each it
  stores moved once (1.00: nothing read twice, no sector moved for a part of it).

then the step's total, and the launches that are not traced (cuDNN graphs, cuBLAS products,
CuPy's own reductions and copies). ``--sites`` lists, for the kernels above ``--worst``
times their minimum, each access site with the line of the kernel source it is on.

    PYTHONPATH=$PWD python scripts/kernel_traffic.py                   # 4 models, batch 8
    PYTHONPATH=$PWD python scripts/kernel_traffic.py --models cifar --batch 16 --sites

Limits (see tests/kernel_trace.py): no cache is modelled (a sector read twice counts twice,
though L1 or L2 may serve it: ``x min`` is the traffic a cache must absorb, not DRAM's);
requests group a warp's threads by the count of times each ran a site (exact for uniform
loops, approximate for diverged ones); the code is GCC's at -O1, not NVRTC's, so a load
kept in a register on one is repeated on the other; atomics are counted apart from loads and
stores (in ``MB`` and ``x min``). A small batch makes the shapes of a small step: at 512 the
same kernels touch more rows, and the ratios of the kernels that loop over rows change
little, those of per-launch work (the last block's sums, the step record) fall. Needs a C++
compiler (GCC: ``-fsanitize=thread``), as tests/test_launch_counts.py does.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # (the CuPy emulator, the tracer, the launch counter)

from kernel_trace import Trace, Traffic, tracing  # noqa: E402
from launch_counter import NOT_LAUNCHES, counted_model, counting, emulated  # noqa: E402

from xpcnn.models import INPUT_SHAPES  # noqa: E402

MODELS = ["notebook", "mnist", "cifar", "mnist-bn"]
HEADER = (f"  {'kernel':34s} {'launches':>8s} {'ld req':>8s} {'ld s/r':>6s} {'st req':>8s} "
          f"{'st s/r':>6s} {'1 adr':>5s} {'MB':>7s} {'scat':>5s} {'x min':>6s}")


def row(t: Traffic) -> str:
    one_address = t.one_address_loads / t.load_requests if t.load_requests else 0.0
    return (f"  {t.name:34s} {t.launches:8d} {t.load_requests:8d} "
            f"{t.load_sectors_per_request:6.2f} {t.store_requests:8d} "
            f"{t.store_sectors_per_request:6.2f} {one_address:5.0%} {t.sectors * 32 / 1e6:7.3f} "
            f"{t.scatter:5.2f} {t.excess:6.2f}")


def traced_step(name: str, precision: str, batch: int, warmup: int, fast_cupy: Any
                ) -> tuple[Trace, collections.Counter]:
    """The trace of one eager training step after ``warmup`` steps, and the launches of it
    that are not traced, per kind."""
    with counting(fast_cupy) as counter:
        model, x, y = counted_model(name, precision, batch)
        for _ in range(warmup):
            model.train_step(x, y)
        with tracing() as trace:
            counter.active = True
            model.train_step(x, y)
            counter.active = False
    others = collections.Counter(launch.kind for launch in counter.launches
                                 if launch.kind not in (*NOT_LAUNCHES, "kernel"))
    return trace, others


def sites(trace: Trace, kernel: str) -> list[str]:
    """Kernel ``kernel``'s access sites in the step, summed over its launches: kind,
    requests, sectors per request, and the source line."""
    per_site: dict[tuple[Path, int], list[Any]] = {}
    for launch in trace.launches:
        if launch.name != kernel:
            continue
        for s in launch.sites:
            key = (launch.library, s.address)
            if key not in per_site:
                per_site[key] = [launch, s, 0, 0]
            per_site[key][2] += s.requests
            per_site[key][3] += s.sectors
    lines = []
    for launch, s, requests, sectors in sorted(per_site.values(), key=lambda v: -v[3]):
        kind = ("load", "store", "atomic")[s.kind]
        lines.append(f"      {kind:6s} {requests:7d} req {sectors / requests:6.2f} s/r  "
                     f"{trace.source(launch, s)[:90]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(INPUT_SHAPES), default=MODELS)
    p.add_argument("--precisions", nargs="+", choices=("float32", "mixed_float16"),
                   default=["float32", "mixed_float16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sites", action="store_true", help="list the access sites of the "
                   "kernels above --worst times their minimum")
    p.add_argument("--worst", type=float, default=1.2)
    args = p.parse_args(argv)
    with emulated() as fast_cupy, np.errstate(over="ignore"):  # (float16's first steps)
        for name in args.models:
            for precision in args.precisions:
                trace, others = traced_step(name, precision, args.batch, args.warmup,
                                            fast_cupy)
                print(f"{name}, {precision}, batch {args.batch}: one training step")
                print(HEADER)
                for t in trace.by_kernel():
                    print(row(t))
                    if args.sites and t.excess > args.worst:
                        print("\n".join(sites(trace, t.name)))
                total = trace.total()
                print(row(total))
                print(f"  {total.bytes_requested / 1e6:.3f} MB requested, "
                      f"{total.unique_bytes / 1e6:.3f} MB distinct; not traced: "
                      + (", ".join(f"{kind} {k}" for kind, k in others.most_common())
                         or "nothing"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
