"""Step-by-step agreement with diffusers' schedulers (only when diffusers happens to be installed).

Both sides drive the same discrete eps network (the exact one for Gaussian data, an analytic function of
x_t and t) from the same initial noise, with diffusers' own alphas_cumprod.
"""

import pytest
import torch

from ldm.diffusion import samplers as SM
from ldm.diffusion.denoisers import EpsDenoiser
from ldm.diffusion.schedules import ddim_timesteps, get_sigmas_default, get_sigmas_karras, make_betas
from test_diffusion_analytic import GaussianData, discrete_net

diffusers = pytest.importorskip("diffusers")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GAUSS = GaussianData(0.5, 0.8)
STEPS = 10  # divides 1000: the original DDIM spacing then has exactly STEPS timesteps, like diffusers


def run_diffusers(scheduler, net, x, generator=None, **step_kwargs):
    """The diffusers denoising loop; returns the states before each model call and the result."""
    states = []
    for t in scheduler.timesteps:
        states.append(x)
        model_in = scheduler.scale_model_input(x, t)
        eps = net(model_in, t.expand(x.shape[0]), None)
        if generator is not None:
            step_kwargs["generator"] = generator
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return states, x


def run_ours(fn, scheduler, net, x, sigmas, generator=None, **options):
    """Our sampler over the same network; returns states before each step (sigma space) and the result."""
    denoiser = EpsDenoiser(net, scheduler.alphas_cumprod)
    states = []
    out = fn(denoiser, x, sigmas, generator=generator, callback=lambda info: states.append(info["x"]), **options)
    return states, out


def setup(scheduler_cls, **config):
    scheduler = scheduler_cls(**SD, **config)
    scheduler.set_timesteps(STEPS)
    net = discrete_net(GAUSS, scheduler.alphas_cumprod)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return scheduler, net, noise


def assert_states_close(ours, theirs, scale=None):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a = a if scale is None else a * scale[i]
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m: f"step {i}: {m}")


def test_betas_match_diffusers_scaled_linear():
    scheduler = diffusers.DDIMScheduler(**SD)
    torch.testing.assert_close(make_betas("scaled_linear").float(), scheduler.betas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_matches(spacing):
    scheduler, net, noise = setup(diffusers.EulerDiscreteScheduler, timestep_spacing=spacing, steps_offset=1)
    x = noise * scheduler.init_noise_sigma
    theirs, their_out = run_diffusers(scheduler, net, x)
    ours, our_out = run_ours(SM.sample_euler, scheduler, net, x, scheduler.sigmas)
    assert_states_close(ours, theirs)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


def test_euler_ancestral_matches_with_the_same_noise():
    scheduler, net, noise = setup(diffusers.EulerAncestralDiscreteScheduler, timestep_spacing="leading", steps_offset=1)
    x = noise * scheduler.init_noise_sigma
    theirs, their_out = run_diffusers(scheduler, net, x, generator=torch.Generator().manual_seed(7))
    ours, our_out = run_ours(SM.sample_euler_ancestral, scheduler, net, x, scheduler.sigmas,
                             generator=torch.Generator().manual_seed(7))
    assert_states_close(ours, theirs)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


def test_heun_matches():
    scheduler, net, noise = setup(diffusers.HeunDiscreteScheduler, timestep_spacing="leading", steps_offset=1)
    x = noise * scheduler.init_noise_sigma
    theirs, their_out = run_diffusers(scheduler, net, x)
    sigmas = torch.cat([scheduler.sigmas[::2], scheduler.sigmas[-1:]])  # diffusers repeats inner sigmas
    ours, our_out = run_ours(SM.sample_heun, scheduler, net, x, sigmas)
    assert_states_close(ours, theirs[::2])
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


def test_lms_matches():
    scheduler, net, noise = setup(diffusers.LMSDiscreteScheduler, timestep_spacing="leading", steps_offset=1)
    x = noise * scheduler.init_noise_sigma
    theirs, their_out = run_diffusers(scheduler, net, x)
    ours, our_out = run_ours(SM.sample_lms, scheduler, net, x, scheduler.sigmas)
    assert_states_close(ours, theirs)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches(karras):
    scheduler, net, noise = setup(diffusers.DPMSolverMultistepScheduler, algorithm_type="dpmsolver++",
                                  solver_order=2, use_karras_sigmas=karras)
    sigmas = scheduler.sigmas
    if karras:  # our "DPM++ 2M Karras" schedule is diffusers' one
        torch.testing.assert_close(SM.build_sigmas("DPM++ 2M Karras", scheduler.alphas_cumprod, STEPS), sigmas,
                                   rtol=1e-5, atol=1e-6)
    x_vp = noise  # diffusers' DPM-Solver runs in the variance-preserving space
    theirs, their_out = run_diffusers(scheduler, net, x_vp)
    x = x_vp * (1 + sigmas[0] ** 2) ** 0.5
    ours, our_out = run_ours(SM.sample_dpmpp_2m, scheduler, net, x, sigmas)
    assert_states_close(ours, theirs, scale=(1 + sigmas**2) ** -0.5)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_the_sd_configuration(eta):
    scheduler, net, noise = setup(diffusers.DDIMScheduler, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                                  timestep_spacing="leading")
    assert scheduler.timesteps.flip(0).tolist() == ddim_timesteps(STEPS).tolist()
    theirs, their_out = run_diffusers(scheduler, net, noise, generator=torch.Generator().manual_seed(3), eta=eta)
    sigmas = SM.build_sigmas("DDIM", scheduler.alphas_cumprod, STEPS)
    denoiser = EpsDenoiser(net, scheduler.alphas_cumprod)
    ours = []
    our_out = SM.sample("DDIM", denoiser, noise, sigmas, eta=eta, generator=torch.Generator().manual_seed(3),
                        callback=lambda info: ours.append(info["x"]))
    assert_states_close(ours, theirs, scale=(1 + sigmas**2) ** -0.5)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


def test_plms_matches_pndm_with_skipped_prk_steps():
    scheduler, net, noise = setup(diffusers.PNDMScheduler, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    _, their_out = run_diffusers(scheduler, net, noise)
    sigmas = SM.build_sigmas("PLMS", scheduler.alphas_cumprod, STEPS)
    our_out = SM.sample("PLMS", EpsDenoiser(net, scheduler.alphas_cumprod), noise, sigmas)
    torch.testing.assert_close(our_out, their_out, rtol=2e-4, atol=2e-4)


def test_default_schedule_matches_diffusers_linspace():
    scheduler = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(STEPS)
    # diffusers interpolates sigma linearly between integer timesteps, we interpolate log-sigma
    torch.testing.assert_close(get_sigmas_default(scheduler.alphas_cumprod, STEPS), scheduler.sigmas, rtol=1e-4, atol=0)
    karras = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    karras.set_timesteps(STEPS)
    ours = get_sigmas_karras(STEPS, float(scheduler.sigmas[-2]), float(scheduler.sigmas[0]))
    torch.testing.assert_close(ours, karras.sigmas, rtol=1e-5, atol=1e-6)
