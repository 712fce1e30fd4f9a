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

from backend.model import SimilarityModel
from echolabel.core.runtime import Runtime
from tests.conftest import TINY_ENCODER, dark_and_bright
from workers.embedding import TaskImage
from workers.encoders import available_encoders, register_encoder
from workers.runtime import open_runtime
from workers.training import TrainOptions
from workers.training.retraining import run_round
from workers.training.samples import Sample
from workers.training.selection import RetrainPolicy, SelectionLog

NOISE_ENCODER = "noise-test"
CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
</View>"""
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
        options=TINY,
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
    assert comparison["interval"][0] > 0
    assert comparison["challenger_accuracy"] > comparison["champion_accuracy"]
    assert "excludes 0" in candidate.reason
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
    assert not candidate.comparison["interval"][0] > 0
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
