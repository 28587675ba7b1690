"""OpenCLIPTextEncoder on tiny random architectures; full-size layouts checked on the meta device."""
import logging
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.convert import convert_hf_clip_text_state_dict, load_text_encoder_weights, to_hf_clip_text_state_dict
from ldm.io import CheckpointError
from ldm.models import text_encoder as te
from ldm.models.text_encoder import OpenCLIPTextEncoder
from sd_layout import read_layout

SOT, EOT = 49406, 49407
SD1_OPTIONS = dict(layer="last", pad="eot", quick_gelu=True, projection=False)


def tiny(**kwargs) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder("ldm-tiny-text", **kwargs)


def same_weights(dst: OpenCLIPTextEncoder, src: OpenCLIPTextEncoder) -> OpenCLIPTextEncoder:
    dst.load_state_dict(src.state_dict())
    return dst


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- shapes, layers, tokens -----------------------------------------------------------------------------

def test_output_shape_and_width():
    enc = tiny()
    out = enc(["a red square", "a blue circle on a green background"])
    assert out.shape == (2, 77, 32) and out.dtype == torch.float32
    assert enc.width == enc.output_dim == 32
    assert tiny(max_length=16).encode("a red square").shape == (1, 16, 32)
    assert OpenCLIPTextEncoder("ldm-small-text").width == 128


def test_last_and_penultimate_layers_differ_and_int_layers_match():
    base = tiny(layer="last")
    prompts = ["a red square", ""]
    last = base(prompts)
    penultimate = same_weights(tiny(layer="penultimate"), base)(prompts)
    assert not torch.allclose(last, penultimate, atol=1e-3)
    torch.testing.assert_close(same_weights(tiny(layer=-1), base)(prompts), last)
    torch.testing.assert_close(same_weights(tiny(layer=-2), base)(prompts), penultimate)
    torch.testing.assert_close(same_weights(tiny(layer=0), base)(prompts), penultimate)  # 2 blocks: 0 = -2


@pytest.mark.parametrize("layer", ["first", 2, -3, True, 1.0])
def test_bad_layer_is_a_clear_error(layer):
    with pytest.raises(ValueError, match="layer="):
        tiny(layer=layer)


def test_pad_modes_give_documented_token_ids():
    zero = tiny(pad="zero").tokenize(["a cat"])
    eot = tiny(pad="eot").tokenize(["a cat"])
    assert zero.shape == eot.shape == (1, 77) and zero.dtype == torch.long
    assert zero[0, :4].tolist() == [SOT, 320, 2368, EOT]  # CLIP BPE ids of "a", "cat"
    assert eot[0, :4].tolist() == zero[0, :4].tolist()
    assert (zero[0, 4:] == 0).all() and (eot[0, 4:] == EOT).all()


def test_empty_prompt_is_start_end_and_padding():
    enc = tiny()
    tokens = enc.tokenize([""])
    assert tokens[0, :2].tolist() == [SOT, EOT] and (tokens[0, 2:] == 0).all()
    out = enc([""])
    assert out.shape == (1, 77, 32) and torch.isfinite(out).all()


def test_long_prompt_is_truncated_with_a_warning(caplog):
    enc = tiny()
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        tokens = enc.tokenize(["a " * 100, "a cat"])
    assert tokens.shape == (2, 77) and tokens[0, -1] == EOT and (tokens[0, 1:76] == 320).all()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "1 of 2 prompts" in messages[0] and "prompt 0 lost 25" in messages[0]


def test_chunk_mode_concatenates_windows():
    truncating = tiny()
    chunking = same_weights(tiny(long_prompts="chunk"), truncating)
    long_prompt = "a " * 80 + "cat"  # 81 tokens: windows of 75 + 6
    tokens = chunking.tokenize([long_prompt, "a cat"])
    assert tokens.shape == (2, 154)
    assert tokens[0, 77:77 + 9].tolist() == [SOT] + [320] * 5 + [2368, EOT, 0]
    assert tokens[1, 77:79].tolist() == [SOT, EOT] and (tokens[1, 79:] == 0).all()  # empty window
    out = chunking([long_prompt, "a cat"])
    assert out.shape == (2, 154, 32)
    torch.testing.assert_close(out[:, :77], truncating([long_prompt, "a cat"]))
    torch.testing.assert_close(out[1, 77:], truncating([""])[0])
    assert chunking(["a cat"]).shape == (1, 77, 32)  # short prompts stay one window


def test_bad_arguments_are_one_line_errors():
    cases = [dict(pad="space"), dict(long_prompts="drop"), dict(max_length=78), dict(max_length=2),
             dict(arch="no-such-arch")]
    for kwargs in cases:
        with pytest.raises(ValueError) as info:
            OpenCLIPTextEncoder(**{"arch": "ldm-tiny-text", **kwargs})
        assert "\n" not in str(info.value)
    enc = tiny()
    with pytest.raises(TypeError, match="prompt 1"):
        enc(["a", 3])
    with pytest.raises(ValueError, match="no prompts"):
        enc([])
    with pytest.raises(ValueError, match="tokenize"):
        enc.encode_tokens(torch.zeros(1, 50, dtype=torch.long))


def test_tokenizer_and_build_never_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    te._bpe_tokenizer.cache_clear()
    enc = tiny()
    assert enc(["a photo of a cat"]).shape == (1, 77, 32)


# --- training state -------------------------------------------------------------------------------------

def test_frozen_stays_frozen():
    enc = tiny()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not enc(["a cat"]).requires_grad


def test_unfrozen_trains_what_the_forward_uses():
    enc = tiny(freeze=False)  # penultimate: block 1, projection and logit scale are never read
    enc.train()
    assert enc.training
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in trainable
    assert not any(n.startswith("model.transformer.resblocks.1.") for n in trainable)
    assert "model.text_projection" not in trainable and "model.logit_scale" not in trainable
    enc(["a cat"]).square().mean().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if n in trainable)


# --- checkpoint layouts ---------------------------------------------------------------------------------

def test_sd2_layout_matches_checkpoint():
    expected = read_layout("sd-v2.tsv", "cond_stage_model.")
    with torch.device("meta"):
        enc = OpenCLIPTextEncoder("ViT-H-14")
    state = enc.state_dict()
    assert shapes(state) == {k: shape for k, (shape, _) in expected.items()}
    assert "model.attn_mask" not in state and enc.width == 1024 and enc.num_layers == 24


def test_sd1_layout_matches_checkpoint_through_conversion():
    expected = read_layout("sd-v1.tsv", "cond_stage_model.transformer.")
    hf = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
          for k, (shape, dtype) in expected.items()}
    with torch.device("meta"):
        enc = OpenCLIPTextEncoder("ViT-L-14", **SD1_OPTIONS)
    assert shapes(convert_hf_clip_text_state_dict(hf)) == shapes(enc.state_dict())
    assert "model.text_projection" not in enc.state_dict() and enc.width == 768
    exported = to_hf_clip_text_state_dict(enc.state_dict())
    assert {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in exported.items()} == expected


def test_conversion_without_text_model_level_and_bad_keys():
    hf = {"embeddings.token_embedding.weight": torch.zeros(3, 2), "final_layer_norm.bias": torch.ones(2),
          **{f"encoder.layers.0.self_attn.{p}_proj.bias": torch.full((2,), float(i)) for i, p in enumerate("qkv")}}
    out = convert_hf_clip_text_state_dict(hf)
    assert set(out) == {"model.token_embedding.weight", "model.ln_final.bias",
                        "model.transformer.resblocks.0.attn.in_proj_bias"}
    assert out["model.transformer.resblocks.0.attn.in_proj_bias"].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="cond_stage_model.transformer"):
        convert_hf_clip_text_state_dict({"cond_stage_model.transformer.text_model.final_layer_norm.bias": 0})
    with pytest.raises(ValueError, match="q/k/v"):
        convert_hf_clip_text_state_dict({"encoder.layers.0.self_attn.q_proj.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="projection=False"):
        to_hf_clip_text_state_dict(tiny().state_dict())


# --- weights files --------------------------------------------------------------------------------------

def test_ckpt_path_round_trip_and_errors(tmp_path):
    src = tiny()
    path = tmp_path / "text.safetensors"
    save_file(src.state_dict(), str(path))
    loaded = tiny(ckpt_path=path)
    torch.testing.assert_close(loaded(["a cat"]), src(["a cat"]))
    pickle_path = tmp_path / "named-like-safetensors.safetensors"  # format comes from bytes, not the name
    torch.save({"state_dict": src.state_dict()}, pickle_path)
    torch.testing.assert_close(tiny(ckpt_path=pickle_path)(["a cat"]), src(["a cat"]))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        tiny(ckpt_path=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not fit") as info:
        OpenCLIPTextEncoder("ldm-small-text", ckpt_path=path)
    assert "\n" not in str(info.value) and "shape mismatch" in str(info.value)
    with pytest.raises(ValueError, match="missing .*text_projection"):
        tiny(ckpt_path=_saved(tmp_path, tiny(projection=False).state_dict()))


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "other.pt"
    torch.save(state, path)
    return path


def test_equals_open_clip_encode_text_internals(tmp_path):
    te.register_text_archs()  # makes "ldm-tiny-text" known to open_clip itself
    clip = open_clip.create_model("ldm-tiny-text", pretrained=None).eval()
    path = tmp_path / "open_clip.pt"
    torch.save(clip.state_dict(), path)  # open_clip names, visual.* included
    last = tiny(layer="last", ckpt_path=path)
    penultimate = tiny(ckpt_path=path)
    tokens = open_clip.tokenize(["a red square", "", "two cats"])
    torch.testing.assert_close(last.tokenize(["a red square", "", "two cats"]), tokens)

    captured = {}
    handle = clip.ln_final.register_forward_hook(lambda m, i, o: captured.update(tokens=o))
    with torch.no_grad():
        pooled = clip.encode_text(tokens)
        handle.remove()
        inner = clip.forward_intermediates(text=tokens, text_indices=[0], normalize_intermediates=True,
                                           intermediates_only=True)["text_intermediates"][0]
    ours = last.encode_tokens(tokens)
    torch.testing.assert_close(ours, captured["tokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(penultimate.encode_tokens(tokens), inner, atol=1e-5, rtol=1e-5)
    eot_rows = ours[torch.arange(3), tokens.argmax(dim=-1)]
    torch.testing.assert_close(eot_rows @ last.model.text_projection, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_block_equals_open_clip_block_with_gradients(precision):
    """The text blocks run through _plain_block_forward (contiguous projections, one sdpa call); outputs and
    gradients equal open_clip's own block, and SD's archs take that path."""
    torch.manual_seed(0)
    enc = tiny(layer="last", freeze=False).train()
    block = enc.model.transformer.resblocks[0]
    assert all(te._is_plain_block(b) for b in enc.model.transformer.resblocks)
    x = torch.randn(3, 7, enc.width, requires_grad=True)
    mask = enc.model.attn_mask[:7, :7]
    batch_first = getattr(enc.model.transformer, "batch_first", False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    outs, grads = [], []
    def open_clip_block(t):
        return block(t, attn_mask=mask) if batch_first else block(t.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    for fn in (lambda t: te._plain_block_forward(block, t, mask), open_clip_block):
        block.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            out = fn(x)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    tol = dict(atol=2e-2, rtol=2e-2) if precision == "bf16" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)
    with torch.device("meta"):
        for arch in ("ViT-L-14", "ViT-H-14"):
            big = OpenCLIPTextEncoder(arch, **(SD1_OPTIONS if arch == "ViT-L-14" else {}))
            assert te._is_plain_block(big.model.transformer.resblocks[0]), arch


def test_sd1_equivalence_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move norms and biases off their ones/zeros init
    hf_state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in hf.state_dict().items()}
    enc = tiny(**SD1_OPTIONS)
    enc.load_state_dict(convert_hf_clip_text_state_dict(hf_state), strict=True)
    prompts = ["a red square", "", "a blue circle on a green background"]
    tokens = enc.tokenize(prompts)
    with torch.no_grad():
        expected = hf(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(enc(prompts), expected, atol=1e-5, rtol=1e-5)

    round_trip = to_hf_clip_text_state_dict(convert_hf_clip_text_state_dict(hf_state))
    assert set(round_trip) == set(hf_state) | {"text_model.embeddings.position_ids"}
    for key, value in hf_state.items():
        torch.testing.assert_close(round_trip[key], value)

    path = tmp_path / "clip_text.safetensors"  # a transformers-named file loads through ldm.convert
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    enc = tiny(**SD1_OPTIONS)
    load_text_encoder_weights(enc, path)
    torch.testing.assert_close(enc(prompts), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="transformers CLIP names .*load_text_encoder_weights"):
        tiny(**SD1_OPTIONS, ckpt_path=path)  # the model layer reads its own and open_clip's names only
