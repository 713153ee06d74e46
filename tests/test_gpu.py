"""CuPy on a CUDA GPU: the CuPy kernels (``xpcnn.ops.fast_cupy``, ``xpcnn.ops.cuda_conv``) give
the standard versions' results on random inputs, and models train and predict on the GPU.

On a GPU every case runs there (``scripts/gpu_check.sh`` runs them, with the GPU benchmark, when
a GPU is lent). Without one, the same test bodies run on the CUDA emulator instead
(:func:`emulated_gpu`: the kernels compiled for the CPU, the stand-in cuDNN frontend, NumPy
arrays standing for CuPy's), so that a test broken against today's xpcnn fails in the everyday
suite, not on the next lent GPU: the cases of :data:`EVERYDAY` only, skipped otherwise, and never
those the emulator cannot run (:data:`EMULATOR_CANNOT`, each with its reason).
``XPCNN_EMULATE_GPU=all`` runs every case on the emulator, those it cannot run as strict
expected failures (a case that passes there fails the run: its entry should go).
"""

import contextlib
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from cuda_emulator import RawKernel, compiler
from kernel_cases import (
    CONV_INPUT_GRAD,
    DIRECT_CONV,
    EVERY_MAX_POOL,
    GAP_NET_STEP_TABLES,
    IM2COL,
    MAX_POOL,
    OPTIMISERS,
    POOL_PADDED,
    RECORD_DTYPES,
    RECORD_SCALING,
    SOFTMAX_CROSS_ENTROPY,
    TILED_CONV,
    UPDATE_SHAPES,
    check_add_relu,
    check_max_pool_of_nonfinite_gradients,
    check_recorded_steps,
    record_checks,
    recorded_scales,
    recorded_steps,
)
from nets import every_layer_net, gap_net, kept_for_backward
from test_conv_seam import GEOMETRIES
from test_conv_seam import IDS as GEOMETRY_IDS

import xpcnn
from xpcnn.backend import PRECISIONS, cuda_available, get_backend, set_fast_path
from xpcnn.errors import DeviceError, InputError
from xpcnn.ops import im2col as ops
from xpcnn.ops import windows
from xpcnn.ops.kernels import StandardKernels, fast_kernels
from xpcnn.ops.workspace import Workspace

REAL_GPU = cuda_available()
#: No GPU here: the cases run on the CUDA emulator (which needs the host's C++ compiler).
EMULATED = not REAL_GPU and compiler() is not None
#: Every case on the emulator, not only those of EVERYDAY (``XPCNN_EMULATE_GPU=all``).
EMULATE_ALL = os.environ.get("XPCNN_EMULATE_GPU") == "all"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (REAL_GPU or EMULATED), reason="needs CuPy and a CUDA GPU, "
                                 "or a C++ compiler for the CUDA emulator")]

#: The emulated GPU's compute capability: 6.0, no tensor cores (the emulator runs none of the
#: tensor-core kernels).
EMULATED_CAPABILITY = 60


def _gpu_facts() -> tuple[int, bool]:
    """(compute capability, e.g. 90; whether cuDNN's frontend loads), read once at collection;
    (0, False) without a GPU or the emulator, where every test here is skipped anyway."""
    if EMULATED:
        return EMULATED_CAPABILITY, True  # (the stand-in frontend)
    if not REAL_GPU:
        return 0, False
    from xpcnn.ops import cuda_conv, cudnn_conv

    return cuda_conv._compute_capability(), cudnn_conv.load() is not None


CAPABILITY, CUDNN_LOADS = _gpu_facts()
needs_cudnn = pytest.mark.skipif(
    not CUDNN_LOADS, reason="cuDNN's frontend (nvidia-cudnn-frontend, the [cuda12] / [cuda13] "
    "extra) does not load here" if CAPABILITY else "needs CuPy and a CUDA GPU")

#: Whether CuPy here takes bfloat16 (ml_dtypes', with CuPy 14 and NumPy 2.1.2 or later); the
#: emulator stands for a CuPy that does.
HAS_BFLOAT16 = EMULATED or (REAL_GPU and xpcnn.backend._ml_dtypes_bfloat16("cupy") is not None)
needs_bfloat16 = pytest.mark.skipif(not HAS_BFLOAT16, reason="CuPy here takes no bfloat16 "
                                    "(it needs ml_dtypes, CuPy 14 and NumPy 2.1.2 or later)")
DTYPES = ["float32", "float16", pytest.param("bfloat16", marks=needs_bfloat16)]
HALVES = ("float16", "bfloat16")


def needs_capability(least: int, what: str) -> pytest.MarkDecorator:
    """Skip below compute capability ``least`` (70 is 7.0); without a GPU, say that instead."""
    reason = ("the emulated GPU has no tensor cores" if EMULATED
              else f"this GPU has no {what} (compute capability < {least / 10:.1f})" if CAPABILITY
              else "needs CuPy and a CUDA GPU")
    return pytest.mark.skipif(least > CAPABILITY, reason=reason)


def host(a: Any) -> np.ndarray:
    """A device array read on the host (CuPy's ``get``); on the emulator its arrays (and
    their elements, NumPy scalars there) are NumPy's already."""
    return np.asarray(a) if isinstance(a, np.ndarray | np.generic) else a.get()


# -- the emulated GPU -----------------------------------------------------------------------------


class _EmulatedDevice:
    """CuPy's ``Device`` on the emulator: its one GPU (id 0, compute capability 6.0), made
    current by ``with`` (it is always), nothing to wait for in ``synchronize`` (a kernel runs
    as it is launched). Equal to NumPy's one device, "cpu", so that the NumPy namespace
    standing for CuPy's takes it as its arrays' device."""

    id = 0
    compute_capability = str(EMULATED_CAPABILITY)

    def __init__(self, index: int | None = None) -> None:
        assert index in (None, 0), f"the emulator has one GPU, not {index}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _EmulatedDevice) or other == "cpu"

    def __hash__(self) -> int:
        return hash("cpu")

    def __enter__(self) -> "_EmulatedDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<CUDA Device 0 (emulated)>"


@contextlib.contextmanager
def emulated_gpu() -> Iterator[None]:
    """What this module's tests use of a GPU, on the CPU: tests/launch_counter.py's
    ``emulated`` (the CuPy kernels on the CUDA emulator, the stand-in cuDNN), its fake
    ``cupy`` giving NumPy's function for each one it lacks (``cp.abs``, ``cp.testing``, ...),
    one device (``get_backend("cuda")`` is CuPy's backend over NumPy arrays), and training
    steps run eagerly: the emulator has no streams, so nothing to capture them on."""
    from launch_counter import emulated

    from xpcnn.training import step

    with emulated(), pytest.MonkeyPatch.context() as mp:
        cupy = sys.modules["cupy"]
        # (CuPy 14's bfloat16, which the emulator's kernels and NumPy arrays stand for too)
        mp.setattr(xpcnn.backend, "_ml_dtypes_bfloat16",
                   lambda library: np.dtype(ml_dtypes.bfloat16))
        mp.setattr(cupy, "__getattr__", lambda name: getattr(np, name), raising=False)
        mp.setattr(cupy.cuda, "Device", _EmulatedDevice, raising=False)
        mp.setattr(cupy.cuda, "runtime", types.SimpleNamespace(getDeviceCount=lambda: 1),
                   raising=False)
        mp.setattr(step, "graph_blockers",
                   lambda backend: ["the CUDA emulator has no streams to capture a step on"])
        yield


def _cases(**values: Any) -> Callable[[dict[str, Any]], bool]:
    """The cases whose parameter ``name`` is one of ``values[name]``, for each name given."""
    return lambda params: all(params[name] in wanted for name, wanted in values.items())


NO_STREAMS = "captures CUDA graphs: the emulator has no streams"
#: The cases the emulator cannot run (None: every case of the test), and why. Skipped there;
#: with XPCNN_EMULATE_GPU=all run as strict expected failures. On a GPU they run as the rest.
EMULATOR_CANNOT: dict[str, tuple[Callable[[dict[str, Any]], bool] | None, str]] = {
    "test_tensor_core_kernels_compile_here": (None, "the emulator runs no tensor-core kernel"),
    # (their replays are left out of every other test on the emulator: see _replays_give)
    "test_a_captured_fused_update_replays_as_the_standard_one": (None, NO_STREAMS),
    "test_a_cudnn_graph_is_captured_and_replayed": (None, NO_STREAMS),
    "test_replayed_steps_give_the_weights_of_eager_steps": (None, NO_STREAMS),
    "test_models_with_random_layers_are_captured_and_replay_their_draws": (None, NO_STREAMS),
    "test_a_captured_adam_step_on_a_label_that_is_no_class_is_skipped_and_named":
        (None, NO_STREAMS),
    "test_recording_a_step_on_the_gpu": (_cases(how=["captured"]), NO_STREAMS),
    "test_every_cudnn_plan_autotuning_may_choose_gives_the_standard_numbers":
        (None, "the stand-in cuDNN's plans run by index compute nothing (only the plan a "
         "graph keeps runs)"),
    "test_every_layer_trains_on_the_gpu_and_stays_there":
        (None, "NumPy arrays stand for CuPy's there: no device id"),
    "test_arrays_on_another_library_on_the_gpu":
        (None, "NumPy arrays stand for CuPy's there: a NumPy model takes them, no refusal"),
}

#: The cases that the everyday suite runs on the emulator (None: every case): some of each test
#: that the emulator can run, the cheaper ones (small shapes, a dtype or two), so that a test
#: broken against today's xpcnn fails there, in about 13 s (XPCNN_EMULATE_GPU=all runs them all
#: in about seven minutes, on two cores).
EVERYDAY: dict[str, Callable[[dict[str, Any]], bool] | None] = {
    "test_the_seam_gives_cupy_kernels_to_cupy": None,
    "test_im2col": None,
    "test_im2col_reads_the_padding_without_storing_it": None,
    "test_convolution_kernels_match_im2col": _cases(case=[DIRECT_CONV[3], TILED_CONV[-1]]),
    "test_strided_convolution_input_gradients_match_col2im":
        _cases(case=[CONV_INPUT_GRAD[0], CONV_INPUT_GRAD[-1]], dtype=["float32"]),
    "test_feature_norm_and_its_gradient": _cases(shape=[(3, 1, 1, 64)], dtype=["float32"]),
    "test_batch_norm_in_two_launches_each_way": _cases(shape=[(64, 33)], dtype=["float32"]),
    "test_sum_rows_in_one_launch": _cases(rows=[1, 1031]),
    "test_a_relu_gradient_and_its_bias_gradient_in_one_launch": _cases(rows=[100, 1031]),
    "test_max_pool_and_its_gradient": None,
    "test_max_pool_routes_an_infinite_gradient_to_the_first_maximum_only":
        _cases(case=[EVERY_MAX_POOL[0], POOL_PADDED[0]], dtype=["float32"]),
    "test_padded_max_and_average_pools_in_one_launch_each_way":
        _cases(case=[POOL_PADDED[0]], dtype=["float32"]),
    "test_global_average_pooling": _cases(shape=[(2, 64, 64, 3)]),
    "test_elementwise_kernels": _cases(dtype=["float32"]),
    "test_add_relu_kernels": _cases(dtype=["float16"]),
    "test_matmul_with_bias_and_relu": None,
    "test_long_transposed_product_split_into_blocks": _cases(rows=[3000]),
    "test_softmax_cross_entropy": _cases(dtype=["float32"]),
    "test_softmax_in_one_launch": _cases(dtype=["float32"]),
    "test_softmax_cross_entropy_sums_its_rows_the_same_way_every_time": _cases(rows=[3, 700]),
    "test_last_block_launches_of_different_grids_share_their_counters": None,
    "test_softmax_cross_entropy_is_nan_for_a_label_that_is_no_class":
        _cases(labels_dtype=["uint8", "int64"]),
    "test_softmax_cross_entropy_of_one_hot_rows_and_sample_weights": None,
    "test_softmax_cross_entropy_with_class_weights": _cases(rows=[7, 20]),
    "test_numeric_edges_of_the_kernels_on_the_gpu": None,
    "test_fused_optimiser_updates": None,
    "test_training_on_the_gpu_matches_the_standard_path_and_numpy":
        _cases(conv_algorithm=["cudnn"]),
    "test_mixed_precision_on_the_gpu": _cases(conv_algorithm=["direct"]),
    "test_the_loss_scale_halves_below_one_on_the_gpu": None,
    "test_a_relu_ceiling_of_zero_on_the_gpu": None,
    "test_weighted_training_on_the_gpu_matches_numpy": None,
    "test_rmsprop_and_clipping_on_the_gpu": None,
    "test_the_convolution_comparison_times_strided_input_gradients_both_ways": None,
    "test_a_missing_gpu_index_is_a_clear_error": None,
    "test_data_on_the_gpu_gives_the_weights_of_host_batches": None,
    "test_a_frozen_trunk_keeps_nothing_for_backward_on_the_gpu": None,
    "test_a_datasets_samples_are_read_on_the_callers_stream": None,
    "test_a_gated_update_on_the_gpu_changes_nothing_where_the_flag_is_false": None,
    "test_random_numbers_kernel_is_the_definition": _cases(dtype=["float32"]),
    "test_dropout_kernel_is_the_standard_dropout": _cases(dtype=["float32"]),
    "test_casting_many_arrays_in_one_launch_on_the_gpu": None,
    "test_statistics_kept_and_put_back_on_the_gpu": None,
    "test_random_crop_and_flip_kernels_are_the_standard_ones": _cases(dtype=["uint8"]),
    "test_normalize_kernel_is_the_standard_one": _cases(dtype=["uint8"]),
    "test_an_extractor_and_a_logits_model_on_the_gpu_predict_as_on_the_cpu": None,
    "test_cudnn_matches_the_standard_path": None,
    "test_cudnn_matmul_graphs": None,
    "test_cudnn_matmul_with_its_bias_and_relu": None,
    "test_recording_a_step_on_the_gpu": None,
    "test_every_test_runs_on_the_emulator_or_says_why": None,
}


def _emulator_cannot(name: str, params: dict[str, Any]) -> str | None:
    """Why the emulator cannot run this case (EMULATOR_CANNOT), or None."""
    which, reason = EMULATOR_CANNOT.get(name, (lambda params: False, ""))
    return reason if which is None or which(params) else None


def _everyday(name: str, params: dict[str, Any]) -> bool:
    """Whether the everyday suite runs this case on the emulator."""
    which = EVERYDAY.get(name, lambda params: False)
    return _emulator_cannot(name, params) is None and (which is None or which(params))


@pytest.fixture(scope="module", autouse=True)
def _the_gpu() -> Iterator[None]:
    """The GPU, or without one the emulated GPU (:func:`emulated_gpu`) for the whole module."""
    if REAL_GPU:
        yield
        return
    with emulated_gpu():
        yield


def collection_marks(item: pytest.Item) -> list[pytest.MarkDecorator]:
    """This case's marks on the emulator, given at collection (tests/conftest.py asks each
    module): a skip, with its reason, for a case of EMULATOR_CANNOT or outside EVERYDAY; with
    XPCNN_EMULATE_GPU=all, a strict expected failure for EMULATOR_CANNOT's and none else. On
    a GPU none: every case runs there."""
    if not EMULATED:
        return []
    name, params = item.originalname, _params(item)
    reason = _emulator_cannot(name, params)
    if reason is not None:
        return [(pytest.mark.xfail(strict=True, reason=f"on the emulator: {reason}")
                 if EMULATE_ALL else pytest.mark.skip(reason=f"on the emulator: {reason}"))]
    if not EMULATE_ALL and not _everyday(name, params):
        return [pytest.mark.skip(reason="not among the cases the everyday suite runs on the "
                                 "emulator (EVERYDAY; XPCNN_EMULATE_GPU=all runs them)")]
    return []


#: The tests of whole fits and benchmarks, whose raw kernels the emulator runs once, not again
#: in reverse to compare (RawKernel.check_schedules): their subject is the model's training,
#: and test_cuda_kernels_on_cpu (and this module's kernel tests) check every kernel in both
#: schedules, as test_launch_counts leaves them to it.
ONE_SCHEDULE = {
    "test_training_on_the_gpu_matches_the_standard_path_and_numpy",
    "test_a_frozen_trunk_keeps_nothing_for_backward_on_the_gpu",
    "test_weighted_training_on_the_gpu_matches_numpy",
    "test_rmsprop_and_clipping_on_the_gpu",
    "test_the_convolution_comparison_times_strided_input_gradients_both_ways",
    "test_a_relu_ceiling_of_zero_on_the_gpu",
    "test_mixed_precision_on_the_gpu",
    "test_data_on_the_gpu_gives_the_weights_of_host_batches",
}


@pytest.fixture(autouse=True)
def _on_the_emulator(_the_gpu: None, request: pytest.FixtureRequest,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On the emulator, the warnings that are its own, not the code's, filtered (pytest puts
    the filters back after each test), and the raw kernels of ONE_SCHEDULE's tests run once."""
    if not EMULATED:
        return
    if request.node.originalname in ONE_SCHEDULE:
        monkeypatch.setattr(RawKernel, "check_schedules", False)
    # (NumPy warns where a cast overflows to an infinity, as some tests mean it to; CuPy does not)
    warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
    # (fits run eagerly there, as emulated_gpu makes them, and xpcnn says so)
    warnings.filterwarnings("ignore", "xpcnn: training steps run without CUDA graphs",
                            RuntimeWarning)


def _params(item: pytest.Item) -> dict[str, Any]:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def test_every_test_runs_on_the_emulator_or_says_why(request):
    """Each test here has cases in EVERYDAY or every case in EMULATOR_CANNOT, the tables name
    tests that exist, and each of EVERYDAY's tests has a case that the everyday suite runs
    among those collected (unless ``-k`` chose some)."""
    tests = {name for name, f in globals().items() if name.startswith("test_") and callable(f)}
    whole = {name for name, (which, _) in EMULATOR_CANNOT.items() if which is None}
    assert set(EVERYDAY) | set(EMULATOR_CANNOT) | ONE_SCHEDULE <= tests
    assert not set(EVERYDAY) & whole
    assert tests == set(EVERYDAY) | whole
    if request.config.option.keyword:
        return
    collected: dict[str, list[bool]] = {}
    for item in request.session.items:
        if getattr(item, "module", None) is sys.modules[__name__]:
            name = item.originalname
            collected.setdefault(name, []).append(_everyday(name, _params(item)))
    assert not [name for name, runs in collected.items() if name in EVERYDAY and not any(runs)]


@pytest.fixture
def cp():
    import cupy

    return cupy


@pytest.fixture
def kernels():
    """(CuPy kernels, standard kernels over the CuPy namespace)."""
    import array_api_compat.cupy as xc

    from xpcnn.ops.fast_cupy import KERNELS

    return KERNELS, StandardKernels(xc)


def _random(cp, rng, shape, dtype, levels=None):
    """Random values; with ``levels``, small integers (so that pooling windows have ties)."""
    a = rng.integers(0, levels, shape) if levels else rng.standard_normal(shape)
    return cp.asarray(a.astype(dtype))


def _poisoned(cp, shape, dtype):
    return cp.full(shape, cp.nan, dtype=dtype)


def _equal(got, want):
    """The same dtype, shape and values (NaN where NaN)."""
    assert got.dtype == want.dtype, f"dtype {got.dtype}, want {want.dtype}"
    np.testing.assert_array_equal(host(got), host(want), strict=True)


def _replays_give(cp, launch, want):
    """``launch()`` (a last-block launch) captured in a CUDA graph and replayed twice, on an
    output first filled with NaN: the bits ``want`` both times (its counters back at 0). The
    emulator has no streams to capture on: there it launches twice more, eagerly."""
    if EMULATED:
        for _ in range(2):
            _equal(launch(), want)
        return
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        launch()  # (compiled, its temporaries' blocks in the pool, outside the capture)
        stream.begin_capture()
        replayed = launch()
        graph = stream.end_capture()
    for _ in range(2):
        with stream:
            replayed[...] = cp.nan
            graph.launch(stream=stream)
        stream.synchronize()
        _equal(replayed, want)


def test_the_seam_gives_cupy_kernels_to_cupy():
    from xpcnn.ops.fast_cupy import KERNELS

    backend = get_backend("cuda")
    assert fast_kernels(backend) is KERNELS
    old = set_fast_path(False)
    try:
        assert fast_kernels(backend) is None
    finally:
        set_fast_path(old)


@pytest.mark.parametrize("kernel, strides, shape, pads", [c for c in IM2COL if not any(c[3])])
@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col(cp, kernels, rng, kernel, strides, shape, pads, dtype):
    fast, std = kernels
    x = _random(cp, rng, shape, dtype)
    out_hw = windows.output_size(shape[1:3], kernel, strides, (0, 0, 0, 0))
    cols = (shape[0], *out_hw, kernel[0] * kernel[1] * shape[3])
    got = fast.im2col_into(x, _poisoned(cp, cols, dtype), kernel, strides, out_hw)
    want = std.im2col_into(x, _poisoned(cp, cols, dtype), kernel, strides, out_hw)
    _equal(got, want)


@pytest.mark.parametrize("kernel, strides, shape, pads", [c for c in IM2COL if any(c[3])])
@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_reads_the_padding_without_storing_it(cp, kernels, rng, kernel, strides, shape,
                                                      pads, dtype):
    fast, std = kernels
    x = _random(cp, rng, shape, dtype)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    cols = (shape[0], *out_hw, kernel[0] * kernel[1] * shape[3])
    padded = cp.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    want = std.im2col_into(padded, _poisoned(cp, cols, dtype), kernel, strides, out_hw)
    got = fast.im2col_into(x, _poisoned(cp, cols, dtype), kernel, strides, out_hw, pads)
    _equal(got, want)


@pytest.mark.parametrize("algorithm, case, dtype",
                         [pytest.param("direct", case, dt,
                                       marks=[needs_bfloat16] if dt == "bfloat16" else [])
                          for case in DIRECT_CONV for dt in ("float32", "float16", "bfloat16")]
                         + [("tiled", case, dt) for case in TILED_CONV
                            for dt in ("float16", "float32", "float64")]
                         + [pytest.param("tiled-tf32", case, "float32",
                                         marks=needs_capability(80, "TF32 tensor cores"))
                            for case in TILED_CONV])
def test_convolution_kernels_match_im2col(cp, kernels, rng, algorithm, case, dtype):
    """Forward (with and without bias and ReLU) and kernel gradient (with and without the
    bias's) of the direct kernels (one element per thread), the tiled ones (float16 on the
    tensor cores) and the tiled float32 ones on the tensor cores in TF32, against the
    standard im2col + matmul versions."""
    kernel, strides, shape, filters, padding = case
    fast, std = kernels
    conv = fast.conv_kernels
    x = _random(cp, rng, shape, dtype)
    pads = windows.resolve_padding(padding, shape[1:3], kernel, strides)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    w2 = _random(cp, rng, (kernel[0] * kernel[1] * shape[3], filters), dtype)
    bias = _random(cp, rng, (filters,), dtype)
    tf32 = algorithm == "tiled-tf32"
    # TF32 keeps 10 bits of each factor's mantissa: errors of ~1e-3 of the largest value
    tol = 3e-3 if tf32 else {"float16": 2e-2, "bfloat16": 8e-3, "float32": 1e-4,
                             "float64": 1e-12}[dtype]
    grad_tol = 3e-3 if tf32 else {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-5,
                                  "float64": 1e-12}[dtype]
    conv.set_algorithm("tiled" if tf32 else algorithm)
    conv.tf32 = tf32
    try:
        for b, relu in ((bias, True), (None, False)):
            got = conv.conv2d(x, w2, b, kernel, strides, pads, out_hw, relu)
            want = ops.conv_forward(std.xp, std, x, w2, b, kernel, strides, pads, out_hw,
                                    Workspace(), "k", None, relu)
            assert got.dtype == x.dtype
            if tf32:
                scale = float(cp.abs(want).max())
                np.testing.assert_allclose(host(got) / scale, host(want) / scale, atol=tol)
                # and not exact: the tensor cores ran, not the CUDA-core kernel
                assert not cp.array_equal(got, fast_float32(conv, x, w2, b, kernel, strides,
                                                            pads, out_hw, relu))
            else:
                np.testing.assert_allclose(host(got).astype(np.float64), host(want), rtol=tol,
                                           atol=tol)
        dy = _random(cp, rng, (shape[0] * out_hw[0] * out_hw[1], filters), dtype)
        want, want_bias = ops.conv_weight_grad(std.xp, std, x.astype(cp.float64),
                                               dy.astype(cp.float64), kernel, strides, pads,
                                               out_hw, Workspace(), "k", None,
                                               with_bias=True)
        for with_bias in (False, True):
            got, got_bias = conv.conv2d_weight_grad(x, dy, kernel, strides, pads, out_hw,
                                                    with_bias)
            assert got.dtype == (cp.float32 if dtype in HALVES else x.dtype)
            scale = float(cp.abs(want).max())
            np.testing.assert_allclose(host(got) / scale, host(want) / scale, atol=grad_tol)
            if with_bias:
                assert got_bias.dtype == got.dtype
                scale = float(cp.abs(want_bias).max())
                np.testing.assert_allclose(host(got_bias) / scale, host(want_bias) / scale,
                                           atol=grad_tol)
            else:
                assert got_bias is None
    finally:
        conv.set_algorithm("tiled")
        conv.tf32 = False


@pytest.mark.parametrize("case", CONV_INPUT_GRAD)
@pytest.mark.parametrize("dtype", [*DTYPES, "float64"])
def test_strided_convolution_input_gradients_match_col2im(cp, kernels, rng, case, dtype):
    """The hand-written input gradient of strided and over-padded convolutions (one gather
    launch, the kernel read in place) against the standard im2col + matmul + col2im one in
    float64 from the same rounded values."""
    from xpcnn.ops import cuda_conv
    from xpcnn.ops.convolution import ConvGeometry, KernelsConv

    kernel, strides, shape, filters, pads = case
    fast, std = kernels
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    geometry = ConvGeometry(shape[1:3], shape[3], filters, kernel, strides, pads, out_hw)
    w = _random(cp, rng, (filters, *kernel, shape[3]), dtype)
    dy = _random(cp, rng, (shape[0], *out_hw, filters), dtype)
    want = host(KernelsConv(geometry, std).input_grad(dy.astype(cp.float64),
                                                      w.astype(cp.float64)))
    got = cuda_conv.HandWrittenConv(geometry, fast).input_grad(dy, w)
    assert got.shape == shape and got.dtype == dy.dtype
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(host(got).astype(np.float64), want, rtol=tol,
                               atol=tol * np.abs(want).max())


def fast_float32(conv, *args):
    """``conv.conv2d`` on the CUDA cores (TF32 off for this call)."""
    old, conv.tf32 = conv.tf32, False
    try:
        return conv.conv2d(*args)
    finally:
        conv.tf32 = old


@pytest.mark.parametrize("dtype", [
    pytest.param("float16", marks=needs_capability(70, "float16 tensor cores")),
    pytest.param("float32", marks=needs_capability(80, "TF32 tensor cores"))])
def test_tensor_core_kernels_compile_here(kernels, dtype):
    """On a GPU with tensor cores the float16 (and TF32) tiled kernels compile, rather than
    falling back with a warning to the slower kernels."""
    from xpcnn.ops import cuda_conv

    conv = kernels[0].conv_kernels
    conv.tf32 = dtype == "float32"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for name, source in (("xpcnn_conv_tiled", cuda_conv._CONV_TILED_SOURCE),
                                 ("xpcnn_conv_weight_grad_tiled",
                                  cuda_conv._CONV_WEIGHT_GRAD_TILED_SOURCE)):
                kernel = conv._tiled_for(name, source, np.dtype(dtype))
                assert kernel is not None
                assert kernel is cuda_conv._TILED[(name, dtype, dtype == "float32")]
    finally:
        conv.tf32 = False


# (N, H, W, C): the notebook's first FeatureNorm at batch 128; 224 x 224 rows (a loop of 98
# over them a thread); one channel, 65 (three chunks of 32, the last of one), 1 row.
@pytest.mark.parametrize("shape", [(128, 30, 30, 32), (2, 224, 224, 3), (16, 9, 7, 1),
                                   (4, 7, 7, 65), (3, 1, 1, 64)])
@pytest.mark.parametrize("dtype", [*DTYPES, "float64"])
def test_feature_norm_and_its_gradient(cp, kernels, rng, shape, dtype):
    """FeatureNorm in one launch each way (a block per image and 32 channels), backward
    recomputing xhat from the input and forward's statistics (in the accumulator type): at
    least as close to the exact values as the standard version's CuPy reductions are (or
    within four units of the last place: twice the emulator's bound, for NVRTC's
    multiply-adds), the same bits at a second call."""
    fast, std = kernels
    acc = "float64" if dtype == "float64" else "float32"
    # (and mixed precision's: a float16 input and gradient, computed in float32, the output
    # and the input's gradient in float16)
    for io in [dtype, "float16"] if dtype == "float32" else [dtype]:
        eps = 4 * np.finfo(dtype).eps
        x = _random(cp, rng, shape, io) * 3 + 1
        got, want = (k.feature_norm(x, 1e-5, cp.dtype(dtype), cp.dtype(io)) for k in (fast, std))
        for g, again in zip(got, fast.feature_norm(x, 1e-5, cp.dtype(dtype), cp.dtype(io)),
                            strict=True):
            cp.testing.assert_array_equal(g, again)
        x64 = host(x).astype(np.longdouble)
        mean64 = x64.mean(axis=(1, 2), keepdims=True)
        centred = x64 - mean64
        inv64 = 1 / np.sqrt((centred * centred).mean(axis=(1, 2), keepdims=True) + 1e-5)
        xhat64 = centred * inv64
        for g, w, t, exact in zip(got, want, (io, acc, acc), (xhat64, mean64, inv64),
                                  strict=True):
            assert g.dtype == t and g.shape == w.shape
            scale = max(1.0, float(np.max(np.abs(exact))))
            error_fast, error_std = (float(np.max(np.abs(host(a) - exact))) / scale
                                     for a in (g, w))
            assert error_fast <= max(error_std, eps, np.finfo(g.dtype).eps)
        dy = _random(cp, rng, x.shape, io)
        g64 = host(dy).astype(np.longdouble)
        exact = inv64 * (g64 - g64.mean(axis=(1, 2), keepdims=True)
                         - xhat64 * (g64 * xhat64).mean(axis=(1, 2), keepdims=True))
        scale = float(np.max(np.abs(inv64)) * np.max(np.abs(g64)))
        for relu in (False, True):  # (with it, the gradient only where x > 0)
            g, w = (k.feature_norm_backward(dy, x, *stats[1:], relu)
                    for k, stats in ((fast, got), (std, want)))
            assert g.dtype == w.dtype == io
            cp.testing.assert_array_equal(g, fast.feature_norm_backward(dy, x, *got[1:], relu))
            e = exact * (host(x) > 0) if relu else exact
            error_fast, error_std = (float(np.max(np.abs(host(a) - e))) / scale
                                     for a in (g, w))
            assert error_fast <= max(error_std, eps, np.finfo(io).eps)


def _batch_norm_errors(got, want, exact, scales=None):
    """Each pair's largest error from ``exact`` (long double, on the host), relative to its
    scale in ``scales`` (by default the larger of 1 and its largest value): [(the fast
    kernels', the standard version's)]."""
    errors = []
    for g, w, e, scale in zip(got, want, exact, scales or [None] * len(exact), strict=True):
        assert g.shape == w.shape == e.shape
        scale = max(1.0, float(np.max(np.abs(e)))) if scale is None else scale
        errors.append(tuple(float(np.max(np.abs(host(a).astype(np.longdouble) - e))) / scale
                            for a in (g, w)))
    return errors


# (N, H, W, C) and (N, features): a ResNet's first BatchNorm at batch 128 (32 x 32 x 16);
# 524,288 rows (512 blocks); one channel; 65 (three chunks of 32); one row; a Dense's 33.
@pytest.mark.parametrize("shape", [(128, 32, 32, 16), (512, 32, 32, 8), (16, 9, 7, 1),
                                   (4, 7, 7, 65), (1, 1, 1, 64), (64, 33)])
# (the parameters' and statistics' dtype, the input's, output's and input gradient's: float16
# under mixed precision)
@pytest.mark.parametrize("dtype, io", [("float32", "float32"), ("float16", "float16"),
                                       ("float64", "float64"), ("float32", "float16")])
@pytest.mark.parametrize("relu", [False, True], ids=["alone", "relu-fused"])
def test_batch_norm_in_two_launches_each_way(cp, kernels, rng, shape, dtype, io, relu):
    """BatchNorm2D's training step (the batch's statistics, the running ones updated in place,
    the gradients through the statistics, with the ReLU after it fused or not): the output
    and input gradient in ``io``, at least as close to the exact values as the standard
    version's CuPy reductions are (or within four units of the last place), the same bits at
    a second call and replayed from a CUDA graph; the fused ReLU's gradient that of the
    gradient masked where z is > 0, bit for bit (z in the accumulator type: rounded to float16,
    a tiny positive z may become 0)."""
    fast, std = kernels
    c, axes = shape[-1], tuple(range(len(shape) - 1))
    eps = 4 * np.finfo(dtype).eps
    x = _random(cp, rng, shape, io) * 3 + 1
    gamma, beta, mean0 = (_random(cp, rng, (c,), dtype) for _ in range(3))
    var0 = cp.abs(_random(cp, rng, (c,), dtype)) + 0.5
    running = [(mean0.copy(), var0.copy()) for _ in range(3)]
    got = fast.batch_norm_train(x, gamma, beta, *running[0], 0.1, 1e-5, io, relu)
    want = std.batch_norm_train(x, gamma, beta, *running[1], 0.1, 1e-5, io, relu)
    again = fast.batch_norm_train(x, gamma, beta, *running[2], 0.1, 1e-5, io, relu)
    assert got[0].dtype == want[0].dtype == io
    for g, a in zip([*got, *running[0]], [*again, *running[2]], strict=True):
        _equal(g, a)
    x64, g64, b64, m64, v64 = (host(a).astype(np.longdouble)
                               for a in (x, gamma, beta, mean0, var0))
    count = x64.size // c
    mean = x64.mean(axis=axes)
    var = ((x64 - mean) ** 2).mean(axis=axes)
    inv64 = 1 / np.sqrt(var + 1e-5)
    xhat64 = (x64 - mean) * inv64
    z64 = xhat64 * g64 + b64
    exact = (np.maximum(z64, 0) if relu else z64, mean, inv64, 0.9 * m64 + 0.1 * mean,
             0.9 * v64 + 0.1 * var * (count / max(count - 1, 1)))
    for error_fast, error_std in _batch_norm_errors([*got, *running[0]],
                                                    [*want, *running[1]], exact):
        assert error_fast <= max(error_std, eps)

    _, mean, inv_std = got
    dy = _random(cp, rng, shape, io)
    got = fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True)
    want = std.batch_norm_backward(dy, x, want[1], want[2], gamma, beta, relu, True)
    assert got[0].dtype == want[0].dtype == io
    for g, a in zip(got, fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu, True),
                    strict=True):
        _equal(g, a)
    if relu:
        acc = "float64" if dtype == "float64" else "float32"
        z = fast.batch_norm_train(x, gamma, beta, cp.zeros(c, dtype), cp.ones(c, dtype), 0.1,
                                  1e-5, acc, False)[0]
        masked = fast.batch_norm_backward(dy * (z > 0), x, mean, inv_std, gamma, beta, False,
                                          True)
        for g, a in zip(got, masked, strict=True):
            _equal(g, a)
    dz64 = host(dy).astype(np.longdouble) * ((z64 > 0) if relu else 1)
    exact = (g64 * inv64 * (dz64 - dz64.mean(axis=axes)
                            - xhat64 * (dz64 * xhat64).mean(axis=axes)),
             (dz64 * xhat64).sum(axis=axes), dz64.sum(axis=axes))
    # gamma's and beta's gradients are sums over the rows, and any order of float additions
    # errs by units of the last place of its partial sums, not of the total, which may be far
    # smaller: so their errors count against the sum of the terms' magnitudes, as
    # test_sum_rows_in_one_launch's do. (16 x 9 x 7 rows of one channel in float32: gamma's
    # gradient -5.70, from 1,008 terms whose magnitudes sum to about 640, summed by 8 lanes of
    # 126 rows and a tree over them, was 1.03-3.3x four units of -5.70's last place off; a
    # Kahan sum in each lane, tried, did not bring it under them.)
    sums = [None, max(1.0, float(np.max(np.abs(dz64 * xhat64).sum(axis=axes)))),
            max(1.0, float(np.max(np.abs(dz64).sum(axis=axes))))]
    for error_fast, error_std in _batch_norm_errors(got, want, exact, sums):
        assert error_fast <= max(error_std, eps)
    _replays_give(cp, lambda: fast.batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu,
                                                       True)[0], got[0])

    def forward():  # (from the same running statistics at every replay)
        return fast.batch_norm_train(x, gamma, beta, cp.zeros(c, dtype), cp.ones(c, dtype),
                                     0.1, 1e-5, io, relu)[0]

    _replays_give(cp, forward, forward())


@pytest.mark.parametrize("rows, cols", [(524288, 32), (131072, 64), (1031, 33), (1000, 10),
                                        (513, 128), (100, 32), (1, 5)])
@pytest.mark.parametrize("dtype", [*DTYPES, "float64"])
def test_sum_rows_in_one_launch(cp, kernels, rng, rows, cols, dtype):
    """Bias gradients in one launch (the last block sums the others' partials): the standard
    sum's dtype, its values to the accumulator's precision, close to a float64 sum of the same
    numbers, the same bits at every call (the counters back at 0 after each), and the same
    bits again replayed from a CUDA graph."""
    fast, std = kernels
    a = _random(cp, rng, (rows, cols), dtype)
    got, want = fast.sum_rows(a), std.sum_rows(a)
    assert got.dtype == want.dtype and got.shape == (cols,)
    exact = host(a.astype(cp.float64).sum(axis=0))
    scale = host(cp.abs(a.astype(cp.float64)).sum(axis=0))
    tol = 1e-13 if dtype == "float64" else 1e-6
    assert np.all(np.abs(host(got) - exact) <= tol * scale)
    assert np.all(np.abs(host(want) - exact) <= tol * scale)
    for _ in range(3):
        _equal(fast.sum_rows(a), got)
    _replays_give(cp, lambda: fast.sum_rows(a), got)


@pytest.mark.parametrize("rows, cols", [(524288, 32), (1031, 33), (100, 32)])
@pytest.mark.parametrize("dtype", [*DTYPES, "float64"])
def test_a_relu_gradient_and_its_bias_gradient_in_one_launch(cp, kernels, rng, rows, cols,
                                                             dtype):
    """relu_backward_sum_rows: the standard ReLU gradient bit for bit, and its column sums
    close to a float64 sum, the same bits at every call."""
    fast, std = kernels
    dy = _random(cp, rng, (rows, cols), dtype)
    y = cp.maximum(_random(cp, rng, (rows, cols), dtype), 0)
    masked, sums = fast.relu_backward_sum_rows(dy, y)
    want_masked, want_sums = std.relu_backward_sum_rows(dy, y)
    _equal(masked, want_masked)
    assert sums.dtype == want_sums.dtype and sums.shape == (cols,)
    exact = host(want_masked.astype(cp.float64).sum(axis=0))
    scale = host(cp.abs(want_masked.astype(cp.float64)).sum(axis=0))
    tol = 1e-13 if dtype == "float64" else 1e-6
    assert np.all(np.abs(host(sums) - exact) <= tol * scale)
    _equal(fast.relu_backward_sum_rows(dy, y)[1], sums)


@pytest.mark.parametrize("kernel, strides, shape", MAX_POOL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_and_its_gradient(cp, kernels, rng, kernel, strides, shape, dtype):
    fast, std = kernels
    x = _random(cp, rng, shape, dtype, levels=3)  # many ties: the first maximum must win
    out_hw = windows.output_size(shape[1:3], kernel, strides, (0, 0, 0, 0))
    y = fast.max_pool(x, kernel, strides, out_hw)
    _equal(y, std.max_pool(x, kernel, strides, out_hw))
    dy = _random(cp, rng, y.shape, dtype)
    got = fast.max_pool_backward(x, y, dy, kernel, strides, out_hw)
    _equal(got, std.max_pool_backward(x, y, dy, kernel, strides, out_hw))
    # each window passes its gradient exactly once
    np.testing.assert_allclose(float(got.astype(cp.float64).sum()),
                               float(dy.astype(cp.float64).sum()),
                               rtol=1e-6 if dtype == "float32" else 1e-2)
    # with the gradient of a ReLU before the pool
    _equal(fast.max_pool_backward(x, y, dy, kernel, strides, out_hw, True),
           std.max_pool_backward(x, y, dy, kernel, strides, out_hw, True))


@pytest.mark.parametrize("case", EVERY_MAX_POOL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_routes_an_infinite_gradient_to_the_first_maximum_only(cp, kernels, rng, case,
                                                                        dtype):
    """Inf and NaN output gradients where PyTorch puts them (the window's first maximum), no
    NaN spread over the window: both CUDA kernels and the standard version."""
    fast, std = kernels
    check_max_pool_of_nonfinite_gradients([std, fast], rng, *case, dtype, device=cp.asarray,
                                          host=host)


@pytest.mark.parametrize("case", POOL_PADDED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_max_and_average_pools_in_one_launch_each_way(cp, kernels, rng, case, dtype):
    """Max and average pools reading their padding in place and gathering their gradients per
    input element (overlapping windows too), and GlobalAvgPool2D's gradient written whole:
    the standard version's values on the padded input, bit for bit (ties to the first
    maximum)."""
    fast, std = kernels
    kernel, strides, shape, pads = case
    x = _random(cp, rng, shape, dtype, levels=3)
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    xpad = windows.pad(std.xp, x, pads, -np.inf)
    y, routes = fast.max_pool_train(x, kernel, strides, out_hw, pads)
    _equal(y, std.max_pool(xpad, kernel, strides, out_hw))
    dy = _random(cp, rng, y.shape, dtype)
    for relu_grad in (False, True):
        _equal(fast.max_pool_backward(routes, y, dy, kernel, strides, out_hw, relu_grad, pads),
               cp.ascontiguousarray(windows.unpad(
                   std.max_pool_backward(xpad, y, dy, kernel, strides, out_hw, relu_grad),
                   pads)))
    ones = np.ones((1, *shape[1:3], 1))
    counts = StandardKernels(np).avg_pool(ones, kernel, strides, out_hw, pads,
                                          np.ones((1, *out_hw, 1)))
    inv = cp.asarray((1.0 / counts).astype(np.float32))
    _equal(fast.avg_pool(x, kernel, strides, out_hw, pads, inv),
           std.avg_pool(x, kernel, strides, out_hw, pads, inv))
    _equal(fast.avg_pool_backward(dy, shape, kernel, strides, out_hw, pads, inv),
           cp.ascontiguousarray(std.avg_pool_backward(dy, shape, kernel, strides, out_hw, pads,
                                                      inv)))
    g = _random(cp, rng, (shape[0], shape[3]), dtype)
    got = fast.global_avg_pool_backward(g, shape)
    assert got.flags.c_contiguous
    _equal(got, cp.ascontiguousarray(std.global_avg_pool_backward(g, shape)))


@pytest.mark.parametrize("shape", [(128, 7, 7, 128), (2, 64, 64, 3)])
@pytest.mark.parametrize("dtype", [*DTYPES, "float64"])
def test_global_average_pooling(cp, kernels, rng, shape, dtype):
    """GlobalAvgPool2D's mean in one launch, summed in float32 (float64 for float64): within
    one rounding of the exact mean in float16 and bfloat16 (CuPy's own mean of bfloat16 is
    not relied on), within its sum's rounding in float32 and float64, as the standard
    version's."""
    fast, std = kernels
    x = _random(cp, rng, shape, dtype) + 1
    exact = host(x.astype(cp.float64)).mean(axis=(1, 2))
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-5, "float64": 1e-12}[dtype]
    for got in (fast.global_avg_pool(x), std.global_avg_pool(x)):
        assert got.dtype == x.dtype and got.shape == exact.shape
        np.testing.assert_allclose(host(got).astype(np.float64), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels(cp, kernels, rng, dtype):
    fast, std = kernels
    x = _random(cp, rng, (4, 5, 6, 7), dtype) * 4
    x[0, 0, 0, :3] = cp.asarray([0.0, 6.0, cp.nan], dtype=dtype)  # edges and NaN
    for cap in (None, 6.0, 0.0):  # (0: a ceiling, as Keras takes it, not "none")
        _equal(fast.relu(x, cap), std.relu(x, cap))
        y, m = fast.relu_with_mask(x, cap)
        y_ref, m_ref = std.relu_with_mask(x, cap)
        _equal(y, y_ref)
        _equal(m, m_ref)
    assert not cp.any(m) and int(cp.count_nonzero(y)) == 1  # (zeros; the NaN stays NaN)
    dy = _random(cp, rng, x.shape, dtype)
    _equal(fast.relu_backward(dy, x), std.relu_backward(dy, x))
    mask = x > 0.5
    _equal(fast.mask_multiply(dy, mask), std.mask_multiply(dy, mask))
    _equal(fast.mask_multiply(dy, mask[:1]), std.mask_multiply(dy, mask[:1]))  # broadcast
    _equal(fast.mask_multiply(dy, mask, 1.5, x), std.mask_multiply(dy, mask, 1.5, x))
    # a uint8 batch cast and scaled in one launch (a Rescaling first layer), as CuPy's cast
    # and its product by a Python number round it
    # (with an offset: the product rounded before the sum; stored in float16 too, as the
    # compute dtype of mixed precision)
    images = cp.asarray(rng.integers(0, 256, x.shape).astype("uint8"))
    for offset in (0.0, -0.3):
        for out in (cp.dtype(dtype), cp.dtype("float16")):
            got = fast.rescale(images, 1 / 255, offset, cp.dtype(dtype), out)
            assert got.dtype == out
            _equal(got, std.rescale(images, 1 / 255, offset, cp.dtype(dtype), out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_relu_kernels(cp, kernels, rng, dtype):
    check_add_relu(*kernels, rng, (64, 16, 16, 32), dtype, cp.asarray, host)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias, relu", [(True, True), (True, False), (False, True),
                                             (False, False)])
def test_matmul_with_bias_and_relu(cp, kernels, rng, dtype, with_bias, relu):
    fast, std = kernels
    a, b = _random(cp, rng, (300, 40), dtype), _random(cp, rng, (40, 24), dtype)
    bias = _random(cp, rng, (24,), dtype) if with_bias else None
    got, want = _poisoned(cp, (300, 24), dtype), _poisoned(cp, (300, 24), dtype)
    fast.matmul_into(a, b, got, bias, relu)
    std.matmul_into(a, b, want, bias, relu)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]  # (up to one rounding)
    np.testing.assert_allclose(host(got), host(want), rtol=tol, atol=tol)
    # into a block of rows of a larger output, as the chunked convolution does
    big = _poisoned(cp, (600, 24), dtype)
    fast.matmul_into(a, b, big[300:], bias, relu)
    _equal(big[300:], got)
    assert bool(cp.all(cp.isnan(big[:300])))


@pytest.mark.parametrize("rows, m, n", [(131072, 288, 32), (70001, 27, 16), (3000, 9, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_transposed_product_split_into_blocks(cp, kernels, rng, rows, m, n, dtype):
    """a^T @ b over many rows (a weight gradient) as a batched product of row blocks."""
    fast, _ = kernels
    a, b = _random(cp, rng, (rows, m), dtype), _random(cp, rng, (rows, n), dtype)
    got = fast.matmul_tn(a, b)
    want = a.astype(cp.float64).T @ b.astype(cp.float64)
    assert got.dtype == a.dtype
    err = float(cp.abs(got.astype(cp.float64) - want).max() / cp.abs(want).max())
    assert err < {"float32": 1e-5, "float16": 3e-3, "bfloat16": 5e-3}[dtype]


@pytest.mark.parametrize("rows, classes, smoothing, levels", SOFTMAX_CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy(cp, kernels, rng, rows, classes, smoothing, levels, dtype):
    """The loss runs in the parameters' dtype (float32 under mixed precision)."""
    fast, std = kernels
    z = _random(cp, rng, (rows, classes), dtype, levels)
    if not levels:
        z *= 30
    labels = cp.asarray(rng.integers(0, classes, rows))
    stats, grad = fast.softmax_cross_entropy(z, labels, smoothing)
    want_stats, want_grad = std.softmax_cross_entropy(z, labels, smoothing)
    assert stats.dtype == want_stats.dtype and stats.shape == (2,) and grad.dtype == z.dtype
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(host(stats[0]), host(want_stats[0]), rtol=tol, atol=tol)
    assert float(stats[1]) == float(want_stats[1])
    np.testing.assert_allclose(host(grad), host(want_grad), rtol=tol, atol=tol / rows)
    scaling = cp.asarray([2.0**15, 7.0], dtype=cp.float32)  # (the float16 loss scale's state)
    _, scaled = fast.softmax_cross_entropy(z, labels, smoothing, scaling)
    _equal(scaled, grad * scaling[0])
    # float16 logits (mixed precision) read by the kernel as their cast to ``dtype`` gives them,
    # their gradient given in float16 as its cast rounds it
    z16 = z.astype(cp.float16)
    got_stats, got_grad = fast.softmax_cross_entropy(z16, labels, smoothing, scaling, z.dtype)
    want_stats, want_grad = fast.softmax_cross_entropy(z16.astype(z.dtype), labels, smoothing,
                                                       scaling)
    assert got_grad.dtype == cp.float16 and got_stats.dtype == want_stats.dtype
    _equal(got_grad, want_grad.astype(cp.float16))
    np.testing.assert_allclose(host(got_stats[0]), host(want_stats[0]), rtol=tol, atol=tol)
    assert float(got_stats[1]) == float(want_stats[1])


@pytest.mark.parametrize("rows, classes, smoothing, levels", SOFTMAX_CROSS_ENTROPY)
@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_cross_entropy_with_class_weights(cp, kernels, rng, rows, classes, smoothing,
                                                  levels, one_hot):
    """fit's class weights looked up in the loss's kernel, times sample weights: the standard
    version's numbers; a label that is no class makes the loss and the count NaN."""
    fast, std = kernels
    z = _random(cp, rng, (rows, classes), "float32", levels)
    labels = rng.integers(0, classes, rows)
    y = cp.asarray(np.eye(classes, dtype=np.float32)[labels] if one_hot else labels)
    w = cp.asarray(rng.uniform(0.0, 3.0, rows).astype(np.float32))
    table = cp.asarray(rng.uniform(0.1, 3.0, classes).astype(np.float32))
    stats, grad = fast.softmax_cross_entropy(z, y, smoothing, None, None, w, table)
    want_stats, want_grad = std.softmax_cross_entropy(z, y, smoothing, None, None, w, table)
    np.testing.assert_allclose(host(stats[0]), host(want_stats[0]), rtol=1e-5, atol=1e-5)
    assert float(stats[1]) == float(want_stats[1])
    np.testing.assert_allclose(host(grad), host(want_grad), rtol=1e-5, atol=1e-5 / rows)
    if not one_hot:
        y[rows // 2] = classes
        assert np.isnan(host(fast.softmax_cross_entropy(z, y, smoothing, None, None, w,
                                                        table)[0])).all()


@pytest.mark.parametrize("rows, classes, smoothing, levels", SOFTMAX_CROSS_ENTROPY)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_in_one_launch(cp, kernels, rng, rows, classes, smoothing, levels, dtype):
    """A model's probabilities at inference (a row a thread, a row a warp), in the
    parameters' dtype, from logits of that dtype or float16/bfloat16 ones (mixed precision),
    as the standard version gives them from the logits' cast."""
    fast, std = kernels
    z = _random(cp, rng, (rows, classes), dtype, levels) * (1 if levels else 30)
    tol = 1e-6 if dtype == "float32" else 1e-14
    halves = [cp.float16] + ([np.dtype(ml_dtypes.bfloat16)] if HAS_BFLOAT16 else [])
    for logits in [z] + [z.astype(half) for half in halves]:
        got, want = fast.softmax(logits, z.dtype), std.softmax(logits, z.dtype)
        assert got.dtype == z.dtype
        np.testing.assert_allclose(host(got), host(want), rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("rows", [3, 700, 5000])
def test_softmax_cross_entropy_sums_its_rows_the_same_way_every_time(cp, kernels, rng, rows):
    """The rows' [loss, right] summed by the launch's last block: the same bits at every call
    (its counter back at 0 after each) and replayed from a CUDA graph."""
    fast, _ = kernels
    z = _random(cp, rng, (rows, 10), "float32") * 30
    labels = cp.asarray(rng.integers(0, 10, rows))
    stats, grad = fast.softmax_cross_entropy(z, labels, 0.1)
    for _ in range(3):
        again = fast.softmax_cross_entropy(z, labels, 0.1)
        _equal(again[0], stats)
        _equal(again[1], grad)
    _replays_give(cp, lambda: fast.softmax_cross_entropy(z, labels, 0.1)[0], stats)


def test_last_block_launches_of_different_grids_share_their_counters(cp, kernels, rng):
    """Back to back on one stream, no memset between: dropout (2,304 blocks), a draw (one
    block), a bias gradient (512 x 2 blocks: counters 0 and 1) and a loss (20 blocks), three
    times over. Each launch wraps its counters back to 0 for the next one whatever its grid:
    every result is the first round's (the draws the standard version's), and the counters
    are all 0 after each launch."""
    from xpcnn.ops import fast_cupy

    fast, std = kernels
    # (on the emulator grids of fewer blocks, 288 and 8 x 2: 18 s at the GPU's sizes)
    images, rows = (128, 524288) if REAL_GPU else (16, 8192)
    x = _random(cp, rng, (images, 12, 12, 64), "float32")
    a = _random(cp, rng, (rows, 40), "float32")
    z = _random(cp, rng, (5000, 10), "float32")
    labels = cp.asarray(rng.integers(0, 10, 5000))
    states = [cp.asarray([2**40 + 17, 5], dtype=cp.int64) for _ in range(2)]
    first = None
    for _ in range(3):
        results = []
        for launch in (lambda k, s: k.dropout(s, x, 0.25)[1],
                       lambda k, s: k.uniform(s, (3, 5), cp.float32),
                       lambda k, s: k.sum_rows(a) if k is fast else None,
                       lambda k, s: k.softmax_cross_entropy(z, labels, 0.1)[0]
                       if k is fast else None):
            got, want = (launch(k, s) for k, s in zip((fast, std), states, strict=True))
            cp.cuda.get_current_stream().synchronize()
            assert not fast_cupy._counters(x).any()
            if want is not None:
                _equal(got, want)
            results.append(got)
        if first is None:
            first = results
        for got, want in zip(results[2:], first[2:], strict=True):
            _equal(got, want)
    _equal(states[0], states[1])
    assert int(states[0][1]) == 5 + 6


@pytest.mark.parametrize("labels_dtype", ["uint8", "int32", "int64"])
def test_softmax_cross_entropy_is_nan_for_a_label_that_is_no_class(cp, kernels, rng,
                                                                   labels_dtype):
    """The kernel's ``nan("")`` line for each label dtype fit passes it: NaN for a label past
    the classes (and below 0 where the dtype has one), as in the standard version; a finite
    loss, the standard one, for labels that are all classes."""
    fast, std = kernels
    z = _random(cp, rng, (33, 7), "float32")
    labels = cp.asarray(rng.integers(0, 7, 33).astype(labels_dtype))
    stats, _ = fast.softmax_cross_entropy(z, labels, 0.0)
    assert float(stats[0]) == pytest.approx(float(std.softmax_cross_entropy(z, labels, 0.0)[0][0]),
                                            rel=1e-5)
    for bad in (7, 255) + ((-1,) if labels_dtype != "uint8" else ()):
        wrong = labels.copy()
        wrong[4] = bad
        for k in (fast, std):
            stats, grad = k.softmax_cross_entropy(z, wrong, 0.0)
            assert np.isnan(float(stats[0])) and bool(cp.isfinite(grad).all())


@pytest.mark.parametrize("classes", [10, 300])  # (a row a thread; a row a warp)
@pytest.mark.parametrize("targets_dtype", ["float32", "float16"])
def test_softmax_cross_entropy_of_one_hot_rows_and_sample_weights(cp, kernels, rng, classes,
                                                                  targets_dtype):
    """One-hot rows and sample weights in the fused launch: the standard version's loss,
    count and gradient; one-hot rows of weight 1 the integer labels' bits; NaN for a row
    that names no class, in both versions."""
    fast, std = kernels
    z = _random(cp, rng, (130, classes), "float32") * 30
    labels = rng.integers(0, classes, 130)
    y = cp.asarray(np.eye(classes, dtype=targets_dtype)[labels])
    w = cp.asarray(rng.uniform(0.0, 3.0, 130).astype(np.float32))
    stats, grad = fast.softmax_cross_entropy(z, y, 0.1, weights=w)
    want_stats, want_grad = std.softmax_cross_entropy(z, y, 0.1, weights=w)
    np.testing.assert_allclose(host(stats[0]), host(want_stats[0]), rtol=1e-5, atol=1e-5)
    assert float(stats[1]) == float(want_stats[1])
    np.testing.assert_allclose(host(grad), host(want_grad), rtol=1e-5, atol=3e-5 / 130)
    ones = cp.ones(130, dtype=cp.float32)
    for got, want in zip(fast.softmax_cross_entropy(z, y, 0.1, weights=ones),
                         fast.softmax_cross_entropy(z, cp.asarray(labels), 0.1), strict=True):
        _equal(got, want)
    wrong = y.copy()
    wrong[4] *= 0.5  # (a row that sums to 0.5)
    for k in (fast, std):
        stats, grad = k.softmax_cross_entropy(z, wrong, 0.1, weights=w)
        assert np.isnan(float(stats[0])) and bool(cp.isfinite(grad).all())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the emulator's)
@pytest.mark.parametrize("classes", [3, 100])
def test_numeric_edges_of_the_kernels_on_the_gpu(cp, kernels, rng, classes):
    """Cross-entropy with a non-target logit of -inf or one whose z - max overflows: finite,
    the standard version's (a +inf one: NaN); BatchNorm on one value a channel: the running
    statistics left bit for bit; the loss scale at 2**127 not doubled to infinity."""
    import array_api_compat.numpy as xn

    from xpcnn.ops.step_record import GROWTH_INTERVAL, cleared

    fast, std = kernels
    z = np.zeros((3, classes), np.float32)
    z[0, :3] = [-np.inf, 0.0, 1.0]
    z[1, :3] = [3e38, -3e38, 0.0]
    z[2, 1:] = -np.inf
    z, labels = cp.asarray(z), cp.asarray(np.array([2, 0, 0]))
    stats, grad = fast.softmax_cross_entropy(z, labels, 0.0)
    want_stats, want_grad = std.softmax_cross_entropy(z, labels, 0.0)
    assert np.isfinite(float(stats[0])) and bool(cp.isfinite(grad).all())
    np.testing.assert_allclose(host(stats), host(want_stats), rtol=1e-6)
    np.testing.assert_allclose(host(grad), host(want_grad), rtol=1e-6, atol=1e-7)
    z[0, 1] = np.inf
    assert np.isnan(float(fast.softmax_cross_entropy(z, labels, 0.0)[0][0]))
    x = _random(cp, rng, (1, 1, 1, 37), "float32")
    mean0 = rng.standard_normal(37).astype(np.float32)
    mean0[0] = -0.0
    running = cp.asarray(mean0), cp.ones(37, dtype=cp.float32)
    gamma, beta = cp.ones(37, dtype=cp.float32), cp.zeros(37, dtype=cp.float32)
    fast.batch_norm_train(x, gamma, beta, *running, 0.1, 1e-5, cp.float32, False)
    assert host(running[0]).tobytes() == mean0.tobytes()
    assert host(running[1]).tobytes() == np.ones(37, np.float32).tobytes()
    scaling = cp.asarray(np.array([2.0**127, GROWTH_INTERVAL - 1], np.float32))
    state = cp.asarray(np.array([0.0, 0.0, *cleared(1)]))
    fast.record_step(state, cp.asarray(np.array([0.5, 1.0], np.float32)),
                     [cp.ones(2, dtype=cp.float32)], 4.0, 1, scaling, False)
    want = np.array([2.0**127, GROWTH_INTERVAL - 1], np.float32)
    StandardKernels(xn).record_step(np.array([0.0, 0.0, *cleared(1)]),
                                    np.array([0.5, 1.0], np.float32), [np.ones(2, np.float32)],
                                    4.0, 1, want, False)
    np.testing.assert_array_equal(host(scaling), want)
    assert want[0] == 2.0**127 and want[1] == 0


@OPTIMISERS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_optimiser_updates(cp, kernels, rng, make, dtype):
    import array_api_compat.cupy as xc

    fast, _ = kernels
    params = [_random(cp, rng, s, dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for _ in range(4):
        grads = [_random(cp, rng, p.shape, dtype) for p in params]
        opt_fused.step(xc, fused, grads, fast)
        opt_std.step(xc, standard, grads)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for f, s in zip(fused, standard, strict=True):
        np.testing.assert_allclose(host(f), host(s), rtol=rtol, atol=rtol)
    for name, slots in opt_fused.slots.items():
        for f, s in zip(slots, opt_std.slots[name], strict=True):
            np.testing.assert_allclose(host(f), host(s), rtol=rtol, atol=rtol)


def _fit(device, net, fast=True, precision="float32", epochs=2, optimizer=None, metrics=None,
         **fit_kwargs):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 64)
    old = set_fast_path(fast)
    try:
        model = xpcnn.Sequential(net(), device=device, seed=0)
        # SGD: Adam would turn float rounding in near-zero gradients into whole steps
        model.compile(optimizer=optimizer or xpcnn.optim.SGD(0.05, momentum=0.9),
                      precision=precision, metrics=metrics)
        history = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, **fit_kwargs)
        probs = model.predict(x[:8])
    finally:
        set_fast_path(old)
    return model, history.history["loss"], probs


@pytest.fixture(params=[pytest.param("cudnn", marks=needs_cudnn), "tiled", "direct",
                        "direct-forward", "im2col"])
def conv_algorithm(request, kernels, monkeypatch):
    """cuDNN (in full float32: the comparisons are against float32 paths), then the
    algorithms of the hand-written CuPy kernels, with cuDNN turned off."""
    from xpcnn.ops import cudnn_conv

    conv = kernels[0].conv_kernels
    if request.param == "cudnn":
        monkeypatch.setenv("XPCNN_TF32", "0")
    else:
        monkeypatch.setattr(cudnn_conv, "load", lambda: None)
        conv.set_algorithm(request.param)
    yield request.param
    conv.set_algorithm("tiled")


def test_training_on_the_gpu_matches_the_standard_path_and_numpy(conv_algorithm):
    fast, loss_fast, p_fast = _fit("cuda", gap_net)
    std, loss_std, p_std = _fit("cuda", gap_net, fast=False)
    ref, loss_ref, p_ref = _fit("cpu", gap_net)
    assert loss_fast == pytest.approx(loss_std, rel=1e-5)
    assert loss_fast == pytest.approx(loss_ref, rel=1e-5)
    for a, b in zip(fast.get_weights(), std.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p_fast, p_ref, rtol=1e-4, atol=1e-6)
    assert isinstance(p_fast, np.ndarray)  # results come back to the host


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_a_frozen_trunk_keeps_nothing_for_backward_on_the_gpu(cp, functional, precision,
                                                               monkeypatch):
    """The layers before every trained one keep nothing from a training pass on the GPU's
    kernels too (in steps captured and replayed where a GPU can), and the model ends
    training as the same model whose trunk keeps what it did before, bit for bit (Dropout's
    draws, a frozen BatchNorm2D's running statistics: see test_backends)."""
    from test_backends import assert_trained_alike, train_frozen_trunk

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 40)
    lean, trunk = train_frozen_trunk("cuda", data, functional, monkeypatch,
                                     precision=precision)
    assert {layer.name: kept_for_backward(layer) for layer in trunk} == \
        {layer.name: [] for layer in trunk}
    keeping, trunk = train_frozen_trunk("cuda", data, functional, monkeypatch, keep_all=True,
                                        precision=precision)
    assert any(kept_for_backward(layer) for layer in trunk)
    assert_trained_alike(lean, keeping)
    if not EMULATED:  # (the emulator has no streams to capture on)
        assert lean.cuda_graphs_reason == "" and len(lean._graphs.graphs) == 1


def test_weighted_training_on_the_gpu_matches_numpy(cp, monkeypatch):
    """fit's sample weights (gathered on the device with each batch) and class weights (looked
    up from the labels in the loss's kernel), in steps captured and replayed where a GPU can, and
    evaluate's sample weights, against NumPy; in full float32."""
    monkeypatch.setenv("XPCNN_TF32", "0")
    w = np.random.default_rng(3).uniform(0.0, 2.0, 64)
    kwargs = dict(sample_weight=w, class_weight={3: 4.0, 7: 0.25},
                  validation_data=(np.zeros((8, 12, 12, 3), np.uint8), np.arange(8), w[:8]))
    gpu, loss_gpu, _ = _fit("cuda", gap_net, epochs=3, **kwargs)
    ref, loss_ref, _ = _fit("cpu", gap_net, epochs=3, **kwargs)
    assert loss_gpu == pytest.approx(loss_ref, rel=1e-5)
    assert gpu.history.history["val_loss"] == pytest.approx(ref.history.history["val_loss"],
                                                            rel=1e-5)
    for a, b in zip(gpu.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert gpu._class_weights is None
    if not EMULATED:  # (the emulator has no streams to capture on)
        assert gpu.cuda_graphs_reason == "" and len(gpu._graphs.graphs) == 1


@pytest.mark.parametrize("make", [
    lambda: xpcnn.optim.RMSprop(1e-3, momentum=0.9, centered=True),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, global_clipnorm=0.05),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, clipnorm=0.02),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, clipvalue=0.01)],  # (SGD: see _fit)
    ids=["rmsprop", "sgd-global-clipnorm", "sgd-clipnorm", "sgd-clipvalue"])
def test_rmsprop_and_clipping_on_the_gpu(cp, make, monkeypatch):
    """RMSprop (its fused update) and gradient clipping (inside the fused updates: per array,
    global, by value), with top-k metrics (their counts' kernel), in steps captured and
    replayed where a GPU can, against NumPy; in full float32."""
    monkeypatch.setenv("XPCNN_TF32", "0")
    def metrics():
        return ["accuracy", "sparse_top_k_categorical_accuracy",
                xpcnn.metrics.SparseTopKCategoricalAccuracy(k=2, name="top_2")]

    gpu, loss_gpu, _ = _fit("cuda", gap_net, epochs=3, optimizer=make(), metrics=metrics())
    ref, loss_ref, _ = _fit("cpu", gap_net, epochs=3, optimizer=make(), metrics=metrics())
    assert loss_gpu == pytest.approx(loss_ref, rel=1e-5)
    for name in ("sparse_top_k_categorical_accuracy", "top_2"):  # (a sample's share at most:
        # logits within rounding of NumPy's may order a near tie the other way)
        assert gpu.history.history[name] == pytest.approx(ref.history.history[name],
                                                          abs=1 / 64 + 1e-9)
    for a, b in zip(gpu.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if not EMULATED:  # (the emulator has no streams to capture on)
        assert gpu.cuda_graphs_reason == "" and len(gpu._graphs.graphs) == 1


def test_the_convolution_comparison_times_strided_input_gradients_both_ways(cp):
    """scripts/bench_gpu.py --conv-layers resnet20 (gpu_check.sh's extras): a row per distinct
    geometry (the repeated blocks' layers named with it), the stride-2 3x3 and 1x1 shortcut
    layers' input gradients timed through HandWrittenConv on the gather and, beside it, on
    im2col + cuBLAS; the algorithm set before is set again after."""
    import argparse

    from xpcnn.ops.fast_cupy import KERNELS

    path = list(sys.path)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    KERNELS.conv_kernels.set_algorithm("direct")  # (another than the comparison's own)
    try:
        import bench_gpu

        rows = bench_gpu.compare_conv_engines("resnet20", 2, "float32", argparse.Namespace(
            device="cuda" if REAL_GPU else "cpu", steps=1, warmup=0, gpu_conv="tiled"))
        assert KERNELS.conv_kernels.algorithm == "direct"
    finally:
        sys.path[:] = path
        KERNELS.conv_kernels.set_algorithm("tiled")
    assert sum(len(r["layers"]) for r in rows) == 21  # (19 3x3, two 1x1 shortcuts)
    assert len({r["geometry"] for r in rows}) == len(rows) < 21
    strided = [r for r in rows if " s(2, 2)" in r["geometry"]]
    assert {r["geometry"].split(" k")[1][:6] for r in strided} == {"(3, 3)", "(1, 1)"}
    for r in strided:
        assert r["input_grad"] == "gather"
        assert all(min(ms) > 0 for label, ms in r["ms"].items()
                   if label in ("hand-written", "hand-written im2col"))
        assert {"hand-written", "hand-written im2col"} <= set(r["ms"])
    assert all("hand-written im2col" not in r["ms"] for r in rows if r["input_grad"] != "gather")


def test_every_layer_trains_on_the_gpu_and_stays_there(cp):
    model, losses, probs = _fit("cuda:0", every_layer_net, epochs=3)
    assert all(np.isfinite(losses))
    for layer in model.layers:
        for a in (*layer.params.values(), *layer.state.values()):
            assert isinstance(a, cp.ndarray) and a.device.id == 0
    for slot in model.optimizer.slots.values():
        assert all(isinstance(a, cp.ndarray) for a in slot)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def _zero_ceiling_net():
    return [xpcnn.layers.Conv2D(4, 3), xpcnn.layers.ReLU(max_value=0), xpcnn.layers.Flatten(),
            xpcnn.layers.Dense(10)]


def test_a_relu_ceiling_of_zero_on_the_gpu(cp):
    """ReLU(max_value=0), as Keras takes it: zeros and a zero gradient on the GPU's kernels
    (0 a ceiling there, not "none"), the convolution before it never updated, as on NumPy."""
    gpu, loss_gpu, p_gpu = _fit("cuda", _zero_ceiling_net)
    ref, loss_ref, p_ref = _fit("cpu", _zero_ceiling_net)
    start = xpcnn.Sequential(_zero_ceiling_net(), seed=0)
    start.predict(np.zeros((1, 12, 12, 3), np.uint8))  # (built: its first weights)
    assert loss_gpu == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(p_gpu, p_ref, rtol=1e-5, atol=1e-7)
    assert np.ptp(p_gpu, axis=0).max() == 0  # (the Dense layer sees zeros: one output)
    for a, b in zip(gpu.layers[0].get_weights(), start.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["mixed_float16",
                                       pytest.param("mixed_bfloat16", marks=needs_bfloat16)])
def test_mixed_precision_on_the_gpu(conv_algorithm, precision):
    fast, loss_fast, _ = _fit("cuda", gap_net, precision=precision, epochs=3)
    std, loss_std, _ = _fit("cuda", gap_net, fast=False, precision=precision, epochs=3)
    assert fast.layers[1].compute_dtype == np.dtype(PRECISIONS[precision])
    assert all(np.isfinite(loss_fast)) and loss_fast[-1] < loss_fast[0]
    assert loss_fast == pytest.approx(loss_std, rel=2e-2)
    # float32 master weights, close to the standard path's (which rounds every half-precision
    # op; the CPU's emulated kernels stay within 0.1% of the largest weight on gap_net:
    # test_cuda_kernels_on_cpu.py), far closer than a skipped or stale update leaves them
    largest = max(float(np.abs(w).max()) for w in std.get_weights())
    for a, b in zip(fast.get_weights(), std.get_weights(), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * largest)


def test_the_loss_scale_halves_below_one_on_the_gpu(cp, kernels):
    """The fused record halves the scale below 1 down to float32's smallest normal, where an
    overflow is an error, as the standard one does; a float16 fit whose heavy sample weights
    overflow at a scale of 1 trains on there (steps skipped) to NumPy's weights."""
    fast, std = kernels
    floor = float(np.finfo(np.float32).smallest_normal)
    for scale, overflows in [(1.0, [True, True, False]), (4 * floor, [True, True, True]),
                             (1.5 * floor, [True, True])]:
        got = recorded_scales(fast, cp, scale, overflows, host)
        assert got == recorded_scales(std, cp, scale, overflows, host)
        assert min(got[0]) == (0.25 if scale == 1.0 else floor)
        assert got[2][-1] == (scale < 1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 2)).astype(np.float32), np.arange(8) % 4
    runs = []
    for device in ("cuda", "cpu"):
        model = xpcnn.Sequential([xpcnn.layers.Conv2D(8, 3), xpcnn.layers.ReLU(),
                                  xpcnn.layers.Flatten(), xpcnn.layers.Dense(4)],
                                 input_shape=(6, 6, 2), seed=0, device=device)
        model.compile(optimizer=xpcnn.optim.Adam(1e-3), precision="mixed_float16")
        model.loss_scale = 1.0
        model.fit(x, y, sample_weight=np.full(8, 1e6), batch_size=4, epochs=3, verbose=0,
                  shuffle=False)
        assert model.loss_scale == 0.125 and model.optimizer.iterations == 6
        runs.append(model.get_weights())
    # (Adam turns float16 rounding in near-zero gradients into whole steps: close, not equal)
    largest = max(float(np.abs(w).max()) for w in runs[1])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * largest)


def test_a_missing_gpu_index_is_a_clear_error(cp):
    count = cp.cuda.runtime.getDeviceCount()
    assert get_backend(f"cuda:{count - 1}").label == f"cuda:{count - 1}"
    with pytest.raises(DeviceError, match="does not exist"):
        get_backend(f"cuda:{count}")


def test_data_on_the_gpu_gives_the_weights_of_host_batches(cp, monkeypatch):
    """CuPy arrays, a NumPy set uploaded once (uint8) and one uploaded batch by batch: the same
    batches in the same order, so the same weights (with cuDNN's deterministic plans only)."""
    import xpcnn.data

    monkeypatch.setenv("XPCNN_DETERMINISTIC", "1")

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (44, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 44)

    def run(xs, ys):
        model = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
        model.fit(xs, ys, epochs=2, batch_size=8, verbose=0)
        return model.get_weights()

    on_device, uploaded = run(cp.asarray(x), cp.asarray(y)), run(x, y)
    monkeypatch.setattr(xpcnn.data.sources, "DEVICE_BUDGET_BYTES", 0)
    per_batch = run(x, y)
    for a, b, c in zip(on_device, uploaded, per_batch, strict=True):
        assert np.array_equal(a, b) and np.array_equal(b, c)


@OPTIMISERS
def test_a_gated_update_on_the_gpu_changes_nothing_where_the_flag_is_false(cp, kernels, make):
    """The update kernels read ``apply`` from device memory (no wait for the host)."""
    fast, _ = kernels
    rng = np.random.default_rng(0)
    params = [cp.asarray(rng.standard_normal(s).astype(np.float32)) for s in UPDATE_SHAPES]
    opt = make()
    grads = [cp.asarray(rng.standard_normal(p.shape).astype(np.float32)) for p in params]
    opt.step(cp, params, grads, fast, apply=cp.asarray(True))
    before = [p.copy() for p in params] + [s.copy() for v in opt.slots.values() for s in v]
    grads[1][0] = cp.nan
    opt.step(cp, params, grads, fast, apply=cp.asarray(False))
    after = params + [s for v in opt.slots.values() for s in v]
    assert all(bool(cp.array_equal(a, b)) for a, b in zip(before, after, strict=True))


@OPTIMISERS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_captured_fused_update_replays_as_the_standard_one(cp, kernels, make, dtype):
    """The fused update reading its step numbers from device arrays, captured in a CUDA graph
    (its table allocated in the capture, filled after it) and replayed with new gradients,
    numbers and flags in the same arrays: the standard step's values (to rounding:
    the GPU fuses multiply-adds), and a replay flagged False changes nothing. The captured
    step first fills and frees a scratch array of the table's size: were the table given that
    block, each replay would overwrite it with -1s before the update reads it."""
    import array_api_compat.cupy as xc

    from xpcnn.cuda_graphs import CupyCapture

    fast, _ = kernels
    rng = np.random.default_rng(0)
    params = [_random(cp, rng, s, dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    grads = [_random(cp, rng, p.shape, dtype) for p in params]  # the graph's static buffers
    apply = cp.asarray(True)

    def device_scalars(opt):  # (as StepGraphs fills them)
        return {k: cp.asarray(v, dtype=cp.float64 if k in opt.exact_scalars else dtype)
                for k, v in opt.step_scalars().items()}

    scalars = device_scalars(opt_fused)
    for opt, ps, fast_or_none in ((opt_fused, fused, fast), (opt_std, standard, None)):
        opt.step(xc, ps, grads, fast_or_none, apply, device_scalars(opt))  # warm-up
        opt.iterations += 1
    def captured_step():
        scratch = cp.empty(64, cp.int64)  # (512 bytes: the pool's smallest block, the table's)
        scratch.fill(-1)
        del scratch
        opt_fused.step(xc, fused, grads, fast, apply, scalars)

    capture = CupyCapture()
    with capture.scope(), fast.capture_tables() as tables:
        graph, _ = capture.capture(captured_step)
    assert len(tables) == 1  # one dtype: one launch, one table
    for gate in (True, False, True):
        for g in grads:
            g[...] = _random(cp, rng, g.shape, dtype)
        if not gate:
            grads[1][0] = cp.nan
        apply[...] = gate
        for k, v in opt_fused.step_scalars().items():
            scalars[k][...] = v
        before = [a.copy() for a in fused] + [a.copy() for v in opt_fused.slots.values()
                                              for a in v]
        capture.launch(graph)
        opt_std.step(xc, standard, grads, apply=apply, scalars=device_scalars(opt_std))
        for opt in (opt_fused, opt_std):
            opt.iterations += 1
        if not gate:
            after = fused + [a for v in opt_fused.slots.values() for a in v]
            assert all(bool(cp.array_equal(a, b)) for a, b in zip(after, before, strict=True))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for f, s in zip(fused, standard, strict=True):
        np.testing.assert_allclose(host(f), host(s), rtol=rtol, atol=rtol)
    for name, slots in opt_std.slots.items():
        for f, s in zip(opt_fused.slots[name], slots, strict=True):
            np.testing.assert_allclose(host(f), host(s), rtol=rtol, atol=rtol)


# -- cuDNN (xpcnn.ops.cudnn_conv) and CUDA graphs (xpcnn.cuda_graphs) -----------------------------


@pytest.fixture
def cudnn_module():
    from xpcnn.ops import cudnn_conv

    cudnn = cudnn_conv.load()
    assert cudnn is not None  # (the tests that take this fixture are marked needs_cudnn)
    return cudnn_conv, cudnn


# The error of a cuDNN result against the standard engine in float64, relative to the largest
# value, per (dtype, TF32): full float32, TF32 (PyTorch's default for convolutions), float16.
CUDNN_TOL = {("float32", False): 1e-5, ("float32", True): 3e-3, ("float16", False): 2e-2,
             ("bfloat16", False): 2e-2, ("float64", False): 1e-12}


def _cudnn_case(cp, cudnn_module, rng, case, dtype, n):
    """Geometry ``case`` with the cuDNN engine and the standard one on CuPy: (geometry, cuDNN
    engine, standard engine, random (x, w, bias, dy) for ``n`` images in ``dtype``, the same
    in float64)."""
    import array_api_compat.cupy as xc

    from xpcnn.ops.convolution import ConvGeometry, KernelsConv

    cudnn_conv, cudnn = cudnn_module
    g = ConvGeometry.of(*case)
    engine = cudnn_conv.CudnnConv(g, cudnn, KernelsConv(g, StandardKernels(xc)))
    data = (_random(cp, rng, (n, *g.in_hw, g.channels), dtype),
            _random(cp, rng, (g.filters, *g.kernel, g.channels), dtype),
            _random(cp, rng, (g.filters,), dtype),
            _random(cp, rng, (n, *g.out_hw, g.filters), dtype))
    return (g, engine, KernelsConv(g, StandardKernels(xc)), data,
            [a.astype(cp.float64) for a in data])


@needs_cudnn
@pytest.mark.parametrize("case", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("dtype, tf32", [("float32", False), ("float32", True),
                                         ("float16", False), ("float64", False)])
def test_cudnn_matches_the_standard_path(cp, cudnn_module, monkeypatch, rng, case, dtype, tf32):
    """cuDNN's forward (with and without bias and ReLU), input gradient and kernel gradient
    against the standard Array API engine in float64, in every dtype: full float32, TF32
    (PyTorch's default for convolutions), float16 and float64; and it ran (no fallback)."""
    monkeypatch.setenv("XPCNN_TF32", "1" if tf32 else "0")
    # The heuristics' first plans (timing up to ten plans for each of 216 graphs would take
    # minutes of a lent GPU): the next test checks every plan the timing may choose.
    monkeypatch.setenv("XPCNN_CUDNN_AUTOTUNE", "0")
    g, engine, standard, (x, w, bias, dy), f64 = _cudnn_case(cp, cudnn_module, rng, case, dtype,
                                                             5)
    tol = CUDNN_TOL[dtype, tf32]

    def close(got, want):
        assert got.dtype == x.dtype
        scale = max(float(cp.abs(want).max()), 1e-30)
        np.testing.assert_allclose(host(got).astype(np.float64) / scale, host(want) / scale,
                                   atol=tol)

    for b, b64 in ((bias, f64[2]), (None, None)):
        for relu in (False, True):
            close(engine.forward(x, w, b, relu), standard.forward(f64[0], f64[1], b64, relu))
    close(engine.input_grad(dy, w), standard.input_grad(f64[3], f64[1]))
    dw, db = engine.weight_grad(x, dy, True)
    want_dw, want_db = standard.weight_grad(f64[0], f64[3], True)
    close(dw, want_dw)
    np.testing.assert_allclose(host(db) / float(cp.abs(want_db).max()),
                               host(want_db) / float(cp.abs(want_db).max()), atol=tol)
    # cuDNN ran them all, not the fallback (float64 channels-last may have no cuDNN engine)
    assert dtype == "float64" or all(p is not None for p in engine._plans.values())


@needs_cudnn
@pytest.mark.parametrize("case", [GEOMETRIES[0], GEOMETRIES[2]], ids=[GEOMETRY_IDS[0],
                                                                     GEOMETRY_IDS[2]])
@pytest.mark.parametrize("dtype, tf32", [("float32", True), ("float32", False),
                                         ("float16", False),
                                         pytest.param("bfloat16", False, marks=needs_bfloat16)])
def test_every_cudnn_plan_autotuning_may_choose_gives_the_standard_numbers(
        cp, cudnn_module, rng, case, dtype, tf32):
    """Each candidate plan of the forward (+ bias and ReLU), input-gradient and kernel-gradient
    graphs, run by index as the timing runs them, against the standard engine in float64; then
    the graph's first run (which times them and keeps one) gives the same numbers."""
    cudnn_conv, cudnn = cudnn_module
    n = 6
    g, engine, standard, (x, w, bias, dy), f64 = _cudnn_case(cp, cudnn_module, rng, case, dtype,
                                                             n)
    tol = CUDNN_TOL[dtype, tf32]
    cases = [
        (engine._fprop(n, True, True), {"x": x, "w": w, "bias": bias}, "y",
         (n, *g.out_hw, g.filters), standard.forward(f64[0], f64[1], f64[2], True)),
        (engine._dgrad(n), {"dy": dy, "w": w}, "dx", (n, *g.in_hw, g.channels),
         standard.input_grad(f64[3], f64[1])),
        (engine._wgrad(n), {"x": x, "dy": dy}, "dw", (g.filters, *g.kernel, g.channels),
         standard.weight_grad(f64[0], f64[3], False)[0])]
    for make, inputs, output, shape, want in cases:
        plan = cudnn_conv.build_plan(cudnn, x.dtype, make, tf32, deterministic=False,
                                     autotune=True)
        out = cp.empty(shape, x.dtype)
        pack = {plan.tensors[k]: a.data.ptr for k, a in {**inputs, output: out}.items()}
        scale = max(float(cp.abs(want).max()), 1e-30)
        for index, size in plan.candidates:
            out.fill(cp.nan)
            workspace = cp.empty(size, cp.uint8)
            plan.graph.execute_plan_at_index(pack, workspace.data.ptr, index=index,
                                             handle=cudnn_conv._handle(cudnn))
            np.testing.assert_allclose(host(out).astype(np.float64) / scale,
                                       host(want) / scale, atol=tol,
                                       err_msg=f"{output}, plan {index}")
        out.fill(cp.nan)
        plan.run(**inputs, **{output: out})
        assert plan.candidates == []  # (timed, and one kept)
        np.testing.assert_allclose(host(out).astype(np.float64) / scale, host(want) / scale,
                                   atol=tol, err_msg=f"{output}, the plan kept")


@needs_cudnn
@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_matmul_graphs(cp, cudnn_module, monkeypatch, rng, dtype):
    cudnn_conv, cudnn = cudnn_module
    monkeypatch.delenv("CUPY_TF32", raising=False)  # full float32, as CuPy's own matmuls
    matmul = cudnn_conv.CudnnMatmul(cudnn)
    a, b = _random(cp, rng, (300, 40), dtype), _random(cp, rng, (40, 24), dtype)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for ta, tb in ((False, False), (True, False), (False, True)):
        left = cp.ascontiguousarray(a.T) if ta else a
        right = cp.ascontiguousarray(b.T) if tb else b
        got = matmul(left, right, ta, tb)
        want = a.astype(cp.float64) @ b.astype(cp.float64)
        np.testing.assert_allclose(host(got) / float(abs(want).max()),
                                   host(want) / float(abs(want).max()), atol=tol)
@needs_cudnn
@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_matmul_with_its_bias_and_relu(cp, cudnn_module, monkeypatch, rng, dtype):
    """A Dense forward's graph under capture: the product, its bias and its ReLU in one graph,
    right to the dtype's rounding; or, where cuDNN has no plan for that graph, None with the
    one-line warning (the kernels then add them after the product)."""
    import warnings

    cudnn_conv, cudnn = cudnn_module
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.setattr(cudnn_conv, "_WARNED", set())  # (each warning said here again)
    matmul = cudnn_conv.CudnnMatmul(cudnn)
    a, b = _random(cp, rng, (300, 40), dtype), _random(cp, rng, (40, 24), dtype)
    bias = _random(cp, rng, (24,), dtype)
    for with_bias, relu in ((True, True), (True, False), (False, True)):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = matmul.with_bias_relu(a, b, bias if with_bias else None, relu)
        want = a.astype(cp.float64) @ b.astype(cp.float64)
        if with_bias:
            want += bias.astype(cp.float64)
        if relu:
            want = cp.maximum(want, 0.0)
        if got is None:
            assert any("in the same graph" in str(w.message) for w in said), said
            continue
        scale = float(abs(want).max())
        np.testing.assert_allclose(host(got) / scale, host(want) / scale,
                                   atol=1e-5 if dtype == "float32" else 1e-2)


@needs_cudnn
def test_a_cudnn_graph_is_captured_and_replayed(cp, cudnn_module, rng):
    """A frontend graph executed inside CuPy's stream capture, replayed on new data."""
    cudnn_conv, cudnn = cudnn_module
    from xpcnn.ops.convolution import ConvGeometry, KernelsConv

    g = ConvGeometry.of((16, 16, 8), 8, (3, 3), (1, 1), "same")
    engine = cudnn_conv.CudnnConv(g, cudnn, KernelsConv(g, StandardKernels(xc_namespace())))
    x = _random(cp, rng, (4, 16, 16, 8), "float32")
    w = _random(cp, rng, (8, 3, 3, 8), "float32")
    engine.forward(x, w, None, True)  # builds the plan outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    static = x.copy()
    with stream:
        # (as xpcnn.cuda_graphs does: cudnnSetStream queries the stream, outside the capture)
        cudnn_conv.use_current_stream()
        stream.begin_capture()
        y = engine.forward(static, w, None, True)
        graph = stream.end_capture()
    x2 = _random(cp, rng, x.shape, "float32")
    static[...] = x2
    graph.launch(stream=stream)
    stream.synchronize()
    _equal(y, engine.forward(x2, w, None, True))


def xc_namespace():
    import array_api_compat.cupy as xc

    return xc


def _eager_and_graphed_fits(monkeypatch, net, make_optimizer, precision="float32"):
    """The same 5-epoch fit of 72 images in batches of 16 (the last of each epoch short: a
    shape of its own, warmed up in the first two epochs, captured in the third and replayed
    in the fourth and fifth, between full batches' replays) without and with CUDA graphs,
    all in full float32 (cuDNN's matmuls in the graphs and cuBLAS's outside): [(model, its
    losses)] for each."""
    monkeypatch.setenv("XPCNN_TF32", "0")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (72, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 72)
    results = []
    for graphs in (False, True):
        model = xpcnn.Sequential(net(), device="cuda", seed=0)
        model.compile(optimizer=make_optimizer(), precision=precision, cuda_graphs=graphs)
        history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
        results.append((model, history.history["loss"]))
    return results


@pytest.mark.parametrize("make_optimizer, precision, tol", [
    (lambda: xpcnn.optim.SGD(xpcnn.optim.StepDecay(0.05, 3, 0.5), momentum=0.9), "float32",
     1e-3),
    (lambda: xpcnn.optim.Adam(xpcnn.optim.CosineDecay(2e-3, 10)), "float32", 1e-3),
    (lambda: xpcnn.optim.SGD(0.05, momentum=0.9), "mixed_float16", 2e-2),
])
@needs_cudnn
def test_replayed_steps_give_the_weights_of_eager_steps(cudnn_module, monkeypatch,
                                                        make_optimizer, precision, tol):
    """A fit whose steps are captured and replayed (the last, smaller batch of each epoch in a
    graph of its own, sharing the first graph's memory pool) against the same fit without
    graphs: the same weights, to rounding (cuDNN's matmuls in the graphs and cuBLAS's
    outside both in full float32; mixed float16 with its loss scale on the device)."""
    (eager, loss_eager), (graphed, loss_graphed) = _eager_and_graphed_fits(
        monkeypatch, gap_net, make_optimizer, precision)
    assert graphed.cuda_graphs_reason == ""
    assert [shape[0][0] for shape in graphed._graphs.graphs] == [16, 8]
    # (BatchNorm2D's statistics kept and put back, the update and the gradients' check, and
    # under mixed float16 the two casts: each reading a table filled after the capture;
    # test_cuda_kernels_on_cpu counts them)
    assert [len(g.tables) for g in graphed._graphs.graphs.values()] == \
        [GAP_NET_STEP_TABLES[precision]] * 2
    assert graphed.optimizer.iterations == eager.optimizer.iterations == 25
    assert loss_graphed == pytest.approx(loss_eager, rel=tol / 10)
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol / 100)


@needs_cudnn
def test_models_with_random_layers_are_captured_and_replay_their_draws(cudnn_module,
                                                                      monkeypatch):
    """Every layer type, random ones included, captured and replayed: the draws counted on
    the device give each replay the masks, flips and crops an eager step gets."""
    (eager, _), (graphed, _) = _eager_and_graphed_fits(
        monkeypatch, every_layer_net, lambda: xpcnn.optim.SGD(0.05, momentum=0.9))
    assert graphed.cuda_graphs_reason == "" and len(graphed._graphs.graphs) == 2
    assert [la.calls for la in graphed.layers if hasattr(la, "random_state")] == \
        [la.calls for la in eager.layers if hasattr(la, "random_state")] == [25, 25, 25]
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_random_numbers_kernel_is_the_definition(cp, kernels, dtype):
    """The numbers, and the draw counted by the last of the launch's blocks (as dropout's)."""
    fast, std = kernels
    dtype = getattr(cp, dtype)
    states = [cp.asarray([2**40 + 17, 123], dtype=cp.int64) for _ in range(2)]
    for shape, first in (((1000, 37), 0), ((3, 5), 2**33 + 1), ((128, 12, 12, 64), 0)):
        _equal(*(k.uniform(s, shape, dtype, first)
                 for k, s in zip((fast, std), states, strict=True)))
    assert [host(s).tolist() for s in states] == [[2**40 + 17, 126]] * 2


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dropout_kernel_is_the_standard_dropout(cp, kernels, rng, dtype):
    """One launch: the draw, the mask and the scaled output, and the draw counted by the last
    of its thousands of blocks (every block read the draw before it: the same numbers as the
    standard version's, draw after draw); and the gradient's scaled mask."""
    fast, std = kernels
    state = cp.asarray([2**40 + 17, 123], dtype=cp.int64)
    states = [state.copy(), state.copy()]
    for shape, first, rate in (((128, 9216), 0, 0.25), ((3, 5, 7), 2**33 + 1, 0.5),
                               ((128, 12, 12, 64), 0, 0.25), ((128, 12, 12, 64), 0, 0.25)):
        x = _random(cp, rng, shape, dtype)
        (y, keep), (y_want, keep_want) = (k.dropout(s, x, rate, first)
                                          for k, s in zip((fast, std), states, strict=True))
        _equal(keep, keep_want)
        _equal(y, y_want)
        _equal(states[0], states[1])
        _equal(fast.mask_multiply(x, keep, 2.0), std.mask_multiply(x, keep, 2.0))
    assert host(states[0]).tolist() == [2**40 + 17, 127]


def test_casting_many_arrays_in_one_launch_on_the_gpu(cp, kernels, rng):
    fast, std = kernels
    arrays = [_random(cp, rng, s, "float32") for s in [(3, 3, 4, 8), (8,), (0,), (9216, 128)]]
    arrays.append(cp.asarray([65519.0, 65520.0, 1e-8, np.nan], dtype=cp.float32))
    for got, want in zip(fast.cast_all(arrays, cp.dtype(cp.float16)),
                         std.cast_all(arrays, cp.float16), strict=True):
        assert got.dtype == want.dtype == cp.float16
        _equal(got, want)


def test_statistics_kept_and_put_back_on_the_gpu(cp, kernels, rng):
    """Normalisation statistics of every float dtype (a 0-d one, bytes no multiple of 8,
    NaN and -0.0 among them) kept, moved and put back where the step is skipped: the standard
    version's bits, the flag read from the device."""
    fast, std = kernels
    shapes = [((64,), cp.float32), ((3,), cp.float16), ((), cp.float64), ((2, 7), cp.float64)]
    arrays = [cp.asarray(rng.standard_normal(s)).astype(t) for s, t in shapes]
    arrays[0][:2] = cp.asarray([np.nan, -0.0])
    pair = [[a.copy() for a in arrays], [a.copy() for a in arrays]]
    for gate in (True, False):
        kept = [k.snapshot_state(a) for k, a in zip(kernels, pair, strict=True)]
        before = [host(a).tobytes() for a in pair[1]]
        moved = [cp.asarray(rng.standard_normal(a.shape)).astype(a.dtype) for a in arrays]
        for ours in pair:
            for a, m in zip(ours, moved, strict=True):
                a[...] = m
        apply = cp.asarray(gate)
        fast.restore_state(pair[0], kept[0], apply)
        std.restore_state(pair[1], kept[1], apply)
        got, want = ([host(a).tobytes() for a in ours] for ours in pair)
        assert got == want == (before if not gate else [host(m).tobytes() for m in moved])


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_random_crop_and_flip_kernels_are_the_standard_ones(cp, kernels, rng, dtype):
    """Each in one launch, the draw included (counted in its own copy of a state), the images
    cast as they are read."""
    fast, std = kernels
    x = cp.asarray(rng.integers(0, 200, (64, 9, 7, 3)).astype(dtype))
    states = [cp.asarray([2**40 + 17, 123]) for _ in range(2)]
    for out in (cp.float16, cp.float32):
        for padding in (1, 4):
            _equal(*(k.random_crop(s, x, padding, out, 3)
                     for k, s in zip((fast, std), states, strict=True)))
        _equal(*(k.random_flip(s, x, out, 3) for k, s in zip((fast, std), states, strict=True)))
    _equal(*states)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_normalize_kernel_is_the_standard_one(cp, kernels, rng, dtype):
    fast, std = kernels
    x = cp.asarray(rng.integers(0, 200, (4, 9, 7, 3)).astype(dtype))
    shift, scale = cp.asarray([0.5, 100.0, 3.0], cp.float32), cp.asarray([0.1, 3.0, 0.7],
                                                                        cp.float32)
    for out in (cp.float16, cp.float32):
        _equal(fast.normalize(x, shift, scale, cp.float32, out),
               std.normalize(x, shift, scale, cp.float32, out))


@needs_cudnn
def test_a_captured_adam_step_on_a_label_that_is_no_class_is_skipped_and_named(cudnn_module):
    """Today's step inside a CUDA graph on the GPU (Adam's overflow watch, the snapshot and
    restore of BatchNorm's statistics, the labels' check): a replay on a label that is no
    class leaves the weights, the optimiser and the moving statistics as they were, and the
    host names the labels when it reads the totals."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (48, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 48)
    model = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-3), cuda_graphs=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # warm-up, then the capture
    assert model.cuda_graphs_reason == "" and len(model._graphs.graphs) == 1
    launches = []
    launch = model._graphs.capture.launch
    model._graphs.capture.launch = lambda graph: (launches.append(graph), launch(graph))
    xb = model.backend.asarray(x[:16])
    model.train_step(xb, model.backend.asarray(y[16:32]))  # a good replay
    model._read_totals()
    weights, iterations = model.get_weights(), model.optimizer.iterations
    moving = [host(a) for la in model.layers for a in la.state.values()]
    assert moving  # (BatchNorm2D's)
    bad = y[:16].copy()
    bad[5] = 10  # (10 classes: 0 to 9)
    model.train_step(xb, model.backend.asarray(bad))
    with pytest.raises(InputError, match=r"labels in y must be in \[0, 9\]"):
        model._read_totals()
    assert len(launches) == 2  # both steps were replays of the graph
    assert model.optimizer.iterations == iterations
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip([host(a) for la in model.layers for a in la.state.values()], moving,
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_extractor_and_a_logits_model_on_the_gpu_predict_as_on_the_cpu(cp, monkeypatch):
    """A feature extractor of a CUDA model takes its device and dtype; a model without a final
    Softmax predicts its logits (no softmax applied), as the same models on the CPU (cuDNN in
    full float32: TF32, its default, differs from float32 by ~3e-4, ../shared/gpu-notes.md)."""
    monkeypatch.setenv("XPCNN_TF32", "0")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    gpu = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
    cpu = xpcnn.Sequential(gap_net(), device="cpu", seed=0)
    for m in (gpu, cpu):
        m.build((12, 12, 3))
    cpu.set_weights(gpu.get_weights())
    feats = [xpcnn.Model(inputs=m.input, outputs=m.layers[3].output) for m in (gpu, cpu)]
    assert feats[0].backend.label == gpu.backend.label and feats[0].layers[-1] is gpu.layers[3]
    got, want = feats[0].predict(x), feats[1].predict(x)
    assert isinstance(got, np.ndarray) and got.shape == (6, 12, 12, 8) and got.min() >= 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    logits = [xpcnn.Sequential(gap_net()[:-1], device=d, seed=0) for d in ("cuda", "cpu")]
    for m in logits:
        m.build((12, 12, 3))
    logits[1].set_weights(logits[0].get_weights())
    got, want = logits[0].predict(x), logits[1].predict(x)
    assert not np.allclose(got.sum(axis=1), 1.0)  # logits, not probabilities
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_arrays_on_another_library_on_the_gpu(cp, monkeypatch):
    """np.from_dlpack cannot read a CUDA array: a CuPy array given to a NumPy model, images or
    labels, is refused naming its library. A PyTorch CUDA tensor given to a CuPy model is read
    where it is (cupy.from_dlpack, no copy) and trains as the same data from NumPy (the same
    bits: cuDNN's deterministic plans only), and so does a dataset of CUDA samples trained on
    a non-blocking stream of the caller's; one on another GPU than the model's is refused
    naming its device."""
    monkeypatch.setenv("XPCNN_DETERMINISTIC", "1")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 8)
    on_cpu = xpcnn.Sequential(gap_net(), device="cpu", seed=0)
    on_cpu.compile()
    with pytest.raises(InputError, match="x is an array of array_api_compat.cupy on"):
        on_cpu.fit(cp.asarray(x), y, verbose=0)
    with pytest.raises(InputError, match="y is an array of array_api_compat.cupy on"):
        on_cpu.fit(x, cp.asarray(y), verbose=0)  # (labels are read on the host)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    models = []
    for images, labels in ((x, y), (torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())):
        model = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
        model.compile(optimizer="sgd")
        model.fit(images, labels, batch_size=4, shuffle=False, verbose=0)
        models.append(model)
    for a, b in zip(*(m.get_weights() for m in models), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(models[1].predict(torch.from_numpy(x).cuda()),
                                  models[0].predict(x))
    # A dataset of CUDA samples, stacked on the prefetch thread's stream, trained on a
    # non-blocking stream of the caller's, which does not follow that one by itself.
    class Samples:  # (a map-style dataset: a plain list is read as one array)
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return torch.from_numpy(x[i]).cuda(), int(y[i])

    model = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
    model.compile(optimizer="sgd")
    with cp.cuda.Stream(non_blocking=True):
        model.fit(Samples(), batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), models[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    if torch.cuda.device_count() > 1:
        with pytest.raises(InputError, match="x is an array of array_api_compat.cupy on .*1"):
            models[0].fit(torch.from_numpy(x).to("cuda:1"), y, verbose=0)


@pytest.mark.parametrize("callers", ["non-blocking", "per-thread-default"])
def test_a_datasets_samples_are_read_on_the_callers_stream(cp, callers):
    """The prefetch thread reads and stacks a dataset's device samples with the caller's
    current stream current there (``Backend.current_stream_scope``), here a non-blocking one,
    so that its work is queued where the loop reads the batches (the real scope: CuPy's stream,
    or the emulator's stand-in of it). Where the caller's is CuPy's per-thread default stream
    (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``), whose handle would name the prefetch
    thread's own, it works on the legacy default stream, which is ordered against it."""
    if callers == "per-thread-default":
        stream, expected = cp.cuda.Stream.ptds, cp.cuda.Stream.null
        assert (stream.ptr, expected.ptr) == (2, 0)  # (cudaStreamPerThread, the legacy one)
    elif REAL_GPU:
        stream = expected = cp.cuda.Stream(non_blocking=True)
    else:
        from cudnn_emulator import FakeStream

        stream = expected = FakeStream(0x57AE)
    seen = []
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)

    class Samples:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            seen.append((threading.current_thread().name, cp.cuda.get_current_stream().ptr))
            return cp.asarray(images[i]), i % 3

    model = xpcnn.Sequential(gap_net(), device="cuda", seed=0)
    model.compile(optimizer="sgd")
    with stream:
        model.fit(Samples(), batch_size=4, verbose=0)
    prefetched = [ptr for thread, ptr in seen if thread == "xpcnn-prefetch"]
    assert len(prefetched) >= len(images) - 4  # (the first batch: read here, to build the model)
    assert set(prefetched) == {expected.ptr}
    assert {ptr for thread, ptr in seen if thread != "xpcnn-prefetch"} == {stream.ptr}


# (last: scripts/gpu_check.sh runs the captured cases in its first stage, after the
# cuDNN and CUDA-graph tests above)
@pytest.mark.parametrize("scaling, squares", RECORD_SCALING)
@pytest.mark.parametrize("dtypes", RECORD_DTYPES)
@pytest.mark.parametrize("how", ["eager", "step-on-device", "captured"])
def test_recording_a_step_on_the_gpu(cp, kernels, dtypes, scaling, squares, how):
    """A step's record on the GPU (a check launch per gradient dtype, the record launch),
    eager, with the step number on the device, and captured in a CUDA graph once
    and replayed for every step: what the standard version leaves on the host."""
    import array_api_compat.numpy as xn

    from xpcnn.cuda_graphs import CupyCapture

    fast, _ = kernels
    record = fast.record_step
    if how == "captured":
        capture, graphs, held = CupyCapture(), [], []

        def record(*args):
            if not graphs:
                with capture.scope(), fast.capture_tables() as tables:
                    graph, apply = capture.capture(lambda: fast.record_step(*args))
                assert len(tables) == record_checks(dtypes)
                graphs.append(graph)
                held.extend([apply, tables])
            capture.launch(graphs[0])
            return held[0]

    want, want_grads = recorded_steps(np, StandardKernels(xn).record_step, dtypes, scaling,
                                      squares, how != "eager")
    got, got_grads = recorded_steps(cp, record, dtypes, scaling, squares, how != "eager", host)
    for g, g_want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_array_equal(g, g_want)  # (a product each: no multiply-add to fuse)
    for step, ((state, scale, apply), (s_want, scale_want, apply_want)) in enumerate(
            zip(got, want, strict=True), 1):
        # (the loss sum to rounding: the GPU may fuse its multiply-add)
        np.testing.assert_allclose(state, s_want, rtol=1e-12, equal_nan=True, err_msg=step)
        assert np.array_equal(scale, scale_want) and apply == apply_want, step
    check_recorded_steps(got, scaling, squares)
