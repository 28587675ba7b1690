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

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

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
    x = hf["text_model.embeddings.token_embedding.weight"][tokens] + hf["text_model.embeddings.position_embedding.weight"]
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
