# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""`--train_data` to a dataset: scikit-learn's digits, an `.npz`, or a latents folder."""

from __future__ import annotations

import os

from .datasets import TrainingDataset, load_digits_dataset, load_npz_images
from .latents import LatentDataset, is_latents_folder


def load_training_data(train_data: str, resolution: int | None = None) -> TrainingDataset:
    """`digits` (scikit-learn's bundled digits), a latents folder from `scripts/extract_latents.py`,
    or a path to an `.npz` of images (or latents) and labels."""
    if train_data == "digits":
        return load_digits_dataset(resolution or 8)
    if os.path.isdir(train_data):
        if not is_latents_folder(train_data):
            raise ValueError(
                f"--train_data {train_data!r} is a folder without manifest.json: turn images into a latents "
                "folder with scripts/extract_latents.py first, or give 'digits' or an .npz file."
            )
        dataset = LatentDataset(train_data)
        if resolution is not None and resolution not in (dataset.info["resolution"], dataset.sample_shape[-1]):
            raise ValueError(
                f"--resolution {resolution} does not match the latents folder, extracted at "
                f"{dataset.info['resolution']} ({dataset.sample_shape[-1]}x{dataset.sample_shape[-1]} latents): "
                "drop --resolution or extract again at that resolution."
            )
        return dataset
    if not train_data.endswith(".npz"):
        raise ValueError(
            f"--train_data {train_data!r} is not understood: give 'digits', a latents folder or an .npz file."
        )
    return load_npz_images(train_data, resolution)
