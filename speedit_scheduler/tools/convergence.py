# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Convergence comparison of timestep presets, as a driver over the trainer: every (preset,
seed) run is a `train_dit.py` run (a subprocess) with `--evaluation_steps`, so the published
curves are curves of the program users run. Runs of one seed share the model initialisation,
the data order and every random stream; only the noise scheduler's preset differs. Used by
`scripts/compare_convergence.py`, which turns the runs' `evaluations.jsonl` into a table and a
plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from ..evaluation.along_training import EVALUATION_FILE, read_evaluations


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
    device: str = "cpu"  # "cpu" hides the GPUs from the runs; "cuda" lets accelerate use them
    mixed_precision: str = "no"  # "bf16" autocast on GPUs
    compile: bool = False  # the trainer's compiled step (model and loss as one graph)
    compile_mode: str | None = None  # inductor's mode; "reduce-overhead" also captures CUDA graphs
    metric: str = "classifier"  # or "fid": ADM's FID/sFID/IS/precision/recall against reference_batch
    reference_batch: str | None = None  # ADM-format .npz of real images (scripts/evaluate.py --make_reference)
    inception_weights: str | None = None  # torch-fidelity's FID Inception weights file
    vae: str | None = None  # decodes latent data for the metric; default: the latents folder's VAE
    launcher: list[str] | None = None  # how a run starts, e.g. ["accelerate", "launch"]; None: this Python


def train_dit_args(config: ComparisonConfig, preset: str, seed: int, output_dir: str) -> list[str]:
    """The `train_dit.py` flags of one comparison run."""
    args = [
        "--train_data", config.train_data,
        "--output_dir", output_dir,
        "--speedit", preset,
        "--seed", str(seed),
        "--model", config.model,
        "--train_batch_size", str(config.batch_size),
        "--learning_rate", repr(config.learning_rate),
        "--ema_decay", repr(config.ema_decay),
        "--class_dropout_prob", repr(config.class_dropout_prob),
        "--max_train_steps", str(config.max_steps),
        "--learn_sigma" if config.learn_sigma else "--no-learn_sigma",
        "--mixed_precision", config.mixed_precision,
        "--allow_tf32",
        "--evaluation_steps", str(config.eval_every),
        "--evaluation_metric", config.metric,
        "--evaluation_samples_per_class", str(config.eval_samples_per_class),
        "--evaluation_inference_steps", str(config.eval_inference_steps),
        "--evaluation_sampler", config.eval_sampler,
        "--evaluation_guidance_scale", repr(config.guidance_scale),
        # a checkpoint per evaluation, so a killed comparison resumes where it stopped
        "--checkpointing_steps", str(config.eval_every),
        "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest",
        "--validation_steps", str(config.max_steps),
        "--validation_images_per_class", "2",
        "--validation_inference_steps", str(config.eval_inference_steps),
        "--validation_guidance_scale", "1.0",
        "--logging_steps", str(min(100, config.eval_every)),
        "--report_to", "none",
    ]  # fmt: skip
    optional = {
        "resolution": config.resolution,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "compile_mode": config.compile_mode,
        "reference_batch": config.reference_batch,
        "inception_weights": config.inception_weights,
        "pretrained_vae_model_name_or_path": config.vae,
    }
    for name, value in optional.items():
        if value is not None:
            args += [f"--{name}", str(value)]
    if config.compile:
        args.append("--compile")
    return args


def run_dir(output_dir: str, preset: str, seed: int) -> str:
    return os.path.join(output_dir, "runs", f"{preset}-seed{seed}")


def read_history(folder: str) -> list[dict]:
    return read_evaluations(os.path.join(folder, EVALUATION_FILE))


def run_one(
    trainer: str, preset: str, seed: int, config: ComparisonConfig, output_dir: str, threads: int | None = None
) -> dict:
    """One `train_dit.py` run of the comparison, resumed if an earlier comparison was cut short
    and skipped if it finished; its output goes to `train.log` in the run's folder. Returns
    {"preset", "seed", "history"}."""
    folder = run_dir(output_dir, preset, seed)
    history = read_history(folder)
    finished = os.path.isfile(os.path.join(folder, "model_index.json"))
    if not (finished and history and history[-1]["step"] == config.max_steps):
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if config.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if threads is not None:  # several runs at once: split the cores instead of oversubscribing them
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        command = [*(config.launcher or [sys.executable]), trainer, *train_dit_args(config, preset, seed, folder)]
        print(f"[{preset} seed {seed}] {' '.join(command)}", flush=True)
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, "train.log")
        with open(log_path, "a") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            with open(log_path) as log:
                last = (log.read().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{preset} seed {seed}: train_dit.py exited with {done.returncode}: {last} ({log_path})")
        history = read_history(folder)
    for record in history:
        print(f"[{preset} seed {seed}] step {record['step']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k != "step"), flush=True)  # fmt: skip
    return {"preset": preset, "seed": seed, "history": history}


def write_progress(path: str, runs: list[dict]) -> str:
    """`progress.jsonl`: every evaluation of `runs`, one line each with its preset and seed (the
    input of `runs_from_progress`, which also merges files of separate sessions)."""
    with open(path, "w") as f:
        for run in runs:
            for record in run["history"]:
                f.write(json.dumps({"preset": run["preset"], "seed": run["seed"], **record}) + "\n")
    return path


def collect_progress(output_dir: str) -> str:
    """`write_progress` of every run folder in `output_dir`, finished or not (a comparison cut
    short)."""
    runs_root = os.path.join(output_dir, "runs")
    runs = []
    for name in sorted(os.listdir(runs_root)) if os.path.isdir(runs_root) else []:
        preset, _, seed = name.rpartition("-seed")
        runs.append({"preset": preset, "seed": int(seed), "history": read_history(os.path.join(runs_root, name))})
    return write_progress(os.path.join(output_dir, "progress.jsonl"), runs)


def run_comparison(config: ComparisonConfig, trainer: str, output_dir: str, num_workers: int = 1) -> list[dict]:
    """Every (preset, seed) run, `num_workers` at a time, and their `progress.jsonl`."""
    os.makedirs(output_dir, exist_ok=True)
    jobs = [(preset, seed) for seed in config.seeds for preset in config.presets]
    threads = max(1, (os.cpu_count() or 1) // num_workers) if num_workers > 1 else None
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        runs = list(pool.map(lambda job: run_one(trainer, *job, config, output_dir, threads), jobs))
    write_progress(os.path.join(output_dir, "progress.jsonl"), runs)
    return runs


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
