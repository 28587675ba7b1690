"""KL autoencoder: SD layout, posterior, attention numerics, tiling, checkpoint loading (tiny CPU models)."""
import argparse
import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.io import read_state_dict
from ldm.models.autoencoder import (AttnBlock, AutoencoderKL, DiagonalGaussianDistribution, _axis_weights,
                                    _tile_starts, _tiled)
from sd_layout import layout_shapes

SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                   ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
TINY = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(dict(TINY, **overrides), embed_dim=4).eval()


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of ``a`` against ``ref``, peak = ``ref``'s value range."""
    peak = ref.max() - ref.min()
    return (10 * torch.log10(peak ** 2 / (a - ref).pow(2).mean())).item()


# -- layout and shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tsv", ["sd-v1.tsv", "sd-v2.tsv"])
def test_sd_kl_f8_has_exact_checkpoint_layout(tsv):
    with torch.device("meta"):
        vae = AutoencoderKL(SD_DDCONFIG, embed_dim=4, lossconfig={"target": "torch.nn.Identity"})
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = layout_shapes(tsv, "first_stage_model.")
    assert len(expected) == 248
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert vae.downsample_factor == 8


def test_encode_decode_shapes():
    vae = tiny_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, 16, 16) and posterior.parameters.shape == (2, 8, 16, 16)
    assert vae.decode(posterior.sample()).shape == (2, 3, 32, 32)
    dec, post = vae(x, sample_posterior=False)
    assert dec.shape == x.shape and torch.equal(dec, vae.decode(post.mode()))
    assert vae.downsample_factor == 2
    assert vae.get_last_layer() is vae.decoder.conv_out.weight


def test_attention_resolutions_add_blocks_and_run():
    vae = tiny_vae(attn_resolutions=[16])
    names = set(vae.state_dict())
    assert "encoder.down.1.attn.0.q.weight" in names and "decoder.up.1.attn.1.proj_out.weight" in names
    assert "encoder.down.0.attn.0.q.weight" not in names and "decoder.up.0.attn.0.q.weight" not in names
    assert vae(torch.randn(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)


def test_decoder_up0_is_highest_resolution():
    vae = tiny_vae()
    assert not hasattr(vae.decoder.up[0], "upsample") and hasattr(vae.decoder.up[1], "upsample")
    assert vae.decoder.up[0].block[0].conv1.weight.shape == (32, 64, 3, 3)


@pytest.mark.parametrize("bad, match", [(dict(ch=40), "multiple of 32"), (dict(ch_mult=[]), "ch_mult"),
                                        (dict(double_z=False), "double_z"),
                                        (dict(attn_type="linear"), "attn_type")])
def test_bad_ddconfig_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae(**bad)


def test_bad_input_rank_errors():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="encode expects"):
        vae.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.randn(4, 16, 16))


# -- numerics -------------------------------------------------------------------------------------------

def test_mid_attention_matches_handwritten_softmax():
    attn = AttnBlock(64)
    for p in attn.parameters():  # random affine/bias too, so every parameter matters
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 5, 7)
    b, c, h, w = x.shape
    hn = attn.norm(x)
    q = attn.q(hn).reshape(b, c, h * w).permute(0, 2, 1)   # (b, hw, c)
    k = attn.k(hn).reshape(b, c, h * w)                    # (b, c, hw)
    v = attn.v(hn).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)     # (b, hw_q, hw_k)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    expected = x + attn.proj_out(out)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_groupnorm_and_downsample_follow_reference():
    vae = tiny_vae()
    norm = vae.encoder.norm_out
    assert (norm.num_groups, norm.eps, norm.affine) == (32, 1e-6, True)
    down = vae.encoder.down[0].downsample
    x = torch.randn(1, 32, 8, 8)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight,
                                     down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)
    assert down(x).shape == (1, 32, 4, 4)


# -- posterior ------------------------------------------------------------------------------------------

def test_posterior_mode_sample_and_kl():
    params = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussianDistribution(params)
    assert torch.equal(post.mode(), params[:, :4]) and torch.equal(post.mean, params[:, :4])
    s1 = post.sample(torch.Generator().manual_seed(7))
    s2 = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mean)
    assert post.kl().shape == (3,) and (post.kl() > 0).all()
    assert torch.allclose(post.kl(post), torch.zeros(3), atol=1e-5)


def test_posterior_per_item_generators_match_batch_of_one():
    params = torch.randn(3, 8, 4, 4)
    batch = DiagonalGaussianDistribution(params).sample([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for i, seed in enumerate((1, 2, 3)):
        single = DiagonalGaussianDistribution(params[i:i + 1]).sample([torch.Generator().manual_seed(seed)])
        assert torch.equal(batch[i:i + 1], single)
    assert not torch.equal(batch[0], batch[1])
    with pytest.raises(ValueError, match="one generator per batch item"):
        DiagonalGaussianDistribution(params).sample([torch.Generator()])


def test_posterior_standard_normal_kl_zero_and_nll():
    post = DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3))
    torch.testing.assert_close(post.kl(), torch.zeros(2))
    sample = torch.randn(2, 4, 3, 3)
    expected = 0.5 * (torch.log(torch.tensor(2 * torch.pi)) + sample ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(sample), expected)
    # logvar clamped to [-30, 20]
    extreme = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 99.)], 1))
    assert extreme.logvar.max().item() == 20.0
    det = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(2))


# -- tiling ---------------------------------------------------------------------------------------------

def test_blend_weights_are_linear_ramps_over_the_overlap():
    first, second = _axis_weights([0, 4], tile=8, length=12, ramp=4)
    ramp = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    torch.testing.assert_close(first, torch.cat([torch.ones(4, dtype=torch.float64), ramp.flip(0)]))
    torch.testing.assert_close(second, torch.cat([ramp, torch.ones(4, dtype=torch.float64)]))
    assert _tile_starts(12, 8, 4) == [0, 4] and _tile_starts(48, 24, 6) == [0, 12, 24]


@pytest.mark.parametrize("size, tile, overlap", [(48, 12, 0.25), (50, 16, 0.5), (37, 8, 0.0), (10, 16, 0.25)])
def test_tile_blending_is_exact_for_a_local_op(size, tile, overlap):
    """Blend weights sum to one and tiles land where they belong: a position-wise op tiles exactly."""
    x = torch.randn(2, 3, size, size + 5)
    op = lambda t: torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest") * 2 + 1  # noqa: E731
    torch.testing.assert_close(_tiled(op, x, tile, overlap, 1, 4), op(x))
    shrink = lambda t: torch.nn.functional.avg_pool2d(t, 2)  # noqa: E731
    x2 = torch.randn(1, 2, 2 * size, 2 * size)
    torch.testing.assert_close(_tiled(shrink, x2, tile, overlap, 2, 1), shrink(x2))


@torch.no_grad()
def test_tiled_decode_close_to_full_decode():
    vae = tiny_vae()
    z = torch.randn(1, 4, 48, 48)
    full = vae.decode(z)
    tiled = vae.enable_tiling(tile_size=48, overlap=0.25).decode(z)   # 24-latent tiles, 3 per axis
    hard = vae.enable_tiling(tile_size=48, overlap=0.0).decode(z)
    assert tiled.shape == full.shape == (1, 3, 96, 96)
    # GroupNorm statistics and the mid attention differ per tile, so not equal; but close, with a margin
    # against an image one latent off (~17 dB here) and above hard-edged tiles (~29 dB).
    assert psnr(tiled, full) > 33.0
    assert psnr(tiled, full) > psnr(hard, full) + 3.0
    assert psnr(vae.disable_tiling().decode(torch.roll(z, 1, dims=-1)), full) < 25.0


@torch.no_grad()
def test_tiled_encode_close_to_full_encode():
    vae = tiny_vae()
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    full = vae.encode(x)
    tiled = vae.enable_tiling(tile_size=48, overlap=0.25).encode(x)
    assert tiled.parameters.shape == full.parameters.shape == (1, 8, 48, 48)
    assert psnr(tiled.mean, full.mean) > 33.0
    assert psnr(tiled.logvar, full.logvar) > 33.0
    with pytest.raises(ValueError, match="divisible by 2"):
        vae.encode(torch.rand(1, 3, 97, 96))


@torch.no_grad()
def test_tiled_decode_only_sees_tiles():
    """Memory stays bounded: no decoder activation is larger than one tile's."""
    vae = tiny_vae().enable_tiling(tile_size=16, overlap=0.25)   # 8-latent tiles
    seen, largest = [], [0]
    vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    for module in vae.decoder.modules():
        module.register_forward_hook(lambda m, i, o: largest.__setitem__(0, max(largest[0], o.numel())))
    out = vae.decode(torch.randn(1, 4, 40, 24))
    assert out.shape == (1, 3, 80, 48)
    assert set(seen) == {(8, 8)} and len(seen) == 7 * 4   # ceil((40 - 2) / 6) x ceil((24 - 2) / 6) tiles
    assert largest[0] <= 64 * 8 * 8 * 4          # widest layer x tile pixels, far below 64 * 80 * 48


def test_small_inputs_and_disabled_tiling_bypass_tiles():
    vae = tiny_vae()
    z = torch.randn(1, 4, 16, 16)
    full = vae.decode(z)
    assert torch.equal(vae.enable_tiling(tile_size=32).decode(z), full)    # fits in one tile
    assert torch.equal(vae.enable_tiling(tile_size=8).disable_tiling().decode(z), full)


@pytest.mark.parametrize("kwargs, match", [(dict(tile_size=7), "multiple"), (dict(overlap=0.7), "overlap"),
                                           (dict(latent_tile_size=0), "latent_tile_size")])
def test_enable_tiling_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae().enable_tiling(**kwargs)


@pytest.mark.slow
@torch.no_grad()
def test_decode_2048_pixels_in_bounded_memory():
    """256x256 latents of an f8 model decode with default tiles; no activation beyond a 512 px tile."""
    vae = AutoencoderKL(dict(TINY, ch_mult=[1, 1, 1, 1], resolution=64), embed_dim=4).eval().enable_tiling()
    assert vae.tile_latent_size == 64
    largest = [0]
    for module in vae.decoder.modules():
        module.register_forward_hook(lambda m, i, o: largest.__setitem__(0, max(largest[0], o.numel())))
    out = vae.decode(torch.randn(1, 4, 256, 256))
    assert out.shape == (1, 3, 2048, 2048) and torch.isfinite(out).all()
    assert largest[0] <= 32 * 512 * 512


# -- checkpoints ----------------------------------------------------------------------------------------

def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_ckpt_path_loads_safetensors_and_torch_files(tmp_path):
    src = tiny_vae()
    sd = src.state_dict()
    save_file(sd, tmp_path / "vae.ckpt")                  # safetensors bytes behind a .ckpt name
    _assert_same_weights(src, AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "vae.ckpt"))
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.out.0.weight"] = torch.ones(3)
    torch.save({"state_dict": full, "global_step": 3}, tmp_path / "sd.safetensors")   # torch zip bytes
    _assert_same_weights(src, AutoencoderKL(TINY, 4, ckpt_path=str(tmp_path / "sd.safetensors")))
    torch.save(dict(sd, **{"loss.logvar": torch.zeros(())}), tmp_path / "vae_with_loss.pt")
    _assert_same_weights(src, AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "vae_with_loss.pt"))
    assert set(read_state_dict(tmp_path / "vae.ckpt")[0]) == set(sd)


def test_ckpt_path_errors(tmp_path, caplog):
    sd = tiny_vae().state_dict()
    with pytest.raises(ValueError, match="checkpoint not found"):
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "nope.ckpt")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not weights")
    with pytest.raises(ValueError, match="neither a safetensors nor a PyTorch checkpoint"):
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "junk.bin")

    partial = {k: v for k, v in sd.items() if k != "quant_conv.bias"}
    save_file(dict(partial, extra_head=torch.zeros(1)), tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"1 missing \(quant_conv\.bias\); 1 unexpected \(extra_head\)") as err:
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "partial.safetensors")
    assert "\n" not in str(err.value)

    save_file(dict(sd, extra_head=torch.zeros(1)), tmp_path / "extra.safetensors")
    with caplog.at_level(logging.INFO, logger="ldm.models.autoencoder"):
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "extra.safetensors", ignore_keys=["extra_"])
    assert "ignore_keys drops 1" in caplog.text

    save_file(tiny_vae(z_channels=8).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch .*conv_in\.weight \(64, 8, 3, 3\) vs model \(64, 4, 3, 3\)"):
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "wide.safetensors")

    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="pickled.ckpt"):   # never unpickled beyond weights_only
        AutoencoderKL(TINY, 4, ckpt_path=tmp_path / "pickled.ckpt")


def test_builds_from_sd_style_config():
    from omegaconf import OmegaConf

    from ldm.config import check_config, instantiate_from_config
    node = OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": TINY,
        "lossconfig": {"target": "torch.nn.Identity"}}})
    check_config(node)
    vae = instantiate_from_config(node)
    assert isinstance(vae, AutoencoderKL) and vae.monitor == "val/rec_loss"
    assert not any(k.startswith("loss") for k in vae.state_dict())


@torch.no_grad()
def test_module_is_dtype_agnostic():
    vae = tiny_vae().to(torch.bfloat16)
    posterior = vae.encode(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16))
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert z.dtype == torch.bfloat16 and vae.decode(z).dtype == torch.bfloat16
    tiled = vae.enable_tiling(tile_size=16).decode(torch.randn(1, 4, 24, 24, dtype=torch.bfloat16))
    assert tiled.dtype == torch.bfloat16 and torch.isfinite(tiled).all()
