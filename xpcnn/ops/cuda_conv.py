"""xpcnn's hand-written CUDA convolution kernels: the CuPy kernels' engine where cuDNN does not
load or has no plan for a case (see :mod:`xpcnn.ops.cudnn_conv`), reached from
:mod:`xpcnn.ops.fast_cupy` (``CupyKernels.conv_engine``) alone.

Convolutions run as tiled implicit-GEMM kernels in shared memory (float16 on the tensor cores,
float32 / float64 on the CUDA cores or, with ``CUPY_TF32=1``, float32 on the tensor cores in
TF32), with no im2col scratch; direct kernels with one output element per thread run what the
tiled ones cannot (float16 without tensor cores) and the algorithm ``"direct"``; a direct
gather (one input element per thread) runs the input gradient of strided and over-padded
convolutions. The switches between them are :class:`ConvKernels`'s. ``tests/test_gpu.py``
checks them against the standard versions on the GPU in float16, float32 and TF32, and
``tests/test_cuda_kernels_on_cpu.py`` compiles the same source for the CPU and checks it on
every machine in float32 and float64 (the tensor-core instructions have no CPU twin).

Without this module (delete it, and the lines of ``fast_cupy`` that name it), the CuPy kernels'
convolutions run as im2col + cuBLAS: the :class:`~xpcnn.ops.convolution.KernelsConv` loops.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import cupy
import numpy as np

from ..errors import warn
from . import im2col
from .convolution import ConvEngine, KernelsConv
from .cuda_elementwise import ACC, COVERING  # (float32 accumulators for float16; windows)

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
    preamble=ACC,
)

# Input gradient for any strides and padding, one input element per thread (a transposed
# convolution, gathered): dx[n, h, w, c] = sum over the taps (a, b) whose window holds (h, w),
# h + top - a = oh*sh with 0 <= oh < Ho (likewise across), and over the filters k, of
# dy[n, oh, ow, k] * w[k, a, b, c]. The (K, kh, kw, C) kernel is read in place (no rotated
# copy), taps of another stride phase are never visited, and nothing is scattered: no atomics,
# no zero fill, no scratch. Threads of a warp share (n, h, w) and read consecutive c: the dy
# value is one broadcast load, the w row a coalesced one.
_CONV_INPUT_GRAD = cupy.ElementwiseKernel(
    "raw T dy, raw T w, int32 Ho, int32 Wo, int32 K, int32 H, int32 W, int32 C, int32 kh,"
    " int32 kw, int32 sh, int32 sw, int32 top, int32 left",
    "T dx",
    """
    typedef XpcnnAcc<T>::type A;
    const XpcnnCover v = xpcnn_cover(i, H, W, C, Ho, Wo, kh, kw, sh, sw, top, left);
    const long long tap_step = (long long)kh * kw * C;  // from filter k to k + 1
    A acc = (A)0;
    // the windows that hold the element, last to first: its taps a = hp - oh*sh ascending
    for (int oh = v.oh_last; oh >= v.oh_first; --oh) {
        const int a = v.hp - oh * sh;
        for (int ow = v.ow_last; ow >= v.ow_first; --ow) {
            const int b = v.wp - ow * sw;
            const long long go = ((v.img * Ho + oh) * Wo + ow) * K;
            const long long wo = (long long)(a * kw + b) * C + v.c;
            for (int k = 0; k < K; ++k) acc += (A)dy[go + k] * (A)w[wo + k * tap_step];
        }
    }
    dx = (T)acc;
    """,
    "xpcnn_conv_input_grad",
    preamble=ACC + COVERING,
)

# Tiled direct convolution (implicit GEMM): the (M = N*Ho*Wo, K) output as the product of
# the patch matrix (M, KK = kh*kw*C), gathered on the fly and never stored, and the kernel
# matrix (KK, K). A block of 128 threads owns a 128 x 32 output tile and walks KK in slices of
# 16: it gathers the slice's patch values and kernel rows into shared memory once, then
# multiplies them there: on the CUDA cores each thread accumulates an 8 x 4 tile (12 shared
# loads for 32 products, where the one-element-per-thread kernel above makes two global loads
# per product); on the tensor cores (float16 always, float32 with TF32 on) each warp a 32 x 32
# one. Each thread loads its share of the next slice into registers before the product of this
# one starts, so that the loads' latency is hidden behind it: that made the kernels 1.6x-3.2x
# faster (float16 forward 0.51 -> 0.27 ms, kernel gradient 1.55 -> 0.48 ms at batch 512 of
# cifar's 32x32x32 -> 32 layer; H200, 2026-11-26), since they had waited on those loads (ncu:
# 25-30% occupancy, 15 cycles per issued instruction in the kernel gradient). Where each
# gathered value lives comes from offsets per output row (tables in shared memory) and per
# kernel-matrix row (in the registers of the thread that gathers it): computing it with
# integer divisions per value made the first version 1.4x slower.
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
// Where kernel-matrix row kk reads a window: its offsets in the window (th, tw), and in x from
// the window's start (tat); past KK, -2^29, which puts every read outside x.
__device__ __forceinline__ void xpcnn_tap(const int kk, const int KK, const int C,
                                          const int kw, const int W, int& th, int& tw,
                                          long long& tat) {
    th = -(1 << 29);
    tw = 0;
    tat = 0;
    if (kk < KK) {
        const int tap = kk / C;
        th = tap / kw;
        tw = tap % kw;
        tat = ((long long)th * W + tw) * C + kk % C;
    }
}
"""
# The tile product on the CUDA cores (float32 / float64): acc[i][j] += As[t][tm*TM + i] *
# Bs[t][tn*TN + j] over the slice's BK rows, in registers; thread (tm, tn) owns its result.
_FMA_PRODUCT = """#define APAD 1
#define BPAD 1
#define XPCNN_TILE_INIT \
    ACC acc[TM][TN]; \
    for (int i = 0; i < TM; ++i) \
        for (int j = 0; j < TN; ++j) acc[i][j] = (ACC)0;
#define XPCNN_TILE_PRODUCT \
    for (int t = 0; t < BK; ++t) { \
        ACC a[TM]; \
        ACC b[TN]; \
        for (int i = 0; i < TM; ++i) a[i] = (ACC)As[t][tm * TM + i]; \
        for (int j = 0; j < TN; ++j) b[j] = (ACC)Bs[t][tn * TN + j]; \
        for (int i = 0; i < TM; ++i) \
            for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j]; \
    }
#define XPCNN_TILE_FINISH
#define XPCNN_RESULT(i, j) acc[i][j]
"""
# The same tile product on the tensor cores (float16, or float32 rounded to TF32, with float32
# accumulators): each of the block's four warps owns 32 rows x BN columns of the tile as
# 2 x (BN/16) fragments of 16 x 16. As is the tile's (BM x BK) left factor stored column by
# column, Bs its (BK x BN) right one row by row, as the CUDA-core version has them; at the end
# the fragments go through shared memory so that thread (tm, tn) finds its result where the
# CUDA-core version has it, and both kernels keep one epilogue. The warp-wide instructions are
# PTX's wmma, written inline: CUDA's C++ wrapper for them (mma.h) is missing from the CUDA
# headers that pip installs beside CuPy.
_WMMA_PRODUCT = """#define APAD 8
#define BPAD 8
#define WROWS (BM / (NT / 32))
#define XPCNN_TILE_INIT \
    float acc[WROWS / 16][BN / 16][8]; \
    for (int i = 0; i < WROWS / 16; ++i) \
        for (int j = 0; j < BN / 16; ++j) \
            for (int e = 0; e < 8; ++e) acc[i][j][e] = 0.0f;
#define XPCNN_TILE_PRODUCT \
    for (int kt = 0; kt < BK; kt += WK) { \
        for (int i = 0; i < WROWS / 16; ++i) { \
            unsigned a[FRAG]; \
            xpcnn_load_a(a, &As[kt][tid / 32 * WROWS + i * 16], BM + APAD); \
            for (int j = 0; j < BN / 16; ++j) { \
                unsigned b[FRAG]; \
                xpcnn_load_b(b, &Bs[kt][j * 16], BN + BPAD); \
                xpcnn_mma(acc[i][j], a, b); \
            } \
        } \
    }
#define XPCNN_TILE_FINISH \
    __shared__ __align__(32) float Cs[BM][BN + 4]; \
    for (int i = 0; i < WROWS / 16; ++i) \
        for (int j = 0; j < BN / 16; ++j) \
            xpcnn_store(&Cs[tid / 32 * WROWS + i * 16][j * 16], acc[i][j], BN + 4); \
    __syncthreads();
#define XPCNN_RESULT(i, j) Cs[tm * TM + i][tn * TN + j]
"""


def _wmma(shape: str, depth: int, kind: str, regs: int, mma_types: str,
          round_tf32: bool) -> str:
    """The four warp-wide steps of one wmma flavour (16 x 16 x ``depth``) as device
    functions: load a column-major A fragment and a row-major B one (``regs`` 32-bit registers
    each; TF32 values rounded to nearest from float32), multiply-add into eight float32
    accumulators, store them."""
    def operands(first: int, n: int) -> str:
        return "{" + ",".join(f"%{k}" for k in range(first, first + n)) + "}"

    outs = ", ".join(f'"=r"(f[{k}])' for k in range(regs))
    rounding = ("    for (int k = 0; k < FRAG; ++k)\n"
                '        asm("cvt.rna.tf32.f32 %0, %1;"'
                ' : "=r"(f[k]) : "f"(__uint_as_float(f[k])));\n' if round_tf32 else "")
    load = "".join(f"""
__device__ __forceinline__ void xpcnn_load_{m}(unsigned* f, const void* p, int ldm) {{
    asm volatile("wmma.load.{m}.sync.aligned.{layout}.{shape}.{kind} {operands(0, regs)}, "
                 "[%{regs}], %{regs + 1};" : {outs} : "l"(p), "r"(ldm) : "memory");
{rounding}}}""" for m, layout in (("a", "col"), ("b", "row")))
    d = ", ".join(f'"+f"(d[{k}])' for k in range(8))
    ab = ", ".join([f'"r"(a[{k}])' for k in range(regs)] + [f'"r"(b[{k}])' for k in range(regs)])
    dv = ", ".join(f'"f"(d[{k}])' for k in range(8))
    return f"""#define WK {depth}
#define FRAG {regs}{load}
__device__ __forceinline__ void xpcnn_mma(float* d, const unsigned* a, const unsigned* b) {{
    asm volatile("wmma.mma.sync.aligned.col.row.{shape}.{mma_types} {operands(0, 8)}, "
                 "{operands(8, regs)}, {operands(8 + regs, regs)}, {operands(0, 8)};"
                 : {d} : {ab});
}}
__device__ __forceinline__ void xpcnn_store(float* p, const float* d, int ldm) {{
    asm volatile("wmma.store.d.sync.aligned.row.{shape}.f32 [%0], {operands(1, 8)}, %9;"
                 :: "l"(p), {dv}, "r"(ldm) : "memory");
}}
"""


_WMMA_FLOAT16 = "#include <cuda_fp16.h>\n" + _wmma("m16n16k16", 16, "f16", 8, "f32.f32", False)
_WMMA_TF32 = _wmma("m16n16k8", 8, "tf32", 4, "f32.tf32.tf32.f32", True)
_CONV_TILED_SOURCE = r"""
extern "C" __global__ void xpcnn_conv_tiled(
        const TYPE* x, const TYPE* w, const TYPE* bias, TYPE* y, const int has_bias,
        const int relu, const long long M, const int H, const int W, const int C,
        const int Ho, const int Wo, const int K, const int kw, const int KK, const int sh,
        const int sw, const int top, const int left, const int by_filter,
        const long long w_base, const long long w_tap, const long long w_c) {
    __shared__ __align__(32) TYPE As[BK][BM + APAD];  // patch values, As[t][r]
    __shared__ __align__(32) TYPE Bs[BK][BN + BPAD];  // kernel-matrix rows
    __shared__ long long row_at[BM]; // where the row's window starts in x (may lie outside)
    __shared__ int row_h[BM];        // the row's top-left input position; -2^29 past M
    __shared__ int row_w[BM];
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
    XPCNN_TILE_INIT
    // Thread tid gathers kernel-matrix row gt of each slice for the tile rows tid / BK + e *
    // (NT / BK), and BE kernel-matrix values, into registers: the next slice's loads are in
    // flight while the product of this one runs. The kernel matrix's value (kk, n), kk = tap *
    // C + c, is read where it lies, in one of two layouts, each with the fill that keeps a
    // warp's loads on consecutive addresses. by_filter: the layer's (K, kh, kw, C) kernel,
    // w[n * KK + kk], contiguous along kk: the thread reads row gt of columns tid / BK + e *
    // (NT / BK), half a warp 16 consecutive kk of one filter (BPAD keeps the stores to Bs off
    // one bank). Else w[w_base + tap * w_tap + c * w_c + n], contiguous along n (a row-major
    // (KK, K) matrix; the rotated kernel of a stride-1 input gradient): the thread reads
    // column tid % BN, a warp 32 consecutive n, of BE consecutive rows from (tid / BN) * BE,
    // their (tap, c) stepped on from one division.
    static_assert(NT % BK == 0 && NT % BN == 0, "whole rows of the slice per pass");
    const int gt = tid % BK;
    constexpr int BE = BK * BN / NT;
    TYPE pa[BM * BK / NT];
    TYPE pb[BE];
    auto fetch = [&](const int k0) {
        int th, tw;
        long long tat;
        xpcnn_tap(k0 + gt, KK, C, kw, W, th, tw, tat);
        for (int e = 0; e < BM * BK / NT; ++e) {
            const int r = tid / BK + e * (NT / BK);
            const int hh = row_h[r] + th;
            const int ww = row_w[r] + tw;
            pa[e] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? x[row_at[r] + tat] : (TYPE)0;
        }
        if (by_filter) {
            const int kr = k0 + gt;
            for (int e = 0; e < BE; ++e) {
                const int n = n0 + tid / BK + e * (NT / BK);
                pb[e] = (kr < KK && n < K) ? w[(long long)n * KK + kr] : (TYPE)0;
            }
        } else {
            const int n = n0 + tid % BN;
            int kr = k0 + tid / BN * BE;
            int tap = kr / C;
            int c = kr - tap * C;
            for (int e = 0; e < BE; ++e) {
                pb[e] = (kr < KK && n < K) ? w[w_base + tap * w_tap + c * w_c + n] : (TYPE)0;
                ++kr;
                if (++c == C) {
                    c = 0;
                    ++tap;
                }
            }
        }
    };
    __syncthreads();  // the row tables
    fetch(0);
    for (int k0 = 0; k0 < KK; k0 += BK) {
        for (int e = 0; e < BM * BK / NT; ++e) As[gt][tid / BK + e * (NT / BK)] = pa[e];
        for (int e = 0; e < BE; ++e) {
            if (by_filter)
                Bs[gt][tid / BK + e * (NT / BK)] = pb[e];
            else
                Bs[tid / BN * BE + e][tid % BN] = pb[e];
        }
        __syncthreads();
        if (k0 + BK < KK) fetch(k0 + BK);
        XPCNN_TILE_PRODUCT
        __syncthreads();
    }
    XPCNN_TILE_FINISH
    for (int i = 0; i < TM; ++i) {
        const long long m = m0 + tm * TM + i;
        if (m >= M) continue;
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn * TN + j;
            if (n >= K) continue;
            ACC v = XPCNN_RESULT(i, j);
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
        const TYPE* x, const TYPE* dy, PART* part, const long long M, const long long per,
        const int H, const int W, const int C, const int Ho, const int Wo, const int K,
        const int kw, const int KK, const int extra, const int sh, const int sw, const int top,
        const int left) {
    __shared__ __align__(32) TYPE As[BK][BM + APAD];  // patch values, As[t][r] for row t,
    __shared__ __align__(32) TYPE Bs[BK][BN + BPAD];  // kernel row r; output gradient rows
    __shared__ long long row_at[2][BK]; // where the row's window starts in x (may lie
    __shared__ int row_h[2][BK];        // outside), its top-left input position (-2^29 past
    __shared__ int row_w[2][BK];        // the end): for this slice and the next
    const int tid = threadIdx.x;
    const int tn = tid % (BN / TN);
    const int tm = tid / (BN / TN);
    const int kk0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const long long s = blockIdx.z;
    const long long begin = s * per;
    const long long end = begin + per < M ? begin + per : M;
    const int KKE = KK + extra;
    // Thread tid gathers kernel-matrix row kk0 + tid of each slice's BK rows, and output
    // gradient values at (tid / BN + e * (NT / BN), tid % BN), into registers: the next
    // slice's loads are in flight while the product of this one runs.
    static_assert(NT == BM && NT % BN == 0, "one thread per kernel-matrix row");
    const int kk = kk0 + tid;
    const bool ones = kk >= KK && kk < KKE;  // the bias row
    int th, tw;
    long long tat;
    xpcnn_tap(kk, KK, C, kw, W, th, tw, tat);
    auto rows = [&](const long long m0, const int buf) {
        if (tid < BK) {
            const long long m = m0 + tid;
            if (m < end) {
                const int ow = (int)(m % Wo);
                const long long t = m / Wo;
                const int oh = (int)(t % Ho);
                row_h[buf][tid] = oh * sh - top;
                row_w[buf][tid] = ow * sw - left;
                row_at[buf][tid] = (t / Ho) * H * W * C
                                   + ((long long)row_h[buf][tid] * W + row_w[buf][tid]) * C;
            } else {
                row_h[buf][tid] = -(1 << 29);
                row_w[buf][tid] = 0;
                row_at[buf][tid] = 0;
            }
        }
    };
    TYPE pa[BK];
    TYPE pb[BK * BN / NT];
    auto fetch = [&](const long long m0, const int buf) {
        for (int t = 0; t < BK; ++t) {
            const int hh = row_h[buf][t] + th;
            const int ww = row_w[buf][t] + tw;
            if (ones)
                pa[t] = row_h[buf][t] > -(1 << 28) ? (TYPE)1 : (TYPE)0;  // for real rows
            else
                pa[t] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? x[row_at[buf][t] + tat]
                                                                  : (TYPE)0;
        }
        for (int e = 0; e < BK * BN / NT; ++e) {
            const long long m = m0 + tid / BN + e * (NT / BN);
            const int n = n0 + tid % BN;
            pb[e] = (m < end && n < K) ? dy[m * K + n] : (TYPE)0;
        }
    };
    XPCNN_TILE_INIT
    rows(begin, 0);
    __syncthreads();
    fetch(begin, 0);
    int buf = 0;
    for (long long m0 = begin; m0 < end; m0 += BK, buf ^= 1) {
        for (int t = 0; t < BK; ++t) As[t][tid] = pa[t];
        for (int e = 0; e < BK * BN / NT; ++e) Bs[tid / BN + e * (NT / BN)][tid % BN] = pb[e];
        if (m0 + BK < end) rows(m0 + BK, buf ^ 1);
        __syncthreads();
        if (m0 + BK < end) fetch(m0 + BK, buf ^ 1);
        XPCNN_TILE_PRODUCT
        __syncthreads();
    }
    XPCNN_TILE_FINISH
    for (int i = 0; i < TM; ++i) {
        const int kk = kk0 + tm * TM + i;
        if (kk >= KKE) continue;
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn * TN + j;
            if (n < K) part[(s * KKE + kk) * K + n] = (PART)XPCNN_RESULT(i, j);
        }
    }
}
"""
_TILED: dict[tuple[str, str, bool], Any] = {}


def _tiled_kernel(name: str, source: str, dtype: Any, tf32: bool = False) -> Any:
    """The kernel ``name`` of ``source`` for float16 (on the tensor cores), float32 (on the
    CUDA cores, or with ``tf32`` on the tensor cores) or float64 data, compiled once; None
    for a tensor-core one that does not compile here (e.g. no ``cuda_fp16.h``), after a
    warning: the caller then runs the CUDA-core or direct kernels instead."""
    key = (name, np.dtype(dtype).name, tf32)
    if key not in _TILED:
        ctype, acc, product = {
            "float16": ("__half", "float", _WMMA_FLOAT16 + _WMMA_PRODUCT),
            "float32": ("float", "float", _WMMA_TF32 + _WMMA_PRODUCT if tf32 else _FMA_PRODUCT),
            "float64": ("double", "double", _FMA_PRODUCT)}[key[1]]
        # PART: the kernel-gradient parts' type, float32 at least
        source = (_TILE + product + source).replace("TYPE", ctype).replace("ACC", acc)
        kernel = cupy.RawKernel(source.replace("PART", acc), name)
        if product is not _FMA_PRODUCT:
            try:
                kernel.compile()
            except cupy.cuda.compiler.CompileException as e:
                warn(f"the tensor-core convolution kernels did not compile "
                     f"({str(e).splitlines()[0]}); {key[1]} convolutions run on the CUDA "
                     "cores instead")
                kernel = None
        _TILED[key] = kernel
    return _TILED[key]


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

# The parts of both kernel-gradient kernels summed, one output a thread, s = 0, 1, ... in turn
# (NumPy's order for a sum over the first axis; CuPy's reduction, which this launch replaces,
# splits each output's parts among threads and adds them as a tree: rounding may differ): part
# [s, kk, k] goes to out[k * KK + kk] for kk < KK, the (K, kh*kw*C) gradient contiguous as
# the layer keeps its kernel (the (kh*kw*C, K) sum was copied by the step's record and by the
# update, twice more under loss scaling), and the bias row kk == KK to out[KK * K + k]. A
# warp reads consecutive k of one part row (coalesced; S loads a thread, up to 256, unrolled so
# that their latencies overlap: the adds keep their order) and writes one value a thread,
# strided. Not yet timed on a GPU against CuPy's reduction (up to 16 threads an output).
_SUM_PARTS = cupy.ElementwiseKernel(
    "raw P part, int64 S, int32 KK, int32 K, int64 rows",
    "raw P out",
    """
    const int k = i % K;
    const long long kk = i / K;
    P total = part[i];
    #pragma unroll 8
    for (long long s = 1; s < S; ++s) total += part[s * rows + i];  // (8 loads in flight)
    out[kk < KK ? (long long)k * KK + kk : (long long)KK * K + k] = total;
    """,
    "xpcnn_conv_sum_parts",
)


def _sum_parts(parts: Any, with_bias: bool) -> tuple[Any, Any | None]:
    """(kernel gradient, bias gradient or None) from the (S, KK + extra, K) parts, one
    launch: the kernel gradient as a (KK, K) transposed view of a contiguous (K, KK) array
    (the layer's (K, kh, kw, C) layout: a view), the bias gradient the K values after it."""
    splits, kke, k = parts.shape
    kk = kke - (1 if with_bias else 0)
    out = cupy.empty(kke * k, parts.dtype)
    _SUM_PARTS(parts, splits, kk, k, kke * k, out, size=kke * k)
    dw = out[:kk * k].reshape(k, kk).T
    return (dw, out[kk * k:]) if with_bias else (dw, None)


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
            preamble=ACC,
        )
    return kernel


@functools.cache
def _capability_of(device: int) -> int:
    return int(cupy.cuda.Device(device).compute_capability)


def _compute_capability() -> int:
    """The current GPU's compute capability as a number (9.0 -> 90)."""
    return _capability_of(cupy.cuda.Device().id)


ALGORITHMS = ("direct", "tiled", "direct-forward", "im2col")


class ConvKernels:
    """The hand-written convolutions and the switches that choose among them, held by the CuPy
    kernels (``KERNELS.conv_kernels``) and read by every layer's :class:`HandWrittenConv` at
    each call: ``set_algorithm`` and ``tf32`` take effect on layers already built."""

    def __init__(self) -> None:
        # Measured on an H200 (docs/performance.md, 05:18 UTC): the tiled kernels trained
        # float32 1.3x-1.6x faster than the one-element-per-thread direct ones (cifar, batch
        # 128: 44,732 against 30,638 images/s), which in turn beat im2col + cuBLAS; neither
        # keeps any scratch.
        self.set_algorithm("tiled")
        # TF32 as CuPy's own matmuls have it: with CUPY_TF32=1 the tiled float32 convolutions
        # round their factors to TF32 and run on the tensor cores (compute capability 8.0 or
        # newer), as cuDNN's do by default under PyTorch. Off by default: full float32.
        self.tf32 = os.environ.get("CUPY_TF32", "0") != "0"

    def set_algorithm(self, name: str) -> None:
        """How convolutions run: ``"direct"`` (the kernels above, one element per thread, for
        all three), ``"tiled"`` (the tiled kernels for all three: float16 on the tensor cores
        of a GPU of compute capability 7.0 or newer, else the direct ones), ``"direct-forward"``
        (direct forward and input gradient, im2col + cuBLAS kernel gradient) or ``"im2col"``
        (im2col + cuBLAS for all)."""
        if name not in ALGORITHMS:
            raise ValueError(f"unknown convolution algorithm {name!r}; expected one of "
                             f"{', '.join(ALGORITHMS)}")
        self.algorithm = name
        self.runs_forward = name != "im2col"  # and the input gradient
        self.runs_weight_grad = name in ("direct", "tiled")
        self.tiled = name == "tiled"

    def _tiled_for(self, name: str, source: str, dtype: Any) -> Any:
        """The tiled kernel for ``dtype`` data, or None where the direct kernels run: another
        algorithm chosen, bfloat16 (cuDNN is its engine), or float16 without tensor cores
        (compute capability below 7.0) or whose tensor-core kernel did not compile. TF32
        needs 8.0; without it, or where its kernel did not compile, float32 runs on the CUDA
        cores."""
        if not self.tiled or dtype not in (cupy.float16, cupy.float32, cupy.float64):
            return None
        if dtype == cupy.float16:
            return _tiled_kernel(name, source, dtype) if _compute_capability() >= 70 else None
        if self.tf32 and dtype == cupy.float32 and _compute_capability() >= 80:
            kernel = _tiled_kernel(name, source, dtype, tf32=True)
            if kernel is not None:
                return kernel
        return _tiled_kernel(name, source, dtype)

    def conv2d(self, x: Any, w2: Any, bias: Any, kernel: tuple[int, int],
               strides: tuple[int, int], pads: tuple[int, int, int, int],
               out_hw: tuple[int, int], relu: bool) -> Any:
        """Convolution of (N, H, W, C) ``x``, zero-padded by ``pads``, with the (kh*kw*C, K)
        kernel matrix ``w2`` (+ bias, then ReLU): the (N*Ho*Wo, K) output rows, one launch.
        The tiled kernel reads ``w2`` in place where it is row-major or the transposed view of
        a contiguous (K, kh*kw*C) array (the layer's (K, kh, kw, C) kernel, as
        :class:`HandWrittenConv` passes it); the direct one reads it row-major, copied where it
        is not (reading the kernel's layout, a warp's loads would be 32 lines, not one)."""
        x = cupy.ascontiguousarray(x)
        c = x.shape[3]
        k = w2.shape[1]
        tiled = self._tiled_for("xpcnn_conv_tiled", _CONV_TILED_SOURCE, x.dtype)
        if tiled is not None:
            if w2.flags.c_contiguous:  # (by_filter, w_base, w_tap, w_c): see the kernel
                w, layout = w2, (0, 0, c * k, k)
            elif w2.T.flags.c_contiguous:
                w, layout = w2.T, (1, 0, 0, 0)
            else:
                w, layout = cupy.ascontiguousarray(w2), (0, 0, c * k, k)
            return self._tiled_conv(tiled, x, w, layout, bias, kernel, strides, pads, out_hw,
                                    relu, k)
        w2 = cupy.ascontiguousarray(w2)
        n, h, w_, _ = x.shape
        y = cupy.empty((n * out_hw[0] * out_hw[1], k), x.dtype)
        b = w2 if bias is None else cupy.ascontiguousarray(bias)  # (unread without a bias)
        _CONV(x, w2, b, bias is not None, relu, h, w_, c, out_hw[0], out_hw[1], k, kernel[0],
              kernel[1], strides[0], strides[1], pads[0], pads[2], y)
        return y

    @staticmethod
    def _tiled_conv(tiled: Any, x: Any, w: Any, layout: tuple[int, int, int, int], bias: Any,
                    kernel: tuple[int, int], strides: tuple[int, int],
                    pads: tuple[int, int, int, int], out_hw: tuple[int, int], relu: bool,
                    k: int) -> Any:
        """The (N*Ho*Wo, ``k``) output rows of ``xpcnn_conv_tiled`` on contiguous ``x``, the
        kernel matrix read from contiguous ``w`` as ``layout`` says (by_filter, w_base, w_tap,
        w_c: see the kernel's source)."""
        n, h, w_, c = x.shape
        rows = n * out_hw[0] * out_hw[1]
        y = cupy.empty((rows, k), x.dtype)
        if rows:
            b = w if bias is None else cupy.ascontiguousarray(bias)  # (unread without a bias)
            i32, i64 = np.int32, np.int64
            grid = (-(-rows // _TILE_M), -(-k // _TILE_N))
            tiled(grid, (_TILE_THREADS,),
                  (x, w, b, y, i32(bias is not None), i32(relu), i64(rows), i32(h), i32(w_),
                   i32(c), i32(out_hw[0]), i32(out_hw[1]), i32(k), i32(kernel[1]),
                   i32(kernel[0] * kernel[1] * c), i32(strides[0]), i32(strides[1]),
                   i32(pads[0]), i32(pads[2]), i32(layout[0]), *(i64(v) for v in layout[1:])))
        return y

    def tiles(self, dtype: Any) -> bool:
        """Whether :meth:`conv2d` runs the tiled kernel for ``dtype`` data."""
        return self._tiled_for("xpcnn_conv_tiled", _CONV_TILED_SOURCE, dtype) is not None

    def conv2d_input_grad(self, dy: Any, w: Any, kernel: tuple[int, int],
                          strides: tuple[int, int], pads: tuple[int, int, int, int],
                          in_hw: tuple[int, int]) -> Any:
        """Input gradient (N, H, W, C) of :meth:`conv2d` for the (N, Ho, Wo, K) output
        gradient ``dy`` and the (K, kh, kw, C) kernel ``w``, any strides and padding: one
        launch, accumulated in float32 at least (float64 for float64). A stride-1 one
        (:func:`~xpcnn.ops.im2col.input_grad_as_conv`) runs on the tiled kernel where that
        runs: the padded output gradient convolved with the rotated kernel (as
        :func:`~xpcnn.ops.im2col.conv_input_grad`), read from ``w`` in place (no rotated
        copy); shared-memory tiles, where the gather ``xpcnn_conv_input_grad`` that runs
        every other makes two global loads a product."""
        dy, w = cupy.ascontiguousarray(dy), cupy.ascontiguousarray(w)
        n, ho, wo, k = dy.shape
        c = w.shape[3]
        tiled = (self._tiled_for("xpcnn_conv_tiled", _CONV_TILED_SOURCE, dy.dtype)
                 if im2col.input_grad_as_conv(pads, kernel, strides) else None)
        if tiled is not None:
            # rotated kernel matrix row tap * K + f, column c: w[f, kh-1-a, kw-1-b, c] for
            # tap = a*kw + b, at w[(taps-1)*C - tap*C + f*taps*C + c]
            taps = kernel[0] * kernel[1]
            dx = self._tiled_conv(tiled, dy, w, (0, (taps - 1) * c, -c, taps * c), None,
                                  kernel, (1, 1), im2col.output_grad_pads(pads, kernel), in_hw,
                                  False, c)
            return cupy.reshape(dx, (n, *in_hw, c))
        dx = cupy.empty((n, *in_hw, c), dy.dtype)
        _CONV_INPUT_GRAD(dy, w, ho, wo, k, in_hw[0], in_hw[1], c, kernel[0], kernel[1],
                         strides[0], strides[1], pads[0], pads[2], dx)
        return dx

    def conv2d_weight_grad(self, x: Any, dy2: Any, kernel: tuple[int, int],
                           strides: tuple[int, int], pads: tuple[int, int, int, int],
                           out_hw: tuple[int, int], with_bias: bool = False
                           ) -> tuple[Any, Any | None]:
        """Kernel gradient (kh*kw*C, K) of :meth:`conv2d` for output gradient rows ``dy2``
        and, ``with_bias``, the bias gradient (else None), accumulated in float32 at least
        (float64 for float64): blocks of rows in parallel, then their sum (:func:`_sum_parts`:
        the kernel gradient a transposed view of a contiguous (K, kh*kw*C) array)."""
        x, dy2 = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy2)
        n, h, w, c = x.shape
        rows, k = dy2.shape
        kkc = kernel[0] * kernel[1] * c
        extra = 1 if with_bias else 0
        acc = cupy.float64 if x.dtype == cupy.float64 else cupy.float32
        tiled = self._tiled_for("xpcnn_conv_weight_grad_tiled",
                                   _CONV_WEIGHT_GRAD_TILED_SOURCE, x.dtype)
        if tiled is not None and rows:
            tiles = -(-(kkc + extra) // _TILE_M) * -(-k // _TILE_N)
            splits = max(1, min(512 // tiles, rows // 64, 256))  # ~512 blocks in all
            per = -(-rows // splits)
            splits = -(-rows // per)
            parts = cupy.empty((splits, kkc + extra, k), acc)
            i32 = np.int32
            tiled((-(-(kkc + extra) // _TILE_M), -(-k // _TILE_N), splits), (_TILE_THREADS,),
                  (x, dy2, parts, np.int64(rows), np.int64(per), i32(h), i32(w), i32(c),
                   i32(out_hw[0]), i32(out_hw[1]), i32(k), i32(kernel[1]), i32(kkc),
                   i32(extra), i32(strides[0]), i32(strides[1]), i32(pads[0]), i32(pads[2])))
            return _sum_parts(parts, with_bias)
        splits = max(1, min(rows // 1024, 256))
        per = -(-rows // splits)
        parts = cupy.empty((splits, kkc + extra, k), acc)
        q = next(q for q in (8, 4, 3, 2, 1) if c % q == 0)  # channels per thread
        _conv_weight_grad_kernel(q)(
            x, dy2, h, w, c, out_hw[0], out_hw[1], k, kernel[1], strides[0], strides[1],
            pads[0], pads[2], kkc // q, extra, rows, per, parts,
            size=splits * (kkc // q + extra) * k)
        return _sum_parts(parts, with_bias)


class HandWrittenConv(KernelsConv):
    """The CuPy kernels' convolution engine: forward and input gradient on the hand-written
    kernels unless the algorithm is ``"im2col"``, the kernel gradient too with ``"direct"`` or
    ``"tiled"``; the rest on the im2col + cuBLAS loops of
    :class:`~xpcnn.ops.convolution.KernelsConv`. The input gradient of a stride-1 convolution
    runs on the tiled forward kernel where that runs, every other one (strided, padded by a
    kernel's size or more, or the direct kernels chosen) on ``xpcnn_conv_input_grad``
    (:meth:`ConvKernels.conv2d_input_grad`); the tiled kernel reads the (K, kh, kw, C)
    kernel in place for both, no matrix or rotated copy made."""

    def forward(self, x: Any, w: Any, bias: Any | None, relu: bool) -> Any:
        conv = self.kern.conv_kernels
        if not conv.runs_forward:
            return super().forward(x, w, bias, relu)
        g = self.geometry
        # (the matrix a transposed view of the kernel, which the tiled kernel reads in place)
        y = conv.conv2d(x, self._matrix(w), bias, g.kernel, g.strides, g.pads, g.out_hw, relu)
        return self.xp.reshape(y, (x.shape[0], *g.out_hw, g.filters))

    def input_grad(self, dy: Any, w: Any) -> Any:
        conv, g = self.kern.conv_kernels, self.geometry
        if not conv.runs_forward:
            return super().input_grad(dy, w)
        return conv.conv2d_input_grad(dy, w, g.kernel, g.strides, g.pads, g.in_hw)

    def weight_grad(self, x: Any, dy: Any, with_bias: bool, relu_y: Any = None
                    ) -> tuple[Any, Any | None]:
        conv = self.kern.conv_kernels
        if not conv.runs_weight_grad:
            return super().weight_grad(x, dy, with_bias, relu_y)
        g, xp = self.geometry, self.xp
        rows = (-1, g.filters)
        dy2 = xp.reshape(dy, rows)
        if relu_y is not None:
            dy2 = self.kern.relu_backward(dy2, xp.reshape(relu_y, rows))
        dw, db = conv.conv2d_weight_grad(x, dy2, g.kernel, g.strides, g.pads, g.out_hw,
                                         with_bias)
        # (a contiguous view: the parts were summed into the kernel's layout, so that neither
        # the step's record nor the update copies it)
        return self._as_kernel_layout(dw), db

    def gradients(self, x: Any, dy: Any, w: Any, with_bias: bool, input_grad: bool,
                  relu_y: Any = None) -> tuple[Any, Any | None, Any | None]:
        if self.kern.conv_kernels.runs_forward:  # no im2col patches for the two to share
            return ConvEngine.gradients(self, x, dy, w, with_bias, input_grad, relu_y)
        return super().gradients(x, dy, w, with_bias, input_grad, relu_y)
