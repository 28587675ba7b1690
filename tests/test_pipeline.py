"""ldm.pipeline on a tiny random model (CPU, 32x32 or 64x64 images, 2-3 steps)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.samplers import SAMPLERS
from ldm.pipeline import Image2Image, Inpaint, Text2Image, resolve_device, resolve_precision
from tiny_models import tiny_ckpt, tiny_inpaint_ckpt  # noqa: F401  (fixtures)

FAST = dict(steps=2, height=32, width=32)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return Text2Image.from_checkpoint(tiny_ckpt, device="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def _spy_latents(pipe, monkeypatch) -> list:
    """Record the latents every decode gets."""
    seen, decode = [], pipe._decode

    def spy(latents):
        seen.append(latents.clone())
        return decode(latents)

    monkeypatch.setattr(pipe, "_decode", spy)
    return seen


def test_from_checkpoint_records_model_name_hash_and_default_size(pipe, tiny_ckpt):
    assert pipe.device == torch.device("cpu") and pipe.precision == "fp32"
    assert pipe.default_size == 64 and pipe.downsample_factor == 8
    assert pipe.model_name == "tiny"
    assert pipe.model_hash == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()[:10]


def test_txt2img_images_and_parameters(pipe):
    out = pipe(["a red circle", "a blue square"], negative_prompts="blurry", seeds=7, steps=2,
               sampler="dpmpp_2m_karras", guidance_scale=5.0)
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]  # the model's default size
    assert all(im.mode == "RGB" for im in out.images)
    first, second = out.parameters
    assert first["prompt"] == "a red circle" and second["prompt"] == "a blue square"
    assert first["negative_prompt"] == "blurry" and first["sampler"] == "DPM++ 2M Karras"
    assert (first["seed"], second["seed"]) == (7, 8)
    assert (first["width"], first["height"], first["steps"], first["cfg_scale"]) == (64, 64, 2, 5.0)
    assert first["model"] == "tiny" and len(first["model_hash"]) == 10
    assert _pixels(out.images[0]).std() > 1  # not a flat image


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM"])
def test_image_depends_on_its_seed_only_not_on_the_batch(pipe, sampler):
    batch = pipe(["a red circle"] * 3, seeds=10, sampler=sampler, batch_size=3, **FAST)
    single = pipe("a red circle", seeds=12, sampler=sampler, **FAST)
    assert _max_diff(batch.images[2], single.images[0]) <= 1  # float noise of batched kernels only
    assert _max_diff(batch.images[0], batch.images[1]) > 10


def test_same_seed_same_image_and_batch_size_splits_the_work(pipe):
    a = pipe(["a red circle"] * 2, seeds=3, batch_size=1, **FAST)
    b = pipe(["a red circle"] * 2, seeds=[3, 4], batch_size=2, **FAST)
    for x, y in zip(a.images, b.images):
        assert _max_diff(x, y) <= 1
    c = pipe("a red circle", seeds=3, **FAST)
    assert _max_diff(c.images[0], a.images[0]) == 0


def test_negative_prompt_changes_the_result(pipe):
    plain = pipe("a red circle", seeds=1, **FAST).images[0]
    negative = pipe("a red circle", negative_prompts="a green triangle", seeds=1, **FAST).images[0]
    assert _max_diff(plain, negative) > 10


def test_scale_one_skips_the_uncond_pass(pipe, monkeypatch):
    batches = []
    apply = pipe.model.apply_model
    monkeypatch.setattr(pipe.model, "apply_model", lambda x, t, c: batches.append(x.shape[0]) or apply(x, t, c))
    pipe(["a", "b"], guidance_scale=1.0, sampler="Euler", **FAST)
    assert batches == [2, 2]
    batches.clear()
    pipe(["a", "b"], guidance_scale=3.0, sampler="Euler", **FAST)
    assert batches == [4, 4]


def test_callback_sees_every_step(pipe):
    infos = []
    pipe(["a", "b", "c"], steps=3, height=32, width=32, batch_size=2, sampler="Heun", callback=infos.append)
    assert [(i["batch_start"], i["i"]) for i in infos] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2)]
    assert {i["total_steps"] for i in infos} == {3}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_registered_sampler_runs(pipe, name):
    out = pipe("a red circle", sampler=name, steps=2, height=32, width=32, seeds=0, guidance_scale=1.0)
    assert out.parameters[0]["sampler"] == name
    assert _pixels(out.images[0]).std() > 1


def test_bad_inputs_are_one_line_value_errors(pipe):
    cases = [
        (dict(height=56), "height 56 is not a positive multiple of 16"),  # VAE 8 x UNet 2
        (dict(width=0), "multiple of 16"),
        (dict(steps=0), "at least 1"),
        (dict(sampler="Euler z"), "unknown sampler"),
        (dict(seeds=[1, 2, 3]), "3 seeds for 1 images"),
        (dict(guidance_rescale=1.5), "outside [0, 1]"),
        (dict(negative_prompts=["x", "y"]), "2 negative prompts for 1 prompts"),
        (dict(guidance_scale=float("nan")), "guidance scale nan is not a finite number"),
        (dict(guidance_scale=float("inf")), "guidance scale inf is not a finite number"),
        (dict(seeds=2**32), "outside 0..4294967295"),
        (dict(seeds=[-1]), "outside 0..4294967295"),
        (dict(seeds=2**64), "outside 0..4294967295"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValueError, match=None) as info:
            pipe("a red circle", **kwargs)
        assert text in str(info.value) and "\n" not in str(info.value), kwargs
    with pytest.raises(ValueError, match="no prompts"):
        pipe([])


def test_the_last_seed_of_a_call_must_be_in_range_too(pipe):
    """torch keeps 32 bits of a seed: 2**32 would silently draw the noise of seed 0, so it is refused."""
    g = [torch.Generator().manual_seed(s) for s in (0, 2**32)]
    assert torch.equal(torch.randn(4, generator=g[0]), torch.randn(4, generator=g[1]))  # why it is refused
    pipe(["a", "b"], seeds=2**32 - 2, **FAST)
    with pytest.raises(ValueError, match=r"seed 4294967295 \+ 1 \(the last image's seed\) 4294967296 is outside"):
        pipe(["a", "b"], seeds=2**32 - 1, **FAST)


def test_a_sample_that_turns_non_finite_is_an_error_naming_step_and_precision(tiny_ckpt):
    from ldm.pipeline import NonFiniteError

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    unet = pipe.unet
    calls = []

    def blow_up_on_the_second_step(module, args, output):
        calls.append(1)
        return output * float("inf") if len(calls) >= 2 else output

    handle = unet.register_forward_hook(blow_up_on_the_second_step)
    try:
        with pytest.raises(NonFiniteError, match="the sample turned NaN/inf at step 2 of 3 in fp32: lower the"):
            pipe("a red circle", steps=3, height=32, width=32, sampler="Euler")
    finally:
        handle.remove()
    name, param = next((n, p) for n, p in pipe.model.named_parameters() if n.startswith("model.diffusion_model.out."))
    param.data[0].fill_(float("nan"))  # a damaged checkpoint: the error names the tensor
    with pytest.raises(NonFiniteError, match=rf"step 1 of 2 in fp32, and the model's tensor {name} holds NaN/inf"):
        pipe("a red circle", **FAST)


def test_a_decode_that_turns_non_finite_is_an_error_naming_the_vae_precision(tiny_ckpt, monkeypatch):
    from ldm.pipeline import NonFiniteError

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    decode = pipe.model.decode_first_stage
    monkeypatch.setattr(pipe.model, "decode_first_stage", lambda z: decode(z) / 0.0)
    with pytest.raises(NonFiniteError, match=r"decoding gave NaN/inf pixels \(VAE in fp32\)$"):
        pipe("a red circle", **FAST)


def test_size_multiple_is_the_vae_factor_times_the_unets(pipe, monkeypatch):
    assert pipe.size_multiple == 16
    monkeypatch.setattr(type(pipe.model.first_stage_model), "downsample_factor", property(lambda self: 16))
    assert pipe.size_multiple == 32
    with pytest.raises(ValueError, match="height 48 is not a positive multiple of 32 .* use e.g. 32"):
        pipe.check_size(48, 32)
    pipe.check_size(64, 96)


def _init_image(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_img2img_runs_the_strengths_sub_schedule(pipe):
    img2img = Image2Image.from_pipeline(pipe)
    for strength, expected in ((1.0, 4), (0.5, 2), (0.1, 1)):
        infos = []
        out = img2img("a red circle", _init_image(), strength=strength, steps=4, sampler="Euler", seeds=0,
                      callback=infos.append)
        assert len(infos) == expected and out.parameters[0]["strength"] == strength
    other = img2img("a red circle", _init_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT), strength=0.5,
                    steps=4, sampler="Euler", seeds=0)
    assert _max_diff(out.images[0], other.images[0]) > 10


def test_img2img_size_follows_the_init_image_rounded_to_the_factor(pipe):
    out = Image2Image.from_pipeline(pipe)("x", _init_image((70, 45)), strength=0.5, steps=2, seeds=0)
    assert out.images[0].size == (64, 32)
    with pytest.raises(ValueError, match="strength"):
        Image2Image.from_pipeline(pipe)("x", _init_image(), strength=0.0)


def test_inpainting_keeps_the_latents_outside_the_mask(pipe, monkeypatch):
    inpaint = Inpaint.from_pipeline(pipe)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255  # repaint the left half: latent columns 0-1 of 4
    latents = _spy_latents(inpaint, monkeypatch)
    for prompt in ("a red circle", "a blue square"):
        out = inpaint(prompt, _init_image((32, 32)), Image.fromarray(mask), steps=2, sampler="Euler a", seeds=5)
        assert out.images[0].size == (32, 32) and out.parameters[0]["task"] == "inpaint"
    a, b = latents
    assert torch.equal(a[..., 2:], b[..., 2:])  # kept part: the init latents in both runs
    assert (a[..., :2] - b[..., :2]).abs().max() > 1e-2  # repainted part follows the prompt


def test_inpainting_mask_size_must_match(pipe):
    with pytest.raises(ValueError, match="mask is 32x32 but the init image is 64x64"):
        Inpaint.from_pipeline(pipe)("x", _init_image(), Image.new("L", (32, 32)), steps=2)


def test_nine_channel_inpainting_model(tiny_inpaint_ckpt):
    pipe = Inpaint.from_checkpoint(tiny_inpaint_ckpt, device="cpu")
    assert pipe.is_inpainting_model
    mask = Image.new("L", (32, 32))
    mask.paste(255, (0, 0, 16, 32))
    out = pipe("a red circle", _init_image((32, 32)), mask, steps=2, seeds=0)
    assert out.images[0].size == (32, 32)
    txt = Text2Image.from_pipeline(pipe)("a red circle", **FAST)  # mask of ones, empty masked image
    assert txt.images[0].size == (32, 32)


@pytest.mark.parametrize("precision, vae_precision, vae_autocast", [
    ("fp16", "auto", False), ("bf16", "auto", True), ("bf16", "fp32", False), ("fp16", "same", True)])
def test_half_precision_is_not_black_and_the_vae_precision(pipe, precision, vae_precision, vae_autocast,
                                                            monkeypatch):
    """fp16 decodes in fp32 (its range would overflow into black images); bf16 decodes under its autocast."""
    half = Text2Image(pipe.model, device="cpu", precision=precision, vae_precision=vae_precision)
    dtypes = []
    decode = half.model.decode_first_stage
    monkeypatch.setattr(half.model, "decode_first_stage",
                        lambda z: dtypes.append((z.dtype, torch.is_autocast_enabled("cpu"))) or decode(z))
    image = half("a red circle", seeds=0, **FAST).images[0]
    assert dtypes == [(torch.float32, vae_autocast)]
    assert _pixels(image).std() > 1 and _pixels(image).max() > 0
    with pytest.raises(ValueError, match="vae_precision must be"):
        Text2Image(pipe.model, device="cpu", precision=precision, vae_precision="bf16")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_unet_weights_in_the_compute_dtype_give_the_same_images(tiny_ckpt, precision):
    kept = Text2Image.from_checkpoint(tiny_ckpt, device="cpu", precision=precision, unet_weights="fp32")
    stored = Text2Image.from_checkpoint(tiny_ckpt, device="cpu", precision=precision)  # "compute" by default
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet = stored.unet
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert layers and all(p.dtype == dtype for m in layers for p in m.parameters())
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in kept.unet.parameters())
    assert stored.model.first_stage_model.decoder.conv_out.weight.dtype == torch.float32  # only the UNet
    a, b = (p("a red circle", seeds=3, **FAST).images[0] for p in (kept, stored))
    assert _max_diff(a, b) == 0
    with pytest.raises(ValueError, match="unet_weights must be"):
        Text2Image(kept.model, device="cpu", unet_weights="bf16")


def test_memory_and_speed_options_keep_the_result(pipe, monkeypatch):
    reference = pipe("a red circle", seeds=4, **FAST).images[0]
    model = pipe.model
    try:
        sliced = Text2Image(model, device="cpu", attention="math", attention_slicing=3, vae_tiling=True,
                            channels_last=True)
        assert model.first_stage_model.use_tiling
        assert _max_diff(sliced("a red circle", seeds=4, **FAST).images[0], reference) <= 1
    finally:
        Text2Image(model, device="cpu", attention="sdpa")  # restore for the other tests
        model.first_stage_model.disable_tiling()
        model.to(memory_format=torch.contiguous_format)


def test_cpu_offload_moves_each_part_only_while_it_runs(pipe, monkeypatch):
    offload = Text2Image.from_pipeline(pipe)
    offload.cpu_offload = True  # on a CPU-only machine the moves are CPU -> CPU, the order is what we check
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(type(self).__name__) or self)
    offload("a red circle", seeds=0, **FAST)
    assert moved[:2] == ["Conditioner"] * 2  # to the device and back, for the prompt (the model's conditioner)
    assert "UNetModel" in moved and "AutoencoderKL" in moved
    assert len(moved) % 2 == 0


@pytest.mark.slow
def test_compile_option():
    from tiny_models import tiny_model

    compiled = Text2Image(tiny_model(), device="cpu", compile="eager")
    assert compiled("a red circle", seeds=0, **FAST).images[0].size == (32, 32)


def test_zero_terminal_snr_models_get_trailing_spacing(pipe, monkeypatch):
    from ldm.diffusion import schedules

    default = pipe.sigmas("Euler", 4)
    assert torch.allclose(default, schedules.get_sigmas_default(pipe.model.alphas_cumprod.cpu(), 4))
    zero_snr = schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(schedules.make_betas())).float()
    monkeypatch.setattr(pipe.model, "alphas_cumprod", zero_snr)
    assert torch.equal(pipe.sigmas("Euler", 4), schedules.get_sigmas_trailing(zero_snr, 4))
    karras = pipe.sigmas("Euler Karras", 4)  # one step from pure noise, then its own spacing
    trailing = schedules.get_sigmas_trailing(zero_snr, 4)
    assert torch.equal(karras[:2], trailing[:2])
    assert torch.equal(karras[1:], schedules.get_sigmas_karras(3, float(karras[-2]), float(karras[1])))


def test_pipeline_does_not_import_lightning():
    code = ("import sys, ldm.pipeline; "
            "sys.exit(any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_device_and_precision_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("autocast", cpu) == "bf16"
    assert resolve_precision("full", cpu) == "fp32" and resolve_precision("half", cpu) == "fp16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_vae_runs_channels_last_on_a_cpu_by_default(pipe):
    model = pipe.model
    conv = model.first_stage_model.decoder.conv_in.weight
    try:
        model.first_stage_model.to(memory_format=torch.contiguous_format)
        Text2Image(model, device="cpu", channels_last=False)  # the layouts as built
        assert conv.is_contiguous()
        Text2Image(model, device="cpu")  # default: the VAE channels-last on a CPU (faster bf16 decode)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    finally:
        model.first_stage_model.to(memory_format=torch.contiguous_format)


def test_a_batch_too_big_to_decode_is_refused_before_anything_is_allocated(pipe, monkeypatch):
    with pytest.raises(ValueError, match=r"a batch of 2 images at 65536x65536 needs about \d+\.\d GiB to decode but "
                                         r"\d+\.\d GiB is free on cpu: use a smaller batch or size, or VAE tiling"):
        pipe(["a", "b"], height=65536, width=65536, steps=1)
    tiled = pipe.decode_memory(2, 65536, 65536)
    assert tiled > 2**40
    pipe.model.first_stage_model.enable_tiling()
    try:
        assert pipe.decode_memory(2, 65536, 65536) == tiled * 512 * 512 // 65536**2  # a tile's worth
    finally:
        pipe.model.first_stage_model.disable_tiling()
    import ldm.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "_free_memory", lambda device: 1000)
    with pytest.raises(ValueError, match="needs about"):
        pipe("a", **FAST)
    monkeypatch.setattr(pipe, "memory_check", False)
    pipe("a", **FAST)
