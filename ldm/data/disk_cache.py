"""A cache on disk of what the frozen encoders make of the training data: VAE moments and text embeddings.

    model:
      params:
        cache_latents: true
        cache_dir: cache/             # the caches of this recipe (any folder; shared by runs and ranks)

It is the second level of the training module's latent cache (``cache_latents``,
:mod:`ldm.training.latent_diffusion`) and of the conditioner's text cache (:meth:`Conditioner.enable_cache`):
what is not on disk is encoded, each entry on its own, and written; a second run of the same recipe encodes
nothing. Layout::

    cache_dir/latents-<VAE fingerprint>/<H>x<W>/<ab>/<key>.safetensors      moments [2C, h, w] (mean, logvar)
    cache_dir/text-<text encoder fingerprint>/<ab>/<key>.safetensors        the embedder's outputs for a caption

- A latent entry's key is a hash of the exact pixels the VAE sees: the picture's content after resizing and
  cropping to its bucket (and flipping), so the crop and resize parameters are part of it. Random crops and flips
  are cached per variant (each variant is its own entry: the cache grows while new variants appear; turn them off
  for a cache a second run fully reuses). A text entry's key is a hash of the caption, which the file also holds.
- The fingerprint of an encoder hashes its class, its settings (layer, padding, ...) and every weight: a changed
  VAE or text encoder writes and reads another folder, so it misses.
- Files are written to a temporary name and renamed (:func:`ldm.io.atomic_write`): a crash leaves no half file,
  and several DDP ranks may write the same entry (the last rename wins; the contents are the same).
- Each file carries a checksum of its tensors. A file that cannot be read, does not match its checksum or holds
  another caption is reported in a warning, encoded again and rewritten; training goes on.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ldm.io import atomic_write

__all__ = ["DiskCache", "fingerprint"]

logger = logging.getLogger(__name__)

_SETTINGS = (str, int, float, bool, type(None))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint(module: nn.Module) -> str:
    """A hash of a module's class, its plain settings (public attributes that are strings, numbers, booleans or
    None, of the module and its submodules) and every tensor of its state dict (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, sub in module.named_modules():
        settings = sorted((k, v) for k, v in vars(sub).items()
                          if not k.startswith("_") and k != "training" and isinstance(v, _SETTINGS))
        h.update(repr((name, type(sub).__qualname__, settings)).encode())
    for name, tensor in module.state_dict().items():
        h.update(repr((name, str(tensor.dtype), tuple(tensor.shape))).encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(repr((name, str(tensors[name].dtype), tuple(tensors[name].shape))).encode())
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


class DiskCache:
    """Latent moments and text embeddings in ``root`` (see the module docstring). ``stats`` counts hits,
    misses (entries written) and corrupt files found, per kind."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"cache_dir '{self.root}' is a file, not a folder; give a folder for the caches")
        self.stats = {"latent_hits": 0, "latent_misses": 0, "text_hits": 0, "text_misses": 0, "corrupt": 0}
        self._fingerprints: dict[int, tuple[nn.Module, str]] = {}

    def __repr__(self) -> str:
        return f"DiskCache('{self.root}', {self.stats})"

    def fingerprint(self, module: nn.Module) -> str:
        """:func:`fingerprint` of a frozen encoder, computed once per module (its weights do not change)."""
        known = self._fingerprints.get(id(module))
        if known is None or known[0] is not module:
            known = (module, fingerprint(module))
            self._fingerprints[id(module)] = known
        return known[1]

    # ---- latents --------------------------------------------------------------------------------------------
    def latent_path(self, vae: nn.Module, key: str, size: Sequence[int]) -> Path:
        height, width = size
        return self.root / f"latents-{self.fingerprint(vae)}" / f"{height}x{width}" / key[:2] / f"{key}.safetensors"

    def load_moments(self, vae: nn.Module, key: str, size: Sequence[int]) -> torch.Tensor | None:
        """The moments of the picture with latent-cache ``key`` at ``size`` (height, width), or None."""
        tensors = self._read(self.latent_path(vae, key, size), key)
        if tensors is None or "moments" not in tensors:
            return None
        self.stats["latent_hits"] += 1
        return tensors["moments"]

    def save_moments(self, vae: nn.Module, key: str, size: Sequence[int], moments: torch.Tensor) -> None:
        self.stats["latent_misses"] += 1
        self._write(self.latent_path(vae, key, size), {"moments": moments}, key)

    # ---- text -----------------------------------------------------------------------------------------------
    def text_path(self, embedder: nn.Module, caption: str) -> Path:
        key = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.root / f"text-{self.fingerprint(embedder)}" / key[:2] / f"{key}.safetensors"

    def load_text(self, embedder: nn.Module, caption: str) -> tuple[torch.Tensor, ...] | None:
        """The outputs of ``embedder([caption])`` (without the batch axis), or None."""
        tensors = self._read(self.text_path(embedder, caption), caption)
        if tensors is None:
            return None
        self.stats["text_hits"] += 1
        return tuple(tensors[str(i)] for i in range(len(tensors)))

    def save_text(self, embedder: nn.Module, caption: str, outputs: Sequence[torch.Tensor]) -> None:
        self.stats["text_misses"] += 1
        self._write(self.text_path(embedder, caption), {str(i): t for i, t in enumerate(outputs)}, caption)

    # ---- files ----------------------------------------------------------------------------------------------
    def _read(self, path: Path, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("key") != key:
                raise ValueError("it holds the entry of another key")
            if meta.get("checksum") != _checksum(tensors):
                raise ValueError("its checksum does not match its contents")
        except Exception as exn:  # truncated, garbage, bit rot: encode again and overwrite
            self.stats["corrupt"] += 1
            logger.warning("cache file '%s' is corrupt (%s: %s); encoding it again", path, type(exn).__name__,
                           str(exn)[:200])
            return None
        return tensors

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {"key": key, "checksum": _checksum(tensors)}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as exn:  # a full or read-only disk costs speed, not the run
            logger.warning("cannot write cache file '%s' (%s); going on without it", path, exn)
