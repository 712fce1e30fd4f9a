"""3D volumes as stacks of 2D slices: reading, slice sampling, and the count vote over slices.

After Khun Jush et al. 2023 (shared/papers): a volume is embedded slice by slice, each slice's
neighbours vote its label, and the volume takes the label most of its slices voted for. A
volume is a NIfTI file (`.nii`, `.nii.gz`, read with nibabel and turned to the closest
canonical RAS orientation, slices along the superior axis) or a folder holding one DICOM series
(slices ordered by their position along the slice normal). Only pixels and geometry are kept:
no header value (patient name, id, dates) leaves this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from echolabel.images import silence_pydicom

SamplingKind = Literal["all", "every-n", "every-mm", "random"]
SAMPLING_HELP = "all | every-n:N (every N-th slice) | every-mm:X (every X mm) | random:N (seeded)"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The percentiles that set the grey range where the file gives no window: robust to the few
# extreme voxels (metal, air outside the body) that a min–max stretch would follow.
_LOW_PERCENTILE, _HIGH_PERCENTILE = 0.5, 99.5
silence_pydicom()


class VolumeError(ValueError):
    """A volume cannot be read; the message says what was expected and what was found."""


@dataclass(frozen=True)
class Volume:
    """Slices (n, rows, columns) in modality units, in order along the slice axis."""

    slices: np.ndarray
    positions_mm: np.ndarray  # (n,) position of each slice along the axis, ascending
    window: tuple[float, float]  # the values shown as black and as white
    invert: bool = False  # MONOCHROME1: low values are white

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def slice_image(self, index: int) -> Image.Image:
        """Slice `index` as an 8-bit RGB image over the volume's window."""
        low, high = self.window
        values = self.slices[index].astype(np.float64)
        if high > low:
            grey = np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255)
        else:
            grey = np.zeros(values.shape)
        grey = grey.astype(np.uint8)
        if self.invert:
            grey = 255 - grey
        return Image.fromarray(grey).convert("RGB")


@dataclass(frozen=True)
class Sampling:
    """Which slices of a volume are embedded."""

    kind: SamplingKind
    value: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Sampling:
        """`all`, `every-n:4`, `every-mm:5` or `random:8`; ValueError naming the forms."""
        kind, _, raw = spec.strip().lower().partition(":")
        if kind == "all" and not raw:
            return cls("all")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if kind in ("every-n", "random") and value.is_integer() and value >= 1:
            return cls(kind, value)  # type: ignore[arg-type]
        if kind == "every-mm" and value > 0:
            return cls("every-mm", value)
        raise ValueError(f"sampling {spec!r}: expected {SAMPLING_HELP}")

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        return f"{self.kind}:{self.value:g}"

    def pick(self, positions_mm: np.ndarray, seed: int | Sequence[int] = 0) -> list[int]:
        """Indices of the chosen slices, ascending, given each slice's position in mm.

        every-mm takes the slice nearest to each of first, first + X, first + 2X, … mm, so it
        follows the real spacing (also an uneven one); random draws N distinct slices with a
        generator seeded by `seed` (all of them when the volume has at most N).
        """
        n = len(positions_mm)
        if n == 0:
            return []
        if self.kind == "all":
            return list(range(n))
        if self.kind == "every-n":
            return list(range(0, n, int(self.value)))
        if self.kind == "random":
            count = min(n, int(self.value))
            return sorted(int(i) for i in np.random.default_rng(seed).choice(n, count, False))
        positions = np.asarray(positions_mm, dtype=np.float64)
        # Targets within the stack only: one past its end would pick the last slice again.
        targets = np.arange(positions[0], positions[-1] + 1e-6, self.value)
        nearest = np.abs(positions[None, :] - targets[:, None]).argmin(axis=1)
        return sorted({int(i) for i in nearest})


def volume_vote(slice_labels: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The label most slices voted for (abstaining slices do not count), with the counts.

    Ties go to the label first in sort order, as in `echolabel.vote`; no voted slice → None.
    """
    counts = Counter(label for label in slice_labels if label is not None)
    if not counts:
        return None, {}
    winner = min(counts, key=lambda label: (-counts[label], label))
    return winner, dict(sorted(counts.items()))


def read_volume(path: Path, *, max_voxels: int = 300_000_000) -> Volume:
    """A NIfTI file or a DICOM series folder as a `Volume`; VolumeError when it is neither."""
    if path.is_dir():
        return _read_dicom_series(path, max_voxels)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, max_voxels)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    raise VolumeError(
        f"{path}: expected a NIfTI file (.nii, .nii.gz) or a folder with one DICOM series, "
        "found neither"
    )


def _read_nifti(path: Path, max_voxels: int) -> Volume:
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(path))
        shape = image.shape
        if len(shape) < 3 or len(shape) > 4:
            raise VolumeError(f"{path}: expected a 3D (or 4D) NIfTI image, found shape {shape}")
        _check_voxels(path, int(np.prod(shape[:3])), max_voxels)
        # A 4D image holds several volumes (protocols, time points): the first is used, as
        # in the paper.
        data = np.asarray(image.dataobj[..., 0] if len(shape) == 4 else image.dataobj)
        data = data.astype(np.float32)
        spacing = float(image.header.get_zooms()[2])
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises many types on damaged files
        raise VolumeError(
            f"{path}: expected a readable NIfTI image, found an error ({type(exc).__name__}: "
            f"{exc}); re-export it"
        ) from exc
    # RAS+: axis 2 runs inferior → superior, so slices are axial. Rotating each (x, y) slice
    # puts anterior at the top, as viewers show it.
    slices = np.ascontiguousarray(np.rot90(np.moveaxis(data, 2, 0), axes=(1, 2)))
    positions = np.arange(slices.shape[0], dtype=np.float64) * (spacing if spacing > 0 else 1.0)
    return Volume(slices, positions, _percentile_window(slices))


def _read_dicom_series(folder: Path, max_voxels: int) -> Volume:
    datasets: list[Dataset] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as handle:
            if handle.read(132)[128:132] != b"DICM":
                continue  # not DICOM (a README, a thumbnail)
        try:
            dataset = pydicom.dcmread(path)
        except Exception as exc:
            raise VolumeError(
                f"{path}: expected a readable DICOM file, found one pydicom cannot parse "
                f"({type(exc).__name__}); re-export the series"
            ) from exc
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise VolumeError(f"{folder}: expected DICOM images of one series, found none")
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise VolumeError(
            f"{folder}: expected one DICOM series per folder, found {len(series)}; put each "
            "series in a folder of its own"
        )
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise VolumeError(f"{folder}: expected slices of one size, found sizes {sorted(shapes)}")
    rows, columns = shapes.pop()
    _check_voxels(folder, rows * columns * len(datasets), max_voxels)
    positions = _slice_positions(datasets)
    order = np.argsort(positions, kind="stable")
    try:
        slices = np.stack(
            [
                np.asarray(apply_modality_lut(datasets[i].pixel_array, datasets[i]), np.float32)
                for i in order
            ]
        )
    except Exception as exc:
        raise VolumeError(
            f"{folder}: expected decodable single-frame greyscale slices, found an error "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if slices.ndim != 3:
        raise VolumeError(
            f"{folder}: expected single-frame greyscale slices, found pixel arrays of shape "
            f"{slices.shape[1:]}"
        )
    middle = datasets[order[len(order) // 2]]
    window = _dicom_window(middle) or _percentile_window(slices)
    invert = str(middle.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    return Volume(slices, np.asarray(positions)[order], window, invert)


def _slice_positions(datasets: Sequence[Dataset]) -> np.ndarray:
    """Each slice's position (mm) along the normal of its plane; by instance number when the
    geometry is missing, spaced by SpacingBetweenSlices or SliceThickness (else 1 mm)."""
    try:
        orientation = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        return np.array(
            [np.dot(normal, np.array(d.ImagePositionPatient, np.float64)) for d in datasets]
        )
    except (AttributeError, TypeError, ValueError):
        first = datasets[0]
        spacing = float(
            getattr(first, "SpacingBetweenSlices", None) or getattr(first, "SliceThickness", 1)
        )
        numbers = [int(getattr(d, "InstanceNumber", i) or i) for i, d in enumerate(datasets)]
        return np.array(numbers, dtype=np.float64) * spacing


def _dicom_window(dataset: Dataset) -> tuple[float, float] | None:
    center = getattr(dataset, "WindowCenter", None)
    width = getattr(dataset, "WindowWidth", None)
    if center is None or width is None:
        return None
    # Several windows may be given (e.g. soft tissue, bone): the first is the default view.
    center = float(center[0] if isinstance(center, Sequence) else center)
    width = float(width[0] if isinstance(width, Sequence) else width)
    if width <= 0:
        return None
    return center - width / 2, center + width / 2


def _percentile_window(slices: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(slices, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    return float(low), float(high)


def _check_voxels(path: Path, voxels: int, max_voxels: int) -> None:
    if voxels > max_voxels:
        raise VolumeError(
            f"{path}: expected at most {max_voxels:,} voxels, found {voxels:,}; resample the "
            "volume or split it"
        )
