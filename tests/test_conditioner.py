"""The model owns its conditioning: the Conditioner's embedders (kinds, concatenation, CFG dropout, the
unconditional branch), the UNet's vector input (label_emb), models with a conditioner_config (layout, training,
export), SD 1/2 configs unchanged, and CFG over dict conditionings."""
from __future__ import annotations

import copy

import pytest
import torch

from ldm.convert import build_model, load_model
from ldm.config import ConfigError, instantiate_from_config
from ldm.diffusion.guidance import CFGDenoiser
from ldm.models.conditioner import ConcatTimestepEmbedderND, Conditioner, InpaintingConcat
from ldm.models.unet import UNetModel, timestep_embedding
from test_train_ldm import TINY_DATA, tiny_model_node, trainer
from tiny_models import tiny_config, tiny_model

TEXT = {"target": "ldm.models.conditioner.TextEmbedder",
        "params": {"arch": "ldm-tiny-text", "layer": "penultimate", "projection": True, "pooled": True}}
SIZE = {"target": "ldm.models.conditioner.ConcatTimestepEmbedderND", "params": {"outdim": 8}}


def text_embedder(**options):
    return {**copy.deepcopy(TEXT), "input_key": "txt", **options}


def size_embedder(key="original_size_as_tuple", **options):
    return {**copy.deepcopy(SIZE), "input_key": key, **options}


def batch(n=2):
    return {"txt": ["a red circle", "two blue squares", "a green star"][:n],
            "original_size_as_tuple": torch.tensor([[64, 64], [32, 48], [16, 16]])[:n]}


# ---- the conditioner ----------------------------------------------------------------------------------------------
def test_outputs_are_grouped_by_kind_and_concatenated():
    torch.manual_seed(0)
    cond = Conditioner([text_embedder(), size_embedder(), text_embedder(params={**TEXT["params"], "pooled": False}),
                        size_embedder("crop_coords_top_left")])
    out = cond(batch() | {"crop_coords_top_left": torch.tensor([[0, 0], [4, 8]])})
    assert set(out) == {"crossattn", "vector"}
    assert out["crossattn"].shape == (2, 77, 64)  # two text towers along the feature dim
    assert out["vector"].shape == (2, 32 + 2 * 8 + 2 * 8)  # pooled text, then the two size tuples
    text, pooled = cond.embedders[0](batch()["txt"])
    torch.testing.assert_close(out["crossattn"][..., :32], text)
    torch.testing.assert_close(out["vector"][:, :32], pooled)
    sizes = timestep_embedding(torch.tensor([64, 64, 32, 48]), 8).reshape(2, 16)
    torch.testing.assert_close(out["vector"][:, 32:48], sizes)
    torch.testing.assert_close(out["crossattn"][..., 32:], cond.embedders[2].encode(batch()["txt"]))
    assert cond.input_keys == ["txt", "original_size_as_tuple", "crop_coords_top_left"]


def test_pooled_vector_is_the_projected_end_of_text_token():
    torch.manual_seed(0)
    embedder = instantiate_from_config(TEXT)
    context, pooled = embedder(["a red circle"])
    torch.testing.assert_close(context, embedder.encode(["a red circle"]))  # the layer asked for, as before
    tokens = embedder.tokenize(["a red circle"])
    model = embedder.model
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks:  # open_clip's own blocks, every layer
        x = block(x, attn_mask=model.attn_mask) if getattr(model.transformer, "batch_first", False) else \
            block(x.transpose(0, 1), attn_mask=model.attn_mask).transpose(0, 1)
    expected = model.ln_final(x)[0, tokens[0].argmax()] @ model.text_projection
    torch.testing.assert_close(pooled[0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="projection=true"):
        instantiate_from_config({**TEXT, "params": {**TEXT["params"], "projection": False}})


def test_drop_replaces_text_with_its_value_and_zeroes_the_others_reproducibly():
    torch.manual_seed(0)
    cond = Conditioner([text_embedder(ucg_rate=0.5, legacy_ucg_value=""), size_embedder(ucg_rate=0.5)])
    n = 64
    prompts = [f"caption {i}" for i in range(n)]
    data = {"txt": prompts, "original_size_as_tuple": torch.full((n, 2), 64)}
    out = cond(data, generator=torch.Generator().manual_seed(3), drop=True)
    g = torch.Generator().manual_seed(3)
    text_drop, size_drop = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5  # one draw each
    reference = cond({"txt": ["" if d else p for p, d in zip(prompts, text_drop.tolist())],
                      "original_size_as_tuple": data["original_size_as_tuple"]})
    torch.testing.assert_close(out["crossattn"], reference["crossattn"])
    sizes = out["vector"][:, 32:]
    assert torch.equal(sizes[size_drop], torch.zeros_like(sizes[size_drop]))
    assert (sizes[~size_drop] != 0).any(dim=1).all() and 0 < int(size_drop.sum()) < n
    again = cond(data, generator=torch.Generator().manual_seed(3), drop=True)
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = cond(data, generator=torch.Generator().manual_seed(4), drop=True)
    assert not torch.equal(out["vector"], other["vector"])
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    cond(data, generator=g)  # no drop: no random numbers drawn
    assert torch.equal(g.get_state(), state)


def test_unconditional_zeroes_the_embedders_asked_for():
    torch.manual_seed(0)
    cond = Conditioner([text_embedder(), size_embedder()], zero_uncond=["txt"])
    negative = {**batch(), "txt": ["", "blurry"]}
    uc = cond.unconditional(negative)
    assert torch.equal(uc["crossattn"], torch.zeros(2, 77, 32)) and torch.equal(uc["vector"][:, :32], torch.zeros(2, 32))
    torch.testing.assert_close(uc["vector"][:, 32:], cond(batch())["vector"][:, 32:])  # sizes as for cond
    plain = Conditioner([text_embedder(), size_embedder()])
    torch.testing.assert_close(plain.unconditional(negative)["crossattn"], plain(negative)["crossattn"])


def test_zeroed_text_embedders_do_not_run_and_give_the_same_zeros():
    """The unconditional branch of an embedder the conditioner zeroes (SDXL's empty negative prompt) comes from the
    tokens' shapes (TextEmbedder.zero_output): the tower does not run, and the zeros are those running it gave."""
    torch.manual_seed(0)
    hidden = text_embedder()
    hidden["params"] = {**hidden["params"], "pooled": False}
    cond = Conditioner([hidden, text_embedder(), size_embedder()], zero_uncond=["txt"])
    calls = []
    for embedder in cond.embedders[:2]:
        embedder.model.token_embedding.register_forward_hook(lambda *args: calls.append(1))
    empty = {**batch(), "txt": ["", ""]}
    uc = cond.unconditional(empty, only_empty=True)
    assert calls == []
    ran = {kind: value.clone() for kind, value in cond(batch()).items()}  # the towers run for real prompts
    assert len(calls) == 2
    assert uc["crossattn"].shape == ran["crossattn"].shape == (2, 77, 64) and not uc["crossattn"].any()
    assert uc["vector"].shape == ran["vector"].shape and not uc["vector"][:, :32].any()
    torch.testing.assert_close(uc["vector"][:, 32:], ran["vector"][:, 32:])
    for embedder in cond.embedders[:2]:  # the same shapes as a real run of the empty prompts
        out = embedder(["", ""])
        zeros = embedder.zero_output(["", ""])
        for a, b in zip(out if isinstance(out, tuple) else (out,), zeros if isinstance(zeros, tuple) else (zeros,)):
            assert a.shape == b.shape and not b.any()


def test_frozen_and_trainable_embedders():
    cond = Conditioner([text_embedder()])
    assert not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.embedders[0].training  # frozen embedders stay in eval mode
    trainable = Conditioner([text_embedder(is_trainable=True, params={**TEXT["params"], "freeze": False})])
    assert any(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError, match="freeze=false"):
        Conditioner([text_embedder(is_trainable=True)])


@pytest.mark.parametrize("entries,kwargs,message", [
    ([{**SIZE}], {}, "exactly one of input_key"),
    ([{**SIZE, "input_key": "a", "input_keys": ["b"]}], {}, "exactly one of input_key"),
    ([size_embedder(ucg_rate=1.5)], {}, "ucg_rate=1.5 is out of range"),
    ([{**SIZE, "input_keys": ["a", "b"], "legacy_ucg_value": 0}], {}, "legacy_ucg_value replaces one input"),
    ([size_embedder()], {"zero_uncond": ["txt"]}, r"zero_uncond names \['txt'\]"),
    ([{**SIZE, "params": {"outdim": 0}, "input_key": "a"}], {}, "outdim=0"),
])
def test_bad_conditioner_configs_fail_in_one_line(entries, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Conditioner(entries, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_batches_name_the_problem():
    cond = Conditioner([size_embedder()])
    with pytest.raises(KeyError, match="no 'original_size_as_tuple' entry"):
        cond({"txt": ["a"]})
    two = Conditioner([size_embedder(), size_embedder("crop_coords_top_left")])
    with pytest.raises(ValueError, match="different batch sizes"):
        two({"original_size_as_tuple": torch.zeros(2, 2), "crop_coords_top_left": torch.zeros(3, 2)})


def test_inpainting_concat_is_mask_then_latents_at_latent_size():
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16] = 1
    latents = torch.randn(2, 4, 4, 4)
    cat = InpaintingConcat()(mask, latents)
    assert cat.shape == (2, 5, 4, 4)
    torch.testing.assert_close(cat[:, :1], torch.nn.functional.interpolate(mask, size=(4, 4), mode="nearest"))
    torch.testing.assert_close(cat[:, 1:], latents)
    with pytest.raises(ValueError, match=r"mask must be \[B, 1, H, W\]"):
        InpaintingConcat()(torch.ones(2, 32, 32), latents)
    assert ConcatTimestepEmbedderND(4)(torch.tensor([3.0, 5.0])).shape == (2, 4)  # [B] numbers too


# ---- the UNet's vector input ---------------------------------------------------------------------------------
def _unet(**kwargs):
    """A tiny UNet whose zero-initialised output convs are made random (so every input reaches the output)."""
    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16,
                     use_spatial_transformer=True, context_dim=32, legacy=False, **kwargs)
    for p in unet.parameters():
        if p.ndim >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return unet


def test_unet_takes_the_original_label_emb_vector_and_class_inputs():
    torch.manual_seed(0)
    unet = _unet(num_classes="sequential", adm_in_channels=48)
    names = {k for k in unet.state_dict() if k.startswith("label_emb.")}
    assert names == {"label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"}
    assert list(unet.state_dict()).index("label_emb.0.0.weight") < list(unet.state_dict()).index(
        "input_blocks.0.0.weight")  # the original order: time_embed, label_emb, input_blocks
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    y = torch.randn(2, 48)
    out = unet(x, t, ctx, y=y)
    assert not torch.allclose(out, unet(x, t, ctx, y=y + 1))  # y reaches the output
    with pytest.raises(ValueError, match="pass y"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="y has batch 1"):
        unet(x, t, ctx, y=y[:1])
    classes = _unet(num_classes=10)
    assert isinstance(classes.label_emb, torch.nn.Embedding) and classes.label_emb.num_embeddings == 10
    a, b = classes(x, t, ctx, y=torch.tensor([1, 2])), classes(x, t, ctx, y=torch.tensor([3, 2]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


# ---- models -----------------------------------------------------------------------------------------------------
def conditioner_params(**unet_extra):
    """model.params of a tiny model with a conditioner (pooled text -> vector) instead of cond_stage_config."""
    params = copy.deepcopy(tiny_model_node()["params"])
    del params["cond_stage_config"], params["cond_drop_rate"]
    params["conditioner_config"] = {"target": "ldm.models.conditioner.Conditioner",
                                    "params": {"emb_models": [text_embedder(ucg_rate=0.2, legacy_ucg_value="")]}}
    params["unet_config"]["params"].update(num_classes="sequential", adm_in_channels=32, **unet_extra)
    return params


def test_sd_configs_keep_their_layout_and_prompt_api():
    model = tiny_model()
    keys = set(model.state_dict())
    assert any(k.startswith("cond_stage_model.model.") for k in keys)
    assert not any(k.startswith("conditioner.") for k in keys)  # the conditioner adds no entries
    prompts = ["a red circle", ""]
    context = model.get_learned_conditioning(prompts)
    torch.testing.assert_close(context, model.cond_stage_model.encode(prompts), rtol=0, atol=0)
    assert set(model.get_learned_conditioning({"txt": prompts})) == {"crossattn"}
    inpaint = tiny_model(inpainting=True)
    assert inpaint.get_learned_conditioning(prompts).shape == context.shape  # prompts alone: the text part
    with pytest.raises(KeyError, match="'mask'"):
        inpaint.get_learned_conditioning({"txt": prompts})


def test_a_model_with_a_conditioner_config_is_stored_as_conditioner_embedders(tmp_path):
    node = {"target": "ldm.model.LatentDiffusion",
            "params": {k: v for k, v in conditioner_params().items()
                       if k not in ("use_ema", "ema_decay", "learning_rate", "cond_drop_rate",
                                    "validation_prompts", "sample_steps")}}
    model = build_model({"model": node})
    keys = set(model.state_dict())
    assert model.cond_stage_model is None and not any(k.startswith("cond_stage_model.") for k in keys)
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    cond = model.get_learned_conditioning({"txt": ["a red circle"]})
    assert cond["crossattn"].shape == (1, 77, 32) and cond["vector"].shape == (1, 32)
    assert model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([5]), cond).shape == (1, 4, 8, 8)
    with pytest.raises(ConfigError, match="not both"):
        build_model({"model": {**node, "params": {**node["params"],
                                                  "cond_stage_config": tiny_config()["model"]["params"][
                                                      "cond_stage_config"]}}})


def test_training_a_conditioner_model_and_loading_its_export(tmp_path):
    from ldm.training.callbacks import export_model

    module = instantiate_from_config({"target": "ldm.training.latent_diffusion.LatentDiffusionModule",
                                      "params": conditioner_params()}, "model")
    assert module.conditioner.specs[0].ucg_rate == 0.2
    data = instantiate_from_config(copy.deepcopy(TINY_DATA), "data")
    trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert module.sample_images(steps=1).shape == (2, 3, 32, 32)
    model = load_model(None, export_model(module, tmp_path / "c.safetensors"))  # strict
    assert any(k.startswith("conditioner.embedders.0.") for k in model.state_dict())
    with pytest.raises(ConfigError, match="ucg_rate"):
        instantiate_from_config({"target": "ldm.training.latent_diffusion.LatentDiffusionModule",
                                 "params": {**conditioner_params(), "cond_drop_rate": 0.1}}, "model")


def test_cfg_batches_dict_conditionings_of_every_kind():
    model = tiny_model(inpainting=True)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 32:] = 1
    inputs = {"txt": ["a red circle", "a blue square"], "mask": mask, "masked_image_latents": torch.randn(2, 4, 8, 8)}
    cond = model.get_learned_conditioning(inputs)
    uncond = model.get_unconditional_conditioning({**inputs, "txt": ["", ""]})
    assert set(cond) == set(uncond) == {"crossattn", "concat"}
    denoiser = model.denoiser()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0])
    guided = CFGDenoiser(denoiser, 3.0, uncond)(x, sigma, cond)
    u, c = denoiser(x, sigma, uncond), denoiser(x, sigma, cond)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)  # fp32 batching, x3


def test_conditioner_model_sampling_in_the_pipeline_uses_its_vector():
    from ldm.pipeline import Text2Image

    node = {"target": "ldm.model.LatentDiffusion",
            "params": {k: v for k, v in conditioner_params().items()
                       if k in ("unet_config", "first_stage_config", "conditioner_config", "image_size",
                                "channels")}}
    torch.manual_seed(0)
    model = build_model({"model": node})
    for p in model.model.diffusion_model.parameters():
        if p.ndim >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    pipe = Text2Image(model, device="cpu")
    a = pipe("a red circle", seeds=0, steps=2, sampler="Euler").images[0]
    with torch.no_grad():
        model.model.diffusion_model.label_emb[0][0].weight.mul_(3)
    b = pipe("a red circle", seeds=0, steps=2, sampler="Euler").images[0]
    assert a.tobytes() != b.tobytes()  # the pooled vector goes through label_emb into the images
