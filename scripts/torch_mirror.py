"""Build the PyTorch twin of an xpcnn model: same layers, same weights, same random draws.

Used by the parity script and the benchmarks (PyTorch is a reference only, never a dependency of
xpcnn). The twin takes NHWC batches like xpcnn, works in NCHW inside, and flattens in (H, W, C)
order so that Dense weights copy over unchanged. Dropout and augmentation draw their random
numbers exactly as xpcnn does (:func:`xpcnn.ops.random.uniform` of [seed, calls]), so the two
runs see the same masks, crops and flips.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as compat_numpy
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import xpcnn
from xpcnn import layers as L
from xpcnn.ops.random import uniform


def _uniform(seed: int, calls: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    state = np.array([seed, calls], np.int64)
    return torch.from_numpy(uniform(compat_numpy, state, shape, numpy_dtype))


class _Random(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed, self.calls = seed, 0

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        u = _uniform(self.seed, self.calls, shape, dtype)
        self.calls += 1
        return u


class SharedDropout(_Random):
    def __init__(self, rate: float, seed: int) -> None:
        super().__init__(seed)
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        # xpcnn draws in its own NHWC layout: draw in that shape, then move to NCHW.
        shape = (x.shape[0], *x.shape[2:], x.shape[1]) if x.ndim == 4 else tuple(x.shape)
        keep = (self.draw(shape, x.dtype) >= self.rate).to(x.dtype)
        if x.ndim == 4:
            keep = keep.permute(0, 3, 1, 2)
        return x * keep / (1 - self.rate)


class SharedFlip(_Random):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        flip = (self.draw((x.shape[0], 1, 1, 1), torch.float32) < 0.5)
        return torch.where(flip, torch.flip(x, dims=(3,)), x)


class SharedCrop(_Random):
    def __init__(self, padding: int, seed: int) -> None:
        super().__init__(seed)
        self.p = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        p, (n, _, h, w) = self.p, x.shape
        u = self.draw((n, 2, 1, 1, 1), torch.float32)  # (xpcnn draws the batch on axis 0)
        offs = torch.floor(u * (2 * p + 1)).long().reshape(n, 2).T
        xpad = F.pad(x, (p, p, p, p))
        return torch.stack([xpad[i, :, offs[0, i]:offs[0, i] + h, offs[1, i]:offs[1, i] + w]
                            for i in range(n)])


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _pad_module(pads: tuple[int, int, int, int], value: float) -> nn.Module:
    top, bottom, left, right = pads
    return Lambda(lambda x: F.pad(x, (left, right, top, bottom), value=value))


def mirror_layer(layer: L.Layer, exact_random: bool = True) -> list[nn.Module]:
    """PyTorch modules computing the same function as one built xpcnn layer (NCHW inside).

    ``exact_random=False`` uses PyTorch's own dropout (for timing on a GPU, where drawing the
    masks on the host would be unfair to PyTorch)."""
    w = [torch.from_numpy(a.copy()) for a in layer.get_weights()]
    if isinstance(layer, L.Conv2D):
        kh, kw, cin, cout = w[0].shape  # Keras' layout
        top, bottom, left, right = layer.geometry.pads
        # Symmetric padding goes into the convolution itself (as a PyTorch user writes it);
        # only TensorFlow-style asymmetric "same" padding needs a separate pad.
        symmetric = top == bottom and left == right
        conv = nn.Conv2d(cin, cout, (kh, kw), stride=layer.strides, bias=layer.use_bias,
                         padding=(top, left) if symmetric else 0)
        with torch.no_grad():
            conv.weight.copy_(w[0].permute(3, 2, 0, 1))
            if layer.use_bias:
                conv.bias.copy_(w[1])
        act = [nn.ReLU()] if layer.activation == "relu" else []
        return [conv, *act] if symmetric else [_pad_module(layer.geometry.pads, 0.0), conv, *act]
    if isinstance(layer, L.Dense):
        lin = nn.Linear(*layer.params["kernel"].shape, bias=layer.use_bias)
        with torch.no_grad():
            lin.weight.copy_(w[0].T)
            if layer.use_bias:
                lin.bias.copy_(w[1])
        return [lin, nn.ReLU()] if layer.activation == "relu" else [lin]
    if isinstance(layer, L.ReLU):
        if layer.max_value == 0.0:  # (Hardtanh refuses max_val 0: zeros, a zero gradient)
            return [Lambda(lambda x: x.clamp(0.0, 0.0) * 0.0)]
        return [nn.ReLU()] if layer.max_value is None else [nn.Hardtanh(0.0, layer.max_value)]
    if isinstance(layer, L.MaxPool2D):
        pool = nn.MaxPool2d(layer.pool_size, layer.strides)
        return [_pad_module(layer.pads, -math.inf), pool] if any(layer.pads) else [pool]
    if isinstance(layer, L.AvgPool2D):
        top, bottom, left, right = layer.pads
        ph, pw = layer.pool_size
        # The mean over the real inputs of each window: PyTorch's count_include_pad=False,
        # which takes symmetric padding of at most half the window only.
        if top != bottom or left != right or 2 * top > ph or 2 * left > pw:
            raise NotImplementedError(f"AvgPool2D padded {layer.pads} (top, bottom, left, "
                                      "right) has no PyTorch twin here: nn.AvgPool2d pads "
                                      "symmetrically, by half the window at most")
        return [nn.AvgPool2d(layer.pool_size, layer.strides, padding=(top, left),
                             count_include_pad=False)]
    if isinstance(layer, L.GlobalAvgPool2D):
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if isinstance(layer, L.Flatten):
        return [Lambda(lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))]
    if isinstance(layer, L.FeatureNorm):
        return [nn.InstanceNorm2d(layer.input_shape[-1], eps=layer.eps)]
    if isinstance(layer, L.BatchNorm2D):
        c = layer.input_shape[-1]
        bn = (nn.BatchNorm2d if len(layer.input_shape) == 3 else nn.BatchNorm1d)(
            c, eps=layer.eps, momentum=layer.momentum)
        with torch.no_grad():
            bn.weight.copy_(w[0])
            bn.bias.copy_(w[1])
            bn.running_mean.copy_(w[2])
            bn.running_var.copy_(w[3])
        return [bn]
    if isinstance(layer, L.Dropout):
        return [SharedDropout(layer.rate, layer.seed) if exact_random else nn.Dropout(layer.rate)]
    if isinstance(layer, L.RandomFlip):
        return [SharedFlip(layer.seed)]
    if isinstance(layer, L.RandomCrop):
        return [SharedCrop(layer.padding, layer.seed)]
    if isinstance(layer, L.Rescaling):
        s, o = layer.scale, layer.offset
        return [Lambda(lambda x: x * s + o)]
    if isinstance(layer, L.Softmax):
        return []  # the loss takes logits, as xpcnn fuses softmax into cross-entropy
    if isinstance(layer, L.Add):
        return [Merge(lambda xs: sum(xs[1:], xs[0]))]
    if isinstance(layer, L.Concatenate):
        rank = len(layer.output_shape) + 1
        if rank not in (2, 4):
            raise NotImplementedError(f"no PyTorch twin for Concatenate of rank-{rank} tensors")
        # The twin's maps are NCHW: xpcnn's H, W, C axes (1, 2, 3) are its 2, 3, 1.
        dim = {1: 2, 2: 3, 3: 1}[layer.batch_axis] if rank == 4 else layer.batch_axis
        return [Merge(lambda xs: torch.cat(xs, dim=dim))]
    raise NotImplementedError(f"no PyTorch twin for {type(layer).__name__}")


class Merge(nn.Module):
    """A merge layer's twin: a function of the list of its inputs."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.fn(xs)


class GraphTwin(nn.Module):
    """The twin of a functional model: each layer's modules, run along the same graph."""

    def __init__(self, stages: list[nn.Sequential], inbound: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.inbound = inbound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x.permute(0, 3, 1, 2)]
        for stage, ins in zip(self.stages, self.inbound, strict=True):
            a = [values[i] for i in ins]
            values.append(stage(a) if len(a) > 1 else stage(a[0]))  # a merge takes a list
        return values[-1]


def mirror(model: xpcnn.Model, dtype: torch.dtype = torch.float32,
           exact_random: bool = True) -> nn.Module:
    """The PyTorch twin of a built model, taking NHWC input and returning logits: an
    ``nn.Sequential`` for a Sequential, a :class:`GraphTwin` for a functional Model."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # so copied weights are never rounded through float32
    try:
        stages = [mirror_layer(layer, exact_random) for layer in model.layers]
    finally:
        torch.set_default_dtype(previous)
    if not isinstance(model, xpcnn.Sequential):
        return GraphTwin([nn.Sequential(*m) for m in stages], model._inbound()).to(dtype)
    mods: list[nn.Module] = [Lambda(lambda x: x.permute(0, 3, 1, 2))]
    return nn.Sequential(*mods, *(m for ms in stages for m in ms)).to(dtype)


def mirror_optimizer(opt: xpcnn.optim.Optimizer, params) -> torch.optim.Optimizer:
    """The PyTorch optimiser with the same settings (constant learning rate)."""
    lr = opt.schedule(0)
    if isinstance(opt, xpcnn.optim.SGD):
        return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if isinstance(opt, xpcnn.optim.AdamW) else torch.optim.Adam
    return cls(params, lr=lr, betas=(opt.beta_1, opt.beta_2), eps=opt.epsilon,
               weight_decay=opt.weight_decay)
