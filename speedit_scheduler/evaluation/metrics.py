# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Quality measures for small datasets: a classifier trained on the real images judges whether
class-conditional samples land in their class, and its hidden features give a Frechet distance
(the FID recipe with a digit network instead of Inception); and ADM's (guided-diffusion's) FID,
sFID, Inception Score, precision and recall on the FID Inception network (`inception.py`)."""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm.auto import tqdm

from ..data.datasets import load_npz_arrays
from ..data.extraction import IMAGE_EXTENSIONS, center_crop_arr
from ..options import ADM_IS_SPLIT_SIZE, ADM_NEAREST_K  # noqa: F401 (re-exported)
from ..utils import atomic_write
from .inception import POOL_DIM, SPATIAL_DIM, InceptionV3FID, load_inception


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as in FID."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # dead feature units make covariances singular; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


class ReferenceClassifier:
    """An MLP trained on real images in [0, 1] (N x C x H x W); judges generated images."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        x = self._flatten(images)
        y = np.asarray(labels)
        self.model = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=seed, early_stopping=True)
        self.model.fit(x, y)
        self.real_statistics = feature_statistics(self.features(images))

    @staticmethod
    def _flatten(images) -> np.ndarray:
        images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return images.reshape(len(images), -1).astype(np.float64)

    def features(self, images) -> np.ndarray:
        x = self._flatten(images)
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)

    def accuracy(self, images, labels) -> float:
        return float((self.model.predict(self._flatten(images)) == np.asarray(labels)).mean())

    def frechet_distance(self, images) -> float:
        return frechet_distance(*feature_statistics(self.features(images)), *self.real_statistics)


# ---------------------------------------------------------------------------------------------
# ADM-compatible FID / sFID / Inception Score / precision / recall (guided-diffusion's
# evaluations/evaluator.py, restated in PyTorch on the FID Inception of `inception.py`).
# ---------------------------------------------------------------------------------------------

METRIC_NAMES = ("is", "fid", "sfid", "precision", "recall")


def _channel_layout(shape: tuple[int, ...], channels_last_default: bool) -> bool:
    """True when a 4-D image shape is N x H x W x C. Decided by where the 1 or 3 channels are;
    when both ends could be channels, the container's convention decides (numpy / ADM: NHWC,
    torch: NCHW)."""
    last, second = shape[-1] in (1, 3), shape[1] in (1, 3)
    if last != second:
        return last
    return channels_last_default


def _check_image_shape(shape: tuple[int, ...], name: str, channels_last_default: bool = True) -> bool:
    """Validates an image-batch shape, returns whether it is channels-last."""
    if len(shape) == 3:
        return True  # N x H x W grayscale
    if len(shape) != 4:
        raise ValueError(
            f"{name} has shape {shape}; expected N x H x W x 3 images (ADM's layout), N x 3 x H x W, "
            "or N x H x W grayscale."
        )
    channels_last = _channel_layout(shape, channels_last_default)
    channels = shape[-1] if channels_last else shape[1]
    if channels == 4:
        raise ValueError(f"{name} has 4 channels (shape {shape}); drop the alpha channel (x[..., :3]) and save RGB.")
    if channels not in (1, 3):
        raise ValueError(
            f"{name} has shape {shape}: neither dim 1 nor the last dim is 1 or 3 channels; "
            "save N x H x W x 3 uint8 images."
        )
    return channels_last


def as_uint8_nchw(images: np.ndarray | torch.Tensor, name: str = "images", allow_float: bool = False) -> torch.Tensor:
    """Any image batch -> uint8 N x 3 x H x W tensor (on the input's device).

    Accepts NHWC or NCHW (numpy arrays default to NHWC, tensors to NCHW when the shape is
    ambiguous), grayscale N x H x W or one channel (replicated to RGB, as for MNIST), uint8, and with
    `allow_float` floats in [0, 1] (rounded to the nearest of 256 levels)."""
    channels_last_default = not isinstance(images, torch.Tensor)
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    channels_last = _check_image_shape(tuple(x.shape), name, channels_last_default)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        if not (allow_float and x.is_floating_point()):
            raise ValueError(
                f"{name} have dtype {x.dtype}; ADM image batches are uint8 in [0, 255] "
                "(convert with np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))."
            )
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{name} are floats in [{lo:.3g}, {hi:.3g}], expected [0, 1]; pass (x + 1) / 2 for images in [-1, 1]."
            )
        x = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


ADM_NPZ_LAYOUT = (
    "an ADM batch holds arr_0 (uint8 N x H x W x 3) and optionally the float FID statistics mu, sigma, mu_s, "
    "sigma_s: write it with np.savez(path, images) or scripts/evaluate.py --make_reference"
)


class ImageNpz:
    """An image array in an .npz (ADM's sample / reference batch format: `arr_0`, uint8,
    N x H x W x 3), checked from its header and read in batches without loading it whole (a 50k
    ImageNet-256 batch is ~10 GB)."""

    def __init__(self, path: str, key: str = "arr_0"):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist; pass an .npz image batch (np.savez(path, images_uint8_nhwc))."
            )
        self.path, self.key = path, key
        try:
            with zipfile.ZipFile(path) as archive:
                self.keys = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
                if key not in self.keys:
                    raise ValueError(
                        f"{path} has no array '{key}' (it has {self.keys}); "
                        "ADM batches keep the images in arr_0: np.savez(path, images)."
                    )
                with archive.open(key + ".npy") as f:
                    self.shape, self._fortran, self.dtype = self._read_header(f)
        except zipfile.BadZipFile as error:
            raise ValueError(
                f"{path} is not an .npz archive; write image batches with np.savez(path, images)."
            ) from error
        if self.dtype != np.uint8:
            raise ValueError(
                f"{path}: {key} has dtype {self.dtype}; ADM image batches are uint8 in [0, 255] "
                "(convert with np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))."
            )
        self.channels_last = _check_image_shape(self.shape, f"{path}: {key}")
        if self.shape[0] == 0:
            raise ValueError(f"{path}: {key} holds no images.")

    @staticmethod
    def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:  # format 3.0 (utf-8 field names): no public header reader; load it whole
            return (), True, np.dtype(np.uint8)
        shape, fortran, dtype = reader(f)
        return tuple(shape), bool(fortran), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive raw batches (the file's own layout and channels)."""
        if self._fortran or self.dtype.hasobject or not self.shape:
            array = load_npz_arrays(self.path, [self.key], ADM_NPZ_LAYOUT)[self.key]  # allow_pickle=False
            for start in range(0, len(array), batch_size):
                yield array[start : start + batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(self.key + ".npy") as f:
            self._read_header(f)
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(
                        f"{self.path}: {self.key} is truncated (ends before image {start + len(data) // per_image})."
                    )
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        """All images as uint8 N x H x W x 3 (grayscale replicated)."""
        batches = [as_uint8_nchw(b, self.path).permute(0, 2, 3, 1).numpy() for b in self.iter_batches(4096)]
        return np.concatenate(batches)

    def statistics(self) -> dict[str, np.ndarray] | None:
        """ADM's precomputed FID statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) when the file has them."""
        if "mu" not in self.keys:
            return None
        missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in self.keys]
        if missing:
            raise ValueError(
                f"{self.path} has 'mu' but lacks {missing}; rewrite it with scripts/evaluate.py --make_reference."
            )
        stats = load_npz_arrays(self.path, ["mu", "sigma", "mu_s", "sigma_s"], ADM_NPZ_LAYOUT)  # allow_pickle=False
        for k, value in stats.items():
            floating = np.issubdtype(value.dtype, np.floating)
            if not floating or not np.isfinite(value).all():
                problem = "holds NaN or inf" if floating else f"is {value.dtype}"
                raise ValueError(
                    f"{self.path}: {k} {problem}; expected finite float FID statistics: rewrite it with "
                    "scripts/evaluate.py --make_reference."
                )
        for k, dim in (("mu", POOL_DIM), ("mu_s", SPATIAL_DIM)):
            sigma = stats["sigma" + k[2:]]
            if stats[k].shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(
                    f"{self.path}: {k} / sigma{k[2:]} have shapes {stats[k].shape} / {sigma.shape}, "
                    f"expected ({dim},) / ({dim}, {dim}) "
                    "of the FID Inception; rewrite it with scripts/evaluate.py --make_reference."
                )
        return stats


@dataclass
class InceptionFeatures:
    """The three Inception outputs ADM reads, one row per image (float32)."""

    pool: np.ndarray  # N x 2048, pool_3: FID, precision, recall
    spatial: np.ndarray  # N x 2023, mixed_6/conv[..., :7]: sFID
    logits: np.ndarray  # N x 1008, pool_3 @ W without bias: Inception Score

    def __len__(self) -> int:
        return len(self.pool)

    def statistics(self) -> dict[str, np.ndarray]:
        """Mean and covariance of the pool and spatial features, under ADM's .npz names."""
        mu, sigma = feature_statistics(self.pool)
        mu_s, sigma_s = feature_statistics(self.spatial)
        return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


class InceptionMetrics:
    """Runs the FID Inception over image batches on a device.

    `weights`: a path to `weights-inception-2015-12-05-6726825d.pth` (else the environment variable
    / torch.hub cache / download, see `inception.resolve_inception_weights`); `model`: an
    `InceptionV3FID` to use instead (tests pass a randomly initialised one)."""

    def __init__(
        self,
        weights: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        model: InceptionV3FID | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.model = (model if model is not None else load_inception(weights)).to(self.device).eval()

    @torch.no_grad()
    def features_from_batches(
        self, batches: Iterable[np.ndarray | torch.Tensor], allow_float: bool = False, total: int | None = None
    ) -> InceptionFeatures:
        outputs: list[tuple[torch.Tensor, ...]] = []
        with tqdm(total=total, desc="inception features", unit="img") as progress:
            for batch in batches:
                x = as_uint8_nchw(batch, allow_float=allow_float).to(self.device)
                outputs.append(tuple(t.cpu() for t in self.model(x)))
                progress.update(len(x))
        if not outputs:
            raise ValueError("no images to compute features of.")
        pool, spatial, logits = (torch.cat(parts).numpy() for parts in zip(*outputs))
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)

    def features(
        self, images: np.ndarray | torch.Tensor | ImageNpz | str, allow_float: bool = False
    ) -> InceptionFeatures:
        """Features of an image batch (array / tensor, see `as_uint8_nchw`) or an .npz path."""
        if isinstance(images, str):
            images = ImageNpz(images)
        if isinstance(images, ImageNpz):
            return self.features_from_batches(images.iter_batches(self.batch_size), total=len(images))
        batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return self.features_from_batches(batches, allow_float=allow_float, total=len(images))


def frechet_distance_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """`frechet_distance` of the two sets' mean and covariance, computed from the features when
    both sets have at most as many rows as columns (then the covariances are singular and a D x D
    `sqrtm` is both slow and inaccurate). With S1 = A^T A and S2 = B^T B (centred rows over
    sqrt(n - 1)), the non-zero eigenvalues of S1 S2 are the squared singular values of A B^T, so
    Tr (S1 S2)^(1/2) is the sum of those singular values: exact, and O(n^2 D) instead of O(D^3).
    Larger sets fall back to the statistics route, as ADM computes it."""
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature widths differ: {f1.shape} vs {f2.shape}.")
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors per set, got {len(f1)} and {len(f2)}.")
    if max(len(f1), len(f2)) > f1.shape[1]:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a = (f1 - mu1) / math.sqrt(len(f1) - 1)
    b = (f2 - mu2) / math.sqrt(len(f2) - 1)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * cross)


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: exp(E_x KL(p(y|x) || p(y))) in consecutive splits of `split_size`
    (a shorter last split is scored too, as ADM does), averaged. `logits` are the Inception's
    unbiased 1008 logits; probabilities come from a float64 log-softmax so that p log p is 0, not
    NaN, where p underflows."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(logits) < split_size:
        raise ValueError(
            f"{len(logits)} samples are fewer than the Inception Score split of {split_size}; "
            f"use split_size <= {len(logits)} "
            f"(--is_split_size), or more samples (ADM: 50000 in splits of {ADM_IS_SPLIT_SIZE})."
        )
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = torch.log_softmax(logits[start : start + split_size], dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores))


def _squared_distances(u: torch.Tensor, v: torch.Tensor, half: bool) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) as ADM's DistanceBlock; `half` first tries float16 and keeps
    it when finite, as ADM's TF graph does."""
    if half:
        u16, v16 = u.half(), v.half()
        d = ((u16 * u16).sum(1, keepdim=True) - 2 * u16 @ v16.T + (v16 * v16).sum(1)[None]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    return ((u * u).sum(1, keepdim=True) - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def manifold_radii(
    features: np.ndarray | torch.Tensor, k: int = ADM_NEAREST_K, batch_size: int = 10000,
    device: str | torch.device = "cpu", half: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Squared distance of every point to its k-th nearest neighbour, the point itself counting as
    the 0-th (ADM's ManifoldEstimator: entry k of the sorted distance row). Blockwise with a running
    top-(k+1), so memory is batch_size^2 whatever N."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if len(x) < k + 1:
        raise ValueError(
            f"precision/recall with k={k} need at least k+1 = {k + 1} feature vectors per set, got {len(x)}."
        )
    radii = torch.empty(len(x), device=device)
    for r in range(0, len(x), batch_size):
        rows = x[r : r + batch_size]
        best = torch.empty(len(rows), 0, device=device)
        for c in range(0, len(x), batch_size):
            candidates = torch.cat([best, _squared_distances(rows, x[c : c + batch_size], half)], dim=1)
            best = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r : r + batch_size] = best[:, k]
    return radii


def precision_recall(
    reference: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = ADM_NEAREST_K,
    batch_size: int = 10000, device: str | torch.device = "cpu", half: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's semantics: precision =
    fraction of samples within (<=) the k-NN radius of some reference point, recall = fraction of
    reference points within the k-NN radius of some sample; squared Euclidean distances on float32
    features (`half=True`: float16 first, like ADM's TF code). Computed in blocks of
    `batch_size` x `batch_size`, so 50k x 50k fits in memory."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if ref.dim() != 2 or gen.dim() != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(
            "precision/recall need two N x D feature sets of the same D, "
            f"got {tuple(ref.shape)} and {tuple(gen.shape)}."
        )
    ref_radii = manifold_radii(ref, k, batch_size, device, half)
    gen_radii = manifold_radii(gen, k, batch_size, device, half)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    gen_covered = torch.zeros(len(gen), dtype=torch.bool, device=device)
    for r in range(0, len(ref), batch_size):
        for c in range(0, len(gen), batch_size):
            d = _squared_distances(ref[r : r + batch_size], gen[c : c + batch_size], half)
            ref_covered[r : r + batch_size] |= (d <= gen_radii[None, c : c + batch_size]).any(dim=1)
            gen_covered[c : c + batch_size] |= (d <= ref_radii[r : r + batch_size, None]).any(dim=0)
    return gen_covered.float().mean().item(), ref_covered.float().mean().item()


def check_sample_counts(num_samples: int, num_reference: int, is_split_size: int, k: int) -> None:
    """Fails fast (before any Inception pass) when the sets are too small for the metrics."""
    if is_split_size < 1 or k < 1:
        raise ValueError(f"is_split_size={is_split_size} and nearest_k={k} must be >= 1.")
    if num_samples < is_split_size:
        raise ValueError(
            f"the sample batch has {num_samples} images, fewer than the Inception Score split of {is_split_size}; "
            f"pass --is_split_size {num_samples} or less (ADM: 50000 samples in splits of {ADM_IS_SPLIT_SIZE})."
        )
    for name, count in (("sample", num_samples), ("reference", num_reference)):
        if count < k + 1:
            raise ValueError(f"the {name} batch has {count} images; precision/recall with k={k} need at least {k + 1}.")


def compute_metrics(
    reference: InceptionFeatures,
    samples: InceptionFeatures,
    reference_statistics: dict[str, np.ndarray] | None = None,
    is_split_size: int = ADM_IS_SPLIT_SIZE,
    nearest_k: int = ADM_NEAREST_K,
    device: str | torch.device = "cpu",
    pr_batch_size: int = 10000,
) -> dict[str, float]:
    """The five ADM numbers: `is`, `fid`, `sfid`, `precision`, `recall`. The reference's FID
    statistics are `reference_statistics` when given (ADM uses an .npz's precomputed ones), else
    computed from `reference`."""
    check_sample_counts(len(samples), len(reference), is_split_size, nearest_k)
    if reference_statistics is not None:
        sample_stats = samples.statistics()
        fid = frechet_distance(
            sample_stats["mu"], sample_stats["sigma"], reference_statistics["mu"], reference_statistics["sigma"]
        )
        sfid = frechet_distance(
            sample_stats["mu_s"], sample_stats["sigma_s"], reference_statistics["mu_s"], reference_statistics["sigma_s"]
        )
    else:
        fid = frechet_distance_features(samples.pool, reference.pool)
        sfid = frechet_distance_features(samples.spatial, reference.spatial)
    precision, recall = precision_recall(reference.pool, samples.pool, nearest_k, pr_batch_size, device)
    return {
        "is": inception_score(samples.logits, is_split_size),
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
    }


def evaluate_npz(
    reference_npz: str,
    sample_npz: str,
    metrics: InceptionMetrics,
    is_split_size: int = ADM_IS_SPLIT_SIZE,
    nearest_k: int = ADM_NEAREST_K,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """ADM's evaluator on two .npz batches; every input check runs before the first Inception pass."""
    reference, samples = ImageNpz(reference_npz), ImageNpz(sample_npz)
    check_sample_counts(len(samples), len(reference), is_split_size, nearest_k)
    reference_statistics = reference.statistics()
    log("computing reference batch activations...")
    reference_features = metrics.features(reference)
    log("computing sample batch activations...")
    sample_features = metrics.features(samples)
    log("computing evaluations...")
    return compute_metrics(
        reference_features, sample_features, reference_statistics, is_split_size, nearest_k, metrics.device
    )


def load_images(source: str, image_size: int | None = None) -> np.ndarray:
    """uint8 N x H x W x 3 images from a folder (searched recursively, sorted by path; grayscale and
    palette images become RGB) or an .npz (`arr_0`). `image_size` applies ADM's centre crop to
    folder images; without it all images must share one size."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1.")
    if os.path.isfile(source) and source.endswith(".npz"):
        if image_size is not None:
            raise ValueError(
                f"--image_size applies to image folders; {source} is an .npz, whose images are kept as they are."
            )
        return ImageNpz(source).read_all()
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither an image folder nor an .npz file; pass one of them.")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(source)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"{source} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                array = center_crop_arr(image, image_size) if image_size else np.asarray(image)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for damaged files
            raise ValueError(
                f"{path} is not a readable image ({type(error).__name__}): remove or replace it, then rerun."
            ) from None
        if images and array.shape != images[0].shape:
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]} but "
                f"{paths[0]} is {images[0].shape[1]}x{images[0].shape[0]}; "
                "pass --image_size N to centre-crop all images to N x N as ADM does."
            )
        images.append(array)
    return np.stack(images)


def write_reference_batch(
    images: np.ndarray, output: str, metrics: InceptionMetrics | None = None
) -> dict[str, np.ndarray]:
    """Writes an ADM reference batch: `arr_0` (uint8 N x H x W x 3) and, with `metrics`, the FID
    statistics `mu`, `sigma`, `mu_s`, `sigma_s` of its Inception features. Returns what it wrote."""
    if not output.endswith(".npz"):
        raise ValueError(f"--output {output} must end in .npz (np.savez would append it).")
    arrays = {"arr_0": as_uint8_nchw(images, "reference images").permute(0, 2, 3, 1).contiguous().numpy()}
    if metrics is not None:
        arrays.update(metrics.features(arrays["arr_0"]).statistics())
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_write(output, lambda f: np.savez(f, **arrays))  # a killed run leaves no half-written reference
    return arrays


class FIDMetric:
    """ADM's five numbers for generated images against a reference batch, for repeated use (e.g.
    the convergence comparison): the reference's features are computed once.

    `metric(images, labels=None)` takes a uint8 batch or floats in [0, 1] (N x C x H x W tensors
    or N x H x W x C arrays, grayscale replicated) and returns `{"fid", "sfid", "is", "precision",
    "recall"}`. `is_split_size=None` scores the Inception Score in ADM's splits of 5000, or in one
    split when there are fewer samples."""

    primary = "fid"
    lower_is_better = {"fid": True, "sfid": True, "is": False, "precision": False, "recall": False}

    def __init__(
        self,
        reference_npz: str,
        weights: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        is_split_size: int | None = None,
        nearest_k: int = ADM_NEAREST_K,
        metrics: InceptionMetrics | None = None,
    ):
        reference = ImageNpz(reference_npz)
        self.metrics = metrics if metrics is not None else InceptionMetrics(weights, device, batch_size)
        self.is_split_size, self.nearest_k = is_split_size, nearest_k
        self.reference_statistics = reference.statistics()
        self.reference = self.metrics.features(reference)

    def __call__(self, images: torch.Tensor | np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
        split = self.is_split_size or min(ADM_IS_SPLIT_SIZE, len(images))
        check_sample_counts(len(images), len(self.reference), split, self.nearest_k)
        samples = self.metrics.features(images, allow_float=True)
        return compute_metrics(
            self.reference, samples, self.reference_statistics, split, self.nearest_k, self.metrics.device
        )
