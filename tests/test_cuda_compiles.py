"""The tiled convolution kernels of ``xpcnn.ops.cuda_conv`` compile for NVIDIA GPUs, on a
machine without one: NVRTC (CUDA's runtime compiler, a pip package) builds them to machine
code for each GPU generation they target, which also runs ``ptxas`` over their inline PTX. The
tensor-core product has no CPU twin (tests/cuda_emulator.py), so this is where its syntax and
register counts are checked before a GPU is lent.

Skips unless NVRTC and CUDA's headers are installed as pip wheels (``pip install
nvidia-cuda-nvrtc nvidia-cuda-runtime``, the ``nvidia`` namespace package); CI has neither.
"""

import ctypes
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import load_emulated_fast_cupy, restore


def _find(pattern: str) -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).glob(pattern)):
            return path
    return None


NVRTC = _find("*/lib/libnvrtc.so*")
FP16_HEADER = _find("*/include/cuda_fp16.h")
pytestmark = pytest.mark.skipif(NVRTC is None or FP16_HEADER is None,
                                reason="needs NVRTC and CUDA's headers (pip nvidia-cuda-nvrtc "
                                "nvidia-cuda-runtime)")


@pytest.fixture(scope="module")
def fast_cupy():
    module, saved = load_emulated_fast_cupy()
    yield module
    restore(saved)


@pytest.fixture(scope="module")
def cuda_conv(fast_cupy):
    return fast_cupy.cuda_conv


def _module_fixture(name: str):
    """A fixture of the kernel module ``name`` behind fast_cupy, as the ``fast_cupy`` fixture
    loaded it (emulated)."""
    @pytest.fixture(scope="module", name=name)
    def module(fast_cupy):
        return _module(name)

    return module


cuda_elementwise = _module_fixture("cuda_elementwise")
cuda_reductions = _module_fixture("cuda_reductions")
cuda_random = _module_fixture("cuda_random")
cuda_updates = _module_fixture("cuda_updates")


def _module(name: str):
    """The emulated ``xpcnn.ops`` module ``name`` (loaded by the ``fast_cupy`` fixture)."""
    return importlib.import_module(f"xpcnn.ops.{name}")


def _kernel(qualified: str):
    """A kernel by its module and name, e.g. ``"cuda_random.UNIFORM"``."""
    module, name = qualified.split(".")
    return getattr(_module(module), name)


def _compile(source: str, name: str, arch: int) -> tuple[int, str]:
    """NVRTC's result code and log for ``source`` built to sm_``arch`` machine code."""
    lib = ctypes.CDLL(str(NVRTC))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                  None) == 0
    options = [f"--gpu-architecture=sm_{arch}".encode(), f"-I{FP16_HEADER.parent}".encode(),
               b"--ptxas-options=-v"]  # (each kernel's registers and shared memory, logged)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    if (major.value, minor.value) >= (12, 9):  # (a cached build would log no ptxas lines)
        options.append(b"--no-cache")
    try:
        code = lib.nvrtcCompileProgram(prog, len(options),
                                       (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return code, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# A block's registers, on every generation from 7.5 on: a launch whose threads need more fails
# ("too many resources requested for launch"), and nothing before a GPU would say so.
REGISTERS_PER_BLOCK = 65536


def assert_launchable(log: str, name: str, threads: int) -> None:
    """Kernel ``name`` as ptxas built it (its -v lines in ``log``) launches in blocks of
    ``threads`` threads: its registers a thread times ``threads`` within a block's, and no
    spills to local memory (each would be a memory round trip in the kernel's loops)."""
    entry = re.search(r"Compiling entry function '" + re.escape(name) + r"'.*?"
                      r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                      r"Used (\d+) registers", log, re.S)
    assert entry, f"no ptxas lines for {name} in the log:\n{log}"
    stores, loads, registers = map(int, entry.groups())
    assert registers * threads <= REGISTERS_PER_BLOCK, (name, registers, threads)
    assert stores == loads == 0, (name, stores, loads)


# The oldest generations that CUDA 13's NVRTC builds for (7.5), Ampere (TF32) and Hopper.
@pytest.mark.parametrize("dtype, tf32, arch", [("float16", False, 75), ("float16", False, 90),
                                               ("float32", True, 80), ("float32", True, 90),
                                               ("float32", False, 75), ("float64", False, 90)])
@pytest.mark.parametrize("name", ["xpcnn_conv_tiled", "xpcnn_conv_weight_grad_tiled"])
def test_tiled_kernels_compile(cuda_conv, monkeypatch, name, dtype, tf32, arch):
    sources = []

    class Capture:
        def __init__(self, code: str, kernel_name: str) -> None:
            sources.append(code)

        def compile(self) -> None:
            pass

    monkeypatch.setattr(cuda_conv.cupy, "RawKernel", Capture)
    monkeypatch.setattr(cuda_conv, "_TILED", {})
    source = {"xpcnn_conv_tiled": cuda_conv._CONV_TILED_SOURCE,
              "xpcnn_conv_weight_grad_tiled": cuda_conv._CONV_WEIGHT_GRAD_TILED_SOURCE}[name]
    cuda_conv._tiled_kernel(name, source, np.dtype(dtype), tf32)
    code, log = _compile(sources[0], name, arch)
    assert code == 0, log
    assert_launchable(log, name, cuda_conv._TILE_THREADS)
    assert ("wmma" in sources[0]) == (dtype == "float16" or tf32)


# The C types CuPy gives an ElementwiseKernel's scalars, and stand-ins for its placeholders:
# CuPy's own float16 class converts to and from float as cuda_fp16.h's __half does.
SCALAR_TYPES = {"int32": "int", "uint32": "unsigned int", "int64": "long long",
                "float32": "float", "float64": "double", "bool": "bool"}


# A stand-in for CuPy's own float16 (cupy/_core/include/cupy/float16.cuh), where the kernels
# name ``float16``: a half converted implicitly to and from float, explicitly from the other
# numbers, with no arithmetic or comparison of its own (cuda_fp16.h's __half has both), so that
# an expression of float16 values is computed in float as on the GPU.
CUPY_FLOAT16 = """
class float16 {
    __half h_;
public:
    __device__ float16() {}
    __device__ float16(float v) : h_(v) {}
    explicit __device__ float16(bool v) : h_(float(v)) {}
    explicit __device__ float16(double v) : h_(float(v)) {}
    explicit __device__ float16(int v) : h_(float(v)) {}
    explicit __device__ float16(unsigned int v) : h_(float(v)) {}
    explicit __device__ float16(long long v) : h_(float(v)) {}
    explicit __device__ float16(unsigned long long v) : h_(float(v)) {}
    __device__ operator float() const { return __half2float(h_); }
    float16& operator=(const float16&) = default;
    template <typename X> __device__ float16& operator=(const X& x) {
        *this = static_cast<float16>(x);
        return *this;
    }
};
"""

# And for CuPy's bfloat16 (cupy/_core/include/cupy/bfloat16.cuh, CuPy 14 with ml_dtypes): the
# same shape on cuda_bf16.h's __nv_bfloat16, with the header's free functions the kernels may
# meet (isnan, isfinite).
CUPY_BFLOAT16 = """
class bfloat16 {
    __nv_bfloat16 data_;
public:
    __device__ bfloat16() : data_() {}
    __device__ bfloat16(const __nv_bfloat16& v) : data_(v) {}
    __device__ bfloat16(float v) : data_(v) {}
    explicit __device__ bfloat16(bool v) : data_(float(v)) {}
    explicit __device__ bfloat16(double v) : data_(float(v)) {}
    explicit __device__ bfloat16(int v) : data_(float(v)) {}
    explicit __device__ bfloat16(unsigned int v) : data_(float(v)) {}
    explicit __device__ bfloat16(long long v) : data_(float(v)) {}
    explicit __device__ bfloat16(unsigned long long v) : data_(float(v)) {}
    __device__ operator float() const { return float(data_); }
    bfloat16& operator=(const bfloat16&) = default;
    template <typename T> __device__ bfloat16& operator=(const T& rhs) {
        *this = static_cast<bfloat16>(rhs);
        return *this;
    }
    __device__ int isnan() const { return __hisnan(data_); }
    __device__ int isinf() const { return __hisinf(data_); }
};
__device__ int isnan(bfloat16 x) { return x.isnan(); }
__device__ int isfinite(bfloat16 x) { return !x.isnan() && !x.isinf(); }
"""


def _elementwise_as_kernel(kernel, types: dict[str, str], arrays: tuple[str, ...] = ()) -> str:
    """An emulated ``cupy.ElementwiseKernel`` as the CUDA kernel CuPy would build: its body in
    a grid-stride loop over ``i``, between its ``loop_prep`` and ``after_loop``; raw arguments
    are pointers, the non-raw ones named in ``arrays`` each thread's element of one (the others
    scalars); the inputs const, as CuPy declares them (a const CArray, a const reference, a
    const scalar)."""
    def c_type(ty, name):
        const = "const " if name in [n for _, _, n in kernel.ins] else ""
        return const + types.get(ty, SCALAR_TYPES.get(ty))

    params = [f"{c_type(ty, name)}{'*' if raw or name in arrays else ''} {name}"
              f"{'_p' if name in arrays else ''}" for raw, ty, name in kernel.ins + kernel.outs]
    elements = "".join(f"{c_type(ty, name)}& {name} = {name}_p[i];\n"
                       for raw, ty, name in kernel.ins + kernel.outs if name in arrays)
    typedefs = "".join(f"typedef {c} {k};\n" for k, c in types.items())
    return ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" + CUPY_FLOAT16 + CUPY_BFLOAT16
            + typedefs + kernel.preamble +
            f'\nextern "C" __global__ void {kernel.name}({", ".join(params)}, long long n) {{\n'
            + kernel.loop_prep +
            "\nfor (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;"
            " i += (long long)blockDim.x * gridDim.x) {\n" + elements + kernel.body + "\n}\n"
            + kernel.after_loop + "\n}\n")


def _raw_source(fast_cupy, monkeypatch, name: str, source: str, **types) -> str:
    """The CUDA source of raw kernel ``name`` that xpcnn.ops.fast_cupy would compile for
    ``types``."""
    sources = []

    class Capture:
        def __init__(self, code: str, kernel_name: str) -> None:
            sources.append(code)

    monkeypatch.setattr(fast_cupy.cupy, "RawKernel", Capture)
    monkeypatch.setattr(fast_cupy, "_RAW_KERNELS", {})
    fast_cupy._raw_kernel(name, source, **types)
    return sources[0]


@pytest.mark.parametrize("labels, targets, weights", [
    ("uint8", None, None), ("int32", None, "float32"), ("int64", None, "float64"),
    (None, "float32", None), (None, "float16", "float32"), (None, "bfloat16", "bfloat16"),
    (None, "float64", "float16")])
@pytest.mark.parametrize("logits, dtype, scale", [("float16", "float16", "float16"),
                                                  ("float16", "float16", "float32"),
                                                  ("float32", "float32", "float32"),
                                                  ("float16", "float32", "float32"),
                                                  ("float16", "float64", "float32"),
                                                  ("bfloat16", "float32", "float32"),
                                                  ("float64", "float64", "float64")])
def test_softmax_cross_entropy_kernel_compiles(fast_cupy, cuda_reductions, monkeypatch, logits,
                                               dtype, scale, labels, targets, weights):
    """The loss kernels of the source (a row a thread, a row a warp), with their NaN for a
    label that is no class (``nan("")`` in the accumulator type, float for half logits), for
    every label dtype fit passes them, one-hot (probability) rows and sample weights of every
    floating dtype (the unread ones typed as fast_cupy types them), the float16 loss scale
    read from its float32 state,
    float16 logits read for a wider loss (mixed precision), and the rows' sums by the last
    block; their shared memory within a block's 48 KB (machine code, ptxas's check)."""
    acc = "float64" if dtype == "float64" else "float32"
    source = _raw_source(fast_cupy, monkeypatch, "xpcnn_softmax_cross_entropy",
                         cuda_reductions.SOFTMAX_CROSS_ENTROPY_SOURCE, Z=logits,
                         L=labels or "int32", Y=targets or dtype, W=weights or acc,
                         C=weights or dtype, T=dtype, U=scale, A=acc)  # (C: class weights)
    code, log = _compile(source, "xpcnn_softmax_cross_entropy", 90)
    assert code == 0, log
    for name in ("xpcnn_softmax_cross_entropy", "xpcnn_softmax_cross_entropy_rows"):
        assert_launchable(log, name, cuda_reductions.CROSS_ENTROPY_THREADS)
    given = (logits, dtype, scale, targets, weights)
    assert ("cuda_fp16.h" in source) == ("float16" in given)
    assert ("cuda_bf16.h" in source) == ("bfloat16" in given)


@pytest.mark.parametrize("logits, dtype", [("float32", "float32"), ("float16", "float32"),
                                           ("bfloat16", "float32"), ("float64", "float64"),
                                           ("float16", "float64"), ("float16", "float16"),
                                           ("bfloat16", "bfloat16")])
def test_softmax_kernels_compile(fast_cupy, cuda_reductions, monkeypatch, logits, dtype):
    """The inference softmax (a row a thread, a row a warp): logits of each dtype read as
    their cast to the parameters' dtype gives them, computed in float (double for float64)."""
    acc = "float64" if dtype == "float64" else "float32"
    source = _raw_source(fast_cupy, monkeypatch, "xpcnn_softmax",
                         cuda_reductions.SOFTMAX_SOURCE, Z=logits, T=dtype, A=acc)
    code, log = _compile(source, "xpcnn_softmax", 90)
    assert code == 0, log
    for name in ("xpcnn_softmax", "xpcnn_softmax_rows"):
        assert_launchable(log, name, cuda_reductions.CROSS_ENTROPY_THREADS)


@pytest.mark.parametrize("dtype", ["__half", "float", "double"])
def test_gradient_check_kernel_compiles(cuda_updates, dtype):
    """The first kernel of a step's record: a gradient element of each dtype read in double,
    its array's mark in the float64 state set where it is bad."""
    source = _elementwise_as_kernel(cuda_updates.CHECK_GRADIENTS, {"T": dtype, "F": "double"})
    code, log = _compile(source, "xpcnn_check_gradients", 90)
    assert code == 0, log


@pytest.mark.parametrize("stats", ["__half", "float", "double"])
@pytest.mark.parametrize("name", ["cuda_updates.RECORD_STEP", "cuda_updates.RECORD_STEP_AT"])
def test_record_step_kernels_compile(fast_cupy, name, stats):
    """The second: the step's number by value or from a float64 device scalar, the batch's
    [loss, correct] in each dtype the loss gives them."""
    kernel = _kernel(name)
    source = _elementwise_as_kernel(kernel, {"S": stats, "F": "double", "P": "double"})
    code, log = _compile(source, kernel.name, 90)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float16", "float", "double"])
@pytest.mark.parametrize("name", ["cuda_updates.SGD", "cuda_updates.SGD_AT", "cuda_updates.ADAM",
                                  "cuda_updates.ADAM_AT", "cuda_updates.RMSPROP",
                                  "cuda_updates.RMSPROP_AT"])
def test_update_kernels_compile(fast_cupy, name, dtype):
    """The optimisers' fused updates (the parameters' dtypes: CuPy's float16 class too, a
    user's optimiser on float16 parameters), the step's numbers by value or read from device
    scalars, every parameter found through the table, gated by ``apply``."""
    kernel = _kernel(name)
    code, log = _compile(_elementwise_as_kernel(kernel, {"T": dtype}), kernel.name, 90)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("name", ["cuda_updates.ADAM_SCALARS", "cuda_updates.ADAM_SCALARS_AT"])
def test_adam_scalars_kernels_compile(fast_cupy, name, dtype):
    """Adam's numbers from its count of applied updates, the learning rate by value or read
    from a float64 device scalar, written in the parameters' dtype."""
    kernel = _kernel(name)
    code, log = _compile(_elementwise_as_kernel(kernel, {"T": dtype}), kernel.name, 90)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["__half", "float", "double"])
def test_random_numbers_kernel_compiles(cuda_random, dtype):
    """Numbers in [0, 1) of the draw, counted by the last block (as dropout's)."""
    source = _elementwise_as_kernel(cuda_random.UNIFORM, {"T": dtype}, arrays=("u",))
    code, log = _compile(source, "xpcnn_uniform", 90)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["__half", "float", "double"])
def test_dropout_kernel_compiles(cuda_random, dtype):
    """Dropout in one launch: the random bits' device functions, the number compared in the
    data's type (CuPy's float16 compares as ``__half`` does), the mask and the product, and the
    draw counted by the last block (a barrier, fences and a 64-bit atomic add)."""
    source = _elementwise_as_kernel(cuda_random.DROPOUT, {"T": dtype}, arrays=("x", "y", "keep"))
    code, log = _compile(source, "xpcnn_dropout", 90)
    assert code == 0, log


@pytest.mark.parametrize("source, target", [("unsigned char", "float"),
                                            ("unsigned char", "__half"), ("float", "float"),
                                            ("double", "double")])
@pytest.mark.parametrize("name", ["cuda_random.RANDOM_FLIP", "cuda_random.RANDOM_CROP"])
def test_random_flip_and_crop_kernels_compile(fast_cupy, name, source, target):
    """A flip or a crop in one launch: the draw's random bits for each element's image, the
    model's uint8 batch cast as it is read, the draw counted by the last block."""
    kernel = _kernel(name)
    source_code = _elementwise_as_kernel(kernel, {"S": source, "T": target}, arrays=("out",))
    code, log = _compile(source_code, kernel.name, 90)
    assert code == 0, log


@pytest.mark.parametrize("source, compute, target", [
    ("unsigned char", "float", "float"), ("unsigned char", "float", "__half"),
    ("float", "double", "double"), ("__half", "float", "__half")])
def test_normalize_kernel_compiles(cuda_elementwise, source, compute, target):
    """A Normalization layer in one launch: the cast, the channel's shift and scale."""
    source_code = _elementwise_as_kernel(cuda_elementwise.NORMALIZE,
                                         {"S": source, "T": compute, "U": target},
                                         arrays=("x", "y"))
    code, log = _compile(source_code, "xpcnn_normalize", 90)
    assert code == 0, log


@pytest.mark.parametrize("source, target", [("float", "__half"), ("double", "float"),
                                            ("__half", "float")])
def test_cast_all_kernel_compiles(cuda_updates, source, target):
    """Many arrays cast in one launch (a mixed-precision forward pass's weights)."""
    source_code = _elementwise_as_kernel(cuda_updates.CAST_ALL, {"S": source, "U": target})
    code, log = _compile(source_code, "xpcnn_cast_all", 90)
    assert code == 0, log


@pytest.mark.parametrize("name", ["cuda_updates.SNAPSHOT", "cuda_updates.RESTORE"])
def test_statistics_kernels_compile(fast_cupy, name):
    """A training step's normalisation statistics kept, then put back where it is skipped:
    their bytes found through a table of addresses, in one launch each."""
    kernel = _kernel(name)
    source = _elementwise_as_kernel(kernel, {"uint8": "unsigned char"})
    code, log = _compile(source, kernel.name, 90)
    assert code == 0, log


@pytest.mark.parametrize("data, grad", [("__half", "__half"), ("__half", "float"),
                                        ("float", "float"), ("double", "double")])
def test_max_pool_backward_kernel_compiles(cuda_elementwise, data, grad):
    """The pool's gradient, with the gradient of a ReLU before the pool in the same launch
    (``relu``), for a gradient of the data's dtype or a wider one."""
    source = _elementwise_as_kernel(cuda_elementwise.MAX_POOL_BACKWARD, {"T": data, "G": grad},
                                    arrays=("yv", "g"))
    code, log = _compile(source, "xpcnn_max_pool_backward", 90)
    assert code == 0, log


@pytest.mark.parametrize("data, grad", [("__half", "__half"), ("__half", "float"),
                                        ("float", "float"), ("double", "double")])
def test_pooling_kernels_compile(cuda_elementwise, data, grad):
    """Max and average pools reading their padding in place (-inf, 0), their gradients
    gathered per input element (the max pool's looking for each window's first maximum, with
    the gradient of a ReLU before the pool), GlobalAvgPool2D's gradient written whole; the
    data's dtype and a wider one (a gradient, AvgPool2D's inverse counts)."""
    for kernel, types, arrays in [
            (cuda_elementwise.MAX_POOL, {"T": data}, ("y",)),
            (cuda_elementwise.MAX_POOL_GATHER_BACKWARD, {"T": data, "G": grad}, ("dx",)),
            (cuda_elementwise.AVG_POOL, {"T": data, "I": grad}, ("y",)),
            (cuda_elementwise.AVG_POOL_BACKWARD, {"G": data, "I": grad}, ("dx",)),
            (cuda_elementwise.GLOBAL_AVG_POOL_BACKWARD, {"G": grad}, ("dx",))]:
        code, log = _compile(_elementwise_as_kernel(kernel, types, arrays=arrays), kernel.name,
                             90)
        assert code == 0, log


@pytest.mark.parametrize("dtype, relu", [("__half", "__half"), ("float", "float"),
                                         ("double", "double"), ("float", "__half")])
def test_mask_multiply_relu_kernel_compiles(cuda_elementwise, dtype, relu):
    """A dropout's gradient with the gradient of the ReLU before it, in one launch."""
    source = _elementwise_as_kernel(cuda_elementwise.MASK_MULTIPLY_RELU, {"T": dtype, "Y": relu},
                                    arrays=("x", "m", "r", "y"))
    code, log = _compile(source, "xpcnn_mask_multiply_relu", 90)
    assert code == 0, log


@pytest.mark.parametrize("source, compute, target", [
    ("unsigned char", "float", "float"), ("unsigned char", "float", "__half"),
    ("unsigned char", "__half", "__half"), ("unsigned char", "double", "double"),
    ("__half", "__half", "__half"), ("float", "float", "float")])
def test_rescale_kernel_compiles(cuda_elementwise, source, compute, target):
    """A model's uint8 batch cast, scaled and shifted in one launch (a Rescaling first layer),
    computed in one type and stored in another (mixed precision's compute dtype)."""
    source_code = _elementwise_as_kernel(cuda_elementwise.RESCALE,
                                         {"S": source, "T": compute, "U": target},
                                         arrays=("x", "y"))
    code, log = _compile(source_code, "xpcnn_rescale", 90)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("name, arrays", [
    ("cuda_elementwise.ADD_RELU", ("a", "b", "y")),
    ("cuda_elementwise.ADD_RELU_BACKWARD", ("a", "b", "y", "dx"))])
def test_add_relu_kernels_compile(fast_cupy, name, arrays, dtype):
    """An Add layer with the ReLU after it fused, each way in one launch (backward summing
    the gradients of an output read twice); CuPy's float16 class below."""
    kernel = _kernel(name)
    code, log = _compile(_elementwise_as_kernel(kernel, {"T": dtype}, arrays=arrays),
                         kernel.name, 90)
    assert code == 0, log


# (the statistics' dtype, the data's: float16 or bfloat16 under mixed precision)
@pytest.mark.parametrize("dtype, io", [("float16", "float16"), ("float32", "float32"),
                                       ("float64", "float64"), ("float32", "float16"),
                                       ("float32", "bfloat16")])
@pytest.mark.parametrize("arch", [75, 90])
def test_feature_norm_kernels_compile(fast_cupy, cuda_reductions, monkeypatch, dtype, io, arch):
    """FeatureNorm in one launch each way: a block's chunk of channels, its tree over groups
    of rows in shared memory, the square root, the sums and the statistics in the accumulator
    type (float for __half), xhat recomputed from them backward, the input, output and
    gradients read and written in ``io``."""
    acc = "float64" if dtype == "float64" else "float32"
    for name, source, types in [
            ("xpcnn_feature_norm", cuda_reductions.FEATURE_NORM_SOURCE, {"X": io, "T": dtype,
                                                                   "Y": io}),
            ("xpcnn_feature_norm_backward", cuda_reductions.FEATURE_NORM_BACKWARD_SOURCE,
             {"D": io, "X": io})]:
        code, log = _compile(_raw_source(fast_cupy, monkeypatch, name, source, A=acc, **types),
                             name, arch)
        assert code == 0, log
        assert_launchable(log, name, cuda_reductions.FEATURE_NORM_THREADS)


# Today's kernels with CuPy's float16 class where a placeholder is float16 at run time (mixed
# precision: float16 logits for a float32 loss, float16 activations and gradients).
CUPY_FLOAT16_CASES = [
    ("cuda_elementwise.MAX_POOL_BACKWARD", {"T": "float16", "G": "float16"}, ("yv", "g")),
    ("cuda_elementwise.MAX_POOL_BACKWARD", {"T": "float16", "G": "float"}, ("yv", "g")),
    ("cuda_elementwise.MASK_MULTIPLY_RELU", {"T": "float16", "Y": "float16"},
     ("x", "m", "r", "y")),
    ("cuda_elementwise.MASK_MULTIPLY_RELU", {"T": "float", "Y": "float16"},
     ("x", "m", "r", "y")),
    ("cuda_elementwise.RESCALE", {"S": "unsigned char", "T": "float16", "U": "float16"},
     ("x", "y")),
    ("cuda_elementwise.RESCALE", {"S": "unsigned char", "T": "float", "U": "float16"}, ("x", "y")),
    ("cuda_elementwise.RESCALE", {"S": "float16", "T": "float16", "U": "float16"}, ("x", "y")),
    ("cuda_random.DROPOUT", {"T": "float16"}, ("x", "y", "keep")),
    ("cuda_random.UNIFORM", {"T": "float16"}, ("u",)),
    ("cuda_random.RANDOM_FLIP", {"S": "unsigned char", "T": "float16"}, ("out",)),
    ("cuda_random.RANDOM_CROP", {"S": "unsigned char", "T": "float16"}, ("out",)),
    ("cuda_elementwise.NORMALIZE", {"S": "unsigned char", "T": "float", "U": "float16"},
     ("x", "y")),
    ("cuda_elementwise.ADD_RELU", {"T": "float16"}, ("a", "b", "y")),
    ("cuda_elementwise.ADD_RELU_BACKWARD", {"T": "float16"}, ("a", "b", "y", "dx")),
    ("cuda_elementwise.GLOBAL_AVG_POOL", {"T": "float16"}, ("y",)),
    ("cuda_elementwise.MAX_POOL", {"T": "float16"}, ("y",)),
    ("cuda_elementwise.MAX_POOL_GATHER_BACKWARD", {"T": "float16", "G": "float16"}, ("dx",)),
    ("cuda_elementwise.MAX_POOL_GATHER_BACKWARD", {"T": "float16", "G": "float"}, ("dx",)),
    ("cuda_elementwise.AVG_POOL", {"T": "float16", "I": "float"}, ("y",)),
    ("cuda_elementwise.AVG_POOL_BACKWARD", {"G": "float16", "I": "float"}, ("dx",)),
    ("cuda_elementwise.GLOBAL_AVG_POOL_BACKWARD", {"G": "float16"}, ("dx",)),
]


@pytest.mark.parametrize("name, types, arrays", CUPY_FLOAT16_CASES)
def test_kernels_compile_with_cupys_float16_class(fast_cupy, name, types, arrays):
    """CuPy's float16 is no __half: its values meet in float (no half arithmetic, no half
    comparisons, no overloads of their own), which a body written for __half may not build
    with."""
    kernel = _kernel(name)
    source = _elementwise_as_kernel(kernel, types, arrays=arrays)
    code, log = _compile(source, kernel.name, 90)
    assert code == 0, log


# The same kernels under mixed bfloat16, and those that meet it there besides: the weights'
# casts, and the hand-written convolutions where cuDNN has no plan (the tiled ones take no
# bfloat16: the direct ones run).
CUPY_BFLOAT16_CASES = [
    (name, {k: "bfloat16" if v == "float16" else v for k, v in types.items()}, arrays)
    for name, types, arrays in CUPY_FLOAT16_CASES] + [
    ("cuda_updates.CAST_ALL", {"S": "float", "U": "bfloat16"}, ()),
    ("cuda_updates.CAST_ALL", {"S": "bfloat16", "U": "float"}, ()),
    ("cuda_conv._CONV", {"T": "bfloat16"}, ("y",)),
]


@pytest.mark.parametrize("name, types, arrays", CUPY_BFLOAT16_CASES)
@pytest.mark.parametrize("arch", [75, 90])
def test_kernels_compile_with_cupys_bfloat16_class(fast_cupy, name, types, arrays, arch):
    """CuPy's bfloat16 as its float16: values that meet in float. On compute capability 7.5
    too, where cuda_bf16.h has no bfloat16 arithmetic of the GPU's own."""
    kernel = _kernel(name)
    source = _elementwise_as_kernel(kernel, types, arrays=arrays)
    code, log = _compile(source, kernel.name, arch)
    assert code == 0, log


@pytest.mark.parametrize("arch", [75, 90])
def test_direct_convolution_weight_gradient_compiles_for_bfloat16(fast_cupy, arch):
    """The direct kernel gradient, bfloat16 data and gradients, its float partial sums."""
    kernel = fast_cupy.cuda_conv._conv_weight_grad_kernel(4)
    source = _elementwise_as_kernel(kernel, {"T": "bfloat16", "G": "bfloat16", "P": "float"})
    code, log = _compile(source, kernel.name, arch)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("arch", [75, 90])
def test_kernel_gradient_parts_sum_compiles(fast_cupy, dtype, arch):
    """The kernel-gradient parts summed into the kernel's (K, kh*kw*C) layout and the bias
    beside it (float32 parts for float16, bfloat16 and float32 data, float64 for float64)."""
    kernel = fast_cupy.cuda_conv._SUM_PARTS
    source = _elementwise_as_kernel(kernel, {"P": dtype})
    code, log = _compile(source, kernel.name, arch)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float", "double"])
@pytest.mark.parametrize("arch", [75, 90])
def test_convolution_input_gradient_gather_compiles(fast_cupy, dtype, arch):
    """The input gradient of strided and over-padded convolutions (one input element a
    thread), with CuPy's float16 and bfloat16 classes (float accumulators) and float32 and
    float64 data."""
    kernel = fast_cupy.cuda_conv._CONV_INPUT_GRAD
    source = _elementwise_as_kernel(kernel, {"T": dtype}, arrays=("dx",))
    code, log = _compile(source, kernel.name, arch)
    assert code == 0, log


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", [75, 90])
def test_sum_of_squares_kernel_compiles(fast_cupy, cuda_reductions, monkeypatch, dtype, arch):
    """Every gradient's sum of squares in one launch (clipping by norm), in double: the tree
    over a block's threads in shared memory, the counter, the last block's sums a warp an
    array (warp shuffles)."""
    name = "xpcnn_sum_squares"
    source = _raw_source(fast_cupy, monkeypatch, name, cuda_reductions.SUM_SQUARES_SOURCE,
                         G=dtype)
    code, log = _compile(source, name, arch)
    assert code == 0, log
    assert_launchable(log, name, cuda_reductions.SQUARES_THREADS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("arch", [75, 90])
@pytest.mark.parametrize("name", ["xpcnn_sum_rows", "xpcnn_relu_sum_rows"])
def test_column_sum_kernel_compiles(fast_cupy, cuda_reductions, monkeypatch, dtype, arch, name):
    """A bias gradient in one launch (and a ReLU's gradient with it): cuda_fp16.h's __half
    read in float (the header only then) and written back from float, the fence, the
    unsigned atomicInc on the counter, the partials read through a volatile pointer."""
    acc = "float64" if dtype == "float64" else "float32"
    source = _raw_source(fast_cupy, monkeypatch, name, cuda_reductions.SUM_ROWS_SOURCE,
                         X=dtype, Y=dtype, A=acc)
    code, log = _compile(source, name, arch)
    assert code == 0, log
    assert_launchable(log, name, 32 * cuda_reductions.SUM_ROWS_LANES)
    assert ("cuda_fp16.h" in source) == (dtype == "float16")  # (CUDA's header where needed)
    assert ("cuda_bf16.h" in source) == (dtype == "bfloat16")



# (the statistics' dtype, the data's: float16 or bfloat16 under mixed precision)
@pytest.mark.parametrize("dtype, io", [("float16", "float16"), ("float32", "float32"),
                                       ("float64", "float64"), ("float32", "float16"),
                                       ("float32", "bfloat16")])
@pytest.mark.parametrize("arch", [75, 90])
def test_batch_norm_kernels_compile(fast_cupy, cuda_reductions, monkeypatch, dtype, io, arch):
    """BatchNorm in two launches each way: the last-block statistics (the trees over lanes,
    Chan's merge of counts, means and sums of squares, the running statistics written in
    place) and the column sums of the gradient with xhat and the ReLU's mask recomputed from
    the input, in the accumulator type (float for __half); then the elementwise launches, and
    those with the running statistics, with CuPy's float16 class where a type is float16."""
    acc = "float64" if dtype == "float64" else "float32"
    for name, source, types in [
            ("xpcnn_batch_norm_stats", cuda_reductions.BATCH_NORM_SOURCE, {"X": io}),
            ("xpcnn_batch_norm_sums", cuda_reductions.BATCH_NORM_BACKWARD_SOURCE,
             {"D": io, "X": io})]:
        code, log = _compile(_raw_source(fast_cupy, monkeypatch, name, source, T=dtype, A=acc,
                                         **types), name, arch)
        assert code == 0, log
        assert_launchable(log, name, 32 * cuda_reductions.SUM_ROWS_LANES)
    c_types = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float",
               "float64": "double"}
    t, x, a = c_types[dtype], c_types[io], c_types[acc]
    for kernel, types, arrays in [
            # (these two loop over their elements: raw arrays only)
            (cuda_reductions.BATCH_NORM_APPLY, {"X": x, "T": t, "A": a, "Y": x}, ()),
            (cuda_reductions.BATCH_NORM_DX, {"D": x, "X": x, "T": t, "A": a}, ()),
            (cuda_reductions.BATCH_NORM_RUNNING, {"X": x, "T": t, "Y": x}, ("x", "y")),
            (cuda_reductions.BATCH_NORM_RUNNING_DX, {"D": x, "X": x, "T": t}, ("dy", "x", "dx"))]:
        code, log = _compile(_elementwise_as_kernel(kernel, types, arrays=arrays), kernel.name,
                             arch)
        assert code == 0, log


@pytest.mark.parametrize("logits, targets", [
    ("float32", "int64"), ("float16", "int32"), ("bfloat16", "uint8"), ("float64", "int64"),
    ("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
    ("float64", "float64")])
@pytest.mark.parametrize("counts", ["float32", "float64", "float16", "bfloat16"])
def test_top_k_counts_kernel_compiles(fast_cupy, cuda_elementwise, monkeypatch, logits, targets,
                                      counts):
    """The top-k metrics' counts (a warp a row, shuffles, the last block's sum per k) for
    logits of each dtype, integer labels or one-hot rows (the unread pointer typed as
    fast_cupy types it), counts of every float dtype fast_cupy takes."""
    one_hot = targets.startswith(("float", "bfloat"))
    source = _raw_source(fast_cupy, monkeypatch, "xpcnn_top_k_counts",
                         cuda_elementwise.TOP_K_COUNTS_SOURCE, Z=logits,
                         L="int32" if one_hot else targets, Y=targets if one_hot else logits,
                         A="float64" if logits == "float64" else "float32", S=counts)
    code, log = _compile(source, "xpcnn_top_k_counts", 90)
    assert code == 0, log
    assert_launchable(log, "xpcnn_top_k_counts", cuda_elementwise.TOP_K_THREADS)
