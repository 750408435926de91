# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Turning images into a latents folder: image sources (class folders or `datasets`), ADM's
center crop, SD-VAE encoding of each image and its mirror image, and resumable sharded output.

The work is split into shards of a fixed number of source images, fixed by the listing alone, so
the output does not depend on how many processes run it, and a rerun after a kill recomputes
only the shards that were not yet renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils import atomic_write_json
from .class_names import imagenet_class_names, imagenet_synsets
from .latents import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    memmap_safetensors,
    read_shard_metadata,
    shard_file_name,
    write_shard,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's (and DiT's) preprocessing: halve with a box filter while the short side is at least
    twice the target, resize the short side to `image_size` with bicubic, then center crop.
    Returns uint8 HWC RGB."""
    image = image.convert("RGB")  # grayscale, CMYK, palette and RGBA (alpha dropped) become RGB
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_model_input(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
@dataclass
class ImageSource:
    """A listing of images with labels: `load(i)` returns a PIL image (or raises)."""

    name: str
    kind: str  # "folder" or "dataset"
    class_names: list[str]
    class_ids: list[str]
    labels: np.ndarray
    item_names: list[str]
    _folder: str | None = None
    _dataset: object = None
    _image_column: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        if self.kind == "folder":
            image = Image.open(os.path.join(self._folder, self.item_names[index]))
        else:
            value = self._dataset[int(self.item_names[index])][self._image_column]  # names are row numbers
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict) and value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, dict) and value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ValueError(f"column {self._image_column!r} holds no image")
        image.load()  # decode now, so a truncated file fails here and is reported
        return image

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, label in zip(self.item_names, self.labels.tolist()):
            digest.update(f"{name}\t{label}\n".encode())
        return digest.hexdigest()


def folder_source(folder: str, max_samples: int | None = None) -> ImageSource:
    """An ImageNet-style folder: one subfolder per class (`train/n01440764/*.JPEG`), classes
    numbered in sorted order of the subfolder names, as torchvision's ImageFolder does."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input_dir {folder!r} does not exist or is not a folder.")
    class_ids = sorted(
        d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")
    )
    if not class_ids:
        raise ValueError(
            f"--input_dir {folder!r} has no class subfolders: lay images out as {folder}/<class>/<image>.jpg."
        )
    names, labels = [], []
    for label, class_id in enumerate(class_ids):
        for root, dirs, files in os.walk(os.path.join(folder, class_id)):
            dirs.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    names.append(os.path.relpath(os.path.join(root, file), folder))
                    labels.append(label)
    if not names:
        raise ValueError(
            f"--input_dir {folder!r} has class subfolders but no image files ({', '.join(IMAGE_EXTENSIONS)})."
        )
    if max_samples is not None:
        names, labels = _spread_subset(names, labels, max_samples)
    return ImageSource(
        name=os.path.basename(os.path.normpath(folder)),
        kind="folder",
        class_names=_readable_class_names(class_ids),
        class_ids=class_ids,
        labels=np.asarray(labels, dtype=np.int64),
        item_names=names,
        _folder=folder,
    )


def dataset_source(
    dataset_name: str,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    dataset_config_name: str | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
) -> ImageSource:
    """A Hugging Face `datasets` image dataset (a Hub id or `imagefolder` with `data_dir`)."""
    import datasets

    dataset = datasets.load_dataset(dataset_name, dataset_config_name, data_dir=data_dir, split=split)
    columns = dataset.column_names
    for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column of {dataset_name!r}; its columns are {columns}.")
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        class_ids = list(feature.names)
        labels = np.asarray(dataset[label_column], dtype=np.int64)
    else:
        values = dataset[label_column]
        class_ids = sorted({str(v) for v in values})
        lookup = {c: i for i, c in enumerate(class_ids)}
        labels = np.asarray([lookup[str(v)] for v in values], dtype=np.int64)
    if len(labels) == 0:
        raise ValueError(f"dataset {dataset_name!r} split {split!r} is empty.")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(
            image_column, datasets.Image(decode=False)
        )  # decode ourselves: bad files are skipped
    names = [str(i) for i in range(len(labels))]
    if max_samples is not None:
        names, labels = _spread_subset(names, labels.tolist(), max_samples)
        labels = np.asarray(labels, dtype=np.int64)
    return ImageSource(
        name=dataset_name if data_dir is None else f"{dataset_name}:{os.path.basename(os.path.normpath(data_dir))}",
        kind="dataset",
        class_names=_readable_class_names(class_ids),
        class_ids=class_ids,
        labels=labels,
        item_names=names,
        _dataset=dataset,
        _image_column=image_column,
    )


def _spread_subset(names: list[str], labels: list[int], max_samples: int) -> tuple[list[str], list[int]]:
    """The first `max_samples` items of a listing interleaved across classes (for trial runs)."""
    order = np.lexsort((np.arange(len(labels)), _rank_within_class(labels)))[:max_samples]
    order.sort()
    return [names[i] for i in order], [labels[i] for i in order]


def _rank_within_class(labels: list[int]) -> np.ndarray:
    seen: dict[int, int] = {}
    ranks = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        ranks[i] = seen.get(label, 0)
        seen[label] = ranks[i] + 1
    return ranks


def _readable_class_names(class_ids: list[str]) -> list[str]:
    """ImageNet synset ids (n01440764) become their names when the package knows them."""
    lookup = dict(zip(imagenet_synsets(), imagenet_class_names()))
    if all(c in lookup for c in class_ids):
        return [lookup[c] for c in class_ids]
    return list(class_ids)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
class _ShardImages(torch.utils.data.Dataset):
    """Preprocessed images of one shard; unreadable ones come back as their error message."""

    def __init__(self, source: ImageSource, items: range, resolution: int):
        self.source, self.items, self.resolution = source, items, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            array = center_crop_arr(self.source.load(item), self.resolution)
            return item, to_model_input(array), None
        except Exception as error:  # a corrupt image is reported and skipped, never fatal
            return item, None, f"{type(error).__name__}: {error}".splitlines()[0][:200]


def _collate(batch):
    return batch


def extraction_config(source: ImageSource, vae_name_or_path: str, vae, args: dict) -> dict:
    """What must match for a rerun to continue in the same folder."""
    return {
        "source": {
            "kind": source.kind,
            "name": source.name,
            "num_items": len(source),
            "fingerprint": source.fingerprint(),
        },
        "vae": {
            "name_or_path": vae_name_or_path,
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": getattr(vae.config, "shift_factor", None),
            "latent_channels": int(vae.config.latent_channels),
        },
        "resolution": args["resolution"],
        "dtype": args["dtype"],
        "flips": args["flips"],
        "shard_size": args["shard_size"],
    }


def check_output_folder(output_dir: str, config: dict) -> None:
    """Refuse a folder that holds another extraction (different VAE, resolution, data...)."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        if os.path.isdir(output_dir) and any(n.startswith("shard-") for n in os.listdir(output_dir)):
            raise ValueError(
                f"--output_dir {output_dir!r} holds shards but no {MANIFEST_NAME}: it is not from this script; "
                "use an empty folder."
            )
        return
    with open(path) as f:
        existing = json.load(f)
    differences = [key for key in config if existing.get(key) != config[key]]
    if differences:
        details = "; ".join(f"{k}: folder has {_short(existing.get(k))}, now {_short(config[k])}" for k in differences)
        raise ValueError(
            f"--output_dir {output_dir!r} holds latents from a different extraction ({details}): "
            "use another --output_dir or delete that one."
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_moments(vae, images: torch.Tensor, flips: bool) -> torch.Tensor:
    """(n, F, 2C, h, w) float32: posterior mean and std of each image (and of its mirror)."""
    batch = torch.cat([images, images.flip(-1)]) if flips else images
    posterior = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
    moments = torch.cat([posterior.mean, posterior.std], dim=1).float()
    if flips:
        original, mirrored = moments.chunk(2)
        return torch.stack([original, mirrored], dim=1)
    return moments[:, None]


def _fault_injection(point: str, index: int) -> None:
    """Test hook: SPEEDIT_TEST_KILL_AT=<point>:<index> kills the process there, as kill -9 would."""
    if os.environ.get("SPEEDIT_TEST_KILL_AT") == f"{point}:{index}":
        os.kill(os.getpid(), 9)


def extract_latents(
    source: ImageSource,
    vae,
    vae_name_or_path: str,
    output_dir: str,
    accelerator,
    resolution: int = 256,
    dtype: str = "float32",
    flips: bool = True,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 4,
) -> dict:
    """Encode `source` into `output_dir` (resumable) and return the manifest.

    Shard k holds source items [k * shard_size, (k + 1) * shard_size) minus unreadable ones;
    process p encodes the shards k with k % num_processes == p. The manifest is written first
    with `complete: false` and rewritten complete by the main process at the end.
    """

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}.")
    config = extraction_config(
        source,
        vae_name_or_path,
        vae,
        {"resolution": resolution, "dtype": dtype, "flips": flips, "shard_size": shard_size},
    )
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        check_output_folder(output_dir, config)
        manifest_path = os.path.join(output_dir, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            atomic_write_json(
                manifest_path, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": False, **config}
            )
    accelerator.wait_for_everyone()

    num_shards = (len(source) + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
    todo = [k for k in mine if not os.path.isfile(os.path.join(output_dir, shard_file_name(k)))]
    total = sum(len(_shard_items(k, shard_size, len(source))) for k in todo)
    progress = tqdm(total=total, unit="img", desc=f"extract (process {accelerator.process_index})", smoothing=0.1)
    vae.eval().requires_grad_(False)
    for shard in todo:
        items = _shard_items(shard, shard_size, len(source))
        loader = torch.utils.data.DataLoader(
            _ShardImages(source, items, resolution), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
        )
        moments, kept, skipped = [], [], []
        for batch in loader:
            good = [(item, image) for item, image, error in batch if error is None]
            skipped += [
                {"item": source.item_names[item], "error": error} for item, _, error in batch if error is not None
            ]
            if good:
                with torch.no_grad():
                    moments.append(encode_moments(vae, torch.stack([image for _, image in good]), flips).cpu())
                kept += [item for item, _ in good]
            progress.update(len(batch))
        _fault_injection("shard", shard)
        latent_shape = _latent_shape(vae, resolution)
        all_moments = (
            torch.cat(moments)
            if moments
            else torch.zeros((0, 2 if flips else 1, 2 * latent_shape[0], *latent_shape[1:]))
        )
        kept_items = torch.as_tensor(kept, dtype=torch.int64)
        labels = torch.from_numpy(source.labels[kept_items.numpy()]) if kept else torch.zeros(0, dtype=torch.int64)
        write_shard(
            os.path.join(output_dir, shard_file_name(shard)),
            all_moments,
            labels,
            kept_items,
            dtype,
            metadata={"format": FORMAT_NAME, "skipped": json.dumps(skipped)},
        )
    progress.close()
    accelerator.wait_for_everyone()

    manifest = None
    if accelerator.is_main_process:
        manifest = _finish_manifest(output_dir, config, source, num_shards, vae, resolution)
    accelerator.wait_for_everyone()
    return manifest


def _shard_items(shard: int, shard_size: int, num_items: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_items))


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.latent_channels), resolution // factor, resolution // factor)


def _finish_manifest(output_dir: str, config: dict, source: ImageSource, num_shards: int, vae, resolution: int) -> dict:
    shards, skipped, count = [], [], 0
    for k in range(num_shards):
        path = os.path.join(output_dir, shard_file_name(k))
        arrays = memmap_safetensors(path)
        n = int(arrays["labels"].shape[0])
        shards.append({"file": shard_file_name(k), "num_samples": n})
        skipped += json.loads(read_shard_metadata(path).get("skipped", "[]"))
        count += n
    if count == 0:
        raise ValueError(f"no image of {source.name!r} could be read ({len(skipped)} failed): nothing to train on.")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": True,
        **config,
        "num_samples": count,
        "latent_shape": list(_latent_shape(vae, resolution)),
        "moments": "channels [:C] posterior mean, [C:] posterior std, unscaled; "
        "sample = (mean + std * eps) * scaling_factor",
        "preprocessing": "ADM center crop (box-halving, bicubic, center crop), RGB, [-1, 1]",
        "class_names": source.class_names,
        "class_ids": source.class_ids,
        "shards": shards,
        "skipped": skipped,
    }
    atomic_write_json(os.path.join(output_dir, MANIFEST_NAME), manifest)
    return manifest
