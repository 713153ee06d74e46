"""CuPy-only kernels behind the one seam ``Backend.fast`` (see :mod:`xpcnn.ops.kernels`).

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
kernel does not cover (overlapping pooling windows, non-contiguous outputs) go to that twin.

Kernels are compiled by CuPy on first use and cached on disk (``~/.cupy/kernel_cache``). In
elementwise bodies ``i`` is the element's C-order index, and a ``raw`` array indexed by one
integer is read at that C-order index; ``n`` and ``i`` are CuPy's own names.
"""

from __future__ import annotations

import contextlib
import itertools
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
from .cudnn_conv import ALIGNMENT, SWITCHES
from .kernels import StandardKernels, alike
from .step_record import BAD_GRADS, GROWTH_INTERVAL, square_limit
from .windows import accumulator

# The patches of convolutions as im2col + cuBLAS (the hand-written ones' algorithms
# "im2col" and "direct-forward"): out[n, oh, ow, (i*kw + j)*C + c] = x[n, oh*sh + i - top,
# ow*sw + j - left, c] for a C-contiguous x, 0 outside it: the zero padding is read, never
# stored.
_IM2COL = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kw, int32 sh, int32 sw,"
    " int32 KK, int32 top, int32 left",
    "T out",
    """
    long long r = i;
    const int kk = r % KK; r /= KK;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const long long img = r / Ho;
    const int c = kk % C;
    const int t = kk / C;
    const int hh = oh * sh + t / kw - top;
    const int ww = ow * sw + t % kw - left;
    out = (hh >= 0 && hh < H && ww >= 0 && ww < W)
        ? x[((img * H + hh) * W + ww) * C + c] : (T)0.0f;
    """,
    "xpcnn_im2col",
)

# Accumulators: float32 for float16 data (as tensor cores do), else the data's own type.
_ACC = """
template <typename X> struct XpcnnAcc { typedef float type; };
template <> struct XpcnnAcc<double> { typedef double type; };
"""

# Where pooling window i (C-order over the (N, Ho, Wo, C) output) starts in the input.
_WINDOW = """
__device__ long long xpcnn_window(long long r, int H, int W, int C, int Ho, int Wo, int sh,
                                  int sw) {
    const int c = r % C; r /= C;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const long long img = r / Ho;
    return ((img * H + oh * sh) * W + ow * sw) * C + c;
}
"""

# Maximum of each window, NaN propagating as xp.maximum does; the window's first element
# starts the maximum as it is read (each element read once: tests/kernel_trace.py counted
# a second read of it, 1.2x the loads).
_MAX_POOL = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw, int32 sh,"
    " int32 sw",
    "T y",
    """
    const long long base = xpcnn_window(i, H, W, C, Ho, Wo, sh, sw);
    T best;
    for (int a = 0; a < kh; ++a) {
        for (int b = 0; b < kw; ++b) {
            const T v = x[base + ((long long)a * W + b) * C];
            if ((a == 0 && b == 0) || v > best || v != v) best = v;
        }
    }
    y = best;
    """,
    "xpcnn_max_pool",
    preamble=_WINDOW,
)

# The mean of each image's channel over its H x W positions (``hw``), a thread an output
# element, its sum in the accumulator type in row-major order (a warp's threads read
# consecutive channels of one position), divided and rounded to T once.
_GLOBAL_AVG_POOL = cupy.ElementwiseKernel(
    "raw T x, int64 hw, int32 C",
    "T y",
    """
    typedef XpcnnAcc<T>::type A;
    const long long base = (i / C) * hw * C + i % C;
    A total = (A)0;
    for (long long p = 0; p < hw; ++p) total += (A)x[base + p * C];
    y = (T)(total / (A)hw);
    """,
    "xpcnn_global_avg_pool",
    preamble=_ACC,
)

# Non-overlapping windows only (strides >= kernel): each output element owns its window, so
# one thread writes every input position of it: the gradient at the first x == y in row-major
# order, 0 at the others. With ``relu``, the gradient is first multiplied by (y > 0), as
# _RELU_BACKWARD does it (the gradient of a ReLU before the pool, in the same launch). The
# window's maximum is read once into ``top``: read through ``yv`` it was read again after
# every store to dx (which may alias it, for the compiler).
_MAX_POOL_BACKWARD = cupy.ElementwiseKernel(
    "T yv, G g, raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw,"
    " int32 sh, int32 sw, bool relu",
    "raw G dx",
    """
    const long long base = xpcnn_window(i, H, W, C, Ho, Wo, sh, sw);
    const T top = yv;
    const G gv = relu ? (G)(g * (G)(top > (T)0.0f ? 1.0f : 0.0f)) : g;
    bool found = false;
    for (int a = 0; a < kh; ++a) {
        for (int b = 0; b < kw; ++b) {
            const long long k = base + ((long long)a * W + b) * C;
            const bool take = !found && x[k] == top;
            dx[k] = take ? gv : (G)0.0f;
            found = found || take;
        }
    }
    """,
    "xpcnn_max_pool_backward",
    preamble=_WINDOW,
)

# y + bias (then ReLU) in place on the (rows, K) output of a matmul.
_BIAS_RELU = cupy.ElementwiseKernel(
    "raw T b, int32 K, bool relu",
    "T y",
    """
    T v = y + b[i % K];
    y = (relu && v < (T)0.0f) ? (T)0.0f : v;
    """,
    "xpcnn_bias_relu",
)

_RELU = cupy.ElementwiseKernel(
    "T x, T cap, bool capped",
    "T y",
    """
    T v = x < (T)0.0f ? (T)0.0f : x;
    y = (capped && v > cap) ? cap : v;
    """,
    "xpcnn_relu",
)

# min(max(x, 0), cap) and where the gradient passes (strictly inside (0, cap)); NaN stays NaN,
# as in the standard version.
_RELU_WITH_MASK = cupy.ElementwiseKernel(
    "T x, T cap, bool capped",
    "T y, bool m",
    """
    T v = x < (T)0.0f ? (T)0.0f : x;
    if (capped && v > cap) v = cap;
    y = v;
    m = x > (T)0.0f && (!capped || x < cap);
    """,
    "xpcnn_relu_with_mask",
)

# a + b, then max(., 0) as _RELU takes it (an Add layer with the ReLU after it fused); and its
# gradient: the sum of the gradients of its output (a tensor read twice) where y > 0.
_ADD_RELU = cupy.ElementwiseKernel(
    "T a, T b", "T y", "T v = a + b; y = v < (T)0.0f ? (T)0.0f : v;", "xpcnn_add_relu"
)
_ADD_RELU_BACKWARD = cupy.ElementwiseKernel(
    "T a, T b, T y", "T dx", "T s = a + b; dx = s * (T)(y > (T)0.0f ? 1.0f : 0.0f);",
    "xpcnn_add_relu_backward"
)

# dy * (y > 0) and dy * mask, as products (NaN * 0 is NaN, as in the standard versions).
_RELU_BACKWARD = cupy.ElementwiseKernel(
    "T dy, Y y", "T dx", "dx = dy * (T)(y > (Y)0.0f ? 1.0f : 0.0f);", "xpcnn_relu_backward"
)
_MASK_MULTIPLY = cupy.ElementwiseKernel(
    "T x, bool m, T scale", "T y", "y = x * (T)(m ? 1.0f : 0.0f) * scale;",
    "xpcnn_mask_multiply"
)
# The same, then the gradient of a ReLU whose output was r (a dropout after a ReLU, backward).
_MASK_MULTIPLY_RELU = cupy.ElementwiseKernel(
    "T x, bool m, T scale, Y r", "T y",
    "y = x * (T)(m ? 1.0f : 0.0f) * scale * (T)(r > (Y)0.0f ? 1.0f : 0.0f);",
    "xpcnn_mask_multiply_relu"
)

# A product rounded to X on its own, never fused with a sum into one multiply-add (NVRTC fuses
# by default, across statements): float16 through float, where the product is exact.
_ROUNDED_PRODUCT = """
template <typename X> __device__ X xpcnn_mul_rn(X a, X b) { return (X)((float)a * (float)b); }
template <> __device__ float xpcnn_mul_rn<float>(float a, float b) { return __fmul_rn(a, b); }
template <> __device__ double xpcnn_mul_rn<double>(double a, double b) {
    return __dmul_rn(a, b);
}
"""
# StandardKernels.rescale in one launch: the cast (exact for uint8 images), the product rounded
# once to T, as the standard version's multiplication by a Python number rounds it (never
# fused with the sum), then where ``shift`` the sum with the offset rounded to T, then the
# result rounded to U (``dtype_of``, never read, binds T).
_RESCALE = cupy.ElementwiseKernel(
    "S x, raw T dtype_of, T scale, T offset, bool shift", "U y",
    "const T p = xpcnn_mul_rn<T>((T)x, scale); y = (U)(shift ? (T)(p + offset) : p);",
    "xpcnn_rescale", preamble=_ROUNDED_PRODUCT)

# xpcnn.ops.random's numbers: the 64 random bits of element ``element`` of the draw ``draw``
# of the stream ``seed`` (the same SplitMix64 bits; unsigned arithmetic, which wraps as the
# definition's int64 does).
_RANDOM_BITS = """
__device__ unsigned long long xpcnn_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
__device__ unsigned long long xpcnn_random_bits(long long seed, long long draw,
                                                long long element) {
    const unsigned long long gamma = 0x9E3779B97F4A7C15ULL;
    const unsigned long long key = xpcnn_mix(
        xpcnn_mix((unsigned long long)seed) + ((unsigned long long)draw + 1ULL) * gamma);
    return xpcnn_mix(key + ((unsigned long long)element + 1ULL) * gamma);
}
"""
# StandardKernels.normalize in one launch: the cast, the difference with the channel's shift
# and its product with the channel's scale rounded once to T (as the standard version's), the
# result rounded to U.
_NORMALIZE = cupy.ElementwiseKernel(
    "S x, raw T shift, raw T scale, int32 C", "U y",
    "const T d = (T)x - shift[i % C]; y = (U)xpcnn_mul_rn<T>(d, scale[i % C]);",
    "xpcnn_normalize", preamble=_ROUNDED_PRODUCT)
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
_FIND_ARRAY = _SEARCH + """    const long long row = count + 1 + (long long)lo * (2 + slots);
    T& p = ((T*)table[row])[e];
    const T g = ((const T*)table[row + 1])[e];
"""


def _by_value(value: Any) -> bool:
    """Whether a per-step number is a Python float (an eager step), not a 0-d device array."""
    # (float and int checked first: numbers.Real's check is a call into Python's abc module)
    return isinstance(value, float | int | numbers.Real)


def _update_kernels(name: str, constants: str, per_step: tuple[str, ...], body: str
                    ) -> tuple[Any, Any]:
    """An update kernel in two versions: the numbers that change from step to step
    (``per_step``) passed by value (eager steps), and read from one-element device arrays
    ``<name>_at`` (a step captured in a CUDA graph, which would keep by-value arguments as they
    were at the capture). ``apply[0]`` false (a step the device found non-finite): every element
    is left as it is."""
    head = "raw T dtype_of, int32 count, int32 slots, " + constants
    by_value = "".join(f", T {s}" for s in per_step)
    on_device = "".join(f", raw T {s}_at" for s in per_step)
    read = "".join(f"const T {s} = {s}_at[0];" for s in per_step)
    gate = "if (!apply[0]) continue;"
    return (cupy.ElementwiseKernel(head + by_value + ", raw bool apply", "raw int64 table",
                                   gate + _FIND_ARRAY + body, f"xpcnn_{name}"),
            cupy.ElementwiseKernel(head + on_device + ", raw bool apply", "raw int64 table",
                                   gate + read + _FIND_ARRAY + body, f"xpcnn_{name}_at"))


# (the parameter and the momentum read once each, into w and m: read through the references,
# each was read again after the store to the other, which may alias it for the compiler; no
# weight-decay term where it is 0, as in xpcnn.optim: 0 * an infinite weight would be NaN)
_SGD, _SGD_AT = _update_kernels("sgd", "T wd, T mom, bool nesterov", ("lr",), """
    const T w = p;
    const T grad = wd != (T)0 ? g + wd * w : g;
    if (slots == 0) {
        p = w - lr * grad;
    } else {
        T& buf = ((T*)table[row + 2])[e];
        const T m = mom * buf + grad;
        buf = m;
        p = w - lr * (nesterov ? grad + mom * m : m);
    }
    """)
# (each array read once and written once, through locals, as _SGD: tests/kernel_trace.py
# counted the parameter read three times and, decoupled, written twice; a third slot where
# ``slots`` counts one, AMSGrad's largest second moment, which the denominator then takes: the
# larger, or a NaN of either, as xp.maximum keeps it)
_ADAM, _ADAM_AT = _update_kernels(
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
_ADAM_SCALARS = cupy.ElementwiseKernel(_ADAM_SCALARS_PARAMS + ", float64 lr", _ADAM_SCALARS_OUT,
                                       _ADAM_SCALARS_BODY, "xpcnn_adam_scalars")
_ADAM_SCALARS_AT = cupy.ElementwiseKernel(_ADAM_SCALARS_PARAMS + ", raw float64 lr_at",
                                          _ADAM_SCALARS_OUT,
                                          "const double lr = lr_at[0];" + _ADAM_SCALARS_BODY,
                                          "xpcnn_adam_scalars_at")

# (slot 0 the mean square v, then the mean gradient a where ``centered``, then the momentum
# buffer where ``slots`` counts one more; each read once and written once, as _ADAM's)
_RMSPROP, _RMSPROP_AT = _update_kernels(
    "rmsprop", "T wd, T rho, T c, bool centered, T mom, T eps", ("lr",), """
    T& v_at = ((T*)table[row + 2])[e];
    const T w = p;
    const T grad = wd != (T)0 ? g + wd * w : g;
    const T v = rho * v_at + c * (grad * grad);
    v_at = v;
    T var = v;
    if (centered) {
        T& a_at = ((T*)table[row + 3])[e];
        const T a = rho * a_at + c * grad;
        a_at = a;
        var = v > a * a ? v - a * a : (T)0;
    }
    T u = grad / (sqrt(var) + eps);
    if (slots > (centered ? 2 : 1)) {
        T& b_at = ((T*)table[row + (centered ? 4 : 3)])[e];
        const T b = mom * b_at + u;
        b_at = b;
        u = b;
    }
    p = w - lr * u;
    """)


# Arrays of one dtype cast to another in one launch (a mixed-precision forward pass's weights,
# Model._cast_weights), into one flat output: one thread per element of them all, found as the
# updates find theirs (``table``: the running offsets, then the addresses).
# Each array starts its segment of ``out`` at an offset rounded up to 16 bytes (cuDNN assumes
# inputs so aligned: ``ALIGNMENT``); the table's last column holds the sizes, and the
# threads of a segment's padding write nothing.
_CAST_ALL = cupy.ElementwiseKernel(
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
_SNAPSHOT = cupy.ElementwiseKernel(
    "int32 count, raw int64 table", "raw uint8 kept",
    _SEARCH + "kept[i] = ((const unsigned char*)table[count + 1 + lo])[e];",
    "xpcnn_snapshot",
)
# (the arrays it writes are found through ``table``, its output as in the update kernels)
_RESTORE = cupy.ElementwiseKernel(
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
_CHECK_GRADIENTS = cupy.ElementwiseKernel(
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
    preamble=_ACC,
)
# Then one thread records the step: the sums, the first non-finite step, the float16 loss
# scale and the flag "apply the update", as record_step and _move_scale do (the same formulas
# in the same order; ``state`` is F, ``scaling`` float32 and only read where ``scaled``), and
# clears the marks for the next step.
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
_RECORD_PARAMS = ("int32 grads, raw S stats, float64 samples, bool scaled, int32 growth")
_RECORD_OUT = "raw F state, raw float32 scaling, raw bool apply"
# (the step number by value in an eager step, read from a device scalar in a captured one)
_RECORD_STEP = cupy.ElementwiseKernel(_RECORD_PARAMS + ", float64 step", _RECORD_OUT, _RECORD,
                                      "xpcnn_record_step")
_RECORD_STEP_AT = cupy.ElementwiseKernel(_RECORD_PARAMS + ", raw P step_at", _RECORD_OUT,
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


def _update_table(params: list[Any], grads: list[Any], *slots: list[Any],
                  deferred: _DeferredTables | None = None) -> tuple[Any, int]:
    """The ``table`` of the update kernels on the parameters' device and the total element
    count. Every array must be C-contiguous and of the parameters' dtype. With ``deferred``
    (inside a stream capture), a table that it fills once the capture has ended."""
    offsets = _offsets(params)
    rows = [_address(a) for arrays in zip(params, grads, *slots, strict=True) for a in arrays]
    return _device_table(offsets + rows, params[0].device, deferred), offsets[-1]


def _search_table(arrays: list[Any], device: Any, deferred: _DeferredTables | None,
                  *columns: list[int], pad: int = 1) -> tuple[Any, int]:
    """The ``table`` of the kernels that find an element's array by ``_SEARCH`` (the cast and
    the gradient check): the running offsets of C-contiguous ``arrays`` (each size rounded up
    to a multiple of ``pad``), their addresses, then each of ``columns`` (a number per array);
    and the last offset, the threads to launch (no table where that is 0: nothing to launch)."""
    offsets = _offsets(arrays, pad)
    if not offsets[-1]:
        return None, 0
    table = offsets + [_address(a) for a in arrays] + [n for column in columns for n in column]
    return _device_table(table, device, deferred), offsets[-1]


def _offsets(arrays: list[Any], pad: int = 1) -> list[int]:
    """Where each of ``arrays`` starts, laid one after the other, each size rounded up to a
    multiple of ``pad``, and where the last ends: [0, ..., total]."""
    return list(itertools.accumulate([-(-a.size // pad) * pad for a in arrays], initial=0))


def _device_table(table: list[int], device: Any, deferred: _DeferredTables | None) -> Any:
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


class _DeferredTables:
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

# Raw kernels (a block's threads working together through shared memory) are compiled from
# their source with typedefs of their type names (``_raw_kernel``). The "last block" way of
# summing in one launch (CUDA's threadFenceReduction sample): each block writes its partial sums,
# makes them visible to every block (__threadfence), and counts itself done on a counter in
# device memory; the block that counts last sums the partials, always in the same order, so the
# result is the same bit for bit run to run whichever block is last. atomicInc wraps the counter
# back to 0 at that last count: it is ready for the next launch with no memset, and a CUDA graph
# replays the launch as captured. The last block's counting thread fences again after its
# atomic (PTX's acquire pattern, to the writers' release pattern of a fence then the atomic:
# every block's writes and reads before it counted then happen before the last block's
# reads and writes after; the CUDA Programming Guide's __threadfence example leaves this
# fence out, relying on the hardware), and reads the partials through a volatile pointer
# (from L2, never a stale L1 line).
_LAST_BLOCK = r"""
__device__ bool xpcnn_last_block(unsigned int* counter, unsigned int blocks) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicInc(counter, blocks - 1) == blocks - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    return last;
}
__device__ float xpcnn_widen(float x) { return x; }
__device__ double xpcnn_widen(double x) { return x; }
"""
# (only where a type is float16 or bfloat16: CUDA's header, which NVRTC finds among CUDA's
# headers)
_HALF = r"""
#include <cuda_fp16.h>
__device__ float xpcnn_widen(__half x) { return __half2float(x); }
"""
_BFLOAT16 = r"""
#include <cuda_bf16.h>
__device__ float xpcnn_widen(__nv_bfloat16 x) { return __bfloat162float(x); }
"""
# A kernel that draws counts its draw in ``state`` (xpcnn.ops.random's [seed, draw]) in the
# same launch: every thread reads the draw before its loop (``_READ_DRAW``); after it, the
# last block to finish (see _LAST_BLOCK: every thread of the launch has read the draw by then)
# writes draw + 1 (``_COUNT_DRAW``). Blocks of _DRAW_BLOCK threads: one atomic each (CuPy's
# default 128 would make 4 times as many).
_READ_DRAW = "const long long seed = state[0], draw = state[1];"
_COUNT_DRAW = """
    if (xpcnn_last_block(&counter[0], gridDim.x) && threadIdx.x == 0) state[1] = draw + 1;
"""
_DRAW_BLOCK = 512
# Numbers in [0, 1): element ``first + i`` of the draw that ``state`` names, counted there.
_UNIFORM = cupy.ElementwiseKernel(
    "int64 first, int32 bits, float64 scale",
    "T u, raw int64 state, raw uint32 counter",
    "u = (T)((double)(xpcnn_random_bits(seed, draw, first + i) >> (64 - bits)) * scale);",
    "xpcnn_uniform",
    preamble=_RANDOM_BITS + _LAST_BLOCK, loop_prep=_READ_DRAW, after_loop=_COUNT_DRAW,
)
# StandardKernels.dropout in one launch: the number (as _UNIFORM draws it, ``unit`` = 2**-bits),
# the mask ``keep`` (number >= rate) and the output x * keep * scale, in the standard order, the
# draw counted as _UNIFORM counts it.
_DROPOUT = cupy.ElementwiseKernel(
    "T x, int64 first, int32 bits, float64 unit, T rate, T scale",
    "T y, bool keep, raw int64 state, raw uint32 counter",
    """
    const T u = (T)((double)(xpcnn_random_bits(seed, draw, first + i) >> (64 - bits)) * unit);
    keep = u >= rate;
    y = x * (T)(keep ? 1.0f : 0.0f) * scale;
    """,
    "xpcnn_dropout",
    preamble=_RANDOM_BITS + _LAST_BLOCK, loop_prep=_READ_DRAW, after_loop=_COUNT_DRAW,
)
# Output element i of an (N, H, W, C) image batch as its image, row, column and channel.
_NHWC_INDEX = """
#define XPCNN_NHWC_INDEX \\
    const int c = i % C; \\
    const int j = i / C % W; \\
    const int row = i / ((long long)C * W) % H; \\
    const long long img = i / ((long long)C * W * H);
"""
# StandardKernels.random_crop in one launch: out[n, i, j, c] = x[n, i + dy - p, j + dx - p, c]
# (0 outside the image) cast to T, the offsets floor(u * (2p + 1)) per image from its numbers
# u (elements first + 2n, rows, and first + 2n + 1, columns, of the draw, in float32 as
# _UNIFORM draws them), the draw counted as _UNIFORM counts it.
_RANDOM_CROP = cupy.ElementwiseKernel(
    "raw S x, int64 first, int32 H, int32 W, int32 C, int32 p",
    "T out, raw int64 state, raw uint32 counter",
    """
    XPCNN_NHWC_INDEX
    const float rows = (float)((double)(xpcnn_random_bits(seed, draw, first + 2 * img) >> 40)
                               * 5.9604644775390625e-08);
    const float cols = (float)((double)(xpcnn_random_bits(seed, draw, first + 2 * img + 1)
                                        >> 40) * 5.9604644775390625e-08);
    const int hh = row + (int)floorf(rows * (float)(2 * p + 1)) - p;
    const int ww = j + (int)floorf(cols * (float)(2 * p + 1)) - p;
    out = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? (T)x[((img * H + hh) * W + ww) * C + c]
                                                    : (T)0;
    """,
    "xpcnn_random_crop",
    preamble=_RANDOM_BITS + _LAST_BLOCK + _NHWC_INDEX, loop_prep=_READ_DRAW,
    after_loop=_COUNT_DRAW,
)
# StandardKernels.random_flip in one launch: out[n, i, j, c] = x[n, i, W - 1 - j, c] cast to T
# where image n's number (element first + n of the draw, in float32 as _UNIFORM draws it: 24
# bits times 2**-24) is below 1/2, that is where the top bit of its random bits is 0; the draw
# counted as _UNIFORM counts it.
_RANDOM_FLIP = cupy.ElementwiseKernel(
    "raw S x, int64 first, int32 H, int32 W, int32 C",
    "T out, raw int64 state, raw uint32 counter",
    """
    XPCNN_NHWC_INDEX
    const bool flip = (xpcnn_random_bits(seed, draw, first + img) >> 63) == 0;
    out = (T)x[((img * H + row) * W + (flip ? W - 1 - j : j)) * C + c];
    """,
    "xpcnn_random_flip",
    preamble=_RANDOM_BITS + _LAST_BLOCK + _NHWC_INDEX, loop_prep=_READ_DRAW,
    after_loop=_COUNT_DRAW,
)
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
        half = ((_HALF if "float16" in names.values() else "")
                + (_BFLOAT16 if "bfloat16" in names.values() else ""))
        typedefs = "".join(f"typedef {_C_TYPES[v]} {k};\n" for k, v in names.items())
        _RAW_KERNELS[key] = cupy.RawKernel(half + typedefs + _LAST_BLOCK + source, name)
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


# A sum over the rows of a C-contiguous (rows, cols) array of X (a bias gradient) in one
# launch, in A: float32 for float16 data (a float16 sum of a batch's rows would lose their low
# bits), else the data's own type. Block (x, y) sums rows [x*per, x*per + per) of the 32
# columns [32y, 32y + 32): thread (c, lane) every LANES-th row from ``lane`` on, in order, then
# a tree over the lanes in shared memory, into row x of ``partials``; the last block of each
# column chunk y (counter y) sums that chunk's partials the same way. xpcnn_relu_sum_rows
# first multiplies each value by (relu_y > 0), as StandardKernels.relu_backward does, writes
# that product to ``masked`` and sums it: a ReLU's gradient and its bias gradient in one pass.
_SUM_ROWS_LANES = 8
_SUM_ROWS_SOURCE = f"#define LANES {_SUM_ROWS_LANES}\n" + r"""
__device__ A xpcnn_lanes_total(A (*lanes)[32], A s) {
    const int c = threadIdx.x, lane = threadIdx.y;
    lanes[lane][c] = s;
    __syncthreads();
    for (int half = LANES / 2; half > 0; half /= 2) {
        if (lane < half) lanes[lane][c] += lanes[lane + half][c];
        __syncthreads();
    }
    return lanes[0][c];
}
__device__ void xpcnn_column_sums(const X* __restrict__ a, const Y* __restrict__ relu_y,
                                  X* __restrict__ masked, long long rows, int cols,
                                  long long per, A* partials, unsigned int* counters,
                                  A* __restrict__ out) {
    __shared__ A lanes[LANES][32];
    const int lane = threadIdx.y;
    const int col = blockIdx.y * 32 + threadIdx.x;
    const long long first = blockIdx.x * per;
    const long long end = first + per < rows ? first + per : rows;
    A s = (A)0;
    if (col < cols) {
        #pragma unroll 8
        for (long long r = first + lane; r < end; r += LANES) {
            const long long i = r * cols + col;
            if (relu_y) {  // (the same branch for every thread of the launch)
                const A v = (A)xpcnn_widen(a[i]) * (xpcnn_widen(relu_y[i]) > 0 ? (A)1 : (A)0);
                masked[i] = (X)v;  // (exact: the value itself, or a zero)
                s += v;
            } else {
                s += (A)xpcnn_widen(a[i]);
            }
        }
    }
    s = xpcnn_lanes_total(lanes, s);
    if (lane == 0 && col < cols) partials[blockIdx.x * (long long)cols + col] = s;
    if (!xpcnn_last_block(&counters[blockIdx.y], gridDim.x)) return;
    const volatile A* done = partials;
    s = (A)0;
    if (col < cols) {
        for (unsigned b = lane; b < gridDim.x; b += LANES) s += done[b * (long long)cols + col];
    }
    s = xpcnn_lanes_total(lanes, s);
    if (lane == 0 && col < cols) out[col] = s;
}
extern "C" __global__ void xpcnn_sum_rows(const X* __restrict__ a, long long rows, int cols,
                                          long long per, A* partials, unsigned int* counters,
                                          A* __restrict__ out) {
    xpcnn_column_sums(a, (const Y*)0, (X*)0, rows, cols, per, partials, counters, out);
}
extern "C" __global__ void xpcnn_relu_sum_rows(const X* __restrict__ a,
                                               const Y* __restrict__ relu_y,
                                               X* __restrict__ masked, long long rows,
                                               int cols, long long per, A* partials,
                                               unsigned int* counters, A* __restrict__ out) {
    xpcnn_column_sums(a, relu_y, masked, rows, cols, per, partials, counters, out);
}
"""
# Blocks along the rows: at most this many, each of at least this many rows (a sum over
# 512 x 32 x 32 pixels, 524,288 rows: 512 blocks of 1024 rows, about 4 of 256 threads per
# multiprocessor of an H100 or H200; a Dense layer's 128 rows: one block). Not tuned on a GPU.
_SUM_ROWS_BLOCKS = 512
_SUM_ROWS_PER_BLOCK = 1024

# Softmax cross-entropy in one launch: each row's loss divided by N, whether its first maximum
# is at the label, and its gradient row, (softmax - target) / N, with the target mixed with the
# uniform distribution by ``spread`` = smoothing / classes (``keep`` = 1 - smoothing). The same
# steps as xpcnn.ops.softmax, in the accumulator type A (float32 for float16 T). Where
# ``scaled``, the gradient (rounded to T) is then multiplied by the float16 loss scale
# ``scale[0]``, read from the device, as the standard version does it after. Logits of a
# narrower type Z (float16 under mixed precision) are read as the standard version's cast to T
# would give them (exactly), and their gradient rounded to Z as its cast would round it (the
# layer that made them reads it in Z). The rows' [loss, right] summed into ``stats`` in the
# same launch: a tree per block, then the last block's tree over the blocks' partials (see
# _LAST_BLOCK). Two kernels, by the rows' size:
# - xpcnn_softmax_cross_entropy: a row a thread, where a block's THREADS rows fit in STAGED
#   bytes of shared memory in T (up to 32 classes of a float32 loss, mixed precision's too; 64
#   of float16, 16 of float64: 10 for MNIST and CIFAR-10). They pass through it: the logits
#   loaded, and the gradient stored, by consecutive threads at consecutive addresses (4
#   sectors a warp's request for float32), where a thread reading its own row in place would
#   put the warp's reads a row apart (31 sectors a request at 10 classes, and each row read
#   three times: tests/kernel_trace.py).
# - xpcnn_softmax_cross_entropy_rows: a row a warp, for more classes (CIFAR-100's 100), its
#   lanes on consecutive classes; the row's maximum, sum and loss each a tree over the lanes.
#   (A thread a row would put a whole batch of 512 rows on 2 blocks of the GPU's 132
#   multiprocessors, each thread walking its row alone.)
_CROSS_ENTROPY_THREADS = 256
_CROSS_ENTROPY_STAGED = 32768
_SOFTMAX_CROSS_ENTROPY_SOURCE = (f"#define THREADS {_CROSS_ENTROPY_THREADS}\n"
                                 f"#define STAGED {_CROSS_ENTROPY_STAGED}\n") + r"""
__device__ void xpcnn_pair_total(A (*sums)[THREADS], A loss, A right) {
    const int t = threadIdx.x;
    sums[0][t] = loss;
    sums[1][t] = right;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            sums[0][t] += sums[0][t + half];
            sums[1][t] += sums[1][t + half];
        }
        __syncthreads();
    }
}
// Class c of a row, logit z, given the row's maximum and log-sum of exponentials: its
// gradient, stored at ``out`` (which may be where z was read), and its target x log-softmax.
__device__ A xpcnn_class_term(Z z, int c, A top, A log_total, long long label, double keep,
                              double spread, double inv_n, int scaled, A scaling, Z* out) {
    const A logp = ((A)xpcnn_widen(z) - top) - log_total;
    const A target = (c == label ? (A)keep : (A)0) + (A)spread;
    const T g = (T)((exp(logp) - target) * (A)inv_n);
    *out = (Z)(scaled ? (T)((A)xpcnn_widen(g) * scaling) : g);
    // (a zero target's term is 0, not 0 * -inf = NaN where z - top overflowed or z was -inf,
    // as xpcnn.ops.softmax.cross_entropy; a +inf or NaN logit still makes log_total NaN)
    return target != (A)0 ? target * logp : (A)0;
}
// The rows' [loss / N, right] of the block summed, then the blocks' by the last block.
__device__ void xpcnn_block_totals(A (*sums)[THREADS], A row_loss, A right, A* partials,
                                   unsigned int* counter, A* __restrict__ stats) {
    const int t = threadIdx.x;
    xpcnn_pair_total(sums, row_loss, right);
    if (t < 2) partials[2 * blockIdx.x + t] = sums[t][0];
    if (!xpcnn_last_block(counter, gridDim.x)) return;
    const volatile A* done = partials;
    row_loss = (A)0;
    right = (A)0;
    for (unsigned b = t; b < gridDim.x; b += THREADS) {
        row_loss += done[2 * b];
        right += done[2 * b + 1];
    }
    xpcnn_pair_total(sums, row_loss, right);
    if (t < 2) stats[t] = sums[t][0];
}
extern "C" __global__ void xpcnn_softmax_cross_entropy(
        const Z* __restrict__ z, const L* __restrict__ labels, long long n, int classes,
        double keep, double spread, double inv_n, const U* scale, int scaled,
        Z* __restrict__ grad, A* partials, unsigned int* counter, A* __restrict__ stats) {
    __shared__ A sums[2][THREADS];
    __shared__ __align__(16) unsigned char staging[STAGED];
    Z* tile = (Z*)staging;  // (the block's rows, then their gradient rows)
    const int t = threadIdx.x;
    const long long start = blockIdx.x * (long long)THREADS;  // (the block's first row)
    const long long i = start + t;
    const long long count = (n - start < THREADS ? n - start : THREADS) * classes;
    for (long long k = t; k < count; k += THREADS) tile[k] = z[start * classes + k];
    __syncthreads();
    A row_loss = (A)0, right = (A)0;
    if (i < n) {
        Z* row = tile + t * classes;  // (each row[c] read before its gradient replaces it)
        const long long label = (long long)labels[i];
        const A scaling = scaled ? (A)xpcnn_widen(scale[0]) : (A)1;  // (read once, not per class)
        A top = (A)xpcnn_widen(row[0]);
        int first = 0;
        for (int c = 1; c < classes; ++c) {
            const A v = (A)xpcnn_widen(row[c]);
            if (v > top) { top = v; first = c; }
        }
        A total = (A)0;
        for (int c = 0; c < classes; ++c) total += exp((A)xpcnn_widen(row[c]) - top);
        const A log_total = log(total);
        A loss = (A)0;
        for (int c = 0; c < classes; ++c)
            loss -= xpcnn_class_term(row[c], c, top, log_total, label, keep, spread, inv_n,
                                     scaled, scaling, &row[c]);
        if (label < 0 || label >= classes) loss = (A)nan("");  // a label that is no class
        row_loss = loss * (A)inv_n;
        right = first == label ? (A)1 : (A)0;
    }
    __syncthreads();
    for (long long k = t; k < count; k += THREADS) grad[start * classes + k] = tile[k];
    xpcnn_block_totals(sums, row_loss, right, partials, counter, stats);
}
// The sum of the 32 values of a warp's lanes, for each lane of it: a tree in ``s`` (THREADS
// entries, the block's; every thread of the block takes part).
__device__ A xpcnn_lanes_sum(A* s, A v) {
    const int t = threadIdx.x, lane = t % 32;
    s[t] = v;
    __syncthreads();
    for (int half = 16; half > 0; half /= 2) {
        if (lane < half) s[t] += s[t + half];
        __syncthreads();
    }
    const A total = s[t - lane];
    __syncthreads();  // (s is the next tree's)
    return total;
}
extern "C" __global__ void xpcnn_softmax_cross_entropy_rows(
        const Z* __restrict__ z, const L* __restrict__ labels, long long n, int classes,
        double keep, double spread, double inv_n, const U* scale, int scaled,
        Z* __restrict__ grad, A* partials, unsigned int* counter, A* __restrict__ stats) {
    __shared__ A sums[2][THREADS];
    __shared__ A values[THREADS];
    __shared__ int places[THREADS];
    const int t = threadIdx.x, lane = t % 32;
    const long long i = blockIdx.x * (long long)(THREADS / 32) + t / 32;  // (the warp's row)
    const bool live = i < n;  // (a warp past the last row still takes part in the trees)
    const Z* row = z + (live ? i : 0) * classes;
    // the row's first maximum: each lane's, then the larger of two, the earlier of equals
    A top = (A)0;
    int first = classes;  // (none)
    for (int c = lane; live && c < classes; c += 32) {
        const A v = (A)xpcnn_widen(row[c]);
        if (first == classes || v > top) { top = v; first = c; }
    }
    values[t] = top;
    places[t] = first;
    __syncthreads();
    for (int half = 16; half > 0; half /= 2) {
        if (lane < half) {
            const A v = values[t + half];
            const int c = places[t + half];
            if (c < classes && (places[t] == classes || v > values[t]
                                || (v == values[t] && c < places[t]))) {
                values[t] = v;
                places[t] = c;
            }
        }
        __syncthreads();
    }
    top = values[t - lane];
    first = places[t - lane];
    __syncthreads();
    A part = (A)0;
    for (int c = lane; live && c < classes; c += 32) part += exp((A)xpcnn_widen(row[c]) - top);
    const A log_total = log(xpcnn_lanes_sum(values, part));
    const long long label = live ? (long long)labels[i] : 0;
    const A scaling = live && scaled ? (A)xpcnn_widen(scale[0]) : (A)1;
    part = (A)0;
    for (int c = lane; live && c < classes; c += 32)
        part -= xpcnn_class_term(row[c], c, top, log_total, label, keep, spread, inv_n, scaled,
                                 scaling, &grad[i * classes + c]);
    A loss = xpcnn_lanes_sum(values, part);
    if (label < 0 || label >= classes) loss = (A)nan("");  // a label that is no class
    const bool mine = live && lane == 0;  // (the row's totals, once)
    xpcnn_block_totals(sums, mine ? loss * (A)inv_n : (A)0,
                       mine && first == label ? (A)1 : (A)0, partials, counter, stats);
}
"""


def cross_entropy_kernel(classes: int, dtype: Any) -> tuple[str, int]:
    """The softmax cross-entropy kernel for rows of ``classes`` logits whose loss is computed
    in ``dtype``, and its rows a block. (By the rows' size in the loss's dtype, not the
    logits': narrower logits give the bits their cast would, by the same kernel.)"""
    if classes * _CROSS_ENTROPY_THREADS * np.dtype(dtype).itemsize <= _CROSS_ENTROPY_STAGED:
        return "xpcnn_softmax_cross_entropy", _CROSS_ENTROPY_THREADS
    return "xpcnn_softmax_cross_entropy_rows", _CROSS_ENTROPY_THREADS // 32  # (a row a warp)


# FeatureNorm in one launch each way. The data is NHWC: an image is an (H*W, C) row-major
# matrix, and its statistics are the column means, which a block computes alone: block (n, y)
# owns channels [32y, 32y + w) of image n (w = min(32, C - 32y)), so it needs no other block
# (no atomics, no partials in device memory) and passes over its chunk as often as it likes,
# the later passes mostly from L2. Its THREADS threads are groups of w on consecutive
# channels, group g reading rows g, g + G, g + 2G, ... (G groups; for C <= 32 consecutive
# threads read consecutive addresses, rows after rows), each thread summing its rows in order,
# then a tree over the groups in shared memory: a fixed order, the same bits at every run.
# Computed in A (float32 for float16 data); the input of type X (float16 under mixed
# precision) read as its cast to A (exact), the statistics stored in A (for backward, which
# recomputes xhat from them and the input, as cuDNN's BatchNorm does), the output rounded to
# T as the standard version computes it, then to Y (the compute dtype: the next layer's cast,
# done here). 512 threads: 16 warps of loads in flight on a multiprocessor holding one image's
# block (128 images on 132 multiprocessors); not tuned on a GPU.
_FEATURE_NORM_THREADS = 512
_FEATURE_NORM_COMMON = f"#define THREADS {_FEATURE_NORM_THREADS}\n" + r"""
// This thread's part of block (n, y): elements first, first + step, ... below end, of one
// channel (``stat``: its index in the (N, 1, 1, C) statistics), in group ``group`` of
// ``groups`` groups of ``w`` threads; the THREADS % w threads left over read nothing.
struct xpcnn_chunk {
    int w, groups, group;
    long long first, step, end, stat;
};
__device__ xpcnn_chunk xpcnn_chunk_of(long long hw, int channels) {
    xpcnn_chunk k;
    const int c0 = blockIdx.y * 32;
    k.w = channels - c0 < 32 ? channels - c0 : 32;
    k.groups = THREADS / k.w;
    k.group = threadIdx.x / k.w;
    const int c = c0 + threadIdx.x % k.w;
    k.stat = (long long)blockIdx.x * channels + c;
    k.end = ((long long)blockIdx.x + 1) * hw * channels;
    k.first = k.group < k.groups ? ((long long)blockIdx.x * hw + k.group) * channels + c
                                 : k.end;
    k.step = (long long)k.groups * channels;
    return k;
}
// The sums of s1 and s2 over the block's groups, per channel, for every thread of the channel
// (a tree over the groups, of the largest power of two below their count first). The barrier
// first: the threads may still be reading the last totals from ``part``.
__device__ void xpcnn_channel_totals(A (*part)[THREADS], const xpcnn_chunk& k, A& s1, A& s2) {
    const int t = threadIdx.x;
    __syncthreads();
    part[0][t] = s1;
    part[1][t] = s2;
    __syncthreads();
    int half = 1;
    while (2 * half < k.groups) half *= 2;
    for (; half > 0; half /= 2) {
        if (k.group < half && k.group + half < k.groups) {
            part[0][t] += part[0][t + half * k.w];
            part[1][t] += part[1][t + half * k.w];
        }
        __syncthreads();
    }
    s1 = part[0][t % k.w];
    s2 = part[1][t % k.w];
}
// xhat = (x - mean) * inv_std in A, written the same forward and backward, so that backward's
// xhat (recomputed from the input and the statistics forward wrote) has forward's bits.
#define XPCNN_FN_XHAT(v) (((A)xpcnn_widen(v) - mean) * inv)
"""
# Forward: the mean, the mean of the centred squares (two passes, as the standard version's,
# for accuracy), then xhat = (x - mean) * inv_std, inv_std = 1 / sqrt(var + eps), written as
# the output (rounded to T, then to Y); the mean and inv_std (A) for backward.
_FEATURE_NORM_SOURCE = _FEATURE_NORM_COMMON + r"""
extern "C" __global__ void xpcnn_feature_norm(const X* __restrict__ x, long long hw,
                                              int channels, double eps,
                                              A* __restrict__ mean_out, A* __restrict__ inv_std,
                                              Y* __restrict__ y) {
    __shared__ A part[2][THREADS];
    const xpcnn_chunk k = xpcnn_chunk_of(hw, channels);
    A s = (A)0, unused = (A)0;
    #pragma unroll 4
    for (long long e = k.first; e < k.end; e += k.step) s += (A)xpcnn_widen(x[e]);
    xpcnn_channel_totals(part, k, s, unused);
    const A mean = s / (A)hw;
    s = (A)0;
    #pragma unroll 4
    for (long long e = k.first; e < k.end; e += k.step) {
        const A d = (A)xpcnn_widen(x[e]) - mean;
        s += d * d;
    }
    xpcnn_channel_totals(part, k, s, unused);
    const A inv = (A)1 / sqrt(s / (A)hw + (A)eps);
    if (k.group == 0) {
        mean_out[k.stat] = mean;
        inv_std[k.stat] = inv;
    }
    #pragma unroll 4
    for (long long e = k.first; e < k.end; e += k.step) {
        y[e] = (Y)xpcnn_widen((T)XPCNN_FN_XHAT(x[e]));
    }
}
"""
# Backward: xhat recomputed from x (of type X) and forward's statistics, the means of dy and dy
# * xhat in one pass, then dx = inv_std * ((dy - mean(dy)) - xhat * mean(dy * xhat)), with
# ``relu`` times (x > 0), the gradient of a ReLU before it (x its output), rounded to X (the
# input's dtype); dy of type D (float16 under mixed precision) read as its cast to A (exact).
_FEATURE_NORM_BACKWARD_SOURCE = _FEATURE_NORM_COMMON + r"""
extern "C" __global__ void xpcnn_feature_norm_backward(
        const D* __restrict__ dy, const X* __restrict__ x, const A* __restrict__ mean_in,
        const A* __restrict__ inv_std, int relu, long long hw, int channels,
        X* __restrict__ dx) {
    __shared__ A part[2][THREADS];
    const xpcnn_chunk k = xpcnn_chunk_of(hw, channels);
    const A mean = mean_in[k.stat], inv = inv_std[k.stat];
    A s1 = (A)0, s2 = (A)0;
    #pragma unroll 4
    for (long long e = k.first; e < k.end; e += k.step) {
        const A g = (A)xpcnn_widen(dy[e]);
        s1 += g;
        s2 += g * XPCNN_FN_XHAT(x[e]);
    }
    xpcnn_channel_totals(part, k, s1, s2);
    const A m1 = s1 / (A)hw, m2 = s2 / (A)hw;
    #pragma unroll 4
    for (long long e = k.first; e < k.end; e += k.step) {
        A g = inv * (((A)xpcnn_widen(dy[e]) - m1) - XPCNN_FN_XHAT(x[e]) * m2);
        if (relu) g = g * (xpcnn_widen(x[e]) > 0 ? (A)1 : (A)0);
        dx[e] = (X)g;
    }
}
"""



# BatchNorm2D in two launches each way, on the (rows, C) matrix of a C-contiguous input (rows =
# N*H*W): its statistics are column statistics, taken as _SUM_ROWS_SOURCE sums columns. Block
# (x, y) takes rows [x*per, x*per + per) of the 32 columns [32y, 32y + 32), thread (c, lane)
# every LANES-th row from ``lane`` on, in order, then a tree over the lanes in shared memory;
# the last block of each column chunk y (counter y, see _LAST_BLOCK) merges the chunk's
# partials, always in the same order: the same bits at every run. All in A (float32 for
# float16 data), the input of type X (float16 under mixed precision) read as its cast to T
# (exact), the running statistics rounded to T where stored. (A tree
# needs no barrier before its first writes: before the first, nothing has been read; before
# the second, the lanes have passed xpcnn_last_block's barriers.)
# Forward, first launch: each thread's count, mean and sum of centred squares (M2) of its rows
# (two passes over them, the second mostly from cache, for accuracy), merged over the lanes
# and then over the blocks with Chan et al.'s formula; the last block writes the mean and 1 /
# sqrt(var + eps) (var biased) to ``mean`` and ``inv_std`` (A: for the second launch and for
# backward, which recomputes xhat from them and x), and updates the running statistics in
# place (keep = 1 - momentum; ``unbias`` = count / (count - 1), at least 1). The second launch
# is _BATCH_NORM_APPLY.
_BATCH_NORM_SOURCE = f"#define LANES {_SUM_ROWS_LANES}\n" + r"""
// (count, mean, M2) b merged into a (Chan, Golub and LeVeque); a count of 0 leaves a as it is.
__device__ void xpcnn_bn_merge(long long& n, A& mean, A& m2, long long nb, A mean_b, A m2_b) {
    if (nb == 0) return;
    const long long total = n + nb;
    const A delta = mean_b - mean, share = (A)nb / (A)total;
    mean = mean + delta * share;
    m2 = m2 + m2_b + delta * delta * ((A)n * share);
    n = total;
}
struct xpcnn_bn_lanes {
    long long n[LANES][32];
    A mean[LANES][32], m2[LANES][32];
};
// The lanes' (count, mean, M2) merged, per column, for every lane.
__device__ void xpcnn_bn_merge_lanes(xpcnn_bn_lanes& s, long long& n, A& mean, A& m2) {
    const int c = threadIdx.x, lane = threadIdx.y;
    s.n[lane][c] = n;
    s.mean[lane][c] = mean;
    s.m2[lane][c] = m2;
    __syncthreads();
    for (int half = LANES / 2; half > 0; half /= 2) {
        if (lane < half) {
            xpcnn_bn_merge(s.n[lane][c], s.mean[lane][c], s.m2[lane][c], s.n[lane + half][c],
                           s.mean[lane + half][c], s.m2[lane + half][c]);
        }
        __syncthreads();
    }
    n = s.n[0][c];
    mean = s.mean[0][c];
    m2 = s.m2[0][c];
}
extern "C" __global__ void xpcnn_batch_norm_stats(
        const X* __restrict__ x, long long rows, int cols, long long per, double eps,
        double keep, double momentum, double unbias, A* partials, unsigned int* counters,
        A* __restrict__ mean_out, A* __restrict__ inv_std, T* __restrict__ moving_mean,
        T* __restrict__ moving_var) {
    __shared__ xpcnn_bn_lanes lanes;
    const int lane = threadIdx.y, col = blockIdx.y * 32 + threadIdx.x;
    const long long first = blockIdx.x * per, end = first + per < rows ? first + per : rows;
    long long n = 0;
    A mean = (A)0, m2 = (A)0;
    if (col < cols && first + lane < end) {
        A s = (A)0;
        for (long long r = first + lane; r < end; r += LANES, ++n)
            s += (A)xpcnn_widen(x[r * cols + col]);
        mean = s / (A)n;
        for (long long r = first + lane; r < end; r += LANES) {
            const A d = (A)xpcnn_widen(x[r * cols + col]) - mean;
            m2 += d * d;
        }
    }
    xpcnn_bn_merge_lanes(lanes, n, mean, m2);
    const long long at = 2 * (blockIdx.x * (long long)cols + col);
    if (lane == 0 && col < cols) {
        partials[at] = mean;
        partials[at + 1] = m2;
    }
    if (!xpcnn_last_block(&counters[blockIdx.y], gridDim.x)) return;
    const volatile A* done = partials;
    n = 0;
    mean = m2 = (A)0;
    if (col < cols) {
        for (unsigned b = lane; b < gridDim.x; b += LANES) {
            const long long left = rows - b * per, from = 2 * (b * (long long)cols + col);
            xpcnn_bn_merge(n, mean, m2, left < per ? left : per, done[from], done[from + 1]);
        }
    }
    xpcnn_bn_merge_lanes(lanes, n, mean, m2);
    if (lane == 0 && col < cols) {
        const A var = m2 / (A)rows, inv = (A)1 / sqrt(var + (A)eps);
        mean_out[col] = mean;
        inv_std[col] = inv;
        moving_mean[col] = (T)((A)keep * (A)xpcnn_widen(moving_mean[col])
                               + (A)momentum * mean);
        moving_var[col] = (T)((A)keep * (A)xpcnn_widen(moving_var[col])
                              + (A)momentum * (var * (A)unbias));
    }
}
"""
# The pre-ReLU output z = xhat * gamma + beta of channel c, xhat = (x - mean) * inv_std, in A:
# written the same in every kernel, forward and backward, so that backward's recomputed z has
# forward's bits and its ReLU mask is forward's. The macros take channel c's values (of A),
# which each kernel reads once a thread (``XPCNN_BN_CHANNEL``). The gradient dy through a ReLU
# whose input was z: times (z > 0), NaN staying NaN as in _MASK_MULTIPLY.
_BATCH_NORM_Z = """
#define XPCNN_BN_CHANNEL(c) \\
    const A mean_c = mean[c], inv_c = inv_std[c], gamma_c = (A)gamma[c], beta_c = (A)beta[c];
#define XPCNN_BN_XHAT(x) (((A)(x) - mean_c) * inv_c)
#define XPCNN_BN_Z(xhat) ((xhat) * gamma_c + beta_c)
#define XPCNN_BN_RELU_GRAD(dy, z) ((dy) * ((z) > (A)0 ? (A)1 : (A)0))
"""
# The elementwise launches over the (rows, cols) data: thread i takes elements i, i + stride,
# i + 2 * stride ... below ``total``, ``stride`` (the threads launched) a multiple of cols, so
# that its channel never changes and it reads the channel's values once: one element a
# thread, every thread read them again (tests/kernel_trace.py: 3x the minimum sectors in
# float32, 5x for float16 data). A warp's 32 threads still take 32 consecutive elements,
# aligned as before (``stride`` a multiple of 32 too).
_BATCH_NORM_ROWS_PER_THREAD = 16
# Forward, second launch: y = z (max(z, 0) with ``relu``, NaN staying NaN as _RELU's), rounded
# to Y (the compute dtype: float16 under mixed precision) as it is written.
_BATCH_NORM_APPLY = cupy.ElementwiseKernel(
    "raw X x, raw A mean, raw A inv_std, raw T gamma, raw T beta, int64 total, int64 stride,"
    " int32 cols, bool relu",
    "raw Y y",
    """
    const int c = i % cols;
    XPCNN_BN_CHANNEL(c)
    for (long long e = i; e < total; e += stride) {
        const A z = XPCNN_BN_Z(XPCNN_BN_XHAT(x[e]));
        y[e] = (Y)(relu && z < (A)0 ? (A)0 : z);
    }
    """,
    "xpcnn_batch_norm_apply",
    preamble=_BATCH_NORM_Z,
)
# Backward, first launch: the column sums of dz and dz * xhat, dz = dy (times z > 0 with
# ``relu``: the fused ReLU's gradient), xhat and z recomputed from x (of type X) and the
# statistics as forward computed them, dy (of type D) read as its cast to T (exact: float16
# under mixed precision), the last block writing them as beta's and gamma's gradients (T)
# and, for the second launch, per column (A): gamma * inv_std and the two sums' means.
_BATCH_NORM_BACKWARD_SOURCE = f"#define LANES {_SUM_ROWS_LANES}\n" + _BATCH_NORM_Z + r"""
// The lanes' sums of s1 and s2, per column, for every lane.
__device__ void xpcnn_bn_sum_lanes(A (*sums)[LANES][32], A& s1, A& s2) {
    const int c = threadIdx.x, lane = threadIdx.y;
    sums[0][lane][c] = s1;
    sums[1][lane][c] = s2;
    __syncthreads();
    for (int half = LANES / 2; half > 0; half /= 2) {
        if (lane < half) {
            sums[0][lane][c] += sums[0][lane + half][c];
            sums[1][lane][c] += sums[1][lane + half][c];
        }
        __syncthreads();
    }
    s1 = sums[0][0][c];
    s2 = sums[1][0][c];
}
extern "C" __global__ void xpcnn_batch_norm_sums(
        const D* __restrict__ dy, const X* __restrict__ x, const A* __restrict__ mean,
        const A* __restrict__ inv_std, const T* __restrict__ gamma, const T* __restrict__ beta,
        int relu, long long rows, int cols, long long per, A* partials, unsigned int* counters,
        T* __restrict__ dgamma, T* __restrict__ dbeta, A* __restrict__ coefs) {
    __shared__ A sums[2][LANES][32];
    const int lane = threadIdx.y, col = blockIdx.y * 32 + threadIdx.x;
    const long long first = blockIdx.x * per, end = first + per < rows ? first + per : rows;
    A s1 = (A)0, s2 = (A)0;
    if (col < cols) {
        // (read before the loop: gamma and beta, under ``if (relu)``, were read at every row)
        XPCNN_BN_CHANNEL(col)
        for (long long r = first + lane; r < end; r += LANES) {
            const long long i = r * cols + col;
            const A xhat = XPCNN_BN_XHAT(xpcnn_widen(x[i]));
            A g = (A)xpcnn_widen(dy[i]);
            if (relu) g = XPCNN_BN_RELU_GRAD(g, XPCNN_BN_Z(xhat));
            s1 += g;
            s2 += g * xhat;
        }
    }
    xpcnn_bn_sum_lanes(sums, s1, s2);
    const long long at = 2 * (blockIdx.x * (long long)cols + col);
    if (lane == 0 && col < cols) {
        partials[at] = s1;
        partials[at + 1] = s2;
    }
    if (!xpcnn_last_block(&counters[blockIdx.y], gridDim.x)) return;
    const volatile A* done = partials;
    s1 = s2 = (A)0;
    if (col < cols) {
        for (unsigned b = lane; b < gridDim.x; b += LANES) {
            s1 += done[2 * (b * (long long)cols + col)];
            s2 += done[2 * (b * (long long)cols + col) + 1];
        }
    }
    xpcnn_bn_sum_lanes(sums, s1, s2);
    if (lane == 0 && col < cols) {
        dbeta[col] = (T)s1;
        dgamma[col] = (T)s2;
        coefs[col] = (A)xpcnn_widen(gamma[col]) * inv_std[col];
        coefs[cols + col] = s1 / (A)rows;
        coefs[2 * cols + col] = s2 / (A)rows;
    }
}
"""
# Backward, second launch: dx = gamma * inv_std * (dz - mean(dz) - xhat * mean(dz * xhat)),
# the standard version's gradient through the mean and variance, rounded to X (the input's
# type), dz and xhat recomputed as the first launch does; the threads as _BATCH_NORM_APPLY's.
_BATCH_NORM_DX = cupy.ElementwiseKernel(
    "raw D dy, raw X x, raw A mean, raw A inv_std, raw T gamma, raw T beta, raw A coefs,"
    " int64 total, int64 stride, int32 cols, bool relu",
    "raw X dx",
    """
    const int c = i % cols;
    XPCNN_BN_CHANNEL(c)
    const A scale = coefs[c], mean_dz = coefs[cols + c], mean_dz_xhat = coefs[2 * cols + c];
    for (long long e = i; e < total; e += stride) {
        const A xhat = XPCNN_BN_XHAT(x[e]);
        const A g = relu ? XPCNN_BN_RELU_GRAD((A)dy[e], XPCNN_BN_Z(xhat)) : (A)dy[e];
        dx[e] = (X)(scale * ((g - mean_dz) - xhat * mean_dz_xhat));
    }
    """,
    "xpcnn_batch_norm_dx",
    preamble=_BATCH_NORM_Z,
)
# With the running statistics (inference, a frozen layer in training), one launch each way:
# z as above, inv_std = 1 / sqrt(var + eps) per element (cheaper than a launch), all in A;
# y = z (max(z, 0) with ``relu``) rounded to Y; dx = dz * gamma * inv_std rounded to X.
_BATCH_NORM_RUNNING_Z = _ACC + _BATCH_NORM_Z + """
#define XPCNN_BN_RUNNING_Z(x, c) \\
    ((((A)(x) - (A)mean[c]) * ((A)1 / sqrt((A)var[c] + (A)eps))) * (A)gamma[c] + (A)beta[c])
"""
_BATCH_NORM_RUNNING = cupy.ElementwiseKernel(
    "X x, raw T mean, raw T var, raw T gamma, raw T beta, float64 eps, int32 cols, bool relu",
    "Y y",
    """
    typedef XpcnnAcc<T>::type A;
    const int c = i % cols;
    const A z = XPCNN_BN_RUNNING_Z(x, c);
    y = (Y)(relu && z < (A)0 ? (A)0 : z);
    """,
    "xpcnn_batch_norm_running",
    preamble=_BATCH_NORM_RUNNING_Z,
)
_BATCH_NORM_RUNNING_DX = cupy.ElementwiseKernel(
    "D dy, X x, raw T mean, raw T var, raw T gamma, raw T beta, float64 eps, int32 cols,"
    " bool relu",
    "X dx",
    """
    typedef XpcnnAcc<T>::type A;
    const int c = i % cols;
    const A g = relu ? XPCNN_BN_RELU_GRAD((A)dy, XPCNN_BN_RUNNING_Z(x, c)) : (A)dy;
    dx = (X)(g * ((A)gamma[c] * ((A)1 / sqrt((A)var[c] + (A)eps))));
    """,
    "xpcnn_batch_norm_running_dx",
    preamble=_BATCH_NORM_RUNNING_Z,
)

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


def _batch_norm_threads(rows: int, cols: int) -> int:
    """The threads of _BATCH_NORM_APPLY and _BATCH_NORM_DX over (rows, cols) data: a multiple
    of cols and of 32, about _BATCH_NORM_ROWS_PER_THREAD elements each (at most)."""
    unit = math.lcm(cols, 32)
    return unit * -(-rows * cols // (unit * _BATCH_NORM_ROWS_PER_THREAD))


def _row_blocks(rows: int) -> tuple[int, int]:
    """Rows per block and blocks of a launch that sums columns over ``rows`` rows (see
    _SUM_ROWS_BLOCKS)."""
    per = max(_SUM_ROWS_PER_BLOCK, -(-rows // _SUM_ROWS_BLOCKS))
    return per, -(-rows // per)


class CupyKernels(StandardKernels):
    """One launch per job where the standard versions take several (see the module doc)."""

    fused_updates = True
    pads_in_im2col = True
    bias_in_patches = False  # its im2col kernel fills every column of ``out``

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
        self._deferred: _DeferredTables | None = None
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
            _BIAS_RELU(bias, bias.shape[-1], relu, y)
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
        _IM2COL(x, h, w, c, out_hw[0], out_hw[1], kernel[1], strides[0], strides[1],
                out.shape[-1], pads[0], pads[2], out)
        return out

    def sum_rows(self, a: Any) -> Any:
        # One launch whatever the rows (see _SUM_ROWS_SOURCE): CuPy's reduction over the
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
        per, blocks = _row_blocks(rows)
        chunks = -(-cols // 32)  # (a counter per column chunk)
        acc = accumulator(cupy, a.dtype)
        partials = cupy.empty((blocks, cols), acc)
        out = cupy.empty(cols, acc)
        tail = (np.int64(rows), np.int32(cols), np.int64(per), partials, _counters(a), out)
        y = a if relu_y is None else relu_y
        name = "xpcnn_sum_rows" if relu_y is None else "xpcnn_relu_sum_rows"
        args = (a, *tail) if relu_y is None else (a, relu_y, masked, *tail)
        _raw_kernel(name, _SUM_ROWS_SOURCE, X=a.dtype, Y=y.dtype, A=acc)(
            (blocks, chunks), (32, _SUM_ROWS_LANES), args)
        return out

    def max_pool(self, x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int]) -> Any:
        if not x.flags.c_contiguous:
            return super().max_pool(x, kernel, strides, out_hw)
        n, h, w, c = x.shape
        y = cupy.empty((n, *out_hw, c), x.dtype)
        _MAX_POOL(x, h, w, c, out_hw[0], out_hw[1], kernel[0], kernel[1], strides[0],
                  strides[1], y)
        return y

    def global_avg_pool(self, x: Any) -> Any:
        if not (x.flags.c_contiguous and x.dtype in _FLOAT_DTYPES):
            return super().global_avg_pool(x)
        n, h, w, c = x.shape
        return _GLOBAL_AVG_POOL(x, h * w, c, cupy.empty((n, c), x.dtype))

    def max_pool_backward(self, x: Any, y: Any, dy: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int],
                          relu_grad: bool = False) -> Any:
        (kh, kw), (sh, sw) = kernel, strides
        if sh < kh or sw < kw or not _contiguous(x, y, dy):
            return super().max_pool_backward(x, y, dy, kernel, strides, out_hw, relu_grad)
        n, h, w, c = x.shape
        covered = sh == kh and sw == kw and h == out_hw[0] * sh and w == out_hw[1] * sw
        # positions outside every window keep a zero gradient
        dx = cupy.empty(x.shape, dy.dtype) if covered else cupy.zeros(x.shape, dy.dtype)
        _MAX_POOL_BACKWARD(y, dy, x, h, w, c, out_hw[0], out_hw[1], kh, kw, sh, sw, relu_grad,
                           dx)
        return dx

    def uniform(self, state: Any, shape: tuple[int, ...], dtype: Any, first: int = 0) -> Any:
        if not math.prod(shape):  # (no launch would count the draw)
            return super().uniform(state, shape, dtype, first)
        bits = random.significant_bits(cupy, dtype)
        return _UNIFORM(first, bits, 2.0**-bits, cupy.empty(shape, dtype), state,
                        _counters(state), block_size=_DRAW_BLOCK)[0]

    def random_flip(self, state: Any, x: Any, out_dtype: Any, first: int = 0) -> Any:
        if x.size == 0:  # (no launch would count the draw)
            return super().random_flip(state, x, out_dtype, first)
        n, h, w, c = x.shape
        return _RANDOM_FLIP(cupy.ascontiguousarray(x), first, h, w, c,
                            cupy.empty(x.shape, out_dtype), state, _counters(state),
                            block_size=_DRAW_BLOCK)[0]

    def random_crop(self, state: Any, x: Any, padding: int, out_dtype: Any,
                    first: int = 0) -> Any:
        if x.size == 0:  # (no launch would count the draw)
            return super().random_crop(state, x, padding, out_dtype, first)
        n, h, w, c = x.shape
        return _RANDOM_CROP(cupy.ascontiguousarray(x), first, h, w, c, padding,
                            cupy.empty(x.shape, out_dtype), state, _counters(state),
                            block_size=_DRAW_BLOCK)[0]

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
        _raw_kernel("xpcnn_feature_norm", _FEATURE_NORM_SOURCE, X=x.dtype, T=t, Y=u, A=acc)(
            (n, -(-c // 32)), (_FEATURE_NORM_THREADS,),
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
        _raw_kernel("xpcnn_feature_norm_backward", _FEATURE_NORM_BACKWARD_SOURCE, D=dy.dtype,
                    X=x.dtype, A=acc)(
            (n, -(-c // 32)), (_FEATURE_NORM_THREADS,),
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
        per, blocks = _row_blocks(rows)
        acc = accumulator(cupy, t)
        partials = cupy.empty((blocks, cols, 2), acc)
        mean, inv_std = cupy.empty(cols, acc), cupy.empty(cols, acc)
        if rows < 2:  # (one value a channel: the running statistics left as they were, as
            # the standard version leaves them; the kernel writes its update to scratch)
            moving_mean, moving_var = cupy.empty_like(moving_mean), cupy.empty_like(moving_var)
        _raw_kernel("xpcnn_batch_norm_stats", _BATCH_NORM_SOURCE, X=x.dtype, T=t, A=acc)(
            (blocks, -(-cols // 32)), (32, _SUM_ROWS_LANES),
            (x, np.int64(rows), np.int32(cols), np.int64(per), np.float64(eps),
             np.float64(1 - momentum), np.float64(momentum),
             np.float64(rows / max(rows - 1, 1)), partials, _counters(x), mean, inv_std,
             moving_mean, moving_var))
        y = cupy.empty(x.shape, out_dtype)
        threads = _batch_norm_threads(rows, cols)
        _BATCH_NORM_APPLY(x, mean, inv_std, gamma, beta, x.size, threads, cols, relu, y,
                          size=threads)
        return y, mean, inv_std

    def batch_norm_backward(self, dy: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                            beta: Any, relu: bool, input_grad: bool) -> tuple[Any, Any, Any]:
        t = gamma.dtype
        acc = accumulator(cupy, t)
        # (a broadcast gradient, GlobalAvgPool2D's, made whole: one copy, no more passes)
        dy = cupy.ascontiguousarray(dy)
        if not (_fits_batch_norm(dy, t, gamma, beta) and _fits_batch_norm(x, acc, mean, inv_std)
                and np.can_cast(x.dtype, t) and x.shape == dy.shape):
            return super().batch_norm_backward(dy, x, mean, inv_std, gamma, beta, relu,
                                               input_grad)
        cols = dy.shape[-1]
        rows = dy.size // cols
        per, blocks = _row_blocks(rows)
        partials, coefs = cupy.empty((blocks, cols, 2), acc), cupy.empty((3, cols), acc)
        dgamma, dbeta = cupy.empty(cols, t), cupy.empty(cols, t)
        _raw_kernel("xpcnn_batch_norm_sums", _BATCH_NORM_BACKWARD_SOURCE, D=dy.dtype,
                    X=x.dtype, T=t, A=acc)(
            (blocks, -(-cols // 32)), (32, _SUM_ROWS_LANES),
            (dy, x, mean, inv_std, gamma, beta, np.int32(relu), np.int64(rows),
             np.int32(cols), np.int64(per), partials, _counters(dy), dgamma, dbeta, coefs))
        if not input_grad:
            return None, dgamma, dbeta
        dx = cupy.empty(x.shape, x.dtype)
        threads = _batch_norm_threads(rows, cols)
        _BATCH_NORM_DX(dy, x, mean, inv_std, gamma, beta, coefs, x.size, threads, cols, relu, dx,
                       size=threads)
        return dx, dgamma, dbeta

    def batch_norm_running(self, x: Any, gamma: Any, beta: Any, moving_mean: Any,
                           moving_var: Any, eps: float, out_dtype: Any, relu: bool) -> Any:
        if not (_fits_batch_norm(x, gamma.dtype, gamma, beta, moving_mean, moving_var)
                and np.dtype(out_dtype) in _FLOAT_DTYPES):
            return super().batch_norm_running(x, gamma, beta, moving_mean, moving_var, eps,
                                              out_dtype, relu)
        return _BATCH_NORM_RUNNING(x, moving_mean, moving_var, gamma, beta, eps, x.shape[-1],
                                   relu, cupy.empty(x.shape, out_dtype))

    def batch_norm_running_backward(self, dy: Any, x: Any, gamma: Any, beta: Any,
                                    moving_mean: Any, moving_var: Any, eps: float,
                                    relu: bool) -> Any:
        t = gamma.dtype
        if not (_fits_batch_norm(dy, t, gamma, beta, moving_mean, moving_var)
                and _fits_batch_norm(x, t) and x.shape == dy.shape):
            return super().batch_norm_running_backward(dy, x, gamma, beta, moving_mean,
                                                       moving_var, eps, relu)
        return _BATCH_NORM_RUNNING_DX(dy, x, moving_mean, moving_var, gamma, beta, eps,
                                      x.shape[-1], relu, cupy.empty(x.shape, x.dtype))

    def rescale(self, x: Any, scale: float, offset: float, dtype: Any, out_dtype: Any) -> Any:
        t, u = np.dtype(dtype), np.dtype(out_dtype)
        if t not in _FLOAT_DTYPES:  # (the standard version's dtypes: an integer times a float)
            return super().rescale(x, scale, offset, dtype, out_dtype)
        return _RESCALE(x, cupy.empty(0, t), t.type(scale), t.type(offset), bool(offset),
                        cupy.empty(x.shape, u))

    def normalize(self, x: Any, shift: Any, scale: Any, dtype: Any, out_dtype: Any) -> Any:
        t = np.dtype(dtype)
        if t not in _FLOAT_DTYPES or x.ndim == 0 or shift.dtype != t or scale.dtype != t:
            return super().normalize(x, shift, scale, dtype, out_dtype)
        return _NORMALIZE(x, shift, scale, x.shape[-1], cupy.empty(x.shape, out_dtype))

    def mask_multiply(self, x: Any, mask: Any, scale: float | None = None,
                      relu_y: Any = None) -> Any:
        factor = x.dtype.type(1.0 if scale is None else scale)
        if relu_y is None:
            return _MASK_MULTIPLY(x, mask, factor)
        return _MASK_MULTIPLY_RELU(x, mask, factor, relu_y)

    def dropout(self, state: Any, x: Any, rate: float, first: int = 0) -> tuple[Any, Any]:
        if x.size == 0:  # (no launch would count the draw)
            return super().dropout(state, x, rate, first)
        bits = random.significant_bits(cupy, x.dtype)
        t = x.dtype.type
        y, keep, _, _ = _DROPOUT(x, first, bits, 2.0**-bits, t(rate), t(1.0 / (1.0 - rate)),
                                 cupy.empty(x.shape, x.dtype), cupy.empty(x.shape, cupy.bool_),
                                 state, _counters(state), block_size=_DRAW_BLOCK)
        return y, keep

    def relu(self, x: Any, max_value: float | None) -> Any:
        return _RELU(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_with_mask(self, x: Any, max_value: float | None) -> tuple[Any, Any]:
        return _RELU_WITH_MASK(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_backward(self, dy: Any, y: Any) -> Any:
        return _RELU_BACKWARD(dy, y)

    def add_relu(self, arrays: list[Any], relu: bool) -> Any:
        if not relu or not alike(arrays):
            return super().add_relu(arrays, relu)
        *first, last = arrays  # (all but the last summed as the standard version sums them)
        head = first[0] if len(first) == 1 else super().add_relu(first, False)
        return _ADD_RELU(head, last)

    def add_relu_backward(self, dys: list[Any], relu_y: Any) -> Any:
        if relu_y is None or len(dys) < 2 or not alike([*dys, relu_y]):
            return super().add_relu_backward(dys, relu_y)
        *first, last = dys
        head = first[0] if len(first) == 1 else super().add_relu_backward(first, None)
        return _ADD_RELU_BACKWARD(head, last, relu_y)

    def softmax_cross_entropy(self, z: Any, labels: Any, smoothing: float, scale: Any = None,
                              dtype: Any = None) -> tuple[Any, Any]:
        n, classes = z.shape
        t = z.dtype if dtype is None else np.dtype(dtype)
        # (logits wider than ``dtype``, or a scale that would widen the gradient's dtype, as
        # for float16 logits: the standard version; so do labels of no integer dtype)
        if not _contiguous(z, labels) or n == 0 or np.result_type(z.dtype, t) != t or not (
                scale is None or (scale.flags.c_contiguous
                                  and np.result_type(t, scale.dtype) == t)) or (
                labels.dtype.kind not in "iu"):
            return super().softmax_cross_entropy(z, labels, smoothing, scale, dtype)
        acc = accumulator(cupy, t)
        name, rows_per_block = cross_entropy_kernel(classes, t)
        blocks = -(-n // rows_per_block)
        grad = cupy.empty(z.shape, z.dtype)  # (in the logits' dtype)
        partials = cupy.empty((blocks, 2), acc)  # per block: its rows' loss / N, right ones
        stats = cupy.empty(2, acc)
        scaled = scale is not None
        if not scaled:
            scale = z  # (not read)
        kernel = _raw_kernel(name, _SOFTMAX_CROSS_ENTROPY_SOURCE,
                             Z=z.dtype, L=labels.dtype, T=t, U=scale.dtype, A=acc)
        kernel((blocks,), (_CROSS_ENTROPY_THREADS,),
               (z, labels, np.int64(n), np.int32(classes), np.float64(1.0 - smoothing),
                np.float64(smoothing / classes), np.float64(1.0 / n), scale,
                np.int32(scaled), grad, partials, _counters(z), stats))
        return stats, grad

    def cast_all(self, arrays: list[Any], dtype: Any) -> list[Any]:
        out = list(arrays)  # (those of the dtype already stay themselves)
        groups: dict[Any, list[int]] = {}
        for k, a in enumerate(arrays):
            if a.dtype != dtype:
                groups.setdefault(a.dtype, []).append(k)
        pad = max(1, ALIGNMENT // np.dtype(dtype).itemsize)
        for ks in groups.values():
            sources = [cupy.ascontiguousarray(arrays[k]) for k in ks]
            table, size = _search_table(sources, sources[0].device, self._deferred,
                                        [a.size for a in sources], pad=pad)
            flat = cupy.empty(size, dtype)  # (the pool's blocks are 512-byte aligned)
            if size:
                _CAST_ALL(sources[0], len(sources), table, flat, size=size)
            starts = _offsets(sources, pad)[:-1]  # (as _search_table's)
            for k, a, start in zip(ks, sources, starts, strict=True):
                out[k] = flat[start:start + a.size].reshape(a.shape)
        return out

    def snapshot_state(self, arrays: list[Any]) -> Any:
        if not arrays or not _contiguous(*arrays):  # (found by their bytes' flat index)
            return super().snapshot_state(arrays)
        as_bytes = [cupy.reshape(a, (-1,)).view(np.uint8) for a in arrays]
        table, size = _search_table(as_bytes, arrays[0].device, self._deferred)
        kept = cupy.empty(size, np.uint8)
        if size:
            _SNAPSHOT(len(arrays), table, kept, size=size)
        return _Kept(len(arrays), table, kept)

    def restore_state(self, arrays: list[Any], snapshot: Any, apply: Any) -> None:
        if not isinstance(snapshot, _Kept):  # (the standard copies)
            super().restore_state(arrays, snapshot, apply)
        elif snapshot.kept.size:
            _RESTORE(snapshot.count, snapshot.kept, self._apply_flag(apply), snapshot.table,
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
            table, size = _search_table(arrays, state.device, self._deferred,
                                        [k for k, _ in group])
            if size:
                _CHECK_GRADIENTS(arrays[0], len(arrays), square_limit(np, dtype), squares,
                                 scaled, scaling, table, BAD_GRADS + len(grads), state,
                                 size=size)
        if scaled:  # (unscaled in place: a copy's values go back where the caller reads)
            for g, copy in zip(grads, contiguous, strict=True):
                if copy is not g:
                    g[...] = copy
        apply = cupy.empty(1, cupy.bool_)
        stats = cupy.ascontiguousarray(stats)
        if _by_value(step):
            _RECORD_STEP(len(grads), stats, n, scaled, GROWTH_INTERVAL, float(step),
                         state, scaling, apply, size=1)
        else:
            _RECORD_STEP_AT(len(grads), stats, n, scaled, GROWTH_INTERVAL,
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
        deferred, tables = _DeferredTables(self._table_pool), []
        outer, self._deferred = self._deferred, deferred
        try:
            yield tables
        finally:
            self._deferred = outer
        tables.extend(deferred.fill())

    def _launch_updates(self, kernel: Any, groups: list[tuple[Any, ...]], constants: tuple,
                        per_step: tuple, apply: Any) -> None:
        """``kernel`` once per dtype group of (params, grads, *slots): ``constants`` (Python
        floats rounded to the group's dtype, bools as they are), then ``per_step``."""
        flag = self._apply_flag(apply)
        for p, g, *slots in groups:
            table, size = _update_table(p, g, *slots, deferred=self._deferred)
            t = p[0].dtype.type
            fixed = [c if isinstance(c, bool) else t(c) for c in constants]
            kernel(p[0], len(p), len(slots), *fixed, *[self._per_step(v, t) for v in per_step],
                   flag, table, size=size)

    def sgd_update(self, params: list[Any], grads: list[Any], bufs: list[Any] | None,
                   lr: Any, weight_decay: float, momentum: float, nesterov: bool,
                   apply: Any = None) -> None:
        self._launch_updates(_SGD if _by_value(lr) else _SGD_AT,
                             self._by_dtype(params, grads, bufs),
                             (weight_decay, momentum, nesterov), (lr,), apply)

    def adam_update(self, params: list[Any], grads: list[Any], ms: list[Any], vs: list[Any],
                    decay: Any, step: Any, bc2: Any, weight_decay: float, decoupled: bool,
                    beta_1: float, beta_2: float, epsilon: float, apply: Any = None,
                    vhats: list[Any] | None = None) -> None:
        """``decay``, ``step``, ``bc2``: as :meth:`adam_scalars` gives them (or Python floats);
        ``vhats``: AMSGrad's largest second moments (None without it)."""
        self._launch_updates(
            _ADAM if _by_value(decay) else _ADAM_AT, self._by_dtype(params, grads, ms, vs, vhats),
            (weight_decay, decoupled, beta_1, 1.0 - beta_1, beta_2, 1.0 - beta_2, epsilon),
            (decay, step, bc2), apply)

    def adam_scalars(self, applied: Any, lr: Any, apply: Any, weight_decay: float,
                     beta_1: float, beta_2: float, dtype: Any) -> tuple[Any, Any, Any]:
        out = cupy.empty(3, dtype)
        if _by_value(lr):
            _ADAM_SCALARS(self._apply_flag(apply), weight_decay, beta_1, beta_2, float(lr),
                          cupy.reshape(applied, (1,)), out, size=1)
        else:
            _ADAM_SCALARS_AT(self._apply_flag(apply), weight_decay, beta_1, beta_2,
                             cupy.reshape(lr.astype(cupy.float64, copy=False), (1,)),
                             cupy.reshape(applied, (1,)), out, size=1)
        return out[0, ...], out[1, ...], out[2, ...]  # (0-d arrays, not numbers)

    def rmsprop_update(self, params: list[Any], grads: list[Any], vs: list[Any],
                       means: list[Any] | None, bufs: list[Any] | None, lr: Any,
                       weight_decay: float, rho: float, momentum: float, epsilon: float,
                       apply: Any = None) -> None:
        """``means``: the centered variant's mean gradients (None where not centered);
        ``bufs``: the momentum buffers (None without momentum)."""
        self._launch_updates(
            _RMSPROP if _by_value(lr) else _RMSPROP_AT,
            self._by_dtype(params, grads, vs, means, bufs),
            (weight_decay, rho, 1.0 - rho, means is not None, momentum, epsilon), (lr,), apply)


KERNELS = CupyKernels()
