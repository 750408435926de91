# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
#
# Sourced by the one-call GPU scripts (gpu_benchmark.sh, gpu_convergence.sh) from the repository
# root, with LOG set: offline settings, the Python to use, `say` (print and log), and diffusers
# (and whatever else the device image lacks) installed from the wheels in .whl/, if any.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

say() { echo "$*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/speedit-site .whl/*.whl \
        >>"$LOG" 2>&1 || { say "error: installing .whl/*.whl failed (see log.txt)"; exit 1; }
    export PYTHONPATH="/tmp/speedit-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
