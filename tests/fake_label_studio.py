"""Fake Label Studios: an HTTP one for image fetching (tokens, redirects, oversize and bad
bodies), and an in-memory API for the prediction push.

Serves `PNG` under /data/upload/ to the legacy token `KEY` only, and one path per failure mode
(see `Handler.do_GET`). Records (host, path, Authorization) of every request in `seen`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from echolabel.labelstudio import LabelStudioUnavailable

KEY = "0123456789abcdef0123456789abcdef01234567"
MAX_BYTES = 100_000


def _gradient_png(size: tuple[int, int] = (16, 8)) -> bytes:
    ramp = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    out = io.BytesIO()
    Image.fromarray(ramp).convert("RGB").save(out, "PNG")
    return out.getvalue()


PNG = _gradient_png()


class Handler(BaseHTTPRequestHandler):
    server: FakeLabelStudio

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, length: bool = True, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # The client may stop reading, as it should for oversize bodies.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_GET(self) -> None:
        host = self.headers.get("Host", "")
        auth = self.headers.get("Authorization")
        with self.server.lock:
            self.server.seen.append((host, self.path, auth))
        other = f"http://localhost:{self.server.server_address[1]}"
        path = self.path.split("?")[0]
        if path.startswith("/data/upload/"):
            if auth == f"Token {KEY}":
                self._send(200, PNG, Content_Type="image/png")
            else:
                self._send(401, b'{"detail": "Authentication credentials were not provided."}')
        elif path == "/public.png":
            self._send(200, PNG, Content_Type="image/png")
        elif path == "/away":
            self._send(302, b"", Location=f"{other}/public.png")
        elif path == "/home":
            self._send(302, b"", Location="/data/upload/1/a.png")
        elif path == "/ftp":
            self._send(302, b"", Location="ftp://example.org/a.png")
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        elif path == "/big-declared":
            self._send(200, b"\0" * (MAX_BYTES + 1))
        elif path == "/big-streamed":
            self._send(200, b"\0" * (MAX_BYTES * 3), length=False)
        elif path == "/mislabelled":  # an image declared as a web page
            self._send(200, PNG, Content_Type="text/html; charset=utf-8")
        elif path == "/login":
            self._send(200, b"<!doctype html><html><body>Log in</body></html>")
        elif path == "/error":
            self._send(500, b"Internal Server Error")
        elif path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG)
        else:
            self._send(404, b'{"detail": "Not found."}')


class FakeLabelStudio(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, str, str | None]]
    lock: threading.Lock


@contextlib.contextmanager
def running() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(("127.0.0.1", 0), Handler)
    server.seen, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class FakeLabelStudioAPI:
    """The Label Studio API calls the push (and the diverse-first order) make, in memory
    (tests, bench/preannotate.py).

    `fail_imports_after` makes imports fail as a 500 would after that many.
    """

    def __init__(
        self, tasks: list[dict], label_config: str, fail_imports_after: int | None = None
    ) -> None:
        self.tasks_by_id = {t["id"]: t for t in tasks}
        self.config = label_config
        self.predictions_by_id: dict[int, dict] = {}
        self.ids = itertools.count(1)
        self.imports = 0
        self.fail_imports_after = fail_imports_after
        self.model_version = "echolabel"
        self.data_updates = 0

    def label_config(self, project):
        return self.config

    def tasks(self, project, full=False, resolve_uri=True):
        for task in self.tasks_by_id.values():
            yield {**task, "data": dict(task["data"]), "predictions": self.predictions(task["id"])}

    def update_task_data(self, task, data):
        self.data_updates += 1
        self.tasks_by_id[task]["data"] = dict(data)

    def import_predictions(self, project, predictions):
        if self.fail_imports_after is not None and self.imports >= self.fail_imports_after:
            raise LabelStudioUnavailable("Label Studio answered 500 for POST import/predictions")
        self.imports += 1
        for prediction in predictions:
            pid = next(self.ids)
            self.predictions_by_id[pid] = {"id": pid, **prediction}
        return len(predictions)

    def predictions(self, task):
        return [p for p in self.predictions_by_id.values() if p["task"] == task]

    def update_prediction(self, prediction, result, score):
        self.predictions_by_id[prediction] |= {"result": result, "score": score}

    def delete_prediction(self, prediction):
        del self.predictions_by_id[prediction]

    def model_versions(self, project):
        versions: dict[str, int] = {}
        for p in self.predictions_by_id.values():
            versions[p["model_version"]] = versions.get(p["model_version"], 0) + 1
        return versions

    def delete_model_version(self, project, version):
        doomed = [i for i, p in self.predictions_by_id.items() if p["model_version"] == version]
        for i in doomed:
            del self.predictions_by_id[i]
        return len(doomed)

    def project(self, project):
        return {"id": project, "model_version": self.model_version}

    def backends(self, project):
        return [{"title": "echolabel"}]

    def set_model_version(self, project, version):
        self.model_version = version

    def close(self):
        pass
