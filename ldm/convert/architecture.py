"""What model a checkpoint holds: its stored config (data, checked against an allow-list), else SD v1 / v2 /
SDXL base / SDXL refiner from the tensors' names and shapes.

A config stored in a file someone else made is data, never code: every ``target`` in it must name one of the
project's own model classes (:data:`STORED_TARGET_MODULES`), checked for the whole tree before anything is built.
A YAML config the user passes (``--config``) is code and is not checked here.
"""
from __future__ import annotations

import importlib
import json
import logging
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ldm.config import CONFIG_DIR, load_config
from ldm.convert.layouts import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX
from ldm.io import CheckpointError

__all__ = ["STORED_TARGET_MODULES", "STORED_TARGETS", "check_stored_config", "infer_config"]

log = logging.getLogger(__name__)

# module -> the base class a stored target there must subclass (and be defined in that module)
STORED_TARGET_MODULES: dict[str, type] = {
    "ldm.model": nn.Module,
    "ldm.models.unet": nn.Module,
    "ldm.models.autoencoder": nn.Module,
    "ldm.models.text_encoder": nn.Module,
    "ldm.models.conditioner": nn.Module,
    # training run configs (Lightning .ckpt files): built as the plain model at inference
    "ldm.training.latent_diffusion": nn.Module,
    "ldm.training.autoencoder": nn.Module,
    "ldm.training.losses": nn.Module,
    "ldm.training.lr": object,
}
# single classes allowed from elsewhere (the original configs' placeholder loss)
STORED_TARGETS = frozenset({"torch.nn.Identity"})


def _target_nodes(node: Any, path: str):
    """Every (key path, target) in a config tree, depth first."""
    if isinstance(node, (Mapping, DictConfig)):
        if "target" in node:
            yield f"{path}.target", node["target"]
        for key, value in node.items():
            if key != "target":
                yield from _target_nodes(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}.{i}")


def _leaves(node: Any, path: str):
    """Every (key path, value) of a config tree that is not a mapping or a list, depth first."""
    if isinstance(node, (Mapping, DictConfig)):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}.{i}")
    else:
        yield path, node


def _refuse(source: str, key: str, target: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: stored config {key} = {str(target)[:120]!r} is refused ({why}); a stored "
                           "config may only name the project's own model classes: pass a trusted --config")


def check_stored_config(node: Any, source: str = "checkpoint", path: str = "model") -> None:
    """Refuse a stored config unless every ``target`` in it is one of the project's model classes.

    All names are checked as strings before any module is imported; only then are the (allowed) modules
    imported to check that the name is a class defined there (an ``nn.Module`` for the model modules).
    """
    for key, value in _leaves(node, path):  # OmegaConf would resolve "${...}" (environment variables, ...)
        if isinstance(value, str) and "${" in value:
            raise _refuse(source, key, value, "an interpolation")
    targets = list(_target_nodes(node, path))
    for key, target in targets:
        if not isinstance(target, str) or target.count(".") < 1:
            raise _refuse(source, key, target, "not a dotted class name")
        module, _, name = target.rpartition(".")
        if target not in STORED_TARGETS and (module not in STORED_TARGET_MODULES or not name.isidentifier()
                                             or name.startswith("_")):
            raise _refuse(source, key, target, "not one of the project's model classes")
    for key, target in targets:
        if target in STORED_TARGETS:
            continue
        module, _, name = target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError as e:  # an allowed module this installation does not have
            raise _refuse(source, key, target, f"cannot import {module}: {e}") from e
        base = STORED_TARGET_MODULES[module]
        if not (isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module):
            kind = "class" if base is object else f"{base.__name__} class"
            raise _refuse(source, key, target, f"not a {kind} defined in {module}")


_SDXL_BASE_KEYS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
_SDXL_REFINER_KEY = "conditioner.embedders.0.model."


def _sdxl_config_name(sd: Mapping[str, torch.Tensor], source: str) -> str | None:
    """"sdxl-base.yaml" / "sdxl-refiner.yaml" for an SDXL file (sgm's conditioner layout), None for others.

    Base: CLIP ViT-L/14 (transformers names) as embedder 0 and OpenCLIP bigG as embedder 1; refiner: bigG alone
    as embedder 0. The UNet's vector input (``label_emb.0.0.weight``: 2816 = base, 2560 = refiner) must agree.
    """
    if not any(k.startswith("conditioner.embedders.") for k in sd):
        return None
    if all(any(k.startswith(p) for k in sd) for p in _SDXL_BASE_KEYS):
        name, adm = "sdxl-base.yaml", 2816
    elif any(k.startswith(_SDXL_REFINER_KEY) for k in sd) and not any(
            k.startswith("conditioner.embedders.1.") for k in sd):
        name, adm = "sdxl-refiner.yaml", 2560
    else:
        raise CheckpointError(f"cannot tell the architecture of {source}: its conditioner.embedders.* are neither "
                              "SDXL base's (CLIP-L + bigG) nor the refiner's (bigG); pass --config")
    w = sd.get(UNET_PREFIX + "label_emb.0.0.weight")
    if w is None or tuple(w.shape)[1:] != (adm,):
        found = "none" if w is None else f"width {tuple(w.shape)[1:]}"
        raise CheckpointError(f"{source}: the text encoders are SDXL's ({name}) but the UNet's vector input "
                              f"label_emb.0.0.weight has {found}, not {adm}; pass --config")
    return name


def infer_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None,
                 parameterization: str | None = None, source: str = "checkpoint") -> DictConfig:
    """The config of a checkpoint: its stored JSON config (checked by :func:`check_stored_config`), else SD v1 / v2
    / SDXL base / SDXL refiner from the tensors' names and shapes."""
    if meta and meta.get("config"):
        try:
            stored = json.loads(meta["config"])
        except ValueError as e:
            raise CheckpointError(f"{source}: the stored config is not valid JSON ({e})") from e
        if not isinstance(stored, dict):
            raise CheckpointError(f"{source}: the stored config is not a mapping; pass --config")
        # only the model section is used (a training run's file also holds its data and trainer settings)
        stored = {"model": stored["model"]} if "model" in stored else stored
        check_stored_config(stored.get("model", stored), source, "model" if "model" in stored else "config")
        cfg = OmegaConf.create(stored)
    else:
        sdxl = _sdxl_config_name(sd, source)
        if sdxl is not None:
            name = sdxl
        elif any(k.startswith(SD1_TEXT_PREFIX) for k in sd):
            name = "v1-inference.yaml"
        elif any(k.startswith(SD2_TEXT_PREFIX) for k in sd):
            name = "v2-inference-v.yaml" if parameterization == "v" else "v2-inference.yaml"
        else:
            raise CheckpointError(f"cannot tell the architecture of {source} (no text encoder weights and no "
                                  "stored config); pass --config")
        cfg = load_config(CONFIG_DIR / "sd" / name)
        w = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if sdxl is not None and w is not None and w.shape[1] != cfg.model.params.unet_config.params.in_channels:
            raise CheckpointError(f"{source}: an SDXL UNet with {w.shape[1]} input channels (an inpainting or "
                                  "other special SDXL model) is not supported; pass --config")
        if w is not None and w.shape[1] != cfg.model.params.unet_config.params.in_channels:
            # an inpainting (9-channel) UNet: mask + masked-image latents are concatenated to the input
            cfg.model.params.unet_config.params.in_channels = int(w.shape[1])
            cfg.model.params.conditioning_key = "hybrid"
        log.info("architecture inferred from the checkpoint: configs/sd/%s", name)
    if parameterization is not None:
        cfg.model.params.parameterization = parameterization
    return cfg
