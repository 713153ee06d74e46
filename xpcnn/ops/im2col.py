"""The convolutions as chunked im2col + matmul loops on (N, H, W, C) arrays: a chunk's patches
written into a buffer (:func:`im2col_into`), their adjoint (:func:`col2im`), and the forward,
kernel-gradient and input-gradient loops built on them, with scratch kept across steps in a
:class:`~xpcnn.ops.workspace.Workspace`.

Channels-last makes the patches' column order (kernel row, kernel column, channel) exactly the
column order of a (K, kh, kw, C) kernel reshaped to (K, kh*kw*C): the convolution is then one
matmul with that matrix transposed. The seam over these loops (one engine per backend) is
:mod:`xpcnn.ops.convolution`; the window geometry they share with pooling (padding, output
sizes, windows) is :mod:`xpcnn.ops.windows`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .windows import Pads, accumulator, window, window_slices
from .workspace import Workspace


def col2im(
    xp: Any,
    cols: Any,
    padded_shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    out_hw: tuple[int, int],
) -> Any:
    """Adjoint of :func:`im2col_into`: (N, Ho, Wo, kh*kw*C) patch gradients summed into the
    padded input."""
    kh, kw = kernel
    c = padded_shape[3]
    out = xp.zeros(padded_shape, dtype=cols.dtype, device=cols.device)
    for i in range(kh):
        for j in range(kw):
            k = (i * kw + j) * c
            rows, in_cols = window_slices(i, j, out_hw, strides)
            out[:, rows, in_cols, :] = out[:, rows, in_cols, :] + cols[..., k : k + c]
    return out


# -- chunked convolution with buffers reused across steps -----------------------------------------
#
# The batch is processed a few images at a time: the im2col patches of a chunk (a few MB) are
# written and read back by the matmul while still in cache, and never exist for the whole batch
# (for a 32x32x32 "same" 3x3 layer at batch 128 that would be a 151 MB temporary per pass).
# Scratch arrays live in a Workspace and are reused across steps: fresh large arrays every step
# cost page faults. Every write goes through slices (the standard does not promise that reshape
# returns a view); reshapes are only read.


def images_per_chunk(n: int, bytes_per_image: int, budget: int | None,
                     min_chunks: int = 8, workers: int = 1) -> int:
    """How many images of ``bytes_per_image`` scratch fit ``budget`` (all when None), in at
    least ``min_chunks`` chunks (on the CPU, 8: threads then share the work evenly whichever
    finishes first). With several ``workers``, a chunk size a little smaller where its chunks
    share out more evenly among them (see :func:`_even_chunks`)."""
    if budget is None:
        return max(n, 1)  # (no images: one empty chunk size, not a step of 0)
    m = max(1, min(-(-n // min_chunks), budget // max(bytes_per_image, 1)))
    return _even_chunks(n, m, workers) if workers > 1 else m


@functools.lru_cache(maxsize=256)
def _even_chunks(n: int, largest: int, workers: int) -> int:
    """The largest chunk size, from ``largest`` down to three quarters of it, whose loop ends
    soonest, counted in images done by the busiest worker when each takes the next chunk as it
    finishes one. 128 images in chunks of 10 are 13 chunks, the last one run alone (68 images
    on the busier worker); chunks of 8 share out 64 and 64: `cifar`'s 16x16x32 -> 64 layer,
    forward + backward, 43.1 -> 41.3-42.0 ms in three runs, 40.3 -> 38.5 in a fourth. (Going
    further, 3 -> 2 images on `notebook`'s 30x30 layer, made its forward slower.)"""
    spans = {}
    for m in range(largest, max(1, -(-3 * largest // 4)) - 1, -1):
        chunks = -(-n // m)
        rounds = -(-chunks // workers)
        in_last_round = chunks - (rounds - 1) * workers
        last = m if in_last_round > 1 or chunks * m == n else n - (chunks - 1) * m
        spans[m] = (rounds - 1) * m + last
    return min(spans, key=lambda m: (spans[m], -m))


def im2col_into(
    x: Any, out: Any, kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int]
) -> Any:
    """Patches of a padded (n, H, W, C) input written into ``out`` (n, Ho, Wo, kh*kw*C)."""
    kh, kw = kernel
    c = x.shape[3]
    for i in range(kh):
        for j in range(kw):
            k = (i * kw + j) * c
            out[:, :, :, k : k + c] = window(x, i, j, out_hw, strides)
    return out


def _patches(xp: Any, kern: Any, x: Any, n0: int, n1: int, pads: Pads, ws: Workspace, key: str,
             m: int, kernel: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int], ones: bool = False) -> Any:
    """The (rows, kh*kw*C) patch matrix of images n0:n1 of the unpadded input ``x`` (with
    ``ones``, (rows, kh*kw*C + 1): a last column of ones, see ``bias_in_patches``).

    The chunk is padded into a small buffer of its own (zero border kept across calls), then
    copied into patches (im2col), or read as if padded where the kernels can
    (``pads_in_im2col``); a 1x1 stride-1 kernel without padding or ones reads ``x`` itself.
    Where the kernels unfold into another dtype (``patch_dtype``: NumPy's, float32 for half
    floats), the chunk is cast once as it is copied into that buffer, padded or not.
    Buffers are per ``key`` (one per worker thread), sized for ``m`` images; the ones column
    is filled when its buffer is made, and im2col never writes it.
    """
    n, h, w, c = x.shape
    b = n1 - n0
    rows = b * out_hw[0] * out_hw[1]
    dtype = kern.patch_dtype(x.dtype)
    copied = any(pads) or dtype != x.dtype  # into the (padded) buffer first
    if kernel == (1, 1) and strides == (1, 1) and not any(pads) and not ones:
        return xp.reshape(x[n0:n1, ...], (rows, c))  # (a product casts each element once)
    if copied and not kern.pads_in_im2col and b == m and ws.keep:
        padded, interior, unfold = _plan(xp, kern, x, pads, ws, key, m, kernel, strides,
                                         out_hw, ones)
        kern.copy_into(padded[interior], x[n0:n1, ...])
        return unfold()
    src = x[n0:n1, ...]
    kk = kernel[0] * kernel[1] * c + int(ones)
    buf = ws.get(xp, key, (m, *out_hw, kk), dtype, x.device, fill=1.0 if ones else None)
    part = buf if b == m else buf[:b, ...]
    if any(pads) and kern.pads_in_im2col:
        return xp.reshape(kern.im2col_into(src, part, kernel, strides, out_hw, pads), (rows, kk))
    if copied:
        src = _padded(xp, ws, key, m, x, pads, dtype)
        src = src if b == m else src[:b, ...]
        kern.copy_into(src[:, pads[0] : pads[0] + h, pads[2] : pads[2] + w, :], x[n0:n1, ...])
    return xp.reshape(kern.im2col_into(src, part, kernel, strides, out_hw), (rows, kk))


def _padded(xp: Any, ws: Workspace, key: str, m: int, x: Any, pads: Pads, dtype: Any) -> Any:
    """The zero-bordered ``dtype`` buffer a chunk of ``m`` images of ``x`` is padded into."""
    n, h, w, c = x.shape
    top, bottom, left, right = pads
    return ws.get(xp, key + "_pad", (m, h + top + bottom, w + left + right, c), dtype,
                  x.device, fill=0.0)


def _plan(xp: Any, kern: Any, x: Any, pads: Pads, ws: Workspace, key: str, m: int,
          kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int],
          ones: bool) -> tuple[Any, Any, Any]:
    """For a full chunk of a padded (or cast, see :func:`_patches`) convolution: the padded
    buffer, the index of its interior (where the chunk goes), and a call that unfolds the
    padded buffer into the patch buffer and returns the patch matrix
    (``kern.im2col_plan``). Built once per key and shapes and kept:
    the views, checks and reshapes of every chunk ran under the interpreter lock, one thread at
    a time (``cifar``'s 32x32 layers: every pass 1.04-1.10x faster without them)."""
    sig = (m, tuple(x.shape[1:]), x.dtype, pads, kernel, strides, out_hw, ones)
    plan = ws.plans.get(key)
    if plan is None or plan[0] != sig:
        h, w, c = x.shape[1:]
        kk = kernel[0] * kernel[1] * c + int(ones)
        dtype = kern.patch_dtype(x.dtype)
        buf = ws.get(xp, key, (m, *out_hw, kk), dtype, x.device, fill=1.0 if ones else None)
        padded = _padded(xp, ws, key, m, x, pads, dtype)
        interior = (slice(None), slice(pads[0], pads[0] + h), slice(pads[2], pads[2] + w),
                    slice(None))
        plan = (sig, padded, interior, kern.im2col_plan(padded, buf, kernel, strides, out_hw))
        ws.plans[key] = plan
    return plan[1:]


def _for_patch_chunks(xp: Any, kern: Any, x: Any, kernel: tuple[int, int],
                      strides: tuple[int, int], pads: Pads, out_hw: tuple[int, int],
                      ws: Workspace, key: str, budget: int | None, min_chunks: int, ones: bool,
                      work: Callable[[Any, int, int, int, int], None]) -> int:
    """The chunk loop of the convolutions: ``x``'s images in chunks sized to ``budget``
    (:func:`images_per_chunk`), on several threads where ``kern.for_chunks`` spreads them,
    each worker with scratch of its own; ``work(cols, n0, n1, r0, r1)`` per chunk of images
    n0:n1, with its patch matrix ``cols`` (a ones column last, with ``ones``), whose rows are
    output rows r0:r1. Returns the images per chunk."""
    n = x.shape[0]
    rows = out_hw[0] * out_hw[1]  # output rows per image
    kk = kernel[0] * kernel[1] * x.shape[3]
    m = images_per_chunk(n, rows * kk * 4, budget, min_chunks, kern.threads())

    def chunk(worker: int, n0: int, n1: int) -> None:
        cols = _patches(xp, kern, x, n0, n1, pads, ws, f"{key}{worker}", m, kernel, strides,
                        out_hw, ones)
        work(cols, n0, n1, n0 * rows, n1 * rows)

    kern.for_chunks(n, m, chunk)
    return m


def conv_forward(
    xp: Any,
    kern: Any,
    x: Any,
    w2: Any,
    bias: Any,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    out_hw: tuple[int, int],
    ws: Workspace,
    key: str,
    budget: int | None,
    relu: bool = False,
    min_chunks: int = 8,
) -> Any:
    """Convolution of an (N, H, W, C) input, zero-padded by ``pads``, with a (kh*kw*C, K)
    kernel matrix (then ReLU, with ``relu``).

    Returns the (N*Ho*Wo, K) output rows. Chunks of images may run on several threads
    (``kern.for_chunks``), each with scratch of its own.
    """
    n = x.shape[0]
    ho, wo = out_hw
    k = w2.shape[1]
    y = xp.empty((n * ho * wo, k), dtype=x.dtype, device=x.device)
    ones = bias is not None and kern.bias_in_patches
    if ones:  # the bias as the kernel matrix's last row, met by the patches' ones column
        w2 = xp.concat([w2, xp.reshape(xp.astype(bias, w2.dtype), (1, k))], axis=0)
        bias = None

    def work(cols: Any, n0: int, n1: int, r0: int, r1: int) -> None:
        kern.matmul_into(cols, w2, y[r0:r1, :], bias, relu)

    _for_patch_chunks(xp, kern, x, kernel, strides, pads, out_hw, ws, key, budget, min_chunks,
                      ones, work)
    return y


def conv_weight_grad(
    xp: Any,
    kern: Any,
    x: Any,
    dy2: Any,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    out_hw: tuple[int, int],
    ws: Workspace,
    key: str,
    budget: int | None,
    min_chunks: int = 8,
    with_bias: bool = False,
    relu_y: Any = None,
) -> tuple[Any, Any | None]:
    """Kernel gradient (kh*kw*C, K): patches^T @ output gradient, summed over chunks (in
    float32 at least); and ``with_bias`` the bias gradient, the sum of ``dy2``'s rows (else
    None). With ``relu_y``, the output rows of a ReLU: the output gradient is ``dy2`` where
    ``relu_y > 0`` (applied a chunk at a time)."""
    kk = kernel[0] * kernel[1] * x.shape[3]
    ones = with_bias and kern.bias_in_patches  # then the last row of each part is dy's sum
    if relu_y is not None and not ones and with_bias:  # the bias gradient needs it whole
        dy2, relu_y = kern.relu_backward(dy2, relu_y), None
    parts: dict[int, Any] = {}  # per chunk, see _sum_in_chunk_order

    def work(cols: Any, n0: int, n1: int, r0: int, r1: int) -> None:
        d = dy2[r0:r1, :] if relu_y is None else kern.relu_backward(dy2[r0:r1, :],
                                                                     relu_y[r0:r1, :])
        parts[n0] = _part(xp, kern.matmul_tn(cols, d), cols, x, d)

    m = _for_patch_chunks(xp, kern, x, kernel, strides, pads, out_hw, ws, key, budget,
                          min_chunks, ones, work)
    dw = _sum_in_chunk_order(xp, parts, x.shape[0], m, (kk + int(ones), dy2.shape[1]), dy2)
    if ones:
        return dw[:kk, ...], dw[kk, ...]
    return dw, (kern.sum_rows(dy2) if with_bias else None)


def _part(xp: Any, product: Any, cols: Any, unfolded: Any, other: Any) -> Any:
    """A chunk's kernel-gradient part, ``cols^T @ other``, in the dtype the product gives
    patches of ``unfolded``'s own dtype: the kernels' float32 patches of a half float (see
    ``patch_dtype``) round it to that half float, as its own patches' product does, before
    the sum over chunks (the same bits either way)."""
    if cols.dtype == unfolded.dtype:
        return product
    return xp.astype(product, xp.result_type(unfolded.dtype, other.dtype), copy=False)


def _sum_in_chunk_order(xp: Any, parts: dict[int, Any], n: int, m: int, shape: tuple[int, ...],
                        like: Any) -> Any:
    """The sum of per-chunk parts (keyed by first image, chunks of ``m`` of ``n`` images) in
    chunk order, so the same bits whichever threads ran the chunks; in float32 at least: in
    float16 (mixed precision) the sum of many chunks' parts would lose the low bits of each.
    No images, no parts: zeros of ``shape``, in ``like``'s accumulator dtype and device."""
    acc = accumulator(xp, like.dtype)
    if n == 0:
        return xp.zeros(shape, dtype=acc, device=like.device)
    total = xp.astype(parts[0], acc, copy=True)
    for n0 in range(m, n, m):
        total += xp.astype(parts[n0], acc, copy=False)
    return total


def flipped_kernel_matrix(xp: Any, kernel: Any) -> Any:
    """(K, kh, kw, C) kernel -> (kh*kw*K, C) matrix of the input-gradient convolution: the
    kernel rotated by 180 degrees with its channel axes swapped (comes out contiguous)."""
    k, kh, kw, c = kernel.shape
    flipped = xp.flip(kernel, axis=(1, 2))
    return xp.reshape(xp.permute_dims(flipped, (1, 2, 0, 3)), (kh * kw * k, c))


def output_grad_pads(pads: Pads, kernel: tuple[int, int]) -> Pads:
    """Padding of the output gradient whose stride-1 convolution with the rotated kernel has
    exactly the input's size: kh-1-top above, and so on."""
    kh, kw = kernel
    return (kh - 1 - pads[0], kh - 1 - pads[1], kw - 1 - pads[2], kw - 1 - pads[3])


def input_grad_as_conv(pads: Pads, kernel: tuple[int, int], strides: tuple[int, int]) -> bool:
    """True when the input gradient is a stride-1 convolution of the padded output gradient."""
    kh, kw = kernel
    top, bottom, left, right = pads
    return strides == (1, 1) and max(top, bottom) < kh and max(left, right) < kw


def conv_input_grad(
    xp: Any,
    kern: Any,
    dy: Any,
    wflip2: Any,
    kernel: tuple[int, int],
    pads: Pads,
    in_hw: tuple[int, int],
    ws: Workspace,
    key: str,
    budget: int | None,
    min_chunks: int = 8,
) -> Any:
    """Input gradient (N, H, W, C) of a stride-1 convolution (see :func:`input_grad_as_conv`):
    the output gradient, zero-padded by kh-1-top above (and so on), convolved with the rotated
    kernel. No col2im scatter, and no temporary the size of the whole batch's patches."""
    n = dy.shape[0]
    h, w = in_hw
    gpads = output_grad_pads(pads, kernel)
    dx = conv_forward(xp, kern, dy, wflip2, None, kernel, (1, 1), gpads, (h, w), ws, key,
                      budget, min_chunks=min_chunks)
    return xp.reshape(dx, (n, h, w, wflip2.shape[1]))


@functools.lru_cache(maxsize=256)
def _phases(k: int, s: int, pad: int, size: int, out: int
            ) -> tuple[int, int, int, int, int, int, tuple[tuple[int, ...], ...]]:
    """Along one axis of a convolution (kernel ``k``, stride ``s``, ``pad`` before, ``size``
    inputs, ``out`` outputs), the stride phases of :func:`phase_input_grad` on one grid.

    Input s*a + r (phase r) meets only taps t + s*u, t = (r + pad) % s, at outputs a + q - u,
    q = (r + pad - t) // s: with its taps reversed, a stride-1 window over output-gradient
    indices a + lo ... a + q. One window of ``span`` taps from the least lo covers every phase.
    Returns (grid positions a, span, the output-gradient indices read [src0, src1), zeros
    before and after them, and per phase (its inputs, then per window tap the kernel tap it
    meets or -1))."""
    grid = -(-size // s)
    phases = []
    for r in range(min(s, size)):
        t = (r + pad) % s
        taps = max(0, -(-(k - t) // s))
        phases.append((-(-(size - r) // s), t, taps, (r + pad - t) // s - taps + 1))
    live = [p for p in phases if p[2]]
    first = min((p[3] for p in live), default=0)
    span = max((p[3] + p[2] for p in live), default=1) - first
    end = first + grid + span - 1  # one past the last index read
    src0 = max(first, 0)
    src1 = max(min(end, out), src0)
    maps = tuple((inputs, *(t + s * (taps - 1 - (u + first - lo))
                            if 0 <= u + first - lo < taps else -1 for u in range(span)))
                 for inputs, t, taps, lo in phases)
    return grid, span, src0, src1, src0 - first, end - src1, maps


@functools.lru_cache(maxsize=256)
def _phase_taps(kh: int, kw: int, rows: tuple[tuple[int, ...], ...],
                cols: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Per (window row, window column, row phase, column phase), the kernel tap i*kw + j
    met there, or kh*kw (a zero) where none: the rows of the phases' kernel matrix."""
    return tuple(rm[a] * kw + cm[b] if rm[a] >= 0 and cm[b] >= 0 else kh * kw
                 for a in range(1, len(rows[0])) for b in range(1, len(cols[0]))
                 for rm in rows for cm in cols)


def phase_input_grad_pays(kernel: tuple[int, int], strides: tuple[int, int], pads: Pads,
                          in_hw: tuple[int, int], out_hw: tuple[int, int], channels: int,
                          filters: int) -> bool:
    """Whether :func:`phase_input_grad` should beat the patch gradients and col2im (NumPy,
    one thread): its products (zeros included) against col2im's, whose scatter costs about
    400 + 37*C multiply-adds' time per output position and tap (C-long runs, a pass per tap).
    Small channel counts and large kernels go by phases (``conv7x7/2`` 32x32x3 -> 16: the
    layer's backward 5.5 -> 1.7 ms, 32x32x16 -> 32: 17.4 -> 9.5); a "valid" output much
    smaller than its input does not (16x16x64 -> 64, 7x7/2: 5x5 outputs, 7.5 ms by col2im,
    12.3 by phases)."""
    (kh, kw), (sh, sw), c, k = kernel, strides, channels, filters
    ga, u, *_, rows = _phases(kh, sh, pads[0], in_hw[0], out_hw[0])
    gb, v, *_, cols = _phases(kw, sw, pads[2], in_hw[1], out_hw[1])
    by_phases = ga * gb * u * v * len(rows) * len(cols) * k * c
    by_col2im = out_hw[0] * out_hw[1] * kh * kw * (k * c + 400 + 37 * c)
    return by_phases < by_col2im


def phase_input_grad(xp: Any, kern: Any, dy: Any, w: Any, kernel: tuple[int, int],
                     strides: tuple[int, int], pads: Pads, in_hw: tuple[int, int],
                     ws: Workspace, key: str, budget: int | None, min_chunks: int = 8) -> Any:
    """Input gradient (N, H, W, C) of any convolution (strided, or padded beyond its kernel)
    from the output gradient ``dy`` (N, Ho, Wo, K) and kernel ``w`` (K, kh, kw, C), with no
    col2im. The inputs of one stride phase (rows r::sh, columns r'::sw) meet only that
    phase's taps: their gradient is a stride-1 convolution of ``dy`` with those taps rotated
    (:func:`_phases`). All phases share one window over ``dy``, so one im2col of ``dy`` per
    chunk of images and one product with a (window taps * K, phases * C) kernel matrix,
    zeros where a phase lacks a tap ("sub-pixel" convolution); each phase's C columns are
    then copied into its strided view of dx.

    Chunks of images as :func:`conv_forward`'s, on the threads; each input's gradient is
    one product's sum (in float32 for half floats, see ``matmul_into``), rounded once. The
    col2im path writes the whole batch's (N*Ho*Wo, kh*kw*C) patch gradients and adds them
    back a tap at a time: C-long runs, slow for few channels (see
    :func:`phase_input_grad_pays`; ``conv7x7/2`` "same" at batch 32, one thread, input
    gradient alone: 32x32x3 -> 16 4.8 -> 1.1 ms, 32x32x16 -> 32 14.1 -> 5.2 ms)."""
    n, c, k = dy.shape[0], w.shape[3], w.shape[0]
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, dy.shape[1:3]
    ga, u, y0, y1, top, bottom, rows = _phases(kh, sh, pads[0], in_hw[0], ho)
    gb, v, x0, x1, left, right, cols = _phases(kw, sw, pads[2], in_hw[1], wo)
    if y1 <= y0 or x1 <= x0:  # (padded beyond every output: no input meets a tap)
        return xp.zeros((n, *in_hw, c), dtype=dy.dtype, device=dy.device)
    phases = len(rows) * len(cols)
    taps = xp.reshape(xp.permute_dims(w, (1, 2, 0, 3)), (kh * kw, k, c))
    taps = xp.concat([taps, xp.zeros((1, k, c), dtype=w.dtype, device=w.device)], axis=0)
    wm = xp.take(taps, xp.asarray(_phase_taps(kh, kw, rows, cols), dtype=xp.int64,
                                  device=w.device), axis=0)  # (u*v*phases, K, C)
    wm = xp.reshape(xp.permute_dims(xp.reshape(wm, (u * v, phases, k, c)), (0, 2, 1, 3)),
                    (u * v * k, phases * c))
    src = dy[:, y0:y1, x0:x1, :]
    dx = xp.empty((n, *in_hw, c), dtype=dy.dtype, device=dy.device)  # (every phase writes)
    m = images_per_chunk(n, ga * gb * u * v * k * 4, budget, min_chunks, kern.threads())

    def chunk(worker: int, n0: int, n1: int) -> None:
        name = f"{key}{worker}"
        p = _patches(xp, kern, src, n0, n1, (top, bottom, left, right), ws, name, m, (u, v),
                     (1, 1), (ga, gb))
        out = ws.get(xp, name + "_dx", (m * ga * gb, phases * c), dy.dtype, dy.device)
        part = out[: p.shape[0], ...]
        kern.matmul_into(p, wm, part)
        grid = xp.reshape(part, (n1 - n0, ga, gb, phases, c))
        for i, (na, *_) in enumerate(rows):
            for j, (nb, *_) in enumerate(cols):
                dx[n0:n1, i::sh, j::sw, :] = grid[:, :na, :nb, i * len(cols) + j, :]

    kern.for_chunks(n, m, chunk)
    return dx


def grads_share_patches(pads: Pads, kernel: tuple[int, int], strides: tuple[int, int],
                        in_hw: tuple[int, int], out_hw: tuple[int, int], channels: int,
                        filters: int) -> bool:
    """True where :func:`conv_grads` pays: a stride-1 convolution whose output is as large as
    its input ("same"), with at least as many input channels as filters.

    There the kernel gradient reads the patches the input gradient unfolds anyway, and the
    im2col of the input is saved (a layer's backward at batch 128 against the two loops, 25-40
    alternating rounds: 32x32x32 -> 32 1.04-1.10x faster, 16x16x64 -> 64 1.05x). With more
    filters than input channels the output gradient's patches are the wider ones (16x16x32 ->
    64: 0.96-0.97x), and a "valid" output is smaller than the input, whose extra positions
    cost products of zeros (26x26x32 -> 64: 0.88x; 30x30x32 -> 32: 1.00x)."""
    return (input_grad_as_conv(pads, kernel, strides) and tuple(in_hw) == tuple(out_hw)
            and channels >= filters)


def conv_grads(
    xp: Any,
    kern: Any,
    x: Any,
    dy: Any,
    kernel: Any,
    pads: Pads,
    ws: Workspace,
    key: str,
    budget: int | None,
    min_chunks: int = 8,
    with_bias: bool = False,
) -> tuple[Any, Any | None, Any]:
    """Kernel, bias and input gradients of a stride-1 convolution (see
    :func:`grads_share_patches`) in one chunk loop over one set of patches.

    The input gradient is the padded output gradient ``dy`` convolved with the rotated
    kernel, as in :func:`conv_input_grad`: patches P (rows over the input's positions, columns
    (kh, kw, K)) times the rotated kernel matrix. The kernel gradient is a product with the same
    P: for tap (i, j), dW[i, j, c, k] = sum over positions q of x[q, c] * dy[q - (i, j) +
    (top, left), k], and that shifted dy is P's column block (kh-1-i, kw-1-j). So P^T @ x is the
    kernel gradient, transposed, with its taps rotated, and x needs no im2col. (P^T @ x rather
    than x^T @ P: the same sums, and OpenBLAS runs the (kh*kw*K, C) product 11-15% faster
    for C = K = 32 on one thread, as fast for 64; the 32x32x32 -> 32 layer's backward 1.05-1.07x.)

    ``kernel`` is (K, kh, kw, C); ``x`` the unpadded input (N, H, W, C), ``dy`` (N, H, W, K).
    Returns (dW (K, kh, kw, C), db (K,) or None, dx (N, H, W, C)); dW and db are summed over
    chunks in chunk order, in float32 at least.
    """
    k, kh, kw, c = kernel.shape
    n, h, w, _ = x.shape
    gpads = output_grad_pads(pads, (kh, kw))
    wflip2 = flipped_kernel_matrix(xp, kernel)
    dx = xp.empty((n * h * w, c), dtype=dy.dtype, device=dy.device)
    dy2 = xp.reshape(dy, (n * h * w, k))
    parts: dict[int, Any] = {}  # per chunk, see _sum_in_chunk_order
    bias_parts: dict[int, Any] = {}

    def work(cols: Any, n0: int, n1: int, r0: int, r1: int) -> None:
        kern.matmul_into(cols, wflip2, dx[r0:r1, :])
        xs = xp.reshape(x[n0:n1, ...], (r1 - r0, c))
        parts[n0] = _part(xp, kern.matmul_tn(cols, xs), cols, dy, xs)
        if with_bias:  # the rows of dy this chunk just padded, still in cache
            bias_parts[n0] = kern.sum_rows(dy2[r0:r1, :])

    m = _for_patch_chunks(xp, kern, dy, (kh, kw), (1, 1), gpads, (h, w), ws, key, budget,
                          min_chunks, False, work)
    g = _sum_in_chunk_order(xp, parts, n, m, (kh * kw * k, c), dy)
    db = _sum_in_chunk_order(xp, bias_parts, n, m, (k,), dy) if with_bias else None
    # (kh, kw, K, C) with rotated taps -> (K, kh, kw, C), contiguous (a reshape of the
    # permuted view copies it)
    dw = xp.permute_dims(xp.flip(xp.reshape(g, (kh, kw, k, c)), axis=(0, 1)), (2, 0, 1, 3))
    dw = xp.reshape(xp.reshape(dw, (k, kh * kw * c)), (k, kh, kw, c))
    return dw, db, xp.reshape(dx, (n, h, w, c))
