# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Convert original DiT / SpeeDiT `.pt` checkpoints into diffusers pipeline folders.

The original layout (the DiT paper's reference code and SpeeDiT, which trains the same model) has
`x_embedder`, a shared `t_embedder` / `y_embedder`, `blocks.N.{attn,mlp,adaLN_modulation}`,
`final_layer` and a fixed sin-cos `pos_embed` buffer. diffusers' `DiTTransformer2DModel` keeps the
same weights under other names, splits the fused qkv projection, and holds one timestep+label
embedder per block, so the shared one is copied into every block.

Two numerical differences remain after an exact weight mapping (see docs/conversion.md for the
measured effect): diffusers' timestep sinusoid uses frequencies 10000^(-i/127) where the original
uses 10000^(-i/128) (not configurable, and not absorbable into the weights), and diffusers'
default LayerNorm epsilon is 1e-5 where DiT uses 1e-6 (fixed here: the config sets norm_eps=1e-6).

This module also holds a from-scratch reference of the original forward pass, driven by an
original state dict, to measure both differences (`original_dit_forward`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ..data.class_names import imagenet_class_names
from ..models import (
    DIFFUSERS_FREQ_SHIFT,
    DIT_PATCH_SIZES,
    DIT_SIZES,
    ORIGINAL_FREQ_SHIFT,
    dit_config,
    save_timestep_sinusoid,
    set_timestep_freq_shift,
)
from ..options import dit_preset_of
from ..pipeline_speedit import training_sampler
from ..scheduling_speedit import PRESETS, SpeeDiTScheduler
from ..training.export import build_pipeline, inference_scheduler, save_pipeline

logger = logging.getLogger(__name__)

# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Width of the timestep sinusoid; diffusers' `CombinedTimestepLabelEmbeddings` hard-codes 256.
TIMESTEP_FREQUENCY_DIM = 256
# A stored pos_embed further than this from the sin-cos table is not DiT's fixed buffer.
POS_EMBED_TOLERANCE = 1e-4

_TOP_LEVEL_KEYS = (
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
)
_BLOCK_KEYS = (
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias",
)


@dataclass
class ConversionInfo:
    """What the converter read from a checkpoint and decided."""

    config: dict
    preset: str | None
    source: str  # "ema", "model" or "state_dict"
    num_classes: int
    pos_embed_max_abs_diff: float
    stripped_prefixes: list[str] = field(default_factory=list)
    added_null_class: bool = False
    checkpoint_args: dict = field(default_factory=dict)

    @property
    def learn_sigma(self) -> bool:
        return self.config["out_channels"] == 2 * self.config["in_channels"]


# ------------------------------------------------------------------------------------------------
# reading checkpoints
# ------------------------------------------------------------------------------------------------
def load_checkpoint_file(path: str) -> Any:
    """`torch.load` with `weights_only=True` (no arbitrary code), allowing DiT's argparse args."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist: give the path of a DiT .pt file.")
    try:
        # DiT's train.py stores its argparse.Namespace beside the weights; a Namespace only holds
        # attributes, so allowing it keeps the load free of arbitrary code.
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.4
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # "Unsupported global" means the pickle names a function or class: code it would run.
        what = "names code to run" if "global" in str(error).lower() else "is not a PyTorch checkpoint"
        raise ValueError(
            f"--checkpoint {path!r} {what} (read with weights_only=True: refused, nothing in it ran): "
            "give an original DiT / SpeeDiT .pt file from a source you trust."
        ) from None
    except Exception as error:  # torch raises many types (RuntimeError, EOFError...)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--checkpoint {path!r} is not a PyTorch checkpoint that loads with weights_only=True "
            f"({type(error).__name__}: {first_line[:120]}): give a DiT / SpeeDiT .pt file."
        ) from None


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove leading `module.` (DDP) / `_orig_mod.` (torch.compile) from every key."""
    stripped: dict[str, torch.Tensor] = {}
    seen: list[str] = []
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
                    if prefix not in seen:
                        seen.append(prefix)
        if key in stripped:
            raise ValueError(
                f"key {key!r} appears twice once wrapper prefixes are removed: the checkpoint is ambiguous."
            )
        stripped[key] = value
    return stripped, seen


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(checkpoint: Any, use_raw: bool = False) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Pick the weights out of a loaded checkpoint.

    Accepts a plain state dict or DiT train.py's `{"model", "ema", "opt", "args"}` (also a
    `"state_dict"` wrapper). Returns (state dict, source, args as a dict). The EMA weights are
    the default because they are what DiT samples and evaluates with.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"the checkpoint holds a {type(checkpoint).__name__}, not a dict of weights: give a DiT state dict "
            "or a train.py checkpoint with 'model' / 'ema'."
        )
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (dict(args) if isinstance(args, Mapping) else {})
    has_ema, has_model = _is_state_dict(checkpoint.get("ema")), _is_state_dict(checkpoint.get("model"))
    if has_ema or has_model:
        if use_raw:
            if not has_model:
                raise ValueError(
                    "--use_raw asks for the raw weights but the checkpoint has no 'model' entry: drop --use_raw."
                )
            return dict(checkpoint["model"]), "model", args
        if not has_ema:
            logger.warning("The checkpoint has no 'ema' weights; converting the raw 'model' weights.")
            return dict(checkpoint["model"]), "model", args
        return dict(checkpoint["ema"]), "ema", args
    if _is_state_dict(checkpoint.get("state_dict")):
        checkpoint = checkpoint["state_dict"]
    if not _is_state_dict(checkpoint):
        keys = ", ".join(map(str, list(checkpoint)[:6])) or "nothing"
        raise ValueError(
            f"the checkpoint is neither a state dict nor a train.py checkpoint (top-level keys: {keys}): "
            "give a DiT .pt file."
        )
    if use_raw:
        raise ValueError(
            "--use_raw only applies to train.py checkpoints with both 'model' and 'ema'; this file holds a "
            "single state dict: drop --use_raw."
        )
    return dict(checkpoint), "state_dict", args


# ------------------------------------------------------------------------------------------------
# shapes -> config
# ------------------------------------------------------------------------------------------------
def _check_keys(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Validate the key set against the original layout; returns the depth."""
    if "x_embedder.proj.weight" not in state_dict:
        sample = ", ".join(list(state_dict)[:4])
        raise ValueError(
            f"not an original DiT state dict: 'x_embedder.proj.weight' is missing (keys start with {sample}); "
            "diffusers folders need no conversion."
        )
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    expected = set(_TOP_LEVEL_KEYS) | {f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS}
    missing = sorted(expected - set(state_dict), key=_natural_key)
    if depth == 0 or missing:
        names = ", ".join(missing[:5]) if missing else "blocks.0.*"
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"the DiT state dict is missing {names}{more}: the checkpoint is incomplete or not a DiT.")
    unexpected = sorted(set(state_dict) - expected, key=_natural_key)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(
            f"the DiT state dict has unexpected keys {', '.join(unexpected[:5])}{more}: "
            "this is not the original DiT layout (or a modified model) and cannot be converted."
        )
    return depth


def _natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def infer_dit_config(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_classes: int | None = None,
    norm_eps: float = 1e-6,
) -> tuple[dict, str | None, bool]:
    """The `DiTTransformer2DModel` config of an original DiT state dict, from its shapes alone.

    Returns (config, preset name or None, whether a null-class row must be added). Heads come from
    the DiT presets by (depth, hidden size) unless `num_attention_heads` is given. The label table
    has `num_classes + 1` rows when DiT trained with label dropout (always, in DiT and SpeeDiT);
    pass `num_classes` equal to the row count for a model trained without it.
    """
    depth = _check_keys(state_dict)
    proj = state_dict["x_embedder.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(
            f"x_embedder.proj.weight has shape {tuple(proj.shape)}; a square patch conv (D, C, p, p) is expected."
        )
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if patch not in DIT_PATCH_SIZES:
        raise ValueError(
            f"patch size {patch} (x_embedder.proj.weight) matches no DiT preset: DiT uses {DIT_PATCH_SIZES}."
        )

    pos_embed = state_dict["pos_embed"]
    num_patches = pos_embed.shape[-2] if pos_embed.ndim >= 2 else 0
    grid = math.isqrt(num_patches)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != hidden or grid * grid != num_patches:
        raise ValueError(
            f"pos_embed has shape {tuple(pos_embed.shape)}; (1, grid*grid, {hidden}) is expected "
            f"for hidden size {hidden}."
        )

    preset = dit_preset_of(depth, hidden, patch)
    if num_attention_heads is None:
        if preset is None:
            known = ", ".join(f"{name}: depth {d}, hidden {h}" for name, (d, h, _) in DIT_SIZES.items())
            raise ValueError(
                f"depth {depth} and hidden size {hidden} match no DiT preset ({known}): "
                "pass --num_attention_heads for a custom model."
            )
        num_attention_heads = DIT_SIZES[preset.split("/")[0]][2]

    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    added_null = False
    if num_classes is None:
        num_classes = rows - 1
    elif rows == num_classes:
        added_null = True  # trained without label dropout: give diffusers a (zero) null-class row
    elif rows != num_classes + 1:
        raise ValueError(
            f"num_classes={num_classes} does not fit the label table of {rows} rows: it must have "
            f"num_classes + 1 (with the null class) or num_classes rows."
        )
    if num_classes < 1:
        raise ValueError(f"the label table has {rows} row(s), too few for a class-conditional DiT.")

    out_features = state_dict["final_layer.linear.weight"].shape[0]
    out_channels, remainder = divmod(out_features, patch * patch)
    if remainder or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear.weight has {out_features} outputs; patch {patch} with {in_channels} input channels "
            f"needs {patch * patch * in_channels} (fixed sigma) or {2 * patch * patch * in_channels} (learned sigma)."
        )
    frequency_dim = state_dict["t_embedder.mlp.0.weight"].shape[-1]
    if frequency_dim != TIMESTEP_FREQUENCY_DIM:
        raise ValueError(
            f"t_embedder.mlp.0.weight takes a {frequency_dim}-wide sinusoid; diffusers' DiT only supports "
            f"{TIMESTEP_FREQUENCY_DIM}."
        )

    config = dit_config(
        preset or f"S/{patch}",
        sample_size=grid * patch,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
        num_layers=depth,
        hidden_size=hidden,
        num_attention_heads=num_attention_heads,
    )
    config["norm_eps"] = norm_eps
    return config, preset, added_null


# ------------------------------------------------------------------------------------------------
# weight mapping
# ------------------------------------------------------------------------------------------------
def map_dit_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int, add_null_class: bool = False) -> dict:
    """Rename original DiT weights to `DiTTransformer2DModel` names (values copied, never shared).

    Every tensor is cloned: the per-block embedder copies and the q/k/v slices must not share
    storage, or safetensors refuses to save them.
    """
    sd = {k: v.detach().to(torch.float32) for k, v in state_dict.items()}
    table = sd["y_embedder.embedding_table.weight"]
    if add_null_class:
        table = torch.cat([table, torch.zeros_like(table[:1])])
    embedder = {
        "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
        "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
        "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
        "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
        "class_embedder.embedding_table.weight": table,
    }
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"].clone(),
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"].clone(),
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"].clone(),
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"].clone(),
        "proj_out_2.weight": sd["final_layer.linear.weight"].clone(),
        "proj_out_2.bias": sd["final_layer.linear.bias"].clone(),
    }
    for i in range(depth):
        old, new = f"blocks.{i}.", f"transformer_blocks.{i}."
        # The original shares one conditioning embedder; diffusers gives each block its own copy.
        for name, value in embedder.items():
            out[f"{new}norm1.emb.{name}"] = value.clone()
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{old}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{new}attn1.to_q.{kind}"] = q.clone()
            out[f"{new}attn1.to_k.{kind}"] = k.clone()
            out[f"{new}attn1.to_v.{kind}"] = v.clone()
            out[f"{new}attn1.to_out.0.{kind}"] = sd[f"{old}attn.proj.{kind}"].clone()
            out[f"{new}ff.net.0.proj.{kind}"] = sd[f"{old}mlp.fc1.{kind}"].clone()
            out[f"{new}ff.net.2.{kind}"] = sd[f"{old}mlp.fc2.{kind}"].clone()
            out[f"{new}norm1.linear.{kind}"] = sd[f"{old}adaLN_modulation.1.{kind}"].clone()
    return out


_ORIGINAL_NAME = [
    (
        r"transformer_blocks\.\d+\.norm1\.emb\.timestep_embedder\.linear_(\d)",
        lambda m: f"t_embedder.mlp.{2 * int(m.group(1)) - 2}",
    ),
    (r"transformer_blocks\.\d+\.norm1\.emb\.class_embedder\.embedding_table", lambda m: "y_embedder.embedding_table"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_[qkv]", lambda m: f"blocks.{m.group(1)}.attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0", lambda m: f"blocks.{m.group(1)}.attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", lambda m: f"blocks.{m.group(1)}.mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", lambda m: f"blocks.{m.group(1)}.mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", lambda m: f"blocks.{m.group(1)}.adaLN_modulation.1"),
    (r"proj_out_1", lambda m: "final_layer.adaLN_modulation.1"),
    (r"proj_out_2", lambda m: "final_layer.linear"),
    (r"pos_embed\.proj", lambda m: "x_embedder.proj"),
]


def _original_name(diffusers_key: str) -> str:
    """The original key a diffusers key comes from, for error messages."""
    stem, kind = diffusers_key.rsplit(".", 1)
    for pattern, name in _ORIGINAL_NAME:
        match = re.fullmatch(pattern, stem)
        if match:
            return f"{name(match)}.{kind}"
    return diffusers_key


def dit_pos_embed_difference(model: DiTTransformer2DModel, pos_embed: torch.Tensor) -> float:
    """Max |stored pos_embed - diffusers' sin-cos table| (diffusers recomputes it, never loads it)."""
    table = model.pos_embed.pos_embed
    return float((pos_embed.to(torch.float64) - table.to(torch.float64).reshape(pos_embed.shape)).abs().max())


def convert_dit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_classes: int | None = None,
    norm_eps: float = 1e-6,
) -> tuple[DiTTransformer2DModel, ConversionInfo]:
    """A `DiTTransformer2DModel` (float32, eval mode) holding an original DiT state dict's weights.

    Keys may carry `module.` / `_orig_mod.` prefixes. Raises a one-line `ValueError` on missing or
    unexpected keys, shapes that match no DiT, or a pos_embed that is not the fixed sin-cos table.
    """
    state_dict, prefixes = strip_wrapper_prefixes(state_dict)
    config, preset, add_null = infer_dit_config(state_dict, num_attention_heads, num_classes, norm_eps)
    mapped = map_dit_state_dict(state_dict, config["num_layers"], add_null_class=add_null)

    # Parameters on the meta device (no random init of up to 750M weights), buffers real: the
    # pos_embed table is computed by diffusers at construction and compared below.
    with init_empty_weights(include_buffers=False):
        model = DiTTransformer2DModel(**config)
    target = model.state_dict()
    for key, value in mapped.items():
        if target[key].shape != value.shape:
            raise ValueError(
                f"{_original_name(key)} has shape {tuple(value.shape)} but the inferred config needs "
                f"{tuple(target[key].shape)} for {key}: the checkpoint is not a standard DiT (MLP ratio 4, adaLN-Zero)."
            )
    model.load_state_dict(mapped, strict=True, assign=True)

    pos_diff = dit_pos_embed_difference(model, state_dict["pos_embed"])
    if pos_diff > POS_EMBED_TOLERANCE:
        raise ValueError(
            f"pos_embed differs from the fixed 2D sin-cos table by up to {pos_diff:.3g}: a learned or resized "
            "position embedding cannot be loaded into diffusers' DiT, which always recomputes the table."
        )
    info = ConversionInfo(
        config=config,
        preset=preset,
        source="state_dict",
        num_classes=config["num_embeds_ada_norm"],
        pos_embed_max_abs_diff=pos_diff,
        stripped_prefixes=prefixes,
        added_null_class=add_null,
    )
    return model.eval(), info


def load_dit_checkpoint(
    path: str,
    use_raw: bool = False,
    num_attention_heads: int | None = None,
    num_classes: int | None = None,
) -> tuple[DiTTransformer2DModel, ConversionInfo, dict[str, torch.Tensor]]:
    """Read an original DiT / SpeeDiT `.pt` and convert it (EMA weights unless `use_raw`).

    Also returns the original state dict that was converted (for `compare_with_original`). A
    train.py checkpoint's `args.num_classes` is used unless `num_classes` is given.
    """
    state_dict, source, args = select_state_dict(load_checkpoint_file(path), use_raw=use_raw)
    if num_classes is None and isinstance(args.get("num_classes"), int):
        num_classes = args["num_classes"]
    model, info = convert_dit_state_dict(state_dict, num_attention_heads=num_attention_heads, num_classes=num_classes)
    set_timestep_freq_shift(model, ORIGINAL_FREQ_SHIFT)  # the original's sinusoid: exact outputs in this project
    info.source = source
    info.checkpoint_args = {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))}
    return model, info, state_dict


# ------------------------------------------------------------------------------------------------
# reference implementation of the original forward pass (for measurement and tests)
# ------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int = TIMESTEP_FREQUENCY_DIM, convention: str = "original") -> torch.Tensor:
    """[cos | sin] of t times geometric frequencies from 1 down to 1/10000.

    `"original"` spaces the exponents over dim/2 steps (DiT: 10000^(-i/128)); `"diffusers"` over
    dim/2 - 1 (diffusers' `Timesteps(downscale_freq_shift=1)`: 10000^(-i/127)).
    """
    if convention not in ("original", "diffusers"):
        raise ValueError(f"convention={convention!r} must be 'original' or 'diffusers'.")
    half = dim // 2
    steps = half if convention == "original" else half - 1
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / steps)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def original_dit_forward(
    state_dict: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    num_heads: int,
    sinusoid: str = "original",
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """The original DiT forward pass, written from the paper's description, on a raw state dict.

    x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels. Returns (N, out_channels, H, W).
    `sinusoid="diffusers"` swaps in diffusers' timestep frequencies, which isolates the weight
    mapping (the outputs then agree to float rounding).
    """
    sd, _ = strip_wrapper_prefixes(state_dict)
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    n = x.shape[0]
    patch = sd["x_embedder.proj.weight"].shape[-1]

    # tokens: non-overlapping patches projected to the hidden size, plus the fixed position table
    h = F.conv2d(x.float(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    grid_h, grid_w = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    hidden = h.shape[-1]

    # one conditioning vector per sample: MLP(sinusoid(t)) + label embedding
    temb = timestep_sinusoid(t.to(x.device), convention=sinusoid)
    temb = F.linear(
        F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
        sd["t_embedder.mlp.2.weight"],
        sd["t_embedder.mlp.2.bias"],
    )
    cond = F.silu(temb + sd["y_embedder.embedding_table.weight"][y])

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = hidden // num_heads
    for i in range(depth):
        p = f"blocks.{i}."
        mods = F.linear(cond, sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mods.chunk(6, dim=-1))

        a = _layer_norm(h, norm_eps) * (1 + scale1) + shift1
        q, k, v = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, -1, num_heads, head_dim).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(n, -1, hidden)
        h = h + gate1 * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])

        m = _layer_norm(h, norm_eps) * (1 + scale2) + shift2
        m = F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        h = h + gate2 * F.linear(m, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])

    shift, scale = F.linear(
        cond, sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    ).chunk(2, dim=-1)
    h = _layer_norm(h, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    # each token holds a p x p x C patch; put the patches back on the image grid
    channels = h.shape[-1] // (patch * patch)
    h = h.reshape(n, grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(n, channels, grid_h * patch, grid_w * patch)


def sincos_position_table(hidden: int, grid: int) -> np.ndarray:
    """DiT's fixed 2D sin-cos position table (grid*grid, hidden), in float64.

    Half the channels encode the column index and half the row index; each half is [sin | cos] of
    the index times frequencies 10000^(-j / (hidden/4)).
    """
    quarter = hidden // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def random_original_state_dict(
    depth: int,
    hidden: int,
    patch: int = 2,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the original DiT layout, for tests and measurements.

    Linears are Xavier-uniform with small random biases, embeddings normal(0.02) as in DiT; unlike
    DiT's adaLN-Zero start, the modulation and output layers are random too, so that every block
    and the timestep / label conditioning change the output.
    """
    g = torch.Generator().manual_seed(seed)
    out_channels = 2 * in_channels if learn_sigma else in_channels

    def linear(prefix: str, fan_out: int, fan_in: int, sd: dict) -> None:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        sd[prefix + ".weight"] = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        sd[prefix + ".bias"] = torch.randn(fan_out, generator=g) * 0.02

    sd: dict[str, torch.Tensor] = {}
    bound = math.sqrt(6.0 / (in_channels * patch * patch + hidden))
    sd["x_embedder.proj.weight"] = (torch.rand(hidden, in_channels, patch, patch, generator=g) * 2 - 1) * bound
    sd["x_embedder.proj.bias"] = torch.randn(hidden, generator=g) * 0.02
    sd["pos_embed"] = torch.from_numpy(sincos_position_table(hidden, input_size // patch)).float()[None]
    sd["t_embedder.mlp.0.weight"] = torch.randn(hidden, TIMESTEP_FREQUENCY_DIM, generator=g) * 0.02
    sd["t_embedder.mlp.0.bias"] = torch.randn(hidden, generator=g) * 0.02
    sd["t_embedder.mlp.2.weight"] = torch.randn(hidden, hidden, generator=g) * 0.02
    sd["t_embedder.mlp.2.bias"] = torch.randn(hidden, generator=g) * 0.02
    sd["y_embedder.embedding_table.weight"] = torch.randn(num_classes + 1, hidden, generator=g) * 0.02
    for i in range(depth):
        linear(f"blocks.{i}.attn.qkv", 3 * hidden, hidden, sd)
        linear(f"blocks.{i}.attn.proj", hidden, hidden, sd)
        linear(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden, sd)
        linear(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden, sd)
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden, sd)
    linear("final_layer.linear", patch * patch * out_channels, hidden, sd)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden, sd)
    return sd


# ------------------------------------------------------------------------------------------------
# pipeline export
# ------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def class_names_for(num_classes: int) -> list[str]:
    """ImageNet names for 1000-class models, "0".."N-1" otherwise."""
    if num_classes == 1000:
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder (or onto a file) unless `overwrite`."""
    if os.path.isfile(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file: give a folder path.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty: choose a new folder or pass --overwrite to write over it."
        )


def load_vae(vae: str):
    """`AutoencoderKL.from_pretrained` on a Hub id or local folder, with a one-line error."""
    try:
        return AutoencoderKL.from_pretrained(vae)
    except Exception as error:  # OSError offline / missing files, ValueError for a bad folder
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--vae {vae!r} could not be loaded as an AutoencoderKL ({first_line[:200]}): give a Hub id such as "
            "stabilityai/sd-vae-ft-ema (online) or a local folder with config.json and weights."
        ) from None


def export_pipeline(
    model: DiTTransformer2DModel,
    vae,
    output_dir: str,
    speedit_preset: str = "uniform",
    dtype: str = "float32",
    class_names: list[str] | None = None,
):
    """Save a converted transformer as the folder train_dit.py writes for latent models.

    A stock `DiTPipeline` (transformer, VAE, DDIM scheduler, id2label) plus `training_scheduler/`
    recording how the checkpoint was trained (`uniform` for DiT, a SpeeDiT preset for SpeeDiT).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown: choose one of {', '.join(DTYPES)}.")
    training_scheduler = SpeeDiTScheduler.from_preset(speedit_preset)
    names = class_names or class_names_for(model.config.num_embeds_ada_norm)
    model = model.to(DTYPES[dtype])
    vae = vae.to(DTYPES[dtype])
    pipeline = build_pipeline(model, training_scheduler, names, vae=vae)
    save_pipeline(pipeline, training_scheduler, output_dir)
    save_timestep_sinusoid(model, os.path.join(output_dir, "transformer"))  # honoured here, ignored by stock
    return pipeline


def describe_conversion(info: ConversionInfo) -> str:
    """One line per fact the converter inferred, for the CLI and the model card."""
    cfg = info.config
    image = cfg["sample_size"] * 8
    lines = [
        f"weights: {info.source}"
        + (f" (stripped {', '.join(info.stripped_prefixes)})" if info.stripped_prefixes else ""),
        f"model: {('DiT-' + info.preset) if info.preset else 'custom DiT'}, depth {cfg['num_layers']}, hidden "
        f"{cfg['num_attention_heads'] * cfg['attention_head_dim']}, {cfg['num_attention_heads']} heads, patch "
        f"{cfg['patch_size']}, {cfg['sample_size']}x{cfg['sample_size']} latents ({image}x{image} images through "
        f"an SD VAE), learn_sigma={info.learn_sigma}, {info.num_classes} classes",
        f"pos_embed: max |stored - diffusers' sin-cos table| = {info.pos_embed_max_abs_diff:.3g}",
        f"norm_eps: {cfg['norm_eps']:g} (DiT's); the timestep sinusoid is the original's 10000^(-i/128), recorded in "
        "transformer/timestep_sinusoid.json (stock diffusers ignores it and uses 10000^(-i/127); see "
        "docs/conversion.md)",
    ]
    if info.added_null_class:
        lines.append("label table had no null-class row: a zero row was added; guidance is not meaningful")
    return "\n".join(lines)


def convert_dit_checkpoint(
    checkpoint: str,
    output_dir: str,
    vae: str = "stabilityai/sd-vae-ft-ema",
    use_raw: bool = False,
    speedit_preset: str = "uniform",
    dtype: str = "float32",
    overwrite: bool = False,
    num_attention_heads: int | None = None,
    num_classes: int | None = None,
    verify: bool = False,
) -> tuple[Any, ConversionInfo, list[dict] | None]:
    """Convert an original DiT / SpeeDiT `.pt` into a pipeline folder; the CLI's whole job.

    Cheap checks (output folder, flags) run before the checkpoint and the VAE are read. With
    `verify`, the converted transformer is compared with the reference original forward pass
    on random inputs (raises if it is not exact to float rounding), and the rows of the stock
    diffusers path (diffusers' sinusoid, as `DiffusionPipeline.from_pretrained` runs the folder)
    against the original are returned.
    """
    check_output_dir(output_dir, overwrite)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown: choose one of {', '.join(DTYPES)}.")
    if speedit_preset not in PRESETS:
        raise ValueError(f"--speedit {speedit_preset!r} is unknown: choose one of {', '.join(PRESETS)}.")
    model, info, state_dict = load_dit_checkpoint(checkpoint, use_raw, num_attention_heads, num_classes)
    rows = None
    if verify:
        mapping = compare_with_original(model, state_dict, sinusoid="original")
        worst = max(max(r["eps_max"], r["var_max"] or 0.0) / max(r["out_mean"], 1e-12) for r in mapping)
        if worst > 1e-4:
            raise RuntimeError(
                f"the converted model differs from the original forward pass by {worst:.3g} (relative): the "
                "weight mapping is wrong for this checkpoint; please report it."
            )
        set_timestep_freq_shift(model, DIFFUSERS_FREQ_SHIFT)  # what stock diffusers runs
        rows = compare_with_original(model, state_dict, sinusoid="original")
        set_timestep_freq_shift(model, ORIGINAL_FREQ_SHIFT)
    del state_dict
    pipeline = export_pipeline(model, load_vae(vae), output_dir, speedit_preset=speedit_preset, dtype=dtype)
    return pipeline, info, rows


# ------------------------------------------------------------------------------------------------
# checking a conversion and measuring the sinusoid / epsilon differences
# ------------------------------------------------------------------------------------------------
MEASURE_TIMESTEPS = (0, 10, 250, 500, 999)


@torch.no_grad()
def compare_with_original(
    model: DiTTransformer2DModel,
    state_dict: Mapping[str, torch.Tensor],
    timesteps: tuple[int, ...] = MEASURE_TIMESTEPS,
    batch_size: int = 2,
    sinusoid: str = "original",
    seed: int = 0,
) -> list[dict]:
    """Max / mean |diffusers - original| of the eps and variance channels at each timestep.

    Inputs are unit-normal latents and random labels (the same for every timestep). One row per
    timestep: t, eps_max, eps_mean, var_max, var_mean (var_* are None without learned sigma) and
    out_mean (mean |original output|, for scale).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    y = torch.randint(0, cfg.num_embeds_ada_norm, (batch_size,), generator=g)
    model_dtype = next(model.parameters()).dtype
    rows = []
    for t in timesteps:
        tt = torch.full((batch_size,), t, dtype=torch.long)
        ours = model(x.to(model_dtype), tt, y).sample.float()
        ref = original_dit_forward(state_dict, x, tt, y, cfg.num_attention_heads, sinusoid=sinusoid, norm_eps=1e-6)
        diff = (ours - ref).abs()
        c = cfg.in_channels
        learned = ref.shape[1] == 2 * c
        rows.append(
            {
                "t": int(t),
                "eps_max": float(diff[:, :c].max()),
                "eps_mean": float(diff[:, :c].mean()),
                "var_max": float(diff[:, c:].max()) if learned else None,
                "var_mean": float(diff[:, c:].mean()) if learned else None,
                "out_mean": float(ref.abs().mean()),
            }
        )
    return rows


def format_difference_table(rows: list[dict]) -> str:
    """A markdown table of `compare_with_original` rows."""

    def fmt(v):
        return "n/a" if v is None else f"{v:.3e}"

    lines = [
        "| t | eps max | eps mean | var max | var mean | mean abs output |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['t']} | {fmt(r['eps_max'])} | {fmt(r['eps_mean'])} | {fmt(r['var_max'])} | "
            f"{fmt(r['var_mean'])} | {fmt(r['out_mean'])} |"
        )
    return "\n".join(lines)


@torch.no_grad()
def sample_latents(denoise, scheduler, shape: tuple[int, ...], num_inference_steps: int, seed: int) -> torch.Tensor:
    """A plain sampling loop (no guidance): `denoise(x, t) -> model output`, one fixed noise seed.

    With a DDIM scheduler only the eps channels are used (as `DiTPipeline` does); with a
    `learned_range` DDPM scheduler the full output is, and the ancestral noise comes from the same
    seeded generator, so two models see identical noise.
    """
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g)
    scheduler.set_timesteps(num_inference_steps)
    learned = getattr(scheduler.config, "variance_type", None) == "learned_range"
    for t in scheduler.timesteps:
        out = denoise(latents, t)
        if not learned:
            out = out[:, : shape[1]]
        latents = scheduler.step(out, t, latents, generator=g).prev_sample
    return latents


def measure_sampling_difference(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_inference_steps: int = 50,
    batch_size: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Final-latent differences of the same sampling run under the original and converted models.

    Rows per sampler ("ddim", "ddpm-learned"): |converted(eps 1e-6) - original|,
    |converted(eps 1e-5) - original| and |converted(eps 1e-5) - converted(eps 1e-6)|, max and mean,
    plus the mean |latent| of the original run for scale.
    """
    model6, info = convert_dit_state_dict(state_dict, num_attention_heads=num_attention_heads, norm_eps=1e-6)
    model5, _ = convert_dit_state_dict(state_dict, num_attention_heads=num_attention_heads, norm_eps=1e-5)
    cfg = model6.config
    labels = torch.arange(batch_size) % cfg.num_embeds_ada_norm
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def run(model):
        return lambda x, t: model(x, t.expand(batch_size), labels).sample

    def original(x, t):
        return original_dit_forward(state_dict, x, t.expand(batch_size), labels, cfg.num_attention_heads)

    training = SpeeDiTScheduler.from_preset("uniform")
    samplers = {
        "ddim": lambda: inference_scheduler(training, latent=True),
        "ddpm-learned": lambda: training_sampler(training, "ddpm", learned_variance=True, clip_sample=False),
    }
    rows = []
    for name, make in samplers.items():
        if name == "ddpm-learned" and not info.learn_sigma:
            continue
        ref = sample_latents(original, make(), shape, num_inference_steps, seed)
        z6 = sample_latents(run(model6), make(), shape, num_inference_steps, seed)
        z5 = sample_latents(run(model5), make(), shape, num_inference_steps, seed)
        rows.append(
            {
                "sampler": name,
                "eps6_vs_original_max": float((z6 - ref).abs().max()),
                "eps6_vs_original_mean": float((z6 - ref).abs().mean()),
                "eps5_vs_original_max": float((z5 - ref).abs().max()),
                "eps5_vs_original_mean": float((z5 - ref).abs().mean()),
                "eps5_vs_eps6_max": float((z5 - z6).abs().max()),
                "eps5_vs_eps6_mean": float((z5 - z6).abs().mean()),
                "latent_mean_abs": float(ref.abs().mean()),
            }
        )
    return rows


@torch.no_grad()
def measure_output_differences(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    timesteps: tuple[int, ...] = MEASURE_TIMESTEPS,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """`compare_with_original` tables for three cases, computing each reference pass once.

    "mapping": converted (eps 1e-6) vs the original forward fed diffusers' sinusoid;
    "converted": converted (eps 1e-6, what the converter writes) vs the original forward;
    "eps1e-5": converted with diffusers' default eps 1e-5 in the MLP LayerNorm vs the original.
    """
    model6, _ = convert_dit_state_dict(state_dict, num_attention_heads=num_attention_heads, norm_eps=1e-6)
    model5, _ = convert_dit_state_dict(state_dict, num_attention_heads=num_attention_heads, norm_eps=1e-5)
    cfg = model6.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    y = torch.randint(0, cfg.num_embeds_ada_norm, (batch_size,), generator=g)
    c = cfg.in_channels

    def row(t, ours, ref):
        diff = (ours - ref).abs()
        learned = ref.shape[1] == 2 * c
        return {
            "t": t,
            "eps_max": float(diff[:, :c].max()),
            "eps_mean": float(diff[:, :c].mean()),
            "var_max": float(diff[:, c:].max()) if learned else None,
            "var_mean": float(diff[:, c:].mean()) if learned else None,
            "out_mean": float(ref.abs().mean()),
        }

    tables: dict[str, list[dict]] = {"mapping": [], "converted": [], "eps1e-5": []}
    for t in timesteps:
        tt = torch.full((batch_size,), t, dtype=torch.long)
        out6, out5 = model6(x, tt, y).sample, model5(x, tt, y).sample
        ref = original_dit_forward(state_dict, x, tt, y, cfg.num_attention_heads)
        ref_diffusers_sinusoid = original_dit_forward(
            state_dict, x, tt, y, cfg.num_attention_heads, sinusoid="diffusers"
        )
        tables["mapping"].append(row(t, out6, ref_diffusers_sinusoid))
        tables["converted"].append(row(t, out6, ref))
        tables["eps1e-5"].append(row(t, out5, ref))
    return tables


def _measure_main(argv: list[str] | None = None) -> None:
    """`python -m speedit_scheduler.conversion`: the figures of docs/conversion.md."""
    parser = argparse.ArgumentParser(description="Measure diffusers-vs-original DiT differences on random weights.")
    parser.add_argument("--preset", default="S/2", help="DiT preset whose shapes to use (XL/2, S/2, ...).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument(
        "--sampling_steps", type=int, default=0, help="also run both samplers this many steps (0: skip)."
    )
    parser.add_argument("--sampling_batch_size", type=int, default=2)
    args = parser.parse_args(argv)
    config = dit_config(args.preset)
    sd = random_original_state_dict(
        config["num_layers"],
        config["num_attention_heads"] * config["attention_head_dim"],
        patch=config["patch_size"],
        input_size=config["sample_size"],
        seed=args.seed,
    )
    t = torch.arange(1000)
    sinusoid_diff = (timestep_sinusoid(t, convention="diffusers") - timestep_sinusoid(t)).abs()
    print(
        "timestep sinusoid |diffusers - original|, max over the 256 features: "
        + ", ".join(f"t={s}: {float(sinusoid_diff[s].max()):.4f}" for s in MEASURE_TIMESTEPS),
        flush=True,
    )
    model, info = convert_dit_state_dict(sd)
    print(f"{args.preset}: pos_embed max |stored - diffusers| = {info.pos_embed_max_abs_diff:.3g}", flush=True)
    del model
    titles = {
        "mapping": "converted (eps 1e-6) vs original forward fed diffusers' sinusoid (the weight mapping alone)",
        "converted": "converted (eps 1e-6, as written by the converter) vs original forward",
        "eps1e-5": "converted with diffusers' default eps 1e-5 vs original forward",
    }
    tables = measure_output_differences(sd, timesteps=MEASURE_TIMESTEPS, batch_size=args.batch_size, seed=args.seed)
    for name, rows in tables.items():
        print(f"\n{args.preset}, batch {args.batch_size}, {titles[name]}:\n{format_difference_table(rows)}", flush=True)
    if args.sampling_steps:
        print(f"\n{args.sampling_steps}-step sampling, final latents, batch {args.sampling_batch_size}, same noise:")
        for r in measure_sampling_difference(
            sd, num_inference_steps=args.sampling_steps, batch_size=args.sampling_batch_size, seed=args.seed
        ):
            print(" ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    _measure_main()
