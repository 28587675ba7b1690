"""Conditioning owned by the model: a :class:`Conditioner` of embedders (the shape of sgm's GeneralConditioner).

Each embedder reads one or more entries of a batch dict (its ``input_key`` / ``input_keys``: ``txt``,
``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``, ``aesthetic_score``, ``mask``,
``masked_image_latents``, ...) and returns one tensor or a tuple of tensors. The number of dimensions of a tensor
says where it goes: ``[B, D]`` is a ``vector`` (the UNet's ``y``), ``[B, L, D]`` is ``crossattn`` (the UNet's
``context``), ``[B, C, H, W]`` is ``concat`` (extra input channels). Outputs of one kind are concatenated (vector
along dim 1, crossattn along the feature dim 2, concat along the channels), so the result is the dict the UNet
wrapper takes::

    conditioner = Conditioner([
        {"target": "ldm.models.conditioner.TextEmbedder", "params": {"arch": "ldm-tiny-text", "pooled": True},
         "input_key": "txt", "ucg_rate": 0.1, "legacy_ucg_value": ""},
        {"target": "ldm.models.conditioner.ConcatTimestepEmbedderND", "params": {"outdim": 8},
         "input_key": "original_size_as_tuple"},
    ])
    cond = conditioner({"txt": ["a red circle"], "original_size_as_tuple": torch.tensor([[64, 64]])})
    # {"crossattn": [1, 77, 32], "vector": [1, 32 + 2 * 8]}

Classifier-free-guidance training drops each embedder's conditioning on its own, with probability ``ucg_rate``,
drawn from the generator given (one ``torch.rand(batch)`` per embedder with a rate, in order): an embedder
with a ``legacy_ucg_value`` (``""`` for a text encoder, as SD 1/2 were trained) sees that value in place of its
input; the others have their output set to zero (as SDXL). ``is_trainable: false`` (the default) freezes an
embedder (eval mode, no gradients). The embedders are stored as ``embedders.N.*`` (sgm's names), so an SDXL-style
model keeps its weights under ``conditioner.embedders.N.*``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.config import instantiate_from_config, to_plain
from ldm.models.text_encoder import (OpenCLIPTextEncoder, _is_plain_block, _is_prompt_objects,
                                     _plain_block_forward, emphasize)
from ldm.models.unet import timestep_embedding

__all__ = ["Conditioner", "EmbedderSpec", "TextEmbedder", "ConcatTimestepEmbedderND", "InpaintingConcat",
           "KINDS", "micro_inputs"]

KINDS = ("crossattn", "vector", "concat")
_KIND_OF_NDIM = {2: "vector", 3: "crossattn", 4: "concat"}
_CAT_DIM = {"vector": 1, "crossattn": 2, "concat": 1}
_SPEC_KEYS = ("input_key", "input_keys", "ucg_rate", "legacy_ucg_value", "is_trainable")


@dataclass(frozen=True)
class EmbedderSpec:
    """How the conditioner uses one embedder: the batch entries it reads, its CFG drop rate, the input value a
    dropped sample gets (None: its output is zeroed instead) and whether it trains."""

    input_keys: tuple[str, ...]
    ucg_rate: float = 0.0
    legacy_ucg_value: Any = None
    is_trainable: bool = False

    @classmethod
    def from_options(cls, where: str, input_key: str | None = None, input_keys: Sequence[str] | None = None,
                     ucg_rate: float = 0.0, legacy_ucg_value: Any = None, is_trainable: bool = False
                     ) -> "EmbedderSpec":
        if (input_key is None) == (input_keys is None):
            raise ValueError(f"{where}: give exactly one of input_key (e.g. txt) or input_keys (a list)")
        keys = (input_key,) if input_key is not None else tuple(input_keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"{where}: input_key(s) {keys!r} must be non-empty strings")
        if not 0.0 <= float(ucg_rate) <= 1.0:
            raise ValueError(f"{where}: ucg_rate={ucg_rate!r} is out of range; use a value in [0, 1]")
        if legacy_ucg_value is not None and len(keys) != 1:
            raise ValueError(f"{where}: legacy_ucg_value replaces one input; this embedder reads {list(keys)}")
        return cls(keys, float(ucg_rate), legacy_ucg_value, bool(is_trainable))


class Conditioner(nn.Module):
    """A batch dict -> the conditioning dict ``{"crossattn": ..., "vector": ..., "concat": ...}`` (kinds with no
    output are absent).

    Args:
        emb_models: one entry per embedder: a config node (``target``/``params``) with the options
            ``input_key`` or ``input_keys``, ``ucg_rate``, ``legacy_ucg_value``, ``is_trainable`` beside them
            (sgm's names), or an ``(nn.Module, EmbedderSpec)`` pair.
        zero_uncond: input keys whose embedders give zeros in the unconditional branch
            (:meth:`unconditional`) instead of embedding its inputs (sgm's ``force_uc_zero_embeddings``).
    """

    def __init__(self, emb_models: Sequence[Any] = (), zero_uncond: Sequence[str] = ()):
        super().__init__()
        embedders, specs = [], []
        for i, entry in enumerate(emb_models):
            where = f"emb_models.{i}"
            if isinstance(entry, tuple):
                embedder, spec = entry
            else:
                node = dict(to_plain(entry))
                options = {k: node.pop(k) for k in _SPEC_KEYS if k in node}
                spec = EmbedderSpec.from_options(where, **options)
                embedder = instantiate_from_config(node, where)
            if spec.is_trainable and not any(p.requires_grad for p in embedder.parameters()):
                raise ValueError(f"{where}: is_trainable=true but {type(embedder).__name__} has no trainable "
                                 "weights; set freeze=false in its params (or is_trainable=false)")
            if not spec.is_trainable:
                _freeze(embedder)
            embedders.append(embedder)
            specs.append(spec)
        self.embedders = nn.ModuleList(embedders)
        self.specs = specs
        known = {k for s in specs for k in s.input_keys}
        unknown = sorted(set(zero_uncond) - known)
        if unknown:
            raise ValueError(f"zero_uncond names {unknown}, which no embedder reads; use some of {sorted(known)}")
        self.zero_uncond = tuple(zero_uncond)
        self.cache: dict | None = None  # see enable_cache
        self.cache_store: Any = None  # see enable_cache

    @property
    def input_keys(self) -> list[str]:
        """Every batch entry some embedder reads, in order."""
        return list(dict.fromkeys(k for s in self.specs for k in s.input_keys))

    def train(self, mode: bool = True) -> "Conditioner":
        super().train(mode)
        for embedder, spec in zip(self.embedders, self.specs):
            if not spec.is_trainable:
                embedder.eval()  # frozen embedders stay in eval mode
        return self

    def set_ucg_rate(self, input_key: str, rate: float) -> None:
        """Set the CFG drop rate of the embedders that read ``input_key``."""
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"ucg_rate={rate!r} is out of range; use a value in [0, 1]")
        hits = [i for i, s in enumerate(self.specs) if input_key in s.input_keys]
        if not hits:
            raise ValueError(f"no embedder reads {input_key!r}; the inputs are {self.input_keys}")
        for i in hits:
            self.specs[i] = replace(self.specs[i], ucg_rate=float(rate))

    def enable_cache(self, enabled: bool = True, store: Any = None) -> None:
        """Keep the outputs of frozen embedders of strings per string (a training run's repeated captions
        are then encoded once, each on its own; the cache holds ``L * D`` floats per distinct caption, on the
        CPU). ``store``: keep them there instead of in memory, an object with ``load_text(embedder, string)``
        (the outputs, or None) and ``save_text(embedder, string, outputs)`` (``ldm.data.disk_cache.DiskCache``:
        on disk, across runs)."""
        self.cache = {} if enabled else None
        self.cache_store = store if enabled else None

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None, drop: bool = False,
                force_zero: Sequence[str] = (), only: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The conditioning of ``batch``. ``drop``: classifier-free-guidance dropout with each embedder's
        ``ucg_rate`` (random numbers from ``generator``); ``force_zero``: input keys whose embedders give zeros;
        ``only``: run just the embedders that read nothing but these keys."""
        size = _batch_size(batch, self.input_keys)
        outputs: dict[str, list[torch.Tensor]] = {}
        self.last_dropped: dict[str, torch.Tensor] = {}  # input key -> the samples this call dropped (with drop)
        for i, (embedder, spec) in enumerate(zip(self.embedders, self.specs)):
            if only is not None and not set(spec.input_keys) <= set(only):
                continue
            inputs = [_entry(batch, key, i) for key in spec.input_keys]
            keep = None
            if drop and spec.ucg_rate > 0:
                device = generator.device if generator is not None else "cpu"
                dropped = torch.rand(size, generator=generator, device=device) < spec.ucg_rate
                for key in spec.input_keys:
                    self.last_dropped[key] = self.last_dropped.get(key, torch.zeros_like(dropped)) | dropped
                if spec.legacy_ucg_value is not None:
                    inputs = [_replace(inputs[0], dropped.tolist(), spec.legacy_ucg_value)]
                else:
                    keep = ~dropped
            zeroed = any(k in force_zero for k in spec.input_keys)
            if zeroed and callable(getattr(embedder, "zero_output", None)):
                result = embedder.zero_output(*inputs)  # the zeros' shapes without running the embedder
            else:
                with torch.set_grad_enabled(torch.is_grad_enabled() and spec.is_trainable):
                    result = self._embed(i, embedder, spec, inputs)
            for emb in result if isinstance(result, (tuple, list)) else (result,):
                if emb.ndim not in _KIND_OF_NDIM:
                    raise ValueError(f"embedder {i} ({type(embedder).__name__}) returned a {emb.ndim}-D tensor; "
                                     "an embedder returns [B, D] (vector), [B, L, D] (crossattn) or [B, C, H, W]")
                if zeroed:
                    emb = torch.zeros_like(emb)
                elif keep is not None:
                    emb = emb * keep.to(emb.device, emb.dtype).view(-1, *([1] * (emb.ndim - 1)))
                outputs.setdefault(_KIND_OF_NDIM[emb.ndim], []).append(emb)
        return {kind: torch.cat(embs, dim=_CAT_DIM[kind]) if len(embs) > 1 else embs[0]
                for kind, embs in outputs.items()}

    def unconditional(self, batch: Mapping[str, Any], force_zero: Sequence[str] | None = None,
                      only_empty: bool = False) -> dict[str, torch.Tensor]:
        """The unconditional (negative) branch: ``batch`` holds its inputs (the negative prompts, ``""`` for
        none, under ``txt``; the other entries as for the conditional branch); the embedders of
        ``force_zero`` (default: ``zero_uncond``) give zeros. ``only_empty``: zeros only for the samples whose
        ``force_zero`` inputs are empty strings (no negative prompt); a given negative prompt is embedded
        (what diffusers' SDXL pipeline does with ``force_zeros_for_empty_prompt``)."""
        keys = tuple(self.zero_uncond if force_zero is None else force_zero)
        if not only_empty or not keys:
            return self(batch, force_zero=keys)
        size = _batch_size(batch, self.input_keys)
        empty = torch.ones(size, dtype=torch.bool)
        for key in keys:
            values = _entry(batch, key, -1)
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"only_empty needs prompts under {key!r}; use only_empty=False")
            # a prompt is a string or a prompt object (ldm.adapters.prompts.WeightedPrompt) whose str() is its text
            empty &= torch.tensor([str(v) == "" for v in values], dtype=torch.bool)
        if bool(empty.all()):
            return self(batch, force_zero=keys)
        given = self(batch)
        if not bool(empty.any()):
            return given
        zero = self(batch, force_zero=keys)
        return {kind: torch.where(empty.to(value.device).view(-1, *([1] * (value.ndim - 1))), zero[kind], value)
                for kind, value in given.items()}

    def _embed(self, index: int, embedder: nn.Module, spec: EmbedderSpec, inputs: list) -> Any:
        strings = len(inputs) == 1 and _is_strings(inputs[0])
        if self.cache is None or spec.is_trainable or not strings:
            return embedder(*inputs)
        entries = {s: self.cache[(index, s)] for s in inputs[0] if (index, s) in self.cache}
        for s in sorted(set(inputs[0]) - set(entries)):  # one at a time: an entry must not depend on its batch
            store = self.cache_store
            entry = store.load_text(embedder, s) if store is not None else None
            if entry is None:
                fresh = embedder([s])
                fresh = tuple(fresh) if isinstance(fresh, (tuple, list)) else (fresh,)
                entry = tuple(t[0].detach().cpu() for t in fresh)
                if store is not None:
                    store.save_text(embedder, s, entry)
            if store is None:  # (with a store the entries live there, not in memory)
                self.cache[(index, s)] = entry
            entries[s] = entry
        device = next(embedder.parameters()).device
        parts = zip(*(entries[s] for s in inputs[0]))
        stacked = tuple(torch.stack(p).to(device) for p in parts)
        return stacked if len(stacked) > 1 else stacked[0]


def _freeze(embedder: nn.Module) -> None:
    """Eval mode and no gradients (the embedder's own ``freeze()`` where it has one, which ``train()`` keeps)."""
    if callable(getattr(embedder, "freeze", None)):
        embedder.freeze()
    else:
        embedder.eval().requires_grad_(False)


def _is_strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _entry(batch: Mapping[str, Any], key: str, index: int) -> Any:
    if key not in batch:
        raise KeyError(f"the conditioning batch has no {key!r} entry (embedder {index} reads it); it has "
                       f"{sorted(batch)}")
    value = batch[key]
    return [value] if isinstance(value, str) else value


def _batch_size(batch: Mapping[str, Any], keys: Sequence[str]) -> int:
    sizes = {len(batch[k]) if not isinstance(batch[k], str) else 1 for k in keys if k in batch}
    if len(sizes) > 1:
        raise ValueError(f"the conditioning inputs {list(keys)} have different batch sizes {sorted(sizes)}; "
                         "give one entry per sample for each")
    return sizes.pop() if sizes else 1


def _replace(value: Any, dropped: list[bool], replacement: Any) -> Any:
    """``value`` (a list, or a tensor with one row per sample) with the dropped samples set to ``replacement``."""
    if isinstance(value, torch.Tensor):
        mask = torch.tensor(dropped, device=value.device).view(-1, *([1] * (value.ndim - 1)))
        return torch.where(mask, torch.as_tensor(replacement, dtype=value.dtype, device=value.device), value)
    return [replacement if d else v for v, d in zip(value, dropped)]


# ---- embedders -------------------------------------------------------------------------------------------------
class TextEmbedder(OpenCLIPTextEncoder):
    """Prompts -> crossattn ``[B, L, width]`` and, with ``pooled``, the pooled vector ``[B, embed_dim]`` too: the
    last layer's end-of-text token after ``ln_final``, through ``text_projection`` (open_clip's text feature;
    SDXL's second text encoder gives it). All other arguments are :class:`OpenCLIPTextEncoder`'s; the weights
    are its ``model.*``."""

    def __init__(self, *args: Any, pooled: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if pooled and getattr(self.model, "text_projection", None) is None:
            raise ValueError("pooled=true needs the tower's text_projection: set projection=true")
        if pooled and self.long_prompts != "truncate":
            raise ValueError("pooled=true encodes one window per prompt: use long_prompts='truncate' (prompt "
                             "objects of ldm.adapters.prompts chunk long prompts and pool the first window)")
        self.pooled = pooled
        if pooled and not self.frozen:  # the projection (and ln_final) are used now: train them with the rest
            self.model.text_projection.requires_grad_(True)
            self.model.ln_final.requires_grad_(True)

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.pooled:
            return self.encode(prompts)
        weights = embeddings = None
        if _is_prompt_objects(prompts):  # weighted / chunked / textual inversion (ldm.adapters.prompts)
            tokens, weights, embeddings = self.tokenize_prompts(prompts)
            embeddings = None if embeddings is None else embeddings.reshape(-1, self.max_length, self.width)
        else:
            tokens = self.tokenize(prompts).to(self.model.token_embedding.weight.device)
        batch, length = tokens.shape
        context, last = self._context_and_last(tokens.reshape(-1, self.max_length), embeddings)
        if weights is not None:
            context = emphasize(context, weights.reshape(-1, self.max_length))
        context = context.reshape(batch, length, self.width)
        last = last.reshape(batch, -1, self.max_length, self.width)[:, 0]  # the first window pools (as A1111)
        eot = tokens[:, :self.max_length].argmax(dim=-1)  # the end-of-text id is the largest id
        pooled = last[torch.arange(batch, device=last.device), eot]
        projection = self.model.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
        return context, pooled

    def zero_output(self, prompts: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Zeros of the shapes :meth:`forward` gives for ``prompts``, from their tokens alone: what the conditioner
        uses where it zeroes this embedder (SDXL's empty negative prompt), without running the tower."""
        tokens = self.tokenize_prompts(prompts)[0] if _is_prompt_objects(prompts) else self.tokenize(prompts)
        device = self.model.token_embedding.weight.device
        context = torch.zeros(*tokens.shape, self.width, device=device)
        if not self.pooled:
            return context
        projection = self.model.text_projection
        dim = projection.out_features if isinstance(projection, nn.Module) else projection.shape[1]
        return context, torch.zeros(tokens.shape[0], dim, device=device)

    def _context_and_last(self, tokens: torch.Tensor, token_embeddings: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of block ``layer`` (the context; through ln_final unless ``final_norm=False``) and ln_final of
        the last block's (for pooling); ``token_embeddings`` in place of ``token_embedding(tokens)`` when given."""
        model, length = self.model, tokens.shape[1]
        if token_embeddings is None:
            token_embeddings = model.token_embedding(tokens)
        x = token_embeddings + model.positional_embedding[:length]
        mask = model.attn_mask[:length, :length]
        context = None
        for n, block in enumerate(model.transformer.resblocks, start=1):
            if _is_plain_block(block):
                x = _plain_block_forward(block, x, mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
            if n == self.layers_run:
                context = model.ln_final(x) if self.final_norm else x
        return context, model.ln_final(x)


def micro_inputs(keys: Sequence[str], n: int, *, original_size: tuple[int, int], target_size: tuple[int, int],
                 crop_coords_top_left: tuple[int, int] = (0, 0), aesthetic_score: float = 6.0
                 ) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning as batch entries (``n`` rows each, float32), for those of sgm's keys
    (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``, ``aesthetic_score``) that
    are in ``keys`` (a conditioner's :attr:`Conditioner.input_keys`). Sizes are (height, width), the crop
    (top, left)."""
    values = {"original_size_as_tuple": original_size, "crop_coords_top_left": crop_coords_top_left,
              "target_size_as_tuple": target_size, "aesthetic_score": aesthetic_score}
    out = {}
    for key, value in values.items():
        if key in keys:
            row = torch.as_tensor(value, dtype=torch.float32)
            out[key] = row.expand(n, *row.shape).clone()
    return out


class ConcatTimestepEmbedderND(nn.Module):
    """Numbers -> a vector: every entry of ``[B, N]`` (or ``[B]``) gets the sinusoidal timestep embedding of
    width ``outdim``, concatenated to ``[B, N * outdim]`` (sgm's embedder of SDXL's size, crop and aesthetic-score
    conditions). No weights."""

    def __init__(self, outdim: int):
        super().__init__()
        if not isinstance(outdim, int) or outdim < 1:
            raise ValueError(f"outdim={outdim!r} must be a positive int (SDXL uses 256)")
        self.outdim = outdim

    def forward(self, x: torch.Tensor | Sequence) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"expected numbers shaped [batch] or [batch, n], got {tuple(x.shape)}")
        b, n = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(b, n * self.outdim)


class InpaintingConcat(nn.Module):
    """``mask`` (1 = repaint, any size, resized to the latents' by nearest) and ``masked_image_latents`` (the
    scaled first-stage latents of the image with the repainted region zeroed) -> the 5 extra input channels of an
    SD inpainting UNet, ``cat([mask, latents], dim=1)`` (the original order). No weights."""

    def forward(self, mask: torch.Tensor, masked_image_latents: torch.Tensor) -> torch.Tensor:
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be [B, 1, H, W], got {tuple(mask.shape)}")
        mask = mask.to(masked_image_latents.device, masked_image_latents.dtype)
        if mask.shape[-2:] != masked_image_latents.shape[-2:]:
            mask = nn.functional.interpolate(mask, size=masked_image_latents.shape[-2:], mode="nearest")
        return torch.cat([mask, masked_image_latents], dim=1)
