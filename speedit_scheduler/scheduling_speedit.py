# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""SpeeDiT / SpeeD timestep sampling and loss weighting as a diffusers scheduler.

SpeeD (arXiv 2405.17403) keeps DiT's model, noise schedule, optimizer and sampler and changes
only *which* timesteps a training batch sees and *how much* each one's loss counts. This module
puts both choices on a `DDPMScheduler` subclass so that they travel with the scheduler config.

It also holds `float64_schedule`, the one place where the float64 noise-schedule tables are
built: the scheduler, `DiTLoss` and the sampling pipeline all read them from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, rescale_zero_terminal_snr

from .options import LOSS_WEIGHTINGS, PRESETS, TIMESTEP_SAMPLINGS, LossWeighting, TimestepSampling  # noqa: F401

# The published threshold on the slope of sqrt(1 - abar) is per step of a T = 1000 process.
_REFERENCE_NUM_STEPS = 1000


# ---------------------------------------------------------------------------------------------
# float64 noise-schedule tables
# ---------------------------------------------------------------------------------------------
# Copied from diffusers.schedulers.scheduling_ddpm.betas_for_alpha_bar with float32->float64
def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    max_beta: float = 0.999,
    alpha_transform_type: Literal["cosine", "exp", "laplace"] = "cosine",
) -> torch.Tensor:
    """
    Create a beta schedule that discretizes the given alpha_t_bar function, which defines the cumulative product of
    (1-beta) over time from t = [0,1].

    Contains a function alpha_bar that takes an argument t and transforms it to the cumulative product of (1-beta) up
    to that part of the diffusion process.

    Args:
        num_diffusion_timesteps (`int`):
            The number of betas to produce.
        max_beta (`float`, defaults to `0.999`):
            The maximum beta to use; use values lower than 1 to avoid numerical instability.
        alpha_transform_type (`str`, defaults to `"cosine"`):
            The type of noise schedule for `alpha_bar`. Choose from `cosine`, `exp`, or `laplace`.

    Returns:
        `torch.Tensor`:
            The betas used by the scheduler to step the model outputs.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar_fn(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "laplace":

        def alpha_bar_fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    elif alpha_transform_type == "exp":

        def alpha_bar_fn(t):
            return math.exp(t * -12.0)

    else:
        raise ValueError(f"Unsupported alpha_transform_type: {alpha_transform_type}")

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Float64Schedule:
    """
    The noise schedule of a scheduler config, in float64.

    diffusers keeps its schedule tables in float32, which loses relative precision in `1 - alphas_cumprod`
    near t = 0; DiT computes every coefficient in float64. These tables are built by `float64_schedule` only, so
    the training scheduler, the loss and the sampler see the very same numbers. Treat the tensors as read-only:
    they may be shared between their readers.

    Args:
        betas (`torch.Tensor` of shape `(num_train_timesteps,)`):
            The variance `beta_t` of each forward step.
        alphas (`torch.Tensor` of shape `(num_train_timesteps,)`):
            `1 - betas`.
        alphas_cumprod (`torch.Tensor` of shape `(num_train_timesteps,)`):
            The cumulative product `abar_t` of `alphas`: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """`abar_{t-1}` of every step, with `abar_{-1} = 1`: what the posterior q(x_{t-1} | x_t, x_0) needs."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])


def float64_schedule(config: Mapping[str, Any]) -> Float64Schedule:
    """
    The float64 noise schedule of a scheduler config.

    Computes the betas of `DDPMScheduler` (`trained_betas`, or any of its `beta_schedule`s, then the optional
    zero-terminal-SNR rescaling) with the same formulas in float64 instead of float32, then `alphas` and
    `alphas_cumprod`. Any scheduler config with DDPM's schedule fields works (a `SpeeDiTScheduler`'s, a DDPM or
    DDIM sampler's, a plain dict).

    Args:
        config (`Mapping[str, Any]`):
            A scheduler config: `num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end`, and optionally
            `trained_betas` and `rescale_betas_zero_snr`.

    Returns:
        `Float64Schedule`:
            The schedule's `betas`, `alphas` and `alphas_cumprod`, float64 tensors on the CPU.
    """
    num_steps = config["num_train_timesteps"]
    trained_betas = config.get("trained_betas")
    beta_schedule = config["beta_schedule"]
    # The schedules of DDPMScheduler.__init__, in float64.
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], num_steps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, num_steps, dtype=torch.float64)
        betas = betas**2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_steps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_steps, alpha_transform_type="laplace")
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64))
        betas = betas * (config["beta_end"] - config["beta_start"]) + config["beta_start"]
    else:
        raise NotImplementedError(f"{beta_schedule} is not implemented for float64_schedule")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    return Float64Schedule(betas=betas, alphas=alphas, alphas_cumprod=torch.cumprod(alphas, dim=0))


# ---------------------------------------------------------------------------------------------
# parameter checks
# ---------------------------------------------------------------------------------------------
def _check_range(
    *, name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise a `ValueError` naming `name` unless `value` is finite and lies in the interval from `low` to `high`
    (open at an end where `low_open` / `high_open`)."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is out of range: it must lie in {interval}.")


def _check_positive(*, name: str, value: float) -> None:
    """Raise a `ValueError` naming `name` unless `value` is finite and > 0."""
    _check_range(name=name, value=value, low=0.0, high=math.inf, low_open=True, high_open=True)


class SpeeDiTScheduler(DDPMScheduler):
    """
    `SpeeDiTScheduler` is a [`DDPMScheduler`] that also chooses which timesteps a training batch sees and how much
    each sample's loss counts, following SpeeD (arXiv 2405.17403) and the earlier SpeeDiT recipe.

    Everything `DDPMScheduler` does (`add_noise`, `step`, `set_timesteps`, every beta schedule, `save_pretrained` /
    `from_pretrained`) is inherited unchanged, and a saved config loads as a plain `DDPMScheduler` too. The training
    choices are config fields, so they are saved and reloaded with the scheduler. Their tables (`meaningful_step`,
    `timestep_probabilities()`, `loss_weights()`) are computed from the float64 schedule of `float64_schedule`
    (`betas_float64`, `alphas_cumprod_float64`), independent of the float32 tables that `DDPMScheduler` keeps for
    `add_noise` and `step`.

    Args:
        num_train_timesteps (`int`, defaults to `1000`):
            The number of diffusion steps T of training; at least 2.
        beta_start (`float`, defaults to `0.0001`):
            The first `beta` of the `linear`, `scaled_linear` and `sigmoid` schedules.
        beta_end (`float`, defaults to `0.02`):
            The last `beta` of the `linear`, `scaled_linear` and `sigmoid` schedules.
        beta_schedule (`str`, defaults to `"linear"`):
            How the betas are spread over the steps: `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`,
            `"sigmoid"` or `"laplace"`. `"linear"` with the default range is DDPM's and DiT's schedule.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Explicit betas, one per step; they replace `beta_schedule`, `beta_start` and `beta_end`.
        variance_type (`str`, defaults to `"fixed_small"`):
            The variance `step` adds when sampling: `"fixed_small"`, `"fixed_small_log"`, `"fixed_large"`,
            `"fixed_large_log"`, `"learned"` or `"learned_range"`. `"learned_range"` interpolates between the
            posterior variance and beta with the model's variance channels (DiT's learned sigma).
        clip_sample (`bool`, defaults to `True`):
            Whether `step` clips the predicted clean sample to `[-clip_sample_range, clip_sample_range]`.
        prediction_type (`"epsilon"`, `"sample"` or `"v_prediction"`, defaults to `"epsilon"`):
            What the model predicts: the noise, the clean sample, or the velocity of Salimans & Ho (2022). It also
            selects the form of the `"min-snr"` weights.
        thresholding (`bool`, defaults to `False`):
            Whether `step` applies dynamic thresholding (Imagen) to the predicted clean sample.
        dynamic_thresholding_ratio (`float`, defaults to `0.995`):
            The quantile of dynamic thresholding; used only with `thresholding=True`.
        clip_sample_range (`float`, defaults to `1.0`):
            The bound of `clip_sample`; used only with `clip_sample=True`.
        sample_max_value (`float`, defaults to `1.0`):
            The largest threshold of dynamic thresholding; used only with `thresholding=True`.
        timestep_spacing (`"linspace"`, `"leading"` or `"trailing"`, defaults to `"leading"`):
            How `set_timesteps` spaces the inference steps over the training steps.
        steps_offset (`int`, defaults to `0`):
            An offset added to the inference steps (`"leading"` spacing).
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Whether to rescale the betas so that the last step has zero signal-to-noise ratio (Lin et al. 2023).
        timestep_sampling (`"uniform"`, `"speed"`, `"speedit-v1"` or `"logit-normal"`, defaults to `"speed"`):
            How training timesteps are drawn. `"uniform"`: every step equally likely (DDPM, DiT). `"speed"`: SpeeD's
            asymmetric sampling, where steps before `speed_tau` are `speed_k` times as likely as the steps after it.
            `"speedit-v1"`: the original SpeeDiT soft step `tanh(1e6 (g - threshold)) + 1.5` of the slope `g` of
            `sqrt(1 - abar)`, so 2.5 where the process still changes and 0.5 where it has converged.
            `"logit-normal"`: the logit-normal density of SD3 over `t / T`, integrated over each step.
        loss_weighting (`"none"`, `"speed"`, `"p2"` or `"min-snr"`, defaults to `"speed"`):
            How each sample's MSE is weighted. `"none"`: 1. `"speed"`: SpeeD's change-aware weight, from
            `1 - speed_lambda` to `speed_lambda` following the min-max normalised slope of `1 - abar` before tau,
            1 from tau on. `"p2"`: `1 / (p2_k + snr) ** p2_gamma` (Choi et al. 2022). `"min-snr"`: Min-SNR-gamma
            (Hang et al. 2023), `min(snr, gamma) / snr` for epsilon prediction, `min(snr, gamma) / (snr + 1)` for
            v-prediction and `min(snr, gamma)` for sample prediction.
        dual_sampling (`bool`, *optional*):
            Whether to draw `n // 2 + 1` steps and fill the batch with their duals around the meaningful step `m`
            (`m - t` below `m`, `t - m` from `m` on), as published. `None` keeps each sampling as it was published:
            on for `"speed"` and `"speedit-v1"`, off otherwise.
        speed_k (`float`, defaults to `5.0`):
            SpeeD's ratio k > 0 of the probability of a step before tau to that of a step after it (paper: 5).
        speed_tau (`float`, defaults to `0.7`):
            SpeeD's threshold tau as a fraction of `num_train_timesteps`, in (0, 1). The step is
            `round(speed_tau * T)`: 0.7 is step 700 of T = 1000 and step 1400 of T = 2000. A fraction keeps its
            meaning when T changes; for another beta schedule choose tau where that schedule has converged, which
            `meaningful_step` (derived from the schedule) indicates.
        speed_lambda (`float`, defaults to `0.6`):
            SpeeD's weight ceiling lambda in [0.5, 1] (paper: 0.6); 0.5 gives flat weights before tau.
        meaningful_step_threshold (`float`, defaults to `1e-4`):
            The threshold on the slope of `sqrt(1 - abar)` that defines the meaningful step `m` (the first step
            where the slope falls below it, plus one) and the soft step of `"speedit-v1"`. The slope is taken per
            thousandth of the process (per step, times T / 1000) so that the published value keeps its meaning for
            any `num_train_timesteps`. If the slope never falls below it, `m = T`.
        p2_k (`float`, defaults to `1.0`):
            The offset k > 0 of P2 weighting (SpeeDiT-v1: 1).
        p2_gamma (`float`, defaults to `1.0`):
            The exponent gamma > 0 of P2 weighting (SpeeDiT-v1: 1).
        min_snr_gamma (`float`, defaults to `5.0`):
            The SNR clip gamma > 0 of Min-SNR weighting (the paper's default: 5).
        logit_mean (`float`, defaults to `0.0`):
            The location of the normal distribution behind `"logit-normal"` sampling.
        logit_std (`float`, defaults to `1.0`):
            The scale (> 0) of the normal distribution behind `"logit-normal"` sampling.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small",
            "fixed_small_log",
            "fixed_large",
            "fixed_large_log",
            "learned",
            "learned_range",
        ] = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        timestep_sampling: TimestepSampling = "speed",
        loss_weighting: LossWeighting = "speed",
        dual_sampling: bool | None = None,
        speed_k: float = 5.0,
        speed_tau: float = 0.7,
        speed_lambda: float = 0.6,
        meaningful_step_threshold: float = 1e-4,
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
        min_snr_gamma: float = 5.0,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is unknown: choose one of {TIMESTEP_SAMPLINGS}.")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r} is unknown: choose one of {LOSS_WEIGHTINGS}.")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 2.")
        _check_positive(name="speed_k", value=speed_k)
        _check_range(name="speed_tau", value=speed_tau, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_range(name="speed_lambda", value=speed_lambda, low=0.5, high=1.0)
        _check_positive(name="meaningful_step_threshold", value=meaningful_step_threshold)
        _check_positive(name="p2_k", value=p2_k)
        _check_positive(name="p2_gamma", value=p2_gamma)
        _check_positive(name="min_snr_gamma", value=min_snr_gamma)
        _check_positive(name="logit_std", value=logit_std)
        if not math.isfinite(logit_mean):
            raise ValueError(f"logit_mean={logit_mean!r} must be a finite number.")
        tau_step = round(speed_tau * num_train_timesteps)
        if not 0 < tau_step < num_train_timesteps:
            raise ValueError(
                f"speed_tau={speed_tau} gives step {tau_step}, outside (0, {num_train_timesteps}): "
                f"use a fraction between {1 / num_train_timesteps:g} and {1 - 1 / num_train_timesteps:g}."
            )

        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

        self.schedule_float64 = float64_schedule(self.config)
        self.betas_float64 = self.schedule_float64.betas
        self.alphas_cumprod_float64 = self.schedule_float64.alphas_cumprod
        self.tau_step = tau_step
        self.meaningful_step = self._meaningful_step()
        self._probabilities = self._sampling_probabilities()
        self._weights = self._loss_weights()
        self._cdf_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._weight_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_preset(cls, preset: str, **kwargs: Any) -> SpeeDiTScheduler:
        """A scheduler for a named recipe (a key of `PRESETS`); keyword arguments override its fields."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is unknown: choose one of {tuple(PRESETS)}.")
        return cls(**{**PRESETS[preset], **kwargs})

    # ----------------------------------------------------------------------------------------
    # tables derived from the float64 schedule
    # ----------------------------------------------------------------------------------------
    def _slope_per_thousandth(self, values: torch.Tensor) -> np.ndarray:
        # numpy.gradient: central differences inside, one-sided at both ends, as published.
        scale = self.config.num_train_timesteps / _REFERENCE_NUM_STEPS
        return np.gradient(values.numpy()) * scale

    def _meaningful_step(self) -> int:
        g = self._slope_per_thousandth(torch.sqrt(1.0 - self.alphas_cumprod_float64))
        below = np.nonzero(g < self.config.meaningful_step_threshold)[0]
        return int(below[0]) + 1 if len(below) else self.config.num_train_timesteps

    @property
    def uses_dual_sampling(self) -> bool:
        """Whether `sample_timesteps` fills half of each batch with duals (`dual_sampling`, or its preset default)."""
        dual = self.config.dual_sampling
        return self.config.timestep_sampling in ("speed", "speedit-v1") if dual is None else bool(dual)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) of every training step, float64."""
        abar = self.alphas_cumprod_float64
        return abar / (1.0 - abar)

    def _sampling_probabilities(self) -> torch.Tensor:
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.timestep_sampling == "uniform":
            p = torch.ones(T, dtype=torch.float64)
        elif cfg.timestep_sampling == "speed":
            p = torch.ones(T, dtype=torch.float64)
            p[: self.tau_step] = cfg.speed_k
        elif cfg.timestep_sampling == "speedit-v1":
            g = self._slope_per_thousandth(torch.sqrt(1.0 - self.alphas_cumprod_float64))
            p = torch.from_numpy(np.tanh(1e6 * (g - cfg.meaningful_step_threshold)) + 1.5)
        else:  # logit-normal: t = floor(T * sigmoid(x)), x ~ N(mean, std)
            edges = torch.arange(T + 1, dtype=torch.float64) / T
            logits = torch.log(edges) - torch.log1p(-edges)  # -inf and +inf at the ends
            cdf = torch.special.ndtr((logits - cfg.logit_mean) / cfg.logit_std)
            p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    def _loss_weights(self) -> torch.Tensor:
        cfg = self.config
        T = cfg.num_train_timesteps
        snr = self.snr()
        if cfg.loss_weighting == "none":
            return torch.ones(T, dtype=torch.float64)
        if cfg.loss_weighting == "p2":
            return 1.0 / (cfg.p2_k + snr) ** cfg.p2_gamma
        if cfg.loss_weighting == "min-snr":
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            if cfg.prediction_type == "epsilon":
                w = clipped / snr
            elif cfg.prediction_type == "v_prediction":
                w = clipped / (snr + 1.0)
            else:
                w = clipped
            return torch.where(snr > 0, w, torch.ones_like(w))  # limit at zero terminal SNR
        # speed: change-aware weights before tau, 1 after.
        h = self._slope_per_thousandth(1.0 - self.alphas_cumprod_float64)
        h = torch.from_numpy((h - h.min()) / (h.max() - h.min()))
        floor = 1.0 - cfg.speed_lambda
        w = floor + (1.0 - 2.0 * floor) * h
        w[self.tau_step :] = 1.0
        return w

    # ----------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------
    def timestep_probabilities(self) -> torch.Tensor:
        """Probability of each training step under the sampling preset, before duals (float64, sums to 1)."""
        return self._probabilities.clone()

    def loss_weights(self) -> torch.Tensor:
        """Loss weight of each training step (float64); it multiplies the epsilon-MSE only."""
        return self._weights.clone()

    def dual_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SpeeD's dual of each step around the meaningful step m: `m - t` below m, `t - m` from m on."""
        m = self.meaningful_step
        dual = torch.where(timesteps < m, m - timesteps, timesteps - m)
        return dual.clamp_(0, self.config.num_train_timesteps - 1)

    def batch_timestep_probabilities(self, batch_size: int) -> torch.Tensor:
        """Marginal probability of each step for one draw of a batch of `batch_size`, duals included."""
        p = self._probabilities
        if not self.uses_dual_sampling:
            return p.clone()
        n_drawn = min(batch_size // 2 + 1, batch_size)
        dual_p = torch.zeros_like(p).index_add_(0, self.dual_timesteps(torch.arange(len(p))), p)
        return (n_drawn * p + (batch_size - n_drawn) * dual_p) / batch_size

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw training timesteps for a batch and return `(timesteps, loss_weights)`.

        Inverse-CDF sampling from `timestep_probabilities()`, vectorised and reproducible with
        `generator`. Tensors live on `device`, else on the generator's device, else on the CPU.
        Timesteps are int64; weights are float32.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        rand_device = generator.device if generator is not None else device

        n_drawn = batch_size // 2 + 1 if self.uses_dual_sampling else batch_size
        cdf = self._cdf(rand_device)
        u = torch.rand(n_drawn, generator=generator, device=rand_device, dtype=cdf.dtype)
        timesteps = torch.searchsorted(cdf, u, right=True).clamp_(max=self.config.num_train_timesteps - 1)
        if self.uses_dual_sampling:
            timesteps = torch.cat([timesteps, self.dual_timesteps(timesteps)])[:batch_size]
        timesteps = timesteps.to(device)
        return timesteps, self._weights_on(device)[timesteps]

    def _cdf(self, device: torch.device) -> torch.Tensor:
        # MPS has no float64: the CDF is cast to float32 there.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (str(device), dtype)
        if key not in self._cdf_cache:
            self._cdf_cache[key] = torch.cumsum(self._probabilities, 0).to(device=device, dtype=dtype)
        return self._cdf_cache[key]

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._weight_cache:
            self._weight_cache[key] = self._weights.to(device=device, dtype=torch.float32)
        return self._weight_cache[key]
