# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Convergence comparison of timestep presets: same model initialisation, same data order, same
per-step random streams, only the training scheduler differs. Used by
`scripts/compare_convergence.py`."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from diffusers import DiTTransformer2DModel

from ..data import ClassConditionalDataset, DeterministicOrder, TrainingDataset, load_training_data
from ..evaluation.metrics import FIDMetric, ReferenceClassifier
from ..losses import DiTLoss
from ..models import create_dit, disable_internal_label_dropout, null_class_label
from ..pipeline_speedit import SpeeDiTPipeline, training_sampler
from ..scheduling_speedit import SpeeDiTScheduler
from ..training.ema import create_ema
from ..training.engine import (
    ModelWithLoss,
    TimestepQuartileLoss,
    compile_model,
    mark_compiled_step,
    training_step_loss,
)
from ..utils import seeded_generator


@dataclass
class ComparisonConfig:
    presets: list[str] = field(
        default_factory=lambda: ["uniform", "speed", "speedit-v1", "min-snr", "p2", "logit-normal"]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    train_data: str = "digits"
    resolution: int | None = None
    model: str = "S/2"
    num_layers: int | None = 4
    hidden_size: int | None = 128
    num_attention_heads: int | None = 4
    batch_size: int = 64
    learning_rate: float = 1e-3
    ema_decay: float = 0.99  # short runs: a long EMA would still be dominated by the initialisation
    class_dropout_prob: float = 0.1
    max_steps: int = 1500
    eval_every: int = 250
    eval_samples_per_class: int = 50
    eval_inference_steps: int = 50
    guidance_scale: float = 1.0
    learn_sigma: bool = True  # DiT's learned variance and hybrid loss; False: epsilon-MSE only
    eval_sampler: str = "ddpm"  # "ddpm" (ancestral, DiT's evaluation) or "ddim"
    device: str = "cpu"
    mixed_precision: str = "no"  # "bf16" autocast on GPUs
    compile: bool = False  # torch.compile the training forward (GPUs: fuses DiT's small elementwise ops)
    compile_mode: str | None = None  # inductor's mode; "reduce-overhead" also captures CUDA graphs
    metric: str = "classifier"  # or "fid": ADM's FID/sFID/IS/precision/recall against reference_batch
    reference_batch: str | None = None  # ADM-format .npz of real images (scripts/evaluate.py --make_reference)
    inception_weights: str | None = None  # torch-fidelity's FID Inception weights file
    vae: str | None = None  # decodes latent data for the metric; default: the latents folder's VAE
    progress_path: str | None = None  # JSON lines appended at every evaluation (survives a kill)


class ClassifierMetric:
    """Frechet distance in the features of a classifier trained on the real images (lower is
    better) and the class accuracy of class-conditional samples."""

    primary = "frechet_distance"
    keys = ["frechet_distance", "accuracy"]

    def __init__(self, dataset: ClassConditionalDataset):
        if dataset.latent:
            raise ValueError(
                "the classifier metric needs pixel data: use --metric fid with --reference_batch for latent data."
            )
        self.classifier = ReferenceClassifier(dataset.samples.float() / 255.0, dataset.labels)

    def __call__(self, images: torch.Tensor, labels: list[int]) -> dict[str, float]:
        return {
            "frechet_distance": self.classifier.frechet_distance(images),
            "accuracy": self.classifier.accuracy(images, labels),
        }


def build_metric(config: ComparisonConfig, dataset: TrainingDataset):
    """The quality measure of a comparison: the digit classifier, or FID & co. through Inception."""
    if config.metric == "classifier":
        return ClassifierMetric(dataset)
    if config.metric == "fid":
        if not config.reference_batch:
            raise ValueError(
                "--metric fid needs --reference_batch REF.npz (make one with scripts/evaluate.py --make_reference)."
            )
        metric = FIDMetric(config.reference_batch, config.inception_weights, device=config.device)
        metric.keys = list(metric.lower_is_better)
        return metric
    raise ValueError(f"--metric {config.metric!r} is not one of 'classifier', 'fid'.")


def load_decoder(config: ComparisonConfig, dataset: TrainingDataset):
    """The VAE that turns generated latents into images for the metric (None for pixel data)."""
    if not dataset.latent:
        return None
    from diffusers import AutoencoderKL

    path = config.vae or getattr(dataset, "vae_name_or_path", None)
    if path is None:
        raise ValueError("latent .npz data does not say which VAE made it: pass --vae.")
    return AutoencoderKL.from_pretrained(path).to(config.device).eval()


@torch.no_grad()
def generate(
    model, scheduler: SpeeDiTScheduler, num_classes: int, per_class: int, config: ComparisonConfig, seed: int, vae=None
):
    learned = model.config.out_channels == 2 * model.config.in_channels
    sampler = training_sampler(scheduler, config.eval_sampler, learned_variance=learned, clip_sample=vae is None)
    pipeline = SpeeDiTPipeline(transformer=model, scheduler=sampler, vae=vae).to(config.device)
    pipeline.set_progress_bar_config(disable=True)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    generator = seeded_generator("evaluation", seed, device=config.device)
    images = pipeline(
        class_labels=labels,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.eval_inference_steps,
        generator=generator,
        output_type="pt",
    ).images
    return images.float().cpu(), labels


@torch.no_grad()
def denoising_error_by_region(
    model, scheduler: SpeeDiTScheduler, dataset: TrainingDataset, device: torch.device, num_samples: int = 256
) -> dict[str, float]:
    """The model's epsilon-MSE on the first `num_samples` real samples, one timestep each, evenly
    spread over [0, T), averaged per quarter of [0, T) (`mse_t_q1` lowest noise .. `mse_t_q4`
    highest). Fixed samples, timesteps and noise, so every preset and step is measured alike:
    this is where a preset's training has or has not spent its updates (SpeeD trains t >= 700
    about 7 times less often than uniform)."""
    num_samples = min(num_samples, len(dataset))
    batch = dataset.get_batch(torch.arange(num_samples), device=device)
    x_start, labels = batch["samples"], batch["class_labels"]
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, steps - 1, num_samples).round().long().to(device)
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    output = model(x_t, timestep=timesteps, class_labels=labels).sample
    mse = ((output[:, : x_start.shape[1]].float() - noise) ** 2).flatten(1).mean(1)
    quarters = TimestepQuartileLoss(steps, device)  # the trainer's per-quarter bookkeeping
    quarters.update(mse, timesteps)
    return {name.removeprefix("loss/"): value for name, value in quarters.read_and_reset().items()}


_compiled_modules: dict[tuple, tuple[torch.nn.Module, torch.nn.Module]] = {}


def _compiled_training_module(model, loss_fn: DiTLoss, device: torch.device, mode: str | None):
    """`(model, compiled ModelWithLoss of it)`, one pair per architecture, schedule and mode in
    a process: a later run copies its initial weights into the first run's model, in place, and
    so reuses the compiled graphs and recorded CUDA graphs (the same parameter addresses)
    instead of compiling again (about 20-60 s a run)."""
    key = (json.dumps(dict(model.config), sort_keys=True, default=str), loss_fn.tables["log_betas"].numpy().tobytes(),
           str(device), mode)  # fmt: skip
    if key not in _compiled_modules:
        _compiled_modules[key] = (model, compile_model(ModelWithLoss(model, loss_fn, device), mode))
        return _compiled_modules[key]
    cached_model, model_with_loss = _compiled_modules[key]
    cached_model.load_state_dict(model.state_dict())
    cached_model.zero_grad(set_to_none=True)
    return cached_model, model_with_loss


def train_one(preset: str, seed: int, config: ComparisonConfig, dataset: TrainingDataset, metric, vae=None) -> dict:
    """Train one preset from seed `seed`'s initialisation and evaluate its EMA at fixed steps."""
    device = torch.device(config.device)
    channels, size, _ = dataset.sample_shape
    model = create_dit(
        config.model,
        seed=seed,
        sample_size=size,
        in_channels=channels,
        num_classes=dataset.num_classes,
        learn_sigma=config.learn_sigma,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
    )
    disable_internal_label_dropout(model).to(device).train()
    scheduler = SpeeDiTScheduler.from_preset(preset)
    loss_fn = DiTLoss(scheduler)
    model_with_loss = None
    if config.compile or config.compile_mode is not None:
        model, model_with_loss = _compiled_training_module(model, loss_fn, device, config.compile_mode)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=0.0, fused=device.type == "cuda"
    )
    ema = create_ema(model, config.ema_decay)
    ema.to(device)
    order = DeterministicOrder(len(dataset), config.batch_size, 1, seed)
    null_label = null_class_label(model)
    eval_model = DiTTransformer2DModel.from_config(model.config).to(device).eval()
    if device.type == "cuda" and isinstance(dataset, ClassConditionalDataset):
        # small datasets live on the GPU: no host-to-device copy per step
        dataset.samples, dataset.labels = dataset.samples.to(device), dataset.labels.to(device)
    use_bf16 = config.mixed_precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = True

    history, start = [], time.perf_counter()
    since = (0, start)  # (step, time) of the last rate report or evaluation
    loss_sum, loss_count = torch.zeros((), device=device), 0  # on the device: no sync per step
    for step in range(1, config.max_steps + 1):
        batch = dataset.get_batch(
            order.indices(step - 1, 0), seeded_generator("data", seed, 0, step - 1), device=device
        )
        generator = seeded_generator("training", seed, 0, step - 1, device=device)
        mark_compiled_step(config.compile_mode)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = training_step_loss(
                model,
                scheduler,
                loss_fn,
                batch["samples"],
                batch["class_labels"],
                generator,
                config.class_dropout_prob,
                null_label,
                model_with_loss,
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        loss_sum += out.loss.detach().float()
        loss_count += 1
        if step % 100 == 0 and step % config.eval_every:
            if device.type == "cuda":
                torch.cuda.synchronize()  # every 100 steps: the rate is the GPU's, not the queue's
            now = time.perf_counter()
            rate = (step - since[0]) / (now - since[1])
            print(f"[{preset} seed {seed}] step {step}: {rate:.1f} steps/s since step {since[0]}", flush=True)
            since = (step, now)
        if step % config.eval_every == 0 or step == config.max_steps:
            eval_start = time.perf_counter()
            ema.copy_to(eval_model.parameters())
            images, labels = generate(
                eval_model, scheduler, dataset.num_classes, config.eval_samples_per_class, config, seed, vae
            )
            values = metric(images, labels)
            values.update(denoising_error_by_region(eval_model, scheduler, dataset, device))
            loss = (loss_sum / loss_count).item()
            loss_sum.zero_()
            loss_count = 0
            now = time.perf_counter()
            history.append({"step": step, "train_loss": loss, "seconds": now - start, "eval_seconds": now - eval_start,
                            **values})  # fmt: skip
            if config.progress_path:
                with open(config.progress_path, "a") as f:
                    f.write(json.dumps({"preset": preset, "seed": seed, **history[-1]}) + "\n")
            print(
                f"[{preset} seed {seed}] step {step}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items() if k != "step"),
                flush=True,
            )
            since = (step, time.perf_counter())
            if not math.isfinite(loss):
                raise FloatingPointError(f"{preset} seed {seed}: loss became NaN or inf before step {step}.")
    return {"preset": preset, "seed": seed, "history": history}


def _worker(args):
    preset, seed, config_dict, metric, threads = args
    # Several workers on one machine: split the cores instead of oversubscribing them.
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        config = ComparisonConfig(**config_dict)
        dataset = load_training_data(config.train_data, config.resolution)
        return train_one(preset, seed, config, dataset, metric, load_decoder(config, dataset))


def run_comparison(config: ComparisonConfig, num_workers: int = 1) -> list[dict]:
    """Every (preset, seed) run, one after the other or `num_workers` at a time.

    The metric (its classifier) is built once and shared, so every run is judged by the same one.
    """
    dataset = load_training_data(config.train_data, config.resolution)
    metric = build_metric(config, dataset)
    threads = max(1, (os.cpu_count() or 1) // max(1, num_workers))
    jobs = [(preset, seed, asdict(config), metric, threads) for seed in config.seeds for preset in config.presets]
    if num_workers <= 1:
        vae = load_decoder(config, dataset)
        return [train_one(preset, seed, config, dataset, metric, vae) for preset, seed, *_ in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(num_workers) as pool:
        return pool.map(_worker, jobs, chunksize=1)


def runs_from_progress(*paths: str) -> list[dict]:
    """Rebuild runs from progress files (several: runs made in different sessions), cut to the
    evaluation steps that every run reached. Runs that stopped before the furthest run's last
    evaluation (a comparison cut short) are left out, with a note on stderr."""
    runs: dict[tuple[str, int], dict[int, dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                key = (record.pop("preset"), record.pop("seed"))
                runs.setdefault(key, {})[record["step"]] = record  # a rerun of the same step replaces it
    if not runs:
        raise ValueError(f"no evaluations in {', '.join(paths)}: nothing to report.")
    last = max(max(steps) for steps in runs.values())
    complete = {key: steps for key, steps in runs.items() if max(steps) == last}
    for (preset, seed), steps in runs.items():
        if (preset, seed) not in complete:
            print(
                f"note: {preset} seed {seed} stopped at step {max(steps)} (others reached {last}): left out",
                file=sys.stderr,
            )
    common = set.intersection(*(set(steps) for steps in complete.values()))
    return [
        {"preset": preset, "seed": seed, "history": [steps[s] for s in sorted(common)]}
        for (preset, seed), steps in complete.items()
    ]


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def mean_curves(runs: list[dict], key: str) -> dict[str, dict[str, np.ndarray]]:
    """Per preset: steps, mean and standard deviation over seeds of `key`."""
    curves = {}
    for preset in dict.fromkeys(r["preset"] for r in runs):
        histories = [r["history"] for r in runs if r["preset"] == preset]
        steps = np.array([h["step"] for h in histories[0]])
        values = np.array([[h[key] for h in history] for history in histories])
        curves[preset] = {"steps": steps, "mean": values.mean(0), "std": values.std(0)}
    return curves


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float, lower_is_better: bool = True) -> float:
    """First (linearly interpolated) step at which a curve reaches `target`; inf if never."""
    sign = 1.0 if lower_is_better else -1.0
    v = sign * values
    t = sign * target
    if v[0] <= t:
        return float(steps[0])
    for i in range(1, len(steps)):
        if v[i] <= t:
            frac = (v[i - 1] - t) / (v[i - 1] - v[i])
            return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))
    return math.inf


def speedup_table(runs: list[dict], key: str, baseline: str = "uniform", lower_is_better: bool = True) -> list[dict]:
    """For every preset and evaluation step: its mean quality, and the speed-up = steps the
    baseline needs to reach that quality / steps the preset needed (inf: baseline never does;
    nan: the baseline was not run, as in a session that adds presets to merge later).
    `upper_bound` marks a quality the baseline already beat at its first evaluation: it got
    there at some unmeasured earlier step, so the speed-up is at most the value given."""
    curves = mean_curves(runs, key)
    base = curves.get(baseline)
    rows = []
    for preset, curve in curves.items():
        for step, mean, std in zip(curve["steps"], curve["mean"], curve["std"]):
            needed = steps_to_reach(base["steps"], base["mean"], mean, lower_is_better) if base else math.nan
            first = base["mean"][0] if base else math.nan
            upper_bound = bool(first < mean if lower_is_better else first > mean)
            rows.append(
                {
                    "preset": preset,
                    "step": int(step),
                    "mean": float(mean),
                    "std": float(std),
                    "baseline_steps": needed,
                    "speedup": needed / float(step),
                    "upper_bound": upper_bound,
                }
            )
    return rows


def markdown_table(runs: list[dict], metrics: list[str], baseline: str = "uniform") -> str:
    primary = metrics[0]
    rows = speedup_table(runs, primary, baseline)
    secondary = {m: mean_curves(runs, m) for m in metrics[1:]}
    header = f"| preset | step | {primary} (mean ± std) | " + " | ".join(f"{m}" for m in metrics[1:])
    header += f" | speed-up vs {baseline} |\n|" + " --- |" * (4 + len(metrics[1:])) + "\n"
    lines = []
    for row in rows:
        i = list(secondary[metrics[1]][row["preset"]]["steps"]).index(row["step"]) if metrics[1:] else 0
        extra = " | ".join(f"{secondary[m][row['preset']]['mean'][i]:.3f}" for m in metrics[1:])
        if math.isnan(row["speedup"]):
            speedup = f"no {baseline} run: merge one with --from_progress"
        elif math.isinf(row["speedup"]):
            speedup = "baseline never reaches it"
        elif row["upper_bound"]:
            speedup = f"<= {row['speedup']:.2f}x ({baseline} was better at its first evaluation)"
        else:
            speedup = f"{row['speedup']:.2f}x"
        lines.append(
            f"| {row['preset']} | {row['step']} | {row['mean']:.3f} ± {row['std']:.3f} | {extra} | {speedup} |"
        )
    return header + "\n".join(lines) + "\n"


def plot(runs: list[dict], metrics: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        for preset, curve in mean_curves(runs, metric).items():
            ax.plot(curve["steps"], curve["mean"], marker="o", label=preset)
            ax.fill_between(curve["steps"], curve["mean"] - curve["std"], curve["mean"] + curve["std"], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: list[dict], config: ComparisonConfig, output_dir: str, command: str, metrics: list[str]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"config": asdict(config), "command": command, "runs": runs}, f, indent=1)
    table = markdown_table(runs, metrics)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n{table}")
    plot(
        runs,
        metrics,
        os.path.join(output_dir, "convergence.png"),
        f"{config.train_data}: DiT {config.model} ({config.num_layers or 'preset'} layers, width "
        f"{config.hidden_size or 'preset'}), batch {config.batch_size}, seeds {config.seeds}, "
        f"{'hybrid loss' if config.learn_sigma else 'epsilon-MSE'}, {config.eval_sampler.upper()}-"
        f"{config.eval_inference_steps}, guidance {config.guidance_scale:g}",
    )
    print(table)
