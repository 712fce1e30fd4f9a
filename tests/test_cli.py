"""The `echolabel` CLI: index a folder with a labels CSV, then predict one image."""

from __future__ import annotations

import dataclasses
import json

import pytest

from backend.app import create_app
from echolabel.cli import main
from tests.helpers import TINY_ENCODER, png_bytes, serving


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    lines = ["image,finding,split"]
    for i in range(8):
        for name, colour in (("dark", 25 + i), ("bright", 225 - i)):
            (root / f"{name}_{i}.png").write_bytes(png_bytes((colour,) * 3, pattern=i + 1))
            lines.append(f"{name}_{i}.png,{name},train")
    (root / "broken.png").write_bytes(b"not an image")
    lines.append("broken.png,dark,train")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("ECHOLABEL_MIN_NEIGHBOURS", "2")


def index_demo(folder, tmp_path) -> int:
    """Index the folder with its labels CSV into project "demo"."""
    labels = str(tmp_path / "labels.csv")
    return main(
        ["index", str(folder), "--labels", labels, "--field", "finding", "--project", "demo"]
    )


def test_index_then_predict(folder, tmp_path, capsys):
    code = index_demo(folder, tmp_path)
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert summary["points"] == 16 and summary["labelled"] == 16
    assert list(summary["failed"]) == ["broken.png"]
    assert "index demo" in out.err  # the progress bar

    query = tmp_path / "query.png"
    query.write_bytes(png_bytes((30, 30, 30), pattern=3))
    assert main(["predict", str(query), "--project", "demo"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suggestions"]["finding"]["label"] == "dark"
    assert len(result["neighbours"]) == 10
    assert result["model_version"] == "echolabel-tiny-test-g1"


def test_predict_excludes_the_indexed_image_itself(folder, tmp_path, capsys):
    main(["index", str(folder), "--labels", str(tmp_path / "labels.csv"), "--field", "finding"])
    capsys.readouterr()
    assert main(["predict", str(folder / "dark_0.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(n["task"] != "dark_0.png" for n in result["neighbours"])


def test_clear_errors(folder, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(tmp_path / "none.png"), "--project", "empty"]) == 1
    assert "no collection yet" in capsys.readouterr().err
    assert (
        main(["index", str(folder), "--labels", str(tmp_path / "labels.csv"), "--field", "organ"])
        == 1
    )
    assert "no column 'organ'" in capsys.readouterr().err
    monkeypatch.setenv("ECHOLABEL_TOP_K", "zero")
    assert main(["weights", "list"]) == 2
    assert "ECHOLABEL_TOP_K='zero' is not an integer" in capsys.readouterr().err


def test_weights_list_marks_the_default(capsys, monkeypatch):
    monkeypatch.delenv("ECHOLABEL_ENCODER")
    assert main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "efficientnet_lite0  (default)" in lines and "dreamsim" in lines


def test_reembed_inline_without_redis(folder, tmp_path, capsys, monkeypatch):
    index_demo(folder, tmp_path)
    capsys.readouterr()
    # Re-reading the images later needs the folder to be an allowed local root.
    monkeypatch.setenv("ECHOLABEL_LOCAL_FILES_ROOT", str(folder))
    assert main(["reembed", "--project", "demo", "--encoder", "tiny-test-b"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["stage"] == "switched" and result["done"] == 16 and result["generation"] == 2
    assert "re-embed project demo" in out.err  # the progress bar


def test_jobs_lists_queued_jobs_from_redis(redis_db, monkeypatch, capsys):
    from tests.helpers import REDIS_URL
    from workers import jobs
    from workers.queues import REEMBED, enqueue_unique, queue

    assert main(["jobs"]) == 1
    assert "REDIS_URL is not set" in capsys.readouterr().err
    enqueue_unique(
        queue(redis_db, REEMBED),
        "reembed-9",
        jobs.reembed,
        9,
        "tiny-test-b",
        description="re-embed project 9 with tiny-test-b",
    )
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["status"], j["queue"]) for j in listed] == [
        ("reembed-9", "queued", "reembed")
    ]


def test_health_answers_for_a_running_backend_with_its_basic_auth(settings, monkeypatch, capsys):
    secured = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="pw")
    with serving(create_app(secured)) as url:
        assert main(["health", "--url", url]) == 1  # no credentials: 401
        monkeypatch.setenv("BASIC_AUTH_USER", "ls")
        monkeypatch.setenv("BASIC_AUTH_PASS", "pw")
        assert main(["health", "--url", url]) == 0
        assert '"status":"UP"' in capsys.readouterr().out
    assert main(["health", "--url", url]) == 1
    assert "no answer" in capsys.readouterr().err
