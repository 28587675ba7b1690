"""Attention on a CPU: the cache-blocked kernel (``"blocked"``) and the CPU choice among kernels for ``"auto"``.

:func:`attention` is :func:`ldm.models.attention.attention` with two additions:

- ``"blocked"``: the same numbers as ``"math"``, one head and a cache-sized block of query rows at a time. Without a
  mask it runs on the compiled fused kernel of :mod:`ldm.accel.cpu_kernels` where that is available (x86 with
  AVX-512 BF16 and a C++ compiler: scores, softmax and the product with v of a block of rows in one pass, one
  parallel region per call; bf16 and fp32, in training with the kernel's own backward), else in
  Python blocks (faster than torch's CPU flash kernel for bf16 inference at one thread; no backward of their own);
- ``"auto"`` on a CPU: the fused kernel wherever it is available and takes the tensors (``USE_CPU_KERNELS``; it was
  2-3.7x sdpa in bf16 and 0.99-1.6x in fp32 at the SD shapes measured, at 1 and 2 threads; bench/README.md).
  Without it, for bf16: where torch's flash kernel has a high fixed cost, the Python blocks with at least
  ``BLOCKED_MIN_KEYS`` keys or ``BLOCKED_MIN_SCORES`` scores per head (self-attention over a feature map, text
  attention at 4096 pixels) when torch runs at most ``BLOCKED_MAX_THREADS`` threads (one), sdpa (torch's flash
  kernel) there with more threads, math below that; in training, math up to ``MATH_MAX_SCORES`` scores per head.
  With several threads the Python blocks' many small calls (four per block of query rows and head) each open and
  join an OpenMP parallel region, and on a CPU shared with other work each join waits for a descheduled thread,
  while the flash kernel is one parallel region per call (2 threads, a loaded 2-core VM: 1.5-1.8 s against 0.10 s
  per layer at SDXL's 1024 tokens, batch 2).
  Everything else as the model's ``"auto"`` (xformers on CUDA when installed, else sdpa). (Measured per layer
  shape in bench/README.md.)

:func:`ldm.accel.optimize` swaps the model's attention layers to :class:`CrossAttention` /
:class:`AttentionBlock`, whose :meth:`attend` calls this :func:`attention` and which accept ``"blocked"``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

from ldm.models import attention as base
from ldm.models import unet

from . import cpu_kernels, onednn

__all__ = ["BACKENDS", "attention", "AcceleratedAttention", "ContextProjections", "CrossAttention", "AttentionBlock",
           "context_projections"]

BACKENDS = base.BACKENDS + ("blocked",)
BLOCKED_MIN_KEYS = 256
BLOCKED_MIN_SCORES = 1 << 18  # queries x keys per head
MATH_MAX_SCORES = 1 << 16
BLOCKED_MAX_THREADS = 1  # torch threads up to which "auto" takes blocked (above: sdpa)
USE_CPU_KERNELS = True  # "blocked" runs on the compiled fused kernel where it can (False: the Python blocks)
_BLOCK_SCORES = 1 << 19  # fp32 scores per block (2 MiB): a block's scores and probabilities stay in cache


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``"math"`` kernel's numbers (fp32 scores and softmax, probabilities cast to v's dtype for the second
    product), one head and a block of query rows at a time, so each block's scores stay in the CPU cache: on the
    compiled fused kernel without a mask where it is available (:func:`_fused`; bf16 or fp32, with its own backward
    in training), else in Python blocks whose q @ k^T runs on oneDNN's fp32 matmul (:func:`onednn.linear`). With bf16 q, k, v on a CPU the Python blocks
    are ~1.75x faster than torch's CPU flash kernel at SD's 4096 tokens at one thread, the fused kernel 2.4x
    (bench/README.md)."""
    if mask is None and _fused(q, k, v):
        return cpu_kernels.attention(q, k, v)  # with its own backward under autograd
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return base.KERNELS["math"](q, k, v, mask)  # the blocks are written in place, which autograd cannot follow
    b, h, n, d = q.shape
    rows = max(16, _BLOCK_SCORES // max(k.shape[2], 1))
    with torch.autocast(device_type=q.device.type, enabled=False):
        # contiguous: with batch 1 the reshapes are views of the heads-interleaved projections, and oneDNN's
        # matmul on such row strides is ~1000x slower (SDXL, 1024 tokens: 2.8 s instead of 4.7 ms per head)
        qf = (q.float() * d ** -0.5).reshape(b * h, n, d).contiguous()
        kf = k.float().expand(b, h, -1, -1).reshape(b * h, -1, d).contiguous()
        vv = v.expand(b, h, -1, -1).reshape(b * h, -1, v.shape[-1])
        if mask is not None:
            mask = mask.expand(b, h, n, k.shape[2]).reshape(b * h, n, k.shape[2])
        out = torch.empty(b * h, n, v.shape[-1], dtype=v.dtype, device=v.device)
        for i in range(b * h):
            for start in range(0, n, rows):
                scores = onednn.linear(qf[i, start:start + rows], kf[i])  # q @ k^T, on oneDNN on a CPU
                if mask is not None:
                    m = mask[i, start:start + rows]
                    scores = scores.masked_fill(~m, -torch.finfo(scores.dtype).max) if m.dtype == torch.bool \
                        else scores + m.float()
                torch.mm(scores.softmax(dim=-1).to(v.dtype), vv[i], out=out[i, start:start + rows])
    return out.reshape(b, h, n, v.shape[-1])


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled fused kernel (:mod:`ldm.accel.cpu_kernels`) takes these tensors (bf16 or fp32, with
    autograd on its own backward)."""
    if not USE_CPU_KERNELS:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return cpu_kernels.trains(q, k, v) and cpu_kernels.available()
    return cpu_kernels.fits(q, k, v) and cpu_kernels.available()


def _cpu_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[str]:
    """The kernel ``"auto"`` takes on a CPU: the fused kernel where it takes the tensors, else a choice for bf16;
    None elsewhere (the model's own ``"auto"`` then)."""
    if q.device.type != "cpu":
        return None
    if mask is None and _fused(q, k, v):
        return "blocked"  # on the fused kernel: as fast as sdpa or faster at every shape measured, any threads
    if q.dtype != torch.bfloat16:
        return None
    queries, keys = q.shape[2], k.shape[2]
    if not torch.is_grad_enabled():
        if keys >= BLOCKED_MIN_KEYS or queries * keys >= BLOCKED_MIN_SCORES:
            return "blocked" if torch.get_num_threads() <= BLOCKED_MAX_THREADS else None
        return "math"
    return "math" if queries * keys <= MATH_MAX_SCORES else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa",
              slice_size: Optional[int] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`ldm.models.attention.attention` (same arguments), plus ``"blocked"`` and the CPU ``"auto"``."""
    base._check_backend(backend, slice_size, BACKENDS)
    if backend == "auto":
        backend = _cpu_choice(q, k, v, mask) or "auto"
    if backend != "blocked":
        return base.attention(q, k, v, backend=backend, slice_size=slice_size, mask=mask)
    return base.sliced_attention(_blocked, q, k, v, mask=mask, slice_size=slice_size)


class AcceleratedAttention(base.AttentionBackendMixin):
    """An attention layer that attends through this module's :func:`attention` (and takes ``"blocked"``)."""

    backends = BACKENDS

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend, slice_size=self.slice_size, mask=mask)


class ContextProjections:
    """The keys and values the cross-attention layers make of one context (the text embedding), kept from one UNet
    call to the next: a sampling run calls the UNet with the same context in every step, and each call would
    otherwise project it again in every layer (SDXL: 44 products of 154 x 2048 rows by 640/1280 columns per
    forward with CFG, ~1% of it at 64x64 latents, bench/README.md).

    The UNet call announces its context with :meth:`begin`. The context counts as the same one only when it is
    exactly equal, element for element (same shape, dtype and device), to a copy kept of the one the projections
    were made from; otherwise every stored projection is dropped. Comparing the values (~0.1 ms for SDXL's
    2 x 77 x 2048) rather than the tensor's identity and ``_version`` also covers a new tensor with the same values
    (classifier-free guidance concatenates the negative and the positive context anew in every step) and changes
    that bypass the version counter (``.data``, memory shared with numpy). Tied to one set of weight values,
    as :class:`ldm.accel.onednn.LinearPacks`: the accelerated UNet keeps it with its cached bf16 weights, so a
    weight change (which remakes that cache) drops it too. Only layers whose ``to_k`` / ``to_v`` are the
    accelerated ``Linear`` itself, without hooks (their output is a function of the weights and the input only),
    use it; others project as usual."""

    def __init__(self) -> None:
        self._copy: Optional[torch.Tensor] = None  # what the stored projections were made from
        self._current: Optional[torch.Tensor] = None  # the context of the call in progress
        self._settings: object = None  # the settings of the calls that made the stored projections
        self._projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._projections)

    def __reduce__(self):  # a cache: copies and pickles start empty
        return (ContextProjections, ())

    def begin(self, context: object, settings: object = None) -> None:
        """Announce the context of the UNet call that starts (None or a list: nothing is cached in it), and the
        settings it runs with (the projections stored under other settings are dropped)."""
        self._current = None
        if not isinstance(context, torch.Tensor):
            return
        if settings != self._settings:
            self._projections.clear()
            self._settings = settings
        old = self._copy
        if not (old is not None and old.shape == context.shape and old.dtype == context.dtype
                and old.device == context.device and torch.equal(old, context)):
            self._projections.clear()
            self._copy = context.detach().clone()
        self._current = context

    def end(self) -> None:
        self._current = None

    def keys_values(self, layer: "CrossAttention",
                    context: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``layer``'s keys and values of ``context`` from the store (made on first use); None where the store
        does not apply (another context, a layer that is not plain)."""
        if context is not self._current or not (_plain_projection(layer.to_k) and _plain_projection(layer.to_v)):
            return None
        entry = self._projections.get(id(layer))
        if entry is None:
            entry = self._projections[id(layer)] = (layer.to_k(context), layer.to_v(context))
        return entry


def _plain_projection(layer: nn.Module) -> bool:
    """Whether ``layer(x)`` depends on its weights and ``x`` only: the accelerated Linear, no hooks on it or on
    every module."""
    return (type(layer) is onednn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


_ACTIVE_CONTEXT: contextvars.ContextVar[Optional[ContextProjections]] = contextvars.ContextVar(
    "ldm_accel_context_projections", default=None)


@contextlib.contextmanager
def context_projections(store: Optional[ContextProjections], context: object,
                        settings: object = None) -> Iterator[None]:
    """Let the cross-attention layers take their keys and values of ``context`` from ``store`` (None: no store);
    ``settings``: those of the call that change how the projections are computed (:meth:`ContextProjections.begin`)."""
    if store is None:
        yield
        return
    store.begin(context, settings)
    token = _ACTIVE_CONTEXT.set(store)
    try:
        yield
    finally:
        _ACTIVE_CONTEXT.reset(token)
        store.end()


class CrossAttention(AcceleratedAttention, base.CrossAttention):
    """:class:`ldm.models.attention.CrossAttention` with the CPU kernels; inside :func:`context_projections` (no
    grad) its keys and values of the UNet's context come from the store."""

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store = _ACTIVE_CONTEXT.get()
        kv = None if store is None or torch.is_grad_enabled() else store.keys_values(self, context)
        if kv is None:
            return super().keys_values(context)
        return self._heads(kv[0]), self._heads(kv[1])


class AttentionBlock(AcceleratedAttention, unet.AttentionBlock):
    """:class:`ldm.models.unet.AttentionBlock` with the CPU kernels."""
