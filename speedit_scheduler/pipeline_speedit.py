# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""A class-conditional DiT pipeline that keeps the learned variance and works in pixel space.

Stock `DiTPipeline` needs a VAE, hard-codes the null class as 1000 and throws the learned
variance away. `SpeeDiTPipeline` samples ancestrally with the model's variance
(`variance_type="learned_range"` on a DDPM scheduler), uses the model's own null class for
guidance, and decodes through a VAE only when it has one (pixel-space models have none).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


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

    def get_label_ids(self, labels: str | list[str]) -> list[int]:
        """Class ids of class names (as in `DiTPipeline.get_label_ids`)."""
        labels = [labels] if isinstance(labels, str) else labels
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}: known names are {sorted(self.labels)[:20]} ...")
        return [self.labels[label] for label in labels]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 250,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        config = self.transformer.config
        num_classes = config.num_embeds_ada_norm
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class labels {labels.tolist()} must lie in [0, {num_classes}).")
        batch_size = len(labels)
        channels = config.in_channels
        sample = randn_tensor(
            (batch_size, channels, config.sample_size, config.sample_size),
            generator=generator,
            device=self._execution_device,
            dtype=self.transformer.dtype,
        )
        use_guidance = guidance_scale > 1.0
        if use_guidance:
            labels = torch.cat([labels, torch.full_like(labels, num_classes)])  # null class last

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if use_guidance else sample
            timesteps = t.expand(model_input.shape[0]).to(self._execution_device)
            output = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            if use_guidance:
                cond, uncond = output.chunk(2)
                eps = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
                output = torch.cat([eps, cond[:, channels:]], dim=1)
            if output.shape[1] == 2 * channels and self.scheduler.config.variance_type not in ("learned", "learned_range"):
                output = output[:, :channels]
            sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample

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
