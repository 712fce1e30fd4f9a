"""LabelStudioAuth against a fake Label Studio that issues unsigned, short-lived JWTs."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from echolabel.labelstudio_auth import LabelStudioAuth, LabelStudioAuthError

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
START = 1_800_000_000.0


def make_jwt(claims: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        raw = base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()
        return raw.rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class Clock:
    """Unix time that tests move by hand, shared by the fake server and the auth."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class FakeLabelStudio:
    """The token endpoints of Label Studio 1.23 and one protected endpoint."""

    def __init__(self, clock: Clock, access_lifetime_s: float = 300.0) -> None:
        self.clock = clock
        self.access_lifetime_s = access_lifetime_s
        self.pat = make_jwt({"token_type": "refresh", "exp": START + 86400 * 365, "jti": "pat"})
        self.valid_access: set[str] = set()
        self.reject_bearer = False
        self.refreshes = 0
        self.unauthorized = 0
        self.headers_seen: list[str] = []
        self._lock = threading.Lock()
        self._jti = 0

    def issue_access(self) -> str:
        with self._lock:
            self._jti += 1
            exp = int(self.clock() + self.access_lifetime_s)
            token = make_jwt({"token_type": "access", "exp": exp, "jti": self._jti})
            self.valid_access.add(token)
            self.refreshes += 1
            return token

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme == "Token":
            return token == LEGACY_KEY
        if scheme == "Bearer" and not self.reject_bearer and token in self.valid_access:
            exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
            return exp > self.clock()
        return False


class Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        ls = self.server.ls
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/api/token/refresh/":
            self._reply(404, {"detail": "Not found."})
        elif "Authorization" in self.headers:
            self._reply(400, {"detail": "refresh takes no credentials in this fake"})
        elif body.get("refresh") == ls.pat:
            self._reply(200, {"access": ls.issue_access()})
        else:
            self._reply(401, {"detail": "Token is invalid", "code": "token_not_valid"})

    def do_GET(self) -> None:
        ls = self.server.ls
        header = self.headers.get("Authorization", "")
        ls.headers_seen.append(header)
        if self.path != "/api/projects/":
            self._reply(404, {"detail": "Not found."})
        elif ls.authorized(header):
            self._reply(200, {"results": []})
        else:
            with ls._lock:
                ls.unauthorized += 1
            self._reply(401, {"detail": "Authentication credentials were not provided."})


class _Server(ThreadingHTTPServer):
    ls: FakeLabelStudio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake_ls(clock: Clock) -> Iterator[tuple[FakeLabelStudio, str]]:
    server = _Server(("127.0.0.1", 0), Handler)
    server.ls = FakeLabelStudio(clock)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server.ls, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def client_for(base: str, key: str, clock: Clock) -> httpx.Client:
    return httpx.Client(base_url=base, auth=LabelStudioAuth(base, key, clock=clock), timeout=5)


def test_legacy_token_is_sent_as_token_header(fake_ls, clock):
    ls, base = fake_ls
    auth = LabelStudioAuth(base, LEGACY_KEY, clock=clock)
    assert auth.token_kind == "legacy"
    with httpx.Client(base_url=base, auth=auth) as client:
        assert client.get("/api/projects/").status_code == 200
    assert ls.headers_seen == [f"Token {LEGACY_KEY}"]
    assert ls.refreshes == 0


def test_personal_access_token_is_exchanged_once_and_reused(fake_ls, clock):
    ls, base = fake_ls
    with client_for(base, ls.pat, clock) as client:
        assert client.auth.token_kind == "personal_access_token"
        assert client.get("/api/projects/").status_code == 200
        assert client.get("/api/projects/").status_code == 200
    assert ls.refreshes == 1
    assert all(h.startswith("Bearer ") and ls.pat not in h for h in ls.headers_seen)


def test_streamed_requests_refresh_too(fake_ls, clock):
    ls, base = fake_ls
    with client_for(base, ls.pat, clock) as client:
        with client.stream("GET", "/api/projects/") as response:
            assert response.status_code == 200
        ls.valid_access.clear()
        with client.stream("GET", "/api/projects/") as response:
            assert response.read() == b'{"results": []}'
    assert ls.refreshes == 2


def test_access_token_is_refreshed_shortly_before_it_expires(fake_ls, clock):
    ls, base = fake_ls
    with client_for(base, ls.pat, clock) as client:
        assert client.get("/api/projects/").status_code == 200
        clock.now += ls.access_lifetime_s - 20  # inside the 30 s margin, not yet expired
        assert client.get("/api/projects/").status_code == 200
        clock.now += 600  # long past expiry
        assert client.get("/api/projects/").status_code == 200
    assert ls.refreshes == 3
    assert ls.unauthorized == 0


def test_a_401_triggers_one_refresh_and_a_retry(fake_ls, clock):
    ls, base = fake_ls
    with client_for(base, ls.pat, clock) as client:
        assert client.get("/api/projects/").status_code == 200
        ls.valid_access.clear()  # e.g. Label Studio restarted with a new signing key
        assert client.get("/api/projects/").status_code == 200
    assert ls.refreshes == 2
    assert ls.unauthorized == 1


def test_a_second_401_is_returned_without_further_refreshes(fake_ls, clock):
    ls, base = fake_ls
    ls.reject_bearer = True
    with client_for(base, ls.pat, clock) as client:
        assert client.get("/api/projects/").status_code == 401
    assert ls.refreshes == 2
    assert ls.unauthorized == 2


def test_concurrent_requests_share_one_refresh(fake_ls, clock):
    ls, base = fake_ls
    with client_for(base, ls.pat, clock) as client:
        assert client.get("/api/projects/").status_code == 200
        clock.now += 1000
        statuses: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: statuses.append(client.get("/api/projects/").status_code)
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * 8
    assert ls.refreshes == 2


def test_refused_personal_access_token_raises_a_clear_error(fake_ls, clock):
    _, base = fake_ls
    foreign = make_jwt({"token_type": "refresh", "exp": START - 60, "jti": "other"})
    with client_for(base, foreign, clock) as client, pytest.raises(LabelStudioAuthError) as err:
        client.get("/api/projects/")
    message = str(err.value)
    assert "refused the personal access token" in message
    assert "HTTP 401" in message
    assert "LABEL_STUDIO_API_KEY" in message
    assert "expired" in message
    assert foreign not in message


def test_refresh_lock_is_released_after_a_failed_refresh(fake_ls, clock):
    _, base = fake_ls
    foreign = make_jwt({"token_type": "refresh", "exp": START + 60, "jti": "other"})
    with client_for(base, foreign, clock) as client:
        for _ in range(2):  # a held lock would hang the second call
            with pytest.raises(LabelStudioAuthError):
                client.get("/api/projects/")


def test_personal_access_token_sent_as_token_or_bearer_is_refused(fake_ls):
    ls, base = fake_ls
    for scheme in ("Token", "Bearer"):
        response = httpx.get(
            f"{base}/api/projects/", headers={"Authorization": f"{scheme} {ls.pat}"}
        )
        assert response.status_code == 401


def test_an_access_token_as_api_key_is_rejected_up_front():
    access = make_jwt({"token_type": "access", "exp": START + 300})
    with pytest.raises(LabelStudioAuthError, match="not a refresh token") as err:
        LabelStudioAuth("http://ls.example", access)
    assert access not in str(err.value)


def test_empty_api_key_is_rejected():
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY is empty"):
        LabelStudioAuth("http://ls.example", "  ")


def test_async_clients_are_refused_clearly():
    async def get() -> None:
        async with httpx.AsyncClient(auth=LabelStudioAuth("http://ls.example", LEGACY_KEY)) as c:
            await c.get("http://ls.example/api/projects/")

    with pytest.raises(TypeError, match=r"httpx\.Client only"):
        asyncio.run(get())
