"""LatentDiffusionModule: one step, loss falls, EMA per optimizer step, condition dropout, plain checkpoints,
crash-and-resume, export, fail-fast values, scale_by_std, latent cache, first_stage_ckpt.

Everything is tiny: UNet width 32, a kl-f4 VAE of width 32 on 32x32 shapes (8x8 latents), the tiny text tower.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config import ConfigError, instantiate_from_config
from ldm.convert import build_model, load_model
from ldm.ema import ema_name
from ldm.io import read_state_dict, save_checkpoint
from ldm.training.callbacks import AtomicCheckpointIO, export_from_checkpoint, export_model, make_checkpoint_callback
from ldm.training.latent_diffusion import LatentDiffusionModule
from ldm.training.lr import LinearWarmup, WarmupCosine

TARGET = "ldm.training.latent_diffusion.LatentDiffusionModule"

TINY_MODEL = {
    "target": TARGET,
    "params": {
        "image_size": 8,
        "channels": 4,
        "use_ema": True,
        "ema_decay": 0.9,
        "learning_rate": 1e-3,
        "cond_drop_rate": 0.1,
        "validation_prompts": ["a red circle", "two blue squares"],
        "sample_steps": 2,
        "unet_config": {
            "target": "ldm.models.unet.UNetModel",
            "params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                       "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
                       "transformer_depth": 1, "context_dim": 32, "legacy": False},
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
        },
        "cond_stage_config": {
            "target": "ldm.models.text_encoder.OpenCLIPTextEncoder",
            "params": {"arch": "ldm-tiny-text", "layer": "last", "pad": "zero", "projection": False,
                       "freeze": True},
        },
    },
}
TINY_DATA = {"target": "ldm.data.datamodule.ShapesDataModule",
             "params": {"num_train": 8, "num_val": 0, "size": 32, "batch_size": 4, "num_workers": 0}}


def tiny_model_node(**params) -> dict:
    node = copy.deepcopy(TINY_MODEL)
    node["params"].update(params)
    return node


def tiny_module(**params) -> LatentDiffusionModule:
    return instantiate_from_config(tiny_model_node(**params), "model")


def tiny_data(**params):
    node = copy.deepcopy(TINY_DATA)
    node["params"].update(params)
    return instantiate_from_config(node, "data")


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fixed_batch(n: int = 4) -> dict:
    from ldm.data.shapes import ShapesDataset

    ds = ShapesDataset(n, size=32, seed=0)
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([x["image"] for x in items]), "caption": [x["caption"] for x in items]}


def fixed_loss(module: LatentDiffusionModule, batch: dict) -> float:
    """The loss on a fixed batch with fixed noise and timesteps (comparable across weights)."""
    g = torch.Generator().manual_seed(123)
    module.eval()
    with torch.no_grad():
        z = module.latents(batch["image"], g)
        c = module.conditioning(batch)
        losses = [module.loss_fn(module.apply_model, z, c, module.alphas_cumprod, generator=g)[0] for _ in range(8)]
    return float(torch.stack(losses).mean())


# ---- structure ------------------------------------------------------------------------------------------------------
def test_state_dict_is_sd_layout_plus_model_ema():
    module = tiny_module()
    assert isinstance(module, pl.LightningModule)
    plain = build_model({"model": tiny_model_node()})  # the plain LatentDiffusion of the same architecture
    assert type(plain).__name__ == "LatentDiffusion"
    keys = set(module.state_dict())
    ema_keys = {k for k in keys if k.startswith("model_ema.")}
    assert keys - ema_keys == set(plain.state_dict())
    expected = {"model_ema." + ema_name(n) for n, _ in module.model.named_parameters()}
    assert ema_keys == expected | {"model_ema.decay", "model_ema.num_updates"}
    assert "loss_fn" not in "".join(keys)


def test_both_training_modules_declare_the_interfaces_the_callbacks_use():
    from ldm.training.autoencoder import AutoencoderKLModule
    from ldm.training.callbacks import export_model
    from ldm.training.common import ExportableModule, SamplingModule

    assert issubclass(LatentDiffusionModule, ExportableModule) and issubclass(AutoencoderKLModule, ExportableModule)
    module = tiny_module()
    assert isinstance(module, ExportableModule) and isinstance(module, SamplingModule)
    with pytest.raises(TypeError, match="cannot be exported.*ExportableModule"):
        export_model(torch.nn.Linear(2, 2), "unused.safetensors")


def test_module_params_are_latent_diffusions_checked_up_front():
    import inspect

    from ldm.model import LatentDiffusion

    accepted = set(inspect.signature(LatentDiffusionModule).parameters)
    assert set(inspect.signature(LatentDiffusion).parameters) <= accepted  # nothing restated by hand
    assert {"ema_decay", "init_from", "cond_drop_rate"} <= accepted
    assert inspect.signature(LatentDiffusionModule).parameters["use_ema"].default is True
    with pytest.raises(ConfigError, match=r"model\.params\.scale_factr: unknown parameter"):
        tiny_module(scale_factr=0.5)
    module = tiny_module(scale_factor=0.5, linear_end=0.02)  # passed through to LatentDiffusion
    assert module.scale_factor == 0.5 and module.hparams["linear_end"] == 0.02
    assert module.model_config()["params"]["scale_factor"] == 0.5


def test_one_training_step_changes_unet_only(tmp_path):
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer(tmp_path, max_steps=1).fit(module, datamodule=tiny_data())
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert not any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in changed)
    assert "model_ema.num_updates" in changed
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))


def test_bf16_mixed_precision_step(tmp_path):
    module = tiny_module()
    trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module, datamodule=tiny_data())
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))
    assert module.model.diffusion_model.out[2].weight.dtype == torch.float32  # weights stay fp32


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])  # a CPU trainer turns 16-mixed into bf16-mixed
def test_gradient_clipping_with_the_fused_optimizer_in_every_precision(tmp_path, precision):
    # Lightning refused to clip for torch's fused AdamW under mixed precision (the fine-tune recipes' settings)
    norms = []

    def record(optimizer, args, kwargs):  # after the step: the gradients it used, clipped (and unscaled)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))))

    class Norms(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(record)

    module = tiny_module()
    trainer(tmp_path, max_steps=2, precision=precision, gradient_clip_val=1e-3,
            callbacks=[Norms()]).fit(module, datamodule=tiny_data())
    assert module.trainer.optimizers[0].defaults["fused"]
    assert len(norms) == 2 and all(0 < n <= 1e-3 * 1.001 for n in norms), norms


def test_fused_optimizer_under_a_grad_scaler_unscales_clips_and_steps_like_the_default():
    from ldm.training.common import AdamW

    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = AdamW(layer.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(layer(torch.ones(2, 8)).square().sum()).backward()
            scaler.unscale_(opt)  # what Lightning does before clipping under fp16
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in layer.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))


def test_validation_uses_ema_weights_and_restores_them(tmp_path):
    module = tiny_module(ema_decay=0.5)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    t.fit(module, datamodule=tiny_data())
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    data = tiny_data(num_val=4)
    val_loss = t.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in weights.items())
    data.setup()
    batch = next(iter(data.val_dataloader()))
    module.eval()

    def loss_now():
        g = torch.Generator().manual_seed(1_000_003)  # validation's generator for batch 0 on rank 0
        with torch.no_grad():
            return float(module._loss(batch, g, drop=False))

    with module.ema_scope():
        assert val_loss == pytest.approx(loss_now(), rel=1e-5)
    assert loss_now() != pytest.approx(val_loss, rel=1e-5)


def test_loss_falls_on_shapes(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(learning_rate=2e-3, use_ema=False, cond_drop_rate=0.0)
    batch = fixed_batch()
    start = fixed_loss(module, batch)
    trainer(tmp_path, max_steps=25).fit(module, datamodule=tiny_data(num_train=4))
    end = fixed_loss(module, batch)
    assert end < 0.8 * start, (start, end)


def test_ema_updates_once_per_optimizer_step(tmp_path):
    module = tiny_module(ema_decay=0.5)
    t = trainer(tmp_path, max_steps=3, accumulate_grad_batches=2)
    t.fit(module, datamodule=tiny_data(num_train=24))
    assert t.global_step == 3
    assert int(module.model_ema.num_updates) == 3
    # the EMA moved towards the weights but is not equal to them
    name = "diffusion_model.out.2.weight"
    ema_w = getattr(module.model_ema, ema_name(name))
    assert not torch.equal(ema_w, dict(module.model.named_parameters())[name])


def _dropped_captions(module, captions, generator):
    """The prompts the text encoder sees in a training step's conditioning (condition dropout applied)."""
    seen = []
    encode = module.cond_stage_model.encode
    module.cond_stage_model.encode = lambda prompts: seen.extend(prompts) or encode(prompts)
    try:
        module.conditioning({"caption": captions}, generator, drop=True)
    finally:
        del module.cond_stage_model.encode
    return seen


def test_condition_dropout_rate_and_determinism():
    module = tiny_module(cond_drop_rate=0.3)
    captions = [f"caption {i}" for i in range(400)]
    dropped = _dropped_captions(module, captions, torch.Generator().manual_seed(5))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.3) < 0.07
    # the same random numbers as before the conditioner owned the dropout: one rand(B) per step
    expected = torch.rand(len(captions), generator=torch.Generator().manual_seed(5)) < 0.3
    assert dropped == ["" if d else c for c, d in zip(captions, expected.tolist())]
    assert dropped == _dropped_captions(module, captions, torch.Generator().manual_seed(5))
    assert dropped != _dropped_captions(module, captions, torch.Generator().manual_seed(6))
    assert _dropped_captions(tiny_module(cond_drop_rate=0.0), captions[:50], None) == captions[:50]
    assert _dropped_captions(tiny_module(cond_drop_rate=1.0), captions[:50], None) == [""] * 50
    assert _dropped_captions(tiny_module(), captions[:50], torch.Generator().manual_seed(5)) == [
        "" if d else c for c, d in zip(captions[:50], (torch.rand(50, generator=torch.Generator().manual_seed(5))
                                                       < 0.1).tolist())]  # the default rate is 0.1


def test_step_generators_depend_on_seed_step_and_batch(tmp_path, monkeypatch):
    module = tiny_module()
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    a = torch.rand(3, generator=module._generator(1, 0))
    assert torch.equal(a, torch.rand(3, generator=module._generator(1, 0)))
    assert not torch.equal(a, torch.rand(3, generator=module._generator(1, 1)))
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    assert not torch.equal(a, torch.rand(3, generator=module._generator(1, 0)))


# ---- checkpoints, resume, export -------------------------------------------------------------------------------
def _assert_plain(obj, path="checkpoint"):
    assert not isinstance(obj, (DictConfig, ListConfig)), path
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{path}[{i}]")


def test_checkpoint_is_plain_and_loads_weights_only(tmp_path):
    node = OmegaConf.create(tiny_model_node())  # built from a DictConfig, as train.py does
    module = instantiate_from_config(node, "model")
    module.run_config = {"model": OmegaConf.to_container(node)}
    t = trainer(tmp_path, max_steps=2, plugins=[AtomicCheckpointIO()], enable_checkpointing=True,
                callbacks=[make_checkpoint_callback(tmp_path / "ckpt", every_n_train_steps=1, keep_last=1)])
    t.fit(module, datamodule=tiny_data())
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # no pickled objects at all
    _assert_plain(ckpt)
    assert ckpt["ldm_config"]["model"]["target"] == TARGET
    assert {"torch", "numpy", "python"} <= set(ckpt["rng_states"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    # the training checkpoint itself loads as an inference model (config from ldm_config)
    model = load_model(None, last)
    assert type(model).__name__ == "LatentDiffusion"


def test_atomic_checkpoint_io_keeps_the_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "bad": lambda: None}, path)  # unpicklable
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_export_loads_with_load_model_and_uses_ema(tmp_path):
    module = tiny_module(ema_decay=0.5)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=tiny_data())
    path = export_model(module, tmp_path / "tiny.safetensors")
    model = load_model(None, path)  # strict
    name = "diffusion_model.input_blocks.0.0.weight"
    ema_w = getattr(module.model_ema, ema_name(name))
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, ema_w)
    assert not torch.equal(ema_w, dict(module.model.named_parameters())[name])
    _, meta = read_state_dict(path)
    assert '"ldm.model.LatentDiffusion"' in meta["config"] and meta["global_step"] == "2"

    half = export_model(module, tmp_path / "half.safetensors", fp16=True, include_ema=True)
    sd, _ = read_state_dict(half)
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert sd["alphas_cumprod"].dtype == torch.float32  # schedule buffers stay exact
    assert any(k.startswith("model_ema.") for k in sd)
    load_model(None, half)
    raw = export_model(module, tmp_path / "raw.safetensors", use_ema=False)
    assert torch.equal(load_model(None, raw).model.diffusion_model.input_blocks[0][0].weight,
                       dict(module.model.named_parameters())[name])


def test_export_from_checkpoint_equals_export_model(tmp_path):
    module = tiny_module()
    module.run_config = {"model": tiny_model_node()}
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                callbacks=[make_checkpoint_callback(tmp_path / "ckpt", every_n_train_steps=1, keep_last=0)])
    t.fit(module, datamodule=tiny_data())
    a, _ = read_state_dict(export_model(module, tmp_path / "a.safetensors"))
    b, _ = read_state_dict(export_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CrashAt(pl.Callback):
    """Simulates a crash (after the checkpoint of an earlier step was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt("simulated crash")


def _fit_run(tmp_path: Path, name: str, max_steps: int, crash_at: int | None = None, every_n_train_steps: int = 2,
             resume_from: Path | None = None, batch_size: int = 4, **params):
    """A seeded fit on 12 shapes, 3 batches of 4 per epoch, checkpoints every ``every_n_train_steps`` steps
    (all kept) under ``<name>/ckpt``; it crashes after step ``crash_at`` or resumes from ``resume_from``;
    ``params``: the module's."""
    pl.seed_everything(7)
    module = tiny_module(warmup_steps=3, **params)
    module.run_config = {"model": tiny_model_node(warmup_steps=3, **params)}
    ckpt_dir = tmp_path / name / "ckpt"
    callbacks = [make_checkpoint_callback(ckpt_dir, every_n_train_steps=every_n_train_steps, keep_last=-1)]
    if crash_at:
        callbacks.append(CrashAt(crash_at))
    t = trainer(tmp_path / name, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks,
                plugins=[AtomicCheckpointIO()])
    try:
        t.fit(module, datamodule=tiny_data(num_train=12, batch_size=batch_size),
              ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    except (KeyboardInterrupt, SystemExit):
        pass
    return module, t


def _assert_same_weights(full: LatentDiffusionModule, resumed: LatentDiffusionModule, t: pl.Trainer, steps: int):
    assert t.global_step == steps
    assert int(resumed.model_ema.num_updates) == int(full.model_ema.num_updates) == steps
    a, b = full.state_dict(), resumed.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]  # bit-equal, not merely close
    assert not different, (len(different), different[:3])
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == steps


def test_crash_and_resume_equals_uninterrupted(tmp_path):
    """A crash in the middle of an epoch, and a resume from the end of an epoch, both end with the weights of
    the uninterrupted run: the loader's position is in the checkpoint (``ldm.data.datamodule.ResumableLoader``)."""
    full, _ = _fit_run(tmp_path, "full", max_steps=5, every_n_train_steps=1)  # epoch 0: steps 1-3
    _fit_run(tmp_path, "crash", max_steps=5, crash_at=3)  # last.ckpt at step 2: one batch of epoch 0 left
    last = torch.load(tmp_path / "crash" / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "offset": 8, "seed": 0, "dataset_size": 12, "world_size": 1}]
    resumed, t = _fit_run(tmp_path, "crash", max_steps=5, resume_from=tmp_path / "crash" / "ckpt" / "last.ckpt")
    _assert_same_weights(full, resumed, t, steps=5)
    at_epoch_end = tmp_path / "full" / "ckpt" / "step-00000003.ckpt"
    resumed, t = _fit_run(tmp_path, "epoch_end", max_steps=5, resume_from=at_epoch_end)
    _assert_same_weights(full, resumed, t, steps=5)


def test_crash_and_resume_with_the_latent_cache_equals_uninterrupted_across_epochs(tmp_path):
    """With ``cache_latents`` the resumed process starts with an empty cache: in the next epoch it encodes
    images that the uninterrupted run took from its cache, beside cached images of their batch. A cached entry
    must not depend on what was encoded with it (the VAE takes other kernels for a batch of one than for a batch
    of two), so that the runs stay bit-equal past the epoch boundary."""
    run = dict(max_steps=8, batch_size=2, cache_latents=True)  # 6 steps per epoch
    full, _ = _fit_run(tmp_path, "full", **run)
    _fit_run(tmp_path, "crash", crash_at=5, **run)  # last.ckpt at step 4: 8 images not in the resumed cache
    resumed, t = _fit_run(tmp_path, "crash", resume_from=tmp_path / "crash" / "ckpt" / "last.ckpt", **run)
    # (with seed 0 the first batch of epoch 1, step 7, holds one image the resumed run has not encoded yet)
    _assert_same_weights(full, resumed, t, steps=8)


# ---- settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,fragment", [
    ("cond_drop_rate", 1.5, "cond_drop_rate"),
    ("ema_decay", 2.0, "ema_decay"),
    ("learning_rate", -1.0, "learning_rate"),
    ("adam_betas", [0.9], "adam_betas"),
    ("parameterization", "epsilon", "parameterization"),
    ("loss_weighting", "snr", "loss weighting"),
    ("optimizer", "lion", "model.params.optimizer: 'lion' is unknown; use one of adamw, adamw8bit, adafactor"),
])
def test_bad_values_fail_fast_naming_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        tiny_module(**{key: value})
    msg = str(info.value)
    assert "\n" not in msg and fragment in msg and msg.startswith("model")


def test_trainable_text_encoder_needs_unfrozen_encoder():
    with pytest.raises(ConfigError, match="freeze=false"):
        tiny_module(cond_stage_trainable=True)
    node = tiny_model_node(cond_stage_trainable=True)
    node["params"]["cond_stage_config"]["params"]["freeze"] = False
    module = instantiate_from_config(node)
    n_text = sum(p.numel() for p in module.cond_stage_model.parameters() if p.requires_grad)
    assert n_text > 0
    assert sum(p.numel() for p in module.trainable_parameters()) == \
        sum(p.numel() for p in module.model.parameters()) + n_text


def test_a_frozen_text_encoder_with_random_weights_is_warned_about(tmp_path, caplog):
    from ldm.io import save_checkpoint

    with caplog.at_level(logging.WARNING, logger="ldm.training.latent_diffusion"):
        module = tiny_module()  # the tiny config's text encoder: frozen, no weights file
    assert "the text encoder keeps RANDOM weights and is FROZEN" in caplog.text
    weights = tmp_path / "text.safetensors"
    save_checkpoint({k: v for k, v in module.cond_stage_model.state_dict().items()}, weights)
    for node in (tiny_model_node(cond_stage_trainable=True), tiny_model_node(init_from=[
            {"path": str(_export(module, tmp_path)), "parts": ["text_encoder"]}])):
        node["params"]["cond_stage_config"]["params"]["freeze"] = not node["params"].get("cond_stage_trainable")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ldm.training.latent_diffusion"):
            instantiate_from_config(node)
        assert "RANDOM weights" not in caplog.text, node
    node = tiny_model_node()
    node["params"]["cond_stage_config"]["params"]["ckpt_path"] = str(weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.training.latent_diffusion"):
        instantiate_from_config(node)
    assert "RANDOM weights" not in caplog.text


def _export(module, tmp_path: Path) -> Path:
    from ldm.training.callbacks import export_model

    return export_model(module, tmp_path / "model.safetensors")


def test_learning_rate_scaling_and_warmup(tmp_path):
    module = tiny_module(learning_rate=None, base_learning_rate=1e-4, scale_lr=True, warmup_steps=4)
    t = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2)
    t.fit(module, datamodule=tiny_data(num_train=16))
    opt = t.optimizers[0]
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(1e-4 * 4 * 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 * 2 * 3 / 4)  # after 2 steps of 4 warm-up
    assert [LinearWarmup(2)(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = WarmupCosine(warmup_steps=2, total_steps=12, final=0.1)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0) and cos(12) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(-1)


def test_fused_optimizer_takes_the_same_step_as_the_default():
    modules = [tiny_module(fused_optimizer=fused, weight_decay=0.01) for fused in (True, False)]
    modules[1].load_state_dict(modules[0].state_dict())
    opts = [m.configure_optimizers()["optimizer"] for m in modules]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults.get("fused")
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in modules[0].trainable_parameters()]
    for module, opt in zip(modules, opts):
        for _ in range(3):
            for p, grad in zip(module.trainable_parameters(), grads):
                p.grad = grad.clone()  # contiguous, also for the channels-last conv weights
            opt.step()
    for a, b in zip(modules[0].trainable_parameters(), modules[1].trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    meta = [torch.nn.Parameter(torch.empty(2, device="meta"))]
    assert modules[0].adam_options(meta) == {}  # not a CPU/CUDA tensor: torch's default update


def test_adafactor_is_torchs_and_trains(tmp_path):
    module = tiny_module(optimizer="adafactor", weight_decay=0.01)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.Adafactor and opt.defaults["weight_decay"] == 0.01
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer(tmp_path, max_steps=1).fit(module, tiny_data())
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())


def test_adamw8bit_needs_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
        tiny_module(optimizer="adamw8bit")


def test_scheduler_config_is_used(tmp_path):
    sched = {"target": "ldm.training.lr.WarmupCosine", "params": {"warmup_steps": 1, "total_steps": 3}}
    module = tiny_module(scheduler_config=sched)
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, datamodule=tiny_data())
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached its end
    with pytest.raises(ConfigError, match="not both"):
        tiny_module(scheduler_config=sched, warmup_steps=2)


def test_scale_by_std_sets_scale_factor_on_first_step(tmp_path):
    module = tiny_module(scale_by_std=True, scale_factor=1.0)
    assert "scale_factor" in module.state_dict()
    batch = next(iter(tiny_data().train_dataloader()))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=tiny_data())
    z = module.first_stage_model.encode(batch["image"]).sample(torch.Generator().manual_seed(0))
    value = float(module.scale_factor)
    assert value != 1.0 and value == pytest.approx(1 / float(z.std()), rel=0.05)


def test_latent_cache_reuses_moments_and_matches_uncached():
    cached = tiny_module(cache_latents=True)
    plain = tiny_module()
    plain.load_state_dict(cached.state_dict())
    batch = fixed_batch()
    calls = []
    original = cached.first_stage_model.encode
    cached.first_stage_model.encode = lambda x: calls.append(len(x)) or original(x)
    cached.train()
    plain.train()
    for _ in range(2):
        a = cached._loss(batch, torch.Generator().manual_seed(1), drop=False)
        b = plain._loss(batch, torch.Generator().manual_seed(1), drop=False)
        assert torch.allclose(a, b, atol=1e-6)
    assert calls == [1, 1, 1, 1]  # encoded once, each image on its own, then served from the cache
    assert len(cached.conditioner.cache) == len(set(batch["caption"]))


def test_first_stage_ckpt_plain_or_full_layout(tmp_path):
    source = tiny_module()
    vae_sd = source.first_stage_model.state_dict()
    plain = save_checkpoint(vae_sd, tmp_path / "vae.safetensors")
    full = save_checkpoint({f"first_stage_model.{k}": v for k, v in vae_sd.items()}, tmp_path / "full.safetensors")
    for path in (plain, full):
        torch.manual_seed(99)  # a different random init
        module = tiny_module(first_stage_ckpt=str(path))
        for k, v in module.first_stage_model.state_dict().items():
            assert torch.equal(v, vae_sd[k]), k
    with pytest.raises(Exception, match="not found"):
        tiny_module(first_stage_ckpt=str(tmp_path / "missing.safetensors"))


def test_gradient_checkpointing_switch():
    module = tiny_module(gradient_checkpointing=True)
    flags = [m.use_checkpoint for m in module.model.diffusion_model.modules() if hasattr(m, "use_checkpoint")]
    assert flags and all(flags)


def test_sample_images_is_deterministic():
    module = tiny_module()
    a = module.sample_images(steps=2)
    b = module.sample_images(steps=2)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    with pytest.raises(ValueError, match="validation_prompts"):
        tiny_module(validation_prompts=None).sample_images()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_adam_on_channels_last_weights_matches_torch_default(amsgrad):
    from ldm.training.common import Adam, AdamW

    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4, 3, 3), (5,), (3, 4, 1, 1)]
    for cls, ref_cls in ((AdamW, torch.optim.AdamW), (Adam, torch.optim.Adam)):
        ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        ours[0].data = ours[0].data.contiguous(memory_format=torch.channels_last)
        opt = cls(ours, lr=0.1, weight_decay=0.1, amsgrad=amsgrad, fused=True)
        ref_opt = ref_cls(ref, lr=0.1, weight_decay=0.1, amsgrad=amsgrad)
        for step in range(4):
            grads = [torch.randn(s, generator=g) for s in shapes]
            for p, q, grad in zip(ours, ref, grads):
                # the parameter's layout, as autograd gives it; at step 1 a contiguous one (set by other code)
                p.grad = grad.clone() if step == 1 else torch.empty_like(p).copy_(grad)
                q.grad = grad.clone()
            if step == 2:  # a state of another layout, e.g. resumed from a run without channels-last weights
                state = opt.state[ours[0]]
                state["exp_avg"] = state["exp_avg"].contiguous()  # torch's own fused step mispairs this
            opt.step()
            ref_opt.step()
            for p, q in zip(ours, ref):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{cls.__name__} step {step}")
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert opt.state[ours[0]]["exp_avg"].stride() == ours[0].stride()


def test_fused_adam_hands_channels_last_tensors_to_the_kernel_as_views(monkeypatch):
    from ldm.training.common import AdamW

    seen = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda params, grads, *a, **k: (
        seen.append([(t.is_contiguous(), t.data_ptr()) for t in params + grads]), real(params, grads, *a, **k)))
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last))
    w.grad = torch.randn_like(w)
    AdamW([w], lr=0.1, fused=True).step()
    assert seen == [[(True, w.data_ptr()), (True, w.grad.data_ptr())]]  # contiguous views of the same memory


def test_timestep_bias_from_the_config_shapes_the_training_draws(tmp_path):
    """model.params.timestep_bias reaches the loss (a training step draws from it); a wrong one names its key."""
    module = tiny_module(timestep_bias={"strategy": "later", "multiplier": 4.0, "portion": 0.5})
    weights = module.loss_fn.timestep_weights
    assert weights is not None and float(weights[-1]) == 4.0 and float(weights[0]) == 1.0
    seen = []
    loss_fn = module.loss_fn
    module.loss_fn = lambda net, z, cond, ac, **kw: loss_fn(
        lambda x, t, c: seen.append(t) or net(x, t, c), z, cond, ac, **kw)
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data(num_train=16, batch_size=16))
    t = torch.cat(seen)
    assert len(t) == 48 and (t >= module.num_timesteps // 2).float().mean() > 0.65  # 0.8 expected
    with pytest.raises(Exception, match=r"model\.params\.timestep_bias\.strategy 'late' is not one of"):
        tiny_module(timestep_bias={"strategy": "late"})
