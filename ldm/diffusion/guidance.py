"""Classifier-free guidance as a denoiser wrapper.

    D_cfg(x, sigma, cond) = u + scale * (c - u),    u = D(x, sigma, uncond),  c = D(x, sigma, cond)

computed with one batched forward of ``[uncond, cond]``. cond and uncond are the model's conditioning dicts
(``crossattn``, ``vector``, ``concat``: ``model.get_learned_conditioning`` and
``model.get_unconditional_conditioning``), stacked key by key; a negative prompt is simply the uncond's text.
Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16)
matches the per-item standard deviation of the guided output to that of the conditional one::

    out = phi * D_cfg * std(c) / std(D_cfg) + (1 - phi) * D_cfg

Here it is applied to the x0 prediction (the denoiser's output space).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]


def _expand_batch(value: Tensor, batch: int, name: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{name} has batch {value.shape[0]} but x has batch {batch}; pass batch 1 or {batch}")


def concat_cond(uncond: Any, cond: Any, batch: int) -> Any:
    """Stack uncond and cond along the batch: tensors directly, dicts key by key (same keys required)."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor):
            raise TypeError(f"cond is a tensor but uncond is {type(uncond).__name__}; pass both as tensors")
        return torch.cat([_expand_batch(uncond, batch, "uncond"), _expand_batch(cond, batch, "cond")])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            got = sorted(uncond) if isinstance(uncond, Mapping) else type(uncond).__name__
            raise ValueError(
                f"uncond keys {got} differ from cond keys {sorted(cond)}; give uncond the same keys "
                "(e.g. the same 'concat' tensor for inpainting)"
            )
        return {key: concat_cond(uncond[key], cond[key], batch) for key in cond}
    raise TypeError(f"cond must be a tensor or a dict of tensors, got {type(cond).__name__}")


def check_guidance_scale(scale: float, name: str = "guidance scale") -> float:
    """``scale`` as a float if it is finite, else a one-line ValueError that calls it ``name`` (e.g. a flag): a NaN or
    infinite scale would turn every image black."""
    if not math.isfinite(scale):
        raise ValueError(f"{name} {scale} is not a finite number: use e.g. 7.5 (1 = no guidance)")
    return float(scale)


def check_guidance_rescale(phi: float, name: str = "guidance rescale") -> float:
    """``phi`` as a float if it is in [0, 1], else a one-line ValueError that calls it ``name`` (e.g. a flag)."""
    if not 0.0 <= phi <= 1.0:  # NaN fails too
        raise ValueError(f"{name} {phi} is outside [0, 1]: use e.g. 0.7 (the paper's choice; 0 = plain CFG)")
    return float(phi)


def rescale_guidance(guided: Tensor, cond_out: Tensor, phi: float) -> Tensor:
    """Blend ``guided`` with its std-matched version (std over all but the batch dimension)."""
    dims = tuple(range(1, guided.ndim))
    factor = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (phi * factor + (1 - phi))


class CFGDenoiser:
    """Classifier-free guided denoiser.

    Args:
        denoiser: ``D(x, sigma, cond) -> x0``.
        scale: guidance scale s; ``s == 1`` skips the uncond forward entirely.
        uncond: the unconditional (or negative-prompt) conditioning, same structure as cond (the same keys);
            batch 1 is broadcast to the batch of x.
        rescale: guidance rescale phi in [0, 1] (0 = plain CFG).
    """

    def __init__(self, denoiser: Denoiser, scale: float, uncond: Any, rescale: float = 0.0):
        check_guidance_scale(scale)
        check_guidance_rescale(rescale)
        self.denoiser = denoiser
        self.scale = scale
        self.uncond = uncond
        self.rescale = rescale

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        batch = x.shape[0]
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), concat_cond(self.uncond, cond, batch)
        )
        uncond_out, cond_out = both.chunk(2)
        guided = uncond_out + self.scale * (cond_out - uncond_out)
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond_out, self.rescale)
        return guided
