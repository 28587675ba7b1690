"""Average model files tensor by tensor (a "model soup", Wortsman et al. 2022):

    python scripts/average_models.py --out SOUP.safetensors A.safetensors B.safetensors [...]

Every floating-point tensor of the output is the mean of the inputs' (computed in fp32, stored in the first
file's dtype); other tensors, and the noise schedule's buffers, must be equal in all inputs. The inputs must
hold the same tensor names and shapes (runs warm-started from one model); the metadata (the stored config) is
the first file's. Written atomically.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from ldm.diffusion.schedules import make_betas, register_schedule_buffers
from ldm.io import read_state_dict, save_checkpoint

# the noise schedule's buffers (alphas_cumprod, betas, ...): fixed by the config, not learned, so never averaged
SCHEDULE_BUFFERS = frozenset(register_schedule_buffers(make_betas(n=2)))


def average(paths: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mean state dict of ``paths`` and the first file's metadata."""
    if len(paths) < 2:
        raise ValueError(f"give at least two model files to average, got {len(paths)}")
    first, meta = read_state_dict(paths[0])
    sums = {k: v.float().clone() if v.is_floating_point() else v for k, v in first.items()}
    for path in paths[1:]:
        sd, _ = read_state_dict(path)
        if sd.keys() != first.keys():
            diff = sorted(set(sd) ^ set(first))
            raise ValueError(f"{path} and {paths[0]} hold different tensors ({len(diff)}, e.g. {diff[0]}): "
                             "average only runs of one architecture")
        for k, v in sd.items():
            if v.shape != first[k].shape:
                raise ValueError(f"{k} is {tuple(v.shape)} in {path} but {tuple(first[k].shape)} in {paths[0]}: "
                                 "average only runs of one architecture")
            if k in SCHEDULE_BUFFERS and not torch.equal(v.float(), first[k].float()):
                raise ValueError(f"{k} differs between {path} and {paths[0]}: their noise schedules differ "
                                 "(e.g. zero terminal SNR in one); average only runs of one schedule")
            if v.is_floating_point():
                sums[k] += v.float()
            elif not torch.equal(v, first[k]):
                raise ValueError(f"{k} (not floating point) differs between {path} and {paths[0]}")
    n = len(paths)
    return {k: (v / n).to(first[k].dtype) if first[k].is_floating_point() else v for k, v in sums.items()}, meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the average (.safetensors)")
    p.add_argument("models", nargs="+", help="the model files to average (two or more)")
    args = p.parse_args(argv)
    try:
        sd, meta = average(args.models)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    save_checkpoint(sd, args.out, metadata=meta)
    print(f"wrote {args.out}: the mean of {len(args.models)} models, {len(sd)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
