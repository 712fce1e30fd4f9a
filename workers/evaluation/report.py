"""The evaluation report: the papers' label-match metrics per field and encoder, as
`report.json` (a contract other tools read), its headline table, and (rendered by
`report_html`) a self-contained `report.html` with plots."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.vote import is_multi_choice
from workers.review.duplicates import near_duplicate_pairs

from .learning_curve import learning_curve
from .metrics import (
    choose_k,
    label_match,
    leave_one_out_neighbours,
    precision_at_k,
    vote_metrics,
)
from .pixels import pixel_metrics
from .report_html import format_score, render_html

SCHEMA_VERSION = 1

# The metrics here (same label in the top k, P@k, the vote's accuracy and confusion) compare
# one label per image; a multi-choice field's label is a set of choices.
MULTI_CHOICE_SKIPPED = (
    "multi-choice field (a label is a list of choices): the evaluation's metrics are "
    "single-label; not evaluated"
)


def evaluate_vectors(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    *,
    groups: Sequence[str | None] | None = None,
    k: int = 10,
    min_class_size: int = 20,
    min_neighbours: int = 3,
    min_score: float = 0.5,
    thumbnails: np.ndarray | None = None,
    k_candidates: Sequence[int] = (),
    near_duplicate_threshold: float | None = None,
    near_duplicates_by: np.ndarray | None = None,
    learning_curve_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Every metric for one encoder's vectors, per label field (leave-one-out; with `groups`,
    leave-patient-out too); with `thumbnails`, pixel metrics of the retrieved sets; with
    `k_candidates`, the k that a validation split prefers (`choose_k`). With
    `near_duplicate_threshold`, a query's near-duplicates (cosine ≥ it, between the rows of
    `near_duplicates_by` when given: a centred encoder's base vectors) are never its
    neighbours; with `learning_curve_seeds`, an annotation session is replayed per seed
    (`learning_curve`).

    Multi-choice fields (lists of choices) are not evaluated: they are listed under
    `skipped_fields` with the reason."""
    skipped = {name: MULTI_CHOICE_SKIPPED for name, ls in labels.items() if is_multi_choice(ls)}
    labels = {name: ls for name, ls in labels.items() if name not in skipped}
    if not labels:
        raise ValueError(
            f"nothing to evaluate: every field ({', '.join(sorted(skipped))}) is multi-choice, "
            "and the evaluation's metrics are single-label"
        )
    views = {"leave_one_out": None}
    if groups is not None and any(g is not None for g in groups):
        views["leave_patient_out"] = groups
    out: dict[str, Any] = {}
    for view, view_groups in views.items():
        retrieve = max([k, *k_candidates])
        all_indices, all_sims = leave_one_out_neighbours(
            vectors,
            retrieve,
            groups=view_groups,
            exclude_above=near_duplicate_threshold,
            exclude_by=near_duplicates_by,
        )
        indices, sims = all_indices[:, :k], all_sims[:, :k]
        if thumbnails is not None:
            out.setdefault("pixels", {})[view] = pixel_metrics(thumbnails, indices)
        fields: dict[str, Any] = {}
        for name, field_labels in labels.items():
            match = label_match(field_labels, indices, k=k, min_class_size=min_class_size)
            precision = precision_at_k(field_labels, indices)
            votes = vote_metrics(
                field_labels,
                indices,
                sims,
                field=name,
                k=k,
                min_neighbours=min_neighbours,
                min_score=min_score,
            )
            classes = {
                cls: {**stats, "precision_at_k": precision["per_class"].get(cls, {})}
                for cls, stats in match["per_class"].items()
            }
            if k_candidates:
                votes["choose_k"] = choose_k(
                    field_labels,
                    all_indices,
                    all_sims,
                    k_candidates,
                    field=name,
                    groups=view_groups,
                )
            fields[name] = {
                **{key: value for key, value in match.items() if key != "per_class"},
                "classes": classes,
                "precision_at_k": {"micro": precision["micro"], "macro": precision["macro"]},
                "vote": votes,
            }
        out[view] = fields
    # The contract's `fields` is the leave-patient-out view when patients are known.
    out["fields"] = out.get("leave_patient_out", out["leave_one_out"])
    if skipped:
        out["skipped_fields"] = skipped
    if near_duplicate_threshold is not None:
        out["near_duplicates_excluded"] = {
            "threshold": near_duplicate_threshold,
            "pairs": len(
                near_duplicate_pairs(
                    vectors if near_duplicates_by is None else near_duplicates_by,
                    near_duplicate_threshold,
                    k,
                )
            ),
        }
    if learning_curve_seeds:
        out["learning_curve"] = learning_curve(
            vectors,
            labels,
            seeds=learning_curve_seeds,
            k=k,
            min_neighbours=min_neighbours,
            min_score=min_score,
            exclude_above=near_duplicate_threshold,
            exclude_by=near_duplicates_by,
        )
    return out


def new_report(
    *,
    command: str,
    k: int,
    min_neighbours: int,
    min_score: float,
    min_class_size: int,
    dataset: Mapping[str, Any],
) -> dict[str, Any]:
    """The report's header; encoders are added under `encoders` as they are measured."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "k": k,
        "settings": {
            "min_neighbours": min_neighbours,
            "min_score": min_score,
            "min_class_size": min_class_size,
        },
        "dataset": dict(dataset),
        "encoders": {},
    }


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into out_dir; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_plain))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report))
    return json_path, html_path


def headline(report: Mapping[str, Any]) -> str:
    """The table the CLI prints: per field and encoder, the papers' headline numbers."""
    rows = [
        f"{'field':12} {'encoder':20} {'same@10':>8} {'random':>7} {'P@1 mi':>7} "
        f"{'P@10 ma':>8} {'vote acc':>8} {'coverage':>8}"
    ]
    for encoder, result in report["encoders"].items():
        for name, f in result["fields"].items():
            vote = f["vote"]
            rows.append(
                f"{name:12} {encoder:20} {f['weighted_same_in_top10']:8.2f} "
                f"{f['weighted_random_expectation']:7.2f} {f['precision_at_k']['micro']['1']:7.3f} "
                f"{f['precision_at_k']['macro']['10']:8.3f} {format_score(vote['accuracy']):>8} "
                f"{vote['coverage']:8.2f}"
            )
    for encoder, result in report["encoders"].items():
        for name, reason in result.get("skipped_fields", {}).items():
            rows.append(f"{name:12} {encoder:20} skipped: {reason}")
        if result.get("centred_on"):
            rows.append(
                f"{encoder}: centred on the {result['centred_on']} images, as the backend "
                "centres a pretrained encoder (ECHOLABEL_AUTO_CENTRE=0: not)"
            )
    held_out = report["dataset"].get("held_out")
    if held_out:
        rows.append(
            f"trained encoder(s) {', '.join(held_out['trained_encoders'])}: evaluated on "
            f"held-out images only ({held_out['excluded_training_images']} training images "
            "left out as queries and neighbours, for every encoder)"
        )
    return "\n".join(rows)


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
