"""Pieces shared by the data modules, and the synthetic shapes data module.

Every loader yields the project's batch format::

    {"image": FloatTensor[B, 3, H, W] in [-1, 1], "caption": list[str]}

:func:`collate` builds it, :func:`make_loader` builds the DataLoader (same worker settings everywhere),
:class:`WorkerCounters` counts skipped data in shared memory so that counts made inside DataLoader worker
processes are visible from the main process (``datamodule.stats``).
"""
from __future__ import annotations

import logging
import multiprocessing.sharedctypes
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["collate", "make_loader", "worker_id", "node_info", "WorkerCounters", "ShapesDataModule"]

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


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False) -> DataLoader:
    """DataLoader with the project's collate; workers stay alive between epochs."""
    if isinstance(dataset, IterableDataset):
        shuffle = False  # iterable datasets shuffle themselves
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def check_loader_args(batch_size: int, num_workers: int) -> None:
    """One-line errors for the arguments every data module shares."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}; set data.params.batch_size")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}; set data.params.num_workers")


class ShapesDataModule(pl.LightningDataModule):
    """Synthetic captioned shapes (``ldm.data.shapes.ShapesDataset``): the offline demo and test data.

    Train and validation sets use different seeds so that they do not share images.
    """

    def __init__(self, num_train: int = 1000, num_val: int = 64, size: int = 64, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if num_train < 1 or num_val < 0:
            raise ValueError(f"num_train={num_train} num_val={num_val}: need num_train >= 1 and num_val >= 0")
        self.num_train, self.num_val, self.size = num_train, num_val, size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from ldm.data.shapes import ShapesDataset  # imported late: only this module needs it

        if self.train_set is None:
            self.train_set = ShapesDataset(self.num_train, size=self.size, seed=self.seed)
            self.val_set = ShapesDataset(self.num_val, size=self.size, seed=self.seed + 1) if self.num_val else None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        return make_loader(self.val_set, self.batch_size, self.num_workers)
