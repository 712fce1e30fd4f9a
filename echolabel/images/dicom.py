"""DICOM decoding: one frame of a (possibly multi-frame) file as RGB, with its modality and
its ultrasound regions. No header value ever leaves this module."""

from __future__ import annotations

import io
import logging
import warnings
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)

from echolabel.images.errors import ImageError, check_pixels
from echolabel.images.modes import to_uint8
from echolabel.sector import Box

DicomFrame = Literal["first", "middle", "last"]


def silence_pydicom() -> None:
    """Keep pydicom's warnings out of logs and stderr: they quote element values ("Invalid
    value for VR DA: '…'"), which can be a patient's name or birth date. A filter, not
    `catch_warnings` around each decode, which swaps global state and is not thread-safe."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


silence_pydicom()


def decode_dicom(
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
        check_pixels((int(dataset.Columns), int(dataset.Rows)), max_pixels, where)
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
        return to_uint8(rgb, 0, np.iinfo(rgb.dtype).max)
    if frame.ndim == 3 and frame.shape[-1] == 3:
        # RGB, or YBR that pixel_array has already converted to RGB.
        return to_uint8(frame, 0, 2 ** int(dataset.BitsStored) - 1)
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
        return to_uint8(apply_voi(values, dataset))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        try:
            windowed = apply_windowing(values, dataset)
            # The window's output range, not the data's, so a narrow window keeps its contrast.
            low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
            return to_uint8(windowed, low, high)
        except ValueError:
            pass  # an invalid window (e.g. width 0) is ignored, as viewers do
    return to_uint8(values)
