"""A separate VAE file's weights onto the first stage's (``AutoencoderKL``) names.

Separate VAE files come in three layouts:

- SD's own (``encoder.down.0.block.0.norm1.weight``, ``decoder.up.3...``, ``quant_conv``), e.g. the ft-MSE VAE
  ``vae-ft-mse-840000-ema-pruned``; its ``.ckpt`` also carries the training loss (``loss.*``: LPIPS and the
  discriminator) and EMA counters, which are no part of the autoencoder.
- the same with the full model's ``first_stage_model.`` prefix (a whole checkpoint gives its VAE).
- diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0...``, ``mid_block.attentions.0.to_q``, or the
  older ``query``/``key``/``value``/``proj_attn``), e.g. SDXL's fp16-fix VAE: mapped here, its attention
  projections (linear) reshaped to the 1x1 convolutions of the original.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["vae_state_dict", "convert_diffusers_vae_state_dict"]

_FIRST_STAGE = "first_stage_model."
_NOT_THE_AUTOENCODER = ("loss.",)
_IGNORED = ("model_ema.decay", "model_ema.num_updates")
_ATTN = {"group_norm": "norm", "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out", "to_q": "q",
         "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def convert_diffusers_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` weights -> SD's names (the decoder's ``up_blocks.i`` is ``up.{levels-1-i}``)."""
    ups = [int(m.group(1)) for k in sd for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m]
    levels = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."
                                + (f"block.{m.group(3)}." if m.group(3) is not None else "upsample."), name)
        name = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                      lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", name)
        attn = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)
        if attn and attn.group(2) in _ATTN:
            name = f"{attn.group(1)}.mid.attn_1.{_ATTN[attn.group(2)]}.{attn.group(3)}"
            if attn.group(3) == "weight" and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
        name = name.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[name] = value
    return out


def vae_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE file's tensors in any of the layouts above -> the first stage's own names (``encoder.*``,
    ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``); the loss and EMA counters left out."""
    if any(k.startswith(_FIRST_STAGE) for k in sd):
        sd = {k[len(_FIRST_STAGE):]: v for k, v in sd.items() if k.startswith(_FIRST_STAGE)}
    sd = {k: v for k, v in sd.items() if not k.startswith(_NOT_THE_AUTOENCODER) and k not in _IGNORED}
    if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in sd):
        sd = convert_diffusers_vae_state_dict(sd)
    return dict(sd)
