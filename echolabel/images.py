"""Fetch a task's image from wherever its reference points, and decode it to RGB within limits.

A reference is trusted only as far as the settings allow: Label Studio's own URLs get its token,
hosts in ECHOLABEL_IMAGE_ALLOWED_HOSTS are fetched without credentials, local paths are read
only inside ECHOLABEL_LOCAL_FILES_ROOT, and everything else is refused. Every failure is an
`ImageError` carrying a short reason code and the HTTP status our API should answer with.
"""

from __future__ import annotations

import io
import logging
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qs, urljoin, urlsplit
from urllib.request import url2pathname

import httpx
import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)

from echolabel.labelstudio_auth import LabelStudioAuth, LabelStudioAuthError
from echolabel.sector import Box, sector_box
from echolabel.settings import Settings

ImageErrorReason = Literal[
    "empty",
    "too_large",
    "too_many_pixels",
    "corrupt",
    "not_an_image",
    "forbidden",
    "not_found",
    "unreachable",
    "unauthorized",
    "bad_reference",
]

_STATUS: dict[str, int] = {
    "empty": 422,
    "too_large": 413,
    "too_many_pixels": 413,
    "corrupt": 422,
    "not_an_image": 422,
    "forbidden": 403,
    "not_found": 404,
    "unreachable": 502,
    "unauthorized": 502,
    "bad_reference": 422,
}

# Formats worth labelling. Naming them keeps Pillow away from plugins that shell out (EPS runs
# Ghostscript) or only widen what a hostile file can reach.
_PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM", "JPEG2000")
_SUPPORTED = "PNG, JPEG, TIFF, BMP, GIF, WebP, PPM, JPEG 2000 or DICOM"
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 3
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


def silence_pydicom() -> None:
    """Keep pydicom's warnings out of logs and stderr: they quote element values ("Invalid
    value for VR DA: '…'"), which can be a patient's name or birth date. A filter, not
    `catch_warnings` around each decode, which swaps global state and is not thread-safe."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


silence_pydicom()


class ImageError(ValueError):
    """An image could not be fetched or decoded.

    `reason` is a short machine code (see `ImageErrorReason`); `status` is the HTTP status the
    API should answer with. The message says what was expected, what was found and what to do.
    """

    def __init__(self, reason: ImageErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: ImageErrorReason = reason
        self.status: int = _STATUS[reason]


DicomFrame = Literal["first", "middle", "last"]
UltrasoundCrop = Literal["off", "dicom", "all"]


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    source: str = "",
    min_side: int | None = None,
    dicom_frame: DicomFrame = "middle",
    ultrasound_crop: UltrasoundCrop = "off",
) -> Image.Image:
    """Decode image bytes (any of the supported formats, DICOM included) to a loaded RGB image.

    The pixel count is checked from the header before any pixel is decoded. 16-bit and float
    greyscale is stretched over its own min–max range; transparency is composed onto black.
    `source` names the image in error messages. With `min_side` (the side an encoder resizes
    to), a JPEG at least twice that size is decoded reduced by 1/2–1/8 inside libjpeg's DCT,
    keeping both sides ≥ `min_side`: 7× faster for 1024² frames (docs/performance.md §3).
    A multi-frame DICOM (a cine loop) yields the one frame `dicom_frame` names.
    `ultrasound_crop`: "dicom" crops DICOM ultrasound (Modality US) to its sector, "all" crops
    every image to its largest bright region (`sector_box`).
    """
    where = f"{source}: " if source else ""
    if not data:
        raise ImageError(
            "empty",
            f"{where}expected image bytes, found an empty body; check that the file is not "
            "empty and that the reference points at the image itself",
        )
    if data[128:132] == b"DICM":
        rgb, modality, regions = _decode_dicom(data, max_pixels, where, dicom_frame)
        if ultrasound_crop == "all" or (ultrasound_crop == "dicom" and modality == "US"):
            rgb = _crop(rgb, regions)
        return Image.fromarray(rgb, "RGB")
    if ultrasound_crop == "all":
        # Decoded in full: a reduced decode could leave the cropped sector under `min_side`.
        return Image.fromarray(_crop(np.asarray(_decode_pillow(data, max_pixels, where))), "RGB")
    return _decode_pillow(data, max_pixels, where, min_side)


def _crop(rgb: np.ndarray, regions: Sequence[Box] = ()) -> np.ndarray:
    box = sector_box(rgb, regions)
    if box is None:
        return rgb
    left, top, right, bottom = box
    # A copy, so the crop does not keep the whole frame alive behind a view.
    return np.ascontiguousarray(rgb[top:bottom, left:right])


def _decode_pillow(
    data: bytes, max_pixels: int, where: str, min_side: int | None = None
) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except _BOMB as exc:
        raise _too_many_pixels(where, None, max_pixels) from exc
    except UnidentifiedImageError:
        raise ImageError("not_an_image", where + _describe_unknown(data)) from None
    # Pillow raises many exception types on malformed headers.
    except Exception as exc:
        raise _corrupt(where, exc) from exc
    _check_pixels(image.size, max_pixels, where)
    if min_side and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except _BOMB as exc:
        raise _too_many_pixels(where, image.size, max_pixels) from exc
    except Exception as exc:
        raise _corrupt(where, exc) from exc
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise ImageError(
            "not_an_image",
            f"{where}expected an image in a colour mode that converts to RGB, found mode "
            f"{image.mode!r} ({exc}); re-export it as 8-bit RGB or greyscale",
        ) from exc


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
                raise _too_large(ref, info.st_size, limit)
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
            raise _too_large(ref, None, limit)
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
            raise _too_large(_redact(url), int(length), limit)
        body = bytearray()
        try:
            for chunk in response.iter_bytes(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise _too_large(_redact(url), None, limit)
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


# --- Pillow images ---------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: the one conversion decoding and encoders share.

    Wide greyscale (16/32-bit, float) is stretched from its own min to max, since medical
    images often use part of the range (12-bit data in 16-bit containers); transparent pixels
    become black, the background of ultrasound and most medical images.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        grey = _to_uint8(np.asarray(image))
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" in image.getbands() or image.mode in ("RGBa", "La"):
        # Hidden pixels carry arbitrary colours; black matches an ultrasound's background.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(
            "corrupt", f"{where}expected an image with pixels, found size {width}x{height}"
        )
    if width * height > max_pixels:
        raise _too_many_pixels(where, size, max_pixels)


def _describe_unknown(data: bytes) -> str:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return (
            "expected an image, found an HTML page (often a login or error page); check the "
            "URL and that Label Studio accepts LABEL_STUDIO_API_KEY"
        )
    try:
        text = data[:80].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return (
            f"expected an image, found text starting {text[:60]!r}; check that the reference "
            "points at the image file itself"
        )
    return (
        f"expected {_SUPPORTED} (DICOM with its 128-byte preamble), found {len(data)} bytes in "
        "none of these formats; export the image as PNG or JPEG"
    )


def _too_many_pixels(where: str, size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    if size is None:
        found = "more than Pillow's decompression-bomb limit"
    else:
        found = f"{size[0]}x{size[1]} = {size[0] * size[1]:,}"
    return ImageError(
        "too_many_pixels",
        f"{where}expected at most {max_pixels:,} pixels (ECHOLABEL_MAX_IMAGE_PIXELS), found "
        f"{found}; downscale the image or raise ECHOLABEL_MAX_IMAGE_PIXELS",
    )


def _too_large(shown: str, size: int | None, limit: int) -> ImageError:
    found = f"{size:,} bytes" if size is not None else "more"
    return ImageError(
        "too_large",
        f"{shown}: expected at most {limit:,} bytes (ECHOLABEL_MAX_IMAGE_BYTES), found {found}; "
        "compress or downscale the image, or raise ECHOLABEL_MAX_IMAGE_BYTES",
    )


def _corrupt(where: str, exc: BaseException) -> ImageError:
    return ImageError(
        "corrupt",
        f"{where}expected a complete image, found a damaged or truncated one "
        f"({type(exc).__name__}: {exc}); re-export or re-upload it",
    )


def _to_uint8(
    values: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Map `values` linearly from [low, high] (default: their own min and max) onto 0–255."""
    values = np.nan_to_num(values.astype(np.float64))
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- DICOM ----------------------------------------------------------------------------------


def _decode_dicom(
    data: bytes, max_pixels: int, where: str, frame: DicomFrame
) -> tuple[np.ndarray, str, list[Box]]:
    """One frame as RGB uint8, the modality, and the 2-D ultrasound regions of the header.

    Only pixels leave this function: no header value (patient name, id, dates) is returned,
    logged or put into an error message, so none can reach a payload or a log line.
    """
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    # pydicom raises many exception types on malformed files.
    except Exception as exc:
        raise ImageError(
            "corrupt",
            f"{where}expected a readable DICOM file, found one pydicom cannot parse "
            f"({type(exc).__name__}); re-export it",
        ) from exc
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if len(dataset) == 0 or "Rows" in dataset:
            # pydicom stops quietly at a truncated element: an image header without pixels,
            # or nothing at all after the file meta, is a cut-off file.
            raise ImageError(
                "corrupt",
                f"{where}expected a complete DICOM image, found a file that ends before its "
                "pixel data (truncated or damaged); re-export or re-upload it",
            )
        raise ImageError(
            "not_an_image",
            f"{where}expected a DICOM image, found a DICOM {_modality(dataset) or 'object'} "
            "without pixel data (a report, plan or waveform); reference the image series instead",
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageError(
            "corrupt",
            f"{where}expected a DICOM file naming its transfer syntax, found none; re-export it",
        )
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        raise ImageError(
            "not_an_image",
            f"{where}expected DICOM pixel data this backend can decode (uncompressed, deflated, "
            "RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), found transfer syntax "
            f"{syntax.name} ({syntax}); convert the file to one of those",
        )
    try:
        _check_pixels((int(dataset.Columns), int(dataset.Rows)), max_pixels, where)
        frames = int(dataset.get("NumberOfFrames") or 1)
        index = {"first": 0, "middle": frames // 2, "last": frames - 1}[frame]
        # Only the chosen frame is decoded: a 100-frame cine loop costs one frame.
        pixels = pixel_array(dataset, index=index)
        return _dicom_rgb(pixels, dataset, where), _modality(dataset), _us_regions(dataset)
    except ImageError:
        raise
    except Exception as exc:
        # pydicom's messages name tags and syntaxes, never header values.
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageError(
            "corrupt",
            f"{where}expected decodable DICOM pixel data ({syntax.name}), found an error: "
            f"{type(exc).__name__}: {detail}; re-export the file",
        ) from exc


def _modality(dataset: Dataset) -> str:
    return str(dataset.get("Modality") or "").upper()


def _us_regions(dataset: Dataset) -> list[Box]:
    """Boxes of the 2-D (tissue or flow) regions in the Sequence of Ultrasound Regions."""
    boxes: list[Box] = []
    for region in dataset.get("SequenceOfUltrasoundRegions") or []:
        try:
            if int(region.RegionSpatialFormat) != 1:  # 1 = 2D; M-mode, spectra and the like
                continue
            boxes.append(
                (
                    int(region.RegionLocationMinX0),
                    int(region.RegionLocationMinY0),
                    int(region.RegionLocationMaxX1) + 1,  # the header's max is inclusive
                    int(region.RegionLocationMaxY1) + 1,
                )
            )
        except (AttributeError, TypeError, ValueError):
            continue  # an incomplete region is skipped, as viewers do
    return boxes


def _dicom_rgb(frame: np.ndarray, dataset: Dataset, where: str) -> np.ndarray:
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = _dicom_grey(frame, dataset)
        if photometric == "MONOCHROME1":
            grey = 255 - grey  # MONOCHROME1 shows low values as white
        return np.repeat(grey[..., None], 3, axis=-1)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, dataset)
        return _to_uint8(rgb, 0, np.iinfo(rgb.dtype).max)
    if frame.ndim == 3 and frame.shape[-1] == 3:
        # RGB, or YBR that pixel_array has already converted to RGB.
        return _to_uint8(frame, 0, 2 ** int(dataset.BitsStored) - 1)
    raise ImageError(
        "not_an_image",
        f"{where}expected a greyscale, RGB or palette DICOM image, found photometric "
        f"interpretation {photometric or 'none'}; convert it to RGB",
    )


def _dicom_grey(frame: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then 8 bits over the VOI's output range."""
    values = apply_modality_lut(frame, dataset)
    lut = dataset.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        return _to_uint8(apply_voi(values, dataset))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        try:
            windowed = apply_windowing(values, dataset)
            # The window's output range, not the data's, so a narrow window keeps its contrast.
            low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
            return _to_uint8(windowed, low, high)
        except ValueError:
            pass  # an invalid window (e.g. width 0) is ignored, as viewers do
    return _to_uint8(values)


# --- URLs -----------------------------------------------------------------------------------


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
