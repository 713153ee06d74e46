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
import gc
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
from xpcnn import backend as backend_module  # noqa: E402
from xpcnn.backend import set_fast_path  # noqa: E402
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


class PeakMemory:
    """Peak device bytes in use during a few training steps, above what was in use before the
    model was built (both libraries: parameters, optimiser state, batch and every temporary).

    CuPy's pool keeps no high-water mark, so its allocator is wrapped while measuring (not
    while timing) and reads the bytes in use after every allocation; PyTorch has
    ``max_memory_allocated``.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        gc.collect()
        if self.cuda:
            import cupy

            self.pool = cupy.get_default_memory_pool()
            self.pool.free_all_blocks()
            self.base = self.pool.used_bytes()

    def xpcnn(self, step: Any, steps: int = 3) -> float | None:
        if not self.cuda:
            return None
        import cupy

        peak = [self.pool.used_bytes()]

        def alloc(size: int) -> Any:
            mem = self.pool.malloc(size)
            peak[0] = max(peak[0], self.pool.used_bytes())
            return mem

        cupy.cuda.set_allocator(alloc)
        try:
            for _ in range(steps):
                step()
            sync("cuda")
        finally:
            cupy.cuda.set_allocator(self.pool.malloc)
        return (peak[0] - self.base) / 2**20


def build_xpcnn(name: str, batch: int, precision: str, device: str) -> tuple[Any, Any, Any]:
    shape = SHAPES[name]
    model = xpcnn.Sequential(build_layers(name), input_shape=shape, device=device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, batch)
    # Batches already on the device: this measures the step, not the PCIe copy.
    return model, model._to_device(x), model.backend.asarray(y)


def bench_xpcnn(name: str, batch: int, precision: str, fast: bool, args: argparse.Namespace
                ) -> dict[str, Any]:
    """Images/s of a training step and of inference; with ``fast`` False, the standard
    Array API path (``set_fast_path(False)``) on the same device."""
    old = set_fast_path(fast)
    try:
        mem = PeakMemory(args.device)
        model, xb, yb = build_xpcnn(name, batch, precision, args.device)

        def train() -> None:
            model.train_step(xb, yb)

        def infer() -> None:
            model._logits(xb, training=False)

        t_train = timed(train, args.steps, args.warmup, args.device)
        t_infer = timed(infer, args.steps, args.warmup, args.device)
        peak = mem.xpcnn(train) if fast else None
    finally:
        set_fast_path(old)
    return {"train_img_s": batch / t_train, "infer_img_s": batch / t_infer, "peak_mib": peak,
            "model": model}


def profile_layers(name: str, batch: int, precision: str, args: argparse.Namespace) -> None:
    """Per-layer forward and backward time of one training step (synchronised after each
    layer, median of ``args.steps``), to see where a step's time goes."""
    model, xb, _ = build_xpcnn(name, batch, precision, args.device)
    steps = model._plan().steps  # as a training step runs them (ReLU() layers fused)
    layers = [s.layer for s in steps]
    xp = model.backend.xp
    fwd: dict[int, list[float]] = {i: [] for i in range(len(layers))}
    bwd: dict[int, list[float]] = {i: [] for i in range(len(layers))}
    with model.backend.compute_scope():
        for rep in range(args.warmup + args.steps):
            x = xb
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                x = layer.forward(x, True, steps[i].options)
                sync(args.device)
                if rep >= args.warmup:
                    fwd[i].append(time.perf_counter() - t0)
            dy = xp.ones_like(x) / batch
            for i in reversed(range(len(layers))):
                t0 = time.perf_counter()
                dy = layers[i].backward(dy, steps[i].options)
                sync(args.device)
                if rep >= args.warmup:
                    bwd[i].append(time.perf_counter() - t0)
                if dy is None:
                    break
    print(f"\nper layer, {name} batch {batch} {precision}, fast path "
          f"{'on' if model.backend.fast is not None else 'off'} (ms, median of {args.steps})")
    total_f = total_b = 0.0
    for i, layer in enumerate(layers):
        f = statistics.median(fwd[i]) * 1e3
        b = statistics.median(bwd[i]) * 1e3 if bwd[i] else 0.0
        total_f, total_b = total_f + f, total_b + b
        print(f"  {layer.name:<24}{f:>8.3f}{b:>8.3f}")
    print(f"  {'total':<24}{total_f:>8.3f}{total_b:>8.3f}")


def bench_torch(model: xpcnn.Sequential, batch: int, precision: str,
                args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        import torch
        from torch_mirror import mirror
    except ImportError:
        return None
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    gc.collect()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    # The twin without its leading NHWC -> NCHW permute, fed NCHW with NCHW's own strides
    # (a permuted NHWC batch has channels-last strides, and cuDNN then runs channels-last),
    # or, with --torch-channels-last, PyTorch's channels-last layout throughout.
    layout = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    net = mirror(model, torch.float32, exact_random=False)[1:].to(dev, memory_format=layout)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    shape = model.input_shape
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *shape)).astype(np.float32).transpose(0, 3, 1, 2)
    x = torch.from_numpy(images).to(dev).clone(memory_format=layout)
    y = torch.from_numpy(rng.integers(0, 10, batch)).to(dev)
    mixed = precision == "mixed_float16" and dev == "cuda"
    scaler = torch.amp.GradScaler(enabled=mixed)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True

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
    peak = None
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            train()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_infer = timed(infer, args.steps, args.warmup, args.device)
    return {"train_img_s": batch / t_train, "infer_img_s": batch / t_infer, "peak_mib": peak}


def software(device: str) -> dict[str, Any]:
    """Versions and the settings that decide float32 matmul precision on each side."""
    info: dict[str, Any] = {"xpcnn": xpcnn.__version__, "numpy": np.__version__}
    if device.startswith("cuda"):
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_tf32"] = os.environ.get("CUPY_TF32", "0")
    try:
        import torch

        info["torch"] = torch.__version__
        if device.startswith("cuda"):
            info["cudnn"] = torch.backends.cudnn.version()
            info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
            info["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    except ImportError:
        pass
    return info


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
    p.add_argument("--no-standard", action="store_true",
                   help="skip xpcnn's standard Array API path (the 'std' columns)")
    p.add_argument("--profile", action="append", default=[], metavar="MODEL:BATCH:PRECISION",
                   help="also print per-layer times of this configuration (repeatable)")
    p.add_argument("--gpu-chunk-mb", type=float, default=None, metavar="MB",
                   help="im2col scratch bound on the GPU (xpcnn.backend.GPU_CHUNK_BYTES; "
                   "0: whole batch at once)")
    p.add_argument("--gpu-conv", choices=("direct", "tiled", "direct-forward", "im2col"),
                   default="tiled",
                   help="convolution algorithm of the CuPy kernels (CupyKernels."
                   "set_conv_algorithm): tiled kernels (the default), one-element-per-thread "
                   "direct kernels, direct forward with an im2col + cuBLAS kernel gradient, or "
                   "im2col + cuBLAS")
    p.add_argument("--torch-channels-last", action="store_true",
                   help="PyTorch in its channels-last layout (default: NCHW, as in bench.py)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        from xpcnn.ops.fast_cupy import KERNELS

        KERNELS.set_conv_algorithm(args.gpu_conv)
    if args.gpu_chunk_mb is not None:
        backend_module.GPU_CHUNK_BYTES = int(args.gpu_chunk_mb * 2**20) or None
    rows = []
    header = (f"{'model':<9}{'batch':>6} {'precision':<14}{'train':>8}{'std':>8}{'torch':>8}"
              f"{'ratio':>7}  {'infer':>8}{'std':>8}{'torch':>8}{'ratio':>7}"
              f"{'MiB':>7}{'torch':>7}{'ratio':>7}")
    info = software(args.device)
    info["torch_memory_format"] = "channels_last" if args.torch_channels_last else "nchw"
    if args.device.startswith("cuda"):
        info["gpu_conv"] = args.gpu_conv
        info["gpu_chunk_bytes"] = backend_module.GPU_CHUNK_BYTES
    print(f"device: {card_name(args.device)}; {info}")
    print(f"xpcnn images/s (fast path, and 'std' = standard Array API path) against PyTorch "
          f"eager; median of {args.steps} steps; MiB = peak memory of a training step")
    print(header)
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for precision in args.precisions.split(","):
                try:
                    std = (None if args.no_standard
                           else bench_xpcnn(name, batch, precision, False, args))
                except xpcnn.XpcnnError as e:  # e.g. a precision the backend lacks
                    print(f"{name:<9}{batch:>6} {precision:<14}skipped: {e}")
                    continue
                try:
                    ours = bench_xpcnn(name, batch, precision, True, args)
                except Exception as e:  # reported, and the other columns still measured
                    print(f"{name:<9}{batch:>6} {precision:<14}fast path failed: "
                          f"{type(e).__name__}: {str(e)[:300]}")
                    if std is None:
                        continue
                    ours = {"train_img_s": None, "infer_img_s": None, "peak_mib": None,
                            "model": std["model"]}
                if std is not None:
                    std.pop("model")
                theirs = bench_torch(ours.pop("model"), batch, precision, args) or {}
                row = {"model": name, "batch": batch, "precision": precision,
                       "xpcnn": ours, "xpcnn_standard": std, "torch": theirs}
                rows.append(row)

                def rate(v: float | None) -> str:
                    return f"{v:>8.0f}" if v else f"{'-':>8}"

                def ratio(a: float | None, b: float | None) -> str:
                    return f"{a / b:>6.2f}x" if a and b else f"{'-':>7}"

                def get(d: dict | None, key: str) -> float | None:
                    return d.get(key) if d else None

                print(f"{name:<9}{batch:>6} {precision:<14}"
                      f"{rate(ours['train_img_s'])}{rate(get(std, 'train_img_s'))}"
                      f"{rate(get(theirs, 'train_img_s'))}"
                      f"{ratio(ours['train_img_s'], get(theirs, 'train_img_s'))}  "
                      f"{rate(ours['infer_img_s'])}{rate(get(std, 'infer_img_s'))}"
                      f"{rate(get(theirs, 'infer_img_s'))}"
                      f"{ratio(ours['infer_img_s'], get(theirs, 'infer_img_s'))}"
                      f"{rate(ours['peak_mib'])[1:]}{rate(get(theirs, 'peak_mib'))[1:]}"
                      f"{ratio(ours['peak_mib'], get(theirs, 'peak_mib'))}", flush=True)
    for spec in args.profile:
        name, batch, precision = spec.split(":")
        for fast in (True, False):
            old = set_fast_path(fast)
            try:
                profile_layers(name, int(batch), precision, args)
            finally:
                set_fast_path(old)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": card_name(args.device), "software": info,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
