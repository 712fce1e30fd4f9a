"""DICOM input on the real files pydicom ships: compressed syntaxes, cine loops, colour spaces,
windowing, the ultrasound sector crop, and no patient data in payloads or logs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import qdrant_edge as edge
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from echolabel.images import ImageError, ImageFetcher, decode_image
from echolabel.sector import sector_box
from echolabel.settings import ConfigError, Settings
from workers.runtime import open_runtime

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Ultrasound files of pydicom's test data: a 30-frame JPEG-baseline YBR cine loop of a heart,
# a JPEG 2000 Doppler image with burned-in text, a palette image, an uncompressed RGB one.
CINE = "examples_ybr_color.dcm"
US_J2K = "examples_jpeg2k.dcm"
US_FILES = [CINE, US_J2K, "examples_palette.dcm", "examples_rgb_color.dcm"]
PATIENT = "Zyxwv^Marker7741"
PATIENT_ID = "PID-MARKER-99173"


def decode(data: bytes, **options) -> np.ndarray:
    return np.asarray(decode_image(data, max_pixels=10_000_000, source="t.dcm", **options))


def changed(name: str, **changes: object) -> bytes:
    dataset = pydicom.dcmread(FILES / name)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    out = io.BytesIO()
    dataset.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize("name", US_FILES)
def test_ultrasound_files_decode_to_rgb(name):
    rgb = decode((FILES / name).read_bytes())
    dataset = pydicom.dcmread(FILES / name, stop_before_pixels=True)
    assert dataset.Modality == "US"
    assert rgb.shape == (dataset.Rows, dataset.Columns, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10  # an image, not a blank


@pytest.mark.parametrize(
    "compressed",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(compressed):
    # JPEG-LS (pylibjpeg-libjpeg), RLE (pydicom's own decoder), JPEG 2000: the same 16-bit MR.
    assert np.array_equal(decode((FILES / compressed).read_bytes()), decode_file("MR_small.dcm"))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, converted by pydicom
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    ],
)
def test_colour_syntaxes_match_the_lossless_rgb(name):
    reference = decode_file("SC_rgb_rle.dcm").astype(int)  # RLE: lossless RGB stripes
    difference = np.abs(decode_file(name).astype(int) - reference)
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())


def test_12_bit_jpeg_extended_decodes():
    rgb = decode_file("JPGExtended.dcm")
    assert rgb.shape == (1024, 256, 3) and rgb.max() == 255


def test_cine_loop_embeds_the_frame_the_setting_names():
    data = (FILES / CINE).read_bytes()
    for frame, index in (("first", 0), ("middle", 15), ("last", 29)):
        expected = pixel_array(FILES / CINE, index=index)  # pydicom: YBR → RGB
        assert np.array_equal(decode(data, dicom_frame=frame), expected), frame
    assert not np.array_equal(decode(data, dicom_frame="first"), decode(data))


def test_multi_frame_rle_decodes_its_middle_frame():
    expected = pixel_array(FILES / "SC_rgb_rle_2frame.dcm", index=1)
    assert np.array_equal(decode_file("SC_rgb_rle_2frame.dcm"), expected)


def test_rescale_is_applied_before_the_window():
    # CT_small: raw values with slope 1, intercept -1024, i.e. Hounsfield units after rescale.
    raw = pixel_array(FILES / "CT_small.dcm").astype(float)
    hu = raw - 1024
    rgb = decode(changed("CT_small.dcm", WindowCenter=40, WindowWidth=400))
    grey = rgb[..., 0]
    assert (grey[hu <= 40 - 200] == 0).all() and (grey[hu >= 40 + 200] == 255).all()
    inside = (hu > -150) & (hu < 230)
    expected = np.clip(((hu - 39.5) / 399 + 0.5) * 255, 0, 255)  # DICOM's linear window
    assert np.abs(grey[inside] - expected[inside]).max() <= 1


def test_monochrome1_is_shown_inverted():
    plain = decode_file("CT_small.dcm")
    inverted = decode(changed("CT_small.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert np.array_equal(inverted, 255 - plain)


def test_voi_lut_sequence_is_applied():
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 8])  # 0..4095 onto 8 bits: a step at 2048
    lut.add_new("LUTData", "US", [0] * 2048 + [255] * 2048)
    dataset = pydicom.dcmread(FILES / "CT_small.dcm")
    dataset.VOILUTSequence = [lut]
    out = io.BytesIO()
    dataset.save_as(out)
    grey = decode(out.getvalue())[..., 0]
    hu = pixel_array(FILES / "CT_small.dcm").astype(float) - 1024
    assert set(np.unique(grey)) <= {0, 255}
    assert (grey[hu >= 2048] == 255).all() and (grey[(hu >= 0) & (hu < 2048)] == 0).all()


def test_an_undecodable_syntax_is_named():
    # MPEG-4 video (some ultrasound cine exports): no pure-Python decoder exists.
    dataset = pydicom.dcmread(FILES / CINE)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
    out = io.BytesIO()
    dataset.save_as(out)
    with pytest.raises(ImageError) as caught:
        decode(out.getvalue())
    assert caught.value.reason == "not_an_image" and "MPEG-4" in str(caught.value)


def test_a_truncated_cine_loop_is_corrupt():
    data = (FILES / CINE).read_bytes()
    with pytest.raises(ImageError) as caught:
        decode(data[: len(data) * 2 // 3])
    assert caught.value.reason == "corrupt"


def test_settings_name_the_frame_and_the_crop():
    chosen = Settings.from_env(
        {"ECHOLABEL_DICOM_FRAME": "First", "ECHOLABEL_ULTRASOUND_CROP": "all"}
    )
    assert (chosen.dicom_frame, chosen.ultrasound_crop) == ("first", "all")
    for name, bad in (("ECHOLABEL_DICOM_FRAME", "7"), ("ECHOLABEL_ULTRASOUND_CROP", "sector")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: bad})


def test_the_fetcher_reads_dicom_with_the_settings(settings):
    (settings.local_files_root / CINE).write_bytes((FILES / CINE).read_bytes())
    settings = Settings(
        local_files_root=settings.local_files_root,
        dicom_frame="last",
        ultrasound_crop="dicom",
    )
    with ImageFetcher(settings) as fetcher:
        image = np.asarray(fetcher.load(CINE))
    data = (FILES / CINE).read_bytes()
    assert np.array_equal(image, decode(data, dicom_frame="last", ultrasound_crop="dicom"))


# --- the sector crop ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "scale"), [(US_J2K, 1.0), ("examples_rgb_color.dcm", 0.5)])
def test_crop_drops_the_burned_in_text_above_the_sector(name, scale):
    # The same Doppler capture at 640×480 and 320×240.
    data = (FILES / name).read_bytes()
    full = decode(data, ultrasound_crop="off")
    box = sector_box(full)
    assert box is not None
    left, top, right, bottom = (v / scale for v in box)
    # Site, patient and date text fill the top 100 rows (of 480); "LYMPH NODE" and a scale
    # lie below the sector (row 345 on); the sector spans nearly the whole width.
    assert 90 <= top <= 110 and 300 <= bottom <= 345 and right - left > 600, box
    x0, y0, x1, y1 = box
    assert np.array_equal(decode(data, ultrasound_crop="dicom"), full[y0:y1, x0:x1])


def test_crop_keeps_the_whole_image_when_the_sector_is_too_dark_to_find():
    # The Philips palette capture: a nearly black sector under a bright title banner.
    full = decode_file("examples_palette.dcm")
    assert sector_box(full) is None
    assert np.array_equal(decode_file("examples_palette.dcm", ultrasound_crop="dicom"), full)


def test_crop_of_the_cine_keeps_the_heart_sector_only():
    full = decode((FILES / CINE).read_bytes())
    cropped = decode((FILES / CINE).read_bytes(), ultrasound_crop="dicom")
    assert cropped.shape[0] < full.shape[0] and cropped.shape[1] < full.shape[1] / 2
    # The burned-in label in the top-left corner (patient field) is outside the crop.
    box = sector_box(full)
    assert box is not None and box[0] > 40


def test_crop_uses_the_ultrasound_regions_of_the_header_when_they_fit():
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 40, 30
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 279, 209
    data = changed("examples_rgb_color.dcm", SequenceOfUltrasoundRegions=[region])
    full = decode(data)
    assert np.array_equal(decode(data, ultrasound_crop="dicom"), full[30:210, 40:280])


def test_crop_leaves_non_ultrasound_dicom_alone_unless_all():
    data = (FILES / "CT_small.dcm").read_bytes()
    assert np.array_equal(decode(data, ultrasound_crop="dicom"), decode(data))


def test_no_crop_when_no_sector_is_found():
    black = np.zeros((100, 120, 3), np.uint8)
    assert sector_box(black) is None
    banner = black.copy()
    banner[:15] = 200  # a bright title bar only: too thin to be a sector
    assert sector_box(banner) is None


# --- patient data never leaves the pixels --------------------------------------------------


def test_payloads_and_logs_hold_no_dicom_header_values(settings, caplog, capsys):
    from echolabel.core.model import SimilarityModel
    from echolabel.embedding import TaskImage

    root = settings.local_files_root
    for name in (CINE, US_J2K):
        dataset = pydicom.dcmread(FILES / name)
        dataset.PatientName = PATIENT
        dataset.PatientID = PATIENT_ID
        dataset.InstitutionName = PATIENT  # burned-in site text has a header twin too
        dataset.save_as(root / name)
    broken = (root / CINE).read_bytes()
    (root / "broken.dcm").write_bytes(broken[: len(broken) // 3])  # truncated pixel data
    settings = settings.__class__(**{**settings.__dict__, "max_image_bytes": 5_000_000})
    caplog.set_level(logging.DEBUG)
    services = open_runtime(settings)
    try:
        model = SimilarityModel(services, 9)
        report = model.embed(
            [
                TaskImage(1, str(root / CINE), {"view": "heart"}),
                TaskImage(2, str(root / US_J2K), {"view": "node"}),
                TaskImage(3, str(root / "broken.dcm")),
            ]
        )
        assert set(report.failures) == {3}
        points = list(services.store.iter_points(9))
        assert sorted(p.task for p in points) == [1, 2]
        # The payloads as the engine holds them (Qdrant Edge, the embedded default).
        store = services.store
        raw = [
            record.payload
            for info in store.generations(9)
            for record in store._shard(info.name).scroll(
                edge.ScrollRequest(limit=100, with_payload=True)
            )[0]
        ]
    finally:
        services.close()
    assert len(raw) == 2
    for payload in raw:
        # References and labels only: no header value, no pixels.
        assert set(payload) <= {
            "project",
            "task",
            "image",
            "encoder",
            "labels",
            "labelled",
            "annotation_id",
            "annotation_updated_at",
        }, payload
    text = json.dumps(raw) + str(report.failures[3]) + caplog.text + "".join(capsys.readouterr())
    for marker in (PATIENT, "Zyxwv", "Marker7741", PATIENT_ID):
        assert marker not in text
    assert report.failures[3].reason == "corrupt"


def decode_file(name: str, **options) -> np.ndarray:
    return decode((FILES / name).read_bytes(), **options)


def test_pydicom_warnings_quoting_values_are_silenced():
    # badVR.dcm holds Number of Frames '1A': reading it makes pydicom warn with the value.
    # A fresh interpreter, because pytest records warnings with its own filters.
    code = (
        "import logging, sys; from echolabel.logs import configure_logging; "
        "from echolabel.images import ImageError, decode_image; configure_logging('DEBUG'); "
        f"data = open({str(FILES / 'badVR.dcm')!r}, 'rb').read()\n"
        "try: decode_image(data, max_pixels=10**6)\n"
        "except ImageError as e: print(e.reason)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "corrupt"
    assert "1A" not in done.stderr + done.stdout and "Invalid value" not in done.stderr
