"""Image bytes to a loaded RGB image within a pixel bound: Pillow's formats, DICOM (see
`dicom`), and the optional crop of ultrasound to its sector."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from echolabel.images.dicom import DicomFrame, decode_dicom
from echolabel.images.errors import ImageError, check_pixels, corrupt, too_many_pixels
from echolabel.images.modes import to_rgb
from echolabel.sector import Box, sector_box

# Formats worth labelling. Naming them keeps Pillow away from plugins that shell out (EPS runs
# Ghostscript) or only widen what a hostile file can reach.
_PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM", "JPEG2000")
_SUPPORTED = "PNG, JPEG, TIFF, BMP, GIF, WebP, PPM, JPEG 2000 or DICOM"
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)

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
        rgb, modality, regions = decode_dicom(data, max_pixels, where, dicom_frame)
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
        raise too_many_pixels(where, None, max_pixels) from exc
    except UnidentifiedImageError:
        raise ImageError("not_an_image", where + _describe_unknown(data)) from None
    # Pillow raises many exception types on malformed headers.
    except Exception as exc:
        raise corrupt(where, exc) from exc
    check_pixels(image.size, max_pixels, where)
    if min_side and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except _BOMB as exc:
        raise too_many_pixels(where, image.size, max_pixels) from exc
    except Exception as exc:
        raise corrupt(where, exc) from exc
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise ImageError(
            "not_an_image",
            f"{where}expected an image in a colour mode that converts to RGB, found mode "
            f"{image.mode!r} ({exc}); re-export it as 8-bit RGB or greyscale",
        ) from exc


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
