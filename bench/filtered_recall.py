"""recall@10 of the embedded store's HNSW search when only part of a generation is labelled.

A vote searches the labelled points only (a `labelled` filter). `bench.edge_ef` and the
`embedded` section measure recall on generations where every point is labelled; a real project
is partly labelled, and a filtered HNSW walk can miss what an exact scan finds. This fills one
EdgeStore (the product's class) with `bench.preannotate`'s clustered 384-d points, a share of
them labelled, builds the graph, then searches the labelled neighbours of unlabelled points
exactly and by HNSW at each ef, and prints recall@10, how many rows came back short of 10, and
the mean search time, with the machine's load.

Usage: python -m bench.filtered_recall [--points 30000] [--labelled 0.2,1.0] [--ef 128,512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from vectorstore import Point
from vectorstore.edge_store import VECTOR_STORAGES, EdgeStore

from .preannotate import clustered

QUERIES = 300
K = 10


def measure(points: int, share: float, efs: Sequence[int], storage: str) -> None:
    rng = np.random.default_rng(0)
    rows, _ = clustered(points, rng)
    labelled = rng.random(points) < share
    path = tempfile.mkdtemp(prefix="echolabel-bench-filtered-")
    store = EdgeStore(path, exact_max_points=1_000, vector_storage=storage)
    try:
        store.ensure_collection(1, "bench", rows.shape[1], "bench")
        for start in range(0, points, 2_000):
            chunk = range(start, min(points, start + 2_000))
            store.upsert(
                1,
                "bench",
                [Point(i, rows[i], labels={"f": "a"} if labelled[i] else {}) for i in chunk],
            )
        began = time.perf_counter()
        store.build_index(1)
        built_s = time.perf_counter() - began
        # Queries: unlabelled points, as the push votes them (every point when all are labelled,
        # each then excluding itself).
        pool = np.flatnonzero(~labelled) if not labelled.all() else np.arange(points)
        tasks = [int(t) for t in pool[:QUERIES]]
        queries, excludes = rows[tasks], [[t] for t in tasks]
        truth = store.nearest_batch(1, queries, K, excludes, exact=True)
        print(
            f"{points:,} points, {labelled.mean():.0%} labelled, {storage} vectors, "
            f"graph built in {built_s:.1f} s"
        )
        for ef in efs:
            store.hnsw_ef = ef
            began = time.perf_counter()
            found = store.nearest_batch(1, queries, K, excludes)
            ms = 1000 * (time.perf_counter() - began) / len(tasks)
            hits = [
                len({n.task for n in a} & {n.task for n in b})
                for a, b in zip(found, truth, strict=True)
            ]
            recall = sum(hits) / (K * len(tasks))
            short = sum(len(row) < K for row in found)
            print(
                f"  ef {ef}: recall@{K} {recall:.3f}, rows short of {K}: {short}/{len(tasks)}, "
                f"{ms:.2f} ms a search (batched)"
            )
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=30_000)
    parser.add_argument("--labelled", default="0.2,1.0", help="comma-separated labelled shares")
    parser.add_argument("--ef", default="128,512", help="comma-separated search efs")
    parser.add_argument("--storage", default="int8", choices=VECTOR_STORAGES)
    args = parser.parse_args(argv)
    for share in (float(s) for s in args.labelled.split(",")):
        measure(args.points, share, [int(e) for e in args.ef.split(",")], args.storage)
    print(f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
