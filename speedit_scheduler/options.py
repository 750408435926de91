# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The names the command lines offer, in one light module: scripts list them in `--help` and
check them before torch is imported. The modules that implement each choice import their names
from here, so the lists cannot drift."""

from __future__ import annotations

from typing import Literal, get_args

# DiT presets (models.py): depth, width, heads of each size, and the patch sizes.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}
DIT_PATCH_SIZES = (2, 4, 8)
DIT_PRESETS = tuple(f"{size}/{patch}" for size in DIT_SIZES for patch in DIT_PATCH_SIZES)


def dit_preset_of(depth: int, hidden: int, patch: int, heads: int | None = None) -> str | None:
    """The DiT preset of a model's shape (any heads unless `heads` is given), or None."""
    for size, (d, h, n) in DIT_SIZES.items():
        if (d, h) == (depth, hidden) and heads in (None, n):
            return f"{size}/{patch}"
    return None

# SpeeD's choices (scheduling_speedit.py).
TimestepSampling = Literal["uniform", "speed", "speedit-v1", "logit-normal"]
LossWeighting = Literal["none", "speed", "p2", "min-snr"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)

# Named recipes: a sampling and a weighting that belong together. `speed` and `speedit-v1` are
# the two published variants and are kept exactly as published (odd dual split, weight jump at tau).
PRESETS: dict[str, dict] = {
    "uniform": {"timestep_sampling": "uniform", "loss_weighting": "none"},
    "speed": {"timestep_sampling": "speed", "loss_weighting": "speed"},
    "speedit-v1": {"timestep_sampling": "speedit-v1", "loss_weighting": "p2", "p2_k": 1.0, "p2_gamma": 1.0},
    "min-snr": {"timestep_sampling": "uniform", "loss_weighting": "min-snr"},
    "p2": {"timestep_sampling": "uniform", "loss_weighting": "p2"},
    "logit-normal": {"timestep_sampling": "logit-normal", "loss_weighting": "none"},
}

# Samplers a pipeline can run (pipeline_speedit.SAMPLERS maps each to its diffusers scheduler).
SAMPLER_NAMES = (
    "ddpm", "ddim", "dpm-solver++", "dpm-solver", "unipc", "deis", "euler", "euler-ancestral", "heun", "kdpm2",
    "kdpm2-ancestral", "lms", "pndm",
)  # fmt: skip

# torch.compile's inductor modes (training/engine.py).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# What --evaluation_metric measures (evaluation/along_training.py) and the keys it records.
METRIC_KEYS = {"classifier": ["frechet_distance", "accuracy"], "fid": ["fid", "sfid", "is", "precision", "recall"]}
EVALUATION_METRICS = tuple(METRIC_KEYS)

# diffusers.optimization.SchedulerType's values (a test checks they agree).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)

# Trackers accelerate can log to here (the Python package each needs).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
REPORT_TO = (*TRACKERS, "all", "none")

# ADM's evaluator: Inception Score split size (50K samples in 10 splits) and the neighbourhood
# size of precision and recall (Kynkaanniemi et al.).
ADM_IS_SPLIT_SIZE = 5000
ADM_NEAREST_K = 3

# Floating dtypes by name (weights, latents storage, the VAE).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
