"""sample.py's prompt flags: --prompt-syntax, --embedding, --embeddings-dir (tiny random checkpoint)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.cli import common
from ldm.cli import sample as cli
from tiny_models import tiny_ckpt  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--H", "32", "--W", "32", "--device", "cpu", "--n_samples", "1", "--skip_grid"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_prompt_syntax_plain_in_a_subprocess_gives_todays_image(tmp_path, tiny_ckpt, capsys):
    prompt = "a red circle"
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "plain"),
         "--prompt", prompt, "--prompt-syntax", "plain", *FAST],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "a1111", "--prompt", prompt, *FAST)[0] == 0
    assert run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "weighted", "--prompt", "a (red:1.5) circle",
               *FAST)[0] == 0
    plain, a1111, weighted = (pixels(tmp_path / d / "samples" / "00000.png") for d in ("plain", "a1111", "weighted"))
    assert np.array_equal(plain, a1111)  # a prompt without syntax: the same image either way
    assert not np.array_equal(weighted, a1111)


def test_embedding_flags_load_and_record_ti_hashes(tmp_path, tiny_ckpt, capsys):
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, 32) * 3}, path)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(1, 32)}, folder / "glow.safetensors")
    save_file({"emb_params": torch.randn(1, 768)}, folder / "sd1-only.safetensors")  # another model's: skipped
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "out", "--prompt", "a shiny circle",
                       "--negative-prompt", "glow", "--embedding", path, "--embeddings-dir", folder, *FAST)
    assert code == 0, err
    params = common.read_png_parameters(tmp_path / "out" / "samples" / "00000.png")
    hashes = params["ti_hashes"].split(", ")
    assert sorted(h.split(":")[0] for h in hashes) == ["glow", "shiny"]
    assert f"shiny: {common.model_hash(path, 12)}" in hashes
    assert run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "plain", "--prompt", "a circle", *FAST)[0] == 0
    assert run(capsys, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "with", "--prompt", "a circle",
               "--embedding", path, *FAST)[0] == 0
    # an embedding the prompt does not name changes nothing
    assert np.array_equal(pixels(tmp_path / "plain" / "samples" / "00000.png"),
                          pixels(tmp_path / "with" / "samples" / "00000.png"))


def test_prompt_flag_errors_are_one_line(tmp_path, tiny_ckpt, capsys):
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--embedding", tmp_path / "missing.pt", *FAST)
    assert code == 2 and "embedding not found" in err and "--embedding" in err
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "sd1.safetensors")
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--embedding", tmp_path / "sd1.safetensors",
                       "--outdir", tmp_path, *FAST)
    assert code == 2 and "sd1.safetensors" in err and "768" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--embedding", tmp_path / "sd1.safetensors",
                       "--prompt-syntax", "plain", *FAST)
    assert code == 2 and "--prompt-syntax plain" in err
    code, _, err = run(capsys, "--ckpt", tiny_ckpt, "--embeddings-dir", tmp_path / "nope", *FAST)
    assert code == 2 and "--embeddings-dir" in err
