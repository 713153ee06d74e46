#!/usr/bin/env python
"""Data-parallel training speed on the CPU: 1 process against N under mpiexec (weak scaling).

Each run trains a reference model (``xpcnn.models``) with ``fit`` on synthetic uint8 images,
``--batch-size`` samples per process, one BLAS / xpcnn thread per process
(OPENBLAS_NUM_THREADS=1: xpcnn's chunk loops use OpenBLAS's thread count). One process runs
without MPI (the distributed path is then off entirely); N processes run under ``mpiexec -n N``.
A run does ``--warmup`` untimed steps, then ``--steps`` timed ones (one ``fit`` epoch each);
images/s counts every process's images. Runs alternate between process counts, ``--repeats``
times, so that load from other programs falls on all of them alike; the table gives the median
and the range, and efficiency = images/s on N / (N x images/s on 1). On a machine that other
programs share, the CPU time all processes spent per image (waits included) is steadier:
CPU efficiency = CPU ms per image on 1 / that on N. Each N-process run also times the allreduce
alone of a float32 buffer the size of the gradients (median of 20).

    python scripts/bench_distributed.py                          # mnist, batch 64, 1 and 2
    python scripts/bench_distributed.py --model cifar --ranks 1,2 --repeats 5 --json out.json
    python scripts/bench_distributed.py --overhead --device cuda --model cifar --batch-size 512

``--overhead`` times, in one process, ``train_step`` through the distributed path (a one-rank
communicator: NCCL on a GPU, MPI on the CPU) against the plain step, alternating step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# (xpcnn is imported in the runs only, not by the launcher)
BENCHED = ("cifar", "cifar-augmented", "mnist", "notebook", "shapes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist", choices=BENCHED)
    p.add_argument("--batch-size", type=int, default=64, help="samples per process and step")
    p.add_argument("--ranks", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs per process count (default 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--overhead", action="store_true",
                   help="instead: one process, train_step with the distributed path (a one-rank "
                   "MPI or NCCL communicator) against without it, alternating")
    p.add_argument("--device", default="cpu", help="with --overhead: cpu or cuda")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overhead(args: argparse.Namespace) -> None:
    """The cost of the distributed path itself: buckets packed, summed over one rank (NCCL on
    a GPU, MPI on the CPU), the [loss, correct] pair with them; batches already on the device."""
    import numpy as np
    from mpi4py import MPI

    import xpcnn
    from xpcnn import distributed
    from xpcnn.models import INPUT_SHAPES, build_layers
    from xpcnn.ops.kernels import compute_scope

    rng = np.random.default_rng(0)
    b = args.batch_size
    x = rng.integers(0, 256, (b, *INPUT_SHAPES[args.model]), dtype=np.uint8)
    model = xpcnn.Sequential(build_layers(args.model, 10), seed=0, device=args.device)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9))
    model.build(x.shape[1:])
    xb, yb = model._to_device(x), model.backend.asarray(rng.integers(0, 10, b))
    parallel = distributed.DataParallel(model, distributed.World(0, 1, comm=MPI.COMM_WORLD))
    parallel.use_slice(0, b, b)
    times: dict[str, list[float]] = {"plain": [], "distributed path": []}
    for step in range(2 * (args.warmup + args.steps)):  # alternating, step by step
        name = "plain" if step % 2 == 0 else "distributed path"
        model._parallel = None if name == "plain" else parallel
        t = time.perf_counter()
        model.train_step(xb, yb)  # (reads the loss back: the step has ended on the device)
        if step >= 2 * args.warmup:
            times[name].append(time.perf_counter() - t)
    # The buckets' own work alone (pack, sum over the one rank, views back), on gradients of
    # the parameters' shapes (a step drops its own after the update): what the path adds to
    # a step when nothing else differs.
    xp = model.backend.xp
    for layer in model.trainable_layers:
        layer.grads.update({k: xp.zeros_like(p) for k, p in layer.params.items()})
    buckets, stats, alone = parallel.buckets, xp.zeros((2,)), []
    for _ in range(50):
        t = time.perf_counter()
        with compute_scope(model.backend):
            buckets.begin(1.0, stats)
            for layer in reversed(model.layers):
                buckets.layer_done(layer)
            buckets.finish()
            model.backend.synchronize()
        alone.append(time.perf_counter() - t)
    times["buckets alone"] = alone
    plain, dist = (statistics.median(times[k]) for k in ("plain", "distributed path"))
    print(f"{args.model}, batch {b} on {model.backend.label}, median of {len(times['plain'])} "
          f"steps each: {plain * 1e3:.2f} ms plain, {dist * 1e3:.2f} ms through the distributed "
          f"path ({dist / plain - 1:+.1%}); the buckets' work alone "
          f"{statistics.median(alone) * 1e3:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "model": args.model, "batch_size": b, "device": model.backend.label,
                       "step_s": times}, f, indent=2)


def worker(args: argparse.Namespace) -> None:
    """One run, in each process of it: rank 0 prints a JSON line."""
    import numpy as np

    import xpcnn
    from xpcnn import distributed
    from xpcnn.models import INPUT_SHAPES, build_layers

    here = distributed.world()
    per_step = args.batch_size * here.size
    rng = np.random.default_rng(0)
    n = (args.warmup + args.steps) * per_step
    x = rng.integers(0, 256, (n, *INPUT_SHAPES[args.model]), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    model = xpcnn.Sequential(build_layers(args.model, 10), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9))
    warm = args.warmup * per_step
    model.fit(x[:warm], y[:warm], batch_size=args.batch_size, verbose=0, shuffle=False)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.fit(x[warm:], y[warm:], batch_size=args.batch_size, verbose=0, shuffle=False)
    seconds = time.perf_counter() - t0  # the last step's allreduce ends every rank together
    # CPU time of every rank (waits included): what the work cost, whoever else ran meanwhile
    cpu = distributed.host_sum(here, [time.process_time() - cpu0], "bench")[0]
    allreduce_us = None
    if here.size > 1:  # the gradients' allreduce alone: one float32 buffer of every parameter
        buf = np.ones(model.count_params(), dtype=np.float32)
        times = []
        for _ in range(20):
            here.comm.Barrier()
            t = time.perf_counter()
            distributed.MpiSum(here).wait([distributed.MpiSum(here).start(buf)], "bench")
            times.append(time.perf_counter() - t)
        allreduce_us = statistics.median(times) * 1e6
    if here.is_root:
        print(json.dumps({"ranks": here.size, "seconds": seconds,
                          "images_per_s": args.steps * per_step / seconds,
                          "cpu_ms_per_image": 1e3 * cpu / (args.steps * per_step),
                          "params": model.count_params(), "allreduce_us": allreduce_us}))


def run_once(args: argparse.Namespace, ranks: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--_worker", "--model", args.model, "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        if mpiexec is None:
            sys.exit('no mpiexec: pip install -e ".[mpi]"')
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args._worker:
        worker(args)
        return
    if args.overhead:
        overhead(args)
        return
    counts = [int(r) for r in args.ranks.split(",")]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    runs: dict[int, list[float]] = {r: [] for r in counts}
    allreduce: dict[int, list[float]] = {r: [] for r in counts}
    cpu: dict[int, list[float]] = {r: [] for r in counts}
    for repeat in range(args.repeats):
        for r in counts:
            result = run_once(args, r)
            runs[r].append(result["images_per_s"])
            cpu[r].append(result["cpu_ms_per_image"])
            if result["allreduce_us"] is not None:
                allreduce[r].append(result["allreduce_us"])
            print(f"repeat {repeat + 1}: {r} process(es): {result['images_per_s']:.0f} images/s "
                  f"({result['seconds']:.2f} s for {args.steps} steps)", flush=True)
            params = result["params"]
    load_after = os.getloadavg()
    base = statistics.median(runs[counts[0]]) / counts[0]
    print(f"\n{args.model}, batch {args.batch_size} per process, {args.steps} steps, "
          f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; started {started}")
    print(f"{params:,} parameters: {4 * params / 1e6:.2f} MB of float32 gradients a step")
    print("| processes | images/s (median) | range | efficiency | CPU ms per image (median) | "
          "CPU efficiency | allreduce of the gradients |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    cpu_base = statistics.median(cpu[counts[0]])
    for r in counts:
        med, cpu_med = statistics.median(runs[r]), statistics.median(cpu[r])
        ar = statistics.median(allreduce[r]) if allreduce[r] else None
        rows.append({"ranks": r, "median": med, "min": min(runs[r]), "max": max(runs[r]),
                     "runs": runs[r], "efficiency": med / (r * base), "allreduce_us": ar,
                     "cpu_ms_per_image": cpu[r], "cpu_efficiency": cpu_base / cpu_med})
        print(f"| {r} | {med:.0f} | {min(runs[r]):.0f}-{max(runs[r]):.0f} | "
              f"{med / (r * base):.0%} | {cpu_med:.2f} | {cpu_base / cpu_med:.0%} | "
              f"{'-' if ar is None else f'{ar:.0f} us'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": started, "model": args.model, "batch_size": args.batch_size,
                       "steps": args.steps, "cores": os.cpu_count(),
                       "params": params, "load_average": [load_before, load_after],
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
