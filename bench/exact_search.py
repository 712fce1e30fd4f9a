"""Exact top-10 search: NumPy matmul vs scipy cKDTree vs qdrant-client's in-process mode.

Chooses the exact fallback's method and threshold (README "Exact search"). Prints build and
single-query times (median and p95 of repeated runs) and ratios against the matmul baseline
measured in the same run. Usage: python bench/exact_search.py [--sizes 5000,15000] [--dims 384]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vectorstore import ExactIndex, Point, QdrantStore


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 20 centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    rows = centres[rng.integers(0, 20, size=n)] + 0.6 * rng.normal(size=(n, dim))
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def run(n: int, dim: int, queries: int, with_qdrant: bool) -> dict[str, dict[str, float]]:
    data = clustered(n, dim)
    probes = clustered(queries, dim, seed=1)
    results: dict[str, dict[str, float]] = {}
    for method in ("matmul", "kdtree"):
        build = timed(lambda m=method: ExactIndex(data, m), 3)
        index = ExactIndex(data, method)
        cursor = iter(range(10**9))
        query = timed(lambda i=index, c=cursor: i.search(probes[next(c) % queries], 10), queries)
        results[method] = {"build_ms": 1000 * statistics.median(build), **summary(query)}
    if with_qdrant:
        with tempfile.TemporaryDirectory() as tmp:
            store = QdrantStore.open(path=Path(tmp))
            store.ensure_collection(1, "bench", dim, "none")
            start = time.perf_counter()
            for lo in range(0, n, 1000):
                store.upsert(
                    1,
                    "bench",
                    [
                        Point(task=i, vector=data[i], labels={"f": "x"})
                        for i in range(lo, min(n, lo + 1000))
                    ],
                )
            build_ms = 1000 * (time.perf_counter() - start)
            cursor = iter(range(10**9))
            query = timed(
                lambda c=cursor: store.nearest(1, probes[next(c) % queries], 10),
                max(5, queries // 10),
            )
            results["qdrant_local"] = {"build_ms": build_ms, **summary(query)}
            store.close()
    base = results["matmul"]["median_ms"]
    for row in results.values():
        row["query_vs_matmul"] = row["median_ms"] / base
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,5000,15000,50000")
    parser.add_argument("--dims", default="384,1280")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-qdrant", action="store_true", help="skip qdrant-client local mode")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{__import__('os').cpu_count()} cores, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    print(
        f"{'n':>7} {'dim':>5} {'method':>13} {'build ms':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'x matmul':>8}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            rows = run(n, dim, args.queries, with_qdrant=not args.no_qdrant)
            for method, row in rows.items():
                print(
                    f"{n:>7} {dim:>5} {method:>13} {row['build_ms']:>9.1f} "
                    f"{row['median_ms']:>8.3f} {row['p95_ms']:>8.3f} "
                    f"{row['query_vs_matmul']:>8.1f}"
                )
                report["results"].append({"n": n, "dim": dim, "method": method, **row})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
