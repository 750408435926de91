#!/usr/bin/env bash
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
#
# The MNIST-32 convergence comparison on one GPU within one call: DiT-S/2 (12 layers, width 384,
# patch 2: 256 tokens, the sequence length of DiT-XL/2 on ImageNet latents), 10,000 steps per
# run, the (preset, seed) runs one after another in one process, seed-major. A compiled S/2 step
# is bound by the host at about 45 ms on an H100 (2026-11-27), and several processes on one GPU
# time-slice it badly (2026-11-26), so the runs compile the model and the loss as one graph in
# inductor's "reduce-overhead" mode: CUDA graphs, one launch for the forward pass and one for the
# backward instead of one per kernel. If that mode fails before the first evaluation, the script
# falls back to plain --compile for the time left. Measured on an H200 (2026-11-27): 13 ms per
# step with CUDA graphs (37 ms without), so a 10,000-step run with 10 evaluations takes about
# 175 s, plus about 50 s of compilation in a fresh machine's first run. The reported comparison
# (docs/convergence.md, Result 2) ran within one session's 15 device minutes as two calls,
# SPEEDIT_CONV_SEEDS=0 (445 s) and at once after it, machine still warm, SPEEDIT_CONV_SEEDS=1
# (391 s), merged with `compare_convergence.py --from_progress`. Writes to $OUT (default
# ./convergence-gpu): progress.jsonl (one line per evaluation, kept if the run is cut short),
# results.json, table.md, convergence.png and log.txt. Runs cut short are left out of the report;
# progress files of several sessions merge with `compare_convergence.py --from_progress A B`.
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
if [ "$STATUS" -ne 0 ] && [ "${#COMPILE[@]}" -gt 0 ] && [ ! -s "$OUT/progress.jsonl" ] && [ "$LEFT" -gt 60 ]; then
    say "== ${COMPILE[*]} failed before the first evaluation (exit $STATUS): plain --compile for the ${LEFT}s left"
    run_compare "$LEFT" --compile
    STATUS=$?
fi
if [ "$STATUS" -ne 0 ]; then
    say "== stopped (exit $STATUS): rebuilding the report from the evaluations every run reached"
    if [ -s "$OUT/progress.jsonl" ]; then
        cp "$OUT/progress.jsonl" "$OUT/progress-cut.jsonl"
        "$PY" scripts/compare_convergence.py "${ARGS[@]}" --from_progress "$OUT/progress-cut.jsonl" 2>&1 | tee -a "$LOG"
    else
        say "no evaluation finished: nothing to report"
    fi
fi
say "done: $OUT/{table.md,convergence.png,results.json,progress.jsonl,log.txt}"
