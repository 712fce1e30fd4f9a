"""The job catalogue: every job named once, run here or enqueued through one function, reached
alike by the CLI, the admin and the HTTP endpoints."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq.job import Job

from backend.admin import Admin
from backend.app import create_app
from echolabel.cli import main
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.helpers import REDIS_URL, ROOT, TINY_ENCODER, TINY_ENCODER_B, dark_and_bright
from tests.label_configs import SHADE_CONFIG
from workers.catalogue import (
    CATALOGUE,
    JobFailedError,
    enqueue_embed,
    job_spec,
    wait,
)
from workers.queues import QUEUES, queue
from workers.runtime import current, install, open_runtime, redis_dispatcher, run_or_enqueue
from workers.worker import EcholabelWorker

CONFIG = SHADE_CONFIG
PROJECT = 4


def labelled_project(settings) -> None:
    """Project 4 in the embedded store: 6 labelled tasks, dark_0 twice (a near-duplicate)."""
    paths = dark_and_bright(settings.local_files_root, 3)
    with open_runtime(dataclasses.replace(settings, redis_url=None)) as runtime:
        items = [TaskImage(name, path, {"shade": name[:-2]}) for name, path in paths.items()]
        items.append(TaskImage("copy", paths["dark_0"], {"shade": "dark"}))
        assert not SimilarityModel(runtime, PROJECT, CONFIG).embed(items).failures


# -- the table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_job_resolves_to_a_function_taking_what_the_catalogue_gives_it(name):
    spec = job_spec(name)
    function = spec.resolve()
    assert callable(function) and f"{function.__module__}.{function.__qualname__}" == (
        spec.function
    )
    parameters = inspect.signature(function).parameters
    # The id's fields are the function's arguments (the embed batch key is derived from them).
    fields = set(re.findall(r"{(\w+)}", spec.id_format)) - {"key"}
    assert fields and fields <= set(parameters)
    # A job that reports progress takes a callback for it when run here.
    assert ("on_progress" in parameters) == (spec.progress_unit is not None)
    assert spec.queue in QUEUES and spec.result_ttl > 0 and spec.failure_ttl > 0


def test_ids_are_deterministic_distinct_per_project_and_per_job():
    ids = {
        (name, project): spec.job_id(project=project, key="k")
        for name, spec in CATALOGUE.items()
        for project in (1, 2, "demo")
    }
    assert ids == {
        (name, project): spec.job_id(project=project, key="k")
        for name, spec in CATALOGUE.items()
        for project in (1, 2, "demo")
    }
    assert len(set(ids.values())) == len(ids)
    with pytest.raises(ValueError, match="no job 'nope'; echolabel's jobs are"):
        job_spec("nope")


def test_embed_batches_get_the_same_id_for_the_same_batch_and_another_per_project(
    redis_settings, redis_db
):
    items = [TaskImage(1, "a.png"), TaskImage(2, "b.png")]
    first = enqueue_embed(redis_db, redis_settings, 3, "enc", items, "reply")
    again = enqueue_embed(redis_db, redis_settings, 3, "enc", items, "reply")
    other = enqueue_embed(redis_db, redis_settings, 4, "enc", items, "reply")
    assert [j.id for j in first] == [j.id for j in again] and len(first) == 1
    assert first[0].id.startswith("embed-3-") and other[0].id.startswith("embed-4-")
    assert first[0].id[len("embed-3-") :] != other[0].id[len("embed-4-") :]
    job = Job.fetch(first[0].id, connection=redis_db)
    assert job.func_name == CATALOGUE["embed"].function and job.origin == "embed"
    assert job.result_ttl == CATALOGUE["embed"].result_ttl


def test_no_job_id_or_ttl_is_written_outside_the_catalogue():
    catalogue = ROOT / "workers" / "catalogue.py"
    prefixes = {spec.id_format.split("{")[0] for spec in CATALOGUE.values()}
    id_literal = re.compile(r"""["'](""" + "|".join(map(re.escape, prefixes)) + r")\{")
    found = []
    for package in ("backend", "echolabel", "workers", "qdrant"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == catalogue:
                continue
            text = path.read_text()
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in id_literal.finditer(text)]
            found += [
                f"{path.relative_to(ROOT)}: {m.group(0)}"
                for m in re.finditer(r"(result|failure)_ttl\s*=", text)
            ]
    assert found == []


def test_the_core_runtime_knows_nothing_of_rq_redis_or_the_jobs():
    """The jobs layer attaches the Redis dispatcher through the core's EmbedQueue protocol."""
    code = (
        "import sys, echolabel.core.runtime; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rq', 'redis', 'fastapi') "
        "or m.startswith(('workers.jobs', 'workers.runtime', 'workers.dispatch', "
        "'echolabel.core.model', 'backend.app'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "qdrant")])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -- run here -----------------------------------------------------------------------------------


def test_without_redis_a_job_runs_here_on_the_runtime_and_uninstalls_it(settings):
    labelled_project(settings)
    install(None)
    with open_runtime(settings) as runtime:
        launched = run_or_enqueue(runtime, "duplicates", project=PROJECT, threshold=0.999)
        assert launched.job is None and launched.queue == "in-process"
        assert launched.id == "duplicates-4"
        pairs = [{p["a"], p["b"]} for p in launched.result["pairs"]]
        assert {"dark_0", "copy"} in pairs
        # Installed for the job only: the next `current()` would open its own runtime.
        from workers import runtime as process

        assert process._current is None

        progress: list[dict] = []
        reembedded = run_or_enqueue(
            runtime, "reembed", project=PROJECT, encoder=TINY_ENCODER_B, on_progress=progress.append
        )
        assert reembedded.result["stage"] == "switched"
        assert progress and all(isinstance(p, dict) and "done" in p for p in progress)
        assert runtime.store.collection(PROJECT).encoder == TINY_ENCODER_B


def test_a_job_run_here_in_the_backend_keeps_the_backends_runtime_installed(settings):
    labelled_project(settings)
    with open_runtime(settings) as runtime:
        install(runtime)
        try:
            run_or_enqueue(runtime, "duplicates", project=PROJECT)
            assert current() is runtime
        finally:
            install(None)


def test_an_unreachable_redis_runs_the_admins_job_here(settings):
    labelled_project(settings)
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")
    with open_runtime(down) as runtime:
        admin = Admin(runtime)
        started = admin.start_evaluation(PROJECT)
        assert started == {"job": "evaluate-4", "status": "started", "queue": "in-process"}
        local = admin.local_jobs["evaluate-4"]
        for _ in range(600):
            if local.status != "started":
                break
            threading.Event().wait(0.05)
        assert local.status == "finished", local.error
        assert Path(local.result["report_json"]).is_file()
        assert redis_dispatcher(runtime).gate.warnings == 1


# -- enqueue ------------------------------------------------------------------------------------


def assert_catalogue_job(connection, job_id: str, name: str) -> Job:
    spec = CATALOGUE[name]
    job = Job.fetch(job_id, connection=connection)
    assert (job.func_name, job.origin, job.id) == (spec.function, spec.queue, job_id)
    assert (job.result_ttl, job.failure_ttl) == (spec.result_ttl, spec.failure_ttl)
    return job


def test_with_redis_a_job_is_enqueued_once_and_the_store_left_closed(redis_settings, redis_db):
    with open_runtime(redis_settings) as runtime:
        launched = run_or_enqueue(runtime, "evaluate", project=PROJECT, k=5)
        again = run_or_enqueue(runtime, "evaluate", project=PROJECT, k=5)
        assert launched.job is not None and launched.queue == "evaluate"
        assert again.job.id == launched.job.id == "evaluate-4"
        assert queue(redis_db, "evaluate").count == 1
        job = assert_catalogue_job(redis_db, "evaluate-4", "evaluate")
        assert job.kwargs == {"project": PROJECT, "k": 5}
        assert job.timeout == redis_settings.job_timeout_s
        assert job.retries_left == len(redis_settings.job_retry_intervals)
        # The process that enqueues never opens the store (a running backend holds it).
        assert not runtime.store_opened


def test_the_cli_admin_and_http_paths_reach_the_same_catalogue_entry(
    redis_settings, redis_db, monkeypatch, capsys
):
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("MODEL_DIR", str(redis_settings.model_dir))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    # CLI: queued, not waited for.
    assert main(["reembed", "--project", "4", "--encoder", TINY_ENCODER_B, "--no-wait"]) == 0
    assert "job reembed-4 on queue reembed" in capsys.readouterr().err
    cli_job = assert_catalogue_job(redis_db, "reembed-4", "reembed")
    assert cli_job.kwargs == {"project": 4, "encoder": TINY_ENCODER_B}
    assert main(["preannotate", "--project", "4", "--no-wait"]) == 0
    assert_catalogue_job(redis_db, "preannotate-4", "preannotate")

    # Admin: the same ids, the queued jobs answered instead of new ones.
    with open_runtime(redis_settings) as runtime:
        admin = Admin(runtime)
        assert admin.start_reembed(4, TINY_ENCODER_B)["job"] == "reembed-4"
        assert admin.start_preannotate(4) == {
            "job": "preannotate-4",
            "status": str(cli_job.get_status()),
            "queue": "preannotate",
        }
        assert queue(redis_db, "reembed").count == queue(redis_db, "preannotate").count == 1
        assert admin.start_evaluation(4)["queue"] == "evaluate"
        assert_catalogue_job(redis_db, "evaluate-4", "evaluate")
        started = admin.start_training_encoder(4, ["shade"], name="organs", reembed=True)
        assert started["job"] == "train-encoder-4" and started["queue"] == "reembed"
        job = assert_catalogue_job(redis_db, "train-encoder-4", "train-encoder")
        assert job.kwargs["name"] == "organs" and job.kwargs["reembed_after"] is True
        assert job.description == "train encoder on project 4 and re-embed"
        job.delete()  # not for the backend below to run: training is slow to start

    # HTTP: with this embedded store the backend runs the store's queues itself; whatever
    # state the job reached, it is the catalogue's.
    with TestClient(create_app(redis_settings)) as client:
        answer = client.post("/train", json={"project": 4}).json()
        assert answer["job"] == "reembed-4" and answer["queue"] == "reembed"
        assert_catalogue_job(redis_db, "reembed-4", "reembed")
        answer = client.post("/projects/4/evaluate").json()
        assert answer["job"] == "evaluate-4" and answer["queue"] == "evaluate"
        assert_catalogue_job(redis_db, "evaluate-4", "evaluate")
        answer = client.post("/projects/4/preannotate?refresh=true").json()
        assert answer["job"] == "refresh-4"
        assert_catalogue_job(redis_db, "refresh-4", "refresh")


def test_waiting_ends_on_failure_and_cancellation_alike(redis_settings, redis_db):
    with open_runtime(redis_settings) as runtime:
        # Nothing in the store: the evaluation fails for good (no retries).
        failing = run_or_enqueue(runtime, "evaluate", project=PROJECT).job
        install(runtime)
        try:
            EcholabelWorker([queue(redis_db, "evaluate")], connection=redis_db).work(burst=True)
        finally:
            install(None)
        with pytest.raises(JobFailedError, match=r"(?s)evaluate project 4 failed: .*no collection"):
            wait(failing, poll_s=0.01)
        cancelled = run_or_enqueue(runtime, "review", project=PROJECT).job
        cancelled.cancel()
        with pytest.raises(JobFailedError, match="label QA of project 4 canceled"):
            wait(cancelled, poll_s=0.01)
