"""Re-embedding with zero downtime: in process (no Redis) and by a real RQ worker that is
killed half-way and resumes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import timm
from fastapi.testclient import TestClient
from rq import Retry
from rq.job import Job
from rq.registry import StartedJobRegistry
from safetensors.torch import save_file

from backend.app import create_app
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.helpers import (
    REDIS_URL,
    TINY_ENCODER_B,
    annotation_webhook,
    dark_and_bright,
    run_worker,
)
from tests.label_configs import DARK_BRIGHT_CONFIG
from vectorstore import StoreError
from workers import jobs
from workers.queues import REEMBED, connect, enqueue_unique, queue
from workers.runtime import install, open_runtime

CONFIG = DARK_BRIGHT_CONFIG


def images(root, count):
    return dark_and_bright(root, count, size=(48, 48))


def webhook(task_id, image, organ, annotation_id, updated="2026-11-25T00:00:00Z"):
    task = {"id": task_id, "data": {"image": image}}
    return annotation_webhook(5, task, {"organ": organ}, annotation_id, updated)


@pytest.fixture(params=["in-process", "redis"])
def rebuild_settings(request, settings):
    """Without Redis the backend runs the job in a thread; with Redis (and the embedded
    store) its in-process RQ worker runs it from the `reembed` queue."""
    settings = dataclasses.replace(settings, batch_size=2)
    if request.param == "redis":
        request.getfixturevalue("redis_db")
        settings = dataclasses.replace(settings, redis_url=REDIS_URL, embed_wait_s=0.0)
    return settings


def test_predictions_and_annotations_continue_during_the_rebuild(rebuild_settings, monkeypatch):
    settings = rebuild_settings
    paths = images(settings.local_files_root, 6)
    with TestClient(create_app(dataclasses.replace(settings, redis_url=None))) as client:
        inbox = client.app.state.echolabel["inbox"]
        client.post("/setup", json={"project": 5, "schema": CONFIG})
        for i in range(5):
            client.post("/webhook", json=webhook(10 + i, paths[f"dark_{i}"], "dark", 100 + i))
            client.post("/webhook", json=webhook(20 + i, paths[f"bright_{i}"], "bright", 200 + i))
        client.post("/webhook", json=webhook(30, paths["dark_5"], "dark", 300))
        assert inbox.wait_idle(30)
        client.post(
            "/webhook",
            json={
                "action": "ANNOTATIONS_DELETED",
                "project": {"id": 5},
                "annotations": [{"id": 300}],
            },
        )  # task 30: unlabelled
        assert inbox.wait_idle(30)

    paused, resume = threading.Event(), threading.Event()
    calls = []
    real_reembed_project = jobs.reembed_project

    def held(*args, on_progress, **kwargs):
        def hook(progress):
            on_progress(progress)
            calls.append(progress.as_meta())
            if len(calls) == 1:
                paused.set()
                assert resume.wait(60)

        return real_reembed_project(*args, on_progress=hook, **kwargs)

    monkeypatch.setattr(jobs, "reembed_project", held)
    # The admin changes the encoder and presses Label Studio's "Start Training".
    with TestClient(create_app(dataclasses.replace(settings, encoder=TINY_ENCODER_B))) as client:
        state = client.app.state.echolabel
        store = state["runtime"].store
        assert client.post("/train", json={"project": "5.1764000000"}).json()["job"] == (
            "reembed-5"
        )
        assert paused.wait(60)
        # Mid-rebuild: suggestions still come from the live generation ...
        answer = client.post(
            "/predict",
            json={"project": 5, "tasks": [{"id": 30, "data": {"image": paths["dark_5"]}}]},
        ).json()
        assert answer["results"][0]["result"][0]["value"]["choices"] == ["dark"]
        assert answer["model_version"] == "echolabel-tiny-test-g1"
        if not settings.redis_url:  # a task embedded now (inline) is caught by the final pass
            client.post(
                "/predict",
                json={"project": 5, "tasks": [{"id": 40, "data": {"image": paths["bright_5"]}}]},
            )
        # ... and an annotation made now (relabelling task 30) must survive the switch.
        client.post(
            "/webhook", json=webhook(30, paths["dark_5"], "bright", 301, "2026-11-26T00:00:00Z")
        )
        assert state["inbox"].wait_idle(30)
        resume.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = [j for j in client.get("/jobs").json()["jobs"] if j["id"] == "reembed-5"]
            if listed and listed[0]["status"] in ("finished", "failed"):
                break
            time.sleep(0.2)
        assert listed[0]["status"] == "finished", listed
        assert listed[0]["progress"]["stage"] == "switched"
        assert calls[0]["done"] == 2 and calls[0]["total"] == 11
        assert calls[0]["images_per_s"] > 0 and calls[0]["eta_s"] > 0

        info = store.collection(5)
        assert (info.encoder, info.dim, info.generation) == (TINY_ENCODER_B, 64, 2)
        assert [g.generation for g in store.generations(5)] == [2]  # the old one is gone
        points = {p.task: p for p in store.iter_points(5)}
        assert len(points) == (11 if settings.redis_url else 12)
        assert points[30].labels == {"organ": "bright"}
        assert points[10].labels == {"organ": "dark"} and len(points[10].vector) == 64
        answer = client.post(
            "/predict",
            json={"project": 5, "tasks": [{"id": 10, "data": {"image": paths["dark_0"]}}]},
        ).json()
        assert answer["model_version"] == "echolabel-tiny-test-b-g2"
        assert answer["results"][0]["result"][0]["value"]["choices"] == ["dark"]


def test_a_labelled_task_whose_image_vanished_stops_the_switch(settings):
    paths = images(settings.local_files_root, 2)
    services = open_runtime(settings)
    try:
        model = SimilarityModel(services, 5, CONFIG)
        model.embed(
            [TaskImage(1, paths["dark_0"], {"organ": "dark"}), TaskImage(2, paths["bright_0"])]
        )
        os.remove(paths["dark_0"])

        install(services)
        with pytest.raises(StoreError, match="live generation is untouched"):
            jobs.reembed(5, TINY_ENCODER_B)
        assert services.store.collection(5).generation == 1
    finally:
        install(None)
        services.close()


@pytest.fixture
def resnet_weights(tmp_path):
    """A real timm ResNet-50 checkpoint file (random weights): the second encoder."""
    directory = tmp_path / "weights"
    directory.mkdir()
    model = timm.create_model("resnet50.a1_in1k", pretrained=False)
    save_file(model.state_dict(), str(directory / "resnet50.safetensors"))
    return directory


def test_worker_killed_mid_reembed_resumes_without_redoing_batches(
    settings, redis_db, resnet_weights
):
    settings = dataclasses.replace(
        settings,
        redis_url=REDIS_URL,
        encoder="efficientnet_lite0",
        batch_size=2,
        job_retry_intervals=(0,),
        weights_dir=resnet_weights,
    )
    paths = images(settings.local_files_root, 12)
    inline = dataclasses.replace(settings, redis_url=None)
    services = open_runtime(inline)
    SimilarityModel(services, 5, CONFIG).embed(
        [
            TaskImage(i, path, {"organ": name.split("_")[0]})
            for i, (name, path) in enumerate(sorted(paths.items()))
        ]
    )
    services.close()

    job = enqueue_unique(
        queue(redis_db, REEMBED),
        "reembed-5",
        jobs.reembed,
        5,
        "resnet50",
        retry=Retry(max=1),
        job_timeout=600,
    )
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "MODEL_DIR": str(settings.model_dir),
        "ECHOLABEL_BATCH_SIZE": "2",
        "ECHOLABEL_WEIGHTS_DIR": str(resnet_weights),
        "ECHOLABEL_LOCAL_FILES_ROOT": str(settings.local_files_root),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "echolabel.cli", "worker", REEMBED],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the scheduler it forks dies with it
    )
    try:
        deadline = time.monotonic() + 180
        while job.get_meta(refresh=True).get("progress", {}).get("done", 0) < 6:
            assert time.monotonic() < deadline and worker.poll() is None, "no progress"
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    done_before_kill = job.get_meta(refresh=True)["progress"]["done"]
    assert done_before_kill < 24

    services = open_runtime(inline)  # the lock died with the worker
    info = services.store.collection(5)
    assert (info.encoder, info.generation) == ("efficientnet_lite0", 1)  # live untouched
    assert services.store.count(5) == 24
    services.close()

    # What RQ does once the dead worker's job times out: the abandoned job is retried.
    StartedJobRegistry(REEMBED, connection=redis_db).cleanup(timestamp=time.time() + 10**6)
    assert Job.fetch("reembed-5", connection=redis_db).get_status() == "queued"
    run_worker(settings, REEMBED)
    finished = Job.fetch("reembed-5", connection=redis_db)
    result = finished.return_value()
    assert finished.get_status() == "finished", finished.latest_result().exc_string
    assert result["skipped"] >= done_before_kill  # finished batches were not redone
    assert result["done"] == 24 and result["stage"] == "switched"

    services = open_runtime(inline)
    info = services.store.collection(5)
    assert (info.encoder, info.dim, info.generation) == ("resnet50", 2048, 2)
    assert services.store.count(5, labelled=True) == 24
    services.close()
    assert connect(REDIS_URL).ping()


def test_training_button_starts_a_reembedding_visible_in_jobs(settings):
    paths = images(settings.local_files_root, 2)
    settings = dataclasses.replace(settings, encoder=TINY_ENCODER_B)
    services = open_runtime(dataclasses.replace(settings, encoder="tiny-test"))
    SimilarityModel(services, 5, CONFIG).embed([TaskImage(1, paths["dark_0"], {"organ": "dark"})])
    services.close()
    with TestClient(create_app(settings)) as client:
        started = client.post("/train", json={"project": "5.1764000000"}).json()
        assert started == {"job": "reembed-5", "status": "started", "queue": "in-process"}
        deadline = time.monotonic() + 30
        while True:
            listed = client.get("/jobs").json()["jobs"]
            if listed[0]["status"] != "started" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert listed[0]["status"] == "finished", listed
        assert listed[0]["progress"]["stage"] == "switched"
        assert client.app.state.echolabel["runtime"].store.collection(5).encoder == (TINY_ENCODER_B)
        again = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
        assert again.json()["job"] == "reembed-5"
