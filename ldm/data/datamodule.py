"""Pieces shared by the data modules, and the synthetic shapes data module.

Every loader yields the project's batch format::

    {"image": FloatTensor[B, 3, H, W] in [-1, 1], "caption": list[str]}

:func:`collate` builds it, :func:`make_loader` builds the DataLoader (same worker settings everywhere),
:class:`WorkerCounters` counts skipped data in shared memory so that counts made inside DataLoader worker
processes are visible from the main process (``datamodule.stats``).

Resuming mid-epoch. Lightning saves the ``state_dict()`` of every training loader that has one in its
checkpoints and, on resume, calls ``load_state_dict()`` before it iterates the loader again (see
``_FitLoop.on_save_checkpoint`` / ``setup_data`` in pytorch_lightning). Map-style training data goes through
:class:`ResumableLoader`: an epoch-seeded shuffle (:class:`ResumableSampler`) whose position (epoch, samples
of this rank already delivered to the training loop) is that state, so a resumed run sees exactly the
batches the uninterrupted run would have seen. Random augmentations are seeded per sample
(:func:`sample_rng`), so they do not depend on workers or on where a run was resumed either.
Iterable (webdataset) data goes through :class:`StreamLoader` (see :mod:`ldm.data.webdataset`).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import multiprocessing.sharedctypes
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, IterableDataset

from ldm.config import ConfigError

__all__ = ["collate", "make_loader", "worker_id", "node_info", "WorkerCounters", "ShapesDataModule",
           "ResumableSampler", "ResumableLoader", "StreamLoader", "sample_rng"]

logger = logging.getLogger(__name__)


def collate(samples: Sequence[dict]) -> dict:
    """Stack ``{"image": [3, H, W], "caption": str}`` samples into ``{"image": [B, 3, H, W], "caption": [str]}``.

    Other keys are kept: tensors are stacked, anything else becomes a list.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples; check that the dataset yields samples")
    missing = {"image", "caption"} - set(samples[0])
    if missing:
        raise ValueError(f"sample has no {sorted(missing)} key(s) (keys: {sorted(samples[0])}); "
                         "datasets must return {'image': tensor, 'caption': str}")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; resize/crop to one size")
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def worker_id() -> tuple[int, int]:
    """(worker index, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def node_info(trainer: Any = None, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) of this training process.

    Explicit values win (tests, custom launchers); then an initialised ``torch.distributed``; then the
    Lightning trainer the data module is attached to; else a single process (0, 1).
    """
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} world_size={world_size} is not a valid pair; "
                             "give both, with 0 <= rank < world_size")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return 0, 1


class WorkerCounters:
    """Named integer counters in shared memory, one row per DataLoader worker.

    Each worker only writes its own row, so no lock is needed, and the memory is shared with the main
    process (inherited with ``fork``, passed at start-up with ``spawn``), so ``counters["bad_shards"]``
    in the training process sums what every worker counted. Each training process (DDP rank) has its own.
    """

    def __init__(self, fields: Sequence[str], num_workers: int = 1):
        self.fields = tuple(fields)
        self.num_workers = max(1, int(num_workers))
        self._values = multiprocessing.sharedctypes.RawArray("q", self.num_workers * len(self.fields))

    def _index(self, field: str, worker: int) -> int:
        if field not in self.fields:
            raise KeyError(f"unknown counter {field!r}; known: {', '.join(self.fields)}")
        if worker >= self.num_workers:
            raise ValueError(f"counters sized for {self.num_workers} workers, got worker {worker}; "
                             "build the dataset with the DataLoader's num_workers")
        return worker * len(self.fields) + self.fields.index(field)

    def set(self, field: str, value: int, worker: int) -> None:
        """Set one worker's counter (the training process uses it to hand values to its workers)."""
        self._values[self._index(field, worker)] = int(value)

    def add(self, field: str, n: int = 1) -> int:
        """Add ``n`` to the current worker's counter; return its new value."""
        i = self._index(field, worker_id()[0])
        self._values[i] += n
        return self._values[i]

    def get(self, field: str, worker: int | None = None) -> int:
        """One worker's count (the current worker's when ``worker`` is None)."""
        return self._values[self._index(field, worker_id()[0] if worker is None else worker)]

    def total(self, field: str) -> int:
        return sum(self._values[self._index(field, w)] for w in range(self.num_workers))

    def __getitem__(self, field: str) -> int:
        return self.total(field)

    def totals(self) -> dict[str, int]:
        return {f: self.total(f) for f in self.fields}

    def per_worker(self) -> list[dict[str, int]]:
        return [{f: self.get(f, w) for f in self.fields} for w in range(self.num_workers)]

    def __repr__(self) -> str:
        return f"WorkerCounters({self.totals()})"


@contextlib.contextmanager
def sample_rng(*key: Any) -> Iterator[None]:
    """Seed torch's global (CPU) generator from ``key`` inside the block; the caller's stream is restored after.

    Augmentations drawn from torch's global generator (``ImageTransform``: random crop, flip) then depend
    only on the key, e.g. (seed, epoch, index): not on the worker that loads the sample, nor on where a
    run was resumed.
    """
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed would also queue a seed for every other device type, and
        # that costs a formatted stack trace a call (~0.5 ms a sample at a stack 40 frames deep; now 0.006 ms)
        torch.default_generator.manual_seed(int.from_bytes(digest, "little") >> 1)
        yield


class ResumableSampler(DistributedSampler):
    """Epoch-seeded shuffle over a map-style dataset, split over ranks, that resumes mid-epoch.

    Epoch ``e`` is torch's ``DistributedSampler`` order for ``(seed, e)``: a seeded permutation padded so that
    every rank gets ``len(self)`` samples, rank ``r`` taking every ``world_size``-th one. (Being a
    ``DistributedSampler`` also tells Lightning not to replace it under DDP.) The position is ``epoch`` and
    ``offset``, the number of this rank's samples of the epoch already delivered; an iteration starts at the
    offset. Keys are ``(epoch, index)`` pairs, read by :class:`KeyedDataset`.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.offset = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.epoch, self.offset  # read at the first key: after Lightning's set_epoch
        for index in itertools.islice(super().__iter__(), offset, None):
            yield epoch, index

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch`` (from its start), unless it is the current one (then keep the resumed offset)."""
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def advance(self, num_samples: int) -> None:
        """Count ``num_samples`` more samples of this epoch as delivered to the training loop."""
        self.offset = min(self.offset + num_samples, self.num_samples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "dataset_size": len(self.dataset),
                "world_size": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``'s position; a finished epoch resumes at the start of the next one.

        When the data set, seed or number of ranks changed, the order is not the saved one any more: the
        run then goes on with the next epoch (nothing is repeated) and says so.
        """
        epoch, offset = int(state["epoch"]), int(state["offset"])
        saved = (state.get("seed"), state.get("dataset_size"), state.get("world_size"))
        now = (self.seed, len(self.dataset), self.num_replicas)
        if saved != now:
            logger.warning("the loader state was saved for (seed, dataset size, ranks) = %s, not %s: epoch %d "
                           "cannot resume in the same order; going on with epoch %d", saved, now, epoch, epoch + 1)
            offset = self.num_samples
        self.epoch, self.offset = (epoch + 1, 0) if offset >= self.num_samples else (epoch, offset)


class KeyedDataset(Dataset):
    """``dataset[(epoch, index)]``: ``dataset[index]`` with torch's RNG seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with sample_rng(self.seed, epoch, index):
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` whose position is saved in Lightning checkpoints.

    Lightning finds ``state_dict``/``load_state_dict`` on train loaders (its ``_Stateful`` protocol). A batch
    counts as consumed when this loader hands it over (batches that workers prefetched do not count). The
    iteration starts lazily, at the first batch, so that Lightning's ``set_epoch`` (called after ``iter``)
    is seen even by worker processes. ``len()`` is the full epoch; a resumed epoch yields only what is left
    (Lightning counts the batches it already ran). A completed pass moves on to the next epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(KeyedDataset(dataset, sampler.seed), batch_size=batch_size, sampler=sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        return self._deliver()

    def _deliver(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.sampler.advance(self.batch_size or 1)  # batch_size None: each sampler item is a whole batch
            yield batch
        self.sampler.set_epoch(self.sampler.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


SOURCE_KEY = "__source__"


def _collate_with_source(samples: Sequence[dict]) -> dict:
    """:func:`collate`, plus ``(worker index, number of samples)`` under SOURCE_KEY for :class:`StreamLoader`."""
    batch = collate(samples)
    batch[SOURCE_KEY] = (worker_id()[0], len(samples))
    return batch


class StreamLoader(DataLoader):
    """DataLoader over a resumable stream (``ldm.data.webdataset.CaptionedShards``), saved in checkpoints.

    Each DataLoader worker reads a deterministic stream for an epoch; the dataset counts its epochs
    (``dataset.next_epoch()``), so a new loader over it goes on with the next one. The loader counts, per
    stream, the samples it handed to the training loop (the collate function tags each batch with its
    worker; the tag is removed here) and which stream's batch comes next. On resume,
    ``dataset.start_epoch(epoch, consumed, first)`` makes each stream skip what it had delivered and keeps the
    streams' interleaving. With ``epoch_length`` the dataset knows each stream's share of the epoch
    (``dataset.worker_shares``): the loader then has a length, Lightning does not read ahead, and resuming is
    exact. Without it Lightning reads one batch ahead to find the epoch's end, and that batch counts as
    consumed: a resume skips it (nothing is repeated; at most one batch per rank is lost).
    """

    def __init__(self, dataset: IterableDataset, batch_size: int, num_workers: int, **kwargs: Any):
        # a stream of whole batches (aspect-ratio buckets: lists of samples of one bucket) is collated as it is
        batched = getattr(dataset, "yields_batches", False)
        super().__init__(dataset, batch_size=None if batched else batch_size, num_workers=num_workers,
                         collate_fn=_collate_with_source, **kwargs)
        self.samples_per_batch = batch_size
        self.streams = max(1, num_workers)
        self.epoch = dataset.next_epoch()  # the epoch being read (or read next, before the first batch)
        self.consumed = [0] * self.streams  # samples of this epoch delivered, per stream
        self.first = self.next_stream = 0  # the stream worker 0 reads; the stream whose batch comes next
        self._resume: dict | None = None  # where the next iteration starts, when resumed or finished

    def _shares(self) -> list[int] | None:
        return self.dataset.worker_shares(self.streams)

    def __len__(self) -> int:
        shares = self._shares()
        if shares is None:
            raise TypeError("this stream has no length (no epoch_length)")
        return sum(math.ceil(share / self.samples_per_batch) for share in shares)

    def __iter__(self) -> Iterator[dict]:
        return self._deliver()

    def _deliver(self) -> Iterator[dict]:
        start = self._resume or self._epoch_start(self.dataset.next_epoch())
        self._resume = None
        self.epoch, self.consumed, self.first = start["epoch"], list(start["consumed"]), start["next_stream"]
        self.next_stream = self.first
        self.dataset.start_epoch(self.epoch, self.consumed, self.first)
        for batch in super().__iter__():
            worker, count = batch.pop(SOURCE_KEY)
            stream = (worker + self.first) % self.streams
            self.consumed[stream] += count
            self.next_stream = (stream + 1) % self.streams
            yield batch
        self._resume = self._epoch_start(self.epoch + 1)  # the streams ended: this epoch is complete

    def _epoch_start(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "consumed": [0] * self.streams, "next_stream": 0}

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:
            return dict(self._resume, consumed=list(self._resume["consumed"]))
        return {"epoch": self.epoch, "consumed": list(self.consumed), "next_stream": self.next_stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; a finished epoch resumes at the start of the next one.

        With a different number of workers the streams are not the saved ones: the run goes on with the
        next epoch (nothing is repeated) and says so.
        """
        epoch, consumed = int(state["epoch"]), [int(c) for c in state["consumed"]]
        shares = self._shares()
        if len(consumed) != self.streams:
            logger.warning("the loader state was saved with %d workers, not %d: epoch %d cannot resume in the "
                           "same order; going on with epoch %d", len(consumed), self.streams, epoch, epoch + 1)
            self._resume = self._epoch_start(epoch + 1)
        elif shares is not None and all(c >= s for c, s in zip(consumed, shares)):
            self._resume = self._epoch_start(epoch + 1)
        else:
            self._resume = {"epoch": epoch, "consumed": consumed, "next_stream": int(state["next_stream"])}


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False, *, seed: int = 0,
                rank: int = 0, world_size: int = 1, bucket_ids: Sequence[int] | None = None) -> DataLoader:
    """DataLoader with the project's collate; workers stay alive between epochs.

    ``shuffle=True`` asks for a resumable training loader: over a map-style dataset a :class:`ResumableLoader`
    (order seeded by ``seed`` and the epoch, this ``rank``'s share of ``world_size``); over a stream with
    ``start_epoch`` (webdataset shards, which shuffle themselves) a :class:`StreamLoader`. Otherwise
    (validation, other iterables) a plain DataLoader. ``bucket_ids`` (aspect-ratio buckets of a map-style
    dataset, one per item): every batch from one bucket, the same number of batches per rank
    (:class:`ldm.data.buckets.BucketLoader`; without ``shuffle`` in index order).
    """
    common = dict(num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    if bucket_ids is not None:
        from ldm.data.buckets import BucketLoader, BucketSampler

        sampler = BucketSampler(bucket_ids, batch_size, seed=seed, rank=rank, world_size=world_size,
                                shuffle=shuffle)
        return BucketLoader(dataset, sampler, collate_fn=collate, **common)
    if isinstance(dataset, IterableDataset):
        if shuffle and hasattr(dataset, "start_epoch"):
            return StreamLoader(dataset, batch_size, **common)
    elif shuffle:
        sampler = ResumableSampler(dataset, seed=seed, rank=rank, world_size=world_size)
        return ResumableLoader(dataset, batch_size, sampler, collate_fn=collate, **common)
    batched = getattr(dataset, "yields_batches", False)  # bucketed shards: items are whole batches
    return DataLoader(dataset, batch_size=None if batched else batch_size, collate_fn=collate, **common)


def check_loader_args(batch_size: int, num_workers: int, missing_caption: str | None = None) -> None:
    """One-line errors for the arguments every data module shares (``missing_caption``: the captioned-image
    modules')."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}; set data.params.batch_size")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}; set data.params.num_workers")
    if missing_caption is not None and missing_caption not in ("drop", "empty"):
        raise ConfigError(f"missing_caption={missing_caption!r} is not 'drop' or 'empty'; "
                          "set data.params.missing_caption")


class MapDataModule(pl.LightningDataModule):
    """Loaders shared by the map-style data modules; subclasses set ``train_set``/``val_set`` in ``setup`` and
    have ``batch_size``, ``num_workers`` and ``seed``."""

    train_set: Dataset | None = None
    val_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Resumable loader: order seeded by ``seed`` and the epoch, split over the trainer's ranks."""
        self.setup("fit")
        rank, world_size = node_info(self.trainer)
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, seed=self.seed,
                           rank=rank, world_size=world_size, bucket_ids=getattr(self.train_set, "bucket_ids", None))

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        bucket_ids = getattr(self.val_set, "bucket_ids", None)
        if bucket_ids is not None:  # bucketed: one bucket per batch, this rank's share
            rank, world_size = node_info(self.trainer)
            return make_loader(self.val_set, self.batch_size, self.num_workers, seed=self.seed, rank=rank,
                               world_size=world_size, bucket_ids=bucket_ids)
        return make_loader(self.val_set, self.batch_size, self.num_workers)


class ShapesDataModule(MapDataModule):
    """Synthetic captioned shapes (``ldm.data.shapes.ShapesDataset``): the offline demo and test data.

    Train and validation sets use different seeds so that they do not share images. ``color_drop`` is the share
    of training captions that leave the colors out (``ldm.data.shapes.caption``) and ``kinds`` the scene kinds
    the training pictures are drawn from, uniformly (a kind listed twice is drawn twice as often; default: each
    of ``ldm.data.shapes.KINDS`` once); validation keeps the defaults. ``micro_conditioning``: samples carry
    SDXL's size and crop entries too. ``paraphrase``: the share of training captions worded other ways
    (``ldm.data.paraphrase``; default 0). An opt-in shape (``ldm.data.shapes.EXTRA_SHAPES``): ``shapes`` draws the
    ``num_train`` scenes from these shapes, and ``focus`` with ``num_focus`` adds that many scenes that all show
    the ``focus`` shape to them (e.g. 500 pictures of stars among 1000 of the default world, for a LoRA), their
    objects of ``focus_sizes`` (default: both sizes), their scene kinds drawn from ``focus_kinds`` as ``kinds``
    (default: ``kinds``), each ``focus_repeats`` times per epoch (kohya's ``num_repeats``: many default-world
    pictures for prior preservation with the same share of focus pictures per batch, e.g. 500 stars x 10 among
    5000 others).
    """

    def __init__(self, num_train: int = 1000, num_val: int = 64, size: int = 64, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0, color_drop: float = 0.15, kinds: Sequence[str] | None = None,
                 micro_conditioning: bool = False, paraphrase: float = 0.0, shapes: Sequence[str] | None = None,
                 focus: str | None = None, num_focus: int = 0, focus_sizes: Sequence[str] | None = None,
                 focus_repeats: int = 1, focus_kinds: Sequence[str] | None = None):
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if not 0.0 <= paraphrase <= 1.0:
            raise ValueError(f"data.params.paraphrase={paraphrase!r} must be a probability in [0, 1]")
        self.paraphrase = float(paraphrase)
        if num_train < 1 or num_val < 0:
            raise ValueError(f"num_train={num_train} num_val={num_val}: need num_train >= 1 and num_val >= 0")
        if not 0.0 <= color_drop <= 1.0:
            raise ValueError(f"data.params.color_drop={color_drop!r} must be a probability in [0, 1]")
        from ldm.data.shapes import KINDS

        for key, value in (("kinds", kinds), ("focus_kinds", focus_kinds)):
            unknown = [k for k in (value or ()) if k not in KINDS]
            if unknown:
                raise ValueError(f"data.params.{key} has unknown scene kind {unknown[0]!r}; use any of "
                                 f"{', '.join(KINDS)}")
        if focus_kinds and focus is None:
            raise ValueError("data.params.focus_kinds are the focus pictures' scene kinds: set focus and num_focus "
                             "too, or leave focus_kinds out")
        from ldm.data.shapes import ShapesDataset

        if (focus is None) != (not num_focus) or num_focus < 0:
            raise ValueError(f"data.params.focus={focus!r} and num_focus={num_focus!r} go together: name a shape "
                             "and how many pictures of it (e.g. focus: star, num_focus: 500), or neither")
        if shapes or focus is not None or focus_sizes:
            try:  # the shapes and the focus shape checked as the data sets will take them
                ShapesDataset(1, shapes=shapes or None, focus=focus, sizes=focus_sizes)
            except ValueError as e:
                raise ValueError(f"data.params: {e}") from None
        if isinstance(focus_repeats, bool) or not isinstance(focus_repeats, int) or focus_repeats < 1:
            raise ValueError(f"data.params.focus_repeats={focus_repeats!r} must be an int >= 1 (how many times each "
                             "focus picture comes per epoch)")
        if focus_repeats > 1 and focus is None:
            raise ValueError(f"data.params.focus_repeats={focus_repeats} repeats the focus pictures: set focus and "
                             "num_focus too, or leave focus_repeats out")
        self.shapes = list(shapes) if shapes else None
        self.focus, self.num_focus, self.focus_repeats = focus, int(num_focus), focus_repeats
        self.focus_sizes = list(focus_sizes) if focus_sizes else None
        self.color_drop = float(color_drop)
        self.micro_conditioning = bool(micro_conditioning)
        self.kinds = list(kinds) if kinds else None
        self.focus_kinds = list(focus_kinds) if focus_kinds else self.kinds
        self.num_train, self.num_val, self.size = num_train, num_val, size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from ldm.data.shapes import ShapesDataset  # imported late: only this module needs it

        if self.train_set is None:
            micro = {"micro_conditioning": True} if self.micro_conditioning else {}
            words = {"paraphrase": self.paraphrase} if self.paraphrase else {}
            shapes = {"shapes": self.shapes} if self.shapes else {}
            self.train_set = ShapesDataset(self.num_train, size=self.size, seed=self.seed, kinds=self.kinds,
                                           color_drop=self.color_drop, **shapes, **micro, **words)
            if self.focus is not None:
                focused = ShapesDataset(self.num_focus, size=self.size, seed=self.seed, kinds=self.focus_kinds,
                                        color_drop=self.color_drop, shapes=self.shapes, focus=self.focus,
                                        sizes=self.focus_sizes, **micro, **words)
                self.train_set = ConcatDataset([self.train_set] + [focused] * self.focus_repeats)
            self.val_set = (ShapesDataset(self.num_val, size=self.size, seed=self.seed + 1, **micro)
                            if self.num_val else None)

