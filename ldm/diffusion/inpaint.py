"""Inpainting helpers.

Mask convention everywhere: ``mask`` is 1 where the image is repainted and 0 where it is kept, shaped
[B, 1, h, w] (or broadcastable) at latent resolution.

* Ordinary (4-channel) models: :class:`InpaintDenoiser` wraps any denoiser. At every call the kept region of
  x is replaced by the original latent noised to the current sigma (fixed noise, so the blend follows one
  noise path), and the kept region of the x0 estimate is replaced by the original latent. The final sample
  therefore equals the original latent outside the mask.
* Inpainting (9-channel) UNets need nothing here: the model's conditioner puts the extra input channels
  ``cat([mask, masked_image_latents], dim=1)`` under the key ``"concat"`` of the conditioning dict
  (:class:`ldm.models.conditioner.InpaintingConcat`), in the conditional and the unconditional branch alike,
  and the model wrapper concatenates them to its scaled input.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]


def _check_mask(mask: Tensor, latent: Tensor) -> None:
    if mask.ndim != latent.ndim or mask.shape[-2:] != latent.shape[-2:]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match latent shape {tuple(latent.shape)}; "
            "resize the mask to the latent resolution as [B, 1, h, w]"
        )


class InpaintDenoiser:
    """Repaint where ``mask == 1`` with an ordinary model; keep ``init_latent`` elsewhere.

    Args:
        denoiser: ``D(x, sigma, cond) -> x0``.
        init_latent: the original latent x0 [B, C, h, w].
        mask: 1 = repaint, 0 = keep; [B, 1, h, w].
        noise: fixed standard-normal noise like ``init_latent`` (draw it with
            :func:`ldm.diffusion.samplers.randn_like` and the per-image generators).
    """

    def __init__(self, denoiser: Denoiser, init_latent: Tensor, mask: Tensor, noise: Tensor):
        _check_mask(mask, init_latent)
        if noise.shape != init_latent.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from init_latent {tuple(init_latent.shape)}")
        self.denoiser = denoiser
        self.init_latent = init_latent
        self.mask = mask.to(init_latent.dtype)
        self.noise = noise

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        known = self.init_latent + sigma_b * self.noise
        x = self.mask * x + (1 - self.mask) * known
        denoised = self.denoiser(x, sigma, cond)
        return self.mask * denoised + (1 - self.mask) * self.init_latent
