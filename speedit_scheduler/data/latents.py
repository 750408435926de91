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
"""

from __future__ import annotations

import json
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
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


def memmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read-only numpy views of every tensor in a safetensors file (bf16 as uint16 bits)."""
    header, data_start = _read_safetensors_header(path)
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_TO_NUMPY.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    return arrays


class LatentDataset(TrainingDataset):
    """Training samples from a latents folder, with a fresh posterior sample and flip per draw.

    `get_batch(indices, generator)` returns `samples` = (mean + std * eps - shift) * scale for a
    random stored flip of each image, and its `class_labels`. All randomness comes from
    `generator` (a CPU generator), so a resumed run draws exactly what an uninterrupted one would.
    """

    latent = True

    def __init__(self, folder: str):
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

        self._moments: list[np.ndarray] = []
        labels, shard_of, offset = [], [], []
        for shard_index, shard in enumerate(manifest["shards"]):
            path = os.path.join(folder, shard["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"shard {shard['file']!r} listed in {os.path.join(folder, MANIFEST_NAME)!r} is missing: "
                    "rerun scripts/extract_latents.py with the same arguments to rebuild it."
                )
            arrays = memmap_safetensors(path)
            moments = arrays["moments"]
            expected = (shard["num_samples"], self.num_flips, 2 * channels, height, width)
            if moments.shape != expected:
                raise ValueError(f"{path!r}: moments have shape {moments.shape}, the manifest says {expected}.")
            self._moments.append(moments)
            labels.append(np.asarray(arrays["labels"]))
            shard_of.append(np.full(len(moments), shard_index, dtype=np.int32))
            offset.append(np.arange(len(moments), dtype=np.int64))
        if not self._moments or sum(len(m) for m in self._moments) == 0:
            raise ValueError(f"latents folder {folder!r} holds no samples.")
        self.labels = torch.from_numpy(np.concatenate(labels)).long()
        self._shard_of = np.concatenate(shard_of)
        self._offset = np.concatenate(offset)
        self.info = {
            "dataset": manifest.get("source", {}).get("name", os.path.basename(os.path.normpath(folder))),
            "resolution": manifest["resolution"],
            "vae": manifest["vae"]["name_or_path"],
            "scaling_factor": self.scaling_factor,
            "latents_dtype": self.storage_dtype,
            "flips": bool(manifest["flips"]),
        }
        self._check_labels()

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
