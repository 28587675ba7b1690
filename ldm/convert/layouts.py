"""State-dict layouts: the names a file uses -> the names of this project's modules, and back.

- :func:`normalize_state_dict`: a full SD-layout file (v1, v2 or SDXL, with or without ``model_ema.*``) onto
  ``LatentDiffusion``'s names (SDXL's ``conditioner.embedders.N.transformer.*`` CLIP text weights become the
  OpenCLIP tower's ``conditioner.embedders.N.model.*``).
- :func:`convert_hf_clip_text_state_dict` / :func:`to_hf_clip_text_state_dict`: SD1's OpenAI CLIP text model in
  transformers naming (``cond_stage_model.transformer.text_model.*``) <-> the OpenCLIP text tower of
  :class:`ldm.models.text_encoder.OpenCLIPTextEncoder` (``model.*``).
- :func:`text_encoder_state_dict`: a transformers CLIP text-encoder file onto the encoder's names.
- :func:`to_sd_file_layout`: the inverse of :func:`normalize_state_dict`, this project's names -> the released files'
  (what an export writes).
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Mapping

import torch

from ldm.ema import ema_name
from ldm.io import CheckpointError, materialize

__all__ = [
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "SDXL_HF_TEXT_KEY",
    "UNET_PREFIX",
    "EMA_PREFIX",
    "normalize_state_dict",
    "to_sd_file_layout",
    "convert_hf_clip_text_state_dict",
    "to_hf_clip_text_state_dict",
    "text_encoder_state_dict",
]

log = logging.getLogger(__name__)

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
# SDXL: an embedder holding a transformers CLIP text model (sgm's FrozenCLIPEmbedder, CLIP ViT-L/14)
SDXL_HF_TEXT_KEY = re.compile(r"(conditioner\.embedders\.\d+\.)transformer\.(.+)")
# a text tower of this project's (OpenCLIPTextEncoder) inside the full model: SD1/SD2's or an SDXL embedder's
_TEXT_TOWER_KEY = re.compile(r"(cond_stage_model\.|conditioner\.embedders\.\d+\.)model\.token_embedding\.weight")
_IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "cond_stage_model.transformer.embeddings.position_ids")


# ---------------------------------------------------------------------------------------------------------
# the full model
# ---------------------------------------------------------------------------------------------------------

def normalize_state_dict(sd: Mapping[str, torch.Tensor], *, use_ema: bool = False,
                         has_ema_module: bool = False) -> dict[str, torch.Tensor]:
    """Map a full SD-layout state dict onto ``LatentDiffusion``'s names.

    - SD1 text encoder keys (transformers naming, with or without ``text_model.``) become the OpenCLIP tower's.
    - ``model_ema.*``: with ``use_ema`` the EMA weights replace ``model.diffusion_model.*``; kept as they are when
      the model has an EMA module (training); otherwise dropped.
    """
    out: dict[str, torch.Tensor] = {}
    sd1_text: dict[str, torch.Tensor] = {}
    hf_text: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # SDXL embedder prefix -> its text keys
    ema: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _IGNORED_KEYS:
            continue
        hf_match = SDXL_HF_TEXT_KEY.fullmatch(k)
        if hf_match:
            hf_text[hf_match.group(1)][hf_match.group(2)] = v
        elif k.startswith(SD1_TEXT_PREFIX):
            sd1_text[k[len(SD1_TEXT_PREFIX):]] = v
        elif k.startswith(EMA_PREFIX):
            ema[k[len(EMA_PREFIX):]] = v
        else:
            out[k] = v
    if sd1_text:
        sd1_text = {k: materialize(v) for k, v in sd1_text.items()}
        for k, v in convert_hf_clip_text_state_dict(sd1_text).items():
            out["cond_stage_model." + k] = v
    for prefix, text in hf_text.items():
        text = {k: materialize(v) for k, v in text.items()}
        for k, v in convert_hf_clip_text_state_dict(text).items():
            out[prefix + k] = v
    if ema:
        if has_ema_module:
            out.update({EMA_PREFIX + k: v for k, v in ema.items()})
        elif use_ema:
            unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
            missing = []
            for k in unet_keys:
                s_name = ema_name(k[len("model."):])
                if s_name in ema:
                    out[k] = ema[s_name]
                else:
                    missing.append(k)
            if missing:
                raise CheckpointError(f"EMA weights are incomplete ({len(missing)} UNet tensors have none, e.g. "
                                      f"{missing[0]}); load without EMA (--no-ema)")
    elif use_ema and has_ema_module is False:
        log.info("checkpoint has no separate EMA weights; using the weights it has")
    return out


def to_sd_file_layout(sd: Mapping[str, torch.Tensor], *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """``LatentDiffusion``'s names -> the layout of the released SD 1.x / 2.x / SDXL files (the inverse of
    :func:`normalize_state_dict`, which reads the result back unchanged).

    A text tower without ``text_projection`` is OpenAI's CLIP text model, which the released files (and A1111,
    ComfyUI, diffusers' single-file loader) hold in transformers names: SD1's ``cond_stage_model.model.*`` becomes
    ``cond_stage_model.transformer.text_model.*``, SDXL base's ``conditioner.embedders.0.model.*``
    ``conditioner.embedders.0.transformer.text_model.*`` (with ``embeddings.position_ids`` unless
    ``position_ids`` is False). OpenCLIP towers (SD2's, SDXL's bigG, with ``text_projection``) and every other key
    stay as they are.
    """
    out = dict(sd)
    for key in sd:
        match = _TEXT_TOWER_KEY.fullmatch(key)
        prefix = match and match.group(1)
        if not prefix or prefix + "model.text_projection" in sd:
            continue
        tower = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix + "model.")}
        for k, v in to_hf_clip_text_state_dict(tower, position_ids=position_ids).items():
            out[prefix + "transformer." + k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# the text encoder: open_clip and transformers names
# ---------------------------------------------------------------------------------------------------------

def text_encoder_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP file's text weights converted to the encoder's names (``vision_model.*`` of a full
    CLIP file left out); any other state dict as it is (the encoder reads its own and open_clip's names)."""
    if any(k.endswith("embeddings.token_embedding.weight") for k in state):
        text = {k: v for k, v in state.items() if k.startswith(("text_model.", "embeddings.", "encoder.",
                                                                 "final_layer_norm."))}
        return convert_hf_clip_text_state_dict(text)
    return dict(state)


_HF_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_HF_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OWN_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OWN_IN_PROJ_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def convert_hf_clip_text_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` weights -> this encoder's names (``model.*``).

    Keys are relative to the text model: ``text_model.encoder.layers.0.mlp.fc1.weight`` or
    ``encoder.layers.0.mlp.fc1.weight`` (strip SD1's ``cond_stage_model.transformer.`` prefix first).
    ``embeddings.position_ids`` is dropped; q/k/v projections are concatenated into ``in_proj_*`` [q; k; v].
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name in _HF_TOP:
            out[f"model.{_HF_TOP[name]}"] = value
            continue
        match = _HF_LAYER_KEY.fullmatch(name)
        module = match and match.group(2)
        if module in _HF_QKV:
            qkv[(match.group(1), match.group(3))][_HF_QKV[module]] = value
        elif module in _HF_BLOCK:
            out[f"model.transformer.resblocks.{match.group(1)}.{_HF_BLOCK[module]}.{match.group(3)}"] = value
        else:
            raise ValueError(f"unexpected transformers CLIP text key {key!r}: pass text_model.* keys without "
                             f"the 'cond_stage_model.transformer.' prefix")
    for (layer, kind), parts in sorted(qkv.items()):
        if len(parts) != 3:
            raise ValueError(f"layer {layer} {kind}: only {sorted(parts)} of q/k/v projections given: "
                             f"pass all three")
        out[f"model.transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    return out


def to_hf_clip_text_state_dict(sd: Mapping[str, torch.Tensor],
                               position_ids: bool = True) -> dict[str, torch.Tensor]:
    """This encoder's weights -> transformers ``CLIPTextModel`` names (``text_model.*``).

    Input keys are this module's (``model.*``) or open_clip's CLIP text names. Output keys are relative: prefix
    them with ``cond_stage_model.transformer.`` for an SD1 file. With ``position_ids`` the
    ``embeddings.position_ids`` buffer [1, context] (int64) that SD1 files carry is added.
    """
    top = {ours: hf for hf, ours in _HF_TOP.items()}
    block = {ours: hf for hf, ours in _HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key.removeprefix("model.")
        in_proj = _OWN_IN_PROJ_KEY.fullmatch(name)
        other = _OWN_BLOCK_KEY.fullmatch(name)
        if name in top:
            out[f"text_model.{top[name]}"] = value
        elif in_proj:
            prefix = f"text_model.encoder.layers.{in_proj.group(1)}.self_attn"
            for proj, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{proj}_proj.{in_proj.group(2)}"] = part.clone()  # no shared storage
        elif other and other.group(2) in block:
            out[f"text_model.encoder.layers.{other.group(1)}.{block[other.group(2)]}.{other.group(3)}"] = value
        else:
            raise ValueError(f"{key!r} has no place in the transformers CLIPTextModel layout: export an "
                             f"encoder built with projection=False (SD1) and pass its state_dict()")
    if position_ids and "text_model.embeddings.position_embedding.weight" in out:
        count = out["text_model.embeddings.position_embedding.weight"].shape[0]
        out["text_model.embeddings.position_ids"] = torch.arange(count, dtype=torch.long).unsqueeze(0)
    return out
