"""Image metrics: PSNR and SSIM from torchmetrics (the autoencoder's validation and :mod:`ldm.eval` use them).

Inputs are image tensors ``[B, C, H, W]`` (or one image ``[C, H, W]``) in ``value_range``, by default
``(-1, 1)`` — the model's pixel convention; pass ``value_range=(0, 1)`` for [0, 1] images. Both are
rescaled to [0, 1] first, so the peak signal is 1. Values are returned per image (shape ``[B]``, or a
0-dim tensor for a single image); take ``.mean()`` for a data set.

SSIM (Wang et al., 2004): torchmetrics' ``structural_similarity_index_measure`` per channel with an 11x11 Gaussian
window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over pixels and channels. (The hand-written version this replaces
used the valid region only; torchmetrics reflects the border: values differ in the third decimal.)
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

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
    out = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).float()
    return out[0] if single else out


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity, per channel with a Gaussian window, averaged; 1.0 for equal images."""
    a, b, single = _prepare(a, b, value_range)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} pixels are smaller than the {window_size}px SSIM "
                         "window; pass a smaller odd window_size")
    out = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", gaussian_kernel=True,
                                              sigma=sigma, kernel_size=window_size).float()
    return out[0] if single else out
