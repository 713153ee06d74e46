"""Run the CUDA bodies of xpcnn's CuPy kernels (those behind ``xpcnn.ops.fast_cupy``, and
``xpcnn.ops.cuda_conv``'s) on the CPU, for machines without a GPU.

``cupy.ElementwiseKernel`` wraps a C++ loop body in a loop over the output's elements. This
module does the same with the host C++ compiler, for float16 (CuPy's float16 class on the
compiler's ``_Float16``), bfloat16 (CuPy's class for ml_dtypes' dtype, on integers), float32
and float64 data: ``i`` is the element's C-order index, a
non-raw argument is the element at ``i`` (broadcast), a ``raw`` one an array indexed by one
integer, a scalar a constant of its declared type. A fake ``cupy`` module routes the few other
CuPy calls of those modules to NumPy. The raw kernels (``RawKernel``) run in float32 and
float64, and in float16 and bfloat16 where they only convert cuda_fp16.h's ``__half`` and
cuda_bf16.h's ``__nv_bfloat16`` to and from float (emulated on ``_Float16`` and integers);
the tensor-core ones do not run here (tests/test_gpu.py).
Inside ``kernel_trace.tracing()`` (tests/kernel_trace.py) every launch is also built with
GCC's ThreadSanitizer instrumentation and its global-memory accesses recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

C_TYPES = {np.dtype("float16"): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16",
           np.dtype("float32"): "float", np.dtype("float64"): "double",
           np.dtype("bool"): "bool", np.dtype("int32"): "int",
           np.dtype("uint32"): "unsigned int", np.dtype("int64"): "long long",
           np.dtype("uint8"): "unsigned char"}


def compiler() -> str | None:
    """The host C++ compiler, or None."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _host_fma() -> bool:
    """Whether the host runs fused multiply-adds: AArch64 always, x86-64 with FMA."""
    if platform.machine() in ("aarch64", "arm64"):
        return True
    with contextlib.suppress(OSError):
        return " fma " in Path("/proc/cpuinfo").read_text() and platform.machine() == "x86_64"
    return False


_X86_64 = platform.machine() == "x86_64"
#: Tests that build the emulator with fused multiply-adds (ElementwiseKernel.fused_multiply_add).
needs_host_fma = pytest.mark.skipif(not _host_fma(), reason="the host has no fused multiply-add")

#: Tests that build the emulator (CUDA kernels compiled as C++ for the host).
needs_compiler = pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler (CXX or c++)")


def _params(text: str) -> list[tuple[bool, str, str]]:
    """'raw T x, int32 H' -> [(True, 'T', 'x'), (False, 'int32', 'H')]."""
    out = []
    for p in (p.split() for p in text.split(",") if p.strip()):
        raw = p[0] == "raw"
        out.append((raw, *p[raw:]))
    return out


# CuPy's float16 (cupy/_core/include/cupy/float16.cuh) on the host's _Float16 (GCC 12 and
# later, x86-64 and AArch64): stored as a half, converted to float implicitly and from float
# rounding to nearest; no arithmetic of its own, so that an expression of float16 values is
# computed in float and rounded once, where it is stored, as on the GPU.
_FLOAT16 = """
struct float16 {
    _Float16 v;
    float16() {}
    XPCNN_TRACED_COPY(float16)
    float16(float f) : v((_Float16)f) {}
    explicit float16(double d) : v((_Float16)(float)d) {}
    explicit float16(int i) : v((_Float16)(float)i) {}
    explicit float16(long long i) : v((_Float16)(float)i) {}
    explicit float16(bool b) : v((_Float16)(float)b) {}
    operator float() const { return (float)v; }
    template <typename T> float16& operator=(const T& x) { *this = float16(x); return *this; }
    float16& operator=(const float16&) = default;
};
inline int isfinite(float16 x) { return std::isfinite((float)x); }
inline int isnan(float16 x) { return std::isnan((float)x); }
"""

# bfloat16 as CUDA rounds it (cuda_bf16.hpp's __float2bfloat16: to nearest, ties to even; a NaN
# becomes 0x7fff) and widens it (the 16 bits as a float's top half), on the host's integers:
# the base of CuPy's bfloat16 class (cupy/_core/include/cupy/bfloat16.cuh, the elementwise
# kernels' type) and of cuda_bf16.h's __nv_bfloat16 (the raw kernels'), both converted to and
# from float only, as _FLOAT16's float16 is.
_BFLOAT16 = """
inline float xpcnn_bf16_widen(unsigned short b) {
    unsigned u = (unsigned)b << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
inline unsigned short xpcnn_bf16_round(float f) {
    unsigned u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
struct bfloat16 {
    unsigned short v;
    bfloat16() {}
    XPCNN_TRACED_COPY(bfloat16)
    bfloat16(float f) : v(xpcnn_bf16_round(f)) {}
    explicit bfloat16(double d) : v(xpcnn_bf16_round((float)d)) {}
    explicit bfloat16(int i) : v(xpcnn_bf16_round((float)i)) {}
    explicit bfloat16(unsigned int i) : v(xpcnn_bf16_round((float)i)) {}
    explicit bfloat16(long long i) : v(xpcnn_bf16_round((float)i)) {}
    explicit bfloat16(unsigned long long i) : v(xpcnn_bf16_round((float)i)) {}
    explicit bfloat16(bool b) : v(xpcnn_bf16_round((float)b)) {}
    operator float() const { return xpcnn_bf16_widen(v); }
    template <typename T> bfloat16& operator=(const T& x) { *this = bfloat16(x); return *this; }
    bfloat16& operator=(const bfloat16&) = default;
};
inline int isfinite(bfloat16 x) { return std::isfinite((float)x); }
inline int isnan(bfloat16 x) { return std::isnan((float)x); }
"""

# CUDA's products rounded on their own, never fused into a multiply-add (the volatile store
# rounds it where the host compiler fuses, see ElementwiseKernel.fused_multiply_add).
_ROUNDED_PRODUCTS = "".join(
    f"inline {t} {name}({t} a, {t} b) {{ volatile {t} p = a * b; return p; }}\n"
    for name, t in (("__fmul_rn", "float"), ("__dmul_rn", "double")))

# Where a launch is traced (tests/kernel_trace.py, built with -DXPCNN_TRACING), the emulated
# thread that runs from here on: the block, and the thread's linear index in it (an
# elementwise kernel's ``i``; -1 for its code outside the loop over ``i``). And the half
# types copied by a copy constructor of their own: GCC's instrumentation misses a struct read
# from memory straight into an argument passed by value (``xpcnn_widen(x[e])``), not one read
# by a constructor.
_TRACE_AT = """
#ifdef XPCNN_TRACING
extern "C" void xpcnn_trace_at(long long block, long long thread);
#define XPCNN_TRACE_AT(block, thread) xpcnn_trace_at(block, thread)
#define XPCNN_TRACED_COPY(type) \\
    __attribute__((always_inline)) type(const type& other) : v(other.v) {}
#else
#define XPCNN_TRACE_AT(block, thread)
#define XPCNN_TRACED_COPY(type)
#endif
"""

# What a kernel's blocks of one thread, run one after the other, make of CUDA's built-ins: the
# thread's and block's indices (set for each block), a barrier (nothing to wait for), shared
# memory (the one thread's); the raw kernels' fence and atomicInc (_RAW_DEVICE) besides.
_ONE_THREAD_BLOCKS = ("struct xpcnn_dim3 { unsigned x, y, z; };\n"
                      "static xpcnn_dim3 threadIdx, blockIdx, blockDim, gridDim;\n"
                      "#define __syncthreads()\n#define __shared__ static\n")


# The libraries this process has loaded, by source and compiler flags: a kernel launched again
# is neither hashed nor looked up on disk again.
_LOADED: dict[str, Any] = {}

#: The trace that records every launch's global-memory accesses, while one is on
#: (``kernel_trace.tracing``): it builds the kernels instrumented and runs them.
TRACE: Any = None


class ElementwiseKernel:
    """The subset of ``cupy.ElementwiseKernel`` that xpcnn uses, compiled for the CPU. Its grid
    is blocks of one thread, run one after the other, each the ``loop_prep`` code, its
    grid-stride loop over ``i``, then the ``after_loop`` code; one block, the loop in order,
    for a kernel without ``after_loop``, three for one with (the code that runs once a block,
    run where earlier blocks have run theirs)."""

    build_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "xpcnn-cuda-emulator"
    #: True to fuse products and sums into multiply-adds as a GPU does (NVRTC's default
    #: ``--fmad=true``, across statements), where the host has them (x86-64 with FMA, AArch64):
    #: a kernel that must round a product on its own says so (``__fmul_rn``, ``__dmul_rn``).
    fused_multiply_add = False

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 preamble: str = "", loop_prep: str = "", after_loop: str = "") -> None:
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.body, self.name, self.preamble = operation, name, preamble
        self.loop_prep, self.after_loop = loop_prep, after_loop

    def __call__(self, *args: Any, size: int | None = None, block_size: int = 128) -> Any:
        params = self.ins + self.outs
        args = list(args)
        types_ = self._types(args)
        nonraw = [a.shape for (raw, _, _), a in zip(params, args, strict=False)
                  if not raw and isinstance(a, np.ndarray)]
        # (CuPy's _broadcast: ``size`` if and only if every array is raw)
        if (size is None) == (not nonraw):
            raise ValueError(f"{self.name}: 'size' is given with a non-raw array, or no "
                             "array decides the loop size")
        shape = (size,) if size is not None else np.broadcast_shapes(*nonraw)
        for _raw, ty, _ in params[len(args):]:  # outputs not given
            args.append(np.empty(shape, types_[ty] if len(ty) == 1 else np.dtype(ty)))
        buffers, decls, per_element, scalars, copy_back = [], [], [], [], []
        for k, ((raw, ty, name), a) in enumerate(zip(params, args, strict=True)):
            dtype = types_[ty] if len(ty) == 1 else np.dtype(ty)
            c = C_TYPES[dtype]
            if not isinstance(a, np.ndarray):
                scalars.append(float(a))
                decls.append(f"const {c} {name} = ({c})scalars[{len(scalars) - 1}];")
                continue
            if raw:
                assert a.flags.c_contiguous, f"raw argument {name} must be C-contiguous"
                buf = a
            elif k < len(self.ins):
                buf = np.ascontiguousarray(np.broadcast_to(a, shape), dtype=dtype)
            else:
                buf = a if a.flags.c_contiguous else np.empty(shape, a.dtype)
                if buf is not a:
                    copy_back.append((a, buf))
            buffers.append(buf)
            j = len(buffers) - 1
            if raw:
                decls.append(f"Raw<{c}> {name}{{({c}*)ptrs[{j}]}};")
            else:
                decls.append(f"{c}* {name}_p = ({c}*)ptrs[{j}];")
                per_element.append(f"{c}& {name} = {name}_p[i];")
        typedefs = "".join(f"typedef {C_TYPES[v]} {k};\n" for k, v in types_.items())
        source = ("#include <cmath>\n#define __device__\nusing namespace std;\n" + _TRACE_AT
                  + _FLOAT16 + _BFLOAT16 + _ROUNDED_PRODUCTS + _ONE_THREAD_BLOCKS + _RAW_DEVICE +
                  typedefs + self.preamble +
                  "template <typename X> struct Raw { X* d; "
                  "X& operator[](long long k) const { return d[k]; } };\n"
                  'extern "C" void run(long long size, long long xpcnn_blocks, void** ptrs,'
                  " double* scalars) {\n"
                  + "\n".join(decls) + "\nfor (long long xpcnn_block = 0;"
                  " xpcnn_block < xpcnn_blocks; ++xpcnn_block) {\n"
                  "threadIdx = {0, 0, 0}; blockDim = {1, 1, 1};"
                  " blockIdx = {(unsigned)xpcnn_block, 0, 0};"
                  " gridDim = {(unsigned)xpcnn_blocks, 1, 1};\n{"
                  "XPCNN_TRACE_AT(xpcnn_block, -1);\n"
                  + self.loop_prep + "\nfor (long long i = xpcnn_block; i < size;"
                  " i += xpcnn_blocks) {\nXPCNN_TRACE_AT(xpcnn_block, i);\n"
                  + "\n".join(per_element) + "\n{" + self.body + "}\n}\n"
                  "XPCNN_TRACE_AT(xpcnn_block, -1);\n"
                  + self.after_loop + "}\n}\n}\n")
        library = self._build(source)
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[b.ctypes.data for b in buffers])
        values = (ctypes.c_double * max(1, len(scalars)))(*scalars)
        count = int(np.prod(shape))
        # (none where there is no element: CuPy launches nothing)
        blocks = min(count, 3) if self.after_loop else min(count, 1)
        run = (library.run, ctypes.c_longlong(count), ctypes.c_longlong(blocks), ptrs, values)
        if TRACE is None:
            run[0](*run[1:])
        else:  # (each buffer the kernel reads for the array it stands for: a broadcast input's
            # or a strided output's contiguous copy is traced as that array's elements)
            stands_for = [a for a in args if isinstance(a, np.ndarray)]
            TRACE.run(self.name, run, list(zip(buffers, stands_for, strict=True)), None)
        for a, buf in copy_back:
            a[...] = buf
        outs = args[len(self.ins):]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _types(self, args: list[Any]) -> dict[str, np.dtype]:
        """The placeholders' dtypes, as CuPy 14's ``_decide_params_type_core``
        (cupy/_core/_kernel.pyx) decides them: only arrays bind them, the outputs first (all of
        them given or none); an array of another dtype than its declared type or than its
        placeholder's first array raises TypeError; a placeholder that no array binds (only
        scalars) raises KeyError, as CuPy's lookup of it does."""
        if len(args) not in (len(self.ins), len(self.ins) + len(self.outs)):
            raise TypeError(f"{self.name}: {len(args)} arguments, not {len(self.ins)} or "
                            f"{len(self.ins) + len(self.outs)} (with the outputs)")
        outs = list(zip(self.outs, args[len(self.ins):], strict=False))
        if not all(isinstance(a, np.ndarray) for _, a in outs):
            raise TypeError("Output arguments must be cupy.ndarray")
        types_: dict[str, np.dtype] = {}
        for (_, ty, name), a in outs + list(zip(self.ins, args, strict=False)):
            if not isinstance(a, np.ndarray):
                continue
            want = types_.setdefault(ty, a.dtype) if len(ty) == 1 else np.dtype(ty)
            if a.dtype != want:
                raise TypeError(f"Type is mismatched. {name} {a.dtype} {want} {ty}")
        for _, ty, _ in self.ins + self.outs:
            if len(ty) == 1 and ty not in types_:
                raise KeyError(ty)
        return types_

    def _build(self, source: str) -> Any:
        # (no fused multiply-adds unless asked for: the formulas are checked as written)
        fp = (["-O2", "-ffp-contract=fast"] + (["-mfma"] if _X86_64 else [])
              if getattr(self, "fused_multiply_add", False) else ["-O1", "-ffp-contract=off"])
        traced = TRACE is not None
        key = source + " ".join(fp) + (TRACE.build_key if traced else "")
        if key in _LOADED:
            return _LOADED[key]
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.build_dir.mkdir(parents=True, exist_ok=True)
        lib = self.build_dir / f"{self.name}_{digest}.so"
        if not lib.exists():
            src = lib.with_suffix(".cpp")
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            if traced:  # (its headers precompiled for its own flags: -g, -fsanitize)
                source, found = _with_precompiled_headers(source, TRACE.compile_flags(fp),
                                                          self.build_dir)
                src.write_text(source)
                TRACE.build(src, tmp, fp, found)
            else:
                source, found = _with_precompiled_headers(source, [*fp, "-fPIC"], self.build_dir)
                src.write_text(source)
                subprocess.run([compiler(), *fp, "-fPIC", *found, "-shared",
                                "-o", str(tmp), str(src)], check=True,
                               capture_output=True)
            tmp.replace(lib)
        _LOADED[key] = ctypes.CDLL(str(lib))
        return _LOADED[key]


def _with_precompiled_headers(source: str, flags: list[str], build_dir: Path
                              ) -> tuple[str, list[str]]:
    """``source`` with its leading ``#include <...>`` lines replaced by one header of them,
    precompiled for ``flags``, and the ``-I`` flags that find it: parsing the C++ standard
    headers was about half of each kernel's compile, and a clean CI machine compiles every
    kernel the suite runs. Where g++ cannot use the precompiled header it reads the header
    itself, which includes the same lines: the same library either way."""
    lines = source.split("\n")
    k = 0
    while k < len(lines) and re.fullmatch(r"#include <[\w./]+>", lines[k]):
        k += 1
    if not k:
        return source, []
    includes = "\n".join(lines[:k]) + "\n"
    digest = hashlib.sha1((includes + " ".join(flags)).encode()).hexdigest()[:16]
    folder = build_dir / f"pch_{digest}"
    header = folder / "xpcnn_headers.h"
    if not header.with_suffix(".h.gch").exists():
        folder.mkdir(parents=True, exist_ok=True)
        mine = folder / f"{os.getpid()}"  # (another worker may be writing the same files)
        mine.with_suffix(".h").write_text(includes)
        mine.with_suffix(".h").replace(header)
        built = subprocess.run([compiler(), *flags, "-x", "c++-header", "-o",
                                str(mine.with_suffix(".gch")), str(header)], capture_output=True)
        if built.returncode == 0:  # (else each kernel parses the headers, as before)
            mine.with_suffix(".gch").replace(header.with_suffix(".h.gch"))
    return "\n".join(['#include "xpcnn_headers.h"', *lines[k:]]), ["-I", str(folder)]


# What the raw kernels use of cuda_fp16.h (conversions only) and of CUDA's memory model: a
# fence, atomicAdd (unsigned and float), and an atomicInc (old >= limit ? 0 : old + 1,
# returning old) that is atomic across the block's threads, though blocks run one after the
# other here, so a "last block" is always the last launched: a wrong count of them, or a
# counter left non-zero, still gives a wrong sum.
_RAW_DEVICE = """
struct __half {
    _Float16 v;
    __half() {}
    XPCNN_TRACED_COPY(__half)
    __half(float f) : v((_Float16)f) {}
    operator float() const { return (float)v; }
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return __half(f); }
struct __nv_bfloat16 {
    unsigned short v;
    __nv_bfloat16() {}
    XPCNN_TRACED_COPY(__nv_bfloat16)
    __nv_bfloat16(float f) : v(xpcnn_bf16_round(f)) {}
    operator float() const { return xpcnn_bf16_widen(v); }
};
inline float __bfloat162float(__nv_bfloat16 h) { return xpcnn_bf16_widen(h.v); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* a, float v) {
    unsigned* bits = (unsigned*)a;
    unsigned old = __atomic_load_n(bits, __ATOMIC_SEQ_CST), sum;
    float f;
    do {
        __builtin_memcpy(&f, &old, 4);
        f += v;
        __builtin_memcpy(&sum, &f, 4);
    } while (!__atomic_compare_exchange_n(bits, &old, sum, false, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    __builtin_memcpy(&f, &old, 4);
    return f;
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
    unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(a, &old, old >= limit ? 0u : old + 1u, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
"""


# A raw kernel's warp shuffles (of values of at most 8 bytes, full-warp masks): each thread
# leaves its value in a slot, waits at a barrier, reads its source lane's (its own past the
# warp's end, as CUDA gives it), and waits again before the slots are reused. The barriers are
# the block's, so every thread of the block must shuffle as often as the others between two
# __syncthreads (on a GPU the warp's 32 lanes must: uniform code satisfies both).
_SHUFFLES = """
static unsigned char xpcnn_lanes[1024][8];
template <typename T> T xpcnn_shuffle(T v, unsigned (*source)(unsigned, unsigned), unsigned d) {
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    __builtin_memcpy(xpcnn_lanes[t], &v, sizeof(T));
    xpcnn_barrier();
    const unsigned from = source(t % 32, d);
    T out = v;
    if (from < 32) __builtin_memcpy(&out, xpcnn_lanes[t - t % 32 + from], sizeof(T));
    xpcnn_barrier();
    return out;
}
static unsigned xpcnn_down(unsigned lane, unsigned d) { return lane + d; }
static unsigned xpcnn_xor(unsigned lane, unsigned d) { return lane ^ d; }
template <typename T> T __shfl_down_sync(unsigned, T v, unsigned d) {
    return xpcnn_shuffle(v, xpcnn_down, d);
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int d) {
    return xpcnn_shuffle(v, xpcnn_xor, (unsigned)d);
}
"""


# The scalar parameters' C types and the NumPy dtype whose bytes a launch must be given for
# each: CuPy passes a scalar's own bytes (cupy/_core/_scalar.pyx CScalar: a NumPy scalar's
# dtype, int64 for a Python int, float64 for a Python float) and the driver copies as many as
# the parameter declares, so a narrower scalar or one of another kind reads garbage on a GPU.
_RAW_SCALARS = {"int": "int32", "unsigned int": "uint32", "long long": "int64",
                "unsigned long long": "uint64", "float": "float32", "double": "float64",
                "bool": "bool"}


def _raw_scalar_dtype(value: Any) -> np.dtype:
    """The dtype of the bytes CuPy passes for a raw kernel's scalar argument."""
    if isinstance(value, np.generic):
        return value.dtype
    if type(value) is bool:
        return np.dtype(bool)
    if type(value) is float:
        return np.dtype(np.float64)
    if type(value) is int:
        return np.dtype(np.uint64 if value >= 2**63 else np.int64)
    raise TypeError(f"CuPy passes no {type(value).__name__} to a kernel")


# The stack of each emulated thread of a raw kernel's block (its registers and local arrays):
# only the pages a thread touches are ever mapped.
_THREAD_STACK = 256 * 1024


class RawKernel:
    """The subset of ``cupy.RawKernel`` that xpcnn uses, compiled for the CPU. The blocks run
    one after the other; a block's threads are coroutines (``ucontext``) on one host thread,
    ``__shared__`` arrays shared by them: each runs in turn, in thread order, up to its next
    ``__syncthreads`` (a real barrier: no thread passes it before every thread still running
    has reached it) or its return, and a block ends when all have returned. The order is the
    same at every run, and a missing barrier shows every time: the first thread runs on to the
    next barrier before the others have written what it reads, or overwrites what they have
    still to read. (A POSIX thread per CUDA thread was several times slower, and far slower
    on a loaded machine: each barrier a round of the host's scheduler for every thread of the
    block.) Pointer arguments are NumPy arrays, the others scalars of exactly the kernel's
    declared types (as a GPU needs them).

    That order shows a thread reading what a later thread writes in the same stretch between
    barriers, not one reading what an earlier thread writes. So each launch runs twice, from
    the same arguments: threads and blocks in order, then both in reverse, and must leave the
    same bits in every array (:data:`check_schedules`); a race, a read of shared memory before
    the block has written it (it holds the last block's values here), or a result that
    depends on which block finishes last differs between the two."""

    build_dir = ElementwiseKernel.build_dir
    #: Run every launch in both schedules and compare (see the class doc).
    check_schedules = True

    def __init__(self, code: str, name: str, options: tuple[str, ...] = ()) -> None:
        self.code, self.name = code, name
        match = re.search(r"__global__\s+void\s+" + re.escape(name) + r"\s*\((.*?)\)\s*\{",
                          code, re.S)
        assert match, f"no kernel {name} in the source"
        self.params = [p.strip() for p in match.group(1).split(",")]

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
                 shared_mem: int = 0) -> None:
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        buffers, scalars, call = [], [], []
        for decl, a in zip(self.params, args, strict=True):
            ctype = decl.rsplit(None, 1)[0]
            if "*" in decl:
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous, decl
                buffers.append(a)
                call.append(f"({ctype})xpcnn_ptrs[{len(buffers) - 1}]")
            else:
                declared = ctype.replace("const", "").strip()
                if _raw_scalar_dtype(a) != np.dtype(_RAW_SCALARS[declared]):
                    raise TypeError(f"{self.name}: {decl} given a {_raw_scalar_dtype(a)} "
                                    f"scalar (CuPy passes its bytes as they are)")
                scalars.append(float(a))
                call.append(f"({ctype.replace('const', '')})xpcnn_scalars[{len(scalars) - 1}]")
        source = (
            "#include <cmath>\n#include <cstdlib>\n#include <ucontext.h>\n#include <vector>\n"
            "struct xpcnn_dim3 { unsigned x, y, z; };\n"
            "static xpcnn_dim3 threadIdx, blockIdx, blockDim, gridDim;\n"
            "static void** xpcnn_ptrs; static double* xpcnn_scalars;\n"
            "static ucontext_t xpcnn_scheduler;\n"
            "static std::vector<ucontext_t> xpcnn_threads;\n"
            "static unsigned xpcnn_running;\n"
            "static bool xpcnn_returned;\n"
            "static void xpcnn_barrier() {\n"
            "  swapcontext(&xpcnn_threads[xpcnn_running], &xpcnn_scheduler);\n}\n"
            "#define __global__\n#define __device__\n#define __forceinline__ inline\n"
            "#define __restrict__\n"
            "#define __shared__ static\n#define __align__(n) __attribute__((aligned(n)))\n"
            "#define __syncthreads() xpcnn_barrier()\n"
            "using namespace std;\n" + _TRACE_AT + _BFLOAT16 + _RAW_DEVICE + _SHUFFLES +
            self.code.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>",
                                                                     "") +
            "\nstatic void xpcnn_thread() {\n"
            f"  {self.name}({', '.join(call)});\n"
            "  xpcnn_returned = true;\n}\n"
            'extern "C" void run(unsigned* dims, void** ptrs, double* scalars, bool reverse) {\n'
            "  xpcnn_ptrs = ptrs; xpcnn_scalars = scalars;\n"
            "  gridDim = {dims[0], dims[1], dims[2]}; blockDim = {dims[3], dims[4], dims[5]};\n"
            "  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;\n"
            f"  const size_t stack = {_THREAD_STACK};\n"
            "  char* stacks = (char*)malloc(threads * stack);\n"
            "  xpcnn_threads.assign(threads, ucontext_t());\n"
            "  std::vector<char> running(threads);\n"
            "  const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;\n"
            "  for (unsigned k = 0; k < blocks; ++k) {\n"
            "    const unsigned b = reverse ? blocks - 1 - k : k;\n"
            "    blockIdx = {b % gridDim.x, b / gridDim.x % gridDim.y,"
            " b / (gridDim.x * gridDim.y)};\n"
            "    for (unsigned t = 0; t < threads; ++t) {\n"
            "      ucontext_t& c = xpcnn_threads[t];\n"
            "      getcontext(&c);\n"
            "      c.uc_stack.ss_sp = stacks + t * stack; c.uc_stack.ss_size = stack;\n"
            "      c.uc_link = &xpcnn_scheduler;\n"
            "      makecontext(&c, xpcnn_thread, 0);\n"
            "      running[t] = 1;\n"
            "    }\n"
            "    // each running thread in turn, up to its next barrier or its return\n"
            "    for (unsigned left = threads; left > 0;)\n"
            "      for (unsigned k = 0; k < threads; ++k) {\n"
            "        const unsigned t = reverse ? threads - 1 - k : k;\n"
            "        if (!running[t]) continue;\n"
            "        threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y,"
            " t / (blockDim.x * blockDim.y)};\n"
            "        xpcnn_running = t; xpcnn_returned = false;\n"
            "        XPCNN_TRACE_AT(b, t);\n"
            "        swapcontext(&xpcnn_scheduler, &xpcnn_threads[t]);\n"
            "        if (xpcnn_returned) { running[t] = 0; --left; }\n"
            "      }\n"
            "  }\n"
            "  free(stacks);\n}\n")
        library = ElementwiseKernel._build(self, source)  # type: ignore[arg-type]
        dims = (ctypes.c_uint * 6)(*grid, *block)
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[b.ctypes.data for b in buffers])
        values = (ctypes.c_double * max(1, len(scalars)))(*scalars)
        first_run = (library.run, dims, ptrs, values, ctypes.c_bool(False))
        before = [b.copy() for b in buffers] if self.check_schedules else []
        if TRACE is None:
            first_run[0](*first_run[1:])
        else:  # (the first schedule only: the threads in order, as a warp issues them)
            TRACE.run(self.name, first_run, [(b, b) for b in buffers], block)
        if not self.check_schedules:
            return
        in_order = [b.copy() for b in buffers]
        for b, saved in zip(buffers, before, strict=True):
            b[...] = saved
        library.run(dims, ptrs, values, ctypes.c_bool(True))
        pointers = [decl for decl in self.params if "*" in decl]
        for decl, b, expected in zip(pointers, buffers, in_order, strict=True):
            differ = np.count_nonzero(_bytes(b) != _bytes(expected))
            assert not differ, (
                f"{self.name}: {differ} bytes of {decl} differ when "
                "its threads and blocks run in reverse order: a race between threads, shared "
                "memory read before it is written, or a result that depends on the last block")


def _bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of C-contiguous ``a``, as a flat uint8 view."""
    return a.reshape(-1).view(np.uint8)


def fake_cupy() -> types.ModuleType:
    """A ``cupy`` whose kernels run on the CPU and whose arrays are NumPy's."""
    fake = types.ModuleType("cupy")
    # (a class no array is of: the emulator's arrays are NumPy's, and array_api_compat asks
    # for cupy.ndarray wherever a "cupy" module is imported)
    fake.ndarray = type("ndarray", (), {})
    fake.ElementwiseKernel = ElementwiseKernel
    fake.RawKernel = RawKernel
    allocators: list[Any] = []  # the allocator of each using_allocator block entered

    @contextlib.contextmanager
    def using_allocator(allocator: Any = None) -> Iterator[None]:
        allocators.append(allocator)
        try:
            yield
        finally:
            allocators.pop()

    default_pool = types.SimpleNamespace(malloc=lambda nbytes: None)
    fake.get_default_memory_pool = lambda: default_pool
    fake.cuda = types.SimpleNamespace(
        compiler=types.SimpleNamespace(
            CompileException=type("CompileException", (Exception,), {})),
        MemoryPool=lambda: types.SimpleNamespace(malloc=lambda nbytes: None),
        using_allocator=using_allocator, allocators=allocators)
    for name in ("matmul", "empty", "empty_like", "zeros", "ones", "reshape", "maximum",
                 "ascontiguousarray",
                 "asarray", "finfo", "bool_", "int32", "uint32", "float16", "float32",
                 "float64"):
        setattr(fake, name, getattr(np, name))
    return fake


def load_emulated_fast_cupy() -> tuple[types.ModuleType, dict[str, Any]]:
    """Import ``xpcnn.ops.fast_cupy`` (and the other modules of ``xpcnn.ops`` that import
    CuPy: its kernel modules, cuda_conv, cudnn_conv) against the fake ``cupy``; returns the
    module and the ``sys.modules`` entries to put back afterwards (see :func:`restore`)."""
    import array_api_compat.numpy as compat_numpy

    ours = ("xpcnn.ops.fast_cupy", "xpcnn.ops.cuda_elementwise", "xpcnn.ops.cuda_reductions",
            "xpcnn.ops.cuda_random", "xpcnn.ops.cuda_updates", "xpcnn.ops.cuda_conv",
            "xpcnn.ops.cudnn_conv")
    saved = {n: sys.modules.get(n) for n in ("cupy", "array_api_compat.cupy", *ours)}
    sys.modules["cupy"] = fake_cupy()
    sys.modules["array_api_compat.cupy"] = compat_numpy
    for name in ours:
        sys.modules.pop(name, None)
    import xpcnn.ops.cudnn_conv as cudnn_conv  # afresh, on the fake cupy
    import xpcnn.ops.fast_cupy as module  # (and the kernel modules it imports)
    from xpcnn.ops import cuda_updates

    # The hand-written kernels alone, as where cuDNN does not load, without its warning (a
    # test of cuDNN imports cudnn_conv afresh with the fake frontend of cudnn_emulator).
    cudnn_conv.load = lambda: None

    cuda_updates._address = _table_address  # host addresses for the kernels' address tables
    cuda_updates._upload = np.copyto  # (the device arrays are NumPy's)
    return module, saved


def _table_address(a: np.ndarray) -> int:
    """The address of ``a``'s first element, for a kernel's table of arrays; a trace on
    (``TRACE``) counts ``a``'s memory as the device's from then on."""
    if TRACE is not None:
        TRACE.reached_through_table(a)
    return a.ctypes.data


def restore(saved: dict[str, Any]) -> None:
    """Put back the ``sys.modules`` entries an emulated load replaced (this module's
    :func:`load_emulated_fast_cupy`, or cudnn_emulator's ``load_emulated_cudnn_conv``), and
    the ``xpcnn.ops`` attribute of each ``xpcnn.ops`` module among them."""
    import xpcnn.ops

    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
        if name.startswith("xpcnn.ops."):
            attribute = name.removeprefix("xpcnn.ops.")
            if module is None:
                xpcnn.ops.__dict__.pop(attribute, None)
            else:
                setattr(xpcnn.ops, attribute, module)
