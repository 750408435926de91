import ast
import inspect
import math
import re
import typing

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar as diffusers_betas_for_alpha_bar
from scipy import stats

from speedit_scheduler import LOSS_WEIGHTINGS, PRESETS, TIMESTEP_SAMPLINGS, SpeeDiTScheduler
from speedit_scheduler.losses import DiTLoss
from speedit_scheduler.pipeline_speedit import training_sampler, use_float64_tables
from speedit_scheduler.scheduling_speedit import betas_for_alpha_bar, float64_schedule


def rel_close(actual: float, expected: float, rel: float = 1e-6) -> bool:
    return abs(actual - expected) <= rel * abs(expected)


# ---------------------------------------------------------------------------------------------
# Reference values of SPEEDIT.md (DiT schedule, float64)
# ---------------------------------------------------------------------------------------------
def test_speedit_v1_reference_values():
    s = SpeeDiTScheduler.from_preset("speedit-v1")
    p, w = s.timestep_probabilities(), s.loss_weights()
    assert p.dtype == torch.float64 and w.dtype == torch.float64
    assert s.meaningful_step == 642
    # The published values carry 7 significant digits; our float64 values agree to 1e-6 relative.
    for t, expected in [(0, 1.402364e-03), (641, 7.454379e-04), (642, 3.557755e-04), (999, 2.804729e-04)]:
        assert rel_close(p[t].item(), expected), (t, p[t].item())
    assert rel_close(p[:642].sum().item(), 0.899506)
    for t, expected in [(0, 1.0e-4), (100, 0.104858), (500, 0.922203), (999, 0.99996)]:
        assert rel_close(w[t].item(), expected, rel=5e-6), (t, w[t].item())
    # P2 with k = gamma = 1 is exactly 1 - abar.
    torch.testing.assert_close(w, 1.0 - s.alphas_cumprod_float64, rtol=1e-12, atol=0)
    below = s.batch_timestep_probabilities(256)[:642].sum().item()
    assert round(below, 3) == 0.949


def test_speed_reference_values():
    s = SpeeDiTScheduler.from_preset("speed")
    assert s.tau_step == 700 and s.meaningful_step == 642
    p, w = s.timestep_probabilities(), s.loss_weights()
    assert rel_close(p[0].item(), 1.315789e-03) and rel_close(p[699].item(), 1.315789e-03)
    assert rel_close(p[700].item(), 2.631579e-04) and rel_close(p[999].item(), 2.631579e-04)
    assert p[0].item() == pytest.approx(5 / (1000 + 700 * 4), rel=1e-12)
    expected = {0: 0.408786, 100: 0.538903, 500: 0.458032, 699: 0.4072, 700: 1.0, 999: 1.0}
    for t, value in expected.items():
        assert rel_close(w[t].item(), value, rel=1e-6 if t != 699 else 1e-4), (t, w[t].item())
    h = np.gradient((1.0 - s.alphas_cumprod_float64).numpy())
    assert int(np.argmax(h)) == 219
    assert w[219].item() == pytest.approx(0.6, abs=1e-12)  # the ceiling lambda


def test_sum_to_one_and_positive_for_every_preset():
    for name in PRESETS:
        s = SpeeDiTScheduler.from_preset(name)
        p, w = s.timestep_probabilities(), s.loss_weights()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (p > 0).all() and (w > 0).all() and torch.isfinite(w).all()
        assert s.batch_timestep_probabilities(255).sum().item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Sampling: goodness of fit against the probability vector, duals included
# ---------------------------------------------------------------------------------------------
def _chi_square_pvalue(samples: torch.Tensor, probabilities: torch.Tensor, bins: int = 50) -> float:
    """Chi-square over `bins` groups of consecutive steps (expected counts >> 5 in every group)."""
    T = len(probabilities)
    group = torch.arange(T) * bins // T
    observed = torch.zeros(bins).index_add_(0, group[samples], torch.ones(len(samples)))
    expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, group, probabilities) * len(samples)
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("preset", ["uniform", "speed", "speedit-v1", "logit-normal"])
@pytest.mark.parametrize("dual", [None, True, False])
def test_sampling_goodness_of_fit(preset, dual):
    s = SpeeDiTScheduler.from_preset(preset, dual_sampling=dual)
    batch, n_batches = 250, 480  # 120,000 draws
    generator = torch.Generator().manual_seed(1234)
    draws = torch.cat([s.sample_timesteps(batch, generator)[0] for _ in range(n_batches)])
    assert draws.min() >= 0 and draws.max() < 1000
    expected = s.batch_timestep_probabilities(batch)
    assert _chi_square_pvalue(draws, expected) > 1e-3
    # The test has power: the same draws are rejected against uniform (except for uniform itself).
    if preset != "uniform" or s.uses_dual_sampling:
        assert _chi_square_pvalue(draws, torch.full((1000,), 1e-3, dtype=torch.float64)) < 1e-6


def test_dual_split_matches_the_published_odd_split():
    s = SpeeDiTScheduler.from_preset("speed")
    t, w = s.sample_timesteps(7, torch.Generator().manual_seed(0))
    drawn, duals = t[:4], t[4:]  # 7 // 2 + 1 drawn, then their first 3 duals
    m = s.meaningful_step
    expected_duals = torch.where(drawn < m, m - drawn, drawn - m)[:3]
    assert torch.equal(duals, expected_duals)
    torch.testing.assert_close(w, s.loss_weights()[t].float())
    t1, _ = s.sample_timesteps(1, torch.Generator().manual_seed(0))
    assert t1.shape == (1,)


def test_sampling_is_reproducible_and_vectorised():
    s = SpeeDiTScheduler()
    a = s.sample_timesteps(64, torch.Generator().manual_seed(7))
    b = s.sample_timesteps(64, torch.Generator().manual_seed(7))
    c = s.sample_timesteps(64, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.int64 and a[1].dtype == torch.float32
    assert a[0].device.type == "cpu"
    with pytest.raises(ValueError, match="batch_size=0"):
        s.sample_timesteps(0)


# ---------------------------------------------------------------------------------------------
# Weighting presets
# ---------------------------------------------------------------------------------------------
def test_min_snr_is_correct_for_each_prediction_type():
    snr = SpeeDiTScheduler().snr()
    eps = SpeeDiTScheduler.from_preset("min-snr").loss_weights()
    torch.testing.assert_close(eps, torch.clamp(snr, max=5.0) / snr, rtol=1e-12, atol=0)
    assert eps[0].item() == pytest.approx(5.0 / snr[0].item()) and eps[999].item() == 1.0
    # Not the published code's 5 * (1 - abar).
    assert not torch.allclose(eps, 5 * (1 - SpeeDiTScheduler().alphas_cumprod_float64))
    v = SpeeDiTScheduler.from_preset("min-snr", prediction_type="v_prediction").loss_weights()
    torch.testing.assert_close(v, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-12, atol=0)
    x0 = SpeeDiTScheduler.from_preset("min-snr", prediction_type="sample", min_snr_gamma=2.0).loss_weights()
    torch.testing.assert_close(x0, torch.clamp(snr, max=2.0), rtol=1e-12, atol=0)
    zero_snr = SpeeDiTScheduler.from_preset("min-snr", rescale_betas_zero_snr=True).loss_weights()
    assert zero_snr[-1].item() == 1.0 and torch.isfinite(zero_snr).all()


def test_p2_and_none_and_flat_speed():
    snr = SpeeDiTScheduler().snr()
    p2 = SpeeDiTScheduler.from_preset("p2", p2_k=2.0, p2_gamma=0.5).loss_weights()
    torch.testing.assert_close(p2, 1 / (2.0 + snr) ** 0.5, rtol=1e-12, atol=0)
    assert torch.equal(SpeeDiTScheduler.from_preset("uniform").loss_weights(), torch.ones(1000, dtype=torch.float64))
    flat = SpeeDiTScheduler(speed_lambda=0.5).loss_weights()  # lambda 0.5: 0.5 everywhere before tau
    assert torch.all(flat[:700] == 0.5) and torch.all(flat[700:] == 1.0)


def test_sampling_and_weighting_are_independent():
    s = SpeeDiTScheduler(timestep_sampling="uniform", loss_weighting="speed")
    assert torch.allclose(s.timestep_probabilities(), torch.full((1000,), 1e-3, dtype=torch.float64))
    torch.testing.assert_close(s.loss_weights(), SpeeDiTScheduler.from_preset("speed").loss_weights())
    assert not s.uses_dual_sampling


# ---------------------------------------------------------------------------------------------
# Other schedules and lengths
# ---------------------------------------------------------------------------------------------
def test_tau_and_meaningful_step_scale_with_num_train_timesteps():
    # The same continuous process with twice the steps: betas halve.
    s2 = SpeeDiTScheduler(num_train_timesteps=2000, beta_start=0.00005, beta_end=0.01)
    assert s2.tau_step == 1400
    assert abs(s2.meaningful_step - 2 * 642) <= 2
    p = s2.timestep_probabilities()
    assert p[0].item() == pytest.approx(5 / (2000 + 1400 * 4))
    t, _ = s2.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert t.max() < 2000


BETA_SCHEDULES = [
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"rescale_betas_zero_snr": True},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"num_train_timesteps": 100},
]


@pytest.mark.parametrize("kwargs", BETA_SCHEDULES)
def test_every_beta_schedule(kwargs):
    for preset in PRESETS:
        s = SpeeDiTScheduler.from_preset(preset, **kwargs)
        # Same schedule as DDPMScheduler's float32 tables, only more precise.
        torch.testing.assert_close(s.alphas_cumprod_float64.float(), s.alphas_cumprod, rtol=0, atol=2e-5)
        T = s.config.num_train_timesteps
        assert 0 < s.meaningful_step <= T
        p, w = s.timestep_probabilities(), s.loss_weights()
        assert p.sum().item() == pytest.approx(1.0) and torch.isfinite(w).all()
        t, _ = s.sample_timesteps(512, torch.Generator().manual_seed(0))
        assert 0 <= t.min() and t.max() < T


@pytest.mark.parametrize("kwargs", [*BETA_SCHEDULES, {"beta_schedule": "laplace"}, {}])
def test_one_float64_table_for_scheduler_loss_and_sampler(kwargs):
    """`float64_schedule` is the only source of float64 tables: the scheduler holds it, the loss
    reads the scheduler's tensors, and the sampler built from the scheduler's config gets equal ones."""
    s = SpeeDiTScheduler(**kwargs)
    schedule = float64_schedule(s.config)
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    assert s.betas_float64 is s.schedule_float64.betas and s.alphas_cumprod_float64 is s.schedule_float64.alphas_cumprod
    assert torch.equal(s.betas_float64, schedule.betas) and torch.equal(
        s.alphas_cumprod_float64, schedule.alphas_cumprod
    )
    assert torch.equal(schedule.alphas, 1.0 - schedule.betas)
    assert torch.equal(schedule.alphas_cumprod, torch.cumprod(schedule.alphas, dim=0))
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    if not s.config.rescale_betas_zero_snr:  # (diffusers rescales in float32: it rounds along the way)
        # The float64 betas are diffusers' float32 betas before the rounding.
        torch.testing.assert_close(schedule.betas.float(), s.betas, rtol=1e-6, atol=1e-7)

    assert DiTLoss(s).schedule is s.schedule_float64
    sampler = use_float64_tables(training_sampler(s, "ddpm", learned_variance=True, clip_sample=False))
    assert torch.equal(sampler.betas, schedule.betas)
    assert torch.equal(sampler.alphas_cumprod, schedule.alphas_cumprod)
    if s.config.rescale_betas_zero_snr:
        assert sampler.alphas_cumprod[-1].item() == 0.0  # the sampler keeps the rescaling too


def test_float64_cosine_betas_round_to_diffusers_float32_betas():
    for kind in ("cosine", "laplace"):
        ours = betas_for_alpha_bar(1000, alpha_transform_type=kind)
        assert ours.dtype == torch.float64
        assert torch.equal(ours.float(), diffusers_betas_for_alpha_bar(1000, alpha_transform_type=kind))


def test_float64_schedule_rejects_unknown_schedules():
    config = dict(SpeeDiTScheduler().config)
    with pytest.raises(NotImplementedError, match="cosine"):
        float64_schedule({**config, "beta_schedule": "cosine"})


def test_string_options_are_typed_and_every_argument_is_documented():
    hints = typing.get_type_hints(SpeeDiTScheduler.__init__)
    assert typing.get_args(hints["timestep_sampling"]) == TIMESTEP_SAMPLINGS
    assert typing.get_args(hints["loss_weighting"]) == LOSS_WEIGHTINGS
    for name in ("beta_schedule", "variance_type", "prediction_type", "timestep_spacing"):
        assert typing.get_origin(hints[name]) is typing.Literal, name
    assert "laplace" in typing.get_args(hints["beta_schedule"])
    assert set(typing.get_args(hints["variance_type"])) >= {"fixed_small", "learned_range"}
    # diffusers-style `Args:`: every argument, with its type and its default.
    headers = dict(re.findall(r"^ {4}(\w+) \((.+)\):$", inspect.getdoc(SpeeDiTScheduler), flags=re.MULTILINE))
    for name, parameter in inspect.signature(SpeeDiTScheduler.__init__).parameters.items():
        if name == "self":
            continue
        assert name in headers, name
        if parameter.default is None:
            assert "*optional*" in headers[name], name
        else:
            (default,) = re.findall(r"defaults to `(.+)`$", headers[name])
            assert ast.literal_eval(default) == parameter.default, name


# ---------------------------------------------------------------------------------------------
# Validation, round trips, inheritance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"speed_lambda": 5.0}, r"speed_lambda=5\.0 .*\[0\.5, 1\.0\]"),
        ({"speed_lambda": 0.4}, r"speed_lambda=0\.4"),
        ({"speed_lambda": 1.01}, r"speed_lambda=1\.01"),
        ({"speed_k": 0.0}, r"speed_k=0\.0 .*\(0\.0, inf\)"),
        ({"speed_k": -1.0}, r"speed_k=-1\.0"),
        ({"speed_tau": 0.0}, r"speed_tau=0\.0 .*\(0\.0, 1\.0\)"),
        ({"speed_tau": 1.0}, r"speed_tau=1\.0"),
        ({"speed_tau": 700}, r"speed_tau=700"),
        ({"speed_tau": 0.0004}, r"speed_tau=0\.0004 gives step 0"),
        ({"min_snr_gamma": 0.0}, r"min_snr_gamma=0\.0"),
        ({"p2_gamma": -1.0}, r"p2_gamma=-1\.0"),
        ({"p2_k": 0.0}, r"p2_k=0\.0"),
        ({"logit_std": 0.0}, r"logit_std=0\.0"),
        ({"timestep_sampling": "cosine"}, r"timestep_sampling='cosine' is unknown"),
        ({"loss_weighting": "snr"}, r"loss_weighting='snr' is unknown"),
        ({"speed_lambda": float("nan")}, r"speed_lambda=nan"),
    ],
)
def test_invalid_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeeDiTScheduler(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"preset='fast' is unknown"):
        SpeeDiTScheduler.from_preset("fast")


def test_save_pretrained_round_trip(tmp_path):
    s = SpeeDiTScheduler.from_preset(
        "speedit-v1",
        speed_k=3.0,
        speed_tau=0.65,
        speed_lambda=0.8,
        dual_sampling=False,
        min_snr_gamma=4.0,
        logit_mean=-0.5,
        logit_std=1.5,
        num_train_timesteps=800,
        beta_schedule="scaled_linear",
    )
    s.save_pretrained(tmp_path)
    loaded = SpeeDiTScheduler.from_pretrained(tmp_path)
    assert type(loaded) is SpeeDiTScheduler
    for key, value in s.config.items():
        if not key.startswith("_"):
            assert loaded.config[key] == value, key
    assert torch.equal(loaded.timestep_probabilities(), s.timestep_probabilities())
    assert torch.equal(loaded.loss_weights(), s.loss_weights())
    # Stock diffusers can read the same folder as a plain DDPM scheduler.
    plain = DDPMScheduler.from_pretrained(tmp_path)
    assert torch.equal(plain.betas, s.betas)


def test_inherits_ddpm_behaviour():
    ours, ddpm = SpeeDiTScheduler(), DDPMScheduler()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(ours.add_noise(x, noise, t), ddpm.add_noise(x, noise, t))
    ours.set_timesteps(50)
    ddpm.set_timesteps(50)
    assert torch.equal(ours.timesteps, ddpm.timesteps)
    a = ours.step(noise, ours.timesteps[3], x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = ddpm.step(noise, ddpm.timesteps[3], x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b)
    assert math.isclose(ours.init_noise_sigma, 1.0)
