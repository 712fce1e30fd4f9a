"""What a store over a Qdrant engine does the same on every engine, written once.

`QdrantStore` (qdrant-client: a server, or its in-process stand-in) and `EdgeStore` (Qdrant
Edge) differ in how they call their engine, not in their rules: the newest annotation wins,
labels reach the live generation and every one being built, point ids are deterministic, the
live generation refuses another encoder. `EngineStore` holds those rules and the reads by
task; an engine supplies the few primitives declared at the top of the class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from . import payload as pl
from .base import (
    PUSH_STATE_FIELDS,
    Annotation,
    CollectionInfo,
    DimensionMismatchError,
    IndexStatus,
    Labels,
    NearbyTask,
    Neighbour,
    Point,
    RadiusBand,
    StoreError,
    TaskId,
    drop_excluded,
    exclusion_keys,
    point_id,
    query_rows,
    radius_bands,
)
from .generations import Preprocessing, alias_name, check_encoder, check_preprocessing

# Unlabelled points a band search returns at first (a larger limit costs the engine time even
# when unfilled); a band that fills it is asked again for 4x more.
_FIRST_LIMIT = 512

BandSearch = tuple[int, RadiusBand]  # (row index, band) of one band search


class EngineStore:
    """The shared half of a VectorStore; subclasses implement the engine's primitives."""

    # Held around every engine call and read-modify-write (a lock in-process).
    _guard: AbstractContextManager[Any]
    _prefix: str
    # What this process embeds with, recorded in new generations and checked on every write
    # (None: not told, nothing checked).
    _preprocessing: Preprocessing | None = None
    # How the engine stores the `labelled` flag (see payload.Flag).
    _flag: pl.Flag = staticmethod(bool)

    # -- the engine's primitives ------------------------------------------------------------

    def _live(self, project: int | str) -> CollectionInfo | None:
        """The project's live generation (what `collection` answers)."""
        raise NotImplementedError

    def _update_meta(self, name: str, values: dict[str, Any]) -> None:
        """Merge `values` into the generation's metadata (durably, atomically)."""
        raise NotImplementedError

    def generations(self, project: int | str) -> list[CollectionInfo]:
        raise NotImplementedError

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        raise NotImplementedError

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        raise NotImplementedError

    def _fetch(self, name: str, ids: list[str], with_vectors: bool) -> list[pl.Record]:
        """The stored records (with payload) of these point ids; missing ones are absent."""
        raise NotImplementedError

    def _write(self, name: str, rows: list[tuple[str, np.ndarray, dict[str, Any]]]) -> None:
        """Upsert (id, vector, payload) rows; returns once they are durable."""
        raise NotImplementedError

    def _set_payload(self, name: str, ids: list[Any], values: dict[str, Any]) -> None:
        """Overwrite these payload keys of these points."""
        raise NotImplementedError

    def _set_label_payload(self, name: str, ids: list[Any], values: dict[str, Any]) -> None:
        """`_set_payload` of a label part (pl.label_payload): an engine that keeps labelled
        points apart (EdgeStore's vote vector) moves them in the same write."""
        self._set_payload(name, ids, values)

    def _set_payloads(self, name: str, writes: list[tuple[list[Any], dict[str, Any]]]) -> None:
        """Several `_set_payload`s; an engine may send them as one request."""
        for ids, values in writes:
            self._set_payload(name, ids, values)

    def _with_annotation(self, name: str, annotation: str) -> list[pl.Record]:
        """Every record (payload, no vector) whose labels came from this annotation."""
        raise NotImplementedError

    def _labelled_changed(self, name: str, delta: int) -> None:
        """The generation now holds `delta` more labelled points (an engine may keep count)."""

    def _search_batch(
        self, info: CollectionInfo, rows: np.ndarray, limits: Sequence[int], exact: bool
    ) -> list[list[Neighbour]]:
        """The `limits[i]` nearest labelled points of each row, best first, in one request per
        row sent together; called with the store's guard held."""
        raise NotImplementedError

    def _search_unlabelled(
        self, info: CollectionInfo, rows: np.ndarray, searches: Sequence[BandSearch], limit: int
    ) -> list[list[NearbyTask]]:
        """Per (row index, band), at most `limit` of the band's unlabelled points at least its
        `min_similarity` near `rows[index]`, best first, in one request each sent together (in
        this order: a band's requests adjacent); the guard is held. The rows come once, so an
        engine converts each vector once, not once per band."""
        raise NotImplementedError

    # -- collections --------------------------------------------------------------------------

    def collection(self, project: int | str) -> CollectionInfo | None:
        """The project's live collection, or None if nothing was stored yet.

        The store's own operations call `_live` instead: this method is what callers read."""
        return self._live(project)

    def alias(self, project: int | str) -> str:
        return alias_name(self._prefix, project)

    def _next_generation(self, project: int | str) -> tuple[int, str]:
        """The number and name of the project's next generation."""
        existing = self.generations(project)
        generation = (existing[-1].generation + 1) if existing else 1
        return generation, f"{self.alias(project)}_g{generation}"

    def ensure_collection(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """Create the project's first generation if missing; refuse a different encoder/dim."""
        with self._guard:
            info = self._live(project)
            if info is None:
                info = self.create_generation(project, encoder, dim, weights_id)
                self.switch_generation(project, info)
            else:
                check_encoder(info, encoder, dim)
                check_preprocessing(info, self._preprocessing)
            return info

    def update_push_state(
        self, project: int | str, change: Callable[[CollectionInfo], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Merge `change(live)` into the live generation's metadata under the guard, so the
        read and the write see one generation (see the protocol); the values written."""
        with self._guard:
            info = self._live(project)
            if info is None:
                return None
            values = change(info)
            foreign = sorted(set(values) - PUSH_STATE_FIELDS)
            if foreign:
                raise StoreError(
                    f"{foreign} is not the push's state ({sorted(PUSH_STATE_FIELDS)}): a "
                    "generation's other metadata is fixed when it is created"
                )
            if values:
                self._update_meta(info.name, values)
            return values

    # -- writes ------------------------------------------------------------------------------

    def upsert(
        self,
        project: int | str,
        encoder: str,
        points: Sequence[Point],
        collection: CollectionInfo | None = None,
    ) -> None:
        """Write points into the live collection (or into `collection`, a generation being built).

        Labels stored from a newer annotation survive a re-upsert of the same task; of one task
        written twice in `points`, the last wins.
        """
        if not points:
            return
        with self._guard:
            info = collection or self._live(project)
            if info is None:
                raise StoreError(f"project {project} has no collection: call ensure_collection")
            if info.encoder != encoder:
                raise DimensionMismatchError(
                    f"collection {info.name} holds {info.encoder} vectors; refusing {encoder} ones"
                )
            check_preprocessing(info, self._preprocessing)
            latest = {point_id(project, p.task): p for p in points}
            stored = {
                str(r.id): r.payload or {} for r in self._fetch(info.name, list(latest), False)
            }
            rows = []
            delta = 0
            for pid, point in latest.items():
                vector = np.asarray(point.vector, dtype=np.float32).reshape(-1)
                if vector.shape[0] != info.dim:
                    raise DimensionMismatchError(
                        f"task {point.task}: vector has {vector.shape[0]} dimensions, collection "
                        f"{info.name} ({info.encoder}) expects {info.dim}"
                    )
                previous = stored.get(pid)
                payload = pl.point_payload(project, encoder, point, previous, self._flag)
                delta += pl.is_labelled(payload) - pl.is_labelled(previous)
                rows.append((pid, vector, payload))
            self._write(info.name, rows)
            self._labelled_changed(info.name, delta)

    def set_labels(
        self,
        project: int | str,
        task: TaskId,
        labels: Labels,
        annotation: Annotation,
        collection: CollectionInfo | None = None,
    ) -> bool:
        """Set labels in `collection`, or in the live one *and* every generation being built
        (so nothing annotated during a re-embedding is lost). True if the live point exists."""
        with self._guard:
            targets = [collection] if collection else self._label_targets(project)
            found_live = False
            for index, info in enumerate(targets):
                found = self._set_labels_in(info, project, task, labels, annotation)
                found_live = found_live or (found and index == 0)
            return found_live

    def _label_targets(self, project: int | str) -> list[CollectionInfo]:
        """The live collection first, then any newer generation under construction."""
        live = self._live(project)
        if live is None:
            return []
        return [live] + [g for g in self.generations(project) if g.generation > live.generation]

    def _set_labels_in(
        self,
        info: CollectionInfo,
        project: int | str,
        task: TaskId,
        labels: Labels,
        annotation: Annotation,
    ) -> bool:
        pid = point_id(project, task)
        found = self._fetch(info.name, [pid], False)
        if not found:
            return False
        previous = found[0].payload or {}
        if pl.is_newer(previous.get("annotation_updated_at"), annotation.updated_at):
            return True  # a newer annotation is already stored: it wins
        values = pl.label_payload(labels, annotation, self._flag)
        self._set_label_payload(info.name, [pid], values)
        self._labelled_changed(info.name, pl.is_labelled(values) - pl.is_labelled(previous))
        return True

    def clear_labels(
        self,
        project: int | str,
        annotation_id: int | str,
        collection: CollectionInfo | None = None,
    ) -> list[TaskId]:
        """Clear labels that came from this annotation, in every generation (live first)."""
        with self._guard:
            cleared: list[TaskId] = []
            targets = [collection] if collection else self._label_targets(project)
            for index, info in enumerate(targets):
                tasks = self._clear_labels_in(info, annotation_id)
                if index == 0:
                    cleared = tasks
            return cleared

    def _clear_labels_in(self, info: CollectionInfo, annotation_id: int | str) -> list[TaskId]:
        records = self._with_annotation(info.name, str(annotation_id))
        if not records:
            return []
        self._set_label_payload(
            info.name, [r.id for r in records], pl.label_payload({}, Annotation(), self._flag)
        )
        self._labelled_changed(info.name, -sum(pl.is_labelled(r.payload) for r in records))
        return [(r.payload or {})["task"] for r in records]

    def set_vote_radii(self, project: int | str, radii: Mapping[TaskId, float]) -> None:
        """Record these tasks' vote radii (rounded down) in the live generation."""
        if not radii:
            return
        with self._guard:
            info = self._live(project)
            if info is None:
                return
            ids = {point_id(project, t): t for t in radii}
            stored = {ids[str(r.id)]: r.id for r in self._fetch(info.name, list(ids), False)}
            self._set_payloads(info.name, pl.vote_radius_groups(stored, radii))

    def index_due(self, project: int | str) -> bool:
        """False: an engine that needs `build_index` says when (EdgeStore); a server indexes
        in the background by itself."""
        return False

    def build_index(self, project: int | str) -> bool:
        return False

    def index_status(self) -> list[IndexStatus] | None:
        """None: an engine that builds its graph on demand reports it (EdgeStore)."""
        return None

    # -- searches ----------------------------------------------------------------------------

    def nearest(
        self,
        project: int | str,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[TaskId] = (),
        exact: bool = False,
    ) -> list[Neighbour]:
        """The k most similar labelled points, best first, never one of `exclude` (`exact`:
        scanned even where the engine would walk an index)."""
        return self.nearest_batch(project, np.reshape(vector, (1, -1)), k, [exclude], exact)[0]

    def nearest_batch(
        self,
        project: int | str,
        vectors: np.ndarray,
        k: int,
        excludes: Sequence[Sequence[TaskId]] | None = None,
        exact: bool = False,
    ) -> list[list[Neighbour]]:
        """`nearest` for every row, in batched engine requests: the same request per row."""
        rows = query_rows(vectors)
        if k <= 0 or not len(rows):
            return [[] for _ in range(len(rows))]
        skips = exclusion_keys(excludes, len(rows))
        with self._guard:
            info = self._live(project)
            if info is None:
                return [[] for _ in range(len(rows))]
            found = self._search_batch(info, rows, [k + len(skip) for skip in skips], exact)
        return drop_excluded(found, skips, k)

    def unlabelled_within(
        self, project: int | str, vectors: np.ndarray, edges: Sequence[float]
    ) -> list[list[NearbyTask]]:
        """Every unlabelled point a label at each row may reach the top k of (see the
        protocol), best first: one search per band of recorded radii and row, each band with
        its own threshold, so far fewer points come back than within the smallest radius.
        A band's searches for all rows go out side by side, which Edge answers several times
        cheaper per row than each row's 8 bands together (docs/preannotation.md, "Batched
        band searches")."""
        rows = np.asarray(vectors, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"unlabelled_within takes one vector per row, got shape {rows.shape}")
        bands = radius_bands(edges)
        found: dict[tuple[int, int], list[NearbyTask]] = {}
        pending = [(band, row) for band in range(len(bands)) for row in range(len(rows))]
        limit = _FIRST_LIMIT
        with self._guard:
            info = self._live(project)
            if info is None:
                return [[] for _ in rows]
            while pending:  # a search that filled its limit is asked again for more
                answers = self._search_unlabelled(
                    info, rows, [(row, bands[band]) for band, row in pending], limit
                )
                found.update(zip(pending, answers, strict=True))
                pending = [
                    p for p, hits in zip(pending, answers, strict=True) if len(hits) >= limit
                ]
                limit *= 4
        return [
            sorted(
                (hit for band in range(len(bands)) for hit in found[band, row]),
                key=lambda h: -h.similarity,
            )
            for row in range(len(rows))
        ]

    # -- reads by task -----------------------------------------------------------------------

    def has_vectors(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        collection: CollectionInfo | None = None,
    ) -> set[TaskId]:
        """Which of these tasks already have a vector."""
        return set(self._retrieve(project, tasks, with_vectors=False, collection=collection))

    def vectors(self, project: int | str, tasks: Sequence[TaskId]) -> dict[TaskId, np.ndarray]:
        """Stored vectors of these tasks (missing ones are absent from the result)."""
        return {
            task: np.asarray(pl.vector_of(record), dtype=np.float32)
            for task, record in self._retrieve(project, tasks, with_vectors=True).items()
        }

    def points(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> dict[TaskId, Point]:
        """Stored points (vector and payload) of these tasks."""
        found = self._retrieve(project, tasks, with_vectors, collection=collection)
        return {task: pl.to_point(record) for task, record in found.items()}

    def _retrieve(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        with_vectors: bool,
        collection: CollectionInfo | None = None,
    ) -> dict[TaskId, pl.Record]:
        if not tasks:
            return {}
        with self._guard:
            info = collection or self._live(project)
            if info is None:
                return {}
            by_id = {point_id(project, t): t for t in tasks}
            records = self._fetch(info.name, list(by_id), with_vectors)
            return {by_id[str(r.id)]: r for r in records}
