"""Training data: webdataset shards, image folders, synthetic shapes, shared transforms, aspect-ratio buckets and
the disk cache of encoded latents and captions.

Names are imported on first use, so ``import ldm.data.shapes`` does not pull in Lightning.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WebDatasetDataModule": "ldm.data.webdataset",
    "CaptionedShards": "ldm.data.webdataset",
    "expand_shards": "ldm.data.webdataset",
    "ImageFolderDataModule": "ldm.data.folder",
    "ImageFolderDataset": "ldm.data.folder",
    "ShapesDataModule": "ldm.data.datamodule",
    "WorkerCounters": "ldm.data.datamodule",
    "collate": "ldm.data.datamodule",
    "ResumableSampler": "ldm.data.datamodule",
    "ResumableLoader": "ldm.data.datamodule",
    "StreamLoader": "ldm.data.datamodule",
    "ImageTransform": "ldm.data.transforms",
    "load_image": "ldm.data.transforms",
    "Buckets": "ldm.data.buckets",
    "BucketSampler": "ldm.data.buckets",
    "DiskCache": "ldm.data.disk_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
