#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch,
computed as guided-diffusion's (ADM) evaluations/evaluator.py does, in PyTorch.

    python scripts/evaluate.py VIRTUAL_imagenet256_labeled.npz samples_50000x256x256x3.npz
    python scripts/evaluate.py REF.npz SAMPLES.npz --inception_weights weights-inception-2015-12-05-6726825d.pth \
        --device cuda --batch_size 250 --output_json metrics.json

Batches are ADM's .npz files: `arr_0` holds uint8 N x H x W x 3 images (grayscale N x H x W or one
channel is replicated to RGB); a reference may also hold precomputed `mu`, `sigma`, `mu_s`,
`sigma_s`, which are used as ADM does. Make a reference batch for any dataset with

    python scripts/evaluate.py --make_reference IMAGES_DIR_OR_NPZ --output REF.npz [--image_size 256]

Weights: --inception_weights, else $SPEEDIT_INCEPTION_WEIGHTS, else torch.hub's cache, else a
download (not with HF_HUB_OFFLINE=1). See docs/evaluation.md.
"""

import argparse
import json

from speedit_scheduler.cli import ArgumentParser, UserError, check_device, run_cli
from speedit_scheduler.options import ADM_IS_SPLIT_SIZE, ADM_NEAREST_K


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("ref_batch", nargs="?", help="Reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s).")
    p.add_argument("sample_batch", nargs="?", help="Sample batch .npz (arr_0: uint8 N x H x W x 3).")
    p.add_argument("--inception_weights", default=None, help="Path to weights-inception-2015-12-05-6726825d.pth.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per Inception forward pass.")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available).")
    p.add_argument("--output_json", default=None, help="Also write the metrics to this JSON file.")
    p.add_argument("--is_split_size", type=int, default=ADM_IS_SPLIT_SIZE, help="Inception Score split (ADM: 5000).")
    p.add_argument("--nearest_k", type=int, default=ADM_NEAREST_K, help="k of the precision/recall manifolds (ADM: 3).")
    p.add_argument(
        "--make_reference", default=None, metavar="IMAGES_DIR_OR_NPZ", help="Write a reference batch from these images."
    )
    p.add_argument("--output", default=None, help="With --make_reference: the reference .npz to write.")
    p.add_argument(
        "--image_size", type=int, default=None, help="With --make_reference on a folder: ADM centre crop to N x N."
    )
    p.add_argument(
        "--no_statistics", action="store_true", help="With --make_reference: write arr_0 only (no weights needed)."
    )
    args = p.parse_args(argv)

    if args.make_reference is not None:
        if args.ref_batch or args.sample_batch:
            p.error(
                "--make_reference writes a reference batch; drop the REF.npz / SAMPLE.npz arguments "
                "(evaluate in a second call)."
            )
        if args.output is None:
            p.error("--make_reference needs --output REF.npz.")
    else:
        if args.ref_batch is None or args.sample_batch is None:
            p.error("pass REF.npz SAMPLE.npz to evaluate, or --make_reference IMAGES_DIR_OR_NPZ --output REF.npz.")
        for flag in ("output", "image_size"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag} only applies with --make_reference.")
        if args.no_statistics:
            p.error("--no_statistics only applies with --make_reference.")
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size} must be >= 1.")
    return args


if __name__ == "__main__":
    ARGS = run_cli(parse_args)  # before torch is imported: --help and argparse's errors return at once

# ruff: noqa: E402 (the imports below are heavy: they load after the flags are parsed)
from speedit_scheduler.evaluation.inception import resolve_inception_weights
from speedit_scheduler.evaluation.metrics import (
    ImageNpz,
    InceptionMetrics,
    check_sample_counts,
    evaluate_npz,
    load_images,
    write_reference_batch,
)


def make_reference(args: argparse.Namespace) -> None:
    if not args.output.endswith(".npz"):
        raise ValueError(f"--output {args.output} must end in .npz.")
    weights = (
        None if args.no_statistics else resolve_inception_weights(args.inception_weights)
    )  # fail before reading images
    images = load_images(args.make_reference, args.image_size)
    metrics = None if args.no_statistics else InceptionMetrics(weights, args.device, args.batch_size)
    written = write_reference_batch(images, args.output, metrics)
    print(
        f"wrote {args.output}: arr_0 {written['arr_0'].shape} uint8"
        + ("" if args.no_statistics else " with mu, sigma, mu_s, sigma_s")
    )


def evaluate(args: argparse.Namespace) -> None:
    reference, samples = ImageNpz(args.ref_batch), ImageNpz(args.sample_batch)  # header checks only
    check_sample_counts(len(samples), len(reference), args.is_split_size, args.nearest_k)
    metrics = InceptionMetrics(resolve_inception_weights(args.inception_weights), args.device, args.batch_size)
    results = evaluate_npz(args.ref_batch, args.sample_batch, metrics, args.is_split_size, args.nearest_k, log=print)
    print("Inception Score:", results["is"])
    print("FID:", results["fid"])
    print("sFID:", results["sfid"])
    print("Precision:", results["precision"])
    print("Recall:", results["recall"])
    if args.output_json:
        record = {
            **results,
            "ref_batch": args.ref_batch,
            "sample_batch": args.sample_batch,
            "num_reference": len(reference),
            "num_samples": len(samples),
            "is_split_size": args.is_split_size,
            "nearest_k": args.nearest_k,
            "reference_statistics": "precomputed" if reference.statistics() is not None else "computed",
        }
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.output_json}")


def main(argv=None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Evaluate a sample batch, or write a reference batch."""
    check_device(args.device)
    try:
        make_reference(args) if args.make_reference is not None else evaluate(args)
    except (ValueError, FileNotFoundError) as error:  # user input: one line, no traceback
        raise UserError(f"{error}")


if __name__ == "__main__":
    run_cli(run, ARGS)
