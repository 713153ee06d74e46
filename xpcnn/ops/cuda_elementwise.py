"""The one-pass CUDA kernels behind :mod:`xpcnn.ops.fast_cupy` (``cupy.ElementwiseKernel``
objects, built at import): im2col, pooling, the ReLU family and its masks, bias, rescale and
normalize. Each does in one launch what the standard version does in several CuPy calls,
reading and writing each element once. ``ACC`` (the accumulator type) is here, the lowest of
the kernel modules, for the others to share.

In elementwise bodies ``i`` is the element's C-order index, and a ``raw`` array indexed by one
integer is read at that C-order index; ``n`` and ``i`` are CuPy's own names (in every kernel
module).
"""

from __future__ import annotations

import cupy

# The patches of convolutions as im2col + cuBLAS (the hand-written ones' algorithms
# "im2col" and "direct-forward"): out[n, oh, ow, (i*kw + j)*C + c] = x[n, oh*sh + i - top,
# ow*sw + j - left, c] for a C-contiguous x, 0 outside it: the zero padding is read, never
# stored.
IM2COL = cupy.ElementwiseKernel(
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
ACC = """
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

# Input element i (C-order over (N, H, W, C)) of a pool's gradient kernel: its image, channel,
# position in the padded input, and the (Ho, Wo) windows that cover it, along each axis from
# the first whose last element reaches it to the last that starts at or before it (none where
# first > last: a stride wider than the window). Positions are >= 0, so C's division is floor's.
COVERING = """
__device__ int xpcnn_first_window(int p, int k, int s) { return p < k ? 0 : (p - k) / s + 1; }
__device__ int xpcnn_last_window(int p, int s, int n) { return p / s < n - 1 ? p / s : n - 1; }
struct XpcnnCover { long long img; int c, hp, wp, oh_first, oh_last, ow_first, ow_last; };
__device__ XpcnnCover xpcnn_cover(long long r, int H, int W, int C, int Ho, int Wo, int kh,
                                  int kw, int sh, int sw, int top, int left) {
    XpcnnCover v;
    v.c = r % C; r /= C;
    const int w = r % W; r /= W;
    v.hp = r % H + top;
    v.wp = w + left;
    v.img = r / H;
    v.oh_first = xpcnn_first_window(v.hp, kh, sh);
    v.oh_last = xpcnn_last_window(v.hp, sh, Ho);
    v.ow_first = xpcnn_first_window(v.wp, kw, sw);
    v.ow_last = xpcnn_last_window(v.wp, sw, Wo);
    return v;
}
"""

# Maximum of each window of x (N, H, W, C) read as if padded by ``top`` rows and ``left``
# columns of ``lowest`` (-inf; no padded copy), NaN propagating as xp.maximum does; the
# window's first element starts the maximum as it is read (each element read once:
# tests/kernel_trace.py counted a second read of it, 1.2x the loads).
MAX_POOL = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw, int32 sh,"
    " int32 sw, int32 top, int32 left, T lowest",
    "T y",
    """
    long long r = i;
    const int c = r % C; r /= C;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const long long img = r / Ho;
    T best;
    for (int a = 0; a < kh; ++a) {
        const int hh = oh * sh + a - top;
        for (int b = 0; b < kw; ++b) {
            const int ww = ow * sw + b - left;
            const T v = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                ? x[((img * H + hh) * W + ww) * C + c] : lowest;
            if ((a == 0 && b == 0) || v > best || v != v) best = v;
        }
    }
    y = best;
    """,
    "xpcnn_max_pool",
)

# The mean of each image's channel over its H x W positions (``hw``), a thread an output
# element, its sum in the accumulator type in row-major order (a warp's threads read
# consecutive channels of one position), divided and rounded to T once.
GLOBAL_AVG_POOL = cupy.ElementwiseKernel(
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
    preamble=ACC,
)

# Its gradient written whole, (N, H, W, C) C-contiguous from the (N, C) ``g``: each position's
# share g / hw, divided in the accumulator type and rounded to G once (as the standard
# version divides), one write an element (a broadcast view would push the layer before onto
# its standard path: its kernels read C-contiguous gradients).
GLOBAL_AVG_POOL_BACKWARD = cupy.ElementwiseKernel(
    "raw G g, int64 hw, int32 C",
    "G dx",
    """
    typedef XpcnnAcc<G>::type A;
    dx = (G)((A)g[(i / (hw * C)) * C + i % C] / (A)hw);
    """,
    "xpcnn_global_avg_pool_backward",
    preamble=ACC,
)

# Windows that tile an unpadded input (strides == kernel): each output element owns its window,
# so one thread writes every input position of it: the gradient at the first x == y in row-major
# order, 0 at the others. With ``relu``, the gradient is first multiplied by (y > 0), as
# RELU_BACKWARD does it (the gradient of a ReLU before the pool, in the same launch). The
# window's maximum is read once into ``top``: read through ``yv`` it was read again after
# every store to dx (which may alias it, for the compiler).
MAX_POOL_BACKWARD = cupy.ElementwiseKernel(
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

# The gradient of MAX_POOL in every other case (overlapping windows, padding, inputs that the
# windows do not cover), a thread an input element (dx is written whole, no zero fill, no
# atomics): the sum, in the accumulator type, of the gradients of the at most
# ceil(kh/sh) * ceil(kw/sw) windows that cover it and whose first maximum (row-major, the
# padding read as ``lowest``, as MAX_POOL reads it) it is; those windows taken last to first,
# the order in which the standard version adds its taps' shares. A window whose maximum is
# not this element's value is passed over after one comparison; one whose maximum it is
# looks for an equal value before it. With ``relu``, as MAX_POOL_BACKWARD.
MAX_POOL_GATHER_BACKWARD = cupy.ElementwiseKernel(
    "raw T yv, raw G g, raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh,"
    " int32 kw, int32 sh, int32 sw, int32 top, int32 left, T lowest, bool relu",
    "G dx",
    """
    typedef XpcnnAcc<G>::type A;
    const XpcnnCover v = xpcnn_cover(i, H, W, C, Ho, Wo, kh, kw, sh, sw, top, left);
    const long long img = v.img;
    const int c = v.c, hp = v.hp, wp = v.wp;  // (hp, wp: in the padded input)
    const T mine = x[i];
    A total = (A)0;
    for (int oh = v.oh_last; oh >= v.oh_first; --oh) {
        for (int ow = v.ow_last; ow >= v.ow_first; --ow) {
            const long long o = ((img * Ho + oh) * Wo + ow) * C + c;
            const T best = yv[o];
            if (!(mine == best)) continue;
            const int a_at = hp - oh * sh, b_at = wp - ow * sw;
            bool first = true;
            for (int a = 0; a <= a_at && first; ++a) {
                const int hh = oh * sh + a - top;
                const int b_end = a < a_at ? kw : b_at;
                for (int b = 0; b < b_end; ++b) {
                    const int ww = ow * sw + b - left;
                    const T v = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                        ? x[((img * H + hh) * W + ww) * C + c] : lowest;
                    if (v == best) { first = false; break; }
                }
            }
            if (first) {
                const G gv = relu ? (G)(g[o] * (G)(best > (T)0.0f ? 1.0f : 0.0f)) : g[o];
                total += (A)gv;
            }
        }
    }
    dx = (G)total;
    """,
    "xpcnn_max_pool_gather_backward",
    preamble=ACC + COVERING,
)

# y + bias (then ReLU) in place on the (rows, K) output of a matmul.
BIAS_RELU = cupy.ElementwiseKernel(
    "raw T b, int32 K, bool relu",
    "T y",
    """
    T v = y + b[i % K];
    y = (relu && v < (T)0.0f) ? (T)0.0f : v;
    """,
    "xpcnn_bias_relu",
)

RELU = cupy.ElementwiseKernel(
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
RELU_WITH_MASK = cupy.ElementwiseKernel(
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

# a + b, then max(., 0) as RELU takes it (an Add layer with the ReLU after it fused); and its
# gradient: the sum of the gradients of its output (a tensor read twice) where y > 0.
ADD_RELU = cupy.ElementwiseKernel(
    "T a, T b", "T y", "T v = a + b; y = v < (T)0.0f ? (T)0.0f : v;", "xpcnn_add_relu"
)
ADD_RELU_BACKWARD = cupy.ElementwiseKernel(
    "T a, T b, T y", "T dx", "T s = a + b; dx = s * (T)(y > (T)0.0f ? 1.0f : 0.0f);",
    "xpcnn_add_relu_backward"
)

# dy * (y > 0) and dy * mask, as products (NaN * 0 is NaN, as in the standard versions).
RELU_BACKWARD = cupy.ElementwiseKernel(
    "T dy, Y y", "T dx", "dx = dy * (T)(y > (Y)0.0f ? 1.0f : 0.0f);", "xpcnn_relu_backward"
)
MASK_MULTIPLY = cupy.ElementwiseKernel(
    "T x, bool m, T scale", "T y", "y = x * (T)(m ? 1.0f : 0.0f) * scale;",
    "xpcnn_mask_multiply"
)
# The same, then the gradient of a ReLU whose output was r (a dropout after a ReLU, backward).
MASK_MULTIPLY_RELU = cupy.ElementwiseKernel(
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
RESCALE = cupy.ElementwiseKernel(
    "S x, raw T dtype_of, T scale, T offset, bool shift", "U y",
    "const T p = xpcnn_mul_rn<T>((T)x, scale); y = (U)(shift ? (T)(p + offset) : p);",
    "xpcnn_rescale", preamble=_ROUNDED_PRODUCT)

# StandardKernels.normalize in one launch: the cast, the difference with the channel's shift
# and its product with the channel's scale rounded once to T (as the standard version's), the
# result rounded to U.
NORMALIZE = cupy.ElementwiseKernel(
    "S x, raw T shift, raw T scale, int32 C", "U y",
    "const T d = (T)x - shift[i % C]; y = (U)xpcnn_mul_rn<T>(d, scale[i % C]);",
    "xpcnn_normalize", preamble=_ROUNDED_PRODUCT)


# The mean of each window of x (N, H, W, C) over its real (unpadded) inputs: the window read as
# if padded by ``top`` rows and ``left`` columns of zeros (no padded copy), summed in the
# accumulator type from its first element in row-major order (the standard version's order,
# zeros included), times the window's 1 / count (``inv``, (Ho, Wo) values, AvgPool2D's),
# rounded to T once.
AVG_POOL = cupy.ElementwiseKernel(
    "raw T x, raw I inv, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw,"
    " int32 sh, int32 sw, int32 top, int32 left",
    "T y",
    """
    typedef XpcnnAcc<T>::type A;
    long long r = i;
    const int c = r % C; r /= C;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const long long img = r / Ho;
    A s = (A)0;
    for (int a = 0; a < kh; ++a) {
        const int hh = oh * sh + a - top;
        for (int b = 0; b < kw; ++b) {
            const int ww = ow * sw + b - left;
            const A v = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                ? (A)x[((img * H + hh) * W + ww) * C + c] : (A)0;
            s = (a == 0 && b == 0) ? v : s + v;
        }
    }
    y = (T)(s * (A)inv[oh * Wo + ow]);
    """,
    "xpcnn_avg_pool",
    preamble=ACC,
)

# Its gradient, a thread an input element (no zero fill, no atomics): the sum over the at most
# ceil(kh/sh) * ceil(kw/sw) windows that cover it of g * inv (each product rounded on its
# own, never fused with the sum), in the accumulator type, windows last to first (the order
# in which the standard version adds its taps' shares), rounded to G once.
AVG_POOL_BACKWARD = cupy.ElementwiseKernel(
    "raw G g, raw I inv, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw,"
    " int32 sh, int32 sw, int32 top, int32 left",
    "G dx",
    """
    typedef XpcnnAcc<G>::type A;
    const XpcnnCover v = xpcnn_cover(i, H, W, C, Ho, Wo, kh, kw, sh, sw, top, left);
    const long long img = v.img;
    const int c = v.c;
    A total = (A)0;
    for (int oh = v.oh_last; oh >= v.oh_first; --oh) {
        for (int ow = v.ow_last; ow >= v.ow_first; --ow) {
            total += xpcnn_mul_rn<A>((A)g[((img * Ho + oh) * Wo + ow) * C + c],
                                     (A)inv[oh * Wo + ow]);
        }
    }
    dx = (G)total;
    """,
    "xpcnn_avg_pool_backward",
    preamble=ACC + _ROUNDED_PRODUCT + COVERING,
)

# The top-k metrics' counts in one launch (a raw kernel, xpcnn.ops.fast_cupy): a warp a row,
# 8 a block, as many blocks as that takes (the whole GPU at an evaluate batch), its lanes on
# consecutive classes (coalesced reads). The warp finds its row's target (the label, or a
# one-hot row's first largest entry, NaN first as argmax takes it: each lane's, then a shuffle
# tree that keeps the same one in every lane), counts the scores strictly greater than the
# target's (NaN is greater than none; a shuffle sum) and, where the label names a class and
# the target is finite, counts 1 for each k the count is below. A block's counts go to
# ``partials``; the last block (LAST_BLOCK, cuda_reductions) sums them per k: integers, the
# same at every run whatever the order. The same counts as xpcnn.ops.softmax.top_k_counts.
# Z: the logits, L: integer labels, Y: one-hot rows (the one not read typed as the logits or
# int32), A: float (double for float64 logits), S: the counts' dtype. The k's (at most
# TOP_K_MAX) come as arguments, each already at most the classes.
TOP_K_THREADS = 256
TOP_K_ROWS = TOP_K_THREADS // 32  # (a row a warp)
TOP_K_MAX = 8
TOP_K_COUNTS_SOURCE = (f"#define THREADS {TOP_K_THREADS}\n#define KS {TOP_K_MAX}\n") + r"""
#define WARPS (THREADS / 32)
#define ALL 0xffffffffu
// whether score v at place c goes before score best at place at (argmax's order: the first
// NaN, else the first largest; place ``none``: no score yet)
__device__ bool xpcnn_before(A v, int c, A best, int at, int none) {
    if (c == none || at == none) return at == none && c != none;
    if ((v != v) != (best != best)) return v != v;
    return (v != v || v == best) ? c < at : v > best;
}
extern "C" __global__ void xpcnn_top_k_counts(
        const Z* __restrict__ z, const L* __restrict__ labels, const Y* __restrict__ rows,
        int one_hot, long long n, int classes, int nk, int k0, int k1, int k2, int k3, int k4,
        int k5, int k6, int k7, int* partials, unsigned int* counter, S* __restrict__ out) {
    __shared__ int counts[KS][WARPS];
    __shared__ long long totals[KS][WARPS];
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int ks[KS] = {k0, k1, k2, k3, k4, k5, k6, k7};
    const long long i = blockIdx.x * (long long)WARPS + warp;  // (the warp's row)
    const bool live = i < n;  // (a warp past the last row still shuffles: uniform code)
    long long label = -1;
    if (one_hot) {  // (the same for every thread of the launch)
        const Y* r = rows + (live ? i : 0) * classes;
        A best = (A)0;
        int at = classes;  // (none)
        for (int c = lane; live && c < classes; c += 32) {
            const A v = (A)xpcnn_widen(r[c]);
            if (xpcnn_before(v, c, best, at, classes)) { best = v; at = c; }
        }
        for (int d = 16; d > 0; d /= 2) {
            const A v = __shfl_xor_sync(ALL, best, d);
            const int c = __shfl_xor_sync(ALL, at, d);
            if (xpcnn_before(v, c, best, at, classes)) { best = v; at = c; }
        }
        label = at;
    } else if (live) {
        label = (long long)labels[i];
    }
    const bool named = live && label >= 0 && label < classes;
    const Z* row = z + (named ? i : 0) * classes;
    const A target = named ? (A)xpcnn_widen(row[label]) : (A)0;
    const bool counted = named && target - target == (A)0;  // (infinite or NaN: never)
    int greater = 0;
    for (int c = lane; counted && c < classes; c += 32)
        greater += (A)xpcnn_widen(row[c]) > target ? 1 : 0;
    for (int d = 16; d > 0; d /= 2) greater += __shfl_xor_sync(ALL, greater, d);
    if (lane == 0)
        for (int j = 0; j < KS; ++j) counts[j][warp] = counted && j < nk && greater < ks[j];
    __syncthreads();
    if (t < KS) {
        int c = 0;
        for (int w = 0; w < WARPS; ++w) c += counts[t][w];
        partials[blockIdx.x * (long long)KS + t] = c;
    }
    if (!xpcnn_last_block(counter, gridDim.x)) return;
    const volatile int* done = partials;
    for (int j = 0; j < KS; ++j) {
        long long c = 0;
        for (long long b = t; j < nk && b < gridDim.x; b += THREADS) c += done[b * KS + j];
        for (int d = 16; d > 0; d /= 2) c += __shfl_xor_sync(ALL, c, d);
        if (lane == 0) totals[j][warp] = c;
    }
    __syncthreads();
    if (t < nk) {
        long long c = 0;
        for (int w = 0; w < WARPS; ++w) c += totals[t][w];
        out[t] = (S)c;
    }
}
"""
