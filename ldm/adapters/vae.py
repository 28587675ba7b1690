"""A separate VAE file in place of the model's first stage (``--vae``; A1111's "SD VAE").

    info = load_vae(model, "vae-ft-mse-840000-ema-pruned.safetensors")   # strict: every tensor, every shape

The file may use SD's names, the ``first_stage_model.`` prefix or diffusers' names
(:func:`ldm.convert.vae_layout.vae_state_dict`); it must fit the model's autoencoder exactly
(:func:`ldm.io.check_state_dict`), else nothing changes and one line says what does not fit. The weights are
copied into the existing parameters (dtype and memory format kept).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.convert.vae_layout import vae_state_dict
from ldm.io import check_state_dict, model_hash, read_state_dict

__all__ = ["LoadedVAE", "load_vae"]


@dataclass(frozen=True)
class LoadedVAE:
    """What the parameters record (A1111: ``VAE hash``, the first 10 hex digits of the file's sha256, and
    ``VAE``, the file name)."""

    name: str
    path: Path
    hash: str


def load_vae(model: nn.Module, path: str | os.PathLike) -> LoadedVAE:
    """Replace the weights of ``model.first_stage_model`` by the VAE file's, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE file not found: {path} (check --vae)")
    vae = model.first_stage_model
    sd = vae_state_dict(read_state_dict(path)[0])
    own = vae.state_dict()
    check_state_dict(own, sd, f"VAE {path}", target="this model's VAE",
                     fix="pass a VAE of this model's autoencoder (SD's kl-f8 VAE for SD 1.x/2.x, SDXL's for SDXL)")
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)
    return LoadedVAE(path.name, path, model_hash(path))
