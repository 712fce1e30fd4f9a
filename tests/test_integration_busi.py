"""End to end on real breast-ultrasound images (../shared/data/busi, read in place).

Label Studio's calls are replayed against the real app with the offline default encoder:
/setup, an ANNOTATION_CREATED webhook for every training image, then /predict for the test
split (inline: after centring the encoder on the project's images, as the backend does). The
bar is derived from the data: the vote must beat always answering the majority class.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from bench.busi_product import centre_as_the_backend_does
from echolabel.settings import Settings
from tests.helpers import REDIS_URL, SHARED_DATA, annotation_webhook

BUSI = SHARED_DATA / "busi"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="finding" toName="image">
    <Choice value="normal"/><Choice value="benign"/><Choice value="malignant"/>
  </Choices>
  <Choices name="organ" toName="image"><Choice value="breast"/></Choices>
</View>"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
]


def rows():
    with open(BUSI / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(params=["inline", "redis-worker"])
def deployment(request, tmp_path):
    """The embedded default, and the same with REDIS_URL set and a real worker running."""
    settings = Settings(model_dir=tmp_path / "model", local_files_root=BUSI)
    if request.param == "inline":
        yield settings
        return
    request.getfixturevalue("redis_db")
    # Uncentred here: the timer must not start a re-embedding halfway through the test.
    settings = dataclasses.replace(
        settings, redis_url=REDIS_URL, embed_wait_s=300.0, auto_centre=False
    )
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "MODEL_DIR": str(settings.model_dir),
        "ECHOLABEL_LOCAL_FILES_ROOT": str(BUSI),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "echolabel.cli", "worker", "embed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield settings
    finally:
        # SIGTERM is RQ's warm shutdown: the worker finishes the embedding job it holds (a batch
        # of BUSI images, up to a minute on busy cores) before it exits; then it must be gone.
        worker.terminate()
        try:
            worker.wait(180)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise


def test_votes_on_real_ultrasound_beat_the_majority_class(deployment):
    data = rows()
    train = [(i, r) for i, r in enumerate(data) if r["split"] == "train"]
    test = [(i, r) for i, r in enumerate(data) if r["split"] == "test"]
    settings = deployment
    with TestClient(create_app(settings)) as client:
        setup = client.post("/setup", json={"project": "1.1764000000", "schema": CONFIG})
        assert setup.status_code == 200
        for i, row in train:
            labels = {"finding": row["finding"], "organ": row["organ"]}
            response = client.post(
                "/webhook",
                json=annotation_webhook(
                    1,
                    {"id": i, "data": {"image": str(BUSI / row["image"])}, "project": 1},
                    labels,
                    10_000 + i,
                    "2026-11-25T10:00:00.000000Z",
                ),
            )
            assert response.status_code == 200
        inbox = client.app.state.echolabel["inbox"]
        assert inbox.wait_idle(timeout=600)
        assert not inbox.failed()
        store = client.app.state.echolabel["runtime"].store
        deadline = time.monotonic() + 600  # with a worker, vectors land as its jobs finish
        while store.count(1, labelled=True) < len(train) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.count(1, labelled=True) == len(train)
        if settings.redis_url is None:
            # What the backend's timer does once the images are in: the default encoder
            # centred on them, switched to with zero downtime.
            assert centre_as_the_backend_does(client) == "centred:project-1-centred-v1"

        tasks = [{"id": i, "data": {"image": str(BUSI / r["image"])}} for i, r in test]
        response = client.post(
            "/predict", json={"tasks": tasks, "project": "1.1764000000", "label_config": CONFIG}
        )
        assert response.status_code == 200, response.text
        body = response.json()

    predictions = body["results"]
    assert len(predictions) == len(test)
    assert body["pending"] == []
    abstained = {a["task"]: a["fields"] for a in body["abstained"]}
    correct = voted = 0
    for (task_id, row), prediction in zip(test, predictions, strict=True):
        finding = [r for r in prediction["result"] if r["from_name"] == "finding"]
        if task_id in abstained and "finding" in abstained[task_id]:
            assert finding == [], "an abstained field must not carry a guess"
            continue
        assert len(finding) == 1 and finding[0]["to_name"] == "image"
        voted += 1
        correct += finding[0]["value"]["choices"] == [row["finding"]]
        organ = [r for r in prediction["result"] if r["from_name"] == "organ"]
        assert organ[0]["value"]["choices"] == ["breast"]

    counts = Counter(r["finding"] for _, r in train)
    majority_rate = max(counts.values()) / sum(counts.values())
    accuracy = correct / voted
    coverage = voted / len(test)
    # One-sided binomial test against "always the majority class": z > 3 is far above chance.
    z = (accuracy - majority_rate) / math.sqrt(majority_rate * (1 - majority_rate) / voted)
    print(
        f"BUSI vote: accuracy {accuracy:.3f} on {voted}/{len(test)} voted "
        f"(coverage {coverage:.2f}), majority rate {majority_rate:.3f}, z={z:.1f}, "
        f"abstained {len(abstained)}"
    )
    assert z > 3, (accuracy, majority_rate, voted)
    assert coverage >= 0.5
    assert abstained, "with the default thresholds some uncertain votes must abstain"
