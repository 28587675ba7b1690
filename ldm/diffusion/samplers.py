"""Samplers over a denoiser ``D(x, sigma, cond) -> x0``, one short function each.

Every sampler has the signature::

    fn(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **sampler_options) -> x

``x`` starts at ``sigmas[0]`` (usually ``noise * sigmas[0]``), ``sigmas`` is descending, and the sample at
``sigmas[-1]`` (x0 when it is 0) is returned. ``extra_args`` are keyword arguments for the denoiser (e.g.
``{"cond": c}``); ``callback({"i", "sigma", "x", "denoised"})`` is called once per step with the state
before the step. ``generator`` is a ``torch.Generator`` or a list with one per batch item (see
:func:`randn_like`).

The probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma``. Many solvers below use its exact
first-order exponential-integrator step (= DDIM, DPM-Solver++(1))::

    x' = D + (sigma' / sigma) (x - D)

and the ancestral split of a step sigma -> sigma' into a deterministic step to ``sigma_down`` plus fresh
noise of std ``sigma_up`` (``sigma_down^2 + sigma_up^2 = sigma'^2``).

:data:`SAMPLERS` maps the names users type (A1111 style: "Euler a", "DPM++ 2M Karras", "DDIM") to a
:class:`SamplerSpec` (function + sigma schedule); :func:`get_sampler` looks names up leniently,
:func:`build_sigmas` makes the schedule and :func:`sample` runs it all.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.schedules import (
    get_sigmas_ddim,
    get_sigmas_ddpm,
    get_sigmas_default,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_lcm,
    get_sigmas_tcd,
    get_sigmas_trailing,
    is_zero_terminal_snr,
    sigmas_from_alphas_cumprod,
)

logger = logging.getLogger(__name__)

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Callback = Callable[[dict], None]


# ----------------------------------------------------------------------------------------------
# Shared pieces


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x``.

    With a list of generators, item i of the batch is drawn from generator i only, so image i of a batch
    made with seeds s..s+n equals the single image made with seed s+i. Noise is drawn on the generator's
    device and moved to ``x.device``.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one generator per item")
    items = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generator]
    return torch.stack(items).to(x.device)


def _denoise(denoiser, x: Tensor, sigma: Tensor, extra_args: dict | None) -> Tensor:
    return denoiser(x, sigma * x.new_ones(x.shape[0]), **(extra_args or {}))


def _report(callback: Callback | None, i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dsigma = (x - D) / sigma (this is the eps estimate)."""
    return (x - denoised) / sigma


def ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Exact first-order step for a constant x0 estimate: keep D, rescale the noise by sigma'/sigma."""
    return denoised + (sigma_next / sigma) * (x - denoised)


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step; eta=1 samples the DDPM posterior, eta=0 is deterministic.

    sigma_up = eta * sigma' * sqrt(1 - sigma'^2 / sigma^2), which is the original DDIM
    ``eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))`` rewritten in sigmas.
    """
    if eta == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}")


# ----------------------------------------------------------------------------------------------
# Euler family


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Euler's method on the probability-flow ODE (first order)."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0):
    """Euler step to sigma_down, then fresh noise of std sigma_up ("Euler a")."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn): second order, Euler on the last step to 0."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        x_pred = x + d * (sigma_next - sigma)
        d_next = to_d(x_pred, sigma_next, _denoise(denoiser, x_pred, sigma_next, extra_args))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def _dpm2_step(denoiser, x, d, sigma, sigma_target, extra_args):
    """Midpoint step from sigma to sigma_target, midpoint at the geometric mean (Karras et al. 2022)."""
    if sigma_target == 0:
        return x + d * (sigma_target - sigma)
    sigma_mid = (sigma * sigma_target) ** 0.5
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, _denoise(denoiser, x_mid, sigma_mid, extra_args))
    return x + d_mid * (sigma_target - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """DPM-Solver-2 in Karras et al.'s form: derivative at the log-midpoint (second order)."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        x = _dpm2_step(denoiser, x, to_d(x, sigmas[i], denoised), sigmas[i], sigmas[i + 1], extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0):
    """DPM2 step to sigma_down, then fresh noise of std sigma_up."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = _dpm2_step(denoiser, x, to_d(x, sigmas[i], denoised), sigmas[i], sigma_down, extra_args)
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


# ----------------------------------------------------------------------------------------------
# Linear multistep


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j}.

    The nodes are sigma_i, ..., sigma_{i-order+1}; the polynomial has degree order-1, so Gauss-Legendre
    quadrature with ``order`` points is exact.
    """
    nodes = [sigmas[i - k] for k in range(order)]

    def basis(tau: np.ndarray) -> np.ndarray:
        out = np.ones_like(tau)
        for k, node in enumerate(nodes):
            if k != j:
                out *= (tau - node) / (nodes[j] - node)
        return out

    a, b = sigmas[i], sigmas[i + 1]
    points, weights = np.polynomial.legendre.leggauss(order)
    return float((b - a) / 2 * np.sum(weights * basis((b - a) / 2 * points + (a + b) / 2)))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, order=4):
    """Linear multistep in sigma: integrate the Lagrange interpolant of the last ``order`` derivatives."""
    _check_sigmas(sigmas)
    sigma_list = sigmas.double().tolist()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        ds = [to_d(x, sigmas[i], denoised)] + ds[: order - 1]  # newest first
        coeffs = [lms_coefficient(sigma_list, i, j, len(ds)) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, ds))
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022), in the data-prediction form with lambda = -log(sigma)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step to sigma_down (midpoint in log-sigma), then ancestral noise."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = (sigma * sigma_down) ** 0.5
            x_mid = ddim_step(x, denoised, sigma, sigma_mid)
            x = ddim_step(x, _denoise(denoiser, x_mid, sigma_mid, extra_args), sigma, sigma_down)
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """DPM-Solver++(2M): the DDIM step with D extrapolated from the previous step (second order).

    D_hat = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   r = h_{i-1} / h_i,   h = log(sigma / sigma').
    First step and the step to sigma = 0 are first order.
    """
    _check_sigmas(sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        if old_denoised is None or sigma_next == 0:
            x = ddim_step(x, denoised, sigma, sigma_next)
        else:
            r = torch.log(sigmas[i - 1] / sigma) / torch.log(sigma / sigma_next)
            denoised_hat = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = ddim_step(x, denoised_hat, sigma, sigma_next)
        old_denoised = denoised
    return x


def brownian_split(x: Tensor, generator: Generator, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor):
    """Normalised increments of one Brownian path W(sigma) over [sigma_mid, sigma] and [sigma_next, sigma].

    Built from two independent normal increments (no torchsde): returns ``(z_mid, z_full)`` with
    ``z = (W(sigma) - W(sigma_target)) / sqrt(sigma - sigma_target)``, so z_mid and z_full are correlated.
    """
    z_first, z_second = randn_like(x, generator), randn_like(x, generator)
    dt_first, dt_second = (sigma - sigma_mid).abs(), (sigma_mid - sigma_next).abs()
    return z_first, (dt_first.sqrt() * z_first + dt_second.sqrt() * z_second) / (dt_first + dt_second).sqrt()


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ stochastic single-step solver: ancestral substep to sigma_mid, then the full step.

    The two noise draws are increments of one Brownian path (over [sigma, sigma_mid] and [sigma, sigma']).
    """
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = sigma * (sigma_next / sigma) ** r
        noise_mid, noise_full = brownian_split(x, generator, sigma, sigma_mid, sigma_next)
        down, up = ancestral_step(sigma, sigma_mid, eta)
        x_mid = ddim_step(x, denoised, sigma, down) + noise_mid * s_noise * up
        denoised_mid = _denoise(denoiser, x_mid, sigma_mid, extra_args)
        denoised_hat = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_mid
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = ddim_step(x, denoised_hat, sigma, down) + noise_full * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE. With h = log(sigma/sigma') and phi = 1 - exp(-(1 + eta) h)::

        x' = (sigma'/sigma) e^{-eta h} x + phi D + c (D - D_prev) / r + sigma' sqrt(1 - e^{-2 eta h}) z

    with c = phi / 2 ("midpoint") or c = 1 - phi / ((1 + eta) h) ("heun"). eta=0 is DPM++ 2M (midpoint).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r} is unknown; use 'midpoint' or 'heun'")
    _check_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        h_total = (1 + eta) * h
        phi = -torch.expm1(-h_total)
        x = sigma_next / sigma * torch.exp(-eta * h) * x + phi * denoised
        if old_denoised is not None:
            c = phi / 2 if solver_type == "midpoint" else 1 - phi / h_total
            x = x + c * (denoised - old_denoised) * (h / h_last)
        if eta:
            x = x + randn_like(x, generator) * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep in lambda, first/second order while history builds up.

    With H = (1 + eta) h, phi_2 = 1 - (1 - e^{-H}) / H and phi_3 = phi_2 / H - 1/2, the deterministic part is
    ``e^{-H} x + (1 - e^{-H}) D + phi_2 D' - phi_3 D''`` where D', D'' are divided differences of the last
    three D in units of h.
    """
    _check_sigmas(sigmas)
    history: list[tuple[Tensor, Tensor]] = []  # (denoised, h) of previous steps, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        h_total = (1 + eta) * h
        x = torch.exp(-h_total) * x - torch.expm1(-h_total) * denoised
        phi_2 = 1 + torch.expm1(-h_total) / h_total
        if len(history) >= 2:
            (d_1, h_1), (d_2, h_2) = history[0], history[1]
            r0, r1 = h_1 / h, h_2 / h
            slope_0, slope_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            first = slope_0 + (slope_0 - slope_1) * r0 / (r0 + r1)
            second = (slope_0 - slope_1) / (r0 + r1)
            x = x + phi_2 * first - (phi_2 / h_total - 0.5) * second
        elif history:
            d_1, h_1 = history[0]
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        if eta:
            x = x + randn_like(x, generator) * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise
        history = [(denoised, h)] + history[:1]
    return x


# ----------------------------------------------------------------------------------------------
# The original ldm samplers, in sigma space


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.0):
    """DDIM (Song et al. 2021) as in the original ldm code, with its eta.

    The original step ``x' = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps + s_t z`` with
    ``s_t = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')`` is, divided by sqrt(a'), a step to
    sigma_down plus noise sigma_up (:func:`ancestral_step`). eta=0 is deterministic.
    """
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + sigma_down * to_d(x, sigmas[i], denoised)
        if eta and sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


def _adams_bashforth(eps: list[Tensor]) -> Tensor:
    """Combine the newest-first eps history with the Adams-Bashforth weights of its length (1 to 4)."""
    weights = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    return sum(w * e for w, e in zip(weights[len(eps)], eps))


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """The original pseudo linear multistep sampler (Liu et al. 2022, PNDM), DDIM steps with eps from
    Adams-Bashforth on the eps history; the first step is a pseudo improved-Euler (one extra evaluation)."""
    _check_sigmas(sigmas)
    old_eps: list[Tensor] = []  # newest first, at most 3
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        eps = to_d(x, sigma, denoised)
        if not old_eps and sigma_next > 0:
            x_pred = x + eps * (sigma_next - sigma)
            eps_next = to_d(x_pred, sigma_next, _denoise(denoiser, x_pred, sigma_next, extra_args))
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = _adams_bashforth([eps] + old_eps)
        x = x + eps_prime * (sigma_next - sigma)
        old_eps = [eps] + old_eps[:2]
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Ancestral sampling from the DDPM posterior q(x' | x, x0 = D): in sigma space its mean is
    ``D + (sigma'/sigma)^2 (x - D)`` and its std ``sigma' sqrt(1 - (sigma'/sigma)^2)``."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        ratio = (sigma_next / sigma) ** 2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_next * (1 - ratio).sqrt()
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023): each step takes the model's x0 and noises it
    afresh to the next sigma; the last step returns the x0. Meant for LCM models and LCM-LoRAs at 4-8 steps, with
    :class:`LCMBoundaryDenoiser` (the registry's "LCM" adds it) and the "lcm" timesteps."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = denoised + sigmas[i + 1] * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_tcd(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.3,
               discrete_sigmas=None):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024; diffusers'
    ``TCDScheduler``), for TCD-LoRAs. With ``eta`` (the paper's gamma) and the next step's timestep t', the step
    goes deterministically (a DDIM step) to the earlier timestep ``s = floor((1 - eta) t')`` and then adds fresh
    noise up to sigma(t')::

        x_s = D + (sigma_s / sigma) (x - D),   x' = x_s + sqrt(sigma'^2 - sigma_s^2) z   (no noise on the last step)

    eta 0 is DDIM on these timesteps. ``discrete_sigmas``: the model's sigma[t] table (default: from the
    denoiser's ``alphas_cumprod``; the pipeline passes it, as its guided denoiser has none)."""
    _check_sigmas(sigmas)
    if discrete_sigmas is None:
        if not hasattr(denoiser, "alphas_cumprod"):
            raise ValueError("TCD needs the model's discrete sigmas: pass discrete_sigmas (sigma[t] of its schedule)")
        discrete_sigmas = sigmas_from_alphas_cumprod(denoiser.alphas_cumprod.double()).float()
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's eta (gamma) {eta} is outside [0, 1]: use e.g. 0.3")
    log_table = discrete_sigmas.to(torch.float64).log().cpu()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, sigma, x, denoised)
        t_next = int((log_table - math.log(float(sigma_next))).abs().argmin())
        sigma_s = discrete_sigmas[math.floor((1 - eta) * t_next)].to(x.device, x.dtype)
        x = denoised + sigma_s / sigma * (x - denoised)
        if eta > 0 and i < len(sigmas) - 2:
            x = x + randn_like(x, generator) * (sigma_next**2 - sigma_s**2).clamp(min=0).sqrt()
    return x


class LCMBoundaryDenoiser:
    """LCM's boundary condition around a discrete-time denoiser, as diffusers' ``LCMScheduler`` applies it::

        D_lcm(x, sigma) = c_out(t) D(x, sigma) + c_skip(t) x_t,   x_t = x / sqrt(1 + sigma^2)

    with ``c_skip = s^2 / ((10 t)^2 + s^2)``, ``c_out = 10 t / sqrt((10 t)^2 + s^2)``, ``s = 0.5`` (sigma_data) and
    ``t`` the timestep of sigma (``denoiser.sigma_to_t``). Nearly the identity at SD's timesteps (c_skip ~ 1e-5 at
    t = 19), but the consistency models were distilled with it."""

    def __init__(self, denoiser, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        if not hasattr(denoiser, "sigma_to_t"):
            raise TypeError(f"LCM's boundary condition needs a discrete-time denoiser (with sigma_to_t), "
                            f"got {type(denoiser).__name__}")
        self.denoiser, self.sigma_data, self.timestep_scaling = denoiser, sigma_data, timestep_scaling
        self.sigma_to_t = denoiser.sigma_to_t

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = self.sigma_to_t(sigma).to(torch.float64) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (t**2 + self.sigma_data**2)
        c_out = t / (t**2 + self.sigma_data**2).sqrt()
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_t = x / (1 + sigma.to(torch.float64).reshape(shape) ** 2).sqrt()
        out = self.denoiser(x, sigma, cond)
        return (c_out.reshape(shape) * out + c_skip.reshape(shape) * x_t).to(out.dtype)


# ----------------------------------------------------------------------------------------------
# Registry


SamplerFn = Callable[..., Tensor]
SCHEDULES = ("default", "karras", "exponential", "trailing", "ddim", "ddpm", "lcm", "tcd")


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler: its function, its sigma schedule, and whether it uses the original scaling.

    ``original_scaling`` (DDPM, DDIM, PLMS): like the ldm samplers, the start is ``x_T = noise`` in the
    variance-preserving space (``noise * sqrt(1 + sigma_max^2)`` in sigma space) and the result is the
    variance-preserving sample at the last sigma (``x / sqrt(1 + sigma_last^2)``), so a seed gives the
    reference latent.
    """

    name: str
    fn: SamplerFn
    schedule: str = "default"
    original_scaling: bool = False
    wrap_denoiser: Callable | None = None  # e.g. LCM's boundary condition around the model's denoiser

    def initial_x(self, noise: Tensor, sigma_max: Tensor) -> Tensor:
        """The starting point for pure noise at sigma_max."""
        scale = (1 + sigma_max**2) ** 0.5 if self.original_scaling else sigma_max
        return noise * scale

    def final_x(self, x: Tensor, sigma_last: Tensor) -> Tensor:
        """The sampler's output as the caller should decode it."""
        return x / (1 + sigma_last**2) ** 0.5 if self.original_scaling else x


_K_SAMPLERS = {
    "Euler": sample_euler,
    "Euler a": sample_euler_ancestral,
    "Heun": sample_heun,
    "DPM2": sample_dpm_2,
    "DPM2 a": sample_dpm_2_ancestral,
    "LMS": sample_lms,
    "DPM++ 2S a": sample_dpmpp_2s_ancestral,
    "DPM++ 2M": sample_dpmpp_2m,
    "DPM++ SDE": sample_dpmpp_sde,
    "DPM++ 2M SDE": sample_dpmpp_2m_sde,
    "DPM++ 3M SDE": sample_dpmpp_3m_sde,
}


def _build_registry() -> dict[str, SamplerSpec]:
    specs = [
        SamplerSpec("DDPM", sample_ddpm, "ddpm", original_scaling=True),
        SamplerSpec("DDIM", sample_ddim, "ddim", original_scaling=True),
        SamplerSpec("PLMS", sample_plms, "ddim", original_scaling=True),
    ]
    for name, fn in _K_SAMPLERS.items():
        specs += [SamplerSpec(name, fn), SamplerSpec(f"{name} Karras", fn, "karras"),
                  SamplerSpec(f"{name} Exponential", fn, "exponential")]
    specs.append(SamplerSpec("LCM", sample_lcm, "lcm", original_scaling=True, wrap_denoiser=LCMBoundaryDenoiser))
    specs.append(SamplerSpec("TCD", sample_tcd, "tcd", original_scaling=True))
    return {spec.name: spec for spec in specs}


SAMPLERS: dict[str, SamplerSpec] = _build_registry()

# Other spellings, after normalisation (see _normalize): diffusers' and k-diffusion's names.
_ALIASES = {"pndm": "plms", "euler ancestral": "euler a", "dpm2 ancestral": "dpm2 a"}


def _normalize(name: str) -> str:
    """Lower-case; '_', '-' and runs of spaces become one space; 'k_' prefix, 'dpmpp' and 'ancestral' spelled out
    the A1111 way (so 'k_dpmpp_2m_karras' -> 'dpm++ 2m karras', 'euler_ancestral' -> 'euler a')."""
    words = re.split(r"[\s_\-]+", name.strip().lower())
    if len(words) > 1 and words[0] == "k":
        words = words[1:]
    words = ["dpm++" if w == "dpmpp" else "a" if w == "ancestral" else w for w in words]
    text = re.sub(r"\bdpm (\d)\b", r"dpm\1", " ".join(words))
    return _ALIASES.get(text, text)


_BY_KEY = {_normalize(name): spec for name, spec in SAMPLERS.items()}


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by name, leniently ("DPM++ 2M Karras", "dpmpp_2m_karras", "k_euler_a", "pndm")."""
    spec = _BY_KEY.get(_normalize(name))
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; use one of: {', '.join(SAMPLERS)}")
    return spec


def _alphas_cumprod_of(model: Any) -> Tensor:
    alphas_cumprod = getattr(model, "alphas_cumprod", model)
    if not isinstance(alphas_cumprod, Tensor):
        kind = type(model).__name__
        raise TypeError(f"need a denoiser with .alphas_cumprod or the alphas_cumprod tensor, got {kind}")
    return alphas_cumprod.detach().cpu()


def check_steps(steps: int, name: str = "steps") -> int:
    """``steps`` if it is an int >= 1, else a one-line ValueError that calls it ``name`` (e.g. a flag)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{name} is {steps!r}: use at least 1 sampling step")
    return int(steps)


MAX_SEED = 2**32 - 1  # torch's CPU generator keeps the low 32 bits of a seed: 2**32 draws what 0 draws


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` if it is an int in [0, :data:`MAX_SEED`], else a one-line ValueError that calls it ``name``. Larger
    seeds are refused rather than wrapped: torch would give seed 2**32 the image of seed 0 under another name."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} {seed!r} is outside 0..{MAX_SEED}: use a seed in that range "
                         "(torch's generator uses 32 bits of it)")
    return int(seed)


def check_eta(eta: float | None, name: str = "eta") -> float | None:
    """``eta`` (None: the sampler's default) if it is a finite number >= 0, else a one-line ValueError."""
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"{name} {eta} is not a number >= 0: use 0 (deterministic DDIM) to 1 (DDPM-like)")
    return None if eta is None else float(eta)


def check_strength(strength: float, name: str = "strength") -> float:
    """img2img ``strength`` if it is in (0, 1], else a one-line ValueError that calls it ``name``."""
    if not 0.0 < strength <= 1.0:  # NaN fails too
        raise ValueError(f"{name} {strength} is outside (0, 1]: use e.g. 0.75 (1 = ignore the init image)")
    return float(strength)


def build_sigmas(spec: SamplerSpec | str, model: Any, steps: int, schedule: str | None = None) -> Tensor:
    """The sigma schedule for ``steps`` steps of a sampler.

    Args:
        spec: a :class:`SamplerSpec` or a sampler name.
        model: a denoiser with ``.alphas_cumprod`` or the alphas_cumprod tensor itself.
        schedule: override the spec's schedule: one of :data:`SCHEDULES` ("trailing" for zero-SNR models).

    For a zero-terminal-SNR schedule, "karras" and "exponential" take their first step from pure noise
    (the clamped sigma_max) to the "trailing" schedule's second sigma and ramp from there to sigma_min.
    """
    spec = get_sampler(spec) if isinstance(spec, str) else spec
    steps = check_steps(steps)
    schedule = schedule or spec.schedule
    alphas_cumprod = _alphas_cumprod_of(model)
    discrete = sigmas_from_alphas_cumprod(alphas_cumprod.double())
    sigma_min, sigma_max = float(discrete[0]), float(discrete[-1])
    if schedule == "default":
        return get_sigmas_default(alphas_cumprod, steps)
    if schedule in ("karras", "exponential"):
        ramp = get_sigmas_karras if schedule == "karras" else get_sigmas_exponential
        if steps > 1 and is_zero_terminal_snr(alphas_cumprod):
            # sigma_max is the clamp (~4096): a ramp from it would spend most steps on pure noise (13 of 20
            # Karras steps above SD's 14.6). One step from pure noise to the trailing schedule's second
            # sigma, then the ramp from there.
            top = float(get_sigmas_trailing(alphas_cumprod, steps)[1])
            return torch.cat([torch.tensor([sigma_max], dtype=torch.float32), ramp(steps - 1, sigma_min, top)])
        return ramp(steps, sigma_min, sigma_max)
    if schedule == "trailing":
        return get_sigmas_trailing(alphas_cumprod, steps)
    if schedule == "ddim":
        return get_sigmas_ddim(alphas_cumprod, steps)
    if schedule == "ddpm":
        return get_sigmas_ddpm(alphas_cumprod, steps)
    if schedule == "lcm":
        return get_sigmas_lcm(alphas_cumprod, steps)
    if schedule == "tcd":
        return get_sigmas_tcd(alphas_cumprod, steps)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------------------------
# Running a sampler: txt2img and img2img


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a full schedule that img2img runs: the last ``max(1, int(strength * steps))`` steps.

    ``strength`` in (0, 1]; 1 runs the whole schedule (pure noise start), small values change the image little.
    """
    check_strength(strength)
    steps = len(sigmas) - 1
    run = max(1, int(strength * steps))
    return sigmas[steps - run:]


def noise_latent(x0: Tensor, sigma: Tensor, generator: Generator = None, noise: Tensor | None = None) -> Tensor:
    """``x0 + sigma * noise`` with per-image noise from ``generator`` (or the given noise)."""
    noise = randn_like(x0, generator) if noise is None else noise
    return x0 + sigma * noise


def sample(spec: SamplerSpec | str, denoiser, noise: Tensor, sigmas: Tensor, *, init_latent: Tensor | None = None,
           extra_args: dict | None = None, callback: Callback | None = None, generator: Generator = None,
           **sampler_options) -> Tensor:
    """Run a sampler from noise (txt2img) or from ``init_latent`` noised to ``sigmas[0]`` (img2img, with
    :func:`img2img_sigmas`); returns the latent to decode."""
    spec = get_sampler(spec) if isinstance(spec, str) else spec
    sigmas = sigmas.to(noise.device)
    if init_latent is None:
        x = spec.initial_x(noise, sigmas[0])
    else:
        x = noise_latent(init_latent, sigmas[0], noise=noise)
    logger.debug("sampling with %s: %d steps, sigma %.4g -> %.4g", spec.name, len(sigmas) - 1, sigmas[0], sigmas[-1])
    x = spec.fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                **sampler_options)
    return spec.final_x(x, sigmas[-1])
