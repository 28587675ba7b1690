#!/usr/bin/env bash
# Train the shipped demo model from scratch, reproducibly (fixed seeds), on a CPU:
#
#     scripts/train_demo.sh       # see docs/demo_model.md for how long each stage took
#
# 1. the kl-f4 autoencoder (configs/demo/shapes_autoencoder.yaml, 1500 batches)  -> $LOGDIR/shapes_autoencoder/
#    then its decoder fine-tuned with the encoder frozen (scripts/finetune_decoder.py: MSE, 1500 steps): the
#    latent space stays the same, the colors and PSNR get right (red had come out orange)
# 2. the text-to-image UNet + text tower over its latents
#    (configs/demo/shapes_demo.yaml, first_stage_ckpt = the fine-tuned autoencoder)  -> $LOGDIR/shapes_demo/
#    1500 steps, then resumed at the final learning rate up to 2000 steps
# 3. the fp16 export of 2 (EMA UNet, config stored in the file) copied to ldm/assets/demo/shapes.safetensors,
#    the file `python sample.py` uses when no --ckpt is given; then the reconstruction check.
#
# Environment: LOGDIR (default logs/demo), SEED (default 0), OMP_NUM_THREADS (default 1: on a CPU shared with
# other jobs one thread per process is several times faster than two; on an idle machine set it to the core
# count). Extra arguments go to the second stage's train.py, e.g. lightning.trainer.max_steps=300.
# docs/demo_model.md has the timings and the evaluation of the shipped file.
set -euo pipefail
cd "$(dirname "$0")/.."

LOGDIR="${LOGDIR:-logs/demo}"
SEED="${SEED:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts/finetune_decoder.py imports ldm
AE_EXPORT="$LOGDIR/shapes_autoencoder/shapes_autoencoder.safetensors"
AE_FT="$LOGDIR/shapes_autoencoder/shapes_autoencoder_ft.safetensors"
LDM_EXPORT="$LOGDIR/shapes_demo/shapes_demo.safetensors"
ASSET="ldm/assets/demo/shapes.safetensors"

stage() { echo "[train_demo] $(date +%H:%M:%S) $*"; }

SECONDS=0
# 1500 batches of L1 + KL only: the PatchGAN of configs/demo/shapes_autoencoder.yaml (disc_start 1501) never
# starts; on these flat-colored pictures it cost PSNR (27.3 -> 26.3 dB over its 250 batches) and time.
if [[ -f "$AE_EXPORT" ]]; then
    stage "1/3 autoencoder: $AE_EXPORT is there, kept"
else
    stage "1/3 autoencoder -> $AE_EXPORT"
    python train.py --base configs/demo/shapes_autoencoder.yaml --name shapes_autoencoder --logdir "$LOGDIR" \
        --seed "$SEED" lightning.trainer.max_steps=1500
fi
if [[ -f "$AE_FT" ]]; then
    stage "1/3 decoder fine-tuning: $AE_FT is there, kept"
else
    stage "1/3 decoder fine-tuning -> $AE_FT"
    python scripts/finetune_decoder.py --ckpt "$AE_EXPORT" --out "$AE_FT" --steps 1500 --seed "$SEED"
fi
ae_seconds=$SECONDS

stage "2/3 latent diffusion -> $LDM_EXPORT"
if [[ ! -f "$LOGDIR/shapes_demo/checkpoints/last.ckpt" ]]; then
    python train.py --base configs/demo/shapes_demo.yaml --name shapes_demo --logdir "$LOGDIR" --seed "$SEED" \
        "model.params.first_stage_ckpt=$AE_FT" "$@"
fi
# 500 more steps at the final learning rate (the schedule state is resumed, so it stays at 10%)
python train.py --resume "$LOGDIR/shapes_demo" --seed "$SEED" lightning.trainer.max_steps=2000
ldm_seconds=$((SECONDS - ae_seconds))

stage "3/3 export -> $ASSET"
mkdir -p "$(dirname "$ASSET")"
cp "$LDM_EXPORT" "$ASSET"
python -m ldm.eval recon --ckpt "$ASSET" --num 64
stage "done: autoencoder ${ae_seconds}s, latent diffusion ${ldm_seconds}s, $(du -h "$ASSET" | cut -f1) in $ASSET"
