"""The Qdrant store: in-process (`path=`) by default, a Qdrant server when a URL is given.

Each project has an alias `<prefix>_p<project>` pointing at one *generation* collection
`<prefix>_p<project>_g<n>`; re-embedding builds generation n+1 beside it and swaps the alias
atomically. The collection's metadata records the encoder, weights and dimension, so vectors
from another encoder are refused instead of silently mixed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from .base import (
    Annotation,
    CollectionInfo,
    DimensionMismatchError,
    Labels,
    Neighbour,
    Point,
    StoreError,
    StoreUnavailableError,
    TaskId,
    point_id,
)

_INDEXED_FIELDS = {
    "project": models.PayloadSchemaType.KEYWORD,
    "labelled": models.PayloadSchemaType.BOOL,
    "annotation_id": models.PayloadSchemaType.KEYWORD,
}
_SCROLL_PAGE = 512
# Queries per batched search request (kth_similarities): bounds one request's size.
_QUERY_BATCH = 256
# Label changes remembered between refreshes; more mean "refresh everything".
_MAX_CHANGES = 5000


class QdrantStore:
    """VectorStore over qdrant-client; one instance per process.

    `local` is qdrant-client's in-process mode: it is not thread-safe (so calls are serialised
    here), ignores payload indexes, and holds a file lock, so its opener is the single writer.
    """

    def __init__(
        self,
        client: QdrantClient,
        *,
        prefix: str = "echolabel",
        local: bool = False,
        shards: int = 1,
        replication_factor: int = 1,
        server: str = "the Qdrant server",
    ):
        self._client = client
        self._prefix = prefix
        # Distributed Qdrant: how each new generation collection is split and copied.
        self._shards = shards
        self._replication_factor = replication_factor
        # Every client call runs inside `with self._guard`: a lock for local mode, which is not
        # thread-safe; for a server (thread-safe), what turns its failures into store errors.
        self._guard: AbstractContextManager[object] = (
            threading.RLock() if local else _ServerErrors(server)
        )
        self._local = local

    @property
    def single_writer(self) -> bool:
        """True in-process (the storage's file lock admits one process); False for a server."""
        return self._local

    @classmethod
    def open(
        cls,
        *,
        path: Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        shards: int = 1,
        replication_factor: int = 1,
    ) -> QdrantStore:
        """A server store when `url` is given, else an in-process store under `path`.

        `shards` and `replication_factor` apply to collections created on a Qdrant cluster.
        """
        if url:
            client = QdrantClient(url=url, api_key=api_key, timeout=10, check_compatibility=False)
            return cls(
                client,
                local=False,
                shards=shards,
                replication_factor=replication_factor,
                server=f"the Qdrant server at {url}",
            )
        if path is None:
            raise StoreError("either a Qdrant URL (QDRANT_URL) or a storage path is required")
        path.mkdir(parents=True, exist_ok=True)
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:
            if "already accessed" in str(exc):
                raise StoreError(
                    f"the embedded Qdrant storage {path} is locked by another process: only one "
                    "process may hold it (stop the other `echolabel` process, or run a Qdrant "
                    "server and set QDRANT_URL)"
                ) from exc
            raise
        return cls(client, local=True)

    def close(self) -> None:
        """Close the client (and release the in-process storage's file lock)."""
        with self._guard:
            self._client.close()

    # -- collections and generations -------------------------------------------------------

    def alias(self, project: int | str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(project))
        return f"{self._prefix}_p{safe}"

    def collection(self, project: int | str) -> CollectionInfo | None:
        alias = self.alias(project)
        with self._guard:
            target = next(
                (
                    a.collection_name
                    for a in self._client.get_aliases().aliases
                    if a.alias_name == alias
                ),
                None,
            )
            if target is None:
                return None
            return self._info(project, target)

    def generations(self, project: int | str) -> list[CollectionInfo]:
        """Every generation collection of the project, live or being built."""
        pattern = re.compile(re.escape(self.alias(project)) + r"_g(\d+)$")
        with self._guard:
            names = [c.name for c in self._client.get_collections().collections]
            return sorted(
                (self._info(project, n) for n in names if pattern.match(n)),
                key=lambda info: info.generation,
            )

    def _info(self, project: int | str, name: str) -> CollectionInfo:
        meta = self._client.get_collection(name).config.metadata or {}
        try:
            return CollectionInfo(
                project=project,
                encoder=str(meta["encoder"]),
                dim=int(meta["dim"]),
                weights_id=str(meta.get("weights_id", "")),
                generation=int(meta["generation"]),
                name=name,
                published_version=meta.get("published_version") or None,
                label_state=int(meta.get("label_state") or 0),
                label_changes=tuple(meta.get("label_changes") or ()),
                vote_radius_min=float(meta.get("vote_radius_min", -1.0)),
            )
        except KeyError as exc:
            raise StoreError(
                f"collection {name} has no echolabel metadata ({exc.args[0]} missing): it was not "
                "created by echolabel; remove it or use another ECHOLABEL collection prefix"
            ) from None

    # -- pre-annotation state -----------------------------------------------------------------

    def set_prediction_state(
        self,
        project: int | str,
        *,
        published_version: str | None = None,
        vote_radius_min: float | None = None,
    ) -> None:
        """Record what Label Studio holds: the model_version of the predictions last pushed,
        and a lower bound of their vote radii (the k-th labelled neighbour's similarity)."""
        values: dict[str, object] = {}
        if published_version is not None:
            values["published_version"] = published_version
        if vote_radius_min is not None:
            values["vote_radius_min"] = vote_radius_min
        with self._guard:
            info = self.collection(project)
            if info is None:
                raise StoreError(f"project {project} has no collection")
            self._client.update_collection(info.name, metadata=values)

    def note_label_changes(self, project: int | str, tasks: Sequence[TaskId]) -> int:
        """Count label changes of these tasks (kept until `take_label_changes`); the new count.

        Called by the one process that applies webhooks, so a read-modify-write is safe.
        """
        with self._guard:
            info = self.collection(project)
            if info is None or not tasks:
                return 0
            changes = list(dict.fromkeys([*info.label_changes, *tasks]))[-_MAX_CHANGES:]
            self._client.update_collection(
                info.name,
                metadata={"label_state": info.label_state + len(tasks), "label_changes": changes},
            )
            return len(changes)

    def take_label_changes(self, project: int | str) -> list[TaskId]:
        """The tasks whose labels changed since the last call, forgetting them."""
        with self._guard:
            info = self.collection(project)
            if info is None or not info.label_changes:
                return []
            self._client.update_collection(info.name, metadata={"label_changes": []})
            return list(info.label_changes)

    def unlabelled_near(
        self, project: int | str, vector: np.ndarray, min_similarity: float, limit: int
    ) -> list[tuple[TaskId, float, np.ndarray]]:
        """Unlabelled tasks at least `min_similarity` from `vector` with their vectors, most
        similar first."""
        with self._guard:
            info = self.collection(project)
            if info is None:
                return []
            result = self._client.query_points(
                info.name,
                query=np.asarray(vector, dtype=np.float32).reshape(-1).tolist(),
                query_filter=models.Filter(must=[_labelled(False)]),
                limit=limit,
                score_threshold=min_similarity,
                with_payload=["task"],
                with_vectors=True,
            )
        return [
            (
                (p.payload or {})["task"],
                float(p.score),
                np.asarray(p.vector, dtype=np.float32),
            )
            for p in result.points
        ]

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """A new, empty, not-yet-live generation collection for the project."""
        with self._guard:
            existing = self.generations(project)
            generation = (existing[-1].generation + 1) if existing else 1
            name = f"{self.alias(project)}_g{generation}"
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                shard_number=self._shards,
                replication_factor=self._replication_factor,
                metadata={
                    "encoder": encoder,
                    "dim": dim,
                    "weights_id": weights_id,
                    "generation": generation,
                    "project": str(project),
                },
            )
            if not self._local:  # local mode ignores payload indexes (and warns about them)
                for field_name, schema in _INDEXED_FIELDS.items():
                    self._client.create_payload_index(name, field_name, schema)
            return self._info(project, name)

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        """Point the project's alias at `target` atomically, then drop older generations."""
        alias = self.alias(project)
        with self._guard:
            current = self.collection(project)
            operations: list[models.AliasOperations] = []
            if current is not None:
                operations.append(
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
                )
            operations.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=target.name, alias_name=alias)
                )
            )
            self._client.update_collection_aliases(change_aliases_operations=operations)
            for old in self.generations(project):
                if old.generation < target.generation:
                    self._client.delete_collection(old.name)

    def drop_generation(self, target: CollectionInfo) -> None:
        """Delete a generation that is not live (an abandoned or superseded build)."""
        with self._guard:
            live = self.collection(target.project)
            if live is not None and live.name == target.name:
                raise StoreError(f"{target.name} is the live generation; it cannot be dropped")
            self._client.delete_collection(target.name)

    def ensure_collection(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        with self._guard:
            info = self.collection(project)
            if info is None:
                info = self.create_generation(project, encoder, dim, weights_id)
                self.switch_generation(project, info)
            elif info.encoder != encoder or info.dim != dim:
                raise DimensionMismatchError(
                    f"project {project}'s collection {info.name} holds {info.encoder} vectors "
                    f"({info.dim}-d), not {encoder} ({dim}-d): re-embed the project with "
                    f"`echolabel reembed --project {project} --encoder {encoder}` or configure "
                    f"ECHOLABEL_ENCODER={info.encoder}"
                )
            return info

    def drop_project(self, project: int | str) -> None:
        with self._guard:
            alias = self.alias(project)
            if self.collection(project) is not None:
                self._client.update_collection_aliases(
                    change_aliases_operations=[
                        models.DeleteAliasOperation(
                            delete_alias=models.DeleteAlias(alias_name=alias)
                        )
                    ]
                )
            for info in self.generations(project):
                self._client.delete_collection(info.name)

    # -- writes ------------------------------------------------------------------------------

    def upsert(
        self,
        project: int | str,
        encoder: str,
        points: Sequence[Point],
        collection: CollectionInfo | None = None,
    ) -> None:
        """Write points into the live collection (or into `collection`, a generation being built).

        Labels stored from a newer annotation survive a re-upsert of the same task.
        """
        if not points:
            return
        with self._guard:
            info = collection or self.collection(project)
            if info is None:
                raise StoreError(f"project {project} has no collection: call ensure_collection")
            if info.encoder != encoder:
                raise DimensionMismatchError(
                    f"collection {info.name} holds {info.encoder} vectors; refusing {encoder} ones"
                )
            ids = [point_id(project, p.task) for p in points]
            stored = {
                str(r.id): r.payload or {}
                for r in self._client.retrieve(info.name, ids=ids, with_payload=True)
            }
            structs = []
            for pid, point in zip(ids, points, strict=True):
                vector = np.asarray(point.vector, dtype=np.float32).reshape(-1)
                if vector.shape[0] != info.dim:
                    raise DimensionMismatchError(
                        f"task {point.task}: vector has {vector.shape[0]} dimensions, collection "
                        f"{info.name} ({info.encoder}) expects {info.dim}"
                    )
                payload = _payload(project, encoder, point)
                previous = stored.get(pid)
                if previous and previous.get("labelled") and not _replaces(point, previous):
                    for key in ("labels", "labelled", "annotation_id", "annotation_updated_at"):
                        payload[key] = previous.get(key)
                structs.append(models.PointStruct(id=pid, vector=vector.tolist(), payload=payload))
            self._client.upsert(info.name, points=structs, wait=True)

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
        live = self.collection(project)
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
        found = self._client.retrieve(info.name, ids=[pid], with_payload=True)
        if not found:
            return False
        previous = found[0].payload or {}
        if _is_newer(previous.get("annotation_updated_at"), annotation.updated_at):
            return True  # a newer annotation is already stored: it wins
        self._client.set_payload(
            info.name,
            payload={
                "labels": dict(labels),
                "labelled": bool(labels),
                "annotation_id": _key(annotation.id),
                "annotation_updated_at": annotation.updated_at,
            },
            points=[pid],
            wait=True,
        )
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
        condition = models.Filter(
            must=[
                models.FieldCondition(
                    key="annotation_id", match=models.MatchValue(value=str(annotation_id))
                )
            ]
        )
        records = self._scroll(info.name, condition, with_vectors=False)
        if not records:
            return []
        self._client.set_payload(
            info.name,
            payload={
                "labels": {},
                "labelled": False,
                "annotation_id": None,
                "annotation_updated_at": None,
            },
            points=[r.id for r in records],
            wait=True,
        )
        return [(r.payload or {})["task"] for r in records]

    # -- reads -------------------------------------------------------------------------------

    def has_vectors(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        collection: CollectionInfo | None = None,
    ) -> set[TaskId]:
        return set(self._retrieve(project, tasks, with_vectors=False, collection=collection))

    def vectors(self, project: int | str, tasks: Sequence[TaskId]) -> dict[TaskId, np.ndarray]:
        return {
            task: np.asarray(record.vector, dtype=np.float32)
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
        return {task: _to_point(record) for task, record in found.items()}

    def _retrieve(
        self,
        project: int | str,
        tasks: Sequence[TaskId],
        with_vectors: bool,
        collection: CollectionInfo | None = None,
    ) -> dict[TaskId, models.Record]:
        if not tasks:
            return {}
        with self._guard:
            info = collection or self.collection(project)
            if info is None:
                return {}
            by_id = {point_id(project, t): t for t in tasks}
            records = self._client.retrieve(
                info.name, ids=list(by_id), with_payload=True, with_vectors=with_vectors
            )
            return {by_id[str(r.id)]: r for r in records}

    def nearest(
        self,
        project: int | str,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[TaskId] = (),
        exact: bool = False,
    ) -> list[Neighbour]:
        with self._guard:
            info = self.collection(project)
            if info is None:
                return []
            must_not: list[models.Condition] = []
            if exclude:
                must_not.append(
                    models.HasIdCondition(has_id=[point_id(project, t) for t in exclude])
                )
            result = self._client.query_points(
                info.name,
                query=np.asarray(vector, dtype=np.float32).reshape(-1).tolist(),
                query_filter=models.Filter(must=[_labelled(True)], must_not=must_not),
                limit=k,
                with_payload=True,
                search_params=models.SearchParams(exact=exact),
            )
        return [
            Neighbour(
                task=(p.payload or {})["task"],
                similarity=float(p.score),
                labels=(p.payload or {}).get("labels") or {},
                image=(p.payload or {}).get("image", ""),
            )
            for p in result.points
        ]

    def kth_similarities(self, project: int | str, queries: np.ndarray, k: int) -> np.ndarray:
        """Each query row's k-th best labelled similarity, from the same search as `nearest`
        (batched, nothing excluded); -1 where fewer than k points are labelled."""
        rows = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
        out = np.full(len(rows), -1.0, dtype=np.float32)
        if k <= 0 or not len(rows):
            return out
        labelled = models.Filter(must=[_labelled(True)])
        with self._guard:
            info = self.collection(project)
            if info is None:
                return out
            for start in range(0, len(rows), _QUERY_BATCH):
                answers = self._client.query_batch_points(
                    info.name,
                    requests=[
                        models.QueryRequest(
                            query=row.tolist(), filter=labelled, limit=k, with_payload=False
                        )
                        for row in rows[start : start + _QUERY_BATCH]
                    ],
                )
                for row, answer in enumerate(answers, start=start):
                    if len(answer.points) >= k:
                        out[row] = answer.points[k - 1].score
        return out

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        with self._guard:
            info = self.collection(project)
            if info is None:
                return 0
            condition = None if labelled is None else models.Filter(must=[_labelled(labelled)])
            return self._client.count(info.name, count_filter=condition, exact=True).count

    def iter_points(
        self,
        project: int | str,
        labelled: bool | None = None,
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> Iterator[Point]:
        info = collection or self.collection(project)
        if info is None:
            return
        condition = None if labelled is None else models.Filter(must=[_labelled(labelled)])
        offset = None
        while True:
            with self._guard:
                records, offset = self._client.scroll(
                    info.name,
                    scroll_filter=condition,
                    limit=_SCROLL_PAGE,
                    offset=offset,
                    with_payload=True,
                    with_vectors=with_vectors,
                )
            for record in records:
                yield _to_point(record)
            if offset is None:
                return

    def _scroll(
        self, name: str, condition: models.Filter, with_vectors: bool
    ) -> list[models.Record]:
        out: list[models.Record] = []
        offset = None
        while True:
            records, offset = self._client.scroll(
                name,
                scroll_filter=condition,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
            out.extend(records)
            if offset is None:
                return out


class _ServerErrors(AbstractContextManager[object]):
    """Turns a Qdrant server's failures into StoreUnavailableError naming the server.

    qdrant-client raises httpx and its own ResponseHandlingException for a server that is down;
    callers (HTTP app, jobs, CLI) should see one store error that says what to check. Nested
    use is harmless: an error already translated passes through.
    """

    def __init__(self, server: str) -> None:
        self._server = server

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, ResponseHandlingException | httpx.TransportError):
            raise StoreUnavailableError(
                f"{self._server} is unreachable ({error}): check QDRANT_URL and that Qdrant "
                "is running"
            ) from None
        if isinstance(error, UnexpectedResponse):
            if error.status_code in (401, 403):
                raise StoreUnavailableError(
                    f"{self._server} refused us ({error.status_code}): check QDRANT_API_KEY"
                ) from None
            if error.status_code is not None and error.status_code >= 500:
                raise StoreUnavailableError(
                    f"{self._server} failed ({error.status_code}): {error.reason_phrase}"
                ) from None


def _labelled(value: bool) -> models.FieldCondition:
    return models.FieldCondition(key="labelled", match=models.MatchValue(value=value))


def _key(value: int | str | None) -> str | None:
    """Annotation ids are stored as text so one keyword index serves int and str ids."""
    return None if value is None else str(value)


def _is_newer(stored: str | None, incoming: str | None) -> bool:
    """True when the stored annotation time is strictly newer than the incoming one."""
    return bool(stored and incoming and stored > incoming)


def _replaces(point: Point, previous: dict[str, object]) -> bool:
    """Whether a freshly written point's labels should replace the stored ones."""
    if not point.labelled:
        return False
    stored_time = previous.get("annotation_updated_at")
    return not _is_newer(
        stored_time if isinstance(stored_time, str) else None, point.annotation.updated_at
    )


def _payload(project: int | str, encoder: str, point: Point) -> dict[str, object]:
    payload: dict[str, object] = dict(point.extra)
    payload.update(
        {
            "project": str(project),
            "task": point.task,
            "image": point.image,
            "encoder": encoder,
            "labels": dict(point.labels),
            "labelled": point.labelled,
            "annotation_id": _key(point.annotation.id),
            "annotation_updated_at": point.annotation.updated_at,
        }
    )
    return payload


def _to_point(record: models.Record) -> Point:
    payload = dict(record.payload or {})
    vector = record.vector if isinstance(record.vector, list) else []
    reserved = {
        "project",
        "task",
        "image",
        "encoder",
        "labels",
        "labelled",
        "annotation_id",
        "annotation_updated_at",
    }
    return Point(
        task=payload["task"],
        vector=np.asarray(vector, dtype=np.float32),
        image=str(payload.get("image", "")),
        labels=dict(payload.get("labels") or {}),
        annotation=Annotation(payload.get("annotation_id"), payload.get("annotation_updated_at")),
        extra={k: v for k, v in payload.items() if k not in reserved},
    )
