"""Noise schedules: betas, the 12 checkpoint buffers, and sigma schedules for samplers.

Conventions (k-diffusion): a noisy sample is ``x = x0 + sigma * noise``. A discrete DDPM with
cumulative product ``alpha_bar[t]`` corresponds to ``sigma[t] = sqrt((1 - alpha_bar[t]) / alpha_bar[t])``
and its variance-preserving sample is ``x_t = x / sqrt(1 + sigma^2)``. The log signal-to-noise ratio is
``log(alpha_bar / (1 - alpha_bar)) = -2 log(sigma)``.

Beta schedule names (the original ldm code and diffusers disagree, so both spellings are accepted):

* ``"scaled_linear"`` (diffusers) == ``"linear"`` (original ldm): ``linspace(sqrt(start), sqrt(end), n) ** 2``.
  This is Stable Diffusion's schedule.
* ``"sqrt_linear"`` (original ldm; diffusers calls it ``"linear"``): ``linspace(start, end, n)``.
* ``"sqrt"`` (original ldm): ``linspace(start, end, n) ** 0.5``.
* ``"cosine"``: Nichol & Dhariwal's squared-cosine alpha_bar, betas clipped to 0.999.

Every sigma schedule for samplers is descending and ends with an appended 0 (the DDIM/PLMS one
ends at ``sigma[t=0]`` instead, exactly like the original samplers; see :func:`get_sigmas_ddim`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("scaled_linear", "linear", "sqrt_linear", "sqrt", "cosine")

# diffusers' clamp for a zero terminal SNR (alpha_bar[T-1] == 0 would give sigma = inf).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def make_betas(
    kind: str = "scaled_linear",
    n: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Return the float64 beta schedule ``[n]`` of the given kind (names: see the module docstring)."""
    if n < 1:
        raise ValueError(f"make_betas: n={n} must be a positive number of timesteps; use e.g. n=1000")
    if kind in ("scaled_linear", "linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64) ** 0.5
    if kind == "cosine":
        steps = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, 0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; use one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_ab = alphas_cumprod(betas.double()).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar[t] = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1 - betas, dim=0)


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def sigma_to_log_snr(sigma: Tensor) -> Tensor:
    """log SNR = log(alpha_bar / (1 - alpha_bar)) = -2 log(sigma)."""
    return -2 * sigma.log()


def log_snr_to_sigma(log_snr: Tensor) -> Tensor:
    """Inverse of :func:`sigma_to_log_snr`."""
    return (-0.5 * log_snr).exp()


def is_zero_terminal_snr(alphas_cumprod: Tensor) -> bool:
    """Whether a schedule ends at zero SNR (``alpha_bar[T-1]`` below the sigma clamp, e.g. rescaled betas)."""
    return float(alphas_cumprod[-1]) < ZERO_SNR_ALPHA_BAR


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """The discrete sigma[t] of a schedule; a zero terminal alpha_bar is clamped to 2**-24 (sigma ~ 4096)."""
    return alpha_bar_to_sigma(alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_BAR))


def t_to_sigma(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sigma at (possibly fractional) timesteps ``t``, interpolating linearly in log-sigma."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log().to(t.device)
    t = t.to(log_sigmas.dtype).clamp(0, len(log_sigmas) - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: Tensor, alphas_cumprod: Tensor, quantize: bool = False) -> Tensor:
    """Fractional timestep of ``sigma`` (inverse of :func:`t_to_sigma`), clamped to [0, T-1].

    With ``quantize`` the timestep whose sigma is nearest in log-sigma is returned (as int64),
    which is what the original samplers feed the network.
    """
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log().to(sigma.device)
    log_sigma = sigma.to(log_sigmas.dtype).log()
    high = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
    low = high - 1
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
    t = low + w
    return t.round().long() if quantize else t.to(sigma.dtype)


def register_schedule_buffers(betas: Tensor, v_posterior: float = 0.0) -> dict[str, Tensor]:
    """The 12 float32 buffers of the original ldm checkpoints, computed in float64 with the original formulas."""
    betas = betas.double()
    alphas = 1 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = (1 - v_posterior) * betas * (1 - ac_prev) / (1 - ac) + v_posterior * betas
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }
    return {name: value.float() for name, value in buffers.items()}


# ----------------------------------------------------------------------------------------------
# Sigma schedules for samplers (descending, float32, final 0 appended unless stated otherwise).


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of sampling steps is {n}; use at least 1 step")


def get_sigmas_default(alphas_cumprod: Tensor, n: int) -> Tensor:
    """k-diffusion's discrete schedule: timesteps ``linspace(T-1, 0, n)``, sigma interpolated in log-sigma.

    diffusers' ``timestep_spacing="linspace"`` uses the same timesteps but interpolates sigma linearly;
    the two agree to ~1e-5 relative.
    """
    _check_steps(n)
    t = torch.linspace(len(alphas_cumprod) - 1, 0, n, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, alphas_cumprod.double())).float()


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) schedule: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho).float()


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas evenly spaced in log-sigma from sigma_max to sigma_min."""
    _check_steps(n)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp()).float()


def get_sigmas_trailing(alphas_cumprod: Tensor, n: int) -> Tensor:
    """"Trailing" spacing (Lin et al. 2023, Table 2): timesteps ``round(arange(T, 0, -T/n)) - 1``.

    Starts at the last timestep, so a zero-terminal-SNR model is sampled from (clamped) pure noise.
    """
    _check_steps(n)
    T = len(alphas_cumprod)
    t = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    return _append_zero(sigmas_from_alphas_cumprod(alphas_cumprod.double())[t.long()]).float()


def ddim_timesteps(n_steps: int, T: int = 1000) -> Tensor:
    """The original ldm DDIM/PLMS ("uniform") timesteps, ascending: ``range(0, T, T // n_steps) + 1``.

    Like the original this can give more than ``n_steps`` timesteps (7 steps -> 8 timesteps). Where the
    original would index timestep T and crash (e.g. 3 steps -> [1, 334, 667, 1000]) that entry is dropped.
    """
    if not 1 <= n_steps < T:
        raise ValueError(f"DDIM and PLMS need 1 <= steps < {T} (their timesteps are range(0, T, T // steps) + 1), "
                         f"got {n_steps}")
    timesteps = torch.arange(0, T, T // n_steps) + 1
    if timesteps[-1] >= T:
        logger.warning("DDIM with %d steps: dropping timestep %d >= %d (the original code fails here)",
                       n_steps, int(timesteps[-1]), T)
        timesteps = timesteps[:-1]
    return timesteps


def get_sigmas_ddim(alphas_cumprod: Tensor, n_steps: int) -> Tensor:
    """Sigmas of the original DDIM/PLMS chain: ``sigma[ddim_timesteps]`` descending, then ``sigma[0]``.

    The original samplers step from the last DDIM timestep down to ``alpha_bar[0]`` (not to 0), so the
    final entry is ``sigma[t=0]`` (~0.029 for SD); no 0 is appended.
    """
    ts = ddim_timesteps(n_steps, len(alphas_cumprod))
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())
    return torch.cat([sigmas[ts.flip(0)], sigmas[:1]]).float()


def get_sigmas_ddpm(alphas_cumprod: Tensor, n_steps: int) -> Tensor:
    """Sigmas at the integer timesteps ``range(0, T, T // n)`` descending, then 0.

    With ``n_steps == T`` this is the original ancestral DDPM loop over t = T-1, ..., 0.
    """
    T = len(alphas_cumprod)
    if not 1 <= n_steps <= T:
        raise ValueError(f"DDPM needs 1 <= steps <= {T}, got {n_steps}")
    ts = torch.arange(0, T, T // n_steps).flip(0)
    return _append_zero(sigmas_from_alphas_cumprod(alphas_cumprod.double())[ts]).float()


def lcm_timesteps(n_steps: int, T: int = 1000, original_steps: int = 50) -> Tensor:
    """The timesteps of a Latent Consistency Model's sampler (diffusers' ``LCMScheduler``), descending: ``n_steps``
    evenly spaced indices (floored) into the distillation schedule ``range(1, original_steps + 1) * (T //
    original_steps) - 1`` reversed, e.g. 4 steps -> [999, 759, 499, 259]."""
    if not 1 <= n_steps <= original_steps:
        raise ValueError(f"LCM takes 1 to {original_steps} steps (its {original_steps}-step distillation schedule), "
                         f"got {n_steps}: use 4-8 steps")
    origin = (torch.arange(1, original_steps + 1) * (T // original_steps) - 1).flip(0)
    step = original_steps / n_steps  # numpy.linspace(0, original_steps, n_steps, endpoint=False), floored
    return origin[torch.tensor([math.floor(i * step) for i in range(n_steps)])]


def get_sigmas_lcm(alphas_cumprod: Tensor, n_steps: int, original_steps: int = 50) -> Tensor:
    """Sigmas at :func:`lcm_timesteps`, then 0 (the last step returns the model's x0)."""
    ts = lcm_timesteps(n_steps, len(alphas_cumprod), original_steps)
    return _append_zero(sigmas_from_alphas_cumprod(alphas_cumprod.double())[ts]).float()


def get_sigmas_tcd(alphas_cumprod: Tensor, n_steps: int, original_steps: int = 50) -> Tensor:
    """Sigmas at :func:`lcm_timesteps`, then ``sigma[t=0]`` (diffusers' ``TCDScheduler`` ends at timestep 0)."""
    ts = lcm_timesteps(n_steps, len(alphas_cumprod), original_steps)
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())
    return torch.cat([sigmas[ts], sigmas[:1]]).float()
