"""Section 4: bytes per stored point against the raw vector, and the backend's peak RSS.

The backend's numbers come from a real backend process (bench.server) that reports its RSS
after each phase: imports, the store filled, the exact-search cache loaded, the encoder
loaded; its peak after serving requests. The on-disk footprint of the embedded store and
Qdrant Edge's footprint are measured in this process on a smaller store of the same vectors.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from .data import image_paths, latent_clusters
from .profiles import Profile
from .report import SectionResult, Table
from .server import EMBED_TASK_BASE, QUERY_TASK_BASE, QUERY_TASKS, BackendProcess, predict_body
from .timing import ratio

DISK_POINTS = 10_000  # the on-disk stores are filled to at most this many points

COLUMNS = [
    ("what", "what"),
    ("points", "points"),
    ("bytes_per_point", "bytes/point"),
    ("vs_raw_x", "× raw float32 vector"),
    ("total_mib", "total MiB"),
]


def run(profile: Profile, log: Callable[[str], None]) -> SectionResult:
    settings = profile.memory
    result = SectionResult("memory")
    raw = settings.dim * 4
    table = result.table(
        f"Memory per stored point, {settings.dim}-d float32 vectors (raw {raw:,} B/point)",
        COLUMNS,
    )
    images = image_paths(profile.images_dir)
    log(f"memory: starting a backend with {settings.points:,} labelled points")
    with BackendProcess(
        settings.points,
        settings.dim,
        settings.encoder,
        images=profile.images_dir if images else None,
        load_encoder=bool(images),
        seed=profile.seed,
    ) as backend:
        rss = backend.ready["rss"]
        _serve_some(
            backend.url,
            [str(p.relative_to(profile.images_dir)) for p in images],
            settings.requests,
        )
        stats = backend.ask("stats")
    n = settings.points
    _row(
        table,
        "qdrant-client local mode, in RAM (RSS growth while filling)",
        n,
        rss["filled"] - rss["imported"],
        raw,
    )
    _row(
        table,
        "exact-search cache (ExactSearchStore, RSS growth when loaded)",
        n,
        rss["search_ready"] - rss["filled"],
        raw,
    )
    _row(
        table,
        "backend RSS with store and cache (before the encoder)",
        n,
        rss["search_ready"],
        raw,
        per_point=False,
    )
    _row(
        table, "backend peak RSS after serving /predict", n, stats["peak_rss"], raw, per_point=False
    )
    disk_points = min(n, DISK_POINTS)
    vectors = latent_clusters(disk_points, settings.dim, seed=profile.seed)
    _row(
        table,
        "qdrant-client local mode on disk (MODEL_DIR/qdrant)",
        disk_points,
        _local_disk_bytes(vectors),
        raw,
    )
    edge_rss, edge_disk = _edge_bytes(vectors)
    _row(
        table,
        "Qdrant Edge with HNSW, RSS of the loaded shard after queries",
        disk_points,
        edge_rss,
        raw,
    )
    _row(table, "Qdrant Edge with HNSW, on disk", disk_points, edge_disk, raw)
    if not images:
        table.skip("encoder and embedding requests", f"no images under {profile.images_dir}")
    result.findings = {
        "backend_rss_phases": rss,
        "backend_peak_rss": stats["peak_rss"],
        "points": n,
        "dim": settings.dim,
        "exact_max_points": backend.ready["exact_max_points"],
    }
    return result


def _row(
    table: Table, what: str, points: int, total_bytes: int, raw: int, per_point: bool = True
) -> None:
    """A footprint row; whole-process totals carry no per-point figure."""
    share = total_bytes / points if per_point else None
    table.add(
        {
            "what": what,
            "points": points,
            "bytes_per_point": share,
            "vs_raw_x": ratio(share, raw),
            "total_mib": total_bytes / 2**20,
        }
    )


def _serve_some(url: str, images: list[str], requests: int) -> None:
    """A few predictions of both kinds, so that the peak includes serving them."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(requests):
            stored = http.post(
                "/predict", json=predict_body(QUERY_TASK_BASE + i % QUERY_TASKS, "none.png")
            )
            stored.raise_for_status()
            if images:
                body = predict_body(EMBED_TASK_BASE + i, images[i % len(images)])
                http.post("/predict", json=body).raise_for_status()


def _local_disk_bytes(vectors: Any) -> int:
    """Bytes the embedded store writes under its path for these vectors."""
    from vectorstore import Point, QdrantStore

    path = Path(tempfile.mkdtemp(prefix="echolabel-bench-disk-"))
    try:
        store = QdrantStore.open(path=path)
        store.ensure_collection(1, "bench", vectors.shape[1], "bench")
        for start in range(0, len(vectors), 1_000):
            store.upsert(
                1,
                "bench",
                [
                    Point(task=start + i, vector=v, labels={"finding": "benign"})
                    for i, v in enumerate(vectors[start : start + 1_000])
                ],
            )
        store.close()
        return _disk_bytes(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _edge_bytes(vectors: Any) -> tuple[int, int]:
    """(RSS of a loaded shard, bytes on disk) for Qdrant Edge holding these vectors, HNSW built.

    Built, closed, then loaded again and queried (one exact scan touches every vector), so the
    RSS growth is the loaded shard's and not the upload's Python buffers.
    """
    import qdrant_edge as edge

    from .structures import QdrantEdge

    built = QdrantEdge(k=10)
    built.build(vectors)
    path = built.path
    assert path is not None
    built.shard.close()
    built.shard = None
    try:
        disk = _disk_bytes(path)
        process = psutil.Process()
        before = process.memory_info().rss
        shard = edge.EdgeShard.load(str(path))
        query = edge.Query.Nearest(vectors[0].tolist())
        for params in (None, edge.SearchParams(exact=True)):
            shard.query(edge.QueryRequest(limit=10, query=query, params=params))
        grown = process.memory_info().rss - before
        shard.close()
    finally:
        built.close()
    return grown, disk


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
