#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Convert an original DiT / SpeeDiT `.pt` checkpoint into a diffusers pipeline folder.

    python scripts/convert_dit_checkpoint.py --checkpoint DiT-XL-2-256x256.pt --output_dir dit-xl-2-256

The folder is what train_dit.py writes for latent models (a stock `DiTPipeline` plus
`training_scheduler/`) and loads with `DiffusionPipeline.from_pretrained`. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

from speedit_scheduler.cli import ArgumentParser, UserError, check_free_space, check_writable_folder, run_cli
from speedit_scheduler.options import DTYPE_NAMES, PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="original DiT / SpeeDiT .pt (state dict or train.py checkpoint)")
    p.add_argument("--output_dir", required=True, help="pipeline folder to write (must be empty or new)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL Hub id or local folder")
    p.add_argument("--use_raw", action="store_true", help="convert train.py's raw 'model' weights instead of 'ema'")
    p.add_argument(
        "--speedit",
        default="uniform",
        choices=list(PRESETS),
        help="training-scheduler preset to record: uniform for DiT, speed / speedit-v1 for SpeeDiT",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir")
    p.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="heads of a custom model whose depth / hidden size match no DiT preset",
    )
    p.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="class count if it is not the label-table rows minus the null class",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare the converted model with a reference original forward pass and print the table",
    )
    p.add_argument("--push_to_hub", action="store_true", help="Upload the converted folder (verified).")
    p.add_argument("--hub_model_id", default=None, help="The repo to push to, e.g. your-name/dit-xl-2-256.")
    p.add_argument("--hub_token", default=None, help="Default: HF_TOKEN or the `hf auth login` token.")
    p.add_argument("--hub_private_repo", action="store_true", help="Create the repo as private.")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = run_cli(parse_args)  # before torch is imported: --help and argparse's errors return at once

# ruff: noqa: E402 (the imports below are heavy: they load after the flags are parsed)
from speedit_scheduler.tools.conversion import (
    check_output_dir,
    convert_dit_checkpoint,
    describe_conversion,
    format_difference_table,
)
from speedit_scheduler.training.hub import check_hub_access, push_folder_to_hub, resolve_hub_token, write_model_card


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Convert, verify if asked, push if asked; every cheap check first."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args)
    except ValueError as error:  # the package's one-line messages: the value and the fix
        raise UserError(str(error)) from None


def convert(args: argparse.Namespace) -> None:
    # Every cheap check before the checkpoint is read.
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint!r} does not exist: give an original DiT / SpeeDiT .pt file.")
    check_output_dir(args.output_dir, args.overwrite)
    check_writable_folder(args.output_dir, "--output_dir")
    if args.num_attention_heads is not None and args.num_attention_heads < 1:
        raise UserError(f"--num_attention_heads {args.num_attention_heads} must be at least 1.")
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num_classes {args.num_classes} must be at least 1.")
    token = None
    if args.push_to_hub:
        if not args.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id (e.g. your-name/dit-xl-2-256).")
        token = resolve_hub_token(args.hub_token)
        check_hub_access(args.hub_model_id, token, private=args.hub_private_repo)  # offline or 401: before converting
    # about the checkpoint's own size again: the weights (and nothing else) in --dtype or float32
    check_free_space(args.output_dir, os.path.getsize(args.checkpoint), "the converted pipeline")

    try:
        _, info, rows = convert_dit_checkpoint(
            args.checkpoint,
            args.output_dir,
            vae=args.vae,
            use_raw=args.use_raw,
            speedit_preset=args.speedit,
            dtype=args.dtype,
            overwrite=args.overwrite,
            num_attention_heads=args.num_attention_heads,
            num_classes=args.num_classes,
            verify=args.verify,
        )
    except RuntimeError as error:  # --verify found a mapping defect: keep the traceback-free report
        raise UserError(str(error)) from None
    print(describe_conversion(info))
    if rows is not None:
        print("verified: the converted model gives the original's outputs to float rounding (in this project);")
        print("|stock diffusers - original| (stock diffusers ignores the recorded sinusoid):")
        print(format_difference_table(rows))

    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    steps = int(stem) if re.fullmatch(r"\d+", stem) else "an unknown number of"  # DiT names them 0400000.pt
    card_config = {
        "converted_from": os.path.basename(args.checkpoint),
        "weights": info.source,
        "speedit": args.speedit,
        "dtype": args.dtype,
        **info.checkpoint_args,
    }
    if rows is not None:  # what --verify measured for the stock-diffusers path (its own sinusoid)
        card_config["stock_diffusers_mean_relative_eps_difference"] = max(r["eps_mean"] / r["out_mean"] for r in rows)
    # DiT's released weights are CC-BY-NC 4.0; the card says so unless the weights are the user's own.
    write_model_card(
        args.output_dir, args.hub_model_id, card_config, steps, None, latent=True, license="cc-by-nc-4.0",
        dataset="imagenet-1k" if info.num_classes == 1000 else None,
    )  # fmt: skip
    print(f"wrote {args.output_dir}")

    if args.push_to_hub:
        push_folder_to_hub(
            args.output_dir, args.hub_model_id, token, "Convert DiT checkpoint", private=args.hub_private_repo
        )


if __name__ == "__main__":
    run_cli(run, ARGS)
