# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""What a run was configured with, kept in every checkpoint, so that a resume tells the truth.

A resumed run must continue the state the checkpoint holds. Flags that shape that state (the
model, the data, SpeeD's preset and its parameters, the batch, the processes, the precision, the
optimiser's and EMA's constants, the seed of every random stream) cannot change on resume: a
change is refused in one line naming the flag and both values. Flags that only steer the rest of
the run (learning rate and its schedule, the step budget, logging, checkpointing, validation,
evaluation) may change: the new values are applied, the new learning rate reaches the optimiser,
and each stretch of steps with its own values is recorded as a *segment* for the tracker and the
model card.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# The trainer's flags that override the SpeeD preset's parameters (`SpeeDiTScheduler.from_preset`).
NOISE_SCHEDULER_FLAGS = (
    "timestep_sampling",
    "loss_weighting",
    "speed_k",
    "speed_tau",
    "speed_lambda",
    "p2_k",
    "p2_gamma",
)

# Flags (and derived values) whose change would make the resumed run a different run.
STATE_SHAPING = (
    "data",  # a fingerprint of the training data (see `dataset_fingerprint`), not its path
    "resolution",
    "pretrained_vae_model_name_or_path",
    "pretrained_model_name_or_path",
    "revision",
    "model",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "learn_sigma",
    "speedit",
    *NOISE_SCHEDULER_FLAGS,
    "snr_gamma",
    "dual_sampling",
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
    "mixed_precision",
    "seed",
    "use_ema",
    "ema_decay",
    "class_dropout_prob",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
)

# Flags that may change on resume; each change starts a new segment.
CHANGEABLE = (
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_train_steps",
    "logging_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "validation_steps",
    "validation_guidance_scale",
    "validation_inference_steps",
    "validation_images_per_class",
    "evaluation_steps",
    "evaluation_metric",
    "evaluation_samples_per_class",
    "evaluation_sampler",
    "evaluation_guidance_scale",
    "evaluation_inference_steps",
    "evaluation_batch_size",
    "reference_batch",
    "inception_weights",
)


def dataset_fingerprint(dataset) -> str:
    """What identifies the training data independently of where it lies: size, sample shape,
    class names and a hash of the labels (cheap even for ImageNet's 1.28M labels)."""
    labels = np.ascontiguousarray(dataset.labels.cpu().numpy() if hasattr(dataset.labels, "cpu") else dataset.labels)
    digest = hashlib.sha256(labels.astype(np.int64).tobytes())
    digest.update("\0".join(dataset.class_names).encode())
    shape = "x".join(str(d) for d in dataset.sample_shape)
    return f"{len(dataset)} samples of {shape}, {dataset.num_classes} classes, labels {digest.hexdigest()[:16]}"


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def check_resume_config(recorded: dict, current: dict, checkpoint: str, keys=STATE_SHAPING) -> None:
    """Raise ValueError naming the first state-shaping flag whose value differs from the
    checkpoint's. Flags absent on both sides (None: left at their default) are equal."""
    for key in keys:
        old, new = recorded.get(key), current.get(key)
        if not _same(old, new):
            flag = "the training data" if key == "data" else f"--{key}"
            raise ValueError(
                f"{flag} is {new!r} but {checkpoint} was trained with {old!r}: it shapes the saved state, so a "
                f"resumed run must keep it (pass {old!r}, or start a new run in another --output_dir)."
            )


def changed_values(recorded: dict, current: dict) -> dict[str, list]:
    """The changeable flags whose value differs from the checkpoint's: {flag: [old, new]}."""
    return {
        key: [recorded.get(key), current.get(key)]
        for key in CHANGEABLE
        if not _same(recorded.get(key), current.get(key))
    }


def segment_values(config: dict) -> dict:
    return {key: config.get(key) for key in CHANGEABLE if config.get(key) is not None}


def extend_segments(segments: list[dict] | None, current: dict, from_step: int) -> list[dict]:
    """The run's segments with the one that starts at `from_step` (values of `current`).
    A resume that changes nothing continues the last segment."""
    segments = [dict(s) for s in (segments or [])]
    values = segment_values(current)
    if segments and segments[-1]["values"] == values:
        return segments
    return [*segments, {"from_step": from_step, "values": values}]


def apply_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """After `load_state`, make `learning_rate` the base of the schedule the current flags built.

    Loading restores the optimiser's and the LR scheduler's recorded base rate; the schedule's
    shape (type, warm-up, total steps) comes from the current flags, its position from the
    checkpoint. The rate in effect is recomputed at that position."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler
    inner.base_lrs = [learning_rate for _ in inner.base_lrs]
    for group, factor in zip(optimizer.param_groups, inner.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
