# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Mass sampling for FID: many samples that do not depend on the number of processes, and resume.

Mass sampling: sample `i` draws its class label (uniform over classes, as DiT's `sample_ddp.py`)
and all of its noise from a generator seeded by (seed, i), and shard `k` always holds samples
[k B, (k + 1) B) (B = batch size). Process r of W computes the shards k with k % W == r and
writes each one atomically (tmp + rename), so a killed run resumes by skipping the shards it
finds and the merged `samples_N.npz` is the same for any W.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import zipfile

import numpy as np
import torch

from ..utils import atomic_write, file_sha256, seeded_generator


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
    return seeded_generator("sample", seed, index)


def sample_labels_and_generators(
    seed: int, indices: range | list[int], num_classes: int
) -> tuple[list[int], list[torch.Generator]]:
    """Uniform class label of each sample index and its generator (advanced past the label)."""
    generators = [sample_generator(seed, i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in generators]
    return labels, generators


def weights_fingerprint(files: list[str]) -> str:
    """SHA-256 over the given files' contents (and their order): what makes a sample folder's
    samples come from one model. A replaced model at the same path changes it."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.basename(path)}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."


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
                details = ", ".join(f"{k} {_short(recorded.get(k))} -> {_short(settings.get(k))}" for k in changed)
                raise ValueError(
                    f"--sample_dir {self.sample_dir!r} holds samples made with other settings ({details}): "
                    "use a new --sample_dir, or the same model and settings."
                )
            return
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))

    def check_written_shards(self) -> None:
        """Refuse, in one line, a finished shard that is damaged or holds pickled objects. Reads only
        each shard's zip directory and array headers, so it is cheap before a resumed run starts."""
        for k in range(self.num_shards):
            if not self.is_done(k):
                continue
            try:
                with zipfile.ZipFile(self.path(k)) as archive:
                    for name in ("images.npy", "labels.npy"):
                        with archive.open(name) as member:
                            major, _ = np.lib.format.read_magic(member)
                            read_header = np.lib.format.read_array_header_1_0 if major == 1 else (
                                np.lib.format.read_array_header_2_0
                            )  # fmt: skip
                            _, _, dtype = read_header(member)
                        if dtype.hasobject:
                            raise ValueError("allow_pickle")
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
                reason = "holds pickled objects" if "allow_pickle" in str(error) else f"is damaged ({error!s:.80})"
                raise ValueError(
                    f"sample shard {self.path(k)} {reason}: delete it and rerun the same command to redo that shard."
                ) from None

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
            raise RuntimeError(
                f"cannot merge: shards {missing[:10]} of {self.num_shards} are missing; rerun to finish."
            )
        images, labels = [], []
        for k in range(self.num_shards):
            try:  # no pickles: an object array is refused, not unpickled
                with np.load(self.path(k), allow_pickle=False) as shard:
                    images.append(shard["images"])
                    labels.append(shard["labels"])
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
                reason = "holds pickled objects" if "allow_pickle" in str(error) else f"is damaged ({error!s:.80})"
                raise ValueError(
                    f"sample shard {self.path(k)} {reason}: delete it and rerun the same command to redo that shard."
                ) from None
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert len(images) == self.num_samples, (len(images), self.num_samples)
        atomic_write(self.merged_path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
        return self.merged_path

    def stray_tmp_files(self) -> list[str]:
        return glob.glob(os.path.join(self.shard_dir, "*.tmp"))
