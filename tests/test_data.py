"""Data modules: transforms, collate, webdataset shards (split, bad data, resampling), image folders, shapes."""
import io
import json
import logging
import tarfile
import sys
import types

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from ldm.config import ConfigError
from ldm.data.datamodule import (ResumableSampler, ShapesDataModule, WorkerCounters, collate, make_loader, node_info,
                                 sample_rng)
from ldm.data.folder import ImageFolderDataModule
from ldm.data.transforms import ImageTransform, load_image, to_tensor
from ldm.data.webdataset import WebDatasetDataModule, expand_shards


def encode(color, size=(32, 32), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(directory, num_shards=4, per_shard=4, extra=None, name="shard"):
    """Shards ``{name}-000.tar`` ...; sample i of shard s has caption ``s{s}-{i}`` (``extra(s, i)`` edits it)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = directory / f"{name}-{s:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                sample = {"__key__": f"{s:03d}_{i:03d}", "png": encode((40 * s, 20 * i, 0)), "txt": f"s{s}-{i}"}
                writer.write(extra(s, i, sample) if extra else sample)
        paths.append(str(path))
    return paths


def cut_shard(path, member, into=0):
    """Truncate a shard ``into`` bytes after the start of ``member``'s headers."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    with open(path, "r+b") as f:
        f.truncate(offset + into)


def all_captions(num_shards=4, per_shard=4, skip=()):
    return sorted(f"s{s}-{i}" for s in range(num_shards) for i in range(per_shard) if s not in skip)


def read_epoch(loader):
    captions, sizes = [], []
    for batch in loader:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        captions += batch["caption"]
        sizes.append(len(batch["caption"]))
    return captions, sizes


def datamodule(urls, **kw):
    kw = {"batch_size": 3, "num_workers": 0, "size": 16, "shuffle_buffer": 8, **kw}
    dm = WebDatasetDataModule(urls, **kw)
    dm.setup("fit")
    return dm


# -- transforms and collate ------------------------------------------------------------------------

def striped_image():
    """48x32: red, green, blue vertical thirds."""
    img = Image.new("RGB", (48, 32))
    for x0, color in ((0, (255, 0, 0)), (16, (0, 255, 0)), (32, (0, 0, 255))):
        img.paste(color, (x0, 0, x0 + 16, 32))
    return img


def test_transform_resizes_shorter_side_and_center_crops():
    out = ImageTransform(16)(striped_image())
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # 48x32 -> 24x16, centre crop keeps x in [4, 20): red, green, blue columns left to right
    assert out[:, 8, 0].argmax() == 0 and out[:, 8, 8].argmax() == 1 and out[:, 8, 15].argmax() == 2
    assert torch.allclose(to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)))[:, 0, 0], torch.tensor([1.0, -1, -1]))


def test_transform_flip_and_random_crop():
    img = striped_image()
    flipped = ImageTransform(16, flip_p=1.0)(img)
    assert torch.equal(flipped, ImageTransform(16)(img).flip(-1))
    crops = {ImageTransform(16, random_crop=True)(img)[:, 0, 0].argmax().item() for _ in range(20)}
    assert crops == {0, 1}  # the left edge lands in red or green, never in blue
    with pytest.raises(ValueError, match="flip_p"):
        ImageTransform(16, flip_p=2)
    with pytest.raises(ValueError, match="size"):
        ImageTransform(0)


def test_load_image_composites_transparency_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_collate_builds_batch_dict():
    samples = [{"image": torch.zeros(3, 8, 8), "caption": "a"}, {"image": torch.ones(3, 8, 8), "caption": "b"}]
    batch = collate(samples)
    assert batch["image"].shape == (2, 3, 8, 8) and batch["caption"] == ["a", "b"]
    with pytest.raises(ValueError, match="different shapes"):
        collate([samples[0], {"image": torch.zeros(3, 4, 4), "caption": "c"}])
    with pytest.raises(ValueError, match="caption"):
        collate([{"image": torch.zeros(3, 8, 8)}])


def test_worker_counters_and_node_info():
    counters = WorkerCounters(("a", "b"), num_workers=2)
    assert counters.add("a") == 1 and counters.add("a", 2) == 3
    assert counters.totals() == {"a": 3, "b": 0} and counters["a"] == 3
    with pytest.raises(KeyError):
        counters.add("c")
    assert node_info() == (0, 1)
    assert node_info(types.SimpleNamespace(global_rank=1, world_size=3)) == (1, 3)
    assert node_info(None, rank=2, world_size=4) == (2, 4)
    with pytest.raises(ValueError, match="rank"):
        node_info(None, rank=4, world_size=4)


# -- shard lists -----------------------------------------------------------------------------------

def test_expand_shards_patterns_lists_globs_and_errors(tmp_path):
    paths = write_shards(tmp_path, num_shards=3, per_shard=1)
    assert expand_shards(str(tmp_path / "shard-{000..002}.tar")) == paths
    assert expand_shards(paths[::-1]) == paths[::-1]
    assert expand_shards(str(tmp_path / "shard-*.tar")) == paths
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]  # remote: not checked
    with pytest.raises(ConfigError, match=r"no shards found for '.*nope-\*\.tar'; check data.params.urls"):
        expand_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(ConfigError, match="no shards found for .*; check data.params.urls"):
        expand_shards(str(tmp_path / "other-{000..002}.tar"))
    with pytest.raises(ConfigError, match=r"shard file not found: .*shard-003.tar' \(1 of 4 missing"):
        expand_shards(str(tmp_path / "shard-{000..003}.tar"))
    with pytest.raises(ConfigError, match="no shards given"):
        expand_shards([])


def test_datamodule_argument_errors(tmp_path):
    urls = write_shards(tmp_path, num_shards=1, per_shard=1)
    with pytest.raises(ConfigError, match="epoch_length"):
        WebDatasetDataModule(urls, batch_size=2, resampled=True)
    with pytest.raises(ConfigError, match="missing_caption"):
        WebDatasetDataModule(urls, batch_size=2, missing_caption="skip")
    with pytest.raises(ValueError, match="batch_size"):
        WebDatasetDataModule(urls, batch_size=0)
    with pytest.raises(ConfigError, match="val_urls"):
        WebDatasetDataModule(urls, batch_size=2, val_urls=str(tmp_path / "val-{0..1}.tar"))


# -- reading shards --------------------------------------------------------------------------------

def test_reads_brace_pattern_and_list(tmp_path):
    paths = write_shards(tmp_path)
    for urls in (str(tmp_path / "shard-{000..003}.tar"), paths):
        dm = datamodule(urls)
        captions, sizes = read_epoch(dm.train_dataloader())
        assert sorted(captions) == all_captions() and sizes == [3, 3, 3, 3, 3, 1]
        assert dm.stats.totals() == {"samples": 16, "bad_shards": 0, "bad_samples": 0, "missing_caption": 0}


def test_ranks_get_disjoint_shards(tmp_path):
    paths = write_shards(tmp_path)
    per_rank = [read_epoch(datamodule(paths, rank=r, world_size=2).train_dataloader())[0] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 8
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == all_captions()
    # whole shards go to one rank
    assert len({c.split("-")[0] for c in per_rank[0]}) == 2


def test_rank_comes_from_the_trainer(tmp_path):
    paths = write_shards(tmp_path)
    dm = WebDatasetDataModule(paths, batch_size=4, num_workers=0, size=16)
    dm.trainer = types.SimpleNamespace(global_rank=1, world_size=4)
    dm.setup("fit")
    assert (dm.train_set.rank, dm.train_set.world_size) == (1, 4)
    assert len(read_epoch(dm.train_dataloader())[0]) == 4


def test_two_workers_get_disjoint_shards_and_counts_reach_main_process(tmp_path):
    paths = write_shards(tmp_path)
    dm = datamodule(paths, num_workers=2)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    for epoch in range(2):  # persistent workers: the second epoch restarts their iterators
        captions, _ = read_epoch(loader)
        assert sorted(captions) == all_captions()  # no sample twice, none lost
    assert dm.stats["samples"] == 32
    assert [w["samples"] for w in dm.stats.per_worker()] == [16, 16]


def test_epochs_are_shuffled_differently(tmp_path):
    dm = datamodule(write_shards(tmp_path))
    first, second = read_epoch(dm.train_dataloader())[0], read_epoch(dm.train_dataloader())[0]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_skipped_counted_and_iteration_goes_on(tmp_path, num_workers, caplog):
    paths = write_shards(tmp_path, num_shards=3, per_shard=4)
    cut_shard(paths[1], "001_002.png", into=1024 + 40)  # inside the image bytes of shard 1, sample 2
    dm = datamodule(paths, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="ldm.data.webdataset"):
        captions, _ = read_epoch(dm.train_dataloader())
    assert set(all_captions(num_shards=3, skip=(1,))) <= set(captions)
    # sample 1 is complete but the shard ends before that is known: dropped with the rest
    assert "s1-0" in captions and {"s1-1", "s1-2", "s1-3"}.isdisjoint(captions)
    assert dm.stats["bad_shards"] == 1 and dm.stats["bad_samples"] == 0
    if num_workers == 0:  # worker processes log to their own handlers, out of caplog's reach
        assert "shard-001.tar" in caplog.text and "bad_shards" in caplog.text


def test_shard_cut_at_a_header_is_not_taken_for_complete(tmp_path):
    paths = write_shards(tmp_path, num_shards=2, per_shard=4)
    cut_shard(paths[0], "000_001.txt")  # tarfile alone would end quietly here and yield s0-1 without caption
    dm = datamodule(paths)
    captions, _ = read_epoch(dm.train_dataloader())
    assert sorted(captions) == ["s0-0"] + all_captions(num_shards=2, skip=(0,))
    assert dm.stats["bad_shards"] == 1 and dm.stats["missing_caption"] == 0


def test_garbage_shard_and_corrupt_image_are_counted(tmp_path):
    def corrupt(s, i, sample):
        if (s, i) == (0, 1):
            sample["png"] = b"not a png"
        return sample

    paths = write_shards(tmp_path, num_shards=2, extra=corrupt)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 3000)
    dm = datamodule([paths[0], str(junk), paths[1]])
    captions, _ = read_epoch(dm.train_dataloader())
    assert sorted(captions) == [c for c in all_captions(num_shards=2) if c != "s0-1"]
    assert dm.stats["bad_shards"] == 1 and dm.stats["bad_samples"] == 1


@pytest.mark.parametrize("policy", ["drop", "empty"])
def test_missing_caption_is_counted_then_dropped_or_empty(tmp_path, policy):
    def no_caption(s, i, sample):
        if i == 0:
            del sample["txt"]
        return sample

    dm = datamodule(write_shards(tmp_path, extra=no_caption), missing_caption=policy)
    captions, _ = read_epoch(dm.train_dataloader())
    assert dm.stats["missing_caption"] == 4
    expected = [c for c in all_captions() if not c.endswith("-0")]
    assert sorted(captions) == (expected if policy == "drop" else sorted(expected + [""] * 4))


def test_caption_from_json_field(tmp_path):
    def as_json(s, i, sample):
        del sample["txt"]
        record = {"caption": f"json s{s}-{i}", "width": 32} if i else {"width": 32}
        return dict(sample, json=json.dumps(record).encode())

    dm = datamodule(write_shards(tmp_path, num_shards=2, extra=as_json), caption_json_field="caption")
    captions, _ = read_epoch(dm.train_dataloader())
    assert sorted(captions) == sorted(f"json {c}" for c in all_captions(num_shards=2) if not c.endswith("-0"))
    assert dm.stats["missing_caption"] == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epoch_length_gives_exactly_that_many_samples(tmp_path, num_workers):
    dm = datamodule(write_shards(tmp_path, num_shards=2, per_shard=3), resampled=True, epoch_length=11,
                    num_workers=num_workers, batch_size=4)
    loader = dm.train_dataloader()
    for _ in range(2):
        captions, _ = read_epoch(loader)
        assert len(captions) == 11
        assert set(captions) <= set(all_captions(num_shards=2, per_shard=3))


def test_epoch_length_without_resampling_cycles_the_shards(tmp_path):
    dm = datamodule(write_shards(tmp_path, num_shards=2, per_shard=3), epoch_length=10, rank=1, world_size=2)
    captions, _ = read_epoch(dm.train_dataloader())
    assert len(captions) == 10 and len(set(captions)) == 3  # rank 1 owns one shard of 3 samples


def test_endless_modes_fail_instead_of_spinning_on_bad_shards(tmp_path):
    junk = tmp_path / "junk-0.tar"
    junk.write_bytes(b"\x01" * 3000)
    for kw in ({"resampled": True}, {"resampled": False}):
        dm = datamodule([str(junk)], epoch_length=5, **kw)
        with pytest.raises(RuntimeError, match="no sample could be read"):
            read_epoch(dm.train_dataloader())


def test_validation_loader_reads_val_urls_in_order(tmp_path):
    train = write_shards(tmp_path / "train", num_shards=2)
    val = write_shards(tmp_path / "val", num_shards=2, per_shard=2, name="val")
    dm = datamodule(train, val_urls=val)
    assert read_epoch(dm.val_dataloader())[0] == ["s0-0", "s0-1", "s1-0", "s1-1"]
    assert datamodule(train).val_dataloader() == []


def test_fits_with_lightning(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    seen = []

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append((tuple(batch["image"].shape), list(batch["caption"])))
            return (batch["image"].mean() - self.weight) ** 2

        def validation_step(self, batch, batch_idx):
            seen.append(("val", len(batch["caption"])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train = write_shards(tmp_path / "train", num_shards=2)
    val = write_shards(tmp_path / "val", num_shards=1, per_shard=2, name="val")
    dm = WebDatasetDataModule(train, batch_size=4, num_workers=0, size=16, val_urls=val, resampled=True,
                              epoch_length=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Tiny(), datamodule=dm)
    assert [s for s in seen if s[0] != "val"] and all(s[0] == (4, 3, 16, 16) for s in seen if s[0] != "val")
    assert sum(1 for s in seen if s[0] != "val") == 4 and seen.count(("val", 2)) == 2


# -- image folders ---------------------------------------------------------------------------------

def make_folder(root, n=6, captions="txt"):
    (root / "sub").mkdir(parents=True)
    records = []
    for i in range(n):
        rel = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        (root / rel).write_bytes(encode((30 * i, 0, 0), size=(20, 16), fmt="PNG" if i % 2 else "JPEG"))
        if i == n - 1:
            continue  # the last image has no caption
        if captions == "txt":
            (root / rel).with_suffix(".txt").write_text(f"caption {i}\n")
        else:
            records.append(json.dumps({"file": rel, "text": f"caption {i}"}))
    if captions == "jsonl":
        records.append(json.dumps({"file": "gone.png", "text": "listed but missing"}))
        (root / "captions.jsonl").write_text("\n".join(records) + "\n")


@pytest.mark.parametrize("captions", ["txt", "jsonl"])
def test_image_folder_captions_and_deterministic_split(tmp_path, captions):
    make_folder(tmp_path / "data", captions=captions)
    dm = ImageFolderDataModule(tmp_path / "data", batch_size=2, size=16, num_workers=0, val_fraction=0.2)
    assert dm.stats["missing_caption"] == 1
    dm.setup("fit")
    train, val = read_epoch(dm.train_dataloader())[0], read_epoch(dm.val_dataloader())[0]
    assert sorted(train + val) == [f"caption {i}" for i in range(5)] and len(val) == 1
    again = ImageFolderDataModule(tmp_path / "data", batch_size=2, size=16, num_workers=0, val_fraction=0.2)
    assert again.split() == dm.split()


def test_image_folder_empty_caption_policy_and_bad_image(tmp_path):
    make_folder(tmp_path / "data")
    (tmp_path / "data" / "img0.jpg").write_bytes(b"broken")
    dm = ImageFolderDataModule(tmp_path / "data", batch_size=6, size=16, num_workers=0, val_fraction=0.0,
                               missing_caption="empty")
    captions, sizes = read_epoch(dm.train_dataloader())
    assert sizes == [6] and "" in captions and "caption 0" not in captions  # bad image replaced by the next
    assert dm.stats["bad_samples"] == 1 and dm.stats["missing_caption"] == 1


def test_image_folder_skips_and_counts_a_caption_that_is_not_utf8(tmp_path, caplog):
    make_folder(tmp_path / "data")
    bad = tmp_path / "data" / "img2.jpg"
    bad.with_suffix(".txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        dm = ImageFolderDataModule(tmp_path / "data", batch_size=4, size=16, num_workers=0, val_fraction=0.0)
    assert dm.stats["bad_samples"] == 1 and dm.stats["missing_caption"] == 1
    assert str(bad.with_suffix(".txt")) in caplog.text and "UnicodeDecodeError" in caplog.text
    captions, sizes = read_epoch(dm.train_dataloader())
    assert sorted(captions) == ["caption 0", "caption 1", "caption 3", "caption 4"] and sizes == [4]
    # in a captions.jsonl a line that is not UTF-8 is an error of that line, like a line that is not JSON
    make_folder(tmp_path / "j", captions="jsonl")
    with open(tmp_path / "j" / "captions.jsonl", "ab") as f:
        f.write(b'{"file": "img0.jpg", "text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"captions.jsonl:7: not UTF-8 text"):
        ImageFolderDataModule(tmp_path / "j", batch_size=2)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="image folder '.*missing' not found; check data.params.root"):
        ImageFolderDataModule(tmp_path / "missing", batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        ImageFolderDataModule(tmp_path / "empty", batch_size=2)
    make_folder(tmp_path / "data", captions="jsonl")
    with open(tmp_path / "data" / "captions.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ConfigError, match=r"captions.jsonl:7: expected"):
        ImageFolderDataModule(tmp_path / "data", batch_size=2)


# -- synthetic shapes ------------------------------------------------------------------------------

class FakeShapes(Dataset):
    def __init__(self, num_samples, size=64, seed=0, color_drop=0.15, kinds=None):
        self.num_samples, self.size, self.seed, self.color_drop, self.kinds = num_samples, size, seed, color_drop, kinds

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        return {"image": torch.full((3, self.size, self.size), self.seed / 10), "caption": f"seed {self.seed} #{i}"}


def test_shapes_datamodule_wiring(monkeypatch):
    fake = types.SimpleNamespace(ShapesDataset=FakeShapes, KINDS=("single", "relation"))
    monkeypatch.setitem(sys.modules, "ldm.data.shapes", fake)
    dm = ShapesDataModule(num_train=5, num_val=2, size=8, batch_size=2, seed=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["caption"][0].startswith("seed 3")
    assert next(iter(dm.val_dataloader()))["caption"] == ["seed 4 #0", "seed 4 #1"]
    assert ShapesDataModule(num_train=5, num_val=0, batch_size=2).val_dataloader() == []
    dm = ShapesDataModule(num_train=5, num_val=2, batch_size=2, color_drop=0.4, kinds=["relation", "single"])
    dm.setup()
    assert dm.train_set.color_drop == 0.4 and dm.val_set.color_drop == 0.15  # validation keeps the defaults
    assert dm.train_set.kinds == ["relation", "single"] and dm.val_set.kinds is None
    with pytest.raises(ValueError, match="color_drop"):
        ShapesDataModule(color_drop=-0.1)
    with pytest.raises(ValueError, match="data.params.paraphrase"):
        ShapesDataModule(paraphrase=2.0)


def test_shapes_datamodule_with_real_dataset():
    pytest.importorskip("ldm.data.shapes")
    dm = ShapesDataModule(num_train=4, num_val=2, size=32, batch_size=2, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert all(isinstance(c, str) and c for c in batch["caption"])
    assert len(dm.val_set) == 2
    dm = ShapesDataModule(num_train=40, num_val=0, batch_size=2, kinds=["relation", "relation", "single"])
    dm.setup()
    drawn = [dm.train_set.scene(i)[0].kind for i in range(40)]
    assert set(drawn) == {"relation", "single"} and drawn.count("relation") > drawn.count("single")
    with pytest.raises(ValueError, match="data.params.kinds has unknown scene kind 'spiral'"):
        ShapesDataModule(num_train=4, num_val=0, batch_size=2, kinds=["spiral"])  # at once, not at setup
    dm = ShapesDataModule(num_train=4, num_val=2, batch_size=2, paraphrase=0.5)
    dm.setup()
    assert dm.train_set.paraphrase == 0.5 and dm.val_set.paraphrase == 0.0  # validation keeps the defaults


@pytest.mark.slow
def test_counts_survive_spawned_workers(tmp_path):
    paths = write_shards(tmp_path, num_shards=3)
    cut_shard(paths[1], "001_001.png", into=1024 + 40)
    dm = datamodule(paths, num_workers=2)
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=3, num_workers=2, collate_fn=collate,
                                         multiprocessing_context="spawn", persistent_workers=True)
    for _ in range(2):
        captions, _ = read_epoch(loader)
        assert sorted(captions) == all_captions(num_shards=3, skip=(1,))  # s1-0 may be incomplete: dropped
    assert dm.stats["bad_shards"] == 2 and dm.stats["samples"] == 16


def test_reads_shards_written_by_the_shapes_world(tmp_path):
    shapes = pytest.importorskip("ldm.data.shapes")
    paths = shapes.write_shards(tmp_path, num=5, shard_size=2, size=32)
    dm = datamodule(str(tmp_path / "shapes-{000000..000002}.tar"))
    captions, _ = read_epoch(dm.train_dataloader())
    dataset = shapes.ShapesDataset(5, size=32)
    assert len(paths) == 3 and sorted(captions) == sorted(dataset[i]["caption"] for i in range(5))


# -- resumable loaders: sampler state, mid-epoch resume through Lightning -------------------------

class Numbers(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.rand(3, 2, 2), "caption": str(i)}  # rand: seeded per (seed, epoch, index)


def test_resumable_sampler_order_ranks_and_state():
    sampler = ResumableSampler(Numbers(10), seed=3)
    first = list(sampler)
    assert [e for e, _ in first] == [0] * 10 and sorted(i for _, i in first) == list(range(10))
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert sorted(i for _, i in sampler) == list(range(10)) and list(sampler) != first
    ranks = [list(ResumableSampler(Numbers(10), seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4] and {i for r in ranks for _, i in r} == set(range(10))

    sampler.advance(4)
    sampler.set_epoch(1)  # Lightning's set_epoch for the epoch in progress keeps the position
    state = sampler.state_dict()
    assert state == {"epoch": 1, "offset": 4, "seed": 3, "dataset_size": 10, "world_size": 1}
    resumed = ResumableSampler(Numbers(10), seed=3)
    resumed.load_state_dict(state)
    full = ResumableSampler(Numbers(10), seed=3)
    full.set_epoch(1)
    assert list(resumed) == list(full)[4:]
    resumed.load_state_dict({**state, "offset": 10})  # a finished epoch resumes with the next one
    assert (resumed.epoch, resumed.offset) == (2, 0)


def test_sample_rng_seeds_only_the_cpu_generator_and_restores_the_callers_stream(monkeypatch):
    # torch.manual_seed would queue a seed for CUDA, XPU, MPS...: a formatted stack trace per sample
    def refuse(*_):
        raise AssertionError("sample_rng seeded a device generator")

    torch.manual_seed(5)
    expected_after = torch.rand(3)
    torch.manual_seed(5)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    with sample_rng(0, 1, 2):
        first = torch.rand(4)
    assert torch.equal(torch.rand(3), expected_after)  # the caller's stream goes on as if nothing happened
    with sample_rng(0, 1, 2):
        assert torch.equal(torch.rand(4), first)  # the same key, the same draws
    with sample_rng(0, 1, 3):
        assert not torch.equal(torch.rand(4), first)


def test_resumable_sampler_state_for_other_data_goes_on_with_next_epoch(caplog):
    sampler = ResumableSampler(Numbers(12), seed=3)
    with caplog.at_level(logging.WARNING, logger="ldm.data.datamodule"):
        sampler.load_state_dict({"epoch": 2, "offset": 4, "seed": 3, "dataset_size": 10, "world_size": 1})
    assert (sampler.epoch, sampler.offset) == (3, 0) and "going on with epoch 3" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_counts_delivered_batches_not_prefetched(num_workers):
    def loader():
        return make_loader(Numbers(10), batch_size=3, num_workers=num_workers, shuffle=True, seed=1)

    full = [(b["caption"], b["image"]) for b in loader()]
    assert len(full) == 4 and sorted(c for caps, _ in full for c in caps) == sorted(map(str, range(10)))
    partial = loader()
    it = iter(partial)
    next(it), next(it)  # workers have fetched further ahead by now
    assert partial.state_dict()["offset"] == 6
    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    rest = [(b["caption"], b["image"]) for b in resumed]
    assert [c for c, _ in rest] == [c for c, _ in full[2:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[2:]))  # same augmentation draws
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["offset"] == 0  # epoch done


class Recorder:
    """A tiny LightningModule that records the captions and image sums of each training batch."""

    @staticmethod
    def make(seen: list):
        import pytorch_lightning as pl

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))

            def training_step(self, batch, batch_idx):
                seen.append((self.current_epoch, list(batch["caption"]), round(float(batch["image"].sum()), 4)))
                return (batch["image"].mean() - self.weight) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()


def fit_recording(make_dm, root, max_steps, ckpt_path=None):
    """Batches seen by a fit of ``max_steps`` (checkpoint after every step), resumed from ``ckpt_path``."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    seen = []
    save = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[save],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(Recorder.make(seen), datamodule=make_dm(), ckpt_path=ckpt_path, weights_only=True)
    return seen


def check_resume(make_dm, tmp_path, max_steps, resume_steps):
    full = fit_recording(make_dm, tmp_path / "full", max_steps)
    assert len(full) == max_steps
    for step in resume_steps:
        resumed = fit_recording(make_dm, tmp_path / f"from{step}", max_steps,
                                ckpt_path=str(tmp_path / "full" / "ckpt" / f"step={step}.ckpt"))
        assert resumed == full[step:], step
    return full


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_resumes_mid_epoch_with_the_same_batches(tmp_path, num_workers):
    make_folder(tmp_path / "data", n=11)  # 10 captioned: batches of 3, 3, 3, 1 per epoch

    def make_dm():
        return ImageFolderDataModule(tmp_path / "data", batch_size=3, size=16, num_workers=num_workers,
                                     val_fraction=0.0, random_crop=True, flip_p=0.5, seed=5)

    full = check_resume(make_dm, tmp_path, max_steps=7, resume_steps=[2, 4, 5])  # mid, end of epoch 0, mid
    assert [epoch for epoch, _, _ in full] == [0, 0, 0, 0, 1, 1, 1]
    assert full[0][1] != full[4][1]  # each epoch has its own order


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_resumes_mid_epoch_with_the_same_batches(tmp_path, num_workers):
    paths = write_shards(tmp_path / "shards", num_shards=4)

    def make_dm():  # 10 samples per epoch: 4 batches with 0 workers and with 2 (5 + 5 samples)
        return WebDatasetDataModule(paths, batch_size=3, num_workers=num_workers, size=16, shuffle_buffer=8,
                                    epoch_length=10, random_crop=True, flip_p=0.5)

    full = check_resume(make_dm, tmp_path, max_steps=6, resume_steps=[1, 4, 5])
    assert [epoch for epoch, _, _ in full] == [0, 0, 0, 0, 1, 1]
    assert sum(len(caps) for _, caps, _ in full[:4]) == 10


def test_webdataset_resume_without_epoch_length_repeats_nothing(tmp_path):
    paths = write_shards(tmp_path / "shards", num_shards=4)  # 16 samples: batches of 3 x 5 and 1

    def make_dm():
        return WebDatasetDataModule(paths, batch_size=3, num_workers=0, size=16, shuffle_buffer=8)

    full = fit_recording(make_dm, tmp_path / "full", max_steps=8)
    assert [epoch for epoch, _, _ in full] == [0] * 6 + [1] * 2
    resumed = fit_recording(make_dm, tmp_path / "resumed", max_steps=8,
                            ckpt_path=str(tmp_path / "full" / "ckpt" / "step=2.ckpt"))
    # Lightning read batch 3 ahead before the checkpoint: it is skipped, the rest of the epoch is the same
    assert resumed[:3] == full[3:6] and [epoch for epoch, _, _ in resumed] == [0, 0, 0, 1, 1, 1]
