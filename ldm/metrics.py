"""Image metrics: PSNR and SSIM from torchmetrics (the autoencoder's validation and :mod:`ldm.eval` use them); FID and
KID (torchmetrics, with torch-fidelity's InceptionV3 read from a local weights file) and CLIP score (an open_clip
model read from a local weights file) for generated images.

Inputs are image tensors ``[B, C, H, W]`` (or one image ``[C, H, W]``) in ``value_range``, by default
``(-1, 1)`` — the model's pixel convention; pass ``value_range=(0, 1)`` for [0, 1] images. Both are
rescaled to [0, 1] first, so the peak signal is 1. Values are returned per image (shape ``[B]``, or a
0-dim tensor for a single image); take ``.mean()`` for a data set.

SSIM (Wang et al., 2004): torchmetrics' ``structural_similarity_index_measure`` per channel with an 11x11 Gaussian
window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over pixels and channels. (The hand-written version this replaces
used the valid region only; torchmetrics reflects the border: values differ in the third decimal.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.io import check_state_dict, read_state_dict

__all__ = ["psnr", "ssim", "inception_features", "fid_kid", "load_clip", "clip_score"]


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


# ---- FID / KID ----------------------------------------------------------------------------------------------------
def inception_features(weights: str | os.PathLike) -> nn.Module:
    """The FID reference network (torch-fidelity's InceptionV3, 2048-d pool features) with its weights from a local
    file, e.g. ``pt_inception-2015-12-05-6726825d.pth`` (nothing is downloaded)."""
    if not os.path.isfile(weights):
        raise ValueError(f"inception weights not found: {weights}; give the local file "
                         "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID InceptionV3)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as e:
        raise ValueError("FID/KID need torch-fidelity: pip install torch-fidelity (or the project's "
                         "[metrics] extra)") from e


def _unit(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return ((images.detach().float() - lo) / (hi - lo)).clamp(0, 1)


@torch.no_grad()
def fid_kid(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], feature: nn.Module, *,
            value_range: tuple[float, float] = (-1.0, 1.0), kid_subset_size: int = 1000) -> dict[str, float]:
    """FID and KID (mean, std) between two sets of images, given as batches ``[B, 3, H, W]`` in ``value_range``.
    ``feature``: :func:`inception_features` (the standard numbers) or any module mapping images to ``[B, D]``
    features. KID's subsets are ``kid_subset_size`` images or all of the smaller set."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=feature, normalize=True)
    counts = {True: 0, False: 0}
    cached: list[tuple[torch.Tensor, bool]] = []
    for images, is_real in [(b, True) for b in real] + [(b, False) for b in fake]:
        images = _unit(images, value_range)
        fid.update(images, real=is_real)
        cached.append((images, is_real))
        counts[is_real] += images.shape[0]
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images, got {counts[True]} and {counts[False]}")
    kid = KernelInceptionDistance(feature=feature, normalize=True,
                                  subset_size=min(kid_subset_size, *counts.values()))
    for images, is_real in cached:
        kid.update(images, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "num_real": counts[True], "num_fake": counts[False]}


# ---- CLIP score ---------------------------------------------------------------------------------------------------
_TEXT_ARCHS = Path(__file__).resolve().parent / "models" / "text_archs"  # ldm.models.clip_text.ARCH_DIR


def load_clip(arch: str, weights: str | os.PathLike) -> nn.Module:
    """An open_clip CLIP model (``arch``, e.g. "ViT-B-32" or "ViT-L-14") with its weights from a local file
    (safetensors or a weights-only pickle, open_clip's names), loaded strictly; in eval mode."""
    import open_clip

    if arch not in open_clip.list_models() and (_TEXT_ARCHS / f"{arch}.json").is_file():
        open_clip.add_model_config(_TEXT_ARCHS)  # the project's (tiny) CLIP architectures, as the text encoder reads them
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; use one of open_clip.list_models(), e.g. ViT-B-32")
    if not os.path.isfile(weights):
        raise ValueError(f"CLIP weights not found: {weights}; give a local open_clip {arch} weights file")
    model = open_clip.create_model(arch, pretrained=None)
    state, _ = read_state_dict(weights)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_state_dict(model.state_dict(), state, str(weights), target=f"open_clip {arch}",
                     fix="give the weights of this architecture (--clip-arch)")
    model.load_state_dict(state, strict=True)
    model.arch = arch
    return model.eval().requires_grad_(False)


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], model: nn.Module,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """CLIP score per image (Hessel et al. 2021, as torchmetrics defines it): ``100 * max(cos(E_img, E_txt), 0)``.
    Images are resized (bicubic, shorter side) and center-cropped to the model's input size and normalized with
    its mean/std, as open_clip's preprocessing does."""
    import open_clip

    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(f"need images [B, 3, H, W] and B prompts, got {tuple(images.shape)} and {len(prompts)}")
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    x = _unit(images, value_range)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    device = next(model.parameters()).device
    x = ((x - mean) / std).to(device)
    tokenizer = open_clip.get_tokenizer(getattr(model, "arch", "ViT-B-32"))
    image_features = F.normalize(model.encode_image(x).float(), dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
    return 100 * (image_features * text_features).sum(-1).clamp(min=0).cpu()
