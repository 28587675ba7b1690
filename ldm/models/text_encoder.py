"""Text encoders on open_clip's text tower: SD2's FrozenOpenCLIPEmbedder, and SD1's CLIP ViT-L/14 reproduced.

    enc = OpenCLIPTextEncoder("ViT-H-14")                     # SD2: penultimate layer, pad with 0
    enc = OpenCLIPTextEncoder("ViT-L-14", layer="last", pad="eot", quick_gelu=True, projection=False)  # SD1
    context = enc(["a red square", ""])                       # [2, 77, width], "" is the CFG unconditional prompt

Only the text tower is built (never the vision tower, never a download). Its state dict is
``model.<open_clip CLIP text names>``, i.e. exactly SD2's ``cond_stage_model.model.*`` entries; SD1's
transformers-named weights are mapped onto it by :mod:`ldm.convert` (``convert_hf_clip_text_state_dict``,
and back by ``to_hf_clip_text_state_dict``). Tiny architectures for tests and the demo model live in
``text_archs/*.json`` (open_clip's own config format). The tower and tokenizer are :mod:`ldm.models.clip_text`'s
(open_clip's, without importing open_clip).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ldm.io import CheckpointError, check_state_dict, read_state_dict
from ldm.models import clip_text
from ldm.models.clip_text import BPETokenizer as SimpleTokenizer
from ldm.models.clip_text import LayerNorm, QuickGELU, TextTransformer
from ldm.models.clip_text import TextConfig as CLIPTextCfg

__all__ = [
    "OpenCLIPTextEncoder",
    "PromptTokens",
    "emphasize",
    "register_text_archs",
    "text_arch_config",
]

logger = logging.getLogger(__name__)

ARCH_DIR = Path(__file__).with_name("text_archs")
PAD_MODES = ("zero", "eot")
LONG_PROMPT_MODES = ("truncate", "chunk")
NAMED_LAYERS = {"last": -1, "penultimate": -2}
# open_clip text options that would change the tower's layout or forward beyond what this encoder handles
_UNSUPPORTED_TEXT_OPTIONS = ("hf_model_name", "embed_cls", "no_causal_mask")
# optional attention-block options of newer open_clip versions, passed through only when set
_BLOCK_OPTIONS = ("block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                  "scale_attn", "scale_fc")


# ----------------------------------------------------------------------------------------------------------
# Architectures and tokenizer
# ----------------------------------------------------------------------------------------------------------

def register_text_archs() -> None:
    """Make the project's architectures (``text_archs/*.json``) known to open_clip by name; idempotent. (This
    encoder reads them without open_clip: :func:`ldm.models.clip_text.arch_config`.)"""
    import open_clip

    known = set(open_clip.list_models())
    if any(p.stem not in known for p in ARCH_DIR.glob("*.json")):
        open_clip.add_model_config(ARCH_DIR)


def text_arch_config(arch: str) -> dict:
    """The open_clip model config (``embed_dim``, ``text_cfg``, ...) of a named architecture, read offline."""
    config = clip_text.arch_config(arch)
    if config is None:
        raise ValueError(f"unknown text encoder arch {arch!r}: use an open_clip model name such as 'ViT-H-14', "
                         f"'ViT-L-14' or 'ldm-tiny-text' (see open_clip.list_models())")
    return config


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer; its vocabulary file ships inside the open_clip package."""
    return SimpleTokenizer()


def _build_text_tower(cfg: Mapping, quick_gelu: bool, projection: bool) -> TextTransformer:
    """open_clip's TextTransformer for ``cfg`` plus CLIP's ``logit_scale`` (so names match a CLIP state dict)."""
    text_cfg = CLIPTextCfg(**cfg["text_cfg"])
    for option in _UNSUPPORTED_TEXT_OPTIONS:
        if getattr(text_cfg, option, None):
            raise ValueError(f"text_cfg option {option}={getattr(text_cfg, option)!r} is not supported by "
                             f"OpenCLIPTextEncoder: use an arch with a plain causal CLIP text transformer")
    act_layer, norm_layer = (QuickGELU if quick_gelu else nn.GELU), LayerNorm
    if text_cfg.act_kwargs:
        act_layer = functools.partial(act_layer, **text_cfg.act_kwargs)
    if text_cfg.norm_kwargs:
        norm_layer = functools.partial(norm_layer, **text_cfg.norm_kwargs)
    block_options = {k: getattr(text_cfg, k) for k in _BLOCK_OPTIONS if getattr(text_cfg, k, None)}
    tower_cls = TextTransformer
    if block_options:  # open_clip's custom attention blocks: its own tower
        from open_clip.transformer import TextTransformer as tower_cls
    tower = tower_cls(
        context_length=text_cfg.context_length, vocab_size=text_cfg.vocab_size, width=text_cfg.width,
        heads=text_cfg.heads, layers=text_cfg.layers, mlp_ratio=text_cfg.mlp_ratio,
        ls_init_value=text_cfg.ls_init_value, output_dim=cfg["embed_dim"], pool_type=text_cfg.pool_type,
        proj_type=text_cfg.proj_type if projection else "none", proj_bias=text_cfg.proj_bias,
        act_layer=act_layer, norm_layer=norm_layer, **block_options)
    if projection:  # CLIP keeps the contrastive temperature next to the text tower's weights
        tower.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
    return tower


def _layers_to_run(layer: str | int, num_layers: int) -> int:
    """How many transformer blocks run for ``layer`` ("last", "penultimate" or a block index, -1 = last)."""
    index = NAMED_LAYERS.get(layer, layer) if isinstance(layer, str) else layer
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"layer={layer!r} is not valid: use 'last', 'penultimate' or a block index "
                         f"(-1 = last, -2 = penultimate, i.e. clip skip N is layer=-N)")
    if not -num_layers <= index < num_layers:
        raise ValueError(f"layer={layer} is out of range for a text tower with {num_layers} blocks: "
                         f"use an index in [{-num_layers}, {num_layers - 1}]")
    return index + 1 if index >= 0 else num_layers + index + 1


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: use one of {', '.join(map(repr, choices))}")
    return value


def _warn_cut(ids: list[list[int]], body: int) -> None:
    """One warning per batch naming each prompt that truncation to ``body`` tokens shortens."""
    cut = [f"prompt {i} lost {len(seq) - body}" for i, seq in enumerate(ids) if len(seq) > body]
    if cut:
        logger.warning("%d of %d prompts are over %d tokens and were cut (%s); long_prompts='chunk' keeps "
                       "every token", len(cut), len(ids), body, ", ".join(cut))


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a list with at least one string (use '' for the unconditional)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str: pass a list of strings")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# Prompts given as tokens (weighting, long prompts, textual inversion: ldm.adapters.prompts)
# ----------------------------------------------------------------------------------------------------------

class PromptTokens(NamedTuple):
    """One prompt as an encoder takes it beyond a string: its windows of token ids (each without the start and
    end tokens, at most ``max_length - 2`` ids), a weight per id, and token embeddings to put in place of some ids
    (textual inversion): ``(window, position in the window, [n, width] vectors)``, position 0 being the first id
    after the start token."""

    windows: list[list[int]]
    weights: list[list[float]]
    vectors: Sequence[tuple[int, int, torch.Tensor]] = ()


def _is_prompt_objects(prompts: Any) -> bool:
    """A list holding prompt objects that tokenize themselves (``item.prompt_tokens(encoder) -> PromptTokens``)."""
    return (not isinstance(prompts, str) and isinstance(prompts, Sequence)
            and any(hasattr(p, "prompt_tokens") for p in prompts))


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: the hidden states ``z`` [N, L, D] of N windows times their per-token weights
    [N, L], each window then rescaled so that its mean is what it was (``z *= old_mean / new_mean``). The means
    are taken per window (A1111 takes them over the batch of one window; for one prompt that is the same)."""
    weights = weights.to(z.device, z.dtype)
    old_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    return z * torch.where(new_mean == 0, 1.0, old_mean / new_mean)


# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------

def _is_plain_block(block: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` doing plain self-attention (what every CLIP text tower has)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
            and attn.bias_k is None and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def _plain_block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``block(x, attn_mask=mask)`` for batch-first ``x`` [N, L, D], with the block's own weights.

    nn.MultiheadAttention transposes a batch-first input to [L, N, D] as a view; F.linear then cannot fold that
    view into one matrix product and runs a batched product over a copy of the weight per token (SD's ViT-L/14:
    3.3 s instead of 0.1 s for two 77-token prompts on one CPU thread). Here every projection sees a
    contiguous [N, L, D] tensor and attention is one ``scaled_dot_product_attention`` call.
    """
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, d]
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(n, length, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class OpenCLIPTextEncoder(nn.Module):
    """Prompts -> per-token context ``[B, max_length * k, width]`` for the UNet's cross-attention.

    Args:
        arch: open_clip architecture name ("ViT-H-14" for SD2, "ViT-L-14" for SD1, "ldm-tiny-text", ...).
        layer: "last", "penultimate" or a block index (-1 = last; clip skip N is ``layer=-N``). The blocks after
            it are skipped; ``ln_final`` is applied in every case (as SD1 and SD2 do).
        max_length: tokens per window, start and end-of-text included (at most the arch's context length).
        pad: "zero" pads with id 0 after end-of-text (SD2 / open_clip); "eot" pads with the end-of-text id
            49407 (SD1 / transformers CLIPTokenizer).
        quick_gelu: QuickGELU activations (OpenAI CLIP weights, SD1); also on when the arch config says so.
        freeze: eval mode and no gradients, kept by ``train()``. With ``freeze=False`` everything the forward
            uses is trainable; the skipped blocks, ``text_projection`` and ``logit_scale`` stay frozen so
            that DDP sees no unused parameters.
        ckpt_path: local weights file (safetensors or torch pickle) in this module's names or open_clip CLIP
            names (``visual.*`` ignored); a transformers CLIP file loads with
            ``ldm.convert.load_text_encoder_weights``.
        long_prompts: "truncate" cuts prompts longer than ``max_length`` (with a warning); "chunk" encodes
            them as several ``max_length`` windows of ``max_length - 2`` tokens each, concatenated along the
            sequence axis (all prompts of a batch padded with empty windows to the same count).
        projection: build ``text_projection`` and ``logit_scale`` (SD2 checkpoints have them, SD1 not).
        final_norm: apply ``ln_final`` to the output of block ``layer`` (SD1, SD2). SDXL's text encoders use
            the block's output as it is (``final_norm=False``: transformers' ``hidden_states[layer + 1]``).
    """

    def __init__(self, arch: str = "ViT-H-14", layer: str | int = "penultimate", max_length: int = 77,
                 pad: str = "zero", quick_gelu: bool = False, freeze: bool = True,
                 ckpt_path: str | os.PathLike | None = None, long_prompts: str = "truncate",
                 projection: bool = True, final_norm: bool = True):
        super().__init__()
        self.final_norm = bool(final_norm)
        self.frozen = False
        cfg = text_arch_config(arch)
        self.model = _build_text_tower(cfg, quick_gelu or bool(cfg.get("quick_gelu")), projection)
        self.arch = arch
        self.width = self.output_dim = self.model.width
        self.num_layers = len(self.model.transformer.resblocks)
        self.layer = layer
        self.layers_run = _layers_to_run(layer, self.num_layers)
        context = self.model.positional_embedding.shape[0]
        if not isinstance(max_length, int) or not 3 <= max_length <= context:
            raise ValueError(f"max_length={max_length!r} must be an int in [3, {context}] "
                             f"(the context length of {arch})")
        self.max_length = max_length
        self.pad = _check_choice("pad", pad, PAD_MODES)
        self.long_prompts = _check_choice("long_prompts", long_prompts, LONG_PROMPT_MODES)
        if ckpt_path is not None:
            self.load_weights(ckpt_path)
        if freeze:
            self.freeze()
        else:
            self._freeze_unused()

    # --- training state ---

    def freeze(self) -> "OpenCLIPTextEncoder":
        """Eval mode and ``requires_grad=False`` everywhere; ``train()`` keeps it in eval from now on."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        return super().train(mode and not self.frozen)

    def _freeze_unused(self) -> None:
        """Freeze what the forward never reads: blocks after ``layer``, the projection and logit scale."""
        unused = list(self.model.transformer.resblocks[self.layers_run:].parameters())
        unused += [p for n, p in self.model.named_parameters(recurse=False) if n in ("text_projection",
                                                                                      "logit_scale")]
        if not self.final_norm:
            unused += list(self.model.ln_final.parameters())
        for p in unused:
            p.requires_grad_(False)

    # --- tokens ---

    @property
    def pad_id(self) -> int:
        return _bpe_tokenizer().eot_token_id if self.pad == "eot" else 0

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length * k]`` exactly as encoded (k = 1 unless ``long_prompts="chunk"``)."""
        tokenizer = _bpe_tokenizer()
        ids = [tokenizer.encode(p) for p in _as_prompt_list(prompts)]
        windows = self._split(ids)
        count = max(len(w) for w in windows)
        windows = [w + [[]] * (count - len(w)) for w in windows]
        rows = [[t for window in item for t in self._wrap(window)] for item in windows]
        return torch.tensor(rows, dtype=torch.long)

    def _split(self, ids: list[list[int]]) -> list[list[list[int]]]:
        """Each prompt's ids as windows of ``max_length - 2``: the first only (truncate) or all (chunk)."""
        body = self.max_length - 2
        if self.long_prompts == "truncate":
            _warn_cut(ids, body)
            return [[seq[:body]] for seq in ids]
        return [[seq[s:s + body] for s in range(0, len(seq), body)] or [[]] for seq in ids]

    def _wrap(self, window: list[int]) -> list[int]:
        tokenizer = _bpe_tokenizer()
        ids = [tokenizer.sot_token_id, *window, tokenizer.eot_token_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    @property
    def tokenizer(self) -> SimpleTokenizer:
        """The CLIP BPE tokenizer this encoder's ids come from."""
        return _bpe_tokenizer()

    def tokenize_prompts(self, prompts: Sequence[Any]
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prompt objects (``item.prompt_tokens(self)`` gives a :class:`PromptTokens`; plain strings are tokenized
        as :meth:`tokenize` does) -> ``(tokens [B, max_length * k], weights [B, max_length * k] or None when all are
        1, token_embeddings [B, max_length * k, width] or None when no vectors are placed)``. Every prompt is padded
        with empty windows to the batch's largest window count."""
        body = self.max_length - 2
        items = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                windows = self._split([self.tokenizer.encode(prompt)])[0]
                items.append(PromptTokens(windows, [[1.0] * len(w) for w in windows]))
            elif hasattr(prompt, "prompt_tokens"):
                items.append(prompt.prompt_tokens(self))
            else:
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}: pass strings or prompt objects")
        for i, item in enumerate(items):
            if not item.windows or any(len(w) > body or len(w) != len(m) for w, m in zip(item.windows, item.weights)):
                raise ValueError(f"prompt {i}: its token windows must be 1 or more lists of at most {body} ids, "
                                 "each with as many weights")
        count = max(len(item.windows) for item in items)
        rows, weight_rows = [], []
        for item in items:
            windows = item.windows + [[]] * (count - len(item.windows))
            weights = item.weights + [[]] * (count - len(item.weights))
            rows.append([t for w in windows for t in self._wrap(w)])
            weight_rows.append([x for m in weights for x in [1.0, *m] + [1.0] * (self.max_length - 1 - len(m))])
        device = self.model.token_embedding.weight.device
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        weights = torch.tensor(weight_rows, dtype=torch.float32)
        weights = None if bool((weights == 1).all()) else weights.to(device)
        embeddings = None
        if any(item.vectors for item in items):
            embeddings = self.model.token_embedding(tokens)
            for b, item in enumerate(items):
                for window, position, vectors in item.vectors:
                    start = window * self.max_length + 1 + position
                    if vectors.ndim != 2 or vectors.shape[1] != self.width or position + len(vectors) > body:
                        raise ValueError(f"prompt {b}: token vectors of shape {tuple(vectors.shape)} at window "
                                         f"{window} position {position} do not fit this encoder (width "
                                         f"{self.width}, {body} ids per window)")
                    embeddings[b, start:start + len(vectors)] = vectors.to(embeddings.device, embeddings.dtype)
        return tokens, weights, embeddings

    # --- forward ---

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> ``[B, max_length * k, width]`` (k = 1 unless long prompts are chunked). Prompt objects
        (:meth:`tokenize_prompts`) bring their own windows, weights and token vectors."""
        if _is_prompt_objects(prompts):
            tokens, weights, embeddings = self.tokenize_prompts(prompts)
            return self.encode_tokens(tokens, weights=weights, token_embeddings=embeddings)
        return self.encode_tokens(self.tokenize(prompts))

    def encode_tokens(self, tokens: torch.Tensor, weights: torch.Tensor | None = None,
                      token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, max_length * k]`` -> ``[B, max_length * k, width]``; each window encoded alone.

        ``weights`` [B, max_length * k]: per-token multipliers of the output, each window's mean restored
        (:func:`emphasize`); ``token_embeddings`` [B, max_length * k, width]: the input token embeddings to use in
        place of ``token_embedding(tokens)`` (textual inversion vectors placed in them)."""
        if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[1] % self.max_length:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit: pass [batch, k * "
                             f"{self.max_length}] ids as returned by tokenize()")
        batch, length = tokens.shape
        windows = tokens.reshape(-1, self.max_length).to(self.model.token_embedding.weight.device)
        if token_embeddings is not None:
            token_embeddings = token_embeddings.reshape(-1, self.max_length, self.width)
        z = self._encode_windows(windows, token_embeddings)
        if weights is not None:
            z = emphasize(z, weights.reshape(-1, self.max_length))
        return z.reshape(batch, length, self.width)

    def _encode_windows(self, tokens: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        model, length = self.model, tokens.shape[1]
        if token_embeddings is None:
            token_embeddings = model.token_embedding(tokens)
        x = token_embeddings + model.positional_embedding[:length]  # [N, L, D]
        mask = model.attn_mask[:length, :length]
        batch_first = getattr(model.transformer, "batch_first", False)
        for block in model.transformer.resblocks[:self.layers_run]:
            if _is_plain_block(block):
                x = _plain_block_forward(block, x, mask)
            elif batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        return model.ln_final(x) if self.final_norm else x

    # --- weights ---

    def load_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor], name: str | None = None) -> None:
        """Load text weights strictly from a file or a state dict (``name``: where it came from, for messages);
        a one-line CheckpointError lists what does not fit.

        A file is read by :func:`ldm.io.read_state_dict` (format from its bytes, pickles only with
        ``weights_only``); its names may be this module's (``model.*``) or open_clip CLIP's (``visual.*`` is left
        out). transformers CLIP names are converted by ``ldm.convert.load_text_encoder_weights``.
        """
        if isinstance(source, Mapping):
            state, name = dict(source), name or "state dict"
        else:
            if not os.path.isfile(source):
                raise FileNotFoundError(f"text encoder weights not found: {source} (check ckpt_path)")
            state, name = read_state_dict(source)[0], name or str(source)
        if any(k.endswith("embeddings.token_embedding.weight") for k in state):
            raise CheckpointError(f"{name} holds transformers CLIP names (text_model.*): load it with "
                                  "ldm.convert.load_text_encoder_weights(encoder, path)")
        if not any(k.startswith("model.") for k in state):  # open_clip CLIP names
            state = {f"model.{k}": v for k, v in state.items() if not k.startswith("visual.")}
        check_state_dict(self.state_dict(), state, name,
                         target=f"text encoder {self.arch} (width {self.width}, {self.num_layers} blocks, "
                                f"projection={'model.text_projection' in self.state_dict()})",
                         fix="pick the arch/projection the file was made for")
        self.load_state_dict(state, strict=True)
        logger.info("loaded %d text encoder tensors from %s", len(state), name)
