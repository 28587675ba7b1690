"""configs/finetune/*.yaml: each passes the config checker as shipped, and a shrunk copy (tiny UNet, text tower and
VAE, 32 px pictures in an image folder) trains one step through train.py and writes its export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import check_config, load_config
from ldm.io import read_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "ldm" / "configs" / "finetune"
NAMES = ["sd15.yaml", "sd21.yaml", "sd15_lora.yaml"]  # (sdxl.yaml: its own shrunk test below)

# the same recipes at test size: only the network sizes, the data size and the run length change
SHRINK = {
    "model": {"params": {
        "image_size": 8, "validation_prompts": ["a red circle"], "sample_steps": 2,
        "unet_config": {"params": {"image_size": 8, "model_channels": 32, "attention_resolutions": [2],
                                   "num_res_blocks": 1, "channel_mult": [1, 2], "context_dim": 32}},
        "first_stage_config": {"params": {"ddconfig": {"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1}}},
        "cond_stage_config": {"params": {"arch": "ldm-tiny-text"}},
    }},
    "data": {"params": {"size": 32, "batch_size": 2, "num_workers": 0}},
    "lightning": {"logger": "csv", "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1,
                                               "precision": "32-true", "enable_progress_bar": False}},
}


def picture_folder(root: Path) -> Path:
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["a red circle", "a blue square", "a green triangle", "a pink star"]):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


@pytest.mark.parametrize("name", NAMES + ["sdxl.yaml"])
def test_finetune_config_passes_the_checker(name):
    cfg = load_config(CONFIGS / name, overrides=["data.params.root=pictures"])
    check_config(cfg.model, "model")
    check_config(cfg.data, "data")
    params = cfg.model.params
    assert params.loss_weighting == "min_snr" and params.learning_rate <= 1e-4
    if name.endswith("_lora.yaml"):
        assert params.lora.rank == 16 and not params.use_ema
    else:
        assert params.use_ema and params.learning_rate == 1e-5 and "lora" not in params


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_finetune_config_trains_one_step(tmp_path, name):
    from ldm.cli.train import main

    shrink = OmegaConf.create(SHRINK)
    if name == "sd21.yaml":
        shrink.model.params.unet_config.params.num_head_channels = 16
    else:
        shrink.model.params.unet_config.params.num_heads = 2
    overrides = tmp_path / "shrink.yaml"
    OmegaConf.save(shrink, overrides)
    root = picture_folder(tmp_path / "pictures")
    run = tmp_path / "logs" / "run"
    assert main(["--base", str(CONFIGS / name), str(overrides), f"data.params.root={root}",
                 "--logdir", str(tmp_path / "logs"), "--name", "run"]) == 0
    state, meta = read_state_dict(run / "run.safetensors")
    if name.endswith("_lora.yaml"):
        assert meta["ss_network_dim"] == "16" and all(k.startswith("lora_unet_") for k in state)
        assert state["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16
    else:
        assert "model.diffusion_model.out.2.weight" in state and "config" in meta
    assert (run / "images" / "step-00000001.png").is_file()


def test_sdxl_config_buckets_and_micro_conditioning_from_the_data():
    cfg = load_config(CONFIGS / "sdxl.yaml", overrides=["data.params.root=pictures"])
    assert cfg.data.params.buckets.base == 1024 and cfg.data.params.buckets.step == 64
    assert cfg.data.params.micro_conditioning
    emb_models = cfg.model.params.conditioner_config.params.emb_models
    assert [e.input_key for e in emb_models[2:]] == ["original_size_as_tuple", "crop_coords_top_left",
                                                     "target_size_as_tuple"]
    assert not any(e.is_trainable for e in emb_models)  # the UNet only


def test_shrunk_sdxl_finetune_config_trains_one_step_from_an_sdxl_file(tmp_path):
    """configs/finetune/sdxl.yaml with the tiny SDXL-like networks, --init a tiny file in SDXL's layout, buckets
    of about 32x32 on pictures of mixed shapes: one step, and the export is an SDXL-layout file."""
    from ldm.cli.train import main
    from ldm.convert import load_model
    from tiny_models import tiny_sdxl_checkpoint, tiny_sdxl_config

    tiny = tiny_sdxl_config()["model"]["params"]
    for embedder in tiny["conditioner_config"]["params"]["emb_models"][:2]:
        embedder["ucg_rate"] = 0.1
    shrink = OmegaConf.create({
        "model": {"params": {"image_size": 8, "validation_prompts": ["a red circle"], "sample_steps": 2}},
        "data": {"params": {"buckets": {"base": 32, "step": 16}, "batch_size": 2, "num_workers": 0}},
        "lightning": SHRINK["lightning"]})
    overrides = tmp_path / "shrink.yaml"
    OmegaConf.save(shrink, overrides)
    base = OmegaConf.load(CONFIGS / "sdxl.yaml")
    for part in ("unet_config", "first_stage_config", "conditioner_config"):  # lists are not merged: replace
        base.model.params[part] = tiny[part]
    config = tmp_path / "sdxl.yaml"
    OmegaConf.save(base, config)
    root = tmp_path / "pictures"
    root.mkdir()
    for i, (width, height) in enumerate([(64, 40), (40, 64), (48, 48), (70, 36)]):
        Image.new("RGB", (width, height), (60 * i, 90, 30)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    xl = tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=2)
    run = tmp_path / "logs" / "run"
    assert main(["--base", str(config), str(overrides), f"data.params.root={root}", "--init", str(xl),
                 "--logdir", str(tmp_path / "logs"), "--name", "run"]) == 0
    state, meta = read_state_dict(run / "run.safetensors")
    assert "conditioner.embedders.1.model.text_projection" in state and "model.diffusion_model.label_emb.0.0.weight" in state
    model = load_model(None, run / "run.safetensors")
    assert type(model.conditioner.embedders[2]).__name__ == "ConcatTimestepEmbedderND"
