"""Tiny random LatentDiffusion models for CPU tests, and fixtures that save them as checkpoints.

    from tiny_models import tiny_config, tiny_checkpoint   # tests/ is on sys.path under pytest

The architecture is Stable Diffusion's at a toy size: UNet model_channels 32, a kl-f8 VAE with ch 32
(64x64 pixels -> 8x8 latents), the "ldm-tiny-text" OpenCLIP tower (width 32). ``tiny_config(inpainting=True)``
gives the 9-channel inpainting UNet (latents + mask + masked-image latents).
Use in a test module with ``from tiny_models import tiny_ckpt  # noqa: F401`` (pytest fixture).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

_UNET = {
    "target": "ldm.models.unet.UNetModel",
    "params": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 16,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 32,
        "legacy": False,
    },
}
_VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}
_TEXT = {
    "target": "ldm.models.text_encoder.OpenCLIPTextEncoder",
    "params": {"arch": "ldm-tiny-text", "layer": "last", "pad": "zero", "projection": False, "freeze": True},
}


def tiny_config(parameterization: str = "eps", inpainting: bool = False) -> dict[str, Any]:
    """A plain-dict model config (``{"model": {...}}``) of a tiny SD-like LatentDiffusion (64x64 default size)."""
    unet = copy.deepcopy(_UNET)
    if inpainting:
        unet["params"]["in_channels"] = 9
    return {
        "model": {
            "target": "ldm.model.LatentDiffusion",
            "params": {
                "parameterization": parameterization,
                "conditioning_key": "hybrid" if inpainting else "crossattn",
                "image_size": 8,
                "channels": 4,
                "scale_factor": 0.18215,
                "unet_config": unet,
                "first_stage_config": copy.deepcopy(_VAE),
                "cond_stage_config": copy.deepcopy(_TEXT),
            },
        }
    }


def tiny_model(seed: int = 0, **kwargs):
    """A tiny LatentDiffusion with random weights (deterministic for a seed), in eval mode."""
    from ldm.convert import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config(**kwargs))
    _liven_output(model)
    return model.eval().requires_grad_(False)


def _liven_output(model) -> None:
    """The UNet's last conv and the transformers' proj_out start at zero (as in the original); give them small
    random weights so that the prompt and the noise change the output in tests."""
    for p in model.model.diffusion_model.parameters():
        if p.ndim >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.05)


def tiny_checkpoint(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny random model as safetensors with its config in the metadata (loads with no --config)."""
    from ldm.io import save_checkpoint

    model = tiny_model(seed, **kwargs)
    return save_checkpoint(model.state_dict(), path, config=tiny_config(**kwargs))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny eps-model checkpoint, written once per test session."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_inpaint_ckpt(tmp_path_factory) -> Path:
    """A tiny 9-channel inpainting-model checkpoint, written once per test session."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-inpaint.safetensors", inpainting=True)
