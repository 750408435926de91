# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""DiT model presets as diffusers `DiTTransformer2DModel` configs, DiT's initialisation, and
the once-per-sample class-label dropout that classifier-free guidance needs."""

from __future__ import annotations

import json
import os
import re

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from .options import DIT_PATCH_SIZES, DIT_PRESETS, DIT_SIZES  # noqa: F401 (DIT_PRESETS is re-exported)
from .pipeline_speedit import TIMESTEP_SINUSOID_FILE  # noqa: F401 (re-exported)
from .utils import atomic_write_json

# name -> (depth, hidden size, heads), from the DiT paper (Peebles & Xie 2023, Table 1).
# Parameter counts the DiT paper reports (Table 1 and Table 4) for the shared-embedder original.
DIT_PAPER_PARAMS_M = {"XL": 675, "L": 458, "B": 130, "S": 33}


def dit_config(
    preset: str,
    sample_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
) -> dict:
    """The `DiTTransformer2DModel` config of a DiT preset such as `"XL/2"`.

    `sample_size` is the latent (or pixel) side, 32 for 256x256 images through the SD VAE.
    `learn_sigma` doubles the output channels for the variance (DiT's default). The class
    embedding table gets `num_classes + 1` rows; the last row is the null class for guidance.
    The optional overrides make smaller or custom variants for demos and tests.
    """
    match = re.fullmatch(r"(XL|L|B|S)/(\d+)", preset)
    if match is None or int(match.group(2)) not in DIT_PATCH_SIZES:
        raise ValueError(f"model preset {preset!r} is unknown: choose one of {', '.join(DIT_PRESETS)}.")
    depth, hidden, heads = DIT_SIZES[match.group(1)]
    patch = int(match.group(2))
    depth = depth if num_layers is None else num_layers
    hidden = hidden if hidden_size is None else hidden_size
    heads = heads if num_attention_heads is None else num_attention_heads
    for name, value in (("num_layers", depth), ("hidden_size", hidden), ("num_attention_heads", heads)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    if hidden % heads:
        raise ValueError(
            f"hidden_size={hidden} is not divisible by num_attention_heads={heads}: pick sizes that divide."
        )
    if sample_size % patch:
        raise ValueError(
            f"sample_size={sample_size} is not divisible by the patch size {patch} of {preset}: "
            "pick a preset with a smaller patch or pad the input."
        )
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1.")
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "num_layers": depth,
        "sample_size": sample_size,
        "patch_size": patch,
        "num_embeds_ada_norm": num_classes,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        # DiT's LayerNorms use eps 1e-6; diffusers defaults to 1e-5 for the second norm of each block.
        "norm_eps": 1e-6,
    }


def initialize_dit_weights(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """DiT's adaLN-Zero initialisation (diffusers uses PyTorch's defaults).

    Xavier-uniform linears with zero bias, the patch projection initialised like a linear layer,
    normal(0.02) label and timestep embeddings, and zeroed modulation and output layers so that
    every block starts as the identity and the model starts by predicting zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        embedder = block.norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def create_dit(preset: str, seed: int | None = None, **config_kwargs) -> DiTTransformer2DModel:
    """A freshly initialised DiT of a preset (see `dit_config`) with DiT's initialisation."""
    config = dit_config(preset, **config_kwargs)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return initialize_dit_weights(DiTTransformer2DModel(**config))
    return initialize_dit_weights(DiTTransformer2DModel(**config))


def disable_internal_label_dropout(model: nn.Module) -> nn.Module:
    """Stop diffusers' per-call label dropout; `drop_labels` drops once per sample instead.

    In train mode each block's embedder (and the output layer's call to block 0's) drops labels on
    its own, so a sample is never a clean unconditional example. The dropout probability is not
    part of the saved config and only acts in train mode, so a model loaded later behaves
    exactly as the one trained here.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def null_class_label(model: DiTTransformer2DModel) -> int:
    """Index of the unconditional ("null") class: the last row of the label table."""
    return model.config.num_embeds_ada_norm


def drop_labels(
    class_labels: torch.Tensor, drop_prob: float, null_label: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null_label` with probability `drop_prob`, once per sample."""
    if drop_prob <= 0:
        return class_labels
    rand_device = generator.device if generator is not None else class_labels.device
    dropped = torch.rand(class_labels.shape[0], generator=generator, device=rand_device) < drop_prob
    return torch.where(dropped.to(class_labels.device), torch.full_like(class_labels, null_label), class_labels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the timestep sinusoid: diffusers' or the original DiT's
# --------------------------------------------------------------------------------------------
# diffusers' DiT embeds timesteps with frequencies 10000^(-i/127) (downscale_freq_shift=1) where
# the original DiT uses 10000^(-i/128) (shift 0); the config cannot say so. A model converted from
# an original checkpoint keeps the original sinusoid, recorded in this file beside its config.json,
# which stock diffusers ignores (and so samples with its own sinusoid) and this project honours.
DIFFUSERS_FREQ_SHIFT = 1
ORIGINAL_FREQ_SHIFT = 0


def timestep_freq_shift(model: DiTTransformer2DModel) -> float:
    """The `downscale_freq_shift` of the model's timestep sinusoid (1: diffusers', 0: original DiT's)."""
    return model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift


def set_timestep_freq_shift(model: DiTTransformer2DModel, shift: float) -> DiTTransformer2DModel:
    """Give every block's timestep embedder the sinusoid of `shift` (the weights are unchanged)."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
    return model


def save_timestep_sinusoid(model: DiTTransformer2DModel, folder: str) -> None:
    """Record a non-diffusers sinusoid beside the model's config.json (and nothing otherwise)."""
    path = os.path.join(folder, TIMESTEP_SINUSOID_FILE)
    shift = timestep_freq_shift(model)
    if shift == DIFFUSERS_FREQ_SHIFT:
        if os.path.exists(path):
            os.remove(path)
        return
    atomic_write_json(path, {"downscale_freq_shift": shift, "frequencies": f"10000^(-i/(128 - {shift}))"})


def load_timestep_sinusoid(model: DiTTransformer2DModel, folder: str) -> DiTTransformer2DModel:
    """Apply the sinusoid a folder records (a converted original checkpoint's), if any."""
    path = os.path.join(folder, TIMESTEP_SINUSOID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            set_timestep_freq_shift(model, json.load(f)["downscale_freq_shift"])
    return model


def load_dit(folder: str, **kwargs) -> DiTTransformer2DModel:
    """`DiTTransformer2DModel.from_pretrained(folder)` with the timestep sinusoid the folder records."""
    return load_timestep_sinusoid(DiTTransformer2DModel.from_pretrained(folder, **kwargs), folder)
