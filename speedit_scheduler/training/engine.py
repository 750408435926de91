# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The training engine: one SpeeD training step (timesteps and loss weights from the noise
scheduler, noise, label dropout, the forward pass and DiT's loss, backward, clipping, the
optimizer and LR steps, EMA), eager or compiled as one graph of model and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import DiTLoss
from ..models import drop_labels
from ..scheduling_speedit import SpeeDiTScheduler
from ..utils import seeded_generator


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
    generator = seeded_generator("training", state.seed, accelerator.process_index, micro_step, device=x_start.device)
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
