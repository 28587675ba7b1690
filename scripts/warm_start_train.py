"""Run ``train.py`` with the UNet and text tower initialised from an existing LDM file (a warm start).

    python scripts/warm_start_train.py --init ldm/assets/demo/shapes.safetensors [--keep-new] \
        [--text-tower TOWER.safetensors] --base CONFIG [train.py args]

Everything after ``--init PATH`` (and ``--keep-new``, ``--text-tower FILE``) goes to ``train.py`` unchanged.
``model.diffusion_model.*`` and ``cond_stage_model.*`` are copied from PATH (fp16 is fine) after the module is
built, and the UNet's EMA restarts from them; the autoencoder comes from the config (``first_stage_ckpt``), the
noise schedule and ``scale_factor`` are the config's (``scale_by_std`` estimates it again). The config stored
in the export is the plain training config, so the result loads like any other run's export. Used to retrain
the demo model on a fine-tuned autoencoder without starting the diffusion stage from scratch
(docs/demo_model.md).

``--keep-new``: tensors that the config's model has and PATH lacks keep their fresh initialisation instead of
failing (they are listed), e.g. a UNet with ``position_embedding: true`` (zero-initialised) warm-started from a
file without one. Tensors of another shape are still an error.
``--text-tower FILE``: the text tower (``cond_stage_model.*``) comes from FILE instead, e.g. the output of
``scripts/pretrain_text_tower.py``; the UNet still comes from PATH.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ldm.cli import train
from ldm.ema import EMA
from ldm.io import read_state_dict
from ldm.training.latent_diffusion import LatentDiffusionModule

log = logging.getLogger("warm_start_train")

PREFIXES = ("model.diffusion_model.", "cond_stage_model.")


def warm_start(module: LatentDiffusionModule, path: str, keep_new: bool = False,
               text_tower: str | None = None) -> None:
    """Copy the UNet and text tower of ``path`` into ``module`` (all of their tensors, shapes checked);
    ``keep_new``: tensors ``path`` lacks keep their initialisation; ``text_tower``: a file whose
    ``cond_stage_model.*`` tensors replace those of ``path``."""
    source, _ = read_state_dict(path)
    if text_tower is not None:
        tower = {k: v for k, v in read_state_dict(text_tower)[0].items() if k.startswith("cond_stage_model.")}
        if not tower:
            raise ValueError(f"--text-tower {text_tower} holds no cond_stage_model.* tensors; give the file "
                             "scripts/pretrain_text_tower.py wrote (or a model file with a text tower)")
        source = {k: v for k, v in source.items() if not k.startswith("cond_stage_model.")}
        source.update(tower)
        log.info("warm start: the text tower's %d tensors from %s", len(tower), text_tower)
    own = {k: v for k, v in module.state_dict().items() if k.startswith(PREFIXES)}
    missing = sorted(k for k in own if k not in source)
    bad = sorted(k for k in own if k in source and tuple(source[k].shape) != tuple(own[k].shape))
    if keep_new and missing:
        log.info("warm start: %d tensors not in %s keep their initialisation: %s", len(missing), path,
                 ", ".join(missing))
        missing = []
    if missing or bad:
        raise ValueError(f"--init {path} does not match the config: {len(missing)} tensors missing "
                         f"(e.g. {missing[:1]}), {len(bad)} of another shape (e.g. {bad[:1]}); "
                         "give a file of the same architecture (or --keep-new for added tensors)")
    module.load_state_dict({k: source[k].to(own[k].dtype) for k in own if k in source}, strict=False)
    if module.model_ema is not None:
        module.model_ema = EMA(module.model, decay=float(module.model_ema.decay))
    log.info("warm start: %d tensors of the UNet and text tower from %s", sum(k in source for k in own), path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: warm_start_train.py --init MODEL.safetensors [--keep-new] [--text-tower TOWER.safetensors] "
             "[train.py arguments]")
    if len(argv) < 2 or argv[0] != "--init":
        raise SystemExit(usage)
    path, rest = argv[1], argv[2:]
    keep_new, text_tower = False, None
    while rest and rest[0] in ("--keep-new", "--text-tower"):
        if rest[0] == "--keep-new":
            keep_new, rest = True, rest[1:]
        elif len(rest) < 2 or rest[1].startswith("-"):
            raise SystemExit("--text-tower needs a file; " + usage)
        else:
            text_tower, rest = rest[1], rest[2:]
    original = train.instantiate_from_config

    def instantiate_then_load(node, *args, **kwargs):
        obj = original(node, *args, **kwargs)
        if isinstance(obj, LatentDiffusionModule):
            warm_start(obj, path, keep_new, text_tower)
        return obj

    train.instantiate_from_config = instantiate_then_load  # train.py builds its model with this name
    try:
        return train.main(rest)
    finally:
        train.instantiate_from_config = original


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
