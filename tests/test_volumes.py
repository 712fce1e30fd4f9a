"""3D volumes: NIfTI and DICOM series read in slice order, the three slice samplings, and the
count vote over slices evaluated leave-one-volume-out — on synthetic volumes with known labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from echolabel.cli import main
from echolabel.folders import Item
from echolabel.volumes import Sampling, VolumeError, read_volume, volume_vote
from tests.helpers import TINY_ENCODER
from workers.evaluation.volumes import evaluate_volumes

SIDE = 16
SLICES = 12
# Each class is a bright half of the slice: top, bottom or left. A 4×4 thumbnail (the tiny
# test encoder) tells them apart, so every slice has a known true class.
PATTERNS = ("top", "bottom", "left")


def pattern_slice(pattern: str, rng: np.random.Generator) -> np.ndarray:
    image = rng.normal(100, 10, (SIDE, SIDE))
    half = SIDE // 2
    region = {
        "top": (slice(0, half), slice(None)),
        "bottom": (slice(half, None), slice(None)),
        "left": (slice(None), slice(0, half)),
    }[pattern]
    image[region] += 800
    return image


def write_nifti(path: Path, slices: np.ndarray, spacing: float = 2.5, flip: bool = False) -> Path:
    """`slices` (n, rows, cols) as a NIfTI volume whose axis 2 is the slice axis (RAS), laid
    out so that the reader shows each slice as given (anterior up)."""
    data = np.stack([np.rot90(s, -1) for s in slices], axis=2).astype(np.float32)
    affine = np.diag([1.0, 1.0, spacing, 1.0])
    if flip:  # stored superior → inferior: the reader must turn it back
        data = data[:, :, ::-1]
        affine[2, 2] = -spacing
        affine[2, 3] = spacing * (data.shape[2] - 1)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_series(folder: Path, slices: np.ndarray, spacing: float, seed: int = 0) -> Path:
    """`slices` as one DICOM CT series: files and instance numbers shuffled, so only the
    geometry (ImagePositionPatient) gives the order; stored raw = value + 1000."""
    folder.mkdir(parents=True)
    series = generate_uid()
    order = np.random.default_rng(seed).permutation(len(slices))
    for file_number, index in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.PatientName = "Volume^Marker"
        ds.InstanceNumber = int(len(slices) - file_number)  # deliberately not the order
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, -50.0 + float(index) * spacing]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = slices.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
        ds.PixelData = (np.rint(slices[index]) + 1000).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{generate_uid()[-12:]}.dcm", enforce_file_format=True)
    return folder


def index_volume(n: int = SLICES) -> np.ndarray:
    """Slice k is filled with the value 10·k: its content says where it belongs."""
    return np.stack([np.full((SIDE, SIDE), 10.0 * k) for k in range(n)])


def slice_values(volume) -> list[int]:
    return [round(float(volume.slices[k].mean()) / 10) for k in range(len(volume))]


# --- sampling --------------------------------------------------------------------------------


def test_sampling_specs_parse_and_bad_ones_name_the_forms():
    assert Sampling.parse("every-n:4") == Sampling("every-n", 4)
    assert Sampling.parse("every-mm:7.5") == Sampling("every-mm", 7.5)
    assert Sampling.parse("random:8") == Sampling("random", 8)
    assert str(Sampling.parse("ALL")) == "all"
    for bad in ("every-n:0", "every-n:2.5", "random:", "every-mm:-1", "every:3", "all:2"):
        with pytest.raises(ValueError, match="every-n:N"):
            Sampling.parse(bad)


def test_every_n_and_random_pick_the_expected_slices():
    positions = np.arange(10) * 2.0
    assert Sampling("every-n", 4).pick(positions) == [0, 4, 8]
    assert Sampling("all").pick(positions) == list(range(10))
    picked = Sampling("random", 4).pick(positions, seed=3)
    assert len(set(picked)) == 4 and picked == sorted(picked)
    assert Sampling("random", 4).pick(positions, seed=3) == picked  # seeded
    assert any(Sampling("random", 4).pick(positions, seed=s) != picked for s in range(4, 9))
    assert Sampling("random", 20).pick(positions) == list(range(10))


def test_every_mm_honours_the_spacing():
    assert Sampling("every-mm", 5).pick(np.arange(10) * 2.5) == [0, 2, 4, 6, 8]
    assert Sampling("every-mm", 5).pick(np.arange(10) * 1.0) == [0, 5]
    # 3 mm slices, every 5 mm: the nearest slice to 0, 5, 10, 15, 20, 25 mm.
    assert Sampling("every-mm", 5).pick(np.arange(10) * 3.0) == [0, 2, 3, 5, 7, 8]
    # An uneven stack (a gap of 10 mm): positions, not slice numbers, decide.
    uneven = np.array([0.0, 1, 2, 3, 13, 14, 15])
    assert Sampling("every-mm", 5).pick(uneven) == [0, 3, 4, 6]


# --- reading ---------------------------------------------------------------------------------


def test_nifti_volume_reads_in_slice_order_with_its_spacing(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "v.nii.gz", index_volume(), spacing=2.5))
    assert len(volume) == SLICES and slice_values(volume) == list(range(SLICES))
    assert np.allclose(np.diff(volume.positions_mm), 2.5)
    picked = Sampling("every-mm", 5).pick(volume.positions_mm)
    assert [slice_values(volume)[i] for i in picked] == [0, 2, 4, 6, 8, 10]
    image = volume.slice_image(SLICES - 1)
    assert image.mode == "RGB" and image.size == (SIDE, SIDE)


def test_nifti_stored_upside_down_is_read_inferior_to_superior(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "v.nii", index_volume(), flip=True))
    assert slice_values(volume) == list(range(SLICES))


def test_dicom_series_is_ordered_by_position_not_by_file_or_instance(tmp_path):
    folder = write_series(tmp_path / "series", index_volume(), spacing=3.0)
    volume = read_volume(folder)
    assert slice_values(volume) == list(range(SLICES))  # rescale applied: raw - 1000
    assert np.allclose(np.diff(volume.positions_mm), 3.0)
    picked = Sampling("every-mm", 6).pick(volume.positions_mm)
    assert [slice_values(volume)[i] for i in picked] == [0, 2, 4, 6, 8, 10]


def test_dicom_series_uses_its_window(tmp_path):
    folder = write_series(tmp_path / "series", index_volume(), spacing=1.0)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = 50, 20
        ds.save_as(path)
    volume = read_volume(folder)
    assert volume.window == (40.0, 60.0)
    assert np.asarray(volume.slice_image(3))[0, 0, 0] == 0  # 30 < 40
    assert np.asarray(volume.slice_image(7))[0, 0, 0] == 255  # 70 > 60


def test_unreadable_volumes_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="found none"):
        read_volume(tmp_path / "empty")
    write_series(tmp_path / "two" / "a", index_volume(3), 1.0)
    write_series(tmp_path / "two" / "b", index_volume(3), 1.0)
    for path in (tmp_path / "two" / "b").iterdir():
        path.rename(tmp_path / "two" / "a" / path.name)
    with pytest.raises(VolumeError, match="one DICOM series per folder, found 2"):
        read_volume(tmp_path / "two" / "a")
    (tmp_path / "scan.png").write_bytes(b"png")
    with pytest.raises(VolumeError, match="NIfTI"):
        read_volume(tmp_path / "scan.png")
    (tmp_path / "bad.nii").write_bytes(b"not nifti")
    with pytest.raises(VolumeError, match="readable NIfTI"):
        read_volume(tmp_path / "bad.nii")


# --- the count vote --------------------------------------------------------------------------


def test_volume_vote_counts_slices_and_ignores_abstentions():
    assert volume_vote(["a", "b", "a", None, None, None]) == ("a", {"a": 2, "b": 1})
    assert volume_vote(["b", "a"]) == ("a", {"a": 1, "b": 1})  # tie: sort order
    assert volume_vote([None, None]) == (None, {})


def synthetic_set(root: Path, per_class: int = 4, seed: int = 0) -> list[Item]:
    """Volumes of each pattern; the first volume of class `top` has 5 of 12 slices that look
    like `bottom` (slice votes mixed, volume vote right). NIfTI and DICOM series alternate."""
    rng = np.random.default_rng(seed)
    items = []
    for label in PATTERNS:
        for v in range(per_class):
            patterns = [label] * SLICES
            if label == "top" and v == 0:
                patterns[::2] = ["bottom"] * 6
                patterns[0] = "top"
            slices = np.stack([pattern_slice(p, rng) for p in patterns])
            if v % 2:
                path = write_series(root / f"{label}{v}", slices, spacing=2.0, seed=v)
            else:
                path = write_nifti(root / f"{label}{v}.nii.gz", slices, spacing=2.0)
            items.append(Item(path.name, path, {"region": label}, group=path.name))
    return items


def test_count_vote_labels_every_volume_despite_mixed_slices(tmp_path, settings):
    items = synthetic_set(tmp_path)
    report = evaluate_volumes(
        items, ["region"], [TINY_ENCODER], settings, samplings=[Sampling("all")]
    )
    result = report["encoders"][TINY_ENCODER]
    assert result["images"] == len(items) * SLICES and result["failed"] == {}
    volumes = result["volume_vote"]["region"]
    assert volumes["volumes"] == 12 and volumes["accuracy"] == 1.0
    assert {c: v["recall"] for c, v in volumes["per_class"].items()} == dict.fromkeys(PATTERNS, 1.0)
    mixed = next(r for r in volumes["volume_votes"] if r["volume"] == "top0.nii.gz")
    assert mixed["voted"] == "top" and mixed["counts"]["bottom"] == 5
    # The slices themselves are not all right: the five bottom-looking ones are voted bottom.
    slice_accuracy = result["fields"]["region"]["vote"]["accuracy"]
    assert slice_accuracy < 1.0
    # The slice-level report's contract view is leave-one-volume-out.
    assert result["fields"] == result["leave_patient_out"]


def test_slices_of_the_same_volume_are_never_its_neighbours(tmp_path, settings):
    items = synthetic_set(tmp_path, per_class=2)
    # One more volume, labelled `left` but looking like `top`: its own slices would outvote
    # everything if they could be its neighbours.
    rng = np.random.default_rng(9)
    odd = write_nifti(tmp_path / "odd.nii.gz", np.stack([pattern_slice("top", rng)] * SLICES))
    items.append(Item("odd.nii.gz", odd, {"region": "left"}))
    report = evaluate_volumes(
        items, ["region"], [TINY_ENCODER], settings, samplings=[Sampling("all")]
    )
    volumes = report["encoders"][TINY_ENCODER]["volume_vote"]["region"]
    row = next(r for r in volumes["volume_votes"] if r["volume"] == "odd.nii.gz")
    assert row["voted"] == "top"
    assert volumes["per_class"]["left"]["recall"] == 2 / 3


@pytest.mark.parametrize(
    ("spec", "per_volume"), [("every-n:4", 3), ("every-mm:6", 4), ("random:5", 5), ("all", 12)]
)
def test_each_sampling_embeds_the_chosen_slices_and_still_votes_right(
    tmp_path, settings, spec, per_volume
):
    items = synthetic_set(tmp_path, per_class=3, seed=1)
    # Without the mixed volume every sampled slice carries its class.
    items = [i for i in items if i.task != "top0.nii.gz"]
    report = evaluate_volumes(
        items, ["region"], [TINY_ENCODER], settings, samplings=[Sampling.parse(spec)]
    )
    result = report["encoders"][TINY_ENCODER]
    assert result["images"] == len(items) * per_volume  # 2 mm slices: every 6 mm = every 3rd
    assert result["volume_vote"]["region"]["accuracy"] == 1.0
    assert report["dataset"]["sampling"] == spec


def test_several_samplings_are_compared_in_one_report(tmp_path, settings, monkeypatch):
    from echolabel.embedding import Embedder

    embedded = []
    real = Embedder.embed_images

    def counting(self, encoder, images):
        embedded.extend(images)
        return real(self, encoder, images)

    monkeypatch.setattr(Embedder, "embed_images", counting)
    items = [i for i in synthetic_set(tmp_path, per_class=3) if i.task != "top0.nii.gz"]
    samplings = [Sampling.parse(spec) for spec in ("every-n:4", "every-mm:6", "random:6")]
    report = evaluate_volumes(items, ["region"], [TINY_ENCODER], settings, samplings=samplings)
    # A slice two samplings pick is embedded once: at most all 12 slices of each volume.
    assert 48 <= len(embedded) <= 8 * SLICES < 24 + 32 + 48
    assert list(report["encoders"]) == [
        f"{TINY_ENCODER} every-n:4",
        f"{TINY_ENCODER} every-mm:6",
        f"{TINY_ENCODER} random:6",
    ]
    assert [r["images"] for r in report["encoders"].values()] == [24, 32, 48]
    assert all(r["volume_vote"]["region"]["accuracy"] == 1.0 for r in report["encoders"].values())
    assert report["dataset"]["sampling"] == "every-n:4, every-mm:6, random:6"


def test_cli_writes_the_volume_report(tmp_path, monkeypatch, capsys):
    root = tmp_path / "volumes"
    root.mkdir()
    items = synthetic_set(root, per_class=2)
    (root / "notes.txt").write_text("a file that is no volume")
    lines = ["volume,region"] + [f"{i.task},{i.labels['region']}" for i in items]
    lines.append("notes.txt,top")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("ECHOLABEL_MIN_NEIGHBOURS", "2")
    code = main(
        [
            "evaluate-volumes",
            "--volumes",
            str(root),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--field",
            "region",
            "--sampling",
            "every-n:3",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "volumes, sampling every-n:3" in out and "recall: bottom" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    result = report["encoders"][TINY_ENCODER]
    assert result["volumes"] == 6 and "notes.txt" in result["failed"]
    assert result["volume_vote"]["region"]["accuracy"] == 1.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Volumes: count vote over slices" in page and "recall top" in page
    assert "Marker" not in json.dumps(report) + page  # no DICOM header value in the report
