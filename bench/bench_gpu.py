"""The GPU levers: SD1.5 UNet forward (a CFG step's batch) in each configuration, against diffusers' UNet with
the same weights, with utilization of the measured matmul peak. For the machine lent by the ``device`` tool
(bench/gpu.sh runs it there); on a CPU it runs the configurations that do not need CUDA (a smoke test).

    python bench/bench_gpu.py --device cuda --precisions fp16 bf16 --compile --out bench/results/gpu_levers.md

Configurations (each a row; one that fails is reported as failed and the rest go on):

- ``diffusers``: diffusers' UNet2DConditionModel, weights in the precision (``.to(dtype)``, how diffusers is
  used on GPUs), torch's SDPA (the peer every ratio is against); ``diffusers compiled``: the same under
  ``torch.compile`` (with ``--compile``).
- ``ours``: our UNet as ``ldm.pipeline.Text2Image`` runs it: conv/linear weights stored in the precision
  (``ldm.accel.store_weights_in_``), autocast, channels-last, attention ``auto`` (xformers when it imports, else SDPA).
- ``ours, attention <backend>``: the same with attention forced to SDPA with only the flash / memory-efficient /
  math kernel allowed (``torch.nn.attention.sdpa_kernel``), or xformers.
- ``ours, NCHW``: the same without channels-last.
- ``ours, CUDA graph``: the eager forward captured once in a CUDA graph and replayed (static inputs).
- ``ours compiled`` / ``ours compiled, CUDA graphs``: ``torch.compile`` (default mode / "reduce-overhead",
  which replays CUDA graphs), with ``--compile``.

Times are medians of interleaved rounds of ``--inner`` calls each, per call; "vs diffusers" = diffusers' eager
time / the row's time; util = counted FLOPs / time / dense matmul peak in the same precision (8192^3 on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from typing import Callable

import torch

import common
from bench_unet import build_pair, call, count_flops, inputs

logger = logging.getLogger("bench.gpu")


def _sdpa_only(kernel: str) -> Callable[[], contextlib.AbstractContextManager]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[kernel]
    return lambda: sdpa_kernel([backend])


def _prepare_ours(unet: torch.nn.Module, dtype: torch.dtype, *, attention: str = "auto",
                  channels_last: bool = True) -> torch.nn.Module:
    import ldm.accel
    from ldm.models.attention import set_attention_backend

    unet = ldm.accel.optimize(copy.deepcopy(unet))  # for the device its weights are on, as the pipeline does
    if dtype != torch.float32:
        ldm.accel.store_weights_in_(unet, dtype)
    set_attention_backend(unet, attention)
    unet.channels_last = channels_last
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return unet.requires_grad_(False).eval()


def _runner(model: torch.nn.Module, x, t, ctx, precision: str, inner: int,
            context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            autocast: bool = True) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad(), context(), common.autocast(precision if autocast else "fp32", x.device):
            for _ in range(inner):
                out = call(model, x, t, ctx)
        return out
    return run


def _cuda_graph(model: torch.nn.Module, x, t, ctx, precision: str, inner: int) -> Callable[[], torch.Tensor]:
    """Capture one eager forward in a CUDA graph (after warm-up calls on a side stream); replay ``inner`` times."""
    static = [x.clone(), t.clone(), ctx.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), common.autocast(precision, x.device):
        for _ in range(3):
            call(model, *static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # autocast's cast cache must not hold tensors made during capture
    with torch.no_grad(), torch.autocast("cuda", dtype=common.DTYPES[precision], enabled=precision != "fp32",
                                         cache_enabled=False), torch.cuda.graph(graph):
        out = call(model, *static)

    def run() -> torch.Tensor:
        for _ in range(inner):
            graph.replay()
        return out
    return run


def candidates(ours0, theirs0, x, t, ctx, precision: str, args) -> dict[str, Callable[[], Callable]]:
    """Name -> a builder of the timed callable (built lazily, so one failing build fails only its row)."""
    dtype, cuda, inner = common.DTYPES[precision], args.device.type == "cuda", args.inner
    theirs = copy.deepcopy(theirs0).to(dtype).requires_grad_(False).eval()
    ours = _prepare_ours(ours0, dtype)
    xd, ctxd = x.to(dtype), ctx.to(dtype)  # diffusers' pipelines hand its UNet inputs in its own dtype
    out: dict[str, Callable[[], Callable]] = {
        "diffusers": lambda: _runner(theirs, xd, t, ctxd, precision, inner, autocast=False),
        "ours": lambda: _runner(ours, x, t, ctx, precision, inner),
    }
    if cuda:
        for kernel in ("flash", "efficient", "math"):
            out[f"ours, attention sdpa {kernel} only"] = (
                lambda k=kernel: _runner(_prepare_ours(ours0, dtype, attention="sdpa"), x, t, ctx, precision,
                                         inner, context=_sdpa_only(k)))
        out["ours, attention xformers"] = lambda: _runner(_prepare_ours(ours0, dtype, attention="xformers"),
                                                          x, t, ctx, precision, inner)
    out["ours, NCHW"] = lambda: _runner(_prepare_ours(ours0, dtype, channels_last=False), x, t, ctx, precision,
                                        inner)
    if cuda:
        out["ours, CUDA graph"] = lambda: _cuda_graph(ours, x, t, ctx, precision, inner)
    if args.compile:
        out["diffusers compiled"] = lambda: _runner(torch.compile(theirs), xd, t, ctxd, precision, inner,
                                                    autocast=False)
        out["ours compiled"] = lambda: _runner(torch.compile(_prepare_ours(ours0, dtype)), x, t, ctx, precision,
                                               inner)
        if cuda:
            out["ours compiled, CUDA graphs"] = lambda: _runner(
                torch.compile(_prepare_ours(ours0, dtype), mode="reduce-overhead"), x, t, ctx, precision, inner)
    return out


def bench_precision(ours0, theirs0, x, t, ctx, flops: float, precision: str, args) -> list[list]:
    sync = common.synchronizer(args.device)
    built: dict[str, Callable] = {}
    outputs: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}
    for name, build in candidates(ours0, theirs0, x, t, ctx, precision, args).items():
        try:
            fn = build()
            outputs[name] = fn().float()  # also the first warm-up (compiles, captures)
            sync()
            built[name] = fn
        except Exception as e:  # report the configuration as failed, keep measuring the others
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            logger.warning("%s %s failed: %s", name, precision, failed[name])
    rates: list[float] = []
    timed = dict(built)
    timed["matmul peak"] = lambda: rates.append(common.matmul_peak_gflops(precision, reps=3, device=args.device))
    times = common.interleaved(timed, args.reps, warmup=1, sync=sync)
    peak = common.median(rates)
    base = common.median(times["diffusers"]) / args.inner if "diffusers" in built else None
    ref = outputs.get("diffusers")
    rows = []
    for name in list(built) + list(failed):
        if name in failed:
            rows.append([name, precision, f"failed: {failed[name]}", "", "", ""])
            continue
        sec = common.median(times[name]) / args.inner
        diff = (outputs[name] - ref).abs().max().item() if ref is not None else float("nan")
        rows.append([name, precision, f"{sec * 1e3:.2f}", f"{base / sec:.2f}x" if base else "",
                     f"{100 * flops / sec / 1e9 / peak:.0f}%", f"{diff:.2g}"])
        logger.info("%s", rows[-1])
    rows.append([f"matmul peak {'8192' if args.device.type == 'cuda' else '2048'}^3", precision,
                 f"{peak / 1e3:.1f} TFLOP/s", "", "", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=common.device_arg, default=torch.device("cuda")
                        if torch.cuda.is_available() else torch.device("cpu"))
    parser.add_argument("--precisions", nargs="+", choices=common.PRECISIONS, default=["fp16", "bf16"])
    parser.add_argument("--width", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step of one image")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows (minutes each)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--inner", type=int, default=None, help="calls per round (default: 20 on a GPU, 1 else)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(common.RESULTS / "gpu_levers.md"))
    args = parser.parse_args()
    threads = common.setup(args.threads)
    common.check_precisions(args.precisions, args.device)
    args.inner = common.inner_calls(args.inner, args.device, cuda_default=20)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ours0, theirs0, _ = build_pair(args.width, args.device)
    x, t, ctx = inputs(args.batch, args.latent, device=args.device)
    flops = count_flops(ours0, x, t, ctx)
    logger.info("%.1f GFLOP per forward", flops / 1e9)
    rows = [row for precision in args.precisions
            for row in bench_precision(ours0, theirs0, x, t, ctx, flops, precision, args)]
    label = "SD1.5" if args.width == 320 else f"SD1 w{args.width}"
    headers = ["configuration", "precision", "ms per forward", "vs diffusers", "util", "max abs diff vs diffusers"]
    notes = [f"{label} UNet forward, latents {args.latent}x{args.latent}, batch {args.batch}, 77 context tokens, "
             f"random weights; {flops / 1e9:.0f} GFLOP counted by torch.utils.flop_counter",
             f"medians of {args.reps} interleaved rounds of {args.inner} calls after a warm-up round; the first call "
             "of each configuration (compilation, graph capture) is not timed",
             "vs diffusers = diffusers' eager time / this row's time; util = FLOPs / time / the matmul peak row",
             "diffusers runs with its weights in the precision (no autocast), ours with conv/linear weights in the "
             "precision under autocast (norms in fp32), as Text2Image runs it"]
    common.write_report(args.out, "GPU levers: SD1.5 UNet forward configurations vs diffusers",
                        common.machine_info(threads, "/".join(args.precisions), args.device),
                        common.markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
