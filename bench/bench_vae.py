"""VAE decode at several image sizes, with and without tiling: seconds and peak memory (fp32).

Every measurement runs in a fresh Python process, so its peak resident memory (VmHWM) is its own.
``--ch`` sets the decoder width (128 = the SD VAE; smaller widths scale the time down for a quick run):

    python bench/bench_vae.py --sizes 512 1024 2048 --ch 128 --max-untiled 1024
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import torch

import common

logger = logging.getLogger("bench.vae")


def sd_ddconfig(ch: int) -> dict:
    return dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=ch, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def measure(size: int, tiled: bool, ch: int, tile: int, device: torch.device = torch.device("cpu")) -> dict:
    """Decode one random latent of a ``size`` x ``size`` image in this process; seconds and peak memory (GiB:
    the process's peak RSS, or on CUDA the peak GPU memory allocated). On CUDA after one warm-up decode."""
    from ldm.models.autoencoder import AutoencoderKL

    vae = common.randomize_(AutoencoderKL(sd_ddconfig(ch), embed_dim=4)).eval().to(device)
    if tiled:
        vae.enable_tiling(tile_size=tile)
    z = torch.randn(1, 4, size // vae.downsample_factor, size // vae.downsample_factor).to(device)
    sync = common.synchronizer(device)
    if device.type == "cuda":
        with torch.no_grad():
            vae.decode(z)
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    before = common.peak_memory_gb(device)
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z)
    sync()
    seconds = time.perf_counter() - start
    assert image.shape[-1] == size and torch.isfinite(image).all()
    return {"seconds": seconds, "peak_rss_gb": common.peak_memory_gb(device), "rss_before_gb": before}


def run_worker(size: int, tiled: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(size), "--ch", str(args.ch), "--tile", str(args.tile),
           "--device", str(args.device)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if tiled:
        cmd.append("--tiled")
    logger.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["exit code %d" % result.returncode])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--ch", type=int, default=128, help="decoder base width (128 = SD's VAE)")
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels when tiled")
    parser.add_argument("--max-untiled", type=int, default=1024, help="skip untiled decodes above this size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", type=common.device_arg, default=torch.device("cpu"),
                        help="cpu or cuda[:N] (then the peak is GPU memory allocated, the weights included)")
    parser.add_argument("--out", default=str(common.RESULTS / "vae.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(s % 8 for s in args.sizes):
        raise SystemExit(f"--sizes must be multiples of 8 (the VAE's downsampling), got {args.sizes}")
    threads = common.setup(args.threads)
    if args.worker:
        print(json.dumps(measure(args.sizes[0], args.tiled, args.ch, args.tile, args.device)))
        return
    rows = []
    for size in args.sizes:
        for tiled in (False, True):
            if not tiled and size > args.max_untiled:
                rows.append([f"{size}x{size}", "no", "skipped (--max-untiled)", "", ""])
                continue
            r = run_worker(size, tiled, args)
            if "error" in r:
                rows.append([f"{size}x{size}", "yes" if tiled else "no", f"failed: {r['error']}", "", ""])
            else:
                rows.append([f"{size}x{size}", "yes" if tiled else "no", r["seconds"], r["peak_rss_gb"],
                             "yes" if r["peak_rss_gb"] < 4 else "no"])
            logger.info("%s", rows[-1])
    mem = "peak GPU memory GiB (allocated)" if args.device.type == "cuda" else "peak RSS GiB (whole process)"
    headers = ["image", "tiled", "decode s", mem, "< 4 GiB"]
    notes = [f"decoder width ch={args.ch} (SD's VAE: 128), ch_mult 1,2,4,4, fp32, random weights, batch 1",
             f"tiles of {args.tile} px with 25% overlap, blended; one fresh process per row (peak RSS includes "
             "Python, torch and the weights)"]
    common.write_report(args.out, "VAE decode with and without tiling",
                        common.machine_info(threads, "fp32", args.device),
                        common.markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
