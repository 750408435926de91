# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Training data: the dataset interface the trainer uses (served by whole batches), the
in-memory class-conditional dataset of images or latents, and the deterministic data order
that makes a resumed run see exactly the samples an uninterrupted run would have seen. Latents
folders written by `scripts/extract_latents.py` are served by `latents.LatentDataset`; the
data randomness of a step (posterior samples, flips) comes from `seeded_generator("data", ...)`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils import seeded_generator


class TrainingDataset:
    """What the trainer needs of a dataset: its size, sample shape, class names, and whole
    batches by index. `get_batch(indices, generator)` may draw per-step randomness (a latent
    posterior sample, a flip) from `generator`, which the trainer derives from the step so that
    resumed runs are exact."""

    class_names: list[str]
    labels: torch.Tensor
    latent: bool = False
    info: dict

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def get_batch(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """`samples` (N, C, H, W) float32 and `class_labels` (N,) int64, on `device` (default: CPU)."""
        raise NotImplementedError

    def _check_labels(self) -> None:
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"class labels span [{low}, {high}] but there are {self.num_classes} class names: "
                f"labels must lie in [0, {self.num_classes})."
            )

    def check_model_fits(self, sample_size: int, in_channels: int, num_classes: int) -> None:
        """One-line errors when the data and the model disagree, before any training."""
        c, h, w = self.sample_shape
        if h != w or h != sample_size:
            raise ValueError(
                f"data samples are {h}x{w} but the model expects {sample_size}x{sample_size}: "
                "set --resolution (or --sample_size) to match the data."
            )
        if c != in_channels:
            raise ValueError(f"data samples have {c} channels but the model expects {in_channels}.")
        if self.num_classes > num_classes:
            raise ValueError(f"the data has {self.num_classes} classes but the model only {num_classes}.")


@dataclass
class ClassConditionalDataset(TrainingDataset):
    """Samples (images in pixel space or VAE latents) with integer class labels, held in RAM.

    `samples` is uint8 images in [0, 255] (converted to [-1, 1] per batch) or floating latents
    already scaled by the VAE's scaling factor, shape (N, C, H, W). Batches are gathered by
    indexing, so there is no per-sample Python or file work.
    """

    samples: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    latent: bool = False
    info: dict = field(default_factory=dict)  # provenance recorded in checkpoints and model cards

    def __post_init__(self):
        if self.samples.ndim != 4:
            raise ValueError(f"samples must have shape (N, C, H, W), got {tuple(self.samples.shape)}.")
        if len(self.samples) == 0:
            raise ValueError("the dataset is empty: it holds no samples.")
        if self.labels.shape != (len(self.samples),):
            raise ValueError(f"labels have shape {tuple(self.labels.shape)}; expected ({len(self.samples)},).")
        self.labels = self.labels.long()
        self._check_labels()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.samples.shape[1:])

    def get_batch(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The samples at `indices`; no randomness (stored images are used as they are)."""
        indices = torch.as_tensor(indices).to(self.samples.device)
        samples = self.samples[indices].to(device or self.samples.device, non_blocking=True)
        if samples.dtype == torch.uint8:
            samples = samples.float().div_(127.5).sub_(1.0)
        labels = self.labels[indices].to(samples.device, non_blocking=True)
        return {"samples": samples.float(), "class_labels": labels}


def _pad_images(images: np.ndarray, size: int | None) -> np.ndarray:
    h, w = images.shape[-2:]
    if size is None or (h, w) == (size, size):
        return images
    if size < max(h, w):
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}: the target is smaller.")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((*images.shape[:-2], size, size), dtype=images.dtype)
    out[..., top : top + h, left : left + w] = images
    return out


def load_digits_dataset(resolution: int = 8) -> ClassConditionalDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), offline.

    Pixel values 0..16 become uint8 0..255; `resolution` > 8 pads with background.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    images = _pad_images(images, resolution)
    return ClassConditionalDataset(
        samples=torch.from_numpy(images),
        labels=torch.from_numpy(digits.target),
        class_names=[str(i) for i in range(10)],
        info={"dataset": "sklearn-digits", "resolution": resolution},
    )


def load_npz_images(path: str, resolution: int | None = None) -> ClassConditionalDataset:
    """Images from an `.npz` with `images` (uint8, N x H x W or N x H x W x C) and `labels`, or
    pre-scaled VAE latents with `latents` (float, N x C x H x W) and `labels`.

    This is the format of MNIST in `mnist10k.npz`; `resolution` pads (28 -> 32 for MNIST).
    Optional `class_names` in the file name the classes, else they are "0", "1", ...
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--train_data {path!r} does not exist: give an .npz file or a latents folder.")
    with np.load(path) as data:
        key = "latents" if "latents" in data.files else "images"
        missing = {key, "labels"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path!r} lacks the arrays {sorted(missing)}: it needs 'images' (or 'latents') and 'labels'."
            )
        images, labels = data[key], data["labels"]
        class_names = [str(c) for c in data["class_names"]] if "class_names" in data.files else None
    if key == "latents":
        if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"{path!r}: latents must be floats of shape N x C x H x W, got {images.dtype} {images.shape}."
            )
        if class_names is None:
            class_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        return ClassConditionalDataset(
            samples=torch.from_numpy(images.astype(np.float32)),
            labels=torch.from_numpy(labels.astype(np.int64)),
            class_names=class_names,
            latent=True,
            info={"dataset": os.path.basename(path)},
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{path!r}: images must be uint8 in [0, 255], got {images.dtype}.")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    else:
        raise ValueError(f"{path!r}: images have shape {images.shape}; expected N x H x W or N x H x W x C.")
    images = _pad_images(images, resolution)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ClassConditionalDataset(
        samples=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
        info={"dataset": os.path.basename(path), "resolution": images.shape[-1]},
    )


class DeterministicOrder:
    """Which samples each process trains on at each micro-step, as a pure function of the step.

    Each epoch is a permutation seeded by (seed, epoch); the global batch of micro-step s is the
    next `per_device_batch * num_processes` positions of that stream, and process r takes its
    slice. Resuming therefore needs no sampler state, no two processes ever train on the same
    sample in a step, and every sample is seen once per epoch.
    """

    def __init__(self, dataset_size: int, per_device_batch: int, num_processes: int, seed: int):
        self.dataset_size = dataset_size
        self.per_device_batch = per_device_batch
        self.num_processes = num_processes
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.pop(min(self._permutations))
            generator = seeded_generator("epoch", self.seed, epoch)
            self._permutations[epoch] = torch.randperm(self.dataset_size, generator=generator)
        return self._permutations[epoch]

    def indices(self, micro_step: int, process_index: int) -> torch.Tensor:
        start = (micro_step * self.num_processes + process_index) * self.per_device_batch
        positions = torch.arange(start, start + self.per_device_batch)
        epochs = positions // self.dataset_size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % self.dataset_size]
        return out
