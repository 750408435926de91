# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Training-step throughput of `train_dit.py`'s step: images/s, FLOPs per image, achieved
TFLOP/s against a matmul ceiling measured in the same process, peak memory, and the overhead of
the SpeeD step (scheduler, hybrid loss, EMA, bookkeeping) over a bare forward/backward/AdamW step.

`scripts/benchmark_throughput.py` is the command line; everything measured lives here so the
trainer and the benchmark share one definition of "a training step" (`TrainingEngine.step`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import accelerate
import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from .. import __version__
from ..losses import DiTLoss
from ..models import create_dit, disable_internal_label_dropout, dit_config, null_class_label
from ..scheduling_speedit import PRESETS, SpeeDiTScheduler
from ..training.ema import create_ema
from ..training.engine import TrainingEngine, check_compile_mode, compile_model, mark_compiled_step

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "math", "flash", "efficient", "xformers")
EMA_MODES = ("foreach", "none")
# The reference: DiT-XL/2 at 256x256 does 118.6 G multiply-adds per forward pass (DiT paper).
DIT_XL2_PAPER_FORWARD_GFLOP = 237.2
VAE_DOWNSAMPLE = 8  # SD-VAE: 256x256 images -> 32x32x4 latents
LATENT_CHANNELS = 4
TIMESTEP_FREQUENCY_DIM = 256  # diffusers' Timesteps(num_channels=256) inside each block's embedder


@dataclass
class BenchmarkConfig:
    """One benchmarked configuration. Model and optimizer defaults are `train_dit.py`'s."""

    model: str = "XL/2"
    resolution: int = 256
    batch_size: int = 32
    precision: str = "bf16"
    attention: str = "sdpa"
    compile: bool = False
    compile_backend: str = "inductor"  # train_dit.py's torch.compile default; aot_eager for quick CPU checks
    compile_mode: str | None = None  # inductor's mode; "reduce-overhead" adds CUDA graphs
    gradient_checkpointing: bool = False
    fused_adamw: bool | None = None  # None: the trainer's choice (fused on CUDA)
    ema: str = "foreach"
    speedit: str = "speed"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_classes: int = 1000
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    seed: int = 0
    learning_rate: float = 1e-4
    ema_decay: float = 0.9999
    class_dropout_prob: float = 0.1
    max_grad_norm: float = 0.0
    allow_tf32: bool = False
    device: str = "auto"
    # "process": CPU seconds of this process instead of wall time (CPU only). With --threads 1 it
    # ignores time lost to other programs on a shared machine; with more threads it counts spinning.
    clock: str = "wall"

    @property
    def latent_size(self) -> int:
        return self.resolution // VAE_DOWNSAMPLE

    def dit_kwargs(self) -> dict:
        return {
            "sample_size": self.latent_size,
            "in_channels": LATENT_CHANNELS,
            "num_classes": self.num_classes,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
        }


def normalize_preset(name: str) -> str:
    """Accept the issue's spelling `DiT-XL/2` as well as the trainer's `XL/2`."""
    return name[4:] if name.upper().startswith("DIT-") else name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is unknown: use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA GPU: use --device cpu.")
    return torch.device(device)


def validate_config(config: BenchmarkConfig, device: torch.device) -> dict:
    """Check every option before anything is built; return the model config. One-line errors."""
    if config.resolution % VAE_DOWNSAMPLE:
        raise ValueError(
            f"--resolution {config.resolution} is not a multiple of {VAE_DOWNSAMPLE} (the SD-VAE factor): "
            "use e.g. 256 or 512."
        )
    model_config = dit_config(normalize_preset(config.model), **config.dit_kwargs())  # raises for bad presets/sizes
    for name in ("batch_size", "steps", "repeats"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} {getattr(config, name)} must be at least 1.")
    if config.warmup < 0:
        raise ValueError(f"--warmup {config.warmup} must be 0 or more.")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision {config.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}.")
    if config.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention {config.attention!r} is unknown: choose one of {', '.join(ATTENTION_BACKENDS)}.")
    if config.ema not in EMA_MODES:
        raise ValueError(f"--ema {config.ema!r} is unknown: choose one of {', '.join(EMA_MODES)}.")
    if config.clock not in ("wall", "process"):
        raise ValueError(f"--clock {config.clock!r} is unknown: use wall or process.")
    if config.clock == "process" and device.type != "cpu":
        raise ValueError("--clock process measures CPU time: use it with --device cpu, or --clock wall on a GPU.")
    if config.speedit not in PRESETS:
        raise ValueError(f"--speedit {config.speedit!r} is unknown: choose one of {', '.join(PRESETS)}.")
    check_compile_mode(config.compile_mode, config.compile_backend)
    if config.attention == "xformers" and config.compile:
        raise ValueError("--attention xformers cannot be traced by --compile: use --attention sdpa with --compile.")
    if device.type == "cpu":
        if config.precision == "fp16":
            raise ValueError(
                "--precision fp16 needs a CUDA GPU (accelerate has no fp16 autocast on CPU): use bf16 or fp32."
            )
        if config.attention in ("efficient", "xformers"):
            raise ValueError(f"--attention {config.attention} has no CPU kernel: use sdpa, math or flash on the CPU.")
    if config.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError(
                "--attention xformers needs the xformers package: pip install xformers, or use sdpa."
            ) from None
    return model_config


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def dit_forward_flops(model_config: dict, shared_embedder: bool = False) -> int:
    """Analytic forward FLOPs (2 per multiply-add) of one image through a `DiTTransformer2DModel`.

    Counts the matrix products only (patch projection, per-sample conditioning MLPs, attention
    projections and scores, MLPs, output layer), as `FlopCounterMode` does. diffusers runs a
    timestep embedder in every block and once more for the output layer; `shared_embedder=True`
    counts one, as the DiT paper's model does (its 118.6 G multiply-adds for XL/2).
    """
    p, c_in, c_out = model_config["patch_size"], model_config["in_channels"], model_config["out_channels"]
    tokens = (model_config["sample_size"] // p) ** 2
    dim = model_config["num_attention_heads"] * model_config["attention_head_dim"]
    depth = model_config["num_layers"]
    ff_dim = 4 * dim  # diffusers' FeedForward default inner size
    timestep_mlp = TIMESTEP_FREQUENCY_DIM * dim + dim * dim
    per_block = (
        6 * dim * dim  # adaLN-Zero modulation (per sample)
        + 4 * tokens * dim * dim  # q, k, v and output projections
        + 2 * tokens * tokens * dim  # scores and the weighted sum of values
        + 2 * tokens * dim * ff_dim  # MLP
    )
    macs = tokens * p * p * c_in * dim + depth * per_block  # patch embedding + blocks
    macs += 2 * dim * dim + tokens * dim * p * p * c_out  # output modulation and projection
    macs += timestep_mlp * (1 if shared_embedder else depth + 1)
    return 2 * macs


@dataclass
class FlopCount:
    forward: int  # per image
    backward: int  # per image
    by_op: dict = field(default_factory=dict)

    @property
    def train(self) -> int:
        return self.forward + self.backward


def count_train_flops(model_config: dict, batch_size: int = 2) -> FlopCount:
    """FLOPs per image of one forward and backward, counted by `torch.utils.flop_counter`.

    The model is built on the meta device (no memory, no compute) with attention on the math
    path, so the count is the same on every device and includes the attention products (the
    counter does not know the CPU flash kernel). Only the model's products are counted: the
    loss, scheduler and optimizer are elementwise. Gradient checkpointing's recomputation is not
    counted (model FLOPs, as utilisation figures use).
    """

    with torch.device("meta"):
        model = DiTTransformer2DModel(**model_config)
    size, channels = model_config["sample_size"], model_config["in_channels"]
    x = torch.zeros(batch_size, channels, size, size, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            out = model(x, timestep=t, class_labels=y).sample
        with FlopCounterMode(display=False) as backward_counter:
            out.float().square().mean().backward()
    by_op = {str(k): v // batch_size for k, v in forward_counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(
        forward_counter.get_total_flops() // batch_size, backward_counter.get_total_flops() // batch_size, by_op
    )


def flops_summary(model_config: dict, flops: FlopCount | None = None) -> dict:
    """Counted and analytic GFLOP per image, and the DiT paper's figure for XL/2 at 256x256."""
    flops = flops or count_train_flops(model_config)
    return {
        "forward_gflop_per_image": flops.forward / 1e9,
        "backward_gflop_per_image": flops.backward / 1e9,
        "train_gflop_per_image": flops.train / 1e9,
        "analytic_forward_gflop_per_image": dit_forward_flops(model_config) / 1e9,
        "paper_forward_gflop_per_image": dit_forward_flops(model_config, shared_embedder=True) / 1e9,
        "forward_gflop_by_op": {k: v / 1e9 for k, v in flops.by_op.items()},
    }


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, n: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds for `n` calls of `fn`, from a synchronised start to the last kernel's end."""
    if clock == "process":
        begin = time.process_time()
        for _ in range(n):
            fn()
        return time.process_time() - begin
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - begin


def matmul_dtype_for(config: BenchmarkConfig, device: torch.device) -> torch.dtype:
    """The ceiling's dtype: the GPU's bf16 (fp16 for fp16 runs) tensor-core rate, fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if config.precision == "fp16" else torch.bfloat16


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10, clock: str = "wall"
) -> float:
    """TFLOP/s of a square `size` matmul, the ceiling the achieved rate is compared with (timed
    with the same clock as the steps)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    seconds = min(time_calls(lambda: torch.mm(a, b), repeats, device, clock) for _ in range(3)) / repeats
    return 2 * size**3 / seconds / 1e12


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    # Linux reports KiB: the whole process's high-water mark, a loose upper bound on the CPU.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "speedit": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------------------------
# the training step
# --------------------------------------------------------------------------------------------
def _attention_context(attention: str):

    backends = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return sdpa_kernel(backends[attention]) if attention in backends else contextlib.nullcontext()


class TrainingBenchmark:
    """Model, scheduler, loss, AdamW, EMA and synthetic latents as `train_dit.py` builds them, on
    one device; `set_batch` / `configure` switch batch size, attention, checkpointing and compile
    without rebuilding, so a sweep pays for model construction once."""

    def __init__(self, config: BenchmarkConfig, accelerator=None):
        self.device = resolve_device(config.device)
        self.model_config = validate_config(config, self.device)
        self.config = config
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
            torch.backends.cudnn.allow_tf32 = config.allow_tf32
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
        self.accelerator = accelerator or Accelerator(mixed_precision=mixed, cpu=self.device.type == "cpu")

        # Built on the device directly: the XL/2 initialisation on the host takes longer than the run.
        with torch.device(self.device):
            base = create_dit(normalize_preset(config.model), seed=config.seed, **config.dit_kwargs())
        disable_internal_label_dropout(base)
        self.base_model = base
        self.noise_scheduler = SpeeDiTScheduler.from_preset(config.speedit)
        fused = self.device.type == "cuda" if config.fused_adamw is None else config.fused_adamw
        self.fused_adamw = fused
        optimizer = torch.optim.AdamW(base.parameters(), lr=config.learning_rate, weight_decay=0.0, fused=fused)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        ema = create_ema(base, config.ema_decay) if config.ema == "foreach" else None
        model, optimizer, lr_scheduler = self.accelerator.prepare(base, optimizer, lr_scheduler)
        if ema is not None:
            ema.to(self.device)
        self.prepared_model = model
        self.engine = TrainingEngine(
            self.accelerator,
            model,
            optimizer,
            lr_scheduler,
            self.noise_scheduler,
            DiTLoss(self.noise_scheduler),
            ema,
            class_dropout_prob=config.class_dropout_prob,
            null_label=null_class_label(base),
            max_grad_norm=config.max_grad_norm,
            seed=config.seed,
        )
        self.bare_model = model
        self.micro_step = 0
        self.attention = "sdpa"
        self.set_batch(config.batch_size)
        base.train()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.base_model.parameters())

    def set_batch(self, batch_size: int) -> None:
        """Synthetic latents and labels (the data loader is not part of the step), plus the fixed
        inputs of the bare step."""
        g = torch.Generator(device="cpu").manual_seed(self.config.seed + batch_size)
        size = self.config.latent_size
        shape = (batch_size, LATENT_CHANNELS, size, size)
        self.batch_size = batch_size
        self.x_start = torch.randn(shape, generator=g).to(self.device)
        self.labels = torch.randint(0, self.config.num_classes, (batch_size,), generator=g).to(self.device)
        self.bare_timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g
        )
        self.bare_timesteps = self.bare_timesteps.to(self.device)
        self.bare_x_t = torch.randn(shape, generator=g).to(self.device)
        out_shape = (batch_size, self.model_config["out_channels"], size, size)
        self.bare_target = torch.randn(out_shape, generator=g).to(self.device)

    def configure(self, attention: str, gradient_checkpointing: bool, compile: bool) -> None:
        base = self.base_model
        if attention == "xformers":
            base.enable_xformers_memory_efficient_attention()
        elif self.attention == "xformers":
            base.set_default_attn_processor()
        self.attention = attention
        if gradient_checkpointing:
            base.enable_gradient_checkpointing()
        else:
            base.disable_gradient_checkpointing()
        self.engine.uncompile()
        self.bare_model = self.prepared_model
        if compile:
            torch._dynamo.reset()  # a fresh static-shape compile per configuration, as one training run gets
            # the trainer's compiled path (model and loss as one graph); the bare step compiles the model alone
            self.engine.compile(self.config.compile_mode, self.config.compile_backend)
            self.bare_model = compile_model(self.prepared_model, self.config.compile_mode, self.config.compile_backend)

    def trainer_step(self) -> None:
        with _attention_context(self.attention):
            self.engine.step(self.x_start, self.labels, self.micro_step)
        self.micro_step += 1

    def bare_step(self) -> None:
        """Forward, plain MSE, backward, the same AdamW: no scheduler, hybrid loss, EMA or bookkeeping."""
        optimizer = self.engine.optimizer
        if self.bare_model is not self.prepared_model:
            mark_compiled_step(self.config.compile_mode)
        with _attention_context(self.attention):
            with self.accelerator.autocast():
                out = self.bare_model(self.bare_x_t, timestep=self.bare_timesteps, class_labels=self.labels).sample
                loss = F.mse_loss(out.float(), self.bare_target)
            self.accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def measure(
    bench: TrainingBenchmark,
    batch_size: int,
    attention: str,
    gradient_checkpointing: bool,
    compile: bool,
    flops: FlopCount,
    matmul_tflops: float,
    overhead: bool = False,
) -> dict:
    """Warm up, then time `repeats` x `steps` trainer steps (interleaved with bare steps when
    `overhead`) and return one result row."""
    cfg = bench.config
    if batch_size != bench.batch_size:
        bench.set_batch(batch_size)
    bench.configure(attention, gradient_checkpointing, compile)
    bench.reset_peak_memory()
    started = time.perf_counter()
    for _ in range(cfg.warmup):
        bench.trainer_step()
        if overhead:
            bench.bare_step()
    synchronize(bench.device)
    warmup_s = time.perf_counter() - started

    trainer_s, bare_s = [], []
    for r in range(cfg.repeats):
        # ABBA order so that a slow drift of the machine does not favour either step.
        order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
        for kind in order if overhead else ("trainer",):
            fn = bench.trainer_step if kind == "trainer" else bench.bare_step
            seconds = time_calls(fn, cfg.steps, bench.device, cfg.clock) / cfg.steps
            (trainer_s if kind == "trainer" else bare_s).append(seconds)
    memory_gib, memory_kind = peak_memory(bench.device)
    if not torch.isfinite(bench.engine.loss_sums["log"]):
        raise FloatingPointError("the loss became NaN or inf during the benchmark: the timings are meaningless.")

    images_per_s = [batch_size / s for s in trainer_s]
    median_ips = statistics.median(images_per_s)
    achieved = flops.train * median_ips / 1e12
    row = {
        "model": normalize_preset(cfg.model),
        "resolution": cfg.resolution,
        "latent_size": cfg.latent_size,
        "batch_size": batch_size,
        "precision": cfg.precision,
        "attention": attention,
        "compile": compile,
        "compile_backend": cfg.compile_backend if compile else None,
        "compile_mode": cfg.compile_mode if compile else None,
        "gradient_checkpointing": gradient_checkpointing,
        "fused_adamw": bench.fused_adamw,
        "ema": cfg.ema,
        "speedit": cfg.speedit,
        "parameters": bench.num_parameters,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "clock": cfg.clock,
        "repeats": cfg.repeats,
        "status": "ok",
        "images_per_s": median_ips,
        "images_per_s_min": min(images_per_s),
        "images_per_s_max": max(images_per_s),
        "step_ms": 1000 * statistics.median(trainer_s),
        "warmup_s": warmup_s,
        "forward_gflop_per_image": flops.forward / 1e9,
        "train_gflop_per_image": flops.train / 1e9,
        "analytic_forward_gflop_per_image": dit_forward_flops(bench.model_config) / 1e9,
        "paper_forward_gflop_per_image": dit_forward_flops(bench.model_config, shared_embedder=True) / 1e9,
        "achieved_tflops": achieved,
        "matmul_tflops": matmul_tflops,
        "mfu": achieved / matmul_tflops,
        "peak_memory_gib": memory_gib,
        "peak_memory_kind": memory_kind,
    }
    if overhead:
        ratios = [t / b - 1.0 for t, b in zip(trainer_s, bare_s)]
        row.update(
            {
                "bare_step_ms": 1000 * statistics.median(bare_s),
                "trainer_step_ms": 1000 * statistics.median(trainer_s),
                "overhead": statistics.median(trainer_s) / statistics.median(bare_s) - 1.0,
                "overhead_per_repeat": _summary(ratios),
                "bare_step_ms_per_repeat": [1000 * s for s in bare_s],
                "trainer_step_ms_per_repeat": [1000 * s for s in trainer_s],
            }
        )
    return row


# Where a step's time goes: kernels (CUDA) or operators (CPU) by name, first match wins.
PROFILE_CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|softmax|dot_do_o"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|wgmma|cublas|conv|triton_tem|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer (AdamW)", r"adam"),
    ("EMA, grad norm (foreach)", r"foreach|multi_tensor|lerp"),
    ("compiled fusions", r"^triton_"),
    ("normalization", r"norm"),
    ("copies and casts", r"copy|memcpy|memset|cast|aten::to$|fill"),
    ("random numbers", r"rand|normal|multinomial|philox|distribution"),
)


def categorize_kernel(name: str) -> str:
    lowered = name.lower()
    for category, pattern in PROFILE_CATEGORIES:
        if re.search(pattern, lowered if not pattern.startswith("^") else name):
            return category
    return "other elementwise / reductions"


def kernel_times(events, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, self time in us, calls) of the device kernels (CUDA) or ATen operators (CPU) among
    `torch.profiler` averages. Host-side operators and user annotations such as
    `Optimizer.step#AdamW.step` are left out: on CUDA an annotation carries the device time of the
    kernels inside it, which would count them twice."""
    kept = []
    for event in events:
        if getattr(event, "is_user_annotation", False):
            continue
        if cuda:
            if str(getattr(event, "device_type", "")).endswith("CPU"):
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        if us > 0:
            kept.append((event.key, float(us), event.count))
    return kept


def profile_trainer_step(bench: TrainingBenchmark, steps: int = 3, top: int = 20) -> dict:
    """Profile `steps` trainer steps with `torch.profiler`: device time per step by kernel
    category and the top kernels (CUDA), or CPU operator self-time (CPU), against wall time.
    A device busy far less than the wall clock means the step is bound by launches on the host."""

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    bench.trainer_step()  # not profiled: allocator and autotuning settle
    synchronize(bench.device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            bench.trainer_step()
        synchronize(bench.device)
        wall_s = time.perf_counter() - started

    kernels = kernel_times(prof.key_averages(), cuda)
    busy_us = sum(us for _, us, _ in kernels)
    categories: dict[str, float] = {}
    for name, us, _ in kernels:
        category = categorize_kernel(name)
        categories[category] = categories.get(category, 0.0) + us
    per_step = lambda us: us / 1000.0 / steps  # noqa: E731
    return {
        "steps": steps,
        "timer": "device kernels" if cuda else "CPU operator self time",
        "wall_ms_per_step": 1000.0 * wall_s / steps,
        "busy_ms_per_step": per_step(busy_us),
        "categories": [
            {"category": c, "ms_per_step": per_step(us), "share": us / busy_us if busy_us else 0.0}
            for c, us in sorted(categories.items(), key=lambda item: -item[1])
        ],
        "top": [
            {
                "name": name[:120],
                "category": categorize_kernel(name),
                "ms_per_step": per_step(us),
                "calls_per_step": count / steps,
            }
            for name, us, count in sorted(kernels, key=lambda k: -k[1])[:top]
        ],
    }


def format_profile(profile: dict) -> str:
    lines = [
        f"profile over {profile['steps']} trainer steps ({profile['timer']}): "
        f"wall {profile['wall_ms_per_step']:.1f} ms/step "
        f"under the profiler, busy {profile['busy_ms_per_step']:.1f} ms/step",
        "| category | ms/step | share |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c['category']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f}% |" for c in profile["categories"]]
    lines += ["", "| top kernel / operator | category | ms/step | calls/step |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{k['name']}` | {k['category']} | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} |"
        for k in profile["top"]
    ]
    return "\n".join(lines)


def run_benchmark(
    config: BenchmarkConfig,
    batch_sizes: list[int] | None = None,
    attentions: list[str] | None = None,
    checkpointing: list[bool] | None = None,
    compile: bool | None = None,
    overhead: bool = False,
    matmul_size: int | None = None,
    on_start=None,
    on_row=None,
    profile_steps: int = 0,
) -> dict:
    """Build once and measure every (attention, checkpointing, batch) combination of one
    precision and compile mode. Returns `{"environment", "matmul", "flops", "rows"}`;
    `on_start(header)` gets the first three before the model is built and `on_row(row)` each row as
    it completes (a sweep's worker streams them, so a time cap keeps what finished).

    A configuration that runs out of GPU memory gives a row with status "oom", and larger
    batches of the same options are skipped. `profile_steps` > 0 adds `"profile"`: where the last
    configuration's step spends its time (`profile_trainer_step`).
    """
    batch_sizes = batch_sizes or [config.batch_size]
    attentions = attentions or [config.attention]
    checkpointing = checkpointing if checkpointing is not None else [config.gradient_checkpointing]
    compile = config.compile if compile is None else compile
    device = resolve_device(config.device)
    for attention in attentions:  # every combination is checked before the model is built
        validate_config(
            BenchmarkConfig(
                **{**asdict(config), "attention": attention, "compile": compile, "batch_size": min(batch_sizes)}
            ),
            device,
        )
    env = environment(device)
    dtype = matmul_dtype_for(config, device)
    size = matmul_size or (8192 if device.type == "cuda" else 1024)
    matmul = {
        "tflops": measure_matmul_tflops(device, dtype, size, clock=config.clock),
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
    }
    model_config = dit_config(normalize_preset(config.model), **config.dit_kwargs())
    flops = count_train_flops(model_config)
    header = {"environment": env, "matmul": matmul, "flops": flops_summary(model_config, flops)}
    if on_start is not None:
        on_start(header)
    bench = TrainingBenchmark(config)
    rows = []
    for attention in attentions:
        for ckpt in checkpointing:
            oom = False
            for batch_size in sorted(batch_sizes):
                base_row = {
                    "model": normalize_preset(config.model),
                    "batch_size": batch_size,
                    "precision": config.precision,
                    "attention": attention,
                    "compile": compile,
                    "gradient_checkpointing": ckpt,
                    "ema": config.ema,
                }
                if oom:
                    row = {**base_row, "status": "skipped (smaller batch ran out of memory)"}
                else:
                    try:
                        row = measure(bench, batch_size, attention, ckpt, compile, flops, matmul["tflops"], overhead)
                    except torch.cuda.OutOfMemoryError:
                        oom = True
                        bench.engine.optimizer.zero_grad(set_to_none=True)
                        bench.reset_peak_memory()
                        row = {**base_row, "status": "oom"}
                row.update(device=env["device"], device_name=env["device_name"], matmul_tflops=matmul["tflops"])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    result = {**header, "rows": rows}
    if profile_steps > 0 and rows and rows[-1]["status"] == "ok":
        try:
            result["profile"] = profile_trainer_step(bench, profile_steps)
        except Exception as e:  # the profiler is a diagnostic: its failure must not lose the measured rows
            result["profile_error"] = f"{type(e).__name__}: {e}"
            print(f"warning: profiling failed ({result['profile_error']})", flush=True)
    return result
