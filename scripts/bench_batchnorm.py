#!/usr/bin/env python
"""BatchNorm2D's CPU training step (forward in training mode, then backward with the input
gradient) against PyTorch's nn.BatchNorm2d, with and without a fused ReLU, float32, at the
shapes of the reference models (``mnist-bn``, ``resnet20``), and against an older copy of xpcnn
where ``--old`` names one (e.g. ``git archive HEAD xpcnn | tar -x -C /tmp/old``).

Block timing (perf-notes: alternating single steps of two libraries slows the second one):
each round runs a block of ``--steps`` steps of each side in turn (old, new, torch), after
``--warmup`` untimed ones; a side's figure is the median over ``--rounds`` rounds of its blocks'
median step. PyTorch gets channels_last input and module (NHWC, as xpcnn's) and, as xpcnn's
layer, keeps what its backward needs; its backward is ``torch.autograd.grad`` of the input,
weight and bias. xpcnn's output is dropped before its backward (as before a pooling layer):
with ``--hold-y`` it is held (as by a convolution after it), so the ReLU's kept y cannot
become dx.

    python scripts/bench_batchnorm.py --threads 1 --old /tmp/old
    python scripts/bench_batchnorm.py --threads 2 --shapes 128x28x28x16,32x8x8x64
    python scripts/bench_batchnorm.py --old /tmp/old --offset 20 --beta-per-gamma 20

x ~ N(0, 1), gamma in [0.5, 1.5] and beta in [-0.2, 0.2] by default: xpcnn's backward sums x
(or the ReLU's output) itself there; ``--offset`` and ``--beta-per-gamma`` time its guarded
regime (a mean far from 0 against the spread, beta far from 0 against gamma: x - mean summed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Any

# (batch, height, width, channels): mnist-bn's and resnet20's BatchNorm inputs
SHAPES = ("128x28x28x8", "128x28x28x16", "128x14x14x32", "128x28x28x32", "128x14x14x64",
          "128x7x7x128", "32x32x32x16", "32x16x16x32", "32x8x8x64", "128x32x32x16",
          "128x16x16x32", "128x8x8x64")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="OpenBLAS/OMP and PyTorch threads")
    p.add_argument("--shapes", default=",".join(SHAPES), help="NxHxWxC, comma-separated")
    p.add_argument("--old", default=None, metavar="DIR",
                   help="a directory holding an older xpcnn package, timed beside this one")
    p.add_argument("--steps", type=int, default=10, help="timed steps per block (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="blocks per side (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per block (default 2)")
    p.add_argument("--hold-y", action="store_true",
                   help="keep xpcnn's output alive through its backward")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: the calling thread's CPU time (one thread only: time other "
                   "processes on a shared machine take is left out)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--offset", type=float, default=0.0, metavar="K",
                   help="x's mean, in units of its spread (default 0; past 2 xpcnn's backward "
                   "sums x - mean: its slower, guarded regime)")
    p.add_argument("--beta-per-gamma", type=float, default=0.0, metavar="R",
                   help="beta about R * gamma (default 0; past 2, with the ReLU, xpcnn's "
                   "backward sums x, not its output y)")
    args = p.parse_args(argv)
    # (checked here, before PyTorch or NumPy loads: a bare traceback from inside either else)
    if args.threads < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--threads, --steps and --rounds must be >= 1, --warmup >= 0")
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread times the calling thread: only with --threads 1")
    if not all(abs(v) < float("inf") for v in (args.offset, args.beta_per_gamma)):
        raise SystemExit("--offset and --beta-per-gamma must be finite numbers")
    return args


ARGS = parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # (before NumPy loads OpenBLAS: fixed at load time)

import numpy as np  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def load_xpcnn(parent: str, name: str) -> Any:
    """The xpcnn package under ``parent`` imported as module ``name`` (its imports are
    relative, so two copies live side by side)."""
    init = os.path.join(parent, "xpcnn", "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--old {parent!r}: no xpcnn/__init__.py there")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parameters(c: int) -> tuple[Any, Any]:
    """(gamma, beta) for ``c`` channels, both sides': gamma in [0.5, 1.5], beta in [-0.2,
    0.2] plus ``--beta-per-gamma`` times gamma."""
    gamma = np.linspace(0.5, 1.5, c, dtype=np.float32)
    return gamma, (np.linspace(-0.2, 0.2, c) + ARGS.beta_per_gamma * gamma).astype(np.float32)


def xpcnn_step(package: str, shape: tuple[int, ...], relu: bool, x: Any, dy: Any
               ) -> tuple[Any, Any]:
    """(forward in training mode, backward) of a built BatchNorm2D of ``package``."""
    layers = sys.modules[f"{package}.layers"]
    base = sys.modules[f"{package}.layers.base"]
    kernels = sys.modules[f"{package}.ops.kernels"]
    backend = sys.modules[package].get_backend("cpu")
    layer = layers.BatchNorm2D()
    layer.build(shape[1:], backend="cpu", rng=np.random.default_rng(0))
    layer.params["gamma"][...], layer.params["beta"][...] = parameters(shape[-1])
    options = base.Options(fused_relu=relu)
    held = []

    def forward() -> None:
        held.clear()
        with kernels.compute_scope(backend):
            y = layer.forward(x, training=True, options=options)
        if ARGS.hold_y:
            held.append(y)

    def backward() -> None:
        with kernels.compute_scope(backend):
            layer.backward(dy, options)

    return forward, backward


def torch_step(torch: Any, shape: tuple[int, ...], relu: bool, x: Any, dy: Any
               ) -> tuple[Any, Any]:
    c = shape[-1]
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        gamma, beta = parameters(c)
        bn.weight[...] = torch.from_numpy(gamma)
        bn.bias[...] = torch.from_numpy(beta)
    net = torch.nn.Sequential(bn, torch.nn.ReLU()) if relu else torch.nn.Sequential(bn)
    net = net.to(memory_format=torch.channels_last).train()

    def nchw(a: Any) -> Any:  # (NHWC memory, NCHW view: channels_last)
        return torch.from_numpy(a).permute(0, 3, 1, 2)

    xt, gt = nchw(x).requires_grad_(True), nchw(dy)
    out = []

    def forward() -> None:
        out[:] = [net(xt)]

    def backward() -> None:
        torch.autograd.grad(out.pop(), [xt, bn.weight, bn.bias], gt)

    return forward, backward


def shape_of(spec: str) -> tuple[int, ...]:
    """(N, H, W, C) from "NxHxWxC"."""
    try:
        shape = tuple(int(d) for d in spec.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--shapes: {spec!r} is not NxHxWxC (four positive whole numbers)")
    return shape


def block(forward: Any, backward: Any) -> tuple[float, float]:
    """Median ms of (forward + backward, backward) over one block of steps."""
    clock = time.thread_time if ARGS.clock == "thread" else time.perf_counter
    both, back = [], []
    for i in range(ARGS.warmup + ARGS.steps):
        t0 = clock()
        forward()
        t1 = clock()
        backward()
        t2 = clock()
        if i >= ARGS.warmup:
            both.append(t2 - t0)
            back.append(t2 - t1)
    return statistics.median(both) * 1e3, statistics.median(back) * 1e3


def main() -> None:
    try:
        if ARGS.no_torch:
            raise ImportError
        import torch
        torch.set_num_threads(ARGS.threads)
    except ImportError:
        torch = None
    shapes = [shape_of(spec) for spec in ARGS.shapes.split(",")]
    load_xpcnn(ROOT, "xpcnn")
    sides = ["new"]
    if ARGS.old:
        load_xpcnn(ARGS.old, "xpcnn_old")
        sides.insert(0, "old")
    if torch is not None:
        sides.append("torch")
    print(f"threads {ARGS.threads}, float32, block timing: {ARGS.rounds} rounds x "
          f"{ARGS.steps} steps per side (median of block medians), {ARGS.clock} clock, y "
          f"{'held' if ARGS.hold_y else 'dropped'}, x ~ N({ARGS.offset:g}, 1), beta ~ "
          f"{ARGS.beta_per_gamma:g} gamma; ms")
    head = "".join(f" {s + ' f+b':>10s} {s + ' bwd':>9s}" for s in sides)
    ratios = "  new/torch (f+b, bwd)" if torch is not None else ""
    print(f"{'shape':>14s} {'relu':>4s}{head}{ratios}"
          + ("  new/old bwd" if ARGS.old else ""))
    rng = np.random.default_rng(0)
    for spec, shape in zip(ARGS.shapes.split(","), shapes, strict=True):
        x = (rng.standard_normal(shape) + ARGS.offset).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        for relu in (True, False):
            steps = {s: (torch_step(torch, shape, relu, x, dy) if s == "torch" else
                         xpcnn_step("xpcnn" if s == "new" else "xpcnn_old", shape, relu, x, dy))
                     for s in sides}
            times: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
            for _ in range(ARGS.rounds):
                for s in sides:
                    times[s].append(block(*steps[s]))
            med = {s: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
                   for s, v in times.items()}
            line = f"{spec:>14s} {'yes' if relu else 'no':>4s}" + "".join(
                f" {med[s][0]:10.3f} {med[s][1]:9.3f}" for s in sides)
            if torch is not None:
                line += (f"  {med['new'][0] / med['torch'][0]:5.2f}x "
                         f"{med['new'][1] / med['torch'][1]:5.2f}x")
            if ARGS.old:
                line += f"  {med['new'][1] / med['old'][1]:5.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
