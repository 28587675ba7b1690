#!/usr/bin/env bash
# Train the shipped demo model from scratch, reproducibly (fixed seeds), on a CPU, from the repository root or
# anywhere else:
#
#     recipes/shapes_demo/train.sh       # see recipes/shapes_demo/README.md for how long each stage took
#
# 1. the kl-f4 autoencoder (configs/demo/shapes_autoencoder.yaml, 1500 batches)  -> $LOGDIR/shapes_autoencoder/
#    then the whole autoencoder fine-tuned (finetune_decoder.py --train-encoder: MSE + L1 with the
#    object pixels weighted 10x, 500 steps): with the mostly-gray pictures an unweighted loss let the encoder
#    merge red, orange and yellow (all decoded orange); tests/test_demo_model.py checks all 8 colors
# 2. the text-to-image UNet + text tower over its latents
#    (recipes/shapes_demo/shapes_demo.yaml, first_stage_ckpt = the fine-tuned autoencoder) -> $LOGDIR/shapes_demo/
#    LDM_STEPS steps (the cosine schedule's total_steps set to the same), then 1000 steps more with 40% of the
#    captions color-free (model.params.init_from, data.params.color_drop=0.4)       -> $LOGDIR/shapes_demo_cf/
# 3. the text tower pretrained contrastively (pretrain_text_tower.py)                 -> $LOGDIR/text_tower.safetensors
# 4. warm starts on it (UNet on the frozen tower, then tower and UNet together), the tower pretrained again
#    with colors-exchanged negatives, the UNet adapted to it, both trained together     -> $LOGDIR/v6_counting/
# 5. the decoder of 4's fp16 export (EMA UNet, config stored in the file) fine-tuned, written to
#    ldm/assets/demo/shapes.safetensors, the file `python sample.py` uses when no --ckpt is given; then the
#    reconstruction check.
#
# Environment: LOGDIR (default logs/demo), SEED (default 0), LDM_STEPS (default 12000: about what the shipped
# model's diffusion stage saw over its first three rounds, ~2.4 h at 1.4 steps/s; the color-free stage adds 1000
# steps, ~12 min; stages 3-4 add ~27 min of tower pretraining and 17000 steps, ~3.4 h; stage 5 ~16 min),
# OMP_NUM_THREADS (default 1: on a CPU shared with other jobs one thread per process is several times faster
# than two; on an idle machine set it to the core count). Extra arguments go to every latent diffusion run.
# README.md (next to this script) has the timings and the evaluation of the shipped file.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: train.py, configs/ and ldm/assets/ are named from there

LOGDIR="${LOGDIR:-logs/demo}"
SEED="${SEED:-0}"
LDM_STEPS="${LDM_STEPS:-12000}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the recipe's scripts import ldm
RECIPE=recipes/shapes_demo
CONFIG="$RECIPE/shapes_demo.yaml"
AE_EXPORT="$LOGDIR/shapes_autoencoder/shapes_autoencoder.safetensors"
AE_FT="$LOGDIR/shapes_autoencoder/shapes_autoencoder_ft.safetensors"
BASE_EXPORT="$LOGDIR/shapes_demo/shapes_demo.safetensors"
LDM_EXPORT="$LOGDIR/shapes_demo_cf/shapes_demo_cf.safetensors"
TOWER="$LOGDIR/text_tower.safetensors"
TOWER_CS="$LOGDIR/text_tower_color_swaps.safetensors"
V6_EXPORT="$LOGDIR/v6_counting/v6_counting.safetensors"
ASSET="ldm/assets/demo/shapes.safetensors"

stage() { echo "[shapes_demo] $(date +%H:%M:%S) $*"; }

SECONDS=0
# 1500 batches of L1 + KL only: the PatchGAN of configs/demo/shapes_autoencoder.yaml (disc_start 1501) never
# starts; on these flat-colored pictures it cost PSNR (27.3 -> 26.3 dB over its 250 batches) and time.
if [[ -f "$AE_EXPORT" ]]; then
    stage "1/5 autoencoder: $AE_EXPORT is there, kept"
else
    stage "1/5 autoencoder -> $AE_EXPORT"
    python train.py --base configs/demo/shapes_autoencoder.yaml --name shapes_autoencoder --logdir "$LOGDIR" \
        --seed "$SEED" lightning.trainer.max_steps=1500
fi
if [[ -f "$AE_FT" ]]; then
    stage "1/5 autoencoder fine-tuning: $AE_FT is there, kept"
else
    stage "1/5 autoencoder fine-tuning (encoder too, object pixels weighted) -> $AE_FT"
    python "$RECIPE/finetune_decoder.py" --ckpt "$AE_EXPORT" --out "$AE_FT" --train-encoder --object-weight 10 \
        --steps 500 --seed "$SEED"
fi
ae_seconds=$SECONDS

stage "2/5 latent diffusion -> $BASE_EXPORT"
python train.py --base "$CONFIG" --name shapes_demo --logdir "$LOGDIR" --seed "$SEED" \
    "model.params.first_stage_ckpt=$AE_FT" "lightning.trainer.max_steps=$LDM_STEPS" \
    "model.params.scheduler_config.params.total_steps=$LDM_STEPS" "$@"
# then 1000 steps with 40% of the captions color-free (the eval's single object, two objects, counting and
# position prompts name no colors): learning rate 1e-4 on a 3000-step cosine schedule, stopped at step 1000
# (the shipped file is that step's EMA export; the later steps lost color attribution, README.md); the UNet and
# text tower start from 2's export (its EMA UNet; the new run's EMA starts from it), the autoencoder is AE_FT
stage "2/5 latent diffusion, color-free captions -> $LDM_EXPORT"
python train.py --base "$CONFIG" --name shapes_demo_cf --logdir "$LOGDIR" --seed "$SEED" \
    "model.params.init_from=[{path: '$BASE_EXPORT', parts: [unet, text_encoder]}]" \
    "model.params.first_stage_ckpt=$AE_FT" data.params.color_drop=0.4 \
    model.params.learning_rate=1.0e-4 lightning.trainer.max_steps=1000 \
    model.params.scheduler_config.params.total_steps=3000 "$@"

# 3. the text tower pretrained contrastively with relation-inverted captions as hard negatives (the jointly
#    trained tower coded "left of" and "right of" almost alike), then the UNet taught to read it: warm starts,
#    each from the previous export (README.md, "v5" and "v6"): the tower frozen while the UNet learns
#    the relations (1500 + 5000 steps, half of the scenes relations, uniform v-loss, a position embedding), then
#    trained again with the UNet (2000 steps, kinds balanced), then v6's rounds (below)
stage "3/5 text tower, contrastive -> $TOWER"
python "$RECIPE/pretrain_text_tower.py" --steps 4000 --pair-weight 4 --init "$LDM_EXPORT" --out "$TOWER" \
    --seed "$SEED"
# warm NAME INIT STEPS [overrides...]: a warm start with the settings every v5 and v6 stage shares: the UNet and
# text tower from INIT (model.params.init_from), the latent scale kept from INIT (not estimated again).
# TOWER_FROM=FILE: the text tower from FILE instead (a pretrain_text_tower.py output); KEEP_NEW=true: UNet
# tensors INIT lacks (the position embedding, zero-initialised) keep their fresh initialisation.
warm() {
    local name=$1 init=$2 steps=$3 scale init_from; shift 3
    scale=$(python -c "import json, sys; from ldm.io import read_state_dict as r
print(json.loads(r(sys.argv[1])[1]['config'])['model']['params']['scale_factor'])" "$init")
    if [[ -n "${TOWER_FROM:-}" ]]; then
        init_from="[{path: '$init', parts: [unet], keep_new: ${KEEP_NEW:-false}},"
        init_from+=" {path: '$TOWER_FROM', parts: [text_encoder]}]"
    else
        init_from="[{path: '$init', parts: [unet, text_encoder], keep_new: ${KEEP_NEW:-false}}]"
    fi
    python train.py --base "$CONFIG" --name "$name" --logdir "$LOGDIR" --seed "$SEED" \
        "model.params.init_from=$init_from" "model.params.first_stage_ckpt=$AE_FT" \
        model.params.scale_by_std=false "model.params.scale_factor=$scale" \
        data.params.color_drop=0.4 model.params.loss_weighting=uniform \
        model.params.unet_config.params.position_embedding=true \
        model.params.scheduler_config.params.warmup_steps=20 "lightning.trainer.max_steps=$steps" \
        "model.params.scheduler_config.params.total_steps=$steps" "$@"
}
FROZEN=(model.params.cond_stage_trainable=false model.params.cond_stage_config.params.freeze=true
        model.params.learning_rate=2.0e-4
        "data.params.kinds=[single,relation,relation,relation,counting,color_attribution]")
JOINT=(model.params.cond_stage_trainable=true model.params.cond_stage_config.params.freeze=false
       model.params.learning_rate=1.0e-4)
stage "4/5 UNet on the frozen tower, then both -> $V6_EXPORT"
# the position embedding starts at zero, the tower from 3
TOWER_FROM="$TOWER" KEEP_NEW=true warm v5_relations_a "$LDM_EXPORT" 1500 "${FROZEN[@]}" "$@"
warm v5_relations_b "$LOGDIR/v5_relations_a/v5_relations_a.safetensors" 5000 "${FROZEN[@]}" "$@"
warm v5_joint_a "$LOGDIR/v5_relations_b/v5_relations_b.safetensors" 2000 "${JOINT[@]}" "$@"
# v6: that tower pretrained again with colors-exchanged captions as hard negatives too, the UNet adapted to it
# while it stays frozen (1500 steps; then a 2500-step schedule stopped at step 2000), then both trained together
# with color attribution twice as often (3000 steps), then counting twice as often too (2000 steps)
python "$RECIPE/pretrain_text_tower.py" --steps 2000 --pair-weight 4 --color-swaps \
    --init "$LOGDIR/v5_joint_a/v5_joint_a.safetensors" --out "$TOWER_CS" --seed "$SEED"
BALANCED=(model.params.cond_stage_trainable=false model.params.cond_stage_config.params.freeze=true
          model.params.learning_rate=2.0e-4)
TOWER_FROM="$TOWER_CS" warm v6_swaps_a "$LOGDIR/v5_joint_a/v5_joint_a.safetensors" 1500 "${BALANCED[@]}" "$@"
warm v6_swaps_b "$LOGDIR/v6_swaps_a/v6_swaps_a.safetensors" 2500 "${BALANCED[@]}" lightning.trainer.max_steps=2000 "$@"
warm v6_joint "$LOGDIR/v6_swaps_b/v6_swaps_b.safetensors" 3000 "${JOINT[@]}" \
    "data.params.kinds=[single,relation,counting,color_attribution,color_attribution]" "$@"
warm v6_counting "$LOGDIR/v6_joint/v6_joint.safetensors" 2000 "${JOINT[@]}" \
    "data.params.kinds=[single,relation,counting,counting,color_attribution,color_attribution]" "$@"
ldm_seconds=$((SECONDS - ae_seconds))

# 5. the decoder fine-tuned with the encoder frozen (the latent space, so the UNet, unchanged), the error of each
#    picture's worst 1% of pixels added to the loss: the autoencoder drew a speck near the bottom-right corner
#    of every picture; the result is the fp16 model with that decoder, the file sample.py uses by default
stage "5/5 decoder fine-tuning -> $ASSET"
mkdir -p "$(dirname "$ASSET")"
python "$RECIPE/finetune_decoder.py" --ckpt "$V6_EXPORT" --out "$ASSET" --steps 1200 --lr 1e-3 --object-weight 4 \
    --worst-weight 0.6 --seed "$SEED"
python -m ldm.eval recon --ckpt "$ASSET" --num 64
stage "done: autoencoder ${ae_seconds}s, latent diffusion ${ldm_seconds}s, $(du -h "$ASSET" | cut -f1) in $ASSET"
