"""The embedded store on Qdrant Edge: Qdrant's Rust engine in this process, one shard a generation.

Generations are files beside the shards (the alias pointers, each generation's metadata: layout
and crash safety in edge_generations.py); this module holds the reads and writes of points, the
searches and the index build. Points go through Edge's write-ahead log: the engine appends each
operation to the WAL before applying it to the segments, `update()` returns after both, and a
reopened shard replays the WAL, so an acknowledged write survives `kill -9` (tested). The WAL
is written through mmap and synced on flush/close, not per write, so a power cut can still
lose the last writes.

A vote searches the labelled points alone. Each labelled point carries a second copy of its
vector, the named vector `labelled` (the vote vector), so that vector's HNSW graph holds the
labelled points only and the vote needs no filter: a filtered walk over a graph of every
point missed neighbours once part of the points were unlabelled (recall@10 0.39 at 20 %
labelled, `bench.filtered_recall`). A label written or cleared rewrites the whole point, its
vote vector with it, in one WAL operation. The task's own vector (the default, named "") has
no graph (m=0) and no quantized copy: the refresh's searches among unlabelled points scan it
exactly. Generations made before the vote vector are searched with a `labelled` filter.

The vote is exact (Edge's scan) while a generation holds at most `exact_max_points` labelled
points, and HNSW above that. The same number sizes the engine's indexing threshold:
`build_index` gives a segment its HNSW graph once that many points wait unindexed. Writes
never build it: Edge has no background optimizer, and `optimize()` holds the GIL for the whole
build (3.1 s for 8,000 × 128-d here), which stalls every request and webhook of the process.
So the graph is built where nobody waits for an answer: `switch_generation` (a re-embedding
goes live with its graph), the migration (migrate.py), the CLI, and the backend's build-index
job, which its index timer starts when `index_due` (the labels grew by half since the last
build). Until then the unindexed tail is scanned, so answers stay exact there, only slower.

Thread safety: qdrant-edge-py's shard is internally synchronised, but every call holds the GIL
(a query for its duration, `optimize()` for the whole index build), and the merge rules are
read-modify-write. So one re-entrant lock serialises every operation of this store, as for
QdrantStore's local mode.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import qdrant_edge as edge

from . import payload as pl
from .base import (
    DEFAULT_EXACT_MAX_POINTS,
    CollectionInfo,
    IndexStatus,
    NearbyTask,
    Neighbour,
    Point,
    RadiusBand,
    StoreError,
)
from .edge_generations import _HAS_VOTE_VECTOR, _INDEXED_FIELDS, _SHARD, EdgeGenerations
from .engine import BandSearch
from .generations import Preprocessing

# Qdrant's defaults for the graph. The search ef: recall@10 >= 0.99 against exact at every
# labelled share `python -m bench.filtered_recall` tries (0.958 at 128 with every point labelled).
DEFAULT_HNSW_M = 16
DEFAULT_HNSW_EF_CONSTRUCT = 100
DEFAULT_HNSW_EF = 256
# How the engine keeps a generation's vectors. "int8": a scalar-quantized copy in RAM for the
# HNSW walk and the float32 originals on disk (memory-mapped), which rescore the candidates:
# 0.34x the raw vectors' RAM at 1M points (`echolabel bench --only embedded`). "float32": the
# originals in RAM. Exact search scores the originals either way.
# Recorded in each generation's metadata: a generation is always opened as it was made.
VECTOR_STORAGES = ("int8", "float32")
DEFAULT_VECTOR_STORAGE = "int8"
_UNRECORDED_STORAGE = "float32"  # generations made before the choice was recorded
_RESCORE_OVERSAMPLING = 3.0

_SCROLL_PAGE = 512
_QUERY_BATCH = 256
# The vote vector's name (see above); a generation that has it says so in its metadata
# (edge_generations._HAS_VOTE_VECTOR).
_VOTE_VECTOR = "labelled"
_INDEXED_LABELLED = "indexed_labelled"  # labelled points when the graph was last built
_LOCK_FILE = "store.lock"


class EdgeStore(EdgeGenerations):
    """VectorStore over Qdrant Edge shards in a local directory; one instance per process.

    The label rules and reads by task are EngineStore's, shared with QdrantStore; generations
    are kept as files by EdgeGenerations; this class calls the engine.
    """

    single_writer = True  # the process that opened it holds its lock file
    _flag = staticmethod(int)  # `labelled` as 0/1: see edge_generations._INDEXED_FIELDS

    def __init__(
        self,
        path: Path,
        *,
        prefix: str = "echolabel",
        exact_max_points: int = DEFAULT_EXACT_MAX_POINTS,
        hnsw_m: int = DEFAULT_HNSW_M,
        hnsw_ef_construct: int = DEFAULT_HNSW_EF_CONSTRUCT,
        hnsw_ef: int = DEFAULT_HNSW_EF,
        preprocessing: Preprocessing | None = None,
        vector_storage: str = DEFAULT_VECTOR_STORAGE,
    ) -> None:
        if vector_storage not in VECTOR_STORAGES:
            raise StoreError(f"vector storage {vector_storage!r}: use one of {VECTOR_STORAGES}")
        self.path = Path(path)
        if holds_local_store(self.path):  # checked before anything is written into it
            raise StoreError(
                f"{self.path} holds a store written by qdrant-client's local mode (echolabel "
                "before Qdrant Edge): migrate it with `echolabel migrate-store`, which keeps "
                "the old one aside"
            )
        self._preprocessing = dict(preprocessing) if preprocessing is not None else None
        self._vector_storage = vector_storage
        self.exact_max_points = exact_max_points
        self.hnsw_ef = hnsw_ef
        self._prefix = prefix
        self._hnsw_m = hnsw_m
        self._hnsw_ef_construct = hnsw_ef_construct
        self._guard = threading.RLock()
        self._collections = self.path / "collections"
        self._aliases = self.path / "aliases"
        self._collections.mkdir(parents=True, exist_ok=True)
        self._aliases.mkdir(parents=True, exist_ok=True)
        self._lock_handle: IO[str] | None = _hold_lock(self.path)
        # This process is the only writer, so the small files are read once and kept here.
        self._metas: dict[str, dict[str, Any]] = {}
        self._pointers: dict[str, str] = {}  # alias -> live generation name
        self._shards: dict[str, Any] = {}  # generation name -> open edge.EdgeShard
        self._labelled: dict[str, int] = {}  # generation name -> labelled points, once counted
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        *,
        path: Path | None = None,
        exact_max_points: int = DEFAULT_EXACT_MAX_POINTS,
        prefix: str = "echolabel",
        preprocessing: Preprocessing | None = None,
        vector_storage: str = DEFAULT_VECTOR_STORAGE,
    ) -> EdgeStore:
        """The store under `path` (created if missing)."""
        if path is None:
            raise StoreError("the embedded store needs a storage path (MODEL_DIR)")
        return cls(
            path,
            prefix=prefix,
            exact_max_points=exact_max_points,
            preprocessing=preprocessing,
            vector_storage=vector_storage,
        )

    def close(self) -> None:
        """Flush and close every shard, then release the directory for another process."""
        with self._guard:
            shards, self._shards = self._shards, {}
            for shard in shards.values():
                shard.close()
            if self._lock_handle is not None:
                fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

    # -- the engine ----------------------------------------------------------------------------

    def _shard(self, name: str) -> Any:
        """The open Edge shard of a generation, loading it on first use."""
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        if self._lock_handle is None:
            raise StoreError(f"the store at {self.path} was closed; open it again to use it")
        meta = self._metas.get(name)
        if meta is None:
            raise StoreError(
                f"collection {name} does not exist (dropped, or never created in {self.path})"
            )
        where = self._collections / name / _SHARD
        try:
            shard = edge.EdgeShard.load(str(where), self._edge_config(meta))
        except Exception as exc:  # the engine raises plain Exception
            if "WouldBlock" in str(exc):
                raise StoreError(_locked_message(self.path, None)) from exc
            raise StoreError(f"cannot open the Edge shard {where}: {exc}") from exc
        # A generation made before an index was added gets it now (the refresh's radius bands).
        missing = set(_INDEXED_FIELDS) - set(shard.info().payload_schema)
        for field_name in sorted(missing):
            shard.update(
                edge.UpdateOperation.create_field_index(field_name, _INDEXED_FIELDS[field_name])
            )
        self._shards[name] = shard
        return shard

    def _edge_config(self, meta: dict[str, Any]) -> Any:
        dim = int(meta["dim"])
        threshold_kb = max(1, -(-max(self.exact_max_points, 1) * dim * 4 // 1024))
        quantized = _storage(meta) == "int8"
        int8 = (
            edge.ScalarQuantizationConfig(type=edge.ScalarType.Int8, quantile=0.99, always_ram=True)
            if quantized
            else None
        )
        graph = edge.HnswIndexConfig(
            m=self._hnsw_m,
            ef_construct=self._hnsw_ef_construct,
            # Below this many KB of matching vectors a segment is scanned, not walked.
            full_scan_threshold=threshold_kb,
        )
        # Before the vote vector: one unnamed vector, searched with a `labelled` filter.
        vectors: Any = edge.EdgeVectorParams(
            size=dim, distance=edge.Distance.Cosine, on_disk=quantized
        )
        if meta.get(_HAS_VOTE_VECTOR):
            vote = edge.EdgeVectorParams(
                size=dim, distance=edge.Distance.Cosine, on_disk=quantized, quantization_config=int8
            )
            own = edge.EdgeVectorParams(
                size=dim,
                distance=edge.Distance.Cosine,
                on_disk=quantized,
                hnsw_config=edge.HnswIndexConfig(
                    m=0, ef_construct=self._hnsw_ef_construct, full_scan_threshold=threshold_kb
                ),
            )
            vectors, int8 = {"": own, _VOTE_VECTOR: vote}, None
        return edge.EdgeConfig(
            vectors=vectors,
            quantization_config=int8,
            hnsw_config=graph,
            # A segment gets its HNSW graph once it holds `exact_max_points` vectors.
            optimizers=edge.EdgeOptimizersConfig(indexing_threshold=threshold_kb),
            wal_enabled=True,
        )

    # -- the migration's writes -----------------------------------------------------------------

    def restore_points(self, target: CollectionInfo, records: Sequence[pl.Record]) -> None:
        """Write stored records as they are (ids, vectors, payloads; no merge rules), `labelled`
        turned into this engine's flag (the migration)."""
        rows = [
            (
                str(r.id),
                np.asarray(r.vector, dtype=np.float32),
                {**(r.payload or {}), "labelled": self._flag(pl.is_labelled(r.payload))},
            )
            for r in records
        ]
        with self._guard:
            if rows:
                self._write(target.name, rows)
            self._labelled.pop(target.name, None)  # counted again when next needed

    # -- the engine's primitives (see EngineStore) --------------------------------------------

    def _fetch(self, name: str, ids: list[str], with_vectors: bool) -> list[Any]:
        return list(self._shard(name).retrieve(ids, True, with_vectors))

    def _write(self, name: str, rows: list[tuple[Any, np.ndarray, dict[str, Any]]]) -> None:
        """Upsert rows, a labelled one with its vote vector; returns once they are in the
        shard's WAL."""
        split = self._has_vote_vector(name)
        points = []
        for pid, vector, payload in rows:
            # A list converts ~6x faster than an ndarray (read element by element).
            values: Any = vector.tolist()
            if split:
                labelled = pl.is_labelled(payload)
                values = {"": values, _VOTE_VECTOR: values} if labelled else {"": values}
            points.append(edge.Point(pid, values, payload))
        self._shard(name).update(edge.UpdateOperation.upsert_points(points))

    def _set_payload(self, name: str, ids: list[Any], values: dict[str, Any]) -> None:
        self._shard(name).update(edge.UpdateOperation.set_payload(ids, values))

    def _set_label_payload(self, name: str, ids: list[Any], values: dict[str, Any]) -> None:
        """The points rewritten whole, so the vote vector comes or goes with the label in one
        WAL operation (a crash never leaves a label without its vote vector)."""
        if not self._has_vote_vector(name):
            self._set_payload(name, ids, values)
            return
        records = self._fetch(name, ids, True)
        self._write(
            name,
            [
                (r.id, np.asarray(pl.vector_of(r), dtype=np.float32), {**r.payload, **values})
                for r in records
            ],
        )

    def _with_annotation(self, name: str, annotation: str) -> list[Any]:
        condition = edge.Filter(
            must=[edge.FieldCondition(key="annotation_id", match=edge.MatchValue(annotation))]
        )
        return list(self._scroll(name, condition, with_vectors=False))

    def _labelled_changed(self, name: str, delta: int) -> None:
        if name in self._labelled:
            self._labelled[name] += delta

    # -- searches ----------------------------------------------------------------------------

    def _search_batch(
        self, info: CollectionInfo, rows: np.ndarray, limits: Sequence[int], exact: bool
    ) -> list[list[Neighbour]]:
        """Exact while the generation holds at most `exact_max_points` labelled points (or
        when `exact`), HNSW above."""
        shard = self._shard(info.name)
        params = self._search_params(info.name, max(limits), exact)
        split = self._has_vote_vector(info.name)
        using = _VOTE_VECTOR if split else None
        labelled = None if split else edge.Filter(must=[_labelled(True)])
        requests = [
            edge.QueryRequest(
                limit=limit,
                query=edge.Query.Nearest(_query_vector(row), using=using),
                filter=labelled,
                params=params,
                with_payload=True,
            )
            for row, limit in zip(rows, limits, strict=True)
        ]
        return [[pl.to_neighbour(p) for p in hits] for hits in _query(shard, requests)]

    def _search_unlabelled(
        self, info: CollectionInfo, rows: np.ndarray, searches: Sequence[BandSearch], limit: int
    ) -> list[list[NearbyTask]]:
        """Exact (the task's own vector has no graph; in a generation made before the vote
        vector: while it holds at most `exact_max_points` points, HNSW above)."""
        shard = self._shard(info.name)
        exact = (
            self._has_vote_vector(info.name) or shard.info().points_count <= self.exact_max_points
        )
        params = self._params(info.name, exact, limit)
        queries = {row: _query_vector(rows[row]) for row, _ in searches}
        requests = [
            edge.QueryRequest(
                limit=limit,
                query=edge.Query.Nearest(queries[row]),
                filter=edge.Filter(must=[_labelled(False), *_band(band)]),
                score_threshold=band.min_similarity,
                params=params,
                with_payload=["task", pl.VOTE_RADIUS],
            )
            for row, band in searches
        ]
        return [[pl.to_nearby_task(p) for p in hits] for hits in _query(shard, requests)]

    def count(self, project: int | str, labelled: bool | None = None) -> int:
        with self._guard:
            info = self._live(project)
            return 0 if info is None else self.count_in(info, labelled)

    def count_in(self, target: CollectionInfo, labelled: bool | None = None) -> int:
        """`count` in any generation, live or not (the migration verifies each one)."""
        condition = None if labelled is None else edge.Filter(must=[_labelled(labelled)])
        with self._guard:
            return int(
                self._shard(target.name).count(edge.CountRequest(exact=True, filter=condition))
            )

    def iter_points(
        self,
        project: int | str,
        labelled: bool | None = None,
        with_vectors: bool = True,
        collection: CollectionInfo | None = None,
    ) -> Iterator[Point]:
        with self._guard:
            info = collection or self._live(project)
        if info is None:
            return
        condition = None if labelled is None else edge.Filter(must=[_labelled(labelled)])
        for record in self._scroll(info.name, condition, with_vectors):
            yield pl.to_point(record)

    def _scroll(self, name: str, condition: Any, with_vectors: bool) -> Iterator[Any]:
        """Every matching record, a page at a time (the lock is held per page)."""
        offset = None
        while True:
            with self._guard:
                records, offset = self._shard(name).scroll(
                    edge.ScrollRequest(
                        offset=offset,
                        limit=_SCROLL_PAGE,
                        filter=condition,
                        with_payload=True,
                        with_vector=with_vectors,
                    )
                )
            yield from records
            if offset is None:
                return

    # -- exact or HNSW -----------------------------------------------------------------------

    def _search_params(self, name: str, k: int, exact: bool) -> Any:
        return self._params(name, exact or self._labelled_count(name) <= self.exact_max_points, k)

    def _params(self, name: str, exact: bool, limit: int) -> Any:
        """Exact: every candidate scored on its original vector. HNSW: the walk on the int8
        copies, then the best `limit` × oversampling rescored on the originals."""
        quantized = _storage(self._metas[name]) == "int8"
        if exact:
            ignore = edge.QuantizationSearchParams(ignore=True) if quantized else None
            return edge.SearchParams(exact=True, quantization=ignore)
        rescore = (
            edge.QuantizationSearchParams(rescore=True, oversampling=_RESCORE_OVERSAMPLING)
            if quantized
            else None
        )
        return edge.SearchParams(hnsw_ef=max(self.hnsw_ef, limit), quantization=rescore)

    def _labelled_count(self, name: str) -> int:
        """Labelled points of a generation: counted once, then kept in step by the writes."""
        if name not in self._labelled:
            shard = self._shard(name)
            self._labelled[name] = int(
                shard.count(
                    edge.CountRequest(exact=True, filter=edge.Filter(must=[_labelled(True)]))
                )
            )
        return self._labelled[name]

    def build_index(self, project: int | str) -> bool:
        """Build the HNSW graph of the project's live generation and of any being built, where
        `exact_max_points` points wait unindexed, and of the live one where its labels outgrew
        it (`index_due`); True if anything was built.

        Blocks, holding the GIL, for the whole build: call it from a job or the CLI, never
        while a request or a webhook waits.
        """
        with self._guard:
            live = self._live(project) if self.index_due(project) else None
            return any(
                [
                    self._build_index(info.name, force=live is not None and info == live)
                    for info in self.generations(project)
                ]
            )

    def index_due(self, project: int | str) -> bool:
        """Whether the live generation's labelled points grew past the exact threshold and by
        half since its graph was last built (at least by the threshold): the builds come at
        geometrically spaced sizes, so their cost stays a fixed share of the labelling."""
        with self._guard:
            info = self._live(project)
            if info is None:
                return False
            labelled = self._labelled_count(info.name)
            built_at = int(self._metas[info.name].get(_INDEXED_LABELLED, 0))
            growth = max(self.exact_max_points, built_at // 2, 1)
            return labelled > self.exact_max_points and labelled - built_at >= growth

    def index_status(self) -> list[IndexStatus]:
        """Every project's live generation: its points, and how many wait outside the graph."""
        with self._guard:
            status = []
            for _, name in sorted(self._pointers.items()):
                if name not in self._metas:
                    continue
                unindexed = self._unindexed(name)
                status.append(
                    IndexStatus(
                        project=str(self._metas[name]["project"]),
                        generation=name,
                        points=int(self._shard(name).info().points_count),
                        unindexed=unindexed,
                        builds=unindexed >= max(self.exact_max_points, 1),
                    )
                )
            return status

    def _unindexed(self, name: str) -> int:
        """Points outside an indexed segment. The engine counts indexed vectors, and a labelled
        point has two (its own and its vote vector), so the count is scaled back to points."""
        info = self._shard(name).info()
        points = int(info.points_count)
        vectors = points + (self._labelled_count(name) if self._has_vote_vector(name) else 0)
        waiting = max(0, vectors - int(info.indexed_vectors_count))
        return waiting * points // vectors if vectors else 0

    def _build_index(self, name: str, force: bool = False) -> bool:
        """Build where enough waits (or `force`: the engine's count of indexed vectors keeps
        the old copies of rewritten points, so it undercounts a live generation's waiting
        labels; `index_due` counts them). Either way the graph is now as current as it will
        be, so its labelled count is recorded."""
        built = force or self._unindexed(name) >= max(self.exact_max_points, 1)
        if built:
            self._shard(name).optimize()
        self._update_meta(name, {_INDEXED_LABELLED: self._labelled_count(name)})
        return built

    def _has_vote_vector(self, name: str) -> bool:
        return bool(self._metas[name].get(_HAS_VOTE_VECTOR))


# -- files -----------------------------------------------------------------------------------


def _storage(meta: dict[str, Any]) -> str:
    return str(meta.get("vector_storage", _UNRECORDED_STORAGE))


def holds_local_store(path: Path) -> bool:
    """Whether `path` holds a qdrant-client local-mode store (and not an Edge one)."""
    return (path / "meta.json").is_file() and not (path / "collections").is_dir()


def _hold_lock(root: Path) -> IO[str]:
    """Take the store's lock file, or say which process holds it.

    Edge locks each shard's WAL, but a store holds several shards and files of its own; one
    lock on the root covers them all, before anything is read.
    """
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / _LOCK_FILE, "a+")  # noqa: SIM115 - held open for the store's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or None
        handle.close()
        raise StoreError(_locked_message(root, holder)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _locked_message(root: Path, holder: str | None) -> str:
    who = f" (pid {holder})" if holder else ""
    return (
        f"the embedded Qdrant storage {root} is locked by another process{who}: only one "
        "process may hold it (stop the other `echolabel` process, or run a Qdrant server and "
        "set QDRANT_URL)"
    )


# -- queries -----------------------------------------------------------------------------------


def _labelled(value: bool) -> Any:
    return edge.FieldCondition(key="labelled", match=edge.MatchValue(int(value)))


def _band(band: RadiusBand) -> list[Any]:
    """The conditions selecting a band's points by their recorded vote radius."""
    if band.unrecorded:
        return [edge.IsEmptyCondition(pl.VOTE_RADIUS)]
    return [
        edge.FieldCondition(key=pl.VOTE_RADIUS, range=edge.RangeFloat(gte=band.low, lt=band.high))
    ]


def _query(shard: Any, requests: list[Any]) -> list[Any]:
    """Each request's points, sent _QUERY_BATCH requests at a time (a lone one, as a single
    /predict sends it, as a plain query)."""
    found: list[Any] = []
    for start in range(0, len(requests), _QUERY_BATCH):
        batch = requests[start : start + _QUERY_BATCH]
        if len(batch) == 1:
            found.append(shard.query(batch[0]))
        else:
            found += shard.query_batch(edge.QueryBatchRequest(batch))
    return found


def _query_vector(vector: np.ndarray) -> list[float]:
    """As a list: the engine converts one ~2x faster than an ndarray (see `_write`)."""
    return np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
