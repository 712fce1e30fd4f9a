"""Training an encoder on the project's own labels: end to end on a tiny set (seconds), a
loadable versioned encoder, the guard-rail, held-out-only evaluation, and job progress."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backend.admin import Admin
from echolabel import cli
from echolabel.core.model import SimilarityModel
from echolabel.core.runtime import Runtime
from echolabel.embedding import TaskImage
from echolabel.encoders import load_encoder
from echolabel.encoders.trained import load_trained
from echolabel.encoders.trained_files import read_config
from echolabel.images import ImageFetcher
from echolabel.settings import Settings
from tests.helpers import REDIS_URL, TINY_ENCODER, dark_and_bright, run_worker
from tests.label_configs import DARK_BRIGHT_CONFIG
from vectorstore import Annotation
from workers import jobs
from workers.evaluation.report import headline
from workers.evaluation.runner import evaluate_folder
from workers.queues import REEMBED, enqueue_unique, queue
from workers.runtime import install, open_runtime
from workers.training import (
    Sample,
    TrainingProgress,
    TrainingRefused,
    TrainOptions,
    train_encoder,
)
from workers.training.fitting import weight_average
from workers.training.samples import validation_split
from workers.training.sources import folder_samples

# Small enough to train in seconds on a busy CPU: 64 px, one augmented view, two epochs; with
# the recipe's early-stopping split, whose scores these tests read.
TINY = TrainOptions(
    input_size=64, epochs=2, views=1, batch_size=16, min_per_class=20, val_fraction=0.15
)
CONFIG = DARK_BRIGHT_CONFIG


def folder(root: Path, train: int = 20, test: int = 5) -> Path:
    """`train` + `test` dark and bright PNGs with a labels.csv (image, organ, split)."""
    images = root / "images"
    images.mkdir(parents=True)
    paths = dark_and_bright(images, train + test, size=(48, 48))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "organ", "split"])
        for name in sorted(paths):
            split = "train" if int(name.split("_")[1]) < train else "test"
            writer.writerow([f"images/{name}.png", name.split("_")[0], split])
    return root


def train_on_folder(
    settings: Settings,
    root: Path,
    samples: list[Sample],
    name: str,
    options: TrainOptions = TINY,
    on_progress: Callable[[TrainingProgress], None] = lambda progress: None,
) -> dict[str, Any]:
    """`train_encoder` on `samples` of the images under `root` (made by `folder`)."""
    with ImageFetcher(dataclasses.replace(settings, local_files_root=root)) as fetcher:
        return train_encoder(
            samples,
            ["organ"],
            fetcher=fetcher,
            encoders_dir=settings.encoders_dir,
            name=name,
            options=options,
            on_progress=on_progress,
        )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trains_on_a_tiny_folder_and_the_registry_loads_the_encoder(tmp_path, settings):
    root = folder(tmp_path / "data")
    samples, left_out = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    assert (len(samples), left_out) == (40, 10)  # the test rows are never read
    seen = []
    started = time.monotonic()
    summary = train_on_folder(
        settings, root, samples, "tiny", on_progress=lambda p: seen.append(p.as_meta())
    )
    assert time.monotonic() - started < 120
    assert summary["encoder"] == "trained:tiny-v1"
    directory = settings.encoders_dir / "tiny-v1"
    assert {p.name for p in directory.iterdir()} == {
        "weights.safetensors",
        "config.json",
        "report.json",
    }
    config = read_config(directory)
    assert config["fields"] == {"organ": ["bright", "dark"]}
    assert config["input_size"] == 64
    assert config["backbone"]["timm_model"] == "tf_efficientnet_lite0"
    trained_hashes = {i["sha256"] for i in config["training"]["images"]}
    train_files = [root / s.id for s in samples]
    test_files = sorted(set((root / "images").iterdir()) - set(train_files))
    assert trained_hashes == {sha256(p) for p in train_files}
    assert not trained_hashes & {sha256(p) for p in test_files}
    report = json.loads((directory / "report.json").read_text())
    assert (
        report["class_counts"]["train"]["organ"]["dark"]
        + report["class_counts"]["validation"]["organ"]["dark"]
        == 20
    )
    assert len(report["curves"]) == 2 and report["validation_split"] == "stratified random"
    assert all(0 <= c["val_knn_vote_accuracy"] <= 1 for c in report["curves"])
    # Progress: loading, the frozen features, then one report per epoch with loss and accuracy.
    stages = [m["stage"] for m in seen]
    assert stages[0] == "loading images" and "computing frozen features" in stages
    epochs = [m for m in seen if m["stage"].startswith("epoch")]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert all(m["loss"] > 0 and 0 <= m["val_accuracy"] <= 1 for m in epochs)
    assert epochs[0]["eta_s"] > 0 and epochs[-1]["eta_s"] == 0

    encoder = load_encoder("trained:tiny-v1", encoders_dir=settings.encoders_dir)
    vectors = encoder.embed([Image.open(p) for p in test_files])
    assert vectors.shape == (10, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.name == "trained:tiny-v1" and len(encoder.weights_id) == 12

    # A second training is a new version; the first stays loadable.
    again = train_on_folder(
        settings, root, samples[:40], "tiny", dataclasses.replace(TINY, epochs=1)
    )
    assert again["encoder"] == "trained:tiny-v2"
    assert load_encoder("trained:tiny-v1", encoders_dir=settings.encoders_dir).dim == 1280


def test_refuses_with_the_class_counts_when_a_class_is_too_small(tmp_path, settings, capsys):
    samples = [Sample(f"a{i}", f"a{i}.png", {"organ": "dark"}) for i in range(25)]
    samples += [Sample(f"b{i}", f"b{i}.png", {"organ": "bright"}) for i in range(7)]
    with pytest.raises(TrainingRefused) as refused:
        train_encoder(
            samples,
            ["organ"],
            fetcher=ImageFetcher(settings),
            encoders_dir=settings.encoders_dir,
            name="small",
            options=TINY,
        )
    message = str(refused.value)
    assert "bright (7) below 20" in message and "organ: dark 25, bright 7" in message
    assert not settings.encoders_dir.exists()  # nothing was trained or saved

    # The CLI says the same, exits 1, and the minimum comes from the setting.
    root = folder(tmp_path / "data", train=12, test=0)
    argv = ["train-encoder", "--images", str(root), "--labels", str(root / "labels.csv")]
    argv += ["--field", "organ", "--split-column", "split"]
    env = {"MODEL_DIR": str(tmp_path / "model"), "ECHOLABEL_MIN_PER_CLASS": "13"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "at least 13 labelled images" in err and "organ: bright 12, dark 12" in err


def test_without_an_early_stopping_split_every_epoch_runs_and_the_last_is_kept(tmp_path, settings):
    root = folder(tmp_path / "data")
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    seen = []
    summary = train_on_folder(
        settings,
        root,
        samples,
        "all",
        dataclasses.replace(TINY, val_fraction=0.0, epochs=3, patience=1),
        on_progress=lambda p: seen.append(p.as_meta()),
    )
    report = json.loads((Path(summary["path"]) / "report.json").read_text())
    # Patience 1 would have stopped a validated run early; here nothing is validated.
    assert [c["epoch"] for c in report["curves"]] == [1, 2, 3]
    assert summary["best_epoch"] == 3 and summary["epochs_run"] == 3
    assert summary["val_accuracy"] is None and summary["selected_by"] == "last epoch"
    assert report["validation_split"] == "none" and report["validation"] is None
    assert report["class_counts"]["train"]["organ"] == {"bright": 20, "dark": 20}
    assert all("val_accuracy" not in c for c in report["curves"])
    config = read_config(Path(summary["path"]))
    assert {i["role"] for i in config["training"]["images"]} == {"train"}
    epochs = [m for m in seen if m["stage"].startswith("epoch")]
    assert [m["val_accuracy"] for m in epochs] == [None, None, None]
    with pytest.raises(ValueError, match="select_by='neighbours' picks the epoch on validation"):
        train_on_folder(
            settings,
            root,
            samples,
            "all",
            dataclasses.replace(TINY, val_fraction=0.0, select_by="neighbours"),
        )


def test_validation_split_is_patient_disjoint_and_stratified():
    samples = [
        Sample(f"{p}-{i}", "", {"organ": "dark" if p % 3 else "bright"}, group=f"p{p}")
        for p in range(30)
        for i in range(4)
    ]
    train, validation = validation_split(samples, ["organ"], 0.2, seed=1)
    assert len(train) + len(validation) == len(samples)
    assert not {s.group for s in train} & {s.group for s in validation}
    classes = {s.labels["organ"] for s in validation}
    assert classes == {"dark", "bright"} and 0.1 < len(validation) / len(samples) < 0.35
    # Without patients: a stratified random share of each class.
    plain = [dataclasses.replace(s, group=None, id=f"x{n}") for n, s in enumerate(samples)]
    train, validation = validation_split(plain, ["organ"], 0.25, seed=1)
    assert sum(s.labels["organ"] == "bright" for s in validation) == 10  # 40 bright × 0.25
    assert sum(s.labels["organ"] == "dark" for s in validation) == 20  # 80 dark × 0.25


def test_evaluation_of_a_trained_encoder_uses_held_out_images_only(tmp_path, settings):
    root = folder(tmp_path / "data")
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    with ImageFetcher(dataclasses.replace(settings, local_files_root=root)) as fetcher:
        train_encoder(
            samples,
            ["organ"],
            fetcher=fetcher,
            encoders_dir=settings.encoders_dir,
            name="tiny",
            options=TINY,
        )
    from echolabel.folders import read_folder

    items = read_folder(root, root / "labels.csv", fields=("organ",))
    report = evaluate_folder(
        items,
        ["organ"],
        [TINY_ENCODER, "trained:tiny-v1"],
        settings,
        root=root,
        min_class_size=2,
    )
    held_out = report["dataset"]["held_out"]
    assert held_out["excluded_training_images"] == 40
    assert held_out["trained_encoders"] == ["trained:tiny-v1"]
    # Every encoder is measured on the same 10 test images, never on the 40 trained on.
    assert report["dataset"]["items"] == 10
    assert {e: r["images"] for e, r in report["encoders"].items()} == {
        TINY_ENCODER: 10,
        "trained:tiny-v1": 10,
    }
    assert report["encoders"]["trained:tiny-v1"]["trained"]["training_images"] == 40
    assert "trained" not in report["encoders"][TINY_ENCODER]
    assert "held-out images only (40 training images left out" in headline(report)
    # Without a trained encoder nothing is left out.
    plain = evaluate_folder(items, ["organ"], [TINY_ENCODER], settings, root=root)
    assert plain["dataset"]["items"] == 50 and "held_out" not in plain["dataset"]


def project(settings, count: int = 20) -> Runtime:
    paths = dark_and_bright(settings.local_files_root, count, size=(48, 48))
    services = open_runtime(settings)
    SimilarityModel(services, 5, CONFIG).embed(
        [
            TaskImage(n, paths[name], {"organ": name.split("_")[0]})
            for n, name in enumerate(sorted(paths))
        ]
        + [TaskImage(1000, paths["dark_0"])]  # unlabelled: re-embedded, not trained on
    )
    return services


def test_admin_trains_on_a_project_reports_progress_and_reembeds(settings):
    services = project(settings)
    admin = Admin(services)
    install(services)
    try:
        started = admin.start_training_encoder(
            5, ["organ"], name="organs", options=dataclasses.asdict(TINY), reembed=True
        )
        assert started == {"job": "train-encoder-5", "status": "started", "queue": "in-process"}
        job = admin.local_jobs["train-encoder-5"]
        progress = []
        deadline = time.monotonic() + 180
        while job.status == "started" and time.monotonic() < deadline:
            if job.progress and job.progress not in progress:
                progress.append(dict(job.progress))
            time.sleep(0.05)
        assert job.status == "finished", job.error
        assert job.result["encoder"] == "trained:organs-v1"
        assert any(p.get("epoch") == 1 and p.get("val_accuracy") is not None for p in progress)
        # Then the zero-downtime re-embedding switched the project to the trained encoder.
        assert job.result["reembed"]["stage"] == "switched"
        info = services.store.collection(5)
        assert info.encoder == "trained:organs-v1" and info.dim == 1280
        config = read_config(settings.encoders_dir / "organs-v1")
        assert config["training"]["source"]["project"] == "5"
        assert "1000" not in {i["id"] for i in config["training"]["images"]}

        # The evaluation measures only images the encoder was not trained on: here none is
        # left, not even task 1000 once labelled (its image was trained on under another id).
        services.store.set_labels(5, 1000, {"organ": "dark"}, Annotation(7, "2026-12-01"))
        with pytest.raises(jobs.PermanentJobError, match=r"0 labelled task.* not used to train"):
            jobs.evaluate_project(5, min_class_size=1)
    finally:
        install(None)
        admin.stop()
        services.close()


def test_training_job_on_the_reembed_queue_reports_epochs_in_its_meta(settings, redis_db):
    services = project(settings)
    services.close()  # the worker process owns the embedded store now
    job = enqueue_unique(
        queue(redis_db, REEMBED),
        "train-encoder-5",
        jobs.train_encoder,
        5,
        ["organ"],
        "organs",
        dataclasses.asdict(TINY),
        job_timeout=600,
    )
    run_worker(dataclasses.replace(settings, redis_url=REDIS_URL), REEMBED)
    assert job.get_status(refresh=True) == "finished", job.latest_result().exc_string
    meta = job.get_meta(refresh=True)["progress"]
    assert meta["stage"] == "saved" and meta["epoch"] == 2 and meta["epochs"] == 2
    assert meta["loss"] > 0 and meta["val_accuracy"] is not None
    assert job.return_value()["encoder"] == "trained:organs-v1"
    assert (settings.encoders_dir / "organs-v1" / "weights.safetensors").is_file()


def test_cli_trains_on_a_project_and_reembeds_with_a_progress_bar(settings, capsys):
    project(settings).close()
    env = {
        "MODEL_DIR": str(settings.model_dir),
        "ECHOLABEL_LOCAL_FILES_ROOT": str(settings.local_files_root),
        "ECHOLABEL_ENCODER": TINY_ENCODER,
    }
    argv = ["train-encoder", "--project", "5", "--field", "organ", "--name", "cli"]
    argv += ["--input-size", "64", "--epochs", "1", "--views", "1", "--batch-size", "16"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REDIS_URL", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        assert cli.main([*argv, "--reembed"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["encoder"] == "trained:cli-v1" and result["reembed"]["stage"] == "switched"
    assert "train encoder on project 5" in err and "epoch 1/1: loss" in err  # the bar
    services = open_runtime(settings)
    try:
        assert services.store.collection(5).encoder == "trained:cli-v1"
    finally:
        services.close()


def test_http_endpoint_starts_training_visible_in_jobs(settings):
    from fastapi.testclient import TestClient

    from backend.app import create_app

    project(settings).close()
    with TestClient(create_app(settings)) as client:
        body = {"fields": ["organ"], "name": "http", "options": dataclasses.asdict(TINY)}
        started = client.post("/projects/5/train-encoder", json=body).json()
        assert started == {"job": "train-encoder-5", "status": "started", "queue": "in-process"}
        deadline = time.monotonic() + 120
        while True:
            listed = {j["id"]: j for j in client.get("/jobs").json()["jobs"]}
            job = listed["train-encoder-5"]
            if job["status"] != "started" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert job["status"] == "finished", job
        assert job["result"]["encoder"] == "trained:http-v1"
        assert job["progress"]["stage"] == "saved" and job["progress"]["epoch"] == 2
        refused = client.post("/projects/5/train-encoder", json={"options": []})
        assert refused.status_code == 422


def test_training_reads_images_as_embedding_does(tmp_path, settings):
    """Training decodes through the fetcher's own settings (DICOM frame, sector crop), so a
    trained encoder sees at inference the pixels it was trained on."""
    import shutil

    from pydicom.data import get_testdata_file

    from echolabel.encoders.trained import resize_crop
    from workers.training.data import load_images

    cine = tmp_path / "cine.dcm"  # a 30-frame ultrasound loop with burned-in text
    shutil.copyfile(get_testdata_file("examples_ybr_color.dcm"), cine)
    trained_on = {}
    for crop in ("off", "dicom"):
        fetcher = ImageFetcher(
            dataclasses.replace(
                settings, local_files_root=tmp_path, ultrasound_crop=crop, max_image_bytes=10**7
            )
        )
        loaded = load_images([Sample("cine", str(cine))], fetcher, size=64)
        assert not loaded.failed, loaded.failed
        trained_on[crop] = loaded.pixels[0]
        assert trained_on[crop].equal(resize_crop(fetcher.load(str(cine), min_side=64), 64))
        fetcher.close()
    assert not trained_on["off"].equal(trained_on["dicom"]), "the crop reached training"


def test_weight_average_follows_the_weights_and_batch_norm_statistics():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert weight_average(net, TINY, steps_per_epoch=4) is None  # off by default
    # Half-life one step: each update moves the average halfway to the live weights.
    averaged = weight_average(
        net, dataclasses.replace(TINY, ema_halflife_epochs=1.0), steps_per_epoch=1
    )
    assert averaged is not None
    first = net[0].weight.detach().clone()
    averaged.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
    averaged.update_parameters(net)
    assert torch.allclose(averaged.module[0].weight, first + 0.5)
    assert torch.allclose(averaged.module[1].running_mean, torch.full((2,), 1.0))


def test_training_with_a_weight_average_records_it_and_the_encoder_loads(tmp_path, settings):
    root = folder(tmp_path / "data")
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    options = dataclasses.replace(TINY, ema_halflife_epochs=0.5)
    summary = train_on_folder(settings, root, samples, "averaged", options)
    encoder = load_trained(Path(summary["path"]))
    report = json.loads((Path(summary["path"]) / "report.json").read_text())
    assert report["options"]["ema_halflife_epochs"] == 0.5
    assert summary["val_accuracy"] is not None
    assert encoder.embed([Image.new("RGB", (48, 48), (200, 200, 200))]).shape[0] == 1
