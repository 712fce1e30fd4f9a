"""Pixel modes to 8-bit RGB: the one conversion decoding (Pillow and DICOM) and the encoders
share."""

from __future__ import annotations

import numpy as np
from PIL import Image

_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: the one conversion decoding and encoders share.

    Wide greyscale (16/32-bit, float) is stretched from its own min to max, since medical
    images often use part of the range (12-bit data in 16-bit containers); transparent pixels
    become black, the background of ultrasound and most medical images.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        grey = to_uint8(np.asarray(image))
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


def to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map `values` linearly from [low, high] (default: their own min and max) onto 0–255."""
    values = np.nan_to_num(values.astype(np.float64))
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
