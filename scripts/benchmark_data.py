#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""How fast the training data is served, and how fast latents are extracted.

    python scripts/benchmark_data.py                          # synthetic ImageNet-256-sized latents folder
    python scripts/benchmark_data.py --latents latents/imagenet256
    python scripts/benchmark_data.py --extraction --device cuda --vae_dtype bfloat16   # VAE images/s
    python scripts/benchmark_data.py --compare_checks --dtypes float32   # cost of the per-shard data checks

Dataset mode times `get_batch` exactly as the trainer calls it (random indices in the
trainer's order, the per-step data generator, posterior sampling and flips), from one process,
and prints samples/s (median of repeats). Extraction mode times the VAE encoding of
`scripts/extract_latents.py` (image + mirror image per sample) with the SD-VAE architecture
(`stabilityai/sd-vae-ft-ema`'s config; random weights unless `--vae` names real ones, since
the speed does not depend on them). `--compare_checks` times the batches with `LatentDataset`'s
per-shard moment checks on and off in one process (interleaved repeats, ratio of the two), and
separately the first read of a shard, when its check runs.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from speedit_scheduler.cli import ArgumentParser, UserError, run_cli
from speedit_scheduler.data.datasets import DeterministicOrder
from speedit_scheduler.data.latents import LatentDataset, shard_file_name, write_shard
from speedit_scheduler.data.loading import load_training_data
from speedit_scheduler.utils import atomic_write_json, seeded_generator

# stabilityai/sd-vae-ft-ema's architecture (its config.json), for timing without the weights.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


def write_synthetic_latents(folder: str, num_samples: int, latent_size: int, dtype: str, shard_size: int) -> None:
    """A latents folder of random moments in the real format (shards + manifest)."""
    generator = torch.Generator().manual_seed(0)
    shards = []
    for k, start in enumerate(range(0, num_samples, shard_size)):
        n = min(shard_size, num_samples - start)
        moments = torch.randn(n, 2, 8, latent_size, latent_size, generator=generator)
        moments[:, :, 4:] = moments[:, :, 4:].abs() * 0.05 + 1e-3  # a posterior std, > 0 as a VAE's is
        labels = torch.randint(0, 1000, (n,), generator=generator)
        write_shard(os.path.join(folder, shard_file_name(k)), moments, labels, torch.arange(start, start + n), dtype)
        shards.append({"file": shard_file_name(k), "num_samples": n})
    atomic_write_json(
        os.path.join(folder, "manifest.json"),
        {
            "format": "speedit-latents",
            "version": 1,
            "complete": True,
            "num_samples": num_samples,
            "dtype": dtype,
            "flips": True,
            "resolution": latent_size * 8,
            "latent_shape": [4, latent_size, latent_size],
            "shards": shards,
            "skipped": [],
            "class_names": [str(i) for i in range(1000)],
            "source": {"name": "synthetic"},
            "vae": {"name_or_path": "synthetic", "scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4},
        },
    )


def time_dataset(dataset, batch_size: int, num_batches: int, repeats: int, host_only: bool = False) -> dict:
    """Samples/s over `num_batches` consecutive trainer steps (order, generator and all), median
    of repeats. `host_only` times the CPU side of a GPU run (`LatentDataset.host_batch`: flips
    and the gather; the noise is drawn on the GPU); otherwise the whole `get_batch` on the CPU."""
    order = DeterministicOrder(len(dataset), batch_size, 1, seed=0)
    fetch = dataset.host_batch if host_only else dataset.get_batch
    for step in range(len(dataset) // batch_size):  # one epoch first: warm page cache and mappings
        fetch(order.indices(step, 0), seeded_generator("data", 0, 0, step))
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        for step in range(repeat * num_batches, (repeat + 1) * num_batches):
            fetch(order.indices(step, 0), seeded_generator("data", 0, 0, step))
        rates.append(batch_size * num_batches / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def compare_checks(folder: str, batch_size: int, num_batches: int, repeats: int, host_only: bool) -> dict:
    """Samples/s of the trainer's batches with `LatentDataset`'s per-shard checks on and off, in the
    steady state: both datasets first serve one epoch (every shard checked, the page cache warm).
    Then every step is served by both, in alternating order, each timed on its own, so that the
    load of a shared machine falls on both alike. Returns the medians over repeats, the ratio of
    the medians (on / off) and the median of per-repeat ratios."""
    datasets = {True: LatentDataset(folder), False: LatentDataset(folder, check_shards=False)}
    order = DeterministicOrder(len(datasets[True]), batch_size, 1, seed=0)

    def serve(checks: bool, step: int) -> float:
        dataset = datasets[checks]
        fetch = dataset.host_batch if host_only else dataset.get_batch
        indices, generator = order.indices(step, 0), seeded_generator("data", 0, 0, step)
        start = time.perf_counter()
        fetch(indices, generator)
        return time.perf_counter() - start

    for step in range(len(datasets[True]) // batch_size):
        serve(True, step), serve(False, step)
    for shard in range(len(datasets[True].shard_files)):  # shards the epoch's batches missed, if any
        datasets[True].check_shard(shard)
    rates = {True: [], False: []}
    for repeat in range(repeats):
        seconds = {True: 0.0, False: 0.0}
        for step in range(repeat * num_batches, (repeat + 1) * num_batches):
            for checks in (True, False) if step % 2 == 0 else (False, True):
                seconds[checks] += serve(checks, step)
        for checks in rates:
            rates[checks].append(batch_size * num_batches / seconds[checks])
    ratios = [on / off for on, off in zip(rates[True], rates[False])]
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    return {
        "checks_on_samples_per_s": on,
        "checks_off_samples_per_s": off,
        "ratio_of_medians": on / off,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


def time_shard_checks(folder: str) -> dict:
    """Seconds `LatentDataset.check_shard` takes per shard (the extra cost of the first batch that
    touches a shard; the page cache holds the shard if it was just written or read), median over
    the folder's shards, and the rate in bytes of shard per second."""
    dataset = LatentDataset(folder, check_shards=False)
    seconds, sizes = [], []
    for shard, name in enumerate(dataset.shard_files):
        start = time.perf_counter()
        dataset.check_shard(shard)
        seconds.append(time.perf_counter() - start)
        sizes.append(os.path.getsize(os.path.join(folder, name)))
    return {
        "shard_check_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "shard_bytes": statistics.median(sizes),
        "bytes_per_s": sum(sizes) / sum(seconds),
        "num_shards": len(seconds),
    }


def print_check_comparison(label: str, folder: str, args, results: list) -> None:
    first = time_shard_checks(folder)
    results.append({"mode": "shard_check", "data": label, **first})
    print(
        f"{label}: first read of a shard: check {first['shard_check_s'] * 1e3:.0f} ms per "
        f"{first['shard_bytes'] / 2**20:.0f} MiB shard (median of {first['num_shards']}, "
        f"{first['min_s'] * 1e3:.0f}-{first['max_s'] * 1e3:.0f} ms), {first['bytes_per_s'] / 2**30:.2f} GiB/s"
    )
    for host_only, work in ((True, "host side of a GPU run"), (False, "all on CPU (noise too)")):
        row = compare_checks(folder, args.batch_size, args.num_batches, args.repeats, host_only)
        results.append({"mode": "compare_checks", "data": label, "work": work, **row})
        print(
            f"| {label} | {work} | {row['checks_on_samples_per_s']:,.0f} | {row['checks_off_samples_per_s']:,.0f} | "
            f"{row['ratio_of_medians']:.3f} | {row['median_ratio']:.3f} "
            f"({row['min_ratio']:.3f}-{row['max_ratio']:.3f}) |"
        )


CHECKS_TABLE_HEAD = (
    "| data | work timed | checks on: samples/s | checks off: samples/s | on / off (medians) | "
    "median per-repeat ratio (min-max) |\n| --- | --- | --- | --- | --- | --- |"
)


def time_extraction(vae, batch_size: int, resolution: int, num_batches: int, repeats: int, device: str) -> dict:
    from speedit_scheduler.data.extraction import encode_moments

    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    with torch.no_grad():
        encode_moments(vae, images, flips=True)  # warm-up (cuDNN autotuning, allocator)
        rates = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(num_batches):
                moments = encode_moments(vae, images, flips=True)
            moments.sum().item()  # wait for the device
            rates.append(batch_size * num_batches / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def storage_error(folder: str) -> list[dict]:
    """What fp16 / bf16 storage would do to the latents of a float32 latents folder: the RMS
    rounding error of the posterior mean, relative to the mean's RMS and to the posterior std
    (the noise every training draw adds anyway)."""
    dataset = LatentDataset(folder)
    if dataset.storage_dtype != "float32":
        raise UserError(
            f"--storage_error needs a float32 latents folder; {folder!r} holds {dataset.storage_dtype}."
        )
    everything = np.arange(len(dataset))
    moments = torch.cat(
        [dataset.gather_moments(everything, np.full(len(dataset), f)) for f in range(dataset.num_flips)]
    )
    mean, std = moments.chunk(2, dim=1)
    rows = []
    for dtype in ("float16", "bfloat16"):
        error = mean.to(getattr(torch, dtype)).float() - mean
        rms_error = error.pow(2).mean().sqrt().item()
        rows.append(
            {
                "dtype": dtype,
                "rms_error": rms_error,
                "relative_to_mean_rms": rms_error / mean.pow(2).mean().sqrt().item(),
                "relative_to_posterior_std": rms_error / std.pow(2).mean().sqrt().item(),
                "max_abs_error": error.abs().max().item(),
            }
        )
    return rows


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--latents", default=None, help="A latents folder to time; default: a synthetic one.")
    p.add_argument("--num_samples", type=int, default=16384, help="Size of the synthetic folder.")
    p.add_argument("--latent_size", type=int, default=32, help="32 for ImageNet 256, 64 for 512.")
    p.add_argument("--shard_size", type=int, default=4096, help="Samples per shard of the synthetic folder.")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_batches", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--extraction", action="store_true", help="Time VAE encoding instead of the dataset.")
    p.add_argument(
        "--storage_error",
        default=None,
        metavar="FOLDER",
        help="Measure what fp16/bf16 storage does to a float32 latents folder's latents.",
    )
    p.add_argument(
        "--compare_checks",
        action="store_true",
        help="Time the batches with LatentDataset's per-shard checks on and off, and one shard's check.",
    )
    p.add_argument("--vae", default=None, help="Extraction: a VAE id or folder; default the SD-VAE architecture.")
    p.add_argument("--vae_dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="Also write the results here.")
    args = p.parse_args(argv)
    for name in ("num_samples", "latent_size", "shard_size", "batch_size", "num_batches", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    results = []
    if args.storage_error:
        for row in storage_error(args.storage_error):
            results.append({"mode": "storage_error", **row})
            print(
                f"{row['dtype']}: RMS rounding error of the posterior mean {row['rms_error']:.3g} = "
                f"{row['relative_to_mean_rms']:.2%} of its RMS, {row['relative_to_posterior_std']:.2%} of the "
                f"posterior std; max abs {row['max_abs_error']:.3g}"
            )
    elif args.extraction:
        from diffusers import AutoencoderKL

        dtype = getattr(torch, args.vae_dtype)
        if args.vae:
            vae = AutoencoderKL.from_pretrained(args.vae, dtype=dtype)
        else:
            torch.manual_seed(0)
            vae = AutoencoderKL(**SD_VAE_CONFIG)
            vae = vae if dtype == torch.float32 else vae.to(dtype)
        vae = vae.to(args.device).eval()
        result = time_extraction(vae, args.batch_size, args.resolution, args.num_batches, args.repeats, args.device)
        results.append(
            {
                "mode": "extraction",
                "vae_dtype": args.vae_dtype,
                "batch_size": args.batch_size,
                "resolution": args.resolution,
                **result,
            }
        )
        print(
            f"VAE encoding (image + mirror) {args.resolution}px, batch {args.batch_size}, {args.vae_dtype}: "
            f"{result['images_per_s']:.3g} images/s (min {result['min']:.3g}, max {result['max']:.3g})"
        )
    elif args.compare_checks and args.latents:
        print(CHECKS_TABLE_HEAD)
        print_check_comparison(os.path.basename(os.path.normpath(args.latents)), args.latents, args, results)
    elif args.compare_checks:
        print(
            f"synthetic latents: {args.num_samples} samples of 4x{args.latent_size}x{args.latent_size} with flips, "
            f"batch {args.batch_size}, {args.num_batches} batches x {args.repeats} repeats, "
            f"{info['threads']} torch threads"
        )
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory() as folder:
                write_synthetic_latents(folder, args.num_samples, args.latent_size, dtype, shard_size=args.shard_size)
                if dtype == args.dtypes[0]:
                    print(CHECKS_TABLE_HEAD)
                print_check_comparison(f"synthetic {dtype}", folder, args, results)
    elif args.latents:
        dataset = load_training_data(args.latents)
        result = time_dataset(dataset, args.batch_size, args.num_batches, args.repeats)
        results.append({"mode": "dataset", "latents": os.path.basename(os.path.normpath(args.latents)), **result})
        print(f"{args.latents}: {result['samples_per_s']:.0f} samples/s")
    else:
        print(
            f"synthetic latents: {args.num_samples} samples of 4x{args.latent_size}x{args.latent_size} with flips, "
            f"batch {args.batch_size}, {info['threads']} torch threads"
        )
        print("| storage | on disk | work timed | samples/s (median) | min | max |")
        print("| --- | --- | --- | --- | --- | --- |")
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory() as folder:
                write_synthetic_latents(folder, args.num_samples, args.latent_size, dtype, shard_size=args.shard_size)
                size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / args.num_samples
                dataset = LatentDataset(folder)
                for host_only, work in ((True, "host side of a GPU run"), (False, "all on CPU (noise too)")):
                    result = time_dataset(dataset, args.batch_size, args.num_batches, args.repeats, host_only)
                    results.append(
                        {"mode": "dataset", "dtype": dtype, "work": work, "bytes_per_sample": size, **result}
                    )
                    print(
                        f"| {dtype} | {size / 1024:.0f} KiB/sample | {work} | {result['samples_per_s']:,.0f} | "
                        f"{result['min']:,.0f} | {result['max']:,.0f} |"
                    )
                del dataset
        digits = time_dataset(load_training_data("digits"), args.batch_size, args.num_batches, args.repeats)
        results.append({"mode": "dataset", "dataset": "digits", **digits})
        print(
            f"| digits (uint8 in RAM) | | all on CPU | {digits['samples_per_s']:,.0f} | {digits['min']:,.0f} | "
            f"{digits['max']:,.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)


if __name__ == "__main__":
    np.seterr(all="ignore")
    run_cli(main)
