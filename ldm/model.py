"""The full latent diffusion model as a plain ``nn.Module`` (no Lightning): what checkpoints load into.

Attribute names are those of the original ``LatentDiffusion`` so that its ``state_dict`` is the Stable Diffusion
layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and the 12 schedule buffers).
Training (``ldm.training``) subclasses it; the pipeline uses it as is.

Conditioning is the model's: its :class:`~ldm.models.conditioner.Conditioner` turns a batch dict (``txt``: the
prompts, and whatever else its embedders read) into the dict the UNet takes (``crossattn``, ``vector``,
``concat``), through :meth:`LatentDiffusion.get_learned_conditioning` and
:meth:`LatentDiffusion.get_unconditional_conditioning`. Nobody else builds that dict.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.config import instantiate_from_config
from ldm.diffusion import schedules
from ldm.diffusion.denoisers import check_parameterization, make_denoiser
from ldm.models.conditioner import Conditioner, EmbedderSpec, InpaintingConcat

log = logging.getLogger(__name__)

PROMPT_KEY = "txt"  # the batch entry holding the prompts (sgm's name)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and routes the conditioning dict into it.

    cond keys: ``crossattn`` (the UNet's ``context``, [B, L, D]), ``vector`` (its ``y``, [B, adm_in_channels])
    and ``concat`` (extra input channels, e.g. the mask and masked-image latents of a 9-channel inpainting UNet).
    """

    def __init__(self, unet_config: Any):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            cond = {}
        elif isinstance(cond, torch.Tensor):
            cond = {"crossattn": cond}
        if cond.get("concat") is not None:
            x = torch.cat([x, cond["concat"]], dim=1)
        return self.diffusion_model(x, t, context=cond.get("crossattn"), y=cond.get("vector"))


class LatentDiffusion(nn.Module):
    """First stage (VAE), conditioner and UNet, with the discrete noise schedule as buffers.

    Parameter names follow the original configs (``model.params`` of v1-inference.yaml / v2-inference.yaml).
    The conditioning comes from one of:

    - ``cond_stage_config`` (SD 1/2): the text encoder, stored as ``cond_stage_model.*``, reading ``txt``;
      with ``conditioning_key: hybrid`` (SD inpainting) also ``mask`` and ``masked_image_latents``
      (:class:`~ldm.models.conditioner.InpaintingConcat`). Its conditioner adds no state-dict entries.
    - ``conditioner_config``: a :class:`~ldm.models.conditioner.Conditioner` node, stored as
      ``conditioner.embedders.N.*`` (sgm's layout), for any mix of text, vector and concat inputs.

    ``schedule_in_state_dict: false`` keeps the schedule buffers out of the state dict (SDXL's files, made by
    sgm, have none; the buffers are computed from the schedule parameters).
    """

    def __init__(
        self,
        unet_config: Any,
        first_stage_config: Any,
        cond_stage_config: Any = None,
        *,
        conditioner_config: Any = None,
        parameterization: str = "eps",
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
        zero_terminal_snr: bool = False,
        scale_factor: float = 0.18215,
        scale_by_std: bool = False,
        conditioning_key: str = "crossattn",
        first_stage_key: str = "image",
        cond_stage_key: str = "caption",
        image_size: int = 64,
        channels: int = 4,
        cond_stage_trainable: bool = False,
        use_ema: bool = False,
        # accepted for compatibility with the original configs; they change nothing at inference
        num_timesteps_cond: int = 1,
        log_every_t: int = 200,
        monitor: str | None = None,
        clip_denoised: bool = False,
        scheduler_config: Any = None,
        schedule_in_state_dict: bool = True,
    ):
        super().__init__()
        check_parameterization(parameterization)
        if conditioning_key not in ("crossattn", "hybrid"):
            raise ValueError(f"conditioning_key must be 'crossattn' or 'hybrid', got {conditioning_key!r}")
        self.parameterization = parameterization
        self.conditioning_key = conditioning_key
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = cond_stage_trainable
        self.use_ema = use_ema
        self.scale_by_std = scale_by_std
        self.num_timesteps = int(timesteps)

        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.eval()
        self.first_stage_model.requires_grad_(False)
        if (cond_stage_config is None) == (conditioner_config is None):
            raise ValueError("give one of cond_stage_config (a text encoder, SD 1/2 layout) or conditioner_config "
                             "(a list of embedders)" + (", not both" if cond_stage_config is not None else ""))
        if conditioner_config is not None:
            self.cond_stage_model = None
            self.conditioner = instantiate_from_config(conditioner_config)
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
            # not a submodule: the state dict keeps the original cond_stage_model.* names
            object.__setattr__(self, "conditioner", self._legacy_conditioner(cond_stage_trainable))

        betas = schedules.make_betas(beta_schedule, self.num_timesteps, linear_start=linear_start,
                                     linear_end=linear_end, cosine_s=cosine_s)
        if zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        # SD 1/2 files store the 12 schedule buffers; SDXL files (sgm) do not: there they are derived, not saved
        for name, value in schedules.register_schedule_buffers(betas).items():
            self.register_buffer(name, value, persistent=schedule_in_state_dict)

        # As in the original: a buffer (saved) only when it is estimated from data, a plain float otherwise.
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)

    # ---- first stage -------------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return int(self.first_stage_model.downsample_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.first_stage_model.embed_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage_model.eval()  # frozen, always
        self.conditioner.train(mode)  # its frozen embedders stay in eval mode
        return self

    def _legacy_conditioner(self, trainable: bool) -> Conditioner:
        """The conditioner of an SD 1/2 config: the text encoder on ``txt`` (CFG training drops prompts to "",
        as those models were trained), plus the inpainting channels for ``conditioning_key: hybrid``."""
        encoder = self.cond_stage_model
        if trainable and (getattr(encoder, "frozen", False) or not any(p.requires_grad for p in encoder.parameters())):
            raise ValueError("cond_stage_trainable=true but the text encoder is frozen; set "
                             "model.params.cond_stage_config.params.freeze=false")
        embedders = [(encoder, EmbedderSpec((PROMPT_KEY,), legacy_ucg_value="", is_trainable=trainable))]
        if self.conditioning_key == "hybrid":
            embedders.append((InpaintingConcat(), EmbedderSpec(("mask", "masked_image_latents"))))
        return Conditioner(embedders)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, *, sample: bool = True,
                           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (a posterior sample, or its mode with sample=False)."""
        posterior = self.first_stage_model.encode(x)
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    # ---- conditioning ------------------------------------------------------------------------------------
    def get_learned_conditioning(self, c: Sequence[str] | Mapping[str, Any], *,
                                 generator: torch.Generator | None = None,
                                 drop: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """The conditioning of ``c``.

        - A batch dict (``txt``: the prompts, and every other entry the conditioner reads): the dict the UNet
          takes, ``{"crossattn": ..., "vector": ..., "concat": ...}`` (the kinds this model has). ``drop``:
          classifier-free-guidance dropout for training, each embedder with its own rate, drawn from
          ``generator``.
        - A prompt or a list of prompts (the original API): the text embeddings ``[B, L, D]`` alone.
        """
        if isinstance(c, Mapping):
            return self.conditioner(c, generator=generator, drop=drop)
        prompts = [c] if isinstance(c, str) else list(c)
        cond = self.conditioner({PROMPT_KEY: prompts}, only=(PROMPT_KEY,))
        if "crossattn" not in cond:
            raise ValueError("this model has no text embedder: pass a batch dict of its conditioner's inputs "
                             f"{self.conditioner.input_keys}")
        return cond["crossattn"]

    def get_unconditional_conditioning(self, batch: Mapping[str, Any],
                                       only_empty: bool = False) -> dict[str, torch.Tensor]:
        """The unconditional (negative) branch for classifier-free guidance: ``batch`` as for
        :meth:`get_learned_conditioning`, with the negative prompts (``""`` for none) under ``txt``; embedders the
        conditioner zeroes for the unconditional branch give zeros (with ``only_empty``: for the samples with
        no negative prompt only, see :meth:`Conditioner.unconditional`)."""
        return self.conditioner.unconditional(batch, only_empty=only_empty)

    # ---- denoising ---------------------------------------------------------------------------------------
    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | torch.Tensor | None) -> torch.Tensor:
        """The raw network output (eps, v or x0 depending on ``parameterization``)."""
        return self.model(x_t, t, cond)

    def denoiser(self, quantize: bool = True):
        """This model seen as ``D(x, sigma, cond) -> x0`` for the samplers."""
        return make_denoiser(self.apply_model, self.alphas_cumprod, self.parameterization, quantize=quantize)
