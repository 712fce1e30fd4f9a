"""Embedding through Redis/RQ: real Redis, real worker processes (burst mode), embedded store.

With the embedded store the backend is the store's only writer: workers return vectors and the
backend's collector upserts them (Runtime.writes_store, echolabel/core/runtime.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fastapi.testclient import TestClient
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from backend.app import create_app
from echolabel.embedding import TaskImage
from tests.fakes import FakeImageHost, image_reply
from tests.helpers import (
    annotation_webhook,
    dark_and_bright,
    png_bytes,
    run_worker,
)
from tests.label_configs import DARK_BRIGHT_CONFIG
from workers.queues import EMBED, RedisGate, queue
from workers.worker import EcholabelWorker

ROOT = Path(__file__).resolve().parents[1]
CONFIG = DARK_BRIGHT_CONFIG


def write_images(root: Path) -> dict[str, str]:
    return dark_and_bright(root, 6, size=(64, 64))


def annotation(task_id, image, organ, annotation_id):
    task = {"id": task_id, "data": {"image": image}}
    return annotation_webhook(3, task, {"organ": organ}, annotation_id)


def test_predict_queues_embedding_and_workers_fill_the_store(redis_settings, redis_db):
    images = write_images(redis_settings.local_files_root)
    with TestClient(create_app(redis_settings)) as client:
        state = client.app.state.echolabel
        services = state["runtime"]
        assert client.post("/setup", json={"project": 3, "schema": CONFIG}).status_code == 200
        for i in range(4):
            client.post("/webhook", json=annotation(10 + i, images[f"dark_{i}"], "dark", 100 + i))
            client.post(
                "/webhook", json=annotation(20 + i, images[f"bright_{i}"], "bright", 200 + i)
            )
        assert state["inbox"].wait_idle(30)
        assert services.store.count(3) == 0  # queued, not embedded by the backend
        assert services.embedder.loads == 0  # the backend never loaded an encoder

        tasks = [
            {"id": 90, "data": {"image": images["dark_5"]}},
            {"id": 91, "data": {"image": images["bright_5"]}},
        ]
        first = client.post("/predict", json={"tasks": tasks, "project": 3}).json()
        assert first["results"] == [[], []] and first["pending"] == [90, 91]

        run_worker(redis_settings, EMBED)
        services.dispatcher.collect_once()
        assert services.store.count(3, labelled=True) == 8
        second = client.post("/predict", json={"tasks": tasks, "project": 3}).json()
        organs = [p["result"][0]["value"]["choices"][0] for p in second["results"]]
        assert organs == ["dark", "bright"] and second["pending"] == []

    finished = FinishedJobRegistry(EMBED, connection=redis_db).get_job_ids()
    results = [Job.fetch(j, connection=redis_db).return_value() for j in finished]
    assert len(results) >= 3  # several batch jobs ...
    assert {r["loads"] for r in results} == {1}  # ... one model load in the worker


def test_transient_failure_is_retried(redis_settings, redis_db):
    image = png_bytes((40, 40, 40), size=(64, 64))
    images = FakeImageHost({"/scan.png": image_reply(image)})
    images.fail("/scan.png", 503)
    settings = dataclasses.replace(redis_settings, image_allowed_hosts=("127.0.0.1",))
    with images, TestClient(create_app(settings)) as client:
        url = f"{images.url}/scan.png"
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": url}}], "project": 3})
        run_worker(settings, EMBED)
        services = client.app.state.echolabel["runtime"]
        services.dispatcher.collect_once()
        assert services.store.count(3) == 1
    assert len(images.seen) == 2
    assert FailedJobRegistry(EMBED, connection=redis_db).count == 0


def test_permanent_failure_lands_in_the_failed_registry_with_its_reason(redis_settings, redis_db):
    bad = redis_settings.local_files_root / "broken.png"
    bad.write_bytes(b"<html>login</html>")
    with TestClient(create_app(redis_settings)) as client:
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        client.post(
            "/predict", json={"tasks": [{"id": 1, "data": {"image": str(bad)}}], "project": 3}
        )
        run_worker(redis_settings, EMBED)
        failed = FailedJobRegistry(EMBED, connection=redis_db)
        assert failed.count == 1
        job = Job.fetch(failed.get_job_ids()[0], connection=redis_db)
        reason = job.latest_result().exc_string
        assert "PermanentJobError" in reason and "not_an_image" in reason
        assert job.retries_left == 0  # not retried: a broken image stays broken
        listed = client.get("/jobs").json()["jobs"]
        failed_jobs = [j for j in listed if j["status"] == "failed"]
        assert len(failed_jobs) == 1 and "not_an_image" in failed_jobs[0]["error"]
        # A later request queues a fresh attempt (the user may have fixed the image).
        services = client.app.state.echolabel["runtime"]
        again = services.dispatcher.submit(3, "efficientnet_lite0", [TaskImage(1, str(bad))])
        assert again[0].id == job.id and again[0].get_status() == "queued"


def test_redis_down_means_inline_embedding_and_one_warning(settings, caplog):
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    images = write_images(down.local_files_root)
    with TestClient(create_app(down)) as client:
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        for i in range(3):
            response = client.post(
                "/predict",
                json={"tasks": [{"id": i, "data": {"image": images[f"dark_{i}"]}}], "project": 3},
            )
            assert response.status_code == 200 and response.json()["pending"] == []
        services = client.app.state.echolabel["runtime"]
        assert services.store.count(3) == 3  # embedded inline
        assert services.dispatcher.gate.warnings == 1


def test_gate_warns_once_a_minute_and_recovers():
    clock = {"now": 0.0}
    gate = RedisGate(warn_every_s=60, clock=lambda: clock["now"])

    def down():
        raise ConnectionError("refused")

    for second in (0, 10, 59):
        clock["now"] = second
        assert gate.call(down) == (False, None)
    assert gate.warnings == 1
    clock["now"] = 61
    gate.call(down)
    assert gate.warnings == 2
    assert gate.call(lambda: "up") == (True, "up")


def test_newer_annotation_of_a_task_still_queued_is_not_lost(redis_settings, redis_db):
    images = write_images(redis_settings.local_files_root)
    with TestClient(create_app(redis_settings)) as client:
        state = client.app.state.echolabel
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        first = annotation(10, images["dark_0"], "bright", 100)
        second = annotation(10, images["dark_0"], "dark", 101)
        second["annotation"]["updated_at"] = "2026-11-26T00:00:00Z"
        client.post("/webhook", json=first)
        client.post("/webhook", json=second)  # arrives while the first job is still queued
        assert state["inbox"].wait_idle(30)
        run_worker(redis_settings, EMBED)
        state["runtime"].dispatcher.collect_once()
        points = list(state["runtime"].store.iter_points(3))
        assert len(points) == 1 and points[0].labels == {"organ": "dark"}


def test_a_worker_stops_within_seconds_once_its_channel_is_unsubscribed(redis_db):
    """The pub/sub thread has already read the unsubscribe reply when the worker stops it: with
    RQ's 60 s read it would wait out that read (redis-py joins the thread without a timeout)."""
    worker = EcholabelWorker([queue(redis_db, EMBED)], connection=redis_db)
    worker.subscribe()
    worker.pubsub.unsubscribe()
    deadline = time.monotonic() + 10
    while worker.pubsub.subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.pubsub.subscribed  # the thread handled the reply
    time.sleep(0.1)  # ... and went back to waiting for a subscription
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 5
    assert not worker.pubsub_thread.is_alive()
