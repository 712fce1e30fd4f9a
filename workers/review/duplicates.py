"""Near-duplicates: pairs of tasks whose embeddings are almost the same image.

Repeated frames and re-uploads sit at a cosine similarity far above that of two different
images of the same class; they inflate leave-one-out metrics (the query finds its own copy)
and waste annotation time. Pairs come from the same exact kNN graph as the evaluation
(`leave_one_out_neighbours`), so a task with more than `k` near-duplicates is still linked to
all of them through the others (see `groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from workers.evaluation.metrics import MISSING, leave_one_out_neighbours

# Chosen on BUSI with efficientnet_lite0 (`python -m workers.review.duplicates_bench`,
# docs/review.md): the nearest-neighbour similarity distribution has a separate high tail.
DEFAULT_THRESHOLD = 0.92


def near_duplicate_pairs(
    vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, k: int = 10
) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every pair among each row's k nearest at ≥ threshold,
    most similar first."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    indices, sims = leave_one_out_neighbours(vectors, k)
    pairs: dict[tuple[int, int], float] = {}
    rows, ranks = np.nonzero((indices != MISSING) & (sims >= threshold))
    for i, r in zip(rows.tolist(), ranks.tolist(), strict=True):
        j = int(indices[i, r])
        pairs[(min(i, j), max(i, j))] = float(sims[i, r])
    return sorted(((i, j, s) for (i, j), s in pairs.items()), key=lambda p: (-p[2], p[0], p[1]))


def groups(pairs: Sequence[tuple[int, int, float]]) -> list[list[int]]:
    """Connected components of the pairs (a set of frames of one scene), largest first."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(root(x), []).append(x)
    return sorted((sorted(m) for m in members.values()), key=lambda m: (-len(m), m[0]))


def find_duplicates(
    vectors: np.ndarray,
    ids: Sequence[Any],
    labels: Sequence[Mapping[str, str]] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = 10,
    link: Callable[[Any], str | None] = lambda task: None,
    image: Callable[[Any], str | None] = lambda task: None,
) -> dict[str, Any]:
    """The JSON-able result a page or CLI shows: pairs side by side, with labels and links.

    {threshold, k, tasks, pairs: [{a, b, similarity, labels_a, labels_b, same_labels, link_a,
    link_b, image_a, image_b}], groups: [[task, ...]]}. `same_labels` is False where both are
    labelled and differ: a near-duplicate pair with different labels is a label conflict.
    """
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors: give one id per vector")
    found = near_duplicate_pairs(vectors, threshold, k)
    out = []
    for i, j, similarity in found:
        la = dict(labels[i]) if labels is not None else {}
        lb = dict(labels[j]) if labels is not None else {}
        shared = set(la) & set(lb)
        out.append(
            {
                "a": ids[i],
                "b": ids[j],
                "similarity": round(similarity, 6),
                "labels_a": la,
                "labels_b": lb,
                "same_labels": all(la[f] == lb[f] for f in shared),
                "link_a": link(ids[i]),
                "link_b": link(ids[j]),
                "image_a": image(ids[i]),
                "image_b": image(ids[j]),
            }
        )
    return {
        "threshold": threshold,
        "k": k,
        "tasks": len(ids),
        "pairs": out,
        "groups": [[ids[m] for m in members] for members in groups(found)],
    }
