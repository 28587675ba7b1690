"""The denoising training loss (Ho et al. 2020) with eps / v / x0 targets and min-SNR weighting.

    t ~ U{0, ..., T-1},  eps ~ N(0, I) (+ offset noise),  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    loss = E_t [ w(t) * || net(x_t, t, cond) - target ||^2 ]

Min-SNR-gamma weighting (Hang et al. 2023) with SNR = a / (1 - a): the x0-space weight min(SNR, gamma)
expressed in each parameterisation's units:

    eps: min(SNR, gamma) / SNR      v: min(SNR, gamma) / (SNR + 1)      x0: min(SNR, gamma)

A timestep bias (diffusers' ``--timestep_bias_strategy`` of its SDXL training script) draws some timesteps
``multiplier`` times as often as the rest: ``later`` the noisiest ``portion`` of them (where layout and shapes are
decided), ``earlier`` the least noisy (detail), ``range`` those in ``[begin, end)``. The loss is not reweighted for it:
those timesteps simply get more of the training.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ldm.diffusion.denoisers import check_parameterization, prediction_target

WEIGHTINGS = ("uniform", "min_snr")
BIAS_STRATEGIES = ("none", "later", "earlier", "range")
_BIAS_KEYS = ("strategy", "multiplier", "portion", "begin", "end")


def timestep_weights(bias: Any, num_timesteps: int, key: str = "timestep_bias") -> Tensor | None:
    """The relative probability of each timestep under ``bias`` (a mapping ``{strategy, multiplier, portion}``, or
    ``{strategy: range, multiplier, begin, end}``), or None for uniform draws (no bias, or strategy ``none``).
    ValueError naming the key and the fix for anything else."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"{key} must be a mapping such as {{strategy: later, multiplier: 2.0, portion: 0.25}}, "
                         f"got {bias!r}")
    unknown = sorted(set(bias) - set(_BIAS_KEYS))
    if unknown:
        raise ValueError(f"{key} has unknown key(s) {unknown}; use {', '.join(_BIAS_KEYS)}")
    strategy = bias.get("strategy", "later")
    if strategy not in BIAS_STRATEGIES:
        raise ValueError(f"{key}.strategy {strategy!r} is not one of {', '.join(BIAS_STRATEGIES)}")
    if strategy == "none":
        return None
    multiplier = bias.get("multiplier", 2.0)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier > 0:
        raise ValueError(f"{key}.multiplier must be a number > 0 (2.0: those timesteps twice as often), "
                         f"got {multiplier!r}")
    if strategy == "range":
        begin, end = bias.get("begin", 0), bias.get("end", num_timesteps)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)) or \
                not 0 <= begin < end <= num_timesteps:
            raise ValueError(f"{key}: begin and end must be integers with 0 <= begin < end <= {num_timesteps}, "
                             f"got begin={begin!r} end={end!r}")
        picked = slice(begin, end)
    else:
        if "begin" in bias or "end" in bias:
            raise ValueError(f"{key}: begin / end are for strategy range; {strategy} takes portion")
        portion = bias.get("portion", 0.25)
        if isinstance(portion, bool) or not isinstance(portion, (int, float)) or not 0 < portion <= 1:
            raise ValueError(f"{key}.portion must be in (0, 1] (0.25: a quarter of the timesteps), got {portion!r}")
        count = max(1, round(portion * num_timesteps))
        picked = slice(num_timesteps - count, None) if strategy == "later" else slice(0, count)
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    weights[picked] *= float(multiplier)
    return weights


def min_snr_weight(parameterization: str, snr: Tensor, gamma: float) -> Tensor:
    """Per-item min-SNR-gamma weight; at SNR = 0 (zero terminal SNR) the eps weight is its limit 1."""
    clipped = snr.clamp(max=gamma)
    if parameterization == "eps":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if parameterization == "v":
        return clipped / (snr + 1)
    return clipped


class DiffusionLoss:
    """Training loss for a discrete-time network ``net(x_t, t, cond) -> prediction``.

    Args:
        parameterization: "eps", "v" or "x0": what the network predicts.
        weighting: "uniform" or "min_snr".
        min_snr_gamma: gamma of min-SNR weighting.
        offset_noise: std of a per-channel constant added to the noise (Guttenberg 2023); 0 disables.
        num_timesteps: T; the alphas_cumprod passed at call time must have this length.
        timestep_bias: draw some timesteps more (or less) often: see :func:`timestep_weights`.
    """

    def __init__(self, parameterization: str = "eps", weighting: str = "uniform", min_snr_gamma: float = 5.0,
                 offset_noise: float = 0.0, num_timesteps: int = 1000, timestep_bias: Any = None):
        check_parameterization(parameterization)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if min_snr_gamma <= 0 or offset_noise < 0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma} must be > 0 and offset_noise={offset_noise} >= 0")
        self.parameterization = parameterization
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.num_timesteps = num_timesteps
        self.timestep_weights = timestep_weights(timestep_bias, num_timesteps)

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: torch.Generator | None = None) -> Tensor:
        """``batch`` timesteps, uniform on {0, ..., T-1} or by the timestep bias; drawn on ``device`` (the
        generator's)."""
        if self.timestep_weights is None:
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
        return torch.multinomial(self.timestep_weights.to(device), batch, replacement=True, generator=generator)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I), plus offset_noise * N(0, 1) constant over the spatial dimensions of each channel.

        Drawn on the generator's device (so a CPU generator works for CUDA data) and moved to x0's device.
        """
        device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
        if self.offset_noise > 0:
            offset_shape = x0.shape[:2] + (1,) * (x0.ndim - 2)
            offset = torch.randn(offset_shape, generator=generator, dtype=x0.dtype, device=device)
            noise = noise + self.offset_noise * offset
        return noise.to(x0.device)

    def weights(self, alpha_bar: Tensor) -> Tensor:
        """Per-item loss weights w(t) for the given alpha_bar[t]."""
        if self.weighting == "uniform":
            return torch.ones_like(alpha_bar)
        return min_snr_weight(self.parameterization, alpha_bar / (1 - alpha_bar), self.min_snr_gamma)

    def __call__(self, net: Callable[[Tensor, Tensor, Any], Tensor], x0: Tensor, cond: Any, alphas_cumprod: Tensor,
                 *, t: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None, teacher: Callable[[Tensor, Tensor, Tensor], Tensor] |
                 None = None, teacher_mask: Tensor | None = None, teacher_weight: float = 1.0
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, logs)``; ``t`` and ``noise`` may be given (tests), otherwise they are drawn.
        ``teacher(x_t[mask], t[mask], mask)``: the target of the samples where ``teacher_mask`` is true, in place of
        the data's (distillation, e.g. a LoRA's prior preservation); the same weighting, times ``teacher_weight``."""
        if len(alphas_cumprod) != self.num_timesteps:
            raise ValueError(f"alphas_cumprod has {len(alphas_cumprod)} entries but num_timesteps="
                             f"{self.num_timesteps}; make the loss and the schedule agree")
        batch = x0.shape[0]
        if t is None:
            device = generator.device if generator is not None else x0.device
            t = self.sample_timesteps(batch, device, generator).to(x0.device)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        alpha_bar = alphas_cumprod.to(x0.device)[t].to(torch.float32)
        a = alpha_bar.reshape(batch, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = prediction_target(self.parameterization, x0, noise, alpha_bar)
        if teacher is not None and teacher_mask is not None and bool(teacher_mask.any()):
            mask = teacher_mask.to(x0.device)
            with torch.no_grad():
                taught = teacher(x_t[mask], t[mask], mask)
            target = target.clone()
            target[mask] = taught.to(target.dtype)
        mse = ((net(x_t, t, cond).float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        weights = self.weights(alpha_bar)
        if teacher is not None and teacher_mask is not None and teacher_weight != 1.0:
            weights = weights * torch.where(teacher_mask.to(weights.device), teacher_weight, 1.0).to(weights.dtype)
        loss = (weights * mse).mean()
        return loss, {"loss": loss.detach(), "mse": mse.mean().detach()}
