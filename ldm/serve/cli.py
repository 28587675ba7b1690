"""``python serve.py``: the A1111-compatible HTTP API and the page, on uvicorn.

    python serve.py                                          # the embedded demo model, http://127.0.0.1:7860
    python serve.py --ckpt sd-v1-5.safetensors --models-dir models/ --api-auth me:secret
    python serve.py --host 0.0.0.0 --port 8080 --api-auth me:secret --max-queue 32

Bad flags are one line on stderr (exit status 2), before the model is loaded.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Sequence

from ldm.cli.sample import DEFAULT_CKPT

log = logging.getLogger("serve")
PROG = "serve.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a latent diffusion model over HTTP: a subset of the "
                                "AUTOMATIC1111 web UI's API (/sdapi/v1/...) and a page at /.")
    g = p.add_argument_group("models")
    g.add_argument("--ckpt", default=None, help=f"the checkpoint loaded at start (default: the embedded demo model "
                                                f"{DEFAULT_CKPT.name})")
    g.add_argument("--models-dir", default=None, help="folder of more checkpoints (.safetensors, .ckpt) to switch "
                                                       "between (sd_model_checkpoint)")
    g.add_argument("--lora-dir", default=None, help="folder of LoRA files, listed at /sdapi/v1/loras")
    g.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings, listed at "
                                                           "/sdapi/v1/embeddings")
    g.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "autocast", "full"),
                   help="auto: fp16 on CUDA, fp32 on CPU")

    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                                                        "only; 0.0.0.0 for every interface, with --api-auth)")
    g.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    g.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic auth for every route, the page included (as A1111's --api-auth)")
    g.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default %(default)s MiB)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest uploaded image, in pixels (default %(default)s)")

    g = p.add_argument_group("queue and limits")
    g.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting behind the running one before 503 (default %(default)s)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one request may run before it is stopped (default %(default)s; 0: no limit)")
    g.add_argument("--max-steps", type=int, default=150, help="most sampling steps per request (default %(default)s)")
    g.add_argument("--max-size", type=int, default=2048, help="largest width/height in pixels (default %(default)s)")
    g.add_argument("--max-batch", type=int, default=16,
                   help="most images per request, batch_size x n_iter (default %(default)s)")
    g.add_argument("--preview-every", type=int, default=5,
                   help="live preview every N steps while a client watches the progress (default %(default)s; 0: off)")
    return p


def config_from_args(args: argparse.Namespace):
    """A :class:`ldm.serve.api.ServerConfig`, every flag checked; ValueError (one line) otherwise."""
    from ldm.cli.sample import resolve_checkpoint
    from ldm.pipeline import resolve_device, resolve_precision
    from ldm.serve.api import ServerConfig, parse_auth

    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise ValueError(f"checkpoint not found: {args.ckpt} (check --ckpt)")
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir),
                         ("--embeddings-dir", args.embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"folder not found: {folder} (check {flag})")
    for flag, value, low in (("--port", args.port, 0), ("--max-queue", args.max_queue, 0),
                             ("--max-steps", args.max_steps, 1), ("--max-size", args.max_size, 8),
                             ("--max-batch", args.max_batch, 1), ("--max-image-pixels", args.max_image_pixels, 64),
                             ("--preview-every", args.preview_every, 0)):
        if value < low:
            raise ValueError(f"{flag} is {value}: use at least {low}")
    if args.port > 65535:
        raise ValueError(f"--port is {args.port}: use 0 to 65535")
    if args.max_body_mb <= 0 or args.timeout < 0:
        raise ValueError("--max-body-mb must be positive and --timeout at least 0")
    parse_auth(args.api_auth)
    resolve_precision(args.precision, resolve_device(args.device))
    return ServerConfig(ckpt=resolve_checkpoint(args.ckpt), models_dir=args.models_dir, lora_dir=args.lora_dir,
                        embeddings_dir=args.embeddings_dir, device=args.device, precision=args.precision,
                        api_auth=args.api_auth, max_queue=args.max_queue, max_steps=args.max_steps,
                        max_size=args.max_size, max_batch=args.max_batch, max_body_mb=args.max_body_mb,
                        max_image_pixels=args.max_image_pixels, timeout=args.timeout or None,
                        preview_every=args.preview_every)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of serve.py, ``ldm-serve`` and ``python -m ldm.serve``; returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        config = config_from_args(args)
        import uvicorn

        from ldm.serve.api import create_app
    except ImportError as e:
        sys.stderr.write(f"{prog}: error: {e.name} is not installed: pip install -e \".[serve]\"\n")
        return 2
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: {str(e).strip().splitlines()[0]}\n")
        return 2
    if not _is_loopback(args.host) and not args.api_auth:
        log.warning("listening on %s without --api-auth: anyone who reaches this port can use the server", args.host)
    log.info("serving %s on http://%s:%d (API: /sdapi/v1/...)", config.ckpt, args.host, args.port)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return 0
