"""Bad input, end to end through the app: each case gets a clear, specific error, nothing that was
stored is lost, and /health still answers. docs/failure-modes.md is this table in prose.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import qdrant_edge as edge
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from echolabel.settings import Settings
from tests.fakes import KEY, FakeLabelStudio
from tests.helpers import annotation_webhook, dark_and_bright, png_bytes, serving
from tests.label_configs import DARK_BRIGHT_CONFIG

CONFIG = DARK_BRIGHT_CONFIG


@pytest.fixture(scope="module")
def fake_ls():
    with FakeLabelStudio().fetch_edge_cases() as server:
        yield server.url


@pytest.fixture
def hardened(settings, fake_ls):
    """The app against the fake Label Studio, with two labelled tasks already stored."""
    settings = dataclasses.replace(
        settings, label_studio_url=fake_ls, label_studio_api_key=KEY, fetch_timeout_s=0.3
    )
    images = dark_and_bright(settings.local_files_root, 1)
    with TestClient(create_app(settings)) as client:
        assert client.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 200
        for n, (name, label) in enumerate((("dark_0", "dark"), ("bright_0", "bright"))):
            task = {"id": n + 1, "data": {"image": images[name]}}
            body = annotation_webhook(7, task, {"organ": label}, 100 + n)
            assert client.post("/webhook", json=body).status_code == 200
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        yield client, settings


def write(settings: Settings, name: str, content: bytes | Callable[[Path], None]) -> str:
    path = settings.local_files_root / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return str(path)


def huge_png(path: Path) -> None:
    Image.new("1", (20_000, 20_000)).save(path)  # ~50 KB on disk, 400 Mpx decoded


BAD_IMAGES = [
    # (case, image reference or file content, HTTP status, reason)
    ("zero-byte file", b"", 422, "empty"),
    ("truncated PNG", png_bytes(40)[:60], 422, "corrupt"),
    (
        "corrupt: PNG signature, garbage after",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        422,
        "not_an_image",
    ),
    ("20000x20000 image (small file)", huge_png, 413, "too_many_pixels"),
    ("over the byte limit", b"x" * 300_000, 413, "too_large"),
    ("PDF instead of an image", b"%PDF-1.4 not an image", 422, "not_an_image"),
    ("HTML error page from Label Studio", "/login", 422, "not_an_image"),
    ("Label Studio answers 404", "/data/missing.png", 404, "not_found"),
    ("Label Studio answers 500", "/error", 502, "unreachable"),
    ("Label Studio times out", "/slow", 502, "unreachable"),
    ("host outside Label Studio", "http://example.org/a.png", 403, "forbidden"),
    ("other scheme", "file:///etc/passwd", 403, "forbidden"),
]


@pytest.mark.parametrize(
    ("content", "status", "reason"),
    [row[1:] for row in BAD_IMAGES],
    ids=[row[0] for row in BAD_IMAGES],
)
def test_bad_images_get_a_specific_error_and_lose_nothing(hardened, content, status, reason):
    client, settings = hardened
    ref = content if isinstance(content, str) else write(settings, "bad.png", content)
    task = {"id": 9, "data": {"image": ref}}
    response = client.post("/predict", json={"project": 7, "tasks": [task]})
    assert (response.status_code, response.json()["error"]) == (status, reason), response.text
    assert len(response.json()["detail"]) > 40  # says what was expected, found, and what to do
    assert_still_healthy(client)


def test_label_studio_refusing_our_token_is_named(settings, fake_ls):
    wrong = dataclasses.replace(settings, label_studio_url=fake_ls, label_studio_api_key="f" * 40)
    with TestClient(create_app(wrong)) as client:
        client.post("/setup", json={"project": "7.1", "schema": CONFIG})
        task = {"id": 9, "data": {"image": "/data/upload/1/a.png"}}
        response = client.post("/predict", json={"project": 7, "tasks": [task]})
        assert (response.status_code, response.json()["error"]) == (502, "unauthorized")
        assert "LABEL_STUDIO_API_KEY" in response.json()["detail"]
        assert client.get("/health").status_code == 200


def assert_still_healthy(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    store = client.app.state.echolabel["runtime"].store
    assert store.count(7, labelled=True) == 2, "a bad request must not lose stored labels"
    assert store.count(7) == 2, "nothing half-written for the bad task"


def test_image_declared_as_html_is_judged_by_its_bytes(hardened):
    client, _ = hardened
    task = {"id": 9, "data": {"image": "/mislabelled"}}
    response = client.post("/predict", json={"project": 7, "tasks": [task]})
    assert response.status_code == 200 and response.json()["results"][0]["result"]


def setup_body(config: str) -> bytes:
    return json.dumps({"project": "8.1", "schema": config}).encode()


CHOICES = '<Choices name="c" toName="a"><Choice value="x"/></Choices>'
BAD_REQUESTS = [
    # (case, path, body, HTTP status, reason)
    ("webhook body not JSON", "/webhook", b"{oops", 400, "malformed_json"),
    ("webhook body a list", "/webhook", b"[]", 422, "bad_request"),
    ("webhook without action", "/webhook", b'{"project": 7}', 422, "bad_request"),
    (
        "webhook without project",
        "/webhook",
        b'{"action": "ANNOTATION_CREATED"}',
        422,
        "bad_request",
    ),
    ("predict without tasks", "/predict", b'{"project": 7}', 422, "bad_request"),
    ("task without id", "/predict", b'{"project": 7, "tasks": [{"data": {}}]}', 422, "bad_task"),
    (
        "label config with two images",
        "/setup",
        setup_body(
            f'<View><Image name="a" value="$a"/><Image name="b" value="$b"/>{CHOICES}'
            '<Choices name="d" toName="b"><Choice value="y"/></Choices></View>'
        ),
        422,
        "bad_label_config",
    ),
    (
        "label config without an image",
        "/setup",
        setup_body(f'<View><Text name="a" value="$a"/>{CHOICES}</View>'),
        422,
        "bad_label_config",
    ),
    ("label config not XML", "/setup", setup_body("<View><Image"), 422, "bad_label_config"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [row[1:] for row in BAD_REQUESTS],
    ids=[row[0] for row in BAD_REQUESTS],
)
def test_bad_requests_get_a_specific_error_and_lose_nothing(hardened, path, body, status, reason):
    client, _ = hardened
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()["error"]) == (status, reason), response.text
    assert_still_healthy(client)


def test_unknown_webhook_actions_are_acknowledged_and_ignored(hardened):
    client, _ = hardened
    for action in ("PROJECT_UPDATED", "LABEL_LINK_CREATED", "SOMETHING_NEW_IN_2027"):
        response = client.post("/webhook", json={"action": action, "project": {"id": 7}})
        assert response.json() == {"status": "ignored", "action": action}
    assert_still_healthy(client)


def test_unicode_and_very_long_label_names_round_trip(settings):
    long_name = "Schnittebene – " + "ü" * 500
    labels = ["Ω-Lappen", "肝臓", long_name]
    config = (
        '<View><Image name="image" value="$image"/><Choices name="organ" toName="image">'
        + "".join(f'<Choice value="{label}"/>' for label in labels)
        + "</Choices></View>"
    )
    images = dark_and_bright(settings.local_files_root, 4)
    with TestClient(create_app(settings)) as client:
        assert client.post("/setup", json={"project": "5.1", "schema": config}).status_code == 200
        for i in range(3):
            task = {"id": i, "data": {"image": images[f"dark_{i}"]}}
            body = annotation_webhook(5, task, {"organ": long_name}, 50 + i)
            client.post("/webhook", json=body)
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        task = {"id": 9, "data": {"image": images["dark_3"]}}
        response = client.post("/predict", json={"project": 5, "tasks": [task]})
    (result,) = response.json()["results"][0]["result"]
    assert result["value"]["choices"] == [long_name]


def test_qdrant_server_down_is_a_503_and_webhooks_wait_for_it(settings):
    down = dataclasses.replace(settings, qdrant_url="http://127.0.0.1:9", job_retry_intervals=(60,))
    images = dark_and_bright(settings.local_files_root, 1)
    with TestClient(create_app(down)) as client:
        response = client.post("/setup", json={"project": "7.1", "schema": CONFIG})
        assert response.status_code == 503 and response.json()["error"] == "unavailable"
        assert "QDRANT_URL" in response.json()["detail"]
        task = {"id": 1, "data": {"image": images["dark_0"]}}
        response = client.post("/webhook", json=annotation_webhook(7, task, {"organ": "dark"}, 1))
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while client.get("/health").json()["webhooks_blocked_by"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = client.get("/health").json()
        # Kept first in line, not failed: it is handled once Qdrant answers again.
        assert health["webhooks_pending"] == 1 and health["webhooks_failed"] == 0
        assert "unreachable" in health["webhooks_blocked_by"]


def test_embedded_storage_locked_by_another_process_is_named(settings, monkeypatch, capsys):
    from echolabel.cli import main

    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("ECHOLABEL_ENCODER", settings.encoder)
    with TestClient(create_app(settings)) as client:
        assert main(["index", str(settings.local_files_root)]) == 1
        assert "locked by another process" in capsys.readouterr().err
        assert client.get("/health").status_code == 200


def test_concurrent_predictions_on_loopback(settings):
    """A bounded load test: 8 clients x 25 requests, no errors; latencies printed."""
    images = dark_and_bright(settings.local_files_root, 6)
    app = create_app(settings)
    clients, requests_each = 8, 25
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with serving(app) as url:
        with httpx.Client(base_url=url, timeout=30) as setup:
            setup.post("/setup", json={"project": "7.1", "schema": CONFIG}).raise_for_status()
            for i in range(4):
                for tone in ("dark", "bright"):
                    task = {"id": f"{tone}{i}", "data": {"image": images[f"{tone}_{i}"]}}
                    body = annotation_webhook(7, task, {"organ": tone}, f"{tone}-{i}")
                    setup.post("/webhook", json=body).raise_for_status()
        assert app.state.echolabel["inbox"].wait_idle(30)

        def run(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                for n in range(requests_each):
                    tone = ("dark", "bright")[(worker + n) % 2]
                    task = {"id": f"q{worker}-{n % 2}", "data": {"image": images[f"{tone}_5"]}}
                    start = time.perf_counter()
                    response = http.post("/predict", json={"project": 7, "tasks": [task]})
                    elapsed = time.perf_counter() - start
                    with lock:
                        latencies.append(elapsed)
                        if response.status_code != 200 or not response.json()["results"][0]:
                            errors.append(response.text)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
        for thread in threads:
            thread.start()
        health_start = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=30)
        health_s = time.perf_counter() - health_start
        for thread in threads:
            thread.join()
    assert errors == []
    assert health.status_code == 200
    assert len(latencies) == clients * requests_each
    q = statistics.quantiles(latencies, n=100)
    print(
        f"\nload: {clients} clients x {requests_each} /predict: p50 {q[49] * 1000:.1f} ms, "
        f"p95 {q[94] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"/health under load {health_s * 1000:.1f} ms"
    )


def test_secrets_and_image_bytes_stay_out_of_logs_and_payloads(settings, fake_ls, caplog):
    password = "basic-auth-secret-1234"
    secured = dataclasses.replace(
        settings,
        label_studio_url=fake_ls,
        label_studio_api_key=KEY,
        basic_auth_user="ls",
        basic_auth_pass=password,
    )
    auth = ("ls", password)
    caplog.set_level("DEBUG")
    images = dark_and_bright(settings.local_files_root, 2)
    with TestClient(create_app(secured)) as client:
        client.post("/setup", json={"project": "7.1", "schema": CONFIG}, auth=auth)
        for n in range(2):
            task = {"id": n, "data": {"image": images[f"dark_{n}"]}}
            body = annotation_webhook(7, task, {"organ": "dark"}, n)
            client.post("/webhook", json=body, auth=auth)
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        for ref in ("/data/upload/1/a.png", "/data/upload/401", "/error"):
            task = {"id": 9, "data": {"image": ref}}
            client.post("/predict", json={"project": 7, "tasks": [task]}, auth=auth)
        client.post("/predict", json={"project": 7, "tasks": []}, auth=("ls", "wrong"))
        # The payloads as the engine holds them (Qdrant Edge, the embedded default).
        store = client.app.state.echolabel["runtime"].store
        shard = store._shard(store.collection(7).name)
        records, _ = shard.scroll(edge.ScrollRequest(limit=100, with_payload=True))
        payloads = [record.payload for record in records]
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert any("webhook" in r.getMessage() or "HTTP" in r.getMessage() for r in caplog.records)
    assert KEY not in logged and password not in logged
    assert len(payloads) == 3, "the labelled tasks and the predicted one were stored"
    for payload in payloads:  # references and labels only: never image bytes
        for value in payload.values():
            assert not isinstance(value, bytes) and len(str(value)) < 500, payload
