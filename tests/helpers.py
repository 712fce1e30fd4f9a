"""Test helpers: tiny deterministic encoders, image, webhook and synthetic-vector builders, a
real worker and a uvicorn server on loopback, and the tests' real Label Studio (its install and
BUSI projects). Fixtures are in conftest.py, shared label configs in label_configs.py, the fake
Label Studio and image host in fakes.py.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from echolabel.encoders import available_encoders, register_encoder
from echolabel.settings import Settings
from tests.label_configs import ORGAN_FINDING_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _worker_redis_url(url: str) -> str:
    """The configured test database for the first pytest-xdist worker (gw0), the next ones
    for the others (gw1 on db + 1, modulo Redis's 16), so that no two workers flush each
    other's queues."""
    offset = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base, _, db = url.rpartition("/")
    return url if offset == 0 else f"{base}/{(int(db or 0) + offset) % 16}"


# A database of its own, flushed by each test that uses it.
REDIS_URL = _worker_redis_url(
    os.environ.get("ECHOLABEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
)
# The self-improving loop trains encoders in the background of a backend that runs long
# enough; only its own tests (test_retraining*.py) turn it on. Subprocesses inherit this.
os.environ.setdefault("ECHOLABEL_AUTO_RETRAIN", "0")
# Likewise the centring of a pretrained encoder (test_centred_encoder.py turns it on).
os.environ.setdefault("ECHOLABEL_AUTO_CENTRE", "0")
TINY_ENCODER = "tiny-test"
TINY_ENCODER_B = "tiny-test-b"


class TinyEncoder:
    """A centred grey thumbnail (side × side) as a vector: fast, deterministic, image-dependent.

    For protocol tests only; quality claims use the real encoders on real images.
    """

    name = TINY_ENCODER
    side = 4
    weights_id = "none"
    device = "cpu"

    @property
    def dim(self) -> int:
        return self.side * self.side

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        size = (self.side, self.side)
        rows = [
            np.asarray(im.convert("L").resize(size), dtype=np.float32).reshape(-1) / 255 - 0.5
            for im in images
        ]
        out = np.array(rows, dtype=np.float32).reshape(-1, self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)


class TinyEncoderB(TinyEncoder):
    """A second, different test encoder (8×8 thumbnail, 64-d) for re-embedding tests."""

    name = TINY_ENCODER_B
    side = 8
    weights_id = "none-b"


for _name, _factory in ((TINY_ENCODER, TinyEncoder), (TINY_ENCODER_B, TinyEncoderB)):
    if _name not in available_encoders():
        register_encoder(_name)(lambda weights_dir, device, batch_size, f=_factory: f())


def png_bytes(
    colour: int | tuple[int, int, int], size: tuple[int, int] = (32, 32), pattern: int = 0
) -> bytes:
    image = Image.new("RGB", size, colour)
    if pattern:  # a bright square whose place depends on `pattern`
        x = (pattern * 7) % (size[0] - 8)
        image.paste((255, 255, 255), (x, x, x + 8, x + 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def dark_and_bright(root: Path, count: int, size: tuple[int, int] = (32, 32)) -> dict[str, str]:
    """`count` dark and `count` bright PNGs under root, each with a distinct bright square."""
    paths = {}
    for i in range(count):
        for name, colour in (("dark", 20 + i), ("bright", 230 - i)):
            path = root / f"{name}_{i}.png"
            path.write_bytes(png_bytes((colour,) * 3, size=size, pattern=i + 1))
            paths[f"{name}_{i}"] = str(path)
    return paths


def dark_and_bright_tasks(
    root: Path, data: Callable[[int], dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Eight dark and eight bright Label Studio tasks over `dark_and_bright` images under
    root, the first three of each tone annotated with its tone as `organ`; `data(n)` adds
    keys to task n's data."""
    images = dark_and_bright(root, 8)
    tasks = []
    for n, name in enumerate(sorted(images)):
        tone, index = name.split("_")
        annotations = (
            [{"id": 100 + n, "result": choices_result({"organ": tone}), "updated_at": "2026"}]
            if int(index) < 3
            else []
        )
        extra = data(n) if data else {}
        tasks.append(
            {"id": n, "data": {"image": images[name], **extra}, "annotations": annotations}
        )
    return tasks


def annotation_webhook(
    project: int,
    task: dict,
    labels: dict[str, str],
    annotation_id: int,
    updated_at: str = "2026-11-25T00:00:00Z",
    action: str = "ANNOTATION_CREATED",
) -> dict:
    """The body Label Studio 1.23 posts for an annotation with these choices."""
    return {
        "action": action,
        "project": {"id": project},
        "task": task,
        "annotation": {
            "id": annotation_id,
            "task": task["id"],
            "updated_at": updated_at,
            "result": choices_result(labels),
        },
    }


def choices_result(labels: dict[str, str], to_name: str = "image") -> list[dict]:
    """An annotation's `result`: one choice per choices field, as Label Studio stores it."""
    return [
        {"from_name": field, "to_name": to_name, "type": "choices", "value": {"choices": [value]}}
        for field, value in labels.items()
    ]


def three_clusters(sizes=(30, 10, 5), spread=0.02, seed=0):
    """Tight clusters around three orthogonal directions (the first the largest)."""
    rng = np.random.default_rng(seed)
    rows, cluster = [], []
    for c, size in enumerate(sizes):
        centre = np.zeros(8)
        centre[c] = 1.0
        rows.append(centre + spread * rng.standard_normal((size, 8)))
        cluster += [c] * size
    return np.vstack(rows).astype(np.float32), np.array(cluster)


def overlapping_classes(seed: int = 7, per_class: int = 100, dim: int = 16):
    """Three Gaussian classes that overlap: the nearest neighbour agrees about 80 % of the
    time, like BUSI's findings with the default encoder."""
    rng = np.random.default_rng(seed)
    centres = 0.35 * rng.standard_normal((3, dim))
    truth = np.repeat(np.arange(3), per_class)
    x = centres[truth] + 0.5 * rng.standard_normal((len(truth), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"class{c}" for c in truth]


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    """`n` random L2-normalised float32 rows, as encoders return them."""
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def run_worker(settings: Settings, *queues: str, timeout: float = 240):
    """A real `echolabel worker --burst` process with the test's configuration."""
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or REDIS_URL,
        "MODEL_DIR": str(settings.model_dir),
        "ECHOLABEL_ENCODER": settings.encoder,
        "ECHOLABEL_BATCH_SIZE": str(settings.batch_size),
        "ECHOLABEL_LOCAL_FILES_ROOT": str(settings.local_files_root or ""),
        "ECHOLABEL_IMAGE_ALLOWED_HOSTS": ",".join(settings.image_allowed_hosts),
        "ECHOLABEL_JOB_RETRY_INTERVALS": ",".join(map(str, settings.job_retry_intervals)),
        "ECHOLABEL_MAX_IMAGE_BYTES": str(settings.max_image_bytes),
        "ECHOLABEL_WEIGHTS_DIR": str(settings.weights_dir or ""),
    }
    result = subprocess.run(
        [sys.executable, "-m", "echolabel.cli", "worker", "--burst", *queues],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@contextmanager
def serving(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on loopback in a thread; yields its base URL."""
    import uvicorn

    from echolabel.labelstudio_server import free_port

    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


LABEL_STUDIO_HOME = Path(os.environ.get("ECHOLABEL_TEST_LABEL_STUDIO", ROOT / ".label-studio"))


def label_studio_server(root: Path, **settings: str):
    """A Label Studio (not started) with its data and local files under `root`, from the
    tests' install; `settings` override its environment (e.g. SSRF_PROTECTION_ENABLED)."""
    from echolabel.labelstudio_server import LabelStudioServer, ensure_installed

    (root / "files").mkdir(parents=True)
    return LabelStudioServer(
        executable=ensure_installed(LABEL_STUDIO_HOME / "venv"),
        data_dir=root / "data",
        username="admin@example.com",
        password="echolabel-test-pass",
        token="5e1f0c4d2b3a49687766554433221100aabbccdd",
        local_files_root=root / "files",
        template_dir=LABEL_STUDIO_HOME / "template",
        extra_env=settings,
    )


def busi_subset(folder: Path, every: int = 13) -> Path:
    """A copy of every `every`-th BUSI image (all three findings) with a labels.csv of its own,
    for tests that must not touch ../shared/data (the demo reads the folder it is given)."""
    busi = SHARED_DATA / "busi"
    (folder / "images").mkdir(parents=True)
    with open(busi / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[::every]
    for row in rows:
        shutil.copyfile(busi / row["image"], folder / row["image"])
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "finding"])
        writer.writeheader()
        writer.writerows({"image": r["image"], "finding": r["finding"]} for r in rows)
    return folder


def busi_demo(folder: Path):
    """`echolabel demo` (its context manager) on a BUSI subset copied to `folder`, half of it
    annotated from the CSV, quietly, reusing the tests' Label Studio install."""
    from echolabel.demo import running_demo

    busi_subset(folder)
    return running_demo(
        folder,
        folder / "labels.csv",
        ["finding"],
        home=LABEL_STUDIO_HOME,
        annotate=0.5,
        say=lambda _: None,
    )


# -- a real Label Studio with BUSI's images (tests/test_labelstudio_e2e.py, test_doctor.py) --------

BUSI = SHARED_DATA / "busi"
BASIC_AUTH = ("labelstudio", "backend-secret-é")  # non-ASCII: Label Studio sends latin-1


def busi_rows() -> list[dict[str, str]]:
    with open(BUSI / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def serve_images(label_studio, rows: list[dict[str, str]], folder: str) -> Path:
    """Copy the images into Label Studio's local-files root (a temp dir, never the repo)."""
    target = label_studio.local_files_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copyfile(BUSI / row["image"], target / Path(row["image"]).name)
    return target


def annotate_rows(admin, ids: dict[str, int], rows: list[dict]) -> None:
    """Annotate these BUSI rows' tasks through Label Studio's API with their CSV labels."""
    for row in rows:
        labels = {"organ": row["organ"], "finding": row["finding"]}
        admin.annotate(ids[Path(row["image"]).name], choices_result(labels))


def predictions_by_task(admin, project: int, tasks) -> dict[int, list[dict]]:
    """The predictions of each of these tasks as `admin.predictions(task)` reads them, in one
    request for the whole project (the same list view and serializer, filtered by project): a
    read per task cost Label Studio ~65 ms each, up to 1,400 of them in one test."""
    by_task: dict[int, list[dict]] = {task: [] for task in tasks}
    for prediction in admin._get("/api/predictions/", task__project=project):
        if prediction["task"] in by_task:
            by_task[prediction["task"]].append(prediction)
    return by_task


def set_up_project(admin, label_studio, rows, folder: str, backend_url: str) -> dict[str, int]:
    """A project with our config and the images as tasks; the backend connected. Task ids by
    image name."""
    target = serve_images(label_studio, rows, folder)
    project = admin.create_project(f"echolabel e2e {folder}", ORGAN_FINDING_CONFIG)
    admin.add_local_storage(project, str(target))
    names = [Path(row["image"]).name for row in rows]
    ids = admin.import_tasks(
        project, [{"image": f"/data/local-files/?d={folder}/{name}"} for name in names]
    )
    admin.connect_backend(project, backend_url, "echolabel", basic_auth=BASIC_AUTH)
    # Without its webhook a connected backend shows "Connected" but never learns.
    assert admin.webhooks_to(project, backend_url), admin.webhooks(project)
    return {"project": project} | dict(zip(names, ids, strict=True))
