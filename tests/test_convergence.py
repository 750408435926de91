import json
import math
import os
import sys

import numpy as np
import torch
from conftest import TINY_DIT_ARGS
from safetensors.torch import load_file

from speedit_scheduler.tools.convergence import markdown_table, runs_from_progress, speedup_table, steps_to_reach

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _progress_line(preset: str, seed: int, step: int, fd: float) -> str:
    return json.dumps({"preset": preset, "seed": seed, "step": step, "train_loss": 0.1, "frechet_distance": fd})


def test_steps_to_reach_interpolates():
    steps = np.array([100, 200, 300])
    assert steps_to_reach(steps, np.array([10.0, 6.0, 2.0]), 4.0) == 250.0
    assert steps_to_reach(steps, np.array([10.0, 6.0, 2.0]), 12.0) == 100.0
    assert math.isinf(steps_to_reach(steps, np.array([10.0, 6.0, 5.0]), 4.0))
    assert steps_to_reach(steps, np.array([0.1, 0.5, 0.9]), 0.7, lower_is_better=False) == 250.0


def test_speedup_of_a_preset_twice_as_fast():
    baseline = [{"step": s, "fd": 100.0 / s} for s in (100, 200, 400, 800)]
    fast = [{"step": s, "fd": 50.0 / s} for s in (100, 200, 400, 800)]  # reaches at s what uniform reaches at 2s
    runs = [{"preset": "uniform", "seed": 0, "history": baseline}, {"preset": "speed", "seed": 0, "history": fast}]
    rows = {(r["preset"], r["step"]): r for r in speedup_table(runs, "fd")}
    assert rows[("uniform", 400)]["speedup"] == 1.0
    assert rows[("speed", 200)]["speedup"] > 1.5 and rows[("speed", 200)]["baseline_steps"] < 800
    assert math.isinf(rows[("speed", 800)]["speedup"])  # 0.0625: uniform never gets there


def test_a_quality_the_baseline_beat_at_its_first_evaluation_is_an_upper_bound():
    # MNIST-32 on the GPU: speed's first evaluation (FD 233) was worse than uniform's (194), so
    # uniform got there at some step before its first evaluation: "at most 1.00x", not "1.00x".
    runs = [
        {"preset": "uniform", "seed": 0, "history": [{"step": 1000, "fd": 194.0}, {"step": 2000, "fd": 135.0}]},
        {"preset": "speed", "seed": 0, "history": [{"step": 1000, "fd": 233.0}, {"step": 2000, "fd": 106.0}]},
    ]
    rows = {(r["preset"], r["step"]): r for r in speedup_table(runs, "fd")}
    assert rows[("speed", 1000)]["upper_bound"] and rows[("speed", 1000)]["speedup"] == 1.0
    assert not rows[("uniform", 1000)]["upper_bound"] and not rows[("speed", 2000)]["upper_bound"]
    table = markdown_table(runs, ["fd"]).splitlines()
    assert table[4].endswith("| <= 1.00x (uniform was better at its first evaluation) |")
    assert table[2].endswith("| 1.00x |")


def test_progress_files_of_separate_sessions_merge_and_cut_runs_are_left_out(tmp_path, capsys):
    first = tmp_path / "a.jsonl"  # session 1: uniform and speed, seed 0, to step 3000
    first.write_text(
        "\n".join(_progress_line(p, 0, s, 100.0 / s) for p in ("uniform", "speed") for s in (1000, 2000, 3000)) + "\n"
    )
    second = tmp_path / "b.jsonl"  # session 2: seed 1 of both; speed was cut at step 2000
    second.write_text(
        "\n".join(
            [_progress_line("uniform", 1, s, 90.0 / s) for s in (1000, 2000, 3000)]
            + [_progress_line("speed", 1, s, 80.0 / s) for s in (1000, 2000)]
        )
        + "\n"
    )
    runs = runs_from_progress(str(first), str(second))
    assert sorted((r["preset"], r["seed"]) for r in runs) == [("speed", 0), ("uniform", 0), ("uniform", 1)]
    assert all([h["step"] for h in r["history"]] == [1000, 2000, 3000] for r in runs)
    assert "speed seed 1 stopped at step 2000 (others reached 3000): left out" in capsys.readouterr().err
    uniform_1 = next(r for r in runs if r["preset"] == "uniform" and r["seed"] == 1)
    assert uniform_1["history"][2]["frechet_distance"] == 90.0 / 3000


def test_comparison_runs_are_train_dit_runs_bit_for_bit(tmp_path, run_script):
    out = tmp_path / "conv"
    cmd = [
        "--presets",
        "uniform",
        "speed",
        "--seeds",
        "0",
        "--max_steps",
        "6",
        "--eval_every",
        "3",
        "--eval_samples_per_class",
        "2",
        "--eval_inference_steps",
        "3",
        *TINY_DIT_ARGS[2:],  # the preset is the comparison's default, S/2
        "--batch_size",
        "8",
        "--output_dir",
        str(out),
    ]
    one_thread = {"OMP_NUM_THREADS": "1"}  # tiny models: faster on one thread
    result = run_script("scripts/compare_convergence.py", cmd, extra_env=one_thread)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("results.json", "table.md", "convergence.png", "progress.jsonl"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert {(r["preset"], r["seed"]) for r in data["runs"]} == {("uniform", 0), ("speed", 0)}
    for run in data["runs"]:
        assert [h["step"] for h in run["history"]] == [3, 6]
        for h in run["history"]:
            assert h["frechet_distance"] >= 0 and 0 <= h["accuracy"] <= 1 and math.isfinite(h["train_loss"])
            assert all(h[f"mse_t_q{q}"] > 0 for q in (1, 2, 3, 4)) and h["eval_seconds"] > 0
    # The same initialisation and data: both presets start from identical weights, so their first
    # losses differ only through timesteps and weights, and the table reports both.
    table = (out / "table.md").read_text()
    assert "| uniform | 6 |" in table and "| speed | 6 |" in table and "speed-up vs uniform" in table
    rebuilt = runs_from_progress(str(out / "progress.jsonl"))
    assert sorted((r["preset"], len(r["history"])) for r in rebuilt) == [("speed", 2), ("uniform", 2)]
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A comparison run is a train_dit.py run: the same training settings typed by hand, without
    # any evaluation, give the very same weights, raw and EMA, bit for bit.
    direct = tmp_path / "direct"
    train = ["--train_data", "digits", "--speedit", "speed",
             "--seed", "0", "--model", "S/2", "--num_layers", "1", "--hidden_size", "32", "--num_attention_heads", "2",
             "--train_batch_size", "8", "--learning_rate", "1e-3", "--ema_decay", "0.99", "--max_train_steps", "6",
             "--validation_inference_steps", "2", "--validation_images_per_class", "1", "--report_to", "none",
             "--output_dir", str(direct)]  # fmt: skip
    result = run_script("train_dit.py", train, extra_env=one_thread)
    assert result.returncode == 0, result.stderr[-2000:]
    compared = out / "runs" / "speed-seed0"
    for weights in ("checkpoints/checkpoint-6/transformer", "checkpoints/checkpoint-6/transformer_ema", "transformer"):
        a = load_file(compared / weights / "diffusion_pytorch_model.safetensors")
        b = load_file(direct / weights / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    uniform = load_file(out / "runs" / "uniform-seed0" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(uniform[k], b[k]) for k in b), "the presets trained differently"

    # A second call finds every run finished and only rebuilds the report.
    again = run_script("scripts/compare_convergence.py", cmd, extra_env=one_thread)
    assert again.returncode == 0 and "train_dit.py" not in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "results.json").read_text())["runs"] == data["runs"]


def test_ablation_options_fixed_variance_and_ddim():
    """--eval_sampler picks the evaluation sampler, with the training schedule in every case, and
    evaluates fixed-variance (--no-learn_sigma) models with guidance."""
    import pytest
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    from speedit_scheduler import SpeeDiTScheduler
    from speedit_scheduler.data.loading import load_training_data
    from speedit_scheduler.evaluation.along_training import ClassifierMetric, EvaluationSampling, TrainingEvaluator
    from speedit_scheduler.models import create_dit
    from speedit_scheduler.pipeline_speedit import training_sampler

    training = SpeeDiTScheduler.from_preset("speed")
    ddpm_fixed = training_sampler(training, "ddpm", learned_variance=False, clip_sample=True)
    ddpm_learned = training_sampler(training, "ddpm", learned_variance=True, clip_sample=True)
    ddim = training_sampler(training, "ddim", learned_variance=True, clip_sample=False)
    assert type(ddpm_fixed) is DDPMScheduler and ddpm_fixed.config.variance_type == "fixed_small"
    assert ddpm_learned.config.variance_type == "learned_range"
    assert type(ddim) is DDIMScheduler and not ddim.config.clip_sample and not ddim.config.set_alpha_to_one
    for s in (ddpm_fixed, ddpm_learned, ddim):
        torch.testing.assert_close(s.alphas_cumprod, training.alphas_cumprod)
    assert ddpm_fixed.config.timestep_spacing == ddim.config.timestep_spacing == "linspace"
    with pytest.raises(ValueError, match="sampler 'bogus' is unknown"):
        training_sampler(training, "bogus", learned_variance=True, clip_sample=True)

    dataset = load_training_data("digits", None)
    model = create_dit("S/2", seed=0, sample_size=8, in_channels=1, num_classes=10, learn_sigma=False,
                       num_layers=1, hidden_size=32, num_attention_heads=2)  # fmt: skip
    sampling = EvaluationSampling(samples_per_class=1, sampler="ddim", guidance_scale=1.5, num_inference_steps=3)
    evaluator = TrainingEvaluator(ClassifierMetric(dataset), dataset, training, sampling, "cpu")
    values = evaluator(model.eval())
    assert values["frechet_distance"] > 0 and 0 <= values["accuracy"] <= 1
    assert values == evaluator(model), "every evaluation draws the same labels and noise"


def test_presets_run_without_uniform_get_their_speedup_once_merged(tmp_path):
    """A session may add presets to an earlier comparison: without a uniform run the table says
    so; merged with the uniform run's progress file, the speed-up is filled in."""
    earlier = tmp_path / "a.jsonl"
    earlier.write_text("\n".join(_progress_line("uniform", 0, s, 100.0 / s) for s in (100, 200, 400)) + "\n")
    added = tmp_path / "b.jsonl"
    added.write_text("\n".join(_progress_line("speedit-v1", 0, s, 50.0 / s) for s in (100, 200, 400)) + "\n")
    alone = markdown_table(runs_from_progress(str(added)), ["frechet_distance"])
    assert alone.count("no uniform run: merge one with --from_progress") == 3
    rows = {
        (r["preset"], r["step"]): r
        for r in speedup_table(runs_from_progress(str(earlier), str(added)), "frechet_distance")
    }
    assert rows[("speedit-v1", 100)]["speedup"] == 2.0 and rows[("speedit-v1", 200)]["speedup"] == 2.0


def test_denoising_error_by_region():
    """Per quarter of [0, T): a model that predicts zero noise has epsilon-MSE E[noise^2] = 1 in
    every quarter; one that predicts the true noise, 0. Timesteps and noise are fixed, so two
    calls agree exactly."""
    from types import SimpleNamespace

    import torch

    from speedit_scheduler import SpeeDiTScheduler
    from speedit_scheduler.data.loading import load_training_data
    from speedit_scheduler.evaluation.along_training import denoising_error_by_region

    dataset = load_training_data("digits", None)
    scheduler = SpeeDiTScheduler.from_preset("speed")

    def zero_model(x_t, timestep, class_labels):
        return SimpleNamespace(sample=torch.zeros(x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:]))

    errors = denoising_error_by_region(zero_model, scheduler, dataset, torch.device("cpu"), num_samples=400)
    assert list(errors) == ["mse_t_q1", "mse_t_q2", "mse_t_q3", "mse_t_q4"]
    assert all(abs(v - 1.0) < 0.05 for v in errors.values()), errors  # 100 x 64 noise values each
    assert errors == denoising_error_by_region(zero_model, scheduler, dataset, torch.device("cpu"), num_samples=400)

    x0 = dataset.get_batch(torch.arange(400))["samples"]
    abar = scheduler.alphas_cumprod

    def oracle(x_t, timestep, class_labels):  # inverts add_noise with the known clean samples
        a = abar[timestep].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x_t - a.sqrt() * x0) / (1 - a).sqrt())

    exact = denoising_error_by_region(oracle, scheduler, dataset, torch.device("cpu"), num_samples=400)
    assert all(v < 1e-6 for v in exact.values()), exact


def test_the_published_mnist32_report_is_what_its_progress_files_give():
    # docs/convergence.md and README quote this table; it must be the one the raw GPU
    # evaluations give with today's code (a change to the speed-up rule shows up here).
    from pathlib import Path

    report = Path(__file__).resolve().parents[1] / "docs" / "convergence-mnist32"
    runs = runs_from_progress(str(report / "progress-seed0.jsonl"), str(report / "progress-seed1.jsonl"))
    assert sorted((r["preset"], r["seed"]) for r in runs) == [
        ("speed", 0),
        ("speed", 1),
        ("uniform", 0),
        ("uniform", 1),
    ]
    assert all(r["history"][-1]["step"] == 10000 for r in runs)
    table = markdown_table(runs, ["frechet_distance", "accuracy"])
    assert table in (report / "table.md").read_text()
    assert "| speed | 3000 | 36.162 ± 10.876 | 0.145 | 1.58x |" in table
    results = json.loads((report / "results.json").read_text())
    assert results["config"]["max_steps"] == 10000 and results["config"]["seeds"] == [0, 1]


def test_imagenet_reproduction_command_dry_runs_on_tiny_settings(tmp_path, tiny_vae_dir, run_script):
    """scripts/reproduce_imagenet.sh end to end on the CPU, the ImageNet route on a tiny scale:
    class folders of images -> a latents folder (a tiny VAE) -> uniform and speed train_dit.py
    runs whose samples the VAE decodes and FID & co. judge (a random Inception, against a
    reference batch) -> table and plot; a second call finds everything done."""
    from PIL import Image
    from test_evaluate import random_inception, save_weights

    rng = np.random.default_rng(0)
    for c in ("n01440764", "n01443537", "n01484850"):
        os.makedirs(tmp_path / "imagenet" / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "imagenet" / c / f"{i}.png"
            )
    weights = save_weights(random_inception(), str(tmp_path / "inception.pth"))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "SPEEDIT_OUT": str(out), "SPEEDIT_LAUNCH": sys.executable, "SPEEDIT_VAE": tiny_vae_dir,
           "SPEEDIT_RESOLUTION": "16", "SPEEDIT_MODEL": "S/2",
           "SPEEDIT_MODEL_SIZE": "--num_layers 1 --hidden_size 32 --num_attention_heads 2", "SPEEDIT_BATCH_SIZE": "4",
           "SPEEDIT_MAX_STEPS": "2", "SPEEDIT_EVAL_EVERY": "2", "SPEEDIT_EVAL_SAMPLES_PER_CLASS": "2",
           "SPEEDIT_EVAL_INFERENCE_STEPS": "2", "SPEEDIT_DEVICE": "cpu", "SPEEDIT_MIXED_PRECISION": "no"}  # fmt: skip
    paths = [tmp_path / "imagenet", tmp_path / "ref.npz", weights]
    done = run_script("scripts/reproduce_imagenet.sh", paths, extra_env=env, launcher=["bash"])
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 12
    data = json.loads((out / "comparison" / "results.json").read_text())
    assert {(r["preset"], r["seed"]) for r in data["runs"]} == {("uniform", 0), ("speed", 0)}
    for run in data["runs"]:
        (h,) = run["history"]
        assert h["step"] == 2 and h["fid"] > 0 and h["sfid"] > 0 and h["is"] >= 1
        assert 0 <= h["precision"] <= 1 and 0 <= h["recall"] <= 1
    table = (out / "comparison" / "table.md").read_text()
    assert "fid (mean ± std)" in table and "| speed | 2 |" in table
    assert (out / "comparison" / "convergence.png").is_file()
    again = run_script("scripts/reproduce_imagenet.sh", paths, extra_env=env, launcher=["bash"])
    assert again.returncode == 0 and "train_dit.py" not in again.stdout and "extract" not in again.stderr.lower()
    missing = run_script("scripts/reproduce_imagenet.sh", [tmp_path / "nope", *paths[1:]], launcher=["bash"])
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr
    latents = ["--train_data", out / "latents", "--output_dir", tmp_path / "bad"]  # no pixels to classify
    bad = run_script("scripts/compare_convergence.py", latents)
    assert bad.returncode == 2 and "use --metric fid --reference_batch" in bad.stderr
