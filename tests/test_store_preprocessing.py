"""Vectors that belong together: a collection records the preprocessing with the encoder, and
vectors made under other settings are refused as a mismatched encoder is (409)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echolabel.core.runtime import open_configured_store
from tests.helpers import dark_and_bright
from tests.label_configs import DARK_BRIGHT_CONFIG
from vectorstore import DimensionMismatchError, Point, open_store

CONFIG = DARK_BRIGHT_CONFIG


def predict(client: TestClient, task_id: int, image: str):
    task = {"id": task_id, "data": {"image": image}, "project": 7}
    return client.post("/predict", json={"tasks": [task], "project": 7, "label_config": CONFIG})


def test_changing_the_ultrasound_crop_between_runs_is_refused_with_409(settings):
    images = dark_and_bright(settings.local_files_root, 2)
    first = dataclasses.replace(settings, ultrasound_crop="dicom")
    with TestClient(create_app(first)) as client:
        assert predict(client, 1, images["dark_0"]).status_code == 200
        info = client.app.state.echolabel["runtime"].store.collection(7)
        assert dict(info.preprocessing)["ECHOLABEL_ULTRASOUND_CROP"] == "dicom"

    second = dataclasses.replace(settings, ultrasound_crop="all")  # same MODEL_DIR
    with TestClient(create_app(second)) as client:
        answer = predict(client, 2, images["bright_0"])
        assert answer.status_code == 409, answer.text
        body = answer.json()
        assert body["error"] == "encoder_mismatch"
        assert "re-embed the project" in body["detail"]
        assert (
            "ECHOLABEL_ULTRASOUND_CROP is 'all' here, 'dicom' in the collection" in (body["detail"])
        )
        assert predict(client, 1, images["dark_0"]).status_code == 200, "stored vectors serve"

    with TestClient(create_app(first)) as client:  # the settings restored: accepted again
        assert predict(client, 2, images["bright_0"]).status_code == 200


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_every_engine_records_and_checks_the_preprocessing(tmp_path, settings, engine):
    vector = np.ones(4, dtype=np.float32) / 2
    made = settings.preprocessing
    store = open_store(path=tmp_path / engine, engine=engine, preprocessing=made)
    store.ensure_collection(1, "enc", 4, "w")
    assert dict(store.collection(1).preprocessing) == made
    store.upsert(1, "enc", [Point(task=1, vector=vector)])
    store.close()

    other = open_store(
        path=tmp_path / engine,
        engine=engine,
        preprocessing={**made, "ECHOLABEL_DICOM_FRAME": "first"},
    )
    with pytest.raises(DimensionMismatchError, match="re-embed the project"):
        other.ensure_collection(1, "enc", 4, "w")
    with pytest.raises(DimensionMismatchError, match="ECHOLABEL_DICOM_FRAME is 'first' here"):
        other.upsert(1, "enc", [Point(task=2, vector=vector)])
    # A re-embedding builds a generation with this process's preprocessing: accepted there.
    building = other.create_generation(1, "enc", 4, "w")
    other.upsert(1, "enc", [Point(task=2, vector=vector)], collection=building)
    other.switch_generation(1, building)
    other.ensure_collection(1, "enc", 4, "w")
    assert dict(other.collection(1).preprocessing)["ECHOLABEL_DICOM_FRAME"] == "first"
    other.close()

    untold = open_store(path=tmp_path / engine, engine=engine)  # nothing to compare: accepted
    untold.upsert(1, "enc", [Point(task=3, vector=vector)])
    assert untold.count(1) == 2
    untold.close()


def test_the_runtime_opens_the_store_with_the_settings_preprocessing(settings):
    store = open_configured_store(settings)
    info = store.ensure_collection(1, "enc", 4, "w")
    assert dict(info.preprocessing) == settings.preprocessing
    assert set(settings.preprocessing) == {
        "decode",
        "ECHOLABEL_ULTRASOUND_CROP",
        "ECHOLABEL_DICOM_FRAME",
    }
    store.close()
