"""FSDP with EMA (ldm.training.fsdp): the EMA of sharded weights against the EMA of the whole model, the gather on
rank 0 and the export layout (in this process as a group of one; slow: two gloo processes, each with half of every
tensor); activation checkpointing per block; the config checks; (slow) train.py with --strategy fsdp on two CPU
processes against DDP, resumed and exported."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from test_train_ldm import fixed_batch, tiny_module  # noqa: E402

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_steps(module, shard_mesh=None) -> list[float]:
    """STEPS SGD steps of the UNet on a fixed batch, each followed by the EMA update; the same on every rank."""
    batch = fixed_batch(4)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        loss = module._loss(batch, torch.Generator().manual_seed(step), drop=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.model_ema.update(module.model)
        losses.append(loss.item())
    return losses


def _sample(module) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = module.get_learned_conditioning(["a red circle", "two blue squares"])
    with torch.no_grad(), module.ema_scope():
        return module.apply_model(x, torch.tensor([10, 500]), {"crossattn": cond})


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _sharded_run(rank, world, out)
    finally:
        dist.destroy_process_group()


def _sharded_run(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from ldm.training.fsdp import full_state_dict, is_sharded, shard

    torch.manual_seed(0)
    module = tiny_module(ema_decay=0.5, fused_optimizer=False)
    shard(module, init_device_mesh("cpu", (world,)))
    assert is_sharded(module)
    params = dict(module.model.named_parameters())
    shards = {}
    for name, s_name in module.model_ema.m_name2s_name.items():
        buf, p = module.model_ema._buffers[s_name], params[name]
        assert isinstance(buf, DTensor) and buf.placements == p.placements, name
        assert buf.to_local().shape == p.to_local().shape, name
        shards[name] = (buf.to_local().shape[0], p.shape[0])
    losses = _train_steps(module)
    sample = _sample(module)
    raw = {n: p.full_tensor() for n, p in module.model.named_parameters()}  # collective
    state = full_state_dict(module)  # collective; rank 0 gets it
    if rank == 0:
        torch.save({"losses": losses, "sample": sample, "state": state, "raw_after_scope": raw,
                    "shards": shards, "world": world}, out)


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["1rank", "2ranks"])
def sharded_run(request, tmp_path_factory) -> dict:
    """One rank: a process group of one in this process (seconds). Two ranks: two fresh processes (spawned: a fork
    of this multi-threaded process can deadlock), each with its half of every tensor."""
    import torch.distributed as dist

    out, world = str(tmp_path_factory.mktemp("fsdp") / "rank0.pt"), request.param
    if world == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            _sharded_run(0, 1, out)
        finally:
            dist.destroy_process_group()
    else:
        mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, join=True, start_method="spawn")
    return torch.load(out, weights_only=True)


def test_each_rank_keeps_the_ema_of_its_own_shards(sharded_run):
    world, shards = sharded_run["world"], sharded_run["shards"].values()
    assert shards and all(local == -(-whole // world) or local == whole // world for local, whole in shards)
    assert world == 1 or any(local < whole for local, whole in shards)


def test_sharded_ema_training_gathers_to_the_whole_models_state(sharded_run):
    """Two ranks on the same batch: the same gradients as one process, so the same weights and EMA after every
    step; rank 0 gathers weights and EMA (model_ema.*, the original layout) and the export takes the EMA weights."""
    from ldm.training.latent_diffusion import export_state_dict

    torch.manual_seed(0)
    ref = tiny_module(ema_decay=0.5, fused_optimizer=False)
    ref_losses = _train_steps(ref)
    assert sharded_run["losses"] == pytest.approx(ref_losses, rel=1e-5)
    want, got = ref.state_dict(), sharded_run["state"]
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    unet_key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(got[unet_key], got["model_ema.diffusion_modelout2weight"])  # the EMA lags the weights
    assert int(got["model_ema.num_updates"]) == STEPS
    exported, ref_export = export_state_dict(got), export_state_dict(want)
    assert set(exported) == set(ref_export)
    torch.testing.assert_close(exported[unet_key], got["model_ema.diffusion_modelout2weight"])
    # the EMA swapped in for sampling gives the unsharded EMA's output, and the raw weights come back afterwards
    torch.testing.assert_close(sharded_run["sample"], _sample(ref), rtol=1e-4, atol=1e-5)
    for name, value in sharded_run["raw_after_scope"].items():
        torch.testing.assert_close(value, want["model." + name], rtol=1e-5, atol=1e-6, msg=name)


# ---- activation checkpointing -----------------------------------------------------------------------------------
def test_activation_checkpointing_recomputes_every_block(monkeypatch):
    from ldm.models import attention
    from ldm.models.attention import BasicTransformerBlock
    from ldm.models.unet import AttentionBlock, ResBlock

    calls = []
    real = attention.torch_checkpoint.checkpoint
    monkeypatch.setattr(attention.torch_checkpoint, "checkpoint",
                        lambda fn, *a, **k: calls.append(type(fn.__self__)) or real(fn, *a, **k))
    grads = {}
    for on in (False, True):
        torch.manual_seed(0)
        module = tiny_module(gradient_checkpointing=on)
        calls.clear()
        module._loss(fixed_batch(2), torch.Generator().manual_seed(0), drop=False).backward()
        grads[on] = {n: p.grad for n, p in module.model.named_parameters()}
        blocks = [m for m in module.model.modules() if isinstance(m, (ResBlock, AttentionBlock, BasicTransformerBlock))]
        assert len(calls) == (len(blocks) if on else 0)
    assert BasicTransformerBlock in calls and ResBlock in calls  # the transformer blocks too, not only the ResBlocks
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, msg=name)


# ---- config checks ----------------------------------------------------------------------------------------------
def test_fsdp_config_checks():
    from ldm.cli.train import _check_fsdp
    from ldm.config import ConfigError

    ldm = OmegaConf.create({"target": "ldm.training.latent_diffusion.LatentDiffusionModule", "params": {}})
    _check_fsdp({"strategy": "fsdp", "accelerator": "cpu"}, ldm)  # CPUs, with EMA (its default)
    with pytest.raises(ConfigError, match=r"^lightning\.trainer\.strategy: fsdp_cpu_offload .*--strategy fsdp"):
        _check_fsdp({"strategy": "fsdp_cpu_offload"}, ldm)
    with pytest.raises(ConfigError, match=r"^model\.params\.lora: .*--strategy ddp"):
        _check_fsdp({"strategy": "fsdp"}, OmegaConf.create({"target": ldm.target, "params": {"lora": {"rank": 4}}}))
    autoencoder = OmegaConf.create({"target": "ldm.training.autoencoder.AutoencoderKLModule", "params": {}})
    with pytest.raises(ConfigError, match=r"^lightning\.trainer\.strategy: fsdp shards .*configure_model"):
        _check_fsdp({"strategy": "fsdp"}, autoencoder)
    _check_fsdp({"strategy": "ddp"}, autoencoder)


def test_fsdp_strategy_is_lightnings_model_parallel_with_one_data_parallel_dimension():
    from pytorch_lightning.strategies import ModelParallelStrategy

    from ldm.training.fsdp import make_strategy

    strategy = make_strategy()
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint is False


# ---- train.py end to end (slow) ---------------------------------------------------------------------------------
def _run(tmp_path: Path, name: str, strategy: str, steps: int, resume: bool = False):
    from test_train_cli import run_train, tiny_run_config

    base = tiny_run_config(tmp_path, enable_progress_bar=False)
    common = ["--accelerator", "cpu", "--devices", "2", "--strategy", strategy, "--max_steps", str(steps)]
    if resume:
        args = ["--resume", str(tmp_path / "logs" / name), *common]
    else:
        args = ["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", name, *common,
                "lightning.callbacks.export.fp16=false",
                # the same kernels on both sides (FSDP runs the plain layers on NCHW weights): Adam would turn their
                # last-bit differences in near-zero gradients into differences of the order of the learning rate
                "model.params.fused_optimizer=false", "model.params.unet_config.params.channels_last=false",
                "lightning.callbacks.accel=false"]
    proc = run_train(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "logs" / name / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_train_py_fsdp_two_cpu_processes_matches_ddp_resumes_and_exports(tmp_path):
    from ldm.convert import load_model
    from ldm.io import read_state_dict

    for steps, resume in ((2, False), (3, True)):
        fsdp, ddp = _run(tmp_path, "fsdp", "fsdp", steps, resume), _run(tmp_path, "ddp", "ddp", steps, resume)
        assert fsdp["global_step"] == ddp["global_step"] == steps
        assert set(fsdp["state_dict"]) == set(ddp["state_dict"])  # one file, the usual layout, EMA included
        for key, value in ddp["state_dict"].items():
            torch.testing.assert_close(fsdp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert int(fsdp["state_dict"]["model_ema.num_updates"]) == steps
    exports = [read_state_dict(tmp_path / "logs" / n / f"{n}.safetensors")[0] for n in ("fsdp", "ddp")]
    assert set(exports[0]) == set(exports[1])
    for key, value in exports[1].items():
        torch.testing.assert_close(exports[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    sd = fsdp["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(exports[0][key], sd["model_ema.diffusion_modelout2weight"])  # the EMA weights
    assert not torch.equal(exports[0][key], sd[key])
    load_model(None, tmp_path / "logs" / "fsdp" / "fsdp.safetensors")  # strict
    assert (tmp_path / "logs" / "fsdp" / "images" / "step-00000003.png").is_file()
