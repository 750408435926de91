# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Sample grids: the labelled grid of `sample_dit.py` and the per-class grid that training logs."""

from __future__ import annotations

import math

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------------------------
GRID_MIN_SIDE = 64  # small images (8x8 digits) are enlarged (nearest) to at least this side
CAPTION_HEIGHT = 14


def labelled_grid(images: list[Image.Image], captions: list[str], max_cols: int = 8) -> Image.Image:
    """A grid with one tile per image and its caption drawn under it.

    Tiles are the image enlarged by an integer factor to at least GRID_MIN_SIDE pixels, plus a
    CAPTION_HEIGHT strip; `min(len(images), max_cols)` columns.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"labelled_grid needs as many captions as images (got {len(images)} and {len(captions)}).")
    width, height = images[0].size
    scale = max(1, math.ceil(GRID_MIN_SIDE / min(width, height)))
    tile_w, tile_h = width * scale, height * scale
    cols = min(len(images), max_cols)
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tile_w, rows * (tile_h + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tile_w, (i // cols) * (tile_h + CAPTION_HEIGHT)
        grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y))
        while caption and draw.textlength(caption, font=font) > tile_w - 2:  # truncate to the tile
            caption = caption[:-1]
        draw.text((x + 1, y + tile_h + 1), caption, fill="black", font=font)
    return grid


@torch.no_grad()
def class_grid(pipeline, num_classes: int, per_class: int, guidance_scale: float, steps: int, seed: int):
    """A grid of samples from `pipeline`: one row per class (the first 10 classes at most),
    `per_class` samples each, enlarged to at least 64 pixels."""
    classes = list(range(min(num_classes, 10)))
    labels = [c for c in classes for _ in range(per_class)]
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    images = pipeline(
        class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps, generator=generator
    ).images
    size = max(images[0].size[0], 64)
    return make_image_grid(images, rows=len(classes), cols=per_class, resize=size)
