"""A config stored in a checkpoint is data: every loader route refuses a target that is not one of the project's
own model classes, in one line, and nothing named by the file runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.convert import check_stored_config, load_model
from ldm.io import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def _payload(marker: Path) -> dict:
    """Without the allow-list this runs the command while the model is built (LatentDiffusion builds its UNet)."""
    return {"model": {"target": "ldm.model.LatentDiffusion", "params": {
        "unet_config": {"target": "os.system", "params": {"command": f"touch {marker}"}},
        "first_stage_config": "__is_first_stage__", "cond_stage_config": "__is_unconditional__"}}}


def _write(path: Path, config: dict) -> Path:
    tensors = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    else:  # a pickle that passes weights_only loading: the config is plain dicts and strings
        torch.save({"state_dict": tensors, "ldm_config": config}, path)
    return path


@pytest.fixture(params=["evil.safetensors", "evil.ckpt"])
def evil(request, tmp_path):
    marker = tmp_path / "pwned"
    return _write(tmp_path / request.param, _payload(marker)), marker


def _assert_refused(message: str, path: Path) -> None:
    assert "\n" not in message.strip()
    assert str(path) in message and "'os.system'" in message and "model.params.unet_config.target" in message
    assert "refused" in message


def test_load_model_refuses(evil):
    path, marker = evil
    with pytest.raises(CheckpointError) as info:
        load_model(None, path)
    _assert_refused(str(info.value), path)
    assert not marker.exists()


def test_pipeline_from_checkpoint_refuses(evil):
    from ldm.pipeline import Text2Image

    path, marker = evil
    with pytest.raises(CheckpointError) as info:
        Text2Image.from_checkpoint(path)
    _assert_refused(str(info.value), path)
    assert not marker.exists()


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sample_py_refuses(evil, tmp_path):
    path, marker = evil
    result = _run(str(ROOT / "sample.py"), "--ckpt", str(path), "--outdir", str(tmp_path / "out"), "--steps", "1",
                  "--n_samples", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: error: ")
    _assert_refused(last, path)
    assert not marker.exists()


def test_eval_geneval_refuses(evil):
    path, marker = evil
    result = _run("-m", "ldm.eval", "geneval", "--ckpt", str(path), "--n", "1", "--images-per-prompt", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m ldm.eval: error: ")
    _assert_refused(last, path)
    assert not marker.exists()


@pytest.mark.parametrize("config,key,why", [
    ({"model": {"target": "os.system", "params": {"command": "true"}}}, "model.target", "not one of the project's"),
    ({"model": {"target": "ldm.model.LatentDiffusion",
                "params": {"unet_config": {"target": "builtins.exec", "params": {"source": "1"}}}}},
     "model.params.unet_config.target", "not one of the project's model classes"),
    ({"model": {"target": "ldm.model.LatentDiffusion",
                "params": {"first_stage_config": {"target": "ldm.model.instantiate_from_config"}}}},
     "model.params.first_stage_config.target", "not a Module class defined in ldm.model"),
    ({"model": {"target": "ldm.models.unet.torch"}}, "model.target", "not a Module class"),
    ({"model": {"target": "ldm.models.unet._private"}}, "model.target", "not one of"),
    ({"model": {"target": "ldm.training.lr.math"}}, "model.target", "not a class defined in ldm.training.lr"),
    ({"model": {"target": "ldm.model.LatentDiffusion", "params": {"extra": [{"target": "subprocess.Popen"}]}}},
     "model.params.extra.0.target", "not one of"),
    ({"model": {"target": 3}}, "model.target", "not a dotted class name"),
    ({"model": {"target": "ldm.model.LatentDiffusion", "params": {"image_size": "${oc.env:HOME}"}}},
     "model.params.image_size", "an interpolation"),
])
def test_nested_and_disguised_targets_are_refused_before_import(tmp_path, config, key, why):
    path = _write(tmp_path / "m.safetensors", config)
    with pytest.raises(CheckpointError, match=why) as info:
        load_model(None, path)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_named_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_module_for_ldm_test.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass M: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"model": {"target": "ldm.model.LatentDiffusion",
                        "params": {"unet_config": {"target": "ldm.models.unet.UNetModel"},
                                   "cond_stage_config": {"target": "evil_module_for_ldm_test.M"}}}}
    with pytest.raises(CheckpointError, match="model.params.cond_stage_config.target"):
        load_model(None, _write(tmp_path / "m.ckpt", config))
    assert not marker.exists() and "evil_module_for_ldm_test" not in sys.modules


def test_project_classes_pass():
    check_stored_config({"target": "ldm.model.LatentDiffusion", "params": {
        "unet_config": {"target": "ldm.models.unet.UNetModel"},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.models.text_encoder.OpenCLIPTextEncoder"}}})


def test_export_from_checkpoint_refuses(evil, tmp_path):
    from ldm.training.callbacks import export_from_checkpoint

    path, marker = evil
    with pytest.raises(CheckpointError) as info:
        export_from_checkpoint(path, tmp_path / "out.safetensors")
    _assert_refused(str(info.value), path)
    assert not marker.exists()
