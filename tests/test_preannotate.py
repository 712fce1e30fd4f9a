"""Pushing predictions: against an in-memory Label Studio API (the real one is exercised in
tests/test_labelstudio_e2e.py), so failures can be injected exactly where they hurt."""

from __future__ import annotations

import dataclasses

import pytest
from rq import SimpleWorker
from rq.job import Job
from rq.registry import FailedJobRegistry

import backend.preannotate as preannotate
from backend.model import Services, SimilarityModel
from backend.preannotate import PreAnnotator
from tests.conftest import REDIS_URL, choices_result, dark_and_bright
from tests.fake_label_studio import FakeLabelStudioAPI
from workers import context
from workers.queues import PREANNOTATE, connect, queue

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
</View>"""


@pytest.fixture
def project_tasks(settings):
    """Eight dark and eight bright tasks; the first three of each annotated."""
    images = dark_and_bright(settings.local_files_root, 8)
    tasks = []
    for n, name in enumerate(sorted(images)):
        tone = name.split("_")[0]
        annotated = int(name.split("_")[1]) < 3
        annotations = (
            [{"id": 100 + n, "result": choices_result({"organ": tone}), "updated_at": "2026"}]
            if annotated
            else []
        )
        tasks.append({"id": n, "data": {"image": images[name]}, "annotations": annotations})
    return tasks


@pytest.fixture
def services(settings):
    built = Services.from_settings(dataclasses.replace(settings, min_neighbours=2))
    yield built
    built.store.close()


def test_push_embeds_labelled_tasks_votes_the_rest_and_publishes_one_version(
    services, project_tasks
):
    api = FakeLabelStudioAPI(project_tasks, CONFIG)
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
    api = FakeLabelStudioAPI(project_tasks, CONFIG, fail_imports_after=1)
    monkeypatch.setattr(preannotate, "LabelStudioClient", lambda _settings: api)
    monkeypatch.setattr(preannotate, "PUSH_BATCH", 4)
    monkeypatch.setattr(preannotate, "WRITE_RETRY_DELAYS_S", (0.0, 0.0))
    settings = dataclasses.replace(settings, redis_url=REDIS_URL, job_retry_intervals=(0,))
    connection = connect(REDIS_URL)
    job_context = context.JobContext.from_settings(settings)
    job_context.owns_store = True
    context.install(job_context)
    try:
        job = queue(connection, PREANNOTATE).enqueue(
            preannotate.preannotate_project, 1, retry=preannotate_retry(), job_id="push-1"
        )
        SimpleWorker([queue(connection, PREANNOTATE)], connection=connection).work(burst=True)
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
        context.install(None)
        job_context.store.close()


def preannotate_retry():
    from rq import Retry

    return Retry(max=1, interval=0)
