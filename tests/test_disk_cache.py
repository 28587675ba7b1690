"""The disk cache of VAE moments and text embeddings (model.params.cache_dir, ldm.data.disk_cache): a second run
encodes nothing (encoder calls counted), a changed VAE or text encoder misses, corrupt files are re-encoded with a
warning, random crops are cached per variant with a warning, and train.py runs it on bucketed pictures."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.disk_cache import DiskCache, fingerprint
from test_buckets import mixed_folder
from test_train_ldm import TINY_MODEL, fixed_batch, tiny_module


class Counter:
    """Counts the calls of the first stage's encode and of the text encoder of a tiny module."""

    def __init__(self, module):
        self.vae = self.text = 0
        encode, text = module.first_stage_model.encode, module.conditioner.embedders[0].forward

        def counted_encode(x):
            self.vae += len(x)
            return encode(x)

        def counted_text(prompts):
            self.text += len(prompts)
            return text(prompts)

        module.first_stage_model.encode = counted_encode
        module.conditioner.embedders[0].forward = counted_text


def run(module, batch):
    module.train()
    return module._loss(batch, torch.Generator().manual_seed(1), drop=False)


def test_a_second_run_encodes_nothing_and_gives_the_same_loss(tmp_path):
    batch = fixed_batch(4)
    batch["caption"][3] = batch["caption"][0]  # 3 distinct captions
    first = tiny_module(cache_dir=str(tmp_path / "cache"))
    assert first.cache_latents  # cache_dir implies the cache
    count = Counter(first)
    loss = run(first, batch)
    assert (count.vae, count.text) == (4, 3)  # each image and caption once, on its own
    assert first.disk_cache.stats["latent_misses"] == 4 and first.disk_cache.stats["text_misses"] == 3
    assert first._moments_cache == {} and first.conditioner.cache == {}  # on disk, not in memory
    run(first, batch)
    assert (count.vae, count.text) == (4, 3)  # the same process reads its files back

    second = tiny_module(cache_dir=str(tmp_path / "cache"))
    second.load_state_dict(first.state_dict())
    count = Counter(second)
    assert torch.equal(run(second, batch), loss)
    assert (count.vae, count.text) == (0, 0)
    assert second.disk_cache.stats["latent_hits"] == 4 and second.disk_cache.stats["text_hits"] == 3
    plain = tiny_module()
    plain.load_state_dict(first.state_dict())
    assert torch.allclose(run(plain, batch), loss, rtol=1e-5, atol=1e-6)  # the cache changes nothing
    files = sorted(p.relative_to(tmp_path / "cache").parts[0] for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 7 and len(set(files)) == 2  # latents-<vae>/8x8/.. and text-<encoder>/..


def test_a_changed_vae_or_text_encoder_misses(tmp_path):
    batch = fixed_batch(2)
    first = tiny_module(cache_dir=str(tmp_path / "cache"))
    run(first, batch)
    state = first.state_dict()

    vae_changed = tiny_module(cache_dir=str(tmp_path / "cache"))
    vae_changed.load_state_dict(state)
    with torch.no_grad():
        vae_changed.first_stage_model.encoder.conv_in.weight.add_(1e-3)
    count = Counter(vae_changed)
    run(vae_changed, batch)
    assert (count.vae, count.text) == (2, 0)

    text_changed = tiny_module(cache_dir=str(tmp_path / "cache"))
    text_changed.load_state_dict(state)
    with torch.no_grad():
        text_changed.cond_stage_model.model.token_embedding.weight.mul_(1.01)
    count = Counter(text_changed)
    run(text_changed, batch)
    assert (count.vae, count.text) == (0, 2)
    # a setting that changes the output without changing a weight misses too
    a, b = tiny_module().cond_stage_model, tiny_module().cond_stage_model
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    b.layer, b.layers_run = "penultimate", b.layers_run - 1
    assert fingerprint(a) != fingerprint(b)


def test_a_corrupt_cache_file_is_reported_and_encoded_again(tmp_path, caplog):
    batch = fixed_batch(3)
    first = tiny_module(cache_dir=str(tmp_path / "cache"))
    loss = run(first, batch)
    latents = sorted((tmp_path / "cache").glob("latents-*/*/*/*.safetensors"))
    texts = sorted((tmp_path / "cache").glob("text-*/*/*.safetensors"))
    latents[0].write_bytes(latents[0].read_bytes()[:100])  # truncated
    data = bytearray(latents[1].read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the moments
    latents[1].write_bytes(bytes(data))
    texts[0].write_bytes(b"garbage")

    second = tiny_module(cache_dir=str(tmp_path / "cache"))
    second.load_state_dict(first.state_dict())
    count = Counter(second)
    with caplog.at_level(logging.WARNING, logger="ldm.data.disk_cache"):
        assert torch.equal(run(second, batch), loss)
    assert (count.vae, count.text) == (2, 1) and second.disk_cache.stats["corrupt"] == 3
    assert caplog.text.count("is corrupt") == 3 and str(latents[0]) in caplog.text
    third = tiny_module(cache_dir=str(tmp_path / "cache"))
    third.load_state_dict(first.state_dict())
    count = Counter(third)
    run(third, batch)
    assert (count.vae, count.text) == (0, 0)  # rewritten


def test_entries_are_written_atomically_by_several_writers(tmp_path):
    vae = torch.nn.Conv2d(3, 8, 1)
    moments = torch.randn(8, 4, 4)
    for rank in range(2):  # two ranks writing the same entry: the last rename wins, no temporary file stays
        DiskCache(tmp_path).save_moments(vae, "ab12", (32, 32), moments + 0)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["ab12.safetensors"]
    assert torch.equal(DiskCache(tmp_path).load_moments(vae, "ab12", (32, 32)), moments)
    assert DiskCache(tmp_path).load_moments(vae, "ab12", (32, 48)) is None  # another bucket size
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        DiskCache(tmp_path / "file")


def _run_config(tmp_path: Path, name: str, random_crop: bool = False) -> list[str]:
    model = OmegaConf.create(TINY_MODEL)
    model.params.cache_dir = str(tmp_path / "cache")
    model.params.validation_prompts = ["a red circle"]
    cfg = {"model": model,
           "data": {"target": "ldm.data.folder.ImageFolderDataModule",
                    "params": {"root": str(tmp_path / "pics"), "batch_size": 2, "num_workers": 0, "val_fraction": 0.0,
                               "random_crop": random_crop, "buckets": {"base": 32, "step": 16, "max_aspect": 2.0}}},
           "lightning": {"logger": "csv", "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4,
                                                      "enable_progress_bar": False, "enable_model_summary": False},
                         "callbacks": {"image_logger": False}}}
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return ["--base", str(path), "--logdir", str(tmp_path / "logs"), "--name", name]


def test_train_py_twice_on_bucketed_pictures_encodes_once(tmp_path, monkeypatch, caplog):
    from ldm.cli.train import main
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoder import OpenCLIPTextEncoder

    mixed_folder(tmp_path / "pics", n=6)  # 4 steps of 2: every picture (3 epochs' worth: the same crops)
    calls = {"vae": 0, "text": 0}
    encode, forward = AutoencoderKL.encode, OpenCLIPTextEncoder.forward

    def counted_encode(self, x, *args, **kwargs):
        calls["vae"] += len(x)
        return encode(self, x, *args, **kwargs)

    def counted_forward(self, prompts, *args, **kwargs):
        calls["text"] += 1
        return forward(self, prompts, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted_encode)
    monkeypatch.setattr(OpenCLIPTextEncoder, "forward", counted_forward)
    assert main(_run_config(tmp_path, "first")) == 0
    assert calls["vae"] == 6 and calls["text"] == 6
    calls.update(vae=0, text=0)
    assert main(_run_config(tmp_path, "second")) == 0
    assert calls == {"vae": 0, "text": 0}
    with caplog.at_level(logging.WARNING):
        assert main(_run_config(tmp_path, "cropped", random_crop=True)) == 0
    assert "each variant is cached on its own" in caplog.text


def test_lora_on_the_text_encoder_turns_the_text_cache_off(tmp_path):
    assert tiny_module(cache_dir=str(tmp_path), lora={"rank": 2, "targets": ["attn"]}).conditioner.cache == {}
    module = tiny_module(cache_dir=str(tmp_path), lora={"rank": 2, "targets": ["attn", "text"]})
    assert module.conditioner.cache is None and module.disk_cache is not None  # latents are still cached
