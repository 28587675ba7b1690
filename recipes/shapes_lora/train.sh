#!/usr/bin/env bash
# Teach the shipped demo model (ldm/assets/demo/shapes.safetensors) a new shape, five-point stars, twice: as a
# rank-8 LoRA (star_lora.yaml) and as a full fine-tune (star_finetune.yaml), each from 500 pictures of stars
# mixed with 5000 of the default world's, distilled from the shipped model (3000 steps of 16 each: the LoRA with the
# words' own vectors and a text-tower LoRA, the fine-tune with the words' embedding rows and the whole text tower);
# then score both (docs/lora_demo.md has the numbers):
#
#     recipes/shapes_lora/train.sh        # from the repository root or anywhere else
#
# Environment: LOGDIR (default logs/shapes_lora), SEED (default 0), OMP_NUM_THREADS (default 1: the machine
# these numbers come from was shared; on an idle one set it to the core count), EVAL (default 1: 0 skips the
# scoring). Extra arguments go to both train.py runs (e.g. lightning.trainer.max_steps=300).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: train.py and ldm/assets/ are named from there

LOGDIR="${LOGDIR:-logs/shapes_lora}"
SEED="${SEED:-0}"
EVAL="${EVAL:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RECIPE=recipes/shapes_lora
BASE=ldm/assets/demo/shapes.safetensors
LORA="$LOGDIR/star_lora/star_lora.safetensors"
FT="$LOGDIR/star_finetune/star_finetune.safetensors"

stage() { echo "[shapes_lora] $(date +%H:%M:%S) $*"; }

stage "1/2 LoRA -> $LORA"
python train.py --base "$RECIPE/star_lora.yaml" --init "$BASE" --logdir "$LOGDIR" --name star_lora --seed "$SEED" "$@"
stage "2/2 full fine-tune -> $FT"
python train.py --base "$RECIPE/star_finetune.yaml" --init "$BASE" --logdir "$LOGDIR" --name star_finetune \
    --seed "$SEED" "$@"

if [[ "$EVAL" == 1 ]]; then
    # the star prompts (every category names a star; the analyzer knows stars), then the default categories on
    # the same held-out prompts and seeds as the shipped model's own evaluation (recipes/shapes_demo/README.md)
    for s in 0 1; do
        python -m ldm.eval geneval --ckpt "$BASE" --n 10 --images-per-prompt 4 --seed $s \
            --out "$LOGDIR/base_s$s.md"
        python -m ldm.eval geneval --ckpt "$BASE" --lora "$LORA" --n 10 --images-per-prompt 4 --seed $s \
            --out "$LOGDIR/lora_s$s.md"
        python -m ldm.eval geneval --ckpt "$FT" --n 10 --images-per-prompt 4 --seed $s --out "$LOGDIR/ft_s$s.md"
    done
    python -m ldm.eval geneval --ckpt "$BASE" --lora "$LORA" --focus-shape star --n 10 --images-per-prompt 4 \
        --out "$LOGDIR/lora_star.md"
    python -m ldm.eval geneval --ckpt "$FT" --focus-shape star --n 10 --images-per-prompt 4 --out "$LOGDIR/ft_star.md"
    python -m ldm.eval geneval --ckpt "$BASE" --focus-shape star --n 10 --images-per-prompt 4 \
        --out "$LOGDIR/base_star.md"
fi
stage "done in $((SECONDS / 60)) min"
