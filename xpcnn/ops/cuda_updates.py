"""The CUDA kernels behind :mod:`xpcnn.ops.fast_cupy` that take many arrays in one launch, each
thread finding its element's array through a table of addresses: the optimisers' updates,
Adam's per-step numbers, a step's record (the gradients' check, then the record), the casts of
``cast_all`` and the snapshot and restore of normalisation statistics. And those tables: made
on the host, kept on the device by content, or filled once a CUDA graph's capture has ended
(``DeferredTables``).
"""

from __future__ import annotations

import itertools
from typing import Any

import cupy
import numpy as np

from .cuda_elementwise import ACC

# The optimisers' updates (the formulas of xpcnn.optim, in the same order) for every parameter
# of a step in one launch: one thread per element of all of them. ``table`` holds the running
# element offsets of the ``count`` arrays (count + 1 values), then per array the addresses of
# the parameter, its gradient and its state arrays (``slots`` of them); a binary search finds
# the array an element belongs to.
_SEARCH = """
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((long long)i >= table[mid]) lo = mid; else hi = mid - 1;
    }
    const long long e = (long long)i - table[lo];
"""
# The gradient is clipped as it is loaded (xpcnn.optim's Optimizer._clipped, as the standard
# formulas clip it): ``clipping`` 1, to [-clip, clip] (NaN stays NaN); 2, by the factor
# clip / max(norm, clip) of its own norm, the square root of ``sums[lo]``; 3, of all the
# arrays' joint norm, of ``sums[count]`` (the sums of squares of
# cuda_reductions.SUM_SQUARES_SOURCE, rounded to T as the standard ones are in T); 0, not.
_FIND_ARRAY = _SEARCH + """    const long long row = count + 1 + (long long)lo * (2 + slots);
    T& p = ((T*)table[row])[e];
    T g = ((const T*)table[row + 1])[e];
    if (clipping == 1) {
        const T low = (T)0 - clip;
        g = g > clip ? clip : g < low ? low : g;
    } else if (clipping > 1) {
        const T norm = sqrt((T)sums[clipping == 2 ? lo : count]);
        g = g * (clip / (norm > clip ? norm : clip));
    }
"""


def _update_kernels(name: str, constants: str, per_step: tuple[str, ...], body: str
                    ) -> tuple[Any, Any]:
    """An update kernel in two versions: the numbers that change from step to step
    (``per_step``) passed by value (eager steps), and read from one-element device arrays
    ``<name>_at`` (a step captured in a CUDA graph, which would keep by-value arguments as they
    were at the capture). ``apply[0]`` false (a step the device found non-finite): every element
    is left as it is."""
    head = ("raw T dtype_of, int32 count, int32 slots, int32 clipping, T clip, raw float64 sums, "
            + constants)
    by_value = "".join(f", T {s}" for s in per_step)
    on_device = "".join(f", raw T {s}_at" for s in per_step)
    read = "".join(f"const T {s} = {s}_at[0];" for s in per_step)
    gate = "if (!apply[0]) continue;"
    return (cupy.ElementwiseKernel(head + by_value + ", raw bool apply", "raw int64 table",
                                   gate + _FIND_ARRAY + body, f"xpcnn_{name}", preamble=ACC),
            cupy.ElementwiseKernel(head + on_device + ", raw bool apply", "raw int64 table",
                                   gate + read + _FIND_ARRAY + body, f"xpcnn_{name}_at",
                                   preamble=ACC))


# (the parameter and the momentum read once each, into w and m: read through the references,
# each was read again after the store to the other, which may alias it for the compiler; no
# weight-decay term where it is 0, as in xpcnn.optim: 0 * an infinite weight would be NaN;
# computed in A, float for float16 (CuPy's float16 has no arithmetic: float16 values make a
# float, and ``c ? float : float16`` is ambiguous), each stored value rounded to T once)
SGD, SGD_AT = _update_kernels("sgd", "T wd, T mom, bool nesterov", ("lr",), """
    typedef XpcnnAcc<T>::type A;
    const A w = (A)p, dg = (A)g;
    const A grad = wd != (T)0 ? dg + (A)wd * w : dg;
    if (slots == 0) {
        p = (T)(w - (A)lr * grad);
    } else {
        T& buf = ((T*)table[row + 2])[e];
        const T m = (T)((A)mom * (A)buf + grad);
        buf = m;
        p = (T)(w - (A)lr * (nesterov ? grad + (A)mom * (A)m : (A)m));
    }
    """)
# (each array read once and written once, through locals, as SGD: tests/kernel_trace.py
# counted the parameter read three times and, decoupled, written twice; a third slot where
# ``slots`` counts one, AMSGrad's largest second moment, which the denominator then takes: the
# larger, or a NaN of either, as xp.maximum keeps it)
ADAM, ADAM_AT = _update_kernels(
    "adam", "T wd, bool decoupled, T b1, T c1, T b2, T c2, T eps", ("decay", "step", "bc2"), """
    T& m_at = ((T*)table[row + 2])[e];
    T& v_at = ((T*)table[row + 3])[e];
    T w = p, grad = g;
    if (decoupled) w = w * decay;
    else if (wd != (T)0) grad = grad + wd * w;
    const T m = b1 * m_at + c1 * grad;
    T v = b2 * v_at + c2 * (grad * grad);
    m_at = m;
    v_at = v;
    if (slots > 2) {
        T& vhat_at = ((T*)table[row + 4])[e];
        const T vhat = vhat_at;
        if (!(v > vhat || v != v)) v = vhat;
        vhat_at = v;
    }
    p = w - step * m / (sqrt(v / bc2) + eps);
    """)

# Adam's numbers of an update from its count of applied updates, on the device where a skipped
# step is decided, as StandardKernels.adam_scalars computes them (in double, rounded once; the
# numbers of a skipped update are unused): one thread.
_ADAM_SCALARS_BODY = """
    const double t = applied[0] + (apply[0] ? 1.0 : 0.0);
    applied[0] = t;
    const double at = t > 0.0 ? t : 1.0;
    out[0] = (T)(1.0 - lr * wd);
    out[1] = (T)(lr / (1.0 - pow(b1, at)));
    out[2] = (T)(1.0 - pow(b2, at));
"""
_ADAM_SCALARS_PARAMS = "raw bool apply, float64 wd, float64 b1, float64 b2"
_ADAM_SCALARS_OUT = "raw float64 applied, raw T out"
ADAM_SCALARS = cupy.ElementwiseKernel(_ADAM_SCALARS_PARAMS + ", float64 lr", _ADAM_SCALARS_OUT,
                                      _ADAM_SCALARS_BODY, "xpcnn_adam_scalars")
ADAM_SCALARS_AT = cupy.ElementwiseKernel(_ADAM_SCALARS_PARAMS + ", raw float64 lr_at",
                                         _ADAM_SCALARS_OUT,
                                         "const double lr = lr_at[0];" + _ADAM_SCALARS_BODY,
                                         "xpcnn_adam_scalars_at")

# (slot 0 the mean square v, then the mean gradient a where ``centered``, then the momentum
# buffer where ``slots`` counts one more; each read once and written once, as ADAM's; in A,
# as SGD's)
RMSPROP, RMSPROP_AT = _update_kernels(
    "rmsprop", "T wd, T rho, T c, bool centered, T mom, T eps", ("lr",), """
    typedef XpcnnAcc<T>::type A;
    T& v_at = ((T*)table[row + 2])[e];
    const A w = (A)p, dg = (A)g;
    const A grad = wd != (T)0 ? dg + (A)wd * w : dg;
    const T v = (T)((A)rho * (A)v_at + (A)c * (grad * grad));
    v_at = v;
    A var = (A)v;
    if (centered) {
        T& a_at = ((T*)table[row + 3])[e];
        const T a = (T)((A)rho * (A)a_at + (A)c * grad);
        a_at = a;
        const A square = (A)a * (A)a;
        var = var > square ? var - square : (A)0;
    }
    A u = grad / (sqrt(var) + (A)eps);
    if (slots > (centered ? 2 : 1)) {
        T& b_at = ((T*)table[row + (centered ? 4 : 3)])[e];
        const T b = (T)((A)mom * (A)b_at + u);
        b_at = b;
        u = (A)b;
    }
    p = (T)(w - (A)lr * u);
    """)


# Arrays of one dtype cast to another in one launch (a mixed-precision forward pass's weights,
# Model._cast_weights), into one flat output: one thread per element of them all, found as the
# updates find theirs (``table``: the running offsets, then the addresses).
# Each array starts its segment of ``out`` at an offset rounded up to 16 bytes (cuDNN assumes
# inputs so aligned: ``ALIGNMENT``); the table's last column holds the sizes, and the
# threads of a segment's padding write nothing.
CAST_ALL = cupy.ElementwiseKernel(
    "raw S dtype_of, int32 count, raw int64 table", "raw U out",
    _SEARCH + """
    if (e < table[2 * count + 1 + lo]) out[i] = (U)((const S*)table[count + 1 + lo])[e];
    """,
    "xpcnn_cast_all",
)
# A training step's normalisation statistics kept before its forward pass, and put back where
# the device skips the step, each in one launch for all of them (the standard version takes
# three per array): one thread per byte of the arrays (found as the casts find theirs;
# ``table``: the running byte offsets, then the addresses), so that any dtype is copied bit for
# bit, and arrays of several dtypes in the same launch.
SNAPSHOT = cupy.ElementwiseKernel(
    "int32 count, raw int64 table", "raw uint8 kept",
    _SEARCH + "kept[i] = ((const unsigned char*)table[count + 1 + lo])[e];",
    "xpcnn_snapshot",
)
# (the arrays it writes are found through ``table``, its output as in the update kernels)
RESTORE = cupy.ElementwiseKernel(
    "int32 count, raw uint8 kept, raw bool apply", "raw int64 table",
    "if (apply[0]) continue;" + _SEARCH
    + "((unsigned char*)table[count + 1 + lo])[e] = kept[i];",
    "xpcnn_restore",
)
# A training step's record (xpcnn.ops.step_record) in two launches, where the standard one
# takes two per gradient and about thirty more on small vectors (and one more per gradient to
# unscale float16 steps). First, one thread per element of the gradients (found as the updates
# find theirs; ``table``: the running offsets, then the addresses, then each array's index
# among the step's gradients), which it divides by the loss scale where ``scaled``, then marks
# in the state, only where the element is bad, its array's first mark (not finite) or second
# (with ``squares``: finite but above ``limit``, the largest magnitude whose square the dtype
# holds). Compared in double, as the standard compares in the state's float64. The marks, at
# ``marks`` (the state's layout), are 0 before (the record kernel clears them): every thread
# that marks one writes the same 1, and none reads them.
CHECK_GRADIENTS = cupy.ElementwiseKernel(
    "raw T dtype_of, int32 count, float64 limit, bool squares, bool scaled,"
    " raw float32 scaling, raw int64 table, int32 marks",
    "raw F state",
    _SEARCH + """
    typedef XpcnnAcc<T>::type A;
    T& g = ((T*)table[count + 1 + lo])[e];
    if (scaled) g = (T)((A)g * (A)(1.0f / scaling[0]));
    const double v = (double)(A)g;
    const int bad = isfinite(v) ? (squares && fabs(v) > limit ? 2 : 0) : 1;
    if (bad) state[marks + 2 * table[2 * count + 1 + lo] + bad - 1] = (F)1;
    """,
    "xpcnn_check_gradients",
    preamble=ACC,
)
# Then one thread records the step: the sums, the first non-finite step, the float16 loss
# scale and the flag "apply the update", as record_step and _move_scale do (the same formulas
# in the same order; ``state`` is F, ``scaling`` float32 and only read where ``scaled``),
# adds ``stats``' ``extra`` entries after [loss, correct] (the top-k counts) to the state's
# from step_record.top_k_start on, and clears the marks for the next step.
_RECORD = """
    const long long marks = 4 + grads;
    const F loss = (F)stats[0];
    const bool bad_loss = !isfinite(loss);
    bool any_bad = bad_loss, squared = false;
    for (int k = 0; k < 2 * grads; ++k) any_bad = any_bad || state[marks + k] != (F)0;
    // (a square overflow, an array's flag 2 where it has no flag 1: no scale fixes it)
    for (int k = 0; k < grads; ++k)
        squared = squared || (state[marks + 2 * k] == (F)0 && state[marks + 2 * k + 1] != (F)0);
    bool error = any_bad;
    if (scaled) {
        float scale = scaling[0], good = scaling[1];
        const float floor_ = 1.17549435e-38f;  // (float32's smallest normal: FLT_MIN)
        const bool rescued = any_bad && !bad_loss && !squared && scale > floor_;
        error = any_bad && !rescued;
        if (rescued) scale = scale / 2.0f < floor_ ? floor_ : scale / 2.0f;
        good = any_bad ? 0.0f : good + 1.0f;
        if (good >= (float)growth) {  // (grown only to a finite scale, as PyTorch's)
            if (isfinite(scale * 2.0f)) scale = scale * 2.0f;
            good = 0.0f;
        }
        if (!error && state[2] < 0) {  // (training stops at an error: the scale as before)
            scaling[0] = scale;
            scaling[1] = good;
        }
    }
    const bool fresh = error && state[2] < 0;
    state[0] = state[0] + loss * (F)samples;
    state[1] = state[1] + (F)stats[1];
    for (int k = 0; k < extra; ++k) state[marks + 2 * grads + k] += (F)stats[2 + k];
    if (fresh) {
        state[2] = (F)step;
        state[3] = loss;
        for (int k = 0; k < grads; ++k) {
            state[4 + k] = state[marks + 2 * k] != (F)0 ? (F)1
                           : state[marks + 2 * k + 1] != (F)0 ? (F)2 : (F)0;
        }
    }
    for (int k = 0; k < 2 * grads; ++k) state[marks + k] = (F)0;
    apply[0] = !any_bad && state[2] < 0;
"""
_RECORD_PARAMS = ("int32 grads, int32 extra, raw S stats, float64 samples, bool scaled,"
                  " int32 growth")
_RECORD_OUT = "raw F state, raw float32 scaling, raw bool apply"
# (the step number by value in an eager step, read from a device scalar in a captured one)
RECORD_STEP = cupy.ElementwiseKernel(_RECORD_PARAMS + ", float64 step", _RECORD_OUT, _RECORD,
                                     "xpcnn_record_step")
RECORD_STEP_AT = cupy.ElementwiseKernel(_RECORD_PARAMS + ", raw P step_at", _RECORD_OUT,
                                        "const double step = (double)step_at[0];" + _RECORD,
                                        "xpcnn_record_step_at")


def _address(a: Any) -> int:
    """Device address of a CuPy array's first element."""
    return a.data.ptr


# Device copies of recent update tables, by content: the parameters and their state keep their
# addresses, and the memory pool tends to hand a step's gradients the same blocks as the last
# step's, so a step usually finds its table here instead of copying one to the device. (The
# tables are lists of Python ints until then: a step makes a few, and NumPy's calls on tiny
# arrays cost more than the lists.)
_TABLES: dict[tuple[str, tuple[int, ...]], Any] = {}


def update_table(params: list[Any], grads: list[Any], *slots: list[Any],
                 deferred: DeferredTables | None = None) -> tuple[Any, int]:
    """The ``table`` of the update kernels on the parameters' device and the total element
    count. Every array must be C-contiguous and of the parameters' dtype. With ``deferred``
    (inside a stream capture), a table that it fills once the capture has ended."""
    offsets = array_offsets(params)
    rows = [_address(a) for arrays in zip(params, grads, *slots, strict=True) for a in arrays]
    return _device_table(offsets + rows, params[0].device, deferred), offsets[-1]


def search_table(arrays: list[Any], device: Any, deferred: DeferredTables | None,
                 *columns: list[int], pad: int = 1) -> tuple[Any, int]:
    """The ``table`` of the kernels that find an element's array by ``_SEARCH`` (the cast and
    the gradient check): the running offsets of C-contiguous ``arrays`` (each size rounded up
    to a multiple of ``pad``), their addresses, then each of ``columns`` (a number per array);
    and the last offset, the threads to launch (no table where that is 0: nothing to launch)."""
    offsets = array_offsets(arrays, pad)
    if not offsets[-1]:
        return None, 0
    table = offsets + [_address(a) for a in arrays] + [n for column in columns for n in column]
    return _device_table(table, device, deferred), offsets[-1]


def array_offsets(arrays: list[Any], pad: int = 1) -> list[int]:
    """Where each of ``arrays`` starts, laid one after the other, each size rounded up to a
    multiple of ``pad``, and where the last ends: [0, ..., total]."""
    return list(itertools.accumulate([-(-a.size // pad) * pad for a in arrays], initial=0))


def _device_table(table: list[int], device: Any, deferred: DeferredTables | None) -> Any:
    """``table`` as int64 on ``device``: from the recent tables, else copied there; with
    ``deferred`` (inside a stream capture), filled once the capture has ended."""
    if deferred is not None:
        return deferred.table(np.asarray(table, np.int64))
    key = (str(device), tuple(table))
    device_table = _TABLES.get(key)
    if device_table is None:
        if len(_TABLES) >= 16:  # tables of arrays long freed: drop them all
            _TABLES.clear()
        # (from CuPy's default pool: a table kept here and made in a CUDA graph's warm-up
        # would otherwise sit in the graphs' pool, where another graph's temporaries may be,
        # and be overwritten by its replays: xpcnn.cuda_graphs)
        with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
            device_table = _TABLES[key] = cupy.asarray(np.asarray(table, np.int64))
    return device_table


def _upload(device: Any, host: Any) -> None:
    """Copy NumPy array ``host`` into the device array ``device`` (no allocation)."""
    device.set(host)


class DeferredTables:
    """The update tables of one stream capture (see :meth:`CupyKernels.capture_tables`)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.pending: list[tuple[Any, Any]] = []

    def table(self, host_table: Any) -> Any:
        """A device array for ``host_table``, filled by :meth:`fill`. Its memory comes from
        ``pool``, the tables' own: a block of the graph's pool may have served a temporary
        earlier in the same step, whose kernels would overwrite the table at every replay."""
        with cupy.cuda.using_allocator(self.pool.malloc):
            device_table = cupy.empty(host_table.shape, host_table.dtype)
        self.pending.append((device_table, host_table))
        return device_table

    def fill(self) -> list[Any]:
        """Copy every table to the device (the capture has ended); returns them."""
        for device_table, host_table in self.pending:
            _upload(device_table, host_table)
        return [device_table for device_table, _ in self.pending]

