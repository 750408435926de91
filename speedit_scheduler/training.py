# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The pieces of the training loop that `train_dit.py` and the benchmarks share: the loss of one
training step, the per-step random generator, EMA, crash-safe checkpoints and the export to a
diffusers pipeline folder."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.training_utils import EMAModel

from .losses import DiTLoss
from .models import drop_labels
from .pipeline_speedit import SpeeDiTPipeline
from .scheduling_speedit import SpeeDiTScheduler

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_SCHEDULER_FOLDER = "training_scheduler"


@dataclass
class TrainingStepOutput:
    loss: torch.Tensor  # scalar to backpropagate (with CUDA graphs, the next step overwrites it)
    mse: torch.Tensor  # per-sample epsilon-MSE (unweighted), detached
    timesteps: torch.Tensor


class ModelWithLoss(torch.nn.Module):
    """The forward pass and DiT's loss as one module, so that `torch.compile` makes one graph of
    both: the loss's small elementwise kernels (about 60 forward, more backward) fuse into the
    model's, and with CUDA graphs the whole forward and the whole backward are one launch each,
    which is what a small model on a fast GPU needs. `forward` returns (loss, per-sample MSE).

    `model` is held, not copied: its parameters are the ones trained. The loss tables are put on
    `device` here, outside the graph, and marked static so CUDA graphs read them in place.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: DiTLoss, device: torch.device | str):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        for table in loss_fn.tables_on(device, torch.float32).values():
            torch._dynamo.mark_static_address(table)

    def forward(self, x_start, x_t, noise, timesteps, weights, class_labels) -> tuple[torch.Tensor, torch.Tensor]:
        out = _forward_and_loss(self.model, self.loss_fn, x_start, x_t, noise, timesteps, weights, class_labels)
        return out.loss, out.mse


def _forward_and_loss(model, loss_fn: DiTLoss, x_start, x_t, noise, timesteps, weights, class_labels):
    model_output = model(x_t, timestep=timesteps, class_labels=class_labels).sample
    return loss_fn(model_output, x_start, x_t, noise, timesteps, weights)


def training_step_loss(
    model: torch.nn.Module,
    scheduler: SpeeDiTScheduler,
    loss_fn: DiTLoss,
    x_start: torch.Tensor,
    class_labels: torch.Tensor,
    generator: torch.Generator,
    class_dropout_prob: float,
    null_label: int,
    model_with_loss: torch.nn.Module | None = None,
) -> TrainingStepOutput:
    """Loss of one SpeeD training step: timesteps and weights from the scheduler, noise, one
    label dropout per sample, the forward pass, and DiT's hybrid loss. All randomness comes from
    `generator`, so the step is reproducible. `model_with_loss` (a `ModelWithLoss` of `model` and
    `loss_fn`, compiled or not) computes the forward pass and the loss in their place."""
    device = x_start.device
    timesteps, weights = scheduler.sample_timesteps(x_start.shape[0], generator=generator, device=device)
    noise = torch.randn(x_start.shape, generator=generator, device=generator.device, dtype=x_start.dtype).to(device)
    labels = drop_labels(class_labels, class_dropout_prob, null_label, generator)
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    if model_with_loss is not None:
        loss, mse = model_with_loss(x_start, x_t, noise, timesteps, weights, labels)
        # a CUDA graph's output lives until the next replay: keep a copy
        return TrainingStepOutput(loss=loss, mse=mse.detach().clone(), timesteps=timesteps)
    out = _forward_and_loss(model, loss_fn, x_start, x_t, noise, timesteps, weights, labels)
    return TrainingStepOutput(loss=out.loss, mse=out.mse.detach(), timesteps=timesteps)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None, backend: str = "inductor") -> None:
    """One-line errors for a compile mode that torch.compile would refuse only when first called."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode {mode!r} is unknown: choose one of {', '.join(COMPILE_MODES)}.")
    if backend != "inductor":
        raise ValueError(f"--compile_mode is inductor's: drop it or use --compile_backend inductor, not {backend!r}.")


def compile_model(model: torch.nn.Module, mode: str | None = None, backend: str = "inductor") -> torch.nn.Module:
    """`torch.compile` for training. `mode` is inductor's: "reduce-overhead" and "max-autotune"
    also capture CUDA graphs, which removes the per-kernel launch cost of small models (call
    `mark_compiled_step(mode)` before every step then)."""
    check_compile_mode(mode, backend)
    return torch.compile(model, mode=mode) if mode is not None else torch.compile(model, backend=backend)


def uses_cuda_graphs(mode: str | None) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def mark_compiled_step(mode: str | None) -> None:
    """Tell CUDA graph trees that a new training step begins, so that the previous step's graph
    outputs may be overwritten. A no-op for eager models and modes without CUDA graphs."""
    if uses_cuda_graphs(mode):
        torch.compiler.cudagraph_mark_step_begin()


def step_generator(seed: int, process_index: int, micro_step: int, device: torch.device | str) -> torch.Generator:
    """The generator of one micro-step on one process: a pure function of (seed, process, step).

    Counter-based seeding makes every step's timesteps, noise and label dropout reproducible
    after a resume without storing generator state, and different on every process.
    """
    key = (seed * 1_000_003 + process_index) * 2_147_483_647 + micro_step
    return torch.Generator(device=device).manual_seed(key % (2**63 - 1))


class LerpEMAModel(EMAModel):
    """diffusers' `EMAModel` whose foreach update is one in-place `torch._foreach_lerp_`.

    The same average, shadow + (1 - decay) * (param - shadow), without `EMAModel.step`'s
    `_foreach_sub`, which allocates a full temporary copy of the parameters every step (2.7 GB
    for DiT-XL/2 in fp32). Frozen parameters, mixed dtypes and DeepSpeed ZeRO-3 take diffusers'
    own path.
    """

    @torch.no_grad()
    def step(self, parameters) -> None:
        if isinstance(parameters, torch.nn.Module) or not self.foreach:
            return super().step(parameters)
        parameters = list(parameters)
        plain = all(p.requires_grad and p.dtype == s.dtype for p, s in zip(parameters, self.shadow_params))
        if not plain or _deepspeed_zero3_enabled():
            return super().step(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        torch._foreach_lerp_(self.shadow_params, parameters, 1.0 - decay)


def _deepspeed_zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def create_ema(model: torch.nn.Module, decay: float) -> EMAModel:
    """DiT's EMA with diffusers' `EMAModel` (`LerpEMAModel`): a constant decay (min_decay =
    decay, no warm-up).

    diffusers copies the weights at the first update and applies `decay` from then on.
    """
    return LerpEMAModel(
        model.parameters(),
        decay=decay,
        min_decay=decay,
        update_after_step=0,
        use_ema_warmup=False,
        foreach=True,
        model_cls=type(model),
        model_config=model.config,
    )


class TimestepQuartileLoss:
    """Running sums of the per-sample MSE in each quarter of [0, T), kept on the device so that
    logging them costs no host sync until they are read."""

    def __init__(self, num_train_timesteps: int, device: torch.device):
        self.num_train_timesteps = num_train_timesteps
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)
        self.counts = torch.zeros(4, device=device, dtype=torch.float64)

    def update(self, mse: torch.Tensor, timesteps: torch.Tensor) -> None:
        quartile = (timesteps * 4 // self.num_train_timesteps).clamp_(0, 3)
        self.sums.index_add_(0, quartile, mse.to(torch.float64))
        self.counts.index_add_(0, quartile, torch.ones_like(mse, dtype=torch.float64))

    def read_and_reset(self) -> dict[str, float]:
        values = (self.sums / self.counts.clamp(min=1)).tolist()
        self.sums.zero_()
        self.counts.zero_()
        return {f"loss/mse_t_q{i + 1}": v for i, v in enumerate(values)}


@dataclass
class TrainerStepState:
    """Everything one step of `train_dit.py`'s loop reads or updates."""

    model: torch.nn.Module  # as prepared (and compiled) for the forward pass
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scheduler: SpeeDiTScheduler
    loss_fn: DiTLoss
    ema: object | None
    quartiles: TimestepQuartileLoss
    loss_sum: torch.Tensor
    first_bad_step: torch.Tensor
    class_dropout_prob: float
    null_label: int
    max_grad_norm: float
    seed: int


def run_trainer_step(
    accelerator, state: TrainerStepState, x_start: torch.Tensor, labels: torch.Tensor, micro_step: int, global_step: int
) -> TrainingStepOutput:
    """One micro-step of `train_dit.py`'s loop (and of the throughput benchmark): the step's generator,
    SpeeD timesteps, label dropout and hybrid loss under autocast, backward, clipping, AdamW,
    LR schedule, the device-side loss and quartile bookkeeping, and the EMA update. No host sync."""
    generator = step_generator(state.seed, accelerator.process_index, micro_step, x_start.device)
    with accelerator.accumulate(state.model):
        with accelerator.autocast():
            out = training_step_loss(
                state.model,
                state.scheduler,
                state.loss_fn,
                x_start,
                labels,
                generator,
                state.class_dropout_prob,
                state.null_label,
            )
        accelerator.backward(out.loss)
        if accelerator.sync_gradients and state.max_grad_norm > 0:
            accelerator.clip_grad_norm_(state.model.parameters(), state.max_grad_norm)
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    loss_detached = out.loss.detach()
    state.loss_sum += loss_detached
    state.quartiles.update(out.mse, out.timesteps)
    state.first_bad_step.copy_(
        torch.where(~torch.isfinite(loss_detached) & (state.first_bad_step < 0), global_step + 1, state.first_bad_step)
    )
    if state.ema is not None and accelerator.sync_gradients:
        state.ema.step(accelerator.unwrap_model(state.model).parameters())
    return out


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_step(path: str) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. Half-written ones live under a temporary name and a
    checkpoint only gets its final name by an atomic rename once it is complete."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(checkpoints_dir)]
    return [os.path.join(checkpoints_dir, name) for step, name in sorted(f for f in found if f[0] is not None)]


def save_checkpoint(accelerator, checkpoints_dir: str, step: int, state: dict, total_limit: int | None) -> str:
    """Save the accelerate state (model, optimizer, EMA, RNGs) for `step` crash-safely.

    Everything is written to `.tmp-checkpoint-N`, then renamed to `checkpoint-N` (atomic on one
    file system), then old checkpoints beyond `total_limit` are pruned. A kill at any point
    leaves the newest *complete* checkpoint as `latest`.
    """
    final = os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(checkpoints_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        os.makedirs(checkpoints_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume_checkpoint(resume_from: str | None, checkpoints_dir: str) -> str | None:
    """`latest` -> the newest complete checkpoint (None if there is none); a path must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    if checkpoint_step(resume_from) is None or not os.path.isdir(resume_from):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} is not a checkpoint folder: "
            f"give 'latest' or a path like {os.path.join(checkpoints_dir, CHECKPOINT_PREFIX + '1000')}."
        )
    return resume_from


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _scheduler_like(cls, training_scheduler: SpeeDiTScheduler, **overrides):
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in training_scheduler.config.items() if k in accepted}
    return cls(**{**config, **overrides, "timestep_spacing": "linspace"})


def learned_variance_scheduler(training_scheduler: SpeeDiTScheduler, clip_sample: bool) -> DDPMScheduler:
    """Ancestral DDPM sampling with the model's learned variance and DiT's even respacing."""
    return _scheduler_like(DDPMScheduler, training_scheduler, variance_type="learned_range", clip_sample=clip_sample)


def sampling_scheduler(
    training_scheduler: SpeeDiTScheduler, sampler: str, learned_variance: bool, clip_sample: bool
) -> DDPMScheduler | DDIMScheduler:
    """A sampler with the training schedule: "ddpm" (ancestral, the model's learned variance or
    the fixed posterior variance) or "ddim" (deterministic, eta = 0)."""
    if sampler == "ddpm":
        if learned_variance:
            return learned_variance_scheduler(training_scheduler, clip_sample)
        return _scheduler_like(DDPMScheduler, training_scheduler, variance_type="fixed_small", clip_sample=clip_sample)
    if sampler == "ddim":
        return _scheduler_like(DDIMScheduler, training_scheduler, clip_sample=clip_sample, set_alpha_to_one=False)
    raise ValueError(f"sampler {sampler!r} is unknown: use ddpm or ddim.")


def inference_scheduler(training_scheduler: SpeeDiTScheduler, latent: bool):
    """The scheduler saved with the pipeline.

    Latent models get a DDIM scheduler with the training schedule, as DiT's Hub checkpoints do,
    so stock `DiTPipeline` loads and runs them. Pixel models get DDPM ancestral sampling with the
    learned variance, as DiT samples for evaluation.
    """
    if latent:
        return _scheduler_like(DDIMScheduler, training_scheduler, clip_sample=False, set_alpha_to_one=False)
    return learned_variance_scheduler(training_scheduler, clip_sample=True)


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
