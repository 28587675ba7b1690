"""sample.py --lora FILE[:WEIGHT] and --lora-dir with <lora:NAME:WEIGHT> prompt tags, on a tiny random checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.adapters.lora import lora_hash
from ldm.cli import common
from ldm.cli import sample as cli
from ldm.convert import load_model
from test_lora import make_lora, save
from tiny_models import tiny_ckpt  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--H", "32", "--W", "32", "--device", "cpu", "--n_samples", "1", "--skip_grid",
        "--sampler", "Euler", "--seed", "3"]


@pytest.fixture(scope="module")
def lora_file(tiny_ckpt, tmp_path_factory):
    sd, _ = make_lora(load_model(None, tiny_ckpt), seed=7)
    return save(sd, tmp_path_factory.mktemp("loras") / "style.safetensors")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def test_lora_flag_and_prompt_tag_give_the_same_image(capsys, tmp_path, tiny_ckpt, lora_file):
    args = ["--ckpt", tiny_ckpt, *FAST]
    assert run(capsys, *args, "--prompt", "a red circle, ", "--outdir", tmp_path / "plain")[0] == 0
    code, _, err = run(capsys, *args, "--prompt", "a red circle, ", "--lora", f"{lora_file}:0.6",
                       "--outdir", tmp_path / "flag")
    assert code == 0, err
    code, _, err = run(capsys, *args, "--prompt", "a red circle, <lora:style:0.6>", "--lora-dir", lora_file.parent,
                       "--outdir", tmp_path / "tag")
    assert code == 0, err
    plain, flag, tag = (tmp_path / d / "samples" / "00000.png" for d in ("plain", "flag", "tag"))
    assert np.array_equal(_pixels(flag), _pixels(tag))
    assert np.abs(_pixels(flag) - _pixels(plain)).max() > 0
    params = common.read_png_parameters(tag)
    assert params["prompt"] == "a red circle, <lora:style:0.6>"
    assert params["lora_hashes"] == f"style: {lora_hash(lora_file)}"
    assert common.read_png_parameters(flag)["lora_hashes"] == f"style: {lora_hash(lora_file)}"


def test_lora_errors_are_one_line_before_the_model_loads(capsys, tmp_path, tiny_ckpt, lora_file):
    cases = [
        (["--lora", tmp_path / "missing.safetensors"], "LoRA file not found"),
        (["--prompt", "x <lora:style:1>"], "no --lora-dir is given"),
        (["--prompt", "x <lora:other:1>", "--lora-dir", lora_file.parent], "'other' not found"),
        (["--prompt", "x <lora:../style:1>", "--lora-dir", lora_file.parent], "not a file name"),
        (["--lora-dir", tmp_path / "nope"], "LoRA folder not found"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "--ckpt", tiny_ckpt, *FAST, "--outdir", tmp_path, *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_lora_for_another_architecture_is_one_line(capsys, tmp_path, tiny_ckpt):
    import torch

    wide = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    path = save(wide, tmp_path / "sd1.safetensors")
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, *FAST, "--outdir", tmp_path, "--lora", path)
    assert code == 2 and "does not fit this model" in err and err.count("\n") == 1, err


def test_parse_lora_arg():
    assert cli.parse_lora_arg("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert cli.parse_lora_arg("dir/a.safetensors:0.5") == (Path("dir/a.safetensors"), 0.5)
    assert cli.parse_lora_arg("C:/x/a.safetensors") == (Path("C:/x/a.safetensors"), 1.0)
    assert cli.parse_lora_arg("a.safetensors:-1") == (Path("a.safetensors"), -1.0)


def test_lora_flags_in_a_subprocess(tmp_path, tiny_ckpt, lora_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path), *FAST,
         "--lora", f"{lora_file}:0.5", "--lora-dir", str(lora_file.parent), "--prompt", "a <lora:style:0.25>"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    params = common.read_png_parameters(tmp_path / "samples" / "00000.png")
    # both merged (the flag's and the tag's); one entry per name, as A1111 writes it
    assert params["lora_hashes"] == f"style: {lora_hash(lora_file)}"
    assert params["prompt"] == "a <lora:style:0.25>"
