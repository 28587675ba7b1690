"""Where the time goes: one profiled call of our UNet (after ``ldm.accel.optimize``, as the pipeline and the trainer
run it), self CPU time grouped by op class (torch.profiler).

    python bench/bench_profile.py --latent 64 --precision bf16 --mode forward --threads 1
    python bench/bench_profile.py --latent 64 --precision bf16 --mode lora --batch 1 --threads 1

``--mode forward``: a sampling step (batch 2 = CFG), no grad. ``--mode lora``: a LoRA training step as
bench_lora_diffusers.py times it (rank 4 on to_q/to_k/to_v/to_out.0, frozen base in bf16 under bf16), forward +
backward. The first call (weight packs, the kernel build) is not profiled.
"""
from __future__ import annotations

import argparse
import collections
import re

import torch

import common

# op class by the profiler's event name (first match wins)
CLASSES = [
    ("fused attention (ldm.accel.cpu_kernels)", r"^ldm::fused_attention"),
    ("convolutions", r"conv|mkldnn_reorder_conv"),
    ("linear layers", r"linear|addmm|^aten::mm$|^aten::bmm$|matmul"),
    ("other attention (sdpa, softmax)", r"scaled_dot_product|flash_attention|softmax"),
    ("norms", r"norm"),
    ("copies and casts", r"copy_|^aten::to$|_to_copy|clone|contiguous|cat$"),
    ("elementwise (GELU, SiLU, adds, muls)", r"gelu|silu|add|mul|sub|div|exp|neg|sigmoid"),
]


def classify(name: str) -> str:
    return next((label for label, pattern in CLASSES if re.search(pattern, name)), "other")


def build(args):
    import ldm.accel
    from ldm.models.unet import UNetModel

    unet = common.randomize_(UNetModel(**common.SD_V1_UNET))
    if args.mode == "forward":
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 4, args.latent, args.latent, generator=gen)
        t = torch.full((args.batch,), 500)
        ctx = torch.randn(args.batch, 77, common.SD_V1_UNET["context_dim"], generator=gen)
        unet = ldm.accel.optimize(unet.eval(), "cpu", args.precision)
        if args.precision == "bf16":
            ldm.accel.store_weights_in_(unet, torch.bfloat16)

        def call():
            with torch.no_grad(), common.autocast(args.precision):
                unet(x, t, ctx)
        return call
    from bench_lora_diffusers import inputs, our_lora

    x, t, ctx, noise = inputs(args.latent)  # the LoRA bench's step: batch 1
    step, _, set_precision = our_lora(unet, rank=4)
    set_precision(args.precision)

    def call():
        step(x, t, ctx, noise, args.precision)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="forward: the batch (2 = a CFG step); lora: always 1")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--mode", choices=("forward", "lora"), default="forward")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: bench/results/profile_<mode>_<precision>.md")
    args = parser.parse_args()
    threads = common.setup(args.threads)
    call = build(args)
    call()  # warm-up: packs, caches, the kernel build
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[classify(event.key)] += event.self_cpu_time_total / 1e6
    wall = sum(totals.values())
    rows = [[label, f"{sec:.2f}", f"{100 * sec / wall:.0f}%"] for label, sec in
            sorted(totals.items(), key=lambda kv: -kv[1]) if sec > 0.0005]
    rows.append(["**total (profiled)**", f"**{wall:.2f}**", "100%"])
    out = args.out or str(common.RESULTS / f"profile_{args.mode}_{args.precision}.md")
    common.write_report(out, f"Where the time goes: SD1.5 UNet {args.mode}, {args.latent}x{args.latent}, "
                             f"batch {args.batch}, {args.precision}", common.machine_info(threads, args.precision),
                        common.markdown_table(["op class", "self CPU s", "share"], rows),
                        ["torch.profiler self CPU time of one call after a warm-up call, grouped by op name "
                         "(bench_profile.CLASSES); the fused kernel is a ctypes call inside a record_function range, "
                         "whose self time is the kernel's"])


if __name__ == "__main__":
    main()
