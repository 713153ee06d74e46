"""GPU training and inference speed: xpcnn on CuPy against PyTorch CUDA eager (cuDNN).

For each reference model (notebook, mnist, cifar), batch size (128, 512) and precision
(float32, mixed_float16): training-step and inference images/s of both, timed with device
synchronisation (median of per-step times after warm-up, in blocks of one library then the
other), and peak GPU memory of a training step (CuPy: the memory pool's high-water mark of
used bytes; PyTorch: ``torch.cuda.max_memory_allocated``).

    python scripts/bench_gpu.py --json gpu.json              # on a machine with a CUDA GPU
    python scripts/bench_gpu.py --device cpu --steps 2 --batch-sizes 8   # dry run on the CPU

Mixed precision on the PyTorch side is ``torch.autocast(dtype=float16)`` with a GradScaler,
the standard recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")

import xpcnn  # noqa: E402
from xpcnn.models import build_layers  # noqa: E402

SHAPES = {"notebook": (32, 32, 3), "mnist": (28, 28, 1), "cifar": (32, 32, 3)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import cupy

        cupy.cuda.Device().synchronize()
        try:
            import torch

            torch.cuda.synchronize()
        except ImportError:
            pass


def timed(fn: Any, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class XpcnnPeak:
    """High-water mark of CuPy pool bytes in use, sampled after every step."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0
        if device.startswith("cuda"):
            import cupy

            self.pool = cupy.get_default_memory_pool()
            self.pool.free_all_blocks()
            self.base = self.pool.used_bytes()

    def sample(self) -> None:
        if self.device.startswith("cuda"):
            self.peak = max(self.peak, self.pool.used_bytes() - self.base)


def bench_xpcnn(name: str, batch: int, precision: str, args: argparse.Namespace
                ) -> dict[str, Any]:
    shape = SHAPES[name]
    model = xpcnn.Sequential(build_layers(name), input_shape=shape, device=args.device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, batch)
    # Batches already on the device: this measures the step, not the PCIe copy.
    xb = model._to_device(x)
    yb = model.backend.asarray(y)
    peak = XpcnnPeak(args.device)

    def train() -> None:
        model.train_step(xb, yb)
        peak.sample()

    def infer() -> None:
        model._logits(xb, training=False)

    t_train = timed(train, args.steps, args.warmup, args.device)
    t_infer = timed(infer, args.steps, args.warmup, args.device)
    return {"train_img_s": batch / t_train, "infer_img_s": batch / t_infer,
            "peak_mib": peak.peak / 2**20 if args.device.startswith("cuda") else None,
            "model": model}


def bench_torch(model: xpcnn.Sequential, batch: int, precision: str,
                args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        import torch
        from torch_mirror import mirror
    except ImportError:
        return None
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    net = mirror(model, torch.float32, exact_random=False).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    shape = model.input_shape
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (batch, *shape)).astype(np.float32)).to(dev)
    y = torch.from_numpy(rng.integers(0, 10, batch)).to(dev)
    mixed = precision == "mixed_float16" and dev == "cuda"
    scaler = torch.amp.GradScaler(enabled=mixed)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()

    def train() -> None:
        net.train()
        with torch.autocast(dev, dtype=torch.float16, enabled=mixed):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer() -> None:
        net.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=torch.float16, enabled=mixed):
            net(x)

    t_train = timed(train, args.steps, args.warmup, args.device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    t_infer = timed(infer, args.steps, args.warmup, args.device)
    return {"train_img_s": batch / t_train, "infer_img_s": batch / t_infer, "peak_mib": peak}


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="notebook,mnist,cifar")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--precisions", default="float32,mixed_float16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()
    rows = []
    header = (f"{'model':<9}{'batch':>6} {'precision':<14}{'xpcnn train':>12}{'torch train':>12}"
              f"{'ratio':>7}{'xpcnn infer':>12}{'torch infer':>12}{'ratio':>7}"
              f"{'xpcnn MiB':>10}{'torch MiB':>10}")
    print(f"device: {card_name(args.device)}; images/s, median of {args.steps} steps")
    print(header)
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for precision in args.precisions.split(","):
                try:
                    ours = bench_xpcnn(name, batch, precision, args)
                except xpcnn.XpcnnError as e:
                    print(f"{name:<9}{batch:>6} {precision:<14}skipped: {e}")
                    continue
                theirs = bench_torch(ours.pop("model"), batch, precision, args) or {}
                row = {"model": name, "batch": batch, "precision": precision,
                       "xpcnn": ours, "torch": theirs}
                rows.append(row)

                def ratio(key: str, row: dict = row) -> str:
                    t = row["torch"].get(key)
                    return f"{row['xpcnn'][key] / t:>6.2f}x" if t else f"{'-':>7}"

                def mib(v: float | None) -> str:
                    return f"{v:>10.0f}" if v else f"{'-':>10}"

                print(f"{name:<9}{batch:>6} {precision:<14}{ours['train_img_s']:>12.0f}"
                      f"{theirs.get('train_img_s', float('nan')):>12.0f}{ratio('train_img_s')}"
                      f"{ours['infer_img_s']:>12.0f}"
                      f"{theirs.get('infer_img_s', float('nan')):>12.0f}{ratio('infer_img_s')}"
                      f"{mib(ours['peak_mib'])}{mib(theirs.get('peak_mib'))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": card_name(args.device), "date": datetime.now(timezone.utc)
                       .isoformat(timespec="seconds"), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
