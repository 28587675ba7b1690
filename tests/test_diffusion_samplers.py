"""Samplers against closed-form denoisers: ODE convergence order, sampling moments, seeds, registry."""

import numpy as np
import pytest
import torch

from ldm.diffusion import samplers as SM
from ldm.diffusion.denoisers import EpsDenoiser
from ldm.diffusion.schedules import get_sigmas_karras
from test_diffusion_analytic import GaussianData, MixtureData, discrete_net, sd_alphas_cumprod

GAUSS = GaussianData(0.5, 0.8)
SIGMA_MAX, SIGMA_MIN = 10.0, 0.1

ODE_SOLVERS = [  # (function, options, expected order of convergence)
    (SM.sample_euler, {}, 1),
    (SM.sample_ddim, {}, 1),
    (SM.sample_heun, {}, 2),
    (SM.sample_dpm_2, {}, 2),
    (SM.sample_dpmpp_2m, {}, 2),
    (SM.sample_dpmpp_2s_ancestral, {"eta": 0.0}, 2),
    (SM.sample_dpmpp_sde, {"eta": 0.0}, 2),
    (SM.sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, 2),
    (SM.sample_dpmpp_3m_sde, {"eta": 0.0}, 2),
    (SM.sample_plms, {}, 2),
    (SM.sample_lms, {}, 3),
]


def ode_error(fn, steps, **options):
    """Max error of a sampler against the exact probability-flow ODE map, sigma 10 -> 0.1."""
    x = 10 * torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()[:-1]  # end at sigma_min, not 0
    out = fn(GAUSS.denoise, x.clone(), sigmas, **options)
    return float((out - GAUSS.ode_solution(x, SIGMA_MAX, float(sigmas[-1]))).abs().max())


def _param_id(value):
    if callable(value):
        return value.__name__
    return "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else f"order{value}"


@pytest.mark.parametrize("fn,options,order", ODE_SOLVERS, ids=_param_id)
def test_deterministic_samplers_converge_with_their_order(fn, options, order):
    coarse, fine = ode_error(fn, 20, **options), ode_error(fn, 40, **options)
    assert fine < 0.1
    ratio = coarse / fine  # ~ 2 ** order
    assert 0.75 * 2**order < ratio < 2 ** (order + 1.5), (coarse, fine)


def test_heun_is_exact_on_constant_denoiser_and_steps_to_zero():
    target = torch.full((3, 2), 0.25, dtype=torch.float64)
    const = lambda x, sigma, cond=None: target.expand_as(x)
    sigmas = get_sigmas_karras(5, 0.1, 5.0).double()
    x = 5 * torch.randn(3, 2, dtype=torch.float64)
    for fn in (SM.sample_heun, SM.sample_euler, SM.sample_dpmpp_2m, SM.sample_lms, SM.sample_dpm_2):
        torch.testing.assert_close(fn(const, x, sigmas), target)


@pytest.mark.parametrize("pair", [
    ((SM.sample_ddim, {}), (SM.sample_euler, {})),
    ((SM.sample_dpmpp_2m_sde, {"eta": 0.0}), (SM.sample_dpmpp_2m, {})),
    ((SM.sample_dpmpp_sde, {"eta": 0.0}), (SM.sample_dpmpp_2s_ancestral, {"eta": 0.0})),
    ((SM.sample_dpm_2_ancestral, {"eta": 0.0}), (SM.sample_dpm_2, {})),
    ((SM.sample_ddpm, {}), (SM.sample_euler_ancestral, {})),
    ((SM.sample_ddim, {"eta": 1.0}), (SM.sample_euler_ancestral, {})),
], ids=["ddim=euler", "2m_sde(eta0)=2m", "sde(eta0)=2s_a(eta0)", "dpm2_a(eta0)=dpm2", "ddpm=euler_a",
        "ddim(eta1)=euler_a"])
def test_known_equivalences(pair):
    (fn_a, opt_a), (fn_b, opt_b) = pair
    sigmas = get_sigmas_karras(8, 0.05, 8.0).double()
    x = 8 * torch.randn(4, 3, dtype=torch.float64)
    out_a = fn_a(GAUSS.denoise, x, sigmas, generator=torch.Generator().manual_seed(3), **opt_a)
    out_b = fn_b(GAUSS.denoise, x, sigmas, generator=torch.Generator().manual_seed(3), **opt_b)
    torch.testing.assert_close(out_a, out_b)


STOCHASTIC = [("Euler a", 800), ("DDPM", 800), ("DPM2 a", 60), ("DPM++ 2S a", 60), ("DPM++ SDE", 60),
              ("DPM++ 2M SDE", 60), ("DPM++ 3M SDE", 60), ("DDIM", 800)]


@pytest.mark.parametrize("name,steps", STOCHASTIC)
def test_stochastic_samplers_reproduce_gaussian_moments(name, steps):
    spec = SM.get_sampler(name)
    options = {"eta": 1.0} if name == "DDIM" else {}
    generator = torch.Generator().manual_seed(5)
    sigmas = get_sigmas_karras(steps, 0.002, 40.0).double()
    x = 40 * torch.randn(2000, 8, dtype=torch.float64, generator=generator)
    out = spec.fn(GAUSS.denoise, x, sigmas, generator=generator, **options)
    assert abs(float(out.mean()) - GAUSS.mu) < 0.02  # standard error ~0.006
    assert abs(float(out.std()) / GAUSS.std - 1) < 0.03


@pytest.mark.parametrize("name,steps", [("Euler a", 100), ("DPM++ 2M SDE", 40), ("DPM++ 2M", 30), ("DPM++ 3M SDE", 40)])
def test_samplers_reproduce_mixture_moments(name, steps):
    data = MixtureData()
    generator = torch.Generator().manual_seed(6)
    sigmas = get_sigmas_karras(steps, 0.01, 40.0).double()
    x = 40 * torch.randn(4000, 1, dtype=torch.float64, generator=generator)
    out = SM.get_sampler(name).fn(data.denoise, x, sigmas, generator=generator)
    assert abs(float(out.mean()) - data.mean) < 0.06  # standard error ~0.02
    assert abs(float(out.var()) / data.var - 1) < 0.08
    # both modes are populated in proportion
    assert abs(float((out < 0.25).double().mean()) - 0.3) < 0.04


def tiny_denoiser():
    alphas_cumprod = sd_alphas_cumprod(torch.float32)
    return EpsDenoiser(discrete_net(GAUSS, alphas_cumprod), alphas_cumprod)


@pytest.mark.parametrize("name", list(SM.SAMPLERS))
def test_every_registered_sampler_runs(name):
    spec = SM.SAMPLERS[name]
    denoiser = tiny_denoiser()
    sigmas = SM.build_sigmas(spec, denoiser, 4)
    steps = []
    noise = torch.randn(2, 3, 4, 4)
    out = SM.sample(spec, denoiser, noise, sigmas, generator=torch.Generator().manual_seed(0),
                    callback=lambda info: steps.append(info))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert [s["i"] for s in steps] == list(range(len(sigmas) - 1))
    assert set(steps[0]) == {"i", "sigma", "x", "denoised"}
    assert float((out - GAUSS.mu).abs().mean()) < 4.0  # near the data (0.64), far below the noise (~12)


ANCESTRAL = ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DDPM", "Euler"]


@pytest.mark.parametrize("name", ANCESTRAL)
def test_seeds_are_batch_size_independent(name):
    spec = SM.get_sampler(name)
    denoiser = tiny_denoiser()
    sigmas = SM.build_sigmas(spec, denoiser, 5)
    seeds = [11, 12, 13]

    def run(batch_seeds):
        gens = [torch.Generator().manual_seed(s) for s in batch_seeds]
        noise = SM.randn_like(torch.empty(len(batch_seeds), 2, 4, 4), gens)
        return SM.sample(spec, denoiser, noise, sigmas, generator=gens)

    batch = run(seeds)
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(batch[i : i + 1], run([seed]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_randn_like_generators():
    x = torch.empty(3, 5)
    single = SM.randn_like(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(single, torch.randn(3, 5, generator=torch.Generator().manual_seed(1)))
    per_item = SM.randn_like(x, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    torch.testing.assert_close(per_item[2], torch.randn(5, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        SM.randn_like(x, [torch.Generator(), torch.Generator()])


def test_ddim_eta0_is_deterministic_and_eta_changes_it():
    denoiser = tiny_denoiser()
    sigmas = SM.build_sigmas("DDIM", denoiser, 10)
    noise = torch.randn(2, 2, 4, 4)
    a = SM.sample("DDIM", denoiser, noise, sigmas, generator=torch.Generator().manual_seed(1))
    b = SM.sample("DDIM", denoiser, noise, sigmas, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    c = SM.sample("DDIM", denoiser, noise, sigmas, generator=torch.Generator().manual_seed(2), eta=1.0)
    assert not torch.allclose(a, c)


def reference_ldm_ddim(eps_net, alphas_cumprod, x_T, steps, eta, noises):
    """The original DDIMSampler.p_sample_ddim loop, written literally in the variance-preserving space."""
    ts = torch.arange(0, 1000, 1000 // steps) + 1
    a = alphas_cumprod[ts]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]])
    sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    x = x_T
    for i, index in enumerate(reversed(range(len(ts)))):
        e_t = eps_net(x, ts[index].expand(x.shape[0]), None)
        pred_x0 = (x - (1 - a[index]).sqrt() * e_t) / a[index].sqrt()
        dir_xt = (1 - a_prev[index] - sig[index] ** 2).sqrt() * e_t
        x = a_prev[index].sqrt() * pred_x0 + dir_xt + sig[index] * noises[i]
    return x


def reference_ldm_plms(eps_net, alphas_cumprod, x_T, steps):
    """The original PLMSSampler loop (pseudo improved Euler warm-up, then Adams-Bashforth on eps)."""
    ts = torch.arange(0, 1000, 1000 // steps) + 1
    a = alphas_cumprod[ts]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]])
    time_range = ts.flip(0)

    def x_prev(x, e, index):
        pred_x0 = (x - (1 - a[index]).sqrt() * e) / a[index].sqrt()
        return a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e

    x, old_eps = x_T, []
    for i, t in enumerate(time_range):
        index = len(ts) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = eps_net(x, t.expand(x.shape[0]), None)
        if not old_eps:
            e_next = eps_net(x_prev(x, e_t, index), t_next.expand(x.shape[0]), None)
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(x, e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_reproduces_the_original_loop(eta):
    ac = sd_alphas_cumprod()
    net = discrete_net(GAUSS, ac)
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    steps = 10
    gen = torch.Generator().manual_seed(9)
    noises = [torch.randn(x_T.shape, dtype=torch.float64, generator=gen) for _ in range(steps)]
    expected = reference_ldm_ddim(net, ac, x_T, steps, eta, noises)
    sigmas = SM.build_sigmas("DDIM", ac, steps).double()
    out = SM.sample("DDIM", EpsDenoiser(net, ac), x_T, sigmas, eta=eta, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_plms_reproduces_the_original_loop():
    ac = sd_alphas_cumprod()
    net = discrete_net(GAUSS, ac)
    x_T = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    sigmas = SM.build_sigmas("PLMS", ac, 12).double()
    out = SM.sample("PLMS", EpsDenoiser(net, ac), x_T, sigmas)
    torch.testing.assert_close(out, reference_ldm_plms(net, ac, x_T, 12), rtol=1e-6, atol=1e-6)


def test_registry_names_aliases_and_errors():
    for alias, name in [("euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"),
                        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
                        ("DPM++ 2M karras", "DPM++ 2M Karras"), ("k_dpm_2_a", "DPM2 a"), ("dpm_2", "DPM2"),
                        ("PNDM", "PLMS"), ("ddim", "DDIM"), ("dpmpp_3m_sde_exponential", "DPM++ 3M SDE Exponential"),
                        ("k_lms", "LMS"), ("dpmpp_2s_ancestral", "DPM++ 2S a"), ("Euler-a", "Euler a")]:
        assert SM.get_sampler(alias).name == name
    assert {"DDPM", "DDIM", "PLMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M",
            "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM++ 2M Karras", "LMS Karras"} <= set(SM.SAMPLERS)
    assert SM.get_sampler("DPM++ 2M Karras").schedule == "karras"
    with pytest.raises(ValueError, match=r"unknown sampler 'Eulr'; use one of: DDPM, DDIM, PLMS, Euler"):
        SM.get_sampler("Eulr")
    with pytest.raises(ValueError, match="unknown schedule 'cubic'"):
        SM.build_sigmas("Euler", sd_alphas_cumprod(), 5, schedule="cubic")


def test_build_sigmas_schedules():
    ac = sd_alphas_cumprod(torch.float32)
    karras = SM.build_sigmas("DPM++ 2M Karras", ac, 10)
    assert len(karras) == 11 and karras[-1] == 0
    assert float(karras[0]) == pytest.approx(14.6146, rel=1e-4)
    assert float(karras[-2]) == pytest.approx(0.02917, rel=1e-3)
    assert len(SM.build_sigmas("DDIM", tiny_denoiser(), 50)) == 51
    trailing = SM.build_sigmas("Euler", ac, 10, schedule="trailing")
    assert float(trailing[0]) == pytest.approx(14.6146, rel=1e-4)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        SM.build_sigmas("Euler", object(), 10)


def test_original_scaling_of_ddim_start_and_end():
    spec = SM.get_sampler("DDIM")
    sigma = torch.tensor(3.0)
    torch.testing.assert_close(spec.initial_x(torch.ones(1), sigma), torch.full((1,), 10.0**0.5))
    torch.testing.assert_close(spec.final_x(torch.ones(1), sigma), torch.full((1,), 10.0**-0.5))
    euler = SM.get_sampler("Euler")
    torch.testing.assert_close(euler.initial_x(torch.ones(1), sigma), torch.full((1,), 3.0))


def test_img2img_schedule_and_noising():
    sigmas = torch.linspace(10, 1, 10).tolist() + [0.0]
    sigmas = torch.tensor(sigmas)
    torch.testing.assert_close(SM.img2img_sigmas(sigmas, 1.0), sigmas)
    tail = SM.img2img_sigmas(sigmas, 0.5)
    torch.testing.assert_close(tail, sigmas[5:])
    assert len(SM.img2img_sigmas(sigmas, 0.01)) == 2  # at least one step
    with pytest.raises(ValueError, match=r"strength 0.0 is outside \(0, 1\]"):
        SM.img2img_sigmas(sigmas, 0.0)
    x0 = torch.zeros(2, 3)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noised = SM.noise_latent(x0, 2.0, gens)
    torch.testing.assert_close(noised[1], 2.0 * torch.randn(3, generator=torch.Generator().manual_seed(2)))


def test_img2img_with_low_strength_stays_close_to_init():
    denoiser = tiny_denoiser()
    sigmas = SM.build_sigmas("Euler", denoiser, 20)
    init = torch.full((1, 2, 4, 4), 0.5) + 0.1 * torch.randn(1, 2, 4, 4)
    noise = torch.randn_like(init)
    weak = SM.sample("Euler", denoiser, noise, SM.img2img_sigmas(sigmas, 0.1), init_latent=init)
    strong = SM.sample("Euler", denoiser, noise, SM.img2img_sigmas(sigmas, 1.0), init_latent=init)
    assert (weak - init).abs().mean() < (strong - init).abs().mean()


def test_sampler_rejects_bad_sigmas():
    with pytest.raises(ValueError, match="1-D schedule"):
        SM.sample_euler(GAUSS.denoise, torch.zeros(1, 1), torch.tensor([1.0]))


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_zero_terminal_snr_ramps_start_with_one_step_from_pure_noise(schedule):
    from ldm.diffusion.schedules import alphas_cumprod, make_betas, rescale_zero_terminal_snr

    ac = alphas_cumprod(rescale_zero_terminal_snr(make_betas("scaled_linear"))).float()
    sigmas = SM.build_sigmas("Euler", ac, 20, schedule=schedule)
    trailing = SM.build_sigmas("Euler", ac, 20, schedule="trailing")
    assert len(sigmas) == 21 and float(sigmas[-1]) == 0
    assert float(sigmas[0]) == pytest.approx(4096.0, rel=1e-3) and float(sigmas[1]) == float(trailing[1])
    assert (sigmas[1:-1] > 14.6).sum() <= 4  # a ramp from the clamp would put 13 of 20 steps there
    assert float(sigmas[-2]) == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt()), rel=1e-6)  # to sigma_min
    # a schedule that is not zero-SNR keeps its plain ramp from sigma_max
    plain = SM.build_sigmas("Euler", sd_alphas_cumprod(), 20, schedule=schedule)
    assert float(plain[0]) == pytest.approx(14.6146, rel=1e-4) and len(plain) == 21


def test_zero_terminal_snr_v_model_with_trailing_schedule():
    from ldm.diffusion.denoisers import VDenoiser
    from ldm.diffusion.schedules import alphas_cumprod, make_betas, rescale_zero_terminal_snr

    ac = alphas_cumprod(rescale_zero_terminal_snr(make_betas("scaled_linear")))
    assert float(ac[-1]) == 0.0
    denoiser = VDenoiser(discrete_net(GAUSS, ac, "v"), ac)
    for schedule in ("trailing", "karras"):
        sigmas = SM.build_sigmas("DPM++ 2M", denoiser, 25, schedule=schedule).double()
        assert float(sigmas[0]) == pytest.approx(4096.0, rel=1e-3)  # alpha_bar clamped to 2**-24
        noise = torch.randn(1000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        out = SM.sample("DPM++ 2M", denoiser, noise, sigmas)
        assert abs(float(out.mean()) - GAUSS.mu) < 0.03
        assert abs(float(out.std()) / GAUSS.std - 1) < 0.05


def test_range_checks_live_here_and_name_the_caller_s_flag():
    assert SM.check_steps(np.int64(3)) == 3 and SM.check_eta(None) is None and SM.check_strength(1) == 1.0
    for check, value, message in ((SM.check_steps, 0, "--steps is 0: use at least 1"),
                                  (SM.check_steps, 2.5, "--steps is 2.5"),
                                  (SM.check_eta, float("nan"), "--eta nan is not a number >= 0"),
                                  (SM.check_strength, float("nan"), "--strength nan is outside (0, 1]")):
        with pytest.raises(ValueError) as info:
            check(value, message.split()[0])
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="steps is 0"):
        SM.build_sigmas("Euler", torch.linspace(0.99, 0.01, 1000), 0)
