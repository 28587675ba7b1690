"""Text-to-image end to end (encode the prompt, 20 steps DPM++ 2M with CFG 7.5, decode): ours
(``ldm.pipeline.Text2Image``) vs diffusers' StableDiffusionPipeline assembled offline from the same weights.

The parent process builds an SD v1 model with random weights, saves it once as our safetensors file and once
as a diffusers folder (converted with diffusers' single-file functions), then runs every measurement in a
fresh process, ours and diffusers in turn: seconds per image (after a 1-step warm-up) and peak RSS.

    python bench/bench_txt2img.py --sizes 256 512 --precisions bf16 --reps 1

With ``--device cuda`` the peak is the GPU memory allocated (torch.cuda.max_memory_allocated), and diffusers'
pipeline holds its weights in the precision (``torch_dtype``, how it is used on GPUs) instead of autocast.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

logger = logging.getLogger("bench.txt2img")

PROMPT = "a red circle to the left of a blue square"
STEPS, GUIDANCE = 20, 7.5
CANDIDATES = ("ours", "diffusers")


def sd_config(unet_width: int, vae_ch: int):
    from ldm.config import load_config

    return load_config(common.REPO / "configs" / "sd" / "v1-inference.yaml",
                       overrides=[f"model.params.unet_config.params.model_channels={unet_width}",
                                  f"model.params.first_stage_config.params.ddconfig.ch={vae_ch}"])


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from the BPE vocabulary that ships with open_clip (offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    names = {bpe.sot_token_id: "<|startoftext|>", bpe.eot_token_id: "<|endoftext|>"}  # open_clip renames them
    vocab = {names.get(i, token): i for token, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def clip_text_model(text_state_dict: dict):
    """transformers' CLIPTextModel (ViT-L/14 text tower) holding our SD1 text encoder's weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert import to_hf_clip_text_state_dict

    sd1 = {"cond_stage_model.transformer." + k: v for k, v in to_hf_clip_text_state_dict(text_state_dict).items()}
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    model = CLIPTextModel(config)
    converted = convert_ldm_clip_checkpoint(sd1)
    expected = model.state_dict().keys()
    if "text_model.final_layer_norm.weight" not in expected:  # transformers >= 5 drops the text_model wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in expected or not k.endswith("position_ids")}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def prepare(folder: Path, unet_width: int, vae_ch: int) -> None:
    """Write ours.safetensors and the diffusers/ pipeline folder, both holding the same random weights."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from diffusers_port import diffusers_unet, diffusers_vae
    from ldm.config import to_plain
    from ldm.convert import build_model
    from ldm.io import save_checkpoint

    config = sd_config(unet_width, vae_ch)
    model = common.randomize_(build_model(config)).eval()
    save_checkpoint(model.state_dict(), folder / "ours.safetensors", config=to_plain(config))
    params = to_plain(config)["model"]["params"]
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", algorithm_type="dpmsolver++",
                                            solver_order=2, use_karras_sigmas=False)
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(params["first_stage_config"]["params"]["ddconfig"],
                          model.first_stage_model.state_dict()),
        text_encoder=clip_text_model(model.cond_stage_model.state_dict()),
        tokenizer=clip_tokenizer(folder / "tokenizer-src"),
        unet=diffusers_unet(params["unet_config"]["params"], model.model.diffusion_model.state_dict()),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "diffusers")


def _timed(run, device: torch.device) -> float:
    """Seconds of ``run(STEPS)`` after a 1-step warm-up, the device's queued work included."""
    sync = common.synchronizer(device)
    run(1)
    sync()
    start = time.perf_counter()
    run(STEPS)
    sync()
    return time.perf_counter() - start


def generate_ours(folder: Path, size: int, precision: str, vae_precision: str, device: torch.device
                  ) -> tuple[float, float]:
    from ldm.pipeline import Text2Image

    pipe = Text2Image.from_checkpoint(folder / "ours.safetensors", device=device, precision=precision,
                                      vae_precision=vae_precision)
    loaded = common.peak_memory_gb(device)
    run = lambda steps: pipe(PROMPT, height=size, width=size, steps=steps, sampler="DPM++ 2M",  # noqa: E731
                             guidance_scale=GUIDANCE, seeds=0)
    return _timed(run, device), loaded


def generate_diffusers(folder: Path, size: int, precision: str, vae_precision: str, device: torch.device
                       ) -> tuple[float, float]:
    from diffusers import StableDiffusionPipeline

    cuda = device.type == "cuda"
    pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", local_files_only=True,
                                                   torch_dtype=common.DTYPES[precision] if cuda else None)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = common.peak_memory_gb(device)

    def run(steps: int) -> None:
        with common.autocast("fp32" if cuda else precision, device):
            pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(0))
    return _timed(run, device), loaded


def worker(args) -> None:
    fn = generate_ours if args.worker == "ours" else generate_diffusers
    seconds, loaded = fn(Path(args.folder), args.sizes[0], args.precisions[0], args.ours_vae_precision,
                         args.device)
    print(json.dumps({"seconds": seconds, "rss_after_load_gb": loaded,
                      "peak_rss_gb": common.peak_memory_gb(args.device)}))


def run_worker(name: str, folder: Path, size: int, precision: str, args, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--folder", str(folder), "--sizes", str(size),
           "--precisions", precision, "--threads", str(threads), "--ours-vae-precision", args.ours_vae_precision,
           "--device", str(args.device)]
    logger.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{name} worker failed at {size}px {precision}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--precisions", nargs="+", choices=common.PRECISIONS, default=["bf16"],
                        help="fp32, bf16 or (on a GPU) fp16")
    parser.add_argument("--device", type=common.device_arg, default=torch.device("cpu"), help="cpu or cuda[:N]")
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds (ours, diffusers) per setting")
    parser.add_argument("--unet-width", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    parser.add_argument("--vae-ch", type=int, default=128, help="VAE base width (128 = SD1.5)")
    parser.add_argument("--ours-vae-precision", choices=("auto", "fp32", "same"), default="auto",
                        help="Text2Image's vae_precision: auto (our default: the autocast with bf16, as diffusers "
                             "here), fp32 or same")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(common.RESULTS / "txt2img.md"))
    parser.add_argument("--worker", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = common.setup(args.threads)
    common.check_precisions(args.precisions, args.device)
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-bench-txt2img-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.unet_width, args.vae_ch)
        for size in args.sizes:
            for precision in args.precisions:
                results = {name: [] for name in CANDIDATES}
                for _ in range(args.reps):
                    for name in CANDIDATES:
                        results[name].append(run_worker(name, folder, size, precision, args, threads))
                ours, theirs = (common.median([r["seconds"] for r in results[n]]) for n in CANDIDATES)
                peak = {n: max(r["peak_rss_gb"] for r in results[n]) for n in CANDIDATES}
                loaded = {n: max(r["rss_after_load_gb"] for r in results[n]) for n in CANDIDATES}
                rows.append([f"{size}x{size}", precision, ours, theirs, f"{theirs / ours:.2f}x",
                             f"{peak['ours']:.2f} ({loaded['ours']:.2f})",
                             f"{peak['diffusers']:.2f} ({loaded['diffusers']:.2f})"])
                logger.info("%s", rows[-1])
    mem = "peak GPU memory" if args.device.type == "cuda" else "peak RSS"
    headers = ["image", "precision", "ours s/image", "diffusers s/image", "speed-up",
               f"ours {mem} GiB (after load)", f"diffusers {mem} GiB (after load)"]
    width = "SD1.5 size" if (args.unet_width, args.vae_ch) == (320, 128) else \
        f"SD1 architecture, UNet width {args.unet_width}, VAE width {args.vae_ch}"
    notes = [f"{width}, random weights, one prompt, {STEPS} steps DPM++ 2M (diffusers: DPMSolverMultistep "
             f"dpmsolver++ order 2), CFG {GUIDANCE}, batch 1; each number from a fresh process after a 1-step warm-up",
             f"ours decodes the VAE with vae_precision={args.ours_vae_precision!r} ('auto', our default, is the "
             "autocast with bf16); ours stores the UNet's conv/linear weights in bf16 (unet_weights='compute', "
             "from_checkpoint's default: the same numbers as autocast's casts) and uses attention 'auto'; "
             "diffusers runs everything, VAE included, under the same autocast",
             "peak RSS: VmHWM of the worker process (loading included)" if args.device.type != "cuda" else
             "on CUDA: peak of torch.cuda.max_memory_allocated in the worker (loading included); diffusers' "
             "pipeline holds all its weights in the precision (torch_dtype) and runs without autocast, ours "
             "keeps the VAE as vae_precision says"]
    common.write_report(args.out, "Text-to-image end to end: ours vs diffusers",
                        common.machine_info(threads, "/".join(args.precisions), args.device),
                        common.markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
