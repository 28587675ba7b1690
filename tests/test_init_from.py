"""Training from weights: model.params.init_from / --init FILE. From a tiny model's export (fp32 and fp16), an SD1
file with OpenAI-CLIP text keys and EMA weights, the text tower from a second file, strict errors, keep_new, the
autoencoder's source, and a resumed run that does not load it again."""
from __future__ import annotations

import logging

import pytest
import torch

from ldm.io import read_state_dict, save_checkpoint
from ldm.cli.train import init_from_option, main
from ldm.config import ConfigError
from ldm.ema import ema_name
from ldm.convert import normalize_state_dict, to_hf_clip_text_state_dict
from ldm.training.callbacks import export_model
from test_train_cli import FAST, last_step, tiny_run_config
from test_train_ldm import tiny_model_node, tiny_module

UNET, TEXT, VAE = "model.diffusion_model.", "cond_stage_model.", "first_stage_model."


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained-looking tiny module (random weights, EMA apart from them) and its export."""
    module = _randomize(tiny_module(), seed=1)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            getattr(module.model_ema, ema_name(name)).copy_(p + 0.5)
    path = export_model(module, tmp_path_factory.mktemp("init") / "source.safetensors", use_ema=False)
    return module, path


def _part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _assert_equal(a, b, prefix):
    a, b = _part(a, prefix), _part(b, prefix)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=0, msg=k)


def test_every_part_from_an_export_and_the_ema_restarts_from_it(source):
    trained, path = source
    module = tiny_module(init_from=str(path))
    want = normalize_state_dict(read_state_dict(path)[0])  # the export holds the text tower in transformers names
    for prefix in (UNET, TEXT, VAE):
        _assert_equal(module.state_dict(), want, prefix)
    for name, p in module.model.named_parameters():  # the EMA starts from the loaded weights
        assert torch.equal(getattr(module.model_ema, ema_name(name)), p)
    assert int(module.model_ema.num_updates) == 0
    fresh = tiny_module()
    assert not torch.equal(fresh.state_dict()[UNET + "out.2.weight"], want[UNET + "out.2.weight"])


def test_parts_ema_and_fp16(source, tmp_path):
    trained, _ = source
    full = export_model(trained, tmp_path / "full.safetensors", fp16=True, include_ema=True)
    module = tiny_module(init_from=[{"path": str(full), "parts": ["unet"], "ema": True}])
    for name, p in module.model.named_parameters():  # the file's EMA weights, rounded to fp16, back in fp32
        expected = getattr(trained.model_ema, ema_name(name)).half().float()
        assert p.dtype == torch.float32 and torch.equal(p, expected), name
    assert not torch.equal(module.state_dict()[TEXT + "model.token_embedding.weight"],
                           trained.state_dict()[TEXT + "model.token_embedding.weight"])  # not asked for


def test_sd1_file_with_openai_clip_text_keys(tmp_path):
    node = tiny_model_node()
    text = {"arch": "ldm-tiny-text", "layer": "last", "pad": "eot", "quick_gelu": True, "projection": False}
    node["params"]["cond_stage_config"]["params"] = text
    from ldm.config import instantiate_from_config

    original = _randomize(instantiate_from_config(node, "model"), seed=2)
    sd = {k: v for k, v in original.state_dict().items() if not k.startswith(("model_ema.", TEXT))}
    hf = to_hf_clip_text_state_dict({k[len(TEXT):]: v for k, v in original.state_dict().items()
                                     if k.startswith(TEXT)})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in hf.items()})
    path = save_checkpoint(sd, tmp_path / "sd1.ckpt")  # a pickle, as SD1 files are
    node["params"]["init_from"] = str(path)
    module = instantiate_from_config(node, "model")
    for prefix in (UNET, TEXT, VAE):
        _assert_equal(module.state_dict(), original.state_dict(), prefix)


def test_text_tower_from_a_second_file(source, tmp_path):
    trained, path = source
    other = _randomize(tiny_module(), seed=3)
    tower = save_checkpoint(_part(other.state_dict(), TEXT), tmp_path / "tower.safetensors")
    entries = init_from_option([f"{path}:unet", f"{tower}:text_encoder"])
    assert entries == [{"path": str(path), "parts": ["unet"]}, {"path": str(tower), "parts": ["text_encoder"]}]
    module = tiny_module(init_from=entries)
    _assert_equal(module.state_dict(), read_state_dict(path)[0], UNET)
    _assert_equal(module.state_dict(), other.state_dict(), TEXT)
    with pytest.raises(ConfigError, match="holds no weights for unet"):
        tiny_module(init_from=[{"path": str(tower), "parts": ["unet"]}])


def test_keep_new_for_tensors_the_file_lacks(source, caplog):
    _, path = source
    node = tiny_model_node(init_from=str(path))
    node["params"]["unet_config"]["params"]["position_embedding"] = True
    from ldm.config import instantiate_from_config

    with pytest.raises(ConfigError, match=r"2 missing \(model\.diffusion_model\.pos_embed\.weight") as info:
        instantiate_from_config(node, "model")
    assert "\n" not in str(info.value)
    node["params"]["init_from"] = [{"path": str(path), "keep_new": True}]
    with caplog.at_level(logging.INFO, logger="ldm.training.init_from"):
        module = instantiate_from_config(node, "model")
    assert "pos_embed.weight" in caplog.text
    assert not module.model.diffusion_model.pos_embed.weight.any()  # its fresh (zero) initialisation
    _assert_equal(_part(module.state_dict(), UNET + "out."), read_state_dict(path)[0], UNET + "out.")


@pytest.mark.parametrize("init_from,message", [
    ("missing.safetensors", "file not found: missing.safetensors"),
    ([{"path": "SOURCE", "parts": ["vae"]}], r"parts \['vae'\] are not valid"),
    ([{"path": "SOURCE", "strict": False}], "unknown key 'strict'"),
    ([{"path": "SOURCE", "ema": True}], "no model_ema"),
    ([], "empty list"),
])
def test_bad_init_from_fails_in_one_line(source, init_from, message):
    _, path = source
    value = [{**e, "path": str(path)} for e in init_from] if isinstance(init_from, list) else init_from
    with pytest.raises(ConfigError, match=message) as info:
        tiny_module(init_from=value)
    assert "\n" not in str(info.value) and str(info.value).startswith("model")


def test_another_architecture_is_listed(source):
    _, path = source
    node = tiny_model_node(init_from=str(path))
    node["params"]["unet_config"]["params"]["model_channels"] = 64
    from ldm.config import instantiate_from_config

    with pytest.raises(ConfigError, match=r"init_from .*source\.safetensors \(unet, text_encoder, first_stage\).*"
                                          r"shape mismatch"):
        instantiate_from_config(node, "model")


def test_first_stage_ckpt_is_the_autoencoders_source(source, tmp_path):
    trained, path = source
    vae = _randomize(tiny_module(), seed=4).first_stage_model
    vae_file = save_checkpoint(vae.state_dict(), tmp_path / "vae.safetensors")
    module = tiny_module(init_from=str(path), first_stage_ckpt=str(vae_file))
    _assert_equal(module.state_dict(), {VAE + k: v for k, v in vae.state_dict().items()}, VAE)
    _assert_equal(module.state_dict(), read_state_dict(path)[0], UNET)
    with pytest.raises(ConfigError, match="both give the autoencoder"):
        tiny_module(init_from=[{"path": str(path), "parts": ["first_stage"]}], first_stage_ckpt=str(vae_file))


def test_train_py_init_then_resume_without_the_file(source, tmp_path):
    _, path = source
    copy = tmp_path / "start.safetensors"
    copy.write_bytes(path.read_bytes())
    base = tiny_run_config(tmp_path)
    run = tmp_path / "logs" / "i"
    args = ["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "i"] + FAST
    assert main(args + ["--init", str(copy), "--max_steps", "1"]) == 0
    assert last_step(run) == 1
    copy.unlink()  # the checkpoint has the weights: a resume does not read the file again
    assert main(["--resume", str(run), "--max_steps", "2"] + FAST) == 0
    assert last_step(run) == 2
    assert main(args + ["--init", str(tmp_path / "gone.safetensors"), "--max_steps", "1", "--name", "j"]) == 2
