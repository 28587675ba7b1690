"""The LCM sampler against diffusers' LCMScheduler: timesteps, boundary condition, and whole runs on a tiny UNet."""
import pytest
import torch

from ldm.diffusion import samplers
from ldm.diffusion.schedules import lcm_timesteps, sigmas_from_alphas_cumprod
from tiny_models import tiny_ckpt, tiny_model  # noqa: F401  (fixture)


def _scheduler(model, prediction_type="epsilon"):
    pytest.importorskip("diffusers")
    from diffusers import LCMScheduler

    return LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type=prediction_type, set_alpha_to_one=True)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 13, 50])
def test_timesteps_are_diffusers_lcm_timesteps(steps):
    scheduler = _scheduler(None)
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(steps).tolist() == scheduler.timesteps.tolist()
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]


def test_sigmas_end_at_zero_and_too_many_steps_is_one_line():
    model = tiny_model()
    sigmas = samplers.build_sigmas("LCM", model, 4)
    table = sigmas_from_alphas_cumprod(model.alphas_cumprod.double())
    torch.testing.assert_close(sigmas[:-1], table[[999, 759, 499, 259]].float())
    assert sigmas[-1] == 0
    with pytest.raises(ValueError, match="LCM takes 1 to 50 steps"):
        samplers.build_sigmas("lcm", model, 51)


@pytest.mark.parametrize("parameterization,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [1, 4, 6])
def test_lcm_run_matches_diffusers_lcm_scheduler(parameterization, prediction_type, steps):
    torch.manual_seed(0)
    model = tiny_model(parameterization=parameterization)
    cond = {"crossattn": model.get_learned_conditioning(["a red circle"])}
    shape = (1, 4, 8, 8)

    # diffusers: x_T = noise, model output -> LCMScheduler.step with the same generator
    scheduler = _scheduler(model, prediction_type)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model.apply_model(latents, t.reshape(1), cond)
            latents = scheduler.step(out, t, latents, generator=g).prev_sample

    spec = samplers.get_sampler("lcm")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g)
    denoiser = spec.wrap_denoiser(model.denoiser())
    ours = samplers.sample(spec, denoiser, noise, samplers.build_sigmas(spec, model, steps),
                           extra_args={"cond": cond}, generator=g)
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_boundary_condition_is_diffusers_c_skip_c_out():
    from ldm.diffusion.denoisers import make_denoiser

    model = tiny_model()
    zero = make_denoiser(lambda x, t, cond: torch.zeros_like(x), model.alphas_cumprod, "x0")  # D = 0
    wrapped = samplers.get_sampler("LCM").wrap_denoiser(zero)
    with pytest.raises(TypeError, match="discrete-time denoiser"):
        samplers.get_sampler("LCM").wrap_denoiser(lambda x, s, c=None: x)
    scheduler = _scheduler(model)
    x = torch.ones(1, 4, 2, 2)
    for t in (19, 259, 999):
        sigma = sigmas_from_alphas_cumprod(model.alphas_cumprod.double())[t].float().reshape(1)
        c_skip, _ = scheduler.get_scalings_for_boundary_condition_discrete(t)
        x_t = x / (1 + sigma**2).sqrt()
        torch.testing.assert_close(wrapped(x, sigma), c_skip * x_t, rtol=1e-6, atol=0)


def test_pipeline_samples_with_lcm_and_its_boundary_condition(tiny_ckpt, monkeypatch):
    from ldm.pipeline import Text2Image

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    calls = []
    original = samplers.LCMBoundaryDenoiser.__call__
    monkeypatch.setattr(samplers.LCMBoundaryDenoiser, "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    out = pipe("a red circle", steps=4, sampler="lcm", guidance_scale=1.5, seeds=1, height=32, width=32)
    assert out.parameters[0]["sampler"] == "LCM" and len(calls) == 4  # one batched [uncond, cond] call a step
    assert out.images[0].size == (32, 32)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_tcd_run_matches_diffusers_tcd_scheduler(eta, steps):
    pytest.importorskip("diffusers")
    from diffusers import TCDScheduler

    torch.manual_seed(0)
    model = tiny_model()
    cond = {"crossattn": model.get_learned_conditioning(["a red circle"])}
    shape = (1, 4, 8, 8)
    scheduler = TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model.apply_model(latents, t.reshape(1), cond)
            latents = scheduler.step(out, t, latents, eta=eta, generator=g).prev_sample

    spec = samplers.get_sampler("TCD")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g)
    table = sigmas_from_alphas_cumprod(model.alphas_cumprod.double()).float()
    ours = samplers.sample(spec, model.denoiser(), noise, samplers.build_sigmas(spec, model, steps),
                           extra_args={"cond": cond}, generator=g, eta=eta, discrete_sigmas=table)
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_pipeline_samples_with_tcd(tiny_ckpt):
    from ldm.pipeline import Text2Image

    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    a = pipe("a red circle", steps=4, sampler="TCD", guidance_scale=1.0, eta=0.3, seeds=1, height=32, width=32)
    b = pipe("a red circle", steps=4, sampler="TCD", guidance_scale=1.0, eta=0.0, seeds=1, height=32, width=32)
    assert a.parameters[0]["sampler"] == "TCD" and a.parameters[0]["eta"] == 0.3
    assert a.images[0].tobytes() != b.images[0].tobytes()
