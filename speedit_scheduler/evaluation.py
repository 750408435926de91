# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Quality measures for small datasets: a classifier trained on the real images judges whether
class-conditional samples land in their class, and its hidden features give a Frechet distance
(the FID recipe with a digit network instead of Inception)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


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
