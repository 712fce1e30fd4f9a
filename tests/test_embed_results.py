"""Issue 20: results of the Redis path reach the embedded store once, in the right order.

Real Redis, real worker processes (burst mode), the embedded store: the backend applies what
workers push onto its result list (workers/results.py), never trusting job flags.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rq.job import Job
from rq.registry import FinishedJobRegistry

from backend.app import create_app
from tests.helpers import annotation_webhook, dark_and_bright, run_worker
from tests.label_configs import DARK_BRIGHT_CONFIG as CONFIG
from vectorstore import Annotation, Point, StoreUnavailableError
from workers.queues import EMBED
from workers.results import EmbedMessage, ResultList, store_key

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def webhook(task: int, image: str, organ: str | None, annotation: int, action: str, at: str):
    labels = {"organ": organ} if organ else {}
    task_data = {"id": task, "data": {"image": image}}
    return annotation_webhook(3, task_data, labels, annotation, updated_at=at, action=action)


def labels_by_task(services) -> dict:
    return {p.task: p.labels for p in services.store.iter_points(3, with_vectors=False)}


def test_a_job_id_enqueued_again_is_applied_again(redis_settings, redis_db):
    """The root cause: RQ keeps a job's meta when its id is enqueued again, so a job flagged
    'applied' once was skipped for ever after, and its points never reached the store."""
    images = dark_and_bright(redis_settings.local_files_root, 2, size=(64, 64))
    created = webhook(10, images["dark_0"], "dark", 100, "ANNOTATION_CREATED", "2026-12-01T00:00Z")
    with TestClient(create_app(redis_settings)) as client:
        services = client.app.state.echolabel["runtime"]
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        client.post("/webhook", json=created)
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        run_worker(redis_settings, EMBED)
        services.dispatcher.collect_once()
        assert labels_by_task(services) == {10: {"organ": "dark"}}
        (job_id,) = FinishedJobRegistry(EMBED, connection=redis_db).get_job_ids()
        assert Job.fetch(job_id, connection=redis_db).meta["applied"] is True

        # An empty generation goes live: the points are gone, the job still says applied.
        live = services.store.collection(3)
        empty = services.store.create_generation(3, live.encoder, live.dim, live.weights_id)
        services.store.switch_generation(3, empty)
        assert services.store.count(3) == 0
        client.post("/webhook", json=created)  # the same annotation again: the same job id
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        assert FinishedJobRegistry(EMBED, connection=redis_db).get_job_ids() == [job_id]
        run_worker(redis_settings, EMBED)
        services.dispatcher.collect_once()
        assert labels_by_task(services) == {10: {"organ": "dark"}}


T1, T2 = "2026-12-01T00:00:00Z", "2026-12-01T00:05:00Z"
# 10: updated; 11: deleted; 12: updated, then deleted; 13: untouched.
LAST_WEBHOOK_WINS = {10: {"organ": "bright"}, 11: {}, 12: {}, 13: {"organ": "bright"}}


def racing_webhooks(images: dict[str, str]) -> list[dict]:
    t1, t2 = T1, T2
    return [
        webhook(10, images["dark_0"], "dark", 100, "ANNOTATION_CREATED", t1),
        webhook(11, images["dark_1"], "dark", 101, "ANNOTATION_CREATED", t1),
        webhook(12, images["bright_0"], "bright", 102, "ANNOTATION_CREATED", t1),
        webhook(13, images["bright_1"], "bright", 103, "ANNOTATION_CREATED", t1),
        # 10: updated; 11: deleted; 12: updated, then deleted; 13: untouched.
        webhook(10, images["dark_0"], "bright", 100, "ANNOTATION_UPDATED", t2),
        webhook(11, images["dark_1"], None, 101, "ANNOTATION_DELETED", t2),
        webhook(12, images["bright_0"], "dark", 102, "ANNOTATION_UPDATED", t2),
        webhook(12, images["bright_0"], None, 102, "ANNOTATION_DELETED", t2),
    ]


def test_updates_and_deletes_racing_queued_jobs_win(redis_settings, redis_db):
    """Every job is still queued when the later webhooks arrive; whatever order the results
    land in, the last webhook's labels stand."""
    images = dark_and_bright(redis_settings.local_files_root, 2, size=(64, 64))
    bodies = racing_webhooks(images)
    with TestClient(create_app(redis_settings)) as client:
        state = client.app.state.echolabel
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        for body in bodies:
            client.post("/webhook", json=body)
        assert state["inbox"].wait_idle(30)
        dispatcher = state["runtime"].dispatcher
        dispatcher.stop()  # results are applied below, in the order chosen here
        # Results land newest first: the reverse of the order the jobs were queued in.
        results = ResultList(redis_db, store_key(redis_settings.model_dir))
        run_worker(redis_settings, EMBED)
        assert results.waiting() == 6  # one job per created or updated annotation
        waiting = [results.take_now() for _ in range(results.waiting())]
        for raw in reversed(waiting):
            redis_db.lrem(results.processing_key, 1, raw)
            results.push(EmbedMessage.decode(raw))
        dispatcher.collect_once()
        assert labels_by_task(state["runtime"]) == LAST_WEBHOOK_WINS
        assert state["runtime"].store.count(3, labelled=True) == 2


@pytest.mark.parametrize("wait_s", [0.0, 5.0])
def test_inline_updates_and_deletes_in_a_burst_end_as_the_last_webhook_left_them(settings, wait_s):
    """Without Redis the inbox applies webhooks in order while /predict embeds the same tasks
    (inline within the wait, the rest in the backlog thread)."""
    settings = dataclasses.replace(settings, embed_wait_s=wait_s)
    images = dark_and_bright(settings.local_files_root, 2, size=(64, 64))
    tasks = [
        {"id": t, "data": {"image": images[n]}}
        for t, n in ((10, "dark_0"), (11, "dark_1"), (12, "bright_0"), (13, "bright_1"))
    ]
    with TestClient(create_app(settings)) as client:
        state = client.app.state.echolabel
        client.post("/setup", json={"project": 3, "schema": CONFIG})
        for body in racing_webhooks(images):
            client.post("/webhook", json=body)
            client.post("/predict", json={"tasks": tasks, "project": 3})
        assert state["inbox"].wait_idle(30)
        assert state["runtime"].backlog.wait_idle(30)
        assert labels_by_task(state["runtime"]) == LAST_WEBHOOK_WINS


def test_a_result_half_applied_when_the_backend_died_is_applied_at_start(redis_settings, redis_db):
    results = ResultList(redis_db, store_key(redis_settings.model_dir))
    point = Point(
        task=5,
        vector=np.eye(1, 1280, 0, dtype=np.float32)[0],
        image="/x.png",
        labels={"organ": "dark"},
        annotation=Annotation(9, "2026-12-01T00:00:00Z"),
    )
    message = EmbedMessage("embed-3-x", 3, "efficientnet_lite0", 1280, "w", points=[point])
    # Taken off the list by a backend that was killed before it stored the points.
    redis_db.rpush(results.processing_key, message.encode())
    with TestClient(create_app(redis_settings)) as client:
        services = client.app.state.echolabel["runtime"]
        deadline = time.monotonic() + 10
        while results.waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert results.waiting() == 0
        assert labels_by_task(services) == {5: {"organ": "dark"}}


def test_an_idle_backend_makes_a_few_redis_calls_a_second_however_many_jobs_finished(
    redis_settings, redis_db
):
    """The old collector fetched every finished embed job every second (18-21 % of a core
    after a 624-annotation burst); now idle costs the same with 300 finished jobs as with 0."""
    registry = FinishedJobRegistry(EMBED, connection=redis_db)
    for i in range(300):
        job = Job.create(print, args=(i,), id=f"embed-3-old{i}", connection=redis_db)
        job.save()
        registry.add(job, ttl=3600)
    with TestClient(create_app(redis_settings)) as client:
        connection = client.app.state.echolabel["runtime"].dispatcher.connection
        calls = []
        original = connection.execute_command

        def counting(*args, **options):
            calls.append(args[0])
            return original(*args, **options)

        time.sleep(1.5)  # start-up work done
        connection.execute_command = counting
        time.sleep(4.0)
        connection.execute_command = original
    per_second = len(calls) / 4.0
    assert per_second <= 15, sorted(set(map(str, calls)))
    assert not any(str(c).upper() == "HGETALL" for c in calls)  # no job is fetched


def test_a_result_that_meets_an_unavailable_store_is_applied_once_it_answers(
    redis_settings, redis_db
):
    """A Qdrant server briefly away must neither drop a result nor stop the collector."""
    results = ResultList(redis_db, store_key(redis_settings.model_dir))
    point = Point(task=6, vector=np.eye(1, 1280, 1, dtype=np.float32)[0], image="/y.png")
    with TestClient(create_app(redis_settings)) as client:
        store = client.app.state.echolabel["runtime"].store
        original, calls = store.upsert, []

        def away_once(*args, **options):
            calls.append(args)
            if len(calls) == 1:
                raise StoreUnavailableError("the Qdrant server at http://q is unreachable")
            return original(*args, **options)

        store.upsert = away_once
        results.push(EmbedMessage("embed-3-y", 3, "efficientnet_lite0", 1280, "w", [point]))
        deadline = time.monotonic() + 15
        while (results.waiting() or store.count(3) == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) == 2 and store.count(3) == 1 and results.waiting() == 0


def test_stopping_the_collector_cuts_no_command_in_flight(redis_settings, redis_db):
    """The store worker shares the dispatcher's connection: `stop` (the collector only, as the
    racing test above does) once closed its pool under a command in flight, and the store
    worker's `has_work` died inside redis-py with AttributeError 'readline'."""
    with TestClient(create_app(redis_settings)) as client:
        dispatcher = client.app.state.echolabel["runtime"].dispatcher
        pool = dispatcher.connection.connection_pool
        busy = pool.get_connection()  # another thread's command, sent, its reply not yet read
        busy.send_command("PING")
        dispatcher.stop()
        assert busy.read_response() == b"PONG"
        pool.release(busy)
