"""CSRF protection for the admin page's forms: a signed, expiring token in each form, checked
on POST together with the Origin (or Referer) header when the browser sends one.

The secret is drawn per process: a restart invalidates open forms, which only means reloading
the page. The token is bound to the basic-auth user, so one user's token is useless to another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from starlette.requests import Request

TOKEN_TTL_S = 12 * 3600


class CsrfError(PermissionError):
    """A form POST without a valid token, or sent from another origin."""


class CsrfTokens:
    def __init__(self, ttl_s: float = TOKEN_TTL_S) -> None:
        self._secret = secrets.token_bytes(32)
        self._ttl_s = ttl_s

    def issue(self, user: str = "") -> str:
        stamp = str(int(time.time()))
        return f"{stamp}.{self._sign(stamp, user)}"

    def check(self, request: Request, token: str | None, user: str = "") -> None:
        """Raise CsrfError unless `token` is ours, fresh, for this user, and the request comes
        from this origin."""
        _same_origin(request)
        stamp, _, signature = (token or "").partition(".")
        if not stamp.isdigit() or not hmac.compare_digest(signature, self._sign(stamp, user)):
            raise CsrfError("the form's CSRF token is missing or invalid: reload the page")
        if time.time() - int(stamp) > self._ttl_s:
            raise CsrfError("the form's CSRF token has expired: reload the page")

    def _sign(self, stamp: str, user: str) -> str:
        return hmac.new(self._secret, f"{stamp}\n{user}".encode(), hashlib.sha256).hexdigest()


def _same_origin(request: Request) -> None:
    """Browsers send Origin on form POSTs (Referer as a fallback): it must be this host."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc != host:
            raise CsrfError(f"cross-origin form post refused (Origin {origin!r}, host {host!r})")
        return
    referer = request.headers.get("referer")
    if referer is not None and urlsplit(referer).netloc != host:
        raise CsrfError(f"cross-origin form post refused (Referer from another host, {host!r})")
