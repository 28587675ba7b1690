"""Fine-tune the decoder of a trained autoencoder with its encoder frozen (as SD's "ft-MSE" VAE decoders).

    python scripts/finetune_decoder.py --ckpt AE.safetensors --out AE_ft.safetensors [--steps 1500]

The encoder and ``quant_conv`` do not change, so neither does the latent space: a latent diffusion model trained
on the original latents decodes with the new decoder as is, and one trained with either file is the same model.
The loss is the mean squared error (what PSNR measures) of the decoded posterior samples of synthetic shapes
pictures, with Adam and a cosine learning-rate decay. Held-out PSNR (the ``eval`` split, as
``python -m ldm.eval recon``) is logged before, every ``--log-every`` steps and after. Reproducible: the
pictures, posterior samples and initial state depend only on ``--seed``.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Sequence

import torch

from ldm.checkpoint import read_state_dict, save_checkpoint
from ldm.config import load_config, to_plain
from ldm.data.shapes import ShapesDataset
from ldm.eval.metrics import psnr
from ldm.models.autoencoder import AutoencoderKL

log = logging.getLogger("finetune_decoder")

DEFAULT_CONFIG = "configs/demo/shapes_autoencoder.yaml"


def load_autoencoder(ckpt: str, config: str) -> tuple[AutoencoderKL, int]:
    """The autoencoder of ``config`` (a training config: model.params.ddconfig / embed_dim) with ``ckpt``'s
    weights, and its image side."""
    params = to_plain(load_config(config).model.params)
    ae = AutoencoderKL(params["ddconfig"], params["embed_dim"])
    ae.init_from_ckpt(ckpt)
    return ae.float(), int(params["ddconfig"]["resolution"])


def held_out_images(num: int, size: int, seed: int) -> torch.Tensor:
    data = ShapesDataset(num, size=size, seed=seed, split="eval")
    return torch.stack([data[i]["image"] for i in range(num)])


@torch.no_grad()
def mean_psnr(ae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR of ``decode(encode(x).mode())``, as ``python -m ldm.eval recon`` measures it."""
    return psnr(ae.decode(ae.encode(images).mode()).clamp(-1, 1), images).mean().item()


def decoder_parameters(ae: AutoencoderKL) -> list[torch.nn.Parameter]:
    """Freeze everything but the decoder and ``post_quant_conv``; return those."""
    ae.requires_grad_(False)
    params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(ae: AutoencoderKL, steps: int, batch_size: int, lr: float, num_train: int, seed: int,
             val: torch.Tensor, log_every: int = 250) -> None:
    opt = torch.optim.Adam(decoder_parameters(ae), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    data = ShapesDataset(num_train, size=val.shape[-1], seed=seed)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=g).tolist()
        x = torch.stack([data[i]["image"] for i in idx])
        with torch.no_grad():
            z = ae.encode(x).sample(g)
        loss = torch.nn.functional.mse_loss(ae.decode(z), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.info("step %d/%d  mse %.5f  held-out PSNR %.2f dB  (%.0f s)", step, steps, loss.item(),
                     mean_psnr(ae, val), time.time() - start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the trained autoencoder (its export, safetensors)")
    p.add_argument("--out", required=True, help="where to write the fine-tuned autoencoder (.safetensors)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="its training config (default %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="default %(default)s")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--num-train", type=int, default=20000, help="training pictures (default %(default)s)")
    p.add_argument("--num-val", type=int, default=64, help="held-out pictures for PSNR (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> float:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("steps", "batch_size", "num_train", "num_val"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} is {getattr(args, name)}: use at least 1")
    torch.manual_seed(args.seed)
    ae, size = load_autoencoder(args.ckpt, args.config)
    val = held_out_images(args.num_val, size, args.seed)
    log.info("held-out PSNR before: %.2f dB", mean_psnr(ae, val))
    finetune(ae, args.steps, args.batch_size, args.lr, args.num_train, args.seed, val)
    after = mean_psnr(ae, val)
    save_checkpoint({k: v.detach().clone() for k, v in ae.state_dict().items()}, args.out)
    log.info("held-out PSNR after: %.2f dB; wrote %s", after, args.out)
    return after


if __name__ == "__main__":
    main()
