"""How big each section runs: the full run (about 45 min on 2 cores, most of it the 1M-point
indexes), the smoke run (< 1 min).

Tests build a smaller `Profile` of their own. Sizes are inputs, never results: what a cell
costs is measured, and cells that would not fit are skipped with the reason printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSI_DIR = ROOT.parent / "shared" / "data" / "busi"
STRUCTURES = ("matmul", "kdtree", "balltree", "qdrant_local", "qdrant_edge", "hnswlib")


@dataclass(frozen=True)
class SearchProfile:
    # Synthetic data: (dimension, sizes) pairs.
    synthetic: tuple[tuple[int, tuple[int, ...]], ...]
    # Real embeddings of the BUSI images (default encoder) repeated with noise to these sizes.
    real_sizes: tuple[int, ...] = ()
    real_images: int | None = None  # how many BUSI images to embed (None: all)
    structures: tuple[str, ...] = STRUCTURES
    queries: int = 200  # single queries per cell, at most
    batch: int = 64  # queries per batched call
    build_repeats: int = 3  # while the builds so far took under build_budget_s
    build_budget_s: float = 2.0
    query_budget_s: float = 3.0  # seconds of single queries per variant and cell, at most
    # Estimated seconds one structure may spend on one cell: exact structures and local mode,
    # then HNSW indexes (built once per collection generation, so a long build is worth it).
    cell_budget_s: float = 60.0
    index_budget_s: float = 600.0
    omitted: tuple[str, ...] = ()  # cells the profile leaves out on purpose, and why
    k: int = 10


@dataclass(frozen=True)
class LatencyProfile:
    sizes: tuple[int, ...]
    clients: tuple[int, ...] = (1, 8)
    stored_requests: int = 200  # requests per (size, clients) when the vector is stored
    embedded_requests: int = 24  # requests per (size, clients) that embed an image (0: none)
    encoder: str = "efficientnet_lite0"
    dim: int = 1280  # the encoder's dimension: stored vectors must fit its collection
    profile_calls: int = 200  # in-process predict calls under cProfile (at the middle size)


@dataclass(frozen=True)
class EmbeddingProfile:
    encoders: tuple[str, ...] | None = None  # None: every registered encoder
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    images: int = 64  # images per timed round
    repeats: int = 3
    decode_images: int = 200
    matmul_size: int = 2048  # square fp32 matmul that measures the device's peak FLOP/s


@dataclass(frozen=True)
class MemoryProfile:
    points: int = 100_000
    dim: int = 1280
    encoder: str = "efficientnet_lite0"
    requests: int = 20  # /predict requests of each kind before the peak RSS is read


@dataclass(frozen=True)
class EmbeddedProfile:
    """The embedded default (Qdrant Edge) against the store before it, through the app."""

    sizes: tuple[int, ...]  # both stores
    large: int  # Edge only: fill, index, serve, restart
    baseline_upserts: int  # points the store before Edge upserts on disk (~4 ms each)
    clients: tuple[int, ...] = (1, 8)
    requests: int = 200  # /predict (and /health) requests per store, size and client count
    encoder: str = "efficientnet_lite0"
    dim: int = 1280
    k: int = 10


@dataclass(frozen=True)
class Profile:
    name: str
    search: SearchProfile
    latency: LatencyProfile
    embedding: EmbeddingProfile
    memory: MemoryProfile
    embedded: EmbeddedProfile
    images_dir: Path = field(default=BUSI_DIR)
    seed: int = 0


def full() -> Profile:
    """The sizes the issue asks for, within what 2 cores and 24 GiB can run in one sitting."""
    return Profile(
        name="full",
        search=SearchProfile(
            synthetic=(
                (384, (5_000, 15_000, 100_000, 1_000_000)),
                (1280, (5_000, 15_000)),
                (1792, (5_000, 15_000, 100_000, 1_000_000)),
            ),
            real_sizes=(5_000, 15_000, 100_000, 1_000_000),
            omitted=(
                "synthetic 1280-d at 100k and 1M points: the real 1280-d embeddings cover those "
                "sizes; left out to keep the full run under an hour on 2 cores",
            ),
        ),
        latency=LatencyProfile(sizes=(1_000, 15_000, 100_000)),
        embedding=EmbeddingProfile(),
        memory=MemoryProfile(),
        embedded=EmbeddedProfile(sizes=(15_000,), large=1_000_000, baseline_upserts=2_000),
    )


def smoke() -> Profile:
    """Every section and structure at small sizes: proves the suite runs, in under a minute."""
    return Profile(
        name="smoke",
        search=SearchProfile(
            synthetic=((384, (2_000,)),),
            real_sizes=(2_000,),
            real_images=32,
            queries=20,
            batch=16,
            build_repeats=1,
            query_budget_s=1.0,
            cell_budget_s=10.0,
            index_budget_s=10.0,
        ),
        latency=LatencyProfile(
            sizes=(1_000,), stored_requests=30, embedded_requests=8, profile_calls=20
        ),
        embedding=EmbeddingProfile(
            encoders=("efficientnet_lite0",),
            batch_sizes=(1, 8),
            images=8,
            repeats=1,
            decode_images=8,
            matmul_size=1024,
        ),
        memory=MemoryProfile(points=2_000, requests=2),
        embedded=EmbeddedProfile(sizes=(1_000,), large=3_000, baseline_upserts=200, requests=30),
    )
