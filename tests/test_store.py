"""The vector store: round trips, label rules, and congruence of every search implementation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vectorstore import (
    Annotation,
    DimensionMismatchError,
    ExactIndex,
    ExactSearchStore,
    Point,
    QdrantStore,
    StoreError,
    open_store,
    point_id,
)

DIM = 16


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(params=["qdrant", "exact-matmul", "exact-kdtree"])
def store(request, tmp_path):
    inner = QdrantStore.open(path=tmp_path / "q")
    if request.param == "qdrant":
        yield inner
    else:
        yield ExactSearchStore(inner, max_points=10_000, method=request.param.split("-")[1])
    inner.close()


def test_point_ids_are_deterministic_and_distinct():
    assert point_id(3, 17) == point_id(3, 17)
    assert point_id(3, 17) != point_id(4, 17)
    assert point_id(3, 17) != point_id(3, "17x")


def test_round_trip_keeps_vectors_and_payload(store):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 3)
    store.ensure_collection(1, "enc", DIM, "w1")
    store.upsert(
        1,
        "enc",
        [
            Point(task=10, vector=vectors[0], image="/data/upload/a.png", labels={"organ": "x"}),
            Point(task=11, vector=vectors[1], image="/data/upload/b.png"),
            Point(task="c", vector=vectors[2]),
        ],
    )
    assert store.count(1) == 3
    assert store.count(1, labelled=True) == 1
    got = store.vectors(1, [10, 11, 99])
    assert set(got) == {10, 11}
    np.testing.assert_allclose(got[10], vectors[0], rtol=1e-6)
    points = {p.task: p for p in store.iter_points(1)}
    assert points[10].labels == {"organ": "x"} and points[10].image == "/data/upload/a.png"
    assert points["c"].labels == {}
    info = store.collection(1)
    assert (info.encoder, info.dim, info.weights_id, info.generation) == ("enc", DIM, "w1", 1)


def test_retried_upsert_overwrites_instead_of_duplicating(store):
    rng = np.random.default_rng(1)
    store.ensure_collection(1, "enc", DIM, "w")
    for _ in range(3):
        store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    assert store.count(1) == 1


def test_newest_annotation_wins_and_survives_reembedding(store):
    rng = np.random.default_rng(2)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    new = Annotation(id=2, updated_at="2026-01-02T00:00:00Z")
    old = Annotation(id=1, updated_at="2026-01-01T00:00:00Z")
    assert store.set_labels(1, 5, {"organ": "liver"}, new)
    assert store.set_labels(1, 5, {"organ": "heart"}, old)  # older: ignored
    assert next(store.iter_points(1)).labels == {"organ": "liver"}
    # A re-upsert without labels (e.g. the image embedded again) keeps them.
    store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    assert next(store.iter_points(1)).labels == {"organ": "liver"}
    assert store.set_labels(1, 99, {"organ": "x"}, new) is False  # no such point


def test_clear_labels_by_annotation_id(store):
    rng = np.random.default_rng(3)
    store.ensure_collection(1, "enc", DIM, "w")
    v = unit_rows(rng, 2)
    store.upsert(1, "enc", [Point(task=1, vector=v[0]), Point(task=2, vector=v[1])])
    store.set_labels(1, 1, {"organ": "a"}, Annotation(id=7, updated_at="2026-01-01T00:00:00Z"))
    store.set_labels(1, 2, {"organ": "b"}, Annotation(id=8, updated_at="2026-01-01T00:00:00Z"))
    assert store.nearest(1, v[0], k=5)[0].task == 1
    assert store.clear_labels(1, 7) == [1]
    assert store.count(1, labelled=True) == 1
    assert [n.task for n in store.nearest(1, v[0], k=5)] == [2]


def test_mismatched_vectors_are_refused(store):
    store.ensure_collection(1, "enc", DIM, "w")
    with pytest.raises(DimensionMismatchError, match="expects 16"):
        store.upsert(1, "enc", [Point(task=1, vector=np.ones(DIM + 1, dtype=np.float32))])
    with pytest.raises(DimensionMismatchError, match="refusing other"):
        store.upsert(1, "other", [Point(task=1, vector=np.ones(DIM, dtype=np.float32))])
    with pytest.raises(DimensionMismatchError, match="echolabel reembed"):
        store.ensure_collection(1, "other", 8, "w")
    assert store.count(1) == 0


def test_projects_are_isolated(store):
    rng = np.random.default_rng(4)
    for project in (1, 2):
        store.ensure_collection(project, "enc", DIM, "w")
    v = unit_rows(rng, 1)[0]
    store.upsert(1, "enc", [Point(task=1, vector=v, labels={"f": "a"})])
    assert store.nearest(2, v, k=3) == []
    assert store.count(2) == 0


def test_congruence_of_nearest_across_implementations(tmp_path):
    """The same data in Qdrant and in both exact indexes gives the same neighbours."""
    rng = np.random.default_rng(5)
    vectors = unit_rows(rng, 300)
    labels = rng.integers(0, 3, size=300)
    qdrant = QdrantStore.open(path=tmp_path / "q")
    stores = {
        "qdrant": qdrant,
        "matmul": ExactSearchStore(qdrant, max_points=10_000, method="matmul"),
        "kdtree": ExactSearchStore(qdrant, max_points=10_000, method="kdtree"),
    }
    qdrant.ensure_collection(1, "enc", DIM, "w")
    points = [
        Point(task=i, vector=vectors[i], labels={"f": str(labels[i])} if i % 3 else {})
        for i in range(300)
    ]
    qdrant.upsert(1, "enc", points)
    for query_row in range(0, 300, 7):
        answers = {
            name: s.nearest(1, vectors[query_row], k=10, exclude=[query_row])
            for name, s in stores.items()
        }
        reference = answers["qdrant"]
        assert len(reference) == 10
        assert all(n.task != query_row and n.task % 3 for n in reference)
        for name, found in answers.items():
            assert [n.task for n in found] == [n.task for n in reference], name
            np.testing.assert_allclose(
                [n.similarity for n in found], [n.similarity for n in reference], atol=1e-5
            )
    qdrant.close()


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
