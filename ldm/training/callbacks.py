"""Lightning callbacks and plugins of a training run: checkpoints, image logging, export, loggers.

Run directory layout (``<logdir>/<name>/``)::

    config.yaml               the merged config (written by train.py)
    checkpoints/last.ckpt     the latest checkpoint (resume from it); step-XXXXXXXX.ckpt: the last K
    images/step-XXXXXXXX.png  captioned sample grids of the validation prompts (EMA weights)
    logs/                     TensorBoard events (or metrics.csv without tensorboard)
    <name>.safetensors        the export: SD layout + inference config, ``load_model(None, path)`` loads it
"""
from __future__ import annotations

import csv
import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from ldm import accel
from ldm.config import get_obj_from_str
from ldm.convert import check_stored_config
from ldm.io import atomic_write, read_state_dict, save_checkpoint
from ldm.training.common import ExportableModule, SamplingModule
from ldm.training.fsdp import full_state_dict, is_sharded
from ldm.training.lora import export_lora, is_lora_state

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "make_checkpoint_callback",
    "make_lr_monitor",
    "make_logger",
    "ImageLogger",
    "ExportCallback",
    "AccelCallback",
    "export_model",
    "export_from_checkpoint",
    "captioned_grid",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through a temporary file in the same folder and a rename.

    Lightning's own save buffers the file and commits an fsspec transaction through the system temp folder,
    which is a copy (not a rename) when that is another file system; a crash there leaves a partial file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options; remove them from the save call")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def make_checkpoint_callback(dirpath: str | os.PathLike, every_n_train_steps: int = 1000,
                             keep_last: int = 3) -> ModelCheckpoint:
    """Save every ``every_n_train_steps`` optimizer steps: ``step-XXXXXXXX.ckpt`` (the last ``keep_last``
    kept, 0 = none, -1 = all) and always ``last.ckpt``. A file of the same name is replaced, never kept beside
    as ``-v1`` (the run folder is this run's: after a resume from an older or fallback checkpoint, ``last.ckpt``
    is again the newest)."""
    if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
        raise ValueError(f"every_n_train_steps={every_n_train_steps!r} must be a positive int")
    if not isinstance(keep_last, int) or keep_last < -1:
        raise ValueError(f"keep_last={keep_last!r} must be an int >= -1 (-1 keeps all)")
    return ModelCheckpoint(dirpath=str(dirpath), filename="step-{step:08d}", auto_insert_metric_name=False,
                           monitor="step", mode="max", save_top_k=keep_last, save_last=True,
                           every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=False,
                           enable_version_counter=False)


def make_lr_monitor(logging_interval: str = "step") -> LearningRateMonitor:
    return LearningRateMonitor(logging_interval=logging_interval)


LOGGERS = ("auto", "tensorboard", "csv", "wandb")


def make_logger(save_dir: str | os.PathLike, kind: str = "auto", resume_step: int | None = None,
                name: str | None = None):
    """The run's Lightning logger under ``<save_dir>/logs``: TensorBoard (``"auto"``, the default, and
    ``"tensorboard"``; a core dependency), CSV (``metrics.csv``), or Weights & Biases (``"wandb"``: needs ``pip
    install wandb``; offline unless ``WANDB_MODE`` says otherwise, project ``name``). Resumed runs append to the same
    folder (and to the same metrics.csv, less its rows of the steps from ``resume_step``, the resumed checkpoint's,
    on)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if kind not in LOGGERS:
        raise ValueError(f"logger {kind!r} is unknown; use {', '.join(LOGGERS)}")
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logger wandb needs the wandb package: pip install wandb, or set "
                             "lightning.logger=tensorboard") from None
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(save_dir=str(save_dir), project=name or Path(save_dir).name,
                           offline=os.environ.get("WANDB_MODE", "offline") == "offline")
    if kind in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
            return TensorBoardLogger(save_dir=str(save_dir), name="logs", version="", default_hp_metric=False)
        except ImportError:
            if kind == "tensorboard":
                raise ValueError("logger tensorboard needs the tensorboard package; pip install tensorboard "
                                 "or set lightning.logger=csv") from None
            log.warning("tensorboard is not installed: logging to CSV (%s/logs/metrics.csv)", save_dir)
    return _AppendingCSVLogger(save_dir=str(save_dir), name="logs", version="", resume_step=resume_step)


class _AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that the metrics.csv of the run being resumed is kept and appended to
    (under its header) instead of deleted; its rows of steps from ``resume_step`` on (logged after the
    checkpoint, before the run stopped) are dropped, as the resumed run logs those steps again."""

    def __init__(self, log_dir: str, resume_step: int | None = None):
        self.resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            self.metrics_keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if self.resume_step is None or not r.get("step", "").isdigit()
                or int(r["step"]) < self.resume_step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class _AppendingCSVLogger(CSVLogger):
    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


# ---- image grids ------------------------------------------------------------------------------------------------
def captioned_grid(images: torch.Tensor, captions: Sequence[str], cols: int = 4) -> Image.Image:
    """Images [B, 3, H, W] in [0, 1] -> one PNG-able grid, each image with its caption written below it."""
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"need images [B, 3, H, W] and B captions, got {tuple(images.shape)} and {len(captions)}")
    font = ImageFont.load_default()
    b, _, h, w = images.shape
    chars = max(8, w // 6)
    wrapped = [textwrap.wrap(c, chars)[:6] or [""] for c in captions]
    text_h = 12 * max(len(lines) for lines in wrapped) + 4
    cols = max(1, min(cols, b))
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (arr, lines) in enumerate(zip(pixels, wrapped)):
        x, y = (i % cols) * w, (i // cols) * (h + text_h)
        grid.paste(Image.fromarray(arr), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + 12 * j), line, fill="black", font=font)
    return grid


class ImageLogger(Callback):
    """Every ``every_n_steps`` optimizer steps (rank 0): sample the module's validation prompts with the EMA
    weights (its ``sample_images``: :class:`ldm.training.common.SamplingModule`; other modules log nothing) and save a captioned grid as
    ``<run>/images/step-XXXXXXXX.png``; also sent to a TensorBoard logger.

    ``steps``, ``sampler``, ``cfg_scale``, ``seed``, ``prompts``: override the module's sampling settings.
    ``clip_weights`` (a local open_clip weights file of ``clip_arch``): also log ``val/clip_score``, the grid's mean
    CLIP score against its prompts (:func:`ldm.metrics.clip_score`).
    """

    def __init__(self, every_n_steps: int = 500, prompts: Sequence[str] | None = None, steps: int | None = None,
                 sampler: str | None = None, cfg_scale: float | None = None, seed: int | None = None,
                 on_train_end: bool = True, cols: int = 4, clip_weights: str | None = None,
                 clip_arch: str = "ViT-B-32"):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive int")
        if clip_weights is not None and not os.path.isfile(clip_weights):
            raise ValueError(f"clip_weights {clip_weights} not found; give a local open_clip {clip_arch} weights file")
        self.clip_weights, self.clip_arch, self._clip = clip_weights, clip_arch, None
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else None
        self.kwargs = {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "seed": seed}
        self.log_on_train_end = on_train_end
        self.cols = cols
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_on_train_end and trainer.global_step != self._last_step:
            self.log_images(trainer, pl_module)

    def log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Sample, save and log one grid now; returns the PNG path (None on other ranks or without prompts)."""
        self._last_step = trainer.global_step
        if not isinstance(pl_module, SamplingModule):  # e.g. the autoencoder: nothing to sample
            return None
        prompts = self.prompts or pl_module.validation_prompts
        if not prompts or not (trainer.is_global_zero or is_sharded(pl_module)):
            return None
        images = pl_module.sample_images(prompts, **self.kwargs)  # a sharded model samples on every rank
        if not trainer.is_global_zero:
            return None
        grid = captioned_grid(images, prompts, self.cols)
        path = Path(trainer.default_root_dir) / "images" / f"step-{trainer.global_step:08d}.png"
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        log.info("sample grid saved to %s", path)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            arr = torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)
            experiment.add_image("samples", arr, global_step=trainer.global_step)
        if self.clip_weights is not None:
            score = self.clip_score(images, prompts)
            log.info("step %d: CLIP score of the grid %.2f", trainer.global_step, score)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"val/clip_score": score}, step=trainer.global_step)
        return path

    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """The mean CLIP score of ``images`` ([B, 3, H, W] in [0, 1]) against ``prompts``."""
        from ldm.metrics import clip_score, load_clip

        if self._clip is None:
            self._clip = load_clip(self.clip_arch, self.clip_weights)
        self._clip.to(images.device)
        return clip_score(images, prompts, self._clip, value_range=(0.0, 1.0)).mean().item()


# ---- export -----------------------------------------------------------------------------------------------------
def _cast_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast network weights, keeping the schedule buffers and scale_factor (top-level keys) in fp32."""
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() and "." in k else v for k, v in sd.items()}


def _write_export(sd: dict[str, torch.Tensor], path: str | os.PathLike, config: dict, fp16: bool,
                  metadata: dict[str, str]) -> Path:
    sd = _cast_weights(sd, torch.float16 if fp16 else None)
    path = save_checkpoint(sd, path, config=config, metadata=metadata)
    log.info("exported %s (%d tensors%s)", path, len(sd), ", fp16" if fp16 else "")
    return path


def export_model(module: ExportableModule, path: str | os.PathLike, *, use_ema: bool = True,
                 include_ema: bool = False, fp16: bool = False, state_dict: dict | None = None) -> Path:
    """Write ``module`` as an inference checkpoint: its ``export_state_dict`` with its ``inference_config``
    (for the latent diffusion stage an SD-layout ``ldm.model.LatentDiffusion``, for the first stage a plain
    ``AutoencoderKL``). ``state_dict``: the module's whole state dict when the module itself holds only shards
    (FSDP: :func:`ldm.training.fsdp.full_state_dict`)."""
    if getattr(module, "lora", None) is not None:  # a LoRA run: the kohya-format LoRA file
        return module.export_lora(path, use_ema=use_ema, fp16=fp16)
    _check_exportable(module)
    if state_dict is not None:
        sd = module.export_weights(state_dict, use_ema=use_ema, include_ema=include_ema)
    else:
        sd = module.export_state_dict(use_ema=use_ema, include_ema=include_ema)
    step = getattr(getattr(module, "_trainer", None), "global_step", None)
    meta = {"global_step": str(step)} if step is not None else {}
    return _write_export(sd, path, module.inference_config(), fp16, meta)


def export_from_checkpoint(ckpt: str | os.PathLike, path: str | os.PathLike, *, use_ema: bool = True,
                           include_ema: bool = False, fp16: bool = False) -> Path:
    """Export a training checkpoint (e.g. ``checkpoints/last.ckpt``) without building the model."""
    sd, meta = read_state_dict(ckpt)
    if not meta.get("config"):
        raise ValueError(f"{ckpt} stores no config (ldm_config); was it written by train.py?")
    config = json.loads(meta["config"])
    node = config.get("model", config)
    check_stored_config(node, str(ckpt))  # the file's config is data: only the project's own classes
    if is_lora_state(sd):  # a LoRA run's checkpoint: the kohya-format LoRA file
        return export_lora(sd, path, config, use_ema=use_ema, fp16=fp16,
                           step=int(meta["global_step"]) if str(meta.get("global_step", "")).isdigit() else None)
    cls = get_obj_from_str(node["target"], "model")
    _check_exportable(cls)
    out = cls.export_weights(sd, use_ema=use_ema, include_ema=include_ema)
    return _write_export(out, path, cls.export_config(node), fp16, {k: v for k, v in meta.items() if k != "config"})


def _check_exportable(module: Any) -> None:
    if not isinstance(module, ExportableModule) and not (isinstance(module, type)
                                                          and issubclass(module, ExportableModule)):
        name = module.__name__ if isinstance(module, type) else type(module).__name__
        raise TypeError(f"{name} cannot be exported: it lacks the methods of ldm.training.common.ExportableModule "
                        "(inference_config, export_state_dict, export_config, export_weights)")


class ExportCallback(Callback):
    """At the end of training (rank 0), write ``<run>/<name>.safetensors`` (see :func:`export_model`)."""

    def __init__(self, name: str = "model", dirpath: str | None = None, use_ema: bool = True,
                 include_ema: bool = False, fp16: bool = False):
        if not name or "/" in name:
            raise ValueError(f"export name {name!r} must be a plain file name without folders")
        self.name, self.dirpath = name, dirpath
        self.use_ema, self.include_ema, self.fp16 = use_ema, include_ema, fp16
        self.path: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = Path(self.dirpath or trainer.default_root_dir) / f"{self.name}.safetensors"
        # FSDP: every rank sends its shards (weights and EMA) to rank 0, which writes the usual layout
        state = full_state_dict(pl_module) if is_sharded(pl_module) else None
        self._export(pl_module, state)

    @rank_zero_only
    def _export(self, pl_module: pl.LightningModule, state: dict | None = None) -> None:
        export_model(pl_module, self.path, use_ema=self.use_ema, include_ema=self.include_ema, fp16=self.fp16,
                     state_dict=state)


def _accel_precision(trainer_precision: str) -> str:
    """Lightning's precision ("32-true", "bf16-mixed", "16-mixed", ...) as :func:`ldm.accel.optimize` names it."""
    text = str(trainer_precision)
    return "bf16" if text.startswith("bf16") else "fp16" if text.startswith("16") else "fp32"


class AccelCallback(Callback):
    """Puts :func:`ldm.accel.optimize`'s fast paths for the trainer's device and precision onto the model when
    the run is set up (on a CPU: the fp32 oneDNN products in training, the bf16 paths when sampling images).
    The state dict, and so every checkpoint and export, is the plain model's."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        accel.optimize(pl_module, device=trainer.strategy.root_device, precision=_accel_precision(trainer.precision))

