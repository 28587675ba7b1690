"""Fine-tune the decoder of a trained autoencoder with its encoder frozen (as SD's "ft-MSE" VAE decoders),
or, with ``--train-encoder``, the whole autoencoder.

    python scripts/finetune_decoder.py --ckpt AE.safetensors --out AE_ft.safetensors [--steps 1500]
    python scripts/finetune_decoder.py --ckpt AE.safetensors --out AE_ft.safetensors --train-encoder \
        --object-weight 10

``--object-weight`` multiplies the loss of the pixels that differ from the gray background: the pictures are
mostly background, so an unweighted loss lets the encoder merge close hues (red, orange and yellow came out as
one orange while the mean PSNR looked fine). ``--train-encoder`` moves the latent space: the diffusion stage
must then be trained on the new autoencoder.

The encoder and ``quant_conv`` do not change, so neither does the latent space: a latent diffusion model trained
on the original latents decodes with the new decoder as is, and one trained with either file is the same model.
The loss is the per-pixel weighted squared plus absolute error of the decoded posterior samples of synthetic
shapes pictures (plus the KL term, weight 1e-6, when the encoder trains), with Adam and a cosine learning-rate decay. Held-out PSNR (the ``eval`` split, as
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

from ldm.checkpoint import save_checkpoint
from ldm.config import load_config, to_plain
from ldm.data.shapes import BACKGROUND, ShapesDataset
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


def pixel_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: ``object_weight`` where a pixel differs from the background, else 1."""
    bg = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1.0
    foreground = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.02).to(x.dtype)
    return 1.0 + (object_weight - 1.0) * foreground


def reconstruction_loss(ae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, object_weight: float,
                        train_encoder: bool) -> torch.Tensor:
    """Weighted (MSE + L1) of the decoded posterior sample, plus 1e-6 x KL when the encoder trains."""
    with torch.set_grad_enabled(train_encoder):
        posterior = ae.encode(x)
        z = posterior.sample(g)
    err = ae.decode(z) - x
    w = pixel_weights(x, object_weight)
    loss = (w * (err.square() + err.abs())).mean()
    if train_encoder:
        loss = loss + 1e-6 * posterior.kl().mean()
    return loss


def finetune(ae: AutoencoderKL, steps: int, batch_size: int, lr: float, num_train: int, seed: int,
             val: torch.Tensor, log_every: int = 250, object_weight: float = 1.0,
             train_encoder: bool = False) -> None:
    if train_encoder:
        ae.requires_grad_(True)
        params = list(ae.parameters())
    else:
        params = decoder_parameters(ae)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    data = ShapesDataset(num_train, size=val.shape[-1], seed=seed)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=g).tolist()
        x = torch.stack([data[i]["image"] for i in idx])
        loss = reconstruction_loss(ae, x, g, object_weight, train_encoder)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.info("step %d/%d  loss %.5f  held-out PSNR %.2f dB  (%.0f s)", step, steps, loss.item(),
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
    p.add_argument("--train-encoder", action="store_true",
                   help="train the encoder too (the latent space moves: retrain the diffusion stage)")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="loss weight of the non-background pixels (default %(default)s)")
    p.add_argument("--log-every", type=int, default=250, help="default %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> float:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.object_weight < 1.0:
        raise SystemExit(f"--object-weight is {args.object_weight}: use 1 (no weighting) or more")
    for name in ("steps", "batch_size", "num_train", "num_val", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} is {getattr(args, name)}: use at least 1")
    torch.manual_seed(args.seed)
    ae, size = load_autoencoder(args.ckpt, args.config)
    val = held_out_images(args.num_val, size, args.seed)
    log.info("held-out PSNR before: %.2f dB", mean_psnr(ae, val))
    finetune(ae, args.steps, args.batch_size, args.lr, args.num_train, args.seed, val, args.log_every,
             args.object_weight, args.train_encoder)
    after = mean_psnr(ae, val)
    save_checkpoint({k: v.detach().clone() for k, v in ae.state_dict().items()}, args.out)
    log.info("held-out PSNR after: %.2f dB; wrote %s", after, args.out)
    return after


if __name__ == "__main__":
    main()
