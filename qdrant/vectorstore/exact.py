"""Exact nearest-neighbour search over a project's labelled vectors, kept in memory.

qdrant-client's in-process mode answers every query by a Python-level scan; for the small
labelled sets a project starts with, one NumPy matmul (or a scipy cKDTree) over a cached matrix
is much faster and gives the same neighbours. `echolabel bench --only search` measures both.

The cache is only valid while this process is the store's sole writer, which is exactly the
embedded deployment (the in-process Qdrant holds a file lock). With a Qdrant server, other
processes write too, so `open_store` does not wrap a server store in this class.

`ExactSearchStore` is a cache in front of another `VectorStore`, not a subclass of
`QdrantStore`: it answers `nearest` and `nearest_batch` itself and spells out every other
operation as an explicit call to the store behind it. It needs nothing from that store but the
protocol, so it can sit in front of any single-writer store (qdrant-client's local mode today,
an embedded engine tomorrow), and a method added to the protocol has to be written here, where
one decides whether the cache must follow it, instead of slipping past it unseen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree

from .base import (
    Annotation,
    CollectionInfo,
    IndexStatus,
    Labels,
    NearbyTask,
    Neighbour,
    Point,
    TaskId,
    VectorStore,
    drop_excluded,
    exclusion_keys,
    query_rows,
)

Method = Literal["matmul", "kdtree"]


class ExactIndex:
    """Exact cosine top-k over L2-normalised rows, by matmul or by KD-tree.

    On unit vectors Euclidean order equals cosine order (|a-b|² = 2 - 2·cos), so the KD-tree
    answers the same question; similarity is recovered as 1 - d²/2.
    """

    def __init__(self, vectors: np.ndarray, method: Method = "matmul") -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.method = method
        self._tree = cKDTree(self.vectors) if method == "kdtree" and len(self.vectors) else None

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, cosine similarities) of the k nearest rows, best first."""
        rows, sims = self.search_batch(np.reshape(query, (1, -1)), k)
        return rows[0], sims[0]

    def search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` for every query row at once (one matmul): arrays of shape (queries, k)."""
        queries = query_rows(queries)
        k = min(k, len(self.vectors))
        if k <= 0:
            empty = (len(queries), 0)
            return np.empty(empty, dtype=np.int64), np.empty(empty, dtype=np.float32)
        if self._tree is not None:
            distances, rows = self._tree.query(queries, k=k)
            rows = np.asarray(rows, dtype=np.int64).reshape(len(queries), k)
            sims = 1.0 - np.square(np.asarray(distances).reshape(len(queries), k)) / 2.0
            return rows, sims.astype(np.float32)
        sims = queries @ self.vectors.T
        if k < sims.shape[1]:
            rows = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            rows = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
        top = np.take_along_axis(sims, rows, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        best = np.take_along_axis(rows, order, axis=1).astype(np.int64)
        return best, np.take_along_axis(top, order, axis=1)


@dataclass
class _LabelledSet:
    tasks: list[TaskId]
    points: dict[TaskId, Point]
    index: ExactIndex | None = None


class ExactSearchStore:
    """A VectorStore whose `nearest` answers from an in-memory exact index while small.

    Every write goes to the store behind it first; the affected points are then read back from
    it, so the cache never holds anything that store does not (one source of truth for merge
    rules). Writes into a generation being built leave the cache alone (it holds the live one).
    """

    def __init__(self, inner: VectorStore, max_points: int, method: Method = "matmul") -> None:
        self.inner = inner
        self.max_points = max_points
        self.method = method
        self._cache: dict[str, _LabelledSet] = {}
        self._lock = threading.RLock()

    @property
    def single_writer(self) -> bool:
        """The store behind the cache's answer (the cache itself needs it to be True)."""
        return self.inner.single_writer

    def close(self) -> None:
        """Close the store behind the cache."""
        self.inner.close()

    # -- collections and generations: the live one changes only on a switch -------------------

    def collection(self, project: int | str) -> CollectionInfo | None:
        """The project's live collection, or None if nothing was stored yet."""
        return self.inner.collection(project)

    def ensure_collection(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """Create the project's first generation if missing; refuse a different encoder/dim."""
        return self.inner.ensure_collection(project, encoder, dim, weights_id)

    def generations(self, project: int | str) -> list[CollectionInfo]:
        """Every generation of the project, live or being built, oldest first."""
        return self.inner.generations(project)

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """A new, empty generation that is not live yet."""
        return self.inner.create_generation(project, encoder, dim, weights_id)

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        """Make `target` live, then forget the cached labelled set of the old generation."""
        self.inner.switch_generation(project, target)
        self.invalidate(project)

    def drop_generation(self, target: CollectionInfo) -> None:
        """Delete a generation that is not live (the cache holds only the live one)."""
        self.inner.drop_generation(target)

    def invalidate(self, project: int | str) -> None:
        """Forget the project's cached labelled set; the next search reloads it."""
        with self._lock:
            self._cache.pop(str(project), None)

    # -- pre-annotation state: metadata only, nothing cached ----------------------------------

    def update_push_state(
        self, project: int | str, change: Callable[[CollectionInfo], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Read, change and write the push's state of the live generation as one step."""
        return self.inner.update_push_state(project, change)

    # -- writes keep the cache in step --------------------------------------------------------

    def upsert(
        self,
        project: int | str,
        encoder: str,
        points: Sequence[Point],
        collection: CollectionInfo | None = None,
    ) -> None:
        """Write points, then refresh the cached ones (live generation only)."""
        self.inner.upsert(project, encoder, points, collection=collection)
        if collection is None:
            self._refresh(project, [p.task for p in points])

    def set_labels(
        self,
        project: int | str,
        task: TaskId,
        labels: Labels,
        annotation: Annotation,
        collection: CollectionInfo | None = None,
    ) -> bool:
        """Set a task's labels unless a newer annotation is stored, then refresh the cache."""
        found = self.inner.set_labels(project, task, labels, annotation, collection=collection)
        if found and collection is None:
            self._refresh(project, [task])
        return found

    def clear_labels(self, project: int | str, annotation_id: int | str) -> list[TaskId]:
        """Clear labels that came from this annotation, then drop them from the cache."""
        tasks = self.inner.clear_labels(project, annotation_id)
        self._refresh(project, tasks)
        return tasks

    def _refresh(self, project: int | str, tasks: Sequence[TaskId]) -> None:
        with self._lock:
            cached = self._cache.get(str(project))
            if cached is None or not tasks:
                return
            fresh = self.inner.points(project, tasks)
            changed = False
            for task in tasks:
                point = fresh.get(task)
                if point is not None and point.labelled:
                    cached.points[task] = point
                    changed = True
                elif cached.points.pop(task, None) is not None:
                    changed = True
            if changed:  # embedding unlabelled tasks must not throw the matrix away
                cached.tasks = list(cached.points)
                cached.index = None

    # -- reads: searches from the cache, the rest from the store behind it --------------------

    def has_vectors(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        collection: CollectionInfo | None = None,
    ) -> set[TaskId]:
        """Which of these tasks already have a vector."""
        return self.inner.has_vectors(project, tasks, collection=collection)

    def vectors(self, project: int | str, tasks: Sequence[TaskId]) -> dict[TaskId, np.ndarray]:
        """Stored vectors of these tasks (missing ones are absent from the result)."""
        return self.inner.vectors(project, tasks)

    def points(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> dict[TaskId, Point]:
        """Stored points (vector and payload) of these tasks; missing ones are absent."""
        return self.inner.points(project, tasks, with_vectors, collection=collection)

    def iter_points(
        self,
        project: int | str,
        labelled: bool | None = None,
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> Iterator[Point]:
        """Every point (optionally only labelled / unlabelled ones)."""
        return self.inner.iter_points(project, labelled, with_vectors, collection=collection)

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        """Number of points (optionally only labelled / unlabelled ones)."""
        return self.inner.count(project, labelled)

    def unlabelled_within(
        self, project: int | str, vectors: np.ndarray, edges: Sequence[float]
    ) -> list[list[NearbyTask]]:
        """Unlabelled points: not cached (the cache holds labelled ones only)."""
        return self.inner.unlabelled_within(project, vectors, edges)

    def set_vote_radii(self, project: int | str, radii: Mapping[TaskId, float]) -> None:
        """Recorded on unlabelled points, which the cache does not hold."""
        self.inner.set_vote_radii(project, radii)

    def index_due(self, project: int | str) -> bool:
        return self.inner.index_due(project)

    def build_index(self, project: int | str) -> bool:
        return self.inner.build_index(project)

    def index_status(self) -> list[IndexStatus] | None:
        return self.inner.index_status()

    def nearest(
        self,
        project: int | str,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[TaskId] = (),
    ) -> list[Neighbour]:
        """The k most similar labelled points: exact from the cache, or the store's above it."""
        return self.nearest_batch(project, np.reshape(vector, (1, -1)), k, [exclude])[0]

    def nearest_batch(
        self,
        project: int | str,
        vectors: np.ndarray,
        k: int,
        excludes: Sequence[Sequence[TaskId]] | None = None,
    ) -> list[list[Neighbour]]:
        """`nearest` for every row: one matmul over the cache, or the store's batched search
        above it."""
        queries = query_rows(vectors)
        if k <= 0 or not len(queries):
            return [[] for _ in range(len(queries))]
        with self._lock:
            labelled = self._labelled_set(project)
            if labelled is None:
                return self.inner.nearest_batch(project, queries, k, excludes)
            index, tasks, points = self._index(labelled), labelled.tasks, labelled.points
        skips = exclusion_keys(excludes, len(queries))
        rows, sims = index.search_batch(queries, k + max(map(len, skips)))
        found = [
            [
                Neighbour(
                    task=tasks[row],
                    similarity=float(sim),
                    labels=points[tasks[row]].labels,
                    image=points[tasks[row]].image,
                )
                for row, sim in zip(row_ids, row_sims, strict=True)
            ]
            for row_ids, row_sims in zip(rows, sims, strict=True)
        ]
        return drop_excluded(found, skips, k)

    def _index(self, labelled: _LabelledSet) -> ExactIndex:
        """The labelled set's index, built on first use after a change."""
        if labelled.index is None:
            matrix = (
                np.stack([labelled.points[t].vector for t in labelled.tasks])
                if labelled.tasks
                else np.empty((0, 0), dtype=np.float32)
            )
            labelled.index = ExactIndex(matrix, self.method)
        return labelled.index

    def _labelled_set(self, project: int | str) -> _LabelledSet | None:
        """The cached labelled set, loading it once; None when too big to serve exactly."""
        key = str(project)
        cached = self._cache.get(key)
        if cached is None:
            if self.inner.count(project, labelled=True) > self.max_points:
                return None
            points = {p.task: p for p in self.inner.iter_points(project, labelled=True)}
            cached = self._cache[key] = _LabelledSet(tasks=list(points), points=points)
        if len(cached.tasks) > self.max_points:
            self._cache.pop(key, None)
            return None
        return cached
