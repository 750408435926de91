# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Crash-safe training checkpoints: written under a temporary name, renamed when complete, so a
kill at any point leaves the newest complete checkpoint as `latest`. Each checkpoint holds the
transformer's raw and EMA weights as diffusers model folders beside accelerate's optimizer, LR
scheduler and RNG state, and `training_state.json` (step, seed, what sampling it needs)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from diffusers import DiTTransformer2DModel

from ..utils import atomic_write_json

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_SCHEDULER_FOLDER = "training_scheduler"  # the SpeeDiTScheduler config, in checkpoints and exports


def checkpoint_step(path: str) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. Half-written ones live under a temporary name and a
    checkpoint only gets its final name by an atomic rename once it is complete."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(checkpoints_dir)]
    return [os.path.join(checkpoints_dir, name) for step, name in sorted(f for f in found if f[0] is not None)]


def save_checkpoint(
    accelerator,
    checkpoints_dir: str,
    step: int,
    state: dict,
    total_limit: int | None,
    noise_scheduler=None,
) -> str:
    """Save the accelerate state (model, EMA, optimizer, LR scheduler, RNGs), `state` as
    `training_state.json` and the noise scheduler's config for `step`, crash-safely.

    Everything is written to `.tmp-checkpoint-N`, then renamed to `checkpoint-N` (atomic on one
    file system), then old checkpoints beyond `total_limit` are pruned. A kill at any point
    leaves the newest *complete* checkpoint as `latest`.
    """
    final = os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(checkpoints_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        os.makedirs(checkpoints_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if noise_scheduler is not None:
            noise_scheduler.save_pretrained(os.path.join(tmp, TRAINING_SCHEDULER_FOLDER))
        atomic_write_json(os.path.join(tmp, TRAINING_STATE_FILE), {"step": step, **state})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume_checkpoint(resume_from: str | None, checkpoints_dir: str) -> str | None:
    """`latest` -> the newest complete checkpoint (None if there is none); a path must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    if checkpoint_step(resume_from) is None or not os.path.isdir(resume_from):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} is not a checkpoint folder: "
            f"give 'latest' or a path like {os.path.join(checkpoints_dir, CHECKPOINT_PREFIX + '1000')}."
        )
    return resume_from


# accelerate's pickled files in a checkpoint (optimizer, LR scheduler, RNG states, grad scaler)
PICKLED_STATE_FILES = ("optimizer*.bin", "scheduler*.bin", "random_states_*.pkl", "scaler.pt", "sampler*.bin")


def check_pickled_state(checkpoint: str) -> None:
    """Refuse a checkpoint whose accelerate state files hold more than tensors and plain data.

    accelerate reads them with `torch.load(weights_only=True)`, which refuses code, but with a
    traceback that does not name the file; this reads each one the same way first (memory-mapped,
    so it costs no copy of the optimizer state) and raises a one-line ValueError naming it.
    Nothing in a refused file runs."""
    for pattern in PICKLED_STATE_FILES:
        for path in sorted(glob.glob(os.path.join(checkpoint, pattern))):
            try:
                with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise ValueError(
                    f"{path} holds more than tensors (a pickle that could run code): refused, nothing in it ran; "
                    "resume from a checkpoint you trust."
                ) from None
            except (RuntimeError, EOFError, OSError) as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
                raise ValueError(
                    f"{path} is damaged ({reason}): resume from another checkpoint or start anew."
                ) from None


# --------------------------------------------------------------------------------------------
# the transformer inside a checkpoint, in diffusers format
# --------------------------------------------------------------------------------------------
TRANSFORMER_FOLDER = "transformer"  # the trained (raw) weights
EMA_FOLDER = "transformer_ema"  # the EMA weights, which samples and exports use
EMA_STATE_FILE = "ema_state.json"  # beside the EMA weights: decay and update count


def save_ema_weights(model: torch.nn.Module, ema, folder: str) -> None:
    """`model.save_pretrained(folder)` with the EMA weights in place of the model's own, which
    are put back exactly afterwards; the EMA's decay and update count go to `ema_state.json`."""
    parameters = list(model.parameters())
    ema.store(parameters)
    try:
        ema.copy_to(parameters)
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        ema.restore(parameters)
    atomic_write_json(
        os.path.join(folder, EMA_STATE_FILE), {"decay": ema.decay, "optimization_step": ema.optimization_step}
    )


def load_ema_weights(ema, folder: str) -> None:
    """Load what `save_ema_weights` wrote into `ema`'s shadow parameters, in place."""
    loaded = DiTTransformer2DModel.from_pretrained(folder)
    with torch.no_grad():
        for shadow, param in zip(ema.shadow_params, loaded.parameters()):
            shadow.copy_(param)
    with open(os.path.join(folder, EMA_STATE_FILE)) as f:
        ema.optimization_step = json.load(f)["optimization_step"]


def register_checkpoint_hooks(accelerator, ema=None) -> None:
    """Make `accelerator.save_state` / `load_state` keep the transformer as diffusers folders:
    `transformer/` (raw) and `transformer_ema/` (EMA) instead of accelerate's `model.safetensors`
    and a pickled EMA, so that every checkpoint can be sampled and evaluated as it stands."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(os.path.join(output_dir, TRANSFORMER_FOLDER), safe_serialization=True)
                if ema is not None:
                    save_ema_weights(unwrapped, ema, os.path.join(output_dir, EMA_FOLDER))
        while weights:  # saved above: accelerate writes no model.safetensors
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = DiTTransformer2DModel.from_pretrained(os.path.join(input_dir, TRANSFORMER_FOLDER))
            model.load_state_dict(loaded.state_dict())
        if ema is not None:
            load_ema_weights(ema, os.path.join(input_dir, EMA_FOLDER))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def is_training_checkpoint(path: str) -> bool:
    """A `checkpoint-N` folder that train_dit.py wrote (with the transformer in diffusers format)."""
    return os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)) and os.path.isdir(
        os.path.join(path, TRANSFORMER_FOLDER)
    )


def read_checkpoint_state(path: str) -> dict:
    with open(os.path.join(path, TRAINING_STATE_FILE)) as f:
        return json.load(f)


def checkpoint_transformer_folder(path: str, use_ema: bool = True) -> str:
    """The EMA weights' folder when the checkpoint has one (and `use_ema`), else the raw weights'."""
    ema = os.path.join(path, EMA_FOLDER)
    return ema if use_ema and os.path.isdir(ema) else os.path.join(path, TRANSFORMER_FOLDER)
