"""``python train.py``: train whatever LightningModule ``model.target`` names on whatever ``data.target`` names.

    python train.py --base configs/demo/shapes_ldm.yaml lightning.trainer.max_steps=200 --name shapes
    python train.py --base configs/ldm_txt2img.yaml configs/data/webdataset.yaml \\
        data.params.urls='/data/shards/{000000..000099}.tar' --devices 8 --num_nodes 2 --strategy ddp
    python train.py --resume logs/shapes            # continue from logs/shapes/checkpoints/last.ckpt
    python train.py --resume logs/shapes --export-only   # write logs/shapes/shapes.safetensors and stop
    python train.py --base configs/demo/shapes_ldm.yaml --init ldm/assets/demo/shapes.safetensors   # warm start
    python train.py ... --init base.safetensors:unet,keep_new --init tower.safetensors:text_encoder

Config sections: ``model`` and ``data`` (``target``/``params`` nodes; no ``data`` = the synthetic shapes data),
``lightning.trainer`` (``pytorch_lightning.Trainer`` arguments; the trainer flags below override them),
``lightning.callbacks`` (``checkpoint``, ``image_logger``, ``export``, ``lr_monitor``, ``accel`` (the
:func:`ldm.accel.optimize` pass for the trainer's device and precision): their parameters, or ``false`` to switch
one off; any other entry is a ``target``/``params`` node of an extra callback) and
``lightning.logger`` (auto = tensorboard / tensorboard / csv / wandb). The whole config is checked before anything is
built; a bad key or value is reported in one line naming it, with exit status 2.

Multi-node runs use Lightning's cluster environments as they are (torchrun variables, SLURM, or
``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` with ``--num_nodes``): start the same command on every node.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.config import (CONFIG_DIR, ConfigError, check_config, check_value, get_obj_from_str, instantiate_from_config,
                        load_config, param_types, to_plain)
from ldm.io import CheckpointError, atomic_write, read_training_checkpoint, remove_stale_temp_files

log = logging.getLogger("ldm.train")

DEFAULT_BASE = CONFIG_DIR / "demo" / "shapes_ldm.yaml"
DEFAULT_DATA = {"target": "ldm.data.datamodule.ShapesDataModule", "params": {"size": 64, "batch_size": 16}}
DEFAULT_SEED = 23
PROG = "train.py"
TRAINER_FLAGS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps",
                 "accumulate_grad_batches")
CALLBACK_TARGETS = {
    "checkpoint": "ldm.training.callbacks.make_checkpoint_callback",
    "image_logger": "ldm.training.callbacks.ImageLogger",
    "export": "ldm.training.callbacks.ExportCallback",
    "lr_monitor": "ldm.training.callbacks.make_lr_monitor",
    "accel": "ldm.training.callbacks.AccelCallback",
}
_RESERVED_TRAINER_KEYS = ("callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a latent diffusion model (or its autoencoder).")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. lightning.trainer.max_steps=20 data.params.batch_size=4")
    p.add_argument("-b", "--base", nargs="+", default=None, metavar="YAML",
                   help=f"config files, merged left to right (default: {DEFAULT_BASE.relative_to(CONFIG_DIR.parent)})")
    p.add_argument("-n", "--name", default=None, help="run name (default: the last config file's stem)")
    p.add_argument("-l", "--logdir", default="logs", help="folder of run folders (default: logs)")
    p.add_argument("-s", "--seed", type=int, default=None,
                   help=f"global seed (default: a resumed run's own, else {DEFAULT_SEED}); kept in config.yaml")
    p.add_argument("-r", "--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue a run: its folder, a .ckpt, or 'auto' (the run's last.ckpt if there is one)")
    p.add_argument("--export-only", action="store_true",
                   help="with --resume: export the checkpoint as <run>/<name>.safetensors and stop")
    p.add_argument("--init", action="append", default=None, metavar="FILE[:OPTIONS]",
                   help="start from the weights in FILE (sets model.params.init_from); OPTIONS, comma-separated: "
                        "the parts (unet, text_encoder, first_stage; default all) and the flags ema (the file's "
                        "EMA weights for the UNet) and keep_new (tensors the file lacks keep their "
                        "initialisation). Repeat it to take parts from several files, applied in order")
    for flag in TRAINER_FLAGS:
        p.add_argument(f"--{flag}", default=None, help=f"lightning.trainer.{flag}")
    return p


# ---- run folder and resume ----------------------------------------------------------------------------------------
def resolve_run(args: argparse.Namespace) -> tuple[Path, Path | None, list[str]]:
    """(run dir, checkpoint to resume from or None, config files to merge)."""
    bases = list(args.base or [])
    resume = args.resume
    if resume not in (None, "auto"):
        path = Path(resume)
        if path.is_dir():
            run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
            if not _has_checkpoints(run_dir):
                raise CheckpointError(f"--resume {path}: no checkpoints/*.ckpt in it; check the run folder")
        elif path.is_file():
            ckpt = path
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else Path(args.logdir) / _name(args)
        else:
            raise CheckpointError(f"--resume {path}: no such run folder or checkpoint file")
        saved = run_dir / "config.yaml"
        return run_dir, ckpt, ([str(saved)] if saved.is_file() else []) + bases
    if not bases:
        bases = [str(DEFAULT_BASE)]
    run_dir = Path(args.logdir) / _name(args, bases)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume == "auto":
        return run_dir, (last if _has_checkpoints(run_dir) else None), bases
    if _has_checkpoints(run_dir):
        raise CheckpointError(f"run folder {run_dir} already has checkpoints (checkpoints/*.ckpt); pass --resume to "
                              "continue it or choose another --name")
    return run_dir, None, bases


def _has_checkpoints(run_dir: Path) -> bool:
    """Whether the run has a checkpoint to resume from (its last.ckpt, or another one when that is gone:
    :func:`readable_checkpoint` falls back to it)."""
    return any((run_dir / "checkpoints").glob("*.ckpt"))


def readable_checkpoint(ckpt: Path) -> Path:
    """``ckpt`` if it reads as a training checkpoint. An unreadable ``last.ckpt`` (truncated by a crash, corrupt,
    or a pickle that is refused) falls back, with a warning naming both files, to the readable checkpoint of its
    folder with the highest step; with none, or for another file named by --resume, a one-line CheckpointError."""
    try:
        read_training_checkpoint(ckpt)
        return ckpt
    except CheckpointError as e:
        if ckpt.name != "last.ckpt":
            raise
        error = e
    readable = []
    for other in ckpt.parent.glob("*.ckpt"):
        if other.name == ckpt.name:
            continue
        try:
            step = int(read_training_checkpoint(other)["global_step"])
        except (CheckpointError, TypeError, ValueError):
            continue
        readable.append((step, other.stat().st_mtime, other))
    if not readable:
        raise CheckpointError(f"cannot resume: {error}; no other readable checkpoint in {ckpt.parent} to fall "
                              "back to") from error
    step, _, other = max(readable)
    warn = log.warning if _is_global_zero() else log.debug  # (every rank checks; one says so)
    warn("cannot resume from %s (%s); resuming from %s instead (step %d), the newest readable checkpoint of %s",
         ckpt, error, other, step, ckpt.parent)
    return other


def remove_orphans(run_dir: Path) -> None:
    """Delete the temporary files of interrupted writes (a checkpoint, an export, a grid) that a crashed or
    killed process of this run left in its folders; see :func:`ldm.io.remove_stale_temp_files`."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "images"):
        for path in remove_stale_temp_files(folder):
            log.info("removed %s, left by an interrupted write", path)


def _name(args: argparse.Namespace, bases: Sequence[str] = ()) -> str:
    if args.name:
        return args.name
    return Path(bases[-1]).stem if bases else Path(DEFAULT_BASE).stem


def _is_global_zero() -> bool:
    """Before the trainer exists: rank 0 of the job, from the launchers' environment variables."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0")))
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return node == "0" and local == "0"


# ---- config -------------------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace, bases: Sequence[str]) -> DictConfig:
    """Merge the files, the key=value overrides and the trainer flags; fill the defaults."""
    flags = [f"lightning.trainer.{f}={getattr(args, f)}" for f in TRAINER_FLAGS if getattr(args, f) is not None]
    cfg = merge_configs(bases, list(args.overrides) + flags)
    if "model" not in cfg:
        raise ConfigError(f"config has no model section; pass a model config with --base (e.g. {DEFAULT_BASE.name})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required value is missing (???); set it, e.g. {missing[0]}=...")
    if args.init:
        cfg.model.params = cfg.model.get("params") or {}
        cfg.model.params.init_from = init_from_option(args.init)
    if cfg.get("data") is None:
        cfg.data = DEFAULT_DATA
    cfg.lightning = cfg.get("lightning") or {}
    cfg.lightning.trainer = cfg.lightning.get("trainer") or {}
    cfg.lightning.callbacks = cfg.lightning.get("callbacks") or {}
    return cfg


def init_from_option(values: Sequence[str]) -> str | list[dict]:
    """``--init FILE[:OPTIONS]`` words -> the ``model.params.init_from`` value (a path, or a list of entries)."""
    from ldm.training.init_from import PARTS

    flags = ("ema", "keep_new")
    entries = []
    for value in values:
        path, sep, options = value.rpartition(":")
        words = options.split(",") if sep else []
        if not (path and words and all(w in PARTS or w in flags for w in words)):
            entries.append({"path": value})  # no options (or a colon that is part of the path)
            continue
        entry: dict[str, Any] = {"path": path}
        if any(w in PARTS for w in words):
            entry["parts"] = [w for w in words if w in PARTS]
        entry.update({flag: True for flag in flags if flag in words})
        entries.append(entry)
    if len(entries) == 1 and list(entries[0]) == ["path"]:
        return entries[0]["path"]
    return entries


def merge_configs(bases: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """``load_config`` semantics, except that a later file whose ``model``/``data`` node names another
    ``target`` replaces that node instead of merging into it (so configs/data/webdataset.yaml can follow a
    config that has shapes data)."""
    if not bases:
        raise ConfigError("no config given: pass at least one YAML file with --base")
    parts = [load_config(p) for p in bases]
    for i, later in enumerate(parts):
        for section in ("model", "data"):
            node = later.get(section)
            if not isinstance(node, DictConfig) or "target" not in node:
                continue
            for earlier in parts[:i]:
                old = earlier.get(section)
                if isinstance(old, DictConfig) and old.get("target") != node.target:
                    earlier[section] = None
    merged = OmegaConf.merge(*parts)
    if not overrides:
        return merged
    return OmegaConf.merge(merged, load_config_overrides(overrides))


def load_config_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides as a config (load_config's checks and one-line errors)."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. lightning.trainer.max_steps=20)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # omegaconf grammar errors are long; keep the first line
        raise ConfigError(f"cannot parse overrides: {str(e).splitlines()[0]}") from e


def callback_nodes(cfg: DictConfig, run_dir: Path, name: str) -> dict[str, dict]:
    """``lightning.callbacks`` as target/params nodes (defaults filled in, switched-off ones left out)."""
    settings = to_plain(cfg.lightning.callbacks)
    nodes = {}
    for key in list(CALLBACK_TARGETS) + [k for k in settings if k not in CALLBACK_TARGETS]:
        value = settings.get(key, {})
        if value is False or (value is None and key in settings):
            continue
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"lightning.callbacks.{key}: expected a mapping of parameters or false, got {value!r}")
        if "target" in value:
            nodes[key] = value
        elif key in CALLBACK_TARGETS:
            nodes[key] = {"target": CALLBACK_TARGETS[key], "params": dict(value)}
        else:
            raise ConfigError(f"lightning.callbacks.{key}: unknown callback; give it a target (and params) or use "
                              f"one of {', '.join(CALLBACK_TARGETS)}")
    if "checkpoint" in nodes and nodes["checkpoint"]["target"] == CALLBACK_TARGETS["checkpoint"]:
        nodes["checkpoint"]["params"]["dirpath"] = str(run_dir / "checkpoints")
    if "export" in nodes and nodes["export"]["target"] == CALLBACK_TARGETS["export"]:
        nodes["export"]["params"].setdefault("name", name)
    return nodes


def check_params(target: str, params: dict, path: str) -> None:
    """Check a plain mapping of keyword arguments against ``target``'s signature (errors name ``path.key``)."""
    import inspect

    fn = get_obj_from_str(target, path)
    accepted = {name for name, p in inspect.signature(fn).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    for key in params:
        if key not in accepted:
            raise ConfigError(f"{path}.{key}: unknown parameter for {target} (accepted: {', '.join(sorted(accepted))})")
    hints = param_types(fn)
    for key, value in params.items():
        if key in hints:
            check_value(value, hints[key], f"{path}.{key}")


def validate(cfg: DictConfig, callbacks: dict[str, dict]) -> None:
    """Check every section before anything is built (raises ConfigError naming the key)."""
    check_config(cfg.model, "model")
    check_config(cfg.data, "data")
    trainer = to_plain(cfg.lightning.trainer)
    if not isinstance(trainer, dict):
        raise ConfigError("lightning.trainer: must be a mapping of pytorch_lightning.Trainer arguments")
    for key in _RESERVED_TRAINER_KEYS:
        if key in trainer:
            raise ConfigError(f"lightning.trainer.{key}: set by train.py; configure it under lightning.callbacks, "
                              "lightning.logger or --logdir instead")
    check_params("pytorch_lightning.Trainer", trainer, "lightning.trainer")
    _check_fsdp(trainer, cfg.model)
    user_nodes = to_plain(cfg.lightning.callbacks)
    for key, node in callbacks.items():
        if isinstance(user_nodes.get(key), dict) and "target" in user_nodes[key]:
            check_config(node, f"lightning.callbacks.{key}")
        else:  # parameters of a built-in callback, written without target/params
            check_params(node["target"], node["params"], f"lightning.callbacks.{key}")
    from ldm.training.callbacks import LOGGERS

    logger = cfg.lightning.get("logger", "auto")
    if logger not in (*LOGGERS, False, None):
        raise ConfigError(f"lightning.logger: {logger!r} is unknown; use {', '.join(LOGGERS)} or false")
    if logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("lightning.logger: wandb needs the wandb package: pip install wandb, or use tensorboard")


def _check_fsdp(trainer: dict, model: DictConfig) -> None:
    """``strategy: fsdp`` is :mod:`ldm.training.fsdp` (Lightning's ModelParallelStrategy with FSDP2, CPUs and GPUs,
    EMA sharded with the weights); Lightning's other FSDP names (FSDP1, GPUs only) are refused in one line."""
    strategy = str(trainer.get("strategy", "auto"))
    if not strategy.startswith("fsdp"):
        return
    from ldm.training.fsdp import STRATEGY

    if strategy != STRATEGY:
        raise ConfigError(f"lightning.trainer.strategy: {strategy} is Lightning's FSDP1 strategy, which train.py does "
                          f"not use; use --strategy {STRATEGY} (FSDP2: CPUs and GPUs, EMA sharded with the weights)")
    import pytorch_lightning as pl

    configure = getattr(get_obj_from_str(model.target, "model"), "configure_model", None)
    if configure is None or configure is pl.LightningModule.configure_model:
        raise ConfigError(f"lightning.trainer.strategy: {STRATEGY} shards the model in its configure_model hook, "
                          f"which {model.target} does not have; use --strategy ddp")
    if (model.get("params") or {}).get("lora") is not None:
        raise ConfigError(f"model.params.lora: a LoRA run trains a few MB; use --strategy ddp, not {STRATEGY}")


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of train.py, ``ldm-train`` and ``python -m ldm.train`` (``prog``, the name that usage lines
    show); returns the exit status (2 for a bad config)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(prog).parse_intermixed_args(argv)
    _split_overrides(args)
    try:
        return _run(args)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2


def _split_overrides(args: argparse.Namespace) -> None:
    """``--base a.yaml b.yaml key=value``: argparse hands the key=value words to --base; they are overrides."""
    if args.base:
        args.overrides = [b for b in args.base if "=" in b] + list(args.overrides)
        args.base = [b for b in args.base if "=" not in b] or None


class _DropTips(logging.Filter):
    """Lightning's advertising tips ("💡 Tip: ... try installing ...") say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _quiet_lightning() -> None:
    """Keep the warnings of a first run that mean something: the frozen first stage (and a frozen text encoder) are
    in eval mode on purpose, and torch's pytree deprecation inside Lightning is not the user's to fix."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())


def _run(args: argparse.Namespace) -> int:
    run_dir, ckpt, bases = resolve_run(args)
    if _is_global_zero():
        remove_orphans(run_dir)
    if ckpt is not None:
        ckpt = readable_checkpoint(ckpt)
    if args.export_only:
        return _export_only(run_dir, ckpt, build_config(args, bases))
    cfg = build_config(args, bases)
    callbacks = callback_nodes(cfg, run_dir, run_dir.name)
    validate(cfg, callbacks)

    import pytorch_lightning as pl

    from ldm.training.callbacks import make_logger

    cb = [instantiate_from_config(node, f"lightning.callbacks.{key}") for key, node in callbacks.items()]
    logger_kind = cfg.lightning.get("logger", "auto")
    resume_step = int(read_training_checkpoint(ckpt)["global_step"]) if ckpt is not None else None
    logger = make_logger(run_dir, logger_kind, resume_step, run_dir.name) if logger_kind else False
    _quiet_lightning()
    trainer = build_trainer(cfg, run_dir, logger, cb, enable_checkpointing="checkpoint" in callbacks)

    saved = cfg.get("seed")
    seed = args.seed if args.seed is not None else int(saved if saved is not None else DEFAULT_SEED)
    if ckpt is not None and saved is not None and seed != int(saved):
        log.warning("--seed %d differs from the resumed run's seed %s: the rest of the run draws other noise",
                    seed, saved)
    cfg.seed = seed  # recorded in config.yaml, so that --resume continues with the same random stream
    pl.seed_everything(seed, workers=True)
    model_node = cfg.model
    params = model_node.get("params") or {}
    if ckpt is not None and params.get("init_from") and not params.get("lora"):  # a LoRA checkpoint has no base
        log.info("resuming: model.params.init_from is not loaded again (the checkpoint has the weights)")
        model_node = copy.deepcopy(model_node)
        model_node.params.init_from = None
    data = instantiate_from_config(cfg.data, "data")  # first: it checks its shard/folder paths in seconds
    model = instantiate_from_config(model_node, "model")
    if not isinstance(model, pl.LightningModule):
        raise ConfigError(f"model.target: {cfg.model.target} is not a LightningModule; use a training module such "
                          "as ldm.training.latent_diffusion.LatentDiffusionModule")
    if hasattr(model, "run_config"):
        model.run_config = to_plain(cfg)

    if _is_global_zero():
        text = OmegaConf.to_yaml(cfg)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    log.info("run folder %s%s", run_dir, f", resuming from {ckpt}" if ckpt else "")
    if logger is not False:
        log_dir = Path(getattr(logger, "log_dir", None) or logger.save_dir)
        where = f"tensorboard --logdir {log_dir}" if type(logger).__name__ == "TensorBoardLogger" else str(log_dir)
        log.info("loss curves%s: %s; sample grids: %s", " and sample grids" if "tensorboard" in where else "",
                 where, run_dir / "images")
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    return 0


def build_trainer(cfg: DictConfig, run_dir: Path, logger: Any, callbacks: list, enable_checkpointing: bool):
    """The ``pytorch_lightning.Trainer`` of ``lightning.trainer`` (built before the model, so that a value only
    Lightning can judge fails before the model's minutes of setup); its errors name the section's keys."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from ldm.training.callbacks import AtomicCheckpointIO

    settings = to_plain(cfg.lightning.trainer)
    if settings.get("strategy") == "fsdp":
        from ldm.training.fsdp import make_strategy

        settings["strategy"] = make_strategy()
    try:
        return pl.Trainer(default_root_dir=str(run_dir), logger=logger, callbacks=callbacks,
                          plugins=[AtomicCheckpointIO()], enable_checkpointing=enable_checkpointing, **settings)
    except (MisconfigurationException, ValueError, TypeError) as e:
        named = [k for k in settings if k in str(e)]  # the key, else the one value the message quotes
        named = named if len(named) == 1 else [k for k, v in settings.items() if repr(v) in str(e)]
        where = (f"lightning.trainer.{named[0]}" if len(named) == 1 else
                 f"lightning.trainer ({', '.join(f'{k}={v!r}' for k, v in settings.items())})")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: not accepted by pytorch_lightning.Trainer: {reason}") from e


def _export_only(run_dir: Path, ckpt: Path | None, cfg: DictConfig) -> int:
    """Write the export from a checkpoint with the settings of the run's export callback (name, folder, EMA, fp16),
    as the end of training would."""
    from ldm.training.callbacks import ExportCallback, export_from_checkpoint

    if ckpt is None:
        raise CheckpointError("--export-only needs a checkpoint: pass --resume RUN_DIR or --resume FILE.ckpt")
    node = callback_nodes(cfg, run_dir, run_dir.name).get("export")
    own = node is not None and node["target"] == CALLBACK_TARGETS["export"]
    cb = instantiate_from_config(node, "lightning.callbacks.export") if own else ExportCallback(name=run_dir.name)
    out = Path(cb.dirpath or run_dir) / f"{cb.name}.safetensors"
    export_from_checkpoint(ckpt, out, use_ema=cb.use_ema, include_ema=cb.include_ema, fp16=cb.fp16)
    log.info("exported %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
