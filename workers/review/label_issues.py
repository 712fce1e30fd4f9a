"""Label QA: rank labelled tasks by how likely their label is wrong, per choices field.

Each labelled task's out-of-sample class probabilities come from a leave-one-out vote of its
labelled neighbours (`leave_one_out_neighbours` + `echolabel.vote.vote`, exactly what the
backend would suggest if the task were not labelled): a class's probability is its share of
the neighbours' similarity weight. cleanlab then does the rest: `get_label_quality_scores`
ranks every task (lower = more likely mislabelled) and `find_label_issues` (confident
learning, per-class thresholds) marks which of them it calls issues.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.vote import is_multi_choice
from workers.evaluation.metrics import leave_one_out_neighbours, neighbour_votes

# Measured by `python -m workers.review.flip_bench` (docs/review.md, label QA).
DEFAULT_METHOD = "self_confidence"
METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def vote_probabilities(
    labels: Sequence[str | None],
    indices: np.ndarray,
    similarities: np.ndarray,
    classes: Sequence[str],
    *,
    field: str = "label",
) -> tuple[np.ndarray, np.ndarray]:
    """(pred_probs (n, classes), support (n,)): each row's neighbours' vote as probabilities.

    A row whose neighbours carry no label for the field gets the uniform distribution
    (support 0): nothing is known about it.
    """
    position = {name: c for c, name in enumerate(classes)}
    probs = np.full((len(labels), len(classes)), 1.0 / len(classes))
    support = np.zeros(len(labels), dtype=np.int64)
    # Every label the neighbours carry counts: no abstaining, the weights are the probabilities.
    # They stay the similarities (temperature 0), as when flip_bench chose the method: the
    # vote's sharper weights put most votes near 1, which raises cleanlab's per-class
    # thresholds until labels the vote agrees with are flagged too.
    outcomes = neighbour_votes(
        labels,
        indices,
        similarities,
        field=field,
        k=indices.shape[1],
        min_neighbours=1,
        min_score=0.0,
        temperature=0.0,
    )
    for q, outcome in enumerate(outcomes):
        support[q] = outcome.support
        if outcome.weights:
            total = sum(outcome.weights.values())
            probs[q] = 0.0
            for name, weight in outcome.weights.items():
                probs[q, position[name]] = weight / total
    return probs, support


def rank_label_issues(
    vectors: np.ndarray,
    labels: Sequence[str | None],
    *,
    field: str = "label",
    k: int = 10,
    method: str = DEFAULT_METHOD,
) -> dict[str, Any]:
    """Every labelled row of one field, most probably mislabelled first.

    Neighbours are the k most similar *other rows labelled in this field* (the store votes
    with labelled points only). Returns {field, k, method, classes, labelled, flagged,
    rows: [{index, label, vote, vote_score, label_score, rank, flagged, support}]} where
    `vote` / `vote_score` are the neighbours' winner and its share of their similarity,
    `label_score` is cleanlab's label quality score of the given label (0 worst, 1 best),
    `rank` starts at 1, and `flagged` is cleanlab's `find_label_issues` verdict.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if method not in METHODS:
        raise ValueError(f"unknown label-quality method {method!r}; choose one of {METHODS}")
    names = list(labels)
    labelled = np.array([name is not None for name in names])
    if labelled.sum() < 2:
        raise ValueError(f"field {field!r} has {int(labelled.sum())} labelled task(s): need 2+")
    classes = sorted({name for name in names if name is not None})
    indices, sims = leave_one_out_neighbours(vectors, k, candidates=labelled)
    probs, support = vote_probabilities(names, indices, sims, classes, field=field)
    rows = np.flatnonzero(labelled)
    position = {name: c for c, name in enumerate(classes)}
    given = np.array([position[names[i]] for i in rows])
    pred = probs[rows]
    if len(classes) == 1:
        # One class: nothing can be mislabelled between classes.
        quality = np.ones(len(rows))
        flagged = np.zeros(len(rows), dtype=bool)
    else:
        quality = get_label_quality_scores(given, pred, method=method)
        flagged = find_label_issues(given, pred, n_jobs=1)
    # Worst first; ties by the neighbours' confidence in another label, then by row.
    order = np.lexsort((rows, -pred.max(axis=1), quality))
    out_rows = []
    for rank, r in enumerate(order, start=1):
        winner = int(np.argmax(pred[r]))
        out_rows.append(
            {
                "index": int(rows[r]),
                "label": classes[given[r]],
                "vote": classes[winner] if support[rows[r]] else None,
                "vote_score": float(pred[r, winner]) if support[rows[r]] else 0.0,
                "label_score": float(quality[r]),
                "rank": rank,
                "flagged": bool(flagged[r]),
                "support": int(support[rows[r]]),
            }
        )
    return {
        "field": field,
        "k": k,
        "method": method,
        "classes": classes,
        "labelled": len(rows),
        "flagged": int(flagged.sum()),
        "rows": out_rows,
    }


def review(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    ids: Sequence[Any],
    *,
    k: int = 10,
    method: str = DEFAULT_METHOD,
    link: Callable[[Any], str | None] = lambda task: None,
) -> dict[str, Any]:
    """Label QA of every single-choice field: rows carry the task id (or image) and a link to
    open it. Multi-choice fields (lists of choices) are listed under `skipped_fields`: the
    ranking scores one given label per task against class probabilities."""
    fields: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, field_labels in labels.items():
        if is_multi_choice(field_labels):
            skipped[name] = "multi-choice field (a label is a list of choices): not reviewed"
            continue
        if sum(label is not None for label in field_labels) < 2:
            continue
        ranked = rank_label_issues(vectors, field_labels, field=name, k=k, method=method)
        for row in ranked["rows"]:
            task = ids[row.pop("index")]
            row["task"] = task
            row["link"] = link(task)
        fields[name] = ranked
    if not fields:
        multi = f" (multi-choice, not reviewed: {', '.join(skipped)})" if skipped else ""
        raise ValueError(f"no single-choice field has 2+ labelled tasks{multi}: nothing to review")
    out = {"k": k, "method": method, "tasks": len(ids), "fields": fields}
    if skipped:
        out["skipped_fields"] = skipped
    return out


CSV_COLUMNS = (
    "field",
    "rank",
    "task",
    "label",
    "vote",
    "vote_score",
    "label_score",
    "flagged",
    "support",
    "link",
)


def csv_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per field and task, in rank order (the CSV's content)."""
    return [
        {"field": name, **{c: row[c] for c in CSV_COLUMNS if c != "field"}}
        for name, ranked in result["fields"].items()
        for row in ranked["rows"]
    ]


def write_review(result: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """review.csv (one row per field and task, in rank order) and review.json in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "review.csv", out_dir / "review.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(result))
    json_path.write_text(json.dumps(result, indent=2))
    return csv_path, json_path


def summary(result: Mapping[str, Any], top: int = 5) -> str:
    """The table the CLI prints: per field, flagged count and the most doubtful labels."""
    lines = []
    for name, ranked in result["fields"].items():
        lines.append(
            f"{name}: {ranked['flagged']} of {ranked['labelled']} labels flagged by cleanlab "
            f"({ranked['method']}, k = {ranked['k']})"
        )
        for row in ranked["rows"][:top]:
            lines.append(
                f"  #{row['rank']:<4} {row['task']!s:40} label {row['label']!s:12} "
                f"neighbours vote {row['vote']!s:12} ({row['vote_score']:.2f}) "
                f"label score {row['label_score']:.3f}"
            )
    for name, reason in result.get("skipped_fields", {}).items():
        lines.append(f"{name}: skipped, {reason}")
    return "\n".join(lines)
