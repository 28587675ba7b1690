"""``python -m ldm.eval``: score a checkpoint on the shapes world.

    python -m ldm.eval geneval --ckpt model.safetensors [--config cfg.yaml] [--n 8] [--out report.md]
        [--prompts-file prompts.jsonl | --paraphrase]
    python -m ldm.eval recon   --ckpt model.safetensors [--config cfg.yaml] [--num 64] [--out recon.json]
    python -m ldm.eval relations --ckpt model.safetensors [--num 128] [--no-colors] [--out probe.md]

    python -m ldm.eval fid --real real_pngs/ --fake outputs/txt2img-samples/samples \
        --inception-weights pt_inception-2015-12-05-6726825d.pth
    python -m ldm.eval clip-score --images outputs/txt2img-samples/samples --clip-arch ViT-B-32 \
        --clip-weights open_clip_vit_b_32.safetensors

    python -m ldm.eval geneval --ckpt model.safetensors --lora star.safetensors[:W] [--focus-shape star]

``geneval`` generates ``--images-per-prompt`` pictures for ``--n`` held-out prompts per category and prints
the markdown table of :func:`ldm.eval.geneval.format_report` (and writes it, plus a ``.json`` with every
record next to it, with ``--out``); ``--prompts-file`` scores the prompts of a JSON-lines file instead
(:func:`ldm.eval.geneval.read_prompts_file`), ``--paraphrase`` held-out prompts worded by ``ldm.data.paraphrase``.
``recon`` encodes and decodes held-out shapes pictures with the first
stage (``encode(x).mode()`` then ``decode``) and reports mean PSNR / SSIM. ``relations`` runs the loss-level
probe of :mod:`ldm.eval.probe`: does the model predict worse when a caption's relation is swapped? ``fid``: FID and
KID between two folders of images (torchmetrics, torch-fidelity's InceptionV3 from a local weights file).
``clip-score``: the CLIP score of each image against its prompt, read from the PNG's ``parameters`` chunk (what
sample.py writes) or from ``--prompts`` (one line per image, in file-name order). ``recon --lpips-weights`` adds LPIPS.
Weights always come from files you name: nothing is downloaded.

``geneval --lora FILE[:WEIGHT]`` merges LoRAs into the model first (the pipeline's ``load_lora``);
``--focus-shape star`` makes every prompt name that opt-in shape (``ldm.data.shapes.EXTRA_SHAPES``), lets the
analyzer find it and reports the share of images that show it. ``--save-images DIR`` keeps every picture with its
verdict (file names, ``verdicts.txt``, a framed contact sheet per category) to check the analyzer by eye.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Sequence

import torch

from ldm.data.shapes import EXTRA_SHAPES, SHAPES, ShapesDataset, positive_int
from ldm.diffusion.guidance import check_guidance_rescale, check_guidance_scale
from ldm.diffusion.samplers import get_sampler
from ldm.eval.geneval import (evaluate, format_report, make_eval_prompts, make_paraphrased_prompts,
                              read_prompts_file)
from ldm.metrics import psnr, ssim

__all__ = ["main", "build_parser", "run_geneval", "save_verdicts", "run_recon", "run_fid", "run_clip_score"]

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
    which = g.add_mutually_exclusive_group()
    which.add_argument("--prompts-file", default=None, metavar="FILE",
                       help='JSON lines {"category", "prompt", "spec"} to score instead of held-out prompts (--n unused)')
    which.add_argument("--paraphrase", action="store_true",
                       help="the held-out prompts worded other ways (ldm.data.paraphrase; own seed stream)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge this LoRA into the model before sampling (repeatable; as sample.py --lora)")
    g.add_argument("--focus-shape", default=None, choices=EXTRA_SHAPES,
                   help="prompts that all name this opt-in shape; the analyzer finds it too")
    g.add_argument("--save-images", default=None, metavar="DIR",
                   help="save every picture with its verdict in the name, verdicts.txt and a contact sheet "
                        "per category (framed green when right, red when wrong), to check the analyzer by eye")
    r = sub.add_parser("recon", help="autoencoder reconstruction PSNR / SSIM on held-out shapes pictures")
    _add_common(r)
    r.add_argument("--num", type=positive_int, default=64, help="number of pictures")
    r.add_argument("--batch-size", type=positive_int, default=16)
    r.add_argument("--lpips-weights", nargs="+", default=None, metavar="FILE",
                   help="also report LPIPS: torchvision's vgg16 weights and lpips' weights/v0.1/vgg.pth")
    f = sub.add_parser("fid", help="FID and KID between two folders of images")
    f.add_argument("--real", required=True, help="folder of reference images")
    f.add_argument("--fake", required=True, help="folder of generated images")
    f.add_argument("--inception-weights", required=True, help="pt_inception-2015-12-05-6726825d.pth (local file)")
    f.add_argument("--kid-subset-size", type=positive_int, default=1000)
    f.add_argument("--batch-size", type=positive_int, default=32)
    f.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    f.add_argument("--out", default=None, help="where to write the report (JSON)")
    c = sub.add_parser("clip-score", help="CLIP score of generated images against their prompts")
    c.add_argument("--images", required=True, help="folder of images (PNG with a parameters chunk, or --prompts)")
    c.add_argument("--prompts", default=None, help="text file, one prompt per image in file-name order")
    c.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of the weights")
    c.add_argument("--clip-weights", required=True, help="local open_clip weights file (.safetensors or .bin)")
    c.add_argument("--batch-size", type=positive_int, default=32)
    c.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    c.add_argument("--out", default=None, help="where to write the report (JSON)")
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


def _geneval_prompts(args: argparse.Namespace) -> list:
    if getattr(args, "prompts_file", None):
        return _one_line(lambda: read_prompts_file(args.prompts_file))
    if getattr(args, "paraphrase", False):
        return make_paraphrased_prompts(args.n, args.seed)
    return make_eval_prompts(args.n, args.seed, focus=getattr(args, "focus_shape", None))


def run_geneval(args: argparse.Namespace) -> dict[str, Any]:
    prompts = _geneval_prompts(args)  # a bad prompts file fails before the model loads
    save_dir = getattr(args, "save_images", None)
    if save_dir and os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise SystemExit(f"python -m ldm.eval: error: --save-images {save_dir} is a file; name a folder")
    pipe = _load_pipeline(args)
    if args.lora:
        from ldm.cli.sample import parse_lora_arg

        for value in args.lora:
            path, weight = parse_lora_arg(value)
            _one_line(lambda: pipe.load_lora(path, weight))
    options = {"height": args.size, "width": args.size}
    for name in ("steps", "sampler", "guidance_scale", "guidance_rescale"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)

    kept: list = []

    def generate(prompts: list[str], seeds: list[int]) -> list:
        images = pipe(prompts, seeds=seeds, **options).images
        if save_dir:
            kept.extend(images)
        return images

    focus = args.focus_shape
    shapes = SHAPES + (focus,) if focus else SHAPES
    report = evaluate(generate, prompts, args.images_per_prompt, seed=args.seed, shapes=shapes, focus=focus)
    if save_dir:
        save_verdicts(save_dir, report["records"], kept, args.images_per_prompt)
    table = format_report(report)
    log.info("GenEval-style report for %s\n%s", args.ckpt, table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1)
    return report


def save_verdicts(folder: str, records: list[dict], images: Sequence, images_per_prompt: int) -> None:
    """Write ``images`` (one per record, in order) to ``folder`` as ``NNNNN-<category>-<right|wrong>.png``,
    ``verdicts.txt`` (file, prompt, seed, verdict, what the analyzer found: one line each) and
    ``sheet-<category>.png``: a row per prompt, each picture framed green when the analyzer says right and red
    when wrong. Each record gets its file name as ``image``."""
    from PIL import ImageOps

    from ldm.cli.common import make_grid

    if len(images) != len(records):
        raise ValueError(f"{len(images)} images for {len(records)} records")
    os.makedirs(folder, exist_ok=True)
    lines, framed = [], {}
    for i, (record, image) in enumerate(zip(records, images)):
        verdict = "right" if record["correct"] else "wrong"
        record["image"] = name = f"{i:05d}-{record['category']}-{verdict}.png"
        image.save(os.path.join(folder, name))
        lines.append("\t".join([name, record["prompt"], str(record["seed"]),
                                verdict if record["correct"] else f"wrong ({record['cause']})",
                                "; ".join(record["found"]) or "nothing"]))
        color = (40, 200, 40) if record["correct"] else (220, 40, 40)
        framed.setdefault(record["category"], []).append(ImageOps.expand(image.convert("RGB"), border=3, fill=color))
    with open(os.path.join(folder, "verdicts.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for category, tiles in framed.items():
        make_grid(tiles, rows=max(1, len(tiles) // images_per_prompt)).save(
            os.path.join(folder, f"sheet-{category}.png"))
    log.info("wrote %d pictures, verdicts.txt and %d contact sheets to %s", len(images), len(framed), folder)


@torch.no_grad()
def run_recon(args: argparse.Namespace) -> dict[str, Any]:
    pipe = _load_pipeline(args)
    vae = pipe.model.first_stage_model
    param = next(vae.parameters())
    data = ShapesDataset(args.num, size=args.size, seed=args.seed, split="eval")
    psnrs, ssims, lpipss = [], [], []
    lpips = None
    if args.lpips_weights:
        from ldm.training.losses import LPIPS

        lpips = _one_line(lambda: LPIPS(args.lpips_weights))
    for start in range(0, args.num, args.batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(start + args.batch_size, args.num))])
        x = x.to(param.device, param.dtype)
        y = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        psnrs.append(psnr(y.cpu(), x.float().cpu()))
        ssims.append(ssim(y.cpu(), x.float().cpu()))
        if lpips is not None:
            lpipss.append(lpips(y.float().cpu(), x.float().cpu()).flatten())
    report = {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
              "num_images": args.num, "size": args.size}
    if lpips is not None:
        report["lpips"] = torch.cat(lpipss).mean().item()
    log.info("reconstruction of %d held-out %dpx shapes: PSNR %.2f dB, SSIM %.4f%s",
             args.num, args.size, report["psnr"], report["ssim"],
             f", LPIPS {report['lpips']:.4f}" if lpips is not None else "")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _one_line(fn):
    """``fn()``, its ValueError/OSError (a bad file, a missing package) turned into the command's one-line error."""
    try:
        return fn()
    except (ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"python -m ldm.eval: error: {message}")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image_files(folder: str, flag: str) -> list[str]:
    if not os.path.isdir(folder):
        raise SystemExit(f"python -m ldm.eval: error: {flag} {folder}: no such folder")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIXES))
    if not files:
        raise SystemExit(f"python -m ldm.eval: error: {flag} {folder}: no images ({', '.join(_IMAGE_SUFFIXES)})")
    return files


def _image_batches(files: list[str], batch_size: int, size: int | None = None):
    """[-1, 1] tensors of the files, ``batch_size`` at a time (resized to ``size`` when the sizes differ)."""
    from ldm.pipeline import image_to_tensor, load_image

    for start in range(0, len(files), batch_size):
        images = [_one_line(lambda f=f: load_image(f)) for f in files[start:start + batch_size]]
        first = images[0].size if size is None else (size, size)
        yield torch.stack([image_to_tensor(img, first if img.size != first else None) for img in images])


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def run_fid(args: argparse.Namespace) -> dict[str, Any]:
    from ldm.metrics import fid_kid, inception_features

    real, fake = _image_files(args.real, "--real"), _image_files(args.fake, "--fake")
    feature = _one_line(lambda: inception_features(args.inception_weights)).to(args.device)
    # the inception resizes every image to 299x299 itself; a batch only needs one size
    report = _one_line(lambda: fid_kid(_image_batches(real, args.batch_size), _image_batches(fake, args.batch_size),
                                       feature, kid_subset_size=args.kid_subset_size))
    log.info("FID %.3f, KID %.5f +- %.5f (%d real, %d generated images)", report["fid"], report["kid_mean"],
             report["kid_std"], report["num_real"], report["num_fake"])
    _write_json(args.out, report)
    return report


def _prompts_for(files: list[str], prompts_file: str | None) -> list[str]:
    from ldm.cli.common import read_png_parameters

    if prompts_file is not None:
        if not os.path.isfile(prompts_file):
            raise SystemExit(f"python -m ldm.eval: error: --prompts {prompts_file}: no such file")
        lines = [ln.strip() for ln in open(prompts_file, encoding="utf-8").read().splitlines() if ln.strip()]
        if len(lines) != len(files):
            raise SystemExit(f"python -m ldm.eval: error: --prompts has {len(lines)} prompts for {len(files)} images; "
                             "give one line per image, in file-name order")
        return lines
    prompts = []
    for f in files:
        params = read_png_parameters(f) if f.lower().endswith(".png") else None
        if not params or not params.get("prompt"):
            raise SystemExit(f"python -m ldm.eval: error: {f} has no prompt in its PNG metadata; pass --prompts")
        prompts.append(params["prompt"])
    return prompts


def run_clip_score(args: argparse.Namespace) -> dict[str, Any]:
    from ldm.metrics import clip_score, load_clip

    files = _image_files(args.images, "--images")
    prompts = _prompts_for(files, args.prompts)
    model = _one_line(lambda: load_clip(args.clip_arch, args.clip_weights)).to(args.device)
    scores = []
    for i, batch in enumerate(_image_batches(files, args.batch_size)):
        scores.append(clip_score(batch, prompts[i * args.batch_size:(i + 1) * args.batch_size], model))
    scores = torch.cat(scores)
    report = {"clip_score": scores.mean().item(), "num_images": len(files), "clip_arch": args.clip_arch,
              "per_image": {os.path.basename(f): round(s, 4) for f, s in zip(files, scores.tolist())}}
    log.info("CLIP score %.2f over %d images (%s)", report["clip_score"], len(files), args.clip_arch)
    _write_json(args.out, report)
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
    if args.command in ("fid", "clip-score"):
        if args.out and os.path.isdir(args.out):
            parser.error(f"--out {args.out} is a folder; give a file name such as report.json")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return {"fid": run_fid, "clip-score": run_clip_score}[args.command](args)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: no such file; give the path of a trained checkpoint")
    if args.config is not None and not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file; give a model YAML or leave it out")
    if args.size < 32:
        parser.error(f"--size {args.size} is too small; shapes pictures are at least 32 pixels")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a file name such as report.md")
    if args.command == "geneval":
        if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
            parser.error(f"--prompts-file {args.prompts_file}: no such file; give a JSON-lines prompt file")
        from ldm.cli.sample import parse_lora_arg

        for value in args.lora:
            if not parse_lora_arg(value)[0].is_file():
                parser.error(f"--lora {value}: no such file; give a LoRA .safetensors file (FILE or FILE:WEIGHT)")
        if args.focus_shape and args.paraphrase:
            parser.error("--focus-shape makes its own prompts: use it without --paraphrase")
        if args.sampler is not None:
            try:
                get_sampler(args.sampler)
            except ValueError as e:
                parser.error(f"--sampler: {e}")
        checks = [(check_guidance_rescale, args.guidance_rescale, "--guidance-rescale"),
                  (check_guidance_scale, args.guidance_scale, "--guidance-scale")]
        for check, value, flag in checks:
            if value is not None:
                try:
                    check(value, flag)
                except ValueError as e:
                    parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = {"geneval": run_geneval, "recon": run_recon, "relations": run_relations}[args.command]
    return run(args)
