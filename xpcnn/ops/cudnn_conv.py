"""cuDNN behind the convolution seam, through NVIDIA's Python frontend (module ``cudnn`` of the
``nvidia-cudnn-frontend`` wheel), on CuPy arrays: imported by :mod:`xpcnn.ops.fast_cupy` (and
:mod:`xpcnn.cuda_graphs`, which puts the handle on a capture's stream) only.

Each operation is a cuDNN graph: forward (``conv_fprop``, with the bias and ReLU in the same
graph), input gradient (``conv_dgrad``) and kernel gradient (``conv_wgrad``), channels-last.
A graph is built once per process for each (device, operation, geometry, batch size, dtype,
bias, ReLU, switches) and shared by every layer and model that asks for it, as PyTorch's
``cudnn.benchmark`` cache is (see :func:`shared_plan`, :func:`clear_plans`).
A tensor's ``dim`` is always in cuDNN's logical order (N, C, H, W); its ``stride`` says where the
values lie: an (N, H, W, C) image is dim [N, C, H, W] with strides [H*W*C, 1, W*C, C], and a
(K, kh, kw, C) kernel (cuDNN's "KRSC" filter) dim [K, C, kh, kw], strides [kh*kw*C, 1, kw*C, C].
Graphs run on CuPy's current stream with a workspace from CuPy's memory pool, so they can be
captured in a CUDA graph (tests/test_gpu.py). The same module gives matmuls as cuDNN graphs,
which stream capture takes where CuPy's cuBLAS calls are refused (:class:`CudnnMatmul`).

float32 runs in TF32 on the tensor cores, as PyTorch's convolutions do by default; with
``XPCNN_TF32=0`` in full float32. The switch is the one PyTorch uses on its cuDNN v8 path
(aten/src/ATen/native/cudnn/Conv_v8.cpp, ``filterEngineConfigs``): float32 plans whose engines
carry cuDNN's numerical note DOWN_CONVERT_INPUTS (float16 products inside) are always
excluded, those with TENSOR_CORE (TF32) too where TF32 is off
(``pygraph.deselect_numeric_notes``).

Matmul graphs follow CuPy's switch for its own matmuls instead (``CUPY_TF32``, full float32
by default), as a captured step's products must match an eager step's. ``XPCNN_DETERMINISTIC=1``
excludes plans with the note NONDETERMINISTIC from every graph (PyTorch's
``cudnn.deterministic``; PyTorch's v8 path filters the same note).

Each graph's plan is chosen by timing, as PyTorch's ``cudnn.benchmark`` and TensorFlow's
autotuning do: the first :data:`TUNE_LIMIT` plans that build, in the heuristics' order, run on
the graph's first call's own arrays, and the fastest is kept (see :meth:`CudnnPlan.run`). On an
H200 the heuristics' first plan for a 3x3 convolution ran 1.6x slower than PyTorch's timed
choice (../shared/gpu-notes.md). ``XPCNN_CUDNN_AUTOTUNE=0``, or ``XPCNN_DETERMINISTIC=1``
(timings differ from run to run, and so would the plan), keeps the heuristics' first plan.

Where cuDNN cannot be loaded, or has no plan for a case, the hand-written CUDA kernels
(:mod:`xpcnn.ops.cuda_conv`) run instead, after a one-line warning (once per reason).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import cupy
import numpy as np

from ..errors import warn
from .convolution import ConvEngine, ConvGeometry, KernelsConv

_WARNED: set[str] = set()
_NOT_BUILT: Any = object()  # a plan cache's answer for a key not looked up before


def warn_once(message: str) -> None:
    """A RuntimeWarning the first time ``message`` is given in this process (pointed at the
    user's line, :func:`xpcnn.errors.warn`)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


@functools.cache
def load() -> ModuleType | None:
    """The frontend module with cuDNN's library loaded; None with ``XPCNN_CUDNN=0``, or after
    a warning where it cannot be loaded."""
    if os.environ.get("XPCNN_CUDNN", "1") == "0":
        return None
    try:
        import cudnn

        cudnn.backend_version()  # loads libcudnn; raises where it is missing
    except Exception as e:  # ImportError, OSError, RuntimeError from the loader
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        warn_once(f"cuDNN could not be loaded ({reason}); convolutions run on xpcnn's "
                  "own CUDA kernels (pip install \"xpcnn[cuda12]\" or \"xpcnn[cuda13]\")")
        return None
    return cudnn


# The environment variables that choose a graph's plan, with their defaults (see switches).
SWITCHES = {"XPCNN_TF32": "1", "CUPY_TF32": "0", "XPCNN_DETERMINISTIC": "0",
            "XPCNN_CUDNN_AUTOTUNE": "1"}


def switches(matmul: bool = False) -> tuple[bool, bool, bool]:
    """The switches a graph is built under, as the environment sets them now, read together
    (once per graph run, where they key its plan, and are handed to :func:`build_plan` where
    that builds it), each on for any value but "0":

    - TF32: whether float32 graphs may run in TF32, ``XPCNN_TF32`` (on when unset, as
      PyTorch's convolutions); for a ``matmul`` graph, CuPy's own switch for its (cuBLAS)
      matmuls, ``CUPY_TF32`` (off when unset), so that a captured step's products are computed
      as an eager step's are (and as PyTorch's matmuls are by default: in full float32);
    - deterministic: whether graphs must give the same bits at every run,
      ``XPCNN_DETERMINISTIC`` (off when unset): plans with the numerical note NONDETERMINISTIC
      (atomic adds in a weight gradient, say) are then excluded, as PyTorch's
      ``cudnn.deterministic = True`` does;
    - autotune: whether a graph's plan is chosen by timing its candidates,
      ``XPCNN_CUDNN_AUTOTUNE`` (on when unset; off where deterministic)."""
    tf32, cupy_tf32, deterministic, autotune = (os.environ.get(k, default) != "0"
                                                for k, default in SWITCHES.items())
    return (cupy_tf32 if matmul else tf32), deterministic, autotune and not deterministic


def tf32() -> bool:
    """Whether float32 convolution graphs may run in TF32 now (:func:`switches`), for the
    benchmarks' reports."""
    return switches()[0]


def autotune() -> bool:
    """Whether plans are chosen by timing now (:func:`switches`), for the benchmarks'
    reports."""
    return switches()[2]


#: Plans timed per graph: the first ten that build, in the heuristics' order (the default of
#: PyTorch's ``torch.backends.cudnn.benchmark_limit``).
TUNE_LIMIT = 10
#: The workspace a timed plan may need; a plan needing more is kept only where every candidate
#: does (a plan's workspace is allocated at each run, and counts in a step's peak memory).
TUNE_WORKSPACE = 64 << 20
#: Runs timed per candidate, after one untimed run (which loads its kernels).
TUNE_RUNS = 3
#: A candidate this much slower than the fastest, or less, is as fast: the one of them with the
#: smallest workspace is kept.
TUNE_TOLERANCE = 1.05


def _address(a: Any) -> int:
    """Device address of a CuPy array's first element."""
    return a.data.ptr


# The frontend declares every tensor's address a multiple of this (cudnn_frontend's
# Tensor_attributes::default_alignment, "pointer alignment assumed by the backend when selecting
# engines"): CuPy's pool hands out 512-byte aligned blocks, but a view may start anywhere (a
# mixed-precision forward pass's weights are views into one buffer, CupyKernels.cast_all).
ALIGNMENT = 16


def _operand(a: Any) -> Any:
    """``a`` C-contiguous at an address that is a multiple of :data:`ALIGNMENT` (copied where
    it is not), as a graph's input."""
    if a.flags.c_contiguous and _address(a) % ALIGNMENT == 0:
        return a  # (as nearly every operand is: no call into CuPy)
    a = cupy.ascontiguousarray(a)
    return a if _address(a) % ALIGNMENT == 0 else a.copy()


class _GiveBack:
    """Gives a thread's cuDNN handles (device id -> (handle, the stream it was last put on)) to
    :data:`_SPARE` when the thread ends, for threads started later: a handle is never destroyed
    (cudnnDestroy synchronises the device, which a capture in another thread would not
    survive), as PyTorch's handle pool keeps them."""

    def __init__(self, handles: dict[int, tuple[Any, Any]]) -> None:
        self.handles = handles

    def __del__(self) -> None:
        for device, entry in self.handles.items():
            _SPARE.setdefault(device, queue.SimpleQueue()).put(entry)  # (safe in __del__)


# One handle per thread and device, as cuDNN asks ("threads do not share the same cuDNN handle
# simultaneously"): two threads sharing one, each putting it on its own stream, would run a
# graph on the other's stream. Plans are shared, and run with the caller's handle.
_THREAD = threading.local()
_SPARE: dict[int, queue.SimpleQueue[tuple[Any, Any]]] = {}  # device -> ended threads' handles


def _handle(cudnn: ModuleType, device: int | None = None) -> Any:
    """This thread's cuDNN handle of ``device`` (the current one where None: a plan knows its
    own), on CuPy's current stream: put on it only when the stream has changed, so a capture
    finds it there already (see :func:`use_current_stream`)."""
    if device is None:
        device = cupy.cuda.Device().id
    try:
        handle, on = _THREAD.handles[device]  # (one thread-local look-up per run)
    except (AttributeError, KeyError):  # (this thread's first graph on the device)
        handle, on = _spare_or_new_handle(cudnn, device)
    stream = cupy.cuda.get_current_stream().ptr
    if on != stream:
        cudnn.set_stream(handle=handle, stream=stream)
        _THREAD.handles[device] = handle, stream
    return handle


def _spare_or_new_handle(cudnn: ModuleType, device: int) -> tuple[Any, Any]:
    """(handle, stream) of ``device`` for this thread: an ended thread's, else a new one."""
    if "handles" not in _THREAD.__dict__:  # (a plain dict, the fastest to look up; the
        _THREAD.handles = {}                 # _GiveBack beside it hands it on at the end)
        _THREAD.give_back = _GiveBack(_THREAD.handles)
    handles = _THREAD.handles
    try:
        entry = _SPARE[device].get_nowait()
    except (KeyError, queue.Empty):
        with cupy.cuda.Device(device):  # (cudnnCreate binds a handle to the current device)
            entry = cudnn.create_handle(), None
    handles[device] = entry
    return entry


def use_current_stream() -> None:
    """Put this thread's cuDNN handle of the current device (where cuDNN loads) on CuPy's
    current stream now: before a CUDA-graph capture begins, rather than inside it (the capture
    runs on this thread, with this handle)."""
    cudnn = load()
    if cudnn is not None:
        _handle(cudnn)


def nhwc(n: int, c: int, h: int, w: int) -> tuple[list[int], list[int]]:
    """(dim, stride) of a C-contiguous (n, h, w, c) array in cuDNN's (N, C, H, W) order."""
    return [n, c, h, w], [h * w * c, 1, w * c, c]


def _data_type(cudnn: ModuleType, dtype: Any) -> Any:
    """cuDNN's type of a NumPy / CuPy dtype (bfloat16 where the array library has one)."""
    name = np.dtype(dtype).name
    return {"float16": cudnn.data_type.HALF, "bfloat16": cudnn.data_type.BFLOAT16,
            "float32": cudnn.data_type.FLOAT, "float64": cudnn.data_type.DOUBLE}[name]


class CudnnPlan:
    """A built cuDNN graph, its named tensors and workspace size: ``run`` executes it. With
    ``candidates`` ((plan index, workspace bytes) of the plans built, the heuristics' first
    selected), the first run times them and keeps the fastest. One plan may serve several
    layers, and threads, one run at a time: the timing is done once, and a run waits for it
    to end."""

    def __init__(self, cudnn: ModuleType, graph: Any, tensors: dict[str, Any],
                 candidates: list[tuple[int, int]] | None = None) -> None:
        self.cudnn, self.graph, self.tensors = cudnn, graph, tensors
        self.candidates = candidates or []
        self.workspace = int(graph.get_workspace_size())
        self.device = cupy.cuda.Device().id  # (built on the current one, with its handle)
        # Held around each run (the first one's timing included): cuDNN's execution plans are
        # not safe to run from two threads at once, though each has its own handle (NVIDIA in
        # pytorch#103939; PyTorch keeps its plan caches per thread). Uncontended, it costs
        # about as much as a dict look-up.
        self._lock = threading.Lock()

    def run(self, **arrays: Any) -> None:
        """Execute on CuPy's current stream, with this thread's handle and a workspace from
        CuPy's pool where the plan needs one; ``arrays`` are the named tensors' CuPy arrays
        (C-contiguous, in the layouts the graph was built for)."""
        pack = {}
        for name, a in arrays.items():
            pack[self.tensors[name]] = _address(a)
        handle = _handle(self.cudnn, self.device)
        with self._lock:
            if self.candidates:  # (one thread times; a run in another waits for the choice)
                try:
                    self._choose(pack, handle)
                finally:
                    self.candidates = []
            if not self.workspace:  # (address 0, as the frontend's workspace=None: no CuPy call)
                self.graph.execute(pack, 0, handle=handle)
                return
            workspace = cupy.empty(self.workspace, cupy.uint8)  # (the pool's, back after it)
            self.graph.execute(pack, _address(workspace), handle=handle)

    def _choose(self, pack: dict[Any, int], handle: Any) -> None:
        """Time each candidate on the arrays of ``pack`` (a graph writes only its outputs,
        which the run after this writes again) and select the fastest: once, on the first
        run. Inside a CUDA-graph capture nothing can be timed, and the heuristics' choice
        stays (for every layer that shares the plan); so it does where the workspace cannot
        be had. A candidate that fails to run is passed over.

        The candidates share one workspace from CuPy's default pool, not from the allocator
        in use: a CUDA graph's warm-up runs with a pool of the graph's own, which keeps every
        byte it ever held for the graph's life (xpcnn.cuda_graphs)."""
        candidates = self.candidates
        if cupy.cuda.get_current_stream().is_capturing():
            return
        fits = [c for c in candidates if c[1] <= TUNE_WORKSPACE] or candidates
        try:
            with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                workspace = cupy.empty(max(size for _, size in fits), cupy.uint8)
        except cupy.cuda.memory.OutOfMemoryError:
            return
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times: dict[int, float] = {}
        for index, _ in fits:
            try:
                for run in range(1 + TUNE_RUNS):
                    if run == 1:
                        start.record()
                    self.graph.execute_plan_at_index(pack, _address(workspace), index=index,
                                                     handle=handle)
                end.record()
                end.synchronize()
            except Exception:  # the frontend's errors have no common base
                continue
            times[index] = cupy.cuda.get_elapsed_time(start, end)
        if not times:
            return
        fast = min(times.values()) * TUNE_TOLERANCE
        _, index = min((size, i) for i, size in fits if i in times and times[i] <= fast)
        for choice in (index, candidates[0][0]):  # (the heuristics' first, should that fail)
            try:
                self.graph.build_plan_at_index(choice)  # (built already: this selects it)
                self.workspace = int(self.graph.get_workspace_size())
                return
            except Exception:  # the frontend's errors have no common base
                continue


def build_plan(cudnn: ModuleType, dtype: Any, make: Any, allow_tf32: bool, deterministic: bool,
               autotune: bool) -> CudnnPlan:
    """Build a graph of ``dtype`` data (float32 accumulators; float64 for float64): ``make(g,
    io)`` adds its tensors and operations and returns the named tensors; float32 products in
    TF32 only with ``allow_tf32``; only deterministic plans with ``deterministic``. With
    ``autotune``, up to :data:`TUNE_LIMIT` plans are built, for the first run to time. The
    switches are those the plan is kept under (:func:`switches`, read once: the environment
    changed meanwhile would give a plan another key's). Raises where cuDNN has no plan."""
    io = _data_type(cudnn, dtype)
    compute = cudnn.data_type.DOUBLE if io == cudnn.data_type.DOUBLE else cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=compute,
                          compute_data_type=compute, handle=_handle(cudnn))
    tensors = make(graph, io)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    notes = [cudnn.numerical_note.NONDETERMINISTIC] if deterministic else []
    if io == cudnn.data_type.FLOAT:  # no float16 products inside; TF32 only where allowed
        notes += [cudnn.numerical_note.DOWN_CONVERT_INPUTS] + (
            [] if allow_tf32 else [cudnn.numerical_note.TENSOR_CORE])
    if notes:
        graph.deselect_numeric_notes(notes)
    graph.check_support()
    candidates = _build_candidates(cudnn, graph) if autotune else []
    if not candidates:
        graph.build_plans()  # the heuristics' first plan that builds (raises where none does)
    return CudnnPlan(cudnn, graph, tensors, candidates if len(candidates) > 1 else None)


def _build_candidates(cudnn: ModuleType, graph: Any) -> list[tuple[int, int]]:
    """(index, workspace bytes) of the first :data:`TUNE_LIMIT` plans of ``graph`` that
    build, in the heuristics' order (one a note filter excludes raises, as one cuDNN cannot
    build does); the first of them selected. A plan compiled as it is built (cuDNN's runtime
    fusion engines, through NVRTC: up to a second or so each) is a candidate only as the
    first, so that timing compiles no more than building without it does."""
    built: list[tuple[int, int]] = []
    try:  # (where the plan list cannot be read, no timing: the heuristics' plan)
        compiled = cudnn.behavior_note.RUNTIME_COMPILATION
        count = graph.get_execution_plan_count()
    except Exception:  # the frontend's errors have no common base
        return built
    for index in range(count):
        try:
            if built and compiled in graph.get_behavior_notes_for_plan_at_index(index):
                continue
            graph.build_plan_at_index(index)
            built.append((index, int(graph.get_workspace_size_plan_at_index(index))))
        except Exception:  # the frontend's errors have no common base
            continue
        if len(built) == TUNE_LIMIT:
            break
    if built:
        graph.build_plan_at_index(built[0][0])  # (built already: this selects it)
    return built


# -- the process's plans -------------------------------------------------------------------------
# Every plan built in the process (None where cuDNN had none), by all that decides its graph and
# its choice (see shared_plan): kept for the process's life, as PyTorch's cudnn.benchmark cache
# is, or until clear_plans().
_PLANS: dict[tuple[Any, ...], CudnnPlan | None] = {}
_PLANS_LOCK = threading.Lock()  # held while a plan is built: each is built once


def shared_plan(key: tuple[Any, ...], build: Callable[[], CudnnPlan | None]) -> CudnnPlan | None:
    """The process's plan of ``key``: ``build()``'s on the first ask, from any layer or model;
    a thread asking while another builds it waits for that one rather than building it again.
    A None (cuDNN had no plan) is kept too: not tried, nor warned about, again.

    ``key`` holds all that the graph and its plan depend on: the device (a plan is built with
    its handle), the operation (a convolution's direction, epilogue and
    :class:`~xpcnn.ops.convolution.ConvGeometry`; a matmul's shapes and transposes), the batch
    size, the dtype, and the switches read at build (:func:`switches`: TF32, deterministic,
    autotune). The last keeps a plan chosen by timing from
    being served with autotuning off, and the heuristics' plan with it on (both can be wanted
    in one process: scripts/bench_gpu.py times one against the other). A plan's timing, done
    on its first run (:meth:`CudnnPlan.run`), is done once for every layer that shares it; a plan
    first run inside a CUDA-graph capture keeps the heuristics' choice, for them all."""
    plan = _PLANS.get(key, _NOT_BUILT)
    if plan is _NOT_BUILT:
        with _PLANS_LOCK:
            plan = _PLANS.get(key, _NOT_BUILT)
            if plan is _NOT_BUILT:
                plan = _PLANS[key] = build()
    return plan


def clear_plans() -> None:
    """Forget every cuDNN plan built so far in the process, so that the next use of each
    builds (and times) it afresh: to give back the graphs kept for models no longer used, or
    to time again (after a change of the GPU's clocks, say). A layer keeps the plans it has
    run (CUDA graphs captured from its steps replay them), as the CuPy kernels' matmul engine
    does: those go with it, not with this."""
    with _PLANS_LOCK:
        _PLANS.clear()


def _epilogue(graph: Any, y: Any, bias: Any | None, relu: bool, dim: list[int],
              stride: list[int]) -> Any:
    """``y`` (+ the ``bias`` tensor), then ReLU with ``relu``, as the graph's pointwise ops
    after the convolution or product that made it, each result of ``dim`` and ``stride``."""
    if bias is not None:
        y = graph.bias(input=y, bias=bias, name="add_bias")
        y.set_dim(dim).set_stride(stride)
    if relu:
        y = graph.relu(input=y, name="relu")
        y.set_dim(dim).set_stride(stride)
    return y


class CudnnConv(ConvEngine):
    """A layer's convolutions as cuDNN graphs; ``fallback`` (the hand-written kernels' engine)
    runs what cuDNN cannot build, after a one-line warning, and lends its kernels' ReLU
    gradient and bias sum."""

    name = "cudnn"

    def __init__(self, geometry: ConvGeometry, cudnn: ModuleType, fallback: KernelsConv
                 ) -> None:
        super().__init__(geometry)
        self.cudnn, self.fallback = cudnn, fallback
        self.kern = fallback.kern
        # the plans this engine has run, from the process's (kept: see clear_plans)
        self._plans: dict[tuple[Any, ...], CudnnPlan | None] = {}

    def _plan(self, key: tuple[Any, ...], dtype: Any, describe: Any, *args: Any
              ) -> CudnnPlan | None:
        """The plan of ``key`` (operation, batch size, dtype, epilogue) under the switches as
        they are now (:func:`switches`): the process's (:func:`shared_plan`), built on its
        first use by any layer from the graph description ``describe(*args)`` gives; None
        where cuDNN has none (the fallback runs). An engine serves one device (a layer makes a
        new one when it moves)."""
        on = switches()  # (read at every run: a switch changed gives another plan)
        own = (key, on)
        plan = self._plans.get(own, _NOT_BUILT)
        if plan is _NOT_BUILT:
            shared = ("convolution", cupy.cuda.Device().id, self.geometry, *own)
            plan = self._plans[own] = shared_plan(
                shared, lambda: self._build(key, dtype, describe(*args), on))
        return plan

    def _build(self, key: tuple[Any, ...], dtype: Any, make: Any,
               on: tuple[bool, bool, bool]) -> CudnnPlan | None:
        """``make``'s graph built under the switches ``on`` (its key's); None, after a
        one-line warning, where cuDNN has no plan."""
        try:
            return build_plan(self.cudnn, dtype, make, *on)
        except Exception as e:  # the frontend's errors have no common base
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            warn_once(f"cuDNN has no plan for {key[0]} of {self.geometry} in "
                      f"{np.dtype(dtype).name} ({reason}); xpcnn's own CUDA kernels run it")
            return None

    # -- the graphs (every tensor with its channels-last strides) ----------------------------
    def _conv_args(self) -> dict[str, Any]:
        g = self.geometry
        top, bottom, left, right = g.pads
        return {"pre_padding": [top, left], "post_padding": [bottom, right],
                "stride": list(g.strides), "dilation": [1, 1]}

    def _image(self, graph: Any, io: Any, name: str, n: int, hw: tuple[int, int], c: int) -> Any:
        dim, stride = nhwc(n, c, *hw)
        return graph.tensor(name=name, dim=dim, stride=stride, data_type=io)

    def _kernel(self, graph: Any, io: Any) -> Any:
        g = self.geometry
        dim, stride = nhwc(g.filters, g.channels, *g.kernel)
        return graph.tensor(name="w", dim=dim, stride=stride, data_type=io)

    def _fprop(self, n: int, bias: bool, relu: bool) -> Any:
        g = self.geometry

        def make(graph: Any, io: Any) -> dict[str, Any]:
            x = self._image(graph, io, "x", n, g.in_hw, g.channels)
            w = self._kernel(graph, io)
            dim, stride = nhwc(n, g.filters, *g.out_hw)
            y = graph.conv_fprop(image=x, weight=w, **self._conv_args(), name="conv")
            y.set_dim(dim).set_stride(stride)
            tensors = {"x": x, "w": w}
            if bias:
                tensors["bias"] = graph.tensor(name="bias", dim=[1, g.filters, 1, 1],
                                               stride=[g.filters, 1, g.filters, g.filters],
                                               data_type=io)
            y = _epilogue(graph, y, tensors.get("bias"), relu, dim, stride)
            y.set_output(True).set_data_type(io)
            return {**tensors, "y": y}

        return make

    def _dgrad(self, n: int) -> Any:
        g = self.geometry

        def make(graph: Any, io: Any) -> dict[str, Any]:
            dy = self._image(graph, io, "dy", n, g.out_hw, g.filters)
            w = self._kernel(graph, io)
            dx = graph.conv_dgrad(loss=dy, filter=w, **self._conv_args(), name="dgrad")
            dim, stride = nhwc(n, g.channels, *g.in_hw)
            dx.set_output(True).set_dim(dim).set_stride(stride).set_data_type(io)
            return {"dy": dy, "w": w, "dx": dx}

        return make

    def _wgrad(self, n: int) -> Any:
        g = self.geometry

        def make(graph: Any, io: Any) -> dict[str, Any]:
            x = self._image(graph, io, "x", n, g.in_hw, g.channels)
            dy = self._image(graph, io, "dy", n, g.out_hw, g.filters)
            dw = graph.conv_wgrad(image=x, loss=dy, **self._conv_args(), name="wgrad")
            dim, stride = nhwc(g.filters, g.channels, *g.kernel)
            dw.set_output(True).set_dim(dim).set_stride(stride).set_data_type(io)
            return {"x": x, "dy": dy, "dw": dw}

        return make

    # -- the seam ------------------------------------------------------------------------------
    def forward(self, x: Any, w: Any, bias: Any | None, relu: bool) -> Any:
        g, n = self.geometry, x.shape[0]
        key = ("forward", n, x.dtype, bias is not None, relu)
        plan = self._plan(key, x.dtype, self._fprop, n, bias is not None, relu)
        if plan is None:
            return self.fallback.forward(x, w, bias, relu)
        y = cupy.empty((n, *g.out_hw, g.filters), x.dtype)
        arrays = {"x": _operand(x), "w": _operand(w), "y": y}
        if bias is not None:
            arrays["bias"] = _operand(bias)
        plan.run(**arrays)
        return y

    def input_grad(self, dy: Any, w: Any) -> Any:
        g, n = self.geometry, dy.shape[0]
        plan = self._plan(("input gradient", n, dy.dtype), dy.dtype, self._dgrad, n)
        if plan is None:
            return self.fallback.input_grad(dy, w)
        dx = cupy.empty((n, *g.in_hw, g.channels), dy.dtype)
        plan.run(dy=_operand(dy), w=_operand(w), dx=dx)
        return dx

    def weight_grad(self, x: Any, dy: Any, with_bias: bool, relu_y: Any = None
                    ) -> tuple[Any, Any | None]:
        g, n = self.geometry, x.shape[0]
        plan = self._plan(("kernel gradient", n, x.dtype), x.dtype, self._wgrad, n)
        if plan is None:
            return self.fallback.weight_grad(x, dy, with_bias, relu_y)
        if relu_y is not None:
            dy = self.kern.relu_backward(dy, relu_y)
        dw = cupy.empty((g.filters, *g.kernel, g.channels), x.dtype)
        dy = _operand(dy)
        plan.run(x=_operand(x), dy=dy, dw=dw)
        db = self.kern.sum_rows(dy.reshape(-1, g.filters)) if with_bias else None
        return dw, db

    def gradients(self, x: Any, dy: Any, w: Any, with_bias: bool, input_grad: bool,
                  relu_y: Any = None) -> tuple[Any, Any | None, Any | None]:
        if relu_y is None or not with_bias:
            return super().gradients(x, dy, w, with_bias, input_grad, relu_y)
        # the ReLU's gradient and the bias gradient in one pass over dy, then the graphs
        rows = (-1, self.geometry.filters)
        masked, db = self.kern.relu_backward_sum_rows(dy.reshape(rows), relu_y.reshape(rows))
        dy = masked.reshape(dy.shape)
        dw, _ = self.weight_grad(x, dy, False)
        return dw, db, self.input_grad(dy, w) if input_grad else None


class CudnnMatmul:
    """2-D matrix products as cuDNN graphs (one per device, shapes, transposes, dtype and
    switches, in the process's plans: :func:`shared_plan`): a CUDA graph can capture them,
    where CuPy 14 refuses to capture cuBLAS. A product cuDNN has no plan for runs on cuBLAS
    after a one-line warning: eagerly it is the same product, and a capture of it fails, so
    the training step stays eager (with that reason)."""

    def __init__(self, cudnn: ModuleType) -> None:
        self.cudnn = cudnn
        # the plans this engine has run, from the process's (kept: see clear_plans)
        self._plans: dict[tuple[Any, ...], CudnnPlan | None] = {}

    def __call__(self, a: Any, b: Any, transpose_a: bool = False,
                 transpose_b: bool = False) -> Any:
        """``op(a) @ op(b)`` of C-contiguous 2-D ``a`` and ``b``, op a transpose where asked."""
        a, b = _operand(a), _operand(b)
        c = self._run(a, b, transpose_a, transpose_b, None, False)
        if c is None:  # (no plan: cuBLAS, after the warning)
            return (a.T if transpose_a else a) @ (b.T if transpose_b else b)
        return c

    def with_bias_relu(self, a: Any, b: Any, bias: Any | None, relu: bool) -> Any | None:
        """``a @ b + bias`` (where there is one), then ReLU with ``relu``, as one graph: the
        bias and ReLU the product's epilogue, not a kernel of their own (a node fewer in a
        captured step, and a pass fewer over the output). None where cuDNN has no plan for
        that graph, after a one-line warning: the caller then adds them after the product."""
        bias = None if bias is None else _operand(bias)
        return self._run(_operand(a), _operand(b), False, False, bias, relu)

    def _run(self, a: Any, b: Any, transpose_a: bool, transpose_b: bool, bias: Any | None,
             relu: bool) -> Any | None:
        m, k = a.shape[::-1] if transpose_a else a.shape
        n = b.shape[0] if transpose_b else b.shape[1]
        on = switches(matmul=True)  # (as they are now)
        key = (cupy.cuda.Device().id, a.shape, b.shape, transpose_a, transpose_b, a.dtype,
               bias is not None, relu, on)  # (the switches last, as in every plan's key)
        plan = self._plans.get(key, _NOT_BUILT)
        if plan is _NOT_BUILT:
            plan = self._plans[key] = shared_plan(
                ("matmul", *key),
                lambda: self._build(a.dtype, (m, k, n, transpose_a, transpose_b,
                                              bias is not None, relu), on))
        if plan is None:
            return None
        c = cupy.empty((m, n), a.dtype)
        arrays = {"a": a, "b": b, "c": c}
        if bias is not None:
            arrays["bias"] = bias
        plan.run(**arrays)
        return c

    def _build(self, dtype: Any, shape: tuple[Any, ...], on: tuple[bool, bool, bool]
               ) -> CudnnPlan | None:
        """The graph of ``shape`` (see :meth:`_make`) built under the switches ``on`` (its
        key's); None, after a one-line warning, where cuDNN has no plan."""
        m, k, n, _, _, bias, relu = shape
        try:
            return build_plan(self.cudnn, dtype, self._make(*shape), *on)
        except Exception as e:  # the frontend's errors have no common base
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            product = f"the matrix product ({m}, {k}) @ ({k}, {n}) in {np.dtype(dtype).name}"
            if bias or relu:
                epilogue = " + ".join(["bias"] * bias + ["ReLU"] * relu)
                warn_once(f"cuDNN has no plan for {product} with its {epilogue} in the "
                          f"same graph ({reason}); they run after it")
            else:
                warn_once(f"cuDNN has no plan for {product} ({reason}); cuBLAS runs "
                          "it, which a CUDA graph cannot capture: training steps with it run "
                          "eagerly")
            return None

    @staticmethod
    def _make(m: int, k: int, n: int, transpose_a: bool, transpose_b: bool,
              bias: bool = False, relu: bool = False) -> Any:
        """Batch-of-one (1, m, k) @ (1, k, n) tensors (a transposed operand is the same memory
        read with swapped strides), then a (1, 1, n) bias and a ReLU where asked."""

        def make(graph: Any, io: Any) -> dict[str, Any]:
            a = graph.tensor(name="a", dim=[1, m, k],
                             stride=[m * k, 1, m] if transpose_a else [m * k, k, 1], data_type=io)
            b = graph.tensor(name="b", dim=[1, k, n],
                             stride=[k * n, 1, k] if transpose_b else [k * n, n, 1], data_type=io)
            tensors = {"a": a, "b": b}
            dim, stride = [1, m, n], [m * n, n, 1]
            c = graph.matmul(A=a, B=b, name="matmul")
            c.set_dim(dim).set_stride(stride)
            if bias:
                tensors["bias"] = graph.tensor(name="bias", dim=[1, 1, n], stride=[n, n, 1],
                                               data_type=io)
            c = _epilogue(graph, c, tensors.get("bias"), relu, dim, stride)
            c.set_output(True).set_data_type(io)
            return {**tensors, "c": c}

        return make
