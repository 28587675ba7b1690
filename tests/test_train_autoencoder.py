"""First-stage training: the LPIPS + PatchGAN loss, the Lightning module, its export and configs (CPU, tiny)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from safetensors.torch import save_file

from ldm.config import ConfigError, check_config, instantiate_from_config, load_config, to_plain
from ldm.data.datamodule import ShapesDataModule
from ldm.io import read_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.training.autoencoder import AutoencoderKLModule
from ldm.training.losses import LPIPS, LPIPSWithDiscriminator, hinge_d_loss, vanilla_d_loss
from sd_layout import layout_shapes

ROOT = Path(__file__).resolve().parents[1]
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def loss_node(**params) -> dict:
    base = {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 16}
    return {"target": "ldm.training.losses.LPIPSWithDiscriminator", "params": {**base, **params}}


def make_module(**loss_params) -> AutoencoderKLModule:
    return AutoencoderKLModule(DDCONFIG, 4, loss_node(**loss_params), learning_rate=1e-3, num_val_images=0)


def fit(module: pl.LightningModule, max_steps: int, batch_size: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    data = ShapesDataModule(num_train=8, num_val=2, size=32, batch_size=batch_size)
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


# ---- the loss -----------------------------------------------------------------------------------------------------
def test_rec_and_kl_terms_follow_the_equations():
    ae = AutoencoderKL(DDCONFIG, 4)
    loss_fn = LPIPSWithDiscriminator(disc_start=100, logvar_init=0.5, kl_weight=1e-3, pixelloss_weight=2.0,
                                     perceptual_weight=0.0)
    x = images()
    rec, post = ae(x)
    loss, logs = loss_fn.generator_loss(x, rec, post, global_step=0)
    l1 = 2.0 * (x - rec).abs()
    nll = torch.sum(l1 / torch.exp(torch.tensor(0.5)) + 0.5) / 2
    kl = post.kl().sum() / 2
    torch.testing.assert_close(loss, nll + 1e-3 * kl)
    torch.testing.assert_close(logs["train/rec_loss"], l1.mean())
    torch.testing.assert_close(logs["train/kl_loss"], kl.detach())
    assert logs["train/g_loss"] == 0 and logs["train/d_weight"] == 0 and logs["train/disc_factor"] == 0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    ae = AutoencoderKL(DDCONFIG, 4)
    loss_fn = LPIPSWithDiscriminator(disc_start=0, disc_weight=0.5, disc_num_layers=2, disc_ndf=16,
                                     perceptual_weight=0.0)
    x = images()
    rec, post = ae(x)
    last = ae.get_last_layer()
    loss, logs = loss_fn.generator_loss(x, rec, post, global_step=0, last_layer=last)

    nll = torch.sum((x - rec).abs()) / 2
    g_loss = -loss_fn.discriminator(rec).mean()
    ratio = torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4)
    expected = 0.5 * ratio.clamp(0, 1e4)
    assert logs["train/d_weight"] > 0
    torch.testing.assert_close(logs["train/d_weight"], expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, nll + 1e-6 * post.kl().sum() / 2 + expected * g_loss, rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, rec, post, global_step=0)


def test_discriminator_losses_and_start_step():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5))
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(vanilla_d_loss(real, fake), 0.5 * (sp(-real).mean() + sp(fake).mean()))

    loss_fn = LPIPSWithDiscriminator(disc_start=5, disc_num_layers=2, disc_ndf=16, perceptual_weight=0.0)
    x, y = images(), images()
    assert loss_fn.discriminator_loss(x, y, global_step=4)[0] == 0
    d_loss, logs = loss_fn.discriminator_loss(x, y, global_step=5)
    assert d_loss > 0 and {"train/d_loss", "train/logits_real", "train/logits_fake"} <= set(logs)
    assert not loss_fn.discriminator_active(4) and loss_fn.discriminator_active(5)
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, disc_loss="wasserstein")


def test_without_lpips_weights_one_warning_and_no_perceptual_term(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.training.losses"):
        loss_fn = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, disc_num_layers=2, disc_ndf=16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "perceptual_ckpt" in warnings[0].getMessage()
    assert loss_fn.perceptual_weight == 0 and loss_fn.perceptual_loss is None
    x, y = images(), images()
    torch.testing.assert_close(loss_fn.reconstruction_loss(x, y), (x - y).abs())


# ---- LPIPS from local files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory) -> tuple[Path, Path]:
    """A random torchvision-VGG16 state dict (safetensors) and random lpips linear heads (torch file)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("lpips")
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # torchvision's vgg16 convs
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.0.bias"] = torch.zeros(8)  # ignored
    save_file(vgg, folder / "vgg16.safetensors")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    torch.save(lins, folder / "vgg.pth")
    return folder / "vgg16.safetensors", folder / "vgg.pth"


def test_lpips_from_random_local_weights(lpips_files):
    vgg_path, lin_path = lpips_files
    lpips = LPIPS([vgg_path, lin_path])
    x, y = images(size=16), images(size=16)
    assert torch.equal(lpips(x, x), torch.zeros(2, 1, 1, 1))
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # a fixed metric: no dropout even inside a training module
    y.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0

    # the same weights in the lpips package's full-model layout (net.sliceK.N, lins.K) give the same distance
    full = {f"net.slice{1 + sum(int(k.split('.')[0]) >= e for e in (4, 9, 16, 23))}.{k}": v
            for k, v in lpips.net.state_dict().items()}
    full.update({f"lins.{k}": v for k, v in lpips.lins.state_dict().items()})
    path = vgg_path.parent / "lpips_full.pt"
    torch.save(full, path)
    torch.testing.assert_close(LPIPS(path)(x, y.detach()), d)


def test_lpips_file_errors_and_missing_heads(lpips_files, caplog, tmp_path):
    vgg_path, lin_path = lpips_files
    with pytest.raises(ValueError, match="lacks VGG16 weights"):
        LPIPS(lin_path)
    with caplog.at_level(logging.WARNING, logger="ldm.training.losses"):
        uniform = LPIPS(vgg_path)
    assert any("linear heads" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(lin.model[1].weight, torch.ones_like(lin.model[1].weight)) for lin in uniform.lins)
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 5, 5)}, bad)
    with pytest.raises(ValueError, match=r"shape mismatch \(net\.0\.weight \(64, 3, 5, 5\) vs model \(64, 3, 3, 3\)"):
        LPIPS([vgg_path, lin_path, bad])


def test_loss_uses_lpips_when_given(lpips_files):
    loss_fn = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.5, perceptual_ckpt=[str(p) for p in lpips_files],
                                     disc_num_layers=2, disc_ndf=16)
    assert loss_fn.perceptual_weight == 0.5
    x, y = images(size=16), images(size=16)
    p = loss_fn.perceptual_loss(x, y)
    torch.testing.assert_close(loss_fn.reconstruction_loss(x, y), (x - y).abs() + 0.5 * p)
    torch.testing.assert_close(loss_fn.reconstruction_loss(x, x), torch.zeros_like(x))


# ---- the Lightning module -----------------------------------------------------------------------------------------
def test_module_keeps_the_autoencoder_layout_and_exports_it(tmp_path):
    module = make_module()
    keys = set(module.state_dict())
    loss_keys = {k for k in keys if k.startswith("loss.")}
    assert {"loss.logvar", "loss.discriminator.main.0.weight"} <= loss_keys
    assert keys - loss_keys == set(AutoencoderKL(DDCONFIG, 4).state_dict())
    assert set(module.export_state_dict()) == keys - loss_keys
    with pytest.raises(ValueError, match="no EMA"):
        module.export_state_dict(include_ema=True)

    path = module.export(tmp_path / "vae.safetensors")
    sd, meta = read_state_dict(path)
    assert set(sd) == keys - loss_keys
    plain = instantiate_from_config(json.loads(meta["config"])["model"])
    assert type(plain) is AutoencoderKL
    plain.load_state_dict(sd, strict=True)
    loaded = AutoencoderKL(DDCONFIG, 4, ckpt_path=path)  # what first_stage_ckpt does
    z = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(loaded.decode(z), module.decode(z))
    # and back into a training module (fine-tuning from an export)
    again = AutoencoderKLModule(DDCONFIG, 4, loss_node(), ckpt_path=path)
    torch.testing.assert_close(again.decode(z), module.decode(z))


def test_one_step_before_disc_start_trains_only_the_autoencoder():
    module = make_module(disc_start=100)
    ae_before, disc_before = snapshot(module.encoder), snapshot(module.loss.discriminator)
    trainer = fit(module, max_steps=1)
    assert module.ae_step == 1 and trainer.global_step == 1
    assert changed(ae_before, module.encoder)
    assert not changed(disc_before, module.loss.discriminator)
    opt_ae, opt_disc = trainer.optimizers
    assert len(opt_ae.state) > 0 and len(opt_disc.state) == 0
    assert opt_ae.defaults["betas"] == (0.5, 0.9)


def test_one_step_after_disc_start_trains_both():
    module = make_module(disc_start=0)
    ae_before, disc_before = snapshot(module.decoder), snapshot(module.loss.discriminator)
    logvar_before = module.loss.logvar.detach().clone()
    trainer = fit(module, max_steps=2)  # Lightning counts both optimizers' steps: one batch
    assert module.ae_step == 1
    assert changed(ae_before, module.decoder) and changed(disc_before, module.loss.discriminator)
    opt_ae, opt_disc = trainer.optimizers
    assert len(opt_ae.state) > 0 and len(opt_disc.state) > 0
    assert torch.equal(module.loss.logvar.detach(), logvar_before)  # fixed unless learn_logvar
    metrics = trainer.callback_metrics
    for key in ("train/rec_loss", "train/kl_loss", "train/g_loss", "train/d_loss"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/d_weight"] > 0 and metrics["train/disc_factor"] == 1


def test_learn_logvar_and_bad_arguments():
    module = AutoencoderKLModule(DDCONFIG, 4, loss_node(), learning_rate=1e-3, learn_logvar=True)
    assert any(p is module.loss.logvar for p in module.autoencoder_parameters())
    with pytest.raises(ValueError, match="lossconfig"):
        AutoencoderKLModule(DDCONFIG, 4, {"params": {}})
    with pytest.raises(ValueError, match="adam_betas"):
        AutoencoderKLModule(DDCONFIG, 4, loss_node(), adam_betas=[0.5])
    with pytest.raises(ConfigError, match="disc_loss"):
        AutoencoderKLModule(DDCONFIG, 4, loss_node(disc_loss="nope"))
    with pytest.raises(KeyError, match="image_key"):
        make_module().get_input({"jpg": images()})
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        make_module().get_input({"image": torch.zeros(3, 32, 32)})


def test_loss_falls_on_shapes():
    module = make_module(disc_start=10_000)
    data = ShapesDataModule(num_train=8, num_val=2, size=32, batch_size=4)
    data.setup()
    batch = next(iter(data.train_dataloader()))

    def rec_loss() -> float:
        with torch.no_grad():
            x = module.get_input(batch)
            return (module(x, sample_posterior=False)[0] - x).abs().mean().item()

    before = rec_loss()
    fit(module, max_steps=8, batch_size=2)
    after = rec_loss()
    print(before, after)
    assert after < 0.7 * before, (before, after)


class ImageRecorder(pl.loggers.Logger):
    """A logger whose experiment records ``add_image`` calls (as TensorBoard's SummaryWriter has)."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, torch.Tensor, int]] = []

    @property
    def experiment(self):
        return self

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.images.append((tag, image, step))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_validation_logs_reconstruction_metrics_and_images():
    module = AutoencoderKLModule(DDCONFIG, 4, loss_node(disc_start=0), learning_rate=1e-3, num_val_images=2)
    recorder = ImageRecorder()
    trainer = pl.Trainer(accelerator="cpu", logger=recorder, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=ShapesDataModule(num_train=2, num_val=2, size=32, batch_size=2),
                               verbose=False)[0]
    assert {"val/rec_loss", "val/psnr", "val/kl_loss", "val/d_loss"} <= set(metrics)
    assert 0 < metrics["val/psnr"] < 100
    [(tag, grid, _)] = recorder.images
    assert tag == "val/reconstructions" and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1


# ---- configs ------------------------------------------------------------------------------------------------------
def test_kl_f8_config_is_the_sd_first_stage():
    cfg = load_config(ROOT / "configs" / "autoencoder" / "kl_f8.yaml")
    check_config(cfg.model, "model")
    check_config(cfg.data, "data")
    with torch.device("meta"):
        module = instantiate_from_config(cfg.model, "model")
    assert isinstance(module, AutoencoderKLModule) and module.loss.disc_start == 50001
    exported = {k: tuple(v.shape) for k, v in module.export_state_dict().items()}
    assert exported == layout_shapes("sd-v1.tsv", "first_stage_model.")


def test_shapes_demo_config_matches_the_ldm_demo_first_stage():
    cfg = load_config(ROOT / "configs" / "demo" / "shapes_autoencoder.yaml")
    check_config(cfg.model, "model")
    check_config(cfg.data, "data")
    ldm_demo = ROOT / "configs" / "demo" / "shapes_ldm.yaml"
    if ldm_demo.is_file():
        first = to_plain(load_config(ldm_demo).model.params.first_stage_config.params)
        assert to_plain(cfg.model.params.ddconfig) == first["ddconfig"]
        assert cfg.model.params.embed_dim == first["embed_dim"]
    module = instantiate_from_config(cfg.model, "model")
    assert module.downsample_factor in (4, 8)


# ---- through train.py and the run's callbacks ---------------------------------------------------------------------
def test_export_callback_stores_the_autoencoder_config(tmp_path):
    from ldm.training.callbacks import export_model

    module = make_module()
    path = export_model(module, tmp_path / "vae.safetensors")
    sd, meta = read_state_dict(path)
    assert set(sd) == set(module.export_state_dict())
    assert json.loads(meta["config"])["model"]["target"] == "ldm.models.autoencoder.AutoencoderKL"


@pytest.mark.slow
def test_train_py_trains_resumes_and_exports_the_demo(tmp_path):
    from ldm.cli.train import main

    args = ["--base", str(ROOT / "configs" / "demo" / "shapes_autoencoder.yaml"), "--logdir", str(tmp_path),
            "--name", "ae", "lightning.logger=csv", "data.params.num_train=4", "data.params.num_val=2",
            "data.params.size=32", "data.params.batch_size=2", "model.params.lossconfig.params.disc_start=1"]
    assert main(args + ["lightning.trainer.max_steps=3"]) == 0  # one AE-only batch, then one with both
    run = tmp_path / "ae"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["ae_step"] == 2
    assert main(["--resume", str(run), "--logdir", str(tmp_path), "lightning.trainer.max_steps=5"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["ae_step"] == 3

    cfg = load_config(ROOT / "configs" / "demo" / "shapes_autoencoder.yaml").model.params
    vae = AutoencoderKL(to_plain(cfg.ddconfig), cfg.embed_dim, ckpt_path=run / "ae.safetensors")  # first_stage_ckpt
    assert vae.encode(images()).mode().shape == (2, 4, 8, 8)


@pytest.mark.slow
def test_two_process_ddp_step():
    from pytorch_lightning.strategies import DDPStrategy

    module = make_module(disc_start=1)
    ae_before, disc_before = snapshot(module.decoder), snapshot(module.loss.discriminator)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0,
                         strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True))
    trainer.fit(module, datamodule=ShapesDataModule(num_train=8, num_val=2, size=32, batch_size=2))
    # spawned workers hand rank 0's weights back: both networks were trained through DDP
    assert changed(ae_before, module.decoder) and changed(disc_before, module.loss.discriminator)
    assert torch.isfinite(trainer.callback_metrics["train/d_loss"])
