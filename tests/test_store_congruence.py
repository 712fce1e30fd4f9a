"""Every VectorStore implementation against one reference: same operations, same answers.

As qdrant-client runs its local mode against the server, each test here runs on every
implementation in `STORES` and compares what it answers with `Reference`, a brute-force NumPy
model of the store (exact cosine over the labelled points). qdrant-client's local mode stands in
for the Qdrant server's API (no server binary installs on these machines); the exact index is
run with both of its methods, and once with a threshold the larger projects here exceed, so its
fallback to the store behind it answers too. Adding an implementation is one line in `STORES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import unit_rows
from vectorstore import (
    Annotation,
    CollectionInfo,
    DimensionMismatchError,
    ExactSearchStore,
    Point,
    QdrantStore,
    StoreError,
    TaskId,
    VectorStore,
)
from vectorstore.base import VOTE_RADIUS_STEP
from vectorstore.edge_store import EdgeStore

DIM = 16
N = 300  # points of the shared read-only project (a third unlabelled): the old suite's data
TOLERANCE = 1e-5  # cosine similarities: float32 in different summation orders

StoreFactory = Callable[[Path], VectorStore]

STORES = [
    pytest.param(lambda path: QdrantStore.open(path=path), id="qdrant-local"),
    pytest.param(
        lambda path: ExactSearchStore(QdrantStore.open(path=path), 10_000, "matmul"),
        id="exact-matmul",
    ),
    pytest.param(
        lambda path: ExactSearchStore(QdrantStore.open(path=path), 10_000, "kdtree"),
        id="exact-kdtree",
    ),
    pytest.param(
        lambda path: ExactSearchStore(QdrantStore.open(path=path), 50, "matmul"),
        id="exact-above-threshold",
    ),
    # Qdrant Edge, exact below its threshold and HNSW above it (issue 19).
    pytest.param(lambda path: EdgeStore.open(path=path, exact_max_points=10_000), id="edge-exact"),
    pytest.param(lambda path: EdgeStore.open(path=path, exact_max_points=50), id="edge-hnsw"),
    # ECHOLABEL_EDGE_VECTORS=float32: full vectors instead of int8 ones, on the HNSW path.
    pytest.param(
        lambda path: EdgeStore.open(path=path, exact_max_points=50, vector_storage="float32"),
        id="edge-hnsw-float32",
    ),
]


@dataclass
class Reference:
    """What any store must answer for the points written to it, by brute force."""

    vectors: dict[TaskId, np.ndarray] = field(default_factory=dict)
    labels: dict[TaskId, dict[str, str]] = field(default_factory=dict)
    images: dict[TaskId, str] = field(default_factory=dict)

    def write(self, points: Sequence[Point]) -> None:
        for point in points:
            self.vectors[point.task] = np.asarray(point.vector, dtype=np.float32)
            self.labels[point.task] = dict(point.labels)
            self.images[point.task] = point.image

    def tasks(self, labelled: bool | None = None) -> set[TaskId]:
        return {t for t in self.vectors if labelled is None or bool(self.labels[t]) == labelled}

    def _ranked(self, query: np.ndarray, tasks: set[TaskId]) -> list[tuple[TaskId, float]]:
        order = sorted(tasks, key=str)
        if not order:
            return []
        matrix = np.stack([self.vectors[t] for t in order]).astype(np.float64)
        sims = matrix @ np.asarray(query, dtype=np.float64)
        return [(order[i], float(sims[i])) for i in np.argsort(-sims, kind="stable")]

    def nearest(
        self, query: np.ndarray, k: int, exclude: Sequence[TaskId] = ()
    ) -> list[tuple[TaskId, float]]:
        return self._ranked(query, self.tasks(labelled=True) - set(exclude))[:k]

    def kth_similarities(self, queries: np.ndarray, k: int) -> np.ndarray:
        ranked = [self._ranked(q, self.tasks(labelled=True)) for q in queries]
        return np.array([r[k - 1][1] if len(r) >= k else -1.0 for r in ranked])

    def unlabelled_near(
        self, query: np.ndarray, min_similarity: float, limit: int
    ) -> list[tuple[TaskId, float]]:
        ranked = self._ranked(query, self.tasks(labelled=False))
        return [(t, s) for t, s in ranked if s >= min_similarity][:limit]


def assert_answer(found, reference: Reference, query, k, exclude=()):
    """`found` is the reference's answer: order, similarities and payload."""
    expected = reference.nearest(query, k, exclude)
    assert [n.task for n in found] == [t for t, _ in expected]
    np.testing.assert_allclose(
        [n.similarity for n in found], [s for _, s in expected], atol=TOLERANCE
    )
    for neighbour in found:
        assert dict(neighbour.labels) == reference.labels[neighbour.task]
        assert neighbour.image == reference.images[neighbour.task]


def assert_same_neighbours(store: VectorStore, reference: Reference, query, k, exclude=()):
    found = store.nearest(1, query, k, exclude)
    assert_answer(found, reference, query, k, exclude)
    return found


def project_points(rng: np.random.Generator, n: int) -> list[Point]:
    """n points; every third unlabelled, the rest labelled with one of three classes."""
    vectors = unit_rows(rng, n)
    classes = rng.integers(0, 3, size=n)
    return [
        Point(
            task=i,
            vector=vectors[i],
            image=f"/data/upload/{i}.png",
            labels={"f": str(classes[i])} if i % 3 else {},
            annotation=Annotation(1000 + i, "2026-01-01T00:00:00Z") if i % 3 else Annotation(),
        )
        for i in range(n)
    ]


@pytest.fixture(params=STORES)
def store(request, tmp_path) -> Iterator[VectorStore]:
    """A fresh, empty store of each implementation."""
    opened = request.param(tmp_path / "store")
    yield opened
    opened.close()


@pytest.fixture(scope="module", params=STORES)
def filled(request, tmp_path_factory) -> Iterator[tuple[VectorStore, Reference]]:
    """Project 1 with N points in each implementation, for the tests that only read."""
    opened = request.param(tmp_path_factory.mktemp("store"))
    points = project_points(np.random.default_rng(5), N)
    opened.ensure_collection(1, "enc", DIM, "w")
    opened.upsert(1, "enc", points)
    # Writes never build Edge's HNSW graph (a job does): build it, so edge-hnsw walks one.
    opened.build_index(1)
    reference = Reference()
    reference.write(points)
    yield opened, reference
    opened.close()


# -- the interface ----------------------------------------------------------------------------


def test_implements_every_operation_of_the_protocol(store):
    assert isinstance(store, VectorStore)
    assert store.single_writer is True  # every implementation here is opened in-process
    for name, declared in vars(VectorStore).items():
        if name.startswith("_") or not inspect.isfunction(declared):
            continue
        wanted = list(inspect.signature(declared).parameters.values())
        offered = list(inspect.signature(getattr(type(store), name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in offered[: len(wanted)]] == [
            (p.name, p.kind, p.default) for p in wanted
        ], name
        assert all(p.default is not p.empty for p in offered[len(wanted) :]), name


def test_index_status_counts_what_waits_outside_the_graph(store):
    """None where the engine indexes by itself; else each project's live generation, its
    points, and how many wait outside the graph until `build_index` builds it."""
    for project, n in ((1, 80), (2, 20)):
        store.ensure_collection(project, "enc", DIM, "w")
        store.upsert(project, "enc", project_points(np.random.default_rng(project), n))
    before = store.index_status()
    if before is None:
        assert store.build_index(1) is False and store.index_status() is None
        return
    assert [(s.project, s.generation, s.points, s.unindexed) for s in before] == [
        ("1", store.collection(1).name, 80, 80),
        ("2", store.collection(2).name, 20, 20),
    ]
    built = {s.project: s.builds for s in before}
    assert store.build_index(1) is built["1"]
    after = {s.project: s.unindexed for s in store.index_status()}
    assert after == {"1": 0 if built["1"] else 80, "2": 20}


# -- reads, against the reference -------------------------------------------------------------


def test_nearest_equals_the_reference(filled):
    """Identical neighbours (order included) and similarities, the query itself excluded."""
    store, reference = filled
    for query_row in range(0, N, 7):
        query = reference.vectors[query_row]
        found = assert_same_neighbours(store, reference, query, 10, exclude=[query_row])
        assert len(found) == 10
        assert all(n.task != query_row and n.task % 3 for n in found)
    for query in unit_rows(np.random.default_rng(6), 10):  # queries that are not points
        assert_same_neighbours(store, reference, query, 5)
    everything = assert_same_neighbours(store, reference, reference.vectors[1], N)
    assert len(everything) == len(reference.tasks(labelled=True))
    assert store.nearest(2, reference.vectors[1], 5) == []  # a project never stored


def assert_same_batch(store: VectorStore, reference: Reference, queries, k, excludes=None):
    """Each row of `nearest_batch` is the reference's `nearest` of that row (order, similarity,
    payload), the k-th similarity included."""
    found = store.nearest_batch(1, queries, k, excludes)
    assert len(found) == len(queries)
    for row, neighbours in enumerate(found):
        assert_answer(neighbours, reference, queries[row], k, excludes[row] if excludes else ())
    return found


def test_nearest_batch_equals_the_reference(filled):
    store, reference = filled
    unlabelled = list(range(0, N, 3))
    queries = np.concatenate(
        [
            np.stack([reference.vectors[t] for t in unlabelled]),  # the unlabelled points
            unit_rows(np.random.default_rng(7), 10),
        ]
    )
    for k in (1, 5, 10):
        found = assert_same_batch(store, reference, queries, k)
        np.testing.assert_allclose(  # the k-th similarity, which the push records as a radius
            [row[k - 1].similarity for row in found],
            reference.kth_similarities(queries, k),
            atol=TOLERANCE,
        )
    labelled_rows = np.stack([reference.vectors[t] for t in range(1, 40, 3)])
    excludes = [[t] for t in range(1, 40, 3)]  # each row a labelled point, itself excluded
    for row, neighbours in enumerate(
        assert_same_batch(store, reference, labelled_rows, 5, excludes)
    ):
        assert excludes[row][0] not in {n.task for n in neighbours}
    too_many = len(reference.tasks(labelled=True)) + 1
    assert [len(r) for r in store.nearest_batch(1, queries[:3], too_many)] == [too_many - 1] * 3
    assert store.nearest_batch(2, queries[:3], 5) == [[], [], []]
    assert store.nearest_batch(1, queries[:0], 5) == []


def test_unlabelled_within_one_edge_equals_the_reference(filled):
    """No radius recorded: every unlabelled point at least the edge near, best first."""
    store, reference = filled
    for query_row in (1, 2, 50):
        query = reference.vectors[query_row]
        for min_similarity in (0.3, -1.0, 0.99):
            found = store.unlabelled_within(1, query[None], [min_similarity])[0]
            expected = reference.unlabelled_near(query, min_similarity, N)
            assert [n.task for n in found] == [t for t, _ in expected]
            np.testing.assert_allclose(
                [n.similarity for n in found], [s for _, s in expected], atol=TOLERANCE
            )
            assert all(n.vote_radius is None for n in found)
    assert store.unlabelled_within(2, reference.vectors[1][None], [-1.0]) == [[]]


def test_unlabelled_within_answers_each_row_as_alone(filled, monkeypatch):
    """Rows searched together get what each gets alone, also when a band's search fills its
    first limit and is asked again (here a limit of 4)."""
    import vectorstore.engine

    store, reference = filled
    rows = np.stack([reference.vectors[task] for task in (1, 2, 50, 7)])
    for edges in ([0.3], [-1.0], [-0.2, 0.1, 0.4]):
        together = store.unlabelled_within(1, rows, edges)
        assert together == [store.unlabelled_within(1, row[None], edges)[0] for row in rows]
        with monkeypatch.context() as patched:
            patched.setattr(vectorstore.engine, "_FIRST_LIMIT", 4)
            assert store.unlabelled_within(1, rows, edges) == together
    everything = store.unlabelled_within(1, rows, [-1.0])
    for row, found in zip(rows, everything, strict=True):
        assert [n.task for n in found] == [t for t, _ in reference.unlabelled_near(row, -1.0, N)]
    assert store.unlabelled_within(1, rows[:0], [0.3]) == []
    with pytest.raises(ValueError, match="one vector per row"):
        store.unlabelled_within(1, rows[0], [0.3])


def test_vote_radii_are_recorded_rounded_down_and_searched_by_band(store):
    rng = np.random.default_rng(9)
    points = project_points(rng, 60)  # every third unlabelled: 20
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", points)
    reference = Reference()
    reference.write(points)
    query = unit_rows(rng, 1)[0]
    assert {n.vote_radius for n in store.unlabelled_within(1, query[None], [-1.0])[0]} == {None}
    unlabelled = sorted(reference.tasks(labelled=False))
    radii = {t: float(r) for t, r in zip(unlabelled[:-3], rng.uniform(-0.5, 0.6, 17), strict=True)}
    radii[0] = 0.123456
    store.set_vote_radii(1, {**radii, 999: 0.7})  # 999: no such point, skipped
    recorded = {n.task: n.vote_radius for n in store.unlabelled_within(1, query[None], [-1.0])[0]}
    assert set(recorded) == set(unlabelled)
    assert all(recorded[t] is None for t in unlabelled[-3:])  # never recorded
    for task, radius in radii.items():
        assert recorded[task] <= radius < recorded[task] + VOTE_RADIUS_STEP
    assert store.points(1, [0])[0].extra == {}  # the push's record, not the task's data
    # Bands: a point in [edges[i], edges[i+1]) counts from edges[i] near; unrecorded from edges[0].
    sims = {t: s for t, s in reference.unlabelled_near(query, -1.0, N)}
    for edges in ([-0.2], [-0.3, 0.0, 0.2], [0.0, 0.1, 0.3, 0.5]):

        def threshold(task: TaskId, edges: list[float] = edges) -> float:
            if recorded[task] is None:
                return edges[0]
            return max([edges[0], *[e for e in edges if e <= recorded[task]]])

        wanted = [t for t in sorted(sims, key=lambda t: -sims[t]) if sims[t] >= threshold(t)]
        found = store.unlabelled_within(1, query[None], edges)[0]
        assert [n.task for n in found] == wanted, edges
    store.set_vote_radii(2, radii)  # a project never stored: nothing to record


def test_points_vectors_counts_and_iteration_equal_the_reference(filled):
    store, reference = filled
    assert store.count(1) == N
    assert store.count(1, labelled=True) == len(reference.tasks(labelled=True))
    assert store.count(1, labelled=False) == len(reference.tasks(labelled=False))
    assert store.count(2) == 0
    for labelled in (None, True, False):
        iterated = {p.task: p for p in store.iter_points(1, labelled=labelled)}
        assert set(iterated) == reference.tasks(labelled)
        for task, point in iterated.items():
            assert point.labels == reference.labels[task]
            assert point.image == reference.images[task]
            assert point.labelled == bool(reference.labels[task])
            np.testing.assert_allclose(point.vector, reference.vectors[task], atol=1e-6)
    bare = list(store.iter_points(1, labelled=True, with_vectors=False))
    assert {p.task for p in bare} == reference.tasks(labelled=True)
    asked = [0, 1, 2, N + 5, "missing"]
    assert store.has_vectors(1, asked) == {0, 1, 2}
    assert store.has_vectors(1, []) == set()
    vectors = store.vectors(1, asked)
    assert set(vectors) == {0, 1, 2}
    for task, vector in vectors.items():
        np.testing.assert_allclose(vector, reference.vectors[task], atol=1e-6)
    points = store.points(1, asked, with_vectors=False)
    assert set(points) == {0, 1, 2}
    assert points[1].labels == reference.labels[1]
    assert points[1].annotation == Annotation("1001", "2026-01-01T00:00:00Z")
    np.testing.assert_allclose(store.points(1, [2])[2].vector, reference.vectors[2], atol=1e-6)
    assert store.iter_points(2) is not None and list(store.iter_points(2)) == []


# -- writes -----------------------------------------------------------------------------------


def test_round_trip_keeps_vectors_and_payload(store):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 3)
    assert store.collection(1) is None
    store.ensure_collection(1, "enc", DIM, "w1")
    store.upsert(
        1,
        "enc",
        [
            Point(task=10, vector=vectors[0], image="/data/upload/a.png", labels={"organ": "x"}),
            Point(task=11, vector=vectors[1], image="/data/upload/b.png"),
            Point(task="c", vector=vectors[2], extra={"patient": "p1"}),
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
    assert points["c"].extra == {"patient": "p1"}
    info = store.collection(1)
    assert info is not None
    assert (info.encoder, info.dim, info.weights_id, info.generation) == ("enc", DIM, "w1", 1)
    assert store.ensure_collection(1, "enc", DIM, "w1") == info


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
    # So does one with labels of an older annotation; a newer one replaces them.
    store.upsert(1, "enc", [Point(5, unit_rows(rng, 1)[0], labels={"organ": "x"}, annotation=old)])
    assert next(store.iter_points(1)).labels == {"organ": "liver"}
    newest = Annotation(id=3, updated_at="2026-01-03T00:00:00Z")
    store.upsert(
        1, "enc", [Point(5, unit_rows(rng, 1)[0], labels={"organ": "y"}, annotation=newest)]
    )
    assert next(store.iter_points(1)).labels == {"organ": "y"}
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
    assert store.clear_labels(1, 7) == []  # nothing left from that annotation


def test_searches_follow_every_label_change(store):
    """After each write the searches equal the reference's (a cache must follow them)."""
    rng = np.random.default_rng(4)
    points = project_points(rng, 30)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", points)
    reference = Reference()
    reference.write(points)
    queries = unit_rows(rng, 4)

    def same() -> None:
        for query in queries:
            assert_same_neighbours(store, reference, query, 5)
            assert_same_neighbours(store, reference, query, 40)
        assert_same_batch(store, reference, queries, 3)
        assert store.count(1, labelled=True) == len(reference.tasks(labelled=True))

    same()  # searched once: a cache is loaded now
    for task in (0, 3):  # unlabelled: labelled now
        store.set_labels(1, task, {"f": "new"}, Annotation(f"a{task}", "2026-02-01T00:00:00Z"))
        reference.labels[task] = {"f": "new"}
    same()
    assert store.clear_labels(1, 1001) == [1]
    reference.labels[1] = {}
    same()
    fresh = [
        Point(task=100, vector=unit_rows(rng, 1)[0], labels={"f": "u"}),
        Point(task=101, vector=unit_rows(rng, 1)[0]),
        Point(task=2, vector=unit_rows(rng, 1)[0]),  # moved; its stored labels stay
    ]
    store.upsert(1, "enc", fresh)
    reference.write(fresh)
    reference.labels[2] = dict(points[2].labels)
    same()


def test_mismatched_vectors_are_refused(store):
    store.ensure_collection(1, "enc", DIM, "w")
    with pytest.raises(DimensionMismatchError, match="expects 16"):
        store.upsert(1, "enc", [Point(task=1, vector=np.ones(DIM + 1, dtype=np.float32))])
    with pytest.raises(DimensionMismatchError, match="refusing other"):
        store.upsert(1, "other", [Point(task=1, vector=np.ones(DIM, dtype=np.float32))])
    with pytest.raises(DimensionMismatchError, match="echolabel reembed"):
        store.ensure_collection(1, "other", 8, "w")
    with pytest.raises(StoreError, match="call ensure_collection"):
        store.upsert(2, "enc", [Point(task=1, vector=np.ones(DIM, dtype=np.float32))])
    assert store.count(1) == 0


def test_projects_are_isolated(store):
    rng = np.random.default_rng(4)
    for project in (1, 2):
        store.ensure_collection(project, "enc", DIM, "w")
    v = unit_rows(rng, 1)[0]
    store.upsert(1, "enc", [Point(task=1, vector=v, labels={"f": "a"})])
    assert store.nearest(2, v, k=3) == []
    assert store.count(2) == 0


# -- generations and the alias ----------------------------------------------------------------


def test_generations_build_beside_the_live_one_and_switch_atomically(store):
    rng = np.random.default_rng(8)
    old, new = project_points(rng, 12), project_points(rng, 12)
    first = store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", old)
    query = unit_rows(rng, 1)[0]
    assert store.nearest(1, query, 3)  # answered (and cached) from the live generation

    building = store.create_generation(1, "enc2", DIM, "w2")
    assert (building.generation, building.encoder) == (2, "enc2")
    assert store.collection(1) == first, "a generation being built is not live"
    assert [g.generation for g in store.generations(1)] == [1, 2]
    store.upsert(1, "enc2", [p for p in new if p.task < 8], collection=building)
    assert store.has_vectors(1, list(range(12)), collection=building) == set(range(8))
    assert store.count(1) == 12
    built = store.points(1, [0, 1], collection=building)
    np.testing.assert_allclose(built[1].vector, new[1].vector, atol=1e-6)
    live = Reference()
    live.write(old)
    assert_same_neighbours(store, live, query, 3)

    # Labels written meanwhile reach the live generation and the one being built.
    later = Annotation("late", "2026-03-01T00:00:00Z")
    assert store.set_labels(1, 0, {"f": "late"}, later)
    assert store.points(1, [0], collection=building)[0].labels == {"f": "late"}
    assert store.points(1, [0])[0].labels == {"f": "late"}
    # Only into the one being built, when it is named.
    elsewhere = Annotation("new", "2026-03-01T00:00:00Z")
    assert store.set_labels(1, 3, {"f": "only-new"}, elsewhere, collection=building)
    assert store.points(1, [3])[3].labels == {}
    assert store.points(1, [3], collection=building)[3].labels == {"f": "only-new"}
    # Cleared in both.
    assert store.clear_labels(1, "late") == [0]
    assert store.points(1, [0], collection=building)[0].labels == {}
    built_tasks = {p.task for p in store.iter_points(1, with_vectors=False, collection=building)}
    assert built_tasks == set(range(8))

    store.switch_generation(1, building)
    info = store.collection(1)
    assert info is not None and (info.name, info.encoder) == (building.name, "enc2")
    assert [g.generation for g in store.generations(1)] == [2], "older generations dropped"
    assert store.count(1) == 8
    switched = Reference()
    switched.write([p for p in new if p.task < 8])
    for task in range(8):
        switched.labels[task] = store.points(1, [task])[task].labels
    assert switched.labels[3] == {"f": "only-new"}
    assert_same_neighbours(store, switched, query, 5)  # searches follow the switch
    with pytest.raises(DimensionMismatchError):
        store.ensure_collection(1, "enc", DIM, "w")

    with pytest.raises(StoreError, match="live generation"):
        store.drop_generation(info)
    abandoned = store.create_generation(1, "enc3", DIM, "w3")
    store.drop_generation(abandoned)
    assert [g.generation for g in store.generations(1)] == [2]
    assert store.generations(2) == []


# -- pre-annotation state ---------------------------------------------------------------------


def test_push_state_is_read_changed_and_written_in_one_step(store):
    """The primitive under the push's bookkeeping (its rules: tests/test_push_state.py)."""
    seen: list[CollectionInfo] = []

    def change(values: dict) -> Callable[[CollectionInfo], dict]:
        return lambda live: seen.append(live) or values

    assert store.update_push_state(1, change({"label_state": 1})) is None  # no collection
    assert seen == [], "nothing to change"
    first = store.ensure_collection(1, "enc", DIM, "w")
    written = store.update_push_state(1, change({"published_version": "v1", "label_changes": [1]}))
    assert written == {"published_version": "v1", "label_changes": [1]}
    assert seen == [first], "the change is given the live generation"
    assert store.update_push_state(1, lambda live: {"label_state": live.label_state + 3}) == {
        "label_state": 3
    }
    assert store.update_push_state(1, lambda live: {}) == {}
    info = store.collection(1)
    assert info is not None
    assert (info.published_version, info.label_state, info.label_changes) == ("v1", 3, (1,))
    with pytest.raises(StoreError, match="not the push's state"):
        store.update_push_state(1, lambda live: {"encoder": "other", "label_state": 9})
    info = store.collection(1)
    assert info is not None and (info.encoder, info.label_state) == ("enc", 3)
    # The state belongs to the generation: a switch starts it afresh.
    second = store.create_generation(1, "enc", DIM, "w")
    store.switch_generation(1, second)
    info = store.collection(1)
    assert info is not None and info.name == second.name
    assert (info.published_version, info.label_state, info.label_changes) == (None, 0, ())
