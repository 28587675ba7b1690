"""A LoRA training step against a full fine-tuning step of the same model: time per step and peak memory.

    python bench/bench_lora.py                      # the shipped demo model (64x64 shapes), batch 8
    python bench/bench_lora.py --rank 16 --targets attn ff text --steps 20

Each variant runs in its own process (peak RSS is per process): the training module is built from
the shipped demo model's own config, started from its weights (``init_from``), then ``--steps`` optimizer steps
(forward, backward, AdamW) on a fixed batch of shapes are timed after ``--warmup`` steps. Not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import REPO, command_line, cpu_model, median, peak_rss_gb, setup


def run_variant(args: argparse.Namespace) -> dict:
    setup(args.threads)
    from ldm.config import instantiate_from_config
    from ldm.data.shapes import ShapesDataset
    from ldm.io import read_state_dict

    base = REPO / "ldm" / "assets" / "demo" / "shapes.safetensors"
    params = json.loads(read_state_dict(base)[1]["config"])["model"]["params"]
    # both variants train the UNet (all of it, or a LoRA of it) on the frozen text encoder
    params.update(init_from=str(base), learning_rate=1e-4, use_ema=False, cond_stage_trainable=False)
    if args.variant == "lora":
        params["lora"] = {"rank": args.rank, "targets": args.targets}
    node = {"target": "ldm.training.latent_diffusion.LatentDiffusionModule", "params": params}
    torch.manual_seed(0)
    module = instantiate_from_config(node, "model")
    module.train()
    params = module.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    side = module.image_size * 2 ** (len(module.first_stage_model.encoder.down) - 1)  # latent side x VAE factor
    ds = ShapesDataset(args.batch, size=side, seed=0)
    items = [ds[i] for i in range(args.batch)]
    batch = {"image": torch.stack([x["image"] for x in items]), "caption": [x["caption"] for x in items]}
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = module._loss(batch, torch.Generator().manual_seed(step), drop=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"variant": args.variant, "trainable": sum(p.numel() for p in params),
            "step_s": median(times), "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=("lora", "full"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["attn", "ff"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *sys.argv[1:]], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"# {command_line()}\n# {cpu_model()}, batch {args.batch}, median of {args.steps} steps")
    print("| variant | trainable parameters | s/step | steps/s | peak RSS (GB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['step_s']:.3f} | {1 / r['step_s']:.2f} | "
              f"{r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
