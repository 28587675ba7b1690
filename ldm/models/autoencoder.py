"""The KL-regularised autoencoder (first stage) of latent diffusion.

Parameter names follow the original ``first_stage_model.*`` layout of Stable Diffusion checkpoints
(``encoder.down.N.block.M...``, ``mid.attn_1.q/k/v/proj_out`` as 1x1 convs, ``decoder.up[0]`` at the
highest resolution), so a real SD state dict loads strictly::

    vae = AutoencoderKL(ddconfig, embed_dim=4, ckpt_path="vae.safetensors")
    posterior = vae.encode(images)            # images in [-1, 1], (B, 3, H, W)
    images = vae.decode(posterior.sample())

For big images, ``vae.enable_tiling()`` makes ``encode``/``decode`` work tile by tile (tiles blended
with a linear ramp over their overlap), so memory stays bounded whatever the image size.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.io import check_state_dict, read_state_dict

__all__ = [
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "DiagonalGaussianDistribution",
    "AutoencoderKL",
]

logger = logging.getLogger(__name__)

_ATTN_TYPES = ("vanilla", "vanilla-xformers")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as in the reference VAE: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv (or 2x2 average pooling without conv)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 ``nin_shortcut`` when the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C): softmax(q k^T / sqrt(C)) v
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


def _make_attn(channels: int, attn_type: str) -> AttnBlock:
    if attn_type not in _ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported; use one of {', '.join(_ATTN_TYPES)}")
    return AttnBlock(channels)


def _check_ddconfig(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int) -> None:
    if not ch_mult:
        raise ValueError("ch_mult is empty; give one multiplier per resolution level, e.g. [1, 2, 4, 4]")
    for width in [ch * m for m in ch_mult]:
        if width % 32:
            raise ValueError(f"ch * ch_mult gives width {width}, not a multiple of 32 (GroupNorm(32)); "
                             "choose ch a multiple of 32")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if resolution % 2 ** (len(ch_mult) - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2**(len(ch_mult)-1); fix resolution")


def _mid_block(channels: int, dropout: float, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = _make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image -> latent moments (``2 * z_channels`` channels when ``double_z``), downsampled 2**(levels-1)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Iterable[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", **ignore):
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, resolution)
        if ignore:
            logger.debug("Encoder ignores ddconfig keys: %s", ", ".join(sorted(ignore)))
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_resolutions = set(attn_resolutions)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        in_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(_make_attn(block_in, attn_type))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = _mid_block(block_in, dropout, attn_type)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. ``up`` is built from the lowest resolution but stored so ``up[0]`` is the highest."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Iterable[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_type: str = "vanilla", **ignore):
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, resolution)
        if ignore:
            logger.debug("Decoder ignores ddconfig keys: %s", ", ".join(sorted(ignore)))
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        attn_resolutions = set(attn_resolutions)

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout, attn_type)

        levels: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(_make_attn(block_in, attn_type))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


# one generator for the whole batch, or one per batch item
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


class DiagonalGaussianDistribution:
    """The posterior q(z|x): moments ``(B, 2C, H, W)`` split into mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """mean + std * noise. With a list of generators (one per item), item i does not depend on the batch.

        Noise is drawn in float32 on the generator's device (CPU by default, like the reference), then moved.
        """
        return self.mean + self.std * self._noise(generator)

    def _noise(self, generator) -> torch.Tensor:
        shape = self.mean.shape
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; "
                                 "pass one generator per batch item (or a single one)")
            noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(shape, generator=generator, device=device)
        return noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W (other defaults to N(0, I)); shape (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files: read and checked by ldm.io (format from the bytes, weights_only pickles, strict names)

def _select_first_stage(sd: dict[str, torch.Tensor], ignore_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Keep the autoencoder's entries: strip ``first_stage_model.`` (full LDM files), drop ``loss.*`` and
    keys starting with any of ``ignore_keys``."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    loss_keys = [k for k in sd if k.startswith("loss.")]
    if loss_keys:
        logger.info("ignoring %d loss.* entries (training-loss weights, not part of the autoencoder)",
                    len(loss_keys))
    ignore_keys = tuple(ignore_keys)
    dropped = [k for k in sd if ignore_keys and k.startswith(ignore_keys)]
    if dropped:
        logger.info("ignore_keys drops %d entries: %s%s", len(dropped), ", ".join(dropped[:3]),
                    f" (+{len(dropped) - 3} more)" if len(dropped) > 3 else "")
    drop = set(dropped) | set(loss_keys)
    return {k: v for k, v in sd.items() if k not in drop}


# ----------------------------------------------------------------------------------------------------------
# Tiling: split along each axis, run fn per tile, blend with linear ramps that sum to one

def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering ``[0, length)`` with at least ``overlap`` between neighbours."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _axis_weights(starts: list[int], tile: int, length: int, ramp: int) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights: linear ramps over ``ramp`` samples at inner edges, normalised to sum to 1."""
    raw = []
    for i in range(len(starts)):
        w = torch.ones(tile, dtype=torch.float64)
        if ramp > 0:
            rise = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
            if i > 0:
                w[:ramp] = rise
            if i < len(starts) - 1:
                w[-ramp:] = torch.minimum(w[-ramp:], rise.flip(0))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s:s + tile] += w
    return [w / total[s:s + tile] for s, w in zip(starts, raw)]


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: float,
           scale_in: int, scale_out: int) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the results.

    Positions are counted in a grid unit (one latent): a unit is ``scale_in`` input pixels and ``scale_out``
    output pixels. ``tile`` and the overlap are in units. Only one tile's activations live at a time; the
    output buffer is the only full-size tensor.
    """
    grid_h, grid_w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    axes = []
    for length in (grid_h, grid_w):
        size = min(tile, length)
        ov = min(round(tile * overlap), size - 1) if size < length else 0
        starts = _tile_starts(length, size, ov)
        weights = _axis_weights([s * scale_out for s in starts], size * scale_out, length * scale_out,
                                ov * scale_out)
        axes.append((size, starts, weights))
    (th, ys, wys), (tw, xs, wxs) = axes
    out = None
    for y, wy in zip(ys, wys):
        for x0, wx in zip(xs, wxs):
            piece = fn(x[..., y * scale_in:(y + th) * scale_in, x0 * scale_in:(x0 + tw) * scale_in])
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], grid_h * scale_out, grid_w * scale_out)
            weight = (wy[:, None] * wx[None, :]).to(device=piece.device, dtype=piece.dtype)
            out[..., y * scale_out:(y + th) * scale_out, x0 * scale_out:(x0 + tw) * scale_out] += piece * weight
    return out


class AutoencoderKL(nn.Module):
    """Encoder + ``quant_conv`` -> Gaussian posterior; ``post_quant_conv`` + Decoder -> image.

    ``lossconfig`` is accepted for config compatibility and ignored: the training stage builds the loss.
    """

    def __init__(self, ddconfig: dict, embed_dim: int, lossconfig: dict | None = None,
                 ckpt_path: str | os.PathLike | None = None, ignore_keys: Iterable[str] = (),
                 image_key: str = "image", monitor: str | None = None, **ignored):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder predicts mean and logvar)")
        if ignored:
            logger.debug("AutoencoderKL ignores: %s", ", ".join(sorted(ignored)))
        self.image_key = image_key
        self.monitor = monitor
        self.embed_dim = embed_dim
        z_channels = ddconfig["z_channels"]
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.use_tiling = False
        self.tile_sample_size = 512
        self.tile_latent_size = 512 // self.downsample_factor
        self.tile_overlap = 0.25
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight (used for the adaptive GAN weight in training)."""
        return self.decoder.conv_out.weight

    def init_from_ckpt(self, path: str | os.PathLike, ignore_keys: Iterable[str] = ()) -> None:
        """Load weights strictly from a VAE or full LDM file; missing, unexpected or mis-shaped keys raise."""
        sd = _select_first_stage(read_state_dict(path)[0], ignore_keys)
        check_state_dict(self.state_dict(), sd, str(path), target="the autoencoder",
                         fix="check ddconfig/embed_dim or pass ignore_keys")
        self.load_state_dict(sd, strict=True)
        logger.info("loaded autoencoder weights from %s", path)

    # -- tiling ------------------------------------------------------------------------------------------
    def enable_tiling(self, tile_size: int = 512, overlap: float = 0.25, latent_tile_size: int | None = None):
        """Encode/decode tile by tile when the input is larger than a tile.

        ``tile_size`` is in pixels (encode), ``latent_tile_size`` in latents (decode; default
        ``tile_size // downsample_factor``), ``overlap`` the fraction of a tile shared with its neighbour.
        """
        f = self.downsample_factor
        latent_tile_size = tile_size // f if latent_tile_size is None else latent_tile_size
        if tile_size < f or tile_size % f:
            raise ValueError(f"tile_size {tile_size} must be a positive multiple of the downsample factor {f}")
        if latent_tile_size < 1:
            raise ValueError(f"latent_tile_size must be >= 1, got {latent_tile_size}")
        if not 0.0 <= overlap <= 0.5:
            raise ValueError(f"overlap {overlap} must be a fraction of the tile in [0, 0.5], e.g. 0.25")
        self.use_tiling = True
        self.tile_sample_size, self.tile_latent_size, self.tile_overlap = tile_size, latent_tile_size, overlap
        return self

    def disable_tiling(self):
        self.use_tiling = False
        return self

    # -- encode / decode ---------------------------------------------------------------------------------
    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode_full(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image ``(B, C, H, W)`` in [-1, 1] -> posterior over latents ``(B, embed_dim, H/f, W/f)``."""
        if x.ndim != 4:
            raise ValueError(f"encode expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            f = self.downsample_factor
            if x.shape[-2] % f or x.shape[-1] % f:
                raise ValueError(f"tiled encode needs H and W divisible by {f}, got {tuple(x.shape[-2:])}; "
                                 "crop or pad the image")
            moments = _tiled(self._encode_moments, x, self.tile_sample_size // f, self.tile_overlap, f, 1)
        else:
            moments = self._encode_moments(x)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, embed_dim, h, w)`` -> images ``(B, out_ch, h*f, w*f)``."""
        if z.ndim != 4:
            raise ValueError(f"decode expects latents (B, C, h, w), got shape {tuple(z.shape)}")
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_size:
            return _tiled(self._decode_full, z, self.tile_latent_size, self.tile_overlap, 1,
                          self.downsample_factor)
        return self._decode_full(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Generators = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
