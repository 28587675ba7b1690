"""Optional C++ kernels for the CPU, compiled at first use (``ldm/accel/csrc``), with the Python paths as fallback.

:func:`attention` is a fused attention kernel in bf16 or fp32 on x86 CPUs with AVX-512 BF16, with its own
backward: the scores, softmax and product with v of a block of query rows in one pass through the cache, one OpenMP
parallel region per call (``csrc/attention.cpp`` says how). It computes the numbers of the math kernel (fp32 scores and
softmax; for bf16 the probabilities rounded to bf16 once), as ``ldm.accel.attention``'s ``"blocked"`` kernel does,
which uses it where it can.

Building: the first call compiles ``csrc/attention.cpp`` with the system's C++ compiler (``$CXX``, else ``c++``;
about 2 s) into a cache folder (``$LDM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ldm/kernels``, else
``~/.cache/ldm/kernels``), named by a hash of the source, the compiler (its resolved path, size and time) and the
flags, written atomically; later processes load the file, unless it or its folder belongs to another user or others
may write it (a planted library would run as code). The kernel is a plain C function loaded with
:mod:`ctypes`, so the build needs no torch or Python headers (``torch.utils.cpp_extension`` would compile against
both and needs Python's development headers installed). Without a compiler, on
another CPU, or with ``LDM_CPU_KERNELS=0``, :func:`available` is False and the callers keep their Python paths;
a failed build says so once in the log, with the compiler's first error line.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ldm.io import cache_root

__all__ = ["available", "attention", "build", "fits", "library_path", "reason", "supports_cpu", "trains"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mavx512bf16", "-mfma"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")  # as /proc/cpuinfo names them
MAX_HEAD_DIM = 256

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None  # why there is no kernel, once that is known
_I64x4 = ctypes.c_int64 * 4


def supports_cpu() -> bool:
    """Whether this CPU runs the kernels (x86-64 Linux with AVX-512 and its BF16 instructions)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return all(f in have for f in CPU_FLAGS)


def _cache_dir() -> Path:
    if os.environ.get("LDM_KERNEL_CACHE"):
        return Path(os.environ["LDM_KERNEL_CACHE"])
    return cache_root() / "kernels"


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++") or shutil.which("clang++")


def library_path() -> tuple[str, Path]:
    """The compiler to build with and the library's path in the cache, named by a hash of the source, the compiler
    and the flags; raises ``RuntimeError`` without a compiler."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    real = os.path.realpath(cxx)
    try:  # the compiler by its file (path, size, time): cheaper than asking `--version` in every process
        stat = os.stat(real)
    except OSError as e:
        raise RuntimeError(f"cannot read the compiler {real}: {e}") from e
    compiler = f"{real} {stat.st_size} {stat.st_mtime_ns}"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS]).encode()).hexdigest()[:16]
    return cxx, _cache_dir() / f"ldm_attention-{key}.so"


def _check_private(path: Path) -> None:
    """The process loads the cached library as code: refuse a folder or file that another user owns or may write."""
    st = path.stat()
    if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
        raise RuntimeError(f"refusing to load kernels from {path}: owned by another user or writable by others "
                           f"(set LDM_KERNEL_CACHE to a folder of your own)")


def build(force: bool = False) -> Path:
    """Compile the kernels (or, unless ``force``, find them compiled) and return the library's path; raises
    ``RuntimeError`` with the reason when that cannot be done."""
    cxx, target = library_path()
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create the kernel cache folder {folder}: {e} (set LDM_KERNEL_CACHE)") from e
    _check_private(folder)
    if target.exists() and not force:
        _check_private(target)
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            first = next((ln for ln in lines if "error" in ln), lines[-1]).strip()
            raise RuntimeError(f"{Path(cxx).name} failed on {SOURCE.name}: {first}")
        os.replace(tmp, target)  # atomic: a process beside this one loads the whole file or builds its own
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{Path(cxx).name} took over {e.timeout} s on {SOURCE.name}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("LDM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "LDM_CPU_KERNELS=0"
            return None
        if not supports_cpu():
            _reason = "this CPU has no AVX-512 BF16 (or is not x86-64 Linux)"
            return None
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError) as e:
            _reason = str(e)
            log.warning("the fused CPU attention kernel is not available, using the Python path: %s", e)
            return None
        for fn in (lib.ldm_attention_bf16, lib.ldm_attention_f32):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [_I64x4] * 4 + [
                ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        for fn in (lib.ldm_attention_backward_bf16, lib.ldm_attention_backward_f32):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 6 + [_I64x4] * 8 + [ctypes.c_float, ctypes.c_int]
        _lib = lib
        return _lib


def available() -> bool:
    """Whether the compiled kernels can be used in this process (builds them at the first call)."""
    return _load() is not None


def reason() -> Optional[str]:
    """Why :func:`available` is False (None while it is True or not yet asked)."""
    return _reason


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` takes these tensors: bf16 or fp32 (all three alike) on a CPU, [B, H, N, D] with
    the last dimension contiguous, D up to ``MAX_HEAD_DIM`` (even for bf16), k and v of q's batch or a batch of 1,
    no autograd."""
    if q.dtype not in (torch.bfloat16, torch.float32):
        return False
    if not all(t.device.type == "cpu" and t.dtype == q.dtype and t.dim() == 4 and t.stride(-1) == 1
               for t in (q, k, v)):
        return False
    (b, h, n, d), (bk, hk, m, dk), (bv, hv, mv, dv) = q.shape, k.shape, v.shape
    if d != dk or (d % 2 and q.dtype == torch.bfloat16) or d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return False
    if m != mv or m == 0 or n == 0 or d == 0 or dv == 0 or (hk, hv) != (h, h) or bk != bv or bk not in (1, b):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _strides(t: torch.Tensor, batch: int) -> ctypes.Array:
    s = t.stride()
    return _I64x4(0 if t.shape[0] == 1 and batch > 1 else s[0], s[1], s[2], 1)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lse: Optional[torch.Tensor] = None,
             out32: Optional[torch.Tensor] = None) -> torch.Tensor:
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    out = torch.empty(b, n, h, dv, dtype=q.dtype).transpose(1, 2)
    fn = _lib.ldm_attention_bf16 if q.dtype == torch.bfloat16 else _lib.ldm_attention_f32
    with torch.profiler.record_function("ldm::fused_attention"):  # a name in torch.profiler's tables
        rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, m, d, dv, _strides(q, b),
                _strides(k, b), _strides(v, b), _strides(out, b), scale, torch.get_num_threads(),
                None if lse is None else lse.data_ptr(), None if out32 is None else out32.data_ptr())
    if rc != 0:
        raise MemoryError("the fused CPU attention kernel could not allocate its buffers")
    return out


class _Attention(torch.autograd.Function):
    """Attention on the fused kernel with its backward (flash-attention style: the forward keeps each row's
    log-sum-exp and the output in fp32, not the probabilities; the backward recomputes them block by block)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, n, _ = q.shape
        lse = torch.empty(b, h, n, dtype=torch.float32)
        if q.dtype == torch.float32:
            out = out32 = _forward(q, k, v, scale, lse)
        else:  # the output before its rounding, for the backward's rowsum(dO o O)
            out32 = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32)
            out = _forward(q, k, v, scale, lse, out32)
        ctx.save_for_backward(q, k, v, out32, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out32, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        m, dv = k.shape[2], v.shape[3]
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq = torch.empty(b, n, h, d, dtype=q.dtype).transpose(1, 2)
        dk = torch.empty(b, m, h, d, dtype=q.dtype).transpose(1, 2)
        dvv = torch.empty(b, m, h, dv, dtype=q.dtype).transpose(1, 2)
        with torch.profiler.record_function("ldm::fused_attention_backward"):
            fn = _lib.ldm_attention_backward_bf16 if q.dtype == torch.bfloat16 else _lib.ldm_attention_backward_f32
            rc = fn(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out32.data_ptr(), dout.data_ptr(), lse.data_ptr(), dq.data_ptr(),
                dk.data_ptr(), dvv.data_ptr(), b, h, n, m, d, dv,
                *(_strides(t, b) for t in (q, k, v, out32, dout, dq, dk, dvv)), ctx.scale, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the fused CPU attention kernel could not allocate its buffers")
        return dq, dk, dvv, None


def trains(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` takes these tensors with autograd: everything :func:`fits` asks but the autograd
    condition, an even value dim for bf16, k and v of q's full batch."""
    with torch.no_grad():
        if not fits(q, k, v):
            return False
    return (q.dtype != torch.bfloat16 or v.shape[-1] % 2 == 0) and k.shape[0] == q.shape[0] and all(
        t.stride(0) != 0 or t.shape[0] == 1 for t in (k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v for ``q`` [B, H, N, D], ``k`` [B or 1, H, M, D], ``v`` [B or 1, H, M, Dv], all
    bf16 or all fp32 (``scale`` defaults to D ** -0.5), computed as the math kernel computes it: fp32 scores and
    softmax, for bf16 the probabilities rounded to bf16 once, products accumulated in fp32. Returns [B, H, N, Dv] in
    q's dtype, a view of a [B, N, H, Dv] tensor (so merging the heads back is free). With autograd on and an input
    that requires grad, tensors that :func:`trains` accepts get a backward (the same kernel's). Raises
    ``RuntimeError`` when the kernel is not :func:`available` or the tensors do not fit."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the fused CPU attention kernel is not available: {_reason}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and trains(q, k, v):
        return _Attention.apply(q, k, v, scale)
    if not fits(q, k, v):
        raise RuntimeError(f"the fused CPU attention kernel takes bf16 or fp32 CPU tensors [B, H, N, D] (D <= "
                           f"{MAX_HEAD_DIM}, even for bf16) with a contiguous last dimension (with autograd: k and v "
                           f"of the full batch, bf16 value dims even); got {tuple(q.shape)}, {tuple(k.shape)}, "
                           f"{tuple(v.shape)} {q.dtype}")
    return _forward(q, k, v, scale)
