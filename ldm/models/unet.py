"""The diffusion UNet of latent diffusion / Stable Diffusion.

Module and parameter names, block indices and numerics follow the original ``openaimodel.py`` so that the
``model.diffusion_model.*`` weights of a real SD v1/v2 checkpoint load with ``strict=True``:
``time_embed``, ``input_blocks.N.M``, ``middle_block.M``, ``output_blocks.N.M``, ``out``.

Constructor parameters keep their original names and meanings (a ldm/SD ``unet_config`` works unchanged);
``attention_backend`` / ``attention_slice_size`` are additions (see :mod:`ldm.models.attention`), and so is
``position_embedding`` (off by default, see :func:`coordinate_features`).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackendMixin, SpatialTransformer, maybe_checkpoint, set_attention_backend

__all__ = [
    "timestep_embedding",
    "coordinate_features",
    "GroupNorm32",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "Downsample",
    "ResBlock",
    "AttentionBlock",
    "UNetModel",
    "set_activation_checkpointing",
]

logger = logging.getLogger(__name__)

IntOrList = Union[int, Sequence[int]]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos(t * f_i), sin(t * f_i)], f_i = exp(-ln(max_period) * i / half); [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


COORDINATE_FREQUENCIES = (0.5, 1.0, 2.0, 4.0)  # half-periods per image side, in units of the side


def coordinate_features(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Fourier features of each pixel's position, [1, 4 * len(COORDINATE_FREQUENCIES), height, width]:
    sin and cos of pi * f * u for the pixel-center coordinate u in (-1, 1) of each axis (x channels first).
    They depend on the relative position only, so the same model runs at any latent size."""
    def axis(n: int) -> torch.Tensor:
        u = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1
        arg = math.pi * u[None, :] * torch.tensor(COORDINATE_FREQUENCIES, device=device)[:, None]
        return torch.cat([arg.sin(), arg.cos()])  # [2F, n]
    fx = axis(width)[:, None, :].expand(-1, height, width)
    fy = axis(height)[:, :, None].expand(-1, height, width)
    return torch.cat([fx, fy])[None].to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input's dtype (as the reference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding to TimestepBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _resampled_channels(name: str, channels: int, out_channels: Optional[int], use_conv: bool, dims: int) -> int:
    """The output width of an Upsample/Downsample; only a conv may change it."""
    _check_dims(dims)
    out = out_channels or channels
    if out != channels and not use_conv:
        raise ValueError(f"{name} without conv cannot change channels {channels} -> {out}: set use_conv=True")
    return out


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = _resampled_channels("Upsample", channels, out_channels, use_conv, dims)
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``), or 2x2 average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = _resampled_channels("Downsample", channels, out_channels, use_conv, dims)
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``).

    in_layers: GroupNorm, SiLU, conv; emb_layers: SiLU, Linear; out_layers: GroupNorm, SiLU, Dropout, zero conv.
    With ``use_scale_shift_norm`` the embedding gives a scale and shift applied after the out norm.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        _check_dims(dims)
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3 if use_conv else 1,
                                          padding=1 if use_conv else 0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            norm, act, conv = self.in_layers
            h = conv(self.h_upd(act(norm(x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            norm, act, drop, conv = self.out_layers
            h = conv(drop(act(norm(h) * (1 + scale) + shift)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(AttentionBackendMixin, nn.Module):
    """Self-attention over pixels for UNets without a SpatialTransformer (unconditional / class LDMs).

    ``qkv`` is a 1x1 Conv1d to 3*channels. The legacy order splits it per head into (q, k, v);
    ``use_new_attention_order`` splits it into q, k, v first, then into heads.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False,
                 backend: str = "sdpa", slice_size: Optional[int] = None):
        super().__init__()
        if num_head_channels != -1:
            if num_head_channels <= 0 or channels % num_head_channels:
                raise ValueError(f"num_head_channels={num_head_channels} does not divide {channels} channels: "
                                 "choose a divisor of every attention level's width")
            num_heads = channels // num_head_channels
        if num_heads <= 0 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide {channels} channels: "
                             "choose a divisor of every attention level's width, or set num_head_channels")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.set_backend(backend, slice_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, 3*C, T] -> q, k, v each [B, heads, T, C/heads]."""
        b, width, t = qkv.shape
        d = width // (3 * self.num_heads)
        if self.use_new_attention_order:
            q, k, v = qkv.reshape(b, 3, self.num_heads, d, t).unbind(1)
        else:
            q, k, v = qkv.reshape(b, self.num_heads, 3 * d, t).split(d, dim=2)
        return q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x_flat = x.reshape(b, c, -1)
        q, k, v = self._split(self.qkv(self.norm(x_flat)))
        h = self.attend(q, k, v)
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, -1))
        return (x_flat + h).reshape(x.shape)


def _label_embedding(num_classes: Union[int, str, None], adm_in_channels: Optional[int],
                     dim: int) -> Optional[nn.Module]:
    """The original ``label_emb``: an Embedding for integer ``num_classes``; for ``"sequential"`` an MLP from the
    ``adm_in_channels`` vector (SDXL's pooled text + size embeddings), named ``label_emb.0.0`` / ``label_emb.0.2``."""
    if num_classes is None:
        return None
    if num_classes == "sequential":
        if not isinstance(adm_in_channels, int) or adm_in_channels < 1:
            raise ValueError("num_classes: sequential needs adm_in_channels (the width of the vector input y)")
        return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, dim), nn.SiLU(), nn.Linear(dim, dim)))
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return nn.Embedding(num_classes, dim)
    raise ValueError(f"num_classes={num_classes!r} is not supported: use a positive int (class ids) or "
                     "'sequential' (a vector input of width adm_in_channels)")


def _check_dims(dims: int) -> None:
    if dims != 2:
        raise ValueError(f"dims={dims} is not supported: only 2-D UNets (dims=2) are implemented")


def _per_level(value: IntOrList, levels: int, name: str) -> list[int]:
    """One int (or bool) for every level, or a list with one entry per channel_mult level."""
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries but channel_mult has {levels} levels: "
                         "give one int or one entry per level")
    return value


class UNetModel(nn.Module):
    """The latent diffusion UNet; ``forward(x, timesteps, context=None, y=None)`` returns x's shape.

    Parameters keep the names and meanings of the original ``openaimodel.UNetModel``. Differences:
    ``dims`` must be 2; ``n_embed`` must be None; ``use_fp16``/``use_bf16`` are
    accepted and ignored (precision is autocast's job); ``transformer_depth`` may be a per-level list (the
    middle block uses the last level's depth). ``use_checkpoint`` uses non-reentrant gradient checkpointing.

    ``channels_last`` (an addition, default on): keep the conv weights and run the activations in channels-last
    (NHWC) memory layout. oneDNN / cuDNN convolutions then skip their layout reorders and the transformer's
    pixel <-> token reshapes become free views. Only strides change: names, shapes, values and the output's
    layout are as the reference's.

    ``position_embedding`` (an addition, default off; SD checkpoints have none): add a learned function of each
    pixel's position (a 1x1 conv of :func:`coordinate_features`, zero-initialised, weights ``pos_embed.*``) to
    the first conv's output. SD's UNet sees position only through the convolutions' zero padding; with it, a
    cross-attention query can tell where it is, which words such as "left of" need (the embedded demo model has it).
    Zero-initialised, it leaves a warm-started model's output unchanged until it is trained.

    The CPU fast paths (oneDNN layers, a cached bf16 copy of the weights and pre-packed convolutions for bf16
    inference, blocked attention) are not part of the model: :func:`ldm.accel.optimize` adds them.
    """

    def __init__(self, image_size: Optional[int], in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: IntOrList, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Union[int, str, None] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 use_bf16: bool = False, num_heads: int = -1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: IntOrList = 1, context_dim: Union[int, Sequence[int], None] = None,
                 n_embed: Optional[int] = None, legacy: bool = True,
                 disable_self_attentions: Optional[Sequence[bool]] = None,
                 num_attention_blocks: Optional[Sequence[int]] = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: Optional[int] = None,
                 attention_backend: str = "auto",
                 attention_slice_size: Optional[int] = None, channels_last: bool = True,
                 position_embedding: bool = False):
        super().__init__()
        _check_dims(dims)
        if n_embed is not None:
            raise ValueError(f"n_embed={n_embed!r}: codebook-id prediction is not supported; set n_embed to null")
        if use_fp16 or use_bf16:
            logger.debug("use_fp16/use_bf16 ignored: run the UNet under torch.autocast for reduced precision")
        self.channel_mult = list(channel_mult)
        levels = len(self.channel_mult)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        self.attention_resolutions = set(attention_resolutions)
        self.transformer_depth = _per_level(transformer_depth, levels, "transformer_depth")
        self.context_dim = list(context_dim) if isinstance(context_dim, (list, tuple)) else context_dim
        self.dropout = dropout
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.use_spatial_transformer = use_spatial_transformer
        self.legacy = legacy
        self.use_linear_in_transformer = use_linear_in_transformer
        self.disable_middle_self_attn = disable_middle_self_attn
        self.attention_backend = attention_backend
        self.attention_slice_size = attention_slice_size
        self.channels_last = channels_last
        self.disable_self_attentions = (
            [False] * levels if disable_self_attentions is None
            else _per_level(disable_self_attentions, levels, "disable_self_attentions"))
        self.num_attention_blocks = (
            None if num_attention_blocks is None else _per_level(num_attention_blocks, levels, "num_attention_blocks"))
        self._validate()

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.num_classes = num_classes
        self.label_emb = _label_embedding(num_classes, adm_in_channels, time_embed_dim)
        skip_chans = self._build_input_blocks(time_embed_dim)
        self.pos_embed = (zero_module(nn.Conv2d(4 * len(COORDINATE_FREQUENCIES), model_channels, 1))
                          if position_embedding else None)
        ch = model_channels * self.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, time_embed_dim),
            self._attention(ch, levels - 1, upsample=False, middle=True),
            self._resblock(ch, time_embed_dim),
        )
        self._build_output_blocks(time_embed_dim, skip_chans)
        self.out = nn.Sequential(normalization(model_channels), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))
        set_attention_backend(self, attention_backend, attention_slice_size)
        if channels_last:
            self.to(memory_format=torch.channels_last)  # 4-D conv weights only; loading copies into them

    # ----------------------------------------------------------------------------------------------- checks
    def _validate(self) -> None:
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("neither num_heads nor num_head_channels is set: set one of them (e.g. num_heads: 8)")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the text embedding width, e.g. 768)")
        if not self.use_spatial_transformer and self.context_dim is not None:
            raise ValueError(f"context_dim={self.context_dim} is set but use_spatial_transformer is False: "
                             "set use_spatial_transformer: true (or drop context_dim)")
        if self.num_attention_blocks is not None:
            for level, (n_attn, n_res) in enumerate(zip(self.num_attention_blocks, self.num_res_blocks)):
                if n_attn > n_res:
                    raise ValueError(f"num_attention_blocks[{level}]={n_attn} exceeds num_res_blocks[{level}]="
                                     f"{n_res}: it must be at most the number of res blocks of that level")
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch % 32:
                raise ValueError(f"model_channels * channel_mult[{level}] = {ch} is not a multiple of 32 "
                                 "(GroupNorm uses 32 groups): choose widths that are multiples of 32")

    def _head_layout(self, ch: int) -> tuple[int, int]:
        """(num_heads, dim_head) of an attention layer over ch channels, by the original rule."""
        if self.num_head_channels == -1:
            if self.num_heads <= 0 or ch % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} does not divide the {ch} channels of an attention "
                                 "level: choose a divisor of every attention level's width, or set num_head_channels")
            return self.num_heads, ch // self.num_heads
        if self.num_head_channels <= 0 or ch % self.num_head_channels:
            raise ValueError(f"num_head_channels={self.num_head_channels} does not divide the {ch} channels of an "
                             "attention level: choose a divisor of every attention level's width")
        return ch // self.num_head_channels, self.num_head_channels

    # ----------------------------------------------------------------------------------------------- blocks
    def _resblock(self, ch: int, emb_dim: int, out_ch: Optional[int] = None, up: bool = False,
                  down: bool = False) -> ResBlock:
        return ResBlock(ch, emb_dim, self.dropout, out_channels=out_ch, use_checkpoint=self.use_checkpoint,
                        use_scale_shift_norm=self.use_scale_shift_norm, up=up, down=down)

    def _attention(self, ch: int, level: int, upsample: bool, middle: bool = False) -> nn.Module:
        if self.use_spatial_transformer:
            num_heads, dim_head = self._head_layout(ch)
            disable_sa = self.disable_middle_self_attn if middle else self.disable_self_attentions[level]
            return SpatialTransformer(ch, num_heads, dim_head, depth=self.transformer_depth[level],
                                      dropout=self.dropout, context_dim=self.context_dim, disable_self_attn=disable_sa,
                                      use_linear=self.use_linear_in_transformer, use_checkpoint=self.use_checkpoint)
        if self.legacy:  # the old rule: heads from num_head_channels if set, else num_heads(_upsample)
            heads = self.num_heads_upsample if upsample else self.num_heads
            return AttentionBlock(ch, num_heads=heads, num_head_channels=self.num_head_channels,
                                  use_checkpoint=self.use_checkpoint,
                                  use_new_attention_order=self.use_new_attention_order)
        return AttentionBlock(ch, num_head_channels=self._head_layout(ch)[1], use_checkpoint=self.use_checkpoint,
                              use_new_attention_order=self.use_new_attention_order)

    def _wants_attention(self, ds: int, level: int, index: int) -> bool:
        if ds not in self.attention_resolutions:
            return False
        return self.num_attention_blocks is None or index < self.num_attention_blocks[level]

    def _build_input_blocks(self, emb_dim: int) -> list[int]:
        """Fill ``input_blocks``; returns the channel count of every skip connection, in order."""
        ch = self.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(self.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(self.channel_mult):
            for index in range(self.num_res_blocks[level]):
                layers = [self._resblock(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if self._wants_attention(ds, level, index):
                    layers.append(self._attention(ch, level, upsample=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self._resblock(ch, emb_dim, ch, down=True) if self.resblock_updown
                        else Downsample(ch, self.conv_resample, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        return skip_chans

    def _build_output_blocks(self, emb_dim: int, skip_chans: list[int]) -> None:
        skip_chans = list(skip_chans)
        ch = self.model_channels * self.channel_mult[-1]
        ds = 2 ** (len(self.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for index in range(self.num_res_blocks[level] + 1):
                layers = [self._resblock(ch + skip_chans.pop(), emb_dim, self.model_channels * mult)]
                ch = self.model_channels * mult
                if self._wants_attention(ds, level, index):
                    layers.append(self._attention(ch, level, upsample=True))
                if level and index == self.num_res_blocks[level]:
                    layers.append(self._resblock(ch, emb_dim, ch, up=True) if self.resblock_updown
                                  else Upsample(ch, self.conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    # ---------------------------------------------------------------------------------------------- forward
    def set_attention_backend(self, backend: str, slice_size: Optional[int] = None) -> None:
        """Switch every attention layer to ``backend`` ("sdpa", "math", "xformers", "auto"; "blocked" after
        :func:`ldm.accel.optimize`) and slicing."""
        set_attention_backend(self, backend, slice_size)
        self.attention_backend, self.attention_slice_size = backend, slice_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet input must be [batch, {self.in_channels}, height, width], got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input size {x.shape[2]}x{x.shape[3]} is not divisible by {factor}: "
                             f"use latent sizes that are multiples of {factor}")

    def _timesteps(self, timesteps: Union[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=x.device)
        if t.dim() == 0:
            return t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or shaped [{x.shape[0]}] (one per sample), "
                             f"got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, timesteps: Union[torch.Tensor, float],
                context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, in_channels, H, W]; timesteps: [B] or a scalar; context: [B, M, context_dim]; y: [B] class ids
        (integer ``num_classes``) or [B, adm_in_channels] vectors (``num_classes: sequential``)."""
        if (y is None) != (self.label_emb is None):
            raise ValueError("y given but this UNet has no num_classes: pass y=None" if self.label_emb is None
                             else f"this UNet has num_classes={self.num_classes!r}: pass y (one label or vector "
                                  "per sample)")
        self._check_input(x)
        t_emb = timestep_embedding(self._timesteps(timesteps, x), self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch {y.shape[0]} but x has batch {x.shape[0]}: pass one y per sample")
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)
        skips = []
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0 and self.pos_embed is not None:
                pos = coordinate_features(*h.shape[2:], device=h.device, dtype=h.dtype)
                if self.channels_last:
                    pos = pos.contiguous(memory_format=torch.channels_last)
                h = h + self.pos_embed(pos)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype)).contiguous()


def set_activation_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Recompute activations in the backward pass (non-reentrant ``torch.utils.checkpoint``) block by block: every
    ResBlock, AttentionBlock and transformer block (the SpatialTransformers' ``BasicTransformerBlock``) under
    ``module``; returns how many blocks were switched. Training and sampling give the same numbers either way;
    training keeps only the blocks' inputs instead of every activation, for about a third more compute."""
    from .attention import BasicTransformerBlock

    count = 0
    for m in module.modules():
        if isinstance(m, UNetModel):  # its setting, as ``use_checkpoint`` in its config would record it
            m.use_checkpoint = enabled
        elif isinstance(m, (ResBlock, AttentionBlock)):
            m.use_checkpoint = enabled
        elif isinstance(m, BasicTransformerBlock):
            m.checkpoint = enabled
        else:
            continue
        count += 1
    return count
