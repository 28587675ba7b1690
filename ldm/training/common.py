"""What both training modules (first stage and latent diffusion) share, and what the callbacks need of them.

The callbacks (:mod:`ldm.training.callbacks`) use a training module only through two declared interfaces:
:class:`ExportableModule` (write an inference file: the export callback, ``train.py --export-only``) and
:class:`SamplingModule` (sample the validation prompts: the image logger). A new training module that inherits
:class:`TrainingModuleMixin` and implements ``export_config`` / ``export_weights`` is exportable.
"""
from __future__ import annotations

import importlib.util

import logging
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ldm.config import to_plain

log = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _FusedLayouts:
    """For torch's fused Adam/AdamW step on a CPU: give every gradient and state tensor its parameter's memory
    layout, and hand channels-last 4-D tensors to the kernel as their NHWC views.

    - The fused kernel pairs the elements of parameter, gradient and states by memory order: a state or gradient
      of another layout than its parameter (e.g. optimizer state resumed from a run without channels-last
      weights) would be applied to the wrong elements. Such tensors are copied into the parameter's layout first.
    - It wants default-contiguous tensors and clones and copies back every channels-last conv weight (the UNet's
      layout): on the conv weights of SD1 at width 128 the step took 2.5x as long (bench/results/levers.md).
      ``permute(0, 2, 3, 1)`` of a channels-last tensor is contiguous and shares its storage, so the kernel
      updates the same memory in place.

    Same update and state dict as torch's; unfused groups are left to torch as they are."""

    _STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # torch's fused step says it unscales fp16 gradients itself, and Lightning then refuses gradient clipping
        # under any mixed precision (bf16 included: "does not allow for gradient clipping"). Saying no makes a
        # GradScaler unscale the gradients before the step, as for the unfused update: clipping works everywhere.
        self._step_supports_amp_scaling = False

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        out = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if not group.get("fused"):
            return out
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
        for i, p in enumerate(params):
            if p.grad.stride() != p.stride():
                p.grad = grads[i] = torch.empty_like(p).copy_(p.grad)
            state = self.state[p]
            for name, lst in zip(self._STATES, lists[2:]):
                if state[name].stride() != p.stride():
                    state[name] = lst[i] = torch.empty_like(p).copy_(state[name])
            if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
                for lst in lists:
                    lst[i] = lst[i].permute(0, 2, 3, 1)
        return out


class Adam(_FusedLayouts, torch.optim.Adam):
    """``torch.optim.Adam``; with ``fused=True``, see :class:`_FusedLayouts`."""


class AdamW(_FusedLayouts, torch.optim.AdamW):
    """``torch.optim.AdamW``; with ``fused=True``, see :class:`_FusedLayouts`."""


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def check_optimizer(name: str, key: str = "model.params.optimizer") -> None:
    """A one-line ValueError for an unknown optimizer name or a missing package, before anything is built."""
    if name not in OPTIMIZERS:
        raise ValueError(f"{key}: {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{key}: adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA builds), or use adamw "
                         "or adafactor")


def build_optimizer(name: str, params: list, lr: float, *, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, adam_options: dict | None = None
                    ) -> torch.optim.Optimizer:
    """The training optimizer by name: ``adamw`` (this module's AdamW; ``adam_options`` may ask for the fused kernel),
    ``adamw8bit`` (bitsandbytes' AdamW8bit: 8-bit states, about a quarter of AdamW's optimizer memory) or
    ``adafactor`` (torch's Adafactor: factored second moments, no first moment; ``betas``/``eps`` unused)."""
    check_optimizer(name)
    if name == "adamw":
        return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **(adam_options or {}))
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)


@runtime_checkable
class ExportableModule(Protocol):
    """A training module that the export callback and ``export_from_checkpoint`` can write as an inference file.

    ``export_config`` and ``export_weights`` are static: a training checkpoint is exported from its stored config
    and state dict without building the module (the class is looked up from the config's target)."""

    def inference_config(self) -> dict:
        """The config of the exported model (``{"model": {"target": ..., "params": ...}}``)."""

    def export_state_dict(self, use_ema: bool = True, include_ema: bool = False) -> dict[str, torch.Tensor]:
        """The exported model's state dict."""

    @staticmethod
    def export_config(model_node: dict) -> dict:
        """The exported model's config, from the training module's config node (target + params)."""

    @staticmethod
    def export_weights(state_dict: dict, use_ema: bool = True, include_ema: bool = False) -> dict:
        """The exported model's state dict, from the training module's state dict."""


@runtime_checkable
class SamplingModule(Protocol):
    """A training module the image logger can sample: images ``[B, 3, H, W]`` in [0, 1] for prompts."""

    validation_prompts: list[str]

    def sample_images(self, prompts: Sequence[str] | None = None, *, steps: int | None = None,
                      sampler: str | None = None, cfg_scale: float | None = None, seed: int | None = None,
                      use_ema: bool = True) -> torch.Tensor:
        """Images for ``prompts`` (default: ``validation_prompts``)."""


class TrainingModuleMixin:
    """Learning-rate scaling, the module's own config and its export; mixed into the LightningModules.

    Expects ``learning_rate``, ``base_learning_rate``, ``scale_lr``, ``hparams`` and ``trainer``, and the static
    ``export_config`` / ``export_weights`` of :class:`ExportableModule`.
    """

    def inference_config(self) -> dict:
        """The config of the exported model: ``export_config`` of this module's config."""
        return self.export_config(self.model_config())

    def export_state_dict(self, use_ema: bool = True, include_ema: bool = False) -> dict[str, torch.Tensor]:
        """The state dict of the exported model: ``export_weights`` of this module's state dict."""
        return self.export_weights(self.state_dict(), use_ema=use_ema, include_ema=include_ema)

    def effective_learning_rate(self) -> float:
        """``learning_rate``, else base_learning_rate (times the global batch size with ``scale_lr``)."""
        if self.learning_rate is not None:
            return self.learning_rate
        if not self.scale_lr:
            return self.base_learning_rate
        trainer = self.trainer
        batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer is not None else None
        if batch_size is None:
            raise ValueError("scale_lr needs the data module's batch_size; set model.params.scale_lr=false or "
                             "model.params.learning_rate")
        factor = batch_size * trainer.accumulate_grad_batches * trainer.num_devices * trainer.num_nodes
        lr = self.base_learning_rate * factor
        log.info("learning rate %.3g = %d (batch) x %d (accumulate) x %d (devices) x %d (nodes) x %.3g (base)",
                 lr, batch_size, trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes,
                 self.base_learning_rate)
        return lr

    def adam_options(self, params: list[torch.nn.Parameter]) -> dict:
        """Extra keyword arguments of Adam/AdamW: ``fused=True`` (torch's one-kernel update, about 2x faster
        than its per-tensor loop on a CPU) when ``fused_optimizer`` is set and every parameter is a plain
        float tensor on a CPU or CUDA device; else none (torch's default update). Same state, same resume."""
        if not self.fused_optimizer:
            return {}
        plain = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES and not p.is_sparse
                    and not hasattr(p, "_local_tensor") for p in params)  # DTensor (FSDP2) has _local_tensor
        if not plain:
            log.info("fused_optimizer: some parameters are not plain CPU/CUDA float tensors; using torch's "
                     "default Adam update")
        return {"fused": True} if plain else {}

    def model_config(self) -> dict:
        """This module's own config node (target + params), plain."""
        cls = type(self)
        return {"target": f"{cls.__module__}.{cls.__qualname__}", "params": to_plain(dict(self.hparams))}
