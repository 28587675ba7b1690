"""SDXL UNet forward: ours (after ``ldm.accel.optimize``, as the pipeline runs it) vs diffusers'
UNet2DConditionModel holding the same weights (converted with diffusers' own single-file functions), with SDXL's
inputs: crossattn [B, 77, 2048] and the vector input (ours: ``y`` [B, 2816]; diffusers: ``text_embeds`` [B, 1280]
and ``time_ids`` [B, 6], which it embeds itself; both get the same numbers).

Sizes are ``d<depths>@<latent>``: SDXL base (model_channels 320, channel_mult [1, 2, 4], context 2048,
adm 2816) with the transformer depth per level, e.g. ``d1-2-10@64`` (the real SDXL base at 512x512) or the
reduced ``d1-2-2@32``. Example:

    python bench/bench_sdxl_unet.py --sizes d1-2-2@32 --precisions bf16 --threads 1 --reps 3

``--without context-store blocked-choice`` adds, in the same interleaved rounds, ours with one lever taken off:
``context-store`` projects the text context in every call (``cache_context_projections = False``);
``blocked-choice`` has the attention over feature maps on the Python blocked kernel at any thread count (the choice
before "auto" took torch's flash kernel with several threads); ``fused-attention`` has the attention on its Python
paths instead of the compiled fused kernel (``ldm.accel.cpu_kernels``).
"""
from __future__ import annotations

import argparse
import logging
import re

import torch

import common
from bench_unet import count_flops, forward_fn
from common import median

logger = logging.getLogger("bench.sdxl_unet")

SDXL_BASE_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
                      num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                      use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                      num_classes="sequential", adm_in_channels=2816, use_checkpoint=False, legacy=False)
POOLED, TIME_DIM = 1280, 256


def parse_size(text: str) -> tuple[list[int], int]:
    """"d1-2-10@64" -> ([1, 2, 10], 64)."""
    match = re.fullmatch(r"d(\d+)-(\d+)-(\d+)@(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not d<depth>-<depth>-<depth>@<latent>: e.g. d1-2-10@64")
    return [int(g) for g in match.groups()[:3]], int(match.group(4))


class Ours:
    """Our UNet called with the SDXL vector ``y`` = cat(pooled, Fourier(time_ids)) (the conditioner's math)."""

    def __init__(self, unet, y):
        self.unet, self.y = unet, y

    def __call__(self, x, t, context):
        return self.unet(x, t, context, y=self.y)


class Without:
    """Ours with one lever off during its calls (``--without``)."""

    def __init__(self, ours: Ours, lever: str):
        self.ours, self.lever = ours, lever

    def __call__(self, x, t, context):
        from ldm.accel import attention

        unet, max_threads, fused = self.ours.unet, attention.BLOCKED_MAX_THREADS, attention.USE_CPU_KERNELS
        if self.lever == "context-store":
            unet.cache_context_projections = False
        elif self.lever == "fused-attention":
            attention.USE_CPU_KERNELS = False
        else:  # blocked-choice (of the Python paths)
            attention.USE_CPU_KERNELS = False
            attention.BLOCKED_MAX_THREADS = 1 << 20
        try:
            return self.ours(x, t, context)
        finally:
            unet.cache_context_projections = True
            attention.BLOCKED_MAX_THREADS, attention.USE_CPU_KERNELS = max_threads, fused


LEVERS = ("context-store", "blocked-choice", "fused-attention")


class Theirs:
    """diffusers' UNet called with ``added_cond_kwargs`` (it embeds time_ids itself)."""

    def __init__(self, unet, pooled, time_ids):
        self.unet, self.kwargs = unet, {"text_embeds": pooled, "time_ids": time_ids}

    def __call__(self, x, t, context):
        return self.unet(x, t, context, added_cond_kwargs=self.kwargs).sample


def build_pair(depths: list[int], batch: int, latent: int):
    import ldm.accel
    from diffusers_port import diffusers_unet
    from ldm.models.conditioner import ConcatTimestepEmbedderND
    from ldm.models.unet import UNetModel

    params = dict(SDXL_BASE_UNET, transformer_depth=depths)
    ours = common.randomize_(UNetModel(**params)).eval()
    theirs = diffusers_unet(params, ours.state_dict()).eval()
    ldm.accel.optimize(ours, "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, 77, params["context_dim"], generator=gen)
    pooled = torch.randn(batch, POOLED, generator=gen)
    side = latent * 8
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)
    y = torch.cat([pooled, ConcatTimestepEmbedderND(TIME_DIM)(time_ids)], dim=1)
    return Ours(ours, y), Theirs(theirs, pooled, time_ids), (x, t, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size("d1-2-2@32")])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["bf16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--without", nargs="*", choices=LEVERS, default=[],
                        help="also time ours with this lever off, in the same rounds")
    parser.add_argument("--out", default=str(common.RESULTS / "sdxl_unet.md"))
    args = parser.parse_args()
    threads = common.setup(args.threads)
    rows = []
    for depths, latent in args.sizes:
        ours, theirs, (x, t, context) = build_pair(depths, args.batch, latent)
        with torch.no_grad():
            diff = (ours(x, t, context) - theirs(x, t, context)).abs().max().item()
        flops = count_flops(ours, x, t, context)
        params = sum(p.numel() for p in ours.unet.parameters()) / 1e9
        label = f"SDXL base depth {depths} ({params:.2f} B params), {latent}x{latent} b{args.batch}"
        logger.info("%s: %.0f GFLOP, max |ours - diffusers| fp32 = %.2e", label, flops / 1e9, diff)
        for precision in args.precisions:
            pair = {"ours": forward_fn(ours, x, t, context, precision),
                    "diffusers": forward_fn(theirs, x, t, context, precision)}
            for lever in args.without:
                pair[f"ours without {lever}"] = forward_fn(Without(ours, lever), x, t, context, precision)
            with common.autocast(precision, "cpu"):
                times = common.interleaved(pair, args.reps, warmup=1)
            b = median(times["diffusers"])
            for name in [n for n in pair if n != "diffusers"]:
                a = median(times[name])
                rows.append([label, precision, name, a, b, f"{b / a:.2f}x", f"{diff:.1e}", f"{flops / 1e9:.0f}",
                             open("/proc/loadavg").read().split()[0]])
                logger.info("%s", rows[-1])
        del ours, theirs
    headers = ["UNet", "precision", "ours", "ours s", "diffusers s", "speed-up", "max abs diff fp32", "GFLOP",
               "load average at the end"]
    notes = ["times are medians of interleaved rounds (ours, diffusers, ...) after one warm-up round; speed-up = "
             "diffusers / ours; ours = our UNet after ldm.accel.optimize",
             "same random weights in both (diffusers' UNet converted from ours by diffusers' single-file functions); "
             "the vector input is the same numbers: ours y = cat(pooled, Fourier(time_ids)), diffusers embeds "
             "time_ids itself",
             "one autocast around all rounds (each model casts its weights to bf16 once)"]
    common.write_report(args.out, "SDXL UNet forward: ours vs diffusers",
                        common.machine_info(threads, "/".join(args.precisions)), common.markdown_table(headers, rows),
                        notes)


if __name__ == "__main__":
    main()
