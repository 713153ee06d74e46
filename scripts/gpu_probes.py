"""Short probes of the GPU APIs xpcnn relies on where the CPU emulators cannot answer (the
UNSURE rows of docs/gpu-api-audit.md): one line each, "ok" or "FAIL" with the first line of
the error, a failing probe not stopping the others. Run first by scripts/gpu_check.sh (a few
seconds); on a machine without a GPU it says so.

1. cuDNN's full-float32 switch for convolutions (``XPCNN_TF32=0``: plans with the numerical
   note TENSOR_CORE deselected) gives float32 accuracy; TF32 (the default) only TF32's.
2. The same switch for float32 matmul graphs (``CUPY_TF32`` unset): a plan exists.
3. CuPy 14 refuses ``xp.vecdot`` (cuBLAS) inside a stream capture, and takes ``xp.sum``.
4. ``cudnn.set_stream`` inside a capture: whether it invalidates it (xpcnn calls it before).
5. NCCL as xpcnn.distributed.NcclSum calls it, on one rank (no MPI needed).
6. The calls the training step added on 2026-12-05 run inside a capture and replay right:
   the standard finiteness watch (``max(abs(g))``, CUB's reduction, NaN kept; the CuPy
   kernels' own record is tests/test_gpu.py's), the standard snapshot of the
   normalisation statistics (``asarray(copy=True)``) and their restore (``where`` with a 0-d
   flag; the CuPy kernels' own are tests/test_gpu.py's), the labels' check (``all``,
   ``where(ok, stats, nan)``).
7. ``np.from_dlpack`` of a CuPy array raises what xpcnn.data.arrays.adopt_foreign catches (NumPy's
   dlpack.c: BufferError "Unsupported device in DLTensor."), so it is refused by name.
8. The plan timing (``XPCNN_CUDNN_AUTOTUNE``, on by default) on the forward graph (+ bias and
   ReLU) of ``cifar``'s second convolution at batch 512 in TF32: the plans listed and built,
   the seconds building and timing took, and the kept plan against the heuristics' first.
9. A Dense layer's product with its bias and ReLU in one graph (``CudnnMatmul.with_bias_relu``,
   what a captured step runs): whether cuDNN has a plan for it in full float32 and in float16,
   and its error.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _relative_error(got: Any, want: Any) -> float:
    want = want.get()
    return float(np.abs(got.get().astype(np.float64) - want).max() / np.abs(want).max())


def _plan_name(plan: Any) -> str:
    graph = plan.graph
    return graph.get_plan_name_at_index(getattr(graph, "_plan_index", 0))


def conv_tf32_switch(cp: Any, xc: Any, cudnn: Any) -> str:
    from xpcnn.ops import cudnn_conv
    from xpcnn.ops.convolution import ConvGeometry, KernelsConv
    from xpcnn.ops.kernels import StandardKernels

    g = ConvGeometry.of((16, 16, 32), 32, (3, 3), (1, 1), "same")
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((8, 16, 16, 32)), dtype=cp.float32)
    w = cp.asarray(rng.standard_normal((32, 3, 3, 32)), dtype=cp.float32)
    want = KernelsConv(g, StandardKernels(xc)).forward(x.astype(cp.float64),
                                                        w.astype(cp.float64), None, False)
    parts = []
    for flag in ("0", "1"):
        os.environ["XPCNN_TF32"] = flag
        engine = cudnn_conv.CudnnConv(g, cudnn, KernelsConv(g, StandardKernels(xc)))
        got = engine.forward(x, w, None, False)
        plan = next(iter(engine._plans.values()))
        name = "no plan (fallback ran)" if plan is None else _plan_name(plan)
        parts.append(f"XPCNN_TF32={flag}: error {_relative_error(got, want):.1e} [{name}]")
    os.environ.pop("XPCNN_TF32")
    return "; ".join(parts) + " (want < 1e-5 with 0, ~1e-3 with 1)"


def matmul_full_float32(cp: Any, xc: Any, cudnn: Any) -> str:
    from xpcnn.ops import cudnn_conv

    os.environ.pop("CUPY_TF32", None)
    rng = np.random.default_rng(0)
    a = cp.asarray(rng.standard_normal((512, 256)), dtype=cp.float32)
    b = cp.asarray(rng.standard_normal((256, 128)), dtype=cp.float32)
    matmul = cudnn_conv.CudnnMatmul(cudnn)
    got = matmul(a, b)
    plan = next(iter(matmul._plans.values()))
    want = a.astype(cp.float64) @ b.astype(cp.float64)
    name = "no plan: cuBLAS ran it, steps stay eager" if plan is None else _plan_name(plan)
    return f"error {_relative_error(got, want):.1e} [{name}] (want < 1e-5 and a plan)"


def matmul_epilogue(cp: Any, xc: Any, cudnn: Any) -> str:
    from xpcnn.ops import cudnn_conv

    os.environ.pop("CUPY_TF32", None)
    rng = np.random.default_rng(0)
    said = []
    for dtype, tol in ((cp.float32, 1e-5), (cp.float16, 2e-3)):
        a = cp.asarray(rng.standard_normal((512, 256)) / 16, dtype=dtype)
        b = cp.asarray(rng.standard_normal((256, 128)) / 16, dtype=dtype)
        bias = cp.asarray(rng.standard_normal(128) / 16, dtype=dtype)
        matmul = cudnn_conv.CudnnMatmul(cudnn)
        got = matmul.with_bias_relu(a, b, bias, True)
        if got is None:
            said.append(f"{cp.dtype(dtype).name}: no plan (the bias + ReLU kernel runs after)")
            continue
        want = cp.maximum(a.astype(cp.float64) @ b.astype(cp.float64) + bias, 0)
        plan = next(iter(matmul._plans.values()))
        said.append(f"{cp.dtype(dtype).name}: error {_relative_error(got, want):.1e} "
                    f"[{_plan_name(plan)}] (want < {tol:g})")
    return "; ".join(said)


def vecdot_in_capture(cp: Any, xc: Any, cudnn: Any) -> str:
    g = cp.ones(1000, cp.float32)
    xc.sum(g * g)  # (kernels compiled before the capture)
    stream = cp.cuda.Stream(non_blocking=True)
    answers = []
    for label, fn in (("vecdot", lambda: xc.vecdot(g, g)), ("sum", lambda: xc.sum(g * g))):
        with stream:
            stream.begin_capture()
            try:
                fn()
                answers.append(f"{label} captured")
            except Exception as e:
                answers.append(f"{label} refused ({(str(e).splitlines() or [''])[0][:80]})")
            finally:
                stream.end_capture()
    return "; ".join(answers) + " (want: vecdot refused, sum captured)"


def set_stream_in_capture(cp: Any, xc: Any, cudnn: Any) -> str:
    handle = cudnn.create_handle()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            cudnn.set_stream(handle=handle, stream=stream.ptr)
            cp.zeros(4, cp.float32).fill(1)
        finally:
            graph = stream.end_capture()
        graph.launch(stream=stream)
    stream.synchronize()
    return "set_stream inside a capture left it valid (xpcnn calls it before one anyway)"


def nccl_one_rank(cp: Any, xc: Any, cudnn: Any) -> str:
    from xpcnn.distributed import NcclSum, World

    here = World(comm=types.SimpleNamespace(bcast=lambda value, root: value))
    nccl_sum = NcclSum(here, cp.cuda.Device(0))
    parts = []
    for dtype in (cp.float16, cp.float32, cp.float64):
        buf = cp.arange(10, dtype=dtype)
        nccl_sum.wait([nccl_sum.start(buf)], "probe")
        ok = bool(cp.array_equal(buf, cp.arange(10, dtype=dtype)))
        parts.append(f"{np.dtype(dtype).name} {'ok' if ok else 'WRONG SUM'}")
    return f"NCCL {nccl_sum.nccl.get_version()}: " + ", ".join(parts)


def step_calls_in_capture(cp: Any, xc: Any, cudnn: Any) -> str:
    g = cp.ones(1000, cp.float32)
    g[7], g[9] = cp.nan, 5.0  # a NaN before a larger value: the max must still be NaN
    stats, labels = cp.asarray([0.5, 3.0], cp.float32), cp.asarray([1, 2, 9], cp.uint8)
    moving, flag = cp.arange(4, dtype=cp.float32), cp.zeros((), bool)

    def step() -> tuple[Any, Any, Any]:
        peaks = xc.stack([xc.max(xc.abs(g)), xc.max(xc.abs(stats))])
        before = xc.asarray(moving, copy=True)
        moving[...] = moving + 1  # (a forward pass moves the statistics)
        moving[...] = xc.where(flag, moving, before)
        ok = xc.all(xc.logical_and(labels >= 0, labels < 5))
        return peaks, xc.where(ok, stats, xc.nan), xc.isfinite(peaks)

    step()  # (kernels compiled before the capture)
    moving[...] = xc.arange(4, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            peaks, checked, finite = step()
        finally:
            graph = stream.end_capture()
        graph.launch(stream=stream)
    stream.synchronize()
    got = (peaks.get().tolist(), checked.get().tolist(), finite.get().tolist(),
           moving.get().tolist(), str(checked.dtype))
    want = ([float("nan"), 3.0], [float("nan")] * 2, [False, True], [0.0, 1.0, 2.0, 3.0],
            "float32")
    same = np.array_equal(np.asarray(got[0]), np.asarray(want[0]), equal_nan=True) and \
        np.isnan(got[1]).all() and got[2:] == want[2:]
    return f"captured and replayed: {got} ({'as wanted' if same else f'WRONG, want {want}'})"


def foreign_cuda_arrays(cp: Any, xc: Any, cudnn: Any) -> str:
    from xpcnn.backend import get_backend
    from xpcnn.data.arrays import adopt_foreign

    numpy_model = get_backend("cpu")
    a = cp.ones(3, cp.float32)
    try:
        np.from_dlpack(a)
        answer = "np.from_dlpack READ IT"
    except Exception as e:
        answer = f"{type(e).__name__}: {str(e)[:60]}"
    answer += " -> kept" if adopt_foreign(a, numpy_model) is a else " -> CONVERTED"
    return answer + " (want: BufferError, kept; PyTorch's CUDA tensors: tests/test_gpu.py)"


def plan_timing(cp: Any, xc: Any, cudnn: Any) -> str:
    import time

    from xpcnn.ops import cudnn_conv
    from xpcnn.ops.convolution import ConvGeometry, KernelsConv
    from xpcnn.ops.kernels import StandardKernels

    g = ConvGeometry.of((32, 32, 32), 32, (3, 3), (1, 1), "same")
    engine = cudnn_conv.CudnnConv(g, cudnn, KernelsConv(g, StandardKernels(xc)))
    n = 512
    start = time.perf_counter()
    plan = cudnn_conv.build_plan(cudnn, cp.float32, engine._fprop(n, True, True), True,
                                 deterministic=False, autotune=True)
    built = time.perf_counter() - start
    candidates = list(plan.candidates)
    first = plan.graph._plan_index
    rng = np.random.default_rng(0)
    arrays = {"x": cp.asarray(rng.standard_normal((n, 32, 32, 32)), cp.float32),
              "w": cp.asarray(rng.standard_normal((32, 3, 3, 32)) * 0.1, cp.float32),
              "bias": cp.zeros(32, cp.float32), "y": cp.empty((n, 32, 32, 32), cp.float32)}
    start = time.perf_counter()
    plan.run(**arrays)
    cp.cuda.Device().synchronize()
    tuned = time.perf_counter() - start
    kept = plan.graph._plan_index
    pack = {plan.tensors[k]: a.data.ptr for k, a in arrays.items()}
    workspace = cp.empty(max([size for _, size in candidates] or [plan.workspace]), cp.uint8)
    begin, end = cp.cuda.Event(), cp.cuda.Event()
    ms = {}
    for index in {first, kept}:
        begin.record()
        for _ in range(20):
            plan.graph.execute_plan_at_index(pack, workspace.data.ptr, index=index,
                                             handle=cudnn_conv._handle(cudnn))
        end.record()
        end.synchronize()
        ms[index] = cp.cuda.get_elapsed_time(begin, end) / 20
    names = {i: plan.graph.get_plan_name_at_index(i) for i in ms}
    return (f"{plan.graph.get_execution_plan_count()} plans listed, {len(candidates)} built in "
            f"{built:.2f} s, timed in {tuned:.2f} s; kept plan {kept} [{names[kept]}] "
            f"{ms[kept]:.3f} ms, heuristics' first {first} [{names[first]}] {ms[first]:.3f} ms "
            "(PyTorch channels-last TF32: 0.115 ms, ../shared/gpu-notes.md)")


def main() -> int:
    from xpcnn.backend import cuda_available

    if not cuda_available():
        print("gpu_probes: no CUDA GPU here; nothing probed")
        return 0
    import array_api_compat.cupy as xc
    import cupy as cp

    from xpcnn.ops import cudnn_conv

    cudnn = cudnn_conv.load()
    print(f"gpu_probes: CuPy {cp.__version__}, cuDNN frontend "
          f"{getattr(cudnn, '__version__', None)}, backend "
          f"{cudnn.backend_version() if cudnn is not None else None}")
    probes = [conv_tf32_switch, matmul_full_float32, vecdot_in_capture, set_stream_in_capture,
              nccl_one_rank, step_calls_in_capture, foreign_cuda_arrays, plan_timing,
              matmul_epilogue]
    for probe in probes:
        if cudnn is None and probe in (conv_tf32_switch, matmul_full_float32,
                                       set_stream_in_capture, plan_timing, matmul_epilogue):
            print(f"  {probe.__name__}: skipped (cuDNN's frontend does not load)")
            continue
        try:
            print(f"  {probe.__name__}: ok: {probe(cp, xc, cudnn)}", flush=True)
        except Exception as e:
            print(f"  {probe.__name__}: FAIL: {type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
