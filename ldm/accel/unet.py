"""The UNet's bf16 inference path on a CPU: a cached bf16 copy of the weights, convolutions on packed oneDNN
weights, and GroupNorm on the bf16 activations.

:func:`ldm.accel.optimize` swaps a model's :class:`ldm.models.unet.UNetModel` to :class:`UNetModel` and its
:class:`ldm.models.unet.GroupNorm32` layers to :class:`GroupNorm32`; both keep their parameters (names, values,
identity) and are the plain classes' numbers outside CPU bf16 autocast inference.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models import unet

from . import attention, onednn

__all__ = ["GroupNorm32", "UNetModel"]

logger = logging.getLogger(__name__)


class GroupNorm32(unet.GroupNorm32):
    """:class:`ldm.models.unet.GroupNorm32` (fp32 upcast, as the reference), except under CPU bf16 autocast for
    inference: the norm then runs on the bf16 input directly, with the affine weights cast to bf16. The CPU kernel
    accumulates the statistics in fp32 (as the reference's upcast does) and this avoids two full copies and the
    slower mixed-dtype kernel. The output differs from the reference's by at most one bf16 rounding step, well
    inside autocast's own error. When autograd records the norm (training) the reference upcast runs: torch's bf16
    GroupNorm backward on channels-last input is the slower one (forward + backward at 128 channels, 32x32,
    batch 2: 1.7 ms against 0.7 ms). Everywhere else (fp32, CUDA, fp16) it is the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)
        return super().forward(x)


def _cast(p: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if p is None else p.to(dtype)


class UNetModel(unet.UNetModel):
    """:class:`ldm.models.unet.UNetModel` whose inference under CPU bf16 autocast (no grad) runs on a cached bf16
    copy of the conv and linear weights instead of letting autocast cast them again in every call (5 GB of memory
    traffic per SD1.5 forward; autocast's own cache only covers weights that require grad, and only within one
    autocast region). Norms keep their fp32 weights, as under autocast. The copy is remade when a weight changes
    (in-place update such as a merged LoRA, load, move, a layer replaced) and is freed by
    :meth:`clear_weight_cache`; set ``cache_cast_weights = False`` to never keep one. In that call the
    convolutions also run on weights packed once into oneDNN's layout (:mod:`ldm.accel.onednn`) instead of
    being reordered in every call (``pack_conv_weights = False`` to not keep these packs, which take as much
    memory as the bf16 conv weights), and so do the linear layers (``pack_linear_weights``); the packs live and
    go with the cached copy. The cross-attention layers' keys and values of the context are kept from one call
    to the next while the context stays the same (:class:`ldm.accel.attention.ContextProjections`;
    ``cache_context_projections = False`` to project it in every call); they go with the cached copy too.

    The cached call re-enters ``forward`` through :func:`torch.func.functional_call` with the cached tensors in
    place of the parameters, so the plain forward runs unchanged on them."""

    #: per-instance state this class adds; :func:`ldm.accel.restore` removes it
    ACCEL_ATTRIBUTES = ("cache_cast_weights", "pack_conv_weights", "pack_linear_weights",
                        "cache_context_projections", "_weight_cache", "_in_cached_call")
    cache_cast_weights = True
    pack_conv_weights = True
    pack_linear_weights = True
    cache_context_projections = True
    _weight_cache: Optional[tuple[tuple, dict[str, torch.Tensor], onednn.ConvPacks, onednn.LinearPacks,
                                  attention.ContextProjections]] = None
    _in_cached_call = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = self._cached_weights_dtype(x)
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        self._in_cached_call = True
        try:
            weights = self._cast_weights(dtype)
            context = args[1] if len(args) > 1 else kwargs.get("context")
            with onednn.packed_convolutions(self._weight_cache[2] if self.pack_conv_weights else None), \
                    onednn.packed_linears(self._weight_cache[3] if self.pack_linear_weights else None), \
                    attention.context_projections(
                        self._weight_cache[4] if self.cache_context_projections else None, context,
                        settings=self.pack_linear_weights):
                return torch.func.functional_call(self, weights, (x, *args), kwargs)
        finally:
            self._in_cached_call = False

    def clear_weight_cache(self) -> None:
        """Free the cached low-precision copy of the weights (it is rebuilt on the next autocast inference)."""
        self._weight_cache = None

    def _cached_weights_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """bf16 when this call may run on cached bf16 weights: CPU bf16 autocast, no grad, not already inside,
        not being traced by torch.compile (the cache and the packed conv weights are Python-side state that
        dynamo would guard on and recompile for; compiled code fuses the casts itself)."""
        if (not self.cache_cast_weights or self._in_cached_call or torch.is_grad_enabled()
                or torch.compiler.is_compiling()
                or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16):
            if not self.cache_cast_weights:
                self._weight_cache = None
            return None
        return torch.bfloat16

    def _cast_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Low-precision copies of the conv and linear weights (what autocast would cast); norms keep theirs."""
        params = [(f"{prefix}.{name}" if prefix else name, p) for prefix, module in self.named_modules()
                  if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
                  for name, p in module.named_parameters(recurse=False)]
        key = (dtype, tuple((name, p.data_ptr(), p._version) for name, p in params))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = None  # drop the stale copy before making the new one
            self._weight_cache = (key, {name: p.detach().to(dtype) for name, p in params}, onednn.ConvPacks(),
                                  onednn.LinearPacks(), attention.ContextProjections())
            logger.debug("cached %s copies of %d UNet weights", dtype, len(params))
        return self._weight_cache[1]
