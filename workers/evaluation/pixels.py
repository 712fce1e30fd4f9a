"""Pixel-level similarity of retrieved sets (Takacs et al. 2025, Tables 6–8): how alike the
query and its top k look, next to the same measure for randomly drawn sets."""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMBNAIL = (64, 64)
BINS = 64


def thumbnail(image: Image.Image) -> np.ndarray:
    """A 64×64 grey thumbnail (uint8): enough for histograms and MSE, cheap to keep for all."""
    return np.asarray(image.convert("L").resize(THUMBNAIL, Image.Resampling.BILINEAR))


def histogram_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of normalised 64-bin grey histograms: 1 identical, 0 disjoint."""
    ha = np.histogram(a, bins=BINS, range=(0, 256))[0] / a.size
    hb = np.histogram(b, bins=BINS, range=(0, 256))[0] / b.size
    return float(np.minimum(ha, hb).sum())


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of the thumbnails, on 0–1 intensities."""
    diff = (a.astype(np.float32) - b.astype(np.float32)) / 255.0
    return float(np.mean(diff * diff))


def pixel_metrics(
    thumbnails: np.ndarray, indices: np.ndarray, *, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean histogram similarity and MSE between each query and its retrieved images, and the
    same for as many images drawn at random (never the query itself)."""
    n = indices.shape[0]
    if n < 2:
        raise ValueError("pixel metrics need at least two images")
    rng = np.random.default_rng(seed)
    sums = {"retrieved": np.zeros(2), "random": np.zeros(2)}
    counts = {"retrieved": 0, "random": 0}
    for query in range(n):
        retrieved = [int(i) for i in indices[query] if i >= 0]
        others = rng.choice(n - 1, size=min(len(retrieved), n - 1), replace=False)
        drawn = [int(i) + (i >= query) for i in others]  # skip the query's own index
        for name, chosen in (("retrieved", retrieved), ("random", drawn)):
            for other in chosen:
                sums[name] += (
                    histogram_similarity(thumbnails[query], thumbnails[other]),
                    mse(thumbnails[query], thumbnails[other]),
                )
                counts[name] += 1
    return {
        name: {
            "histogram_similarity": float(sums[name][0] / max(1, counts[name])),
            "mse": float(sums[name][1] / max(1, counts[name])),
        }
        for name in sums
    }
