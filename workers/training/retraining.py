"""One round of the self-improving loop: train a challenger on the project's labels, score it
against the live encoder the way the product votes, and decide.

The round never switches encoders itself: promotion is a zero-downtime re-embedding followed
by a refresh of pushed predictions, which the job layer runs (they are jobs of their own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.embedding import Embedder, TaskImage
from echolabel.images import ImageFetcher
from echolabel.vote import is_multi_choice
from vectorstore import Point, VectorStore
from workers.evaluation.held_out import trained_on
from workers.training.options import TrainOptions
from workers.training.samples import Sample, TrainingRefused
from workers.training.selection import (
    Candidate,
    RetrainPolicy,
    SelectionLog,
    challenge_split,
    compare,
    held_out_scores,
    retraining_due,
)
from workers.training.trainer import train_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundInputs:
    """What a round reads: the live generation's labelled points and their samples."""

    champion: str
    points: list[Point]
    samples: list[Sample]
    fields: list[str]


def round_inputs(
    store: VectorStore, project: int | str, fields: Sequence[str], patient_key: str | None
) -> RoundInputs:
    """The labelled points (with the champion's vectors) of the project's live generation."""
    info = store.collection(project)
    if info is None:
        raise TrainingRefused(f"project {project} has no collection: index it first")
    points = list(store.iter_points(project, labelled=True, with_vectors=True))
    samples = [
        Sample(
            id=str(p.task),
            ref=p.image,
            labels=dict(p.labels),
            group=str(p.extra[patient_key]) if patient_key and patient_key in p.extra else None,
        )
        for p in points
    ]
    if not fields:
        found = sorted({name for s in samples for name in s.labels})
        fields = [f for f in found if not is_multi_choice(s.labels.get(f) for s in samples)]
    return RoundInputs(info.encoder, points, samples, list(fields))


def run_round(
    *,
    store: VectorStore,
    embedder: Embedder,
    fetcher: ImageFetcher,
    encoders_dir: Path,
    selection: SelectionLog,
    project: int | str,
    policy: RetrainPolicy,
    options: TrainOptions,
    fields: Sequence[str] = (),
    patient_key: str | None = None,
    relabel: Callable[[list[Sample]], list[Sample]] | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> Candidate:
    """Train, score and decide one challenger; the decision is recorded unless it is
    "promoted", which the caller records once the re-embedding is live.

    `relabel` changes the labels the challenger trains on (tests build a worse challenger
    with shuffled labels); scoring always uses the true labels."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    inputs = round_inputs(store, project, fields, patient_key)

    def record(decision: str, reason: str, **extra: Any) -> Candidate:
        candidate = Candidate(
            challenger=extra.pop("challenger", None),
            champion=inputs.champion,
            labelled=len(inputs.samples),
            started_at=started,
            decision=decision,
            reason=reason,
            **extra,
        )
        if decision != "promoted":
            selection.record(project, candidate)
        log.info("retraining round", extra={"project": str(project), "decision": decision})
        return candidate

    due = retraining_due(
        inputs.samples, inputs.fields, selection.labelled_at_last_decision(project), policy
    )
    if not due.due:
        return record("refused", due.reason)
    champion_saw = _champion_training_ids(inputs.champion, encoders_dir, project)
    try:
        train, validation = challenge_split(inputs.samples, inputs.fields, policy, champion_saw)
    except TrainingRefused as exc:
        return record("refused", str(exc))

    clock = time.monotonic()
    try:
        summary = train_encoder(
            relabel(train) if relabel else train,
            inputs.fields,
            fetcher=fetcher,
            encoders_dir=encoders_dir,
            name=f"project-{project}",
            options=options,
            source={
                "kind": "project",
                "project": str(project),
                "encoder": inputs.champion,
                "held_out": len(validation),
                "retraining_round": True,
            },
            on_progress=on_progress or (lambda progress: None),
        )
    except TrainingRefused as exc:
        # The trainer's guard-rail counts the training part only, after the hold-out: a class
        # just past `min_per_class` passes `retraining_due` and fails here. A refusal, not a
        # failure: the next round waits for more labels.
        return record("refused", str(exc).splitlines()[0])
    train_seconds = time.monotonic() - clock
    challenger = summary["encoder"]

    clock = time.monotonic()
    embedded = embedder.embed_tasks(
        challenger, [TaskImage(task=p.task, image=p.image) for p in inputs.points], fetcher.load
    )
    challenger_vectors = {p.task: p.vector for p in embedded.points}
    # An image that no longer loads leaves both sides, so both are scored on the same images.
    rows = [i for i, p in enumerate(inputs.points) if p.task in challenger_vectors]
    samples = [inputs.samples[i] for i in rows]
    held = {s.id for s in validation}
    queries = [row for row, s in enumerate(samples) if s.id in held]
    champion_matrix = np.stack([inputs.points[i].vector for i in rows])
    challenger_matrix = np.stack([challenger_vectors[inputs.points[i].task] for i in rows])
    champion_scores = held_out_scores(champion_matrix, samples, inputs.fields, queries, policy)
    challenger_scores = held_out_scores(challenger_matrix, samples, inputs.fields, queries, policy)
    comparison = compare(
        champion_scores, challenger_scores, [samples[q].group for q in queries], policy
    )
    score_seconds = time.monotonic() - clock
    reason = comparison.explain()
    return record(
        "promoted" if comparison.challenger_wins else "kept",
        reason,
        challenger=challenger,
        comparison=comparison.as_dict(),
        train_seconds=round(train_seconds, 1),
        score_seconds=round(score_seconds, 1),
        details={"trained_on": len(train), "image_failures": len(embedded.failures)},
    )


def _champion_training_ids(champion: str, encoders_dir: Path, project: int | str) -> frozenset[str]:
    """Task ids of this project the champion was trained on (none for a pretrained encoder)."""
    seen = trained_on([champion], encoders_dir).get(champion)
    if seen is None or seen.source.get("project") != str(project):
        return frozenset()
    return seen.ids
