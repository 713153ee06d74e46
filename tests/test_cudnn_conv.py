"""xpcnn.ops.cudnn_conv on a machine without a GPU: its cuDNN graphs are built and run by the
stand-in frontend of tests/cudnn_emulator.py, which reads and writes memory where each tensor's
dims and strides say. So the descriptors (NHWC images, KRSC filters, padding, strides, the bias
and ReLU fused into the forward graph) are checked here by the numbers they give against the
standard engine, and the graph caching, the TF32 switch and the fallbacks by what was called.
tests/test_gpu.py runs the same engine against real cuDNN where a GPU is lent."""

import os
import threading
import time
import types

import array_api_compat.numpy as xpn
import numpy as np
import pytest
from cuda_emulator import needs_compiler, restore
from cudnn_emulator import (
    CURRENT_STREAM,
    GRAPHS,
    BehaviorNote,
    DataType,
    Device,
    FakePlan,
    FakeStream,
    Handle,
    NumericalNote,
    PyGraph,
    load_emulated_cudnn_conv,
)
from test_conv_seam import GEOMETRIES, IDS, conv_data

from xpcnn.ops.convolution import ConvGeometry, KernelsConv
from xpcnn.ops.kernels import StandardKernels


@pytest.fixture
def cc(monkeypatch):
    """The emulated xpcnn.ops.cudnn_conv, with a fresh record of graphs."""
    module, saved = load_emulated_cudnn_conv()
    GRAPHS.clear()
    monkeypatch.delenv("XPCNN_TF32", raising=False)
    monkeypatch.delenv("XPCNN_CUDNN", raising=False)
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.delenv("XPCNN_CUDNN_AUTOTUNE", raising=False)
    monkeypatch.delenv("XPCNN_DETERMINISTIC", raising=False)
    monkeypatch.setattr(PyGraph, "refuse", None)
    yield module
    restore(saved)


@pytest.fixture
def emulated_cupy(monkeypatch):
    """xpcnn.ops.fast_cupy on the CUDA emulator, with the stand-in cuDNN frontend loaded
    (every plan built, no graph yet); put back afterwards."""
    import sys

    from cuda_emulator import load_emulated_fast_cupy
    from cudnn_emulator import add_cupy_calls, fake_cudnn, import_cudnn_conv

    import xpcnn

    fast_cupy, saved = load_emulated_fast_cupy()
    try:
        add_cupy_calls(sys.modules["cupy"])
        monkeypatch.setitem(sys.modules, "cudnn", fake_cudnn())
        monkeypatch.setattr(PyGraph, "refuse", None)
        monkeypatch.delenv("XPCNN_CUDNN", raising=False)
        import_cudnn_conv()
        GRAPHS.clear()
        yield fast_cupy
    finally:
        sys.modules.pop("xpcnn.ops.cudnn_conv", None)
        xpcnn.ops.__dict__.pop("cudnn_conv", None)
        restore(saved)


def _engines(cc, case):
    shape, filters, kernel, strides, padding = case
    g = ConvGeometry.of(shape, filters, kernel, strides, padding)
    standard = KernelsConv(g, StandardKernels(xpn))
    return g, cc.CudnnConv(g, cc.load(), KernelsConv(g, StandardKernels(xpn))), standard


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cudnn_graphs_give_the_standard_engines_results(cc, case, dtype, rng):
    g, cudnn, standard = _engines(cc, case)
    x, w, bias, dy = conv_data(g, rng, 2, dtype)
    tol = 1e-11 if dtype == np.float64 else 2e-5
    for b in (bias, None):
        for relu in (False, True):
            got = cudnn.forward(x, w, b, relu)
            assert got.dtype == dtype and got.shape == (2, *g.out_hw, g.filters)
            np.testing.assert_allclose(got, standard.forward(x, w, b, relu), rtol=tol, atol=tol)
    got_dx = cudnn.input_grad(dy, w)
    np.testing.assert_allclose(got_dx, standard.input_grad(dy, w), rtol=tol, atol=tol)
    relu_y = np.maximum(standard.forward(x, w, bias, False), 0)
    for with_bias, mask in ((True, None), (False, relu_y)):
        got_dw, got_db = cudnn.weight_grad(x, dy, with_bias, mask)
        want_dw, want_db = standard.weight_grad(x, dy, with_bias, mask)
        assert got_dw.shape == (g.filters, *g.kernel, g.channels)
        np.testing.assert_allclose(got_dw, want_dw, rtol=tol, atol=tol * 10)
        if with_bias:
            np.testing.assert_allclose(got_db, want_db, rtol=tol, atol=tol * 10)
        else:
            assert got_db is None
    # the ReLU's and the bias's gradients in one pass, read by both graphs
    for input_grad in (True, False):
        got = cudnn.gradients(x, dy, w, True, input_grad, relu_y)
        want = standard.gradients(x, dy, w, True, input_grad, relu_y)
        assert (got[2] is None) == (want[2] is None) == (not input_grad)
        for a, b in zip(got[:2 + input_grad], want[:2 + input_grad], strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)
    assert all(graph.executions for graph in GRAPHS)  # cuDNN ran, not the fallback


def test_descriptors_are_nhwc_images_and_krsc_filters(cc, rng):
    """The layouts that ran on the H200 (../shared/gpu-notes.md): image dim [N, C, H, W] with
    strides [H*W*C, 1, W*C, C], filter dim [K, C, kh, kw] with strides [kh*kw*C, 1, kw*C, C],
    bias [1, K, 1, 1]; the bias and ReLU in the forward graph itself."""
    g, cudnn, _ = _engines(cc, ((10, 9, 3), 8, (3, 3), (2, 2), "same"))
    x, w, bias, dy = conv_data(g, rng, 4, np.float32)
    cudnn.forward(x, w, bias, True)
    (fprop,) = GRAPHS
    named = {t.name: t for t in fprop.tensors if not t.virtual}
    assert (named["x"].dim, named["x"].stride) == ([4, 3, 10, 9], [270, 1, 27, 3])
    assert (named["w"].dim, named["w"].stride) == ([8, 3, 3, 3], [27, 1, 9, 3])
    assert (named["bias"].dim, named["bias"].stride) == ([1, 8, 1, 1], [8, 1, 8, 8])
    (y,) = [t for t in fprop.tensors if t.output]
    assert (y.dim, y.stride) == ([4, 8, 5, 5], [200, 1, 40, 8])
    assert [op[0] for op in fprop.ops] == ["conv_fprop", "bias", "relu"]
    kind, attrs, _ = fprop.ops[0]
    # "same" at stride 2: (top, bottom) = (0, 1) over 10 rows, (left, right) = (1, 1) over 9
    assert (attrs["pre"], attrs["post"], attrs["stride"]) == ([0, 1], [1, 1], [2, 2])
    assert fprop.io == DataType.FLOAT and fprop.compute == DataType.FLOAT
    assert fprop.steps == list(PyGraph.STEPS)
    cudnn.input_grad(dy, w)
    cudnn.weight_grad(x, dy, True)
    dgrad, wgrad = GRAPHS[1:]
    assert [op[0] for op in dgrad.ops] == ["conv_dgrad"]
    (dx,) = [t for t in dgrad.tensors if t.output]
    assert (dx.dim, dx.stride) == ([4, 3, 10, 9], [270, 1, 27, 3])
    (dw,) = [t for t in wgrad.tensors if t.output]
    assert (dw.dim, dw.stride) == ([8, 3, 3, 3], [27, 1, 9, 3])


def test_graphs_are_built_once_per_batch_size_dtype_and_epilogue(cc, rng):
    g, cudnn, _ = _engines(cc, GEOMETRIES[0])
    x, w, bias, dy = conv_data(g, rng, 3, np.float32)
    for _ in range(3):
        cudnn.forward(x, w, bias, True)
        cudnn.input_grad(dy, w)
        cudnn.weight_grad(x, dy, True)
    assert len(GRAPHS) == 3 and all(graph.executions == 3 for graph in GRAPHS)
    cudnn.forward(x[:2], w, bias, True)  # a tail batch
    cudnn.forward(x, w, None, True)  # another epilogue
    cudnn.forward(*(a.astype(np.float64) for a in (x, w, bias)), True)  # another dtype
    assert len(GRAPHS) == 6
    assert GRAPHS[-1].io == DataType.DOUBLE and GRAPHS[-1].compute == DataType.DOUBLE


def test_half_precision_graphs_accumulate_in_float32(cc, rng):
    g, cudnn, standard = _engines(cc, GEOMETRIES[0])
    x, w, bias, _ = conv_data(g, rng, 2, np.float16)
    got = cudnn.forward(x, w, bias, True)
    assert got.dtype == np.float16
    assert GRAPHS[0].io == DataType.HALF and GRAPHS[0].compute == DataType.FLOAT
    assert GRAPHS[0].intermediate == DataType.FLOAT
    want = standard.forward(*(a.astype(np.float64) for a in (x, w, bias)), True)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("setting, dtype, excluded", [
    # TF32 by default, as PyTorch's convolutions; never float16 products inside float32
    (None, np.float32, [NumericalNote.DOWN_CONVERT_INPUTS]),
    ("1", np.float32, [NumericalNote.DOWN_CONVERT_INPUTS]),
    ("0", np.float32, [NumericalNote.DOWN_CONVERT_INPUTS, NumericalNote.TENSOR_CORE]),
    ("0", np.float16, []),  # float16 is meant for the tensor cores
    ("0", np.float64, []),
])
def test_tf32_switch(cc, monkeypatch, rng, setting, dtype, excluded):
    if setting is not None:
        monkeypatch.setenv("XPCNN_TF32", setting)
    g, cudnn, _ = _engines(cc, GEOMETRIES[0])
    x, w, bias, dy = conv_data(g, rng, 2, dtype)
    cudnn.forward(x, w, bias, False)
    cudnn.weight_grad(x, dy, False)
    assert [graph.deselected for graph in GRAPHS] == [excluded, excluded]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_determinism_switch_excludes_nondeterministic_plans(cc, monkeypatch, rng, dtype):
    """XPCNN_DETERMINISTIC=1: no plan with the NONDETERMINISTIC note, for every graph (the
    convolutions' and the matmuls'), in every dtype; off (the default, as in PyTorch): the
    notes of the TF32 switch alone."""
    for setting in ("1", "0"):
        monkeypatch.setenv("XPCNN_DETERMINISTIC", setting)
        GRAPHS.clear()
        cc.clear_plans()
        g, cudnn, _ = _engines(cc, GEOMETRIES[0])
        x, w, bias, dy = conv_data(g, rng, 2, dtype)
        cudnn.forward(x, w, bias, True)
        cudnn.weight_grad(x, dy, True)
        rows = x.reshape(-1, g.channels)
        cc.CudnnMatmul(cc.load())(rows, rows, transpose_a=True)
        flagged = [NumericalNote.NONDETERMINISTIC in graph.deselected for graph in GRAPHS]
        assert flagged == [setting == "1"] * 3


def test_the_switches_set_later_reach_the_graphs_already_built(cc, monkeypatch, rng):
    """XPCNN_DETERMINISTIC, XPCNN_TF32 and CUPY_TF32 changed after a first use: the plans that
    a layer's engine and the process cache, and the one matmul engine (CupyKernels keeps it
    for the process), are built again for the new setting, not reused; the others stay
    cached."""
    # what each switch rebuilds: [convolution, matmul]
    for variable, rebuilt in (("XPCNN_DETERMINISTIC", [True, True]),
                              ("XPCNN_TF32", [True, False]), ("CUPY_TF32", [False, True])):
        cc.clear_plans()
        g, cudnn, _ = _engines(cc, GEOMETRIES[0])
        x, w, bias, dy = conv_data(g, rng, 2, np.float32)
        matmul = cc.CudnnMatmul(cc.load())
        rows = x.reshape(-1, g.channels)
        for setting in ("0", "1"):
            monkeypatch.setenv(variable, setting)
            GRAPHS.clear()
            cudnn.forward(x, w, bias, True)
            conv_graphs = len(GRAPHS)
            matmul(rows, rows, transpose_a=True)
            built = [conv_graphs == 1, len(GRAPHS) - conv_graphs == 1]
            assert built == ([True, True] if setting == "0" else rebuilt), variable
        assert all(NumericalNote.NONDETERMINISTIC in graph.deselected for graph in GRAPHS) \
            == (variable == "XPCNN_DETERMINISTIC")
        monkeypatch.delenv(variable)


@pytest.mark.parametrize("variable, setting", [
    ("XPCNN_TF32", "0"), ("XPCNN_DETERMINISTIC", "1"), ("XPCNN_CUDNN_AUTOTUNE", "0")])
def test_one_layer_follows_a_switch_changed_between_two_runs_and_back(cc, monkeypatch, rng,
                                                                      variable, setting):
    """The switches are read at every run (all at once: cudnn_conv.switches), so the same
    layer, a switch changed between two of its runs, runs a plan built under the new setting,
    never the one built before it; the switch set back, the first plan runs again, not built
    again."""
    import unittest.mock

    with unittest.mock.patch.object(PyGraph, "PLANS", (FakePlan(ms=2.0), FakePlan(ms=1.0))):
        g, cudnn, standard = _engines(cc, GEOMETRIES[0])
        x, w, bias, _ = conv_data(g, rng, 2, np.float32)
        want = standard.forward(x, w, bias, True)
        for step in ("first", "changed", "back"):
            if step == "changed":
                monkeypatch.setenv(variable, setting)
            elif step == "back":
                monkeypatch.delenv(variable)
            np.testing.assert_allclose(cudnn.forward(x, w, bias, True), want, rtol=2e-5,
                                       atol=2e-5)
    first, changed = GRAPHS
    assert (first.executions, changed.executions) == (2, 1)
    excluded = {"XPCNN_TF32": NumericalNote.TENSOR_CORE,
                "XPCNN_DETERMINISTIC": NumericalNote.NONDETERMINISTIC}.get(variable)
    assert excluded is None or (excluded in changed.deselected
                                and excluded not in first.deselected)
    assert first.timed and bool(changed.timed) == (variable == "XPCNN_TF32")  # (autotuning)


@pytest.mark.parametrize("variable, values", [
    ("XPCNN_DETERMINISTIC", ("1", "0")), ("XPCNN_TF32", ("0", "1")),
    ("XPCNN_CUDNN_AUTOTUNE", ("0", "1")), ("CUPY_TF32", ("1", "0"))])
def test_a_plan_is_built_under_the_switches_it_is_kept_under(cc, monkeypatch, rng, variable,
                                                            values):
    """The switches read at a run key the plan and are the ones it is built under: the
    environment changed while a graph builds (here as each build starts, after the run read
    it) leaves no plan of one setting in the cache under another's key."""
    import unittest.mock

    monkeypatch.setenv(variable, values[0])
    shared_plan = cc.shared_plan

    def flipping(key, build):
        def flipped_then_built():
            monkeypatch.setenv(variable, values[os.environ[variable] == values[0]])
            return build()

        return shared_plan(key, flipped_then_built)

    monkeypatch.setattr(cc, "shared_plan", flipping)
    with unittest.mock.patch.object(PyGraph, "PLANS", (FakePlan(ms=2.0), FakePlan(ms=1.0))):
        g, cudnn, standard = _engines(cc, GEOMETRIES[0])
        x, w, bias, _ = conv_data(g, rng, 2, np.float32)
        np.testing.assert_allclose(cudnn.forward(x, w, bias, True),
                                   standard.forward(x, w, bias, True), rtol=2e-5, atol=2e-5)
        rows = x.reshape(-1, g.channels)
        np.testing.assert_allclose(cc.CudnnMatmul(cc.load())(rows, rows, transpose_a=True),
                                   rows.T @ rows, rtol=2e-5, atol=2e-5)
    assert [key[0] for key in cc._PLANS] == ["convolution", "matmul"] and len(GRAPHS) == 2
    for key, plan in cc._PLANS.items():
        tf32, deterministic, autotune = key[-1]  # (each key ends with its switches)
        notes = plan.graph.deselected
        assert (NumericalNote.TENSOR_CORE not in notes) == tf32, key
        assert (NumericalNote.NONDETERMINISTIC in notes) == deterministic, key
        assert bool(plan.graph.timed) == autotune, key


def test_operands_reach_a_graph_as_themselves_or_as_a_contiguous_copy(cc, monkeypatch, rng):
    """A C-contiguous, aligned operand is given to the graph as it is (its own address, no
    copy); a strided view as a C-contiguous copy of its values."""
    given = []
    execute = PyGraph.execute

    def recorded(graph, tensor_dict, workspace=None, handle=None):
        given.append(sorted(tensor_dict.values()))
        return execute(graph, tensor_dict, workspace, handle)

    monkeypatch.setattr(PyGraph, "execute", recorded)
    matmul = cc.CudnnMatmul(cc.load())
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7))
    strided = np.empty((7, 8))[:, ::2]  # (a view with b.T's values, not C-contiguous)
    strided[...] = b.T
    c = matmul(a, b, transpose_b=True)
    assert {a.ctypes.data, b.ctypes.data} <= set(given[0])
    np.testing.assert_array_equal(matmul(a, strided), c)
    assert strided.ctypes.data not in given[1] and a.ctypes.data in given[1]


def _misaligned(a):
    """A copy of ``a`` in a view that starts one element (2 bytes in float16) past a 16-byte
    boundary, as a weight in a mixed-precision forward pass's one buffer of cast weights may."""
    buf = np.empty(a.size + 16, a.dtype)
    skip = (-buf.ctypes.data % 16) // a.itemsize + 1
    view = buf[skip:skip + a.size].reshape(a.shape)
    view[...] = a
    assert view.ctypes.data % 16 and view.flags.c_contiguous
    return view


def test_every_graph_gets_16_byte_aligned_addresses(cc, monkeypatch, rng):
    """The frontend declares each tensor 16-byte aligned (its Tensor_attributes'
    default_alignment) and cuDNN picks engines by it: a contiguous view that starts elsewhere
    (CupyKernels.cast_all's float16 weights are views into one buffer) reaches a graph as an
    aligned copy, with the same results."""
    given = []
    execute = PyGraph.execute

    def recorded(graph, tensor_dict, workspace=None, handle=None):
        given.extend(tensor_dict.values())
        return execute(graph, tensor_dict, workspace, handle)

    monkeypatch.setattr(PyGraph, "execute", recorded)
    g, cudnn, standard = _engines(cc, GEOMETRIES[0])
    x, w, bias, dy = (a.astype(np.float16) for a in conv_data(g, rng, 2, np.float64))
    odd = [_misaligned(a) for a in (x, w, bias, dy)]
    np.testing.assert_array_equal(cudnn.forward(*odd[:3], True), cudnn.forward(x, w, bias, True))
    np.testing.assert_array_equal(cudnn.input_grad(odd[3], odd[1]), cudnn.input_grad(dy, w))
    for got, want in zip(cudnn.weight_grad(odd[0], odd[3], True),
                         cudnn.weight_grad(x, dy, True), strict=True):
        np.testing.assert_array_equal(got, want)
    a, b = x.reshape(-1, g.channels), w.reshape(g.filters, -1)[:, :g.channels]
    matmul = cc.CudnnMatmul(cc.load())
    np.testing.assert_array_equal(matmul(_misaligned(a), _misaligned(b), transpose_b=True),
                                  matmul(a, np.ascontiguousarray(b), transpose_b=True))
    assert len(given) == 2 * (4 + 3 + 3 + 3) and all(p % cc.ALIGNMENT == 0 for p in given)


def test_a_case_without_a_cudnn_plan_runs_on_the_fallback_with_one_warning(cc, monkeypatch,
                                                                           rng):
    monkeypatch.setattr(PyGraph, "refuse", lambda graph: graph.ops[0][0] == "conv_dgrad")
    g, cudnn, standard = _engines(cc, GEOMETRIES[2])
    x, w, bias, dy = conv_data(g, rng, 2, np.float64)
    with pytest.warns(RuntimeWarning, match=r"no plan for input gradient .* \(No valid engine "
                      r"configs for this graph\); xpcnn's own CUDA kernels run it") as record:
        got = cudnn.input_grad(dy, w)
        cudnn.input_grad(dy, w)
    assert len(record) == 1
    np.testing.assert_allclose(got, standard.input_grad(dy, w), rtol=1e-12)
    np.testing.assert_allclose(cudnn.forward(x, w, bias, True),
                               standard.forward(x, w, bias, True), rtol=1e-12)
    assert [graph.executions for graph in GRAPHS] == [0, 1]  # dgrad refused, fprop ran


def test_cudnn_that_does_not_load_warns_once(cc, monkeypatch):
    import sys

    def missing():
        raise RuntimeError("Unable to find symbol cudnnGetVersion\ndetails")

    monkeypatch.setattr(sys.modules["cudnn"], "backend_version", missing)
    cc.load.cache_clear()
    cc._WARNED.clear()
    with pytest.warns(RuntimeWarning, match=r"^xpcnn: cuDNN could not be loaded \(Unable to "
                      r"find symbol cudnnGetVersion\); convolutions run on xpcnn's own CUDA "
                      "kernels") as record:
        assert cc.load() is None
    assert record[0].filename == __file__  # (the caller's line)
    assert cc.load() is None  # cached: no second warning (pytest would fail on it below)
    cc.load.cache_clear()
    monkeypatch.setenv("XPCNN_CUDNN", "0")
    assert cc.load() is None


def test_matmul_graphs_follow_cupys_tf32_switch_not_the_convolutions(cc, monkeypatch, rng):
    """A captured step's matmuls compute as an eager step's cuBLAS ones: full float32 unless
    CUPY_TF32=1, whatever XPCNN_TF32 says for the convolutions."""
    a, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((7, 4))
    notes = []
    for cupy_tf32 in ("0", "1"):
        monkeypatch.setenv("CUPY_TF32", cupy_tf32)
        monkeypatch.setenv("XPCNN_TF32", "1")
        cc.CudnnMatmul(cc.load())(a, b.astype(np.float32))
        notes.append(GRAPHS[-1].deselected)
    assert notes == [[NumericalNote.DOWN_CONVERT_INPUTS, NumericalNote.TENSOR_CORE],
                     [NumericalNote.DOWN_CONVERT_INPUTS]]


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_matmul_graphs(cc, rng, transpose_a, transpose_b):
    """The matmuls a captured CUDA graph uses in place of cuBLAS: a transposed operand is read
    through swapped strides."""
    matmul = cc.CudnnMatmul(cc.load())
    a = rng.standard_normal((7, 5) if transpose_a else (5, 7))
    b = rng.standard_normal((4, 7) if transpose_b else (7, 4))
    got = matmul(a, b, transpose_a, transpose_b)
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    matmul(a, b, transpose_a, transpose_b)
    assert len(GRAPHS) == 1 and GRAPHS[0].executions == 2


def test_a_matmul_without_a_cudnn_plan_runs_on_cublas_with_one_warning(cc, monkeypatch, rng):
    """Eagerly the same product; a CUDA-graph capture of it then fails, and the step stays
    eager with that reason (CuPy refuses cuBLAS in a capture), rather than training failing."""
    monkeypatch.setattr(PyGraph, "refuse", lambda graph: graph.ops[0][0] == "matmul")
    matmul = cc.CudnnMatmul(cc.load())
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7))
    with pytest.warns(RuntimeWarning, match=r"cuDNN has no plan for the matrix product \(5, 7\) "
                      r"@ \(7, 4\) in float64 \(No valid engine configs for this graph\); "
                      "cuBLAS runs it, which a CUDA graph cannot capture") as record:
        got = [matmul(a, b, transpose_b=True) for _ in range(2)]
    assert len(record) == 1 and len(GRAPHS) == 1  # one try at a plan, one warning
    for c in got:
        np.testing.assert_allclose(c, a @ b.T, rtol=1e-12)


def test_matmul_graphs_are_built_per_device(cc, monkeypatch, rng):
    """A plan is built with its device's handle: the same product on another GPU gets its own,
    and each device's handle is created on that device, whichever is current when it is first
    asked for."""
    cudnn = cc.load()
    matmul = cc.CudnnMatmul(cudnn)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 4))
    matmul(a, b)
    monkeypatch.setattr(Device, "current", 1)
    np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-12)
    assert [graph.executions for graph in GRAPHS] == [1, 1]
    monkeypatch.setattr(Device, "current", 0)
    cc._handle(cudnn, 2)  # (as a plan of device 2 asks, run where device 0 is current)
    assert {k: handle.device for k, (handle, _) in cc._THREAD.handles.items()} == {
        0: 0, 1: 1, 2: 2}
    assert Device.current == 0


def test_the_handle_is_put_on_a_stream_only_when_the_stream_changes(cc, monkeypatch, rng):
    """cudnnSetStream once per change of CuPy's current stream, not once per graph run: a
    capture finds the handle on its stream already (use_current_stream, before it begins)."""
    g, cudnn, _ = _engines(cc, GEOMETRIES[0])
    x, w, bias, dy = conv_data(g, rng, 2, np.float64)
    matmul = cc.CudnnMatmul(cc.load())
    for _ in range(2):
        cudnn.forward(x, w, bias, True)
        cudnn.input_grad(dy, w)
        matmul(dy.reshape(-1, g.filters), dy.reshape(-1, g.filters), transpose_a=True)
    ((handle, _),) = cc._THREAD.handles.values()
    assert handle.streams_set == [CURRENT_STREAM.ptr]
    first = CURRENT_STREAM.ptr
    monkeypatch.setattr(CURRENT_STREAM, "ptr", first + 16)
    cc.use_current_stream()
    assert handle.streams_set == [first, first + 16]
    cudnn.forward(x, w, bias, True)  # (the emulator checks that it ran on the current stream)
    cudnn.weight_grad(x, dy, True)
    monkeypatch.setattr(CURRENT_STREAM, "ptr", first)
    cudnn.input_grad(dy, w)
    assert handle.streams_set == [first, first + 16, first]
    assert all(graph.executions for graph in GRAPHS)


@needs_compiler
def test_the_cupy_kernels_choose_cudnn_per_layer_where_it_loads(monkeypatch):
    """CupyKernels.conv_engine: cuDNN with the hand-written kernels behind it; those kernels
    alone, after one warning, where cuDNN does not load."""
    import sys

    from cuda_emulator import load_emulated_fast_cupy
    from cudnn_emulator import fake_cudnn

    import xpcnn

    fast_cupy, saved = load_emulated_fast_cupy()
    try:
        monkeypatch.delitem(sys.modules, "xpcnn.ops.cudnn_conv", raising=False)
        monkeypatch.delattr(xpcnn.ops, "cudnn_conv", raising=False)
        monkeypatch.setitem(sys.modules, "cudnn", fake_cudnn())
        monkeypatch.delenv("XPCNN_CUDNN", raising=False)
        backend = xpcnn.backend.Backend(xpn, "cpu", "cupy")  # CuPy's chunking, NumPy arrays
        g = ConvGeometry.of((8, 8, 3), 4, (3, 3), (1, 1), "same")
        engine = fast_cupy.KERNELS.conv_engine(g, backend)
        assert engine.name == "cudnn" and engine.geometry is g
        assert isinstance(engine.fallback, fast_cupy.cuda_conv.HandWrittenConv)
        assert engine.fallback.kern is fast_cupy.KERNELS
        sys.modules["xpcnn.ops.cudnn_conv"].load.cache_clear()
        monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn raises ImportError
        with pytest.warns(RuntimeWarning, match="cuDNN could not be loaded"):
            engine = fast_cupy.KERNELS.conv_engine(g, backend)
        assert isinstance(engine, fast_cupy.cuda_conv.HandWrittenConv)
        assert engine.kern is fast_cupy.KERNELS
    finally:
        sys.modules.pop("xpcnn.ops.cudnn_conv", None)
        xpcnn.ops.__dict__.pop("cudnn_conv", None)
        restore(saved)


def test_a_products_bias_and_relu_are_its_graphs_epilogue(cc, rng):
    """CudnnMatmul.with_bias_relu: a @ b + bias, then ReLU, in one graph (one execution, no
    kernel of their own), for a bias alone, a ReLU alone and both; each graph built once."""
    matmul = cc.CudnnMatmul(cc.load())
    a, b, bias = rng.standard_normal((5, 7)), rng.standard_normal((7, 4)), rng.standard_normal(4)
    cases = [(True, False), (False, True), (True, True)]
    for _ in range(2):
        for with_bias, relu in cases:
            got = matmul.with_bias_relu(a, b, bias if with_bias else None, relu)
            want = a @ b + (bias if with_bias else 0.0)
            np.testing.assert_allclose(got, np.maximum(want, 0.0) if relu else want,
                                       rtol=1e-12, atol=1e-12)
    assert [[op[0] for op in graph.ops] for graph in GRAPHS] == [
        ["matmul", "bias"], ["matmul", "relu"], ["matmul", "bias", "relu"]]
    assert [graph.executions for graph in GRAPHS] == [2, 2, 2]


def test_a_product_whose_epilogue_cudnn_refuses_adds_them_after(emulated_cupy, monkeypatch,
                                                                 rng):
    """Where cuDNN has no plan for the product with its bias and ReLU, a one-line warning,
    then the plain product's graph and the bias and ReLU after it, as outside a capture."""
    kernels = emulated_cupy.KERNELS
    monkeypatch.setattr(PyGraph, "refuse", lambda graph: len(graph.ops) > 1)
    a, b, bias = rng.standard_normal((5, 7)), rng.standard_normal((7, 4)), rng.standard_normal(4)
    with pytest.warns(RuntimeWarning, match=r"cuDNN has no plan for the matrix product \(5, "
                      r"7\) @ \(7, 4\) in float64 with its bias \+ ReLU in the same graph "
                      r"\(.+\); they run after it") as record, kernels.capturable():
        got = [kernels.matmul_bias_relu(a, b, bias, True) for _ in range(2)]
    assert len(record) == 1
    for y in got:
        np.testing.assert_allclose(y, np.maximum(a @ b + bias, 0.0), rtol=1e-12)
    assert [graph.executions for graph in GRAPHS] == [0, 2]  # (the refused, the plain one)


def test_a_dense_layer_under_capture_runs_one_graph_forward(emulated_cupy, rng):
    """Inside capturable(), a Dense layer's forward (bias and ReLU) is one cuDNN graph and no
    kernel besides; outside it, cuBLAS's product and the bias + ReLU kernel, as before."""
    kernels = emulated_cupy.KERNELS
    a, b, bias = rng.standard_normal((6, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    want = np.maximum(a @ b + bias, 0.0)
    with kernels.capturable():
        np.testing.assert_allclose(kernels.matmul_bias_relu(a, b, bias, True), want,
                                   rtol=1e-12)
    ((graph,),) = [GRAPHS]
    assert [op[0] for op in graph.ops] == ["matmul", "bias", "relu"] and graph.executions == 1
    np.testing.assert_allclose(kernels.matmul_bias_relu(a, b, bias, True), want, rtol=1e-12)
    assert graph.executions == 1 and len(GRAPHS) == 1


def test_the_cupy_kernels_keep_their_matmul_graphs_across_captures(emulated_cupy, rng):
    """CupyKernels.capturable: inside, matrix products are cuDNN graphs (built once, on the
    first warm-up step, and kept while a captured graph replays them); outside, not."""
    kernels = emulated_cupy.KERNELS
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 3))
    for _ in range(3):  # two warm-up steps and a capture
        with kernels.capturable():
            np.testing.assert_allclose(kernels.matmul(a, b), a @ b, rtol=1e-12)
            np.testing.assert_allclose(kernels.matmul_tn(a, a), a.T @ a, rtol=1e-12)
    assert [graph.executions for graph in GRAPHS] == [3, 3]
    np.testing.assert_allclose(kernels.matmul(a, b), a @ b, rtol=1e-12)  # CuPy's own
    assert [graph.executions for graph in GRAPHS] == [3, 3]


def test_the_real_frontend_takes_these_graph_descriptions(monkeypatch):
    """The graphs described with NVIDIA's own frontend (nvidia-cudnn-frontend, in the test
    extra; its Python graph is built on a machine without a GPU, up to validate): the calls,
    argument names and resulting dims and strides are the ones the stand-in checks."""
    import sys

    from cudnn_emulator import add_cupy_calls, import_cudnn_conv

    cudnn = pytest.importorskip("cudnn")
    monkeypatch.setitem(sys.modules, "cupy", add_cupy_calls(types.ModuleType("cupy")))
    monkeypatch.delitem(sys.modules, "xpcnn.ops.cudnn_conv", raising=False)
    cc = import_cudnn_conv()
    monkeypatch.delitem(sys.modules, "xpcnn.ops.cudnn_conv")
    g = ConvGeometry.of((10, 9, 3), 8, (5, 3), (2, 1), "same")  # pads (1, 2, 1, 1)
    engine = cc.CudnnConv(g, cudnn, KernelsConv(g, StandardKernels(xpn)))
    image, kernel = ([4, 3, 10, 9], [270, 1, 27, 3]), ([8, 3, 5, 3], [45, 1, 9, 3])
    output = ([4, 8, 5, 9], [360, 1, 72, 8])
    cases = [(engine._fprop(4, True, True), {"x": image, "w": kernel, "y": output,
                                             "bias": ([1, 8, 1, 1], [8, 1, 8, 8])}, 3),
             (engine._dgrad(4), {"dy": output, "w": kernel, "dx": image}, 1),
             (engine._wgrad(4), {"x": image, "dy": output, "dw": kernel}, 1),
             (cc.CudnnMatmul._make(5, 7, 4, True, False),
              {"a": ([1, 5, 7], [35, 1, 5]), "b": ([1, 7, 4], [28, 4, 1]),
               "c": ([1, 5, 4], [20, 4, 1])}, 1),
             (cc.CudnnMatmul._make(5, 7, 4, False, False, True, True),
              {"a": ([1, 5, 7], [35, 7, 1]), "b": ([1, 7, 4], [28, 4, 1]),
               "bias": ([1, 1, 4], [4, 4, 1]), "c": ([1, 5, 4], [20, 4, 1])}, 3)]
    for make, want, nodes in cases:
        io = cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=io, compute_data_type=io)
        tensors = make(graph, io)
        assert {k: (t.get_dim(), t.get_stride()) for k, t in tensors.items()} == want
        assert len(graph.nodes) == nodes


def test_the_real_frontend_has_the_build_and_run_calls_as_xpcnn_makes_them():
    """What the graph test above cannot reach without cuDNN's library: the build steps, the
    plan filter, execute, the handle calls and the enums, bound with the arguments
    xpcnn.ops.cudnn_conv passes (build_plan, CudnnPlan.run, _handle)."""
    import inspect

    cudnn = pytest.importorskip("cudnn")
    graph = cudnn.pygraph
    for step in ("validate", "build_operation_graph", "check_support", "build_plans",
                 "get_workspace_size"):
        inspect.signature(getattr(graph, step)).bind(None)
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
    inspect.signature(graph.create_execution_plans).bind(None, modes)
    notes = [cudnn.numerical_note.DOWN_CONVERT_INPUTS, cudnn.numerical_note.TENSOR_CORE]
    inspect.signature(graph.deselect_numeric_notes).bind(None, notes)
    inspect.signature(graph.execute).bind(None, {}, 0, handle=None)
    # (the autotuning: CudnnPlan._choose and _build_candidates)
    inspect.signature(graph.get_execution_plan_count).bind(None)
    for at_index in (graph.build_plan_at_index, graph.get_workspace_size_plan_at_index,
                     graph.get_behavior_notes_for_plan_at_index):
        inspect.signature(at_index).bind(None, 0)
    inspect.signature(graph.execute_plan_at_index).bind(None, {}, 0, index=0, handle=None)
    inspect.signature(cudnn.set_stream).bind(handle=None, stream=0)
    inspect.signature(cudnn.create_handle).bind()
    assert {"HALF", "BFLOAT16", "FLOAT", "DOUBLE"} <= set(cudnn.data_type.__members__)
    assert "RUNTIME_COMPILATION" in cudnn.behavior_note.__members__
    # A plan the note filter excludes, by index: refused with an exception, which
    # _build_candidates passes over as it does a plan cuDNN cannot build.
    source = inspect.getsource(graph.build_plan_at_index)
    assert "_reject_if_barred(index)" in source
    with pytest.raises(TypeError, match="cudnn.Handle"):  # (what the stand-in refuses too)
        cudnn.set_stream(handle=object(), stream=0)


def _tuned_forward(cc, rng, plans, dtype=np.float32, runs=2):
    """A forward graph of GEOMETRIES[0] built over ``plans`` and run ``runs`` times: the graph,
    and whether each run gave the standard engine's result."""
    import unittest.mock

    cc.clear_plans()  # (a cuDNN with other plans than the last call's)
    with unittest.mock.patch.object(PyGraph, "PLANS", tuple(plans)):
        g, cudnn, standard = _engines(cc, GEOMETRIES[0])
        x, w, bias, _ = conv_data(g, rng, 2, dtype)
        want = standard.forward(x, w, bias, True)
        tol = 2e-5 if dtype == np.float32 else 1e-12
        right = [np.allclose(cudnn.forward(x, w, bias, True), want, rtol=tol, atol=tol)
                 for _ in range(runs)]
    (graph,) = GRAPHS
    return graph, right


def test_autotuning_times_the_plans_once_and_keeps_the_fastest(cc, rng):
    """As PyTorch's cudnn.benchmark: on the first call every plan that builds runs once
    untimed and TUNE_RUNS times timed, on that call's own arrays; the fastest is selected and
    runs that call and every later one, untimed."""
    plans = [FakePlan(ms=3.0), FakePlan(ms=1.0), FakePlan(ms=2.0)]
    graph, right = _tuned_forward(cc, rng, plans, runs=3)
    per_plan = 1 + cc.TUNE_RUNS
    assert graph.timed == [0] * per_plan + [1] * per_plan + [2] * per_plan
    assert graph.selected == 1 and graph.executions == 3 and all(right)


def test_autotuning_keeps_the_smallest_workspace_among_plans_as_fast(cc, rng):
    """Within TUNE_TOLERANCE of the fastest is as fast: the smallest workspace wins; a plan
    needing more than TUNE_WORKSPACE is passed over, unless every plan does."""
    near = cc.TUNE_TOLERANCE - 0.01
    big = cc.TUNE_WORKSPACE + 1
    graph, _ = _tuned_forward(cc, rng, [FakePlan(ms=1.0, workspace=4096),
                                        FakePlan(ms=near, workspace=512),
                                        FakePlan(ms=near, workspace=1024)])
    assert graph.selected == 1
    GRAPHS.clear()
    graph, right = _tuned_forward(cc, rng, [FakePlan(ms=2.0), FakePlan(ms=0.5, workspace=big),
                                            FakePlan(ms=1.0, workspace=1 << 20)])
    assert graph.selected == 2 and 1 not in graph.timed and all(right)
    GRAPHS.clear()
    graph, _ = _tuned_forward(cc, rng, [FakePlan(ms=2.0, workspace=big),
                                        FakePlan(ms=1.0, workspace=big + 1)])
    assert graph.selected == 1


def test_autotuning_passes_over_plans_that_are_filtered_fail_to_build_or_fail_to_run(
        cc, monkeypatch, rng):
    """Only plans the note filter leaves (here TF32 is off: no TENSOR_CORE plan), that build
    and that run are candidates; at most TUNE_LIMIT of them, in the heuristics' order."""
    monkeypatch.setenv("XPCNN_TF32", "0")
    tf32 = (NumericalNote.TENSOR_CORE,)
    plans = [FakePlan(ms=0.1, notes=tf32), FakePlan(ms=0.2, builds=False),
             FakePlan(ms=0.3, runs=False), FakePlan(ms=2.0), FakePlan(ms=1.0)]
    graph, right = _tuned_forward(cc, rng, plans)
    assert graph.built == {2, 3, 4} and set(graph.timed) == {3, 4}  # (2 failed to run)
    assert graph.selected == 4 and all(right)
    GRAPHS.clear()
    many = [FakePlan(ms=10.0 / (1 + i)) for i in range(cc.TUNE_LIMIT + 3)]
    graph, right = _tuned_forward(cc, rng, many)
    assert set(graph.timed) == set(range(cc.TUNE_LIMIT))
    assert graph.selected == cc.TUNE_LIMIT - 1 and all(right)


def test_the_plans_are_timed_with_one_workspace_from_cupys_default_pool(cc, monkeypatch,
                                                                       rng):
    """One workspace, as large as the largest candidate's, allocated with CuPy's default pool
    (a CUDA graph's warm-up runs under a pool of the graph's own, which would keep it for the
    graph's life); where it cannot be had, no timing: the heuristics' first plan runs."""
    import sys

    cupy = sys.modules["cupy"]
    allocations = []

    def empty(shape, dtype):
        allocations.append((shape, cupy.cuda.allocators[-1] if cupy.cuda.allocators else None))
        return np.empty(shape, dtype)

    monkeypatch.setattr(cupy, "empty", empty)
    plans = [FakePlan(ms=2.0, workspace=300), FakePlan(ms=1.0, workspace=700),
             FakePlan(ms=3.0, workspace=cc.TUNE_WORKSPACE + 1)]
    graph, right = _tuned_forward(cc, rng, plans, runs=1)
    default = cupy.get_default_memory_pool().malloc
    # (the plan over TUNE_WORKSPACE is no candidate; the run after the timing has its own)
    assert [a for a in allocations if a[1] is default] == [(700, default)]
    assert graph.selected == 1 and all(right)

    def no_memory(shape, dtype):
        if shape == 700:
            raise cupy.cuda.memory.OutOfMemoryError("out of memory allocating 700 bytes")
        return np.empty(shape, dtype)

    monkeypatch.setattr(cupy, "empty", no_memory)
    GRAPHS.clear()
    graph, right = _tuned_forward(cc, rng, plans)
    assert graph.timed == [] and graph.selected == 0 and all(right)


@pytest.mark.parametrize("size", [0, 300])
def test_a_run_asks_cupy_for_a_workspace_only_where_its_plan_needs_one(cc, monkeypatch, rng,
                                                                       size):
    """CudnnPlan.run: a plan needing no workspace gets address 0, with no call into CuPy's pool (as
    the frontend's own default, None, gives); one needing some gets a block of at least its
    size, once per run (the stand-in refuses address 0 to a plan that needs a workspace)."""
    import sys

    cupy = sys.modules["cupy"]
    workspaces = []

    def empty(shape, dtype):
        a = np.empty(shape, dtype)
        if dtype is cupy.uint8:
            workspaces.append((shape, a.ctypes.data))
        return a

    monkeypatch.setattr(cupy, "empty", empty)
    graph, right = _tuned_forward(cc, rng, [FakePlan(ms=1.0, workspace=size)], runs=3)
    assert all(right) and graph.executions == 3 and graph.timed == []  # (one plan: no timing)
    if size == 0:
        assert workspaces == [] and [ws for _, _, ws in graph.runs] == [0] * 3
    else:
        assert [shape >= size for shape, _ in workspaces] == [True] * 3
        assert [ws for _, _, ws in graph.runs] == [address for _, address in workspaces]


def test_plans_compiled_as_they_are_built_are_candidates_only_as_the_first(cc, rng):
    """cuDNN's runtime fusion engines compile with NVRTC when built: timing builds one only
    where it is the heuristics' first plan, which is built without timing too."""
    compiled, native = ((BehaviorNote.RUNTIME_COMPILATION,),
                        (BehaviorNote.SUPPORTS_CUDA_GRAPH_NATIVE_API,))
    plans = [FakePlan(ms=3.0, behavior=compiled), FakePlan(ms=1.0, behavior=compiled),
             FakePlan(ms=2.0), FakePlan(ms=2.5, behavior=native)]
    graph, right = _tuned_forward(cc, rng, plans)
    assert graph.built == {0, 2, 3} and graph.selected == 2 and all(right)
    GRAPHS.clear()
    graph, _ = _tuned_forward(cc, rng, [FakePlan(ms=3.0, builds=False), *plans])
    assert graph.built == {1, 3, 4}  # (the first that builds is the heuristics' first)


def test_timing_that_goes_wrong_leaves_the_heuristics_plan(cc, monkeypatch, rng):
    """A plan list that cannot be read, or a kept plan that cannot be selected, ends the
    timing, not the training step: the heuristics' first plan runs."""
    plans = [FakePlan(ms=2.0), FakePlan(ms=1.0)]

    def unreadable(graph):
        raise RuntimeError("CUDNN_STATUS_INTERNAL_ERROR")

    with monkeypatch.context() as m:
        m.setattr(PyGraph, "get_execution_plan_count", unreadable)
        graph, right = _tuned_forward(cc, rng, plans)
    assert graph.timed == [] and graph.selected == 0 and all(right)
    GRAPHS.clear()
    select = PyGraph.build_plan_at_index

    def refusing_after_timing(graph, index):
        if graph.timed and index != 0:
            raise RuntimeError("CUDNN_STATUS_BAD_PARAM")
        return select(graph, index)

    monkeypatch.setattr(PyGraph, "build_plan_at_index", refusing_after_timing)
    graph, right = _tuned_forward(cc, rng, plans)
    assert graph.timed and graph.selected == 0 and graph.executions == 2 and all(right)


@pytest.mark.parametrize("how", ["autotune off", "deterministic", "capturing", "one plan"])
def test_without_autotuning_the_heuristics_first_plan_runs(cc, monkeypatch, rng, how):
    """XPCNN_CUDNN_AUTOTUNE=0; XPCNN_DETERMINISTIC=1 (timings, and so the plan, would differ
    from run to run); a first call inside a CUDA-graph capture (nothing can be timed there);
    or a single plan: nothing is timed, the heuristics' first plan that builds runs."""
    if how == "autotune off":
        monkeypatch.setenv("XPCNN_CUDNN_AUTOTUNE", "0")
    elif how == "deterministic":
        monkeypatch.setenv("XPCNN_DETERMINISTIC", "1")
    elif how == "capturing":
        monkeypatch.setattr(CURRENT_STREAM, "capturing", True)
    plans = [FakePlan(ms=1.0, builds=False), FakePlan(ms=3.0), FakePlan(ms=1.0)]
    graph, right = _tuned_forward(cc, rng, plans[:2] if how == "one plan" else plans)
    assert graph.timed == [] and graph.selected == 1 and graph.executions == 2 and all(right)
    assert graph.built == ({1, 2} if how == "capturing" else {1})


def test_the_matmul_graphs_are_tuned_too(cc, rng):
    import unittest.mock

    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 4))
    with unittest.mock.patch.object(PyGraph, "PLANS", (FakePlan(ms=2.0), FakePlan(ms=1.0))):
        matmul = cc.CudnnMatmul(cc.load())
        for _ in range(2):
            np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-12)
    (graph,) = GRAPHS
    assert graph.selected == 1 and graph.executions == 2
    assert graph.timed == [0] * (1 + cc.TUNE_RUNS) + [1] * (1 + cc.TUNE_RUNS)


@needs_compiler
@pytest.mark.parametrize("net", ["gap_net", "fused_relu_net"])
def test_training_with_cudnn_convolutions(emulated_cupy, monkeypatch, net):
    """Whole fits whose Conv2D layers run on the cuDNN engine (the stand-in frontend; every
    other CuPy kernel on the CUDA emulator) end with the standard path's weights: the layer's
    use of the seam (fused bias and ReLU, masks, casts, bias gradients) holds with cuDNN."""
    import nets

    import xpcnn
    from xpcnn.ops import kernels as kernels_module

    fast_cupy = emulated_cupy
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 32)

    def fit(kernels):
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        model = xpcnn.Sequential(getattr(nets, net)(), seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        # (asked while these kernels are the backend's: a layer's engine follows them)
        engines = {type(la._engine()).__name__ for la in model.layers
                   if isinstance(la, xpcnn.layers.Conv2D)}
        return model, history.history["loss"], engines

    (cudnn_model, loss_cudnn, engines), (std_model, loss_std, _) = (fit(fast_cupy.KERNELS),
                                                                   fit(None))
    assert engines == {"CudnnConv"}
    kinds = {graph.ops[0][0] for graph in GRAPHS}
    assert kinds == {"conv_fprop", "conv_dgrad", "conv_wgrad"}
    assert all(graph.executions for graph in GRAPHS)
    assert loss_cudnn == pytest.approx(loss_std, rel=1e-5)
    for a, b in zip(cudnn_model.get_weights(), std_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- the process's plans (shared_plan, clear_plans) ----------------------------------------------
# a strided "same" convolution: pads (0, 1, 0, 1), which padding=1 changes and nothing else
SHARED_CASE = ((6, 6, 3), 4, (3, 3), (2, 2), "same")


def _layer(cc, case=SHARED_CASE):
    """A layer's engine, as each Conv2D makes its own: its geometry an equal, separate object."""
    return _engines(cc, case)[1]


def _all_results(engine, x, w, bias, dy):
    """Forward (+ bias and ReLU), input gradient, kernel and bias gradients."""
    return (engine.forward(x, w, bias, True), engine.input_grad(dy, w),
            *engine.weight_grad(x, dy, True))


def test_layers_with_the_same_convolution_share_its_plans_built_and_timed_once(cc, rng):
    """Two layers (or two models) with one convolution: each of its graphs is built and timed
    once in the process, and every layer runs the plan that timing chose."""
    import unittest.mock

    with unittest.mock.patch.object(PyGraph, "PLANS", (FakePlan(ms=2.0), FakePlan(ms=1.0))):
        first, second = _layer(cc), _layer(cc)
        g, _, standard = _engines(cc, SHARED_CASE)
        x, w, bias, dy = conv_data(g, rng, 2, np.float32)
        want = _all_results(standard, x, w, bias, dy)
        for engine in (first, second, first):
            for got, expected in zip(_all_results(engine, x, w, bias, dy), want, strict=True):
                np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-4)
    assert first.geometry is not second.geometry
    assert [graph.ops[0][0] for graph in GRAPHS] == ["conv_fprop", "conv_dgrad", "conv_wgrad"]
    per_plan = 1 + cc.TUNE_RUNS
    assert all(graph.timed == [0] * per_plan + [1] * per_plan for graph in GRAPHS)
    assert all(graph.selected == 1 and graph.executions == 3 for graph in GRAPHS)
    assert list(first._plans.values()) == list(second._plans.values())
    assert all(a is b for a, b in zip(first._plans.values(), second._plans.values(), strict=True))


def _device(monkeypatch, index):
    monkeypatch.setattr(Device, "current", index)


# Each change of what decides a forward graph or its plan, from BASE: the arguments of
# _forward, the environment, the device.
BASE = {"case": SHARED_CASE, "n": 2, "dtype": np.float32, "bias": True, "relu": True}
OTHER_CONVOLUTIONS = {
    "input size": {"case": ((7, 6, 3), 4, (3, 3), (2, 2), "same")},
    "channels": {"case": ((6, 6, 2), 4, (3, 3), (2, 2), "same")},
    "filters": {"case": ((6, 6, 3), 5, (3, 3), (2, 2), "same")},
    "kernel": {"case": ((6, 6, 3), 4, (3, 1), (2, 2), "same")},
    "strides": {"case": ((6, 6, 3), 4, (3, 3), (2, 1), "same")},
    "pads alone": {"case": ((6, 6, 3), 4, (3, 3), (2, 2), 1)},
    "batch": {"n": 3},
    "dtype": {"dtype": np.float64},
    "no bias": {"bias": False},
    "no relu": {"relu": False},
    "tf32 off": {"env": {"XPCNN_TF32": "0"}},
    "deterministic": {"env": {"XPCNN_DETERMINISTIC": "1"}},
    "autotune off": {"env": {"XPCNN_CUDNN_AUTOTUNE": "0"}},
    "device": {"device": 1},
}


def _forward(cc, rng, case, n, dtype, bias, relu):
    """A new layer's forward pass, checked against the standard engine."""
    g, engine, standard = _engines(cc, case)
    x, w, b, _ = conv_data(g, rng, n, dtype)
    b = b if bias else None
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(engine.forward(x, w, b, relu), standard.forward(x, w, b, relu),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("change", list(OTHER_CONVOLUTIONS))
def test_convolutions_that_differ_in_anything_have_plans_of_their_own(cc, monkeypatch, rng,
                                                                      change):
    """A plan is shared only where all that decides its graph and its choice is the same: a
    layer that differs in any of it builds its own, with its own (right) numbers; the first
    configuration's plan is still there for a third layer."""
    other = {**BASE, **OTHER_CONVOLUTIONS[change]}
    env, device = other.pop("env", {}), other.pop("device", 0)
    _forward(cc, rng, **BASE)
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        _device(m, device)
        _forward(cc, rng, **other)
    assert len(GRAPHS) == 2
    _forward(cc, rng, **BASE)
    assert len(GRAPHS) == 2


def test_a_convolution_cudnn_has_no_plan_for_is_tried_once_and_warned_about_once(
        cc, monkeypatch, rng):
    """cuDNN's refusal is kept as the plan: a second layer with that convolution neither builds
    the graph again nor warns again, and runs it on the fallback, right."""
    monkeypatch.setattr(PyGraph, "refuse", lambda graph: graph.ops[0][0] == "conv_dgrad")
    g, _, standard = _engines(cc, SHARED_CASE)
    _, w, _, dy = conv_data(g, rng, 2, np.float64)
    with pytest.warns(RuntimeWarning, match="no plan for input gradient") as record:
        got = [_layer(cc).input_grad(dy, w) for _ in range(2)]
    assert len(record) == 1 and len(GRAPHS) == 1
    for dx in got:
        np.testing.assert_allclose(dx, standard.input_grad(dy, w), rtol=1e-12)


def test_clear_plans_makes_new_layers_build_afresh_and_leaves_a_layers_own(cc, rng):
    """clear_plans(): the next layer builds (and times) its graph again; a layer that ran a
    plan before keeps it (CUDA graphs captured from it replay that plan)."""
    g, _, standard = _engines(cc, SHARED_CASE)
    x, w, bias, _ = conv_data(g, rng, 2, np.float32)
    want = standard.forward(x, w, bias, True)
    before = _layer(cc)
    before.forward(x, w, bias, True)
    cc.clear_plans()
    after = _layer(cc)
    for engine in (after, before, _layer(cc)):
        np.testing.assert_allclose(engine.forward(x, w, bias, True), want, rtol=2e-5, atol=2e-5)
    assert len(GRAPHS) == 2 and [graph.executions for graph in GRAPHS] == [2, 2]
    assert all(graph.timed for graph in GRAPHS)
    (old,), (new,) = before._plans.values(), after._plans.values()
    assert old is not new and (old.graph, new.graph) == tuple(GRAPHS)


def test_matmul_engines_share_the_processs_matmul_plans(cc, rng):
    """Every CudnnMatmul (the CuPy kernels keep one; scripts make their own) runs the one plan
    of a product, built and timed once; another product, or another transpose, gets its own."""
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 4))
    for _ in range(2):
        np.testing.assert_allclose(cc.CudnnMatmul(cc.load())(a, b), a @ b, rtol=1e-12)
    assert len(GRAPHS) == 1 and GRAPHS[0].executions == 2 and GRAPHS[0].timed
    np.testing.assert_allclose(cc.CudnnMatmul(cc.load())(a, a, transpose_b=True), a @ a.T,
                               rtol=1e-12)
    np.testing.assert_allclose(cc.CudnnMatmul(cc.load())(a.T.copy(), b, transpose_a=True), a @ b,
                               rtol=1e-12)
    assert len(GRAPHS) == 3


class _Arrivals:
    """A lock that counts the threads that come to it: ``both`` is set when the second does
    (before it waits for the lock)."""

    def __init__(self, lock):
        self.lock, self.count, self.both = lock, 0, threading.Event()

    def __enter__(self):
        self.count += 1
        if self.count == 2:
            self.both.set()
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def _in_two_threads(first, second):
    """``first()`` and ``second()`` started in two threads, in that order: their results."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(first), pool.submit(second)]
        return [f.result(timeout=30) for f in futures]


def test_a_plan_asked_for_by_two_threads_at_once_is_built_once(cc, monkeypatch, rng):
    """The second thread waits for the first's build (held inside it here until the second
    has come to the lock), then runs the same plan."""
    arrivals = _Arrivals(cc._PLANS_LOCK)
    monkeypatch.setattr(cc, "_PLANS_LOCK", arrivals)
    check = PyGraph.check_support

    def held(graph):
        assert arrivals.both.wait(10), "the second thread never came to the lock"
        return check(graph)

    monkeypatch.setattr(PyGraph, "check_support", held)
    g, _, standard = _engines(cc, SHARED_CASE)
    x, w, bias, _ = conv_data(g, rng, 2, np.float32)
    layers = [_layer(cc), _layer(cc)]
    got = _in_two_threads(*(lambda e=e: e.forward(x, w, bias, True) for e in layers))
    for y in got:
        np.testing.assert_allclose(y, standard.forward(x, w, bias, True), rtol=2e-5, atol=2e-5)
    (graph,) = GRAPHS
    assert graph.executions == 2 and graph.timed
    (first,), (second,) = (e._plans.values() for e in layers)
    assert first is second


def test_a_plan_first_run_by_two_threads_at_once_is_timed_once(cc, monkeypatch, rng):
    """The second thread's run waits for the first's timing (held inside it here until the
    second has come to the plan's lock) and runs the plan it chose."""
    g, layer, standard = _engines(cc, SHARED_CASE)
    x, w, bias, _ = conv_data(g, rng, 2, np.float32)
    make = layer._fprop(2, True, True)
    plan = cc.build_plan(cc.load(), np.float32, make, *cc.switches())  # (as shared_plan does)
    arrivals = _Arrivals(plan._lock)
    plan._lock = arrivals
    timed, execute = PyGraph.execute_plan_at_index, PyGraph.execute
    ran_with = []

    def held(graph, *args, **kwargs):
        assert arrivals.both.wait(10), "the second thread never came to the lock"
        return timed(graph, *args, **kwargs)

    def recorded(graph, *args, **kwargs):
        ran_with.append(graph.selected)
        return execute(graph, *args, **kwargs)

    monkeypatch.setattr(PyGraph, "execute_plan_at_index", held)
    monkeypatch.setattr(PyGraph, "execute", recorded)

    def run():
        y = np.empty((2, *g.out_hw, g.filters), np.float32)
        plan.run(x=x, w=w, bias=bias, y=y)
        return y

    for y in _in_two_threads(run, run):
        np.testing.assert_allclose(y, standard.forward(x, w, bias, True), rtol=2e-5, atol=2e-5)
    (graph,) = GRAPHS
    per_plan = 1 + cc.TUNE_RUNS
    assert graph.timed == [0] * per_plan + [1] * per_plan + [2] * per_plan
    assert ran_with == [2, 2]  # (the fastest: the TF32 plan of PyGraph.PLANS)


def test_threads_on_streams_of_their_own_run_a_plan_with_handles_of_their_own(cc, monkeypatch,
                                                                             rng):
    """cuDNN's handle is one per thread: two threads, each on its own stream, run one plan (built
    by a third), both having put their handle on their stream before either executes (held
    here), and each runs on its own stream; with one handle for all, the first would run on
    the second's stream. They run it one at a time (cuDNN's plans are not safe to run from two
    threads at once)."""
    g, layer, standard = _engines(cc, SHARED_CASE)
    x, w, bias, _ = conv_data(g, rng, 2, np.float32)
    want = standard.forward(x, w, bias, True)
    layer.forward(x, w, bias, True)  # (built and timed here, with this thread's handle)
    (graph,) = GRAPHS
    ours = {handle for handle, _, _ in graph.runs}
    both = threading.Barrier(2, timeout=10)
    handle, execute = cc._handle, PyGraph.execute
    inside, most = [], []

    def held(*args, **kwargs):
        h = handle(*args, **kwargs)
        both.wait()
        return h

    def alone(graph, *args, **kwargs):
        inside.append(1)
        most.append(len(inside))
        time.sleep(0.05)  # (long enough for the other thread to come in, were it let)
        try:
            return execute(graph, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(cc, "_handle", held)
    monkeypatch.setattr(PyGraph, "execute", alone)
    streams = [FakeStream(0x1000), FakeStream(0x2000)]

    def run(stream):
        with stream:
            return layer.forward(x, w, bias, True)

    for y in _in_two_threads(*(lambda s=s: run(s) for s in streams)):
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    (first, first_on, _), (second, second_on, _) = graph.runs[-2:]
    assert {first_on, second_on} == {s.ptr for s in streams}
    assert first is not second and not {first, second} & ours
    assert most == [1, 1]


def test_the_handles_of_ended_threads_serve_threads_started_later(cc, monkeypatch, rng):
    """A thread's handle outlives it (destroying one synchronises the device): a thread
    started after it ended takes it, and puts it on its own stream, rather than creating one."""
    cudnn = cc.load()
    created = []
    monkeypatch.setattr(cudnn, "create_handle", lambda: created.append(Handle()) or created[-1])
    g, layer, standard = _engines(cc, SHARED_CASE)
    x, w, bias, _ = conv_data(g, rng, 2, np.float32)
    want = standard.forward(x, w, bias, True)

    def in_a_thread(stream):
        ran = []
        thread = threading.Thread(target=lambda: ran.append(run(stream)))
        thread.start()
        thread.join(30)
        np.testing.assert_allclose(ran.pop(), want, rtol=2e-5, atol=2e-5)

    def run(stream):
        with stream:
            return layer.forward(x, w, bias, True)

    in_a_thread(FakeStream(0x1000))
    assert len(created) == 1
    in_a_thread(FakeStream(0x2000))
    (graph,) = GRAPHS
    assert len(created) == 1 and {handle for handle, _, _ in graph.runs} == set(created)
    assert created[0].streams_set == [0x1000, 0x2000] and graph.runs[-1][1] == 0x2000


@needs_compiler
def test_a_second_model_trains_on_the_plans_the_first_built_and_timed(emulated_cupy,
                                                                      monkeypatch):
    """A user's next experiment (a fresh model of the same architecture) builds and times no
    cuDNN graph; evaluating at another batch size builds only that batch's forward graphs,
    once for both models."""
    import nets

    import xpcnn
    from xpcnn.ops import kernels as kernels_module

    kernels = emulated_cupy.KERNELS
    monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 32)

    def experiment(seed):
        model = xpcnn.Sequential(nets.gap_net(), seed=seed)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        return model

    def built_and_timed():
        return len(GRAPHS), sum(len(graph.timed) for graph in GRAPHS)

    first = experiment(0)
    # two convolutions: forward and kernel gradient each, the input gradient of the second
    assert sorted(graph.ops[0][0] for graph in GRAPHS) == [
        "conv_dgrad", "conv_fprop", "conv_fprop", "conv_wgrad", "conv_wgrad"]
    assert all(graph.timed for graph in GRAPHS)
    once = built_and_timed()
    second = experiment(1)
    assert built_and_timed() == once
    for model in (second, first):
        model.evaluate(x, y, batch_size=8, verbose=0)
    new = GRAPHS[once[0]:]
    assert [graph.ops[0][0] for graph in new] == ["conv_fprop", "conv_fprop"]
    assert all(graph.executions == 2 * len(x) // 8 for graph in new)
