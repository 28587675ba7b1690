"""What both training modules (first stage and latent diffusion) share."""
from __future__ import annotations

import logging

import torch

from ldm.config import to_plain

log = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Give every gradient its parameter's memory layout before a fused step: torch's fused Adam walks
        parameter and gradient as flat buffers, so a contiguous gradient of a channels-last conv weight would be
        applied to the wrong elements. Autograd already keeps them alike; gradients set by other code may not."""
        if not optimizer.defaults.get("fused"):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.stride() != p.stride():
                    p.grad = torch.empty_like(p).copy_(p.grad)

    def model_config(self) -> dict:
        """This module's own config node (target + params), plain."""
        cls = type(self)
        return {"target": f"{cls.__module__}.{cls.__qualname__}", "params": to_plain(dict(self.hparams))}
