"""LoRA / LoCon training (model.params.lora): only the LoRA trains, checkpoints hold only it and resume exactly,
the kohya export loads with load_lora / sample.py --lora and gives the trained model's output, bad settings are
one-line errors. Tiny models (width 32) as in test_train_ldm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.adapters.lora import load_lora, lora_hash
from ldm.adapters.lora_train import parse_lora_config
from ldm.convert import load_model
from ldm.io import read_state_dict, save_checkpoint
from ldm.training.callbacks import AccelCallback, AtomicCheckpointIO, export_from_checkpoint, export_model, \
    make_checkpoint_callback
from ldm.training.latent_diffusion import inference_config
from test_train_ldm import fixed_batch, tiny_data, tiny_model_node, tiny_module, trainer

ROOT = Path(__file__).resolve().parents[1]
ALL = ["attn", "ff", "conv", "text"]


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny base model file (export layout) with live weights, what --init names."""
    pl.seed_everything(3)
    module = tiny_module(use_ema=False)
    with torch.no_grad():
        for p in module.model.parameters():
            if not p.abs().sum():  # zero-initialised output layers: make the UNet depend on everything
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    node = tiny_model_node(use_ema=False)
    return save_checkpoint(module.export_state_dict(), path, config=inference_config(node))


def lora_module(base_file: Path, **lora):
    params = {"rank": 4, "alpha": 2.0, "targets": ALL} | lora
    return tiny_module(init_from=str(base_file), lora=params, learning_rate=1e-2, ema_decay=0.5)


def test_only_the_lora_trains_and_the_state_dict_keeps_its_layout(tmp_path, base_file):
    module = lora_module(base_file)
    base = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith(("lora.", "model_ema."))}
    lora_before = {k: v.clone() for k, v in module.lora.state_dict().items()}
    assert all(not p.requires_grad for n, p in module.named_parameters() if not n.startswith("lora."))
    assert module.trainable_parameters() == list(module.lora.parameters())
    trainer(tmp_path, max_steps=2, callbacks=[AccelCallback()]).fit(module, datamodule=tiny_data())
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base model is untouched
    changed = [k for k, v in module.lora.state_dict().items() if not torch.equal(v, lora_before[k])]
    # every up matrix (zero at the start) moved, on UNet, LoCon and text layers alike
    ups = [k for k in lora_before if k.endswith("lora_up.weight")]
    assert set(ups) <= set(changed)
    for kind in ("attn1_to_q", "ff_net_0_proj", "resnets_0_conv1", "lora_te_text_model_encoder_layers_0_self_attn_in"):
        assert any(kind in k for k in changed), kind
    assert {k for k in after if k.startswith("model_ema.")} == {
        "model_ema.decay", "model_ema.num_updates"} | {f"model_ema.{n.replace('.', '')}"
                                                       for n, _ in module.lora.named_parameters()}


def test_export_loads_with_load_lora_and_matches_the_trained_model(tmp_path, base_file):
    module = lora_module(base_file, dropout=0.1)
    module.run_config = {"model": tiny_model_node(init_from=str(base_file), lora={"rank": 4, "alpha": 2.0,
                                                                                   "targets": ALL, "dropout": 0.1}),
                         "data": {"params": {"batch_size": 4, "size": 32}}, "seed": 0}
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data())
    path = export_model(module, tmp_path / "style.safetensors", use_ema=False)
    state, meta = read_state_dict(path)
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_"))
               for k in state)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_network_module"] == \
        "networks.lora"
    assert meta["ss_new_sd_model_hash"] and meta["ss_sd_model_name"] == "base" and meta["ss_steps"] == "3"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert lora_hash(path) == meta["sshs_model_hash"][:12]

    batch = fixed_batch(2)
    module.eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        cond = module.conditioning(batch)
        expected = module.apply_model(x, t, cond)
        plain = load_model(None, base_file)
        load_lora(plain, path)
        cond2 = plain.get_learned_conditioning({"txt": batch["caption"]})
        got = plain.apply_model(x, t, cond2)
    torch.testing.assert_close(cond2["crossattn"], cond["crossattn"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, load_model(None, base_file).apply_model(x, t, cond2), atol=1e-4)

    # the EMA export (default) differs and also loads
    ema = export_model(module, tmp_path / "ema.safetensors")
    assert not torch.equal(read_state_dict(ema)[0]["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"],
                           state["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"])


def _fit(tmp_path: Path, base_file: Path, name: str, max_steps: int, resume: Path | None = None):
    pl.seed_everything(11)
    module = lora_module(base_file)
    module.run_config = {"model": tiny_model_node(init_from=str(base_file), lora={"rank": 4, "alpha": 2.0,
                                                                                   "targets": ALL})}
    cb = [make_checkpoint_callback(tmp_path / name, every_n_train_steps=2, keep_last=-1)]
    t = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                callbacks=cb)
    t.fit(module, datamodule=tiny_data(num_train=12), ckpt_path=str(resume) if resume else None, weights_only=True)
    return module


def test_checkpoint_holds_only_the_lora_and_resumes_exactly(tmp_path, base_file):
    full = _fit(tmp_path, base_file, "full", max_steps=4)
    ckpt = torch.load(tmp_path / "full" / "step-00000002.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {k for k in full.state_dict() if k.startswith(("lora.", "model_ema."))}
    assert ckpt["lora_base"]
    resumed = _fit(tmp_path, base_file, "resumed", max_steps=4, resume=tmp_path / "full" / "step-00000002.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the checkpoint exports without building the model, the same file as the module's export
    x, _ = read_state_dict(export_from_checkpoint(tmp_path / "full" / "last.ckpt", tmp_path / "x.safetensors"))
    y, _ = read_state_dict(export_model(full, tmp_path / "y.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    # another base model is refused
    other = tmp_path / "other.safetensors"
    sd, meta = read_state_dict(base_file)
    sd["model.diffusion_model.out.2.bias"] = sd["model.diffusion_model.out.2.bias"] + 1
    save_checkpoint(sd, other, config=json.loads(meta["config"]))
    module = lora_module(other)
    with pytest.raises(Exception, match="other base weights"):
        trainer(tmp_path, max_steps=5).fit(module, datamodule=tiny_data(), weights_only=True,
                                           ckpt_path=str(tmp_path / "full" / "last.ckpt"))


def test_image_logger_sees_the_lora(base_file):
    module = lora_module(base_file, targets=["attn"])
    before = module.sample_images(["a red circle"], steps=2, use_ema=False)
    with torch.no_grad():
        for name, p in module.lora.named_parameters():
            if name.endswith("lora_up.weight"):
                p.normal_(0, 0.5)
    assert not torch.allclose(module.sample_images(["a red circle"], steps=2, use_ema=False), before)
    module.lora.remove()
    assert torch.equal(module.sample_images(["a red circle"], steps=2, use_ema=False), before)


@pytest.mark.parametrize("lora,fragment", [
    ({"rank": 0}, "model.params.lora.rank=0 must be a positive int"),
    ({"rank": 4, "alpah": 4}, "model.params.lora.alpah is unknown; the keys are rank, alpha, targets, dropout"),
    ({"targets": ["attn", "mlp"]}, "model.params.lora.targets: 'mlp' is unknown"),
    ({"targets": []}, "model.params.lora.targets=[] must be a non-empty list"),
    ({"dropout": 1.0}, "model.params.lora.dropout=1.0 must be a number in [0, 1)"),
    ({"alpha": -1}, "model.params.lora.alpha=-1 must be a number > 0"),
    ("yes", "model.params.lora must be a mapping"),
])
def test_bad_lora_settings_are_one_line_errors(lora, fragment):
    with pytest.raises(ValueError) as info:
        tiny_module(lora=lora)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_parse_lora_config_defaults():
    config = parse_lora_config({"rank": 8})
    assert config.alpha is None and config.scale == 1.0 and config.targets == ("attn", "ff")


def test_lora_trained_by_train_py_loads_in_sample_py(tmp_path, base_file):
    """The whole path: train.py with --init and model.params.lora on pictures of the shapes world's new shape
    (stars, data.params.focus), then sample.py --lora in a subprocess gives the image of the trained LoRA merged
    into the base model."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = tmp_path / "lora.yaml"
    config.write_text(json.dumps({
        "model": tiny_model_node(lora={"rank": 4, "targets": ["attn", "ff", "text"]}, learning_rate=1e-2),
        "data": {"target": "ldm.data.datamodule.ShapesDataModule",
                 "params": {"num_train": 4, "focus": "star", "num_focus": 4, "num_val": 0, "size": 32,
                            "batch_size": 4, "num_workers": 0}},
        "lightning": {"trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
                      "logger": "csv", "callbacks": {"image_logger": False}},
    }))
    from ldm.cli.train import main

    run_dir = tmp_path / "logs" / "mylora"
    assert main(["--base", str(config), "--init", str(base_file), "--logdir", str(tmp_path / "logs"),
                 "--name", "mylora"]) == 0
    # --resume rebuilds the frozen base from the run's config (--init), then loads the LoRA checkpoint
    assert main(["--resume", str(run_dir), "--max_steps", "3"]) == 0
    lora = tmp_path / "logs" / "mylora" / "mylora.safetensors"
    assert lora.is_file() and read_state_dict(lora)[1]["ss_network_module"] == "networks.lora"
    assert read_state_dict(lora)[1]["ss_steps"] == "3"
    exported = read_state_dict(lora)[0]
    lora.unlink()  # --export-only writes it again from the checkpoint, without building the model
    assert main(["--resume", str(run_dir), "--export-only"]) == 0
    again = read_state_dict(lora)[0]
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    merged = load_model(None, base_file)
    load_lora(merged, lora)  # the merge sample.py does, written out as a full model
    _, meta = read_state_dict(base_file)
    merged_file = save_checkpoint(merged.state_dict(), tmp_path / "merged.safetensors",
                                  config=json.loads(meta["config"]))
    args = ["--prompt", "a red star", "--steps", "2", "--seed", "1", "--H", "32", "--W", "32", "--n_samples", "1"]
    images = {}
    for name, extra in (("lora", ["--ckpt", str(base_file), "--lora", str(lora)]),
                        ("merged", ["--ckpt", str(merged_file)])):
        run = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args, "--outdir", str(tmp_path / name),
                              *extra], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        pngs = sorted(p for p in (tmp_path / name).rglob("*.png") if "grid" not in p.name)
        images[name] = Image.open(pngs[0]).tobytes()
    assert images["lora"] == images["merged"]
    base = load_model(None, base_file).state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in merged.state_dict().items())


def test_accel_fast_paths_keep_the_lora(base_file):
    """The acceleration pass swaps the layers' classes; the LoRA hooks stay: the fp32 oneDNN path gives the
    plain numbers, the cached bf16 inference path keeps the LoRA (its error is far below the LoRA's effect)."""
    from ldm import accel

    module = lora_module(base_file)
    with torch.no_grad():
        for name, p in module.lora.named_parameters():
            if name.endswith("lora_up.weight"):
                p.normal_(0, 0.3)
    module.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        cond = module.conditioning(fixed_batch(2))
        ref = module.apply_model(x, t, cond)
        accel.optimize(module, device="cpu", precision="bf16")
        assert any(type(m).__module__ == "ldm.accel.onednn" for m in module.model.modules())
        torch.testing.assert_close(module.apply_model(x, t, cond), ref, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = module.apply_model(x, t, cond).float()
        module.lora.remove()
        without = module.apply_model(x, t, cond)
    effect = (without - ref).abs().max()
    assert effect > 0.1 and (bf16 - ref).abs().max() < effect / 10


def test_sdxl_like_model_two_text_encoders_export_and_merge(tmp_path):
    """An SDXL-style model (conditioner of two text towers, the second pooled; a UNet with label_emb): kohya's
    SDXL names (original UNet names, lora_te1_ / lora_te2_), and the file merges to the hooked model's output."""
    import copy

    from safetensors.torch import save_file

    from ldm.adapters.lora_train import LoraNetwork
    from test_lora import tiny_sdxl_like

    model = tiny_sdxl_like()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():  # zero-initialised output layers: make the UNet depend on everything
                p.normal_(0, 0.02)
    merged, base = copy.deepcopy(model), copy.deepcopy(model)
    network = LoraNetwork(model, parse_lora_config({"rank": 2, "alpha": 1, "targets": ALL}))
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("lora_up.weight"):
                p.normal_(0, 0.3)
    network.eval()
    state = network.kohya_state_dict()
    prefixes = {k.split("_")[1] if k.startswith("lora_te") else "_".join(k.split("_")[:4]) for k in state}
    assert {"te1", "te2", "lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"} <= prefixes
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    load_lora(merged, path)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    batch = {"txt": ["a red circle", "two blue squares"]}
    with torch.no_grad():
        cond = model.get_learned_conditioning(batch)
        cond_merged = merged.get_learned_conditioning(batch)
        for kind in cond:
            torch.testing.assert_close(cond_merged[kind], cond[kind], atol=1e-5, rtol=1e-4)
        out = model.apply_model(x, t, cond)
        torch.testing.assert_close(merged.apply_model(x, t, cond), out, atol=1e-5, rtol=1e-4)
        cond_base = base.get_learned_conditioning(batch)
        assert all(not torch.allclose(cond_base[kind], cond[kind], atol=1e-3) for kind in cond)
        assert not torch.allclose(base.apply_model(x, t, cond), out, atol=1e-3)
