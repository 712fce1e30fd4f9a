"""Pushing predictions: against an in-memory Label Studio API (the real one is exercised in
tests/test_labelstudio_e2e.py), so failures can be injected exactly where they hurt."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry

import echolabel.core.preannotate as preannotate
import workers.jobs as jobs
from echolabel.core.model import SimilarityModel
from echolabel.core.preannotate import PreAnnotator
from echolabel.core.push_state import note_label_changes
from tests.fakes import FakeLabelStudio
from tests.helpers import REDIS_URL, dark_and_bright_tasks
from tests.label_configs import DARK_BRIGHT_CONFIG
from workers.queues import PREANNOTATE, connect, queue
from workers.runtime import install, open_runtime
from workers.worker import EcholabelWorker

CONFIG = DARK_BRIGHT_CONFIG


@pytest.fixture
def project_tasks(settings):
    """Eight dark and eight bright tasks; the first three of each annotated."""
    return dark_and_bright_tasks(settings.local_files_root)


@pytest.fixture
def services(settings):
    built = open_runtime(dataclasses.replace(settings, min_neighbours=2))
    yield built
    built.store.close()


def test_push_embeds_labelled_tasks_votes_the_rest_and_publishes_one_version(
    services, project_tasks
):
    api = FakeLabelStudio(project_tasks, CONFIG)
    result = PreAnnotator(services, api, 1, batch_size=4).push()
    unlabelled = [t["id"] for t in project_tasks if not t["annotations"]]
    assert result["pushed"] + result["abstained"] == len(unlabelled) == 10
    assert {len(api.predictions(t)) for t in unlabelled} == {1}
    version = result["model_version"]
    assert SimilarityModel(services, 1).model_version == version  # what /setup answers now
    for task in project_tasks:
        for prediction in api.predictions(task["id"]):
            tone = "dark" if task["data"]["image"].split("/")[-1].startswith("dark") else "bright"
            assert prediction["result"][0]["value"]["choices"] == [tone]
    # A second push with nothing new writes nothing and keeps the version.
    again = PreAnnotator(services, api, 1).push()
    assert again["pushed"] == 0 and again["already_current"] == 10
    assert again["model_version"] == version and api.imports == 3


def test_label_studio_failing_mid_push_fails_the_job_readably_and_publishes_nothing(
    settings, project_tasks, redis_db, monkeypatch
):
    api = FakeLabelStudio(project_tasks, CONFIG, fail_imports_after=1)
    monkeypatch.setattr(jobs, "LabelStudioClient", lambda _settings: api)
    monkeypatch.setattr(preannotate, "PUSH_BATCH", 4)
    monkeypatch.setattr(preannotate, "WRITE_RETRY_DELAYS_S", (0.0, 0.0))
    settings = dataclasses.replace(settings, redis_url=REDIS_URL, job_retry_intervals=(0,))
    connection = connect(REDIS_URL)
    job_context = open_runtime(settings)
    job_context.owns_store = True
    install(job_context)
    try:
        job = queue(connection, PREANNOTATE).enqueue(
            jobs.preannotate_project, 1, retry=preannotate_retry(), job_id="push-1"
        )
        EcholabelWorker([queue(connection, PREANNOTATE)], connection=connection).work(burst=True)
        failed = FailedJobRegistry(PREANNOTATE, connection=connection)
        assert failed.get_job_ids() == [job.id]
        reason = Job.fetch(job.id, connection=connection).latest_result().exc_string
        assert "TransientJobError" in reason and "Label Studio answered 500" in reason
        # Retried once (RQ), each attempt retrying its write: the first batch of the first
        # attempt got in, the second attempt found it there and wrote nothing twice.
        assert api.imports == 1
        written = [p["task"] for p in api.predictions_by_id.values()]
        assert len(written) == len(set(written)) == 4
        # Nothing published: /setup still answers the unpushed version.
        info = job_context.store.collection(1)
        assert info is not None and info.published_version is None
        assert api.model_version == "echolabel"
    finally:
        install(None)
        job_context.close()


def preannotate_retry():
    from rq import Retry

    return Retry(max=1, interval=0)


def test_refresh_timer_refreshes_projects_with_pending_label_changes(
    services, project_tasks, monkeypatch
):
    from backend.admin import Admin
    from vectorstore import Annotation

    api = FakeLabelStudio(project_tasks, CONFIG)
    monkeypatch.setattr(jobs, "LabelStudioClient", lambda _settings: api)
    PreAnnotator(services, api, 1).push()
    unlabelled = next(t["id"] for t in project_tasks if not t["annotations"])
    services.store.set_labels(1, unlabelled, {"organ": "dark"}, Annotation(999, "2027"))
    note_label_changes(services.store, 1, [unlabelled])
    install(services)
    admin = Admin(services)
    try:
        admin.start_refresh_timer(0.05)
        deadline = time.monotonic() + 20
        while admin.local_jobs.get("refresh-1") is None or (
            admin.local_jobs["refresh-1"].status == "started"
        ):
            assert time.monotonic() < deadline, "the timer did not start a refresh"
            time.sleep(0.05)
        job = admin.local_jobs["refresh-1"]
        assert job.status == "finished", job.error
        assert job.result["label_changes"] == 1
    finally:
        admin.stop()
        install(None)


@pytest.mark.parametrize(
    ("seed", "exact_cache", "edge_exact_max"),
    [
        (0, True, None),
        (1, True, None),
        (2, True, None),
        (0, False, None),
        (0, True, 10_000),
        (0, True, 50),
    ],
    ids=["0", "1", "2", "0-without-exact-cache", "0-edge-exact", "0-edge-hnsw"],
)
def test_refresh_leaves_every_prediction_equal_to_a_fresh_vote(
    tmp_path, seed, exact_cache, edge_exact_max
):
    """Labels added and removed in rounds; after each refresh, every unlabelled task's stored
    prediction is exactly what voting it now gives (nothing missed, nothing stale). Also with
    the refresh on the Qdrant store alone (as with a server), whose batched searches are its
    own, and on Qdrant Edge (the embedded default), exact and by its HNSW graph."""
    from bench.preannotate import synthetic_project
    from vectorstore import Annotation, ExactSearchStore
    from vectorstore.edge_store import EdgeStore

    rng = np.random.default_rng(seed)
    n = 500 if exact_cache else 200  # qdrant-client's local mode scans in Python: keep it short
    project = synthetic_project(n, rng, tmp_path)
    services, api = project.runtime, project.api
    classes, labelled = project.classes, project.labelled
    store = services.store
    if edge_exact_max is not None:  # the same project on Edge, its graph built (as a job does)
        edge = EdgeStore(tmp_path / "edge", exact_max_points=edge_exact_max)
        info = store.collection(1)
        edge.ensure_collection(1, info.encoder, info.dim, info.weights_id)
        edge.upsert(1, info.encoder, list(store.iter_points(1)))
        assert edge.build_index(1) == (edge_exact_max < n)  # a graph to walk, where above it
        store.close()
        services = open_runtime(services.settings, store=edge)
        store = edge
    annotator = PreAnnotator(services, api, 1)
    version = annotator.push()["model_version"]
    if not exact_cache:
        assert isinstance(store, ExactSearchStore)
        annotator = PreAnnotator(open_runtime(services.settings, store=store.inner), api, 1)
    unlabelled = [i for i in range(n) if not labelled[i]]
    still_labelled = [i for i in range(n) if labelled[i]]
    model = SimilarityModel(services, 1)
    for round_ in range(3):
        added = [int(t) for t in rng.choice(unlabelled, 12, replace=False)]
        for task in added:
            store.set_labels(
                1, task, {"finding": f"c{classes[task]}"}, Annotation(f"n{task}", "2027")
            )
            unlabelled.remove(task)
        removed = still_labelled[round_ * 2 : round_ * 2 + 2]
        for task in removed:
            store.clear_labels(1, task)
            unlabelled.append(task)
        note_label_changes(store, 1, added + removed)
        refreshed = annotator.refresh()
        assert refreshed["label_changes"] == len(added) + len(removed)
        vectors_now = store.vectors(1, unlabelled)
        for task in unlabelled:
            fresh = model.prediction(model.suggest(vectors_now[task], exclude=[task]), version)
            stored = [p["result"] for p in api.predictions(task)]
            assert stored == ([fresh["result"]] if fresh["result"] else []), (round_, task)
        assert refreshed["affected"] < len(unlabelled), "a refresh must not re-vote the world"
