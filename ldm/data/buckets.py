"""Aspect-ratio buckets: train on pictures of many shapes without cropping them all square.

    data:
      params:
        buckets: {base: 512, step: 64, max_aspect: 2.0}    # SD 1.x; SDXL: base 1024

:class:`Buckets` lists target sizes ``(height, width)`` of about ``base * base`` pixels (never more), both sides
multiples of ``step``, from ``max_aspect`` : 1 tall to 1 : ``max_aspect`` wide. Each picture goes to the bucket
whose crop cuts the fewest pixels off it (:meth:`Buckets.index`, the nearest aspect ratio measured in the
bucket's pixels), is resized to cover the bucket and cropped: at random with ``data.params.random_crop``, else
centred (:meth:`ldm.data.transforms.ImageTransform.sample` with ``size``). Within ``max_aspect`` the crop then
cuts at most one ``step`` off one side. The original size and the crop offsets are what
``micro_conditioning`` records for SDXL, as for square crops.

Every batch comes from one bucket:

- Image folders (map-style): :class:`BucketSampler` splits each bucket's pictures, shuffled by ``(seed, epoch)``,
  into batches, shuffles the batches, drops the last ``len % world_size`` and deals the rest round-robin to the
  ranks, so every rank has the same number of batches and no rank waits on a bucket only another has. It is
  built from the global index list (the same on every rank) and resumes mid-epoch (:class:`BucketLoader`).
- Webdataset shards (streams): :func:`bucket_batches` keeps one buffer per bucket and yields a batch when one is
  full; each rank buckets its own stream and, with ``epoch_length``, yields a fixed number of batches per epoch.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from typing import Any, Iterable, Iterator, Mapping, Sequence

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.config import ConfigError, to_plain
from ldm.data.datamodule import ResumableLoader

__all__ = ["Buckets", "parse_buckets", "BucketSampler", "BucketLoader", "BatchDataset", "bucket_batches"]

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width)
_KEYS = ("base", "step", "max_aspect")


class Buckets:
    """Target sizes ``(height, width)`` of at most ``base**2`` pixels, sides multiples of ``step``, aspect
    ratios up to ``max_aspect`` either way (and the first one at or beyond it, so that pictures of ``max_aspect``
    fit too); sorted from the tallest to the widest. For each side the other is the longest within the area."""

    def __init__(self, base: int = 512, step: int = 64, max_aspect: float = 2.0):
        where = "data.params.buckets"
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError(f"{where}.step={step!r} must be a positive int (64 for Stable Diffusion)")
        if not isinstance(base, int) or isinstance(base, bool) or base < step or base % step:
            raise ConfigError(f"{where}.base={base!r} must be a positive multiple of step={step} (512 for SD 1.x, "
                              "1024 for SDXL)")
        if not isinstance(max_aspect, (int, float)) or isinstance(max_aspect, bool) or max_aspect < 1:
            raise ConfigError(f"{where}.max_aspect={max_aspect!r} must be a number >= 1 (e.g. 2.0)")
        self.base, self.step, self.max_aspect = base, step, float(max_aspect)
        area = base * base
        candidates = set()
        side = step
        while area // side >= step:  # one side, then the longest other side (a multiple of step) within the area
            other = area // side // step * step
            candidates.update({(side, other), (other, side)})
            side += step
        wide = sorted((s for s in candidates if s[1] >= s[0]), key=lambda s: (s[1] / s[0], s[0]))
        # up to max_aspect, and the first one at or beyond it, so that a picture of max_aspect is cut <= step
        keep = next((n for n, (h, w) in enumerate(wide) if w >= self.max_aspect * h), len(wide) - 1)
        wide = wide[:keep + 1]
        self.sizes: list[Size] = sorted({*wide, *((w, h) for h, w in wide)}, key=lambda s: (s[1] / s[0], s[0]))

    def __repr__(self) -> str:
        return f"Buckets(base={self.base}, step={self.step}, max_aspect={self.max_aspect}: {len(self)} sizes)"

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> Size:
        return self.sizes[index]

    def index(self, height: int, width: int) -> int:
        """The bucket of a ``height`` x ``width`` picture: the one whose crop (after resizing to cover it) cuts
        the fewest pixels off (ties: the first)."""
        if height < 1 or width < 1:
            raise ValueError(f"an image of {height}x{width} pixels has no bucket")
        return min(range(len(self.sizes)), key=lambda i: self.overhang(height, width, i))

    def size(self, height: int, width: int) -> Size:
        """``(height, width)`` of the bucket of a ``height`` x ``width`` picture."""
        return self.sizes[self.index(height, width)]

    def overhang(self, height: int, width: int, index: int) -> float:
        """Pixels the crop cuts off (from the longer side, relative to the bucket) when a ``height`` x ``width``
        picture is resized to cover bucket ``index``."""
        h, w = self.sizes[index]
        scale = max(h / height, w / width)
        return max(height * scale - h, width * scale - w)


def parse_buckets(value: Any) -> Buckets | None:
    """``data.params.buckets`` -> :class:`Buckets` (None when off: null or false)."""
    value = to_plain(value)
    if value is None or value is False:
        return None
    if value is True:
        return Buckets()
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.params.buckets={value!r}: give a mapping like {{base: 512, step: 64, "
                          "max_aspect: 2.0}} (or null for square crops)")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ConfigError(f"data.params.buckets.{unknown[0]}: unknown key; use {', '.join(_KEYS)}")
    return Buckets(**value)


# ---- image folders: one bucket per batch, the same number of batches on every rank ------------------------------
class BucketSampler(DistributedSampler):
    """Batches of dataset indices, each from one bucket; this rank's share of every epoch, resumable.

    ``bucket_ids[i]`` is the bucket of item ``i`` (the same list on every rank). Epoch ``e``: with ``shuffle``,
    each bucket's items are shuffled by ``(seed, e)`` and cut into batches of ``batch_size`` (a bucket's last batch
    may be smaller); the batches of all buckets are shuffled together; the last ``len % world_size`` batches are
    dropped and rank ``r`` takes every ``world_size``-th from the ``r``-th. Without ``shuffle`` (validation) the
    order is the index order. It yields one key per batch, a tuple of ``(epoch, index)`` pairs
    (:class:`BatchDataset` reads it). Being a ``DistributedSampler`` tells Lightning not to replace it under DDP.
    The position (``epoch``, ``offset`` = batches of this epoch delivered) resumes as
    :class:`ldm.data.datamodule.ResumableSampler`'s does.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.bucket_ids = list(bucket_ids)
        super().__init__(self.bucket_ids, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.offset = 0
        total = len(self.global_batches(0))
        if total < world_size:
            raise ConfigError(f"{len(self.bucket_ids)} images make {total} bucketed batches, fewer than the "
                              f"{world_size} ranks; add images or lower data.params.batch_size")
        self.num_batches = total // world_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order, before the remainder is dropped."""
        rng = random.Random(f"buckets-{self.seed}-{epoch}")
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            members.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(members):
            indices = members[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        batches = self.global_batches(epoch)
        return batches[:self.num_batches * self.num_replicas][self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[tuple[int, int], ...]]:
        epoch, offset = self.epoch, self.offset  # read at the first batch: after Lightning's set_epoch
        for batch in itertools.islice(self.rank_batches(epoch), offset, None):
            yield tuple((epoch, index) for index in batch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def advance(self, num_batches: int = 1) -> None:
        self.offset = min(self.offset + num_batches, self.num_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "dataset_size": len(self.bucket_ids),
                "world_size": self.num_replicas, "buckets": _fingerprint(self.bucket_ids), "bucketed": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; another data set, seed, rank count or bucket assignment goes on with
        the next epoch (nothing is repeated) and says so."""
        epoch, offset = int(state["epoch"]), int(state["offset"])
        saved = (state.get("seed"), state.get("dataset_size"), state.get("world_size"), state.get("buckets"))
        now = (self.seed, len(self.bucket_ids), self.num_replicas, _fingerprint(self.bucket_ids))
        if saved != now:
            logger.warning("the bucketed loader state was saved for other data (seed, size, ranks or buckets "
                           "changed): epoch %d cannot resume in the same order; going on with epoch %d",
                           epoch, epoch + 1)
            offset = self.num_batches
        self.epoch, self.offset = (epoch + 1, 0) if offset >= self.num_batches else (epoch, offset)


def _fingerprint(values: Sequence[int]) -> int:
    import zlib

    return zlib.crc32(",".join(map(str, values)).encode())


class BatchDataset(Dataset):
    """``dataset[((epoch, index), ...)]``: the list of ``dataset[index]``, each with torch's RNG seeded by
    ``(seed, epoch, index)`` (as :class:`ldm.data.datamodule.KeyedDataset`, so that a picture is augmented the
    same way with and without buckets)."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        from ldm.data.datamodule import KeyedDataset

        self.dataset, self.keyed = dataset, KeyedDataset(dataset, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, keys: Sequence[tuple[int, int]]) -> list:
        return [self.keyed[key] for key in keys]


class BucketLoader(ResumableLoader):
    """:class:`ldm.data.datamodule.ResumableLoader` over a :class:`BucketSampler`: one whole batch per sampler item
    (``batch_size=None``), collated by ``collate_fn``; its position is saved in Lightning checkpoints."""

    def __init__(self, dataset: Dataset, sampler: BucketSampler, collate_fn: Any, **kwargs: Any):
        DataLoader.__init__(self, BatchDataset(dataset, sampler.seed), batch_size=None, sampler=sampler,
                            collate_fn=collate_fn, **kwargs)


# ---- webdataset streams: one buffer per bucket -------------------------------------------------------------------
def bucket_batches(samples: Iterable[dict], batch_size: int, *, flush: bool = True) -> Iterator[list[dict]]:
    """Group samples by their image's shape: a list of ``batch_size`` samples of one bucket as soon as its
    buffer is full. At the end of ``samples``, with ``flush``, the part-filled buffers follow (smallest bucket
    shape first), each as one smaller batch."""
    buffers: dict[tuple[int, ...], list[dict]] = {}
    for sample in samples:
        key = tuple(sample["image"].shape)
        buffer = buffers.setdefault(key, [])
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield buffer
            buffers[key] = []
    if flush:
        for key in sorted(buffers):
            if buffers[key]:
                yield buffers[key]


def stream_batches(share: int | None, batch_size: int) -> int | None:
    """Batches a bucketed stream yields for a share of ``share`` samples (None: until the stream ends)."""
    return None if share is None else math.ceil(share / batch_size)
