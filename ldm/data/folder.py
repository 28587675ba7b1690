"""Training data from a folder of images with captions.

Two layouts are read (searched recursively, images ending in .jpg/.jpeg/.png/.webp):

* ``cat.jpg`` next to ``cat.txt`` holding its caption;
* a ``captions.jsonl`` in the folder, one ``{"file": "cat.jpg", "text": "a cat"}`` per line (paths relative
  to the folder); when it exists it is the only caption source.

With ``buckets`` (``{base, step, max_aspect}``, :mod:`ldm.data.buckets`) each picture is resized and cropped
to its aspect-ratio bucket instead of a ``size`` square, and every batch holds one bucket; a picture whose size
cannot be read is skipped with a warning and counted in ``stats["bad_samples"]``.

Images without a caption are counted (``datamodule.stats["missing_caption"]``) and dropped or given ""
(``missing_caption="drop"|"empty"``). An image whose ``.txt`` cannot be read as UTF-8 text is skipped, named in
a warning and counted in ``stats["bad_samples"]`` (as the shard reader does with a bad sample). The validation
split is a fixed, seeded choice of files.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Sequence

from PIL import Image
from torch.utils.data import Dataset

from ldm.config import ConfigError
from ldm.data.buckets import Buckets, parse_buckets
from ldm.data.datamodule import MapDataModule, WorkerCounters, check_loader_args
from ldm.data.transforms import IMAGE_EXTENSIONS, ImageTransform, load_image

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "scan_image_folder", "FOLDER_STATS"]

logger = logging.getLogger(__name__)

FOLDER_STATS = ("samples", "bad_samples", "missing_caption")
_NAMED = 10  # unreadable caption files named one by one in warnings (and the last one, with the total)
Item = tuple[str, "str | None"]  # (image path, caption or None when it has none)


def scan_image_folder(root: str | os.PathLike, captions_file: str = "captions.jsonl",
                      unreadable: list[tuple[str, str]] | None = None) -> list[Item]:
    """All (image path, caption) pairs under ``root``, sorted by path; caption is None when missing.

    An image whose caption file cannot be read (not UTF-8 text, no permission) is left out and, with
    ``unreadable``, appended there as (caption file, reason)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder '{root}' not found; check data.params.root")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in '{root}'; check data.params.root")
    jsonl = root / captions_file
    if jsonl.is_file():
        captions = _read_jsonl(jsonl, root)
        return [(str(p), captions.get(p.resolve())) for p in images]
    items = []
    for p in images:
        txt = p.with_suffix(".txt")
        try:
            items.append((str(p), txt.read_text(encoding="utf-8").strip() if txt.is_file() else None))
        except (UnicodeDecodeError, OSError) as e:
            if unreadable is not None:
                unreadable.append((str(txt), f"{type(e).__name__}: {e}"))
    return items


def _read_jsonl(path: Path, root: Path) -> dict[Path, str]:
    """``{resolved image path: caption}`` from a captions.jsonl; malformed lines are config errors."""
    captions = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}:{number}: not UTF-8 text ({e}); fix that line") from e
        try:
            record = json.loads(line)
            file, text = record["file"], record.get("text")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{number}: expected {{\"file\": ..., \"text\": ...}} ({type(e).__name__}); "
                              "fix that line") from e
        image = (root / file).resolve()
        if not image.is_file():
            logger.warning("%s:%d names '%s', which does not exist; ignored", path, number, file)
        if isinstance(text, str):
            captions[image] = text.strip()
    return captions


class ImageFolderDataset(Dataset):
    """Map-style dataset of ``{"image": FloatTensor[3, S, S] in [-1, 1], "caption": str}``.

    An image that cannot be decoded is logged, counted in ``stats["bad_samples"]`` and replaced by the
    next readable one, so batches keep their size. With ``sizes`` (one ``(height, width)`` per item: its
    aspect-ratio bucket) item ``i`` is cropped to ``sizes[i]`` (a replacement comes from the same bucket), and
    ``bucket_ids`` numbers the distinct sizes for the loader's bucket sampler.
    """

    def __init__(self, items: Sequence[tuple[str, str]], transform: ImageTransform,
                 stats: WorkerCounters | None = None, sizes: Sequence[tuple[int, int]] | None = None):
        if not items:
            raise ValueError("ImageFolderDataset got no images; check data.params.root and val_fraction")
        if sizes is not None and len(sizes) != len(items):
            raise ValueError(f"got {len(sizes)} bucket sizes for {len(items)} images")
        self.items = list(items)
        self.transform = transform
        self.stats = stats if stats is not None else WorkerCounters(FOLDER_STATS)
        self.sizes = None if sizes is None else [tuple(s) for s in sizes]
        ids = {size: n for n, size in enumerate(sorted(set(self.sizes or ())))}
        self.bucket_ids = None if sizes is None else [ids[s] for s in self.sizes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        size = None if self.sizes is None else self.sizes[index]
        for offset in range(len(self.items)):
            other = (index + offset) % len(self.items)
            if size is not None and self.sizes[other] != size:
                continue  # a replacement must fit the batch's bucket
            path, caption = self.items[other]
            try:
                sample = self.transform.sample(load_image(path), size)
            except Exception as exn:  # corrupt or unreadable file: count it, use the next one
                count = self.stats.add("bad_samples")
                logger.warning("skipping unreadable image '%s': %s: %s [%d bad in this worker]",
                               path, type(exn).__name__, exn, count)
                continue
            self.stats.add("samples")
            return {**sample, "caption": caption}
        raise RuntimeError(f"none of the {len(self.items)} images could be read; check data.params.root")


class ImageFolderDataModule(MapDataModule):
    """Lightning data module over an image folder; batches are ``{"image": [B,3,S,S], "caption": [str]}``.

    ``val_fraction`` of the files (at least one when > 0) go to validation, chosen by ``seed``.
    ``micro_conditioning``: each sample also holds SDXL's ``original_size_as_tuple``, ``crop_coords_top_left``
    and ``target_size_as_tuple`` (see :class:`ldm.data.transforms.ImageTransform`).
    ``buckets``: ``{base, step, max_aspect}``: aspect-ratio buckets (:mod:`ldm.data.buckets`) instead of
    ``size`` squares; ``random_crop`` then picks the crop inside the bucket.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int, size: int = 256, num_workers: int = 2,
                 val_fraction: float = 0.05, seed: int = 0, random_crop: bool = False, flip_p: float = 0.0,
                 missing_caption: str = "drop", captions_file: str = "captions.jsonl",
                 micro_conditioning: bool = False, buckets: dict[str, float] | bool | None = None):
        super().__init__()
        check_loader_args(batch_size, num_workers, missing_caption)
        self.buckets: Buckets | None = parse_buckets(buckets)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction={val_fraction!r} must be in [0, 1); set data.params.val_fraction")
        self.root, self.captions_file = root, captions_file
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed, self.missing_caption = val_fraction, seed, missing_caption
        self.train_transform = ImageTransform(size, random_crop=random_crop, flip_p=flip_p,
                                              micro_conditioning=micro_conditioning)
        self.val_transform = ImageTransform(size, micro_conditioning=micro_conditioning)
        self.stats = WorkerCounters(FOLDER_STATS, num_workers)
        self.val_stats = WorkerCounters(FOLDER_STATS, num_workers)
        unreadable: list[tuple[str, str]] = []
        self.items = self._captioned(scan_image_folder(root, captions_file, unreadable))  # errors now, not mid-run
        for number, (txt, reason) in enumerate(unreadable, start=1):
            self.stats.add("bad_samples")
            if number <= _NAMED or number == len(unreadable):
                logger.warning("skipping the image of '%s': its caption cannot be read (%s) [%d of %d unreadable "
                               "captions]", txt, reason[:200], number, len(unreadable))
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    def _captioned(self, items: list[Item]) -> list[tuple[str, str]]:
        missing = [path for path, caption in items if caption is None]
        if missing:
            self.stats.add("missing_caption", len(missing))
            logger.warning("%d of %d images in '%s' have no caption (e.g. '%s'); %s", len(missing), len(items),
                           self.root, missing[0], "dropped" if self.missing_caption == "drop" else "using ''")
        kept = [(p, c if c is not None else "") for p, c in items
                if c is not None or self.missing_caption == "empty"]
        if not kept:
            raise ConfigError(f"no image in '{self.root}' has a caption (.txt or {self.captions_file}); "
                              "add captions or set data.params.missing_caption=empty")
        return kept

    def split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(train items, val items): a seeded shuffle of the sorted file list, the first ones for validation."""
        order = list(self.items)
        random.Random(self.seed).shuffle(order)
        num_val = round(len(order) * self.val_fraction)
        if self.val_fraction > 0 and len(order) > 1:
            num_val = min(max(1, num_val), len(order) - 1)
        return sorted(order[num_val:]), sorted(order[:num_val])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self.split()
        if self.buckets is not None:
            train, train_sizes = self._bucketed(train, self.stats)
            val, val_sizes = self._bucketed(val, self.val_stats)
        else:
            train_sizes = val_sizes = None
        self.train_set = ImageFolderDataset(train, self.train_transform, self.stats, train_sizes)
        self.val_set = ImageFolderDataset(val, self.val_transform, self.val_stats, val_sizes) if val else None

    def _bucketed(self, items: list[tuple[str, str]], stats: WorkerCounters
                  ) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
        """The items whose size can be read, and the bucket size of each (from the files' headers)."""
        kept, sizes = [], []
        for path, caption in items:
            try:
                with Image.open(path) as img:
                    height, width = img.height, img.width
            except Exception as exn:  # not an image: skipped now, as a bad image would be when read
                count = stats.add("bad_samples")
                logger.warning("skipping unreadable image '%s': %s: %s [%d bad]", path, type(exn).__name__, exn,
                               count)
                continue
            kept.append((path, caption))
            sizes.append(self.buckets.size(height, width))
        if items and not kept:
            raise ConfigError(f"none of the {len(items)} images in '{self.root}' could be read; "
                              "check data.params.root")
        return kept, sizes

