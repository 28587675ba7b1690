"""Module names other tools give this project's layers: diffusers' UNet names and transformers' CLIP text names.

Adapter files (LoRA, LoCon, LoHa, LoKr) name the layer they change, not a weight of the full model:

- kohya and diffusers/peft name SD 1.x/2.x UNet layers by diffusers' ``UNet2DConditionModel`` modules
  (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); kohya's SDXL files use the original names
  (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), which are this project's own.
- text-encoder layers are named by transformers' ``CLIPTextModel`` (``text_model.encoder.layers.0.self_attn.q_proj``)
  for every text encoder (kohya converts OpenCLIP ViT-H and bigG to that layout too).

:func:`diffusers_unet_names` maps every module of a :class:`ldm.models.unet.UNetModel` to its diffusers name, from
the model's own structure (levels, res blocks, attention), so it holds for SD 1.x, 2.x and SDXL layouts alike.
:func:`hf_clip_text_target` maps a transformers CLIP text module onto the OpenCLIP text tower, where q, k and v
are one fused ``in_proj_weight`` ([q; k; v] rows).
"""
from __future__ import annotations

import re

from torch import nn

from ldm.convert.layouts import _HF_BLOCK, _HF_QKV

__all__ = ["diffusers_unet_names", "hf_clip_text_target"]

# inside a ResBlock: original -> diffusers ResnetBlock2D
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# around the blocks
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _block_names(unet: nn.Module) -> dict[str, str]:
    """Original block prefix -> diffusers block prefix (resnets, attentions, down/upsamplers)."""
    names: dict[str, str] = {}
    levels = len(unet.channel_mult)
    i = 1
    for level in range(levels):
        for index in range(unet.num_res_blocks[level]):
            names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{index}"
            names[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{index}"
            i += 1
        if level != levels - 1:
            names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.downsamplers.0"
            i += 1
    names.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                  "middle_block.2": "mid_block.resnets.1"})
    i = 0
    for up, level in enumerate(reversed(range(levels))):
        for index in range(unet.num_res_blocks[level] + 1):
            names[f"output_blocks.{i}.0"] = f"up_blocks.{up}.resnets.{index}"
            block = unet.output_blocks[i]
            if len(block) > 1 and not _is_resample(block[1]):
                names[f"output_blocks.{i}.1"] = f"up_blocks.{up}.attentions.{index}"
            if _is_resample(block[-1]) and len(block) > 1:
                names[f"output_blocks.{i}.{len(block) - 1}"] = f"up_blocks.{up}.upsamplers.0"
            i += 1
    return names


def _is_resample(module: nn.Module) -> bool:
    return type(module).__name__ in ("Upsample", "Downsample")


def diffusers_unet_names(unet: nn.Module) -> dict[str, str]:
    """``{our module name: diffusers module name}`` for every module with weights in ``unet`` (an
    :class:`ldm.models.unet.UNetModel`) that diffusers' ``UNet2DConditionModel`` has."""
    blocks = _block_names(unet)
    out: dict[str, str] = {}
    for name, module in unet.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if name in _TOP:
            out[name] = _TOP[name]
            continue
        match = re.fullmatch(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d)\.(.+)", name)
        if not match or match.group(1) not in blocks:
            continue
        block, rest = blocks[match.group(1)], match.group(2)
        if ".resnets." in block:
            rest = _RESNET.get(rest)
        elif block.endswith("samplers.0"):
            rest = {"op": "conv", "conv": "conv"}.get(rest)
        if rest is not None:
            out[name] = f"{block}.{rest}"
    return out


_HF_LAYER_MODULE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)")


def hf_clip_text_target(name: str) -> tuple[str, str, int | None] | None:
    """A transformers CLIP text module name -> ``(module, parameter, part)`` of the OpenCLIP text tower (names
    relative to the tower), ``part`` 0/1/2 for q/k/v (rows ``[part * d, (part + 1) * d)`` of ``in_proj_weight``),
    None for a whole weight. None when the name is no linear layer of a CLIP text block."""
    match = _HF_LAYER_MODULE.fullmatch(name)
    if not match:
        return None
    layer, module = match.groups()
    if module in _HF_QKV:
        return f"transformer.resblocks.{layer}.attn", "in_proj_weight", "qkv".index(_HF_QKV[module])
    if module in _HF_BLOCK and not module.startswith("layer_norm"):
        return f"transformer.resblocks.{layer}.{_HF_BLOCK[module]}", "weight", None
    return None
