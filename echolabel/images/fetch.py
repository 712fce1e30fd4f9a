"""The fetch policy: where a task's image reference may be read from, with which credentials,
and within which size. Label Studio's own URLs get its token, hosts in
ECHOLABEL_IMAGE_ALLOWED_HOSTS are fetched without credentials, local paths are read only inside
ECHOLABEL_LOCAL_FILES_ROOT, and everything else is refused."""

from __future__ import annotations

import stat
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urljoin, urlsplit
from urllib.request import url2pathname

import httpx
from PIL import Image

from echolabel.images.decode import decode_image
from echolabel.images.errors import ImageError, too_large
from echolabel.labelstudio_auth import LabelStudioAuth, LabelStudioAuthError
from echolabel.settings import Settings

_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 3
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ImageFetcher:
    """Fetch task images from Label Studio, allowed hosts or a local folder, within limits.

    Safe to share between threads: it holds no per-call state, the httpx client is thread-safe
    and the token refresh takes a lock.
    """

    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        """Use `client` when given (it is left open by `close`), else a private one."""
        self._settings = settings
        self._ls_url = settings.label_studio_url
        self._ls_origin = _origin(self._ls_url) if self._ls_url else None
        self._auth: LabelStudioAuth | None = None
        if self._ls_url and settings.label_studio_api_key:
            self._auth = LabelStudioAuth(self._ls_url, settings.label_studio_api_key)
        self._allowed_hosts = frozenset(h.lower() for h in settings.image_allowed_hosts)
        root = settings.local_files_root
        self._root = root.expanduser().resolve() if root else None
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client()
        self._timeout = httpx.Timeout(settings.fetch_timeout_s)

    def close(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def load(self, ref: str, *, min_side: int | None = None) -> Image.Image:
        """Fetch the image `ref` points at and decode it to RGB (reduced towards `min_side`
        where the format allows it cheaply; see `decode_image`)."""
        return self.decode(self.fetch_bytes(ref), source=_redact(ref), min_side=min_side)

    def decode(self, data: bytes, *, source: str = "", min_side: int | None = None) -> Image.Image:
        """Decode bytes with this fetcher's settings (pixel bound, DICOM frame, sector crop):
        the one decoding of embedding and encoder training, so both see the same pixels."""
        return decode_image(
            data,
            max_pixels=self._settings.max_image_pixels,
            source=source,
            min_side=min_side,
            dicom_frame=self._settings.dicom_frame,
            ultrasound_crop=self._settings.ultrasound_crop,
        )

    def fetch_bytes(self, ref: str) -> bytes:
        """The raw bytes `ref` points at, at most ECHOLABEL_MAX_IMAGE_BYTES of them."""
        ref = ref.strip()
        if not ref:
            raise ImageError(
                "bad_reference",
                "expected an image URL or path, found an empty string; check the task's data",
            )
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_url(ref)
        if scheme == "file":
            return self._read_file(self._inside_root(self._file_url_path(ref), ref), ref)
        if scheme:
            raise ImageError(
                "forbidden",
                f"{_redact(ref)}: expected an http(s) URL, a Label Studio path or a local path, "
                f"found scheme {scheme!r}; serve the image over http(s) from a host in "
                "ECHOLABEL_IMAGE_ALLOWED_HOSTS or through Label Studio (LABEL_STUDIO_URL)",
            )
        if ref.startswith("/"):
            return self._fetch_label_studio_path(ref)
        return self._read_file(self._inside_root(Path(ref), ref), ref)

    # --- Label Studio paths and local files -------------------------------------------------

    def _fetch_label_studio_path(self, ref: str) -> bytes:
        local = self._local_copy(ref)
        if local is not None:
            return self._read_file(local, ref)
        if not self._ls_url:
            raise ImageError(
                "bad_reference",
                f"{_redact(ref)}: a path relative to Label Studio needs LABEL_STUDIO_URL, which "
                "is not set; set it to Label Studio's URL (and ECHOLABEL_LOCAL_FILES_ROOT to "
                "read local files straight from disk)",
            )
        return self._fetch_url(urljoin(self._ls_url + "/", ref))

    def _local_copy(self, ref: str) -> Path | None:
        """The file under the local root that an absolute reference names, if it exists."""
        if self._root is None:
            return None
        parts = urlsplit(ref)
        if parts.path.rstrip("/") == "/data/local-files":
            # Label Studio's `?d=` is relative to its LOCAL_FILES_DOCUMENT_ROOT, which the
            # local root mirrors.
            relative = parse_qs(parts.query).get("d", [""])[0]
            if not relative:
                return None
            candidate = self._root / relative
        else:
            candidate = Path(ref)
        resolved = candidate.resolve()
        if resolved.is_relative_to(self._root) and resolved.is_file():
            return resolved
        return None

    def _file_url_path(self, ref: str) -> Path:
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(
                "forbidden",
                f"{_redact(ref)}: expected a file:// URL on this machine, found host "
                f"{parts.netloc!r}; use a path inside ECHOLABEL_LOCAL_FILES_ROOT",
            )
        return Path(url2pathname(parts.path))

    def _inside_root(self, path: Path, ref: str) -> Path:
        if self._root is None:
            raise ImageError(
                "forbidden",
                f"{ref!r}: local paths are read only inside ECHOLABEL_LOCAL_FILES_ROOT, which "
                "is not set; set it to the folder holding the images",
            )
        # resolve() follows symlinks and `..`, so both are judged by where they really lead.
        resolved = (self._root / path).resolve()
        if not resolved.is_relative_to(self._root):
            raise ImageError(
                "forbidden",
                f"{ref!r}: expected a path inside ECHOLABEL_LOCAL_FILES_ROOT, found one that "
                "leads outside it (through '..' or a symlink); move the image under that root",
            )
        return resolved

    def _read_file(self, path: Path, ref: str) -> bytes:
        limit = self._settings.max_image_bytes
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(
                    "not_found", f"{ref!r}: expected an image file, found a directory or device"
                )
            if info.st_size > limit:
                raise too_large(ref, info.st_size, limit)
            with path.open("rb") as file:
                data = file.read(limit + 1)  # the file may have grown since stat()
        except FileNotFoundError:
            raise ImageError(
                "not_found",
                f"{ref!r}: expected a file inside ECHOLABEL_LOCAL_FILES_ROOT, found none; check "
                "the task's image path",
            ) from None
        except PermissionError:
            raise ImageError(
                "forbidden",
                f"{ref!r}: the backend may not read this file (permission denied); let the "
                "backend's user read it",
            ) from None
        if len(data) > limit:
            raise too_large(ref, None, limit)
        return data

    # --- HTTP ----------------------------------------------------------------------------

    def _fetch_url(self, url: str) -> bytes:
        for hop in range(_MAX_REDIRECTS + 1):
            credentials = self._check_url(url, redirected=hop > 0)
            response = self._send(url, credentials)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    continue
                self._check_status(response, url, credentials)
                return self._read_body(response, url)
            finally:
                response.close()
        raise ImageError(
            "unreachable",
            f"{_redact(url)}: expected the image within {_MAX_REDIRECTS} redirects, found "
            "more; reference the final URL directly",
        )

    def _check_url(self, url: str, *, redirected: bool) -> bool:
        """Refuse URLs outside the rules; True when Label Studio's token may be sent."""
        found = "a redirect to" if redirected else "a reference to"
        parts = urlsplit(url)
        try:
            origin = _origin(url)
        except ValueError:
            raise ImageError(
                "bad_reference", f"{_redact(url)}: expected a valid URL, found a malformed one"
            ) from None
        if not origin[1]:
            raise ImageError(
                "bad_reference", f"{_redact(url)}: expected a URL naming a host, found none"
            )
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageError(
                "forbidden",
                f"{_redact(url)}: expected an http(s) image, found {found} scheme "
                f"{parts.scheme!r}; reference an http(s) URL instead",
            )
        if origin == self._ls_origin:
            return True
        if origin[1] in self._allowed_hosts:
            return False
        ls = f"LABEL_STUDIO_URL ({self._ls_url})" if self._ls_url else "LABEL_STUDIO_URL (unset)"
        raise ImageError(
            "forbidden",
            f"{_redact(url)}: expected an image on {ls} or on a host in "
            f"ECHOLABEL_IMAGE_ALLOWED_HOSTS, found {found} host {origin[1]!r}; add that host to "
            "ECHOLABEL_IMAGE_ALLOWED_HOSTS if it is trusted, or correct LABEL_STUDIO_URL",
        )

    def _send(self, url: str, credentials: bool) -> httpx.Response:
        # Images are compressed already; asking for identity keeps the byte limit honest.
        request = self._client.build_request(
            "GET", url, headers={"Accept-Encoding": "identity"}, timeout=self._timeout
        )
        if not credentials:
            # A shared client may carry default headers; none of them leave for other hosts.
            request.headers.pop("Authorization", None)
        auth = self._auth if credentials else None
        try:
            return self._client.send(request, auth=auth, stream=True, follow_redirects=False)
        except LabelStudioAuthError as exc:
            raise ImageError("unauthorized", f"{_redact(url)}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise self._unreachable(url, exc) from exc

    def _check_status(self, response: httpx.Response, url: str, credentials: bool) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        shown = _redact(url)
        if status in (401, 403):
            raise ImageError("unauthorized", f"{shown}: {self._refusal_hint(status, credentials)}")
        if status in (404, 410):
            raise ImageError(
                "not_found",
                f"{shown}: expected an image, found HTTP {status}; check the task's image "
                "reference (for /data/local-files/ Label Studio also needs "
                "LOCAL_FILES_SERVING_ENABLED=true and a Local Files storage covering the folder)",
            )
        raise ImageError(
            "unreachable",
            f"{shown}: expected an image, found HTTP {status}; check that the server is healthy",
        )

    def _refusal_hint(self, status: int, credentials: bool) -> str:
        if not credentials:
            return (
                f"the host answered HTTP {status}; echolabel sends no credentials outside "
                "LABEL_STUDIO_URL, so make the image readable without them or serve it "
                "through Label Studio"
            )
        if self._auth is None:
            return (
                f"Label Studio answered HTTP {status} and LABEL_STUDIO_API_KEY is not set; set "
                "it to a personal access token from Account & Settings"
            )
        kind = self._auth.token_kind.replace("_", " ")
        return (
            f"Label Studio answered HTTP {status} to the {kind} in LABEL_STUDIO_API_KEY; "
            "legacy tokens work only where the organisation enables them, personal access "
            "tokens must not be revoked, and the token's user must be able to see the project"
        )

    def _read_body(self, response: httpx.Response, url: str) -> bytes:
        limit = self._settings.max_image_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large(_redact(url), int(length), limit)
        body = bytearray()
        try:
            for chunk in response.iter_bytes(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise too_large(_redact(url), None, limit)
        except httpx.HTTPError as exc:
            raise self._unreachable(url, exc) from exc
        return bytes(body)

    def _unreachable(self, url: str, exc: httpx.HTTPError) -> ImageError:
        if isinstance(exc, httpx.TimeoutException):
            found = f"no answer within {self._settings.fetch_timeout_s:g} s"
            todo = "check that the host is up, or raise ECHOLABEL_FETCH_TIMEOUT_S"
        else:
            found = f"{type(exc).__name__} ({exc})" if str(exc) else type(exc).__name__
            todo = "check the URL and that the host is reachable from the backend"
        return ImageError(
            "unreachable", f"{_redact(url)}: expected the image, found {found}; {todo}"
        )


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports filled in; ValueError on a malformed port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def _redact(ref: str) -> str:
    """`ref` fit for messages and logs: no user-info, no query string (signed URLs keep
    secrets there) except Label Studio's `?d=` file path."""
    parts = urlsplit(ref)
    if not parts.query and "@" not in parts.netloc:
        return ref
    netloc = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    if parts.query:
        local_file = (
            parse_qs(parts.query).get("d") if parts.path.endswith("/local-files/") else None
        )
        shown += f"?d={local_file[0]}" if local_file else "?…"
    return shown
