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
import logging
import os
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from speedit_scheduler import PRESETS, SpeeDiTPipeline, SpeeDiTScheduler
from speedit_scheduler.cli import ArgumentParser, UserError, check_writable_folder, run_cli
from speedit_scheduler.data import DeterministicOrder, load_training_data
from speedit_scheduler.evaluation.along_training import (
    EVALUATION_FILE,
    EVALUATION_METRICS,
    EvaluationSampling,
    ProgressFile,
    TrainingEvaluator,
    build_metric,
)
from speedit_scheduler.evaluation.grids import class_grid
from speedit_scheduler.losses import DiTLoss
from speedit_scheduler.models import (
    DIT_PRESETS,
    create_dit,
    disable_internal_label_dropout,
    dit_config,
    null_class_label,
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
from speedit_scheduler.training.engine import COMPILE_MODES, TrainingEngine
from speedit_scheduler.training.export import build_pipeline, save_pipeline
from speedit_scheduler.training.hub import (
    BackgroundPusher,
    check_hub_access,
    push_folder_to_hub,
    resolve_hub_token,
    write_model_card,
)
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

PUSH_SNAPSHOT_PREFIX = ".hub-push-step-"  # the pipeline at a checkpoint, while it uploads
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
REPORT_TO = ("tensorboard", "wandb", "all", "none")

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="Offline demo on scikit-learn's digits (see DEMO_DEFAULTS).")
    # data
    p.add_argument(
        "--train_data",
        default=None,
        help="'digits', a latents folder from scripts/extract_latents.py, or an .npz of uint8 images and labels.",
    )
    p.add_argument("--resolution", type=int, default=None, help="Pad pixel data to this side (28 -> 32 for MNIST).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Unused for in-memory data.")
    # model
    p.add_argument("--model", default="XL/2", help=f"DiT preset: {', '.join(DIT_PRESETS)}.")
    p.add_argument("--num_layers", type=int, default=None, help="Override the preset's depth.")
    p.add_argument("--hidden_size", type=int, default=None, help="Override the preset's width.")
    p.add_argument("--num_attention_heads", type=int, default=None, help="Override the preset's heads.")
    p.add_argument("--learn_sigma", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer.")
    p.add_argument(
        "--compile_mode",
        default=None,
        choices=COMPILE_MODES,
        help="inductor's mode (implies --compile); reduce-overhead captures CUDA graphs (small models).",
    )
    p.add_argument("--allow_tf32", action="store_true")
    # SpeeDiT
    p.add_argument("--speedit", default="speed", choices=sorted(PRESETS), help="Timestep preset ('uniform' = DiT).")
    p.add_argument("--timestep_sampling", default=None, help="Override the preset's sampling.")
    p.add_argument("--loss_weighting", default=None, help="Override the preset's loss weighting.")
    p.add_argument("--dual_sampling", choices=["on", "off"], default=None, help="Override dual sampling.")
    p.add_argument("--speed_k", type=float, default=None)
    p.add_argument("--speed_tau", type=float, default=None, help="Fraction of num_train_timesteps (0.7).")
    p.add_argument("--speed_lambda", type=float, default=None)
    p.add_argument("--min_snr_gamma", type=float, default=None)
    p.add_argument("--p2_k", type=float, default=None)
    p.add_argument("--p2_gamma", type=float, default=None)
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=32, help="Per device.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=400_000)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="0 disables clipping (DiT clips nothing).")
    p.add_argument("--class_dropout_prob", type=float, default=0.1)
    p.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    # output, checkpoints, logging
    p.add_argument("--output_dir", default=None)
    p.add_argument("--checkpointing_steps", type=int, default=10_000)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--logging_steps", type=int, default=100)
    p.add_argument("--validation_steps", type=int, default=10_000)
    p.add_argument("--validation_guidance_scale", type=float, default=4.0)
    p.add_argument("--validation_inference_steps", type=int, default=50)
    p.add_argument("--validation_images_per_class", type=int, default=8)
    # quality along training (evaluations.jsonl in --output_dir, and the trackers)
    p.add_argument(
        "--evaluation_steps",
        type=int,
        default=None,
        help="Evaluate the EMA model every N steps and at the end (default: never).",
    )
    p.add_argument(
        "--evaluation_metric",
        choices=EVALUATION_METRICS,
        default=None,
        help="classifier: Frechet distance and accuracy of a classifier of the real images (pixel data); "
        "fid: ADM's FID, sFID, IS, precision, recall against --reference_batch. Default: classifier for "
        "pixel data, fid for latents.",
    )
    p.add_argument("--evaluation_samples_per_class", type=int, default=50, help="Samples of each class.")
    p.add_argument("--evaluation_sampler", choices=["ddpm", "ddim"], default="ddpm", help="ddpm: DiT's ancestral.")
    p.add_argument("--evaluation_guidance_scale", type=float, default=1.0, help="1 = no guidance.")
    p.add_argument("--evaluation_inference_steps", type=int, default=50)
    p.add_argument("--evaluation_batch_size", type=int, default=500, help="Samples per pipeline call.")
    p.add_argument("--reference_batch", default=None, help="fid: ADM reference .npz (scripts/evaluate.py).")
    p.add_argument("--inception_weights", default=None, help="fid: the FID Inception weights file.")
    p.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="VAE of latent data, saved in the pipeline. Default: the one the latents folder was extracted with.",
    )
    # hub
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--push_checkpoints_to_hub", action="store_true", help="Also upload at every checkpoint.")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--hub_private_repo", action="store_true")
    args = p.parse_args(argv)
    if args.demo:
        explicit = {a.lstrip("-").split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in DEMO_DEFAULTS.items():
            if key not in explicit:
                setattr(args, key, value)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Every bad flag is a one-line error before any model, data or process group is created."""
    if args.train_data is None:
        raise UserError("--train_data is required ('digits' or an .npz file), or use --demo.")
    if args.output_dir is None:
        raise UserError("--output_dir is required.")
    if args.model not in DIT_PRESETS:
        raise UserError(f"--model {args.model!r} is unknown: choose one of {', '.join(DIT_PRESETS)}.")
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
    for name in ("lr_warmup_steps", "seed", "dataloader_num_workers"):
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
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"--lr_scheduler {args.lr_scheduler!r} is unknown: choose one of {', '.join(LR_SCHEDULERS)}.")
    if args.lr_warmup_steps > args.max_train_steps:
        raise UserError(
            f"--lr_warmup_steps {args.lr_warmup_steps} exceeds --max_train_steps {args.max_train_steps}: "
            "warm up for fewer steps than the run has."
        )
    for flag in ("validation_guidance_scale", "evaluation_guidance_scale"):
        if not getattr(args, flag) >= 1.0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be >= 1 (1: no guidance).")
    if args.report_to not in REPORT_TO:
        raise UserError(f"--report_to {args.report_to!r} is unknown: choose one of {', '.join(REPORT_TO)}.")
    if os.path.isabs(args.logging_dir) or ".." in args.logging_dir.split(os.sep):
        raise UserError(f"--logging_dir {args.logging_dir!r} must be a folder name inside --output_dir, like logs.")
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
        num_train_timesteps = build_noise_scheduler(args).config.num_train_timesteps
    except ValueError as error:
        raise UserError(f"{error}")
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


def build_noise_scheduler(args: argparse.Namespace) -> SpeeDiTScheduler:
    overrides = {key: getattr(args, key) for key in NOISE_SCHEDULER_FLAGS if getattr(args, key) is not None}
    if args.dual_sampling is not None:
        overrides["dual_sampling"] = args.dual_sampling == "on"
    return SpeeDiTScheduler.from_preset(args.speedit, **overrides)


def training_config(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """The run's configuration as recorded in checkpoints, trackers and the model card: every
    flag given or defaulted (never the token, never a local path of this machine's output)."""
    skip = {"hub_token", "demo", "output_dir", "resume_from_checkpoint"}
    config = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    config["mixed_precision"] = accelerator.mixed_precision
    config["num_processes"] = accelerator.num_processes
    config["global_batch_size"] = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return config


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
        dataset = load_training_data(args.train_data, args.resolution)
        channels, size, _ = dataset.sample_shape
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
    vae, vae_path = load_vae(args, dataset)

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
        accelerator.init_trackers("train_dit", config={k: str(v) for k, v in tracker_config.items()})
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


def load_vae(args: argparse.Namespace, dataset) -> tuple[AutoencoderKL | None, str | None]:
    """The VAE that decodes latent data (None for pixel data) and its name or path. A latents
    folder records which VAE made it; `--pretrained_vae_model_name_or_path` overrides it."""
    if not dataset.latent:
        return None, None
    recorded = getattr(dataset, "vae_name_or_path", None)
    vae_path = args.pretrained_vae_model_name_or_path or recorded or "stabilityai/sd-vae-ft-ema"
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
    run_cli(cli)
