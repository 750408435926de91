# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Crash-safe training checkpoints: written under a temporary name, renamed when complete, so a
kill at any point leaves the newest complete checkpoint as `latest`."""

from __future__ import annotations

import json
import os
import re
import shutil

CHECKPOINT_PREFIX = "checkpoint-"


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


def save_checkpoint(accelerator, checkpoints_dir: str, step: int, state: dict, total_limit: int | None) -> str:
    """Save the accelerate state (model, optimizer, EMA, RNGs) for `step` crash-safely.

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
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
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
