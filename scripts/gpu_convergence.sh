#!/usr/bin/env bash
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
#
# The MNIST-32 convergence comparison on one GPU within one call: DiT-S/2 (12 layers, width 384,
# patch 2: 256 tokens, the sequence length of DiT-XL/2 on ImageNet latents), 10,000 steps per
# run, the (preset, seed) runs one after another, seed-major, each a train_dit.py run (through
# scripts/compare_convergence.py). A small model on a fast GPU is bound by kernel launches, so the
# runs compile the model and the loss as one graph in inductor's "reduce-overhead" mode (CUDA
# graphs); if that mode fails before the first evaluation, the script falls back to plain
# --compile for the time left. Each run is its own process and compiles for itself (inductor's
# on-disk cache shortens the later ones). Measured rates and session plans: docs/convergence.md.
# Writes to $OUT (default ./convergence-gpu): runs/PRESET-seedS/ (each run's pipeline, checkpoint,
# evaluations.jsonl and train.log: its training output), progress.jsonl, results.json, table.md,
# convergence.png and log.txt. A
# call stopped by its budget resumes the unfinished runs when called again; the report of a cut
# call is rebuilt from what the runs reached (runs cut short are left out of it), and progress
# files of several sessions merge with `compare_convergence.py --from_progress A B`.
#
#   bash scripts/gpu_convergence.sh mnist10k.npz                     # GPU
#   SPEEDIT_CONV_DRY=1 bash scripts/gpu_convergence.sh mnist10k.npz  # CPU: tiny DiT, 40 steps
#
# Settings (environment): SPEEDIT_CONV_PRESETS (default "uniform speed"),
# SPEEDIT_CONV_SEEDS ("0 1"), SPEEDIT_CONV_STEPS (10000), SPEEDIT_CONV_BATCH (64),
# SPEEDIT_CONV_EVAL_EVERY (1000), SPEEDIT_CONV_COMPILE_MODE (reduce-overhead), SPEEDIT_CONV_BUDGET_S
# (540, sized for one device call: the whole comparison is stopped then, and the report is
# rebuilt from the runs that finished; give 1800 for both seeds in one go).
set -uo pipefail

cd "$(dirname "$0")/.."
DATA="${1:-}"
if [ -z "$DATA" ] || [ ! -f "$DATA" ]; then
    echo "error: give the MNIST .npz (images uint8 (N, 28, 28), labels (N,)) as the first argument; got '${DATA}'." >&2
    exit 2
fi
OUT="${OUT:-$PWD/convergence-gpu}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
DRY="${SPEEDIT_CONV_DRY:-0}"
PRESETS="${SPEEDIT_CONV_PRESETS:-uniform speed}"
SEEDS="${SPEEDIT_CONV_SEEDS:-0 1}"
BUDGET="${SPEEDIT_CONV_BUDGET_S:-540}"
START=$(date +%s)
# offline settings, $PY, say, and diffusers from .whl/ when the image lacks it
source scripts/gpu_env.sh
# the log says why a graph was recompiled or ran without CUDA graphs
export TORCH_LOGS="${TORCH_LOGS:-recompiles,perf_hints}"

if [ "$DRY" = "1" ]; then
    MODEL=(--num_layers 1 --hidden_size 32 --num_attention_heads 2)
    STEPS="${SPEEDIT_CONV_STEPS:-40}"; EVERY="${SPEEDIT_CONV_EVAL_EVERY:-20}"; BATCH="${SPEEDIT_CONV_BATCH:-16}"
    DEVICE=(--device cpu --eval_samples_per_class 2 --eval_inference_steps 5)
    COMPILE=(${SPEEDIT_CONV_COMPILE_MODE:+--compile_mode "$SPEEDIT_CONV_COMPILE_MODE"})  # eager unless asked
else
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
    MODEL=(--num_layers 12 --hidden_size 384 --num_attention_heads 6)
    STEPS="${SPEEDIT_CONV_STEPS:-10000}"; EVERY="${SPEEDIT_CONV_EVAL_EVERY:-1000}"; BATCH="${SPEEDIT_CONV_BATCH:-64}"
    DEVICE=(--device cuda --mixed_precision bf16 --eval_samples_per_class 50 --eval_inference_steps 50)
    COMPILE=(--compile_mode "${SPEEDIT_CONV_COMPILE_MODE:-reduce-overhead}")
fi
read -r -a PRESET_LIST <<<"$PRESETS"
read -r -a SEED_LIST <<<"$SEEDS"
ARGS=(--train_data "$DATA" --resolution 32 --model S/2 "${MODEL[@]}" --presets "${PRESET_LIST[@]}"
      --seeds "${SEED_LIST[@]}" --batch_size "$BATCH" --learning_rate 1e-4 --ema_decay 0.999
      --max_steps "$STEPS" --eval_every "$EVERY" "${DEVICE[@]}" --output_dir "$OUT")
say "speedit convergence: dry=$DRY budget=${BUDGET}s $(date -u '+%Y-%m-%d %H:%M UTC')"
"$PY" -c "import torch, diffusers, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"
# run_compare SECONDS EXTRA_ARGS...: the comparison under a time limit; its exit status.
run_compare() {
    local limit="$1"; shift
    say "python scripts/compare_convergence.py ${ARGS[*]} $*"
    timeout --signal=INT --kill-after=20 "$limit" "$PY" scripts/compare_convergence.py "${ARGS[@]}" "$@" 2>&1 \
        | grep --line-buffered -v "Warning\|warn(\|possibly bad tiling" | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}
run_compare "$BUDGET" "${COMPILE[@]}"
STATUS=$?
LEFT=$((BUDGET - ($(date +%s) - START)))
evaluated() { cat "$OUT"/runs/*/evaluations.jsonl 2>/dev/null | grep -q step; }
if [ "$STATUS" -ne 0 ] && [ "${#COMPILE[@]}" -gt 0 ] && ! evaluated && [ "$LEFT" -gt 60 ]; then
    say "== ${COMPILE[*]} failed before the first evaluation (exit $STATUS): plain --compile for the ${LEFT}s left"
    run_compare "$LEFT" --compile
    STATUS=$?
fi
if [ "$STATUS" -ne 0 ]; then
    say "== stopped (exit $STATUS): rebuilding the report from the evaluations every run reached"
    if evaluated; then
        "$PY" scripts/compare_convergence.py "${ARGS[@]}" --collect 2>&1 | tee -a "$LOG"
    else
        say "no evaluation finished: nothing to report"
    fi
fi
say "done: $OUT/{table.md,convergence.png,results.json,progress.jsonl,log.txt}"
