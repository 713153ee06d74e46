"""Peak memory of a training step, xpcnn on CuPy against its PyTorch twin, estimated on the CPU.

Issue 18 asks for a training step's peak GPU memory at most 1.5x PyTorch's; scripts/bench_gpu.py
measures both on a GPU. Without one, this estimates both sides for the reference models at
batch 128 (``--batch 512`` too), float32 and mixed float16:

- **xpcnn**: the peak of one eager step as tests/launch_counter.py counts it (its
  ``step_launches`` and ``MEMORY``: CuPy's kernels and cuDNN graphs emulated, every device
  buffer charged from its creation until it is freed, rounded up to 512 bytes). Counted: the
  parameters, the optimiser's slots, the layers' state, the running totals and loss scale, the
  batch (uint8 images, int64 labels, as ``fit`` uploads them), the saved activations and every
  temporary. Not counted: cuDNN's and cuBLAS' workspaces (bench_gpu's CuPy pool counts them).
  bench_gpu feeds xpcnn a batch already cast to float32 (``Model._to_device``): the column
  ``as bench_gpu`` adds the difference (3 bytes an input value), which is alive all the step.
- **PyTorch**: the twin of scripts/torch_mirror.py trained as bench_gpu's ``torch_twin`` does
  (SGD momentum 0.9, ``zero_grad(set_to_none=True)`` after the forward pass, cross-entropy on the
  logits; mixed float16: ``torch.autocast(float16)`` and a GradScaler; a float32 NCHW batch,
  channels-last with ``--torch-channels-last``), on the CPU, under
  ``torch.profiler.profile(profile_memory=True)``: the profile starts before the twin is built,
  so the running sum of its allocation events, each rounded up to 512 bytes as the CUDA caching
  allocator's blocks are, is what ``torch.cuda.memory_allocated() - base`` is on a GPU, and its
  high-water mark inside the measured step (after 2 warm-up steps, as for xpcnn) stands for
  ``max_memory_allocated() - base``. It counts the parameters, the last step's gradients (alive
  until ``zero_grad``), the momentum buffers, the batch, autocast's float16 weight copies, the
  tensors autograd saves and every temporary. Column ``torch`` leaves out the scratch of a few
  operations (bytes allocated and freed inside one call, :data:`SCRATCH_OPS`): the
  convolutions' and matrix products' stand for cuDNN's and cuBLAS' workspaces, which xpcnn's
  count leaves out too; column ``+scratch`` keeps them (all the CPU allocated).
  Besides, ``torch.autograd.graph.saved_tensors_hooks`` lists what autograd saves for the
  backward pass per module (parameters apart: they cost nothing more), a cross-check of the
  profile that does not depend on the allocator.

Where the CPU is not the GPU, and which way each moves the ratio xpcnn / PyTorch on a GPU:
- ``nn.Dropout`` runs ``native_dropout`` on CUDA, which saves a bool mask; on the CPU it saves a
  float mask (4x the bytes). The twin's dropouts here call ``torch.native_dropout`` as CUDA
  does (``--cpu-dropout`` keeps the CPU's), so this is not a difference of the estimate.
- CPU autocast float16 casts convolutions and matrix products as CUDA's does; BatchNorm,
  InstanceNorm, ReLU and max pooling run in their input's dtype on both, cross-entropy in
  float32 on both. GradScaler unscales in place on both.
- cuDNN's workspaces (``cudnn.benchmark`` picks the fastest algorithm that fits the free
  memory) are in PyTorch's ``max_memory_allocated`` and in bench_gpu's CuPy pool, in neither
  side here: a workspace of W MiB on both sides moves a ratio r toward 1 (down where r > 1).
- The CPU's convolutions are oneDNN's in float32 (weights reordered to blocked layouts: scratch)
  and, in float16, ATen's im2col fallback (its columns, up to 9x the input: scratch). Both
  save what cuDNN's do for the backward pass, input and weight. Max pooling keeps int64 indices
  on both. Its backward on the CPU copies its gradient and indices to channels-last when the
  incoming gradient is so laid out (Flatten's permute gives it so), where CUDA's copies the
  incoming gradient alone to NCHW: column ``torch`` leaves all of these copies out, a little
  below what CUDA holds there (the ratio errs high, against xpcnn).
- The optimiser: SGD's foreach path, as CUDA's default (``foreach=True`` here).
- xpcnn with CUDA graphs (bench_gpu's default) also holds its graph's pool, whose blocks stay
  reserved between replays: its peak on a GPU is above this eager count.

    PYTHONPATH=$PWD python scripts/memory_vs_torch.py                   # batch 128
    PYTHONPATH=$PWD python scripts/memory_vs_torch.py --batch 512 --models cifar
    PYTHONPATH=$PWD python scripts/memory_vs_torch.py --details \
        --gpu-json docs/bench/gpu-h200-2026-11-26-1311-final-nchw.json   # + PyTorch on a GPU

Needs PyTorch (a reference only, imported here) and a C++ compiler (the emulated CUDA kernels,
as tests/test_launch_counts.py).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # (the CuPy emulator and the launch counter)
sys.path.insert(0, str(ROOT / "scripts"))  # (the PyTorch twin)
os.environ.setdefault("TQDM_DISABLE", "1")

from launch_counter import MEMORY, emulated, step_launches  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn.models import INPUT_SHAPES, MODELS, build_model  # noqa: E402

MIB = 2**20
BLOCK = 512  # CuPy's and PyTorch's CUDA allocators round every block up to this


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


@dataclass
class Peak:
    """A step's peak bytes and what held them (label -> bytes; "before": allocated before the
    step); ``before``: the bytes in use at the step's start, by kind; ``saved``: the bytes
    autograd saved, per layer (PyTorch only)."""
    peak: int
    held: dict[str, int]
    before: dict[str, int]
    saved: dict[str, int] = field(default_factory=dict)
    with_scratch: int = 0  # the peak with the convolutions' and products' scratch (PyTorch)


# -- xpcnn: tests/launch_counter.py's count ----------------------------------------------------
def xpcnn_peak(name: str, precision: str, batch: int) -> Peak:
    """The peak of one eager step as tests/launch_counter.py counts it (inside ``emulated``);
    its bytes from before the step (the counter records those held at the peak) split into what
    the model keeps between steps, the batch, and the rest."""
    step_launches(name, precision, batch)
    held = dict(MEMORY.held_at_peak)
    kept = kept_between_steps(name, precision)
    images = batch * int(np.prod(INPUT_SHAPES[name]))  # uint8
    kept["batch (uint8 images, int64 labels)"] = rounded(images) + rounded(8 * batch)
    kept["other"] = held.get("before", 0) - sum(kept.values())
    return Peak(MEMORY.peak, held, kept)


def kept_between_steps(name: str, precision: str) -> dict[str, int]:
    """The bytes of what an xpcnn model keeps between training steps, by kind, as the launch
    counter's model is built and compiled (one step on the NumPy backend, any batch: these do
    not depend on it)."""
    model = build_model(name, input_shape=INPUT_SHAPES[name], device="cpu", seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9), precision=precision)
    rng = np.random.default_rng(0)
    model.train_step(rng.integers(0, 256, (2, *INPUT_SHAPES[name]), dtype=np.uint8),
                     rng.integers(0, 10, 2))
    kinds = {"param": "parameters", "optimizer": "optimiser slots", "state": "layer state"}
    kept: dict[str, int] = collections.Counter()
    for label, a in model._graph_arrays():
        kind = next((v for k, v in kinds.items() if label.startswith(k)),
                    "running totals, loss scale, random states")
        kept[kind] += rounded(a.nbytes)
    return dict(kept)


# -- PyTorch: the twin's allocations, profiled on the CPU --------------------------------------
def native_dropout(rate: float) -> Any:
    """``nn.Dropout`` as CUDA runs it: ``native_dropout``, which saves a bool mask (the CPU's
    ``dropout`` saves a mask in the input's dtype)."""
    import torch

    class Dropout(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.native_dropout(x, rate, self.training)[0]

    return Dropout()


def build_twin(model: xpcnn.Sequential, cuda_dropout: bool) -> tuple[Any, list[str]]:
    """The twin as bench_gpu's ``torch_twin`` builds it (without its leading NHWC -> NCHW
    permute), and the xpcnn layer each of its modules stands for."""
    import torch
    from torch_mirror import mirror, mirror_layer

    net = mirror(model, torch.float32, exact_random=False)[1:]
    owners = [layer.name for layer in model.layers
              for _ in mirror_layer(layer, exact_random=False)]
    if cuda_dropout:
        for i, module in enumerate(net):
            if isinstance(module, torch.nn.Dropout):
                net[i] = native_dropout(module.p)
    return net, owners


def torch_peak(model: xpcnn.Sequential, batch: int, precision: str, channels_last: bool,
               cuda_dropout: bool, warmup: int = 2) -> Peak:
    """The twin's peak in the step after ``warmup`` steps, from the profile's allocation events
    (see the module doc), what held it, and what autograd saved per module."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    layout = torch.channels_last if channels_last else torch.contiguous_format
    mixed = precision == "mixed_float16"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *model.input_shape[1:])).astype(np.float32)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net, owners = build_twin(model, cuda_dropout)
        net = net.to(memory_format=layout)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, foreach=True)
        scaler = torch.amp.GradScaler("cpu", enabled=mixed)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2)).clone(memory_format=layout)
        y = torch.from_numpy(rng.integers(0, 10, batch)).clone()
        scopes = [ModuleScope(module, owner) for module, owner in zip(net, owners, strict=True)]

        def train() -> None:
            with torch.autocast("cpu", dtype=torch.float16, enabled=mixed):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(warmup):
            train()
        before = kept_between_steps_torch(net, opt, x, y)
        with record_function("measured step"):
            train()
        saved = saved_per_module(train, {p.data_ptr() for p in net.parameters()})
        for scope in scopes:
            scope.remove()
    events, window = allocations(prof, "measured step")
    peak, held = allocation_peak(events, window, scratch=False)
    with_scratch, _ = allocation_peak(events, window, scratch=True)
    before["other"] = in_use_at(events, window[0]) - sum(before.values())
    return Peak(peak, held, before, saved, with_scratch)


def kept_between_steps_torch(net: Any, opt: Any, x: Any, y: Any) -> dict[str, int]:
    """The bytes the twin holds between steps, by kind (no reference kept: the last step's
    gradients must be freed by ``zero_grad`` as they are without this)."""
    import torch

    kept = {"parameters": list(net.parameters()),
            "gradients (last step's)": [p.grad for p in net.parameters()],
            "optimiser slots": [s for state in opt.state.values() for s in state.values()
                                if isinstance(s, torch.Tensor)],
            "buffers (BatchNorm statistics)": list(net.buffers()),
            "batch (float32 images, int64 labels)": [x, y]}
    return {k: sum(rounded(t.untyped_storage().nbytes()) for t in ts if t is not None)
            for k, ts in kept.items()}


class ModuleScope:
    """A profiler scope (``record_function``) named after the xpcnn layer around a module's
    forward, so that allocations and saved tensors name the layer they belong to."""

    current: list[str] = []  # the layers whose forward is running, innermost last

    def __init__(self, module: Any, owner: str) -> None:
        from torch.profiler import record_function

        self.open: list[Any] = []

        def enter(*_: Any) -> None:
            scope = record_function(f"layer {owner}")
            scope.__enter__()
            self.open.append(scope)
            ModuleScope.current.append(owner)

        def leave(*_: Any) -> None:
            ModuleScope.current.pop()
            self.open.pop().__exit__(None, None, None)

        self.hooks = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def saved_per_module(train: Any, params: set[int]) -> dict[str, int]:
    """The bytes autograd saves for the backward pass in one more step, per xpcnn layer (the
    loss's: "loss"), each storage once and parameters left out (they are held anyway)."""
    import torch

    seen: set[int] = set()
    saved: dict[str, int] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and t.data_ptr() not in params:
            seen.add(storage.data_ptr())
            where = ModuleScope.current[-1] if ModuleScope.current else "loss"
            saved[where] += rounded(storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train()
    return dict(saved)


#: The operations whose scratch (bytes allocated and freed inside one call) column ``torch``
#: leaves out (see the module doc): convolutions and matrix products (standing for cuDNN's and
#: cuBLAS' workspaces), max pooling's backward (the CPU's channels-last copies).
SCRATCH_OPS = ("aten::conv2d", "aten::convolution", "aten::_convolution",
               "aten::convolution_backward", "aten::linear", "aten::addmm", "aten::mm",
               "aten::matmul", "aten::max_pool2d_with_indices_backward")


@dataclass
class Allocation:
    start: int  # ns
    ptr: int
    nbytes: int  # rounded up to BLOCK; a free: minus the bytes it gave back
    label: str  # the layer and phase that allocated it
    scratch_until: int  # the end of the outermost SCRATCH_OPS call it was made in (0: none)
    scratch: bool = False  # freed before that call returned


def allocations(prof: Any, step: str) -> tuple[list[Allocation], tuple[int, int]]:
    """The profile's allocations in time order, each labelled with the layer whose forward or
    backward made it, scratch marked; and the time range of the scope named ``step``."""
    from torch._C._profiler import _EventType

    found: list[tuple[Any, tuple[Any, ...]]] = []
    forward_of: dict[int, str] = {}  # an autograd sequence number -> the layer that made it
    window = (0, 0)

    def layer_of(parents: tuple[Any, ...]) -> str | None:
        return next((p.name[len("layer "):] for p in reversed(parents)
                     if p.name.startswith("layer ")), None)

    def walk(nodes: Any, parents: tuple[Any, ...]) -> None:
        nonlocal window
        for node in nodes:
            if node.name == step:
                window = node.start_time_ns, node.end_time_ns
            if node.tag == _EventType.TorchOp and node.extra_fields.sequence_number >= 0:
                layer = layer_of(parents)
                if layer is not None and "Backward" not in node.name:
                    forward_of.setdefault(node.extra_fields.sequence_number, layer)
            if node.tag == _EventType.Allocation:
                found.append((node, parents))
            walk(node.children, (*parents, node))

    def label(parents: tuple[Any, ...]) -> str:
        layer = layer_of(parents)
        if layer is not None:
            return f"{layer} forward"
        for p in reversed(parents):  # (a backward node carries its forward op's number)
            if p.tag == _EventType.TorchOp and "Backward" in p.name \
                    and p.extra_fields.sequence_number in forward_of:
                return f"{forward_of[p.extra_fields.sequence_number]} backward"
        names = [p.name for p in parents]
        if any(n.startswith("Optimizer.step") for n in names):
            return "optimiser step"
        backward = next((n for n in reversed(names) if "Backward" in n), None)
        return backward.split(": ")[-1] if backward else (names[-1] if names else "?")

    walk(prof.profiler.kineto_results.experimental_event_tree(), ())
    events = []
    for node, parents in found:
        scope = next((p for p in parents if p.name in SCRATCH_OPS), None)
        events.append(Allocation(node.start_time_ns, node.extra_fields.ptr,
                                 node.extra_fields.alloc_size, label(parents),
                                 scope.end_time_ns if scope is not None else 0))
    events.sort(key=lambda a: a.start)
    live: dict[int, Allocation] = {}
    for a in events:
        if a.nbytes > 0:
            a.nbytes = rounded(a.nbytes)
            live[a.ptr] = a
        elif a.ptr in live:  # (a free; one of memory allocated before the profile is ignored)
            made = live.pop(a.ptr)
            made.scratch = a.scratch = a.start <= made.scratch_until
            a.nbytes = -made.nbytes
    return events, window


def in_use_at(events: list[Allocation], time: int) -> int:
    """The bytes allocated since the profile began and not freed by ``time``."""
    live: dict[int, int] = {}
    for a in events:
        if a.start >= time:
            break
        if a.nbytes > 0:
            live[a.ptr] = a.nbytes
        else:
            live.pop(a.ptr, None)
    return sum(live.values())


def allocation_peak(events: list[Allocation], window: tuple[int, int], scratch: bool
                    ) -> tuple[int, dict[str, int]]:
    """The high-water mark inside ``window`` of the bytes allocated since the profile began
    (with or without ``scratch``), and what held them then, by the label of the allocation
    ("before": allocated before ``window``)."""
    live: dict[int, tuple[int, str]] = {}
    total, peak, held = 0, 0, {}
    for a in events:
        if a.scratch and not scratch:
            continue
        if a.nbytes > 0:
            inside = window[0] <= a.start <= window[1]
            live[a.ptr] = (a.nbytes, a.label if inside else "before")
            total += a.nbytes
            if inside and total > peak:
                peak, held = total, live.copy()
        elif a.ptr in live:
            total -= live.pop(a.ptr)[0]
    by_label: dict[str, int] = collections.Counter()
    for nbytes, where in held.values():
        by_label[where] += nbytes
    return peak, dict(by_label)


# -- the report ----------------------------------------------------------------------------------
def print_row_detail(ours: Peak, theirs: Peak) -> None:
    """Per xpcnn layer: what each side held at its peak (forward: mostly what is kept for the
    backward pass; backward: gradients in flight) and what autograd saved; then the bytes
    in use at the step's start, by kind, and how many of them were still held at the peak."""
    layers: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for side, peak in (("xpcnn", ours), ("torch", theirs)):
        for where, nbytes in peak.held.items():
            if where == "before":
                continue
            layer, _, phase = where.rpartition(" ")
            key = layer if phase in ("forward", "backward") else where
            column = f"{side} {phase}" if phase in ("forward", "backward") else f"{side} other"
            layers[key][column] = layers[key].get(column, 0) + nbytes / MIB
    for layer, nbytes in theirs.saved.items():
        layers[layer]["torch saved"] = nbytes / MIB
    columns = ["xpcnn forward", "xpcnn backward", "xpcnn other", "torch forward",
               "torch backward", "torch other", "torch saved"]
    print(f"    MiB held at each side's peak, by layer{'':<13}"
          + "".join(f"{c:>15}" for c in columns))
    for layer, row in layers.items():
        if sum(row.values()) >= 0.01:
            print(f"      {layer:<48}" + "".join(
                f"{row[c]:>15.2f}" if c in row else f"{'':>15}" for c in columns))
    for side, peak in (("xpcnn", ours), ("torch", theirs)):
        print(f"    {side} at the step's start: " + ", ".join(
            f"{k} {v / MIB:.2f}" for k, v in peak.before.items())
            + f"; {peak.held.get('before', 0) / MIB:.2f} of it held at the peak")


def gpu_peaks(path: str) -> dict[tuple[str, int, str], float]:
    """PyTorch's peak MiB per (model, batch, precision) in a JSON report of bench_gpu.py."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["model"], r["batch"], r["precision"]): r["torch"]["peak_mib"] for r in rows
            if (r.get("torch") or {}).get("peak_mib")}


def gpu_columns(torch_mib: float | None, ours: int) -> str:
    if torch_mib is None:
        return f"{'-':>18}{'-':>8}"
    return f"{torch_mib:>18.2f}{ours / MIB / torch_mib:>7.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="notebook,mnist,cifar,mnist-bn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precisions", default="float32,mixed_float16")
    p.add_argument("--torch-channels-last", action="store_true",
                   help="the twin in PyTorch's channels-last layout (bench_gpu's option)")
    p.add_argument("--cpu-dropout", action="store_true",
                   help="the twin's dropouts as the CPU runs them (a float mask, not CUDA's bool)")
    p.add_argument("--gpu-json", default=None, metavar="PATH",
                   help="a JSON report of scripts/bench_gpu.py: its PyTorch peaks (measured on a "
                   "GPU) in a column beside this estimate")
    p.add_argument("--details", action="store_true",
                   help="also print, per row, what each side held at its peak by layer")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:  # (the graph networks' twins do not start with a permute)
            p.error(f"no twin for {name!r} here; expected some of {', '.join(MODELS)}")
    measured = gpu_peaks(args.gpu_json) if args.gpu_json else {}
    try:
        import torch
    except ImportError:
        print("skipped: PyTorch is not importable")
        return 0
    torch.set_num_threads(1)  # (the counts do not depend on it; the machine is shared)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, xpcnn {xpcnn.__version__}, "
          f"torch {torch.__version__}, batch {args.batch}, PyTorch "
          f"{'channels-last' if args.torch_channels_last else 'NCHW'}, dropout "
          f"{'as on the CPU' if args.cpu_dropout else 'as on CUDA'}")
    print("MiB at a training step's peak. xpcnn: counted by tests/launch_counter.py (uint8 "
          "batch); 'as bench_gpu': with the batch in float32, as bench_gpu feeds it. torch: "
          "the twin's, without the convolutions', products' and max-pool backward's scratch "
          "(as xpcnn's, no workspaces); '+scratch': with them (oneDNN reorders, float16 im2col, "
          "channels-last copies). ratio: 'as bench_gpu' / torch. saved: what autograd saves, "
          "parameters apart")
    print(f"{'model':<10}{'precision':<15}{'xpcnn':>8}{'as bench_gpu':>14}{'torch':>8}"
          f"{'+scratch':>10}{'ratio':>8}{'saved':>8}"
          + (f"{'torch on the GPU':>18}{'ratio':>8}" if measured else ""))
    with emulated():
        for name in args.models.split(","):
            for precision in args.precisions.split(","):
                ours = xpcnn_peak(name, precision, args.batch)
                gc.collect()
                model = build_model(name, input_shape=INPUT_SHAPES[name], seed=0)
                theirs = torch_peak(model, args.batch, precision, args.torch_channels_last,
                                    not args.cpu_dropout)
                as_bench = ours.peak + 3 * args.batch * int(np.prod(INPUT_SHAPES[name]))
                print(f"{name:<10}{precision:<15}{ours.peak / MIB:>8.2f}{as_bench / MIB:>14.2f}"
                      f"{theirs.peak / MIB:>8.2f}{theirs.with_scratch / MIB:>10.2f}"
                      f"{as_bench / theirs.peak:>7.2f}x"
                      f"{sum(theirs.saved.values()) / MIB:>8.2f}"
                      + (gpu_columns(measured.get((name, args.batch, precision)), as_bench)
                         if measured else ""),
                      flush=True)
                if args.details:
                    print_row_detail(ours, theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
