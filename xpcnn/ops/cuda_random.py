"""The CUDA kernels behind :mod:`xpcnn.ops.fast_cupy` that draw: numbers in [0, 1), dropout,
random crop and flip, each in one launch with :mod:`xpcnn.ops.random`'s bits (the standard
versions' numbers). Each counts its draw in the stream's device state in the same launch, by
its last block to finish (``LAST_BLOCK``, of :mod:`xpcnn.ops.cuda_reductions`).
"""

from __future__ import annotations

import cupy

from .cuda_reductions import LAST_BLOCK

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
# A kernel that draws counts its draw in ``state`` (xpcnn.ops.random's [seed, draw]) in the
# same launch: every thread reads the draw before its loop (``_READ_DRAW``); after it, the
# last block to finish (see LAST_BLOCK: every thread of the launch has read the draw by then)
# writes draw + 1 (``_COUNT_DRAW``). Blocks of DRAW_BLOCK threads: one atomic each (CuPy's
# default 128 would make 4 times as many).
_READ_DRAW = "const long long seed = state[0], draw = state[1];"
_COUNT_DRAW = """
    if (xpcnn_last_block(&counter[0], gridDim.x) && threadIdx.x == 0) state[1] = draw + 1;
"""
DRAW_BLOCK = 512
# Numbers in [0, 1): element ``first + i`` of the draw that ``state`` names, counted there.
UNIFORM = cupy.ElementwiseKernel(
    "int64 first, int32 bits, float64 scale",
    "T u, raw int64 state, raw uint32 counter",
    "u = (T)((double)(xpcnn_random_bits(seed, draw, first + i) >> (64 - bits)) * scale);",
    "xpcnn_uniform",
    preamble=_RANDOM_BITS + LAST_BLOCK, loop_prep=_READ_DRAW, after_loop=_COUNT_DRAW,
)
# StandardKernels.dropout in one launch: the number (as UNIFORM draws it, ``unit`` = 2**-bits),
# the mask ``keep`` (number >= rate) and the output x * keep * scale, in the standard order, the
# draw counted as UNIFORM counts it.
DROPOUT = cupy.ElementwiseKernel(
    "T x, int64 first, int32 bits, float64 unit, T rate, T scale",
    "T y, bool keep, raw int64 state, raw uint32 counter",
    """
    const T u = (T)((double)(xpcnn_random_bits(seed, draw, first + i) >> (64 - bits)) * unit);
    keep = u >= rate;
    y = x * (T)(keep ? 1.0f : 0.0f) * scale;
    """,
    "xpcnn_dropout",
    preamble=_RANDOM_BITS + LAST_BLOCK, loop_prep=_READ_DRAW, after_loop=_COUNT_DRAW,
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
# UNIFORM draws them), the draw counted as UNIFORM counts it.
RANDOM_CROP = cupy.ElementwiseKernel(
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
    preamble=_RANDOM_BITS + LAST_BLOCK + _NHWC_INDEX, loop_prep=_READ_DRAW,
    after_loop=_COUNT_DRAW,
)
# StandardKernels.random_flip in one launch: out[n, i, j, c] = x[n, i, W - 1 - j, c] cast to T
# where image n's number (element first + n of the draw, in float32 as UNIFORM draws it: 24
# bits times 2**-24) is below 1/2, that is where the top bit of its random bits is 0; the draw
# counted as UNIFORM counts it.
RANDOM_FLIP = cupy.ElementwiseKernel(
    "raw S x, int64 first, int32 H, int32 W, int32 C",
    "T out, raw int64 state, raw uint32 counter",
    """
    XPCNN_NHWC_INDEX
    const bool flip = (xpcnn_random_bits(seed, draw, first + img) >> 63) == 0;
    out = (T)x[((img * H + row) * W + (flip ? W - 1 - j : j)) * C + c];
    """,
    "xpcnn_random_flip",
    preamble=_RANDOM_BITS + LAST_BLOCK + _NHWC_INDEX, loop_prep=_READ_DRAW,
    after_loop=_COUNT_DRAW,
)
