"""Against a real Label Studio 1.23.2 on loopback, with real breast-ultrasound images.

Label Studio serves the images as local files, our backend (basic auth on) is connected through
/api/ml, annotations made through Label Studio's API reach the backend by the webhook Label
Studio created, and "Retrieve Predictions" stores our suggestions in Label Studio. Everything
is read back from Label Studio: its reply to the action counts tasks, not stored predictions.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from backend.app import create_app
from echolabel.cli import main
from echolabel.labelstudio import LabelStudioClient
from echolabel.settings import Settings
from tests.conftest import SHARED_DATA, choices_result, serving

BUSI = SHARED_DATA / "busi"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="organ" toName="image">
    <Choice value="breast"/><Choice value="thyroid"/><Choice value="liver"/>
  </Choices>
  <Choices name="finding" toName="image">
    <Choice value="normal"/><Choice value="benign"/><Choice value="malignant"/>
  </Choices>
</View>"""
BASIC_AUTH = ("labelstudio", "backend-secret-é")  # non-ASCII: Label Studio sends latin-1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
]


def busi_rows() -> list[dict[str, str]]:
    with open(BUSI / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def stratified_sample(rows: list[dict[str, str]], share: float, seed: int) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["finding"], []).append(row)
    rng = random.Random(seed)
    picked = []
    for members in by_class.values():
        picked += rng.sample(members, round(len(members) * share))
    return picked


def serve_images(label_studio, rows: list[dict[str, str]], folder: str) -> Path:
    """Copy the images into Label Studio's local-files root (a temp dir, never the repo)."""
    target = label_studio.local_files_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copyfile(BUSI / row["image"], target / Path(row["image"]).name)
    return target


def set_up_project(admin, label_studio, rows, folder: str, backend_url: str) -> dict[str, int]:
    """A project with our config and the images as tasks; the backend connected. Task ids by
    image name."""
    target = serve_images(label_studio, rows, folder)
    project = admin.create_project(f"echolabel e2e {folder}", CONFIG)
    admin.add_local_storage(project, str(target))
    names = [Path(row["image"]).name for row in rows]
    ids = admin.import_tasks(
        project, [{"image": f"/data/local-files/?d={folder}/{name}"} for name in names]
    )
    admin.connect_backend(project, backend_url, "echolabel", basic_auth=BASIC_AUTH)
    hooks = admin.webhooks(project)
    # Without its webhook a connected backend shows "Connected" but never learns.
    assert any(hook["url"] == f"{backend_url}/webhook" for hook in hooks), hooks
    return {"project": project} | dict(zip(names, ids, strict=True))


def test_suggestions_reach_annotators_through_a_real_label_studio(label_studio, tmp_path):
    """Personal access token (the 1.23 default) for images; BUSI train share annotated."""
    admin = LabelStudioClient(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    )
    personal_token = admin.create_personal_access_token()
    rows = busi_rows()
    annotated = stratified_sample([r for r in rows if r["split"] == "train"], 0.5, seed=7)
    unlabelled = [r for r in rows if r["split"] == "test"]
    settings = Settings(
        model_dir=tmp_path / "model",
        label_studio_url=label_studio.url,
        label_studio_api_key=personal_token,
        basic_auth_user=BASIC_AUTH[0],
        basic_auth_pass=BASIC_AUTH[1],
    )
    app = create_app(settings)
    with serving(app) as backend_url:
        ids = set_up_project(admin, label_studio, annotated + unlabelled, "busi", backend_url)
        project = ids.pop("project")
        for row in annotated:
            labels = {"organ": row["organ"], "finding": row["finding"]}
            admin.annotate(ids[Path(row["image"]).name], choices_result(labels))
        inbox = app.state.echolabel["inbox"]
        assert inbox.wait_idle(timeout=600)
        assert not inbox.failed(), "a webhook from Label Studio failed in the backend"
        store = app.state.echolabel["services"].store
        assert store.count(project, labelled=True) == len(annotated)

        targets = [ids[Path(row["image"]).name] for row in unlabelled]
        admin.retrieve_predictions(project, targets)
        stored = {task: admin.predictions(task) for task in targets}
        # A second click must not predict the same tasks again (model versions agree).
        admin.retrieve_predictions(project, targets)
        again = {task: admin.predictions(task) for task in targets}

    assert again == stored
    correct = voted = 0
    for row, task in zip(unlabelled, targets, strict=True):
        predictions = stored[task]
        assert len(predictions) <= 1, predictions
        if not predictions:
            continue  # every field abstained: Label Studio stores nothing and asks again later
        result = {r["from_name"]: r for r in predictions[0]["result"]}
        assert {r["to_name"] for r in result.values()} == {"image"}
        assert result["organ"]["value"]["choices"] == ["breast"]
        if "finding" in result:
            voted += 1
            correct += result["finding"]["value"]["choices"] == [row["finding"]]
            assert 0 < result["finding"]["score"] <= 1
    counts = Counter(r["finding"] for r in annotated)
    majority_rate = max(counts.values()) / sum(counts.values())
    accuracy = correct / voted
    z = (accuracy - majority_rate) / math.sqrt(majority_rate * (1 - majority_rate) / voted)
    print(
        f"real Label Studio: finding accuracy {accuracy:.3f} on {voted}/{len(targets)} voted "
        f"tasks, majority rate {majority_rate:.3f}, z={z:.1f}"
    )
    assert voted >= len(targets) / 2
    assert z > 3, (accuracy, majority_rate, voted)


def test_legacy_token_fetches_images_and_predictions_are_stored(
    label_studio, tmp_path, monkeypatch, capsys
):
    admin = LabelStudioClient(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    )
    rows = busi_rows()
    annotated = stratified_sample(rows[:400], 0.05, seed=3) + stratified_sample(
        rows[400:], 0.05, seed=3
    )
    unlabelled = [r for r in rows if r not in annotated][::80]
    settings = Settings(
        model_dir=tmp_path / "model",
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        basic_auth_user=BASIC_AUTH[0],
        basic_auth_pass=BASIC_AUTH[1],
        min_neighbours=1,
        min_score=0.0,
    )
    app = create_app(settings)
    with serving(app) as backend_url:
        ids = set_up_project(admin, label_studio, annotated + unlabelled, "legacy", backend_url)
        project = ids.pop("project")
        # `echolabel connect` on a connected project: finds it and keeps the webhook authorised.
        for name, value in {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "BASIC_AUTH_USER": BASIC_AUTH[0],
            "BASIC_AUTH_PASS": BASIC_AUTH[1],
        }.items():
            monkeypatch.setenv(name, value)
        assert main(["connect", "--project", str(project), "--backend-url", backend_url]) == 0
        assert "already connected" in capsys.readouterr().out
        for row in annotated:
            labels = {"organ": row["organ"], "finding": row["finding"]}
            admin.annotate(ids[Path(row["image"]).name], choices_result(labels))
        assert app.state.echolabel["inbox"].wait_idle(timeout=300)
        assert app.state.echolabel["services"].store.count(project, labelled=True) == len(annotated)
        targets = [ids[Path(row["image"]).name] for row in unlabelled]
        admin.retrieve_predictions(project, targets)
        for task in targets:
            (prediction,) = admin.predictions(task)
            names = {(r["from_name"], r["to_name"]) for r in prediction["result"]}
            assert names == {("organ", "image"), ("finding", "image")}
            assert prediction["model_version"].startswith("echolabel-efficientnet_lite0-g")
