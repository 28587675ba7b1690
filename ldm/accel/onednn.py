"""oneDNN kernels for the UNet on a CPU: convolutions on pre-packed weights for bf16 inference, and fp32 linear
layers (forward and backward) on oneDNN's matmul.

PyTorch's CPU convolution hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into its blocked
layout in every call: for SD1.5's UNet at 32x32 latents (batch 2, bf16), 98 weight reorders take ~17% of a
forward pass, most of it in the 1280-channel 3x3 convolutions at 8x8 and 4x4, where the reorder costs about as
much as the convolution. Inference calls the same weights with the same input shape again and again, so
:class:`ConvPacks` reorders each weight once per input shape and :class:`Conv2d` runs on that copy while
:func:`packed_convolutions` is active. The outputs are the same numbers (the same oneDNN kernel runs).

:class:`Conv2d` is ``nn.Conv2d`` (same parameters, state dict and numerics) outside that context;
:func:`ldm.accel.optimize` swaps the UNet's ``nn.Conv2d`` layers to it, and the accelerated UNet
(:class:`ldm.accel.unet.UNetModel`) activates the context only inside its cached bf16 inference call.

:class:`Linear` is ``nn.Linear`` (same parameters, state dict and numbers up to fp32 summation order) whose fp32
products on a CPU, in its forward and in both products of its backward, run on oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``) instead of the BLAS that ``F.linear`` calls: on the AMD EPYC of
bench/README.md that BLAS's fp32 GEMM ran at half of oneDNN's rate at 2048^3 and at 0.4-0.5x at SD's shapes, and an
fp32 training step of the width-128 UNet took 14% less time. bf16/fp16 (and autocast, which casts to them) keep
``F.linear``, which already reaches oneDNN. :class:`Conv2d`'s 1x1 convolutions of channels-last fp32 input run the
same way (a linear layer over the channels of the NHWC view). :func:`ldm.accel.optimize` swaps the UNet's
``nn.Linear`` layers to :class:`Linear`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["available", "linear_available", "linear_packing_available", "linear", "ConvPacks", "LinearPacks",
           "Conv2d", "Linear", "packed_convolutions", "packed_linears"]

_ACTIVE: contextvars.ContextVar[Optional["ConvPacks"]] = contextvars.ContextVar("ldm_conv_packs", default=None)
_ACTIVE_LINEAR: contextvars.ContextVar[Optional["LinearPacks"]] = contextvars.ContextVar("ldm_linear_packs",
                                                                                         default=None)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this PyTorch build can run bf16 convolutions on packed oneDNN weights."""
    try:
        return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    except (AttributeError, RuntimeError):
        return False


class ConvPacks:
    """Packed weights of a model's convolutions, one input shape per convolution (a new shape replaces the
    old pack). Tied to one set of weight values: make a new one when the weights change."""

    def __init__(self) -> None:
        self._packs: dict[int, tuple[tuple, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._packs)

    def __reduce__(self):  # a cache: copies and pickles start empty (packed tensors have no storage to copy)
        return (ConvPacks, ())

    def usable(self, conv: nn.Conv2d, x: torch.Tensor) -> bool:
        w = conv.weight
        return (x.device.type == "cpu" and w.dtype == torch.bfloat16 and x.dim() == 4
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and available())

    def conv2d(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` in bf16 on the packed weight (made on first use for this input shape)."""
        w, padding, stride, dilation = conv.weight, list(conv.padding), list(conv.stride), list(conv.dilation)
        key = (tuple(x.shape), w.data_ptr(), w._version)
        entry = self._packs.get(id(conv))
        if entry is None or entry[0] != key:
            self._packs.pop(id(conv), None)  # free the old pack first
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().to_mkldnn(), padding, stride, dilation,
                                                               conv.groups, list(x.shape))
            entry = self._packs[id(conv)] = (key, packed)
        bias = None if conv.bias is None else conv.bias.to(torch.bfloat16)
        return torch.ops.mkldnn._convolution_pointwise(x.to(torch.bfloat16), entry[1], bias, padding, stride,
                                                        dilation, conv.groups, "none", [None], None)


@contextlib.contextmanager
def packed_convolutions(packs: Optional[ConvPacks]) -> Iterator[None]:
    """Run every :class:`Conv2d` that can (CPU, bf16 weight, no grad on it) on ``packs``; None: no packing."""
    token = _ACTIVE.set(packs)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``; inside :func:`packed_convolutions` it runs on a packed copy of its bf16 weight. A 1x1
    convolution (stride 1, no padding, one group) of a channels-last fp32 input on a CPU is a linear layer over
    the channels of the NHWC view: it runs as :class:`Linear` does, on oneDNN's matmul (the output is the same
    channels-last tensor ``nn.Conv2d`` gives; torch's fp32 1x1 convolution takes its slow im2col + BLAS path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = _ACTIVE.get()
        if packs is not None and not torch.is_grad_enabled() and packs.usable(self, x):
            return packs.conv2d(self, x)
        if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and _onednn_fp32(x, self.weight)):
            weight = self.weight.reshape(self.out_channels, self.in_channels)  # a view for either layout
            return _LinearFunction.apply(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


@functools.lru_cache(maxsize=None)
def linear_packing_available() -> bool:
    """Whether this PyTorch build can run bf16 linear layers on packed oneDNN weights."""
    try:
        return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class LinearPacks:
    """Packed bf16 weights of a model's linear layers, one row count per layer (a new count replaces the old
    pack): oneDNN's bf16 matmul otherwise reorders the weight into its blocked (VNNI) layout in every call, which
    costs about as much as the product itself where few rows meet a large weight (SDXL's 1280-wide transformer
    blocks at 8x8 to 32x32 latents: 128 x 1280 -> 1280 took 2.1 ms packed against 6.5 ms in a one-off
    micro-benchmark, the same numbers). Tied to one set of weight values: make a new one when they change."""

    def __init__(self) -> None:
        self._packs: dict[int, tuple[tuple, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._packs)

    def __reduce__(self):  # a cache: copies and pickles start empty (packed tensors have no storage to copy)
        return (LinearPacks, ())

    def usable(self, layer: nn.Linear, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and layer.weight.dtype == torch.bfloat16 and x.dim() >= 2 and x.numel() > 0
                and linear_packing_available())

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` in bf16 on the packed weight (made on first use for this row count)."""
        w = layer.weight
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # oneDNN is slow on strided rows
        key = (x2.shape[0], w.data_ptr(), w._version)
        entry = self._packs.get(id(layer))
        if entry is None or entry[0] != key:
            self._packs.pop(id(layer), None)  # free the old pack first
            entry = self._packs[id(layer)] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), x2.shape[0]))
        bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(x2, entry[1], bias, "none", [], "")
        return out.view(*x.shape[:-1], w.shape[0])


@contextlib.contextmanager
def packed_linears(packs: Optional[LinearPacks]) -> Iterator[None]:
    """Run every :class:`Linear` that can (CPU, bf16 weight, no grad) on ``packs``; None: no packing."""
    token = _ACTIVE_LINEAR.set(packs)
    try:
        yield
    finally:
        _ACTIVE_LINEAR.reset(token)


@functools.lru_cache(maxsize=None)
def linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op (used for fp32 :class:`Linear` on a CPU)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN: fp32 input and weight on a CPU, autocast off (it would cast them),
    not inside torch.compile (which picks its own kernels), and the op in this build."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and linear_available())


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` on oneDNN (strided operands are fine: transposes are views)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` without autograd; fp32 on a CPU runs on oneDNN's matmul
    (blocked attention's q @ k^T: 2x the BLAS's speed at 128 x 4096 x 40 here, bench/README.md)."""
    if x.dim() == 2 and _onednn_fp32(x, weight):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class _LinearFunction(torch.autograd.Function):
    """fp32 linear whose three products (forward, input gradient, weight gradient) run on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _onednn_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(g2, weight.t(), None).view(ctx.x_shape)  # grad @ weight
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_linear(g2.t(), x2.t(), None)  # grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear``; with fp32 input and weight on a CPU (autocast off) its products run on oneDNN; inside
    :func:`packed_linears` (no grad, a bf16 weight) on a packed copy of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = _ACTIVE_LINEAR.get()
        if packs is not None and not torch.is_grad_enabled() and packs.usable(self, x):
            return packs.linear(self, x)
        if x.dim() >= 2 and _onednn_fp32(x, self.weight):
            return _LinearFunction.apply(x, self.weight, self.bias)
        return super().forward(x)
