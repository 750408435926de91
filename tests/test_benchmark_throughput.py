# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""scripts/benchmark_throughput.py on tiny DiTs on the CPU: fields and their consistency, FLOP
counts against hand-computed values, one row per sweep configuration, one-line errors. No timing
assertions."""

import json
import math
import os
import sys

import pytest
import torch

from speedit_scheduler.models import dit_config
from speedit_scheduler.tools.benchmarking import categorize_kernel, count_train_flops, dit_forward_flops, kernel_times

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark_throughput.py")
# 2 layers, width 64, 2 heads, 64x64 images -> 8x8x4 latents -> 16 tokens of patch 2.
TINY = ["--model", "S/2", "--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "2",
        "--resolution", "64", "--num_classes", "10", "--threads", "1", "--device", "cpu"]  # fmt: skip


def tiny_forward_flops() -> int:
    """Multiply-adds of one image through the tiny DiT, by hand, times 2."""
    tokens, dim, depth, ff = 16, 64, 2, 256
    patch_embed = tokens * (2 * 2 * 4) * dim
    timestep_mlp = 256 * dim + dim * dim  # diffusers: one per block plus one for the output layer
    block = 6 * dim * dim + 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * ff
    output = 2 * dim * dim + tokens * dim * (2 * 2 * 8)
    return 2 * (patch_embed + depth * block + output + (depth + 1) * timestep_mlp)


@pytest.fixture(scope="module")
def script_module(load_script):
    return load_script("benchmark_throughput")


def test_flop_count_matches_hand_count_and_dit_paper():
    assert tiny_forward_flops() == 3_612_672
    config = dit_config("S/2", sample_size=8, num_classes=10, num_layers=2, hidden_size=64, num_attention_heads=2)
    counted = count_train_flops(config)
    assert counted.forward == tiny_forward_flops() == dit_forward_flops(config)
    # The backward pass is two products per forward product, less the input gradients nobody needs:
    # the patch projection's (input: data) and the timestep MLPs' first layer's (input: sinusoids).
    unneeded_input_grads = 2 * 16 * (2 * 2 * 4) * 64 + 3 * 2 * 256 * 64
    assert counted.backward == 2 * counted.forward - unneeded_input_grads

    xl = dit_config("XL/2")
    xl_counted = count_train_flops(xl, batch_size=1)
    assert xl_counted.forward == dit_forward_flops(xl) == 237_333_676_032
    # The issue's 237.2 GFLOP (DiT paper, one shared embedder); diffusers' per-block embedders add 0.04%.
    assert dit_forward_flops(xl, shared_embedder=True) / 1e9 == pytest.approx(237.2, abs=0.05)
    assert xl_counted.train / 1e9 == pytest.approx(711.7, rel=1e-3)


@pytest.mark.usefixtures("fresh_accelerate_state")  # its Accelerator(cpu=True) is this test's own
def test_single_run_with_overhead_reports_every_field(tmp_path, script_module, monkeypatch, capsys, torch_threads):
    # In this process (the script's main, reading sys.argv as `python SCRIPT ...` gives it): a single
    # configuration is measured in the process that parses the flags; the sweep below runs its worker
    # processes. --threads 1 sets this process's thread count: torch_threads restores it afterwards.
    out = tmp_path / "bench.json"
    argv = [*TINY, "--batch_size", "4", "--steps", "2", "--warmup", "1", "--repeats", "3",
            "--overhead", "--profile", "2", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    with torch_threads(1):
        script_module.main()
    stdout = capsys.readouterr().out
    assert "images/s" in stdout and "overhead of the trainer step" in stdout
    assert "profile over 2 trainer steps (CPU operator self time)" in stdout
    result = json.loads(out.read_text())
    assert "benchmark_throughput.py" in result["command"]
    env = result["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["threads"] == 1
    assert result["matmul"]["dtype"] == "float32" and result["matmul"]["tflops"] > 0
    assert result["flops"]["forward_gflop_per_image"] * 1e9 == pytest.approx(tiny_forward_flops(), rel=1e-9)

    (row,) = result["rows"]
    assert row["status"] == "ok" and row["batch_size"] == 4 and row["precision"] == "fp32"
    assert row["attention"] == "sdpa" and row["compile"] is False and row["gradient_checkpointing"] is False
    assert row["fused_adamw"] is False and row["ema"] == "foreach" and row["parameters"] > 0
    assert row["clock"] == "wall" and row["steps"] == 2 and row["repeats"] == 3
    assert 0 < row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    assert row["step_ms"] == pytest.approx(1000 * 4 / row["images_per_s"], rel=1e-6)
    assert row["forward_gflop_per_image"] * 1e9 == pytest.approx(tiny_forward_flops(), rel=0.02)
    assert row["analytic_forward_gflop_per_image"] * 1e9 == pytest.approx(tiny_forward_flops(), rel=1e-9)
    assert row["train_gflop_per_image"] == pytest.approx(3 * row["forward_gflop_per_image"], rel=0.05)
    assert row["achieved_tflops"] == pytest.approx(row["train_gflop_per_image"] * row["images_per_s"] / 1e3)
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / row["matmul_tflops"])
    assert 0 < row["mfu"] < 1.5
    assert row["peak_memory_gib"] > 0 and row["peak_memory_kind"] == "process peak RSS"
    # Overhead: interleaved repeats of both steps, and the ratio of their medians.
    assert len(row["bare_step_ms_per_repeat"]) == len(row["trainer_step_ms_per_repeat"]) == 3
    assert row["overhead"] == pytest.approx(row["trainer_step_ms"] / row["bare_step_ms"] - 1)
    spread = row["overhead_per_repeat"]
    assert spread["min"] <= spread["median"] <= spread["max"] and math.isfinite(row["overhead"])
    # Profile: the categories split the busy time, and the matrix products are among them.
    profile = result["profile"]
    assert profile["steps"] == 2 and profile["busy_ms_per_step"] > 0 and profile["wall_ms_per_step"] > 0
    categories = {c["category"]: c for c in profile["categories"]}
    assert sum(c["ms_per_step"] for c in categories.values()) == pytest.approx(profile["busy_ms_per_step"])
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0)
    assert categories["matmul"]["ms_per_step"] > 0 and categories["EMA, grad norm (foreach)"]["ms_per_step"] > 0
    assert 0 < len(profile["top"]) <= 20 and any(k["name"] == "aten::addmm" for k in profile["top"])


@pytest.mark.parametrize(
    "kernel, category",
    [
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
            "matmul",
        ),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
        ("triton_tem_fused_addmm_0", "matmul"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", "attention"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
            "optimizer (AdamW)",
        ),
        (
            "void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>, LerpFunctor<float>>",
            "EMA, grad norm (foreach)",
        ),
        ("triton_per_fused_add_mul_native_layer_norm_3", "compiled fusions"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "normalization"),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copies and casts"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
            "other elementwise / reductions",
        ),
        ("void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*)", "attention"),
    ],
)
def test_profile_categories_of_real_kernel_names(kernel, category):
    assert categorize_kernel(kernel) == category


def test_profile_counts_each_kernel_once():
    """On CUDA a `record_function` annotation (the optimizer's) carries the device time of the
    kernels inside it; only the kernels count. On the CPU only ATen operators count."""
    from types import SimpleNamespace as Event

    cuda_events = [
        Event(key="aten::mm", device_type="DeviceType.CPU", self_device_time_total=0.0, count=4),
        Event(key="nvjet_sm90_tst_192x192", device_type="DeviceType.CUDA", self_device_time_total=900.0, count=4),
        Event(key="Optimizer.step#AdamW.step", device_type="DeviceType.CUDA", self_device_time_total=300.0, count=1,
              is_user_annotation=True),
        Event(key="multi_tensor_apply_kernel<FusedAdamMathFunctor>", device_type="DeviceType.CUDA",
              self_device_time_total=300.0, count=2, is_user_annotation=False),
    ]  # fmt: skip
    assert kernel_times(cuda_events, cuda=True) == [
        ("nvjet_sm90_tst_192x192", 900.0, 4),
        ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 300.0, 2),
    ]
    cpu_events = [Event(key="aten::addmm", self_cpu_time_total=50.0, count=3),
                  Event(key="Optimizer.step#AdamW.step", self_cpu_time_total=70.0, count=1)]  # fmt: skip
    assert kernel_times(cpu_events, cuda=False) == [("aten::addmm", 50.0, 3)]


def test_sweep_gives_one_row_per_configuration(tmp_path, run_script):
    out, table = tmp_path / "sweep.json", tmp_path / "sweep.md"
    proc = run_script("scripts/benchmark_throughput.py",
                      [*TINY, "--sweep", "--batch_size", "2,3", "--gradient_checkpointing", "off,on",
                       "--steps", "1", "--warmup", "1", "--repeats", "1", "--json", out, "--markdown", table],
                      extra_env={"PYTHONUNBUFFERED": "1"}, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["batch_size"], r["gradient_checkpointing"]) for r in rows) == [
        (2, False), (2, True), (3, False), (3, True)
    ]  # fmt: skip
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows)
    lines = table.read_text().strip().splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| model | batch |")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "Q/3"], "model preset 'Q/3' is unknown"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
        (["--precision", "fp8"], "--precision 'fp8' is unknown"),
        (["--attention", "xformers", "--compile"], "--attention xformers cannot be traced by --compile"),
        (["--attention", "efficient"], "--attention efficient has no CPU kernel"),
        (["--resolution", "250"], "--resolution 250 is not a multiple of 8"),
        (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
        (["--batch_size", "2,4"], "--batch_size has 2 values"),
        (["--ema", "loop"], "--ema 'loop' is unknown"),
        (["--speedit", "fast"], "--speedit 'fast' is unknown"),
        (["--compile", "maybe"], "'maybe' is not on or off"),
        (["--sweep", "--overhead"], "--overhead measures one configuration"),
        (["--threads", "0"], "--threads 0 must be at least 1"),
        (["--clock", "gpu"], "--clock 'gpu' is unknown"),
        (["--profile", "-1"], "--profile -1 must be a number of steps"),
        (["--compile", "--compile_mode", "fast"], "--compile_mode 'fast' is unknown"),
        (
            ["--compile", "--compile_mode", "reduce-overhead", "--compile_backend", "aot_eager"],
            "--compile_mode is inductor's",
        ),
        (["--sweep", "--profile", "2"], "--profile looks at one configuration"),
    ],
)
def test_bad_flags_give_one_line_errors(script_module, argv, message):
    with pytest.raises(SystemExit) as info:
        script_module.main([*TINY, *argv])
    text = str(info.value)
    assert info.value.code == 2 and message in text and "\n" not in text
