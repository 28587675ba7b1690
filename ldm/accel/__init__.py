"""The acceleration pass: CPU fast paths put onto a plain model by one call, :func:`optimize`.

``ldm.models`` holds plain PyTorch (``nn.Linear``, ``nn.Conv2d``, a GroupNorm with the reference's fp32 upcast,
SDPA attention). On a CPU :func:`optimize` gives every UNet in the model:

- fp32 linear layers (forward and backward) and channels-last 1x1 convolutions on oneDNN's matmul
  (:mod:`ldm.accel.onednn`: :class:`~ldm.accel.onednn.Linear`, :class:`~ldm.accel.onednn.Conv2d`);
- attention layers that take the cache-blocked kernel (``"blocked"``) and pick it, or the reference math, for
  bf16 by shape under ``"auto"`` (:mod:`ldm.accel.attention`);
- for bf16 (``precision`` "bf16" or None): GroupNorm on the bf16 activations, and inference under bf16 autocast
  on a cached bf16 copy of the weights with convolutions on packed oneDNN weights (:mod:`ldm.accel.unet`).

Each path checks at call time whether it applies (device, dtype, autocast, autograd) and otherwise runs the plain
layer's code. The VAE and the text encoder have no CPU fast path: they are left as they are.

How: the pass swaps each module's class in place (``module.__class__ = Accelerated``) to a subclass of its plain
class that only overrides ``forward`` (and, for attention, the kernel choice). Chosen over the alternatives
because it keeps the modules themselves: parameter names, values and identity (an optimizer built before keeps
working, ``state_dict()`` and a safetensors save are byte-for-byte the same), the module tree (``isinstance(m,
nn.Linear)`` still holds, so a LoRA that looks for ``nn.Linear`` finds the layers), and it is undone by swapping
back (:func:`restore`). Forward hooks cannot replace a layer's computation (only its inputs or output, after the
plain forward ran), and wrapping modules would rename every parameter. Only modules whose type is exactly the
plain class are swapped, so a subclass (a LoRA layer, a layer of another library) keeps its own forward.

Adapters: what the pass caches is keyed by the tensors it was made from (their storage and ``_version``, and
the parameter names), so a weight changed in place (``W += B @ A`` of a merged LoRA, ``load_state_dict``, an
optimizer step), moved, or a layer replaced or wrapped after :func:`optimize` is picked up by the next call: the
bf16 copy and the packed convolutions are made again. A layer added after :func:`optimize` runs its own forward
until :func:`optimize` is called again.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ldm.models import attention as plain_attention
from ldm.models import unet as plain_unet

from . import attention, onednn, unet

__all__ = ["PRECISIONS", "optimize", "restore", "store_weights_in_", "unets"]

PRECISIONS = (None, "auto", "autocast", "fp32", "bf16", "fp16")

# plain class -> accelerated subclass, by the precision they serve
_CPU = {nn.Linear: onednn.Linear, nn.Conv2d: onednn.Conv2d,
        plain_attention.CrossAttention: attention.CrossAttention, plain_unet.AttentionBlock: attention.AttentionBlock}
_CPU_BF16 = {plain_unet.GroupNorm32: unet.GroupNorm32, plain_unet.UNetModel: unet.UNetModel}
_PLAIN = {accelerated: plain for plain, accelerated in {**_CPU, **_CPU_BF16}.items()}


def unets(model: nn.Module) -> list[plain_unet.UNetModel]:
    """The :class:`ldm.models.unet.UNetModel` modules in ``model`` (``model`` itself if it is one)."""
    return [m for m in model.modules() if isinstance(m, plain_unet.UNetModel)]


def _swaps(device: torch.device, precision: Optional[str]) -> dict[type, type]:
    if device.type != "cpu":
        return {}
    return {**_CPU, **(_CPU_BF16 if precision in (None, "auto", "autocast", "bf16") else {})}


def optimize(model: nn.Module, device: Union[str, torch.device, None] = None, precision: Optional[str] = None,
             *, enabled: bool = True) -> nn.Module:
    """Put the fast paths for ``device`` and ``precision`` onto every UNet in ``model`` (a ``LatentDiffusion``, a
    training module, a bare ``UNetModel``); in place, returns ``model``.

    device: where the model will run ("cpu", "cuda", a torch.device); None: the device of its first parameter.
        Only the CPU has fast paths here; for another device the model is left plain (what an earlier call
        added is taken off).
    precision: the precision it will run in: "fp32" or "fp16" (the fp32 oneDNN products and the attention
        kernels), "bf16" or None/"auto"/"autocast" (also the bf16 inference paths).
    enabled: False takes everything off again (:func:`restore`).

    Idempotent (a second call with the same arguments changes nothing), the state dict is unchanged, and a call
    with other arguments moves the model to what they ask for."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for ldm.accel.optimize: use one of "
                         f"{', '.join(map(str, PRECISIONS))}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    swaps = _swaps(torch.device(device), precision) if enabled else {}
    for net in unets(model):
        for module in net.modules():
            plain = _PLAIN.get(type(module), type(module))
            _swap(module, swaps.get(plain, plain))
        if net.attention_backend not in _backends(net):  # "blocked" after the attention layers went plain
            net.attention_backend = "math"
    return model


def restore(model: nn.Module) -> nn.Module:
    """Take :func:`optimize`'s fast paths off again: the plain classes, no caches. Attention layers set to
    ``"blocked"`` go to ``"math"`` (the same numbers). In place, returns ``model``."""
    return optimize(model, enabled=False)


def _backends(net: nn.Module) -> tuple[str, ...]:
    layer = next((m for m in net.modules() if isinstance(m, plain_attention.AttentionBackendMixin)), None)
    return plain_attention.BACKENDS if layer is None else layer.backends


def _swap(module: nn.Module, cls: type) -> None:
    if type(module) is cls:
        return
    for name in getattr(type(module), "ACCEL_ATTRIBUTES", ()):  # the caches and settings the old class added
        module.__dict__.pop(name, None)
    if isinstance(module, plain_attention.AttentionBackendMixin) and module.backend not in cls.backends:
        module.backend = "math"  # "blocked" computes math's numbers
    module.__class__ = cls


def store_weights_in_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Keep the UNets' conv and linear weights (and biases) in ``dtype`` itself, for inference under autocast to
    ``dtype``: they are what autocast would cast them to, so the outputs are the same, without a float32 copy
    beside them (half the UNet's memory in bf16/fp16, and no cast copy). Norms stay float32, as autocast runs
    them. In place, and lossy: the float32 values are gone (the state dict then holds ``dtype``). Returns
    ``model``."""
    for net in unets(model):
        if isinstance(net, unet.UNetModel):
            net.clear_weight_cache()
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                module.to(dtype)  # one module at a time: each float32 tensor is freed as it is replaced
    return model
