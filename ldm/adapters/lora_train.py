"""Trainable LoRA / LoCon layers on a plain model, saved as a kohya-format file.

    config = parse_lora_config({"rank": 8, "alpha": 8, "targets": ["attn", "ff"], "dropout": 0.0})
    network = LoraNetwork(model, config)     # model: a LatentDiffusion; its own weights are left as they are
    ...train network.parameters()...
    kohya = network.kohya_state_dict()       # lora_unet_* / lora_te_* .lora_down / .lora_up / .alpha

The network keeps its layers to itself (kohya's design): the model's modules keep their classes, parameter names and
state dict (the Stable Diffusion layout); each targeted layer gets a forward hook that adds
``alpha / rank * up(down(dropout(x)))`` to its output. The CPU acceleration pass (:mod:`ldm.accel`) swaps the
classes of the model's layers for faster ones in place; a hook stays on its module whatever its class, so training
and sampling with the accelerated layers add the same branch. The text encoders' q/k/v projections are one fused
``in_proj_weight`` (OpenCLIP), read directly by the encoder's fast path: there the branch is one LoRA over the three
row blocks, and ``W + alpha / rank * up @ down`` stands in for the weight while the encoder runs (its dropout drops
whole rank components, as kohya's ``rank_dropout``, since there is no input to drop). Exported, that LoRA is three
kohya LoRAs (q, k, v) sharing the down matrix, which merge to exactly the same weight.

Why not peft: peft replaces each targeted layer with a wrapper (``to_q.base_layer.weight``), which renames the
model's state dict (the SD layout every checkpoint and export relies on), hides the layers from the acceleration
pass, and has no LoRA for a fused ``in_proj_weight`` read outside ``nn.MultiheadAttention.forward``; it is also
not installed here. The layers below are the few lines LoRA needs.

Targets (``targets``):
    attn: the UNet's attention projections (to_q, to_k, to_v, to_out.0) and the transformers' proj_in / proj_out;
    ff: the transformers' feed-forward layers (ff.net.0.proj, ff.net.2);
    conv: LoCon, the ResBlocks' and down/upsamplers' convolutions and time-embedding projections;
    text: every block of the text encoder(s) the model runs: q/k/v, out_proj, fc1, fc2.

Token vectors (``tokens: [star, stars]``, pivotal tuning): the input token embeddings of these words train with the
LoRA, one set per text tower, starting from the words' own embeddings (:class:`TokenVectors`). A LoRA teaches the
model a new word this way without changing how any other prompt is encoded (a text LoRA changes every prompt's
encoding). The export bundles them into the LoRA file as A1111 does (``bundle_emb.<word>.string_to_param.*``, SDXL:
``bundle_emb.<word>.clip_l`` / ``clip_g``): loading the LoRA makes the words embeddings, which replace the words'
token vectors wherever a prompt uses them, so the loaded file gives exactly what training saw. ``token_lr``: their
learning rate (textual inversion usually wants a higher one than the LoRA), without weight decay.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.adapters.lora import _text_towers
from ldm.convert.module_names import diffusers_unet_names
from ldm.models.text_encoder import _bpe_tokenizer

__all__ = ["LORA_TARGETS", "LoraConfig", "parse_lora_config", "parse_tokens", "LoraBranch", "TokenVectors",
           "LoraNetwork", "kohya_state_dict", "bundled_embeddings", "unfreeze_token_rows", "names_any",
           "check_preserve", "parse_token_init", "initial_vectors"]

LORA_TARGETS = ("attn", "ff", "conv", "text")
_FUSED = "_self_attn_in_proj"  # the branch of a fused q/k/v projection; exported as _q_proj, _k_proj, _v_proj
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
TOKENS_PREFIX = "tokens."  # the token vectors in a LoraNetwork's state dict: tokens.<tower>.<word>


@dataclass(frozen=True)
class LoraConfig:
    """``model.params.lora``: rank, alpha (default: rank, a scale of 1), targets and dropout; ``tokens``: words whose
    token vectors train too, at ``token_lr`` (default: the run's learning rate); ``preserve``: prior preservation
    by distillation (samples whose caption names none of ``tokens`` learn the frozen model's own prediction; a
    number: their loss weight); ``preserve_dropped`` (default true): so do the samples whose caption the CFG
    dropout emptied, also those of pictures that show the new words (false: those learn the picture; a share in
    [0, 1]: that share of them, drawn per sample, is distilled, the rest learn the picture); ``token_init``
    (``{word: init word or words}``): start a word's vectors from the mean embedding of other words, as textual
    inversion's initializer token does (default: the word's own, possibly never-trained, embedding)."""

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("attn", "ff")
    dropout: float = 0.0
    tokens: tuple[str, ...] = ()
    token_lr: float | None = None
    preserve: float = 0.0
    preserve_dropped: float = 1.0
    token_init: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def parse_tokens(tokens: Any, token_lr: Any, key: str = "model.params.train_tokens",
                 lr_key: str = "model.params.token_lr") -> tuple[tuple[str, ...], float | None]:
    """Words whose token vectors train (a word or a list) and their learning rate, checked: one-line ValueErrors."""
    tokens = [tokens] if isinstance(tokens, str) else (tokens or [])
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) and _WORD.fullmatch(t) for t in tokens):
        raise ValueError(f"{key}={tokens!r} must be a list of words (letters, digits, _ or -), e.g. [star, stars]")
    if token_lr is not None and (isinstance(token_lr, bool) or not isinstance(token_lr, (int, float))
                                 or not math.isfinite(token_lr) or token_lr <= 0):
        raise ValueError(f"{lr_key}={token_lr!r} must be a number > 0 (the token vectors' learning rate)")
    if token_lr is not None and not tokens:
        raise ValueError(f"{lr_key} is set but no tokens train: add {key} (e.g. [star]) or drop {lr_key}")
    return tuple(dict.fromkeys(tokens)), None if token_lr is None else float(token_lr)


def parse_token_init(value: Any, tokens: tuple[str, ...], key: str = "model.params.token_init"
                     ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``token_init``: ``{word: init word or list of words}`` for words among ``tokens`` -> ((word, inits), ...);
    a one-line ValueError names a wrong entry."""
    if value is None or (isinstance(value, Mapping) and not value):
        return ()
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r} must be a mapping from a trained word to the word(s) its vectors start "
                         "from, e.g. {star: [circle, square, triangle]}")
    pairs = []
    for word, inits in value.items():
        if word not in tokens:
            raise ValueError(f"{key}.{word}: {word!r} is not one of the trained words {list(tokens)}")
        inits = [inits] if isinstance(inits, str) else inits
        if not isinstance(inits, (list, tuple)) or not inits or \
                not all(isinstance(w, str) and _WORD.fullmatch(w) for w in inits):
            raise ValueError(f"{key}.{word}={inits!r} must be a word or a non-empty list of words (e.g. circle)")
        pairs.append((word, tuple(inits)))
    return tuple(pairs)


def initial_vectors(weight: torch.Tensor, ids: tuple[int, ...], inits: tuple[str, ...] | None, encode: Any
                    ) -> torch.Tensor:
    """The starting vectors ([len(ids), width], float32) of a word of token ``ids`` in an embedding table
    ``weight``: its own rows, or with ``inits`` the mean over those words of each word's mean row (a word of
    several ids counts once), for each of its ids."""
    if not inits:
        return weight.detach()[list(ids)].float().clone()
    rows = []
    for word in inits:
        word_ids = list(encode(word))
        if not word_ids:
            raise ValueError(f"token_init: {word!r} has no tokens")
        rows.append(weight.detach()[word_ids].float().mean(0))
    return torch.stack(rows).mean(0).expand(len(ids), -1).clone()


def check_preserve(value: Any, key: str = "model.params.preserve") -> float:
    """``preserve``: false (off), true (on, weight 1) or the weight (> 0) of the distilled samples' loss."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r} must be true, false or a weight > 0 (the distilled samples' loss weight)")
    return float(value)


def check_preserve_dropped(value: Any, key: str = "model.params.preserve_dropped") -> float:
    """``preserve_dropped``: true (every dropped caption of a picture with the new words is distilled, 1.0), false
    (none, 0.0) or the share of them, in [0, 1], drawn per sample."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value!r} must be true, false or a share in [0, 1] of the dropped captions "
                         "distilled")
    return float(value)


def parse_lora_config(value: Any, key: str = "model.params.lora") -> LoraConfig:
    """A ``{rank, alpha, targets, dropout}`` mapping -> :class:`LoraConfig`; a one-line ValueError names a wrong
    key or value."""
    if isinstance(value, LoraConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping such as {{rank: 8, alpha: 8, targets: [attn, ff]}}, got {value!r}")
    fields = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is unknown; the keys are {', '.join(fields)}")
    rank = value.get("rank", LoraConfig.rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{key}.rank={rank!r} must be a positive int (e.g. 8)")
    alpha = value.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"{key}.alpha={alpha!r} must be a number > 0 (the update is scaled by alpha / rank)")
    tokens, token_lr = parse_tokens(value.get("tokens"), value.get("token_lr"), f"{key}.tokens", f"{key}.token_lr")
    token_init = parse_token_init(value.get("token_init"), tokens, f"{key}.token_init")
    targets = value.get("targets", list(LoraConfig.targets))
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not (targets or tokens):
        raise ValueError(f"{key}.targets={targets!r} must be a non-empty list of {', '.join(LORA_TARGETS)} "
                         "(it may be empty only with tokens)")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"{key}.targets: {bad[0]!r} is unknown; use some of {', '.join(LORA_TARGETS)}")
    dropout = value.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{key}.dropout={dropout!r} must be a number in [0, 1)")
    preserve = check_preserve(value.get("preserve", False), f"{key}.preserve")
    preserve_dropped = check_preserve_dropped(value.get("preserve_dropped", True), f"{key}.preserve_dropped")
    if preserve and not tokens:
        raise ValueError(f"{key}.preserve keeps what captions without the new words give; name the words in "
                         f"{key}.tokens (e.g. [star])")
    return LoraConfig(rank, None if alpha is None else float(alpha), tuple(dict.fromkeys(targets)), float(dropout),
                      tokens, token_lr, preserve, preserve_dropped, token_init)


class LoraBranch(nn.Module):
    """``alpha / rank * up(down(x))`` beside one ``nn.Linear`` or ``nn.Conv2d`` (LoCon: ``down`` a conv of the
    layer's kernel, stride and padding, ``up`` a 1x1 conv), with kohya's parameter names and initialisation
    (``down`` Kaiming-uniform, ``up`` zero: a new branch changes nothing)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank, self.dropout = rank, dropout
        self.enabled = True  # off inside LoraNetwork.disabled()

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.lora_up(self.lora_down(x)) * self.scale

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on the base layer: its output plus the branch of its input."""
        if not self.enabled:
            return output
        return output + self(args[0]).to(output.dtype)

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """``alpha / rank * up @ down`` shaped like the base weight (the fused q/k/v path)."""
        down = self.lora_down.weight.flatten(1)
        if self.dropout and self.training:  # rank dropout: whole components, rescaled
            keep = torch.rand(down.shape[0], 1, device=down.device) >= self.dropout
            down = down * keep / (1 - self.dropout)
        return (self.lora_up.weight.flatten(1) @ down * self.scale).reshape(weight_shape)


class _FusedWeights:
    """Forward hooks on a text encoder: while it runs, each fused ``in_proj_weight`` with a branch is
    ``W + delta`` (the original parameter is put back afterwards, also when the forward fails)."""

    def __init__(self, pairs: list[tuple[nn.Module, LoraBranch]]):
        self.pairs = pairs
        self.saved: list[torch.Tensor] | None = None

    def before(self, module: nn.Module, args: tuple) -> None:
        if self.saved is not None:  # re-entered: already swapped
            return
        self.saved = []
        for attn, branch in self.pairs:
            if not branch.enabled:
                self.saved.append(attn._parameters["in_proj_weight"])
                continue
            weight = attn._parameters["in_proj_weight"]
            self.saved.append(weight)
            delta = branch.delta(weight.shape)  # summed in the branch's fp32 also for a bf16 base
            attn._parameters["in_proj_weight"] = (weight.to(delta.dtype) + delta).to(weight.dtype)

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.saved is None:
            return
        for (attn, _), weight in zip(self.pairs, self.saved):
            attn._parameters["in_proj_weight"] = weight
        self.saved = None


def _unet_category(name: str, diffusers_name: str) -> str | None:
    if ".transformer_blocks." in name and (".attn1." in name or ".attn2." in name):
        return "attn"
    if name.endswith(".proj_in") or name.endswith(".proj_out"):
        return "attn"
    if ".transformer_blocks." in name and ".ff." in name:
        return "ff"
    if ".resnets." in diffusers_name or "samplers.0." in diffusers_name:
        return "conv"
    return None


class TokenVectors(nn.Module):
    """Trainable input vectors of some words in one text tower (``vectors[word]``: [n ids, width], from the word's
    token embeddings), put in place of the tower's ``token_embedding`` output wherever the word's ids occur in a
    row, as an A1111 embedding of that name is (its vectors replace the word's ids). ``init``: ``{word: words}``
    whose mean embedding a word's vectors start from (:func:`initial_vectors`)."""

    def __init__(self, token_embedding: nn.Embedding, words: tuple[str, ...], encode: Any,
                 init: Mapping[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.vectors = nn.ParameterDict()
        self.ids: dict[str, tuple[int, ...]] = {}
        for word in words:
            ids = tuple(encode(word))
            if not ids:
                raise ValueError(f"model.params.lora.tokens: {word!r} has no tokens")
            self.ids[word] = ids
            self.vectors[word] = nn.Parameter(initial_vectors(token_embedding.weight, ids, (init or {}).get(word),
                                                              encode))
        self.enabled = True

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on ``token_embedding``: its output with the words' vectors in place of their ids'."""
        ids = args[0]
        if not self.enabled:
            return output
        for word, word_ids in self.ids.items():
            n, length = len(word_ids), ids.shape[-1]
            if n > length:
                continue
            starts = torch.ones_like(ids[..., :length - n + 1], dtype=torch.bool)
            for k, token in enumerate(word_ids):
                starts = starts & (ids[..., k:length - n + 1 + k] == token)
            if not bool(starts.any()):
                continue
            vectors = self.vectors[word].to(output.dtype)
            for k in range(n):
                at = F.pad(starts, (k, n - 1 - k))  # the k-th id of every occurrence
                output = torch.where(at[..., None], vectors[k], output)
        return output


class LoraNetwork(nn.Module):
    """The LoRA branches of one model (``branches``: kohya name -> :class:`LoraBranch`), hooked into its layers.

    UNet layers are named as kohya names them: diffusers' module names for SD 1.x/2.x UNets, the original ones for
    an SDXL-style UNet (one with a ``label_emb``); text layers by transformers' CLIP names (``lora_te_``, or
    ``lora_te1_`` / ``lora_te2_`` for two text encoders). :meth:`remove` takes the hooks off again."""

    def __init__(self, model: nn.Module, config: LoraConfig):
        super().__init__()
        self.config = config
        alpha = config.rank if config.alpha is None else config.alpha
        self.branches = nn.ModuleDict()
        self._handles: list = []
        unet = model.model.diffusion_model
        sdxl = getattr(unet, "label_emb", None) is not None
        diffusers = diffusers_unet_names(unet)
        for name, module in unet.named_modules():
            if name not in diffusers or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue
            if _unet_category(name, diffusers[name]) not in config.targets:
                continue
            key = "lora_unet_" + (name if sdxl else diffusers[name]).replace(".", "_")
            self._add(key, module, LoraBranch(module, config.rank, alpha, config.dropout))
        if "text" in config.targets:
            self._add_text(model, alpha)
        if not len(self.branches) and not config.tokens:
            raise ValueError(f"model.params.lora.targets {list(config.targets)} select no layer of this model")
        self.tokens = nn.ModuleList()
        if config.tokens:
            self._add_tokens(model, config.tokens)

    def _add(self, key: str, module: nn.Module, branch: LoraBranch) -> None:
        self.branches[key] = branch
        self._handles.append(module.register_forward_hook(branch.hook))

    def _add_text(self, model: nn.Module, alpha: float) -> None:
        conditioner = getattr(model, "conditioner", None)
        towers = _text_towers(model)
        if not towers:
            raise ValueError("model.params.lora.targets: 'text' but the model has no OpenCLIP text encoder")
        for index, (_, tower) in enumerate(towers):
            prefix = "lora_te_" if len(towers) == 1 else f"lora_te{index + 1}_"
            embedder = _embedder_of(conditioner, tower, "model.params.lora.targets: 'text'")
            blocks = tower.transformer.resblocks
            run = min(len(blocks), getattr(embedder, "layers_run", len(blocks)))  # skipped blocks get no LoRA
            fused = []
            for i in range(run):
                block, hf = blocks[i], f"text_model_encoder_layers_{i}"
                attn = block.attn
                branch = LoraBranch(nn.Linear(attn.embed_dim, 3 * attn.embed_dim, device="meta"), self.config.rank,
                                    alpha, self.config.dropout)
                self.branches[prefix + hf + _FUSED] = branch
                fused.append((attn, branch))
                for name, module in (("self_attn_out_proj", attn.out_proj), ("mlp_fc1", block.mlp.c_fc),
                                     ("mlp_fc2", block.mlp.c_proj)):
                    self._add(f"{prefix}{hf}_{name}", module, LoraBranch(module, self.config.rank, alpha,
                                                                         self.config.dropout))
            swap = _FusedWeights(fused)
            self._handles.append(embedder.register_forward_pre_hook(swap.before))
            self._handles.append(embedder.register_forward_hook(swap.after, always_call=True))
            _make_trainable(conditioner, embedder)

    def _add_tokens(self, model: nn.Module, words: tuple[str, ...]) -> None:
        conditioner = getattr(model, "conditioner", None)
        towers = _text_towers(model)
        if not towers:
            raise ValueError("model.params.lora.tokens: the model has no OpenCLIP text encoder whose tokens "
                             "could train")
        for _, tower in towers:
            embedder = _embedder_of(conditioner, tower, "model.params.lora.tokens")
            vectors = TokenVectors(tower.token_embedding, words, _bpe_tokenizer().encode,
                                   dict(self.config.token_init))
            self.tokens.append(vectors)
            self._handles.append(tower.token_embedding.register_forward_hook(vectors.hook))
            _make_trainable(conditioner, embedder)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The model without its LoRA inside the block (every branch and token vector off): the frozen base."""
        parts = [*self.branches.values(), *self.tokens]
        states = [part.enabled for part in parts]
        for part in parts:
            part.enabled = False
        try:
            yield
        finally:
            for part, state in zip(parts, states):
                part.enabled = state

    def names_tokens(self, text: str) -> bool:
        """Whether a caption uses one of the trained words (``tokens``)."""
        return names_any(text, self.config.tokens)

    def token_parameters(self) -> list[nn.Parameter]:
        """The token vectors (trained at ``token_lr``)."""
        return list(self.tokens.parameters())

    def remove(self) -> None:
        """Take every hook off the model (the branches stay, unused)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The kohya file's tensors (float32, detached copies), the token vectors as bundled embeddings."""
        state = self.state_dict()
        return kohya_state_dict(state) | bundled_embeddings(state)


def names_any(text: str, words: tuple[str, ...]) -> bool:
    """Whether ``text`` uses one of ``words`` as a whole word (case-insensitive, as CLIP's tokenizer lower-cases)."""
    text = text.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])", text) for w in words)


def unfreeze_token_rows(model: nn.Module, words: tuple[str, ...],
                        init: Mapping[str, tuple[str, ...]] | None = None) -> list[nn.Parameter]:
    """A full fine-tune's ``train_tokens``: every text tower's ``token_embedding.weight`` trains, but only in the
    rows of the words' token ids (its gradient is masked to them; trained without weight decay, the other rows
    never move), so the export holds the new words in the model's own embedding table. A word of several ids
    moves those ids wherever they occur. ``init`` (``{word: words}``): those words' rows start from the mean row
    of the other words (:func:`initial_vectors`)."""
    conditioner = getattr(model, "conditioner", None)
    towers = _text_towers(model)
    if not towers:
        raise ValueError("model.params.train_tokens: the model has no OpenCLIP text encoder whose tokens could train")
    encode = _bpe_tokenizer().encode
    ids = sorted({i for word in words for i in encode(word)})
    params = []
    for _, tower in towers:
        embedder = _embedder_of(conditioner, tower, "model.params.train_tokens")
        weight = tower.token_embedding.weight
        with torch.no_grad():
            for word, inits in (init or {}).items():
                word_ids = tuple(encode(word))
                weight[list(word_ids)] = initial_vectors(weight, word_ids, inits, encode).to(weight.dtype)
        mask = torch.zeros(weight.shape[0], 1)
        mask[ids] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
        _make_trainable(conditioner, embedder)
        params.append(weight)
    return params


def _embedder_of(conditioner: nn.Module | None, tower: nn.Module, key: str) -> nn.Module:
    """The conditioner's embedder that runs ``tower`` (``key`` names the setting in the one-line error)."""
    embedder = next((e for e in (conditioner.embedders if conditioner is not None else [])
                     if any(m is tower for m in e.modules())), None)
    if embedder is None:
        raise ValueError(f"{key}: the text encoder is not one of the conditioner's embedders")
    return embedder


def _make_trainable(conditioner: nn.Module, embedder: nn.Module) -> None:
    """Let gradients flow through a frozen text encoder (to its LoRA branches) and keep its outputs out of the
    conditioner's text cache: its spec says trainable; its own weights stay frozen."""
    for i, e in enumerate(conditioner.embedders):
        if e is embedder:
            conditioner.specs[i] = dataclasses.replace(conditioner.specs[i], is_trainable=True)


def kohya_state_dict(state: Mapping[str, torch.Tensor], prefix: str = "branches.") -> dict[str, torch.Tensor]:
    """A :class:`LoraNetwork` state dict (keys ``{prefix}<kohya name>.lora_down.weight`` ...) -> the kohya file's
    tensors: the fused q/k/v branches as three LoRAs (q, k, v) with the same down matrix and alpha and a third of
    the up rows each, which merge to exactly the same weight."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name, _, role = key[len(prefix):].partition(".")
        value = value.detach().float().clone()
        if not name.endswith(_FUSED):
            out[f"{name}.{role}"] = value
            continue
        base = name[:-len(_FUSED)]
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            piece = value.chunk(3, dim=0)[part].clone() if role == "lora_up.weight" else value.clone()
            out[f"{base}_self_attn_{proj}.{role}"] = piece
    return out


def bundled_embeddings(state: Mapping[str, torch.Tensor], prefix: str = TOKENS_PREFIX) -> dict[str, torch.Tensor]:
    """A :class:`LoraNetwork` state dict's token vectors (``{prefix}<tower>.vectors.<word>``) -> A1111's bundled
    embeddings of a LoRA file: ``bundle_emb.<word>.string_to_param.*`` for one text tower, ``bundle_emb.<word>.clip_l``
    and ``.clip_g`` for SDXL's two."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        tower, _, word = key[len(prefix):].partition(".vectors.")
        found.setdefault(word, {})[int(tower)] = value.detach().float().clone()
    out = {}
    for word, sets in found.items():
        if len(sets) == 1:
            out[f"bundle_emb.{word}.string_to_param.*"] = next(iter(sets.values()))
        else:
            for tower, name in enumerate(("clip_l", "clip_g")):
                out[f"bundle_emb.{word}.{name}"] = sets[tower]
    return out
