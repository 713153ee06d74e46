#!/usr/bin/env python
"""CPU training and inference speed of xpcnn against PyTorch eager, side by side.

For each reference model (``xpcnn.models.build_layers``) at one batch size, in float32 (or
``--precision``'s mixed precision, PyTorch under ``torch.autocast("cpu")``):

* training-step and inference images/s of xpcnn and of the same architecture in PyTorch eager
  (same initial weights, SGD with momentum 0.9, dropout on in training on both sides), timed in
  one process with BLOCK timing: a block of steps of one library, then a block of the other
  (alternating step by step slows whichever library runs second: the other's BLAS threads
  are still spinning). Each number is the median of the per-step times after warm-up;
* achieved GFLOP/s, with FLOPs = 2 x MACs of the forward convolutions and dense layers
  (direct-convolution count, whatever algorithm runs), training = 3 x forward, and that as a
  share of the machine's float32 matmul peak (best of a 2048^3 NumPy matmul);
* peak memory of a training step: each side's training steps run in a subprocess of their
  own, which resets the kernel's peak-RSS mark (/proc/self/clear_refs) after building the model
  and data and reports VmHWM - VmRSS at that point (ru_maxrss - baseline where clear_refs is
  unavailable).

PyTorch is optional: without it, only xpcnn and the peak are reported.

    python scripts/bench.py                       # notebook, mnist, cifar at batch 128
    python scripts/bench.py --models cifar --steps 30 --json bench.json
    python scripts/bench.py --layers              # each layer alone, forward / backward
    python scripts/bench.py --layers --models mnist-bn   # BatchNorm2D too
    python scripts/bench.py --layers --models configs    # layer settings off the reference models
    python scripts/bench.py --layers --models mnist --precision mixed_float16   # half floats
    python scripts/bench.py --functional --models cifar   # Sequential vs the same functional Model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

MODELS = ("notebook", "mnist", "cifar", "mnist-bn")  # (the default: the first three)
CLASSES = 10
LR = 0.01
MOMENTUM = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="notebook,mnist,cifar",
                   help="comma-separated reference models (default: notebook,mnist,cifar); "
                   "with --layers also 'configs', layer settings the models lack")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per library, mode and model (default 20)")
    p.add_argument("--blocks", type=int, default=2,
                   help="blocks the timed steps are split into, alternating libraries "
                   "(default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS / PyTorch threads (default: every core)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--torch-channels-last", action="store_true",
                   help="run PyTorch in channels_last memory format (default: NCHW)")
    p.add_argument("--torch-own-process", action="store_true",
                   help="time PyTorch in a process of its own, with glibc malloc's defaults "
                   "(in one process it shares the heap settings xpcnn's fast path makes)")
    p.add_argument("--layers", action="store_true",
                   help="instead: each layer of the models alone (convolutions, dense, pooling, "
                   "normalisation, ReLU), forward (inference) and backward (after a training "
                   "forward), against the same layer in PyTorch")
    p.add_argument("--functional", action="store_true",
                   help="instead: each model as a Sequential and as the same stack built as a "
                   "functional Model (same weights), training and inference block-timed side "
                   "by side (the functional path's cost)")
    p.add_argument("--precision", default="float32",
                   choices=("float32", "mixed_float16", "mixed_bfloat16"),
                   help="xpcnn's compile precision (default float32); PyTorch runs under "
                   "torch.autocast('cpu') with the same half dtype where it can, else xpcnn "
                   "alone is timed")
    p.add_argument("--peak-size", type=int, default=2048, metavar="N",
                   help="the machine's float32 peak is timed on N x N matmuls (default 2048; "
                   "a few seconds; a dry run may take a small N)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    # internal: one side's training steps in a subprocess, for peak memory; PyTorch's timing
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_torch_timing", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse_args()
THREADS = ARGS.threads or os.cpu_count() or 1
if ARGS.threads:
    # Before NumPy loads OpenBLAS: its thread count is fixed at load time.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import xpcnn  # noqa: E402
from xpcnn.layers import (  # noqa: E402
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    FeatureNorm,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
)
from xpcnn.layers.base import Options  # noqa: E402
from xpcnn.models import INPUT_SHAPES, build_layers  # noqa: E402
from xpcnn.ops.kernels import compute_scope, fast_kernels  # noqa: E402

try:
    if ARGS.no_torch:
        raise ImportError
    import torch
    from torch_mirror import mirror_layer
except ImportError:
    torch = None


# -- machine facts -----------------------------------------------------------------------------
def blas_info() -> dict[str, Any]:
    """Which OpenBLAS kernel NumPy runs (threadpoolctl when installed, else the library)."""
    info: dict[str, Any] = {
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                info.update(library=lib.get("internal_api"), version=lib.get("version"),
                            kernel=lib.get("architecture"), threads=lib.get("num_threads"))
                return info
    except ImportError:
        pass
    try:  # the corename straight from the loaded OpenBLAS
        import ctypes

        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln}
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix in ("scipy_openblas_", "openblas_", "scipy_openblas64_"):
                for suffix in ("64_", ""):
                    fn = getattr(lib, f"{prefix}get_corename{suffix}", None)
                    if fn is None:
                        continue
                    fn.restype = ctypes.c_char_p
                    info.update(library="openblas", kernel=fn().decode())
                    nt = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                    if nt is not None:
                        info["threads"] = int(nt())
                    return info
    except OSError:
        pass
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of the best of ``repeats`` n^3 NumPy matmuls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best = min(_time(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- models ------------------------------------------------------------------------------------
def forward_flops(layers: list[Any], batch: int) -> int:
    """2 x MACs of the forward convolutions and dense layers of a batch (direct count)."""
    flops = 0
    for layer in layers:
        if isinstance(layer, Conv2D):
            flops += layer.geometry.flops(1)
        elif isinstance(layer, Dense):
            flops += 2 * layer.input_shape[0] * layer.units
    return batch * flops


def xpcnn_model(name: str, batch: int) -> Any:
    model = xpcnn.Sequential(build_layers(name, CLASSES), input_shape=INPUT_SHAPES[name], seed=0)
    model.compile(loss="cross_entropy", optimizer=xpcnn.optim.SGD(LR, momentum=MOMENTUM),
                  precision=ARGS.precision)
    return model


def half_dtype() -> Any:
    """The NumPy dtype of --precision's activations (None in float32)."""
    if ARGS.precision == "mixed_float16":
        return np.dtype(np.float16)
    if ARGS.precision == "mixed_bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return None


def torch_autocast() -> Any:
    """torch.autocast on the CPU in --precision's half dtype (a no-op context in float32).
    PyTorch's CPU autocast takes bfloat16 and float16 (float16 since 2.4: its convolutions
    and products then run in float16 on the CPU; where a build refuses it, the caller
    prints xpcnn alone). A build without the dtype warns and turns autocast off, which
    would time float32 under a half-float label: that is raised, as a refusal."""
    import contextlib
    import warnings
    if ARGS.precision == "float32":
        return contextlib.nullcontext()
    half = torch.float16 if ARGS.precision == "mixed_float16" else torch.bfloat16
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        context = torch.autocast("cpu", dtype=half)
    if not context._enabled:
        raise RuntimeError(f"this PyTorch's CPU autocast does not take {half}: "
                           f"{'; '.join(str(w.message) for w in said) or 'disabled'}")
    return context


def functional_model(name: str, sequential: Any) -> Any:
    """The same stack as ``sequential``, built as a functional Model with its weights."""
    inputs = xpcnn.Input(INPUT_SHAPES[name])
    x = inputs
    for layer in build_layers(name, CLASSES):
        x = layer(x)
    model = xpcnn.Model(inputs, x, seed=0)
    model.compile(loss="cross_entropy", optimizer=xpcnn.optim.SGD(LR, momentum=MOMENTUM))
    model.set_weights(sequential.get_weights())
    return model


def bench_functional(names: list[str]) -> list[dict[str, Any]]:
    """Training and inference of each model as a Sequential and as a functional Model."""
    rows = []
    for name in names:
        x, y = make_data(name, ARGS.batch_size)
        seq = xpcnn_model(name, ARGS.batch_size)
        fun = functional_model(name, seq)
        (s_train, s_infer), (f_train, f_infer) = xpcnn_steps(seq, x, y), xpcnn_steps(fun, x, y)
        load_before = load_average()
        times = {mode: block_times({"sequential": s, "functional": f}, ARGS.steps, ARGS.blocks,
                                   ARGS.warmup, alternate=True)
                 for mode, s, f in (("train", s_train, f_train), ("infer", s_infer, f_infer))}
        row: dict[str, Any] = {"model": name, "batch": ARGS.batch_size,
                               "load_average": [load_before, load_average()]}
        for mode, t in times.items():
            # the median, and the fastest tenth (less moved by other processes' bursts)
            for stat, fn in (("", statistics.median), ("_fastest_tenth", _tenth)):
                seq, fun = fn(t["sequential"]), fn(t["functional"])
                row[f"{mode}{stat}"] = {"sequential_img_s": ARGS.batch_size / seq,
                                        "functional_img_s": ARGS.batch_size / fun,
                                        "cost": fun / seq - 1}
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    return rows


def _tenth(times: list[float]) -> float:
    return float(np.percentile(times, 10))


def print_functional(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':<9}{'statistic':<15}{'train img/s seq':>16}{'functional':>12}{'cost':>8}"
            f"{'infer img/s seq':>17}{'functional':>12}{'cost':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for stat, label in (("", "median"), ("_fastest_tenth", "fastest tenth")):
            t, i = r[f"train{stat}"], r[f"infer{stat}"]
            print(f"{r['model'] if not stat else '':<9}{label:<15}"
                  f"{t['sequential_img_s']:>16.0f}{t['functional_img_s']:>12.0f}"
                  f"{100 * t['cost']:>+7.1f}%{i['sequential_img_s']:>17.0f}"
                  f"{i['functional_img_s']:>12.0f}{100 * i['cost']:>+7.1f}%")
    print(f"\n{ARGS.steps} steps each after {ARGS.warmup} warm-up, block timing "
          f"({ARGS.blocks} blocks, the order reversed every other block), batch "
          f"{ARGS.batch_size}; cost = functional time / Sequential time - 1. Load average "
          f"before/after: "
          f"{ {r['model']: r['load_average'] for r in rows} }")


def torch_model(model: Any, channels_last: bool = False) -> Any:
    """The same architecture in PyTorch with xpcnn's initial weights (scripts/torch_mirror.py),
    taking NCHW input, with PyTorch's own dropout."""
    net = torch.nn.Sequential(*[m for layer in model.layers
                                for m in mirror_layer(layer, exact_random=False)])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_data(name: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (batch, *INPUT_SHAPES[name]), dtype=np.uint8)
    y = rng.integers(0, CLASSES, batch)
    return x, y


# -- one step of each library ------------------------------------------------------------------
def xpcnn_steps(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    yb = model.backend.asarray(y)

    def train() -> None:
        model.train_step(model._to_device(x), yb)

    def infer() -> None:
        xp = model.backend.xp
        z = model._logits(model._to_device(x), training=False)
        float(xp.sum(z))

    return train, infer


def torch_images(a: np.ndarray, channels_last: bool) -> Any:
    """An (N, H, W, C) array as the tensor PyTorch's twin takes: NCHW with NCHW's own strides,
    or channels-last with --torch-channels-last. (A plain transpose of a one-channel batch has
    strides that are channels-last too, and PyTorch's convolutions then run the whole network
    channels-last, its faster layout: the `mnist` model did so here until 2026-11-26, 07:40 UTC.)
    A 2-D array (a Dense layer's input) passes as it is."""
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 else a)
    if a.ndim != 4:
        return t
    return t.clone(memory_format=torch.channels_last if channels_last else
                   torch.contiguous_format)


def torch_steps(net: Any, x: np.ndarray, y: np.ndarray, channels_last: bool) -> tuple[Any, Any]:
    xt = torch_images(x, channels_last)
    yt = torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        with torch_autocast():  # (--precision)
            logits = net(xt.float())
        loss = loss_fn(logits.float(), yt)
        loss.backward()
        opt.step()
        # the loss and correct count on the host (xpcnn's train_step leaves them in device
        # arrays, which on the CPU are host memory: neither side waits for a device)
        loss.item()
        (logits.argmax(1) == yt).sum().item()

    def infer() -> None:
        net.eval()
        with torch.inference_mode(), torch_autocast():
            float(net(xt.float()).sum())

    return train, infer


def check_same_model(model: Any, net: Any, x: np.ndarray, channels_last: bool) -> float:
    """Max |logit difference| / max |logit| between the two at the initial weights."""
    ref = np.asarray(model._logits(model._to_device(x[:8]), training=False))
    xt = torch_images(x[:8], channels_last).float()
    net.eval()
    with torch.inference_mode():
        got = net(xt).numpy()
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def block_timing(fns: dict[str, Any], steps: int, blocks: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each function, in blocks of steps, one library at a time."""
    return {k: statistics.median(v) for k, v in block_times(fns, steps, blocks, warmup).items()}


def block_times(fns: dict[str, Any], steps: int, blocks: int, warmup: int,
                alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of every timed step of each function, in blocks of steps, one at a time
    (``alternate``: the order of the functions reversed every other block, so that neither
    always runs first)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_block = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    for i, n in enumerate(per_block):
        items = list(fns.items())
        for k, fn in reversed(items) if alternate and i % 2 else items:
            fn()  # one untimed step: the other library's threads go quiet
            for _ in range(n):
                times[k].append(_time(fn))
    return times


# -- peak memory, one subprocess per side --------------------------------------------------------
def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


def memory_child(spec: str) -> None:
    """Run one side's training steps and print its peak RSS above the pre-step baseline."""
    import resource

    lib, name = spec.split(":")
    batch = ARGS.batch_size
    x, y = make_data(name, batch)
    model = xpcnn_model(name, batch)
    if lib == "torch":
        train, _ = torch_steps(torch_model(model, ARGS.torch_channels_last), x, y,
                               ARGS.torch_channels_last)
        del model
    else:
        train, _ = xpcnn_steps(model, x, y)
    import gc

    gc.collect()
    base = _rss_kib("VmRSS")
    method = "VmHWM after clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        method = "ru_maxrss"
    for _ in range(max(ARGS.warmup, 2) + 2):
        train()
    if method == "ru_maxrss" or base is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = base or 0
    else:
        peak = _rss_kib("VmHWM") or 0
    print(json.dumps({"peak_mib": (peak - base) / 1024, "method": method}))


def torch_timing_child(name: str) -> None:
    """Time PyTorch alone in this process (xpcnn builds the weights but never computes here,
    so malloc keeps its defaults) and print the median step times."""
    x, y = make_data(name, ARGS.batch_size)
    net = torch_model(xpcnn_model(name, ARGS.batch_size), ARGS.torch_channels_last)
    train, infer = torch_steps(net, x, y, ARGS.torch_channels_last)
    tr = block_timing({"torch": train}, ARGS.steps, ARGS.blocks, ARGS.warmup)
    inf = block_timing({"torch": infer}, ARGS.steps, ARGS.blocks, ARGS.warmup)
    print(json.dumps({"train": tr["torch"], "infer": inf["torch"]}))


def _child(flag: str, spec: str, lib: str) -> dict[str, Any] | None:
    cmd = [sys.executable, os.path.abspath(__file__), flag, spec,
           "--batch-size", str(ARGS.batch_size), "--warmup", str(ARGS.warmup),
           "--steps", str(ARGS.steps), "--blocks", str(ARGS.blocks),
           "--precision", ARGS.precision]  # (the memory and own-process timing: the same)
    if ARGS.threads:
        cmd += ["--threads", str(ARGS.threads)]
    if ARGS.torch_channels_last:
        cmd.append("--torch-channels-last")
    if lib == "xpcnn":
        cmd.append("--no-torch")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"subprocess {flag} {spec} failed:\n{out.stderr}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(lib: str, name: str) -> dict[str, Any] | None:
    return _child("--_memory", f"{lib}:{name}", lib)


# -- one layer at a time ------------------------------------------------------------------------
def _median_ms(fn: Any, before: Any = None) -> float:
    """Median milliseconds of ``fn`` over ``--steps`` calls after ``--warmup`` (``before`` runs
    untimed ahead of each call)."""
    times = []
    for i in range(ARGS.warmup + ARGS.steps):
        if before is not None:
            before()
        t = _time(fn)
        if i >= ARGS.warmup:
            times.append(t)
    return statistics.median(times) * 1e3


# layers timed one at a time by --layers (the rest have no gradient, or next to no work)
TIMED_LAYERS = (Conv2D, Dense, MaxPool2D, FeatureNorm, BatchNorm2D, ReLU)

# --layers --models configs: settings the reference models lack, where earlier hunts found
# slow paths (odd sizes, strided and 1x1 convolutions, ResNet's stem and pools, 1000 classes);
# (label, per-sample input shape, the layer). Each runs after a layer with weights, so it
# needs its input gradient as a layer inside a network does.
LAYER_CONFIGS: tuple[tuple[str, tuple[int, ...], Any], ...] = (
    ("conv3x3/2 same", (28, 28, 16), lambda: Conv2D(32, 3, strides=2, padding="same")),
    ("conv1x1/2", (32, 32, 16), lambda: Conv2D(32, 1, strides=2)),
    ("conv7x7/2 same", (32, 32, 3), lambda: Conv2D(16, 7, strides=2, padding="same")),
    ("conv5x5 valid", (14, 14, 8), lambda: Conv2D(16, 5, activation="relu")),
    ("conv3x3 same 7x7", (7, 7, 64), lambda: Conv2D(64, 3, padding="same")),
    ("maxpool3/2 same", (32, 32, 16), lambda: MaxPool2D(3, 2, padding="same")),
    ("maxpool2 odd", (7, 7, 32), lambda: MaxPool2D(2)),
    ("avgpool2", (28, 28, 16), lambda: AvgPool2D(2)),
    ("gap", (8, 8, 64), lambda: GlobalAvgPool2D()),
    ("batchnorm 7x7", (7, 7, 64), lambda: BatchNorm2D()),
    ("featurenorm 7x7", (7, 7, 32), lambda: FeatureNorm()),
    ("relu6", (14, 14, 32), lambda: ReLU(max_value=6.0)),
    ("dense 1000", (512,), lambda: Dense(1000)),
)


def layers_to_time(name: str, batch: int) -> list[tuple[str, Any, Any]]:
    """(model label, model, layer) for each layer --layers times of ``name``: a reference
    model's TIMED_LAYERS, or each of LAYER_CONFIGS for "configs"."""
    if name != "configs":
        model = xpcnn_model(name, batch)
        return [(name, model, la) for la in model.layers if isinstance(la, TIMED_LAYERS)]
    timed = []
    for label, shape, make in LAYER_CONFIGS:
        layer = make()
        first = Conv2D(shape[-1], 1) if len(shape) == 3 else Dense(shape[-1])
        model = xpcnn.Sequential([xpcnn.Input(shape), first, layer], seed=0)
        model.compile(loss="cross_entropy", optimizer=xpcnn.optim.SGD(LR),
                      precision=ARGS.precision)
        timed.append((label, model, layer))
    return timed


def bench_layers(names: list[str]) -> list[dict[str, Any]]:
    """Each layer of the models alone (see TIMED_LAYERS) against the same layer in PyTorch
    (mirrored weights, its activation included on both sides): forward in inference mode, and
    backward (input gradient where the model needs one, parameter gradients) after a training
    forward."""
    batch, rows = ARGS.batch_size, []
    backend = xpcnn.get_backend("cpu")
    for name in names:
        # each on its own: as written, its own ReLU and gradient
        for label, model, layer in layers_to_time(name, batch):
            # the input gradient only where the model needs one
            need_dx = model._plan().options(layer).need_input_grad
            options = Options(need_input_grad=need_dx)
            rng = np.random.default_rng(2)
            x = rng.standard_normal((batch, *layer.input_shape)).astype(np.float32)
            dy = rng.standard_normal((batch, *layer.output_shape)).astype(np.float32)
            half = half_dtype()
            if half is not None:  # (mixed precision: half-float activations and gradients)
                x, dy = x.astype(half), dy.astype(half)

            def forward(layer: Any = layer, x: Any = x) -> None:
                with compute_scope(backend):
                    layer.forward(x, training=False)

            def train_forward(layer: Any = layer, x: Any = x, options: Any = options) -> None:
                with compute_scope(backend):
                    layer.forward(x, training=True, options=options)

            def backward(layer: Any = layer, dy: Any = dy, options: Any = options) -> None:
                with compute_scope(backend):
                    layer.backward(dy, options)

            row: dict[str, Any] = {
                "model": name, "layer": layer.name if label == name else label,
                "input_shape": list(layer.input_shape),
                "output_shape": list(layer.output_shape), "input_grad": need_dx,
                "xpcnn": {"forward_ms": _median_ms(forward),
                          "backward_ms": _median_ms(backward, train_forward)}}
            if torch is not None:
                try:
                    row["torch"] = torch_layer_times(layer, x, dy, need_dx)
                except RuntimeError as e:  # (a half dtype this PyTorch's CPU autocast lacks)
                    row["torch_error"] = str(e).splitlines()[0]
            rows.append(row)
            print(f"{name}/{row['layer']}: done", file=sys.stderr)
    return rows


def torch_layer_times(layer: Any, x: np.ndarray, dy: np.ndarray,
                      need_dx: bool) -> dict[str, float]:
    """PyTorch's forward and backward ms of ``layer``'s mirror (under --precision's autocast:
    float32 input, as autocast takes it, and a gradient of its output's dtype)."""
    net = torch.nn.Sequential(*mirror_layer(layer))
    if ARGS.torch_channels_last and x.ndim == 4:
        net = net.to(memory_format=torch.channels_last)
    xt = torch_images(x.astype(np.float32), ARGS.torch_channels_last)
    xt.requires_grad_(need_dx)
    wrt = [*net.parameters()] + ([xt] if need_dx else [])
    with torch_autocast():
        out = net(xt)
    gt = torch_images(dy.astype(np.float32), ARGS.torch_channels_last).to(out.dtype)

    def t_forward() -> None:
        with torch.inference_mode(), torch_autocast():
            net(xt)

    def t_backward() -> None:
        torch.autograd.grad(out, wrt, gt, retain_graph=True)

    return {"forward_ms": _median_ms(t_forward), "backward_ms": _median_ms(t_backward)}


def print_layers(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':8s} {'layer':16s} {'input -> output':>24s}  {'fwd xpcnn':>9s} {'torch':>7s} "
          f"{'ratio':>6s}  {'bwd xpcnn':>9s} {'torch':>7s} {'ratio':>6s}   "
          "(ms; ratio = PyTorch time / xpcnn time)")
    for r in rows:
        shapes = ("x".join(str(d) for d in r["input_shape"]) + " -> "
                  + "x".join(str(d) for d in r["output_shape"]))
        x = r["xpcnn"]
        line = f"{r['model']:8s} {r['layer']:16s} {shapes:>24s}  {x['forward_ms']:9.2f}"
        if "torch" in r:
            t = r["torch"]
            line += (f" {t['forward_ms']:7.2f} {t['forward_ms'] / x['forward_ms']:5.2f}x  "
                     f"{x['backward_ms']:9.2f} {t['backward_ms']:7.2f} "
                     f"{t['backward_ms'] / x['backward_ms']:5.2f}x")
        else:
            line += f" {'-':>7s} {'-':>6s}  {x['backward_ms']:9.2f}"
        print(line)
    print("Backward: after a training forward; the input gradient only where the model needs "
          "it (not for a first layer). Activations included on both sides.")
    print(f"Precision: {ARGS.precision}" + ("" if ARGS.precision == "float32" else
          " (xpcnn: half-float input and gradient; PyTorch: torch.autocast('cpu'), float32 "
          "input)"))
    failed = {r["torch_error"] for r in rows if "torch_error" in r}
    if failed:
        print(f"PyTorch could not run some rows (xpcnn alone): {'; '.join(sorted(failed))}")


# -- the run -----------------------------------------------------------------------------------
def bench_model(name: str, peak: float) -> dict[str, Any]:
    batch = ARGS.batch_size
    x, y = make_data(name, batch)
    model = xpcnn_model(name, batch)
    fwd = forward_flops(model.layers, batch)
    row: dict[str, Any] = {"model": name, "batch": batch, "forward_gflop": fwd / 1e9,
                           "train_gflop": 3 * fwd / 1e9}
    train, infer = xpcnn_steps(model, x, y)
    fns_train, fns_infer = {"xpcnn": train}, {"xpcnn": infer}
    if torch is not None:
        net = torch_model(model, ARGS.torch_channels_last)
        row["initial_logits_rel_diff"] = check_same_model(model, net, x,
                                                          ARGS.torch_channels_last)
        t_train, t_infer = torch_steps(net, x, y, ARGS.torch_channels_last)
        try:  # (one step each first: a half dtype this PyTorch's CPU autocast lacks)
            t_train()
            t_infer()
        except RuntimeError as e:  # (xpcnn alone, as --layers does)
            row["torch_error"] = str(e).splitlines()[0]
        else:
            if not ARGS.torch_own_process:
                fns_train["torch"], fns_infer["torch"] = t_train, t_infer
    with_torch = torch is not None and "torch_error" not in row
    load_before = load_average()
    tr = block_timing(fns_train, ARGS.steps, ARGS.blocks, ARGS.warmup)
    inf = block_timing(fns_infer, ARGS.steps, ARGS.blocks, ARGS.warmup)
    if with_torch and ARGS.torch_own_process:
        own = _child("--_torch_timing", name, "torch")
        if own is not None:
            tr["torch"], inf["torch"] = own["train"], own["infer"]
    row["load_average"] = [load_before, load_average()]
    for lib in tr:
        row[lib] = {
            "train_ms": tr[lib] * 1e3,
            "train_img_s": batch / tr[lib],
            "train_gflop_s": 3 * fwd / tr[lib] / 1e9,
            "train_peak_share": 3 * fwd / tr[lib] / 1e9 / peak,
            "infer_ms": inf[lib] * 1e3,
            "infer_img_s": batch / inf[lib],
            "infer_gflop_s": fwd / inf[lib] / 1e9,
            "infer_peak_share": fwd / inf[lib] / 1e9 / peak,
        }
        if not ARGS.no_memory:
            mem = measure_memory(lib, name)
            if mem is not None:
                row[lib]["train_peak_mib"] = mem["peak_mib"]
                row["memory_method"] = mem["method"]
    if "torch" in row:
        row["train_ratio"] = row["xpcnn"]["train_img_s"] / row["torch"]["train_img_s"]
        row["infer_ratio"] = row["xpcnn"]["infer_img_s"] / row["torch"]["infer_img_s"]
        if "train_peak_mib" in row["xpcnn"] and "train_peak_mib" in row["torch"]:
            row["memory_ratio"] = (row["xpcnn"]["train_peak_mib"]
                                   / max(row["torch"]["train_peak_mib"], 1e-9))
    return row


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {result['threads']} threads; "
          f"float32 matmul peak {m['matmul_peak_gflop_s']:.1f} GFLOP/s ({ARGS.peak_size}^3 "
          "NumPy)")
    print(f"BLAS: {m['blas']}")
    if result.get("torch_version"):
        print(f"PyTorch {result['torch_version']}, NumPy {result['numpy_version']}")
    head = (f"{'model':<9}{'library':<8}{'train img/s':>12}{'ratio':>7}{'GFLOP/s':>9}"
            f"{'% peak':>8}{'infer img/s':>12}{'ratio':>7}{'GFLOP/s':>9}{'% peak':>8}"
            f"{'train MiB':>10}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for row in result["models"]:
        for lib in ("xpcnn", "torch"):
            if lib not in row:
                continue
            r = row[lib]
            own = lib == "xpcnn" and "torch" in row

            def ratio(key: str, own: bool = own, row: dict[str, Any] = row) -> str:
                return f"{row[key]:>6.2f}x" if own and key in row else f"{'':>7}"

            mem = r.get("train_peak_mib")
            print(f"{row['model'] if lib == 'xpcnn' else '':<9}{lib:<8}"
                  f"{r['train_img_s']:>12.0f}{ratio('train_ratio')}{r['train_gflop_s']:>9.1f}"
                  f"{100 * r['train_peak_share']:>7.0f}%"
                  f"{r['infer_img_s']:>12.0f}{ratio('infer_ratio')}{r['infer_gflop_s']:>9.1f}"
                  f"{100 * r['infer_peak_share']:>7.0f}%"
                  f"{(f'{mem:.0f}' if mem is not None else '-'):>10}{ratio('memory_ratio')}")
    print(f"\nFLOPs = 2 x MACs of forward convs + dense (direct count); training = 3 x forward. "
          f"Median of {result['steps']} steps per library after {result['warmup']} warm-up, "
          f"{result['timing']} ({result['blocks']} blocks). "
          f"Peak memory: {result['memory_method']}.")
    print(f"Precision: {result['precision']}" + ("" if result["precision"] == "float32" else
          " (xpcnn: half-float activations and gradients; PyTorch: torch.autocast('cpu'))"))
    if result["precision"] == "mixed_float16":
        print("Loss scaling: xpcnn scales the loss (dynamic, as Keras' LossScaleOptimizer); "
              "PyTorch runs without a GradScaler.")
    failed = {r["torch_error"] for r in result["models"] if "torch_error" in r}
    if failed:
        print(f"PyTorch could not run some models (xpcnn alone): {'; '.join(sorted(failed))}")
    print(f"Load average before/after each model: "
          f"{ {r['model']: r['load_average'] for r in result['models']} }")


def write_json(rows: dict[str, Any]) -> None:
    """With --json, the results with the date, the command and the thread count."""
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                       "threads": THREADS, **rows}, f, indent=2)
        print(f"wrote {ARGS.json}")


def main() -> None:
    if ARGS._memory:
        memory_child(ARGS._memory)
        return
    if ARGS._torch_timing:
        torch.set_num_threads(THREADS)
        torch_timing_child(ARGS._torch_timing)
        return
    if torch is not None:
        torch.set_num_threads(THREADS)
    if (ARGS.steps < 1 or ARGS.blocks < 1 or ARGS.warmup < 0 or ARGS.batch_size < 1
            or ARGS.peak_size < 1):
        raise SystemExit("--steps, --blocks, --batch-size and --peak-size must be >= 1, "
                         "--warmup >= 0")
    names = [n.strip() for n in ARGS.models.split(",") if n.strip()]
    known = (*MODELS, "configs") if ARGS.layers else MODELS  # (configs: layers alone only)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {', '.join(known)}")
    if ARGS.functional:
        rows = bench_functional(names)
        print_functional(rows)
        write_json({"functional": rows})
        return
    if ARGS.layers:
        rows = bench_layers(names)
        print_layers(rows)
        write_json({"torch_memory_format": "channels_last" if ARGS.torch_channels_last
                    else "NCHW", "precision": ARGS.precision, "layers": rows})
        return
    peak = matmul_peak(ARGS.peak_size)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "blas": blas_info(),
                    "matmul_peak_gflop_s": peak, "load_average_start": load_average()},
        "threads": THREADS, "numpy_version": np.__version__,
        "torch_version": torch.__version__ if torch is not None else None,
        "torch_memory_format": "channels_last" if ARGS.torch_channels_last else "NCHW",
        "xpcnn_fast_path": fast_kernels(xpcnn.get_backend("cpu")) is not None,
        "steps": ARGS.steps, "blocks": ARGS.blocks, "warmup": ARGS.warmup,
        "precision": ARGS.precision,
        "timing": "block timing, " + ("PyTorch in its own process" if ARGS.torch_own_process else
                                        "one process"),
        "flop_formula": "2*MACs of forward convs+dense; training = 3x",
        "memory_method": "skipped" if ARGS.no_memory else
        "per-side subprocess: peak RSS during training steps minus RSS before them",
        "models": [],
    }
    for name in names:
        row = bench_model(name, peak)
        result["models"].append(row)
        print(f"{name}: done ({json.dumps({k: row[k] for k in row if k.endswith('ratio')})})",
              file=sys.stderr)
    # The peak again at the end (another process may have held a core at the start): the best
    # of the two is the machine's, and every share is recomputed against it.
    best = max(peak, matmul_peak(ARGS.peak_size))
    result["machine"]["matmul_peak_gflop_s"] = best
    for row in result["models"]:
        for lib in ("xpcnn", "torch"):
            if lib in row:
                row[lib]["train_peak_share"] = row[lib]["train_gflop_s"] / best
                row[lib]["infer_peak_share"] = row[lib]["infer_gflop_s"] / best
    result["machine"]["load_average_end"] = load_average()
    print_table(result)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {ARGS.json}")


if __name__ == "__main__":
    main()
