"""``python -m ldm.cli.export``: write a checkpoint as a diffusers pipeline folder or as one file in the layout of
the released Stable Diffusion files.

    python -m ldm.cli.export --ckpt sd-v1-5.safetensors --diffusers sd15-diffusers/
    python -m ldm.cli.export --diffusers demo-diffusers/              # the embedded demo model
    python -m ldm.cli.export --ckpt model.ckpt --out model.safetensors --fp16

The folder loads offline with diffusers' ``StableDiffusionPipeline.from_pretrained`` (see
:mod:`ldm.convert.diffusers_folder`); ``sample.py --ckpt FOLDER`` reads it back. Needs the ``diffusers`` extra.
``--out`` writes the SD 1.x / 2.x / SDXL file layout (:func:`ldm.convert.to_sd_file_layout`: OpenAI CLIP text
weights in transformers names, as A1111, ComfyUI and diffusers' single-file loader expect), with the model's
config in the metadata; ``--fp16`` stores the weights in float16 (schedule buffers stay float32).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

PROG = "python -m ldm.cli.export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a checkpoint as a diffusers pipeline folder.")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the embedded demo model)")
    p.add_argument("--config", default=None, help="model config YAML (default: inferred from the file)")
    p.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="export the EMA weights")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--diffusers", metavar="FOLDER", help="the new diffusers pipeline folder to write")
    target.add_argument("--out", metavar="FILE", help="the new single file to write, in the released SD layout "
                                                      "(.safetensors; .ckpt for a weights-only pickle)")
    p.add_argument("--fp16", action="store_true", help="with --out: store the weights in float16")
    return p


def export_file(model, path: str | Path, fp16: bool = False) -> Path:
    """Write ``model`` (a loaded ``LatentDiffusion``) as one file in the layout of the released SD files."""
    import torch

    from ldm.convert import to_sd_file_layout
    from ldm.io import save_checkpoint

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose a new file name (--out)")
    sd = to_sd_file_layout(model.state_dict())
    if fp16:  # the weights; the schedule buffers (names without a dot) stay exact
        sd = {k: v.half() if v.is_floating_point() and "." in k else v for k, v in sd.items()}
    return save_checkpoint(sd, path, config=getattr(model, "config", None))


def main(argv: Sequence[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from ldm.cli.sample import resolve_checkpoint

    try:
        from ldm.convert import load_model
        from ldm.convert.diffusers_folder import export_diffusers

        ckpt = resolve_checkpoint(args.ckpt)
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {ckpt} (check --ckpt)")
        if args.fp16 and args.out is None:
            raise ValueError("--fp16 applies to --out only (a diffusers folder is written in float32)")
        model = load_model(args.config, ckpt, use_ema=args.use_ema)
        folder = export_file(model, args.out, args.fp16) if args.out else export_diffusers(model, args.diffusers)
    except (ValueError, OSError, ImportError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    print(f"done: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
