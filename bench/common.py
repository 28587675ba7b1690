"""Shared helpers of the benchmark scripts: machine facts, interleaved A/B timing, markdown reports.

The scripts in bench/ are run by hand (``python bench/<name>.py --help``); they are not tests.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

logger = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 on CUDA only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The SD v1.x UNet (v1-inference.yaml); "model_channels" is what the reduced-width sizes change.
SD_V1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)


def setup(threads: int | None) -> int:
    """Logging to stderr and the torch thread count (None: keep torch's default); returns the thread count."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if sys.path[0] != str(REPO):
        sys.path.insert(0, str(REPO))
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def device_arg(text: str) -> torch.device:
    """``--device``: "cpu", "cuda" or "cuda:N"; CUDA only where torch sees a GPU (one-line error otherwise)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise SystemExit(f"--device {text!r} is not a device name ({e}): use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: torch sees no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {text}: the benchmarks run on cpu or cuda")
    return device


def check_precisions(precisions: Sequence[str], device: torch.device) -> None:
    """fp16 autocast is a GPU precision (CPUs have no fast fp16 matmul)."""
    if "fp16" in precisions and device.type != "cuda":
        raise SystemExit("--precisions fp16 needs --device cuda; on a CPU use fp32 or bf16")


def inner_calls(inner: int | None, device: torch.device, cuda_default: int) -> int:
    """``--inner``: calls per timed round, at least 1; by default ``cuda_default`` on a GPU (where one call is too
    short to time alone) and 1 elsewhere."""
    if inner is not None and inner < 1:
        raise SystemExit(f"--inner must be at least 1, got {inner}")
    return inner or (cuda_default if device.type == "cuda" else 1)


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on ``device``'s type; nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision], enabled=precision != "fp32")


@contextlib.contextmanager
def without_fused_attention() -> Iterator[None]:
    """Our attention on its Python paths (the blocked kernel in Python blocks, sdpa with several threads) instead of
    the compiled fused kernel of ``ldm.accel.cpu_kernels``, for the ``--without fused-attention`` rows."""
    from ldm.accel import attention

    old, attention.USE_CPU_KERNELS = attention.USE_CPU_KERNELS, False
    try:
        yield
    finally:
        attention.USE_CPU_KERNELS = old


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What makes a wall-clock reading include the device's queued work: cuda.synchronize, or nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a virtual machine may say only "AMD EPYC", which
    names two generations that differ 2x in bf16 speed: family 25 is Zen 3/4, family 26 Zen 5)."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            family = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
            return fields["model name"] + family
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_kib_as_gb(path: str, key: str) -> float | None:
    """The ``key:`` line of a /proc file (a size in KiB) in GiB; None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def mem_available_gb() -> float:
    """MemAvailable from /proc/meminfo in GiB (inf where unknown)."""
    gb = _proc_kib_as_gb("/proc/meminfo", "MemAvailable")
    return float("inf") if gb is None else gb


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB.

    VmHWM of /proc/self/status where there is one: unlike getrusage's ru_maxrss, which a child inherits from
    the parent that forked it, it starts afresh in every exec'd process.
    """
    gb = _proc_kib_as_gb("/proc/self/status", "VmHWM")
    if gb is not None:
        return gb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def machine_info(threads: int, precision: str, device: str | torch.device = "cpu") -> dict[str, str]:
    device = torch.device(device)
    info = {
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "threads": str(threads),
        "precision": precision,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    if device.type == "cuda":
        info["GPU"] = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        info["threads"] += " (CPU side)"
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


@contextlib.contextmanager
def timer(out: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    out.append(time.perf_counter() - start)


def interleaved(candidates: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of each candidate, run in turn A B A B ... ``reps`` times after ``warmup`` rounds.

    Interleaving spreads the machine's noise (other processes on a shared CPU) evenly over the candidates, so
    their ratio is meaningful even when the absolute times are not. ``sync`` (``synchronizer(device)``) runs
    before the clock starts and before it stops, so a GPU's queued work is timed too.
    """
    sync = sync or (lambda: None)
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + reps):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
            logger.info("%s round %d: %.3f s", name, round_ - warmup, elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | os.PathLike, title: str, info: Mapping[str, str], table: str,
                 notes: Sequence[str] = ()) -> Path:
    """A markdown file: title, the machine facts, the exact command, the table and notes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = "\n".join(f"- {k}: {v}" for k, v in info.items())
    body = [f"# {title}", "", facts, f"- command: `{command_line()}`", "", table, ""]
    body += [f"- {n}" for n in notes]
    path.write_text("\n".join(body).rstrip() + "\n")
    logger.info("wrote %s", path)
    return path


def matmul_peak_gflops(precision: str, n: int | None = None, reps: int = 5,
                       device: str | torch.device = "cpu") -> float:
    """Best dense n x n x n matmul rate (GFLOP/s) in this precision, on this process's threads or on the GPU
    (n: 2048 on a CPU, 8192 on a GPU, where one product is timed as the mean of 10). On a CPU in fp32 the best
    of torch.mm (the BLAS) and oneDNN's matmul, which our fp32 linear layers use (``ldm.accel.onednn``)."""
    device = torch.device(device)
    dtype, sync = DTYPES[precision], synchronizer(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    inner = 10 if device.type == "cuda" else 1
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    products = [torch.mm]
    if device.type == "cpu" and dtype == torch.float32:
        from ldm.accel import onednn

        if onednn.linear_available():
            products.append(onednn.linear)  # x @ y.T: the same work
    best = float("inf")
    for product in products:
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up (oneDNN / BLAS / cuBLAS set-up, clocks)
            product(a, b)
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                product(a, b)
            sync()
            best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best / 1e9


def peak_memory_gb(device: str | torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else the peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output convs would make the work trivially sparse)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module
