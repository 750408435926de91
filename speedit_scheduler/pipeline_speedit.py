# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""A class-conditional DiT pipeline that keeps the learned variance and works in pixel space.

Stock `DiTPipeline` needs a VAE, hard-codes the null class as 1000, throws the learned variance
away and guides every latent channel. `SpeeDiTPipeline` samples ancestrally with the model's
variance (`variance_type="learned_range"` on a DDPM scheduler) on DiT's respaced timesteps, uses
the model's own null class for guidance, can guide only the first `guidance_channels` epsilon
channels (DiT's evaluation guides 3 of the 4 latent channels), and decodes through a VAE only
when it has one (pixel-space models have none). Any other diffusers scheduler works too; the
variance channels are then dropped, as stock `DiTPipeline` does.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    ImagePipelineOutput,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_speedit import float64_schedule

# Beside a transformer's config.json: the timestep sinusoid of a converted original DiT (the
# same name as models.TIMESTEP_SINUSOID_FILE; this module is also shipped alone in exports).
TIMESTEP_SINUSOID_FILE = "timestep_sinusoid.json"

# sampler name -> (scheduler class, config overrides). Every sampler is built from a noise
# scheduler's config (the training scheduler's, or a loaded pipeline's), so it keeps the model's
# training noise schedule.
SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm-solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}


def sampling_scheduler(
    noise_scheduler_config: dict | FrozenDict,
    sampler: str = "ddpm",
    *,
    learned_variance: bool,
    clip_sample: bool | None = None,
    **overrides,
):
    """The one factory of samplers: scheduler `sampler` (a key of `SAMPLERS`) with the noise
    schedule of `noise_scheduler_config`.

    DDPM samples with the model's learned variance (`learned_range`) when the model predicts one,
    else with the fixed posterior variance, on diffusers' "linspace" spacing (the pipeline then
    passes DiT's exact respacing). Every other scheduler ignores the variance channels (the
    pipeline drops them). Config keys the sampler does not take (SpeeD's) are left out.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}.")
    cls, defaults = SAMPLERS[sampler]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(defaults)
    if cls is DDPMScheduler:
        kwargs["variance_type"] = "learned_range" if learned_variance else "fixed_small"
        kwargs["timestep_spacing"] = "linspace"
    elif "variance_type" in accepted:
        kwargs["variance_type"] = None  # DPM-Solver would keep eps[:, :3]; the pipeline drops the variance
    if clip_sample is not None and "clip_sample" in accepted:
        kwargs["clip_sample"] = clip_sample
    kwargs.update(overrides)
    config = {k: v for k, v in dict(noise_scheduler_config).items() if k in accepted}
    return cls.from_config(config, **kwargs)


def training_sampler(noise_scheduler, sampler: str = "ddpm", *, learned_variance: bool, clip_sample: bool):
    """The sampler that training evaluates and exports with: `sampling_scheduler` of the training
    noise scheduler on evenly spaced ("linspace") timesteps; DDIM without `set_alpha_to_one`, as
    DiT's Hub schedulers."""
    extra = {"set_alpha_to_one": False} if sampler == "ddim" else {}
    return sampling_scheduler(
        noise_scheduler.config,
        sampler,
        learned_variance=learned_variance,
        clip_sample=clip_sample,
        timestep_spacing="linspace",
        **extra,
    )


def dit_respaced_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """DiT's (ADM's `space_timesteps(T, "n")`) evenly strided timesteps, in sampling (descending) order.

    ADM walks a float cursor from 0 with stride (T - 1) / (n - 1) and rounds it with Python's
    `round`; diffusers' `timestep_spacing="linspace"` rounds `np.linspace(0, T - 1, n)` instead.
    The two agree for 250 (and 10, 20, 25, 50, 100, 500, 1000) steps but not for every n (e.g.
    n = 21: at 499.5 the accumulated cursor lands just under the half), so the pipeline passes these
    as custom timesteps.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must lie in [1, {num_train_timesteps}] (the training steps)."
        )
    stride = 1.0 if num_inference_steps == 1 else (num_train_timesteps - 1) / (num_inference_steps - 1)
    cursor, steps = 0.0, []
    for _ in range(num_inference_steps):
        steps.append(round(cursor))
        cursor += stride  # accumulated, as ADM does; the rounding of ties depends on it
    return sorted(set(steps), reverse=True)


def use_float64_tables(scheduler: DDPMScheduler) -> DDPMScheduler:
    """Give a DDPM scheduler the float64 `betas`, `alphas` and `alphas_cumprod` of `float64_schedule`.

    diffusers builds these tables in float32, which loses relative precision in 1 - alphas_cumprod
    near t = 0; DiT computes every coefficient in float64 and casts it to float32 when it multiplies
    the sample. With float64 tables `DDPMScheduler.step` does the same (a 0-d float64 tensor times a
    float32 sample stays float32), and the sampler uses the very numbers the training scheduler and
    `DiTLoss` use, for any beta schedule of the config. Idempotent; only for CPU-held tables (the
    scheduler indexes them on the CPU).
    """
    if scheduler.alphas_cumprod.dtype == torch.float64:
        return scheduler
    schedule = float64_schedule(scheduler.config)
    scheduler.betas = schedule.betas
    scheduler.alphas = schedule.alphas
    scheduler.alphas_cumprod = schedule.alphas_cumprod
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


class SpeeDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label)
        self.labels = {}
        for key, names in id2label.items():
            for name in names.split(","):
                self.labels[name.strip()] = key

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """A config file as diffusers reads it, with a custom pipeline's `[module, class]` name read as
        a plain class name.

        An export ships this module beside its components (`"_class_name": ["pipeline_speedit",
        "SpeeDiTPipeline"]`) so that stock diffusers can load it. diffusers would then import the
        folder's copy, and refuse without `trust_remote_code`, even when this class itself loads
        the folder: read as a plain name, `SpeeDiTPipeline.from_pretrained` uses this class, as it
        does for any other recorded name.
        """
        config = super()._dict_from_json_file(json_file)
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SpeeDiTPipeline":
        """diffusers' `from_pretrained`, honouring the timestep sinusoid a converted original DiT
        records in `transformer/timestep_sinusoid.json` (diffusers' model cannot be configured for
        it): the converted model then gives the original's outputs."""
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = getattr(pipeline.transformer.config, "_name_or_path", None) or ""
        recorded = os.path.join(folder, TIMESTEP_SINUSOID_FILE)
        if os.path.isfile(recorded):
            with open(recorded) as f:
                shift = json.load(f)["downscale_freq_shift"]
            for block in pipeline.transformer.transformer_blocks:
                block.norm1.emb.time_proj.downscale_freq_shift = shift
        return pipeline

    @classmethod
    def from_dit_pipeline(cls, pipeline: DiffusionPipeline, clip_sample: bool = False) -> "SpeeDiTPipeline":
        """DiT's evaluation sampler from a loaded stock `DiTPipeline`'s components.

        Same transformer, VAE and class names; the scheduler becomes an ancestral DDPM scheduler
        with the same training schedule and the learned variance (`learned_range`). DiT samples
        latents with `clip_denoised=False`, hence `clip_sample=False`.
        """
        id2label = pipeline.config.get("id2label")
        if not id2label:  # stock DiTPipeline keeps only the name -> id map; group it back per id
            id2label = {}
            for name, key in getattr(pipeline, "labels", {}).items():
                id2label[int(key)] = f"{id2label[int(key)]}, {name}" if int(key) in id2label else name
        learned = pipeline.transformer.config.out_channels == 2 * pipeline.transformer.config.in_channels
        scheduler = DDPMScheduler.from_config(
            pipeline.scheduler.config,
            variance_type="learned_range" if learned else "fixed_small",
            clip_sample=clip_sample,
            timestep_spacing="linspace",
        )
        return cls(transformer=pipeline.transformer, scheduler=scheduler, vae=pipeline.vae, id2label=id2label)

    def get_label_ids(self, labels: str | list[str]) -> list[int]:
        """Class ids of class names (as in `DiTPipeline.get_label_ids`)."""
        labels = [labels] if isinstance(labels, str) else labels
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}: known names are {sorted(self.labels)[:20]} ...")
        return [self.labels[label] for label in labels]

    def _step_kwargs(self, generator) -> dict:
        # Not every scheduler's `step` takes a generator (Heun, DPM-Solver single-step, ...).
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 250,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_channels: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample images of `class_labels`.

        guidance_channels: None guides every epsilon channel; k guides only the first k (DiT's
            evaluation uses 3 on its 4 latent channels: the 4th epsilon channel then comes from
            the conditional output, as does the variance in every case).
        generator: one generator, or one per sample (then every sample's initial and per-step
            noise depends on its own generator only, whatever the batch it is in).
        output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (the raw final sample,
            not decoded, not clamped).
        """
        config = self.transformer.config
        num_classes = config.num_embeds_ada_norm
        channels = config.in_channels
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class labels {labels.tolist()} must lie in [0, {num_classes}).")
        if guidance_channels is not None and not 1 <= guidance_channels <= channels:
            raise ValueError(f"guidance_channels={guidance_channels} must lie in [1, {channels}] or be None (all).")
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"got {len(generator)} generators for {len(labels)} class labels: pass one per sample.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r} is not one of 'pil', 'np', 'pt', 'latent'.")
        batch_size = len(labels)
        shape = (batch_size, channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(
                shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not match the expected {shape}.")
        sample = latents.to(self._execution_device, self.transformer.dtype)
        use_guidance = guidance_scale > 1.0
        if use_guidance:
            labels = torch.cat([labels, torch.full_like(labels, num_classes)])  # null class last

        if isinstance(self.scheduler, DDPMScheduler):
            # DiT's respacing, exactly, and DiT's float64 coefficient tables.
            use_float64_tables(self.scheduler)
            self.scheduler.set_timesteps(
                timesteps=dit_respaced_timesteps(self.scheduler.config.num_train_timesteps, num_inference_steps),
                device=self._execution_device,
            )
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        sample = sample * self.scheduler.init_noise_sigma  # 1 for DDPM/DDIM; Euler-type schedulers need it
        # Only DDPM uses the variance channels. (`from_config` of a DDPM config leaves its
        # variance_type in e.g. DDIM's config, and DPM-Solver's "learned" keeps eps[:, :3] only,
        # wrong for 4 latent channels: every other scheduler gets the eps channels alone.)
        learned_variance = isinstance(self.scheduler, DDPMScheduler) and (
            self.scheduler.config.variance_type in ("learned", "learned_range")
        )
        step_kwargs = self._step_kwargs(generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_input = torch.cat([model_input, model_input]) if use_guidance else model_input
            timesteps = t.expand(model_input.shape[0]).to(self._execution_device)
            output = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            if use_guidance:
                cond, uncond = output.chunk(2)
                k = channels if guidance_channels is None else guidance_channels
                guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
                output = torch.cat([guided, cond[:, k:]], dim=1)
            if output.shape[1] == 2 * channels and not learned_variance:
                output = output[:, :channels]
            sample = self.scheduler.step(output, t, sample, **step_kwargs).prev_sample

        if output_type == "latent":
            images = sample
        else:
            if self.vae is not None:
                sample = self.vae.decode(sample / self.vae.config.scaling_factor).sample
            images = (sample.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
