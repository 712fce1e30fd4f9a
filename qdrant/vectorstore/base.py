"""The vector-store interface: what the backend and the workers may ask of any store.

A store holds, per project, one live collection of task embeddings (the *generation* an alias
points at) with the task's labels as payload. It knows nothing of Label Studio.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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


def query_rows(vectors: np.ndarray) -> np.ndarray:
    """Search queries as float32 rows (one per query; none: shape (0, 0))."""
    rows = np.asarray(vectors, dtype=np.float32)
    return rows.reshape(len(rows), -1) if rows.size else rows.reshape(0, 0)


@dataclass(frozen=True)
class CollectionInfo:
    """What a project's live collection was built with."""

    project: int | str
    encoder: str
    dim: int
    weights_id: str
    generation: int
    name: str
    # Pre-annotation state (PUSH_STATE_FIELDS; its rules: echolabel/core/push_state.py): the
    # model_version of the predictions last pushed to Label Studio, a counter of label changes
    # and the changed tasks not yet refreshed, and the pushed votes' radii.
    published_version: str | None = None
    label_state: int = 0
    label_changes: tuple[TaskId, ...] = ()
    vote_radius_min: float = -1.0
    # Band edges above vote_radius_min, ascending: the refresh searches each band of recorded
    # radii with its own threshold (`VectorStore.unlabelled_within`).
    vote_radius_edges: tuple[float, ...] = ()
    # The image preprocessing its vectors were made with, as (setting, value) pairs; None for
    # a generation created before it was recorded (see generations.check_preprocessing).
    preprocessing: tuple[tuple[str, str], ...] | None = None


# The pre-annotation state above: the metadata `VectorStore.update_push_state` may write (the
# rest records what the vectors were made with, fixed at creation).
PUSH_STATE_FIELDS = frozenset(
    {"published_version", "label_state", "label_changes", "vote_radius_min", "vote_radius_edges"}
)


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
class IndexStatus:
    """A project's live generation and its HNSW graph (`echolabel build-index`)."""

    project: str
    generation: str
    points: int
    unindexed: int  # points outside the graph: scanned exactly, only slower
    builds: bool  # enough of them for `build_index` to build (exact_max_points)


@dataclass(frozen=True)
class Neighbour:
    """A labelled point found near a query, with cosine similarity."""

    task: TaskId
    similarity: float
    labels: Mapping[str, str]
    image: str = ""


def exclusion_keys(excludes: Sequence[Sequence[TaskId]] | None, rows: int) -> list[set[str]]:
    """Each query row's excluded tasks, as text (so 5 and "5" are one task, as in point ids)."""
    return [{str(t) for t in exclude} for exclude in excludes or [()] * rows]


def drop_excluded(
    found: Sequence[Sequence[Neighbour]], skips: Sequence[set[str]], k: int
) -> list[list[Neighbour]]:
    """The first k of each row's hits that are not excluded: a search asked for k + the number
    excluded, then dropped them, instead of filtering them out in the engine (a must-not-id
    filter slowed Edge's exact search 7x, 20k of 100k x 384)."""
    return [
        [n for n in hits if str(n.task) not in skip][:k]
        for hits, skip in zip(found, skips, strict=True)
    ]


@dataclass(frozen=True)
class NearbyTask:
    """An unlabelled point near a query: a refresh candidate (echolabel/core/preannotate.py).

    `vote_radius` is what `set_vote_radii` recorded for it (a lower bound of its k-th labelled
    neighbour's similarity), None if nothing was recorded.
    """

    task: TaskId
    similarity: float
    vote_radius: float | None = None


@dataclass(frozen=True)
class RadiusBand:
    """Unlabelled points whose recorded vote radius lies in [low, high) (high None: open above;
    both ignored when `unrecorded`: the points without one), searched at least
    `min_similarity` near."""

    low: float
    high: float | None
    min_similarity: float
    unrecorded: bool = False


# Below any recorded radius (a cosine similarity, less a tolerance): the first band's low edge.
_RADIUS_FLOOR = -2.0


def radius_bands(edges: Sequence[float]) -> list[RadiusBand]:
    """The bands `VectorStore.unlabelled_within` searches for these edges."""
    if not edges:
        raise ValueError("radius bands need at least one edge")
    bounds = list(edges)
    bands = [
        RadiusBand(
            low=_RADIUS_FLOOR if i == 0 else bounds[i],
            high=bounds[i + 1] if i + 1 < len(bounds) else None,
            min_similarity=bounds[i],
        )
        for i in range(len(bounds))
    ]
    return [*bands, RadiusBand(_RADIUS_FLOOR, None, bounds[0], unrecorded=True)]


# A recorded vote radius is rounded down to this step: a lower bound still, and points that
# share a value are written in one payload operation.
VOTE_RADIUS_STEP = 1 / 1024
# Exact votes up to this many labelled points per generation, HNSW above (where the graph is
# built): the walk is faster from about 1k labelled 1280-d points on (`python -m bench.edge_ef`);
# the product passes Settings.exact_search_max_points.
DEFAULT_EXACT_MAX_POINTS = 2_000


@runtime_checkable
class VectorStore(Protocol):
    """What the backend, the jobs, the CLI and the bench may ask of a store; nothing else.

    Every operation is scoped to one project. Reads and writes go to the live generation (the
    one the project's alias points at) unless `collection` names a generation being built;
    label writes without `collection` reach the live generation and every one being built, so
    nothing annotated during a re-embedding is lost. `tests/test_store_congruence.py` runs
    every implementation against one reference.
    """

    @property
    def single_writer(self) -> bool:
        """True when only the process that opened the store may write to it (embedded)."""
        ...

    def close(self) -> None:
        """Release the store (the embedded one's file lock, a server's connections)."""

    # -- collections and generations --------------------------------------------------------

    def collection(self, project: int | str) -> CollectionInfo | None:
        """The project's live collection, or None if nothing was stored yet."""

    def ensure_collection(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """Create the project's first generation if missing; refuse a different encoder/dim."""

    def generations(self, project: int | str) -> list[CollectionInfo]:
        """Every generation of the project, live or being built, oldest first."""

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """A new, empty generation that is not live yet (re-embedding builds into it)."""

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        """Make `target` live atomically, then drop the older generations."""

    def drop_generation(self, target: CollectionInfo) -> None:
        """Delete a generation that is not live; refuse the live one."""

    # -- pre-annotation state ---------------------------------------------------------------

    def update_push_state(
        self, project: int | str, change: Callable[[CollectionInfo], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Read, change and write the push's state (PUSH_STATE_FIELDS) of the live generation
        as one step: under the store's guard, `change(live)` gives the values to merge into its
        metadata, which are written (none: nothing) and returned; None, `change` not called,
        when the project has no collection. The rules are the push's
        (echolabel/core/push_state.py); the state lives in the generation because it is valid
        for its vectors only, so a switch starts it afresh."""

    # -- writes -----------------------------------------------------------------------------

    def upsert(
        self,
        project: int | str,
        encoder: str,
        points: Sequence[Point],
        collection: CollectionInfo | None = None,
    ) -> None:
        """Write points embedded by `encoder` (deterministic ids); newer stored labels are kept."""

    def set_labels(
        self,
        project: int | str,
        task: TaskId,
        labels: Labels,
        annotation: Annotation,
        collection: CollectionInfo | None = None,
    ) -> bool:
        """Set a task's labels unless a newer annotation is stored; False if no such point."""

    def clear_labels(self, project: int | str, annotation_id: int | str) -> list[TaskId]:
        """Clear labels that came from this annotation; returns the live tasks affected."""

    # -- reads ------------------------------------------------------------------------------

    def has_vectors(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        collection: CollectionInfo | None = None,
    ) -> set[TaskId]:
        """Which of these tasks already have a vector."""

    def vectors(self, project: int | str, tasks: Sequence[TaskId]) -> dict[TaskId, np.ndarray]:
        """Stored vectors of these tasks (missing ones are absent from the result)."""

    def points(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> dict[TaskId, Point]:
        """Stored points (vector and payload) of these tasks; missing ones are absent."""

    def iter_points(
        self,
        project: int | str,
        labelled: bool | None = None,
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> Iterator[Point]:
        """Every point (optionally only labelled / unlabelled ones)."""

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        """Number of points (optionally only labelled / unlabelled ones)."""

    def nearest(
        self,
        project: int | str,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[TaskId] = (),
    ) -> list[Neighbour]:
        """The k most similar *labelled* points, best first, never one of `exclude`."""

    def nearest_batch(
        self,
        project: int | str,
        vectors: np.ndarray,
        k: int,
        excludes: Sequence[Sequence[TaskId]] | None = None,
    ) -> list[list[Neighbour]]:
        """`nearest` for each row of `vectors` (with `excludes[row]`) in one batched search;
        each row's answer is the one `nearest` gives it alone."""

    def unlabelled_within(
        self, project: int | str, vectors: np.ndarray, edges: Sequence[float]
    ) -> list[list[NearbyTask]]:
        """For each row of `vectors`, every unlabelled point a label there may reach the top k
        of, best first, with its recorded vote radius: one whose radius lies in band i,
        [edges[i], edges[i+1]) (the first band open below, the last above), at least edges[i]
        near; one without a recorded radius at least edges[0] near. `edges` ascend; `(s,)`:
        all at least s near. One batched search for all rows."""

    def set_vote_radii(self, project: int | str, radii: Mapping[TaskId, float]) -> None:
        """Record these tasks' vote radii in the live generation, rounded down to
        VOTE_RADIUS_STEP; tasks without a point are skipped."""

    def index_due(self, project: int | str) -> bool:
        """Whether the labels added since the project's vote index was last built are enough
        for `build_index` to pay; always False where the engine indexes by itself (a server)."""

    def build_index(self, project: int | str) -> bool:
        """Build the vote index of what waits outside it; True if anything was built. The
        embedded engine blocks its process meanwhile: call it from a job, never a request."""

    def index_status(self) -> list[IndexStatus] | None:
        """Every project's live generation and how many of its points wait outside the graph
        `build_index` builds; None where the engine indexes by itself (a server)."""
