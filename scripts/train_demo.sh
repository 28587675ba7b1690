#!/usr/bin/env bash
# Train the shipped demo model from scratch, reproducibly (fixed seeds), on a CPU:
#
#     scripts/train_demo.sh                 # ~25 min autoencoder + ~30 min latent diffusion on 1 CPU thread
#
# 1. the kl-f4 autoencoder (configs/demo/shapes_autoencoder.yaml)  -> $LOGDIR/shapes_autoencoder/
# 2. the text-to-image UNet + text tower over its latents
#    (configs/demo/shapes_demo.yaml, first_stage_ckpt = the export of 1)  -> $LOGDIR/shapes_demo/
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
AE_EXPORT="$LOGDIR/shapes_autoencoder/shapes_autoencoder.safetensors"
LDM_EXPORT="$LOGDIR/shapes_demo/shapes_demo.safetensors"
ASSET="ldm/assets/demo/shapes.safetensors"

stage() { echo "[train_demo] $(date +%H:%M:%S) $*"; }

SECONDS=0
stage "1/3 autoencoder -> $AE_EXPORT"
python train.py --base configs/demo/shapes_autoencoder.yaml --name shapes_autoencoder --logdir "$LOGDIR" \
    --seed "$SEED" --resume auto
ae_seconds=$SECONDS

stage "2/3 latent diffusion -> $LDM_EXPORT"
python train.py --base configs/demo/shapes_demo.yaml --name shapes_demo --logdir "$LOGDIR" --seed "$SEED" \
    --resume auto "model.params.first_stage_ckpt=$AE_EXPORT" "$@"
ldm_seconds=$((SECONDS - ae_seconds))

stage "3/3 export -> $ASSET"
mkdir -p "$(dirname "$ASSET")"
cp "$LDM_EXPORT" "$ASSET"
python -m ldm.eval recon --ckpt "$ASSET" --num 64
stage "done: autoencoder ${ae_seconds}s, latent diffusion ${ldm_seconds}s, $(du -h "$ASSET" | cut -f1) in $ASSET"
