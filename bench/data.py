"""Vectors and images the benchmarks run on: synthetic clusters and real BUSI embeddings.

Synthetic vectors are drawn from a Gaussian mixture in a 32-d latent space and projected to
the target dimension: image embeddings have a low intrinsic dimension (on BUSI, 32 principal
components of efficientnet_lite0 features hold two thirds of the variance), and isotropic
noise in hundreds of dimensions would make every point about equally far from every other,
which no real index faces. Real vectors are the BUSI images' embeddings, repeated with noise.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

_LATENT_DIM = 32
_CENTRES = 20
_CHUNK = 100_000  # rows generated at a time: bounds the float temporaries at 1M points


def latent_clusters(n: int, dim: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """`n` unit float32 rows; the mixture depends only on `dim`, so any seed draws from it."""
    structure = np.random.default_rng(1_000 + dim)
    centres = 2.0 * structure.standard_normal((_CENTRES, _LATENT_DIM), dtype=np.float32)
    projection = structure.standard_normal((_LATENT_DIM, dim), dtype=np.float32)
    projection /= np.float32(np.sqrt(_LATENT_DIM))
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        latent = centres[rng.integers(0, _CENTRES, rows)]
        latent += rng.standard_normal((rows, _LATENT_DIM), dtype=np.float32)
        block = latent @ projection
        block += noise * rng.standard_normal((rows, dim), dtype=np.float32)
        out[start : start + rows] = block
    return normalise(out)


def repeated_with_noise(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` unit rows, each a random row of `base` plus Gaussian noise.

    The noise's norm is half the median distance from a base row to its nearest other row, so
    copies of one image stay nearer each other than to most other images.
    """
    base = normalise(np.asarray(base, dtype=np.float32))
    scale = 0.5 * median_nearest_distance(base)
    sigma = np.float32(scale / np.sqrt(base.shape[1]))
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        block = base[rng.integers(0, len(base), rows)]
        block += sigma * rng.standard_normal(block.shape, dtype=np.float32)
        out[start : start + rows] = block
    return normalise(out)


def median_nearest_distance(rows: np.ndarray) -> float:
    """Median Euclidean distance from each unit row to its nearest other row."""
    if len(rows) < 2:
        raise ValueError("need at least two rows to measure nearest distances")
    sims = rows @ rows.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.clip(sims.max(axis=1), -1.0, 1.0)
    return float(np.median(np.sqrt(2.0 - 2.0 * nearest)))


def normalise(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (cosine order then equals Euclidean order)."""
    rows /= np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-12)
    return rows


def image_paths(images_dir: Path, limit: int | None = None) -> list[Path]:
    """The image files under `images_dir` (recursively), sorted, at most `limit` of them."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in suffixes)
    return paths[:limit] if limit is not None else paths


@lru_cache(maxsize=2)
def real_embeddings(images_dir: Path, encoder_name: str, limit: int | None) -> np.ndarray:
    """Embeddings of the images under `images_dir` by a registered encoder (cached per run)."""
    from PIL import Image

    from echolabel.encoders import load_encoder

    paths = image_paths(images_dir, limit)
    if len(paths) < 2:
        raise FileNotFoundError(f"expected images under {images_dir}, found {len(paths)}")
    encoder = load_encoder(encoder_name)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return encoder.embed(images)
