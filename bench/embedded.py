"""Section 5: the embedded default on Qdrant Edge against the embedded store before it, through
the app, in one run (issue 19's table).

Before: qdrant-client's local mode behind the in-memory matmul cache, served in memory
(`bench.server --store local-memory`; on disk it also pickles every point into SQLite, so its
upsert rate is measured on disk separately, as the product wrote it). After: Qdrant Edge under a
MODEL_DIR, opened as `echolabel serve` opens it, exact up to the settings' threshold and HNSW
above (also served with the threshold at 0, to show what HNSW costs and recalls at that size).
At the large size, Edge alone: filled, indexed, served, then restarted on the same directory.
Every claim is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import latent_clusters
from .latency import _load
from .profiles import EmbeddedProfile, Profile
from .report import SectionResult, Table
from .server import QUERY_TASK_BASE, QUERY_TASKS, BackendProcess, predict_body
from .timing import summarize

SERVE_COLUMNS = [
    ("store", "store"),
    ("n", "labelled points"),
    ("health_p50_ms", "GET /health p50 ms"),
    ("predict_p50_ms", "/predict p50 ms"),
    ("predict_vs_health_x", "/predict ÷ /health"),
    ("health_app_ms", "/health in the app ms"),
    ("predict_app_ms", "/predict in the app ms"),
    ("predict_call_ms", "of which predicting ms"),
    ("rps_1", "req/s, 1 client"),
    ("rps_8", "req/s, 8 clients"),
    ("clients_8_vs_1_x", "8 ÷ 1 client"),
    ("recall_at_k", "recall@10 vs exact"),
    ("search_ms", "search ms (in process)"),
]
UPSERT_COLUMNS = [
    ("store", "store"),
    ("points", "points"),
    ("upsert_s", "seconds in upsert"),
    ("points_per_s", "points/s"),
    ("vs_before_x", "× before"),
]
RESTART_COLUMNS = [
    ("n", "labelled points"),
    ("fill_s", "fill s"),
    ("index_s", "index build s"),
    ("restart_to_first_answer_s", "restart to first answer s"),
    ("store_ready_s", "of which the store: open, index check, first search"),
    ("index_rebuilt", "index rebuilt at restart"),
    ("rss_bytes", "RSS after restart and requests"),
    ("rss_per_point_bytes", "RSS per point (less the process before the store)"),
    ("rss_vs_raw_x", "÷ raw vector"),
]
BEFORE = "before: local mode + matmul cache"
# The store before Edge answered from its matmul cache up to this many labelled points (its
# default then); today's default threshold (Edge's) would leave it to local mode's Python scan.
BEFORE_EXACT_MAX_POINTS = 100_000
EDGE = "Qdrant Edge (default threshold)"
EDGE_HNSW = "Qdrant Edge, HNSW (threshold 0)"
EDGE_UNMERGED = "Qdrant Edge (default threshold), concurrent searches not merged"

Log = Callable[[str], None]


def run(profile: Profile, log: Log) -> SectionResult:
    settings = profile.embedded
    result = SectionResult("embedded")
    serve = result.table("The embedded store through the app (vector stored)", SERVE_COLUMNS)
    upserts = result.table("Sustained upserts", UPSERT_COLUMNS)
    restart = result.table("Qdrant Edge at the large size: restart and memory", RESTART_COLUMNS)
    findings: dict[str, Any] = {}
    for n in settings.sizes:
        for store, label, env, max_batch in (
            (
                "local-memory",
                BEFORE,
                {"ECHOLABEL_EXACT_SEARCH_MAX_POINTS": str(BEFORE_EXACT_MAX_POINTS)},
                None,
            ),
            ("edge", EDGE, {}, None),
            ("edge", EDGE_UNMERGED, {}, 1),
            ("edge", EDGE_HNSW, {"ECHOLABEL_EXACT_SEARCH_MAX_POINTS": "0"}, None),
        ):
            log(f"embedded: {label}, {n:,} points")
            with _server(settings, profile, n, store, env=env, max_batch=max_batch) as backend:
                serve.add(_serve_row(backend, settings, label, n))
    before_rate = _local_disk_upserts(settings, profile.seed)
    upserts.add(_upsert_row(BEFORE + " (on disk)", settings.baseline_upserts, before_rate, None))
    _large(settings, profile, log, serve, upserts, restart, before_rate, findings)
    _ratios(serve.rows)
    result.findings = findings
    return result


def _server(
    settings: EmbeddedProfile,
    profile: Profile,
    n: int,
    store: str,
    *,
    env: dict[str, str] | None = None,
    model_dir: Path | None = None,
    reuse: bool = False,
    max_batch: int | None = None,
) -> BackendProcess:
    return BackendProcess(
        n,
        settings.dim,
        settings.encoder,
        seed=profile.seed,
        store=store,
        model_dir=model_dir,
        reuse=reuse,
        env=env,
        timeout_s=7200.0,
        max_batch=max_batch,
    )


def _serve_row(
    backend: BackendProcess, settings: EmbeddedProfile, label: str, n: int
) -> dict[str, Any]:
    row: dict[str, Any] = {"store": label, "n": n}
    for clients in settings.clients:
        backend.ask("timings")  # forget what came before
        health = _load(backend.url, clients, settings.requests, lambda h, i: h.get("/health"))
        health_in = backend.ask("timings")
        predict = _load(
            backend.url,
            clients,
            settings.requests,
            lambda h, i: h.post(
                "/predict", json=predict_body(QUERY_TASK_BASE + i % QUERY_TASKS, "none.png")
            ),
        )
        row[f"rps_{clients}"] = len(predict["samples"]) / predict["elapsed_s"]
        if clients == 1:
            # Where the time goes inside the server: the rest is HTTP parsing, sockets, client.
            predict_in = backend.ask("timings")
            row["health_app_ms"] = health_in["app_p50_ms"].get("/health")
            row["predict_app_ms"] = predict_in["app_p50_ms"].get("/predict")
            row["predict_call_ms"] = predict_in["predict_call_p50_ms"]
            row["health_p50_ms"] = summarize(health["samples"]).ms("latency")["latency_p50_ms"]
            row["predict_p50_ms"] = summarize(predict["samples"]).ms("latency")["latency_p50_ms"]
    found = backend.ask(f"recall {settings.k}")
    row["recall_at_k"] = found["recall"]
    row["search_ms"] = found["search_ms"]
    return row


def _ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row.get("health_p50_ms"):
            row["predict_vs_health_x"] = row["predict_p50_ms"] / row["health_p50_ms"]
        if row.get("rps_1") and row.get("rps_8"):
            row["clients_8_vs_1_x"] = row["rps_8"] / row["rps_1"]


def _local_disk_upserts(settings: EmbeddedProfile, seed: int) -> float:
    """Points a second the embedded store before Edge took on disk, timed inside `upsert`."""
    from vectorstore import Point, QdrantStore

    path = Path(tempfile.mkdtemp(prefix="echolabel-bench-local-"))
    store = QdrantStore.open(path=path)
    try:
        store.ensure_collection(1, settings.encoder, settings.dim, "bench")
        vectors = latent_clusters(settings.baseline_upserts, settings.dim, seed=seed + 1)
        spent = 0.0
        for start in range(0, len(vectors), 1_000):
            points = [
                Point(task=start + i, vector=row, labels={"finding": "benign"})
                for i, row in enumerate(vectors[start : start + 1_000])
            ]
            began = time.perf_counter()
            store.upsert(1, settings.encoder, points)
            spent += time.perf_counter() - began
        return len(vectors) / spent
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def _upsert_row(store: str, points: int, rate: float, before: float | None) -> dict[str, Any]:
    return {
        "store": store,
        "points": points,
        "upsert_s": points / rate,
        "points_per_s": rate,
        "vs_before_x": rate / before if before else None,
    }


def _large(
    settings: EmbeddedProfile,
    profile: Profile,
    log: Log,
    serve: Table,
    upserts: Table,
    restart: Table,
    before_rate: float,
    findings: dict[str, Any],
) -> None:
    n = settings.large
    model_dir = Path(tempfile.mkdtemp(prefix="echolabel-bench-embedded-"))
    try:
        log(f"embedded: Qdrant Edge, filling and indexing {n:,} points")
        with _server(settings, profile, n, "edge", model_dir=model_dir) as backend:
            filled = backend.ready
            log(
                f"embedded: filled in {filled['fill_s']:.0f} s, "
                f"indexed in {filled['index_s']:.0f} s"
            )
            serve.add(_serve_row(backend, settings, EDGE, n))
        upserts.add(_upsert_row(EDGE, n, n / filled["upsert_s"], before_rate))
        log("embedded: restarting on the same MODEL_DIR")
        with _server(settings, profile, n, "edge", model_dir=model_dir, reuse=True) as again:
            first = time.perf_counter()
            answer = _load(
                again.url,
                1,
                1,
                lambda h, i: h.post("/predict", json=predict_body(QUERY_TASK_BASE, "none.png")),
            )
            to_first = again.ready_s + (time.perf_counter() - first)
            _load(
                again.url,
                1,
                settings.requests,
                lambda h, i: h.post(
                    "/predict", json=predict_body(QUERY_TASK_BASE + i % QUERY_TASKS, "none.png")
                ),
            )
            stats = again.ask("stats")
            base = again.ready["rss"]["imported"]
            restart.add(
                {
                    "n": n,
                    "fill_s": filled["fill_s"],
                    "index_s": filled["index_s"],
                    "restart_to_first_answer_s": to_first,
                    "store_ready_s": again.ready["open_s"]
                    + again.ready["index_s"]
                    + again.ready["search_warm_s"],
                    "index_rebuilt": again.ready["index_built"],
                    "rss_bytes": stats["rss"],
                    "rss_per_point_bytes": (stats["rss"] - base) / n,
                    "rss_vs_raw_x": (stats["rss"] - base) / n / (settings.dim * 4),
                }
            )
            findings["large"] = {"filled": filled, "restarted": again.ready, "stats": stats}
            findings["first_answer_s"] = answer["elapsed_s"]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
