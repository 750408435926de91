#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Sample a class-conditional DiT pipeline: labelled grids, single PNGs, or .npz files for FID.

    # a grid of three classes, DiT's evaluation sampler (250 DDPM steps, learned variance)
    python sample_dit.py --pretrained_model_name_or_path dit-xl-2-speed \\
        --class_labels 207 360 golden_retriever --guidance_scale 4 --output grid.png

    # 50K samples for FID (ADM evaluator .npz), any number of processes, resumable
    accelerate launch sample_dit.py --pretrained_model_name_or_path dit-xl-2-speed \\
        --num_samples 50000 --sample_dir samples/dit-xl-2-speed --guidance_scale 1.5

`--sampler faithful` (default) samples as DiT's evaluation does (see docs/sampling.md);
`--sampler diffusers` runs the stock `DiTPipeline` (guidance on all channels, variance dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

from speedit_scheduler.cli import (
    ArgumentParser,
    check_device,
    check_free_space,
    check_writable_file,
    check_writable_folder,
    fail,
    run_cli,
)
from speedit_scheduler.options import DTYPE_NAMES, SAMPLER_NAMES

# DiT's defaults: sample.py guides with 4.0 for pictures, sample_ddp.py with 1.5 for FID-50K.
DEFAULT_GUIDANCE = {"grid": 4.0, "mass": 1.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--pretrained_model_name_or_path", "--model", required=True, help="Pipeline folder or Hub id.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("--class_labels", nargs="+", default=None, help="Class ids or names (names via id2label).")
    p.add_argument("--output", default=None, help="Labelled grid (.png/.jpg): one image per requested label.")
    p.add_argument("--output_dir", default=None, help="Folder for one PNG per requested label.")
    p.add_argument("--num_samples", type=int, default=None, help="Mass sampling: this many samples, random classes.")
    p.add_argument("--sample_dir", default=None, help="Mass sampling: shards and the merged samples_N.npz go here.")
    p.add_argument(
        "--sampler",
        choices=("faithful", "diffusers"),
        default="faithful",
        help="faithful: DiT's own sampling (learned variance, guidance of the first 3 latent channels); "
        "diffusers: the stock DiTPipeline.",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        choices=SAMPLER_NAMES,
        help="Default: ddpm (learned variance) for --sampler faithful, the pipeline's own for --sampler diffusers.",
    )
    p.add_argument("--guidance_scale", type=float, default=None, help="1 = no guidance. Default 4 (grids), 1.5 (FID).")
    p.add_argument(
        "--guidance_channels",
        default=None,
        help="Faithful sampler: 'all' or k (guide the first k eps channels). "
        "Default: 3 for latent models (DiT), all for pixel models.",
    )
    p.add_argument("--num_inference_steps", type=int, default=250, help="Sampling steps (DiT: 250 DDPM steps).")
    p.add_argument("--seed", type=int, default=0, help="Sample i's label and noise come from (seed, i).")
    p.add_argument("--batch_size", type=int, default=32, help="Samples per pipeline call, per process.")
    p.add_argument("--device", default=None, help="Default: the accelerate process's device (cuda if available).")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="Weights' dtype while sampling.")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = run_cli(parse_args)  # before torch is imported: --help and argparse's errors return at once

# ruff: noqa: E402 (the imports below are heavy: they load after the flags are parsed)
import torch

from speedit_scheduler.data.class_names import resolve_class_labels, short_label
from speedit_scheduler.evaluation.grids import labelled_grid
from speedit_scheduler.evaluation.mass_sampling import ShardPlan, to_uint8, weights_fingerprint
from speedit_scheduler.models import load_timestep_sinusoid
from speedit_scheduler.training.checkpoints import (
    checkpoint_transformer_folder,
    is_training_checkpoint,
    read_checkpoint_state,
)
from speedit_scheduler.training.export import exported_pipeline_class, pipeline_from_checkpoint, recorded_class_name
from speedit_scheduler.utils import HUB_ID, download_snapshot


def check_args(args: argparse.Namespace) -> str:
    """Checks that need no model; returns the mode, 'grid' or 'mass'."""
    grid = args.class_labels is not None or args.output is not None or args.output_dir is not None
    mass = args.num_samples is not None or args.sample_dir is not None
    if grid and mass:
        fail("--class_labels/--output/--output_dir (pictures) and --num_samples/--sample_dir (FID) exclude each other.")
    if mass:
        if args.num_samples is None or args.sample_dir is None:
            fail("mass sampling needs both --num_samples N and --sample_dir DIR.")
        if args.num_samples < 1:
            fail(f"--num_samples {args.num_samples} must be at least 1.")
    else:
        if not args.class_labels:
            fail("give --class_labels (ids or names) with --output/--output_dir, or --num_samples with --sample_dir.")
        if args.output is None and args.output_dir is None:
            fail("give --output grid.png and/or --output_dir DIR for the images.")
        if args.output is not None and os.path.splitext(args.output)[1].lower() not in (
            ".png",
            ".jpg",
            ".jpeg",
            ".webp",
        ):
            fail(f"--output {args.output!r} must end in .png, .jpg or .webp.")
    mode = "mass" if mass else "grid"
    if args.guidance_scale is None:
        args.guidance_scale = DEFAULT_GUIDANCE[mode]
    if not args.guidance_scale >= 1.0:
        fail(f"--guidance_scale {args.guidance_scale} must be >= 1 (1 = no guidance).")
    if args.num_inference_steps < 1:
        fail(f"--num_inference_steps {args.num_inference_steps} must be at least 1.")
    if args.batch_size < 1:
        fail(f"--batch_size {args.batch_size} must be at least 1.")
    if args.guidance_channels is not None:
        if args.sampler != "faithful":
            fail("--guidance_channels needs --sampler faithful (stock DiTPipeline guides every channel).")
        if args.guidance_channels != "all" and not re.fullmatch(r"\d+", args.guidance_channels):
            fail(f"--guidance_channels {args.guidance_channels!r} must be 'all' or a channel count like 3.")
    return mode


# The parts of a Hub pipeline that sampling reads.
PIPELINE_PATTERNS = ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "training_scheduler/*"]


def locate_model(path: str, revision: str | None) -> tuple[str, str | None]:
    """The local folder to sample from and, for a Hub id, the commit it resolved to: a Hub model
    is downloaded once (or found in the cache) at one commit, and everything reads that copy."""
    if os.path.isdir(path):
        if revision is not None:
            fail(f"--revision {revision} applies to Hub ids, but {path!r} is a local folder: drop --revision.")
        return path, None
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        fail(f"--pretrained_model_name_or_path {path!r} is not a pipeline folder or a Hub id (owner/name).")
    try:
        folder = download_snapshot(path, revision, PIPELINE_PATTERNS)
    except ValueError as error:
        fail(str(error))
    return folder, os.path.basename(os.path.normpath(folder))  # snapshots/<commit>


def model_files(folder: str) -> list[str]:
    """The files that decide what a model samples: weights, configs, the scheduler."""
    if is_training_checkpoint(folder):
        parts = [checkpoint_transformer_folder(folder), os.path.join(folder, "training_scheduler")]
        files = [os.path.join(folder, "training_state.json")]
    else:
        parts = [os.path.join(folder, name) for name in ("transformer", "vae", "scheduler")]
        files = [os.path.join(folder, "model_index.json")]
    for part in parts:
        for root, _, names in sorted(os.walk(part)):
            files += [os.path.join(root, name) for name in sorted(names)]
    return [f for f in files if os.path.isfile(f)]


def read_metadata(path: str) -> dict:
    """model_index.json and the transformer config of a local folder, without loading weights."""

    def read(name: str) -> dict:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            fail(f"{path!r} has no {name}: give a diffusers pipeline folder (as train_dit.py writes).")
        try:
            with open(file) as f:
                return json.load(f)
        except ValueError:
            fail(f"{file} is not valid JSON: the folder is damaged; export or download it again.")

    def timesteps_of(scheduler_config: str) -> int:  # the schedule's length (diffusers' default 1000)
        if not os.path.isfile(os.path.join(path, scheduler_config)):
            return 1000
        return read(scheduler_config).get("num_train_timesteps", 1000)

    if os.path.isdir(path) and is_training_checkpoint(path):  # a train_dit.py checkpoint-N folder
        state = read_checkpoint_state(path)
        with open(os.path.join(checkpoint_transformer_folder(path), "config.json")) as f:
            transformer = json.load(f)
        index = {
            "_class_name": exported_pipeline_class(bool(state.get("vae")), transformer["num_embeds_ada_norm"]),
            "id2label": dict(enumerate(state["class_names"])),
            "vae": ["diffusers", "AutoencoderKL"] if state.get("vae") else None,
        }
        steps = timesteps_of("training_scheduler/scheduler_config.json")
        return {**metadata(index, transformer), "checkpoint": True, "num_train_timesteps": steps}
    return {
        **metadata(read("model_index.json"), read("transformer/config.json")),
        "num_train_timesteps": timesteps_of("scheduler/scheduler_config.json"),
    }


def output_size_per_sample(meta: dict) -> int:
    """Bytes of one uint8 RGB sample (a shard and the merged file each hold one copy)."""
    side = meta["sample_size"] * (8 if meta["latent"] else 1)
    return side * side * 3


def metadata(index: dict, transformer: dict) -> dict:
    has_vae = bool(index.get("vae")) and index["vae"][0] is not None
    return {
        "class_name": recorded_class_name(index),
        "id2label": {int(k): v for k, v in (index.get("id2label") or {}).items()},
        "num_classes": transformer["num_embeds_ada_norm"],
        "sample_size": transformer["sample_size"],
        "in_channels": transformer["in_channels"],
        "learned_variance": transformer.get("out_channels") == 2 * transformer["in_channels"],
        "latent": has_vae,
    }


def check_model_args(args: argparse.Namespace, meta: dict) -> None:
    if args.num_inference_steps > meta["num_train_timesteps"]:
        fail(
            f"--num_inference_steps {args.num_inference_steps} exceeds the model's {meta['num_train_timesteps']} "
            f"training timesteps: use at most {meta['num_train_timesteps']} (DiT samples with 250)."
        )
    if meta["class_name"] not in ("DiTPipeline", "SpeeDiTPipeline"):
        fail(f"{args.pretrained_model_name_or_path!r} is a {meta['class_name']}, not a DiTPipeline or SpeeDiTPipeline.")
    if args.sampler == "diffusers":
        if meta["class_name"] != "DiTPipeline":
            fail(
                "--sampler diffusers runs stock DiTPipeline, which this model is not (stock DiTPipeline takes latent "
                f"models of 1000 classes; this one has {meta['num_classes']}{'' if meta['latent'] else ', pixels'}): "
                "use --sampler faithful."
            )
        if args.guidance_scale > 1 and meta["num_classes"] != 1000:
            fail(
                f"stock DiTPipeline hard-codes the null class 1000 but this model has {meta['num_classes']} classes: "
                "use --sampler faithful --guidance_channels all for the same guidance."
            )
    if args.guidance_channels not in (None, "all") and not 1 <= int(args.guidance_channels) <= meta["in_channels"]:
        fail(f"--guidance_channels {args.guidance_channels} must lie in [1, {meta['in_channels']}] or be 'all'.")


def load_sampler(args: argparse.Namespace, meta: dict, device: torch.device, folder: str):
    """The pipeline to call and the extra keyword arguments of its call."""
    from diffusers import DiffusionPipeline

    from speedit_scheduler import SpeeDiTPipeline
    from speedit_scheduler.pipeline_speedit import sampling_scheduler

    dtype = getattr(torch, args.dtype)
    if meta.get("checkpoint"):
        pipe = pipeline_from_checkpoint(folder, torch_dtype=dtype)
    elif meta["class_name"] == "SpeeDiTPipeline":  # not a diffusers class: load it with its own class
        pipe = SpeeDiTPipeline.from_pretrained(folder, dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    # a converted original checkpoint's timestep sinusoid, which stock diffusers ignores
    load_timestep_sinusoid(pipe.transformer, checkpoint_transformer_folder(folder) if meta.get("checkpoint")
                           else os.path.join(folder, "transformer"))  # fmt: skip
    kwargs = {}
    if args.sampler == "faithful":
        if not isinstance(pipe, SpeeDiTPipeline):
            pipe = SpeeDiTPipeline.from_dit_pipeline(pipe)
        pipe.scheduler = sampling_scheduler(
            pipe.scheduler.config,
            args.scheduler or "ddpm",
            learned_variance=meta["learned_variance"],
            clip_sample=False if meta["latent"] else None,  # DiT: clip_denoised=False for latents
        )
        kwargs["guidance_channels"] = guidance_channels(args, meta)
    elif args.scheduler is not None:
        pipe.scheduler = sampling_scheduler(pipe.scheduler.config, args.scheduler, learned_variance=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), kwargs


def generate(pipe, labels: list[int], generators: list[torch.Generator], seed_key: int, args, kwargs) -> torch.Tensor:
    """Images in [0, 1], N x C x H x W, on the CPU."""
    # Stock DiTPipeline does not pass a generator to `scheduler.step`: seed the global RNG per batch
    # so that ancestral schedulers are reproducible there too.
    torch.manual_seed(seed_key)
    images = pipe(
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        generator=generators,
        num_inference_steps=args.num_inference_steps,
        output_type="np",
        **kwargs,
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def sample_pictures(args, meta, labels: list[int], pipe, kwargs) -> None:
    from speedit_scheduler.evaluation.mass_sampling import sample_generator

    images = []
    for start in range(0, len(labels), args.batch_size):
        batch = labels[start : start + args.batch_size]
        generators = [sample_generator(args.seed, i) for i in range(start, start + len(batch))]
        images.append(generate(pipe, batch, generators, args.seed * 1_000_003 + start, args, kwargs))
    pil = pipe.numpy_to_pil(torch.cat(images).permute(0, 2, 3, 1).numpy())
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for i, (image, label) in enumerate(zip(pil, labels)):
            image.save(os.path.join(args.output_dir, f"{i:04d}_class{label:04d}.png"))
        print(f"wrote {len(pil)} images to {args.output_dir}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        labelled_grid(pil, [short_label(label, meta["id2label"]) for label in labels]).save(args.output)
        print(f"wrote {args.output}")


def guidance_channels(args: argparse.Namespace, meta: dict) -> int | None:
    """The eps channels the faithful sampler guides (None: all): DiT guides 3 of 4 latent channels."""
    channels = args.guidance_channels or ("3" if meta["latent"] and meta["in_channels"] > 3 else "all")
    return None if channels == "all" else int(channels)


def sample_settings(args: argparse.Namespace, meta: dict, folder: str, commit: str | None) -> dict:
    """Everything that changes a sample, the weights' fingerprint and the Hub commit included: shards
    of other settings, or of another model, must not be mixed in."""
    settings = {
        k: getattr(args, k)
        for k in (
            "pretrained_model_name_or_path",
            "revision",
            "num_samples",
            "batch_size",
            "seed",
            "sampler",
            "scheduler",
            "guidance_scale",
            "num_inference_steps",
            "dtype",
        )
    }
    channels = guidance_channels(args, meta) if args.sampler == "faithful" else None
    settings["guidance_channels"] = "all" if channels is None else channels
    settings["weights_sha256"] = weights_fingerprint(model_files(folder))
    settings["revision_resolved"] = commit
    return settings


def prepare_sample_dir(args: argparse.Namespace, meta: dict, state, folder: str, commit: str | None) -> ShardPlan:
    """Check the sample folder holds samples of this model and these settings only (or none yet),
    before the model is loaded; record them; remove what a killed run half-wrote."""
    plan = ShardPlan(args.sample_dir, args.num_samples, args.batch_size)
    if state.is_main_process:  # the others wait: the folder is checked (and the weights hashed) once
        try:
            plan.check_settings(sample_settings(args, meta, folder, commit))
            plan.check_written_shards()
            for stale in plan.stray_tmp_files():  # half-written by a killed run; nobody writes yet
                os.remove(stale)
        except ValueError as e:
            fail(str(e))
    state.wait_for_everyone()
    return plan


def sample_for_fid(args, meta, state, pipe, kwargs, plan: ShardPlan) -> str | None:
    from tqdm.auto import tqdm

    from speedit_scheduler.evaluation.mass_sampling import sample_labels_and_generators

    todo = plan.todo(state.process_index, state.num_processes)
    stop_after = int(os.environ.get("SPEEDIT_TEST_STOP_AFTER_SHARDS", "0"))  # tests: simulate a kill
    total = sum(len(plan.indices(k)) for k in todo)
    bar = tqdm(total=total, unit="img", disable=not state.is_main_process, desc="sampling")
    start, done = time.time(), 0
    for n, shard in enumerate(todo, 1):
        indices = plan.indices(shard)
        labels, generators = sample_labels_and_generators(args.seed, indices, meta["num_classes"])
        images = generate(pipe, labels, generators, args.seed * 1_000_003 + shard, args, kwargs)
        plan.write_shard(shard, to_uint8(images), labels)
        done += len(indices)
        bar.update(len(indices))
        # every process runs about as fast: this process's rate times the count
        bar.set_postfix(img_s=f"{done * state.num_processes / (time.time() - start):.2f}")
        if stop_after and n >= stop_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        try:
            path = plan.merge()
        except ValueError as error:
            fail(str(error))
        print(f"wrote {path} ({args.num_samples} samples, arr_0 uint8 NHWC, arr_1 labels)")
        return path
    return None


def main(argv: list[str] | None = None) -> None:
    sample(parse_args(argv))


def sample(args: argparse.Namespace) -> None:
    """Pictures or mass sampling, as the flags ask; every check before the model loads."""
    mode = check_args(args)
    check_device(args.device)
    for flag in ("output_dir", "sample_dir"):
        if getattr(args, flag) is not None:
            check_writable_folder(getattr(args, flag), f"--{flag}")
    if args.output is not None:
        check_writable_file(args.output, "--output")
    folder, commit = locate_model(args.pretrained_model_name_or_path, args.revision)
    meta = read_metadata(folder)
    check_model_args(args, meta)
    labels = None
    if mode == "grid":
        try:
            labels = resolve_class_labels(args.class_labels, meta["id2label"], meta["num_classes"])
        except ValueError as e:
            fail(str(e))

    from accelerate import PartialState

    # CPU-only multi-process runs (accelerate_configs/cpu.yaml) communicate over gloo.
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    device = torch.device(args.device) if args.device else state.device
    if args.dtype != "float32" and device.type == "cpu":
        print(f"warning: --dtype {args.dtype} on the CPU is slow; float32 is the CPU default.", file=sys.stderr)
    plan = None
    if mode == "mass":
        plan_bytes = 2 * args.num_samples * output_size_per_sample(meta)  # the shards, then the merged file
        check_free_space(args.sample_dir, plan_bytes, f"{args.num_samples} samples")
        plan = prepare_sample_dir(args, meta, state, folder, commit)
    pipe, kwargs = load_sampler(args, meta, device, folder)
    if mode == "grid":
        if state.is_main_process:
            sample_pictures(args, meta, labels, pipe, kwargs)
    else:
        sample_for_fid(args, meta, state, pipe, kwargs, plan)


if __name__ == "__main__":
    run_cli(sample, ARGS)
