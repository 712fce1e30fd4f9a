"""httpx authentication for Label Studio's two API token kinds.

A legacy token is sent as `Authorization: Token <key>`. A personal access token (the default in
Label Studio 1.23) is a JWT *refresh* token: it is exchanged at `/api/token/refresh/` for an
access token valid about five minutes, sent as `Authorization: Bearer <access>`. Label Studio
refuses the personal access token itself under either scheme.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Generator
from typing import Literal, NoReturn

import httpx

TokenKind = Literal["legacy", "personal_access_token"]

REFRESH_PATH = "/api/token/refresh/"

_KEY_HINT = (
    "check LABEL_STUDIO_API_KEY: copy a personal access token (or, where the organisation "
    "enables them, a legacy token) from Label Studio's Account & Settings page, and check that "
    "LABEL_STUDIO_URL points at the Label Studio that issued it"
)


class LabelStudioAuthError(RuntimeError):
    """Label Studio refused our token; the message says what to check, never the token."""


class LabelStudioAuth(httpx.Auth):
    """Authenticate requests to one Label Studio with a legacy or personal access token.

    Works with a synchronous `httpx.Client` shared by several threads: one lock guards the
    access token, so concurrent requests that find it expired trigger a single refresh.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        refresh_margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare auth for `base_url` (Label Studio's root URL) with `api_key` of either kind.

        `clock` returns Unix time; it is compared with the `exp` claim of access tokens and is
        a parameter so tests can move time forward.
        """
        api_key = api_key.strip()
        if not api_key:
            raise LabelStudioAuthError(f"LABEL_STUDIO_API_KEY is empty; {_KEY_HINT}")
        claims = _jwt_claims(api_key)
        if claims is not None and claims.get("token_type") != "refresh":
            raise LabelStudioAuthError(
                "LABEL_STUDIO_API_KEY holds a JWT that is not a refresh token "
                f"(token_type={claims.get('token_type')!r}) and would expire within minutes; "
                f"{_KEY_HINT}"
            )
        self._api_key = api_key
        self._refresh_url = base_url.rstrip("/") + REFRESH_PATH
        self._kind: TokenKind = "legacy" if claims is None else "personal_access_token"
        self._pat_exp = claims.get("exp") if claims else None
        self._margin = refresh_margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp: float | None = None

    @property
    def token_kind(self) -> TokenKind:
        """The key's kind: "legacy" (sent as `Token`) or "personal_access_token" (a JWT)."""
        return self._kind

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the header, refreshing the access token when due and once more on a 401."""
        if self._kind == "legacy":
            request.headers["Authorization"] = f"Token {self._api_key}"
            yield request
            return

        with self._lock:
            if self._access is None or self._expires_soon():
                yield from self._refresh()
            sent = self._access
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if response.status_code != 401:
            return

        with self._lock:
            # Another thread may have refreshed while this request was in flight.
            if self._access == sent:
                yield from self._refresh()
            retry = self._access
        request.headers["Authorization"] = f"Bearer {retry}"
        # A second 401 is returned to the caller: the token works but lacks permission.
        yield request

    def async_auth_flow(self, request: httpx.Request) -> NoReturn:  # type: ignore[override]
        """Refuse `httpx.AsyncClient`: the refresh lock is a thread lock."""
        raise TypeError("LabelStudioAuth supports httpx.Client only, not httpx.AsyncClient")

    def _expires_soon(self) -> bool:
        return self._access_exp is not None and self._clock() >= self._access_exp - self._margin

    def _refresh(self) -> Generator[httpx.Request, httpx.Response, None]:
        # Sent through the caller's client, so it shares its transport, proxies and timeouts.
        response = yield httpx.Request("POST", self._refresh_url, json={"refresh": self._api_key})
        # httpx hands the auth flow unread responses; only this small one is read here.
        response.read()
        access = None
        if response.status_code == 200:
            try:
                access = response.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise LabelStudioAuthError(self._refusal(response))
        claims = _jwt_claims(access) or {}
        exp = claims.get("exp")
        self._access = access
        # Without a readable `exp` the token is used until Label Studio answers 401.
        self._access_exp = float(exp) if isinstance(exp, int | float) else None

    def _refusal(self, response: httpx.Response) -> str:
        if response.status_code == 200:
            found = "an answer without an access token"
        else:
            found = f"HTTP {response.status_code}"
        message = f"Label Studio refused the personal access token at {self._refresh_url} ({found})"
        if isinstance(self._pat_exp, int | float) and self._pat_exp < self._clock():
            expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self._pat_exp))
            message += f"; the token itself expired on {expired}"
        return f"{message}; {_KEY_HINT}"


def _jwt_claims(token: str) -> dict[str, object] | None:
    """The payload of a JWT, unverified, or None when `token` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None
