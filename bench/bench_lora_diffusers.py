"""A LoRA training step at SD 1.5 size: ours against a diffusers ``train_text_to_image_lora.py``-style step.

    python bench/bench_lora_diffusers.py                          # fp32 and bf16, 1 and 2 threads, rank 4
    python bench/bench_lora_diffusers.py --threads 1 --precisions bf16 --reps 3

Both sides hold the same random weights of the SD 1.5 UNet (no download: ``randomize_``, then diffusers'
``UNet2DConditionModel`` is converted from our state dict with diffusers' own single-file converters, see
``diffusers_port.py``; their fp32 outputs are compared first) and train a LoRA of the same layers at the same rank:
- ours: the plain ``UNetModel`` after ``ldm.accel.optimize`` (as the trainer's AccelCallback runs it; in bf16 the
  frozen weights then stored in bf16, as a LoRA run's ``store_base_in_bf16`` does), the branches of
  ``ldm.adapters.lora_train.LoraNetwork`` (targets ``attn`` less ``proj_in``/``proj_out``, which the diffusers
  script does not train), the trainer's AdamW (``fused=True``) on the LoRA parameters only;
- diffusers: the script's recipe: ``unet.requires_grad_(False)``, ``unet.add_adapter(LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`` (peft), in bf16 the frozen
  weights cast to bf16 and the LoRA parameters kept in fp32 (``cast_training_params``), ``torch.optim.AdamW``
  (weight decay 1e-2) on the trainable parameters.
One step = forward of a noisy 64x64 latent (batch 1) with a [1, 77, 768] text context (fixed inputs, the same for
both), MSE to the noise, backward, optimizer step, zero_grad; under bf16 autocast for ``bf16``.

Times: one process per thread count, both models in it, rounds interleaved ours / diffusers (the machine is
shared: the ratio is what is comparable), medians. Peak memory: one fresh process per side and precision holding
only its own model (its peak RSS, VmHWM), so that neither side pays for the other. Writes
``bench/results/lora_vs_diffusers.md``. Needs the ``bench`` extra (diffusers, peft). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import (REPO, RESULTS, SD_V1_UNET, autocast, command_line, cpu_model, markdown_table, median,
                    mem_available_gb, peak_rss_gb, randomize_, setup)

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def unet_params(latent: int) -> dict:
    return dict(SD_V1_UNET, image_size=latent)


def inputs(latent: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, latent, latent, generator=g), torch.randint(0, 1000, (1,), generator=g),
            torch.randn(1, 77, 768, generator=g), torch.randn(1, 4, latent, latent, generator=g))


# ---- ours -------------------------------------------------------------------------------------------------------
def our_lora(unet: torch.nn.Module, rank: int):
    """``unet`` with a LoRA of the diffusers script's layers; returns (step(precision), LoRA parameter count,
    set_precision: the trainer's CPU fast paths for that precision)."""
    from torch import nn

    from ldm import accel
    from ldm.adapters import lora_train
    from ldm.training.common import AdamW
    from ldm.training.lora import store_frozen_base_in_

    unet.requires_grad_(False)
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.diffusion_model = unet
    category = lora_train._unet_category  # the script trains to_q/k/v/out only: leave proj_in / proj_out out
    lora_train._unet_category = lambda name, d: (None if name.endswith((".proj_in", ".proj_out"))
                                                 else category(name, d))
    try:
        network = lora_train.LoraNetwork(holder, lora_train.parse_lora_config({"rank": rank, "targets": ["attn"]}))
    finally:
        lora_train._unet_category = category
    params = list(network.parameters())
    opt = AdamW(params, lr=1e-4, fused=True)
    unet.train()

    def set_precision(precision: str) -> None:
        """The trainer's set-up: the acceleration pass, then (bf16: ``LatentDiffusionModule.store_base_in_bf16``)
        the frozen weights stored in bf16, the LoRA kept in fp32."""
        accel.optimize(unet, device="cpu", precision=precision)
        if precision == "bf16":
            store_frozen_base_in_([unet], torch.bfloat16)

    def step(x, t, ctx, noise, precision):
        with autocast(precision):
            out = unet(x, t, ctx)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params), set_precision


# ---- diffusers --------------------------------------------------------------------------------------------------
def diffusers_lora(unet: torch.nn.Module, rank: int):
    """The script's set-up; returns (step(precision), LoRA parameter count, set_precision)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()

    def set_precision(precision: str) -> None:
        """The script: frozen weights in the mixed-precision dtype, trainable ones in fp32."""
        unet.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        for p in params:
            p.data = p.data.float()

    def step(x, t, ctx, noise, precision):
        with autocast(precision):
            out = unet(x, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params), set_precision


def build_pair(latent: int, rank: int):
    from diffusers_port import diffusers_unet

    from ldm.models.unet import UNetModel

    params = unet_params(latent)
    torch.manual_seed(0)
    ours = randomize_(UNetModel(**params))
    theirs = diffusers_unet(params, ours.state_dict(), image_size=latent * 8)
    x, t, ctx, _ = inputs(latent)
    with torch.no_grad():
        diff = (ours.eval()(x, t, ctx) - theirs.eval()(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    return ours, theirs, diff


# ---- the measurements -------------------------------------------------------------------------------------------
def timing(args: argparse.Namespace) -> dict:
    threads = setup(args.threads[0])
    ours_unet, theirs_unet, diff = build_pair(args.latent, args.rank)
    t_step, t_count, set_precision = diffusers_lora(theirs_unet, args.rank)
    data = [inputs(args.latent, seed) for seed in range(args.warmup + args.reps)]
    out = {"threads": threads, "fp32_max_abs_diff": diff, "diffusers_lora_params": t_count, "rows": []}
    o_step, o_count, o_set_precision = our_lora(ours_unet, args.rank)
    out["ours_lora_params"] = o_count
    for precision in args.precisions:
        load_start = os.getloadavg()
        o_set_precision(precision)
        set_precision(precision)
        steps = {"ours": o_step, "diffusers": t_step}
        times = {"ours": [], "diffusers": []}
        for i, batch in enumerate(data):
            for name in ("ours", "diffusers"):
                start = time.perf_counter()
                steps[name](*batch, precision)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[name].append(elapsed)
                print(f"{precision} {threads} threads {name} round {i - args.warmup}: {elapsed:.2f} s",
                      file=sys.stderr, flush=True)
        out["rows"].append({"precision": precision, "ours_s": median(times["ours"]),
                            "diffusers_s": median(times["diffusers"]), "ours_all": times["ours"],
                            "diffusers_all": times["diffusers"], "load_start": load_start,
                            "load_end": os.getloadavg()})
    return out


def memory(args: argparse.Namespace) -> dict:
    """One side alone in this process, one precision: a few steps, then the peak RSS."""
    setup(args.threads[0])
    precision = args.precisions[0]
    torch.manual_seed(0)
    if args.side == "ours":
        from ldm.models.unet import UNetModel

        step, count, set_precision = our_lora(UNetModel(**unet_params(args.latent)), args.rank)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(sample_size=args.latent, cross_attention_dim=768, attention_head_dim=8)
        step, count, set_precision = diffusers_lora(unet, args.rank)
    set_precision(precision)
    before = peak_rss_gb()
    for seed in range(2):
        step(*inputs(args.latent, seed), precision)
    return {"side": args.side, "precision": precision, "peak_rss_gb": peak_rss_gb(), "model_rss_gb": before,
            "lora_params": count}


def _wait_for_memory(gb: float, patience_s: float = 900) -> None:
    """On a shared machine: start a child only when ``gb`` GiB are available (else it is killed for memory)."""
    deadline = time.monotonic() + patience_s
    while mem_available_gb() < gb and time.monotonic() < deadline:
        time.sleep(10)


def _child(args: argparse.Namespace, *extra: str) -> dict:
    _wait_for_memory(10.0 if "timing" in extra else 6.0)
    cmd = [sys.executable, __file__, "--latent", str(args.latent), "--rank", str(args.rank),
           "--reps", str(args.reps), "--warmup", str(args.warmup), *extra]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", default=str(RESULTS / "lora_vs_diffusers.md"))
    p.add_argument("--mode", choices=("timing", "memory"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "timing":
        print(json.dumps(timing(args)))
        return
    if args.mode == "memory":
        print(json.dumps(memory(args)))
        return
    setup(None)
    load_at_start = os.getloadavg()
    timings, mem = [], {}
    stages = [("timing", args.threads[0])] + ([] if args.no_memory else [("memory", None)])
    stages += [("timing", n) for n in args.threads[1:]]
    for kind, n in stages:  # the report is rewritten after each stage (a stage killed for memory keeps the others)
        if kind == "timing":
            timings.append(_child(args, "--mode", "timing", "--threads", str(n), "--precisions", *args.precisions))
        else:
            for prec in args.precisions:
                for side in ("ours", "diffusers"):
                    mem[(side, prec)] = _child(args, "--mode", "memory", "--side", side, "--precisions", prec,
                                               "--threads", "1")
        write_report(args, timings, mem, load_at_start)


def write_report(args: argparse.Namespace, timings: list, mem: dict, load_at_start: tuple) -> None:
    rows = []
    for run in timings:
        for r in run["rows"]:
            o, d = mem.get(("ours", r["precision"])), mem.get(("diffusers", r["precision"]))
            rows.append([r["precision"], run["threads"], f"{r['ours_s']:.2f}", f"{r['diffusers_s']:.2f}",
                         f"{r['diffusers_s'] / r['ours_s']:.2f}x",
                         f"{o['peak_rss_gb']:.2f}" if o else "-", f"{d['peak_rss_gb']:.2f}" if d else "-",
                         " / ".join(f"{x:.1f}" for x in r["load_start"][:1] + r["load_end"][:1])])
    table = markdown_table(["precision", "threads", "ours s/step", "diffusers s/step", "speed-up",
                            "ours peak RSS (GB)", "diffusers peak RSS (GB)", "load avg start / end"], rows)
    first = timings[0]
    notes = [f"fp32 outputs before training: max abs difference {first['fp32_max_abs_diff']:.2e}",
             f"LoRA rank {args.rank} on to_q, to_k, to_v, to_out.0 of every transformer block: ours trains "
             f"{first['ours_lora_params']:,} parameters, diffusers/peft {first['diffusers_lora_params']:,}",
             f"medians of {args.reps} interleaved rounds after {args.warmup} warm-up round(s); speed-up = diffusers "
             "time / our time, measured in the same process",
             "peak RSS: one process per side and precision holding only its own model, 2 steps, 1 thread",
             "per-round times: " + "; ".join(
                 f"{r['precision']} {run['threads']}t ours {[round(x, 2) for x in r['ours_all']]} diffusers "
                 f"{[round(x, 2) for x in r['diffusers_all']]}" for run in timings for r in run["rows"])]
    info = [f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, shared", f"torch {torch.__version__}",
            f"load average at start {' '.join(f'{x:.1f}' for x in load_at_start)}",
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())]
    text = "\n".join([f"# {command_line()}", *[f"- {i}" for i in info], "", table, "", *[f"- {n}" for n in notes]])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
