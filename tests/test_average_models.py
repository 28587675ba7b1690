"""scripts/average_models.py: the tensor-by-tensor mean of model files (a model soup)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import average_models  # noqa: E402


def test_average_models_writes_the_mean_in_the_first_files_dtype(tmp_path):
    from ldm.io import read_state_dict, save_checkpoint

    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "step": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float16), "step": torch.tensor([3])}
    save_checkpoint(a, tmp_path / "a.safetensors", metadata={"config": "{}"})
    save_checkpoint(b, tmp_path / "b.safetensors")
    out = tmp_path / "soup.safetensors"
    average_models.main(["--out", str(out), str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    sd, meta = read_state_dict(out)
    assert sd["w"].dtype == torch.float16 and sd["w"].tolist() == [2.0, 3.5]
    assert torch.equal(sd["step"], torch.tensor([3])) and meta.get("config") == "{}"


def test_average_models_rejects_files_that_do_not_match(tmp_path):
    from ldm.io import save_checkpoint

    save_checkpoint({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_checkpoint({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    save_checkpoint({"v": torch.zeros(2)}, tmp_path / "c.safetensors")
    save_checkpoint({"w": torch.zeros(2), "n": torch.tensor([1])}, tmp_path / "d.safetensors")
    save_checkpoint({"w": torch.zeros(2), "n": torch.tensor([2])}, tmp_path / "e.safetensors")
    run = lambda *names: average_models.main(["--out", str(tmp_path / "o.safetensors")]
                                             + [str(tmp_path / n) for n in names])
    with pytest.raises(SystemExit, match="at least two"):
        run("a.safetensors")
    with pytest.raises(SystemExit, match="one architecture"):
        run("a.safetensors", "b.safetensors")
    with pytest.raises(SystemExit, match="different tensors"):
        run("a.safetensors", "c.safetensors")
    with pytest.raises(SystemExit, match="not floating point"):
        run("d.safetensors", "e.safetensors")
    with pytest.raises(SystemExit, match="nope.safetensors"):
        run("a.safetensors", "nope.safetensors")
    save_checkpoint({"w": torch.zeros(2), "alphas_cumprod": torch.tensor([0.9, 0.0047])}, tmp_path / "f.safetensors")
    save_checkpoint({"w": torch.zeros(2), "alphas_cumprod": torch.tensor([0.9, 0.0])}, tmp_path / "g.safetensors")
    with pytest.raises(SystemExit, match="alphas_cumprod differs .* noise schedules differ"):
        run("f.safetensors", "g.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
