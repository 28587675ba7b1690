"""Closed-form data distributions whose exact denoiser D(x, sigma) = E[x0 | x] is known.

Used by the other diffusion tests (imported as ``test_diffusion_analytic``); the tests here check the
closed forms themselves against Monte Carlo.
"""

import math

import torch

from ldm.diffusion.denoisers import prediction_target
from ldm.diffusion.schedules import alphas_cumprod, make_betas, t_to_sigma


def _col(sigma, x):
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class GaussianData:
    """x0 ~ N(mu, std^2) independently per dimension."""

    def __init__(self, mu=0.5, std=0.8):
        self.mu, self.std = mu, std

    def denoise(self, x, sigma, cond=None):
        s2, v = _col(sigma, x) ** 2, self.std**2
        return (v * x + s2 * self.mu) / (v + s2)

    def ode_solution(self, x, sigma_from, sigma_to):
        """Exact probability-flow ODE map from sigma_from to sigma_to."""
        v = self.std**2
        return self.mu + (x - self.mu) * math.sqrt((v + sigma_to**2) / (v + sigma_from**2))


class MixtureData:
    """1-D mixture of Gaussians (x has shape [B, 1])."""

    def __init__(self, weights=(0.3, 0.7), mus=(-1.0, 1.5), stds=(0.3, 0.5)):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.mus = torch.tensor(mus, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)

    @property
    def mean(self):
        return float((self.w * self.mus).sum())

    @property
    def var(self):
        second = (self.w * (self.stds**2 + self.mus**2)).sum()
        return float(second) - self.mean**2

    def denoise(self, x, sigma, cond=None):
        x64, s2 = x.double(), _col(sigma, x).double() ** 2
        var = self.stds**2 + s2  # [B, K]
        log_p = self.w.log() - 0.5 * (x64 - self.mus) ** 2 / var - 0.5 * var.log()
        resp = log_p.softmax(dim=-1)
        means = (self.stds**2 * x64 + s2 * self.mus) / var
        return (resp * means).sum(dim=-1, keepdim=True).to(x.dtype)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return (self.mus[k] + self.stds[k] * torch.randn(n, generator=generator, dtype=torch.float64))[:, None]


def sd_alphas_cumprod(dtype=torch.float64):
    return alphas_cumprod(make_betas("scaled_linear", 1000)).to(dtype)


def discrete_net(data, alphas_cumprod, parameterization="eps"):
    """The exact discrete-time network ``net(x_t, t, cond)`` for ``data``, predicting eps, v or x0."""

    def net(x_in, t, cond=None):
        sigma = t_to_sigma(t.double(), alphas_cumprod.double()).to(x_in.dtype)
        x = x_in * _col((1 + sigma**2).sqrt(), x_in)
        x0 = data.denoise(x, sigma)
        noise = (x - x0) / _col(sigma, x)
        return prediction_target(parameterization, x0, noise, 1 / (1 + sigma**2))

    return net


def test_gaussian_denoiser_is_posterior_mean():
    data, sigma = GaussianData(0.5, 0.8), 1.3
    x0 = data.mu + data.std * torch.randn(200_000, 1, dtype=torch.float64)
    x = x0 + sigma * torch.randn_like(x0)
    near = (x - 1.0).abs() < 0.02
    estimate = x0[near].mean()
    exact = data.denoise(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([sigma]))
    assert abs(float(estimate - exact)) < 0.03


def test_mixture_denoiser_is_posterior_mean():
    data, sigma = MixtureData(), 0.7
    x0 = data.sample(400_000, torch.Generator().manual_seed(1))
    x = x0 + sigma * torch.randn_like(x0)
    for point in (-1.0, 0.3, 1.5):
        near = (x - point).abs() < 0.02
        exact = data.denoise(torch.tensor([[point]], dtype=torch.float64), torch.tensor([sigma]))
        assert abs(float(x0[near].mean() - exact)) < 0.04


def test_mixture_moments_and_single_component_limit():
    data = MixtureData()
    x0 = data.sample(200_000, torch.Generator().manual_seed(2))
    assert abs(float(x0.mean()) - data.mean) < 0.02
    assert abs(float(x0.var()) - data.var) < 0.03
    one = MixtureData(weights=(1.0,), mus=(0.5,), stds=(0.8,))
    x, sigma = torch.randn(5, 1, dtype=torch.float64), torch.full((5,), 0.9, dtype=torch.float64)
    torch.testing.assert_close(one.denoise(x, sigma), GaussianData(0.5, 0.8).denoise(x, sigma))
