"""Training that starts from weights: ``model.params.init_from`` (``--init FILE`` on train.py).

    init_from: base.safetensors                   # every part from one file (the UNet, the text encoder, the VAE)
    init_from:                                    # or a list of entries, applied in order
      - {path: base.safetensors, parts: [unet]}
      - {path: tower.safetensors, parts: [text_encoder]}
      - {path: sd-v1-5.ckpt, parts: [unet], ema: true, keep_new: true}

An entry's ``parts`` are any of ``unet`` (``model.diffusion_model.*``), ``text_encoder`` (``cond_stage_model.*``,
or ``conditioner.*`` for a ``conditioner_config`` model) and ``first_stage`` (``first_stage_model.*``); without
``parts`` all three, except ``first_stage`` when ``first_stage_ckpt`` names the autoencoder's file. The file may
be in any layout the loaders read (this project's exports and training checkpoints, SD 1 files with OpenAI-CLIP
text keys, SD 2 files, fp16 or fp32; the format comes from the file's bytes). ``ema: true`` takes the UNet from
the file's ``model_ema.*`` weights. Each part loads strictly: a missing, unexpected or mis-shaped tensor is an
error that lists them; ``keep_new: true`` lets tensors the file lacks keep their fresh initialisation (they are
logged), e.g. a UNet with ``position_embedding: true`` started from a file without one. The noise schedule and
``scale_factor`` stay the config's, and the UNet's EMA starts from the loaded weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ldm.convert.layouts import EMA_PREFIX, normalize_state_dict
from ldm.io import check_state_dict, read_state_dict
from ldm.config import to_plain

log = logging.getLogger(__name__)

__all__ = ["PARTS", "InitSource", "parse_init_from", "init_from_files"]

PARTS = {
    "unet": ("model.diffusion_model.",),
    "text_encoder": ("cond_stage_model.", "conditioner."),
    "first_stage": ("first_stage_model.",),
}
_FLAGS = ("ema", "keep_new")


@dataclass(frozen=True)
class InitSource:
    """One ``init_from`` entry: the parts of the model that ``path`` initialises."""

    path: str
    parts: tuple[str, ...]
    ema: bool = False
    keep_new: bool = False


def parse_init_from(value: Any, default_parts: Sequence[str] = tuple(PARTS)) -> list[InitSource]:
    """``init_from`` (a path, an entry ``{path, parts, ema, keep_new}`` or a list of them) as checked entries."""
    value = to_plain(value)
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise ValueError("init_from is an empty list: give a file, or leave init_from out")
    sources = []
    for i, entry in enumerate(entries):
        where = "init_from" if not isinstance(value, list) else f"init_from[{i}]"
        if isinstance(entry, (str, Path)):
            entry = {"path": str(entry)}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{where}: {entry!r} is neither a file path nor an entry with a path "
                             "(e.g. {path: base.safetensors, parts: [unet]})")
        unknown = sorted(set(entry) - {"path", "parts", *_FLAGS})
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; an entry has path, parts, ema, keep_new")
        parts = entry.get("parts", default_parts)
        parts = [parts] if isinstance(parts, str) else list(parts)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"{where}: parts {parts!r} are not valid; use some of {', '.join(PARTS)}")
        if not Path(entry["path"]).is_file():
            raise ValueError(f"{where}: file not found: {entry['path']} (check the path given to init_from/--init)")
        sources.append(InitSource(entry["path"], tuple(dict.fromkeys(parts)),
                                  bool(entry.get("ema", False)), bool(entry.get("keep_new", False))))
    return sources


def init_from_files(model: nn.Module, sources: Sequence[InitSource]) -> None:
    """Initialise the parts of ``model`` (an SD-layout ``LatentDiffusion``) that ``sources``
    (:func:`parse_init_from`) name, entry by entry (a later entry overwrites what an earlier one set)."""
    for source in sources:
        _load(model, source)


def _load(model: nn.Module, source: InitSource) -> None:
    raw, _ = read_state_dict(source.path)
    if source.ema and not any(k.startswith(EMA_PREFIX) for k in raw):
        raise ValueError(f"init_from {source.path}: ema is true but the file has no {EMA_PREFIX}* weights; "
                         "set ema: false")
    state = normalize_state_dict(raw, use_ema=source.ema)
    own = model.state_dict()
    prefixes = tuple(p for part in source.parts for p in PARTS[part])
    wanted = {k: v for k, v in own.items() if k.startswith(prefixes)}
    given = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if not given:
        raise ValueError(f"init_from {source.path} holds no weights for {', '.join(source.parts)} "
                         f"(no {' / '.join(p + '*' for p in prefixes)} tensors); give parts it has")
    if source.keep_new:
        new = sorted(k for k in wanted if k not in given)
        if new:
            log.info("init_from %s: %d tensors it lacks keep their initialisation: %s", source.path, len(new),
                     ", ".join(new))
        wanted = {k: v for k, v in wanted.items() if k in given}
    check_state_dict(wanted, given, f"init_from {source.path} ({', '.join(source.parts)})",
                     fix="give a file of the same architecture, fewer parts, or keep_new for tensors it lacks")
    with torch.no_grad():
        for k, v in given.items():
            own[k].copy_(v)  # into the existing tensors: their dtype (an fp16 file gives fp32 weights) and layout
    log.info("init_from %s: %d tensors of %s%s", source.path, len(given), ", ".join(source.parts),
             " (EMA weights)" if source.ema else "")
