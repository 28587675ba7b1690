"""``python -m ldm.cli.export``: write a checkpoint as a diffusers pipeline folder.

    python -m ldm.cli.export --ckpt sd-v1-5.safetensors --diffusers sd15-diffusers/
    python -m ldm.cli.export --diffusers demo-diffusers/              # the embedded demo model

The folder loads offline with diffusers' ``StableDiffusionPipeline.from_pretrained`` (see
:mod:`ldm.convert.diffusers_folder`); ``sample.py --ckpt FOLDER`` reads it back. Needs the ``diffusers`` extra.
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
    p.add_argument("--diffusers", required=True, metavar="FOLDER", help="the new folder to write")
    return p


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
        model = load_model(args.config, ckpt, use_ema=args.use_ema)
        folder = export_diffusers(model, args.diffusers)
    except (ValueError, OSError, ImportError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    print(f"done: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
