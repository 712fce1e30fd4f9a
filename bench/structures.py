"""The search structures compared: exact (matmul, KD-tree, Ball tree) and approximate (HNSW).

Each builds over unit float32 rows and answers top-k by cosine (Euclidean order on unit rows),
one query at a time and in batches. A structure may offer several query *variants* over one
build (qdrant-client local mode with and without the store's `labelled` filter; Qdrant Edge
with its HNSW index and with exact search), so a variant costs no second build.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import hnswlib
import numpy as np
import qdrant_edge as edge
from qdrant_client import QdrantClient, models
from scipy.spatial import cKDTree
from sklearn.neighbors import BallTree as SkBallTree

from vectorstore import ExactIndex

# Qdrant's defaults (m=16, ef_construct=100, search ef = ef_construct), used for both HNSW
# implementations so that they are compared at the same setting.
HNSW_M = 16
HNSW_EF_CONSTRUCT = 100
HNSW_EF = 100
# A second, wider search over the same graph: what recall costs when the default falls short.
HNSW_EF_WIDE = 400
_UPSERT_CHUNK = 1_000

Query = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Variant:
    """One way of querying a built structure: one vector → k ids, (b, d) → (b, k) ids."""

    single: Query
    batch: Query
    approximate: bool


class Structure(Protocol):
    name: str
    # Copies of the raw float32 matrix the structure holds besides the caller's (skip rule).
    memory_factor: float
    builds_index: bool  # an HNSW graph: a long build, paid once per collection generation
    parameters: dict[str, Any]

    def build(self, data: np.ndarray) -> None: ...

    def variants(self) -> dict[str, Variant]: ...

    def findings(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def top_k_exact(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact top-k ids of each query by inner product, best first (the recall reference)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ data.T
        out[start : start + chunk] = _best(sims, k)
    return out


def _best(sims: np.ndarray, k: int) -> np.ndarray:
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class Matmul:
    """NumPy exact search: the store's own `ExactIndex` for one query, one GEMM per batch."""

    name = "matmul"
    memory_factor = 0.0
    builds_index = False
    parameters: ClassVar[dict[str, Any]] = {}

    def __init__(self, k: int) -> None:
        self.k = k
        self.index: ExactIndex | None = None

    def build(self, data: np.ndarray) -> None:
        self.index = ExactIndex(data, "matmul")

    def variants(self) -> dict[str, Variant]:
        index = self._built()
        return {
            self.name: Variant(
                single=lambda q: index.search(q, self.k)[0],
                batch=lambda qs: _best(qs @ index.vectors.T, self.k),
                approximate=False,
            )
        }

    def _built(self) -> ExactIndex:
        if self.index is None:
            raise RuntimeError("build() first")
        return self.index

    def findings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.index = None


class KDTree:
    """scipy's cKDTree (the paper's choice); Euclidean order equals cosine order on unit rows."""

    name = "kdtree"
    memory_factor = 2.0  # scipy keeps a float64 copy
    builds_index = False
    parameters: ClassVar[dict[str, Any]] = {"leafsize": 16}

    def __init__(self, k: int) -> None:
        self.k = k
        self.tree: Any = None

    def build(self, data: np.ndarray) -> None:
        self.tree = cKDTree(data, leafsize=16)

    def variants(self) -> dict[str, Variant]:
        tree = self.tree
        return {
            self.name: Variant(
                single=lambda q: np.atleast_1d(tree.query(q, self.k)[1]),
                batch=lambda qs: tree.query(qs, self.k, workers=-1)[1],
                approximate=False,
            )
        }

    def findings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.tree = None


class BallTree:
    """scikit-learn's BallTree (the paper's second choice)."""

    name = "balltree"
    memory_factor = 2.0  # scikit-learn keeps a float64 copy
    builds_index = False
    parameters: ClassVar[dict[str, Any]] = {"leaf_size": 40}

    def __init__(self, k: int) -> None:
        self.k = k
        self.tree: Any = None

    def build(self, data: np.ndarray) -> None:
        self.tree = SkBallTree(data, leaf_size=40)

    def variants(self) -> dict[str, Variant]:
        tree = self.tree
        return {
            self.name: Variant(
                single=lambda q: tree.query(q[None, :], self.k, return_distance=False)[0],
                batch=lambda qs: tree.query(qs, self.k, return_distance=False),
                approximate=False,
            )
        }

    def findings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.tree = None


class QdrantLocal:
    """qdrant-client's in-process mode (what the embedded store falls back to).

    Two variants: the plain query (the engine's own cost) and the query QdrantStore.nearest
    sends, with its `labelled` filter, which local mode evaluates point by point in Python.
    In-memory (`:memory:`): the on-disk mode keeps the same arrays and adds SQLite writes.
    """

    name = "qdrant_local"
    memory_factor = 1.5
    builds_index = False
    parameters: ClassVar[dict[str, Any]] = {"location": ":memory:", "distance": "cosine"}
    _collection = "bench"

    def __init__(self, k: int) -> None:
        self.k = k
        self.client: Any = None

    def build(self, data: np.ndarray) -> None:
        self.client = QdrantClient(":memory:")
        self.client.create_collection(
            self._collection,
            vectors_config=models.VectorParams(size=data.shape[1], distance=models.Distance.COSINE),
        )
        with warnings.catch_warnings():
            # Local mode warns past 20k points; measuring that regime is the point here.
            warnings.simplefilter("ignore", UserWarning)
            for start in range(0, len(data), _UPSERT_CHUNK):
                rows = data[start : start + _UPSERT_CHUNK]
                self.client.upsert(
                    self._collection,
                    points=[
                        models.PointStruct(
                            id=start + i, vector=row.tolist(), payload={"labelled": True}
                        )
                        for i, row in enumerate(rows)
                    ],
                )

    def variants(self) -> dict[str, Variant]:
        labelled = models.Filter(
            must=[models.FieldCondition(key="labelled", match=models.MatchValue(value=True))]
        )
        out = {}
        for label, condition in ((self.name, None), (f"{self.name}+filter", labelled)):
            out[label] = Variant(
                single=lambda q, c=condition: self._single(q, c),
                batch=lambda qs, c=condition: self._batch(qs, c),
                approximate=False,
            )
        return out

    def _single(self, query: np.ndarray, condition: Any) -> np.ndarray:
        result = self.client.query_points(
            self._collection, query=query.tolist(), query_filter=condition, limit=self.k
        )
        return np.array([p.id for p in result.points], dtype=np.int64)

    def _batch(self, queries: np.ndarray, condition: Any) -> np.ndarray:
        results = self.client.query_batch_points(
            self._collection,
            requests=[
                models.QueryRequest(query=q.tolist(), filter=condition, limit=self.k)
                for q in queries
            ],
        )
        return np.array([[p.id for p in r.points] for r in results], dtype=np.int64)

    def findings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class QdrantEdge:
    """Qdrant Edge: Qdrant's Rust engine in-process, with its HNSW index built (optimize()).

    Variants: the HNSW search at Qdrant's default ef and at a wider ef, and the engine's exact
    scan. The WAL is off for the bulk load, as a store would do while building a generation.
    """

    name = "qdrant_edge"
    memory_factor = 1.3
    builds_index = True
    parameters: ClassVar[dict[str, Any]] = {
        "m": HNSW_M,
        "ef_construct": HNSW_EF_CONSTRUCT,
        "hnsw_ef": ["default (ef_construct)", HNSW_EF_WIDE],
        "full_scan_threshold_kb": 10_000,
        "wal": False,
    }

    def __init__(self, k: int) -> None:
        self.k = k
        self.shard: Any = None
        self.path: Path | None = None
        self.points = 0

    def build(self, data: np.ndarray) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="echolabel-bench-edge-"))
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=data.shape[1], distance=edge.Distance.Cosine),
            hnsw_config=edge.HnswIndexConfig(
                m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000
            ),
            wal_enabled=False,
        )
        self.shard = edge.EdgeShard.create(str(self.path), config)
        for start in range(0, len(data), _UPSERT_CHUNK):
            rows = data[start : start + _UPSERT_CHUNK]
            points = [
                edge.Point(start + i, row.tolist(), {"labelled": True})
                for i, row in enumerate(rows)
            ]
            self.shard.update(edge.UpdateOperation.upsert_points(points))
        self.shard.optimize()  # builds the HNSW graph; a query before it would scan
        self.points = len(data)

    def variants(self) -> dict[str, Variant]:
        out = {}
        for label, params, approximate in (
            (self.name, None, True),
            (f"{self.name} ef={HNSW_EF_WIDE}", edge.SearchParams(hnsw_ef=HNSW_EF_WIDE), True),
            (f"{self.name} exact", edge.SearchParams(exact=True), False),
        ):
            out[label] = Variant(
                single=lambda q, p=params: self._ids(self.shard.query(self._request(q, p))),
                batch=lambda qs, p=params: np.array(
                    [
                        self._ids(r)
                        for r in self.shard.query_batch(
                            edge.QueryBatchRequest([self._request(q, p) for q in qs])
                        )
                    ]
                ),
                approximate=approximate,
            )
        return out

    def _request(self, query: np.ndarray, params: Any) -> Any:
        return edge.QueryRequest(
            limit=self.k, query=edge.Query.Nearest(query.tolist()), params=params
        )

    @staticmethod
    def _ids(points: list[Any]) -> np.ndarray:
        return np.array([p.id for p in points], dtype=np.int64)

    def findings(self) -> dict[str, Any]:
        """Whether a boolean payload filter works (the store filters on `labelled: true`)."""
        labelled = edge.Filter(
            must=[edge.FieldCondition(key="labelled", match=edge.MatchValue(True))]
        )
        matched = self.shard.count(edge.CountRequest(filter=labelled))
        info = self.shard.info()
        return {
            "bool_filter_matched": matched,
            "points": self.points,
            "segments": info.segments_count,
            "indexed_vectors": info.indexed_vectors_count,
            "disk_bytes": _disk_bytes(self.path) if self.path else None,
        }

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


class Hnswlib:
    """hnswlib's HNSW over inner product (cosine on unit rows), at Qdrant's default settings."""

    name = "hnswlib"
    memory_factor = 1.2
    builds_index = True
    parameters: ClassVar[dict[str, Any]] = {
        "M": HNSW_M,
        "ef_construction": HNSW_EF_CONSTRUCT,
        "ef": [HNSW_EF, HNSW_EF_WIDE],
    }

    def __init__(self, k: int) -> None:
        self.k = k
        self.index: Any = None

    def build(self, data: np.ndarray) -> None:
        self.index = hnswlib.Index(space="ip", dim=data.shape[1])
        self.index.init_index(
            max_elements=len(data), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCT, random_seed=0
        )
        self.index.add_items(data, np.arange(len(data)), num_threads=-1)

    def variants(self) -> dict[str, Variant]:
        out = {}
        for label, ef in ((self.name, HNSW_EF), (f"{self.name} ef={HNSW_EF_WIDE}", HNSW_EF_WIDE)):
            out[label] = Variant(
                single=lambda q, e=ef: self._search(q[None, :], e, threads=1)[0],
                batch=lambda qs, e=ef: self._search(qs, e, threads=-1),
                approximate=True,
            )
        return out

    def _search(self, queries: np.ndarray, ef: int, threads: int) -> np.ndarray:
        self.index.set_ef(ef)  # a field of the index: setting it per call costs nothing
        ids, _ = self.index.knn_query(queries, self.k, num_threads=threads)
        return ids.astype(np.int64)

    def findings(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.index = None


FACTORIES: dict[str, Callable[[int], Structure]] = {
    "matmul": Matmul,
    "kdtree": KDTree,
    "balltree": BallTree,
    "qdrant_local": QdrantLocal,
    "qdrant_edge": QdrantEdge,
    "hnswlib": Hnswlib,
}


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
