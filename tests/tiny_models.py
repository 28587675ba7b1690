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


# ---- SDXL-like: the conditioning of SDXL base / refiner at toy width -----------------------------------------

SDXL_SIZE_DIM = 8  # per number (SDXL: 256)


def _size_embedder(key: str) -> dict[str, Any]:
    return {"is_trainable": False, "input_key": key, "target": "ldm.models.conditioner.ConcatTimestepEmbedderND",
            "params": {"outdim": SDXL_SIZE_DIM}}


_CLIP_L_LIKE = {"is_trainable": False, "input_key": "txt", "target": "ldm.models.conditioner.TextEmbedder",
                "params": {"arch": "ldm-tiny-text", "layer": "penultimate", "pad": "eot", "quick_gelu": True,
                           "projection": False, "final_norm": False}}
_BIGG_LIKE = {"is_trainable": False, "input_key": "txt", "target": "ldm.models.conditioner.TextEmbedder",
              "params": {"arch": "ldm-tiny-text-64", "layer": "penultimate", "pad": "zero", "projection": True,
                         "final_norm": False, "pooled": True}}


def tiny_sdxl_config(refiner: bool = False) -> dict[str, Any]:
    """A tiny model with SDXL's conditioning (configs/sd/sdxl-base.yaml / sdxl-refiner.yaml at toy width).

    Base: crossattn = CLIP-L-like (width 32, eot padding, 1 of 2 blocks, no final norm) + bigG-like (width 64,
    zero padding, 2 of 3 blocks, no final norm) = 96; vector = pooled (48) + original size, crop, target size
    (2 x 8 each) = 96. Refiner: bigG-like alone (64); vector = 48 + 16 + 16 + 8 (aesthetic score) = 88.
    """
    unet = copy.deepcopy(_UNET)
    p = unet["params"]
    p.update({"num_classes": "sequential", "attention_resolutions": [1, 2], "transformer_depth": [1, 2]})
    if refiner:
        embedders = [copy.deepcopy(_BIGG_LIKE), _size_embedder("original_size_as_tuple"),
                     _size_embedder("crop_coords_top_left"), _size_embedder("aesthetic_score")]
        p.update({"context_dim": 64, "adm_in_channels": 88, "model_channels": 64, "channel_mult": [1, 1, 1],
                  "transformer_depth": 1})
        zero_uncond = []
    else:
        embedders = [copy.deepcopy(_CLIP_L_LIKE), copy.deepcopy(_BIGG_LIKE),
                     _size_embedder("original_size_as_tuple"), _size_embedder("crop_coords_top_left"),
                     _size_embedder("target_size_as_tuple")]
        p.update({"context_dim": 96, "adm_in_channels": 96})
        zero_uncond = ["txt"]
    return {
        "model": {
            "target": "ldm.model.LatentDiffusion",
            "params": {
                "parameterization": "eps",
                "image_size": 8,
                "channels": 4,
                "scale_factor": 0.13025,
                "schedule_in_state_dict": False,
                "unet_config": unet,
                "first_stage_config": copy.deepcopy(_VAE),
                "conditioner_config": {"target": "ldm.models.conditioner.Conditioner",
                                       "params": {"emb_models": embedders, "zero_uncond": zero_uncond}},
            },
        }
    }


def tiny_sdxl_model(seed: int = 0, refiner: bool = False):
    """A tiny SDXL-like LatentDiffusion with random weights, in eval mode."""
    from ldm.convert import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_sdxl_config(refiner))
    _liven_output(model)
    return model.eval().requires_grad_(False)


def tiny_sdxl_checkpoint(path: str | Path, seed: int = 0, refiner: bool = False,
                         dtype: torch.dtype | None = None) -> Path:
    """Save a tiny SDXL-like model in the SDXL file layout (CLIP-L-like text weights in transformers names under
    ``conditioner.embedders.0.transformer.``), with its config in the metadata."""
    from ldm.convert import to_hf_clip_text_state_dict
    from ldm.io import save_checkpoint

    sd = dict(tiny_sdxl_model(seed, refiner).state_dict())
    if not refiner:
        prefix = "conditioner.embedders.0."
        text = {k[len(prefix):]: sd.pop(k) for k in list(sd) if k.startswith(prefix)}
        sd.update({prefix + "transformer." + k: v for k, v in to_hf_clip_text_state_dict(text).items()})
    return save_checkpoint(sd, path, config=tiny_sdxl_config(refiner), dtype=dtype)
