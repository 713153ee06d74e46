"""The device flag becomes an Array API namespace ``xp`` and a device.

This is the only module that knows NumPy from CuPy (or PyTorch, or ``array_api_strict``). Layers,
losses and optimisers receive a :class:`Backend` and use nothing but ``backend.xp`` (standard
functions) and ``backend.device``. Arrays cross between host and device only here: ``asarray``
(host -> device, one call per batch) and :func:`to_host` (device -> host; ``to_numpy`` too).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_compat.numpy as compat_numpy
import numpy as np

from .errors import DeviceError, InputError

CUDA_EXTRA_HINT = 'pip install "xpcnn[cuda12]" (CUDA 12) or pip install "xpcnn[cuda13]" (CUDA 13)'

# "cpu" | "cuda" | "cuda:N" | "auto" | namespace module | (module, device) | Backend
DeviceLike = Any

# The fast paths (xpcnn.ops.kernels.fast_kernels): on unless XPCNN_FAST_PATH=0 or
# set_fast_path(False).
_FAST_PATH = {"enabled": os.environ.get("XPCNN_FAST_PATH", "1") != "0"}
# Per-chunk scratch of chunked CPU loops: im2col patches of a few images stay in the L2/L3 cache.
CPU_CHUNK_BYTES = 3 << 20
# On a GPU, the most im2col scratch one convolution holds at a time: it bounds the peak memory
# of a step (whole-batch patches of a 32-channel 3x3 layer at batch 512 would be 604 MB).
# None: no bound, the whole batch at once (scripts/bench_gpu.py --gpu-chunk-mb 0 sets it).
GPU_CHUNK_BYTES: int | None = 32 << 20


def _ml_dtypes_bfloat16(library: str) -> Any:
    """bfloat16 on NumPy and CuPy: ml_dtypes' dtype, which NumPy takes as any registered dtype
    and CuPy from version 14 on, where it has a C type for it (CuPy 14.2 registers one only
    with NumPy 2.1.2 or later); None where ml_dtypes is missing or CuPy has no C type."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    dtype = np.dtype(ml_dtypes.bfloat16)
    if library == "cupy":
        try:  # (the name CuPy's kernels give the dtype; it raises for one CuPy does not take)
            from cupy._core._scalar import get_typename

            get_typename(dtype)
        except (ImportError, AttributeError, KeyError, TypeError, ValueError):
            return None
    return dtype


#: compile's precisions and the dtype of their heavy matmuls (None: the parameters' dtype).
PRECISIONS = {"float32": None, "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def precision_dtype(backend: Backend, precision: str, way_out: str) -> Any:
    """The dtype ``precision`` (a mixed one) computes in on ``backend``; where the backend
    lacks it, a DeviceError naming the precision as the cause and ``way_out``."""
    try:
        return backend.dtype(PRECISIONS[precision])
    except DeviceError as e:
        if "ml_dtypes" in str(e):  # (NumPy or CuPy without ml_dtypes: its own remedy)
            raise
        name = PRECISIONS[precision]
        raise DeviceError(f"precision={precision!r} computes in {name}, and the {backend.name} "
                          f"backend has no dtype {name!r}: {way_out}") from None


#: How many times :func:`set_fast_path` changed the setting: what a layer keeps for the kernels
#: of the moment (a convolution's engine) is made again after this moved (read without a call:
#: a training step asks at every convolution).
fast_path_switches = 0


def set_fast_path(enabled: bool) -> bool:
    """Turn the NumPy and CuPy fast paths on or off (for tests and comparisons); returns the old
    setting."""
    global fast_path_switches
    old = _FAST_PATH["enabled"]
    _FAST_PATH["enabled"] = bool(enabled)
    fast_path_switches += old != bool(enabled)
    return old


def to_host(a: Any) -> Any:
    """A host (NumPy) copy of an array of any namespace; a NumPy array or scalar, a list or a
    number as it is. (Told by the array's type, not a backend: a loss gets arrays from users.)"""
    if isinstance(a, np.ndarray | np.generic):
        return a
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy()
    if hasattr(a, "__array_namespace__") or hasattr(a, "__dlpack__"):
        return np.from_dlpack(a)
    return a


def dtype_name(dtype: Any, *, float_only: bool = True) -> str:
    """The name of a dtype of any namespace: "float16", "bfloat16", "float32" or "float64", an
    InputError for any other; with ``float_only=False``, any other by its own name, as an
    error names it ("int32", where array_api_strict's says "array_api_strict.int32")."""
    for name in ("bfloat16", "float16", "float32", "float64"):  # ("float16" is in "bfloat16")
        if name in str(dtype):
            return name
    if not float_only:
        return str(dtype).rsplit(".", 1)[-1]
    raise InputError(f"unsupported dtype {dtype!r}; expected float16, bfloat16, float32 or "
                     "float64")


@dataclass(frozen=True)
class Backend:
    """An Array API namespace and the device that every array of a model lives on."""

    xp: ModuleType
    device: Any
    name: str  # "numpy", "cupy", "torch", "array_api_strict", or the namespace's own name

    # -- host <-> device: the only two crossings ------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Copy a host array (or nested list) onto this backend's device."""
        if dtype is not None and isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if self.name == "numpy":
            # np.array copies, so the caller's array is never aliased by a parameter.
            return np.array(a, dtype=dtype)
        host = np.asarray(a)
        if not host.dtype.isnative:  # (big-endian data from a file: other libraries refuse it)
            host = host.astype(host.dtype.newbyteorder("="))
        return self.xp.asarray(host, dtype=dtype, device=self.device, copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Copy a device array to a NumPy array on the host."""
        return np.asarray(to_host(x))  # (a NumPy scalar, an element of an array: 0-d)

    # -- dtypes --------------------------------------------------------------------------
    def dtype(self, name: str | Any) -> Any:
        """The namespace's dtype object for a name such as ``"float32"``."""
        if not isinstance(name, str):
            return name
        dt = getattr(self.xp, name, None)
        if dt is None and name == "bfloat16" and self.name in ("numpy", "cupy"):
            dt = _ml_dtypes_bfloat16(self.name)
            if dt is None:
                raise DeviceError(
                    f"the {self.name} backend has no dtype 'bfloat16' here: it is ml_dtypes' "
                    "bfloat16, which needs ml_dtypes (pip install ml_dtypes; the [cuda12] and "
                    "[cuda13] extras install it)"
                    + (" and CuPy 14 or later with NumPy 2.1.2 or later" if self.name == "cupy"
                       else ""))
        if dt is None:
            raise DeviceError(
                f"the {self.name} backend has no dtype {name!r}; "
                "choose one it supports (float32 works everywhere)"
            )
        return dt

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        """The backend's GPU made the current one, for calls on its arrays outside
        :func:`xpcnn.ops.kernels.compute_scope` (which enters it too): checks of the arrays a
        call is given, on the caller's thread or the prefetch thread. CuPy allocates and
        launches on the current GPU, which is GPU 0 in a thread that chose none, and reads a
        model's arrays on "cuda:1" from there only through peer access (else a ValueError).
        Nothing elsewhere."""
        if self.name != "cupy":
            return contextlib.nullcontext()
        # A Device object of its own: CuPy's keeps the devices to go back to in a list on the
        # object, not per thread, and the prefetch thread enters one while the loop is inside.
        return type(self.device)(self.device.id)

    def current_stream_scope(self) -> contextlib.AbstractContextManager[Any]:
        """:meth:`on_device` and, on CuPy, this thread's current stream, as a context for
        another thread (the prefetch thread) to enter: device work done there for this one (a
        dataset's samples stacked, arrays adopted from another library) runs on the model's
        GPU and is queued in order before this thread's reads of it, on whatever stream this
        thread uses (another thread's default stream does not precede a non-blocking one); and
        CuPy's pool, which keeps freed memory per stream, reuses a batch's memory only after
        this stream's work on it.

        Where this thread's stream is CuPy's per-thread default stream
        (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``, or ``Stream.ptds`` entered), whose handle
        names each thread's own, the other thread gets the legacy default stream instead: CUDA
        orders that one against every blocking stream, per-thread ones included, both ways
        (its work waits for theirs before it, theirs after it waits for it), so the batches
        are made before this thread reads them and their memory is reused only after."""
        stream: Any = contextlib.nullcontext()
        if self.name == "cupy":
            import cupy

            with self.on_device():
                stream = cupy.cuda.get_current_stream()
            if stream.ptr == cupy.cuda.Stream.ptds.ptr:
                stream = cupy.cuda.Stream.null
        return _on_stream(self.on_device(), stream)

    @property
    def chunk_bytes(self) -> int | None:
        """Scratch size for loops that work on a batch a few images at a time (im2col): about
        what stays in a CPU's cache (:data:`CPU_CHUNK_BYTES`); on a GPU, a bound on the scratch
        held at once (:data:`GPU_CHUNK_BYTES`, which is None, the whole batch at once, where a
        benchmark set it so: scripts/bench_gpu.py ``--gpu-chunk-mb 0``)."""
        return GPU_CHUNK_BYTES if self.name == "cupy" else CPU_CHUNK_BYTES

    @property
    def min_chunks(self) -> int:
        """The fewest chunks such a loop splits a batch into: 8 on the CPU, so that threads
        share the work evenly; 1 on a GPU, where each launch should be as large as possible."""
        return 1 if self.name == "cupy" else 8

    @property
    def keeps_scratch(self) -> bool:
        """Whether scratch arrays are kept across steps: on the CPU fresh large arrays cost page
        faults every step; a GPU's memory pool reuses freed blocks already, and kept buffers
        would only add to the peak memory."""
        return self.name != "cupy"

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on the CPU."""
        if self.name == "cupy":
            import cupy

            cupy.cuda.Device(self.device.id).synchronize()

    def __repr__(self) -> str:
        return f"Backend({self.name}, device={self.device!r})"

    @property
    def label(self) -> str:
        """Short human-readable device name, such as ``cpu`` or ``cuda:0``."""
        if self.name == "numpy":
            return "cpu"
        if self.name == "cupy":
            return f"cuda:{self.device.id}"
        return f"{self.name}:{self.device}"


@contextlib.contextmanager
def _on_stream(device: Any, stream: Any) -> Iterator[None]:
    with device, stream:
        yield


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver errors of many kinds
        return False


def _cupy_backend(index: int) -> Backend:
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(
            f"device 'cuda:{index}' needs CuPy, which is not installed: {CUDA_EXTRA_HINT}"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise DeviceError(f"CuPy is installed but no CUDA GPU is usable here ({e})") from e
    if index >= count:
        raise DeviceError(f"device 'cuda:{index}' does not exist: this machine has {count} GPU(s)")
    import array_api_compat.cupy as compat_cupy

    return Backend(compat_cupy, cupy.cuda.Device(index), "cupy")


def _namespace_backend(module: ModuleType, device: Any = None) -> Backend:
    name = module.__name__
    if name in ("numpy", "array_api_compat.numpy"):
        if device not in (None, "cpu"):
            raise DeviceError(f"NumPy arrays live on 'cpu' only, not {device!r}")
        return Backend(compat_numpy, "cpu", "numpy")
    if name in ("cupy", "array_api_compat.cupy"):
        import array_api_compat.cupy as compat_cupy
        import cupy

        dev = device if device is not None else cupy.cuda.Device()
        if isinstance(dev, int):
            dev = cupy.cuda.Device(dev)
        return Backend(compat_cupy, dev, "cupy")
    if name in ("torch", "array_api_compat.torch"):
        import array_api_compat.torch as compat_torch
        import torch

        return Backend(compat_torch, torch.device(device or "cpu"), "torch")
    if not hasattr(module, "asarray") or not hasattr(module, "matmul"):
        raise DeviceError(f"module {name!r} is not an Array API namespace")
    default = array_api_compat.device(module.empty(0))
    if device is not None:  # (else the library's own error, from the model's first array)
        try:
            module.empty(0, device=device)
        except Exception as e:
            raise DeviceError(f"{name} has no device {device!r} ({type(e).__name__}: {e}); "
                              f"its default one is {default!r}") from None
    short = name.split(".")[-1]
    return Backend(module, default if device is None else device, short)


def get_backend(device: DeviceLike = "cpu") -> Backend:
    """Turn a device flag into a :class:`Backend`.

    ``device`` is ``"cpu"`` (NumPy), ``"cuda"`` / ``"cuda:N"`` (CuPy), ``"auto"`` (the first GPU
    when there is one, else the CPU), an Array API namespace module (``array_api_strict``,
    ``array_api_compat.torch``, ...), a ``(module, device)`` pair, or a Backend.
    """
    if isinstance(device, Backend):
        return device
    if device is None:
        device = "cpu"
    if isinstance(device, ModuleType):
        return _namespace_backend(device)
    if isinstance(device, tuple) and len(device) == 2 and isinstance(device[0], ModuleType):
        return _namespace_backend(device[0], device[1])
    if isinstance(device, str):
        flag = device.strip().lower()
        if flag == "auto":
            return _cupy_backend(0) if cuda_available() else get_backend("cpu")
        if flag == "cpu":
            return Backend(compat_numpy, "cpu", "numpy")
        m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", flag)
        if m:
            return _cupy_backend(int(m.group(1) or 0))
    raise DeviceError(
        f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N', 'auto', "
        "an Array API namespace module, or a (module, device) pair"
    )
