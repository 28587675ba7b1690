"""Training the second stage: the UNet of a latent diffusion model, as a Lightning module.

:class:`LatentDiffusionModule` *is* an :class:`ldm.model.LatentDiffusion` (same attribute names), so its
``state_dict`` is the Stable Diffusion layout; with ``use_ema`` it adds ``model_ema.*`` exactly as the original
checkpoints have it. On top it has the training settings: optimizer, warm-up, EMA, condition dropout for
classifier-free guidance, the loss (:class:`ldm.diffusion.loss.DiffusionLoss`), ``scale_by_std`` and an optional
latent cache.

Randomness. The noise, timesteps, posterior samples and condition dropout of a training step come from a
generator seeded by (global seed, rank, global step, batch index), not from the global RNG stream. A run is
then reproducible for a seed, and a resumed run draws exactly what the uninterrupted run drew.

Latent cache (``cache_latents: true``). The frozen first stage is run once per distinct training image: its
posterior moments (mean and log-variance, on the CPU) are kept under a hash of the image's bytes, and the text
embeddings under the caption (only while the text encoder is frozen). From the second epoch on every step
reuses them; a new posterior sample is still drawn each step, so training is unchanged. Images that differ
(random crops, flips) simply miss the cache. It costs host memory: about ``2 * C * h * w`` floats per image
plus ``L * D`` per distinct caption; use it for datasets that fit in memory. Each entry is computed on its own
(a batch of one), so that it does not depend on which images were encoded with it: the kernels of a batch of
one and of a batch of several differ in the last bits, and a resumed run, whose cache starts empty, would
otherwise drift from the uninterrupted run after the next epoch boundary.

Disk cache (``cache_dir: PATH``, implies ``cache_latents``). The same entries live in files under ``PATH`` instead
of in memory (:mod:`ldm.data.disk_cache`), keyed by the exact pixels the VAE sees (so per bucket size, crop and
flip) or the caption, under a fingerprint of the VAE's / text encoder's weights: a second run of the same recipe
encodes nothing, a changed VAE or text encoder misses. Random crops and flips are cached per variant (a warning
says so when the training data uses them). A corrupt file is reported, encoded again and rewritten.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import os
import random
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.config import instantiate_from_config, to_plain
from ldm.convert.layouts import to_sd_file_layout
from ldm.ema import EMA, ema_name
from ldm.model import PROMPT_KEY, LatentDiffusion
from ldm.models.conditioner import micro_inputs
from ldm.training.common import TrainingModuleMixin, build_optimizer, check_optimizer
from ldm.training.init_from import PARTS, InitSource, init_from_files, parse_init_from
from ldm.training.lr import LinearWarmup

log = logging.getLogger(__name__)

__all__ = ["LatentDiffusionModule", "inference_config", "export_state_dict"]

_INFERENCE_TARGET = "ldm.model.LatentDiffusion"
_EMA_PREFIX = "model_ema."
_UNET_PREFIX = "model.diffusion_model."
_SALT_TRAIN, _SALT_VAL, _SALT_SCALE = 1, 2, 3


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range; use a value in [{low}, {high}]")


def _bind_model_args(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments of ``LatentDiffusion.__init__``, defaults filled in (a TypeError names an unknown one)."""
    bound = inspect.signature(LatentDiffusion).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _disk_cache(cache_dir: str | None):
    if not cache_dir:
        return None
    from ldm.data.disk_cache import DiskCache

    return DiskCache(cache_dir)


def _init_sources(init_from: Any, first_stage_ckpt: str | None) -> list[InitSource]:
    """The checked ``init_from`` entries; ``first_stage_ckpt``, when given, is the autoencoder's one source."""
    if init_from is None:
        return []
    parts = [p for p in PARTS if not (first_stage_ckpt and p == "first_stage")]
    sources = parse_init_from(init_from, parts)
    if first_stage_ckpt and any("first_stage" in s.parts for s in sources):
        raise ValueError("init_from and first_stage_ckpt both give the autoencoder's weights: drop first_stage "
                         "from init_from's parts, or first_stage_ckpt")
    return sources


def _make_loss(parameterization: str, weighting: str, min_snr_gamma: float, offset_noise: float, timesteps: int,
               timestep_bias: Any = None):
    from ldm.diffusion.loss import DiffusionLoss, timestep_weights

    timestep_bias = to_plain(timestep_bias)
    timestep_weights(timestep_bias, int(timesteps), key="model.params.timestep_bias")  # errors name the config key
    return DiffusionLoss(parameterization, weighting=weighting, min_snr_gamma=min_snr_gamma,
                         offset_noise=offset_noise, num_timesteps=int(timesteps), timestep_bias=timestep_bias)


class LatentDiffusionModule(LatentDiffusion, TrainingModuleMixin, pl.LightningModule):
    """A trainable :class:`~ldm.model.LatentDiffusion` (SD state-dict layout, plus ``model_ema.*``).

    Every parameter of ``LatentDiffusion`` (the original config names: ``unet_config``, ``parameterization``,
    ``scale_factor``, ...) is taken as it is and passed on; the config checker sees them all (the class's
    signature is both together), so an unknown key still fails up front naming it. Only ``use_ema`` defaults
    otherwise (on). Training:
        base_learning_rate: learning rate per sample; with ``scale_lr`` it is multiplied by
            batch_size * accumulate_grad_batches * devices * nodes (as the original main.py does).
        learning_rate: if given, the learning rate as is (overrides base_learning_rate and scale_lr).
        weight_decay, adam_betas, adam_eps: AdamW settings.
        fused_optimizer: torch's fused AdamW kernel where it applies (CPU/CUDA float parameters).
        optimizer: "adamw" (default), "adamw8bit" (bitsandbytes, 8-bit states) or "adafactor" (torch's; factored
            second moments, less memory): :func:`ldm.training.common.build_optimizer`.
        warmup_steps: linear warm-up over this many optimizer steps (or ``scheduler_config``: a target
            whose instance maps optimizer step -> LR multiplier, e.g. ``ldm.training.lr.WarmupCosine``).
        ema_decay: EMA decay of the UNet weights (``use_ema``), updated once per optimizer step.
        cond_drop_rate: with ``cond_stage_config``, the probability that a sample's prompt is replaced by ""
            (classifier-free guidance; default 0.1). A ``conditioner_config`` gives each embedder its own
            ``ucg_rate`` instead.
        loss_weighting, min_snr_gamma, offset_noise, timestep_bias: options of
            :class:`ldm.diffusion.loss.DiffusionLoss` (``timestep_bias: {strategy: later, multiplier: 2.0,
            portion: 0.25}`` draws the noisiest quarter of the timesteps twice as often, as diffusers' SDXL script).
        gradient_checkpointing: activation checkpointing per block: every ResBlock and transformer block of the UNet
            recomputes its activations in the backward pass (:func:`ldm.models.unet.set_activation_checkpointing`);
            with or without FSDP.
        first_stage_ckpt: weights of a trained autoencoder (a first-stage state dict or a full SD-layout file).
        init_from: start from weights in a file (see :mod:`ldm.training.init_from`): a path, or a list of
            ``{path, parts, ema, keep_new}`` entries.
        cache_latents: cache first-stage moments and text embeddings (see the module docstring).
        cache_dir: keep those caches on disk in this folder, across runs and ranks (implies cache_latents).
        lora: ``{rank, alpha, targets: [attn, ff, conv, text], dropout, tokens, token_lr, preserve}``: train a LoRA /
            LoCon on the frozen model instead of the model (see :mod:`ldm.training.lora`); checkpoints hold only the
            LoRA, the export is a kohya-format file (``tokens``: words whose token vectors train too, bundled in the
            file as embeddings). Under ``precision: bf16-mixed`` the frozen base is stored in bf16
            (:meth:`store_base_in_bf16`).
        train_tokens, token_lr: a full fine-tune's new words: the rows of their token ids in the text encoders'
            embedding tables train (at ``token_lr``, default the learning rate; no weight decay), the other rows
            stay as they are (:func:`ldm.adapters.lora_train.unfreeze_token_rows`), and so does the rest of a
            frozen text encoder; a trainable one (``cond_stage_trainable: true``) trains the rest at ``text_lr``.
        text_lr: a full fine-tune's rate for the trainable text encoders (kohya's ``text_encoder_lr``; not scaled
            by the batch; default the learning rate).
        token_init: ``{word: init word(s)}``: those of ``train_tokens`` (or ``lora.token_init`` of ``lora.tokens``)
            start from the mean embedding of the init words, as textual inversion's initializer token.
        preserve: a full fine-tune's prior preservation by distillation (with ``train_tokens``; ``true`` or the
            weight of those samples' loss): samples whose caption names none of the new words, and samples whose
            caption the CFG dropout emptied, learn the prediction of a frozen copy of the starting UNet (kept
            beside it: its memory once more) instead of the data's target; with a trainable text encoder, on the
            conditioning of a frozen copy of the starting text encoder. A LoRA run has ``lora.preserve``.
        preserve_dropped: with ``preserve``, whether the dropped captions of pictures that show the new words are
            distilled too (true, the default), learn their pictures (false), or a share in [0, 1] of them, drawn per
            sample, is distilled. A LoRA run has ``lora.preserve_dropped``.
        validation_prompts, sample_*: what the image logger samples (EMA weights, CFG).
    """

    def __init__(
        self,
        unet_config: Any,
        first_stage_config: Any,
        cond_stage_config: Any = None,
        *,
        use_ema: bool = True,
        scheduler_config: Any = None,
        base_learning_rate: float = 1e-4,
        learning_rate: float | None = None,
        scale_lr: bool = True,
        weight_decay: float = 0.0,
        adam_betas: Sequence[float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        fused_optimizer: bool = True,
        optimizer: str = "adamw",
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        cond_drop_rate: float | None = None,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        timestep_bias: Any = None,
        gradient_checkpointing: bool = False,
        first_stage_ckpt: str | None = None,
        init_from: Any = None,
        lora: Any = None,
        train_tokens: Sequence[str] | None = None,
        token_lr: float | None = None,
        token_init: Any = None,
        text_lr: float | None = None,
        preserve: bool | float = False,
        preserve_dropped: bool | float = True,
        cache_latents: bool = False,
        cache_dir: str | None = None,
        validation_prompts: Sequence[str] | None = None,
        sample_steps: int = 20,
        sample_sampler: str = "Euler a",
        sample_cfg_scale: float = 5.0,
        sample_seed: int = 0,
        **model_params: Any,
    ):
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__", "model_params")}
        hparams = to_plain({**hparams, **model_params})
        model_args = _bind_model_args(unet_config, first_stage_config, cond_stage_config, use_ema=use_ema,
                                      scheduler_config=scheduler_config, **model_params)
        self._check_training_args(hparams, model_args)  # before the (possibly large) networks are built
        init_sources = _init_sources(init_from, first_stage_ckpt)
        loss_fn = _make_loss(model_args["parameterization"], loss_weighting, min_snr_gamma, offset_noise,
                             model_args["timesteps"], timestep_bias)
        super().__init__(**model_args)
        self.save_hyperparameters(hparams, logger=False)
        self.base_learning_rate = float(base_learning_rate)
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.scale_lr = scale_lr
        self.weight_decay, self.adam_betas, self.adam_eps = weight_decay, tuple(adam_betas), adam_eps
        self.fused_optimizer = bool(fused_optimizer)
        self.optimizer_name = optimizer
        self.lr_lambda = (instantiate_from_config(scheduler_config, "model.params.scheduler_config")
                          if scheduler_config is not None else LinearWarmup(warmup_steps))
        if self.cond_stage_model is not None:  # SD 1/2: the prompt is dropped to "" (as they were trained)
            self.conditioner.set_ucg_rate(PROMPT_KEY, 0.1 if cond_drop_rate is None else float(cond_drop_rate))
        self.loss_fn = loss_fn
        self.cache_latents = bool(cache_latents or cache_dir)
        self._moments_cache: dict[str, torch.Tensor] = {}
        self.disk_cache = _disk_cache(cache_dir)
        self.conditioner.enable_cache(self.cache_latents, store=self.disk_cache)  # frozen text embedders only
        self.validation_prompts = list(validation_prompts or [])
        self.sample_steps, self.sample_sampler = sample_steps, sample_sampler
        self.sample_cfg_scale, self.sample_seed = sample_cfg_scale, sample_seed
        self.run_config: dict | None = None  # the whole run's config (plain), set by train.py
        self._ema_scope: contextlib.ExitStack | None = None

        if first_stage_ckpt:
            self.first_stage_model.init_from_ckpt(first_stage_ckpt)
        elif not (to_plain(first_stage_config).get("params") or {}).get("ckpt_path") and not any(
                "first_stage" in source.parts for source in init_sources):
            log.warning("no first_stage_ckpt: the autoencoder keeps its random weights (smoke tests only); set "
                        "model.params.first_stage_ckpt to a trained autoencoder")
        if gradient_checkpointing:
            from ldm.models.unet import set_activation_checkpointing

            set_activation_checkpointing(self.model.diffusion_model)
        init_from_files(self, init_sources)
        if self._random_frozen_text_encoder(cond_stage_config, init_sources):
            log.warning("model.params.cond_stage_config: the text encoder keeps RANDOM weights and is FROZEN (no "
                        "ckpt_path, no init_from text_encoder): the prompts will barely steer the model. Give it "
                        "weights (cond_stage_config.params.ckpt_path, or --init a model file) or train it "
                        "(cond_stage_trainable: true, freeze: false)")
        self.lora = self._attach_lora(lora) if lora is not None else None
        self._token_rows: list[torch.nn.Parameter] = []
        self._words: tuple[str, ...] = self.lora.config.tokens if self.lora is not None else ()
        self._teacher: torch.nn.Module | None = None  # preserve: the starting UNet, frozen (not a submodule)
        self._teacher_conditioner: torch.nn.Module | None = None  # and the starting text encoders, if they train
        self.token_lr = None if token_lr is None else float(token_lr)
        self.text_lr = None if text_lr is None else float(text_lr)
        text_trains = self.lora is None and any(p.requires_grad for p in self.conditioner.parameters())
        if self.text_lr is not None and not text_trains:
            raise ValueError("model.params.text_lr: no text encoder trains (set cond_stage_trainable: true and "
                             "cond_stage_config.params.freeze: false, or drop text_lr)")
        if train_tokens:
            from ldm.adapters.lora_train import parse_token_init, parse_tokens, unfreeze_token_rows

            self._words = parse_tokens(train_tokens, token_lr)[0]
            self._token_rows = unfreeze_token_rows(self, self._words, dict(parse_token_init(token_init, self._words)))
            if self.conditioner.cache is not None:
                log.info("train_tokens: the text embeddings change as the words train, so they are not cached")
                self.conditioner.enable_cache(False)
        self._preserve = self.lora.config.preserve if self.lora is not None else 0.0
        self._preserve_dropped = self.lora.config.preserve_dropped if self.lora is not None else float(
            preserve_dropped)
        if preserve:
            from ldm.adapters.lora_train import check_preserve

            self._preserve = check_preserve(preserve)
            self.__dict__["_teacher"] = copy.deepcopy(self.model).requires_grad_(False).eval()
            if text_trains:  # the starting towers (the new words' rows as token_init set them: never read here)
                teacher = copy.deepcopy(self.conditioner).requires_grad_(False).eval()
                teacher.enable_cache(False)
                self.__dict__["_teacher_conditioner"] = teacher
        if (self.lora is not None and ("text" in self.lora.config.targets or self.lora.config.tokens)
                and self.conditioner.cache is not None):
            log.info("LoRA on the text encoder (or its token vectors): its embeddings change as it trains, so they "
                     "are not cached")
            self.conditioner.enable_cache(False)
        self._lora_base: str | None = None  # fingerprint of the frozen base weights, made at the first save
        self._lora_base_built: str | None = None  # ... of the base as built, when it was then cast (setup)
        self.base_dtype: torch.dtype | None = None  # the frozen base's dtype when a LoRA run stores it in bf16
        # starts from the loaded weights; a LoRA run averages only the LoRA
        self.model_ema = EMA(self._ema_target(), decay=ema_decay) if use_ema else None

    # ---- construction helpers -------------------------------------------------------------------------------
    def _attach_lora(self, lora: Any) -> torch.nn.Module:
        """Freeze every weight and hook a LoRA network into the model (:mod:`ldm.training.lora`)."""
        from ldm.adapters.lora_train import LoraNetwork, parse_lora_config

        self.requires_grad_(False)
        network = LoraNetwork(self, parse_lora_config(lora))
        log.info("LoRA: %d layers, %d trainable parameters; the model's weights are frozen", len(network.branches),
                 sum(p.numel() for p in network.parameters()))
        return network

    def setup(self, stage: str) -> None:
        """A LoRA run under ``precision: bf16-mixed`` keeps its frozen base in bf16 (:meth:`store_base_in_bf16`).
        Lightning calls this after the callbacks' ``setup`` (the acceleration pass) and before a checkpoint is
        restored."""
        if self.lora is not None and str(self.trainer.precision) == "bf16-mixed" and self.base_dtype is None:
            self.store_base_in_bf16()

    def store_base_in_bf16(self) -> None:
        """Store the frozen UNet, autoencoder and text encoder weights of a LoRA run in bf16, as diffusers' LoRA
        script does under bf16 (:func:`ldm.training.lora.store_frozen_base_in_`: the layers autocast runs in bf16;
        norms, embeddings and the LoRA stay fp32): the same numbers under bf16 autocast, half the base's memory,
        no cast of the base in every step. The base fingerprint that ``--resume`` checks and the disk caches' keys
        are taken first, of the weights as built, so that checkpoints and caches are those of the fp32 base.
        Afterwards the model runs under bf16 autocast only (training and validation under ``bf16-mixed``;
        :meth:`sample_images` and the scale estimate enter it themselves)."""
        from ldm.training.lora import base_fingerprint, store_frozen_base_in_

        if self.lora is None:
            raise ValueError("store_base_in_bf16 is for LoRA runs (model.params.lora): a full fine-tune trains "
                             "the base weights, which stay fp32")
        self._lora_base_built = base_fingerprint(
            {k: v for k, v in self.state_dict().items() if not k.startswith(("lora.", "model_ema."))})
        if self.disk_cache is not None:  # keyed by the encoders as built (the same entries under autocast)
            for encoder in (self.first_stage_model, *self.conditioner.embedders):
                self.disk_cache.fingerprint(encoder)
        store_frozen_base_in_(self._frozen_base(), torch.bfloat16)
        self.base_dtype = torch.bfloat16
        log.info("LoRA under bf16-mixed: the frozen base weights are stored in bf16, the LoRA in fp32")

    def _frozen_base(self) -> list[torch.nn.Module]:
        """The model's networks, without the LoRA branches."""
        nets = [self.model, self.first_stage_model, self.conditioner, getattr(self, "cond_stage_model", None)]
        return [m for m in dict.fromkeys(nets) if m is not None]

    def _base_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the base's dtype where it is stored in one (nothing otherwise)."""
        if self.base_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.base_dtype)

    def _ema_target(self) -> torch.nn.Module:
        return self.lora if self.lora is not None else self.model

    def _random_frozen_text_encoder(self, cond_stage_config: Any, init_sources: list[InitSource]) -> bool:
        """Whether the (SD 1/2-style) text encoder has no weights from anywhere and will not be trained."""
        if self.cond_stage_model is None or self.cond_stage_trainable:
            return False
        params = (to_plain(cond_stage_config) or {}).get("params") or {}
        return not params.get("ckpt_path") and not any("text_encoder" in s.parts for s in init_sources)

    @staticmethod
    def _check_training_args(hp: dict, model_args: dict) -> None:
        if hp["cond_drop_rate"] is not None:
            _check_range("cond_drop_rate", hp["cond_drop_rate"], 0.0, 1.0)
            if model_args["conditioner_config"] is not None:
                raise ValueError("cond_drop_rate is for cond_stage_config models; with conditioner_config give "
                                 "each embedder its ucg_rate")
        _check_range("ema_decay", hp["ema_decay"], 0.0, 1.0)
        check_optimizer(hp["optimizer"])
        if hp["lora"] is not None:
            from ldm.adapters.lora_train import parse_lora_config

            parse_lora_config(hp["lora"])
            if model_args["cond_stage_trainable"]:
                raise ValueError("model.params.lora trains a LoRA on a frozen model: set cond_stage_trainable=false "
                                 "(the text encoder gets a LoRA with lora.targets: [..., text])")
        if hp["train_tokens"] or hp["token_lr"] is not None or hp["token_init"]:
            from ldm.adapters.lora_train import parse_token_init, parse_tokens

            words = parse_tokens(hp["train_tokens"], hp["token_lr"])[0]
            parse_token_init(hp["token_init"], words)
            if hp["lora"] is not None:
                raise ValueError("model.params.train_tokens is for a full fine-tune; a LoRA trains new words with "
                                 "model.params.lora.tokens (and lora.token_lr)")
        if hp["text_lr"] is not None:
            if hp["lora"] is not None:
                raise ValueError("model.params.text_lr is for a full fine-tune; a LoRA's text branches (lora.targets: "
                                 "[..., text]) train at the LoRA's rate")
            if not hp["text_lr"] > 0:
                raise ValueError(f"model.params.text_lr={hp['text_lr']!r} must be > 0 (e.g. 1e-5)")
        if hp["preserve"] is not False:
            from ldm.adapters.lora_train import check_preserve

            check_preserve(hp["preserve"])
        if hp["preserve_dropped"] is not True:
            from ldm.adapters.lora_train import check_preserve_dropped

            check_preserve_dropped(hp["preserve_dropped"])
            if not hp["preserve"]:
                raise ValueError("model.params.preserve_dropped is a part of model.params.preserve (a full "
                                 "fine-tune's prior preservation): set preserve too; a LoRA has lora.preserve_dropped")
        if hp["preserve"] and (hp["lora"] is not None or not hp["train_tokens"]):
            raise ValueError("model.params.preserve keeps a full fine-tune's other prompts: it needs "
                             "model.params.train_tokens (the new words); a LoRA has lora.preserve")
        if hp["base_learning_rate"] <= 0 or (hp["learning_rate"] is not None and hp["learning_rate"] <= 0):
            raise ValueError("base_learning_rate/learning_rate must be > 0 (e.g. 1e-4)")
        if len(hp["adam_betas"]) != 2:
            raise ValueError(f"adam_betas={hp['adam_betas']!r} must be two numbers, e.g. [0.9, 0.999]")
        if hp["scheduler_config"] is not None and hp["warmup_steps"]:
            raise ValueError("give either warmup_steps or scheduler_config, not both")
        if (hp["cache_latents"] or hp["cache_dir"]) and model_args["cond_stage_trainable"]:
            log.info("cache_latents with a trainable text encoder: only latents are cached, not text embeddings")
        if not isinstance(hp["sample_steps"], int) or hp["sample_steps"] < 1:
            raise ValueError(f"sample_steps={hp['sample_steps']!r} must be a positive int")
        files = {"model.params.first_stage_ckpt": hp["first_stage_ckpt"]}
        for part in ("first_stage_config", "cond_stage_config"):
            params = (to_plain(model_args.get(part)) or {}).get("params") or {}
            files[f"model.params.{part}.params.ckpt_path"] = params.get("ckpt_path")
        for key, path in files.items():  # before the networks are built: a typo costs seconds, not a model build
            if path and not os.path.isfile(path):
                raise ValueError(f"{key}: file not found: {path}; give the weights file's path (or null)")

    # ---- randomness -----------------------------------------------------------------------------------------
    def _generator(self, salt: int, index: int) -> torch.Generator:
        """A generator for one (step, batch) that does not depend on the global RNG's history."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        key = f"{seed}/{self.global_rank}/{salt}/{self.global_step}/{index}".encode()
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
        return g

    # ---- inputs ---------------------------------------------------------------------------------------------
    @staticmethod
    def cache_keys(images: torch.Tensor) -> list[str]:
        """The latent-cache key of each image: a hash of its bytes."""
        return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images.detach().cpu().contiguous()]

    def _moments(self, images: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        """First-stage posterior moments [B, 2C, h, w] (from the cache when possible)."""
        if keys is None:
            with torch.no_grad():
                return self.first_stage_model.encode(images).parameters.float()
        missing = [i for i, k in enumerate(keys) if k not in self._moments_cache]
        disk, size = self.disk_cache, tuple(images.shape[-2:])
        for i in missing:  # one at a time: an entry must not depend on its batch (see the module docstring)
            if keys[i] not in self._moments_cache:  # (the same image twice in one batch)
                fresh = disk.load_moments(self.first_stage_model, keys[i], size) if disk is not None else None
                if fresh is None:
                    with torch.no_grad():
                        fresh = self.first_stage_model.encode(images[i:i + 1]).parameters.float()[0].cpu()
                    if disk is not None:
                        disk.save_moments(self.first_stage_model, keys[i], size, fresh)
                self._moments_cache[keys[i]] = fresh
        moments = torch.stack([self._moments_cache[k] for k in keys]).to(images.device)
        if disk is not None:  # the entries live on disk, not in memory
            self._moments_cache.clear()
        return moments

    def latents(self, images: torch.Tensor, generator: torch.Generator | None,
                keys: list[str] | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: a posterior sample times ``scale_factor``."""
        from ldm.models.autoencoder import DiagonalGaussianDistribution

        z = DiagonalGaussianDistribution(self._moments(images, keys)).sample(generator)
        return z * self.scale_factor

    def conditioning(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                     drop: bool = False, conditioner: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The conditioning dict of a training batch (:meth:`get_learned_conditioning`); its ``cond_stage_key``
        entry (``caption``) is the prompt, ``txt``. ``drop``: classifier-free-guidance dropout from ``generator``.
        ``conditioner``: another one than the model's (preserve's frozen copy)."""
        inputs = dict(batch)
        if PROMPT_KEY not in inputs and self.cond_stage_key in inputs:
            captions = inputs[self.cond_stage_key]
            inputs[PROMPT_KEY] = [captions] if isinstance(captions, str) else list(captions)
        if conditioner is not None:
            return conditioner(inputs, generator=generator, drop=drop)
        return self.get_learned_conditioning(inputs, generator=generator, drop=drop)

    def _loss(self, batch: dict, generator: torch.Generator, drop: bool) -> torch.Tensor:
        images = batch[self.first_stage_key]
        keys = self.cache_keys(images) if self.cache_latents and self.training else None
        z = self.latents(images, generator, keys)
        preserve = self.training and bool(self._preserve)
        state = generator.get_state() if preserve else None
        cond = self.conditioning(batch, generator, drop)
        if not preserve:
            loss, _ = self.loss_fn(self.apply_model, z, cond, self.alphas_cumprod, generator=generator)
            return loss
        captions = batch[self.cond_stage_key]
        from ldm.adapters.lora_train import names_any

        mask = torch.tensor([not names_any(c, self._words) for c in ([captions] if isinstance(captions, str)
                                                                   else captions)])
        dropped = self.conditioner.last_dropped.get(PROMPT_KEY)
        # a dropped caption is the empty prompt: its prediction is the base's too (preserve_dropped: a share of them)
        share = self._preserve_dropped
        if dropped is not None and share:
            dropped = dropped.cpu()
            if share < 1.0:  # only then a draw: true and false keep the runs' random streams as they were
                dropped = dropped & (torch.rand(len(dropped), generator=generator, device=generator.device).cpu()
                                     < share)
            mask = mask | dropped
        loss, _ = self.loss_fn(self.apply_model, z, cond, self.alphas_cumprod, generator=generator,
                               teacher=lambda x_t, t, m: self._frozen_prediction(batch, state, drop, x_t, t, m),
                               teacher_mask=mask, teacher_weight=self._preserve)
        return loss

    def _frozen_prediction(self, batch: dict, state: torch.Tensor, drop: bool, x_t: torch.Tensor, t: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """``preserve``: the frozen model's prediction (the LoRA off, or the starting UNet's) for the masked
        samples (captions without the new words, and every dropped caption: the unconditional branch that
        guidance subtracts stays the base's), with the same conditioning dropout as the trained forward (the
        generator state from before it)."""
        generator = torch.Generator(device=self.device)
        generator.set_state(state)
        teacher = self._teacher_conditioner
        with self.lora.disabled() if self.lora is not None else contextlib.nullcontext():
            cond = self.conditioning(batch, generator, drop, teacher.to(self.device) if teacher is not None else None)
            cond = {k: v[mask.to(v.device)] for k, v in cond.items()} if isinstance(cond, dict) else \
                cond[mask.to(cond.device)]
            if self._teacher is None:
                return self.apply_model(x_t, t, cond)
            return self._teacher.to(x_t.device)(x_t, t, cond)

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self._generator(_SALT_TRAIN, batch_idx), drop=True)
        bs = len(batch[self.cond_stage_key])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        if self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("lr", lr, prog_bar=False, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = torch.Generator(device=self.device)
        g.manual_seed(1_000_003 * (batch_idx + 1) + self.global_rank)  # the same noise at every validation
        loss = self._loss(batch, g, drop=False)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch[self.cond_stage_key]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._ema_scope = contextlib.ExitStack()
        self._ema_scope.enter_context(self.ema_scope())

    def on_validation_epoch_end(self) -> None:
        if self._ema_scope is not None:
            self._ema_scope.close()
            self._ema_scope = None

    @contextlib.contextmanager
    def ema_scope(self):
        """Use the EMA weights inside the block (no-op without EMA)."""
        if self.model_ema is None:
            yield
            return
        with self.model_ema.swapped_in(self._ema_target()):
            yield

    def on_fit_start(self) -> None:
        if self.disk_cache is not None:
            transform = getattr(getattr(self.trainer, "datamodule", None), "train_transform", None)
            if getattr(transform, "random_crop", False) or getattr(transform, "flip_p", 0.0) > 0:
                log.warning("cache_dir with random crops or flips (data.params.random_crop / flip_p): each variant "
                            "is cached on its own, so the cache grows while new ones appear and a second run "
                            "reuses only some; turn them off for a cache that is encoded once")
            log.info("latent and text caches on disk in %s", self.disk_cache.root)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0:
            self._estimate_scale_factor(batch[self.first_stage_key])

    @torch.no_grad()
    def _estimate_scale_factor(self, images: torch.Tensor) -> None:
        """scale_factor = 1 / std of the first batch's latents (rank 0's value, broadcast to all ranks)."""
        g = self._generator(_SALT_SCALE, 0)
        with self._base_autocast():
            z = self.first_stage_model.encode(images.to(self.device)).sample(g)
        value = (1.0 / z.float().flatten().std()).to(self.device)
        value = self.trainer.strategy.broadcast(value, src=0)
        self.scale_factor.copy_(value)
        log.info("scale_by_std: scale_factor set to %.5f", float(value))

    def configure_model(self) -> None:
        """Under ``--strategy fsdp`` (Lightning's ModelParallelStrategy): shard the UNet block by block and the EMA like
        it (:func:`ldm.training.fsdp.shard`); nothing under other strategies."""
        if self.device_mesh is not None:
            from ldm.training.fsdp import shard

            shard(self, self.device_mesh["data_parallel"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: once per optimizer step (not per accumulated micro-batch),
        and before any callback (e.g. the checkpoint of this step) sees the weights."""
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema.update(self._ema_target())

    # ---- optimizer ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.lora is not None:
            return list(self.lora.parameters())
        return [p for module in (self.model, self.conditioner) for p in module.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict:
        params = self.trainable_parameters()
        groups: list = params
        token_params = self.lora.token_parameters() if self.lora is not None else self._token_rows
        token_lr = self.lora.config.token_lr if self.lora is not None else self.token_lr
        text = {id(p) for p in self.conditioner.parameters()} if self.text_lr is not None else set()
        if token_params or text:  # the new words' vectors: at their own rate, no weight decay; the text encoders
            tokens = {id(p) for p in token_params}
            groups = [{"params": [p for p in params if id(p) not in tokens and id(p) not in text]},
                      {"params": [p for p in params if id(p) in tokens], "weight_decay": 0.0}
                      | ({} if token_lr is None else {"lr": token_lr}),
                      {"params": [p for p in params if id(p) in text and id(p) not in tokens], "lr": self.text_lr}]
            groups = [g for g in groups if g["params"]]
        opt = build_optimizer(self.optimizer_name, groups, self.effective_learning_rate(), betas=self.adam_betas,
                              eps=self.adam_eps, weight_decay=self.weight_decay,
                              adam_options=self.adam_options(params) if self.optimizer_name == "adamw" else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Plain containers only: the run config as a dict, and the RNG states as tensors/ints."""
        checkpoint["ldm_config"] = to_plain(self.run_config) if self.run_config else {"model": self.model_config()}
        checkpoint["rng_states"] = _rng_states()
        if self.lora is not None:  # only the LoRA (and its EMA): the base is rebuilt from the config on resume
            from ldm.training.lora import base_fingerprint, checkpoint_state

            state = checkpoint["state_dict"]
            if self._lora_base is None:
                self._lora_base = self._lora_base_built or base_fingerprint(state)
            checkpoint["state_dict"] = checkpoint_state(state)
            checkpoint["lora_base"] = self._lora_base

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
        if self.lora is not None:
            self._restore_lora_base(checkpoint)

    def _restore_lora_base(self, checkpoint: dict) -> None:
        """A LoRA checkpoint holds no base weights: they come from this module (built from the config), checked
        against the checkpoint's fingerprint, so that the state dict loads strictly."""
        from ldm.training.lora import base_fingerprint, is_lora_state

        from ldm.io import CheckpointError

        if not is_lora_state(checkpoint["state_dict"]) or "lora_base" not in checkpoint:
            raise CheckpointError("this checkpoint is not a LoRA run's, but model.params.lora is set: resume it "
                                  "without lora, or start a new run")
        own = self.state_dict()
        base = {k: v for k, v in own.items() if not k.startswith(("lora.", "model_ema."))}
        if (self._lora_base_built or base_fingerprint(base)) != checkpoint["lora_base"]:
            raise CheckpointError("the LoRA checkpoint was trained on other base weights than this config builds "
                                  "(model.params.init_from / first_stage_ckpt changed?): use the run's base model")
        self._lora_base = checkpoint["lora_base"]
        checkpoint["state_dict"] = {**base, **checkpoint["state_dict"]}

    def export_lora(self, path: str | os.PathLike, *, use_ema: bool = True, fp16: bool = False):
        """Write the LoRA as a kohya-format ``.safetensors`` (:func:`ldm.training.lora.export_lora`)."""
        from ldm.training.lora import checkpoint_state, export_lora

        config = to_plain(self.run_config) if self.run_config else {"model": self.model_config()}
        step = getattr(getattr(self, "_trainer", None), "global_step", None)
        return export_lora(checkpoint_state(self.state_dict()), path, config, use_ema=use_ema, step=step, fp16=fp16)

    # the export (ldm.training.common.ExportableModule): an SD-layout ldm.model.LatentDiffusion
    @staticmethod
    def export_config(model_node: dict) -> dict:
        """See :func:`inference_config`."""
        return inference_config(model_node)

    @staticmethod
    def export_weights(state_dict: dict, use_ema: bool = True, include_ema: bool = False) -> dict:
        """See :func:`export_state_dict`."""
        return export_state_dict(state_dict, use_ema=use_ema, include_ema=include_ema)

    # ---- sampling (image logger) ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, prompts: Sequence[str] | None = None, *, steps: int | None = None,
                      sampler: str | None = None, cfg_scale: float | None = None, seed: int | None = None,
                      use_ema: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``prompts`` (default: ``validation_prompts``), one generator per
        image seeded ``seed + i`` so that every logged grid uses the same noise."""
        from ldm.diffusion.guidance import CFGDenoiser
        from ldm.diffusion.samplers import build_sigmas, get_sampler, sample

        prompts = list(prompts if prompts is not None else self.validation_prompts)
        if not prompts:
            raise ValueError("no prompts to sample: set model.params.validation_prompts")
        spec = get_sampler(sampler or self.sample_sampler)
        seed = self.sample_seed if seed is None else seed
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
        side = self.image_size
        noise = torch.stack([torch.randn(self.latent_channels, side, side, generator=g) for g in gens])
        sigmas = build_sigmas(spec, self.alphas_cumprod, steps or self.sample_steps)
        was_training = self.training
        self.eval()
        try:
            with self.ema_scope() if use_ema else contextlib.nullcontext(), self._base_autocast():
                size = (side * self.downsample_factor,) * 2  # SDXL-like models: the defaults of sample.py
                keys, n = self.conditioner.input_keys, len(prompts)
                cond = self.get_learned_conditioning(
                    {PROMPT_KEY: prompts, **micro_inputs(keys, n, original_size=size, target_size=size)})
                uncond = self.get_unconditional_conditioning(
                    {PROMPT_KEY: [""], **micro_inputs(keys, 1, original_size=size, target_size=size,
                                                      aesthetic_score=2.5)})
                scale = self.sample_cfg_scale if cfg_scale is None else cfg_scale
                denoiser = CFGDenoiser(self.denoiser(), scale, uncond)
                z = sample(spec, denoiser, noise.to(self.device), sigmas, extra_args={"cond": cond},
                           generator=gens)
                images = self.decode_first_stage(z.float())
        finally:
            self.train(was_training)
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def _module_signature() -> inspect.Signature:
    """The training parameters and, after them, every other parameter of ``LatentDiffusion`` (what
    ``**model_params`` takes): the signature config checking binds a config's params against."""
    own = [p for name, p in inspect.signature(LatentDiffusionModule.__init__).parameters.items()
           if name != "self" and p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in own}
    base = [p for name, p in inspect.signature(LatentDiffusion).parameters.items() if name not in names]
    kinds = [p for p in own + base if p.kind is p.POSITIONAL_OR_KEYWORD]
    return inspect.Signature(kinds + [p for p in own + base if p.kind is p.KEYWORD_ONLY])


LatentDiffusionModule.__signature__ = _module_signature()


# ---- export -----------------------------------------------------------------------------------------------------
def inference_config(model_node: dict) -> dict:
    """The config of an exported model: ``ldm.model.LatentDiffusion`` with the architecture of ``model_node``
    (a training module's target + params).

    File paths of pretrained parts (``ckpt_path``) are dropped, since the export holds their weights, and
    ``use_ema`` is off: the export's UNet weights already are the EMA weights when there are any.
    """
    accepted = set(inspect.signature(LatentDiffusion.__init__).parameters) - {"self"}
    params = {k: v for k, v in to_plain(model_node.get("params") or {}).items() if k in accepted}
    nodes = [params.get(key) for key in ("first_stage_config", "cond_stage_config", "unet_config")]
    nodes += ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    for node in nodes:
        if isinstance(node, dict):
            (node.get("params") or {}).pop("ckpt_path", None)
    params["use_ema"] = False
    params["scheduler_config"] = None
    return {"model": {"target": _INFERENCE_TARGET, "params": params}}


def export_state_dict(state_dict: dict[str, torch.Tensor], use_ema: bool = True,
                      include_ema: bool = False) -> dict[str, torch.Tensor]:
    """A training state dict (SD layout + ``model_ema.*``) -> the inference one, in the released files' layout
    (:func:`ldm.convert.layouts.to_sd_file_layout`: OpenAI CLIP text towers in transformers names).

    With ``use_ema`` and EMA weights present, they replace ``model.diffusion_model.*``; ``model_ema.*`` itself
    is kept only with ``include_ema``.
    """
    ema = {k[len(_EMA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_EMA_PREFIX)}
    out = {k: v.detach().clone() for k, v in state_dict.items() if not k.startswith(_EMA_PREFIX)}
    if use_ema and ema:
        swapped = 0
        for k in out:
            if k.startswith(_UNET_PREFIX) and ema_name(k[len("model."):]) in ema:
                out[k] = ema[ema_name(k[len("model."):])].to(out[k].dtype).clone()
                swapped += 1
        log.info("export: %d UNet tensors taken from the EMA weights", swapped)
    if include_ema:
        out.update({_EMA_PREFIX + k: v.detach().clone() for k, v in ema.items()})
    return to_sd_file_layout(out)


# ---- RNG states (plain tensors and ints, loadable with weights_only=True) --------------------------------------
def _rng_states() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _python_state_to_plain(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    npst = states["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
