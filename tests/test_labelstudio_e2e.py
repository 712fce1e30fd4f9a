"""Against a real Label Studio 1.23.2 on loopback, with real breast-ultrasound images.

Label Studio serves the images as local files, our backend (basic auth on) is connected through
/api/ml, annotations made through Label Studio's API reach the backend by the webhook Label
Studio created, and "Retrieve Predictions" stores our suggestions in Label Studio. Everything
is read back from Label Studio: its reply to the action counts tasks, not stored predictions.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from backend.app import create_app
from echolabel.cli import main
from echolabel.core.model import SimilarityModel
from echolabel.core.preannotate import PreAnnotator
from echolabel.settings import Settings
from tests.helpers import (
    BASIC_AUTH,
    BUSI,
    annotate_rows,
    busi_rows,
    predictions_by_task,
    serving,
    set_up_project,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
]


def stratified_sample(rows: list[dict[str, str]], share: float, seed: int) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["finding"], []).append(row)
    rng = random.Random(seed)
    picked = []
    for members in by_class.values():
        picked += rng.sample(members, round(len(members) * share))
    return picked


def identities(predictions: list[dict]) -> list[tuple]:
    """What makes predictions the same ones (Label Studio's `created_ago` text moves on)."""
    return [(p["id"], p["model_version"], repr(p["result"])) for p in predictions]


def test_suggestions_reach_annotators_through_a_real_label_studio(
    label_studio, label_studio_admin, label_studio_pat, tmp_path
):
    """Personal access token (the 1.23 default) for images; BUSI train share annotated."""
    admin = label_studio_admin
    rows = busi_rows()
    annotated = stratified_sample([r for r in rows if r["split"] == "train"], 0.5, seed=7)
    unlabelled = [r for r in rows if r["split"] == "test"]
    settings = Settings(
        model_dir=tmp_path / "model",
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio_pat,
        basic_auth_user=BASIC_AUTH[0],
        basic_auth_pass=BASIC_AUTH[1],
        # The first click must find every task embedded: 156 BUSI images can take more than
        # the default 20 s on two busy cores, and a task embedded after the reply is predicted
        # on the second click instead (Label Studio allows 100 s).
        embed_wait_s=80.0,
    )
    app = create_app(settings)
    with serving(app) as backend_url:
        ids = set_up_project(admin, label_studio, annotated + unlabelled, "busi", backend_url)
        project = ids.pop("project")
        annotate_rows(admin, ids, annotated)
        inbox = app.state.echolabel["inbox"]
        assert inbox.wait_idle(timeout=600)
        assert not inbox.failed(), "a webhook from Label Studio failed in the backend"
        store = app.state.echolabel["runtime"].store
        assert store.count(project, labelled=True) == len(annotated)

        targets = [ids[Path(row["image"]).name] for row in unlabelled]
        admin.retrieve_predictions(project, targets)
        stored = predictions_by_task(admin, project, targets)
        # A second click must not predict the same tasks again (model versions agree).
        admin.retrieve_predictions(project, targets)
        again = predictions_by_task(admin, project, targets)

    assert {t: identities(p) for t, p in again.items()} == {
        t: identities(p) for t, p in stored.items()
    }
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
    label_studio, label_studio_admin, tmp_path, monkeypatch, capsys
):
    admin = label_studio_admin
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
        annotate_rows(admin, ids, annotated)
        assert app.state.echolabel["inbox"].wait_idle(timeout=300)
        assert app.state.echolabel["runtime"].store.count(project, labelled=True) == len(annotated)
        targets = [ids[Path(row["image"]).name] for row in unlabelled]
        admin.retrieve_predictions(project, targets)
        for task in targets:
            (prediction,) = admin.predictions(task)
            names = {(r["from_name"], r["to_name"]) for r in prediction["result"]}
            assert names == {("organ", "image"), ("finding", "image")}
            assert prediction["model_version"].startswith("echolabel-efficientnet_lite0-g")


class Crash(RuntimeError):
    """Stands in for a kill between two batches of a push."""


def finding_accuracy(
    predictions: dict[int, list[dict]], rows_by_task: dict[int, dict], version: str
) -> tuple[int, int]:
    correct = voted = 0
    for task, row in rows_by_task.items():
        for prediction in predictions[task]:
            assert prediction["model_version"] == version
            names = {(r["from_name"], r["to_name"]) for r in prediction["result"]}
            assert names <= {("organ", "image"), ("finding", "image")} and names
            finding = [r for r in prediction["result"] if r["from_name"] == "finding"]
            if finding:
                voted += 1
                correct += finding[0]["value"]["choices"] == [row["finding"]]
    return correct, voted


def wait_for_job(app, job_id: str, timeout: float = 600) -> dict:
    admin = app.state.echolabel["admin"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.local_jobs.get(job_id)
        if job is not None and job.status != "started":
            assert job.status == "finished", job.error
            return job.result
        time.sleep(0.2)
    raise AssertionError(f"{job_id} did not finish")


def test_preannotate_push_resume_and_refresh_against_real_label_studio(
    label_studio, label_studio_admin, label_studio_pat, tmp_path
):
    admin = label_studio_admin
    rows = busi_rows()
    train = [r for r in rows if r["split"] == "train"]
    annotated = stratified_sample(train, 0.35, seed=11)
    later = [r for r in stratified_sample(train, 0.5, seed=12) if r not in annotated][:30]
    unlabelled = [r for r in rows if r["split"] == "test"] + later
    settings = Settings(
        model_dir=tmp_path / "model",
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio_pat,
        basic_auth_user=BASIC_AUTH[0],
        basic_auth_pass=BASIC_AUTH[1],
        refresh_after=len(later),
    )
    app = create_app(settings)
    with serving(app) as backend_url:
        ids = set_up_project(admin, label_studio, annotated + unlabelled, "push", backend_url)
        project = ids.pop("project")
        annotate_rows(admin, ids, annotated)
        inbox = app.state.echolabel["inbox"]
        assert inbox.wait_idle(timeout=600)
        services = app.state.echolabel["runtime"]
        targets = {ids[Path(r["image"]).name]: r for r in unlabelled}

        # A push killed after two batches, then resumed by the next run.
        batches = []

        def crash_after_two_batches(progress):
            if progress.stage == "voting and pushing" and progress.done > progress.already:
                batches.append(progress.done)
                if len(batches) == 2:
                    raise Crash

        crashing = PreAnnotator(services, admin, project, crash_after_two_batches, batch_size=40)
        with pytest.raises(Crash):
            crashing.push()
        partial = sum(map(len, predictions_by_task(admin, project, targets).values()))
        assert 0 < partial <= 80
        result = app.state.echolabel["admin"].start_preannotate(project)
        pushed = wait_for_job(app, result["job"])
        version = pushed["model_version"]
        stored = predictions_by_task(admin, project, targets)
        counts = {t: len(p) for t, p in stored.items()}
        assert set(counts.values()) <= {0, 1}, "one prediction per task, no duplicate"
        assert sum(counts.values()) == pushed["pushed"] + pushed["already_current"]
        assert pushed["pushed"] + pushed["already_current"] + pushed["abstained"] == len(targets)
        assert pushed["already_current"] == partial
        # Annotators are shown this version: the project names it, or names the backend (then
        # Label Studio asks /setup, which answers it).
        assert admin.project(project)["model_version"] in (version, "echolabel")
        shown = next(t for t, n in counts.items() if n)
        assert [p["model_version"] for p in admin._get(f"/api/tasks/{shown}/")["predictions"]] == [
            version
        ]
        correct, voted = finding_accuracy(stored, targets, version)
        # The tasks that stay unlabelled, before the refresh: accuracy compared on them.
        staying = {t: r for t, r in targets.items() if r not in later}
        correct_before, voted_before = finding_accuracy(stored, staying, version)
        counts_a = Counter(r["finding"] for r in annotated)
        majority = max(counts_a.values()) / sum(counts_a.values())
        z = (correct / voted - majority) / math.sqrt(majority * (1 - majority) / voted)
        print(
            f"\npush: {pushed['pushed']} new + {partial} resumed, {pushed['abstained']} "
            f"abstained; accuracy {correct / voted:.3f} on {voted} vs majority {majority:.3f} "
            f"(z={z:.1f}); {pushed['tasks_per_s']} tasks/s"
        )
        assert z > 3

        # "Retrieve Predictions" afterwards adds nothing: /setup answers the pushed version.
        before = {t: identities(p) for t, p in predictions_by_task(admin, project, targets).items()}
        admin.retrieve_predictions(project, list(targets))
        after = predictions_by_task(admin, project, targets)
        assert {t: identities(p) for t, p in after.items()} == before

        # Annotating `later` triggers one refresh (ECHOLABEL_REFRESH_AFTER = len(later)).
        annotate_rows(admin, ids, later)
        for row in later:
            del targets[ids[Path(row["image"]).name]]
        assert inbox.wait_idle(timeout=300)
        refreshed = wait_for_job(app, f"refresh-{project}")
        assert refreshed["label_changes"] == len(later) and refreshed["affected"] > 0
        assert refreshed["updated"] + refreshed["created"] + refreshed["deleted"] > 0

        # Exact: every unlabelled task's stored prediction is what a fresh vote gives now.
        model = SimilarityModel(services, project)
        vectors = services.store.vectors(project, list(targets))
        refreshed_predictions = predictions_by_task(admin, project, targets)
        for task in targets:
            fresh = model.prediction(model.suggest(vectors[task], exclude=[task]), version)
            stored = refreshed_predictions[task]
            assert [p["result"] for p in stored] == ([fresh["result"]] if fresh["result"] else [])
        correct_after, voted_after = finding_accuracy(refreshed_predictions, targets, version)
    print(
        f"refresh: {refreshed['affected']} affected of {len(targets)} unlabelled by "
        f"{len(later)} new labels, {refreshed['updated']} updated, {refreshed['created']} "
        f"created, {refreshed['deleted']} deleted in {refreshed['seconds']} s; accuracy "
        f"{correct_before / voted_before:.3f} on {voted_before} before, "
        f"{correct_after / voted_after:.3f} on {voted_after} after"
    )
    # More labels must not make the same tasks' suggestions worse (two tasks of slack).
    assert correct_after / voted_after >= correct_before / voted_before - 2 / voted_before
