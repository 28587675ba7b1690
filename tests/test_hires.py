"""The hires fix (A1111's): first pass, upscale of the latents or the image, img2img pass of exactly N steps."""
import pytest
import torch
import torch.nn.functional as F

from ldm.cli import common
from ldm.cli import sample as cli
from ldm.diffusion import samplers
from ldm.pipeline import Text2Image
from tiny_models import tiny_ckpt  # noqa: F401  (fixture)

FAST = dict(steps=3, height=32, width=32, seeds=5, sampler="Euler")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return Text2Image.from_checkpoint(tiny_ckpt, device="cpu")


def spy_sample(monkeypatch) -> list[dict]:
    calls, original = [], samplers.sample

    def spy(spec, denoiser, noise, sigmas, *, init_latent=None, **kwargs):
        out = original(spec, denoiser, noise, sigmas, init_latent=init_latent, **kwargs)
        calls.append({"noise": noise, "sigmas": sigmas, "init": init_latent, "out": out})
        return out

    monkeypatch.setattr(samplers, "sample", spy)
    return calls


def test_latent_upscale_then_img2img_of_exactly_n_steps(pipe, monkeypatch):
    calls = spy_sample(monkeypatch)
    out = pipe("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=4, **FAST)
    assert out.images[0].size == (64, 64)
    first, second = calls
    assert first["init"] is None and first["out"].shape[-2:] == (4, 4)
    expected_init = F.interpolate(first["out"], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(second["init"], expected_init)
    # 4 steps: the tail of an 8-step schedule (4 / 0.5), as A1111 runs hires steps
    full = pipe.sigmas("Euler", 8)
    torch.testing.assert_close(second["sigmas"], full[4:])
    # new noise from each image's seed, at the larger size
    torch.testing.assert_close(second["noise"], torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)))
    params = out.parameters[0]
    assert (params["width"], params["height"]) == (32, 32)  # the first pass's size, as A1111 writes it
    line = common.format_parameters(params).splitlines()[-1]
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent" in line


def test_default_hires_steps_are_the_first_passs_and_nearest_mode(pipe, monkeypatch):
    calls = spy_sample(monkeypatch)
    out = pipe("a red circle", hires_scale=1.5, hires_upscaler="latent-nearest", **FAST)
    first, second = calls
    assert out.images[0].size == (48, 48) and len(second["sigmas"]) - 1 == 3
    torch.testing.assert_close(second["init"], F.interpolate(first["out"], size=(6, 6), mode="nearest"))
    assert "Hires steps" not in common.format_parameters(out.parameters[0])
    assert "Hires upscaler: Latent (nearest)" in common.format_parameters(out.parameters[0])


def test_image_upscaler_decodes_resizes_and_encodes(pipe, monkeypatch):
    seen, encode = [], pipe._encode

    def spy(pixels, generators):
        seen.append(pixels.shape)
        return encode(pixels, generators)

    monkeypatch.setattr(pipe, "_encode", spy)
    out = pipe("a red circle", hires_scale=2, hires_upscaler="image", **FAST)
    assert seen == [(1, 3, 64, 64)] and out.images[0].size == (64, 64)
    assert out.parameters[0]["hires_upscaler"] == "Lanczos"


def test_hires_changes_the_image_and_sizes_round_to_the_model(pipe):
    import numpy as np
    plain = pipe("a red circle", **FAST)
    fixed = pipe("a red circle", hires_scale=1.0, hires_strength=0.5, **FAST)  # a second pass at the same size
    assert fixed.images[0].size == plain.images[0].size
    assert not np.array_equal(np.asarray(fixed.images[0]), np.asarray(plain.images[0]))
    out = pipe("a red circle", hires_scale=1.3, **FAST)  # 41.6 px -> 32 (multiples of 16 for this model)
    assert out.images[0].size == (32, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hires_scale=0.5), "hires scale 0.5 is below 1"),
    (dict(hires_scale=2, hires_strength=0), "hires strength 0"),
    (dict(hires_scale=2, hires_steps=0), "hires steps is 0"),
    (dict(hires_scale=2, hires_upscaler="esrgan"), "hires upscaler 'esrgan' is unknown"),
])
def test_bad_hires_settings_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", **FAST, **kwargs)


def test_cli_hires_flags(tmp_path, tiny_ckpt, capsys):
    argv = ["--ckpt", tiny_ckpt, "--outdir", tmp_path, "--steps", "2", "--H", "32", "--W", "32", "--device", "cpu",
            "--n_samples", "1", "--hires-scale", "2", "--hires-strength", "0.6", "--hires-steps", "2"]
    assert cli.main([str(a) for a in argv]) == 0
    image = tmp_path / "samples" / "00000.png"
    params = common.read_png_parameters(image)
    assert (params["hires_scale"], params["hires_steps"], params["strength"]) == (2.0, 2, 0.6)
    assert params["hires_upscaler"] == "Latent" and (params["width"], params["height"]) == (32, 32)
    from PIL import Image
    assert Image.open(image).size == (64, 64)
    for bad, message in ((["--hires-strength", "0.5"], "need --hires-scale"),
                         (["--hires-scale", "2", "--init-img", image], "--hires-scale is for txt2img"),
                         (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength 1.5")):
        code = cli.main([str(a) for a in ["--ckpt", tiny_ckpt, *bad]])
        assert code == 2 and message in capsys.readouterr().err
