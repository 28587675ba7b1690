"""Build diffusers models offline from OUR SD-layout weights, with diffusers' own single-file conversion functions.

diffusers is a bench-only dependency (the ``bench`` extra): nothing under ``ldm`` imports this module.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."


def _original_config(unet_params: Mapping[str, Any], vae_ddconfig: Mapping[str, Any] | None = None) -> dict:
    """The nested ``model.params`` dict that diffusers' converters read (as in an original SD yaml)."""
    ddconfig = dict(vae_ddconfig or {"ch_mult": [1, 2, 4, 4]})
    return {"model": {"params": {"unet_config": {"params": dict(unet_params)},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}},
                                 "scale_factor": 0.18215}}}


def diffusers_unet(unet_params: Mapping[str, Any], unet_state_dict: Mapping[str, torch.Tensor],
                   image_size: int = 512) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel holding the weights of our ``UNetModel`` state dict.

    unet_params: our UNetModel constructor params (the SD ``unet_config.params``); unet_state_dict: the UNet's
    own state dict (no ``model.diffusion_model.`` prefix).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {UNET_PREFIX + k: v for k, v in unet_state_dict.items()}
    with warnings.catch_warnings():  # image_size is "deprecated" there, but the only offline way to pass it
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_unet_diffusers_config_from_ldm(_original_config(unet_params), checkpoint,
                                                            image_size=image_size)
    # diffusers' default layout (our UNet keeps its conv weights channels-last; the copy must not inherit that)
    converted = {k: v.contiguous() for k, v in sfu.convert_ldm_unet_checkpoint(checkpoint, config).items()}
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def diffusers_vae(ddconfig: Mapping[str, Any], vae_state_dict: Mapping[str, torch.Tensor],
                  scale_factor: float = 0.18215) -> torch.nn.Module:
    """diffusers' AutoencoderKL holding the weights of our AutoencoderKL state dict (no prefix)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {"first_stage_model." + k: v for k, v in vae_state_dict.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_vae_diffusers_config_from_ldm(_original_config({}, ddconfig), checkpoint,
                                                           image_size=512, scaling_factor=scale_factor)
    converted = {k: v.contiguous() for k, v in sfu.convert_ldm_vae_checkpoint(checkpoint, config).items()}
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()
