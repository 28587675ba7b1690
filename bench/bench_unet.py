"""UNet forward and one training step (forward + backward + AdamW): ours vs diffusers' UNet2DConditionModel
holding the same weights; plus utilization (the forward's counted FLOPs / time / measured matmul peak).

Sizes are ``w<model_channels>@<latent>`` (the SD v1 architecture at reduced width) or ``full@<latent>``
(SD v1.5 size, model_channels 320). Example (a few minutes on 2 cores):

    python bench/bench_unet.py --sizes w128@32 full@32 --precisions fp32 bf16 --modes forward train --reps 3

On a GPU (``--device cuda``, precisions fp32, bf16 and fp16 autocast) each timed round runs ``--inner`` calls.
``--peer plain`` times our UNet against itself without ``ldm.accel.optimize`` (the plain model) instead of
against diffusers': what the acceleration pass gives.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

import common
from common import autocast, median

logger = logging.getLogger("bench.unet")

CONTEXT_TOKENS = 77


def parse_size(text: str) -> tuple[int, int]:
    """"w128@32" -> (128, 32); "full@64" -> (320, 64)."""
    match = re.fullmatch(r"(?:w(\d+)|full)@(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not w<model_channels>@<latent> or full@<latent>: "
                                         "e.g. w128@32 or full@64")
    width = int(match.group(1) or 320)
    if width % 32:
        raise argparse.ArgumentTypeError(f"model_channels {width} in {text!r} must be a multiple of 32")
    return width, int(match.group(2))


def build_pair(width: int, device: str | torch.device = "cpu", peer: str = "diffusers"
               ) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Our UNet with random weights, accelerated for ``device`` (``ldm.accel.optimize``, as the pipeline and the
    trainer run it), and the peer with the same weights: diffusers' UNet converted from its state dict, or
    (``peer="plain"``) our plain UNet; both on ``device``."""
    import ldm.accel
    from ldm.models.unet import UNetModel

    params = dict(common.SD_V1_UNET, model_channels=width)
    ours = common.randomize_(UNetModel(**params)).eval()
    if peer == "plain":
        theirs = copy.deepcopy(ours)
    else:
        from diffusers_port import diffusers_unet

        theirs = diffusers_unet(params, ours.state_dict()).eval()
    ldm.accel.optimize(ours, device)
    return ours.to(device), theirs.to(device), params


def inputs(batch: int, latent: int, seed: int = 0, device: str | torch.device = "cpu"
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, CONTEXT_TOKENS, common.SD_V1_UNET["context_dim"], generator=gen)
    return x.to(device), t.to(device), context.to(device)


def call(model: torch.nn.Module, x, t, context) -> torch.Tensor:
    out = model(x, t, context)
    return out.sample if hasattr(out, "sample") else out


def forward_fn(model, x, t, context, precision: str, inner: int = 1,
               setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast(precision, x.device), setting():
            for _ in range(inner):
                call(model, x, t, context)
    return run


def train_fn(model, x, t, context, precision: str, optimizer: str = "torch", inner: int = 1,
             setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Callable[[], None]:
    """One optimisation step on an MSE loss to a fixed target; the model keeps training between calls.
    ``optimizer``: "ours" (our trainer's AdamW, ``ldm.training.common.AdamW``, fused as ``fused_optimizer``
    makes it), "torch-fused" (torch's fused AdamW) or "torch" (torch's default AdamW, what diffusers' training
    scripts build)."""
    from ldm.training.common import AdamW

    model.train()
    cls = AdamW if optimizer == "ours" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=1e-6, **({} if optimizer == "torch" else {"fused": True}))
    target = torch.randn_like(x)

    def run() -> None:
        for _ in range(inner):
            opt.zero_grad(set_to_none=True)
            with setting():
                with autocast(precision, x.device):
                    loss = F.mse_loss(call(model, x, t, context).float(), target)
                loss.backward()
            opt.step()
    return run


def _count_onednn_linear() -> None:
    """Teach FlopCounterMode oneDNN's linear op, which our fp32 ``Linear`` layers call (``ldm.accel.onednn``):
    unknown ops count as 0 FLOPs. Registered once per process."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def count_flops(model, x, t, context) -> float:
    """FLOPs of one forward, counted once by torch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_onednn_linear()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call(model, x, t, context)
    return float(counter.get_total_flops())


def max_difference(ours, theirs, x, t, context) -> float:
    with torch.no_grad():
        return (call(ours, x, t, context) - call(theirs, x, t, context)).abs().max().item()


def memory_budget_gb(device: torch.device) -> float:
    """Free memory where the models live: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    return common.mem_available_gb()


def fits_training(width: int, budget_gb: float) -> bool:
    """Two models training side by side need about 2 x 16 bytes per parameter (weights, grads, AdamW)."""
    params = 860e6 * (width / 320) ** 2
    return 2 * 16 * params / 2**30 < 0.8 * budget_gb


def bench_size(width: int, latent: int, args) -> list[list]:
    ours, theirs, _ = build_pair(width, args.device, args.peer)
    peer = args.peer
    x, t, context = inputs(args.batch, latent, device=args.device)
    sync, inner = common.synchronizer(args.device), args.inner
    diff = max_difference(ours, theirs, x, t, context)
    flops = count_flops(ours, x, t, context)
    logger.info("w%d@%d: %.1f GFLOP per forward, max |ours - %s| fp32 = %.2e", width, latent, flops / 1e9, peer,
                diff)
    rows = []
    label = f"{'SD1.5' if width == 320 else f'SD1 w{width}'} {latent}x{latent} b{args.batch}"
    for mode in args.modes:
        if mode == "train" and not fits_training(width, memory_budget_gb(args.device)):
            logger.warning("skipping the training step at w%d: two models with AdamW do not fit in memory", width)
            continue
        for precision in args.precisions:
            if mode == "forward":
                pair = {"ours": forward_fn(ours, x, t, context, precision, inner),
                        peer: forward_fn(theirs, x, t, context, precision, inner)}
                if "fused-attention" in args.without:
                    pair["ours without fused-attention"] = forward_fn(
                        ours, x, t, context, precision, inner, common.without_fused_attention)
            else:
                pair = {"ours": train_fn(copy.deepcopy(ours), x, t, context, precision, "ours", inner),
                        peer: train_fn(copy.deepcopy(theirs), x, t, context, precision,
                                       "ours" if peer == "plain" else
                                       "torch-fused" if args.diffusers_fused_adam else "torch", inner)}
                if "fused-attention" in args.without:
                    pair["ours without fused-attention"] = train_fn(copy.deepcopy(ours), x, t, context, precision,
                                                                    "ours", inner, common.without_fused_attention)
            rates: list[float] = []
            if mode == "forward":  # the matmul peak, measured between the rounds, under the same machine load
                pair["matmul peak"] = lambda: rates.append(
                    common.matmul_peak_gflops(precision, reps=3, device=args.device))
            # One autocast around all rounds: autocast keeps its bf16 copies of diffusers' weights (leaves that
            # require grad) until the outermost autocast exits, as around a whole diffusers pipeline call; our
            # UNet keeps its own copy (cache_cast_weights). Both then cast their weights once, not per forward.
            with common.autocast(precision, args.device) if mode == "forward" else contextlib.nullcontext():
                times = common.interleaved(pair, args.reps, warmup=1, sync=sync)
            a, b = median(times["ours"]) / inner, median(times[peer]) / inner
            if mode == "train":  # free both training copies (weights, grads, AdamW state) before the next row
                pair.clear()
            row = [label, mode, precision, a, b, f"{b / a:.2f}x", f"{diff:.1e}"]
            if mode == "forward":
                peak = median(rates)
                row += [f"{flops / 1e9:.0f}", f"{peak:.0f}", f"{100 * flops / a / 1e9 / peak:.0f}%",
                        f"{100 * flops / b / 1e9 / peak:.0f}%"]
            else:
                row += ["", "", "", ""]
            rows.append(row)
            logger.info("%s", row)
            if "ours without fused-attention" in times:
                c = median(times.pop("ours without fused-attention")) / inner
                rows.append([label, mode, f"{precision}, ours without fused-attention", c, b, f"{b / c:.2f}x",
                             f"{diff:.1e}"] + ([f"{flops / 1e9:.0f}", f"{peak:.0f}",
                                                f"{100 * flops / c / 1e9 / peak:.0f}%", ""] if mode == "forward"
                                               else ["", "", "", ""]))
                logger.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size("w128@32")],
                        help="w<model_channels>@<latent> or full@<latent> (default: w128@32)")
    parser.add_argument("--precisions", nargs="+", choices=common.PRECISIONS, default=["fp32", "bf16"],
                        help="fp32, bf16 (autocast) and, on a GPU, fp16 (autocast); default: fp32 bf16")
    parser.add_argument("--device", type=common.device_arg, default=torch.device("cpu"),
                        help="cpu (default) or cuda[:N]")
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per timed round (default: 1 on a CPU, 10 on a GPU)")
    parser.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--peer", choices=("diffusers", "plain"), default="diffusers",
                        help="what ours (accelerated by ldm.accel.optimize) is timed against: diffusers' UNet "
                             "(default) or our plain UNet without ldm.accel")
    parser.add_argument("--diffusers-fused-adam", action="store_true",
                        help="give diffusers' training step torch's fused AdamW too (default: torch's default "
                             "AdamW, as diffusers' training scripts build it; ours always uses our trainer's fused "
                             "AdamW)")
    parser.add_argument("--without", nargs="*", choices=("fused-attention",), default=[],
                        help="fused-attention: add ours with the attention on its Python paths (and torch's "
                             "kernels in training) instead of the compiled fused kernel (ldm.accel.cpu_kernels)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per candidate (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.RESULTS / "unet.md"))
    args = parser.parse_args()
    threads = common.setup(args.threads)
    common.check_precisions(args.precisions, args.device)
    args.inner = common.inner_calls(args.inner, args.device, cuda_default=10)
    rows = [row for width, latent in args.sizes for row in bench_size(width, latent, args)]
    headers = ["UNet", "step", "precision", "ours s", f"{args.peer} s", "speed-up", "max abs diff fp32",
               "GFLOP", "matmul peak GFLOP/s", "ours util", f"{args.peer} util"]
    notes = [f"matmul peak: dense {'8192' if args.device.type == 'cuda' else '2048'}^3 matmul in the row's "
             "precision (best of 3), measured once per round between the UNet runs; the table gives the median "
             "over the rounds",
             f"device: {args.device}; {args.inner} call(s) per timed round, times per call",
             f"times are medians of interleaved rounds (ours, {args.peer}, ours, ...) after one warm-up round; "
             f"speed-up = {args.peer} / ours; ours = our UNet after ldm.accel.optimize"
             + (", plain = the same UNet without it" if args.peer == "plain" else ""),
             "util = counted forward FLOPs (torch.utils.flop_counter) / median time / matmul peak",
             "train = forward + MSE loss + backward + AdamW step; both models train their own copy; ours with "
             f"our trainer's AdamW (torch's fused kernel, channels-last weights passed as NHWC views), {args.peer} with "
             + ("the same" if args.peer == "plain" else "the fused AdamW too" if args.diffusers_fused_adam else
                "torch's default AdamW (as diffusers' training scripts)"),
             "forward: one autocast around all rounds, so each model casts its weights to bf16 once (autocast's "
             "weight cache for diffusers, our UNet's cast-weight cache for ours)"]
    common.write_report(args.out, "UNet forward and training step: ours vs diffusers",
                        common.machine_info(threads, "/".join(args.precisions), args.device),
                        common.markdown_table(headers, rows),
                        notes)


if __name__ == "__main__":
    main()
