"""train.py: end to end in a subprocess, resume/refuse/export-only, config errors before any work (exit 2),
the shipped configs with shrinking overrides, and (slow) 2-process DDP and a 2-node loopback run on CPU."""
from __future__ import annotations

import copy
import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.cli.train import main
from ldm.convert import load_model
from ldm.io import read_state_dict
from test_train_ldm import TINY_DATA, tiny_model_node

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# shrinks configs/ldm_txt2img.yaml and configs/demo/shapes_ldm.yaml to the tiny test size
SHRINK_UNET = ["model.params.unet_config.params.model_channels=32",
               "model.params.unet_config.params.channel_mult=[1,2]",
               "model.params.unet_config.params.attention_resolutions=[2]",
               "model.params.unet_config.params.num_res_blocks=1",
               "model.params.unet_config.params.num_head_channels=16"]
SHRINK_TXT2IMG = SHRINK_UNET + [
    "model.params.image_size=8", "model.params.unet_config.params.image_size=8",
    "model.params.unet_config.params.context_dim=32",
    "model.params.first_stage_config.params.ddconfig.ch=32",
    "model.params.first_stage_config.params.ddconfig.ch_mult=[1,1,1,1]",
    "model.params.first_stage_config.params.ddconfig.num_res_blocks=1",
    "model.params.first_stage_config.params.ddconfig.resolution=64",
    "model.params.cond_stage_config.params.arch=ldm-tiny-text", "model.params.init_from=null",
    "model.params.cond_stage_config.params.projection=false",
    "model.params.validation_prompts=[a red circle]", "model.params.sample_steps=2",
    "data.params.size=64", "data.params.batch_size=2", "data.params.num_workers=0",
    "lightning.trainer.max_steps=1", "lightning.trainer.precision=32", "lightning.trainer.accelerator=cpu",
    "lightning.trainer.devices=1", "lightning.callbacks.export.fp16=false",
]
FAST = ["lightning.trainer.enable_progress_bar=false", "lightning.trainer.enable_model_summary=false",
        "lightning.callbacks.image_logger=false"]


def tiny_run_config(tmp_path: Path, **trainer) -> Path:
    """A complete tiny run config file (model, shapes data at 32 px, trainer, callbacks)."""
    cfg = {
        "model": tiny_model_node(),
        "data": copy.deepcopy(TINY_DATA),
        "lightning": {
            "logger": "csv",
            "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "num_sanity_val_steps": 0,
                        "log_every_n_steps": 1, "enable_model_summary": False, **trainer},
            "callbacks": {"checkpoint": {"every_n_train_steps": 1, "keep_last": 1},
                          "image_logger": {"every_n_steps": 2}},
        },
    }
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def run_train(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


# ---- end to end -------------------------------------------------------------------------------------------------
def test_train_py_end_to_end(tmp_path):
    base = tiny_run_config(tmp_path)
    proc = run_train(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "run", "--seed", "3",
                      "data.params.batch_size=2", "--max_steps", "2", "--accelerator", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "logs" / "run"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.data.params.batch_size == 2 and saved.lightning.trainer.max_steps == 2
    assert last_step(run) == 2
    assert (run / "images" / "step-00000002.png").is_file()
    assert (run / "logs" / "metrics.csv").is_file()
    assert "train/loss" in (run / "logs" / "metrics.csv").read_text().splitlines()[0]
    model = load_model(None, run / "run.safetensors")
    assert type(model).__name__ == "LatentDiffusion"
    # what a newcomer reads: where the curves and grids are, and no noise that means nothing for the run
    assert f"loss curves: {run / 'logs'}; sample grids: {run / 'images'}" in proc.stderr
    assert "Tip:" not in proc.stderr and "in eval mode" not in proc.stderr and "LeafSpec" not in proc.stderr


def test_the_default_logger_is_tensorboard_and_the_log_says_how_to_look(tmp_path, caplog):
    base = tiny_run_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="ldm.train"):
        assert main(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "tb", "lightning.logger=auto",
                     "--max_steps", "1"] + FAST) == 0
    run = tmp_path / "logs" / "tb"
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert f"loss curves and sample grids: tensorboard --logdir {run / 'logs'}" in caplog.text


def test_resume_keeps_the_runs_seed(tmp_path, caplog):
    base = tiny_run_config(tmp_path)
    run = tmp_path / "logs" / "s"
    assert main(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "s", "--seed", "7",
                 "--max_steps", "1"] + FAST) == 0
    assert main(["--resume", str(run), "--max_steps", "2"] + FAST) == 0  # no --seed: the run's own
    assert last_step(run) == 2 and os.environ["PL_GLOBAL_SEED"] == "7"
    assert OmegaConf.load(run / "config.yaml").seed == 7
    with caplog.at_level(logging.WARNING):
        assert main(["--resume", str(run), "--max_steps", "3", "--seed", "8"] + FAST) == 0
    assert "differs from the resumed run's seed 7" in caplog.text and os.environ["PL_GLOBAL_SEED"] == "8"


def test_resume_refuse_and_export_only(tmp_path, caplog):
    base = tiny_run_config(tmp_path)
    common = ["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "r"] + FAST
    assert main(common + ["--max_steps", "1"]) == 0
    run = tmp_path / "logs" / "r"
    assert last_step(run) == 1
    with caplog.at_level(logging.ERROR):
        assert main(common + ["--max_steps", "2"]) == 2  # would overwrite the run
    assert "--resume" in caplog.text
    assert main(common + ["--max_steps", "2", "--resume"]) == 0  # auto: continue from last.ckpt
    assert last_step(run) == 2
    assert main(["--resume", str(run), "--max_steps", "3"] + FAST) == 0  # the run folder alone is enough
    assert last_step(run) == 3
    assert OmegaConf.load(run / "config.yaml").seed == 23 and os.environ["PL_GLOBAL_SEED"] == "23"
    export = run / "r.safetensors"
    export.unlink()
    assert main(["--resume", str(run / "checkpoints" / "last.ckpt"), "--export-only"]) == 0
    sd, meta = read_state_dict(export)
    assert meta["global_step"] == "3"
    load_model(None, export)
    assert main(["--resume", str(tmp_path / "nothing"), "--export-only"]) == 2


def test_export_only_keeps_the_runs_export_settings(tmp_path):
    """--export-only writes what the end of training wrote: the export callback's fp16 (and name) from the run's
    config, not the function's defaults."""
    base = tiny_run_config(tmp_path)
    assert main(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "h", "--max_steps", "1",
                 "lightning.callbacks.export.fp16=true", "lightning.callbacks.export.name=half"] + FAST) == 0
    run = tmp_path / "logs" / "h"
    export = run / "half.safetensors"
    at_end = {k: v.dtype for k, v in read_state_dict(export)[0].items()}
    assert torch.float16 in set(at_end.values())
    export.unlink()
    assert main(["--resume", str(run), "--export-only"]) == 0
    assert {k: v.dtype for k, v in read_state_dict(export)[0].items()} == at_end


# ---- config errors: one line naming the key, exit status 2, before any work -----------------------------------
@pytest.mark.parametrize("override,key", [
    ("model.params.foo=1", "model.params.foo"),
    ("model.params.unet_config.params.chanel_mult=[1]", "model.params.unet_config.params.chanel_mult"),
    ("model.params.cond_drop_rate=2", "cond_drop_rate"),
    ("data.params.batch_size=0", "batch_size"),
    ("lightning.trainer.max_stepz=3", "lightning.trainer.max_stepz"),
    ("lightning.trainer.logger=false", "lightning.trainer.logger"),
    ("lightning.callbacks.checkpoint.every=3", "lightning.callbacks.checkpoint.every"),
    ("lightning.callbacks.mystery.x=1", "lightning.callbacks.mystery"),
    ("lightning.logger=wandb", "lightning.logger"),
    ("model.target=ldm.models.unet.Nope", "model.target"),
    ("lightning.trainer.strategy=fsdp_cpu_offload", "lightning.trainer.strategy"),  # FSDP1: use fsdp
    # values checked against the constructors' annotations, before anything is built
    ("lightning.trainer.max_steps=abc", "lightning.trainer.max_steps: 'abc' is not valid here; expected an int"),
    ("model.params.base_learning_rate=fast", "model.params.base_learning_rate: 'fast' is not valid here; "
                                             "expected a number"),
    ("model.params.unet_config.params.channel_mult=abc", "model.params.unet_config.params.channel_mult: 'abc' "
                                                         "is not valid here; expected a list of ints"),
    ("model.params.unet_config.params.channel_mult=[1,x]", "channel_mult: [1, 'x']"),
    ("model.params.use_ema=maybe", "model.params.use_ema: 'maybe' is not valid here; expected true or false"),
    ("data.params.batch_size=2.5", "data.params.batch_size: 2.5"),
    ("lightning.trainer.precision=17", "lightning.trainer.precision: 17 is not valid here; expected one of 64"),
    ("lightning.callbacks.checkpoint.keep_last=all", "lightning.callbacks.checkpoint.keep_last: 'all'"),
    ("model.params.first_stage_config.params.ddconfig=3", "ddconfig: 3 is not valid here; expected a mapping"),
    # a value only Lightning can judge: its error, mapped back to the key, still before the model is built
    ("lightning.trainer.max_time=abc", "lightning.trainer.max_time: not accepted by pytorch_lightning.Trainer"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, caplog, override, key):
    base = tiny_run_config(tmp_path)
    with caplog.at_level(logging.ERROR, logger="ldm.train"):
        rc = main(["--base", str(base), "--logdir", str(tmp_path / "logs"), override])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and key in errors[0], errors
    assert not (tmp_path / "logs" / "tiny" / "checkpoints").exists()


def test_missing_required_value_and_bad_file(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="ldm.train"):
        assert main(["--base", str(ROOT / "configs" / "ldm_txt2img.yaml"), "--logdir", str(tmp_path)]) == 2
        assert main(["--base", str(tmp_path / "nope.yaml"), "--logdir", str(tmp_path)]) == 2
        assert main(["--logdir", str(tmp_path), "model.params.sample_stepz=1"]) == 2  # the default: shapes demo
    assert "data.params.urls" in caplog.text and "nope.yaml" in caplog.text
    assert "model.params.sample_stepz" in caplog.text and "LatentDiffusionModule" in caplog.text


@pytest.mark.parametrize("override,message", [
    ("data.params.urls=/nowhere/shard-{000..009}.tar", "no shards found for '/nowhere/shard-{000..009}.tar'"),
    ("model.params.cond_stage_config.params.ckpt_path=/nowhere/vit-h.bin",
     "model.params.cond_stage_config.params.ckpt_path: file not found: /nowhere/vit-h.bin"),
    ("model.params.first_stage_ckpt=/nowhere/vae.safetensors",
     "model.params.first_stage_ckpt: file not found: /nowhere/vae.safetensors"),
])
def test_bad_paths_fail_before_the_model_is_built(tmp_path, caplog, monkeypatch, override, message):
    """The SD-sized config builds a 1.3B-parameter model: a wrong path must not wait for it."""
    import functools

    import ldm.model

    @functools.wraps(ldm.model.LatentDiffusion.__init__)  # the same signature for the config checker
    def no_build(*args, **kwargs):
        raise AssertionError("the networks must not be built for a bad path")

    monkeypatch.setattr(ldm.model.LatentDiffusion, "__init__", no_build)
    urls = write_shards(tmp_path / "shards", num=1, per_shard=2, size=64)
    with caplog.at_level(logging.ERROR, logger="ldm.train"):
        rc = main(["--base", str(ROOT / "configs" / "ldm_txt2img.yaml"), "--logdir", str(tmp_path / "logs"),
                   f"data.params.urls={urls}", override])
    assert rc == 2 and message in caplog.text, caplog.text


@pytest.mark.parametrize("args,key", [
    (["model.params.ema_decay=7"], "ema_decay"),
    (["--max_steps", "abc"], "lightning.trainer.max_steps: 'abc'"),  # was a traceback; the others: in process
])
def test_bad_config_in_a_subprocess_reports_one_error_line(tmp_path, args, key):
    proc = run_train(["--base", str(tiny_run_config(tmp_path)), "--logdir", str(tmp_path)] + args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if "ERROR" in ln]
    assert len(errors) == 1 and key in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    if key != "ema_decay":  # (a range the module checks when it is built)
        assert "Seed set" not in proc.stderr  # refused before the seeding and the model


# ---- the shipped configs ------------------------------------------------------------------------------------------
def write_shards(out: Path, num: int, per_shard: int, size: int = 32) -> str:
    """Shapes images with unique captions ("item 0003 ...") as webdataset shards; returns the brace pattern."""
    import webdataset as wds

    from ldm.data.shapes import ShapesDataset, render

    ds = ShapesDataset(num, size=size, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "s-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(num):
            scene, text = ds.scene(i)
            buf = io.BytesIO()
            render(scene, size).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": f"item {i:04d} {text}".encode()})
    return str(out / f"s-{{000000..{(num + per_shard - 1) // per_shard - 1:06d}}}.tar")


def test_ldm_txt2img_config_one_step_on_webdataset(tmp_path):
    urls = write_shards(tmp_path / "shards", num=4, per_shard=2, size=64)
    args = ["--base", str(ROOT / "configs" / "ldm_txt2img.yaml"), "--logdir", str(tmp_path / "logs"),
            f"data.params.urls={urls}"] + SHRINK_TXT2IMG + FAST
    assert main(args) == 0
    run = tmp_path / "logs" / "ldm_txt2img"
    assert last_step(run) == 1
    assert load_model(None, run / "ldm_txt2img.safetensors").cond_stage_model.arch == "ldm-tiny-text"


def test_shapes_demo_config_with_webdataset_data(tmp_path):
    urls = write_shards(tmp_path / "shards", num=4, per_shard=2, size=64)
    configs = ROOT / "configs"
    # overrides right after the --base files (the README's form): argparse gives them to --base
    args = ["--base", str(configs / "demo" / "shapes_ldm.yaml"), str(configs / "data" / "webdataset.yaml"),
            f"data.params.urls={urls}", "--logdir", str(tmp_path / "logs"), "--name", "demo",
            "lightning.trainer.max_steps=1", "data.params.batch_size=2", "data.params.size=64",
            "data.params.num_workers=0", "lightning.trainer.accelerator=cpu",
            "model.params.cond_stage_config.params.arch=ldm-tiny-text", "model.params.init_from=null",
            "model.params.unet_config.params.context_dim=32"] + SHRINK_UNET + FAST
    assert main(args) == 0
    assert last_step(tmp_path / "logs" / "demo") == 1


def test_shapes_demo_config_with_image_folder_data(tmp_path):
    from ldm.data.shapes import ShapesDataset, render

    folder = tmp_path / "images"
    folder.mkdir()
    dataset = ShapesDataset(4, size=64, seed=3)
    for i in range(4):
        scene, caption = dataset.scene(i)
        render(scene, 64).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    configs = ROOT / "configs"
    args = ["--base", str(configs / "demo" / "shapes_ldm.yaml"), str(configs / "data" / "image_folder.yaml"),
            f"data.params.root={folder}", "--logdir", str(tmp_path / "logs"), "--name", "folder",
            "lightning.trainer.max_steps=1", "data.params.batch_size=2", "data.params.num_workers=0",
            "lightning.trainer.accelerator=cpu", "model.params.cond_stage_config.params.arch=ldm-tiny-text",
            "model.params.init_from=null",
            "model.params.unet_config.params.context_dim=32"] + SHRINK_UNET + FAST
    assert main(args) == 0
    assert last_step(tmp_path / "logs" / "folder") == 1


# ---- distributed (CPU, gloo) ---------------------------------------------------------------------------------------
class RecordCaptions(pl.Callback):
    """Appends every training caption this rank sees to ``<out_dir>/rank<R>.txt``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.txt", "a") as f:
            f.writelines(c.split()[1] + "\n" for c in batch["caption"])


def _ddp_args(tmp_path: Path, name: str, urls: str) -> list[str]:
    wds_cfg = {"target": "ldm.data.webdataset.WebDatasetDataModule",
               "params": {"urls": urls, "batch_size": 2, "num_workers": 0, "size": 32, "shuffle_buffer": 1}}
    OmegaConf.save(OmegaConf.create({"data": wds_cfg}), tmp_path / "wds.yaml")
    record = ("lightning.callbacks.record={target: test_train_cli.RecordCaptions, "
              f"params: {{out_dir: '{tmp_path / name}'}}}}")
    return ["--base", str(tiny_run_config(tmp_path)), str(tmp_path / "wds.yaml"), "--logdir", str(tmp_path / "logs"),
            "--name", name, "--accelerator", "cpu", "--strategy", "ddp", "--max_steps", "2", record]


def _seen(folder: Path) -> list[set[str]]:
    return [set((folder / f"rank{r}.txt").read_text().split()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_disjoint_shards(tmp_path):
    urls = write_shards(tmp_path / "shards", num=8, per_shard=2)  # 4 shards: 2 per rank, 4 samples each
    proc = run_train(_ddp_args(tmp_path, "ddp", urls) + ["--devices", "2"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _seen(tmp_path / "ddp")
    assert len(r0) == len(r1) == 4 and not r0 & r1
    assert last_step(tmp_path / "logs" / "ddp") == 2
    assert [p.name for p in (tmp_path / "logs" / "ddp" / "images").iterdir()] == ["step-00000002.png"]
    load_model(None, tmp_path / "logs" / "ddp" / "ddp.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_loopback(tmp_path):
    urls = write_shards(tmp_path / "shards", num=8, per_shard=2)
    args = _ddp_args(tmp_path, "nodes", urls) + ["--devices", "1", "--num_nodes", "2"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                              env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    r0, r1 = _seen(tmp_path / "nodes")
    assert len(r0) == len(r1) == 4 and not r0 & r1
    assert last_step(tmp_path / "logs" / "nodes") == 2


def test_fsdp_with_ema_is_accepted_and_lora_refused_before_work():
    from omegaconf import OmegaConf

    from ldm.cli.train import _check_fsdp
    from ldm.config import ConfigError

    ldm = OmegaConf.create({"target": "ldm.training.latent_diffusion.LatentDiffusionModule", "params": {}})
    _check_fsdp({"strategy": "fsdp", "accelerator": "cpu"}, ldm)  # use_ema defaults to true there (tests/test_fsdp.py)
    ldm.params.lora = {"rank": 4}
    with pytest.raises(ConfigError, match=r"^model\.params\.lora: .*FSDP|^model\.params\.lora: .*ddp"):
        _check_fsdp({"strategy": "fsdp"}, ldm)
    _check_fsdp({"strategy": "ddp"}, OmegaConf.create({"target": "x.y", "params": {"use_ema": True}}))


# ---- resume from a damaged or hostile checkpoint ------------------------------------------------------------------
class _Payload:
    """Pickles as a call of os.system: a checkpoint that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_falls_back_from_a_damaged_last_ckpt_or_stops_in_one_line(tmp_path):
    base = tiny_run_config(tmp_path)
    assert main(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "d", "--max_steps", "2",
                 "lightning.callbacks.checkpoint.keep_last=-1"] + FAST) == 0
    ckpts = tmp_path / "logs" / "d" / "checkpoints"
    last, step1, step2 = ckpts / "last.ckpt", ckpts / "step-00000001.ckpt", ckpts / "step-00000002.ckpt"
    for damaged in (last, step2):  # a crash in the middle of a write (of a copy made without the atomic writer)
        with open(damaged, "r+b") as f:
            f.truncate(damaged.stat().st_size // 2)
    proc = run_train(["--resume", str(tmp_path / "logs" / "d"), "--max_steps", "3"] + FAST)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warning = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln and "cannot resume from" in ln]
    assert len(warning) == 1 and str(last) in warning[0] and str(step1) in warning[0], proc.stderr[-3000:]
    assert last_step(tmp_path / "logs" / "d") == 3  # step 1 + 2 more: the new last.ckpt replaced the broken one
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000001.ckpt", "step-00000002.ckpt",
                                                       "step-00000003.ckpt"]  # replaced, no -v1 copies beside
    assert torch.load(step2, weights_only=True)["global_step"] == 2
    last.unlink()  # gone altogether: the newest step file, as well
    assert main(["--resume", str(tmp_path / "logs" / "d"), "--max_steps", "4"] + FAST) == 0
    assert last_step(tmp_path / "logs" / "d") == 4
    assert main(["--base", str(base), "--logdir", str(tmp_path / "logs"), "--name", "d"] + FAST) == 2  # not anew

    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "global_step": 9, "payload": _Payload(marker)}, last)
    for other in ckpts.glob("step-*.ckpt"):
        other.unlink()
    proc = run_train(["--resume", str(tmp_path / "logs" / "d"), "--max_steps", "4"] + FAST)
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "refusing to load" in errors[0] and str(last) in errors[0], proc.stderr[-3000:]
    assert not marker.exists()
    # an explicitly named checkpoint that is damaged is not swapped for another one
    with open(last, "wb") as f:
        f.write(b"PK\x03\x04" + bytes(100))
    (ckpts / "step-00000003.ckpt").write_bytes(last.read_bytes())
    assert main(["--resume", str(ckpts / "step-00000003.ckpt"), "--max_steps", "4"] + FAST) == 2


class KillAt(pl.Callback):
    """Ends the process at once after optimizer step ``step`` (and its logging), as ``kill -9`` would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(137)


def _logged_steps(run: Path) -> list[int]:
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_kill_keeps_metrics_to_the_last_checkpoint_and_resume_removes_orphaned_temp_files(tmp_path):
    from ldm.io import _host

    base = tiny_run_config(tmp_path)
    run = tmp_path / "logs" / "k"
    kill = "lightning.callbacks.kill={target: test_train_cli.KillAt, params: {step: 5}}"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--base", str(base), "--logdir",
                             str(tmp_path / "logs"), "--name", "k", "--max_steps", "8",
                             "lightning.callbacks.checkpoint.every_n_train_steps=2", kill] + FAST,
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 137, stderr[-3000:]
    assert last_step(run) == 4
    assert _logged_steps(run) == [0, 1, 2, 3, 4]  # the steps up to the checkpoint and after (counted from 0)
    # what a kill in the middle of writing a checkpoint leaves: the writer's temporary file, named after it
    orphan = run / "checkpoints" / f".last.ckpt.{_host()}-{proc.pid}.abcd1234.tmp"
    orphan.write_bytes(b"half a checkpoint")
    proc = run_train(["--resume", str(run), "--max_steps", "6", "lightning.callbacks.kill=false"] + FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not orphan.exists() and f"removed {orphan}" in proc.stderr
    # the resumed run appends to metrics.csv (Lightning's CSV writer deleted the file of the run it resumed), and
    # the row of step 5, which it trains again, is not there twice
    assert last_step(run) == 6 and _logged_steps(run) == [0, 1, 2, 3, 4, 5]

