"""Convolutions on pre-packed oneDNN weights, for the UNet's bf16 inference on a CPU.

PyTorch's CPU convolution hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into its blocked
layout in every call: for SD1.5's UNet at 32x32 latents (batch 2, bf16), 98 weight reorders take ~17% of a
forward pass, most of it in the 1280-channel 3x3 convolutions at 8x8 and 4x4, where the reorder costs about as
much as the convolution. Inference calls the same weights with the same input shape again and again, so
:class:`ConvPacks` reorders each weight once per input shape and :class:`Conv2d` runs on that copy while
:func:`packed_convolutions` is active. The outputs are the same numbers (the same oneDNN kernel runs).

:class:`Conv2d` is ``nn.Conv2d`` (same parameters, state dict and numerics) outside that context; the UNet
uses it and activates the context only inside its cached bf16 inference call (``UNetModel.forward``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["available", "ConvPacks", "Conv2d", "packed_convolutions"]

_ACTIVE: contextvars.ContextVar[Optional["ConvPacks"]] = contextvars.ContextVar("ldm_conv_packs", default=None)


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
    """``nn.Conv2d``; inside :func:`packed_convolutions` it runs on a packed copy of its bf16 weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = _ACTIVE.get()
        if packs is not None and not torch.is_grad_enabled() and packs.usable(self, x):
            return packs.conv2d(self, x)
        return super().forward(x)
