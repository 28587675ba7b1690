"""Attention for the UNet: one attention function with selectable backends, and the transformer blocks of
Stable Diffusion.

Parameter names follow the original ``ldm/modules/attention.py`` (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``proj_in`` ...) so that real SD v1/v2 checkpoints load with ``strict=True``. The layers are plain
``nn.Linear`` / ``nn.Conv2d``; the CPU fast paths (oneDNN layers, the cache-blocked attention kernel and the
CPU choice among kernels) are :mod:`ldm.accel`'s, applied by :func:`ldm.accel.optimize`.

The backend is chosen per module (argument or :func:`set_attention_backend`), never by an environment variable:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (a single layer's default);
- ``"math"``: the reference computation: q and k in fp32, softmax in fp32, result cast back;
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (needs xformers and CUDA tensors);
- ``"auto"`` (the UNet's default): xformers when it is installed and the tensors are on CUDA, else sdpa
  (:mod:`ldm.accel.attention` refines it for bf16 on a CPU, and adds the ``"blocked"`` kernel).

``slice_size`` splits the query rows into chunks of that many rows (attention slicing): the result is the
same, the peak memory of the attention matrix is ``batch * heads * slice_size * keys``.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

__all__ = [
    "BACKENDS",
    "KERNELS",
    "attention",
    "sliced_attention",
    "maybe_checkpoint",
    "AttentionBackendMixin",
    "CrossAttention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "SpatialTransformer",
    "set_attention_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "math", "xformers", "auto")


def _check_backend(backend: str, slice_size: Optional[int], backends: Sequence[str] = BACKENDS) -> None:
    if backend not in backends:
        if backend == "blocked":
            raise ValueError("attention backend 'blocked' is the CPU kernel of ldm.accel: call "
                             "ldm.accel.optimize(model) first, or use one of " + ", ".join(backends))
        raise ValueError(f"unknown attention backend {backend!r}: use one of {', '.join(backends)}")
    if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int)
                                   or slice_size < 1):
        raise ValueError(f"attention slice_size must be a positive int (query rows per chunk) or None, "
                         f"got {slice_size!r}")


@functools.lru_cache(maxsize=None)
def _xformers_ops() -> Any:
    """``xformers.ops`` if it imports (checked once, on first use), else None."""
    try:
        import xformers.ops as ops
    except Exception as e:  # a broken build (wrong torch/CUDA) raises more than ImportError
        logger.debug("xformers unavailable: %s", e)
        return None
    return ops


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference attention: scores and softmax in fp32 (autocast off), result in v's dtype."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
            else:
                scores = scores + mask.float()
        weights = scores.softmax(dim=-1)
    return torch.matmul(weights.to(v.dtype), v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None:
        raise ValueError("the xformers attention backend takes no mask here: use backend='sdpa' or 'math'")
    # xformers wants [B, N, H, d]; the transposes are views (CrossAttention's tensors are already laid out so).
    out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


KERNELS: dict[str, Callable] = {"sdpa": _sdpa, "math": _math, "xformers": _xformers}


def _resolve(backend: str, q: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    if backend == "auto":
        return "xformers" if q.is_cuda and mask is None and _xformers_ops() is not None else "sdpa"
    if backend == "xformers":
        if _xformers_ops() is None:
            raise ValueError("attention backend 'xformers' asked for but xformers does not import: "
                             "pip install xformers, or use backend='sdpa'")
        if not q.is_cuda:
            raise ValueError(f"attention backend 'xformers' needs CUDA tensors, got {q.device.type}: "
                             "use backend='sdpa' (or 'auto')")
    return backend


def _mask_rows(mask: Optional[torch.Tensor], start: int, stop: int, rows: int) -> Optional[torch.Tensor]:
    """The part of a mask (broadcastable to [B, H, Nq, Nk]) that belongs to query rows start:stop."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] != rows:
        return mask
    return mask[..., start:stop, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa",
              slice_size: Optional[int] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention with scale ``dim_head ** -0.5``.

    q: [B, heads, Nq, d]; k, v: [B, heads, Nk, d]; mask: bool (True = attend) or additive float,
    broadcastable to [B, heads, Nq, Nk]. Returns [B, heads, Nq, d].
    """
    _check_backend(backend, slice_size)
    return sliced_attention(KERNELS[_resolve(backend, q, mask)], q, k, v, mask=mask, slice_size=slice_size)


def sliced_attention(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     mask: Optional[torch.Tensor] = None, slice_size: Optional[int] = None) -> torch.Tensor:
    """``kernel(q, k, v, mask)`` (shapes as :func:`attention`'s), on chunks of ``slice_size`` query rows."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q, k, v shaped [batch, heads, tokens, dim_head], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rows = q.shape[2]
    if slice_size is None or slice_size >= rows:
        return kernel(q, k, v, mask)
    chunks = [kernel(q[:, :, i:i + slice_size], k, v, _mask_rows(mask, i, i + slice_size, rows))
              for i in range(0, rows, slice_size)]
    return torch.cat(chunks, dim=2)


def maybe_checkpoint(fn: Callable[..., torch.Tensor], *args: Any, enabled: bool) -> torch.Tensor:
    """``fn(*args)``, through non-reentrant gradient checkpointing when enabled and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class AttentionBackendMixin:
    """A module whose attention backend and slicing can be switched after construction; it attends through
    :meth:`attend` (which :mod:`ldm.accel` overrides)."""

    backends: tuple[str, ...] = BACKENDS  # the backends this module can run
    backend: str = "sdpa"
    slice_size: Optional[int] = None

    def set_backend(self, backend: str, slice_size: Optional[int] = None) -> None:
        _check_backend(backend, slice_size, self.backends)
        self.backend = backend
        self.slice_size = slice_size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`attention` with this module's backend and slicing."""
        return attention(q, k, v, backend=self.backend, slice_size=self.slice_size, mask=mask)


class CrossAttention(AttentionBackendMixin, nn.Module):
    """Multi-head attention of x over context (over x itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, backend: str = "sdpa", slice_size: Optional[int] = None):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.set_backend(backend, slice_size)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, heads*d] -> [B, heads, N, d] as a view."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``context`` ([B, M, context_dim]), [B, heads, M, dim_head] each."""
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, query_dim]; context: [B, M, context_dim]; mask: bool [B, M] (True = attend), as the
        reference."""
        context = x if context is None else context
        q, (k, v) = self._heads(self.to_q(x)), self.keys_values(context)
        if mask is not None:
            mask = mask.reshape(mask.shape[0], 1, 1, -1)
        out = self.attend(q, k, v, mask)
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.dim_head))


class GEGLU(nn.Module):
    """Linear to twice the width, one half gating the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net``: [GEGLU (or Linear+GELU when glu=False), Dropout, Linear]."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (attn1), cross-attention (attn2) and GEGLU feed-forward, each residual.

    With ``disable_self_attn`` attn1 also attends to the context instead of to x.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, checkpoint: bool = True,
                 disable_self_attn: bool = False, backend: str = "sdpa"):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.checkpoint = checkpoint
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout,
                                    backend)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


ContextDim = Union[int, Sequence[int], None]


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm, proj_in, blocks, proj_out, residual.

    proj_in/proj_out are 1x1 convolutions (SD v1) or Linear layers (SD v2, ``use_linear=True``).
    ``context_dim`` may be a list with one width per block.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: ContextDim = None, disable_self_attn: bool = False, use_linear: bool = False,
                 use_checkpoint: bool = True, backend: str = "sdpa"):
        super().__init__()
        context_dims = list(context_dim) if isinstance(context_dim, (list, tuple)) else [context_dim] * depth
        if len(context_dims) != depth:
            raise ValueError(f"SpatialTransformer got {len(context_dims)} context_dim entries for depth {depth}: "
                             "give one int or one width per transformer block")
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        for p in self.proj_out.parameters():
            nn.init.zeros_(p)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=dim,
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint, backend=backend)
            for dim in context_dims])

    def forward(self, x: torch.Tensor, context: Union[torch.Tensor, Sequence[torch.Tensor], None] = None
                ) -> torch.Tensor:
        """x: [B, C, H, W]; context: [B, M, context_dim] or a list with one tensor per block."""
        depth = len(self.transformer_blocks)
        contexts = list(context) if isinstance(context, (list, tuple)) else [context] * depth
        if len(contexts) != depth:
            raise ValueError(f"SpatialTransformer got {len(contexts)} contexts for {depth} blocks: "
                             "pass one tensor or one per block")
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]; a view, copied by the first op that needs it
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def set_attention_backend(module: nn.Module, backend: str, slice_size: Optional[int] = None) -> int:
    """Set the backend (and query-row slicing) of every attention layer under ``module``; returns how many."""
    layers = [m for m in module.modules() if isinstance(m, AttentionBackendMixin)]
    for backends in {m.backends for m in layers} or {BACKENDS}:  # check every layer before changing any
        _check_backend(backend, slice_size, backends)
    for m in layers:
        m.set_backend(backend, slice_size)
    logger.debug("attention backend %s (slice_size %s) set on %d layers", backend, slice_size, len(layers))
    return len(layers)
