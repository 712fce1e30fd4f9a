"""Where the ultrasound picture is inside a screen capture: the sector, not the frame around it.

Ultrasound images are screen captures: the scan sector (or rectangle) sits on a black
background next to burned-in text (site, patient, date), colour bars and measurement scales.
Cropping to the sector lets the encoder spend its 224 pixels on anatomy. The sector is taken
from the DICOM Sequence of Ultrasound Regions when it lies inside the frame, else found in the
pixels as the largest connected bright region; text and scales are small separate blobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive), in pixels

# Found by looking at the ultrasound files pydicom ships and at BUSI: speckle in dark tissue
# is above ~10/255; JPEG noise in the black background stays below it.
_BRIGHT = 12
_WORK_SIDE = 400  # the search runs on a copy this long at most: fast; small text stays thin
# Never crop to less than this share of the image's width or height: a box that thin is a
# banner, a scale or a text block, not a sector (the search failed), so the whole image is
# kept instead.
_MIN_SIDE = 0.4
_MARGIN = 2  # pixels added around the box at full resolution
_WINDOW = 5  # neighbourhood (work pixels) whose share of bright pixels is measured
_DENSE = 0.6


def sector_box(rgb: np.ndarray, regions: Sequence[Box] = ()) -> Box | None:
    """The box to crop `rgb` (h, w, 3 uint8) to, or None to keep the whole image.

    `regions`: 2-D ultrasound regions from the DICOM header; their union is used when it lies
    inside the image (test files and re-sampled exports often carry regions of the original
    size, which are ignored).
    """
    height, width = rgb.shape[:2]
    inside = [r for r in regions if 0 <= r[0] < r[2] <= width and 0 <= r[1] < r[3] <= height]
    if inside:
        box = (
            min(r[0] for r in inside),
            min(r[1] for r in inside),
            max(r[2] for r in inside),
            max(r[3] for r in inside),
        )
    else:
        found = _largest_bright_region(rgb)
        if found is None:
            return None
        box = found
    too_thin = box[2] - box[0] < _MIN_SIDE * width or box[3] - box[1] < _MIN_SIDE * height
    if too_thin or box == (0, 0, width, height):
        return None
    return box


def _largest_bright_region(rgb: np.ndarray) -> Box | None:
    height, width = rgb.shape[:2]
    step = max(1, int(np.ceil(max(height, width) / _WORK_SIDE)))
    # Block maximum: a thin bright speckle survives the downscale, a black gap stays black.
    h, w = height // step, width // step
    if h == 0 or w == 0:
        return None
    small = rgb[: h * step, : w * step].max(axis=2).reshape(h, step, w, step).max(axis=(1, 3))
    # Tissue is densely bright, text and scales are thin strokes: keep the pixels whose
    # neighbourhood is mostly bright, so text next to the sector does not join it.
    density = ndimage.uniform_filter((small > _BRIGHT).astype(np.float32), size=_WINDOW)
    mask = density > _DENSE
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    # The density window blurs edges by half its width; give that back.
    pad = (_WINDOW // 2) * step + _MARGIN
    return (
        max(0, cols.start * step - pad),
        max(0, rows.start * step - pad),
        min(width, cols.stop * step + pad),
        min(height, rows.stop * step + pad),
    )
