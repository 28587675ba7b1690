"""Load on the HTTP server: N concurrent clients x M txt2img requests each against ``serve.py`` on the demo model.

Starts ``serve.py`` (the embedded demo model unless --ckpt) on a free port in a subprocess, waits until it
answers, then runs the clients in threads, each sending its requests one after the other with its own prompt and
seed. Every response is checked: each image's PNG ``parameters`` must carry its own request's prompt, seed and
steps (none lost, none mixed up). Reports latency p50/p95 (request sent -> response read, queueing included),
throughput (requests and images per second over the whole run) and how many were refused (503) or failed.

    python bench/bench_serve.py --clients 16 --requests 4 --steps 8 --out bench/results/serve.md
"""
from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

logger = logging.getLogger("bench.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    command = [sys.executable, str(common.REPO / "serve.py"), "--port", str(port), "--device", args.device,
               "--max-queue", str(args.max_queue)]
    if args.ckpt:
        command += ["--ckpt", args.ckpt]
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {process.returncode}")
        try:
            if httpx.get(url + "/sdapi/v1/options", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise TimeoutError("serve.py did not answer within 300 s")


def client(url: str, index: int, args, lock: threading.Lock, results: list) -> None:
    import httpx
    from PIL import Image

    from ldm.cli.common import parse_parameters

    with httpx.Client(timeout=3600) as http:
        for r in range(args.requests):
            body = {"prompt": f"client {index} request {r}: two red circles above a blue square",
                    "seed": 100_000 * index + 1000 * r, "steps": args.steps, "sampler_name": args.sampler,
                    "batch_size": args.batch_size}
            start = time.perf_counter()
            response = http.post(url + "/sdapi/v1/txt2img", json=body)
            seconds = time.perf_counter() - start
            row = {"client": index, "status": response.status_code, "seconds": seconds, "images": 0, "ok": False}
            if response.status_code == 200:
                images = response.json()["images"]
                params = [parse_parameters(Image.open(io.BytesIO(base64.b64decode(i))).info["parameters"])
                          for i in images]
                row["images"] = len(images)
                row["ok"] = len(params) == args.batch_size and all(
                    (p["prompt"], p["seed"], p["steps"]) == (body["prompt"], body["seed"] + k, args.steps)
                    for k, p in enumerate(params))
            with lock:
                results.append(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default="DPM++ 2M Karras")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ckpt", default=None, help="default: the embedded demo model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--out", default=None, help="write a markdown report here")
    args = p.parse_args()
    common.setup(None)

    info = common.machine_info(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(), "fp32", args.device)
    process, url = start_server(args)
    try:
        lock, results = threading.Lock(), []
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for i in range(args.clients):
                pool.submit(client, url, i, args, lock, results)
        wall = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(60)

    done = [r for r in results if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in done)
    expected = args.clients * args.requests
    rows = [[
        args.clients, args.requests, args.steps, f"{len(done)}/{expected}", sum(r["ok"] for r in done),
        sum(r["status"] == 503 for r in results), sum(r["status"] not in (200, 503) for r in results),
        statistics.median(latencies) if latencies else float("nan"),
        latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan"),
        len(done) / wall, sum(r["images"] for r in done) / wall, wall,
    ]]
    table = common.markdown_table(["clients", "requests each", "steps", "completed", "parameters match",
                                   "503", "errors", "p50 latency s", "p95 latency s", "requests/s", "images/s",
                                   "wall s"], rows)
    print(table)
    notes = [f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
             f"demo model {args.ckpt or 'shapes (embedded)'}, {args.sampler}, 64x64, batch {args.batch_size}; "
             "latency: request sent -> response read, waiting in the queue included (one model worker serves the "
             "requests in order, so p95 is about the whole queue's time)",
             "parameters match: every image's PNG parameters name its own request's prompt, seed and steps"]
    if args.out:
        common.write_report(args.out, "HTTP server under load (serve.py, demo model)", info, table, notes)
    if len(done) != expected or sum(r["ok"] for r in done) != expected:
        sys.exit("some requests were lost, refused or mixed up")


if __name__ == "__main__":
    main()
