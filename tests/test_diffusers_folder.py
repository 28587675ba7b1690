"""ldm.convert.diffusers_folder: a tiny model written as a diffusers folder loads offline in diffusers'
StableDiffusionPipeline and gives the same UNet, text encoder, tokenizer and VAE outputs."""
import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402

from ldm.convert import build_model  # noqa: E402
from ldm.convert.diffusers_folder import export_diffusers  # noqa: E402
from tiny_models import _liven_output, tiny_config, tiny_model  # noqa: E402

PROMPTS = ["a red circle", "", "two blue squares above a green star"]


def _model(config):
    torch.manual_seed(0)
    model = build_model(config)
    _liven_output(model)
    model.config = config
    return model.eval().requires_grad_(False)


def _sd1_like_config(parameterization="eps"):
    """SD1's text options on the tiny tower: last layer... made penultimate, padded with end-of-text, QuickGELU."""
    config = copy.deepcopy(tiny_config(parameterization))
    config["model"]["params"]["cond_stage_config"]["params"].update(layer="penultimate", pad="eot", quick_gelu=True)
    return config


@pytest.mark.parametrize("config", [tiny_config(), _sd1_like_config("v")], ids=["sd2-like", "sd1-like-v"])
def test_exported_folder_loads_offline_and_matches(tmp_path, config):
    model = _model(config)
    folder = export_diffusers(model, tmp_path / "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    encoder = model.cond_stage_model
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, encoder.tokenize(PROMPTS))
    context = model.get_learned_conditioning(PROMPTS)
    torch.testing.assert_close(pipe.text_encoder(ids)[0], context)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample,
                               model.apply_model(x, t, {"crossattn": context}), atol=1e-4, rtol=1e-4)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample,
                               model.decode_first_stage(z), atol=1e-4, rtol=1e-4)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    expected = "v_prediction" if config["model"]["params"]["parameterization"] == "v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), model.alphas_cumprod.double(),
                               atol=1e-6, rtol=1e-6)


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = _model(tiny_config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(FileExistsError, match="not empty"):
        export_diffusers(model, tmp_path / "full")
    with pytest.raises(ValueError, match="inpainting"):
        export_diffusers(_model(tiny_config(inpainting=True)), tmp_path / "inpaint")
    bare = tiny_model()
    with pytest.raises(ValueError, match="load_model"):
        export_diffusers(bare, tmp_path / "bare")


@pytest.mark.parametrize("config_name, layers", [("v1-inference.yaml", 12), ("v2-inference-v.yaml", 23)])
def test_full_size_sd_models_convert_strictly_on_the_meta_device(config_name, layers):
    """Every weight of a real SD 1.x / 2.x model has its place in diffusers' layout (strict loads, no memory)."""
    from pathlib import Path

    from ldm.config import load_config
    from ldm.convert.diffusers_folder import diffusers_modules

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "sd" / config_name)
    with torch.device("meta"):
        model = build_model(config)
    from omegaconf import OmegaConf
    model.config = OmegaConf.to_container(config, resolve=True)
    unet, vae, text_encoder = diffusers_modules(model)
    assert unet.config.cross_attention_dim == (768 if layers == 12 else 1024)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in model.model.parameters())
    assert text_encoder.config.num_hidden_layers == layers  # SD2 runs the penultimate block: 23 of 24
    assert vae.config.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("config", [tiny_config(), _sd1_like_config("v")], ids=["sd2-like", "sd1-like-v"])
def test_import_gives_back_the_exported_model(tmp_path, config):
    from ldm.convert.diffusers_folder import import_diffusers

    model = _model(config)
    back = import_diffusers(export_diffusers(model, tmp_path / "diffusers"))
    text = back.config["model"]["params"]["cond_stage_config"]["params"]
    original = config["model"]["params"]["cond_stage_config"]["params"]
    assert (text["arch"], text["layer"], text["pad"]) == (original["arch"], original["layer"], original["pad"])
    assert back.parameterization == model.parameterization and back.scale_factor == pytest.approx(0.18215)
    theirs, ours = back.state_dict(), model.state_dict()
    extra = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    if original["layer"] == "penultimate":  # read as SD2, whose files carry the projection (never run): zeros
        assert set(theirs) - set(ours) == extra and not any(theirs[k].any() for k in extra)
    else:
        assert set(theirs) == set(ours)
    skipped = "cond_stage_model.model.transformer.resblocks.1."  # penultimate: the block never run is zero
    for key, value in ours.items():
        if key.startswith(skipped) and original["layer"] == "penultimate":
            assert not theirs[key].any()
        else:
            assert torch.equal(theirs[key], value), key
    torch.testing.assert_close(back.get_learned_conditioning(PROMPTS), model.get_learned_conditioning(PROMPTS))


def test_import_reads_safetensors_only_never_a_pickle(tmp_path):
    """A folder someone else made: a UNet stored only as a pickle (.bin) is refused, torch.load never sees it."""
    from safetensors.torch import load_file

    from ldm.convert.diffusers_folder import import_diffusers

    folder = export_diffusers(_model(_sd1_like_config()), tmp_path / "diffusers")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        import_diffusers(folder)


def test_import_refuses_a_folder_without_model_index(tmp_path):
    from ldm.convert.diffusers_folder import import_diffusers

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        import_diffusers(tmp_path)


def test_sample_py_runs_a_diffusers_folder_like_the_checkpoint(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ldm.cli import sample as cli
    from ldm.io import save_checkpoint

    config = tiny_config()
    model = _model(config)
    ckpt = save_checkpoint(model.state_dict(), tmp_path / "tiny.safetensors", config=config)
    folder = export_diffusers(model, tmp_path / "tiny-diffusers")
    fast = ["--steps", "2", "--H", "32", "--W", "32", "--device", "cpu", "--n_samples", "1", "--skip_grid",
            "--prompt", "a (red:1.2) circle"]
    for source, out in ((ckpt, "from-file"), (folder, "from-folder")):
        assert cli.main([str(a) for a in ["--ckpt", source, "--outdir", tmp_path / out, *fast]]) == 0
    a, b = (np.asarray(Image.open(tmp_path / out / "samples" / "00000.png")) for out in ("from-file", "from-folder"))
    assert np.array_equal(a, b)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--ckpt", str(empty), *fast]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_export_command(tmp_path, capsys):
    from ldm.cli import export
    from ldm.io import save_checkpoint

    config = tiny_config()
    ckpt = save_checkpoint(_model(config).state_dict(), tmp_path / "tiny.safetensors", config=config)
    assert export.main(["--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file() and "done:" in capsys.readouterr().out
    assert export.main(["--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export.main(["--ckpt", str(tmp_path / "missing.safetensors"), "--diffusers", str(tmp_path / "x")]) == 2


def test_a_unet_diffusers_cannot_hold_is_refused_not_cut(tmp_path):
    config = tiny_config()
    config["model"]["params"]["unet_config"]["params"]["position_embedding"] = True  # the demo model's extra
    with pytest.raises(ValueError, match="no place for 2 weights.*pos_embed"):
        export_diffusers(_model(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_diffusers_ddim_on_the_exported_folder_gives_our_image(tmp_path):
    import numpy as np
    from diffusers import DDIMScheduler

    from ldm.pipeline import Text2Image

    ours = Text2Image(_model(tiny_config()), device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(export_diffusers(ours.model, tmp_path / "d"), local_files_only=True)
    assert pipe.scheduler.config.clip_sample is False
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompt, size = "two red circles above a blue square", dict(height=32, width=32)
    a = ours(prompt, seeds=7, steps=5, sampler="DDIM", guidance_scale=5.0, **size).images[0]
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))  # our per-image CPU noise
    b = pipe(prompt, latents=latents, num_inference_steps=5, guidance_scale=5.0, eta=0.0, **size).images[0]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
