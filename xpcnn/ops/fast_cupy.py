"""CuPy-only kernels behind the one seam ``Backend.fast`` (see :mod:`xpcnn.ops.kernels`).

On a GPU each CuPy call costs 20-50 us of Python and launch (measured on an H200,
docs/performance.md), and the standard versions make one call (and one temporary) per array
operation, e.g. kh*kw slice copies for an im2col, four calls for a ReLU gradient, nine for an
Adam update, ~20 for a softmax cross-entropy. Each kernel here does one of those jobs in a
single launch, reading and writing each element once. Convolutions run as tiled implicit-GEMM
kernels in shared memory (float32 / float64) or as one-element-per-thread direct kernels
(float16), with no im2col scratch. Every method matches its :class:`StandardKernels` twin:
``tests/test_gpu.py`` checks that on the GPU in float32 and float16, and
``tests/test_cuda_kernels_on_cpu.py`` compiles the same kernel source for the CPU and checks
it on every machine. The cases a kernel does not cover (overlapping pooling windows,
non-contiguous outputs) go to that twin.

Kernels are compiled by CuPy on first use and cached on disk (``~/.cupy/kernel_cache``). In
elementwise bodies ``i`` is the element's C-order index, and a ``raw`` array indexed by one
integer is read at that C-order index; ``n`` and ``i`` are CuPy's own names.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.cupy as compat_cupy
import cupy
import numpy as np

from .kernels import StandardKernels

# out[n, oh, ow, (i*kw + j)*C + c] = x[n, oh*sh + i - top, ow*sw + j - left, c] for a
# C-contiguous x, 0 outside it: the zero padding is read, never stored.
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

# Direct convolution, one output element per thread: y[n, oh, ow, k] = relu?(b[k] +
# sum_{a, b, c} x[n, oh*sh + a - top, ow*sw + b - left, c] * w[(a*kw + b)*C + c, k]), zero
# padding read, never stored. Threads of a warp share (n, oh, ow) and read consecutive k:
# the x value is one broadcast load, the w row a coalesced one (w stays in L1).
_CONV = cupy.ElementwiseKernel(
    "raw T x, raw T w, raw T bias, bool has_bias, bool relu, int32 H, int32 W, int32 C,"
    " int32 Ho, int32 Wo, int32 K, int32 kh, int32 kw, int32 sh, int32 sw, int32 top,"
    " int32 left",
    "T y",
    """
    typedef XpcnnAcc<T>::type A;
    long long r = i;
    const int k = r % K; r /= K;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const long long img = r / Ho;
    A acc = has_bias ? (A)bias[k] : (A)0;
    for (int a = 0; a < kh; ++a) {
        const int hh = oh * sh + a - top;
        if (hh < 0 || hh >= H) continue;
        for (int q = 0; q < kw; ++q) {
            const int ww = ow * sw + q - left;
            if (ww < 0 || ww >= W) continue;
            const long long xo = ((img * H + hh) * W + ww) * C;
            const long long wo = (long long)((a * kw + q) * C) * K + k;
            for (int c = 0; c < C; ++c) {
                acc += (A)x[xo + c] * (A)w[wo + (long long)c * K];
            }
        }
    }
    if (relu && acc < (A)0) acc = (A)0;
    y = (T)acc;
    """,
    "xpcnn_conv",
    preamble=_ACC,
)

# Tiled direct convolution (implicit GEMM): the (M = N*Ho*Wo, K) output as the product of
# the patch matrix (M, KK = kh*kw*C), gathered on the fly and never stored, and the kernel
# matrix (KK, K). A block of 128 threads owns a 128 x 32 output tile and walks KK in slices of
# 16: it gathers the slice's patch values and kernel rows into shared memory once, then each
# thread accumulates an 8 x 4 tile from there (12 shared loads for 32 products, where the
# one-element-per-thread kernel above makes two global loads per product). Where each gathered
# value lives comes from tables of offsets per output row and per kernel-matrix row: computing
# it with integer divisions per value made the first version of this kernel 1.4x slower
# (measured on an H200). float32 and float64; float16 keeps the kernel above.
# Tile sizes: a block's output tile (M x N), the slice of the reduction it walks (K), one
# thread's register tile (TM x TN); the launches below take their grids from the same numbers.
_TILE_M, _TILE_N, _TILE_K, _TILE_TM, _TILE_TN = 128, 32, 16, 8, 4
_TILE_THREADS = (_TILE_M // _TILE_TM) * (_TILE_N // _TILE_TN)
_TILE = f"""
#define BM {_TILE_M}
#define BN {_TILE_N}
#define BK {_TILE_K}
#define TM {_TILE_TM}
#define TN {_TILE_TN}
""" + """#define NT ((BM / TM) * (BN / TN))
// acc[i][j] += As[t][tm*TM + i] * Bs[t][tn*TN + j] over the slice's BK rows, in registers
#define XPCNN_TILE_PRODUCT \
    for (int t = 0; t < BK; ++t) { \
        ACC a[TM]; \
        ACC b[TN]; \
        for (int i = 0; i < TM; ++i) a[i] = (ACC)As[t][tm * TM + i]; \
        for (int j = 0; j < TN; ++j) b[j] = (ACC)Bs[t][tn * TN + j]; \
        for (int i = 0; i < TM; ++i) \
            for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j]; \
    }
"""
_CONV_TILED_SOURCE = r"""
extern "C" __global__ void xpcnn_conv_tiled(
        const TYPE* x, const TYPE* w, const TYPE* bias, TYPE* y, const int has_bias,
        const int relu, const long long M, const int H, const int W, const int C,
        const int Ho, const int Wo, const int K, const int kw, const int KK, const int sh,
        const int sw, const int top, const int left) {
    __shared__ TYPE As[BK][BM + 1];  // patch values, As[t][r]: +1 spreads the stores over banks
    __shared__ TYPE Bs[BK][BN];      // kernel rows
    __shared__ long long row_at[BM]; // where the row's window starts in x (may lie outside)
    __shared__ int row_h[BM];        // the row's top-left input position; -2^29 past M
    __shared__ int row_w[BM];
    __shared__ int tap_h[BK];        // per kernel-matrix row of the slice: its offsets in the
    __shared__ int tap_w[BK];        // window, and in x from the window's start; -2^29 past KK
    __shared__ long long tap_at[BK];
    const int tid = threadIdx.x;
    const int tn = tid % (BN / TN);
    const int tm = tid / (BN / TN);
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    for (int r = tid; r < BM; r += NT) {
        const long long m = m0 + r;
        if (m < M) {
            const int ow = (int)(m % Wo);
            const long long t = m / Wo;
            const int oh = (int)(t % Ho);
            row_h[r] = oh * sh - top;
            row_w[r] = ow * sw - left;
            row_at[r] = (t / Ho) * H * W * C + ((long long)row_h[r] * W + row_w[r]) * C;
        } else {
            row_h[r] = -(1 << 29);
            row_w[r] = 0;
            row_at[r] = 0;
        }
    }
    ACC acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = (ACC)0;
    for (int k0 = 0; k0 < KK; k0 += BK) {
        if (tid < BK) {
            const int kk = k0 + tid;
            if (kk < KK) {
                const int tap = kk / C;
                tap_h[tid] = tap / kw;
                tap_w[tid] = tap % kw;
                tap_at[tid] = ((long long)tap_h[tid] * W + tap_w[tid]) * C + kk % C;
            } else {
                tap_h[tid] = -(1 << 29);
                tap_w[tid] = 0;
                tap_at[tid] = 0;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < BM * BK; idx += NT) {
            const int t = idx % BK;
            const int r = idx / BK;
            const int hh = row_h[r] + tap_h[t];
            const int ww = row_w[r] + tap_w[t];
            As[t][r] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? x[row_at[r] + tap_at[t]]
                                                                  : (TYPE)0;
        }
        for (int idx = tid; idx < BK * BN; idx += NT) {
            const int t = idx / BN;
            const int nn = idx % BN;
            const int kk = k0 + t;
            const int n = n0 + nn;
            Bs[t][nn] = (kk < KK && n < K) ? w[(long long)kk * K + n] : (TYPE)0;
        }
        __syncthreads();
        XPCNN_TILE_PRODUCT
        __syncthreads();
    }
    for (int i = 0; i < TM; ++i) {
        const long long m = m0 + tm * TM + i;
        if (m >= M) continue;
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn * TN + j;
            if (n >= K) continue;
            ACC v = acc[i][j];
            if (has_bias) v += (ACC)bias[n];
            if (relu && v < (ACC)0) v = (ACC)0;
            y[m * K + n] = (TYPE)v;
        }
    }
}
"""
# The kernel gradient as the same tiled product turned around: part[s, kk, n] = sum over the
# output rows m of block s of patch[m, kk] * dy[m, n], a block of threads owning 128 kernel-
# matrix rows x 32 output channels of one block of rows, walking it 16 rows at a time. With
# ``extra`` = 1 a last kernel-matrix row of ones gives the bias gradient in the same pass.
_CONV_WEIGHT_GRAD_TILED_SOURCE = r"""
extern "C" __global__ void xpcnn_conv_weight_grad_tiled(
        const TYPE* x, const TYPE* dy, TYPE* part, const long long M, const long long per,
        const int H, const int W, const int C, const int Ho, const int Wo, const int K,
        const int kw, const int KK, const int extra, const int sh, const int sw, const int top,
        const int left) {
    __shared__ TYPE As[BK][BM + 1];     // patch values, As[t][r] for row t, kernel row r
    __shared__ TYPE Bs[BK][BN];         // output gradient rows
    __shared__ long long row_at[BK];    // where the row's window starts in x (may lie outside)
    __shared__ int row_h[BK];           // the row's top-left input position; -2^29 past the end
    __shared__ int row_w[BK];
    __shared__ int tap_h[BM];           // per kernel-matrix row of the block: its offsets in the
    __shared__ int tap_w[BM];           // window, and in x from the window's start; -2^29 past
    __shared__ long long tap_at[BM];    // KK, and 2^29 for the bias row
    const int tid = threadIdx.x;
    const int tn = tid % (BN / TN);
    const int tm = tid / (BN / TN);
    const int kk0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const long long s = blockIdx.z;
    const long long begin = s * per;
    const long long end = begin + per < M ? begin + per : M;
    const int KKE = KK + extra;
    for (int r = tid; r < BM; r += NT) {
        const int kk = kk0 + r;
        if (kk < KK) {
            const int tap = kk / C;
            tap_h[r] = tap / kw;
            tap_w[r] = tap % kw;
            tap_at[r] = ((long long)tap_h[r] * W + tap_w[r]) * C + kk % C;
        } else {
            tap_h[r] = kk < KKE ? (1 << 29) : -(1 << 29);
            tap_w[r] = 0;
            tap_at[r] = 0;
        }
    }
    ACC acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = (ACC)0;
    for (long long m0 = begin; m0 < end; m0 += BK) {
        if (tid < BK) {
            const long long m = m0 + tid;
            if (m < end) {
                const int ow = (int)(m % Wo);
                const long long t = m / Wo;
                const int oh = (int)(t % Ho);
                row_h[tid] = oh * sh - top;
                row_w[tid] = ow * sw - left;
                row_at[tid] = (t / Ho) * H * W * C + ((long long)row_h[tid] * W + row_w[tid]) * C;
            } else {
                row_h[tid] = -(1 << 29);
                row_w[tid] = 0;
                row_at[tid] = 0;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < BK * BM; idx += NT) {
            const int r = idx % BM;
            const int t = idx / BM;
            TYPE v = (TYPE)0;
            if (tap_h[r] == (1 << 29)) {
                v = row_h[t] > -(1 << 28) ? (TYPE)1 : (TYPE)0;  // the bias row, for real rows
            } else {
                const int hh = row_h[t] + tap_h[r];
                const int ww = row_w[t] + tap_w[r];
                if (hh >= 0 && hh < H && ww >= 0 && ww < W) v = x[row_at[t] + tap_at[r]];
            }
            As[t][r] = v;
        }
        for (int idx = tid; idx < BK * BN; idx += NT) {
            const int t = idx / BN;
            const int nn = idx % BN;
            const long long m = m0 + t;
            const int n = n0 + nn;
            Bs[t][nn] = (m < end && n < K) ? dy[m * K + n] : (TYPE)0;
        }
        __syncthreads();
        XPCNN_TILE_PRODUCT
        __syncthreads();
    }
    for (int i = 0; i < TM; ++i) {
        const int kk = kk0 + tm * TM + i;
        if (kk >= KKE) continue;
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn * TN + j;
            if (n < K) part[(s * KKE + kk) * K + n] = (TYPE)acc[i][j];
        }
    }
}
"""
_TILED: dict[tuple[str, str], Any] = {}


def _tiled_kernel(name: str, source: str, dtype: Any) -> Any:
    """The kernel ``name`` of ``source`` for float32 or float64 data, compiled once."""
    key = (name, np.dtype(dtype).name)
    kernel = _TILED.get(key)
    if kernel is None:
        ctype = {"float32": "float", "float64": "double"}[key[1]]
        kernel = _TILED[key] = cupy.RawKernel(
            (_TILE + source).replace("TYPE", ctype).replace("ACC", ctype), name)
    return kernel


# Kernel gradient in parts: part[s, (a*kw + b)*C + c, k] = sum over the output rows of block s
# of x[n, oh*sh + a - top, ow*sw + b - left, c] * dy[row, k]; the parts are then summed. A
# thread owns one k and Q consecutive channels c of one (s, a, b): each dy value it loads serves
# Q products (dy is read KKC/Q times in all, not KKC times). Threads of a warp share (s, a, b, c)
# and read consecutive k of each dy row (coalesced). Q is a compile-time constant (the
# accumulators stay in registers), one kernel per Q. With ``extra`` = 1 one more group of
# threads (qb == QB) sums dy itself into part[s, KKC, k]: the bias gradient, in the same launch
# and the same final sum.
_CONV_WEIGHT_GRAD_BODY = """
    typedef XpcnnAcc<T>::type A;
    long long r = i;
    const int k = r % K; r /= K;
    const int qb = r % (QB + extra);
    const long long s = r / (QB + extra);
    const long long part_rows = (long long)QB * XQ + extra;
    long long row = s * per;
    const long long end = row + per < rows ? row + per : rows;
    if (qb == QB) {
        A total = (A)0;
        for (; row < end; ++row) total += (A)dy[row * K + k];
        part[(s * part_rows + (long long)QB * XQ) * K + k] = (P)total;
    } else {
        const int q0 = qb * XQ;
        const int c0 = q0 % C;
        const int a = (q0 / C) / kw;
        const int b = (q0 / C) % kw;
        int ow = row % Wo;
        long long t = row / Wo;
        int oh = t % Ho;
        long long img = t / Ho;
        A acc[XQ];
        for (int u = 0; u < XQ; ++u) acc[u] = (A)0;
        for (; row < end; ++row) {
            const int hh = oh * sh + a - top;
            const int ww = ow * sw + b - left;
            if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
                const A g = (A)dy[row * K + k];
                const long long xo = ((img * H + hh) * W + ww) * C + c0;
                for (int u = 0; u < XQ; ++u) acc[u] += (A)x[xo + u] * g;
            }
            if (++ow == Wo) { ow = 0; if (++oh == Ho) { oh = 0; ++img; } }
        }
        for (int u = 0; u < XQ; ++u) part[(s * part_rows + q0 + u) * K + k] = (P)acc[u];
    }
"""
_CONV_WEIGHT_GRAD: dict[int, Any] = {}


def _conv_weight_grad_kernel(q: int) -> Any:
    kernel = _CONV_WEIGHT_GRAD.get(q)
    if kernel is None:
        kernel = _CONV_WEIGHT_GRAD[q] = cupy.ElementwiseKernel(
            "raw T x, raw G dy, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 K,"
            " int32 kw, int32 sh, int32 sw, int32 top, int32 left, int32 QB, int32 extra,"
            " int64 rows, int64 per",
            "raw P part",
            _CONV_WEIGHT_GRAD_BODY.replace("XQ", str(q)),
            f"xpcnn_conv_weight_grad_{q}",
            preamble=_ACC,
        )
    return kernel


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

# Maximum of each window, NaN propagating as xp.maximum does.
_MAX_POOL = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw, int32 sh,"
    " int32 sw",
    "T y",
    """
    const long long base = xpcnn_window(i, H, W, C, Ho, Wo, sh, sw);
    T best = x[base];
    for (int a = 0; a < kh; ++a) {
        for (int b = 0; b < kw; ++b) {
            const T v = x[base + ((long long)a * W + b) * C];
            if (v > best || v != v) best = v;
        }
    }
    y = best;
    """,
    "xpcnn_max_pool",
    preamble=_WINDOW,
)

# Non-overlapping windows only (strides >= kernel): each output element owns its window, so
# one thread writes every input position of it: the gradient at the first x == y in row-major
# order, 0 at the others.
_MAX_POOL_BACKWARD = cupy.ElementwiseKernel(
    "T yv, G g, raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw,"
    " int32 sh, int32 sw",
    "raw G dx",
    """
    const long long base = xpcnn_window(i, H, W, C, Ho, Wo, sh, sw);
    bool found = false;
    for (int a = 0; a < kh; ++a) {
        for (int b = 0; b < kw; ++b) {
            const long long k = base + ((long long)a * W + b) * C;
            const bool take = !found && x[k] == yv;
            dx[k] = take ? g : (G)0.0f;
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
# as with xp.clip.
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

# dy * (y > 0) and dy * mask, as products (NaN * 0 is NaN, as in the standard versions).
_RELU_BACKWARD = cupy.ElementwiseKernel(
    "T dy, Y y", "T dx", "dx = dy * (T)(y > (Y)0.0f ? 1.0f : 0.0f);", "xpcnn_relu_backward"
)
_MASK_MULTIPLY = cupy.ElementwiseKernel(
    "T x, bool m", "T y", "y = x * (T)(m ? 1.0f : 0.0f);", "xpcnn_mask_multiply"
)

# Softmax cross-entropy of one row of logits per thread (a few classes each): the row's loss
# divided by N, whether its first maximum is at the label, and its gradient row, (softmax -
# target) / N, with the target mixed with the uniform distribution by ``spread`` = smoothing /
# classes (``keep`` = 1 - smoothing). The same steps as xpcnn.ops.softmax, in the accumulator
# type.
_SOFTMAX_CROSS_ENTROPY = cupy.ElementwiseKernel(
    "raw T z, raw L labels, int32 classes, float64 keep, float64 spread, float64 inv_n",
    "raw T grad, raw S stats",
    """
    typedef XpcnnAcc<T>::type A;
    const long long base = (long long)i * classes;
    const long long label = (long long)labels[i];
    A top = (A)z[base];
    int first = 0;
    for (int c = 1; c < classes; ++c) {
        const A v = (A)z[base + c];
        if (v > top) { top = v; first = c; }
    }
    A total = (A)0;
    for (int c = 0; c < classes; ++c) total += exp((A)z[base + c] - top);
    const A log_total = log(total);
    A loss = (A)0;
    for (int c = 0; c < classes; ++c) {
        const A logp = ((A)z[base + c] - top) - log_total;
        const A t = (c == label ? (A)keep : (A)0) + (A)spread;
        loss -= t * logp;
        grad[base + c] = (T)((exp(logp) - t) * (A)inv_n);
    }
    stats[2 * i] = (S)(loss * (A)inv_n);
    stats[2 * i + 1] = (S)(first == label ? 1 : 0);
    """,
    "xpcnn_softmax_cross_entropy",
    preamble=_ACC,
)

# The optimisers' updates (the formulas of xpcnn.optim, in the same order) for every parameter
# of a step in one launch: one thread per element of all of them. ``table`` holds the running
# element offsets of the ``count`` arrays (count + 1 values), then per array the addresses of
# the parameter, its gradient and its state arrays (``slots`` of them); a binary search finds
# the array an element belongs to.
_FIND_ARRAY = """
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((long long)i >= table[mid]) lo = mid; else hi = mid - 1;
    }
    const long long e = (long long)i - table[lo];
    const long long row = count + 1 + (long long)lo * (2 + slots);
    T& p = ((T*)table[row])[e];
    const T g = ((const T*)table[row + 1])[e];
"""
_SGD = cupy.ElementwiseKernel(
    "raw T dtype_of, int32 count, int32 slots, T lr, T wd, T mom, bool nesterov",
    "raw int64 table",
    _FIND_ARRAY + """
    const T grad = g + wd * p;
    if (slots == 0) {
        p = p - lr * grad;
    } else {
        T& buf = ((T*)table[row + 2])[e];
        buf = mom * buf + grad;
        p = p - lr * (nesterov ? grad + mom * buf : buf);
    }
    """,
    "xpcnn_sgd",
)
_ADAM = cupy.ElementwiseKernel(
    "raw T dtype_of, int32 count, int32 slots, T wd, bool decoupled, T decay, T b1, T c1, T b2,"
    " T c2, T step, T bc2, T eps",
    "raw int64 table",
    _FIND_ARRAY + """
    T& m = ((T*)table[row + 2])[e];
    T& v = ((T*)table[row + 3])[e];
    T grad = g;
    if (decoupled) p = p * decay;
    else grad = grad + wd * p;
    m = b1 * m + c1 * grad;
    v = b2 * v + c2 * (grad * grad);
    p = p - step * m / (sqrt(v / bc2) + eps);
    """,
    "xpcnn_adam",
)


def _address(a: Any) -> int:
    """Device address of a CuPy array's first element."""
    return a.data.ptr


# Device copies of recent update tables, by content: the parameters and their state keep their
# addresses, and the memory pool tends to hand a step's gradients the same blocks as the last
# step's, so a step usually finds its table here instead of copying one to the device.
_TABLES: dict[tuple[str, bytes], Any] = {}


def _update_table(params: list[Any], grads: list[Any], *slots: list[Any]) -> tuple[Any, int]:
    """The ``table`` of the update kernels on the parameters' device and the total element
    count. Every array must be C-contiguous and of the parameters' dtype."""
    offsets = np.cumsum([0] + [p.size for p in params])
    rows = [[_address(a) for a in arrays] for arrays in zip(params, grads, *slots, strict=True)]
    table = np.concatenate([offsets, np.asarray(rows, np.int64).reshape(-1)]).astype(np.int64)
    key = (str(params[0].device), table.tobytes())
    device_table = _TABLES.get(key)
    if device_table is None:
        if len(_TABLES) >= 16:  # tables of arrays long freed: drop them all
            _TABLES.clear()
        device_table = _TABLES[key] = cupy.asarray(table)
    return device_table, int(offsets[-1])


# a^T @ b with a long inner dimension (a convolution's weight gradient: one row per output
# position of the batch) is cut into blocks of about this many rows, multiplied as one batched
# product and summed: a single product has few output tiles (288 x 32 for a 32-channel 3x3
# layer) and would run its 131,072-long inner loop on a handful of multiprocessors. (Its gain
# was not measured apart from the bias-gradient change that came with it.)
_SPLIT_K_ROWS = 2048
_SPLIT_K_MAX = 128


def _contiguous(*arrays: Any) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


def _in_row_blocks(a: Any, splits: int) -> tuple[Any, Any]:
    """The leading rows of C-contiguous ``a`` as ``splits`` equal blocks (a view of shape
    (splits, rows per block, ...)), and the rows left over."""
    per = a.shape[0] // splits
    used = per * splits
    return a[:used].reshape(splits, per, *a.shape[1:]), a[used:]


CONV_ALGORITHMS = ("direct", "tiled", "direct-forward", "im2col")


class CupyKernels(StandardKernels):
    """One launch per job where the standard versions take several (see the module doc)."""

    fused_updates = True
    pads_in_im2col = True
    bias_in_patches = False  # its im2col kernel fills every column of ``out``

    def __init__(self) -> None:
        super().__init__(compat_cupy)
        # Measured on an H200 (docs/performance.md, 05:18 UTC): the tiled kernels trained
        # float32 1.3x-1.6x faster than the one-element-per-thread direct ones (cifar, batch
        # 128: 44,732 against 30,638 images/s), which in turn beat im2col + cuBLAS; neither
        # keeps any scratch.
        self.set_conv_algorithm("tiled")

    def set_conv_algorithm(self, name: str) -> None:
        """How convolutions run: ``"direct"`` (the kernels above, one element per thread, for
        all three), ``"tiled"`` (the tiled kernels for all three in float32 / float64, the
        direct ones in float16), ``"direct-forward"`` (direct forward and input
        gradient, im2col + cuBLAS kernel gradient) or ``"im2col"`` (im2col + cuBLAS for all)."""
        if name not in CONV_ALGORITHMS:
            raise ValueError(f"unknown convolution algorithm {name!r}; expected one of "
                             f"{', '.join(CONV_ALGORITHMS)}")
        self.direct_conv = name != "im2col"
        self.direct_weight_grad = name in ("direct", "tiled")
        self.tiled_conv = name == "tiled"

    def conv2d(self, x: Any, w2: Any, bias: Any, kernel: tuple[int, int],
               strides: tuple[int, int], pads: tuple[int, int, int, int],
               out_hw: tuple[int, int], relu: bool) -> Any:
        """Convolution of (N, H, W, C) ``x``, zero-padded by ``pads``, with the (kh*kw*C, K)
        kernel matrix ``w2`` (+ bias, then ReLU): the (N*Ho*Wo, K) output rows, one launch."""
        x, w2 = cupy.ascontiguousarray(x), cupy.ascontiguousarray(w2)
        n, h, w, c = x.shape
        k = w2.shape[1]
        rows = n * out_hw[0] * out_hw[1]
        y = cupy.empty((rows, k), x.dtype)
        b = w2 if bias is None else cupy.ascontiguousarray(bias)  # (unread without a bias)
        if self.tiled_conv and x.dtype in (cupy.float32, cupy.float64) and rows:
            i32 = np.int32
            grid = (-(-rows // _TILE_M), -(-k // _TILE_N))
            _tiled_kernel("xpcnn_conv_tiled", _CONV_TILED_SOURCE, x.dtype)(
                grid, (_TILE_THREADS,),
                (x, w2, b, y, i32(bias is not None), i32(relu), np.int64(rows), i32(h), i32(w),
                 i32(c), i32(out_hw[0]), i32(out_hw[1]), i32(k), i32(kernel[1]),
                 i32(w2.shape[0]), i32(strides[0]), i32(strides[1]), i32(pads[0]),
                 i32(pads[2])))
            return y
        _CONV(x, w2, b, bias is not None, relu, h, w, c, out_hw[0], out_hw[1], k, kernel[0],
              kernel[1], strides[0], strides[1], pads[0], pads[2], y)
        return y

    def conv2d_weight_grad(self, x: Any, dy2: Any, kernel: tuple[int, int],
                           strides: tuple[int, int], pads: tuple[int, int, int, int],
                           out_hw: tuple[int, int], with_bias: bool = False
                           ) -> tuple[Any, Any | None]:
        """Kernel gradient (kh*kw*C, K) of :meth:`conv2d` for output gradient rows ``dy2``
        and, ``with_bias``, the bias gradient (else None), accumulated in float32 at least
        (float64 for float64): blocks of rows in parallel, then their sum."""
        x, dy2 = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy2)
        n, h, w, c = x.shape
        rows, k = dy2.shape
        kkc = kernel[0] * kernel[1] * c
        extra = 1 if with_bias else 0
        if self.tiled_conv and x.dtype in (cupy.float32, cupy.float64) and rows:
            tiles = -(-(kkc + extra) // _TILE_M) * -(-k // _TILE_N)
            splits = max(1, min(512 // tiles, rows // 64, 256))  # ~512 blocks in all
            per = -(-rows // splits)
            splits = -(-rows // per)
            parts = cupy.empty((splits, kkc + extra, k), x.dtype)
            i32 = np.int32
            _tiled_kernel("xpcnn_conv_weight_grad_tiled", _CONV_WEIGHT_GRAD_TILED_SOURCE,
                          x.dtype)(
                (-(-(kkc + extra) // _TILE_M), -(-k // _TILE_N), splits), (_TILE_THREADS,),
                (x, dy2, parts, np.int64(rows), np.int64(per), i32(h), i32(w), i32(c),
                 i32(out_hw[0]), i32(out_hw[1]), i32(k), i32(kernel[1]), i32(kkc), i32(extra),
                 i32(strides[0]), i32(strides[1]), i32(pads[0]), i32(pads[2])))
            total = parts.sum(axis=0)
            return (total[:kkc], total[kkc]) if with_bias else (total, None)
        splits = max(1, min(rows // 1024, 256))
        per = -(-rows // splits)
        acc = cupy.float64 if x.dtype == cupy.float64 else cupy.float32
        parts = cupy.empty((splits, kkc + extra, k), acc)
        q = next(q for q in (8, 4, 3, 2, 1) if c % q == 0)  # channels per thread
        _conv_weight_grad_kernel(q)(
            x, dy2, h, w, c, out_hw[0], out_hw[1], k, kernel[1], strides[0], strides[1],
            pads[0], pads[2], kkc // q, extra, rows, per, parts,
            size=splits * (kkc // q + extra) * k)
        total = parts.sum(axis=0)
        return (total[:kkc], total[kkc]) if with_bias else (total, None)

    def matmul_into(self, a: Any, b: Any, out: Any, bias: Any = None,
                    relu: bool = False) -> None:
        if not out.flags.c_contiguous:
            super().matmul_into(a, b, out, bias, relu)
            return
        cupy.matmul(a, b, out=out)
        self.bias_relu(out, bias, relu)

    def matmul_tn(self, a: Any, b: Any) -> Any:
        rows, m = a.shape
        n = b.shape[1]
        splits = min(rows // _SPLIT_K_ROWS, _SPLIT_K_MAX, max(1, (1 << 22) // (m * n)))
        if splits < 2 or not _contiguous(a, b):
            return super().matmul_tn(a, b)
        (a3, a_rest), (b3, b_rest) = _in_row_blocks(a, splits), _in_row_blocks(b, splits)
        parts = cupy.matmul(a3.transpose(0, 2, 1), b3)
        acc = cupy.float64 if parts.dtype == cupy.float64 else cupy.float32
        out = parts.sum(axis=0, dtype=acc)
        if a_rest.shape[0]:
            out += cupy.matmul(a_rest.T, b_rest).astype(acc, copy=False)
        return out.astype(parts.dtype, copy=False)

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
        # Over blocks of rows first: a reduction over the leading axis runs one thread block
        # per column, only 32-64 of them for a bias gradient (measured: 12 ms at batch 512).
        rows = a.shape[0]
        splits = min(rows // 256, 256)
        if a.ndim != 2 or splits < 2 or not a.flags.c_contiguous:
            return super().sum_rows(a)
        acc = cupy.float64 if a.dtype == cupy.float64 else cupy.float32
        blocks, rest = _in_row_blocks(a, splits)
        out = blocks.sum(axis=1, dtype=acc).sum(axis=0)
        if rest.shape[0]:
            out += rest.sum(axis=0, dtype=acc)
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

    def max_pool_backward(self, x: Any, y: Any, dy: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], out_hw: tuple[int, int],
                          relu_grad: bool = False) -> Any:
        (kh, kw), (sh, sw) = kernel, strides
        if sh < kh or sw < kw or not _contiguous(x, y, dy):
            return super().max_pool_backward(x, y, dy, kernel, strides, out_hw, relu_grad)
        if relu_grad:
            dy = self.relu_backward(dy, y)
        n, h, w, c = x.shape
        covered = sh == kh and sw == kw and h == out_hw[0] * sh and w == out_hw[1] * sw
        # positions outside every window keep a zero gradient
        dx = cupy.empty(x.shape, dy.dtype) if covered else cupy.zeros(x.shape, dy.dtype)
        _MAX_POOL_BACKWARD(y, dy, x, h, w, c, out_hw[0], out_hw[1], kh, kw, sh, sw, dx)
        return dx

    def mask_multiply(self, x: Any, mask: Any) -> Any:
        return _MASK_MULTIPLY(x, mask)

    def relu(self, x: Any, max_value: float | None) -> Any:
        return _RELU(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_with_mask(self, x: Any, max_value: float | None) -> tuple[Any, Any]:
        return _RELU_WITH_MASK(x, x.dtype.type(max_value or 0), max_value is not None)

    def relu_backward(self, dy: Any, y: Any) -> Any:
        return _RELU_BACKWARD(dy, y)

    def softmax_cross_entropy(self, z: Any, labels: Any, smoothing: float) -> tuple[Any, Any]:
        n, classes = z.shape
        if not _contiguous(z, labels) or n == 0:
            return super().softmax_cross_entropy(z, labels, smoothing)
        acc = cupy.float64 if z.dtype == cupy.float64 else cupy.float32
        grad = cupy.empty(z.shape, z.dtype)
        rows = cupy.empty((n, 2), acc)  # per row: loss / N, 1 if predicted right
        _SOFTMAX_CROSS_ENTROPY(z, labels, classes, 1.0 - smoothing, smoothing / classes,
                               1.0 / n, grad, rows, size=n)
        return rows.sum(axis=0), grad

    # -- optimiser updates (used when ``fused_updates``; see xpcnn.optim) -------------------
    @staticmethod
    def _by_dtype(params: list[Any], grads: list[Any], *slots: list[Any] | None
                  ) -> list[tuple[Any, ...]]:
        """(params, grads, *slots) lists per parameter dtype, gradients cast to it and every
        array made C-contiguous (parameters and state arrays always are: they are updated in
        place)."""
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        for i, p in enumerate(params):
            g = cupy.ascontiguousarray(grads[i].astype(p.dtype, copy=False))
            groups.setdefault(p.dtype, []).append((p, g, *(s[i] for s in slots if s is not None)))
        return [tuple(list(column) for column in zip(*rows, strict=True))
                for rows in groups.values()]

    def sgd_update(self, params: list[Any], grads: list[Any], bufs: list[Any] | None,
                   lr: float, weight_decay: float, momentum: float, nesterov: bool) -> None:
        for p, g, *b in self._by_dtype(params, grads, bufs):
            table, size = _update_table(p, g, *b)
            t = p[0].dtype.type
            _SGD(p[0], len(p), len(b), t(lr), t(weight_decay), t(momentum), nesterov, table,
                 size=size)

    def adam_update(self, params: list[Any], grads: list[Any], ms: list[Any], vs: list[Any],
                    lr: float, weight_decay: float, decoupled: bool, beta_1: float,
                    beta_2: float, epsilon: float, step: int) -> None:
        # scalars rounded from float64 to the parameters' dtype, as Python floats are in the
        # standard version
        for p, g, m, v in self._by_dtype(params, grads, ms, vs):
            table, size = _update_table(p, g, m, v)
            t = p[0].dtype.type
            _ADAM(p[0], len(p), 2, t(weight_decay), decoupled, t(1.0 - lr * weight_decay),
                  t(beta_1), t(1.0 - beta_1), t(beta_2), t(1.0 - beta_2),
                  t(lr / (1.0 - beta_1**step)), t(1.0 - beta_2**step), t(epsilon), table,
                  size=size)


KERNELS = CupyKernels()
