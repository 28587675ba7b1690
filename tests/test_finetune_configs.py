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
NAMES = ["sd15.yaml", "sd21.yaml", "sd15_lora.yaml"]

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


@pytest.mark.parametrize("name", NAMES)
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
