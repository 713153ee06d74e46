"""CuPy-only kernels behind the one seam ``fast_kernels`` (see :mod:`xpcnn.ops.kernels`).

On a GPU each CuPy call costs 20-50 us of Python and launch (measured on an H200,
docs/performance.md), and the standard versions make one call (and one temporary) per array
operation, e.g. kh*kw slice copies for an im2col, four calls for a ReLU gradient, nine for an
Adam update, ~20 for a softmax cross-entropy. Each kernel here does one of those jobs in a
single launch, reading and writing each element once. Convolutions run on an engine per
layer (:meth:`CupyKernels.conv_engine`): cuDNN (:mod:`xpcnn.ops.cudnn_conv`) where it loads,
with xpcnn's hand-written CUDA kernels (:mod:`xpcnn.ops.cuda_conv`) behind it. Every method
matches its :class:`StandardKernels` twin: ``tests/test_gpu.py`` checks that on the GPU in
float16 and float32, and ``tests/test_cuda_kernels_on_cpu.py`` compiles the same kernel source
for the CPU and checks it on every machine (the elementwise ones in float16 too). The cases a
kernel does not cover (non-contiguous outputs, dtypes it does not take) go to that twin.

The kernels live by job: the one-pass ones in :mod:`xpcnn.ops.cuda_elementwise`, those that
reduce (sums, losses, normalisations) in :mod:`xpcnn.ops.cuda_reductions`, those that draw in
:mod:`xpcnn.ops.cuda_random`, those that take many arrays through an address table (the
optimisers' updates, a step's record, casts, snapshots) in :mod:`xpcnn.ops.cuda_updates`. This
module is the seam: :class:`CupyKernels` takes each job to its kernel, or to the twin where the
kernel does not cover the case, and launches it (raw sources through ``_raw_kernel``, with the
"last block" counters of ``_counters``). Kernels are compiled by CuPy on first use and cached
on disk (``~/.cupy/kernel_cache``).
"""


from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import array_api_compat.cupy as compat_cupy
import cupy
import numpy as np

from . import cuda_conv, random
from .convolution import ConvEngine, ConvGeometry
from .cuda_elementwise import (
    ADD_RELU,
    ADD_RELU_BACKWARD,
    AVG_POOL,
    AVG_POOL_BACKWARD,
    BIAS_RELU,
    GLOBAL_AVG_POOL,
    GLOBAL_AVG_POOL_BACKWARD,
    IM2COL,
    MASK_MULTIPLY,
    MASK_MULTIPLY_RELU,
    MAX_POOL,
    MAX_POOL_BACKWARD,
    MAX_POOL_GATHER_BACKWARD,
    NORMALIZE,
    RELU,
    RELU_BACKWARD,
    RELU_WITH_MASK,
    RESCALE,
    TOP_K_COUNTS_SOURCE,
    TOP_K_MAX,
    TOP_K_ROWS,
    TOP_K_THREADS,
)
from .cuda_random import DRAW_BLOCK, DROPOUT, RANDOM_CROP, RANDOM_FLIP, UNIFORM
from .cuda_reductions import (
    BATCH_NORM_APPLY,
    BATCH_NORM_BACKWARD_SOURCE,
    BATCH_NORM_DX,
    BATCH_NORM_RUNNING,
    BATCH_NORM_RUNNING_DX,
    BATCH_NORM_SOURCE,
    BFLOAT16,
    CROSS_ENTROPY_THREADS,
    FEATURE_NORM_BACKWARD_SOURCE,
    FEATURE_NORM_SOURCE,
    FEATURE_NORM_THREADS,
    HALF,
    LAST_BLOCK,
    SOFTMAX_CROSS_ENTROPY_SOURCE,
    SOFTMAX_SOURCE,
    SQUARES_THREADS,
    SQUARES_TILE,
    SUM_ROWS_LANES,
    SUM_ROWS_SOURCE,
    SUM_SQUARES_SOURCE,
    batch_norm_threads,
    cross_entropy_kernel,
    row_blocks,
    softmax_kernel,
)
from .cuda_updates import (
    ADAM,
    ADAM_AT,
    ADAM_SCALARS,
    ADAM_SCALARS_AT,
    CAST_ALL,
    CHECK_GRADIENTS,
    RECORD_STEP,
    RECORD_STEP_AT,
    RESTORE,
    RMSPROP,
    RMSPROP_AT,
    SGD,
    SGD_AT,
    SNAPSHOT,
    DeferredTables,
    array_offsets,
    search_table,
    update_table,
)
from .cudnn_conv import ALIGNMENT, SWITCHES
from .kernels import StandardKernels, alike
from .step_record import BAD_GRADS, GROWTH_INTERVAL, square_limit
from .windows import Pads, accumulator, pad, unpad


def _by_value(value: Any) -> bool:
    """Whether a per-step number is a Python float (an eager step), not a 0-d device array."""
    # (float and int checked first: numbers.Real's check is a call into Python's abc module)
    return isinstance(value, float | int | numbers.Real)


@dataclass(frozen=True)
class _Kept:
    """:meth:`CupyKernels.snapshot_state`'s copy: the bytes of ``count`` arrays, one after the
    other in ``kept``, and the table that finds them (None where they hold no byte)."""

    count: int
    table: Any
    kept: Any


# a^T @ b with a long inner dimension (a convolution's weight gradient: one row per output
# position of the batch) is cut into blocks of about this many rows, multiplied as one batched
# product and summed: a single product has few output tiles (288 x 32 for a 32-channel 3x3
# layer) and would run its 131,072-long inner loop on a handful of multiprocessors. (Its gain
# was not measured apart from the bias-gradient change that came with it.)
_SPLIT_K_ROWS = 2048
_SPLIT_K_MAX = 128

_C_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
            "float64": "double", "int8": "signed char", "uint8": "unsigned char",
            "int16": "short", "uint16": "unsigned short", "int32": "int",
            "uint32": "unsigned int", "int64": "long long", "uint64": "unsigned long long"}
# (by the kernel's name and its types as a launch gives them, dtypes or scalar types: found
# without naming the types, as a training step asks for a few kernels every time)
_RAW_KERNELS: dict[tuple[Any, ...], Any] = {}


def _raw_kernel(name: str, source: str, **types: Any) -> Any:
    """Kernel ``name`` of ``source`` with each of ``types`` (a type name of the source: a
    dtype) typedef'd to its C type, made once (CuPy compiles it on first use)."""
    key = (name, *types.items())
    if key not in _RAW_KERNELS:
        names = {k: np.dtype(v).name for k, v in types.items()}
        half = ((HALF if "float16" in names.values() else "")
                + (BFLOAT16 if "bfloat16" in names.values() else ""))
        typedefs = "".join(f"typedef {_C_TYPES[v]} {k};\n" for k, v in names.items())
        _RAW_KERNELS[key] = cupy.RawKernel(half + typedefs + LAST_BLOCK + source, name)
    return _RAW_KERNELS[key]


# Per device, the counters of the "last block" launches (0 between launches; made on first use
# and held for good: a captured graph keeps their address). One such launch at a time per
# device: those of a stream run in order, and a training step's run on one stream.
_COUNTERS: dict[str, Any] = {}
_COUNTERS_PER_DEVICE = 1024


def _counters(a: Any) -> Any:
    """The counters of ``a``'s device, from CuPy's default memory pool, which lasts as long as
    the process (a first use may come in a CUDA graph's warm-up, whose own pool frees its
    memory with itself, and whose blocks other graphs' temporaries may share:
    xpcnn.cuda_graphs)."""
    device = str(a.device)
    if device not in _COUNTERS:
        with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
            _COUNTERS[device] = cupy.zeros(_COUNTERS_PER_DEVICE, cupy.uint32)
    return _COUNTERS[device]


# Per device, the update kernels' ``sums`` where they clip by no norm (never read; made on
# first use and held for good, as the counters: a captured graph keeps its address).
_NO_SUMS: dict[str, Any] = {}


def _no_sums(a: Any) -> Any:
    """The unread ``sums`` of the update kernels on ``a``'s device."""
    device = str(a.device)
    if device not in _NO_SUMS:
        with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
            _NO_SUMS[device] = cupy.zeros(1, cupy.float64)
    return _NO_SUMS[device]


# bfloat16 is ml_dtypes' dtype, which CuPy takes from version 14 on, importing ml_dtypes as it
# is imported itself (with NumPy 2.1.2 or later); xpcnn.backend gives it only where CuPy takes
# it. (Found among the imported modules: importing ml_dtypes takes a second on a slow CPU.)
ml_dtypes = sys.modules.get("ml_dtypes")
# (as dtypes: a training step checks a dozen arrays, without naming their dtypes)
_FLOAT_DTYPES = frozenset([np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
                          + ([np.dtype(ml_dtypes.bfloat16)] if ml_dtypes else []))


def _contiguous(*arrays: Any) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


def _in_row_blocks(a: Any, splits: int) -> tuple[Any, Any]:
    """The leading rows of C-contiguous ``a`` as ``splits`` equal blocks (a view of shape
    (splits, rows per block, ...)), and the rows left over."""
    per = a.shape[0] // splits
    used = per * splits
    return a[:used].reshape(splits, per, *a.shape[1:]), a[used:]


def _fits_feature_norm(a: Any) -> bool:
    """Whether the FeatureNorm kernels take ``a``: C-contiguous float data, something to
    launch over, and at most 65535 chunks of 32 channels (a grid's y)."""
    return (a.flags.c_contiguous and a.dtype in _FLOAT_DTYPES and a.size > 0
            and a.shape[-1] <= 65535 * 32)



def _fits_batch_norm(a: Any, dtype: Any, *channels: Any) -> bool:
    """Whether the BatchNorm kernels take data ``a`` (C-contiguous float data of at least two
    dimensions, something to launch over, a counter per chunk of 32 channels) computed in
    ``dtype`` (a float type ``a`` casts to exactly), with the per-channel arrays ``channels``
    (C-contiguous vectors of ``dtype``, one value per channel)."""
    t = np.dtype(dtype)
    return (a.ndim >= 2 and a.flags.c_contiguous and a.dtype in _FLOAT_DTYPES and a.size > 0
            and t in _FLOAT_DTYPES and np.can_cast(a.dtype, t)
            and -(-a.shape[-1] // 32) <= _COUNTERS_PER_DEVICE
            and all(v.shape == a.shape[-1:] and v.dtype == t and v.flags.c_contiguous
                    for v in channels))


class CupyKernels(StandardKernels):
    """One launch per job where the standard versions take several (see the module doc)."""

    fused_updates = True
    pads_in_im2col = True
    bias_in_patches = False  # its im2col kernel fills every column of ``out``
    pads_in_max_pool = True  # (its max-pool kernels read the padding as -inf: no padded copy)

    def __init__(self) -> None:
        super().__init__(compat_cupy)
        # the hand-written convolution kernels and their switches (algorithm, TF32), read by
        # every layer's engine (see conv_engine)
        self.conv_kernels = cuda_conv.ConvKernels()
        # matrix products as cuDNN graphs while set (see capturable): always the same engine,
        # made on first use and kept, as the graphs captured with it run its plans
        self._graph_matmul: Any = None
        self._matmul_graphs: Any = None
        # update tables to fill once a stream capture has ended, and their memory pool (see
        # capture_tables; made on first use)
        self._deferred: DeferredTables | None = None
        self._table_pool: Any = None

    def conv_engine(self, geometry: ConvGeometry, backend: Any) -> ConvEngine:
        """cuDNN (:mod:`xpcnn.ops.cudnn_conv`) where it loads, with the hand-written kernels
        (:mod:`xpcnn.ops.cuda_conv`) for the cases it has no plan for; those kernels alone
        where it does not load (after a one-line warning) or with ``XPCNN_CUDNN=0``."""
        from . import cudnn_conv

        own = cuda_conv.HandWrittenConv.for_backend(geometry, self, backend)
        cudnn = cudnn_conv.load()
        return own if cudnn is None else cudnn_conv.CudnnConv(geometry, cudnn, own)

    @contextlib.contextmanager
    def capturable(self) -> Iterator[None]:
        """Inside, matrix products run as cuDNN graphs, which a CUDA graph can capture (CuPy 14
        refuses to capture cuBLAS calls). RuntimeError where cuDNN does not load."""
        from . import cudnn_conv

        cudnn = cudnn_conv.load()
        if cudnn is None:
            raise RuntimeError("cuDNN could not be loaded: the matrix products would go to "
                               "cuBLAS, which CuPy cannot capture in a CUDA graph")
        if self._matmul_graphs is None:
            self._matmul_graphs = cudnn_conv.CudnnMatmul(cudnn)
        old, self._graph_matmul = self._graph_matmul, self._matmul_graphs
        try:
            yield
        finally:
            self._graph_matmul = old

    @staticmethod
    def graph_switches() -> tuple[str | None, ...]:
        """The environment variables that cuDNN graphs are planned under, as set now
        (:func:`xpcnn.ops.cudnn_conv.switches`): a captured step replays the plans of its
        capture, so :class:`xpcnn.cuda_graphs.StepGraphs` captures again where they change
        (read before each replay: four lookups)."""
        return tuple(map(os.environ.get, SWITCHES))

    # (the standard products written with CuPy's ``.T``, the matrix transpose of 2-D arrays:
    # no call through the namespace's wrappers, as every Dense layer asks twice a step; in
    # their operands' dtype: CuPy gives bfloat16 products in bfloat16 already, the NumPy
    # arrays that stand for CuPy's in the tests in float32, which this check casts back)
    def matmul(self, a: Any, b: Any) -> Any:
        if self._graph_matmul is not None:
            return self._graph_matmul(a, b)
        return self._in_dtype_of(a @ b, a, b)

    def matmul_bias_relu(self, a: Any, b: Any, bias: Any, relu: bool) -> Any:
        if self._graph_matmul is not None and (bias is not None or relu):
            y = self._graph_matmul.with_bias_relu(a, b, bias, relu)
            if y is not None:  # (else cuDNN has no plan for the fused graph)
                return y
        return super().matmul_bias_relu(a, b, bias, relu)

    def matmul_nt(self, a: Any, b: Any) -> Any:
        if self._graph_matmul is not None:
            return self._graph_matmul(a, b, transpose_b=True)
        return self._in_dtype_of(a @ b.T, a, b)

    def matmul_into(self, a: Any, b: Any, out: Any, bias: Any = None,
                    relu: bool = False) -> None:
        if self._graph_matmul is not None:
            out[...] = self.bias_relu(self._graph_matmul(a, b), bias, relu)
            return
        if not out.flags.c_contiguous:
            super().matmul_into(a, b, out, bias, relu)
            return
        cupy.matmul(a, b, out=out)
        self.bias_relu(out, bias, relu)

    def matmul_tn(self, a: Any, b: Any) -> Any:
        if self._graph_matmul is not None:
            return self._graph_matmul(a, b, transpose_a=True)
        rows, m = a.shape
        n = b.shape[1]
        splits = min(rows // _SPLIT_K_ROWS, _SPLIT_K_MAX, max(1, (1 << 22) // (m * n)))
        if splits < 2 or not _contiguous(a, b):
            return self._in_dtype_of(a.T @ b, a, b)
        (a3, a_rest), (b3, b_rest) = _in_row_blocks(a, splits), _in_row_blocks(b, splits)
        parts = cupy.matmul(a3.transpose(0, 2, 1), b3)
        dtype = a.dtype if a.dtype == b.dtype else parts.dtype  # (as _in_dtype_of's)
        acc = accumulator(cupy, dtype)
        out = parts.sum(axis=0, dtype=acc)
        if a_rest.shape[0]:
            out += cupy.matmul(a_rest.T, b_rest).astype(acc, copy=False)
        return out.astype(dtype, copy=False)

    def bias_relu(self, y: Any, bias: Any, relu: bool) -> Any:
        if not y.flags.c_contiguous or (bias is not None and not bias.flags.c_contiguous):
            return super().bias_relu(y, bias, relu)
        if bias is not None:
            BIAS_RELU(bias, bias.shape[-1], relu, y)
        elif relu:
            cupy.maximum(y, 0, out=y)
        return y

    def im2col_into(self, x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int],
                    out_hw: tuple[int, int], pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                    ) -> Any:
        """As the standard version, and with ``pads`` (top, bottom, left, right) it reads ``x``
        as if zero-padded (``pads_in_im2col``): no padded copy of the input."""
        x = cupy.ascontiguousarray(x)
        n, h, w, c = x.shape
        IM2COL(x, h, w, c, out_hw[0], out_hw[1], kernel[1], strides[0], strides[1],
               out.shape[-1], pads[0], pads[2], out)
        return out

    def sum_rows(self, a: Any) -> Any:
        # One launch whatever the rows (see SUM_ROWS_SOURCE): CuPy's reduction over the
        # leading axis runs one thread block per column, only 32-64 of them for a
        # convolution's bias gradient (measured: 12 ms at batch 512).
        if not self._sums_rows(a):
            return super().sum_rows(a)
        return self._sum_rows(a)

    def relu_backward_sum_rows(self, dy: Any, y: Any) -> tuple[Any, Any]:
        if not self._sums_rows(dy) or y.shape != dy.shape or not y.flags.c_contiguous \
                or y.dtype not in _FLOAT_DTYPES:
            return super().relu_backward_sum_rows(dy, y)
        masked = cupy.empty_like(dy)
        return masked, self._sum_rows(dy, y, masked)

    @staticmethod
    def _sums_rows(a: Any) -> bool:
        """Whether :meth:`_sum_rows` takes ``a``."""
        return (a.ndim == 2 and a.flags.c_contiguous and a.dtype in _FLOAT_DTYPES
                and a.size > 0 and -(-a.shape[1] // 32) <= _COUNTERS_PER_DEVICE)

    @staticmethod
    def _sum_rows(a: Any, relu_y: Any = None, masked: Any = None) -> Any:
        """xpcnn_sum_rows of ``a`` (xpcnn_relu_sum_rows with ``relu_y``, writing ``masked``)."""
        rows, cols = a.shape
        per, blocks = row_blocks(rows)
        chunks = -(-cols // 32)  # (a counter per column chunk)
        acc = accumulator(cupy, a.dtype)
        partials = cupy.empty((blocks, cols), acc)
        out = cupy.empty(cols, acc)
        tail = (np.int64(rows), np.int32(cols), np.int64(per), partials, _counters(a), out)
        y = a if relu_y is None else relu_y
        name = "xpcnn_sum_rows" if relu_y is None else "xpcnn_relu_sum_rows"
        args = (a, *tail) if relu_y is None else (a, relu_y, masked, *tail)
        _raw_kernel(name, SUM_ROWS_SOURCE, X=a.dtype, Y=y.dtype, A=acc)(
            (blocks, chunks), (32, SUM_ROWS_LANES), args)
        return out

    # -- pooling: one launch each way, padding read in place (never a padded copy), the
    # gradients written whole (gathered per input element: no zero fill, no atomics)
    def max_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int], pads: Pads = (0, 0, 0, 0)) -> Any:
        if x.dtype not in _FLOAT_DTYPES:  # (no -inf to pad with)
            return super().max_pool(pad(self.xp, x, pads, -math.inf), kernel, strides, out_hw)
        x = cupy.ascontiguousarray(x)
        n, h, w, c = x.shape
        y = cupy.empty((n, *out_hw, c), x.dtype)
        MAX_POOL(x, h, w, c, out_hw[0], out_hw[1], kernel[0], kernel[1], strides[0],
                 strides[1], pads[0], pads[2], x.dtype.type(-math.inf), y)
        return y

    def max_pool_train(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                       out_hw: tuple[int, int], pads: Pads = (0, 0, 0, 0)) -> tuple[Any, Any]:
        """The routes are the unpadded input itself (the padding is read as -inf again)."""
        if x.dtype not in _FLOAT_DTYPES:
            return super().max_pool_train(pad(self.xp, x, pads, -math.inf), kernel, strides,
                                          out_hw)
        x = cupy.ascontiguousarray(x)
        return self.max_pool(x, kernel, strides, out_hw, pads), x

    def global_avg_pool(self, x: Any) -> Any:
        if not (x.flags.c_contiguous and x.dtype in _FLOAT_DTYPES):
            return super().global_avg_pool(x)
        n, h, w, c = x.shape
        return GLOBAL_AVG_POOL(x, h * w, c, cupy.empty((n, c), x.dtype))

    def global_avg_pool_backward(self, dy: Any, shape: tuple[int, ...]) -> Any:
        if dy.dtype not in _FLOAT_DTYPES:
            return super().global_avg_pool_backward(dy, shape)
        n, h, w, c = shape
        return GLOBAL_AVG_POOL_BACKWARD(cupy.ascontiguousarray(dy), h * w, c,
                                        cupy.empty(shape, dy.dtype))

    def max_pool_backward(self, x: Any, y: Any, dy: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int],
                          relu_grad: bool = False, pads: Pads = (0, 0, 0, 0)) -> Any:
        if x.dtype not in _FLOAT_DTYPES:  # (max_pool_train's routes: the padded input)
            return unpad(super().max_pool_backward(x, y, dy, kernel, strides, out_hw,
                                                   relu_grad), pads)
        (kh, kw), (sh, sw) = kernel, strides
        x, y, dy = (cupy.ascontiguousarray(a) for a in (x, y, dy))  # (read by flat index)
        n, h, w, c = x.shape
        dx = cupy.empty(x.shape, dy.dtype)
        if not any(pads) and (sh, sw) == (kh, kw) and (h, w) == (out_hw[0] * sh, out_hw[1] * sw):
            # windows that tile the input: a thread a window writes each of its elements
            MAX_POOL_BACKWARD(y, dy, x, h, w, c, out_hw[0], out_hw[1], kh, kw, sh, sw,
                              relu_grad, dx)
        else:
            MAX_POOL_GATHER_BACKWARD(y, dy, x, h, w, c, out_hw[0], out_hw[1], kh, kw, sh, sw,
                                     pads[0], pads[2], x.dtype.type(-math.inf), relu_grad, dx)
        return dx

    def avg_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int], pads: Pads, inv_counts: Any) -> Any:
        if x.dtype not in _FLOAT_DTYPES:
            return super().avg_pool(x, kernel, strides, out_hw, pads, inv_counts)
        x = cupy.ascontiguousarray(x)
        n, h, w, c = x.shape
        return AVG_POOL(x, cupy.ascontiguousarray(inv_counts), h, w, c, out_hw[0], out_hw[1],
                        kernel[0], kernel[1], strides[0], strides[1], pads[0], pads[2],
                        cupy.empty((n, *out_hw, c), x.dtype))

    def avg_pool_backward(self, dy: Any, shape: tuple[int, ...], kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int], pads: Pads,
                          inv_counts: Any) -> Any:
        if dy.dtype not in _FLOAT_DTYPES:
            return super().avg_pool_backward(dy, shape, kernel, strides, out_hw, pads,
                                             inv_counts)
        n, h, w, c = shape
        return AVG_POOL_BACKWARD(cupy.ascontiguousarray(dy), cupy.ascontiguousarray(inv_counts),
                                 h, w, c, out_hw[0], out_hw[1], kernel[0], kernel[1],
                                 strides[0], strides[1], pads[0], pads[2],
                                 cupy.empty(shape, dy.dtype))

    def uniform(self, state: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
        if not math.prod(shape):  # (no launch would count the draw)
            return super().uniform(state, shape, dtype, first)
        bits = random.significant_bits(cupy, dtype)
        return UNIFORM(first, bits, 2.0**-bits, cupy.empty(shape, dtype), state,
                       _counters(state), block_size=DRAW_BLOCK)[0]

    def random_flip(self, state: Any, x: Any, out_dtype: Any, first: int = 0) -> Any:
        if x.size == 0:  # (no launch would count the draw)
            return super().random_flip(state, x, out_dtype, first)
        n, h, w, c = x.shape
        return RANDOM_FLIP(cupy.ascontiguousarray(x), first, h, w, c,
                           cupy.empty(x.shape, out_dtype), state, _counters(state),
                           block_size=DRAW_BLOCK)[0]

    def random_crop(self, state: Any, x: Any, padding: int, out_dtype: Any,
                    first: int = 0) -> Any:
        if x.size == 0:  # (no launch would count the draw)
            return super().random_crop(state, x, padding, out_dtype, first)
        n, h, w, c = x.shape
        return RANDOM_CROP(cupy.ascontiguousarray(x), first, h, w, c, padding,
                           cupy.empty(x.shape, out_dtype), state, _counters(state),
                           block_size=DRAW_BLOCK)[0]

    def feature_norm(self, x: Any, eps: float, dtype: Any, out_dtype: Any
                     ) -> tuple[Any, Any, Any]:
        t, u = np.dtype(dtype), np.dtype(out_dtype)
        # (an exact cast of float data only; no empty grid)
        if not (_fits_feature_norm(x) and np.can_cast(x.dtype, t) and t in _FLOAT_DTYPES
                and u in _FLOAT_DTYPES):
            return super().feature_norm(x, eps, dtype, out_dtype)
        n, h, w, c = x.shape
        acc = accumulator(cupy, t)
        mean, inv_std = cupy.empty((n, 1, 1, c), acc), cupy.empty((n, 1, 1, c), acc)
        y = cupy.empty(x.shape, u)
        _raw_kernel("xpcnn_feature_norm", FEATURE_NORM_SOURCE, X=x.dtype, T=t, Y=u, A=acc)(
            (n, -(-c // 32)), (FEATURE_NORM_THREADS,),
            (x, np.int64(h * w), np.int32(c), np.float64(eps), mean, inv_std, y))
        return y, mean, inv_std

    def feature_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any,
                              relu: bool) -> Any:
        acc = mean.dtype
        if not (_fits_feature_norm(dy) and _fits_feature_norm(x) and x.shape == dy.shape
                and _contiguous(mean, inv_std) and inv_std.dtype == acc
                and acc in _FLOAT_DTYPES and acc == accumulator(cupy, acc)
                and np.can_cast(dy.dtype, acc)
                and np.can_cast(x.dtype, acc)):
            return super().feature_norm_backward(dy, x, mean, inv_std, relu)
        n, h, w, c = dy.shape
        dx = cupy.empty(x.shape, x.dtype)
        _raw_kernel("xpcnn_feature_norm_backward", FEATURE_NORM_BACKWARD_SOURCE, D=dy.dtype,
                    X=x.dtype, A=acc)(
            (n, -(-c // 32)), (FEATURE_NORM_THREADS,),
            (dy, x, mean, inv_std, np.int32(relu), np.int64(h * w), np.int32(c), dx))
        return dx

    def batch_norm_train(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                         moving_var: Any, momentum: float, eps: float, out_dtype: Any,
                         relu: bool) -> tuple[Any, Any, Any]:
        t = gamma.dtype
        if not (_fits_batch_norm(x, t, gamma, beta, moving_mean, moving_var)
                and np.dtype(out_dtype) in _FLOAT_DTYPES):
            return super().batch_norm_train(x, gamma, beta, moving_mean, moving_var, momentum,
                                            eps, out_dtype, relu)
        cols = x.shape[-1]
        rows = x.size // cols
        per, blocks = row_blocks(rows)
        acc = accumulator(cupy, t)
        partials = cupy.empty((blocks, cols, 2), acc)
        mean, inv_std = cupy.empty(cols, acc), cupy.empty(cols, acc)
        if rows < 2:  # (one value a channel: the running statistics left as they were, as
            # the standard version leaves them; the kernel writes its update to scratch)
            moving_mean, moving_var = cupy.empty_like(moving_mean), cupy.empty_like(moving_var)
        _raw_kernel("xpcnn_batch_norm_stats", BATCH_NORM_SOURCE, X=x.dtype, T=t, A=acc)(
            (blocks, -(-cols // 32)), (32, SUM_ROWS_LANES),
            (x, np.int64(rows), np.int32(cols), np.int64(per), np.float64(eps),
             np.float64(1 - momentum), np.float64(momentum),
             np.float64(rows / max(rows - 1, 1)), partials, _counters(x), mean, inv_std,
             moving_mean, moving_var))
        y = cupy.empty(x.shape, out_dtype)
        threads = batch_norm_threads(rows, cols)
        BATCH_NORM_APPLY(x, mean, inv_std, gamma, beta, x.size, threads, cols, relu, y,
                         size=threads)
        return y, mean, inv_std

    batch_norm_reads_relu_y = False  # (its kernels recompute z on the fly: no y kept)

    def batch_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                            beta: Any, relu: bool, input_grad: bool,
                            relu_y: Any = None, spare_y: bool = False, *,
                            eps: float | None = None) -> tuple[Any, Any, Any]:
        t = gamma.dtype
        acc = accumulator(cupy, t)
        # (a non-contiguous gradient made whole: one copy, no more passes)
        dy = cupy.ascontiguousarray(dy)
        if not (_fits_batch_norm(dy, t, gamma, beta) and _fits_batch_norm(x, acc, mean, inv_std)
                and np.can_cast(x.dtype, t) and x.shape == dy.shape):
            return super().batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu,
                                               input_grad, relu_y)
        cols = dy.shape[-1]
        rows = dy.size // cols
        per, blocks = row_blocks(rows)
        partials, coefs = cupy.empty((blocks, cols, 2), acc), cupy.empty((3, cols), acc)
        dgamma, dbeta = cupy.empty(cols, t), cupy.empty(cols, t)
        _raw_kernel("xpcnn_batch_norm_sums", BATCH_NORM_BACKWARD_SOURCE, D=dy.dtype,
                    X=x.dtype, T=t, A=acc)(
            (blocks, -(-cols // 32)), (32, SUM_ROWS_LANES),
            (dy, x, mean, inv_std, gamma, beta, np.int32(relu), np.int64(rows),
             np.int32(cols), np.int64(per), partials, _counters(dy), dgamma, dbeta, coefs))
        if not input_grad:
            return None, dgamma, dbeta
        dx = cupy.empty(x.shape, x.dtype)
        threads = batch_norm_threads(rows, cols)
        BATCH_NORM_DX(dy, x, mean, inv_std, gamma, beta, coefs, x.size, threads, cols, relu, dx,
                      size=threads)
        return dx, dgamma, dbeta

    def batch_norm_running(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                           moving_var: Any, eps: float, out_dtype: Any, relu: bool) -> Any:
        if not (_fits_batch_norm(x, gamma.dtype, gamma, beta, moving_mean, moving_var)
                and np.dtype(out_dtype) in _FLOAT_DTYPES):
            return super().batch_norm_running(x, gamma, beta, moving_mean, moving_var, eps,
                                              out_dtype, relu)
        return BATCH_NORM_RUNNING(x, moving_mean, moving_var, gamma, beta, eps, x.shape[-1],
                                  relu, cupy.empty(x.shape, out_dtype))

    def batch_norm_running_backward(self, dy: Any, x: Any, gamma: Any, beta: Any,
                                    moving_mean: Any, moving_var: Any, eps: float,
                                    relu: bool) -> Any:
        t = gamma.dtype
        if not (_fits_batch_norm(dy, t, gamma, beta, moving_mean, moving_var)
                and _fits_batch_norm(x, t) and x.shape == dy.shape):
            return super().batch_norm_running_backward(dy, x, gamma, beta, moving_mean,
                                                       moving_var, eps, relu)
        return BATCH_NORM_RUNNING_DX(dy, x, moving_mean, moving_var, gamma, beta, eps,
                                     x.shape[-1], relu, cupy.empty(x.shape, x.dtype))

    def rescale(self, x: Any, scale: float, offset: float, dtype: Any, out_dtype: Any) -> Any:
        t, u = np.dtype(dtype), np.dtype(out_dtype)
        if t not in _FLOAT_DTYPES:  # (the standard version's dtypes: an integer times a float)
            return super().rescale(x, scale, offset, dtype, out_dtype)
        return RESCALE(x, cupy.empty(0, t), t.type(scale), t.type(offset), bool(offset),
                       cupy.empty(x.shape, u))

    def normalize(self, x: Any, shift: Any, scale: Any, dtype: Any, out_dtype: Any) -> Any:
        t = np.dtype(dtype)
        if t not in _FLOAT_DTYPES or x.ndim == 0 or shift.dtype != t or scale.dtype != t:
            return super().normalize(x, shift, scale, dtype, out_dtype)
        return NORMALIZE(x, shift, scale, x.shape[-1], cupy.empty(x.shape, out_dtype))

    def mask_multiply(self, x: Any, mask: Any, scale: float | None = None,
                      relu_y: Any = None) -> Any:
        factor = x.dtype.type(1.0 if scale is None else scale)
        if relu_y is None:
            return MASK_MULTIPLY(x, mask, factor)
        return MASK_MULTIPLY_RELU(x, mask, factor, relu_y)

    def dropout(self, state: Any, x: Any, rate: float, first: int = 0) -> tuple[Any, Any]:
        if x.size == 0:  # (no launch would count the draw)
            return super().dropout(state, x, rate, first)
        bits = random.significant_bits(cupy, x.dtype)
        t = x.dtype.type
        y, keep, _, _ = DROPOUT(x, first, bits, 2.0**-bits, t(rate), t(1.0 / (1.0 - rate)),
                                cupy.empty(x.shape, x.dtype), cupy.empty(x.shape, cupy.bool_),
                                state, _counters(state), block_size=DRAW_BLOCK)
        return y, keep

    def relu(self, x: Any, max_value: float | None) -> Any:
        return RELU(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_with_mask(self, x: Any, max_value: float | None) -> tuple[Any, Any]:
        return RELU_WITH_MASK(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_backward(self, dy: Any, y: Any) -> Any:
        return RELU_BACKWARD(dy, y)

    def add_relu(self, arrays: list[Any], relu: bool) -> Any:
        if not relu or not alike(arrays):
            return super().add_relu(arrays, relu)
        *first, last = arrays  # (all but the last summed as the standard version sums them)
        head = first[0] if len(first) == 1 else super().add_relu(first, False)
        return ADD_RELU(head, last)

    def add_relu_backward(self, dys: list[Any], relu_y: Any) -> Any:
        if relu_y is None or len(dys) < 2 or not alike([*dys, relu_y]):
            return super().add_relu_backward(dys, relu_y)
        *first, last = dys
        head = first[0] if len(first) == 1 else super().add_relu_backward(first, None)
        return ADD_RELU_BACKWARD(head, last, relu_y)

    def softmax_cross_entropy(self, z: Any, labels: Any, smoothing: float, scale: Any = None,
                              dtype: Any = None, weights: Any = None,
                              class_weights: Any = None) -> tuple[Any, Any]:
        n, classes = z.shape
        t = z.dtype if dtype is None else np.dtype(dtype)
        rows = labels.ndim == 2  # (one-hot or probability rows)
        # (logits wider than ``dtype``, or a scale that would widen the gradient's dtype, as
        # for float16 logits: the standard version; so do labels of no integer dtype, target
        # rows, weights and class weights of no floating one)
        if not _contiguous(z, labels) or n == 0 or np.result_type(z.dtype, t) != t or not (
                scale is None or (scale.flags.c_contiguous
                                  and np.result_type(t, scale.dtype) == t)) or (
                (labels.shape != z.shape or labels.dtype not in _FLOAT_DTYPES) if rows
                else (labels.shape != (n,) or labels.dtype.kind not in "iu")) or not (
                weights is None or (weights.shape == (n,) and weights.flags.c_contiguous
                                    and weights.dtype in _FLOAT_DTYPES)) or not (
                class_weights is None or (class_weights.shape == (classes,)
                                          and class_weights.flags.c_contiguous
                                          and class_weights.dtype in _FLOAT_DTYPES)):
            return super().softmax_cross_entropy(z, labels, smoothing, scale, dtype, weights,
                                                 class_weights)
        acc = accumulator(cupy, t)
        name, rows_per_block = cross_entropy_kernel(classes, t)
        blocks = -(-n // rows_per_block)
        grad = cupy.empty(z.shape, z.dtype)  # (in the logits' dtype)
        partials = cupy.empty((blocks, 2), acc)  # per block: its rows' loss / N, right ones
        stats = cupy.empty(2, acc)
        scaled = scale is not None
        if not scaled:
            scale = z  # (not read)
        weighted, classed = weights is not None, class_weights is not None
        # (the arguments not read given the logits, their types those of a label's launch)
        kernel = _raw_kernel(name, SOFTMAX_CROSS_ENTROPY_SOURCE, Z=z.dtype,
                             L=np.int32 if rows else labels.dtype, Y=labels.dtype if rows else t,
                             W=weights.dtype if weighted else acc,
                             C=class_weights.dtype if classed else acc, T=t, U=scale.dtype,
                             A=acc)
        kernel((blocks,), (CROSS_ENTROPY_THREADS,),
               (z, z if rows else labels, labels if rows else z, np.int32(rows),
                weights if weighted else z, np.int32(weighted),
                class_weights if classed else z, np.int32(classed), np.int64(n),
                np.int32(classes), np.float64(1.0 - smoothing),
                np.float64(smoothing / classes), np.float64(1.0 / n), scale,
                np.int32(scaled), grad, partials, _counters(z), stats))
        return stats, grad

    def top_k_counts(self, z: Any, y: Any, ks: tuple[int, ...], dtype: Any) -> Any:
        # (one launch for every k, where the standard version takes ~16 and several
        # (rows, classes) temporaries; what the kernel does not take, the standard version)
        s = np.dtype(dtype)
        one_hot = y.ndim == 2
        if z.ndim != 2 or 0 in z.shape or not _contiguous(z, y) or \
                z.dtype not in _FLOAT_DTYPES or s not in _FLOAT_DTYPES or \
                not 0 < len(ks) <= TOP_K_MAX or (
                (y.shape != z.shape or y.dtype not in _FLOAT_DTYPES) if one_hot
                else (y.shape != z.shape[:1] or y.dtype.kind not in "iu")):
            return super().top_k_counts(z, y, ks, dtype)
        n, classes = z.shape
        out = cupy.empty(len(ks), s)
        kept = [min(k, classes) for k in ks]  # (k beyond the classes means all of them)
        kernel = _raw_kernel("xpcnn_top_k_counts", TOP_K_COUNTS_SOURCE, Z=z.dtype,
                             L=np.int32 if one_hot else y.dtype,
                             Y=y.dtype if one_hot else z.dtype,
                             A=np.float64 if z.dtype == np.float64 else np.float32, S=s)
        blocks = -(-n // TOP_K_ROWS)
        kernel((blocks,), (TOP_K_THREADS,),
               (z, z if one_hot else y, y if one_hot else z, np.int32(one_hot), np.int64(n),
                np.int32(classes), np.int32(len(ks)),
                *(np.int32(k) for k in kept + [0] * (TOP_K_MAX - len(ks))),
                cupy.empty((blocks, TOP_K_MAX), cupy.int32), _counters(z), out))
        return out

    def softmax(self, z: Any, dtype: Any) -> Any:
        t = np.dtype(dtype)
        # (logits wider than ``dtype``, a row of no class, no row: the standard version)
        if (z.ndim < 2 or not z.flags.c_contiguous or z.size == 0 or z.dtype not in _FLOAT_DTYPES
                or t not in _FLOAT_DTYPES or np.result_type(z.dtype, t) != t):
            return super().softmax(z, dtype)
        acc = accumulator(cupy, t)
        classes = z.shape[-1]
        rows = z.size // classes
        name, rows_per_block = softmax_kernel(classes, acc)
        y = cupy.empty(z.shape, t)
        _raw_kernel(name, SOFTMAX_SOURCE, Z=z.dtype, T=t, A=acc)(
            (-(-rows // rows_per_block),), (CROSS_ENTROPY_THREADS,),
            (z, np.int64(rows), np.int32(classes), y))
        return y

    def cast_all(self, arrays: list[Any], dtype: Any) -> list[Any]:
        out = list(arrays)  # (those of the dtype already stay themselves)
        groups: dict[Any, list[int]] = {}
        for k, a in enumerate(arrays):
            if a.dtype != dtype:
                groups.setdefault(a.dtype, []).append(k)
        pad = max(1, ALIGNMENT // np.dtype(dtype).itemsize)
        for ks in groups.values():
            sources = [cupy.ascontiguousarray(arrays[k]) for k in ks]
            table, size = search_table(sources, sources[0].device, self._deferred,
                                       [a.size for a in sources], pad=pad)
            flat = cupy.empty(size, dtype)  # (the pool's blocks are 512-byte aligned)
            if size:
                CAST_ALL(sources[0], len(sources), table, flat, size=size)
            starts = array_offsets(sources, pad)[:-1]  # (as search_table's)
            for k, a, start in zip(ks, sources, starts, strict=True):
                out[k] = flat[start:start + a.size].reshape(a.shape)
        return out

    def snapshot_state(self, arrays: list[Any]) -> Any:
        if not arrays or not _contiguous(*arrays):  # (found by their bytes' flat index)
            return super().snapshot_state(arrays)
        as_bytes = [cupy.reshape(a, (-1,)).view(np.uint8) for a in arrays]
        table, size = search_table(as_bytes, arrays[0].device, self._deferred)
        kept = cupy.empty(size, np.uint8)
        if size:
            SNAPSHOT(len(arrays), table, kept, size=size)
        return _Kept(len(arrays), table, kept)

    def restore_state(self, arrays: list[Any], snapshot: Any, apply: Any) -> None:
        if not isinstance(snapshot, _Kept):  # (the standard copies)
            super().restore_state(arrays, snapshot, apply)
        elif snapshot.kept.size:
            RESTORE(snapshot.count, snapshot.kept, self._apply_flag(apply), snapshot.table,
                    size=snapshot.kept.size)

    def record_step(self, state: Any, stats: Any, grads: list[Any], n: float, step: Any,
                    scaling: Any, squares: bool) -> Any:
        scaled = scaling is not None
        if not scaled:
            scaling = cupy.empty(2, cupy.float32)  # (not read)
        by_dtype: dict[Any, list[tuple[int, Any]]] = {}
        contiguous = [cupy.ascontiguousarray(g) for g in grads]  # (read by flat index)
        for k, g in enumerate(contiguous):
            by_dtype.setdefault(g.dtype, []).append((k, g))
        for dtype, group in by_dtype.items():
            arrays = [g for _, g in group]
            table, size = search_table(arrays, state.device, self._deferred,
                                       [k for k, _ in group])
            if size:
                CHECK_GRADIENTS(arrays[0], len(arrays), square_limit(np, dtype), squares,
                                scaled, scaling, table, BAD_GRADS + len(grads), state,
                                size=size)
        if scaled:  # (unscaled in place: a copy's values go back where the caller reads)
            for g, copy in zip(grads, contiguous, strict=True):
                if copy is not g:
                    g[...] = copy
        apply = cupy.empty(1, cupy.bool_)
        stats = cupy.ascontiguousarray(stats)
        # (the top-k counts after [loss, correct], added where the state keeps them)
        extra = stats.size - 2
        # (the kernel writes the state past the marks: top_k_start inline, no call a step)
        assert state.size == BAD_GRADS + 3 * len(grads) + extra, "stats of another state"
        if _by_value(step):
            RECORD_STEP(len(grads), extra, stats, n, scaled, GROWTH_INTERVAL, float(step),
                        state, scaling, apply, size=1)
        else:
            RECORD_STEP_AT(len(grads), extra, stats, n, scaled, GROWTH_INTERVAL,
                           cupy.reshape(step, (1,)), state, scaling, apply, size=1)
        return cupy.reshape(apply, ())

    # -- optimiser updates (``fused_updates``; see xpcnn.optim) -------------------------------
    # The per-step numbers are Python floats (an eager step: the kernels that take them by
    # value) or 0-d device arrays (a step captured in a CUDA graph: the ``_AT`` kernels, which
    # read them from device memory at every replay).
    @staticmethod
    def _by_dtype(params: list[Any], grads: list[Any], *slots: list[Any] | None
                  ) -> list[tuple[Any, ...]]:
        """(params, grads, *slots) lists per parameter dtype, gradients cast to it and every
        array made C-contiguous (parameters and state arrays always are: they are updated in
        place)."""
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        present = [s for s in slots if s is not None]
        for p, g, *kept in zip(params, grads, *present, strict=True):
            g = cupy.ascontiguousarray(g.astype(p.dtype, copy=False))
            groups.setdefault(p.dtype, []).append((p, g, *kept))
        return [tuple(map(list, zip(*rows, strict=True))) for rows in groups.values()]

    @staticmethod
    def _apply_flag(apply: Any) -> Any:
        """``apply`` as the update kernels' one-element bool array (None: always)."""
        if apply is None:
            return cupy.ones(1, cupy.bool_)
        return cupy.reshape(apply.astype(cupy.bool_, copy=False), (1,))

    @staticmethod
    def _per_step(value: Any, t: Any) -> Any:
        """A per-step number for parameters of dtype ``t``: a Python float rounded to it (as
        the standard version rounds it), a 0-d device array as a one-element array of it."""
        if _by_value(value):
            return t(value)
        return cupy.reshape(value.astype(t, copy=False), (1,))

    @contextlib.contextmanager
    def capture_tables(self) -> Iterator[list[Any]]:
        """Around a stream capture of update kernels: a capture refuses copies to the device,
        and a step's gradients have their addresses only inside it, so the tables of the
        updates issued inside are allocated there (from a memory pool of their own) and
        filled on leaving (the capture has ended; the graph has not run yet). A graph's
        addresses never change, so neither do its tables. Yields the list of them, complete
        on leaving: the graph reads them, so whoever holds the graph must hold it. Nothing is
        filled where the body raises."""
        if self._table_pool is None:
            self._table_pool = cupy.cuda.MemoryPool()
        deferred, tables = DeferredTables(self._table_pool), []
        outer, self._deferred = self._deferred, deferred
        try:
            yield tables
        finally:
            self._deferred = outer
        tables.extend(deferred.fill())

    def _launch_updates(self, kernel: Any, groups: list[tuple[Any, ...]], constants: tuple,
                        per_step: tuple, apply: Any, clip: tuple[str, float] | None = None
                        ) -> None:
        """``kernel`` once per dtype group of (params, grads, *slots): the clipping
        (:meth:`_clipping`), ``constants`` (Python floats rounded to the group's dtype, bools
        as they are), then ``per_step``."""
        flag = self._apply_flag(apply)
        if clip is None:  # (no call: the usual step's host work)
            clipping, bound, sums = 0, 0.0, _NO_SUMS.get(str(groups[0][0][0].device))
            if sums is None:
                sums = _no_sums(groups[0][0][0])
        else:
            clipping, bound, sums = self._clipping(groups, clip)
        for p, g, *slots in groups:
            table, size = update_table(p, g, *slots, deferred=self._deferred)
            t = p[0].dtype.type
            fixed = [c if isinstance(c, bool) else t(c) for c in constants]
            kernel(p[0], len(p), len(slots), np.int32(clipping), t(bound), sums, *fixed,
                   *[self._per_step(v, t) for v in per_step], flag, table, size=size)

    @staticmethod
    def takes_clip(params: list[Any], grads: list[Any], clip: tuple[str, float]) -> bool:
        """Whether the update kernels clip these gradients as they load them (``clip``:
        xpcnn.optim's Optimizer._clip): each of its parameter's dtype and shape; by a norm,
        all of one dtype, float32 or float64, not all empty (:meth:`_clipping`)."""
        if not all(g.dtype == p.dtype and g.shape == p.shape
                   for p, g in zip(params, grads, strict=True)):
            return False
        return clip[0] == "value" or (
            len({p.dtype for p in params}) == 1 and params[0].dtype in (cupy.float32,
                                                                        cupy.float64)
            and any(p.size for p in params))

    def _clipping(self, groups: list[tuple[Any, ...]], clip: tuple[str, float]
                  ) -> tuple[int, float, Any]:
        """The update kernels' clipping arguments (see cuda_updates._FIND_ARRAY): its code,
        its bound, and the sums of squares (one launch of xpcnn_sum_squares over the one
        group's gradients, for a norm; else an unread placeholder)."""
        if clip[0] == "value":
            return 1, clip[1], _no_sums(groups[0][0][0])
        grads = groups[0][1]
        if not any(g.size for g in grads):  # (no tile: a grid of 0 blocks is no launch)
            return (2 if clip[0] == "norm" else 3), clip[1], cupy.zeros(len(grads) + 1,
                                                                         cupy.float64)
        table, size = search_table(grads, grads[0].device, self._deferred,
                                   [g.size for g in grads], pad=SQUARES_TILE)
        sums = cupy.empty(len(grads) + 1, cupy.float64)
        blocks = size // SQUARES_TILE
        _raw_kernel("xpcnn_sum_squares", SUM_SQUARES_SOURCE, G=grads[0].dtype)(
            (blocks,), (SQUARES_THREADS,),
            (table, np.int32(len(grads)), cupy.empty(blocks, cupy.float64), _counters(grads[0]),
             sums))
        return (2 if clip[0] == "norm" else 3), clip[1], sums

    def sgd_update(self, params: list[Any], grads: list[Any], bufs: list[Any] | None,
                   lr: Any, weight_decay: float, momentum: float, nesterov: bool,
                   apply: Any = None, clip: tuple[str, float] | None = None) -> None:
        self._launch_updates(SGD if _by_value(lr) else SGD_AT,
                             self._by_dtype(params, grads, bufs),
                             (weight_decay, momentum, nesterov), (lr,), apply, clip)

    def adam_update(self, params: list[Any], grads: list[Any], ms: list[Any], vs: list[Any],
                    decay: Any, step: Any, bc2: Any, weight_decay: float, decoupled: bool,
                    beta_1: float, beta_2: float, epsilon: float, apply: Any = None,
                    vhats: list[Any] | None = None, clip: tuple[str, float] | None = None
                    ) -> None:
        """``decay``, ``step``, ``bc2``: as :meth:`adam_scalars` gives them (or Python floats);
        ``vhats``: AMSGrad's largest second moments (None without it)."""
        self._launch_updates(
            ADAM if _by_value(decay) else ADAM_AT, self._by_dtype(params, grads, ms, vs, vhats),
            (weight_decay, decoupled, beta_1, 1.0 - beta_1, beta_2, 1.0 - beta_2, epsilon),
            (decay, step, bc2), apply, clip)

    def adam_scalars(self, applied: Any, lr: Any, apply: Any, weight_decay: float,
                     beta_1: float, beta_2: float, dtype: Any) -> tuple[Any, Any, Any]:
        out = cupy.empty(3, dtype)
        if _by_value(lr):
            ADAM_SCALARS(self._apply_flag(apply), weight_decay, beta_1, beta_2, float(lr),
                         cupy.reshape(applied, (1,)), out, size=1)
        else:
            ADAM_SCALARS_AT(self._apply_flag(apply), weight_decay, beta_1, beta_2,
                            cupy.reshape(lr.astype(cupy.float64, copy=False), (1,)),
                            cupy.reshape(applied, (1,)), out, size=1)
        return out[0, ...], out[1, ...], out[2, ...]  # (0-d arrays, not numbers)

    def rmsprop_update(self, params: list[Any], grads: list[Any], vs: list[Any],
                       means: list[Any] | None, bufs: list[Any] | None, lr: Any,
                       weight_decay: float, rho: float, momentum: float, epsilon: float,
                       apply: Any = None, clip: tuple[str, float] | None = None) -> None:
        """``means``: the centered variant's mean gradients (None where not centered);
        ``bufs``: the momentum buffers (None without momentum)."""
        self._launch_updates(
            RMSPROP if _by_value(lr) else RMSPROP_AT,
            self._by_dtype(params, grads, vs, means, bufs),
            (weight_decay, rho, 1.0 - rho, means is not None, momentum, epsilon), (lr,), apply,
            clip)


KERNELS = CupyKernels()

