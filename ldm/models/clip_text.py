"""CLIP's text tower and BPE tokenizer as plain modules, with open_clip's names, numbers and architecture configs,
without importing open_clip.

``import open_clip`` runs its package ``__init__``, which imports its whole model zoo, torchvision (and with it
torch._dynamo) and transformers: ~2-3 s of a ~4 s ``python sample.py`` run on the demo model. The text encoder
needs none of it, so the pieces it uses are here:

- :class:`TextTransformer`: open_clip's ``transformer.TextTransformer`` for the plain causal CLIP text towers (every
  SD, SD2 and SDXL text encoder): the same submodules in the same order (so the same state dict names, and the same
  random initialisation for a seed) and the same LayerNorm / QuickGELU / LayerScale. ``tests/test_text_encoder.py``
  checks the outputs and state dicts against open_clip's own.
- :func:`arch_config`: an architecture's config read from the same JSON files open_clip reads (its
  ``model_configs/`` folder, found with ``importlib.util.find_spec``, which does not run the package) and the
  project's ``text_archs/``; configs registered with ``open_clip.add_model_config`` are seen too once open_clip is
  imported.
- :class:`BPETokenizer`: CLIP's byte-level BPE (open_clip's ``SimpleTokenizer`` with its default "lower" cleaning),
  on open_clip's vocabulary file.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import html
import importlib.util
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

# text that ftfy.fix_text returns unchanged (printable ASCII, tabs and newlines, no "&" that it could unescape)
_PLAIN_TEXT = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
_SPECIAL = "<start_of_text>|<end_of_text>"
# BPETokenizer.pat on ASCII text, in re (whose import is free): the same pieces, tested against open_clip's tokenizer
_ASCII_WORDS = re.compile(_SPECIAL + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""",
                          re.IGNORECASE | re.ASCII)

__all__ = ["TextConfig", "TextTransformer", "LayerNorm", "QuickGELU", "LayerScale", "BPETokenizer", "arch_config",
           "arch_names", "text_tower_types"]

ARCH_DIR = Path(__file__).with_name("text_archs")


# ----------------------------------------------------------------------------------------------------------
# Architecture configs
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _open_clip_dir() -> Path | None:
    """open_clip's package folder, without importing it (its vocabulary and ``model_configs/`` live there)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _config_files() -> dict[str, Path]:
    """Architecture name -> JSON file: open_clip's configs, then the project's (which win, as after
    ``open_clip.add_model_config(ARCH_DIR)``)."""
    folders = [] if _open_clip_dir() is None else [_open_clip_dir() / "model_configs"]
    return {p.stem: p for folder in [*folders, ARCH_DIR] for p in sorted(folder.glob("*.json"))}


@functools.lru_cache(maxsize=None)
def _read_config(path: Path) -> dict | None:
    config = json.loads(path.read_text())
    return config if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")) else None


def arch_names() -> list[str]:
    """The architectures :func:`arch_config` knows (open_clip's, the project's, and any registered with an
    imported open_clip)."""
    names = set(_config_files())
    if "open_clip.factory" in sys.modules:
        names |= set(sys.modules["open_clip.factory"].list_models())
    return sorted(names)


def arch_config(arch: str) -> dict | None:
    """The open_clip model config (``embed_dim``, ``text_cfg``, ...) of a named architecture (a copy), None when
    no file defines it. Read offline: a name with open_clip's ``hf-hub:`` prefix is not looked up."""
    path = _config_files().get(arch)
    config = _read_config(path) if path is not None else None
    if config is None and "open_clip.factory" in sys.modules:  # added with open_clip.add_model_config
        factory = sys.modules["open_clip.factory"]
        config = factory.get_model_config(arch) if arch in factory.list_models() else None
    return copy.deepcopy(config)


@dataclasses.dataclass
class TextConfig:
    """A ``text_cfg`` of an open_clip config, with open_clip's defaults (the fields of its ``CLIPTextCfg``)."""

    context_length: int = 77
    vocab_size: int = 49408
    hf_tokenizer_name: Optional[str] = None
    tokenizer_mode: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False
    pad_id: int = 0
    eos_id: int = 2
    no_causal_mask: bool = False
    final_ln_after_pool: bool = False
    pool_type: str = "argmax"
    proj_bias: bool = False
    proj_type: str = "linear"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    block_type: Optional[str] = None
    qk_norm: bool = False
    scaled_cosine_attn: bool = False
    scale_heads: bool = False
    scale_attn_inner: bool = False
    scale_attn: bool = False
    scale_fc: bool = False
    hf_model_name: Optional[str] = None
    hf_model_pretrained: bool = True
    hf_proj_type: str = "mlp"
    hf_pooler_type: str = "mean_pooler"


# ----------------------------------------------------------------------------------------------------------
# The text tower
# ----------------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with the output cast back to the input's dtype (open_clip's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm self-attention and MLP with residuals (open_clip's default block, batch first)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, ls_init_value: float | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 ls_init_value: float | None = None, act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.width, self.layers, self.batch_first = width, layers, True
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act_layer,
                                                               norm_layer) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class TextTransformer(nn.Module):
    """CLIP's causal text transformer with open_clip's module names: ``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final`` and ``text_projection`` (a parameter, or a Linear with
    ``proj_bias``; none with ``proj_type="none"``); the causal mask is the non-persistent buffer ``attn_mask``.
    :class:`ldm.models.text_encoder.OpenCLIPTextEncoder` runs it (its forward is the encoder's)."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, ls_init_value: float | None = None,
                 output_dim: int | None = 512, pool_type: str = "argmax", proj_type: str = "linear",
                 proj_bias: bool = False, act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.num_pos = self.context_length = context_length
        self.vocab_size, self.width, self.heads, self.output_dim = vocab_size, width, heads, output_dim
        self.pool_type = pool_type  # open_clip's pooled feature; the encoder returns every token
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, ls_init_value, act_layer, norm_layer)
        self.ln_final = norm_layer(width)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        if proj_type == "none" or not output_dim:
            self.text_projection = None
        elif proj_bias:
            self.text_projection = nn.Linear(width, output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's initialisation, in its order (so a seed gives the same weights)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)


def text_tower_types() -> tuple[type, ...]:
    """The text tower classes an encoder may hold: this module's, and open_clip's where it has been imported (an
    architecture with open_clip's custom attention blocks is built by open_clip)."""
    theirs = getattr(sys.modules.get("open_clip.transformer"), "TextTransformer", None)
    return (TextTransformer,) if theirs is None else (TextTransformer, theirs)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_bpe() -> Path:
    """open_clip's CLIP vocabulary file (``bpe_simple_vocab_16e6.txt.gz``)."""
    folder = _open_clip_dir()
    if folder is None or not (folder / "bpe_simple_vocab_16e6.txt.gz").is_file():
        raise FileNotFoundError("open_clip's CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz) is not installed: "
                                "pip install open_clip_torch")
    return folder / "bpe_simple_vocab_16e6.txt.gz"


class BPETokenizer:
    """CLIP's byte-level BPE tokenizer: ``encode(text)`` -> ids without the start and end tokens, as open_clip's
    ``SimpleTokenizer`` (text fixed by ftfy, HTML entities unescaped, whitespace collapsed, lower-cased)."""

    def __init__(self, bpe_path: str | Path | None = None):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        count = 49152 - 256 - 2  # the merges CLIP uses: the file's first lines after its header (of ~262k)
        text = ""
        with gzip.open(bpe_path or default_bpe(), "rt", encoding="utf-8") as f:
            while text.count("\n") <= count and (chunk := f.read(1 << 18)):  # no need to unzip the rest
                text += chunk
        merges = text.split("\n", count + 1)[1:count + 1]  # "a b": kept as the lines are (no tuple per merge)
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + [merge.replace(" ", "") for merge in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab += special
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))  # "first second" -> rank
        self.cache = {t: t for t in special}
        self.vocab_size = len(self.encoder)
        self.all_special_ids = [self.encoder[t] for t in special]
        self.sot_token_id, self.eot_token_id = self.all_special_ids

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        return {v: k for k, v in self.encoder.items()}

    @functools.cached_property
    def pat(self):
        """open_clip's pre-tokenizer pattern (``regex``: ``\\p{L}`` letters, ``\\p{N}`` numbers)."""
        import regex

        return regex.compile(_SPECIAL + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)

    def words(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of cleaned text: ASCII text (every prompt of the shapes world, most prompts) by
        the same pattern in ``re`` (on ASCII, ``\\p{L}`` is ``[a-z]`` and ``\\p{N}`` ``[0-9]``), the rest by
        ``regex``, whose import the first kind then never pays."""
        return (_ASCII_WORDS if text.isascii() else self.pat).findall(text)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        ranks = self.bpe_ranks
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {f"{a} {b}" for a, b in zip(word, word[1:])}
            bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram.split(" ")
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def clean(self, text: str) -> str:
        if not _PLAIN_TEXT.fullmatch(text):  # printable ASCII without "&" is ftfy's fixed point: skip its import
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.words(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

