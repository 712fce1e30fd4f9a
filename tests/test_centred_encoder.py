"""Encoders centred on a project's own images: the arithmetic, the files, the job and the
command that switch a project to one."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from echolabel import cli
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from echolabel.encoders import EncoderError, load_encoder
from echolabel.encoders.centred import (
    CENTRE_FILE,
    can_centre,
    centre_rows,
    fit_centre,
    save_centred,
    uncentre_rows,
)
from tests.helpers import TINY_ENCODER, TinyEncoder, dark_and_bright
from tests.label_configs import DARK_BRIGHT_CONFIG
from workers.runtime import open_runtime


def test_centring_subtracts_the_mean_and_normalises_again():
    rows = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    centre = fit_centre(rows)
    assert np.allclose(centre, [2 / 3, 1 / 3])
    # (1, 0) - (2/3, 1/3) = (1/3, -1/3) → (0.707, -0.707); (0, 1) → (-0.707, 0.707).
    assert np.allclose(centre_rows(rows, centre), [[0.7071, -0.7071]] * 2 + [[-0.7071, 0.7071]])
    with pytest.raises(ValueError, match="at least one"):
        fit_centre(np.zeros((0, 2)))
    # Rows one by one (a store's points) give the same mean.
    assert np.allclose(fit_centre(iter(rows)), centre)
    with pytest.raises(ValueError, match="at least one"):
        fit_centre(iter([]))
    # The base encoder's rows come back from the centred ones and the centre.
    rng = np.random.default_rng(1)
    unit = rng.normal(size=(50, 8)) + 2.0
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    mean = fit_centre(unit)
    assert np.allclose(uncentre_rows(centre_rows(unit, mean), mean), unit, atol=1e-6)
    assert can_centre("efficientnet_lite0")
    assert not can_centre("trained:busi-v1") and not can_centre("centred:project-1-centred-v1")


def test_a_saved_centre_loads_as_an_encoder_of_its_own_weights(settings):
    encoders = settings.encoders_dir
    centre = np.linspace(-0.1, 0.1, 16).astype(np.float32)
    name = save_centred(
        encoders,
        "project-7-centred",
        start=TINY_ENCODER,
        start_weights_id=TinyEncoder.weights_id,
        centre=centre,
        images=3,
        source={"project": "7"},
    )
    assert name == "centred:project-7-centred-v1"
    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (20, 200)]
    images[1].paste((0, 0, 0), (0, 0, 4, 4))
    encoder = load_encoder(name, encoders_dir=encoders)
    assert encoder.dim == 16 and encoder.name == name
    assert np.allclose(encoder.embed(images), centre_rows(TinyEncoder().embed(images), centre))
    assert np.allclose(np.linalg.norm(encoder.embed(images), axis=1), 1.0)
    # Another centre is other weights: vectors of the two are told apart.
    other = save_centred(
        encoders,
        "project-7-centred",
        start=TINY_ENCODER,
        start_weights_id=TinyEncoder.weights_id,
        centre=-centre,
        images=3,
        source={"project": "7"},
    )
    assert other == "centred:project-7-centred-v2"
    assert load_encoder(other, encoders_dir=encoders).weights_id != encoder.weights_id

    with pytest.raises(EncoderError, match="only those are centred"):
        save_centred(
            encoders, "x", start=name, start_weights_id="a", centre=centre, images=1, source={}
        )
    # Fitted on other weights of the base encoder: refused, saying what to do.
    config = json.loads((encoders / "project-7-centred-v1" / CENTRE_FILE).read_text())
    (encoders / "stale-v1").mkdir()
    stale = {**config, "start_weights_id": "0123456789ab"}
    (encoders / "stale-v1" / CENTRE_FILE).write_text(json.dumps(stale))
    with pytest.raises(EncoderError, match=r"weights 0123456789ab.*fit the centre again"):
        load_encoder("centred:stale-v1", encoders_dir=encoders)
    with pytest.raises(EncoderError, match=r"cannot read .*missing-v1/centre\.json"):
        load_encoder("centred:missing-v1", encoders_dir=encoders)


def test_the_command_centres_a_project_on_all_its_images_and_reembeds(settings, capsys):
    paths = dark_and_bright(settings.local_files_root, 6, size=(48, 48))
    services = open_runtime(settings)
    SimilarityModel(services, 5, DARK_BRIGHT_CONFIG).embed(
        [
            TaskImage(n, paths[name], {"organ": name.split("_")[0]})
            for n, name in enumerate(sorted(paths))
        ]
        + [TaskImage(1000, paths["dark_0"])]  # unlabelled: in the centre too
    )
    before = {p.task: p.vector for p in services.store.iter_points(5, with_vectors=True)}
    services.close()
    env = {
        "MODEL_DIR": str(settings.model_dir),
        "ECHOLABEL_LOCAL_FILES_ROOT": str(settings.local_files_root),
        "ECHOLABEL_ENCODER": TINY_ENCODER,
    }
    duplicates = ["duplicates", "--project", "5", "--threshold", "0.9"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REDIS_URL", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        assert cli.main(duplicates) == 0
        pairs_before = capsys.readouterr().out
        embedded: list[int] = []
        plain = TinyEncoder.embed
        patch.setattr(TinyEncoder, "embed", lambda me, ims: embedded.append(1) or plain(me, ims))
        assert cli.main(["centre-encoder", "--project", "5", "--reembed"]) == 0
        assert embedded == []  # the live vectors centred: no image read or embedded again
        result = json.loads(capsys.readouterr().out)
        assert result["encoder"] == "centred:project-5-centred-v1" and result["images"] == 13
        assert result["reembed"] == "switched"
        # Centred already: a second centring is refused, and nothing is written.
        assert cli.main(["centre-encoder", "--project", "5"]) != 0
        assert "only a pretrained encoder is centred" in capsys.readouterr().err
        # Near-duplicates are found by the base encoder's similarity, whose threshold it is.
        assert cli.main(duplicates) == 0
        assert capsys.readouterr().out == pairs_before
    assert not (settings.encoders_dir / "project-5-centred-v2").exists()
    services = open_runtime(settings)
    try:
        info = services.store.collection(5)
        assert info.encoder == "centred:project-5-centred-v1"
        after = {p.task: p.vector for p in services.store.iter_points(5, with_vectors=True)}
        centre = fit_centre(np.stack(list(before.values())))
        for task, vector in before.items():
            assert np.allclose(after[task], centre_rows(vector[None], centre)[0], atol=1e-5)
        labelled = services.store.iter_points(5, labelled=True, with_vectors=False)
        assert {p.task: p.labels["organ"] for p in labelled} == {
            n: name.split("_")[0] for n, name in enumerate(sorted(paths))
        }
    finally:
        services.close()


def test_the_backend_centres_a_grown_project_once_and_a_rollback_stays(settings):
    """The timer centres a project on a pretrained encoder once it holds enough images (not
    one below the minimum), records it, and leaves the clock of the retraining loop alone; after
    a rollback it does not centre the project again."""
    import time

    from fastapi.testclient import TestClient

    from backend.app import create_app
    from workers.training.selection import SelectionLog

    paths = dark_and_bright(settings.local_files_root, 6, size=(48, 48))
    services = open_runtime(settings)
    SimilarityModel(services, 5, DARK_BRIGHT_CONFIG).embed(
        [
            TaskImage(n, paths[name], {"organ": name.split("_")[0]})
            for n, name in enumerate(sorted(paths))
        ]
    )
    SimilarityModel(services, 6, DARK_BRIGHT_CONFIG).embed(
        [TaskImage(n, paths[name]) for n, name in enumerate(sorted(paths)[:3])]
    )
    services.close()
    centring = dataclasses.replace(
        settings,
        auto_centre=True,
        centre_min_images=10,
        retrain_check_s=0.2,
        basic_auth_user="admin",
        basic_auth_pass="secret",
    )
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}
    selection = SelectionLog(centring.selection_dir)

    def live(project: int) -> str | None:
        state = selection.read(project)["live"]
        return state["encoder"] if state else None

    with TestClient(create_app(centring)) as client:
        for project in ("5", "6"):
            body = {"project": project, "schema": DARK_BRIGHT_CONFIG}
            assert client.post("/setup", json=body, headers=auth).is_success
        deadline = time.monotonic() + 60
        while live(5) != "centred:project-5-centred-v1":
            assert time.monotonic() < deadline, client.get("/jobs", headers=auth).json()
            time.sleep(0.1)
        (record,) = client.get("/projects/5/encoder-selection", headers=auth).json()["candidates"]
        assert record["decision"] == "centred" and record["champion"] == TINY_ENCODER
        assert record["labelled"] == 12 and "12 images" in record["reason"]
        assert selection.labelled_at_last_decision(5) == 0  # the loop's clock did not move
        assert live(6) is None and selection.read(6)["candidates"] == []  # 3 images: not yet
        page = client.get("/admin", headers=auth)
        assert page.status_code == 200, page.text
        assert "centred:project-5-centred-v1" in page.text and "once it holds 10" in page.text

        assert client.post("/projects/5/rollback-encoder", headers=auth).is_success
        while live(5) != TINY_ENCODER:
            assert time.monotonic() < deadline, client.get("/jobs", headers=auth).json()
            time.sleep(0.1)
        time.sleep(1.0)  # five more checks
        decisions = [c["decision"] for c in selection.read(5)["candidates"]]
        assert decisions == ["centred", "rolled back"] and live(5) == TINY_ENCODER


def test_evaluation_measures_a_pretrained_encoder_centred_as_the_backend_would(settings):
    from echolabel.folders import read_folder
    from workers.evaluation.report import evaluate_vectors, headline
    from workers.evaluation.runner import evaluate_folder

    # Bright images that differ by a little noise: every vector shares a large component, so
    # centring changes which neighbours come first.
    root = settings.local_files_root
    rng = np.random.default_rng(0)
    names = [f"img_{i:02d}" for i in range(20)]
    for name in names:
        pixels = (200 + rng.integers(-40, 40, (4, 4))).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(
            root / f"{name}.png"
        )
    (root / "labels.csv").write_text(
        "image,organ\n" + "".join(f"{n}.png,{'ab'[i % 2]}\n" for i, n in enumerate(names))
    )
    items = read_folder(root, root / "labels.csv", fields=("organ",))
    centring = dataclasses.replace(settings, auto_centre=True, centre_min_images=20)

    def organ(chosen: Any, **options: Any) -> dict[str, Any]:
        return evaluate_folder(
            items, ["organ"], [TINY_ENCODER], chosen, root=root, min_class_size=2, **options
        )

    report = organ(centring)
    block = report["encoders"][TINY_ENCODER]
    assert block["centred_on"] == 20
    assert f"{TINY_ENCODER}: centred on the 20 images" in headline(report)
    # The metrics of the encoder's vectors centred by hand, not those of its plain vectors.
    order = [names.index(item.path.stem) for item in items]
    raw = TinyEncoder().embed([Image.open(root / f"{n}.png") for n in names])[order]
    labels = {"organ": [item.labels["organ"] for item in items]}
    common = {"min_class_size": 2, "min_neighbours": 2, "min_score": 0.5}
    centred = evaluate_vectors(centre_rows(raw, fit_centre(raw)), labels, **common)
    plain = evaluate_vectors(raw, labels, **common)
    got = block["fields"]["organ"]
    want = centred["fields"]["organ"]
    assert got["weighted_same_in_top10"] == pytest.approx(want["weighted_same_in_top10"])
    assert got["vote"]["accuracy"] == pytest.approx(want["vote"]["accuracy"])
    assert want["weighted_same_in_top10"] != pytest.approx(
        plain["fields"]["organ"]["weighted_same_in_top10"]
    )
    # Near-duplicates left out are those of the encoder's own similarity, whose threshold it
    # is: 6 pairs at 0.97 here, where the centred vectors have none.
    apart = organ(centring, near_duplicate_threshold=0.97)["encoders"][TINY_ENCODER]
    assert apart["near_duplicates_excluded"] == {"threshold": 0.97, "pairs": 6}
    want = evaluate_vectors(
        centre_rows(raw, fit_centre(raw)),
        labels,
        near_duplicate_threshold=0.97,
        near_duplicates_by=raw,
        **common,
    )["fields"]["organ"]
    assert apart["fields"]["organ"]["vote"]["accuracy"] == pytest.approx(want["vote"]["accuracy"])
    assert apart["fields"]["organ"]["weighted_same_in_top10"] == pytest.approx(
        want["weighted_same_in_top10"]
    )
    # One image short of the minimum, or turned off: measured as it is.
    for as_is in (
        dataclasses.replace(centring, centre_min_images=21),
        dataclasses.replace(centring, auto_centre=False),
    ):
        block = organ(as_is)["encoders"][TINY_ENCODER]
        assert block["centred_on"] is None
        assert block["fields"]["organ"]["weighted_same_in_top10"] == pytest.approx(
            plain["fields"]["organ"]["weighted_same_in_top10"]
        )
