import math

import numpy as np
import pytest
import torch

from ldm.diffusion import schedules as S
from sd_layout import read_layout



def sd_betas():
    return S.make_betas("scaled_linear", 1000, 0.00085, 0.012)


def test_scaled_linear_is_sd_schedule_and_linear_is_the_ldm_alias():
    betas = sd_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    expected = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(S.make_betas("linear"), betas)
    assert float(S.alphas_cumprod(betas)[-1]) == pytest.approx(0.0046601, rel=1e-4)
    np.testing.assert_allclose(S.make_betas("sqrt_linear", 10, 1e-4, 2e-2).numpy(), np.linspace(1e-4, 2e-2, 10))
    np.testing.assert_allclose(S.make_betas("sqrt", 10, 1e-4, 2e-2).numpy(), np.linspace(1e-4, 2e-2, 10) ** 0.5)


def test_cosine_schedule_follows_alpha_bar_formula():
    n, s = 1000, 8e-3
    betas = S.make_betas("cosine", n, cosine_s=s)
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = S.alphas_cumprod(betas)
    for t in (0, 10, 500, 900):
        assert float(alpha_bar[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(betas.max()) <= 0.999


def test_bad_schedule_names_and_sizes_fail_with_one_line():
    with pytest.raises(ValueError, match="unknown beta schedule 'quad'.*scaled_linear"):
        S.make_betas("quad")
    with pytest.raises(ValueError, match="positive"):
        S.make_betas(n=0)
    with pytest.raises(ValueError, match="at least 1 step"):
        S.get_sigmas_karras(0, 0.1, 10.0)
    with pytest.raises(ValueError, match="DDIM and PLMS need 1 <= steps < 1000"):  # PLMS shares the spacing
        S.ddim_timesteps(1000)


def test_zero_terminal_snr_rescale():
    betas = sd_betas()
    rescaled = S.rescale_zero_terminal_snr(betas)
    ab, ab_new = S.alphas_cumprod(betas), S.alphas_cumprod(rescaled)
    assert float(ab_new[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ab_new[0]) == pytest.approx(float(ab[0]), rel=1e-9)
    # sqrt(alpha_bar) is an affine map of the original one
    a, b = ab.sqrt().numpy(), ab_new.sqrt().numpy()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    np.testing.assert_allclose(b, slope * (a - a[-1]), atol=1e-10)
    # samplers get a finite (clamped) maximum sigma
    assert torch.isfinite(S.get_sigmas_trailing(ab_new, 10)).all()


def test_sigma_alpha_bar_log_snr_conversions_roundtrip():
    ab = S.alphas_cumprod(sd_betas())
    sigma = S.alpha_bar_to_sigma(ab)
    torch.testing.assert_close(S.sigma_to_alpha_bar(sigma), ab)
    torch.testing.assert_close(S.sigma_to_log_snr(sigma), (ab / (1 - ab)).log())
    torch.testing.assert_close(S.log_snr_to_sigma(S.sigma_to_log_snr(sigma)), sigma)


def test_t_sigma_roundtrip_and_quantization():
    ab = S.alphas_cumprod(sd_betas())
    sigmas = S.alpha_bar_to_sigma(ab)
    t = torch.tensor([0.0, 3.25, 499.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(S.sigma_to_t(S.t_to_sigma(t, ab), ab), t)
    torch.testing.assert_close(S.t_to_sigma(torch.tensor([7.0, 420.0], dtype=torch.float64), ab), sigmas[[7, 420]])
    # nearest in log-sigma; clamped outside the table
    probe = torch.exp(0.4 * sigmas[10].log() + 0.6 * sigmas[11].log())[None]
    assert S.sigma_to_t(probe, ab, quantize=True).tolist() == [11]
    assert S.sigma_to_t(probe, ab, quantize=True).dtype == torch.int64
    extremes = torch.tensor([1e-4, 1e4], dtype=torch.float64)
    assert S.sigma_to_t(extremes, ab).tolist() == [0.0, 999.0]


def test_schedule_buffers_match_the_original_formulas_and_names():
    betas = sd_betas().numpy()
    buffers = S.register_schedule_buffers(torch.from_numpy(betas))
    keys = list(read_layout("sd-v1.tsv"))
    layout_names = [key for key in keys if "." not in key]
    assert sorted(buffers) == sorted(layout_names) and len(buffers) == 12
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    expected = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    for name, value in expected.items():
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (1000,)
        np.testing.assert_allclose(buffers[name].numpy(), value.astype(np.float32), rtol=1e-6, err_msg=name)
    assert float(buffers["posterior_variance"][0]) == 0.0


def test_default_schedule_is_linspace_in_t_interpolated_in_log_sigma():
    ab = S.alphas_cumprod(sd_betas())
    sig = S.get_sigmas_default(ab, 4)
    assert sig.shape == (5,) and sig[-1] == 0
    all_sigmas = S.alpha_bar_to_sigma(ab)
    assert float(sig[0]) == pytest.approx(float(all_sigmas[999]), rel=1e-6)
    assert float(sig[3]) == pytest.approx(float(all_sigmas[0]), rel=1e-6)
    t = 666.0  # linspace(999, 0, 4)[1]
    expected = math.exp(math.log(all_sigmas[666]) + (t - 666) * (math.log(all_sigmas[667]) - math.log(all_sigmas[666])))
    assert float(sig[1]) == pytest.approx(expected, rel=1e-6)


def test_karras_and_exponential_schedules():
    k = S.get_sigmas_karras(10, 0.03, 14.6, rho=7.0)
    assert k.shape == (11,) and k[-1] == 0
    assert float(k[0]) == pytest.approx(14.6, rel=1e-6) and float(k[-2]) == pytest.approx(0.03, rel=1e-6)
    ramp = (k[:-1].double() ** (1 / 7)).diff()
    torch.testing.assert_close(ramp, torch.full_like(ramp, float(ramp[0])), rtol=1e-4, atol=0)
    e = S.get_sigmas_exponential(10, 0.03, 14.6)
    steps = e[:-1].double().log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(0.03 / 14.6) / 9), rtol=1e-4, atol=0)


def test_trailing_schedule_starts_at_last_timestep():
    ab = S.alphas_cumprod(sd_betas())
    sig = S.get_sigmas_trailing(ab, 10)
    t = torch.tensor([999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    torch.testing.assert_close(sig[:-1], S.alpha_bar_to_sigma(ab)[t].float())
    assert sig[-1] == 0


def test_ddim_timesteps_are_the_original_spacing():
    assert S.ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    assert S.ddim_timesteps(3).tolist() == [1, 334, 667]  # the original's extra t=1000 would crash: dropped
    ts = np.asarray(list(range(0, 1000, 1000 // 7))) + 1  # the original make_ddim_timesteps("uniform")
    assert S.ddim_timesteps(7).tolist() == ts.tolist()
    ab = S.alphas_cumprod(sd_betas())
    sig = S.get_sigmas_ddim(ab, 50)
    all_sigmas = S.alpha_bar_to_sigma(ab).float()
    torch.testing.assert_close(sig[:-1], all_sigmas[S.ddim_timesteps(50).flip(0)])
    assert float(sig[-1]) == pytest.approx(float(all_sigmas[0]))  # the original's alphas_prev[0] = alpha_bar[0]


def test_ddpm_schedule_covers_every_timestep():
    ab = S.alphas_cumprod(sd_betas())
    sig = S.get_sigmas_ddpm(ab, 1000)
    torch.testing.assert_close(sig[:-1], S.alpha_bar_to_sigma(ab).float().flip(0))
    assert sig[-1] == 0 and len(S.get_sigmas_ddpm(ab, 10)) == 11
