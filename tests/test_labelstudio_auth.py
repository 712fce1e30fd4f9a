"""LabelStudioAuth against the fake Label Studio, which issues unsigned, short-lived JWTs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from echolabel.labelstudio_auth import LabelStudioAuth, LabelStudioAuthError
from tests.fakes import KEY as LEGACY_KEY
from tests.fakes import FakeLabelStudio, make_jwt

START = 1_800_000_000.0


class Clock:
    """Unix time that tests move by hand, shared by the fake server and the auth."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake_ls(clock: Clock) -> Iterator[tuple[FakeLabelStudio, str]]:
    with FakeLabelStudio(clock=clock) as ls:
        yield ls, ls.url


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
