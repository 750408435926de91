# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The training engine: one SpeeD training step (timesteps and loss weights from the noise
scheduler, noise, label dropout, the forward pass and DiT's loss, backward, clipping, the
optimizer and LR steps, EMA), eager or compiled as one graph of model and loss.

`TrainingEngine.step` is the only training step in the project: `train_dit.py` runs it, the
convergence comparison runs `train_dit.py`, and the throughput benchmark times it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import DiTLoss, TimestepQuartileLoss
from ..models import drop_labels
from ..options import COMPILE_MODES  # noqa: F401 (re-exported)
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
    noise_scheduler: SpeeDiTScheduler,
    loss_fn: DiTLoss,
    x_start: torch.Tensor,
    class_labels: torch.Tensor,
    generator: torch.Generator,
    class_dropout_prob: float,
    null_label: int,
    model_with_loss: torch.nn.Module | None = None,
) -> TrainingStepOutput:
    """Loss of one SpeeD training step: timesteps and weights from the noise scheduler, noise, one
    label dropout per sample, the forward pass, and DiT's hybrid loss. All randomness comes from
    `generator`, so the step is reproducible. `model_with_loss` (a `ModelWithLoss` of `model` and
    `loss_fn`, compiled or not) computes the forward pass and the loss in their place."""
    device = x_start.device
    # SpeeD's one change to DiT: which timesteps a batch trains on, and how much each one's loss counts.
    timesteps, weights = noise_scheduler.sample_timesteps(x_start.shape[0], generator=generator, device=device)
    noise = torch.randn(x_start.shape, generator=generator, device=generator.device, dtype=x_start.dtype).to(device)
    labels = drop_labels(class_labels, class_dropout_prob, null_label, generator)
    x_t = noise_scheduler.add_noise(x_start, noise, timesteps)
    if model_with_loss is not None:
        loss, mse = model_with_loss(x_start, x_t, noise, timesteps, weights, labels)
        # a CUDA graph's output lives until the next replay: keep a copy
        return TrainingStepOutput(loss=loss, mse=mse.detach().clone(), timesteps=timesteps)
    out = _forward_and_loss(model, loss_fn, x_start, x_t, noise, timesteps, weights, labels)
    return TrainingStepOutput(loss=out.loss, mse=out.mse.detach(), timesteps=timesteps)




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


class TrainingEngine:
    """One SpeeD training step on prepared Accelerate objects, and the device-side bookkeeping
    that logging reads (mean loss, per-quarter MSE, the first non-finite step) without a host sync.

    `model`, `optimizer` and `lr_scheduler` are as `accelerator.prepare` returned them. With
    `compile=True` (or a `compile_mode`) the forward pass and DiT's loss run as one compiled graph
    (`ModelWithLoss`); "reduce-overhead" also captures CUDA graphs. Every random number of a step
    comes from `seeded_generator("training", seed, process, micro_step)`, so a resumed run repeats
    an uninterrupted one exactly.
    """

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        noise_scheduler: SpeeDiTScheduler,
        loss_fn: DiTLoss,
        ema=None,
        *,
        class_dropout_prob: float,
        null_label: int,
        max_grad_norm: float,
        seed: int,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.noise_scheduler = noise_scheduler
        self.loss_fn = loss_fn
        self.ema = ema
        self.class_dropout_prob = class_dropout_prob
        self.null_label = null_label
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        device = accelerator.device
        self.quartiles = TimestepQuartileLoss(noise_scheduler.config.num_train_timesteps, device)
        # running loss sums since the last log line and since the last evaluation, on the device
        self.loss_sums = {w: torch.zeros((), device=device, dtype=torch.float64) for w in ("log", "evaluation")}
        self.loss_counts = {"log": 0, "evaluation": 0}
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.model_with_loss: torch.nn.Module | None = None
        self.compile_mode: str | None = None
        if compile or compile_mode is not None:
            self.compile(compile_mode, compile_backend)

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """Run the forward pass and the loss as one compiled graph from now on."""
        module = ModelWithLoss(self.model, self.loss_fn, self.accelerator.device)
        self.model_with_loss = compile_model(module, mode, backend)
        self.compile_mode = mode

    def uncompile(self) -> None:
        self.model_with_loss, self.compile_mode = None, None

    def step(self, x_start: torch.Tensor, class_labels: torch.Tensor, micro_step: int) -> TrainingStepOutput:
        """One micro-step: SpeeD's timesteps and loss weights, noise, label dropout, forward and
        DiT's loss under autocast, backward, clipping, AdamW, the LR schedule, EMA (at the
        gradient-accumulation boundary) and the bookkeeping. No host sync."""
        accelerator = self.accelerator
        mark_compiled_step(self.compile_mode)
        rank = accelerator.process_index
        generator = seeded_generator("training", self.seed, rank, micro_step, device=x_start.device)
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                out = training_step_loss(
                    self.model,
                    self.noise_scheduler,
                    self.loss_fn,
                    x_start,
                    class_labels,
                    generator,
                    self.class_dropout_prob,
                    self.null_label,
                    self.model_with_loss,
                )
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach()
        for window in self.loss_sums:
            self.loss_sums[window] += loss
            self.loss_counts[window] += 1
        self.quartiles.update(out.mse, out.timesteps)
        # the optimizer step this micro-step belongs to (1-based), recorded once, on the device
        step = micro_step // accelerator.gradient_accumulation_steps + 1
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(bad, step, self.first_bad_step))
        if self.ema is not None and accelerator.sync_gradients:
            self.ema.step(accelerator.unwrap_model(self.model).parameters())
        return out

    def mean_loss(self, window: str = "log") -> float:
        """Mean loss over the processes and the micro-steps since this window ("log" or
        "evaluation") was last read; resets the window. One host sync."""
        total = self.accelerator.reduce(self.loss_sums[window], reduction="mean").item()
        mean = total / max(self.loss_counts[window], 1)
        self.loss_sums[window].zero_()
        self.loss_counts[window] = 0
        return mean

    def read_logs(self) -> dict[str, float]:
        """The log line's numbers: the mean loss since the last log line and this process's
        per-quarter MSE (`loss/mse_t_q1` .. `q4`); resets both."""
        return {"loss": self.mean_loss("log"), **self.quartiles.read_and_reset()}

    def check_finite(self) -> None:
        """Raise if any process's loss became NaN or inf, naming the first such step."""
        bad = int(self.accelerator.reduce(self.first_bad_step, reduction="max"))  # -1: all finite
        if bad >= 0:
            raise FloatingPointError(
                f"loss became NaN or inf at step {bad}; stopping without saving. "
                "The last good checkpoint is intact: lower --learning_rate or check the data and resume."
            )
