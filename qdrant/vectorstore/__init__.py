"""echolabel's vector store: Qdrant Edge in-process (the default), or a Qdrant server.

qdrant-client's local mode remains only as a stand-in for the server's API in tests
(`engine="local"`), with the exact in-memory index in front of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from .base import (
    DEFAULT_EXACT_MAX_POINTS,
    Annotation,
    CollectionInfo,
    DimensionMismatchError,
    IndexStatus,
    Labels,
    NearbyTask,
    Neighbour,
    Point,
    StoreError,
    StoreUnavailableError,
    TaskId,
    VectorStore,
    point_id,
)
from .exact import ExactIndex, ExactSearchStore
from .qdrant_store import QdrantStore

__all__ = [
    "Annotation",
    "CollectionInfo",
    "DimensionMismatchError",
    "ExactIndex",
    "ExactSearchStore",
    "IndexStatus",
    "Labels",
    "NearbyTask",
    "Neighbour",
    "Point",
    "QdrantStore",
    "StoreError",
    "StoreUnavailableError",
    "TaskId",
    "VectorStore",
    "open_store",
    "point_id",
]


def open_store(
    *,
    path: Path | None = None,
    url: str | None = None,
    api_key: str | None = None,
    exact_max_points: int = DEFAULT_EXACT_MAX_POINTS,
    shards: int = 1,
    replication_factor: int = 1,
    engine: Literal["local", "edge"] = "edge",
    preprocessing: Mapping[str, str] | None = None,
    edge_vectors: str = "int8",
) -> VectorStore:
    """The store for this deployment: a server when `url` is set, else in-process under `path`.

    In-process, `engine="edge"` (the default) is Qdrant Edge, which searches exactly up to
    `exact_max_points` labelled points itself and by HNSW above. `engine="local"` is
    qdrant-client's local mode, a stand-in for the server's API in tests: the exact in-memory
    index goes in front of it (this process is its only writer, so the cache cannot go stale).
    `preprocessing` (Settings.preprocessing) is recorded in new generations, and vectors made
    with other preprocessing are refused like another encoder's.

    A local-mode store found at `path` by the Edge engine (a MODEL_DIR written before Edge was
    the default) is migrated first, once, and verified before anything moves (migrate.py).
    """
    if engine == "edge" and not url:
        from .edge_store import EdgeStore  # imported when chosen: the engine is a native module
        from .migrate import migrate_local_store, needs_migration

        if path is not None and needs_migration(path):
            migrate_local_store(path, exact_max_points=exact_max_points)

        return EdgeStore.open(
            path=path,
            exact_max_points=exact_max_points,
            preprocessing=preprocessing,
            vector_storage=edge_vectors,
        )
    store = QdrantStore.open(
        path=path,
        url=url,
        api_key=api_key,
        shards=shards,
        replication_factor=replication_factor,
        preprocessing=preprocessing,
    )
    if store.single_writer and exact_max_points > 0:
        return ExactSearchStore(store, max_points=exact_max_points)
    return store
