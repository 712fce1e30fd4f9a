"""One inference at a time per process, with concurrent callers merged into shared batches."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import numpy as np

from backend.app import create_app
from echolabel.encoders import available_encoders, register_encoder
from tests.helpers import TinyEncoder, annotation_webhook, dark_and_bright, serving
from tests.label_configs import DARK_BRIGHT_CONFIG

SLOW = "slow-test"


class SlowEncoder(TinyEncoder):
    """The tiny encoder, 50 ms per forward pass, counting passes running at the same time."""

    name = SLOW
    active = 0
    max_active = 0
    batch_sizes: list[int] = []  # noqa: RUF012 - shared across instances on purpose
    lock = threading.Lock()

    def embed(self, images):
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
            cls.batch_sizes.append(len(images))
        try:
            time.sleep(0.05)
            return super().embed(images)
        finally:
            with cls.lock:
                cls.active -= 1


if SLOW not in available_encoders():
    register_encoder(SLOW)(lambda weights_dir, device, batch_size: SlowEncoder())


def test_parallel_predictions_share_one_inference_at_a_time(settings):
    settings = dataclasses.replace(settings, encoder=SLOW, batch_size=16)
    images = dark_and_bright(settings.local_files_root, 12)
    config = DARK_BRIGHT_CONFIG
    app = create_app(settings)
    clients, each = 8, 4
    statuses: list[int] = []
    health_s: list[float] = []
    with serving(app) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            http.post("/setup", json={"project": "7.1", "schema": config}).raise_for_status()
            for i in range(4):
                for tone in ("dark", "bright"):
                    task = {"id": f"{tone}{i}", "data": {"image": images[f"{tone}_{i}"]}}
                    body = annotation_webhook(7, task, {"organ": tone}, f"{tone}-{i}")
                    http.post("/webhook", json=body).raise_for_status()
        assert app.state.echolabel["inbox"].wait_idle(30)
        embedder = app.state.echolabel["runtime"].embedder
        SlowEncoder.max_active, SlowEncoder.batch_sizes = 0, []
        before = embedder.inferences

        def predict(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for n in range(each):
                    # A task never seen before: every request needs an inference.
                    tone = ("dark", "bright")[(worker + n) % 2]
                    image = images[f"{tone}_{4 + (worker + n) % 8}"]
                    task = {"id": f"w{worker}-{n}", "data": {"image": image}}
                    response = http.post("/predict", json={"project": 7, "tasks": [task]})
                    statuses.append(response.status_code)

        threads = [threading.Thread(target=predict, args=(w,)) for w in range(clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            start = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            health_s.append(time.perf_counter() - start)
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        inferences = embedder.inferences - before
    assert statuses == [200] * (clients * each)
    assert SlowEncoder.max_active == 1, "never two forward passes at once"
    assert inferences < clients * each, "concurrent requests were merged into batches"
    assert max(SlowEncoder.batch_sizes) > 1
    print(
        f"\n{clients * each} /predict in {inferences} forward passes "
        f"(largest batch {max(SlowEncoder.batch_sizes)}); /health during load: "
        f"median {np.median(health_s) * 1000:.1f} ms, max {max(health_s) * 1000:.1f} ms"
    )
    assert max(health_s) < 1.0


def test_predict_answers_within_its_wait_and_embeds_the_rest_after(settings):
    """Retrieve Predictions on a big selection: what is stored is answered, never a 5xx."""
    from fastapi.testclient import TestClient

    settings = dataclasses.replace(settings, encoder=SLOW, batch_size=2, embed_wait_s=0.08)
    images = dark_and_bright(settings.local_files_root, 8)
    config = DARK_BRIGHT_CONFIG
    with TestClient(create_app(settings)) as client:
        client.post("/setup", json={"project": "7.1", "schema": config})
        for i in range(3):
            for tone in ("dark", "bright"):
                task = {"id": f"{tone}{i}", "data": {"image": images[f"{tone}_{i}"]}}
                client.post("/webhook", json=annotation_webhook(7, task, {"organ": tone}, i))
        assert client.app.state.echolabel["inbox"].wait_idle(30)
        tasks = [
            {"id": f"q{tone}{i}", "data": {"image": images[f"{tone}_{i}"]}}
            for i in range(3, 8)
            for tone in ("dark", "bright")
        ]
        first = client.post("/predict", json={"project": 7, "tasks": tasks})
        assert first.status_code == 200
        body = first.json()
        assert 0 < len(body["pending"]) < len(tasks)
        answered = [r for r in body["results"] if r]
        assert len(answered) == len(tasks) - len(body["pending"])
        assert client.app.state.echolabel["runtime"].backlog.wait_idle(30)
        second = client.post("/predict", json={"project": 7, "tasks": tasks}).json()
    assert second["pending"] == [] and all(second["results"])


def test_images_are_loaded_towards_the_encoders_resize_side(settings):
    """The embedder tells the loader the side the encoder resizes to (draft JPEG decoding)."""
    from PIL import Image

    from echolabel.embedding import Embedder, TaskImage

    class SidedEncoder(TinyEncoder):
        input_side = 96

    embedder = Embedder(weights_dir=None)
    embedder._encoders["sided"] = SidedEncoder()
    asked: list[int | None] = []

    def load(ref: str, *, min_side: int | None = None) -> Image.Image:
        asked.append(min_side)
        return Image.new("RGB", (32, 32))

    result = embedder.embed_tasks("sided", [TaskImage(1, "a"), TaskImage(2, "b")], load)
    assert len(result.points) == 2 and asked == [96, 96]
    embedder._encoders["plain"] = TinyEncoder()
    embedder.embed_tasks("plain", [TaskImage(3, "c")], load)
    assert asked[-1] is None
