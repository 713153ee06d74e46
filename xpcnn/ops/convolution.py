"""The convolution seam: a layer's geometry, computed once at build, and the three operations of
a convolution (forward, input gradient, kernel gradient) on it, one implementation per engine.

Arrays at the seam are channels-last: images (N, H, W, C), output gradients (N, Ho, Wo, K), and
kernels (K, kh, kw, C), the layout cuDNN takes for NHWC images (filters "KRSC"). Engines:

- :class:`KernelsConv`: the chunked im2col + matmul loops of :mod:`xpcnn.ops.im2col` over a
  kernels object (:mod:`xpcnn.ops.kernels`): on
  :class:`~xpcnn.ops.kernels.StandardKernels` it is the standard Array API fallback, on the
  NumPy kernels the threaded CPU path, on the CuPy kernels im2col + cuBLAS.
- ``HandWrittenConv`` (:mod:`xpcnn.ops.cuda_conv`, CuPy only): xpcnn's own CUDA kernels, no
  im2col at all.
- ``CudnnConv`` (:mod:`xpcnn.ops.cudnn_conv`, CuPy only): cuDNN through NVIDIA's frontend.

A backend's kernels pick the engine per layer (``kernels.conv_engine(geometry, backend)``):
nothing process-wide decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import im2col, windows
from .windows import Pads
from .workspace import Workspace


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a 2-D convolution except the batch size: per-sample input (H, W) and
    channels C, filters K, kernel (kh, kw), strides, padding (top, bottom, left, right) and the
    output (Ho, Wo)."""

    in_hw: tuple[int, int]
    channels: int
    filters: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: Pads
    out_hw: tuple[int, int]

    @classmethod
    def of(cls, input_shape: tuple[int, int, int], filters: int, kernel: tuple[int, int],
           strides: tuple[int, int], padding: str | int) -> ConvGeometry:
        """The geometry of a layer with ``filters`` kernels over per-sample (H, W, C) inputs
        (``padding`` "valid", "same" or an int on every side)."""
        h, w, c = input_shape
        pads = windows.resolve_padding(padding, (h, w), kernel, strides)
        return cls((h, w), c, filters, kernel, strides, pads,
                   windows.output_size((h, w), kernel, strides, pads))

    @property
    def taps(self) -> int:
        """kh * kw * C: the length of one kernel row."""
        return self.kernel[0] * self.kernel[1] * self.channels

    def flops(self, n: int) -> int:
        """Multiply-adds times two of one forward pass over ``n`` images (the input and kernel
        gradients cost as much each)."""
        return 2 * n * self.out_hw[0] * self.out_hw[1] * self.filters * self.taps


class ConvEngine:
    """The three operations of a convolution on one geometry. ``w`` is (K, kh, kw, C) in the
    data's dtype; results are in the data's dtype, kernel and bias gradients in float32 at least
    where the engine accumulates them so."""

    name = "engine"
    kern: Any  # the kernels object whose primitives the engine's helpers use

    def __init__(self, geometry: ConvGeometry) -> None:
        self.geometry = geometry

    def forward(self, x: Any, w: Any, bias: Any | None, relu: bool) -> Any:
        """(N, H, W, C) -> (N, Ho, Wo, K): the convolution (+ bias, then ReLU with ``relu``)."""
        raise NotImplementedError

    def input_grad(self, dy: Any, w: Any) -> Any:
        """(N, Ho, Wo, K) output gradient -> (N, H, W, C) input gradient."""
        raise NotImplementedError

    def weight_grad(self, x: Any, dy: Any, with_bias: bool, relu_y: Any = None
                    ) -> tuple[Any, Any | None]:
        """Kernel gradient (K, kh, kw, C) and, ``with_bias``, the bias gradient (K,) (else None).
        With ``relu_y``, the (N, Ho, Wo, K) output of a ReLU applied by this convolution: the
        output gradient counts only where ``relu_y > 0``."""
        raise NotImplementedError

    def gradients(self, x: Any, dy: Any, w: Any, with_bias: bool, input_grad: bool,
                  relu_y: Any = None) -> tuple[Any, Any | None, Any | None]:
        """(kernel gradient, bias gradient or None, input gradient or None) of one backward
        pass: :meth:`weight_grad`, then :meth:`input_grad` where ``input_grad``. An engine may
        compute them together where that pays. With ``relu_y`` (see :meth:`weight_grad`) both
        read the output gradient where ``relu_y > 0``."""
        if relu_y is not None and input_grad:  # (masked once for both)
            dy, relu_y = self.kern.relu_backward(dy, relu_y), None
        dw, db = self.weight_grad(x, dy, with_bias, relu_y)
        return dw, db, self.input_grad(dy, w) if input_grad else None


class KernelsConv(ConvEngine):
    """The convolution through a kernels object's primitives: chunked im2col and matmuls;
    scratch in a :class:`~xpcnn.ops.workspace.Workspace` of its own."""

    def __init__(self, geometry: ConvGeometry, kern: Any, budget: int | None = None,
                 min_chunks: int = 8, keep_scratch: bool = True) -> None:
        super().__init__(geometry)
        self.kern = kern
        self.xp = kern.xp
        self.budget, self.min_chunks = budget, min_chunks
        self.workspace = Workspace(keep=keep_scratch)
        self.name = type(kern).__name__

    @classmethod
    def for_backend(cls, geometry: ConvGeometry, kern: Any, backend: Any) -> KernelsConv:
        """The engine of ``kern`` with the backend's chunking."""
        return cls(geometry, kern, backend.chunk_bytes, backend.min_chunks,
                   backend.keeps_scratch)

    def _matrix(self, w: Any) -> Any:
        """(K, kh, kw, C) -> the (kh*kw*C, K) kernel matrix (a transposed view where the
        namespace makes one)."""
        return self.xp.matrix_transpose(self.xp.reshape(w, (self.geometry.filters, -1)))

    def forward(self, x: Any, w: Any, bias: Any | None, relu: bool) -> Any:
        g = self.geometry
        y = im2col.conv_forward(self.xp, self.kern, x, self._matrix(w), bias, g.kernel, g.strides,
                             g.pads, g.out_hw, self.workspace, "cols", self.budget, relu=relu,
                             min_chunks=self.min_chunks)
        return self.xp.reshape(y, (x.shape[0], *g.out_hw, g.filters))

    def _as_kernel_layout(self, dw: Any) -> Any:
        """A (kh*kw*C, K) kernel-gradient matrix as (K, kh, kw, C)."""
        g = self.geometry
        return self.xp.reshape(self.xp.matrix_transpose(dw), (g.filters, *g.kernel, g.channels))

    def weight_grad(self, x: Any, dy: Any, with_bias: bool, relu_y: Any = None
                    ) -> tuple[Any, Any | None]:
        g, xp = self.geometry, self.xp
        rows = (-1, g.filters)
        dw, db = im2col.conv_weight_grad(
            xp, self.kern, x, xp.reshape(dy, rows), g.kernel, g.strides, g.pads, g.out_hw,
            self.workspace, "cols", self.budget, self.min_chunks, with_bias=with_bias,
            relu_y=None if relu_y is None else xp.reshape(relu_y, rows))
        return self._as_kernel_layout(dw), db

    def input_grad(self, dy: Any, w: Any) -> Any:
        g, xp = self.geometry, self.xp
        n = dy.shape[0]
        if im2col.input_grad_as_conv(g.pads, g.kernel, g.strides):
            return im2col.conv_input_grad(xp, self.kern, dy, im2col.flipped_kernel_matrix(xp, w),
                                       g.kernel, g.pads, g.in_hw, self.workspace, "dcols",
                                       self.budget, self.min_chunks)
        if getattr(self.kern, "phase_input_grad", False) and im2col.phase_input_grad_pays(
                g.kernel, g.strides, g.pads, g.in_hw, g.out_hw, g.channels, g.filters):
            return im2col.phase_input_grad(xp, self.kern, dy, w, g.kernel, g.strides, g.pads,
                                           g.in_hw, self.workspace, "dphase", self.budget,
                                           self.min_chunks)
        # Else (strided or over-padded; on the NumPy kernels, where the phases do not pay):
        # patch gradients scattered back (col2im). The
        # (K, kh*kw*C) matrix is the stored kernel itself, contiguous (a matmul against a
        # transposed view is several times slower on OpenBLAS). Where patches overlap, an
        # input's taps are multiplied and summed in the accumulator's dtype, rounded once.
        acc = (windows.accumulator(xp, dy.dtype) if windows.overlapping(g.kernel, g.strides)
               else dy.dtype)
        dy2, w2 = xp.reshape(dy, (-1, g.filters)), xp.reshape(w, (g.filters, -1))
        dcols = xp.reshape(self.kern.matmul(xp.astype(dy2, acc, copy=False),
                                            xp.astype(w2, acc, copy=False)),
                           (n, *g.out_hw, g.taps))
        (h, w_), (pt, pb, pl, pr) = g.in_hw, g.pads
        padded = (n, h + pt + pb, w_ + pl + pr, g.channels)
        dx = im2col.col2im(xp, dcols, padded, g.kernel, g.strides, g.out_hw)
        return xp.astype(windows.unpad(dx, g.pads), dy.dtype, copy=False)

    def gradients(self, x: Any, dy: Any, w: Any, with_bias: bool, input_grad: bool,
                  relu_y: Any = None) -> tuple[Any, Any | None, Any | None]:
        # Both gradients from the output gradient's patches alone where that pays (see
        # im2col.grads_share_patches).
        g = self.geometry
        if input_grad and im2col.grads_share_patches(g.pads, g.kernel, g.strides, g.in_hw,
                                                  g.out_hw, g.channels, g.filters):
            if relu_y is not None:
                dy = self.kern.relu_backward(dy, relu_y)
            return im2col.conv_grads(self.xp, self.kern, x, dy, w, g.pads, self.workspace,
                                  "dcols", self.budget, self.min_chunks, with_bias=with_bias)
        return super().gradients(x, dy, w, with_bias, input_grad, relu_y)
