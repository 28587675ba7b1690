"""Denoisers: turn a discrete-time network into ``D(x, sigma, cond) -> x0 estimate``.

The network was trained on variance-preserving inputs ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` at integer
timesteps t (``a = alpha_bar[t]``). In the sigma convention ``x = x0 + sigma * eps`` this is EDM's
preconditioning (sigma_data = 1)::

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * net(c_in(sigma) * x, c_noise(sigma), cond)

    c_in    = 1 / sqrt(1 + sigma^2)                       (so the net sees x_t)
    c_noise = timestep t with sigma[t] = sigma            (nearest integer, or fractional)

    parameterization   network predicts                 c_skip             c_out
    "eps"              eps                              1                  -sigma
    "v"                v = sqrt(a) eps - sqrt(1-a) x0   1 / (1 + sigma^2)  -sigma / sqrt(1 + sigma^2)
    "x0"               x0                               0                  1

:func:`prediction_target` gives the matching training target, so that a network that outputs the target
exactly makes ``D`` return x0 exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ldm.diffusion.schedules import sigma_to_t, sigmas_from_alphas_cumprod, t_to_sigma

PARAMETERIZATIONS = ("eps", "v", "x0")

Net = Callable[[Tensor, Tensor, Any], Tensor]


def check_parameterization(name: str) -> None:
    """The one check of a model's prediction target (eps, v or x0)."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; use one of {', '.join(PARAMETERIZATIONS)}")


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-item tensor [B] so it broadcasts against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).to(x.dtype)


def prediction_target(parameterization: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """What a network of the given parameterization should output for ``x_t = sqrt(a) x0 + sqrt(1-a) noise``.

    ``alpha_bar`` is per item ([B]); eps -> noise, v -> sqrt(a) noise - sqrt(1-a) x0, x0 -> x0.
    """
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def scalings(parameterization: str, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for the given parameterization at noise level sigma (see module table)."""
    check_parameterization(parameterization)
    c_in = 1 / (sigma**2 + 1).sqrt()
    if parameterization == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if parameterization == "v":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


class DiscreteDenoiser:
    """``D(x, sigma, cond)`` around a network trained on a discrete DDPM schedule.

    Args:
        net: ``net(x_in, t, cond) -> output``; cond is passed through untouched (tensor, dict or None).
        alphas_cumprod: the training schedule's alpha_bar [T].
        parameterization: "eps", "v" or "x0": what ``net`` predicts.
        quantize: feed the net the integer timestep nearest to sigma in log-sigma (int64, as the
            original samplers do); otherwise the fractional timestep interpolated in log-sigma.
    """

    def __init__(self, net: Net, alphas_cumprod: Tensor, parameterization: str = "eps", quantize: bool = True):
        check_parameterization(parameterization)
        self.net = net
        self.alphas_cumprod = alphas_cumprod.detach()  # keeps its dtype: float32 like the checkpoint buffer
        self.parameterization = parameterization
        self.quantize = quantize
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timestep the net sees for ``sigma`` (int64 when quantizing, else fractional)."""
        return sigma_to_t(sigma, self.alphas_cumprod, quantize=self.quantize)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma of a (possibly fractional) timestep."""
        return t_to_sigma(t, self.alphas_cumprod)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        if sigma.shape != x.shape[:1]:
            raise ValueError(
                f"sigma has shape {tuple(sigma.shape)} but x has batch {x.shape[0]}; pass one sigma per item"
            )
        c_skip, c_out, c_in = (_bcast(c, x) for c in scalings(self.parameterization, sigma))
        out = self.net(x * c_in, self.sigma_to_t(sigma), cond)
        return c_skip * x + c_out * out


class EpsDenoiser(DiscreteDenoiser):
    """A network that predicts the noise eps (SD 1.x, SD 2.x base)."""

    def __init__(self, net: Net, alphas_cumprod: Tensor, quantize: bool = True):
        super().__init__(net, alphas_cumprod, "eps", quantize)


class VDenoiser(DiscreteDenoiser):
    """A network that predicts v = sqrt(a) eps - sqrt(1-a) x0 (SD 2.x 768-v)."""

    def __init__(self, net: Net, alphas_cumprod: Tensor, quantize: bool = True):
        super().__init__(net, alphas_cumprod, "v", quantize)


class X0Denoiser(DiscreteDenoiser):
    """A network that predicts x0 directly."""

    def __init__(self, net: Net, alphas_cumprod: Tensor, quantize: bool = True):
        super().__init__(net, alphas_cumprod, "x0", quantize)


def make_denoiser(net: Net, alphas_cumprod: Tensor, parameterization: str = "eps", quantize: bool = True):
    """The denoiser for a parameterization name ("eps", "v", "x0")."""
    check_parameterization(parameterization)
    cls = {"eps": EpsDenoiser, "v": VDenoiser, "x0": X0Denoiser}[parameterization]
    return cls(net, alphas_cumprod, quantize=quantize)
