"""Aspect-ratio buckets (ldm.data.buckets) at tiny sizes: the bucket list, every picture within one step of its
bucket, single-bucket batches from image folders and webdataset shards, the original size and crop recorded for
SDXL, ranks balanced (world size 2 simulated), resuming, and a train.py step on mixed-aspect pictures."""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.config import ConfigError
from ldm.data.buckets import BucketSampler, Buckets, bucket_batches, parse_buckets
from ldm.data.datamodule import make_loader
from ldm.data.folder import ImageFolderDataModule, ImageFolderDataset
from ldm.data.transforms import ImageTransform, to_tensor
from ldm.data.webdataset import WebDatasetDataModule
from test_data import check_resume

TINY = {"base": 64, "step": 16, "max_aspect": 2.0}


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture whose every pixel differs from its neighbours (so a crop's offset shows in its pixels)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


def mixed_folder(root: Path, n: int = 24, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Captioned pictures of random sizes (aspect 1:2.5 to 2.5:1); returns {caption: (height, width)}."""
    root.mkdir(parents=True)
    rng = random.Random(seed)
    sizes = {}
    for i in range(n):
        height = rng.randint(24, 120)
        width = max(8, round(height * math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))))
        gradient(width, height, i).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
        sizes[f"picture {i}"] = (height, width)
    return sizes


# ---- the bucket list and the choice of bucket ---------------------------------------------------------------------
@pytest.mark.parametrize("base,step,max_aspect", [(64, 16, 2.0), (512, 64, 2.0), (1024, 64, 2.0), (1024, 64, 4.0),
                                                  (64, 8, 1.5)])
def test_buckets_have_about_the_base_area_in_steps_and_cover_the_aspects(base, step, max_aspect):
    buckets = Buckets(base, step, max_aspect)
    assert (base, base) in buckets.sizes
    for h, w in buckets.sizes:
        assert h % step == 0 and w % step == 0 and h * w <= base * base
        assert (w, h) in buckets.sizes  # as many tall as wide
        assert h * w >= base * base * (1 - 2 * step / base) ** 2  # about the base area
    aspects = [w / h for h, w in buckets.sizes]
    assert aspects == sorted(aspects) and max(aspects) >= max_aspect  # pictures up to max_aspect have a bucket
    assert sum(a >= max_aspect for a in aspects) == 1  # and only the first beyond it is kept


@pytest.mark.parametrize("base,step,max_aspect", [(64, 16, 2.0), (512, 64, 2.0), (1024, 64, 2.0), (256, 32, 3.0)])
def test_every_picture_within_max_aspect_is_cut_at_most_one_step(base, step, max_aspect):
    buckets = Buckets(base, step, max_aspect)
    for k in range(801):
        aspect = math.exp(math.log(max_aspect) * (2 * k / 800 - 1))
        for height in (97, 640, 3000):
            width = max(1, round(height * aspect))
            index = buckets.index(height, width)
            assert buckets.overhang(height, width, index) <= step + 1e-6, (height, width, buckets[index])
            assert index == min(range(len(buckets)), key=lambda i: buckets.overhang(height, width, i))
    assert buckets.size(100, 1000) == buckets.sizes[-1] and buckets.size(1000, 100) == buckets.sizes[0]


def test_transform_to_a_bucket_covers_then_crops_and_records_it():
    buckets = Buckets(**TINY)
    rng = random.Random(1)
    for n in range(40):
        height, width = rng.randint(20, 200), rng.randint(20, 200)
        if max(height, width) > 2 * min(height, width):
            continue
        image = gradient(width, height, n)
        size = buckets.size(height, width)
        transform = ImageTransform(64, random_crop=True, micro_conditioning=True)
        sample = transform.sample(image, size)
        assert tuple(sample["image"].shape) == (3, *size)
        assert sample["original_size_as_tuple"].tolist() == [height, width]
        assert sample["target_size_as_tuple"].tolist() == list(size)
        resized = transform.resize(image, size)
        cut = (resized.height - size[0], resized.width - size[1])
        assert min(cut) == 0 and max(cut) <= TINY["step"] + 1  # covers; at most one step (+ rounding) cut
        top, left = sample["crop_coords_top_left"].tolist()
        expected = to_tensor(resized.crop((left, top, left + size[1], top + size[0])))
        assert torch.equal(sample["image"], expected)  # the recorded offsets are the crop's
    # a square target is the square transform, bit for bit
    image = gradient(90, 50)
    torch.manual_seed(3)
    square = ImageTransform(32, random_crop=True).sample(image)["image"]
    torch.manual_seed(3)
    assert torch.equal(ImageTransform(32, random_crop=True).sample(image, (32, 32))["image"], square)


def test_bucket_options_are_checked_in_one_line():
    assert parse_buckets(None) is None and parse_buckets(False) is None
    assert parse_buckets(True).sizes == Buckets(512, 64, 2.0).sizes
    assert parse_buckets(TINY).sizes == [(96, 32), (80, 48), (64, 64), (48, 80), (32, 96)]
    with pytest.raises(ConfigError, match="buckets.size: unknown key; use base, step, max_aspect"):
        parse_buckets({"size": 512})
    with pytest.raises(ConfigError, match=r"base=100 must be a positive multiple of step=64"):
        parse_buckets({"base": 100})
    with pytest.raises(ConfigError, match=r"max_aspect=0.5 must be a number >= 1"):
        parse_buckets({"max_aspect": 0.5})
    with pytest.raises(ConfigError, match="give a mapping"):
        parse_buckets("512")


# ---- image folders -------------------------------------------------------------------------------------------------
def test_image_folder_batches_hold_one_bucket_with_sizes_and_crops_recorded(tmp_path):
    sizes = mixed_folder(tmp_path / "pics")
    dm = ImageFolderDataModule(tmp_path / "pics", batch_size=3, num_workers=0, val_fraction=0.0, random_crop=True,
                               micro_conditioning=True, buckets=TINY)
    dm.setup("fit")
    buckets, seen = dm.buckets, []
    for batch in dm.train_dataloader():
        shape = tuple(batch["image"].shape[2:])
        assert shape in buckets.sizes
        for caption, original, crop, target in zip(batch["caption"], batch["original_size_as_tuple"].tolist(),
                                                   batch["crop_coords_top_left"].tolist(),
                                                   batch["target_size_as_tuple"].tolist()):
            height, width = sizes[caption]
            assert original == [height, width] and target == list(shape)
            assert buckets.size(height, width) == shape  # every sample of the batch is in the batch's bucket
            resized = ImageTransform(64).resize(Image.new("RGB", (width, height)), shape)
            assert 0 <= crop[0] <= resized.height - shape[0] and 0 <= crop[1] <= resized.width - shape[1]
            seen.append(caption)
    assert sorted(seen) == sorted(sizes)  # one rank: every picture once per epoch
    assert len({tuple(s) for s in dm.train_set.sizes}) > 2  # the folder really is mixed


def test_bucket_sampler_deals_equal_batches_to_ranks_and_is_seeded_by_epoch():
    rng = random.Random(0)
    bucket_ids = [rng.choice([0, 0, 0, 1, 2, 3]) for _ in range(41)]  # one bucket is common, others rare
    ranks = [BucketSampler(bucket_ids, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    total = len(ranks[0].global_batches(0))
    for epoch in (0, 1):
        per_rank = [r.rank_batches(epoch) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == total // 2
        flat = [i for batches in per_rank for batch in batches for i in batch]
        assert len(flat) == len(set(flat))  # no picture twice in an epoch
        dropped = total % 2
        assert len(flat) >= len(bucket_ids) - dropped * 4
        for batches in per_rank:
            assert all(len({bucket_ids[i] for i in batch}) == 1 for batch in batches)
    assert ranks[0].rank_batches(0) == BucketSampler(bucket_ids, 4, seed=7, rank=0, world_size=2).rank_batches(0)
    assert ranks[0].rank_batches(0) != ranks[0].rank_batches(1)
    keys = list(ranks[1])
    assert [[i for _, i in key] for key in keys] == ranks[1].rank_batches(0) and {e for k in keys for e, _ in k} == {0}
    with pytest.raises(ConfigError, match="fewer than the 4 ranks"):
        BucketSampler([0, 1, 2], 4, world_size=4)


def test_bucketed_folder_loader_on_two_ranks_gives_equal_counts(tmp_path):
    mixed_folder(tmp_path / "pics", n=23)
    dm = ImageFolderDataModule(tmp_path / "pics", batch_size=2, num_workers=0, val_fraction=0.0, buckets=TINY)
    dm.setup("fit")
    loaders = [make_loader(dm.train_set, 2, 0, shuffle=True, seed=0, rank=r, world_size=2,
                           bucket_ids=dm.train_set.bucket_ids) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == len(loaders[1])
    captions = [c for rank in batches for b in rank for c in b["caption"]]
    assert len(captions) == len(set(captions))


def test_bucketed_image_folder_resumes_mid_epoch_with_the_same_batches(tmp_path):
    mixed_folder(tmp_path / "pics", n=12)

    def make_dm():
        return ImageFolderDataModule(tmp_path / "pics", batch_size=2, num_workers=0, val_fraction=0.0,
                                     random_crop=True, flip_p=0.5, seed=3, buckets=TINY)

    full = check_resume(make_dm, tmp_path, max_steps=6, resume_steps=[2, 5])
    assert len({epoch for epoch, _, _ in full}) >= 1


def test_bad_picture_is_skipped_at_setup_and_a_replacement_keeps_the_bucket(tmp_path, caplog):
    mixed_folder(tmp_path / "pics", n=10)
    (tmp_path / "pics" / "03.png").write_bytes(b"not a png")
    dm = ImageFolderDataModule(tmp_path / "pics", batch_size=2, num_workers=0, val_fraction=0.0, buckets=TINY)
    dm.setup("fit")
    assert dm.stats["bad_samples"] == 1 and len(dm.train_set) == 9 and "03.png" in caplog.text
    # a picture that breaks after setup is replaced by one of its own bucket
    items, sizes = dm.train_set.items, dm.train_set.sizes
    first = next(i for i, s in enumerate(sizes) if sizes.count(s) > 1)
    Path(items[first][0]).write_bytes(b"broken later")
    sample = dm.train_set[first]
    assert tuple(sample["image"].shape[1:]) == sizes[first] and sample["caption"] != items[first][1]


def test_a_train_py_step_with_buckets_on_mixed_aspect_pictures(tmp_path):
    from ldm.cli.train import main
    from test_train_cli import FAST, ROOT, SHRINK_UNET, last_step

    mixed_folder(tmp_path / "pics", n=8)
    configs = ROOT / "configs"
    args = ["--base", str(configs / "demo" / "shapes_ldm.yaml"), str(configs / "data" / "image_folder.yaml"),
            f"data.params.root={tmp_path / 'pics'}", "--logdir", str(tmp_path / "logs"), "--name", "buckets",
            "data.params.buckets={base: 64, step: 16, max_aspect: 2.0}", "data.params.random_crop=true",
            "lightning.trainer.max_steps=2", "data.params.batch_size=2", "data.params.num_workers=0",
            "data.params.val_fraction=0.0", "lightning.trainer.accelerator=cpu",
            "model.params.cond_stage_config.params.arch=ldm-tiny-text", "model.params.init_from=null",
            "model.params.unet_config.params.context_dim=32"] + SHRINK_UNET + FAST
    assert main(args) == 0
    assert last_step(tmp_path / "logs" / "buckets") == 2


# ---- webdataset shards ---------------------------------------------------------------------------------------------
def write_mixed_shards(root: Path, num_shards: int = 2, per_shard: int = 12) -> str:
    import webdataset as wds

    root.mkdir(parents=True)
    rng = random.Random(0)
    for s in range(num_shards):
        with wds.TarWriter(str(root / f"s-{s}.tar")) as sink:
            for i in range(per_shard):
                height = rng.randint(24, 120)
                width = max(8, round(height * math.exp(rng.uniform(-math.log(2), math.log(2)))))
                buf = io.BytesIO()
                gradient(width, height, 100 * s + i).save(buf, format="PNG")
                sink.write({"__key__": f"{s}-{i:03d}", "png": buf.getvalue(),
                            "txt": f"{height}x{width} {s}-{i}".encode()})
    return f"{root}/s-{{0..{num_shards - 1}}}.tar"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_batches_hold_one_bucket_and_epoch_length_fixes_the_count(tmp_path, num_workers):
    urls = write_mixed_shards(tmp_path / "shards", num_shards=4, per_shard=6)  # a shard for each worker of a rank
    counts = []
    for rank in range(2):
        dm = WebDatasetDataModule(urls, batch_size=3, num_workers=num_workers, shuffle_buffer=4, epoch_length=10,
                                  micro_conditioning=True, buckets=TINY, rank=rank, world_size=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        for epoch in range(2):
            batches = list(loader)
            assert len(batches) == len(loader)
            counts.append(len(batches))
            for batch in batches:
                shape = tuple(batch["image"].shape[2:])
                assert len(batch["caption"]) == 3 and shape in dm.buckets.sizes
                for caption, original in zip(batch["caption"], batch["original_size_as_tuple"].tolist()):
                    height, width = map(int, caption.split()[0].split("x"))
                    assert original == [height, width] and dm.buckets.size(height, width) == shape
    assert len(set(counts)) == 1  # every rank, every epoch: the same number of batches


def test_webdataset_buckets_without_epoch_length_flush_the_buffers_and_need_it_on_ranks(tmp_path):
    urls = write_mixed_shards(tmp_path / "shards")
    dm = WebDatasetDataModule(urls, batch_size=4, num_workers=0, shuffle_buffer=1, buckets=TINY)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 24  # one pass: everything, the part-filled buffers last
    sizes = [len(b["caption"]) for b in batches]
    assert all(n == 4 for n in sizes[:len(sizes) - len(dm.buckets)]) and min(sizes) < 4
    dm = WebDatasetDataModule(urls, batch_size=4, num_workers=0, buckets=TINY, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="buckets on 2 ranks need data.params.epoch_length"):
        dm.setup("fit")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bucketed_webdataset_resumes_mid_epoch_with_the_same_batches(tmp_path, num_workers):
    urls = write_mixed_shards(tmp_path / "shards")

    def make_dm():
        return WebDatasetDataModule(urls, batch_size=2, num_workers=num_workers, shuffle_buffer=4,
                                    epoch_length=9, random_crop=True, buckets=TINY, seed=2)

    check_resume(make_dm, tmp_path, max_steps=7, resume_steps=[2, 5])


def test_bucket_batches_stage():
    samples = [{"image": torch.zeros(3, h, 4), "n": n} for n, h in enumerate([4, 8, 4, 8, 8, 4, 2])]
    out = [[s["n"] for s in batch] for batch in bucket_batches(samples, 2)]
    assert out == [[0, 2], [1, 3], [6], [5], [4]]  # full ones as they fill; then the rest, smallest shape first
    assert [[s["n"] for s in b] for b in bucket_batches(samples, 2, flush=False)] == [[0, 2], [1, 3]]


@pytest.mark.slow
def test_ddp_two_processes_bucketed_folder(tmp_path):
    """Two real DDP processes (gloo) over a bucketed folder for a whole epoch: the same number of steps on both
    ranks (else DDP would hang), no picture on both."""
    from omegaconf import OmegaConf

    from test_train_cli import _seen, last_step, run_train, tiny_run_config

    mixed_folder(tmp_path / "pics", n=13)
    data = {"target": "ldm.data.folder.ImageFolderDataModule",
            "params": {"root": str(tmp_path / "pics"), "batch_size": 2, "num_workers": 0, "val_fraction": 0.0,
                       "buckets": {"base": 32, "step": 16, "max_aspect": 2.0}}}
    OmegaConf.save(OmegaConf.create({"data": data}), tmp_path / "folder.yaml")
    record = ("lightning.callbacks.record={target: test_train_cli.RecordCaptions, "
              f"params: {{out_dir: '{tmp_path / 'seen'}'}}}}")
    proc = run_train(["--base", str(tiny_run_config(tmp_path)), str(tmp_path / "folder.yaml"), "--logdir",
                      str(tmp_path / "logs"), "--name", "ddp", "--accelerator", "cpu", "--strategy", "ddp",
                      "--devices", "2", "--max_steps", "-1", "lightning.trainer.max_epochs=1",
                      "lightning.callbacks.image_logger=false", record], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _seen(tmp_path / "seen")
    assert r0 and r1 and not r0 & r1
    dm = ImageFolderDataModule(tmp_path / "pics", batch_size=2, num_workers=0, val_fraction=0.0,
                               buckets={"base": 32, "step": 16, "max_aspect": 2.0})
    dm.setup("fit")
    expected = len(BucketSampler(dm.train_set.bucket_ids, 2, world_size=2))
    assert last_step(tmp_path / "logs" / "ddp") == expected


def test_bucketed_webdataset_validation_batches_hold_one_bucket(tmp_path):
    urls = write_mixed_shards(tmp_path / "shards")
    dm = WebDatasetDataModule(urls, batch_size=4, num_workers=0, buckets=TINY, val_urls=urls)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 24
    assert all(tuple(b["image"].shape[2:]) in dm.buckets.sizes for b in batches)
