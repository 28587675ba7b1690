"""``python -m ldm.eval``: score a checkpoint on the shapes world.

    python -m ldm.eval geneval --ckpt model.safetensors [--config cfg.yaml] [--n 8] [--out report.md]
    python -m ldm.eval recon   --ckpt model.safetensors [--config cfg.yaml] [--num 64] [--out recon.json]
    python -m ldm.eval relations --ckpt model.safetensors [--num 128] [--no-colors] [--out probe.md]

``geneval`` generates ``--images-per-prompt`` pictures for ``--n`` held-out prompts per category and prints
the markdown table of :func:`ldm.eval.geneval.format_report` (and writes it, plus a ``.json`` with every
record next to it, with ``--out``). ``recon`` encodes and decodes held-out shapes pictures with the first
stage (``encode(x).mode()`` then ``decode``) and reports mean PSNR / SSIM. ``relations`` runs the loss-level
probe of :mod:`ldm.eval.probe`: does the model predict worse when a caption's relation is swapped?
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Sequence

import torch

from ldm.data.shapes import ShapesDataset, positive_int
from ldm.diffusion.guidance import check_guidance_rescale
from ldm.diffusion.samplers import get_sampler
from ldm.eval.geneval import evaluate, format_report, make_eval_prompts
from ldm.metrics import psnr, ssim

__all__ = ["main", "build_parser", "run_geneval", "run_recon"]

log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model checkpoint (.safetensors or .ckpt)")
    p.add_argument("--config", default=None, help="model config YAML (default: the one stored with the model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="prompt / data seed (held-out stream)")
    p.add_argument("--out", default=None, help="where to write the report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("geneval", help="prompt faithfulness (GenEval-style) on held-out shapes prompts")
    _add_common(g)
    g.add_argument("--n", type=positive_int, default=8, help="prompts per category")
    g.add_argument("--images-per-prompt", type=positive_int, default=4)
    g.add_argument("--steps", type=positive_int, default=None, help="sampling steps (pipeline default)")
    g.add_argument("--sampler", default=None, help='sampler name, e.g. "DDIM" (pipeline default)')
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--guidance-rescale", type=float, default=None,
                   help="guidance rescale in [0, 1] (Lin et al. 2023; pipeline default 0)")
    r = sub.add_parser("recon", help="autoencoder reconstruction PSNR / SSIM on held-out shapes pictures")
    _add_common(r)
    r.add_argument("--num", type=positive_int, default=64, help="number of pictures")
    r.add_argument("--batch-size", type=positive_int, default=16)
    q = sub.add_parser("relations", help="do the relation words matter? x0 error with true vs swapped relations")
    _add_common(q)
    q.add_argument("--num", type=positive_int, default=128, help="held-out relation scenes")
    q.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 800, 600])
    q.add_argument("--no-colors", dest="colors", action="store_false",
                   help="captions without colors and sizes (as the position category's prompts)")
    return parser


def _load_pipeline(args: argparse.Namespace) -> Any:
    try:
        from ldm.pipeline import Text2Image  # lazy: the pipeline pulls in the whole model stack
    except ImportError as e:
        raise SystemExit(f"cannot import the generation pipeline ldm.pipeline ({e}); check the installation")
    try:
        return Text2Image.from_checkpoint(args.ckpt, config=args.config, device=args.device)
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, unreadable files: one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"python -m ldm.eval: error: {message}")


def run_geneval(args: argparse.Namespace) -> dict[str, Any]:
    pipe = _load_pipeline(args)
    options = {"height": args.size, "width": args.size}
    for name in ("steps", "sampler", "guidance_scale", "guidance_rescale"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)

    def generate(prompts: list[str], seeds: list[int]) -> list:
        return pipe(prompts, seeds=seeds, **options).images

    report = evaluate(generate, make_eval_prompts(args.n, args.seed), args.images_per_prompt, seed=args.seed)
    table = format_report(report)
    log.info("GenEval-style report for %s\n%s", args.ckpt, table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1)
    return report


@torch.no_grad()
def run_recon(args: argparse.Namespace) -> dict[str, Any]:
    pipe = _load_pipeline(args)
    vae = pipe.model.first_stage_model
    param = next(vae.parameters())
    data = ShapesDataset(args.num, size=args.size, seed=args.seed, split="eval")
    psnrs, ssims = [], []
    for start in range(0, args.num, args.batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(start + args.batch_size, args.num))])
        x = x.to(param.device, param.dtype)
        y = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        psnrs.append(psnr(y.cpu(), x.float().cpu()))
        ssims.append(ssim(y.cpu(), x.float().cpu()))
    report = {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
              "num_images": args.num, "size": args.size}
    log.info("reconstruction of %d held-out %dpx shapes: PSNR %.2f dB, SSIM %.4f",
             args.num, args.size, report["psnr"], report["ssim"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def run_relations(args: argparse.Namespace) -> list[dict[str, float]]:
    from ldm.eval.probe import format_probe, relation_probe, text_change

    pipe = _load_pipeline(args)
    try:
        rows = relation_probe(pipe.model, num=args.num, timesteps=args.timesteps, size=args.size, seed=args.seed,
                              colors=args.colors)
    except ValueError as e:
        raise SystemExit(f"relations: {e}")
    text = text_change(pipe.model, num=args.num, seed=args.seed, colors=args.colors)
    table = format_probe(rows, args.num, args.colors, text)
    log.info("relation probe of %s\n%s", args.ckpt, table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return rows


def main(argv: Sequence[str] | None = None) -> Any:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: no such file; give the path of a trained checkpoint")
    if args.config is not None and not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file; give a model YAML or leave it out")
    if args.size < 32:
        parser.error(f"--size {args.size} is too small; shapes pictures are at least 32 pixels")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a file name such as report.md")
    if args.command == "geneval":
        if args.sampler is not None:
            try:
                get_sampler(args.sampler)
            except ValueError as e:
                parser.error(f"--sampler: {e}")
        if args.guidance_rescale is not None:
            try:
                check_guidance_rescale(args.guidance_rescale, "--guidance-rescale")
            except ValueError as e:
                parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = {"geneval": run_geneval, "recon": run_recon, "relations": run_relations}[args.command]
    return run(args)
