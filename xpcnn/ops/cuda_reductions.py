"""The CUDA kernels behind :mod:`xpcnn.ops.fast_cupy` that reduce: sums over rows (a bias
gradient), softmax cross-entropy, FeatureNorm and BatchNorm with their backwards (and their
elementwise second launches), with their launch constants. The reducing ones are raw sources
(a block's threads working together through shared memory), compiled per dtype by
``fast_cupy._raw_kernel`` with ``HALF``, ``BFLOAT16`` and ``LAST_BLOCK`` in front; each sums in
one launch, always in the same order: the same bits at every run.
"""

from __future__ import annotations

import math
from typing import Any

import cupy
import numpy as np

from .cuda_elementwise import ACC

# Raw kernels (a block's threads working together through shared memory) are compiled from
# their source with typedefs of their type names (fast_cupy's ``_raw_kernel``, which puts
# LAST_BLOCK, and HALF or BFLOAT16 where a type needs them, in front). The "last block" way of
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
LAST_BLOCK = r"""
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
HALF = r"""
#include <cuda_fp16.h>
__device__ float xpcnn_widen(__half x) { return __half2float(x); }
"""
BFLOAT16 = r"""
#include <cuda_bf16.h>
__device__ float xpcnn_widen(__nv_bfloat16 x) { return __bfloat162float(x); }
"""


# A sum over the rows of a C-contiguous (rows, cols) array of X (a bias gradient) in one
# launch, in A: float32 for float16 data (a float16 sum of a batch's rows would lose their low
# bits), else the data's own type. Block (x, y) sums rows [x*per, x*per + per) of the 32
# columns [32y, 32y + 32): thread (c, lane) every LANES-th row from ``lane`` on, in order, then
# a tree over the lanes in shared memory, into row x of ``partials``; the last block of each
# column chunk y (counter y) sums that chunk's partials the same way. xpcnn_relu_sum_rows
# first multiplies each value by (relu_y > 0), as StandardKernels.relu_backward does, writes
# that product to ``masked`` and sums it: a ReLU's gradient and its bias gradient in one pass.
SUM_ROWS_LANES = 8
SUM_ROWS_SOURCE = f"#define LANES {SUM_ROWS_LANES}\n" + r"""
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
# uniform distribution by ``spread`` = smoothing / classes (``keep`` = 1 - smoothing). The
# target an integer label (``labels``), or where ``rows`` a probability row of type Y
# (``targets``, one-hot or not: its label, for the count, is its first maximum; one with a
# value below 0, or NaN, or that does not sum to 1 within 1e-3, names no class). Where
# ``weighted``, row i's loss and gradient are multiplied by ``weights[i]`` (type W; Keras'
# sample_weight, the sum still divided by N), its count not; where ``classed``, also by
# ``table[label]`` (type C; fit's class_weight, 0 for a label that is no class), the product
# rounded to T as the standard version's lookup rounds it. A target that names no class makes
# the loss and the count NaN, as the standard version's. Targets and weights read as the
# standard version's cast to T gives them. The same
# steps as xpcnn.ops.softmax, in the accumulator type A (float32 for float16 T). Where
# ``scaled``, the gradient (rounded to T) is then multiplied by the float16 loss scale
# ``scale[0]``, read from the device, as the standard version does it after. Logits of a
# narrower type Z (float16 under mixed precision) are read as the standard version's cast to T
# would give them (exactly), and their gradient rounded to Z as its cast would round it (the
# layer that made them reads it in Z). The rows' [loss, right] summed into ``stats`` in the
# same launch: a tree per block, then the last block's tree over the blocks' partials (see
# LAST_BLOCK). Two kernels, by the rows' size:
# - xpcnn_softmax_cross_entropy: a row a thread, where a block's THREADS rows fit in STAGED
#   bytes of shared memory in T (up to 32 classes of a float32 loss, mixed precision's too; 64
#   of float16, 16 of float64: 10 for MNIST and CIFAR-10). They pass through it: the logits
#   loaded, and the gradient stored, by consecutive threads at consecutive addresses (4
#   sectors a warp's request for float32), where a thread reading its own row in place would
#   put the warp's reads a row apart (31 sectors a request at 10 classes, and each row read
#   three times: tests/kernel_trace.py). Target rows are read in place, twice (the staging
#   holds only the logits; the warp's rows share their cache lines).
# - xpcnn_softmax_cross_entropy_rows: a row a warp, for more classes (CIFAR-100's 100), its
#   lanes on consecutive classes; the row's maximum, sum and loss each a tree over the lanes.
#   (A thread a row would put a whole batch of 512 rows on 2 blocks of the GPU's 132
#   multiprocessors, each thread walking its row alone.)
CROSS_ENTROPY_THREADS = 256
_CROSS_ENTROPY_STAGED = 32768
SOFTMAX_CROSS_ENTROPY_SOURCE = (f"#define THREADS {CROSS_ENTROPY_THREADS}\n"
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
// A target or weight as the standard version's cast to T gives it, in A.
template <typename V> __device__ A xpcnn_as_t(V v) {
    return (A)xpcnn_widen((T)(A)xpcnn_widen(v));
}
// Row i's weight: its sample weight where ``weighted``, times its label's class weight where
// ``classed`` (0 for a label that is no class), the product rounded to T.
__device__ A xpcnn_weight(const W* weights, int weighted, const C* table, int classed,
                          long long i, long long label, int classes) {
    const A w = weighted ? xpcnn_as_t(weights[i]) : (A)1;
    if (!classed) return w;
    const A c = label >= 0 && label < classes ? xpcnn_as_t(table[label]) : (A)0;
    return weighted ? (A)xpcnn_widen((T)(c * w)) : c;
}
// Class c of a row, logit z, target ``given`` before smoothing (1 or 0 for a label), given the
// row's maximum and log-sum of exponentials: its gradient, times the row's ``weight``, stored
// at ``out`` (which may be where z was read), and its target x log-softmax.
__device__ A xpcnn_class_term(Z z, A given, A top, A log_total, double keep, double spread,
                              double inv_n, A weight, int scaled, A scaling, Z* out) {
    const A logp = ((A)xpcnn_widen(z) - top) - log_total;
    const A target = given * (A)keep + (A)spread;  // (1 x keep is keep: a label's as before)
    const T g = (T)((exp(logp) - target) * (A)inv_n * weight);
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
// Row ``y``'s label (its first maximum) and whether it names a class, for a row a thread.
__device__ bool xpcnn_target_row(const Y* y, int classes, long long* label) {
    A best = (A)0, total = (A)0;
    bool ok = true;
    for (int c = 0; c < classes; ++c) {
        const A v = (A)xpcnn_widen(y[c]);
        if (c == 0 || v > best) { best = v; *label = c; }
        total += v;
        ok = ok && v >= (A)0;  // (false for NaN)
    }
    return ok && fabs(total - (A)1) <= (A)1e-3;
}
extern "C" __global__ void xpcnn_softmax_cross_entropy(
        const Z* __restrict__ z, const L* __restrict__ labels, const Y* __restrict__ targets,
        int rows, const W* __restrict__ weights, int weighted, const C* __restrict__ table,
        int classed, long long n, int classes, double keep, double spread, double inv_n,
        const U* scale, int scaled, Z* __restrict__ grad, A* partials, unsigned int* counter,
        A* __restrict__ stats) {
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
        long long label = rows ? 0 : (long long)labels[i];
        const bool named = rows ? xpcnn_target_row(targets + i * classes, classes, &label)
            : label >= 0 && label < classes;
        const A weight = xpcnn_weight(weights, weighted, table, classed, i, label, classes);
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
        for (int c = 0; c < classes; ++c) {
            const A given = rows ? xpcnn_as_t(targets[i * classes + c])
                : (c == label ? (A)1 : (A)0);
            loss -= xpcnn_class_term(row[c], given, top, log_total, keep, spread, inv_n,
                                     weight, scaled, scaling, &row[c]);
        }
        if (!named) loss = (A)nan("");  // a target that is no class
        row_loss = loss * weight * (A)inv_n;
        right = !named ? (A)nan("") : first == label ? (A)1 : (A)0;
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
// A warp's first maximum: each lane's ``top`` at ``first`` (``classes`` for none), the larger
// of two, the earlier of equals; for each lane of it (every thread of the block takes part).
__device__ void xpcnn_lanes_first(A* values, int* places, int classes, A* top, int* first) {
    const int t = threadIdx.x, lane = t % 32;
    values[t] = *top;
    places[t] = *first;
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
    *top = values[t - lane];
    *first = places[t - lane];
    __syncthreads();  // (values is the next tree's)
}
extern "C" __global__ void xpcnn_softmax_cross_entropy_rows(
        const Z* __restrict__ z, const L* __restrict__ labels, const Y* __restrict__ targets,
        int rows, const W* __restrict__ weights, int weighted, const C* __restrict__ table,
        int classed, long long n, int classes, double keep, double spread, double inv_n,
        const U* scale, int scaled, Z* __restrict__ grad, A* partials, unsigned int* counter,
        A* __restrict__ stats) {
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
    xpcnn_lanes_first(values, places, classes, &top, &first);
    A part = (A)0;
    for (int c = lane; live && c < classes; c += 32) part += exp((A)xpcnn_widen(row[c]) - top);
    const A log_total = log(xpcnn_lanes_sum(values, part));
    long long label = live && !rows ? (long long)labels[i] : 0;
    bool named = label >= 0 && label < classes;
    const Y* y = targets + (live ? i : 0) * classes;
    if (rows) {  // (the same for every thread of the launch: all take part in the trees)
        A best = (A)0, total = (A)0, bad = (A)0;
        int at = classes;
        for (int c = lane; live && c < classes; c += 32) {
            const A v = (A)xpcnn_widen(y[c]);
            if (at == classes || v > best) { best = v; at = c; }
            total += v;
            bad += v >= (A)0 ? (A)0 : (A)1;  // (1 for NaN)
        }
        xpcnn_lanes_first(values, places, classes, &best, &at);
        total = xpcnn_lanes_sum(values, total);
        bad = xpcnn_lanes_sum(values, bad);
        label = at;
        named = !live || (bad == (A)0 && fabs(total - (A)1) <= (A)1e-3);
    }
    const A weight = live ? xpcnn_weight(weights, weighted, table, classed, i, label, classes)
        : (A)1;
    const A scaling = live && scaled ? (A)xpcnn_widen(scale[0]) : (A)1;
    part = (A)0;
    for (int c = lane; live && c < classes; c += 32) {
        const A given = rows ? xpcnn_as_t(y[c]) : (c == label ? (A)1 : (A)0);
        part -= xpcnn_class_term(row[c], given, top, log_total, keep, spread, inv_n, weight,
                                 scaled, scaling, &grad[i * classes + c]);
    }
    A loss = xpcnn_lanes_sum(values, part);
    if (!named) loss = (A)nan("");  // a target that is no class
    const bool mine = live && lane == 0;  // (the row's totals, once)
    xpcnn_block_totals(sums, mine ? loss * weight * (A)inv_n : (A)0,
                       !mine ? (A)0 : !named ? (A)nan("") : first == label ? (A)1 : (A)0,
                       partials, counter, stats);
}
"""


def cross_entropy_kernel(classes: int, dtype: Any) -> tuple[str, int]:
    """The softmax cross-entropy kernel for rows of ``classes`` logits whose loss is computed
    in ``dtype``, and its rows a block. (By the rows' size in the loss's dtype, not the
    logits': narrower logits give the bits their cast would, by the same kernel.)"""
    if classes * CROSS_ENTROPY_THREADS * np.dtype(dtype).itemsize <= _CROSS_ENTROPY_STAGED:
        return "xpcnn_softmax_cross_entropy", CROSS_ENTROPY_THREADS
    return "xpcnn_softmax_cross_entropy_rows", CROSS_ENTROPY_THREADS // 32  # (a row a warp)


# Softmax of rows of ``classes`` logits in one launch (a model's output at inference, which
# training leaves to the loss): the standard version's steps (xpcnn.ops.softmax.softmax) on
# logits of type Z read as their cast to T gives them (exactly, for narrower Z), computed in
# A: the row's maximum m, e = exp(z - m), their sum s, then e / s rounded to T. Two kernels, as
# the loss's: xpcnn_softmax a row a thread, the block's rows staged in shared memory in A (read
# and written by consecutive threads at consecutive addresses), where they fit in STAGED
# bytes (up to 32 classes in float, 16 in double); xpcnn_softmax_rows a row a warp, the
# maximum and sum each a tree over the lanes. A NaN or infinite logit gives the row NaN, as
# the standard version does.
SOFTMAX_SOURCE = (f"#define THREADS {CROSS_ENTROPY_THREADS}\n"
                  f"#define STAGED {_CROSS_ENTROPY_STAGED}\n") + r"""
extern "C" __global__ void xpcnn_softmax(const Z* __restrict__ z, long long n, int classes,
                                         T* __restrict__ y) {
    __shared__ __align__(16) unsigned char staging[STAGED];
    A* tile = (A*)staging;  // (the block's rows, then their probabilities)
    const int t = threadIdx.x;
    const long long start = blockIdx.x * (long long)THREADS;  // (the block's first row)
    const long long count = (n - start < THREADS ? n - start : THREADS) * classes;
    for (long long k = t; k < count; k += THREADS)
        tile[k] = (A)xpcnn_widen((T)(A)xpcnn_widen(z[start * classes + k]));
    __syncthreads();
    if (start + t < n) {
        A* row = tile + t * classes;
        A top = row[0];
        for (int c = 1; c < classes; ++c) top = row[c] > top ? row[c] : top;
        A total = (A)0;
        for (int c = 0; c < classes; ++c) {
            row[c] = exp(row[c] - top);
            total += row[c];
        }
        for (int c = 0; c < classes; ++c) row[c] = row[c] / total;
    }
    __syncthreads();
    for (long long k = t; k < count; k += THREADS) y[start * classes + k] = (T)tile[k];
}
// The largest (with ``larger``) or the sum of the 32 values of a warp's lanes, for each lane
// of it: a tree in ``s`` (THREADS entries, the block's; every thread of the block takes part).
__device__ A xpcnn_lanes_reduce(A* s, A v, bool larger) {
    const int t = threadIdx.x, lane = t % 32;
    s[t] = v;
    __syncthreads();
    for (int half = 16; half > 0; half /= 2) {
        if (lane < half) s[t] = larger ? (s[t + half] > s[t] ? s[t + half] : s[t])
                                       : s[t] + s[t + half];
        __syncthreads();
    }
    const A total = s[t - lane];
    __syncthreads();  // (s is the next tree's)
    return total;
}
extern "C" __global__ void xpcnn_softmax_rows(const Z* __restrict__ z, long long n,
                                              int classes, T* __restrict__ y) {
    __shared__ A s[THREADS];
    const int t = threadIdx.x, lane = t % 32;
    const long long i = blockIdx.x * (long long)(THREADS / 32) + t / 32;  // (the warp's row)
    const bool live = i < n;  // (a warp past the last row still takes part in the trees)
    const Z* row = z + (live ? i : 0) * classes;
    // (each lane starts from a logit of the row: no infinity needed for a lane with none)
    A top = (A)xpcnn_widen((T)(A)xpcnn_widen(row[lane < classes ? lane : 0]));
    for (int c = lane + 32; live && c < classes; c += 32) {
        const A v = (A)xpcnn_widen((T)(A)xpcnn_widen(row[c]));
        top = v > top ? v : top;
    }
    top = xpcnn_lanes_reduce(s, top, true);
    A part = (A)0;
    for (int c = lane; live && c < classes; c += 32)
        part += exp((A)xpcnn_widen((T)(A)xpcnn_widen(row[c])) - top);
    const A total = xpcnn_lanes_reduce(s, part, false);
    for (int c = lane; live && c < classes; c += 32)
        y[i * classes + c] = (T)(exp((A)xpcnn_widen((T)(A)xpcnn_widen(row[c])) - top) / total);
}
"""


def softmax_kernel(classes: int, acc: Any) -> tuple[str, int]:
    """The softmax kernel for rows of ``classes`` logits computed in ``acc`` (float32 or
    float64), and its rows a block."""
    if classes * CROSS_ENTROPY_THREADS * np.dtype(acc).itemsize <= _CROSS_ENTROPY_STAGED:
        return "xpcnn_softmax", CROSS_ENTROPY_THREADS
    return "xpcnn_softmax_rows", CROSS_ENTROPY_THREADS // 32  # (a row a warp)


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
FEATURE_NORM_THREADS = 512
_FEATURE_NORM_COMMON = f"#define THREADS {FEATURE_NORM_THREADS}\n" + r"""
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
FEATURE_NORM_SOURCE = _FEATURE_NORM_COMMON + r"""
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
FEATURE_NORM_BACKWARD_SOURCE = _FEATURE_NORM_COMMON + r"""
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
# N*H*W): its statistics are column statistics, taken as SUM_ROWS_SOURCE sums columns. Block
# (x, y) takes rows [x*per, x*per + per) of the 32 columns [32y, 32y + 32), thread (c, lane)
# every LANES-th row from ``lane`` on, in order, then a tree over the lanes in shared memory;
# the last block of each column chunk y (counter y, see LAST_BLOCK) merges the chunk's
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
# is BATCH_NORM_APPLY.
BATCH_NORM_SOURCE = f"#define LANES {SUM_ROWS_LANES}\n" + r"""
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
# whose input was z: times (z > 0), NaN staying NaN as in MASK_MULTIPLY.
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
# Forward, second launch: y = z (max(z, 0) with ``relu``, NaN staying NaN as RELU's), rounded
# to Y (the compute dtype: float16 under mixed precision) as it is written.
BATCH_NORM_APPLY = cupy.ElementwiseKernel(
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
BATCH_NORM_BACKWARD_SOURCE = f"#define LANES {SUM_ROWS_LANES}\n" + _BATCH_NORM_Z + r"""
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
# type), dz and xhat recomputed as the first launch does; the threads as BATCH_NORM_APPLY's.
BATCH_NORM_DX = cupy.ElementwiseKernel(
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
_BATCH_NORM_RUNNING_Z = ACC + _BATCH_NORM_Z + """
#define XPCNN_BN_RUNNING_Z(x, c) \\
    ((((A)(x) - (A)mean[c]) * ((A)1 / sqrt((A)var[c] + (A)eps))) * (A)gamma[c] + (A)beta[c])
"""
BATCH_NORM_RUNNING = cupy.ElementwiseKernel(
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
BATCH_NORM_RUNNING_DX = cupy.ElementwiseKernel(
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


def batch_norm_threads(rows: int, cols: int) -> int:
    """The threads of BATCH_NORM_APPLY and BATCH_NORM_DX over (rows, cols) data: a multiple
    of cols and of 32, about _BATCH_NORM_ROWS_PER_THREAD elements each (at most)."""
    unit = math.lcm(cols, 32)
    return unit * -(-rows * cols // (unit * _BATCH_NORM_ROWS_PER_THREAD))


def row_blocks(rows: int) -> tuple[int, int]:
    """Rows per block and blocks of a launch that sums columns over ``rows`` rows (see
    _SUM_ROWS_BLOCKS)."""
    per = max(_SUM_ROWS_PER_BLOCK, -(-rows // _SUM_ROWS_BLOCKS))
    return per, -(-rows // per)



# The sums of squares of many arrays of G in one launch (gradient clipping by norm, before the
# fused update reads them: xpcnn.optim's clipnorm and global_clipnorm), in double. Each block
# sums a tile of TILE elements of one array (``table``: the running offsets of the arrays,
# each size rounded up to a multiple of TILE, then their addresses, then their sizes; a block
# finds its array by a binary search of its first element's position), a tree over its
# threads into ``partials``; the last block (see LAST_BLOCK) sums each array's partials into
# ``sums[k]``, a warp an array (8 at a time; its lanes' sums, then a fixed shuffle tree),
# then those into ``sums[count]`` the same way: the total of all, the same bits every run.
SQUARES_THREADS = 256
SQUARES_TILE = SQUARES_THREADS * 16
SUM_SQUARES_SOURCE = (f"#define THREADS {SQUARES_THREADS}\n#define TILE {SQUARES_TILE}\n" + r"""
__device__ double xpcnn_threads_total(double* lanes, double s) {
    lanes[threadIdx.x] = s;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) lanes[threadIdx.x] += lanes[threadIdx.x + half];
        __syncthreads();
    }
    const double total = lanes[0];
    __syncthreads();  // (every thread has read it before the lanes are written again)
    return total;
}
__device__ double xpcnn_warp_total(double s) {  // (lane 0's: a fixed tree over the lanes)
    for (int d = 16; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
    return s;
}
extern "C" __global__ void xpcnn_sum_squares(const long long* __restrict__ table, int count,
                                             double* partials, unsigned int* counters,
                                             double* __restrict__ sums) {
    __shared__ double lanes[THREADS];
    const long long at = (long long)blockIdx.x * TILE;
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (at >= table[mid]) lo = mid; else hi = mid - 1;
    }
    const G* g = (const G*)table[count + 1 + lo];
    const long long start = at - table[lo], size = table[2 * count + 1 + lo];
    const long long end = start + TILE < size ? start + TILE : size;
    double s = 0.0;
    for (long long e = start + threadIdx.x; e < end; e += THREADS) {
        const double v = (double)xpcnn_widen(g[e]);
        s += v * v;
    }
    s = xpcnn_threads_total(lanes, s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
    if (!xpcnn_last_block(counters, gridDim.x)) return;
    const volatile double* done = partials;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int first = 0; first < count; first += THREADS / 32) {  // (the same for every warp)
        const int k = first + warp;
        double t = 0.0;
        for (long long b = k < count ? table[k] / TILE + lane : 0;
             k < count && b < table[k + 1] / TILE; b += 32)
            t += done[b];
        t = xpcnn_warp_total(t);
        if (lane == 0 && k < count) sums[k] = t;
    }
    __syncthreads();  // (every array's sum written)
    double total = 0.0;
    for (int k = lane; k < count; k += 32) total += sums[k];
    total = xpcnn_warp_total(total);  // (every warp shuffles: uniform code; warp 0 writes)
    if (threadIdx.x == 0) sums[count] = total;
}
""")
