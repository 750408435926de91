# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The reusable parts of `sample_dit.py`: class-name resolution, labelled grids, scheduler
choice, and mass sampling for FID that does not depend on the number of processes and resumes.

Mass sampling: sample `i` draws its class label (uniform over classes, as DiT's `sample_ddp.py`)
and all of its noise from a generator seeded by (seed, i), and shard `k` always holds samples
[k B, (k + 1) B) (B = batch size). Process r of W computes the shards k with k % W == r and
writes each one atomically (tmp + rename), so a killed run resumes by skipping the shards it
finds and the merged `samples_N.npz` is the same for any W.
"""

from __future__ import annotations

import difflib
import glob
import inspect
import json
import math
import os
import re

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageDraw, ImageFont

# --scheduler name -> (class, config overrides). All are built with `from_config` of the loaded
# scheduler's config, so they keep the model's training noise schedule.
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm-solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}


def build_scheduler(name: str, base_config, learned_variance: bool, clip_sample: bool | None = None):
    """Scheduler `name` (a key of SCHEDULERS) from the loaded scheduler's config.

    DDPM uses the model's learned variance (`learned_range`) when the model predicts one; every
    other scheduler ignores the variance channels (the pipeline drops them).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler {name!r} is unknown: choose one of {', '.join(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    overrides = dict(overrides)
    if cls is DDPMScheduler:
        overrides["variance_type"] = "learned_range" if learned_variance else "fixed_small"
        overrides["timestep_spacing"] = "linspace"
    elif "variance_type" in inspect.signature(cls.__init__).parameters:
        overrides["variance_type"] = None  # DPM-Solver would keep eps[:, :3]; the pipeline drops the variance
    if clip_sample is not None and "clip_sample" in base_config:
        overrides["clip_sample"] = clip_sample
    return cls.from_config(base_config, **overrides)


# --------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """Case-insensitive, `_` == space, runs of spaces collapsed."""
    return " ".join(name.replace("_", " ").lower().split())


def name_table(id2label: dict) -> dict[str, int]:
    """Normalised name -> class id, for every comma-separated synonym of every class."""
    table = {}
    for key, names in sorted(id2label.items(), key=lambda kv: int(kv[0])):
        for name in str(names).split(","):
            if normalize_name(name):
                table.setdefault(normalize_name(name), int(key))
    return table


def resolve_class_labels(tokens: list[str | int], id2label: dict | None, num_classes: int) -> list[int]:
    """Class ids of `tokens`: integers (range-checked) or class names resolved through id2label.

    Unknown names raise a one-line ValueError with the closest names (difflib).
    """
    table = name_table(id2label or {})
    ids = []
    for token in tokens:
        token = str(token).strip()
        if re.fullmatch(r"-?\d+", token):
            label = int(token)
            if not 0 <= label < num_classes:
                raise ValueError(f"class label {label} is out of range: the model has classes 0 to {num_classes - 1}.")
            ids.append(label)
            continue
        key = normalize_name(token)
        if key not in table:
            if not table:
                raise ValueError(f"class name {token!r} cannot be resolved: the model has no id2label; give class ids.")
            close = difflib.get_close_matches(key, list(table), n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match; give a class id."
            raise ValueError(f"unknown class name {token!r}: {hint}")
        ids.append(table[key])
    return ids


def short_label(label: int, id2label: dict | None) -> str:
    names = (id2label or {}).get(label, (id2label or {}).get(str(label)))
    return f"{label}: {str(names).split(',')[0].strip()}" if names else str(label)


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------
GRID_MIN_SIDE = 64  # small images (8x8 digits) are enlarged (nearest) to at least this side
CAPTION_HEIGHT = 14


def labelled_grid(images: list[Image.Image], captions: list[str], max_cols: int = 8) -> Image.Image:
    """A grid with one tile per image and its caption drawn under it.

    Tiles are the image enlarged by an integer factor to at least GRID_MIN_SIDE pixels, plus a
    CAPTION_HEIGHT strip; `min(len(images), max_cols)` columns.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"labelled_grid needs as many captions as images (got {len(images)} and {len(captions)}).")
    width, height = images[0].size
    scale = max(1, math.ceil(GRID_MIN_SIDE / min(width, height)))
    tile_w, tile_h = width * scale, height * scale
    cols = min(len(images), max_cols)
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tile_w, rows * (tile_h + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tile_w, (i // cols) * (tile_h + CAPTION_HEIGHT)
        grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y))
        while caption and draw.textlength(caption, font=font) > tile_w - 2:  # truncate to the tile
            caption = caption[:-1]
        draw.text((x + 1, y + tile_h + 1), caption, fill="black", font=font)
    return grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x C x H x W images in [0, 1] -> N x H x W x 3 uint8 (ADM evaluator layout).

    floor(255 y + 0.5), which is exactly DiT's `clamp(127.5 x + 128, 0, 255).to(uint8)` for
    x = 2 y - 1. Grey images are repeated to 3 channels (Inception wants RGB).
    """
    array = torch.clamp(255.0 * images.float() + 0.5, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(array, 3, axis=3) if array.shape[3] == 1 else array


# --------------------------------------------------------------------------------------------
# mass sampling
# --------------------------------------------------------------------------------------------
def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index`: its label, then all of its noise. CPU so that a
    sample is the same on any accelerator."""
    key = (seed * 1_000_003 + index) * 2_147_483_647 + 12_345
    return torch.Generator().manual_seed(key % (2**63 - 1))


def sample_labels_and_generators(
    seed: int, indices: range | list[int], num_classes: int
) -> tuple[list[int], list[torch.Generator]]:
    """Uniform class label of each sample index and its generator (advanced past the label)."""
    generators = [sample_generator(seed, i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in generators]
    return labels, generators


class ShardPlan:
    """Shard bookkeeping of a mass-sampling run in `sample_dir`."""

    def __init__(self, sample_dir: str, num_samples: int, batch_size: int):
        if num_samples < 1:
            raise ValueError(f"--num_samples {num_samples} must be at least 1.")
        if batch_size < 1:
            raise ValueError(f"--batch_size {batch_size} must be at least 1.")
        self.sample_dir = sample_dir
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_shards = math.ceil(num_samples / batch_size)
        self.shard_dir = os.path.join(sample_dir, "shards")

    def indices(self, shard: int) -> range:
        return range(shard * self.batch_size, min((shard + 1) * self.batch_size, self.num_samples))

    def path(self, shard: int) -> str:
        return os.path.join(self.shard_dir, f"{shard:06d}.npz")

    def is_done(self, shard: int) -> bool:
        return os.path.exists(self.path(shard))  # written by rename, so present means complete

    def todo(self, process_index: int, num_processes: int) -> list[int]:
        return [k for k in range(process_index, self.num_shards, num_processes) if not self.is_done(k)]

    @property
    def merged_path(self) -> str:
        return os.path.join(self.sample_dir, f"samples_{self.num_samples}.npz")

    def check_settings(self, settings: dict) -> None:
        """Record the run's settings, or refuse to mix shards of different settings."""
        os.makedirs(self.shard_dir, exist_ok=True)
        path = os.path.join(self.sample_dir, "sampling_settings.json")
        settings = json.loads(json.dumps(settings))  # normalise tuples etc.
        if os.path.exists(path):
            with open(path) as f:
                recorded = json.load(f)
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            if changed:
                raise ValueError(
                    f"--sample_dir {self.sample_dir!r} holds samples made with other settings ({', '.join(changed)}): "
                    "use a new --sample_dir or the same settings."
                )
            return
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))

    def write_shard(self, shard: int, images: np.ndarray, labels: list[int]) -> None:
        indices = np.asarray(self.indices(shard), dtype=np.int64)
        if len(images) != len(indices):
            raise ValueError(f"shard {shard} has {len(images)} images for {len(indices)} indices.")
        atomic_write(
            self.path(shard),
            lambda f: np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64), indices=indices),
        )

    def merge(self) -> str:
        """Concatenate the shards in index order into samples_N.npz (arr_0 uint8 NHWC, arr_1 labels)."""
        missing = [k for k in range(self.num_shards) if not self.is_done(k)]
        if missing:
            raise RuntimeError(f"cannot merge: shards {missing[:10]} of {self.num_shards} are missing; rerun to finish.")
        images, labels = [], []
        for k in range(self.num_shards):
            with np.load(self.path(k)) as shard:
                images.append(shard["images"])
                labels.append(shard["labels"])
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert len(images) == self.num_samples, (len(images), self.num_samples)
        atomic_write(self.merged_path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
        return self.merged_path

    def stray_tmp_files(self) -> list[str]:
        return glob.glob(os.path.join(self.shard_dir, "*.tmp"))


def atomic_write(path: str, write) -> None:
    """Write through `write(file)` to a temporary name, then rename: readers never see a half file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
