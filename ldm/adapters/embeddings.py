"""Textual inversion: embeddings (learned token vectors) used in prompts by name.

    library = EmbeddingLibrary()
    library.load("embeddings/bad-hands.pt", encoders=text_encoders(model))  # trigger word: the file stem
    WeightedPrompt("a portrait, bad-hands", library)                          # its vectors replace the word

File formats (read by :func:`ldm.io.read_state_dict`: safetensors, or a pickle loaded ``weights_only``):

- A1111 ``.pt``: ``{"string_to_param": {"*": [n, width]}, "name": ..., ...}``;
- A1111 / civitai ``.safetensors``: ``emb_params`` ``[n, width]``; SDXL: ``clip_l`` ``[n, 768]`` and ``clip_g``
  ``[n, 1280]``, one set per text encoder;
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: [width] or [n, width]}``.

The word that calls an embedding is the file's stem (A1111's rule: rename the file to rename the word), or
``token=`` when given; a diffusers ``learned_embeds.*`` file is called by the token stored in it. A multi-vector
embedding takes n token positions of the prompt. Each text encoder gets the vectors of its width (SDXL: CLIP-L
the ``clip_l`` set, bigG the ``clip_g`` one; an encoder may name its set by an ``embedding_key`` attribute).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ldm.io import CheckpointError, model_hash, read_state_dict
from ldm.models.text_encoder import _bpe_tokenizer

__all__ = ["EMBEDDING_SUFFIXES", "Embedding", "EmbeddingLibrary", "read_embedding", "embedding_vectors"]

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
_DIFFUSERS_STEM = "learned_embeds"


@dataclass
class Embedding:
    """A textual-inversion embedding: its trigger word, its vector sets (key "" for a single set, "clip_l" /
    "clip_g" for SDXL), where it came from and the first 12 hex digits of the file's sha256 (A1111's short
    hash, written to the "TI hashes" image parameter)."""

    name: str
    vectors: dict[str, torch.Tensor]
    path: Path | None = None
    hash: str | None = None
    ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        counts = {t.shape[0] for t in self.vectors.values()}
        if not self.vectors or len(counts) != 1 or any(t.ndim != 2 or not len(t) for t in self.vectors.values()):
            raise ValueError(f"embedding {self.name!r}: every vector set must be [n, width] with the same n >= 1")
        self.ids = tuple(_bpe_tokenizer().encode(self.name))
        if not self.ids:
            raise ValueError(f"embedding name {self.name!r} has no tokens: give it a name made of letters or digits")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> list[int]:
        return [t.shape[1] for t in self.vectors.values()]

    def _where(self) -> str:
        return f"embedding {self.name!r}" + (f" ({self.path})" if self.path else "")

    def vectors_for(self, encoder: Any) -> torch.Tensor:
        """The ``[n, width]`` vectors for a text encoder (by its ``embedding_key`` attribute, else its width)."""
        key = getattr(encoder, "embedding_key", None)
        if key in self.vectors:
            found = [self.vectors[key]]
        else:
            found = [t for t in self.vectors.values() if t.shape[1] == encoder.width]
        if len(found) != 1:
            sets = ", ".join(f"{k or 'vectors'} {t.shape[1]}" for k, t in self.vectors.items())
            problem = "is ambiguous" if found else "does not fit"
            raise ValueError(f"{self._where()} {problem}: its widths are {sets} but the model's text encoder takes "
                             f"{encoder.width}; use an embedding made for this model")
        return found[0]


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """An embedding file in any of the formats above; ``token``: the trigger word (default: the file stem, or the
    token stored in a diffusers ``learned_embeds`` file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding not found: {path} (check the path)")
    state, _ = read_state_dict(path, nested=True)
    vectors, stored_token = embedding_vectors(state, str(path))
    if token is None:
        token = stored_token if stored_token is not None and path.stem == _DIFFUSERS_STEM else path.stem
    return Embedding(token, vectors, path, model_hash(path, 12))


def embedding_vectors(state: dict[str, Any], where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """An embedding's tensors (one of the formats above, also as bundled in a LoRA file under ``bundle_emb.<name>.``)
    -> its vector sets (float32 ``[n, width]``) and the token a diffusers file stores (else None); ``where`` names
    the source in the one-line CheckpointError of anything else."""
    params = [k for k in state if k.startswith("string_to_param.")]
    stored_token = None
    if params:
        if len(params) != 1:
            raise CheckpointError(f"{where}: an A1111 embedding has one string_to_param entry, this one has "
                                  f"{len(params)}; it is not supported")
        vectors = {"": state[params[0]]}
    elif "emb_params" in state:
        vectors = {"": state["emb_params"]}
    elif "clip_l" in state or "clip_g" in state:
        vectors = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
    elif len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):
        stored_token, tensor = next(iter(state.items()))
        vectors = {"": tensor}
    else:
        keys = ", ".join(sorted(state)[:5]) + (", ..." if len(state) > 5 else "")
        raise CheckpointError(f"{where} is not a textual-inversion embedding (it has {keys}; expected "
                              "string_to_param, emb_params, clip_l + clip_g, or one {token: tensor})")
    vectors = {k: (t[None] if t.ndim == 1 else t).detach().float() for k, t in vectors.items()}
    if any(t.ndim != 2 for t in vectors.values()):
        raise CheckpointError(f"{where}: embedding vectors must be [n, width], got "
                              f"{[tuple(t.shape) for t in vectors.values()]}")
    return vectors, stored_token


class EmbeddingLibrary:
    """The embeddings a prompt may name, found in its token ids (the longest name wins)."""

    def __init__(self, embeddings: Iterable[Embedding] = ()):
        self._by_name: dict[str, Embedding] = {}
        self._by_first_id: dict[int, list[Embedding]] = {}
        for embedding in embeddings:
            self.add(embedding)

    def add(self, embedding: Embedding) -> Embedding:
        if embedding.name in self._by_name:
            log.warning("embedding %r replaces the one loaded before it (%s)", embedding.name,
                        self._by_name[embedding.name].path)
            self.remove(embedding.name)
        self._by_name[embedding.name] = embedding
        same = self._by_first_id.setdefault(embedding.ids[0], [])
        same.append(embedding)
        same.sort(key=lambda e: len(e.ids), reverse=True)
        return embedding

    def remove(self, name: str) -> None:
        embedding = self._by_name.pop(name)
        self._by_first_id[embedding.ids[0]].remove(embedding)

    def load(self, path: str | os.PathLike, token: str | None = None, encoders: Iterable[Any] = ()) -> Embedding:
        """Read an embedding file and add it; with ``encoders`` (the model's text encoders) a file whose vectors
        do not fit one of them is a one-line error naming it."""
        embedding = read_embedding(path, token)
        for encoder in encoders:
            embedding.vectors_for(encoder)
        return self.add(embedding)

    def load_dir(self, folder: str | os.PathLike, encoders: Iterable[Any] = ()) -> list[Embedding]:
        """Every embedding file in ``folder`` and its subfolders; files for other models (other widths) and
        unreadable files are skipped with a log line (a folder often holds embeddings of several models)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"embeddings folder not found: {folder}")
        encoders = list(encoders)
        loaded = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES):
            try:
                loaded.append(self.load(path, encoders=encoders))
            except (CheckpointError, OSError) as e:
                log.warning("skipped embedding %s: %s", path, str(e).splitlines()[0])
            except ValueError as e:  # made for another model
                log.info("skipped embedding %s: %s", path, str(e).splitlines()[0])
        log.info("loaded %d embeddings from %s", len(loaded), folder)
        return loaded

    def find_at(self, ids: list[int], position: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's ids start at ``ids[position]`` and the number of ids it covers."""
        for embedding in self._by_first_id.get(ids[position], ()):
            if tuple(ids[position:position + len(embedding.ids)]) == embedding.ids:
                return embedding, len(embedding.ids)
        return None, 0

    def hashes(self, embeddings: Iterable[Embedding]) -> str | None:
        """A1111's "TI hashes" value for the embeddings used: ``"name: hash, name: hash"`` (None for none)."""
        pairs = [f"{e.name.replace(':', '').replace(',', '')}: {e.hash}" for e in embeddings if e.hash]
        return ", ".join(pairs) or None

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Embedding]:
        return iter(list(self._by_name.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Embedding:
        return self._by_name[name]
