"""What both training modules (first stage and latent diffusion) share."""
from __future__ import annotations

import logging

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


class TrainingModuleMixin:
    """Learning-rate scaling and the module's own config; mixed into the LightningModules.

    Expects ``learning_rate``, ``base_learning_rate``, ``scale_lr``, ``hparams`` and ``trainer``.
    """

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
