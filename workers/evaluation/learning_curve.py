"""How soon suggestions pay off: replay an annotation session on a labelled set.

Labels are revealed one batch at a time (10, 20, 50, 100, 200, 500, … tasks labelled); after
each batch, every task not labelled yet gets the backend's suggestion from its k nearest
*labelled* tasks (`leave_one_out_neighbours` restricted to the revealed ones, then
`echolabel.vote.vote` with the backend's abstain rules), and the suggestions' accuracy (on the
tasks voted) and coverage (the share voted) are measured against the hidden labels.

Three orders of annotation: `random`; `uncertain_first`, where each next batch is the
not-yet-labelled tasks with the least certain suggestion (the prediction score Label Studio
sorts by, `echolabel.vote.task_score`); and `diverse_first`, the k-center greedy order of
`echolabel.diversity` (the order the backend writes into Label Studio), which picks its first
batch too. Random and uncertain-first start from the same random first batch. Each order runs
once per seed (diverse-first is deterministic: its seeds repeat one session); the report gives
mean and standard deviation over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from echolabel.diversity import k_center_order
from echolabel.vote import task_score, vote
from vectorstore import Neighbour

from .metrics import MISSING, leave_one_out_neighbours

ORDERS = ("random", "uncertain_first", "diverse_first")


def batch_sizes(n: int, first: int = 10) -> list[int]:
    """Labelled counts 10, 20, 50, 100, 200, 500, … below n (at least one task stays hidden)."""
    sizes: list[int] = []
    scale = first
    while scale < n:
        for step in (1, 2, 5):
            if scale * step < n:
                sizes.append(scale * step)
        scale *= 10
    return sizes


def replay(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    *,
    order: str,
    seed: int,
    sizes: Sequence[int],
    k: int = 10,
    min_neighbours: int = 3,
    min_score: float = 0.5,
    exclude_above: float | None = None,
    exclude_by: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One session: after each batch, {labelled, fields: {field: {classes_labelled,
    remaining, voted, coverage, accuracy}}}: the classes among the labelled tasks, the rest
    measured on the tasks not labelled yet."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    n = len(vectors)
    fields = list(labels)
    if not sizes or sorted(sizes) != list(sizes) or sizes[0] < 1 or sizes[-1] >= n:
        raise ValueError(f"sizes must increase within 1..{n - 1}, got {list(sizes)}")
    rng = np.random.default_rng(seed)
    tie_break = rng.random(n)  # random among equally uncertain tasks
    revealed = np.zeros(n, dtype=bool)
    revealed[rng.permutation(n)[: sizes[0]]] = True
    random_rest = [i for i in rng.permutation(n) if not revealed[i]]
    if order == "diverse_first":
        # One traversal: the order is prefix-consistent, so following it batch by batch
        # equals recomputing it from the revealed tasks before each batch.
        diverse = k_center_order(vectors, limit=sizes[-1])[: sizes[-1]]
        revealed[:] = False
        revealed[diverse[: sizes[0]]] = True
    points = []
    for step, size in enumerate(sizes):
        votes, scores = _suggestions(
            vectors, labels, revealed, k, min_neighbours, min_score, exclude_above, exclude_by
        )
        hidden = np.flatnonzero(~revealed)
        per_field = {}
        for name in fields:
            truth = labels[name]
            measured = [i for i in hidden if truth[i] is not None]
            voted = [i for i in measured if votes[i][name].label is not None]
            correct = sum(votes[i][name].label == truth[i] for i in voted)
            per_field[name] = {
                "classes_labelled": len({truth[i] for i in np.flatnonzero(revealed)} - {None}),
                "remaining": len(measured),
                "voted": len(voted),
                "coverage": len(voted) / len(measured) if measured else None,
                "accuracy": correct / len(voted) if voted else None,
            }
        points.append({"labelled": int(revealed.sum()), "fields": per_field})
        if step + 1 == len(sizes):
            break
        more = sizes[step + 1] - size
        if order == "random":
            chosen = [i for i in random_rest if not revealed[i]][:more]
        elif order == "diverse_first":
            chosen = diverse[size : size + more].tolist()
        else:
            ranked = hidden[np.lexsort((tie_break[hidden], scores[hidden]))]
            chosen = ranked[:more].tolist()
        revealed[chosen] = True
    return points


def learning_curve(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    sizes: Sequence[int] | None = None,
    k: int = 10,
    min_neighbours: int = 3,
    min_score: float = 0.5,
    exclude_above: float | None = None,
    exclude_by: np.ndarray | None = None,
    orders: Sequence[str] = ORDERS,
) -> dict[str, Any]:
    """Every order over all seeds: {sizes, seeds, k, orders: {order: {field: {labelled,
    accuracy_mean, accuracy_std, coverage_mean, coverage_std}}}, runs: {order: [per seed]}}.

    Means skip a seed's None (nothing voted at that point)."""
    sizes = list(sizes) if sizes is not None else batch_sizes(len(vectors))
    runs = {
        order: [
            replay(
                vectors,
                labels,
                order=order,
                seed=seed,
                sizes=sizes,
                k=k,
                min_neighbours=min_neighbours,
                min_score=min_score,
                exclude_above=exclude_above,
                exclude_by=exclude_by,
            )
            for seed in seeds
        ]
        for order in orders
    }
    summary: dict[str, Any] = {}
    for order, sessions in runs.items():
        summary[order] = {}
        for name in labels:
            table: dict[str, list[Any]] = {"labelled": sizes}
            for measure in ("accuracy", "coverage"):
                values = [
                    [s[p]["fields"][name][measure] for s in sessions] for p in range(len(sizes))
                ]
                kept = [[v for v in row if v is not None] for row in values]
                table[f"{measure}_mean"] = [float(np.mean(r)) if r else None for r in kept]
                table[f"{measure}_std"] = [float(np.std(r)) if r else None for r in kept]
            summary[order][name] = table
    return {
        "sizes": sizes,
        "seeds": list(seeds),
        "k": k,
        "min_neighbours": min_neighbours,
        "min_score": min_score,
        "orders": summary,
        "runs": runs,
    }


def _suggestions(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    revealed: np.ndarray,
    k: int,
    min_neighbours: int,
    min_score: float,
    exclude_above: float | None,
    exclude_by: np.ndarray | None = None,
) -> tuple[list[Any], np.ndarray]:
    """Every task's vote from its k nearest revealed tasks, and its task score."""
    indices, sims = leave_one_out_neighbours(
        vectors, k, candidates=revealed, exclude_above=exclude_above, exclude_by=exclude_by
    )
    fields = list(labels)
    votes: list[Any] = []
    scores = np.zeros(len(vectors))
    for q in range(len(vectors)):
        if revealed[q]:
            votes.append(None)
            continue
        neighbours = [
            Neighbour(
                task=int(j),
                similarity=float(s),
                labels={f: labels[f][j] for f in fields if labels[f][j] is not None},
            )
            for j, s in zip(indices[q], sims[q], strict=True)
            if j != MISSING
        ]
        outcome = vote(neighbours, fields, min_neighbours=min_neighbours, min_score=min_score)
        votes.append(outcome)
        scores[q] = task_score(outcome)
    return votes, scores
