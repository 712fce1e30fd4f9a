"""What is particular to each store implementation: the exact cache's bookkeeping, the exact
index itself, opening and locking. What every implementation must answer alike is in
tests/test_store_congruence.py."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from qdrant_client.http.exceptions import UnexpectedResponse

from tests.helpers import unit_rows
from vectorstore import (
    Annotation,
    ExactIndex,
    ExactSearchStore,
    Point,
    QdrantStore,
    StoreError,
    StoreUnavailableError,
    open_store,
    point_id,
)

DIM = 16


def test_point_ids_are_deterministic_and_distinct():
    assert point_id(3, 17) == point_id(3, 17)
    assert point_id(3, 17) != point_id(4, 17)
    assert point_id(3, 17) != point_id(3, "17x")


def test_exact_cache_follows_writes(tmp_path):
    rng = np.random.default_rng(6)
    v = unit_rows(rng, 3)
    store = ExactSearchStore(QdrantStore.open(path=tmp_path / "q"), max_points=100)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=0, vector=v[0], labels={"f": "a"})])
    assert [n.task for n in store.nearest(1, v[1], k=5)] == [0]  # cache now loaded
    index = store._cache["1"].index
    store.upsert(1, "enc", [Point(task=1, vector=v[1])])
    assert [n.task for n in store.nearest(1, v[1], k=5)] == [0]  # unlabelled: not a neighbour
    assert store._cache["1"].index is index, "embedding an unlabelled task keeps the matrix"
    store.set_labels(1, 1, {"f": "b"}, Annotation(id=3))
    assert store.nearest(1, v[1], k=5)[0].task == 1
    store.clear_labels(1, 3)
    assert [n.task for n in store.nearest(1, v[1], k=5)] == [0]


def test_exact_store_falls_back_to_qdrant_above_threshold(tmp_path):
    rng = np.random.default_rng(7)
    v = unit_rows(rng, 20)
    inner = QdrantStore.open(path=tmp_path / "q")
    store = ExactSearchStore(inner, max_points=5)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=i, vector=v[i], labels={"f": "a"}) for i in range(20)])
    found = store.nearest(1, v[0], k=3)
    assert [n.task for n in found] == [n.task for n in inner.nearest(1, v[0], k=3)]
    assert store._labelled_set(1) is None
    assert store.nearest_batch(1, v[:4], 3) == inner.nearest_batch(1, v[:4], 3)


def test_only_a_single_writer_store_gets_the_exact_cache(tmp_path):
    """The cache is valid only while this process is the sole writer (the embedded store).

    Local mode, the server's stand-in, is the engine the cache goes in front of; Edge searches
    exactly itself (tests/test_edge_store.py)."""
    embedded = open_store(path=tmp_path / "q", engine="local")
    assert isinstance(embedded, ExactSearchStore) and embedded.single_writer
    embedded.close()
    plain = open_store(path=tmp_path / "q", exact_max_points=0, engine="local")
    assert isinstance(plain, QdrantStore) and plain.single_writer
    plain.close()
    server = open_store(url="http://127.0.0.1:9")  # nothing is asked of it yet
    assert isinstance(server, QdrantStore) and not server.single_writer
    server.close()


@pytest.mark.parametrize("dim", [8, 64])
def test_kdtree_equals_brute_force_on_random_data(dim):
    rng = np.random.default_rng(dim)
    data = unit_rows(rng, 2000, dim)
    kdtree, matmul = ExactIndex(data, "kdtree"), ExactIndex(data, "matmul")
    for query in unit_rows(rng, 25, dim):
        brute = np.argsort(-(data @ query), kind="stable")[:10]
        for index in (kdtree, matmul):
            rows, sims = index.search(query, 10)
            assert rows.tolist() == brute.tolist()
            np.testing.assert_allclose(sims, data[brute] @ query, atol=1e-5)


def test_exact_index_handles_k_larger_than_data_and_empty():
    data = unit_rows(np.random.default_rng(8), 3)
    rows, _ = ExactIndex(data).search(data[0], 10)
    assert sorted(rows.tolist()) == [0, 1, 2] and rows[0] == 0
    rows, sims = ExactIndex(np.empty((0, DIM), dtype=np.float32)).search(data[0], 10)
    assert rows.size == 0 and sims.size == 0


def test_second_process_gets_a_clear_lock_error(tmp_path):
    store = open_store(path=tmp_path / "q")
    code = (
        "import sys\nfrom vectorstore import open_store, StoreError\n"
        "try:\n    open_store(path=__import__('pathlib').Path(sys.argv[1]))\n"
        "except StoreError as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "q")], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert "locked by another process" in result.stdout and "QDRANT_URL" in result.stdout
    store.close()


def test_store_needs_a_path_or_url():
    with pytest.raises(StoreError, match="QDRANT_URL"):
        QdrantStore.open()


def test_cluster_settings_reach_every_new_generation(tmp_path):
    """QDRANT_SHARDS / QDRANT_REPLICATION_FACTOR: configuration for a Qdrant cluster."""
    inner = QdrantStore.open(path=tmp_path / "q")
    created: list[dict] = []

    class Recording:
        def __getattr__(self, name):
            return getattr(inner._client, name)

        def create_collection(self, name, **kwargs):
            created.append(kwargs)
            return inner._client.create_collection(name, **kwargs)

    store = QdrantStore(Recording(), local=True, shards=6, replication_factor=2)
    store.ensure_collection(1, "tiny-test", DIM, "none")
    first = store.collection(1)
    store.create_generation(1, "tiny-test", DIM, "none")
    assert [(c["shard_number"], c["replication_factor"]) for c in created] == [(6, 2), (6, 2)]
    assert first is not None and first.generation == 1
    inner.close()


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (
            httpx.ConnectError("refused"),
            "at http://q:6333 is unreachable (refused): check QDRANT_URL",
        ),
        (UnexpectedResponse(401, "Unauthorized", b"", httpx.Headers()), "check QDRANT_API_KEY"),
        (UnexpectedResponse(503, "Service Unavailable", b"", httpx.Headers()), "failed (503)"),
    ],
)
def test_a_failing_server_is_one_store_error_that_says_what_to_check(failure, says):
    class Failing:
        def get_aliases(self):
            raise failure

    store = QdrantStore(Failing(), server="the Qdrant server at http://q:6333")  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailableError, match=re.escape(says)):
        store.collection(1)
    with pytest.raises(StoreUnavailableError):  # translated once, however deep the call
        store.upsert(1, "enc", [Point(task=1, vector=np.ones(DIM, dtype=np.float32))])


def test_other_server_answers_pass_through():
    class NotFound:
        def get_aliases(self):
            raise UnexpectedResponse(404, "Not Found", b"", httpx.Headers())

    with pytest.raises(UnexpectedResponse):
        QdrantStore(NotFound()).collection(1)  # type: ignore[arg-type]
