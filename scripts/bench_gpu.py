"""GPU training and inference speed: xpcnn on CuPy against PyTorch CUDA eager (cuDNN).

For each reference model (notebook, mnist, cifar), batch size (128, 512) and precision
(float32, mixed_float16):
- images/s through ``fit`` on host uint8 images, as users call it (``--fit-batches`` batches
  an epoch, shuffled, after a warm-up epoch; CUDA graphs as ``compile`` sets them by default,
  and why not where they are off);
- training-step and inference images/s of xpcnn and PyTorch, timed with device
  synchronisation (median of per-step times after warm-up, in blocks of one library then the
  other), batches already on the GPU;
- the training step's achieved TFLOP/s (3x the forward pass's convolution and Dense
  multiply-adds, times two) and its share of the GPU's datasheet peak for that precision
  (float32 with TF32 on: the TF32 tensor-core peak);
- peak GPU memory of a training step (CuPy: the memory pool's high-water mark of used bytes,
  plus every byte held by the pool of a step captured in a CUDA graph, whose replays allocate
  nothing; PyTorch: ``torch.cuda.max_memory_allocated``).

``--conv-layers MODEL:BATCH:PRECISION`` also times each distinct convolution geometry's three
operations (MODEL a stack or a network, resnet20's stride-2 layers among them) with cuDNN (its
plans chosen by timing, as by default, and the heuristics' first plans), with xpcnn's
hand-written CUDA kernels (where a strided input gradient runs on the gather, on im2col +
cuBLAS too) and with PyTorch; ``--kernels MODEL:BATCH:PRECISION``
counts what the GPU runs in a training step (kernels, copies, memsets, the kernels' time and
the costliest ones), for xpcnn eager and replayed and for PyTorch eager; ``--loss-kernels
BATCH`` times the softmax cross-entropy's kernel at 10, 100 and 1000 classes against the
standard version and PyTorch.

    python scripts/bench_gpu.py --json gpu.json              # on a machine with a CUDA GPU
    python scripts/bench_gpu.py --device cpu --steps 2 --batch-sizes 8   # dry run on the CPU

Mixed precision on the PyTorch side is ``torch.autocast(dtype=float16)`` with a GradScaler,
the standard recipe; ``--precisions mixed_bfloat16`` compares with ``torch.autocast(
dtype=bfloat16)``, which needs no scaler.
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
from functools import partial
from typing import Any
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")

import xpcnn  # noqa: E402
from xpcnn import backend as backend_module  # noqa: E402
from xpcnn.backend import set_fast_path  # noqa: E402
from xpcnn.models import INPUT_SHAPES, build_layers  # noqa: E402
from xpcnn.ops.kernels import compute_scope, fast_kernels  # noqa: E402


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
    ``max_memory_allocated``. A step replayed from a CUDA graph allocates nothing: its
    temporaries live in the graphs' own pool (:class:`xpcnn.cuda_graphs.CupyCapture`), all of
    whose bytes count, in use or cached (the graphs address them at every replay).
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        gc.collect()
        if self.cuda:
            import cupy

            self.pool = cupy.get_default_memory_pool()
            self.pool.free_all_blocks()
            self.base = self.pool.used_bytes()

    def xpcnn(self, model: Any, step: Any, steps: int = 3) -> float | None:
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
        capture = getattr(model._graphs, "capture", None)  # (None: the steps ran eagerly)
        held = capture.pool.total_bytes() if capture is not None else 0
        return (peak[0] - self.base + held) / 2**20


# Datasheet peaks, dense, in TFLOP/s (H100 / H200 SXM: the same compute): the CUDA cores'
# float32, the tensor cores' TF32 and float16 (bfloat16's is the same). Not measured here.
PEAK_TFLOPS = {"H200": {"float32": 67.0, "tf32": 494.7, "float16": 989.4},
               "H100": {"float32": 67.0, "tf32": 494.7, "float16": 989.4}}


def peak_tflops(card: str, precision: str) -> float | None:
    """The datasheet peak of the product xpcnn runs for ``precision`` on ``card``."""
    kind = ("float16" if precision.startswith("mixed_")
            else "tf32" if os.environ.get("XPCNN_TF32", "1") != "0" else "float32")
    return next((peaks[kind] for key, peaks in PEAK_TFLOPS.items() if key in card), None)


def forward_flops(model: Any) -> int:
    """Multiply-adds times two of one image's forward pass through the convolutions and
    Dense layers (the rest is a few percent)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, xpcnn.layers.Conv2D):
            total += layer.geometry.flops(1)
        elif isinstance(layer, xpcnn.layers.Dense):
            total += 2 * layer.input_shape[0] * layer.units
    return total


def bench_fit(name: str, batch: int, precision: str, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Images/s of ``fit`` on host uint8 images: one warm-up epoch, then one timed."""
    shape = INPUT_SHAPES[name]
    rng = np.random.default_rng(1)
    n = batch * args.fit_batches
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    model = xpcnn.Sequential(build_layers(name), input_shape=shape, device=args.device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision)
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0)
    sync(args.device)
    t0 = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0)
    sync(args.device)
    return {"fit_img_s": n / (time.perf_counter() - t0),
            "cuda_graphs": model.cuda_graphs_reason or "captured"}


def torch_conv_ops(g: Any, x: Any, w: Any, b: Any, dy: Any, device: str = "cuda"
                   ) -> list[Any] | None:
    """PyTorch's forward (+ bias and ReLU), input gradient and kernel + bias gradient of
    geometry ``g`` on the same CuPy arrays, channels-last (NHWC memory read as NCHW tensors),
    ``cudnn.benchmark`` on; None without PyTorch or CUDA (the emulated kernels' dry run), or
    where the padding is uneven (no one ``conv2d`` takes it)."""
    try:
        import torch
    except ImportError:
        return None
    top, bottom, left, right = g.pads
    if (top, left) != (bottom, right) or not device.startswith("cuda"):
        return None
    torch.backends.cudnn.benchmark = True
    xt, wt, dyt = (torch.as_tensor(a, device="cuda").permute(0, 3, 1, 2) for a in (x, w, dy))
    bt = torch.as_tensor(b, device="cuda")
    conv = [list(g.strides), [top, left], [1, 1], False, [0, 0], 1]
    backward = torch.ops.aten.convolution_backward
    return [lambda: torch.relu(torch.nn.functional.conv2d(xt, wt, bt, g.strides, (top, left))),
            lambda: backward(dyt, xt, wt, None, *conv, [True, False, False]),
            lambda: backward(dyt, xt, wt, [g.filters], *conv, [False, True, True])]


def input_grad_path(conv: Any, g: Any, dtype: Any) -> str:
    """What ``HandWrittenConv.input_grad`` runs for geometry ``g`` under the algorithm set:
    the tiled forward kernel (stride 1), the gather (``xpcnn_conv_input_grad``: strided, or
    the direct kernels) or im2col + cuBLAS (the "im2col" algorithm)."""
    from xpcnn.ops import im2col

    if not conv.runs_forward:
        return "im2col + cuBLAS"
    if im2col.input_grad_as_conv(g.pads, g.kernel, g.strides) and conv.tiles(dtype):
        return "tiled"
    return "gather"


def compare_conv_engines(name: str, batch: int, precision: str, args: argparse.Namespace
                         ) -> list[dict[str, Any]]:
    """Each distinct convolution geometry's forward (+ bias and ReLU), input gradient and
    kernel (+ bias) gradient (ms, median of ``args.steps``) with cuDNN's plans chosen by timing
    (xpcnn's default), with the heuristics' first plans (``XPCNN_CUDNN_AUTOTUNE=0``), with the
    hand-written kernels (``args.gpu_conv``: ``HandWrittenConv``, whose input gradient of a
    strided layer is the gather ``xpcnn_conv_input_grad``), with them under the "im2col"
    algorithm where that input gradient is the gather (im2col + cuBLAS + col2im, the route
    before it), and with PyTorch on the same arrays; TFLOP/s of the three operations together.
    ``name``: a stack or a network (resnet20: stride-2 3x3 and 1x1 shortcut layers); layers of
    one geometry are timed once, under the first one's name."""
    import cupy

    from xpcnn.models import build_model
    from xpcnn.ops import cuda_conv, cudnn_conv
    from xpcnn.ops.fast_cupy import KERNELS

    cudnn = cudnn_conv.load()
    model = build_model(name, input_shape=INPUT_SHAPES[name], device=args.device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision)
    conv = KERNELS.conv_kernels
    rows: list[dict[str, Any]] = []
    print(f"\nconvolutions of {name}, batch {batch}, {precision}: ms per operation "
          f"(TF32 {'on' if cudnn_conv.tf32() else 'off'}; hand-written: {args.gpu_conv})")
    print(f"  {'engine':<22}{'forward':>10}{'input grad':>12}{'kernel grad':>13}{'TFLOP/s':>10}")
    rng = np.random.default_rng(0)
    seen: dict[str, dict[str, Any]] = {}
    for layer in model.layers:
        if not isinstance(layer, xpcnn.layers.Conv2D):
            continue
        g = layer.geometry
        geometry = f"{g.in_hw}x{g.channels}->{g.filters} k{g.kernel} s{g.strides} p{g.pads}"
        if geometry in seen:  # (a block repeated: the same kernels, timed once)
            seen[geometry]["layers"].append(layer.name)
            continue
        dtype = layer.compute_dtype
        x = cupy.asarray(rng.standard_normal((batch, *g.in_hw, g.channels)), dtype=dtype)
        w = cupy.asarray(rng.standard_normal((g.filters, *g.kernel, g.channels)) * 0.1,
                         dtype=dtype)
        b = cupy.zeros(g.filters, dtype)
        dy = cupy.asarray(rng.standard_normal((batch, *g.out_hw, g.filters)), dtype=dtype)
        own = cuda_conv.HandWrittenConv.for_backend(g, KERNELS, model.backend)
        path = input_grad_path(conv, g, np.dtype(dtype))
        # (label: engine, environment, the hand-written algorithm while it runs)
        engines: dict[str, tuple[Any, dict[str, str], str]] = {}
        if cudnn is not None:
            engines["cudnn"] = (cudnn_conv.CudnnConv(g, cudnn, own), {}, args.gpu_conv)
            engines["cudnn heuristic"] = (cudnn_conv.CudnnConv(g, cudnn, own),
                                          {"XPCNN_CUDNN_AUTOTUNE": "0"}, args.gpu_conv)
        engines["hand-written"] = (own, {}, args.gpu_conv)
        if path == "gather":
            engines["hand-written im2col"] = (own, {}, "im2col")
        times: dict[str, list[float]] = {}
        for label, (e, env, algorithm) in engines.items():
            ops = [partial(e.forward, x, w, b, True), partial(e.input_grad, dy, w),
                   partial(e.weight_grad, x, dy, True)]
            before = conv.algorithm
            conv.set_algorithm(algorithm)
            try:
                with mock.patch.dict(os.environ, env):  # (read when a graph is built)
                    times[label] = [timed(op, args.steps, args.warmup, args.device) * 1e3
                                    for op in ops]
            finally:
                conv.set_algorithm(before)  # (the algorithm set before, whatever it was)
        torch_ops = torch_conv_ops(g, x, w, b, dy, args.device)
        if torch_ops is not None:
            times["torch"] = [timed(op, args.steps, args.warmup, args.device) * 1e3
                              for op in torch_ops]
        print(f"  {layer.name}: {geometry} (input grad: {path})")
        rates = {}
        for label, ms in times.items():
            rates[label] = 3 * g.flops(batch) / (sum(ms) * 1e-3) / 1e12
            print(f"    {label:<20}{ms[0]:>10.3f}{ms[1]:>12.3f}{ms[2]:>13.3f}"
                  f"{rates[label]:>10.1f}", flush=True)
        seen[geometry] = {"layer": layer.name, "layers": [layer.name], "geometry": geometry,
                          "input_grad": path, "gflop": g.flops(batch) / 1e9, "ms": times,
                          "tflops": rates}
        rows.append(seen[geometry])
    return rows


def compare_loss_kernels(batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The softmax cross-entropy, loss and gradient together (ms, median of ``args.steps``),
    on ``batch`` rows of float32 logits of 10, 100 and 1000 classes: xpcnn's kernel (a row a
    thread where a block's rows fit in shared memory, else a row a warp), the standard Array
    API version on the same arrays, and PyTorch's cross_entropy forward and backward."""
    import cupy

    from xpcnn.ops import fast_cupy
    from xpcnn.ops.cuda_reductions import cross_entropy_kernel
    from xpcnn.ops.kernels import StandardKernels

    kernels, rng, rows = fast_cupy.KERNELS, np.random.default_rng(0), []
    print(f"\nsoftmax cross-entropy, batch {batch}, float32: ms for the loss and its gradient")
    print(f"  {'classes':>7}  {'kernel':<34}{'xpcnn':>8}{'standard':>10}{'torch':>8}")
    for classes in (10, 100, 1000):
        z = cupy.asarray(rng.standard_normal((batch, classes)), dtype=cupy.float32)
        labels = cupy.asarray(rng.integers(0, classes, batch))
        ops = {"xpcnn": partial(kernels.softmax_cross_entropy, z, labels, 0.0),
               "standard": partial(StandardKernels.softmax_cross_entropy, kernels, z, labels,
                                   0.0)}
        try:
            import torch

            zt = torch.as_tensor(z, device=args.device).requires_grad_(True)
            lt = torch.as_tensor(labels, device=args.device)
            ops["torch"] = lambda zt=zt, lt=lt: torch.autograd.grad(
                torch.nn.functional.cross_entropy(zt, lt), zt)
        except ImportError:
            pass
        ms = {label: timed(op, args.steps, args.warmup, args.device) * 1e3
              for label, op in ops.items()}
        kernel = cross_entropy_kernel(classes, np.float32)[0]
        print(f"  {classes:>7}  {kernel:<34}" + "".join(
            f"{ms[k]:>{w}.3f}" if k in ms else f"{'-':>{w}}"
            for k, w in (("xpcnn", 8), ("standard", 10), ("torch", 8))))
        rows.append({"classes": classes, "kernel": kernel, "ms": ms})
    return rows


def build_xpcnn(name: str, batch: int, precision: str, device: str,
                cuda_graphs: bool | None = None) -> tuple[Any, Any, Any]:
    shape = INPUT_SHAPES[name]
    model = xpcnn.Sequential(build_layers(name), input_shape=shape, device=device, seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision,
                  cuda_graphs=cuda_graphs)
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
        peak = mem.xpcnn(model, train) if fast else None
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
    with compute_scope(model.backend):
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
    fast = "on" if fast_kernels(model.backend) is not None else "off"
    print(f"\nper layer, {name} batch {batch} {precision}, fast path {fast} "
          f"(ms, median of {args.steps})")
    total_f = total_b = 0.0
    for i, layer in enumerate(layers):
        f = statistics.median(fwd[i]) * 1e3
        b = statistics.median(bwd[i]) * 1e3 if bwd[i] else 0.0
        total_f, total_b = total_f + f, total_b + b
        print(f"  {layer.name:<24}{f:>8.3f}{b:>8.3f}")
    print(f"  {'total':<24}{total_f:>8.3f}{total_b:>8.3f}")


def torch_twin(model: xpcnn.Sequential, batch: int, precision: str, args: argparse.Namespace
               ) -> tuple[Any, Any] | None:
    """PyTorch's training step and inference on ``model``'s twin (None without PyTorch)."""
    try:
        import torch
        from torch_mirror import mirror
    except ImportError:
        return None
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    # The twin without its leading NHWC -> NCHW permute, fed NCHW with NCHW's own strides
    # (a permuted NHWC batch has channels-last strides, and cuDNN then runs channels-last),
    # or, with --torch-channels-last, PyTorch's channels-last layout throughout.
    layout = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    net = mirror(model, torch.float32, exact_random=False)[1:].to(dev, memory_format=layout)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    shape = model.input_shape[1:]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *shape)).astype(np.float32).transpose(0, 3, 1, 2)
    x = torch.from_numpy(images).to(dev).clone(memory_format=layout)
    y = torch.from_numpy(rng.integers(0, 10, batch)).to(dev)
    mixed = precision.startswith("mixed_") and dev == "cuda"
    half = torch.bfloat16 if precision == "mixed_bfloat16" else torch.float16
    scaler = torch.amp.GradScaler(enabled=mixed and half == torch.float16)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True

    def train() -> None:
        net.train()
        with torch.autocast(dev, dtype=half, enabled=mixed):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer() -> None:
        net.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=half, enabled=mixed):
            net(x)

    return train, infer


def bench_torch(model: xpcnn.Sequential, batch: int, precision: str,
                args: argparse.Namespace) -> dict[str, Any] | None:
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        base = torch.cuda.memory_allocated()
    twin = torch_twin(model, batch, precision, args)
    if twin is None:
        return None
    train, infer = twin
    t_train = timed(train, args.steps, args.warmup, args.device)
    peak = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            train()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_infer = timed(infer, args.steps, args.warmup, args.device)
    return {"train_img_s": batch / t_train, "infer_img_s": batch / t_infer, "peak_mib": peak}


def census(events: list[Any], steps: int, top: int = 8) -> dict[str, Any]:
    """What the GPU ran per step, from a profile's device events (name, microseconds):
    kernels, memory copies and memsets, the kernels' time, and the ``top`` kernels by time."""
    kinds = {"kernels": 0, "memcpy": 0, "memset": 0}
    per_kernel: dict[str, list[float]] = {}
    for name, us in events:
        kind = ("memcpy" if name.startswith("Memcpy") else
                "memset" if name.startswith("Memset") else "kernels")
        kinds[kind] += 1
        if kind == "kernels":
            per_kernel.setdefault(name, []).append(us)
    ranked = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {**{k: v / steps for k, v in kinds.items()},
            "kernel_us": sum(map(sum, per_kernel.values())) / steps,
            "top": [{"kernel": name[:90], "per_step": len(t) / steps, "us": sum(t) / steps}
                    for name, t in ranked]}


def kernel_census(name: str, batch: int, precision: str, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """Device work per training step as CUPTI records it through PyTorch's profiler, which
    sees every kernel of the process (CuPy's, cuDNN's and cuBLAS's too): xpcnn eager (CUDA
    graphs off), xpcnn replayed from its graph (a graph's kernels are recorded one by one),
    and PyTorch eager. Batches on the device; ``args.steps`` steps after the warm-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runs: dict[str, Any] = {}
    for label, graphs in (("xpcnn eager", False), ("xpcnn graph", True)):
        model, xb, yb = build_xpcnn(name, batch, precision, args.device, cuda_graphs=graphs)
        runs[label] = partial(model.train_step, xb, yb)
    graphed = model  # (the last one built)
    twin = torch_twin(model, batch, precision, args)
    runs["torch eager"] = twin[0] if twin else None
    out: dict[str, Any] = {}
    print(f"\ndevice work per training step, {name} batch {batch} {precision} (CUPTI, "
          f"{args.steps} steps)")
    for label, step in runs.items():
        if step is None:
            continue
        for _ in range(max(args.warmup, 4)):  # (xpcnn captures its graph in the warm-up)
            step()
        sync(args.device)
        with profile(activities=[ProfilerActivity.CUDA if args.device.startswith("cuda")
                                 else ProfilerActivity.CPU]) as prof:  # (CPU: a dry run)
            for _ in range(args.steps):
                step()
            sync(args.device)
        events = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                  if e.device_type == DeviceType.CUDA]
        out[label] = row = census(events, args.steps)
        if label == "xpcnn graph":
            row["cuda_graphs"] = graphed.cuda_graphs_reason or (
                "replayed" if getattr(graphed._graphs, "graphs", None) else "eager")
        print(f"  {label:<12} {row['kernels']:>6.1f} kernels {row['memcpy']:>4.1f} copies "
              f"{row['memset']:>4.1f} memsets {row['kernel_us']:>9.1f} us of kernels"
              + (f"  ({row['cuda_graphs']})" if "cuda_graphs" in row else ""))
        for k in row["top"]:
            print(f"      {k['per_step']:>5.1f} x {k['us']:>8.1f} us  {k['kernel']}")
    return out


def issue_18_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each row against issue 18's targets: images/s through ``fit`` at least 1.0x PyTorch
    eager's training step (at least 2.0x at batch 128), peak memory of a step at most 1.5x
    PyTorch's. Returns the lines to print and, per target, the rows measured and missed."""
    checks = {"fit >= 1.0x PyTorch eager": ("fit_img_s", "train_img_s", 1.0, None),
              "fit >= 2.0x PyTorch eager at batch 128": ("fit_img_s", "train_img_s", 2.0, 128),
              "peak memory <= 1.5x PyTorch's": ("peak_mib", "peak_mib", 1.5, None)}
    out: dict[str, Any] = {"lines": []}
    for label, (ours, theirs, bound, batch) in checks.items():
        measured, missed = 0, []
        for row in rows:
            a, b = row["xpcnn"].get(ours), (row["torch"] or {}).get(theirs)
            if not a or not b or (batch is not None and row["batch"] != batch):
                continue
            measured += 1
            ratio = a / b
            if (ratio < bound) if ours == "fit_img_s" else (ratio > bound):
                missed.append(f"{row['model']} b{row['batch']} {row['precision']} "
                              f"{ratio:.2f}x")
        out[label] = {"measured": measured, "missed": missed}
        out["lines"].append(f"{label}: {measured - len(missed)} of {measured} rows met"
                            + (f"; missed: {', '.join(missed)}" if missed else ""))
    return out


def software(device: str) -> dict[str, Any]:
    """Versions and the settings that decide float32 matmul precision on each side."""
    info: dict[str, Any] = {"xpcnn": xpcnn.__version__, "numpy": np.__version__}
    if device.startswith("cuda"):
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_tf32"] = os.environ.get("CUPY_TF32", "0")
        from xpcnn.ops import cudnn_conv

        info["xpcnn_tf32"], info["xpcnn_cudnn_autotune"] = cudnn_conv.tf32(), cudnn_conv.autotune()
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="notebook,mnist,cifar",
                   help="the grid's models, comma-separated (\"\": no grid, the extras alone)")
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
                   help="convolution algorithm of the hand-written CUDA kernels (xpcnn.ops."
                   "cuda_conv.ConvKernels.set_algorithm): tiled kernels (the default), "
                   "one-element-per-thread "
                   "direct kernels, direct forward with an im2col + cuBLAS kernel gradient, or "
                   "im2col + cuBLAS")
    p.add_argument("--torch-channels-last", action="store_true",
                   help="PyTorch in its channels-last layout (default: NCHW, as in bench.py)")
    p.add_argument("--fit-batches", type=int, default=16,
                   help="batches an epoch in the fit() timing (default 16)")
    p.add_argument("--conv-layers", action="append", default=[], metavar="MODEL:BATCH:PRECISION",
                   help="also time each convolution geometry with cuDNN, the hand-written "
                   "kernels (a strided input gradient's gather and im2col) and PyTorch "
                   "(repeatable; CUDA, or the emulated kernels of tests/cuda_emulator.py)")
    p.add_argument("--kernels", action="append", default=[], metavar="MODEL:BATCH:PRECISION",
                   help="also count the kernels, copies and memsets of a training step, and "
                   "the kernels' time, for xpcnn eager, xpcnn replayed and PyTorch eager "
                   "(PyTorch's profiler; repeatable)")
    p.add_argument("--loss-kernels", action="append", default=[], type=int, metavar="BATCH",
                   help="also time the softmax cross-entropy of 10, 100 and 1000 classes "
                   "against the standard version and PyTorch (repeatable; CUDA only)")
    p.add_argument("--no-cudnn", action="store_true",
                   help="convolutions on the hand-written kernels alone (XPCNN_CUDNN=0)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.no_cudnn:
        os.environ["XPCNN_CUDNN"] = "0"
    if args.device.startswith("cuda"):
        from xpcnn.ops.fast_cupy import KERNELS

        KERNELS.conv_kernels.set_algorithm(args.gpu_conv)
    if args.gpu_chunk_mb is not None:
        backend_module.GPU_CHUNK_BYTES = int(args.gpu_chunk_mb * 2**20) or None
    rows: list[dict[str, Any]] = []
    conv_rows: list[dict[str, Any]] = []
    kernel_rows: list[dict[str, Any]] = []
    loss_rows: list[dict[str, Any]] = []
    header = (f"{'model':<9}{'batch':>6} {'precision':<14}{'fit':>8}{'ratio':>7}{'TFLOP/s':>8}"
              f"{'peak':>7}  {'train':>8}{'std':>8}{'torch':>8}"
              f"{'ratio':>7}  {'infer':>8}{'std':>8}{'torch':>8}{'ratio':>7}"
              f"{'MiB':>7}{'torch':>7}{'ratio':>7}")
    card = card_name(args.device)
    info = software(args.device)
    info["torch_memory_format"] = "channels_last" if args.torch_channels_last else "nchw"
    if args.device.startswith("cuda"):
        from xpcnn.ops import cudnn_conv

        cudnn = cudnn_conv.load()
        info["cudnn_frontend"] = getattr(cudnn, "__version__", None)
        info["cudnn_backend"] = cudnn.backend_version() if cudnn is not None else None
        info["xpcnn_tf32"] = cudnn_conv.tf32()
        info["gpu_conv"] = args.gpu_conv
        info["gpu_chunk_bytes"] = backend_module.GPU_CHUNK_BYTES
    def save() -> None:
        """Write the JSON report as it stands (after every row: a run cut short keeps it, and
        the verdict on the targets of the rows measured)."""
        if rows:
            info["issue_18_targets"] = issue_18_targets(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": card, "software": info,
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "rows": rows, "conv_layers": conv_rows, "kernels": kernel_rows,
                           "loss_kernels": loss_rows},
                          f, indent=2)

    print(f"device: {card}; {info}")
    print(f"xpcnn images/s: 'fit' through fit() on host uint8 images ({args.fit_batches} "
          "batches an epoch, after a warm-up epoch), its ratio to PyTorch's train step, its "
          "TFLOP/s and share of the datasheet peak; 'train' / 'infer' a step on device batches "
          f"(fast path, and 'std' = standard Array API path) against PyTorch eager; median of "
          f"{args.steps} steps; MiB = peak memory of a training step")
    print(header)
    for name in filter(None, args.models.split(",")):  # (--models "": the extras alone)
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
                model = ours.pop("model")
                theirs = bench_torch(model, batch, precision, args) or {}
                try:
                    ours.update(bench_fit(name, batch, precision, args))
                except Exception as e:  # reported, and the other columns still printed
                    print(f"{name:<9}{batch:>6} {precision:<14}fit failed: "
                          f"{type(e).__name__}: {str(e)[:300]}")
                fit = ours.get("fit_img_s")
                tflops = 3 * forward_flops(model) * fit / 1e12 if fit else None
                peak = peak_tflops(card, precision)
                ours.update(fit_tflops=tflops, peak_tflops=peak)
                row = {"model": name, "batch": batch, "precision": precision,
                       "xpcnn": ours, "xpcnn_standard": std, "torch": theirs}
                rows.append(row)

                def rate(v: float | None) -> str:
                    return f"{v:>8.0f}" if v else f"{'-':>8}"

                def ratio(a: float | None, b: float | None) -> str:
                    return f"{a / b:>6.2f}x" if a and b else f"{'-':>7}"

                def get(d: dict | None, key: str) -> float | None:
                    return d.get(key) if d else None

                share = f"{100 * tflops / peak:>6.1f}%" if tflops and peak else f"{'-':>7}"
                print(f"{name:<9}{batch:>6} {precision:<14}"
                      f"{rate(fit)}{ratio(fit, get(theirs, 'train_img_s'))}"
                      f"{tflops or 0:>8.2f}{share}  "
                      f"{rate(ours['train_img_s'])}{rate(get(std, 'train_img_s'))}"
                      f"{rate(get(theirs, 'train_img_s'))}"
                      f"{ratio(ours['train_img_s'], get(theirs, 'train_img_s'))}  "
                      f"{rate(ours['infer_img_s'])}{rate(get(std, 'infer_img_s'))}"
                      f"{rate(get(theirs, 'infer_img_s'))}"
                      f"{ratio(ours['infer_img_s'], get(theirs, 'infer_img_s'))}"
                      f"{rate(ours['peak_mib'])[1:]}{rate(get(theirs, 'peak_mib'))[1:]}"
                      f"{ratio(ours['peak_mib'], get(theirs, 'peak_mib'))}"
                      f"  graphs: {ours.get('cuda_graphs', '-')}", flush=True)
                save()
    if rows:
        print("issue 18's targets:", *issue_18_targets(rows)["lines"], sep="\n  ", flush=True)
    for spec in args.kernels:  # (on the CPU a dry run: CUPTI records nothing there)
        name, batch, precision = spec.split(":")
        try:
            kernel_rows.append({"spec": spec,
                                **kernel_census(name, int(batch), precision, args)})
        except Exception as e:  # (reported; the profile below still runs)
            print(f"kernel census {spec} failed: {type(e).__name__}: {str(e)[:300]}")
        save()
    for spec in args.conv_layers:
        name, batch, precision = spec.split(":")
        try:
            conv_rows.append({"spec": spec,
                              "layers": compare_conv_engines(name, int(batch), precision, args)})
        except Exception as e:  # (reported; the next comparisons and the profile still run)
            print(f"convolution comparison {spec} failed: {type(e).__name__}: {str(e)[:300]}")
        save()
    for batch in args.loss_kernels:
        loss_rows.append({"batch": batch, "classes": compare_loss_kernels(batch, args)})
        save()
    for spec in args.profile:
        name, batch, precision = spec.split(":")
        for fast in (True, False):
            old = set_fast_path(fast)
            try:
                profile_layers(name, int(batch), precision, args)
            finally:
                set_fast_path(old)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
