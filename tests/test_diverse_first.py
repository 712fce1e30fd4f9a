"""Writing the diverse-first order into Label Studio's task data: against the in-memory Label
Studio API (the real one: tests/test_review_in_label_studio.py)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

import workers.jobs as jobs
from echolabel.core.diverse_first import FIELD, clear_tasks, order_tasks, rank_value
from echolabel.core.errors import PermanentJobError
from echolabel.core.preannotate import PreAnnotator
from echolabel.diversity import k_center_order
from tests.fakes import FakeLabelStudio
from tests.helpers import TINY_ENCODER, dark_and_bright_tasks
from tests.label_configs import DARK_BRIGHT_CONFIG as CONFIG
from workers.runtime import install, open_runtime


@pytest.fixture
def project_tasks(settings):
    """Eight dark and eight bright tasks, the first three of each annotated (as the push
    tests'), each task's data carrying a key of the user's own besides the image."""
    return dark_and_bright_tasks(settings.local_files_root, lambda n: {"site": f"clinic-{n % 3}"})


@pytest.fixture
def services(settings):
    built = open_runtime(dataclasses.replace(settings, min_neighbours=2))
    yield built
    built.store.close()


def ranks(api):
    """{task: its written place} of every task holding the key."""
    return {t: task["data"][FIELD] for t, task in api.tasks_by_id.items() if FIELD in task["data"]}


def in_order(api):
    written = ranks(api)
    return sorted(written, key=written.__getitem__)


def test_the_order_is_written_to_the_unlabelled_tasks_and_nothing_else_changes(
    services, project_tasks
):
    before = {t["id"]: dict(t["data"]) for t in project_tasks}
    api = FakeLabelStudio(project_tasks, CONFIG)
    result = order_tasks(PreAnnotator(services, api, 1))
    unlabelled = [t["id"] for t in project_tasks if not t["annotations"]]
    assert result["ranked"] == len(unlabelled) == 10 and result["written"] == 10
    assert sorted(ranks(api)) == sorted(unlabelled)
    assert sorted(ranks(api).values()) == [rank_value(i, 10) for i in range(10)]
    assert rank_value(0, 10) == "0001" and rank_value(9999, 10_000) == "10000"
    # The order is k-center greedy over the store's vectors, seeded by the labelled tasks.
    ids = [t["id"] for t in project_tasks]
    vectors = services.store.vectors(1, ids)
    labelled = np.array([bool(t["annotations"]) for t in project_tasks])
    expected = [ids[r] for r in k_center_order(np.stack([vectors[i] for i in ids]), labelled)]
    assert in_order(api) == expected == result["first"]
    # The user's own data is exactly as it was, beside the one key.
    for task in api.tasks_by_id.values():
        data = {k: v for k, v in task["data"].items() if k != FIELD}
        assert data == before[task["id"]]


def test_following_the_order_and_running_again_keeps_it(services, project_tasks):
    api = FakeLabelStudio(project_tasks, CONFIG)
    annotator = PreAnnotator(services, api, 1)
    order_tasks(annotator)
    first = in_order(api)
    for task in first[:2]:  # annotators label the first two, as ordered
        api.tasks_by_id[task]["annotations"] = [{"id": 500 + task, "result": [], "updated_at": "x"}]
    again = order_tasks(annotator)
    assert in_order(api) == first[2:]  # the same order for the rest, numbered from 0001
    assert again["removed"] == 2 and again["written"] == 8
    assert ranks(api)[first[2]] == "0001"
    # Nothing changed since: a third run writes nothing.
    updates = api.data_updates
    third = order_tasks(annotator)
    assert api.data_updates == updates and third["unchanged"] == len(project_tasks)


def test_a_limit_ranks_the_first_tasks_only_and_clears_older_places(services, project_tasks):
    api = FakeLabelStudio(project_tasks, CONFIG)
    annotator = PreAnnotator(services, api, 1)
    order_tasks(annotator)
    full = in_order(api)
    result = order_tasks(annotator, limit=3)
    assert in_order(api) == full[:3] and result["ranked"] == 3
    assert result["removed"] == 7


def test_a_key_echolabel_did_not_write_is_never_overwritten(services, project_tasks):
    project_tasks[5]["data"][FIELD] = "high priority"
    api = FakeLabelStudio(project_tasks, CONFIG)
    annotator = PreAnnotator(services, api, 1)
    with pytest.raises(PermanentJobError, match=r"\[5\].*did not write"):
        order_tasks(annotator)
    assert api.data_updates == 0
    # Clearing removes ours only.
    del api.tasks_by_id[5]["data"][FIELD]
    order_tasks(annotator)
    api.tasks_by_id[5]["data"][FIELD] = "high priority"
    cleared = clear_tasks(annotator)
    assert ranks(api) == {5: "high priority"}
    assert cleared["removed"] == 9 and cleared["not_ours"] == 1


def test_a_label_config_that_reads_the_key_is_refused(services, project_tasks):
    config = CONFIG.replace("</View>", f'<Text name="rank" value="${FIELD}"/></View>')
    api = FakeLabelStudio(project_tasks, config)
    with pytest.raises(PermanentJobError, match="label config"):
        order_tasks(PreAnnotator(services, api, 1))
    assert api.data_updates == 0


def test_the_admin_runs_the_job_like_the_push(services, project_tasks, monkeypatch):
    from backend.admin import Admin

    api = FakeLabelStudio(project_tasks, CONFIG)
    monkeypatch.setattr(jobs, "LabelStudioClient", lambda _settings: api)
    install(services)
    admin = Admin(services)
    try:
        started = admin.start_diverse_first(1)
        assert started == {"job": "diverse-first-1", "status": "started", "queue": "in-process"}
        deadline = time.monotonic() + 60
        while admin.local_jobs["diverse-first-1"].status == "started":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job = admin.local_jobs["diverse-first-1"]
        assert job.status == "finished", job.error
        assert job.result["ranked"] == 10 and job.progress["stage"] == "writing"
    finally:
        admin.stop()
        install(None)


def test_the_cli_runs_it_here_without_redis(settings, project_tasks, monkeypatch, capsys):
    from echolabel.cli import main

    api = FakeLabelStudio(project_tasks, CONFIG)
    monkeypatch.setattr(jobs, "LabelStudioClient", lambda _settings: api)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("ECHOLABEL_LOCAL_FILES_ROOT", str(settings.local_files_root))
    monkeypatch.setenv("ECHOLABEL_MIN_NEIGHBOURS", "2")
    assert main(["diverse-first", "--project", "1", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert '"ranked": 4' in out and len(ranks(api)) == 4
    assert main(["diverse-first", "--project", "1", "--clear"]) == 0
    assert '"removed": 4' in capsys.readouterr().out and ranks(api) == {}
