"""What both training modules (first stage and latent diffusion) share."""
from __future__ import annotations

import logging

from ldm.config import to_plain

log = logging.getLogger(__name__)


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

    def model_config(self) -> dict:
        """This module's own config node (target + params), plain."""
        cls = type(self)
        return {"target": f"{cls.__module__}.{cls.__qualname__}", "params": to_plain(dict(self.hparams))}
