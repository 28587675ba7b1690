"""``python sample.py``: text-to-image, img2img and inpainting from the command line.

    python sample.py --prompt "two red circles above a blue square"          # the embedded demo model
    python sample.py --ckpt sd-v1-5.safetensors --prompt "a cactus in a straw hat" --H 512 --W 512
    python sample.py --ckpt model.safetensors --init-img in.png --strength 0.6 --prompt "..."
    python sample.py --ckpt model.safetensors --init-img in.png --mask mask.png --prompt "..."
    python sample.py --ckpt sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors --prompt "..."

Images go to ``<outdir>/samples/NNNNN.png`` (numbered on from what is there) and a grid of the run to
``<outdir>/grid-NNNN.png`` (one row per --n_iter), each with an A1111-style ``parameters`` PNG text chunk.
Every bad input is reported as one line (exit status 2), before the model is loaded where possible.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ldm.adapters import may_have_lora_tags
from ldm.cli.common import format_parameters, make_grid, next_index, save_new_png

log = logging.getLogger("sample")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CKPT = PACKAGE_DIR / "assets" / "demo" / "shapes.safetensors"
DEFAULT_PROMPT = "two red circles above a blue square"
DEFAULT_SLICE_ROWS = 1024
PROG = "sample.py"
# sane bounds on what one command may ask for (--no-limits lifts them): beyond these a typo, not a wish
LIMITS = {"--steps": 1000, "--n_samples": 64, "--n_iter": 1000, "--H": 8192, "--W": 8192}


class UsageError(ValueError):
    """A bad command line: one line naming the problem and the fix."""


# ------------------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------------------

def _names(*names: str) -> list[str]:
    """Each flag with both spellings: --n_iter and --n-iter."""
    out: list[str] = []
    for name in names:
        for spelling in (name, "--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
            if spelling not in out:
                out.append(spelling)
    return out


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate images from text (and images) with a latent "
                                "diffusion model.")
    g = p.add_argument_group("what to draw")
    g.add_argument(*_names("--prompt"), default=None, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    g.add_argument(*_names("--from-file"), dest="from_file", default=None, help="file with one prompt per line")
    g.add_argument(*_names("--negative-prompt"), dest="negative_prompt", default="", help="what to steer away from")
    g.add_argument(*_names("--init-img"), dest="init_img", default=None, help="start image (img2img)")
    g.add_argument(*_names("--strength"), type=float, default=None,
                   help="img2img: how much to change the init image, in (0, 1] (default 0.75; 1.0 with --mask)")
    g.add_argument(*_names("--mask"), default=None, help="inpainting mask, white = repaint (needs --init-img)")

    g = p.add_argument_group("prompt syntax and embeddings")
    g.add_argument(*_names("--prompt-syntax"), dest="prompt_syntax", default="a1111", choices=("a1111", "plain"),
                   help="a1111 (default): (word:1.2) / (word) / [word] weights, BREAK, prompts over 75 tokens in "
                        "chunks, embeddings by name; plain: the prompt goes to the text encoder as it is")
    g.add_argument(*_names("--embedding"), dest="embeddings", action="append", default=[], metavar="FILE",
                   help="textual-inversion embedding (.pt, .safetensors, learned_embeds.bin), called in the prompt "
                        "by its file name; repeatable")
    g.add_argument(*_names("--embeddings-dir"), dest="embeddings_dir", default=None, metavar="DIR",
                   help="load every embedding in DIR that fits the model")

    g = p.add_argument_group("sampling")
    g.add_argument(*_names("--n_samples"), type=int, default=4, help="images per batch (default %(default)s)")
    g.add_argument(*_names("--n_iter"), type=int, default=1, help="batches: rows of the grid (default %(default)s)")
    g.add_argument(*_names("--steps", "--ddim_steps"), dest="steps", type=int, default=20,
                   help="sampling steps (default %(default)s)")
    g.add_argument(*_names("--sampler"), default="DPM++ 2M Karras",
                   help="sampler name or alias (default %(default)r; see --list-samplers)")
    g.add_argument(*_names("--list-samplers"), dest="list_samplers", action="store_true",
                   help="print the sampler names and aliases, then exit")
    g.add_argument(*_names("--scale"), type=float, default=7.5,
                   help="classifier-free guidance scale (default %(default)s)")
    g.add_argument(*_names("--guidance-rescale"), dest="guidance_rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (for zero-terminal-SNR models)")
    g.add_argument(*_names("--eta"), type=float, default=None,
                   help="noise of DDIM (default 0: deterministic) and of the ancestral/SDE samplers (default 1)")
    g.add_argument(*_names("--seed"), type=int, default=42,
                   help="seed of the first image; image i uses seed + i (default %(default)s; -1: random)")
    g.add_argument(*_names("--fixed_code"), dest="fixed_code", action="store_true",
                   help="every batch starts from the same noise (seeds restart at --seed)")
    g.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's size)")
    g.add_argument("--W", type=int, default=None, help="width in pixels (default: the model's size)")

    g = p.add_argument_group("hires fix (txt2img)")
    g.add_argument(*_names("--hires-scale"), dest="hires_scale", type=float, default=None, metavar="SCALE",
                   help="sample, upscale by SCALE (e.g. 2) and sample again as img2img at the larger size")
    g.add_argument(*_names("--hires-strength"), dest="hires_strength", type=float, default=0.7,
                   help="denoising strength of the second pass, in (0, 1] (default %(default)s)")
    g.add_argument(*_names("--hires-steps"), dest="hires_steps", type=int, default=None,
                   help="steps of the second pass (default: --steps)")
    g.add_argument(*_names("--hires-upscaler"), dest="hires_upscaler", default="latent",
                   choices=("latent", "latent-nearest", "image"),
                   help="latent (default): resize the latents (bilinear; latent-nearest: nearest); image: decode, "
                        "resize with Lanczos and encode")
    g = p.add_argument_group("SDXL (micro-conditioning and the refiner)")
    g.add_argument(*_names("--original-size"), dest="original_size", type=int, nargs=2, metavar=("H", "W"),
                   default=None, help="the original image size the model is told (default: the output size)")
    g.add_argument(*_names("--crop-coords"), dest="crop_coords", type=int, nargs=2, metavar=("TOP", "LEFT"),
                   default=None, help="the crop's top-left corner the model is told (default: 0 0)")
    g.add_argument(*_names("--target-size"), dest="target_size", type=int, nargs=2, metavar=("H", "W"),
                   default=None, help="the target size the model is told (default: the output size)")
    g.add_argument(*_names("--refiner"), default=None,
                   help="an SDXL refiner checkpoint: it denoises the last steps (see --refiner-switch)")
    g.add_argument(*_names("--refiner-switch"), dest="refiner_switch", type=float, default=0.8,
                   help="fraction of the steps the base model runs before the refiner (default %(default)s)")
    g.add_argument(*_names("--aesthetic-score"), dest="aesthetic_score", type=float, default=None,
                   help="the refiner's aesthetic-score conditioning (default 6)")
    g.add_argument(*_names("--negative-aesthetic-score"), dest="negative_aesthetic_score", type=float,
                   default=None, help="the refiner's aesthetic score for the negative branch (default 2.5)")

    g = p.add_argument_group("model")
    g.add_argument(*_names("--ckpt"), default=None,
                   help=f"checkpoint (.safetensors or .ckpt) or a diffusers pipeline folder; default: the embedded "
                        f"demo model {DEFAULT_CKPT}")
    g.add_argument(*_names("--config"), default=None, help="model config YAML (default: inferred from the file)")
    ema = g.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="use the EMA weights")
    ema.add_argument(*_names("--no-ema"), dest="use_ema", action="store_false", help="ignore the EMA weights")
    g.add_argument(*_names("--lora"), dest="lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA / LoCon / LoHa / LoKr file (kohya, diffusers or LyCORIS) with WEIGHT "
                        "(default 1); repeatable")
    g.add_argument(*_names("--lora-dir"), dest="lora_dir", default=None, metavar="DIR",
                   help="folder of the LoRAs that prompts name as <lora:NAME:WEIGHT> (A1111's syntax)")
    g.add_argument(*_names("--vae"), default=None, metavar="FILE",
                   help="a separate VAE file in place of the model's (SD's names, first_stage_model.* or diffusers')")
    param = g.add_mutually_exclusive_group()
    param.add_argument("--v", dest="parameterization", action="store_const", const="v",
                       help="the model predicts v (SD 2.x 768-v) and no --config says so")
    param.add_argument("--parameterization", choices=("eps", "v", "x0"), default=None)

    g = p.add_argument_group("output")
    g.add_argument(*_names("--outdir"), default=None, help="output folder (default: outputs/<task>-samples)")
    g.add_argument(*_names("--skip_grid"), dest="skip_grid", action="store_true", help="do not save the grid")
    g.add_argument(*_names("--skip_save"), dest="skip_save", action="store_true",
                   help="do not save the single images")
    g.add_argument(*_names("--no-metadata"), dest="no_metadata", action="store_true",
                   help="no 'parameters' text chunk in the PNGs")

    g = p.add_argument_group("speed and memory")
    g.add_argument(*_names("--device"), default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    g.add_argument(*_names("--precision"), default="auto",
                   choices=("auto", "fp32", "bf16", "fp16", "autocast", "full"),
                   help="auto: fp16 on CUDA, fp32 on CPU")
    g.add_argument(*_names("--vae-precision"), dest="vae_precision", default="auto", choices=("auto", "fp32", "same"),
                   help="the VAE's precision: auto (default: as --precision with bf16, fp32 with fp16, whose "
                        "range would overflow into black images), fp32, or same (as --precision)")
    g.add_argument(*_names("--unet-weights"), dest="unet_weights", default="compute", choices=("compute", "fp32"),
                   help="compute (default): with bf16/fp16 store the UNet's conv/linear weights in that dtype "
                        "(same images, half the UNet's memory); fp32: keep float32 weights, cast on the fly")
    g.add_argument(*_names("--attention"), default=None, choices=("sdpa", "xformers", "math", "blocked", "auto"),
                   help="attention backend (default: the model's, auto: xformers on CUDA when installed; on a CPU "
                        "blocked, on the compiled fused kernel where it builds (AVX-512 BF16 and a C++ compiler), "
                        "else the Python blocks for bf16 at one thread; else sdpa)")
    g.add_argument(*_names("--attention-slicing"), dest="attention_slicing", type=int, nargs="?",
                   const=DEFAULT_SLICE_ROWS, default=None,
                   help=f"attention in chunks of N query rows (default N {DEFAULT_SLICE_ROWS})")
    g.add_argument(*_names("--vae-tiling"), dest="vae_tiling", action="store_true",
                   help="decode large images tile by tile")
    g.add_argument(*_names("--cpu-offload"), dest="cpu_offload", action="store_true",
                   help="keep weights on the CPU, move each part to the device only while it runs")
    g.add_argument(*_names("--channels-last"), dest="channels_last", action="store_true", default=None,
                   help="channels-last memory format for the UNet and VAE (default: the VAE on a CPU)")
    g.add_argument(*_names("--compile"), action="store_true", help="torch.compile the UNet")
    g.add_argument(*_names("--no-limits"), dest="no_limits", action="store_true",
                   help="lift the bounds on " + ", ".join(f"{flag} ({n})" for flag, n in LIMITS.items())
                   + " and the check that a batch fits in free memory")
    return p


# ------------------------------------------------------------------------------------------------------------
# checks before anything is loaded
# ------------------------------------------------------------------------------------------------------------

def _require_file(path: str | None, what: str, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"{what} not found: {path} (check {flag})")
    return Path(path)


def _image_size(path: Path, flag: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.load()  # the whole file: a truncated image fails here, not after the model has loaded
            return image.size
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path} is not a readable image ({type(e).__name__}); check {flag}") from e


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of one iteration: --n_samples copies of --prompt, or the lines of --from-file."""
    if args.from_file is None:
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        return [prompt] * args.n_samples
    path = _require_file(args.from_file, "prompt file", "--from-file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


def _check_text(text: str | None, flag: str) -> None:
    """Text that can be written into the PNG metadata: bytes that are not UTF-8 reach Python as lone surrogates."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{flag} holds bytes that are not UTF-8 text (at character {e.start}): pass it as UTF-8"
                         ) from e


def check_seeds(args: argparse.Namespace, n_prompts: int) -> None:
    """The last image's seed (--seed + images - 1, or + the prompts of one pass with --fixed_code) in range too."""
    from ldm.diffusion.samplers import check_seed

    last = args.seed + (n_prompts if args.fixed_code else n_prompts * args.n_iter) - 1
    _owner_check(check_seed, last, f"the last image's seed (--seed {args.seed} + {last - args.seed})")


def _check_sampler(name: str) -> None:
    from ldm.diffusion import samplers

    try:
        samplers.get_sampler(name)
    except (KeyError, ValueError) as e:
        raise UsageError(f"unknown sampler {name!r}; choose one of: {', '.join(samplers.SAMPLERS)} "
                         "(--list-samplers shows the aliases)") from e


def _owner_check(check, value, flag: str) -> None:
    """The range check of the layer that owns the value (the sampler, the guidance), its error named by flag."""
    try:
        check(value, flag)
    except ValueError as e:
        raise UsageError(str(e)) from e


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model; raises UsageError (one line)."""
    if args.from_file is not None and args.prompt is not None:
        raise UsageError("--prompt and --from-file both given: use one of them")
    from ldm.diffusion.guidance import check_guidance_rescale, check_guidance_scale
    from ldm.diffusion.samplers import check_eta, check_seed, check_steps, check_strength

    for flag, value in (("--n_samples", args.n_samples), ("--n_iter", args.n_iter)):
        if value < 1:
            raise UsageError(f"{flag} is {value}: use at least 1")
    _owner_check(check_steps, args.steps, "--steps")
    if not args.no_limits:
        for flag, limit in LIMITS.items():
            value = getattr(args, flag[2:])
            if value is not None and value > limit:
                raise UsageError(f"{flag} {value} is over the limit of {limit}: use a smaller value, or --no-limits "
                                 "if you mean it")
    for flag in ("--prompt", "--negative-prompt"):
        _check_text(getattr(args, flag[2:].replace("-", "_")), flag)
    _owner_check(check_guidance_scale, args.scale, "--scale")
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"{flag} {value} is not a positive multiple of 8: use e.g. {max(8, value // 8 * 8)}")
    if args.strength is not None:
        _owner_check(check_strength, args.strength, "--strength")
    if args.strength is not None and args.init_img is None:
        raise UsageError("--strength needs --init-img (the image to start from)")
    if args.mask is not None and args.init_img is None:
        raise UsageError("--mask needs --init-img (the image to repaint)")
    _owner_check(check_guidance_rescale, args.guidance_rescale, "--guidance-rescale")
    if args.hires_scale is not None:
        if args.init_img is not None:
            raise UsageError("--hires-scale is for txt2img: drop it with --init-img (or upscale the init image)")
        if not args.hires_scale >= 1:
            raise UsageError(f"--hires-scale {args.hires_scale} is below 1: use e.g. 2")
        _owner_check(check_strength, args.hires_strength, "--hires-strength")
        if args.hires_steps is not None:
            _owner_check(check_steps, args.hires_steps, "--hires-steps")
    elif args.hires_steps is not None or args.hires_strength != 0.7 or args.hires_upscaler != "latent":
        raise UsageError("--hires-strength, --hires-steps and --hires-upscaler need --hires-scale (e.g. 2)")
    if args.seed >= 0:
        _owner_check(check_seed, args.seed, "--seed")
    _owner_check(check_eta, args.eta, "--eta")
    _check_sampler(args.sampler)
    _check_sdxl_args(args)
    if args.ckpt is not None and Path(args.ckpt).is_dir():
        if not (Path(args.ckpt) / "model_index.json").is_file():
            raise UsageError(f"{args.ckpt} is a folder without model_index.json: pass a checkpoint file or a "
                             "diffusers pipeline folder (--ckpt)")
    else:
        _require_file(args.ckpt, "checkpoint", "--ckpt")
    _require_file(args.vae, "VAE file", "--vae")
    for path in args.embeddings:
        _require_file(path, "embedding", "--embedding")
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).is_dir():
        raise UsageError(f"embeddings folder not found: {args.embeddings_dir} (check --embeddings-dir)")
    if args.prompt_syntax == "plain" and (args.embeddings or args.embeddings_dir):
        raise UsageError("embeddings are called by name in the prompt, which --prompt-syntax plain does not read: "
                         "drop --prompt-syntax plain")
    if args.config is not None:
        from ldm.config import find_config

        args.config = str(find_config(args.config))  # configs/sd/... also from outside the repository
    _require_file(args.config, "config", "--config")
    init = _require_file(args.init_img, "init image", "--init-img")
    mask = _require_file(args.mask, "mask", "--mask")
    if init is not None:
        init_size = _image_size(init, "--init-img")
        if mask is not None and _image_size(mask, "--mask") != init_size:
            w, h = _image_size(mask, "--mask")
            raise UsageError(f"mask is {w}x{h} but the init image is {init_size[0]}x{init_size[1]}: "
                             "give a mask of the same size")


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` of --lora -> (path, weight); a file name may itself hold ':' (the weight is the part after
    the last ':' when it is a number)."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(value), 1.0


def _check_loras(args: argparse.Namespace, prompts: list[str]) -> None:
    """--lora files exist, --lora-dir is a folder and every <lora:NAME:...> of the prompts is in it."""
    for value in args.lora:
        _require_file(str(parse_lora_arg(value)[0]), "LoRA file", "--lora")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise UsageError(f"LoRA folder not found: {args.lora_dir} (check --lora-dir)")
    if not may_have_lora_tags(prompts):
        return
    from ldm.adapters.lora import extract_lora_tags, find_lora

    for prompt in prompts:
        for tag in extract_lora_tags(prompt)[1]:
            if args.lora_dir is None:
                raise UsageError(f"the prompt names <lora:{tag.name}:...> but no --lora-dir is given: pass the "
                                 "folder of your LoRA files")
            find_lora(tag.name, args.lora_dir)


def _check_sdxl_args(args: argparse.Namespace) -> None:
    for flag, value in (("--original-size", args.original_size), ("--crop-coords", args.crop_coords),
                        ("--target-size", args.target_size)):
        if value is not None and min(value) < 0:
            raise UsageError(f"{flag} {value[0]} {value[1]} has a negative number: use sizes/offsets in pixels >= 0")
    if not 0.0 <= args.refiner_switch <= 1.0:
        raise UsageError(f"--refiner-switch {args.refiner_switch} is outside [0, 1]: use e.g. 0.8")
    _require_file(args.refiner, "refiner checkpoint", "--refiner")
    for flag, value in (("--aesthetic-score", args.aesthetic_score),
                        ("--negative-aesthetic-score", args.negative_aesthetic_score)):
        if value is not None and args.refiner is None:
            raise UsageError(f"{flag} is the refiner's conditioning: it needs --refiner")


def resolve_checkpoint(ckpt: str | None) -> Path:
    """--ckpt, or the embedded demo model; a one-line error when there is neither."""
    if ckpt is not None:
        return Path(ckpt)
    if DEFAULT_CKPT.is_file():
        log.info("no --ckpt given: using the embedded demo model %s", DEFAULT_CKPT)
        return DEFAULT_CKPT
    raise UsageError(f"no --ckpt given and the embedded demo model {DEFAULT_CKPT} is not there: pass a checkpoint, "
                     "e.g. --ckpt sd-v1-5.safetensors (add --config or --v for a v-model if needed)")


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

def _task(args: argparse.Namespace) -> str:
    return "inpaint" if args.mask else "img2img" if args.init_img else "txt2img"


def load_pipeline(args: argparse.Namespace):
    from ldm import pipeline

    cls = {"txt2img": pipeline.Text2Image, "img2img": pipeline.Image2Image, "inpaint": pipeline.Inpaint}[_task(args)]
    ckpt = resolve_checkpoint(args.ckpt)
    options = dict(use_ema=args.use_ema, device=args.device, precision=args.precision,
                   attention=args.attention, attention_slicing=args.attention_slicing,
                   vae_tiling=args.vae_tiling, cpu_offload=args.cpu_offload,
                   channels_last=args.channels_last, compile=args.compile,
                   unet_weights=args.unet_weights, vae_precision=args.vae_precision, prompt_syntax=args.prompt_syntax)
    pipe = cls.from_checkpoint(ckpt, args.config, parameterization=args.parameterization, **options)
    if args.refiner is not None:  # its config is inferred from its own file
        pipe.set_refiner(cls.from_checkpoint(args.refiner, None, **options), args.refiner_switch)
    if args.vae is not None:
        pipe.load_vae(args.vae)
    pipe.lora_dir = args.lora_dir
    for value in args.lora:
        path, weight = parse_lora_arg(value)
        pipe.load_lora(path, weight)
    if args.embeddings_dir is not None:
        pipe.load_embeddings_dir(args.embeddings_dir)
    for path in args.embeddings:
        pipe.load_embedding(path)
    pipe.memory_check = not args.no_limits
    if _task(args) == "txt2img":  # before the first image (img2img sizes follow the image: the pipeline checks)
        scale = args.hires_scale or 1  # the hires pass decodes at the larger size
        pipe.check_memory(args.n_samples, int((args.H or pipe.default_size) * scale),
                          int((args.W or pipe.default_size) * scale))
    m = pipe.size_multiple
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and value % m:
            raise UsageError(f"{flag} {value} is not a multiple of {m} (this model's VAE factor "
                             f"{pipe.downsample_factor} x UNet factor {m // pipe.downsample_factor}): "
                             f"use e.g. {max(m, value // m * m)}")
    return pipe


class _Progress:
    """A tqdm bar over images and one over the steps of the current batch."""

    def __init__(self, total_images: int):
        from tqdm import tqdm  # the terminal's bar (tqdm.auto would look for a notebook first)

        self._tqdm = tqdm
        self.images = tqdm(total=total_images, desc="images", unit="img", position=0)
        self.steps = None

    def step(self, info: dict) -> None:
        if self.steps is None:
            self.steps = self._tqdm(total=info.get("total_steps"), desc="steps", unit="step", position=1,
                                    leave=False)
        self.steps.update(1)

    def batch_done(self, n: int) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
        self.images.update(n)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
        self.images.close()


def _call_kwargs(args: argparse.Namespace, pipe) -> dict:
    kwargs = dict(negative_prompts=args.negative_prompt, height=args.H, width=args.W, steps=args.steps,
                  sampler=args.sampler, guidance_scale=args.scale, guidance_rescale=args.guidance_rescale,
                  eta=args.eta)
    micro = {"original_size": args.original_size, "crop_coords_top_left": args.crop_coords,
             "target_size": args.target_size, "aesthetic_score": args.aesthetic_score,
             "negative_aesthetic_score": args.negative_aesthetic_score}
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in micro.items() if v is not None})
    task = _task(args)
    if task != "txt2img":
        kwargs["init_images"] = Image.open(args.init_img).convert("RGB")
        kwargs["strength"] = args.strength if args.strength is not None else (1.0 if task == "inpaint" else 0.75)
    if task == "inpaint":
        kwargs["masks"] = Image.open(args.mask).convert("L")
    if args.hires_scale is not None:
        kwargs.update(hires_scale=args.hires_scale, hires_strength=args.hires_strength, hires_steps=args.hires_steps,
                      hires_upscaler=args.hires_upscaler)
    return kwargs


def generate(args: argparse.Namespace, pipe, prompts: list[str]) -> tuple[list[Path], Path | None, int]:
    """Run --n_iter passes over the prompts in batches of --n_samples, saving as it goes."""
    outdir = Path(args.outdir or f"outputs/{_task(args)}-samples")
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(sample_dir)
    kwargs = _call_kwargs(args, pipe)
    images, parameters, saved, count = [], [], [], 0
    progress = _Progress(args.n_iter * len(prompts))
    try:
        for iteration in range(args.n_iter):
            for start in range(0, len(prompts), args.n_samples):
                batch = prompts[start:start + args.n_samples]
                offset = start if args.fixed_code else iteration * len(prompts) + start
                out = pipe(batch, seeds=args.seed + offset, callback=progress.step, **kwargs)
                for image, params in zip(out.images, out.parameters):
                    if not args.skip_save:
                        saved.append(save_new_png(image, sample_dir, _metadata(args, params), start=index))
                        index = int(saved[-1].stem) + 1
                if not args.skip_grid:  # the grid needs them all; without it, keep nothing
                    images += out.images
                    parameters += out.parameters
                count += len(out.images)
                progress.batch_done(len(batch))
    finally:
        progress.close()
    grid = None
    if not args.skip_grid and images:
        grid = save_new_png(make_grid(images, rows=args.n_iter), outdir, _metadata(args, parameters[0]),
                            prefix="grid-", digits=4)
    return saved, grid, count


def _metadata(args: argparse.Namespace, params: dict) -> str | None:
    return None if args.no_metadata else format_parameters(params)


def sampler_alias(name: str) -> str:
    """The snake-case spelling of a sampler name ("DPM++ 2M Karras" -> "dpmpp_2m_karras")."""
    return name.lower().replace("++", "pp").replace(" ", "_")


def list_samplers() -> str:
    """One line per registered sampler: its name and its snake-case alias."""
    from ldm.diffusion import samplers

    width = max(len(name) for name in samplers.SAMPLERS)
    lines = [f"{name:<{width}}  {sampler_alias(name)}" for name in samplers.SAMPLERS]
    lines.append("(names are case-insensitive; '_', '-' and ' ' are the same; also k_ prefixes, 'pndm' = PLMS)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of sample.py, ``ldm-sample`` and ``python -m ldm.sample`` (``prog``, the name that usage and
    error lines show); returns the exit status (2 for bad input, with one line on stderr)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own one-line usage errors
        return int(e.code or 0)
    if args.list_samplers:
        print(list_samplers())
        return 0
    start = time.perf_counter()
    if args.seed < 0:
        args.seed = random.randrange(2**31)
        log.info("random seed %d", args.seed)
    try:
        check_args(args)
        prompts = read_prompts(args)
        check_seeds(args, len(prompts))
        _check_loras(args, prompts)
        pipe = load_pipeline(args)
        saved, grid, count = generate(args, pipe, prompts)
    except (ValueError, OSError) as e:  # UsageError, ConfigError, CheckpointError, unreadable files
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
    where = [f"{len(saved)} images in {saved[0].parent}" if saved else f"{count} images (not saved)"]
    if grid is not None:
        where.append(f"grid {grid}")
    print(f"done: {', '.join(where)} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
