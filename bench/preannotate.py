"""Pre-annotation cost: tasks/s pushed, and the refresh cost per new annotation, by size.

What is timed is our side of the push (docs/preannotation.md): voting every
unlabelled task, finding the tasks new labels can affect, re-voting them. Vectors are synthetic
(clustered, L2-normalised; embedding speed is bench/embedding.py's), the store is `--store`'s
(bench.server.STORES: "edge", the embedded default on Qdrant Edge, or "local-memory", the
embedded store before Edge: qdrant-client local mode in memory and the exact in-memory index),
and Label Studio is echolabel.labelstudio_memory's in-memory one (a real one adds its HTTP and
database time per call: see the end-to-end test's printout).

Usage (from the repository root):
    python -m bench.preannotate [--sizes 1000,15000,100000] [--store edge,local-memory]
Several stores run one after the other on the same synthetic projects, in one run, so their
ratios compare like with like. The refresh before batching (issue 19) is measured by this
script at that commit, right after, in the same sitting (docs/preannotation.md says how).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.server import STORES, store_runtime
from echolabel.core.preannotate import PreAnnotator
from echolabel.core.push_state import note_label_changes
from echolabel.core.runtime import Runtime
from echolabel.labelstudio_memory import InMemoryLabelStudio
from echolabel.settings import Settings
from vectorstore import Annotation, Point

DIM = 384
CLASSES = 8
LABELLED_SHARE = 0.2
NEW_LABELS = 10
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="finding" toName="image">'
    + "".join(f'<Choice value="c{c}"/>' for c in range(CLASSES))
    + "</Choices></View>"
)


def clustered(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(CLASSES, DIM))
    classes = rng.integers(0, CLASSES, size=n)
    rows = centres[classes] + 1.2 * rng.normal(size=(n, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32), classes


def result(label: int) -> list[dict]:
    return [
        {
            "from_name": "finding",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [f"c{label}"]},
        }
    ]


@dataclass
class SyntheticProject:
    """A project of synthetic vectors in an in-memory store, and its in-memory Label Studio."""

    runtime: Runtime
    api: InMemoryLabelStudio
    classes: np.ndarray
    labelled: np.ndarray


def synthetic_project(
    n: int, rng: np.random.Generator, model_dir: Path, store: str = "local-memory"
) -> SyntheticProject:
    """Project 1: n clustered vectors, LABELLED_SHARE of them annotated with their class."""
    vectors, classes = clustered(n, rng)
    labelled = rng.random(n) < LABELLED_SHARE
    runtime = store_runtime(store, Settings(model_dir=model_dir, encoder="synthetic"))
    store = runtime.store
    store.ensure_collection(1, "synthetic", DIM, "none")
    points = [
        Point(
            task=i,
            vector=vectors[i],
            image=f"/data/{i}.png",
            labels={"finding": f"c{classes[i]}"} if labelled[i] else {},
            annotation=Annotation(i, "2026-11-25T00:00:00Z") if labelled[i] else Annotation(),
        )
        for i in range(n)
    ]
    for chunk in range(0, n, 1000):
        store.upsert(1, "synthetic", points[chunk : chunk + 1000])
    tasks = [
        {
            "id": i,
            "data": {"image": f"/data/{i}.png"},
            "annotations": [{"id": i, "result": result(classes[i]), "updated_at": "2026"}]
            if labelled[i]
            else [],
        }
        for i in range(n)
    ]
    return SyntheticProject(runtime, InMemoryLabelStudio(tasks, CONFIG), classes, labelled)


def run_size(n: int, refreshes: int, seed: int = 0, store_kind: str = "local-memory") -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        project = synthetic_project(n, rng, Path(tmp), store_kind)
        load_s = time.perf_counter() - start
        store, labelled, classes = project.runtime.store, project.labelled, project.classes
        # As the backend's build-index job would (a no-op on stores without a graph).
        start = time.perf_counter()
        store.build_index(1)
        index_s = time.perf_counter() - start
        try:
            annotator = PreAnnotator(project.runtime, project.api, 1)
            start = time.perf_counter()
            pushed = annotator.push()
            push_s = time.perf_counter() - start
            unlabelled = [i for i in range(n) if not labelled[i]]
            refresh_rows = []
            for round_ in range(refreshes):
                picks = rng.choice(unlabelled, size=NEW_LABELS, replace=False)
                for task in picks:
                    store.set_labels(
                        1,
                        int(task),
                        {"finding": f"c{classes[task]}"},
                        Annotation(f"new-{round_}-{task}", "2026-11-26T00:00:00Z"),
                    )
                    unlabelled.remove(int(task))
                note_label_changes(store, 1, [int(t) for t in picks])
                start = time.perf_counter()
                refreshed = annotator.refresh()
                refresh_rows.append((time.perf_counter() - start, refreshed))
        finally:
            project.runtime.close()
    times = [t for t, _ in refresh_rows]
    affected = [r["affected"] for _, r in refresh_rows]
    return {
        "store": store_kind,
        "tasks": n,
        "labelled": int(labelled.sum()),
        "load_s": round(load_s, 2),
        "index_s": round(index_s, 2),
        "push_s": round(push_s, 2),
        "pushed": pushed["pushed"],
        "abstained": pushed["abstained"],
        "push_tasks_per_s": round((n - int(labelled.sum())) / push_s, 1),
        "refresh_new_labels": NEW_LABELS,
        "refresh_s_median": round(statistics.median(times), 3),
        "refresh_s_max": round(max(times), 3),
        "refresh_ms_per_annotation": round(1000 * statistics.median(times) / NEW_LABELS, 1),
        "affected_per_refresh_median": statistics.median(affected),
        "revote_all_s_estimate": round(push_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,15000,100000")
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument(
        "--store",
        default="edge",
        help=f"comma-separated, of {', '.join(STORES)} (local-memory scans in Python per "
        "radius band: minutes per refresh at 100k)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/preannotate.json"))
    args = parser.parse_args()
    stores = args.store.split(",")
    if unknown := set(stores) - set(STORES):
        parser.error(f"--store {', '.join(sorted(unknown))}: use {', '.join(STORES)}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        by_store = {}
        for store in stores:
            row = by_store[store] = run_size(size, args.refreshes, store_kind=store)
            rows.append(row)
            print(
                f"{store:>12} {row['tasks']:>7} tasks: push {row['push_s']:>7.2f} s "
                f"({row['push_tasks_per_s']:>7.1f} tasks/s), refresh after {NEW_LABELS} labels "
                f"{row['refresh_s_median']:.3f} s median ({row['refresh_ms_per_annotation']} ms "
                f"per annotation, {row['affected_per_refresh_median']} tasks re-voted) vs "
                f"re-voting everything {row['push_s']:.2f} s: "
                f"{row['push_s'] / max(row['refresh_s_median'], 1e-9):.1f}x",
                flush=True,
            )
        if {"edge", "local-memory"} <= set(by_store):
            edge, before = by_store["edge"], by_store["local-memory"]
            print(
                f"{size:>20} tasks: edge / local-memory: refresh per annotation "
                f"{edge['refresh_s_median'] / max(before['refresh_s_median'], 1e-9):.4f}, "
                f"push {edge['push_s'] / max(before['push_s'], 1e-9):.3f}",
                flush=True,
            )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "cpus": __import__("os").cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "dim": DIM,
        "labelled_share": LABELLED_SHARE,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
