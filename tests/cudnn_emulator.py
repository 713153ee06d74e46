"""A stand-in for NVIDIA's cuDNN frontend (module ``cudnn``) and for the few CuPy calls of
``xpcnn.ops.cudnn_conv``, so that its graphs are built and run on a machine without a GPU.

The fake ``pygraph`` takes the frontend's calls (tensor, conv_fprop, conv_dgrad, conv_wgrad,
bias, relu, matmul, the build steps) and records them; ``execute`` then computes each graph
from the raw addresses it is given, reading and writing memory exactly where each tensor's
``dim`` and ``stride`` say (``dim`` in cuDNN's logical order, N, C, H, W). A wrong stride or
layout in xpcnn's descriptors therefore gives wrong numbers here, as it would on a GPU. The
arithmetic (NCHW loops over kernel taps) shares nothing with xpcnn's.

Each graph has the ranked plans of :data:`PyGraph.PLANS` (a cost in milliseconds, a workspace,
numerical notes, whether it builds and runs), all computing the same numbers: building and
running one by index, and the note filter, act on them as on the frontend's list, and a run by
index advances the emulated device's clock (:data:`CLOCK`) by its cost, which the fake CUDA
events read. So a choice made by timing plans can be checked here.

The fake ``cupy`` hands out NumPy arrays, whose host addresses stand for device ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided


class DataType(enum.Enum):
    HALF = np.float16
    FLOAT = np.float32
    DOUBLE = np.float64
    BFLOAT16 = ml_dtypes.bfloat16


class HeurMode(enum.Enum):
    A = 1
    B = 2
    FALLBACK = 3


class NumericalNote(enum.Enum):
    TENSOR_CORE = 1
    DOWN_CONVERT_INPUTS = 2
    NONDETERMINISTIC = 3


class BehaviorNote(enum.Enum):
    RUNTIME_COMPILATION = 1
    SUPPORTS_CUDA_GRAPH_NATIVE_API = 2


@dataclass(frozen=True)
class FakePlan:
    """One entry of a graph's ranked plan list."""

    ms: float  # the time of one run, added to CLOCK by a run by index
    workspace: int = 256
    notes: tuple[NumericalNote, ...] = ()
    behavior: tuple[BehaviorNote, ...] = ()
    builds: bool = True
    runs: bool = True


#: The emulated device's time in milliseconds.
CLOCK = [0.0]


class Tensor:
    def __init__(self, name: str, dim: list[int] | None, stride: list[int] | None,
                 data_type: DataType | None, virtual: bool) -> None:
        self.name, self.dim, self.stride, self.data_type = name, dim, stride, data_type
        self.virtual, self.output = virtual, False

    def set_output(self, value: bool) -> Tensor:
        self.output = bool(value)
        self.virtual = not value
        return self

    def set_dim(self, dim: list[int]) -> Tensor:
        self.dim = list(dim)
        return self

    def set_stride(self, stride: list[int]) -> Tensor:
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type: DataType) -> Tensor:
        self.data_type = data_type
        return self


def _row_major(dim: list[int]) -> list[int]:
    stride, acc = [], 1
    for d in reversed(dim):
        stride.insert(0, acc)
        acc *= d
    return stride


class PyGraph:
    """Records one graph; every instance is kept in ``GRAPHS`` for the tests to inspect."""

    STEPS = ("validate", "build_operation_graph", "create_execution_plans", "check_support",
             "build_plans")
    refuse: Any = None  # a predicate on the graph: raise at check_support where it holds
    # Every graph's ranked plans: the heuristics' first is not the fastest, and the fastest
    # is a TF32 one (excluded with XPCNN_TF32=0).
    PLANS: tuple[FakePlan, ...] = (
        FakePlan(ms=2.0, workspace=256),
        FakePlan(ms=1.5, workspace=1024),
        FakePlan(ms=1.0, workspace=512, notes=(NumericalNote.TENSOR_CORE,)))

    def __init__(self, io_data_type: DataType, intermediate_data_type: DataType,
                 compute_data_type: DataType, handle: Any) -> None:
        assert isinstance(handle, Handle), "build with the handle of the current device"
        self.io, self.intermediate, self.compute = (io_data_type, intermediate_data_type,
                                                    compute_data_type)
        self.tensors: list[Tensor] = []
        self.ops: list[tuple[str, dict[str, Any], Tensor]] = []
        self.steps: list[str] = []
        self.deselected: list[NumericalNote] = []
        self.heuristics: list[HeurMode] = []
        self.plans = PyGraph.PLANS
        self.built: set[int] = set()
        self.selected: int | None = None
        self.timed: list[int] = []  # the plan of each run by index, in order
        self.executions = 0  # runs of the selected plan
        # every run, by index or not: (handle, the stream it ran on, the workspace's address)
        self.runs: list[tuple[Handle, int, int]] = []
        GRAPHS.append(self)

    def tensor(self, name: str, dim: list[int], stride: list[int], data_type: DataType) -> Tensor:
        assert len(dim) == len(stride)
        t = Tensor(name, list(dim), list(stride), data_type, virtual=False)
        self.tensors.append(t)
        return t

    def _op(self, kind: str, args: dict[str, Any], dim: list[int] | None) -> Tensor:
        for v in args.values():
            assert not isinstance(v, Tensor) or v in self.tensors, "a tensor of another graph"
        out = Tensor(f"{kind}_out", dim, None if dim is None else _row_major(dim), None,
                     virtual=True)
        self.tensors.append(out)
        self.ops.append((kind, args, out))
        return out

    @staticmethod
    def _conv_attrs(pre_padding, post_padding, stride, dilation) -> dict[str, Any]:
        assert len(pre_padding) == len(post_padding) == len(stride) == len(dilation) == 2
        assert list(dilation) == [1, 1]
        return {"pre": list(pre_padding), "post": list(post_padding), "stride": list(stride)}

    def conv_fprop(self, image: Tensor, weight: Tensor, *, pre_padding, post_padding, stride,
                   dilation, name: str = "") -> Tensor:
        attrs = self._conv_attrs(pre_padding, post_padding, stride, dilation)
        n, _, h, w = image.dim
        k, _, kh, kw = weight.dim
        out = [n, k] + [(size + attrs["pre"][i] + attrs["post"][i] - kern) // attrs["stride"][i]
                        + 1 for i, (size, kern) in enumerate(((h, kh), (w, kw)))]
        return self._op("conv_fprop", {"x": image, "w": weight, **attrs}, out)

    def conv_dgrad(self, loss: Tensor, filter: Tensor, *, pre_padding, post_padding,  # noqa: A002
                   stride, dilation, name: str = "") -> Tensor:
        attrs = self._conv_attrs(pre_padding, post_padding, stride, dilation)
        return self._op("conv_dgrad", {"dy": loss, "w": filter, **attrs}, None)

    def conv_wgrad(self, image: Tensor, loss: Tensor, *, pre_padding, post_padding, stride,
                   dilation, name: str = "") -> Tensor:
        attrs = self._conv_attrs(pre_padding, post_padding, stride, dilation)
        return self._op("conv_wgrad", {"x": image, "dy": loss, **attrs}, None)

    def bias(self, input: Tensor, bias: Tensor, name: str = "") -> Tensor:  # noqa: A002
        return self._op("bias", {"x": input, "b": bias}, input.dim)

    def relu(self, input: Tensor, name: str = "") -> Tensor:  # noqa: A002
        return self._op("relu", {"x": input}, input.dim)

    def matmul(self, A: Tensor, B: Tensor, name: str = "") -> Tensor:  # noqa: N803
        return self._op("matmul", {"a": A, "b": B}, [A.dim[0], A.dim[1], B.dim[2]])

    # -- the build steps, in the frontend's order ----------------------------------------------
    def _step(self, name: str) -> None:
        assert self.steps == list(self.STEPS[:self.STEPS.index(name)]), (
            f"{name} after {self.steps}")
        self.steps.append(name)

    def validate(self) -> None:
        self._step("validate")
        for t in self.tensors:
            assert t.dim is not None and t.stride is not None, f"{t.name} has no dims/strides"
            assert t.virtual or t.data_type is not None, f"{t.name} has no data type"
        assert any(t.output for t in self.tensors), "no output"

    def build_operation_graph(self) -> None:
        self._step("build_operation_graph")

    def create_execution_plans(self, heuristics: list[HeurMode] | None = None) -> None:
        self._step("create_execution_plans")
        self.heuristics = list(heuristics or [HeurMode.A, HeurMode.FALLBACK])

    def deselect_numeric_notes(self, notes: list[NumericalNote]) -> None:
        assert self.steps[-1] == "create_execution_plans"
        self.deselected += list(notes)

    def check_support(self) -> None:
        self._step("check_support")
        if PyGraph.refuse is not None and PyGraph.refuse(self):
            raise RuntimeError("No valid engine configs for this graph\nmore")

    def build_plans(self) -> None:
        """The heuristics' choice: the first plan the note filter leaves that builds."""
        if "build_plans" not in self.steps:  # (build_plan_at_index may have come first)
            self._step("build_plans")
        for index, plan in enumerate(self.plans):
            if plan.builds and not self._barred(index):
                self.built.add(index)
                self.selected = index
                return
        raise RuntimeError("[cudnn_frontend] Error: No execution plans built successfully.")

    def _barred(self, index: int) -> bool:
        return bool(set(self.plans[index].notes) & set(self.deselected))

    def get_execution_plan_count(self) -> int:
        assert "create_execution_plans" in self.steps
        return len(self.plans)

    def build_plan_at_index(self, index: int) -> PyGraph:
        """Build the plan at ``index`` and select it (as the frontend's pygraph does)."""
        if "build_plans" not in self.steps:
            self._step("build_plans")
        if self._barred(index):
            raise ValueError(f"plan {index} is excluded by a note filter")
        if not self.plans[index].builds:
            raise RuntimeError(f"plan {index}: CUDNN_STATUS_NOT_SUPPORTED")
        self.built.add(index)
        self.selected = index
        return self

    def get_behavior_notes_for_plan_at_index(self, index: int) -> list[BehaviorNote]:
        assert "create_execution_plans" in self.steps
        return list(self.plans[index].behavior)

    def get_workspace_size_plan_at_index(self, index: int) -> int:
        assert index in self.built, f"plan {index} is not built"
        return self.plans[index].workspace

    def get_workspace_size(self) -> int:
        assert self.selected is not None, "no plan built"
        return self.plans[self.selected].workspace

    # -- running -------------------------------------------------------------------------------
    def execute(self, tensor_dict: dict[Tensor, int], workspace: Any = None,
                handle: Any = None) -> None:
        """The frontend's ``execute(tensor_dict, workspace=None, handle=None, ...)``: the
        selected plan. Without ``handle`` the frontend runs on the graph's own handle and its
        stream, not CuPy's current one: refused here."""
        assert self.selected is not None, "no plan built"
        self._run(tensor_dict, workspace, handle)
        self.executions += 1

    def execute_plan_at_index(self, tensor_dict: dict[Tensor, int], workspace: Any = None,
                              index: int = 0, handle: Any = None) -> None:
        """The frontend's ``execute_plan_at_index(tensor_dict, workspace, index, handle)``: a
        built plan, selected or not; the device's clock advances by its cost. Its variant pack
        is checked as ``execute``'s, and nothing is computed (every plan gives the numbers of
        the selected one, and the emulated convolutions are slow)."""
        assert index in self.built, f"plan {index} is not built"
        if not self.plans[index].runs:
            raise RuntimeError(f"plan {index}: CUDNN_STATUS_EXECUTION_FAILED")
        self._check(tensor_dict, workspace, handle, index)
        CLOCK[0] += self.plans[index].ms
        self.timed.append(index)

    def _run(self, tensor_dict: dict[Tensor, int], workspace: Any, handle: Any) -> None:
        self._check(tensor_dict, workspace, handle, self.selected)
        # in the graph's compute type, as cuDNN accumulates (float32 for every io type but
        # float64's: also four times faster here than float64 for all)
        compute = np.dtype(self.compute.value)
        values: dict[Tensor, np.ndarray] = {t: _read(t, p, compute)
                                            for t, p in tensor_dict.items() if not t.output}
        for kind, args, out in self.ops:
            values[out] = _COMPUTE[kind](out, *(values.get(v, v) if isinstance(v, Tensor) else v
                                                for v in args.values()))
        for t, p in tensor_dict.items():
            if t.output:
                _write(t, p, values[t])

    def _check(self, tensor_dict: dict[Tensor, int], workspace: Any, handle: Any,
               index: int) -> None:
        assert isinstance(workspace, int), "the workspace's address"
        assert workspace or not self.plans[index].workspace, f"plan {index} has no workspace"
        assert isinstance(handle, Handle), "execute with handle= (a cudnn.Handle)"
        self.runs.append((handle, handle.stream, workspace))
        assert handle.stream == current_stream().ptr, "run on CuPy's current stream"
        given = set(tensor_dict)
        wanted = {t for t in self.tensors if not t.virtual}
        assert given == wanted, f"variant pack {[t.name for t in given]} != {wanted}"
        assert all(isinstance(p, int) for p in tensor_dict.values())


def _view(t: Tensor, address: int) -> np.ndarray:
    """The memory at ``address`` seen through ``t``'s dims and strides."""
    dtype = np.dtype(t.data_type.value)
    extent = 1 + sum((d - 1) * s for d, s in zip(t.dim, t.stride, strict=True))
    buf = (ctypes.c_uint8 * (extent * dtype.itemsize)).from_address(address)
    flat = np.ctypeslib.as_array(buf).view(dtype)
    return as_strided(flat, shape=t.dim, strides=[s * dtype.itemsize for s in t.stride])


def _read(t: Tensor, address: int, dtype: np.dtype) -> np.ndarray:
    return _view(t, address).astype(dtype)


def _write(t: Tensor, address: int, value: np.ndarray) -> None:
    view = _view(t, address)
    assert value.shape == view.shape, f"{t.name}: computed {value.shape}, declared {view.shape}"
    view[...] = value


def _padded(x: np.ndarray, pre: list[int], post: list[int]) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (pre[0], post[0]), (pre[1], post[1])))


def _fprop(out: Tensor, x, w, pre, post, stride) -> np.ndarray:
    xp = _padded(x, pre, post)
    n, k, ho, wo = out.dim
    y = np.zeros((n, k, ho, wo), x.dtype)
    for a in range(w.shape[2]):
        for b in range(w.shape[3]):
            win = xp[:, :, a:a + stride[0] * (ho - 1) + 1:stride[0],
                     b:b + stride[1] * (wo - 1) + 1:stride[1]]
            y += np.einsum("nchw,kc->nkhw", win, w[:, :, a, b], optimize=True)
    return y


def _dgrad(out: Tensor, dy, w, pre, post, stride) -> np.ndarray:
    n, c, h, wd = out.dim
    ho, wo = dy.shape[2:]
    dxp = np.zeros((n, c, h + pre[0] + post[0], wd + pre[1] + post[1]), dy.dtype)
    for a in range(w.shape[2]):
        for b in range(w.shape[3]):
            dxp[:, :, a:a + stride[0] * (ho - 1) + 1:stride[0],
                b:b + stride[1] * (wo - 1) + 1:stride[1]] += np.einsum("nkhw,kc->nchw", dy,
                                                                       w[:, :, a, b],
                                                                       optimize=True)
    return dxp[:, :, pre[0]:pre[0] + h, pre[1]:pre[1] + wd]


def _wgrad(out: Tensor, x, dy, pre, post, stride) -> np.ndarray:
    xp = _padded(x, pre, post)
    k, c, kh, kw = out.dim
    ho, wo = dy.shape[2:]
    dw = np.zeros((k, c, kh, kw), x.dtype)
    for a in range(kh):
        for b in range(kw):
            win = xp[:, :, a:a + stride[0] * (ho - 1) + 1:stride[0],
                     b:b + stride[1] * (wo - 1) + 1:stride[1]]
            dw[:, :, a, b] = np.einsum("nchw,nkhw->kc", win, dy, optimize=True)
    return dw


_COMPUTE = {
    "conv_fprop": _fprop, "conv_dgrad": _dgrad, "conv_wgrad": _wgrad,
    "bias": lambda out, x, b: x + b,
    "relu": lambda out, x: np.maximum(x, 0.0),
    "matmul": lambda out, a, b: a @ b,
}

GRAPHS: list[PyGraph] = []


class Device:
    """``cupy.cuda.Device``: ``Device()`` is the current device, ``with Device(k):`` makes
    device k current for the block. Compute capability 6.0, as tests/test_gpu.py's emulated
    device: no tensor cores (the emulator runs none of the tensor-core kernels)."""

    current = 0
    compute_capability = "60"

    def __init__(self, device: int | None = None) -> None:
        self.id = Device.current if device is None else int(device)

    def __enter__(self) -> Device:
        self._before, Device.current = Device.current, self.id
        return self

    def __exit__(self, *exc: object) -> None:
        Device.current = self._before


class Handle:
    def __init__(self) -> None:
        self.device = Device.current  # (cudnnCreate binds the handle to the current device)
        self.stream: int | None = None
        self.streams_set: list[int] = []  # every set_stream, in order


def fake_cudnn() -> types.ModuleType:
    m = types.ModuleType("cudnn")
    m.pygraph = PyGraph
    m.data_type, m.heur_mode, m.numerical_note = DataType, HeurMode, NumericalNote
    m.behavior_note = BehaviorNote
    m.backend_version = lambda: 91900
    m.create_handle = Handle

    def set_stream(handle: Handle, stream: int) -> None:
        if not isinstance(handle, Handle):  # (the frontend's own check)
            raise TypeError("cudnn.set_stream expects a cudnn.Handle")
        assert isinstance(stream, int), "a stream's address (Stream.ptr)"
        handle.stream = stream
        handle.streams_set.append(stream)

    m.set_stream = set_stream
    return m


# -- the CuPy calls of xpcnn.ops.cudnn_conv ---------------------------------------------------
class FakeStream:
    def __init__(self, ptr: int) -> None:
        self.ptr, self.capturing = ptr, False

    def is_capturing(self) -> bool:
        return self.capturing

    def synchronize(self) -> None:
        """Nothing to wait for: the emulated device runs each launch as it is made."""

    def __enter__(self) -> FakeStream:
        """This stream the calling thread's current one until ``__exit__`` (CuPy's ``with
        stream:``; nested ones give back the one before)."""
        _THREAD.__dict__.setdefault("before", []).append(_THREAD.__dict__.get("stream"))
        _THREAD.stream = self
        return self

    def __exit__(self, *exc: object) -> None:
        before = _THREAD.before.pop()
        if before is None:
            del _THREAD.stream
        else:
            _THREAD.stream = before


class Event:
    """A CUDA event on the emulated device: ``record`` reads :data:`CLOCK`."""

    def __init__(self) -> None:
        self.time: float | None = None

    def record(self) -> None:
        self.time = CLOCK[0]

    def synchronize(self) -> None:
        assert self.time is not None, "an event never recorded"


def get_elapsed_time(start: Event, end: Event) -> float:
    assert start.time is not None and end.time is not None, "an event never recorded"
    return end.time - start.time


CURRENT_STREAM = FakeStream(0x5EED)  # every thread's, but one inside ``with stream:``
LEGACY_STREAM, PER_THREAD_STREAM = FakeStream(0), FakeStream(2)
_THREAD = threading.local()


def current_stream() -> FakeStream:
    """CuPy's current stream, which is the calling thread's own (``cuda.get_current_stream``)."""
    return _THREAD.__dict__.get("stream", CURRENT_STREAM)  # (no AttributeError: cheap)


DEFAULT_POOL = types.SimpleNamespace(malloc=lambda nbytes: None)


def add_cupy_calls(m: types.ModuleType) -> types.ModuleType:
    """Give a fake ``cupy`` (NumPy underneath) what xpcnn.ops.cudnn_conv calls; an allocator
    given to ``cuda.using_allocator`` is recorded in ``cuda.allocators`` while in use."""
    m.empty = np.empty
    m.ascontiguousarray = np.ascontiguousarray
    m.uint8 = np.uint8
    if not hasattr(m, "get_default_memory_pool"):  # (the CUDA emulator's cupy has its own)
        m.get_default_memory_pool = lambda: DEFAULT_POOL
    cuda = getattr(m, "cuda", None) or types.SimpleNamespace()
    cuda.Device = Device
    cuda.get_current_stream = current_stream
    # CuPy's class attributes: the legacy default stream (handle 0) and the per-thread default
    # stream (cudaStreamPerThread, handle 2); not a class: nothing emulated makes streams
    # (tests/test_distributed.py puts its own in for NCCL's)
    cuda.Stream = types.SimpleNamespace(null=LEGACY_STREAM, ptds=PER_THREAD_STREAM)
    cuda.Event, cuda.get_elapsed_time = Event, get_elapsed_time
    cuda.memory = types.SimpleNamespace(
        OutOfMemoryError=type("OutOfMemoryError", (MemoryError,), {}))
    if not hasattr(cuda, "using_allocator"):
        cuda.allocators = []

        @contextlib.contextmanager
        def using_allocator(allocator: Any = None) -> Iterator[None]:
            cuda.allocators.append(allocator)
            try:
                yield
            finally:
                cuda.allocators.pop()

        cuda.using_allocator = using_allocator
    m.cuda = cuda
    return m


def import_cudnn_conv() -> types.ModuleType:
    """``xpcnn.ops.cudnn_conv`` imported afresh against whatever ``cupy`` and ``cudnn``
    sys.modules holds, reading host addresses for device ones. Its cache of plans (the
    process's, ``shared_plan``) starts empty: each fixture that imports it sees graphs built
    by its own tests only, whatever ran before."""
    sys.modules.pop("xpcnn.ops.cudnn_conv", None)
    import xpcnn.ops.cudnn_conv as module

    module._address = lambda a: a.ctypes.data
    return module


def load_emulated_cudnn_conv() -> tuple[types.ModuleType, dict[str, Any]]:
    """``xpcnn.ops.cudnn_conv`` imported against a fake ``cupy``, and its ``load()`` giving
    the fake ``cudnn``; returns the module and the ``sys.modules`` entries that
    ``cuda_emulator.restore`` puts back."""
    names = ("cupy", "cudnn", "xpcnn.ops.cudnn_conv")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules["cupy"] = add_cupy_calls(types.ModuleType("cupy"))
    sys.modules["cudnn"] = fake_cudnn()
    return import_cudnn_conv(), saved
