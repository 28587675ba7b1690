"""Helpers shared by the command lines: A1111-style generation parameters (PNG ``parameters`` text chunk),
numbered output files, image grids and model hashes.

The ``parameters`` text is what the popular UIs write and read back::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: x
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Mapping, NoReturn, Sequence

from PIL import Image, PngImagePlugin

from ldm.io import model_hash

__all__ = [
    "format_parameters",
    "parse_parameters",
    "parse_parameters_by_label",
    "read_png_parameters",
    "save_png",
    "save_new_png",
    "exiting",
    "next_index",
    "make_grid",
    "model_hash",
]

# pipeline key -> A1111 label, in the order the UIs write them ("Size" is width x height, handled apart)
_LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
    "vae_hash": "VAE hash",
    "vae": "VAE",
    "strength": "Denoising strength",
    "eta": "Eta",
    "guidance_rescale": "Guidance rescale",
    "mask": "Mask",
    "lora_hashes": "Lora hashes",
    "hires_scale": "Hires upscale",
    "hires_steps": "Hires steps",
    "hires_upscaler": "Hires upscaler",
    "ti_hashes": "TI hashes",
    # SDXL: micro-conditioning that differs from the defaults, and the refiner as A1111 writes it
    "original_size": "Original size",
    "crop_coords_top_left": "Crop top left",
    "target_size": "Target size",
    "aesthetic_score": "Aesthetic score",
    "negative_aesthetic_score": "Negative aesthetic score",
    "refiner": "Refiner",
    "refiner_switch": "Refiner switch at",
}
# (height, width) / (top, left) pairs, written "WxH" like Size and "TOPxLEFT"
_PAIR_KEYS = ("original_size", "target_size", "crop_coords_top_left")
_KEYS = {label: key for key, label in _LABELS.items()}
_INT_KEYS = ("steps", "seed", "hires_steps")
_FLOAT_KEYS = ("cfg_scale", "strength", "eta", "guidance_rescale", "hires_scale", "aesthetic_score",
               "negative_aesthetic_score", "refiner_switch")
# "Label: value" pairs of the last line; a value is a JSON string or runs to the next comma
_PARAM_RE = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _format_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_parameters(params: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text for one image's parameter dict (as :class:`ldm.pipeline.PipelineOutput`
    gives it). Zero eta / rescale and absent values are left out, as the UIs do."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"{_NEGATIVE} {params['negative_prompt']}")
    fields = []
    for key, label in _LABELS.items():
        if key == "size":
            if params.get("width") is not None and params.get("height") is not None:
                fields.append(f"Size: {params['width']}x{params['height']}")
            continue
        value = params.get(key)
        if value is None or (key in ("eta", "guidance_rescale") and not value):
            continue
        if key in _PAIR_KEYS:
            first, second = value
            value = f"{first}x{second}" if key.startswith("crop") else f"{second}x{first}"
        elif key == "refiner" and params.get("refiner_hash"):
            value = f"{value} [{params['refiner_hash']}]"
        fields.append(f"{label}: {_quote(_format_number(value))}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _typed(key: str, value: str) -> Any:
    try:
        if key in _INT_KEYS:
            return int(value)
        if key in _FLOAT_KEYS:
            return float(value)
    except ValueError:
        pass
    return value


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 ``parameters`` text back into a dict with the keys :func:`format_parameters` takes
    (``prompt``, ``negative_prompt``, ``steps``, ``sampler``, ``cfg_scale``, ``seed``, ``width``, ``height`` ...).
    Labels this project does not know are kept under their own name."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if len(_PARAM_RE.findall(last)) < 3:  # no settings line: everything is prompt
        last = ""
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for label, raw in _PARAM_RE.findall(last):
        label, value = label.strip(), _unquote(raw)
        key = _KEYS.get(label, label)
        if key == "size":
            match = re.fullmatch(r"(\d+)x(\d+)", value)
            if match:
                out["width"], out["height"] = int(match.group(1)), int(match.group(2))
                continue
        if key in _PAIR_KEYS:
            match = re.fullmatch(r"(\d+)x(\d+)", value)
            if match:
                a, b = int(match.group(1)), int(match.group(2))
                out[key] = (a, b) if key.startswith("crop") else (b, a)
                continue
        if key == "refiner":
            match = re.fullmatch(r"(.*) \[([0-9a-fA-F]+)\]", value)
            if match:
                out["refiner"], out["refiner_hash"] = match.group(1), match.group(2)
                continue
        out[key] = _typed(key, value)
    return out


def parse_parameters_by_label(text: str) -> dict[str, Any]:
    """:func:`parse_parameters` keyed by the UIs' own labels ("Prompt", "Negative prompt", "Steps", "Sampler",
    "Size-1", "Size-2", ...), as A1111's ``/sdapi/v1/png-info`` returns them."""
    params = parse_parameters(text)
    out: dict[str, Any] = {"Prompt": params.pop("prompt"), "Negative prompt": params.pop("negative_prompt")}
    if "width" in params and "height" in params:
        out["Size-1"], out["Size-2"] = params.pop("width"), params.pop("height")
    for key, value in params.items():
        out[_LABELS.get(key, key)] = value
    return out


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``parameters`` chunk of a PNG, or None when it has none."""
    with Image.open(path) as image:
        text = image.info.get("parameters")
    return parse_parameters(text) if text else None


def exiting(status: int) -> int:
    """``status``, for a command line's ``sys.exit(exiting(main()))``: every object alive now is moved out of the
    garbage collector's view (``gc.freeze``) so that the interpreter's shutdown does not walk them all again (with
    torch loaded ~0.3 s of a quiet 2-core machine, 1-1.7 s of a busy one). Only where the process ends next: frozen
    objects are never collected."""
    gc.freeze()
    return status


def exit_now(status: int) -> NoReturn:
    """End the process with ``status`` as a command line's last act, without the interpreter's teardown: the
    ``atexit`` handlers run (logging's flush among them) and stdout / stderr are flushed as at a normal exit, but
    the modules are not torn down one object at a time (with torch loaded ~0.1 s of a quiet 2-core machine, ~0.2 s
    of a busy one: ``python bench/bench_cold_start.py``). Only for ``__main__``: it never returns to a caller."""
    import atexit
    import sys

    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException:  # a handler that fails, or a closed pipe: the normal exit, which reports it
        sys.exit(status)
    os._exit(status)


def save_png(image: Image.Image, path: str | os.PathLike | BinaryIO, parameters: str | None = None
             ) -> Path | BinaryIO:
    """Save ``image`` as PNG (to a path or an open binary file), with the ``parameters`` text chunk when given."""
    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def save_new_png(image: Image.Image, folder: str | os.PathLike, parameters: str | None = None, *, prefix: str = "",
                 digits: int = 5, start: int | None = None) -> Path:
    """Save ``image`` as the first free ``<prefix><number>.png`` in ``folder`` from ``start`` (default:
    :func:`next_index`). Each file is created exclusively, so runs writing into one folder at the same time never
    overwrite each other's images: a number another run took moves this one on to the next."""
    folder = Path(folder)
    index = next_index(folder, prefix, digits) if start is None else start
    while True:
        path = folder / f"{prefix}{index:0{digits}d}.png"
        try:
            f = open(path, "xb")
        except FileExistsError:
            index += 1
            continue
        try:
            with f:
                save_png(image, f, parameters)
        except BaseException:
            path.unlink(missing_ok=True)  # no half-written image left behind
            raise
        return path


def next_index(folder: str | os.PathLike, prefix: str = "", digits: int = 5) -> int:
    """One more than the highest ``<prefix><number>.png`` in ``folder`` (0 for none): new files never
    overwrite old ones, even when some were deleted."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d{{{digits},}})\.png")
    numbers = [int(m.group(1)) for name in _listdir(folder) if (m := pattern.fullmatch(name))]
    return max(numbers) + 1 if numbers else 0


def _listdir(folder: str | os.PathLike) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def make_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Paste ``images`` row by row into one image with ``rows`` rows (columns: as many as needed)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid
