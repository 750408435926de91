# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Latent datasets on disk: the folder `scripts/extract_latents.py` writes and the dataset that
trains from it.

A latents folder holds `manifest.json` and shards `shard-00000.safetensors`, ... Each shard has

- `moments`: (n, F, 2C, h, w), the VAE posterior of each image: channels [:C] are the mean and
  [C:] the standard deviation, *unscaled*; F = 2 when the horizontally flipped image was encoded
  too (index 1), else 1;
- `labels`: (n,) int64 class ids;
- `items`: (n,) int64, the position of each image in the source listing (for provenance).

Keeping the posterior instead of one sample keeps training random per step as DiT's trainer is:
every step draws a fresh latent `(mean + std * eps) * scaling_factor` and a random flip.

Shards are read through `numpy.memmap` views of the safetensors byte layout, so a batch is one
fancy-indexing copy per shard it touches: no per-sample file opens and no deserialisation, and
the OS page cache keeps hot shards in RAM.

Every shard's header, shapes, dtypes and labels are checked when the dataset is opened; its
moments (finite means, posterior std within what diffusers' log-variance clamp allows) the first
time a batch touches it, in one vectorised pass remembered per shard. Opening a folder thus
reads only headers and labels, and a damaged shard is named, with the fix, before it is trained on.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import torch
from safetensors.torch import save_file

from ..utils import atomic_output
from .datasets import TrainingDataset

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "speedit-latents"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_TO_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}
_STORAGE_TO_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# diffusers' DiagonalGaussianDistribution clamps the log-variance to [-30, 20], so a VAE posterior
# std lies in [exp(-15), exp(10)]. The check allows 1/8 either side for the storage rounding
# (float16 holds exp(-15) as a subnormal, up to ~10% off).
LOGVAR_RANGE = (-30.0, 20.0)
STD_RANGE = (math.exp(LOGVAR_RANGE[0] / 2) * (1 - 1 / 8), math.exp(LOGVAR_RANGE[1] / 2) * (1 + 1 / 8))
_CHECK_BLOCK_ELEMENTS = 1 << 22  # values per step of the shard check: bounded temporaries


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def is_latents_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} is not a latents folder (no {MANIFEST_NAME}): create one with scripts/extract_latents.py."
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})."
        )
    return manifest


def write_shard(
    path: str,
    moments: torch.Tensor,
    labels: torch.Tensor,
    items: torch.Tensor,
    dtype: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one shard atomically: a kill leaves either the complete file or none."""
    tensors = {
        "moments": moments.to(STORAGE_DTYPES[dtype]).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "items": items.to(torch.int64).contiguous(),
    }
    with atomic_output(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_shard_metadata(path: str) -> dict[str, str]:
    header, _ = _read_safetensors_header(path)
    return header.get("__metadata__", {})


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; a file too short for its
    header, or header bytes that are not a JSON object, is a one-line ValueError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path!r} is truncated or damaged: {size} bytes, too short for a safetensors header.")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"{path!r} is truncated or damaged: its header claims {length} bytes, the file has {size}."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path!r} is truncated or damaged: its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is truncated or damaged: its header is not a JSON object.")
    return header, 8 + length


def memmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read-only numpy views of every tensor in a safetensors file (bf16 as uint16 bits).

    Entries are checked against the file before mapping: a tensor whose bytes do not match its
    shape and dtype, or lie past the end of a truncated file, is a one-line ValueError naming it."""
    header, data_start = _read_safetensors_header(path)
    size = os.path.getsize(path)
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_TO_NUMPY.get(entry["dtype"])
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(v) for v in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path!r} is damaged: the header entry of tensor {name!r} is malformed.") from None
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
            raise ValueError(
                f"{path!r} is damaged: tensor {name!r} spans bytes [{begin}, {end}) but shape {list(shape)} of "
                f"{entry['dtype']} needs {expected}."
            )
        if data_start + end > size:
            raise ValueError(
                f"{path!r} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}."
            )
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    return arrays


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_float(values: np.ndarray, storage: str) -> np.ndarray:
    return _bfloat16_bits_to_float32(values) if storage == "bfloat16" else values.astype(np.float32)


# 16-bit storage is checked on its bits: numpy's float16 reductions are far slower than uint16
# ones (docs/benchmarks.md). Positive floats order as their bits do, and every negative or NaN std lies above the
# largest allowed one; a mean is finite when its exponent bits are not all ones.
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _std_bounds_as_bits(storage: str) -> tuple[int, int]:
    """The smallest and largest bit patterns of positive `storage` values within `STD_RANGE`."""
    positives = np.arange(_EXPONENT_BITS[storage], dtype=np.uint16)  # every finite value >= 0
    values = positives.view(np.float16) if storage == "float16" else _bfloat16_bits_to_float32(positives)
    values = values.astype(np.float64)  # compared with the bounds unrounded
    inside = np.flatnonzero((values >= STD_RANGE[0]) & (values <= STD_RANGE[1]))
    return int(inside[0]), int(inside[-1])


_STD_BITS = {storage: _std_bounds_as_bits(storage) for storage in _EXPONENT_BITS}


def _block_is_sane(values: np.ndarray, channels: int, storage: str) -> bool:
    """Whether a block of moments has finite means and stds in `STD_RANGE`: reductions only."""
    if storage in _EXPONENT_BITS:
        bits = values.view(np.uint16)
        mean, std = bits[:, :, :channels], bits[:, :, channels:]
        low, high = _STD_BITS[storage]
        if int(np.bitwise_and(mean, 0x7FFF).max()) >= _EXPONENT_BITS[storage]:
            return False
        return int(std.min()) >= low and int(std.max()) <= high
    mean, std = values[:, :, :channels], values[:, :, channels:]
    if not (np.isfinite(mean.min()) and np.isfinite(mean.max())):  # min / max propagate NaN
        return False
    return bool(std.min() >= STD_RANGE[0] and std.max() <= STD_RANGE[1])


def first_bad_moments(moments: np.ndarray, storage: str = "float32") -> tuple[int, str] | None:
    """The first sample of a shard's `moments` (n, F, 2C, h, w), stored as `storage`, that is not
    a sane VAE posterior, and what is wrong with it, or None. Sane: finite means; stds in
    `STD_RANGE`, what diffusers' log-variance clamp allows (this also refuses NaN, inf, zero and
    negative stds).

    One pass of min / max reductions per block of the memory map (16-bit storage: of its bits,
    with one masked copy of the means); only a block that fails is examined sample by sample."""
    channels = moments.shape[2] // 2
    per_sample = max(1, math.prod(moments.shape[1:]))
    block = max(1, _CHECK_BLOCK_ELEMENTS // per_sample)
    low, high = STD_RANGE
    for start in range(0, len(moments), block):
        values = moments[start : start + block]
        if _block_is_sane(values, channels, storage):
            continue
        values = _as_float(values, storage)
        for i in range(len(values)):
            m, s = values[i, :, :channels].astype(np.float64), values[i, :, channels:].astype(np.float64)
            for part, data in (("posterior mean", m), ("posterior std", s)):
                if np.isnan(data).any():
                    return start + i, f"holds NaN in its {part}"
                if np.isinf(data).any():
                    return start + i, f"holds inf in its {part}"
            outside = (s < low) | (s > high)
            if outside.any():
                value = float(s[outside][0])
                logvar = f"log-variance {2 * math.log(value):.3g}" if value > 0 else "no log-variance"
                return start + i, (
                    f"has a posterior std of {value:.3g} ({logvar}), outside diffusers' log-variance clamp "
                    f"[{LOGVAR_RANGE[0]:g}, {LOGVAR_RANGE[1]:g}]"
                )
    return None


class LatentDataset(TrainingDataset):
    """Training samples from a latents folder, with a fresh posterior sample and flip per draw.

    `get_batch(indices, generator)` returns `samples` = (mean + std * eps - shift) * scale for a
    random stored flip of each image, and its `class_labels`. All randomness comes from
    `generator` (a CPU generator), so a resumed run draws exactly what an uninterrupted one would.

    Opening checks every shard's header, shapes, dtype and labels against the manifest;
    `check_shards` (default on) checks each shard's moments the first time a batch touches it
    (`check_shard`), so NaN, inf or impossible stds fail with the shard's name before the step that
    would train on them, and a checked shard costs nothing more. Off only to measure the check.
    """

    latent = True

    def __init__(self, folder: str, check_shards: bool = True):
        manifest = read_manifest(folder)
        if not manifest.get("complete", False):
            raise ValueError(
                f"latents folder {folder!r} is incomplete (the extraction did not finish): rerun "
                "scripts/extract_latents.py with the same arguments to resume it."
            )
        self.folder = folder
        self.manifest = manifest
        self.class_names = list(manifest["class_names"])
        self.scaling_factor = float(manifest["vae"]["scaling_factor"])
        self.shift_factor = manifest["vae"].get("shift_factor")
        self.storage_dtype = manifest["dtype"]
        channels, height, width = manifest["latent_shape"]
        self._sample_shape = (channels, height, width)
        self.num_flips = 2 if manifest["flips"] else 1
        self.shard_files = [shard["file"] for shard in manifest["shards"]]

        self._moments: list[np.ndarray] = []
        labels, shard_of, offset = [], [], []
        for shard_index, shard in enumerate(manifest["shards"]):
            path = os.path.join(folder, shard["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"shard {shard['file']!r} listed in {os.path.join(folder, MANIFEST_NAME)!r} is missing: "
                    "rerun scripts/extract_latents.py with the same arguments to rebuild it."
                )
            try:
                arrays = memmap_safetensors(path)
            except ValueError as error:
                raise ValueError(f"latents shard {str(error).rstrip('.')}: {self._reextract(shard_index)}.") from None
            missing = [name for name in ("moments", "labels") if name not in arrays]
            if missing:
                raise ValueError(
                    f"latents shard {path!r} lacks the tensor(s) {missing}: {self._reextract(shard_index)}."
                )
            moments, shard_labels = arrays["moments"], arrays["labels"]
            expected = (shard["num_samples"], self.num_flips, 2 * channels, height, width)
            if moments.shape != expected:
                raise ValueError(
                    f"latents shard {path!r}: moments have shape {moments.shape}, the manifest says {expected}: "
                    f"{self._reextract(shard_index)}."
                )
            storage = _STORAGE_TO_NUMPY.get(self.storage_dtype)
            if moments.dtype != storage:
                raise ValueError(
                    f"latents shard {path!r}: moments are {moments.dtype}, the manifest says {self.storage_dtype}: "
                    f"{self._reextract(shard_index)}."
                )
            if shard_labels.shape != (shard["num_samples"],) or not np.issubdtype(shard_labels.dtype, np.integer):
                raise ValueError(
                    f"latents shard {path!r}: labels are {shard_labels.dtype} {shard_labels.shape}, expected "
                    f"({shard['num_samples']},) integers: {self._reextract(shard_index)}."
                )
            self._moments.append(moments)
            labels.append(np.asarray(shard_labels))
            shard_of.append(np.full(len(moments), shard_index, dtype=np.int32))
            offset.append(np.arange(len(moments), dtype=np.int64))
        if not self._moments or sum(len(m) for m in self._moments) == 0:
            raise ValueError(f"latents folder {folder!r} holds no samples.")
        self.labels = torch.from_numpy(np.concatenate(labels)).long()
        self._shard_of = np.concatenate(shard_of)
        self._offset = np.concatenate(offset)
        self._shard_start = np.concatenate([[0], np.cumsum([len(m) for m in self._moments])[:-1]])
        self.info = {
            "dataset": manifest.get("source", {}).get("name", os.path.basename(os.path.normpath(folder))),
            "resolution": manifest["resolution"],
            "vae": manifest["vae"]["name_or_path"],
            "scaling_factor": self.scaling_factor,
            "latents_dtype": self.storage_dtype,
            "flips": bool(manifest["flips"]),
        }
        self._check_labels(self._describe)
        # Which shards' moments passed `check_shard`; once all have, the hot path tests one int.
        self.check_shards = check_shards
        self._checked = np.zeros(len(self._moments), dtype=bool)
        self._num_unchecked = len(self._moments) if check_shards else 0

    def _describe(self, index: int) -> str:
        shard = int(self._shard_of[index])
        return (
            f"latents sample {index} (sample {int(self._offset[index])} of shard "
            f"{os.path.join(self.folder, self.shard_files[shard])!r})"
        )

    def _reextract(self, shard_index: int) -> str:
        """The fix for a bad shard: extraction skips the shard files that exist and redoes the rest."""
        return (
            f"delete {self.shard_files[shard_index]} and rerun scripts/extract_latents.py with the same arguments "
            "to re-extract just that shard (finished shards are kept)"
        )

    def check_shard(self, shard_index: int) -> None:
        """Check one shard's moments (finite means, stds within diffusers' log-variance clamp), once;
        a bad sample is a one-line ValueError naming the shard file, the sample's index in the folder
        and in the shard, and the fix. Reads the whole shard (it is then in the page cache)."""
        if self._checked[shard_index]:
            return
        bad = first_bad_moments(self._moments[shard_index], self.storage_dtype)
        if bad is not None:
            offset, problem = bad
            index = int(self._shard_start[shard_index]) + offset
            hint = (
                " (if it comes back, extract with --vae_dtype float32)" if "NaN" in problem or "inf" in problem else ""
            )
            raise ValueError(
                f"{self._describe(index)} {problem}: {self._reextract(shard_index)}{hint}; this run would train on it."
            )
        self._checked[shard_index] = True
        if self.check_shards:
            self._num_unchecked -= 1

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self._sample_shape

    @property
    def vae_name_or_path(self) -> str:
        return self.manifest["vae"]["name_or_path"]

    def gather_moments(self, indices: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """(n, 2C, h, w) posterior moments of `indices`, each with its chosen flip, in the storage
        dtype (converted to float32 on the training device, so fp16/bf16 storage also halves the
        bytes copied to it)."""
        shards = self._shard_of[indices]
        if self._num_unchecked:  # until every shard is checked: those of this batch not yet checked
            for shard in np.unique(shards[~self._checked[shards]]).tolist():
                self.check_shard(shard)
        offsets = self._offset[indices]
        out = np.empty((len(indices), *self._moments[0].shape[2:]), dtype=self._moments[0].dtype)
        if len(self._moments) == 1:
            out[:] = self._moments[0][offsets, flips]
        else:
            for shard in np.unique(shards):
                mask = shards == shard
                out[mask] = self._moments[shard][offsets[mask], flips[mask]]
        moments = torch.from_numpy(out)
        return moments.view(torch.bfloat16) if self.storage_dtype == "bfloat16" else moments

    def host_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The CPU side of `get_batch`: stored moments of a random flip of each sample, their
        labels, and the seed of the noise to draw on the training device."""
        indices = torch.as_tensor(indices).cpu()
        if self.num_flips == 2:
            flips = torch.randint(0, 2, (len(indices),), generator=generator)
        else:
            flips = torch.zeros(len(indices), dtype=torch.long)
        moments = self.gather_moments(indices.numpy(), flips.numpy())
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return moments, self.labels[indices], noise_seed

    def get_batch(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Scaled latents of `indices`, each a fresh posterior sample of a random stored flip.

        Flips and the noise seed come from `generator` (CPU); the moments are gathered on the
        CPU and the Gaussian noise is drawn on `device` (the training device), so a GPU run
        spends no CPU time on it and the batch is still a pure function of the generator.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        moments, labels, noise_seed = self.host_batch(indices, generator)
        if device.type != "cpu":
            moments = moments.pin_memory().to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        moments = moments.float()
        noise = torch.randn(
            moments[:, : moments.shape[1] // 2].shape,
            generator=torch.Generator(device=device).manual_seed(noise_seed),
            device=device,
        )
        mean, std = moments.chunk(2, dim=1)
        latents = mean.add_(std.mul_(noise))
        if self.shift_factor is not None:
            latents.sub_(self.shift_factor)
        return {"samples": latents.mul_(self.scaling_factor), "class_labels": labels}
