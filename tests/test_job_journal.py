"""The backend's journal of the jobs it runs in threads: what a crash interrupted is resumed at
the next start, at most as often as RQ would try it. The crash itself, with real processes, is
tests/test_crash_safety.py."""

from __future__ import annotations

import time

import numpy as np

from backend.admin import Admin
from backend.job_journal import JobJournal
from tests.helpers import TINY_ENCODER
from vectorstore import Point
from workers.runtime import open_runtime

PROJECT = 4


def embedded_project(runtime) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 16)).astype(np.float32)
    runtime.store.ensure_collection(PROJECT, TINY_ENCODER, 16, "none")
    runtime.store.upsert(
        PROJECT, TINY_ENCODER, [Point(task=i, vector=v) for i, v in enumerate(vectors)]
    )


def ended(admin: Admin, job_id: str) -> str:
    deadline = time.monotonic() + 30
    while admin.local_jobs[job_id].status == "started":
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)
    return admin.local_jobs[job_id].status


def test_a_job_a_killed_backend_left_is_resumed_and_forgotten_once_it_ends(settings):
    journal = JobJournal(settings.model_dir / "jobs")
    # What a backend killed while running the job leaves behind.
    journal.started("duplicates-4", "duplicates", {"project": PROJECT})
    with open_runtime(settings) as runtime:
        embedded_project(runtime)
        admin = Admin(runtime)
        assert admin.resume_interrupted() == ["duplicates-4"]
        assert admin.local_jobs["duplicates-4"].description.endswith("(resumed after a restart)")
        assert ended(admin, "duplicates-4") == "finished"
    assert journal.interrupted() == []


def test_a_failed_job_is_reported_not_resumed(settings):
    with open_runtime(settings) as runtime:
        admin = Admin(runtime)
        admin.start_evaluation(99)  # no collection: a permanent failure
        assert ended(admin, "evaluate-99") == "failed"
        assert admin.journal.interrupted() == []
        assert admin.resume_interrupted() == []


def test_a_job_interrupted_as_often_as_rq_would_try_it_is_given_up(settings):
    journal = JobJournal(settings.model_dir / "jobs")
    tries = 1 + len(settings.job_retry_intervals)
    journal.started("duplicates-4", "duplicates", {"project": PROJECT}, attempts=tries - 1)
    journal.started("evaluate-4", "evaluate", {"project": PROJECT}, attempts=tries)
    with open_runtime(settings) as runtime:
        embedded_project(runtime)
        admin = Admin(runtime)
        assert admin.resume_interrupted() == ["duplicates-4"]  # its last try
        assert "evaluate-4" not in admin.local_jobs
        ended(admin, "duplicates-4")
    assert journal.interrupted() == []
