"""LoRA and LyCORIS files merged into the weights of a loaded model, and un-merged exactly.

    load_lora(model, "style.safetensors", weight=0.8)   # merged: W += 0.8 * alpha / rank * up @ down
    unload_loras(model)                                  # every touched weight back, bit for bit
    prompt, tags = extract_lora_tags("a cat <lora:style:0.8>")   # A1111's prompt syntax

Formats (what the popular trainers write):

- kohya / A1111: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, text encoders
  ``lora_te_`` (SDXL ``lora_te1_`` CLIP-L, ``lora_te2_`` OpenCLIP bigG) in transformers' CLIP names. UNet modules
  use diffusers' names for SD 1.x/2.x (``down_blocks_0_attentions_0_...``) and the original ones for SDXL
  (``input_blocks_4_1_...``); both are accepted for any model. LoCon: the same keys on conv layers (the down
  weight a k x k conv, the up weight a 1x1 conv), with an optional ``lora_mid`` (CP decomposition).
- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``, ``text_encoder_2.``),
  and diffusers' older ``.lora.down.weight`` / ``.lora_linear_layer.down.weight`` / ``.processor.to_q_lora.``.
- LyCORIS LoHa (``hada_w1_a`` ...: ``(w1a @ w1b) * (w2a @ w2b)``) and LoKr (``lokr_w1`` ...: ``kron(w1, w2)``).

Each layer's update is ``weight * scale * delta`` with ``scale = alpha / rank`` (1 without alpha), computed in
float32 and written into the weight in place (the CPU acceleration pass re-caches a weight changed in place). The
first time a weight is touched its original is kept, so unloading restores it exactly whatever its dtype. A
file with a key that matches no layer of the model, or a layer of another shape (a LoRA for another
architecture), is refused in one line, before anything is merged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from torch import nn

from ldm.convert.module_names import diffusers_unet_names, hf_clip_text_target
from ldm.io import CheckpointError, detect_format, read_state_dict
from ldm.models.clip_text import TextTransformer, text_tower_types

__all__ = [
    "LORA_EXTENSIONS",
    "LoraTag",
    "LoadedLora",
    "extract_lora_tags",
    "find_lora",
    "lora_hash",
    "load_lora",
    "unload_loras",
    "loaded_loras",
    "LoraUpdate",
    "lora_updates",
]

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

# file suffix after the module name -> role; longest first so that ".lora.down.weight" wins over ".down.weight"
_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "LyCORIS full (diff)",
                "diff_b": "LyCORIS full (diff)", "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
                "oft_blocks": "OFT", "oft_diag": "OFT", "lora_embedding_A": "embedding LoRA"}
# diffusers' attention-processor LoRA: "...attn1.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
# what a name starts with -> the component: "unet" or the index of the text encoder
_COMPONENTS = (("lora_unet_", "unet"), ("lora_te1_", 0), ("lora_te2_", 1), ("lora_te3_", 2), ("lora_te_", 0),
               ("unet.", "unet"), ("text_encoder_2.", 1), ("text_encoder.", 0))


# ------------------------------------------------------------------------------------------------------------
# prompt tags and files
# ------------------------------------------------------------------------------------------------------------

class LoraTag(NamedTuple):
    """One ``<lora:NAME:WEIGHT>`` of a prompt. ``unet_weight`` is None unless the tag gives its own
    (``<lora:NAME:TE:UNET>`` or ``unet=``): then ``weight`` is the text encoders' weight."""

    name: str
    weight: float = 1.0
    unet_weight: float | None = None


_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{tag}: {text!r} is not a number; write <lora:NAME:WEIGHT>, e.g. <lora:style:0.8>") \
            from None


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """A1111's ``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` and ``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` (also
    ``te=`` / ``unet=``; ``<lyco:...>`` the same) taken out of a prompt: ``(the prompt without them, the tags)``.
    The text around a tag is kept as it is (A1111 removes only the tag)."""
    tags: list[LoraTag] = []
    for match in _TAG.finditer(prompt):
        tag = match.group(0)
        positional, named = [], {}
        for item in match.group(2).split(":"):
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip().lower()] = value.strip()
            else:
                positional.append(item.strip())
        if not positional or not positional[0]:
            raise ValueError(f"{tag} names no LoRA: write <lora:NAME:WEIGHT>")
        unknown = sorted(set(named) - {"te", "unet"})
        if unknown or len(positional) > 4:
            raise ValueError(f"{tag}: only a weight (or a text-encoder and a UNet weight) is supported, not "
                             f"{', '.join(unknown) or 'a fifth value'}; write <lora:NAME:WEIGHT>")
        if len(positional) == 4:
            raise ValueError(f"{tag}: dynamic rank (a fourth value) is not supported; write <lora:NAME:TE:UNET>")
        weight = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
        unet = named.get("unet", positional[2] if len(positional) > 2 else None)
        tags.append(LoraTag(positional[0], weight, None if unet is None else _number(unet, tag)))
    return _TAG.sub("", prompt), tags


def find_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file of a LoRA named in a prompt: ``NAME`` + .safetensors / .pt / .ckpt in ``lora_dir`` or one of its
    sub-folders (as A1111 indexes them). A name cannot leave the folder (no path separators, no "..")."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA folder not found: {folder} (check --lora-dir)")
    if not name or any(c in name for c in "/\\\0") or name in (".", "..") or name.startswith("."):
        raise ValueError(f"LoRA name {name!r} is not a file name: write the file's name without its extension")
    for ext in LORA_EXTENSIONS:
        path = folder / (name + ext)
        if path.is_file():
            return path
    nested = sorted(p for ext in LORA_EXTENSIONS for p in folder.rglob(name + ext) if p.is_file())
    root = folder.resolve()
    nested = [p for p in nested if root in p.resolve().parents]
    if nested:
        return nested[0]
    raise FileNotFoundError(f"LoRA {name!r} not found in {folder} (looked for {name}.safetensors, .pt, .ckpt): "
                            "check the name in the prompt or --lora-dir")


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a LoRA file (its "Lora hashes" infotext): the ``sshs_model_hash`` the trainer stored,
    else for a safetensors file the sha256 of the bytes after the header (kohya's / sd-webui-additional-networks'
    "addnet" hash, which ignores the metadata), else the sha256 of the whole file; the first 12 hex digits."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if detect_format(path) == "safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
            if stored:
                return str(stored)[:12]
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------
# the model's layers under the names LoRA files use
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    """A weight a LoRA may change: ``param`` (rows ``part`` of 3 for a fused q/k/v projection)."""

    name: str
    module: nn.Module
    param_name: str
    part: int | None = None

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.param.shape)
        return shape if self.part is None else (shape[0] // 3,) + shape[1:]


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _text_towers(model: nn.Module) -> list[tuple[str, TextTransformer]]:
    """The OpenCLIP text towers of the model's text embedders, in the conditioner's order."""
    conditioner = getattr(model, "conditioner", None)
    embedders = list(conditioner.embedders) if conditioner is not None else [model]
    towers = []
    owner_names = {id(m): n for n, m in model.named_modules()}
    for embedder in embedders:
        for name, module in embedder.named_modules():
            if isinstance(module, text_tower_types()):
                prefix = owner_names.get(id(module), name)
                towers.append((prefix, module))
                break
    return towers


def _targets(model: nn.Module) -> dict[tuple, _Target]:
    """``{(component, flat module name): target}``: component "unet" or a text encoder's index; flat names with
    "_" for "." (kohya's spelling), under every name the formats use."""
    table: dict[tuple, _Target] = {}
    unet = model.model.diffusion_model
    diffusers = diffusers_unet_names(unet)
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            target = _Target(f"model.diffusion_model.{name}", module, "weight")
            table[("unet", _flat(name))] = target
            if name in diffusers:
                table[("unet", _flat(diffusers[name]))] = target
    for index, (prefix, tower) in enumerate(_text_towers(model)):
        for layer in range(len(tower.transformer.resblocks)):
            for hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2"):
                hf_name = f"text_model.encoder.layers.{layer}.{hf}"
                module_name, param, part = hf_clip_text_target(hf_name)
                module = tower.get_submodule(module_name)
                target = _Target(f"{prefix}.{module_name}.{param}" + ("" if part is None else f"[{'qkv'[part]}]"),
                                 module, param, part)
                table[(index, _flat(hf_name))] = target
                table[(index, _flat(hf_name.removeprefix("text_model.")))] = target
    return table


def _split_key(key: str) -> tuple[str, str]:
    """A file key -> (module name as written, role)."""
    processor = _PROCESSOR.fullmatch(key)
    if processor:
        base, proj, role = processor.groups()
        return f"unet.{base}.{proj}" + (".0" if proj == "to_out" else ""), role
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], _ROLES[suffix]
    last = key.rsplit(".", 1)[-1]
    if key.endswith(".weight"):
        last = key[:-len(".weight")].rsplit(".", 1)[-1]
    if last in _UNSUPPORTED:
        raise CheckpointError(f"{key}: {_UNSUPPORTED[last]} weights are not supported; use a plain LoRA, LoCon, "
                              "LoHa or LoKr file")
    raise CheckpointError(f"{key} is no LoRA weight (expected .lora_down/.lora_up/.alpha, .lora_A/.lora_B, "
                          "hada_* or lokr_*)")


def _component(module: str) -> tuple[object, str] | None:
    """(component, flat module name) of a module name as written in a file."""
    module = module.removeprefix("base_model.model.")
    for prefix, component in _COMPONENTS:
        if module.startswith(prefix):
            return component, _flat(module[len(prefix):])
    return None


# ------------------------------------------------------------------------------------------------------------
# the updates
# ------------------------------------------------------------------------------------------------------------

def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker/CP rebuild of a conv weight: ``t`` [r, r, k, k], ``wa`` [out, r], ``wb`` [r, in]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _delta(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], scale: float = 1.0
           ) -> tuple[torch.Tensor, int | None]:
    """(``scale`` * the float32 update shaped like the weight, its rank: None for a LoKr of two full factors) of one
    layer; ValueError when it does not fit. Runs on "meta" tensors too (the shape check before any merge). The
    scale goes into the smallest factor (one pass less over the weight-sized update)."""
    p = {k: v.float() for k, v in parts.items() if k != "alpha"}
    if "down" in p or "up" in p:
        if "down" not in p or "up" not in p:
            raise ValueError(f"has {'down' if 'down' in p else 'up'} but not {'up' if 'down' in p else 'down'}")
        down, up = p["down"], p["up"] * scale
        rank = down.shape[0]
        if "mid" in p:
            delta = torch.einsum("n m k l, i n, m j -> i j k l", p["mid"], up.flatten(1), down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        p["hada_w1_a"] = p["hada_w1_a"] * scale
        if "hada_t1" in p:
            delta = (_cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                     * _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]))
        else:
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    elif any(k.startswith("lokr_") for k in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        rank = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
        w1 = w1 * scale
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise ValueError(f"has only {sorted(parts)}")
    if delta.shape[0] != shape[0] or delta.numel() != math.prod(shape):
        raise ValueError(f"makes an update of shape {list(delta.shape)} for a weight of shape {list(shape)}")
    return delta.reshape(shape), rank


@dataclass
class LoraUpdate:
    """One layer's update of a LoRA file, checked to fit: ``scale = alpha / rank`` (1 without alpha or rank)."""

    target: _Target
    parts: dict[str, torch.Tensor]
    scale: float
    is_text: bool

    def delta(self, weight: float = 1.0) -> torch.Tensor:
        """``weight * scale * update`` in float32, shaped like the weight (or its q/k/v rows)."""
        return _delta(self.parts, self.target.shape, weight * self.scale)[0]


def lora_updates(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "LoRA file"
                 ) -> list[LoraUpdate]:
    """The layers a LoRA state dict changes, checked against ``model`` (on "meta" tensors: nothing is computed
    yet): one CheckpointError line for keys that match no layer, or updates of the wrong shape."""
    table = _targets(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, role = _split_key(key)
        groups.setdefault(module, {})[role] = value
    unmatched, misfit, out = [], [], []
    for module, parts in groups.items():
        where = _component(module)
        target = table.get(where) if where is not None else None
        if target is None:
            unmatched.append(module)
            continue
        try:
            _, rank = _delta({k: v.to("meta") for k, v in parts.items()}, target.shape)
        except ValueError as e:
            misfit.append(f"{module} {e}")
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        scale = alpha / rank if alpha is not None and rank else 1.0
        out.append(LoraUpdate(target, parts, scale, where[0] != "unet"))
    if unmatched or misfit:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} of {len(groups)} layers match no layer of this model "
                            f"({', '.join(unmatched[:3])}{', ...' if len(unmatched) > 3 else ''})")
        if misfit:
            problems.append(f"{len(misfit)} do not fit ({'; '.join(misfit[:2])}{'; ...' if len(misfit) > 2 else ''})")
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(problems)}; is it a LoRA for another "
                              "architecture (SD 1.x / 2.x / SDXL)?")
    if not out:
        raise CheckpointError(f"{source} holds no LoRA weights")
    return out


# ------------------------------------------------------------------------------------------------------------
# merging and un-merging
# ------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedLora:
    """A LoRA merged into a model: its name (for the infotext), file, weights and short hash."""

    name: str
    path: Path
    weight: float
    unet_weight: float | None
    hash: str
    source: str = "api"  # "api" (load_lora) or "prompt" (a <lora:...> tag)
    state: dict = field(default_factory=dict, repr=False)
    embeddings: list = field(default_factory=list)  # its bundled embeddings (ldm.adapters.embeddings.Embedding)


@dataclass
class _Stack:
    """What is merged into one model: the LoRAs in order and the original of every weight they touched."""

    loras: list[LoadedLora] = field(default_factory=list)
    originals: dict[int, tuple[nn.Module, str, torch.Tensor]] = field(default_factory=dict)


def _stack(model: nn.Module) -> _Stack:
    stack = model.__dict__.get("_lora_stack")
    if stack is None:
        stack = _Stack()
        object.__setattr__(model, "_lora_stack", stack)  # not a submodule or buffer: no state-dict entry
    return stack


def _merge(model: nn.Module, lora: LoadedLora, updates: list[LoraUpdate]) -> None:
    stack = _stack(model)
    with torch.no_grad():
        for update in updates:
            target = update.target
            param = target.param
            if id(param) not in stack.originals:
                stack.originals[id(param)] = (target.module, target.param_name, param.detach().clone())
            weight = lora.weight if update.is_text or lora.unet_weight is None else lora.unet_weight
            rows = param if target.part is None else param.chunk(3, dim=0)[target.part]
            delta = update.delta(weight).to(rows.device)
            if rows.dtype == torch.float32:
                rows.add_(delta)
            else:  # add in float32, round once
                rows.copy_(rows.float().add_(delta))
    _text_changed(model)


def _text_changed(model: nn.Module) -> None:
    """Cached text embeddings (``Conditioner.enable_cache``) are stale once a text encoder's weights change."""
    cache = getattr(getattr(model, "conditioner", None), "cache", None)
    if cache:
        cache.clear()


def _with_peft_alphas(state: dict[str, torch.Tensor], meta: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """diffusers' peft files keep ``lora_alpha`` (and per-module ``alpha_pattern``) in the safetensors metadata
    (``lora_adapter_metadata``: ``{"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "text_encoder.r": ...}``)
    instead of ``.alpha`` tensors: they become ``.alpha`` entries of their modules (scale ``lora_alpha / r``)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return state
    config = json.loads(raw)
    out = dict(state)
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        prefix, _, name = module.partition(".")
        alpha = config.get(f"{prefix}.lora_alpha")
        for pattern, value in (config.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", name):
                alpha = value
        if alpha is not None and module + ".alpha" not in state:
            out[module + ".alpha"] = torch.tensor(float(alpha))
    return out


_BUNDLE = "bundle_emb."


def split_bundled_embeddings(state: Mapping[str, torch.Tensor], source: str = "LoRA file"
                             ) -> tuple[dict[str, torch.Tensor], list]:
    """A LoRA file's tensors -> (its LoRA tensors, its bundled textual-inversion embeddings): A1111's
    ``bundle_emb.<name>.string_to_param.*`` / ``.emb_params`` / ``.clip_l`` + ``.clip_g`` (kohya's and
    :mod:`ldm.adapters.lora_train`'s pivotal-tuning output), each an embedding called by ``<name>``."""
    from ldm.adapters.embeddings import Embedding, embedding_vectors

    rest, bundles = {}, {}
    for key, value in state.items():
        if key.startswith(_BUNDLE):
            name, _, inner = key[len(_BUNDLE):].partition(".")
            bundles.setdefault(name, {})[inner] = value
        else:
            rest[key] = value
    embeddings = []
    for name, tensors in bundles.items():
        vectors, _ = embedding_vectors(tensors, f"{source}: bundled embedding {name!r}")
        embeddings.append(Embedding(name, vectors))
    return rest, embeddings


def load_lora(model: nn.Module, path: str | os.PathLike, weight: float = 1.0, *, unet_weight: float | None = None,
              name: str | None = None, source: str = "api") -> LoadedLora:
    """Merge a LoRA / LoCon / LoHa / LoKr file into ``model`` (a ``LatentDiffusion``) with ``weight`` (the text
    encoders' and the UNet's, or the text encoders' alone when ``unet_weight`` is given). Checked first: nothing
    changes when the file does not fit. Returns what was loaded (name, hash for the infotext)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path} (check the path)")
    for label, value in (("weight", weight), ("unet_weight", unet_weight)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"LoRA {label} {value} is not a finite number")
    state, meta = read_state_dict(path)
    state, embeddings = split_bundled_embeddings(_with_peft_alphas(state, meta), f"LoRA {path}")
    from ldm.adapters.prompts import text_encoders

    for embedding in embeddings:  # checked before anything merges
        for encoder in text_encoders(model):
            embedding.vectors_for(encoder)
    lora = LoadedLora(name or path.stem, path, float(weight), None if unet_weight is None else float(unet_weight),
                      lora_hash(path), source, state, embeddings)
    _merge(model, lora, lora_updates(model, state, f"LoRA {path}") if state or not embeddings else [])
    _stack(model).loras.append(lora)
    log.info("LoRA %s merged (weight %g, %s)", lora.name, lora.weight, lora.hash)
    return lora


def unload_loras(model: nn.Module, source: str | None = None) -> None:
    """Restore every weight a LoRA changed, exactly; with ``source`` ("api" / "prompt") only those LoRAs go and
    the others are merged again."""
    stack = _stack(model)
    if not stack.originals:
        stack.loras.clear()
        return
    keep = [] if source is None else [lora for lora in stack.loras if lora.source != source]
    with torch.no_grad():
        for module, param_name, original in stack.originals.values():
            getattr(module, param_name).copy_(original)
    stack.originals.clear()
    stack.loras[:] = []
    _text_changed(model)
    for lora in keep:
        _merge(model, lora, lora_updates(model, lora.state, f"LoRA {lora.path}") if lora.state else [])
        stack.loras.append(lora)


def loaded_loras(model: nn.Module) -> list[LoadedLora]:
    """The LoRAs merged into ``model``, in the order they were loaded."""
    return list(_stack(model).loras)
