"""A MODEL_DIR written before Qdrant Edge was the embedded engine is migrated on first start (or
by `echolabel migrate-store`): labels, vectors, generations and the pushed predictions' state
survive, the webhook inbox is replayed onto the new store, and the old store is kept aside."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echolabel import cli
from echolabel.core.push_state import note_label_changes, record_push
from echolabel.settings import Settings
from tests.helpers import annotation_webhook, dark_and_bright
from tests.label_configs import DARK_BRIGHT_CONFIG
from vectorstore import Annotation, Point, StoreError, open_store
from vectorstore.edge_store import EdgeStore
from vectorstore.migrate import MigrationError, holds_local_store, migrate_local_store

CONFIG = DARK_BRIGHT_CONFIG


def task(task_id: int, image: str) -> dict:
    return {"id": task_id, "data": {"image": image}, "project": 7}


def predict(client: TestClient, task_id: int, image: str) -> dict:
    body = {"tasks": [task(task_id, image)], "project": 7, "label_config": CONFIG}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def snapshot(store, project, collection=None) -> dict:
    """Everything a point holds, by task."""
    return {
        p.task: (p.vector.tolist(), p.labels, p.annotation, p.image, p.extra)
        for p in store.iter_points(project, collection=collection)
    }


def write_old_model_dir(settings, images, monkeypatch) -> dict:
    """Drive the app on qdrant-client's local mode as the code before Edge did (which recorded
    no preprocessing); return what it stored."""
    old = dataclasses.replace(settings, embedded_engine="local")
    monkeypatch.setattr(Settings, "preprocessing", property(lambda self: None))
    with TestClient(create_app(old)) as client:
        assert (
            client.post(
                "/setup", json={"project": "7", "schema": CONFIG, "hostname": "http://ls"}
            ).status_code
            == 200
        )
        for i in range(6):
            predict(client, i, images[f"dark_{i}"])
            predict(client, 10 + i, images[f"bright_{i}"])
        for i in range(4):  # labelled through webhooks, as Label Studio sends them
            for task_id, organ in ((i, "dark"), (10 + i, "bright")):
                body = annotation_webhook(
                    7, task(task_id, images[f"{organ}_{i}"]), {"organ": organ}, 100 + task_id
                )
                assert client.post("/webhook", json=body).status_code == 200
        state = client.app.state.echolabel
        assert state["inbox"].wait_idle(30)
        store = state["runtime"].store
        # A re-embedding switched once (so the live generation is 2), and a third generation
        # is half built when the process stops.
        live = store.collection(7)
        second = store.create_generation(7, live.encoder, live.dim, live.weights_id)
        points = list(store.points(7, list(snapshot(store, 7))).values())
        store.upsert(7, live.encoder, points, collection=second)
        store.switch_generation(7, second)
        third = store.create_generation(7, live.encoder, live.dim, live.weights_id)
        store.upsert(7, live.encoder, points[:5], collection=third)
        record_push(store, 7, published_version="echolabel-tiny-test-g2", vote_radius_min=0.3)
        note_label_changes(store, 7, [4, 14])
        # A second project, with a text id.
        store.ensure_collection("demo", live.encoder, live.dim, live.weights_id)
        store.upsert("demo", live.encoder, [Point("a", points[0].vector, labels={"organ": "x"})])
        # A webhook acknowledged but not yet handled when the process stopped.
        state["inbox"].stop()
        late = annotation_webhook(7, task(5, images["dark_5"]), {"organ": "dark"}, 777)
        assert client.post("/webhook", json=late).status_code == 200
        assert len(state["inbox"].pending()) == 1
        assert store.collection(7).preprocessing is None
        monkeypatch.undo()
        return {
            "live": store.collection(7),
            "generations": store.generations(7),
            "points": snapshot(store, 7),
            "building": snapshot(store, 7, collection=third),
            "demo": snapshot(store, "demo"),
            "labelled": store.count(7, labelled=True),
        }


def test_first_start_migrates_a_model_dir_written_by_the_local_mode_code(settings, monkeypatch):
    images = dark_and_bright(settings.local_files_root, 6)
    before = write_old_model_dir(settings, images, monkeypatch)
    path = settings.qdrant_path
    assert holds_local_store(path)

    with TestClient(create_app(settings)) as client:  # the new default: Edge
        state = client.app.state.echolabel
        store = state["runtime"].store
        assert isinstance(store, EdgeStore)
        assert state["inbox"].wait_idle(30)  # the pending webhook, replayed onto Edge
        info = store.collection(7)
        live = before["live"]
        assert info == dataclasses.replace(  # its label change is counted on
            live, label_state=live.label_state + 1, label_changes=(*live.label_changes, 5)
        ), "name, generation, encoder, pushed version, label changes"
        assert info.published_version == "echolabel-tiny-test-g2" and info.vote_radius_min == 0.3
        assert info.label_changes[-3:] == (4, 14, 5)
        generations = store.generations(7)
        assert [g.name for g in generations] == [g.name for g in before["generations"]]
        assert generations[-1] == before["generations"][-1]  # the half-built one resumes
        building = snapshot(store, 7, collection=generations[-1])
        assert building.pop(5)[1] == {"organ": "dark"}, "the replayed label reached it too"
        assert building == {t: p for t, p in before["building"].items() if t != 5}
        assert snapshot(store, "demo") == before["demo"]
        after = snapshot(store, 7)
        assert after.pop(5)[1] == {"organ": "dark"}
        expected = dict(before["points"])
        expected.pop(5)
        assert after == expected, "every vector, label, annotation and image survived"
        assert store.count(7, labelled=True) == before["labelled"] + 1
        answer = predict(client, 30, images["dark_0"])  # a new task embeds and votes
        assert answer["results"][0]["model_version"] == "echolabel-tiny-test-g2"
        assert answer["results"][0]["result"][0]["value"]["choices"] == ["dark"]

    backup = path.parent / "qdrant.local-mode"
    assert holds_local_store(backup), "the old store is renamed aside, not deleted"
    assert not holds_local_store(path) and (path / "collections").is_dir()
    record = json.loads((path / "migrated-from-local-mode.json").read_text())
    assert record["backup"] == str(backup)
    assert {g["name"]: g["points"] for g in record["generations"]} == {
        "echolabel_p7_g2": 12,
        "echolabel_p7_g3": 5,
        "echolabel_pdemo_g1": 1,
    }
    assert migrate_local_store(path, exact_max_points=100) is None  # once only


def old_store_dir(tmp_path, n=40):
    path = tmp_path / "qdrant"
    store = open_store(path=path, engine="local")
    store.ensure_collection(1, "enc", 8, "w")
    vectors = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    store.upsert(1, "enc", [Point(i, vectors[i], labels={"f": str(i % 2)}) for i in range(n)])
    store.set_labels(1, 0, {"f": "z"}, Annotation(5, "2027-01-01T00:00:00Z"))
    store.close()
    return path


def test_edge_refuses_a_local_mode_directory_it_was_not_asked_to_migrate(tmp_path):
    path = old_store_dir(tmp_path)
    with pytest.raises(StoreError, match="echolabel migrate-store"):
        EdgeStore(path)
    assert holds_local_store(path) and not (path / "collections").exists()


def test_a_copy_that_does_not_verify_changes_nothing(tmp_path, monkeypatch):
    path = old_store_dir(tmp_path)
    real = EdgeStore.restore_points

    def lossy(self, target, records):
        real(self, target, records[1:])  # one point lost in the copy

    monkeypatch.setattr(EdgeStore, "restore_points", lossy)
    with pytest.raises(MigrationError, match="nothing was changed"):
        open_store(path=path)
    assert holds_local_store(path)
    assert not (tmp_path / ".qdrant.migrating").exists()
    assert not (tmp_path / "qdrant.local-mode").exists()
    monkeypatch.undo()
    store = open_store(path=path)  # the next start migrates it
    assert store.count(1) == 40 and store.points(1, [0])[0].labels == {"f": "z"}
    store.close()


def test_a_migration_interrupted_between_the_renames_is_finished_at_the_next_start(
    tmp_path, monkeypatch
):
    import vectorstore.migrate as migrate

    path = old_store_dir(tmp_path)
    real_rename = migrate._rename

    def die_after_the_first(source, target):
        real_rename(source, target)
        raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(migrate, "_rename", die_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        migrate_local_store(path, exact_max_points=100)
    monkeypatch.undo()
    assert not path.exists() and (tmp_path / ".qdrant.migrating").exists()
    store = open_store(path=path)
    assert store.count(1) == 40 and store.count(1, labelled=True) == 40
    store.close()
    assert holds_local_store(tmp_path / "qdrant.local-mode")


def test_the_cli_command_migrates_and_says_where_the_old_store_is(tmp_path, monkeypatch, capsys):
    old_store_dir(tmp_path / "model")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    assert cli.main(["migrate-store"]) == 0
    out = capsys.readouterr().out
    assert "40 points (40 labelled) to Qdrant Edge" in out
    assert str(tmp_path / "model" / "qdrant.local-mode") in out
    assert cli.main(["migrate-store"]) == 0
    assert "no local-mode store to migrate" in capsys.readouterr().out
