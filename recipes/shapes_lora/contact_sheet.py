"""A contact sheet of star-prompt pictures with the analyzer's verdict on each, to check the analyzer by eye.

    python recipes/shapes_lora/contact_sheet.py --ckpt ldm/assets/demo/shapes.safetensors \
        --lora logs/shapes_lora/star_lora/star_lora.safetensors --n 4 --out star_sheet.png

The pictures are those of ``python -m ldm.eval geneval --focus-shape star --n N --images-per-prompt 4`` (same
prompts, same seeds); each is framed green when the analyzer finds a star (of the asked color, where one is
asked) and red when it does not, and ``--out``'s ``.txt`` lists each picture's prompt and what was found.
"""
from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from ldm.cli.sample import parse_lora_arg
from ldm.data.shapes import SHAPES
from ldm.eval.analyzer import analyze
from ldm.eval.geneval import _describe, focus_found, make_eval_prompts
from ldm.pipeline import Text2Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]")
    parser.add_argument("--n", type=int, default=4, help="prompts per category")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="pixel zoom of the sheet")
    parser.add_argument("--out", required=True, help="the sheet, a .png")
    args = parser.parse_args()
    pipe = Text2Image.from_checkpoint(args.ckpt)
    for value in args.lora:
        pipe.load_lora(*parse_lora_arg(value))
    prompts = make_eval_prompts(args.n, args.seed, focus="star")
    k, cell, lines, rows = args.images_per_prompt, 64 * args.scale + 8, [], []
    for p, (category, prompt, spec) in enumerate(prompts):
        seeds = [args.seed + p * k + j for j in range(k)]
        images = pipe([prompt] * k, seeds=seeds, height=64, width=64).images
        row = []
        for seed, image in zip(seeds, images):
            found = analyze(image, shapes=SHAPES + ("star",))
            ok = focus_found(spec, "star", found)
            row.append((image, ok))
            lines.append(f"{p * k + len(row) - 1:4d} {'STAR' if ok else 'none'} | {category} | {prompt!r} seed {seed}"
                         f" | {'; '.join(_describe(found))}")
        rows.append(row)
    sheet = Image.new("RGB", (cell * k, cell * len(rows)), (0, 0, 0))
    for r, row in enumerate(rows):
        for c, (image, ok) in enumerate(row):
            x, y = c * cell, r * cell
            ImageDraw.Draw(sheet).rectangle([x, y, x + cell - 1, y + cell - 1], fill=(0, 170, 0) if ok else (200, 0, 0))
            sheet.paste(image.resize((64 * args.scale,) * 2, Image.NEAREST), (x + 4, y + 4))
    sheet.save(args.out)
    with open(args.out.rsplit(".", 1)[0] + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{sum(ok for row in rows for _, ok in row)} of {len(lines)} pictures show a star; {args.out}")


if __name__ == "__main__":
    main()
