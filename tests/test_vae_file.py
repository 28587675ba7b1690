"""--vae FILE / pipe.load_vae: a separate VAE file in SD's, first_stage_model.* or diffusers' names, strictly."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.vae import load_vae
from ldm.cli import common
from ldm.convert.vae_layout import vae_state_dict
from ldm.io import CheckpointError, model_hash
from tiny_models import tiny_ckpt, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _diffusers_vae(seed=3):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64).eval()


@pytest.mark.parametrize("layout", ["sd", "prefixed", "ckpt-with-loss"])
def test_sd_named_vae_files_replace_the_first_stage(tmp_path, layout):
    model, donor = tiny_model(seed=0), tiny_model(seed=1)
    sd = donor.first_stage_model.state_dict()
    if layout == "prefixed":
        sd = {"first_stage_model." + k: v for k, v in sd.items()}
        sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # a whole checkpoint: only its VAE is taken
        path = _save(sd, tmp_path / "full.safetensors")
    elif layout == "ckpt-with-loss":  # the ft-MSE VAE's .ckpt also holds the training loss and EMA counters
        sd = {**sd, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4),
              "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(7)}
        path = tmp_path / "vae.ckpt"
        torch.save({"state_dict": sd}, path)
    else:
        path = _save(sd, tmp_path / "vae.safetensors")
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    info = load_vae(model, path)
    for k, v in model.first_stage_model.state_dict().items():
        assert torch.equal(v, donor.first_stage_model.state_dict()[k]), k
    assert all(torch.equal(v, unet_before[k]) for k, v in model.model.state_dict().items())
    assert info.name == path.name and info.hash == model_hash(path)


def test_diffusers_named_vae_decodes_as_diffusers_does(tmp_path):
    theirs = _diffusers_vae()
    path = _save(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    model = tiny_model()
    load_vae(model, path)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.first_stage_model.decode(z)
        reference = theirs.decode(z).sample
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(model.first_stage_model.encode(x).mode(), theirs.encode(x).latent_dist.mode(),
                                   rtol=1e-4, atol=1e-4)


def test_old_diffusers_attention_names_map_too():
    sd = {"encoder.mid_block.attentions.0.query.weight": torch.zeros(8, 8),
          "decoder.mid_block.attentions.0.proj_attn.bias": torch.zeros(8),
          "decoder.up_blocks.0.upsamplers.0.conv.weight": torch.zeros(1),
          "decoder.up_blocks.1.resnets.2.conv_shortcut.weight": torch.zeros(1),
          "decoder.conv_norm_out.weight": torch.zeros(1)}
    out = vae_state_dict(sd)
    assert set(out) == {"encoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.bias",
                        "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.2.nin_shortcut.weight",
                        "decoder.norm_out.weight"}
    assert out["encoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)


def test_a_vae_that_does_not_fit_is_one_line_and_changes_nothing(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    sd = dict(model.first_stage_model.state_dict())
    sd["decoder.conv_out.weight"] = torch.zeros(3, 64, 3, 3)
    del sd["quant_conv.bias"]
    with pytest.raises(CheckpointError, match=r"does not fit this model's VAE: 1 missing \(quant_conv.bias\); "
                                              r"1 shape mismatch") as e:
        load_vae(model, _save(sd, tmp_path / "bad.safetensors"))
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.first_stage_model.state_dict().items())


def test_vae_flag_in_a_subprocess_records_the_vae(tmp_path, tiny_ckpt, capsys):
    import os

    from ldm.cli import sample as cli

    donor = tiny_model(seed=1)
    path = _save(donor.first_stage_model.state_dict(), tmp_path / "other-vae.safetensors")
    flags = ["--ckpt", str(tiny_ckpt), "--steps", "2", "--H", "32", "--W", "32", "--device", "cpu", "--n_samples",
             "1", "--skip_grid", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), *flags, "--outdir", str(tmp_path / "vae"),
                             "--vae", str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    params = common.read_png_parameters(tmp_path / "vae" / "samples" / "00000.png")
    assert params["vae"] == "other-vae.safetensors" and params["vae_hash"] == model_hash(path)
    assert cli.main([*flags, "--outdir", str(tmp_path / "plain")]) == 0
    assert "vae" not in common.read_png_parameters(tmp_path / "plain" / "samples" / "00000.png")
    plain = (tmp_path / "plain" / "samples" / "00000.png").read_bytes()
    assert plain != (tmp_path / "vae" / "samples" / "00000.png").read_bytes()
    capsys.readouterr()
    assert cli.main([*flags, "--outdir", str(tmp_path), "--vae", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "VAE file not found" in err and err.count("\n") == 1
