"""Crash safety of the embedded store (issue 19, point 7): `kill -9` a real backend mid-write.

Each test runs `echolabel serve` as a process of its own with the embedded default (Qdrant Edge,
no Redis, no Qdrant server; bench/processes.py), lets it start a long write, and kills it with
SIGKILL at a point the test controls: a fake service it depends on (the image host, the fake
Label Studio) answers a set number of requests, then holds the next one unanswered, and the
kill comes while it is held. The test then reads the store the backend left behind, starts the
backend again on the same MODEL_DIR, and checks:

- every acknowledged label is in the store, and no task has two points;
- a half-written generation never becomes live, and the re-embedding resumes and completes
  without redoing the batches already written;
- every pushed prediction equals a fresh vote, one per task.

The webhook-burst kill is tests/test_webhook_burst.py. The tiny test encoders keep a backend's
start to seconds (tests/echolabel_cli.py).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.processes import (
    free_port,
    kill,
    process_env,
    read_store,
    start_backend,
    stop_backend,
    wait_for,
    webhook,
)
from tests.echolabel_cli import TEST_CLI
from tests.fakes import KEY, FakeImageHost, FakeLabelStudio, image_reply
from tests.helpers import TINY_ENCODER, TINY_ENCODER_B, TinyEncoder, TinyEncoderB

pytestmark = pytest.mark.slow

PROJECT = 7
KINDS = ("across", "down", "back")
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="organ" toName="image">'
    + "".join(f'<Choice value="{kind}"/>' for kind in KINDS)
    + "</Choices></View>"
)
CREATED_AT = "2026-12-01T00:00:00Z"
UPDATED_AT = "2026-12-01T00:05:00Z"
BATCH = 8


def kind(task: int) -> str:
    return KINDS[task % len(KINDS)]


def png(task: int, side: int = 32) -> bytes:
    """A noisy ramp whose direction is the task's kind: near neighbours share a kind."""
    ramp = np.linspace(0.0, 1.0, side)
    across, down = np.meshgrid(ramp, ramp)
    base = {"across": across, "down": down, "back": 1.0 - across}[kind(task)]
    noisy = base + 0.15 * np.random.default_rng(task).standard_normal((side, side))
    out = io.BytesIO()
    Image.fromarray((noisy.clip(0, 1) * 255).astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def expected_vectors(encoder: TinyEncoder, tasks: list[int]) -> dict[int, np.ndarray]:
    """What the backend must have stored for these tasks: the encoder on the decoded image."""
    images = [Image.open(io.BytesIO(png(t))).convert("RGB") for t in tasks]
    return dict(zip(tasks, encoder.embed(images), strict=True))


class Backend:
    """`echolabel serve` on one port and one MODEL_DIR, started again after each kill."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.model_dir = work / "model"
        self.env = process_env(self.model_dir, None, None, TINY_ENCODER, **env)
        self.port = free_port()
        self.log = work / "backend.log"
        self.proc: Any = None
        self.client: httpx.Client | None = None

    def start(self) -> httpx.Client:
        self.proc = start_backend(self.env, self.port, self.log, cli=TEST_CLI)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        return self.client

    def kill(self) -> None:
        kill(self.proc)
        self._close_client()

    def stop(self) -> None:
        if self.proc is not None:
            stop_backend(self.proc, 10.0)
        self._close_client()

    def _close_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Any]:
    made: list[Backend] = []

    def make(**env: str) -> Backend:
        made.append(Backend(tmp_path, env))
        return made[-1]

    yield make
    for started in made:
        started.stop()


@contextlib.contextmanager
def served_images(
    backend: Callable[..., Backend], tasks: int, **env: str
) -> Iterator[tuple[FakeImageHost, Callable[[int], str], Backend, httpx.Client]]:
    """An image host with the tasks' images, and a backend that fetches them in batches of
    BATCH, started with the project set up: the host, each task's image URL, the backend and
    its client."""
    routes = {f"/img/{t}.png": image_reply(png(t)) for t in range(tasks)}
    with FakeImageHost(routes) as host:
        server = backend(
            ECHOLABEL_IMAGE_ALLOWED_HOSTS="127.0.0.1",
            ECHOLABEL_BATCH_SIZE=str(BATCH),
            ECHOLABEL_FETCH_TIMEOUT_S="120",
            **env,
        )
        client = server.start()
        client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
        yield host, lambda t: f"{host.url}/img/{t}.png", server, client


def annotate(client: httpx.Client, action: str, task: int, image: str, organ: str | None) -> None:
    """Send one annotation webhook; the backend must acknowledge it (it is then ours to keep)."""
    labels = None if organ is None else {"organ": organ}
    when = CREATED_AT if action == "ANNOTATION_CREATED" else UPDATED_AT
    answer = client.post("/webhook", json=webhook(PROJECT, action, task, image, labels, when))
    assert answer.status_code == 200 and answer.json()["status"] == "queued", answer.text


def inbox_done(client: httpx.Client) -> bool:
    health = client.get("/health").json()
    assert health["webhooks_failed"] == 0, health
    return health["webhooks_pending"] == 0


def stored(client: httpx.Client) -> int:
    """Points the backend says its store holds for the project (0 before the first)."""
    rows = [r for r in client.get("/admin/projects").json()["projects"] if r["project"] == PROJECT]
    return int(rows[0].get("points", 0)) if rows else 0


def job(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    listed = [j for j in client.get("/jobs").json()["jobs"] if j["id"] == job_id]
    return listed[0] if listed else None


def finished(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    found = job(client, job_id)
    if found is not None and found["status"] == "failed":
        raise AssertionError(f"{job_id} failed: {found['error']}")
    return found if found is not None and found["status"] == "finished" else None


def start_reembed(client: httpx.Client, encoder: str) -> None:
    """The admin page's "Re-embed" form, as a browser posts it."""
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/admin").text)
    assert token is not None
    answer = client.post(
        f"/admin/projects/{PROJECT}/reembed",
        data={"csrf": token.group(1), "encoder": encoder},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text


def predict(client: httpx.Client, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    answer = client.post("/predict", json={"tasks": tasks, "project": PROJECT})
    assert answer.status_code == 200, answer.text
    return answer.json()


def organs(points: dict[Any, Any]) -> dict[Any, str | None]:
    return {task: point.labels.get("organ") for task, point in points.items()}


def test_kill_during_a_bulk_upsert_keeps_every_acknowledged_label(backend):
    """Label Studio's "Retrieve Predictions" on 80 new tasks: the backend embeds and upserts
    them batch by batch while annotation webhooks arrive; killed after some batches."""
    tasks, first = 96, 16
    with served_images(backend, tasks, ECHOLABEL_EMBED_WAIT_S="100") as started:
        host, image, server, client = started
        expected: dict[int, str | None] = {}  # every acknowledged webhook's outcome
        for t in range(first):
            annotate(client, "ANNOTATION_CREATED", t, image(t), kind(t))
            expected[t] = kind(t)
        wait_for(lambda: inbox_done(client), 60, "the first annotations applied")

        host.hold("/img/", after=40)  # five batches of the bulk upsert, then it waits
        bulk = [{"id": t, "data": {"image": image(t)}} for t in range(first, tasks)]

        def retrieve_predictions() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the backend dies under it
                predict(client, bulk)

        retrieving = threading.Thread(target=retrieve_predictions)
        retrieving.start()
        wait_for(lambda: stored(client) >= first + BATCH, 60, "a first batch upserted")
        # While the bulk upsert runs: labels for tasks it is embedding, changes to older ones.
        for t in range(first, first + 16):
            annotate(client, "ANNOTATION_CREATED", t, image(t), kind(t))
            expected[t] = kind(t)
        for t in range(4):
            annotate(client, "ANNOTATION_UPDATED", t, image(t), kind(t + 1))
            expected[t] = kind(t + 1)
        for t in range(4, 6):
            annotate(client, "ANNOTATION_DELETED", t, image(t), None)
            expected[t] = None
        wait_for(lambda: host.held, 60, "the bulk upsert waiting for an image")
        acknowledged_points = stored(client)
        server.kill()
        host.release()
        assert acknowledged_points < tasks, "the kill came after the bulk upsert had finished"

        left = read_store(server.model_dir, PROJECT)
        assert left.duplicates() == {}
        assert left.live is not None and left.live.generation == 1
        assert len(left.by_task()) >= acknowledged_points  # what it reported, it had written

        client = server.start()
        wait_for(lambda: inbox_done(client), 60, "the inbox replayed after the restart")
        again = predict(client, bulk)  # Label Studio asks again for tasks it got nothing for
        assert again["pending"] == [] and again["errors"] == [], again
        server.stop()

    after = read_store(server.model_dir, PROJECT)
    assert after.duplicates() == {}
    points = after.by_task()
    assert sorted(points) == list(range(tasks))
    assert {t: organ for t, organ in organs(points).items() if t in expected} == expected
    assert not any(points[t].labelled for t in range(tasks) if t not in expected)
    want = expected_vectors(TinyEncoder(), list(range(tasks)))
    for t, point in points.items():
        np.testing.assert_allclose(point.vector, want[t], atol=1e-5, err_msg=f"task {t}")


def test_kill_during_a_reembedding_never_makes_the_half_built_generation_live(backend):
    tasks, before_kill = 48, 2 * BATCH
    with served_images(backend, tasks) as (host, image, server, client):
        expected = {t: kind(t) for t in range(tasks)}
        for t in range(tasks):
            annotate(client, "ANNOTATION_CREATED", t, image(t), kind(t))
        wait_for(lambda: inbox_done(client), 60, "the annotations applied")

        host.hold("/img/", after=before_kill)
        start_reembed(client, TINY_ENCODER_B)
        wait_for(lambda: host.held, 60, "the re-embedding waiting for an image")
        progress = job(client, f"reembed-{PROJECT}")
        assert progress is not None and progress["progress"]["done"] == before_kill, progress
        # Labels change while it runs: they reach the live generation and the one being built.
        for t in range(4):
            annotate(client, "ANNOTATION_UPDATED", t, image(t), kind(t + 1))
            expected[t] = kind(t + 1)
        wait_for(lambda: inbox_done(client), 60, "the label changes applied")
        server.kill()
        host.release()

        left = read_store(server.model_dir, PROJECT)
        assert left.duplicates() == {}
        assert left.live is not None
        assert (left.live.generation, left.live.encoder) == (1, TINY_ENCODER)
        assert [(g.generation, g.encoder) for g in left.generations] == [
            (1, TINY_ENCODER),
            (2, TINY_ENCODER_B),
        ]
        assert organs(left.by_task(1)) == expected
        half = left.by_task(2)
        assert len(half) == before_kill
        assert organs(half) == {t: expected[t] for t in half}

        host.hold("/img/", after=0)  # the resumed re-embedding waits for its first image
        client = server.start()
        resumed = wait_for(lambda: job(client, f"reembed-{PROJECT}"), 30, "a resumed job")
        assert "resumed after a restart" in resumed["description"], resumed
        wait_for(lambda: host.held, 60, "the resumed re-embedding waiting for an image")
        # Until the new generation is complete, predictions come from the old one.
        answer = predict(client, [{"id": 0, "data": {"image": image(0)}}])
        assert answer["model_version"] == f"echolabel-{TINY_ENCODER}-g1"
        host.release()
        done = wait_for(lambda: finished(client, f"reembed-{PROJECT}"), 60, "the re-embedding")
        assert done["result"]["skipped"] == before_kill  # resumed: written batches not redone
        assert (done["result"]["done"], done["result"]["stage"]) == (tasks, "switched")
        answer = predict(client, [{"id": 0, "data": {"image": image(0)}}])
        assert answer["model_version"] == f"echolabel-{TINY_ENCODER_B}-g2"
        server.stop()

    after = read_store(server.model_dir, PROJECT)
    assert after.duplicates() == {}
    assert after.live is not None
    assert [(g.generation, g.encoder) for g in after.generations] == [(2, TINY_ENCODER_B)]
    points = after.by_task()
    assert organs(points) == expected
    want = expected_vectors(TinyEncoderB(), list(range(tasks)))
    for t, point in points.items():
        np.testing.assert_allclose(point.vector, want[t], atol=1e-5, err_msg=f"task {t}")


def choices(organ: str) -> list[dict[str, Any]]:
    return [
        {"from_name": "organ", "to_name": "image", "type": "choices", "value": {"choices": [organ]}}
    ]


def test_kill_during_a_push_leaves_every_prediction_equal_to_a_fresh_vote(tmp_path, backend):
    """Predictions are pushed once; labels change; the second push writes 200 predictions a
    request, Label Studio applies its second request and the backend dies before it hears
    the answer. The restart resumes the push by itself."""
    labelled, unlabelled, relabelled = 30, 450, range(31, 37)
    images = tmp_path / "images"
    images.mkdir()
    ls_tasks = []
    for t in range(1, labelled + unlabelled + 1):
        path = images / f"{t}.png"
        path.write_bytes(png(t))
        task: dict[str, Any] = {"id": t, "data": {"image": str(path)}, "project": PROJECT}
        if t <= labelled:
            task["annotations"] = [
                {"id": 5000 + t, "updated_at": CREATED_AT, "result": choices(kind(t))}
            ]
        ls_tasks.append(task)
    with FakeLabelStudio(ls_tasks, CONFIG, project=PROJECT) as label_studio:
        server = backend(
            LABEL_STUDIO_URL=label_studio.url,
            LABEL_STUDIO_API_KEY=KEY,
            ECHOLABEL_LOCAL_FILES_ROOT=str(images),
            ECHOLABEL_FETCH_TIMEOUT_S="120",
        )
        client = server.start()
        client.post(f"/projects/{PROJECT}/preannotate").raise_for_status()
        first = wait_for(lambda: finished(client, f"preannotate-{PROJECT}"), 60, "the push")
        published = first["result"]["model_version"]
        # Annotators label a few tasks (Label Studio holds the annotation, we get the webhook),
        # against their kind, so that the votes around them change.
        for t in relabelled:
            with label_studio.state:
                label_studio.tasks_by_id[t]["annotations"] = [
                    {"id": 5000 + t, "updated_at": UPDATED_AT, "result": choices(kind(t + 1))}
                ]
            annotate(client, "ANNOTATION_CREATED", t, str(images / f"{t}.png"), kind(t + 1))
        wait_for(lambda: inbox_done(client), 60, "the annotations applied")

        label_studio.hold(f"/api/projects/{PROJECT}/import/predictions", after=1)
        client.post(f"/projects/{PROJECT}/preannotate").raise_for_status()
        wait_for(lambda: label_studio.held, 60, "the second push's second write")
        with label_studio.state:
            written = label_studio.model_versions(PROJECT)
        server.kill()
        label_studio.release()
        (version,) = set(written) - {published}
        assert 0 < written[version] < unlabelled

        left = read_store(server.model_dir, PROJECT)
        assert left.duplicates() == {}
        assert left.live is not None and left.live.published_version == published
        assert len(left.by_task()) == labelled + unlabelled
        assert sum(p.labelled for p in left.by_task().values()) == labelled + len(relabelled)

        client = server.start()
        done = wait_for(lambda: finished(client, f"preannotate-{PROJECT}"), 60, "the resumed push")
        assert "resumed after a restart" in done["description"]
        result = done["result"]
        assert result["model_version"] == version
        assert result["already_current"] == written[version]  # nothing written twice
        assert (result["failed"], result["deleted_stale_predictions"]) == (0, written[published])

        open_tasks = [t for t in ls_tasks if not t.get("annotations")]
        fresh = predict(client, [{"id": t["id"], "data": t["data"]} for t in open_tasks])
        server.stop()
        with label_studio.state:
            held = {t["id"]: label_studio.predictions(t["id"]) for t in ls_tasks}

    assert read_store(server.model_dir, PROJECT).live.published_version == version
    mismatched = []
    for task, vote in zip([t["id"] for t in open_tasks], fresh["results"], strict=True):
        pushed = [(p["model_version"], p["result"], p["score"]) for p in held[task]]
        want = [(version, vote["result"], vote["score"])] if vote["result"] else []
        if pushed != want:
            mismatched.append((task, pushed, want))
    assert mismatched == []
    assert all(held[t["id"]] == [] for t in ls_tasks if t.get("annotations"))
    assert sum(len(held[t["id"]]) for t in open_tasks) > len(open_tasks) // 2  # votes, mostly
