"""Retrieval and vote quality over a labelled set, measured leave-one-out.

Pure functions over arrays (no I/O, no plotting). Each labelled item is a query; its top k come
from the *other* items. The measures follow shared/papers: label-match counts in the top k
against the random expectation (Takacs et al. 2025, Tables 11–20), P@k micro and macro (Denner
et al. 2024, Table 1), and the backend's own vote (`echolabel.vote.vote`) for accuracy,
coverage and calibration, so the numbers describe exactly what annotators are shown.

Labels are one choices field per item; None means "no label for this field": such an item is
never a query and never a match, but it stays in the retrieval pool, as in the store.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from echolabel.vote import TEMPERATURE, FieldVote, vote
from vectorstore import Neighbour

MISSING = -1  # index padding where fewer than k candidates remain
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.linspace(0.0, 1.0, 21))
_NORM_TOLERANCE = 1e-3  # float32 embeddings normalised upstream are within ~1e-6 of unit


def leave_one_out_neighbours(
    vectors: np.ndarray,
    k: int,
    groups: Sequence[Hashable | None] | None = None,
    block: int = 1024,
    *,
    exclude_above: float | None = None,
    exclude_by: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most cosine-similar other rows, best first, by exact search.

    `vectors` are L2-normalised rows (n, d). A row is never its own neighbour. With `groups`
    (one id per row, e.g. the patient), rows of the query's group are excluded as well, so
    near-duplicate frames of one patient cannot inflate the scores (leave-patient-out); a None
    group means "no group" and excludes only the row itself. With `exclude_above`, rows at a
    cosine similarity ≥ it (the query's near-duplicates, e.g. repeated frames) are excluded
    the same way; the similarity compared is that of the rows of `exclude_by` when given (the
    base encoder's vectors of centred ones, whose threshold it is). `candidates` (bool per
    row) restricts the neighbours to those rows, e.g. the tasks labelled so far in a replayed
    annotation session.

    Returns (indices (n, k) int64, similarities (n, k) float32). Equal similarities are ordered
    by index, never by the sort algorithm, so a run is reproducible. BLAS may round the last bit
    differently for another `block`, which can only swap neighbours whose similarities differ
    by about 1e-7. Where fewer than k candidates remain, rows are padded with -1 and nan.
    Memory is O(block × n).
    """
    x = _unit_rows(vectors)
    n = x.shape[0]
    by = x if exclude_by is None else _unit_rows(exclude_by)
    if by.shape[0] != n:
        raise ValueError(f"exclude_by has {by.shape[0]} rows for {n} vectors")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    codes = _group_codes(groups, n)
    pool = None
    if candidates is not None:
        pool = np.asarray(candidates, dtype=bool)
        if pool.shape != (n,):
            raise ValueError(f"candidates has shape {pool.shape}, expected one bool per row ({n},)")
    indices = np.full((n, k), MISSING, dtype=np.int64)
    similarities = np.full((n, k), np.nan, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = x[start:stop] @ x.T  # float32, as the store computes cosines
        rows = np.arange(start, stop)
        # -inf marks "not a candidate"; real cosines are finite, so the two never mix.
        sims[rows - start, rows] = -np.inf
        if codes is not None:
            query = codes[start:stop, None]
            sims[(query == codes[None, :]) & (query >= 0)] = -np.inf
        if exclude_above is not None:
            alike = sims if by is x else by[start:stop] @ by.T
            sims[alike >= exclude_above] = -np.inf
        if pool is not None:
            sims[:, ~pool] = -np.inf
        _top_k(sims, k, indices[start:stop], similarities[start:stop])
    return indices, similarities


def label_match(
    labels: Sequence[str | None],
    indices: np.ndarray,
    k: int = 10,
    min_class_size: int = 20,
) -> dict[str, Any]:
    """Mean number of same-label items in each query's top k, per class, against chance.

    Per class: `count` (labelled items), `same_in_top10` (mean same-label neighbours in the top
    k; the key keeps the papers' name whatever k is), `random_expectation` = count / total × k,
    the papers' formula with total = labelled items, `random_expectation_loo` = the exact
    expectation of k items drawn at random from the query's leave-one-out pool,
    (count - 1) / (n - 1) × min(k, n - 1) with n = all items that can be retrieved (labelled or
    not; equal to (count - 1) / (total - 1) × k when all are labelled and k < n), and
    `lift` = same_in_top10 / random_expectation. The two expectations differ most for small
    classes: a one-item class can never match (same and loo expectation are 0), yet the
    papers' formula gives count / total × k. Group exclusion (leave-patient-out) is not
    reflected in the expectations.

    Overall: count-weighted averages (`weighted_same_in_top10`, `weighted_random_expectation`,
    `weighted_random_expectation_loo`, `weighted_lift`) over the classes with
    count ≥ `min_class_size` (listed in `classes_in_weighted_average`); if none qualifies they
    are taken over all classes and `weighted_over_all_classes` is True.
    """
    classes, codes, hits = _hits(labels, indices, k)
    queries = codes >= 0
    total = int(queries.sum())
    n = len(codes)
    counts = np.bincount(codes[queries], minlength=len(classes))
    same = np.bincount(codes[queries], weights=hits.sum(axis=1), minlength=len(classes)) / counts
    random = counts / total * k
    # A random draw from the pool yields at most n - 1 items, however large k is.
    random_loo = (counts - 1) / (n - 1) * min(k, n - 1) if n > 1 else np.zeros(len(classes))

    included = counts >= min_class_size
    over_all = not included.any()
    if over_all:
        included = np.ones(len(classes), dtype=bool)
    weights = counts[included] / counts[included].sum()
    weighted_same = float(weights @ same[included])
    weighted_random = float(weights @ random[included])
    return {
        "k": k,
        "total": total,
        "min_class_size": min_class_size,
        "per_class": {
            name: {
                "count": int(counts[c]),
                "same_in_top10": float(same[c]),
                "random_expectation": float(random[c]),
                "random_expectation_loo": float(random_loo[c]),
                "lift": float(same[c] / random[c]),
            }
            for c, name in enumerate(classes)
        },
        "weighted_same_in_top10": weighted_same,
        "weighted_random_expectation": weighted_random,
        "weighted_random_expectation_loo": float(weights @ random_loo[included]),
        "weighted_lift": weighted_same / weighted_random,
        "weighted_over_all_classes": over_all,
        "classes_in_weighted_average": [name for c, name in enumerate(classes) if included[c]],
    }


def precision_at_k(
    labels: Sequence[str | None],
    indices: np.ndarray,
    ks: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, Any]:
    """P@k: the share of a query's top k that carry its label (Denner et al. 2024).

    `micro` averages over queries (labelled items), `macro` over classes of the per-class mean,
    so rare classes weigh as much as common ones; `per_class` gives the per-class means. Keys of
    the inner dicts are str(k). Padding (-1) and unlabelled neighbours count as misses.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive ranks, got {list(ks)}")
    classes, codes, hits = _hits(labels, indices, max(ks))
    query_codes = codes[codes >= 0]
    counts = np.bincount(query_codes, minlength=len(classes))
    cumulative = hits.cumsum(axis=1)
    micro: dict[str, float] = {}
    macro: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {name: {} for name in classes}
    for rank in ks:
        precision = cumulative[:, rank - 1] / rank
        class_means = np.bincount(query_codes, weights=precision, minlength=len(classes)) / counts
        micro[str(rank)] = float(precision.mean())
        macro[str(rank)] = float(class_means.mean())
        for c, name in enumerate(classes):
            per_class[name][str(rank)] = float(class_means[c])
    return {"micro": micro, "macro": macro, "per_class": per_class}


def vote_metrics(
    labels: Sequence[str | None],
    indices: np.ndarray,
    similarities: np.ndarray,
    *,
    field: str = "label",
    k: int = 10,
    min_neighbours: int,
    min_score: float,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    bins: int = 10,
    temperature: float = TEMPERATURE,
) -> dict[str, Any]:
    """Quality of the backend's vote (`echolabel.vote.vote`, neighbours weighed at
    `temperature`) on each labelled query's top k.

    At the given `min_neighbours` / `min_score`: `queries` (labelled items), `voted`,
    `abstained`, `coverage` (voted / queries), `accuracy` (on voted queries), `macro_f1` (mean
    over classes of F1 on voted queries; a class neither predicted nor true among them is
    skipped; precision is 0 for a class never predicted), `per_class` {precision, recall, f1,
    support} for those classes, and `confusion` {"classes", "matrix"} with rows = true label,
    columns = voted label, over voted queries. Accuracy and macro F1 are None when nothing was
    voted.

    `coverage_curve`: [{threshold, coverage, accuracy}] as min_score takes each of `thresholds`
    with min_neighbours fixed (accuracy None where coverage is 0); coverage never increases.

    `calibration`: `bins` equal-width bins [low, high) of the vote score (the winner's share of
    the weight; the last bin includes 1), each {low, high, count, mean_score, accuracy}, over
    the queries voted at min_score = 0 with the given min_neighbours — not only those above
    `min_score`, so the reliability diagram covers the whole score range.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    classes, codes, _ = _hits(labels, indices, k)
    idx = np.asarray(indices)
    sims = np.asarray(similarities)
    if sims.shape != idx.shape:
        raise ValueError(
            f"similarities have shape {sims.shape}, expected the shape of indices "
            f"{idx.shape}: pass both arrays from leave_one_out_neighbours"
        )
    names = list(labels)
    queries = np.flatnonzero(codes >= 0)
    truth = codes[queries]
    position = {name: c for c, name in enumerate(classes)}
    predicted = np.full(len(queries), -1)  # at min_score; -1 = abstained
    free_predicted = np.full(len(queries), -1)  # at min_score = 0
    free_score = np.zeros(len(queries))
    for i, q in enumerate(queries):
        neighbours = _neighbours(names, idx[q, :k], sims[q, :k], field)
        chosen, free = (
            vote(
                neighbours,
                [field],
                min_neighbours=min_neighbours,
                min_score=threshold,
                temperature=temperature,
            )
            for threshold in (min_score, 0.0)
        )
        if not chosen[field].abstained:
            predicted[i] = position[chosen[field].label]
        if not free[field].abstained:
            free_predicted[i] = position[free[field].label]
        free_score[i] = free[field].score

    voted = predicted >= 0
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (truth[voted], predicted[voted]), 1)
    macro_f1, per_class = _macro_f1(confusion, classes)

    # vote() abstains exactly when support < min_neighbours or share < min_score, so the votes
    # at min_score = 0 with their shares give every point of the curve from one pass.
    free_voted = free_predicted >= 0
    free_correct = free_voted & (free_predicted == truth)
    curve = []
    for threshold in thresholds:
        kept = free_voted & (free_score >= threshold)
        curve.append(
            {
                "threshold": float(threshold),
                "coverage": float(kept.mean()),
                "accuracy": float(free_correct[kept].mean()) if kept.any() else None,
            }
        )

    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, free_score, side="right") - 1, 0, bins - 1)
    calibration = []
    for b in range(bins):
        members = free_voted & (which == b)
        calibration.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(members.sum()),
                "mean_score": float(free_score[members].mean()) if members.any() else None,
                "accuracy": float(free_correct[members].mean()) if members.any() else None,
            }
        )

    n_voted = int(voted.sum())
    return {
        "field": field,
        "k": k,
        "min_neighbours": min_neighbours,
        "min_score": min_score,
        "queries": len(queries),
        "voted": n_voted,
        "abstained": len(queries) - n_voted,
        "coverage": n_voted / len(queries),
        "accuracy": float(np.trace(confusion) / n_voted) if n_voted else None,
        "macro_f1": macro_f1,
        "per_class": per_class,
        "confusion": {"classes": list(classes), "matrix": confusion.tolist()},
        "coverage_curve": curve,
        "calibration": calibration,
    }


def neighbour_votes(
    labels: Sequence[str | None],
    indices: np.ndarray,
    similarities: np.ndarray,
    *,
    field: str = "label",
    k: int = 10,
    min_neighbours: int,
    min_score: float,
    temperature: float = TEMPERATURE,
) -> list[FieldVote]:
    """The backend's vote (`echolabel.vote.vote`, neighbours weighed at `temperature`) of
    every row's top k, labelled or not: what each item would be shown, e.g. each slice of a
    volume before the slices vote."""
    idx, sims, names = np.asarray(indices), np.asarray(similarities), list(labels)
    return [
        vote(
            _neighbours(names, idx[q, :k], sims[q, :k], field),
            [field],
            min_neighbours=min_neighbours,
            min_score=min_score,
            temperature=temperature,
        )[field]
        for q in range(idx.shape[0])
    ]


def _neighbours(
    names: Sequence[str | None], row: np.ndarray, sims: np.ndarray, field: str
) -> list[Neighbour]:
    """One query's retrieved items as the store's neighbours, padding (-1) left out."""
    return [
        Neighbour(
            task=int(j),
            similarity=float(s),
            labels={} if names[j] is None else {field: names[j]},
        )
        for j, s in zip(row, sims, strict=True)
        if j != MISSING
    ]


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"expected a non-empty (n, d) array of L2-normalised vectors, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("vectors contain nan or inf; re-embed or drop those items first")
    norms = np.linalg.norm(x, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if off.size:
        raise ValueError(
            f"expected L2-normalised rows (cosine = dot product), but row {off[0]} has norm "
            f"{norms[off[0]]:.4g} ({off.size} rows off); divide each row by its norm first"
        )
    return x


def _group_codes(groups: Sequence[Hashable | None] | None, n: int) -> np.ndarray | None:
    """One integer per group, -1 for None (no group)."""
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries, expected one per vector ({n})")
    ids: dict[Hashable, int] = {}
    return np.array(
        [MISSING if g is None else ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64
    )


def _top_k(sims: np.ndarray, k: int, indices: np.ndarray, similarities: np.ndarray) -> None:
    """Write each row's k best finite entries, ties by column, into the output views."""
    b, n = sims.shape
    cut = n - min(k, n)
    kth = np.partition(sims, cut, axis=1)[:, cut]
    # Keep every entry tied with the k-th best, then order by (similarity desc, index asc):
    # argpartition alone would choose arbitrarily among ties at the cut.
    rows, cols = np.nonzero((sims >= kth[:, None]) & np.isfinite(sims))
    values = sims[rows, cols]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    starts = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=b))[:-1]))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    indices[rows[keep], rank[keep]] = cols[keep]
    similarities[rows[keep], rank[keep]] = values[keep]


def _hits(
    labels: Sequence[str | None], indices: np.ndarray, k: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate; return sorted classes, a code per item (-1: no label) and, for each labelled
    query, whether each of its first k neighbours shares its label (bool (queries, k))."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    idx = np.asarray(indices)
    names = list(labels)
    if len(names) == 0:
        raise ValueError("no items: labels is empty")
    if idx.ndim != 2 or idx.shape[0] != len(names) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"indices must be an integer array of shape ({len(names)}, ≥{k}) (one row per "
            f"label), got {idx.dtype} {idx.shape}: pass leave_one_out_neighbours' output"
        )
    if idx.shape[1] < k:
        raise ValueError(
            f"indices has {idx.shape[1]} neighbours per query but k = {k}; retrieve with k ≥ {k}"
        )
    if idx.size and (idx.min() < MISSING or idx.max() >= len(names)):
        raise ValueError(f"indices must lie in [-1, {len(names)}) (-1 = no neighbour)")
    classes = sorted({name for name in names if name is not None})
    if not classes:
        raise ValueError("no labelled items: every label is None, nothing to evaluate")
    position = {name: c for c, name in enumerate(classes)}
    codes = np.array([MISSING if name is None else position[name] for name in names])
    top = idx[:, :k]
    # -2 for padding so that it never equals a class code (≥ 0) nor an unlabelled item (-1).
    neighbour_codes = np.where(top >= 0, codes[np.maximum(top, 0)], -2)
    queries = codes >= 0
    return classes, codes, neighbour_codes[queries] == codes[queries, None]


def _macro_f1(
    confusion: np.ndarray, classes: Sequence[str]
) -> tuple[float | None, dict[str, dict[str, float]]]:
    """Macro F1 over classes that are true or predicted at least once (rows true, cols voted)."""
    tp = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    true = confusion.sum(axis=1)
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        if predicted[c] == 0 and true[c] == 0:
            continue
        precision = tp[c] / predicted[c] if predicted[c] else 0.0
        recall = tp[c] / true[c] if true[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(true[c]),
        }
    if not per_class:
        return None, per_class
    return float(np.mean([v["f1"] for v in per_class.values()])), per_class


def choose_k(
    labels: Sequence[str | None],
    indices: np.ndarray,
    similarities: np.ndarray,
    candidates: Sequence[int],
    *,
    field: str = "label",
    groups: Sequence[Hashable | None] | None = None,
    validation_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """The number of voting neighbours k that maximises micro-F1 on a validation split.

    Labelled queries are split at random (by group when `groups` is given, so one patient's
    images stay on one side); every query still retrieves from all other items. The vote runs
    with min_neighbours = 1 and min_score = 0, so every query with a labelled neighbour is
    voted and micro-F1 equals accuracy. Ties go to the smaller k. The chosen k's accuracy on
    the held-out queries is reported next to it, never used to choose.
    """
    idx = np.asarray(indices)
    if not candidates or min(candidates) < 1 or max(candidates) > idx.shape[1]:
        raise ValueError(
            f"candidates {list(candidates)} must lie in 1..{idx.shape[1]} (the retrieved k)"
        )
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    names = list(labels)
    queries = [q for q, name in enumerate(names) if name is not None]
    keys = [groups[q] if groups is not None and groups[q] is not None else f"#{q}" for q in queries]
    units = sorted(set(map(str, keys)))
    rng = np.random.default_rng(seed)
    chosen_units = set(rng.permutation(units)[: max(1, round(len(units) * validation_fraction))])
    validation = [q for q, key in zip(queries, keys, strict=True) if str(key) in chosen_units]
    held_out = [q for q in queries if q not in set(validation)]

    def accuracy(subset: Sequence[int], k: int) -> float | None:
        correct = voted = 0
        for q in subset:
            neighbours = _neighbours(names, idx[q, :k], np.asarray(similarities)[q, :k], field)
            outcome = vote(neighbours, [field], min_neighbours=1, min_score=0.0)[field]
            if not outcome.abstained:
                voted += 1
                correct += outcome.label == names[q]
        return correct / voted if voted else None

    scores = {str(k): accuracy(validation, k) for k in sorted(set(candidates))}
    best = min(
        (int(k) for k in scores if scores[k] is not None),
        key=lambda k: (-(scores[str(k)] or 0.0), k),
        default=None,
    )
    return {
        "candidates": scores,
        "best_k": best,
        "validation_queries": len(validation),
        "held_out_queries": len(held_out),
        "held_out_micro_f1": accuracy(held_out, best) if best is not None else None,
    }
