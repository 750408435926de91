# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Quality along training: what `train_dit.py --evaluation_steps N` measures on the EMA model and
appends to `evaluations.jsonl` in the output folder.

Two metrics: for pixel data, the Frechet distance in the features of a classifier trained on
the real images and that classifier's accuracy on class-conditional samples (`classifier`); for
any data with a reference batch, ADM's FID, sFID, IS, precision and recall (`fid`). Every
evaluation draws the same labels and noise (`seeded_generator("evaluation", seed)`), and also
records the model's epsilon-MSE per quarter of [0, T) on fixed real samples: where training did
or did not spend its updates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

from ..data import ClassConditionalDataset, TrainingDataset
from ..losses import TimestepQuartileLoss
from ..options import EVALUATION_METRICS, METRIC_KEYS  # noqa: F401 (re-exported)
from ..pipeline_speedit import SpeeDiTPipeline, training_sampler
from ..scheduling_speedit import SpeeDiTScheduler
from ..utils import atomic_write, seeded_generator
from .metrics import FIDMetric, ReferenceClassifier

EVALUATION_FILE = "evaluations.jsonl"
# what each metric records, the first being the one the comparison's speed-ups are read from


class ClassifierMetric:
    """Frechet distance in the features of a classifier trained on the real images (lower is
    better) and the class accuracy of class-conditional samples."""

    def __init__(self, dataset: TrainingDataset):
        if dataset.latent or not isinstance(dataset, ClassConditionalDataset):
            raise ValueError(
                "the classifier metric needs pixel data: use --evaluation_metric fid with --reference_batch "
                "for latent data."
            )
        self.classifier = ReferenceClassifier(dataset.samples.float() / 255.0, dataset.labels)

    def __call__(self, images: torch.Tensor, labels: list[int]) -> dict[str, float]:
        return {
            "frechet_distance": self.classifier.frechet_distance(images),
            "accuracy": self.classifier.accuracy(images, labels),
        }


def build_metric(
    metric: Literal["classifier", "fid"],
    dataset: TrainingDataset,
    reference_batch: str | None = None,
    inception_weights: str | None = None,
    device: torch.device | str = "cpu",
):
    """The quality measure: the classifier of the real images, or FID & co. through Inception."""
    if metric == "classifier":
        return ClassifierMetric(dataset)
    if metric == "fid":
        if not reference_batch:
            raise ValueError(
                "--evaluation_metric fid needs --reference_batch REF.npz "
                "(make one with scripts/evaluate.py --make_reference)."
            )
        return FIDMetric(reference_batch, inception_weights, device=device)
    raise ValueError(f"--evaluation_metric {metric!r} is not one of {', '.join(EVALUATION_METRICS)}.")


@dataclass(frozen=True)
class EvaluationSampling:
    """How an evaluation samples: `samples_per_class` samples of every class with the training
    schedule's `sampler` ("ddpm": ancestral with the learned variance when the model has one, as
    DiT evaluates; "ddim": deterministic), `batch_size` samples per pipeline call. The samples
    depend on the batch size (one noise stream, `seeded_generator("evaluation", seed)`, runs
    through the batches in order)."""

    samples_per_class: int
    sampler: str = "ddpm"
    guidance_scale: float = 1.0
    num_inference_steps: int = 50
    seed: int = 0
    batch_size: int = 500


@torch.no_grad()
def generate_samples(
    model,
    noise_scheduler: SpeeDiTScheduler,
    num_classes: int,
    sampling: EvaluationSampling,
    device: torch.device | str,
    vae=None,
) -> tuple[torch.Tensor, list[int]]:
    """The samples of one evaluation, in [0, 1], N x C x H x W on the CPU, and their labels."""
    learned = model.config.out_channels == 2 * model.config.in_channels
    scheduler = training_sampler(noise_scheduler, sampling.sampler, learned_variance=learned, clip_sample=vae is None)
    pipeline = SpeeDiTPipeline(transformer=model, scheduler=scheduler, vae=vae).to(device)
    pipeline.set_progress_bar_config(disable=True)
    labels = [c for c in range(num_classes) for _ in range(sampling.samples_per_class)]
    generator = seeded_generator("evaluation", sampling.seed, device=device)
    images = []
    for start in range(0, len(labels), sampling.batch_size):
        batch = pipeline(
            class_labels=labels[start : start + sampling.batch_size],
            guidance_scale=sampling.guidance_scale,
            num_inference_steps=sampling.num_inference_steps,
            generator=generator,
            output_type="pt",
        )
        images.append(batch.images.float().cpu())
    return torch.cat(images), labels


@torch.no_grad()
def denoising_error_by_region(
    model, noise_scheduler: SpeeDiTScheduler, dataset: TrainingDataset, device: torch.device, num_samples: int = 256
) -> dict[str, float]:
    """The model's epsilon-MSE on the first `num_samples` real samples, one timestep each, evenly
    spread over [0, T), averaged per quarter of [0, T) (`mse_t_q1` lowest noise .. `mse_t_q4`
    highest). Fixed samples, timesteps and noise, so every preset and step is measured alike:
    this is where a preset's training has or has not spent its updates (SpeeD trains t >= 700
    about 7 times less often than uniform)."""
    num_samples = min(num_samples, len(dataset))
    batch = dataset.get_batch(torch.arange(num_samples), device=device)
    x_start, labels = batch["samples"], batch["class_labels"]
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, steps - 1, num_samples).round().long().to(device)
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_t = noise_scheduler.add_noise(x_start, noise, timesteps)
    output = model(x_t, timestep=timesteps, class_labels=labels).sample
    mse = ((output[:, : x_start.shape[1]].float() - noise) ** 2).flatten(1).mean(1)
    quarters = TimestepQuartileLoss(steps, device)  # the trainer's per-quarter bookkeeping
    quarters.update(mse, timesteps)
    return {name.removeprefix("loss/"): value for name, value in quarters.read_and_reset().items()}


class TrainingEvaluator:
    """Measures a model (the EMA weights) with one metric and the per-region denoising error."""

    def __init__(
        self,
        metric,
        dataset: TrainingDataset,
        noise_scheduler: SpeeDiTScheduler,
        sampling: EvaluationSampling,
        device: torch.device | str,
        vae=None,
    ):
        self.metric = metric
        self.dataset = dataset
        self.noise_scheduler = noise_scheduler
        self.sampling = sampling
        self.device = torch.device(device)
        self.vae = vae

    def __call__(self, model) -> dict[str, float]:
        images, labels = generate_samples(
            model, self.noise_scheduler, self.dataset.num_classes, self.sampling, self.device, self.vae
        )
        values = self.metric(images, labels)
        values.update(denoising_error_by_region(model, self.noise_scheduler, self.dataset, self.device))
        return values


def read_evaluations(path: str) -> list[dict]:
    """The records of an `evaluations.jsonl` ([] if there is none yet)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressFile:
    """`evaluations.jsonl`: one JSON line per evaluation, appended as it is made (a kill loses
    nothing written). A run resumed from the checkpoint of step S keeps the lines of steps <= S,
    which were written before that checkpoint, and drops later ones, which it will make again:
    the file never has gaps or duplicates."""

    def __init__(self, path: str, resumed_step: int | None):
        self.path = path
        records = []
        if resumed_step is not None:
            records = [r for r in read_evaluations(path) if r["step"] <= resumed_step]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(path, lambda f: f.write(text.encode()))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
