#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Encode a class-labelled image set into a latents folder for `train_dit.py --train_data`.

    accelerate launch scripts/extract_latents.py --input_dir imagenet/train --output_dir latents/imagenet256
    accelerate launch scripts/extract_latents.py --dataset_name imagefolder --data_dir my_images \
        --output_dir latents/mine
    python scripts/extract_latents.py --dataset_name <hub-id> --split train --output_dir latents/x   # CPU works too

Each image is center-cropped as ADM/DiT do, encoded with the VAE together with its mirror image,
and stored as posterior mean and std in safetensors shards with a manifest. Killed half-way, the
same command resumes: finished shards are kept, the rest are redone.
"""

from __future__ import annotations

import argparse
import os

from speedit_scheduler.cli import ArgumentParser, UserError, check_free_space, check_writable_folder, run_cli
from speedit_scheduler.options import DTYPE_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_dir", help="A folder with one subfolder of images per class (ImageNet's train/).")
    source.add_argument(
        "--dataset_name", help="A `datasets` image dataset: a Hub id, or 'imagefolder' with --data_dir."
    )
    p.add_argument("--dataset_config_name", default=None, help="The `datasets` config name, if it has several.")
    p.add_argument("--data_dir", default=None, help="data_dir for --dataset_name (e.g. the folder of 'imagefolder').")
    p.add_argument("--split", default="train", help="The `datasets` split to encode.")
    p.add_argument("--image_column", default="image", help="The `datasets` column of the images.")
    p.add_argument("--label_column", default="label", help="The `datasets` column of the integer class labels.")
    p.add_argument("--output_dir", required=True, help="The latents folder to write (or to resume).")
    p.add_argument("--resolution", type=int, default=256, help="Crop size in pixels (DiT: 256 or 512).")
    p.add_argument(
        "--pretrained_vae_model_name_or_path",
        "--vae",
        dest="vae",
        default="stabilityai/sd-vae-ft-ema",
        help="The AutoencoderKL (Hub id or folder) that encodes; recorded in the folder for training.",
    )
    p.add_argument("--vae_dtype", choices=DTYPE_NAMES, default=None, help="Default: bfloat16 on GPU, float32 on CPU.")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="Storage dtype of the moments.")
    p.add_argument("--no_flip", action="store_true", help="Do not store the mirror image's latents.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per VAE forward pass (x2 with flips).")
    p.add_argument("--shard_size", type=int, default=4096, help="Images per shard file.")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="Image decoding workers.")
    p.add_argument("--max_samples", type=int, default=None, help="Only this many images, spread over classes (trials).")
    args = p.parse_args(argv)
    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} is not a multiple of 8 (the VAE downsamples by 8): use 256 or 512.")
    if args.num_workers < 0:
        p.error(f"--num_workers must be >= 0, got {args.num_workers}.")
    if args.max_samples is not None and args.max_samples < 1:
        p.error(f"--max_samples must be positive, got {args.max_samples}.")
    if args.data_dir is not None and args.dataset_name is None:
        p.error(
            "--data_dir goes with --dataset_name (e.g. --dataset_name imagefolder); for a class folder use --input_dir."
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir!r} exists and is a file: give a folder.")
    return args


if __name__ == "__main__":
    ARGS = run_cli(parse_args)  # before torch is imported: --help and argparse's errors return at once

# ruff: noqa: E402 (the imports below are heavy: they load after the flags are parsed)
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from speedit_scheduler.data.extraction import dataset_source, extract_latents, folder_source


def main(argv=None) -> None:
    extract(parse_args(argv))


def extract(args: argparse.Namespace) -> None:
    """Images -> a latents folder, every check before the VAE loads."""

    try:
        if args.input_dir is not None:
            source = folder_source(args.input_dir, args.max_samples)
        else:
            source = dataset_source(
                args.dataset_name,
                args.split,
                args.image_column,
                args.label_column,
                args.dataset_config_name,
                args.data_dir,
                args.max_samples,
            )
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"{error}")

    check_writable_folder(args.output_dir, "--output_dir")
    # the moments (mean and std, of the image and of its mirror) of every image, in --dtype
    latent_side = args.resolution // 8
    per_image = 2 * 2 * 4 * latent_side**2 * (4 if args.dtype == "float32" else 2) // (2 if args.no_flip else 1)
    check_free_space(args.output_dir, per_image * len(source), f"the latents of {len(source)} images")

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    vae_dtype = args.vae_dtype or ("bfloat16" if accelerator.device.type == "cuda" else "float32")
    if accelerator.device.type == "cpu" and vae_dtype == "float16":
        raise UserError("--vae_dtype float16 needs a GPU; use float32 or bfloat16 on the CPU.")
    try:
        vae = AutoencoderKL.from_pretrained(args.vae, dtype=getattr(torch, vae_dtype))
    except (OSError, ValueError) as error:
        missing = not os.path.exists(args.vae)
        reason = "no such folder, and offline or not on the Hub" if missing else type(error).__name__
        raise UserError(
            f"cannot load the VAE {args.vae!r} ({reason}): give a Hub id (online) or a local folder "
            "saved with AutoencoderKL.save_pretrained."
        )
    vae.to(accelerator.device)
    accelerator.print(f"{len(source)} images in {len(source.class_names)} classes from {source.name!r}")
    try:
        manifest = extract_latents(
            source,
            vae,
            args.vae,
            args.output_dir,
            accelerator,
            resolution=args.resolution,
            dtype=args.dtype,
            flips=not args.no_flip,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
    except ValueError as error:
        raise UserError(f"{error}")
    if accelerator.is_main_process:
        print(
            f"wrote {manifest['num_samples']} latents {tuple(manifest['latent_shape'])} to {args.output_dir} "
            f"by {accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
        )
        if manifest["skipped"]:
            print(f"skipped {len(manifest['skipped'])} unreadable image(s), listed in manifest.json:")
            for entry in manifest["skipped"][:20]:
                print(f"  {entry['item']}: {entry['error']}")


if __name__ == "__main__":
    run_cli(extract, ARGS)
