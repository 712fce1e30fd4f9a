"""The HTTP protocol as Label Studio 1.23 uses it, driven through the real app."""

from __future__ import annotations

import base64
import dataclasses
import math

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echolabel.vote import TEMPERATURE
from tests.helpers import annotation_webhook, dark_and_bright

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
<Choices name="plane" toName="image"><Choice value="a"/><Choice value="b"/></Choices></View>"""


@pytest.fixture
def images(settings):
    """Ten dark and ten bright images under the local-files root."""
    return dark_and_bright(settings.local_files_root, 10)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def task(task_id, image):
    # Extra fields, as Label Studio sends them, are ignored.
    return {
        "id": task_id,
        "data": {"image": image, "note": "x"},
        "project": 7,
        "meta": {},
        "annotations": [],
        "unknown_field": [1, 2],
    }


def annotate(
    client,
    task_id,
    image,
    organ,
    annotation_id,
    updated="2026-01-01T00:00:00Z",
    action="ANNOTATION_CREATED",
):
    body = annotation_webhook(
        7, task(task_id, image), {"organ": organ}, annotation_id, updated, action
    )
    response = client.post("/webhook", json=body)
    assert response.status_code == 200 and response.json()["status"] == "queued"


def wait(client):
    assert client.app.state.echolabel["inbox"].wait_idle(30)


def store(client):
    return client.app.state.echolabel["runtime"].store


def setup_project(client):
    response = client.post(
        "/setup",
        json={
            "project": "7.1732000000",
            "schema": CONFIG,
            "hostname": "http://ls",
            "access_token": "x",
        },
    )
    assert response.status_code == 200
    return response.json()["model_version"]


def label_half(client, images):
    for i in range(6):
        annotate(client, 100 + i, images[f"dark_{i}"], "dark", 1000 + i)
        annotate(client, 200 + i, images[f"bright_{i}"], "bright", 2000 + i)
    wait(client)


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "UP" and body["store"] == "embedded"


def test_setup_answers_model_version_and_refuses_bad_configs(client):
    assert setup_project(client) == "echolabel-tiny-test-g1"
    bad = client.post("/setup", json={"project": "8.1", "schema": "<View></View>"})
    assert bad.status_code == 422 and "no <Image>" in bad.json()["detail"]
    bad = client.post(
        "/setup", json={"project": "8.1", "schema": '<View><Image name="i" value="$i"/></View>'}
    )
    assert bad.status_code == 422 and "no <Choices>" in bad.json()["detail"]


def test_learns_from_webhooks_and_predicts_in_label_studio_shape(client, images):
    version = setup_project(client)
    label_half(client, images)
    assert store(client).count(7, labelled=True) == 12
    held_out = [
        task(300 + 10 * i + j, images[f"{name}_{i}"])
        for i in (7, 8, 9)
        for j, name in enumerate(("dark", "bright"))
    ]
    response = client.post(
        "/predict", json={"tasks": held_out, "project": "7.1", "label_config": CONFIG, "params": {}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == len(held_out)
    for sent, prediction in zip(held_out, body["results"], strict=True):
        expected = "dark" if "dark" in sent["data"]["image"] else "bright"
        organ = [r for r in prediction["result"] if r["from_name"] == "organ"]
        assert organ == [
            {
                "from_name": "organ",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [expected]},
                "score": organ[0]["score"],
            }
        ]
        assert prediction["model_version"] == version
        assert 0.5 <= prediction["score"] <= 1.0 or prediction["score"] == 0.0
    # No neighbour carries a plane label: that field is abstained and reported, not guessed.
    assert all(not any(r["from_name"] == "plane" for r in p["result"]) for p in body["results"])
    assert {a["task"] for a in body["abstained"]} == {t["id"] for t in held_out}
    assert all("no labelled neighbours" in a["fields"]["plane"] for a in body["abstained"])


def test_prediction_never_counts_the_task_itself(client, images):
    setup_project(client)
    label_half(client, images)
    body = client.post(
        "/predict", json={"tasks": [task(100, images["dark_0"])], "project": 7}
    ).json()
    model = client.app.state.echolabel["runtime"]
    neighbours = model.store.nearest(7, model.store.vectors(7, [100])[100], 10, exclude=[100])
    assert 100 not in [n.task for n in neighbours]
    assert body["results"][0]["result"][0]["value"]["choices"] == ["dark"]


def test_newest_annotation_wins_and_deletion_clears(client, images):
    setup_project(client)
    annotate(client, 1, images["dark_0"], "bright", 11, "2026-01-02T00:00:00Z")
    annotate(
        client, 1, images["dark_0"], "dark", 10, "2026-01-01T00:00:00Z", action="ANNOTATION_UPDATED"
    )
    wait(client)
    points = list(store(client).iter_points(7))
    assert len(points) == 1 and points[0].labels == {"organ": "bright"}
    client.post(
        "/webhook",
        json={"action": "ANNOTATIONS_DELETED", "project": {"id": 7}, "annotations": [{"id": 11}]},
    )
    wait(client)
    assert store(client).count(7, labelled=True) == 0
    assert store(client).count(7) == 1  # the vector stays; only labels go


def test_retried_webhook_creates_no_duplicate(client, images):
    setup_project(client)
    for _ in range(3):
        annotate(client, 1, images["dark_0"], "dark", 10)
    wait(client)
    assert store(client).count(7) == 1


def test_one_bad_image_in_a_batch_fails_only_its_task(client, images, settings):
    setup_project(client)
    bad = settings.local_files_root / "bad.png"
    bad.write_bytes(b"not an image")
    response = client.post(
        "/predict",
        json={
            "project": 7,
            "tasks": [task(1, images["dark_0"]), task(2, str(bad)), task(3, images["bright_0"])],
        },
    )
    body = response.json()
    assert response.status_code == 200 and len(body["results"]) == 3
    # [] is Label Studio's "no prediction for this task": it will ask again later.
    assert body["results"][1] == []
    assert body["results"][0]["model_version"] == body["model_version"]
    assert body["errors"] == [
        {"task": 2, "error": "not_an_image", "detail": body["errors"][0]["detail"]}
    ]
    assert store(client).count(7) == 2


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"tasks": "x", "project": 7}', 422, "non-empty list"),
        (b'{"tasks": [{"data": {"image": "/x.png"}}], "project": 7}', 422, "valid `id`"),
        (b'{"tasks": [{"id": 1, "data": {"img": "/x.png"}}], "project": 7}', 422, "data.image"),
        (
            b'{"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "project": 99}',
            422,
            "no label config",
        ),
        (b'{"tasks": [{"id": 1, "data": {"image": "ftp://h/x.png"}}], "project": 7}', 403, "ftp"),
    ],
)
def test_malformed_requests(client, body, status, text):
    setup_project(client)
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert text in response.json()["detail"]
    assert store(client).count(7) == 0


def test_webhook_validation(client):
    assert client.post("/webhook", content=b"{oops").status_code == 400
    assert client.post("/webhook", json={"project": {"id": 7}}).status_code == 422
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert ignored.json() == {"status": "ignored", "action": "PROJECT_UPDATED"}
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 422


def test_failed_webhook_is_kept_with_its_reason(client):
    setup_project(client)
    client.post(
        "/webhook",
        json={
            "action": "ANNOTATION_CREATED",
            "project": {"id": 7},
            "annotation": {"id": 5, "task": 1, "result": []},
        },
    )
    wait(client)
    inbox = client.app.state.echolabel["inbox"]
    assert len(inbox.failed()) == 1
    reason = next(inbox.failed_dir.glob("*.error.txt")).read_text()
    assert "not embedded yet" in reason
    assert client.get("/health").json()["webhooks_failed"] == 1


def test_webhooks_left_on_disk_are_replayed_at_start(settings, images):
    with TestClient(create_app(settings)) as first:
        setup_project(first)
        inbox = first.app.state.echolabel["inbox"]
        inbox.stop()  # as if the process died before handling it
        annotate(first, 1, images["dark_0"], "dark", 10)
        assert len(inbox.pending()) == 1
    with TestClient(create_app(settings)) as second:
        wait(second)
        assert store(second).count(7, labelled=True) == 1


def test_basic_auth(settings):
    secured = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")
    with TestClient(create_app(secured)) as client:
        assert client.get("/health").status_code == 401
        token = base64.b64encode(b"ls:wrong").decode()
        assert client.get("/health", headers={"Authorization": f"Basic {token}"}).status_code == 401
        token = base64.b64encode(b"ls:s3cret").decode()
        assert client.get("/health", headers={"Authorization": f"Basic {token}"}).status_code == 200
        refused = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})
        assert refused.status_code == 401
        assert "Settings → Webhooks" in refused.json()["detail"]
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="echolabel"'


def test_basic_auth_password_as_label_studio_encodes_it(settings):
    """Label Studio (requests) encodes non-ASCII credentials as latin-1, browsers as UTF-8."""
    secured = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="sécret")
    with TestClient(create_app(secured)) as client:
        for raw in ("ls:sécret".encode("latin-1"), "ls:sécret".encode()):
            header = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
            assert client.get("/health", headers=header).status_code == 200
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
        assert client.get("/health", headers=wrong).status_code == 401


def test_body_size_limit(client, monkeypatch):
    import backend.app

    monkeypatch.setattr(backend.app, "MAX_BODY_BYTES", 100)
    response = client.post("/predict", content=b"{" + b" " * 200 + b"}")
    assert response.status_code == 413


def test_bulk_annotations_created_matches_each_annotation_to_its_task(client, images):
    setup_project(client)
    result = [
        {
            "from_name": "organ",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["dark"]},
        }
    ]
    body = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 7},
        "task": [task(1, images["dark_0"]), task(2, images["dark_1"])],
        "annotation": [
            {"id": 21, "task": 2, "result": result, "updated_at": "2026-01-01T00:00:00Z"},
            {"id": 11, "task": 1, "result": result, "updated_at": "2026-01-01T00:00:00Z"},
        ],
    }
    assert client.post("/webhook", json=body).status_code == 200
    wait(client)
    points = {p.task: p for p in store(client).iter_points(7)}
    assert set(points) == {1, 2}
    assert points[1].image == images["dark_0"] and points[2].image == images["dark_1"]
    assert points[1].annotation.id == "11"


def test_tasks_created_pre_embeds_imported_tasks(client, images):
    setup_project(client)
    body = {
        "action": "TASKS_CREATED",
        "project": {"id": 7},
        "tasks": [
            task(1, images["dark_0"]),
            task(2, images["bright_0"]),
            {"id": 3, "data": {"other": "no image"}},
        ],
    }
    assert client.post("/webhook", json=body).json()["status"] == "queued"
    wait(client)
    assert store(client).count(7) == 2 and store(client).count(7, labelled=True) == 0


def test_a_prediction_reads_the_collection_once_and_parses_a_known_config_once(
    client, images, monkeypatch
):
    """Per-request costs found by the profile (docs/performance.md §2): the collection's info
    is read once per /predict, and the config Label Studio resends is not parsed again."""
    import echolabel.core.projects

    setup_project(client)
    label_half(client, images)
    body = {"tasks": [task(300, images["dark_7"])], "project": 7, "label_config": CONFIG}
    assert client.post("/predict", json=body).status_code == 200  # embeds the task
    reads, parses = [], []
    live = store(client)
    monkeypatch.setattr(
        live, "collection", lambda project, real=live.collection: reads.append(1) or real(project)
    )
    parse = echolabel.core.projects.parse_label_config
    monkeypatch.setattr(
        echolabel.core.projects, "parse_label_config", lambda text: parses.append(1) or parse(text)
    )
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200 and answer.json()["results"][0]["result"]
    assert (len(reads), len(parses)) == (1, 0)
    changed = CONFIG.replace('<Choice value="b"/>', '<Choice value="b"/><Choice value="c"/>')
    assert client.post("/predict", json=body | {"label_config": changed}).status_code == 200
    assert len(parses) == 1


MULTI_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
<Choices name="findings" toName="image" choice="multiple">
<Choice value="shadow"/><Choice value="cyst"/><Choice value="mass"/><Choice value="calcification"/>
</Choices></View>"""


def test_multiple_choice_field_learns_every_choice_and_suggests_those_above_the_threshold(
    client, images, settings
):
    """A `choice="multiple"` field through the protocol: webhooks store every ticked choice,
    /predict suggests each choice whose weighted share among the top-k labelled
    neighbours reaches ECHOLABEL_MIN_SCORE (0.5 here), scored by the least certain choice's
    max(share, 1 - share). Expected shares are recomputed here from the store's neighbours."""
    response = client.post(
        "/setup", json={"project": "7.1", "schema": MULTI_CONFIG, "hostname": "http://ls"}
    )
    assert response.status_code == 200
    ticked = {}
    for i in range(6):
        # Dark images: shadow + cyst (sent out of config order); four of the six also
        # calcification, one also mass. Bright images: mass.
        ticked[100 + i] = ["cyst", "shadow"] + (["calcification"] if i < 4 else [])
        ticked[100 + i] += ["mass"] if i == 5 else []
        ticked[200 + i] = ["mass"]
        for task_id, name in ((100 + i, f"dark_{i}"), (200 + i, f"bright_{i}")):
            body = annotation_webhook(
                7, task(task_id, images[name]), {"organ": name.split("_")[0]}, task_id * 10
            )
            body["annotation"]["result"].append(
                {
                    "from_name": "findings",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ticked[task_id]},
                }
            )
            assert client.post("/webhook", json=body).status_code == 200
    wait(client)
    stored = {p.task: p.labels for p in store(client).iter_points(7)}
    assert stored[100] == {"organ": "dark", "findings": ["shadow", "cyst", "calcification"]}
    assert stored[104] == {"organ": "dark", "findings": ["shadow", "cyst"]}  # config order
    assert stored[105] == {"organ": "dark", "findings": ["shadow", "cyst", "mass"]}
    assert stored[200] == {"organ": "bright", "findings": ["mass"]}

    held_out = [task(300 + i, images[f"dark_{i}"]) for i in (7, 8, 9)] + [
        task(400 + i, images[f"bright_{i}"]) for i in (7, 8, 9)
    ]
    response = client.post(
        "/predict",
        json={"tasks": held_out, "project": "7.1", "label_config": MULTI_CONFIG, "params": {}},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    vectors = store(client).vectors(7, [t["id"] for t in held_out])
    for sent, prediction in zip(held_out, results, strict=True):
        neighbours = store(client).nearest(7, vectors[sent["id"]], settings.top_k, [sent["id"]])
        # Each neighbour weighs exp((s - s_max) / temperature): the nearest 1.
        nearest = max(n.similarity for n in neighbours)
        weight = {
            n.task: max(math.exp((n.similarity - nearest) / TEMPERATURE), 1e-6) for n in neighbours
        }
        total = sum(weight.values())
        shares = {
            choice: sum(weight[n.task] for n in neighbours if choice in n.labels["findings"])
            / total
            for choice in ("shadow", "cyst", "mass", "calcification")
        }
        expected = sorted((c for c, s in shares.items() if s >= 0.5), key=lambda c: (-shares[c], c))
        findings = [r for r in prediction["result"] if r["from_name"] == "findings"]
        assert findings == [
            {
                "from_name": "findings",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": expected},
                "score": round(min(max(s, 1 - s) for s in shares.values()), 4),
            }
        ]
        # What the images say: dark ones get their two common choices and calcification (4 of
        # 6 dark neighbours: a share between 0.5 and 1) but not mass (1 of 6: below the
        # threshold); bright ones get mass alone.
        if "dark" in sent["data"]["image"]:
            assert expected[:2] == ["cyst", "shadow"] and expected[2:] == ["calcification"]
            assert 0.5 <= shares["calcification"] < 1 and 0 < shares["mass"] < 0.5
        else:
            assert expected == ["mass"]
        # The single-choice field is voted as before, beside it.
        organ = [r for r in prediction["result"] if r["from_name"] == "organ"]
        assert organ[0]["value"]["choices"] == [sent["data"]["image"].split("/")[-1][:-6]]
        assert prediction["score"] == min(organ[0]["score"], findings[0]["score"])
