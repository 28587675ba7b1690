"""Text-to-image end to end (encode the prompt, 20 steps DPM++ 2M with CFG 7.5, decode): ours
(``ldm.pipeline.Text2Image``) vs diffusers' StableDiffusionPipeline assembled offline from the same weights.

The parent process builds an SD v1 model with random weights, saves it once as our safetensors file and once
as a diffusers folder (converted with diffusers' single-file functions), then runs every measurement in a
fresh process, ours and diffusers in turn: seconds per image (after a 1-step warm-up) and peak RSS.

    python bench/bench_txt2img.py --sizes 256 512 --precisions bf16 --reps 1
    python bench/bench_txt2img.py --arch sdxl --sdxl-depth 1-2-2 --sizes 512 --reps 2 --threads 1

``--arch sdxl``: SDXL base (both text encoders, the UNet with transformer depth ``--sdxl-depth`` per level,
1-2-10 being the real one, its VAE) against diffusers' StableDiffusionXLPipeline; both files hold the random
weights in fp16, as the released SDXL files do, and both pipelines load them into fp32 modules.

With ``--device cuda`` the peak is the GPU memory allocated (torch.cuda.max_memory_allocated), and diffusers'
pipeline holds its weights in the precision (``torch_dtype``, how it is used on GPUs) instead of autocast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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


def sdxl_config(depth: str):
    from ldm.config import load_config

    levels = "[" + depth.replace("-", ",") + "]"
    return load_config(common.REPO / "configs" / "sd" / "sdxl-base.yaml",
                       overrides=[f"model.params.unet_config.params.transformer_depth={levels}"])


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
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
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def clip_text_model(text_state_dict: dict, hf_layout: bool = False):
    """transformers' CLIPTextModel (ViT-L/14 text tower) holding our SD1 text encoder's weights (with
    ``hf_layout``: already in the SD1 file's names, ``cond_stage_model.transformer.text_model.*``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert import to_hf_clip_text_state_dict

    sd1 = text_state_dict if hf_layout else {"cond_stage_model.transformer." + k: v
                                             for k, v in to_hf_clip_text_state_dict(text_state_dict).items()}
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


def bigg_text_model(file_state_dict: dict, prefix: str):
    """transformers' CLIPTextModelWithProjection (OpenCLIP ViT-bigG-14 text tower) holding the weights under
    ``prefix`` of an SDXL-layout state dict (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    converted = convert_open_clip_checkpoint(model, file_state_dict, prefix=prefix)
    expected = model.state_dict().keys()
    if "text_model.final_layer_norm.weight" not in expected:  # transformers >= 5 drops the text_model wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in expected or not k.endswith("position_ids")}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def prepare_sdxl(folder: Path, depth: str) -> None:
    """Write ours.safetensors (the released SDXL layout, fp16) and the diffusers/ StableDiffusionXLPipeline
    folder (fp16), both holding the same random weights."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from diffusers_port import UNET_PREFIX, diffusers_unet, diffusers_vae
    from ldm.config import to_plain
    from ldm.convert import build_model, to_sd_file_layout
    from ldm.io import save_checkpoint

    config = sdxl_config(depth)
    with torch.device("meta"):  # random fp16 weights straight away: ~2 B parameters in fp32 would not fit here
        model = build_model(config).half()
    model = common.randomize_(model.to_empty(device="cpu")).eval()  # its state dict holds parameters only
    state = to_sd_file_layout(model.state_dict())
    del model
    save_checkpoint(state, folder / "ours.safetensors", config=to_plain(config))
    params = to_plain(config)["model"]["params"]

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    clip_l = {"cond_stage_model.transformer." + k: v for k, v in part("conditioner.embedders.0.transformer.").items()}
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", algorithm_type="dpmsolver++",
                                            solver_order=2, use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(
        vae=diffusers_vae(params["first_stage_config"]["params"]["ddconfig"], part("first_stage_model."),
                          scale_factor=params["scale_factor"]),
        text_encoder=clip_text_model(clip_l, hf_layout=True),
        text_encoder_2=bigg_text_model(state, "conditioner.embedders.1.model."),
        tokenizer=clip_tokenizer(folder / "tokenizer-src"),
        tokenizer_2=clip_tokenizer(folder / "tokenizer-2-src", pad_token="!"),  # bigG pads with 0, i.e. "!"
        unet=diffusers_unet(params["unet_config"]["params"], part(UNET_PREFIX)),
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    del state
    pipe.save_pretrained(folder / "diffusers")


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


def _timed(run, device: torch.device) -> tuple[float, float]:
    """Seconds of ``run(STEPS)`` after a 1-step warm-up, the device's queued work included, and the CPU seconds
    of this process meanwhile (with one thread, what other processes on a shared CPU take leaves them nearly
    unchanged, unlike the wall-clock time)."""
    sync = common.synchronizer(device)
    run(1)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    run(STEPS)
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def generate_ours(folder: Path, size: int, precision: str, vae_precision: str, device: torch.device
                  ) -> tuple[tuple[float, float], float]:
    from ldm.pipeline import Text2Image

    pipe = Text2Image.from_checkpoint(folder / "ours.safetensors", device=device, precision=precision,
                                      vae_precision=vae_precision)
    loaded = common.peak_memory_gb(device)
    run = lambda steps: pipe(PROMPT, height=size, width=size, steps=steps, sampler="DPM++ 2M",  # noqa: E731
                             guidance_scale=GUIDANCE, seeds=0)
    return _timed(run, device), loaded


def generate_diffusers(folder: Path, size: int, precision: str, vae_precision: str, device: torch.device
                       ) -> tuple[tuple[float, float], float]:
    from diffusers import DiffusionPipeline  # StableDiffusionPipeline or StableDiffusionXLPipeline, by the folder

    cuda = device.type == "cuda"
    pipe = DiffusionPipeline.from_pretrained(folder / "diffusers", local_files_only=True,
                                             torch_dtype=common.DTYPES[precision] if cuda else torch.float32)
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
    (seconds, cpu_seconds), loaded = fn(Path(args.folder), args.sizes[0], args.precisions[0],
                                        args.ours_vae_precision, args.device)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_after_load_gb": loaded,
                      "peak_rss_gb": common.peak_memory_gb(args.device), "load_average": os.getloadavg()[0]}))


def run_worker(name: str, folder: Path, size: int, precision: str, args, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--arch", args.arch, "--folder", str(folder), "--sizes", str(size),
           "--precisions", precision, "--threads", str(threads), "--ours-vae-precision", args.ours_vae_precision,
           "--device", str(args.device)]
    logger.info("running %s", " ".join(cmd))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # errors, not progress bars
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
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
    parser.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1",
                        help="sd1: StableDiffusionPipeline (SD1 architecture); sdxl: StableDiffusionXLPipeline")
    parser.add_argument("--sdxl-depth", default="1-2-2",
                        help="with --arch sdxl: the UNet's transformer depth per level (1-2-10 = SDXL base)")
    parser.add_argument("--unet-width", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    parser.add_argument("--vae-ch", type=int, default=128, help="VAE base width (128 = SD1.5)")
    parser.add_argument("--ours-vae-precision", choices=("auto", "fp32", "same"), default="auto",
                        help="Text2Image's vae_precision: auto (our default: the autocast with bf16, as diffusers "
                             "here), fp32 or same")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: bench/results/txt2img.md (sdxl: txt2img_sdxl.md)")
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
        if args.arch == "sdxl":
            prepare_sdxl(folder, args.sdxl_depth)
        else:
            prepare(folder, args.unet_width, args.vae_ch)
        for size in args.sizes:
            for precision in args.precisions:
                results = {name: [] for name in CANDIDATES}
                for _ in range(args.reps):
                    for name in CANDIDATES:
                        results[name].append(run_worker(name, folder, size, precision, args, threads))
                ours, theirs = (common.median([r["seconds"] for r in results[n]]) for n in CANDIDATES)
                cpu_ours, cpu_theirs = (common.median([r["cpu_seconds"] for r in results[n]]) for n in CANDIDATES)
                peak = {n: max(r["peak_rss_gb"] for r in results[n]) for n in CANDIDATES}
                loaded = {n: max(r["rss_after_load_gb"] for r in results[n]) for n in CANDIDATES}
                loads = [r["load_average"] for n in CANDIDATES for r in results[n]]
                rows.append([f"{size}x{size}", precision, ours, theirs, f"{theirs / ours:.2f}x",
                             f"{peak['ours']:.2f} ({loaded['ours']:.2f})",
                             f"{peak['diffusers']:.2f} ({loaded['diffusers']:.2f})",
                             f"{min(loads):.1f}-{max(loads):.1f}",
                             f"{cpu_ours:.3g} / {cpu_theirs:.3g} = {cpu_theirs / cpu_ours:.2f}x"])
                logger.info("%s", rows[-1])
    mem = "peak GPU memory" if args.device.type == "cuda" else "peak RSS"
    headers = ["image", "precision", "ours s/image", "diffusers s/image", "speed-up",
               f"ours {mem} GiB (after load)", f"diffusers {mem} GiB (after load)", "load average (1 min) at ends",
               "CPU s ours / diffusers (speed-up)"]
    width = "SD1.5 size" if (args.unet_width, args.vae_ch) == (320, 128) else \
        f"SD1 architecture, UNet width {args.unet_width}, VAE width {args.vae_ch}"
    if args.arch == "sdxl":
        width = (f"SDXL base with transformer depth [{args.sdxl_depth.replace('-', ', ')}] per level (the real one: "
                 "1, 2, 10), full-size CLIP-L and bigG text encoders and VAE, both files in fp16 (as released) "
                 "loaded into fp32 modules; diffusers' StableDiffusionXLPipeline with force_zeros_for_empty_prompt "
                 "(ours: the same zero negative conditioning), the same original/crop/target size")
    notes = [f"{width}, random weights, one prompt, {STEPS} steps DPM++ 2M (diffusers: DPMSolverMultistep "
             f"dpmsolver++ order 2), CFG {GUIDANCE}, batch 1; each number from a fresh process after a 1-step warm-up",
             "load average: the machine's 1-minute load average as each worker ended (other sessions share it); "
             "CPU s: the worker's process CPU time over the timed run (user + system, all its threads), which "
             "other processes on a shared machine change far less than the wall-clock seconds",
             f"ours decodes the VAE with vae_precision={args.ours_vae_precision!r} ('auto', our default, is the "
             "autocast with bf16); ours stores the UNet's conv/linear weights in bf16 (unet_weights='compute', "
             "from_checkpoint's default: the same numbers as autocast's casts) and uses attention 'auto'; "
             "diffusers runs everything, VAE included, under the same autocast",
             "peak RSS: VmHWM of the worker process (loading included)" if args.device.type != "cuda" else
             "on CUDA: peak of torch.cuda.max_memory_allocated in the worker (loading included); diffusers' "
             "pipeline holds all its weights in the precision (torch_dtype) and runs without autocast, ours "
             "keeps the VAE as vae_precision says"]
    out = args.out or str(common.RESULTS / ("txt2img_sdxl.md" if args.arch == "sdxl" else "txt2img.md"))
    common.write_report(out, "Text-to-image end to end: ours vs diffusers",
                        common.machine_info(threads, "/".join(args.precisions), args.device),
                        common.markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
