"""`echolabel demo`: a real Label Studio with our backend connected, on a folder of images.

Installs Label Studio into its own venv on first use, starts it on loopback with the settings
the backend needs, serves the folder as local files (read only: nothing is written inside it),
imports the images as tasks, starts the backend on the embedded default and connects it (the
webhook verified), annotates a share of the tasks from the labels CSV, pre-annotates the rest,
and prints where to look. Every process it started is stopped on exit.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import httpx

from echolabel.folders import Item, read_folder
from echolabel.labelstudio import LabelStudioClient, LabelStudioError
from echolabel.labelstudio_server import LabelStudioServer, ensure_installed, free_port
from echolabel.settings import Settings

USER = "demo@echolabel.local"
SERVE = [sys.executable, "-m", "echolabel.cli", "serve"]


@dataclass
class Demo:
    label_studio: LabelStudioServer
    backend_url: str
    project: int
    tasks: int
    annotated: int
    password: str
    token: str
    backend_process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.label_studio.url}/projects/{self.project}/data"


def label_config(fields: Sequence[str], items: Sequence[Item], choices: Sequence[str] = ()) -> str:
    """One <Choices> per field, its classes read from the CSV; a field the CSV gives no class
    (no CSV: one field, `label` unless named) offers `choices`. And the <TextArea> that shows
    the link to each task's neighbour gallery."""
    controls = []
    for name in fields or ["label"]:
        values = sorted({item.labels[name] for item in items if item.labels.get(name)})
        values = values or list(dict.fromkeys(choices))
        if not values:
            raise ValueError(
                f"no classes for the field {name!r}: the labels CSV gives none, so name the "
                "classes to annotate with: --choices a,b,c"
            )
        options = "".join(f"<Choice value={quoteattr(v)}/>" for v in values)
        controls.append(
            f'  <Choices name={quoteattr(name)} toName="image" showInline="true">'
            f"{options}</Choices>"
        )
    # The link to each task's neighbour gallery (docs/review.md).
    gallery = (
        '  <TextArea name="neighbours" toName="image" editable="false" readonly="true"'
        ' maxSubmissions="1" rows="1"/>'
    )
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        + "\n".join([*controls, gallery])
        + "\n</View>"
    )


def pick_annotated(items: Sequence[Item], share: float, field: str | None, seed: int = 0) -> set:
    """A share of the labelled items, stratified by the first field."""
    rng = random.Random(seed)
    groups: dict[str, list[Item]] = {}
    for item in items:
        if field and item.labels.get(field):
            groups.setdefault(item.labels[field], []).append(item)
    picked = set()
    for members in groups.values():
        picked.update(i.task for i in rng.sample(members, round(len(members) * share)))
    return picked


@contextmanager
def running_demo(
    images: Path,
    labels: Path | None,
    fields: Sequence[str],
    *,
    home: Path,
    annotate: float = 0.2,
    choices: Sequence[str] = (),
    port: int | None = None,
    say: Callable[[str], None] = print,
) -> Iterator[Demo]:
    images = images.resolve()
    items = read_folder(images, labels, fields=tuple(fields))
    if not items:
        raise ValueError(f"{images} holds no images")
    config = label_config(fields, items, choices)  # refuses before anything starts
    executable = ensure_installed(home / "venv", say=say)
    password, token = secrets.token_urlsafe(12), secrets.token_hex(20)
    run_dir = home / "runs" / time.strftime("%Y%m%dT%H%M%S")
    server = LabelStudioServer(
        executable=executable,
        data_dir=run_dir / "label-studio",
        username=USER,
        password=password,
        token=token,
        # Label Studio serves files under a strict subfolder of its document root.
        local_files_root=images.parent,
        port=port or free_port(),
        template_dir=home / "template",
    )
    say("starting Label Studio (the first start migrates its database: ~30 s)")
    server.start()
    backend: subprocess.Popen[bytes] | None = None
    try:
        backend_port = free_port()
        backend_url = f"http://127.0.0.1:{backend_port}"
        env = {
            **os.environ,
            "MODEL_DIR": str(run_dir / "model"),
            "LABEL_STUDIO_URL": server.url,
            "LABEL_STUDIO_API_KEY": token,
            "ECHOLABEL_LOCAL_FILES_ROOT": str(images.parent),
            "ECHOLABEL_PUBLIC_URL": backend_url,  # gallery links in the predictions
        }
        for name in ("REDIS_URL", "QDRANT_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
            env.pop(name, None)  # the embedded default
        say(f"starting the backend on {backend_url}")
        with (run_dir / "backend.log").open("ab") as log:
            backend = subprocess.Popen(
                [*SERVE, "--host", "127.0.0.1", "--port", str(backend_port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for(f"{backend_url}/health", backend, run_dir / "backend.log")
        demo = _set_up(server, backend_url, images, items, fields, config, annotate, say)
        demo.password, demo.token, demo.backend_process = password, token, backend
        yield demo
    finally:
        if backend is not None and backend.poll() is None:
            backend.terminate()
            try:
                backend.wait(30)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait()
        server.stop()


def _set_up(
    server: LabelStudioServer,
    backend_url: str,
    images: Path,
    items: Sequence[Item],
    fields: Sequence[str],
    config: str,
    annotate: float,
    say: Callable[[str], None],
) -> Demo:
    client = LabelStudioClient(
        Settings(label_studio_url=server.url, label_studio_api_key=server.token)
    )
    try:
        project = client.create_project(f"echolabel demo: {images.name}", config)
        client.add_local_storage(project, str(images))
        refs = [f"/data/local-files/?d={images.name}/{item.task}" for item in items]
        say(f"importing {len(items)} images")
        ids = client.import_tasks(project, [{"image": ref} for ref in refs])
        if not client.connect(project, backend_url, "echolabel").webhook:
            raise LabelStudioError("Label Studio created no webhook for the backend")
        chosen = pick_annotated(items, annotate, fields[0] if fields else None)
        say(f"annotating {len(chosen)} tasks from the labels CSV")
        for task_id, item in zip(ids, items, strict=True):
            if item.task in chosen:
                client.annotate(
                    task_id,
                    [
                        {
                            "from_name": name,
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [item.labels[name]]},
                        }
                        for name in fields
                        if item.labels.get(name)
                    ],
                )
        _learned(backend_url)
        if chosen:
            say("pre-annotating the other tasks")
            started = httpx.post(f"{backend_url}/projects/{project}/preannotate", timeout=30)
            _job_done(backend_url, started.raise_for_status().json()["job"])
        return Demo(server, backend_url, project, len(ids), len(chosen), "", "")
    finally:
        client.close()


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the backend exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the backend did not answer {url}; see {log}")


def _learned(backend_url: str, timeout: float = 900) -> None:
    """Wait until the backend has applied every webhook Label Studio sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{backend_url}/health", timeout=10).json()
        if health["webhooks_pending"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the backend did not apply the annotations in time")


def _job_done(backend_url: str, job_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{backend_url}/jobs", timeout=10).json()["jobs"]
        job = next((j for j in jobs if j["id"] == job_id), None)
        if job is not None and job["status"] in ("finished", "failed"):
            if job["status"] == "failed":
                raise RuntimeError(f"{job_id} failed: {job['error']}")
            return job
        time.sleep(0.5)
    raise RuntimeError(f"{job_id} did not finish in time")
