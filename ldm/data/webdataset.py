"""Training data from webdataset tar shards: ``{key}.jpg`` + ``{key}.txt`` (or ``{key}.json``) per sample.

    data:
      target: ldm.data.webdataset.WebDatasetDataModule
      params:
        urls: data/laion-{000000..000099}.tar
        batch_size: 16
        resampled: true
        epoch_length: 100000        # samples per rank per epoch

Shards are split between training processes (ranks) and then between DataLoader workers, so that every
sample is read once per epoch. With ``resampled=True`` every worker instead draws shards at random (with
replacement) from the whole list, forever, and ``epoch_length`` cuts the epoch: every rank then sees
exactly the same number of samples, so DDP ranks never wait on each other at the end of an epoch.

Bad data does not stop training: a shard that cannot be opened or ends early is skipped, a sample whose
image cannot be decoded is skipped, an image without caption is dropped or given "" (``missing_caption``).
Each case is logged with the shard name and counted in ``datamodule.stats`` (shared memory, so the counts
that worker processes make are visible in the training process; each DDP rank counts its own).

Resuming mid-epoch: the training loader is a ``StreamLoader`` (``ldm.data.datamodule``). What each worker
reads in an epoch (its stream) is deterministic: shard order, resampling and shuffle buffer are seeded by
seed, epoch, rank and stream, augmentations per sample. The checkpoint keeps the epoch, how many samples of
each stream were delivered and whose batch came next; on resume each worker reads its stream again from the
epoch's start and drops that many samples, and the streams are dealt to the workers so that batches come in
the same turn as before. Exact with ``epoch_length`` (the loader then has a length); without it Lightning
reads one batch ahead and a resume skips that batch. Skipped samples are read and decoded again (the shuffle buffer
needs them), so resuming late in a long epoch takes as long as reading that part of the epoch. Shards that
changed in between (files added, removed or rewritten) give other streams: then nothing is exact.

Aspect-ratio buckets (``buckets: {base, step, max_aspect}``, :mod:`ldm.data.buckets`): each picture is cropped to
its bucket and each worker keeps one buffer per bucket, yielding a batch when one is full
(:func:`ldm.data.buckets.bucket_batches`). With ``epoch_length`` every worker yields exactly
``ceil(its share / batch_size)`` full batches per epoch, so every rank runs the same number of steps (several
ranks need ``epoch_length``); without it the part-filled buffers come last, as smaller batches. Resuming skips
whole batches of the worker's (deterministic) batch stream.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import random
import re
import tarfile
from typing import IO, Iterable, Iterator, Sequence

import braceexpand
import pytorch_lightning as pl
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys

from ldm.config import ConfigError
from ldm.data.buckets import Buckets, bucket_batches, parse_buckets, stream_batches
from ldm.data.datamodule import WorkerCounters, check_loader_args, make_loader, node_info, sample_rng, worker_id
from ldm.data.transforms import IMAGE_EXTENSIONS, ImageTransform, load_image

__all__ = ["WebDatasetDataModule", "CaptionedShards", "expand_shards", "tar_members", "SHARD_STATS"]

logger = logging.getLogger(__name__)

SHARD_STATS = ("samples", "bad_shards", "bad_samples", "missing_caption")
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http:, s3: ... (not file:, not C:)


def expand_shards(urls: str | Sequence[str], param: str = "data.params.urls") -> list[str]:
    """Expand brace patterns (``shards-{000..009}.tar``) and globs into shard URLs; check local files exist.

    ``urls`` is one pattern or a list of patterns. Remote URLs (``pipe:``, ``http://`` ...) are kept unchecked.
    Raises ConfigError naming ``param`` when nothing matches or a listed file is missing.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls or [])
    if not patterns:
        raise ConfigError(f"no shards given; set {param} to a pattern like 'data/shards-{{000000..000009}}.tar'")
    shards = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"{param}: expected shard paths as strings, got {pattern!r}")
        found = [s for url in braceexpand.braceexpand(pattern) for s in _expand_one(url)]
        if not found:
            raise ConfigError(f"no shards found for '{pattern}'; check {param}")
        missing = [s for s in found if not _is_remote(s) and not os.path.isfile(_local_path(s))]
        if len(missing) == len(found):
            raise ConfigError(f"no shards found for '{pattern}'; check {param}")
        if missing:
            raise ConfigError(f"shard file not found: '{missing[0]}' ({len(missing)} of {len(found)} "
                              f"missing for '{pattern}'); check {param}")
        shards.extend(found)
    return shards


def _is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url)) and not url.startswith("file:")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _expand_one(url: str) -> list[str]:
    if not _is_remote(url) and glob.has_magic(_local_path(url)):
        return sorted(glob.glob(_local_path(url)))
    return [url]


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that turns an early end of the archive into an error.

    ``tarfile`` in stream mode ends iteration quietly when a header is missing, cut short or garbage past
    the first member, so a truncated shard would look complete (and its last, partial sample valid). Only
    the all-zero end-of-archive block is a real end.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"archive truncated or corrupt at byte {tar.offset} ({e})") from None


def tar_members(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream; raises ``tarfile.ReadError`` if it ends early."""
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # stream mode: do not keep every header in memory


def _should_log(count: int) -> bool:
    """Log the first few occurrences of a repeated problem, then only at 10, 100, 1000 ..."""
    return count <= 3 or str(count).rstrip("0") == "1"


class CaptionedShards(IterableDataset):
    """Iterable of ``{"image": FloatTensor[3, S, S] in [-1, 1], "caption": str}`` read from tar shards.

    One training process (``rank`` of ``world_size``) and each DataLoader worker in it read their own
    part of the shard list (see the module docstring for ``resampled``). ``stats`` and the per-worker epoch
    counter live in shared memory and must be sized for the DataLoader's ``num_workers``. With ``buckets``
    it yields lists of ``batch_size`` samples of one bucket instead (``yields_batches``).
    """

    def __init__(self, urls: Sequence[str], transform: ImageTransform, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, image_keys: Sequence[str] = IMAGE_EXTENSIONS, caption_key: str = "txt",
                 caption_json_field: str | None = None, missing_caption: str = "drop", resampled: bool = False,
                 epoch_length: int | None = None, shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 stats: WorkerCounters | None = None, buckets: Buckets | None = None,
                 batch_size: int | None = None):
        super().__init__()
        if buckets is not None and not batch_size:
            raise ValueError("bucketed shards need the batch_size (one batch per bucket buffer)")
        self.buckets, self.batch_size = buckets, batch_size
        if resampled and epoch_length is None:
            raise ConfigError("resampled=True needs epoch_length (samples per rank per epoch); "
                              "set data.params.epoch_length")
        self.urls = list(urls)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_key, self.caption_json_field = caption_key, caption_json_field
        self.missing_caption = missing_caption
        self.resampled, self.epoch_length = resampled, epoch_length
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.stats = stats if stats is not None else WorkerCounters(SHARD_STATS, num_workers)
        self._epochs = WorkerCounters(("epoch",), num_workers)  # each worker counts its own epochs
        # for the next iteration: samples to drop at the start, and the first worker's stream (see start_epoch)
        self._plan = WorkerCounters(("skip", "first"), num_workers)

    def start_epoch(self, epoch: int, skip: Sequence[int], first: int = 0) -> None:
        """Plan every worker's next iteration (called by ``StreamLoader`` in the training process).

        It reads epoch ``epoch``; worker ``w`` reads stream ``(w + first) % num_workers`` (streams are what
        workers read when not resumed) and drops its first ``skip[stream]`` samples. The DataLoader takes
        batches from workers in turn starting with worker 0, so ``first``, the stream whose batch came next
        when the state was saved, keeps the interleaving of the streams the same after a resume.
        """
        num_workers = self._plan.num_workers
        if len(skip) != num_workers or not 0 <= first < num_workers:
            raise ValueError(f"got {len(skip)} skip counts and first stream {first} for {num_workers} workers; "
                             "give one count per DataLoader worker")
        for worker in range(num_workers):
            self._epochs.set("epoch", epoch, worker)
            self._plan.set("skip", skip[(worker + first) % num_workers], worker)
            self._plan.set("first", first, worker)

    def next_epoch(self) -> int:
        """The epoch that the next iteration reads: one past the latest that any worker started."""
        return max(self._epochs.get("epoch", w) for w in range(self._epochs.num_workers))

    @property
    def yields_batches(self) -> bool:
        """Whether items are lists of samples of one bucket (``buckets``) rather than samples."""
        return self.buckets is not None

    def worker_shares(self, num_workers: int) -> list[int] | None:
        """Samples each of ``num_workers`` workers yields per epoch, when ``epoch_length`` fixes them."""
        if self.epoch_length is None:
            return None
        return [self.epoch_length // num_workers + (w < self.epoch_length % num_workers) for w in range(num_workers)]

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_id()
        epoch = self._epochs.add("epoch") - 1
        stream = (worker + self._plan.get("first")) % num_workers
        skip = self._plan.get("skip")
        self._plan.set("skip", 0, worker)
        self._plan.set("first", 0, worker)
        urls = self._shard_urls(epoch, stream, num_workers)
        samples = self._decode(self._read_shards(urls), epoch, stream)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"samples-{self.seed}-{epoch}-{self.rank}-{stream}")
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        if self.buckets is not None:
            samples = self._batches(samples, stream, num_workers, skip)
        else:
            if self.epoch_length is not None:
                samples = itertools.islice(samples, self.worker_shares(num_workers)[stream])
            samples = itertools.islice(samples, skip, None)  # resumed: what was delivered before
        try:
            yield from samples
        finally:
            self._log_summary(epoch, worker)

    # -- stages -------------------------------------------------------------------------------------

    def _batches(self, samples: Iterable[dict], stream: int, num_workers: int, skip: int) -> Iterator[list[dict]]:
        """One bucket per batch; with ``epoch_length`` this stream's fixed number of full batches. ``skip``
        samples delivered before a resume are whole batches of this (deterministic) batch stream."""
        shares = self.worker_shares(num_workers)
        count = stream_batches(None if shares is None else shares[stream], self.batch_size)
        batches = bucket_batches(samples, self.batch_size, flush=count is None)
        if count is not None:
            batches = itertools.islice(batches, count)
        for batch in batches:
            if skip > 0:
                skip -= len(batch)
                continue
            yield batch

    def _shard_urls(self, epoch: int, stream: int, num_workers: int) -> Iterator[str]:
        """A stream's shards: a random endless draw, or its split of the list (repeated with epoch_length).

        Endless modes stop with an error once every shard was tried without yielding a sample (all
        unreadable, empty or captionless), instead of spinning forever.
        """
        if self.resampled:
            rng = random.Random(f"resample-{self.seed}-{epoch}-{self.rank}-{stream}")
            tried, seen = set(), self.stats.get("samples")
            while True:
                if self.stats.get("samples") != seen:
                    tried, seen = set(), self.stats.get("samples")
                elif len(tried) == len(set(self.urls)):
                    raise self._no_samples_error()
                url = rng.choice(self.urls)
                tried.add(url)
                yield url
        order = list(self.urls)
        if self.shuffle:  # same order on every rank and worker, so the splits below stay disjoint
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        mine = order[self.rank::self.world_size][stream::num_workers]
        if not mine:
            logger.warning("rank %d worker %d got no shards (%d shards for %d ranks x %d workers); "
                           "use more shards or fewer workers", self.rank, stream, len(self.urls),
                           self.world_size, num_workers)
            return
        rng = random.Random(f"repeat-{self.seed}-{epoch}-{self.rank}-{stream}")
        while True:
            seen = self.stats.get("samples")
            yield from mine
            if self.epoch_length is None:
                return
            if self.stats.get("samples") == seen:
                raise self._no_samples_error()
            if self.shuffle:
                rng.shuffle(mine)

    def _no_samples_error(self) -> RuntimeError:
        return RuntimeError(f"no sample could be read from any of the shards this worker reads ({len(self.urls)} "
                            f"shards, e.g. '{self.urls[0]}'): all unreadable, empty or without caption; "
                            "check data.params.urls")

    def _read_shards(self, urls: Iterable[str]) -> Iterator[dict]:
        """Raw samples (``{"__key__", "jpg": bytes, ...}``) from each shard; unreadable shards are skipped."""
        for url in urls:
            try:
                yield from self._tar_samples(url)
            except Exception as exn:  # truncated, corrupt or unreadable shard: keep what was read, go on
                self._skip("bad_shards", f"shard '{url}'", exn)

    def _tar_samples(self, url: str) -> Iterator[dict]:
        stream = wds.gopen(url)
        try:
            files = ({"fname": name, "data": data, "__url__": url} for name, data in tar_members(stream))
            yield from group_by_keys(files, handler=lambda exn: self._skip("bad_samples", f"in '{url}'", exn))
        finally:
            stream.close()

    def _decode(self, raw_samples: Iterable[dict], epoch: int, stream: int) -> Iterator[dict]:
        """Decoded samples; augmentations are seeded by (seed, epoch, rank, stream, position in the stream)."""
        for position, raw in enumerate(raw_samples):
            try:
                with sample_rng(self.seed, epoch, self.rank, stream, position):
                    sample = self._to_sample(raw)
            except Exception as exn:  # undecodable image or caption: skip this sample only
                self._skip("bad_samples", f"sample '{raw.get('__key__')}' in '{raw.get('__url__')}'", exn)
                continue
            if sample is not None:
                self.stats.add("samples")
                yield sample

    def _to_sample(self, raw: dict) -> dict | None:
        image_key = next((k for k in self.image_keys if k in raw), None)
        if image_key is None:
            entries = sorted(k for k in raw if not k.startswith("__"))
            raise ValueError(f"no image entry (looked for {', '.join(self.image_keys)}; found {entries})")
        caption = self._caption(raw)
        if caption is None:
            count = self.stats.add("missing_caption")
            if _should_log(count):
                logger.warning("sample '%s' in '%s' has no caption '%s' (%s; %d so far in rank %d worker %d)",
                               raw.get("__key__"), raw.get("__url__"), self._caption_name(),
                               "dropped" if self.missing_caption == "drop" else "using ''", count, self.rank,
                               worker_id()[0])
            if self.missing_caption == "drop":
                return None
            caption = ""
        img = load_image(raw[image_key])
        size = self.buckets.size(img.height, img.width) if self.buckets is not None else None
        return {**self.transform.sample(img, size), "caption": caption}

    def _caption(self, raw: dict) -> str | None:
        data = raw.get(self.caption_key)
        if data is None:
            return None
        text = data.decode("utf-8")
        if self.caption_json_field is None:
            return text.strip()
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError(f"'{self.caption_key}' holds JSON {type(record).__name__}, not an object")
        value = record.get(self.caption_json_field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"caption field '{self.caption_json_field}' is {type(value).__name__}, not a string")
        return value.strip()

    def _caption_name(self) -> str:
        field = f"['{self.caption_json_field}']" if self.caption_json_field else ""
        return f"{self.caption_key}{field}"

    # -- bookkeeping --------------------------------------------------------------------------------

    def _skip(self, counter: str, where: str, exn: Exception) -> bool:
        """Count and log a skipped shard/sample; returns True (webdataset's "continue" for handlers)."""
        mine = self.stats.add(counter)
        if counter == "bad_shards" or _should_log(mine):
            message = str(exn.args[0]) if exn.args else ""
            logger.warning("skipping %s (rank %d worker %d): %s: %s [%s: %d in this worker, %d in all workers]",
                           where, self.rank, worker_id()[0], type(exn).__name__, message[:200], counter, mine,
                           self.stats.total(counter))
        return True

    def _log_summary(self, epoch: int, worker: int) -> None:
        mine = {f: self.stats.get(f, worker) for f in self.stats.fields}
        skipped = any(v for f, v in mine.items() if f != "samples")
        logger.log(logging.INFO if skipped else logging.DEBUG,
                   "shards rank %d worker %d after epoch %d: %s (all workers: %s)",
                   self.rank, worker, epoch, mine, self.stats.totals())


class WebDatasetDataModule(pl.LightningDataModule):
    """Lightning data module over webdataset shards; batches are ``{"image": [B,3,S,S], "caption": [str]}``.

    ``urls`` / ``val_urls``: a brace pattern (``data/shards-{000000..000009}.tar``), a glob, or a list of them.
    Captions come from ``{key}.{caption_key}`` (default ``txt``; ``json`` when ``caption_json_field`` is
    set, e.g. ``caption_json_field="caption"`` reads ``{"caption": "..."}``). ``rank``/``world_size`` override
    what torch.distributed or the Lightning trainer report (custom launchers, tests).
    ``micro_conditioning``: each sample also holds SDXL's ``original_size_as_tuple``, ``crop_coords_top_left``
    and ``target_size_as_tuple`` (see :class:`ldm.data.transforms.ImageTransform`).
    ``buckets``: ``{base, step, max_aspect}``: aspect-ratio buckets instead of ``size`` squares (see the
    module docstring; several ranks need ``epoch_length``).
    """

    def __init__(self, urls: str | Sequence[str], batch_size: int, num_workers: int = 2, size: int = 256,
                 image_keys: Sequence[str] = IMAGE_EXTENSIONS, caption_key: str | None = None,
                 caption_json_field: str | None = None, missing_caption: str = "drop", resampled: bool = False,
                 epoch_length: int | None = None, shuffle_buffer: int = 1000,
                 val_urls: str | Sequence[str] | None = None, seed: int = 0, random_crop: bool = False,
                 flip_p: float = 0.0, rank: int | None = None, world_size: int | None = None,
                 micro_conditioning: bool = False, buckets: dict[str, float] | bool | None = None):
        super().__init__()
        check_loader_args(batch_size, num_workers, missing_caption)
        self.buckets = parse_buckets(buckets)
        if resampled and not epoch_length:
            raise ConfigError("resampled=True needs epoch_length (samples per rank per epoch); "
                              "set data.params.epoch_length")
        if epoch_length is not None and (not isinstance(epoch_length, int) or epoch_length < 1):
            raise ConfigError(f"epoch_length must be a positive int, got {epoch_length!r}; "
                              "set data.params.epoch_length")
        self.urls = expand_shards(urls, "data.params.urls")
        self.val_urls = expand_shards(val_urls, "data.params.val_urls") if val_urls else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform = ImageTransform(size, random_crop=random_crop, flip_p=flip_p,
                                              micro_conditioning=micro_conditioning)
        self.val_transform = ImageTransform(size, micro_conditioning=micro_conditioning)
        self.shard_options = dict(
            image_keys=tuple(image_keys), caption_key=caption_key or ("json" if caption_json_field else "txt"),
            caption_json_field=caption_json_field, missing_caption=missing_caption, seed=seed,
            num_workers=num_workers, buckets=self.buckets, batch_size=batch_size)
        self.resampled, self.epoch_length, self.shuffle_buffer = resampled, epoch_length, shuffle_buffer
        self._rank, self._world_size = rank, world_size
        if rank is not None or world_size is not None:
            node_info(rank=rank, world_size=world_size)  # fail now on a bad pair
        self.stats = WorkerCounters(SHARD_STATS, num_workers)
        self.val_stats = WorkerCounters(SHARD_STATS, num_workers)
        self.train_set: CaptionedShards | None = None
        self.val_set: CaptionedShards | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets for this process's rank (again if the rank changed, e.g. set up before DDP)."""
        rank, world_size = node_info(self.trainer, self._rank, self._world_size)
        if self.train_set is not None and (self.train_set.rank, self.train_set.world_size) == (rank, world_size):
            return
        self._warn_uneven(rank, world_size)
        self.train_set = CaptionedShards(
            self.urls, self.train_transform, rank=rank, world_size=world_size, resampled=self.resampled,
            epoch_length=self.epoch_length, shuffle=True, shuffle_buffer=self.shuffle_buffer, stats=self.stats,
            **self.shard_options)
        if self.val_urls:
            self.val_set = CaptionedShards(self.val_urls, self.val_transform, rank=rank, world_size=world_size,
                                           shuffle=False, stats=self.val_stats, **self.shard_options)

    def _warn_uneven(self, rank: int, world_size: int) -> None:
        if world_size > 1 and self.buckets is not None and self.epoch_length is None:
            raise ConfigError(f"aspect-ratio buckets on {world_size} ranks need data.params.epoch_length (samples "
                              "per rank per epoch), so that every rank runs the same number of batches")
        if world_size > 1 and not self.resampled and self.epoch_length is None and len(self.urls) % world_size:
            logger.warning("%d shards do not split evenly over %d ranks: ranks will see different sample counts "
                           "and DDP may stall at epoch end; set data.params.epoch_length or resampled",
                           len(self.urls), world_size)

    def train_dataloader(self) -> DataLoader:
        """Resumable loader (``StreamLoader``); the shards shuffle themselves."""
        self.setup("fit")
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        return make_loader(self.val_set, self.batch_size, self.num_workers)
