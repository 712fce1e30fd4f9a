"""The Qdrant store on qdrant-client: a Qdrant server when a URL is given, else its local mode.

Local mode (`path=`) is qdrant-client's Python stand-in for the server: the embedded default
is Qdrant Edge (edge_store.py), and local mode stays as the server's API in tests and as the
source of a migration (migrate.py). Generations and the alias are in qdrant_generations.py;
this module holds the reads and writes of points.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from . import payload as pl
from .base import (
    CollectionInfo,
    NearbyTask,
    Neighbour,
    Point,
    RadiusBand,
    StoreError,
    StoreUnavailableError,
)
from .engine import BandSearch
from .generations import Preprocessing
from .qdrant_generations import QdrantGenerations

_SCROLL_PAGE = 512
# Queries per batched search request: bounds one request's size.
_QUERY_BATCH = 256

T = TypeVar("T")


class QdrantStore(QdrantGenerations):
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
        preprocessing: Preprocessing | None = None,
    ):
        self._client = client
        self._preprocessing = dict(preprocessing) if preprocessing is not None else None
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
        preprocessing: Preprocessing | None = None,
    ) -> QdrantStore:
        """A server store when `url` is given, else an in-process store under `path`.

        `shards` and `replication_factor` apply to collections created on a Qdrant cluster;
        `preprocessing` is what this process embeds with (see generations.py).
        """
        if url:
            client = QdrantClient(url=url, api_key=api_key, timeout=10, check_compatibility=False)
            return cls(
                client,
                local=False,
                shards=shards,
                replication_factor=replication_factor,
                server=f"the Qdrant server at {url}",
                preprocessing=preprocessing,
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
        return cls(client, local=True, preprocessing=preprocessing)

    def close(self) -> None:
        """Close the client (and release the in-process storage's file lock)."""
        with self._guard:
            self._client.close()

    # -- the engine's primitives (see EngineStore) --------------------------------------------

    def _fetch(self, name: str, ids: list[str], with_vectors: bool) -> list[pl.Record]:
        return list(
            self._client.retrieve(name, ids=ids, with_payload=True, with_vectors=with_vectors)
        )

    def _write(self, name: str, rows: list[tuple[str, np.ndarray, dict[str, Any]]]) -> None:
        structs = [models.PointStruct(id=i, vector=v.tolist(), payload=p) for i, v, p in rows]
        self._client.upsert(name, points=structs, wait=True)

    def _set_payload(self, name: str, ids: list[Any], values: dict[str, Any]) -> None:
        self._client.set_payload(name, payload=values, points=ids, wait=True)

    def _set_payloads(self, name: str, writes: list[tuple[list[Any], dict[str, Any]]]) -> None:
        if writes:
            self._client.batch_update_points(
                name,
                [
                    models.SetPayloadOperation(
                        set_payload=models.SetPayload(payload=values, points=ids)
                    )
                    for ids, values in writes
                ],
                wait=True,
            )

    def _with_annotation(self, name: str, annotation: str) -> list[pl.Record]:
        condition = models.Filter(
            must=[
                models.FieldCondition(
                    key="annotation_id", match=models.MatchValue(value=annotation)
                )
            ]
        )
        return list(self._scroll(name, condition, with_vectors=False))

    # -- reads -------------------------------------------------------------------------------

    def _search_batch(
        self, info: CollectionInfo, rows: np.ndarray, limits: Sequence[int], exact: bool
    ) -> list[list[Neighbour]]:
        """One request per row, sent together (query_batch_points)."""
        labelled = models.Filter(must=[_labelled(True)])
        requests = [
            models.QueryRequest(
                query=row.tolist(),
                filter=labelled,
                limit=limit,
                with_payload=True,
                params=models.SearchParams(exact=exact),
            )
            for row, limit in zip(rows, limits, strict=True)
        ]
        return self._query(info.name, requests, pl.to_neighbour)

    def _search_unlabelled(
        self, info: CollectionInfo, rows: np.ndarray, searches: Sequence[BandSearch], limit: int
    ) -> list[list[NearbyTask]]:
        queries = {row: rows[row].tolist() for row, _ in searches}
        requests = [
            models.QueryRequest(
                query=queries[row],
                filter=models.Filter(must=[_labelled(False), *_band(band)]),
                limit=limit,
                score_threshold=band.min_similarity,
                with_payload=["task", pl.VOTE_RADIUS],
            )
            for row, band in searches
        ]
        return self._query(info.name, requests, pl.to_nearby_task)

    def _query(
        self, name: str, requests: list[models.QueryRequest], convert: Callable[[Any], T]
    ) -> list[list[T]]:
        """Each request's points, converted; sent _QUERY_BATCH requests at a time."""
        found: list[list[T]] = []
        for start in range(0, len(requests), _QUERY_BATCH):
            answers = self._client.query_batch_points(
                name, requests=requests[start : start + _QUERY_BATCH]
            )
            found += [[convert(p) for p in answer.points] for answer in answers]
        return found

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        with self._guard:
            info = self._live(project)
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
        info = collection or self._live(project)
        if info is None:
            return
        condition = None if labelled is None else models.Filter(must=[_labelled(labelled)])
        for record in self._scroll(info.name, condition, with_vectors):
            yield pl.to_point(record)

    def _scroll(
        self, name: str, condition: models.Filter | None, with_vectors: bool
    ) -> Iterator[models.Record]:
        """Every matching record, a page at a time (the guard is held per page)."""
        offset = None
        while True:
            with self._guard:
                records, offset = self._client.scroll(
                    name,
                    scroll_filter=condition,
                    limit=_SCROLL_PAGE,
                    offset=offset,
                    with_payload=True,
                    with_vectors=with_vectors,
                )
            yield from records
            if offset is None:
                return


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


def _band(band: RadiusBand) -> list[models.Condition]:
    """The conditions selecting a band's points by their recorded vote radius."""
    if band.unrecorded:
        return [models.IsEmptyCondition(is_empty=models.PayloadField(key=pl.VOTE_RADIUS))]
    return [
        models.FieldCondition(key=pl.VOTE_RADIUS, range=models.Range(gte=band.low, lt=band.high))
    ]


def _labelled(value: bool) -> models.FieldCondition:
    return models.FieldCondition(key="labelled", match=models.MatchValue(value=value))
