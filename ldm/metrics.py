"""Image metrics: PSNR and SSIM, in plain torch (the autoencoder's validation and :mod:`ldm.eval` use them).

Inputs are image tensors ``[B, C, H, W]`` (or one image ``[C, H, W]``) in ``value_range``, by default
``(-1, 1)`` — the model's pixel convention; pass ``value_range=(0, 1)`` for [0, 1] images. Both are
rescaled to [0, 1] first, so the peak signal is 1. Values are returned per image (shape ``[B]``, or a
0-dim tensor for a single image); take ``.mean()`` for a data set.

SSIM (Wang et al., 2004) is computed per channel with an 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, over the valid region only (no padding), then averaged over pixels and
channels — the usual settings of the paper and of scikit-image with ``gaussian_weights=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]


def _prepare(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float]) -> tuple:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("psnr/ssim take torch tensors; convert PIL images with ldm.data.shapes.image_to_tensor")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; compare equal sizes")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected [B, C, H, W] or [C, H, W] tensors, got shape {tuple(a.shape)}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range {value_range} must be (low, high) with high > low, e.g. (-1, 1)")
    single = a.ndim == 3
    a, b = (t.unsqueeze(0) if single else t for t in (a, b))
    a, b = ((t.detach().to(torch.float64) - lo) / (hi - lo) for t in (a, b))
    return a, b, single


def psnr(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(1 / MSE)`` on [0, 1]-scaled images; ``inf`` if equal."""
    a, b, single = _prepare(a, b, value_range)
    mse = (a - b).pow(2).flatten(1).mean(1)
    out = (10 * torch.log10(1.0 / mse)).float()  # mse == 0 gives inf
    return out[0] if single else out


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable valid-region Gaussian filter of every channel."""
    c, k = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity, per channel with a Gaussian window, averaged; 1.0 for equal images."""
    a, b, single = _prepare(a, b, value_range)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} pixels are smaller than the {window_size}px SSIM "
                         "window; pass a smaller odd window_size")
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(window_size, sigma, a.dtype)
    mu_a, mu_b = _blur(a, window), _blur(b, window)
    var_a = _blur(a * a, window) - mu_a.pow(2)
    var_b = _blur(b * b, window) - mu_b.pow(2)
    cov = _blur(a * b, window) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2)
    out = (num / den).flatten(1).mean(1).float()
    return out[0] if single else out
