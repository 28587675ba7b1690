"""A LoRA run under ``precision: bf16-mixed`` keeps its frozen base (UNet, autoencoder, text encoder) in bf16 and the
LoRA in fp32, as diffusers' LoRA script does: the same numbers as the fp32 base under autocast, a checkpoint that
resumes exactly (and across precisions), image logging and the fp32 kohya export still work. fp32 runs keep an fp32
base. Tiny models (width 32) as in test_train_lora.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.io import read_state_dict
from ldm.training.callbacks import AccelCallback, AtomicCheckpointIO, export_model, make_checkpoint_callback
from test_train_ldm import fixed_batch, tiny_data, tiny_model_node, trainer
from test_train_lora import ALL, base_file, lora_module  # noqa: F401 (base_file: the module's fixture)

LORA = {"rank": 4, "alpha": 2.0, "targets": ALL}


def _weights(module: nn.Module, kinds: tuple[type, ...]) -> list[torch.Tensor]:
    return [p for m in module.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)]


def _base_nets(module) -> list[nn.Module]:
    return [module.model, module.first_stage_model, module.conditioner]


def test_bf16_mixed_keeps_the_frozen_base_in_bf16_and_the_lora_in_fp32(tmp_path, base_file):
    module = lora_module(base_file)
    trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[AccelCallback()]).fit(
        module, datamodule=tiny_data())
    assert module.base_dtype == torch.bfloat16
    layers = _weights(module.model, (nn.Linear, nn.Conv2d)) + _weights(module.first_stage_model, (nn.Conv2d,))
    text = _weights(module.conditioner, (nn.Linear, nn.MultiheadAttention))
    assert layers and text and all(p.dtype == torch.bfloat16 for p in layers + text)
    norms = _weights(module, (nn.GroupNorm, nn.LayerNorm))  # as autocast runs them
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.lora.parameters())
    assert all(v.dtype == torch.float32 for k, v in module.state_dict().items() if k.startswith("model_ema.")
               and v.is_floating_point())
    assert not any(p.requires_grad for net in _base_nets(module) for p in net.parameters())
    ups = [p for n, p in module.lora.named_parameters() if n.endswith("lora_up.weight")]
    assert all(p.abs().sum() > 0 for p in ups)  # every branch trained (zero at the start)

    images = module.sample_images(["a red circle"], steps=2)  # the image logger samples the bf16 base
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    state, _ = read_state_dict(export_model(module, tmp_path / "lora.safetensors"))
    assert state and all(v.dtype == torch.float32 for v in state.values())
    half, _ = read_state_dict(module.export_lora(tmp_path / "half.safetensors", fp16=True))
    assert all(v.dtype == torch.float16 for k, v in half.items() if not k.endswith(".alpha"))


def test_fp32_runs_keep_an_fp32_base(tmp_path, base_file):
    module = lora_module(base_file)
    trainer(tmp_path, max_steps=1, callbacks=[AccelCallback()]).fit(module, datamodule=tiny_data())
    assert module.base_dtype is None
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_the_bf16_base_computes_the_fp32_base_numbers_under_autocast(base_file):
    """Stored in bf16, the base gives the loss and the LoRA gradients of the fp32 base under bf16 autocast (the
    layers it casts are the ones autocast casts), and a loss close to the fp32 run's."""
    batch = fixed_batch(2)

    def loss_and_grads(module, precision):
        g = torch.Generator().manual_seed(5)
        module.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
            loss = module._loss(batch, g, drop=False)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in module.lora.named_parameters()}

    def fresh():
        torch.manual_seed(0)  # the LoRA's down matrices
        module = lora_module(base_file)
        with torch.no_grad():  # a LoRA that does something, on every layer
            for n, p in module.lora.named_parameters():
                if n.endswith("lora_up.weight"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        return module

    fp32_loss, _ = loss_and_grads(fresh(), "fp32")
    ref_loss, ref_grads = loss_and_grads(fresh(), "bf16")
    module = fresh()
    module.store_base_in_bf16()
    loss, grads = loss_and_grads(module, "bf16")
    assert math.isfinite(loss)
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    assert loss == pytest.approx(fp32_loss, rel=5e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref_grads[name], atol=2e-2 * ref_grads[name].abs().max() + 1e-6, rtol=0)


def _fit(tmp_path: Path, base_file: Path, name: str, max_steps: int, precision: str, resume: Path | None = None):
    pl.seed_everything(11)
    module = lora_module(base_file)
    module.run_config = {"model": tiny_model_node(init_from=str(base_file), lora=LORA)}
    cb = [make_checkpoint_callback(tmp_path / name, every_n_train_steps=2, keep_last=-1), AccelCallback()]
    t = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                callbacks=cb, precision=precision)
    t.fit(module, datamodule=tiny_data(num_train=12), ckpt_path=str(resume) if resume else None, weights_only=True)
    return module


def test_a_bf16_lora_run_saves_and_resumes_exactly_and_across_precisions(tmp_path, base_file):
    full = _fit(tmp_path, base_file, "full", 4, "bf16-mixed")
    ckpt = torch.load(tmp_path / "full" / "step-00000002.ckpt", weights_only=True)
    assert all(k.startswith(("lora.", "model_ema.")) for k in ckpt["state_dict"])
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    resumed = _fit(tmp_path, base_file, "resumed", 4, "bf16-mixed", resume=tmp_path / "full" / "step-00000002.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the fingerprint is of the base as built: an fp32 run's checkpoint resumes under bf16 and the other way round
    fp32 = _fit(tmp_path, base_file, "fp32", 2, "32-true")
    assert torch.load(tmp_path / "fp32" / "last.ckpt", weights_only=True)["lora_base"] == ckpt["lora_base"]
    assert fp32.base_dtype is None
    on_bf16 = _fit(tmp_path, base_file, "on_bf16", 3, "bf16-mixed", resume=tmp_path / "fp32" / "last.ckpt")
    assert on_bf16.base_dtype == torch.bfloat16
    on_fp32 = _fit(tmp_path, base_file, "on_fp32", 3, "32-true", resume=tmp_path / "full" / "step-00000002.ckpt")
    assert on_fp32.base_dtype is None
