"""`ImageError`: why an image could not be fetched or decoded, and the HTTP status to answer
with; and the errors of the size and pixel limits, which fetching and decoding share."""

from __future__ import annotations

from typing import Literal

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


class ImageError(ValueError):
    """An image could not be fetched or decoded.

    `reason` is a short machine code (see `ImageErrorReason`); `status` is the HTTP status the
    API should answer with. The message says what was expected, what was found and what to do.
    """

    def __init__(self, reason: ImageErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: ImageErrorReason = reason
        self.status: int = _STATUS[reason]


def check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(
            "corrupt", f"{where}expected an image with pixels, found size {width}x{height}"
        )
    if width * height > max_pixels:
        raise too_many_pixels(where, size, max_pixels)


def too_many_pixels(where: str, size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    if size is None:
        found = "more than Pillow's decompression-bomb limit"
    else:
        found = f"{size[0]}x{size[1]} = {size[0] * size[1]:,}"
    return ImageError(
        "too_many_pixels",
        f"{where}expected at most {max_pixels:,} pixels (ECHOLABEL_MAX_IMAGE_PIXELS), found "
        f"{found}; downscale the image or raise ECHOLABEL_MAX_IMAGE_PIXELS",
    )


def too_large(shown: str, size: int | None, limit: int) -> ImageError:
    found = f"{size:,} bytes" if size is not None else "more"
    return ImageError(
        "too_large",
        f"{shown}: expected at most {limit:,} bytes (ECHOLABEL_MAX_IMAGE_BYTES), found {found}; "
        "compress or downscale the image, or raise ECHOLABEL_MAX_IMAGE_BYTES",
    )


def corrupt(where: str, exc: BaseException) -> ImageError:
    return ImageError(
        "corrupt",
        f"{where}expected a complete image, found a damaged or truncated one "
        f"({type(exc).__name__}: {exc}); re-export or re-upload it",
    )
