"""LoRA training of a latent diffusion model: what the training module does with ``model.params.lora``.

    model:
      target: ldm.training.latent_diffusion.LatentDiffusionModule
      params:
        init_from: v1-5-pruned-emaonly.safetensors     # the frozen base model
        lora: {rank: 16, alpha: 16, targets: [attn, ff], dropout: 0.0}

Only the branches of :class:`ldm.adapters.lora_train.LoraNetwork` train; every weight of the model is frozen.
A training checkpoint holds only them (``lora.*``), their EMA (``model_ema.*``, with ``use_ema``) and the optimizer
state, plus a fingerprint of the frozen base weights: ``--resume`` builds the base again from the config (its
``init_from``) and refuses a base that differs (the fingerprint is of the base as built, in fp32, whatever the
precision). Under ``precision: bf16-mixed`` the frozen base is kept in bf16 (:func:`store_frozen_base_in_`, as
diffusers' LoRA script does) and only the LoRA in fp32. The export is a kohya-format ``.safetensors`` (see
:func:`export_lora`), which sample.py ``--lora``, A1111, ComfyUI and diffusers load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ldm.config import to_plain
from ldm.ema import ema_name
from ldm.io import CheckpointError, atomic_write

log = logging.getLogger(__name__)

__all__ = ["LORA_PREFIX", "is_lora_state", "checkpoint_state", "base_fingerprint", "store_frozen_base_in_",
           "lora_file_state", "lora_metadata", "export_lora"]

LORA_PREFIX = "lora."
_EMA_PREFIX = "model_ema."
_BRANCHES = "branches."


def is_lora_state(state: Mapping[str, Any]) -> bool:
    """Whether a training state dict is a LoRA run's (it has ``lora.*`` tensors)."""
    return any(k.startswith(LORA_PREFIX) for k in state)


def checkpoint_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a LoRA run's state dict a training checkpoint keeps: the branches and their EMA."""
    return {k: v for k, v in state.items() if k.startswith((LORA_PREFIX, _EMA_PREFIX))}


def base_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the frozen base weights (everything but ``lora.*`` and
    ``model_ema.*``): a resumed LoRA run checks that it trains on the same base."""
    digest = hashlib.sha256()
    for key in sorted(state):
        if key.startswith((LORA_PREFIX, _EMA_PREFIX)):
            continue
        t = state[key].detach().cpu()
        digest.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.flatten().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def store_frozen_base_in_(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Keep the weights (and biases) of the frozen linear and convolution layers (``nn.MultiheadAttention``'s
    fused projection included) of ``modules`` in ``dtype`` itself, for training under autocast to ``dtype``: they
    are what autocast casts them to in every call, so the forward computes the same numbers, without casting the
    base again at every step and without a float32 copy beside it (half the base's memory in bf16). Norms and
    embeddings stay float32, as autocast runs them. Lossy and in place: the float32 values are gone, and the
    model then needs autocast (a layer of ``dtype`` does not take a float32 input). A UNet's cached inference copy
    (:mod:`ldm.accel`) is dropped and is then the stored weights themselves. The LoRA branches must not be in
    ``modules`` (they train in float32)."""
    from ldm import accel

    for module in modules:
        accel.store_weights_in_(module, dtype)  # the UNets, and their cached copies
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)):
                layer.to(dtype)  # one layer at a time: each float32 tensor is freed as it is replaced


def lora_file_state(state: Mapping[str, torch.Tensor], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA run's state dict (a training checkpoint's, or the module's) -> the kohya file's tensors, from the EMA
    weights when ``use_ema`` and the run has them."""
    from ldm.adapters.lora_train import TOKENS_PREFIX, bundled_embeddings, kohya_state_dict

    branches = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
    if not branches:
        raise CheckpointError("no LoRA weights (lora.*) in this state dict: was model.params.lora set?")
    if use_ema:
        swapped = 0
        for key in branches:
            shadow = _EMA_PREFIX + ema_name(key)
            if shadow in state and not key.endswith(".alpha"):
                branches[key] = state[shadow]
                swapped += 1
        if swapped:
            log.info("LoRA export: %d tensors from the EMA weights", swapped)
    return kohya_state_dict(branches, prefix=_BRANCHES) | bundled_embeddings(branches, prefix=TOKENS_PREFIX)


def _file_hashes(path: str) -> dict[str, str]:
    """A1111's hashes of a base model file: the sha256 (``ss_new_sd_model_hash``) and the old 8-digit one
    (``ss_sd_model_hash``: 64 KiB from offset 1 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return {"ss_new_sd_model_hash": digest.hexdigest(), "ss_sd_model_hash": legacy}


def _base_file(init_from: Any) -> str | None:
    """The file the UNet was initialised from (the last ``init_from`` entry that gives it)."""
    if init_from is None:
        return None
    entries = init_from if isinstance(init_from, list) else [init_from]
    path = None
    for entry in entries:
        if isinstance(entry, str):
            path = entry
        elif isinstance(entry, Mapping) and (not entry.get("parts") or "unet" in entry["parts"]):
            path = entry.get("path")
    return path


def _base_version(params: Mapping[str, Any]) -> str:
    """kohya's ``ss_base_model_version`` of the architecture."""
    if params.get("conditioner_config") is not None:
        return "sdxl_base_v1-0"
    context = ((params.get("unet_config") or {}).get("params") or {}).get("context_dim")
    return {768: "sd_v1", 1024: "sd_v2"}.get(context, "ldm")


def _tensor_hashes(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the file's bytes after the header, without metadata: the hash
    A1111 shows for a LoRA) and ``sshs_legacy_hash`` (64 KiB from offset 1 MiB of that file, 8 digits)."""
    from safetensors.torch import save

    data = save(dict(tensors))
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def lora_metadata(run_config: Mapping[str, Any], step: int | None = None, name: str | None = None
                  ) -> dict[str, str]:
    """kohya's ``ss_*`` metadata of a LoRA run (network, base model, training settings) from its config."""
    from ldm.adapters.lora_train import parse_lora_config

    config = to_plain(run_config)
    node = config.get("model", config)
    params = node.get("params") or {}
    lora = parse_lora_config(params.get("lora"))
    alpha = lora.rank if lora.alpha is None else lora.alpha
    data = (config.get("data") or {}).get("params") or {}
    lr = params.get("learning_rate") or params.get("base_learning_rate")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_dropout": f"{lora.dropout:g}",
        "ss_network_args": json.dumps({"targets": list(lora.targets)}
                                      | ({"conv_dim": str(lora.rank), "conv_alpha": f"{alpha:g}"}
                                         if "conv" in lora.targets else {})),
        "ss_base_model_version": _base_version(params),
        "ss_v2": str(_base_version(params) == "sd_v2"),
        "ss_v_parameterization": str(params.get("parameterization") == "v"),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(lr if "text" in lora.targets else 0),
        "ss_optimizer": str(params.get("optimizer", "adamw")),
        "ss_lr_warmup_steps": str(params.get("warmup_steps", 0)),
        "ss_noise_offset": str(params.get("offset_noise", 0.0)),
        "ss_min_snr_gamma": str(params.get("min_snr_gamma") if params.get("loss_weighting") == "min_snr" else None),
        "ss_seed": str(config.get("seed")),
        "ss_training_finished_at": str(time.time()),
    }
    if step is not None:
        meta["ss_steps"] = str(step)
    if name:
        meta["ss_output_name"] = name
    if "batch_size" in data:
        meta["ss_batch_size_per_device"] = str(data["batch_size"])
    for key in ("size", "resolution"):
        if key in data:
            meta["ss_resolution"] = str(data[key])
    base = _base_file(params.get("init_from"))
    if base and os.path.isfile(base):
        meta["ss_sd_model_name"] = Path(base).stem
        meta.update(_file_hashes(base))
    return meta


def export_lora(state: Mapping[str, torch.Tensor], path: str | os.PathLike, run_config: Mapping[str, Any], *,
                use_ema: bool = True, step: int | None = None, fp16: bool = False) -> Path:
    """Write a LoRA run's adapter as a kohya-format ``.safetensors`` with kohya's metadata (see
    :func:`lora_metadata`; ``sshs_model_hash`` is the hash A1111 shows)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = lora_file_state(state, use_ema=use_ema)
    if fp16:
        tensors = {k: v if k.endswith(".alpha") else v.half() for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = lora_metadata(run_config, step, path.stem)
    meta.update(_tensor_hashes(tensors))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    log.info("exported LoRA %s (%d tensors, rank %s)", path, len(tensors), meta["ss_network_dim"])
    return path
