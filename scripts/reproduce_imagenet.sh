#!/usr/bin/env bash
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
#
# SpeeD's ImageNet comparison in one command: extract SD-VAE latents of ImageNet's train split,
# train DiT-XL/2 with `uniform` (DiT) and `speed` from the same initialisation and data order,
# evaluate FID-10K (and sFID, IS, precision, recall) every 50K steps, and write the table and
# the plot. Every run is a train_dit.py run (scripts/compare_convergence.py drives them).
#
#   bash scripts/reproduce_imagenet.sh IMAGENET_TRAIN_DIR VIRTUAL_imagenet256_labeled.npz \
#       weights-inception-2015-12-05-6726825d.pth
#
# IMAGENET_TRAIN_DIR holds one folder of images per class (n01440764/, ...). The reference batch
# is ADM's (guided-diffusion's evaluation suite); the Inception weights are torch-fidelity's. A
# cut-short call resumes: finished latents and runs are kept, unfinished runs resume from their
# last checkpoint. The settings below are DiT's and SpeeD's; each can be overridden by the
# environment variable beside it (the test suite dry-runs this script on the CPU that way).
set -euo pipefail
cd "$(dirname "$0")/.."

images=${1:?usage: reproduce_imagenet.sh IMAGENET_TRAIN_DIR REFERENCE_BATCH.npz INCEPTION_WEIGHTS.pth}
reference=${2:?usage: reproduce_imagenet.sh IMAGENET_TRAIN_DIR REFERENCE_BATCH.npz INCEPTION_WEIGHTS.pth}
weights=${3:?usage: reproduce_imagenet.sh IMAGENET_TRAIN_DIR REFERENCE_BATCH.npz INCEPTION_WEIGHTS.pth}
for path in "$images" "$reference" "$weights"; do
  [ -e "$path" ] || { echo "error: $path does not exist" >&2; exit 2; }
done

out=${SPEEDIT_OUT:-imagenet-comparison}
launch=${SPEEDIT_LAUNCH:-accelerate launch --config_file accelerate_configs/multi_gpu_8.yaml}
python_bin=${PYTHON:-python}
vae=${SPEEDIT_VAE:-stabilityai/sd-vae-ft-ema}
resolution=${SPEEDIT_RESOLUTION:-256}
max_samples=${SPEEDIT_MAX_SAMPLES:-}          # all of ImageNet unless set (a trial subset)
model=${SPEEDIT_MODEL:-XL/2}
model_size=${SPEEDIT_MODEL_SIZE:---num_layers 28 --hidden_size 1152 --num_attention_heads 16}  # XL's
batch_size=${SPEEDIT_BATCH_SIZE:-32}          # per GPU: 8 x 32 = DiT's global batch of 256
max_steps=${SPEEDIT_MAX_STEPS:-400000}
eval_every=${SPEEDIT_EVAL_EVERY:-50000}
per_class=${SPEEDIT_EVAL_SAMPLES_PER_CLASS:-10}   # x 1000 classes = FID-10K
eval_steps=${SPEEDIT_EVAL_INFERENCE_STEPS:-250}   # DiT's DDPM-250
device=${SPEEDIT_DEVICE:-cuda}
precision=${SPEEDIT_MIXED_PRECISION:-bf16}
seeds=${SPEEDIT_SEEDS:-0}

if [ ! -f "$out/latents/manifest.json" ] || ! grep -q '"complete": true' "$out/latents/manifest.json"; then
  # shellcheck disable=SC2086
  $launch scripts/extract_latents.py --input_dir "$images" --output_dir "$out/latents" \
    --resolution "$resolution" --vae "$vae" ${max_samples:+--max_samples "$max_samples"}
fi

# shellcheck disable=SC2086
"$python_bin" scripts/compare_convergence.py --train_data "$out/latents" --metric fid \
  --reference_batch "$reference" --inception_weights "$weights" \
  --presets uniform speed --seeds $seeds --model "$model" $model_size \
  --batch_size "$batch_size" --learning_rate 1e-4 --ema_decay 0.9999 \
  --max_steps "$max_steps" --eval_every "$eval_every" --eval_samples_per_class "$per_class" \
  --eval_inference_steps "$eval_steps" --guidance_scale 1.0 \
  --device "$device" --mixed_precision "$precision" --launcher "$launch" --output_dir "$out/comparison"
