"""Prompts as people write them for the popular UIs (AUTOMATIC1111's conventions): weights, long prompts, BREAK.

    parse_prompt_attention("a (red:1.3) [circle]")   # [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("circle", 0.909...)]
    prompt = WeightedPrompt("a ((red)) circle BREAK blue background", embeddings)
    model.get_learned_conditioning([prompt, WeightedPrompt("")])      # every text embedder of the model

Syntax (A1111's ``modules/prompt_parser.py``): ``(text)`` multiplies the weight of its tokens by 1.1, ``[text]``
divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3; brackets nest (``((text))`` = 1.21); an unclosed ``(`` or
``[`` applies to the end of the prompt, a stray ``)`` or ``]`` is ordinary text; ``\\(``, ``\\)``, ``\\[``, ``\\]``
and ``\\\\`` are the literal characters; ``BREAK`` (a word in capitals) ends the current chunk, inside brackets too
(A1111 weights it there and encodes the word "break" with a negative weight instead). Every other character,
``<...>`` included, is ordinary text.

Long prompts (A1111's ``sd_hijack_clip.py``): the tokens are cut into chunks of ``max_length - 2`` (75) tokens;
when a chunk is full and a comma was among its last 20 tokens, the text after that comma moves on to the next
chunk. Each chunk gets the start and end tokens and padding, is encoded alone, and the chunks are concatenated
along the sequence (``[B, 77 * k, D]``). Each chunk's hidden states are multiplied by their tokens' weights and
rescaled to the chunk's former mean (:func:`ldm.models.text_encoder.emphasize`). A textual-inversion embedding
named in the prompt takes as many positions as it has vectors (never split across two chunks).

A :class:`WeightedPrompt` goes wherever a prompt string goes into a model's conditioner: each text embedder asks
it for its token windows (``prompt_tokens(encoder)``), so SD 1/2's single encoder and SDXL's two get the same
chunks, each with its own textual-inversion vectors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ldm.models.text_encoder import PromptTokens, _bpe_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from ldm.adapters.embeddings import Embedding, EmbeddingLibrary

__all__ = [
    "BREAK",
    "COMMA_BACKTRACK",
    "PROMPT_SYNTAXES",
    "Chunk",
    "WeightedPrompt",
    "check_prompt_syntax",
    "chunk_prompt",
    "parse_prompt_attention",
    "prompt_inputs",
    "text_encoders",
]

PROMPT_SYNTAXES = ("a1111", "plain")
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)  # how parse_prompt_attention marks a BREAK (A1111's representation)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# one token of the syntax per match: escapes, brackets, a ":weight)" closing, plain text, a lone ":"
_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
  | \\                      # a lone backslash (dropped)
  | [(\[]                   # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with a weight
  | [)\]]                   # a closing bracket
  | [^\\()\[\]:]+           # text
  | :                       # a colon that is no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_prompt_syntax(syntax: str) -> str:
    """``syntax`` if it is known ("a1111": weights, BREAK, long prompts, embeddings; "plain": the prompt as is)."""
    if syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt syntax {syntax!r} is unknown: use {' or '.join(map(repr, PROMPT_SYNTAXES))}")
    return syntax


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's prompt attention syntax -> ``[(text, weight), ...]``, runs of equal weight merged; a BREAK is the
    pair :data:`BREAK` (``("BREAK", -1.0)``). The empty prompt is ``[("", 1.0)]``."""
    parts: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if tuple(part) != BREAK:  # A1111 scales a BREAK too, which turns it into the word "break"
                part[1] *= factor

    for match in _TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(parts))
        elif piece == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} in {piece!r} is not a number: write e.g. (word:1.2), "
                                 "or escape the brackets as \\( \\)") from None
            scale(open_round.pop(), factor)
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, chunk in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append(list(BREAK))
                parts.append([chunk, 1.0])
    for start in open_round:  # unclosed brackets apply to the end of the prompt
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    if not parts:
        parts = [["", 1.0]]
    merged = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


@dataclass
class Chunk:
    """One window of a prompt: its token ids (no start/end tokens), a weight per id, and the textual-inversion
    embeddings placed in it as ``(position, embedding)`` (their positions hold placeholder id 0)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, "Embedding"]] = field(default_factory=list)


def chunk_prompt(text: str, chunk_length: int = 75, embeddings: "EmbeddingLibrary | None" = None,
                 comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A prompt in A1111's syntax -> its chunks of at most ``chunk_length`` tokens (at least one; BREAK closes
    one; a full chunk gives the text after its last comma to the next one when that comma is among its last
    ``comma_backtrack`` tokens). Each weighted piece is tokenized on its own, as A1111 does."""
    tokenizer = _bpe_tokenizer()
    comma = tokenizer.encoder[",</w>"]
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == BREAK:
            close()
            continue
        ids = tokenizer.encode(piece)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(current.ids)
            elif (comma_backtrack and len(current.ids) == chunk_length and last_comma != -1
                  and len(current.ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # the text after the comma moves on to the next chunk
                moved = Chunk(current.ids[cut:], current.weights[cut:],
                              [(p - cut, e) for p, e in current.fixes if p >= cut])
                current.ids, current.weights = current.ids[:cut], current.weights[:cut]
                current.fixes = [(p, e) for p, e in current.fixes if p < cut]
                close()
                current = moved
            if len(current.ids) == chunk_length:
                close()
            embedding, name_length = embeddings.find_at(ids, position) if embeddings else (None, 0)
            if embedding is None:
                current.ids.append(token)
                current.weights.append(weight)
                position += 1
                continue
            count = embedding.num_vectors
            if count > chunk_length:
                raise ValueError(f"embedding {embedding.name!r} has {count} vectors, more than the "
                                 f"{chunk_length} tokens of a prompt chunk")
            if len(current.ids) + count > chunk_length:
                close()
            current.fixes.append((len(current.ids), embedding))
            current.ids += [0] * count
            current.weights += [weight] * count
            position += name_length
    if current.ids or not chunks:
        close()
    return chunks


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt in A1111's syntax, for a model's conditioner in place of the string (see the module's doc).
    ``embeddings``: the textual-inversion embeddings its words may name."""

    text: str
    embeddings: "EmbeddingLibrary | None" = None

    def chunks(self, chunk_length: int = 75) -> list[Chunk]:
        return chunk_prompt(self.text, chunk_length, self.embeddings)

    def prompt_tokens(self, encoder: Any) -> PromptTokens:
        """The windows, weights and textual-inversion vectors for ``encoder`` (a text encoder of
        :mod:`ldm.models.text_encoder`: its window length and width)."""
        chunks = self.chunks(encoder.max_length - 2)
        vectors = [(i, position, embedding.vectors_for(encoder))
                   for i, chunk in enumerate(chunks) for position, embedding in chunk.fixes]
        return PromptTokens([c.ids for c in chunks], [c.weights for c in chunks], vectors)

    def used_embeddings(self) -> list["Embedding"]:
        """The embeddings this prompt names, in order of first use."""
        used = {id(e): e for chunk in self.chunks() for _, e in chunk.fixes}
        return list(used.values())

    def __str__(self) -> str:
        return self.text


def prompt_inputs(prompts: Iterable[str], syntax: str = "a1111",
                  embeddings: "EmbeddingLibrary | None" = None) -> list[Any]:
    """What a model's conditioner gets for ``prompts`` under ``syntax``: :class:`WeightedPrompt` s ("a1111") or
    the strings themselves ("plain": exactly the encoder's own tokenization)."""
    prompts = list(prompts)
    if check_prompt_syntax(syntax) == "plain":
        return prompts
    return [WeightedPrompt(p, embeddings) for p in prompts]


def text_encoders(model: Any) -> list[Any]:
    """The text encoders of a model's conditioner that take prompt objects, in order (SDXL: CLIP-L, then bigG)."""
    return [e for e in model.conditioner.embedders if hasattr(e, "tokenize_prompts")]
