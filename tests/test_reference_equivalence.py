"""Our modules against independent reference implementations, on the same random weights, in fp32.

References (optional, skipped when absent; never project dependencies): diffusers (UNet2DConditionModel,
AutoencoderKL and its single-file functions that map SD-layout checkpoints to diffusers names), transformers
(CLIPTextModel, CLIPTokenizer: SD1's text encoder, and diffusers' way of running SD2's) and open_clip.

Each check randomises every weight (non-zero everywhere, including the zero-initialised output convs, so every
path matters), hands the SAME SD-layout tensors to the reference through the reference library's own conversion
function, runs both on the same inputs and compares to 1e-5 of the output's scale. Full-size SD v1/v2 models are
``slow`` (``python -m pytest -m slow tests/test_reference_equivalence.py``).
"""
from __future__ import annotations

import copy
import gzip
import math
from pathlib import Path

import open_clip
import pytest
import torch

from ldm.config import instantiate_from_config, load_config, to_plain
from ldm.convert import build_model, load_weights, normalize_state_dict
from ldm.convert import to_hf_clip_text_state_dict
from ldm.models.text_encoder import OpenCLIPTextEncoder

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sd"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
TOL = 1e-5
PROMPTS = ["a photo of a cat", "A  Red SQUARE, left of a blue circle!!", "naïve café 123 don't", ""]
LONG_PROMPT = " ".join(["a small green triangle above a large red square"] * 12)  # > 75 tokens: truncated


# --------------------------------------------------------------------------------------------------- helpers

def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and non-zero: matrices/kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2). Activations keep their scale through deep stacks, so 1e-5 stays meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(generator=g)
            if p.dim() >= 2:
                p.mul_(1 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.mul_(0.1).add_(1.0)
            else:
                p.mul_(0.1)
    return module


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    """max |ours - ref| <= tol * max |ref| (and the shapes agree)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: the reference output is all zeros, the comparison would prove nothing"
    err = (ours - ref).abs().max().item() / scale
    assert err <= tol, f"{what}: max |ours - reference| / max |reference| = {err:.2e} > {tol:.0e}"


def _norm_eps(module: torch.nn.Module) -> dict:
    """{fingerprint of the (random) scale: (layer name, eps)} of every GroupNorm/LayerNorm."""
    layers = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            fingerprint = (tuple(m.weight.shape), tuple(m.weight.detach().flatten()[:8].tolist()))
            layers[fingerprint] = (name, m.eps)
    return layers


def assert_norm_eps_match(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Each of the reference's norm layers has ours (found by its random scale) with the same eps.

    The outputs cannot show this: with activations of unit scale, eps 1e-5 vs 1e-6 moves them by ~1e-6.
    """
    ours_layers, ref_layers = _norm_eps(ours), _norm_eps(ref)
    assert ref_layers, "the reference has no norm layers: nothing to compare"
    unmatched = [name for fp, (name, _) in ref_layers.items() if fp not in ours_layers]
    assert not unmatched, f"reference norm layers without a counterpart here: {unmatched[:5]}"
    wrong = [f"{ours_layers[fp][0]} eps {ours_layers[fp][1]:g} vs reference {name} {eps:g}"
             for fp, (name, eps) in ref_layers.items() if ours_layers[fp][1] != eps]
    assert not wrong, f"{len(wrong)} norm layers with the wrong eps: {'; '.join(wrong[:3])}"


def load_reference(factory, state_dict: dict, allowed_unexpected=(), meta: bool = True) -> torch.nn.Module:
    """Build a reference model (on the meta device unless ``meta=False``) and adopt ``state_dict``'s tensors.

    Every parameter and persistent buffer must come from ``state_dict``; keys it has beyond the model's must be
    listed in ``allowed_unexpected``. Tensors are adopted, not copied (full-size models fit twice in memory).
    """
    with torch.device("meta" if meta else "cpu"):
        model = factory()
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - set(allowed_unexpected))
    assert not missing and not unexpected, f"reference load: missing {missing[:5]}, unexpected {unexpected[:5]}"
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not still_meta, f"reference tensors not in the state dict: {still_meta[:5]}"
    return model.eval()


def sd_config(name: str, unet: dict | None = None, vae: dict | None = None, text: dict | None = None) -> dict:
    """configs/sd/<name> as a plain dict, with parameter overrides for the UNet, the VAE ddconfig, the text."""
    cfg = to_plain(load_config(CONFIGS / name))
    params = cfg["model"]["params"]
    params["unet_config"]["params"].update(unet or {})
    params["first_stage_config"]["params"]["ddconfig"].update(vae or {})
    params["cond_stage_config"]["params"].update(text or {})
    return cfg


# Reduced widths, the structure of SD: channel_mult [1, 2, 4, 4], attention at [4, 2, 1], 2 res blocks per level;
# v1: 8 heads per level; v2: num_head_channels 64, i.e. 1, 2, 4, 4 heads.
CONTEXT_DIM = 128
SMALL_UNET = {"model_channels": 64, "context_dim": CONTEXT_DIM}
SMALL_VAE = {"ch": 32}
SMALL_TEXT = {"arch": "ldm-small-text"}  # width 128, 4 heads, 4 blocks, CLIP's vocabulary and 77 positions


def unet_inputs(context_dim: int, size: int, float_t: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([17.25, 803.5]) if float_t else torch.tensor([0, 999])
    context = torch.randn(2, 77, context_dim, generator=g)
    return x, t, context


# ------------------------------------------------------------------------------------------------------ UNet

def reference_unet(cfg: dict, unet_sd: dict):
    """diffusers' UNet2DConditionModel from an SD-layout UNet state dict, by diffusers' single-file functions."""
    ckpt = {UNET_PREFIX + k: v for k, v in unet_sd.items()}
    config = single_file.create_unet_diffusers_config_from_ldm(cfg, ckpt)
    converted = single_file.convert_ldm_unet_checkpoint(ckpt, config)
    return load_reference(lambda: diffusers.UNet2DConditionModel(**config), converted)


def build_unet(cfg: dict):
    return randomize_(instantiate_from_config(cfg["model"]["params"]["unet_config"])).eval()


def compare_unet(cfg: dict, size: int) -> None:
    ours = build_unet(cfg)
    ref = reference_unet(cfg, ours.state_dict())
    assert_norm_eps_match(ours, ref)
    context_dim = cfg["model"]["params"]["unet_config"]["params"]["context_dim"]
    with torch.no_grad():
        for float_t in (False, True):
            x, t, context = unet_inputs(context_dim, size, float_t)
            assert_matches(ours(x, t, context=context), ref(x, t, encoder_hidden_states=context).sample,
                           f"UNet (timesteps {t.tolist()})")


@pytest.fixture(scope="module")
def small_v1_unet_pair():
    cfg = sd_config("v1-inference.yaml", unet=SMALL_UNET)
    ours = build_unet(cfg)
    return cfg, ours, reference_unet(cfg, ours.state_dict())


@pytest.mark.parametrize("backend,slice_size", [("sdpa", None), ("math", None), ("sdpa", 48)])
def test_small_v1_unet_matches_diffusers(small_v1_unet_pair, backend, slice_size):
    """Integer and fractional timesteps; every attention backend the CPU has, and query slicing."""
    cfg, ours, ref = small_v1_unet_pair
    assert_norm_eps_match(ours, ref)
    ours.set_attention_backend(backend, slice_size)
    with torch.no_grad():
        for float_t in (False, True):
            x, t, context = unet_inputs(CONTEXT_DIM, 16, float_t)
            assert_matches(ours(x, t, context=context), ref(x, t, encoder_hidden_states=context).sample,
                           f"SD v1 UNet ({backend}, slice {slice_size}, timesteps {t.tolist()})")


def test_comparison_sees_one_changed_weight(small_v1_unet_pair):
    """The check is sensitive: the deepest cross-attention with its heads merged into one is caught."""
    cfg, ours, ref = small_v1_unet_pair
    ours = copy.deepcopy(ours)
    attn = ours.middle_block[1].transformer_blocks[0].attn2
    attn.heads, attn.dim_head = 1, attn.heads * attn.dim_head
    with torch.no_grad():
        x, t, context = unet_inputs(CONTEXT_DIM, 16)
        with pytest.raises(AssertionError, match="max \\|ours - reference\\|"):
            assert_matches(ours(x, t, context=context), ref(x, t, encoder_hidden_states=context).sample, "UNet")


def test_small_v2_unet_matches_diffusers():
    """Linear proj_in/proj_out, heads from num_head_channels=64 (1, 2, 4, 4 heads)."""
    compare_unet(sd_config("v2-inference.yaml", unet=SMALL_UNET), size=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference.yaml"])
def test_full_size_unet_matches_diffusers(name):
    compare_unet(sd_config(name), size=32)


# ------------------------------------------------------------------------------------------------------- VAE

def reference_vae(cfg: dict, vae_sd: dict):
    ckpt = {VAE_PREFIX + k: v for k, v in vae_sd.items()}
    config = single_file.create_vae_diffusers_config_from_ldm(cfg, ckpt)
    converted = single_file.convert_ldm_vae_checkpoint(ckpt, config)
    return load_reference(lambda: diffusers.AutoencoderKL(**config), converted)


def compare_vae(cfg: dict, image_size: int) -> None:
    ours = randomize_(instantiate_from_config(cfg["model"]["params"]["first_stage_config"])).eval()
    ref = reference_vae(cfg, ours.state_dict())
    assert_norm_eps_match(ours, ref)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, image_size, image_size, generator=g) * 2 - 1
    with torch.no_grad():
        posterior, ref_posterior = ours.encode(x), ref.encode(x).latent_dist
        assert_matches(posterior.mean, ref_posterior.mean, "VAE encode mean")
        assert_matches(posterior.logvar, ref_posterior.logvar, "VAE encode logvar")
        z = torch.randn(posterior.mean.shape, generator=g)
        assert_matches(ours.decode(z), ref.decode(z).sample, "VAE decode")


def test_small_vae_matches_diffusers():
    compare_vae(sd_config("v1-inference.yaml", vae=SMALL_VAE), image_size=64)


@pytest.mark.slow
def test_full_size_vae_matches_diffusers():
    compare_vae(sd_config("v1-inference.yaml"), image_size=128)


# ------------------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' CLIPTokenizer over OpenAI's BPE vocabulary (the file open_clip ships; no download).

    vocab.json / merges.txt of openai/clip-vit-large-patch14 are this file's merges and the vocabulary CLIP
    derives from it: the 256 byte symbols, the same with "</w>", one entry per merge, then the two specials.
    This (fast) tokenizer skips ftfy and HTML unescaping, which open_clip and the original SD1 tokenizer (the
    slow CLIPTokenizer with ftfy) apply: "&amp;", curly quotes or full-width letters tokenize differently, so
    the prompts here avoid them.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    return transformers.CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges)


def test_tokenizer_known_ids():
    enc = OpenCLIPTextEncoder("ldm-tiny-text", layer="last", pad="eot", quick_gelu=True, projection=False)
    ids = enc.tokenize(["a photo of a cat"])[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]  # OpenAI CLIP's ids
    assert ids.shape == (77,) and (ids[6:] == 49407).all()


def test_sd1_tokens_match_transformers_clip_tokenizer(hf_tokenizer):
    enc = OpenCLIPTextEncoder("ldm-tiny-text", layer="last", pad="eot", quick_gelu=True, projection=False)
    prompts = PROMPTS + [LONG_PROMPT]
    ref = hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(enc.tokenize(prompts), ref.input_ids)


def test_sd2_tokens_match_open_clip_tokenize():
    enc = OpenCLIPTextEncoder("ldm-tiny-text", layer="penultimate", pad="zero")
    prompts = PROMPTS + [LONG_PROMPT]
    assert torch.equal(enc.tokenize(prompts), open_clip.tokenize(prompts))


# ----------------------------------------------------------------------------------------------------- text

def hf_text_config(enc: OpenCLIPTextEncoder, layers: int, act: str) -> "transformers.CLIPTextConfig":
    tower = enc.model
    return transformers.CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=enc.width,
        intermediate_size=tower.transformer.resblocks[0].mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=tower.heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5)


def reference_text_model(config, converted: dict) -> torch.nn.Module:
    """transformers' CLIPTextModel holding diffusers-converted (``text_model.*``) weights.

    transformers >= 5.6 flattened CLIPTextModel (no ``text_model`` level); diffusers' own loader
    (create_diffusers_clip_model_from_ldm) then drops the prefix, and so do we.
    """
    def factory():
        return transformers.CLIPTextModel(config)

    with torch.device("meta"):
        flat = not hasattr(factory(), "text_model")
    if flat:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    position_ids = "embeddings.position_ids" if flat else "text_model.embeddings.position_ids"
    return load_reference(factory, converted, allowed_unexpected=[position_ids], meta=False)


def sd1_text_pair(arch: str, layer: str | int = "last"):
    """Random SD1-layout text weights (``cond_stage_model.transformer.text_model.*``) in both loaders."""
    ours = OpenCLIPTextEncoder(arch, layer=layer, pad="eot", quick_gelu=True, projection=False)
    config = hf_text_config(ours, ours.num_layers, "quick_gelu")
    source = randomize_(transformers.CLIPTextModel(config)).state_dict()
    ckpt = {SD1_TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in source.items()
            if not k.endswith("position_ids")}
    ckpt[SD1_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # as SD1 files
    # ours: the project's checkpoint path (transformers names -> the OpenCLIP tower)
    mapped = normalize_state_dict(ckpt)
    ours.load_state_dict({k.removeprefix("cond_stage_model."): v for k, v in mapped.items()}, strict=True)
    # reference: diffusers' SD1 text conversion into transformers' CLIPTextModel
    return ours, reference_text_model(config, single_file.convert_ldm_clip_checkpoint(ckpt))


def compare_sd1_text(arch: str, hf_tokenizer, layer: str | int = "last") -> None:
    """``layer=-2`` is "clip skip 2": diffusers' ``clip_skip=1``, the penultimate hidden state + final norm."""
    ours, ref = sd1_text_pair(arch, layer)
    assert_norm_eps_match(ours, ref)
    prompts = PROMPTS + [LONG_PROMPT]
    tokens = hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=tokens.input_ids, output_hidden_states=True)
        if layer == "last":
            expected = out.last_hidden_state
        else:
            expected = getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[layer])
        assert_matches(ours.encode(prompts), expected, f"SD1 text encoder ({arch}, layer {layer})")


def sd2_text_pair(arch: str):
    """Random SD2-layout text weights (``cond_stage_model.model.*``, open_clip names) and diffusers' SD2 runner:
    transformers' CLIPTextModel (GELU) without the last block, whose final layer norm gives SD2's output."""
    ours = randomize_(OpenCLIPTextEncoder(arch, layer="penultimate", pad="zero", projection=True))
    ckpt = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    converted = single_file.convert_open_clip_checkpoint(None, ckpt)
    # diffusers drops ViT-H's last block (23) itself; for other depths drop the last block the same way
    last = f"text_model.encoder.layers.{ours.num_layers - 1}."
    converted = {k: v for k, v in converted.items() if not k.startswith(last)}
    return ours, reference_text_model(hf_text_config(ours, ours.num_layers - 1, "gelu"), converted), ckpt


def open_clip_sd2_embedding(arch: str, ckpt: dict, prompts: list[str]) -> torch.Tensor:
    """What SD2's FrozenOpenCLIPEmbedder computes, on open_clip's own CLIP model and tokenizer: all blocks but the
    last, then ln_final."""
    from ldm.models.text_encoder import register_text_archs

    register_text_archs()  # the project's small architectures, by name (not only when another test did it first)
    model = open_clip.create_model(arch, pretrained=None)
    del model.visual
    model.load_state_dict({k.removeprefix(SD2_TEXT_PREFIX): v for k, v in ckpt.items()}, strict=True)
    model.eval()
    x = model.token_embedding(open_clip.tokenize(prompts)) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    x = x if batch_first else x.transpose(0, 1)
    return model.ln_final(x)


def compare_sd2_text(arch: str) -> None:
    ours, ref, ckpt = sd2_text_pair(arch)
    assert_norm_eps_match(ours, ref)
    prompts = PROMPTS + [LONG_PROMPT]
    with torch.no_grad():
        out = ours.encode(prompts)
        assert_matches(out, ref(input_ids=ours.tokenize(prompts)).last_hidden_state,
                       f"SD2 text encoder ({arch}) vs transformers")
        assert_matches(out, open_clip_sd2_embedding(arch, ckpt, prompts), f"SD2 text encoder ({arch}) vs open_clip")


@pytest.mark.parametrize("layer", ["last", -2])
def test_small_sd1_text_matches_transformers(hf_tokenizer, layer):
    compare_sd1_text("ldm-small-text", hf_tokenizer, layer)


def test_small_sd2_text_matches_transformers_and_open_clip():
    compare_sd2_text("ldm-small-text")


@pytest.mark.slow
def test_full_size_sd1_text_matches_transformers(hf_tokenizer):
    compare_sd1_text("ViT-L-14", hf_tokenizer)


@pytest.mark.slow
def test_full_size_sd2_text_matches_transformers_and_open_clip():
    compare_sd2_text("ViT-H-14")


# ------------------------------------------------------------------------------- the full model, as a file

def sd_file_layout(model) -> dict:
    """The state dict an SD file of ``model`` has: ours, except SD1's text encoder in transformers names."""
    sd = dict(model.state_dict())
    if model.cond_stage_model.pad == "eot":  # SD1
        text = {k.removeprefix("cond_stage_model."): sd.pop(k) for k in list(sd) if k.startswith("cond_stage_")}
        sd.update({SD1_TEXT_PREFIX + k: v for k, v in to_hf_clip_text_state_dict(text).items()})
    return sd


@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference.yaml"])
def test_small_full_model_from_sd_layout_matches_references(name, hf_tokenizer):
    """A random SD-layout checkpoint at reduced width, loaded by ldm.convert and by diffusers' functions."""
    cfg = sd_config(name, unet=SMALL_UNET, vae=SMALL_VAE, text=SMALL_TEXT)
    ckpt = sd_file_layout(randomize_(build_model(cfg)))
    model = build_model(cfg)
    load_weights(model, ckpt, strict=True)
    model.eval()

    unet = reference_unet(cfg, {k.removeprefix(UNET_PREFIX): v for k, v in ckpt.items() if k.startswith(UNET_PREFIX)})
    vae = reference_vae(cfg, {k.removeprefix(VAE_PREFIX): v for k, v in ckpt.items() if k.startswith(VAE_PREFIX)})
    scale = cfg["model"]["params"]["scale_factor"]
    assert vae.config.scaling_factor == scale
    x, t, _ = unet_inputs(CONTEXT_DIM, 16)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS[:2])
        if name.startswith("v1"):
            encoder = model.cond_stage_model
            text = reference_text_model(hf_text_config(encoder, encoder.num_layers, "quick_gelu"),
                                        single_file.convert_ldm_clip_checkpoint(ckpt))
            tokens = hf_tokenizer(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
            assert_matches(context, text(input_ids=tokens).last_hidden_state, "text conditioning")
        assert_matches(model.apply_model(x, t, {"crossattn": context}),
                       unet(x, t, encoder_hidden_states=context).sample, "apply_model")
        assert_matches(model.encode_first_stage(image, sample=False),
                       vae.encode(image).latent_dist.mode() * scale, "encode_first_stage")
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        assert_matches(model.decode_first_stage(z), vae.decode(z / scale).sample, "decode_first_stage")
