"""Build the full model from a config and load a checkpoint into it, strictly."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigError, check_config, instantiate_from_config, load_config, to_plain
from ldm.convert.architecture import infer_config
from ldm.convert.layouts import normalize_state_dict, text_encoder_state_dict
from ldm.io import check_state_dict, materialize, read_state_dict

__all__ = ["build_model", "load_model", "load_weights", "load_text_encoder_weights"]

log = logging.getLogger(__name__)

_PLAIN_TARGET = "ldm.model.LatentDiffusion"


def _model_node(config: Any) -> Any:
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(to_plain(config))
    node = cfg.model if "model" in cfg else cfg
    if "target" not in node:
        raise ConfigError("config has no model.target; pass a model config like configs/sd/v1-inference.yaml")
    return node


def build_model(config: Any, *, inference: bool = True) -> torch.nn.Module:
    """Instantiate the config's model. With ``inference`` a training target is built as its plain
    ``LatentDiffusion`` (same names, no optimizer/EMA/loss settings)."""
    node = _model_node(config)
    if inference and str(node.target) != _PLAIN_TARGET:
        from ldm.model import LatentDiffusion

        accepted = set(inspect.signature(LatentDiffusion.__init__).parameters)
        params = {k: v for k, v in (node.get("params") or {}).items() if k in accepted}
        node = OmegaConf.create({"target": _PLAIN_TARGET, "params": to_plain(params)})
    check_config(node, "model")
    return instantiate_from_config(node, "model")


def load_model(config: Any, ckpt: str | os.PathLike | None, *, use_ema: bool | None = None, strict: bool = True,
               parameterization: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the full model from ``config`` (a path, a DictConfig or None = infer from the file) and load
    ``ckpt`` strictly. ``use_ema`` None follows the config's ``use_ema``; the result is in eval mode.

    A config stored in ``ckpt`` is data: only the project's own model classes are built from it.
    """
    if ckpt is None and config is None:
        raise ConfigError("nothing to load: pass a checkpoint (--ckpt) or a config")
    sd, meta = read_state_dict(ckpt, lazy=True) if ckpt is not None else ({}, {})
    if config is None:
        config = infer_config(sd, meta, parameterization, source=str(ckpt))
    elif isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif not isinstance(config, DictConfig):
        config = OmegaConf.create(to_plain(config))
    if parameterization is not None:
        config.model.params.parameterization = parameterization
    with _random_init_skipped() if ckpt is not None and strict else contextlib.nullcontext():
        model = build_model(config)  # a strict load overwrites every parameter: their random values are not drawn
    if use_ema is None:
        use_ema = bool(_model_node(config).get("params", {}).get("use_ema", False))
    if ckpt is not None:
        load_weights(model, sd, use_ema=use_ema, strict=strict, source=str(ckpt))
    model.eval()
    model.requires_grad_(False)
    model.config = OmegaConf.to_container(config, resolve=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


# the random initialisers of torch.nn.init (what nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention and the
# text tower call); zeros_, ones_ and constant_ cost nothing and stay
_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _random_init_skipped() -> Iterator[None]:
    """Modules built inside keep their parameters' memory as allocated instead of drawing random values, for a
    model whose every parameter a strict load overwrites next (check_state_dict refuses a file that leaves one
    out). Drawing them took ~40% of building the demo model and seconds for SD's 1B parameters. The initialisers
    are swapped in ``torch.nn.init`` for the block, so another thread building modules meanwhile would skip them
    too (serve.py loads in its worker thread, beside which nothing builds modules)."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, use_ema: bool = False,
                 strict: bool = True, source: str = "checkpoint") -> None:
    """Load an SD-layout state dict into ``model`` (names normalised, dtypes cast to the model's)."""
    has_ema = hasattr(model, "model_ema") and model.model_ema is not None
    sd = normalize_state_dict(sd, use_ema=use_ema, has_ema_module=has_ema)
    model_sd = model.state_dict()
    if strict:
        check_state_dict(model_sd, sd, source)
    else:
        fits = {k: v for k, v in sd.items() if k in model_sd and tuple(v.shape) == tuple(model_sd[k].shape)}
        skipped = len(sd) - len(fits)
        absent = len([k for k in model_sd if k not in fits])
        if skipped or absent:
            log.warning("non-strict load of %s: %d tensors skipped, %d model tensors left as initialised",
                        source, skipped, absent)
        sd = fits
    # tensor by tensor into the existing parameters: a lazily read file never holds a second copy of the weights,
    # and the parameters keep their dtype and memory format (e.g. channels_last convs)
    with torch.no_grad():
        for k in list(sd):
            model_sd[k].copy_(materialize(sd.pop(k)))


def load_text_encoder_weights(encoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a text-encoder file in any layout (this encoder's, open_clip CLIP's or transformers CLIP's names)
    into an :class:`ldm.models.text_encoder.OpenCLIPTextEncoder`, strictly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text encoder weights not found: {path} (check the path)")
    encoder.load_weights(text_encoder_state_dict(read_state_dict(path)[0]), str(path))
