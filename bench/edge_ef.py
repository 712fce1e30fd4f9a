"""recall@10 of the embedded store's HNSW search against its exact search, by search ef.

`python -m bench.edge_ef --points 100000` fills one EdgeStore (the product's class, default
int8 vectors) with clustered synthetic 1280-d points, builds its graph, then searches 64 queries
exactly and at each ef, and prints recall@10 and the mean search time of each (exact
included: where it beats the walk is the exact threshold), with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from vectorstore import Point
from vectorstore.edge_store import EdgeStore

from .data import latent_clusters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--ef", default="128,256,512,1024", help="comma-separated search efs")
    args = parser.parse_args(argv)
    path = tempfile.mkdtemp(prefix="echolabel-bench-ef-")
    store = EdgeStore(path, exact_max_points=1_000)
    try:
        store.ensure_collection(1, "bench", args.dim, "bench")
        for start in range(0, args.points, 1_000):
            rows = latent_clusters(min(1_000, args.points - start), args.dim, seed=1 + start)
            points = [
                Point(task=start + i, vector=r, labels={"f": "a"}) for i, r in enumerate(rows)
            ]
            store.upsert(1, "bench", points)
        began = time.perf_counter()
        store.build_index(1)
        print(f"{args.points:,} points, graph built in {time.perf_counter() - began:.1f} s")
        queries = latent_clusters(args.queries, args.dim, seed=10**9)
        began = time.perf_counter()
        truth = [{n.task for n in store.nearest(1, q, 10, exact=True)} for q in queries]
        ms = 1000 * (time.perf_counter() - began) / len(queries)
        print(f"exact: {ms:.2f} ms a search")
        for ef in (int(e) for e in args.ef.split(",")):
            store.hnsw_ef = ef
            began = time.perf_counter()
            found = [{n.task for n in store.nearest(1, q, 10)} for q in queries]
            ms = 1000 * (time.perf_counter() - began) / len(queries)
            recall = sum(len(a & b) for a, b in zip(found, truth, strict=True)) / (
                10 * len(queries)
            )
            print(f"ef {ef}: recall@10 {recall:.4f}, {ms:.2f} ms a search")
        print(f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}")
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
