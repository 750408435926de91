#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Train a class-conditional DiT with SpeeDiT timestep adjustment.

    accelerate launch [--config_file accelerate_configs/...] train_dit.py --train_data ... --output_dir ...
    python train_dit.py --demo        # offline: a small DiT on scikit-learn's digits, on the CPU

Defaults follow the DiT / SpeeD ImageNet recipe: AdamW at a constant 1e-4 without weight decay,
EMA 0.9999 every step, label dropout 0.1, DiT's hybrid loss, SpeeD (k=5, tau=0.7, lambda=0.6).
The batch size is per device: 32 on 8 GPUs is DiT's global batch of 256.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import logging
import os
import shutil
import sys
import time

from speedit_scheduler.cli import ArgumentParser, UserError, check_writable_folder, run_cli
from speedit_scheduler.options import (
    COMPILE_MODES,
    DIT_PRESETS,
    EVALUATION_METRICS,
    LOSS_WEIGHTINGS,
    LR_SCHEDULERS,
    PRESETS,
    REPORT_TO,
    TIMESTEP_SAMPLINGS,
    TRACKERS,
)

PUSH_SNAPSHOT_PREFIX = ".hub-push-step-"  # the pipeline at a checkpoint, while it uploads
# The flags that shape a new model; a pretrained one brings its own.
ARCHITECTURE_FLAGS = ("model", "num_layers", "hidden_size", "num_attention_heads", "learn_sigma")

# What `--demo` sets unless given explicitly: a DiT small enough to train on 2 CPU cores in
# minutes on the 8x8 digits, whose samples a digit classifier recognises.
DEMO_DEFAULTS = {
    "train_data": "digits",
    "output_dir": "dit-digits-demo",
    "model": "S/2",
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "train_batch_size": 64,
    "max_train_steps": 3000,
    "learning_rate": 1e-3,
    "ema_decay": 0.999,
    "checkpointing_steps": 1000,
    "checkpoints_total_limit": 1,
    "validation_steps": 3000,
    "validation_guidance_scale": 2.0,
    "validation_inference_steps": 100,
    "logging_steps": 50,
}


def build_parser() -> ArgumentParser:
    """Every flag, with its help, default and choices (`--help` lists them)."""
    p = ArgumentParser(description=__doc__)
    demo = ", ".join(f"--{k} {v}" for k, v in DEMO_DEFAULTS.items())
    p.add_argument("--demo", action="store_true", help=f"Offline demo on scikit-learn's digits; sets {demo} "
                   "unless given.")  # fmt: skip
    data = p.add_argument_group("data")
    data.add_argument(
        "--train_data",
        default=None,
        help="'digits', a latents folder from scripts/extract_latents.py, or an .npz of uint8 images (N x H x W "
        "[x C]) and labels. Required unless --demo.",
    )
    data.add_argument("--resolution", type=int, default=None, help="Pad pixel data to this side (28 -> 32 for MNIST).")
    data.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="VAE of latent data, saved in the pipeline. Default: the one the latents folder was extracted with.",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Start from this DiT instead of a new one: a pipeline folder (an export, a converted original "
        "checkpoint), a transformer folder, a checkpoint-N folder or a Hub id. Its weights start the model and "
        "its EMA; its architecture replaces --model and the size flags.",
    )
    model.add_argument("--revision", default=None, help="Hub revision of --pretrained_model_name_or_path.")
    model.add_argument("--model", default="XL/2", choices=DIT_PRESETS, metavar="PRESET",
                       help=f"DiT preset, one of {', '.join(DIT_PRESETS)}.")  # fmt: skip
    model.add_argument("--num_layers", type=int, default=None, help="Override the preset's depth.")
    model.add_argument("--hidden_size", type=int, default=None, help="Override the preset's width.")
    model.add_argument("--num_attention_heads", type=int, default=None, help="Override the preset's heads.")
    model.add_argument("--learn_sigma", action=argparse.BooleanOptionalAction, default=True,
                       help="Learn the variance with DiT's hybrid loss (--no-learn_sigma: eps MSE).")  # fmt: skip
    model.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations (less memory).")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention (CUDA; the `xformers` extra) instead of PyTorch's SDPA.")  # fmt: skip
    model.add_argument("--compile", action="store_true", help="torch.compile the model and its loss as one graph.")
    model.add_argument(
        "--compile_mode",
        default=None,
        choices=COMPILE_MODES,
        help="inductor's mode (implies --compile); reduce-overhead captures CUDA graphs (small models).",
    )
    model.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere or newer GPUs.")
    speed = p.add_argument_group("SpeeDiT (which timesteps a batch trains on and how much each counts)")
    speed.add_argument("--speedit", default="speed", choices=sorted(PRESETS),
                       help="Timestep preset: speed (SpeeD), speedit-v1, uniform (DiT), or another.")  # fmt: skip
    speed.add_argument("--timestep_sampling", default=None, choices=TIMESTEP_SAMPLINGS,
                       help="Override the preset's timestep sampling.")  # fmt: skip
    speed.add_argument("--loss_weighting", default=None, choices=LOSS_WEIGHTINGS,
                       help="Override the preset's loss weighting.")  # fmt: skip
    speed.add_argument("--dual_sampling", choices=["on", "off"], default=None, help="Override SpeeD's dual sampling.")
    speed.add_argument("--speed_k", type=float, default=None, help="SpeeD's suppression of the steady zone (5).")
    speed.add_argument("--speed_tau", type=float, default=None,
                       help="SpeeD's threshold, a fraction of num_train_timesteps (0.7).")  # fmt: skip
    speed.add_argument("--speed_lambda", type=float, default=None, help="SpeeD's weight of the fast zone (0.6).")
    speed.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR-gamma weighting with this gamma, as diffusers' scripts (5.0 is common); "
                       "sets --loss_weighting min-snr.")  # fmt: skip
    speed.add_argument("--p2_k", type=float, default=None, help="P2 weighting's k (with --loss_weighting p2).")
    speed.add_argument("--p2_gamma", type=float, default=None, help="P2 weighting's gamma (with --loss_weighting p2).")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=32, help="Per device: 32 on 8 GPUs is DiT's 256.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--max_train_steps", type=int, default=400_000, help="Optimizer steps of the whole run.")
    optim.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW's learning rate.")
    optim.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' LR schedule.")
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of the LR schedule.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2.")
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW's weight decay (DiT: 0).")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=0.0, help="Gradient clipping; 0: none (as DiT).")
    optim.add_argument("--class_dropout_prob", type=float, default=0.1,
                       help="Label dropout for classifier-free guidance, once per sample.")  # fmt: skip
    optim.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                       help="Keep an EMA of the weights; samples and exports use it.")  # fmt: skip
    optim.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step (DiT: 0.9999).")
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Autocast precision. Default: accelerate's config (bf16 in ours).")  # fmt: skip
    optim.add_argument("--seed", type=int, default=0,
                       help="Seed of the weights, the data order and every random number of training.")  # fmt: skip
    out = p.add_argument_group("output, checkpoints, logging")
    out.add_argument("--output_dir", default=None, help="The run's folder: the pipeline, checkpoints/, logs/. "
                     "Required unless --demo.")  # fmt: skip
    out.add_argument("--checkpointing_steps", type=int, default=10_000, help="Checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest' (the newest intact checkpoint, if any) or a checkpoint-N folder.")  # fmt: skip
    out.add_argument("--report_to", default="tensorboard", choices=REPORT_TO, help="Tracker(s) to log to.")
    out.add_argument("--tracker_project_name", default="train_dit", help="Project (run group) name in the tracker.")
    out.add_argument("--logging_dir", default="logs", help="Tracker logs, a folder inside --output_dir.")
    out.add_argument("--logging_steps", type=int, default=100, help="Log loss, LR and images/s every N steps.")
    out.add_argument("--validation_steps", type=int, default=10_000, help="Log a sample grid every N steps.")
    out.add_argument("--validation_guidance_scale", type=float, default=4.0, help="Guidance of the grid (1: none).")
    out.add_argument("--validation_inference_steps", type=int, default=50, help="Sampling steps of the grid.")
    out.add_argument("--validation_images_per_class", type=int, default=8, help="Grid images of each class.")
    quality = p.add_argument_group("quality along training (evaluations.jsonl in --output_dir, and the trackers)")
    quality.add_argument("--evaluation_steps", type=int, default=None,
                         help="Evaluate the EMA model every N steps and at the end. Default: never.")  # fmt: skip
    quality.add_argument(
        "--evaluation_metric",
        choices=EVALUATION_METRICS,
        default=None,
        help="classifier: Frechet distance and accuracy of a classifier of the real images (pixel data); "
        "fid: ADM's FID, sFID, IS, precision, recall against --reference_batch. Default: classifier for "
        "pixel data, fid for latents.",
    )
    quality.add_argument("--evaluation_samples_per_class", type=int, default=50, help="Samples of each class.")
    quality.add_argument("--evaluation_sampler", choices=["ddpm", "ddim"], default="ddpm",
                         help="ddpm: DiT's ancestral sampler with the learned variance.")  # fmt: skip
    quality.add_argument("--evaluation_guidance_scale", type=float, default=1.0, help="1: no guidance.")
    quality.add_argument("--evaluation_inference_steps", type=int, default=50, help="Sampling steps.")
    quality.add_argument("--evaluation_batch_size", type=int, default=500, help="Samples per pipeline call.")
    quality.add_argument("--reference_batch", default=None, help="fid: ADM reference .npz (scripts/evaluate.py).")
    quality.add_argument("--inception_weights", default=None, help="fid: the FID Inception weights file.")
    hub = p.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline folder at the end (verified).")
    hub.add_argument("--push_checkpoints_to_hub", action="store_true",
                     help="Also upload the pipeline at every checkpoint, in the background.")  # fmt: skip
    hub.add_argument("--hub_model_id", default=None, help="The repo to push to, e.g. your-name/dit-xl-2-speed.")
    hub.add_argument("--hub_token", default=None, help="Default: HF_TOKEN or the `hf auth login` token.")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repo as private.")
    return p


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags as given, with --demo's defaults filled in; argparse's checks only (no torch)."""
    args = build_parser().parse_args(argv)
    explicit = {a.lstrip("-").split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a[:2] == "--"}
    args.explicit_flags = sorted(explicit)
    if args.demo:
        for key, value in DEMO_DEFAULTS.items():
            if key not in explicit:
                setattr(args, key, value)
    return args


if __name__ == "__main__":
    FLAGS = run_cli(parse_flags)  # before torch is imported: --help and argparse's errors return at once

# ruff: noqa: E402 (the imports below are heavy: they load after the flags are parsed)
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from speedit_scheduler import SpeeDiTPipeline, SpeeDiTScheduler
from speedit_scheduler.data import DeterministicOrder, load_training_data
from speedit_scheduler.evaluation.along_training import (
    EVALUATION_FILE,
    EvaluationSampling,
    ProgressFile,
    TrainingEvaluator,
    build_metric,
)
from speedit_scheduler.evaluation.grids import class_grid
from speedit_scheduler.losses import DiTLoss
from speedit_scheduler.models import (
    create_dit,
    disable_internal_label_dropout,
    dit_config,
    null_class_label,
    save_timestep_sinusoid,
    set_timestep_freq_shift,
    timestep_freq_shift,
)
from speedit_scheduler.pipeline_speedit import training_sampler
from speedit_scheduler.training.checkpoints import (
    checkpoint_step,
    choose_resume_checkpoint,
    read_checkpoint_state,
    register_checkpoint_hooks,
    save_checkpoint,
)
from speedit_scheduler.training.ema import create_ema
from speedit_scheduler.training.engine import TrainingEngine
from speedit_scheduler.training.export import build_pipeline, save_pipeline
from speedit_scheduler.training.hub import (
    BackgroundPusher,
    check_hub_access,
    push_folder_to_hub,
    resolve_hub_token,
    write_model_card,
)
from speedit_scheduler.training.pretrained import check_pretrained_fits, load_pretrained_dit, locate_pretrained_dit
from speedit_scheduler.training.run_config import (
    NOISE_SCHEDULER_FLAGS,
    STATE_SHAPING,
    apply_learning_rate,
    changed_values,
    check_resume_config,
    dataset_fingerprint,
    extend_segments,
)
from speedit_scheduler.utils import seeded_generator

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, parsed and checked: every bad value is a one-line error before any work."""
    return validate_args(parse_flags(argv))


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every bad flag is a one-line error before any model, data or process group is created."""
    if args.train_data is None:
        raise UserError("--train_data is required ('digits' or an .npz file), or use --demo.")
    if args.output_dir is None:
        raise UserError("--output_dir is required.")
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "checkpointing_steps",
        "logging_steps",
        "validation_steps",
        "validation_inference_steps",
        "validation_images_per_class",
        "evaluation_samples_per_class",
        "evaluation_inference_steps",
        "evaluation_batch_size",
    ):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1.")
    for name in ("resolution", "num_layers", "hidden_size", "num_attention_heads", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1 (or left out).")
    for name in ("lr_warmup_steps", "seed"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 0.")
    for name in ("adam_weight_decay", "max_grad_norm"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 0.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError(f"--{name} {getattr(args, name)} must lie in [0, 1).")
    if not args.adam_epsilon > 0:
        raise UserError(f"--adam_epsilon {args.adam_epsilon} must be positive.")
    if args.lr_warmup_steps > args.max_train_steps:
        raise UserError(
            f"--lr_warmup_steps {args.lr_warmup_steps} exceeds --max_train_steps {args.max_train_steps}: "
            "warm up for fewer steps than the run has."
        )
    for flag in ("validation_guidance_scale", "evaluation_guidance_scale"):
        if not getattr(args, flag) >= 1.0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be >= 1 (1: no guidance).")
    trackers = list(TRACKERS) if args.report_to == "all" else [args.report_to] if args.report_to != "none" else []
    for tracker in trackers:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise UserError(
                f"--report_to {args.report_to} needs the {TRACKERS[tracker]!r} package, which is not installed: "
                f"pip install {TRACKERS[tracker]}, or pass --report_to none."
            )
    if args.snr_gamma is not None and args.loss_weighting not in (None, "min-snr"):
        raise UserError(
            f"--snr_gamma turns on Min-SNR weighting but --loss_weighting is {args.loss_weighting}: drop one of them."
        )
    if os.path.isabs(args.logging_dir) or ".." in args.logging_dir.split(os.sep):
        raise UserError(f"--logging_dir {args.logging_dir!r} must be a folder name inside --output_dir, like logs.")
    if args.pretrained_model_name_or_path is not None:
        given = [f"--{name}" for name in ARCHITECTURE_FLAGS if name in args.explicit_flags or
                 (name == "learn_sigma" and "no-learn_sigma" in args.explicit_flags)]  # fmt: skip
        if given:
            raise UserError(
                f"{given[0]} and --pretrained_model_name_or_path exclude each other: the pretrained model's "
                "architecture is used; drop one."
            )
    elif args.revision is not None:
        raise UserError("--revision goes with a Hub id in --pretrained_model_name_or_path; drop it.")
    try:  # the model's shape, before any data is read (the data's size is checked against it later)
        patch = int(args.model.split("/")[1])
        dit_config(args.model, sample_size=patch, num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads)  # fmt: skip
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.evaluation_steps is not None and args.evaluation_steps < 1:
        raise UserError(f"--evaluation_steps {args.evaluation_steps} must be at least 1 (or left out: never).")
    if args.evaluation_steps is not None and args.evaluation_metric == "fid":
        if not args.reference_batch:
            raise UserError(
                "--evaluation_metric fid needs --reference_batch REF.npz "
                "(make one with scripts/evaluate.py --make_reference)."
            )
        if not os.path.isfile(args.reference_batch):
            raise UserError(f"--reference_batch {args.reference_batch!r} does not exist.")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise UserError(f"--class_dropout_prob {args.class_dropout_prob} must lie in [0, 1).")
    if not 0.0 < args.ema_decay < 1.0:
        raise UserError(f"--ema_decay {args.ema_decay} must lie in (0, 1).")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate {args.learning_rate} must be positive.")
    if args.enable_xformers_memory_efficient_attention and not torch.cuda.is_available():
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop it on CPU.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU.")
    if args.push_checkpoints_to_hub and not args.push_to_hub:
        raise UserError("--push_checkpoints_to_hub needs --push_to_hub.")
    if args.push_to_hub:
        if not args.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id (e.g. your-name/dit-xl-2-speed).")
        try:
            args.hub_token = resolve_hub_token(args.hub_token)
            check_hub_access(args.hub_model_id, args.hub_token, private=args.hub_private_repo)  # offline, 401: now
        except ValueError as error:
            raise UserError(f"{error}")
    try:
        scheduler_config = build_noise_scheduler(args).config
    except ValueError as error:
        raise UserError(f"{error}")
    num_train_timesteps = scheduler_config.num_train_timesteps
    sampling, weighting = scheduler_config.timestep_sampling, scheduler_config.loss_weighting
    acts = {  # each SpeeD / P2 parameter and whether this run's sampling or weighting reads it
        "speed_k": sampling == "speed",
        "speed_tau": "speed" in (sampling, weighting),
        "speed_lambda": weighting == "speed",
        "p2_k": weighting == "p2",
        "p2_gamma": weighting == "p2",
    }
    for name, used in acts.items():
        if getattr(args, name) is not None and not used:
            raise UserError(
                f"--{name} does nothing with timestep sampling {sampling!r} and loss weighting {weighting!r}: drop "
                "it, or pick a --speedit preset (or --timestep_sampling / --loss_weighting) that uses it."
            )
    for flag in ("validation_inference_steps", "evaluation_inference_steps"):
        if getattr(args, flag) > num_train_timesteps:
            raise UserError(
                f"--{flag} {getattr(args, flag)} exceeds the {num_train_timesteps} training timesteps: "
                f"use at most {num_train_timesteps} (DiT samples with 250)."
            )
    if args.resume_from_checkpoint not in (None, "latest") and checkpoint_step(args.resume_from_checkpoint) is None:
        raise UserError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder: "
            "give 'latest' or a path ending in checkpoint-<step>."
        )
    check_writable_folder(args.output_dir, "--output_dir")
    return args


def build_noise_scheduler(args: argparse.Namespace) -> SpeeDiTScheduler:
    overrides = {key: getattr(args, key) for key in NOISE_SCHEDULER_FLAGS if getattr(args, key) is not None}
    if args.snr_gamma is not None:  # diffusers' flag: a gamma turns Min-SNR weighting on
        overrides.update(loss_weighting="min-snr", min_snr_gamma=args.snr_gamma)
    if args.dual_sampling is not None:
        overrides["dual_sampling"] = args.dual_sampling == "on"
    return SpeeDiTScheduler.from_preset(args.speedit, **overrides)


def training_config(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """The run's configuration as recorded in checkpoints, trackers and the model card: every
    flag given or defaulted (never the token, never a local path of this machine's output)."""
    skip = {"hub_token", "demo", "output_dir", "resume_from_checkpoint", "explicit_flags"}
    config = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    config["mixed_precision"] = accelerator.mixed_precision
    config["num_processes"] = accelerator.num_processes
    config["global_batch_size"] = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return config


def tracker_hparams(config: dict) -> dict:
    """The config as trackers take it: numbers and booleans stay numbers, the rest becomes text."""
    return {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in config.items()}


def check_resume(args: argparse.Namespace, config: dict, resume_path: str, recorded: dict) -> dict[str, list]:
    """Refuse a resume whose flags would change the saved state; return the changes it applies."""
    step = recorded["step"]
    if args.max_train_steps < step:
        raise UserError(
            f"--max_train_steps {args.max_train_steps} is below the step of {resume_path} ({step}): "
            f"give at least {step}, or resume from an earlier checkpoint."
        )
    try:
        check_resume_config(recorded["config"], config, resume_path, [k for k in STATE_SHAPING if k != "data"])
    except ValueError as error:
        raise UserError(str(error)) from None
    return changed_values(recorded["config"], config)


def main(args: argparse.Namespace) -> str:
    checkpoints_dir = os.path.join(args.output_dir, "checkpoints")
    accelerator = Accelerator(
        # CPU-only multi-process runs (accelerate_configs/cpu.yaml, torchrun) communicate over gloo.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if args.use_ema and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "--use_ema with FSDP would average parameter shards; use DDP or DeepSpeed ZeRO-2 "
            "(accelerate_configs/multi_gpu_8.yaml, deepspeed_zero2.yaml) or pass --no-use_ema."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)
    device = accelerator.device

    # Resume: the checkpoint is verified (every file's checksum) and the flags compared with the
    # ones it was trained with, before any data or model is built.
    try:
        resume_path = choose_resume_checkpoint(accelerator, args.resume_from_checkpoint, checkpoints_dir)
    except ValueError as error:
        raise UserError(str(error)) from None
    config = training_config(args, accelerator)
    recorded = read_checkpoint_state(resume_path) if resume_path is not None else None
    changes = check_resume(args, config, resume_path, recorded) if recorded is not None else {}

    # Data and model: every check that can fail does so before training starts.
    try:
        pretrained = None
        if args.pretrained_model_name_or_path is not None:  # fine-tuning: found (or downloaded) before the data
            pretrained = locate_pretrained_dit(args.pretrained_model_name_or_path, args.revision)
        dataset = load_training_data(args.train_data, args.resolution)
        channels, size, _ = dataset.sample_shape
        if pretrained is not None:
            model = load_pretrained_dit(pretrained)
            check_pretrained_fits(model, pretrained.name_or_path, dataset.sample_shape, dataset.num_classes)
        else:
            model = create_dit(
                args.model,
                seed=args.seed,
                sample_size=size,
                in_channels=channels,
                num_classes=dataset.num_classes,
                learn_sigma=args.learn_sigma,
                num_layers=args.num_layers,
                hidden_size=args.hidden_size,
                num_attention_heads=args.num_attention_heads,
            )
        dataset.check_model_fits(model.config.sample_size, model.config.in_channels, model.config.num_embeds_ada_norm)
    except ValueError as error:  # the data and the model: one line naming the file or value
        raise UserError(str(error)) from None
    config["data"] = dataset_fingerprint(dataset)
    if recorded is not None:
        try:
            check_resume_config(recorded["config"], config, resume_path, keys=("data",))
        except ValueError as error:
            raise UserError(str(error)) from None
    disable_internal_label_dropout(model)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    vae, vae_path = load_vae(args, dataset, pretrained.vae_folder if pretrained is not None else None)

    # SpeeD lives in the noise scheduler: it draws each batch's timesteps and their loss weights.
    noise_scheduler = build_noise_scheduler(args)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=device.type == "cuda",
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    ema = create_ema(model, args.ema_decay) if args.use_ema else None
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(device)
    register_checkpoint_hooks(accelerator, ema)  # checkpoints hold transformer/ and transformer_ema/
    engine = TrainingEngine(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        noise_scheduler,
        DiTLoss(noise_scheduler),
        ema,
        class_dropout_prob=args.class_dropout_prob,
        null_label=null_class_label(accelerator.unwrap_model(model)),
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        compile=args.compile,
        compile_mode=args.compile_mode,
    )

    global_step = 0
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)  # verified and checked for code-running pickles above
        global_step = recorded["step"]
        apply_learning_rate(optimizer, lr_scheduler, args.learning_rate)  # the checkpoint's rate gives way
        for key, (old, new) in changes.items():
            logger.info(f"resumed with --{key} {new} (was {old}) from step {global_step}")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print("No checkpoint to resume from: starting a new run.")
    segments = extend_segments(recorded.get("segments") if recorded else None, config, global_step)
    evaluate = build_evaluation(args, accelerator, dataset, noise_scheduler, vae, global_step, resume_path)

    if accelerator.is_main_process:
        tracker_config = {**config, "segment_from_step": segments[-1]["from_step"]}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_hparams(tracker_config))
        logger.info(f"{len(dataset)} samples of shape {dataset.sample_shape}, {dataset.num_classes} classes")
        logger.info(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        logger.info(f"global batch {config['global_batch_size']}, steps {args.max_train_steps}, preset {args.speedit}")
    checkpoint_state = {
        "seed": args.seed,
        "class_names": dataset.class_names,
        "vae": vae_path,
        "config": config,
        "segments": segments,
    }

    # raw weights, EMA weights and AdamW's two moments: what a checkpoint holds, before the first
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint_bytes = parameter_bytes * (4 if ema is not None else 3)

    # Checkpoint pushes upload a snapshot of the pipeline in the background; training goes on.
    pusher = None
    if args.push_checkpoints_to_hub and accelerator.is_main_process:
        pusher = BackgroundPusher(args.hub_model_id, args.hub_token, private=args.hub_private_repo)
        for stale in glob.glob(os.path.join(args.output_dir, f"{PUSH_SNAPSHOT_PREFIX}*")):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)

    def checkpoint_now(step: int) -> None:
        engine.check_finite()
        save_checkpoint(
            accelerator, checkpoints_dir, step, checkpoint_state, args.checkpoints_total_limit, noise_scheduler,
            estimated_bytes=checkpoint_bytes,
        )  # fmt: skip
        _fault_injection("after_checkpoint", step)
        if args.push_checkpoints_to_hub:
            snapshot = os.path.join(args.output_dir, f"{PUSH_SNAPSHOT_PREFIX}{step}")
            export(accelerator, model, ema, noise_scheduler, dataset, vae, args, step, checkpoint_state, None, snapshot)
            if pusher is not None:
                pusher.submit(snapshot, f"step {step}", delete_when_done=True)

    # The training loop: one micro-step of the engine per batch; the data order and every random
    # number are functions of (seed, process, micro-step), so a resumed run continues exactly.
    order = DeterministicOrder(len(dataset), args.train_batch_size, accelerator.num_processes, args.seed)
    images_per_step = config["global_batch_size"]
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    model.train()
    last_log_time, last_log_step = time.perf_counter(), global_step
    micro_step = global_step * args.gradient_accumulation_steps
    while global_step < args.max_train_steps:
        _fault_injection("step", global_step)
        try:  # a latents shard is checked (finite, in range) the first time a batch reads it
            batch = dataset.get_batch(
                order.indices(micro_step, accelerator.process_index),
                seeded_generator("data", args.seed, accelerator.process_index, micro_step),
                device=device,
            )
        except ValueError as error:
            raise UserError(f"{error} (the checkpoints so far are intact)") from None
        engine.step(batch["samples"], batch["class_labels"], micro_step)  # SpeeD's t and w are drawn in here
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)

        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            engine.check_finite()
            elapsed = time.perf_counter() - last_log_time
            logs = {
                **engine.read_logs(),
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_second": (global_step - last_log_step) * images_per_step / max(elapsed, 1e-9),
            }
            accelerator.log(logs, step=global_step)
            for failure in pusher.failures() if pusher is not None else []:
                logger.warning(f"a checkpoint push failed: {failure}")
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_second']:.0f}")
            last_log_time, last_log_step = time.perf_counter(), global_step
        if evaluate is not None and (global_step % args.evaluation_steps == 0 or global_step == args.max_train_steps):
            evaluate(engine, global_step)  # before the checkpoint of this step: a resume never skips it
        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            checkpoint_now(global_step)
        if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process:
                grid = validation_grid(accelerator, model, ema, noise_scheduler, dataset, vae, args)
                log_grid(accelerator, grid, global_step)
            accelerator.wait_for_everyone()

    progress.close()
    engine.check_finite()
    if resume_path is None or recorded["step"] != global_step:
        checkpoint_now(global_step)  # the final state, so that a longer run can resume from it
    grid = None
    if accelerator.is_main_process:
        grid = validation_grid(accelerator, model, ema, noise_scheduler, dataset, vae, args)
        log_grid(accelerator, grid, global_step)
    export(accelerator, model, ema, noise_scheduler, dataset, vae, args, global_step, checkpoint_state, grid)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"Pipeline saved to {os.path.abspath(args.output_dir)}")
        print(f"Sample grid: {os.path.abspath(os.path.join(args.output_dir, 'samples.png'))}")
        for failure in pusher.wait() if pusher is not None else []:
            logger.warning(f"a checkpoint push failed: {failure}")
        if args.push_to_hub:  # the final push blocks and is verified; a failure leaves the output as it is
            try:
                push_folder_to_hub(
                    args.output_dir, args.hub_model_id, args.hub_token, f"step {global_step}",
                    private=args.hub_private_repo,
                )  # fmt: skip
            except ValueError as error:
                raise UserError(str(error)) from None
    return args.output_dir


def load_vae(args: argparse.Namespace, dataset, pretrained_vae: str | None = None) -> tuple:
    """The VAE that decodes latent data (None for pixel data) and its name or path. A latents
    folder records which VAE made it; else a pretrained pipeline's VAE, else SD's;
    `--pretrained_vae_model_name_or_path` overrides them."""
    if not dataset.latent:
        return None, None
    recorded = getattr(dataset, "vae_name_or_path", None)
    vae_path = args.pretrained_vae_model_name_or_path or recorded or pretrained_vae or "stabilityai/sd-vae-ft-ema"
    if recorded is not None and vae_path != recorded:
        logger.warning(f"the latents were extracted with the VAE {recorded!r}, but {vae_path!r} will decode them.")
    return AutoencoderKL.from_pretrained(vae_path), vae_path


def build_evaluation(args, accelerator, dataset, noise_scheduler, vae, global_step: int, resume_path):
    """`evaluate(engine, step)`: measure the EMA model, append the record to evaluations.jsonl
    and log it to the trackers; None without --evaluation_steps. The main process evaluates."""
    if args.evaluation_steps is None:
        return None
    kind = args.evaluation_metric or ("fid" if dataset.latent else "classifier")
    progress_file = None
    evaluator = None
    if accelerator.is_main_process:
        try:
            metric = build_metric(kind, dataset, args.reference_batch, args.inception_weights, accelerator.device)
        except ValueError as error:
            raise UserError(f"{error}")
        sampling = EvaluationSampling(
            samples_per_class=args.evaluation_samples_per_class,
            sampler=args.evaluation_sampler,
            guidance_scale=args.evaluation_guidance_scale,
            num_inference_steps=args.evaluation_inference_steps,
            seed=args.seed,
            batch_size=args.evaluation_batch_size,
        )
        decoder = vae.to(accelerator.device) if vae is not None else None
        evaluator = TrainingEvaluator(metric, dataset, noise_scheduler, sampling, accelerator.device, decoder)
        resumed_step = global_step if resume_path is not None else None
        progress_file = ProgressFile(os.path.join(args.output_dir, EVALUATION_FILE), resumed_step)
    started = time.perf_counter()

    def evaluate(engine: TrainingEngine, step: int) -> None:
        train_loss = engine.mean_loss("evaluation")  # every process takes part in the reduction
        if accelerator.is_main_process:
            eval_started = time.perf_counter()
            values = evaluator(ema_weights_model(accelerator, engine.model, engine.ema))
            now = time.perf_counter()
            record = {"step": step, "train_loss": train_loss, "seconds": now - started,
                      "eval_seconds": now - eval_started, **values}  # fmt: skip
            progress_file.append(record)
            accelerator.log({f"evaluation/{k}": v for k, v in values.items()}, step=step)
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        accelerator.wait_for_everyone()

    return evaluate


def ema_weights_model(accelerator: Accelerator, model, ema) -> DiTTransformer2DModel:
    """A standalone copy of the transformer holding the EMA weights (or the raw ones without EMA)."""
    unwrapped = accelerator.unwrap_model(model)
    copy = DiTTransformer2DModel.from_config(unwrapped.config).to(accelerator.device)
    set_timestep_freq_shift(copy, timestep_freq_shift(unwrapped))  # a converted original's sinusoid stays
    if ema is not None:
        ema.copy_to(copy.parameters())
    else:
        copy.load_state_dict(unwrapped.state_dict())
    return copy.eval()


def validation_grid(accelerator, model, ema, noise_scheduler, dataset, vae, args):
    # The project pipeline: stock DiTPipeline hard-codes 1000 classes for guidance.
    transformer = ema_weights_model(accelerator, model, ema)
    pipeline = SpeeDiTPipeline(
        transformer=transformer,
        scheduler=training_sampler(noise_scheduler, "ddpm", learned_variance=True, clip_sample=vae is None),
        vae=vae,
        id2label=dict(enumerate(dataset.class_names)),
    )
    pipeline.set_progress_bar_config(disable=True)
    return class_grid(
        pipeline.to(accelerator.device),
        dataset.num_classes,
        args.validation_images_per_class,
        args.validation_guidance_scale,
        args.validation_inference_steps,
        args.seed,
    )


def log_grid(accelerator: Accelerator, grid, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)


def export(accelerator, model, ema, noise_scheduler, dataset, vae, args, step, record: dict, grid, folder=None) -> None:
    """Write the pipeline folder (EMA weights) to `folder` (default: --output_dir), its model card
    (with `record`'s configuration and segments) and the grid."""
    folder = folder or args.output_dir
    if accelerator.is_main_process:
        transformer = ema_weights_model(accelerator, model, ema).to("cpu")
        pipeline = build_pipeline(transformer, noise_scheduler, dataset.class_names, vae=vae)
        save_pipeline(pipeline, noise_scheduler, folder)
        save_timestep_sinusoid(transformer, os.path.join(folder, "transformer"))  # a converted original's
        grid_name = None
        if grid is not None:
            grid_name = "samples.png"
            grid.save(os.path.join(folder, grid_name))
        write_model_card(
            folder,
            args.hub_model_id,
            record["config"],
            step,
            grid_name,
            latent=vae is not None,
            segments=record["segments"],
            dataset="digits" if args.train_data == "digits" else None,
            guidance_scale=args.validation_guidance_scale,
        )
    accelerator.wait_for_everyone()


def _fault_injection(point: str, step: int) -> None:
    """Test hook: SPEEDIT_TEST_KILL_AT=<point>:<step> kills the process there, as kill -9 would."""
    target = os.environ.get("SPEEDIT_TEST_KILL_AT")
    if target and target == f"{point}:{step}":
        os.kill(os.getpid(), 9)


def cli(argv: list[str] | None = None) -> str:
    """The command line: parse and check the flags, then train."""
    return main(parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main(validate_args(FLAGS)))
