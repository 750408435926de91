# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The export of a trained transformer as a diffusers pipeline folder, with the training
scheduler's config beside it; and the same pipeline built from any training checkpoint."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from ..pipeline_speedit import SpeeDiTPipeline, training_sampler
from ..scheduling_speedit import SpeeDiTScheduler
from .checkpoints import TRAINING_SCHEDULER_FOLDER, checkpoint_transformer_folder, read_checkpoint_state


def inference_scheduler(training_scheduler: SpeeDiTScheduler, latent: bool):
    """The scheduler saved with the pipeline.

    Latent models get a DDIM scheduler with the training schedule, as DiT's Hub checkpoints do,
    so stock `DiTPipeline` loads and runs them. Pixel models get DDPM ancestral sampling with the
    learned variance, as DiT samples for evaluation.
    """
    if latent:
        return training_sampler(training_scheduler, "ddim", learned_variance=True, clip_sample=False)
    return training_sampler(training_scheduler, "ddpm", learned_variance=True, clip_sample=True)


def build_pipeline(
    transformer: DiTTransformer2DModel,
    training_scheduler: SpeeDiTScheduler,
    class_names: list[str],
    vae=None,
):
    id2label = {i: name for i, name in enumerate(class_names)}
    scheduler = inference_scheduler(training_scheduler, latent=vae is not None)
    if vae is None:
        return SpeeDiTPipeline(transformer=transformer, scheduler=scheduler, id2label=id2label)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipeline.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    return pipeline


def save_pipeline(pipeline, training_scheduler: SpeeDiTScheduler, output_dir: str) -> None:
    """Write the pipeline folder and, beside it, the SpeeDiT training-scheduler config."""
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    training_scheduler.save_pretrained(os.path.join(output_dir, TRAINING_SCHEDULER_FOLDER))


def pipeline_from_checkpoint(path: str, use_ema: bool = True, torch_dtype: torch.dtype | None = None, vae=None):
    """The pipeline a training checkpoint exports: what `train_dit.py` would have written had it
    stopped at that step (EMA weights unless `use_ema=False`). Latent checkpoints load the VAE
    their training recorded, unless `vae` is given."""
    state = read_checkpoint_state(path)
    folder = checkpoint_transformer_folder(path, use_ema)
    transformer = DiTTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype)
    training_scheduler = SpeeDiTScheduler.from_pretrained(os.path.join(path, TRAINING_SCHEDULER_FOLDER))
    if vae is None and state.get("vae"):
        vae = AutoencoderKL.from_pretrained(state["vae"], torch_dtype=torch_dtype)
    return build_pipeline(transformer, training_scheduler, state["class_names"], vae=vae)
