# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Training data: the dataset interface the trainer uses (served by whole batches), the
in-memory class-conditional dataset of images or latents, and the deterministic data order
that makes a resumed run see exactly the samples an uninterrupted run would have seen. Latents
folders written by `scripts/extract_latents.py` are served by `latents.LatentDataset`; the
data randomness of a step (posterior samples, flips) comes from `seeded_generator("data", ...)`."""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

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

    def _check_labels(self, describe: Callable[[int], str] | None = None) -> None:
        """One-line error naming the first label outside [0, num_classes): an out-of-range label
        would index past the class embedding (or silently train the null class)."""
        describe = describe or (lambda index: f"sample {index}")
        outside = (self.labels < 0) | (self.labels >= self.num_classes)
        if bool(outside.any()):
            first = int(outside.nonzero()[0, 0])
            low, high = int(self.labels.min()), int(self.labels.max())
            raise ValueError(
                f"{describe(first)} has class label {int(self.labels[first])} (labels outside [0, {self.num_classes}): "
                f"{int(outside.sum())} of {len(self.labels)}, spanning [{low}, {high}]): labels must be class ids "
                f"0..{self.num_classes - 1} for the {self.num_classes} class names; fix the labels or the class names."
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
    source: str | None = None  # the file the data came from, named in error messages

    def __post_init__(self):
        where = f"{self.source!r}: " if self.source else ""
        if self.samples.ndim != 4:
            raise ValueError(f"{where}samples must have shape (N, C, H, W), got {tuple(self.samples.shape)}.")
        if len(self.samples) == 0:
            raise ValueError(f"{where}the dataset is empty: it holds no samples.")
        if self.samples.dtype != torch.uint8 and not self.samples.is_floating_point():
            raise ValueError(
                f"{where}samples are {self.samples.dtype}: give uint8 images in [0, 255] or floating latents."
            )
        if self.labels.shape != (len(self.samples),):
            raise ValueError(f"{where}labels have shape {tuple(self.labels.shape)}; expected ({len(self.samples)},).")
        if self.labels.is_floating_point() or self.labels.is_complex() or self.labels.dtype == torch.bool:
            raise ValueError(f"{where}labels are {self.labels.dtype}: class labels must be integers.")
        self.labels = self.labels.long()
        self._check_labels(self._describe)
        if self.samples.is_floating_point():
            self._check_finite()

    def _describe(self, index: int) -> str:
        return f"sample {index} of {self.source!r}" if self.source else f"sample {index} of the dataset"

    def _check_finite(self) -> None:
        """NaN or inf in a sample would only surface as a NaN loss, steps later: refuse it now.
        One vectorised pass, in blocks so the temporary stays small for large in-memory latents."""
        per_sample = max(1, self.samples[0].numel())
        block = max(1, (1 << 24) // per_sample)
        for start in range(0, len(self.samples), block):
            finite = torch.isfinite(self.samples[start : start + block]).flatten(1).all(dim=1)
            if not bool(finite.all()):
                first = start + int((~finite).nonzero()[0, 0])
                sample = self.samples[first]
                kind = "NaN" if bool(sample.isnan().any()) else "inf"
                count = sum(
                    int((~torch.isfinite(self.samples[s : s + block]).flatten(1).all(dim=1)).sum())
                    for s in range(start, len(self.samples), block)
                )
                raise ValueError(
                    f"{self._describe(first)} holds {kind} (samples not finite: {count} of {len(self.samples)}): "
                    "remove or repair it (this run would train on it)."
                )

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


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip
_NPY_MAGIC = b"\x93NUMPY"
_READ_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError, SyntaxError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def npz_array_names(path: str, expected: str) -> list[str]:
    """The array names of the .npz at `path`, after checking that it is one: an empty, truncated
    or non-zip file, or a zip without .npy members, is a one-line ValueError naming the file and
    `expected` (what it should hold, e.g. "save it with np.savez(path, images=..., labels=...)")."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path!r} is empty (0 bytes), not an .npz archive: {expected}.")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if not head.startswith(_ZIP_MAGICS):
        kind = "a single .npy array" if head == _NPY_MAGIC else "not a zip archive"
        raise ValueError(f"{path!r} is not an .npz archive ({kind}): {expected}.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except _READ_ERRORS as error:
        raise ValueError(
            f"{path!r} is a truncated or damaged .npz ({size} bytes; its zip directory cannot be read: "
            f"{_first_line(error)}): write it again; {expected}."
        ) from None
    arrays = [name[: -len(".npy")] for name in names if name.endswith(".npy")]
    if not arrays:
        what = f"holds only {names[:5]}" if names else "holds no arrays"
        raise ValueError(f"{path!r} is a zip archive that {what}, not an .npz written by np.savez: {expected}.")
    return arrays


def load_npz_arrays(
    path: str, keys: Sequence[str], expected: str, optional: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The arrays `keys` (required) and those of `optional` that exist, from the .npz at `path`.

    Read with `allow_pickle=False` and the dtype checked before any data is read: an object array
    is a pickle, and unpickling a file can run any code in it. A missing array, an object array, or
    a member that is truncated or damaged is a one-line ValueError naming the file and `expected`.
    """
    names = npz_array_names(path, expected)
    missing = [key for key in keys if key not in names]
    if missing:
        raise ValueError(f"{path!r} lacks the array(s) {missing} (it has {names}): {expected}.")
    wanted = list(keys) + [key for key in optional if key in names and key not in keys]
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key in wanted:
                info = archive.getinfo(key + ".npy")
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is not None:  # 3.0 (utf-8 field names): read_array's own check below
                        shape, _, dtype = read_header(f)
                        if dtype.hasobject:
                            raise _ObjectArray(key)
                        claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                        if claimed > info.file_size:
                            raise ValueError(f"{key!r} claims {claimed} bytes, the archive holds {info.file_size}")
                with archive.open(info) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    except _ObjectArray as error:
        raise ValueError(
            f"{path!r}: array {error.args[0]!r} is an object array (pickled Python objects), refused because "
            f"loading it could run code: save plain numeric arrays; {expected}."
        ) from None
    except _READ_ERRORS as error:
        if "allow_pickle" in str(error):  # numpy's own refusal of an object array (npy format 3.0)
            raise ValueError(
                f"{path!r} holds an object array (pickled Python objects), refused because loading it could "
                f"run code: save plain numeric arrays; {expected}."
            ) from None
        raise ValueError(
            f"{path!r} is a truncated or damaged .npz ({_first_line(error)}): write it again; {expected}."
        ) from None
    return arrays


class _ObjectArray(Exception):
    pass


NPZ_TRAINING_LAYOUT = (
    "save it with np.savez(path, images=uint8 N x H x W [x C], labels=int N) "
    "or np.savez(path, latents=float N x C x H x W, labels=int N)"
)


def load_npz_images(path: str, resolution: int | None = None) -> ClassConditionalDataset:
    """Images from an `.npz` with `images` (uint8, N x H x W or N x H x W x C) and `labels`, or
    pre-scaled VAE latents with `latents` (float, N x C x H x W) and `labels`.

    This is the format of MNIST in `mnist10k.npz`; `resolution` pads (28 -> 32 for MNIST).
    Optional `class_names` in the file name the classes, else they are "0", "1", ...
    Everything is checked before training (see `load_npz_arrays` and `ClassConditionalDataset`):
    a damaged file, object arrays, wrong dtypes or shapes, non-integer or out-of-range labels and
    NaN / inf latents are one-line errors naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--train_data {path!r} does not exist: give an .npz file or a latents folder.")
    names = npz_array_names(path, NPZ_TRAINING_LAYOUT)
    key = "latents" if "latents" in names else "images"
    missing = [k for k in (key, "labels") if k not in names]
    if missing:
        raise ValueError(
            f"{path!r} lacks the array(s) {missing} (it has {names}): it needs 'images' (or 'latents') and "
            f"'labels'; {NPZ_TRAINING_LAYOUT}."
        )
    data = load_npz_arrays(path, [key, "labels"], NPZ_TRAINING_LAYOUT, optional=["class_names"])
    images, labels = data[key], data["labels"]
    class_names = [str(c) for c in data["class_names"]] if "class_names" in data else None
    if key == "latents" and (images.ndim != 4 or not np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"{path!r}: latents must be floats of shape N x C x H x W, got {images.dtype} {images.shape}.")
    if key == "images" and images.dtype != np.uint8:
        raise ValueError(f"{path!r}: images must be uint8 in [0, 255], got {images.dtype}.")
    if key == "images" and not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))):
        raise ValueError(f"{path!r}: images have shape {images.shape}; expected N x H x W or N x H x W x C.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{path!r}: labels have shape {labels.shape}, expected ({len(images)},): one class id per {key[:-1]}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path!r}: labels are {labels.dtype}, expected integer class ids: save labels.astype(np.int64)."
        )
    if len(labels) == 0:
        raise ValueError(f"{path!r} holds no samples: {NPZ_TRAINING_LAYOUT}.")
    if class_names is None:
        class_names = [str(i) for i in range(max(int(labels.max()) + 1, 1))]
    if key == "latents":
        return ClassConditionalDataset(
            samples=torch.from_numpy(images.astype(np.float32)),
            labels=torch.from_numpy(labels.astype(np.int64)),
            class_names=class_names,
            latent=True,
            info={"dataset": os.path.basename(path)},
            source=path,
        )
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    images = _pad_images(images, resolution)
    return ClassConditionalDataset(
        samples=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
        info={"dataset": os.path.basename(path), "resolution": images.shape[-1]},
        source=path,
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
