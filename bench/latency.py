"""Section 2: /predict latency over real loopback HTTP, 1 and 8 concurrent clients.

Two cases per store size: the task's vector is already stored (what Label Studio asks after
pre-embedding: search + vote + HTTP), and the task's image is embedded on request (fetch,
decode, encoder forward, upsert, then the same). Once, at the middle size, the in-process
predict is profiled to say where the time goes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from .data import image_paths
from .profiles import LatencyProfile, Profile
from .report import SectionResult, Table
from .server import EMBED_TASK_BASE, QUERY_TASK_BASE, QUERY_TASKS, BackendProcess, predict_body
from .timing import ratio, summarize

FLOOR = "GET /health (HTTP floor)"
STORED = "vector stored"

COLUMNS = [
    ("n", "labelled points"),
    ("case", "case"),
    ("clients", "clients"),
    ("requests", "requests"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p95_ms", "p95 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("throughput_rps", "requests/s"),
    ("vs_one_client_x", "p50 × 1 client"),
    ("vs_stored_x", "p50 × vector stored"),
]


def run(profile: Profile, log: Callable[[str], None]) -> SectionResult:
    settings = profile.latency
    result = SectionResult("latency")
    table = result.table("/predict over loopback HTTP (one task per request)", COLUMNS)
    images = _images(profile, settings, table)
    middle = settings.sizes[len(settings.sizes) // 2]
    findings: dict[str, Any] = {"servers": {}}
    embed_counter = iter(range(EMBED_TASK_BASE, EMBED_TASK_BASE + 10**9))
    for n in settings.sizes:
        log(f"latency: starting a backend with {n:,} labelled points")
        with BackendProcess(
            n,
            settings.dim,
            settings.encoder,
            queries=QUERY_TASKS,
            images=profile.images_dir if images else None,
            load_encoder=bool(images),
            seed=profile.seed,
        ) as backend:
            log(f"latency: filled in {backend.ready['fill_s']:.1f} s ({backend.ready['store']})")
            rows = []
            for clients in settings.clients:
                floor = _load(
                    backend.url, clients, settings.stored_requests, lambda h, i: h.get("/health")
                )
                rows.append(_row(n, FLOOR, clients, floor))
                stored = _load(
                    backend.url,
                    clients,
                    settings.stored_requests,
                    lambda h, i: h.post(
                        "/predict",
                        json=predict_body(QUERY_TASK_BASE + i % QUERY_TASKS, "none.png"),
                    ),
                )
                rows.append(_row(n, STORED, clients, stored))
                if images:
                    embedded = _load(
                        backend.url,
                        clients,
                        settings.embedded_requests,
                        lambda h, i: h.post(
                            "/predict",
                            json=predict_body(next(embed_counter), images[i % len(images)]),
                        ),
                    )
                    rows.append(_row(n, "embedding included", clients, embedded))
                log(f"latency: n={n:,}, {clients} client(s) done")
            if n == middle and settings.profile_calls:
                findings["profile"] = {"n": n, **backend.ask(f"profile {settings.profile_calls}")}
            stats = backend.ask("stats")
            findings["servers"][n] = {**backend.ready, **stats}
        _fill_ratios(rows)
        for row in rows:
            table.add(row)
    if "profile" in findings:
        _profile_table(result, findings["profile"], table.rows)
    result.findings = findings
    return result


def _images(profile: Profile, settings: LatencyProfile, table: Table) -> list[str]:
    """Image references (relative to the local-files root) for the embedding case."""
    if settings.embedded_requests <= 0:
        table.skip("embedding included", "the profile asks for no embedded requests")
        return []
    paths = image_paths(profile.images_dir)
    if not paths:
        table.skip("embedding included", f"no images under {profile.images_dir}")
        return []
    return [str(p.relative_to(profile.images_dir)) for p in paths]


def _load(
    url: str, clients: int, total: int, send: Callable[[httpx.Client, int], httpx.Response]
) -> dict[str, Any]:
    """`total` requests from `clients` threads, each with its own keep-alive connection."""
    per_client = math.ceil(total / clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.get("/health")  # open the connection before the clock starts
            start.wait()
            for i in range(per_client):
                sent = time.perf_counter()
                response = send(http, index * per_client + i)
                latencies[index].append(time.perf_counter() - sent)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} of the bench's requests failed; first: {errors[0]}")
    samples = [s for per in latencies for s in per]
    return {"samples": samples, "elapsed_s": elapsed}


def _row(n: int, case: str, clients: int, measured: dict[str, Any]) -> dict[str, Any]:
    summary = summarize(measured["samples"])
    return {
        "n": n,
        "case": case,
        "clients": clients,
        "requests": summary.n,
        **summary.ms("latency", p99=True),
        "throughput_rps": summary.n / measured["elapsed_s"],
    }


def _fill_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the same case with one client, and against the stored-vector case."""
    one_client = {r["case"]: r for r in rows if r["clients"] == 1}
    stored = {r["clients"]: r for r in rows if r["case"] == STORED}
    for row in rows:
        base = one_client.get(row["case"], {})
        row["vs_one_client_x"] = ratio(row["latency_p50_ms"], base.get("latency_p50_ms"))
        row["vs_stored_x"] = ratio(
            row["latency_p50_ms"], stored.get(row["clients"], {}).get("latency_p50_ms")
        )


def _profile_table(
    result: SectionResult, profiled: dict[str, Any], http_rows: list[dict[str, Any]]
) -> None:
    """The in-process predict's wall time beside HTTP's, then its heaviest functions."""
    http = next(
        (
            r
            for r in http_rows
            if r["n"] == profiled["n"] and r["clients"] == 1 and r["case"] == STORED
        ),
        None,
    )
    table = result.table(
        f"Where /predict's time goes at {profiled['n']:,} points (vector stored; cProfile of "
        f"{profiled['calls']} in-process calls; HTTP p50 {http['latency_p50_ms']:.3g} ms vs "
        f"in-process {profiled['predict_wall_ms']:.3g} ms)"
        if http
        else f"Where /predict's time goes at {profiled['n']:,} points",
        [
            ("function", "function (cumulative, per predict)"),
            ("calls_per_predict", "calls"),
            ("cumulative_ms", "cumulative ms"),
            ("own_ms", "own ms"),
            ("share", "share of predict"),
        ],
    )
    total = next(
        (
            r["cumulative_ms"]
            for r in profiled["top_cumulative"]
            if "(predict_request)" in r["function"]
        ),
        None,
    )
    for row in profiled["top_cumulative"][:15]:
        table.add({**row, "share": ratio(row["cumulative_ms"], total)})
