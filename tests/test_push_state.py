"""The push's bookkeeping (echolabel/core/push_state.py) over each engine's store.

The rules are written once in the core; each store gives them `update_push_state` (every
implementation is checked against it in tests/test_store_congruence.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from echolabel.core.push_state import (
    MAX_CHANGES,
    note_label_changes,
    record_push,
    take_label_changes,
)
from vectorstore import ExactSearchStore, QdrantStore, StoreError, VectorStore
from vectorstore.edge_store import EdgeStore

DIM = 16


@pytest.fixture(
    params=[
        pytest.param(lambda path: EdgeStore.open(path=path), id="edge"),
        pytest.param(lambda path: QdrantStore.open(path=path), id="qdrant-local"),
        pytest.param(
            lambda path: ExactSearchStore(QdrantStore.open(path=path), 10_000), id="exact"
        ),
    ]
)
def store(request, tmp_path) -> Iterator[VectorStore]:
    opened = request.param(tmp_path / "store")
    yield opened
    opened.close()


def test_label_changes_are_counted_until_taken(store):
    assert note_label_changes(store, 1, [1]) == 0  # no collection: nothing to count
    assert take_label_changes(store, 1) == []
    store.ensure_collection(1, "enc", DIM, "w")
    assert note_label_changes(store, 1, [1, 2]) == 2
    assert note_label_changes(store, 1, [2, 3]) == 3  # a task changed twice is one change
    assert note_label_changes(store, 1, []) == 0
    info = store.collection(1)
    assert info is not None and info.label_state == 4 and info.label_changes == (1, 2, 3)
    assert take_label_changes(store, 1) == [1, 2, 3]
    assert take_label_changes(store, 1) == []
    info = store.collection(1)
    assert info is not None and info.label_state == 4, "the state counts on"


def test_only_the_last_changes_are_kept(store):
    store.ensure_collection(1, "enc", DIM, "w")
    assert note_label_changes(store, 1, list(range(MAX_CHANGES))) == MAX_CHANGES
    assert note_label_changes(store, 1, ["new", 0]) == MAX_CHANGES
    info = store.collection(1)
    assert info is not None and info.label_state == MAX_CHANGES + 2
    # 0 was remembered already (where it was first noted), so the oldest other one goes.
    assert info.label_changes == (*range(1, MAX_CHANGES), "new")


def test_prediction_state_is_recorded(store):
    with pytest.raises(StoreError, match="no collection"):
        record_push(store, 1, published_version="v1")
    first = store.ensure_collection(1, "enc", DIM, "w")
    assert (first.published_version, first.vote_radius_min) == (None, -1.0)
    record_push(store, 1, published_version="v1", vote_radius_min=0.25)
    info = store.collection(1)
    assert info is not None and (info.published_version, info.vote_radius_min) == ("v1", 0.25)
    record_push(store, 1, vote_radius_min=0.1)
    info = store.collection(1)
    assert info is not None and (info.published_version, info.vote_radius_min) == ("v1", 0.1)
    record_push(store, 1, vote_radius_edges=[0.2, 0.5])
    info = store.collection(1)
    assert info is not None and info.vote_radius_edges == (0.2, 0.5)
