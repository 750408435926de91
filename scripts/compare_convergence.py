#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Does SpeeD train faster? Train the same DiT from the same initialisation and data order with
several timestep presets and compare sample quality along training.

    python scripts/compare_convergence.py                       # digits, small DiT, CPU
    python scripts/compare_convergence.py --train_data mnist10k.npz --resolution 32 \
        --model S/2 --num_layers 12 --hidden_size 384 --num_attention_heads 6 \
        --batch_size 256 --max_steps 10000 --eval_every 1000 --device cuda --mixed_precision bf16

    # ImageNet (or any) latents from scripts/extract_latents.py, judged by FID & co.:
    python scripts/compare_convergence.py --train_data latents/imagenet256 --metric fid \
        --reference_batch VIRTUAL_imagenet256_labeled.npz \
        --inception_weights weights-inception-2015-12-05-6726825d.pth \
        --model XL/2 --num_layers 28 --hidden_size 1152 --num_attention_heads 16 --device cuda --mixed_precision bf16

Writes results.json, table.md (quality per step and the speed-up against `uniform`) and
convergence.png to --output_dir. Quality (`--metric classifier`, pixel data): Frechet distance in
the features of a classifier trained on the real images, and the classifier's accuracy on
class-conditional samples; (`--metric fid`): ADM's FID, sFID, IS, precision and recall against a
reference batch, through scripts/evaluate.py's Inception network.

Every (preset, seed) run is a `train_dit.py` run with `--evaluation_steps`, in
--output_dir/runs/PRESET-seedS/ (a pipeline folder, its checkpoints and evaluations.jsonl). A
second call skips finished runs and resumes unfinished ones from their last checkpoint;
`--collect` rebuilds the report from whatever the runs reached.
"""

import argparse
import importlib.util
import os
import shlex
import sys

from speedit_scheduler import PRESETS
from speedit_scheduler.cli import ArgumentParser, run_cli
from speedit_scheduler.evaluation.along_training import METRIC_KEYS
from speedit_scheduler.tools.convergence import (
    ComparisonConfig,
    collect_progress,
    run_comparison,
    runs_from_progress,
    write_report,
)
from speedit_scheduler.training.engine import COMPILE_MODES


def parse_args(argv=None):
    defaults = ComparisonConfig()
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--presets",
        nargs="+",
        default=defaults.presets,
        choices=sorted(PRESETS),
        help="Speed-ups are against 'uniform'; without it, merge a uniform run later with --from_progress.",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds)
    p.add_argument(
        "--train_data",
        default=defaults.train_data,
        help="'digits', an .npz of images and labels, or a latents folder from scripts/extract_latents.py.",
    )
    p.add_argument("--resolution", type=int, default=None, help="Pad images to this side (32 for MNIST).")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--num_layers", type=int, default=defaults.num_layers)
    p.add_argument("--hidden_size", type=int, default=defaults.hidden_size)
    p.add_argument("--num_attention_heads", type=int, default=defaults.num_attention_heads)
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    p.add_argument("--ema_decay", type=float, default=defaults.ema_decay)
    p.add_argument("--max_steps", type=int, default=defaults.max_steps)
    p.add_argument("--eval_every", type=int, default=defaults.eval_every)
    p.add_argument("--eval_samples_per_class", type=int, default=defaults.eval_samples_per_class)
    p.add_argument("--eval_inference_steps", type=int, default=defaults.eval_inference_steps)
    p.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale)
    p.add_argument(
        "--learn_sigma",
        action=argparse.BooleanOptionalAction,
        default=defaults.learn_sigma,
        help="DiT's learned variance with the hybrid loss (default); --no-learn_sigma: epsilon-MSE only.",
    )
    p.add_argument(
        "--eval_sampler",
        choices=["ddpm", "ddim"],
        default=defaults.eval_sampler,
        help="ddpm: ancestral, as DiT evaluates (default); ddim: deterministic.",
    )
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--mixed_precision", choices=["no", "bf16"], default=defaults.mixed_precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU runs).")
    p.add_argument(
        "--compile_mode",
        default=None,
        choices=COMPILE_MODES,
        help="inductor's mode (implies --compile); reduce-overhead captures CUDA graphs (small models on GPUs).",
    )
    p.add_argument("--metric", choices=["classifier", "fid"], default=defaults.metric)
    p.add_argument("--reference_batch", default=None, help="--metric fid: ADM-format reference .npz.")
    p.add_argument("--inception_weights", default=None, help="--metric fid: the FID Inception weights file.")
    p.add_argument("--vae", default=None, help="Decoder of latent data (default: the latents folder's VAE).")
    p.add_argument("--num_workers", type=int, default=1, help="Runs in parallel (e.g. several on one GPU).")
    p.add_argument(
        "--trainer",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_dit.py"),
        help="The train_dit.py every run executes (default: this repository's).",
    )
    p.add_argument(
        "--launcher",
        default=None,
        help="How each run starts, e.g. 'accelerate launch --num_processes 8' (default: this Python).",
    )
    p.add_argument("--output_dir", default="convergence")
    p.add_argument(
        "--from_progress",
        nargs="+",
        default=None,
        help="Only rebuild the report from progress.jsonl files (several: runs made separately).",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="Only rebuild the report from the runs in --output_dir, finished or not (a comparison cut short).",
    )
    args = p.parse_args(argv)
    if args.eval_every < 1 or args.max_steps < args.eval_every:
        p.error(f"--eval_every {args.eval_every} must lie in [1, --max_steps {args.max_steps}].")
    if args.train_data != "digits" and not os.path.exists(args.train_data):
        p.error(
            f"--train_data {args.train_data!r} does not exist: "
            "give 'digits', an .npz file (e.g. MNIST) or a latents folder."
        )
    for path in args.from_progress or []:
        if not os.path.isfile(path):
            p.error(f"--from_progress {path!r} does not exist: give the progress.jsonl of an earlier run.")
    if args.metric == "fid" and not (args.from_progress or args.collect):
        if not args.reference_batch:
            p.error("--metric fid needs --reference_batch (make one with scripts/evaluate.py --make_reference).")
        if not os.path.isfile(args.reference_batch):
            p.error(f"--reference_batch {args.reference_batch!r} does not exist.")
    if not os.path.isfile(args.trainer):
        p.error(f"--trainer {args.trainer!r} does not exist: give the path of train_dit.py.")
    if args.metric == "classifier" and os.path.isdir(args.train_data):
        p.error("a latents folder has no pixels for the classifier metric: use --metric fid --reference_batch REF.npz.")
    if importlib.util.find_spec("matplotlib") is None:
        p.error("the convergence plot needs matplotlib: pip install -e '.[plots]'.")
    return args


def main(argv=None):
    args = parse_args(argv)
    fields = ComparisonConfig.__dataclass_fields__
    config = ComparisonConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "launcher"})
    if args.launcher:
        config.launcher = shlex.split(args.launcher)
    command = "python scripts/compare_convergence.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.collect:
        runs = runs_from_progress(collect_progress(args.output_dir))
    elif args.from_progress:
        runs = runs_from_progress(*args.from_progress)
    else:
        runs = run_comparison(config, args.trainer, args.output_dir, num_workers=args.num_workers)
    keys = METRIC_KEYS[args.metric]
    write_report(runs, config, args.output_dir, command, keys)
    print(f"Wrote {os.path.abspath(args.output_dir)}/{{results.json,table.md,convergence.png}}")


if __name__ == "__main__":
    run_cli(main)
