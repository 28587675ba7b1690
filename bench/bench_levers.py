"""A/B of our own speed levers in one process, rounds interleaved (with / without), same weights and inputs.

    python bench/bench_levers.py --levers pack adam --threads 1 --out bench/results/levers.md

- ``pack``: SD1.5 UNet forward, bf16, batch 2 (a CFG step), at each ``--latents`` size: convolutions on weights
  packed once into oneDNN's layout (``ldm.accel.unet.UNetModel.pack_conv_weights``, the default) against a weight reorder in
  every call. Also the largest output difference (expected 0: the same kernel runs).
- ``adam``: one fused AdamW step on the conv weights of the SD v1 UNet at width ``--adam-width`` (channels-last,
  as the UNet keeps them) with their gradients: our trainer's AdamW (``ldm.training.common.AdamW``: NHWC views)
  against torch's fused AdamW (clones and copies back each channels-last tensor).
- ``attention``: one attention call per layer shape of SD1.5 (8 heads) and SDXL (heads of 64) at 64x64 latents,
  batch 2 (a CFG step): self-attention over the feature map and attention to the 77-token text, in bf16 and fp32:
  the compiled fused kernel (``ldm.accel.cpu_kernels``, what "auto" takes where it is available) against the Python
  blocked kernel (bf16; the choice without the fused kernel at one thread) and torch's sdpa (CPU flash kernel; the
  choice without it at several threads and in fp32). Each candidate's largest error against an fp64 reference.
"""
from __future__ import annotations

import argparse

import torch

import common


def bench_pack(latents: list[int], reps: int) -> list[list]:
    import ldm.accel
    from ldm.models.unet import UNetModel

    unet = ldm.accel.optimize(common.randomize_(UNetModel(**common.SD_V1_UNET)).eval(), "cpu", "bf16")
    ldm.accel.store_weights_in_(unet, torch.bfloat16)  # as the pipeline holds it (unet_weights="compute")
    rows = []
    for latent in latents:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, latent, latent, generator=gen)
        t = torch.tensor([500, 500])
        ctx = torch.randn(2, 77, common.SD_V1_UNET["context_dim"], generator=gen)
        outs = {}

        def run(flag: bool):
            def fn():
                unet.pack_conv_weights = flag
                outs[flag] = unet(x, t, ctx)
            return fn

        with torch.no_grad(), common.autocast("bf16"):
            times = common.interleaved({"packed": run(True), "reordered per call": run(False)}, reps)
        a, b = common.median(times["packed"]), common.median(times["reordered per call"])
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        rows.append([f"SD1.5 UNet forward bf16, {latent}x{latent} b2", "packed conv weights",
                     "reordered every call", round(a, 3), round(b, 3), f"{b / a:.2f}x", f"{diff:.2g}"])
    return rows


def bench_adam(width: int, reps: int) -> list[list]:
    from ldm.models.unet import UNetModel
    from ldm.training.common import AdamW

    unet = common.randomize_(UNetModel(**dict(common.SD_V1_UNET, model_channels=width)))
    weights = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    pairs = {}
    for name, cls in (("ours", AdamW), ("torch", torch.optim.AdamW)):
        params = [torch.nn.Parameter(w.detach().clone(memory_format=torch.preserve_format)) for w in weights]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        pairs[name] = cls(params, lr=1e-6, fused=True).step
    times = common.interleaved(pairs, reps)
    a, b = common.median(times["ours"]), common.median(times["torch"])
    n = sum(w.numel() for w in weights) / 1e6
    return [[f"fused AdamW step, the {len(weights)} conv weights of SD1 w{width} ({n:.0f}M, channels-last)",
             "ours (NHWC views)", "torch's fused AdamW", round(a, 4), round(b, 4), f"{b / a:.2f}x", ""]]


# (name, heads, queries, keys, head dim): SD1.5 and SDXL attention layers at 64x64 latents
ATTENTION_SHAPES = [("SD1.5 level 1 self", 8, 4096, 4096, 40), ("SD1.5 level 1 text", 8, 4096, 77, 40),
                    ("SD1.5 level 2 self", 8, 1024, 1024, 80), ("SD1.5 level 2 text", 8, 1024, 77, 80),
                    ("SD1.5 level 3 self", 8, 256, 256, 160), ("SD1.5 level 3 text", 8, 256, 77, 160),
                    ("SDXL level 2 self", 10, 1024, 1024, 64), ("SDXL level 3 self", 20, 256, 256, 64),
                    ("SDXL level 3 text", 20, 256, 77, 64)]


def bench_attention(reps: int) -> list[list]:
    from ldm.accel import attention, cpu_kernels
    from ldm.models.attention import KERNELS

    if not cpu_kernels.available():
        raise SystemExit(f"the fused CPU attention kernel is not available here: {cpu_kernels.reason()}")
    rows = []
    for name, heads, n, m, d in ATTENTION_SHAPES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, heads, rows_, d, generator=gen) for rows_ in (n, m, m))
        ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * d ** -0.5, -1) @ v.double()
        for dtype in (torch.bfloat16, torch.float32):
            qq, kk, vv = q.to(dtype), k.to(dtype), v.to(dtype)
            outs = {}

            def run(label, fn):
                def call():
                    with torch.no_grad():
                        outs[label] = fn()
                return call

            def python_blocked():
                with common.without_fused_attention():
                    return attention.attention(qq, kk, vv, backend="blocked")

            cands = {"fused": run("fused", lambda: cpu_kernels.attention(qq, kk, vv)),
                     "sdpa": run("sdpa", lambda: KERNELS["sdpa"](qq, kk, vv, None))}
            if dtype == torch.bfloat16:
                cands["blocked (Python)"] = run("blocked (Python)", python_blocked)
            times = common.interleaved(cands, reps)
            a = common.median(times["fused"])
            err = {lbl: (o.double() - ref).abs().max().item() for lbl, o in outs.items()}
            for other in [c for c in cands if c != "fused"]:
                b = common.median(times[other])
                rows.append([f"attention {name}, [2, {heads}, {n}, {d}] x {m} keys, "
                             f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}", "fused", other,
                             round(a * 1e3, 2), round(b * 1e3, 2), f"{b / a:.2f}x",
                             f"{err['fused']:.1e} / {err[other]:.1e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", choices=("pack", "adam", "attention"),
                        default=["pack", "adam"])
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--adam-width", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per candidate (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.RESULTS / "levers.md"))
    args = parser.parse_args()
    threads = common.setup(args.threads)
    rows = []
    if "pack" in args.levers:
        rows += bench_pack(args.latents, args.reps)
    if "adam" in args.levers:
        rows += bench_adam(args.adam_width, args.reps)
    if "attention" in args.levers:
        rows += bench_attention(args.reps)
    headers = ["what", "A", "B", "A s", "B s", "A speed-up", "max abs diff"]
    common.write_report(args.out, "Our speed levers, A/B in one process", common.machine_info(threads, "bf16/fp32"),
                        common.markdown_table(headers, rows),
                        ["medians of interleaved rounds (A, B, A, B, ...) after one warm-up round; "
                         "speed-up = B time / A time; attention rows: times in ms, max abs diff = each side's "
                         "largest error against an fp64 reference (A / B)"])


if __name__ == "__main__":
    main()
