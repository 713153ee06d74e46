"""Count the device launches of a training step on CuPy, on a machine without a GPU.

The step runs as in tests/test_cudnn_conv.py's emulated fits (xpcnn.ops.fast_cupy's kernels
compiled for the CPU by tests/cuda_emulator.py, convolutions and their bias/ReLU epilogues as
cuDNN graphs of tests/cudnn_emulator.py), with every array of the model a :class:`DeviceArray`:
a NumPy array that stands for a CuPy array and counts each operation that would launch work on
a GPU, as CuPy does it:

- each emulated ``ElementwiseKernel`` / ``RawKernel`` call and cuDNN graph ``execute``: one;
- each ufunc call on device arrays (``x * y``, ``xp.maximum``, in-place operators): one
  elementwise kernel; ``matmul`` one cuBLAS call (counted as one launch, though cuBLAS may
  launch a split-K reduction too);
- each reduction (``sum``, ``max``, ``any``, ``mean`` ...): one reduction kernel;
- ``zeros`` / ``zeros_like``: one memset; ``ones`` / ``full`` / ``fill`` / ``arange``: one fill
  kernel; ``empty``: nothing;
- a copy (``copy``, ``astype`` to another dtype or with ``copy=True``, ``a[...] = b``, a
  ``reshape`` or ``ascontiguousarray`` that cannot be a view, ``concat`` / ``stack`` /
  ``where``): one;
- a host array or Python number put on the device (``xp.asarray``): one upload (a host-to-device
  copy; not a kernel, but a CUDA call with the same host cost);
- a device value read by the host (``float``, ``bool``, ``item``, ``to_numpy``): a host read
  (a step should have none).

Not counted: allocations (CuPy's memory pool: no launch), kernel compilation (first use only),
and what ``fit`` does around a step (the batch's upload or gather on the device, the progress
bar's reads of the running totals). Every array that outlives the step is checked to be a
DeviceArray, so that none of its operations goes uncounted.

Views (slicing, ``reshape`` of contiguous data, transposes) launch nothing. Operations nested
inside a counted one (NumPy's own implementation of a function, an emulated kernel's
marshalling) are not counted again. Each launch is attributed to where it was issued: the
layer and its method (``forward`` / ``backward``), else the innermost xpcnn function outside
``xpcnn.ops``.

The device memory a step holds is tracked too (:class:`Memory`): each device array's buffer
is charged, rounded up to CuPy's 512-byte blocks, from its creation until NumPy frees it, and
the peak of a step is the high-water mark of what all of them hold (parameters, optimiser
state, the batch, the layers' saved activations and every temporary), as CuPy's pool counts
its bytes in use. Not included: cuDNN's and cuBLAS' workspaces, and the blocks CuPy's pool
keeps cached without use.

    PYTHONPATH=$PWD:tests python tests/launch_counter.py [--batch N] [MODEL ...]

prints the breakdown of one eager step of each reference model, float32 and mixed float16:
its launches, then its peak device memory and what held it at the peak.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import sys
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve()
#: The 2-byte floats of mixed precision, whose products cuBLAS computes in float32.
HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
XPCNN = HERE.parents[1] / "xpcnn"


@dataclass(frozen=True)
class Launch:
    where: str  # "conv2d backward", "RunningTotals.add", ...
    kind: str  # "kernel", "cudnn", "cublas", "elementwise", "reduction", "memset", ...
    name: str  # the kernel, the ufunc, the function


class Counter:
    """The launches recorded while :attr:`active`; ``depth`` > 0 inside a counted operation."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.active = False
        self.depth = 0

    def record(self, kind: str, name: str) -> None:
        if self.active and self.depth == 0:
            self.launches.append(Launch(_where(), kind, name))

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


COUNTER = Counter()


class Memory:
    """Device bytes in use (see the module doc): ``in_use`` now; while ``active``, ``peak``
    and, at the peak, the bytes held per place that allocated them (``held_at_peak``)."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[int, str]] = {}  # id(buffer) -> (bytes, where)
        self.in_use = 0
        self.active = False
        self.peak = 0
        self.held_at_peak: dict[str, int] = {}

    def start(self) -> None:
        """Track the peak from now on: what is in use already counts as "before"."""
        self.buffers = {k: (b, "before") for k, (b, _) in self.buffers.items()}
        self.active, self.peak = True, self.in_use
        self.held_at_peak = self._held()

    def charge(self, a: np.ndarray) -> None:
        """Charge the buffer that ``a`` views, once, until it is freed."""
        buffer = a
        while isinstance(buffer.base, np.ndarray):
            buffer = buffer.base
        key = id(buffer)
        if key in self.buffers or not buffer.nbytes:
            return
        nbytes = -(-buffer.nbytes // 512) * 512
        self.buffers[key] = (nbytes, _where() if self.active else "before")
        self.in_use += nbytes
        weakref.finalize(buffer, self._free, key)
        if self.active and self.in_use > self.peak:
            self.peak, self.held_at_peak = self.in_use, self._held()

    def _free(self, key: int) -> None:
        nbytes, _ = self.buffers.pop(key)
        self.in_use -= nbytes

    def _held(self) -> dict[str, int]:
        held: dict[str, int] = collections.Counter()
        for nbytes, where in self.buffers.values():
            held[where] += nbytes
        return dict(held)

    def breakdown(self) -> str:
        """The peak and what held it, largest first."""
        lines = [f"  {self.peak / 2**20:7.2f} MiB at the step's peak:"]
        lines += [f"  {nbytes / 2**20:7.2f}  {where}" for where, nbytes in
                  sorted(self.held_at_peak.items(), key=lambda item: -item[1])]
        return "\n".join(lines)


MEMORY = Memory()


_PHASES = ("forward", "backward")


def _where() -> str:
    """The layer and method (``forward`` / ``backward``) that issued the launch, else the
    innermost xpcnn function outside ``xpcnn.ops``."""
    from xpcnn.layers.base import Layer

    frame = sys._getframe(2)
    layer, phase, fallback = None, None, None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Layer) and (layer is None or owner is layer):
            name = frame.f_code.co_name
            if layer is None or (phase not in _PHASES and name in _PHASES):
                phase = name  # (forward or backward, not the checks wrapped around them)
            layer = owner
        elif layer is not None:
            break
        elif fallback is None:
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(XPCNN) and not path.is_relative_to(XPCNN / "ops"):
                code = frame.f_code  # (co_qualname: Python 3.11 on)
                fallback = getattr(code, "co_qualname", code.co_name)
        frame = frame.f_back
    return f"{layer.name} {phase}" if layer is not None else fallback or "?"


def device_array(a: Any) -> Any:
    """NumPy arrays (and scalars) as DeviceArrays (arrays on the counted device), through
    tuples and lists."""
    if isinstance(a, np.generic):
        a = np.asarray(a)
    if isinstance(a, np.ndarray):
        MEMORY.charge(a)  # (a DeviceArray made by NumPy's own methods may hold a new buffer)
        return a if isinstance(a, DeviceArray) else a.view(DeviceArray)
    if isinstance(a, tuple | list):
        return type(a)(device_array(b) for b in a)
    return a


def _host(a: Any) -> Any:
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, tuple | list):
        return type(a)(_host(b) for b in a)
    return a


def _arrays(args: Any) -> list[np.ndarray]:
    out = []
    for a in args:
        if isinstance(a, np.ndarray):
            out.append(a)
        elif isinstance(a, tuple | list):
            out += _arrays(a)
    return out


def _is_view(result: Any, inputs: list[np.ndarray]) -> bool:
    """Whether ``result`` (arrays) only views ``inputs``: nothing was copied (an empty array
    copies nothing)."""
    results = _arrays([result]) if isinstance(result, tuple | list) else [result]
    return bool(results) and all(
        isinstance(r, np.ndarray) and (r.size == 0 or any(np.shares_memory(r, a)
                                                          for a in inputs))
        for r in results)


def _counted(kind: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    COUNTER.record(kind, name)
    with COUNTER.inside():
        return fn(*args, **kwargs)


_REDUCTIONS = ("sum", "prod", "max", "min", "mean", "any", "all", "argmax", "argmin", "var",
               "std", "cumsum")


class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy array: see the module doc for what it counts."""

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, out: Any = None,
                        **kwargs: Any) -> Any:
        kind = ("cublas" if ufunc is np.matmul else "elementwise") if method == "__call__" \
            else "reduction" if method in ("reduce", "accumulate", "reduceat") else method
        COUNTER.record(kind, ufunc.__name__)
        with COUNTER.inside():
            if out is not None:
                kwargs["out"] = _host(tuple(out))
            inputs = _host(inputs)
            half = getattr(inputs[0], "dtype", None)
            if ufunc is np.matmul and out is None and half in HALVES and all(
                    getattr(a, "dtype", None) == half for a in inputs):
                # (as cuBLAS multiplies float16 and bfloat16 matrices: in float32, rounded
                # once, in their dtype; NumPy's own float16 matmul, a loop without BLAS, took
                # 4 s of a 6 s step, and its bfloat16 one, ml_dtypes', gives float32)
                result = np.matmul(*(a.astype(np.float32) for a in inputs),
                                   **kwargs).astype(half)
            else:
                result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return None if result is None else device_array(result)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        with COUNTER.inside():
            result = super().__array_function__(func, types_, args, kwargs)
        inputs = _arrays(list(args) + list(kwargs.values()))
        made = result is None or (  # (in place: copyto) or new arrays, not shapes or views
            isinstance(result, np.ndarray | np.generic | tuple | list)
            and not (isinstance(result, tuple | list) and not _arrays(result))
            and not _is_view(result, inputs))
        if made:
            COUNTER.record("reduction" if func.__name__ in _REDUCTIONS else "copy",
                           func.__name__)
        return device_array(result)

    # -- methods that do not go through a ufunc or an array function ---------------------------
    def copy(self, order: str = "C") -> Any:
        return device_array(_counted("copy", "copy", super().copy, order))

    def astype(self, dtype: Any, *args: Any, copy: bool = True, **kwargs: Any) -> Any:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return device_array(_counted("copy", "astype", super().astype, dtype, *args, copy=copy,
                                **kwargs))

    def fill(self, value: Any) -> None:
        _counted("fill", "fill", super().fill, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        with COUNTER.inside():
            target = np.ndarray.__getitem__(self, key)
        # (CuPy skips a value that is the target itself: ``a[1:2] += 1`` assigns a[1:2] to it)
        if not (isinstance(value, np.ndarray) and isinstance(target, np.ndarray)
                and (value.shape, value.strides, value.ctypes.data)
                == (target.shape, target.strides, target.ctypes.data)):
            COUNTER.record("copy" if isinstance(value, np.ndarray) else "fill", "setitem")
        with COUNTER.inside():
            super().__setitem__(key, value)

    def __getitem__(self, key: Any) -> Any:
        with COUNTER.inside():
            result = super().__getitem__(key)
            if isinstance(result, np.generic):  # (an element: a 0-d view on CuPy)
                result = super().__getitem__((*(key if isinstance(key, tuple) else (key,)),
                                              Ellipsis))
        if not _is_view(result, [self]):
            COUNTER.record("copy", "getitem")  # (an index array or mask: a gather)
        return device_array(result)

    def reshape(self, *shape: Any, **kwargs: Any) -> Any:
        with COUNTER.inside():
            result = super().reshape(*shape, **kwargs)
        if not _is_view(result, [self]):
            COUNTER.record("copy", "reshape")
        return device_array(result)

    def _reduction(name: str) -> Any:  # noqa: N805 (a method maker, run in the class body)
        def method(self: DeviceArray, *args: Any, **kwargs: Any) -> Any:
            return device_array(_counted("reduction", name, getattr(np.ndarray, name), self, *args,
                                    **kwargs))

        method.__name__ = name
        return method

    for _name in _REDUCTIONS:
        locals()[_name] = _reduction(_name)
    del _name, _reduction

    # -- host reads ----------------------------------------------------------------------------
    def _read(self, convert: Any) -> Any:
        COUNTER.record("host read", convert.__name__)
        with COUNTER.inside():
            return convert(self.view(np.ndarray))

    def __float__(self) -> float:
        return self._read(float)

    def __int__(self) -> int:
        return self._read(int)

    def __bool__(self) -> bool:
        return self._read(bool)

    def item(self, *args: Any) -> Any:
        return self._read(lambda a: a.item(*args))


# -- the namespace's and the fake CuPy's array creation ---------------------------------------
def _creation(kind: str | None, name: str, fn: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        if kind is not None:
            COUNTER.record(kind, name)
        with COUNTER.inside():
            return device_array(fn(*args, **kwargs))

    return make


def _asarray(fn: Any) -> Any:
    """``asarray``: nothing for a device array as it is; a copy where it must change its dtype
    or ``copy=True``; an upload for anything else (a host array, a Python number or list)."""
    def asarray(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, DeviceArray):
            with COUNTER.inside():
                result = fn(a.view(np.ndarray), *args, **kwargs)
            if not _is_view(result, [a]):
                COUNTER.record("copy", "asarray")
            return device_array(result)
        return _creation("upload", "asarray", fn)(a, *args, **kwargs)

    return asarray


def _ascontiguousarray(a: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(a, DeviceArray) and a.flags.c_contiguous and not args and not kwargs:
        return a
    return device_array(_counted("copy", "ascontiguousarray", np.ascontiguousarray, _host(a), *args,
                            **kwargs))


_CREATION = {"zeros": "memset", "zeros_like": "memset", "ones": "fill", "ones_like": "fill",
             "full": "fill", "full_like": "fill", "arange": "fill", "eye": "fill",
             "linspace": "fill", "empty": None, "empty_like": None}


def _patch_creation(stack: contextlib.ExitStack, module: Any) -> None:
    for name, kind in _CREATION.items():
        if hasattr(module, name):
            fn = getattr(module, name)
            stack.enter_context(mock.patch.object(module, name, _creation(kind, name, fn)))
    stack.enter_context(mock.patch.object(module, "asarray", _asarray(module.asarray)))


# -- the emulated kernels and cuDNN graphs ------------------------------------------------------
def _launch(kind: str, call: Any, label: Any) -> Any:
    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTER.record(kind, label(self))
        with COUNTER.inside():
            return device_array(call(self, *_host(args), **kwargs))

    return launch


def _graph_name(graph: Any) -> str:
    return "+".join(kind for kind, _, _ in graph.ops)


def _cupy_kernels_for_counting_backends(fast_cupy: types.ModuleType) -> Any:
    """``xpcnn.ops.kernels.fast_kernels`` patched to give a :func:`counting_backend` (a NumPy
    backend by name) the CuPy kernels of ``fast_cupy``; every other backend its own."""
    from xpcnn.ops import kernels

    own = kernels.fast_kernels

    def fast_kernels(backend: Any) -> Any:
        return fast_cupy.KERNELS if getattr(backend, "plays_cupy", False) else own(backend)

    return mock.patch.object(kernels, "fast_kernels", fast_kernels)


@contextlib.contextmanager
def counting(fast_cupy: types.ModuleType) -> Iterator[Counter]:
    """While inside, the launches of device work are recorded (see the module doc) in the
    counter yielded, which starts empty and inactive: set ``active`` around what to count.
    ``fast_cupy`` is the emulated module (``load_emulated_fast_cupy``); the NumPy namespace's
    and the fake CuPy's array creation, the emulated kernels and cuDNN graphs are patched."""
    import array_api_compat.numpy as compat_numpy
    from cuda_emulator import ElementwiseKernel, RawKernel
    from cudnn_emulator import PyGraph

    COUNTER.launches.clear()
    COUNTER.active, COUNTER.depth = False, 0
    with contextlib.ExitStack() as stack:
        _patch_creation(stack, compat_numpy)
        _patch_creation(stack, fast_cupy.cupy)
        stack.enter_context(mock.patch.object(fast_cupy.cupy, "ascontiguousarray",
                                              _ascontiguousarray))
        stack.enter_context(_cupy_kernels_for_counting_backends(fast_cupy))
        tables = sys.modules["xpcnn.ops.cuda_updates"]  # (the emulated one, as fast_cupy's)
        table = tables._device_table  # (an upload only where its addresses are new)
        stack.enter_context(mock.patch.object(
            tables, "_device_table", lambda *a: _counted("table", "address table", table, *a)))
        for cls, kind, label in ((ElementwiseKernel, "kernel", lambda k: k.name),
                                 (RawKernel, "kernel", lambda k: k.name),
                                 (PyGraph, "cudnn", _graph_name)):
            name = "execute" if cls is PyGraph else "__call__"
            stack.enter_context(mock.patch.object(cls, name, _launch(kind, getattr(cls, name),
                                                                     label)))
        try:
            yield COUNTER
        finally:
            COUNTER.active = False


def counting_backend() -> Any:
    """A NumPy-array backend that plays CuPy's part: the CuPy kernels (the emulated
    ``fast_cupy`` that sys.modules holds), GPU chunking, and every array it puts on its
    device a :class:`DeviceArray` (an upload)."""
    import array_api_compat.numpy as compat_numpy

    from xpcnn.backend import GPU_CHUNK_BYTES, Backend

    class CountingBackend(Backend):
        def asarray(self, a: Any, dtype: Any = None) -> Any:
            return _creation("upload", "asarray", super().asarray)(a, dtype)

        def to_numpy(self, x: Any) -> np.ndarray:
            COUNTER.record("host read", "to_numpy")
            return super().to_numpy(_host(x))

        plays_cupy = True  # (given the CuPy kernels inside counting())
        chunk_bytes = GPU_CHUNK_BYTES
        min_chunks = 1
        keeps_scratch = False

    return CountingBackend(compat_numpy, "cpu", "numpy")


#: The optimisers the counts can be made with (``--optimizer``): SGD with momentum 0.9 as
#: scripts/bench_gpu.py trains, and the others' fused updates.
OPTIMIZERS = {
    "sgd": lambda: _optim().SGD(0.01, momentum=0.9),
    "adam": lambda: _optim().Adam(1e-3),
    "rmsprop": lambda: _optim().RMSprop(1e-3),
    "rmsprop-centered-momentum": lambda: _optim().RMSprop(1e-3, momentum=0.9, centered=True),
}


def _optim() -> Any:
    import xpcnn.optim

    return xpcnn.optim


def counted_model(model_name: str, precision: str, batch: int, optimizer: str = "sgd"
                  ) -> tuple[Any, Any, Any]:
    """Reference model ``model_name`` on the counting backend, compiled with ``optimizer``
    (:data:`OPTIMIZERS`; eager steps), and a batch of ``batch`` uint8 images and their labels
    already on the device; inside :func:`counting`."""
    from xpcnn.models import INPUT_SHAPES, build_model

    rng = np.random.default_rng(0)
    shape = INPUT_SHAPES[model_name]
    model = build_model(model_name, input_shape=shape, device=counting_backend(), seed=0)
    model.compile(optimizer=OPTIMIZERS[optimizer](), precision=precision, cuda_graphs=False)
    x = device_array(rng.integers(0, 256, (batch, *shape), dtype=np.uint8))
    y = device_array(rng.integers(0, 10, batch))
    return model, x, y


def measured_step(counter: Counter, model: Any, x: Any, y: Any) -> list[Launch]:
    """The launches of one training step of ``model`` on (x, y), counted by ``counter``
    (after the warm-up steps the caller ran), its totals read after; :data:`MEMORY` then
    holds the step's peak device memory."""
    gc.collect()  # (the warm-up's arrays in reference cycles are freed, as on CuPy)
    MEMORY.start()
    counter.active = True
    model.train_step(x, y)
    counter.active = MEMORY.active = False
    launches = list(counter.launches)
    model._read_totals()
    return launches


def step_launches(model_name: str, precision: str = "float32", batch: int = 128,
                  warmup: int = 2, optimizer: str = "sgd", warmup_batch: int | None = None
                  ) -> list[Launch]:
    """The launches of one eager training step (after ``warmup`` steps) of reference model
    ``model_name`` on a batch of uint8 images already on the device, with ``optimizer`` (SGD
    with momentum 0.9 as scripts/bench_gpu.py trains, by default); the emulated CuPy and
    cuDNN must be loaded (see :func:`emulated`). :data:`MEMORY` then holds that step's peak
    device memory. ``warmup_batch``: the warm-up steps on that many of the batch's rows only
    (they build the model and its optimiser state, which no batch size changes; a step on
    the emulator takes time in proportion to its batch)."""
    fast_cupy = sys.modules["xpcnn.ops.fast_cupy"]
    with counting(fast_cupy) as counter:
        model, x, y = counted_model(model_name, precision, batch, optimizer)
        for _ in range(warmup):
            model.train_step(x[:warmup_batch], y[:warmup_batch])
        launches = measured_step(counter, model, x, y)
    # (an array that is no DeviceArray would have its operations go uncounted)
    untracked = [name for name, a in model._graph_arrays() if not isinstance(a, DeviceArray)]
    assert not untracked, f"arrays outside the count: {untracked}"
    return launches


@contextlib.contextmanager
def emulated() -> Iterator[types.ModuleType]:
    """``xpcnn.ops.fast_cupy`` on the CUDA emulator with the stand-in cuDNN frontend loaded
    (as tests/test_cudnn_conv.py's ``emulated_cupy`` fixture), put back on leaving. OpenBLAS
    is held to one thread inside: the emulated cuDNN's products are NumPy's, and OpenBLAS's
    workers spin-wait for a core whenever another process holds one (a cifar mixed_float16
    step took 64 s instead of 5 on a machine with 2 cores and 27 runnable processes)."""
    from cuda_emulator import load_emulated_fast_cupy, restore
    from cudnn_emulator import PyGraph, add_cupy_calls, fake_cudnn, import_cudnn_conv

    import xpcnn
    from xpcnn.ops.fast_numpy import NumpyKernels

    fast_cupy, saved = load_emulated_fast_cupy()
    saved_cudnn = sys.modules.get("cudnn")
    try:
        add_cupy_calls(sys.modules["cupy"])
        sys.modules["cudnn"] = fake_cudnn()
        with mock.patch.object(PyGraph, "refuse", None), \
                mock.patch.dict("os.environ", {"XPCNN_CUDNN": "1"}), NumpyKernels().pinned():
            import_cudnn_conv()
            yield fast_cupy
    finally:
        sys.modules.pop("xpcnn.ops.cudnn_conv", None)
        xpcnn.ops.__dict__.pop("cudnn_conv", None)
        if saved_cudnn is None:
            sys.modules.pop("cudnn", None)
        else:
            sys.modules["cudnn"] = saved_cudnn
        restore(saved)


#: What is recorded but launches nothing: an update kernel's address table (uploaded where its
#: addresses are new: on a GPU CuPy's pool usually gives a step's gradients the last step's
#: blocks, and the table is found in fast_cupy's cache; NumPy's allocator seldom does), and a
#: host read of a device value (a wait for the device).
NOT_LAUNCHES = ("table", "host read")


def launch_count(launches: list[Launch]) -> int:
    """The launches among the records (see :data:`NOT_LAUNCHES`)."""
    return sum(launch.kind not in NOT_LAUNCHES for launch in launches)


def breakdown(launches: list[Launch]) -> str:
    """The records per place, kind and name, in the order first issued, with the totals."""
    by_where: dict[str, collections.Counter] = {}
    for launch in launches:
        by_where.setdefault(launch.where, collections.Counter())[(launch.kind, launch.name)] += 1
    lines = []
    for where, names in by_where.items():
        items = ", ".join(f"{kind} {name}" + (f" x{k}" if k > 1 else "")
                          for (kind, name), k in names.items())
        lines.append(f"  {sum(names.values()):3d}  {where}: {items}")
    kinds = collections.Counter(launch.kind for launch in launches)
    lines.append(f"  {launch_count(launches):3d}  launches: " + ", ".join(
        f"{k} {n}" for k, n in kinds.most_common() if k not in NOT_LAUNCHES))
    others = [f"{k} {kinds[k]}" for k in NOT_LAUNCHES if kinds[k]]
    if others:
        lines.append("       and (no launch) " + ", ".join(others))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="The launches and peak device memory of one eager "
                                "training step on CuPy, counted on the CPU.")
    p.add_argument("models", nargs="*", default=["notebook", "mnist", "cifar"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    args = p.parse_args(argv)
    with emulated():
        for name in args.models:
            for precision in ("float32", "mixed_float16", "mixed_bfloat16"):
                launches = step_launches(name, precision, args.batch, optimizer=args.optimizer)
                print(f"{name}, {precision}, batch {args.batch}: {launch_count(launches)} "
                      "launches")
                print(breakdown(launches))
                print(MEMORY.breakdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
