"""NumPy-only kernels behind the one seam ``fast_kernels`` (see :mod:`xpcnn.ops.kernels`).

Only code outside the Array API standard lives here: ``out=`` arguments, in-place ufuncs,
boolean masks as ufunc operands, overlapping strided views, and chunked loops spread over one
thread per BLAS thread. Each method matches its :class:`StandardKernels` twin, which
``tests/test_fastpath.py`` checks.

Threads: a chunked loop (im2col + matmul of a few images at a time) runs on as many threads as
OpenBLAS has, with OpenBLAS itself pinned to one thread meanwhile (and for a whole training
step or prediction, see :meth:`NumpyKernels.pinned`: after every call with several threads,
OpenBLAS's workers spin for up to ~0.1 s, taking a core from the next loop's threads; measured
as 25% of a ``cifar`` training step). Each thread then copies and
multiplies its own chunks: the copies run in parallel too, and there is one synchronisation per
loop instead of one inside every small matmul (OpenBLAS's threads spin-wait there, which costs
dearly whenever another process holds a core). Where OpenBLAS's thread count cannot be set
(another BLAS), loops run on the calling thread and BLAS keeps its own threads.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import platform
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple

import array_api_compat.numpy as compat_numpy
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import random
from .kernels import StandardKernels, alike
from .windows import accumulator, overlapping, window, window_slices
from .workspace import owner, working_for


class _OpenBLASThreads:
    """Get and set the thread count of the OpenBLAS that NumPy loaded (Linux), else inert."""

    def __init__(self) -> None:
        self.get: Callable[[], int] | None = None
        self.set: Callable[[int], None] | None = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "/" in ln})
        except OSError:
            return
        paths = [p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p]
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas_", "openblas_"):
                for suffix in ("64_", ""):
                    get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                        self.get, self.set = get, put
                        return


def _keep_freed_arrays_in_the_heap() -> None:
    """Ask glibc's malloc to serve batch-sized arrays from its heap and keep freed ones there.

    By default it maps every array above a (dynamic) threshold afresh, and every page of it
    then faults and is zeroed by the kernel on first touch: each training step or prediction
    would pay that for each of its intermediate arrays (measured: 57 -> 43 ms for an ``mnist``
    inference batch, and the step-to-step spread gone). Process-wide, so done once, the first
    time xpcnn computes on the fast path; a no-op where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    for threshold in (1 << 28, 1 << 25):  # 256 MiB, else glibc's own ceiling on 64-bit
        if mallopt(m_mmap_threshold, threshold) == 1:
            mallopt(m_trim_threshold, 2 * threshold)
            return


class _PoolRoutes(NamedTuple):
    """Where a max pool's gradient goes, as the fast path keeps it: for each output, the index
    (row-major) of its window's first maximum (kh*kw or more for none: a NaN's window); and
    the padded input's shape."""

    first: Any
    shape: tuple[int, ...]


def _half_float(dtype: Any) -> bool:
    """float16, or ml_dtypes' bfloat16 (a dtype of kind "V" to NumPy): the 2-byte floats of
    mixed precision, without importing ml_dtypes (a second of start-up here)."""
    return dtype.itemsize == 2 and dtype.kind in "fV"


_CAST_BLOCK = 1 << 15  # elements per block of the casts below (their scratch stays in L2)
_CAST_SMALL = 1 << 13  # fewer: NumPy's own cast (the blocks' ~15 ufunc calls cost more)
_HALF_TO_SINGLE: Any = None  # float32 of every float16 bit pattern, as NumPy casts it


def _u32(v: int) -> Any:
    return np.uint32(v)


def half_from_single(x: Any, out: Any) -> None:
    """``out[...] = x`` (float32 -> float16), NumPy's bits for every input (in the default
    round-to-nearest FPU mode: another library's fesetround changes this one's bits, not
    NumPy's), faster where it counts.

    NumPy's cast is a scalar loop that branches on zeros and subnormals (measured on 2 cores
    here: 1.4-1.5 ns an element on all-normal values, ~5 after a ReLU, 65-90 on subnormal
    results). This one is branch-free bit arithmetic in cache-sized blocks, 1.3-1.6 ns an
    element on every kind of value (1.64 at a review): about NumPy's on all-normal data (no
    gain there; a per-block test choosing NumPy's cast would cost 0.18 ns an element, more
    than it could save), several times faster once zeros or small values are among them (a
    step's activations and gradients: the gain). With e =
    max(exponent of |x|, -14) (float16's smallest normal), |x| + 2**(e+13) in float32 rounds
    |x| to a multiple of 2**(e-10), float16's spacing there, to nearest even in hardware; the
    sum's low bits are the rounded significand, to which e's float16 exponent is added (a
    carry of the significand steps the exponent, 65520 and up reach inf, clamped there).
    NaN: NumPy's bits (a block's largest |x| bits tell; rare: its NaNs recast alone). An
    ``out`` sharing memory with ``x``: NumPy's cast."""
    if x.size < _CAST_SMALL or not (x.flags.c_contiguous and out.flags.c_contiguous) or \
            np.may_share_memory(x, out):
        with np.errstate(over="ignore"):
            np.copyto(out, x, casting="unsafe")
        return
    u, o = x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16)
    xf = u.view(np.float32)
    n = u.size
    a, b, s = (np.empty(min(n, _CAST_BLOCK), np.uint32) for _ in range(3))
    af, bf, sf = a.view(np.float32), b.view(np.float32), s.view(np.float32)
    bias = (113 << 10) + (13 << 10)  # e's float16 exponent from b >> 13 (below), less one
    for i in range(0, n, _CAST_BLOCK):
        j = min(n, i + _CAST_BLOCK)
        ub, ab, bb, sb = u[i:j], a[:j - i], b[:j - i], s[:j - i]
        np.bitwise_and(ub, _u32(0x7FFFFFFF), out=ab)  # |x|
        # (a NaN's |x| bits are above inf's: one max over the block, in cache, no n-byte
        # mask beside the arrays; was 22-43% of the gain in a mixed-precision step)
        nan = ab.max() > 0x7F800000
        np.bitwise_and(ab, _u32(0x7F800000), out=bb)  # 2**exponent
        # 2**-14 .. 2**16 (past 65536 everything is inf; the sum stays finite below)
        np.clip(bb, _u32(0x38800000), _u32(0x47800000), out=bb)
        np.add(bb, _u32(13 << 23), out=bb)  # M = 2**(e+13)
        with np.errstate(invalid="ignore"):  # (a signalling NaN: recast below)
            np.add(af[:j - i], bf[:j - i], out=sf[:j - i])  # |x| + M, rounded by the FPU
        np.subtract(sb, bb, out=sb)  # the rounded |x| / 2**(e-10)
        np.right_shift(bb, 13, out=bb)
        np.add(sb, bb, out=sb)
        np.minimum(sb, _u32(0x7C00 + bias), out=sb)  # inf
        np.right_shift(ub, 16, out=bb)
        np.bitwise_and(bb, _u32(0x8000), out=bb)  # the sign
        np.add(sb, bb, out=sb)
        np.subtract(sb, _u32(bias), out=o[i:j], casting="unsafe")
        if nan:
            where = np.isnan(xf[i:j])
            o[i:j][where] = xf[i:j][where].astype(np.float16).view(np.uint16)


def single_from_half(h: Any, out: Any) -> None:
    """``out[...] = h`` (float16 -> float32), NumPy's bits (a table NumPy fills once, read
    by the bits: 0.75 ns an element against NumPy's 1.2, 4 after a ReLU, 8 on subnormals)."""
    global _HALF_TO_SINGLE
    if h.size < _CAST_SMALL:
        np.copyto(out, h)
        return
    if _HALF_TO_SINGLE is None:
        _HALF_TO_SINGLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    # (mode="clip": the indices are in range; "raise" buffers ``out``)
    np.take(_HALF_TO_SINGLE, h.view(np.uint16), out=out, mode="clip")


def _as_single(a: Any) -> Any:
    """A half-float array in float32 (a new array)."""
    if a.dtype != np.float16:
        return a.astype(np.float32)
    out = np.empty(a.shape, np.float32)
    single_from_half(a, out)
    return out


class NumpyKernels(StandardKernels):
    """The NumPy versions: ``out=`` writes, in-place ufuncs and threaded chunk loops."""

    fused_updates = True  # sgd_update / adam_update / rmsprop_update, in place
    # a strided convolution's input gradient by stride phases in chunks, where that pays,
    # not col2im's scatter of the whole batch's patch gradients (im2col.phase_input_grad)
    phase_input_grad = True

    def __init__(self) -> None:
        super().__init__(compat_numpy)
        self._blas = _OpenBLASThreads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # .in_a_loop: this thread runs a chunk loop's body
        self._pin_lock = threading.Lock()
        self._pins = 0  # open pinned() scopes
        self._saved_threads: int | None = None  # OpenBLAS's count before the outermost one
        self._malloc_tuned = False
        self._cores = os.cpu_count() or 1
        self._ones_cache: dict[str, Any] = {}  # (per dtype: the longest asked, sliced)
        self._rows_cache: dict[tuple[int, str, float], Any] = {}
        self._half_tables: dict[tuple[Any, Any], Any] = {}  # (see _half_table)

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        key = (os.getpid(), workers)  # a forked child needs threads of its own
        if self._pool is None or self._pool_key != key:
            self._pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="xpcnn")
            self._pool_key = key
        return self._pool

    def threads(self) -> int:
        """Threads a chunked loop uses: OpenBLAS's own count (1 where it cannot be pinned)."""
        if self._blas.get is None:
            return 1
        n = self._saved_threads if self._saved_threads is not None else self._blas.get()
        return max(1, min(int(n), self._cores))

    def set_threads(self, n: int) -> None:
        """Run chunk loops (and OpenBLAS outside them) on ``n`` threads: for processes that
        share a machine's cores (:mod:`xpcnn.distributed`). A no-op where OpenBLAS's count
        cannot be set."""
        if self._blas.set is not None:
            self._blas.set(max(1, int(n)))

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Hold OpenBLAS to one thread inside (re-entrant): xpcnn's loops bring their own
        threads, and OpenBLAS's workers would spin-wait on cores those threads need."""
        if not self._malloc_tuned:
            self._malloc_tuned = True
            _keep_freed_arrays_in_the_heap()
        if self._blas.get is None:
            yield
            return
        with self._pin_lock:
            if self._pins == 0:
                self._saved_threads = int(self._blas.get())
                self._blas.set(1)
            self._pins += 1
        try:
            yield
        finally:
            with self._pin_lock:
                self._pins -= 1
                if self._pins == 0:
                    self._blas.set(self._saved_threads)
                    self._saved_threads = None

    def for_chunks(self, n: int, m: int, fn: Callable[[int, int, int], None]) -> None:
        if m >= n:  # one chunk (a product inside a chunk loop, say): here, as it is
            fn(0, 0, n)
            return
        starts = list(range(0, n, m))
        workers = min(self.threads(), len(starts))
        if workers <= 1 or not self._lock.acquire(blocking=False):
            # one thread (or a loop already running on another thread): in order, here
            self._in_a_loop(lambda: super(NumpyKernels, self).for_chunks(n, m, fn))
            return
        counter = itertools.count()  # next() is atomic: chunks go to whichever thread is free

        def chunks(worker: int) -> None:
            for i in iter(counter.__next__, None):
                if i >= len(starts):
                    return
                fn(worker, starts[i], min(n, starts[i] + m))

        def run(worker: int) -> None:
            self._in_a_loop(lambda: chunks(worker))

        # the caller's floating-point error handling (compute_scope's) and scratch (its
        # layers' workspaces), for the pool's threads
        errors, call, caller = np.geterr(), np.geterrcall(), owner()

        def run_in_pool(worker: int) -> None:
            with np.errstate(call=call, **errors), working_for(caller):
                run(worker)

        try:
            with self.pinned():
                futures = [self._executor(workers).submit(run_in_pool, w)
                           for w in range(1, workers)]
                try:
                    run(0)
                finally:
                    for f in futures:
                        f.result()
        finally:
            self._lock.release()

    # Whole-batch matmuls (Dense layers) split into row blocks, one per thread. Small ones
    # run as they are.
    # Elementwise passes likewise, from a quarter of a million elements.
    _SPLIT_MACS = 1 << 22
    _SPLIT_ELEMENTS = 1 << 18

    def _in_a_loop(self, body: Callable[[], None]) -> None:
        """Run ``body`` marked as inside a chunk loop (for :meth:`_split_rows`)."""
        outer = getattr(self._local, "in_a_loop", False)
        self._local.in_a_loop = True
        try:
            body()
        finally:
            self._local.in_a_loop = outer

    def _split_rows(self, rows: int, work: int, minimum: int = _SPLIT_MACS) -> int:
        """Rows per block to share ``work`` among the threads (all rows if not worth it, or
        inside a chunk loop, whose threads are busy already: there the blocks would only run
        one after the other, and a product split by rows packs its other operand once per
        block: 2.5x slower for a 3-channel convolution's kernel gradient)."""
        workers = self.threads()
        if (workers <= 1 or work < minimum or rows < 2 * workers
                or getattr(self._local, "in_a_loop", False)):
            return rows
        return -(-rows // workers)

    # NumPy has no half-precision BLAS (its float16 matmul is a plain loop, ~40x slower, and
    # ml_dtypes' bfloat16 one too): for mixed precision the products run in float32 on the
    # float16 or bfloat16 inputs, rounded once to that dtype, as tensor cores do. The standard
    # path's products accumulate in float32 too.
    @staticmethod
    def _single(*arrays: Any) -> list[Any]:
        return [_as_single(a) if _half_float(a.dtype) else a for a in arrays]

    def patch_dtype(self, dtype: Any) -> Any:
        # A convolution casts each chunk of a half-float input to float32 once, as it copies
        # it into its padded buffer, and unfolds that: half-float patches would be cast
        # kh*kw times over by _single (a 5x5 layer's mixed float16 step: 9.5x float32's).
        return np.dtype(np.float32) if _half_float(dtype) else dtype

    def copy_into(self, dst: Any, src: Any) -> None:
        if src.dtype == np.float16 and dst.dtype == np.float32:
            single_from_half(src, dst)  # (NumPy's cast branches on zeros: 5x slower after ReLU)
        else:
            dst[...] = src

    @staticmethod
    def _rounded_to(a: Any, dtype: Any) -> Any:
        if a.dtype == np.float32 and dtype == np.float16:
            out = np.empty(a.shape, np.float16)
            half_from_single(a, out)  # (inf where it overflows: what loss scaling looks for)
            return out
        with np.errstate(over="ignore"):  # inf is what loss scaling looks for
            return a.astype(dtype)

    def _product(self, a: Any, b: Any, rows: int, cols: int, inner: int,
                 part: Callable[[Any, Any, int, int, Any], None]) -> Any:
        """A (rows, cols) product whose ``part(a, b, r0, r1, out)`` fills rows r0:r1; large
        ones split into row blocks over the threads."""
        if a.dtype == b.dtype == np.float32 and getattr(self._local, "in_a_loop", False):
            # a chunk's product inside a chunk loop (never split there): straight to BLAS,
            # without the ~9 us of Python below, paid under the interpreter lock per chunk
            out = np.empty((rows, cols), np.float32)
            part(a, b, 0, rows, out)
            return out
        given = np.result_type(a, b)
        a, b = self._single(a, b)
        out = np.empty((rows, cols), np.result_type(a, b))
        self.for_chunks(rows, self._split_rows(rows, rows * inner * cols),
                        lambda w, r0, r1: part(a, b, r0, r1, out[r0:r1]))
        return self._rounded_to(out, given) if _half_float(given) else out

    # An inner dimension of 1 (a Dense kernel's gradient at batch 1: an epoch's last batch
    # can hold one sample) is an outer product, which NumPy's matmul runs off BLAS, ~10x
    # slower than np.multiply of the column and the row (the same single products).
    def _outer(self, column: Any, row: Any) -> Any:
        return self._product(column, row, column.shape[0], row.shape[1], 1,
                             lambda a, b, r0, r1, o: np.multiply(a[r0:r1], b, out=o))

    def matmul(self, a: Any, b: Any) -> Any:
        if a.shape[1] == 1:
            return self._outer(a, b)
        return self._product(a, b, a.shape[0], b.shape[1], a.shape[1],
                             lambda a, b, r0, r1, o: np.matmul(a[r0:r1], b, out=o))

    def matmul_tn(self, a: Any, b: Any) -> Any:
        if a.shape[0] == 1:
            return self._outer(a.T, b)
        return self._product(a, b, a.shape[1], b.shape[1], a.shape[0],
                             lambda a, b, r0, r1, o: np.matmul(a[:, r0:r1].T, b, out=o))

    def matmul_nt(self, a: Any, b: Any) -> Any:
        if a.shape[1] == 1:
            return self._outer(a, b.T)
        return self._product(a, b, a.shape[0], b.shape[0], a.shape[1],
                             lambda a, b, r0, r1, o: np.matmul(a[r0:r1], b.T, out=o))

    def matmul_into(self, a: Any, b: Any, out: Any, bias: Any = None,
                    relu: bool = False) -> None:
        if _half_float(out.dtype):
            a, b = self._single(a, b)
            product = np.matmul(a, b)
            if out.dtype == np.float16:
                half_from_single(product, out)  # rounded once (inf where it overflows)
            else:
                with np.errstate(over="ignore"):  # inf is what loss scaling looks for
                    np.copyto(out, product, casting="unsafe")  # rounded once
        else:
            np.matmul(a, b, out=out)
        if bias is not None:  # (convolutions carry theirs in the product: bias_in_patches)
            np.add(out, bias, out=out)
        if relu:  # still in cache
            self._clamp(np.maximum, out, 0.0, out)

    def _im2col_views(self, x: Any, out: Any, kernel: tuple[int, int],
                      strides: tuple[int, int], out_hw: tuple[int, int]) -> tuple[Any, Any] | None:
        """(source, destination) views whose copy is the im2col of ``x`` into ``out``, or None
        where that copy would not pay (then the standard version runs).

        Channels-last: the kw horizontal taps of all channels are kw*C consecutive floats of the
        input, so all patches are one overlapping strided view of shape (n, Ho, Wo, kh, kw*C),
        copied in one call with kw*C-long runs (instead of kh*kw copies of C-long runs: 2-3x
        faster, most of all for few channels). The destination is the patch columns of each
        row of ``out``, which may have more (see bias_in_patches).

        Both views are of a void dtype of kw*C floats: NumPy then copies each run as one item
        (its inner loop runs along the output's columns), not as a loop of kw*C floats per
        run. Per chunk: 0.35 -> 0.17 ms for 16 images of 32x32x3, 0.10 -> 0.08 ms for 3 of
        30x30x32, 0.074 -> 0.069 ms for 5 of 16x16x64."""
        kh, kw = kernel
        n, _, _, c = x.shape
        ho, wo = out_hw
        s0, s1, s2, s3 = x.strides
        if c == 1 or s3 != x.itemsize or s2 != c * s3 or not out.flags.c_contiguous:
            # One channel: the runs would be only kw floats long, and NumPy's copy loop pays
            # per run; one copy per kernel offset runs along the Wo axis instead (3x faster
            # for 3x3 on 26x26). Else: not channels-last rows, or an output not one block.
            return None
        run = np.dtype((np.void, kw * c * x.itemsize))
        shape = (n, ho, wo, kh)
        steps = (s0, s1 * strides[0], s2 * strides[1], s1)
        if x.flags.c_contiguous:  # np.ndarray over the buffer: 5x cheaper than as_strided
            src = np.ndarray(shape, run, buffer=x, strides=steps)
        else:  # (its last axis, kw*C floats, is contiguous: checked above)
            src = as_strided(x, (*shape, kw * c), (*steps, s3), writeable=False)
            src = src.view(run)[..., 0]
        o0, o1, o2, o3 = out.strides
        dst = np.ndarray(shape, run, buffer=out, strides=(o0, o1, o2, kw * c * o3))
        return src, dst

    def im2col_into(self, x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int],
                    out_hw: tuple[int, int]) -> Any:
        views = self._im2col_views(x, out, kernel, strides, out_hw)
        if views is None:
            return super().im2col_into(x, out, kernel, strides, out_hw)
        np.copyto(views[1], views[0])
        return out

    def im2col_plan(self, x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int],
                    out_hw: tuple[int, int]) -> Callable[[], Any]:
        views = self._im2col_views(x, out, kernel, strides, out_hw)
        if views is None:
            return super().im2col_plan(x, out, kernel, strides, out_hw)
        src, dst = views
        cols = out.reshape(-1, out.shape[-1])  # a view: ``out`` is contiguous (checked above)

        def unfold() -> Any:
            np.copyto(dst, src)
            return cols

        return unfold

    def max_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int]) -> Any:
        # Separably, a block of images at a time: the maximum over the kh window rows (long
        # contiguous runs of W*C floats) into a per-block buffer, then over the kw columns of
        # that; max is associative, so this is the window's maximum. Blocks of ~1 MB keep the
        # buffer and the output in cache (1.1-1.6x faster than kh*kw strided passes over the
        # whole batch's output, on the reference models' pools).
        if self._half_bits(x):  # (by keys: see max_pool_train)
            return self.max_pool_train(x, kernel, strides, out_hw)[0]
        kh, kw = kernel
        ho, wo = out_hw
        n, _, w, c = x.shape
        out = np.empty((n, ho, wo, c), x.dtype)
        row_slices = [window_slices(i, 0, out_hw, strides)[0] for i in range(kh)]
        col_slices = [window_slices(0, j, out_hw, strides)[1] for j in range(kw)]

        def work(worker: int, n0: int, n1: int) -> None:
            xs = x[n0:n1]
            rows = [xs[:, s] for s in row_slices]
            r = rows[0] if kh == 1 else self._maximum(rows, np.empty((n1 - n0, ho, w, c),
                                                                      x.dtype))
            self._maximum([r[:, :, s] for s in col_slices], out[n0:n1])

        self.for_chunks(n, self._image_blocks(x, 1 << 20), work)
        return out

    @staticmethod
    def _maximum(arrays: list[Any], out: Any) -> Any:
        """The elementwise maximum of ``arrays`` (one shape) written into ``out``."""
        if len(arrays) == 1:
            np.copyto(out, arrays[0])
            return out
        np.maximum(arrays[0], arrays[1], out=out)
        for a in arrays[2:]:
            np.maximum(out, a, out=out)
        return out

    @staticmethod
    def _window_taps(a: Any, kernel: tuple[int, int], strides: tuple[int, int],
                     out_hw: tuple[int, int]) -> Any:
        """A (kh, kw, n, Ho, Wo) view of C-contiguous channels-last ``a``: tap (i, j) of every
        window, each item the C values there as one void item (a copy then moves each as one
        run: within 30% of a contiguous copy here, where a float view's loop stops every C
        values and takes twice as long)."""
        n, _, _, c = a.shape
        s0, s1, s2, _ = a.strides
        return np.ndarray((*kernel, n, *out_hw), np.dtype((np.void, c * a.itemsize)), buffer=a,
                          strides=(s1, s2, s0, s1 * strides[0], s2 * strides[1]))

    @staticmethod
    def _as_taps(block: Any, kernel: tuple[int, int]) -> Any:
        """The contiguous (kh*kw, n, Ho, Wo, C) ``block`` as (kh, kw, n, Ho, Wo) void items."""
        item = np.dtype((np.void, block.shape[-1] * block.itemsize))
        return block.view(item)[..., 0].reshape(*kernel, *block.shape[1:4])

    def max_pool_train(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                       out_hw: tuple[int, int]) -> tuple[Any, Any]:
        # A block of images at a time: its windows' taps copied, tap-major, into one contiguous
        # buffer (one copy), then the maximum and the index of each window's first maximum in
        # whole-block passes over it. That index is all backward needs: one byte per output
        # instead of the input, and no channel-strided comparisons of every tap left for
        # backward (cifar's pools, forward + backward: 1.41x and 1.14x faster than those).
        taps = kernel[0] * kernel[1]
        x = np.ascontiguousarray(x)
        n, c = x.shape[0], x.shape[3]
        y = np.empty((n, *out_hw, c), x.dtype)
        index = np.min_scalar_type(2 * taps - 1).type  # (for misses + taps, below)
        first = np.empty(y.shape, index)
        order = np.arange(taps, dtype=index).reshape(taps, 1, 1, 1, 1)
        # 2-byte floats: the maximum and its first tap found on int16 keys that order values
        # as np.maximum does (-0.0 and +0.0 equal, every NaN above +inf), then y that tap's
        # value: np.maximum.reduce's bits (the first of equals, the first NaN), without
        # NumPy's float16 loop or ml_dtypes' bfloat16 one (see _half_table). ml_dtypes'
        # maximum keeps the second of equals (so y is the last equal tap's value: +0.0 or
        # -0.0) and the first NaN; the gradient goes to the first equal tap in both.
        keys = self._half_bits(x)
        last_of_equals = keys and x.dtype != np.float16

        def work(worker: int, n0: int, n1: int) -> None:
            block = np.empty((taps, n1 - n0, *out_hw, c), x.dtype)
            np.copyto(self._as_taps(block, kernel),
                      self._window_taps(x[n0:n1], kernel, strides, out_hw))
            if keys:
                k = self._max_keys(block)
                top = np.maximum.reduce(k, axis=0)
                rank = np.multiply(np.not_equal(k, top).view(np.uint8), index(taps),
                                   dtype=index)
                np.add(rank, order, out=rank)
                fs = np.minimum.reduce(rank, axis=0, out=first[n0:n1])
                pick = fs
                if last_of_equals:  # (the last equal tap: taps - 1 - the least of taps - 1 - t)
                    np.subtract(rank, order, out=rank)
                    np.add(rank, order[::-1], out=rank)
                    pick = np.subtract(index(taps - 1), np.minimum.reduce(rank, axis=0))
                    np.copyto(pick, fs, where=top == 0x7FFF)  # (a NaN's window: the first)
                # y: the bits of tap pick (np.take_along_axis was 4x slower than this whole work)
                bits, ys = block.view(np.uint16), y[n0:n1].view(np.uint16)
                np.multiply(bits[0], pick == 0, out=ys)
                for t in range(1, taps):
                    ys |= np.multiply(bits[t], pick == t)
                fs[top == 0x7FFF] = taps  # (a NaN's window: no route, as below)
                return
            ys = np.maximum.reduce(block, axis=0, out=y[n0:n1])  # in tap order, as the standard
            # The first tap equal to the maximum: the least of t + taps * (tap t != maximum),
            # so taps or more where none is (a NaN's window).
            miss = np.not_equal(block, ys)
            rank = np.multiply(miss.view(np.uint8), index(taps), dtype=index)
            np.add(rank, order, out=rank)
            np.minimum.reduce(rank, axis=0, out=first[n0:n1])

        self.for_chunks(n, self._image_blocks(x), work)  # 2 MB: 1-1.2x faster than 1 MB here
        return y, _PoolRoutes(first, x.shape)

    def max_pool_backward(self, routes: Any, y: Any, dy: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int],
                          relu_grad: bool = False) -> Any:
        # A block of images at a time: each tap's share (dy where it is the window's first
        # maximum) into a contiguous tap-major buffer, then all of them to their places in dx
        # in one copy; added tap by tap where windows overlap, in the standard version's order
        # and in its accumulator's dtype, rounded once.
        first, shape = routes
        overlap = overlapping(kernel, strides)
        covered = (not overlap and shape[1] == out_hw[0] * kernel[0]
                   and shape[2] == out_hw[1] * kernel[1])
        dtype = dy.dtype.newbyteorder("=")  # (the void copy moves a big-endian dy's bytes as is)
        acc = np.dtype(accumulator(np, dtype)) if overlap else dtype
        dx = np.empty(shape, acc) if covered else np.zeros(shape, acc)
        zero = y.dtype.type(0)

        def work(worker: int, n0: int, n1: int) -> None:
            dys, fs, dxs = dy[n0:n1].astype(acc, copy=False), first[n0:n1], dx[n0:n1]
            if relu_grad and self._half_bits(dys) and y.dtype == dys.dtype:  # (_half_table)
                masked = np.empty(dys.shape, dys.dtype)
                self._lookup(self._half_mask_table(dys.dtype), dys, masked,
                             self._half_positive(y[n0:n1]))
                dys = masked
            elif relu_grad:  # a ReLU before the pool: no gradient where the maximum is <= 0
                dys = np.multiply(dys, y[n0:n1] > zero)
            order = np.arange(kernel[0] * kernel[1], dtype=fs.dtype).reshape(-1, 1, 1, 1, 1)
            # (taps, ...): tap t's share, dy's bits or +0: dy's bits as unsigned integers
            # times the hit (a float product made an infinite dy's inf * 0 NaN; this one is
            # as fast in float32 and float64, the whole backward 50-100x faster in float16
            # where windows tile; np.where was 3-10x slower; a bool hit was 5% slower)
            bits = np.dtype(f"u{acc.itemsize}")
            hits = np.equal(fs, order).view(np.uint8)
            shares = np.multiply(dys.view(bits), hits, dtype=bits).view(acc)
            if not overlap:
                np.copyto(self._window_taps(dxs, kernel, strides, out_hw),
                          self._as_taps(shares, kernel))
                return
            for t, share in enumerate(shares):
                d = window(dxs, *divmod(t, kernel[1]), out_hw, strides)
                np.add(d, share, out=d)

        self.for_chunks(shape[0], self._image_blocks(dx), work)
        return dx.astype(dtype, copy=False)

    @staticmethod
    def _max_keys(v: Any) -> Any:
        """int16 keys of 2-byte float ``v`` in np.maximum's order: the bits of v >= +0.0,
        those of negative v flipped and plus 1 (-0.0 to 0, the others below in order), every
        NaN 0x7FFF, above +inf (float16's 0x7C00, bfloat16's 0x7F80)."""
        i = v.view(np.int16)
        sign = np.right_shift(i, 15)  # (-1 where negative, else 0)
        keys = np.bitwise_and(sign, np.int16(0x7FFF))
        np.bitwise_xor(keys, i, out=keys)
        np.subtract(keys, sign, out=keys)
        inf = np.int16(NumpyKernels._inf_bits(v.dtype))
        nan = np.bitwise_and(i, np.int16(0x7FFF), out=sign) > inf
        np.copyto(keys, np.int16(0x7FFF), where=nan)
        return keys

    def _image_blocks(self, x: Any, budget: int = 1 << 21) -> int:
        """Images per block for per-image passes: about ``budget`` bytes, two blocks at least.
        For FeatureNorm on five image shapes (8x8x128 .. 32x32x64), 2 MB against 1 MB was
        1.2-1.7x faster forward on four (0.8x on 8x8x128) and as fast or up to 1.5x faster
        backward; 4 MB and more were slower again."""
        per_image = max(1, x[:1].nbytes)
        return max(1, min(-(-x.shape[0] // 2), budget // per_image))

    @staticmethod
    def _widen(positions: int, channels: int) -> int:
        """How many positions to fold into one row so that per-channel broadcasts run over
        rows of at least 256 values (NumPy's inner loop otherwise stops every C values): the
        least divisor of ``positions`` that gives them (any divisor: 27 x 27 has no power of
        two), all positions where none does."""
        need = -(-256 // max(channels, 1))
        if positions <= need:
            return max(positions, 1)
        small = [d for d in range(1, math.isqrt(positions) + 1) if positions % d == 0]
        return min(d for d in (*small, *(positions // d for d in small)) if d >= need)

    def _clamp(self, fn: Any, a: Any, value: float, out: Any) -> None:
        """``fn(a, value, out=out)`` for np.maximum / np.minimum with ``value`` as a constant
        row broadcast over ``a``: NumPy's loop for a scalar operand is ~2.5x slower than its
        array loop (0.25 against 0.1 ms for 2 MB of float32 here)."""
        if self._half_bits(a) and out.dtype == a.dtype:  # (see _half_table)
            if fn is np.maximum and value == 0 and a.dtype == np.float16:
                self._half_relu(a, out)
            else:
                self._lookup(self._half_table(a.dtype, (fn.__name__, value), lambda v: fn(
                    v, np.full(v.shape, value, v.dtype))), a, out)
            return
        if a.ndim == 0:
            fn(a, a.dtype.type(value), out=out)
            return
        n = a.shape[-1]
        if a.flags.c_contiguous and out.flags.c_contiguous and a.size % 256 == 0:
            a, out, n = a.reshape(-1, 256), out.reshape(-1, 256), 256
        key = (n, a.dtype.char, value)
        row = self._rows_cache.get(key)
        if row is None:
            row = self._rows_cache[key] = np.full(n, value, a.dtype)
        fn(a, row, out=out)

    # -- 2-byte floats (mixed precision): NumPy's float16 arithmetic and comparisons (and
    # ml_dtypes' bfloat16's) run a scalar loop per element, 13-43x float32's time, and its
    # casts to and from float32 branch on zeros and subnormals (3-4x slower after a ReLU).
    # A function of one such float (and a bool) has only 2**16 (2**17) inputs: computed once
    # by NumPy itself for all of them, so the same bits (NaN, inf, -0.0 and subnormals
    # included), then applied as a table lookup on the bits; ReLU and max pooling on the bits
    # (128x24x24x64, 1 thread: ReLU 62 -> 1.5 ms, Dropout 212 -> 9-13, max pool 82 -> 5).

    @staticmethod
    def _half_bits(a: Any) -> bool:
        """Whether ``a`` holds 2-byte floats whose bits a uint16 view reads (native order)."""
        return _half_float(a.dtype) and a.dtype.isnative

    def _half_table(self, dtype: Any, name: Any, fn: Callable[..., Any],
                    with_mask: bool = False) -> Any:
        """``fn`` of every 2-byte float of ``dtype`` (and, ``with_mask``, of each with False,
        then with True: ``fn(values, mask)``), as uint16 bits (or as ``fn`` gives bools)."""
        key = (np.dtype(dtype), name, with_mask)
        table = self._half_tables.get(key)
        if table is None:
            values = np.arange(1 << 16, dtype=np.uint16).view(dtype)
            with np.errstate(all="ignore"):
                if with_mask:
                    mask = np.repeat(np.array([False, True]), 1 << 16)
                    out = fn(np.concatenate([values, values]), mask)
                else:
                    out = fn(values)
            table = out if out.dtype == bool else out.view(np.uint16)
            self._half_tables[key] = table
        return table

    _LOOKUP_CHUNK = 1 << 14  # (np.take of uint16 indices: 2-3x slower than of intp ones)

    def _lookup(self, table: Any, a: Any, out: Any, mask: Any = None) -> None:
        """``out[...] = table[bits of a]`` (``table[mask * 2**16 + bits of a]`` with a bool
        ``mask``), ``out`` of ``a``'s 2-byte dtype (read as bits) or bool; in chunks of intp
        indices that stay in cache."""
        bits, dest = a.view(np.uint16), out if out.dtype == bool else out.view(np.uint16)
        if mask is not None and mask.shape != a.shape:
            mask = np.broadcast_to(mask, a.shape)
        arrays = (bits, dest) if mask is None else (bits, dest, mask)
        if not all(x.flags.c_contiguous for x in arrays):
            index = bits.astype(np.intp)
            if mask is not None:
                index |= np.left_shift(mask.view(np.uint8), 16, dtype=np.intp)
            np.take(table, index, out=dest, mode="clip")
            return
        bits, dest = bits.reshape(-1), dest.reshape(-1)
        high = None if mask is None else mask.reshape(-1).view(np.uint8)
        index = np.empty(min(bits.size, self._LOOKUP_CHUNK), np.intp)
        for s in range(0, bits.size, self._LOOKUP_CHUNK):
            e = min(bits.size, s + self._LOOKUP_CHUNK)
            i = index[:e - s]
            if high is None:
                np.copyto(i, bits[s:e], casting="unsafe")
            else:
                np.left_shift(high[s:e], 16, out=i, dtype=np.intp)
                np.bitwise_or(i, bits[s:e], out=i)
            np.take(table, i, out=dest[s:e], mode="clip")

    @staticmethod
    def _inf_bits(dtype: Any) -> Any:
        return np.array(np.inf).astype(dtype).view(np.uint16)[()]

    def _half_relu(self, a: Any, out: Any) -> None:
        """np.maximum(a, 0) of float16 on its bits: 0 where a < 0 (sign set, neither -0.0 nor
        NaN: bits 0x8001 to -inf's, which + 0x7FFF wrap to 0 .. inf's - 1), else a (-0.0 and
        NaN kept, as np.maximum keeps its first operand; ml_dtypes' bfloat16 maximum keeps
        the second and makes one NaN of all: it goes by table)."""
        bits = a.view(np.uint16)
        keep = np.add(bits, np.uint16(0x7FFF)) >= self._inf_bits(a.dtype)
        np.multiply(bits, keep, out=out.view(np.uint16))

    def _half_positive(self, a: Any, out: Any = None) -> Any:
        """``a > 0`` of 2-byte floats on their bits: 1 to inf's bits, not NaN nor negative."""
        return np.less(np.subtract(a.view(np.uint16), np.uint16(1)), self._inf_bits(a.dtype),
                       out=out)

    def _half_mask_table(self, dtype: Any, factor: Any = None) -> Any:
        """``(x * mask) * factor`` (mask_multiply's operations, in its dtype) by table."""
        def fn(v: Any, mask: Any) -> Any:
            o = np.multiply(v, mask)
            if factor is not None:
                o *= factor
            return o

        return self._half_table(dtype, ("mask_multiply", factor), fn, with_mask=True)

    def _ones(self, n: int, dtype: Any) -> Any:
        # (one vector per dtype, its first n: a cache per row count grew with every batch size
        # a process met)
        key = np.dtype(dtype).str
        ones = self._ones_cache.get(key)
        if ones is None or len(ones) < n:
            ones = self._ones_cache[key] = np.ones(max(n, 256), dtype)
        return ones[:n]

    def top_k_counts(self, z: Any, y: Any, ks: tuple[int, ...], dtype: Any) -> Any:
        # (one comparison pass against each row's target score, gathered, not masked out of
        # a (rows, classes) temporary; then each k compares the counts: the standard version
        # makes several (rows, classes) temporaries)
        if z.ndim != 2 or y.ndim not in (1, 2) or y.shape[0] != z.shape[0] or (
                y.ndim == 2 and y.shape != z.shape):
            return super().top_k_counts(z, y, ks, dtype)
        n, classes = z.shape
        labels = y if y.ndim == 1 else np.argmax(y, axis=1)
        if labels.dtype.kind not in "iu":
            return super().top_k_counts(z, y, ks, dtype)
        hit = (labels >= 0) & (labels < classes)  # (one that names no class never counts)
        target = z[np.arange(n), np.where(hit, labels, 0)]
        greater = np.count_nonzero(z > target[:, None], axis=1)  # (NaN is greater than none)
        counted = hit & np.isfinite(target)
        return np.asarray([np.count_nonzero(counted & (greater < min(k, classes)))
                           for k in ks], dtype=dtype)

    def sum_rows(self, a: Any) -> Any:
        # a matrix-vector product with ones: 5x faster than a reduction over axis 0
        if a.ndim != 2 or a.shape[0] < 2:
            return super().sum_rows(a)
        if _half_float(a.dtype):  # in float32, as the standard version (and no half BLAS)
            a = a.astype(np.float32)
        return np.matmul(self._ones(a.shape[0], a.dtype), a)

    def global_avg_pool(self, x: Any) -> Any:
        # each image's (H*W, C) sums as a product with ones: NumPy's sum over the two middle
        # axes is a strided reduction, ~4x slower (2.8x PyTorch's time at 128x8x8x64)
        if x.ndim != 4 or x.size == 0:
            return super().global_avg_pool(x)
        n, h, w, c = x.shape
        acc = accumulator(self.xp, x.dtype)
        xs = x.reshape(n, h * w, c).astype(acc, copy=False)
        total = np.matmul(self._ones(h * w, acc), xs)
        return (total / (h * w)).astype(x.dtype, copy=False)

    def feature_norm(self, x: Any, eps: float, dtype: Any, out_dtype: Any
                     ) -> tuple[Any, Any, Any]:
        """FeatureNorm's forward: (x - mean_hw) * inv_std, inv_std = 1 / sqrt(var_hw + eps),
        and those two per image and channel; each block of images makes all its passes while
        it is in cache, sums as products with ones, broadcasts over widened rows. Where the
        input or the output is in another dtype than ``dtype`` (mixed precision), each block
        is cast in and out on its own: no whole-batch copy in ``dtype``."""
        dtype = np.dtype(dtype)
        n, h, w, c = x.shape
        k = self._widen(h * w, c)
        y = np.empty(x.shape, out_dtype)
        mean, inv_std = np.empty((n, 1, 1, c), dtype), np.empty((n, 1, 1, c), dtype)
        ones = self._ones(h * w, dtype)
        scale = dtype.type(1.0 / (h * w))

        def work(worker: int, n0: int, n1: int) -> None:
            b = n1 - n0
            xs = x[n0:n1].reshape(b, h * w, c).astype(dtype, copy=False)
            out = y[n0:n1].reshape(b, h * w // k, k * c)
            o = out if out.dtype == dtype else np.empty(out.shape, dtype)
            m = mean[n0:n1, 0, 0, :] = np.matmul(ones, xs) * scale  # (b, c)
            np.subtract(xs.reshape(o.shape), np.tile(m, k)[:, None, :], out=o)
            o3 = o.reshape(b, h * w, c)
            var = np.matmul(ones, np.square(o3)) * scale
            inv = inv_std[n0:n1, 0, 0, :] = np.divide(dtype.type(1),
                                                      np.sqrt(var + dtype.type(eps)))
            np.multiply(o, np.tile(inv, k)[:, None, :], out=o)
            if o is not out:
                out[...] = o

        # blocks of 2 MB in ``dtype``, as where x is in it already
        self.for_chunks(n, self._image_blocks(x, (1 << 21) * x.itemsize // dtype.itemsize), work)
        return y, mean, inv_std

    def feature_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any,
                              relu: bool) -> Any:
        """inv_std * (dy - mean_hw(dy) - xhat * mean_hw(dy * xhat)), xhat = (x - mean) *
        inv_std recomputed as forward computes it, a block of images at a time (then times
        ``x > 0`` with ``relu`` on the block while it is in cache); cast in and out per block,
        as forward."""
        dtype = mean.dtype
        n, h, w, c = dy.shape
        k = self._widen(h * w, c)
        dx = np.empty(dy.shape, x.dtype)
        ones = self._ones(h * w, dtype)
        scale = dtype.type(1.0 / (h * w))

        def work(worker: int, n0: int, n1: int) -> None:
            b = n1 - n0
            shape = (b, h * w // k, k * c)
            d = dy[n0:n1].reshape(shape).astype(dtype, copy=False)
            xs, out = x[n0:n1].reshape(shape), dx[n0:n1].reshape(shape)
            o = out if out.dtype == dtype else np.empty(shape, dtype)
            inv = np.tile(inv_std[n0:n1, 0, 0, :], k)[:, None, :]
            xh = np.subtract(xs, np.tile(mean[n0:n1, 0, 0, :], k)[:, None, :], dtype=dtype)
            np.multiply(xh, inv, out=xh)
            m1 = np.matmul(ones, d.reshape(b, h * w, c)) * scale
            np.multiply(d, xh, out=o)
            m2 = np.matmul(ones, o.reshape(b, h * w, c)) * scale
            np.multiply(xh, np.tile(m2, k)[:, None, :], out=o)
            np.subtract(d, o, out=o)
            np.subtract(o, np.tile(m1, k)[:, None, :], out=o)
            np.multiply(o, inv, out=o)
            if relu:
                np.multiply(o, xs > 0, out=o)
            if o is not out:
                out[...] = o

        self.for_chunks(n, self._image_blocks(dy, (1 << 21) * dy.itemsize // dtype.itemsize),
                        work)
        return dx

    # -- BatchNorm2D: NumPy's reductions over the outer axes of channels-last data are ~28x
    # slower than a product with ones for few channels (and broadcasts over rows of C values
    # stop every C values), so the passes below run over (rows, k*C) views (see _widen), a
    # block of rows at a time while it is in cache, on the threads; each block's sums are
    # products with ones, added up in float64 (a bounded error, unlike one running sum).

    def _channel_blocks(self, x: Any, dtype: Any, budget: int = 1 << 21,
                        least: int = 2) -> tuple[int, int, int, int]:
        """(count, k, units, units per block): x's ``count`` positions as (units, k*C) rows
        of k positions each, in blocks of about ``budget`` bytes in ``dtype``, ``least``
        blocks at least."""
        c = x.shape[-1]
        count = x.size // c
        k = self._widen(count // x.shape[0] if x.ndim > 2 else count, c)
        units = count // k
        per_block = budget // (k * c * np.dtype(dtype).itemsize)
        return count, k, units, max(1, min(-(-units // least), per_block))

    def _channel_sums(self, partials: Any, k: int) -> Any:
        """The per-channel float64 sums (..., C) of ``partials``, (..., blocks, k*C) sums;
        as products with ones too (NumPy's sum over k rows of 3 values took ~10 us)."""
        ones = self._ones(max(partials.shape[-2], k), partials.dtype)
        rows = np.matmul(ones[:partials.shape[-2]], partials)
        return np.matmul(ones[:k], rows.reshape(*rows.shape[:-1], k, -1))

    @staticmethod
    def _channel_rows(k: int, dtype: Any, *values: Any) -> Any:
        """The (C,) ``values`` each tiled k times, in ``dtype``: the rows of one (len(values),
        k*C) array (one allocation, not an np.tile apiece: ~6 us of Python each)."""
        rows = np.empty((len(values), k, values[0].shape[-1]), dtype)
        for row, v in zip(rows, values, strict=True):
            row[...] = v
        return rows.reshape(len(values), -1)

    def batch_norm_train(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                         moving_var: Any, momentum: float, eps: float, out_dtype: Any,
                         relu: bool) -> tuple[Any, Any, Any]:
        if x.size == 0 or x.size < 2 * x.shape[-1]:  # (empty, or one value a channel)
            return super().batch_norm_train(x, gamma, beta, moving_mean, moving_var, momentum,
                                            eps, out_dtype, relu)
        dtype = gamma.dtype
        count, k, units, m = self._channel_blocks(x, dtype)
        xs = x.reshape(units, -1)
        y = np.empty(x.shape, out_dtype)  # (owning its memory: backward may write dx there)
        ones = self._ones(m, dtype)
        partials = np.empty((-(-units // m), xs.shape[1]))

        def sums(worker: int, u0: int, u1: int) -> None:
            partials[u0 // m] = np.matmul(ones[:u1 - u0], xs[u0:u1].astype(dtype, copy=False))

        self.for_chunks(units, m, sums)
        mean = (self._channel_sums(partials, k) / count).astype(dtype)
        mt = np.tile(mean, k)

        def squares(worker: int, u0: int, u1: int) -> None:
            t = np.subtract(xs[u0:u1], mt, dtype=dtype)
            partials[u0 // m] = np.matmul(ones[:u1 - u0], np.square(t, out=t))

        self.for_chunks(units, m, squares)
        var = (self._channel_sums(partials, k) / count).astype(dtype)
        self._update_running(moving_mean, moving_var, mean, var, momentum, count)
        inv_std = 1.0 / np.sqrt(var + eps)
        self._affine_rows(xs, y.reshape(xs.shape),
                          (mt, *(np.tile(v, k) for v in (inv_std, gamma, beta))), relu, dtype, m)
        return y, mean, inv_std

    def _affine_rows(self, xs: Any, y: Any, rows: tuple[Any, Any, Any, Any], relu: bool,
                     dtype: Any, m: int) -> None:
        """``y[...] = (xs - mean) * inv_std * gamma + beta`` in ``dtype``, then max(., 0) with
        ``relu``: ``rows`` the four (k*C,) tiled rows, ``xs`` and ``y`` (units, k*C), blocks of
        ``m`` units on the threads. In the standard version's order, the same bits: backward
        recomputes z for the ReLU's mask."""
        mt, it, gt, bt = rows

        def work(worker: int, u0: int, u1: int) -> None:
            out = y[u0:u1]
            o = out if out.dtype == dtype else np.empty(out.shape, dtype)
            np.subtract(xs[u0:u1], mt, out=o, dtype=dtype)
            np.multiply(o, it, out=o)
            np.multiply(o, gt, out=o)
            np.add(o, bt, out=o)
            if relu:
                self._clamp(np.maximum, o, 0.0, o)
            if o is not out:
                with np.errstate(over="ignore"):  # inf is what loss scaling looks for
                    np.copyto(out, o, casting="unsafe")

        self.for_chunks(xs.shape[0], m, work)

    def batch_norm_running(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                           moving_var: Any, eps: float, out_dtype: Any, relu: bool) -> Any:
        # (inference: the same passes as the standard version's, over widened rows in blocks
        # while they are in cache; 5-8x PyTorch's eval time before, for 3-32 channels)
        if x.size == 0:
            return super().batch_norm_running(x, gamma, beta, moving_mean, moving_var, eps,
                                              out_dtype, relu)
        dtype = gamma.dtype
        _, k, units, m = self._channel_blocks(x, dtype)
        xs = x.reshape(units, -1)
        y = np.empty(xs.shape, out_dtype)
        inv_std = 1.0 / np.sqrt(moving_var + eps)
        self._affine_rows(xs, y, tuple(np.tile(v, k) for v in (moving_mean, inv_std, gamma,
                                                                beta)), relu, dtype, m)
        return y.reshape(x.shape)

    def batch_norm_running_backward(self, dy: Any, x: Any, gamma: Any, beta: Any,
                                    moving_mean: Any, moving_var: Any, eps: float,
                                    relu: bool) -> Any:
        # (a frozen layer's gradient: the standard version's operations in its order over
        # widened rows in blocks on the threads, as batch_norm_running; on the standard path a
        # frozen layer's step cost 1.55x a trainable one's at 28x28x3)
        if x.size == 0 or dy.shape != x.shape:
            return super().batch_norm_running_backward(dy, x, gamma, beta, moving_mean,
                                                       moving_var, eps, relu)
        dtype = gamma.dtype
        _, k, units, m = self._channel_blocks(x, dtype)
        xs, dys = x.reshape(units, -1), dy.reshape(units, -1)
        st = np.tile(gamma / np.sqrt(moving_var + eps), k)
        inv_std = 1.0 / np.sqrt(moving_var + eps)
        mt, it, gt, bt = (np.tile(v, k) for v in (moving_mean, inv_std, gamma, beta))
        dx = np.empty(xs.shape, x.dtype)

        def work(worker: int, u0: int, u1: int) -> None:
            out = dx[u0:u1]
            o = out if out.dtype == dtype else np.empty(out.shape, dtype)
            d = dys[u0:u1].astype(dtype, copy=False)
            if relu:  # (z > 0, z as forward computes it: _affine_rows)
                z = np.subtract(xs[u0:u1], mt, dtype=dtype)
                np.multiply(z, it, out=z)
                np.multiply(z, gt, out=z)
                np.multiply(d, np.add(z, bt, out=z) > 0, out=o)
                d = o
            np.multiply(d, st, out=o)
            if o is not out:
                with np.errstate(over="ignore"):  # inf is what loss scaling looks for
                    np.copyto(out, o, casting="unsafe")

        self.for_chunks(units, m, work)
        return dx.reshape(x.shape)

    # (blocks of 512 KB for the backward passes, one where the batch is smaller: 5-15% faster
    # than 256 KB ones here at 128x8x8x64 .. 128x28x28x16 with two block temporaries made
    # once, 1 MB ones no faster; 64 KB ones paid more Python than they saved)
    _BN_BACKWARD_BLOCK = 1 << 19
    # (the largest |mean| / std for which backward works on x, not x - mean: see
    # batch_norm_backward)
    _BN_NEAR = 2.0

    @staticmethod
    def _worst(a: Any) -> float:
        """The largest of ``a``'s values, inf where one is NaN."""
        worst = float(np.max(a))
        return np.inf if np.isnan(worst) else worst

    def batch_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                            beta: Any, relu: bool, input_grad: bool,
                            relu_y: Any = None, spare_y: bool = False, *,
                            eps: float | None = None) -> tuple[Any, Any, Any]:
        """The standard version's gradients. ``eps``, forward's, tells the batch's spread
        (var = 1 / inv_std**2 - eps), which decides whether the passes may work on x itself:
        without it they work on x - mean."""
        if x.size == 0 or x.size < 2 * x.shape[-1] or dy.shape != x.shape:
            return super().batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu,
                                               input_grad, relu_y, spare_y)
        # Two passes over blocks of rows, each block read once a pass while it is in cache
        # (the time goes to reading memory: a pass fewer over a cold array is worth more than
        # an operation fewer on a block in cache). The first sums dm (dy, with relu masked)
        # and dm * x, products with ones; the second makes dx = s * dm - c * x + v per
        # channel (s = inv_std * gamma; c, v from the sums): 5 elementwise passes (6 before,
        # x - mean made in both). The ReLU's mask is y > 0 where forward's y has gamma's
        # dtype (kept by the layer), written as 1.0 / 0.0 into dm's memory and multiplied by
        # dy there (a multiply by a bool array converts it a value at a time: 4x slower): 7
        # passes (9 before); 11 with z > 0 recomputed (no such y). Where dx has the
        # parameters' dtype it keeps dm from the first pass to the second; under mixed
        # precision (float16 x and dx) the mask is kept a byte a value: no whole-batch
        # float32 temporary beside dx. A spare y (held by nothing else) becomes dx: each
        # block's y read before its dm overwrites it, so keeping y costs no memory here.
        # Accuracy: each product dm * x is rounded relative to |x| ~ |mean| + std, each of
        # dm * (x - mean) relative to std, so taking the mean's share off after the sums
        # loses a factor 1 + |mean| / std more of sum(dm * xhat) (std = sqrt(var); a channel
        # of variance near eps or below, or constant, has |mean| / std in the 100s where
        # |mean| * inv_std is 10; dx from x loses less, c * x less c * mean): x - mean stands
        # for x in both passes where |mean| / std > _BN_NEAR in a channel, or without eps (6
        # passes, 9 with the ReLU, 12 with z, as before: without the ReLU the first pass's x -
        # mean kept in dx's memory for the second; a constant channel's dgamma is 0 there, as
        # before). The same arithmetic whether the mask comes from y or z, and with the ReLU
        # or after a ReLU layer's backward: the same gradients, bit for bit. (Sums of dy * y
        # would spare the first pass reading x, 0-10% here, but lose a factor |beta| /
        # (|gamma| * std * inv_std), and those bits.)
        dtype = gamma.dtype
        count, k, units, m = self._channel_blocks(x, dtype, self._BN_BACKWARD_BLOCK, 1)
        xs, dys = x.reshape(units, -1), dy.reshape(units, -1)  # (a broadcast dy: copied)
        from_y = relu and relu_y is not None and relu_y.dtype == dtype and \
            relu_y.shape == x.shape
        ys = relu_y.reshape(units, -1) if from_y else None
        mean64, inv64, gamma64 = np.array((mean, inv_std, gamma), np.float64)
        with np.errstate(all="ignore"):
            # (std * inv_std; NaN without eps: the spread unknown)
            spread = np.sqrt(1.0 - eps * inv64 ** 2) if eps is not None else np.nan
            away = np.abs(mean64) * inv64  # (|mean| / sqrt(var + eps))
            shift = not self._worst(away / spread) <= self._BN_NEAR  # (|mean| / std)
        if shift or (relu and not from_y):
            mt, it, gt, bt = self._channel_rows(k, dtype, mean, inv_std, gamma, beta)
        ones = self._ones(m, dtype)
        partials = np.empty((2, -(-units // m), xs.shape[1]))
        keep = input_grad and relu and x.dtype == dtype  # (dx holds dm)
        t_in_dx = input_grad and not relu and shift and x.dtype == dtype  # (dx holds t)
        in_y = (keep and from_y and spare_y and relu_y.flags.c_contiguous
                and relu_y.flags.owndata and relu_y.flags.writeable)
        dx = ys if in_y else np.empty(xs.shape, x.dtype) if input_grad else None
        mask = np.empty(xs.shape, bool) if input_grad and relu and not keep else None
        # (each thread's block temporaries, made at its first block, not per operation: one,
        # and one for dm or dx in gamma's dtype where dx does not hold them; by the worker
        # indices for_chunks hands out, however many threads it counts)
        temps = 2 if (relu and not keep) or (input_grad and x.dtype != dtype) else 1
        scratch: dict[int, Any] = {}

        def blocks(worker: int, rows: int) -> Any:
            s = scratch.get(worker)
            if s is None:
                s = scratch[worker] = np.empty((temps, m, xs.shape[1]), dtype)
            return s[:, :rows]

        def sums(worker: int, u0: int, u1: int) -> None:
            tmp, *other = blocks(worker, u1 - u0)
            t = (np.subtract(xs[u0:u1], mt, out=dx[u0:u1] if t_in_dx else tmp, dtype=dtype)
                 if shift else xs[u0:u1])
            if relu:
                d = dx[u0:u1] if keep else other[0]  # (dm's memory)
                if from_y:
                    z = ys[u0:u1]
                else:  # (z > 0, z as forward computes it: _affine_rows)
                    z = (np.multiply(t, it, out=d) if shift else
                         np.multiply(np.subtract(t, mt, out=d, dtype=dtype), it, out=d))
                    np.multiply(z, gt, out=z)
                    np.add(z, bt, out=z)
                if mask is None:
                    np.multiply(np.greater(z, 0, out=d, casting="unsafe"), dys[u0:u1],
                                out=d)
                else:
                    np.multiply(dys[u0:u1], np.greater(z, 0, out=mask[u0:u1]), out=d)
            else:
                d = dys[u0:u1].astype(dtype, copy=False)
            p = np.multiply(t, d, out=tmp, dtype=dtype)  # (before the sums: 10% faster here)
            partials[0, u0 // m] = np.matmul(ones[:u1 - u0], d)
            partials[1, u0 // m] = np.matmul(ones[:u1 - u0], p)

        self.for_chunks(units, m, sums)
        # (float64 from here: sum(dm * xhat) from sum(dm) and sum(dm * x), or sum(dm * (x -
        # mean)))
        dbeta, summed = self._channel_sums(partials, k)
        dgamma = (summed - (0.0 if shift else mean64) * dbeta) * inv64
        if not input_grad:
            return None, dgamma.astype(dtype), dbeta.astype(dtype)
        scale = inv64 * gamma64
        c = dgamma * inv64 / count
        ct, st, vt = self._channel_rows(k, dtype, scale * c, scale,
                                        scale * ((0.0 if shift else c * mean64) - dbeta / count))

        def grads(worker: int, u0: int, u1: int) -> None:
            tmp, *other = blocks(worker, u1 - u0)
            out = dx[u0:u1]
            if t_in_dx:  # (out holds x - mean: the operations below, in their order)
                q = np.multiply(out, ct, out=out)
                np.subtract(np.multiply(dys[u0:u1], st, out=tmp, dtype=dtype), q, out=q)
                np.add(q, vt, out=q)
                return
            o = out if out.dtype == dtype else other[0]
            t = np.subtract(xs[u0:u1], mt, out=tmp, dtype=dtype) if shift else xs[u0:u1]
            q = np.multiply(t, ct, out=tmp, dtype=dtype)
            if keep:  # (out holds dm)
                d = out
            elif relu:
                d = np.multiply(dys[u0:u1], mask[u0:u1], out=o)
            else:
                d = dys[u0:u1]
            np.multiply(d, st, out=o, dtype=dtype)
            np.subtract(o, q, out=o)
            np.add(o, vt, out=o)
            if o is not out:
                with np.errstate(over="ignore"):  # inf is what loss scaling looks for
                    np.copyto(out, o, casting="unsafe")

        self.for_chunks(units, m, grads)
        return dx.reshape(x.shape), dgamma.astype(dtype), dbeta.astype(dtype)

    def _elementwise(self, fn: Callable[..., None], dtype: Any, *arrays: Any) -> Any:
        """``fn(*row_blocks_of_arrays, out_block)`` over row blocks on threads; the arrays all
        have one shape, and so does the returned ``out``."""
        x = arrays[0]
        out = np.empty(x.shape, dtype)
        if x.ndim == 0 or any(a.shape != x.shape for a in arrays):
            fn(*arrays, out)
            return out
        self.for_chunks(x.shape[0], self._split_rows(x.shape[0], x.size, self._SPLIT_ELEMENTS),
                        lambda w, a, b: fn(*(arr[a:b] for arr in arrays), out[a:b]))
        return out

    def uniform(self, state: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
        # the definition's arithmetic in place on uint64 views (logical shifts, no masks), in
        # chunks that stay in cache, on the threads; the draw taken (and counted) first, as
        # one step across threads
        bits = random.significant_bits(np, dtype)
        out = np.empty(int(np.prod(shape)), dtype)
        key = random.take_draw(state).view(np.uint64)
        gamma, mix_1, mix_2 = (np.int64(c).view(np.uint64)
                               for c in (random.GAMMA, random.MIX_1, random.MIX_2))

        def fill(worker: int, a: int, b: int) -> None:
            z = np.arange(first + a + 1, first + b + 1, dtype=np.uint64)
            t = np.empty_like(z)
            z *= gamma
            z += key
            for s, m in ((30, mix_1), (27, mix_2), (31, None)):
                np.right_shift(z, np.uint64(s), out=t)
                z ^= t
                if m is not None:
                    z *= m
            np.right_shift(z, np.uint64(64 - bits), out=z)
            np.multiply(z, 2.0**-bits, out=out[a:b], casting="unsafe")

        self.for_chunks(out.size, self._UNIFORM_CHUNK, fill)
        return out.reshape(shape)

    _UNIFORM_CHUNK = 1 << 16  # (measured best of 2**12-2**18 for a 1.2M-number mask)

    def random_crop(self, state: Any, x: Any, padding: int, out_dtype: Any,
                    first: int = 0) -> Any:
        # one slice copy per image from a zero-padded copy (6.7 -> ~1 ms for 128 32x32x3),
        # cast as it is copied
        u = self.uniform(state, (x.shape[0], 2), np.float32, first)
        p, (h, w) = padding, x.shape[1:3]
        offsets = np.floor(u * np.float32(2 * p + 1)).astype(np.intp)
        xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        out = np.empty(x.shape, out_dtype)
        for i, (dy, dx) in enumerate(offsets):
            out[i] = xpad[i, dy:dy + h, dx:dx + w]
        return out

    def mask_multiply(self, x: Any, mask: Any, scale: float | None = None,
                      relu_y: Any = None) -> Any:
        factor = None if scale is None else x.dtype.type(scale)  # (as x *= scale rounds it)
        zero = None if relu_y is None else relu_y.dtype.type(0)
        half = (self._half_bits(x) and mask.dtype == bool
                and (relu_y is None or relu_y.dtype == x.dtype))
        table = self._half_mask_table(x.dtype, factor) if half else None

        def fn(a: Any, m: Any, *rest: Any) -> None:
            *r, o = rest
            if table is not None:  # (by table, the ReLU's mask too: see _half_table)
                self._lookup(table, a, o, m)
                if r:
                    self._lookup(self._half_mask_table(x.dtype), o, o, self._half_positive(r[0]))
                return
            np.multiply(a, m, out=o)
            if factor is not None:  # (on the block while it is in cache)
                o *= factor
            if r:
                np.multiply(o, r[0] > zero, out=o)

        # (a mask that broadcasts: at once)
        return self._elementwise(fn, x.dtype, x, mask, *(() if relu_y is None else (relu_y,)))

    def relu_backward(self, dy: Any, y: Any) -> Any:
        if y.shape != dy.shape:
            return super().relu_backward(dy, y)
        zero = y.dtype.type(0)
        if self._half_bits(dy) and y.dtype == dy.dtype:  # (by table: see _half_table)
            table = self._half_mask_table(dy.dtype)
            return self._elementwise(
                lambda d, yy, o: self._lookup(table, d, o, self._half_positive(yy)), dy.dtype,
                dy, y)
        # the comparison too in row blocks on the threads (not one pass over the whole batch
        # first): 3.1 -> 2.5 ms for a 32x32x32 layer's gradient
        return self._elementwise(lambda d, yy, o: np.multiply(d, yy > zero, out=o), dy.dtype,
                                 dy, y)

    def add_relu(self, arrays: list[Any], relu: bool) -> Any:
        if not relu or not alike(arrays):
            return super().add_relu(arrays, relu)
        *first, last = arrays  # (all but the last summed as the standard version sums them)
        head = first[0] if len(first) == 1 else super().add_relu(first, False)

        def fn(a: Any, b: Any, o: Any) -> None:  # (each row block while it is in cache)
            np.add(a, b, out=o)
            self._clamp(np.maximum, o, 0.0, o)

        return self._elementwise(fn, last.dtype, head, last)

    def add_relu_backward(self, dys: list[Any], relu_y: Any) -> Any:
        if relu_y is None or len(dys) < 2 or not alike([*dys, relu_y]):
            return super().add_relu_backward(dys, relu_y)
        *first, last = dys
        head = first[0] if len(first) == 1 else super().add_relu_backward(first, None)
        zero = relu_y.dtype.type(0)

        def fn(a: Any, b: Any, y: Any, o: Any) -> None:
            np.add(a, b, out=o)
            np.multiply(o, y > zero, out=o)

        return self._elementwise(fn, last.dtype, head, last, relu_y)

    def relu(self, x: Any, max_value: float | None) -> Any:
        def fn(a: Any, o: Any) -> None:
            self._clamp(np.maximum, a, 0.0, o)
            if max_value is not None:
                self._clamp(np.minimum, o, max_value, o)

        return self._elementwise(fn, x.dtype, x)

    def relu_with_mask(self, x: Any, max_value: float | None) -> tuple[Any, Any]:
        zero = x.dtype.type(0)
        cap = None if max_value is None else x.dtype.type(max_value)
        mask = np.empty(x.shape, bool)

        half = self._half_bits(x)

        def fn(a: Any, m: Any, o: Any) -> None:
            self._clamp(np.maximum, a, 0.0, o)
            if half:  # (on the bits: see _half_table)
                self._half_positive(a, m)
            else:
                np.greater(a, zero, out=m)
            if cap is not None:
                self._clamp(np.minimum, o, max_value, o)
                if half:
                    below = np.empty(a.shape, bool)
                    self._lookup(self._half_table(x.dtype, ("below", max_value),
                                                  lambda v: v < cap), a, below)
                else:
                    below = a < cap
                np.logical_and(m, below, out=m)

        return self._elementwise(fn, x.dtype, x, mask), mask

    # -- optimiser updates (``fused_updates``; see xpcnn.optim) ------------------------------
    # The standard formulas' operations in the same order, so the same bits, but in place:
    # no temporaries the size of each parameter, and large parameters split over the threads
    # (the `mnist` model's SGD update: 2.1 -> 1.2 ms). The per-step numbers are Python floats
    # or 0-d arrays (a captured step's), met as the standard formulas meet them. ``apply`` (a
    # 0-d bool array or None): where False, nothing changes; on the CPU reading it costs nothing.

    def _update_blocks(self, update: Callable[..., None], params: list[Any],
                       *per_param: list[Any] | None) -> None:
        """``update(p, g, *slots)`` on 1-D blocks of each parameter (threads share big ones);
        a parameter or slot that is not contiguous gets ``update`` on its whole array."""
        for i, p in enumerate(params):
            arrays = [p] + [a[i] for a in per_param if a is not None]
            if not all(a.flags.c_contiguous and a.shape == p.shape for a in arrays):
                update(*arrays)
                continue
            flat = [a.reshape(-1) for a in arrays]
            n = p.size
            self.for_chunks(n, self._split_rows(n, n, self._SPLIT_ELEMENTS),
                            lambda w, a, b, flat=flat: update(*(f[a:b] for f in flat)))

    @staticmethod
    def takes_clip(params: list[Any], grads: list[Any], clip: tuple[str, float]) -> bool:
        """Whether the updates clip these gradients themselves (``clip``: xpcnn.optim's
        Optimizer._clip): each of its parameter's dtype and shape; a norm of float32 or
        float64 ones."""
        return all(g.dtype == p.dtype and g.shape == p.shape
                   and (clip[0] == "value" or g.dtype in (np.float32, np.float64))
                   for p, g in zip(params, grads, strict=True))

    def _clipped_blocks(self, clip: tuple[str, float] | None, update: Callable[..., None],
                        params: list[Any], grads: list[Any], *per_param: list[Any] | None
                        ) -> None:
        """:meth:`_update_blocks` with each gradient clipped as Optimizer._clipped clips it,
        in the update's blocks: a value clipped into a block's temporary, a norm's factor
        (c / max(norm, c), in the gradient's dtype) multiplied in where it is not 1. The same
        bits, with no clipped copy of a whole gradient: a norm's squares are one gradient's at a
        time, summed by ``np.sum`` whole, as the standard way sums them (NumPy's summation
        order changes between versions: a sum in pieces would not give its bits)."""
        if clip is None:
            self._update_blocks(update, params, grads, *per_param)
            return
        kind, c = clip
        if kind == "value":
            def bounded(g: Any) -> Any:
                bound = g.dtype.type(c)
                return np.clip(g, -bound, bound)

            self._update_blocks(_in_pieces(update, bounded), params, grads, *per_param)
            return
        squares = [np.sum(g * g) for g in grads]
        if kind == "global":  # (summed in order, as the standard way sums them)
            total = squares[0]
            for s in squares[1:]:
                total = total + s
            squares = [total] * len(grads)
        for i, s in enumerate(squares):
            norm = np.sqrt(s)
            shrink = c / (norm if norm > c else norm.dtype.type(c))  # (1 for a NaN norm)

            self._update_blocks(
                update if shrink == 1 else _in_pieces(update, lambda g, f=shrink: g * f),
                [params[i]], [grads[i]], *(None if a is None else [a[i]] for a in per_param))

    def sgd_update(self, params: list[Any], grads: list[Any], bufs: list[Any] | None,
                   lr: Any, weight_decay: float, momentum: float, nesterov: bool,
                   apply: Any = None, clip: tuple[str, float] | None = None) -> None:
        if apply is not None and not apply:
            return

        def update(p: Any, g: Any, buf: Any = None) -> None:
            if weight_decay:
                g = g + weight_decay * p
            if buf is not None:
                np.multiply(buf, momentum, out=buf)
                np.add(buf, g, out=buf)
                g = g + momentum * buf if nesterov else buf
            np.subtract(p, lr * g, out=p)

        self._clipped_blocks(clip, update, params, grads, bufs)

    def adam_update(self, params: list[Any], grads: list[Any], ms: list[Any], vs: list[Any],
                    decay: Any, step: Any, bc2: Any, weight_decay: float, decoupled: bool,
                    beta_1: float, beta_2: float, epsilon: float, apply: Any = None,
                    vhats: list[Any] | None = None, clip: tuple[str, float] | None = None
                    ) -> None:
        """``decay``, ``step``, ``bc2``: as :meth:`StandardKernels.adam_scalars` gives them (as
        Python floats here: they meet each parameter in its own dtype); ``vhats``: AMSGrad's
        largest second moments (None without it)."""
        if apply is not None and not apply:
            return
        decay, step, bc2 = float(decay), float(step), float(bc2)

        def update(p: Any, g: Any, m: Any, v: Any, vhat: Any = None) -> None:
            if weight_decay and not decoupled:
                g = g + weight_decay * p
            np.multiply(m, beta_1, out=m)
            np.add(m, (1.0 - beta_1) * g, out=m)
            np.multiply(v, beta_2, out=v)
            np.add(v, (1.0 - beta_2) * (g * g), out=v)
            if vhat is not None:
                v = np.maximum(vhat, v, out=vhat)
            denom = np.sqrt(v / bc2)
            np.add(denom, epsilon, out=denom)
            change = np.multiply(step, m)
            np.divide(change, denom, out=change)
            if weight_decay and decoupled:
                # p * decay into denom's memory (free now; of the dtype p * decay has, as in
                # the standard formula, which rounds to p's dtype only once, at the end)
                np.subtract(np.multiply(p, decay, out=denom), change, out=p)
            else:
                np.subtract(p, change, out=p)

        self._clipped_blocks(clip, update, params, grads, ms, vs, vhats)

    def rmsprop_update(self, params: list[Any], grads: list[Any], vs: list[Any],
                       means: list[Any] | None, bufs: list[Any] | None, lr: Any,
                       weight_decay: float, rho: float, momentum: float, epsilon: float,
                       apply: Any = None, clip: tuple[str, float] | None = None) -> None:
        """``means``: the centered variant's mean gradients (None where not centered);
        ``bufs``: the momentum buffers (None without momentum)."""
        if apply is not None and not apply:
            return

        def update(p: Any, g: Any, v: Any, *rest: Any) -> None:
            a = rest[0] if means is not None else None
            buf = rest[-1] if bufs is not None else None
            if weight_decay:
                g = g + weight_decay * p
            np.multiply(v, rho, out=v)
            np.add(v, (1.0 - rho) * (g * g), out=v)
            var = v
            if a is not None:
                np.multiply(a, rho, out=a)
                np.add(a, (1.0 - rho) * g, out=a)
                squared = a * a
                var = np.where(v > squared, v - squared, 0.0)
            u = np.sqrt(var)
            np.add(u, epsilon, out=u)
            # (into u only where the quotient has u's dtype: a wider gradient's stays wider,
            # as in the standard formula)
            u = np.divide(g, u, out=u if np.result_type(g, u) == u.dtype else None)
            if buf is not None:
                np.multiply(buf, momentum, out=buf)
                np.add(buf, u, out=buf)
                u = buf
            np.subtract(p, np.multiply(lr, u), out=p)

        self._clipped_blocks(clip, update, params, grads, vs, means, bufs)


# Elements of a clipped gradient's piece (512 KiB of float32): the update's temporaries are
# of a piece, not of a thread's block (8 MiB of a 4096 x 4096 parameter's), and stay in cache.
_CLIP_PIECE = 1 << 17


def _in_pieces(update: Callable[..., None], load: Callable[[Any], Any]) -> Callable[..., None]:
    """``update(p, g, *slots)`` on pieces of 1-D blocks, ``load(g)`` (the clipped gradient, a
    temporary) given for ``g``; on a whole array where it is not 1-D."""
    def run(p: Any, g: Any, *rest: Any) -> None:
        if p.ndim != 1:
            update(p, load(g), *rest)
            return
        for a in range(0, p.shape[0], _CLIP_PIECE):
            piece = slice(a, a + _CLIP_PIECE)
            update(p[piece], load(g[piece]), *(r[piece] for r in rest))

    return run


KERNELS = NumpyKernels()
