"""Diffusion math with no parameters: schedules, denoiser wrappers, guidance, samplers and the training loss.

The model is seen only through a denoiser ``D(x, sigma, cond) -> x0`` (k-diffusion convention,
``x = x0 + sigma * noise``).
"""

from ldm.diffusion.denoisers import (
    DiscreteDenoiser,
    EpsDenoiser,
    VDenoiser,
    X0Denoiser,
    make_denoiser,
    prediction_target,
)
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.inpaint import InpaintDenoiser
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.samplers import (
    SAMPLERS,
    SamplerSpec,
    build_sigmas,
    get_sampler,
    img2img_sigmas,
    noise_latent,
    randn_like,
    sample,
)
from ldm.diffusion.schedules import make_betas, register_schedule_buffers, rescale_zero_terminal_snr

__all__ = [
    "CFGDenoiser",
    "DiffusionLoss",
    "DiscreteDenoiser",
    "EpsDenoiser",
    "InpaintDenoiser",
    "SAMPLERS",
    "SamplerSpec",
    "VDenoiser",
    "X0Denoiser",
    "build_sigmas",
    "get_sampler",
    "img2img_sigmas",
    "make_betas",
    "make_denoiser",
    "noise_latent",
    "prediction_target",
    "randn_like",
    "register_schedule_buffers",
    "rescale_zero_terminal_snr",
    "sample",
]
