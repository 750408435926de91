# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Class names: the ImageNet-1k ids and names (the `id2label` of converted 1000-class DiT
pipelines and of ImageNet latents folders) and the resolution of user-given names to class ids.

The ImageNet table is package data, `imagenet_classes.json`, taken from timm 1.0.31 (Apache-2.0,
https://github.com/huggingface/pytorch-image-models), files `timm/data/_info/imagenet_synsets.txt`
(the 1000 WordNet ids, in the sorted order that ImageNet class indices follow) and
`timm/data/_info/imagenet_synset_to_lemma.txt` (WordNet lemmas), so that conversion works offline
and without timm. The names are the comma-joined lemmas, the same strings as the `id2label` of
diffusers' DiT Hub pipelines (index 0 is "tench, Tinca tinca").
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.json").read_text(encoding="utf-8")
    return tuple((wnid, name) for wnid, name in json.loads(text)["classes"])


def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids in class-index order ("n01440764", ...)."""
    return tuple(wnid for wnid, _ in _imagenet_classes())


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in class-index order ("tench, Tinca tinca", "goldfish, ...")."""
    return [name for _, name in _imagenet_classes()]


# --------------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """Case-insensitive, `_` == space, runs of spaces collapsed."""
    return " ".join(name.replace("_", " ").lower().split())


def name_table(id2label: dict) -> dict[str, int]:
    """Normalised name -> class id, for every comma-separated synonym of every class."""
    table = {}
    for key, names in sorted(id2label.items(), key=lambda kv: int(kv[0])):
        for name in str(names).split(","):
            if normalize_name(name):
                table.setdefault(normalize_name(name), int(key))
    return table


def resolve_class_labels(tokens: list[str | int], id2label: dict | None, num_classes: int) -> list[int]:
    """Class ids of `tokens`: integers (range-checked) or class names resolved through id2label.

    Unknown names raise a one-line ValueError with the closest names (difflib).
    """
    table = name_table(id2label or {})
    ids = []
    for token in tokens:
        token = str(token).strip()
        if re.fullmatch(r"-?\d+", token):
            label = int(token)
            if not 0 <= label < num_classes:
                raise ValueError(f"class label {label} is out of range: the model has classes 0 to {num_classes - 1}.")
            ids.append(label)
            continue
        key = normalize_name(token)
        if key not in table:
            if not table:
                raise ValueError(f"class name {token!r} cannot be resolved: the model has no id2label; give class ids.")
            close = difflib.get_close_matches(key, list(table), n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match; give a class id."
            raise ValueError(f"unknown class name {token!r}: {hint}")
        ids.append(table[key])
    return ids


def short_label(label: int, id2label: dict | None) -> str:
    names = (id2label or {}).get(label, (id2label or {}).get(str(label)))
    return f"{label}: {str(names).split(',')[0].strip()}" if names else str(label)
