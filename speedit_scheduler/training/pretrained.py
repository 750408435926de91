# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""A pretrained DiT to start training from: a pipeline folder (this project's export, a
converted original checkpoint, a Hub pipeline), a transformer folder, a train_dit.py checkpoint,
or a Hub id of any of these. Its weights initialise the transformer and its EMA."""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffusers import DiTTransformer2DModel

from ..models import load_dit
from ..utils import HUB_ID, download_snapshot
from .checkpoints import checkpoint_transformer_folder, is_training_checkpoint

# What a Hub repo must hold for fine-tuning: a pipeline's transformer (and its VAE), or a bare
# transformer folder at the top.
_HUB_PATTERNS = ["model_index.json", "transformer/*", "vae/*", "config.json", "*.safetensors"]


@dataclass
class PretrainedDiT:
    """Where the transformer's weights are, and the VAE folder beside them (pipelines only)."""

    name_or_path: str  # as the user gave it: the model card's base_model
    transformer_folder: str
    vae_folder: str | None


def locate_pretrained_dit(name_or_path: str, revision: str | None = None) -> PretrainedDiT:
    """Find the transformer folder of `name_or_path`, downloading a Hub id once (at `revision`).
    Errors are one-line ValueErrors naming the path and what was expected."""
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif os.path.exists(name_or_path) or not HUB_ID.fullmatch(name_or_path):
        raise ValueError(
            f"--pretrained_model_name_or_path {name_or_path!r} is not a folder or a Hub id (owner/name): give a "
            "pipeline folder, a transformer folder, a checkpoint-N folder or a Hub id."
        )
    else:
        folder = download_snapshot(name_or_path, revision, _HUB_PATTERNS, "--pretrained_model_name_or_path")
    if is_training_checkpoint(folder):
        return PretrainedDiT(name_or_path, checkpoint_transformer_folder(folder), None)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        vae = os.path.join(folder, "vae")
        transformer = os.path.join(folder, "transformer")
        if not os.path.isfile(os.path.join(transformer, "config.json")):
            raise ValueError(f"the pipeline {name_or_path!r} has no transformer/ folder: it is not a DiT pipeline.")
        return PretrainedDiT(name_or_path, transformer, vae if os.path.isdir(vae) else None)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return PretrainedDiT(name_or_path, folder, None)
    raise ValueError(
        f"--pretrained_model_name_or_path {name_or_path!r} holds no model_index.json (a pipeline) or config.json "
        "(a transformer folder): give a folder that diffusers' from_pretrained reads."
    )


def load_pretrained_dit(pretrained: PretrainedDiT) -> DiTTransformer2DModel:
    """The transformer with the pretrained weights; a one-line ValueError if it is no DiT."""
    config = DiTTransformer2DModel.load_config(pretrained.transformer_folder)
    if config.get("_class_name") not in (None, "DiTTransformer2DModel"):
        raise ValueError(
            f"{pretrained.name_or_path!r} holds a {config['_class_name']}, not a DiTTransformer2DModel: give a DiT."
        )
    return load_dit(pretrained.transformer_folder)  # with a converted original's timestep sinusoid


def check_pretrained_fits(model: DiTTransformer2DModel, name: str, sample_shape: tuple, num_classes: int) -> None:
    """One-line errors naming both sides when the data does not fit the pretrained model."""
    channels, size, _ = sample_shape
    config = model.config
    if size != config.sample_size:
        raise ValueError(
            f"{name!r} takes {config.sample_size}x{config.sample_size} inputs but the data samples are {size}x{size}: "
            "train on data of its size (or --resolution)."
        )
    if channels != config.in_channels:
        raise ValueError(f"{name!r} takes {config.in_channels} input channels but the data samples have {channels}.")
    if num_classes != config.num_embeds_ada_norm:
        raise ValueError(
            f"{name!r} has {config.num_embeds_ada_norm} classes but the data has {num_classes}: fine-tune on data "
            "with the same classes (its label table is not resized)."
        )
