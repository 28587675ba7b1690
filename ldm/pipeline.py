"""Prompt -> images with a loaded :class:`ldm.model.LatentDiffusion` (no Lightning needed).

    pipe = Text2Image.from_checkpoint("sd-v1-5.safetensors")             # config inferred from the file
    out = pipe("a cactus in a straw hat", negative_prompts="blurry", seeds=42)
    out.images[0].save("cactus.png"); print(out.parameters[0])

    Image2Image(pipe.model)(prompt, init_images=image, strength=0.6)      # same weights, other task
    Inpaint(pipe.model)(prompt, init_images=image, masks=mask)            # white mask pixels are repainted

Reproducibility: every image has its own seed and ``torch.Generator`` (image i of a call with seed s uses
seed s + i), so an image does not depend on the batch it was made in. Initial noise is drawn on the CPU, as
the reference scripts do, so a seed gives the same image on every device.

Precision: "bf16" / "fp16" run the text encoder and the UNet under ``torch.autocast`` (which keeps
normalisations and softmax in float32, as the reference does). The VAE runs in float32 with fp16 (a float16
VAE overflows into black images) and under the bf16 autocast with bf16 (bfloat16 has float32's range);
``vae_precision`` chooses otherwise. ``unet_weights`` says whether the UNet keeps float32 weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import random
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm import accel
from ldm.adapters import may_have_lora_tags
from ldm.adapters.embeddings import Embedding, EmbeddingLibrary
from ldm.adapters.prompts import WeightedPrompt, check_prompt_syntax, prompt_inputs, text_encoders
from ldm.diffusion import samplers as _samplers
from ldm.diffusion.guidance import CFGDenoiser, check_guidance_rescale, check_guidance_scale
from ldm.diffusion.inpaint import InpaintDenoiser
from ldm.diffusion.schedules import is_zero_terminal_snr, sigmas_from_alphas_cumprod
from ldm.model import PROMPT_KEY
from ldm.models.conditioner import micro_inputs

log = logging.getLogger(__name__)

__all__ = [
    "PipelineOutput",
    "NonFiniteError",
    "Text2Image",
    "Image2Image",
    "Inpaint",
    "resolve_device",
    "resolve_precision",
    "PRECISIONS",
    "DEFAULT_SAMPLER",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_ALIASES = {"full": "fp32", "float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                      "half": "fp16", "16": "fp16"}
DEFAULT_SAMPLER = "DPM++ 2M Karras"
ImageInput = Image.Image | torch.Tensor | str | Path


@dataclass
class PipelineOutput:
    """``images``: one PIL image per prompt; ``parameters``: the settings that made each one (prompt,
    negative_prompt, steps, sampler, cfg_scale, seed, width, height, ... as ldm.cli.common formats them)."""

    images: list[Image.Image]
    parameters: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# device and precision
# ------------------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / "auto": CUDA when present, else CPU. Anything else is checked to exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for but CUDA is not available: use --device cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for but MPS is not available: use --device cpu (or auto)")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """Normalise a precision name: "fp32", "bf16" or "fp16" ("auto"/None: fp16 on CUDA, fp32 elsewhere;
    "autocast": fp16 on CUDA, bf16 elsewhere; "full": fp32)."""
    name = "auto" if precision is None else str(precision).lower()
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "autocast":
        return "fp16" if device.type == "cuda" else "bf16"
    name = _PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use fp32, bf16, fp16, autocast or auto")
    return name


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------

def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (a CPU: MemAvailable of /proc/meminfo), or None where that cannot be read."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def _as_list(value: Any, n: int, name: str) -> list:
    """A single value broadcast to ``n`` items, or a list of exactly ``n`` (or 1) items."""
    if value is None or isinstance(value, (str, Image.Image, Path)) or (
            isinstance(value, torch.Tensor) and value.ndim == 3):
        return [value] * n
    if isinstance(value, torch.Tensor):
        value = list(value.unbind(0))
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} for {n} prompts: pass one, or one per prompt")
    return value


def _seed_list(seeds: int | Sequence[int] | None, n: int) -> list[int]:
    """Per-image seeds: an int s gives s, s+1, ...; None draws a random base seed."""
    if seeds is None:
        seeds = random.randrange(_samplers.MAX_SEED + 1 - n)
    if isinstance(seeds, (int, np.integer)):
        _samplers.check_seed(seeds)
        if n > 1:
            _samplers.check_seed(int(seeds) + n - 1, f"seed {seeds} + {n - 1} (the last image's seed)")
        return [int(seeds) + i for i in range(n)]
    seeds = [_samplers.check_seed(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images: pass one int (s, s+1, ... are used) "
                         "or one seed per image")
    return seeds


def load_image(image: ImageInput, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path or a PIL image (converted to ``mode``)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as opened:
            image = opened.copy()
    return image.convert(mode)


def image_to_tensor(image: ImageInput, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image as ``[3, H, W]`` in [-1, 1] (resized to ``size`` = (width, height) when given)."""
    if isinstance(image, torch.Tensor):
        tensor = image.float()
        if size is not None and tuple(tensor.shape[-2:]) != (size[1], size[0]):
            tensor = F.interpolate(tensor[None], size=(size[1], size[0]), mode="bicubic",
                                   align_corners=False)[0].clamp(-1, 1)
        return tensor
    image = load_image(image)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def mask_to_tensor(mask: ImageInput, size: tuple[int, int]) -> torch.Tensor:
    """A mask as ``[1, H, W]`` of 0/1 (1 = repaint: white pixels) at ``size`` = (width, height), binarised
    at 0.5 like the reference."""
    if isinstance(mask, torch.Tensor):
        tensor = mask.float().reshape(1, *mask.shape[-2:])
    else:
        image = load_image(mask, "L")
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
    if tuple(tensor.shape[-2:]) != (size[1], size[0]):
        tensor = F.interpolate(tensor[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
    return (tensor >= 0.5).float()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] -> PIL images (clamped, rounded)."""
    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# ------------------------------------------------------------------------------------------------------------
# SDXL micro-conditioning
# ------------------------------------------------------------------------------------------------------------

# pipeline keyword -> (default, the conditioner's batch key); sizes are (height, width), crops (top, left), as
# in sgm and diffusers. None: the output size.
MICRO_CONDITIONING = {
    "original_size": (None, "original_size_as_tuple"),
    "crop_coords_top_left": ((0, 0), "crop_coords_top_left"),
    "target_size": (None, "target_size_as_tuple"),
    "aesthetic_score": (6.0, "aesthetic_score"),
    "negative_aesthetic_score": (2.5, "aesthetic_score"),
}


def _micro_conditioning(options: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """The SDXL micro-conditioning of a call (every key of :data:`MICRO_CONDITIONING`), defaults filled in:
    original and target size = the output size, crop (0, 0), aesthetic score 6 and 2.5 for the negative branch
    (the reference scripts' values). Unknown keywords and malformed values are one-line errors."""
    unknown = sorted(set(options) - set(MICRO_CONDITIONING))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {unknown}; the micro-conditioning options are "
                        f"{list(MICRO_CONDITIONING)}")
    out = {}
    for name, (default, _) in MICRO_CONDITIONING.items():
        value = options.get(name)
        if value is None:
            value = (height, width) if default is None else default
        if name.endswith("aesthetic_score"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a number (the reference uses 6 and 2.5 for the negative)")
            out[name] = float(value)
            continue
        pair = tuple(value) if isinstance(value, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in pair):
            what = "(top, left)" if name.startswith("crop") else "(height, width)"
            raise ValueError(f"{name}={value!r} must be two non-negative ints {what}")
        out[name] = (int(pair[0]), int(pair[1]))
    return out


def _micro_inputs(micro: dict[str, Any], keys: Sequence[str], n: int, negative: bool = False
                  ) -> dict[str, torch.Tensor]:
    """The batch entries a conditioner reading ``keys`` needs (n rows each), from a call's micro-conditioning."""
    score = micro["negative_aesthetic_score" if negative else "aesthetic_score"]
    return micro_inputs(keys, n, original_size=micro["original_size"], target_size=micro["target_size"],
                        crop_coords_top_left=micro["crop_coords_top_left"], aesthetic_score=score)


# ------------------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------------------

# A1111's names of the hires-fix upscalers: latents resized (bilinear / nearest), or the decoded image (Lanczos)
HIRES_UPSCALERS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "image": "Lanczos"}


@dataclass
class _Hires:
    """The hires fix of a txt2img request: the first pass's result upscaled to ``width`` x ``height`` and sampled
    again as img2img with ``strength`` for ``steps`` steps (None: the first pass's count)."""

    scale: float
    strength: float
    steps: int | None
    upscaler: str
    width: int
    height: int


@dataclass
class _Request:
    """Everything one call needs, checked and broadcast to one entry per image."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    height: int
    width: int
    steps: int
    sampler: str
    guidance_scale: float
    guidance_rescale: float
    eta: float | None
    batch_size: int
    init_images: list | None = None
    strength: float | None = None
    masks: list | None = None
    shown_prompts: list[str] | None = None  # the prompts as given (with <lora:...> tags), for the parameters
    hires: _Hires | None = None
    micro: dict = field(default_factory=dict)  # SDXL micro-conditioning, see _micro_conditioning


class _Pipeline:
    """What the three tasks share: the model on its device, precision, memory options, prompt encoding,
    per-image noise, the sampler loop and decoding.

    Args:
        model: a loaded ``LatentDiffusion`` (``ldm.convert.load_model``).
        device: "auto"/None (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
        precision: "fp32", "bf16", "fp16" (autocast for text encoder and UNet), "autocast" or "auto".
        vae_precision: "auto" (default: "same" with bf16, "fp32" otherwise), "fp32" (encode and decode in
            float32) or "same" (under the pipeline's autocast; fp16 may overflow into black images).
        unet_weights: "fp32" (default here: the UNet keeps its float32 weights; autocast, or on a CPU the
            UNet's cache, casts them) or "compute": with precision bf16/fp16 the UNet's conv and linear weights
            are stored in that dtype in place (``ldm.accel.store_weights_in_``): the same images with half the
            UNet's memory and no cast copy, but the model's float32 weights are gone. ``from_checkpoint``,
            whose pipeline owns its model, defaults to "compute".
        attention: UNet attention backend ("auto", "sdpa", "math", "blocked": ldm.accel's CPU kernel, "xformers");
            None keeps the model's.
        attention_slicing: query rows per attention chunk (lower peak memory, same result); None: off.
        vae_tiling: encode/decode large images tile by tile (``AutoencoderKL.enable_tiling``).
        cpu_offload: keep the weights on the CPU and move each part (text encoder, UNet, VAE) to the
            device only while it runs.
        channels_last: channels-last memory format for the UNet and VAE (faster convolutions on GPUs). None
            (default): the VAE on a CPU (its bf16 decode is ~1.2x faster: 256 px 1.63 -> 1.38 s, 512 px 9.1 ->
            7.2 s, same error against fp32); our UNet is channels-last already. False: the layouts as built.
        compile: ``torch.compile`` the UNet (True, or the name of a compile backend).
        model_name, model_path: recorded in the parameters ("Model", "Model hash" = sha256 of the file).
        prompt_syntax: "a1111" (default): A1111's prompt weights ``(word:1.2)``, ``[word]``, BREAK, prompts
            longer than 75 tokens in chunks, textual-inversion embeddings (:meth:`load_embedding`), see
            :mod:`ldm.adapters.prompts`; "plain": the prompt string goes to the text encoder as it is.

    The pipeline puts :func:`ldm.accel.optimize`'s fast paths for its device and precision onto the model (in
    place; the state dict is unchanged; ``ldm.accel.restore(pipe.model)`` takes them off).
    """

    task = "txt2img"
    refiner: "_Pipeline | None" = None  # see set_refiner
    refiner_switch: float = 0.8

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, precision: str = "fp32", *,
                 vae_precision: str = "auto", unet_weights: str = "fp32", attention: str | None = None,
                 attention_slicing: int | None = None,
                 vae_tiling: bool = False, cpu_offload: bool = False, channels_last: bool | None = None,
                 compile: bool | str = False, model_name: str | None = None,
                 model_path: str | Path | None = None, prompt_syntax: str = "a1111"):
        self.model = model.eval().requires_grad_(False)
        self.prompt_syntax = check_prompt_syntax(prompt_syntax)
        self.embeddings = EmbeddingLibrary()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if vae_precision not in ("auto", "fp32", "same"):
            raise ValueError(f"vae_precision must be 'auto', 'fp32' or 'same', got {vae_precision!r}")
        if vae_precision == "auto":
            vae_precision = "same" if self.precision == "bf16" else "fp32"
        self.vae_precision = vae_precision
        if unet_weights not in ("fp32", "compute"):
            raise ValueError(f"unet_weights must be 'fp32' or 'compute', got {unet_weights!r}")
        if unet_weights == "compute" and PRECISIONS[self.precision] != torch.float32:
            if not accel.unets(self.unet):
                raise ValueError(f"unet_weights='compute' needs ldm's UNetModel, not {type(self.unet).__name__}; "
                                 "pass unet_weights='fp32'")
            accel.store_weights_in_(self.unet, PRECISIONS[self.precision])
        self.cpu_offload = cpu_offload and self.device.type != "cpu"
        self.model_name = model_name
        self.model_path = Path(model_path) if model_path is not None else None
        self._configure(attention, attention_slicing, vae_tiling, channels_last, compile)
        self._place_model()

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path | None, config: Any = None, *, use_ema: bool | None = None,
                        device: str | torch.device | None = None, precision: str = "fp32",
                        parameterization: str | None = None, **options: Any) -> "_Pipeline":
        """Load ``ckpt`` (config from ``config``, else from the file's metadata or its tensor shapes; a folder is
        read as a diffusers pipeline folder); the UNet's weights are stored in the compute dtype unless
        ``unet_weights="fp32"``."""
        from ldm.convert import load_model

        if ckpt is not None and Path(ckpt).is_dir():
            from ldm.convert.diffusers_folder import import_diffusers

            if config is not None or parameterization is not None:
                raise ValueError("a diffusers folder brings its own config: drop --config / --parameterization")
            model = import_diffusers(ckpt)
        else:
            model = load_model(config, ckpt, use_ema=use_ema, parameterization=parameterization)
        options.setdefault("unet_weights", "compute")  # the model is this pipeline's own
        options.setdefault("model_name", Path(ckpt).stem if ckpt is not None else None)
        options.setdefault("model_path", ckpt)
        return cls(model, device=device, precision=precision, **options)

    @classmethod
    def from_pipeline(cls, other: "_Pipeline") -> "_Pipeline":
        """The same model and settings for another task (e.g. ``Inpaint.from_pipeline(text2image)``)."""
        new = cls.__new__(cls)
        new.__dict__.update({k: v for k, v in other.__dict__.items() if k != "model_hash"})
        return new

    def set_refiner(self, refiner: "_Pipeline | None", switch: float = 0.8) -> None:
        """Hand the last ``1 - switch`` of every sigma schedule to ``refiner`` (a pipeline of an SDXL refiner,
        on this pipeline's device): this model denoises the first ``round(switch * steps)`` steps, the refiner
        the rest on the same latents, with its own conditioning (the aesthetic score); None: no refiner."""
        if refiner is not None:
            if not 0.0 <= float(switch) <= 1.0:
                raise ValueError(f"refiner switch {switch} is outside [0, 1]: use e.g. 0.8 (the refiner does the "
                                 "last 20% of the steps)")
            if refiner.device != self.device:
                raise ValueError(f"the refiner is on {refiner.device} but this pipeline on {self.device}: load "
                                 "both on one device")
            if refiner.model.latent_channels != self.model.latent_channels or refiner.is_inpainting_model:
                raise ValueError("the refiner must be a plain model with this model's latent channels "
                                 f"({self.model.latent_channels})")
        self.refiner, self.refiner_switch = refiner, float(switch)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _configure(self, attention, attention_slicing, vae_tiling, channels_last, compile) -> None:
        unet = self.unet
        accel.optimize(self.model, device=self.device, precision=self.precision)
        if attention is not None or attention_slicing is not None:
            from ldm.models.attention import AttentionBackendMixin, set_attention_backend
            current = next((m.backend for m in unet.modules() if isinstance(m, AttentionBackendMixin)), "auto")
            set_attention_backend(unet, attention or current, attention_slicing)
        if vae_tiling:
            self.model.first_stage_model.enable_tiling()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if channels_last or (channels_last is None and self.device.type == "cpu"):
            self.model.first_stage_model.to(memory_format=torch.channels_last)
        if compile:
            unet.compile(**({"backend": compile} if isinstance(compile, str) else {}))

    def _place_model(self) -> None:
        if not self.cpu_offload:
            self.model.to(self.device)
            return
        # weights stay on the CPU; the schedule buffers (tiny, used every step) live on the device
        self.model.to("cpu")
        for name, buffer in self.model.named_buffers(recurse=False):
            setattr(self.model, name, buffer.to(self.device))

    @contextlib.contextmanager
    def _running(self, module: nn.Module) -> Iterator[nn.Module]:
        """With CPU offload: ``module`` on the device for the block only."""
        if not self.cpu_offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _autocast(self, enabled: bool = True):
        dtype = PRECISIONS[self.precision]
        if not enabled or dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- model facts ----------------------------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self.model.model.diffusion_model

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's (its latent input must
        survive ``len(channel_mult) - 1`` halvings): 64 for Stable Diffusion."""
        levels = len(getattr(self.unet, "channel_mult", [1]))
        return self.downsample_factor * 2 ** (levels - 1)

    @property
    def default_size(self) -> int:
        """Pixels per side the model was made for: ``image_size * downsample_factor``."""
        return int(self.model.image_size) * self.downsample_factor

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet that also takes the mask and the masked image's latents (SD inpainting)."""
        return int(getattr(self.unet, "in_channels", self.model.latent_channels)) == self.model.latent_channels + 5

    @cached_property
    def model_hash(self) -> str | None:
        """First 10 hex digits of the checkpoint file's sha256 (what the UIs show), None without a file."""
        if self.model_path is None or not self.model_path.is_file():
            return None
        from ldm.io import model_hash
        return model_hash(self.model_path)

    def check_size(self, height: int, width: int) -> None:
        """Raise a one-line ValueError unless height and width are positive multiples of :attr:`size_multiple`."""
        m, f = self.size_multiple, self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or value < m or value % m:
                near = max(m, int(value) // m * m) if isinstance(value, (int, np.integer)) else m
                raise ValueError(f"{name} {value} is not a positive multiple of {m} (this model's VAE factor {f} "
                                 f"x UNet factor {m // f}): use e.g. {near}")

    # peak bytes of a VAE decode per float32 element of its widest full-resolution activation (measured: SD's VAE
    # on a CPU in fp32, 8.4x at 512 px and 10x at 256 px, the surplus being fixed costs)
    DECODE_ACTIVATIONS = 8
    memory_check = True  # False: skip check_memory (sample.py --no-limits)

    def decode_memory(self, batch: int, height: int, width: int) -> int:
        """Roughly the peak bytes the VAE needs to decode ``batch`` images of ``height`` x ``width`` at once (the
        largest allocation of a call; with VAE tiling a tile's)."""
        vae = self.model.first_stage_model
        if getattr(vae, "use_tiling", False):
            height = min(height, vae.tile_sample_size)
            width = min(width, vae.tile_sample_size)
        channels = vae.decoder.conv_out.in_channels
        return self.DECODE_ACTIVATIONS * 4 * batch * channels * height * width

    def check_memory(self, batch: int, height: int, width: int) -> None:
        """A one-line ValueError when decoding a batch would need more memory than the device has free, before
        anything is allocated (no check where the free memory cannot be read, or with ``memory_check`` off)."""
        free = _free_memory(self.device) if self.memory_check else None
        need = self.decode_memory(batch, height, width)
        if free is not None and need > free:
            raise ValueError(f"a batch of {batch} images at {width}x{height} needs about {need / 2**30:.1f} GiB to "
                             f"decode but {free / 2**30:.1f} GiB is free on {self.device}: use a smaller batch or "
                             "size, or VAE tiling (--vae-tiling)")

    # ---- steps of a call ------------------------------------------------------------------------------------
    def _request(self, prompts, negative_prompts, height, width, steps, sampler, guidance_scale,
                 guidance_rescale, eta, seeds, batch_size, **extra) -> _Request:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given: pass a prompt string or a list of prompts")
        n = len(prompts)
        negatives = ["" if p is None else str(p) for p in _as_list(negative_prompts, n, "negative prompts")]
        steps = _samplers.check_steps(steps)
        guidance_scale = check_guidance_scale(guidance_scale)
        guidance_rescale = check_guidance_rescale(guidance_rescale)
        eta = _samplers.check_eta(eta)
        batch_size = n if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_size(height, width)
        self.check_memory(min(batch_size, n), height, width)
        if self.refiner is not None:
            self.refiner.check_size(height, width)  # its UNet may halve the latents more often
        given = {k: v for k, v in (extra.get("micro") or {}).items() if v is not None}
        extra["micro"] = _micro_conditioning(given, int(height), int(width))
        read = set(self.model.conditioner.input_keys)
        if self.refiner is not None:
            read |= set(self.refiner.model.conditioner.input_keys)
        unread = [name for name in given if MICRO_CONDITIONING[name][1] not in read]
        if unread:
            raise ValueError(f"{', '.join(unread)} given but this model does not read it (SDXL's micro-conditioning; "
                             "the aesthetic score is the refiner's): leave it out")
        return _Request(prompts, negatives, _seed_list(seeds, n), int(height), int(width), int(steps),
                        _samplers.get_sampler(sampler).name, float(guidance_scale), float(guidance_rescale),
                        None if eta is None else float(eta), batch_size, **extra)

    def _run(self, req: _Request, callback: Callable[[dict], None] | None) -> PipelineOutput:
        req = self._apply_prompt_loras(req)
        images: list[Image.Image] = []
        for start in range(0, len(req.prompts), req.batch_size):
            batch = slice(start, start + req.batch_size)
            latents = self._sample_batch(req, batch, callback, start)
            if req.hires is not None:
                latents = self._hires_batch(req, batch, latents, callback, start)
            images += tensor_to_images(self._decode(latents))
        return PipelineOutput(images, [self._parameters(req, i) for i in range(len(req.prompts))])

    def _parameters(self, req: _Request, i: int) -> dict[str, Any]:
        params = {"prompt": req.prompts[i], "negative_prompt": req.negative_prompts[i], "steps": req.steps,
                  "sampler": req.sampler, "cfg_scale": req.guidance_scale, "seed": req.seeds[i],
                  "width": req.width, "height": req.height, "eta": req.eta, "guidance_rescale": req.guidance_rescale,
                  "model_hash": self.model_hash, "model": self.model_name, "task": self.task}
        if req.strength is not None:
            params["strength"] = req.strength
        if req.shown_prompts is not None:
            params["prompt"] = req.shown_prompts[i]
        params.update(self._adapter_parameters())
        if req.hires is not None:  # A1111 writes the first pass's size and these
            params.update(strength=req.hires.strength, hires_scale=req.hires.scale, hires_steps=req.hires.steps,
                          hires_upscaler=HIRES_UPSCALERS[req.hires.upscaler])
        if self.prompt_syntax == "a1111" and len(self.embeddings):
            used = {id(e): e for text in (req.prompts[i], req.negative_prompts[i])
                    for e in WeightedPrompt(text, self.embeddings).used_embeddings()}
            hashes = self.embeddings.hashes(used.values())
            if hashes:
                params["ti_hashes"] = hashes
        params.update(self._micro_parameters(req))
        if self._refiner_split(req.steps) is not None:
            params.update({"refiner": self.refiner.model_name, "refiner_hash": self.refiner.model_hash,
                           "refiner_switch": self.refiner_switch})
            params.update(self.refiner._micro_parameters(req))
        return params

    # ---- adapters: LoRA and VAE files -----------------------------------------------------------------------
    lora_dir: str | Path | None = None  # where <lora:NAME:WEIGHT> tags of prompts are looked up

    def load_lora(self, path: str | Path, weight: float = 1.0, *, unet_weight: float | None = None,
                  name: str | None = None):
        """Merge a LoRA / LoCon / LoHa / LoKr file (kohya, diffusers/peft or LyCORIS names) into the model's
        weights with ``weight`` (``unet_weight``: the UNet's own, ``weight`` then only the text encoders'). It
        stays until :meth:`unload_loras`; a file that does not fit this model is refused in one line."""
        from ldm.adapters import lora

        loaded = lora.load_lora(self.model, path, weight, unet_weight=unet_weight, name=name)
        self._sync_lora_embeddings()
        return loaded

    def unload_loras(self) -> None:
        """Take every LoRA off again: the weights are restored exactly."""
        from ldm.adapters import lora

        lora.unload_loras(self.model)
        self._sync_lora_embeddings()

    def _sync_lora_embeddings(self) -> None:
        """The embeddings bundled in the loaded LoRA files (A1111's ``bundle_emb``) are prompt embeddings while their
        LoRA is loaded: added to :attr:`embeddings`, taken out (and a file embedding they hid put back) after."""
        from ldm.adapters import lora

        bundled = self.__dict__.setdefault("_bundled", {})  # name -> (bundled embedding, the one it replaced)
        for name, (embedding, replaced) in list(bundled.items()):
            if name in self.embeddings and self.embeddings[name] is embedding:
                self.embeddings.remove(name)
                if replaced is not None:
                    self.embeddings.add(replaced)
            del bundled[name]
        for loaded in lora.loaded_loras(self.model):
            for embedding in loaded.embeddings:
                name = embedding.name
                if name in bundled:  # a later LoRA bundles the same word: it hides the same file embedding
                    hidden = bundled[name][1]
                else:
                    hidden = self.embeddings[name] if name in self.embeddings else None
                bundled[name] = (self.embeddings.add(embedding), hidden)

    @property
    def loras(self) -> list:
        """The LoRAs merged into the model now (``ldm.adapters.lora.LoadedLora``: name, path, weight, hash)."""
        if "ldm.adapters.lora" not in sys.modules:  # merging one imports it: a run without LoRAs never does
            return []
        from ldm.adapters import lora

        return lora.loaded_loras(self.model)

    def _apply_prompt_loras(self, req: _Request) -> _Request:
        """A1111's ``<lora:NAME:WEIGHT>`` tags: taken out of the prompts before they are encoded, their LoRAs
        (from :attr:`lora_dir`) merged for this call; the LoRAs of an earlier call's tags that no prompt names now
        are taken off. The parameters keep the prompts as written."""
        if not may_have_lora_tags(req.prompts) and not any(x.source == "prompt" for x in self.loras):
            return req  # no tag, and no earlier tag's LoRA to take off
        from ldm.adapters import lora

        cleaned, wanted = [], {}
        for prompt in req.prompts:
            text, tags = lora.extract_lora_tags(prompt)
            cleaned.append(text)
            for tag in tags:
                if wanted.setdefault(tag.name, tag) != tag:
                    raise ValueError(f"LoRA {tag.name!r} is given two different weights in the prompts of one call: "
                                     "use the same <lora:...> tag in every prompt")
        current = {x.name: (x.weight, x.unet_weight) for x in lora.loaded_loras(self.model) if x.source == "prompt"}
        if current != {name: (tag.weight, tag.unet_weight) for name, tag in wanted.items()}:
            if wanted and self.lora_dir is None:
                raise ValueError(f"the prompt names LoRA {next(iter(wanted))!r} but no LoRA folder is set: pass "
                                 "--lora-dir (pipe.lora_dir)")
            paths = {name: lora.find_lora(name, self.lora_dir) for name in wanted}
            lora.unload_loras(self.model, source="prompt")
            for name, tag in wanted.items():
                lora.load_lora(self.model, paths[name], tag.weight, unet_weight=tag.unet_weight, name=name,
                               source="prompt")
            self._sync_lora_embeddings()
        if cleaned == req.prompts:
            return req
        return dataclasses.replace(req, prompts=cleaned, shown_prompts=req.shown_prompts or req.prompts)

    vae_file = None  # the separate VAE file loaded by load_vae (ldm.adapters.vae.LoadedVAE)

    def load_vae(self, path: str | Path):
        """Replace the model's VAE weights by a separate VAE file's (SD's names, ``first_stage_model.*`` or
        diffusers' names), strictly checked; recorded in the parameters (``VAE hash``, ``VAE``)."""
        from ldm.adapters import vae

        self.vae_file = vae.load_vae(self.model, path)
        return self.vae_file

    def _adapter_parameters(self) -> dict[str, Any]:
        """``vae_hash`` / ``vae`` of a separate VAE file and ``lora_hashes`` ("name: hash, ...", as A1111 writes
        them) of the LoRAs merged now."""
        params = {} if self.vae_file is None else {"vae_hash": self.vae_file.hash, "vae": self.vae_file.name}
        loaded = self.loras
        if not loaded:
            return params
        hashes = {x.name.replace(":", "").replace(",", ""): x.hash for x in loaded}  # one entry per name, as A1111
        return {**params, "lora_hashes": ", ".join(f"{name}: {h}" for name, h in hashes.items())}

    # ---- prompts ------------------------------------------------------------------------------------------
    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        """Load a textual-inversion embedding (A1111 .pt / .safetensors, SDXL clip_l + clip_g, diffusers
        learned_embeds); prompts call it by ``token``, by default the file's stem. A file made for another model
        (other widths) is a one-line error naming it."""
        return self.embeddings.load(path, token, encoders=text_encoders(self.model))

    def load_embeddings_dir(self, folder: str | Path) -> list[Embedding]:
        """Load every embedding in ``folder`` (and below) that fits this model; the others are skipped."""
        return self.embeddings.load_dir(folder, encoders=text_encoders(self.model))

    def prompt_inputs(self, prompts: Sequence[str]) -> list:
        """What the model's conditioner gets for ``prompts`` under :attr:`prompt_syntax`."""
        return prompt_inputs(prompts, self.prompt_syntax, self.embeddings)

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str], **inputs: Any) -> dict[str, torch.Tensor]:
        """The conditioning of ``prompts`` as sampling uses it: weights, chunks and embeddings applied (with
        ``prompt_syntax="a1111"``). Without ``inputs``: the text embedders' outputs (``crossattn``, and a text
        ``vector`` where the model pools one); ``inputs``: the other batch entries the model's conditioner reads
        (e.g. SDXL's sizes), for its whole conditioning dict."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = {PROMPT_KEY: self.prompt_inputs(prompts), **inputs}
        if inputs:
            return self.encode_conditioning(batch)
        with self._running(self.model.conditioner), self._autocast():
            cond = self.model.conditioner(batch, only=(PROMPT_KEY,))
        return {kind: value.float() for kind, value in cond.items()}

    def _same_length(self, cond: dict, uncond: dict, inputs: dict) -> tuple[dict, dict]:
        """Long prompts: the shorter of cond and uncond gets empty-prompt chunks until both have as many (A1111's
        pad_cond_uncond), so that guidance runs them in one batch."""
        a, b = cond.get("crossattn"), uncond.get("crossattn")
        if a is None or b is None or a.shape[1] == b.shape[1]:
            return cond, uncond
        short_is_uncond = b.shape[1] < a.shape[1]
        empty = self.encode_conditioning({**inputs, PROMPT_KEY: self.prompt_inputs([""] * len(a))},
                                         unconditional=short_is_uncond)["crossattn"]
        short = uncond if short_is_uncond else cond
        missing = abs(a.shape[1] - b.shape[1])
        if missing % empty.shape[1]:
            raise ValueError(f"prompt and negative prompt encode to {a.shape[1]} and {b.shape[1]} tokens, which "
                             f"no whole number of {empty.shape[1]}-token chunks evens out")
        short = {**short, "crossattn": torch.cat([short["crossattn"],
                                                  empty.repeat(1, missing // empty.shape[1], 1)], dim=1)}
        return (cond, short) if short_is_uncond else (short, uncond)


    def _micro_parameters(self, req: _Request) -> dict[str, Any]:
        """The micro-conditioning values this model reads and that differ from their defaults (for the UIs'
        ``parameters`` text: what is needed to make the image again)."""
        keys = self.model.conditioner.input_keys
        defaults = _micro_conditioning({}, req.height, req.width)
        return {name: value for name, value in req.micro.items()
                if MICRO_CONDITIONING[name][1] in keys and value != defaults[name]}

    @torch.no_grad()
    def encode_conditioning(self, inputs: dict[str, Any], unconditional: bool = False) -> dict[str, torch.Tensor]:
        """The model's conditioning dict of ``inputs`` (``txt``: the prompts, and what else the model's conditioner
        reads) on the device, float32; ``unconditional``: the negative branch (negative prompts under ``txt``)."""
        with self._running(self.model.conditioner), self._autocast():
            if unconditional:  # an empty negative prompt gives zeros where the model says so (SDXL base)
                cond = self.model.get_unconditional_conditioning(inputs, only_empty=True)
            else:
                cond = self.model.get_learned_conditioning(inputs)
        return {kind: value.float() for kind, value in cond.items()}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (a posterior sample per generator; the mode without)."""
        vae = self.model.first_stage_model
        with self._running(vae), self._autocast(self.vae_precision == "same"):
            pixels = pixels.to(self.device)
            z = self.model.encode_first_stage(pixels, sample=generators is not None, generator=generators)
        return z.float()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents ``[B, C, h, w]`` (e.g. a sampler step's ``denoised``, for a live preview) -> PIL images,
        decoded as the pipeline decodes its results."""
        return tensor_to_images(self._decode(latents.to(self.device)))

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.model.first_stage_model
        with self._running(vae), self._autocast(self.vae_precision == "same"):
            pixels = self.model.decode_first_stage(latents).float()
        if not torch.isfinite(pixels).all():
            precision = self.precision if self.vae_precision == "same" else "fp32"
            raise NonFiniteError(f"decoding gave NaN/inf pixels (VAE in {precision}){self._bad_weights(vae)}"
                                 + ("" if precision == "fp32" else ": decode in fp32 (--vae-precision fp32)"))
        return pixels

    def _bad_weights(self, module: nn.Module) -> str:
        """'': the weights of ``module`` are finite; else ', and the model's tensor NAME holds NaN/inf'."""
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f", and the model's tensor {name} holds NaN/inf (a damaged checkpoint?)"
        return ""

    def _sample_batch(self, req: _Request, batch: slice, callback, first_index: int) -> torch.Tensor:
        """Latents for the images ``batch`` of the request."""
        prompts = req.prompts[batch]
        # one CPU generator per image: its noise does not depend on the batch or the device
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds[batch]]
        f, c = self.downsample_factor, self.model.latent_channels
        shape = (len(prompts), c, req.height // f, req.width // f)
        noise = _samplers.randn_like(torch.empty(shape), generators).to(self.device)
        spec = _samplers.get_sampler(req.sampler)
        sigmas = self.sigmas(spec, req.steps).to(self.device)
        init, mask = self._init_latents(req, batch, generators)
        if init is not None:
            sigmas = _samplers.img2img_sigmas(sigmas, req.strength)
        cond, uncond = self._conditioning(req, batch)
        denoiser = self._denoiser(req, uncond, init, mask, noise)
        step_callback = _FiniteCheck(self, len(sigmas) - 1, None if callback is None else
                                     _BatchCallback(callback, first_index, len(prompts), len(sigmas) - 1))
        options = {} if req.eta is None or "eta" not in inspect.signature(spec.fn).parameters else {"eta": req.eta}
        if "discrete_sigmas" in inspect.signature(spec.fn).parameters:  # TCD steps to timesteps between its sigmas
            options["discrete_sigmas"] = sigmas_from_alphas_cumprod(self.model.alphas_cumprod.double()).float()
        split = self._refiner_split(len(sigmas) - 1)
        if split is not None:
            x = self._sample_with_refiner(req, batch, spec, denoiser, cond, noise, sigmas, split, init, mask,
                                          step_callback, generators, options)
        else:
            with self._running(self.unet):
                x = _samplers.sample(spec, denoiser, noise, sigmas, init_latent=init, extra_args={"cond": cond},
                                     callback=step_callback, generator=generators, **options)
        if mask is not None and not self.is_inpainting_model:
            x = init + mask * (x - init)  # exactly the original outside the mask
        return x

    def _hires_batch(self, req: _Request, batch: slice, latents: torch.Tensor, callback,
                     first_index: int) -> torch.Tensor:
        """The hires fix's second pass over the first pass's ``latents`` (A1111's): upscale the latents, or
        decode, resize with Lanczos and encode; then img2img at the larger size that runs exactly ``steps`` steps
        (the tail of a ``steps / strength`` schedule), with new noise from each image's seed."""
        hires = req.hires
        big = replace(req, width=hires.width, height=hires.height, strength=hires.strength, hires=None)
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds[batch]]
        f = self.downsample_factor
        if hires.upscaler == "image":
            pixels = torch.stack([image_to_tensor(image, (hires.width, hires.height))
                                  for image in tensor_to_images(self._decode(latents))])
            init = self._encode(pixels, generators)
        else:
            mode = "nearest" if hires.upscaler == "latent-nearest" else "bilinear"
            init = F.interpolate(latents, size=(hires.height // f, hires.width // f), mode=mode,
                                 **({} if mode == "nearest" else {"align_corners": False}))
        noise = _samplers.randn_like(torch.empty(init.shape), generators).to(self.device)
        spec = _samplers.get_sampler(req.sampler)
        steps = hires.steps or req.steps
        total = int(steps / min(hires.strength, 0.999))
        sigmas = self.sigmas(spec, total)[total - steps:].to(self.device)
        cond, uncond = self._conditioning(big, batch)
        denoiser = self._denoiser(big, uncond, init, None, noise)
        step_callback = _FiniteCheck(self, steps, None if callback is None else
                                     _BatchCallback(callback, first_index, len(init), steps))
        options = {} if req.eta is None or "eta" not in inspect.signature(spec.fn).parameters else {"eta": req.eta}
        with self._running(self.unet):
            return _samplers.sample(spec, denoiser, noise, sigmas, init_latent=init, extra_args={"cond": cond},
                                    callback=step_callback, generator=generators, **options)

    def _hires(self, scale, strength, steps, upscaler, height: int, width: int) -> _Hires | None:
        """The checked hires-fix settings (None without ``scale``); the larger size is rounded down to a multiple of
        :attr:`size_multiple`."""
        if scale is None:
            return None
        if not scale >= 1.0:  # NaN fails too
            raise ValueError(f"hires scale {scale} is below 1: use e.g. 2 (twice the width and height)")
        strength = _samplers.check_strength(strength, "hires strength")
        if steps is not None:
            steps = _samplers.check_steps(steps, "hires steps")
        if upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"hires upscaler {upscaler!r} is unknown: use one of {', '.join(HIRES_UPSCALERS)}")
        m = self.size_multiple
        size = (int(width * scale) // m * m, int(height * scale) // m * m)
        if size != (int(width * scale), int(height * scale)):
            log.info("hires size %dx%d rounded down to %dx%d (multiples of %d)", int(width * scale),
                     int(height * scale), size[0], size[1], m)
        return _Hires(float(scale), strength, steps, upscaler, *size)

    def _refiner_split(self, steps: int) -> int | None:
        """How many of ``steps`` this model runs before the refiner takes over; None: no refiner step."""
        if self.refiner is None:
            return None
        split = math.floor(self.refiner_switch * steps + 0.5)
        return None if split >= steps else split

    def _sample_with_refiner(self, req: _Request, batch: slice, spec: _samplers.SamplerSpec, denoiser, cond,
                             noise: torch.Tensor, sigmas: torch.Tensor, split: int, init, mask, step_callback,
                             generators, options: dict) -> torch.Tensor:
        """The sampler over ``sigmas[:split + 1]`` with this model, then over ``sigmas[split:]`` with the refiner
        (its own conditioning and guidance) on the same latents; one start and one end as in
        :func:`ldm.diffusion.samplers.sample`."""
        x = (spec.initial_x(noise, sigmas[0]) if init is None
             else _samplers.noise_latent(init, sigmas[0], noise=noise))
        if split > 0:
            with self._running(self.unet):
                x = spec.fn(denoiser, x, sigmas[:split + 1], extra_args={"cond": cond}, callback=step_callback,
                            generator=generators, **options)
        refiner = self.refiner
        refiner_cond, refiner_uncond = refiner._conditioning(req, batch)
        refiner_denoiser = refiner._denoiser(req, refiner_uncond, init, mask, noise)
        callback = None if step_callback is None else _OffsetCallback(step_callback, split)
        with refiner._running(refiner.unet):
            x = spec.fn(refiner_denoiser, x, sigmas[split:], extra_args={"cond": refiner_cond}, callback=callback,
                        generator=generators, **options)
        return spec.final_x(x, sigmas[-1])

    def sigmas(self, sampler: str | _samplers.SamplerSpec, steps: int) -> torch.Tensor:
        """The sampler's sigma schedule for this model; a zero-terminal-SNR model gets "trailing" spacing
        in place of the default one (Lin et al. 2023), so that sampling starts from pure noise."""
        spec = _samplers.get_sampler(sampler) if isinstance(sampler, str) else sampler
        zero_snr = is_zero_terminal_snr(self.model.alphas_cumprod)
        schedule = "trailing" if zero_snr and spec.schedule == "default" else None
        return _samplers.build_sigmas(spec, self.model.alphas_cumprod, steps, schedule=schedule)

    def _init_latents(self, req: _Request, batch: slice, generators) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Clean latents of the init images and the latent-size masks (None, None for txt2img)."""
        if req.init_images is None:
            return None, None
        size = (req.width, req.height)
        pixels = torch.stack([image_to_tensor(img, size) for img in req.init_images[batch]])
        init = self._encode(pixels, generators)
        if req.masks is None:
            return init, None
        masks = torch.stack([mask_to_tensor(m, size) for m in req.masks[batch]]).to(self.device)
        return init, F.interpolate(masks, size=init.shape[-2:], mode="area")

    def _conditioning(self, req: _Request, batch: slice) -> tuple[dict, dict | None]:
        """The model's conditioning of the prompts ``batch`` and, with guidance, of their negative prompts. A
        9-channel inpainting UNet also reads the mask and the masked image's latents (for txt2img/img2img: the
        whole image masked)."""
        inputs: dict[str, Any] = {PROMPT_KEY: self.prompt_inputs(req.prompts[batch])}
        n, keys = len(inputs[PROMPT_KEY]), self.model.conditioner.input_keys
        if self.is_inpainting_model:
            inputs.update(self._inpainting_inputs(req, batch, n))
        cond = self.encode_conditioning({**inputs, **_micro_inputs(req.micro, keys, n)})
        if req.guidance_scale == 1.0:
            return cond, None
        negative = {**inputs, **_micro_inputs(req.micro, keys, n, negative=True),
                    PROMPT_KEY: self.prompt_inputs(req.negative_prompts[batch])}
        uncond = self.encode_conditioning(negative, unconditional=True)
        return self._same_length(cond, uncond, {**inputs, **_micro_inputs(req.micro, keys, n)})

    def _inpainting_inputs(self, req: _Request, batch: slice, n: int) -> dict[str, torch.Tensor]:
        """``mask`` (1 = repaint, image size) and ``masked_image_latents`` for an inpainting UNet."""
        size = (req.width, req.height)
        if req.masks is not None:
            pixels = torch.stack([image_to_tensor(img, size) for img in req.init_images[batch]])
            masks = torch.stack([mask_to_tensor(m, size) for m in req.masks[batch]])
        else:
            pixels = torch.zeros(n, 3, req.height, req.width)
            masks = torch.ones(n, 1, req.height, req.width)
        latents = self._encode(pixels * (masks < 0.5), None)
        return {"mask": masks.to(self.device), "masked_image_latents": latents}

    def _denoiser(self, req: _Request, uncond, init, mask, noise) -> Callable:
        """The model as ``D(x, sigma, cond)``: autocast, CFG, and latent blending for ordinary inpainting."""
        base, spec = self.model.denoiser(), _samplers.get_sampler(req.sampler)
        if spec.wrap_denoiser is not None:  # e.g. LCM's boundary condition
            base = spec.wrap_denoiser(base)
        guided = CFGDenoiser(_Precise(base, self._autocast), req.guidance_scale, uncond, req.guidance_rescale)
        if mask is None or self.is_inpainting_model:
            return guided
        return InpaintDenoiser(guided, init, mask, noise)


class _Precise:
    """Run a denoiser under the pipeline's autocast and hand float32 back to the sampler."""

    def __init__(self, denoiser: Callable, autocast: Callable):
        self.denoiser, self.autocast = denoiser, autocast

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with self.autocast():
            return self.denoiser(x, sigma, cond).float()


class NonFiniteError(ValueError):
    """Sampling or decoding turned NaN/inf: said (with the step and the precision) instead of writing black images."""


class _FiniteCheck:
    """The sampler's per-step callback: stops with :class:`NonFiniteError` at the first step whose denoised
    estimate is not finite, then passes the step on to ``callback``."""

    def __init__(self, pipe: "_Pipeline", total_steps: int, callback: Callable[[dict], None] | None):
        self.pipe, self.total_steps, self.callback = pipe, total_steps, callback

    def __call__(self, info: dict) -> None:
        if not torch.isfinite(info["denoised"]).all():
            pipe = self.pipe
            fix = "lower the guidance scale, or check the model's weights" if pipe.precision == "fp32" else \
                "run in fp32 (--precision fp32) or bf16"
            raise NonFiniteError(f"the sample turned NaN/inf at step {info['i'] + 1} of {self.total_steps} in "
                                 f"{pipe.precision}{pipe._bad_weights(pipe.model)}: {fix}")
        if self.callback is not None:
            self.callback(info)


class _OffsetCallback:
    """Reports the refiner's steps after the base model's: ``info["i"] + offset``."""

    def __init__(self, callback: Callable[[dict], None], offset: int):
        self.callback, self.offset = callback, offset

    def __call__(self, info: dict) -> None:
        self.callback({**info, "i": info["i"] + self.offset})


class _BatchCallback:
    """Adds ``batch_start``, ``batch_size`` and ``total_steps`` to the sampler's per-step info dict."""

    def __init__(self, callback: Callable[[dict], None], batch_start: int, batch_size: int, total_steps: int):
        self.callback, self.extra = callback, {"batch_start": batch_start, "batch_size": batch_size,
                                               "total_steps": total_steps}

    def __call__(self, info: dict) -> None:
        self.callback({**info, **self.extra})


class Text2Image(_Pipeline):
    """Prompts -> images. See :class:`_Pipeline` for the constructor's options."""

    task = "txt2img"

    def __call__(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, steps: int = 20,
                 sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 eta: float = 0.0, seeds: int | Sequence[int] | None = None, batch_size: int | None = None,
                 callback: Callable[[dict], None] | None = None, hires_scale: float | None = None,
                 hires_strength: float = 0.7, hires_steps: int | None = None, hires_upscaler: str = "latent",
                 **micro: Any) -> PipelineOutput:
        """One image per prompt. ``seeds``: an int s (image i gets s + i), one per image, or None (random).
        ``batch_size``: images per forward pass (default all). ``callback(info)`` after every sampler step,
        ``info`` holding the sampler's fields (``i``, ``sigma``, ...) plus ``batch_start`` and ``batch_size``.
        ``micro``: SDXL's micro-conditioning for models that read it: ``original_size`` and ``target_size``
        (height, width; default the output size), ``crop_coords_top_left`` (top, left; default (0, 0)),
        ``aesthetic_score`` (refiner; default 6) and ``negative_aesthetic_score`` (default 2.5).

        Hires fix (A1111's): with ``hires_scale`` (e.g. 2) each image is sampled at ``height`` x ``width``, then
        upscaled (``hires_upscaler``: "latent" bilinear on the latents, "latent-nearest", or "image": decoded and
        resized with Lanczos) and sampled again as img2img with ``hires_strength`` for ``hires_steps`` steps
        (default: ``steps``). The parameters record the first pass's size, as A1111 does."""
        req = self._request(prompts, negative_prompts, height, width, steps, sampler, guidance_scale,
                            guidance_rescale, eta, seeds, batch_size, micro=micro)
        req.hires = self._hires(hires_scale, hires_strength, hires_steps, hires_upscaler, req.height, req.width)
        if req.hires is not None:  # the second pass decodes at the larger size
            self.check_memory(min(req.batch_size, len(req.prompts)), req.hires.height, req.hires.width)
        return self._run(req, callback)


class Image2Image(_Pipeline):
    """Prompts + init images -> images: the init is encoded, noised to the strength's step and denoised."""

    task = "img2img"

    def __call__(self, prompts: str | Sequence[str], init_images: ImageInput | Sequence[ImageInput], *,
                 strength: float = 0.75, negative_prompts: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, steps: int = 20,
                 sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 eta: float = 0.0, seeds: int | Sequence[int] | None = None, batch_size: int | None = None,
                 callback: Callable[[dict], None] | None = None, **micro: Any) -> PipelineOutput:
        """As :meth:`Text2Image.__call__`, plus ``init_images`` (one, or one per prompt: PIL images, paths or
        ``[3, H, W]`` tensors in [-1, 1]) and ``strength`` in (0, 1]. The size defaults to the first init
        image's, rounded down to a multiple of :attr:`size_multiple`."""
        return self._run(self._image_request(prompts, init_images, None, strength, negative_prompts, height,
                                             width, steps, sampler, guidance_scale, guidance_rescale, eta, seeds,
                                             batch_size, micro=micro), callback)

    def _image_request(self, prompts, init_images, masks, strength, negative_prompts, height, width, *rest,
                       micro=None):
        n = 1 if isinstance(prompts, str) else len(prompts)
        images = [_load_if_path(img) for img in _as_list(init_images, n, "init images")]
        if any(img is None for img in images):
            raise ValueError("init_images is missing: pass the image(s) to start from")
        strength = _samplers.check_strength(strength)
        width, height = self._size_from_image(images[0], height, width)
        mask_list = None if masks is None else [_load_if_path(m, "L") for m in _as_list(masks, n, "masks")]
        return self._request(prompts, negative_prompts, height, width, *rest, init_images=images,
                             strength=float(strength), masks=mask_list, micro=micro)

    def _size_from_image(self, image, height, width) -> tuple[int, int]:
        if height is not None and width is not None:
            return width, height
        w, h = (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size
        m = self.size_multiple
        if w < m or h < m:
            raise ValueError(f"init image is {w}x{h}, smaller than this model's size multiple {m}: "
                             "use a larger image")
        size = (width if width is not None else w // m * m, height if height is not None else h // m * m)
        if size != (w, h):
            log.info("init image %dx%d resized to %dx%d (multiples of %d)", w, h, size[0], size[1], m)
        return size


def _load_if_path(image, mode: str = "RGB"):
    return load_image(image, mode) if isinstance(image, (str, Path)) else image


class Inpaint(Image2Image):
    """Prompts + init images + masks -> images repainted where the mask is white.

    Ordinary models: latent blending (outside the mask the sampler always sees the original, noised to the
    current step). 9-channel SD inpainting models get the mask and the masked image's latents as input."""

    task = "inpaint"

    def __call__(self, prompts: str | Sequence[str], init_images: ImageInput | Sequence[ImageInput],
                 masks: ImageInput | Sequence[ImageInput], *, strength: float = 1.0,
                 negative_prompts: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, steps: int = 20, sampler: str = DEFAULT_SAMPLER,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, eta: float = 0.0,
                 seeds: int | Sequence[int] | None = None, batch_size: int | None = None,
                 callback: Callable[[dict], None] | None = None, **micro: Any) -> PipelineOutput:
        """As :meth:`Image2Image.__call__`, plus ``masks`` (white = repaint) of the init images' size."""
        if masks is None:
            raise ValueError("masks is missing: pass a mask image (white = repaint) for inpainting")
        req = self._image_request(prompts, init_images, masks, strength, negative_prompts, height, width, steps,
                                  sampler, guidance_scale, guidance_rescale, eta, seeds, batch_size, micro=micro)
        self._check_mask_sizes(req)
        return self._run(req, callback)

    @staticmethod
    def _check_mask_sizes(req: _Request) -> None:
        for image, mask in zip(req.init_images, req.masks):
            image_size = (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size
            mask_size = (mask.shape[-1], mask.shape[-2]) if isinstance(mask, torch.Tensor) else mask.size
            if image_size != mask_size:
                raise ValueError(f"mask is {mask_size[0]}x{mask_size[1]} but the init image is "
                                 f"{image_size[0]}x{image_size[1]}: give a mask of the image's size")
