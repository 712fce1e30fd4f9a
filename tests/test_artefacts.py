"""What one process's jobs write, another process loads and serves (issue 17, point 8).

A "worker" and a "backend" run as separate processes, each with only what the production
layout gives it: a private MODEL_DIR of its own and the shared ECHOLABEL_ARTEFACTS_DIR (the
volume docker-compose.yml mounts on both). The worker trains an encoder, writes an evaluation
report and a label-QA review; the backend then embeds with that encoder, offers it on the admin
page and lists and serves the report and the review. Project jobs that read the store (training
or evaluating a project) need a Qdrant server to run on a separate worker, which does not
install here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.processes import free_port, start_backend, stop_backend
from tests.helpers import ROOT, annotation_webhook, dark_and_bright
from tests.label_configs import DARK_BRIGHT_CONFIG

pytestmark = pytest.mark.slow


def process_env(model_dir: Path, artefacts: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOLABEL_", "REDIS_"))}
    env.update(MODEL_DIR=str(model_dir), ECHOLABEL_ARTEFACTS_DIR=str(artefacts), **extra)
    return env


def echolabel(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "echolabel.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_worker_s_encoder_and_report_are_loaded_and_served_by_the_backend(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    paths = dark_and_bright(images, 28, size=(64, 64))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "organ", "split"])
        for name, path in paths.items():
            kind, index = name.split("_")
            writer.writerow([Path(path).name, kind, "train" if int(index) < 20 else "test"])
    artefacts = tmp_path / "artefacts"

    worker = process_env(tmp_path / "worker-model", artefacts)
    folder = ("--images", str(images), "--labels", str(labels), "--field", "organ")
    echolabel(
        worker, "train-encoder", *folder, "--name", "shared", "--split-column", "split",
        "--input-size", "64", "--epochs", "1", "--views", "1", "--batch-size", "16",
    )  # fmt: skip
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report_dir = artefacts / "reports" / "3" / stamp
    # The 16 test rows: evaluation leaves out what the encoder was trained on.
    echolabel(worker, "evaluate", *folder, "--encoders", "trained:shared-v1",
              "--min-class-size", "2", "--out", str(report_dir))  # fmt: skip
    # Label QA of the same folder, written where the `review` job writes (workers.jobs
    # _output_dir): <artefacts>/reviews/<project>/<UTC time>/.
    review_dir = artefacts / "reviews" / "3" / stamp
    echolabel(worker, "review", *folder, "--encoder", "trained:shared-v1",
              "--out", str(review_dir))  # fmt: skip
    assert (artefacts / "encoders" / "shared-v1" / "weights.safetensors").is_file()
    assert (review_dir / "review.csv").is_file()
    assert not (tmp_path / "backend-model").exists()

    backend_env = process_env(
        tmp_path / "backend-model",
        artefacts,
        ECHOLABEL_ENCODER="trained:shared-v1",
        ECHOLABEL_LOCAL_FILES_ROOT=str(images),
    )
    port = free_port()
    backend = start_backend(backend_env, port, tmp_path / "backend.log")
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            client.post("/setup", json={"project": 3, "schema": DARK_BRIGHT_CONFIG})
            for i in range(4):
                for name in ("dark", "bright"):
                    task = {"id": f"{name}{i}", "data": {"image": paths[f"{name}_{i}"]}}
                    body = annotation_webhook(3, task, {"organ": name}, 100 + len(name) * 10 + i)
                    client.post("/webhook", json=body)
            deadline = time.monotonic() + 120
            while client.get("/health").json()["webhooks_pending"]:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            query = {"id": "q", "data": {"image": paths["dark_25"]}}
            answer = client.post("/predict", json={"tasks": [query], "project": 3}).json()
            (prediction,) = answer["results"]
            # Embedded here with the encoder the other process trained (its quality after one
            # epoch on 40 tiny images is not the point).
            assert prediction["model_version"].startswith("echolabel-trained:shared-v1")
            assert answer["errors"] == [] and answer["pending"] == []

            page = client.get("/admin").text
            assert "trained:shared-v1" in page  # offered for re-embedding
            (row,) = client.get("/admin/projects").json()["projects"]
            report_url = f"/admin/reports/3/{stamp}/report.html"
            assert report_url in row["reports"]
            served = client.get(report_url)
            assert served.status_code == 200 and "trained:shared-v1" in served.text
            review_url = f"/admin/reviews/3/{stamp}/review.csv"
            assert review_url in row["reports"] and review_url in page
            served = client.get(review_url)
            assert served.status_code == 200
            assert served.content == (review_dir / "review.csv").read_bytes()
    finally:
        stop_backend(backend, 5.0)
