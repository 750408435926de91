"""DiT's hybrid loss against an implementation written here from the papers' formulas."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from speedit_scheduler import SpeeDiTScheduler
from speedit_scheduler.losses import DiTLoss
from speedit_scheduler.pipeline_speedit import training_sampler, use_float64_tables


def reference_vb_bits(eps, v, x0, xt, t, betas):
    """L_t / L_0 per sample from Ho et al. 2020 (eqs. 7, 11) and Nichol & Dhariwal 2021 (eq. 15).

    numpy float64, one sample and one timestep at a time, with no code shared with the package.
    The decoder CDF uses the tanh approximation of Phi, as the ADM and DiT code do (the paper
    leaves the CDF's evaluation open); everything else is the plain formula.
    """
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    out = []
    for i in range(len(t)):
        ti = int(t[i])
        abar_t, abar_prev = abar[ti], (abar[ti - 1] if ti > 0 else 1.0)
        beta = betas[ti]
        # Eq. 7: true posterior q(x_{t-1} | x_t, x_0).
        mu_true = (
            math.sqrt(abar_prev) * beta / (1 - abar_t) * x0[i]
            + math.sqrt(alphas[ti]) * (1 - abar_prev) / (1 - abar_t) * xt[i]
        )
        beta_tilde = lambda s: (1 - abar[s - 1]) / (1 - abar[s]) * betas[s]  # noqa: E731
        log_beta_tilde = math.log(beta_tilde(max(ti, 1)))  # log(0) at t = 0 is replaced by t = 1's
        # Eq. 11: model mean from the predicted noise.
        mu_model = (xt[i] - beta / math.sqrt(1 - abar_t) * eps[i]) / math.sqrt(alphas[ti])
        # Eq. 15: interpolated log-variance, v in [-1, 1] mapped to [0, 1].
        frac = (v[i] + 1) / 2
        log_var_model = frac * math.log(beta) + (1 - frac) * log_beta_tilde
        if ti > 0:
            var_true, var_model = math.exp(log_beta_tilde), np.exp(log_var_model)
            kl = 0.5 * (np.log(var_model / var_true) + (var_true + (mu_true - mu_model) ** 2) / var_model - 1.0)
            out.append(kl.mean() / math.log(2))
        else:
            sigma = np.exp(0.5 * log_var_model)

            def phi(z):
                return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

            upper = np.where(x0[i] > 0.999, 1.0, phi((x0[i] + 1 / 255 - mu_model) / sigma))
            lower = np.where(x0[i] < -0.999, 0.0, phi((x0[i] - 1 / 255 - mu_model) / sigma))
            out.append(-np.log(np.maximum(upper - lower, 1e-12)).mean() / math.log(2))
    return np.array(out)


def make_batch(t, channels=3, size=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = len(t)
    x0 = (torch.rand(n, channels, size, size, generator=g, dtype=dtype) * 2 - 1).round(decimals=2)
    x0[:, 0, 0, 0] = -1.0  # edge bins of the decoder likelihood
    x0[:, 0, 0, 1] = 1.0
    noise = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    output = torch.randn(n, 2 * channels, size, size, generator=g, dtype=dtype) * 0.5
    output[:, channels:] = output[:, channels:].clamp(-1, 1)
    return x0, noise, output


def _linear_betas(beta_start, beta_end, num_steps):
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs, reference_betas",
    [
        ({}, lambda: _linear_betas(1e-4, 0.02, 1000)),  # DiT's schedule
        ({"num_train_timesteps": 2000, "beta_start": 5e-5, "beta_end": 0.01}, lambda: _linear_betas(5e-5, 0.01, 2000)),
        (
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
            lambda: _linear_betas(0.00085**0.5, 0.012**0.5, 1000) ** 2,
        ),
        (
            {"trained_betas": np.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
            lambda: torch.from_numpy(np.linspace(1e-4, 0.03, 500)),
        ),
    ],
)
def test_loss_and_sampler_read_the_schedulers_float64_table(kwargs, reference_betas):
    """One float64 schedule: the scheduler's, the loss's and the sampler's tables are all bit for
    bit one reference computation of the betas and their cumulative product in float64."""
    betas = reference_betas()
    abar = torch.cumprod(1.0 - betas, dim=0)
    scheduler = SpeeDiTScheduler(**kwargs)
    assert torch.equal(scheduler.betas_float64, betas) and torch.equal(scheduler.alphas_cumprod_float64, abar)

    loss = DiTLoss(scheduler)
    assert loss.schedule is scheduler.schedule_float64
    assert torch.equal(loss.tables["log_betas"], torch.log(betas))
    assert torch.equal(loss.tables["sqrt_abar"], abar.sqrt())
    assert torch.equal(loss.tables["sqrt_one_minus_abar"], (1.0 - abar).sqrt())
    assert torch.equal(loss.tables["sqrt_recip_abar"], (1.0 / abar).sqrt())
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert torch.equal(loss.tables["posterior_mean_coef_x0"], betas * abar_prev.sqrt() / (1.0 - abar))
    # A plain DDPM scheduler of the same config gives the loss the same tables, not its float32 ones.
    plain = DDPMScheduler.from_config(training_sampler(scheduler, learned_variance=True, clip_sample=False).config)
    for name, table in DiTLoss(plain).tables.items():
        assert torch.equal(table, loss.tables[name]), name

    for learned_variance in (True, False):
        sampler = use_float64_tables(
            training_sampler(scheduler, "ddpm", learned_variance=learned_variance, clip_sample=False)
        )
        assert torch.equal(sampler.betas, betas)
        assert torch.equal(sampler.alphas, 1.0 - betas)
        assert torch.equal(sampler.alphas_cumprod, abar)
        assert sampler.one.dtype == torch.float64 and sampler.one.item() == 1.0
        assert use_float64_tables(sampler) is sampler and torch.equal(sampler.alphas_cumprod, abar)  # idempotent


@pytest.mark.parametrize("preset", ["speed", "uniform"])
def test_vb_term_matches_the_papers_formulas(preset):
    scheduler = SpeeDiTScheduler.from_preset(preset)
    loss = DiTLoss(scheduler)
    t = torch.tensor([0, 0, 1, 2, 17, 300, 641, 642, 700, 998, 999])
    x0, noise, output = make_batch(t)
    abar = scheduler.alphas_cumprod_float64
    xt = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
    result = loss(output, x0, xt, noise, t, torch.ones(len(t), dtype=torch.float64))
    expected = reference_vb_bits(
        output[:, :3].numpy(),
        output[:, 3:].numpy(),
        x0.numpy(),
        xt.numpy(),
        t.numpy(),
        scheduler.betas_float64.numpy(),
    )
    assert np.abs(result.vb.numpy() - expected).max() <= 1e-6
    expected_mse = ((output[:, :3] - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(result.mse, expected_mse, rtol=0, atol=1e-12)
    assert result.loss.item() == pytest.approx(expected_mse.mean().item() + expected.mean(), abs=1e-6)


def test_weights_multiply_only_the_mse():
    scheduler = SpeeDiTScheduler()
    loss = DiTLoss(scheduler)
    t = torch.tensor([0, 5, 400, 800])
    x0, noise, output = make_batch(t, seed=3)
    xt = scheduler.add_noise(x0.float(), noise.float(), t).double()
    weights = torch.tensor([0.5, 2.0, 0.1, 1.0], dtype=torch.float64)
    unweighted = loss(output, x0, xt, noise, t)
    weighted = loss(output, x0, xt, noise, t, weights)
    assert torch.equal(unweighted.vb, weighted.vb)
    expected = (weights * unweighted.mse).mean() + unweighted.vb.mean()
    assert weighted.loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_vb_gradient_reaches_only_the_variance_channels():
    scheduler = SpeeDiTScheduler()
    loss = DiTLoss(scheduler)
    t = torch.tensor([0, 3, 250, 999])
    x0, noise, output = make_batch(t, seed=5)
    xt = scheduler.add_noise(x0.float(), noise.float(), t).double()
    output.requires_grad_(True)
    result = loss(output, x0, xt, noise, t)
    (grad_vb,) = torch.autograd.grad(result.vb.sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :3] == 0) and grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(result.mse.sum(), output, retain_graph=True)
    assert torch.all(grad_mse[:, 3:] == 0) and grad_mse[:, :3].abs().sum() > 0
    (grad_total,) = torch.autograd.grad(result.loss, output)
    torch.testing.assert_close(grad_total, (grad_vb + grad_mse) / len(t))


def test_fixed_variance_models_use_weighted_mse_with_the_right_target():
    t = torch.tensor([10, 500])
    x0, noise, output = make_batch(t, seed=9)
    output = output[:, :3]
    weights = torch.tensor([0.25, 1.0], dtype=torch.float64)
    eps_loss = DiTLoss(SpeeDiTScheduler())
    xt = x0  # any x_t: the MSE does not use it for epsilon or sample targets
    result = eps_loss(output, x0, xt, noise, t, weights)
    assert result.vb is None
    expected = (weights * ((output - noise) ** 2).mean(dim=(1, 2, 3))).mean()
    assert result.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    sample_loss = DiTLoss(SpeeDiTScheduler(prediction_type="sample"))
    assert sample_loss(output, x0, xt, noise, t).mse.tolist() == pytest.approx(
        ((output - x0) ** 2).mean(dim=(1, 2, 3)).tolist()
    )
    v_scheduler = SpeeDiTScheduler(prediction_type="v_prediction")
    v_target = v_scheduler.get_velocity(x0.float(), noise.float(), t).double()
    v_mse = DiTLoss(v_scheduler)(output, x0, xt, noise, t).mse
    torch.testing.assert_close(v_mse, ((output - v_target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_bad_channel_counts_and_targets_raise():
    t = torch.tensor([1])
    x0, noise, output = make_batch(t)
    with pytest.raises(ValueError, match="model output has 5 channels for 3-channel data"):
        DiTLoss(SpeeDiTScheduler())(output[:, :5], x0, x0, noise, t)
    with pytest.raises(ValueError, match="learned-sigma models need prediction_type='epsilon'"):
        DiTLoss(SpeeDiTScheduler(prediction_type="v_prediction"))(output, x0, x0, noise, t)


def test_float32_matches_float64():
    scheduler = SpeeDiTScheduler()
    loss = DiTLoss(scheduler)
    t = torch.tensor([0, 50, 600, 999])
    x0, noise, output = make_batch(t, seed=11)
    xt = scheduler.add_noise(x0.float(), noise.float(), t).double()
    r64 = loss(output, x0, xt, noise, t)
    r32 = loss(output.float(), x0.float(), xt.float(), noise.float(), t)
    assert r32.loss.dtype == torch.float32
    assert r32.loss.item() == pytest.approx(r64.loss.item(), rel=1e-4)


def test_model_with_loss_is_the_same_step_in_one_graph():
    """`ModelWithLoss` (what compiled comparisons run) gives the very loss, per-sample MSE and
    gradients of the separate forward pass and loss, and dynamo traces it as one graph with no
    break, in float32 and under bf16 autocast: the condition for one CUDA graph per pass."""
    import copy

    from speedit_scheduler.models import create_dit, disable_internal_label_dropout
    from speedit_scheduler.training.engine import ModelWithLoss, training_step_loss

    scheduler = SpeeDiTScheduler.from_preset("speed")
    loss_fn = DiTLoss(scheduler)
    model = create_dit("S/2", seed=0, sample_size=8, in_channels=1, num_classes=10, learn_sigma=True,
                       num_layers=1, hidden_size=32, num_attention_heads=2)  # fmt: skip
    disable_internal_label_dropout(model)
    fused_model = copy.deepcopy(model)
    fused = ModelWithLoss(fused_model, loss_fn, "cpu")
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    separate = training_step_loss(model, scheduler, loss_fn, x0, labels, torch.Generator().manual_seed(3), 0.5, 10)
    joint = training_step_loss(model, scheduler, loss_fn, x0, labels, torch.Generator().manual_seed(3), 0.5, 10,
                               model_with_loss=fused)  # fmt: skip
    assert torch.equal(separate.timesteps, joint.timesteps)
    torch.testing.assert_close(joint.loss, separate.loss, rtol=0, atol=0)
    torch.testing.assert_close(joint.mse, separate.mse, rtol=0, atol=0)
    separate.loss.backward()
    joint.loss.backward()
    for (name, p), q in zip(model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)

    t, w = scheduler.sample_timesteps(6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    inputs = (x0, scheduler.add_noise(x0, noise, t), noise, t, w, labels)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explained = torch._dynamo.explain(fused)(*inputs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert all(
        hasattr(table, "_dynamo_static_input_type") for table in loss_fn.tables_on("cpu", torch.float32).values()
    )
