"""The vector-store interface: what the backend and the workers may ask of any store.

A store holds, per project, one live collection of task embeddings (the *generation* an alias
points at) with the task's labels as payload. It knows nothing of Label Studio.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

TaskId = int | str
Labels = Mapping[str, str | list[str]]  # a multi-choice field: the list of its choices

# Fixed namespace: point ids must be identical across processes, machines and releases.
_POINT_NAMESPACE = uuid.UUID("6f1c1f7e-3f0a-5b8e-9c4e-ec401abe1000")


class StoreError(RuntimeError):
    """The store refused an operation; the message says what was expected and what was found."""


class StoreUnavailableError(StoreError):
    """The Qdrant server did not answer (down, unreachable, refused): worth retrying later."""


class DimensionMismatchError(StoreError):
    """A vector does not fit the collection's encoder or dimension."""


def point_id(project: int | str, task: TaskId) -> str:
    """Deterministic point id for (project, task): retried upserts overwrite, never duplicate."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{project}/{task}"))


@dataclass(frozen=True)
class CollectionInfo:
    """What a project's live collection was built with."""

    project: int | str
    encoder: str
    dim: int
    weights_id: str
    generation: int
    name: str
    # Pre-annotation state (see backend/preannotate.py): the model_version of the predictions
    # last pushed to Label Studio, and a counter of label changes.
    published_version: str | None = None
    label_state: int = 0
    label_changes: tuple[TaskId, ...] = ()
    vote_radius_min: float = -1.0


@dataclass(frozen=True)
class Annotation:
    """The annotation a task's labels came from; the newest one wins."""

    id: int | str | None = None
    updated_at: str | None = None  # ISO-8601 from Label Studio; compared as text (UTC 'Z' form)


@dataclass
class Point:
    """One task's embedding and payload, as written to the store."""

    task: TaskId
    vector: np.ndarray
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotation: Annotation = field(default_factory=Annotation)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.labels)


@dataclass(frozen=True)
class Neighbour:
    """A labelled point found near a query, with cosine similarity."""

    task: TaskId
    similarity: float
    labels: Mapping[str, str]
    image: str = ""


@runtime_checkable
class VectorStore(Protocol):
    """Operations every store implements; all are scoped to one project."""

    def collection(self, project: int | str) -> CollectionInfo | None:
        """The project's live collection, or None if nothing was stored yet."""

    def ensure_collection(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """Create the project's first generation if missing; refuse a different encoder/dim."""

    def upsert(self, project: int | str, encoder: str, points: Sequence[Point]) -> None:
        """Write points embedded by `encoder` (deterministic ids); newer stored labels are kept."""

    def set_labels(
        self, project: int | str, task: TaskId, labels: Labels, annotation: Annotation
    ) -> bool:
        """Set a task's labels unless a newer annotation is stored; False if no such point."""

    def clear_labels(self, project: int | str, annotation_id: int | str) -> list[TaskId]:
        """Clear labels that came from this annotation; returns the tasks affected."""

    def has_vectors(self, project: int | str, tasks: Sequence[TaskId]) -> set[TaskId]:
        """Which of these tasks already have a vector in the live collection."""

    def vectors(self, project: int | str, tasks: Sequence[TaskId]) -> dict[TaskId, np.ndarray]:
        """Stored vectors of these tasks (missing ones are absent from the result)."""

    def nearest(
        self,
        project: int | str,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[TaskId] = (),
    ) -> list[Neighbour]:
        """The k most similar *labelled* points of the project, best first."""

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        """Number of points (optionally only labelled / unlabelled ones)."""

    def iter_points(
        self, project: int | str, labelled: bool | None = None, with_vectors: bool = True
    ) -> Iterator[Point]:
        """Every point of the project's live collection."""
