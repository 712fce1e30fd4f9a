"""One retraining round on a real embedded store: a better challenger is promoted, a worse one
(trained on shuffled labels) is kept out, and a round waits for the labels to grow."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from echolabel.core.model import SimilarityModel
from echolabel.core.runtime import Runtime
from echolabel.embedding import TaskImage
from echolabel.encoders import available_encoders, register_encoder
from tests.helpers import TINY_ENCODER, dark_and_bright
from tests.label_configs import DARK_BRIGHT_CONFIG
from workers.runtime import open_runtime
from workers.training import TrainOptions
from workers.training.retraining import run_round
from workers.training.samples import Sample
from workers.training.selection import RetrainPolicy, SelectionLog

NOISE_ENCODER = "noise-test"
CONFIG = DARK_BRIGHT_CONFIG
TINY = TrainOptions(input_size=64, epochs=2, views=1, batch_size=16, min_per_class=20)
POLICY = RetrainPolicy(holdout_fraction=0.25, min_holdout_per_class=4, k=5, min_neighbours=2)


class NoiseEncoder:
    """A champion that knows nothing: a random unit vector per image (seeded by its pixels)."""

    name = NOISE_ENCODER
    dim = 16
    weights_id = "noise"
    device = "cpu"

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = []
        for image in images:
            seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:4], "big")
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        out = np.asarray(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


if NOISE_ENCODER not in available_encoders():
    register_encoder(NOISE_ENCODER)(lambda weights_dir, device, batch_size: NoiseEncoder())


def labelled_project(settings, encoder: str, count: int = 40) -> Runtime:
    settings = dataclasses.replace(settings, encoder=encoder)
    paths = dark_and_bright(settings.local_files_root, count, size=(48, 48))
    services = open_runtime(settings)
    SimilarityModel(services, 5, CONFIG).embed(
        [
            TaskImage(n, paths[name], {"organ": name.split("_")[0]})
            for n, name in enumerate(sorted(paths))
        ]
    )
    return services


def round_on(services: Runtime, selection: SelectionLog, **kwargs):
    return run_round(
        store=services.store,
        embedder=services.embedder,
        fetcher=services.fetcher,
        encoders_dir=services.settings.encoders_dir,
        selection=selection,
        project=5,
        policy=kwargs.pop("policy", POLICY),
        options=kwargs.pop("options", TINY),
        **kwargs,
    )


def test_a_better_challenger_wins_and_is_recorded_only_once_live(settings, tmp_path):
    services = labelled_project(settings, NOISE_ENCODER)
    selection = SelectionLog(tmp_path / "selection")
    try:
        candidate = round_on(services, selection)
    finally:
        services.close()
    assert candidate.decision == "promoted", candidate.reason
    assert candidate.champion == NOISE_ENCODER
    assert candidate.challenger == "trained:project-5-v1"
    comparison = candidate.comparison
    assert comparison["label_match_interval"][0] > 0
    assert comparison["challenger_accuracy"] > comparison["champion_accuracy"]
    assert "excludes 0 and the vote is not clearly worse" in candidate.reason
    # The held-out images were never trained on.
    assert candidate.details["trained_on"] + comparison["images"] == 80
    # A promotion is recorded by whoever makes it live (the re-embedding), not by the round.
    assert selection.read(5)["candidates"] == []


def test_a_challenger_trained_on_shuffled_labels_is_not_promoted(settings, tmp_path):
    services = labelled_project(settings, TINY_ENCODER)
    selection = SelectionLog(tmp_path / "selection")

    def shuffled(samples: list[Sample]) -> list[Sample]:
        labels = [s.labels for s in samples]
        random.Random(0).shuffle(labels)
        return [dataclasses.replace(s, labels=lab) for s, lab in zip(samples, labels, strict=True)]

    try:
        candidate = round_on(services, selection, relabel=shuffled)
    finally:
        services.close()
    assert candidate.decision == "kept", candidate.reason
    assert not candidate.comparison["label_match_interval"][0] > 0
    recorded = selection.read(5)
    assert recorded["live"] is None
    assert [c["decision"] for c in recorded["candidates"]] == ["kept"]
    assert recorded["candidates"][0]["challenger"] == "trained:project-5-v1"


@pytest.mark.parametrize("enabled", [True, False])
def test_a_round_waits_for_labels_to_grow_or_when_turned_off(settings, tmp_path, enabled):
    services = labelled_project(settings, TINY_ENCODER, count=20)
    selection = SelectionLog(tmp_path / "selection")
    policy = dataclasses.replace(POLICY, enabled=enabled)
    try:
        first = round_on(services, selection, policy=dataclasses.replace(policy, min_per_class=25))
        second = round_on(services, selection, policy=policy)
    finally:
        services.close()
    assert first.decision == second.decision == "refused"
    if enabled:
        assert "below 25" in first.reason
        # The refusal was a decision at 40 labels: the next round waits for 50.
        assert "next round starts at 50" in second.reason
    else:
        assert "ECHOLABEL_AUTO_RETRAIN" in first.reason
    assert not list((settings.encoders_dir).glob("project-5-v*"))


def test_a_class_short_once_its_images_are_held_out_is_a_refusal_not_a_failure(settings, tmp_path):
    """20 labels per class pass the guard-rail, but the training part, after the hold-out,
    has fewer: the trainer refuses, and the round records a refusal (it used to raise)."""
    services = labelled_project(settings, TINY_ENCODER, count=20)
    selection = SelectionLog(tmp_path / "selection")
    policy = dataclasses.replace(POLICY, min_per_class=20, min_holdout_per_class=1)
    try:
        candidate = round_on(services, selection, policy=policy)
    finally:
        services.close()
    assert candidate.decision == "refused", candidate.reason
    assert "every class needs at least 20" in candidate.reason
    recorded = selection.read(5)["candidates"]
    assert [c["decision"] for c in recorded] == ["refused"] and recorded[0]["labelled"] == 40
    assert not list((settings.encoders_dir).glob("project-5-v*"))


def test_the_loop_end_to_end_with_redis_promotes_pushes_and_rolls_back(
    settings, redis_db, monkeypatch
):
    """Labels grow through webhooks; the backend's timer starts a round on the RQ queue, its
    in-process store worker trains a challenger against a champion that knows nothing, promotes
    it with zero downtime (every /predict answered throughout), pushes the predictions again
    under the new version; then a rollback brings the old encoder back."""
    import threading
    import time

    import httpx

    from backend.app import create_app
    from tests.fakes import FakeLabelStudio
    from tests.helpers import REDIS_URL, annotation_webhook, choices_result, serving
    from workers import jobs
    from workers.training.selection import SelectionLog

    paths = dark_and_bright(settings.local_files_root, 60, size=(48, 48))
    tasks = []
    for n, name in enumerate(sorted(paths)):
        tone = name.split("_")[0]
        first = int(name.split("_")[1]) < 10  # 10 of each labelled before the backend starts
        annotations = (
            [{"id": 100 + n, "result": choices_result({"organ": tone}), "updated_at": "2026"}]
            if first
            else []
        )
        tasks.append({"id": n, "data": {"image": paths[name]}, "annotations": annotations})
    api = FakeLabelStudio(tasks, CONFIG)
    monkeypatch.setattr(jobs, "LabelStudioClient", lambda _settings: api)
    looped = dataclasses.replace(
        settings,
        encoder=NOISE_ENCODER,
        redis_url=REDIS_URL,
        auto_retrain=True,
        retrain_check_s=1.0,
        min_per_class=60,
        retrain_options=dataclasses.asdict(TINY) | {"min_per_class": 8, "epochs": 4},
        top_k=5,
        refresh_interval_s=0,
        embed_wait_s=0.0,
    )
    selection = SelectionLog(looped.selection_dir)
    answers: list[int] = []
    stop = threading.Event()
    with serving(create_app(looped)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/setup", json={"project": "5", "schema": CONFIG}).status_code == 200
        started = client.post("/projects/5/preannotate").json()
        assert started["queue"] == "preannotate", started
        deadline = time.monotonic() + 300
        while not api.predictions_by_id:
            assert time.monotonic() < deadline, client.get("/jobs").json()
            time.sleep(0.5)
        first_version = next(iter(api.predictions_by_id.values()))["model_version"]
        assert NOISE_ENCODER in first_version

        def ask() -> None:
            task = {"id": 119, "data": {"image": tasks[119]["data"]["image"]}}
            while not stop.is_set():
                reply = client.post("/predict", json={"tasks": [task], "project": "5"})
                answers.append(reply.status_code)
                time.sleep(0.1)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # Labels grow: 50 more of each class, 120 labelled, where the first round is due
        # (twice the guard-rail's 60 per class).
        unlabelled = [t for t in tasks if not t["annotations"]]
        for task in [t for t in unlabelled if "dark_" in t["data"]["image"]][:50] + [
            t for t in unlabelled if "bright_" in t["data"]["image"]
        ][:50]:
            tone = "dark" if "dark_" in task["data"]["image"] else "bright"
            body = annotation_webhook(5, task, {"organ": tone}, 1000 + task["id"])
            assert client.post("/webhook", json=body).status_code == 200
        deadline = time.monotonic() + 600
        while not selection.read(5)["candidates"]:
            assert time.monotonic() < deadline, client.get("/jobs").json()
            time.sleep(0.5)
        stop.set()
        asker.join(30)
        (round_,) = selection.read(5)["candidates"]
        assert round_["decision"] == "promoted", round_["reason"]
        assert round_["labelled"] == 120 and round_["champion"] == NOISE_ENCODER
        challenger = round_["challenger"]
        assert selection.read(5)["live"]["encoder"] == challenger
        assert answers and set(answers) == {200}, answers  # predictions answered throughout
        # The push ran again under the new encoder's version: one current prediction per task.
        versions = {p["model_version"] for p in api.predictions_by_id.values()}
        assert any(challenger.replace(":", "-") in v or challenger in v for v in versions)
        assert round_["details"]["push"]["model_version"] != first_version
        shown = client.get("/projects/5/encoder-selection").json()
        assert shown["candidates"][0]["comparison"]["label_match_interval"][0] > 0

        # Rollback: the champion that knew nothing is back, recorded.
        assert client.post("/projects/5/rollback-encoder").status_code == 200
        deadline = time.monotonic() + 300
        while selection.read(5)["live"]["encoder"] != NOISE_ENCODER:
            assert time.monotonic() < deadline, client.get("/jobs").json()
            time.sleep(0.5)
        decisions = [
            c["decision"] for c in client.get("/projects/5/encoder-selection").json()["candidates"]
        ]
        assert decisions == ["promoted", "rolled back"]
