"""LoRA / LoCon / LoHa / LoKr files (kohya, diffusers/peft, LyCORIS names) merged into tiny random models."""
import copy
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.lora import (extract_lora_tags, find_lora, load_lora, loaded_loras, lora_hash, unload_loras)
from ldm.convert.module_names import diffusers_unet_names
from ldm.io import CheckpointError
from tiny_models import tiny_model

# our module name -> (kohya name, diffusers name)
UNET_LAYERS = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",      # linear
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",   # GEGLU projection (out = 2 x inner)
    "middle_block.1.transformer_blocks.0.attn2.to_k",        # cross-attention: in = context width
    "output_blocks.3.1.proj_out",
]
CONV_LAYERS = [
    "input_blocks.1.0.in_layers.2",     # 3x3 resnet conv (LoCon)
    "output_blocks.1.1.conv",           # 3x3 upsampler conv
    "output_blocks.0.0.skip_connection",  # 1x1 conv
]
TEXT_LAYERS = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _weight(model, name):
    return model.get_submodule("model.diffusion_model." + name).weight


def _random_lora(shape, rank, generator):
    """(down, up) for a weight shape: Linear [out, in] or Conv2d [out, in, k, k] (down k x k, up 1 x 1)."""
    out_dim, in_dim = shape[0], shape[1]
    if len(shape) == 4:
        down = torch.randn(rank, in_dim, *shape[2:], generator=generator)
        up = torch.randn(out_dim, rank, 1, 1, generator=generator)
    else:
        down = torch.randn(rank, in_dim, generator=generator)
        up = torch.randn(out_dim, rank, generator=generator)
    return down * 0.1, up * 0.1


def _text_target(model, layer, hf):
    """(weight tensor view, rows) of a transformers-named text layer in our OpenCLIP tower."""
    block = model.cond_stage_model.model.transformer.resblocks[layer]
    d = block.attn.embed_dim
    if hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        part = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].index(hf)
        return block.attn.in_proj_weight, slice(part * d, (part + 1) * d)
    module = {"self_attn.out_proj": block.attn.out_proj, "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}[hf]
    return module.weight, slice(None)


def make_lora(model, fmt="kohya", rank=4, alpha=2.0, seed=0, unet=UNET_LAYERS + CONV_LAYERS, text=True):
    """(state dict in format ``fmt``, expected {param name: delta at weight 1}) for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    names = diffusers_unet_names(model.model.diffusion_model)
    sd, expected = {}, {}
    for ours in unet:
        w = _weight(model, ours)
        down, up = _random_lora(tuple(w.shape), rank, g)
        scale = (alpha if alpha is not None else rank) / rank
        expected["model.diffusion_model." + ours + ".weight"] = (
            scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape), slice(None))
        if fmt == "kohya":
            key = "lora_unet_" + names[ours].replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        elif fmt == "kohya-sdxl":
            key = "lora_unet_" + ours.replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        elif fmt == "peft":
            key = "unet." + names[ours]
            sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"] = down, up
        elif fmt == "diffusers-old":
            key = "unet." + names[ours]
            sd[key + ".lora.down.weight"], sd[key + ".lora.up.weight"] = down, up
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
    if text:
        for layer in range(2):
            for hf in TEXT_LAYERS:
                w, rows = _text_target(model, layer, hf)
                shape = tuple(w[rows].shape)
                down, up = _random_lora(shape, rank, g)
                scale = (alpha if alpha is not None else rank) / rank
                expected[(layer, hf)] = (scale * up @ down, rows)
                if fmt.startswith("kohya"):
                    prefix = "lora_te1_" if fmt == "kohya-sdxl" else "lora_te_"
                    key = prefix + f"text_model_encoder_layers_{layer}_{hf.replace('.', '_')}"
                    sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
                elif fmt == "peft":
                    key = f"text_encoder.text_model.encoder.layers.{layer}.{hf}"
                    sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"] = down, up
                else:
                    key = f"text_encoder.text_model.encoder.layers.{layer}.{hf}"
                    sd[key + ".lora_linear_layer.down.weight"] = down
                    sd[key + ".lora_linear_layer.up.weight"] = up
                if alpha is not None:
                    sd[key + ".alpha"] = torch.tensor(alpha)
    return sd, expected


def merged_by_hand(model, expected, weight=1.0):
    """A copy of ``model`` with ``weight * delta`` added to the named weights."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key, (delta, rows) in expected.items():
            if isinstance(key, tuple):
                layer, hf = key
                w, rows = _text_target(ref, layer, hf)
                w[rows] += weight * delta
            else:
                ref.get_parameter(key)[rows] += weight * delta
    return ref


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def assert_same_weights(a, b, exact=False):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("fmt", ["kohya", "kohya-sdxl", "peft", "diffusers-old"])
def test_each_format_merges_scale_alpha_over_rank_up_down_and_unloads_exactly(model, tmp_path, fmt):
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    alpha = None if fmt == "peft" else 2.0  # no alpha: scale 1
    sd, expected = make_lora(model, fmt, alpha=alpha)
    path = save(sd, tmp_path / f"{fmt}.safetensors")
    lora = load_lora(model, path, weight=0.7)
    assert lora.name == fmt and len(lora.hash) == 12
    assert_same_weights(model, merged_by_hand(original, expected, 0.7))
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    unload_loras(model)
    assert_same_weights(model, original, exact=True)
    assert loaded_loras(model) == []


def test_text_lora_changes_only_its_third_of_the_fused_qkv(model, tmp_path):
    model = copy.deepcopy(model)
    before = model.cond_stage_model.model.transformer.resblocks[0].attn.in_proj_weight.clone()
    sd, _ = make_lora(model, unet=[], text=True)
    sd = {k: v for k, v in sd.items() if "layers_0_self_attn_v_proj" in k}
    load_lora(model, save(sd, tmp_path / "v.safetensors"))
    after = model.cond_stage_model.model.transformer.resblocks[0].attn.in_proj_weight
    d = after.shape[1]
    assert torch.equal(after[:2 * d], before[:2 * d]) and not torch.equal(after[2 * d:], before[2 * d:])


def test_two_loras_stack_and_unload_restores_bf16_weights_exactly(model, tmp_path):
    model = copy.deepcopy(model)
    model.model.diffusion_model.to(torch.bfloat16)
    original = copy.deepcopy(model)
    a, _ = make_lora(model, seed=1)
    b, _ = make_lora(model, "peft", seed=2)
    load_lora(model, save(a, tmp_path / "a.safetensors"), 1.0)
    load_lora(model, save(b, tmp_path / "b.safetensors"), -0.5)
    assert [x.name for x in loaded_loras(model)] == ["a", "b"]
    assert _weight(model, UNET_LAYERS[0]).dtype == torch.bfloat16
    unload_loras(model)
    assert_same_weights(model, original, exact=True)


def test_separate_text_encoder_and_unet_weights(model, tmp_path):
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    sd, expected = make_lora(model)
    load_lora(model, save(sd, tmp_path / "x.safetensors"), 0.5, unet_weight=0.0)
    ref = merged_by_hand(original, {k: v for k, v in expected.items() if isinstance(k, tuple)}, 0.5)
    assert_same_weights(model, ref)


def test_locon_cp_loha_and_lokr_follow_lycoris_formulas(model, tmp_path):
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    names = diffusers_unet_names(model.model.diffusion_model)
    conv, lin = "input_blocks.1.0.in_layers.2", "input_blocks.1.1.transformer_blocks.0.attn1.to_v"
    conv_w, lin_w = _weight(model, conv), _weight(model, lin)  # [32, 32, 3, 3], [32, 32]
    r = 4
    # LoCon with CP decomposition: down 1x1, mid [r, r, 3, 3], up 1x1
    down, mid, up = (torch.randn(r, 32, 1, 1, generator=g), torch.randn(r, r, 3, 3, generator=g),
                     torch.randn(32, r, 1, 1, generator=g))
    key = "lora_unet_" + names[conv].replace(".", "_")
    sd = {key + ".lora_down.weight": down, key + ".lora_mid.weight": mid, key + ".lora_up.weight": up,
          key + ".alpha": torch.tensor(2.0)}
    conv_delta = 0.5 * torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
    # LoHa on the linear layer
    w1a, w1b, w2a, w2b = (torch.randn(32, r, generator=g), torch.randn(r, 32, generator=g),
                          torch.randn(32, r, generator=g), torch.randn(r, 32, generator=g))
    key = "lora_unet_" + names[lin].replace(".", "_")
    sd.update({key + ".hada_w1_a": w1a, key + ".hada_w1_b": w1b, key + ".hada_w2_a": w2a, key + ".hada_w2_b": w2b,
               key + ".alpha": torch.tensor(1.0)})
    lin_delta = 0.25 * (w1a @ w1b) * (w2a @ w2b)
    # LoKr on the output conv [4, 32, 3, 3]: w1 [2, 4] full, w2 from a low-rank pair [2, 8, 3, 3]
    out_w = _weight(model, "out.2")
    k1 = torch.randn(2, 4, generator=g)
    k2a, k2b = torch.randn(2, r, generator=g), torch.randn(r, 8 * 9, generator=g)
    sd.update({"lora_unet_conv_out.lokr_w1": k1, "lora_unet_conv_out.lokr_w2_a": k2a,
               "lora_unet_conv_out.lokr_w2_b": k2b, "lora_unet_conv_out.alpha": torch.tensor(8.0)})
    w2 = (k2a @ k2b).reshape(2, 8, 3, 3)
    out_delta = 2.0 * torch.kron(k1[:, :, None, None], w2)  # alpha 8 / rank 4
    assert out_delta.shape == out_w.shape
    load_lora(model, save(sd, tmp_path / "lyco.safetensors"))
    for name, delta in ((conv, conv_delta), (lin, lin_delta), ("out.2", out_delta)):
        torch.testing.assert_close(_weight(model, name), _weight(original, name) + delta, rtol=0, atol=1e-5)
    unload_loras(model)
    assert_same_weights(model, original, exact=True)


def test_unknown_key_or_other_architecture_is_one_line_and_changes_nothing(model, tmp_path):
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    sd, _ = make_lora(model)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(CheckpointError, match=r"1 of \d+ layers match no layer .*down_blocks_9") as e:
        load_lora(model, save(sd, tmp_path / "bad.safetensors"))
    assert "\n" not in str(e.value)
    assert_same_weights(model, original, exact=True)
    # an SD2-sized LoRA (1024-wide text layers) on this model: shapes do not fit
    wide = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1024),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 4)}
    with pytest.raises(CheckpointError, match=r"do not fit .*\[1024, 1024\].*another architecture"):
        load_lora(model, save(wide, tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_lora(model, save({"lora_unet_conv_in.dora_scale": torch.ones(32)}, tmp_path / "dora.safetensors"))
    assert loaded_loras(model) == []


def test_extract_lora_tags():
    text, tags = extract_lora_tags("a cat <lora:style:0.8>, <lora:detail> in a hat <LORA:x:0.5:1.5>")
    assert text == "a cat ,  in a hat "
    assert tags == [("style", 0.8, None), ("detail", 1.0, None), ("x", 0.5, 1.5)]
    assert extract_lora_tags("<lora:y:te=0.3:unet=0.6> z") == (" z", [("y", 0.3, 0.6)])
    assert extract_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    for bad in ("<lora::1>", "<lora:a:b>", "<lora:a:1:1:4>", "<lora:a:dyn=4>"):
        with pytest.raises(ValueError):
            extract_lora_tags(bad)


def test_find_lora_stays_in_its_folder(tmp_path):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"x")
    (folder / "sub" / "b.pt").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    assert find_lora("a", folder) == folder / "a.safetensors"
    assert find_lora("b", folder) == folder / "sub" / "b.pt"
    for name in ("../secret", "sub/b", "..", ".hidden"):
        with pytest.raises(ValueError, match="not a file name"):
            find_lora(name, folder)
    with pytest.raises(FileNotFoundError, match="'secret' not found"):
        find_lora("secret", folder)


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    path = save({"x.alpha": torch.tensor(1.0)}, tmp_path / "h.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    save_file({"x.alpha": torch.tensor(1.0)}, str(path), metadata={"sshs_model_hash": "abcdef0123456789"})
    assert lora_hash(path) == "abcdef012345"
    other = tmp_path / "h.pt"
    torch.save({"x.alpha": torch.tensor(1.0)}, other)
    assert lora_hash(other) == hashlib.sha256(other.read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------
# the pipeline: merged after ldm.accel.optimize, prompt tags, parameters
# ------------------------------------------------------------------------------------------------------------

from ldm.pipeline import Text2Image  # noqa: E402
from tiny_models import tiny_ckpt  # noqa: E402,F401  (fixture)

FAST = dict(steps=2, height=32, width=32, seeds=5, sampler="Euler")


def _latents(pipe, prompt="a red circle", **kwargs):
    seen, decode = [], pipe._decode

    def spy(latents):
        seen.append(latents.clone())
        return decode(latents)

    pipe._decode = spy
    try:
        out = pipe(prompt, **{**FAST, **kwargs})
    finally:
        del pipe._decode
    return seen[0], out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimized_pipeline_sees_the_merge_and_the_unmerge(tiny_ckpt, tmp_path, precision):
    from ldm.convert import load_model

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu", precision=precision, unet_weights="fp32")
    before, _ = _latents(pipe)  # the accelerated layers' caches are made here
    sd, expected = make_lora(pipe.model, seed=4)
    path = save(sd, tmp_path / "style.safetensors")
    pipe.load_lora(path, 0.8)
    merged, out = _latents(pipe)
    ref_model = merged_by_hand(load_model(None, tiny_ckpt), expected, 0.8)
    reference, _ = _latents(Text2Image(ref_model, device="cpu", precision=precision))
    # the same up to float rounding of the merged weights (amplified a little by sampling with CFG 7.5)
    assert (merged - reference).abs().max() < 0.01 * (merged - before).abs().max()
    torch.testing.assert_close(merged, reference, rtol=1e-3, atol=1e-3)
    assert out.parameters[0]["lora_hashes"] == f"style: {lora_hash(path)}"
    pipe.unload_loras()
    after, out = _latents(pipe)
    assert torch.equal(after, before) and "lora_hashes" not in out.parameters[0]


def test_prompt_tags_load_from_lora_dir_and_go_when_no_prompt_names_them(tiny_ckpt, tmp_path):
    from ldm.cli.common import format_parameters, parse_parameters

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    plain, _ = _latents(pipe, "a red circle, ")
    sd, _ = make_lora(pipe.model, seed=5)
    save(sd, tmp_path / "style.safetensors")
    with pytest.raises(ValueError, match="no LoRA folder is set"):
        pipe("a red circle, <lora:style:0.5>", **FAST)
    pipe.lora_dir = tmp_path
    tagged, out = _latents(pipe, "a red circle, <lora:style:0.5>")
    assert not torch.equal(tagged, plain)
    assert out.parameters[0]["prompt"] == "a red circle, <lora:style:0.5>"  # as written, as A1111 keeps it
    assert [(x.name, x.weight, x.source) for x in pipe.loras] == [("style", 0.5, "prompt")]
    text = format_parameters(out.parameters[0])
    assert f'Lora hashes: "style: {lora_hash(tmp_path / "style.safetensors")}"' in text
    assert parse_parameters(text)["lora_hashes"] == f"style: {lora_hash(tmp_path / 'style.safetensors')}"
    direct = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    direct.load_lora(tmp_path / "style.safetensors", 0.5)
    assert torch.equal(_latents(direct, "a red circle, ")[0], tagged)  # the tag is gone from the encoded text
    again, _ = _latents(pipe, "a red circle, ")
    assert torch.equal(again, plain) and pipe.loras == []
    with pytest.raises(FileNotFoundError, match="'nothere' not found"):
        pipe("<lora:nothere:1>", **FAST)


# ------------------------------------------------------------------------------------------------------------
# SDXL's layout: original UNet names (kohya), two text encoders (lora_te1_ / lora_te2_, text_encoder_2.)
# ------------------------------------------------------------------------------------------------------------

_TEXT = {"target": "ldm.models.conditioner.TextEmbedder", "input_key": "txt",
         "params": {"arch": "ldm-tiny-text", "layer": "penultimate", "pad": "zero", "freeze": True}}


def tiny_sdxl_like(seed=0):
    """A tiny model with SDXL's UNet layout (3 levels, no attention at the top level, 2 res blocks, deeper
    transformers below, a vector input) and two text encoders, the second pooled."""
    from ldm.convert import build_model
    from tiny_models import tiny_config

    config = tiny_config()
    params = config["model"]["params"]
    del params["cond_stage_config"]
    te1 = copy.deepcopy(_TEXT)
    te1["params"].update(projection=False)
    te2 = copy.deepcopy(_TEXT)
    te2["params"].update(projection=True, pooled=True)
    params["conditioner_config"] = {"target": "ldm.models.conditioner.Conditioner",
                                    "params": {"emb_models": [te1, te2]}}
    params["unet_config"]["params"].update(channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4],
                                           transformer_depth=[0, 1, 2], context_dim=64, num_classes="sequential",
                                           adm_in_channels=32)
    torch.manual_seed(seed)
    return build_model(config).eval()


def test_diffusers_names_match_diffusers_unet_for_sd_and_sdxl_layouts(model):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    sd1 = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                               attention_head_dim=(2, 4), use_linear_projection=True)
    sdxl = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,
                                attention_head_dim=(2, 4, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=32)
    for ours, theirs in ((model.model.diffusion_model, sd1), (tiny_sdxl_like().model.diffusion_model, sdxl)):
        names = diffusers_unet_names(ours)
        mapped = {names[n] + "." + p: tuple(t.shape) for n, m in ours.named_modules() if n in names
                  for p, t in m.named_parameters(recurse=False)}
        assert mapped == {n: tuple(t.shape) for n, t in theirs.named_parameters()}


@pytest.mark.parametrize("fmt", ["kohya-sdxl", "peft"])
def test_sdxl_names_reach_the_unet_and_both_text_encoders(tmp_path, fmt):
    model = tiny_sdxl_like()
    original = copy.deepcopy(model)
    names = diffusers_unet_names(model.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    layers = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.1.ff.net.2",
              "output_blocks.2.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.0.in_layers.2"]
    sd, expected = {}, {}
    for ours in layers:
        w = _weight(model, ours)
        down, up = _random_lora(tuple(w.shape), 2, g)
        key = ("lora_unet_" + ours.replace(".", "_") if fmt == "kohya-sdxl" else "unet." + names[ours])
        sd.update({key + (".lora_down.weight" if fmt == "kohya-sdxl" else ".lora_A.weight"): down,
                   key + (".lora_up.weight" if fmt == "kohya-sdxl" else ".lora_B.weight"): up})
        expected["model.diffusion_model." + ours + ".weight"] = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    for index, (kohya, peft) in enumerate((("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."))):
        down, up = _random_lora((32, 128), 2, g)
        key = (kohya + "text_model_encoder_layers_1_mlp_fc2" if fmt == "kohya-sdxl"
               else peft + "text_model.encoder.layers.1.mlp.fc2")
        sd.update({key + (".lora_down.weight" if fmt == "kohya-sdxl" else ".lora_A.weight"): down,
                   key + (".lora_up.weight" if fmt == "kohya-sdxl" else ".lora_B.weight"): up})
        expected[f"conditioner.embedders.{index}.model.transformer.resblocks.1.mlp.c_proj.weight"] = up @ down
    load_lora(model, save(sd, tmp_path / "xl.safetensors"))
    after, before = model.state_dict(), original.state_dict()
    for key in after:
        want = before[key] + expected[key] if key in expected else before[key]
        torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6, msg=key)
    unload_loras(model)
    assert_same_weights(model, original, exact=True)


def test_diffusers_written_peft_file_with_alpha_in_its_metadata(model, tmp_path):
    """A file written by diffusers' own save_lora_weights: lora_alpha (and an alpha_pattern) in the metadata."""
    pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    sd, expected = make_lora(model, "peft", alpha=None, text=False)  # scale 1 as made; alpha comes from metadata
    unet = {k.removeprefix("unet."): v for k, v in sd.items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=unet, weight_name="lora.safetensors",
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "alpha_pattern": {"proj_out": 2}})
    load_lora(model, tmp_path / "lora.safetensors")
    scaled = {k: ((0.5 if k.endswith("proj_out.weight") else 2.0) * d, rows) for k, (d, rows) in expected.items()}
    assert_same_weights(model, merged_by_hand(original, scaled))


def test_diffusers_attention_processor_names(model, tmp_path):
    """diffusers' oldest LoRA files: ``<block>.attn1.processor.to_q_lora.down.weight`` without a ``unet.`` prefix."""
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    names = diffusers_unet_names(model.model.diffusion_model)
    g = torch.Generator().manual_seed(9)
    sd, expected = {}, {}
    for ours in ("input_blocks.1.1.transformer_blocks.0.attn1.to_k",
                 "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0"):
        w = _weight(model, ours)
        down, up = _random_lora(tuple(w.shape), 4, g)
        base, proj = names[ours].rsplit(".", 1) if not ours.endswith("to_out.0") else (names[ours][:-9], "to_out")
        sd[f"{base}.processor.{proj}_lora.down.weight"], sd[f"{base}.processor.{proj}_lora.up.weight"] = down, up
        expected["model.diffusion_model." + ours + ".weight"] = (up @ down, slice(None))
    load_lora(model, save(sd, tmp_path / "procs.safetensors"))
    assert_same_weights(model, merged_by_hand(original, expected))
