"""sample.py end to end on a tiny random checkpoint: outputs, numbering, metadata, seeds, errors."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import common
from ldm.cli import sample as cli
from tiny_models import tiny_ckpt  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--H", "32", "--W", "32", "--device", "cpu"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


# ---- the parameters text ---------------------------------------------------------------------------------

def test_parameters_round_trip():
    params = {"prompt": "a red circle, large\nleft of: a square", "negative_prompt": "blurry, dark", "steps": 20,
              "sampler": "DPM++ 2M Karras", "cfg_scale": 7.5, "seed": 42, "width": 512, "height": 768,
              "model_hash": "0123456789", "model": "sd v1,5", "strength": 0.75, "eta": 0.0}
    text = common.format_parameters(params)
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, '
                                     'Size: 512x768, Model hash: 0123456789, Model: "sd v1,5", '
                                     'Denoising strength: 0.75')
    assert "Negative prompt: blurry, dark" in text
    back = common.parse_parameters(text)
    expected = {k: v for k, v in params.items() if k != "eta"}  # eta 0 is not written, as the UIs do
    assert back == expected


def test_parse_reads_text_written_by_the_uis():
    text = ("masterpiece, a cat\nNegative prompt: lowres\nSteps: 30, Sampler: Euler a, CFG scale: 7, "
            "Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2")
    back = common.parse_parameters(text)
    assert back["prompt"] == "masterpiece, a cat" and back["negative_prompt"] == "lowres"
    assert (back["steps"], back["sampler"], back["cfg_scale"], back["seed"]) == (30, "Euler a", 7.0, 1234)
    assert (back["width"], back["height"], back["Clip skip"]) == (512, 512, "2")
    assert common.parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_next_index_and_grid(tmp_path):
    assert common.next_index(tmp_path / "missing") == 0
    for name in ("00000.png", "00007.png", "notes.png", "grid-0002.png"):
        (tmp_path / name).touch()
    assert common.next_index(tmp_path) == 8
    assert common.next_index(tmp_path, "grid-", 4) == 3
    tiles = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(6)]
    grid = common.make_grid(tiles, rows=2)
    assert grid.size == (12, 8) and grid.getpixel((4, 4)) == (160, 0, 0)


def _save_from_zero(folder: str, worker: int, count: int, barrier) -> list[str]:
    """What a sample.py run does: pick the next number once at start, then save its images from it."""
    start = common.next_index(folder)
    barrier.wait()  # every process has its start before any saves: they all begin at the same number
    paths, index = [], start
    for i in range(count):
        image = Image.new("RGB", (8, 8), (worker * 30, i * 30, 0))
        paths.append(str(common.save_new_png(image, folder, f"worker {worker} image {i}", start=index)))
        index = int(Path(paths[-1]).stem) + 1
    return paths


def test_concurrent_processes_keep_every_image(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers, count = 4, 5
    barrier = ctx.Manager().Barrier(workers)
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_save_from_zero, [(str(tmp_path), w, count, barrier) for w in range(workers)])
    paths = [p for r in results for p in r]
    assert len(set(paths)) == workers * count  # no number written twice
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}.png" for i in range(workers * count)]
    texts = {Image.open(p).text["parameters"] for p in paths}
    assert texts == {f"worker {w} image {i}" for w in range(workers) for i in range(count)}  # none overwritten


def test_save_new_png_skips_taken_numbers_and_leaves_no_partial_file(tmp_path, monkeypatch):
    (tmp_path / "grid-0000.png").write_bytes(b"taken")
    path = common.save_new_png(Image.new("RGB", (4, 4)), tmp_path, prefix="grid-", digits=4, start=0)
    assert path.name == "grid-0001.png" and (tmp_path / "grid-0000.png").read_bytes() == b"taken"

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        common.save_new_png(Image.new("RGB", (4, 4)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-0000.png", "grid-0001.png"]


def test_sampler_aliases_resolve_to_their_names(capsys):
    from ldm.diffusion.samplers import SAMPLERS, get_sampler

    code, out, _ = run(capsys, "--list-samplers")
    assert code == 0
    for name in SAMPLERS:
        assert get_sampler(cli.sampler_alias(name)).name == name
        assert name in out


# ---- runs ------------------------------------------------------------------------------------------------

def test_txt2img_outputs_numbering_and_metadata(capsys, tmp_path, tiny_ckpt):
    args = ["--ckpt", tiny_ckpt, "--outdir", tmp_path, "--prompt", "a red circle", "--negative-prompt", "blue",
            "--n_samples", "2", "--n_iter", "2", "--seed", "5", "--sampler", "euler_a", *FAST]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == ["00000.png", "00001.png", "00002.png", "00003.png"]
    grid = Image.open(tmp_path / "grid-0000.png")
    assert grid.size == (64, 64)  # 2 rows (n_iter) x 2 columns (n_samples) of 32x32
    meta = common.read_png_parameters(tmp_path / "samples" / "00003.png")
    assert meta == {"prompt": "a red circle", "negative_prompt": "blue", "steps": 2, "sampler": "Euler a",
                    "cfg_scale": 7.5, "seed": 8, "width": 32, "height": 32, "model": "tiny",
                    "model_hash": common.model_hash(tiny_ckpt)}
    last = out.strip().splitlines()[-1]
    assert last.startswith("done: 4 images in") and "grid-0000.png" in last and last.endswith(" s)")

    code, _, err = run(capsys, *args, "--skip_grid", "--n_iter", "1", "--no-metadata")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[-2:] == ["00004.png", "00005.png"]
    assert not (tmp_path / "grid-0001.png").exists()
    assert common.read_png_parameters(tmp_path / "samples" / "00004.png") is None
    # same seeds as the first run's first row: same images
    assert np.abs(_pixels(tmp_path / "samples" / "00004.png") - _pixels(tmp_path / "samples" / "00000.png")).max() <= 1


def test_seed_is_per_image_across_batch_sizes_and_fixed_code(capsys, tmp_path, tiny_ckpt):
    base = ["--ckpt", tiny_ckpt, "--prompt", "a red circle", "--skip_grid", *FAST]
    assert run(capsys, *base, "--outdir", tmp_path / "a", "--n_samples", "3", "--seed", "10")[0] == 0
    assert run(capsys, *base, "--outdir", tmp_path / "b", "--n_samples", "1", "--seed", "12")[0] == 0
    assert run(capsys, *base, "--outdir", tmp_path / "c", "--n_samples", "1", "--n_iter", "2", "--seed", "10",
               "--fixed_code")[0] == 0
    a, b, c = (tmp_path / d / "samples" for d in "abc")
    assert np.abs(_pixels(a / "00002.png") - _pixels(b / "00000.png")).max() <= 1
    assert np.abs(_pixels(c / "00000.png") - _pixels(c / "00001.png")).max() == 0  # same start code
    assert common.read_png_parameters(c / "00001.png")["seed"] == 10


def test_prompts_from_file(capsys, tmp_path, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--from_file", prompts, "--n_samples", "2", "--outdir",
                       tmp_path / "out", *FAST)
    assert code == 0, err
    written = sorted((tmp_path / "out" / "samples").iterdir())
    assert [common.read_png_parameters(p)["prompt"] for p in written] == [
        "a red circle", "a blue square", "a green triangle"]
    assert Image.open(tmp_path / "out" / "grid-0000.png").size == (96, 32)


def _write_image(path, size=(32, 32)) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_img2img_and_inpainting(capsys, tmp_path, tiny_ckpt):
    init = _write_image(tmp_path / "init.png")
    mask = Image.new("L", (32, 32))
    mask.paste(255, (0, 0, 16, 32))
    mask.save(tmp_path / "mask.png")
    common_args = ["--ckpt", tiny_ckpt, "--prompt", "a red circle", "--n_samples", "1", "--steps", "2",
                   "--init-img", init, "--device", "cpu"]
    code, _, err = run(capsys, *common_args, "--strength", "0.5", "--outdir", tmp_path / "i2i")
    assert code == 0, err
    meta = common.read_png_parameters(tmp_path / "i2i" / "samples" / "00000.png")
    assert meta["strength"] == 0.5 and (meta["width"], meta["height"]) == (32, 32)
    code, _, err = run(capsys, *common_args, "--mask", tmp_path / "mask.png", "--outdir", tmp_path / "inp")
    assert code == 0, err
    meta = common.read_png_parameters(tmp_path / "inp" / "samples" / "00000.png")
    assert meta["strength"] == 1.0


def test_embedded_default_model(capsys, tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_CKPT", tmp_path / "absent.safetensors")
    code, _, err = run(capsys, "--outdir", tmp_path, *FAST)
    assert code == 2 and "pass a checkpoint, e.g. --ckpt" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(cli, "DEFAULT_CKPT", Path(tiny_ckpt))
    code, _, err = run(capsys, "--outdir", tmp_path, "--n_samples", "1", "--seed", "-1", *FAST)
    assert code == 0, err
    meta = common.read_png_parameters(tmp_path / "samples" / "00000.png")
    assert meta["prompt"] == cli.DEFAULT_PROMPT and meta["seed"] >= 0  # -1: a random seed, recorded


# ---- errors ----------------------------------------------------------------------------------------------

def _bad_inputs(tmp_path, ckpt):
    init = _write_image(tmp_path / "init.png")
    small_mask = _write_image(tmp_path / "small_mask.png", (16, 16))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_write_image(tmp_path / "whole.png").read_bytes()[:200])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a red caf\u00e9\n".encode("latin-1"))
    return [
        (["--H", "60"], "--H 60 is not a positive multiple of 8: use e.g. 56"),
        (["--W", "0"], "--W 0 is not a positive multiple of 8"),
        (["--ckpt", tmp_path / "nope.ckpt"], "checkpoint not found"),
        (["--config", tmp_path / "nope.yaml"], "config not found"),
        (["--init-img", tmp_path / "nope.png"], "init image not found"),
        (["--init-img", init, "--mask", tmp_path / "nope.png"], "mask not found"),
        (["--from-file", tmp_path / "nope.txt"], "prompt file not found"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'; choose one of: DDPM, DDIM"),
        (["--init-img", init, "--strength", "0"], "--strength 0.0 is outside (0, 1]"),
        (["--init-img", init, "--strength", "1.5"], "--strength 1.5 is outside (0, 1]"),
        (["--from-file", empty], "has no prompts"),
        (["--init-img", init, "--mask", small_mask], "mask is 16x16 but the init image is 32x32"),
        (["--mask", small_mask], "--mask needs --init-img"),
        (["--steps", "0"], "--steps is 0: use at least 1"),
        (["--ddim_steps", "-3"], "--steps is -3"),
        (["--n_samples", "0"], "--n_samples is 0"),
        (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5 is outside [0, 1]"),
        (["--guidance-rescale", "nan"], "--guidance-rescale nan is outside [0, 1]"),
        (["--eta", "-1"], "--eta -1.0 is not a number >= 0"),
        (["--eta", "inf"], "--eta inf is not a number >= 0"),
        (["--init-img", ckpt], "is not a readable image"),
        (["--init-img", truncated], "truncated.png is not a readable image (OSError); check --init-img"),
        (["--from-file", latin1], "latin1.txt is not UTF-8 text (byte 9): save it as UTF-8"),
        (["--prompt", "caf\udce9"], "--prompt holds bytes that are not UTF-8 text (at character 3)"),
        (["--negative-prompt", "\udcff"], "--negative-prompt holds bytes that are not UTF-8"),
        (["--scale", "nan"], "--scale nan is not a finite number"),
        (["--scale=-inf"], "--scale -inf is not a finite number"),
        (["--seed", str(2**32)], "--seed 4294967296 is outside 0..4294967295"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 is outside 0..4294967295"),
        (["--seed", str(2**32 - 2), "--n_samples", "3"], "the last image's seed (--seed 4294967294 + 2) "
                                                         "4294967296 is outside"),
        (["--steps", "1000000000"], "--steps 1000000000 is over the limit of 1000: use a smaller value, or "
                                    "--no-limits if you mean it"),
        (["--n_samples", "100000"], "--n_samples 100000 is over the limit of 64"),
        (["--H", "65536"], "--H 65536 is over the limit of 8192"),
    ]


def test_bad_input_is_one_line_exit_2_before_loading(capsys, tmp_path, tiny_ckpt, monkeypatch):
    def no_load(args):
        raise AssertionError("the model must not be loaded for a bad command line")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    for extra, message in _bad_inputs(tmp_path, tiny_ckpt):
        argv = ["--ckpt", tiny_ckpt, "--outdir", tmp_path / "out", *extra]
        code, out, err = run(capsys, *argv)
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert err.startswith("sample.py: error: ") and len(err.strip().splitlines()) == 1
        assert "Traceback" not in err and out == ""


def test_bad_checkpoint_and_model_factor_are_one_line_errors(capsys, tmp_path, tiny_ckpt, monkeypatch):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all, not even close")
    code, _, err = run(capsys, "--ckpt", garbage, "--outdir", tmp_path, *FAST)
    assert code == 2 and "garbage.safetensors" in err and len(err.strip().splitlines()) == 1
    # H/W pass the early check (multiple of 8) but not the model's (VAE 8 x UNet 2 = 16)
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path, "--H", "40", "--W", "32",
                       "--device", "cpu")
    assert code == 2 and "--H 40 is not a multiple of 16" in err and "use e.g. 32" in err
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


def test_limits_are_lifted_by_no_limits_and_the_memory_check_is_the_pipelines(capsys, tmp_path, tiny_ckpt):
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path, "--n_samples", "2", "--H", "8192",
                       "--W", "8192", "--device", "cpu")
    assert code == 2 and "a batch of 2 images at 8192x8192 needs about" in err and len(err.splitlines()) == 1
    seen = {}

    def no_load(args):
        seen["no_limits"] = args.no_limits
        raise cli.UsageError("stop here")

    cli_load = cli.load_pipeline
    try:
        cli.load_pipeline = no_load
        code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--steps", "5000", "--no-limits")
    finally:
        cli.load_pipeline = cli_load
    assert "stop here" in err and seen == {"no_limits": True}


# a seeded fuzz loop over the flags: every command line either passes the checks with sane values or is refused with
# one line (exit 2, no traceback) before the model loads
_FUZZ_VALUES = ["0", "1", "-1", "7", "1e20", "nan", "inf", "-inf", "", "abc", "0x10", "3.5", str(2**32), str(2**63),
                str(2**64), "1000000000", "\u00e9", "\udce9", "-0", "9" * 30]
_FUZZ_FLAGS = ["--steps", "--n_samples", "--n_iter", "--scale", "--seed", "--H", "--W", "--eta", "--strength",
               "--guidance-rescale", "--sampler", "--prompt", "--attention-slicing", "--precision"]


def test_cli_flag_fuzz(capsys, tmp_path, tiny_ckpt, monkeypatch):
    import math
    import random

    class Reached(Exception):
        pass

    def no_load(args):
        raise Reached(args)

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    init = _write_image(tmp_path / "init.png")
    rng = random.Random(0)
    accepted = refused = 0
    for _ in range(300):
        argv = ["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "out")]
        for flag in rng.sample(_FUZZ_FLAGS, rng.randint(1, 4)):
            argv += [flag, rng.choice(_FUZZ_VALUES)]
        if "--strength" in argv:
            argv += ["--init-img", str(init)]
        try:
            code = cli.main(argv)
        except Reached as e:
            args = e.args[0]
            assert 1 <= args.steps <= 1000 and 1 <= args.n_samples <= 64 and 1 <= args.n_iter <= 1000, argv
            assert math.isfinite(args.scale) and 0 <= args.seed < 2**32, argv
            assert args.eta is None or (math.isfinite(args.eta) and args.eta >= 0), argv
            accepted += 1
            capsys.readouterr()
            continue
        out, err = capsys.readouterr()
        assert code == 2, (argv, code, err)
        lines = err.strip().splitlines()
        assert lines and "Traceback" not in err, (argv, err)
        assert lines[-1].startswith("sample.py: error: "), (argv, err)
        refused += 1
    assert accepted > 10 and refused > 100  # the loop exercises both sides


def test_unknown_flag_is_argparse_exit_2(capsys):
    code, _, err = run(capsys, "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err


def test_sample_py_in_a_subprocess(tmp_path, tiny_ckpt):
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path),
         "--n_samples", "1", "--sampler", "DDIM", *FAST],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "samples" / "00000.png").is_file() and (tmp_path / "grid-0000.png").is_file()
    assert result.stdout.strip().splitlines()[-1].startswith("done: 1 images in")
    assert "images" in result.stderr  # the tqdm bar


def test_precision_flags_reach_the_pipeline(tmp_path, tiny_ckpt):
    def load(*flags):
        return cli.load_pipeline(cli.build_parser().parse_args(
            ["--ckpt", str(tiny_ckpt), "--prompt", "x", "--outdir", str(tmp_path), *FAST, *flags]))

    pipe = load("--precision", "bf16")
    assert pipe.vae_precision == "same"
    assert pipe.unet.out[-1].weight.dtype == torch.bfloat16  # --unet-weights compute (the default)
    pipe = load("--precision", "bf16", "--vae-precision", "fp32", "--unet-weights", "fp32")
    assert pipe.vae_precision == "fp32" and pipe.unet.out[-1].weight.dtype == torch.float32
    assert load("--precision", "fp16").vae_precision == "fp32"
