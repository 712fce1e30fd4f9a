"""Diverse-first: the order in which to label a project's tasks while few labels exist.

k-center greedy (farthest-first traversal) under cosine distance, 1 - u·v on L2-normalised
vectors: the next task is the unlabelled one farthest from everything labelled or picked
before it, so the first labels spread over the whole set instead of piling up where most
images look alike. The traversal starts from the labelled tasks when there are any, else from
the task nearest the centroid (the most typical image).

The order is prefix-consistent: labelling its first m tasks and computing it again gives the
rest of the same order (ties aside), so an order written once stays right while annotators
follow it.

Greedy picks cost O(n·d) each; beyond `limit` picks the remaining tasks follow by their
distance to everything chosen (farthest first), one sort instead of n more passes.

Pure NumPy: no store, no Label Studio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Rows of the labelled set compared at once when the start distances are computed.
_CHUNK = 1024


def k_center_order(
    vectors: np.ndarray,
    labelled: Sequence[int] | np.ndarray = (),
    *,
    limit: int | None = None,
) -> np.ndarray:
    """The unlabelled rows of `vectors` (n × d), diverse first.

    `labelled`: row indices (or a boolean mask of length n) already labelled: the traversal
    starts from them and never returns them. `limit`: greedy picks to make (default: all);
    the rest follow by descending distance to the labelled and picked rows. Ties go to the
    lower row index. Returns row indices, every unlabelled row exactly once."""
    x = _normalised(vectors)
    n = len(x)
    seeds = _indices(labelled, n)
    free = np.ones(n, dtype=bool)
    free[seeds] = False
    todo = int(free.sum())
    picks = todo if limit is None else max(0, min(int(limit), todo))
    order: list[int] = []
    if todo == 0:
        return np.zeros(0, dtype=np.int64)
    if len(seeds):
        distance = _distance_to(x, x[seeds])
    else:
        centroid = x.mean(axis=0)
        first = int(np.argmax(x @ centroid))  # nearest the centroid (cosine)
        order.append(first)
        free[first] = False
        distance = 1.0 - x @ x[first]
    distance = distance.astype(np.float64)
    distance[~free] = -np.inf
    while len(order) < picks:
        pick = int(np.argmax(distance))
        order.append(pick)
        free[pick] = False
        np.minimum(distance, 1.0 - x @ x[pick], out=distance)
        distance[pick] = -np.inf
    rest = np.flatnonzero(free)
    if len(rest):
        # Farthest first; stable, so equal distances keep row order.
        rest = rest[np.argsort(-distance[rest], kind="stable")]
    return np.concatenate([np.asarray(order, dtype=np.int64), rest.astype(np.int64)])


def rank_scores(count: int) -> np.ndarray:
    """A score per place of an order of `count` tasks, increasing from 0 (first) below 1:
    sorted ascending, like the uncertain-first score, the order comes back."""
    return np.arange(count, dtype=np.float64) / max(count, 1)


def _distance_to(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Every row's cosine distance to its nearest centre."""
    best = np.full(len(x), -np.inf)
    for start in range(0, len(centres), _CHUNK):
        sims = x @ centres[start : start + _CHUNK].T
        np.maximum(best, sims.max(axis=1), out=best)
    return 1.0 - best


def _normalised(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be n × d, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)


def _indices(labelled: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(labelled)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"a labelled mask must have length {n}, got {arr.shape}")
        return np.flatnonzero(arr)
    idx = arr.astype(np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"labelled rows must lie in 0..{n - 1}")
    return np.unique(idx)
