"""The full model's state dict is the Stable Diffusion layout: real v1/v2 files load strictly.

The full-size checks build the model on the meta device (no memory) and compare against the key/shape lists of
real checkpoints in ../shared/sd-layout. The tiny checks round-trip real tensors through files.
"""
from pathlib import Path

import pytest
import torch

from ldm.config import load_config
from ldm.convert import (build_model, infer_config, load_model, load_weights, normalize_state_dict,
                         to_hf_clip_text_state_dict)
from ldm.ema import EMA, ema_name
from ldm.io import CheckpointError, check_state_dict, read_state_dict, save_checkpoint
from sd_layout import read_layout
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _layout(name):
    """The tsv as a state dict of meta tensors (names, shapes and dtypes, no memory)."""
    return {k: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for k, (shape, dtype) in read_layout(name).items()}


def _meta_model(config_name):
    with torch.device("meta"):
        return build_model(load_config(ROOT / "configs" / "sd" / config_name))


@pytest.mark.parametrize("tsv,config", [("sd-v1.tsv", "v1-inference.yaml"), ("sd-v2.tsv", "v2-inference.yaml"),
                                        ("sd-v2.tsv", "v2-inference-v.yaml")])
@pytest.mark.parametrize("use_ema", [False, True])
def test_full_size_layout_is_strict(tsv, config, use_ema):
    ckpt = _layout(tsv)
    model_sd = _meta_model(config).state_dict()
    check_state_dict(model_sd, normalize_state_dict(ckpt, use_ema=use_ema))
    # pruned / ema-only files: no model_ema.* at all
    pruned = {k: v for k, v in ckpt.items() if not k.startswith("model_ema.")}
    check_state_dict(model_sd, normalize_state_dict(pruned, use_ema=use_ema))


def test_sd1_text_keys_without_text_model_level():
    ckpt = _layout("sd-v1.tsv")
    flat = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
            for k, v in ckpt.items()}
    check_state_dict(_meta_model("v1-inference.yaml").state_dict(), normalize_state_dict(flat))


def test_wrong_architecture_is_listed():
    with pytest.raises(CheckpointError, match=r"146 missing .*212 shape mismatch"):
        check_state_dict(_meta_model("v2-inference.yaml").state_dict(), normalize_state_dict(_layout("sd-v1.tsv")))


def test_extra_key_is_named():
    ckpt = _layout("sd-v1.tsv")
    ckpt["model.diffusion_model.something_new.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(model\.diffusion_model\.something_new\.weight\)"):
        check_state_dict(_meta_model("v1-inference.yaml").state_dict(), normalize_state_dict(ckpt))


# ---- tiny models, real tensors --------------------------------------------------------------------------

def _tiny_config(sd1_text: bool):
    """The shared tiny model with an SD1-style (transformers-named in files) or SD2-style text encoder."""
    cfg = tiny_config()
    cfg["model"]["params"]["cond_stage_config"]["params"] = (
        {"arch": "ldm-tiny-text", "layer": "last", "pad": "eot", "quick_gelu": True, "projection": False}
        if sd1_text else {"arch": "ldm-tiny-text", "layer": "penultimate", "pad": "zero", "projection": True})
    return cfg


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def _sd_file_layout(model, sd1_text: bool, ema: EMA | None = None):
    """What the original code would have written for this model."""
    sd = dict(model.state_dict())
    if sd1_text:
        text = {k[len("cond_stage_model."):]: sd.pop(k) for k in list(sd) if k.startswith("cond_stage_model.")}
        for k, v in to_hf_clip_text_state_dict(text).items():
            sd["cond_stage_model.transformer." + k] = v
    if ema is not None:
        sd.update({"model_ema." + k: v for k, v in ema.state_dict().items()})
    return sd


@pytest.mark.parametrize("sd1_text", [True, False])
def test_tiny_round_trip_bit_exact(tmp_path, sd1_text):
    cfg = _tiny_config(sd1_text)
    model = _randomize(build_model(cfg))
    path = save_checkpoint(_sd_file_layout(model, sd1_text), tmp_path / "m.safetensors", config=cfg)
    loaded = load_model(None, path)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    prompts = ["a red circle", ""]
    torch.testing.assert_close(loaded.get_learned_conditioning(prompts), model.get_learned_conditioning(prompts),
                               rtol=0, atol=0)


def test_tiny_ema_choice(tmp_path):
    cfg = _tiny_config(True)
    model = _randomize(build_model(cfg))
    ema = EMA(model.model)
    with torch.no_grad():
        for name in ema.m_name2s_name.values():
            getattr(ema, name).add_(1.0)
    path = save_checkpoint(_sd_file_layout(model, True, ema), tmp_path / "full.ckpt", config=cfg)
    plain = load_model(None, path, use_ema=False)
    with_ema = load_model(None, path, use_ema=True)
    k = "model.diffusion_model.out.2.bias"
    assert torch.equal(plain.state_dict()[k], model.state_dict()[k])
    assert torch.equal(with_ema.state_dict()[k], getattr(ema, ema_name(k[len("model."):])))
    # the non-UNet weights do not depend on the choice
    k2 = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(plain.state_dict()[k2], with_ema.state_dict()[k2])


def test_strict_failure_and_non_strict(tmp_path):
    cfg = _tiny_config(False)
    model = _randomize(build_model(cfg))
    sd = dict(model.state_dict())
    sd.pop("model.diffusion_model.out.2.weight")
    sd["model.diffusion_model.bogus"] = torch.zeros(1)
    path = save_checkpoint(sd, tmp_path / "broken.safetensors", config=cfg)
    with pytest.raises(CheckpointError, match=r"1 missing \(model\.diffusion_model\.out\.2\.weight\); "
                                              r"1 unexpected \(model\.diffusion_model\.bogus\)"):
        load_model(None, path)
    loaded = load_model(None, path, strict=False)
    assert torch.equal(loaded.state_dict()["model.diffusion_model.out.0.weight"], sd["model.diffusion_model.out.0.weight"])


def test_fp16_file_loads_into_fp32_model(tmp_path):
    cfg = _tiny_config(False)
    model = _randomize(build_model(cfg))
    path = save_checkpoint(model.state_dict(), tmp_path / "half.safetensors", config=cfg, dtype=torch.float16)
    sd, _ = read_state_dict(path)
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    loaded = load_model(None, path)
    assert loaded.state_dict()["model.diffusion_model.out.2.weight"].dtype == torch.float32


def test_load_weights_rejects_other_architecture():
    small = build_model(_tiny_config(False))
    other = _tiny_config(False)
    other["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(small, build_model(other).state_dict())


# ---- SDXL: base and refiner ------------------------------------------------------------------------------

SDXL = [("sdxl-base.tsv", "sdxl-base.yaml"), ("sdxl-refiner.tsv", "sdxl-refiner.yaml")]


@pytest.mark.parametrize("tsv,config", SDXL)
def test_sdxl_full_size_layout_is_strict(tsv, config):
    ckpt = _layout(tsv)
    model_sd = _meta_model(config).state_dict()
    check_state_dict(model_sd, normalize_state_dict(ckpt))
    assert not any(k in model_sd for k in ("alphas_cumprod", "betas"))  # sgm files have no schedule buffers
    # files written by newer transformers versions lack embeddings.position_ids
    without = {k: v for k, v in ckpt.items() if not k.endswith("embeddings.position_ids")}
    check_state_dict(model_sd, normalize_state_dict(without))
    # text_projection and logit_scale belong to the bigG tower
    bigg = "conditioner.embedders.1.model." if "base" in tsv else "conditioner.embedders.0.model."
    assert {bigg + "text_projection", bigg + "logit_scale"} <= set(model_sd)
    missing = {k: v for k, v in ckpt.items() if k != bigg + "text_projection"}
    with pytest.raises(CheckpointError, match=r"1 missing \(" + bigg.replace(".", r"\.") + "text_projection"):
        check_state_dict(model_sd, normalize_state_dict(missing))


def test_sdxl_base_is_not_the_refiner():
    with pytest.raises(CheckpointError, match="missing"):
        check_state_dict(_meta_model("sdxl-refiner.yaml").state_dict(), normalize_state_dict(_layout("sdxl-base.tsv")))


def test_sdxl_transformer_depth_per_level_and_override():
    cfg = load_config(ROOT / "configs" / "sd" / "sdxl-base.yaml",
                      overrides=["model.params.unet_config.params.transformer_depth=[1,2,2]"])
    assert list(cfg.model.params.unet_config.params.transformer_depth) == [1, 2, 2]
    with torch.device("meta"):
        model = build_model(cfg)
    unet = model.model.diffusion_model
    assert unet.transformer_depth == [1, 2, 2]
    depth = {}
    for k in unet.state_dict():
        if ".transformer_blocks." in k:
            prefix, rest = k.split(".transformer_blocks.")
            depth[prefix] = max(depth.get(prefix, 0), int(rest.split(".")[0]) + 1)
    assert depth["input_blocks.4.1"] == 2 and depth["input_blocks.7.1"] == 2 and depth["middle_block.1"] == 2
    assert not any(k.startswith("input_blocks.1.1") for k in unet.state_dict())  # no attention at level 0


@pytest.mark.parametrize("tsv,config", SDXL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdxl_architecture_is_inferred_from_the_tensors(tsv, config, dtype):
    ckpt = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _layout(tsv).items()}
    cfg = infer_config(ckpt, {}, source=tsv)
    assert cfg == load_config(ROOT / "configs" / "sd" / config)
    assert cfg.model.params.scale_factor == 0.13025


def test_sdxl_inference_names_a_mismatch():
    ckpt = _layout("sdxl-base.tsv")
    ckpt["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2560, device="meta")
    with pytest.raises(CheckpointError, match=r"label_emb\.0\.0\.weight has width \(2560,\), not 2816"):
        infer_config(ckpt, {}, source="x")
    odd = {k.replace("conditioner.embedders.1.", "conditioner.embedders.2."): v
           for k, v in _layout("sdxl-base.tsv").items()}
    with pytest.raises(CheckpointError, match="neither SDXL base's"):
        infer_config(odd, {}, source="x")


# ---- exports write the released layout -------------------------------------------------------------------

@pytest.mark.parametrize("tsv,config", [("sd-v1.tsv", "v1-inference.yaml"), ("sd-v2.tsv", "v2-inference-v.yaml"),
                                        *SDXL])
def test_export_writes_every_key_and_shape_of_the_released_files(tsv, config):
    from ldm.training.latent_diffusion import export_state_dict

    model_sd = _meta_model(config).state_dict()
    exported = export_state_dict(model_sd)
    expected = {k: row for k, row in read_layout(tsv).items() if not k.startswith("model_ema.")}
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in exported.items()} == expected
    check_state_dict(model_sd, normalize_state_dict(exported))  # and back, strictly


@pytest.mark.parametrize("sd1_text", [True, False])
def test_tiny_export_is_the_sd_file_layout(tmp_path, sd1_text):
    from ldm.training.latent_diffusion import export_state_dict

    cfg = _tiny_config(sd1_text)
    model = _randomize(build_model(cfg))
    exported, reference = export_state_dict(model.state_dict()), _sd_file_layout(model, sd1_text)
    assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in exported)
    loaded = load_model(None, save_checkpoint(exported, tmp_path / "m.safetensors", config=cfg))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
