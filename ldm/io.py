"""Weights I/O that knows no model: read and write ``.safetensors`` / ``.ckpt`` files safely.

- The format is decided from the file's first bytes, never its name.
- ``.safetensors`` files are read by the ``safetensors`` library (every check of the format: offsets, byte counts,
  dtypes), lazily when asked: one tensor at a time.
- ``.ckpt`` (pickle) files are read with ``torch.load(weights_only=True)`` only: a pickle that tries to run code
  is refused and nothing of it runs.
- :func:`check_state_dict` is the one strict check every loader runs: anything missing, unexpected or of the wrong
  shape is listed in one line.
- Files are written atomically (temporary file + rename), safetensors by default, with the config stored as plain
  JSON metadata. A stored config is data: :mod:`ldm.convert` builds it only from the project's own classes.

The models may import this module; layouts, architecture inference and model building live in :mod:`ldm.convert`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ldm.config import to_plain

__all__ = [
    "CheckpointError",
    "LazyTensor",
    "atomic_write",
    "check_state_dict",
    "detect_format",
    "materialize",
    "model_hash",
    "read_state_dict",
    "read_training_checkpoint",
    "remove_stale_temp_files",
    "save_checkpoint",
]


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


class _SafetensorsReader:
    """A safetensors file opened by the ``safetensors`` library (which checks the header when it opens it).

    Tensors are copied out of the library's memory map; the map is reopened after every :attr:`WINDOW` bytes
    read, so the pages it has touched are let go and reading a whole file tensor by tensor never keeps more
    than one window of it in memory beside the copies.
    """

    WINDOW = 64 << 20

    def __init__(self, path: Path, handle: Any):
        self.path, self._handle, self._read = path, handle, 0
        self._identity = _identity(path)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._read > self.WINDOW:
            self._handle, self._read = None, 0  # unmapped before the next one maps
            if _identity(self.path) != self._identity:
                raise CheckpointError(f"{self.path} was replaced while it was being read; load it again")
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            tensor = self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key} ({_first_line(e)}); "
                                  "re-download or re-export the file") from e
        self._read += tensor.numel() * tensor.element_size()
        return tensor


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class LazyTensor:
    """One tensor of a safetensors file: its shape now, its values on :meth:`load` (see
    :class:`_SafetensorsReader`: loading a model tensor by tensor never holds a second copy of the weights)."""

    __slots__ = ("key", "shape", "_reader")

    def __init__(self, reader: _SafetensorsReader, key: str, shape: list[int]):
        self.key, self.shape, self._reader = key, torch.Size(shape), reader

    def load(self) -> torch.Tensor:
        return self._reader.get(self.key)


def materialize(value: torch.Tensor | LazyTensor) -> torch.Tensor:
    return value.load() if isinstance(value, LazyTensor) else value


def _read_safetensors(path: Path, lazy: bool) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = dict(handle.metadata() or {})
        if lazy:
            reader = _SafetensorsReader(path, handle)
            return {k: LazyTensor(reader, k, handle.get_slice(k).get_shape()) for k in handle.keys()}, meta
        with handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, meta
    except Exception as e:  # SafetensorError: bad header, offsets, byte counts, truncation
        raise CheckpointError(f"{path} is a corrupt or truncated safetensors file ({_first_line(e)}); "
                              "re-download or re-export it") from e


def read_state_dict(path: str | os.PathLike, *, lazy: bool = False, nested: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint's tensors (``state_dict`` level unwrapped) and its string metadata.

    ``nested``: a pickle may hold nested dicts and non-tensor values (an A1111 textual-inversion ``.pt``:
    ``{"string_to_param": {"*": tensor}, "name": ..., "step": ...}``); its tensors come back under dotted names
    (``string_to_param.*``) and everything else is left out.

    With ``lazy`` a safetensors file's values are :class:`LazyTensor` s, read one at a time when loaded (so a
    model loads with the memory of one tensor beside it, not of a second copy of the weights), and a torch zip
    file is memory-mapped. A ``.ckpt``'s ``ldm_config`` becomes ``meta["config"]`` (JSON), as in safetensors.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        return _read_safetensors(path, lazy)
    obj = _torch_load(path, mmap=lazy and fmt == "zip" and path.suffix != ".safetensors")
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        for k in ("global_step", "epoch"):
            if k in obj:
                meta[k] = str(obj[k])
        if isinstance(obj.get("ldm_config"), Mapping):
            meta["config"] = json.dumps(obj["ldm_config"])
        obj = obj["state_dict"]
    if nested and isinstance(obj, Mapping):
        obj = _flat_tensors(obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; is it a model checkpoint?")
    return dict(obj), meta


def _flat_tensors(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of nested mappings under dotted names; other values are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, Mapping):
            out.update(_flat_tensors(value, f"{prefix}{key}."))
    return out


def _torch_load(path: Path, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` of a torch file (memory-mapped with ``mmap``: a zip file's tensors are
    not read); a refused pickle or a corrupt file is a one-line CheckpointError."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            if mmap:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            # a file object, not the name: torch.load must not pick a reader from the file's extension
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        msg, full = _first_line(e), str(e).lower()
        if any(s in full for s in ("weights only", "weights_only", "unsupported global", "unpickl")):
            raise CheckpointError(
                f"refusing to load {path}: the pickle asks to run code or build objects that are not plain tensors "
                f"({msg[:200]}); convert it to .safetensors from a trusted source") from e
        raise CheckpointError(f"{path} is a corrupt or truncated checkpoint ({msg[:200]})") from e


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training (Lightning) checkpoint, read weights-only and memory-mapped where it is a zip file, so that
    checking one costs little; a CheckpointError unless it is a readable mapping with ``state_dict`` and
    ``global_step``."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        raise CheckpointError(f"{path} is a safetensors file, not a training checkpoint; resume from a .ckpt "
                              "in the run's checkpoints/ folder (or start from it with --init)")
    obj = _torch_load(path, mmap=fmt == "zip")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping) or "global_step" not in obj:
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict and global_step); "
                              "resume from a .ckpt in the run's checkpoints/ folder")
    return dict(obj)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# the one strict check
# ---------------------------------------------------------------------------------------------------------

def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"


def check_state_dict(model_sd: Mapping[str, Any], ckpt_sd: Mapping[str, Any], source: str = "checkpoint", *,
                     target: str = "the model",
                     fix: str = "pass the matching --config (or strict=False to load what fits)") -> None:
    """Raise CheckpointError unless ``ckpt_sd`` has exactly ``model_sd``'s names and shapes.

    The one line lists the missing, unexpected and mis-shaped keys (first three of each, with counts) and ends
    with ``fix``. Values may be tensors or :class:`LazyTensor` s (only shapes are read).
    """
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shapes = [f"{k} {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
              for k in model_sd if k in ckpt_sd and tuple(ckpt_sd[k].shape) != tuple(model_sd[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(items)} {label} ({_listed(items)})"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
             if items]
    raise CheckpointError(f"{source} does not fit {target}: {'; '.join(parts)}; {fix}")


# ---------------------------------------------------------------------------------------------------------
# writing and hashing
# ---------------------------------------------------------------------------------------------------------

def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], Any]) -> None:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name says which process writes it, so that remove_stale_temp_files can tell an orphan
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# atomic_write's temporary files: ".<name>.<host>-<pid>.<8 random chars>.tmp" (before the writer was named in
# them: ".<name>.<8 random chars>.tmp")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[A-Za-z0-9-]*?)-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40]


def _writer() -> str:
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # no permission to signal it: it exists
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, min_age_s: float = 900.0) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls left in ``folder`` (a crash or
    ``kill -9`` in the middle of writing a checkpoint) and return their paths.

    Only files named as the writer names them, and only those no process can still be writing: written by a
    process of this host that is gone, or (another host's, on a shared file system, or of an older version that
    named no process) not modified for ``min_age_s`` seconds.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now, host = [], time.time(), _host()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            if match["pid"] is not None and match["host"] == host:
                stale = not _alive(int(match["pid"]))
            else:
                stale = now - path.stat().st_mtime > min_age_s
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return removed


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, config: Any = None,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an SD-layout state dict. ``.safetensors`` unless the name ends in ``.ckpt``/``.pt``/``.pth``.

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


def cache_root() -> Path:
    """The project's cache folder: ``$XDG_CACHE_HOME/ldm``, else ``~/.cache/ldm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldm"


HASH_CACHE_ENTRIES = 2000  # files remembered in the hash cache (the most recently hashed)


def _hash_key(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path.resolve()), [stat.st_size, stat.st_mtime_ns]


def _hash_entries() -> dict:
    try:
        entries = json.loads((cache_root() / "hashes.json").read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The file's sha256 if :func:`file_sha256` remembers it for the file as it is now (same size and time), else
    None; never reads the file (what a model list shows without hashing every checkpoint it lists)."""
    key, stamp = _hash_key(Path(path))
    hit = _hash_entries().get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), remembered in ``cache_root()/hashes.json`` by resolved path, size and modification
    time, as the web UIs keep theirs: a 2-7 GB checkpoint is read once, not on every run that names it. A file changed
    in place gets a new time and is hashed again; a cache that cannot be read or written is only skipped."""
    path = Path(path)
    hit = cached_sha256(path)
    if hit is not None:
        return hit
    key, stamp = _hash_key(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    entries = _hash_entries()
    entries.pop(key, None)
    entries[key] = {"stamp": stamp, "sha256": digest.hexdigest()}  # last: the newest
    kept = {k: v for k, v in list(entries.items())[-HASH_CACHE_ENTRIES:] if os.path.exists(k)}
    try:
        atomic_write(cache_root() / "hashes.json", lambda tmp: Path(tmp).write_text(json.dumps(kept)))
    except OSError:
        pass
    return digest.hexdigest()


def model_hash(path: str | os.PathLike, length: int = 10) -> str:
    """The first ``length`` hex digits of the file's sha256 (the UIs' "Model hash"; cached, see
    :func:`file_sha256`)."""
    return file_sha256(path)[:length]
