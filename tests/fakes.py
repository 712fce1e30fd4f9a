"""The tests' fakes of the two services we fetch from: one image host and one Label Studio.

`FakeImageHost` serves a table of routes on loopback (`with FakeImageHost(...) as host:`, then
`host.url`), records every request in `seen`, and can be told to fail the next requests to a
path (`fail`) or to hold them unanswered (`hold`: where a crash test kills its client).
`fetch_edge_cases` are the routes the image fetcher must survive: redirects, oversize,
mislabelled, HTML, 500 and slow answers.

`FakeLabelStudio` is the in-memory Label Studio (`echolabel.labelstudio_memory`: the API the push
makes, usable without HTTP) that is also an image host: served, it answers Label Studio's API
(projects, paged tasks, token refresh, and the predictions the push writes) and its uploads,
behind its two auth modes, a legacy token and a personal access token exchanged for short-lived
JWTs on a clock the test moves.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from echolabel.labelstudio import LabelStudioUnavailable
from echolabel.labelstudio_memory import InMemoryLabelStudio

KEY = "0123456789abcdef0123456789abcdef01234567"  # the legacy token FakeLabelStudio accepts
MAX_BYTES = 100_000  # the fetch limit the edge cases' oversize bodies are built around


def _gradient_png(size: tuple[int, int] = (16, 8)) -> bytes:
    ramp = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    out = io.BytesIO()
    Image.fromarray(ramp).convert("RGB").save(out, "PNG")
    return out.getvalue()


PNG = _gradient_png()


class Request(NamedTuple):
    """One request as the fake saw it (auth: the Authorization header, if any)."""

    host: str
    path: str
    auth: str | None
    method: str = "GET"
    body: bytes = b""

    @property
    def route(self) -> str:
        return self.path.split("?")[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    declare_length: bool = True  # False: no Content-Length, the body streams until close
    delay_s: float = 0.0


def image_reply(body: bytes = PNG, content_type: str = "image/png") -> Reply:
    return Reply(200, body, {"Content-Type": content_type})


def redirect(location: str) -> Reply:
    return Reply(302, b"", {"Location": location})


def json_reply(status: int, body: object) -> Reply:
    return Reply(status, json.dumps(body).encode(), {"Content-Type": "application/json"})


NOT_FOUND = json_reply(404, {"detail": "Not found."})

Route = Reply | Callable[[Request], Reply]


class FakeImageHost:
    """Serves `routes` (path without query → reply, or a function of the request) on loopback."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.seen: list[Request] = []
        self.lock = threading.Lock()
        self._failures: dict[str, list[int]] = {}
        self._hold: tuple[str, int] | None = None  # (route prefix, answers left before holding)
        self._released = threading.Event()
        self.held = 0  # requests held so far
        self._server: ThreadingHTTPServer | None = None

    # -- configuration --------------------------------------------------------------------

    def fail(self, route: str, *statuses: int) -> None:
        """Answer the next requests to `route` with these statuses, in order, then as usual."""
        with self.lock:
            self._failures.setdefault(route, []).extend(statuses)

    def hold(self, prefix: str, after: int) -> None:
        """Answer `after` more requests whose path starts with `prefix`, then hold each later
        one until `release()`: its reply is computed (a write is applied) but not sent. A crash
        test kills the client while `held` > 0, so the kill lands at a known point."""
        with self.lock:
            self._hold = (prefix, after)
            self.held = 0
            self._released.clear()

    def release(self) -> None:
        """Send what was held (to a client that may be gone) and hold nothing more."""
        with self.lock:
            self._hold = None
        self._released.set()

    def _wait_if_held(self, request: Request) -> None:
        with self.lock:
            if self._hold is None or not request.path.startswith(self._hold[0]):
                return
            prefix, left = self._hold
            if left > 0:
                self._hold = (prefix, left - 1)
                return
            self.held += 1
        self._released.wait(120)

    def fetch_edge_cases(self, max_bytes: int = MAX_BYTES) -> Self:
        """Add the routes an image fetcher must survive; `/away` leaves for `localhost`, this
        server under another host name."""
        self.routes |= {
            "/public.png": image_reply(),
            "/away": lambda _: redirect(f"http://localhost:{self.port}/public.png"),
            "/home": redirect("/data/upload/1/a.png"),
            "/ftp": redirect("ftp://example.org/a.png"),
            "/loop": redirect("/loop"),
            "/big-declared": Reply(200, b"\0" * (max_bytes + 1)),
            "/big-streamed": Reply(200, b"\0" * (max_bytes * 3), declare_length=False),
            "/mislabelled": image_reply(content_type="text/html; charset=utf-8"),
            "/login": Reply(200, b"<!doctype html><html><body>Log in</body></html>"),
            "/error": Reply(500, b"Internal Server Error"),
            "/slow": Reply(200, PNG, delay_s=1.0),
        }
        return self

    # -- answering ------------------------------------------------------------------------

    def answer(self, request: Request) -> Reply:
        route = self.routes.get(request.route)
        if route is None:
            return NOT_FOUND
        return route(request) if callable(route) else route

    def _handle(self, request: Request) -> Reply:
        with self.lock:
            self.seen.append(request)
            failures = self._failures.get(request.route)
            status = failures.pop(0) if failures else None
        return Reply(status) if status is not None else self.answer(request)

    # -- serving --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake is not serving: use it as a context manager")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None


def _handler(fake: FakeImageHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            request = Request(
                host=self.headers.get("Host", ""),
                path=self.path,
                auth=self.headers.get("Authorization"),
                method=self.command,
                body=self.rfile.read(length) if length else b"",
            )
            reply = fake._handle(request)
            fake._wait_if_held(request)
            time.sleep(reply.delay_s)
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.declare_length:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            # The client may stop reading, as it should for oversize bodies.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(reply.body)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

    return Handler


def make_jwt(claims: dict[str, object]) -> str:
    """An unsigned JWT with these claims, shaped like Label Studio's."""

    def part(obj: dict[str, object]) -> str:
        raw = base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()
        return raw.rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeLabelStudio(InMemoryLabelStudio, FakeImageHost):
    """One project of Label Studio 1.23, in memory and, inside `with`, over HTTP.

    Auth: `token` is the legacy token; `pat` is a personal access token (a refresh JWT valid
    for a year) that POST /api/token/refresh/ exchanges for access tokens living
    `access_lifetime_s` on `clock`. Clearing `valid_access` stands for a restart with a new
    signing key; `reject_bearer` refuses every access token. Every refused request counts in
    `unauthorized`. `label_config=None` means no project at all.

    `fail_imports_after` makes prediction imports fail as a 500 would after that many;
    `fail(route, status)` does the same for any HTTP route.
    """

    def __init__(
        self,
        tasks: list[dict[str, Any]] | None = None,
        label_config: str | None = None,
        *,
        project: int = 1,
        token: str = KEY,
        clock: Callable[[], float] = time.time,
        access_lifetime_s: float = 300.0,
        fail_imports_after: int | None = None,
    ) -> None:
        InMemoryLabelStudio.__init__(self, tasks or [], label_config or "")
        FakeImageHost.__init__(self)
        self.has_project = label_config is not None
        self.project_id = project
        self.token = token
        self.clock = clock
        self.access_lifetime_s = access_lifetime_s
        self.fail_imports_after = fail_imports_after
        self.pat = make_jwt({"token_type": "refresh", "exp": clock() + 86400 * 365, "jti": "pat"})
        self.valid_access: set[str] = set()
        self.reject_bearer = False
        self.refreshes = 0
        self.unauthorized = 0
        self._jti = 0
        # Served, the state is read and written from the server's threads and the test's.
        self.state = threading.RLock()

    @property
    def headers_seen(self) -> list[str]:
        """The Authorization header of every GET (empty when none was sent)."""
        return [r.auth or "" for r in self.seen if r.method == "GET"]

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> int:
        if self.fail_imports_after is not None and self.imports >= self.fail_imports_after:
            raise LabelStudioUnavailable("Label Studio answered 500 for POST import/predictions")
        return super().import_predictions(project, predictions)

    # -- auth -----------------------------------------------------------------------------

    def issue_access(self) -> str:
        with self.lock:
            self._jti += 1
            exp = int(self.clock() + self.access_lifetime_s)
            token = make_jwt({"token_type": "access", "exp": exp, "jti": self._jti})
            self.valid_access.add(token)
            self.refreshes += 1
            return token

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme == "Token":
            return token == self.token
        if scheme == "Bearer" and not self.reject_bearer and token in self.valid_access:
            exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
            return exp > self.clock()
        return False

    def _refresh(self, request: Request) -> Reply:
        body = json.loads(request.body or b"{}")
        if request.auth is not None:
            return json_reply(400, {"detail": "refresh takes no credentials in this fake"})
        if body.get("refresh") == self.pat:
            return json_reply(200, {"access": self.issue_access()})
        return json_reply(401, {"detail": "Token is invalid", "code": "token_not_valid"})

    # -- HTTP -----------------------------------------------------------------------------

    def answer(self, request: Request) -> Reply:
        route = request.route
        if request.method == "POST" and route == "/api/token/refresh/":
            return self._refresh(request)
        if not (route.startswith("/api/") or route.startswith("/data/upload/")):
            return super().answer(request)
        if not self.authorized(request.auth or ""):
            with self.lock:
                self.unauthorized += 1
            return json_reply(401, {"detail": "Authentication credentials were not provided."})
        if route.startswith("/data/upload/"):
            return image_reply()
        if request.method == "GET":
            return self._api_get(route, request.query)
        with self.state:
            return self._api_write(request.method, route, json.loads(request.body or b"null"))

    def _api_get(self, route: str, query: dict[str, list[str]]) -> Reply:
        project = {"id": self.project_id, "label_config": self.config}
        if route == "/api/projects/":
            return json_reply(200, {"results": [project] if self.has_project else []})
        if route == f"/api/projects/{self.project_id}/" and self.has_project:
            return json_reply(200, project | {"model_version": self.model_version})
        with self.state:
            if route == "/api/tasks/":
                page, size = int(query["page"][0]), int(query["page_size"][0])
                # `fields=all` (the push reads it) adds the predictions, as Label Studio does.
                full = query.get("fields") == ["all"]
                tasks = (
                    list(self.tasks(self.project_id)) if full else list(self.tasks_by_id.values())
                )
                chunk = tasks[(page - 1) * size : page * size]
                return json_reply(200 if chunk else 404, {"tasks": chunk, "total": len(tasks)})
            if route == "/api/predictions/":
                return json_reply(200, self.predictions(int(query["task"][0])))
            if route == f"/api/projects/{self.project_id}/model-versions/":
                return json_reply(200, self.model_versions(self.project_id))
            if route == "/api/ml":
                return json_reply(200, self.backends(self.project_id))
        return NOT_FOUND

    def _api_write(self, method: str, route: str, body: Any) -> Reply:
        """The writes of the push (backend/preannotate.py), as Label Studio 1.23 answers them."""
        project = f"/api/projects/{self.project_id}/"
        if method == "POST" and route == f"{project}import/predictions":
            try:
                return json_reply(201, {"created": self.import_predictions(self.project_id, body)})
            except LabelStudioUnavailable as exc:
                return json_reply(500, {"detail": str(exc)})
        if method == "DELETE" and route == f"{project}model-versions/":
            deleted = self.delete_model_version(self.project_id, body["model_version"])
            return json_reply(200, {"deleted_predictions": deleted})
        if method == "PATCH" and route == project:
            self.set_model_version(self.project_id, body["model_version"])
            return json_reply(200, self.project(self.project_id))
        prediction = route.removeprefix("/api/predictions/").strip("/")
        if route.startswith("/api/predictions/") and int(prediction) in self.predictions_by_id:
            if method == "PATCH":
                self.update_prediction(int(prediction), body["result"], body["score"])
                return json_reply(200, self.predictions_by_id[int(prediction)])
            if method == "DELETE":
                self.delete_prediction(int(prediction))
                return Reply(204)
        return NOT_FOUND
