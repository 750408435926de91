#!/usr/bin/env bash
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
#
# The training-throughput sweep for one H100 / H200, in about 8 minutes, writing three files to
# $OUT (default ./bench-out): summary.md (tables, device, versions, commands), results.json (every
# row) and log.txt (everything printed). Run from anywhere:
#
#   bash scripts/gpu_benchmark.sh                      # GPU; diffusers from .whl/*.whl if present
#   SPEEDIT_BENCH_DRY=1 bash scripts/gpu_benchmark.sh  # CPU dry run: tiny models, same steps
#
# SPEEDIT_BENCH_BUDGET_S (default 480; 900 for the dry run) caps the whole script: a step starts only with its time
# left, and each configuration is capped (--config_timeout), so a slow compile costs its own row.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
DRY="${SPEEDIT_BENCH_DRY:-0}"
BUDGET="${SPEEDIT_BENCH_BUDGET_S:-$([ "$DRY" = "1" ] && echo 900 || echo 480)}"
START=$(date +%s)
LOG="$OUT/log.txt"
: >"$LOG"
# offline settings, $PY, say, and diffusers from .whl/ when the image lacks it
source scripts/gpu_env.sh

if [ "$DRY" = "1" ]; then
    # CPU-sized: every step of the real script, on a 2-layer DiT with 8x8 latents.
    COMMON=(--num_layers 2 --hidden_size 64 --num_attention_heads 2 --resolution 64 --device cpu --threads 1
            --precision fp32 --steps 1 --warmup 1 --repeats 2)
    XL_BATCHES="2,4"; XL_MAIN_BATCH=4; XL_COMPILE_BATCH=4; SMALL_BATCHES="8"; OVERHEAD_BATCH=4; CKPT_BATCH=8
    CAP_EAGER=120; CAP_COMPILE=300
    COMPILE_BACKEND=aot_eager  # dynamo + AOT autograd without inductor's C++ build: minutes on 2 busy cores
else
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
    COMMON=(--precision bf16 --steps 10 --warmup 3 --repeats 3)
    MEM_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)" 2>>"$LOG")
    if [ -z "$MEM_GIB" ]; then say "error: torch sees no CUDA GPU; use SPEEDIT_BENCH_DRY=1 on a CPU."; exit 1; fi
    # Compiled XL/2 needs about 0.27 GiB per image plus 14 GiB of weights, gradients, AdamW and EMA
    # state (48.6 GiB at batch 128, 66.5 GiB at 192 on an H100).
    if [ "$MEM_GIB" -gt 100 ]; then  # H200: room for batch 256 without checkpointing
        XL_BATCHES="32,64,256"; XL_COMPILE_BATCH=384
    else
        XL_BATCHES="32,64"; XL_COMPILE_BATCH=192
    fi
    XL_MAIN_BATCH=128; SMALL_BATCHES="64,256"; OVERHEAD_BATCH=64; CKPT_BATCH=256
    CAP_EAGER=60; CAP_COMPILE=200
    COMPILE_BACKEND=inductor
fi
say "speedit GPU benchmark: dry=$DRY budget=${BUDGET}s out=$OUT $(date -u '+%Y-%m-%d %H:%M UTC')"
"$PY" -c "import torch, diffusers, accelerate, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | tee -a "$LOG"

RUNS=()
# step NAME SECONDS_NEEDED ARGS...: run scripts/benchmark_throughput.py if the budget allows.
step() {
    local name="$1" need="$2"; shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$need" ]; then
        say "== $name: skipped (${left}s left, needs ${need}s)"
        return
    fi
    say "== $name ($(date -u +%H:%M:%S), ${left}s left): $*"
    local budget=()
    [ "$1" = "--sweep" ] && budget=(--time_budget $((left - 15)))  # a sweep stops its own groups in time
    local cap="${STEP_CAP:-$left}"; [ "$cap" -gt "$left" ] && cap="$left"
    timeout --signal=INT --kill-after=15 "$cap" "$PY" scripts/benchmark_throughput.py "$@" "${budget[@]}" \
        --json "$WORK/$name.json" 2>&1 | tee -a "$LOG"
    say "== $name: exit ${PIPESTATUS[0]}"
    RUNS+=("$name")
}

# Most important first: the production configuration (XL/2, bf16, SDPA), eager then compiled, each
# with a profile of where its step spends the time; then S/2 (the convergence runs' model), the
# batch scaling of XL/2, and the options.
step xl2_eager_profile 60 --model XL/2 --batch_size "$XL_MAIN_BATCH" --profile 3 "${COMMON[@]}"
STEP_CAP=$CAP_COMPILE step xl2_compile_profile 150 --model XL/2 --batch_size "$XL_COMPILE_BATCH" --compile on --compile_backend "$COMPILE_BACKEND" --profile 3 "${COMMON[@]}"
step s2 60 --sweep --model S/2 --batch_size "$SMALL_BATCHES" --compile off,on --compile_backend "$COMPILE_BACKEND" "${COMMON[@]}" --config_timeout "$CAP_COMPILE"
step xl2_eager 40 --sweep --model XL/2 --batch_size "$XL_BATCHES" "${COMMON[@]}" --config_timeout "$CAP_EAGER"
step xl2_overhead 40 --model XL/2 --batch_size "$OVERHEAD_BATCH" --overhead "${COMMON[@]}"
step xl2_no_ema 30 --sweep --model XL/2 --batch_size "$XL_MAIN_BATCH" --ema none "${COMMON[@]}" --config_timeout "$CAP_EAGER"
step xl2_checkpointing 40 --sweep --model XL/2 --batch_size "$CKPT_BATCH" --gradient_checkpointing on "${COMMON[@]}" --config_timeout "$CAP_EAGER"

# Merge: results.json (every run's JSON) and summary.md (a table per run with its command).
"$PY" - "$WORK" "$OUT" "${RUNS[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
sys.path.insert(0, "scripts")
from benchmark_throughput import format_header, markdown_table

work, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
runs, lines = {}, ["# speedit training throughput", ""]
for name in names:
    path = os.path.join(work, f"{name}.json")
    if not os.path.exists(path):
        lines += [f"## {name}", "", "no result (see log.txt)", ""]
        continue
    with open(path) as f:
        runs[name] = json.load(f)
header = next((r for r in runs.values() if "environment" in r), None)
if header is not None:
    lines += ["```", format_header(header), "```", ""]
for name, result in runs.items():
    lines += [f"## {name}", "", f"`{result['command']}`", "", markdown_table(result["rows"]), ""]
    if "profile" in result:
        from speedit_scheduler.tools.benchmarking import format_profile
        lines += [format_profile(result["profile"]), ""]
    for row in result["rows"]:
        if "overhead" in row:
            lines += [f"overhead of the trainer step over the bare step: {100 * row['overhead']:+.1f}% "
                      f"(trainer {row['trainer_step_ms']:.1f} ms, bare {row['bare_step_ms']:.1f} ms)", ""]
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(runs, f, indent=2)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines))
print("\n".join(lines))
EOF
rm -rf "$WORK"
say "done in $(($(date +%s) - START)) s: $OUT/summary.md, $OUT/results.json, $OUT/log.txt"
