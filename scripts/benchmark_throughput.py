#!/usr/bin/env python
# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Training-step throughput of train_dit.py's step on synthetic latents: images/s, FLOPs per
image (torch.utils.flop_counter), achieved TFLOP/s against a matmul ceiling measured in the same
run, peak memory, versions and device.

    python scripts/benchmark_throughput.py --model XL/2 --batch_size 128 --precision bf16
    python scripts/benchmark_throughput.py --sweep --model XL/2 --batch_size 32,64,128 --compile off,on
    python scripts/benchmark_throughput.py --model S/2 --batch_size 8 --threads 2 --overhead  # CPU
    python scripts/benchmark_throughput.py --flops_only --model XL/2

--sweep runs each (precision, compile) group in its own process under a time cap of
--config_timeout seconds per configuration and prints a markdown table; --overhead times the bare
forward + backward + AdamW step interleaved with the trainer's step and reports the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

from speedit_scheduler.cli import ArgumentParser, UserError, run_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package (torch, diffusers) is imported only where a measurement runs, so that a sweep's
# parent process stays light and each group's worker pays its own start-up.

ON_OFF = {"on": True, "off": False}


def _list(kind):
    def parse(text: str):
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is empty: give one value or a comma-separated list")
        return [kind(v) for v in values]

    return parse


def _on_off(text: str) -> bool:
    if text not in ON_OFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off")
    return ON_OFF[text]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default="XL/2", help="DiT preset, e.g. XL/2 or DiT-XL/2 (default XL/2).")
    p.add_argument("--resolution", type=int, default=256, help="Image side; the latent side is resolution / 8.")
    p.add_argument("--batch_size", type=_list(int), default=[32], help="Per-device batch (a list with --sweep).")
    p.add_argument(
        "--precision", type=_list(str), default=None, help="fp32, bf16 or fp16 (default bf16 on CUDA, fp32 on CPU)."
    )
    p.add_argument("--attention", type=_list(str), default=["sdpa"], help="sdpa, math, flash, efficient or xformers.")
    p.add_argument("--compile", type=_list(_on_off), nargs="?", const=[True], default=[False], help="[on|off|off,on]")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: quick CPU check).")
    p.add_argument(
        "--compile_mode",
        default=None,
        help="inductor's mode for --compile: default, reduce-overhead (CUDA graphs), max-autotune, "
        "max-autotune-no-cudagraphs.",
    )
    p.add_argument(
        "--gradient_checkpointing", type=_list(_on_off), nargs="?", const=[True], default=[False], help="[on|off|...]"
    )
    p.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=None, help="Default: fused on CUDA.")
    p.add_argument("--ema", default="foreach", help="foreach (the trainer's EMA) or none.")
    p.add_argument("--speedit", default="speed", help="Timestep preset of the trainer's step (default speed).")
    p.add_argument("--num_layers", type=int, default=None, help="Override the preset's depth (tiny test models).")
    p.add_argument("--hidden_size", type=int, default=None)
    p.add_argument("--num_attention_heads", type=int, default=None)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10, help="Timed steps per repeat.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    p.add_argument("--repeats", type=int, default=5, help="Timed repeats; images/s is their median.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls for fp32 on CUDA (train_dit.py's flag).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--clock", default="wall", help="wall, or process: CPU seconds (CPU runs on a shared machine).")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs).")
    p.add_argument("--matmul_size", type=int, default=None, help="Side of the ceiling matmul (8192 CUDA, 1024 CPU).")
    p.add_argument("--overhead", action="store_true", help="Also time the bare step and report the trainer's overhead.")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="Profile STEPS trainer steps of the last configuration: time per kernel category and the top kernels.",
    )
    p.add_argument("--flops_only", action="store_true", help="Only count FLOPs (meta device, no compute) and exit.")
    p.add_argument("--sweep", action="store_true", help="Every combination of the listed options, one row each.")
    p.add_argument("--config_timeout", type=float, default=300.0, help="Sweep: seconds allowed per configuration.")
    p.add_argument("--time_budget", type=float, default=None, help="Sweep: seconds for all groups (later ones skip).")
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--markdown", default=None, help="Write the results table here.")
    p.add_argument("--worker_jsonl", default=None, help=argparse.SUPPRESS)  # a sweep group's rows, one per line
    args = p.parse_args(argv)

    if not args.sweep and args.worker_jsonl is None:
        for name in ("batch_size", "precision", "attention", "compile", "gradient_checkpointing"):
            values = getattr(args, name)
            if values is not None and len(values) > 1:
                raise UserError(f"--{name} has {len(values)} values ({values}): pass --sweep to run each.")
    if args.config_timeout <= 0:
        raise UserError(f"--config_timeout {args.config_timeout} must be positive.")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"--time_budget {args.time_budget} must be positive.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1.")
    if args.profile < 0:
        raise UserError(f"--profile {args.profile} must be a number of steps (0: no profile).")
    if args.sweep and args.profile:
        raise UserError("--profile looks at one configuration: drop --sweep or --profile.")
    if args.sweep and args.overhead:
        raise UserError("--overhead measures one configuration: drop --sweep or --overhead.")
    return args


def base_config(args: argparse.Namespace, precision: str, compile: bool):
    from speedit_scheduler.tools.benchmarking import BenchmarkConfig

    return BenchmarkConfig(
        model=args.model,
        resolution=args.resolution,
        batch_size=min(args.batch_size),
        precision=precision,
        attention=args.attention[0],
        compile=compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        gradient_checkpointing=args.gradient_checkpointing[0],
        fused_adamw=args.fused_adamw,
        ema=args.ema,
        speedit=args.speedit,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_classes=args.num_classes,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        allow_tf32=args.allow_tf32,
        device=args.device,
        clock=args.clock,
    )


def default_precision(args: argparse.Namespace) -> str:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return "bf16" if cuda else "fp32"


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def compile_label(row: dict) -> str:
    """on / off, or the compile mode when one was given."""
    return (row.get("compile_mode") or "on") if row.get("compile") else "off"


def format_row(row: dict) -> str:
    on = {True: "on", False: "off"}
    head = (
        f"{row['model']} batch {row['batch_size']} {row['precision']} attention={row['attention']} "
        f"compile={compile_label(row)} checkpointing={on[row['gradient_checkpointing']]}"
    )
    if row.get("status") != "ok":
        return f"{head}: {row.get('status')}"
    text = (
        f"{head}: {row['images_per_s']:.2f} images/s (min {row['images_per_s_min']:.2f}, max "
        f"{row['images_per_s_max']:.2f}), {row['step_ms']:.1f} ms/step, {row['train_gflop_per_image']:.3f} "
        f"GFLOP/image, {row['achieved_tflops']:.3f} TFLOP/s = {100 * row['mfu']:.1f}% of the "
        f"{row['matmul_tflops']:.2f} TFLOP/s matmul, peak memory {row['peak_memory_gib']:.2f} GiB "
        f"({row['peak_memory_kind']})"
    )
    if "overhead" in row:
        spread = row["overhead_per_repeat"]
        text += (
            f"\noverhead of the trainer step over the bare step: {100 * row['overhead']:+.1f}% (trainer "
            f"{row['trainer_step_ms']:.1f} ms, bare {row['bare_step_ms']:.1f} ms, median of {row['repeats']} "
            f"interleaved repeats; per repeat {100 * spread['min']:+.1f}% to {100 * spread['max']:+.1f}%)"
        )
    return text


def format_header(header: dict) -> str:
    env, matmul, flops = header["environment"], header["matmul"], header["flops"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "diffusers", "accelerate") if env.get(k))
    return (
        f"device: {env['device_name']} ({env['device']}, {env['threads']} threads); {versions}; {env['date']}\n"
        f"matmul ceiling: {matmul['tflops']:.2f} TFLOP/s ({matmul['dtype']}, {matmul['size']}^3)\n"
        f"FLOPs per image (torch.utils.flop_counter): forward {flops['forward_gflop_per_image']:.4g} G, "
        f"forward + backward {flops['train_gflop_per_image']:.4g} G; analytic forward "
        f"{flops['analytic_forward_gflop_per_image']:.4g} G (diffusers' per-block embedders), "
        f"{flops['paper_forward_gflop_per_image']:.4g} G with one shared embedder as in the DiT paper"
    )


COLUMNS = (
    ("model", "model", "{}"),
    ("batch", "batch_size", "{}"),
    ("precision", "precision", "{}"),
    ("attention", "attention", "{}"),
    ("compile", "compile", "{}"),
    ("ckpt", "gradient_checkpointing", "{}"),
    ("EMA", "ema", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("ms/step", "step_ms", "{:.1f}"),
    ("GFLOP/image", "train_gflop_per_image", "{:.1f}"),
    ("TFLOP/s", "achieved_tflops", "{:.2f}"),
    ("matmul TFLOP/s", "matmul_tflops", "{:.1f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("peak GiB", "peak_memory_gib", "{:.2f}"),
    ("status", "status", "{}"),
)


def markdown_table(rows: list[dict]) -> str:
    def cell(value, fmt):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return fmt.format(value)

    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    shown = [{**row, "compile": compile_label(row)} for row in rows]
    lines += ["| " + " | ".join(cell(row.get(key), fmt) for _, key, fmt in COLUMNS) + " |" for row in shown]
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    result = {"command": " ".join(["python"] + [shlex.quote(a) for a in sys.argv]), **result}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown_table(result["rows"]) + "\n")


# --------------------------------------------------------------------------------------------
# one process: a single configuration, or a sweep group (worker)
# --------------------------------------------------------------------------------------------
def run_in_process(args: argparse.Namespace) -> dict:
    import torch

    from speedit_scheduler.tools import benchmarking

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    precision = (args.precision or [default_precision(args)])[0]
    config = base_config(args, precision, args.compile[0])
    try:
        if args.flops_only:
            from speedit_scheduler.models import dit_config

            device = torch.device("cpu") if args.device == "auto" else torch.device(args.device)
            benchmarking.validate_config(config, device)
            model_config = dit_config(benchmarking.normalize_preset(config.model), **config.dit_kwargs())
            return {"flops": benchmarking.flops_summary(model_config), "rows": []}

        stream = open(args.worker_jsonl, "a") if args.worker_jsonl else None

        def on_start(header):
            if stream is None:
                print(format_header(header), flush=True)
            else:
                stream.write(json.dumps({"header": header}) + "\n")
                stream.flush()

        def on_row(row):
            if stream is None:
                print(format_row(row), flush=True)
            else:
                stream.write(json.dumps({"row": row}) + "\n")
                stream.flush()

        return benchmarking.run_benchmark(
            config,
            batch_sizes=args.batch_size,
            attentions=args.attention,
            checkpointing=args.gradient_checkpointing,
            compile=args.compile[0],
            overhead=args.overhead,
            matmul_size=args.matmul_size,
            on_start=on_start,
            on_row=on_row,
            profile_steps=args.profile,
        )
    except ValueError as e:
        raise UserError(f"{e}") from None


# --------------------------------------------------------------------------------------------
# sweep: one worker process per (precision, compile) group, under a time cap
# --------------------------------------------------------------------------------------------
def worker_argv(argv: list[str], precision: str | None, compile: bool, jsonl: str) -> list[str]:
    """The sweep's own arguments minus the sweep-level ones, with this group's precision and compile."""
    drop_with_value = {"--precision", "--compile", "--json", "--markdown", "--config_timeout", "--time_budget"}
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name == "--sweep":
            continue
        if name in drop_with_value:
            # --compile may come without a value
            has_value = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            skip = has_value
            continue
        out.append(a)
    if precision is not None:
        out += ["--precision", precision]
    return out + ["--compile", "on" if compile else "off", "--worker_jsonl", jsonl]


def run_sweep(args: argparse.Namespace, argv: list[str]) -> dict:
    groups = list(itertools.product(args.precision or [None], args.compile))
    per_group = len(args.batch_size) * len(args.attention) * len(args.gradient_checkpointing)
    rows, header = [], None
    sweep_start = time.perf_counter()
    for index, (precision, compile) in enumerate(groups):
        limit = args.config_timeout * per_group
        if args.time_budget is not None:
            limit = min(limit, args.time_budget - (time.perf_counter() - sweep_start))
        with tempfile.TemporaryDirectory() as tmp:
            jsonl = os.path.join(tmp, "rows.jsonl")
            cmd = [sys.executable, os.path.abspath(__file__)] + worker_argv(argv, precision, compile, jsonl)
            started = time.perf_counter()
            if limit <= 0:
                failure = "skipped (--time_budget spent)"
            else:
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                    failure = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1]
                except subprocess.TimeoutExpired:
                    failure = f"timeout after {limit:.0f} s"
            group_rows = []
            if os.path.exists(jsonl):
                with open(jsonl) as f:
                    for line in f:
                        item = json.loads(line)
                        if "header" in item:
                            header = header or item["header"]
                        else:
                            group_rows.append(item["row"])
        if failure is not None and ": error: " in failure and index == 0 and not group_rows:
            raise UserError(failure.split(": error: ", 1)[1])  # a bad option: every group would fail the same way
        done = {(r["batch_size"], r["attention"], r["gradient_checkpointing"]) for r in group_rows}
        for batch, attention, ckpt in itertools.product(args.batch_size, args.attention, args.gradient_checkpointing):
            if (batch, attention, ckpt) not in done:
                group_rows.append(
                    {
                        "model": args.model,
                        "batch_size": batch,
                        "precision": precision or (group_rows[0]["precision"] if group_rows else "default"),
                        "attention": attention,
                        "compile": compile,
                        "gradient_checkpointing": ckpt,
                        "ema": args.ema,
                        "status": failure or "not run",
                    }
                )
        for row in group_rows:
            print(format_row(row), flush=True)
        print(f"(group {index + 1}/{len(groups)} took {time.perf_counter() - started:.0f} s)", flush=True)
        rows += group_rows
    if header is not None:
        print(format_header(header))
    table = markdown_table(rows)
    print(table)
    return {**(header or {}), "rows": rows, "markdown": table}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.sweep:
        result = run_sweep(args, argv)
    else:
        result = run_in_process(args)
        if args.flops_only:
            print(json.dumps(result["flops"], indent=2))
        if "profile" in result:
            from speedit_scheduler.tools.benchmarking import format_profile

            print(format_profile(result["profile"]), flush=True)
    if args.worker_jsonl is None:
        write_outputs(args, result)
    return result


if __name__ == "__main__":
    run_cli(main)
