"""A point's payload and the rules for merging labels into it, the same for every engine.

Both engines (qdrant-client and Qdrant Edge) store the same payload; only the `labelled` flag
differs in type (see `EdgeStore`), so the builders here take how the engine writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from .base import VOTE_RADIUS_STEP, Annotation, Labels, NearbyTask, Neighbour, Point, TaskId

# The label part of a payload: replaced together, never key by key.
LABEL_KEYS = ("labels", "labelled", "annotation_id", "annotation_updated_at")
# The push's record of an unlabelled point's vote radius: valid only in its generation.
VOTE_RADIUS = "vote_radius"
RESERVED = frozenset({"project", "task", "image", "encoder", VOTE_RADIUS, *LABEL_KEYS})

# How an engine stores the `labelled` flag: qdrant-client a bool, Edge the integer 0/1.
Flag = Callable[[bool], object]


class Record(Protocol):
    """A stored point as either engine returns it (qdrant-client's Record, Edge's Record)."""

    id: Any
    payload: Any
    vector: Any


class Scored(Record, Protocol):
    """A search hit: a record with its cosine similarity."""

    score: float


def key(value: int | str | None) -> str | None:
    """Annotation ids are stored as text so one keyword index serves int and str ids."""
    return None if value is None else str(value)


def is_newer(stored: str | None, incoming: str | None) -> bool:
    """True when the stored annotation time is strictly newer than the incoming one."""
    return bool(stored and incoming and stored > incoming)


def is_labelled(payload: Mapping[str, Any] | None) -> bool:
    """Whether a stored payload is labelled, whichever type the engine stores the flag as."""
    return bool(payload and payload.get("labelled"))


def replaces(point: Point, previous: Mapping[str, Any]) -> bool:
    """Whether a freshly written point's labels should replace the stored ones."""
    if not point.labelled:
        return False
    stored_time = previous.get("annotation_updated_at")
    return not is_newer(
        stored_time if isinstance(stored_time, str) else None, point.annotation.updated_at
    )


def point_payload(
    project: int | str,
    encoder: str,
    point: Point,
    previous: Mapping[str, Any] | None,
    flag: Flag,
) -> dict[str, Any]:
    """The payload to write for `point`; labels stored from a newer annotation are kept."""
    payload: dict[str, Any] = dict(point.extra)
    payload.update(
        {
            "project": str(project),
            "task": point.task,
            "image": point.image,
            "encoder": encoder,
            **label_payload(point.labels, point.annotation, flag),
        }
    )
    if previous and is_labelled(previous) and not replaces(point, previous):
        for name in LABEL_KEYS:
            payload[name] = previous.get(name)
    return payload


def label_payload(labels: Labels, annotation: Annotation, flag: Flag) -> dict[str, Any]:
    """The label part of a payload for these labels from this annotation (empty: cleared)."""
    return {
        "labels": dict(labels),
        "labelled": flag(bool(labels)),
        "annotation_id": key(annotation.id),
        "annotation_updated_at": annotation.updated_at,
    }


def vector_of(record: Record) -> list[float]:
    """A record's vector ([] when read without vectors). Edge returns a point that also holds
    the vote's copy (`EdgeStore`'s labelled vector) as {name: vector}; the task's own vector
    is the default one, named ""."""
    vector = record.vector
    if isinstance(vector, dict):
        vector = vector.get("")
    return vector if isinstance(vector, list) else []


def to_point(record: Record) -> Point:
    """A stored record as the Point that was written."""
    payload = dict(record.payload or {})
    return Point(
        task=payload["task"],
        vector=np.asarray(vector_of(record), dtype=np.float32),
        image=str(payload.get("image", "")),
        labels=dict(payload.get("labels") or {}),
        annotation=Annotation(payload.get("annotation_id"), payload.get("annotation_updated_at")),
        extra={k: v for k, v in payload.items() if k not in RESERVED},
    )


def to_neighbour(hit: Scored) -> Neighbour:
    """A search hit as a Neighbour (its payload must hold the task, labels and image)."""
    payload = hit.payload or {}
    return Neighbour(
        task=payload["task"],
        similarity=float(hit.score),
        labels=payload.get("labels") or {},
        image=payload.get("image", ""),
    )


def to_nearby_task(hit: Scored) -> NearbyTask:
    """A search hit as `unlabelled_within` answers it."""
    payload = hit.payload or {}
    radius = payload.get(VOTE_RADIUS)
    return NearbyTask(
        task=payload["task"],
        similarity=float(hit.score),
        vote_radius=None if radius is None else float(radius),
    )


def vote_radius_groups(
    ids: Mapping[TaskId, Any], radii: Mapping[TaskId, float]
) -> list[tuple[list[Any], dict[str, float]]]:
    """(point ids, payload) per recorded value: each radius rounded down to VOTE_RADIUS_STEP,
    so one payload write covers every point that shares it. `ids`: task -> point id."""
    groups: dict[float, list[Any]] = {}
    for task, radius in radii.items():
        if task in ids:
            value = math.floor(float(radius) / VOTE_RADIUS_STEP) * VOTE_RADIUS_STEP
            groups.setdefault(value, []).append(ids[task])
    return [(points, {VOTE_RADIUS: value}) for value, points in groups.items()]
