"""The Qdrant Edge store: QdrantStore's semantics on Qdrant's own engine, durable on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import qdrant_edge as edge

import vectorstore
from echolabel.core.push_state import note_label_changes, record_push, take_label_changes
from echolabel.core.runtime import open_configured_store
from echolabel.settings import ConfigError, Settings
from tests.helpers import unit_rows
from tests.label_configs import DARK_BRIGHT_CONFIG
from vectorstore import (
    Annotation,
    ExactIndex,
    ExactSearchStore,
    Point,
    QdrantStore,
    StoreError,
    open_store,
    point_id,
)
from vectorstore.edge_store import EdgeStore

DIM = 16
NEW = Annotation(id=2, updated_at="2026-01-02T00:00:00Z")
OLD = Annotation(id=1, updated_at="2026-01-01T00:00:00Z")


@pytest.fixture
def store(tmp_path):
    opened = EdgeStore(tmp_path / "edge", exact_max_points=1000)
    yield opened
    opened.close()


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that imports this checkout's vectorstore."""
    package_root = Path(vectorstore.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.getcwd()])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_edge_boolean_match_finding(tmp_path):
    """qdrant-edge-py 0.9.0: MatchValue(True) matches no boolean payload (it becomes the integer
    1, bool being an int subclass), so EdgeStore stores `labelled` as the integer 0/1."""
    shard = edge.EdgeShard.create(
        str(tmp_path / "raw"),
        edge.EdgeConfig(vectors=edge.EdgeVectorParams(size=2, distance=edge.Distance.Cosine)),
    )
    shard.update(edge.UpdateOperation.create_field_index("flag", edge.PayloadSchemaType.Bool))
    shard.update(edge.UpdateOperation.create_field_index("mark", edge.PayloadSchemaType.Integer))
    shard.update(
        edge.UpdateOperation.upsert_points(
            [
                edge.Point(1, [1.0, 0.0], {"flag": True, "mark": 1}),
                edge.Point(2, [0.0, 1.0], {"flag": False, "mark": 0}),
            ]
        )
    )

    def matching(key: str, value: object) -> int:
        condition = edge.FieldCondition(key=key, match=edge.MatchValue(value))
        return shard.count(edge.CountRequest(filter=edge.Filter(must=[condition])))

    found = {
        "flag=True": matching("flag", True),
        "flag=False": matching("flag", False),
        "mark=1": matching("mark", 1),
    }
    shard.close()
    assert found["mark=1"] == 1, f"the integer workaround itself no longer matches: {found}"
    assert found["flag=True"] == 0 and found["flag=False"] == 0, (
        f"qdrant-edge-py {version('qdrant-edge-py')} now matches boolean payloads with "
        f"MatchValue ({found}): "
        "the integer `labelled` workaround in qdrant/vectorstore/edge_store.py can go (store a "
        "bool with a Bool index), and this test with it"
    )


def test_round_trip_keeps_vectors_and_payload(store):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 3)
    store.ensure_collection(1, "enc", DIM, "w1")
    store.upsert(
        1,
        "enc",
        [
            Point(task=10, vector=vectors[0], image="/a.png", labels={"organ": "x"}),
            Point(task=11, vector=vectors[1], image="/b.png", extra={"patient": "p7"}),
            Point(task="c", vector=vectors[2]),
        ],
    )
    assert (store.count(1), store.count(1, labelled=True), store.count(1, labelled=False)) == (
        3,
        1,
        2,
    )
    got = store.vectors(1, [10, 11, 99])
    assert set(got) == {10, 11}
    np.testing.assert_allclose(got[10], vectors[0], rtol=1e-6)
    points = {p.task: p for p in store.iter_points(1)}
    assert points[10].labels == {"organ": "x"} and points[10].image == "/a.png"
    assert points[11].extra == {"patient": "p7"} and points["c"].labels == {}
    assert store.has_vectors(1, [10, "c", 12]) == {10, "c"}
    info = store.collection(1)
    assert (info.encoder, info.dim, info.weights_id, info.generation) == ("enc", DIM, "w1", 1)
    raw = store._shard(info.name).retrieve([point_id(1, 10)], True, False)[0].payload
    assert raw["labelled"] == 1 and raw["project"] == "1"  # the integer flag, see the finding


def test_retried_upsert_overwrites_instead_of_duplicating(store):
    rng = np.random.default_rng(1)
    store.ensure_collection(1, "enc", DIM, "w")
    for _ in range(3):
        store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    store.upsert(1, "enc", [Point(task=6, vector=v) for v in unit_rows(rng, 2)])  # same task twice
    assert store.count(1) == 2


def test_newest_annotation_wins(store):
    rng = np.random.default_rng(2)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    assert store.set_labels(1, 5, {"organ": "liver"}, NEW)
    assert store.set_labels(1, 5, {"organ": "heart"}, OLD)  # older: ignored
    assert next(store.iter_points(1)).labels == {"organ": "liver"}
    # A re-upsert without labels (the image embedded again) keeps them; one from an older
    # annotation does not replace them either.
    store.upsert(1, "enc", [Point(task=5, vector=unit_rows(rng, 1)[0])])
    store.upsert(
        1,
        "enc",
        [Point(task=5, vector=unit_rows(rng, 1)[0], labels={"organ": "x"}, annotation=OLD)],
    )
    assert next(store.iter_points(1)).labels == {"organ": "liver"}
    assert store.count(1, labelled=True) == 1
    assert store.set_labels(1, 99, {"organ": "x"}, NEW) is False  # no such point


def test_clear_labels_by_annotation_id(store):
    rng = np.random.default_rng(3)
    store.ensure_collection(1, "enc", DIM, "w")
    v = unit_rows(rng, 2)
    store.upsert(1, "enc", [Point(task=1, vector=v[0]), Point(task=2, vector=v[1])])
    store.set_labels(1, 1, {"organ": "a"}, Annotation(id=7, updated_at="2026-01-01T00:00:00Z"))
    store.set_labels(1, 2, {"organ": "b"}, Annotation(id="8", updated_at="2026-01-01T00:00:00Z"))
    assert store.nearest(1, v[0], k=5)[0].task == 1
    assert store.clear_labels(1, "7") == [1]  # ids match as text, int or str
    assert store.clear_labels(1, 7) == []
    assert store.count(1, labelled=True) == 1
    assert [n.task for n in store.nearest(1, v[0], k=5)] == [2]
    point = store.points(1, [1])[1]
    assert point.labels == {} and point.annotation == Annotation()


def test_generations_labels_switch_and_drops(store):
    rng = np.random.default_rng(4)
    v = unit_rows(rng, 3)
    live = store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=i, vector=v[i]) for i in range(3)])
    building = store.create_generation(1, "enc2", DIM, "w2")
    assert store.collection(1).name == live.name  # not live until switched
    store.upsert(1, "enc2", [Point(task=i, vector=v[i]) for i in range(2)], collection=building)
    # Labels land in the live generation and in the one being built; True: the live point exists.
    assert store.set_labels(1, 0, {"f": "a"}, NEW)
    assert store.set_labels(1, 2, {"f": "b"}, NEW)  # not yet in the new generation
    assert store.points(1, [0], collection=building)[0].labels == {"f": "a"}
    assert sorted(store.clear_labels(1, NEW.id)) == [0, 2]
    assert store.count(1, labelled=True) == 0
    assert store.points(1, [0], collection=building)[0].labels == {}
    assert [g.generation for g in store.generations(1)] == [1, 2]

    store.switch_generation(1, building)
    assert store.collection(1).name == building.name and store.collection(1).encoder == "enc2"
    assert [g.generation for g in store.generations(1)] == [2]
    assert not (store.path / "collections" / live.name).exists()
    with pytest.raises(StoreError, match="is the live generation"):
        store.drop_generation(building)
    abandoned = store.create_generation(1, "enc3", DIM, "w3")
    store.drop_generation(abandoned)
    assert [g.generation for g in store.generations(1)] == [2]

    store.drop_project(1)
    assert store.collection(1) is None and store.generations(1) == []
    assert list((store.path / "collections").iterdir()) == []
    assert list((store.path / "aliases").iterdir()) == []


def test_restart_keeps_points_labels_metadata_and_alias(tmp_path):
    rng = np.random.default_rng(5)
    v = unit_rows(rng, 4)
    first = EdgeStore(tmp_path / "edge")
    first.ensure_collection(1, "enc", DIM, "w")
    second = first.create_generation(1, "enc", DIM, "w")
    first.upsert(1, "enc", [Point(task=i, vector=v[i]) for i in range(4)], collection=second)
    first.switch_generation(1, second)
    first.set_labels(1, 3, {"f": "x"}, NEW)
    record_push(first, 1, published_version="enc@2", vote_radius_min=0.25)
    note_label_changes(first, 1, [3, "t"])
    first.close()

    reopened = EdgeStore(tmp_path / "edge")
    info = reopened.collection(1)
    assert (info.name, info.generation, info.published_version) == (second.name, 2, "enc@2")
    assert (info.label_state, info.label_changes, info.vote_radius_min) == (2, (3, "t"), 0.25)
    assert reopened.count(1) == 4 and reopened.count(1, labelled=True) == 1
    assert reopened.points(1, [3])[3].labels == {"f": "x"}
    np.testing.assert_allclose(reopened.vectors(1, [2])[2], v[2], rtol=1e-6)
    assert [n.task for n in reopened.nearest(1, v[3], k=3)] == [3]
    assert take_label_changes(reopened, 1) == [3, "t"]
    assert reopened.collection(1).label_changes == ()
    reopened.close()


def test_a_killed_rebuild_never_goes_live_and_acknowledged_writes_survive(tmp_path):
    """kill -9 while generation 2 is being built and generation 3 is being created."""
    root = tmp_path / "edge"
    result = run_child(
        """
        import os, signal, sys
        from pathlib import Path
        import numpy as np
        from vectorstore import Annotation, Point
        from vectorstore.edge_store import EdgeStore

        store = EdgeStore(Path(sys.argv[1]))
        v = np.eye(16, dtype=np.float32)
        store.ensure_collection(1, "enc", 16, "w")
        store.upsert(1, "enc", [Point(task=i, vector=v[i], labels={"f": "a"}) for i in range(5)])
        building = store.create_generation(1, "enc", 16, "w")
        store.upsert(1, "enc", [Point(task=i, vector=v[i]) for i in range(3)], collection=building)
        store.set_labels(1, 1, {"f": "b"}, Annotation(9, "2026-02-01T00:00:00Z"))
        # A third generation whose creation dies before its metadata is written.
        (Path(sys.argv[1]) / "collections" / "echolabel_p1_g3" / "shard").mkdir(parents=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(root),
    )
    assert result.returncode == -9, result.stderr

    store = EdgeStore(root)
    assert store.collection(1).generation == 1
    assert [g.generation for g in store.generations(1)] == [1, 2]  # 2 resumes, 3 is gone
    assert not (root / "collections" / "echolabel_p1_g3").exists()
    assert store.count(1) == 5 and store.points(1, [1])[1].labels == {"f": "b"}
    building = store.generations(1)[1]
    assert store.has_vectors(1, range(5), collection=building) == {0, 1, 2}
    assert store.points(1, [1], collection=building)[1].labels == {"f": "b"}
    store.switch_generation(1, building)
    assert store.collection(1).generation == 2 and store.count(1) == 3
    store.close()


def test_an_interrupted_switch_is_finished_at_open(tmp_path, monkeypatch):
    store = EdgeStore(tmp_path / "edge")
    old = store.ensure_collection(1, "enc", DIM, "w")
    new = store.create_generation(1, "enc", DIM, "w")

    def crash(name: str) -> None:
        raise RuntimeError("killed after the pointer moved")

    monkeypatch.setattr(store, "_drop", crash)
    with pytest.raises(RuntimeError):
        store.switch_generation(1, new)
    store.close()

    reopened = EdgeStore(tmp_path / "edge")
    assert reopened.collection(1).name == new.name
    assert [g.name for g in reopened.generations(1)] == [new.name]
    assert not (tmp_path / "edge" / "collections" / old.name).exists()
    reopened.close()


def test_a_second_holder_gets_a_clear_lock_error(tmp_path):
    store = EdgeStore(tmp_path / "edge")
    store.ensure_collection(1, "enc", DIM, "w")
    result = run_child(
        """
        import sys
        from pathlib import Path
        from vectorstore import StoreError
        from vectorstore.edge_store import EdgeStore
        try:
            EdgeStore(Path(sys.argv[1]))
        except StoreError as exc:
            print(exc)
            sys.exit(3)
        """,
        str(tmp_path / "edge"),
    )
    assert result.returncode == 3, result.stderr
    assert "locked by another process" in result.stdout and "QDRANT_URL" in result.stdout
    assert f"pid {os.getpid()}" in result.stdout
    with pytest.raises(StoreError, match="locked by another process"):
        EdgeStore(tmp_path / "edge")  # a second store in this process as well
    store.close()
    with pytest.raises(StoreError, match="was closed"):
        store.count(1)
    EdgeStore(tmp_path / "edge").close()  # released on close


def test_wal_on_and_payload_indexes(store):
    info = store.ensure_collection(1, "enc", DIM, "w")
    shard_dir = store.path / "collections" / info.name / "shard"
    assert json.loads((shard_dir / "edge_config.json").read_text())["wal_enabled"] is True
    assert (shard_dir / "wal").is_dir()
    schema = store._shard(info.name).info().payload_schema
    assert {name: schema[name].data_type for name in schema} == {
        "project": edge.PayloadSchemaType.Keyword,
        "labelled": edge.PayloadSchemaType.Integer,
        "annotation_id": edge.PayloadSchemaType.Keyword,
        "vote_radius": edge.PayloadSchemaType.Float,
    }
    meta = json.loads((store.path / "collections" / info.name / "meta.json").read_text())
    assert (meta["encoder"], meta["dim"], meta["generation"], meta["project"]) == (
        "enc",
        DIM,
        1,
        "1",
    )
    pointer = json.loads((store.path / "aliases" / f"{store.alias(1)}.json").read_text())
    assert pointer == {"collection": info.name}


def test_exact_below_the_threshold_and_hnsw_above_agree(tmp_path):
    rng = np.random.default_rng(6)
    n, dim = 3000, 32
    data = unit_rows(rng, n, dim)
    store = EdgeStore(tmp_path / "edge", exact_max_points=500)
    info = store.ensure_collection(1, "enc", dim, "w")
    labelled = np.arange(n) % 3 != 0
    store.upsert(
        1,
        "enc",
        [Point(task=i, vector=data[i], labels={"f": "a"} if labelled[i] else {}) for i in range(n)],
    )
    assert store._shard(info.name).info().indexed_vectors_count == 0, "writes never build it"
    assert store.build_index(1) and not store.build_index(1)  # built once, then nothing waits
    shard_info = store._shard(info.name).info()
    assert shard_info.indexed_vectors_count > 0, "the HNSW graph was not built"
    assert not store._search_params(info.name, 10, exact=False).exact
    assert store._search_params(info.name, 10, exact=True).exact

    hits = 0
    queries = unit_rows(rng, 50, dim)
    for query in queries:
        sims = np.where(labelled, data @ query, -np.inf)
        truth = np.argsort(-sims, kind="stable")[:10].tolist()
        exact = store.nearest(1, query, k=10, exact=True)
        assert [nb.task for nb in exact] == truth
        np.testing.assert_allclose([nb.similarity for nb in exact], sims[truth], atol=1e-5)
        hits += len({nb.task for nb in store.nearest(1, query, k=10)} & set(truth))
    assert hits / (10 * len(queries)) >= 0.99
    store.close()

    small = EdgeStore(tmp_path / "small", exact_max_points=500)
    info = small.ensure_collection(1, "enc", dim, "w")
    small.upsert(1, "enc", [Point(task=i, vector=data[i], labels={"f": "a"}) for i in range(400)])
    assert small._search_params(info.name, 10, exact=False).exact
    assert not small.build_index(1)  # below the threshold: nothing to build
    assert small._shard(info.name).info().indexed_vectors_count == 0
    small.close()


def test_partly_labelled_votes_walk_a_graph_of_the_labelled_points_alone(tmp_path):
    # A filtered walk over a graph of every point lost neighbours once most points were
    # unlabelled (bench.filtered_recall); the vote vector's graph holds labelled points only.
    rng = np.random.default_rng(8)
    n, dim = 4000, 32
    data = unit_rows(rng, n, dim)
    labelled = rng.random(n) < 0.2
    store = EdgeStore(tmp_path / "edge", exact_max_points=300)
    info = store.ensure_collection(1, "enc", dim, "w")
    labels = [{"f": "a"} if flag else {} for flag in labelled]
    store.upsert(1, "enc", [Point(task=i, vector=data[i], labels=labels[i]) for i in range(n)])
    assert store.build_index(1)
    assert not store._search_params(info.name, 10, exact=False).exact
    shard = store._shard(info.name)
    vote_vectors = shard.count(
        edge.CountRequest(
            exact=True, filter=edge.Filter(must=[edge.HasVectorCondition("labelled")])
        )
    )
    assert vote_vectors == labelled.sum()  # only labelled points carry one

    tasks = [int(t) for t in np.flatnonzero(~labelled)[:100]]
    truth = store.nearest_batch(1, data[tasks], 10, exact=True)
    found = store.nearest_batch(1, data[tasks], 10)
    assert all(len(row) == 10 for row in found)
    hits = sum(
        len({nb.task for nb in a} & {nb.task for nb in b})
        for a, b in zip(found, truth, strict=True)
    )
    assert hits / (10 * len(tasks)) >= 0.99
    for row in truth:
        assert all(labelled[nb.task] for nb in row)

    # A label written or removed moves the vote vector with it, in the graph's segment too.
    first = truth[0][0].task
    store.set_labels(1, first, {}, NEW)
    assert first not in {nb.task for nb in store.nearest(1, data[first], 10)}
    newcomer = tasks[0]
    store.set_labels(1, newcomer, {"f": "b"}, NEW)
    best = store.nearest(1, data[newcomer], 1)[0]
    assert (best.task, best.labels) == (newcomer, {"f": "b"})
    assert store.vectors(1, [newcomer])[newcomer] == pytest.approx(data[newcomer], abs=1e-6)
    assert set(store.clear_labels(1, NEW.id)) == {first, newcomer}  # the annotation deleted
    assert newcomer not in {nb.task for nb in store.nearest(1, data[newcomer], 10)}
    assert store.count(1, labelled=True) == labelled.sum() - 1
    store.close()


def test_a_generation_made_before_the_vote_vector_is_searched_with_the_filter(tmp_path):
    rng = np.random.default_rng(9)
    data = unit_rows(rng, 60)
    store = EdgeStore(tmp_path / "edge")
    info = store.ensure_collection(1, "enc", DIM, "w")
    # Rewrite the generation as the store wrote it before: one unnamed vector, no metadata key.
    meta = {k: v for k, v in store._metas[info.name].items() if k != "vote_vector"}
    store._shards.pop(info.name).close()
    where = tmp_path / "edge" / "collections" / info.name
    (where / "meta.json").write_text(json.dumps(meta))
    store._metas[info.name] = meta
    shutil.rmtree(where / "shard")
    edge.EdgeShard.create(str(where / "shard"), store._edge_config(meta)).close()
    store.close()

    store = EdgeStore(tmp_path / "edge")
    labelled = np.arange(60) % 2 == 0
    store.upsert(
        1, "enc", [Point(i, data[i], labels={"f": "a"} if labelled[i] else {}) for i in range(60)]
    )
    store.set_labels(1, 1, {"f": "b"}, NEW)
    labelled[1] = True
    for query in data[:5]:
        sims = np.where(labelled, data @ query, -np.inf)
        assert [nb.task for nb in store.nearest(1, query, 5)] == np.argsort(-sims)[:5].tolist()
    store.close()


def test_nearest_batch_and_unlabelled_within(store):
    rng = np.random.default_rng(7)
    data = unit_rows(rng, 200)
    labelled = np.arange(200) % 2 == 0
    queries = unit_rows(rng, 5)
    assert store.nearest_batch(1, queries, 3) == [[]] * 5  # no collection yet
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(
        1,
        "enc",
        [
            Point(task=i, vector=data[i], labels={"f": "a"} if labelled[i] else {})
            for i in range(200)
        ],
    )
    rows, sims = ExactIndex(data[labelled]).search_batch(queries, 10)
    found = store.nearest_batch(1, queries, 10)
    assert [[n.task for n in row] for row in found] == (2 * rows).tolist()  # labelled: even
    np.testing.assert_allclose([[n.similarity for n in r] for r in found], sims, atol=1e-5)
    assert [len(row) for row in store.nearest_batch(1, queries, 101)] == [100] * 5

    sims = data @ queries[0]
    near = store.unlabelled_within(1, queries[:1], [0.3])[0]
    wanted = {i for i in range(200) if not labelled[i] and sims[i] >= 0.3}
    assert {n.task for n in near} == wanted
    assert [n.similarity for n in near] == sorted((n.similarity for n in near), reverse=True)
    assert near[0].similarity == pytest.approx(sims[near[0].task], abs=1e-5)


def test_same_answers_as_qdrant_local_mode(tmp_path):
    """The same operations on QdrantStore's local mode and on EdgeStore read back the same."""
    rng = np.random.default_rng(8)
    data = unit_rows(rng, 300)
    stores = {
        "local": QdrantStore.open(path=tmp_path / "local"),
        "edge": EdgeStore(tmp_path / "edge", exact_max_points=1000),
    }
    for store in stores.values():
        for project in (1, 2):
            store.ensure_collection(project, "enc", DIM, "w")
        store.upsert(
            1,
            "enc",
            [
                Point(
                    task=i,
                    vector=data[i],
                    labels={"f": str(i % 3)} if i % 4 else {},
                    annotation=Annotation(id=i, updated_at="2026-01-01T00:00:00Z"),
                )
                for i in range(300)
            ],
        )
        store.upsert(
            2, "enc", [Point(task=i, vector=data[i], labels={"f": "p2"}) for i in range(5)]
        )
        store.set_labels(1, 4, {"f": "new"}, NEW)
        store.set_labels(1, 5, {"f": "old"}, Annotation(id=5, updated_at="2025-01-01T00:00:00Z"))
        store.clear_labels(1, 9)
        store.upsert(1, "enc", [Point(task=i, vector=data[i]) for i in range(10, 20)])
        note_label_changes(store, 1, [4, 9])

    def observe(store) -> dict:
        seen: dict = {
            "counts": [store.count(1, labelled) for labelled in (None, True, False)],
            "points": {p.task: (p.labels, p.annotation) for p in store.iter_points(1)},
            "info": store.collection(1),
            "near": [
                {
                    n.task: round(n.similarity, 5)
                    for n in store.unlabelled_within(1, data[row : row + 1], [0.2])[0][:50]
                }
                for row in range(0, 300, 37)
            ],
        }
        seen["neighbours"] = [
            store.nearest(1, data[row], k=10, exclude=[row]) for row in range(0, 300, 7)
        ]
        return seen

    local, edged = (observe(store) for store in stores.values())
    assert edged["counts"] == local["counts"] and edged["points"] == local["points"]
    assert edged["info"] == local["info"]
    for ours, theirs in zip(edged["neighbours"], local["neighbours"], strict=True):
        assert [n.task for n in ours] == [n.task for n in theirs]
        assert [n.labels for n in ours] == [n.labels for n in theirs]
        np.testing.assert_allclose(
            [n.similarity for n in ours], [n.similarity for n in theirs], atol=1e-5
        )
    for ours, theirs in zip(edged["near"], local["near"], strict=True):
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose(list(ours.values()), [theirs[t] for t in ours], atol=1e-5)
    assert stores["edge"].nearest(2, data[0], k=3)[0].labels == {"f": "p2"}
    name = stores["edge"].collection(1).name
    assert stores["edge"]._labelled_count(name) == stores["edge"].count(1, labelled=True)
    for store in stores.values():
        store.close()


def test_threads_share_one_store(store):
    rng = np.random.default_rng(9)
    data = unit_rows(rng, 400)
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=i, vector=data[i], labels={"f": "a"}) for i in range(100)])
    errors: list[BaseException] = []

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # reported below
                errors.append(exc)

        return run

    def writer(start: int):
        for i in range(start, start + 150):
            store.upsert(1, "enc", [Point(task=i, vector=data[i])])
            store.set_labels(1, i, {"f": "b"}, NEW)

    def reader():
        for i in range(150):
            assert len(store.nearest(1, data[i], k=5)) == 5

    threads = [
        threading.Thread(target=guarded(work))
        for work in (lambda: writer(100), lambda: writer(250), reader, reader)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count(1) == 400 and store.count(1, labelled=True) == 400
    assert store._labelled_count(store.collection(1).name) == 400


def test_open_store_opts_into_edge(tmp_path):
    store = open_store(path=tmp_path / "edge", engine="edge", exact_max_points=50)
    assert isinstance(store, EdgeStore) and store.single_writer and store.exact_max_points == 50
    store.close()
    with pytest.raises(StoreError, match="storage path"):
        open_store(engine="edge")


def test_edge_is_the_embedded_default_and_local_mode_only_a_stand_in(tmp_path):
    store = open_store(path=tmp_path / "default")
    assert isinstance(store, EdgeStore)
    store.close()
    local = open_store(path=tmp_path / "local", engine="local", exact_max_points=0)
    assert isinstance(local, QdrantStore) and local.single_writer
    local.close()
    assert Settings.from_env({}).embedded_engine == "edge"
    assert Settings.from_env({"ECHOLABEL_EMBEDDED_ENGINE": "LOCAL"}).embedded_engine == "local"
    with pytest.raises(ConfigError, match="ECHOLABEL_EMBEDDED_ENGINE='sqlite' must be one of"):
        Settings.from_env({"ECHOLABEL_EMBEDDED_ENGINE": "sqlite"})
    context_store = open_configured_store(Settings(model_dir=tmp_path / "model"))
    assert isinstance(context_store, EdgeStore)
    context_store.close()
    stand_in = open_configured_store(
        Settings(model_dir=tmp_path / "model2", embedded_engine="local")
    )
    assert isinstance(stand_in, ExactSearchStore)
    stand_in.close()


def test_writes_never_build_the_graph_but_a_switch_does(tmp_path):
    """optimize() holds the GIL for the whole build: never on a write (the request path)."""
    rng = np.random.default_rng(10)
    data = unit_rows(rng, 300)
    store = EdgeStore(tmp_path / "edge", exact_max_points=50)
    live = store.ensure_collection(1, "enc", DIM, "w")
    for start in range(0, 300, 25):  # as /predict and webhooks write: a few points at a time
        store.upsert(1, "enc", [Point(task=i, vector=data[i]) for i in range(start, start + 25)])
        store.set_labels(1, start, {"f": "a"}, NEW)
    assert store._shard(live.name).info().indexed_vectors_count == 0
    assert len(store.nearest(1, data[0], k=5)) == 5  # the unindexed tail is scanned
    building = store.create_generation(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(task=i, vector=data[i]) for i in range(300)], collection=building)
    assert store._shard(building.name).info().indexed_vectors_count == 0
    store.switch_generation(1, building)
    assert store._shard(building.name).info().indexed_vectors_count > 0, "live with its graph"
    store.close()


def _recorded_storage(root: Path) -> dict[str, str | None]:
    return {
        meta.parent.name: json.loads(meta.read_text()).get("vector_storage")
        for meta in sorted((root / "collections").glob("*/meta.json"))
    }


def test_vector_storage_is_recorded_per_generation_and_exact_answers_do_not_depend_on_it(
    tmp_path,
):
    rows = unit_rows(np.random.default_rng(11), 60)
    query = unit_rows(np.random.default_rng(12), 1)[0]
    truth = sorted(((float(rows[i] @ query), i) for i in range(60)), reverse=True)[:5]
    answers = {}
    for storage in ("int8", "float32"):
        root = tmp_path / storage
        store = EdgeStore(root, exact_max_points=1000, vector_storage=storage)
        store.ensure_collection(1, "enc", DIM, "w")
        store.upsert(
            1, "enc", [Point(task=i, vector=rows[i], labels={"f": "a"}) for i in range(60)]
        )
        answers[storage] = [(n.task, n.similarity) for n in store.nearest(1, query, 5)]
        store.close()
        assert _recorded_storage(root) == {"echolabel_p1_g1": storage}
    for storage, found in answers.items():
        assert [task for task, _ in found] == [i for _, i in truth], storage
        np.testing.assert_allclose([s for _, s in found], [s for s, _ in truth], atol=1e-5)
    # Reopened with the other setting: the generation keeps how it was made, a new one follows
    # the setting.
    store = EdgeStore(tmp_path / "int8", exact_max_points=1000, vector_storage="float32")
    try:
        assert [(n.task, n.similarity) for n in store.nearest(1, query, 5)] == answers["int8"]
        store.create_generation(1, "enc", DIM, "w")
        assert _recorded_storage(tmp_path / "int8") == {
            "echolabel_p1_g1": "int8",
            "echolabel_p1_g2": "float32",
        }
    finally:
        store.close()


def test_an_unknown_vector_storage_is_refused(tmp_path):
    with pytest.raises(StoreError, match="vector storage 'int4'"):
        EdgeStore(tmp_path / "edge", vector_storage="int4")


def test_build_index_command_builds_what_grew_past_the_threshold(tmp_path, monkeypatch, capsys):
    from echolabel import cli
    from echolabel.settings import Settings

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_EXACT_SEARCH_MAX_POINTS", "50")
    monkeypatch.delenv("QDRANT_URL", raising=False)
    store = EdgeStore(Settings.from_env().qdrant_path, exact_max_points=50)
    rng = np.random.default_rng(11)
    for project, n in ((1, 120), (2, 20)):  # grown by writes: no graph yet
        store.ensure_collection(project, "enc", DIM, "w")
        vectors = unit_rows(rng, n)
        store.upsert(project, "enc", [Point(i, vectors[i], labels={"f": "a"}) for i in range(n)])
    before = {s.project: s for s in store.index_status()}
    assert (before["1"].unindexed, before["1"].builds) == (120, True)
    assert (before["2"].unindexed, before["2"].builds) == (20, False)
    assert cli.main(["build-index"]) != 0  # the backend (here: this store) holds it
    assert "locked by another process" in capsys.readouterr().err
    store.close()

    assert cli.main(["build-index", "--project", "1", "--project", "9"]) == 1
    out = capsys.readouterr().out
    assert "project 1 (echolabel_p1_g1): 120 points: graph built for 120 points" in out
    assert "project 9: no collection" in out and "project 2" not in out
    assert cli.main(["build-index"]) == 0
    out = capsys.readouterr().out
    assert "project 1 (echolabel_p1_g1): 120 points, 0 outside the graph" in out
    assert "project 2 (echolabel_p2_g1): 20 points, 20 outside the graph: below" in out
    reopened = EdgeStore(Settings.from_env().qdrant_path, exact_max_points=50)
    assert {s.project: s.unindexed for s in reopened.index_status()} == {"1": 0, "2": 20}
    reopened.close()


def test_the_vote_index_is_due_at_geometric_label_counts_and_built_by_a_timed_job(tmp_path):
    from backend.admin import Admin
    from workers.runtime import install, open_runtime

    rng = np.random.default_rng(12)
    data = unit_rows(rng, 200)
    store = EdgeStore(tmp_path / "edge", exact_max_points=50)

    def label(tasks: range) -> None:
        store.upsert(1, "enc", [Point(i, data[i], labels={"f": "a"}) for i in tasks])

    assert not store.index_due(1)  # no collection
    store.ensure_collection(1, "enc", DIM, "w")
    store.upsert(1, "enc", [Point(i, data[i]) for i in range(200)])
    assert not store.index_due(1)  # unlabelled points are not voted with
    label(range(50))
    assert not store.index_due(1)  # at the threshold: votes are exact
    label(range(50, 51))
    assert store.index_due(1)
    assert store.build_index(1) and not store.index_due(1)
    label(range(51, 100))
    assert not store.index_due(1)  # 49 more since the build: below the threshold
    label(range(100, 101))
    assert store.index_due(1)
    store.close()

    store = EdgeStore(tmp_path / "edge", exact_max_points=50)
    assert store.index_due(1)  # the count at the last build is kept in the metadata
    runtime = open_runtime(Settings(model_dir=tmp_path / "model"), store=store)
    install(runtime)
    admin = Admin(runtime)
    runtime.projects.remember(1, DARK_BRIGHT_CONFIG)  # the timer looks at known projects
    try:
        admin.start_index_timer(0.05)
        deadline = time.monotonic() + 20
        while (job := admin.local_jobs.get("build-index-1")) is None or job.status == "started":
            assert time.monotonic() < deadline, "the timer did not build the index"
            time.sleep(0.05)
        assert job.status == "finished", job.error
        assert job.result is not None and (job.result["built"], job.result["labelled"]) == (
            True,
            101,
        )
        assert not store.index_due(1)
    finally:
        admin.stop()
        install(None)
        store.close()
