"""Concurrent searches merged into batches (echolabel/core/merged_search.py), on Qdrant Edge."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from echolabel.core.merged_search import MergedSearches
from vectorstore import Point
from vectorstore.edge_store import EdgeStore

DIM = 16


class Recording:
    """The store, each batch recorded and held a little, so that searches pile up behind it."""

    def __init__(self, store: EdgeStore, hold_s: float = 0.02) -> None:
        self.store = store
        self.hold_s = hold_s
        self.batches: list[int] = []
        self.fail = False

    def nearest_batch(self, project, vectors, k, excludes=None):
        self.batches.append(len(vectors))
        time.sleep(self.hold_s)
        if self.fail:
            raise RuntimeError("the store went away")
        return self.store.nearest_batch(project, vectors, k, excludes)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    opened = EdgeStore(tmp_path / "store")
    opened.ensure_collection(1, "enc", DIM, "w")
    opened.upsert(
        1,
        "enc",
        [
            Point(task=i, vector=rows[i], labels={"f": str(i % 3)} if i % 2 else {})
            for i in range(200)
        ],
    )
    yield opened, rows
    opened.close()


def test_concurrent_searches_go_out_together_and_answer_as_alone(store):
    edge, rows = store
    recording = Recording(edge)
    searches = MergedSearches(lambda: recording, max_batch=8)
    start = threading.Barrier(24)

    def search(task: int):
        start.wait()
        return searches.nearest(1, rows[task], 5, exclude=[task])

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(search, range(24)))
    for task, found in enumerate(answers):
        alone = edge.nearest(1, rows[task], 5, exclude=[task])
        assert [(n.task, n.similarity) for n in found] == [(n.task, n.similarity) for n in alone]
        assert task not in {n.task for n in found}
    assert sum(recording.batches) == 24
    assert len(recording.batches) < 24 and max(recording.batches) <= 8  # merged, and bounded


def test_a_lone_search_goes_out_at_once(store):
    edge, rows = store
    recording = Recording(edge, hold_s=0.0)
    searches = MergedSearches(lambda: recording)
    for task in range(3):
        assert searches.nearest(1, rows[task], 3) == edge.nearest(1, rows[task], 3)
    assert recording.batches == [1, 1, 1]


def test_every_search_of_a_failed_batch_raises_and_the_next_ones_are_answered(store):
    edge, rows = store
    recording = Recording(edge)
    searches = MergedSearches(lambda: recording)
    recording.fail = True
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(searches.nearest, 1, rows[t], 3) for t in range(6)]
        errors = [f.exception(timeout=10) for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    recording.fail = False
    assert searches.nearest(1, rows[0], 3) == edge.nearest(1, rows[0], 3)  # nothing stuck


def test_projects_and_sizes_are_searched_apart(store):
    edge, rows = store
    edge.ensure_collection(2, "enc", DIM, "w")
    edge.upsert(2, "enc", [Point(task="b", vector=rows[0], labels={"f": "x"})])
    recording = Recording(edge)
    searches = MergedSearches(lambda: recording)
    asks = [(1, 3), (2, 3), (1, 7), (2, 1)] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        found = list(pool.map(lambda a: searches.nearest(a[0], rows[0], a[1]), asks))
    for (project, k), neighbours in zip(asks, found, strict=True):
        assert neighbours == edge.nearest(project, rows[0], k)
