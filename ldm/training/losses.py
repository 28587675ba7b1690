"""First-stage training loss: L1 + LPIPS reconstruction, KL, and a PatchGAN discriminator.

The equations are those of the original ``LPIPSWithDiscriminator`` (taming-transformers / ldm)::

    rec      = pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)     # per pixel
    nll      = sum(rec / exp(logvar) + logvar) / B                                        # learned logvar
    kl       = sum(KL(q(z|x) || N(0, I))) / B
    g_loss   = -mean(D(x_rec))
    d_weight = disc_weight * clamp(|grad_last nll| / (|grad_last g_loss| + 1e-4), 0, 1e4)  # adaptive
    L_ae     = nll + kl_weight * kl + d_weight * disc_factor * g_loss
    L_disc   = disc_factor * hinge(D(x), D(x_rec))    (or "vanilla": softplus)

``disc_factor`` is 0 before ``disc_start`` (``adopt_weight``): until then only the autoencoder trains.

LPIPS weights. VGG16 weights cannot be downloaded here, so :class:`LPIPS` reads them from local files named
by ``perceptual_ckpt`` (one path or a list). Each file is a state dict (safetensors, or a torch file read with
``weights_only=True``); the keys it understands, after any prefix:

* ``features.N.weight|bias`` -- torchvision's ``vgg16().state_dict()`` (``classifier.*`` is ignored);
* ``net.sliceK.N.weight|bias`` -- a full ``lpips.LPIPS`` / taming ``LPIPS`` state dict (N is the same index);
* ``linK.model.1.weight`` or ``lins.K.model.1.weight`` -- the lpips package's linear heads
  (``lpips/weights/v0.1/vgg.pth``), K = 0..4.

So ``[vgg16.pth, vgg.pth]``, a saved ``lpips.LPIPS(net="vgg")`` state dict, or an original first-stage training
checkpoint (``loss.perceptual_loss.*``) all work. The VGG weights are required; without the linear heads LPIPS
uses uniform channel weights (lpips' "baseline" variant) and says so. Without any file, the loss logs one
warning and trains with ``perceptual_weight = 0``. Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.io import check_state_dict, read_state_dict

__all__ = ["LPIPS", "NLayerDiscriminator", "ActNorm", "LPIPSWithDiscriminator", "adopt_weight",
           "hinge_d_loss", "vanilla_d_loss"]

log = logging.getLogger(__name__)

PathList = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

# VGG16 "D" configuration (torchvision's vgg16().features): conv widths, "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: features[0:4], [4:9], [9:16], [16:23], [23:30].
_SLICE_ENDS = (4, 9, 16, 23, 30)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_VGG_KEY = re.compile(r"(?:^|\.)(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"(?:^|\.)(?:lin|lins\.)(\d)\.model\.1\.weight$")


def vgg16_features() -> nn.Sequential:
    """The convolutional part of torchvision's VGG16 (same module indices, so its state-dict keys match)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


class NetLinLayer(nn.Module):
    """lpips' linear head: dropout then a 1x1 conv without bias (``model.1.weight`` as in the lpips files)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on VGG16, weights from local files (see module doc).

    ``forward(a, b)`` takes images in [-1, 1] and returns the distance per image, shape (B, 1, 1, 1).
    The network is frozen and always in eval mode (no dropout), but gradients flow to the inputs.
    """

    def __init__(self, ckpt: PathList):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = vgg16_features()[:_SLICE_ENDS[-1]]
        self.lins = nn.ModuleList(NetLinLayer(c) for c in _LPIPS_CHANNELS)
        self.load_weights(ckpt)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """A fixed metric: stays in eval mode whatever the parent module does."""
        return super().train(False)

    def load_weights(self, ckpt: PathList) -> None:
        """Load VGG16 and (optionally) the linear heads from one or more files; raise if VGG is missing."""
        paths = [ckpt] if isinstance(ckpt, (str, os.PathLike)) else list(ckpt)
        found = self._collect(paths)
        own = self.state_dict()
        vgg_keys = [k for k in own if k.startswith("net.")]
        lin_keys = [k for k in own if k.startswith("lins.")]
        missing_vgg = [k for k in vgg_keys if k not in found]
        if missing_vgg:
            raise ValueError(f"perceptual_ckpt {paths} lacks VGG16 weights ({len(missing_vgg)} of {len(vgg_keys)} "
                             "tensors missing, e.g. features.0.weight); give torchvision's vgg16 state dict")
        if not all(k in found for k in lin_keys):
            log.warning("perceptual_ckpt %s has no LPIPS linear heads (lin0..lin4): using uniform channel "
                        "weights; add lpips' weights/v0.1/vgg.pth to perceptual_ckpt for real LPIPS", paths)
            found.update({k: torch.ones_like(own[k]) for k in lin_keys})
        state = {k: found[k] for k in own}
        check_state_dict(own, state, f"perceptual_ckpt {paths}", target="VGG16/LPIPS",
                         fix="give torchvision's vgg16 state dict and lpips' weights/v0.1/vgg.pth")
        self.load_state_dict(state, strict=True)
        log.info("LPIPS weights loaded from %s", paths)

    @staticmethod
    def _collect(paths: list) -> dict[str, torch.Tensor]:
        """Keys of all files mapped to this module's names (``net.N.*``, ``lins.K.model.1.weight``)."""
        found: dict[str, torch.Tensor] = {}
        for path in paths:
            for key, value in read_state_dict(path)[0].items():
                if m := _VGG_KEY.search(key):
                    found[f"net.{m.group(1)}.{m.group(2)}"] = value
                elif m := _LIN_KEY.search(key):
                    found[f"lins.{m.group(1)}.model.1.weight"] = value
        return found

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, start = [], 0
        h = (x - self.shift) / self.scale
        for end in _SLICE_ENDS:
            h = self.net[start:end](h)
            feats.append(h)
            start = end
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for lin, fa, fb in zip(self.lins, self._features(a), self._features(b)):
            diff = (_normalize_channels(fa) - _normalize_channels(fb)) ** 2
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Glow; taming's ActNorm)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1)
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return self.scale * (x + self.loc)


def _init_discriminator_weights(m: nn.Module) -> None:
    """pix2pix initialisation: conv N(0, 0.02); norm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): one logit per overlapping patch, shape (B, 1, h, w).

    ``n_layers`` stride-2 4x4 convs (widths ndf * min(2**i, 8)), one stride-1 conv, then a 1-channel conv.
    Norm layers are BatchNorm (convs without bias), or ActNorm with ``use_actnorm`` (convs with bias).
    Keys are ``main.N.*`` as in the original ``loss.discriminator.*``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"disc_num_layers must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                       norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class LPIPSWithDiscriminator(nn.Module):
    """The first-stage loss (equations in the module docstring).

    Use :meth:`generator_loss` for the autoencoder's step and :meth:`discriminator_loss` for the
    discriminator's; ``forward(..., optimizer_idx)`` dispatches to them like the original. Both return
    ``(loss, logs)`` with ``logs`` a dict of detached scalars named ``"{split}/..."``.
    ``global_step`` counts autoencoder steps (batches), the unit of ``disc_start``.
    ``pixelloss_weight`` scales the L1 term (the original stored it but never used it; 1.0 is the same).
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1e-6,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 0.5, perceptual_weight: float = 1.0,
                 perceptual_ckpt: PathList | None = None, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_loss: str = "hinge", disc_ndf: int = 64):
        super().__init__()
        if disc_loss not in _D_LOSSES:
            raise ValueError(f"disc_loss={disc_loss!r} is unknown; use one of {', '.join(_D_LOSSES)}")
        for name, value in (("kl_weight", kl_weight), ("pixelloss_weight", pixelloss_weight),
                            ("disc_factor", disc_factor), ("disc_weight", disc_weight),
                            ("perceptual_weight", perceptual_weight)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        self.disc_start = int(disc_start)
        self.kl_weight, self.pixel_weight = kl_weight, pixelloss_weight
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_conditional = disc_conditional
        self.disc_loss = _D_LOSSES[disc_loss]
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init)
        self.perceptual_weight, self.perceptual_loss = self._make_perceptual(perceptual_weight, perceptual_ckpt)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)

    @staticmethod
    def _make_perceptual(weight: float, ckpt: PathList | None) -> tuple[float, LPIPS | None]:
        if weight == 0:
            return 0.0, None
        if not ckpt:
            log.warning("no LPIPS weights: training without the perceptual loss (perceptual_weight set to 0). "
                        "VGG weights are never downloaded; to use LPIPS set lossconfig.params.perceptual_ckpt to "
                        "a local torchvision vgg16 state dict (and lpips' vgg.pth linear heads)")
            return 0.0, None
        return weight, LPIPS(ckpt)

    # ---- pieces ---------------------------------------------------------------------------------------------
    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at this step (``disc_factor > 0`` from ``disc_start`` on)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.disc_start) > 0

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 (+ perceptual, broadcast per image): shape (B, C, H, W)."""
        rec = self.pixel_weight * (inputs - reconstructions).abs()
        if self.perceptual_loss is not None:
            rec = rec + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)
        return rec

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """disc_weight * ||d nll / d last|| / (||d g_loss / d last|| + 1e-4), clamped to [0, 1e4]."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _logits(self, images: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.disc_conditional:
            if cond is None:
                raise ValueError("disc_conditional=true needs a cond tensor for the discriminator")
            images = torch.cat((images, cond), dim=1)
        return self.discriminator(images.contiguous())

    # ---- the two losses -------------------------------------------------------------------------------------
    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, global_step: int,
                       last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                       split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss. ``last_layer`` (the decoder's last weight) is needed for the adaptive
        weight whenever the GAN term is active and gradients are on; without gradients (validation) the
        GAN term is logged but left out of the total (d_weight 0), as in the original."""
        batch = inputs.shape[0]
        rec_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = torch.sum(rec_loss / torch.exp(self.logvar) + self.logvar) / batch
        kl_loss = torch.sum(posteriors.kl()) / batch
        zero = nll_loss.new_zeros(())
        g_loss, d_weight, disc_factor = zero, zero, 0.0
        if self.discriminator_active(global_step):
            disc_factor = self.disc_factor
            g_loss = -torch.mean(self._logits(reconstructions, cond))
            if nll_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer (the decoder's last weight) once the "
                                     "discriminator is active")
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        logs = {"total_loss": loss, "logvar": self.logvar, "kl_loss": kl_loss, "nll_loss": nll_loss,
                "rec_loss": rec_loss.mean(), "d_weight": d_weight, "disc_factor": torch.tensor(float(disc_factor)),
                "g_loss": g_loss}
        return loss, {f"{split}/{k}": v.detach().clone() for k, v in logs.items()}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: torch.Tensor | None = None,
                           split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``inputs`` and (detached) ``reconstructions``."""
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach().clone() for k, v in logs.items()}

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The original interface: ``optimizer_idx`` 0 is the autoencoder, 1 the discriminator."""
        if optimizer_idx == 0:
            return self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, cond, split)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
