"""Weights I/O: Stable Diffusion ``.ckpt`` / ``.safetensors`` files in the original layout, read safely.

- The format is decided from the file's first bytes, never its name.
- ``.ckpt`` (pickle) files are read with ``torch.load(weights_only=True)`` only: a pickle that tries to run code
  is refused and nothing of it runs.
- Loading is strict: anything missing, unexpected or of the wrong shape is listed in one error.
- Files are written atomically (temporary file + rename) as safetensors by default, with the config stored as
  plain JSON metadata so that ``load_model(None, path)`` rebuilds the architecture.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import CONFIG_DIR, ConfigError, check_config, instantiate_from_config, load_config, to_plain
from ldm.ema import ema_name

log = logging.getLogger(__name__)

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
_IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "cond_stage_model.transformer.embeddings.position_ids")


class CheckpointError(ValueError):
    """A checkpoint problem: one line that names the file, what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------

def detect_format(path: str | os.PathLike) -> str:
    """'safetensors', 'zip' (torch.save) or 'pickle' (legacy torch.save), from the file's first bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the --ckpt path)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9:  # before the pickle test: a header length of 128 + 256 k also starts with 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= size - 8:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if size < 16:
        raise CheckpointError(f"{path} is empty or truncated ({size} bytes); re-download or re-export it")
    raise CheckpointError(f"{path} is neither a safetensors nor a PyTorch checkpoint (unrecognised first bytes)")


def _safe_globals() -> list:
    """Harmless types that real SD .ckpt files carry besides tensors (numpy scalars in callback states)."""
    allowed = []
    try:
        import numpy as np
        allowed += [np.dtype, np.ndarray]
        try:
            allowed.append(np._core.multiarray.scalar)  # numpy >= 2
        except AttributeError:  # pragma: no cover - numpy 1.x
            allowed.append(np.core.multiarray.scalar)
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    except ImportError:  # pragma: no cover
        pass
    import codecs
    allowed.append(codecs.encode)
    return allowed


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class LazyTensor:
    """One tensor of a safetensors file: its shape now, its values on :meth:`load`.

    Read with plain file reads (not a memory map), so loading a model tensor by tensor never has more than one
    tensor of the file in memory beside the model.
    """

    __slots__ = ("path", "key", "shape", "dtype", "_start", "_end")

    def __init__(self, path: Path, key: str, entry: dict, data_start: int):
        self.path, self.key = path, key
        self.shape = torch.Size(entry["shape"])
        self.dtype = _ST_DTYPES[entry["dtype"]]
        self._start, self._end = data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1]

    def load(self) -> torch.Tensor:
        buf = bytearray(self._end - self._start)
        with open(self.path, "rb") as f:
            f.seek(self._start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path} is truncated (tensor {self.key} is cut off)")
        if not buf:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).reshape(self.shape)


def _lazy_safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    size = path.stat().st_size
    sd = {k: LazyTensor(path, k, e, 8 + n) for k, e in header.items()}
    if any(t._end > size for t in sd.values()):
        raise ValueError("the header points past the end of the file")
    return sd, dict(meta)


def materialize(value: torch.Tensor | LazyTensor) -> torch.Tensor:
    return value.load() if isinstance(value, LazyTensor) else value


def read_state_dict(path: str | os.PathLike, *, lazy: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint's tensors (``state_dict`` level unwrapped) and its string metadata.

    With ``lazy`` a safetensors file's values are :class:`LazyTensor` s, read one at a time when loaded (so a
    model loads with the memory of one tensor beside it, not of a second copy of the weights), and a torch zip
    file is memory-mapped.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open
        try:
            if lazy:
                return _lazy_safetensors(path)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path} is a corrupt or truncated safetensors file ({_first_line(e)})") from e
        return sd, meta
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            if lazy and fmt == "zip" and path.suffix != ".safetensors":
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            else:
                # a file object, not the name: torch.load must not pick a reader from the file's extension
                with open(path, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        msg, full = _first_line(e), str(e).lower()
        if any(s in full for s in ("weights only", "weights_only", "unsupported global", "unpickl")):
            raise CheckpointError(
                f"refusing to load {path}: the pickle asks to run code or build objects that are not plain tensors "
                f"({msg[:200]}); convert it to .safetensors from a trusted source") from e
        raise CheckpointError(f"{path} is a corrupt or truncated checkpoint ({msg[:200]})") from e
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        for k in ("global_step", "epoch"):
            if k in obj:
                meta[k] = str(obj[k])
        if isinstance(obj.get("ldm_config"), Mapping):
            meta["config"] = json.dumps(obj["ldm_config"])
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; is it a model checkpoint?")
    return dict(obj), meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# layout conversion (original file layout -> this project's module names)
# ---------------------------------------------------------------------------------------------------------

def normalize_state_dict(sd: Mapping[str, torch.Tensor], *, use_ema: bool = False,
                         has_ema_module: bool = False) -> dict[str, torch.Tensor]:
    """Map a full SD-layout state dict onto ``LatentDiffusion``'s names.

    - SD1 text encoder keys (transformers naming, with or without ``text_model.``) become the OpenCLIP tower's.
    - ``model_ema.*``: with ``use_ema`` the EMA weights replace ``model.diffusion_model.*``; kept as they are when
      the model has an EMA module (training); otherwise dropped.
    """
    from ldm.models.text_encoder import convert_hf_clip_text_state_dict

    out: dict[str, torch.Tensor] = {}
    sd1_text: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _IGNORED_KEYS:
            continue
        if k.startswith(SD1_TEXT_PREFIX):
            sd1_text[k[len(SD1_TEXT_PREFIX):]] = v
        elif k.startswith(EMA_PREFIX):
            ema[k[len(EMA_PREFIX):]] = v
        else:
            out[k] = v
    if sd1_text:
        sd1_text = {k: materialize(v) for k, v in sd1_text.items()}
        for k, v in convert_hf_clip_text_state_dict(sd1_text).items():
            out["cond_stage_model." + k] = v
    if ema:
        if has_ema_module:
            out.update({EMA_PREFIX + k: v for k, v in ema.items()})
        elif use_ema:
            unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
            missing = []
            for k in unet_keys:
                s_name = ema_name(k[len("model."):])
                if s_name in ema:
                    out[k] = ema[s_name]
                else:
                    missing.append(k)
            if missing:
                raise CheckpointError(f"EMA weights are incomplete ({len(missing)} UNet tensors have none, e.g. "
                                      f"{missing[0]}); load without EMA (--no-ema)")
    elif use_ema and has_ema_module is False:
        log.info("checkpoint has no separate EMA weights; using the weights it has")
    return out


def check_state_dict(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (first few of each, with counts)."""
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shapes = [f"{k} {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
              for k in model_sd if k in ckpt_sd and tuple(ckpt_sd[k].shape) != tuple(model_sd[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}. Pass the matching --config "
                          "(or strict=False to load what fits)")


# ---------------------------------------------------------------------------------------------------------
# architecture inference
# ---------------------------------------------------------------------------------------------------------

def infer_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None,
                 parameterization: str | None = None) -> DictConfig:
    """The config of a checkpoint: its stored JSON config, else SD v1 / v2 from the tensors' shapes."""
    if meta and meta.get("config"):
        try:
            cfg = OmegaConf.create(json.loads(meta["config"]))
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's stored config is not valid JSON ({e})") from e
    else:
        if any(k.startswith(SD1_TEXT_PREFIX) for k in sd):
            name = "v1-inference.yaml"
        elif any(k.startswith(SD2_TEXT_PREFIX) for k in sd):
            name = "v2-inference-v.yaml" if parameterization == "v" else "v2-inference.yaml"
        else:
            raise CheckpointError("cannot tell the architecture from the checkpoint (no text encoder weights and no "
                                  "stored config); pass --config")
        cfg = load_config(CONFIG_DIR / "sd" / name)
        w = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if w is not None and w.shape[1] != cfg.model.params.unet_config.params.in_channels:
            # an inpainting (9-channel) UNet: mask + masked-image latents are concatenated to the input
            cfg.model.params.unet_config.params.in_channels = int(w.shape[1])
            cfg.model.params.conditioning_key = "hybrid"
        log.info("architecture inferred from the checkpoint: configs/sd/%s", name)
    if parameterization is not None:
        cfg.model.params.parameterization = parameterization
    return cfg


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------

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
    if inference:
        from ldm.model import LatentDiffusion
        cls_name = str(node.target)
        if cls_name != "ldm.model.LatentDiffusion":
            import inspect
            accepted = set(inspect.signature(LatentDiffusion.__init__).parameters)
            params = {k: v for k, v in (node.get("params") or {}).items() if k in accepted}
            node = OmegaConf.create({"target": "ldm.model.LatentDiffusion", "params": to_plain(params)})
    check_config(node, "model")
    return instantiate_from_config(node, "model")


def load_model(config: Any, ckpt: str | os.PathLike | None, *, use_ema: bool | None = None, strict: bool = True,
               parameterization: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the full model from ``config`` (a path, a DictConfig or None = infer from the file) and load
    ``ckpt`` strictly. ``use_ema`` None follows the config's ``use_ema``; the result is in eval mode."""
    if ckpt is None and config is None:
        raise ConfigError("nothing to load: pass a checkpoint (--ckpt) or a config")
    sd, meta = read_state_dict(ckpt, lazy=True) if ckpt is not None else ({}, {})
    if config is None:
        config = infer_config(sd, meta, parameterization)
    elif isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif not isinstance(config, DictConfig):
        config = OmegaConf.create(to_plain(config))
    if parameterization is not None:
        config.model.params.parameterization = parameterization
    model = build_model(config)
    if use_ema is None:
        use_ema = bool(_model_node(config).get("params", {}).get("use_ema", False))
    if ckpt is not None:
        load_weights(model, sd, use_ema=use_ema, strict=strict, source=str(ckpt))
    model.eval()
    model.requires_grad_(False)
    model.config = OmegaConf.to_container(config, resolve=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


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


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, config: Any = None,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an SD-layout state dict. ``.safetensors`` unless the name ends in ``.ckpt``/``.pt``.

    ``config`` (plain dict or DictConfig) is stored as JSON so the file loads without --config; ``dtype``
    (e.g. torch.float16) casts floating-point tensors.
    """
    path = Path(path)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if config is not None:
        meta["config"] = json.dumps(to_plain(config))
    if path.suffix in (".ckpt", ".pt", ".pth"):
        obj = {"state_dict": tensors}
        if config is not None:
            obj["ldm_config"] = to_plain(config)
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    else:
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path
