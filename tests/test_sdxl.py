"""SDXL: the conditioning math at tiny width against a hand-written reference of the formulas, files in SDXL's
layout, and the refiner's aesthetic-score conditioning.

The reference (sgm's GeneralConditioner with FrozenCLIPEmbedder(layer="hidden", layer_idx=11) and
FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False, always_return_pooled=True)):
- CLIP-L: hidden state after all blocks but the last, no final norm, prompt padded with end-of-text;
- bigG: output of the penultimate block, no final norm, padded with 0; pooled = ln_final(last block output) at
  the end-of-text token @ text_projection;
- crossattn = cat(CLIP-L, bigG) on the feature axis; vector = cat(pooled, fourier(original h, w), fourier(crop
  top, left), fourier(target h, w)) (refiner: bigG only, and fourier(aesthetic score) in place of the target).
"""
import math
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from ldm.convert import load_model, to_hf_clip_text_state_dict
from ldm.io import read_state_dict
from tiny_models import SDXL_SIZE_DIM, tiny_sdxl_checkpoint, tiny_sdxl_config, tiny_sdxl_model

SOT, EOT = 49406, 49407
PROMPTS = ["a red circle on a blue square", ""]


# ---- the hand-written reference ----------------------------------------------------------------------------

def ref_tokens(prompts, pad):
    bpe = SimpleTokenizer()
    rows = []
    for p in prompts:
        ids = [SOT, *bpe.encode(p)[:75], EOT]
        rows.append(ids + [pad] * (77 - len(ids)))
    return torch.tensor(rows)


def ref_block(x, w, heads, act):
    """One pre-norm CLIP block from its weights: x + attn(ln_1(x)) with a causal mask, then x + mlp(ln_2(x))."""
    n, length, width = x.shape
    d = width // heads
    h = F.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"], 1e-5)
    q, k, v = (h @ w[f"{name}.weight"].T + w[f"{name}.bias"] for name in ("q", "k", "v"))
    q, k, v = (t.view(n, length, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores + torch.full((length, length), float("-inf")).triu(1)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + attn @ w["out.weight"].T + w["out.bias"]
    h = F.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"], 1e-5)
    h = act(h @ w["fc1.weight"].T + w["fc1.bias"])
    return x + h @ w["fc2.weight"].T + w["fc2.bias"]


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_clip_l_hidden(hf, tokens, heads, layers_run):
    """transformers-named CLIP text weights (``text_model.*``) -> hidden_states[layers_run] (no final norm)."""
    embeddings = "text_model.embeddings."
    x = hf[embeddings + "token_embedding.weight"][tokens] + hf[embeddings + "position_embedding.weight"]
    for i in range(layers_run):
        p = f"text_model.encoder.layers.{i}."
        w = {"ln_1.weight": hf[p + "layer_norm1.weight"], "ln_1.bias": hf[p + "layer_norm1.bias"],
             "ln_2.weight": hf[p + "layer_norm2.weight"], "ln_2.bias": hf[p + "layer_norm2.bias"],
             "out.weight": hf[p + "self_attn.out_proj.weight"], "out.bias": hf[p + "self_attn.out_proj.bias"],
             "fc1.weight": hf[p + "mlp.fc1.weight"], "fc1.bias": hf[p + "mlp.fc1.bias"],
             "fc2.weight": hf[p + "mlp.fc2.weight"], "fc2.bias": hf[p + "mlp.fc2.bias"]}
        for name in "qkv":
            w[f"{name}.weight"] = hf[p + f"self_attn.{name}_proj.weight"]
            w[f"{name}.bias"] = hf[p + f"self_attn.{name}_proj.bias"]
        x = ref_block(x, w, heads, quick_gelu)
    return x


def ref_open_clip(sd, tokens, heads):
    """OpenCLIP text weights (``model.*``) -> (penultimate block output, pooled)."""
    x = sd["model.token_embedding.weight"][tokens] + sd["model.positional_embedding"]
    layers = len({k.split(".")[3] for k in sd if k.startswith("model.transformer.resblocks.")})
    outputs = []
    for i in range(layers):
        p = f"model.transformer.resblocks.{i}."
        q, k, v = sd[p + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[p + "attn.in_proj_bias"].chunk(3)
        w = {"ln_1.weight": sd[p + "ln_1.weight"], "ln_1.bias": sd[p + "ln_1.bias"],
             "ln_2.weight": sd[p + "ln_2.weight"], "ln_2.bias": sd[p + "ln_2.bias"],
             "q.weight": q, "k.weight": k, "v.weight": v, "q.bias": qb, "k.bias": kb, "v.bias": vb,
             "out.weight": sd[p + "attn.out_proj.weight"], "out.bias": sd[p + "attn.out_proj.bias"],
             "fc1.weight": sd[p + "mlp.c_fc.weight"], "fc1.bias": sd[p + "mlp.c_fc.bias"],
             "fc2.weight": sd[p + "mlp.c_proj.weight"], "fc2.bias": sd[p + "mlp.c_proj.bias"]}
        outputs.append(x)  # the input of block i
        x = ref_block(x, w, heads, F.gelu)
    penultimate = outputs[-1]
    last = F.layer_norm(x, (x.shape[-1],), sd["model.ln_final.weight"], sd["model.ln_final.bias"], 1e-5)
    pooled = last[torch.arange(len(tokens)), (tokens == EOT).int().argmax(-1)] @ sd["model.text_projection"]
    return penultimate, pooled


def fourier(values, dim=SDXL_SIZE_DIM):
    """[B, n] numbers -> [B, n * dim]: each number t as [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = values.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1).flatten(1)


def sub_state(model, prefix):
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


# ---- tests ------------------------------------------------------------------------------------------------

def sizes(n):
    return {"original_size_as_tuple": torch.tensor([[512, 768], [1024, 1024]])[:n],
            "crop_coords_top_left": torch.tensor([[0, 0], [16, 48]])[:n],
            "target_size_as_tuple": torch.tensor([[1024, 1024], [896, 1152]])[:n],
            "aesthetic_score": torch.tensor([6.0, 2.5])[:n]}


def test_base_conditioning_matches_the_formulas():
    model = tiny_sdxl_model()
    batch = {"txt": PROMPTS, **sizes(2)}
    cond = model.get_learned_conditioning(batch)
    clip_l = to_hf_clip_text_state_dict(sub_state(model, "conditioner.embedders.0."))
    hidden = ref_clip_l_hidden(clip_l, ref_tokens(PROMPTS, EOT), heads=4, layers_run=1)
    penultimate, pooled = ref_open_clip(sub_state(model, "conditioner.embedders.1."), ref_tokens(PROMPTS, 0), 4)
    assert cond["crossattn"].shape == (2, 77, 32 + 64) and cond["vector"].shape == (2, 48 + 3 * 2 * 8)
    torch.testing.assert_close(cond["crossattn"], torch.cat([hidden, penultimate], dim=-1), rtol=1e-4, atol=1e-5)
    vector = torch.cat([pooled, fourier(batch["original_size_as_tuple"]), fourier(batch["crop_coords_top_left"]),
                        fourier(batch["target_size_as_tuple"])], dim=1)
    torch.testing.assert_close(cond["vector"], vector, rtol=1e-4, atol=1e-5)


def test_refiner_conditioning_matches_the_formulas():
    model = tiny_sdxl_model(refiner=True)
    batch = {"txt": PROMPTS, **sizes(2)}
    cond = model.get_learned_conditioning(batch)
    penultimate, pooled = ref_open_clip(sub_state(model, "conditioner.embedders.0."), ref_tokens(PROMPTS, 0), 4)
    torch.testing.assert_close(cond["crossattn"], penultimate, rtol=1e-4, atol=1e-5)
    vector = torch.cat([pooled, fourier(batch["original_size_as_tuple"]), fourier(batch["crop_coords_top_left"]),
                        fourier(batch["aesthetic_score"][:, None])], dim=1)
    torch.testing.assert_close(cond["vector"], vector, rtol=1e-4, atol=1e-5)


def test_base_unconditional_text_is_zero_refiner_encodes_it():
    batch = {"txt": ["", ""], **sizes(2)}
    base = tiny_sdxl_model()
    uc = base.get_unconditional_conditioning(batch)
    assert not uc["crossattn"].any() and not uc["vector"][:, :48].any()
    torch.testing.assert_close(uc["vector"][:, 48:], base.get_learned_conditioning(batch)["vector"][:, 48:])
    refiner = tiny_sdxl_model(refiner=True)
    torch.testing.assert_close(refiner.get_unconditional_conditioning(batch)["crossattn"],
                               refiner.get_learned_conditioning(batch)["crossattn"])


@pytest.mark.parametrize("refiner", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_sdxl_layout_file_round_trip(tmp_path, refiner, dtype):
    path = tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", refiner=refiner, dtype=dtype)
    sd, _ = read_state_dict(path)
    if not refiner:  # CLIP-L in transformers names, as sgm writes it
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "conditioner.embedders.%d.model.text_projection" % (0 if refiner else 1) in sd
    assert not any(k.startswith("alphas_cumprod") for k in sd)
    loaded = load_model(None, path)
    model = tiny_sdxl_model(refiner=refiner)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        expected = a[k].half().float() if dtype is not None and a[k].is_floating_point() else a[k]
        assert torch.equal(b[k], expected), k
    batch = {"txt": PROMPTS, **sizes(2)}
    ref = model.get_learned_conditioning(batch)
    if dtype is None:
        torch.testing.assert_close(loaded.get_learned_conditioning(batch)["vector"], ref["vector"], rtol=0, atol=0)
    assert torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)


@pytest.mark.parametrize("refiner", [False, True])
def test_export_writes_the_sdxl_file_layout_and_loads_back(tmp_path, refiner):
    """The training export writes CLIP-L as released files (and A1111, ComfyUI, diffusers) have it:
    ``conditioner.embedders.0.transformer.text_model.*``; a strict load gives the same model back."""
    from ldm.io import save_checkpoint
    from ldm.training.latent_diffusion import export_state_dict

    model = tiny_sdxl_model(refiner=refiner)
    exported = export_state_dict(model.state_dict())
    reference, _ = read_state_dict(tiny_sdxl_checkpoint(tmp_path / "ref.safetensors", refiner=refiner))
    assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in exported)
    if not refiner:
        assert not any(k.startswith("conditioner.embedders.0.model.") for k in exported)
    loaded = load_model(None, save_checkpoint(exported, tmp_path / "x.safetensors", config=tiny_sdxl_config(refiner)))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_cli_writes_the_released_layout(tmp_path, capsys):
    """``python -m ldm.cli.export --out``: a loaded SDXL file written back in its own layout (fp32 or fp16)."""
    from ldm.cli import export

    source = tiny_sdxl_checkpoint(tmp_path / "xl.safetensors")
    want, _ = read_state_dict(source)
    assert export.main(["--ckpt", str(source), "--out", str(tmp_path / "out.safetensors")]) == 0
    got, meta = read_state_dict(tmp_path / "out.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "config" in meta
    assert export.main(["--ckpt", str(source), "--out", str(tmp_path / "half.safetensors"), "--fp16"]) == 0
    half, _ = read_state_dict(tmp_path / "half.safetensors")
    assert half["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"].dtype == torch.float16
    assert torch.equal(load_model(None, tmp_path / "half.safetensors").state_dict()["model.diffusion_model.out.2.weight"],
                       want["model.diffusion_model.out.2.weight"].half().float())
    assert export.main(["--ckpt", str(source), "--out", str(tmp_path / "out.safetensors")]) == 2
    assert "exists" in capsys.readouterr().err


# ---- sampling: micro-conditioning, empty negative prompts, the refiner -----------------------------------

from ldm.cli import common  # noqa: E402
from ldm.cli import sample as cli  # noqa: E402
from ldm.diffusion import samplers as _samplers  # noqa: E402
from ldm.diffusion.samplers import SAMPLERS  # noqa: E402
from ldm.pipeline import Image2Image, Inpaint, Text2Image  # noqa: E402

FAST = dict(steps=3, height=64, width=64)


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    return (tiny_sdxl_checkpoint(folder / "xl-base.safetensors"),
            tiny_sdxl_checkpoint(folder / "xl-refiner.safetensors", seed=1, refiner=True))


@pytest.fixture(scope="module")
def base(xl_files):
    return Text2Image.from_checkpoint(xl_files[0], device="cpu")


@pytest.fixture(scope="module")
def refiner(xl_files):
    return Text2Image.from_checkpoint(xl_files[1], device="cpu")


@pytest.fixture
def with_refiner(base, refiner):
    base.set_refiner(refiner, 0.5)
    yield base
    base.set_refiner(None)


def spy_conditioning(pipe, monkeypatch):
    """Record (inputs, unconditional, result) of every encode_conditioning call."""
    calls, encode = [], pipe.encode_conditioning

    def spy(inputs, unconditional=False):
        out = encode(inputs, unconditional)
        calls.append((inputs, unconditional, out))
        return out

    monkeypatch.setattr(pipe, "encode_conditioning", spy)
    return calls


def test_sdxl_config_default_size_is_1024():
    from ldm.config import load_config
    from test_sd_layout import ROOT

    for name in ("sdxl-base.yaml", "sdxl-refiner.yaml"):
        cfg = load_config(ROOT / "configs" / "sd" / name)
        assert cfg.model.params.image_size * 8 == 1024


def test_micro_conditioning_defaults_and_values(base, monkeypatch):
    calls = spy_conditioning(base, monkeypatch)
    base(["a red circle"], seeds=1, guidance_scale=5.0, **FAST)
    (cond_in, _, _), (uncond_in, unconditional, _) = calls
    assert unconditional and [str(p) for p in uncond_in["txt"]] == [""]  # prompt objects (A1111 syntax)
    for inputs in (cond_in, uncond_in):
        assert inputs["original_size_as_tuple"].tolist() == [[64, 64]]  # (height, width) of the output
        assert inputs["crop_coords_top_left"].tolist() == [[0, 0]]
        assert inputs["target_size_as_tuple"].tolist() == [[64, 64]]
        assert "aesthetic_score" not in inputs
    calls.clear()
    out = base(["a"], seeds=1, original_size=(512, 768), crop_coords_top_left=(16, 48), target_size=(64, 128),
               **{**FAST, "width": 128})
    assert calls[0][0]["original_size_as_tuple"].tolist() == [[512, 768]]
    assert calls[0][0]["crop_coords_top_left"].tolist() == [[16, 48]]
    assert out.parameters[0]["original_size"] == (512, 768) and "target_size" not in out.parameters[0]
    text = common.format_parameters(out.parameters[0])
    assert "Original size: 768x512, Crop top left: 16x48" in text
    assert common.parse_parameters(text)["original_size"] == (512, 768)


def test_micro_conditioning_changes_the_image(base):
    a = base("a red circle", seeds=3, **FAST).images[0]
    b = base("a red circle", seeds=3, original_size=(256, 256), crop_coords_top_left=(32, 0), **FAST).images[0]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() > 0


def test_bad_micro_conditioning_is_one_line(base):
    with pytest.raises(ValueError, match=r"original_size=\(64,\) must be two non-negative ints \(height, width\)"):
        base("a", original_size=(64,), **FAST)
    with pytest.raises(ValueError, match="aesthetic_score given but this model does not read it"):
        base("a", aesthetic_score=5.0, **FAST)
    with pytest.raises(TypeError, match="unknown keyword"):
        base("a", orig_size=(1, 2), **FAST)


def test_empty_negative_prompt_is_zeros_a_given_one_is_encoded(base, monkeypatch):
    calls = spy_conditioning(base, monkeypatch)
    base(["a red circle", "a blue square"], negative_prompts=["", "blurry"], seeds=1, **FAST)
    uc = calls[1][2]
    assert not uc["crossattn"][0].any() and not uc["vector"][0, :48].any()
    assert uc["crossattn"][1].abs().sum() > 0
    expected = base.model.get_learned_conditioning({**calls[1][0], "txt": ["blurry", "blurry"]})
    torch.testing.assert_close(uc["crossattn"][1], expected["crossattn"][1])
    torch.testing.assert_close(uc["vector"][1], expected["vector"][1])


def test_refiner_takes_the_last_steps_on_the_same_latents(with_refiner, refiner, monkeypatch):
    base = with_refiner
    seen = {"base": [], "refiner": []}
    for name, pipe in (("base", base), ("refiner", refiner)):
        forward = pipe.model.apply_model

        def spy(x, t, cond, forward=forward, name=name):
            seen[name].append(float(t.flatten()[0]))
            return forward(x, t, cond)

        monkeypatch.setattr(pipe.model, "apply_model", spy)
    calls = spy_conditioning(refiner, monkeypatch)
    steps = []
    out = base("a red circle", seeds=5, steps=4, height=64, width=64, sampler="Euler",
               callback=lambda info: steps.append(info["i"]))
    assert steps == [0, 1, 2, 3]
    assert len(seen["base"]) == 2 and len(seen["refiner"]) == 2  # switch 0.5 of 4 steps, one CFG batch each
    assert min(seen["base"]) > max(seen["refiner"])  # the base runs the high-noise part
    # the refiner's own conditioning: aesthetic score 6, and 2.5 for the (encoded, not zeroed) negative
    (cond_in, _, _), (uncond_in, unconditional, uc) = calls
    assert cond_in["aesthetic_score"].tolist() == [6.0] and uncond_in["aesthetic_score"].tolist() == [2.5]
    assert uc["crossattn"].abs().sum() > 0
    params = out.parameters[0]
    assert params["refiner"] == "xl-refiner" and params["refiner_switch"] == 0.5
    text = common.format_parameters(params)
    assert f"Refiner: xl-refiner [{refiner.model_hash}], Refiner switch at: 0.5" in text


def test_refiner_hand_off_is_the_two_halves(with_refiner, refiner):
    """The result equals sampling sigmas[:k+1] with the base and sigmas[k:] with the refiner by hand."""
    base = with_refiner
    spec = _samplers.get_sampler("DPM++ 2M")
    latents = []
    decode = base._decode
    base._decode = lambda z: (latents.append(z), decode(z))[1]
    try:
        base("a red circle", seeds=5, steps=4, height=64, width=64, sampler="DPM++ 2M", guidance_scale=3.0)
    finally:
        del base._decode
    sigmas = base.sigmas(spec, 4)
    noise = _samplers.randn_like(torch.empty(1, 4, 8, 8), [torch.Generator().manual_seed(5)])
    x = spec.initial_x(noise, sigmas[0])
    for pipe, part in ((base, sigmas[:3]), (refiner, sigmas[2:])):
        req = pipe._request(["a red circle"], None, 64, 64, 4, "DPM++ 2M", 3.0, 0.0, None, 5, None)
        cond, uncond = pipe._conditioning(req, slice(0, 1))
        x = spec.fn(pipe._denoiser(req, uncond, None, None, noise), x, part, extra_args={"cond": cond})
    torch.testing.assert_close(latents[0], x)


def test_refiner_switch_one_is_the_base_alone(base, refiner):
    alone = base("a red circle", seeds=2, **FAST).images[0]
    base.set_refiner(refiner, 1.0)
    try:
        out = base("a red circle", seeds=2, **FAST)
    finally:
        base.set_refiner(None)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(alone)) and "refiner" not in out.parameters[0]
    with pytest.raises(ValueError, match="refiner switch 1.5 is outside"):
        base.set_refiner(refiner, 1.5)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_with_base_and_refiner(with_refiner, name):
    out = with_refiner("a red circle", seeds=1, sampler=name, steps=2, height=64, width=64)
    assert np.asarray(out.images[0]).std() > 0


def test_img2img_and_inpainting_with_refiner(with_refiner):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    img = Image2Image.from_pipeline(with_refiner)("a red circle", init, strength=0.7, seeds=1, steps=4)
    assert img.images[0].size == (64, 64) and img.parameters[0]["refiner_switch"] == 0.5
    out = Inpaint.from_pipeline(with_refiner)("a red circle", init, mask, seeds=1, steps=4)
    right = np.asarray(out.images[0])[:, 40:].astype(int) - np.asarray(init)[:, 40:].astype(int)
    left = np.asarray(out.images[0])[:, :24].astype(int) - np.asarray(init)[:, :24].astype(int)
    assert np.abs(left).mean() > np.abs(right).mean()  # repainted where the mask is white


def test_sample_cli_with_refiner_and_micro_conditioning(xl_files, tmp_path, capsys):
    base_file, refiner_file = xl_files
    code = cli.main([str(a) for a in ("--ckpt", base_file, "--refiner", refiner_file, "--refiner-switch", 0.5,
                                      "--aesthetic-score", 7, "--original-size", 512, 256, "--crop-coords", 8, 0,
                                      "--prompt", "a red circle", "--n_samples", 1, "--steps", 2,
                                      "--device", "cpu", "--outdir", tmp_path, "--skip_grid")])
    out, err = capsys.readouterr()
    assert code == 0, err
    (png,) = (tmp_path / "samples").glob("*.png")
    params = common.read_png_parameters(png)
    assert Image.open(png).size == (64, 64)  # the model's default size (SDXL: 1024)
    assert params["original_size"] == (512, 256) and params["crop_coords_top_left"] == (8, 0)
    assert params["refiner"] == "xl-refiner" and params["refiner_switch"] == 0.5
    assert params["aesthetic_score"] == 7.0


def test_sample_cli_sdxl_errors(xl_files, tmp_path, capsys):
    code = cli.main(["--ckpt", str(xl_files[0]), "--aesthetic-score", "7", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--aesthetic-score is the refiner's conditioning: it needs --refiner" in err
    code = cli.main(["--ckpt", str(xl_files[0]), "--refiner", str(xl_files[1]), "--refiner-switch", "2"])
    assert code == 2 and "--refiner-switch 2.0 is outside [0, 1]" in capsys.readouterr().err


def test_conditioner_only_empty_zeroes_the_samples_without_a_negative_prompt():
    model = tiny_sdxl_model()
    batch = {"txt": ["", "blurry"], **sizes(2)}
    every = model.get_unconditional_conditioning(batch)  # sgm: zeros for every sample
    assert not every["crossattn"].any()
    some = model.get_unconditional_conditioning(batch, only_empty=True)
    encoded = model.get_learned_conditioning(batch)
    torch.testing.assert_close(some["crossattn"][0], every["crossattn"][0])
    torch.testing.assert_close(some["crossattn"][1], encoded["crossattn"][1])
    torch.testing.assert_close(some["vector"], torch.stack([every["vector"][0], encoded["vector"][1]]))


# ---- training: micro-conditioning from the data, dropout per embedder, one step of configs/sdxl_txt2img.yaml ------

def test_image_transform_records_original_size_and_crop():
    from ldm.data.transforms import ImageTransform

    image = Image.new("RGB", (96, 48))
    torch.manual_seed(0)
    plain = ImageTransform(32, random_crop=True)(image)
    torch.manual_seed(0)
    sample = ImageTransform(32, random_crop=True, micro_conditioning=True).sample(image)
    assert torch.equal(sample["image"], plain)  # the same random draws
    assert sample["original_size_as_tuple"].tolist() == [48, 96]  # (height, width) before resizing
    top, left = sample["crop_coords_top_left"].tolist()
    assert top == 0 and 0 <= left <= 64  # resized to 64x32, a 32 square taken at (0, left)
    assert sample["target_size_as_tuple"].tolist() == [32, 32]
    assert ImageTransform(32, micro_conditioning=True).sample(image)["crop_coords_top_left"].tolist() == [0, 16]
    assert set(ImageTransform(32).sample(image)) == {"image"}


def test_image_folder_batches_carry_micro_conditioning(tmp_path):
    from ldm.data.folder import ImageFolderDataModule

    for i, size in enumerate([(80, 64), (64, 96)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    data = ImageFolderDataModule(tmp_path, batch_size=2, size=64, num_workers=0, val_fraction=0.0,
                                 micro_conditioning=True)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch["original_size_as_tuple"].tolist()) == [[64, 80], [96, 64]]
    assert sorted(batch["crop_coords_top_left"].tolist()) == [[0, 8], [16, 0]]
    assert batch["target_size_as_tuple"].tolist() == [[64, 64], [64, 64]]


SHRINK_SDXL = ["model.params.validation_prompts=[a red circle]", "model.params.sample_steps=2",
               "data.params.num_train=4", "data.params.num_val=0", "data.params.batch_size=2",
               "lightning.trainer.max_steps=1", "lightning.trainer.accelerator=cpu",
               "lightning.trainer.enable_progress_bar=false", "lightning.trainer.enable_model_summary=false",
               "lightning.callbacks.image_logger=false"]


def test_sdxl_txt2img_config_trains_one_step_and_exports(tmp_path):
    from ldm.cli.train import main

    root = Path(__file__).resolve().parent.parent
    args = ["--base", str(root / "configs" / "sdxl_txt2img.yaml"), "--logdir", str(tmp_path / "logs")] + SHRINK_SDXL
    assert main(args) == 0
    run = tmp_path / "logs" / "sdxl_txt2img"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    sd, _ = read_state_dict(run / "sdxl_txt2img.safetensors")
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd  # the released layout
    model = load_model(None, run / "sdxl_txt2img.safetensors")
    assert "conditioner.embedders.1.model.text_projection" in model.state_dict()
    pipe = Text2Image(model, device="cpu")
    out = pipe("a red circle", seeds=0, steps=2, original_size=(32, 32))
    assert out.images[0].size == (64, 64)


def test_training_step_reads_micro_conditioning_and_drops_per_embedder():
    from ldm.config import load_config
    from ldm.convert import build_model
    from ldm.data.datamodule import ShapesDataModule, collate

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "sdxl_txt2img.yaml")
    module = build_model(cfg, inference=False)
    data = ShapesDataModule(num_train=2, num_val=0, size=64, batch_size=2, micro_conditioning=True)
    data.setup()
    batch = collate([data.train_set[0], data.train_set[1]])
    seen = []
    forward = module.conditioner.forward

    def spy(inputs, **kwargs):
        seen.append(inputs)
        return forward(inputs, **kwargs)

    module.conditioner.forward = spy
    loss = module._loss(batch, torch.Generator().manual_seed(0), drop=True)
    assert torch.isfinite(loss) and seen[0]["original_size_as_tuple"].tolist() == [[64, 64], [64, 64]]
    loss.backward()
    assert module.conditioner.embedders[1].model.text_projection.grad is not None  # pooled path trains
    # each text embedder drops on its own: rate 1 for the CLIP-L-like one zeroes its 128 features only
    module.conditioner.specs[1] = module.conditioner.specs[1].__class__(("txt",), 0.0)
    module.conditioner.specs[0] = module.conditioner.specs[0].__class__(("txt",), 1.0, None, True)
    cond = module.conditioner(batch | {"txt": batch["caption"]}, generator=torch.Generator().manual_seed(0), drop=True)
    assert not cond["crossattn"][..., :128].any() and cond["crossattn"][..., 128:].abs().sum() > 0


def test_training_module_samples_images_with_micro_conditioning():
    from ldm.config import load_config
    from ldm.convert import build_model

    root = Path(__file__).resolve().parent.parent
    module = build_model(load_config(root / "configs" / "sdxl_txt2img.yaml"), inference=False)
    images = module.sample_images(["a red circle", "two blue squares"], steps=1)
    assert images.shape == (2, 3, 64, 64)


def test_fine_tuning_an_sdxl_layout_file_with_init_from(tmp_path):
    from ldm.config import instantiate_from_config

    path = tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=4, dtype=torch.float16)
    node = tiny_sdxl_config()["model"]
    node["target"] = "ldm.training.latent_diffusion.LatentDiffusionModule"
    node["params"].update({"init_from": str(path), "use_ema": False})
    module = instantiate_from_config(node, "model")
    reference = tiny_sdxl_model(seed=4).state_dict()
    key = "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"  # from q/k/v_proj
    assert torch.equal(module.state_dict()[key], reference[key].half().float())
    assert torch.equal(module.state_dict()["model.diffusion_model.label_emb.0.0.weight"],
                       reference["model.diffusion_model.label_emb.0.0.weight"].half().float())


def test_small_sdxl_unet_matches_diffusers():
    """The SDXL UNet (sdxl-base.yaml at width 64, depth [1, 2, 2]) against diffusers' UNet2DConditionModel made
    from the same weights by diffusers' single-file functions; its "text_time" input embeds (pooled, time ids)
    itself, ours gets y = cat(pooled, Fourier(time ids)) as the conditioner builds it."""
    diffusers = pytest.importorskip("diffusers")
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.config import instantiate_from_config, load_config, to_plain
    from ldm.models.conditioner import ConcatTimestepEmbedderND
    from test_sd_layout import ROOT

    cfg = to_plain(load_config(ROOT / "configs" / "sd" / "sdxl-base.yaml"))
    unet_cfg = cfg["model"]["params"]["unet_config"]
    # diffusers' converter takes a "sequential" UNet for SDXL's when context_dim is 1280 or 2048
    unet_cfg["params"].update(model_channels=64, transformer_depth=[1, 2, 2], context_dim=1280,
                              adm_in_channels=32 + 6 * 256)
    torch.manual_seed(0)
    ours = instantiate_from_config(unet_cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ckpt = {"model.diffusion_model." + k: v.contiguous() for k, v in ours.state_dict().items()}
    config = single_file.create_unet_diffusers_config_from_ldm(cfg, ckpt)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ref.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 1280, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    t = torch.tensor([17, 803])
    time_ids = torch.tensor([[1024.0, 768, 0, 32, 1024, 1024], [512, 512, 16, 0, 896, 1152]])
    y = torch.cat([pooled, ConcatTimestepEmbedderND(256)(time_ids)], dim=1)
    with torch.no_grad():
        out = ours(x, t, context, y=y)
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = ours(x, t, context, y=torch.cat([pooled, ConcatTimestepEmbedderND(256)(time_ids.flip(0))], dim=1))
    scale = expected.abs().max()
    assert (out - expected).abs().max() <= 1e-4 * scale
    assert (other - expected).abs().max() > 1e-2 * scale  # the vector input matters


def test_refiner_size_multiple_is_checked_before_sampling(with_refiner, refiner):
    assert with_refiner.size_multiple == 16 and refiner.size_multiple == 32  # tiny: 8 x 2 and 8 x 4
    with pytest.raises(ValueError, match="height 48 is not a positive multiple of 32"):
        with_refiner("a", height=48, width=64, steps=2)
    with_refiner.check_size(48, 64)  # the base alone would take it


def test_webdataset_batches_carry_micro_conditioning(tmp_path):
    import io

    import webdataset as wds

    from ldm.data.webdataset import WebDatasetDataModule

    with wds.TarWriter(str(tmp_path / "s-0.tar")) as sink:
        for i, size in enumerate([(48, 32), (32, 40)]):
            buf = io.BytesIO()
            Image.new("RGB", size).save(buf, format="PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"image {i}".encode()})
    data = WebDatasetDataModule(str(tmp_path / "s-0.tar"), batch_size=2, num_workers=0, size=16, shuffle_buffer=1,
                                micro_conditioning=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rows = sorted(zip(batch["original_size_as_tuple"].tolist(), batch["crop_coords_top_left"].tolist()))
    assert rows == [([32, 48], [0, 4]), ([40, 32], [2, 0])]  # (h, w); resized to 24x16 / 16x20, centre crops
    assert batch["target_size_as_tuple"].tolist() == [[16, 16], [16, 16]]


@pytest.mark.slow
def test_sdxl_base_architecture_under_the_training_target_is_the_file_layout():
    """Fine-tuning SDXL 1.0: configs/sd/sdxl-base.yaml's params under the training module take the real file
    strictly (what --init / init_from checks), built on the meta device."""
    from ldm.config import instantiate_from_config, load_config
    from ldm.convert import normalize_state_dict
    from ldm.io import check_state_dict
    from test_sd_layout import ROOT, _layout

    cfg = load_config(ROOT / "configs" / "sd" / "sdxl-base.yaml")
    cfg.model.target = "ldm.training.latent_diffusion.LatentDiffusionModule"
    with torch.device("meta"):
        module = instantiate_from_config(cfg.model, "model")
    check_state_dict(module.state_dict(), normalize_state_dict(_layout("sdxl-base.tsv")))


def test_blocked_attention_hands_onednn_contiguous_rows(monkeypatch):
    """Batch 1 with heads interleaved in the projection (SDXL's linear proj_in): q and k reach oneDNN's matmul
    contiguous (strided rows made it ~1000x slower); the result is the math kernel's."""
    from ldm.accel import attention as accel_attention
    from ldm.accel import onednn

    seen, linear = [], onednn.linear

    def spy(x, weight, bias=None):
        seen.append(x.is_contiguous() and weight.is_contiguous())
        return linear(x, weight, bias)

    monkeypatch.setattr(onednn, "linear", spy)
    monkeypatch.setattr(accel_attention, "USE_CPU_KERNELS", False)  # the Python blocks (the fused kernel's own test
    g = torch.Generator().manual_seed(0)                           # of strided views: tests/test_cpu_kernels.py)
    projected = [torch.randn(1, 256, 4 * 16, generator=g).to(torch.bfloat16) for _ in range(3)]  # [b, n, h * d]
    q, k, v = (p.view(1, 256, 4, 16).permute(0, 2, 1, 3) for p in projected)  # [b, h, n, d] views
    with torch.no_grad():
        out = accel_attention.attention(q, k, v, backend="blocked")
        ref = accel_attention.attention(q, k, v, backend="math")
    assert seen and all(seen)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
