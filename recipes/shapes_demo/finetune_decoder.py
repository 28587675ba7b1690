"""Fine-tune the decoder of a trained autoencoder with its encoder frozen (as SD's "ft-MSE" VAE decoders),
or, with ``--train-encoder``, the whole autoencoder.

    python recipes/shapes_demo/finetune_decoder.py --ckpt AE.safetensors --out AE_ft.safetensors [--steps 1500]
    python recipes/shapes_demo/finetune_decoder.py --ckpt AE.safetensors --out AE_ft.safetensors --train-encoder \
        --object-weight 10
    python recipes/shapes_demo/finetune_decoder.py --ckpt MODEL.safetensors --out MODEL_ft.safetensors \
        --worst-weight 0.6

``--ckpt`` may be a whole latent diffusion model (an export with ``model.diffusion_model.*``): ``--out`` is then
the same model, every other tensor, the dtype and the stored config kept, with the fine-tuned decoder in it.

``--object-weight`` multiplies the loss of the pixels that differ from the gray background: the pictures are
mostly background, so an unweighted loss lets the encoder merge close hues (red, orange and yellow came out as
one orange while the mean PSNR looked fine). ``--worst-weight`` adds the mean error of each picture's worst 1% of
pixels: a small artifact the decoder draws in every picture (the demo autoencoder put a speck near the
bottom-right corner of every reconstruction, from a pattern its encoder writes there) is a negligible part of
the mean error, but all of the worst pixels. ``--train-encoder`` moves the latent space: the diffusion stage
must then be trained on the new autoencoder.

The encoder and ``quant_conv`` do not change, so neither does the latent space: a latent diffusion model trained
on the original latents decodes with the new decoder as is, and one trained with either file is the same model.
The loss is the per-pixel weighted squared plus absolute error of the decoded posterior samples of synthetic
shapes pictures (plus the KL term, weight 1e-6, when the encoder trains), with Adam and a cosine learning-rate
decay. Held-out PSNR (the ``eval`` split, as ``python -m ldm.eval recon``) is logged before, every
``--log-every`` steps and after. Reproducible: the pictures, posterior samples and initial state depend only on
``--seed``.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Sequence

import torch

from ldm.config import CONFIG_DIR, load_config, to_plain
from ldm.data.shapes import BACKGROUND, ShapesDataset
from ldm.io import CheckpointError, read_state_dict, save_checkpoint
from ldm.metrics import psnr
from ldm.models.autoencoder import AutoencoderKL

log = logging.getLogger("finetune_decoder")

DEFAULT_CONFIG = str(CONFIG_DIR / "demo" / "shapes_autoencoder.yaml")  # the product's small first stage


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


def worst_pixels_error(per_pixel: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean over the batch of each picture's mean ``(B, 1, H, W)`` error on its worst ``fraction`` of pixels."""
    flat = per_pixel.flatten(1)
    return flat.topk(max(1, round(flat.shape[1] * fraction)), dim=1).values.mean()


def reconstruction_loss(ae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, object_weight: float,
                        train_encoder: bool, worst_weight: float = 0.0) -> torch.Tensor:
    """Weighted (MSE + L1) of the decoded posterior sample, plus ``worst_weight`` x the error of the worst 1% of
    pixels, plus 1e-6 x KL when the encoder trains."""
    with torch.set_grad_enabled(train_encoder):
        posterior = ae.encode(x)
        z = posterior.sample(g)
    err = ae.decode(z) - x
    per_pixel = (err.square() + err.abs()).sum(dim=1, keepdim=True) / err.shape[1]
    loss = (pixel_weights(x, object_weight) * per_pixel).mean()
    if worst_weight:
        loss = loss + worst_weight * worst_pixels_error(per_pixel)
    if train_encoder:
        loss = loss + 1e-6 * posterior.kl().mean()
    return loss


def finetune(ae: AutoencoderKL, steps: int, batch_size: int, lr: float, num_train: int, seed: int,
             val: torch.Tensor, log_every: int = 250, object_weight: float = 1.0,
             train_encoder: bool = False, worst_weight: float = 0.0) -> None:
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
        loss = reconstruction_loss(ae, x, g, object_weight, train_encoder, worst_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.info("step %d/%d  loss %.5f  held-out PSNR %.2f dB  (%.0f s)", step, steps, loss.item(),
                     mean_psnr(ae, val), time.time() - start)


def is_diffusion_model(path: str) -> bool:
    """Whether ``path`` holds a whole latent diffusion model (UNet included), not an autoencoder alone."""
    sd, _ = read_state_dict(path, lazy=True)
    return any(k.startswith("model.diffusion_model.") for k in sd)


def write_into_model(ae: AutoencoderKL, model_path: str, out: str) -> None:
    """Write ``model_path`` to ``out`` with its ``first_stage_model.*`` tensors taken from ``ae`` (each in the
    file's dtype), every other tensor and the metadata (its config) as they are."""
    sd, meta = read_state_dict(model_path)
    for k, v in ae.state_dict().items():
        key = "first_stage_model." + k
        if key not in sd or sd[key].shape != v.shape:
            raise SystemExit(f"{model_path} has no {key} of shape {tuple(v.shape)}: is --config its autoencoder?")
        sd[key] = v.detach().to(sd[key].dtype)
    save_checkpoint(sd, out, metadata=meta)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="the trained autoencoder (its export, safetensors), or a whole diffusion model")
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
    p.add_argument("--worst-weight", type=float, default=0.0,
                   help="weight of the error of each picture's worst 1%% of pixels (default %(default)s)")
    p.add_argument("--log-every", type=int, default=250, help="default %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> float:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.object_weight < 1.0:
        raise SystemExit(f"--object-weight is {args.object_weight}: use 1 (no weighting) or more")
    if args.worst_weight < 0.0:
        raise SystemExit(f"--worst-weight is {args.worst_weight}: use 0 (off) or more")
    for name in ("steps", "batch_size", "num_train", "num_val", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} is {getattr(args, name)}: use at least 1")
    try:
        whole_model = is_diffusion_model(args.ckpt)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    if whole_model and args.train_encoder:
        raise SystemExit(f"{args.ckpt} is a whole diffusion model: --train-encoder would move the latent space its "
                         "UNet was trained on; fine-tune its decoder only, or pass an autoencoder file")
    torch.manual_seed(args.seed)
    ae, size = load_autoencoder(args.ckpt, args.config)
    val = held_out_images(args.num_val, size, args.seed)
    log.info("held-out PSNR before: %.2f dB", mean_psnr(ae, val))
    finetune(ae, args.steps, args.batch_size, args.lr, args.num_train, args.seed, val, args.log_every,
             args.object_weight, args.train_encoder, args.worst_weight)
    after = mean_psnr(ae, val)
    if whole_model:
        write_into_model(ae, args.ckpt, args.out)
    else:
        save_checkpoint({k: v.detach().clone() for k, v in ae.state_dict().items()}, args.out)
    log.info("held-out PSNR after: %.2f dB; wrote %s", after, args.out)
    return after


if __name__ == "__main__":
    main()
