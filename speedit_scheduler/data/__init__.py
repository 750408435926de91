# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Data: in-memory and on-disk latent datasets, their deterministic order, latent extraction
and class names."""

from .datasets import ClassConditionalDataset, DeterministicOrder, TrainingDataset, load_digits_dataset, load_npz_images
from .latents import LatentDataset, is_latents_folder
from .loading import load_training_data

__all__ = [
    "ClassConditionalDataset",
    "DeterministicOrder",
    "LatentDataset",
    "TrainingDataset",
    "is_latents_folder",
    "load_digits_dataset",
    "load_npz_images",
    "load_training_data",
]
