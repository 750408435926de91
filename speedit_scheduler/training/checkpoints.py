# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Crash-safe training checkpoints: written under a temporary name, renamed when complete, so a
kill at any point leaves the newest complete checkpoint as `latest`. Each checkpoint holds the
transformer's raw and EMA weights as diffusers model folders beside accelerate's optimizer, LR
scheduler and RNG state, and `training_state.json` (step, seed, what sampling it needs)."""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import pickle
import re
import shutil

import torch
from accelerate.utils import broadcast_object_list
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from diffusers import DiTTransformer2DModel

from ..cli import UserError, check_free_space, format_size
from ..models import save_timestep_sinusoid
from ..utils import atomic_write_json, file_sha256

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
RESUME_AFTER_FREEING = (
    "the earlier checkpoints are intact: free some space, then rerun with --resume_from_checkpoint latest"
)
MANIFEST_FILE = "manifest.json"  # every file of the checkpoint: size and SHA-256, written last
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
    estimated_bytes: int = 0,
) -> str:
    """Save the accelerate state (model, EMA, optimizer, LR scheduler, RNGs), `state` as
    `training_state.json` and the noise scheduler's config for `step`, crash-safely.

    Everything is written to `.tmp-checkpoint-N`, then `manifest.json` records every file's
    size and SHA-256, then the folder is renamed to `checkpoint-N` (atomic on one file system),
    then old checkpoints beyond `total_limit` are pruned. A kill at any point leaves the newest
    *complete* checkpoint as `latest`; a failed write (a full disk) removes the temporary folder.
    A full disk is found before writing where it can be: the checkpoint needs about the size of
    the newest one, or `estimated_bytes` before the first.
    """
    final = os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(checkpoints_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    needed = max(estimated_bytes, checkpoint_size(list_checkpoints(checkpoints_dir)[-1:]))
    if accelerator.is_main_process:
        os.makedirs(checkpoints_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        check_free_space(checkpoints_dir, needed, f"checkpoint-{step}", fix=RESUME_AFTER_FREEING)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if noise_scheduler is not None:
                noise_scheduler.save_pretrained(os.path.join(tmp, TRAINING_SCHEDULER_FOLDER))
            atomic_write_json(os.path.join(tmp, TRAINING_STATE_FILE), {"step": step, **state})
            write_manifest(tmp)
    except OSError as error:  # no space, no permission: no half-written folder stays behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise UserError(
                f"no space left in {checkpoints_dir} for checkpoint-{step} (about {format_size(needed)} needed, "
                f"{format_size(shutil.disk_usage(checkpoints_dir).free)} free); nothing half-written is left and "
                f"{RESUME_AFTER_FREEING}."
            ) from None
        raise
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files are not the ones it recorded (missing, truncated, changed, added)."""


def _checkpoint_files(folder: str) -> list[str]:
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != MANIFEST_FILE:
                files.append(relative.replace(os.sep, "/"))
    return sorted(files)


def write_manifest(folder: str) -> dict:
    """Record every file of a checkpoint folder (size, SHA-256) in its `manifest.json`."""
    files = {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": file_sha256(os.path.join(folder, name))}
        for name in _checkpoint_files(folder)
    }
    manifest = {"format": 1, "files": files}
    atomic_write_json(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


def verify_checkpoint(folder: str) -> None:
    """Raise DamagedCheckpointError (one line naming the file) unless every file the manifest
    records is there with its size and checksum, and no other file was added."""
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(manifest_path) as f:
            recorded = json.load(f)["files"]
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{folder} has no {MANIFEST_FILE}: it is incomplete or not a checkpoint") from None
    except (ValueError, KeyError, TypeError):
        raise DamagedCheckpointError(f"{manifest_path} is damaged (not the manifest JSON)") from None
    for name, entry in recorded.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DamagedCheckpointError(f"{path} is missing")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise DamagedCheckpointError(f"{path} is damaged ({size} bytes, {entry['size']} written)")
        if file_sha256(path) != entry["sha256"]:
            raise DamagedCheckpointError(f"{path} is damaged (its SHA-256 differs from the one written)")
    extra = sorted(set(_checkpoint_files(folder)) - set(recorded))
    if extra:
        raise DamagedCheckpointError(f"{os.path.join(folder, extra[0])} was not written with the checkpoint")


def checkpoint_size(checkpoints: list[str]) -> int:
    """Bytes the given checkpoint folders hold."""
    return sum(
        os.path.getsize(os.path.join(root, name)) for folder in checkpoints for root, _, names in os.walk(folder)
        for name in names
    )  # fmt: skip


def resolve_resume_checkpoint(resume_from: str | None, checkpoints_dir: str) -> str | None:
    """`latest` -> the newest *intact* checkpoint (None if there is none); damaged ones are named
    in a one-line warning and skipped. A named checkpoint must exist and be intact. Errors are
    one-line ValueErrors naming the folder or file and the fix."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(checkpoints_dir)
        damage = []
        for candidate in reversed(found):
            try:
                verify_checkpoint(candidate)
                return candidate
            except DamagedCheckpointError as error:
                logger.warning(f"skipping a damaged checkpoint: {error}")
                damage.append(str(error))
        if damage:
            raise DamagedCheckpointError(
                f"every checkpoint in {checkpoints_dir} is damaged (newest: {damage[0]}): "
                "move them away to start anew, or restore one from a copy."
            )
        return None
    if checkpoint_step(resume_from) is None or not os.path.isdir(resume_from):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} is not a checkpoint folder: "
            f"give 'latest' or a path like {os.path.join(checkpoints_dir, CHECKPOINT_PREFIX + '1000')}."
        )
    try:
        verify_checkpoint(resume_from)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(f"{error}: resume from another checkpoint (or 'latest')") from None
    return resume_from


def choose_resume_checkpoint(accelerator, resume_from: str | None, checkpoints_dir: str) -> str | None:
    """`resolve_resume_checkpoint` on the main process only (the checksums are read once), its
    answer or its error shared with every process, so that all of them stop or go together."""
    answer = [None, None]
    if accelerator.is_main_process:
        try:
            answer[0] = resolve_resume_checkpoint(resume_from, checkpoints_dir)
            if answer[0] is not None:
                check_pickled_state(answer[0])
        except ValueError as error:
            answer[1] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    if answer[1] is not None:
        raise ValueError(answer[1])
    return answer[0]


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
        save_timestep_sinusoid(model, folder)
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
                save_timestep_sinusoid(unwrapped, os.path.join(output_dir, TRANSFORMER_FOLDER))
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
