import math

import pytest
import torch

from ldm.config import ConfigError, instantiate_from_config
from ldm.models.attention import CrossAttention, SpatialTransformer
from ldm.models.unet import AttentionBlock, ResBlock, UNetModel, timestep_embedding
from sd_layout import layout_shapes

PREFIX = "model.diffusion_model."

SD_V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
             num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
             transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
SD_V2 = dict(SD_V1, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)


def tiny(**overrides):
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                  context_dim=16, legacy=False)
    params.update(overrides)
    return UNetModel(**params)


def randomize(model, std=0.1):
    """Random weights everywhere (the zero-initialised output convs would hide most of the network)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def inputs(batch=2, size=8, ctx_len=5, ctx_dim=16):
    return torch.randn(batch, 4, size, size), torch.tensor([3, 700][:batch]), torch.randn(batch, ctx_len, ctx_dim)


@pytest.mark.parametrize("params,layout", [(SD_V1, "sd-v1.tsv"), (SD_V2, "sd-v2.tsv")], ids=["v1", "v2"])
def test_full_size_names_and_shapes_match_sd(params, layout):
    expected = layout_shapes(layout, "model.diffusion_model.")
    assert len(expected) == 686
    with torch.device("meta"):
        model = UNetModel(**params)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: s for k, s in got.items() if expected[k] != s} == {}
    weights = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    model.load_state_dict(weights, strict=True, assign=True)


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_tiny_output_shape(use_linear):
    model = randomize(tiny(use_linear_in_transformer=use_linear, num_heads=-1, num_head_channels=16))
    x, t, ctx = inputs(size=16)
    out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    proj = model.input_blocks[1][1].proj_in
    assert proj.weight.dim() == (2 if use_linear else 4)


def test_fresh_model_outputs_zero():
    x, t, ctx = inputs()
    assert not tiny()(x, t, ctx).any()  # the final conv is zero-initialised, as the reference


def test_block_indices_follow_the_original():
    model = tiny(num_res_blocks=2)
    kinds = [[type(m).__name__ for m in block] for block in model.input_blocks]
    assert kinds == [["Conv2d"], ["ResBlock", "SpatialTransformer"], ["ResBlock", "SpatialTransformer"],
                     ["Downsample"], ["ResBlock", "SpatialTransformer"], ["ResBlock", "SpatialTransformer"]]
    assert [type(m).__name__ for m in model.middle_block] == ["ResBlock", "SpatialTransformer", "ResBlock"]
    kinds = [[type(m).__name__ for m in block] for block in model.output_blocks]
    assert kinds == [["ResBlock", "SpatialTransformer"]] * 2 + [["ResBlock", "SpatialTransformer", "Upsample"]] + \
        [["ResBlock", "SpatialTransformer"]] * 3
    assert model.time_embed[0].out_features == 128


def test_timestep_embedding_hand_computed():
    t = torch.tensor([0.0, 1.0, 10.0])
    emb = timestep_embedding(t, 4)
    f1 = math.exp(-math.log(10000) / 2)  # freqs: exp(-ln(10000) * i / half), i = 0, 1
    expected = torch.tensor([[math.cos(v), math.cos(v * f1), math.sin(v), math.sin(v * f1)] for v in (0.0, 1.0, 10.0)])
    torch.testing.assert_close(emb, expected)
    odd = timestep_embedding(t, 5)
    assert odd.shape == (3, 5) and not odd[:, -1].any()


def test_scalar_timestep_is_broadcast():
    model = randomize(tiny())
    x, _, ctx = inputs()
    torch.testing.assert_close(model(x, 42, ctx), model(x, torch.tensor([42, 42]), ctx))


def _run(model, x, t, ctx):
    out = model(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad.clone()


def test_gradient_checkpointing_matches(monkeypatch):
    plain = randomize(tiny(dropout=0.1, use_checkpoint=False)).train()
    ckpt = tiny(dropout=0.1, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, t, ctx = inputs()
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks in both runs
        results.append(_run(model, x.clone().requires_grad_(), t, ctx))
    assert len(calls) > 0  # checkpointing really ran (res blocks and transformer blocks)
    (out_a, grads_a, xg_a), (out_b, grads_b, xg_b) = results
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(xg_b, xg_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


@pytest.mark.parametrize("backend,slice_size", [("math", None), ("math", 7), ("sdpa", 3), ("auto", None)])
def test_attention_backends_agree(backend, slice_size):
    model = randomize(tiny(num_heads=4))
    x, t, ctx = inputs()
    expected = model(x, t, ctx)
    model.set_attention_backend(backend, slice_size)
    assert {(m.backend, m.slice_size) for m in model.modules() if isinstance(m, CrossAttention)} == \
        {(backend, slice_size)}
    torch.testing.assert_close(model(x, t, ctx), expected, atol=1e-4, rtol=1e-4)


def test_constructor_backend_option():
    model = tiny(attention_backend="math", attention_slice_size=2)
    assert all(m.backend == "math" and m.slice_size == 2 for m in model.modules() if isinstance(m, CrossAttention))


def test_unconditional_attention_block_unet_runs():
    for order in (False, True):
        model = randomize(tiny(use_spatial_transformer=False, context_dim=None, legacy=True,
                               use_new_attention_order=order, num_head_channels=16, num_heads=-1,
                               use_scale_shift_norm=True, resblock_updown=True, channel_mult=[1, 2, 2]))
        x, t, _ = inputs()
        assert model(x, t).shape == x.shape
    assert isinstance(model.input_blocks[1][1], AttentionBlock) and model.input_blocks[1][1].num_heads == 2
    assert isinstance(model.input_blocks[2][0], ResBlock) and model.input_blocks[2][0].updown
    assert model.input_blocks[1][0].emb_layers[1].out_features == 64  # scale and shift


def _legacy_attention(qkv, heads):
    """The original QKVAttentionLegacy, written out."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def test_attention_block_orders_match_reference():
    legacy = randomize(AttentionBlock(64, num_heads=2))
    x = torch.randn(2, 64, 4, 4)
    flat = x.reshape(2, 64, 16)
    h = _legacy_attention(legacy.qkv(legacy.norm(flat)), 2)
    expected = (flat + legacy.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(legacy(x), expected, atol=1e-5, rtol=1e-5)
    # new order: [q of all heads, k of all heads, v of all heads] instead of [q k v of head 0, head 1]
    new = AttentionBlock(64, num_heads=2, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    perm = torch.arange(192).reshape(2, 3, 32).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[perm])
        new.qkv.bias.copy_(legacy.qkv.bias[perm])
    torch.testing.assert_close(new(x), legacy(x), atol=1e-5, rtol=1e-5)


def test_per_level_options():
    model = tiny(num_res_blocks=2, transformer_depth=[1, 2], num_attention_blocks=[1, 2],
                 disable_self_attentions=[True, False], disable_middle_self_attn=True)
    assert len(model.input_blocks[1]) == 2 and len(model.input_blocks[2]) == 1  # only 1 attention at level 0
    assert len(model.input_blocks[4][1].transformer_blocks) == 2
    assert len(model.middle_block[1].transformer_blocks) == 2  # middle uses the last level's depth
    assert model.input_blocks[1][1].transformer_blocks[0].disable_self_attn
    assert not model.input_blocks[4][1].transformer_blocks[0].disable_self_attn
    assert model.middle_block[1].transformer_blocks[0].disable_self_attn
    x, t, ctx = inputs()
    assert model(x, t, ctx).shape == x.shape


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=3), "num_heads=3 does not divide the 32 channels"),
    (dict(num_heads=-1, num_head_channels=24), "num_head_channels=24 does not divide"),
    (dict(num_heads=-1), "neither num_heads nor num_head_channels"),
    (dict(dims=3), "dims=3 is not supported"),
    (dict(num_classes="continuous"), "num_classes='continuous' is not supported"),
    (dict(num_classes="sequential"), "needs adm_in_channels"),
    (dict(n_embed=8), "n_embed=8"),
    (dict(model_channels=48), "not a multiple of 32"),
    (dict(context_dim=None), "needs context_dim"),
    (dict(use_spatial_transformer=False), "use_spatial_transformer is False"),
    (dict(transformer_depth=[1, 1, 1]), "transformer_depth has 3 entries"),
    (dict(num_attention_blocks=[2, 1]), r"num_attention_blocks\[0\]=2 exceeds"),
])
def test_bad_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny(**overrides)
    assert "\n" not in str(info.value)


def test_bad_config_through_instantiate_names_the_node():
    node = {"target": "ldm.models.unet.UNetModel",
            "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                           attention_resolutions=[1], channel_mult=[1, 2], num_heads=3, dims=2)}
    with pytest.raises(ConfigError, match="unet_config: cannot build .*num_heads=3"):
        instantiate_from_config(node, path="unet_config")


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="must be \\[batch, 4, height, width\\]"):
        model(torch.randn(2, 3, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(2, 4, 7, 7), t, ctx)
    with pytest.raises(ValueError, match="timesteps must be a scalar or shaped \\[2\\]"):
        model(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="y=None"):
        model(x, t, ctx, y=torch.tensor([0, 1]))


def test_bf16_autocast_runs():
    model = randomize(tiny())
    x, t, ctx = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, ctx), atol=0.15, rtol=0.1)


def test_unet_groupnorm_runs_in_fp32_and_casts_back(monkeypatch):
    norm = tiny().input_blocks[1][0].in_layers[0]
    assert (norm.num_groups, norm.eps) == (32, 1e-5)
    seen = []
    real = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm",
                        lambda x, *a, **kw: seen.append(x.dtype) or real(x, *a, **kw))
    out = norm(torch.randn(1, 32, 4, 4).bfloat16())
    assert seen == [torch.float32] and out.dtype == torch.bfloat16


def test_spatial_transformer_uses_checkpoint_flag():
    assert all(b.checkpoint for m in tiny(use_checkpoint=True).modules() if isinstance(m, SpatialTransformer)
               for b in m.transformer_blocks)
    assert not any(b.checkpoint for m in tiny(use_checkpoint=False).modules() if isinstance(m, SpatialTransformer)
                   for b in m.transformer_blocks)


def test_coordinate_features_hand_computed():
    from ldm.models.unet import coordinate_features

    f = coordinate_features(2, 4)
    assert f.shape == (1, 16, 2, 4)
    u = torch.tensor([-0.75, -0.25, 0.25, 0.75])  # pixel centres of 4 columns in (-1, 1)
    assert torch.allclose(f[0, 0, 1], torch.sin(math.pi * 0.5 * u))        # x, sin, f = 0.5: along the row
    assert torch.allclose(f[0, 4 + 3, 0], torch.cos(math.pi * 4.0 * u))    # x, cos, f = 4
    assert torch.allclose(f[0, 8, :, 0], torch.sin(math.pi * 0.5 * torch.tensor([-0.5, 0.5])))  # y: down a column
    assert torch.equal(f[0, :8, 0], f[0, :8, 1]) and torch.equal(f[0, 8:, :, 0], f[0, 8:, :, 3])


def test_position_embedding_is_an_optional_zero_initialised_addition():
    torch.manual_seed(0)
    plain = randomize(tiny())
    with_pos = tiny(position_embedding=True)
    assert "pos_embed.weight" not in plain.state_dict()        # SD layouts are unchanged (test above)
    missing = with_pos.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["pos_embed.bias", "pos_embed.weight"]
    x, t, ctx = inputs(size=16)
    assert torch.equal(with_pos(x, t, ctx), plain(x, t, ctx))  # zero-initialised: same output

    # Trained, it adds a position-dependent term (not a constant one).
    with torch.no_grad():
        with_pos.pos_embed.weight.normal_(std=0.5)
    diff = with_pos(x, t, ctx) - plain(x, t, ctx)
    assert diff.abs().amax() > 1e-2
    assert (diff - diff.mean(dim=(2, 3), keepdim=True)).abs().amax() > 1e-2
    # Any latent size, and the same under channels_last or not.
    contiguous = tiny(position_embedding=True, channels_last=False)
    contiguous.load_state_dict(with_pos.state_dict())
    for size in (8, 24):
        x = torch.randn(2, 4, size, size)
        assert torch.allclose(contiguous(x, t, ctx), with_pos(x, t, ctx), atol=1e-5)
