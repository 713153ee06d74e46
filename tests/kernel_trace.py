"""How the emulated CUDA kernels (tests/cuda_emulator.py) use global memory, measured on the CPU.

On a GPU, xpcnn's own kernels are bound by memory traffic, and what decides their speed is how
a warp's accesses fall into 32-byte sectors (one sector per warp for a broadcast, four for 32
consecutive float32 elements, 32 for a stride of 32 elements) and whether each byte is moved
once. Inside :func:`tracing`, the emulator builds each kernel with GCC's ThreadSanitizer
instrumentation at the compile step only (``-fsanitize=thread``: GCC calls ``__tsan_read4``,
``__tsan_write2``, ``__tsan_atomic32_compare_exchange_strong`` ... at every memory access it
cannot prove private) and links it, instead of to libtsan, to this module's hooks
(:data:`_HOOKS`), which record each access that falls in a device array: the emulated thread
(block, linear thread index; an elementwise kernel's ``i``), the address, the size, the access
site (the hook's return address: one instruction of the kernel) and whether it loads, stores
or is an atomic (which the hooks then perform). Locals, ``__shared__`` arrays and the
emulator's own data are not device arrays and are not recorded. The kernels' code is not
changed; off the trace the emulator builds and runs them as before.

The device arrays are the launch's array arguments (a broadcast or strided input of an
elementwise kernel, which the emulator copies, is traced as the elements of the array it
stands for) and the arrays a kernel reaches through a table of addresses (the fused updates,
casts, snapshots: cuda_updates' ``_address``). Each is placed at a 512-byte aligned address, as
CuPy's memory pool places its blocks: the array that owns the memory, a view at its offset
in it.

Metrics of a launch (:class:`Traffic`), as Nsight Compute names them: a *request* is one
access site executed by a warp, its k-th execution by each thread (a warp: 32 consecutive
linear thread indices of a block, for an elementwise kernel 32 consecutive ``i``, as CuPy's
launch maps them), and it moves its distinct 32-byte sectors. Sectors per request: 4 for
float32 elements that a warp uses in full, 2 for float16, 1 for bool or a broadcast value, 32
for float32 read with a stride of 32 elements or more. The minimum is the distinct sectors the
launch loads, plus those it stores (each moved once between DRAM and the chip); sectors
transferred / minimum is 1 where every sector is moved once, 2 where a kernel reads its input
twice. Not modelled: the L1 and L2 caches (a sector read again may come from them, so the
ratio is the traffic that a cache must absorb, not DRAM's), the warp's grouping of diverged
threads (threads that run a site a different number of times are grouped by the count: exact
for uniform loops, approximate otherwise), the compiler (GCC -O1 here, NVRTC on the GPU: a
load it keeps in a register or repeats is one more or fewer request), and vector loads (the
kernels have none).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import re
import subprocess
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cuda_emulator
import numpy as np

SECTOR = 32
WARP = 32
LOAD, STORE, ATOMIC = 0, 1, 2
#: Each device array at a multiple of this in the traced address space (CuPy's pool blocks).
_ALIGN_BITS = 40  # (arrays of up to 1 TiB each, 2**24 of them)

# One recorded access (the hooks' struct, as NumPy reads it).
RECORD = np.dtype([("thread", "<i8"), ("site", "<u8"), ("offset", "<u8"), ("block", "<u4"),
                   ("range", "<u4"), ("size", "<u2"), ("kind", "<u2"), ("pad", "<u4")])

# The hooks that GCC's -fsanitize=thread calls (compiled without it, in a library of their own
# that every traced kernel links to): accesses inside the ranges set for a launch are
# recorded; atomics are performed (sequentially consistent whatever the order asked for); the
# others are no-ops.
_HOOKS = r"""
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>
struct Rec {
    int64_t thread;
    uint64_t site, offset;
    uint32_t block, range;
    uint16_t size, kind;
    uint32_t pad;
};
static std::vector<Rec> recs;
static std::vector<uint64_t> starts, ends;
static bool on = false;
static int64_t thread_now = 0;
static uint32_t block_now = 0;
static inline void note(const volatile void* p, size_t size, unsigned kind, void* site) {
    if (!on) return;
    const uint64_t a = (uint64_t)p;
    const auto at = std::upper_bound(starts.begin(), starts.end(), a);
    if (at == starts.begin()) return;
    const size_t r = at - starts.begin() - 1;
    if (a >= ends[r]) return;
    recs.push_back({thread_now, (uint64_t)site, a - starts[r], block_now, (uint32_t)r,
                    (uint16_t)size, (uint16_t)kind, 0});
}
#define SITE __builtin_return_address(0)
#define SEQ __ATOMIC_SEQ_CST
extern "C" {
void xpcnn_trace_at(long long block, long long thread) {
    block_now = (uint32_t)block;
    thread_now = thread;
}
void xpcnn_trace_start(const uint64_t* s, const uint64_t* e, int n) {
    starts.assign(s, s + n);
    ends.assign(e, e + n);
    recs.clear();
    on = true;
}
void xpcnn_trace_stop() { on = false; }
uint64_t xpcnn_trace_count() { return recs.size(); }
const Rec* xpcnn_trace_records() { return recs.data(); }
void xpcnn_trace_clear() { std::vector<Rec>().swap(recs); }

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, size_t n) { note(p, n, 0, SITE); }
void __tsan_write_range(void* p, size_t n) { note(p, n, 1, SITE); }
// (a plain access: kind 0 a load, 1 a store; every atomic is kind 2 and performs itself)
#define ONE(name, N, kind) void __tsan_##name##N(void* p) { note(p, N, kind, SITE); }
#define ACCESS(N) ONE(read, N, 0) ONE(write, N, 1) ONE(unaligned_read, N, 0) \
    ONE(unaligned_write, N, 1) ONE(volatile_read, N, 0) ONE(volatile_write, N, 1) \
    ONE(unaligned_volatile_read, N, 0) ONE(unaligned_volatile_write, N, 1)
ACCESS(1) ACCESS(2) ACCESS(4) ACCESS(8) ACCESS(16)
#define AT(N) note(a, N / 8, 2, SITE)
#define FETCH(N, T, op) T __tsan_atomic##N##_##op(volatile T* a, T v, int) { \
    AT(N); return __atomic_##op(a, v, SEQ); }
#define CAS(N, T, how) int __tsan_atomic##N##_compare_exchange_##how( \
    volatile T* a, T* c, T v, int, int) { \
    AT(N); return __atomic_compare_exchange_n(a, c, v, false, SEQ, SEQ); }
#define ATOMICS(N, T) \
    T __tsan_atomic##N##_load(const volatile T* a, int) { AT(N); return __atomic_load_n(a, SEQ); } \
    void __tsan_atomic##N##_store(volatile T* a, T v, int) { AT(N); __atomic_store_n(a, v, SEQ); } \
    T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { \
        AT(N); return __atomic_exchange_n(a, v, SEQ); } \
    FETCH(N, T, fetch_add) FETCH(N, T, fetch_sub) FETCH(N, T, fetch_and) \
    FETCH(N, T, fetch_or) FETCH(N, T, fetch_xor) FETCH(N, T, fetch_nand) \
    CAS(N, T, strong) CAS(N, T, weak) \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) { \
        AT(N); __atomic_compare_exchange_n(a, &c, v, false, SEQ, SEQ); return c; }
ATOMICS(8, uint8_t) ATOMICS(16, uint16_t) ATOMICS(32, uint32_t) ATOMICS(64, uint64_t)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(SEQ); }
void __tsan_atomic_signal_fence(int) {}
}
"""

# The traced builds: instrumented, with line tables (to name a site), optimised closer to
# NVRTC than the emulator's -O1 (loop-invariant loads hoisted out of a loop, as NVRTC hoists
# them, and the kernels' __device__ functions inlined: in a shared library GCC inlines no
# global function without -fno-semantic-interposition, and a call it cannot see into keeps
# every load in the loop), never vectorised (a vector access would be several threads'
# elements at once); the rounding is the untraced build's (-ffp-contract as it has it). -z
# defs: a hook GCC calls that _HOOKS lacks fails the build, not the launch.
_TRACED_FLAGS = ["-O2", "-fno-semantic-interposition", "-fsanitize=thread",
                 "-fno-tree-vectorize", "-g", "-DXPCNN_TRACING"]


def _hooks_library() -> Path:
    """The hooks' library, built once (by content) next to the emulator's kernels."""
    build_dir = cuda_emulator.ElementwiseKernel.build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"xpcnn_trace_{hashlib.sha1(_HOOKS.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        src = lib.with_suffix(".cpp")
        src.write_text(_HOOKS)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cuda_emulator.compiler(), "-O2", "-shared", "-fPIC", "-o", str(tmp),
                        str(src)], check=True, capture_output=True)
        tmp.replace(lib)
    return lib


@dataclasses.dataclass
class Traffic:
    """The global-memory traffic of one launch, or the sum of several (see the module doc)."""

    name: str
    launches: int = 0
    load_requests: int = 0
    load_sectors: int = 0
    one_address_loads: int = 0  # (load requests whose threads all read one address)
    store_requests: int = 0
    store_sectors: int = 0
    atomic_requests: int = 0
    atomic_sectors: int = 0
    bytes_requested: int = 0
    unique_bytes: int = 0  # (DRAM's ideal: each byte touched moved once)
    minimum_sectors: int = 0  # distinct sectors loaded + distinct sectors stored (+ atomics)
    packed_sectors: int = 0  # each request's bytes in as few sectors as they would fill

    def __add__(self, other: Traffic) -> Traffic:
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name)
                  for f in dataclasses.fields(self) if f.name != "name"}
        return Traffic(self.name, **summed)

    @property
    def sectors(self) -> int:
        return self.load_sectors + self.store_sectors + self.atomic_sectors

    @property
    def load_sectors_per_request(self) -> float:
        return self.load_sectors / self.load_requests if self.load_requests else 0.0

    @property
    def store_sectors_per_request(self) -> float:
        return self.store_sectors / self.store_requests if self.store_requests else 0.0

    @property
    def scatter(self) -> float:
        """Sectors transferred / those the requests' bytes would fill, each request's packed
        together (1: every request coalesced; 8 for float32 read with a stride of 32)."""
        return self.sectors / self.packed_sectors if self.packed_sectors else 1.0

    @property
    def excess(self) -> float:
        """Sectors transferred / the minimum (1: each sector moved once)."""
        return self.sectors / self.minimum_sectors if self.minimum_sectors else 1.0


@dataclasses.dataclass
class Site:
    """One access site of a launch: its kind, requests, sectors and bytes."""

    address: int
    kind: int
    requests: int
    sectors: int
    bytes_requested: int


@dataclasses.dataclass
class Launch:
    """A traced launch: its kernel, its traffic and its access sites (:meth:`Trace.source`
    names a site's line)."""

    name: str
    traffic: Traffic
    sites: list[Site]
    library: Path


def _group_ids(*columns: np.ndarray) -> tuple[np.ndarray, int]:
    """For rows given as columns, the index of each row's distinct value among the rows', and
    the number of distinct values."""
    if not len(columns[0]):
        return np.zeros(0, np.int64), 0
    order = np.lexsort(columns[::-1])
    new = np.zeros(len(order), bool)
    new[0] = True
    for c in columns:
        s = c[order]
        new[1:] |= s[1:] != s[:-1]
    ids = np.empty(len(order), np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids, int(new.sum())


def traffic(name: str, rec: np.ndarray, block: tuple[int, int, int] | None
            ) -> tuple[Traffic, list[Site]]:
    """The metrics of one launch's records (:data:`RECORD`, ``offset`` already a traced
    address, in the order the threads ran them): a raw kernel's with its ``block`` shape, an
    elementwise kernel's with None (warps of 32 consecutive ``i``)."""
    thread = rec["thread"]
    blk = rec["block"].astype(np.int64)
    site = rec["site"].view(np.int64)
    kind = rec["kind"].astype(np.int64)
    size = rec["size"].astype(np.int64)
    address = rec["offset"].view(np.int64)
    # k: the execution of its site by its thread this access is (records are in run order)
    n = len(rec)
    order = np.lexsort((np.arange(n), site, thread, blk))
    group, groups = _group_ids(blk, thread, site)
    ranked = group[order]  # (non-decreasing: the same order, the run order last)
    k = np.empty(n, np.int64)
    k[order] = np.arange(n) - np.searchsorted(ranked, np.arange(groups))[ranked]
    if block is None:  # (the code outside the loop over i: a warp per emulated block)
        warp = np.where(thread >= 0, thread // WARP, -1 - blk)
    else:
        warps = -(-int(np.prod(block)) // WARP)
        warp = blk * warps + thread // WARP
    request, requests = _group_ids(warp, site, k, kind)
    first, last = address // SECTOR, (address + size - 1) // SECTOR
    spans = last != first  # (an access across two sectors moves both)
    req2 = np.concatenate([request, request[spans]])
    sector2 = np.concatenate([first, last[spans]])
    kind2 = np.concatenate([kind, kind[spans]])
    pair, _ = _group_ids(req2, sector2)
    distinct = np.zeros(len(req2), bool)
    distinct[np.unique(pair, return_index=True)[1]] = True
    req_kind = np.zeros(requests, np.int64)
    req_kind[request] = kind
    req_site = np.zeros(requests, np.int64)
    req_site[request] = site
    t = Traffic(name, launches=1, bytes_requested=int(size.sum()))
    for kd, label in ((LOAD, "load"), (STORE, "store"), (ATOMIC, "atomic")):
        setattr(t, f"{label}_requests", int(np.count_nonzero(req_kind == kd)))
        setattr(t, f"{label}_sectors", int(np.count_nonzero(distinct & (kind2 == kd))))
    _, t.minimum_sectors = _group_ids(kind2, sector2)
    at_address, _ = _group_ids(request, address)
    first_at = np.unique(at_address, return_index=True)[1]
    addresses = np.bincount(request[first_at], minlength=requests)
    request_bytes = np.bincount(request[first_at], weights=size[first_at], minlength=requests)
    t.packed_sectors = int(np.ceil(request_bytes / SECTOR).sum())
    t.one_address_loads = int(np.count_nonzero((addresses == 1) & (req_kind == LOAD)))
    unique_at = np.unique(address, return_index=True)[1]
    t.unique_bytes = int(size[unique_at].sum())
    sites = []
    sector_counts = np.bincount(req2[distinct], minlength=requests)
    for s in np.unique(site):
        mine = req_site == s
        at = site == s
        sites.append(Site(int(s) & (2**64 - 1), int(kind[at][0]), int(mine.sum()),
                          int(sector_counts[mine].sum()), int(size[at].sum())))
    return t, sites


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (the last ndarray of its bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class Trace:
    """The launches traced while it is on (see :func:`tracing`)."""

    def __init__(self) -> None:
        self.hooks_path = _hooks_library()
        #: What a traced build adds to the emulator's key of a kernel's library.
        self.build_key = " ".join([" traced", *_TRACED_FLAGS, str(self.hooks_path)])
        self.hooks = ctypes.CDLL(str(self.hooks_path), mode=ctypes.RTLD_GLOBAL)
        self.hooks.xpcnn_trace_count.restype = ctypes.c_uint64
        self.hooks.xpcnn_trace_records.restype = ctypes.c_void_p
        self.launches: list[Launch] = []
        # arrays that kernels reach through tables of addresses, by address, while they live
        self._tabled: dict[int, weakref.ref] = {}
        self._sources: dict[Path, list[str]] = {}

    # -- what cuda_emulator calls -------------------------------------------------------------
    @staticmethod
    def compile_flags(flags: list[str]) -> list[str]:
        """The flags of a traced compile of a kernel given the emulator's ``flags``: those its
        precompiled headers are built with too (a PCH serves only the same flags)."""
        return [*flags, *_TRACED_FLAGS, "-fPIC"]

    def build(self, source: Path, library: Path, flags: list[str],
              found: tuple[str, ...] | list[str] = ()) -> None:
        """Compile ``source`` instrumented (``found``: the flags that find its precompiled
        headers), and link it to the hooks into ``library``."""
        obj = library.with_suffix(".o")
        subprocess.run([cuda_emulator.compiler(), *self.compile_flags(flags), *found, "-c",
                        "-o", str(obj), str(source)], check=True, capture_output=True)
        subprocess.run([cuda_emulator.compiler(), "-shared", "-Wl,-z,defs", "-o", str(library),
                        str(obj), str(self.hooks_path)], check=True, capture_output=True)
        obj.unlink()

    def reached_through_table(self, a: np.ndarray) -> None:
        """Count ``a``'s memory as a device array's while it lives."""
        root = _root(a)
        self._tabled[root.ctypes.data] = weakref.ref(root)

    def run(self, name: str, call: tuple[Any, ...], buffers: list[tuple[np.ndarray, Any]],
            block: tuple[int, int, int] | None) -> None:
        """Run ``call`` (a function and its arguments) traced, as launch ``name``: its
        ``buffers`` are (the buffer the kernel is given, the array it stands for)."""
        ranges = self._ranges(buffers)
        starts = (ctypes.c_uint64 * max(1, len(ranges)))(*[r[0] for r in ranges])
        ends = (ctypes.c_uint64 * max(1, len(ranges)))(*[r[1] for r in ranges])
        self.hooks.xpcnn_trace_start(starts, ends, len(ranges))
        try:
            call[0](*call[1:])
        finally:
            self.hooks.xpcnn_trace_stop()
        count = self.hooks.xpcnn_trace_count()
        rec = np.zeros(0, RECORD)
        if count:
            raw = (ctypes.c_char * (count * RECORD.itemsize)).from_address(
                self.hooks.xpcnn_trace_records())
            rec = np.frombuffer(raw, RECORD).copy()
        self.hooks.xpcnn_trace_clear()
        rec["offset"] = self._traced_addresses(rec, ranges)
        t, sites = traffic(name, rec, block)
        self.launches.append(Launch(name, t, sites, self._library_of(call[0])))

    # -- address spaces -----------------------------------------------------------------------
    def _ranges(self, buffers: list[tuple[np.ndarray, Any]]) -> list[tuple[int, int, Any]]:
        """Sorted, disjoint (start, end, how to map an offset in it to a traced address): the
        memory of every array the kernel may read as device memory."""
        roots: dict[int, np.ndarray] = {}
        copies = []
        for buf, stands_for in buffers:
            if buf is stands_for or np.shares_memory(buf, stands_for):
                root = _root(buf)
                roots[root.ctypes.data] = root
            else:  # (a contiguous copy of a broadcast or strided array: its elements')
                root = _root(stands_for)
                roots[root.ctypes.data] = root
                copies.append((buf, stands_for, root))
        for address, ref in list(self._tabled.items()):
            root = ref()
            if root is None:
                del self._tabled[address]
            else:
                roots.setdefault(address, root)
        index = {address: k for k, address in enumerate(sorted(roots))}
        ranges = [(address, address + max(1, roots[address].nbytes), (index[address], None))
                  for address in sorted(roots)]
        for buf, stands_for, root in copies:
            view = np.broadcast_to(stands_for, buf.shape)
            ranges.append((buf.ctypes.data, buf.ctypes.data + max(1, buf.nbytes),
                           (index[root.ctypes.data],
                            (buf.shape, view.strides, buf.itemsize,
                             stands_for.ctypes.data - root.ctypes.data))))
        ranges.sort(key=lambda r: r[0])
        kept: list[tuple[int, int, Any]] = []
        for r in ranges:  # (memory of non-ndarray owners may overlap: the first kept)
            if not kept or r[0] >= kept[-1][1]:
                kept.append(r)
        return kept

    @staticmethod
    def _traced_addresses(rec: np.ndarray, ranges: list[tuple[int, int, Any]]) -> np.ndarray:
        """The records' addresses in the traced space: array k at k << _ALIGN_BITS."""
        out = rec["offset"].astype(np.uint64)
        which = rec["range"]
        for r, (_, _, (k, copy)) in enumerate(ranges):
            at = which == r
            if not at.any():
                continue
            offset = rec["offset"][at].astype(np.int64)
            if copy is not None:  # (the element of the array the copy stands for)
                shape, strides, itemsize, base = copy
                element, within = np.divmod(offset, itemsize)
                index = np.unravel_index(element, shape)
                offset = base + within + sum(i * s for i, s in zip(index, strides, strict=True))
            out[at] = (np.uint64(k) << np.uint64(_ALIGN_BITS)) + offset.astype(np.uint64)
        return out

    # -- naming sites ---------------------------------------------------------------------------
    @staticmethod
    def _library_of(function: Any) -> Path:
        """The file of the library that holds ctypes function ``function``."""
        address = ctypes.cast(function, ctypes.c_void_p).value
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi and len(fields) > 5:
                return Path(fields[5])
        raise LookupError(f"no mapped library holds {address:#x}")

    def source(self, launch: Launch, site: Site) -> str:
        """The line of the kernel's source (as the emulator compiled it) that ``site`` is in
        (where it is in a function inlined there, the line that calls it)."""
        base = None
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and Path(fields[5]) == launch.library and int(fields[2], 16) == 0:
                base = int(fields[0].split("-")[0], 16)
                break
        if base is None:
            return "?"
        # (-i: the lines of the functions inlined there, the kernel's own last)
        out = subprocess.run(["addr2line", "-i", "-e", str(launch.library),
                              f"{site.address - base - 1:#x}"], capture_output=True,
                             text=True).stdout.strip().splitlines()
        match = re.match(r"(.*):(\d+)", out[-1] if out else "")
        if not match:
            return "?"
        path, number = Path(match.group(1)), int(match.group(2))
        if path not in self._sources:
            self._sources[path] = path.read_text().splitlines() if path.exists() else []
        lines = self._sources[path]
        return lines[number - 1].strip() if 0 < number <= len(lines) else "?"

    # -- summaries ----------------------------------------------------------------------------
    def by_kernel(self) -> list[Traffic]:
        """The launches' traffic summed per kernel name, in the order first launched."""
        out: dict[str, Traffic] = {}
        for launch in self.launches:
            t = launch.traffic
            out[launch.name] = out[launch.name] + t if launch.name in out else t
        return list(out.values())

    def total(self, name: str = "total") -> Traffic:
        """All the launches' traffic summed."""
        out = Traffic(name)
        for launch in self.launches:
            out = out + launch.traffic
        return out


@contextlib.contextmanager
def tracing() -> Iterator[Trace]:
    """Inside, every launch of the emulated kernels is traced (see the module doc)."""
    trace = Trace()
    outer, cuda_emulator.TRACE = cuda_emulator.TRACE, trace
    try:
        yield trace
    finally:
        cuda_emulator.TRACE = outer
