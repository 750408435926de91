# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""DiT's training loss for diffusers models: weighted epsilon-MSE plus, for learned-sigma
models, the variational-bound term that trains the variance (Improved DDPM, Nichol & Dhariwal
2021; DiT's "hybrid" loss). diffusers ships no helper for the VB term, so it lives here, once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from .scheduling_speedit import Float64Schedule, SpeeDiTScheduler, float64_schedule


@dataclass
class DiffusionLossOutput:
    loss: torch.Tensor  # scalar: mean(weight * mse) + mean(vb)
    mse: torch.Tensor  # per-sample, unweighted
    vb: torch.Tensor | None  # per-sample, in bits per dimension; None for fixed-variance models


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation ADM and DiT use for the decoder likelihood; kept for faithfulness.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins, edge bins open-ended (DDPM's L_0)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def _mean_over_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


class DiTLoss:
    """DiT's loss for a scheduler's noise schedule, with float64 tables built once.

    `__call__` takes the model output, the clean sample, the noisy sample, the noise, the
    timesteps and per-sample loss weights (from `SpeeDiTScheduler.sample_timesteps`):

    - fixed-variance models (`out_channels == in_channels`): `mean(weight * mse)`, where the MSE
      target follows the scheduler's `prediction_type`;
    - learned-sigma models (`out_channels == 2 * in_channels`, epsilon prediction, DiT's
      `learned_range` variance): `mean(weight * mse) + mean(vb)`. The VB term is the KL between the
      true posterior q(x_{t-1} | x_t, x_0) and the model's, in bits, with the predicted epsilon
      detached so it trains only the variance channels; at t = 0 it is the discretised-Gaussian
      decoder NLL. The weights multiply the MSE only, as published.

    The tables derive from the scheduler's float64 schedule (`float64_schedule`: the very tensors of a
    `SpeeDiTScheduler`, the same numbers for any other scheduler config), so the loss, the training
    scheduler and the sampler share one noise schedule. The computation runs in float32 (float64 when
    the model output is float64).
    """

    def __init__(self, scheduler: DDPMScheduler) -> None:
        if isinstance(scheduler, SpeeDiTScheduler):
            schedule = scheduler.schedule_float64
        else:
            schedule = float64_schedule(scheduler.config)
        self.schedule: Float64Schedule = schedule
        self.prediction_type = scheduler.config.prediction_type
        betas, abar, abar_prev = schedule.betas, schedule.alphas_cumprod, schedule.alphas_cumprod_prev
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0; DiT clips its log to the t = 1 value.
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.tables = {
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": (1.0 / abar).sqrt(),
            "sqrt_recip_abar_minus_one": (1.0 / abar - 1.0).sqrt(),
            "posterior_mean_coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef_xt": (1.0 - abar_prev) * schedule.alphas.sqrt() / (1.0 - abar),
            "posterior_log_variance": posterior_log_variance,
            "log_betas": torch.log(betas),
        }
        self._device_tables: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}

    def tables_on(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The schedule tables on `device` in `dtype`, made once and cached."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # tensors report "cuda:0": one key for both, or a compiled graph builds its own copy
            device = torch.device("cuda", torch.cuda.current_device())
        key = (str(device), dtype)
        if key not in self._device_tables:
            self._device_tables[key] = {k: v.to(device, dtype) for k, v in self.tables.items()}
        return self._device_tables[key]

    def _table(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = self.tables_on(like.device, like.dtype)[name][timesteps]
        return values.view(-1, *([1] * (like.ndim - 1)))

    def __call__(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> DiffusionLossOutput:
        channels = x_start.shape[1]
        if model_output.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"model output has {model_output.shape[1]} channels for {channels}-channel data: "
                f"expected {channels} (fixed variance) or {2 * channels} (learned sigma)."
            )
        compute_dtype = torch.float64 if model_output.dtype == torch.float64 else torch.float32
        model_output = model_output.to(compute_dtype)
        x_start, x_t, noise = x_start.to(compute_dtype), x_t.to(compute_dtype), noise.to(compute_dtype)
        learned_sigma = model_output.shape[1] == 2 * channels
        prediction, variance_values = model_output.split(channels, dim=1) if learned_sigma else (model_output, None)

        if self.prediction_type == "epsilon":
            target = noise
        elif learned_sigma:
            raise ValueError(
                f"learned-sigma models need prediction_type='epsilon', got {self.prediction_type!r}: "
                "use a fixed-variance model (out_channels = in_channels) for other targets."
            )
        elif self.prediction_type == "sample":
            target = x_start
        else:  # v_prediction
            target = (
                self._table("sqrt_abar", timesteps, x_t) * noise
                - self._table("sqrt_one_minus_abar", timesteps, x_t) * x_start
            )
        mse = _mean_over_non_batch((prediction - target) ** 2)
        weighted = mse if weights is None else mse * weights.to(compute_dtype)
        if not learned_sigma:
            return DiffusionLossOutput(loss=weighted.mean(), mse=mse, vb=None)

        vb = self.variational_bound(prediction.detach(), variance_values, x_start, x_t, timesteps)
        return DiffusionLossOutput(loss=weighted.mean() + vb.mean(), mse=mse, vb=vb)

    def variational_bound(
        self,
        epsilon: torch.Tensor,
        variance_values: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample L_t (KL, t > 0) or L_0 (decoder NLL, t = 0) in bits per dimension."""
        t = timesteps

        def table(name: str) -> torch.Tensor:
            return self._table(name, t, x_t)

        # Model variance: interpolate in log space between the posterior and beta (learned_range).
        fraction = (variance_values + 1.0) / 2.0
        model_log_variance = fraction * table("log_betas") + (1.0 - fraction) * table("posterior_log_variance")
        predicted_x0 = table("sqrt_recip_abar") * x_t - table("sqrt_recip_abar_minus_one") * epsilon
        model_mean = table("posterior_mean_coef_x0") * predicted_x0 + table("posterior_mean_coef_xt") * x_t
        true_mean = table("posterior_mean_coef_x0") * x_start + table("posterior_mean_coef_xt") * x_t

        kl = _normal_kl(true_mean, table("posterior_log_variance"), model_mean, model_log_variance)
        kl = _mean_over_non_batch(kl) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        nll = _mean_over_non_batch(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


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
