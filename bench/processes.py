"""Real echolabel processes for benches and tests: start, stop and kill a backend, read its store.

`bench/webhook_burst.py` and the crash tests (tests/test_crash_safety.py) drive the product the
way a deployment does: `echolabel serve` in a process of its own with MODEL_DIR in a temporary
directory, spoken to over HTTP, stopped with SIGTERM or killed with SIGKILL, and its embedded
store read back afterwards by this process (the store's lock died with its holder).

`cli` is the command line that runs echolabel's CLI; tests pass one that registers their tiny
encoders first (tests/echolabel_cli.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from echolabel.labelstudio_server import free_port as free_port  # the harness offers it
from vectorstore import CollectionInfo, Point

ROOT = Path(__file__).resolve().parents[1]
CLI: tuple[str, ...] = (sys.executable, "-m", "echolabel.cli")


def write_images(folder: Path, count: int, side: int = 48) -> list[str]:
    """Distinct small PNGs (seeded noise), so every task has its own vector."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"task_{i}.png"
        pixels = rng.integers(0, 255, size=(side, side), dtype=np.uint8)
        if not path.exists():
            Image.fromarray(pixels, "L").save(path)
        paths.append(str(path))
    return paths


def process_env(
    model_dir: Path,
    images: Path | None,
    redis_url: str | None,
    encoder: str,
    **extra: str,
) -> dict[str, str]:
    """This process's environment without any echolabel, Qdrant or Redis setting, plus these.

    The refresh timer and the self-improving loop are off: they would start jobs of their own
    in the middle of a measurement or a kill.
    """
    skip = ("ECHOLABEL_", "QDRANT_", "REDIS_URL", "LABEL_STUDIO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    if redis_url:
        env["REDIS_URL"] = redis_url
    if images is not None:
        env["ECHOLABEL_LOCAL_FILES_ROOT"] = str(images)
    env.update(
        MODEL_DIR=str(model_dir),
        ECHOLABEL_ENCODER=encoder,
        ECHOLABEL_JOB_RETRY_INTERVALS="1,2",
        ECHOLABEL_REFRESH_INTERVAL_S="0",
        ECHOLABEL_AUTO_RETRAIN="0",
    )
    env.update(extra)
    return env


def start_backend(
    env: dict[str, str],
    port: int,
    log: Path,
    cli: Sequence[str] = CLI,
    timeout_s: float = 120.0,
) -> subprocess.Popen[bytes]:
    """`echolabel serve` on 127.0.0.1:`port`, once it answers /health; output appended to
    `log`. Raises (naming the log) when it exits or stays silent for `timeout_s`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the backend did not answer /health within {timeout_s:.0f} s; see {log}")


def stop_backend(proc: subprocess.Popen[bytes], limit_s: float) -> float:
    """SIGTERM; seconds until it exited (SIGKILL after `limit_s` + 30, reported as inf)."""
    if proc.poll() is not None:
        return 0.0
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit_s + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return float("inf")
    return time.monotonic() - start


def kill(proc: subprocess.Popen[bytes]) -> None:
    """`kill -9`: no handler runs, nothing is flushed or closed by the process itself."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    """Poll `condition` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def webhook(
    project: int | str,
    action: str,
    task: int,
    image: str,
    labels: dict[str, str] | None,
    updated_at: str,
    annotation_id: int | None = None,
) -> dict[str, Any]:
    """A Label Studio annotation webhook for `task` (no `result` when `labels` is None)."""
    annotation: dict[str, Any] = {
        "id": 10_000 + task if annotation_id is None else annotation_id,
        "task": task,
        "updated_at": updated_at,
    }
    if labels is not None:
        annotation["result"] = [
            {
                "from_name": name,
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [value]},
            }
            for name, value in labels.items()
        ]
    return {
        "action": action,
        "project": {"id": project},
        "task": {"id": task, "data": {"image": image}},
        "annotation": annotation,
    }


class StoreContents:
    """What a stopped (or killed) backend left in its embedded store, read in one go."""

    def __init__(
        self,
        live: CollectionInfo | None,
        generations: list[CollectionInfo],
        points: dict[int, list[Point]],
    ) -> None:
        self.live = live
        self.generations = generations
        self.points = points  # generation number -> its points, vectors included

    def by_task(self, generation: int | None = None) -> dict[Any, Point]:
        """The points of a generation (default: the live one) by task."""
        number = self.live.generation if generation is None and self.live else generation
        return {p.task: p for p in self.points.get(number or 0, [])}

    def duplicates(self) -> dict[int, list[Any]]:
        """Per generation, the tasks that have more than one point (should be none)."""
        out = {}
        for number, points in self.points.items():
            tasks = [p.task for p in points]
            repeated = sorted({t for t in tasks if tasks.count(t) > 1}, key=str)
            if repeated:
                out[number] = repeated
        return out


@contextlib.contextmanager
def opened_store(model_dir: Path) -> Iterator[Any]:
    """The embedded store under `model_dir`, opened as the backend opens it."""
    from echolabel.core.runtime import open_configured_store
    from echolabel.settings import Settings

    store = open_configured_store(Settings(model_dir=model_dir))
    try:
        yield store
    finally:
        store.close()


def read_store(model_dir: Path, project: int | str) -> StoreContents:
    """Every generation of `project` in the store under `model_dir` (the backend must be gone)."""
    with opened_store(model_dir) as store:
        generations = store.generations(project)
        return StoreContents(
            store.collection(project),
            generations,
            {
                g.generation: list(store.iter_points(project, collection=g, with_vectors=True))
                for g in generations
            },
        )
