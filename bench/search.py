"""Section 1: search structures at growing sizes — build time, query time, recall@10.

Compared side by side in one run: NumPy matmul (the exact baseline and the store's method),
scipy cKDTree and scikit-learn BallTree (Takacs et al.'s choices), qdrant-client's local mode,
Qdrant Edge and hnswlib. A cell (structure × data × size) that would not fit the time or
memory budget is skipped with the estimate that ruled it out, scaled from the same structure's
measurement at the previous size of this run.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from .data import latent_clusters, real_embeddings, repeated_with_noise
from .profiles import Profile, SearchProfile
from .report import SectionResult, Table
from .structures import FACTORIES, Structure, Variant, top_k_exact
from .timing import ratio, summarize, timed

# Takacs et al. 2025, Tables 4 and 5 (seconds; query with L = 10). Their "Vector DB" is a
# Python vector database; their vectors were 256-/384-d.
PAPER = {
    5_000: {"kdtree": (0.011, 0.005), "balltree": (0.120, 0.001), "vector_db": (0.042, 0.015)},
    15_000: {"kdtree": (0.050, 0.016), "balltree": (0.540, 0.004), "vector_db": (0.127, 0.043)},
}
PAPER_PEERS = {"kdtree": "kdtree", "balltree": "balltree", "vector_db": "qdrant_local"}
RECALL_GOAL = 0.98
MIN_QUERIES = 5
# A cell's data plus the structure's copies must stay under this share of available memory.
MEMORY_SHARE = 0.6

COLUMNS = [
    ("data", "data"),
    ("n", "points"),
    ("dim", "dim"),
    ("structure", "structure"),
    ("build_s", "build s"),
    ("build_x", "build × kdtree"),
    ("query_p50_ms", "query p50 ms"),
    ("query_p95_ms", "query p95 ms"),
    ("query_x", "query × matmul"),
    ("batch_p50_ms", "batched ms/query p50"),
    ("batch_p95_ms", "batched ms/query p95"),
    ("batch_x", "batched × matmul"),
    ("recall_at_k", "recall@10"),
    ("bound_x", "× bandwidth bound"),
]


@dataclass(frozen=True)
class Dataset:
    label: str
    dim: int
    sizes: tuple[int, ...]
    draw: Callable[[int, int], np.ndarray]  # (n, seed) → unit float32 rows


@dataclass
class Measured:
    """A structure's cost at the last size it ran, for the next size's estimate."""

    n: int
    build_s: float
    # Single-query p50 of each variant, with whether it is approximate.
    queries: list[tuple[float, bool]]


def run(profile: Profile, log: Callable[[str], None]) -> SectionResult:
    settings = profile.search
    result = SectionResult("search")
    table = result.table(
        f"Top-{settings.k} search: build, single and batched ({settings.batch} queries) query "
        "times, recall against exact",
        COLUMNS,
    )
    bandwidth = read_bandwidth()
    log(f"search: memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    findings: dict[str, Any] = {
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "structure_parameters": {
            name: FACTORIES[name](settings.k).parameters for name in settings.structures
        },
        "edge": {},
    }
    history: dict[tuple[str, str], Measured] = {}
    for dataset in _datasets(profile, table, log):
        for n in dataset.sizes:
            _run_cell(settings, dataset, n, profile.seed, bandwidth, table, history, findings, log)
    findings["crossovers"] = crossovers(table.rows)
    findings["exact_within"] = exact_within(table.rows, (2.0, 10.0))
    result.findings = findings
    _paper_table(result, table.rows)
    return result


def _datasets(profile: Profile, table: Table, log: Callable[[str], None]) -> list[Dataset]:
    settings = profile.search
    out = [
        Dataset("synthetic", dim, sizes, lambda n, seed, d=dim: latent_clusters(n, d, seed))
        for dim, sizes in settings.synthetic
    ]
    for reason in settings.omitted:
        table.notes.append(f"left out by the {profile.name} profile: {reason}")
    if settings.real_sizes:
        from echolabel.encoders import DEFAULT_ENCODER, EncoderError

        try:
            started = time.perf_counter()
            base = real_embeddings(profile.images_dir, DEFAULT_ENCODER, settings.real_images)
            log(
                f"search: embedded {len(base)} BUSI images with {DEFAULT_ENCODER} in "
                f"{time.perf_counter() - started:.0f} s"
            )
            out.append(
                Dataset(
                    f"busi+noise ({len(base)} images)",
                    base.shape[1],
                    settings.real_sizes,
                    lambda n, seed: repeated_with_noise(base, n, seed),
                )
            )
        except (FileNotFoundError, EncoderError) as exc:
            table.skip("real embeddings", f"{exc}")
    return out


def _run_cell(
    settings: SearchProfile,
    dataset: Dataset,
    n: int,
    seed: int,
    bandwidth: float,
    table: Table,
    history: dict[tuple[str, str], Measured],
    findings: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    where = f"{dataset.label} n={n:,} d={dataset.dim}"
    raw_bytes = n * dataset.dim * 4
    available = psutil.virtual_memory().available
    if raw_bytes > MEMORY_SHARE * available:
        table.skip(
            where,
            f"the {raw_bytes / 2**30:.1f} GiB matrix exceeds {MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GiB available",
        )
        return
    data = dataset.draw(n, seed)
    queries = dataset.draw(settings.queries, seed + 1)
    truth = top_k_exact(data, queries, settings.k)
    rows: list[dict[str, Any]] = []
    for name in settings.structures:
        key = (name, f"{dataset.label}/{dataset.dim}")
        structure = FACTORIES[name](settings.k)
        reason = _skip_reason(structure, history.get(key), n, raw_bytes, settings)
        if reason:
            table.skip(f"{name} at {where}", reason)
            continue
        build_s = _build(structure, data, settings)
        measured = Measured(n, build_s, [])
        for label, variant in structure.variants().items():
            row = {"data": dataset.label, "n": n, "dim": dataset.dim, "structure": label}
            row["build_s"] = build_s
            row.update(_query(variant, queries, truth, settings, table, f"{label} at {where}"))
            if not variant.approximate:
                row["bound_x"] = ratio(row["query_p50_ms"] / 1000, raw_bytes / bandwidth)
            rows.append(row)
            measured.queries.append((row["query_p50_ms"] / 1000, variant.approximate))
            log(
                f"search: {where} {label}: build {build_s:.3g} s, query p50 "
                f"{row['query_p50_ms']:.3g} ms, recall {row['recall_at_k']:.3f}"
            )
        history[key] = measured
        if name == "qdrant_edge":
            findings["edge"][where] = structure.findings()
        structure.close()
    _fill_ratios(rows)
    for row in rows:
        table.add(row)


def _skip_reason(
    structure: Structure,
    previous: Measured | None,
    n: int,
    raw_bytes: int,
    settings: SearchProfile,
) -> str | None:
    needed = (1 + structure.memory_factor) * raw_bytes
    available = psutil.virtual_memory().available
    if needed > MEMORY_SHARE * available:
        return (
            f"needs about {needed / 2**30:.1f} GiB (data + {structure.memory_factor:g} copies), "
            f"over {MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available"
        )
    if previous is None:
        return None
    # Builds grow as n log n, HNSW graphs faster at 10× (n^1.3: measured here, cache misses);
    # exact queries as n; HNSW queries as √n, on the safe side of their logarithmic growth.
    scale = n / previous.n
    build = previous.build_s * scale * math.log(n) / math.log(previous.n)
    if structure.builds_index:
        build = previous.build_s * scale**1.3
    query = sum(s * (math.sqrt(scale) if approx else scale) for s, approx in previous.queries)
    estimate = build + MIN_QUERIES * query
    budget = settings.index_budget_s if structure.builds_index else settings.cell_budget_s
    if estimate > budget:
        return (
            f"estimated {estimate:.0f} s (build {build:.0f} s + {MIN_QUERIES} queries of "
            f"{query * 1000:.0f} ms, scaled from {previous.n:,} points in this run) exceeds the "
            f"{budget:.0f} s budget per {'index' if structure.builds_index else 'structure'} "
            "and cell"
        )
    return None


def _build(structure: Structure, data: np.ndarray, settings: SearchProfile) -> float:
    """Median build time over up to `build_repeats` builds; the last one stays for queries."""
    samples: list[float] = []
    for attempt in range(settings.build_repeats):
        if attempt:
            structure.close()
        samples.append(timed(lambda: structure.build(data)))
        if sum(samples) > settings.build_budget_s:
            break
    return summarize(samples).median


def _query(
    variant: Variant,
    queries: np.ndarray,
    truth: np.ndarray,
    settings: SearchProfile,
    table: Table,
    where: str,
) -> dict[str, Any]:
    variant.single(queries[0])  # warm-up: first-call allocations and lazy loads
    samples: list[float] = []
    hits = 0
    spent = 0.0
    for i, query in enumerate(queries):
        begin = time.perf_counter()
        ids = variant.single(query)
        samples.append(time.perf_counter() - begin)
        hits += len(set(ids.tolist()) & set(truth[i].tolist()))
        spent += samples[-1]
        if len(samples) >= MIN_QUERIES and spent > settings.query_budget_s:
            break
    single = summarize(samples)
    row: dict[str, Any] = {
        **single.ms("query"),
        "queries": single.n,
        "recall_at_k": hits / (single.n * settings.k),
    }
    batch = queries[: settings.batch]
    estimate = single.median * len(batch)
    if estimate > settings.query_budget_s:
        table.skip(
            f"batched queries of {where}",
            f"one batch would take about {estimate:.0f} s at the single-query rate",
        )
        return row
    batch_samples: list[float] = []
    spent = 0.0
    for _ in range(5):
        begin = time.perf_counter()
        variant.batch(batch)
        batch_samples.append((time.perf_counter() - begin) / len(batch))
        spent += batch_samples[-1] * len(batch)
        if spent > settings.query_budget_s / 2:
            break
    row.update(summarize(batch_samples).ms("batch"))
    return row


def _fill_ratios(rows: list[dict[str, Any]]) -> None:
    """Build time against cKDTree's, query times against matmul's, in the same cell."""
    by_name = {row["structure"]: row for row in rows}
    kdtree = by_name.get("kdtree", {})
    matmul = by_name.get("matmul", {})
    for row in rows:
        row["build_x"] = ratio(row.get("build_s"), kdtree.get("build_s"))
        row["query_x"] = ratio(row.get("query_p50_ms"), matmul.get("query_p50_ms"))
        row["batch_x"] = ratio(row.get("batch_p50_ms"), matmul.get("batch_p50_ms"))


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a large float32 array, on every core).

    The bound for exact search is reading the matrix once at this rate.
    """
    array = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    parts = np.array_split(array, workers)
    with ThreadPoolExecutor(workers) as pool:
        # numpy releases the GIL inside the reduction, so the threads read in parallel.
        def read() -> None:
            list(pool.map(np.sum, parts))

        read()
        best = min(timed(read) for _ in range(repeats))
    return array.nbytes / best


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and structure: the size where its query p50 meets matmul's.

    Interpolated geometrically between the two measured sizes that bracket ratio 1; None
    when one side wins at every measured size. Approximate structures count only at sizes
    where their recall@10 meets the goal.
    """
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, int, str], list[tuple[int, float, float]]] = {}
    for row in rows:
        if row["structure"] == "matmul" or row.get("query_x") is None:
            continue
        key = (row["data"], row["dim"], row["structure"])
        groups.setdefault(key, []).append((row["n"], row["query_x"], row["recall_at_k"]))
    for (data, dim, structure), points in sorted(groups.items()):
        points.sort()
        entry: dict[str, Any] = {
            "data": data,
            "dim": dim,
            "structure": structure,
            "sizes": [n for n, _, _ in points],
            "query_x": [x for _, x, _ in points],
            "recall": [r for _, _, r in points],
            "faster_than_matmul_from": None,
        }
        for (n0, x0, _), (n1, x1, r1) in itertools.pairwise(points):
            if x0 >= 1.0 > x1 and r1 >= RECALL_GOAL:
                t = math.log(x0) / (math.log(x0) - math.log(x1))
                entry["faster_than_matmul_from"] = round(n0 * (n1 / n0) ** t)
                break
        if points and points[0][1] < 1.0 and points[0][2] >= RECALL_GOAL:
            entry["faster_than_matmul_from"] = f"≤ {points[0][0]}"
        entry["slower_than_matmul_everywhere"] = all(x >= 1.0 for _, x, _ in points)
        out.append(entry)
    return out


def exact_within(rows: list[dict[str, Any]], budgets_ms: tuple[float, ...]) -> list[dict[str, Any]]:
    """Largest measured size at which matmul's query p50 stays within each budget."""
    out = []
    for data, dim in sorted({(r["data"], r["dim"]) for r in rows}):
        matmul = sorted(
            (r["n"], r["query_p50_ms"])
            for r in rows
            if r["data"] == data and r["dim"] == dim and r["structure"] == "matmul"
        )
        for budget in budgets_ms:
            fitting = [n for n, ms in matmul if ms <= budget]
            out.append(
                {
                    "data": data,
                    "dim": dim,
                    "budget_ms": budget,
                    "largest_n": max(fitting, default=None),
                }
            )
    return out


def _paper_table(result: SectionResult, rows: list[dict[str, Any]]) -> None:
    """Takacs et al. Tables 4–5 beside this run's synthetic 384-d cells (their dimension)."""
    table = result.table(
        "Takacs et al. Tables 4–5 (seconds → ms) beside this run, 384-d synthetic",
        [
            ("n", "points"),
            ("structure", "structure"),
            ("paper_build_ms", "paper build ms"),
            ("build_ms", "our build ms"),
            ("paper_query_ms", "paper query ms"),
            ("query_p50_ms", "our query p50 ms"),
            ("query_vs_paper_x", "ours ÷ paper (query)"),
        ],
    )
    ours = {
        (r["n"], r["structure"]): r for r in rows if r["data"] == "synthetic" and r["dim"] == 384
    }
    for n, entries in PAPER.items():
        for paper_name, (build_s, query_s) in entries.items():
            peers = [PAPER_PEERS[paper_name]]
            if paper_name == "vector_db":
                peers += ["qdrant_local+filter", "qdrant_edge"]
            for peer in peers:
                row = ours.get((n, peer))
                if row is None:
                    table.skip(f"{peer} at n={n:,}", "not measured at this size in this run")
                    continue
                table.add(
                    {
                        "n": n,
                        "structure": f"{peer} (paper: {paper_name})",
                        "paper_build_ms": 1000 * build_s,
                        "build_ms": 1000 * row["build_s"],
                        "paper_query_ms": 1000 * query_s,
                        "query_p50_ms": row["query_p50_ms"],
                        "query_vs_paper_x": ratio(row["query_p50_ms"], 1000 * query_s),
                    }
                )
