"""`echolabel index --project N`: pre-embed a Label Studio project's tasks (the fake Label
Studio on 127.0.0.1 answers the two endpoints we read)."""

from __future__ import annotations

import json

import pytest
from rq import Queue

import echolabel.labelstudio
from echolabel.cli import main
from tests.fakes import FakeLabelStudio
from tests.helpers import REDIS_URL, TINY_ENCODER, png_bytes

TOKEN = "a" * 40
CONFIG = (
    '<View><Image name="image" value="$img"/><Choices name="organ" toName="image">'
    '<Choice value="x"/></Choices></View>'
)


@pytest.fixture
def label_studio(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    tasks = []
    for i in range(10):
        path = root / f"{i}.png"
        path.write_bytes(png_bytes((20 * i,) * 3, pattern=i + 1))
        tasks.append({"id": 100 + i, "data": {"img": str(path)}, "project": 5})
    tasks.append({"id": 999, "data": {"other": "no image here"}, "project": 5})

    with FakeLabelStudio(tasks, CONFIG, project=5, token=TOKEN) as fake:
        yield fake.url, root


@pytest.fixture
def env(label_studio, tmp_path, monkeypatch):
    url, root = label_studio
    monkeypatch.setattr(echolabel.labelstudio, "PAGE_SIZE", 4)  # three pages
    for name, value in {
        "LABEL_STUDIO_URL": url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "MODEL_DIR": str(tmp_path / "m"),
        "ECHOLABEL_ENCODER": TINY_ENCODER,
        "ECHOLABEL_LOCAL_FILES_ROOT": str(root),
        "ECHOLABEL_BATCH_SIZE": "4",
    }.items():
        monkeypatch.setenv(name, value)


def test_index_project_inline(env, capsys):
    assert main(["index", "--project", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tasks"], summary["skipped"], summary["points"]) == (10, 1, 10)
    assert main(["index", "--project", "5"]) == 0  # again: nothing left to do
    assert json.loads(capsys.readouterr().out)["already_embedded"] == 10


def test_index_project_queues_jobs_for_the_workers(env, redis_db, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    assert main(["index", "--project", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 3  # 10 tasks in batches of 4
    assert Queue("embed", connection=redis_db).count == 3


def test_refused_token_is_explained(env, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "b" * 40)
    assert main(["index", "--project", "5"]) == 1
    assert "check LABEL_STUDIO_API_KEY" in capsys.readouterr().err
