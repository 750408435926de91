# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""SpeeDiT / SpeeD timestep sampling and loss weighting as a diffusers scheduler.

SpeeD (arXiv 2405.17403) keeps DiT's model, noise schedule, optimizer and sampler and changes
only *which* timesteps a training batch sees and *how much* each one's loss counts. This module
puts both choices on a `DDPMScheduler` subclass so that they travel with the scheduler config.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, rescale_zero_terminal_snr

TIMESTEP_SAMPLINGS = ("uniform", "speed", "speedit-v1", "logit-normal")
LOSS_WEIGHTINGS = ("none", "speed", "p2", "min-snr")

# Named recipes: a sampling and a weighting that belong together. `speed` and `speedit-v1` are
# the two published variants and are kept exactly as published (odd dual split, weight jump at tau).
PRESETS: dict[str, dict] = {
    "uniform": {"timestep_sampling": "uniform", "loss_weighting": "none"},
    "speed": {"timestep_sampling": "speed", "loss_weighting": "speed"},
    "speedit-v1": {"timestep_sampling": "speedit-v1", "loss_weighting": "p2", "p2_k": 1.0, "p2_gamma": 1.0},
    "min-snr": {"timestep_sampling": "uniform", "loss_weighting": "min-snr"},
    "p2": {"timestep_sampling": "uniform", "loss_weighting": "p2"},
    "logit-normal": {"timestep_sampling": "logit-normal", "loss_weighting": "none"},
}

# The published threshold on the slope of sqrt(1 - abar) is per step of a T = 1000 process.
_REFERENCE_NUM_STEPS = 1000


def _check_range(name: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is out of range: it must lie in {interval}.")


def _positive(name: str, value: float) -> None:
    _check_range(name, value, 0.0, math.inf, True, True)


class SpeeDiTScheduler(DDPMScheduler):
    """`DDPMScheduler` that also chooses training timesteps and their loss weights.

    Everything `DDPMScheduler` does (`add_noise`, `step`, `set_timesteps`, every beta schedule,
    `save_pretrained` / `from_pretrained`) is inherited unchanged. The extra config fields:

    Args:
        timestep_sampling: how training timesteps are drawn.
            `"uniform"`: every step equally likely (DDPM / DiT).
            `"speed"`: SpeeD's asymmetric sampling: steps before `speed_tau` are `speed_k` times as
            likely as the steps after it.
            `"speedit-v1"`: the original SpeeDiT soft step, `tanh(1e6 (g - thr)) + 1.5` of the slope
            `g` of `sqrt(1 - abar)`: 2.5 where the process still changes, 0.5 where it has converged.
            `"logit-normal"`: SD3's logit-normal density over `t / T`, integrated over each step.
        loss_weighting: how each sample's epsilon-MSE is weighted.
            `"none"`: 1. `"speed"`: SpeeD's change-aware weight, between `1 - speed_lambda` and
            `speed_lambda` following the min-max normalised slope of `1 - abar` for `t < tau`, 1 after.
            `"p2"`: `1 / (p2_k + snr)^p2_gamma` (Choi et al. 2022). `"min-snr"`: Min-SNR-gamma
            (Hang et al. 2023): `min(snr, gamma) / snr` for epsilon prediction, `min(snr, gamma) /
            (snr + 1)` for v-prediction, `min(snr, gamma)` for sample prediction.
        dual_sampling: draw `n // 2 + 1` steps and fill the batch with their duals around the
            meaningful step `m` (`m - t` below `m`, `t - m` above), as published. `None` means "as the
            sampling preset was published": on for `speed` and `speedit-v1`, off otherwise.
        speed_k: SpeeD's sampling ratio k > 0 between steps before and after tau (paper: 5).
        speed_tau: SpeeD's threshold tau as a *fraction* of `num_train_timesteps`, in (0, 1); the step
            is `round(speed_tau * T)`, so 0.7 is step 700 of T = 1000 and step 1400 of T = 2000. For a
            non-DiT beta schedule, choose tau where the schedule has converged: `meaningful_step`
            (derived from the schedule itself) is a good guide; for DiT's schedule it is 642.
        speed_lambda: SpeeD's weight ceiling lambda in [0.5, 1] (paper: 0.6). 0.5 gives flat weights.
        meaningful_step_threshold: threshold on the slope of `sqrt(1 - abar)` that defines the
            meaningful step `m` (first step where the slope falls below it, plus one) and the soft
            step of `speedit-v1`. The slope is measured per thousandth of the process (per step times
            T / 1000), so the published 1e-4 keeps its meaning for any `num_train_timesteps`. With
            a schedule whose slope never falls below it, `m = T`.
        p2_k, p2_gamma: P2 weighting parameters (both > 0; SpeeDiT-v1 uses k = gamma = 1).
        min_snr_gamma: Min-SNR's gamma > 0 (the paper's default 5).
        logit_mean, logit_std: location and scale (> 0) of the logit-normal sampling.

    All tables are computed in float64 from float64 betas, independent of the float32 tables that
    `DDPMScheduler` keeps for `add_noise` and `step`.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        timestep_sampling: Literal["uniform", "speed", "speedit-v1", "logit-normal"] = "speed",
        loss_weighting: Literal["none", "speed", "p2", "min-snr"] = "speed",
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
    ):
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is unknown: choose one of {TIMESTEP_SAMPLINGS}.")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r} is unknown: choose one of {LOSS_WEIGHTINGS}.")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 2.")
        _positive("speed_k", speed_k)
        _check_range("speed_tau", speed_tau, 0.0, 1.0, True, True)
        _check_range("speed_lambda", speed_lambda, 0.5, 1.0, False, False)
        _positive("meaningful_step_threshold", meaningful_step_threshold)
        _positive("p2_k", p2_k)
        _positive("p2_gamma", p2_gamma)
        _positive("min_snr_gamma", min_snr_gamma)
        _positive("logit_std", logit_std)
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

        self.betas_float64 = self._betas_in_float64()
        self.alphas_cumprod_float64 = torch.cumprod(1.0 - self.betas_float64, dim=0)
        self.tau_step = tau_step
        self.meaningful_step = self._meaningful_step()
        self._probabilities = self._sampling_probabilities()
        self._weights = self._loss_weights()
        self._cdf_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._weight_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "SpeeDiTScheduler":
        """A scheduler for a named recipe (`PRESETS`); keyword arguments override its fields."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is unknown: choose one of {tuple(PRESETS)}.")
        return cls(**{**PRESETS[preset], **kwargs})

    # ----------------------------------------------------------------------------------------
    # float64 tables
    # ----------------------------------------------------------------------------------------
    def _betas_in_float64(self) -> torch.Tensor:
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.trained_betas is not None:
            betas = torch.tensor(np.asarray(cfg.trained_betas), dtype=torch.float64)
        elif cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        elif cfg.beta_schedule == "scaled_linear":
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
        elif cfg.beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (cfg.beta_end - cfg.beta_start)
            betas = betas + cfg.beta_start
        elif cfg.beta_schedule in ("squaredcos_cap_v2", "laplace"):

            def alpha_bar(t: float) -> float:
                if cfg.beta_schedule == "squaredcos_cap_v2":
                    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
                lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
                return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))

            betas = torch.tensor(
                [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float64
            )
        else:  # DDPMScheduler has already rejected anything else; keep its values.
            betas = self.betas.to(torch.float64)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return betas

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
