"""Training the first stage: the KL autoencoder with the LPIPS + PatchGAN loss, as a Lightning module.

:class:`AutoencoderKLModule` *is* an :class:`ldm.models.autoencoder.AutoencoderKL` (same attribute names), so
its weights keep the SD first-stage layout (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``);
the loss (:class:`ldm.training.losses.LPIPSWithDiscriminator`) lives under ``loss.*``.

Optimization is manual, with two Adam optimizers (betas 0.5, 0.9, as the original): the autoencoder's and the
discriminator's. Each batch makes one autoencoder step; from ``disc_start`` on it also makes one discriminator
step on the same (detached) reconstructions. ``disc_start`` counts batches (:attr:`ae_step`, saved in
checkpoints). Lightning's ``global_step`` counts optimizer steps of both optimizers, so after ``disc_start``
``trainer.max_steps`` advances by two per batch. Manual optimization does not support Lightning's
``accumulate_grad_batches`` or ``gradient_clip_val``; under DDP use ``strategy: ddp_find_unused_parameters_true``
(the discriminator is idle before ``disc_start``).

Export: :meth:`export_state_dict` is the plain ``AutoencoderKL`` state dict (no ``loss.*``) and
:meth:`inference_config` its config; :meth:`export` writes both as one safetensors file that the latent
diffusion stage takes as ``first_stage_ckpt`` (or ``AutoencoderKL(..., ckpt_path=...)`` loads directly).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from ldm.config import instantiate_from_config, to_plain
from ldm.models.autoencoder import AutoencoderKL
from ldm.training.common import Adam, TrainingModuleMixin

log = logging.getLogger(__name__)

__all__ = ["AutoencoderKLModule"]

_INFERENCE_TARGET = "ldm.models.autoencoder.AutoencoderKL"
_LOSS_PREFIX = "loss."


class AutoencoderKLModule(AutoencoderKL, TrainingModuleMixin, pl.LightningModule):
    """A trainable :class:`~ldm.models.autoencoder.AutoencoderKL`.

    Args:
        ddconfig, embed_dim: the autoencoder's architecture (as ``AutoencoderKL``).
        lossconfig: a config node, normally ``ldm.training.losses.LPIPSWithDiscriminator``.
        base_learning_rate: learning rate per sample; with ``scale_lr`` multiplied by
            batch_size * accumulate_grad_batches * devices * nodes (as the original main.py).
        learning_rate: if given, the learning rate as is (overrides base_learning_rate and scale_lr).
        adam_betas: betas of both Adam optimizers.
        fused_optimizer: torch's fused Adam kernel where it applies (CPU/CUDA float parameters).
        learn_logvar: train the loss's ``logvar`` with the autoencoder (the original kept it fixed).
        ckpt_path, ignore_keys: initial autoencoder weights (a first-stage or full SD file).
        image_key: the batch entry holding images [B, 3, H, W] in [-1, 1].
        monitor: the metric checkpoint callbacks watch.
        num_val_images: how many validation reconstructions are logged as images (0: none).
    """

    def __init__(self, ddconfig: dict, embed_dim: int, lossconfig: Any, *, base_learning_rate: float = 4.5e-6,
                 learning_rate: float | None = None, scale_lr: bool = True,
                 adam_betas: Sequence[float] = (0.5, 0.9), fused_optimizer: bool = True,
                 learn_logvar: bool = False,
                 ckpt_path: str | os.PathLike | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image", monitor: str | None = "val/rec_loss", num_val_images: int = 8):
        hparams = to_plain({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        _check_args(hparams)
        # the checkpoint loads before self.loss exists, so only autoencoder keys are compared
        super().__init__(ddconfig, embed_dim, ckpt_path=ckpt_path, ignore_keys=ignore_keys,
                         image_key=image_key, monitor=monitor)
        self.save_hyperparameters(hparams, logger=False)
        self.loss = instantiate_from_config(lossconfig, "model.params.lossconfig")
        self.loss.logvar.requires_grad_(learn_logvar)
        self.automatic_optimization = False
        self.base_learning_rate = float(base_learning_rate)
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.scale_lr, self.adam_betas, self.learn_logvar = scale_lr, tuple(adam_betas), learn_logvar
        self.fused_optimizer = bool(fused_optimizer)
        self.num_val_images = num_val_images
        self.ae_step = 0  # autoencoder steps (= training batches) taken: the clock of disc_start
        self.run_config: dict | None = None  # the whole run's config (plain), set by train.py
        self._val_images: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- inputs ---------------------------------------------------------------------------------------------
    def get_input(self, batch: dict) -> torch.Tensor:
        """The batch's images as a contiguous float tensor [B, C, H, W]."""
        if self.image_key not in batch:
            raise KeyError(f"batch has no {self.image_key!r} entry (keys: {sorted(batch)}); "
                           "set model.params.image_key")
        x = batch[self.image_key]
        in_channels = self.encoder.conv_in.in_channels
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batch[{self.image_key!r}] must be a tensor [B, {in_channels}, H, W] in [-1, 1], "
                             f"got {shape}")
        return x.to(memory_format=torch.contiguous_format).float()

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = self.get_input(batch)
        opt_ae, opt_disc = self.optimizers()
        reconstructions, posterior = self(x)
        step = self.ae_step

        with self.toggled_optimizer(opt_ae):  # the discriminator gets no gradients from the AE loss
            ae_loss, logs = self.loss.generator_loss(x, reconstructions, posterior, step,
                                                     last_layer=self.get_last_layer(), split="train")
            opt_ae.zero_grad()
            self.manual_backward(ae_loss)
            opt_ae.step()
        self.ae_step += 1

        if self.loss.discriminator_active(step):
            with self.toggled_optimizer(opt_disc):
                d_loss, d_logs = self.loss.discriminator_loss(x, reconstructions.detach(), step, split="train")
                opt_disc.zero_grad()
                self.manual_backward(d_loss)
                opt_disc.step()
            logs.update(d_logs)

        self.log("train/rec_loss", logs.pop("train/rec_loss"), prog_bar=True, on_step=True, batch_size=len(x))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(x))
        return ae_loss.detach()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Reconstructions from the posterior mode: deterministic val/rec_loss, val/psnr, ..."""
        from ldm.metrics import psnr

        x = self.get_input(batch)
        reconstructions, posterior = self(x, sample_posterior=False)
        ae_loss, logs = self.loss.generator_loss(x, reconstructions, posterior, self.ae_step, split="val")
        if self.loss.discriminator_active(self.ae_step):
            logs.update(self.loss.discriminator_loss(x, reconstructions, self.ae_step, split="val")[1])
        logs["val/psnr"] = psnr(reconstructions.clamp(-1, 1), x).mean().float()
        self.log("val/rec_loss", logs.pop("val/rec_loss"), prog_bar=True, sync_dist=True, batch_size=len(x))
        self.log_dict(logs, sync_dist=True, batch_size=len(x))
        if batch_idx == 0 and self.num_val_images > 0:
            n = self.num_val_images
            self._val_images = (x[:n].detach().cpu(), reconstructions[:n].detach().cpu())
        return ae_loss

    def on_validation_epoch_end(self) -> None:
        if self._val_images is not None:
            self._log_reconstructions(*self._val_images)
            self._val_images = None

    def _log_reconstructions(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Inputs (top row) over reconstructions (bottom row), to a logger that takes images (TensorBoard)."""
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if not hasattr(experiment, "add_image") or self.global_rank != 0:
            return
        import torchvision

        pair = torch.cat([inputs, reconstructions.clamp(-1, 1)])
        grid = torchvision.utils.make_grid((pair + 1) / 2, nrow=len(inputs))
        experiment.add_image("val/reconstructions", grid, self.global_step)

    # ---- optimizers -----------------------------------------------------------------------------------------
    def autoencoder_parameters(self) -> list[torch.nn.Parameter]:
        """What the autoencoder optimizer trains: encoder, decoder, quant convs (and logvar if learned)."""
        params = [p for m in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv)
                  for p in m.parameters()]
        return params + [self.loss.logvar] if self.learn_logvar else params

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.effective_learning_rate()
        ae, disc = list(self.autoencoder_parameters()), list(self.loss.discriminator.parameters())
        opt_ae = Adam(ae, lr=lr, betas=self.adam_betas, **self.adam_options(ae))
        opt_disc = Adam(disc, lr=lr, betas=self.adam_betas, **self.adam_options(disc))
        return [opt_ae, opt_disc]

    # ---- checkpoints and export -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Plain containers only: the run config as a dict, and the batch counter of ``disc_start``."""
        checkpoint["ldm_config"] = to_plain(self.run_config) if self.run_config else {"model": self.model_config()}
        checkpoint["ae_step"] = self.ae_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ae_step = int(checkpoint.get("ae_step", 0))

    # the export (ldm.training.common.ExportableModule): a plain AutoencoderKL
    @staticmethod
    def export_config(model_node: dict) -> dict:
        """The config of the exported autoencoder: a plain ``AutoencoderKL`` with this architecture."""
        params = model_node.get("params") or {}
        return {"model": {"target": _INFERENCE_TARGET,
                          "params": {"ddconfig": to_plain(params["ddconfig"]), "embed_dim": params["embed_dim"]}}}

    @staticmethod
    def export_weights(state_dict: dict, use_ema: bool = True, include_ema: bool = False) -> dict:
        """The plain ``AutoencoderKL`` state dict (the SD first-stage layout, no ``loss.*``).

        The autoencoder keeps no EMA weights: ``use_ema`` (the export callback's default) changes nothing and
        ``include_ema=True`` is refused. Both exist so one export path serves both training stages.
        """
        if include_ema:
            raise ValueError("the autoencoder has no EMA weights to include; export with include_ema=false")
        return {k: v.detach().clone() for k, v in state_dict.items() if not k.startswith(_LOSS_PREFIX)}

    def export(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
        """Write :meth:`export_state_dict` with :meth:`inference_config` (safetensors unless .ckpt/.pt)."""
        from ldm.io import save_checkpoint

        out = save_checkpoint(self.export_state_dict(), path, config=self.inference_config(), dtype=dtype)
        log.info("exported the autoencoder to %s", out)
        return str(out)


def _check_args(hp: dict) -> None:
    if hp["base_learning_rate"] <= 0 or (hp["learning_rate"] is not None and hp["learning_rate"] <= 0):
        raise ValueError("base_learning_rate/learning_rate must be > 0 (e.g. 4.5e-6)")
    if len(hp["adam_betas"]) != 2:
        raise ValueError(f"adam_betas={hp['adam_betas']!r} must be two numbers, e.g. [0.5, 0.9]")
    if not isinstance(hp["num_val_images"], int) or hp["num_val_images"] < 0:
        raise ValueError(f"num_val_images={hp['num_val_images']!r} must be an int >= 0")
    if not isinstance(hp["lossconfig"], dict) or "target" not in hp["lossconfig"]:
        raise ValueError("lossconfig must be a node with 'target:' (e.g. ldm.training.losses.LPIPSWithDiscriminator)")
