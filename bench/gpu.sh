#!/usr/bin/env bash
# The GPU benchmarks as one prepared run, for a session that is lent the GPU machine (the `device` tool:
# ~15 minutes of device time per task, one run of at most 10 minutes; the machine has torch with CUDA but no
# package registry). Two steps:
#
#   bash bench/gpu.sh fetch      # here, with the registry: wheels of what the GPU machine lacks into .whl/
#                                 # (git-ignored via .git/info/exclude), for Python 3.12 / x86-64
#   bash bench/gpu.sh run DIR    # there (device `run`, carry [".whl"], DIR = $OUT): install them, run the
#                                 # eager benches, write markdown tables and logs into DIR (at most 8 minutes)
#   bash bench/gpu.sh compiled DIR   # a second call if device time is left: the torch.compile rows (bf16;
#                                     # at most 6 minutes, three compilations of the SD1.5 UNet)
#   bash bench/gpu.sh fsdp DIR   # train.py --strategy fsdp on the GPU (NCCL, bf16-mixed) with EMA and
#                                 # activation checkpointing: a tiny model, 2 steps, resume to 3, strict load of
#                                 # the export (at most 7 minutes; CPU runs of the same are tests/test_fsdp.py)
#
# Each bench runs under its own `timeout`, so a slow one costs only itself, ordered by what it settles: levers +
# utilization (fp16, bf16), text-to-image 512 px, the UNet forward and training step, the VAE decode. One
# device call may last 10 minutes, a task has ~15 minutes of device time in all (the machine's start included).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 omegaconf==2.4.0 ftfy wcwidth lazy-importer
        importlib_metadata xformers==0.0.35 pytorch-lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0)

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    du -sh .whl
    ;;
run|compiled|fsdp)
    out=${2:?usage: bash bench/gpu.sh run|compiled|fsdp OUT_DIR}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
        python3 -c "import xformers.ops; print('xformers', xformers.__version__)" 2>&1 | tail -1
    } > "$out/machine.txt" 2>&1
    step() {  # step NAME SECONDS COMMAND...
        local name=$1 limit=$2; shift 2
        echo "== $name (limit ${limit}s): $*"
        local start=$SECONDS
        timeout "$limit" "$@" > "$out/$name.log" 2>&1
        echo "   exit $? after $((SECONDS - start)) s"
        tail -n 3 "$out/$name.log"
    }
    if [[ $1 == fsdp ]]; then
        PYTHONPATH=$PYTHONPATH:$PWD/tests python3 -c "from pathlib import Path; from test_train_cli import \
tiny_run_config; tiny_run_config(Path('$out'), enable_progress_bar=False)" > "$out/fsdp_config.log" 2>&1
        gpu=(--accelerator gpu --devices 1 --strategy fsdp --precision bf16-mixed)
        step fsdp_train 180 python3 train.py --base "$out/tiny.yaml" --logdir "$out/logs" --name fsdp "${gpu[@]}" \
            --max_steps 2 model.params.gradient_checkpointing=true lightning.callbacks.export.fp16=false
        step fsdp_resume 180 python3 train.py --resume "$out/logs/fsdp" "${gpu[@]}" --max_steps 3
        step fsdp_load 30 python3 -c "import torch; from ldm.convert import load_model; \
load_model(None, '$out/logs/fsdp/fsdp.safetensors'); \
ck = torch.load('$out/logs/fsdp/checkpoints/last.ckpt', weights_only=True); \
print('step', ck['global_step'], 'ema updates', int(ck['state_dict']['model_ema.num_updates']))"
        exit 0
    fi
    if [[ $1 == compiled ]]; then
        step gpu_compiled 360 python3 bench/bench_gpu.py --device cuda --precisions bf16 --compile --reps 5 \
            --out "$out/gpu_compiled.md"
        exit 0
    fi
    step gpu_levers 150 python3 bench/bench_gpu.py --device cuda --precisions fp16 bf16 --reps 5 \
        --out "$out/gpu_levers.md"
    step gpu_txt2img 150 python3 bench/bench_txt2img.py --device cuda --sizes 512 --precisions fp16 --reps 2 \
        --out "$out/gpu_txt2img.md"
    step gpu_unet 120 python3 bench/bench_unet.py --device cuda --sizes full@64 --precisions bf16 fp16 \
        --modes forward train --reps 5 --out "$out/gpu_unet.md"
    step gpu_vae 90 python3 bench/bench_vae.py --device cuda --sizes 512 1024 2048 --ch 128 --max-untiled 2048 \
        --out "$out/gpu_vae.md"
    ;;
*)
    echo "usage: bash bench/gpu.sh fetch | bash bench/gpu.sh run|compiled|fsdp OUT_DIR" >&2
    exit 2
    ;;
esac
